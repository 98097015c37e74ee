# Shared by the benchmark scripts (sourced once ROOT and WORK are set): the processes they start
# stopped at exit, the release binaries' directory, waiting for a port, an edge config for
# benchmarks, and a key for its agent.

# Every process a script starts goes in PIDS; all are stopped when it exits, however it exits.
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
BIN=${BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release}
ulimit -n 20000

# Waits up to 30 s for 127.0.0.1:PORT to accept connections.
wait_port() { for _ in $(seq 1 300); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 never opened" >&2; exit 1; }

# bench_edge_conf PORT ADMIN_PORT DATA_DIR AGENT_ID UPSTREAM: an edge with a plan no benchmark
# reaches and one agent (data in $WORK/DATA_DIR).
bench_edge_conf() {
  cat <<TOML
[listen]
http = ["127.0.0.1:$1"]
admin = "127.0.0.1:$2"
[edge]
data_dir = "$WORK/$3"
shutdown_timeout = "1s"
[[plans]]
name = "bench"
requests_per_minute = 10000000
tokens_per_month = 100000000000
concurrent_streams = 100000
[[agents]]
id = "$4"
upstream = "$5"
TOML
}

# bench_key ADMIN_PORT DATA_DIR AGENT_ID: a new key for the agent, from the edge's admin API.
bench_key() {
  MOLTGHOST_ADMIN_URL=http://127.0.0.1:$1 MOLTGHOST_ADMIN_TOKEN=$("$BIN/moltghost" --data-dir "$WORK/$2" token --ttl 2h) \
    "$BIN/moltghost" auth create-key --agent "$3" --name bench
}

# bench_edge NAME PORT ADMIN_PORT EXTRA_CONFIG: starts an edge (data in $WORK/NAME) forwarding to
# the runtime on $RT_PORT, with EXTRA_CONFIG (printf %b escapes) appended to its config, and adds
# it to TARGETS as a loadtest target with its key and pid.
bench_edge() {
  bench_edge_conf "$2" "$3" "$1" bench "http://127.0.0.1:$RT_PORT" > "$WORK/$1.toml"
  printf '%b' "$4" >> "$WORK/$1.toml"
  "$BIN/moltghost-proxy" --config "$WORK/$1.toml" > "$WORK/$1.log" 2>&1 & local pid=$!; PIDS+=($pid)
  wait_port "$2"; wait_port "$3"
  TARGETS+=(--target "$1=http://bench.agent.localhost:$2" --key "$1=$(bench_key "$3" "$1" bench)" --pid "$1=$pid")
}
