//! The WireGuard tunnel on its own, against the kernel's loopback TCP in the same run: an edge
//! link and a pod link (the code the edge and `moltghost-pod` run) on loopback UDP.
//!
//! ```text
//! cargo run --release --example tunnel_bench -- [--seconds 5] [--loss 0.01] [--json out.json]
//! ```
//!
//! Measures: round-trip latency of a small request/response on one connection (p50/p99),
//! single-stream throughput (Mbit/s), keep-alive requests per second over 1 and 32
//! connections, and, with `--loss`, the delay of tokens streamed every 5 ms through a relay
//! that drops that share of datagrams (p50/p99/max).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use moltghost::tunnel::{bind_udp, keys, Link, LinkConfig, Role};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const REQUEST: usize = 256;
const RESPONSE: usize = 512;

#[derive(Clone, Copy)]
enum Path {
    Kernel,
    Tunnel,
}

struct Tunnel {
    edge: Arc<Link>,
    pod: Arc<Link>,
}

async fn tunnel(loss: f64, mtu: usize) -> Tunnel {
    let (edge_secret, pod_secret) = (keys::generate(), keys::generate());
    let (edge_public, pod_public) = (
        boringtun::x25519::PublicKey::from(&edge_secret),
        boringtun::x25519::PublicKey::from(&pod_secret),
    );
    let (pod_send, pod_recv) = bind_udp("127.0.0.1:0".parse().unwrap()).unwrap();
    let mut pod_addr = pod_send.local_addr().unwrap();
    if loss > 0.0 {
        pod_addr = relay(pod_addr, loss).await;
    }
    let pod = Link::new(
        LinkConfig {
            secret: pod_secret,
            peer: edge_public,
            preshared: None,
            endpoint: None,
            role: Role::Responder {
                port: 80,
                backlog: 64,
            },
            index: 1,
            mtu,
            keepalive: None,
        },
        pod_send,
    );
    let (edge_send, edge_recv) = bind_udp("127.0.0.1:0".parse().unwrap()).unwrap();
    let edge = Link::new(
        LinkConfig {
            secret: edge_secret,
            peer: pod_public,
            preshared: None,
            endpoint: Some(pod_addr),
            role: Role::Initiator,
            index: 2,
            mtu,
            keepalive: None,
        },
        edge_send,
    );
    for (link, recv) in [(pod.clone(), pod_recv), (edge.clone(), edge_recv)] {
        tokio::spawn(link.clone().run_timers());
        tokio::spawn(moltghost::tunnel::receive(recv, move |b| link.input(b)));
    }
    Tunnel { edge, pod }
}

/// A UDP relay in front of `to` dropping `loss` of the datagrams each way (seeded).
async fn relay(to: SocketAddr, loss: f64) -> SocketAddr {
    use rand::{Rng, SeedableRng};
    let front = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let back = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = front.local_addr().unwrap();
    tokio::spawn(async move {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut peer = None;
        let (mut a, mut b) = (vec![0u8; 65536], vec![0u8; 65536]);
        loop {
            tokio::select! {
                Ok((n, from)) = front.recv_from(&mut a) => {
                    peer = Some(from);
                    if !rng.gen_bool(loss) { let _ = back.send_to(&a[..n], to).await; }
                }
                Ok((n, _)) = back.recv_from(&mut b) => {
                    if let (Some(p), false) = (peer, rng.gen_bool(loss)) { let _ = front.send_to(&b[..n], p).await; }
                }
            }
        }
    });
    addr
}

trait Conn: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Conn for T {}

/// Serves connections on `path` with `serve`, and returns a function that opens one.
async fn server<F, Fut>(
    path: Path,
    t: &Tunnel,
    serve: F,
) -> Arc<dyn Fn() -> futures_util::future::BoxFuture<'static, Box<dyn Conn>> + Send + Sync>
where
    F: Fn(Box<dyn Conn>) -> Fut + Send + Sync + Copy + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    match path {
        Path::Kernel => {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = l.local_addr().unwrap();
            tokio::spawn(async move {
                while let Ok((s, _)) = l.accept().await {
                    s.set_nodelay(true).unwrap();
                    tokio::spawn(serve(Box::new(s)));
                }
            });
            Arc::new(move || {
                Box::pin(async move {
                    let s = tokio::net::TcpStream::connect(addr).await.unwrap();
                    s.set_nodelay(true).unwrap();
                    Box::new(s) as Box<dyn Conn>
                })
            })
        }
        Path::Tunnel => {
            let pod = t.pod.clone();
            tokio::spawn(async move {
                loop {
                    let s = pod.accept().await;
                    tokio::spawn(serve(Box::new(s)));
                }
            });
            let edge = t.edge.clone();
            Arc::new(move || {
                let edge = edge.clone();
                Box::pin(async move {
                    Box::new(edge.connect(80, Duration::from_secs(5)).await.unwrap())
                        as Box<dyn Conn>
                })
            })
        }
    }
}

async fn echo(mut s: Box<dyn Conn>) {
    let mut req = [0u8; REQUEST];
    let resp = [7u8; RESPONSE];
    while s.read_exact(&mut req).await.is_ok() {
        if s.write_all(&resp).await.is_err() {
            return;
        }
    }
}

async fn sink(mut s: Box<dyn Conn>) {
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => total += n as u64,
        }
    }
    let _ = s.write_all(&total.to_le_bytes()).await;
}

/// Sends a token (64 bytes carrying its intended send time) every 5 ms, 400 of them.
async fn tokens(mut s: Box<dyn Conn>) {
    let start = Instant::now();
    for i in 0..400u64 {
        let at = start + Duration::from_millis(5 * i);
        tokio::time::sleep_until(at.into()).await;
        let mut tok = [0u8; 64];
        tok[..8].copy_from_slice(&(5_000 * i).to_le_bytes());
        if s.write_all(&tok).await.is_err() {
            return;
        }
    }
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

async fn latency(open: &Opener, secs: u64) -> (f64, f64) {
    let mut c = open().await;
    let req = [1u8; REQUEST];
    let mut resp = [0u8; RESPONSE];
    let mut samples = Vec::new();
    let end = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < end {
        let t0 = Instant::now();
        c.write_all(&req).await.unwrap();
        c.read_exact(&mut resp).await.unwrap();
        samples.push(t0.elapsed().as_secs_f64() * 1e6);
        // Paced: a request every 200 µs, so that it measures latency, not queueing.
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    (pct(&mut samples, 0.5), pct(&mut samples, 0.99))
}

async fn rate(open: &Opener, conns: usize, secs: u64) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let end = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let (open, done) = (open.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let mut c = open().await;
            let req = [1u8; REQUEST];
            let mut resp = [0u8; RESPONSE];
            while Instant::now() < end {
                c.write_all(&req).await.unwrap();
                c.read_exact(&mut resp).await.unwrap();
                done.fetch_add(1, Relaxed);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    done.load(Relaxed) as f64 / secs as f64
}

async fn throughput(open: &Opener, secs: u64) -> f64 {
    let mut c = open().await;
    let chunk = vec![0u8; 256 * 1024];
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs(secs);
    while Instant::now() < end {
        c.write_all(&chunk).await.unwrap();
    }
    c.shutdown().await.unwrap();
    let mut got = [0u8; 8];
    c.read_exact(&mut got).await.unwrap();
    let bytes = u64::from_le_bytes(got);
    bytes as f64 * 8.0 / t0.elapsed().as_secs_f64() / 1e6
}

async fn token_delays(open: &Opener) -> (f64, f64, f64) {
    let mut c = open().await;
    let t0 = Instant::now();
    let mut tok = [0u8; 64];
    let mut delays = Vec::new();
    while c.read_exact(&mut tok).await.is_ok() {
        let sent_us = u64::from_le_bytes(tok[..8].try_into().unwrap()) as f64;
        delays.push((t0.elapsed().as_secs_f64() * 1e6 - sent_us).max(0.0) / 1000.0);
    }
    // The first token carries the connection's start-up; the rest measure delivery delay.
    let max = delays.iter().cloned().fold(0.0, f64::max);
    (pct(&mut delays, 0.5), pct(&mut delays, 0.99), max)
}

type Opener =
    Arc<dyn Fn() -> futures_util::future::BoxFuture<'static, Box<dyn Conn>> + Send + Sync>;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let secs: u64 = arg("--seconds").and_then(|s| s.parse().ok()).unwrap_or(5);
    let loss: f64 = arg("--loss").and_then(|s| s.parse().ok()).unwrap_or(0.01);
    let mtu: usize = arg("--mtu").and_then(|s| s.parse().ok()).unwrap_or(1420);
    let mut out = serde_json::Map::new();
    for (name, path) in [("kernel", Path::Kernel), ("tunnel", Path::Tunnel)] {
        let t = tunnel(0.0, mtu).await;
        let open_echo = server(path, &t, echo).await;
        let (p50, p99) = latency(&open_echo, secs).await;
        let one = rate(&open_echo, 1, secs).await;
        let many = rate(&open_echo, 32, secs).await;
        let t2 = tunnel(0.0, mtu).await;
        let open_sink = server(path, &t2, sink).await;
        let mbit = throughput(&open_sink, secs).await;
        println!(
            "{name:>6}: round trip p50 {p50:.0} µs p99 {p99:.0} µs | {one:.0} req/s on 1 connection, {many:.0} on 32 | one stream {mbit:.0} Mbit/s"
        );
        out.insert(
            name.into(),
            serde_json::json!({"rtt_p50_us": p50, "rtt_p99_us": p99, "req_per_s_1": one, "req_per_s_32": many, "mbit_per_s": mbit}),
        );
    }
    if loss > 0.0 {
        let t = tunnel(loss, mtu).await;
        let open = server(Path::Tunnel, &t, tokens).await;
        let mut runs = Vec::new();
        for _ in 0..5 {
            runs.push(token_delays(&open).await);
        }
        let worst99 = runs.iter().map(|r| r.1).fold(0.0, f64::max);
        let max = runs.iter().map(|r| r.2).fold(0.0, f64::max);
        let p50 = runs.iter().map(|r| r.0).sum::<f64>() / runs.len() as f64;
        println!(
            "tunnel at {:.1}% loss each way: token delay p50 {p50:.2} ms, p99 (worst of 5 streams of 400) {worst99:.1} ms, max {max:.0} ms",
            loss * 100.0
        );
        out.insert(
            "lossy".into(),
            serde_json::json!({"loss": loss, "token_delay_p50_ms": p50, "token_delay_p99_ms": worst99, "token_delay_max_ms": max}),
        );
    }
    if let Some(path) = arg("--json") {
        std::fs::write(path, serde_json::Value::Object(out).to_string()).unwrap();
    }
}
