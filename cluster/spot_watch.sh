#!/usr/bin/env bash
# Runs in the background on every spot worker (started by cluster/aws.yaml). It turns an EC2 spot
# interruption notice (two minutes ahead) into a Ray node drain with reason PREEMPTION, so that
#   - Ray Train reports the coming preemption to the workers (ray.train.get_preemption_info), which
#     is the moment for a just-in-time checkpoint, and
#   - the restart that follows counts against --max_preemption_failures, not --max_failures.
# Without it a reclaimed node simply vanishes and counts as an ordinary failure.
#
#   spot_watch.sh GCS_ADDRESS          e.g. spot_watch.sh "$RAY_HEAD_IP:6379"
#
# The node's Ray id is resolved once at start (a short-lived Ray driver on this node asks for the
# node it attached to), so the drain names this node explicitly: `ray drain-node` without
# --node-id would start a Ray instance of its own. A failed drain is retried with backoff until
# the deadline.
#
# The drain deadline is SPOT_WATCH_MARGIN_S (default 15) before EC2's termination time: Ray Train
# restarts the worker group at the deadline, and doing so while the node still exists moves the
# workers off cleanly instead of letting the survivors fail on a vanished peer (which would count
# as an ordinary failure).
#
# Environment (all optional):
#   RAY                  the ray CLI (default: ray on PATH); its directory's python resolves the node
#   SPOT_WATCH_PYTHON    the python with Ray installed (default: next to RAY, else python3)
#   SPOT_WATCH_NODE_ID   skip the resolution and drain this node id
#   SPOT_WATCH_TEMP_DIR  the --temp-dir this node's `ray start` used; only needed when several Ray
#                        nodes share one host (they then share an IP address)
#   SPOT_WATCH_IMDS      the metadata service (default: EC2's), SPOT_WATCH_INTERVAL_S (5) its poll
set -uo pipefail

address=${1:?usage: spot_watch.sh GCS_ADDRESS}
imds=${SPOT_WATCH_IMDS:-http://169.254.169.254/latest}
ray_cli=${RAY:-ray}
interval=${SPOT_WATCH_INTERVAL_S:-5}
margin=${SPOT_WATCH_MARGIN_S:-15}
# The cluster requires token authentication (the token is ~/.ray/auth_token on every node).
export RAY_AUTH_MODE=token

say() { echo "spot_watch: $(date -u +%H:%M:%S) $*" >&2; }

python=${SPOT_WATCH_PYTHON:-}
if [ -z "$python" ]; then
  ray_path=$(command -v "$ray_cli" 2>/dev/null || true)
  if [ -n "$ray_path" ] && [ -x "$(dirname "$ray_path")/python" ]; then
    python="$(dirname "$ray_path")/python"
  else
    python=python3
  fi
fi

# This node's id: a driver attached to the cluster runs on the local raylet (the one with this
# node's IP address, or the given temp dir), and the runtime context names that node.
resolve_node_id() {
  "$python" - "$address" "${SPOT_WATCH_TEMP_DIR:-}" <<'PY' 2>/dev/null | tail -n 1
import sys
import ray
ray.init(address=sys.argv[1], _temp_dir=sys.argv[2] or None, log_to_driver=False,
         logging_level="ERROR", configure_logging=False)
node_id = ray.get_runtime_context().get_node_id()
ray.shutdown()
print(node_id)
PY
}

node_id=${SPOT_WATCH_NODE_ID:-}
delay=1
for _ in 1 2 3 4 5 6 7 8; do
  [ -n "$node_id" ] && break
  node_id=$(resolve_node_id) && [[ "$node_id" =~ ^[0-9a-f]{56}$ ]] || node_id=""
  [ -n "$node_id" ] && break
  say "could not resolve this node's Ray id at $address yet; retrying in ${delay}s"
  sleep "$delay"
  delay=$((delay * 2 > 30 ? 30 : delay * 2))
done
if [ -n "$node_id" ]; then
  say "watching for a spot interruption notice; this is Ray node $node_id"
else
  say "this node's Ray id is still unknown; resolving it again when a notice comes"
fi

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
deadline=""
if [ -n "$when" ]; then
  deadline=$(date -u -d "$when" +%s 2>/dev/null || true)
fi
[ -n "$deadline" ] || deadline=$(($(date -u +%s) + 120))  # EC2's notice period
say "spot interruption notice: $notice"

delay=1
while true; do
  remaining=$((deadline - margin - $(date -u +%s)))
  [ "$remaining" -ge 1 ] || remaining=1
  [ -n "$node_id" ] || { node_id=$(resolve_node_id) && [[ "$node_id" =~ ^[0-9a-f]{56}$ ]] || node_id=""; }
  if [ -n "$node_id" ] && "$ray_cli" drain-node --address "$address" --node-id "$node_id" \
       --reason DRAIN_NODE_REASON_PREEMPTION --reason-message "EC2 spot interruption: $notice" \
       --deadline-remaining-seconds "$remaining"; then
    say "drained Ray node $node_id (reason preemption, deadline in $remaining s)"
    exit 0
  fi
  if [ "$(date -u +%s)" -ge "$deadline" ]; then
    say "the node is due for termination and the drain never succeeded; giving up"
    exit 1
  fi
  say "drain of Ray node ${node_id:-(unknown id)} failed; retrying in ${delay}s"
  sleep "$delay"
  delay=$((delay * 2 > 8 ? 8 : delay * 2))
done
