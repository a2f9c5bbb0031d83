#!/usr/bin/env bash
# A site behind one relay, on this machine: a real `outpost server`, one `outpost-agent --relay`,
# DEVICES virtual devices of `outpost sim --via RELAY` (enrollment, long-polls, status and
# telemetry all through the relay) and AGENTS real agents behind the same relay. A model of
# MODEL_MB MB (FP32 weights from `outpost model gen`) is deployed to the whole site; the real
# agents download, verify and serve it. The simulator's devices do not download blobs, so the
# fan-out of the model is measured on the real agents: what matters is that the server sends
# it once (its outpost_artifact_bytes_sent_total) however many devices run it.
# Reports: upstream bytes / model size, bytes the relay served its children, the relay's peak
# RSS and CPU over the run, its cache and backlog figures, and the simulator's sync numbers.
# Appends a section to bench/RESULTS.md when RECORD=1.
#
# Usage: bench/relay/run.sh
# Knobs: DEVICES (1000), AGENTS (10), MODEL_MB (20), DURATION (90: seconds the fleet runs),
#   BUILD_DIR (build), RECORD (1), KEEP (0)
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BUILD_DIR=${BUILD_DIR:-$root/build}
DEVICES=${DEVICES:-1000}
AGENTS=${AGENTS:-10}
MODEL_MB=${MODEL_MB:-20}
DURATION=${DURATION:-90}
RECORD=${RECORD:-1}
KEEP=${KEEP:-0}
server_bin=$BUILD_DIR/bin/outpost
agent_bin=$BUILD_DIR/bin/outpost-agent
work=$(mktemp -d "${TMPDIR:-/tmp}/outpost-relay-bench.XXXXXX")
log() { printf '[relay-bench] %s\n' "$*" >&2; }
# shellcheck source=../lib.sh
source "$root/bench/lib.sh"

server_pid="" relay_pid="" sim_pid=""
agent_pids=()
cleanup() {
  [ -n "$sim_pid" ] && kill -INT "$sim_pid" 2>/dev/null || true
  for p in "${agent_pids[@]}"; do stop_pid "$p"; done
  stop_pid "$relay_pid"
  stop_pid "$server_pid"
  if [ "$KEEP" = 1 ]; then log "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

launch_server "$work"
log "control plane $url (pid $server_pid)"
token=$("$server_bin" token create --site edge --uses $((DEVICES + AGENTS + 1)) --ttl 2h)

"$agent_bin" --server "$url" --enroll-token "$token" --data "$work/relay" --listen 127.0.0.1:0 \
  --relay --relay-listen 127.0.0.1:0 --status-period 5s >"$work/relay.log" 2>&1 &
relay_pid=$!
for _ in $(seq 1 100); do [ -s "$work/relay/relay.addr" ] && [ -s "$work/relay/agent.addr" ] && break; sleep 0.1; done
relay_url="http://$(cat "$work/relay/relay.addr")"
relay_api="http://$(cat "$work/relay/agent.addr")"
log "relay $relay_url (pid $relay_pid)"
ticks=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
relay_cpu0=$(cpu_ticks "$relay_pid")
t0=$(date +%s.%N)

"$server_bin" sim --via "$relay_url" --enroll-token "$token" --devices "$DEVICES" \
  --duration "${DURATION}s" --ramp 10s --telemetry-interval 60s --status-period 60s \
  >"$work/sim.out" 2>"$work/sim.err" &
sim_pid=$!

for i in $(seq 1 "$AGENTS"); do
  "$agent_bin" --server "$relay_url" --enroll-token "$token" --data "$work/agent$i" \
    --listen 127.0.0.1:0 >"$work/agent$i.log" 2>&1 &
  agent_pids+=($!)
done

inputs=1000
hidden=$((MODEL_MB * 1024 * 1024 / 4 / inputs))
"$server_bin" model gen --out "$work/big.onnx" --inputs $inputs --hidden $hidden --classes 3 >/dev/null
model_bytes=$(stat -c %s "$work/big.onnx")
"$server_bin" model push big 1.0.0 --variant "$work/big.onnx" >/dev/null
cat >"$work/big.yaml" <<YAML
apiVersion: outpost/v1
kind: Deployment
metadata: {name: big}
spec:
  selector: {sites: ["edge"]}
  model: {name: big, version: 1.0.0}
  serve: {route: /models/big}
YAML
sleep 12  # the ramp: every device enrolled
before=$(curl -fsS -H "Authorization: Bearer $OUTPOST_TOKEN" "$url/metrics" |
  awk '/^outpost_artifact_bytes_sent_total/ {print $2}')
apply_at=$(date +%s.%N)
"$server_bin" apply -f "$work/big.yaml" >/dev/null
# Until every real agent serves it.
deadline=$((SECONDS + 300))
while :; do
  running=0
  for i in $(seq 1 "$AGENTS"); do
    addr=$(cat "$work/agent$i/agent.addr" 2>/dev/null || true)
    [ -n "$addr" ] || continue
    phase=$(curl -fsS "http://$addr/v1/status" 2>/dev/null | jq -r '.deployments[0].phase // ""' || true)
    [ "$phase" = running ] && running=$((running + 1))
  done
  [ "$running" -eq "$AGENTS" ] && break
  [ $SECONDS -lt $deadline ] || { log "only $running of $AGENTS agents running after 300 s"; exit 1; }
  sleep 0.5
done
converged=$(printf %.1f "$(echo "$(date +%s.%N) - $apply_at" | bc)")
after=$(curl -fsS -H "Authorization: Bearer $OUTPOST_TOKEN" "$url/metrics" |
  awk '/^outpost_artifact_bytes_sent_total/ {print $2}')
upstream=$((after - before))
log "model $model_bytes bytes; server sent $upstream bytes for it; $AGENTS agents running in ${converged}s"
wait "$sim_pid" || true
sim_pid=""
t1=$(date +%s.%N)
relay_cpu1=$(cpu_ticks "$relay_pid")
relay_hwm=$(awk '/VmHWM/ {print $2}' "/proc/$relay_pid/status")
stats=$(curl -fsS "$relay_api/v1/status" | jq -c '.relay | del(.children.ids)')
cpu_pct=$(echo "scale=1; 100 * ($relay_cpu1 - $relay_cpu0) / $ticks / ($t1 - $t0)" | bc)
ratio=$(echo "scale=2; $upstream / $model_bytes" | bc)
served=$(echo "$stats" | jq '.cache.hits + .cache.misses')
summary=$(head -40 "$work/sim.out")

report=$(cat <<TXT
### Relay: $DEVICES simulated devices + $AGENTS agents behind one relay ($(date -u +%Y-%m-%d))

Machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo); commit $(git -C "$root" rev-parse --short HEAD).
Command: \`DEVICES=$DEVICES AGENTS=$AGENTS MODEL_MB=$MODEL_MB DURATION=$DURATION bench/relay/run.sh\`

| figure | value |
|---|---|
| model size | $model_bytes bytes |
| bytes the server sent for it (upstream) | $upstream (${ratio}x the model) |
| real agents serving it, from apply | $AGENTS in ${converged} s |
| blob requests the relay answered (hits + misses) | $served |
| relay peak RSS | $((relay_hwm / 1024)) MiB |
| relay CPU over the run ($(printf %.0f "$(echo "$t1 - $t0" | bc)") s) | ${cpu_pct}% of one core |
| relay stats at the end | \`$stats\` |

Simulator (devices behind the relay):
\`\`\`
$summary
\`\`\`
TXT
)
echo "$report"
if [ "$RECORD" = 1 ]; then printf '\n%s\n' "$report" >>"$root/bench/RESULTS.md"; fi
