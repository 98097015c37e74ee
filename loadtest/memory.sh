#!/usr/bin/env bash
# Memory per held stream and memory given back (issue 17, item 6): one edge with every policy on,
# its resident memory idle, with 1,000 / 5,000 / 9,000 streams held after their first token
# (10,000 would need more than the 20,000 file descriptors a process may have here),
# and 10, 30 and 60 s after the last of them closed. Memory per stream is counted from the
# edge's resident memory just before each round, once what the previous round freed has gone
# back to the system.
#
#   loadtest/memory.sh                    # builds in release mode first
#   BIN=/some/release loadtest/memory.sh  # the binaries in BIN (another build to compare)
#   HEAPTRACK=1 loadtest/memory.sh        # the edge under heaptrack: where the bytes go
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=$(mktemp -d /tmp/moltghost-memory.XXXX)
STREAMS=${STREAMS:-1000,5000,9000}
RT_PORT=19300 EDGE_PORT=18380 ADMIN_PORT=19380
. loadtest/bench-lib.sh
if [ "$BIN" = "${CARGO_TARGET_DIR:-$ROOT/target}/release" ]; then
  echo "== building (release)"
  cargo build --release --workspace --bins -q
fi

rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
"$BIN/agent-runtime" --listen 127.0.0.1:$RT_PORT > "$WORK/runtime.log" 2>&1 & PIDS+=($!)
bench_edge_conf $EDGE_PORT $ADMIN_PORT edge bench "http://127.0.0.1:$RT_PORT" > "$WORK/edge.toml"
WRAP=(); [ -n "${HEAPTRACK:-}" ] && WRAP=(heaptrack -o "$WORK/heaptrack")
"${WRAP[@]}" "$BIN/moltghost-proxy" --config "$WORK/edge.toml" > "$WORK/edge.log" 2>&1 & PIDS+=($!)
wait_port $RT_PORT; wait_port $EDGE_PORT; wait_port $ADMIN_PORT
EDGE_PID=$(pgrep -n -f "moltghost-proxy --config $WORK/edge.toml")
KEY=$(bench_key $ADMIN_PORT edge bench)
echo "edge idle: $(rss_kib "$EDGE_PID") KiB"
# Each count is its own round, started once the edge's memory stopped falling after the
# previous one: a round measured while the last one's freed pages were still resident would
# count them as its baseline and report too little per stream (the allocator hands them out
# again before it asks the system for more).
settle() {
  local before now
  now=$(rss_kib "$EDGE_PID")
  for _ in $(seq 1 12); do
    sleep 5; before=$now; now=$(rss_kib "$EDGE_PID")
    [ $(( (before - now) * 50 )) -le "$before" ] && break   # fell less than 2% in 5 s
  done
}
for n in ${STREAMS//,/ }; do
  settle
  echo "edge before $n streams: $(rss_kib "$EDGE_PID") KiB"
  "$BIN/loadtest" --quiet --target edge=http://bench.agent.localhost:$EDGE_PORT --key edge="$KEY" \
    --pid edge="$EDGE_PID" --scenario idle --streams "$n" --hold 2s
done
echo "edge after the streams closed: $(rss_kib "$EDGE_PID") KiB"
for t in 10 30 60; do
  sleep $(( t - ${last:-0} )); last=$t
  echo "edge ${t}s later: $(rss_kib "$EDGE_PID") KiB"
done
if [ -n "${HEAPTRACK:-}" ]; then
  kill -INT "$EDGE_PID"; sleep 3
  heaptrack_print -f "$WORK"/heaptrack*.zst --print-peaks 1 --peak-limit 25 --print-allocators 0 --print-temporary 0 --print-leaks 0 > "$WORK/heap.txt" 2>/dev/null || true
  echo "== heap profile: $WORK/heap.txt"
fi
