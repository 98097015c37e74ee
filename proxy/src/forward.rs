//! The upstream exchange: the edge has already read and judged the whole request body, so it
//! sends the request itself through Pingora's pooled [`Connector`] and streams the answer back.
//! (Pingora's own proxy path can only replay 64 KiB of a body read in `request_filter`; see
//! ARCHITECTURE.md.) Every wait here races the client's disconnect and the request's deadline.

use std::future::Future;
use std::net::IpAddr;
use std::time::Duration;

use bytes::Bytes;
use http::Method;
use pingora_core::connectors::http::Connector;
use pingora_core::connectors::ConnectorOptions;
use pingora_core::protocols::http::client::HttpSession;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::{Error, ErrorType};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::Session;
use tokio::time::Instant;

use crate::error::EdgeError;
use crate::policy::AdmissionWatch;

/// Headers that belong to one hop and are never forwarded, in either direction.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// True for a header the edge drops on the way to the runtime: hop-by-hop, framing it sets
/// itself, the caller's credentials (the key never leaves the edge), and any `x-moltghost-*`
/// header a caller could use to impersonate the edge.
fn dropped_upstream(name: &str) -> bool {
    HOP_BY_HOP.contains(&name)
        || matches!(
            name,
            "host"
                | "content-length"
                | "expect"
                | "authorization"
                | "accept-encoding"
                | "x-request-id"
        )
        || name.starts_with("x-moltghost-")
}

/// True for a runtime header the edge does not pass back (hop-by-hop; framing is the edge's).
pub fn dropped_downstream(name: &str) -> bool {
    HOP_BY_HOP.contains(&name) || name == "x-request-id"
}

/// What to send upstream.
#[derive(Debug)]
pub struct Outbound {
    /// Method.
    pub method: Method,
    /// Path and query on the runtime.
    pub path: String,
    /// The runtime's authority, for `Host`.
    pub authority: String,
    /// The whole body.
    pub body: Bytes,
    /// Content type to set instead of the client's (translated routes).
    pub content_type: Option<&'static str>,
    /// The signed caller identity, for pods (`x-moltghost-identity`).
    pub identity: Option<String>,
}

/// Builds the runtime's request header from the client's; `traceparent` (the edge's span, W3C)
/// replaces the client's.
pub fn upstream_header(
    client: &RequestHeader,
    out: &Outbound,
    request_id: &str,
    traceparent: Option<&str>,
    client_ip: Option<IpAddr>,
) -> Result<RequestHeader, EdgeError> {
    let mut h = RequestHeader::build_no_case(
        out.method.clone(),
        out.path.as_bytes(),
        Some(client.headers.len() + 4),
    )
    .map_err(|e| {
        EdgeError::InvalidRequest(format!("cannot build the upstream request: {e}").into())
    })?;
    let listed: Vec<String> = client
        .headers
        .get_all("connection")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .collect();
    let mut forwarded_for: Option<String> = None;
    for (name, value) in client.headers.iter() {
        let n = name.as_str();
        if dropped_upstream(n)
            || listed.iter().any(|l| l == n)
            || (out.content_type.is_some() && n == "content-type")
        {
            continue;
        }
        if n == "x-forwarded-for" {
            forwarded_for = value.to_str().ok().map(str::to_owned);
            continue;
        }
        h.append_header(name.clone(), value.clone())
            .expect("a parsed header is valid");
    }
    let ins = |h: &mut RequestHeader, k: &'static str, v: &str| {
        h.insert_header(k, v)
            .map_err(|_| EdgeError::InvalidRequest(format!("invalid value for header {k}").into()))
    };
    ins(&mut h, "host", &out.authority)?;
    if out.method != Method::GET || !out.body.is_empty() {
        ins(&mut h, "content-length", &out.body.len().to_string())?;
    }
    if let Some(ct) = out.content_type {
        ins(&mut h, "content-type", ct)?;
    }
    ins(&mut h, "x-request-id", request_id)?;
    if let Some(t) = traceparent {
        ins(&mut h, "traceparent", t)?;
    }
    if let Some(id) = &out.identity {
        ins(&mut h, "x-moltghost-identity", id)?;
    }
    if let Some(ip) = client_ip {
        let xff = match forwarded_for {
            Some(prev) => format!("{prev}, {ip}"),
            None => ip.to_string(),
        };
        ins(&mut h, "x-forwarded-for", &xff)?;
    }
    Ok(h)
}

/// An open exchange with the runtime: the response header has arrived, the body follows.
pub struct Inbound {
    session: HttpSession,
    /// The runtime's response header.
    pub header: ResponseHeader,
}

/// The upstream side of the edge: one pooled connector shared by every request.
pub struct Forwarder {
    connector: Connector,
}

/// Maps a connector error to the table: timeouts are 504, the rest 502.
fn upstream_error(e: &Error) -> EdgeError {
    match e.etype() {
        ErrorType::ReadTimedout | ErrorType::WriteTimedout => EdgeError::Timeout,
        ErrorType::ConnectTimedout => {
            EdgeError::UpstreamUnavailable("timed out connecting to the agent".into())
        }
        _ => EdgeError::UpstreamUnavailable(
            format!("agent unreachable: {}", e.etype().as_str()).into(),
        ),
    }
}

/// What every wait on the runtime races: the request's deadline and, for admitted requests,
/// a change that revokes them (key revoked, agent paused).
pub struct Guard {
    /// When the request times out (504, or an error event once streaming).
    pub deadline: Instant,
    /// Ends the request when its admission no longer holds.
    pub watch: Option<AdmissionWatch>,
}

/// Races `fut` against the client going away, the deadline and revocation.
pub async fn guarded<T>(
    hangup: impl Future<Output = ()>,
    guard: &mut Guard,
    fut: impl Future<Output = Result<T, EdgeError>>,
) -> Result<T, EdgeError> {
    let deadline = guard.deadline;
    let revoked = async {
        match guard.watch.as_mut() {
            Some(w) => w.revoked().await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        biased;
        r = fut => r,
        _ = tokio::time::sleep_until(deadline) => Err(EdgeError::Timeout),
        e = revoked => Err(e),
        _ = hangup => Err(EdgeError::ClientClosed),
    }
}

/// Resolves when an HTTP client hangs up (or sends what it should not), for [`guarded`].
pub async fn hangup(down: &mut Session) {
    let _ = down.downstream_session.read_body_or_idle(true).await;
}

/// Never resolves: for a client watched elsewhere (the WebSocket bridge reads its own socket).
pub fn unwatched() -> impl Future<Output = ()> {
    std::future::pending()
}

impl Forwarder {
    /// A forwarder whose pool holds up to `pool_size` idle connections.
    pub fn new(pool_size: usize) -> Self {
        let mut opts = ConnectorOptions::new(pool_size);
        opts.keepalive_pool_size = pool_size;
        Self {
            connector: Connector::new(Some(opts)),
        }
    }

    /// Sends the request and reads the response header. A pooled connection that turns out to
    /// be stale is retried on another before any response byte arrives.
    async fn send(
        &self,
        peer: &HttpPeer,
        header: &RequestHeader,
        body: &Bytes,
    ) -> Result<Inbound, EdgeError> {
        let mut attempts = 0;
        loop {
            attempts += 1;
            let (mut session, reused) = self
                .connector
                .get_http_session(peer)
                .await
                .map_err(|e| upstream_error(&e))?;
            match Self::try_send(&mut session, header, body).await {
                Ok(resp) => {
                    return Ok(Inbound {
                        session,
                        header: resp,
                    })
                }
                Err(e)
                    if reused && attempts < 3 && !matches!(e.etype(), ErrorType::ReadTimedout) =>
                {
                    tracing::debug!(error = %e, "stale pooled upstream connection; retrying on another");
                }
                Err(e) => return Err(upstream_error(&e)),
            }
        }
    }

    async fn try_send(
        session: &mut HttpSession,
        header: &RequestHeader,
        body: &Bytes,
    ) -> pingora_error::Result<ResponseHeader> {
        session
            .write_request_header(Box::new(header.clone()))
            .await?;
        if !body.is_empty() {
            session.write_request_body(body.clone(), true).await?;
        }
        session.finish_request_body().await?;
        session.read_response_header().await?;
        Ok(session
            .response_header()
            .expect("a read header is present")
            .clone())
    }

    /// Opens the exchange: connect, send, and wait for the response header, racing the client
    /// and the deadline.
    pub async fn open(
        &self,
        hangup: impl Future<Output = ()>,
        peer: &HttpPeer,
        header: &RequestHeader,
        body: &Bytes,
        guard: &mut Guard,
    ) -> Result<Inbound, EdgeError> {
        guarded(hangup, guard, self.send(peer, header, body)).await
    }

    /// Returns the connection to the pool if its response was read to the end, else closes it.
    pub async fn close(&self, mut inbound: Inbound, peer: &HttpPeer, keepalive: Duration) {
        if inbound.session.response_done() {
            self.connector
                .release_http_session(inbound.session, peer, Some(keepalive))
                .await;
        } else {
            inbound.session.shutdown().await;
        }
    }
}

impl Inbound {
    /// The next body chunk, `None` at the end; races the client and the deadline.
    pub async fn next_chunk(
        &mut self,
        hangup: impl Future<Output = ()>,
        guard: &mut Guard,
    ) -> Result<Option<Bytes>, EdgeError> {
        guarded(hangup, guard, self.read_chunk()).await
    }

    /// Reads the rest of the body, up to `limit` bytes; races the client and the deadline.
    pub async fn read_to_end(
        &mut self,
        hangup: impl Future<Output = ()>,
        guard: &mut Guard,
        limit: usize,
    ) -> Result<Bytes, EdgeError> {
        let read_all = async {
            let mut buf = bytes::BytesMut::new();
            while let Some(chunk) = self.read_chunk().await? {
                if buf.len() + chunk.len() > limit {
                    return Err(EdgeError::UpstreamUnavailable(
                        "the agent's answer is too large".into(),
                    ));
                }
                buf.extend_from_slice(&chunk);
            }
            Ok(buf.freeze())
        };
        guarded(hangup, guard, read_all).await
    }

    async fn read_chunk(&mut self) -> Result<Option<Bytes>, EdgeError> {
        match self.session.read_response_body().await {
            Ok(b) => Ok(b),
            Err(e) if matches!(e.etype(), ErrorType::ReadTimedout) => Err(EdgeError::Timeout),
            Err(e) => Err(EdgeError::UpstreamUnavailable(
                format!("the agent broke off its response: {}", e.etype().as_str()).into(),
            )),
        }
    }

    /// Whether the runtime answered with server-sent events.
    pub fn is_event_stream(&self) -> bool {
        self.header
            .headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim_start().starts_with("text/event-stream"))
    }

    /// Sets how long the runtime may stay silent between two reads.
    pub fn set_idle_timeout(&mut self, idle: Duration) {
        self.session.set_read_timeout(Some(idle));
    }
}
