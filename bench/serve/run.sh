#!/usr/bin/env bash
# Serving overhead (DESIGN.md §8: the agent's infer endpoint adds < 0.2 ms p50 over calling
# the runtime directly) and the agent's memory with models loaded:
#   1. builds outpost-serve-bench, outpost and outpost-agent (BUILD=1, a no-op when up to date)
#      and copies them, so a build meanwhile changes nothing in this run;
#   2. runs outpost-serve-bench REPS times (a fresh process each), one JSON report per run,
#      and prints the median (min–max) table (`outpost-serve-bench --summarize`);
#   3. unless AGENT=0: starts `outpost server` and a real `outpost-agent` on free loopback
#      ports, reads the agent's VmRSS with no model, then after serving a generated classifier
#      (`outpost model push` + a model-only deployment + one inference), then after also
#      serving Silero VAD v5;
#   4. prints `key=value` lines and a table, stops everything and deletes its files.
#
# Usage: bench/serve/run.sh   Knobs (environment): REPS (5), REQUESTS (2000), WARMUP (200),
# MODELS (small,large,silero), BENCH_ARGS, AGENT (1), SETTLE (3), BUILD (1), BUILD_DIR (build),
# DATA_PARENT ($TMPDIR or /tmp), KEEP (0). See bench/README.md.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BUILD_DIR=${BUILD_DIR:-$root/build}
case $BUILD_DIR in /*) ;; *) BUILD_DIR=$root/$BUILD_DIR ;; esac
BIN=$BUILD_DIR/bin
REPS=${REPS:-5}
REQUESTS=${REQUESTS:-2000}
WARMUP=${WARMUP:-200}
MODELS=${MODELS:-small,large,silero}
BENCH_ARGS=${BENCH_ARGS:-}
AGENT=${AGENT:-1}
SETTLE=${SETTLE:-3}
BUILD=${BUILD:-1}
DATA_PARENT=${DATA_PARENT:-${TMPDIR:-/tmp}}
KEEP=${KEEP:-0}
SILERO=$root/third_party/models/silero_vad_v5.onnx

log() { echo "serve/run.sh: $*" >&2; }
# shellcheck source=bench/lib.sh
. "$root/bench/lib.sh"
for tool in curl jq awk; do
  command -v "$tool" >/dev/null || { log "needs $tool"; exit 1; }
done

# ---- 1. build and copy ----------------------------------------------------------------------
if [ "$BUILD" = "1" ]; then
  [ -f "$BUILD_DIR/build.ninja" ] || [ -f "$BUILD_DIR/Makefile" ] ||
    { log "$BUILD_DIR is not configured; run \`make build\` first"; exit 1; }
  log "building outpost-serve-bench outpost outpost-agent in $BUILD_DIR"
  cmake --build "$BUILD_DIR" --target outpost-serve-bench outpost outpost-agent >&2
fi
for b in outpost-serve-bench outpost outpost-agent; do
  [ -x "$BIN/$b" ] || { log "$BIN/$b is missing (BUILD=0?)"; exit 1; }
done

work=$(mktemp -d "$DATA_PARENT/outpost-serve-bench.XXXXXX")
server_pid=""
agent_pid=""

cleanup() {
  local rc=$?
  trap - EXIT INT TERM HUP
  stop_pid "$agent_pid"
  stop_pid "$server_pid"
  if [ "$KEEP" = "1" ]; then
    log "reports, logs and data kept in $work"
  else
    rm -rf "$work"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM HUP

mkdir "$work/bin"
cp "$BIN/outpost-serve-bench" "$BIN/outpost" "$BIN/outpost-agent" "$work/bin/"
bench_bin=$work/bin/outpost-serve-bench
server_bin=$work/bin/outpost
agent_bin=$work/bin/outpost-agent

out() { echo "$1=$2" | tee -a "$work/figures"; }
loadavg() { cut -d' ' -f1-3 /proc/loadavg | tr ' ' ','; }

commit=$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)
if [ -n "$(git -C "$root" status --porcelain 2>/dev/null)" ]; then commit="$commit+dirty"; fi
out commit "$commit"
out bench_built "$(date -u -r "$BIN/outpost-serve-bench" '+%Y-%m-%dT%H:%M:%SZ')"
out agent_built "$(date -u -r "$BIN/outpost-agent" '+%Y-%m-%dT%H:%M:%SZ')"
out agent_sha256 "$(sha256sum "$agent_bin" | cut -c1-12)"
out nproc "$(nproc)"
out cpu "$(lscpu | sed -n 's/^Model name: *//p' | head -n 1)"
out mem_total_kb "$(awk '$1 == "MemTotal:" {print $2}' /proc/meminfo)"

# ---- 2. in-process bench ----------------------------------------------------------------------
reports=()
for i in $(seq 1 "$REPS"); do
  out "run${i}_loadavg_start" "$(loadavg)"
  log "run $i of $REPS: outpost-serve-bench --requests $REQUESTS --warmup $WARMUP --models $MODELS $BENCH_ARGS"
  # shellcheck disable=SC2086  # BENCH_ARGS is a list of flags
  "$bench_bin" --requests "$REQUESTS" --warmup "$WARMUP" --models "$MODELS" $BENCH_ARGS -o json \
    >"$work/bench-$i.json" 2>"$work/bench-$i.err" ||
    { log "run $i failed:"; cat "$work/bench-$i.err" >&2; exit 1; }
  jq -r '.models[] | "run'"$i"'_\(.model)_added_p50_ms=\(.added_p50_ms)"' "$work/bench-$i.json"
  reports+=("$work/bench-$i.json")
done
out loadavg_end "$(loadavg)"
echo
"$bench_bin" --summarize "${reports[@]}"
echo

[ "$AGENT" = "1" ] || exit 0

# ---- 3. the real agent's memory --------------------------------------------------------------
status_kb() { awk -v k="$2:" '$1 == k {print $2}' "/proc/$1/status"; }
rollup_kb() { awk -v k="$2:" '$1 == k {print $2}' "/proc/$1/smaps_rollup" 2>/dev/null || true; }
measure() {
  sleep "$SETTLE"
  kill -0 "$agent_pid" 2>/dev/null || { log "the agent exited:"; cat "$work/agent.log" >&2; exit 1; }
  out "agent_${1}_rss_kb" "$(status_kb "$agent_pid" VmRSS)"
  out "agent_${1}_hwm_kb" "$(status_kb "$agent_pid" VmHWM)"
  out "agent_${1}_rss_anon_kb" "$(status_kb "$agent_pid" RssAnon)"
  out "agent_${1}_rss_file_kb" "$(status_kb "$agent_pid" RssFile)"
  out "agent_${1}_pss_kb" "$(rollup_kb "$agent_pid" Pss)"
  out "agent_${1}_threads" "$(status_kb "$agent_pid" Threads)"
  out "agent_${1}_onnxruntime_mapped" "$(grep -c libonnxruntime "/proc/$agent_pid/maps" || true)"
}

start_control_plane s1 1

start_agent
measure idle

# Pushes $2 as model $1 version $3, applies deployment $1 serving it at /models/$1, waits
# until the agent serves it and answers the inference in file $4 with 200.
serve_model() {
  local name=$1 file=$2 version=$3 body=$4 state="" code
  "$server_bin" model push "$name" "$version" --variant "accelerator=cpu=$file" \
    >>"$work/push.log" 2>&1 || { log "model push $name failed:"; cat "$work/push.log" >&2; exit 1; }
  printf '{"apiVersion":"outpost/v1","kind":"Deployment","metadata":{"name":"%s"},"spec":{"selector":{"sites":["s1"]},"model":{"name":"%s","version":"%s"},"serve":{"route":"/models/%s"}}}\n' \
    "$name" "$name" "$version" "$name" | "$server_bin" apply -f - >>"$work/apply.log" 2>&1 ||
    { log "apply $name failed:"; cat "$work/apply.log" >&2; exit 1; }
  for _ in $(seq 1 600); do
    state=$(curl -s --max-time 5 "http://$agent_addr/v1/services" |
      jq -r --arg d "$name" '.[] | select(.deployment == $d) | .state' 2>/dev/null || true)
    [ "$state" = "ready" ] && break
    kill -0 "$agent_pid" 2>/dev/null || { log "the agent exited:"; cat "$work/agent.log" >&2; exit 1; }
    sleep 0.1
  done
  [ "$state" = "ready" ] || { log "$name not ready after 60 s (state '$state')"; cat "$work/agent.log" >&2; exit 1; }
  code=$(curl -s -o "$work/$name.answer" -w '%{http_code}' --max-time 10 -X POST \
    -H 'Content-Type: application/json' --data-binary "@$body" "http://$agent_addr/models/$name/infer")
  [ "$code" = "200" ] || { log "inference on $name: HTTP $code: $(cat "$work/$name.answer")"; exit 1; }
  log "$name $version served and answered"
}

"$server_bin" model gen --out "$work/m.onnx" --seed 1 >/dev/null
echo '{"inputs":[{"name":"input","datatype":"FP32","shape":[1,4],"data":[0.5,-1,2,0.25]}]}' \
  >"$work/m.json"
serve_model m "$work/m.onnx" 1.0.0 "$work/m.json"
measure model

if [ -f "$SILERO" ]; then
  # 32 ms of a 440 Hz tone at 16 kHz, a zero state, the sample rate.
  awk 'BEGIN {
    printf "{\"inputs\":[{\"name\":\"input\",\"datatype\":\"FP32\",\"shape\":[1,512],\"data\":["
    for (i = 0; i < 512; i++) printf "%s%.6f", (i ? "," : ""), 0.3 * sin(2 * 3.141592653589793 * 440 * i / 16000)
    printf "]},{\"name\":\"state\",\"datatype\":\"FP32\",\"shape\":[2,1,128],\"data\":["
    for (i = 0; i < 256; i++) printf "%s0", (i ? "," : "")
    printf "]},{\"name\":\"sr\",\"datatype\":\"INT64\",\"shape\":[],\"data\":[16000]}]}\n"
  }' >"$work/vad.json"
  serve_model vad "$SILERO" 5.0.0 "$work/vad.json"
  measure vad
else
  log "no $SILERO (scripts/install-deps fetches it); skipping the Silero VAD phase"
fi

# ---- 4. summary ---------------------------------------------------------------------------
kv() { awk -F= -v k="$1" '$1 == k {print $2}' "$work/figures"; }
echo
echo "outpost-agent memory (kB; after ${SETTLE} s settle; one inference answered per model)"
echo
echo "| phase | VmRSS | VmHWM | RssAnon | RssFile | Pss | threads | libonnxruntime mapped |"
echo "|---|---:|---:|---:|---:|---:|---:|---|"
for p in idle model vad; do
  [ -n "$(kv "agent_${p}_rss_kb")" ] || continue
  case $p in
    idle) label="no model" ;;
    model) label="classifier 4→8→3 served" ;;
    vad) label="+ Silero VAD v5 served" ;;
  esac
  printf '| %s | %s | %s | %s | %s | %s | %s | %s |\n' "$label" "$(kv "agent_${p}_rss_kb")" \
    "$(kv "agent_${p}_hwm_kb")" "$(kv "agent_${p}_rss_anon_kb")" "$(kv "agent_${p}_rss_file_kb")" \
    "$(kv "agent_${p}_pss_kb")" "$(kv "agent_${p}_threads")" \
    "$([ "$(kv "agent_${p}_onnxruntime_mapped")" -gt 0 ] && echo yes || echo no)"
done
