#!/usr/bin/env bash
# Runs one flagfile on a single-host Cloud TPU VM (e.g. v3-8).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
source "$(dirname "${BASH_SOURCE[0]}")/experiment_lib.sh"

usage() {
  experiment_usage run_experiment.sh \
"Trains on a single-host TPU VM (v2-8, v3-8, v4-8, ...): copies this repository
to the VM (or clones it), installs it, and runs supcon_tf.main there with
--tpu=local, streaming the log. For pod slices (v3-32 and up) use
tpu/run_pod.sh."
}

experiment_main single "$@"
