//! Targets: the endpoints a run compares (direct to the runtime, the edge, peers), each with its
//! own headers (an API key, a Host) and its own connection pool.

use std::net::SocketAddr;
use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderName, HeaderValue};

/// One endpoint under test.
pub struct Target {
    /// Its label in reports.
    pub name: String,
    /// Base URL; scenario paths (`/v1/chat/completions`) are appended.
    pub base: String,
    /// The chat route: `/v1/chat/completions`, or the native `/v1/chat` (`--native`).
    pub chat_path: &'static str,
    /// For `ws://` and `wss://` targets: the WebSocket dialer (and its socket pool).
    pub websocket: Option<super::websocket::Dialer>,
    /// Pooled client (keep-alive).
    pub client: reqwest::Client,
    /// A client that opens a new connection for every request (churn).
    pub fresh: reqwest::Client,
    /// The process serving it, for CPU and memory readings.
    pub pid: Option<u32>,
}

/// What the command line says about one target.
#[derive(Debug, Clone, Default)]
pub struct TargetSpec {
    /// Label.
    pub name: String,
    /// Base URL.
    pub url: String,
    /// `Authorization: Bearer` key, if any.
    pub key: Option<String>,
    /// Extra headers.
    pub headers: Vec<(String, String)>,
    /// Process id to read costs from.
    pub pid: Option<u32>,
    /// Allow HTTP/2 (negotiated by ALPN over TLS); HTTP/1.1 only otherwise.
    pub http2: bool,
    /// Use the native chat route (`/v1/chat`) instead of OpenAI's.
    pub native: bool,
}

impl TargetSpec {
    /// Parses `name=URL`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (name, url) = s
            .split_once('=')
            .ok_or_else(|| format!("expected NAME=URL, got {s:?}"))?;
        if !["http://", "https://", "ws://", "wss://"]
            .iter()
            .any(|s| url.starts_with(s))
        {
            return Err(format!(
                "{name}: expected an http(s):// or ws(s):// URL, got {url:?}"
            ));
        }
        Ok(Self {
            name: name.into(),
            url: url.trim_end_matches('/').into(),
            ..Self::default()
        })
    }
}

impl Target {
    /// Builds the clients. `*.localhost` hosts resolve to loopback as curl does (glibc does
    /// not); `insecure` accepts any TLS certificate (self-signed test endpoints).
    pub fn new(spec: &TargetSpec, insecure: bool) -> Result<Self, String> {
        let mut headers = HeaderMap::new();
        if let Some(k) = &spec.key {
            headers.insert(
                "authorization",
                HeaderValue::from_str(&format!("Bearer {k}")).map_err(|e| e.to_string())?,
            );
        }
        for (k, v) in &spec.headers {
            let name =
                HeaderName::from_bytes(k.as_bytes()).map_err(|e| format!("header {k}: {e}"))?;
            headers.insert(
                name,
                HeaderValue::from_str(v).map_err(|e| format!("header {k}: {e}"))?,
            );
        }
        let websocket = spec.url.starts_with("ws").then(|| {
            let mut hs = spec.headers.clone();
            if let Some(k) = &spec.key {
                hs.push(("authorization".into(), format!("Bearer {k}")));
            }
            super::websocket::Dialer::new(&spec.url, hs, insecure)
        });
        let url = reqwest::Url::parse(&spec.url).map_err(|e| format!("{}: {e}", spec.url))?;
        let build = |pool: bool| {
            let mut b = reqwest::Client::builder()
                .default_headers(headers.clone())
                .no_proxy()
                .tcp_nodelay(true)
                .danger_accept_invalid_certs(insecure)
                .connect_timeout(Duration::from_secs(5));
            if !pool {
                b = b.pool_max_idle_per_host(0);
            }
            if !spec.http2 {
                b = b.http1_only();
            }
            if let Some(host) = url.host_str().filter(|h| h.ends_with(".localhost")) {
                let port = url.port_or_known_default().unwrap_or(80);
                b = b.resolve(host, SocketAddr::from(([127, 0, 0, 1], port)));
            }
            b.build().map_err(|e| e.to_string())
        };
        Ok(Self {
            name: spec.name.clone(),
            base: spec.url.clone(),
            chat_path: if spec.native {
                "/v1/chat"
            } else {
                "/v1/chat/completions"
            },
            websocket,
            client: build(true)?,
            fresh: build(false)?,
            pid: spec.pid,
        })
    }
}
