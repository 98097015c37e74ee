#!/usr/bin/env bash
# The WireGuard upstream measured: the same edge reaching the same runtime directly (plain
# HTTP) and through its tunnel and the pod sidecar, interleaved in one `loadtest` run, then the
# tunnel on its own against kernel loopback TCP (proxy/examples/tunnel_bench.rs). Writes
# loadtest/results/tunnel/ (JSON, tables) and regenerates BENCHMARKS.md.
#
#   loadtest/tunnel.sh            # about 3 minutes
#   QUICK=1 loadtest/tunnel.sh    # a smoke check
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=$ROOT/loadtest/results/tunnel
WORK=$(mktemp -d /tmp/moltghost-tunnel.XXXX)
DUR=${DURATION:-15s}; SECS=${SECONDS_EACH:-5}
[ "${QUICK:-0}" = 1 ] && DUR=3s && SECS=1
RT_PORT=19200 EDGE_PORT=18180 ADMIN_PORT=19902 POD_PORT=51900
. loadtest/bench-lib.sh

echo "== building (release)"
./scripts/setup.sh
cargo build --release --workspace --bins -q
cargo build --release -q --example tunnel_bench

echo "== starting the runtime, the edge and the pod sidecar in $WORK"
"$BIN/agent-runtime" --listen 127.0.0.1:$RT_PORT > "$WORK/runtime.log" 2>&1 & PIDS+=($!)
bench_edge_conf $EDGE_PORT $ADMIN_PORT edge plain "http://127.0.0.1:$RT_PORT" > "$WORK/edge.toml"
"$BIN/moltghost-proxy" --config "$WORK/edge.toml" > "$WORK/edge.log" 2>&1 & EDGE_PID=$!; PIDS+=($EDGE_PID)
wait_port $RT_PORT; wait_port $EDGE_PORT; wait_port $ADMIN_PORT
export MOLTGHOST_ADMIN_URL=http://127.0.0.1:$ADMIN_PORT
MOLTGHOST_ADMIN_TOKEN=$("$BIN/moltghost" --data-dir "$WORK/edge" token --ttl 2h); export MOLTGHOST_ADMIN_TOKEN
EDGE_KEY=$("$BIN/moltghost" status plain --json >/dev/null; curl -s -H "authorization: Bearer $MOLTGHOST_ADMIN_TOKEN" "$MOLTGHOST_ADMIN_URL/v1/admin/status" | python3 -c 'import sys,json; print(json.load(sys.stdin)["tunnel"]["public_key"])')
POD_KEY=$("$BIN/moltghost-pod" --state-dir "$WORK/pod" keygen)
"$BIN/moltghost-pod" --state-dir "$WORK/pod" run --listen 127.0.0.1:$POD_PORT --edge-key "$EDGE_KEY" \
  --upstream http://127.0.0.1:$RT_PORT --jwks "$MOLTGHOST_ADMIN_URL/.well-known/jwks.json" > "$WORK/pod.log" 2>&1 & POD_PID=$!; PIDS+=($POD_PID)
for _ in $(seq 1 100); do grep -q "pod sidecar up" "$WORK/pod.log" && break; sleep 0.1; done
"$BIN/moltghost" agent create pod --id pod --pod "$POD_KEY@127.0.0.1:$POD_PORT" > /dev/null
KEY=$("$BIN/moltghost" auth create-key --name bench)

rm -rf "$OUT"; mkdir -p "$OUT"
LT=("$BIN/loadtest" --quiet --markdown "$OUT/tables.md"
    --target edge-plain=http://plain.agent.localhost:$EDGE_PORT --key edge-plain=$KEY --pid edge-plain=$EDGE_PID
    --target edge-pod=http://pod.agent.localhost:$EDGE_PORT --key edge-pod=$KEY --pid edge-pod=$EDGE_PID)
echo "== chat through the edge: plain HTTP upstream vs the tunnel and sidecar"
"${LT[@]}" --scenario chat --rates 500,2000 --duration "$DUR" --json "$OUT/chat.json"
echo "== token streams"
"${LT[@]}" --scenario sse --tokens 64 --interval-ms 20 --rate 100 --duration "$DUR" --json "$OUT/sse.json"
echo "== the tunnel alone vs kernel loopback TCP, and at 1% loss"
"$BIN/examples/tunnel_bench" --seconds "$SECS" --loss 0.01 --json "$OUT/tunnel_bench.json" | tee "$OUT/tunnel_bench.txt"
python3 loadtest/benchmarks_md.py "$ROOT/loadtest/results" > BENCHMARKS.md
echo "== written to $OUT and BENCHMARKS.md"
