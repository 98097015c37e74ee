#!/usr/bin/env bash
# What each WASM plugin adds to a request (issue 16 and 17's per-plugin budget: at most 20 µs
# at p99): the same release edge with no plugin, with one SDK plugin (the allow-list: a Rust SDK
# module, which exports every callback), and with the three example plugins (allow-list, tool
# policy, redaction), all fed one runtime and measured closed loop, one client and sixteen,
# in interleaved rounds. A plugin's cost is the difference of added latency between targets;
# the time spent inside plugin calls per request (every phase, context creation and end) is
# also read from each edge's access log (`plugin_us`, and `plugin_us_each` for each plugin)
# and given as percentiles.
#
#   loadtest/plugin_tail.sh                 # 20 s per target and client count
#   DURATION=40s CLIENTS=1 loadtest/plugin_tail.sh
#   BIN=/some/release loadtest/plugin_tail.sh   # the binaries in BIN (another build)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=$(mktemp -d /tmp/moltghost-plugin-tail.XXXX)
DUR=${DURATION:-20s}
RT_PORT=19210
. loadtest/bench-lib.sh

if [ "$BIN" = "${CARGO_TARGET_DIR:-$ROOT/target}/release" ]; then
  echo "== building (release)"
  cargo build --release --workspace --bins -q
fi
PLUGIN_TARGET=${CARGO_TARGET_DIR:-$ROOT/target}/plugins
(cd plugins && CARGO_TARGET_DIR=$PLUGIN_TARGET cargo build --release --target wasm32-wasip1 -q)
WASM=$PLUGIN_TARGET/wasm32-wasip1/release
ALLOW="[[plugins]]\nname = \"allowlist\"\npath = \"$WASM/allowlist.wasm\"\nconfig = { addresses = [\"127.0.0.0/8\"] }\n"
TOOLS="[[plugins]]\nname = \"tool-policy\"\npath = \"$WASM/tool_policy.wasm\"\nconfig = { deny = { \"*\" = [\"shell\"] } }\n"
REDACT="[[plugins]]\nname = \"redact\"\npath = \"$WASM/redact.wasm\"\n"

"$BIN/agent-runtime" --listen 127.0.0.1:$RT_PORT > "$WORK/runtime.log" 2>&1 & PIDS+=($!)
wait_port $RT_PORT
TARGETS=(--target direct=http://127.0.0.1:$RT_PORT)
bench_edge edge 18290 19290 ''
bench_edge edge-1plugin 18291 19291 "$ALLOW"
bench_edge edge-3plugins 18292 19292 "$ALLOW$TOOLS$REDACT"

"$BIN/loadtest" --quiet "${TARGETS[@]}" --scenario chat --clients "${CLIENTS:-1,16}" \
  --duration "$DUR" --round 1s --json "$WORK/plugin-tail.json" --markdown "$WORK/plugin-tail.md"
cat "$WORK/plugin-tail.md"
echo "Time inside plugin calls per request (access log plugin_us, and plugin_us_each for each plugin, µs):"
for name in edge-1plugin edge-3plugins; do
  python3 - "$WORK/$name.log" "$name" <<'PY'
import json, sys
total, each = [], {}
for line in open(sys.argv[1]):
    fields = json.loads(line).get("fields", {})
    if "plugin_us" not in fields:
        continue
    total.append(fields["plugin_us"])
    for part in fields.get("plugin_us_each", "").split(","):
        if part:
            name, us = part.rsplit(":", 1)
            each.setdefault(name, []).append(int(us))
def show(label, v):
    v.sort()
    q = lambda p: v[min(len(v) - 1, int(len(v) * p))]
    print(f"  {label}: {len(v)} requests, p50 {q(.5)}, p90 {q(.9)}, p99 {q(.99)}, p99.9 {q(.999)}")
show(sys.argv[2], total)
for name, v in each.items():
    show(f"  {name}", v)
PY
done
echo "(results in $WORK)"
