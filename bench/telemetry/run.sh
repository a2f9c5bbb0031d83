#!/usr/bin/env bash
# Telemetry figures of DESIGN.md §8 (≤ 2 KB per device per minute on the wire at the default
# policy; ingest ≥ 500k points/s):
#   1. wire: `outpost server` and one real `outpost-agent` per inference rate in RATES (req/s;
#      0 = idle), all on loopback with the default telemetry flags and a deployment with the
#      default policy (sample 0.1, on_anomaly 1.0). Each agent serves paced requests from
#      `outpost-telemetry-bench load`; after a first shipment, the agent's own counters
#      (GET /v1/telemetry: HTTP bytes both ways, compressed and JSON bodies) are read across
#      MINUTES shipments, one a minute. Prints bytes/min, the compression ratio, records/min.
#   2. ingest: a fresh server; `outpost-telemetry-bench ingest` enrolls DEVICES stand-in devices
#      and uploads INGEST_MINUTES minutes of records each (a device serving 1 req/s at the
#      default policy), from CLIENTS keep-alive connections, in one-minute batches (a fleet
#      online) and in one-hour batches (a fleet back after an outage); REPS runs each, medians.
#
# Usage: bench/telemetry/run.sh   Knobs: MINUTES (5), RATES (0,1,10,50), DEVICES (200),
# INGEST_MINUTES (60), CLIENTS (4), REPS (3), WIRE (1), INGEST (1), BUILD (1),
# BUILD_DIR (build), DATA_PARENT ($TMPDIR or /tmp), KEEP (0).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BUILD_DIR=${BUILD_DIR:-$root/build}
case $BUILD_DIR in /*) ;; *) BUILD_DIR=$root/$BUILD_DIR ;; esac
BIN=$BUILD_DIR/bin
MINUTES=${MINUTES:-5}
RATES=${RATES:-0,1,10,50}
DEVICES=${DEVICES:-200}
INGEST_MINUTES=${INGEST_MINUTES:-60}
CLIENTS=${CLIENTS:-4}
REPS=${REPS:-3}
WIRE=${WIRE:-1}
INGEST=${INGEST:-1}
BUILD=${BUILD:-1}
DATA_PARENT=${DATA_PARENT:-${TMPDIR:-/tmp}}
KEEP=${KEEP:-0}

log() { echo "telemetry/run.sh: $*" >&2; }
# shellcheck source=bench/lib.sh
. "$root/bench/lib.sh"
for tool in curl jq awk; do
  command -v "$tool" >/dev/null || { log "needs $tool"; exit 1; }
done

if [ "$BUILD" = "1" ]; then
  [ -f "$BUILD_DIR/build.ninja" ] || [ -f "$BUILD_DIR/Makefile" ] ||
    { log "$BUILD_DIR is not configured; run \`make build\` first"; exit 1; }
  log "building outpost-telemetry-bench outpost outpost-agent in $BUILD_DIR"
  cmake --build "$BUILD_DIR" --target outpost-telemetry-bench outpost outpost-agent >&2
fi

work=$(mktemp -d "$DATA_PARENT/outpost-telemetry-bench.XXXXXX")
server_pid=""
agent_pids=()
load_pids=()

cleanup() {
  local rc=$?
  trap - EXIT INT TERM HUP
  for p in "${load_pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${agent_pids[@]}"; do stop_pid "$p"; done
  stop_pid "$server_pid"
  if [ "$KEEP" = "1" ]; then log "logs and data kept in $work"; else rm -rf "$work"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM HUP

mkdir "$work/bin"
cp "$BIN/outpost-telemetry-bench" "$BIN/outpost" "$BIN/outpost-agent" "$work/bin/"
bench_bin=$work/bin/outpost-telemetry-bench
server_bin=$work/bin/outpost
agent_bin=$work/bin/outpost-agent

out() { echo "$1=$2" | tee -a "$work/figures"; }
median() { sort -n | awk '{v[NR]=$1} END {if (NR==0) print "n/a"; else if (NR%2) print v[(NR+1)/2]; else print (v[NR/2]+v[NR/2+1])/2}'; }

# ---- 1. wire ----------------------------------------------------------------------------------
if [ "$WIRE" = "1" ]; then
  IFS=, read -r -a rates <<<"$RATES"
  start_control_plane bench "${#rates[@]}"
  "$server_bin" model gen --out "$work/m.onnx" --seed 1 >/dev/null
  "$server_bin" model push bench-net 1.0.0 --variant accelerator=cpu="$work/m.onnx" >/dev/null
  cat >"$work/bench.yaml" <<'YAML'
apiVersion: outpost/v1
kind: Deployment
metadata: {name: bench}
spec:
  selector: {sites: [bench]}
  model: {name: bench-net, version: 1.0.0}
YAML
  "$server_bin" apply -f "$work/bench.yaml" >/dev/null
  addrs=()
  for r in "${rates[@]}"; do
    dir=$work/agent-$r
    "$agent_bin" --server "$url" --enroll-token "$enroll_token" --data "$dir" \
      --listen 127.0.0.1:0 >"$work/agent-$r.log" 2>&1 &
    agent_pids+=($!)
    for _ in $(seq 1 300); do [ -s "$dir/agent.addr" ] && break; sleep 0.1; done
    [ -s "$dir/agent.addr" ] || { log "agent $r: no agent.addr"; cat "$work/agent-$r.log" >&2; exit 1; }
    addrs+=("$(cat "$dir/agent.addr")")
  done
  for i in "${!rates[@]}"; do
    for _ in $(seq 1 600); do
      curl -sf "http://${addrs[$i]}/models/bench/ready" >/dev/null 2>&1 && break
      sleep 0.1
    done
    curl -sf "http://${addrs[$i]}/models/bench/ready" >/dev/null ||
      { log "agent ${rates[$i]} does not serve the model"; exit 1; }
  done
  log "wire: ${#rates[@]} agents (rates ${RATES} req/s), $MINUTES shipments each (one a minute)"
  total_s=$(( (MINUTES + 3) * 60 ))
  for i in "${!rates[@]}"; do
    if [ "${rates[$i]}" != "0" ]; then
      "$bench_bin" load --url "http://${addrs[$i]}/models/bench/infer" --rate "${rates[$i]}" \
        --seconds "$total_s" >"$work/load-${rates[$i]}.json" 2>&1 &
      load_pids+=($!)
    fi
  done
  stats() { curl -sf "http://$1/v1/telemetry"; }
  # Waits for the next shipment of agent $1 and prints its counters then.
  after_shipment() {
    local addr=$1 before now
    before=$(stats "$addr" | jq .shipper.batches_sent)
    # Once a second: the shipments come a minute apart, and a tighter poll (curl and jq for
    # every agent) would load the machine enough to slow the model into "anomalies".
    for _ in $(seq 1 150); do
      now=$(stats "$addr" | jq .shipper.batches_sent)
      [ "$now" -gt "$before" ] && break
      sleep 1
    done
    stats "$addr" | jq -c '{batches: .shipper.batches_sent, wire: .shipper.wire_bytes,
      body: .shipper.bytes_sent, json: .shipper.json_bytes, records: .shipper.records_sent}'
  }
  # The first shipment carries the start-up (enrollment, activation): measure after it.
  waits=()
  for i in "${!rates[@]}"; do
    after_shipment "${addrs[$i]}" >"$work/w0-$i.json" &
    waits+=($!)
  done
  for p in "${waits[@]}"; do wait "$p"; done
  waits=()
  for i in "${!rates[@]}"; do
    ( for _ in $(seq 1 "$MINUTES"); do after_shipment "${addrs[$i]}" >"$work/w1-$i.json"; done ) &
    waits+=($!)
  done
  for p in "${waits[@]}"; do wait "$p"; done
  printf '%-10s %14s %14s %12s %12s\n' "req/s" "wire B/min" "body B/min" "ratio" "records/min"
  for i in "${!rates[@]}"; do
    jq -n --slurpfile a "$work/w0-$i.json" --slurpfile b "$work/w1-$i.json" --arg m "$MINUTES" \
      '($b[0].batches - $a[0].batches) as $n |
       {n: $n, wire: (($b[0].wire - $a[0].wire) / $n), body: (($b[0].body - $a[0].body) / $n),
        ratio: (($b[0].json - $a[0].json) / ([($b[0].body - $a[0].body), 1] | max)),
        records: (($b[0].records - $a[0].records) / $n)}' >"$work/wire-$i.json"
    r=${rates[$i]}
    read -r n w b ratio rec < <(jq -r '"\(.n) \(.wire|floor) \(.body|floor) \(.ratio*10|floor/10) \(.records|floor)"' "$work/wire-$i.json")
    printf '%-10s %14s %14s %12s %12s\n' "$r" "$w" "$b" "$ratio" "$rec"
    out "wire_bytes_per_min_at_${r}_rps" "$w"
    out "body_bytes_per_min_at_${r}_rps" "$b"
    out "compression_ratio_at_${r}_rps" "$ratio"
    out "records_per_min_at_${r}_rps" "$rec"
    out "shipments_measured_at_${r}_rps" "$n"
  done
  for p in "${load_pids[@]}"; do kill "$p" 2>/dev/null || true; done
  load_pids=()
  for p in "${agent_pids[@]}"; do stop_pid "$p"; done
  agent_pids=()
  stop_pid "$server_pid"
  server_pid=""
  rm -rf "$work/server"
fi

# ---- 2. ingest --------------------------------------------------------------------------------
if [ "$INGEST" = "1" ]; then
  for batch in 1 60; do
    : >"$work/ingest-$batch.txt"
    for rep in $(seq 1 "$REPS"); do
      start_control_plane bench 1
      "$bench_bin" ingest --server "$url" --token "$OUTPOST_TOKEN" --devices "$DEVICES" \
        --minutes "$INGEST_MINUTES" --batch-minutes "$batch" --clients "$CLIENTS" \
        >"$work/ingest-$batch-$rep.json"
      log "ingest batch=${batch}min rep $rep: $(cat "$work/ingest-$batch-$rep.json")"
      jq -r '"\(.points_per_s) \(.records_per_s)"' "$work/ingest-$batch-$rep.json" >>"$work/ingest-$batch.txt"
      stop_pid "$server_pid"
      server_pid=""
      rm -rf "$work/server"
    done
    out "ingest_points_per_s_batch_${batch}min" "$(cut -d' ' -f1 "$work/ingest-$batch.txt" | median)"
    out "ingest_points_per_s_batch_${batch}min_runs" "$(cut -d' ' -f1 "$work/ingest-$batch.txt" | tr '\n' ' ')"
    out "ingest_records_per_s_batch_${batch}min" "$(cut -d' ' -f2 "$work/ingest-$batch.txt" | median)"
  done
fi
log "figures:"
cat "$work/figures"
