//! Opening: a prepared request takes its place under the key's stream cap, reserves its tokens
//! (the [`Accounting`] that will settle them), carries a signed caller identity to pods, and
//! is sent to the runtime; the stage ends when the runtime's response header is in.

use std::time::Instant as StdInstant;

use pingora_limits::inflight;

use super::accounting::Accounting;
use super::prepare::{Prepared, Relay};
use super::{Downstream, Pipeline, RequestCtx};
use crate::error::EdgeError;
use crate::forward::{self, Guard, Inbound};
use crate::ledger::Payer;
use crate::policy::{Admission, AdmissionWatch};

/// A request sent on to the runtime: what relaying its answer needs.
pub struct Opened {
    /// The runtime's response.
    pub inbound: Inbound,
    /// How its answer is turned into the client's.
    pub relay: Relay,
    /// Its deadline and revocation watch.
    pub guard: Guard,
    /// Its token accounting, when limits are on and the route costs tokens.
    pub accounting: Option<Accounting>,
    /// Its place under the concurrent-stream cap, held until the exchange ends.
    _stream_slot: Option<inflight::Guard>,
}

impl Opened {
    /// The parts a relay works with: the runtime's response, the guard its reads race, and the
    /// accounting.
    pub fn parts(&mut self) -> (&mut Inbound, &mut Guard, Option<&mut Accounting>) {
        (&mut self.inbound, &mut self.guard, self.accounting.as_mut())
    }
}

impl Pipeline {
    /// Stream cap, quota reservation and identity, then the upstream exchange up to the
    /// runtime's response header.
    pub async fn open(
        &self,
        down: &mut Downstream<'_>,
        ctx: &mut RequestCtx,
        admission: &Admission,
        mut prepared: Prepared,
    ) -> Result<Opened, EdgeError> {
        let cfg = self.cfg();
        let agent = &admission.agent;
        if agent.upstream.tunnel().is_some() {
            prepared.outbound.identity = Some(self.plane.identity.sign(
                &admission.account.id,
                &admission.key.id,
                &agent.endpoint_id,
                &ctx.record.request_id,
            ));
        }
        let plan = &admission.account.plan;
        let stream_slot = if cfg.limits.enabled && prepared.stream {
            Some(self.plane.limiter.open_stream(
                &admission.key,
                plan,
                cfg.limits.rate_limit_status,
            )?)
        } else {
            None
        };
        let accounting = match prepared.cost.filter(|_| cfg.limits.enabled) {
            None => None,
            // A request whose usage could not be recorded is not served.
            Some(_) if !self.plane.ledger.is_writable() => {
                return Err(EdgeError::LedgerUnavailable)
            }
            Some(cost) => {
                let reservation = self
                    .plane
                    .quota
                    .admit(
                        &admission.account.id,
                        plan.tokens_per_month,
                        cost.prompt + cost.completion_cap,
                        prepared.stream,
                    )
                    .await?;
                ctx.tokens_left = Some((reservation.limit, reservation.remaining));
                let payer = Payer {
                    request_id: ctx.record.request_id.clone(),
                    account_id: admission.account.id.clone(),
                    key_id: admission.key.id.clone(),
                    agent_id: agent.endpoint_id.clone(),
                };
                Some(Accounting::new(
                    reservation,
                    cost.prompt,
                    prepared.hide_usage,
                    payer,
                    self.plane.ledger.clone(),
                ))
            }
        };

        let peer = agent
            .upstream
            .peer()
            .map_err(|e| EdgeError::UpstreamUnavailable(e.to_owned().into()))?;
        let header = forward::upstream_header(
            down.head(),
            &prepared.outbound,
            &ctx.record.request_id,
            Some(&ctx.record.trace.header()),
            down.client_addr().map(|a| a.ip()),
        )?;
        let mut guard = Guard {
            deadline: prepared.deadline,
            watch: Some(AdmissionWatch::new(
                self.plane.registry.clone(),
                admission.clone(),
            )),
        };
        ctx.record.upstream_sent = Some(StdInstant::now());
        // Boxed, and freed once the answer's head is in: the connect-and-send future is most of
        // a request future's size (~19 KB), which a held stream would otherwise keep for its
        // whole life.
        let mut inbound = Box::pin(self.forwarder.open(
            down.hangup(),
            peer,
            &header,
            &prepared.outbound.body,
            &mut guard,
        ))
        .await?;
        ctx.record.first_byte = Some(StdInstant::now());
        inbound.set_idle_timeout(cfg.limits.stream_idle_timeout);
        Ok(Opened {
            inbound,
            relay: prepared.relay,
            guard,
            accounting,
            _stream_slot: stream_slot,
        })
    }
}
