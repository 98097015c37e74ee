"""Writes BENCHMARKS.md from the JSON reports of loadtest/compare.sh (stdout).

Usage: python3 loadtest/benchmarks_md.py loadtest/results > BENCHMARKS.md
"""
import datetime
import json
import os
import sys

out = sys.argv[1]


def load(name):
    path = os.path.join(out, name)
    return json.load(open(path)) if os.path.exists(path) else None


def target(run, name):
    return next((t for t in run["targets"] if t["name"] == name), None)


docs = {n: load(n) for n in ["chat-serial.json", "chat-closed.json", "chat-sweep.json", "sse.json", "churn.json", "held.json", "litellm-chat.json", "litellm-sse.json"]}
machine = next((d["machine"] for d in docs.values() if d), {})
print("# Benchmarks\n")
print("Regenerate everything on this page with one command: `loadtest/compare.sh` (about ten minutes;")
print("`QUICK=1` for a smoke run). It builds in release mode, starts the reference runtime, the edge")
print("with every policy it has switched on (API key, request rate, concurrent streams, token quota")
print("reservation and settlement, usage journal; SQLite store), the same edge with `limits.enabled =")
print("false` (`edge-bare`: keys still checked), Pingora bare (`pingora`: a `ProxyHttp` that only")
print("forwards, `proxy/examples/pingora_bare.rs`, same threads: the framework's floor), nginx and HAProxy from Debian")
print("with streaming-safe configs (`loadtest/peers/`), LiteLLM's proxy from PyPI, and drives them")
print("with `loadtest` in **interleaved same-run rounds**: each target takes turns at the same arrival")
print("rate, so every figure below is compared with the direct-to-runtime baseline measured in the")
print("same minutes. `direct2` is the runtime again: the noise floor. Latency counts from each")
print("request's intended send time (open loop).\n")
print(f"Machine: {machine.get('cpus')} CPUs ({machine.get('cpu_model')}), Linux {machine.get('kernel')}, shared")
print("by the load generator, the runtime and every proxy; absolute times are indicative, ratios and")
print(f"added microseconds are the point. Generated {datetime.date.today().isoformat()}.\n")

notes = os.path.join(os.path.dirname(__file__), "benchmarks_notes.md")
if os.path.exists(notes):
    print(open(notes).read())

serial = docs["chat-serial.json"]
if serial:
    run = serial["runs"][0]
    print("## Headline: added latency, one request at a time\n")
    print(f"Small JSON chat completions at {run['target_rps']} req/s (each finishes long before the next starts).\n")
    print("| target | p50 µs | p99 µs | added p50 µs | added p99 µs | CPU µs/request |")
    print("|---|---|---|---|---|---|")
    for t in run["targets"]:
        a = t.get("added") or {}
        print(f"| {t['name']} | {t['latency_us']['p50']} | {t['latency_us']['p99']} | {a.get('p50_us', 'baseline')} | {a.get('p99_us', 'baseline')} | {t.get('cpu_us_per_request') or '-'} |")
    print()

closed = docs["chat-closed.json"]
if closed:
    print("## Closed loop: one client, then sixteen\n")
    print("Each client sends its next request as soon as its last is answered (what `wrk -c N` does);")
    print("targets take turns of 1 s. At one client the latency is the whole story; at sixteen the")
    print("machine saturates and req/s is the throughput. The ratio column divides each target's added")
    print("latency (or its req/s) by Pingora bare's, the framework's own floor.\n")
    print("| clients | target | p50 µs | p99 µs | added p50 µs | added p99 µs | req/s | CPU µs/request | added p50 ÷ pingora | added p99 ÷ pingora | req/s ÷ pingora |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for run in closed["runs"]:
        floor = target(run, "pingora") or {}
        fa = floor.get("added") or {}
        for t in run["targets"]:
            a = t.get("added") or {}
            def ratio(x, y):
                return f"{x / y:.2f}" if isinstance(x, (int, float)) and isinstance(y, (int, float)) and y > 0 else "-"
            print(f"| {run['clients']} | {t['name']} | {t['latency_us']['p50']} | {t['latency_us']['p99']} | {a.get('p50_us', 'baseline')} | {a.get('p99_us', 'baseline')} | {t['achieved_rps']:,.0f} | {t.get('cpu_us_per_request') or '-'} | {ratio(a.get('p50_us'), fa.get('p50_us'))} | {ratio(a.get('p99_us'), fa.get('p99_us'))} | {ratio(t['achieved_rps'], floor.get('achieved_rps'))} |")
    print()

held = docs["held.json"]
if held and held["held_streams"]:
    print("## Memory per open stream\n")
    print("Streams opened and held (each stalls after its first token), the serving process's resident")
    print("memory read from `/proc` before and with all of them open.\n")
    print("| target | streams | opened | KiB per stream | streams per GiB |")
    print("|---|---|---|---|---|")
    for h in held["held_streams"]:
        b = h.get("bytes_per_stream")
        per_gib = f"{(1 << 30) // b:,}" if b else "-"
        kib = f"{b / 1024:.1f}" if b else "-"
        print(f"| {h['target']} | {h['wanted']} | {h['opened']} | {kib} | {per_gib} |")
    print()

lite = docs["litellm-chat.json"]
if lite:
    print("## Against LiteLLM\n")
    print("| rate | target | p50 µs | p99 µs | added p50 µs | added p99 µs | errors |")
    print("|---|---|---|---|---|---|---|")
    for run in lite["runs"]:
        for t in run["targets"]:
            a = t.get("added") or {}
            print(f"| {run['target_rps']} | {t['name']} | {t['latency_us']['p50']} | {t['latency_us']['p99']} | {a.get('p50_us', 'baseline')} | {a.get('p99_us', 'baseline')} | {sum(t['errors'].values()) + t['dropped']} |")
    print()

tunnel_dir = os.path.join(out, "tunnel")
bench = load("tunnel/tunnel_bench.json")
if bench:
    print("## WireGuard upstreams\n")
    print("Regenerate with `loadtest/tunnel.sh` (about three minutes). Two parts, each same-run:\n")
    print("1. **The tunnel alone** (`proxy/examples/tunnel_bench.rs`): an edge link and a pod link, the")
    print("   code `moltghost-proxy` and `moltghost-pod` run, on loopback UDP, against the kernel's loopback")
    print("   TCP doing the same work in the same process: a paced 256-byte request and 512-byte answer on")
    print("   one connection (round trip), the same as fast as possible on 1 and 32 kept-alive connections,")
    print("   one connection sending as fast as it can, and tokens sent every 5 ms through a relay that")
    print("   drops 1% of the datagrams each way.\n")
    print("| path | round trip p50 µs | p99 µs | req/s, 1 connection | req/s, 32 connections | one stream Mbit/s |")
    print("|---|---|---|---|---|---|")
    for name in ["kernel", "tunnel"]:
        t = bench.get(name)
        if t:
            print(f"| {name} | {t['rtt_p50_us']:.0f} | {t['rtt_p99_us']:.0f} | {t['req_per_s_1']:,.0f} | {t['req_per_s_32']:,.0f} | {t['mbit_per_s']:,.0f} |")
    lossy = bench.get("lossy")
    if lossy:
        print(f"\nAt {lossy['loss'] * 100:.0f}% loss each way, a token's delay (arrival minus intended send, including a")
        print(f"constant ~1 ms of connection start-up): p50 {lossy['token_delay_p50_ms']:.1f} ms, p99 {lossy['token_delay_p99_ms']:.1f} ms")
        print(f"(worst of five streams of 400 tokens), max {lossy['token_delay_max_ms']:.0f} ms.")
    print()
    print("2. **The whole pod path through the edge**: the same edge serving one agent whose upstream is the")
    print("   runtime over plain HTTP (`edge-plain`, the baseline) and one reached through its tunnel and")
    print("   `moltghost-pod` (`edge-pod`: the Unix-socket bridge, the tunnel, the caller identity signed by")
    print("   the edge and verified by the sidecar, and the sidecar's hop), interleaved at the same rates.")
    print("   CPU µs/request is the edge process's, shared by both targets, so it is not a comparison.\n")
    t = os.path.join(tunnel_dir, "tables.md")
    if os.path.exists(t):
        print(open(t).read())

plug = os.path.join(out, "plugins", "tables.md")
if os.path.exists(plug):
    print("## WASM policy plugins\n")
    print("Regenerate with `loadtest/plugins.sh` (about two minutes): the runtime direct, an edge without")
    print("plugins (`edge`) and the same edge running the three example plugins (`edge-plugins`: allow-list")
    print("on the client address, tool policy reading the body, redaction of every answer chunk),")
    print("interleaved in one run. What the plugins add is `edge-plugins` minus `edge`; CPU per request")
    print("is each edge process's own.\n")
    print(open(plug).read())

ws = os.path.join(out, "websocket", "tables.md")
if os.path.exists(ws):
    print("## The WebSocket\n")
    print("Regenerate with `loadtest/websocket.sh` (about a minute): one edge, its runtime direct")
    print("(`direct`, OpenAI SSE), the edge's native SSE route (`sse`, `/v1/chat`: the baseline, the same")
    print("translation) and its WebSocket (`ws`, `/ws`: one message per request on kept sockets),")
    print("interleaved in one run. What the WebSocket adds to time to first token is `ws` minus `sse`.")
    print("CPU µs/request is the one edge process's, shared by both targets.\n")
    print(open(ws).read())

print("## All runs\n")
tables = os.path.join(out, "tables.md")
if os.path.exists(tables):
    print(open(tables).read())

plots = sorted(os.listdir(os.path.join(out, "plots"))) if os.path.isdir(os.path.join(out, "plots")) else []
if plots:
    print("## Plots\n")
    for p in plots:
        print(f"![{p}](loadtest/results/plots/{p})")
    print()

print("## Definitions\n")
defs = next((d["definitions"] for d in docs.values() if d), {})
for k, v in defs.items():
    print(f"- **{k}**: {v}")
