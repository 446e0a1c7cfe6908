#!/usr/bin/env bash
# Runs one flagfile on a multi-host Cloud TPU pod slice (e.g. v3-32).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
source "$(dirname "${BASH_SOURCE[0]}")/experiment_lib.sh"

usage() {
  experiment_usage run_pod.sh \
"Trains on a TPU pod slice (v3-32, v3-128, v3-256, ...; the sizes the reference
configurations were run on): copies this repository to every host and installs
it there (gcloud ... --worker=all), then starts supcon_tf.main on worker 0 with
--tpu=NAME and TPU_LOAD_LIBRARY=0: TensorFlow drives all hosts of the slice from
that one client. For a single-host TPU VM use tpu/run_experiment.sh."
}

experiment_main pod "$@"
