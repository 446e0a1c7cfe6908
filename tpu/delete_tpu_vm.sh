#!/usr/bin/env bash
# Deletes a Cloud TPU VM (and so stops its billing).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<USAGE
Usage: bash tpu/delete_tpu_vm.sh --name=NAME --zone=ZONE --project=PROJECT \\
         [--yes] [--dry-run]

Deletes a Cloud TPU VM (gcloud compute tpus tpu-vm delete). Checkpoints and
logs in the bucket are kept.

Required:
  --name=NAME         TPU VM name.
  --zone=ZONE         Its GCE zone.
  --project=PROJECT   Its GCP project id.
Optional:
  --yes               Do not ask for confirmation (gcloud --quiet).
  --dry-run           Print the command (prefixed '+ ') without running it.
  -h, --help          This text.
USAGE
}

parse_opts "name zone project" "yes" "$@"
check_name
check_zone
check_project
(( ${#EXTRA_ARGS[@]} == 0 )) || die "unexpected arguments after --: ${EXTRA_ARGS[*]}"
need_gcloud

cmd=(gcloud compute tpus tpu-vm delete "$TPU_NAME"
     --zone="$ZONE" --project="$PROJECT")
if [[ -n $(opt yes) ]]; then cmd+=(--quiet); fi
run "${cmd[@]}"
