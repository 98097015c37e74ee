//! An HTTP request's way through the edge: transport, route, admission, then either an answer
//! of the edge's own (`/v1/health`), the WebSocket bridge (`/ws`), or the pipeline's stages
//! in order: prepare → open → relay → conclude.

mod head;
mod health;
mod transport;

use pingora_proxy::Session;
use tokio::time::Instant;

use crate::error::EdgeError;
use crate::pipeline::accounting::Outcome;
use crate::pipeline::prepare::Preparation;
use crate::pipeline::respond::Responder;
use crate::pipeline::{Downstream, Pipeline, RequestCtx};
use crate::routing::{self, Route};
use crate::{body, lifecycle};

/// Serves one HTTP request. `Err` is the error to answer with (or, once a response header went
/// out, the reason the connection is dropped).
pub async fn serve(
    p: &Pipeline,
    session: &mut Session,
    ctx: &mut RequestCtx,
) -> Result<(), EdgeError> {
    head::check(session)?;
    if transport::redirected(p, session, ctx).await? {
        return Ok(());
    }
    let now = Instant::now();
    let head = session.req_header();
    let route = match routing::route(&head.method, head.uri.path()) {
        Ok(route) => Some(route),
        // With plugins in force, a request no route takes still goes through them (once its
        // key is checked), as on Envoy, where filters run before the router: one may rewrite
        // it onto a route. Its 404 or 405 comes after them.
        Err(_) if p.has_plugins() => None,
        Err(miss) => return Err(miss),
    };
    ctx.record.route = route;
    let admission = p.admit(head, route == Some(Route::Ws), ctx)?;
    p.rate(&admission, ctx)?;
    match route {
        // Boxed: the upstream probe is a large future, which every HTTP request's future (and
        // so every held stream's memory) would otherwise reserve room for.
        Some(Route::Health) => {
            return Box::pin(health::serve(p, session, ctx, &admission.agent)).await
        }
        Some(Route::Ws) => {
            lifecycle::gate(admission.agent.state)?;
            // Boxed: a WebSocket's future (a whole pipeline per message) would otherwise be
            // part of every HTTP request's, and so of every held stream's memory.
            return Box::pin(crate::websocket::serve(p, session, ctx, admission)).await;
        }
        _ => lifecycle::gate(admission.agent.state)?,
    }
    let cfg = p.cfg();
    let body = body::read(
        session,
        cfg.limits.max_body_bytes,
        cfg.limits.clients.body_timeout,
    )
    .await?;
    // Plugins' changes to the head are made in the session itself, so each stage can wrap it
    // afresh.
    let prepared = match p
        .prepare(
            &mut Downstream::Http(session),
            ctx,
            &admission,
            route,
            body,
            now,
        )
        .await?
    {
        Preparation::Forward(prepared) => *prepared,
        Preparation::Answered(verdict) => {
            return Responder::new(session, ctx).verdict(verdict).await
        }
    };
    let mut opened = p
        .open(&mut Downstream::Http(session), ctx, &admission, prepared)
        .await?;
    let result = p
        .relay(&mut Responder::new(session, ctx), &mut opened)
        .await;
    p.conclude(ctx, &admission.agent, opened, Outcome::of(&result))
        .await;
    result
}
