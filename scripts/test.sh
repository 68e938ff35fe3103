#!/usr/bin/env bash
# Set everything up, then run the whole test suite (slow end-to-end tests included). Extra args go to pytest.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo/scripts/setup.sh"
cd "$repo"
# Holoscan (the [deploy] extra, imported with monai) asks for a 32 MB stack; raise it where the shell may.
ulimit -s 32768 2>/dev/null || true
export MPLBACKEND=Agg
# Files tests keep for people to look at (the report's screenshot from tests/test_report.py).
export PATHBUNDLES_TEST_ARTIFACTS="${PATHBUNDLES_TEST_ARTIFACTS:-$repo/test-artifacts}"
set +e
"${PATHBUNDLES_VENV:-$repo/.venv}/bin/python" -m pytest -n "${PYTEST_WORKERS:-2}" --durations=15 "$@"
rc=$?
set -e
# pytest exits 5 when it collected no test: that is a failure of the suite, not a pass.
[ "$rc" -eq 5 ] && echo "no tests were collected" >&2
exit "$rc"
