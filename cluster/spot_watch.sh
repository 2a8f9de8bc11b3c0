#!/usr/bin/env bash
# Runs in the background on every spot worker (started by cluster/aws.yaml). It turns an EC2 spot
# interruption notice (two minutes ahead) into a Ray node drain with reason PREEMPTION, so that
#   - Ray Train reports the coming preemption to the workers (ray.train.get_preemption_info), which
#     is the moment for a just-in-time checkpoint, and
#   - the worker deaths that follow count against --max_preemption_failures, not --max_failures.
# Without it a reclaimed node simply vanishes and counts as an ordinary failure.
#
#   spot_watch.sh GCS_ADDRESS          e.g. spot_watch.sh "$RAY_HEAD_IP:6379"
#
# SPOT_WATCH_IMDS (default: the EC2 metadata service) and RAY (default: ray on PATH) exist so the
# script can be exercised off EC2.
set -uo pipefail

address=${1:?usage: spot_watch.sh GCS_ADDRESS}
imds=${SPOT_WATCH_IMDS:-http://169.254.169.254/latest}
ray_cli=${RAY:-ray}
interval=${SPOT_WATCH_INTERVAL_S:-5}

while true; do
  # IMDSv2: a session token first; instance-action answers 404 until a notice exists.
  token=$(curl -sf -m 2 -X PUT "$imds/api/token" -H "X-aws-ec2-metadata-token-ttl-seconds: 300") || token=""
  if notice=$(curl -sf -m 2 -H "X-aws-ec2-metadata-token: $token" "$imds/meta-data/spot/instance-action"); then
    break
  fi
  sleep "$interval"
done

# The notice is {"action": "terminate" | "stop" | "hibernate", "time": "2026-01-01T12:00:00Z"}.
when=$(printf '%s' "$notice" | sed -n 's/.*"time" *: *"\([^"]*\)".*/\1/p')
remaining=120
if [ -n "$when" ] && deadline=$(date -u -d "$when" +%s 2>/dev/null); then
  remaining=$((deadline - $(date -u +%s)))
fi
[ "$remaining" -ge 1 ] || remaining=1

echo "spot interruption notice: $notice; draining this node ($remaining s left)" >&2
RAY_AUTH_MODE=token exec "$ray_cli" drain-node --address "$address" \
  --reason DRAIN_NODE_REASON_PREEMPTION \
  --reason-message "EC2 spot interruption: $notice" \
  --deadline-remaining-seconds "$remaining"
