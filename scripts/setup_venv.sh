#!/usr/bin/env bash
# Creates .venv at the project root (once) and installs supcon_tf into it
# (editable, with test extras). Re-installs when setup.py changes. Idempotent.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($python --version 2>&1)" >&2
  "$python" -m venv .venv
fi
stamp=".venv/.supcon_tf_installed"
want="$(sha256sum setup.py | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing supcon_tf and its dependencies into .venv" >&2
  .venv/bin/python -m pip install --quiet --upgrade pip >&2 2>/dev/null || true
  .venv/bin/python -m pip install --quiet -e '.[test]' 2>&1 \
    | grep -v "^WARNING: Location" >&2 || true
  # TF's C++ start-up notes are silenced; a failed import shows its error.
  check="import supcon_tf, tensorflow, keras, tensorflow_datasets, sklearn"
  TF_CPP_MIN_LOG_LEVEL=3 .venv/bin/python -c "$check" 2>/dev/null \
    || { TF_CPP_MIN_LOG_LEVEL=3 .venv/bin/python -c "$check";
         echo "[setup] install failed" >&2; exit 1; }
  echo "$want" > "$stamp"
fi
