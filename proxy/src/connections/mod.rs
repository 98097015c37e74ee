//! Client connections, around Pingora's HTTP service: the cap on open connections, a total
//! deadline for each request's header, and the edge's own answers where Pingora would answer
//! without asking it.
//!
//! Pingora times each read of a header on its own, so a client that sends one header line every
//! few seconds would hold its connection for ever (slowloris). Pingora has no hook while it reads
//! a header, so the deadline is kept here, one level out: [`Connections`] wraps the whole
//! connection, a [`HeaderClock`] runs while the edge waits for a header, and the edge's phases
//! stop it once a header is in ([`header_read`]) and restart it once an answer is done
//! ([`answered`]). A header that has begun but misses its deadline is answered 408
//! `request_timeout` and the connection closed; a connection that sent nothing is closed
//! silently, as an idle one. The [`ClientStream`] between Pingora and the socket replaces
//! Pingora's own empty 400 for a head it refuses with the edge's JSON error.

mod clock;
mod stream;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora_core::apps::ServerApp;
use pingora_core::protocols::http::ServerSession;
use pingora_core::protocols::{Shutdown, Stream, ALPN};
use pingora_core::server::ShutdownWatch;
use pingora_http::ResponseHeader;
use pingora_proxy::Session;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::access::AccessRecord;
use crate::config::ClientLimits;
use crate::error::EdgeError;
use crate::ids::RequestIds;
use crate::plane::DataPlane;
use clock::HeaderClock;
use stream::{Body, ClientStream, Left};

/// How long a refused client gets to send its request's header, so that it reads the 503
/// instead of a reset.
const REFUSAL_READ: Duration = Duration::from_secs(1);

/// How long a refused client's further bytes are read and dropped before its socket closes.
const LINGER: Duration = Duration::from_secs(2);

/// Pingora's HTTP service `app`, one connection at a time, under the edge's connection cap and
/// header deadline.
pub struct Connections<A> {
    app: Arc<A>,
    plane: Arc<DataPlane>,
    refusals: Arc<Refusals>,
}

impl<A> Connections<A> {
    /// `app`'s connections, under the limits of `plane`'s config in force.
    pub fn new(app: A, plane: Arc<DataPlane>) -> Self {
        Self {
            app: Arc::new(app),
            refusals: Arc::new(Refusals {
                ids: RequestIds::default(),
                plane: plane.clone(),
            }),
            plane,
        }
    }
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for Connections<A> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let limits = self.plane.cfg().limits.clients;
        let metrics = &self.plane.metrics;
        let open = &metrics.open_connections;
        open.inc();
        let _open = scopeguard(|| open.dec());
        if open.get() > limits.max_connections as i64 {
            refuse(stream, &self.refusals).await;
            return None;
        }
        // HTTP/2 frames its own headers (the h2 crate bounds them) and multiplexes requests on
        // tasks of their own: only HTTP/1 connections run a header clock.
        if stream.selected_alpn_proto() == Some(ALPN::H2) {
            return ServerApp::process_new(&self.app, stream, shutdown).await;
        }
        let clock = HeaderClock::starting(limits.header_timeout);
        let left = Arc::new(Left::default());
        let stream = ClientStream::new(stream, clock.clone(), self.refusals.clone(), left.clone());
        let served = CLOCK.scope(
            clock.clone(),
            ServerApp::process_new(&self.app, Box::new(stream), shutdown),
        );
        // Pingora's side of the connection (and with it the ClientStream, which leaves the
        // socket in `left`) is dropped before a branch's handler runs.
        let served = tokio::select! {
            served = served => Some(served),
            () = clock.expired() => None,
        };
        let begun = clock.begun();
        let (mut stream, replaced) = match (served, left.take()) {
            (Some(served), None) => return served,
            (Some(_), Some(left)) => (left.stream, left.replaced),
            (None, Some(mut left)) if begun => {
                let err = EdgeError::RequestTimeout(
                    "the request's header took longer than limits.header_timeout".into(),
                );
                let answer = self.refusals.answer(&err, "header_timeout", left.body);
                let sent = send(&mut left.stream, &answer, limits.send_timeout).await;
                (left.stream, sent)
            }
            (None, _) => {
                self.refusals.count("idle");
                return None;
            }
        };
        if replaced {
            linger(&mut stream).await;
        }
        None
    }

    async fn cleanup(&self) {
        self.app.cleanup().await;
    }
}

/// Writes `answer` on `stream` (within `within`) and shuts it down; whether it went out.
async fn send(stream: &mut Stream, answer: &[u8], within: Duration) -> bool {
    let sent = tokio::time::timeout(within, async {
        stream.write_all(answer).await.is_ok() && {
            Shutdown::shutdown(&mut **stream).await;
            true
        }
    });
    matches!(sent.await, Ok(true))
}

/// Reads what the client still sends, for at most [`LINGER`], before its socket closes after a
/// refusal: closing a socket with unread bytes makes the kernel reset the connection, which can
/// destroy the answer before the client reads it (nginx's lingering close).
async fn linger(stream: &mut Stream) {
    let mut scratch = [0u8; 4096];
    let drain = async { while matches!(stream.read(&mut scratch).await, Ok(n) if n > 0) {} };
    let _ = tokio::time::timeout(LINGER, drain).await;
}

/// Runs `f` when dropped (the connection count goes down however the connection ends).
fn scopeguard<F: FnOnce()>(f: F) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}

/// The edge's answers on a connection that no request phase gives: to a client beyond the cap,
/// to a head Pingora refused, to a header past its deadline. Each is a whole JSON error from the
/// one table, with a request id and `Connection: close`, logged as a request and counted in
/// `moltghost_connections_closed_total` by its reason.
struct Refusals {
    ids: RequestIds,
    plane: Arc<DataPlane>,
}

impl Refusals {
    /// Counts a connection ended for `reason`.
    fn count(&self, reason: &str) {
        let ended = &self.plane.metrics.connections_ended;
        ended.with_label_values(&[reason]).inc();
    }

    /// Notes the refusal (`reason` for the metric) and gives its head's fields, for a body of
    /// `length` bytes (typed JSON unless empty).
    fn fields(
        &self,
        err: &EdgeError,
        reason: &str,
        client_id: Option<&[u8]>,
        length: usize,
    ) -> Vec<(&'static str, String)> {
        let request_id = self.ids.for_request(client_id);
        let mut record = AccessRecord::new();
        record.request_id.clone_from(&request_id);
        record.status = err.status();
        record.error = Some(err.code());
        record.log("-", length as u64);
        self.count(reason);
        let mut fields = Vec::with_capacity(5);
        if length > 0 {
            fields.push(("content-type", "application/json".to_owned()));
        }
        fields.push(("content-length", length.to_string()));
        fields.push(("x-request-id", request_id));
        fields.push(("connection", "close".to_owned()));
        fields.extend(err.headers());
        fields
    }

    /// The answer `err`, as bytes on the wire, with as much of its body as `body` allows
    /// (`reason` for the metric).
    fn answer(&self, err: &EdgeError, reason: &str, body: Body) -> Vec<u8> {
        let status =
            http::StatusCode::from_u16(err.status()).expect("the table's statuses are valid");
        let json = err.body();
        let length = if body == Body::Empty { 0 } else { json.len() };
        let mut out = format!(
            "HTTP/1.1 {} {}\r\n",
            status.as_u16(),
            status.canonical_reason().unwrap_or("")
        );
        for (name, value) in self.fields(err, reason, None, length) {
            out.push_str(&format!("{name}: {value}\r\n"));
        }
        out.push_str("\r\n");
        let mut out = out.into_bytes();
        if body == Body::Whole {
            out.extend_from_slice(&json);
        }
        out
    }
}

/// A client beyond the cap: its request's header is read (briefly) and answered with 503
/// `overloaded`, and the connection closed. An HTTP/2 client is closed at once.
async fn refuse(stream: Stream, refusals: &Refusals) {
    if stream.selected_alpn_proto() == Some(ALPN::H2) {
        return refusals.count("over_limit");
    }
    let mut session = ServerSession::new_http1(stream);
    let read = tokio::time::timeout(REFUSAL_READ, session.read_request()).await;
    if !matches!(read, Ok(Ok(true))) {
        return refusals.count("over_limit");
    }
    let err = EdgeError::Overloaded;
    let json = err.body();
    let client_id = session.req_header().headers.get("x-request-id");
    let fields = refusals.fields(
        &err,
        "over_limit",
        client_id.map(|v| v.as_bytes()),
        json.len(),
    );
    let mut h = ResponseHeader::build(err.status(), Some(fields.len())).expect("a valid status");
    for (name, value) in fields {
        h.insert_header(name, value).expect("valid header values");
    }
    session.set_keepalive(None);
    if session.write_response_header(Box::new(h)).await.is_ok() {
        let _ = session.write_response_body(json, true).await;
    }
}

/// The limits a request's session runs under, set as its header is read: the keep-alive idle
/// time (only where Pingora keeps the connection alive: not after `Connection: close`, an
/// HTTP/1.0 request without keep-alive, or a head with both Content-Length and
/// Transfer-Encoding), the write stall allowed to a slow reader, pipelining (RFC 9112 §9.3.2:
/// pipelined requests are answered in order rather than dropped), and the header clock stopped.
pub fn header_read(session: &mut Session, limits: &ClientLimits) {
    if session.get_keepalive().is_some() {
        session.set_keepalive(Some(limits.keepalive_idle.as_secs().max(1)));
    }
    session.set_write_timeout(Some(limits.send_timeout));
    session.downstream_session.set_pipelining_enabled(true);
    let _ = CLOCK.try_with(|c| c.set(None));
}

/// The answer is done: the connection may wait `keepalive_idle`, then `header_timeout`, for the
/// header of its next request.
pub fn answered(limits: &ClientLimits) {
    let _ = CLOCK.try_with(|c| c.set(Some(limits.keepalive_idle + limits.header_timeout)));
}

tokio::task_local! {
    /// The clock of the connection the current task serves (HTTP/1 connections only).
    static CLOCK: HeaderClock;
}
