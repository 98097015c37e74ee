//! The native format: the runtime's chat completion translated into `/v1/chat`'s answer, whole
//! or streamed. A stream's translation ([`NativeRelay`]) is shared by SSE here and by the
//! WebSocket bridge's frames, so both say the same thing and meter it the same way.

use std::future::Future;

use bytes::Bytes;
use serde_json::Value;

use super::{next_events, OpenGauge};
use crate::chat::{self, NativeStream};
use crate::error::EdgeError;
use crate::forward::{Guard, Inbound};
use crate::pipeline::accounting::{Accounting, Flow, Outcome};
use crate::pipeline::open::Opened;
use crate::pipeline::respond::Responder;
use crate::sse::SseScanner;

/// The largest whole answer the edge reads to translate.
const MAX_ANSWER: usize = 16 * 1024 * 1024;

/// A native stream in translation: the runtime's OpenAI events in, native events out, metered.
#[derive(Default)]
pub struct NativeRelay {
    scanner: SseScanner,
    native: NativeStream,
    saw_done: bool,
}

impl NativeRelay {
    /// A stream with nothing read yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The native events for the runtime's next chunk (none when it completed no event);
    /// `None` at the end of its body. A stream that crosses the quota ends with
    /// `quota_exceeded`.
    pub async fn next(
        &mut self,
        hangup: impl Future<Output = ()>,
        inbound: &mut Inbound,
        guard: &mut Guard,
        mut accounting: Option<&mut Accounting>,
    ) -> Result<Option<Vec<Value>>, EdgeError> {
        let Some((_, events)) = next_events(hangup, inbound, guard, &mut self.scanner).await?
        else {
            return Ok(None);
        };
        let mut out = Vec::new();
        for ev in &events {
            self.saw_done |= ev.data == b"[DONE]";
            if let Some(a) = accounting.as_deref_mut() {
                a.observe(&ev.data);
            }
            if let Some(event) = self.native.on_data(&ev.data) {
                out.push(event);
            }
        }
        if accounting.is_some_and(|a| a.flow() == Flow::Cut) {
            return Err(EdgeError::QuotaExceeded);
        }
        Ok(Some(out))
    }

    /// The last event (`done`, finish reason, usage), once the usage is settled; an error when
    /// the runtime cut its stream short.
    pub fn end(
        &self,
        request_id: &str,
        accounting: Option<&mut Accounting>,
    ) -> Result<Value, EdgeError> {
        if !self.saw_done && !self.native.finished() {
            return Err(EdgeError::UpstreamUnavailable(
                "the agent ended its stream early".into(),
            ));
        }
        let billed = accounting.map(|a| a.complete(None));
        Ok(self.native.finish(request_id, billed))
    }

    /// The last event of an answer the client cancelled, settled as cancelled so that it tells
    /// what was billed.
    pub fn cancelled(&self, request_id: &str, accounting: Option<&mut Accounting>) -> Value {
        let billed = accounting.map(|a| a.settle(Outcome::Cancelled));
        let mut last = self.native.finish(request_id, billed);
        last["finish_reason"] = serde_json::json!("cancelled");
        last
    }
}

/// A whole native answer.
pub async fn answer(resp: &mut Responder<'_>, x: &mut Opened) -> Result<(), EdgeError> {
    let (inbound, guard, accounting) = x.parts();
    let body = inbound
        .read_to_end(resp.hangup(), guard, MAX_ANSWER)
        .await?;
    // Settled before translating, so the client is told what was billed.
    let billed = accounting.map(|a| a.complete(Some(&body)));
    let answer = chat::answer_from_openai(&body, &resp.ctx.record.request_id, billed)?;
    let mut h = resp.header(200, "application/json");
    resp.ctx.filter_response_header(&mut h).await?;
    let answer = resp.ctx.filter_response_body(answer, true).await?;
    resp.whole(h, answer).await
}

/// A native stream as SSE: the events, then `done` and `[DONE]`. Errors after the header went
/// out end the stream with an error event.
pub async fn stream(
    resp: &mut Responder<'_>,
    x: &mut Opened,
    gauge: &prometheus::IntGauge,
) -> Result<(), EdgeError> {
    let mut h = resp.header(200, "text/event-stream");
    h.insert_header("cache-control", "no-cache")
        .expect("static value");
    resp.ctx.filter_response_header(&mut h).await?;
    resp.send_header(h, true).await?;
    let _open = OpenGauge::new(gauge);
    let (inbound, guard, accounting) = x.parts();
    let last = match events(resp, inbound, guard, accounting).await {
        Ok(last) => last,
        Err(e) => return resp.end_with_error(e).await,
    };
    let mut tail = chat::sse_event(&last).to_vec();
    tail.extend_from_slice(b"data: [DONE]\n\n");
    resp.last(Bytes::from(tail)).await
}

/// Sends the stream's events as they come; returns its last event.
async fn events(
    resp: &mut Responder<'_>,
    inbound: &mut Inbound,
    guard: &mut Guard,
    mut accounting: Option<&mut Accounting>,
) -> Result<Value, EdgeError> {
    let mut relay = NativeRelay::new();
    while let Some(out) = relay
        .next(resp.hangup(), inbound, guard, accounting.as_deref_mut())
        .await?
    {
        if !out.is_empty() {
            let mut bytes = Vec::new();
            for event in &out {
                bytes.extend_from_slice(&chat::sse_event(event));
            }
            resp.chunk(bytes.into()).await?;
        }
    }
    relay.end(&resp.ctx.record.request_id, accounting)
}
