#!/usr/bin/env bash
# The whole comparison in one command: the reference runtime direct, the MoltGhost edge with
# its full policy chain, Pingora bare (a minimal ProxyHttp, the framework's floor), nginx and
# HAProxy (Debian) and LiteLLM's proxy (PyPI), all fed the same runtime on loopback, measured
# with `loadtest` in interleaved same-run rounds, open loop (arrivals at a rate) and closed loop
# (1 and 16 clients back to back, as wrk). Writes loadtest/results/ (JSON, SVG, tables) and
# regenerates BENCHMARKS.md.
#
#   loadtest/compare.sh                 # everything (about 10 minutes)
#   QUICK=1 loadtest/compare.sh         # short runs, a smoke check
#   SKIP_LITELLM=1 loadtest/compare.sh  # without LiteLLM (no PyPI install)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=$ROOT/loadtest/results
WORK=$(mktemp -d /tmp/moltghost-compare.XXXX)
DUR=${DURATION:-15s}
SSE_DUR=${SSE_DURATION:-30s}
[ "${QUICK:-0}" = 1 ] && DUR=3s && SSE_DUR=6s
RT_PORT=19100 EDGE_PORT=18080 ADMIN_PORT=19901 NGINX_PORT=18081 HAPROXY_PORT=18082 LITELLM_PORT=18083
BARE_PORT=18084 BARE_ADMIN_PORT=19904 PINGORA_PORT=18085
. loadtest/bench-lib.sh
# nginx daemonizes: stop it by its pid file too.
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  [ -f "$WORK/nginx.pid" ] && kill "$(cat "$WORK/nginx.pid")" 2>/dev/null || true
  wait 2>/dev/null || true
}

echo "== building (release)"
./scripts/setup.sh
cargo build --release --workspace --bins -q
cargo build --release -p moltghost --example pingora_bare -q

if ! command -v nginx >/dev/null || ! command -v haproxy >/dev/null; then
  echo "== installing nginx and haproxy (Debian)"
  apt-get install -y -qq --no-install-recommends nginx-light haproxy >/dev/null
fi
if [ "${SKIP_LITELLM:-0}" != 1 ] && ! command -v litellm >/dev/null; then
  echo "== installing litellm[proxy] (PyPI)"
  python3 -m pip install -q 'litellm[proxy]'
fi
fill() { sed -e "s#__DIR__#$WORK#g" -e "s#__RUNTIME__#127.0.0.1:$RT_PORT#g" -e "s#__PORT__#$2#g" "$1"; }

echo "== starting the runtime, the edge and the peers in $WORK"
"$BIN/agent-runtime" --listen 127.0.0.1:$RT_PORT > "$WORK/runtime.log" 2>&1 & PIDS+=($!)
bench_edge_conf $EDGE_PORT $ADMIN_PORT edge bench "http://127.0.0.1:$RT_PORT" > "$WORK/edge.toml"
"$BIN/moltghost-proxy" --config "$WORK/edge.toml" > "$WORK/edge.log" 2>&1 & EDGE_PID=$!; PIDS+=($EDGE_PID)
# The same edge with limits, quotas and metering off (keys still checked): what the policy
# chain costs, same run.
sed -e "s#$EDGE_PORT#$BARE_PORT#" -e "s#$ADMIN_PORT#$BARE_ADMIN_PORT#" -e "s#$WORK/edge\"#$WORK/bare\"#" \
    "$WORK/edge.toml" > "$WORK/bare.toml"
printf '[limits]\nenabled = false\n' >> "$WORK/bare.toml"
"$BIN/moltghost-proxy" --config "$WORK/bare.toml" > "$WORK/bare.log" 2>&1 & BARE_PID=$!; PIDS+=($BARE_PID)
# Pingora itself: a ProxyHttp that only forwards, with the edge's thread count (2 by default).
"$BIN/examples/pingora_bare" --listen 127.0.0.1:$PINGORA_PORT --upstream 127.0.0.1:$RT_PORT --threads 2 \
  > "$WORK/pingora.log" 2>&1 & PINGORA_PID=$!; PIDS+=($PINGORA_PID)
mkdir -p "$WORK/nginx-body" "$WORK/nginx-proxy"
fill loadtest/peers/nginx.conf $NGINX_PORT > "$WORK/nginx.conf"
nginx -c "$WORK/nginx.conf" -e "$WORK/nginx-error.log"
fill loadtest/peers/haproxy.cfg $HAPROXY_PORT > "$WORK/haproxy.cfg"
haproxy -f "$WORK/haproxy.cfg" -db > "$WORK/haproxy.log" 2>&1 & HAPROXY_PID=$!; PIDS+=($HAPROXY_PID)
wait_port $RT_PORT; wait_port $EDGE_PORT; wait_port $ADMIN_PORT; wait_port $NGINX_PORT; wait_port $HAPROXY_PORT
wait_port $BARE_PORT; wait_port $BARE_ADMIN_PORT; wait_port $PINGORA_PORT
NGINX_PID=$(cat "$WORK/nginx.pid")

export MOLTGHOST_ADMIN_URL=http://127.0.0.1:$ADMIN_PORT
MOLTGHOST_ADMIN_TOKEN=$("$BIN/moltghost" --data-dir "$WORK/edge" token --ttl 2h); export MOLTGHOST_ADMIN_TOKEN
KEY=$("$BIN/moltghost" auth create-key --agent bench --name bench)
EDGE_URL=http://bench.agent.localhost:$EDGE_PORT
BARE_KEY=$(MOLTGHOST_ADMIN_URL=http://127.0.0.1:$BARE_ADMIN_PORT \
  MOLTGHOST_ADMIN_TOKEN=$("$BIN/moltghost" --data-dir "$WORK/bare" token --ttl 2h) \
  "$BIN/moltghost" auth create-key --agent bench --name bench)
BARE_URL=http://bench.agent.localhost:$BARE_PORT

LITELLM=()
if [ "${SKIP_LITELLM:-0}" != 1 ]; then
  fill loadtest/peers/litellm.yaml $LITELLM_PORT > "$WORK/litellm.yaml"
  # LiteLLM fetches a price list from the internet at start unless told to use its local copy.
  LITELLM_LOCAL_MODEL_COST_MAP=True litellm --config "$WORK/litellm.yaml" --host 127.0.0.1 --port $LITELLM_PORT --num_workers 1 > "$WORK/litellm.log" 2>&1 & LITELLM_PID=$!; PIDS+=($LITELLM_PID)
  wait_port $LITELLM_PORT
  LITELLM=(--target litellm=http://127.0.0.1:$LITELLM_PORT --key litellm=sk-bench-0123456789 --pid litellm=$LITELLM_PID)
fi

# loadtest/tunnel.sh's and plugins.sh's results are kept.
# Results of the other scripts (tunnel.sh, plugins.sh, websocket.sh) stay; so do LiteLLM's when
# this run skips it.
keep=(! -name tunnel ! -name plugins ! -name websocket)
[ "${SKIP_LITELLM:-0}" = 1 ] && keep+=(! -name 'litellm-*')
mkdir -p "$OUT"; find "$OUT" -mindepth 1 -maxdepth 1 "${keep[@]}" -exec rm -rf {} +
LT=("$BIN/loadtest" --quiet --svg-dir "$OUT/plots" --markdown "$OUT/tables.md")
FAST=(--target direct=http://127.0.0.1:$RT_PORT
      --target edge=$EDGE_URL --key edge=$KEY --pid edge=$EDGE_PID
      --target edge-bare=$BARE_URL --key edge-bare=$BARE_KEY --pid edge-bare=$BARE_PID
      --target pingora=http://127.0.0.1:$PINGORA_PORT --pid pingora=$PINGORA_PID
      --target nginx=http://127.0.0.1:$NGINX_PORT --pid nginx=$NGINX_PID
      --target haproxy=http://127.0.0.1:$HAPROXY_PORT --pid haproxy=$HAPROXY_PID
      --target direct2=http://127.0.0.1:$RT_PORT)

echo "== chat, one request at a time (20 req/s: each finishes long before the next)"
"${LT[@]}" "${FAST[@]}" --scenario chat --rate 20 --duration "$DUR" --round 1s --json "$OUT/chat-serial.json"
echo "== chat, closed loop: 1 client (latency), 16 clients (saturation throughput)"
"${LT[@]}" "${FAST[@]}" --scenario chat --clients 1,16 --duration "$DUR" --round 1s --json "$OUT/chat-closed.json"
echo "== chat, fixed rates (sweep)"
"${LT[@]}" "${FAST[@]}" --scenario chat --rates 500,1000,2000,3000 --duration "$DUR" --json "$OUT/chat-sweep.json"
echo "== token streams: 64 tokens, 20 ms apart"
"${LT[@]}" "${FAST[@]}" --scenario sse --tokens 64 --interval-ms 20 --rate 40 --duration "$SSE_DUR" --round 1s --json "$OUT/sse.json"
echo "== connection churn"
"${LT[@]}" "${FAST[@]}" --scenario churn --rate 300 --duration "$DUR" --json "$OUT/churn.json"
echo "== held streams (memory per open stream)"
STREAMS=1000,5000,8000; [ "${QUICK:-0}" = 1 ] && STREAMS=500
"${LT[@]}" --target edge=$EDGE_URL --key edge=$KEY --pid edge=$EDGE_PID \
  --target nginx=http://127.0.0.1:$NGINX_PORT --pid nginx=$NGINX_PID \
  --target haproxy=http://127.0.0.1:$HAPROXY_PORT --pid haproxy=$HAPROXY_PID \
  --scenario idle --streams $STREAMS --hold 2s --json "$OUT/held.json"
if [ ${#LITELLM[@]} -gt 0 ]; then
  echo "== LiteLLM against the edge and the runtime (its own run: it is far slower)"
  "${LT[@]}" --target direct=http://127.0.0.1:$RT_PORT --target edge=$EDGE_URL --key edge=$KEY --pid edge=$EDGE_PID "${LITELLM[@]}" \
    --scenario chat --rates 20,50,100 --duration "$DUR" --round 1s --timeout 10s --json "$OUT/litellm-chat.json"
  "${LT[@]}" --target direct=http://127.0.0.1:$RT_PORT --target edge=$EDGE_URL --key edge=$KEY "${LITELLM[@]}" \
    --scenario sse --tokens 64 --interval-ms 20 --rate 10 --duration "$SSE_DUR" --round 1s --json "$OUT/litellm-sse.json"
fi

python3 loadtest/benchmarks_md.py "$OUT" > BENCHMARKS.md
echo "== wrote BENCHMARKS.md and $OUT"
