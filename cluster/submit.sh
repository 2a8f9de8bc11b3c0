#!/usr/bin/env bash
# Submit a cape-ray training run to a running Ray cluster as a Ray job.
#
#   cluster/submit.sh [--no-wait] [--pip] [--suffix S] [--dry-run] [--] TRAIN_FLAGS...
#
# TRAIN_FLAGS go unchanged to `python -m cape_ray train`. --name and --storage_path are required
# (as flags, or in the --config file, e.g. `cluster/submit.sh --config examples/cluster.yaml`):
# a resubmission with the same name and storage resumes the run from its latest checkpoint. Each
# submission gets a fresh submission id, "<name>-<UTC time>-<random>", so the same run can be
# submitted again after a failure while Ray keeps every attempt's logs apart.
#
# While a job of the same run is PENDING or RUNNING on the cluster (say the connection dropped
# after the first submission was accepted), submit.sh refuses and says how to follow that job:
# a second driver would only be refused by the run's driver lease (cape_ray/lease.py).
#
# Options (before the train flags):
#   --no-wait    return once the job is accepted (follow it with `ray job logs --follow ID`)
#   --pip        install requirements.txt (minus Ray) into the job's runtime env on every node.
#                Not needed on the clusters in this directory: their nodes and image already
#                carry the pinned requirements, which is much faster than a per-job install.
#   --suffix S   append S to the submission id (e.g. a retry counter) instead of the random part
#   --dry-run    print the `ray job submit` command instead of running it
#
# Environment:
#   RAY_ADDRESS          job server (dashboard) address; default http://127.0.0.1:8265, which is
#                        where `ray dashboard cluster/aws.yaml` or a kubectl port-forward puts it
#   RAY_AUTH_TOKEN       the cluster's token; otherwise the file RAY_AUTH_TOKEN_PATH or
#                        ~/.ray/auth_token is read by Ray itself
#   CAPE_EXTRA_EXCLUDES  more working-dir exclusions, comma-separated (gitignore syntax)
#   PYTHON               the python that queries the job list (standard library only; python3)
#
# Written for bash 3.2 too (macOS /bin/bash): under `set -u` an empty array must be expanded as
# ${a[@]+"${a[@]}"}, which bash before 4.4 otherwise reports as an unbound variable.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
die() { echo "submit.sh: $*" >&2; exit 2; }

wait_for_job=1 pip=0 suffix="" dry_run=0
while [ $# -gt 0 ]; do
  case "$1" in
    --no-wait) wait_for_job=0 ;;
    --pip) pip=1 ;;
    --suffix) [ $# -ge 2 ] || die "--suffix needs a value"; suffix=$2; shift ;;
    --suffix=*) suffix=${1#--suffix=} ;;
    --dry-run) dry_run=1 ;;
    --) shift; break ;;
    *) break ;;
  esac
  shift
done
train_args=("$@")

# The run name and storage decide what a resubmission resumes, so both must be explicit: as flags,
# or as top-level `name:` / `storage_path:` keys of a --config file (flags win, as in cape-ray).
name="" storage="" config=""
while [ $# -gt 0 ]; do
  case "$1" in
    --name) name=${2:-} ;;
    --name=*) name=${1#--name=} ;;
    --storage_path | --storage-path | --output_dir | --output-dir) storage=${2:-} ;;
    --storage_path=* | --storage-path=* | --output_dir=* | --output-dir=*) storage=${1#*=} ;;
    --config) config=${2:-} ;;
    --config=*) config=${1#--config=} ;;
  esac
  shift
done
config_value() {  # a top-level `key: value` of the config file, without quotes or a trailing comment
  sed -n "s/^$1:[[:space:]]*//p" "$config" | head -n 1 | sed -e 's/[[:space:]]#.*$//' -e 's/[[:space:]]*$//' \
    -e "s/^[\"']//" -e "s/[\"']\$//"
}
if [ -n "$config" ]; then
  # The job runs in a copy of this checkout, so the file must be in it, named relative to it.
  case "$config" in
    /*) die "--config $config: give the path relative to $repo (the job runs in a copy of it)" ;;
  esac
  [ -f "$repo/$config" ] || die "--config $config: no such file in $repo (the job runs in a copy of it: put the file there)"
  config="$repo/$config"
  [ -n "$name" ] || name=$(config_value name)
  [ -n "$storage" ] || storage=$(config_value storage_path)
fi
[ -n "$name" ] || die "give --name RUN (or name: in the --config file): resubmitting the same name resumes the run"
[ -n "$storage" ] || die "give --storage_path s3://BUCKET/PREFIX or a shared absolute path (or storage_path: in the --config file)"
case "$storage" in
  *://* | /*) ;;
  *) die "--storage_path $storage is relative: on the cluster it would land in the job's temporary working directory; use s3://... or a shared absolute path" ;;
esac

address=${RAY_ADDRESS:-http://127.0.0.1:8265}

# The cluster requires token authentication; Ray's client sends the token only in token mode.
export RAY_AUTH_MODE=token
if [ -z "${RAY_AUTH_TOKEN:-}" ]; then
  token_file=${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}
  [ -s "$token_file" ] || die "no auth token: set RAY_AUTH_TOKEN or put the cluster's token in $token_file (on the head: ray get-auth-token)"
fi

# Submission ids must be unique per cluster; the run name stays the same across resubmissions.
safe_name=$(printf '%s' "$name" | tr -c 'A-Za-z0-9_.-' '-')
if [ -z "$suffix" ]; then
  suffix=$(od -An -N3 -tx1 /dev/urandom | tr -d ' \n')
fi
submission_id="$safe_name-$(date -u +%Y%m%d-%H%M%S)-$suffix"

# --working-dir uploads the repository; data, checkpoints, environments and caches stay behind
# (Ray also honours .gitignore, but the upload must not depend on one being present). Patterns
# are gitignore syntax: a leading / anchors at the repository root, so /data/ does not catch the
# cape_ray/data package.
excludes='"/.git/", "/.venv/", "/venv/", "/runs/", "/data/", "/bench/out/", "__pycache__/", "*.egg-info/", ".pytest_cache/", "*.pt", "*.ckpt"'
extra=()
IFS=',' read -r -a extra <<< "${CAPE_EXTRA_EXCLUDES:-}"
for pattern in ${extra[@]+"${extra[@]}"}; do
  pattern=$(printf '%s' "$pattern" | sed 's/^ *//; s/ *$//; s/\\/\\\\/g; s/"/\\"/g')
  [ -n "$pattern" ] && excludes+=", \"$pattern\""
done
runtime_env="{\"excludes\": [$excludes]"
if [ "$pip" = 1 ]; then
  # Ray itself must match the cluster's and is already installed there: leave it out.
  packages=""
  while IFS= read -r line; do
    line=${line%%#*}
    line=$(printf '%s' "$line" | sed 's/^ *//; s/ *$//; s/"/\\"/g')
    case "$line" in "" | ray | ray[[]* | ray=* | ray\>* | ray\<*) continue ;; esac
    packages+="${packages:+, }\"$line\""
  done < "$repo/requirements.txt"
  runtime_env+=", \"pip\": {\"packages\": [$packages], \"pip_check\": false}"
fi
runtime_env+="}"

command=(ray job submit --address "$address" --submission-id "$submission_id"
         --working-dir "$repo" --runtime-env-json "$runtime_env")
[ "$wait_for_job" = 1 ] || command+=(--no-wait)
command+=(-- python -m cape_ray train ${train_args[@]+"${train_args[@]}"})

if [ "$dry_run" = 1 ]; then
  printf '%q ' ${command[@]+"${command[@]}"}
  echo
  exit 0
fi

# One job per run: list this run's jobs that are still PENDING or RUNNING (ids "<name>-<UTC
# time>-<suffix>", as made above) through the job REST API. A concurrent submit.sh can slip past
# this check; the run's driver lease then refuses the second driver.
active=$("${PYTHON:-python3}" - "$address" "$safe_name" <<'PY'
import json, os, re, sys, urllib.error, urllib.request
address, name = sys.argv[1].rstrip("/"), sys.argv[2]
token = os.environ.get("RAY_AUTH_TOKEN")
if not token:
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    token = open(path).read().strip()
request = urllib.request.Request(f"{address}/api/jobs/", headers={"Authorization": f"Bearer {token}"})
try:
    with urllib.request.urlopen(request, timeout=30) as response:
        jobs = json.load(response)
except urllib.error.HTTPError as error:
    sys.exit(f"the job API at {address} answered HTTP {error.code} ({error.reason}): check the token")
except (OSError, ValueError) as error:
    sys.exit(f"cannot list the jobs at {address} ({error}): is the dashboard tunnel / port-forward up?")
ours = re.compile(re.escape(name) + r"-\d{8}-\d{6}-")
for job in jobs:
    if ours.match(job.get("submission_id") or "") and job.get("status") in ("PENDING", "RUNNING"):
        print(job["submission_id"], job["status"])
PY
) || die "not submitted: could not check for a running job of run '$name'"
if [ -n "$active" ]; then
  set -- $active
  die "run '$name' already has job $1 ($2) on $address; follow it with: ray job logs --address $address --follow $1 (stop it with: ray job stop --address $address $1)"
fi

echo "submitting run '$name' as job $submission_id to $address" >&2
# `ray job submit` streams the logs until the job ends and exits 1 if it FAILED; a STOPPED job
# also exits 0 there, so the final status is checked explicitly.
${command[@]+"${command[@]}"}
if [ "$wait_for_job" = 1 ]; then
  # `ray job status` words it as "Job '<id>' succeeded" (or failed / was stopped).
  status=$(ray job status --address "$address" "$submission_id" 2>&1 \
           | grep -o -E "Job '[^']+' (succeeded|failed|was stopped)" | tail -n 1 || true)
  case "$status" in
    *succeeded) status=SUCCEEDED ;;
    *failed) status=FAILED ;;
    *stopped) status=STOPPED ;;
    *) status="status unknown" ;;
  esac
  echo "job $submission_id: $status" >&2
  [ "$status" = SUCCEEDED ] || exit 1
else
  echo "follow with: ray job logs --address $address --follow $submission_id" >&2
fi
