//! The responder: everything the edge writes to an HTTP client goes through it. It owns the
//! status and the headers every answer carries (request id, rate and quota state), error
//! bodies (all from the one table, [`crate::error::EdgeError`]), the response-side plugins'
//! view of headers and body, first-token timing, and the end of a stream that fails after its
//! headers went out (an SSE error event).

use std::time::Instant;

use bytes::Bytes;
use pingora_http::ResponseHeader;
use pingora_proxy::Session;

use super::RequestCtx;
use crate::error::EdgeError;
use crate::forward;
use crate::plugins::Verdict;

/// Adds the request id, the `Server-Timing` header (unless turned off) and, once known, the
/// rate and token headers (OpenAI's names).
pub fn decorate(h: &mut ResponseHeader, ctx: &RequestCtx) {
    h.insert_header("x-request-id", &ctx.record.request_id)
        .expect("request ids are visible ASCII");
    if ctx.server_timing {
        h.insert_header("server-timing", ctx.record.server_timing(Instant::now()))
            .expect("metric names and digits");
    }
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

/// An HTTP request's client, and the request's state, for writing the answer.
pub struct Responder<'a> {
    /// The client's session.
    pub session: &'a mut Session,
    /// The request's state.
    pub ctx: &'a mut RequestCtx,
}

impl<'a> Responder<'a> {
    /// A responder for `session`.
    pub fn new(session: &'a mut Session, ctx: &'a mut RequestCtx) -> Self {
        Self { session, ctx }
    }

    /// A response header with the edge's common headers.
    pub fn header(&self, status: u16, content_type: &str) -> ResponseHeader {
        let mut h =
            ResponseHeader::build_no_case(status, Some(10)).expect("status codes used are valid");
        h.insert_header("content-type", content_type)
            .expect("static value");
        decorate(&mut h, self.ctx);
        h
    }

    /// Resolves when the client hangs up (for the waits on the runtime).
    pub async fn hangup(&mut self) {
        forward::hangup(self.session).await
    }

    /// Writes the header of a body to follow. `stream`: its length is not known: chunked on
    /// HTTP/1.1, delimited by closing the connection on HTTP/1.0 (which has no chunked coding,
    /// RFC 9112 §6.1), framed by HTTP/2 itself. Responses whose body the plugins see are
    /// re-framed the same way.
    pub async fn send_header(
        &mut self,
        mut h: ResponseHeader,
        stream: bool,
    ) -> Result<(), EdgeError> {
        if stream || !h.headers.contains_key("content-length") {
            h.remove_header("content-length");
            h.remove_header("transfer-encoding");
            if self.session.req_header().version == http::Version::HTTP_11 {
                h.insert_header("transfer-encoding", "chunked")
                    .expect("static value");
            }
        }
        if self.ctx.holds_header() {
            // A plugin paused it: it goes out with the first body bytes that pass.
            self.ctx.held_header = Some(Box::new(h));
            return Ok(());
        }
        self.ctx.responded_with(h.status.as_u16());
        self.session
            .write_response_header(Box::new(h), false)
            .await
            .map_err(|_| EdgeError::ClientClosed)
    }

    /// Writes a whole answer with its length.
    pub async fn whole(&mut self, mut h: ResponseHeader, body: Bytes) -> Result<(), EdgeError> {
        h.insert_header("content-length", body.len().to_string())
            .expect("digits");
        self.ctx.responded_with(h.status.as_u16());
        self.session
            .write_response_header(Box::new(h), false)
            .await
            .map_err(|_| EdgeError::ClientClosed)?;
        self.session
            .write_response_body(Some(body), true)
            .await
            .map_err(|_| EdgeError::ClientClosed)
    }

    /// Writes `err` as the whole answer: its status, its headers, its JSON body.
    pub async fn error(&mut self, err: &EdgeError) -> Result<(), EdgeError> {
        let mut h = self.header(err.status(), "application/json");
        for (k, v) in err.headers() {
            h.insert_header(k, v).expect("error headers are valid");
        }
        self.whole(h, err.body()).await
    }

    /// Sends what a plugin decided instead of the runtime's answer, in any phase before the
    /// answer's header went out: its own local response (its body, or the table's
    /// `policy_denied` when it gave none, with its headers), or the error its verdict means.
    pub async fn verdict(&mut self, verdict: Verdict) -> Result<(), EdgeError> {
        let mut local = match verdict {
            Verdict::Respond(local) => local,
            other => return Err(other.into_error()),
        };
        let status = local.status;
        let headers = std::mem::take(&mut local.headers);
        let (content_type, body) = if local.body.is_empty() {
            (
                "application/json",
                Verdict::Respond(local).into_error().body(),
            )
        } else {
            ("text/plain", Bytes::from(local.body))
        };
        let mut h = self.header(status, content_type);
        for (k, v) in &headers {
            if let (Ok(name), Ok(value)) = (
                http::HeaderName::from_bytes(k.as_bytes()),
                http::HeaderValue::from_bytes(v),
            ) {
                let _ = h.insert_header(name, value);
            }
        }
        self.whole(h, body).await
    }

    /// Writes a chunk of a streamed body, through the plugins; notes when the first went.
    pub async fn chunk(&mut self, bytes: Bytes) -> Result<(), EdgeError> {
        self.ctx
            .record
            .first_token
            .get_or_insert_with(std::time::Instant::now);
        self.pass(bytes).await
    }

    /// Writes a chunk of a body, through the plugins.
    pub async fn pass(&mut self, bytes: Bytes) -> Result<(), EdgeError> {
        let bytes = self.ctx.filter_response_body(bytes, false).await?;
        if bytes.is_empty() {
            return Ok(());
        }
        self.write(Some(bytes), false).await
    }

    /// Writes the last chunk of a body (through the plugins, which see its end) and ends it.
    pub async fn last(&mut self, bytes: Bytes) -> Result<(), EdgeError> {
        let bytes = self.ctx.filter_response_body(bytes, true).await?;
        self.write(Some(bytes), true).await
    }

    /// Ends a streamed body (the plugins see its end first).
    pub async fn finish(&mut self) -> Result<(), EdgeError> {
        let last = self.ctx.filter_response_body(Bytes::new(), true).await?;
        if !last.is_empty() {
            self.write(Some(last), false).await?;
        }
        self.write(None, true).await
    }

    /// Ends a stream whose headers were sent: the error as an SSE event, then the end of the
    /// body. The body is complete, so the connection stays usable; the error goes to the
    /// access log. A client that went away, or a stream a plugin reset, is cut instead.
    pub async fn end_with_error(&mut self, err: EdgeError) -> Result<(), EdgeError> {
        if !err.is_written() || self.ctx.held_header.take().is_some() {
            // Nothing went out yet when a plugin held the header: the error is answered whole.
            return Err(err);
        }
        self.ctx.record.error = Some(err.code());
        self.write(Some(err.to_sse_event()), true).await
    }

    async fn write(&mut self, bytes: Option<Bytes>, end: bool) -> Result<(), EdgeError> {
        if let Some(h) = self.ctx.held_header.take() {
            self.ctx.responded_with(h.status.as_u16());
            self.session
                .write_response_header(h, false)
                .await
                .map_err(|_| EdgeError::ClientClosed)?;
        }
        self.session
            .write_response_body(bytes, end)
            .await
            .map_err(|_| EdgeError::ClientClosed)
    }
}
