#!/usr/bin/env bash
# Model deltas (issue 18: ≤ 15 % of the full bytes on the wire when 10 % of the weights
# changed): builds outpost-delta-bench (BUILD=1) and copies it, generates FP32 ONNX models
# with bench/delta/make_models.py into a temp folder, runs the bench on Silero VAD v4 → v5
# and on the generated base → each changed version, prints the tables and appends them, with
# date, machine, commit and command, to bench/RESULTS.md (RECORD=1).
#
# Usage: bench/delta/run.sh   Knobs (environment): LEVELS (3,9,19), METHODS (plain,bytegroup),
# MIB (16), FRACTIONS (1,10,50), UPDATE (0.01), SEED (1), APPLY_REPS (3), BUILD (1),
# BUILD_DIR (build), DATA_PARENT ($TMPDIR or /tmp), RECORD (1), RESULTS_FILE, KEEP (0).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BUILD_DIR=${BUILD_DIR:-$root/build}
case $BUILD_DIR in /*) ;; *) BUILD_DIR=$root/$BUILD_DIR ;; esac
LEVELS=${LEVELS:-3,9,19}
METHODS=${METHODS:-plain,bytegroup}
MIB=${MIB:-16}
FRACTIONS=${FRACTIONS:-1,10,50}
UPDATE=${UPDATE:-0.01}
SEED=${SEED:-1}
APPLY_REPS=${APPLY_REPS:-3}
BUILD=${BUILD:-1}
DATA_PARENT=${DATA_PARENT:-${TMPDIR:-/tmp}}
RECORD=${RECORD:-1}
results_file=${RESULTS_FILE:-$root/bench/RESULTS.md}
KEEP=${KEEP:-0}
models=$root/third_party/models

log() { echo "delta/run.sh: $*" >&2; }
command -v jq >/dev/null || { log "needs jq"; exit 1; }
# Debian's python3-onnx and python3-numpy: the first python3 that has them.
python=""
for p in ${PYTHON:-} python3 /usr/bin/python3; do
  if "$p" -c 'import onnx, numpy' 2>/dev/null; then python=$p; break; fi
done
[ -n "$python" ] || { log "needs python3 with onnx and numpy (apt-get install python3-onnx)"; exit 1; }

if [ "$BUILD" = "1" ]; then
  [ -f "$BUILD_DIR/build.ninja" ] || [ -f "$BUILD_DIR/Makefile" ] ||
    { log "$BUILD_DIR is not configured; run \`make build\` first"; exit 1; }
  log "building outpost-delta-bench in $BUILD_DIR"
  cmake --build "$BUILD_DIR" --target outpost-delta-bench >&2
fi
bench_src=$BUILD_DIR/bin/outpost-delta-bench
[ -x "$bench_src" ] || { log "$bench_src is missing (BUILD=0?)"; exit 1; }

work=$(mktemp -d "$DATA_PARENT/outpost-delta-bench.XXXXXX")
cleanup() {
  local rc=$?
  if [ "$KEEP" = "1" ]; then log "models and reports kept in $work"; else rm -rf "$work"; fi
  exit "$rc"
}
trap cleanup EXIT
cp "$bench_src" "$work/outpost-delta-bench"
bench=$work/outpost-delta-bench

started=$(date +%s)
load_at_start=$(cut -d' ' -f1-3 /proc/loadavg)
log "generating models (${MIB} MiB, fractions $FRACTIONS %, update $UPDATE) in $work/models"
"$python" "$root/bench/delta/make_models.py" "$work/models" --mib "$MIB" \
  --fractions "$FRACTIONS" --update "$UPDATE" --seed "$SEED" >"$work/models.jsonl"

# name base target
pairs=("silero-v4-to-v5 $models/silero_vad_v4.onnx $models/silero_vad_v5.onnx")
while read -r name; do
  [ "$name" = "base" ] || pairs+=("$name $work/models/base.onnx $work/models/$name.onnx")
done < <(jq -r .name "$work/models.jsonl")

for pair in "${pairs[@]}"; do
  read -r name base target <<<"$pair"
  log "$name: levels $LEVELS, methods $METHODS"
  "$bench" --base "$base" --target "$target" --name "$name" --levels "$LEVELS" \
    --methods "$METHODS" --apply-reps "$APPLY_REPS" --work "$work/scratch" -o json \
    >"$work/$name.json"
done
elapsed=$(($(date +%s) - started))

# Every row, in the bench's own markdown form.
all=$(jq -s '[.[].results[]]' "$work"/*.json)
full_table=$("$bench" --md-header
  for pair in "${pairs[@]}"; do
    read -r name _ <<<"$pair"
    jq -r --arg n "$name" '.results[] | select(.input == $n) |
      "| \(.input) | \(.method) | \(.level) | \(.full_bytes) | \(.full_zstd_bytes) (\(100 * .full_zstd_bytes / .full_bytes * 10 | round / 10) %) | \(.delta_bytes) | **\(.delta_pct_of_full * 100 | round / 100) %** | \(.make_ms / 10 | round / 100) | \(.make_maxrss_kb / 1024 | round) | \(.apply_ms_median | round) | \(.apply_maxrss_kb / 1024 | round) (\(.apply_peak_anon_kb / 1024 | round)) | ok \(.verified_sha256[0:12])… |"' \
      "$work/$name.json"
  done)
# Side by side: delta as % of full, plain / byte-grouped, per level.
IFS=, read -r -a level_list <<<"$LEVELS"
side=$(
  printf '| input | weights changed |'
  for l in "${level_list[@]}"; do printf ' level %s: plain | byte-grouped |' "$l"; done
  printf ' make s at %s: plain / byte-grouped |\n|---|---:|' "${level_list[-1]}"
  for _ in "${level_list[@]}"; do printf -- '---:|---:|'; done
  printf -- '---:|\n'
  for pair in "${pairs[@]}"; do
    read -r name _ <<<"$pair"
    changed=$(jq -r --arg n "$name" 'select(.name == $n) | "\(.changed * 1000 | round / 10) %"' \
      "$work/models.jsonl")
    printf '| %s | %s |' "$name" "${changed:-architecture change}"
    for l in "${level_list[@]}"; do
      for m in plain bytegroup; do
        printf ' %s |' "$(jq -r --arg n "$name" --arg m "$m" --argjson l "$l" '[.[] |
          select(.input == $n and .method == $m and .level == $l)][0] |
          if . == null then "–" else "\(.delta_pct_of_full * 10 | round / 10) %" end' <<<"$all")"
      done
    done
    printf ' %s |\n' "$(jq -r --arg n "$name" --argjson l "${level_list[-1]}" '[.[] |
      select(.input == $n and .level == $l)] | map("\(.make_ms / 10 | round / 100)") |
      join(" / ")' <<<"$all")"
  done)
echo "$side"
echo
echo "$full_table"

if [ "$RECORD" = "1" ]; then
  commit=$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)
  if [ -n "$(git -C "$root" status --porcelain -- src bench 2>/dev/null)" ]; then
    commit="$commit+dirty"
  fi
  cpu=$(grep -m1 'model name' /proc/cpuinfo | sed 's/.*: //')
  mem=$(awk '/MemTotal/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo)
  fs=$(df --output=fstype "$work" | tail -n 1)
  type=$(grep -m1 '^CMAKE_BUILD_TYPE:' "$BUILD_DIR/CMakeCache.txt" 2>/dev/null | cut -d= -f2)
  zstd_version=$(jq -r -s '.[0].zstd_version' "$work"/*.json)
  floor=$(jq -r -s '.[0].child_floor_maxrss_kb' "$work"/*.json)
  base_bytes=$(jq -r 'select(.name == "base") | "\(.bytes) bytes, \(.tensors) tensors, \(.weights) weights"' \
    "$work/models.jsonl")
  overrides=""
  for v in LEVELS METHODS MIB FRACTIONS UPDATE SEED APPLY_REPS; do overrides+="$v=${!v} "; done
  {
    echo
    echo "## $(date -u '+%Y-%m-%d %H:%M') UTC — model deltas (bench/delta/run.sh)"
    echo
    echo "- machine: $(nproc) × $cpu, $mem RAM, $(uname -sr); at start: load average" \
      "$load_at_start; scratch on $fs ($DATA_PARENT), files in the page cache (warm)"
    echo "- commit: $commit; bench $(realpath --relative-to="$root" "$bench_src")" \
      "(${type:-unknown build type}), libzstd $zstd_version"
    echo "- command: \`${overrides}bench/delta/run.sh\` ($elapsed s, models generated included)"
    echo "- inputs: Silero VAD v4 → v5 (third_party/models); generated base: $base_bytes" \
      "(chain of MatMul+Add+Relu, N(0, 1/fan_in) weights), seed $SEED; \`layers-P\`: whole" \
      "tensors holding P % of the weights updated, \`scattered-P\`: P % of all weights picked" \
      "one by one; each update w += N(0, ($UPDATE·std of the tensor)²)"
    echo "- each step in a forked child, single-threaded: make = (planes +) make_delta; apply =" \
      "(planes of the base +) apply_delta (fsync, sha256) (+ inverse planes, fsync); apply is" \
      "the median of $APPLY_REPS runs; peak RSS is the child's ru_maxrss, which includes" \
      "file-backed pages of the mapped inputs and output and the bench's own ${floor} KB;" \
      "(anon) is the sampled peak RssAnon. Every applied output's sha256 equals the target's."
    echo "- target (issue 18): ≤ 15 % of the full bytes on the wire for 10 % of the weights changed"
    echo
    echo "Delta as % of the full file, plain patch-from vs byte-grouped (ZipNN-style planes):"
    echo
    echo "$side"
    echo
    echo "Every measurement:"
    echo
    echo "$full_table"
  } >>"$results_file"
  log "appended to $results_file"
fi
