//! Reading the request body, whole and bounded, before any upstream connection is opened, so
//! that every body-based decision is made before the pod sees anything.

use bytes::{Bytes, BytesMut};
use pingora_error::ErrorType;
use pingora_proxy::Session;

use crate::error::EdgeError;

/// Reads the whole request body, refusing one over `limit` bytes with 413. Answers
/// `Expect: 100-continue` itself (the runtime never sees `Expect`).
pub async fn read(session: &mut Session, limit: usize) -> Result<Bytes, EdgeError> {
    let declared = match session.req_header().headers.get("content-length") {
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<usize>().ok())
                .ok_or_else(|| EdgeError::InvalidRequest("invalid Content-Length".into()))?,
        ),
        None => None,
    };
    if declared.is_some_and(|n| n > limit) {
        // The unread body makes the connection unusable for another request.
        session.set_keepalive(None);
        return Err(EdgeError::BodyTooLarge { limit });
    }
    let expects_continue = session
        .req_header()
        .headers
        .get("expect")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
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
    while let Some(chunk) = session
        .read_request_body()
        .await
        .map_err(|e| read_error(&e))?
    {
        total += chunk.len();
        if total > limit {
            session.set_keepalive(None);
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

fn read_error(e: &pingora_error::Error) -> EdgeError {
    match e.etype() {
        ErrorType::ConnectionClosed | ErrorType::ReadError => EdgeError::ClientClosed,
        ErrorType::ReadTimedout => {
            EdgeError::InvalidRequest("the request body did not arrive in time".into())
        }
        _ => EdgeError::InvalidRequest(
            format!("malformed request body: {}", e.etype().as_str()).into(),
        ),
    }
}
