//! HTTP/2 on the TLS listener under the two floods that took down other servers: rapid reset
//! (CVE-2023-44487), from a client built with the `h2` crate, and CONTINUATION (CVE-2024-27316
//! and kin), as raw frames no well-behaved client library would send. While each runs, another
//! client keeps asking the same edge; it must be answered every time, and the edge's memory must
//! stay bounded. The edge's CPU time, memory and the other client's latency are printed for
//! RELIABILITY.md.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Options, Stack};
use rcgen::{CertificateParams, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

const HOST: &str = "abc123.agent.localhost";

/// An edge with TLS and HTTP/2, and a client TLS config that trusts its certificate.
async fn tls_edge(dir: &std::path::Path) -> (Stack, Arc<rustls::ClientConfig>) {
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["*.agent.localhost".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let (crt, k) = (dir.join("edge.crt"), dir.join("edge.key"));
    std::fs::write(&k, key.serialize_pem()).unwrap();
    std::fs::write(&crt, cert.pem()).unwrap();
    let s = Stack::start_with(Options {
        extra: format!(
            "[tls]\nplain_http = \"serve\"\nhttp2 = true\n[[tls.certificates]]\n\
             names = [\"*.agent.localhost\"]\ncert = \"{}\"\nkey = \"{}\"\n",
            crt.display(),
            k.display()
        ),
        https: true,
        ..Options::default()
    })
    .await;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from(cert.der().to_vec()))
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    (s, Arc::new(cfg))
}

async fn connect(port: u16, cfg: &Arc<rustls::ClientConfig>) -> TlsStream<TcpStream> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let tls = TlsConnector::from(cfg.clone())
        .connect(ServerName::try_from(HOST).unwrap(), tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    tls
}

/// The edge's CPU time (user + system) and resident memory, from /proc.
fn usage(pid: u32) -> (Duration, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit_once(") ").unwrap().1.split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    let hz = 100; // USER_HZ on Linux
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap();
    (Duration::from_millis(ticks * 1000 / hz), rss_kb * 1024)
}

/// A new key for the test agents: the flood's own key runs out of rate, as it should.
async fn fresh_key(s: &Stack, name: &str) -> String {
    s.admin_post(
        "/v1/admin/keys",
        serde_json::json!({"name": name, "account": "default"}),
    )
    .await["key"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Another client, with a key of its own, asking the edge (plain HTTP) every 20 ms until `stop`;
/// its latencies.
async fn bystander(
    s: &Stack,
    stop: Arc<tokio::sync::Notify>,
) -> tokio::task::JoinHandle<Vec<Duration>> {
    let url = format!("http://127.0.0.1:{}/v1/models", s.port);
    let key = fresh_key(s, "bystander").await;
    tokio::spawn(async move {
        let client = reqwest::Client::new();
        let mut took = Vec::new();
        let stopped = stop.notified();
        tokio::pin!(stopped);
        loop {
            let t0 = Instant::now();
            let r = client
                .get(&url)
                .header("host", HOST)
                .bearer_auth(&key)
                .timeout(Duration::from_secs(10))
                .send()
                .await
                .expect("the bystander is answered during the flood");
            assert_eq!(r.status(), 200, "the bystander is served during the flood");
            took.push(t0.elapsed());
            tokio::select! {
                () = &mut stopped => return took,
                () = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        }
    })
}

fn p(took: &mut [Duration], q: f64) -> Duration {
    took.sort();
    took[((took.len() - 1) as f64 * q) as usize]
}

/// Runs `flood` while a bystander asks; reports and checks the edge's cost.
async fn under_flood<F: std::future::Future<Output = String>>(s: &Stack, name: &str, flood: F) {
    let pid = s.child.id();
    let (cpu0, rss0) = usage(pid);
    let stop = Arc::new(tokio::sync::Notify::new());
    let by = bystander(s, stop.clone()).await;
    let t0 = Instant::now();
    let what = flood.await;
    let wall = t0.elapsed();
    stop.notify_one();
    let mut took = by.await.unwrap();
    let (cpu1, rss1) = usage(pid);
    println!(
        "{name}: {what}; {wall:.1?} wall, edge CPU {:.2?} ({:.0}% of one core), RSS {} -> {} MiB; \
         bystander {} requests, p50 {:.1?}, p99 {:.1?}, max {:.1?}",
        cpu1 - cpu0,
        (cpu1 - cpu0).as_secs_f64() / wall.as_secs_f64() * 100.0,
        rss0 >> 20,
        rss1 >> 20,
        took.len(),
        p(&mut took, 0.5),
        p(&mut took, 0.99),
        p(&mut took, 1.0),
    );
    assert!(!took.is_empty());
    assert!(
        rss1 < rss0 + (256 << 20),
        "{name}: the edge grew from {} to {} MiB",
        rss0 >> 20,
        rss1 >> 20
    );
    // The edge still serves HTTP/2 afterwards.
    let key = fresh_key(s, "after").await;
    let r = reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .resolve(HOST, ([127, 0, 0, 1], s.https_port).into())
        .build()
        .unwrap()
        .get(format!("https://{HOST}:{}/v1/models", s.https_port))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// How long each flood runs, reconnecting whenever the edge sends it away.
const FLOOD: Duration = Duration::from_secs(10);

/// One rapid-reset connection: streams opened and reset at once until the edge ends it.
/// Returns the streams sent and how the connection ended.
async fn reset_one(tls: TlsStream<TcpStream>, key: &str) -> (u32, String) {
    let (mut client, conn) = h2::client::Builder::new()
        .max_concurrent_reset_streams(100_000)
        .handshake::<_, bytes::Bytes>(tls)
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    let mut sent = 0u32;
    while sent < 100_000 {
        if std::future::poll_fn(|cx| client.poll_ready(cx))
            .await
            .is_err()
        {
            break;
        }
        let req = http::Request::post(format!("https://{HOST}/v1/chat"))
            .header("authorization", format!("Bearer {key}"))
            .header("content-type", "application/json")
            .body(())
            .unwrap();
        let Ok((_, mut stream)) = client.send_request(req, false) else {
            break;
        };
        stream.send_reset(h2::Reason::CANCEL);
        sent += 1;
    }
    drop(client);
    let ended = match tokio::time::timeout(Duration::from_secs(10), conn).await {
        Ok(Ok(Err(e))) => e.to_string(),
        other => format!("{other:?}"),
    };
    (sent, ended)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_reset_flood() {
    let dir = tempfile::tempdir().unwrap();
    let (s, cfg) = tls_edge(dir.path()).await;
    under_flood(&s, "rapid reset", async {
        let t0 = Instant::now();
        let (mut conns, mut streams, mut ended) = (0, 0, String::new());
        while t0.elapsed() < FLOOD {
            let (sent, how) = reset_one(connect(s.https_port, &cfg).await, &s.key).await;
            conns += 1;
            streams += sent;
            ended = how;
        }
        format!(
            "{conns} connections, {streams} streams opened and reset ({:.0}/s), each connection \
             ended by the edge after ~{} streams: {ended}",
            streams as f64 / t0.elapsed().as_secs_f64(),
            streams / conns
        )
    })
    .await;
}

/// One HTTP/2 frame.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(9 + payload.len());
    f.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    f.push(kind);
    f.push(flags);
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// One CONTINUATION connection: a header block that never ends, up to 256 MiB. Returns the
/// bytes sent before the edge stopped reading and the GOAWAY code it sent, if any.
async fn continuation_one(mut tls: TlsStream<TcpStream>) -> (usize, Option<u32>) {
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    tls.write_all(&frame(0x4, 0, 0, &[])).await.unwrap();
    // HEADERS without END_HEADERS (:method GET, :scheme https, :path /), then CONTINUATION
    // frames of literal headers, never ending.
    tls.write_all(&frame(0x1, 0x1, 1, &[0x82, 0x87, 0x84]))
        .await
        .unwrap();
    let field: &[u8] = b"\x00\x05x-aaa\x0512345";
    let block: Vec<u8> = field
        .iter()
        .copied()
        .cycle()
        .take(16_384 - 16_384 % field.len())
        .collect();
    let cont = frame(0x9, 0, 1, &block);
    let (mut read, mut write) = tokio::io::split(tls);
    let reader = tokio::spawn(async move {
        let mut got = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(60), read.read_to_end(&mut got)).await;
        got
    });
    let mut sent = 0usize;
    while sent < 256 << 20 {
        if write.write_all(&cont).await.is_err() {
            break;
        }
        sent += cont.len();
    }
    let _ = write.shutdown().await;
    let got = reader.await.unwrap();
    // A GOAWAY frame is type 7; its error code is the last 4 bytes of its 8-byte payload.
    let goaway = got
        .windows(9)
        .position(|w| w[3] == 0x7 && w[5..9] == [0, 0, 0, 0])
        .and_then(|i| got.get(i + 13..i + 17))
        .map(|c| u32::from_be_bytes(c.try_into().unwrap()));
    (sent, goaway)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continuation_flood() {
    let dir = tempfile::tempdir().unwrap();
    let (s, cfg) = tls_edge(dir.path()).await;
    under_flood(&s, "CONTINUATION", async {
        let t0 = Instant::now();
        let (mut conns, mut bytes, mut most, mut codes) = (0usize, 0usize, 0usize, Vec::new());
        while t0.elapsed() < FLOOD {
            let (sent, goaway) = continuation_one(connect(s.https_port, &cfg).await).await;
            assert!(
                sent < 256 << 20,
                "the edge read 256 MiB of one header block without closing"
            );
            conns += 1;
            bytes += sent;
            most = most.max(sent);
            if !codes.contains(&goaway) {
                codes.push(goaway);
            }
        }
        format!(
            "{conns} connections, {} MiB of CONTINUATION frames ({:.0} MiB/s), at most {} KiB \
             read on one connection before the edge closed it, GOAWAY codes {codes:?}",
            bytes >> 20,
            (bytes >> 20) as f64 / t0.elapsed().as_secs_f64(),
            most >> 10
        )
    })
    .await;
}
