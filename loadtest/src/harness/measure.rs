//! What one request measured, and the per-target recorder that gathers samples into
//! HdrHistograms.
//!
//! Definitions (also printed in every report):
//! - latency: from the request's intended send time to its last byte;
//! - TTFB (time to headers): intended send time to the response header;
//! - TTFT (time to first token): intended send time to the first event carrying text;
//! - ITL (inter-token latency): the gap between two consecutive text events;
//! - TPOT (time per output token): (last token − first token) / (tokens − 1), per stream;
//! - stall: a gap longer than the stall threshold;
//! - bunched: a token that arrived less than a tenth of the runtime's interval after the
//!   previous one (the runtime spaced them; something held them back).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// One request's outcome.
#[derive(Debug, Default, Clone)]
pub struct Sample {
    /// Intended send to last byte.
    pub latency: Duration,
    /// Intended send to response header.
    pub ttfb: Option<Duration>,
    /// Intended send to first token.
    pub ttft: Option<Duration>,
    /// Gaps between tokens.
    pub gaps: Vec<Duration>,
    /// Tokens (text events) received.
    pub tokens: u32,
    /// HTTP status (0 when none arrived).
    pub status: u16,
    /// What went wrong, if anything.
    pub error: Option<String>,
}

/// A histogram of microseconds, 1 µs to 1 h, three significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds")
}

fn us(d: Duration) -> u64 {
    (d.as_micros() as u64).clamp(1, 3_600_000_000)
}

/// Everything recorded for one target.
#[derive(Debug, Clone)]
pub struct Recorder {
    /// Request latency.
    pub latency: Histogram<u64>,
    /// Time to headers.
    pub ttfb: Histogram<u64>,
    /// Time to first token.
    pub ttft: Histogram<u64>,
    /// Inter-token gaps.
    pub itl: Histogram<u64>,
    /// Time per output token, per stream.
    pub tpot: Histogram<u64>,
    /// Successful requests.
    pub ok: u64,
    /// Failures by kind.
    pub errors: BTreeMap<String, u64>,
    /// Gaps over the stall threshold.
    pub stalls: u64,
    /// Tokens that arrived bunched.
    pub bunched: u64,
    /// Tokens received.
    pub tokens: u64,
    /// Latency per second of the run (for p99 over time).
    pub timeline: Vec<Histogram<u64>>,
    /// Latency per round (for the spread of same-run differences).
    pub rounds: BTreeMap<u64, Histogram<u64>>,
}

impl Default for Recorder {
    fn default() -> Self {
        Self {
            latency: histogram(),
            ttfb: histogram(),
            ttft: histogram(),
            itl: histogram(),
            tpot: histogram(),
            ok: 0,
            errors: BTreeMap::new(),
            stalls: 0,
            bunched: 0,
            tokens: 0,
            timeline: Vec::new(),
            rounds: BTreeMap::new(),
        }
    }
}

/// Thresholds that classify token gaps.
#[derive(Debug, Clone, Copy)]
pub struct GapRules {
    /// A gap above this is a stall.
    pub stall: Duration,
    /// The runtime's interval; gaps under a tenth of it are bunching (ignored when under 5 ms).
    pub interval: Duration,
}

impl Recorder {
    /// Adds one sample taken in second `second` of the run and round `round`.
    pub fn record(&mut self, s: &Sample, second: usize, round: u64, rules: GapRules) {
        if let Some(e) = &s.error {
            *self.errors.entry(e.clone()).or_default() += 1;
            return;
        }
        self.ok += 1;
        let lat = us(s.latency);
        let _ = self.latency.record(lat);
        if let Some(t) = s.ttfb {
            let _ = self.ttfb.record(us(t));
        }
        if let Some(t) = s.ttft {
            let _ = self.ttft.record(us(t));
        }
        self.tokens += u64::from(s.tokens);
        for g in &s.gaps {
            let _ = self.itl.record(us(*g));
            if *g > rules.stall {
                self.stalls += 1;
            }
            if rules.interval >= Duration::from_millis(5) && *g < rules.interval / 10 {
                self.bunched += 1;
            }
        }
        if s.tokens > 1 {
            let span: Duration = s.gaps.iter().sum();
            let _ = self.tpot.record(us(span / (s.tokens - 1)));
        }
        if self.timeline.len() <= second {
            self.timeline.resize_with(second + 1, histogram);
        }
        let _ = self.timeline[second].record(lat);
        let _ = self
            .rounds
            .entry(round)
            .or_insert_with(histogram)
            .record(lat);
    }

    /// Requests that failed.
    pub fn failed(&self) -> u64 {
        self.errors.values().sum()
    }
}

/// Records the arrival of text events in a stream: TTFT and gaps.
#[derive(Debug)]
pub struct TokenClock {
    intended: Instant,
    last: Option<Instant>,
    /// The sample being filled.
    pub sample: Sample,
}

impl TokenClock {
    /// A clock for a request meant to leave at `intended`.
    pub fn new(intended: Instant) -> Self {
        Self {
            intended,
            last: None,
            sample: Sample::default(),
        }
    }

    /// The response header arrived.
    pub fn headers(&mut self, status: u16) {
        self.sample.status = status;
        self.sample.ttfb = Some(self.intended.elapsed());
    }

    /// A text event arrived at `at`.
    pub fn token(&mut self, at: Instant) {
        match self.last {
            None => self.sample.ttft = Some(at - self.intended),
            Some(prev) => self.sample.gaps.push(at - prev),
        }
        self.last = Some(at);
        self.sample.tokens += 1;
    }

    /// The request ended (well or not).
    pub fn finish(mut self, error: Option<String>) -> Sample {
        self.sample.latency = self.intended.elapsed();
        self.sample.error = error;
        self.sample
    }
}
