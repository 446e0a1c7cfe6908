#!/usr/bin/env bash
# End-to-end quickstart on the embedded digits dataset (no download): sets up
# .venv if needed, then pretrains (SupCon), trains the classifier, evaluates and
# exports, and prints the result. Extra arguments are passed as flags.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup_venv.sh
export TF_CPP_MIN_LOG_LEVEL=2
model_dir="${MODEL_DIR:-$root/runs/quickstart}"
exec .venv/bin/python -m supcon_tf.main --dataset=digits --dry_run \
  --model_dir="$model_dir" "$@"
