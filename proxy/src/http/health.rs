//! `GET /v1/health`, answered by the edge itself: the agent's state, whether its runtime
//! answers (a probe of the runtime's `/health` within a second), the tunnel's state for a pod,
//! and the edge's store link.

use std::time::{Duration, Instant as StdInstant};

use bytes::Bytes;
use http::Method;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_proxy::Session;
use serde_json::{json, Value};
use tokio::time::Instant;

use crate::error::EdgeError;
use crate::forward::{self, Guard};
use crate::pipeline::prepare::outbound;
use crate::pipeline::respond::Responder;
use crate::pipeline::{Pipeline, RequestCtx};
use crate::registry::{Agent, AgentState};

/// Answers `/v1/health` for `agent`.
pub async fn serve(
    p: &Pipeline,
    session: &mut Session,
    ctx: &mut RequestCtx,
    agent: &Agent,
) -> Result<(), EdgeError> {
    if agent.state == AgentState::Terminated {
        return Err(EdgeError::AgentTerminated);
    }
    let mut pod = match agent.upstream.peer() {
        Ok(peer) => probe(p, session, ctx, peer, agent).await,
        Err(e) => json!({"reachable": false, "error": e}),
    };
    if let Some(t) = agent.upstream.tunnel() {
        pod["tunnel"] = json!(t.link.status());
    }
    let status = &p.plane.store_status;
    let body = json!({
        "agent": agent.endpoint_id,
        "name": agent.name,
        "state": agent.state.as_str(),
        "pod": pod,
        "edge": {
            "store": if status.healthy() { "ok" } else { "unreachable" },
            "store_stale_seconds": status.stale_for(),
            "generation": p.plane.registry.load().generation,
        },
    });
    let mut resp = Responder::new(session, ctx);
    let h = resp.header(200, "application/json");
    resp.whole(h, Bytes::from(body.to_string())).await
}

/// Asks the runtime's `/health`, within a second.
async fn probe(
    p: &Pipeline,
    session: &mut Session,
    ctx: &RequestCtx,
    peer: &HttpPeer,
    agent: &Agent,
) -> Value {
    let mut out = outbound(
        agent,
        Method::GET,
        agent.upstream.path("/health"),
        Bytes::new(),
        None,
    );
    out.identity = agent.upstream.tunnel().map(|_| {
        p.plane.identity.sign(
            ctx.record.account.as_deref().unwrap_or_default(),
            ctx.record.key_id.as_deref().unwrap_or_default(),
            &agent.endpoint_id,
            &ctx.record.request_id,
        )
    });
    let started = StdInstant::now();
    let header =
        match forward::upstream_header(session.req_header(), &out, "health-probe", None, None) {
            Ok(h) => h,
            Err(e) => return json!({"reachable": false, "error": e.message()}),
        };
    let mut guard = Guard {
        deadline: Instant::now() + Duration::from_secs(1),
        watch: None,
    };
    let opened = p
        .forwarder
        .open(
            forward::hangup(session),
            peer,
            &header,
            &out.body,
            &mut guard,
        )
        .await;
    match opened {
        Ok(mut inbound) => {
            let ok = inbound.header.status.is_success();
            let _ = inbound
                .read_to_end(forward::hangup(session), &mut guard, 64 * 1024)
                .await;
            p.forwarder
                .close(inbound, peer, p.cfg().limits.upstream_keepalive)
                .await;
            let ms = started.elapsed().as_secs_f64() * 1000.0;
            json!({"reachable": ok, "latency_ms": (ms * 1000.0).round() / 1000.0})
        }
        Err(e) => json!({"reachable": false, "error": e.message()}),
    }
}
