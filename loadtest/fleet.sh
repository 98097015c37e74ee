#!/usr/bin/env bash
# A simulated fleet (issue 18, item 4): EDGES edge processes on one PostgreSQL (a database of
# its own, dropped at the end) in front of the reference runtime, driven by loadtest/fleet.py:
# revocation through the fleet (p50, p99, max of the time until every edge refuses a key
# revoked through another), and the store's load idle and under traffic (transactions, rows
# written and read, connections, postgres CPU; per second and per request).
#
#   loadtest/fleet.sh                          # 10 edges
#   EDGES=20 ROUNDS=20 RATE=400 loadtest/fleet.sh
#   BIN=/some/release loadtest/fleet.sh        # the binaries in BIN
#   STORE_CONNECTIONS=2 loadtest/fleet.sh      # each edge's pool capped (store.max_connections)
#   REQUEST_ROWS=false loadtest/fleet.sh       # the ledger as rollups only (store.request_rows)
#   PGBOUNCER=10 EDGES=20 loadtest/fleet.sh    # every edge's pool through PgBouncer in
#                                              # transaction mode, 10 server connections (its
#                                              # LISTEN session and migrations straight to
#                                              # PostgreSQL: store.session_url)
#   RATE_SECONDS=60 EDGES=3 loadtest/fleet.sh  # also rate accuracy: a 600-a-minute plan
#                                              # offered 1.5x, 90% through one edge (60 s:
#                                              # the plan's window is a minute)
#   QUOTA=20000 EDGES=10 loadtest/fleet.sh     # also quota exactness: a burst of
#                                              # QUOTA_WORKERS (10) clients per edge against
#                                              # a 20,000-token monthly quota
#   QUOTA=2000 ACCOUNTS=40 EDGES=10 loadtest/fleet.sh  # the same over 40 accounts at once,
#                                              # each with that quota (leases drawn by every
#                                              # edge for every account)
# Writes loadtest/results/fleet/fleet-<EDGES>-<RATE>[-rpm<RATE_RPM>][-quota<QUOTA>][-accounts<ACCOUNTS>][-rollups][-pgbouncer<N>].json.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=$(mktemp -d /tmp/moltghost-fleet.XXXX)
N=${EDGES:-10}
RT_PORT=19500
. loadtest/bench-lib.sh

if [ "$BIN" = "${CARGO_TARGET_DIR:-$ROOT/target}/release" ]; then
  echo "== building (release)"
  cargo build --release --workspace --bins -q
fi
DB=moltghost_fleet_$$
PG=${PG_URL:-postgres://postgres@127.0.0.1:5432}
psql -h 127.0.0.1 -U postgres -d postgres -qc "CREATE DATABASE $DB"
stop_bouncer() { [ -z "${PGBOUNCER:-}" ] || kill "$(cat "$WORK/bouncer/pgbouncer.pid" 2>/dev/null)" 2>/dev/null || true; }
drop_db() { cleanup; stop_bouncer; psql -h 127.0.0.1 -U postgres -d postgres -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" || true; }
trap drop_db EXIT

STORE_URL="$PG/$DB"
if [ -n "${PGBOUNCER:-}" ]; then
  B=$WORK/bouncer BPORT=16432
  mkdir -p "$B"; chmod o+x "$WORK"
  printf '"postgres" ""\n' > "$B/users.txt"
  printf '[databases]\n* = host=127.0.0.1 port=5432\n[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = %s\nunix_socket_dir =\nauth_type = trust\nauth_file = %s/users.txt\nadmin_users = postgres\npool_mode = transaction\ndefault_pool_size = %s\nmax_client_conn = 1000\nlogfile = %s/pgbouncer.log\npidfile = %s/pgbouncer.pid\nignore_startup_parameters = extra_float_digits,options\n' \
    "$BPORT" "$B" "$PGBOUNCER" "$B" "$B" > "$B/pgbouncer.ini"
  chown -R postgres "$B"
  # PgBouncer refuses to run as root.
  runuser -u postgres -- "$(command -v pgbouncer || echo /usr/sbin/pgbouncer)" -d "$B/pgbouncer.ini"
  wait_port $BPORT
  STORE_URL="postgres://postgres@127.0.0.1:$BPORT/$DB"
fi

# A fleet shares its secrets (conf/fleet.toml): keys made through one edge work on every edge.
MOLTGHOST_KEY_SECRET=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
MOLTGHOST_ADMIN_SECRET=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
export MOLTGHOST_KEY_SECRET MOLTGHOST_ADMIN_SECRET
"$BIN/agent-runtime" --listen 127.0.0.1:$RT_PORT > "$WORK/runtime.log" 2>&1 & PIDS+=($!)
wait_port $RT_PORT
EDGES_JSON=""
for i in $(seq 1 "$N"); do
  port=$((18500 + i)) admin=$((19500 + i))
  { bench_edge_conf $port $admin e$i bench "http://127.0.0.1:$RT_PORT"
    printf '[store]\nurl = "%s"\n' "$STORE_URL"
    [ -z "${PGBOUNCER:-}" ] || printf 'session_url = "%s/%s"\n' "$PG" "$DB"
    [ -z "${STORE_CONNECTIONS:-}" ] || printf 'max_connections = %s\n' "$STORE_CONNECTIONS"
    [ -z "${REQUEST_ROWS:-}" ] || printf 'request_rows = %s\n' "$REQUEST_ROWS"
    printf '[[plans]]\nname = "rated"\nrequests_per_minute = %s\ntokens_per_month = 100000000000\nconcurrent_streams = 1000\n' "${RATE_RPM:-600}"
    printf '[[plans]]\nname = "metered"\nrequests_per_minute = 10000000\ntokens_per_month = %s\nconcurrent_streams = 1000\n' "${QUOTA:-20000}"
  } > "$WORK/e$i.toml"
  "$BIN/moltghost-proxy" --config "$WORK/e$i.toml" > "$WORK/e$i.log" 2>&1 & PIDS+=($!)
  wait_port $port; wait_port $admin
  token=$("$BIN/moltghost" --data-dir "$WORK/e$i" token --ttl 2h)
  EDGES_JSON+="${EDGES_JSON:+,}{\"port\":$port,\"admin\":$admin,\"token\":\"$token\"}"
done
echo "== $N edges up on database $DB"
mkdir -p loadtest/results/fleet
OUT=loadtest/results/fleet/fleet-$N-${RATE:-200}$([ "${RATE_SECONDS:-0}" = 0 ] || echo "-rpm${RATE_RPM:-600}")$([ "${QUOTA:-0}" = 0 ] || echo "-quota${QUOTA}")$([ "${ACCOUNTS:-1}" = 1 ] || echo "-accounts${ACCOUNTS}")$([ "${REQUEST_ROWS:-true}" = true ] || echo "-rollups")$([ -z "${PGBOUNCER:-}" ] || echo "-pgbouncer${PGBOUNCER}").json
printf '{"edges":[%s],"agent_host":"bench.agent.localhost","agent":"bench","db":"%s","rounds":%s,"rate":%s,"seconds":%s,"settle":2,"upstream":"http://127.0.0.1:%s","rate_rpm":%s,"rate_seconds":%s,"quota":%s,"quota_workers":%s,"accounts":%s}' \
  "$EDGES_JSON" "$DB" "${ROUNDS:-10}" "${RATE:-200}" "${SECONDS_PER_WINDOW:-15}" "$RT_PORT" "${RATE_RPM:-600}" "${RATE_SECONDS:-0}" "${QUOTA:-0}" "${QUOTA_WORKERS:-10}" "${ACCOUNTS:-1}" \
  | python3 loadtest/fleet.py | tee "$OUT"
