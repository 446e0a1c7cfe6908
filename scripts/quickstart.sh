#!/usr/bin/env bash
# End-to-end quickstart on the embedded digits dataset (no download).
#
# Sets up .venv if needed, then for each method trains stage 1 (encoder +
# projection head; the kNN monitor of the embedding printed every 5 epochs),
# stage 2 (classifier on the frozen encoder), evaluates on the test split
# (linear top-1, then retrieval metrics) and exports a SavedModel -- SupCon,
# and the cross-entropy baseline with the same epochs -- and prints their
# results side by side.
#
#   bash scripts/quickstart.sh                       # SupCon vs cross-entropy
#   QUICKSTART_METHODS="supcon cross_entropy simclr" bash scripts/quickstart.sh
#   bash scripts/quickstart.sh --stage_1_epochs=5    # extra flags go to every run
#
# Runs land in runs/quickstart/<method> (QUICKSTART_DIR to change); a finished
# run is not retrained (delete its directory to start over).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup_venv.sh
export TF_CPP_MIN_LOG_LEVEL=3
noise='^(WARNING: All log messages before absl|[IW][0-9]{4} |E[0-9]{4} .*(cuInit|cuda))'
runs="${QUICKSTART_DIR:-$root/runs/quickstart}"
methods="${QUICKSTART_METHODS:-supcon cross_entropy}"
dirs=()
for method in $methods; do
  case "$method" in
    supcon) flagfile=flags/quickstart_digits.cfg ;;
    cross_entropy|simclr) flagfile="flags/quickstart_digits_${method}.cfg" ;;
    *) echo "unknown method '$method' (supcon, cross_entropy, simclr)" >&2; exit 2 ;;
  esac
  echo "=== $method ($flagfile) ==="
  start=$(date +%s)
  # TF's C++ start-up chatter (CUDA probing, oneDNN notes) is filtered from
  # stderr; real errors and Python tracebacks still show.
  .venv/bin/python -m supcon_tf.main --flagfile="$flagfile" \
    --mode=train_then_eval --model_dir="$runs/$method" "$@" \
    2> >(grep -v -E "$noise" >&2)
  echo $(( $(date +%s) - start )) > "$runs/$method/wall_time_s"
  # Precision@1, MAP@R, recall@k, NMI of the embedding (not in the wall time).
  .venv/bin/python -m supcon_tf.main --flagfile="$flagfile" \
    --mode=eval_retrieval --model_dir="$runs/$method" "$@" \
    2> >(grep -v -E "$noise" >&2)
  dirs+=("$runs/$method")
done
echo
echo "=== Results on the digits test split (360 images) ==="
# Linear top-1, retrieval table, the monitor's kNN per epoch, and its curves.
.venv/bin/python -m supcon_tf.evaluation.report --plot="$runs/monitor.png" \
  "${dirs[@]}" 2> >(grep -v -E "$noise" >&2)
