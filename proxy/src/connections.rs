//! Client connections, around Pingora's HTTP service: the cap on open connections, and a total
//! deadline for each request's header.
//!
//! Pingora times each read of a header on its own, so a client that sends one header line every
//! few seconds would hold its connection for ever (slowloris). Pingora has no hook while it reads
//! a header, so the deadline is kept here, one level out: [`Connections`] wraps the whole
//! connection, a [`HeaderClock`] runs while the edge waits for a header, and the edge's phases
//! stop it once a header is in ([`header_read`]) and restart it once an answer is done
//! ([`answered`]). A connection whose clock runs out is closed without an answer, as nginx does
//! (the client has not finished a request to answer).

use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use pingora_core::apps::ServerApp;
use pingora_core::protocols::http::ServerSession;
use pingora_core::protocols::{Stream, ALPN};
use pingora_core::server::ShutdownWatch;
use pingora_http::ResponseHeader;
use pingora_proxy::Session;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::config::ClientLimits;
use crate::error::EdgeError;
use crate::ids::RequestIds;
use crate::plane::DataPlane;

/// How long a refused client gets to send its request's header, so that it reads the 503
/// instead of a reset.
const REFUSAL_READ: Duration = Duration::from_secs(1);

/// Pingora's HTTP service `app`, one connection at a time, under the edge's connection cap and
/// header deadline.
pub struct Connections<A> {
    app: Arc<A>,
    plane: Arc<DataPlane>,
    ids: RequestIds,
}

impl<A> Connections<A> {
    /// `app`'s connections, under the limits of `plane`'s config in force.
    pub fn new(app: A, plane: Arc<DataPlane>) -> Self {
        Self {
            app: Arc::new(app),
            plane,
            ids: RequestIds::default(),
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
            metrics
                .connections_ended
                .with_label_values(&["over_limit"])
                .inc();
            refuse(stream, &self.ids).await;
            return None;
        }
        // HTTP/2 frames its own headers (the h2 crate bounds them) and multiplexes requests on
        // tasks of their own: only HTTP/1 connections run a header clock.
        if stream.selected_alpn_proto() == Some(ALPN::H2) {
            return ServerApp::process_new(&self.app, stream, shutdown).await;
        }
        let clock = HeaderClock::starting(limits.header_timeout);
        let served = CLOCK.scope(
            clock.clone(),
            ServerApp::process_new(&self.app, stream, shutdown),
        );
        tokio::select! {
            served = served => served,
            () = clock.expired() => {
                metrics.connections_ended.with_label_values(&["header_timeout"]).inc();
                None
            }
        }
    }

    async fn cleanup(&self) {
        self.app.cleanup().await;
    }
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

/// A client beyond the cap: its request's header is read (briefly) and answered with 503
/// `overloaded`, and the connection closed. An HTTP/2 client is closed at once.
async fn refuse(stream: Stream, ids: &RequestIds) {
    if stream.selected_alpn_proto() == Some(ALPN::H2) {
        return;
    }
    let mut session = ServerSession::new_http1(stream);
    if !matches!(
        tokio::time::timeout(REFUSAL_READ, session.read_request()).await,
        Ok(Ok(true))
    ) {
        return;
    }
    let err = EdgeError::Overloaded;
    let body = err.body();
    let client_id = session.req_header().headers.get("x-request-id");
    let request_id = ids.for_request(client_id.map(|v| v.as_bytes()));
    let mut h = ResponseHeader::build(err.status(), Some(6)).expect("a valid status");
    for (name, value) in [
        ("content-type", "application/json".to_owned()),
        ("content-length", body.len().to_string()),
        ("x-request-id", request_id),
    ]
    .into_iter()
    .chain(err.headers())
    {
        h.insert_header(name, value).expect("valid header values");
    }
    session.set_keepalive(None);
    if session.write_response_header(Box::new(h)).await.is_ok() {
        let _ = session.write_response_body(body, true).await;
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

/// When the header the connection waits for must be in; none while a request is served.
#[derive(Clone)]
struct HeaderClock(Arc<ClockState>);

struct ClockState {
    /// Milliseconds after [`epoch`]; `u64::MAX`: no deadline.
    deadline_ms: AtomicU64,
    changed: Notify,
}

/// The origin of deadlines stored as milliseconds.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl HeaderClock {
    /// A clock running out `within` from now.
    fn starting(within: Duration) -> Self {
        let c = Self(Arc::new(ClockState {
            deadline_ms: AtomicU64::new(u64::MAX),
            changed: Notify::new(),
        }));
        c.set(Some(within));
        c
    }

    /// Runs out `within` from now, or never (`None`).
    fn set(&self, within: Option<Duration>) {
        let ms = within.map_or(u64::MAX, |w| {
            (Instant::now() + w - epoch()).as_millis() as u64
        });
        self.0.deadline_ms.store(ms, Ordering::Release);
        self.0.changed.notify_one();
    }

    fn deadline(&self) -> Option<Instant> {
        match self.0.deadline_ms.load(Ordering::Acquire) {
            u64::MAX => None,
            ms => Some(epoch() + Duration::from_millis(ms)),
        }
    }

    /// Resolves when the clock runs out.
    async fn expired(&self) {
        loop {
            let mut changed = pin!(self.0.changed.notified());
            changed.as_mut().enable();
            match self.deadline() {
                None => changed.await,
                Some(at) if at <= Instant::now() => return,
                Some(at) => {
                    tokio::select! {
                        () = tokio::time::sleep_until(at) => {}
                        () = changed => {}
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_clock_runs_only_while_a_header_is_awaited() {
        let clock = HeaderClock::starting(Duration::from_secs(10));
        let t0 = Instant::now();
        let watch = clock.clone();
        let expired = tokio::spawn(async move {
            watch.expired().await;
            Instant::now()
        });
        tokio::time::sleep(Duration::from_secs(5)).await;
        clock.set(None); // a header is in: a long answer follows
        tokio::time::sleep(Duration::from_secs(100)).await;
        assert!(!expired.is_finished());
        clock.set(Some(Duration::from_secs(3))); // answered: the next header is awaited
        let at = expired.await.unwrap();
        assert_eq!((at - t0).as_secs(), 108);
    }
}
