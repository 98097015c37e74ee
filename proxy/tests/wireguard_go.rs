//! Interoperability: the edge's userspace tunnel against an independent WireGuard
//! implementation, Debian's `wireguard-go`, in a network namespace this test makes (veth to
//! the host). Behind it the pod's kernel TCP carries the reference runtime's answers.

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{run, Stack};
use serde_json::{json, Value};

/// The namespace, links and processes of one test, removed on drop.
struct Netns {
    ns: String,
    veth: String,
    children: Vec<Child>,
}

impl Netns {
    fn ip(&self, args: &[&str]) {
        let (code, _, err) = run(Command::new("ip").args(args));
        assert_eq!(code, 0, "ip {args:?}: {err}");
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for args in [["netns", "del", &self.ns], ["link", "del", &self.veth]] {
            let _ = Command::new("ip").args(args).stderr(Stdio::null()).status();
        }
    }
}

/// Whether this machine can make namespaces and run wireguard-go. In CI it must.
fn can_run(runtime: &Path) -> bool {
    let root = run(Command::new("id").arg("-u")).1.trim() == "0";
    let tools = ["ip", "wireguard-go"]
        .iter()
        .all(|t| run(Command::new("sh").args(["-c", &format!("command -v {t}")])).0 == 0);
    let ok = root && tools && Path::new("/dev/net/tun").exists() && runtime.exists();
    if !ok {
        assert!(
            std::env::var("CI").is_err(),
            "CI must run the wireguard-go interop test (root, iproute2, wireguard-go from scripts/setup.sh, /dev/net/tun, agent-runtime built)"
        );
        eprintln!("skipping: needs root, ip, wireguard-go, /dev/net/tun and agent-runtime");
    }
    ok
}

/// Configures a wireguard-go interface through its UAPI socket (what `wg set` does).
fn uapi_set(iface: &str, config: &str) {
    let path = format!("/var/run/wireguard/{iface}.sock");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut sock = loop {
        match std::os::unix::net::UnixStream::connect(&path) {
            Ok(s) => break s,
            Err(e) => {
                assert!(Instant::now() < deadline, "{path}: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    };
    sock.write_all(format!("set=1\n{config}\n").as_bytes())
        .unwrap();
    let mut answer = String::new();
    let mut buf = [0u8; 256];
    while !answer.ends_with("\n\n") {
        let n = sock.read(&mut buf).unwrap();
        assert!(n > 0, "UAPI closed: {answer:?}");
        answer.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(answer.contains("errno=0"), "UAPI: {answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_edge_tunnel_interoperates_with_wireguard_go() {
    let runtime_bin = common::bin("agent-runtime");
    if !can_run(&runtime_bin) {
        return;
    }
    let id = std::process::id() % 200 + 20;
    let tag = format!("mg{id}");
    let mut net = Netns {
        ns: format!("{tag}ns"),
        veth: format!("{tag}h"),
        children: Vec::new(),
    };
    let (ns, veth_host, veth_ns, wg) = (
        net.ns.clone(),
        net.veth.clone(),
        format!("{tag}n"),
        format!("{tag}wg"),
    );
    let (host_ip, pod_ip) = (format!("10.201.{id}.1"), format!("10.201.{id}.2"));
    // Leftovers of an interrupted run with the same pid.
    for args in [["netns", "del", &ns], ["link", "del", &veth_host]] {
        let _ = Command::new("ip").args(args).stderr(Stdio::null()).status();
    }
    net.ip(&["netns", "add", &ns]);
    net.ip(&[
        "link", "add", &veth_host, "type", "veth", "peer", "name", &veth_ns,
    ]);
    net.ip(&["link", "set", &veth_ns, "netns", &ns]);
    net.ip(&["addr", "add", &format!("{host_ip}/24"), "dev", &veth_host]);
    net.ip(&["link", "set", &veth_host, "up"]);
    net.ip(&[
        "-n",
        &ns,
        "addr",
        "add",
        &format!("{pod_ip}/24"),
        "dev",
        &veth_ns,
    ]);
    net.ip(&["-n", &ns, "link", "set", &veth_ns, "up"]);
    net.ip(&["-n", &ns, "link", "set", "lo", "up"]);

    // wireguard-go, in the foreground, holding the pod's key and accepting only the edge's.
    let (tunnel_cfg, edge_public, _) = common::edge_tunnel_key();
    let pod_secret = moltghost::tunnel::keys::generate();
    let pod_public = moltghost::tunnel::keys::public_of(&pod_secret);
    let hex_of = |b64: &str| hex::encode(moltghost::tunnel::keys::decode(b64).unwrap());
    net.children.push(
        Command::new("ip")
            .args(["netns", "exec", &ns, "wireguard-go", &wg])
            .env("WG_PROCESS_FOREGROUND", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("wireguard-go"),
    );
    uapi_set(
        &wg,
        &format!(
            "private_key={}\nlisten_port=51820\nreplace_peers=true\npublic_key={}\nallowed_ip=10.7.0.1/32\n",
            hex::encode(pod_secret.to_bytes()),
            hex_of(&edge_public)
        ),
    );
    net.ip(&["-n", &ns, "addr", "add", "10.7.0.2/24", "dev", &wg]);
    net.ip(&["-n", &ns, "link", "set", &wg, "up"]);

    // The runtime listens inside the namespace, on the pod's tunnel address.
    net.children.push(
        Command::new("ip")
            .args(["netns", "exec", &ns])
            .arg(&runtime_bin)
            .args(["--listen", "10.7.0.2:80", "--interval-ms", "2"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("agent-runtime"),
    );

    let s = Stack::start(&tunnel_cfg).await;
    let pod: SocketAddr = format!("{pod_ip}:51820").parse().unwrap();
    s.admin_post(
        "/v1/admin/agents",
        json!({"name": "wggo", "endpoint_id": "wggo", "upstream": format!("wg://{pod_public}@{pod}")}),
    )
    .await;
    let chat = |stream: bool| {
        s.post_as("wggo", "/v1/chat/completions", Some(&s.key))
            .json(&json!({"model": "m", "stream": stream, "messages": [{"role": "user", "content": "hi"}]}))
    };
    // The runtime may still be starting inside the namespace.
    let t0 = Instant::now();
    let first = loop {
        let r = chat(false).send().await.unwrap();
        if r.status() == 200 || t0.elapsed() > Duration::from_secs(15) {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(first.status(), 200);
    let v: Value = first.json().await.unwrap();
    assert!(v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .starts_with("Hello!"));
    for _ in 0..20 {
        let body = chat(true).send().await.unwrap().text().await.unwrap();
        let data = common::sse_data(&body);
        assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{body}");
        assert_eq!(data.len(), 16 + 3, "{body}");
    }
    // A large body crosses too (many full-size packets each way).
    let big = "x".repeat(512 * 1024);
    let r = s
        .post_as("wggo", "/v1/chat/completions", Some(&s.key))
        .json(&json!({"model": "m", "messages": [{"role": "user", "content": big}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let h: Value = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{}/v1/health", s.port))
        .header("host", "wggo.agent.localhost")
        .bearer_auth(&s.key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(h["pod"]["tunnel"]["up"], true, "{h}");
    assert_eq!(h["pod"]["tunnel"]["spoofed"], 0, "{h}");
}
