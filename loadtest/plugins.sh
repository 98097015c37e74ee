#!/usr/bin/env bash
# What WASM policy plugins cost: the same runtime reached directly, through an edge without
# plugins, and through an edge running the three example plugins (allow-list, tool policy,
# redaction), interleaved in one `loadtest` run. Writes loadtest/results/plugins/ and
# regenerates BENCHMARKS.md.
#
#   loadtest/plugins.sh            # about two minutes
#   QUICK=1 loadtest/plugins.sh    # a smoke check
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=$ROOT/loadtest/results/plugins
WORK=$(mktemp -d /tmp/moltghost-plugins.XXXX)
DUR=${DURATION:-15s}
[ "${QUICK:-0}" = 1 ] && DUR=3s
RT_PORT=19300 BARE_PORT=18280 BARE_ADMIN=19903 PLUG_PORT=18281 PLUG_ADMIN=19904
. loadtest/bench-lib.sh

echo "== building (release) and the example plugins (wasm32-wasip1)"
./scripts/setup.sh
cargo build --release --workspace --bins -q
PLUGIN_TARGET=${CARGO_TARGET_DIR:-$ROOT/target}/plugins
(cd plugins && CARGO_TARGET_DIR=$PLUGIN_TARGET cargo build --release --target wasm32-wasip1 -q)
WASM=$PLUGIN_TARGET/wasm32-wasip1/release

"$BIN/agent-runtime" --listen 127.0.0.1:$RT_PORT > "$WORK/runtime.log" 2>&1 & PIDS+=($!)
bench_edge_conf $BARE_PORT $BARE_ADMIN bare bench "http://127.0.0.1:$RT_PORT" > "$WORK/bare.toml"
{ bench_edge_conf $PLUG_PORT $PLUG_ADMIN plug bench "http://127.0.0.1:$RT_PORT"; cat <<TOML
[[plugins]]
name = "allowlist"
path = "$WASM/allowlist.wasm"
config = { addresses = ["127.0.0.0/8"] }
[[plugins]]
name = "tool-policy"
path = "$WASM/tool_policy.wasm"
config = { deny = { "*" = ["shell"] } }
[[plugins]]
name = "redact"
path = "$WASM/redact.wasm"
TOML
} > "$WORK/plug.toml"
"$BIN/moltghost-proxy" --config "$WORK/bare.toml" > "$WORK/bare.log" 2>&1 & BARE_PID=$!; PIDS+=($BARE_PID)
"$BIN/moltghost-proxy" --config "$WORK/plug.toml" > "$WORK/plug.log" 2>&1 & PLUG_PID=$!; PIDS+=($PLUG_PID)
wait_port $RT_PORT; wait_port $BARE_PORT; wait_port $PLUG_PORT; wait_port $BARE_ADMIN; wait_port $PLUG_ADMIN
BARE_KEY=$(bench_key $BARE_ADMIN bare bench); PLUG_KEY=$(bench_key $PLUG_ADMIN plug bench)

rm -rf "$OUT"; mkdir -p "$OUT"
LT=("$BIN/loadtest" --quiet --markdown "$OUT/tables.md"
    --target direct=http://127.0.0.1:$RT_PORT
    --target edge=http://bench.agent.localhost:$BARE_PORT --key edge=$BARE_KEY --pid edge=$BARE_PID
    --target edge-plugins=http://bench.agent.localhost:$PLUG_PORT --key edge-plugins=$PLUG_KEY --pid edge-plugins=$PLUG_PID)
echo "== chat: no plugins vs three plugins (every request passes all three, answers are redacted)"
"${LT[@]}" --scenario chat --rates 500,2000 --duration "$DUR" --json "$OUT/chat.json"
echo "== token streams (each event passes the redaction plugin)"
"${LT[@]}" --scenario sse --tokens 64 --interval-ms 20 --rate 100 --duration "$DUR" --json "$OUT/sse.json"
python3 loadtest/benchmarks_md.py "$ROOT/loadtest/results" > BENCHMARKS.md
echo "== written to $OUT and BENCHMARKS.md"
