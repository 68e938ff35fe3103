#!/usr/bin/env bash
# Set everything up, then run the main job: the scannet inference bundle on the phantom demo slide.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo/scripts/setup.sh"
cd "$repo"
# Holoscan (the [deploy] extra, imported with monai) asks for a 32 MB stack; raise it where the shell may.
ulimit -s 32768 2>/dev/null || true
"${PATHBUNDLES_VENV:-$repo/.venv}/bin/python" -m monai.bundle run --config_file bundles/scannet/configs/inference.json "$@"
