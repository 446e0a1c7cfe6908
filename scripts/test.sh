#!/usr/bin/env bash
# The whole test suite: sets up .venv if needed, then runs pytest on tests/.
# Extra arguments go to pytest (e.g. scripts/test.sh -k losses).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup_venv.sh
export TF_CPP_MIN_LOG_LEVEL=2 PYTHONHASHSEED=0
# A hung test fails after 15 minutes instead of stalling CI.
exec .venv/bin/python -m pytest tests/ -q -p no:cacheprovider --timeout=900 "$@"
