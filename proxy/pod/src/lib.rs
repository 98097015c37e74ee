//! The pod's sidecar (`moltghost-pod`): terminates the edge's WireGuard tunnel next to the agent
//! runtime and forwards what comes through it to the runtime.
//!
//! Only the edge's keys may handshake (several during a key rotation's overlap, each its own
//! tunnel). Inside the tunnel every request must carry a valid caller identity signed by the
//! edge (`x-moltghost-identity`): defence in depth, should anything else ever reach the tunnel.
//! The runtime receives the caller as plain headers instead.
//!
//! With `--otlp-endpoint`, a request the edge's trace samples gets a span of the sidecar's own
//! (`pod`, the edge's span its parent, from the identity check until the request is handed to
//! the runtime), and the runtime gets that span as its parent in `traceparent`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use boringtun::noise::{Packet, Tunn};
use boringtun::x25519::{PublicKey, StaticSecret};
use moltghost_protocol::head;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use moltghost_common::identity::{CallerIdentity, IdentityVerifier};
use moltghost_common::otlp::{self, SpanQueue};
use moltghost_protocol::error::EdgeError;
use moltghost_protocol::trace::TraceParent;
use moltghost_tunnel::{bind_udp, keys, Link, LinkConfig, Role, POD_PORT};

/// Where the sidecar gets the edge's identity keys.
#[derive(Debug, Clone)]
pub enum JwksSource {
    /// The admin API's `/.well-known/jwks.json` (refetched every few minutes, and when a token
    /// names a key it does not know).
    Url(String),
    /// A JWKS file.
    File(std::path::PathBuf),
}

/// What the sidecar runs with.
pub struct PodConfig {
    /// UDP address to listen on.
    pub listen: SocketAddr,
    /// The pod's private key.
    pub secret: StaticSecret,
    /// The edge keys allowed to connect.
    pub edge_keys: Vec<PublicKey>,
    /// Optional preshared key.
    pub preshared: Option<[u8; 32]>,
    /// The runtime's address.
    pub upstream: SocketAddr,
    /// The edge's identity keys.
    pub jwks: JwksSource,
    /// Largest packet inside the tunnel.
    pub mtu: usize,
    /// `--tun NAME`: carry the connections with the kernel's TCP through this TUN device
    /// (address 10.7.0.2/24) instead of smoltcp.
    pub tun: Option<String>,
    /// `--otlp-endpoint`: the OpenTelemetry collector (OTLP over HTTP) the sidecar's spans go
    /// to; none when absent.
    pub otlp_endpoint: Option<String>,
}

/// A running sidecar.
pub struct Pod {
    links: Vec<Arc<Link>>,
    /// The UDP address it listens on.
    pub local_addr: SocketAddr,
}

impl Pod {
    /// Each tunnel's health, by edge key.
    pub fn status(&self) -> Vec<(String, moltghost_tunnel::LinkStatus)> {
        self.links
            .iter()
            .map(|l| (keys::encode(l.peer_key()), l.status()))
            .collect()
    }
}

/// Starts the sidecar on the current runtime: the tunnels, the datagram receiver and the HTTP
/// server inside the tunnel. Fails when the JWKS cannot be had.
pub async fn start(cfg: PodConfig) -> Result<Pod, String> {
    let verifier = Arc::new(ArcSwap::from_pointee(load_jwks(&cfg.jwks).await?));
    let (send, recv) = bind_udp(cfg.listen).map_err(|e| format!("udp {}: {e}", cfg.listen))?;
    let local_addr = send.local_addr().map_err(|e| e.to_string())?;
    let links: Vec<Arc<Link>> = cfg
        .edge_keys
        .iter()
        .enumerate()
        .map(|(i, edge)| {
            Link::new(
                LinkConfig {
                    secret: cfg.secret.clone(),
                    peer: *edge,
                    preshared: cfg.preshared,
                    endpoint: None,
                    role: Role::Responder {
                        port: POD_PORT,
                        backlog: 16,
                    },
                    index: i as u32 + 1,
                    mtu: cfg.mtu,
                    keepalive: None,
                },
                send.clone(),
            )
        })
        .collect();
    let spans = cfg.otlp_endpoint.as_ref().map(|endpoint| {
        let url = format!("{}/v1/traces", endpoint.trim_end_matches('/'));
        let public = keys::public_of(&cfg.secret);
        let (queue, exporter) = otlp::channel(url, "moltghost-pod", &public);
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap_or_default();
        tokio::spawn(exporter.run(move |url, body| {
            let client = client.clone();
            async move { otlp::post_protobuf(&client, url, body).await }
        }));
        queue
    });
    let forward = Arc::new(Forward {
        upstream: cfg.upstream,
        verifier: verifier.clone(),
        jwks: cfg.jwks.clone(),
        refreshed: std::sync::Mutex::new(None),
        spans,
    });
    for link in &links {
        tokio::spawn(link.clone().run_timers());
    }
    match &cfg.tun {
        Some(name) => {
            let addr = format!("{}/24", moltghost_tunnel::POD_ADDR);
            let tun = Arc::new(
                moltghost_tunnel::tun::TunDevice::create(name, &addr, cfg.mtu)
                    .map_err(|e| format!("--tun {name}: {e}"))?,
            );
            for link in &links {
                link.attach_tun(tun.clone());
            }
            // The kernel's answers go back through the edge heard from last (every edge is
            // 10.7.0.1 inside its tunnel; two only during a key rotation).
            let out = links.clone();
            let reader = tun.clone();
            tokio::spawn(async move {
                reader
                    .read_loop(|packet| {
                        if let Some(link) = out.iter().max_by_key(|l| l.last_heard()) {
                            link.send_packet(packet);
                        }
                    })
                    .await
            });
            let listener = tokio::net::TcpListener::bind((moltghost_tunnel::POD_ADDR, POD_PORT))
                .await
                .map_err(|e| format!("listening on the TUN address: {e}"))?;
            let forward = forward.clone();
            tokio::spawn(async move {
                // The device lives as long as its listener.
                let _tun = tun;
                while let Ok((conn, _)) = listener.accept().await {
                    let _ = conn.set_nodelay(true);
                    tokio::spawn(forward.clone().serve(conn));
                }
            });
        }
        None => {
            for link in &links {
                let (link, forward) = (link.clone(), forward.clone());
                tokio::spawn(async move {
                    loop {
                        let stream = link.accept().await;
                        tokio::spawn(forward.clone().serve(stream));
                    }
                });
            }
        }
    }
    let demux = Demux {
        secret: cfg.secret.clone(),
        public: PublicKey::from(&cfg.secret),
        links: links.clone(),
    };
    tokio::spawn(moltghost_tunnel::receive(recv, move |batch| {
        for (datagram, from) in batch {
            match demux.link_for(datagram) {
                Some(link) => link.input([(datagram, from)]),
                None => tracing::debug!(%from, "datagram for no tunnel of this pod: dropped"),
            }
        }
    }));
    if let JwksSource::Url(_) = &cfg.jwks {
        let (source, verifier) = (cfg.jwks.clone(), verifier);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(300)).await;
                if let Ok(v) = load_jwks(&source).await {
                    verifier.store(Arc::new(v));
                }
            }
        });
    }
    tracing::info!(listen = %local_addr, public_key = %keys::public_of(&cfg.secret), edges = links.len(), upstream = %cfg.upstream, "pod sidecar up");
    Ok(Pod { links, local_addr })
}

/// Which tunnel a datagram belongs to: a handshake initiation by the key that sent it (a key
/// not allowed matches none), anything else by the session index it names.
struct Demux {
    secret: StaticSecret,
    public: PublicKey,
    links: Vec<Arc<Link>>,
}

impl Demux {
    fn link_for(&self, datagram: &[u8]) -> Option<&Arc<Link>> {
        match Tunn::parse_incoming_packet(datagram).ok()? {
            Packet::HandshakeInit(init) => {
                let half = boringtun::noise::handshake::parse_handshake_anon(
                    &self.secret,
                    &self.public,
                    &init,
                )
                .ok()?;
                self.links
                    .iter()
                    .find(|l| *l.peer_key() == half.peer_static_public)
            }
            Packet::HandshakeResponse(p) => self.by_index(p.receiver_idx),
            Packet::PacketCookieReply(p) => self.by_index(p.receiver_idx),
            Packet::PacketData(p) => self.by_index(p.receiver_idx),
        }
    }

    fn by_index(&self, receiver: u32) -> Option<&Arc<Link>> {
        let i = (receiver >> 8) as usize;
        self.links.get(i.checked_sub(1)?)
    }
}

async fn load_jwks(source: &JwksSource) -> Result<IdentityVerifier, String> {
    let text = match source {
        JwksSource::File(p) => {
            std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?
        }
        JwksSource::Url(u) => {
            let client = reqwest::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(5))
                .build()
                .map_err(|e| e.to_string())?;
            let mut last = String::new();
            let mut text = None;
            // The edge may still be starting: try for a while.
            for _ in 0..50 {
                match client
                    .get(u)
                    .send()
                    .await
                    .and_then(|r| r.error_for_status())
                {
                    Ok(r) => {
                        text = r.text().await.ok();
                        break;
                    }
                    Err(e) => last = e.to_string(),
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            text.ok_or_else(|| format!("cannot fetch the edge's JWKS from {u}: {last}"))?
        }
    };
    IdentityVerifier::from_jwks(&text)
}

struct Forward {
    upstream: SocketAddr,
    verifier: Arc<ArcSwap<IdentityVerifier>>,
    jwks: JwksSource,
    refreshed: std::sync::Mutex<Option<std::time::Instant>>,
    /// Where the sidecar's spans go, when it exports them.
    spans: Option<SpanQueue>,
}

/// The sidecar's span of one request the edge's trace samples: its parent (the edge's span)
/// and its own id, which the runtime gets as its parent.
struct PodSpan {
    parent: TraceParent,
    own: TraceParent,
    started: SystemTime,
    method: String,
    path: String,
}

impl PodSpan {
    /// The span for `h`, when spans are exported and the edge's `traceparent` is sampled.
    fn start(spans: &Option<SpanQueue>, h: &head::RequestHead<'_>) -> Option<Self> {
        spans.as_ref()?;
        let value = h
            .headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("traceparent"))?
            .1;
        let parent = TraceParent::parse(std::str::from_utf8(value).ok()?)?;
        if parent.flags & 1 == 0 {
            return None;
        }
        Some(Self {
            parent,
            own: TraceParent {
                span_id: otlp::span_id(),
                ..parent
            },
            started: SystemTime::now(),
            method: h.method.to_owned(),
            path: h.path.to_owned(),
        })
    }

    /// The finished span: the request was handed to the runtime now.
    fn finish(self, caller: &CallerIdentity) -> opentelemetry_proto::tonic::trace::v1::Span {
        use opentelemetry_proto::tonic::trace::v1::{span::SpanKind, Span};
        Span {
            trace_id: self.parent.trace_id.to_vec(),
            span_id: self.own.span_id.to_vec(),
            parent_span_id: self.parent.span_id.to_vec(),
            flags: u32::from(self.parent.flags),
            name: "pod".into(),
            kind: SpanKind::Server as i32,
            start_time_unix_nano: otlp::unix_nanos(self.started),
            end_time_unix_nano: otlp::unix_nanos(SystemTime::now()),
            attributes: vec![
                otlp::attr("http.request.method", &self.method),
                otlp::attr("url.path", &self.path),
                otlp::attr("moltghost.account", &caller.sub),
                otlp::attr("moltghost.key_id", &caller.key),
                otlp::attr("moltghost.agent", &caller.agent),
            ],
            ..Default::default()
        }
    }
}

type EdgeWriter<S> = Arc<tokio::sync::Mutex<tokio::io::WriteHalf<S>>>;

impl Forward {
    /// Refetching the JWKS on a failed check is allowed every 10 s, so that a flood of bad
    /// tokens cannot turn into a flood of fetches.
    fn may_refresh(&self) -> bool {
        let mut last = self.refreshed.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        if last.is_some_and(|t| now.duration_since(t) < Duration::from_secs(10)) {
            return false;
        }
        *last = Some(now);
        true
    }

    /// The caller in `token`, checked against the edge's keys (fetched again once if a rotated
    /// key is not known yet).
    async fn verify(&self, token: Option<&str>) -> Result<CallerIdentity, String> {
        let token = token.ok_or("the request carries no caller identity from the edge")?;
        match self.verifier.load().verify(token) {
            Ok(c) => Ok(c),
            Err(first) if !self.may_refresh() => Err(first),
            Err(first) => {
                let v = Arc::new(load_jwks(&self.jwks).await.map_err(|_| first)?);
                self.verifier.store(v.clone());
                v.verify(token)
            }
        }
    }

    /// One connection from the edge. Request heads are parsed, their identity checked and
    /// rewritten for the runtime; bodies and answers pass as bytes on one kept-alive
    /// connection to the runtime per tunnel connection (the edge sends one request at a time
    /// on a connection, so answers need no parsing).
    async fn serve<S>(self: Arc<Self>, stream: S)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
    {
        let (mut from_edge, to_edge) = tokio::io::split(stream);
        let to_edge: EdgeWriter<S> = Arc::new(tokio::sync::Mutex::new(to_edge));
        let mut buf: Vec<u8> = Vec::with_capacity(16 * 1024);
        let mut chunk = vec![0u8; 64 * 1024];
        let mut out: Vec<u8> = Vec::with_capacity(1024);
        let mut runtime: Option<tokio::net::tcp::OwnedWriteHalf> = None;
        loop {
            // The next request head.
            let parsed = loop {
                match head::parse(&buf) {
                    Ok(Some(h)) => break Ok(h),
                    Err(e) => break Err(e),
                    Ok(None) => {}
                }
                match from_edge.read(&mut chunk).await {
                    Ok(0) | Err(_) => {
                        if let Some(mut w) = runtime.take() {
                            let _ = w.shutdown().await;
                        }
                        return;
                    }
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            };
            let h = match parsed {
                Ok(h) => h,
                Err(e) => {
                    let why = match e {
                        head::HeadError::Unsized => "request bodies must have a Content-Length",
                        head::HeadError::TooLarge => "request head too large",
                        head::HeadError::Malformed => "malformed request head",
                    };
                    return reply(&to_edge, &EdgeError::InvalidRequest(why.into())).await;
                }
            };
            let caller = match self.verify(h.identity).await {
                Ok(c) => c,
                Err(why) => {
                    tracing::warn!(reason = %why, "request without a valid caller identity refused");
                    return reply(&to_edge, &EdgeError::InvalidIdentity(why.into())).await;
                }
            };
            out.clear();
            let span = PodSpan::start(&self.spans, &h);
            let traceparent = span.as_ref().map(|s| s.own.header());
            let mut add = vec![
                ("x-moltghost-account", caller.sub.as_str()),
                ("x-moltghost-key-id", caller.key.as_str()),
                ("x-moltghost-agent", caller.agent.as_str()),
            ];
            if let Some(t) = &traceparent {
                add.push(("traceparent", t));
            }
            head::rewrite(&h, &add, &mut out);
            let (head_len, body_len, upgrade) = (h.len, h.body_len, h.upgrade);
            buf.drain(..head_len);
            if runtime.is_none() {
                match tokio::net::TcpStream::connect(self.upstream).await {
                    Ok(conn) => {
                        let _ = conn.set_nodelay(true);
                        let (r, w) = conn.into_split();
                        tokio::spawn(copy_answers(r, to_edge.clone()));
                        runtime = Some(w);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "runtime unreachable");
                        let e = EdgeError::RuntimeUnreachable(
                            "the agent runtime is unreachable from its pod".into(),
                        );
                        return reply(&to_edge, &e).await;
                    }
                }
            }
            let Some(w) = runtime.as_mut() else { return };
            // The head, then the body as it comes.
            let now = (body_len.min(buf.len() as u64)) as usize;
            out.extend_from_slice(&buf[..now]);
            buf.drain(..now);
            if w.write_all(&out).await.is_err() {
                return;
            }
            let mut left = body_len - now as u64;
            while left > 0 {
                let want = left.min(chunk.len() as u64) as usize;
                match from_edge.read(&mut chunk[..want]).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if w.write_all(&chunk[..n]).await.is_err() {
                            return;
                        }
                        left -= n as u64;
                    }
                }
            }
            if let (Some(span), Some(queue)) = (span, &self.spans) {
                queue.push(vec![span.finish(&caller)]);
            }
            if upgrade {
                // A switched protocol (a WebSocket): bytes both ways from here on.
                let _ = w.write_all(&buf).await;
                let _ = tokio::io::copy(&mut from_edge, w).await;
                return;
            }
        }
    }
}

/// Copies the runtime's answers to the edge until the runtime closes the connection.
async fn copy_answers<S: tokio::io::AsyncWrite>(
    mut from: tokio::net::tcp::OwnedReadHalf,
    to: EdgeWriter<S>,
) {
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.lock().await.write_all(&chunk[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
    let _ = to.lock().await.shutdown().await;
}

/// Answers the edge with an error from the table, and closes the connection.
async fn reply<S: tokio::io::AsyncWrite>(to: &EdgeWriter<S>, err: &EdgeError) {
    let status = err.status();
    let reason = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Error");
    let body = err.body();
    let answer = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let mut answer = answer.into_bytes();
    answer.extend_from_slice(&body);
    let mut w = to.lock().await;
    let _ = w.write_all(&answer).await;
    let _ = w.shutdown().await;
}
