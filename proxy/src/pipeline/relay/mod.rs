//! Relaying: the runtime's answer becomes the client's. One module per way of doing it:
//!
//! - [`passthrough`]: an OpenAI route's whole answer, chunk by chunk, usage read at the end;
//! - [`sse`]: an OpenAI route's event stream, metered event by event and cut at the quota;
//! - [`native`]: the native format, whole or streamed (SSE here, frames in the WebSocket
//!   bridge, which shares its translation).

pub mod native;
pub mod passthrough;
pub mod sse;

use std::future::Future;

use bytes::Bytes;

use super::open::Opened;
use super::prepare::Relay;
use super::respond::Responder;
use super::Pipeline;
use crate::error::EdgeError;
use crate::forward::{Guard, Inbound};
use crate::sse::{SseEvent, SseScanner};

/// The most of a runtime's refusal (a 4xx body) the edge reads to pass its message on.
const MAX_REFUSAL: usize = 64 * 1024;

impl Pipeline {
    /// The runtime's answer to an HTTP client, by the exchange's relay mode.
    pub async fn relay(&self, resp: &mut Responder<'_>, x: &mut Opened) -> Result<(), EdgeError> {
        let translated = x.relay != Relay::Passthrough;
        check_status(&mut x.inbound, resp.hangup(), &mut x.guard, translated).await?;
        let streams = &self.plane.metrics.open_streams;
        match x.relay {
            Relay::Passthrough if x.inbound.is_event_stream() => sse::relay(resp, x, streams).await,
            Relay::Passthrough => passthrough::relay(resp, x).await,
            Relay::NativeAnswer => native::answer(resp, x).await,
            Relay::NativeStream => native::stream(resp, x, streams).await,
        }
    }
}

/// The runtime's status, judged the same way for every transport: a 5xx is the runtime's
/// failure (502); a 3xx or 4xx on a translated route is its refusal, with its message.
/// Pass-through routes hand 3xx and 4xx on as they are.
pub async fn check_status(
    inbound: &mut Inbound,
    hangup: impl Future<Output = ()>,
    guard: &mut Guard,
    translated: bool,
) -> Result<(), EdgeError> {
    let status = inbound.header.status.as_u16();
    if status >= 500 {
        return Err(EdgeError::UpstreamUnavailable(
            format!("the agent runtime failed with status {status}").into(),
        ));
    }
    if translated && status >= 300 {
        let body = inbound.read_to_end(hangup, guard, MAX_REFUSAL).await?;
        return Err(runtime_refusal(status, &body));
    }
    Ok(())
}

/// The runtime's own 4xx, with its message when it gave one.
fn runtime_refusal(status: u16, body: &[u8]) -> EdgeError {
    let message = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            v.pointer("/error/message")
                .and_then(|m| m.as_str())
                .map(str::to_owned)
        })
        .unwrap_or_else(|| format!("the agent runtime refused the request with status {status}"));
    EdgeError::Upstream { status, message }
}

/// Reads the runtime's next chunk of an event stream: the chunk and the events it completed;
/// `None` at the end of the body.
pub async fn next_events(
    hangup: impl Future<Output = ()>,
    inbound: &mut Inbound,
    guard: &mut Guard,
    scanner: &mut SseScanner,
) -> Result<Option<(Bytes, Vec<SseEvent>)>, EdgeError> {
    let Some(chunk) = inbound.next_chunk(hangup, guard).await? else {
        return Ok(None);
    };
    scanner.push(&chunk);
    let mut events = Vec::new();
    while let Some(ev) = scanner.next_event().map_err(|e| {
        EdgeError::UpstreamUnavailable(format!("the agent broke its stream: {e}").into())
    })? {
        events.push(ev);
    }
    Ok(Some((chunk, events)))
}

/// Counts a stream in a gauge (open streams, open WebSockets) for as long as it lives.
pub struct OpenGauge<'a>(&'a prometheus::IntGauge);

impl<'a> OpenGauge<'a> {
    /// Counts one more until dropped.
    pub fn new(gauge: &'a prometheus::IntGauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for OpenGauge<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_runtime_refusal_carries_its_message() {
        let e = runtime_refusal(400, br#"{"error":{"message":"bad role","code":"x"}}"#);
        assert_eq!(e.status(), 400);
        assert_eq!(e.message(), "bad role");
        let e = runtime_refusal(404, b"not json");
        assert_eq!(e.code(), "not_found");
        assert!(e.message().contains("status 404"));
    }

    #[test]
    fn the_gauge_counts_while_held() {
        let g = prometheus::IntGauge::new("g", "g").unwrap();
        {
            let _a = OpenGauge::new(&g);
            let _b = OpenGauge::new(&g);
            assert_eq!(g.get(), 2);
        }
        assert_eq!(g.get(), 0);
    }
}
