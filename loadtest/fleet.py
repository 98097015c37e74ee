#!/usr/bin/env python3
"""Drives a simulated fleet started by loadtest/fleet.sh and reports what a growing fleet costs.

- Revocation: a key made through one edge, then revoked through another; the time until every
  edge refuses it (each edge polled on its own kept-alive connection every 2 ms), per edge and
  round: p50, p99 and max.
- The store's load, idle and under traffic: PostgreSQL's transactions, rows written and read,
  connections, and the CPU of every postgres process, per second; under traffic also per request.
- Quota exactness in a burst (with "quota" > 0): an account with a monthly quota of "quota"
  tokens, "quota_workers" clients per edge sending 21-token requests back to back, each until
  its first refusal; the tokens delivered against the quota, what the leases left unused.
- Rate accuracy under skew (with "rate_seconds" > 0): one key of an account whose plan allows
  "rate_rpm" requests a minute, offered 1.5 times that, 90% through the first edge and the rest
  spread over the others, for "rate_seconds"; how many the fleet admitted against the plan.

Standard library only. Arguments: JSON on stdin (see fleet.sh).
"""
import http.client
import json
import os
import subprocess
import sys
import threading
import time

cfg = json.load(sys.stdin)
edges = cfg["edges"]          # [{"port":..,"admin":..,"token":..}]
agent_host = cfg["agent_host"]
db = cfg["db"]
rounds = cfg["rounds"]
rate = cfg["rate"]
seconds = cfg["seconds"]
BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]})


def chat(conn, port, key, host=None, body=BODY):
    """One small chat completion to agent `host` (the benchmark's by default); the status (0
    when the connection failed, reopened) and, for a 200, the tokens its usage says."""
    try:
        conn.request("POST", "/v1/chat/completions", body, {
            "Host": f"{host or agent_host}:{port}", "Authorization": f"Bearer {key}",
            "Content-Type": "application/json"})
        r = conn.getresponse()
        data = r.read()
        tokens = json.loads(data)["usage"]["total_tokens"] if r.status == 200 else 0
        return r.status, tokens
    except (OSError, http.client.HTTPException):
        conn.close()
        return 0, 0


def admin(edge, method, path, body=None):
    c = http.client.HTTPConnection("127.0.0.1", edge["admin"], timeout=10)
    c.request(method, path, json.dumps(body) if body is not None else None, {
        "Authorization": f"Bearer {edge['token']}", "Content-Type": "application/json"})
    r = c.getresponse()
    data = r.read()
    c.close()
    if r.status >= 300:
        raise SystemExit(f"admin {method} {path}: {r.status} {data[:200]!r}")
    return json.loads(data)


def each_edge(work):
    """Runs `work(i, edge)` for every edge at once, on a thread each."""
    threads = [threading.Thread(target=work, args=(i, e)) for i, e in enumerate(edges)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def paced(key, per_edge, duration, host=None):
    """Open loop: `per_edge[i]` requests a second to edge i for `duration` seconds, each on one
    kept-alive connection; per edge, how many got 200 and how many something else."""
    ok = [0] * len(edges)
    other = [0] * len(edges)

    def drive(i, e):
        conn = http.client.HTTPConnection("127.0.0.1", e["port"], timeout=5)
        start = time.monotonic()
        n = 0
        while n / per_edge[i] < duration:
            due = start + n / per_edge[i]
            if due > time.monotonic():
                time.sleep(due - time.monotonic())
            if chat(conn, e["port"], key, host)[0] == 200:
                ok[i] += 1
            else:
                other[i] += 1
            n += 1
        conn.close()

    each_edge(drive)
    return ok, other


def until_all(key, want, t0):
    """Polls every edge at once until each answers `want` for `key`; each edge's delay."""
    delays = [None] * len(edges)

    def poll(i, e):
        conn = http.client.HTTPConnection("127.0.0.1", e["port"], timeout=5)
        while time.monotonic() - t0 < 10:
            if chat(conn, e["port"], key)[0] == want:
                delays[i] = time.monotonic() - t0
                break
            time.sleep(0.002)
        conn.close()

    each_edge(poll)
    if any(d is None for d in delays):
        raise SystemExit(f"edges never agreed on {want}: {delays}")
    return delays


def revocation():
    delays = []
    for r in range(rounds):
        maker, revoker = edges[r % len(edges)], edges[(r + 1) % len(edges)]
        k = admin(maker, "POST", "/v1/admin/keys", {"name": f"fleet-{r}", "agents": [cfg["agent"]]})
        until_all(k["key"], 200, time.monotonic())
        t0 = time.monotonic()
        admin(revoker, "POST", "/v1/admin/keys/revoke", {"key": k["key"]})
        delays.extend(until_all(k["key"], 401, t0))
    delays.sort()
    q = lambda p: delays[min(len(delays) - 1, int(len(delays) * p))] * 1000
    return {"samples": len(delays), "p50_ms": q(0.5), "p99_ms": q(0.99), "max_ms": delays[-1] * 1000}


def pg_stats():
    sql = ("SELECT xact_commit + xact_rollback, tup_inserted, tup_updated + tup_deleted, "
           "tup_returned + tup_fetched, numbackends FROM pg_stat_database WHERE datname = "
           f"'{db}'")
    out = subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", "postgres", "-Atc", sql],
                         capture_output=True, text=True, check=True).stdout.strip()
    xact, ins, upd, read, conns = (int(x) for x in out.split("|"))
    cpu = 0
    tick = os.sysconf("SC_CLK_TCK")
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        if name.startswith("postgres"):
            fields = stat[stat.rindex(")") + 2:].split()
            cpu += (int(fields[11]) + int(fields[12])) / tick
    return {"t": time.monotonic(), "xact": xact, "ins": ins, "upd": upd, "read": read,
            "conns": conns, "cpu": cpu}


def window(before, after, requests=None, span=None):
    """Per second over `span` (the traffic's duration) or the whole window; per request too."""
    dt = span or (after["t"] - before["t"])
    per = lambda k: (after[k] - before[k]) / dt
    out = {"seconds": round(dt, 1), "xact_per_s": per("xact"), "rows_written_per_s": per("ins") + per("upd"),
           "rows_read_per_s": per("read"), "connections": after["conns"],
           "postgres_cpu_pct": 100 * (after["cpu"] - before["cpu"]) / dt}
    if requests:
        out["requests_per_s"] = requests / dt
        out["xact_per_request"] = (after["xact"] - before["xact"]) / requests
        out["rows_written_per_request"] = (after["ins"] + after["upd"] - before["ins"] - before["upd"]) / requests
    return out


def traffic(key):
    """`rate` requests a second spread evenly over the edges for `seconds`; requests that got 200."""
    ok, _ = paced(key, [rate / len(edges)] * len(edges), seconds)
    return sum(ok)


def account_with_key(name):
    """An account on plan `name`, an agent of its own and a key, made through the first edge;
    the key, once every edge has them."""
    a = edges[0]
    admin(a, "POST", "/v1/admin/accounts", {"name": name, "plan": name})
    admin(a, "POST", "/v1/admin/agents", {"name": name, "endpoint_id": name,
                                          "upstream": cfg["upstream"], "account": name})
    key = admin(a, "POST", "/v1/admin/keys", {"name": name, "account": name})["key"]
    time.sleep(1)  # every edge has the new account, agent and key
    return key


def rate_accuracy():
    """Admitted requests of one rate-limited key under skewed load, against its plan."""
    key = account_with_key("rated")
    offered = 1.5 * cfg["rate_rpm"] / 60
    shares = [0.9] + [0.1 / (len(edges) - 1)] * (len(edges) - 1) if len(edges) > 1 else [1.0]
    seconds_ = cfg["rate_seconds"]
    # Anything but 200 is the plan's refusal (limits.rate_limit_status).
    admitted, refused = paced(key, [offered * sh for sh in shares], seconds_, "rated.agent.localhost")
    allowed = cfg["rate_rpm"] * seconds_ / 60
    total = sum(admitted)
    return {"plan_rpm": cfg["rate_rpm"], "seconds": seconds_, "offered": round(offered * seconds_),
            "shares": [round(s, 3) for s in shares], "admitted": total, "refused": sum(refused),
            "allowed_by_plan": allowed, "error_pct": 100 * (total - allowed) / allowed}


def quota_burst():
    """Tokens a burst through every edge gets out of one account's quota."""
    key = account_with_key("metered")
    body = json.dumps({"model": "m", "max_tokens": 16,
                       "messages": [{"role": "user", "content": "hi there"}]})
    delivered = [0] * len(edges)
    refusals = {}
    lock = threading.Lock()

    def drive(i, e):
        def worker():
            conn = http.client.HTTPConnection("127.0.0.1", e["port"], timeout=10)
            while True:
                status, tokens = chat(conn, e["port"], key, "metered.agent.localhost", body)
                with lock:
                    if status != 200:
                        refusals[status] = refusals.get(status, 0) + 1
                        break
                    delivered[i] += tokens
            conn.close()
        workers = [threading.Thread(target=worker) for _ in range(cfg["quota_workers"])]
        for w in workers:
            w.start()
        for w in workers:
            w.join()

    t0 = time.monotonic()
    each_edge(drive)
    total = sum(delivered)
    return {"quota": cfg["quota"], "workers_per_edge": cfg["quota_workers"],
            "seconds": time.monotonic() - t0, "delivered": total, "per_edge": delivered,
            "over": max(0, total - cfg["quota"]), "unused": max(0, cfg["quota"] - total),
            "refusals": {str(k): v for k, v in sorted(refusals.items())}}


def many_accounts_burst(n):
    """`n` accounts on the metered plan, each with a key; every edge's workers take the
    accounts in turn, each request to the next account, until every account has refused them:
    tokens delivered per account against its quota, and the refusals (a 503 is a draw that took
    longer than `limits.lease_wait`)."""
    a = edges[0]
    keys = []
    for j in range(n):
        name = f"many-{j}"
        admin(a, "POST", "/v1/admin/accounts", {"name": name, "plan": "metered"})
        admin(a, "POST", "/v1/admin/agents", {"name": name, "endpoint_id": name,
                                              "upstream": cfg["upstream"], "account": name})
        keys.append(admin(a, "POST", "/v1/admin/keys", {"name": name, "account": name})["key"])
    time.sleep(1.5)  # every edge has them
    body = json.dumps({"model": "m", "max_tokens": 16,
                       "messages": [{"role": "user", "content": "hi there"}]})
    delivered = [0] * n
    refusals = {}
    lock = threading.Lock()

    def drive(i, e):
        def worker(w):
            conn = http.client.HTTPConnection("127.0.0.1", e["port"], timeout=10)
            live = list(range(n))
            turn = w + i
            while live:
                j = live[turn % len(live)]
                turn += 1
                status, tokens = chat(conn, e["port"], keys[j], f"many-{j}.agent.localhost", body)
                with lock:
                    if status != 200:
                        refusals[status] = refusals.get(status, 0) + 1
                        live.remove(j)
                    else:
                        delivered[j] += tokens
            conn.close()
        workers = [threading.Thread(target=worker, args=(w,)) for w in range(cfg["quota_workers"])]
        for w in workers:
            w.start()
        for w in workers:
            w.join()

    before = pg_stats()
    t0 = time.monotonic()
    each_edge(drive)
    span = time.monotonic() - t0
    after = pg_stats()
    return {"accounts": n, "quota_each": cfg["quota"], "workers_per_edge": cfg["quota_workers"],
            "seconds": span, "delivered": sum(delivered),
            "accounts_over": sum(1 for d in delivered if d > cfg["quota"]),
            "max_over": max(0, max(delivered) - cfg["quota"]),
            "least_delivered": min(delivered), "unused": max(0, n * cfg["quota"] - sum(delivered)),
            "refusals": {str(k): v for k, v in sorted(refusals.items())},
            "store": window(before, after)}


result = {"edges": len(edges), "revocation": revocation()}
if cfg.get("quota") and cfg.get("accounts", 1) > 1:
    result["accounts"] = many_accounts_burst(cfg["accounts"])
elif cfg.get("quota"):
    result["quota"] = quota_burst()
if cfg.get("rate_seconds"):
    result["rate"] = rate_accuracy()
time.sleep(2)
a = pg_stats()
time.sleep(seconds)
b = pg_stats()
result["idle"] = window(a, b)
key = admin(edges[0], "POST", "/v1/admin/keys", {"name": "traffic", "agents": [cfg["agent"]]})["key"]
until_all(key, 200, time.monotonic())
a = pg_stats()
n = traffic(key)
time.sleep(cfg["settle"])  # the last requests' rows are shipped within a sync or two
b = pg_stats()
result["traffic"] = window(a, b, n, seconds)
json.dump(result, sys.stdout, indent=1)
print()
