//! One request's token accounting: it holds the quota reservation made at admission, observes
//! usage as the answer passes, answers *continue* or *cut* when the account's quota is crossed,
//! and settles exactly once with a typed [`Outcome`]: the reservation becomes what was really
//! used, and the ledger gets its row ([`crate::ledger::Ledger::record`] decides what that row
//! is). A request that is dropped before it concluded (its task cancelled, a panic) settles on
//! drop, so no reservation leaks and nothing delivered goes unbilled.

use std::sync::Arc;

use crate::error::EdgeError;
use crate::ledger::{Ledger, Payer};
use crate::quota::Reservation;
use crate::usage::{Billed, EventKind, StreamMeter, Usage};

/// How a metered request ended, as the ledger records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The answer was delivered whole.
    Completed,
    /// The client cancelled the answer (a WebSocket `cancel`); what was delivered counts.
    Cancelled,
    /// The answer was cut where it crossed the account's quota.
    QuotaExceeded,
    /// The request ended with an error (its code), or the client went away (`client_closed`).
    Failed(&'static str),
    /// The request was dropped before it concluded (its task was cancelled, or it panicked).
    Dropped,
}

impl Outcome {
    /// The outcome of a request that ended with `result`.
    pub fn of(result: &Result<(), EdgeError>) -> Self {
        match result {
            Ok(()) => Self::Completed,
            Err(e) => Self::failed(e),
        }
    }

    /// The outcome of a request that ended with `e`.
    pub fn failed(e: &EdgeError) -> Self {
        match e {
            EdgeError::QuotaExceeded => Self::QuotaExceeded,
            e => Self::Failed(e.code()),
        }
    }

    /// The ledger's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Completed => "ok",
            Self::Cancelled => "cancelled",
            Self::QuotaExceeded => "quota_exceeded",
            Self::Failed(code) => code,
            Self::Dropped => "dropped",
        }
    }

    /// Whether the prompt is billed when the runtime reported nothing and nothing was generated:
    /// yes when the request ran its course, no when it failed before any output.
    fn bills_prompt_alone(self) -> bool {
        matches!(self, Self::Completed | Self::Cancelled)
    }
}

/// What the answer may do next, after the usage seen so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Within the quota: go on.
    Continue,
    /// Past the quota: the answer must end now (it has been settled as `quota_exceeded`).
    Cut,
}

/// The accounting of one token-generating request.
pub struct Accounting {
    reservation: Reservation,
    prompt_estimate: u64,
    meter: StreamMeter,
    hide_usage: bool,
    payer: Payer,
    ledger: Arc<Ledger>,
    settled: Option<Billed>,
}

impl Accounting {
    /// Accounting for a request holding `reservation`, whose prompt is estimated at
    /// `prompt_estimate` tokens. `hide_usage`: the edge asked the runtime for usage the client
    /// did not ask for, so that chunk is hidden from it.
    pub fn new(
        reservation: Reservation,
        prompt_estimate: u64,
        hide_usage: bool,
        payer: Payer,
        ledger: Arc<Ledger>,
    ) -> Self {
        Self {
            reservation,
            prompt_estimate,
            meter: StreamMeter::new(),
            hide_usage,
            payer,
            ledger,
            settled: None,
        }
    }

    /// Takes one event of the runtime's stream; says what it was.
    pub fn observe(&mut self, data: &[u8]) -> EventKind {
        self.meter.observe(data)
    }

    /// Whether an event of `kind` is kept from the client (the usage chunk it did not ask for).
    pub fn hides(&self, kind: EventKind) -> bool {
        self.hide_usage && kind == EventKind::UsageOnly
    }

    /// Whether the answer may go on: once what was delivered takes the account past its quota,
    /// the request is settled as [`Outcome::QuotaExceeded`] and must be cut.
    pub fn flow(&mut self) -> Flow {
        if self.settled.is_none()
            && self
                .reservation
                .crosses(self.prompt_estimate + self.meter.completion_tokens())
        {
            self.settle(Outcome::QuotaExceeded);
            return Flow::Cut;
        }
        Flow::Continue
    }

    /// Settles a completed answer: a whole one's body (`answer`: its usage, else its text for
    /// the estimate), or a stream already observed event by event (`None`). Called before the
    /// last bytes go to the client, so an answer the client has is never unaccounted; returns
    /// what was billed, which is what the client is told.
    pub fn complete(&mut self, answer: Option<&[u8]>) -> Billed {
        if let Some(body) = answer.filter(|_| self.settled.is_none()) {
            self.meter.observe_answer(body);
        }
        self.settle(Outcome::Completed)
    }

    /// Whether the request is settled.
    pub fn is_settled(&self) -> bool {
        self.settled.is_some()
    }

    /// Settles the request, once: the runtime's usage when it reported one (in the stream or the
    /// whole answer observed), else the edge's estimate of what was delivered. Returns what was
    /// billed; later calls return the first settlement and change nothing.
    pub fn settle(&mut self, outcome: Outcome) -> Billed {
        if let Some(billed) = self.settled {
            return billed;
        }
        let (usage, estimated) = match self.meter.reported {
            Some(u) => (u, false),
            None => {
                let completion = self.meter.completion_tokens();
                let prompt = if completion == 0 && !outcome.bills_prompt_alone() {
                    0
                } else {
                    self.prompt_estimate
                };
                let usage = Usage {
                    prompt_tokens: prompt,
                    completion_tokens: completion,
                    total_tokens: prompt + completion,
                };
                (usage, true)
            }
        };
        self.reservation.settle(usage.total());
        let billed = Billed { usage, estimated };
        self.settled = Some(billed);
        self.ledger
            .record(&self.payer, usage, estimated, outcome.as_str());
        billed
    }
}

impl Drop for Accounting {
    fn drop(&mut self) {
        self.settle(Outcome::Dropped);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::Journal;
    use crate::quota::QuotaBook;

    struct Bench {
        dir: tempfile::TempDir,
        book: QuotaBook,
        limit: u64,
        ledger: Arc<Ledger>,
    }

    impl Bench {
        fn new() -> Self {
            Self::with_quota(1000)
        }

        /// A bench whose account `a` has a quota of `limit`, all of it leased to this edge.
        fn with_quota(limit: u64) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let journal = Journal::open(dir.path()).unwrap();
            Self {
                book: QuotaBook::holding_all("a", limit, crate::store::now()),
                ledger: Arc::new(Ledger::new(journal, "edge1".into())),
                limit,
                dir,
            }
        }

        /// An accounting for account `a`, holding `hold` tokens.
        fn accounting(&self, hold: u64, hide_usage: bool) -> Accounting {
            let now = crate::store::now();
            let r = self
                .book
                .reserve("a", self.limit, hold, true, now, std::time::Instant::now())
                .unwrap();
            let payer = Payer {
                request_id: "req-1".into(),
                account_id: "a".into(),
                key_id: "k".into(),
                agent_id: "g".into(),
            };
            Accounting::new(r, 10, hide_usage, payer, self.ledger.clone())
        }

        /// The journal's rows: (total, outcome, estimated).
        fn rows(&self) -> Vec<(u64, String, bool)> {
            let name = format!("usage.{}.journal", std::process::id());
            let text = std::fs::read_to_string(self.dir.path().join(name)).unwrap();
            text.lines()
                .map(|l| {
                    let v: serde_json::Value = serde_json::from_str(l).unwrap();
                    (
                        v["total_tokens"].as_u64().unwrap(),
                        v["outcome"].as_str().unwrap().to_owned(),
                        v["estimated"].as_bool().unwrap(),
                    )
                })
                .collect()
        }

        /// What the account has used on this edge.
        fn used(&self) -> u64 {
            self.book.ask("a", crate::store::now()).unwrap().used
        }
    }

    const CHUNK: &[u8] = br#"{"choices":[{"delta":{"content":"abcdefgh"}}]}"#;
    const USAGE: &[u8] =
        br#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":7,"total_tokens":10}}"#;

    #[test]
    fn settles_once_with_the_reported_usage() {
        let b = Bench::new();
        let mut a = b.accounting(100, false);
        assert_eq!(a.observe(CHUNK), EventKind::Content);
        assert_eq!(a.observe(USAGE), EventKind::UsageOnly);
        a.complete(None);
        assert!(a.is_settled());
        // A second settlement changes nothing, and neither does the drop.
        assert_eq!(a.settle(Outcome::Failed("timeout")).usage.total(), 10);
        drop(a);
        assert_eq!(b.rows(), vec![(10, "ok".into(), false)]);
        assert_eq!(b.used(), 10);
    }

    #[test]
    fn estimates_what_was_delivered_when_the_runtime_says_nothing() {
        let b = Bench::new();
        let mut a = b.accounting(100, false);
        a.observe(CHUNK);
        a.observe(CHUNK);
        // 2 events, 16 bytes: 4 tokens by the byte estimate, plus the prompt estimate of 10.
        assert_eq!(a.settle(Outcome::Failed("client_closed")).usage.total(), 14);
        drop(a);
        assert_eq!(b.rows(), vec![(14, "client_closed".into(), true)]);
    }

    #[test]
    fn a_failure_before_any_output_bills_nothing_and_writes_no_row() {
        let b = Bench::new();
        let mut a = b.accounting(100, false);
        assert_eq!(
            a.settle(Outcome::Failed("upstream_unavailable"))
                .usage
                .total(),
            0
        );
        drop(a);
        assert!(b.rows().is_empty());
        assert_eq!(b.used(), 0);
    }

    #[test]
    fn a_cancelled_answer_bills_its_prompt() {
        let b = Bench::new();
        let mut a = b.accounting(100, false);
        assert_eq!(a.settle(Outcome::Cancelled).usage.total(), 10);
        drop(a);
        assert_eq!(b.rows(), vec![(10, "cancelled".into(), true)]);
    }

    #[test]
    fn cuts_and_settles_when_the_quota_is_crossed() {
        let b = Bench::with_quota(14);
        let mut a = b.accounting(14, false);
        a.observe(CHUNK);
        assert_eq!(a.flow(), Flow::Continue); // 10 + 2
        a.observe(CHUNK);
        a.observe(CHUNK);
        assert_eq!(a.flow(), Flow::Cut); // 10 + 6 > 14
        assert!(a.is_settled());
        assert_eq!(a.flow(), Flow::Continue, "settled: nothing more to cut");
        drop(a);
        assert_eq!(b.rows(), vec![(16, "quota_exceeded".into(), true)]);
    }

    #[test]
    fn a_dropped_request_settles_on_drop() {
        let b = Bench::new();
        {
            let mut a = b.accounting(100, false);
            a.observe(CHUNK);
        }
        assert_eq!(b.rows(), vec![(12, "dropped".into(), true)]);
        assert_eq!(b.used(), 12, "the hold became what was delivered");
    }

    #[test]
    fn hides_only_the_usage_chunk_the_client_did_not_ask_for() {
        let b = Bench::new();
        let a = b.accounting(100, true);
        assert!(a.hides(EventKind::UsageOnly));
        assert!(!a.hides(EventKind::Content));
        let a2 = b.accounting(100, false);
        assert!(!a2.hides(EventKind::UsageOnly));
    }

    #[test]
    fn outcomes_of_results() {
        assert_eq!(Outcome::of(&Ok(())), Outcome::Completed);
        assert_eq!(
            Outcome::of(&Err(EdgeError::QuotaExceeded)),
            Outcome::QuotaExceeded
        );
        assert_eq!(
            Outcome::of(&Err(EdgeError::ClientClosed)).as_str(),
            "client_closed"
        );
        assert_eq!(Outcome::of(&Err(EdgeError::Timeout)).as_str(), "timeout");
    }
}
