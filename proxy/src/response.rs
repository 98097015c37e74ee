//! Writing answers to the client: JSON bodies, errors, the start of a stream, and the headers
//! every answer carries (request id, rate and quota state).

use bytes::Bytes;
use pingora_http::ResponseHeader;
use pingora_proxy::Session;

use crate::edge::RequestCtx;
use crate::error::EdgeError;

/// Adds the request id and, once known, the rate and token headers (OpenAI's names).
pub fn decorate(h: &mut ResponseHeader, ctx: &RequestCtx) {
    h.insert_header("x-request-id", &ctx.request_id)
        .expect("request ids are visible ASCII");
    if let Some(r) = ctx.rate {
        h.insert_header("x-ratelimit-limit-requests", r.limit.to_string())
            .expect("digits");
        h.insert_header("x-ratelimit-remaining-requests", r.remaining.to_string())
            .expect("digits");
        h.insert_header("x-ratelimit-reset-requests", format!("{}s", r.reset_secs))
            .expect("digits");
    }
    if let Some((limit, remaining)) = ctx.tokens_left {
        h.insert_header("x-ratelimit-limit-tokens", limit.to_string())
            .expect("digits");
        h.insert_header("x-ratelimit-remaining-tokens", remaining.to_string())
            .expect("digits");
    }
}

/// A response header with the edge's common headers.
pub fn header(status: u16, content_type: &str, ctx: &RequestCtx) -> ResponseHeader {
    let mut h =
        ResponseHeader::build_no_case(status, Some(10)).expect("status codes used are valid");
    h.insert_header("content-type", content_type)
        .expect("static value");
    decorate(&mut h, ctx);
    h
}

/// Marks a header as the start of a body of unknown length: chunked on HTTP/1.1 (Pingora would
/// otherwise delimit it by closing the connection).
pub fn streaming(session: &Session, h: &mut ResponseHeader) {
    h.remove_header("content-length");
    if !session.is_http2() {
        h.insert_header("transfer-encoding", "chunked")
            .expect("static value");
    }
}

/// Writes a whole JSON answer.
pub async fn write_json(
    session: &mut Session,
    mut h: ResponseHeader,
    body: Bytes,
) -> Result<(), EdgeError> {
    h.insert_header("content-length", body.len().to_string())
        .expect("digits");
    session
        .write_response_header(Box::new(h), false)
        .await
        .map_err(|_| EdgeError::ClientClosed)?;
    session
        .write_response_body(Some(body), true)
        .await
        .map_err(|_| EdgeError::ClientClosed)
}

/// Writes `err` as the whole answer.
pub async fn write_error(
    session: &mut Session,
    err: &EdgeError,
    ctx: &RequestCtx,
) -> Result<(), EdgeError> {
    let mut h = header(err.status(), "application/json", ctx);
    for (k, v) in err.headers() {
        h.insert_header(k, v).expect("error headers are valid");
    }
    write_json(session, h, err.body()).await
}
