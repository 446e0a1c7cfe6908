# Shared helpers of the tpu/ scripts; sourced, not run.
#
# Every script parses `--option=value` / `--option value` options with
# `parse_opts`, validates them with the `check_*` functions (which exit 2 with a
# message naming the option), and runs each external command through `run` /
# `run_shell`, which print it first as `+ command` (quoted so it can be
# copy-pasted) and, with --dry-run, print it only.
#
# Written for bash 3.2 too (macOS's /bin/bash): no associative arrays, no
# ${var,,}, and empty arrays are expanded with ${a[@]+"${a[@]}"} under `set -u`.

TPU_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$TPU_DIR/.." && pwd)"
SCRIPT_NAME="$(basename "$0")"
DRY_RUN=0
EXTRA_ARGS=()

# TensorFlow TPU VM runtimes (https://cloud.google.com/tpu/docs/runtimes):
# tpu-vm-tf-X.Y.Z[-pod]-pjrt; "-pod" for slices spanning several hosts.
# supcon_tf needs TensorFlow >= 2.16 (Keras 3).
DEFAULT_TF_VERSION="2.16.1"

die() {
  echo "$SCRIPT_NAME: error: $*" >&2
  echo "Run 'bash tpu/$SCRIPT_NAME --help' for usage." >&2
  exit 2
}

# Prints one argument quoted for a POSIX shell: bare when that is safe, and
# `--option='value'` rather than `'--option=value'` for readability.
quote_arg() {
  local a=$1 q="'\\''"
  if [[ -n $a && $a =~ ^[A-Za-z0-9_./:=@,+%-]+$ ]]; then
    printf '%s' "$a"
  elif [[ $a =~ ^(--[A-Za-z0-9_-]+=)(.*)$ ]]; then
    local value=${BASH_REMATCH[2]}
    printf "%s'%s'" "${BASH_REMATCH[1]}" "${value//\'/$q}"
  else
    printf "'%s'" "${a//\'/$q}"
  fi
}

# Prints its arguments as one shell-quoted command line (no prefix).
join_quoted() {
  local out='' a
  for a in "$@"; do out+="${out:+ }$(quote_arg "$a")"; done
  printf '%s' "$out"
}

# Prints a command as `+ cmd args`, then runs it unless --dry-run.
run() {
  echo "+ $(join_quoted "$@")"
  if (( DRY_RUN )); then return 0; fi
  "$@"
}

# Like `run` for a pipeline given as one string (run with bash -c).
run_shell() {
  echo "+ $1"
  if (( DRY_RUN )); then return 0; fi
  bash -c "set -euo pipefail; $1"
}

# Stores option $1 (dashes become underscores) in OPT_<name>.
set_opt() {
  printf -v "OPT_${1//-/_}" '%s' "$2"
}

# Prints the value of option $1 ('' when unset).
opt() {
  local var="OPT_${1//-/_}"
  printf '%s' "${!var-}"
}

# parse_opts "value options" "switch options" "$@"
# Value options take `--opt=value` or `--opt value`; switches take no value
# (stored as 1). --help calls the script's `usage` and exits 0; --dry-run is a
# switch of every script. Everything after `--` goes to EXTRA_ARGS.
parse_opts() {
  local value_opts=" $1 " switch_opts=" $2 dry-run "
  shift 2
  while (( $# )); do
    local arg=$1 key
    case $arg in
      -h|--help) usage; exit 0 ;;
      --) shift; EXTRA_ARGS=("$@"); break ;;
      --*=*)
        key=${arg%%=*}; key=${key#--}
        if [[ $value_opts != *" $key "* ]]; then
          if [[ $switch_opts == *" $key "* ]]; then
            die "--$key takes no value."
          fi
          die "unknown option --$key."
        fi
        set_opt "$key" "${arg#*=}"
        shift ;;
      --*)
        key=${arg#--}
        if [[ $switch_opts == *" $key "* ]]; then
          set_opt "$key" 1
          shift
        elif [[ $value_opts == *" $key "* ]]; then
          if (( $# < 2 )) || [[ $2 == --* ]]; then
            die "--$key needs a value."
          fi
          set_opt "$key" "$2"
          shift 2
        else
          die "unknown option $arg."
        fi ;;
      *)
        die "unexpected argument '$arg' (options are --name=VALUE; flags for" \
            "supcon_tf.main go after --)." ;;
    esac
  done
  if [[ -n $(opt dry-run) ]]; then DRY_RUN=1; fi
}

# require OPTION "what it is": exits with a message when OPTION is unset.
require() {
  if [[ -z $(opt "$1") ]]; then
    die "--$1 is required ($2)."
  fi
}

check_name() {
  require name "the TPU VM name"
  local v; v=$(opt name)
  [[ $v =~ ^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$ ]] ||
    die "--name='$v' is not a valid TPU name (lower-case letters, digits" \
        "and dashes, starting with a letter, at most 63 characters)."
  TPU_NAME=$v
}

check_zone() {
  require zone "the GCE zone, e.g. europe-west4-a"
  local v; v=$(opt zone)
  [[ $v =~ ^[a-z]+-[a-z]+[0-9]+-[a-z]$ ]] ||
    die "--zone='$v' does not look like a GCE zone (e.g. europe-west4-a)."
  ZONE=$v
}

check_project() {
  require project "the GCP project id"
  local v; v=$(opt project)
  [[ $v =~ ^([a-z0-9.-]+:)?[a-z][-a-z0-9]{4,28}[a-z0-9]$ ]] ||
    die "--project='$v' is not a valid GCP project id (6-30 lower-case" \
        "letters, digits and dashes, starting with a letter)."
  PROJECT=$v
}

check_accelerator_type() {
  require accelerator-type "e.g. v3-8, v3-32, v4-8"
  local v; v=$(opt accelerator-type)
  [[ $v =~ ^v[0-9]+[a-z]*-[0-9]+$ ]] ||
    die "--accelerator-type='$v' is not a TPU type (e.g. v3-8, v3-32," \
        "v4-16, v5litepod-8)."
  ACCELERATOR_TYPE=$v
}

# Whether accelerator type $1 spans several hosts: every generation puts at
# most 8 cores (v2-v4, v5p) or 8 chips (v5e, v6e) on one host.
is_multi_host() {
  local n=${1##*-}
  (( n > 8 ))
}

# Default TF runtime for accelerator type $1, or nothing if we know none.
default_tf_version() {
  local type=$1 pod=''
  if is_multi_host "$type"; then pod='-pod'; fi
  case $type in
    v2-*|v3-*|v4-*) echo "tpu-vm-tf-${DEFAULT_TF_VERSION}${pod}-pjrt" ;;
    *) echo '' ;;
  esac
}

# Validates --bucket and sets BUCKET to gs://name[/prefix] (no trailing /).
check_bucket() {
  require bucket "the Cloud Storage bucket for checkpoints and data, gs://NAME"
  local v name
  v=$(opt bucket)
  v=${v%/}
  v=${v#gs://}
  name=${v%%/*}
  [[ $name =~ ^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$ ]] ||
    die "--bucket='$(opt bucket)': '$name' is not a valid bucket name" \
        "(lower-case letters, digits, dots, dashes, underscores)."
  BUCKET="gs://$v"
}

# Validates --flagfile and sets FLAGFILE to its path relative to the
# repository root: flagfiles include each other by repo-relative paths, so
# supcon_tf.main is always run from the repository root (also on the VM).
check_flagfile() {
  require flagfile "e.g. flags/supcon_imagenet_resnet50.cfg"
  local v abs
  v=$(opt flagfile)
  if [[ -f $v ]]; then
    abs="$(cd "$(dirname "$v")" && pwd)/$(basename "$v")"
  elif [[ -f $REPO_ROOT/$v ]]; then
    abs="$REPO_ROOT/$v"
  else
    die "--flagfile='$v' not found (give a path such as" \
        "flags/supcon_imagenet_resnet50.cfg; see ls flags/)."
  fi
  [[ $abs == "$REPO_ROOT"/* ]] ||
    die "--flagfile='$v' is outside the repository ($REPO_ROOT); only" \
        "files shipped with it exist on the TPU VM."
  [[ $abs == *.cfg ]] || die "--flagfile='$v' is not a .cfg flagfile."
  FLAGFILE=${abs#"$REPO_ROOT"/}
}

check_experiment() {
  local v; v=$(opt experiment)
  [[ -z $v || $v =~ ^[A-Za-z0-9._-]+$ ]] ||
    die "--experiment='$v' may only contain letters, digits, '.', '_', '-'."
}

check_gs_uri() {
  local v; v=$(opt "$1")
  [[ -z $v || $v == gs://?* ]] ||
    die "--$1='$v' must be a gs:// URI (the TPU reads and writes Cloud" \
        "Storage, not the local disk of this machine)."
}

check_env() {
  local v item; v=$(opt env)
  [[ -z $v ]] && return 0
  local IFS=,
  for item in $v; do
    [[ $item =~ ^[A-Za-z_][A-Za-z0-9_]*=[^\ \']*$ ]] ||
      die "--env: '$item' is not NAME=VALUE (comma-separated, no spaces)."
  done
}

# Fails early, with a hint, when gcloud is missing (not needed for --dry-run).
need_gcloud() {
  if (( ! DRY_RUN )) && ! command -v gcloud >/dev/null 2>&1; then
    die "gcloud not found on PATH; install the Google Cloud CLI" \
        "(https://cloud.google.com/sdk/docs/install) or use --dry-run."
  fi
}
