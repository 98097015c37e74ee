//! The access log: one JSON line per request through `tracing` (target `access`).

use pingora_proxy::Session;

use crate::edge::RequestCtx;

/// Logs the finished request. Never the key: only ids.
pub fn access(session: &Session, ctx: &RequestCtx) {
    let elapsed = ctx.started.elapsed();
    let ttfb_us = ctx
        .first_byte
        .map(|t| t.duration_since(ctx.started).as_micros() as u64);
    tracing::info!(
        target: "access",
        request_id = %ctx.request_id,
        method = %session.req_header().method,
        route = ctx.route.map(|r| r.path()).unwrap_or("-"),
        agent = ctx.agent.as_deref().unwrap_or("-"),
        account = ctx.account.as_deref().unwrap_or("-"),
        key_id = ctx.key_id.as_deref().unwrap_or("-"),
        status = ctx.status,
        error = ctx.error.unwrap_or(""),
        bytes_sent = session.body_bytes_sent() as u64,
        tokens = ctx.tokens,
        duration_us = elapsed.as_micros() as u64,
        upstream_ttfb_us = ttfb_us,
    );
}
