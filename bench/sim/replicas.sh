#!/usr/bin/env bash
# Sync at fleet scale against the control plane on PostgreSQL: DEVICES virtual devices polling
# every 30 s (status every 60 s, telemetry every 60 s, as the agent; the same load as the sync
# scenario of bench/sim/run.sh) against REPLICAS `outpost server` processes on one private
# PostgreSQL cluster (fsync and synchronous_commit on, as a production one), all on this
# machine. The devices are split evenly over the replicas: one `outpost sim` per replica, each
# enrolling and syncing through its own replica.
#
# Reports requests/s (the sum over the simulators), sync p50/p99 (the largest of the
# simulators' percentiles: each simulator measures its own share of the fleet), status and
# telemetry p99, and the CPU of the replicas, of PostgreSQL (the postmaster and its backends)
# and of the simulators over the measured minute. Appends a section to bench/RESULTS.md
# (RECORD=1).
#
# Usage: bench/sim/replicas.sh
# Knobs: DEVICES (100000), REPLICAS (list, "1 2"), MEASURE (60), WARMUP (70), CONNECTIONS
#   (1024 per simulator), POOL (connections per replica, 8), SHARED_BUFFERS (1GB), BUILD_DIR,
#   DATA_PARENT, RECORD (1), KEEP (0).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BUILD_DIR=${BUILD_DIR:-$root/build}
case $BUILD_DIR in /*) ;; *) BUILD_DIR=$root/$BUILD_DIR ;; esac
DEVICES=${DEVICES:-100000}
REPLICAS=${REPLICAS:-"1 2"}
MEASURE=${MEASURE:-60}
WARMUP=${WARMUP:-70}
CONNECTIONS=${CONNECTIONS:-1024}
POOL=${POOL:-8}
SHARED_BUFFERS=${SHARED_BUFFERS:-1GB}
DATA_PARENT=${DATA_PARENT:-${TMPDIR:-/tmp}}
RECORD=${RECORD:-1}
RESULTS_FILE=${RESULTS_FILE:-$root/bench/RESULTS.md}
KEEP=${KEEP:-0}

log() { echo "sim/replicas.sh: $(date -u +%H:%M:%S) $*" >&2; }
# shellcheck source=bench/lib.sh
. "$root/bench/lib.sh"
for tool in jq awk bc python3; do command -v "$tool" >/dev/null || { log "needs $tool"; exit 1; }; done
[ -x "$BUILD_DIR/bin/outpost" ] || { log "no $BUILD_DIR/bin/outpost: run \`make build\`"; exit 1; }
pgbin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
[ -x "$pgbin/initdb" ] || { log "PostgreSQL's server is not installed: run scripts/install-deps"; exit 1; }

work=$(mktemp -d "$DATA_PARENT/outpost-replicas-bench.XXXXXX")
chmod 755 "$work"  # PostgreSQL runs as its own user and must reach its folder
servers=()
sims=()
pg_dir=""
stop_all() {
  local p
  for p in "${sims[@]}" "${servers[@]}"; do stop_pid "$p"; done
  sims=()
  servers=()
  if [ -n "$pg_dir" ] && [ -f "$pg_dir/data/postmaster.pid" ]; then
    as_pg "$pgbin/pg_ctl" -D "$pg_dir/data" -m fast -w stop >/dev/null 2>&1 || true
  fi
  pg_dir=""
}
cleanup() {
  local rc=$?
  trap - EXIT INT TERM HUP
  stop_all
  if [ "$KEEP" = "1" ]; then log "logs and data kept in $work"; else rm -rf "$work"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM HUP
ulimit -n "$(ulimit -Hn)"

mkdir "$work/bin"
cp "$BUILD_DIR/bin/outpost" "$work/bin/"
O=$work/bin/outpost
report=$work/report.md
: >"$report"
emit() { echo "$*" | tee -a "$report"; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
sum_ticks() {
  local t=0 p
  for p in "$@"; do t=$((t + $(cpu_ticks "$p"))); done
  echo "$t"
}
pg_pids() { echo "$(head -n 1 "$pg_dir/data/postmaster.pid") $(pgrep -P "$(head -n 1 "$pg_dir/data/postmaster.pid")" | tr '\n' ' ')"; }
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
# initdb and postgres refuse root: run them as postgres then.
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

# start_pg DIR: a private cluster on a free port; sets pg_url.
start_pg() {
  pg_dir=$1
  mkdir -p "$pg_dir"
  [ "$(id -u)" = 0 ] && chown postgres "$pg_dir"
  as_pg "$pgbin/initdb" -D "$pg_dir/data" -A trust -U outpost -E UTF8 >"$pg_dir/initdb.log" 2>&1
  local port
  port=$(free_port)
  as_pg "$pgbin/pg_ctl" -D "$pg_dir/data" -l "$pg_dir/postgres.log" -w -t 60 -o \
    "-p $port -c listen_addresses=127.0.0.1 -c unix_socket_directories=$pg_dir -c max_connections=200 -c shared_buffers=$SHARED_BUFFERS -c fsync=on -c synchronous_commit=on" \
    start >/dev/null
  "$pgbin/psql" -q -h 127.0.0.1 -p "$port" -U outpost -d postgres -c "CREATE DATABASE outpost" >/dev/null
  pg_url="postgres://outpost@127.0.0.1:$port/outpost?pool_size=$POOL"
}

# start_replica DIR I: `outpost server` on PostgreSQL with the shared data folder DIR/server;
# appends its URL to urls and its pid to servers.
start_replica() {
  local dir=$1 i=$2 u=""
  "$O" server --listen 127.0.0.1:0 --data "$dir/server" --db "$pg_url" --insecure-http \
    >"$dir/server-$i.log" 2>&1 &
  servers+=($!)
  for _ in $(seq 1 300); do
    u=$(sed -n 's/.*listening on \(http:\/\/127\.0\.0\.1:[0-9]*\).*/\1/p' "$dir/server-$i.log" | head -n 1)
    if [ -n "$u" ] && [ -s "$dir/server/admin.token" ]; then break; fi
    kill -0 "${servers[-1]}" 2>/dev/null || { cat "$dir/server-$i.log" >&2; exit 1; }
    u=""
    sleep 0.1
  done
  [ -n "$u" ] || { log "replica $i did not start within 30 s"; exit 1; }
  urls+=("$u")
}

# wait_enrolled LOG N: until the simulator writing LOG shows N devices on revision 1.
wait_enrolled() {
  local deadline=$(($(date +%s) + 1800))
  while [ "$(date +%s)" -lt "$deadline" ]; do
    if tail -n 1 "$1" 2>/dev/null | grep -q " converged $2 .* app: r1=$2\$"; then return 0; fi
    sleep 0.5
  done
  log "timed out enrolling $2 devices ($1)"
  return 1
}

machine="$(nproc) × $(awk -F: '/model name/ {gsub(/^ +/, "", $2); print $2; exit}' /proc/cpuinfo), $(awk '/MemTotal/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo) RAM, $(uname -sr); load average $(cut -d' ' -f1-3 /proc/loadavg) at start; data on $(df -T "$DATA_PARENT" | awk 'NR==2 {print $2}') ($DATA_PARENT)"
commit="$(git -C "$root" rev-parse --short HEAD)$(git -C "$root" diff --quiet HEAD -- src || echo +dirty)"
hz=$(getconf CLK_TCK)
emit ""
emit "## $(date -u '+%Y-%m-%d %H:%M') UTC — fleet simulator on PostgreSQL replicas (bench/sim/replicas.sh)"
emit ""
emit "- machine: $machine"
emit "- commit: $commit; PostgreSQL $("$pgbin/postgres" --version | awk '{print $3}') (fsync on, synchronous_commit on, shared_buffers $SHARED_BUFFERS), $POOL connections per replica"
emit "- command: \`DEVICES=$DEVICES REPLICAS=\"$REPLICAS\" MEASURE=$MEASURE bench/sim/replicas.sh\`"
emit "- replicas, PostgreSQL and the simulators share the machine; each row starts a fresh cluster and fresh replicas; devices poll every 30 s, report status and ship telemetry every 60 s, start spread over 30 s, and ${MEASURE} s are measured after a ${WARMUP} s warm-up."
emit ""
emit "| replicas | devices | enroll s | requests/s | syncs/s | sync p50 ms | sync p99 ms | status p99 ms | telemetry p99 ms | replica cores | PostgreSQL cores | sim cores | sim queue max | errors | converged |"
emit "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"

for r in $REPLICAS; do
  dir=$work/r$r
  mkdir -p "$dir"
  urls=()
  start_pg "$dir/pg"
  for i in $(seq 1 "$r"); do start_replica "$dir" "$i"; done
  export OUTPOST_SERVER=${urls[0]}
  OUTPOST_TOKEN=$(cat "$dir/server/admin.token")
  export OUTPOST_TOKEN
  "$O" model gen --out "$dir/m.onnx" --seed 1 >/dev/null
  "$O" model push clf 1.0.0 --variant "accelerator=cpu=$dir/m.onnx" >/dev/null
  jq -n '{apiVersion: "outpost/v1", kind: "Deployment", metadata: {name: "app"}, spec: {selector:
    {sites: ["sim-*"]}, model: {name: "clf", version: "1.0.0"}, workload: {command: ["bin/app"]},
    config: {tag: "1"}}}' | "$O" apply -f - >/dev/null
  log "$r replica(s): ${urls[*]} on $pg_url"

  per=$((DEVICES / r))
  t0=$(date +%s.%N)
  for i in $(seq 1 "$r"); do
    OUTPOST_SERVER=${urls[$((i - 1))]} "$O" sim --duration 0 -o json --devices "$per" \
      --sites $((per / 100)) --site-prefix "sim-r$i" --sync-interval 30s \
      --state "$dir/state-$i.jsonl" --telemetry-interval 0 --progress 1s \
      >"$dir/enroll-$i.log.json" 2>"$dir/enroll-$i.log" &
    sims+=($!)
  done
  for i in $(seq 1 "$r"); do wait_enrolled "$dir/enroll-$i.log" "$per"; done
  enroll_s=$(echo "$(date +%s.%N) - $t0" | bc | awk '{printf "%.0f", $1}')
  for p in "${sims[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${sims[@]}"; do stop_pid "$p" 300; done
  sims=()
  log "$r replica(s): $DEVICES devices enrolled in $enroll_s s; measuring"

  for i in $(seq 1 "$r"); do
    OUTPOST_SERVER=${urls[$((i - 1))]} "$O" sim --duration 0 -o json --devices "$per" \
      --sites $((per / 100)) --site-prefix "sim-r$i" --sync-interval 30s --status-period 60s \
      --telemetry-interval 60s --state "$dir/state-$i.jsonl" --ramp 30s --warmup "${WARMUP}s" \
      --progress 5s --connections $((CONNECTIONS / r)) \
      >"$dir/run-$i.log.json" 2>"$dir/run-$i.log" &
    sims+=($!)
  done
  sleep "$WARMUP"
  s0=$(sum_ticks "${servers[@]}")
  g0=$(sum_ticks $(pg_pids))
  m0=$(sum_ticks "${sims[@]}")
  sleep "$MEASURE"
  s1=$(sum_ticks "${servers[@]}")
  g1=$(sum_ticks $(pg_pids))
  m1=$(sum_ticks "${sims[@]}")
  for p in "${sims[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${sims[@]}"; do stop_pid "$p" 300; done  # each asks about its devices first
  sims=()
  js=()
  for i in $(seq 1 "$r"); do js+=("$dir/run-$i.log.json"); done
  agg() { jq -s -r "$1" "${js[@]}"; }
  emit "| $r | $DEVICES | $enroll_s | $(agg 'map(.measured_requests_per_s) | add | floor') | $((DEVICES / 30)) | $(agg 'map(.latency.sync.p50_ms) | max * 100 | round / 100') | $(agg 'map(.latency.sync.p99_ms) | max * 100 | round / 100') | $(agg 'map(.latency.status.p99_ms // 0) | max * 10 | round / 10') | $(agg 'map(.latency.telemetry.p99_ms // 0) | max * 10 | round / 10') | $(echo "scale=2; ($s1 - $s0) / $hz / $MEASURE" | bc) | $(echo "scale=2; ($g1 - $g0) / $hz / $MEASURE" | bc) | $(echo "scale=2; ($m1 - $m0) / $hz / $MEASURE" | bc) | $(agg 'map(.queued_max) | max') | $(agg 'map(.errors) | add') | $(agg 'map(.converged) | add')/$DEVICES |"
  stop_all
done

if [ "$RECORD" = "1" ]; then
  cat "$report" >>"$RESULTS_FILE"
  log "appended to $RESULTS_FILE"
fi
