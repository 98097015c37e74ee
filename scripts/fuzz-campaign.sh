#!/usr/bin/env bash
# The fuzz campaign (not CI): every target for MINUTES minutes (default 10), JOBS targets at a
# time (default 2), each growing a copy of its committed corpus. At the end each grown corpus is
# minimised back into fuzz/corpus/<target> (libFuzzer's -merge), and one line per target goes to
# fuzz/campaign.tsv: date, target, seconds, executions, exec/s, coverage (cov, ft), corpus size
# before and after (a grown corpus over CORPUS_MAX_KB, default 1 MiB, is not kept), peak RSS,
# result. A crash stops nothing else: its input is in
# fuzz/artifacts/<target> and the line says FOUND.
#
#   scripts/fuzz-campaign.sh               # every target, 10 minutes each
#   MINUTES=1 scripts/fuzz-campaign.sh sse_scanner request_head
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
export RUSTC_BOOTSTRAP=1
minutes="${MINUTES:-10}"
jobs="${JOBS:-2}"
targets=("$@")
if [ "${#targets[@]}" -eq 0 ]; then
  mapfile -t targets < <(cargo fuzz list)
fi
# Build every target once, before the clock starts.
for t in "${targets[@]}"; do
  cargo fuzz build --sanitizer none "$t" >/dev/null
done
results=campaign.tsv
[ -f "$results" ] || printf 'date\ttarget\tseconds\texecs\texecs_per_s\tcov\tft\tcorpus_before\tcorpus_after\tpeak_rss_mb\tresult\n' > "$results"

run_one() {
  local t="$1" minutes="$2"
  local work log before after status=0 note=""
  work=$(mktemp -d)
  log="$work.log"
  mkdir -p "corpus/$t"
  cp -r "corpus/$t/." "$work/"
  before=$(find "corpus/$t" -type f | wc -l)
  cargo fuzz run --sanitizer none "$t" "$work" -- -max_total_time=$((minutes * 60)) \
    -print_final_stats=1 -timeout=10 -rss_limit_mb=2048 > "$log" 2>&1 || status=$?
  # Keep what is new and adds coverage, minimised, where the corpus stays small enough for the
  # repository (CORPUS_MAX_KB, default 1024); a larger one is left out and said so.
  cargo fuzz run --sanitizer none "$t" "corpus/$t" "$work" -- -merge=1 >/dev/null 2>&1 || true
  if [ "$(du -sk --apparent-size "corpus/$t" | cut -f1)" -gt "${CORPUS_MAX_KB:-1024}" ]; then
    git clean -qf -- "corpus/$t"
    note=" (grown corpus over ${CORPUS_MAX_KB:-1024} KiB, not kept)"
  fi
  after=$(find "corpus/$t" -type f | wc -l)
  local execs eps rss cov ft
  execs=$(grep -oE 'stat::number_of_executed_units: +[0-9]+' "$log" | awk '{print $2}' | tail -1)
  eps=$(grep -oE 'stat::average_exec_per_sec: +[0-9]+' "$log" | awk '{print $2}' | tail -1)
  rss=$(grep -oE 'stat::peak_rss_mb: +[0-9]+' "$log" | awk '{print $2}' | tail -1)
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | awk '{print $2}')
  ft=$(grep -o 'ft: [0-9]*' "$log" | tail -1 | awk '{print $2}')
  local result="clean${note:-}"
  if [ "$status" -ne 0 ]; then
    result="FOUND (exit $status, see fuzz/artifacts/$t)"
    tail -30 "$log" >&2
  fi
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$(date -u +%FT%TZ)" "$t" $((minutes * 60)) \
    "${execs:-?}" "${eps:-?}" "${cov:-?}" "${ft:-?}" "$before" "$after" "${rss:-?}" "$result" >> "$results"
  echo "fuzz campaign: $t: $result, ${execs:-?} runs, cov ${cov:-?}, corpus $before -> $after"
  rm -rf "$work" "$log"
}
export -f run_one
export results
printf '%s\n' "${targets[@]}" | xargs -P "$jobs" -I{} bash -c "run_one {} $minutes"
echo "fuzz campaign: results in fuzz/$results"
