#!/usr/bin/env bash
# The device sync benchmark of record. For each held long-poll count in $HELD and each of
# $REPS repetitions it starts a fresh `outpost server` (its own data directory), runs
# outpost-sync-bench against it and stops it; then it prints the medians (min–max) and
# appends them, with date, machine, commit and command, to bench/RESULTS.md.
#
# Builds nothing: run `make bench-build` first (or point BUILD_DIR at another build).
# Knobs (environment): BUILD_DIR (or SERVER_BIN and BENCH_BIN), HELD, REPS, DURATION, CLIENTS,
# RATE, MIN_DEVICES, SERVER_ARGS, DATA_PARENT, RECORD, KEEP. See bench/README.md.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BUILD_DIR=${BUILD_DIR:-$root/build}
HELD=${HELD:-"0 1000 5000"}
REPS=${REPS:-3}
DURATION=${DURATION:-10}
CLIENTS=${CLIENTS:-32}
RATE=${RATE:-0}                   # syncs/s, paced (open loop); 0: as fast as answered
MIN_DEVICES=${MIN_DEVICES:-1000}  # devices enrolled per run: max(held, MIN_DEVICES)
SERVER_ARGS=${SERVER_ARGS:-}      # extra `outpost server` flags, e.g. "--workers 8"
TLS=${TLS:-0}                     # 1: HTTPS with the server's development CA (as devices run it)
# Where the servers' data directories go. Its file system matters: every sync writes SQLite.
DATA_PARENT=${DATA_PARENT:-${TMPDIR:-/tmp}}
RECORD=${RECORD:-1}               # 0: print the table, leave bench/RESULTS.md alone
KEEP=${KEEP:-0}                   # 1: keep the JSON reports and server logs (path printed)
results_file=${RESULTS_FILE:-$root/bench/RESULTS.md}  # where RECORD=1 appends

server_bin=${SERVER_BIN:-$BUILD_DIR/bin/outpost}
bench_bin=${BENCH_BIN:-$BUILD_DIR/bin/outpost-sync-bench}
for bin in "$server_bin" "$bench_bin"; do
  if [ ! -x "$bin" ]; then
    echo "run.sh: $bin is missing; run \`make build\` first (a build directory configured" \
      "before bench/sync existed needs \`cmake -S . -B $BUILD_DIR\` once), or set BUILD_DIR" >&2
    exit 1
  fi
done

# Thousands of held long-polls need as many descriptors, in the server and in the bench.
ulimit -n "$(ulimit -Hn)"

work=$(mktemp -d "$DATA_PARENT/outpost-sync-bench.XXXXXX")
server_pid=""
cleanup() {
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
    kill -TERM "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  if [ "$KEEP" = "1" ]; then
    rm -rf "${work:?}"/held*-run*/ "${work:?}/bin"  # databases and binaries; reports and logs stay
    echo "run.sh: reports and server logs kept in $work" >&2
  else
    rm -rf "$work"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Starts a server on a free port with data directory $1; sets server_pid and server_url.
start_server() {
  local data=$1
  # shellcheck disable=SC2086  # SERVER_ARGS is a list of flags
  local plain=--insecure-http scheme=http
  if [ "$TLS" = "1" ]; then plain="" scheme=https; fi
  # shellcheck disable=SC2086  # $plain is one flag or none
  "$run_server_bin" server --listen 127.0.0.1:0 --data "$data" $plain $SERVER_ARGS \
    >"$data.log" 2>&1 &
  server_pid=$!
  server_url=""
  for _ in $(seq 1 100); do
    server_url=$(grep -o "$scheme://127\.0\.0\.1:[0-9]*" "$data.log" | head -n 1 || true)
    if [ -n "$server_url" ] && [ -s "$data/admin.token" ]; then return 0; fi
    if ! kill -0 "$server_pid" 2>/dev/null; then
      echo "run.sh: the server exited at start:" >&2
      cat "$data.log" >&2
      server_pid=""
      return 1
    fi
    sleep 0.1
  done
  echo "run.sh: the server did not print its address within 10 s:" >&2
  cat "$data.log" >&2
  return 1
}

stop_server() {
  kill -TERM "$server_pid"
  if ! wait "$server_pid"; then
    echo "run.sh: the server exited with an error on SIGTERM (log: $1.log):" >&2
    tail -n 20 "$1.log" >&2
  fi
  server_pid=""
}

# Every run of a section uses the same binaries, even if a build replaces them meanwhile.
server_built=$(date -u -r "$server_bin" '+%Y-%m-%d %H:%M UTC')
mkdir "$work/bin"
cp "$server_bin" "$work/bin/outpost"
cp "$bench_bin" "$work/bin/outpost-sync-bench"
server_sha=$(sha256sum "$work/bin/outpost" | cut -c1-12)
run_server_bin=$work/bin/outpost
run_bench_bin=$work/bin/outpost-sync-bench

started=$(date +%s)
load_at_start=$(cut -d' ' -f1-3 /proc/loadavg)
# Share of the last minute some task waited on I/O: fsync-bound figures move with it.
io_pressure=$(sed -n 's/^some avg10=[0-9.]* avg60=\([0-9.]*\).*/\1 %/p' /proc/pressure/io 2>/dev/null || true)
echo "run.sh: held counts [$HELD], $REPS runs each, $DURATION s each, $CLIENTS clients;" \
  "servers' data under $work" >&2
# Repetition outermost, so slow drift of the machine spreads over every configuration.
for rep in $(seq 1 "$REPS"); do
  for held in $HELD; do
    devices=$((held > MIN_DEVICES ? held : MIN_DEVICES))
    name=$work/held$held-run$rep
    start_server "$name"
    echo "run.sh: run $rep/$REPS: held=$held devices=$devices (server pid $server_pid," \
      "$server_url)" >&2
    ca_args=()
    if [ "$TLS" = "1" ]; then ca_args=(--ca-file "$name/tls/ca.pem"); fi
    if ! "$run_bench_bin" --server "$server_url" "${ca_args[@]}" --token "$(cat "$name/admin.token")" \
      --devices "$devices" --held "$held" --clients "$CLIENTS" --rate "$RATE" \
      --duration "$DURATION" --server-pid "$server_pid" -o json >"$name.json" 2>"$name.err"; then
      echo "run.sh: outpost-sync-bench failed:" >&2
      cat "$name.err" >&2
      exit 1
    fi
    stop_server "$name"
    # One line per run so a reader sees the noise as it happens.
    "$run_bench_bin" --summarize "$name.json" | tail -n 1 >&2
  done
done
elapsed=$(($(date +%s) - started))

table=$("$run_bench_bin" --summarize "$work"/*.json)
echo "$table"
if grep -q '| [1-9][0-9]* |$' <<<"$table"; then
  echo "run.sh: some runs had errors; see the errors column and the list under the table" >&2
fi

if [ "$RECORD" = "1" ]; then
  commit=$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)
  if [ -n "$(git -C "$root" status --porcelain 2>/dev/null)" ]; then commit="$commit+dirty"; fi
  cpu=$(grep -m1 'model name' /proc/cpuinfo | sed 's/.*: //')
  mem=$(awk '/MemTotal/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo)
  fs=$(df --output=fstype "$work" | tail -n 1)
  # "build/bin/outpost (RelWithDebInfo)": a binary, relative to the checkout, and its build type.
  describe_bin() {
    local type
    type=$(grep -m1 '^CMAKE_BUILD_TYPE:' "$(dirname "$(dirname "$1")")/CMakeCache.txt" \
      2>/dev/null | cut -d= -f2)
    echo "$(realpath --relative-to="$root" "$1") (${type:-unknown build type})"
  }
  {
    echo
    echo "## $(date -u '+%Y-%m-%d %H:%M') UTC — device sync (bench/sync/run.sh)"
    echo
    echo "- machine: $(nproc) × $cpu, $mem RAM, $(uname -sr); at start: load average" \
      "$load_at_start, I/O pressure ${io_pressure:-n/a} (some, avg60); server data on $fs" \
      "($DATA_PARENT)"
    echo "- commit: $commit; server $(describe_bin "$server_bin"), built $server_built," \
      "sha256 $server_sha…; bench $(describe_bin "$bench_bin")"
    overrides=""
    if [ -n "${SERVER_BIN:-}" ]; then overrides+="SERVER_BIN=$SERVER_BIN "; fi
    if [ -n "${BENCH_BIN:-}" ]; then overrides+="BENCH_BIN=$BENCH_BIN "; fi
    if [ "$BUILD_DIR" != "$root/build" ]; then overrides+="BUILD_DIR=$BUILD_DIR "; fi
    if [ -n "$SERVER_ARGS" ]; then overrides+="SERVER_ARGS=\"$SERVER_ARGS\" "; fi
    if [ "$TLS" = "1" ]; then overrides+="TLS=1 "; fi
    if [ "$DATA_PARENT" != "${TMPDIR:-/tmp}" ]; then overrides+="DATA_PARENT=$DATA_PARENT "; fi
    echo "- command: \`${overrides}HELD=\"$HELD\" REPS=$REPS DURATION=$DURATION" \
      "CLIENTS=$CLIENTS RATE=$RATE MIN_DEVICES=$MIN_DEVICES bench/sync/run.sh\`" \
      "($elapsed s)"
    if [ "$TLS" = "1" ]; then link="HTTPS (development CA, verified by the bench)"; else link="plain HTTP (--insecure-http)"; fi
    echo "- link: $link"
    echo "- each run: \`outpost server --listen 127.0.0.1:0 --data FRESH_DIR${SERVER_ARGS:+ $SERVER_ARGS}\`, then" \
      "\`outpost-sync-bench --server URL --token ADMIN --devices max(H,$MIN_DEVICES) --held H" \
      "--clients $CLIENTS --rate $RATE --duration $DURATION --server-pid PID -o json\`"
    echo "- target (DESIGN §8): ≥ 20,000 device syncs/s on 2 cores; 100,000 devices syncing" \
      "every 30 s (≈ 3,300 syncs/s) with p99 < 100 ms"
    if [ "$REPS" = "1" ]; then figures="one run each"; else figures="median of $REPS runs (min–max)"; fi
    echo "- figures: $figures. Server and load generator share the machine; \"client cores\"" \
      "is what the generator itself used."
    echo
    echo "$table"
  } >>"$results_file"
  echo "run.sh: appended to $results_file" >&2
fi
