//! The pod's sidecar (`moltghost-pod`): terminates the edge's WireGuard tunnel next to the agent
//! runtime and forwards what comes through it to the runtime.
//!
//! Only the edge's keys may handshake (several during a key rotation's overlap, each its own
//! tunnel). Inside the tunnel every request must carry a valid caller identity signed by the
//! edge (`x-moltghost-identity`): defence in depth, should anything else ever reach the tunnel.
//! The runtime receives the caller as plain headers instead.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use boringtun::noise::{Packet, Tunn};
use boringtun::x25519::{PublicKey, StaticSecret};
use bytes::Bytes;
use futures_util::TryStreamExt;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};

use crate::identity::IdentityVerifier;
use crate::tunnel::{bind_udp, keys, Link, LinkConfig, Role, POD_PORT};

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
    /// The runtime: `http://host:port`, no trailing slash.
    pub upstream: String,
    /// The edge's identity keys.
    pub jwks: JwksSource,
    /// Largest packet inside the tunnel.
    pub mtu: usize,
}

/// A running sidecar.
pub struct Pod {
    links: Vec<Arc<Link>>,
    /// The UDP address it listens on.
    pub local_addr: SocketAddr,
}

impl Pod {
    /// Each tunnel's health, by edge key.
    pub fn status(&self) -> Vec<(String, crate::tunnel::LinkStatus)> {
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
    let client = reqwest::Client::builder()
        .no_proxy()
        .tcp_nodelay(true)
        .pool_idle_timeout(Duration::from_secs(60))
        .build()
        .map_err(|e| e.to_string())?;
    let forward = Arc::new(Forward {
        client,
        upstream: cfg.upstream.trim_end_matches('/').to_owned(),
        verifier: verifier.clone(),
        jwks: cfg.jwks.clone(),
        refreshed: std::sync::Mutex::new(None),
    });
    for link in &links {
        tokio::spawn(link.clone().run_timers());
        let (link, forward) = (link.clone(), forward.clone());
        tokio::spawn(async move {
            loop {
                let stream = link.accept().await;
                let forward = forward.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let forward = forward.clone();
                        async move { Ok::<_, Infallible>(forward.handle(req).await) }
                    });
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, service)
                        .await;
                });
            }
        });
    }
    let demux = Demux {
        secret: cfg.secret.clone(),
        public: PublicKey::from(&cfg.secret),
        links: links.clone(),
    };
    tokio::spawn(crate::tunnel::receive(recv, move |batch| {
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

type Body = BoxBody<Bytes, std::io::Error>;

struct Forward {
    client: reqwest::Client,
    upstream: String,
    verifier: Arc<ArcSwap<IdentityVerifier>>,
    jwks: JwksSource,
    refreshed: std::sync::Mutex<Option<std::time::Instant>>,
}

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

    /// Checks the caller identity, then passes the request to the runtime and streams its
    /// answer back.
    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let token = req
            .headers()
            .get("x-moltghost-identity")
            .and_then(|v| v.to_str().ok());
        let Some(token) = token else {
            return refuse("the request carries no caller identity from the edge");
        };
        let caller = match self.verifier.load().verify(token) {
            Ok(c) => c,
            Err(first) if !self.may_refresh() => return refuse(&first),
            Err(first) => {
                // A key the pod has not seen yet (the edge rotated it): fetch the JWKS again.
                match load_jwks(&self.jwks).await {
                    Ok(v) => {
                        let v = Arc::new(v);
                        self.verifier.store(v.clone());
                        match v.verify(token) {
                            Ok(c) => c,
                            Err(e) => return refuse(&e),
                        }
                    }
                    Err(_) => return refuse(&first),
                }
            }
        };
        let (parts, body) = req.into_parts();
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let mut out = self
            .client
            .request(parts.method, format!("{}{path}", self.upstream));
        for (name, value) in &parts.headers {
            if matches!(
                name.as_str(),
                "host" | "connection" | "keep-alive" | "transfer-encoding" | "te" | "upgrade"
            ) || name.as_str().starts_with("x-moltghost-")
            {
                continue;
            }
            out = out.header(name, value);
        }
        out = out
            .header("x-moltghost-account", &caller.sub)
            .header("x-moltghost-key-id", &caller.key)
            .header("x-moltghost-agent", &caller.agent);
        let body = reqwest::Body::wrap_stream(body.into_data_stream());
        match out.body(body).send().await {
            Ok(resp) => {
                let mut builder = Response::builder().status(resp.status());
                for (name, value) in resp.headers() {
                    if !matches!(
                        name.as_str(),
                        "connection" | "keep-alive" | "transfer-encoding"
                    ) {
                        builder = builder.header(name, value);
                    }
                }
                let stream = resp
                    .bytes_stream()
                    .map_ok(Frame::data)
                    .map_err(std::io::Error::other);
                builder
                    .body(BodyExt::boxed(StreamBody::new(stream)))
                    .unwrap_or_else(|_| error(502, "bad answer from the runtime"))
            }
            Err(e) => {
                tracing::warn!(error = %e, "runtime unreachable");
                error(502, "the agent runtime is unreachable from its pod")
            }
        }
    }
}

fn refuse(why: &str) -> Response<Body> {
    tracing::warn!(
        reason = why,
        "request without a valid caller identity refused"
    );
    error(401, why)
}

fn error(status: u16, message: &str) -> Response<Body> {
    let (kind, code) = if status == 401 {
        ("authentication_error", "invalid_identity")
    } else {
        ("upstream_error", "runtime_unreachable")
    };
    let body = serde_json::json!({"error": {"message": message, "type": kind, "code": code}});
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(BodyExt::boxed(
            Full::new(Bytes::from(body.to_string())).map_err(|e: Infallible| match e {}),
        ))
        .expect("a static response")
}
