//! The Pingora adapter: [`ProxyHttp`]'s phases mapped onto the [`Pipeline`]. Nothing here
//! decides anything about a request; it gives each request its id, hands it to
//! [`crate::http::serve`], turns an error into the answer (or a dropped connection once a
//! response header went out), and logs it.
//!
//! Every request is answered in `request_filter`: the edge reads the body and forwards it
//! itself (see ARCHITECTURE.md, "Why the edge forwards by itself"), so Pingora's own proxy path
//! (`upstream_peer` and after) is never reached.

use std::time::Instant;

use async_trait::async_trait;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::{Error, ErrorType};
use pingora_proxy::{FailToProxy, ProxyHttp, Session};

use crate::error::EdgeError;
use crate::pipeline::respond::Responder;
use crate::pipeline::{Pipeline, RequestCtx};
use crate::plugins::Verdict;

/// The edge service.
pub struct Edge {
    pipeline: Pipeline,
}

impl Edge {
    /// The edge serving requests through `pipeline`.
    pub fn new(pipeline: Pipeline) -> Self {
        Self { pipeline }
    }
}

#[async_trait]
impl ProxyHttp for Edge {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            server_timing: self.pipeline.cfg().server_timing,
            ..RequestCtx::new()
        }
    }

    async fn early_request_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> pingora_error::Result<()> {
        ctx.record.started = Instant::now();
        let traceparent = session.req_header().headers.get("traceparent");
        ctx.record
            .continue_trace(traceparent.and_then(|v| v.to_str().ok()));
        crate::connections::header_read(session, &self.pipeline.cfg().limits.clients);
        let client_id = session.req_header().headers.get("x-request-id");
        ctx.record.request_id = self
            .pipeline
            .ids
            .for_request(client_id.map(|v| v.as_bytes()));
        Ok(())
    }

    async fn request_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> pingora_error::Result<bool> {
        let Err(err) = crate::http::serve(&self.pipeline, session, ctx).await else {
            return Ok(true);
        };
        ctx.record.error = Some(err.code());
        ctx.unanswered = !err.is_written();
        if !ctx.responded {
            ctx.record.status = err.status();
            let mut resp = Responder::new(session, ctx);
            let written = match resp.ctx.local_reply.take() {
                Some(local) => resp.verdict(Verdict::Respond(local)).await,
                None if err.is_written() => resp.error(&err).await,
                None => Err(err.clone()),
            };
            if written.is_ok() {
                return Ok(true);
            }
        }
        // Headers are out (or nobody is listening): drop the connection so a cut body is never
        // mistaken for a whole one.
        Error::e_explain(ErrorType::ConnectionClosed, err.to_string())
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut RequestCtx,
    ) -> pingora_error::Result<Box<HttpPeer>> {
        Error::e_explain(
            ErrorType::InternalError,
            "the edge forwards requests itself",
        )
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        if session.response_written().is_none() && !ctx.responded && !ctx.unanswered {
            let err =
                EdgeError::InvalidRequest(format!("bad request: {}", e.etype().as_str()).into());
            ctx.record.status = err.status();
            let _ = Responder::new(session, ctx).error(&err).await;
        }
        FailToProxy {
            error_code: ctx.record.status,
            can_reuse_downstream: false,
        }
    }

    fn suppress_error_log(&self, _session: &Session, ctx: &RequestCtx, _error: &Error) -> bool {
        // Broken streams and disconnects are reported once, by the access log.
        ctx.record.error.is_some()
    }

    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut RequestCtx) {
        crate::connections::answered(&self.pipeline.cfg().limits.clients);
        let method = session.req_header().method.as_str();
        self.pipeline
            .log(ctx, method, session.body_bytes_sent() as u64);
    }
}
