#!/usr/bin/env bash
# Where the full edge's tail comes from (issue 17, item 3): the same release binary with every
# policy on, with every policy on but the ledger shipped and the fleet synced only once an hour
# (so its background work never runs during the rounds), with limits off, and Pingora bare, all
# fed one runtime and measured closed loop (1 and 16 clients back to back, interleaved rounds).
#
#   loadtest/tail.sh                 # 4 rounds of 1 s per target and client count, 20 s each
#   DURATION=40s loadtest/tail.sh    # longer
#   BIN=/some/release loadtest/tail.sh   # the binaries in BIN (another build to compare)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=$(mktemp -d /tmp/moltghost-tail.XXXX)
DUR=${DURATION:-20s}
RT_PORT=19200 PINGORA_PORT=18285
. loadtest/bench-lib.sh

if [ "$BIN" = "${CARGO_TARGET_DIR:-$ROOT/target}/release" ]; then
  echo "== building (release)"
  cargo build --release --workspace --bins -q
  cargo build --release -p moltghost --example pingora_bare -q
fi

"$BIN/agent-runtime" --listen 127.0.0.1:$RT_PORT > "$WORK/runtime.log" 2>&1 & PIDS+=($!)
"$BIN/examples/pingora_bare" --listen 127.0.0.1:$PINGORA_PORT --upstream 127.0.0.1:$RT_PORT --threads 2 \
  > "$WORK/pingora.log" 2>&1 & PINGORA_PID=$!; PIDS+=($PINGORA_PID)
wait_port $RT_PORT; wait_port $PINGORA_PORT
TARGETS=(--target direct=http://127.0.0.1:$RT_PORT
         --target pingora=http://127.0.0.1:$PINGORA_PORT --pid pingora=$PINGORA_PID)
bench_edge edge 18280 19280 ''
bench_edge edge-noship 18281 19281 '[limits]\nfleet_sync = "1h"\n'
bench_edge edge-bare 18282 19282 '[limits]\nenabled = false\n'

# CPU time (ms) by thread name of each edge, summed over its threads: which threads pay.
EDGES=(); for i in "${!TARGETS[@]}"; do [[ ${TARGETS[$i]} == --pid ]] && EDGES+=("${TARGETS[$((i+1))]}"); done
threads_cpu() {
  for spec in "${EDGES[@]}"; do
    for t in /proc/${spec#*=}/task/*; do
      # comm may hold spaces: the fields after it start at the last ')'.
      stat=$(cat "$t/stat" 2>/dev/null) || continue
      set -- ${stat##*) }
      echo "${spec%%=*} $(tr ' ' '_' < "$t/comm") $(( (${12} + ${13}) * 1000 / $(getconf CLK_TCK) ))"
    done
  done
}
threads_cpu > "$WORK/cpu.before"
"$BIN/loadtest" --quiet "${TARGETS[@]}" --scenario chat --clients 1,16 --duration "$DUR" --round 1s \
  --json "$WORK/tail.json" --markdown "$WORK/tail.md"
threads_cpu > "$WORK/cpu.after"
cat "$WORK/tail.md"
echo "CPU ms by thread over the run (target, thread name, ms):"
awk 'NR==FNR { b[$1" "$2] += $3; next } { a[$1" "$2] += $3 } END { for (k in a) printf "  %s %d\n", k, a[k] - b[k] }' \
  "$WORK/cpu.before" "$WORK/cpu.after" | sort
