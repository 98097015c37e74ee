//! Conclusion: after the relay, the upstream connection goes back to the pool (or is closed),
//! the request's usage is settled with the outcome of its relay (once: a relay that settled
//! before its last bytes keeps that settlement), and the request is logged and counted.

use super::accounting::Outcome;
use super::open::Opened;
use super::{Pipeline, RequestCtx};
use crate::registry::Agent;

impl Pipeline {
    /// Ends an opened request whose relay led to `outcome`.
    pub async fn conclude(
        &self,
        ctx: &mut RequestCtx,
        agent: &Agent,
        opened: Opened,
        outcome: Outcome,
    ) {
        let Opened {
            inbound,
            accounting,
            ..
        } = opened;
        if let Ok(peer) = agent.upstream.peer() {
            // Boxed: kept inline, its size would be reserved by every request's future for the
            // request's whole life, a held stream's included.
            Box::pin(
                self.forwarder
                    .close(inbound, peer, self.cfg().limits.upstream_keepalive),
            )
            .await;
        }
        if let Some(mut accounting) = accounting {
            let usage = accounting.settle(outcome).usage;
            ctx.record.tokens = Some(usage.total());
            ctx.record.usage = Some((usage.prompt_tokens, usage.completion_tokens));
        }
    }

    /// The request's last act: the plugins' log phase, the access-log line and the metrics.
    /// `method` is the request's (`WS` for a WebSocket message).
    pub fn log(&self, ctx: &mut RequestCtx, method: &str, bytes_sent: u64) {
        ctx.finish_plugins();
        ctx.record.log(method, bytes_sent);
        self.plane.metrics.record(&ctx.record);
        if let Some(spans) = &self.plane.spans {
            spans.record(&ctx.record, method);
        }
    }
}
