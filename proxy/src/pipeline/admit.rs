//! Admission: who is calling, which agent they reach, whether its lifecycle lets them in, and
//! one more request against the key's rate. The decisions are [`crate::policy`]'s plain
//! functions; this stage gathers their inputs from the request and applies the results.

use pingora_http::RequestHeader;

use super::{Pipeline, RequestCtx};
use crate::error::EdgeError;
use crate::policy::{self, Admission, RequestView};
use crate::ws;

impl Pipeline {
    /// The caller's key and the agent it reaches (see [`policy::admit`]); recorded in `ctx`.
    /// `ws`: a WebSocket handshake, whose key may come as a subprotocol.
    pub fn admit(
        &self,
        head: &RequestHeader,
        ws: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Admission, EdgeError> {
        let offer = if ws {
            ws::offer(
                head.headers
                    .get_all("sec-websocket-protocol")
                    .iter()
                    .map(|v| v.as_bytes()),
            )
        } else {
            ws::Offer::default()
        };
        let host = head
            .headers
            .get("host")
            .and_then(|h| h.to_str().ok())
            .or_else(|| head.uri.host())
            .unwrap_or("");
        let view = RequestView {
            host,
            authorization: head.headers.get("authorization").map(|v| v.as_bytes()),
            subprotocol_key: offer.key,
            now: crate::store::now(),
        };
        let admission = policy::admit(
            &self.plane.registry.load(),
            &self.plane.hasher,
            &self.cfg().names.agents_domain,
            &view,
        )?;
        ctx.admitted(&admission);
        Ok(admission)
    }

    /// Request rate: one more request of the caller's key, or `rate_limited`.
    pub fn rate(&self, admission: &Admission, ctx: &mut RequestCtx) -> Result<(), EdgeError> {
        let cfg = self.cfg();
        if cfg.limits.enabled {
            ctx.rate = Some(self.plane.limiter.count_request(
                &admission.key,
                &admission.account.plan,
                cfg.limits.rate_limit_status,
            )?);
        }
        ctx.record.admitted = Some(std::time::Instant::now());
        Ok(())
    }
}
