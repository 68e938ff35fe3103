#!/usr/bin/env bash
# Create .venv (if needed) and install pathbundles with its test tools and the MONAI Deploy SDK (the [deploy]
# extra). Idempotent: skips pip when pyproject.toml has not changed since the last successful install. Source it or
# run it; it prints nothing when up to date.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${PATHBUNDLES_VENV:-$repo/.venv}"
python="${PYTHON:-python3}"
# A plain "torch" pulls several GB of CUDA wheels; the pinned version resolves to the CPU build on CPU machines
# that carry it locally. Override with TORCH_SPEC (e.g. "torch" on a GPU machine).
torch_spec="${TORCH_SPEC:-torch==2.13.0}"

if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip
fi
stamp="$venv/.pathbundles-installed-$(cat "$repo/pyproject.toml" | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    "$venv/bin/python" -m pip install -q "$torch_spec"
    # [deploy]: the MONAI Deploy App SDK (Holoscan) that tests/test_deploy.py runs built applications with.
    "$venv/bin/python" -m pip install -q -e "$repo[dev,deploy]"
    rm -f "$venv"/.pathbundles-installed-*
    touch "$stamp"
fi
