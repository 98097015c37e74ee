//! The access record: what one request did, as the access log and the metrics report it. One
//! JSON line per request through `tracing` (target `access`), buffered off the request path
//! ([`crate::logwriter`]). Keys appear by id only, never the key.

use std::time::{Duration, Instant};

use moltghost_protocol::trace::{Hex, TraceParent};

use crate::routing::Route;

/// The flags of a trace the edge starts: sampled, so that the runtime and the pod record it;
/// the edge's own export samples by `traces.sampling_ratio` (`crate::traces`).
const SAMPLED: u8 = 1;

/// `bytes`, or the same with its last byte set when all are zero (W3C forbids all-zero ids).
fn nonzero<const N: usize>(mut bytes: [u8; N]) -> [u8; N] {
    if bytes == [0; N] {
        bytes[N - 1] = 1;
    }
    bytes
}

/// What the access log and the metrics say of one request (an HTTP request, or one WebSocket
/// message). Filled in as the request lives; read once, when it ends.
#[derive(Debug)]
pub struct AccessRecord {
    /// The request's id (the client's, or a fresh one).
    pub request_id: String,
    /// When the request arrived.
    pub started: Instant,
    /// Its route, once known.
    pub route: Option<Route>,
    /// Its agent's endpoint id, once known.
    pub agent: Option<String>,
    /// The caller's account id, once admitted.
    pub account: Option<String>,
    /// The caller's key id (never the key), once admitted.
    pub key_id: Option<String>,
    /// The status sent (or the error's, for a refusal).
    pub status: u16,
    /// The error code, if the request was refused or failed.
    pub error: Option<&'static str>,
    /// When admission ended (key, agent, lifecycle, request rate).
    pub admitted: Option<Instant>,
    /// When preparation ended (body, request plugins, translation).
    pub prepared: Option<Instant>,
    /// When the edge started sending the request to the runtime.
    pub upstream_sent: Option<Instant>,
    /// When the first response byte from the runtime arrived.
    pub first_byte: Option<Instant>,
    /// When the first streamed bytes went to the client.
    pub first_token: Option<Instant>,
    /// Tokens accounted for this request.
    pub tokens: Option<u64>,
    /// Of them, (prompt, completion), when the request was metered.
    pub usage: Option<(u64, u64)>,
    /// The model the request named (read only when traces are exported).
    pub model: Option<String>,
    /// The plugins' decisions, comma-separated, when plugins ran.
    pub plugins: Option<String>,
    /// Time spent in plugins, when plugins ran.
    pub plugin_time: Option<Duration>,
    /// Time spent in each plugin, `name:µs` comma-separated in the plugins' order.
    pub plugin_each: Option<String>,
    /// The request's span (W3C Trace Context): its trace (the client's, continued, or a new
    /// one) and the edge's own span id, which the runtime gets as its parent.
    pub trace: TraceParent,
    /// The client's span, when it sent a `traceparent`.
    pub trace_parent: Option<[u8; 8]>,
}

impl AccessRecord {
    /// The record of a request that arrives now.
    pub fn new() -> Self {
        Self {
            request_id: String::new(),
            started: Instant::now(),
            route: None,
            agent: None,
            account: None,
            key_id: None,
            status: 0,
            error: None,
            admitted: None,
            prepared: None,
            upstream_sent: None,
            first_byte: None,
            first_token: None,
            tokens: None,
            usage: None,
            model: None,
            plugins: None,
            plugin_time: None,
            plugin_each: None,
            trace: TraceParent {
                trace_id: nonzero(rand::random()),
                span_id: nonzero(rand::random()),
                flags: SAMPLED,
            },
            trace_parent: None,
        }
    }

    /// Continues the client's trace when its `traceparent` is valid: same trace and flags,
    /// its span the parent of the edge's. Otherwise the edge's new trace stands.
    pub fn continue_trace(&mut self, traceparent: Option<&str>) {
        if let Some(client) = traceparent.and_then(TraceParent::parse) {
            self.trace.trace_id = client.trace_id;
            self.trace.flags = client.flags;
            self.trace_parent = Some(client.span_id);
        }
    }

    /// The `Server-Timing` value of an answer whose header goes out at `now` (W3C Server
    /// Timing, milliseconds): `edge`, the edge's own time before the runtime got the request
    /// (or all of it, for an answer the edge made itself); `upstream`, the runtime's time to
    /// its response header, connect included. A stream's first token comes after its header:
    /// the access log's `ttft_us` and `moltghost_time_to_first_token_seconds` have it.
    pub fn server_timing(&self, now: Instant) -> String {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let edge = self
            .upstream_sent
            .unwrap_or(now)
            .saturating_duration_since(self.started);
        match (self.upstream_sent, self.first_byte) {
            (Some(sent), Some(first)) => format!(
                "edge;dur={:.3}, upstream;dur={:.3}",
                ms(edge),
                ms(first.saturating_duration_since(sent))
            ),
            _ => format!("edge;dur={:.3}", ms(edge)),
        }
    }

    /// Logs the finished request (`method` and `bytes_sent` from its session; a WebSocket
    /// message is logged as method `WS`).
    pub fn log(&self, method: &str, bytes_sent: u64) {
        let since = |t: Option<Instant>, from: Instant| {
            t.map(|t| t.duration_since(from).as_micros() as u64)
        };
        tracing::info!(
            target: "access",
            request_id = %self.request_id,
            method = method,
            route = self.route.map(|r| r.path()).unwrap_or("-"),
            agent = self.agent.as_deref().unwrap_or("-"),
            account = self.account.as_deref().unwrap_or("-"),
            key_id = self.key_id.as_deref().unwrap_or("-"),
            status = self.status,
            error = self.error.unwrap_or(""),
            bytes_sent = bytes_sent,
            tokens = self.tokens,
            duration_us = self.started.elapsed().as_micros() as u64,
            // Edge time before the runtime saw the request: the latency the edge adds up front.
            overhead_us = since(self.upstream_sent, self.started),
            upstream_ttfb_us = self.upstream_sent.and_then(|sent| since(self.first_byte, sent)),
            ttft_us = since(self.first_token, self.started),
            plugins = self.plugins.as_deref(),
            plugin_us = self.plugin_time.map(|t| t.as_micros() as u64),
            plugin_us_each = self.plugin_each.as_deref(),
            trace_id = %Hex(&self.trace.trace_id),
            span_id = %Hex(&self.trace.span_id),
            parent_span_id = self.trace_parent.as_ref().map(|p| tracing::field::display(Hex(p))),
        );
    }
}

impl Default for AccessRecord {
    fn default() -> Self {
        Self::new()
    }
}
