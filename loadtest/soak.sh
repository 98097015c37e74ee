#!/usr/bin/env bash
# The soak: one release edge in front of the reference runtime, driven for MINUTES minutes
# (default 30) at half of this machine's saturation rate, with three kinds of traffic at once,
# each on a key of its own: small chat completions (HTTP, kept-alive), native token streams
# (SSE, 32 tokens 20 ms apart) and the same streams over WebSockets. Every minute it writes a
# row: each kind's requests, errors and latency, and the edge's RSS, open file descriptors and
# CPU. At the end it checks that there were no errors and that the usage ledger counts exactly
# the requests the runtime answered (its /mock/stats), none estimated. Figures go to loadtest/results/soak/ and
# into RELIABILITY.md by hand.
#
#   loadtest/soak.sh                    # 30 minutes (plus a 30 s saturation probe first)
#   MINUTES=2 loadtest/soak.sh          # a short check
#   RATE=3000 loadtest/soak.sh          # skip the probe: this many chats a second
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=$ROOT/loadtest/results/soak
WORK=$(mktemp -d /tmp/moltghost-soak.XXXX)
MINUTES=${MINUTES:-30}
STREAMS=${STREAMS:-50}   # SSE streams a second, and as many WebSocket messages
RT_PORT=19500 EDGE_PORT=18480 ADMIN=19915
. loadtest/bench-lib.sh

echo "== building (release)"
./scripts/setup.sh
cargo build --release --workspace --bins -q

"$BIN/agent-runtime" --listen 127.0.0.1:$RT_PORT > "$WORK/runtime.log" 2>&1 & PIDS+=($!)
bench_edge_conf $EDGE_PORT $ADMIN edge bench "http://127.0.0.1:$RT_PORT" > "$WORK/edge.toml"
"$BIN/moltghost-proxy" --config "$WORK/edge.toml" > "$WORK/edge.log" 2>&1 & EDGE=$!; PIDS+=($EDGE)
wait_port $RT_PORT; wait_port $EDGE_PORT; wait_port $ADMIN
key() {
  MOLTGHOST_ADMIN_URL=http://127.0.0.1:$ADMIN MOLTGHOST_ADMIN_TOKEN=$("$BIN/moltghost" --data-dir "$WORK/edge" token --ttl 4h) \
    "$BIN/moltghost" auth create-key --agent bench --name "$1"
}
K_CHAT=$(key chat) K_SSE=$(key sse) K_WS=$(key ws) K_PROBE=$(key probe)
URL=http://bench.agent.localhost:$EDGE_PORT
LT=("$BIN/loadtest" --quiet --warmup 1ms)

rm -rf "$OUT"; mkdir -p "$OUT/minutes"
if [ -z "${RATE:-}" ]; then
  echo "== saturation probe (chat, open loop, 5 s per rate)"
  "${LT[@]}" --target edge=$URL --key edge=$K_PROBE --scenario chat \
    --rates 2000,4000,8000,12000,16000 --duration 5s --json "$OUT/probe.json"
  SAT=$(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(int(max(t["achieved_rps"] for r in d["runs"] for t in r["targets"] if sum(t["errors"].values())+t["dropped"] <= 0.01*t["sent"])))' "$OUT/probe.json")
  RATE=$((SAT * 2 / 5))  # chat takes 0.4 of saturation; the streams take the rest of the half
  echo "saturation ~$SAT chats/s; soaking at $RATE chats/s + $STREAMS SSE streams/s + $STREAMS WebSocket messages/s"
fi

cpu_ticks() { awk '{print $14 + $15}' "/proc/$EDGE/stat"; }
echo "minute,chat_ok,chat_err,chat_p50_us,chat_p99_us,sse_ok,sse_err,sse_ttft_p99_us,ws_ok,ws_err,ws_ttft_p99_us,rss_mib,fds,edge_cpu_pct" > "$OUT/minutes.csv"
for m in $(seq 1 "$MINUTES"); do
  t0=$(cpu_ticks)
  "${LT[@]}" --target chat=$URL --key chat=$K_CHAT --scenario chat --rate "$RATE" --duration 60s --json "$OUT/minutes/chat-$m.json" &
  a=$!
  "${LT[@]}" --target sse=$URL --native sse --key sse=$K_SSE --scenario sse --tokens 32 --interval-ms 20 --rate "$STREAMS" --duration 60s --json "$OUT/minutes/sse-$m.json" &
  b=$!
  "${LT[@]}" --target ws=ws://bench.agent.localhost:$EDGE_PORT --key ws=$K_WS --scenario sse --tokens 32 --interval-ms 20 --rate "$STREAMS" --duration 60s --json "$OUT/minutes/ws-$m.json" &
  c=$!
  wait $a $b $c
  t1=$(cpu_ticks)
  rss=$(awk '/VmRSS/ {print int($2/1024)}' "/proc/$EDGE/status")
  fds=$(ls "/proc/$EDGE/fd" | wc -l)
  python3 - "$OUT/minutes" "$m" "$rss" "$fds" $((t1 - t0)) >> "$OUT/minutes.csv" <<'PY'
import json, sys
d, m, rss, fds, ticks = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
row = [m]
for kind in ("chat", "sse", "ws"):
    t = json.load(open(f"{d}/{kind}-{m}.json"))["runs"][0]["targets"][0]
    err = sum(t["errors"].values()) + t["dropped"]
    row += [t["ok"], err]
    row += [t["latency_us"]["p50"], t["latency_us"]["p99"]] if kind == "chat" else [t["ttft_us"]["p99"]]
row += [rss, fds, round(ticks / 60.0, 1)]  # USER_HZ 100: ticks per 60 s = % of one core
print(",".join(map(str, row)))
PY
  tail -1 "$OUT/minutes.csv"
done

echo "== the ledger against what the clients completed"
sleep 3  # one journal shipping interval and then some
MOLTGHOST_ADMIN_URL=http://127.0.0.1:$ADMIN MOLTGHOST_ADMIN_TOKEN=$("$BIN/moltghost" --data-dir "$WORK/edge" token --ttl 1h) \
  "$BIN/moltghost" usage --by key --json > "$OUT/ledger.json"
MOLTGHOST_ADMIN_URL=http://127.0.0.1:$ADMIN MOLTGHOST_ADMIN_TOKEN=$("$BIN/moltghost" --data-dir "$WORK/edge" token --ttl 1h) \
  "$BIN/moltghost" auth list-keys --json > "$OUT/keys.json"
curl -s http://127.0.0.1:$RT_PORT/mock/stats > "$OUT/runtime.json"
cp "$WORK/edge.toml" "$OUT/edge.toml"
python3 - "$OUT" <<'PY'
import csv, json, sys
out = sys.argv[1]
rows = list(csv.DictReader(open(f"{out}/minutes.csv")))
ledger = json.load(open(f"{out}/ledger.json"))["usage"]
keys = {k["name"]: k["id"] for k in json.load(open(f"{out}/keys.json"))["keys"]}
answered = json.load(open(f"{out}/runtime.json"))["requests"]
errors = 0
for kind in ("chat", "sse", "ws"):
    done = sum(int(r[f"{kind}_ok"]) for r in rows)
    err = sum(int(r[f"{kind}_err"]) for r in rows)
    errors += err
    line = next((l for l in ledger if l["group"] == keys[kind]), {})
    print(f"{kind}: {done} completed in the measured minutes, {err} errors; ledger "
          f"{line.get('requests', 0)} requests, {line.get('total_tokens', 0)} tokens")
billed = sum(l["requests"] for l in ledger)
estimated = sum(l.get("estimated_requests", 0) for l in ledger)
ok = errors == 0 and billed == answered and estimated == 0
print(f"the runtime answered {answered} requests; the ledger bills {billed}, {estimated} estimated: "
      f"{'exact' if billed == answered and estimated == 0 else 'MISMATCH'}; errors {errors}")
rss = [int(r["rss_mib"]) for r in rows]
fds = [int(r["fds"]) for r in rows]
print(f"edge RSS {rss[0]} -> {rss[-1]} MiB (max {max(rss)}), fds {fds[0]} -> {fds[-1]} (max {max(fds)})")
sys.exit(0 if ok else 1)
PY
echo "== results in $OUT"
