#!/usr/bin/env bash
# One shot: create a TPU VM, train one flagfile on it, delete it (always, via
# an EXIT trap, so that a failed or interrupted run does not leave a TPU
# billing).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<USAGE
Usage: bash tpu/launch.sh --name=NAME --zone=ZONE --project=PROJECT \\
         --accelerator-type=TYPE --bucket=gs://BUCKET --flagfile=flags/CONFIG.cfg \\
         [options] [-- FLAGS FOR supcon_tf.main]

Creates the TPU VM (tpu/create_tpu_vm.sh), trains on it in the foreground
(tpu/run_experiment.sh for one host, tpu/run_pod.sh when TYPE spans several
hosts, i.e. more than 8 cores), then deletes it (tpu/delete_tpu_vm.sh), also
when training fails or is interrupted. Checkpoints stay in the bucket, so
launching again with the same --experiment resumes.

Required:
  --name=NAME               Name for the new TPU VM.
  --zone=ZONE               GCE zone, e.g. europe-west4-a.
  --project=PROJECT         GCP project id.
  --accelerator-type=TYPE   e.g. v3-8; the reference configurations used v3-32
                            (CIFAR), v3-128 (ImageNet ResNet-50/101) and
                            v3-256 (ResNet-200); see docs/reproducing.md.
  --bucket=gs://BUCKET      Cloud Storage bucket for checkpoints and data.
  --flagfile=FILE           e.g. flags/supcon_imagenet_resnet50.cfg.
Optional:
  --version=RUNTIME         TPU software version (see create_tpu_vm.sh).
  --spot                    Spot TPU (cheaper, can be preempted).
  --experiment=ID           Run name (default: the flagfile's name).
  --model-dir=gs://...      Model directory (default gs://BUCKET/supcon_tf/ID).
  --data-dir=gs://...       tfds data_dir (default gs://BUCKET/tensorflow_datasets).
  --git-url=URL, --git-ref=REF
                            Clone the code on the VM instead of copying it.
  --env=K=V[,K=V...]        Environment variables for training.
  --keep                    Do not delete the TPU VM at the end.
  --dry-run                 Print every command (prefixed '+ ') without
                            running anything.
  -h, --help                This text.
Example:
  bash tpu/launch.sh --name=supcon-c10 --zone=europe-west4-a \\
    --project=my-project --accelerator-type=v3-32 --bucket=gs://my-bucket \\
    --flagfile=flags/supcon_cifar10_resnet50.cfg -- --mode=train_then_eval
USAGE
}

parse_opts \
  "name zone project accelerator-type version bucket flagfile experiment model-dir data-dir git-url git-ref env" \
  "spot keep" "$@"
# Validate everything before creating anything.
check_name
check_zone
check_project
check_accelerator_type
check_bucket
check_flagfile
check_experiment
check_gs_uri model-dir
check_gs_uri data-dir
check_env
need_gcloud

# Options forwarded to the step scripts (only those that are set).
forward() {
  local key
  for key in "$@"; do
    if [[ -n $(opt "$key") ]]; then
      printf '%s\0' "--$key=$(opt "$key")"
    fi
  done
}
common=(--name="$TPU_NAME" --zone="$ZONE" --project="$PROJECT")
dry=()
if (( DRY_RUN )); then dry=(--dry-run); fi

create=()
while IFS= read -r -d '' a; do create+=("$a"); done < <(forward version)
if [[ -n $(opt spot) ]]; then create+=(--spot); fi
experiment=(--bucket="$BUCKET" --flagfile="$FLAGFILE")
while IFS= read -r -d '' a; do experiment+=("$a"); done < <(
  forward experiment model-dir data-dir git-url git-ref env)

delete_tpu() {
  local rc=$?
  trap - EXIT
  if [[ -n $(opt keep) ]]; then
    echo "Keeping TPU VM $TPU_NAME (--keep); delete it with tpu/delete_tpu_vm.sh." >&2
  elif ! bash "$TPU_DIR/delete_tpu_vm.sh" "${common[@]}" --yes \
      ${dry[@]+"${dry[@]}"}; then
    echo "WARNING: deleting TPU VM $TPU_NAME failed; it may still be billing." \
         "Retry: bash tpu/delete_tpu_vm.sh ${common[*]} --yes" >&2
  fi
  exit "$rc"
}
# Never delete a TPU VM this script did not create: refuse an existing name.
# Past this check the trap is set before `create`, since an interrupted or
# failed create can still leave a TPU VM behind.
describe=(gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone="$ZONE"
          --project="$PROJECT" --format='value(state)')
echo "+ $(join_quoted "${describe[@]}")"
if (( ! DRY_RUN )) && "${describe[@]}" >/dev/null 2>&1; then
  die "a TPU VM named $TPU_NAME already exists in $ZONE; choose another" \
      "--name (launch.sh only deletes what it creates), or use" \
      "tpu/run_experiment.sh / tpu/run_pod.sh on it."
fi
trap delete_tpu EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

bash "$TPU_DIR/create_tpu_vm.sh" "${common[@]}" \
  --accelerator-type="$ACCELERATOR_TYPE" ${create[@]+"${create[@]}"} \
  ${dry[@]+"${dry[@]}"}
runner=run_experiment.sh
if is_multi_host "$ACCELERATOR_TYPE"; then runner=run_pod.sh; fi
bash "$TPU_DIR/$runner" "${common[@]}" "${experiment[@]}" \
  ${dry[@]+"${dry[@]}"} -- ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"}
