//! Writing answers to the client: JSON bodies, errors, and the start of a stream.

use bytes::Bytes;
use pingora_http::ResponseHeader;
use pingora_proxy::Session;

use crate::error::EdgeError;

/// A response header with the edge's common headers.
pub fn header(status: u16, content_type: &str, request_id: &str) -> ResponseHeader {
    let mut h =
        ResponseHeader::build_no_case(status, Some(6)).expect("status codes used are valid");
    h.insert_header("content-type", content_type)
        .expect("static value");
    h.insert_header("x-request-id", request_id)
        .expect("request ids are visible ASCII");
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
    request_id: &str,
) -> Result<(), EdgeError> {
    let mut h = header(err.status(), "application/json", request_id);
    for (k, v) in err.headers() {
        h.insert_header(k, v).expect("error headers are valid");
    }
    write_json(session, h, err.body()).await
}
