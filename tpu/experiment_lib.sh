# The body of run_experiment.sh (one TPU VM host) and run_pod.sh (a pod
# slice); sourced by them, not run. Needs lib.sh.
#
# Steps: ship this repository to the TPU VM (a tarball of the working tree, or
# a git clone with --git-url), install it, then run
#   python3 -m supcon_tf.main --flagfile=FLAGFILE --tpu=... --data_dir=...
#       --model_dir=... [flags after --]
# from the repository root there (flagfiles include each other by
# repo-relative paths), streaming its output and keeping a copy in
# ~/logs/EXPERIMENT.log on the VM.

# Python packages the TPU VM needs besides the runtime's own TensorFlow and
# Keras: setup.py's install_requires minus tensorflow/keras, which we must not
# let pip replace (a PyPI tensorflow wheel would shadow the TPU build).
REMOTE_DEPS=(tensorflow-datasets absl-py numpy scikit-learn)
REMOTE_DIR='~/supcon_tf'

experiment_usage() {
  local script=$1 what=$2
  cat <<USAGE
Usage: bash tpu/$script --name=NAME --zone=ZONE --project=PROJECT \\
         --bucket=gs://BUCKET --flagfile=flags/CONFIG.cfg [options] \\
         [-- FLAGS FOR supcon_tf.main]

$what

Required:
  --name=NAME           The TPU VM (see tpu/create_tpu_vm.sh).
  --zone=ZONE           Its GCE zone.
  --project=PROJECT     Its GCP project id.
  --bucket=gs://BUCKET  Cloud Storage bucket (optionally gs://BUCKET/prefix)
                        for the model directory and, by default, the data.
  --flagfile=FILE       A flagfile of this repository, e.g.
                        flags/supcon_imagenet_resnet50.cfg.
Optional:
  --experiment=ID       Run name (default: the flagfile's name). The model
                        directory is gs://BUCKET/supcon_tf/ID; running again
                        with the same ID resumes from its last checkpoint.
  --model-dir=gs://...  Model directory (overrides the one above).
  --data-dir=gs://...   tfds data_dir (default gs://BUCKET/tensorflow_datasets;
                        the datasets must be prepared there, see
                        docs/reproducing.md).
  --git-url=URL         Clone this repository from URL on the VM instead of
                        copying the local working tree.
  --git-ref=REF         Branch, tag or commit to check out with --git-url.
  --env=K=V[,K=V...]    Environment variables for the training process (e.g.
                        what your TPU runtime's documentation asks for).
  --detach              Start training in the background (nohup) and return;
                        follow it with the printed tail -f command.
  --dry-run             Print every command (prefixed '+ ') without running
                        anything.
  -h, --help            This text.
Flags after -- go to supcon_tf.main and override the flagfile, e.g.
  -- --mode=train_then_eval --stage_1_epochs=10
USAGE
}

# experiment_main single|pod "$@"
experiment_main() {
  local kind=$1
  shift
  parse_opts \
    "name zone project bucket flagfile experiment model-dir data-dir git-url git-ref env" \
    "detach" "$@"
  check_name
  check_zone
  check_project
  check_bucket
  check_flagfile
  check_experiment
  check_gs_uri model-dir
  check_gs_uri data-dir
  check_env
  if [[ -n $(opt git-ref) && -z $(opt git-url) ]]; then
    die "--git-ref needs --git-url."
  fi
  need_gcloud

  local experiment model_dir data_dir
  experiment=$(opt experiment)
  if [[ -z $experiment ]]; then
    experiment=$(basename "$FLAGFILE" .cfg)
  fi
  model_dir=$(opt model-dir)
  model_dir=${model_dir:-$BUCKET/supcon_tf/$experiment}
  data_dir=$(opt data-dir)
  data_dir=${data_dir:-$BUCKET/tensorflow_datasets}

  local location=(--zone="$ZONE" --project="$PROJECT")
  # Setup goes to every host of a pod slice; training starts on worker 0.
  local all_workers=() run_worker=()
  if [[ $kind == pod ]]; then
    all_workers=(--worker=all)
    run_worker=(--worker=0)
  fi

  # 1. Ship and install the code.
  local setup
  if [[ -n $(opt git-url) ]]; then
    setup="set -e; rm -rf $REMOTE_DIR; git clone --quiet $(quote_arg "$(opt git-url)") $REMOTE_DIR; cd $REMOTE_DIR"
    if [[ -n $(opt git-ref) ]]; then
      setup+="; git checkout --quiet $(quote_arg "$(opt git-ref)")"
    fi
  else
    local archive="${TMPDIR:-/tmp}/supcon_tf-$$.tgz"
    if (( ! DRY_RUN )); then
      trap 'rm -f "'"$archive"'"' EXIT
    fi
    # Tracked and untracked-but-not-ignored files: what `git status` shows,
    # without .venv, build outputs or run directories.
    if git -C "$REPO_ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
      run_shell "cd $(quote_arg "$REPO_ROOT") && git ls-files -z --cached --others --exclude-standard | tar --null -T - -czf $(quote_arg "$archive")"
    else
      run_shell "tar -C $(quote_arg "$REPO_ROOT") --exclude=./.git --exclude=./.venv -czf $(quote_arg "$archive") ."
    fi
    run gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME:supcon_tf.tgz" \
      "${location[@]}" ${all_workers[@]+"${all_workers[@]}"}
    setup="set -e; rm -rf $REMOTE_DIR; mkdir -p $REMOTE_DIR; tar -xzf ~/supcon_tf.tgz -C $REMOTE_DIR; cd $REMOTE_DIR"
  fi
  setup+="; python3 -m pip install --quiet --no-deps .; python3 -m pip install --quiet $(join_quoted "${REMOTE_DEPS[@]}")"
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${location[@]}" \
    ${all_workers[@]+"${all_workers[@]}"} --command="$setup"

  # 2. Train.
  local env_vars=() flags
  if [[ -n $(opt env) ]]; then
    IFS=, read -r -a env_vars <<< "$(opt env)"  # Validated by check_env.
  fi
  flags=(--flagfile="$FLAGFILE" --data_dir="$data_dir" --model_dir="$model_dir")
  if [[ $kind == pod ]]; then
    # TensorFlow on a pod slice: one client on worker 0 drives every host's TPU
    # through the TPU's name (not 'local'), and must not open worker 0's chips
    # itself (TPU_LOAD_LIBRARY=0), as Cloud TPU's TensorFlow pod guide says.
    env_vars=(TPU_LOAD_LIBRARY=0 ${env_vars[@]+"${env_vars[@]}"})
    flags+=(--tpu="$TPU_NAME" --tpu_zone="$ZONE" --gcp_project="$PROJECT")
  else
    flags+=(--tpu=local)
  fi
  flags+=(${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"})
  local train log="~/logs/$experiment.log"
  train=$(join_quoted python3 -m supcon_tf.main "${flags[@]}")
  if (( ${#env_vars[@]} )); then
    train="env $(join_quoted "${env_vars[@]}") $train"
  fi
  local command="cd $REMOTE_DIR && mkdir -p ~/logs && "
  if [[ -n $(opt detach) ]]; then
    command+="{ nohup $train > $log 2>&1 < /dev/null & } && echo 'Started; log: $log'"
  else
    command="set -o pipefail; $command$train 2>&1 | tee $log"
  fi
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${location[@]}" \
    ${run_worker[@]+"${run_worker[@]}"} --command="$command"
  if [[ -n $(opt detach) ]]; then
    echo "Follow the log with:" >&2
    echo "  $(join_quoted gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${location[@]}" \
      ${run_worker[@]+"${run_worker[@]}"} --command="tail -f $log")" >&2
  fi
  echo "Model directory: $model_dir (tensorboard --logdir=$model_dir)" >&2
}
