#!/usr/bin/env bash
# The fleet figures of DESIGN.md §8, measured with `outpost sim` against a real `outpost server`
# on SQLite, both on this machine (the simulator takes one core, the server the rest):
#   sync      SYNC_DEVICES virtual devices polling every 30 s (status every 60 s, telemetry
#             every 60 s, as the agent): requests/s, sync p50/p99, server CPU and RSS; then
#             each size in SYNC_FLEETS, to find the largest with sync p99 under 100 ms: a size
#             up to SYNC_DEVICES is that many devices; a larger one is the enrolled devices
#             with every period shortened by SYNC_DEVICES / size (the same requests per second
#             as that fleet; the store holds fewer devices).
#   converge  for each size in CONVERGE_SIZES: a new revision to every device at once
#             (waves [100%], max_unavailable 100%); seconds from `outpost apply` to the rollout
#             completed (every device reported it running). Fleets over LONGPOLL_MAX devices
#             poll every 30 s on shared connections (the open-file limit), the rest long-poll.
#   storm     STORM_DEVICES long-polling devices all cut off (profile partition, every site),
#             a new revision applied meanwhile, then all reconnect at once: seconds from the end
#             of the partition to every device running it, errors, server peak RSS.
#   rollout   ROLLOUT_DEVICES long-polling devices, a new revision with the default rollout
#             (max_unavailable 10%) and with waves [1%, 10%, 50%, 100%], no bake: seconds from
#             apply to 100% converged (DESIGN §8: 10,000 devices in < 60 s).
# Each scenario starts a fresh server; devices are enrolled once per scenario (`--state`).
# Appends a section to bench/RESULTS.md (RECORD=1) with the machine, commit and commands.
#
# Usage: bench/sim/run.sh [sync] [converge] [storm] [rollout]   (default: all four)
# Knobs: SYNC_DEVICES (100000), SYNC_FLEETS ("100000 150000 200000 300000"), SYNC_MEASURE (60),
#   SYNC_CONNECTIONS (1024: the simulator's shared connections; "sim queue max" in the table
#   says whether it kept up, a growing queue means the fleet was held back by the simulator),
#   CONVERGE_SIZES ("1000 10000 100000"), CONVERGE_REPS (3), CONVERGE_REPS_LARGE (1: runs for
#   fleets over LONGPOLL_MAX), LONGPOLL_MAX (15000),
#   STORM_DEVICES (10000), STORM_REPS (3), ROLLOUT_DEVICES (10000), ROLLOUT_REPS (3),
#   BUILD_DIR (build), DATA_PARENT ($TMPDIR or /tmp), RECORD (1), KEEP (0), PROFILE (0: 1 runs
#   `perf record` on the server over each measured sync minute; the reports stay in the work
#   folder, so use KEEP=1; PERF_CALLGRAPH=dwarf unwinds libraries built without frame
#   pointers, such as libsqlite3, PERF_FREQ (499) samples per second).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BUILD_DIR=${BUILD_DIR:-$root/build}
case $BUILD_DIR in /*) ;; *) BUILD_DIR=$root/$BUILD_DIR ;; esac
SYNC_DEVICES=${SYNC_DEVICES:-100000}
SYNC_FLEETS=${SYNC_FLEETS:-"100000 150000 200000 300000"}
SYNC_MEASURE=${SYNC_MEASURE:-60}
SYNC_CONNECTIONS=${SYNC_CONNECTIONS:-1024}
CONVERGE_SIZES=${CONVERGE_SIZES:-"1000 10000 100000"}
CONVERGE_REPS=${CONVERGE_REPS:-3}
CONVERGE_REPS_LARGE=${CONVERGE_REPS_LARGE:-1}
LONGPOLL_MAX=${LONGPOLL_MAX:-15000}
STORM_DEVICES=${STORM_DEVICES:-10000}
STORM_REPS=${STORM_REPS:-3}
ROLLOUT_DEVICES=${ROLLOUT_DEVICES:-10000}
ROLLOUT_REPS=${ROLLOUT_REPS:-3}
DATA_PARENT=${DATA_PARENT:-${TMPDIR:-/tmp}}
RECORD=${RECORD:-1}
RESULTS_FILE=${RESULTS_FILE:-$root/bench/RESULTS.md}
KEEP=${KEEP:-0}
PROFILE=${PROFILE:-0}
scenarios=("$@")
[ ${#scenarios[@]} -gt 0 ] || scenarios=(sync converge storm rollout)

log() { echo "sim/run.sh: $(date -u +%H:%M:%S) $*" >&2; }
# shellcheck source=bench/lib.sh
. "$root/bench/lib.sh"
for tool in jq awk bc; do command -v "$tool" >/dev/null || { log "needs $tool"; exit 1; }; done
[ -x "$BUILD_DIR/bin/outpost" ] || { log "no $BUILD_DIR/bin/outpost: run \`make build\`"; exit 1; }

work=$(mktemp -d "$DATA_PARENT/outpost-sim-bench.XXXXXX")
server_pid=""
sim_pid=""
cleanup() {
  local rc=$?
  trap - EXIT INT TERM HUP
  stop_pid "$sim_pid"
  stop_pid "$server_pid"
  if [ "$KEEP" = "1" ]; then log "logs and data kept in $work"; else rm -rf "$work"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM HUP
ulimit -n "$(ulimit -Hn)"

mkdir "$work/bin"
cp "$BUILD_DIR/bin/outpost" "$work/bin/"
server_bin=$work/bin/outpost
O=$work/bin/outpost
report=$work/report.md
: >"$report"
emit() { echo "$*" | tee -a "$report"; }
median() { sort -n | awk '{v[NR]=$1} END {if (NR==0) print "n/a"; else if (NR%2) print v[(NR+1)/2]; else print (v[NR/2]+v[NR/2+1])/2}'; }
range() { sort -n | awk 'NR==1{lo=$1} {hi=$1} END {if (NR>1) printf "%s–%s", lo, hi}'; }
now() { date +%s.%N; }
since() { echo "$(now) - $1" | bc | awk '{printf "%.1f", $1}'; }

# fresh_server NAME: a new control plane in $work/NAME with the sample model and revision 1 of
# deployment "app" on every simulated site.
fresh_server() {
  stop_pid "$server_pid"
  local dir=$work/$1
  mkdir -p "$dir"
  launch_server "$dir"
  "$O" model gen --out "$dir/m.onnx" --seed 1 >/dev/null
  "$O" model push clf 1.0.0 --variant "accelerator=cpu=$dir/m.onnx" >/dev/null
  apply_revision 1 '{}'
  log "$1: server $url (pid $server_pid)"
}

# apply_revision TAG ROLLOUT_JSON: deployment "app" with config.tag = TAG.
apply_revision() {
  jq -n --arg tag "$1" --argjson rollout "$2" '{apiVersion: "outpost/v1", kind: "Deployment",
    metadata: {name: "app"}, spec: ({selector: {sites: ["sim-*"]}, model: {name: "clf",
    version: "1.0.0"}, workload: {command: ["bin/app"]}, config: {tag: $tag}} +
    (if $rollout == {} then {} else {rollout: $rollout} end))}' | "$O" apply -f - >/dev/null
}

# start_sim LOG ARGS...: `outpost sim` in the background until stopped.
start_sim() {
  local log_file=$1
  shift
  "$O" sim --duration 0 -o json "$@" >"$log_file.json" 2>"$log_file" &
  sim_pid=$!
}
# stop_sim: SIGTERM, then the summary is in $1.json (after the simulator asked the server about
# every device: up to a minute or two at 100,000).
stop_sim() {
  stop_pid "$sim_pid" 300
  sim_pid=""
}
# wait_sim LOG N REV TIMEOUT: until the simulator's progress shows N devices running revision
# REV of app; fails after TIMEOUT seconds.
wait_sim() {
  local deadline=$(($(date +%s) + $4))
  while [ "$(date +%s)" -lt "$deadline" ]; do
    if tail -n 1 "$1" 2>/dev/null | grep -q " converged $2 .* app: r$3=$2\$"; then return 0; fi
    kill -0 "$sim_pid" 2>/dev/null || { log "the simulator exited"; tail -5 "$1" >&2; exit 1; }
    sleep 0.2
  done
  log "timed out waiting for $2 devices on revision $3"
  tail -n 2 "$1" >&2
  return 1
}
# wait_rollout STATE TIMEOUT [EVERY]: until `rollout status app` says STATE, asking every
# EVERY seconds (0.25; a status reads every device row, so ask less often of a large fleet).
wait_rollout() {
  local deadline=$(($(date +%s) + $2))
  while [ "$(date +%s)" -lt "$deadline" ]; do
    [ "$("$O" rollout status app -o json | jq -r .state)" = "$1" ] && return 0
    sleep "${3:-0.25}"
  done
  log "timed out waiting for rollout state $1"
  return 1
}
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
rss_mb() { awk '/^'"$2"':/ {printf "%.0f", $2 / 1024}' "/proc/$1/status"; }

# ---- machine and commit ------------------------------------------------------------------------
machine="$(nproc) × $(awk -F: '/model name/ {gsub(/^ +/, "", $2); print $2; exit}' /proc/cpuinfo), $(awk '/MemTotal/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo) RAM, $(uname -sr); load average $(cut -d' ' -f1-3 /proc/loadavg) at start; server data on $(df -T "$DATA_PARENT" | awk 'NR==2 {print $2}') ($DATA_PARENT)"
commit="$(git -C "$root" rev-parse --short HEAD)$(git -C "$root" diff --quiet HEAD -- src || echo +dirty)"
hz=$(getconf CLK_TCK)
emit ""
emit "## $(date -u '+%Y-%m-%d %H:%M') UTC — fleet simulator (bench/sim/run.sh ${scenarios[*]})"
emit ""
emit "- machine: $machine"
emit "- commit: $commit; binary $BUILD_DIR/bin/outpost (sha256 $(sha256sum "$server_bin" | cut -c1-12)…)"
emit "- command: \`SYNC_DEVICES=$SYNC_DEVICES SYNC_FLEETS=\"$SYNC_FLEETS\" CONVERGE_SIZES=\"$CONVERGE_SIZES\" CONVERGE_REPS=$CONVERGE_REPS CONVERGE_REPS_LARGE=$CONVERGE_REPS_LARGE STORM_DEVICES=$STORM_DEVICES STORM_REPS=$STORM_REPS ROLLOUT_DEVICES=$ROLLOUT_DEVICES ROLLOUT_REPS=$ROLLOUT_REPS bench/sim/run.sh ${scenarios[*]}\`"
emit "- server and simulator share the machine; each scenario starts a fresh \`outpost server\` on SQLite (WAL, synchronous=FULL)."

for scenario in "${scenarios[@]}"; do
  case $scenario in
  sync)
    fresh_server sync
    state=$work/sync/state.jsonl
    log "sync: enrolling $SYNC_DEVICES devices"
    start_sim "$work/sync/enroll.log" --devices "$SYNC_DEVICES" --sites $((SYNC_DEVICES / 100)) \
      --sync-interval 30s --state "$state" --telemetry-interval 0 --progress 1s
    wait_sim "$work/sync/enroll.log" "$SYNC_DEVICES" 1 1200
    stop_sim
    enroll_s=$(jq -r .enroll_s "$work/sync/enroll.log.json")
    emit ""
    emit "**Sync at fleet scale**: devices poll every 30 s (\`--sync-interval 30s\`, on the clock, shared connections), report status every 60 s and ship telemetry every 60 s (health and one model aggregate), as the agent; devices start spread over 30 s, then ${SYNC_MEASURE} s are measured after a 70 s warm-up (past the first reports and telemetry). Enrollment of $SYNC_DEVICES devices: ${enroll_s} s. A fleet above $SYNC_DEVICES is the enrolled devices with every period shortened by $SYNC_DEVICES/size: the same requests per second as that fleet, against a store that holds $SYNC_DEVICES devices. One run per size; syncs/s is the fleet's nominal rate (devices / 30 s)."
    emit ""
    emit "| fleet | devices run | sync every | requests/s | syncs/s | sync p50 ms | sync p99 ms | status p99 ms | telemetry p99 ms | server cores | server RSS MB | sim cores | sim queue max | errors | converged |"
    emit "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    for n in $SYNC_FLEETS; do
      run_n=$n
      interval_ms=30000
      if [ "$n" -gt "$SYNC_DEVICES" ]; then
        run_n=$SYNC_DEVICES
        interval_ms=$((30000 * SYNC_DEVICES / n))
      fi
      log "sync: fleet $n ($run_n devices every ${interval_ms} ms)"
      start_sim "$work/sync/run-$n.log" --devices "$run_n" --sites $((SYNC_DEVICES / 100)) \
        --sync-interval "${interval_ms}ms" --status-period "$((interval_ms * 2))ms" \
        --telemetry-interval "$((interval_ms * 2))ms" --state "$state" --ramp "${interval_ms}ms" \
        --warmup 70s --progress 5s --connections "$SYNC_CONNECTIONS"
      sleep 70
      s0=$(cpu_ticks "$server_pid")
      m0=$(cpu_ticks "$sim_pid")
      if [ "$PROFILE" = "1" ] && command -v perf >/dev/null; then
        # Where the server's time goes, over the measured minute (perf samples at 499 Hz).
        perf record -F "${PERF_FREQ:-499}" --call-graph "${PERF_CALLGRAPH:-fp}" -p "$server_pid" -o "$work/sync/perf-$n.data" -- sleep "$SYNC_MEASURE" 2>/dev/null >&2
        perf report -i "$work/sync/perf-$n.data" --no-children --sort dso -g none 2>/dev/null | grep -E '^ +[0-9]' | head -12 >"$work/sync/perf-$n-dso.txt" || true
        perf report -i "$work/sync/perf-$n.data" --no-children --sort dso,symbol -g none 2>/dev/null | grep '%' | head -40 | cut -c1-160 >"$work/sync/perf-$n-symbols.txt" || true
        perf report -i "$work/sync/perf-$n.data" --children --sort symbol -g none 2>/dev/null | grep '%' | grep 'outpost::' | head -40 | cut -c1-200 >"$work/sync/perf-$n-ours.txt" || true
        log "sync: profile of the server in $work/sync/perf-$n-*.txt"
      else
        sleep "$SYNC_MEASURE"
      fi
      s1=$(cpu_ticks "$server_pid")
      m1=$(cpu_ticks "$sim_pid")
      rss=$(rss_mb "$server_pid" VmRSS)
      stop_sim
      j=$work/sync/run-$n.log.json
      emit "| $n | $run_n | $(echo "scale=1; $interval_ms / 1000" | bc) s | $(jq -r '.measured_requests_per_s | floor' "$j") | $(echo "$n / 30" | bc) | $(jq -r '.latency.sync.p50_ms * 100 | round / 100' "$j") | $(jq -r '.latency.sync.p99_ms * 100 | round / 100' "$j") | $(jq -r '.latency.status.p99_ms // null | if . == null then "-" else (. * 10 | round / 10) end' "$j") | $(jq -r '.latency.telemetry.p99_ms // null | if . == null then "-" else (. * 10 | round / 10) end' "$j") | $(echo "scale=2; ($s1 - $s0) / $hz / $SYNC_MEASURE" | bc) | $rss | $(echo "scale=2; ($m1 - $m0) / $hz / $SYNC_MEASURE" | bc) | $(jq -r .queued_max "$j") | $(jq -r .errors "$j") | $(jq -r .converged "$j")/$run_n |"
    done
    emit ""
    emit "Server peak RSS over the scenario (enrollment included): $(rss_mb "$server_pid" VmHWM) MB."
    ;;
  converge)
    emit ""
    emit "**Convergence**: a new revision to every device at once (waves [100%], max_unavailable 100%); seconds from \`outpost apply\` to every device running it (the simulator's progress, sampled every second: *devices*), and to \`rollout status\` completed (every device's report of it stored and read by the controller: *server*); devices activate in 0.25–0.75 s. Median of $CONVERGE_REPS (min–max) for long-polling fleets, $CONVERGE_REPS_LARGE run(s) above $LONGPOLL_MAX devices (which poll every 30 s, the open-file limit: their time includes up to one poll interval; \`rollout status\` asked every 2 s there, 0.25 s otherwise)."
    emit ""
    emit "| devices | sync | apply → devices converged s | apply → rollout completed s | runs | errors |"
    emit "|---:|---|---:|---:|---:|---:|"
    for n in $CONVERGE_SIZES; do
      fresh_server "converge-$n"
      mode=(--sync-interval 0)
      label="long-poll"
      reps=$CONVERGE_REPS
      every=0.25
      if [ "$n" -gt "$LONGPOLL_MAX" ]; then
        mode=(--sync-interval 30s --ramp 30s)
        label="poll every 30 s"
        reps=$CONVERGE_REPS_LARGE
        every=2
      fi
      sites=$((n / 100))
      [ "$sites" -ge 1 ] || sites=1
      start_sim "$work/converge-$n/sim.log" --devices "$n" --sites "$sites" "${mode[@]}" --progress 1s
      wait_sim "$work/converge-$n/sim.log" "$n" 1 1200
      devices_times=()
      server_times=()
      for rep in $(seq 1 "$reps"); do
        rev=$((rep + 1))
        t0=$(now)
        apply_revision "$rev" '{"waves": ["100%"], "max_unavailable": "100%"}'
        wait_sim "$work/converge-$n/sim.log" "$n" "$rev" 1200
        devices_times+=("$(since "$t0")")
        wait_rollout completed 1200 "$every"
        server_times+=("$(since "$t0")")
        log "converge: $n devices, run $rep: ${devices_times[-1]} s devices, ${server_times[-1]} s rollout"
      done
      stop_sim
      errors=$(jq -r .errors "$work/converge-$n/sim.log.json")
      emit "| $n | $label | $(printf '%s\n' "${devices_times[@]}" | median) ($(printf '%s\n' "${devices_times[@]}" | range)) | $(printf '%s\n' "${server_times[@]}" | median) ($(printf '%s\n' "${server_times[@]}" | range)) | $reps | $errors |"
    done
    ;;
  storm)
    emit ""
    emit "**Reconnect storm**: $STORM_DEVICES long-polling devices; every site cut off (profile partition, 100% of the sites) for 40 s, a new revision applied 10 s into it; the devices retry every ≤ 2 s (\`--backoff-max 2s\`), so all come back within about 2 s of the end. Seconds from the end of the partition to every device running the new revision; server peak RSS (VmHWM) of the scenario."
    emit ""
    emit "| run | devices | partition end → converged s | errors | faults (simulated) | server RSS before MB | server peak RSS MB |"
    emit "|---:|---:|---:|---:|---:|---:|---:|"
    fresh_server storm
    state=$work/storm/state.jsonl
    start_sim "$work/storm/enroll.log" --devices "$STORM_DEVICES" --sites $((STORM_DEVICES / 100)) --state "$state" --progress 1s
    wait_sim "$work/storm/enroll.log" "$STORM_DEVICES" 1 600
    stop_sim
    storm_times=()
    for rep in $(seq 1 "$STORM_REPS"); do
      rev=$((rep + 1))
      start_sim "$work/storm/run-$rep.log" --devices "$STORM_DEVICES" --sites $((STORM_DEVICES / 100)) \
        --state "$state" --profile partition --partition-sites 100% --partition-start 30s \
        --partition-length 40s --backoff-max 2s --progress 1s
      sim_start=$(now)
      wait_sim "$work/storm/run-$rep.log" "$STORM_DEVICES" "$((rev - 1))" 60
      before=$(rss_mb "$server_pid" VmRSS)
      sleep "$(echo "40 - $(since "$sim_start")" | bc)"
      apply_revision "$rev" '{"max_unavailable": "100%"}'
      end_at=$(echo "$sim_start + 70" | bc)
      sleep "$(echo "$end_at - $(now)" | bc)"
      wait_sim "$work/storm/run-$rep.log" "$STORM_DEVICES" "$rev" 300
      storm_times+=("$(since "$end_at")")
      stop_sim
      j=$work/storm/run-$rep.log.json
      emit "| $rep | $STORM_DEVICES | ${storm_times[-1]} | $(jq -r .errors "$j") | $(jq -r .faults "$j") | $before | $(rss_mb "$server_pid" VmHWM) |"
    done
    emit ""
    emit "Median partition end → converged: $(printf '%s\n' "${storm_times[@]}" | median) s (progress is sampled once a second)."
    ;;
  rollout)
    emit ""
    emit "**Rollout overhead** (DESIGN §8: 10,000 devices from apply to 100% converged, no bake, in < 60 s): $ROLLOUT_DEVICES long-polling devices; seconds from \`outpost apply\` to \`rollout status\` completed. Median of $ROLLOUT_REPS (min–max)."
    emit ""
    emit "| rollout | devices | apply → 100% converged s | runs |"
    emit "|---|---:|---:|---:|"
    fresh_server rollout
    start_sim "$work/rollout/sim.log" --devices "$ROLLOUT_DEVICES" --sites $((ROLLOUT_DEVICES / 100)) --progress 1s
    wait_sim "$work/rollout/sim.log" "$ROLLOUT_DEVICES" 1 600
    rev=1
    for policy in '{}' '{"waves": ["1%", "10%", "50%", "100%"]}'; do
      times=()
      for rep in $(seq 1 "$ROLLOUT_REPS"); do
        rev=$((rev + 1))
        t0=$(now)
        apply_revision "$rev" "$policy"
        wait_rollout completed 600
        times+=("$(since "$t0")")
        wait_sim "$work/rollout/sim.log" "$ROLLOUT_DEVICES" "$rev" 120
        log "rollout $policy run $rep: ${times[-1]} s"
      done
      name="default (waves [100%], max_unavailable 10%)"
      [ "$policy" = '{}' ] || name="waves [1%, 10%, 50%, 100%], max_unavailable 10%"
      emit "| $name | $ROLLOUT_DEVICES | $(printf '%s\n' "${times[@]}" | median) ($(printf '%s\n' "${times[@]}" | range)) | ${#times[@]} |"
    done
    stop_sim
    emit ""
    emit "Simulator errors over the rollout runs: $(jq -r .errors "$work/rollout/sim.log.json")."
    ;;
  *)
    log "unknown scenario $scenario (sync, converge, storm, rollout)"
    exit 2
    ;;
  esac
done

if [ "$RECORD" = "1" ]; then
  cat "$report" >>"$RESULTS_FILE"
  log "appended to $RESULTS_FILE"
fi
