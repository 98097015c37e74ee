//! What one request carries through the pipeline: its access record, and the live state the
//! stages hand on (rate and quota state for the response headers, the plugins' run, whether a
//! response header went out).

use bytes::Bytes;
use pingora_http::ResponseHeader;

use crate::access::AccessRecord;
use crate::error::EdgeError;
use crate::limits::RateInfo;
use crate::plugins::host::LocalResponse;
use crate::plugins::{PluginRun, Verdict};
use crate::policy::Admission;

/// One request's state (an HTTP request, or one WebSocket message).
#[derive(Debug, Default)]
pub struct RequestCtx {
    /// What the access log and the metrics will say of it.
    pub record: AccessRecord,
    /// The request-rate state, once admitted (for `x-ratelimit-*-requests`).
    pub rate: Option<RateInfo>,
    /// The account's token quota and what is left, once reserved (for `x-ratelimit-*-tokens`).
    pub tokens_left: Option<(u64, u64)>,
    /// The request's run through the WASM policy plugins that apply to it.
    pub plugins: Option<PluginRun>,
    /// Whether a response header was written (after that, errors end the stream instead).
    pub responded: bool,
    /// A plugin's own answer, decided in the response header phase: sent instead of the
    /// runtime's (whose header has not gone out).
    pub local_reply: Option<LocalResponse>,
    /// The answer's header, held back by a plugin until the first body bytes pass (an error
    /// before then is still answered whole, as JSON).
    pub held_header: Option<Box<ResponseHeader>>,
    /// The request ends without an answer (the client left, or a plugin reset the stream):
    /// nothing more may be written, the connection is dropped.
    pub unanswered: bool,
    /// Its answer carries a `Server-Timing` header (`edge.server_timing`).
    pub server_timing: bool,
}

impl RequestCtx {
    /// A request that arrives now.
    pub fn new() -> Self {
        Self::default()
    }

    /// Notes who was admitted, for the record.
    pub fn admitted(&mut self, admission: &Admission) {
        self.record.agent = Some(admission.agent.endpoint_id.clone());
        self.record.account = Some(admission.account.id.clone());
        self.record.key_id = Some(admission.key.id.clone());
    }

    /// Notes the status that went out with a response header.
    pub fn responded_with(&mut self, status: u16) {
        self.record.status = status;
        self.responded = true;
    }

    /// The response header through the plugins. The answer keeps its framing unless a plugin
    /// removed `content-length` (as on Envoy, a plugin that changes a body's length does); it
    /// is then re-framed. A plugin that paused the header holds it back: [`Self::held_header`]
    /// keeps it until the body's first bytes go out.
    pub async fn filter_response_header(
        &mut self,
        h: &mut ResponseHeader,
    ) -> Result<(), EdgeError> {
        let Some(run) = self.plugins.as_mut() else {
            return Ok(());
        };
        match run
            .on_response_headers(crate::plugins::response_headers(h))
            .await
        {
            Ok(Some(edited)) => crate::plugins::apply_response_headers(h, edited),
            Ok(None) => {}
            Err(verdict) => {
                if let Verdict::Respond(local) = &verdict {
                    self.local_reply = Some(local.clone());
                }
                return Err(verdict.into_error());
            }
        }
        Ok(())
    }

    /// A plugin paused the answer's header: it is not written before body bytes pass.
    pub fn holds_header(&self) -> bool {
        self.plugins.as_ref().is_some_and(|run| run.holds_header)
    }

    /// A response body chunk through the plugins (`end` on the last).
    pub async fn filter_response_body(
        &mut self,
        bytes: Bytes,
        end: bool,
    ) -> Result<Bytes, EdgeError> {
        match self.plugins.as_mut() {
            None => Ok(bytes),
            Some(run) => run
                .on_response_body(bytes, end)
                .await
                .map_err(|v| v.into_error()),
        }
    }

    /// Ends the plugins' part (their log phase, then their contexts end) and copies what they
    /// decided into the record.
    pub fn finish_plugins(&mut self) {
        if let Some(run) = self.plugins.as_mut() {
            run.finish();
            self.record.plugins = Some(run.decisions.join(","));
            self.record.plugin_time = Some(run.spent());
            let mut each = String::new();
            for (name, spent) in run.each_spent() {
                use std::fmt::Write;
                let comma = if each.is_empty() { "" } else { "," };
                let _ = write!(each, "{comma}{name}:{}", spent.as_micros());
            }
            self.record.plugin_each = Some(each);
        }
    }
}
