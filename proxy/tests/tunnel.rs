//! WireGuard upstreams end to end: the edge's userspace tunnel, the real `moltghost-pod`
//! sidecar, the reference runtime behind it, on loopback.

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{run, PodProc, Stack};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// An edge with a known WireGuard key, and a pod sidecar in front of the stack's runtime,
/// serving agent `id`.
struct PodStack {
    s: Stack,
    pod: PodProc,
    edge_public: String,
    edge_secret: String,
}

impl PodStack {
    async fn start(id: &str, extra: &str) -> Self {
        let (tunnel_cfg, edge_public, edge_secret) = common::edge_tunnel_key();
        let s = Stack::start(&format!("{tunnel_cfg}{extra}")).await;
        let addr: SocketAddr = ([127, 0, 0, 1], common::free_udp_port()).into();
        let pod = PodProc::start(addr, &edge_public, s.runtime, &s.admin_url());
        let a = s
            .admin_post(
                "/v1/admin/agents",
                json!({"name": id, "endpoint_id": id, "upstream": pod.upstream()}),
            )
            .await;
        assert_eq!(a["upstream"], pod.upstream().as_str(), "{a}");
        Self {
            s,
            pod,
            edge_public,
            edge_secret,
        }
    }

    fn chat(&self, agent: &str, stream: bool, key: &str) -> reqwest::RequestBuilder {
        let mut body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": stream});
        if stream {
            body["stream_options"] = json!({"include_usage": true});
        }
        self.s
            .post_as(agent, "/v1/chat/completions", Some(key))
            .json(&body)
    }

    async fn health(&self, agent: &str) -> Value {
        reqwest::Client::new()
            .get(format!("http://127.0.0.1:{}/v1/health", self.s.port))
            .header("host", format!("{agent}.agent.localhost"))
            .bearer_auth(&self.s.key)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }
}

/// The tokens of a streamed answer, and its usage line's total.
fn tokens_and_usage(body: &str) -> (usize, u64) {
    let data = common::sse_data(body);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{body}");
    let mut tokens = 0;
    let mut total = 0;
    for d in &data[..data.len() - 1] {
        let v: Value = serde_json::from_str(d).unwrap();
        if v["choices"][0]["delta"]["content"]
            .as_str()
            .is_some_and(|c| !c.is_empty())
        {
            tokens += 1;
        }
        if let Some(t) = v["usage"]["total_tokens"].as_u64() {
            total = t;
        }
    }
    (tokens, total)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_and_streams_go_through_the_tunnel_with_a_signed_identity() {
    let p = PodStack::start("pod1", "").await;
    let r = p.chat("pod1", false, &p.s.key).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let caller = r.headers()["x-mock-caller"].to_str().unwrap().to_owned();
    let v: Value = r.json().await.unwrap();
    assert!(v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .starts_with("Hello!"));
    // The runtime received the caller the edge signed: account/key id/agent.
    let parts: Vec<&str> = caller.split('/').collect();
    assert_eq!(parts.len(), 3, "{caller}");
    assert!(
        parts[0] == "default" && parts[1].starts_with("key_"),
        "{caller}"
    );
    assert_eq!(parts[2], "pod1");

    let body = p
        .chat("pod1", true, &p.s.key)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(tokens_and_usage(&body), (16, 20));

    // The official openai package, streamed and not.
    if common::have_openai_python() {
        let (code, out, err) = run(Command::new("python3")
            .arg(common::client_script("openai_client.py"))
            .args([
                &format!("http://127.0.0.1:{}/v1", p.s.port),
                &format!("pod1.agent.localhost:{}", p.s.port),
                &p.s.key,
            ]));
        assert_eq!(
            code, 0,
            "openai client through the tunnel failed:\n{out}\n{err}"
        );
    }

    // Health shows the tunnel up, and the runtime reachable through it.
    let h = p.health("pod1").await;
    assert_eq!(h["pod"]["reachable"], true, "{h}");
    assert_eq!(h["pod"]["tunnel"]["up"], true, "{h}");
    assert!(
        h["pod"]["tunnel"]["rx_packets"].as_u64().unwrap() > 10,
        "{h}"
    );
    let status = p.s.admin_get("/v1/admin/status").await;
    assert_eq!(status["tunnel"]["public_key"], p.edge_public.as_str());
    assert_eq!(
        status["tunnel"]["pods"][0]["tunnel"]["up"], true,
        "{status}"
    );
    let metrics = p.s.metrics().await;
    let pod_label = format!("pod=\"{}@{}\"", p.pod.key, p.pod.addr);
    for name in [
        "moltghost_tunnel_up",
        "moltghost_tunnel_handshakes_total",
        "moltghost_tunnel_sent_bytes_total",
    ] {
        let line = metrics
            .lines()
            .find(|l| l.starts_with(name) && l.contains(&pod_label))
            .unwrap_or_else(|| panic!("no {name} for the pod:\n{metrics}"));
        let v: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(v >= 1.0, "{line}");
    }

    // Inside the tunnel, a request without the edge's signature is refused by the sidecar,
    // even from a peer holding the edge's WireGuard key.
    for identity in [None, Some("eyJhbGciOiJFZERTQSJ9.e30.AAAA")] {
        let answer = raw_request_through_tunnel(&p, identity).await;
        assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
        assert!(answer.contains("invalid_identity"), "{answer}");
    }
}

/// Sends GET /v1/models straight into the pod's tunnel (as the edge, without the edge).
async fn raw_request_through_tunnel(p: &PodStack, identity: Option<&str>) -> String {
    use moltghost::tunnel::{bind_udp, keys, Link, LinkConfig, Role};
    let (send, recv) = bind_udp("127.0.0.1:0".parse().unwrap()).unwrap();
    let link = Link::new(
        LinkConfig {
            secret: keys::secret(&p.edge_secret).unwrap(),
            peer: keys::public(&p.pod.key).unwrap(),
            preshared: None,
            endpoint: Some(p.pod.addr),
            role: Role::Initiator,
            index: 77,
            mtu: 1420,
            keepalive: None,
        },
        send,
    );
    let timers = tokio::spawn(link.clone().run_timers());
    let rx = link.clone();
    let receiver = tokio::spawn(moltghost::tunnel::receive(recv, move |b| rx.input(b)));
    let mut conn = link.connect(80, Duration::from_secs(5)).await.unwrap();
    let extra = identity
        .map(|i| format!("x-moltghost-identity: {i}\r\n"))
        .unwrap_or_default();
    conn.write_all(
        format!("GET /v1/models HTTP/1.1\r\nhost: pod\r\n{extra}connection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(5), conn.read_to_string(&mut answer))
        .await
        .unwrap()
        .unwrap();
    link.close();
    timers.abort();
    receiver.abort();
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_that_does_not_know_the_edge_key_is_unreachable() {
    let (tunnel_cfg, _, _) = common::edge_tunnel_key();
    let s = Stack::start(&format!("{tunnel_cfg}[limits]\nconnect_timeout = \"1s\"\n")).await;
    let stranger = moltghost::tunnel::keys::public_of(&moltghost::tunnel::keys::generate());
    let addr: SocketAddr = ([127, 0, 0, 1], common::free_udp_port()).into();
    let pod = PodProc::start(addr, &stranger, s.runtime, &s.admin_url());
    s.admin_post(
        "/v1/admin/agents",
        json!({"name": "pod2", "endpoint_id": "pod2", "upstream": pod.upstream()}),
    )
    .await;
    let t0 = Instant::now();
    let r = s
        .post_as("pod2", "/v1/chat/completions", Some(&s.key))
        .json(&json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "upstream_error", "{v}");
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert_eq!(
        s.stats.requests.load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_edge_reconnects_to_a_restarted_pod() {
    let mut p = PodStack::start(
        "pod3",
        "[limits]\nconnect_timeout = \"1s\"\nstream_idle_timeout = \"3s\"\n",
    )
    .await;
    for _ in 0..3 {
        assert_eq!(
            p.chat("pod3", false, &p.s.key)
                .send()
                .await
                .unwrap()
                .status(),
            200
        );
    }
    p.pod.kill();
    let t0 = Instant::now();
    let r = p.chat("pod3", false, &p.s.key).send().await.unwrap();
    assert!(r.status().is_server_error(), "{}", r.status());
    println!("pod down: {} after {:?}", r.status(), t0.elapsed());
    p.pod.restart();
    // The pod lost its sessions: the edge notices the silence, handshakes again, and the pooled
    // connections the new pod does not know are reset and retried.
    let t0 = Instant::now();
    loop {
        let r = p.chat("pod3", false, &p.s.key).send().await.unwrap();
        if r.status() == 200 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "no answer through the restarted pod: {}",
            r.status()
        );
    }
    println!("reconnected {:?} after the pod restarted", t0.elapsed());
    for _ in 0..20 {
        let body = p
            .chat("pod3", true, &p.s.key)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert_eq!(tokens_and_usage(&body), (16, 20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_stream_completes_and_is_counted_exactly_over_a_lossy_path() {
    let p = PodStack::start("pod4", "").await;
    // The agent reaches the pod through a relay that loses, duplicates and reorders datagrams.
    let relay = LossyRelay::start(p.pod.addr, 0xC0FFEE, 0.01, 0.01, 0.01).await;
    p.s.admin_post(
        "/v1/admin/agents",
        json!({"name": "lossy", "endpoint_id": "lossy", "upstream": format!("wg://{}@{}", p.pod.key, relay.addr)}),
    )
    .await;
    let key =
        p.s.admin_post(
            "/v1/admin/keys",
            json!({"name": "lossy", "agents": ["lossy"]}),
        )
        .await["key"]
            .as_str()
            .unwrap()
            .to_owned();
    let n = 16; // the default plan's concurrent-stream cap
    let mut tasks = Vec::new();
    for _ in 0..n {
        let req = p
            .chat("lossy", true, &key)
            .header("x-mock-tokens", "64")
            .header("x-mock-interval-ms", "2");
        tasks.push(tokio::spawn(async move {
            let t0 = Instant::now();
            let body = req.send().await.unwrap().text().await.unwrap();
            (tokens_and_usage(&body), t0.elapsed())
        }));
    }
    let mut total = 0;
    let mut slowest = Duration::ZERO;
    for t in tasks {
        let ((tokens, usage), took) = t.await.unwrap();
        assert_eq!(tokens, 64);
        total += usage;
        slowest = slowest.max(took);
    }
    let line = p.s.ledger_for("lossy", n).await;
    assert_eq!(line["total_tokens"].as_u64(), Some(total));
    let stats = relay.stats();
    println!("lossy relay: {stats:?}; slowest stream {slowest:?}");
    assert!(stats.dropped > 0 && stats.duplicated > 0 && stats.reordered > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_cut_for_30_seconds_heals_by_itself() {
    let p = PodStack::start("pod8", "").await;
    let relay = LossyRelay::start(p.pod.addr, 1, 0.0, 0.0, 0.0).await;
    p.s.admin_post(
        "/v1/admin/agents",
        json!({"name": "severed", "endpoint_id": "severed", "upstream": format!("wg://{}@{}", p.pod.key, relay.addr)}),
    )
    .await;
    let key =
        p.s.admin_post(
            "/v1/admin/keys",
            json!({"name": "severed", "agents": ["severed"]}),
        )
        .await["key"]
            .as_str()
            .unwrap()
            .to_owned();
    let status = |key: String| {
        let req =
            p.s.post_as("severed", "/v1/chat", Some(&key))
                .body(r#"{"messages":[{"role":"user","content":"hi"}],"timeout_seconds":3}"#);
        async move { req.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(status(key.clone()).await, 200);
    relay.set_cut(true);
    let cut_at = Instant::now();
    // While the path is cut, a request ends within its deadline with the table's error.
    let during = status(key.clone()).await;
    assert!(matches!(during, 502 | 504), "{during}");
    assert!(cut_at.elapsed() < Duration::from_secs(10));
    tokio::time::sleep(Duration::from_secs(30).saturating_sub(cut_at.elapsed())).await;
    relay.set_cut(false);
    let healed_at = Instant::now();
    while status(key.clone()).await != 200 {
        assert!(
            healed_at.elapsed() < Duration::from_secs(30),
            "the tunnel never healed:\n{}",
            p.s.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "tunnel cut for 30 s: served again {:?} after the path healed",
        healed_at.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_idle_past_the_rekey_interval_still_carries_requests() {
    let p = PodStack::start("pod5", "").await;
    assert_eq!(
        p.chat("pod5", false, &p.s.key)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    // WireGuard rekeys after 120 s and drops a session after 180 s; idle past the first.
    tokio::time::sleep(Duration::from_secs(125)).await;
    let body = p
        .chat("pod5", true, &p.s.key)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(tokens_and_usage(&body), (16, 20));
    let h = p.health("pod5").await;
    assert!(
        h["pod"]["tunnel"]["last_handshake_seconds_ago"]
            .as_f64()
            .unwrap()
            < 10.0,
        "{h}"
    );
}

/// A UDP relay in front of a pod that drops, duplicates and reorders datagrams with a seeded
/// generator (both directions).
struct LossyRelay {
    addr: SocketAddr,
    stats: Arc<std::sync::Mutex<RelayStats>>,
    /// While set, every datagram is dropped (the path is cut).
    cut: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Debug, Default, Clone)]
struct RelayStats {
    passed: u64,
    dropped: u64,
    duplicated: u64,
    reordered: u64,
}

impl LossyRelay {
    async fn start(pod: SocketAddr, seed: u64, loss: f64, dup: f64, reorder: f64) -> Self {
        use rand::{Rng, SeedableRng};
        let front = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let back = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let addr = front.local_addr().unwrap();
        let stats = Arc::new(std::sync::Mutex::new(RelayStats::default()));
        let st = stats.clone();
        let cut = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let is_cut = cut.clone();
        let task = tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut edge: Option<SocketAddr> = None;
            let mut held: Option<(Vec<u8>, bool)> = None;
            let (mut a, mut b) = (vec![0u8; 65536], vec![0u8; 65536]);
            loop {
                let (data, to_pod) = tokio::select! {
                    r = front.recv_from(&mut a) => {
                        let (n, from) = r.unwrap();
                        edge = Some(from);
                        (a[..n].to_vec(), true)
                    }
                    r = back.recv_from(&mut b) => (b[..r.unwrap().0].to_vec(), false),
                };
                let send = |d: &[u8], to_pod: bool| {
                    if to_pod {
                        let _ = back.try_send_to(d, pod);
                    } else if let Some(e) = edge {
                        let _ = front.try_send_to(d, e);
                    }
                };
                let mut s = st.lock().unwrap();
                if is_cut.load(std::sync::atomic::Ordering::Relaxed) || rng.gen_bool(loss) {
                    s.dropped += 1;
                    continue;
                }
                if held.is_none() && rng.gen_bool(reorder) {
                    s.reordered += 1;
                    held = Some((data, to_pod));
                    continue;
                }
                send(&data, to_pod);
                s.passed += 1;
                if rng.gen_bool(dup) {
                    s.duplicated += 1;
                    send(&data, to_pod);
                }
                if let Some((d, dir)) = held.take() {
                    send(&d, dir);
                }
            }
        });
        Self {
            addr,
            stats,
            cut,
            task,
        }
    }

    fn stats(&self) -> RelayStats {
        self.stats.lock().unwrap().clone()
    }

    /// Cuts the path (`true`) or heals it.
    fn set_cut(&self, cut: bool) {
        self.cut.store(cut, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for LossyRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_accepts_both_edge_keys_during_a_rotation() {
    // Two edges (the old key and the new), one identity key between them, as a fleet has.
    let identity = hex::encode(rand::random::<[u8; 32]>());
    let edge = |tunnel_cfg: String, runtime| common::Options {
        extra: tunnel_cfg,
        files: vec![("identity_key", identity.clone())],
        runtime,
        ..common::Options::default()
    };
    let (old_cfg, old_key, _) = common::edge_tunnel_key();
    let (new_cfg, new_key, _) = common::edge_tunnel_key();
    let a = Stack::start_with(edge(old_cfg, None)).await;
    let b = Stack::start_with(edge(new_cfg, Some((a.runtime, a.stats.clone())))).await;
    let addr: SocketAddr = ([127, 0, 0, 1], common::free_udp_port()).into();
    let pod = PodProc::start(
        addr,
        &format!("{old_key},{new_key}"),
        a.runtime,
        &a.admin_url(),
    );
    for s in [&a, &b] {
        s.admin_post(
            "/v1/admin/agents",
            json!({"name": "rot", "endpoint_id": "rot", "upstream": pod.upstream()}),
        )
        .await;
    }
    for _ in 0..3 {
        for s in [&a, &b] {
            let r = s
                .post_as("rot", "/v1/chat/completions", Some(&s.key))
                .json(&json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
        }
    }
    assert!(pod.log().contains("\"edges\":2"), "{}", pod.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tun_mode_carries_the_tunnel_with_the_pods_kernel_tcp() {
    let root = run(Command::new("id").arg("-u")).1.trim() == "0";
    if !root || !std::path::Path::new("/dev/net/tun").exists() {
        assert!(
            std::env::var("CI").is_err(),
            "CI runs as root with /dev/net/tun: the --tun test must run"
        );
        eprintln!("skipping: --tun needs root and /dev/net/tun");
        return;
    }
    let (tunnel_cfg, edge_public, _) = common::edge_tunnel_key();
    let s = Stack::start(&tunnel_cfg).await;
    let addr: SocketAddr = ([127, 0, 0, 1], common::free_udp_port()).into();
    let name = format!("mgtun{}", std::process::id() % 10_000);
    let pod = PodProc::start_with(
        addr,
        &edge_public,
        s.runtime,
        &s.admin_url(),
        &["--tun", &name],
    );
    // Through a lossy path, where the kernel's TCP recovers faster than smoltcp.
    let relay = LossyRelay::start(pod.addr, 7, 0.01, 0.0, 0.0).await;
    s.admin_post(
        "/v1/admin/agents",
        json!({"name": "tun", "endpoint_id": "tun", "upstream": format!("wg://{}@{}", pod.key, relay.addr)}),
    )
    .await;
    let chat = |stream: bool| {
        s.post_as("tun", "/v1/chat/completions", Some(&s.key)).json(
            &json!({"model": "m", "stream": stream, "stream_options": {"include_usage": true},
                    "messages": [{"role": "user", "content": "hi"}]}),
        )
    };
    let r = chat(false).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["x-mock-caller"]
        .to_str()
        .unwrap()
        .ends_with("/tun"));
    for _ in 0..10 {
        let body = chat(true)
            .header("x-mock-tokens", "64")
            .header("x-mock-interval-ms", "2")
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert_eq!(tokens_and_usage(&body).0, 64);
    }
    assert!(
        run(Command::new("ip").args(["link", "show", &name])).0 == 0,
        "the TUN device exists while the pod runs"
    );
    println!("tun mode over 1% loss: {:?}", relay.stats());
}

/// A plugin's HTTP calls to a pod (`upstreams = { pod = "wg://KEY@host:port" }`) go through the
/// edge's tunnel to the pod's sidecar, which lets them in only with an identity the edge
/// signed: a request's call carries that request's caller, a root context's tick call one
/// naming the plugin. Reloading the agents (which closes tunnels no agent uses) keeps it open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_calls_a_pod_through_its_tunnel_with_a_signed_identity() {
    let p = PodStack::start("pod5", "").await;
    let conf = p.s.dir.path().join("edge.toml");
    let base = std::fs::read_to_string(&conf).unwrap();
    let plugin = common::plugin(
        "pod-check",
        "callout",
        &format!(
            "agents = [\"checked\"]\n\
             config = {{ upstream = \"pod\", path = \"/v1/models\", method = \"GET\", tick_path = \"/v1/models\" }}\n\
             upstreams = {{ pod = \"{}\" }}",
            p.pod.upstream()
        ),
    );
    std::fs::write(&conf, format!("{base}{plugin}")).unwrap();
    let r = p.s.reload().await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    p.s.admin_post(
        "/v1/admin/agents",
        json!({"name": "checked", "endpoint_id": "checked", "upstream": format!("http://{}", p.s.runtime)}),
    )
    .await;

    // The request's call: the pod answered 200 (its sidecar took the identity), so the plugin
    // resumed, and the answer says what the runtime behind the pod said.
    let ask = || async {
        let r = p.chat("checked", false, &p.s.key).send().await.unwrap();
        let status = r.status().as_u16();
        let answer = r
            .headers()
            .get("x-callout-answer")
            .map(|v| v.to_str().unwrap().to_owned());
        let tick = r
            .headers()
            .get("x-callout-tick")
            .map(|v| v.to_str().unwrap().to_owned());
        (status, answer, tick, r.text().await.unwrap())
    };
    let (status, answer, _, body) = ask().await;
    assert_eq!(status, 200, "{body}");
    let answer = answer.expect("the plugin resumed without the pod's answer");
    assert!(answer.contains("\"object\":\"list\""), "{answer}");

    // The root context's tick calls went the same way.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (status, _, tick, _) = ask().await;
        assert_eq!(status, 200);
        if tick
            .as_deref()
            .is_some_and(|t| t.contains("\"object\":\"list\""))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no tick answer from the pod: {tick:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The pod's agent moves elsewhere: the snapshot is rebuilt and tunnels no agent uses are
    // closed, but the plugin's stays open.
    let moved = reqwest::Client::new()
        .patch(format!("{}/v1/admin/agents/pod5", p.s.admin_url()))
        .bearer_auth(common::admin_token())
        .json(&json!({"upstream": format!("http://{}", p.s.runtime)}))
        .send()
        .await
        .unwrap();
    assert_eq!(moved.status(), 200, "{}", moved.text().await.unwrap());
    let (status, answer, _, body) = ask().await;
    assert_eq!(status, 200, "{body}");
    assert!(answer.is_some_and(|a| a.contains("\"object\":\"list\"")));
}
