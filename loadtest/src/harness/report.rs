//! Reports: the JSON document, the terminal summary and a Markdown table, all from one
//! [`RunReport`].

use hdrhistogram::Histogram;
use serde::Serialize;
use serde_json::{json, Value};

use super::measure::Recorder;
use super::run::{Outcome, Plan};
use super::target::Target;

/// The metric definitions, printed with every report.
pub const DEFINITIONS: &[(&str, &str)] = &[
    ("latency", "intended send time to last byte (open loop: queueing behind a slow server counts)"),
    ("ttfb", "intended send time to the response header"),
    ("ttft", "intended send time to the first event carrying text"),
    ("itl", "gap between two consecutive text events"),
    ("tpot", "(last token - first token) / (tokens - 1), per stream"),
    ("stall", "a token gap longer than the stall threshold"),
    ("bunched", "a token arriving less than a tenth of the runtime's interval after the previous one"),
    ("added", "target minus the first (baseline) target, same run; spread: p10..p90 of per-cycle p50 differences"),
    ("scheduler_lag", "how late the dispatcher started a request after its intended time"),
];

/// Percentiles of one histogram, in microseconds.
#[derive(Debug, Clone, Copy, Serialize, Default)]
pub struct Percentiles {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50: u64,
    /// 90th.
    pub p90: u64,
    /// 99th.
    pub p99: u64,
    /// 99.9th.
    pub p999: u64,
    /// Largest.
    pub max: u64,
    /// Mean.
    pub mean: f64,
}

impl Percentiles {
    /// Reads `h`.
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        Self {
            count: h.len(),
            p50: h.value_at_quantile(0.5),
            p90: h.value_at_quantile(0.9),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
            mean: (h.mean() * 10.0).round() / 10.0,
        }
    }
}

/// Difference of a target against the baseline, same run.
#[derive(Debug, Clone, Copy, Serialize, Default)]
pub struct Added {
    /// p50 difference, µs.
    pub p50_us: i64,
    /// p99 difference, µs.
    pub p99_us: i64,
    /// p10 of per-cycle p50 differences, µs.
    pub p50_spread_lo_us: i64,
    /// p90 of per-cycle p50 differences, µs.
    pub p50_spread_hi_us: i64,
    /// Cycles compared.
    pub cycles: usize,
}

/// One target's results.
#[derive(Debug, Clone, Serialize)]
pub struct TargetReport {
    /// Name.
    pub name: String,
    /// Requests sent in the measured part.
    pub sent: u64,
    /// Succeeded.
    pub ok: u64,
    /// Failed, by kind.
    pub errors: std::collections::BTreeMap<String, u64>,
    /// Dropped at the in-flight cap.
    pub dropped: u64,
    /// Successful requests per second while it had its turns.
    pub achieved_rps: f64,
    /// Latency.
    pub latency_us: Percentiles,
    /// Time to headers.
    pub ttfb_us: Percentiles,
    /// Time to first token.
    pub ttft_us: Percentiles,
    /// Inter-token latency.
    pub itl_us: Percentiles,
    /// Time per output token.
    pub tpot_us: Percentiles,
    /// Stalls.
    pub stalls: u64,
    /// Bunched tokens.
    pub bunched: u64,
    /// Tokens received.
    pub tokens: u64,
    /// CPU time of the target's process per request, µs (when its pid was given).
    pub cpu_us_per_request: Option<f64>,
    /// Against the baseline (absent for the baseline itself).
    pub added: Option<Added>,
    /// p99 latency per second of the run, µs.
    pub p99_timeline_us: Vec<u64>,
}

/// One run's report.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    /// Scenario name.
    pub scenario: String,
    /// Scenario parameters.
    pub scenario_detail: Value,
    /// Target rate (all targets together); 0 in a closed loop.
    pub target_rps: f64,
    /// Closed loop: the number of clients (absent in an open loop).
    pub clients: Option<usize>,
    /// Arrival process.
    pub arrivals: String,
    /// Measured seconds.
    pub duration_s: f64,
    /// Seconds per target turn.
    pub round_s: f64,
    /// Dispatcher lateness.
    pub scheduler_lag_us: Percentiles,
    /// Per target.
    pub targets: Vec<TargetReport>,
}

fn quantile(v: &mut [i64], q: f64) -> i64 {
    if v.is_empty() {
        return 0;
    }
    v.sort_unstable();
    v[((v.len() - 1) as f64 * q).round() as usize]
}

fn added(base: &Recorder, r: &Recorder, n: usize, t: usize) -> Added {
    let (b, x) = (Percentiles::of(&base.latency), Percentiles::of(&r.latency));
    let mut diffs: Vec<i64> = Vec::new();
    for (&round, h) in &r.rounds {
        let base_round = round - t as u64;
        if let Some(bh) = base.rounds.get(&base_round) {
            if round as usize % n == t && !h.is_empty() && !bh.is_empty() {
                diffs.push(h.value_at_quantile(0.5) as i64 - bh.value_at_quantile(0.5) as i64);
            }
        }
    }
    Added {
        p50_us: x.p50 as i64 - b.p50 as i64,
        p99_us: x.p99 as i64 - b.p99 as i64,
        p50_spread_lo_us: quantile(&mut diffs, 0.1),
        p50_spread_hi_us: quantile(&mut diffs, 0.9),
        cycles: diffs.len(),
    }
}

impl RunReport {
    /// Builds the report of a run.
    pub fn new(plan: &Plan, targets: &[std::sync::Arc<Target>], out: &Outcome) -> Self {
        let n = targets.len();
        let share = out.elapsed.as_secs_f64() / n as f64;
        let reports = targets
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let r = &out.recorders[i];
                TargetReport {
                    name: t.name.clone(),
                    sent: out.sent[i],
                    ok: r.ok,
                    errors: r.errors.clone(),
                    dropped: out.dropped[i],
                    achieved_rps: (r.ok as f64 / share * 10.0).round() / 10.0,
                    latency_us: Percentiles::of(&r.latency),
                    ttfb_us: Percentiles::of(&r.ttfb),
                    ttft_us: Percentiles::of(&r.ttft),
                    itl_us: Percentiles::of(&r.itl),
                    tpot_us: Percentiles::of(&r.tpot),
                    stalls: r.stalls,
                    bunched: r.bunched,
                    tokens: r.tokens,
                    cpu_us_per_request: out.cpu_ns[i]
                        .filter(|_| out.sent[i] > 0)
                        .map(|ns| (ns as f64 / out.sent[i] as f64 / 100.0).round() / 10.0),
                    added: (i > 0).then(|| added(&out.recorders[0], r, n, i)),
                    p99_timeline_us: r
                        .timeline
                        .iter()
                        .map(|h| {
                            if h.is_empty() {
                                0
                            } else {
                                h.value_at_quantile(0.99)
                            }
                        })
                        .collect(),
                }
            })
            .collect();
        Self {
            scenario: plan.scenario.name().into(),
            scenario_detail: serde_json::to_value(plan.scenario).unwrap_or(Value::Null),
            target_rps: if plan.clients.is_some() {
                0.0
            } else {
                plan.rate
            },
            clients: plan.clients,
            arrivals: format!("{:?}", plan.arrivals),
            duration_s: plan.duration.as_secs_f64(),
            round_s: plan.round.as_secs_f64(),
            scheduler_lag_us: Percentiles::of(&out.lag),
            targets: reports,
        }
    }

    /// The load, as the summary and the tables name it: `20 req/s (Constant)`, or
    /// `closed loop, 16 clients`.
    pub fn load(&self) -> String {
        match self.clients {
            Some(c) => format!("closed loop, {c} client{}", if c == 1 { "" } else { "s" }),
            None => format!("{} req/s ({})", self.target_rps, self.arrivals),
        }
    }

    /// A short name for file names: `20` or `c16`.
    pub fn stem(&self) -> String {
        match self.clients {
            Some(c) => format!("{}-c{c}", self.scenario),
            None => format!("{}-{}", self.scenario, self.target_rps),
        }
    }

    /// The terminal summary.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "\n{} at {}, {}s measured, turns of {}s; scheduler lag p50 {}µs p99 {}µs\n",
            self.scenario,
            self.load(),
            self.duration_s,
            self.round_s,
            self.scheduler_lag_us.p50,
            self.scheduler_lag_us.p99
        );
        s += &format!(
            "{:<12} {:>7} {:>6} {:>7} {:>9} {:>9} {:>9} {:>9} {:>10} {:>10} {:>9} {:>9}\n",
            "target",
            "ok",
            "err",
            "drop",
            "p50 µs",
            "p90 µs",
            "p99 µs",
            "p99.9 µs",
            "+p50 µs",
            "+p99 µs",
            "cpu µs/r",
            "req/s"
        );
        for t in &self.targets {
            let l = &t.latency_us;
            let (a50, a99) = t.added.map_or(("-".into(), "-".into()), |a| {
                (a.p50_us.to_string(), a.p99_us.to_string())
            });
            s += &format!(
                "{:<12} {:>7} {:>6} {:>7} {:>9} {:>9} {:>9} {:>9} {:>10} {:>10} {:>9} {:>9}\n",
                t.name,
                t.ok,
                t.errors.values().sum::<u64>(),
                t.dropped,
                l.p50,
                l.p90,
                l.p99,
                l.p999,
                a50,
                a99,
                t.cpu_us_per_request.map_or("-".into(), |c| format!("{c}")),
                t.achieved_rps
            );
        }
        if self.targets.iter().any(|t| t.ttft_us.count > 0) {
            s += &format!(
                "{:<12} {:>10} {:>10} {:>10} {:>10} {:>10} {:>8} {:>8}\n",
                "streams",
                "ttft p50",
                "ttft p99",
                "itl p50",
                "itl p99",
                "tpot p50",
                "stalls",
                "bunched"
            );
            for t in &self.targets {
                s += &format!(
                    "{:<12} {:>10} {:>10} {:>10} {:>10} {:>10} {:>8} {:>8}\n",
                    t.name,
                    t.ttft_us.p50,
                    t.ttft_us.p99,
                    t.itl_us.p50,
                    t.itl_us.p99,
                    t.tpot_us.p50,
                    t.stalls,
                    t.bunched
                );
            }
        }
        for t in &self.targets {
            if !t.errors.is_empty() {
                s += &format!("{} errors: {:?}\n", t.name, t.errors);
            }
        }
        s
    }

    /// A Markdown table of the run.
    pub fn markdown(&self) -> String {
        let mut s = format!(
            "#### {} at {} ({}s)\n\n| target | ok | errors | p50 µs | p99 µs | p99.9 µs | added p50 µs (p10..p90) | added p99 µs | CPU µs/req | req/s |\n|---|---|---|---|---|---|---|---|---|---|\n",
            self.scenario,
            self.load(),
            self.duration_s
        );
        for t in &self.targets {
            let l = &t.latency_us;
            let (a50, a99) = t.added.map_or(("baseline".into(), "baseline".into()), |a| {
                (
                    format!(
                        "{} ({}..{})",
                        a.p50_us, a.p50_spread_lo_us, a.p50_spread_hi_us
                    ),
                    a.p99_us.to_string(),
                )
            });
            s += &format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                t.name,
                t.ok,
                t.errors.values().sum::<u64>() + t.dropped,
                l.p50,
                l.p99,
                l.p999,
                a50,
                a99,
                t.cpu_us_per_request.map_or("-".into(), |c| format!("{c}")),
                t.achieved_rps
            );
        }
        if self.targets.iter().any(|t| t.ttft_us.count > 0) {
            s += "\n| target | TTFT p50 µs | TTFT p99 µs | added TTFT p50 µs | ITL p50 µs | ITL p99 µs | added ITL p99 µs | stalls | bunched |\n|---|---|---|---|---|---|---|---|---|\n";
            let base = &self.targets[0];
            for t in &self.targets {
                s += &format!(
                    "| {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                    t.name,
                    t.ttft_us.p50,
                    t.ttft_us.p99,
                    t.ttft_us.p50 as i64 - base.ttft_us.p50 as i64,
                    t.itl_us.p50,
                    t.itl_us.p99,
                    t.itl_us.p99 as i64 - base.itl_us.p99 as i64,
                    t.stalls,
                    t.bunched
                );
            }
        }
        s
    }
}

/// The whole JSON document of an invocation.
pub fn document(runs: &[RunReport], held: &[super::run::HeldStreams], machine: Value) -> Value {
    let defs: serde_json::Map<String, Value> = DEFINITIONS
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect();
    json!({"machine": machine, "definitions": defs, "runs": runs, "held_streams": held})
}
