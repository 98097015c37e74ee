#!/usr/bin/env bash
# The HTTP/1 socket fuzzer's campaign (not CI): proxy/tests/http_fuzz.rs against a running edge
# for MINUTES minutes (default 10) from SEED (default: a random one), then one line in
# fuzz/http-campaign.tsv: date, seed, seconds, cases, answers by status, requests that reached
# the runtime, failures. A failure names its seed and case; replay it alone with
#   HTTP_FUZZ_SEED=<seed> HTTP_FUZZ_CASE=<case> cargo test -p moltghost --test http_fuzz -- --nocapture
set -euo pipefail
cd "$(dirname "$0")/.."
minutes="${MINUTES:-10}"
seed="${SEED:-$RANDOM$RANDOM}"
cargo build -q --workspace --bins
log=$(mktemp)
status=0
HTTP_FUZZ_SEED="$seed" HTTP_FUZZ_SECONDS=$((minutes * 60)) \
  cargo test -q -p moltghost --test http_fuzz -- --nocapture >"$log" 2>&1 || status=$?
summary=$(grep -m1 '^http fuzz:' "$log" || true)
echo "${summary:-no summary: see $log}"
results=fuzz/http-campaign.tsv
[ -f "$results" ] || printf 'date\tseed\tseconds\tcases\tstatuses\treached_runtime\tresult\n' >"$results"
cases=$(sed -nE 's/.* ([0-9]+) cases,.*/\1/p' <<<"$summary")
statuses=$(sed -nE 's/.*status (\{[^}]*\}).*/\1/p' <<<"$summary")
reached=$(sed -nE 's/.* ([0-9]+) reached the runtime.*/\1/p' <<<"$summary")
if [ "$status" -eq 0 ]; then result=clean; else
  result="FAILED: $(grep -m1 -E '^case |panicked' "$log" | cut -c1-300)"
  tail -40 "$log" >&2
fi
printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$(date -u +%FT%TZ)" "$seed" $((minutes * 60)) \
  "${cases:-?}" "${statuses:-?}" "${reached:-?}" "$result" >>"$results"
exit "$status"
