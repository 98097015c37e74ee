//! An OpenAI route's event stream. Unmetered, chunks pass as they come. Metered, complete
//! events pass byte for byte (the whole chunk, uncopied, when it ends on an event boundary),
//! except the usage chunk the edge asked for on its own; `[DONE]` waits until the usage is
//! settled, and a stream that crosses the quota is cut with an error event.

use bytes::Bytes;

use super::passthrough::pass_header;
use super::{next_events, OpenGauge};
use crate::error::EdgeError;
use crate::forward::{Guard, Inbound};
use crate::pipeline::accounting::{Accounting, Flow};
use crate::pipeline::open::Opened;
use crate::pipeline::respond::Responder;
use crate::sse::SseScanner;
use crate::usage::EventKind;

/// Relays an event stream (see the module's doc). Errors after the header went out end the
/// stream with an error event.
pub async fn relay(
    resp: &mut Responder<'_>,
    x: &mut Opened,
    gauge: &prometheus::IntGauge,
) -> Result<(), EdgeError> {
    let (inbound, guard, accounting) = x.parts();
    pass_header(resp, inbound, true).await?;
    let _open = OpenGauge::new(gauge);
    let result = match accounting {
        None => unmetered(resp, inbound, guard).await,
        Some(a) => metered(resp, inbound, guard, a).await,
    };
    match result {
        Ok(()) => resp.finish().await,
        Err(e) => resp.end_with_error(e).await,
    }
}

async fn unmetered(
    resp: &mut Responder<'_>,
    inbound: &mut Inbound,
    guard: &mut Guard,
) -> Result<(), EdgeError> {
    while let Some(chunk) = inbound.next_chunk(resp.hangup(), guard).await? {
        resp.chunk(chunk).await?;
    }
    Ok(())
}

async fn metered(
    resp: &mut Responder<'_>,
    inbound: &mut Inbound,
    guard: &mut Guard,
    a: &mut Accounting,
) -> Result<(), EdgeError> {
    let mut scanner = SseScanner::new();
    while let Some((chunk, events)) =
        next_events(resp.hangup(), inbound, guard, &mut scanner).await?
    {
        let mut out = Vec::with_capacity(events.len());
        for ev in events {
            let kind = a.observe(&ev.data);
            if kind == EventKind::Done {
                a.complete(None);
            }
            if !a.hides(kind) {
                out.push(ev.raw);
            }
        }
        if a.flow() == Flow::Cut {
            return Err(EdgeError::QuotaExceeded);
        }
        let whole =
            scanner.buffered() == 0 && out.iter().map(Bytes::len).sum::<usize>() == chunk.len();
        let bytes = if whole {
            chunk
        } else {
            Bytes::from(out.concat())
        };
        if !bytes.is_empty() {
            resp.chunk(bytes).await?;
        }
    }
    let rest = scanner.take_rest();
    if !rest.is_empty() {
        resp.chunk(rest).await?;
    }
    a.complete(None);
    Ok(())
}
