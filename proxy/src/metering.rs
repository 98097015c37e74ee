//! Metering one response: what it used, settled against its quota reservation and written to
//! the ledger's journal before the client sees the end of the answer.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::ledger::Journal;
use crate::quota::{month_of, Reservation};
use crate::store::{now, UsageRow};
use crate::usage::{StreamMeter, Usage};

/// This edge's ledger identity: its id and a counter for unique request ids.
pub struct Ledger {
    /// The journal.
    pub journal: Journal,
    /// This edge's id (kept in its data directory).
    pub edge_id: String,
    next: AtomicU64,
    started: i64,
}

impl Ledger {
    /// A ledger writing to `journal` as edge `edge_id`.
    pub fn new(journal: Journal, edge_id: String) -> Self {
        Self {
            journal,
            edge_id,
            next: AtomicU64::new(0),
            started: now(),
        }
    }

    /// A request id unique across the fleet, restarts and the two processes of an upgrade:
    /// edge, start time, process, counter.
    fn request_id(&self) -> String {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        format!(
            "{}-{:x}-{:x}-{n:x}",
            self.edge_id,
            self.started,
            std::process::id()
        )
    }
}

/// Who a metered request is for.
#[derive(Debug, Clone)]
pub struct Payer {
    /// Account.
    pub account_id: String,
    /// Key id.
    pub key_id: String,
    /// Agent endpoint id.
    pub agent_id: String,
}

/// The accounting of one token-generating request.
pub struct Metering {
    reservation: Reservation,
    prompt_estimate: u64,
    /// What the stream carried so far.
    pub meter: StreamMeter,
    /// The client did not ask for usage: the edge asked, and hides the usage chunk.
    pub hide_usage: bool,
    payer: Payer,
    finished: Option<u64>,
}

impl Metering {
    /// Accounting for a request holding `reservation`.
    pub fn new(
        reservation: Reservation,
        prompt_estimate: u64,
        hide_usage: bool,
        payer: Payer,
    ) -> Self {
        Self {
            reservation,
            prompt_estimate,
            meter: StreamMeter::new(),
            hide_usage,
            payer,
            finished: None,
        }
    }

    /// Whether what was delivered so far takes the account past its quota.
    pub fn crossed(&self) -> bool {
        self.reservation
            .crosses(self.prompt_estimate + self.meter.completion_tokens())
    }

    /// Whether [`Metering::finish`] ran.
    pub fn is_finished(&self) -> bool {
        self.finished.is_some()
    }

    /// Settles the request: the runtime's usage when it reported one (`reported`, or what the
    /// stream carried), else the edge's estimate of what was delivered. Writes the ledger row
    /// and returns the total. Runs once; later calls return the first total.
    pub fn finish(&mut self, reported: Option<Usage>, outcome: &str, ledger: &Ledger) -> u64 {
        if let Some(t) = self.finished {
            return t;
        }
        let (usage, estimated) = match reported.or(self.meter.reported) {
            Some(u) => (u, false),
            None => {
                let completion = self.meter.completion_tokens();
                let prompt = if completion == 0 && outcome != "ok" {
                    0
                } else {
                    self.prompt_estimate
                };
                (
                    Usage {
                        prompt_tokens: prompt,
                        completion_tokens: completion,
                        total_tokens: prompt + completion,
                    },
                    true,
                )
            }
        };
        let total = usage.total();
        self.reservation.settle(total);
        self.finished = Some(total);
        if total > 0 {
            let at = now();
            let row = UsageRow {
                request_id: ledger.request_id(),
                edge_id: ledger.edge_id.clone(),
                account_id: self.payer.account_id.clone(),
                key_id: self.payer.key_id.clone(),
                agent_id: self.payer.agent_id.clone(),
                month: month_of(at),
                prompt_tokens: usage.prompt_tokens,
                completion_tokens: usage.completion_tokens,
                total_tokens: total,
                estimated,
                outcome: outcome.into(),
                created_at: at,
            };
            if let Err(e) = ledger.journal.append(&row) {
                tracing::error!(error = %e, request = %row.request_id, "usage journal write failed");
            }
        }
        total
    }
}
