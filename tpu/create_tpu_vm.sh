#!/usr/bin/env bash
# Creates a Cloud TPU VM with a TensorFlow runtime for supcon_tf.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<USAGE
Usage: bash tpu/create_tpu_vm.sh --name=NAME --zone=ZONE --project=PROJECT \\
         --accelerator-type=TYPE [--version=RUNTIME] [--spot] [--dry-run]

Creates a Cloud TPU VM (gcloud compute tpus tpu-vm create).

Required:
  --name=NAME               TPU VM name (lower-case letters, digits, dashes).
  --zone=ZONE               GCE zone with capacity for TYPE, e.g. europe-west4-a.
  --project=PROJECT         GCP project id.
  --accelerator-type=TYPE   e.g. v3-8 (one host), v3-32 / v3-128 / v3-256
                            (pod slices; the reference configurations used
                            32, 128 and 256 v3 cores, see docs/reproducing.md).
Optional:
  --version=RUNTIME         TPU VM software version. Default for v2/v3/v4:
                            tpu-vm-tf-${DEFAULT_TF_VERSION}-pjrt, or
                            tpu-vm-tf-${DEFAULT_TF_VERSION}-pod-pjrt when TYPE spans
                            several hosts (more than 8 cores). Other
                            generations need it explicitly; see
                            https://cloud.google.com/tpu/docs/runtimes
  --spot                    Create a Spot TPU (cheaper, can be preempted).
  --dry-run                 Print the command (prefixed '+ ') without running it.
  -h, --help                This text.
USAGE
}

parse_opts "name zone project accelerator-type version" "spot" "$@"
check_name
check_zone
check_project
check_accelerator_type
version=$(opt version)
if [[ -z $version ]]; then
  version=$(default_tf_version "$ACCELERATOR_TYPE")
  [[ -n $version ]] ||
    die "no default --version for --accelerator-type=$ACCELERATOR_TYPE; pass" \
        "a TensorFlow runtime (tpu-vm-tf-X.Y.Z[-pod]-pjrt...), see" \
        "https://cloud.google.com/tpu/docs/runtimes"
fi
[[ $version =~ ^[A-Za-z0-9._-]+$ ]] || die "--version='$version' is not a runtime name."
(( ${#EXTRA_ARGS[@]} == 0 )) || die "unexpected arguments after --: ${EXTRA_ARGS[*]}"
need_gcloud

cmd=(gcloud compute tpus tpu-vm create "$TPU_NAME"
     --zone="$ZONE" --project="$PROJECT"
     --accelerator-type="$ACCELERATOR_TYPE" --version="$version")
if [[ -n $(opt spot) ]]; then cmd+=(--spot); fi
run "${cmd[@]}"
