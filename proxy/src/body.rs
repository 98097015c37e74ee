//! Reading the request body, whole and bounded, before any upstream connection is opened, so
//! that every body-based decision is made before the pod sees anything.

use bytes::{Bytes, BytesMut};
use pingora_error::ErrorType;
use pingora_proxy::Session;

use crate::error::EdgeError;

/// Reads the whole request body within `deadline` (408 after it, and the connection closes),
/// refusing one over `limit` bytes with 413. Answers `Expect: 100-continue` itself (the runtime
/// never sees `Expect`).
pub async fn read(
    session: &mut Session,
    limit: usize,
    deadline: std::time::Duration,
) -> Result<Bytes, EdgeError> {
    match tokio::time::timeout(deadline, read_within(session, limit)).await {
        Ok(read) => read,
        Err(_) => {
            session.set_keepalive(None);
            Err(EdgeError::RequestTimeout(
                format!(
                    "the request body did not arrive within {}s",
                    deadline.as_secs_f64()
                )
                .into(),
            ))
        }
    }
}

async fn read_within(session: &mut Session, limit: usize) -> Result<Bytes, EdgeError> {
    let declared = match session.req_header().headers.get("content-length") {
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<usize>().ok())
                .ok_or_else(|| EdgeError::InvalidRequest("invalid Content-Length".into()))?,
        ),
        None => None,
    };
    let expects_continue = session
        .req_header()
        .headers
        .get("expect")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if declared.is_some_and(|n| n > limit) {
        // A client that waits for 100-continue never sends the body; one that does not is
        // still sending it, and must be able to read the 413.
        if !expects_continue {
            refuse_oversized(session, declared.unwrap_or(0), limit).await;
        } else {
            session.set_keepalive(None);
        }
        return Err(EdgeError::BodyTooLarge { limit });
    }
    if expects_continue {
        session
            .write_continue_response()
            .await
            .map_err(|_| EdgeError::ClientClosed)?;
    }
    // One chunk is the common case: keep it without copying.
    let mut first: Option<Bytes> = None;
    let mut buf: Option<BytesMut> = None;
    let mut total = 0usize;
    loop {
        let chunk = match session.read_request_body().await {
            Ok(Some(chunk)) => chunk,
            Ok(None) => break,
            Err(e) => {
                // A body that could not be read leaves the connection's framing unknown: the
                // answer is the connection's last (as nginx does).
                session.set_keepalive(None);
                return Err(read_error(&e));
            }
        };
        total += chunk.len();
        if total > limit {
            refuse_oversized(session, total, limit).await;
            return Err(EdgeError::BodyTooLarge { limit });
        }
        match (&mut first, &mut buf) {
            (None, None) => first = Some(chunk),
            (Some(f), None) => {
                let mut b = BytesMut::with_capacity(declared.unwrap_or(total * 2).max(total));
                b.extend_from_slice(f);
                b.extend_from_slice(&chunk);
                buf = Some(b);
            }
            (_, Some(b)) => b.extend_from_slice(&chunk),
        }
    }
    Ok(match (first, buf) {
        (_, Some(b)) => b.freeze(),
        (Some(f), None) => f,
        (None, None) => Bytes::new(),
    })
}

/// Like nginx's lingering close: reads and discards what is left of an oversized body (at most
/// [`DRAIN_FACTOR`] times the limit, for at most [`DRAIN_TIME`]) so that the client, still
/// sending, gets to read the 413 instead of a broken pipe. Past those bounds the connection is
/// closed.
async fn refuse_oversized(session: &mut Session, seen: usize, limit: usize) {
    let drained = seen <= limit.saturating_mul(DRAIN_FACTOR)
        && tokio::time::timeout(DRAIN_TIME, async {
            let mut total = seen;
            while let Ok(Some(chunk)) = session.read_request_body().await {
                total += chunk.len();
                if total > limit.saturating_mul(DRAIN_FACTOR) {
                    return false;
                }
            }
            true
        })
        .await
        .unwrap_or(false);
    if !drained {
        session.set_keepalive(None);
    }
}

/// How many times the limit an oversized body may be drained.
const DRAIN_FACTOR: usize = 4;
/// How long an oversized body may be drained.
const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(2);

fn read_error(e: &pingora_error::Error) -> EdgeError {
    match e.etype() {
        ErrorType::ConnectionClosed | ErrorType::ReadError => EdgeError::ClientClosed,
        ErrorType::ReadTimedout => {
            EdgeError::RequestTimeout("the request body stalled past the read timeout".into())
        }
        _ => EdgeError::InvalidRequest(
            format!("malformed request body: {}", e.etype().as_str()).into(),
        ),
    }
}
