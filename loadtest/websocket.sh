#!/usr/bin/env bash
# What the WebSocket adds over SSE: one edge and its runtime, streamed answers asked three ways
# in one interleaved `loadtest` run: the runtime direct (OpenAI SSE, the floor), the edge's
# native SSE route (`/v1/chat`, the baseline the WebSocket is compared with: the same
# translation), and the edge's WebSocket (`/ws`, one message per request on kept sockets).
# Writes loadtest/results/websocket/ and regenerates BENCHMARKS.md.
#
#   loadtest/websocket.sh            # about a minute
#   QUICK=1 loadtest/websocket.sh    # a smoke check
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=$ROOT/loadtest/results/websocket
WORK=$(mktemp -d /tmp/moltghost-ws.XXXX)
DUR=${DURATION:-15s}
[ "${QUICK:-0}" = 1 ] && DUR=3s
RT_PORT=19400 EDGE_PORT=18380 ADMIN=19905
. loadtest/bench-lib.sh

echo "== building (release)"
./scripts/setup.sh
cargo build --release --workspace --bins -q

"$BIN/agent-runtime" --listen 127.0.0.1:$RT_PORT > "$WORK/runtime.log" 2>&1 & PIDS+=($!)
bench_edge_conf $EDGE_PORT $ADMIN edge bench "http://127.0.0.1:$RT_PORT" > "$WORK/edge.toml"
"$BIN/moltghost-proxy" --config "$WORK/edge.toml" > "$WORK/edge.log" 2>&1 & EDGE_PID=$!; PIDS+=($EDGE_PID)
wait_port $RT_PORT; wait_port $EDGE_PORT; wait_port $ADMIN
KEY=$(bench_key $ADMIN edge bench)

rm -rf "$OUT"; mkdir -p "$OUT"
LT=("$BIN/loadtest" --quiet --markdown "$OUT/tables.md"
    --target direct=http://127.0.0.1:$RT_PORT
    --target sse=http://bench.agent.localhost:$EDGE_PORT --native sse --key sse=$KEY --pid sse=$EDGE_PID
    --target ws=ws://bench.agent.localhost:$EDGE_PORT --key ws=$KEY --pid ws=$EDGE_PID)
echo "== token streams: native SSE vs the WebSocket, 32 tokens 20 ms apart"
"${LT[@]}" --scenario sse --tokens 32 --interval-ms 20 --rates 50,200 --duration "$DUR" --json "$OUT/sse.json"
echo "== short answers, 16 tokens at once: the per-message cost"
"${LT[@]}" --scenario sse --tokens 16 --interval-ms 0 --rates 200,1000 --duration "$DUR" --json "$OUT/burst.json"
python3 loadtest/benchmarks_md.py "$ROOT/loadtest/results" > BENCHMARKS.md
echo "== written to $OUT and BENCHMARKS.md"
