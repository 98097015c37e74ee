//! The access log: one JSON line per request through `tracing` (target `access`), buffered off
//! the request path ([`crate::logwriter`]). Keys appear by id only, never the key.

use crate::edge::RequestCtx;

/// Logs the finished request (`method` and `bytes_sent` from its session; a WebSocket message
/// is logged as method `WS`).
pub fn access(ctx: &RequestCtx, method: &str, bytes_sent: u64) {
    let since = |t: Option<std::time::Instant>, from: std::time::Instant| {
        t.map(|t| t.duration_since(from).as_micros() as u64)
    };
    tracing::info!(
        target: "access",
        request_id = %ctx.request_id,
        method = method,
        route = ctx.route.map(|r| r.path()).unwrap_or("-"),
        agent = ctx.agent.as_deref().unwrap_or("-"),
        account = ctx.account.as_deref().unwrap_or("-"),
        key_id = ctx.key_id.as_deref().unwrap_or("-"),
        status = ctx.status,
        error = ctx.error.unwrap_or(""),
        bytes_sent = bytes_sent,
        tokens = ctx.tokens,
        duration_us = ctx.started.elapsed().as_micros() as u64,
        // Edge time before the runtime saw the request: the latency the edge adds up front.
        overhead_us = since(ctx.upstream_sent, ctx.started),
        upstream_ttfb_us = ctx.upstream_sent.and_then(|sent| since(ctx.first_byte, sent)),
        ttft_us = since(ctx.first_token, ctx.started),
        plugins = ctx.plugins.as_ref().map(|p| p.decisions.join(",")),
        plugin_us = ctx.plugins.as_ref().map(|p| p.spent.as_micros() as u64),
    );
}
