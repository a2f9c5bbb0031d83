#!/usr/bin/env bash
# The device agent's footprint (DESIGN.md §8: idle RSS < 10 MB with no model loaded, stripped
# binary < 4 MB, idle CPU < 0.1 %). It
#   1. strips a copy of outpost-agent and reports its size and its dynamic libraries (the
#      libraries are not in the size but are in the RSS);
#   2. starts a control plane (`outpost server --listen 127.0.0.1:0`) and an enrollment token;
#   3. starts outpost-agent enrolled into it with no deployments and, after SETTLE seconds,
#      reads its memory (VmRSS, VmHWM, Pss from smaps_rollup), threads and open descriptors,
#      then its CPU time over IDLE_SECONDS (utime+stime from /proc/PID/stat);
#   4. if WORKLOADS > 0, applies that many deployments each running `/bin/sleep 100000` (a
#      program already on the device, no bundle), waits until the agent reports them
#      "running" and measures the agent (not its children) again the same way;
#   5. prints `key=value` lines and a table, stops everything and deletes its files.
#
# Builds nothing. Usage: bench/agent/footprint.sh [BIN_DIR]   (default build/bin)
# Knobs (environment): IDLE_SECONDS (60), WORKLOADS (1), SETTLE (5), TOP_MAPPINGS (12),
# DATA_PARENT ($TMPDIR or /tmp), KEEP (0). See bench/README.md.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BIN=${1:-${BIN:-$root/build/bin}}
IDLE_SECONDS=${IDLE_SECONDS:-60}
WORKLOADS=${WORKLOADS:-1}
SETTLE=${SETTLE:-5}
TOP_MAPPINGS=${TOP_MAPPINGS:-12}
DATA_PARENT=${DATA_PARENT:-${TMPDIR:-/tmp}}
KEEP=${KEEP:-0}

# DESIGN.md §8. "MB" read as MiB, the more lenient reading; the table shows both units.
TARGET_RSS_KB=10240
TARGET_BINARY_BYTES=$((4 * 1024 * 1024))
TARGET_CPU_PCT=0.1

for tool in strip ldd readelf curl jq awk getconf; do
  command -v "$tool" >/dev/null || { echo "footprint.sh: needs $tool" >&2; exit 1; }
done
for b in outpost outpost-agent; do
  if [ ! -x "$BIN/$b" ]; then
    echo "footprint.sh: $BIN/$b is missing; run \`make build\` first or pass the bin dir" >&2
    exit 1
  fi
done

work=$(mktemp -d "$DATA_PARENT/outpost-footprint.XXXXXX")
server_pid=""
agent_pid=""
workload_pids=""

cleanup() {
  local rc=$?
  trap - EXIT INT TERM HUP
  # The agent's children (its workloads), found before it goes; the agent stops them itself
  # on SIGTERM, this only catches what it left.
  if [ -n "$agent_pid" ]; then
    workload_pids="$workload_pids $(pgrep -P "$agent_pid" 2>/dev/null | tr '\n' ' ' || true)"
  fi
  stop_pid "$agent_pid"
  for pid in $workload_pids; do
    # Only a pid that is still the workload we started (pids get reused).
    if [ "$(tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline")" = "/bin/sleep 100000 " ]; then
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done
  stop_pid "$server_pid"
  if [ "$KEEP" = "1" ]; then
    echo "footprint.sh: logs and data kept in $work" >&2
  else
    rm -rf "$work"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM HUP

log() { echo "footprint.sh: $*" >&2; }
# shellcheck source=bench/lib.sh
. "$root/bench/lib.sh"
out() { echo "$1=$2"; summary+=("$1=$2"); }
summary=()

# Copies, so a build replacing the binaries meanwhile changes nothing in this run.
mkdir "$work/bin"
cp "$BIN/outpost" "$BIN/outpost-agent" "$work/bin/"
# Written back now: freshly written page-cache pages would show as Private_Dirty in smaps.
sync "$work/bin/outpost" "$work/bin/outpost-agent"
agent_bin=$work/bin/outpost-agent
server_bin=$work/bin/outpost

# ---- 1. binary ----------------------------------------------------------------------------
strip -o "$work/outpost-agent.stripped" "$agent_bin"
binary_bytes=$(stat -c %s "$agent_bin")
stripped_bytes=$(stat -c %s "$work/outpost-agent.stripped")
needed=$(readelf -d "$agent_bin" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p')
loaded=$(ldd "$agent_bin" | awk '$1 !~ /^linux-vdso/ && $1 !~ /ld-linux/ {print $1}')
libs_bytes=0
while read -r path; do
  [ -n "$path" ] && libs_bytes=$((libs_bytes + $(stat -L -c %s "$path")))
done < <(ldd "$agent_bin" | awk '$2 == "=>" && $3 ~ /^\// {print $3}')

# ---- helpers ------------------------------------------------------------------------------
status_kb() { awk -v k="$2:" '$1 == k {print $2}' "/proc/$1/status"; }
rollup_kb() { awk -v k="$2:" '$1 == k {print $2}' "/proc/$1/smaps_rollup" 2>/dev/null || true; }
# utime + stime of the process itself (fields 14, 15; counted after the ")" of the name).
cpu_ticks() { sed 's/.*) //' "/proc/$1/stat" | awk '{print $12 + $13}'; }
# Nanoseconds on CPU, summed over the threads alive now (finer than ticks; a thread that
# exits inside the window takes its time with it).
cpu_ns() { cat /proc/"$1"/task/*/schedstat 2>/dev/null | awk '{s += $1} END {print s + 0}'; }
ctx_switches() {
  cat /proc/"$1"/task/*/status 2>/dev/null |
    awk '/^(voluntary|nonvoluntary)_ctxt_switches:/ {s += $2} END {print s + 0}'
}
loadavg() { cut -d' ' -f1-3 /proc/loadavg | tr ' ' ','; }
cpu_pressure() {
  sed -n 's/^some avg10=[0-9.]* avg60=\([0-9.]*\).*/\1/p' /proc/pressure/cpu 2>/dev/null || echo n/a
}
ticks_per_s=$(getconf CLK_TCK)

# Per mapped file (anonymous ones by kind), sorted by Rss: "rss_kb pss_kb private_dirty_kb name".
top_mappings() {
  local stack_kb
  stack_kb=$(awk '/^Max stack size/ {print ($4 == "unlimited" ? 0 : $4 / 1024)}' "/proc/$1/limits")
  awk -v stack_kb="$stack_kb" '
    /^[0-9a-f]+-[0-9a-f]+ / {
      name = $6
      if (name == "") name = "[anon]"
      perms = $2
      next
    }
    /^Size:/ {
      if (name == "[anon]" && perms ~ /^rw/ && stack_kb > 0 && $2 == stack_kb)
        name = "[anon: thread stacks]"
      else if (name == "[anon]" && perms ~ /^rw/) name = "[anon: other (malloc arenas, ...)]"
      next
    }
    /^Rss:/ {rss[name] += $2}
    /^Pss:/ {pss[name] += $2}
    /^Private_Dirty:/ {pd[name] += $2}
    END {for (n in rss) if (rss[n] > 0) printf "%d %d %d %s\n", rss[n], pss[n], pd[n], n}
  ' "/proc/$1/smaps" | sort -rn
}

# Measures the agent now: memory after SETTLE s, then CPU over IDLE_SECONDS. $1: key prefix.
measure() {
  local p=$1 t0 t1 ns0 ns1 cs0 cs1 s0 s1 secs
  log "$p: settling $SETTLE s"
  sleep "$SETTLE"
  out "${p}_rss_kb" "$(status_kb "$agent_pid" VmRSS)"
  out "${p}_hwm_kb" "$(status_kb "$agent_pid" VmHWM)"
  out "${p}_rss_anon_kb" "$(status_kb "$agent_pid" RssAnon)"
  out "${p}_rss_file_kb" "$(status_kb "$agent_pid" RssFile)"
  local pss shared priv_c priv_d
  pss=$(rollup_kb "$agent_pid" Pss)
  shared=$(rollup_kb "$agent_pid" Shared_Clean)
  priv_c=$(rollup_kb "$agent_pid" Private_Clean)
  priv_d=$(rollup_kb "$agent_pid" Private_Dirty)
  out "${p}_pss_kb" "${pss:-n/a}"
  out "${p}_shared_clean_kb" "${shared:-n/a}"
  out "${p}_private_kb" "$(( ${priv_c:-0} + ${priv_d:-0} ))"
  out "${p}_private_dirty_kb" "${priv_d:-n/a}"
  out "${p}_threads" "$(status_kb "$agent_pid" Threads)"
  out "${p}_fds" "$(find "/proc/$agent_pid/fd" -mindepth 1 -maxdepth 1 | wc -l)"
  top_mappings "$agent_pid" >"$work/$p.mappings"

  log "$p: CPU over $IDLE_SECONDS s"
  out "${p}_loadavg_start" "$(loadavg)"
  out "${p}_cpu_pressure_avg60_start" "$(cpu_pressure)"
  t0=$(cpu_ticks "$agent_pid"); ns0=$(cpu_ns "$agent_pid"); cs0=$(ctx_switches "$agent_pid")
  s0=$(date +%s.%N)
  sleep "$IDLE_SECONDS"
  t1=$(cpu_ticks "$agent_pid"); ns1=$(cpu_ns "$agent_pid"); cs1=$(ctx_switches "$agent_pid")
  s1=$(date +%s.%N)
  secs=$(awk -v a="$s0" -v b="$s1" 'BEGIN {printf "%.2f", b - a}')
  out "${p}_seconds" "$secs"
  out "${p}_cpu_ticks" "$((t1 - t0))"
  out "${p}_cpu_pct" "$(awk -v d=$((t1 - t0)) -v hz="$ticks_per_s" -v s="$IDLE_SECONDS" \
    'BEGIN {printf "%.4f", 100 * d / (hz * s)}')"
  out "${p}_cpu_pct_schedstat" "$(awk -v d=$((ns1 - ns0)) -v s="$secs" \
    'BEGIN {printf "%.4f", 100 * d / (1e9 * s)}')"
  out "${p}_ctx_switches_per_s" "$(awk -v d=$((cs1 - cs0)) -v s="$secs" \
    'BEGIN {printf "%.2f", d / s}')"
  out "${p}_loadavg_end" "$(loadavg)"
  out "${p}_cpu_pressure_avg60_end" "$(cpu_pressure)"
  out "${p}_rss_end_kb" "$(status_kb "$agent_pid" VmRSS)"
  out "${p}_hwm_end_kb" "$(status_kb "$agent_pid" VmHWM)"
}

# ---- 2. control plane ---------------------------------------------------------------------
start_control_plane bench 5

# ---- 3. agent, no deployments -------------------------------------------------------------
start_agent

out binary "$BIN/outpost-agent"
out binary_built "$(date -u -r "$BIN/outpost-agent" '+%Y-%m-%dT%H:%M:%SZ')"
out binary_sha256 "$(sha256sum "$agent_bin" | cut -c1-12)"
out binary_bytes "$binary_bytes"
out binary_stripped_bytes "$stripped_bytes"
out binary_stripped_mib "$(awk -v b="$stripped_bytes" 'BEGIN {printf "%.2f", b / 1048576}')"
out libs_needed "$(echo "$needed" | grep -c . || true)"
out libs_loaded "$(echo "$loaded" | grep -c . || true)"
out libs_loaded_file_bytes "$libs_bytes"
out libs_needed_list "$(echo "$needed" | paste -sd, -)"
out libs_loaded_list "$(echo "$loaded" | paste -sd, -)"
out nproc "$(nproc)"
out clk_tck "$ticks_per_s"

measure idle

# ---- 4. with workloads --------------------------------------------------------------------
if [ "$WORKLOADS" -gt 0 ]; then
  names=()
  for i in $(seq 1 "$WORKLOADS"); do
    if [ "$WORKLOADS" -eq 1 ]; then name=idle-app; else name=idle-app-$i; fi
    names+=("$name")
    printf '{"apiVersion":"outpost/v1","kind":"Deployment","metadata":{"name":"%s"},"spec":{"selector":{"sites":["bench"]},"workload":{"command":["/bin/sleep","100000"],"restart":"always"}}}\n' \
      "$name" | "$server_bin" apply -f - >>"$work/apply.log" 2>&1
  done
  log "applied ${names[*]}; waiting for the agent to report them running"
  running=0
  for _ in $(seq 1 600); do
    status=$(curl -s --max-time 5 "http://$agent_addr/v1/status" || true)
    running=$(jq -r '[.deployments[] | select(.name | startswith("idle-app")) |
      select(.phase == "running")] | length' <<<"$status" 2>/dev/null || echo 0)
    workload_pids=$(jq -r '[.deployments[].process.pid // empty] | map(tostring) | join(" ")' \
      <<<"$status" 2>/dev/null || true)
    [ "$running" -ge "$WORKLOADS" ] && break
    kill -0 "$agent_pid" 2>/dev/null || { log "the agent exited:"; cat "$work/agent.log" >&2; exit 1; }
    sleep 0.1
  done
  if [ "$running" -lt "$WORKLOADS" ]; then
    log "only $running of $WORKLOADS running after 60 s; agent status:"
    echo "$status" >&2
    exit 1
  fi
  out workloads "$WORKLOADS"
  measure workload
  status=$(curl -s --max-time 5 "http://$agent_addr/v1/status" || true)
  out workload_restarts_total "$(jq '[.deployments[].restarts] | add // 0' <<<"$status")"
  out workload_still_running "$(jq '[.deployments[] | select(.phase == "running")] | length' <<<"$status")"
fi

# ---- 5. summary ---------------------------------------------------------------------------
get() {
  local k
  for k in "${summary[@]}"; do [ "${k%%=*}" = "$1" ] && { echo "${k#*=}"; return; }; done
  echo "-"
}
kb_mb() { [ "$1" = "-" ] || [ "$1" = "n/a" ] && { echo "$1"; return; }
  awk -v k="$1" 'BEGIN {printf "%.1f MiB (%.1f MB)", k / 1024, k * 1.024 / 1000}'; }
verdict() { awk -v v="$1" -v t="$2" 'BEGIN {print (v == "-" ? "-" : (v + 0 < t + 0 ? "met" : "missed"))}'; }

echo
echo "outpost-agent footprint ($(nproc) CPUs; idle window ${IDLE_SECONDS} s; agent only, not its children;"
echo "verdicts: no deployment/with workloads; \"MB\" read as MiB)"
echo
printf '| %-28s | %-22s | %-22s | %-22s |\n' figure "no deployment" "$WORKLOADS workload(s)" target
printf '|%s|%s|%s|%s|\n' "$(printf -- '-%.0s' {1..30})" "$(printf -- '-%.0s' {1..24})" \
  "$(printf -- '-%.0s' {1..24})" "$(printf -- '-%.0s' {1..24})"
row() { printf '| %-28s | %-22s | %-22s | %-22s |\n' "$1" "$2" "$3" "$4"; }
row "stripped binary" "$(awk -v b="$stripped_bytes" 'BEGIN {printf "%.2f MiB (%d B)", b / 1048576, b}')" "" \
  "< 4 MB: $(verdict "$stripped_bytes" "$TARGET_BINARY_BYTES")"
row "VmRSS" "$(kb_mb "$(get idle_rss_kb)")" "$(kb_mb "$(get workload_rss_kb)")" \
  "< 10 MB: $(verdict "$(get idle_rss_kb)" "$TARGET_RSS_KB")/$(verdict "$(get workload_rss_kb)" "$TARGET_RSS_KB")"
row "VmHWM (peak)" "$(kb_mb "$(get idle_hwm_kb)")" "$(kb_mb "$(get workload_hwm_kb)")" ""
row "Pss" "$(kb_mb "$(get idle_pss_kb)")" "$(kb_mb "$(get workload_pss_kb)")" \
  "($(verdict "$(get idle_pss_kb)" "$TARGET_RSS_KB")/$(verdict "$(get workload_pss_kb)" "$TARGET_RSS_KB") on Pss)"
row "  RssAnon / RssFile" "$(get idle_rss_anon_kb) / $(get idle_rss_file_kb) kB" \
  "$(get workload_rss_anon_kb) / $(get workload_rss_file_kb) kB" ""
row "  USS (private clean+dirty)" "$(get idle_private_kb) kB" "$(get workload_private_kb) kB" ""
row "VmRSS at end of window" "$(kb_mb "$(get idle_rss_end_kb)")" "$(kb_mb "$(get workload_rss_end_kb)")" ""
row "CPU, % of one core (ticks)" "$(get idle_cpu_pct) ($(get idle_cpu_ticks) ticks)" \
  "$(get workload_cpu_pct) ($(get workload_cpu_ticks) ticks)" \
  "< 0.1 %: $(verdict "$(get idle_cpu_pct)" "$TARGET_CPU_PCT")/$(verdict "$(get workload_cpu_pct)" "$TARGET_CPU_PCT")"
row "CPU, % (schedstat ns)" "$(get idle_cpu_pct_schedstat)" "$(get workload_cpu_pct_schedstat)" ""
row "context switches/s" "$(get idle_ctx_switches_per_s)" "$(get workload_ctx_switches_per_s)" ""
row "threads" "$(get idle_threads)" "$(get workload_threads)" ""
row "open fds" "$(get idle_fds)" "$(get workload_fds)" ""
row "load avg start -> end" "$(get idle_loadavg_start) -> $(get idle_loadavg_end)" \
  "$(get workload_loadavg_start) -> $(get workload_loadavg_end)" ""
echo
echo "dynamic libraries: $(get libs_needed) needed directly ($(get libs_needed_list)); $(get libs_loaded) loaded in all (ldd; $(awk -v b="$libs_bytes" 'BEGIN {printf "%.1f MiB", b / 1048576}') of files, not in the binary size):"
echo "  $(get libs_loaded_list)"
echo
for p in idle workload; do
  [ -s "$work/$p.mappings" ] || continue
  echo "largest mappings by Rss ($p; kB: Rss Pss Private_Dirty):"
  head -n "$TOP_MAPPINGS" "$work/$p.mappings" | sed "s|$work/bin/|(copy of) |; s/^/  /"
done
