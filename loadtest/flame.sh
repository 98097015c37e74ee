#!/usr/bin/env bash
# Flame graphs of the edge at saturation (issue 17, item 10): one edge with every policy on
# (key, rate, stream cap, quota reservation and settlement, journal), driven closed loop by 16
# clients, profiled with `perf record --call-graph dwarf` (release builds keep no frame
# pointers), folded and drawn with inferno (installed by `cargo install inferno` when missing).
# One SVG per scenario: `chat` (one small answer per request) and `sse` (64 tokens streamed
# back to back).
#
#   loadtest/flame.sh                          # builds in release mode first
#   BIN=/some/release OUT=/tmp/flame loadtest/flame.sh
#   PROFILE_SECONDS=20 loadtest/flame.sh       # longer samples (default 10 s per scenario)
#
# Reading one: width is CPU time on the edge's threads; `moltghost::` frames are the edge's
# own, `pingora_` the framework's, `[k]` frames the kernel (mostly socket I/O).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=$(mktemp -d /tmp/moltghost-flame.XXXX)
OUT=${OUT:-loadtest/results/flame}
SECS=${PROFILE_SECONDS:-10}
RT_PORT=19530
. loadtest/bench-lib.sh

if [ "$BIN" = "${CARGO_TARGET_DIR:-$ROOT/target}/release" ]; then
  echo "== building (release)"
  cargo build --release --workspace --bins -q
fi
command -v inferno-flamegraph > /dev/null || cargo install inferno --locked -q
mkdir -p "$OUT"

"$BIN/agent-runtime" --listen 127.0.0.1:$RT_PORT > "$WORK/runtime.log" 2>&1 & PIDS+=($!)
wait_port $RT_PORT
TARGETS=()
bench_edge edge 18520 19520 ''
EDGE_PID=${PIDS[-1]}

for scenario in chat sse; do
  echo "== $scenario: 16 clients, $SECS s profiled"
  extra=(); [ "$scenario" = sse ] && extra=(--tokens 64 --interval-ms 0)
  "$BIN/loadtest" --quiet "${TARGETS[@]}" --scenario "$scenario" "${extra[@]}" --clients 16 \
    --duration $((SECS + 4))s --markdown "$WORK/$scenario.md" & load=$!
  sleep 2
  perf record -q -F 499 --call-graph dwarf,16384 -p "$EDGE_PID" -o "$WORK/$scenario.data" \
    -- sleep "$SECS" 2> /dev/null
  wait $load
  grep '^| edge' "$WORK/$scenario.md" || true
  perf script -i "$WORK/$scenario.data" 2> /dev/null | inferno-collapse-perf > "$WORK/$scenario.folded"
  inferno-flamegraph --title "edge, every policy, $scenario at 16 clients ($(date -u +%F))" \
    --width 1600 --minwidth 0.2 < "$WORK/$scenario.folded" > "$OUT/edge-$scenario.svg"
  echo "   $OUT/edge-$scenario.svg"
done
echo "(profiles in $WORK)"
