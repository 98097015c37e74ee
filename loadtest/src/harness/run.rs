//! Running load: the open-loop engine (arrivals from the pacer, targets interleaved round by
//! round), the closed-loop engine (a fixed number of clients, each sending its next request when
//! the last is answered, targets interleaved the same way), and the held-streams run that
//! measures memory per open stream.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use hdrhistogram::Histogram;
use moltghost_protocol::sse::SseScanner;

use super::measure::{histogram, GapRules, Recorder, Sample, TokenClock};
use super::pacer::{self, Arrivals};
use super::procfs;
use super::target::Target;

/// What each request does.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub enum Scenario {
    /// A small JSON chat completion, not streamed, on a kept-alive connection.
    Chat,
    /// A streamed chat completion: `tokens` tokens, `interval_ms` apart.
    Sse {
        /// Tokens per answer.
        tokens: u32,
        /// Milliseconds between tokens.
        interval_ms: u64,
    },
    /// The chat request on a new connection each time.
    Churn,
    /// A stream the client drops after `after_tokens` tokens.
    Cancel {
        /// Tokens to read before hanging up.
        after_tokens: u32,
    },
}

impl Scenario {
    /// Its name in reports.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Chat => "chat",
            Self::Sse { .. } => "sse",
            Self::Churn => "churn",
            Self::Cancel { .. } => "cancel",
        }
    }

    fn streams(&self) -> bool {
        matches!(self, Self::Sse { .. } | Self::Cancel { .. })
    }

    /// The runtime's interval between tokens, for the bunching rule.
    pub fn interval(&self) -> Duration {
        match self {
            Self::Sse { interval_ms, .. } => Duration::from_millis(*interval_ms),
            _ => Duration::ZERO,
        }
    }
}

/// One run.
#[derive(Debug, Clone)]
pub struct Plan {
    /// What each request does.
    pub scenario: Scenario,
    /// Open loop: requests per second (all targets together). Unused in a closed loop.
    pub rate: f64,
    /// Closed loop: this many clients, each sending its next request as soon as its last is
    /// answered (`None`: open loop at `rate`).
    pub clients: Option<usize>,
    /// How they are spaced.
    pub arrivals: Arrivals,
    /// Measured time.
    pub duration: Duration,
    /// Unmeasured time before it.
    pub warmup: Duration,
    /// Length of one target's turn; targets take turns.
    pub round: Duration,
    /// Most requests in flight; arrivals beyond it are dropped and counted.
    pub max_in_flight: usize,
    /// Per-request timeout.
    pub timeout: Duration,
    /// Stall threshold.
    pub stall: Duration,
}

/// What a run measured.
pub struct Outcome {
    /// Per target, in the order given.
    pub recorders: Vec<Recorder>,
    /// Requests sent per target (measured part).
    pub sent: Vec<u64>,
    /// Arrivals dropped at the in-flight cap, per target.
    pub dropped: Vec<u64>,
    /// How late the dispatcher started requests relative to their intended time (µs).
    pub lag: Histogram<u64>,
    /// CPU nanoseconds the target's process spent, when its pid is known.
    pub cpu_ns: Vec<Option<u64>>,
    /// Measured wall time.
    pub elapsed: Duration,
}

/// Whether an SSE `data:` payload carries text (a non-empty `content` or `text` field). A byte
/// search, not a JSON parse: the load generator must stay cheap.
pub fn has_text(data: &[u8]) -> bool {
    [&b"\"content\":\""[..], &b"\"text\":\""[..]]
        .iter()
        .any(|pat| {
            data.windows(pat.len())
                .position(|w| w == *pat)
                .is_some_and(|i| data.get(i + pat.len()).is_some_and(|b| *b != b'"'))
        })
}

fn body(scenario: Scenario) -> String {
    let stream = scenario.streams();
    format!(
        r#"{{"model":"llama3.1-70b","messages":[{{"role":"user","content":"Hello, agent!"}}],"stream":{stream}}}"#
    )
}

/// Sends one request as the scenario says, timed from `intended`.
pub async fn one(
    target: &Target,
    scenario: Scenario,
    intended: Instant,
    timeout: Duration,
) -> Sample {
    let clock = TokenClock::new(intended);
    match tokio::time::timeout(timeout, exchange(target, scenario, clock)).await {
        Ok(s) => s,
        Err(_) => Sample {
            latency: intended.elapsed(),
            error: Some("timeout".into()),
            ..Sample::default()
        },
    }
}

/// The reference runtime's timing for a scenario, (tokens, ms between them): pinned per
/// scenario (other runtimes ignore the headers that carry it).
pub fn pacing(scenario: Scenario) -> (u32, u64) {
    match scenario {
        Scenario::Sse {
            tokens,
            interval_ms,
        } => (tokens, interval_ms),
        Scenario::Cancel { .. } => (64, 20),
        Scenario::Chat | Scenario::Churn => (16, 0),
    }
}

async fn exchange(target: &Target, scenario: Scenario, mut clock: TokenClock) -> Sample {
    if let Some(ws) = &target.websocket {
        return ws.exchange(scenario, clock).await;
    }
    let client = if scenario == Scenario::Churn {
        &target.fresh
    } else {
        &target.client
    };
    let mut req = client
        .post(format!("{}{}", target.base, target.chat_path))
        .header("content-type", "application/json");
    let (tokens, interval_ms) = pacing(scenario);
    req = req
        .header("x-mock-ttft-ms", "0")
        .header("x-mock-tokens", tokens.to_string())
        .header("x-mock-interval-ms", interval_ms.to_string());
    let resp = match req.body(body(scenario)).send().await {
        Ok(r) => r,
        Err(e) => {
            return clock.finish(Some(if e.is_connect() {
                "connect".into()
            } else {
                "request".into()
            }))
        }
    };
    let status = resp.status();
    clock.headers(status.as_u16());
    if !status.is_success() {
        let _ = resp.bytes().await;
        return clock.finish(Some(format!("http {}", status.as_u16())));
    }
    if !scenario.streams() {
        let r = resp.bytes().await;
        return clock.finish(r.err().map(|_| "body".into()));
    }
    let stop_after = match scenario {
        Scenario::Cancel { after_tokens } => after_tokens,
        _ => u32::MAX,
    };
    let mut scanner = SseScanner::new();
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        let Ok(chunk) = chunk else {
            return clock.finish(Some("body".into()));
        };
        let at = Instant::now();
        scanner.push(&chunk);
        while let Ok(Some(ev)) = scanner.next_event() {
            if ev.event.as_deref() == Some("error") {
                return clock.finish(Some("stream error event".into()));
            }
            if has_text(&ev.data) {
                clock.token(at);
                if clock.sample.tokens >= stop_after {
                    return clock.finish(None); // dropping `body` hangs up
                }
            }
        }
    }
    clock.finish(None)
}

/// CPU nanoseconds each target's process has spent so far (where its pid is known).
fn cpu_now(targets: &[Arc<Target>]) -> Vec<Option<u64>> {
    targets
        .iter()
        .map(|t| t.pid.and_then(procfs::cpu_ns))
        .collect()
}

/// CPU nanoseconds each target's process spent since `before` (none where it was not read).
fn cpu_since(targets: &[Arc<Target>], before: &[Option<u64>]) -> Vec<Option<u64>> {
    let before = before.iter().chain(std::iter::repeat(&None));
    targets
        .iter()
        .zip(before)
        .map(|(t, before)| Some(t.pid.and_then(procfs::cpu_ns)? - (*before)?))
        .collect()
}

/// Runs `plan` against `targets`, interleaving them round by round.
pub async fn open_loop(
    targets: &[Arc<Target>],
    plan: &Plan,
    progress: &indicatif::ProgressBar,
) -> Outcome {
    let n = targets.len();
    let recorders = Arc::new(Mutex::new(vec![Recorder::default(); n]));
    let sent: Arc<Vec<AtomicU64>> = Arc::new((0..n).map(|_| AtomicU64::new(0)).collect());
    let mut dropped = vec![0u64; n];
    let in_flight = Arc::new(AtomicUsize::new(0));
    let mut lag = histogram();
    let rules = GapRules {
        stall: plan.stall,
        interval: plan.scenario.interval(),
    };

    let start = Instant::now() + Duration::from_millis(20);
    let measured_from = start + plan.warmup;
    let total = plan.warmup + plan.duration;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let pacer = pacer::spawn(plan.rate, plan.arrivals, start, total, tx);
    progress.set_length(total.as_millis() as u64);

    let mut cpu_before: Vec<Option<u64>> = Vec::new();
    while let Some(intended) = rx.recv().await {
        let now = Instant::now();
        let _ = lag.record((now.saturating_duration_since(intended).as_micros() as u64).max(1));
        let since = intended - start;
        let round = (since.as_nanos() / plan.round.as_nanos()) as u64;
        let t = (round % n as u64) as usize;
        progress.set_position(since.as_millis() as u64);
        let measured = intended >= measured_from;
        if measured && cpu_before.is_empty() {
            cpu_before = cpu_now(targets);
        }
        if in_flight.load(Ordering::Relaxed) >= plan.max_in_flight {
            if measured {
                dropped[t] += 1;
            }
            continue;
        }
        if measured {
            sent[t].fetch_add(1, Ordering::Relaxed);
        }
        in_flight.fetch_add(1, Ordering::Relaxed);
        let (target, recorders, in_flight, scenario, timeout) = (
            targets[t].clone(),
            recorders.clone(),
            in_flight.clone(),
            plan.scenario,
            plan.timeout,
        );
        tokio::spawn(async move {
            let sample = one(&target, scenario, intended, timeout).await;
            if measured {
                let second = (intended - measured_from).as_secs() as usize;
                recorders.lock().expect("recorder lock")[t].record(&sample, second, round, rules);
            }
            in_flight.fetch_sub(1, Ordering::Relaxed);
        });
    }
    let _ = pacer.join();
    let drain_until = Instant::now() + plan.timeout + Duration::from_secs(1);
    while in_flight.load(Ordering::Relaxed) > 0 && Instant::now() < drain_until {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let cpu_ns = cpu_since(targets, &cpu_before);
    let recorders = recorders.lock().expect("recorder lock").clone();
    Outcome {
        recorders,
        sent: sent.iter().map(|s| s.load(Ordering::Relaxed)).collect(),
        dropped,
        lag,
        cpu_ns,
        elapsed: plan.duration,
    }
}

/// Runs `plan` closed-loop: `plan.clients` clients send to the target whose turn it is, each its
/// next request as soon as the last is answered (what `wrk -c N` does). Latency counts from each
/// request's send; there is no schedule to fall behind.
pub async fn closed_loop(
    targets: &[Arc<Target>],
    plan: &Plan,
    progress: &indicatif::ProgressBar,
) -> Outcome {
    let n = targets.len();
    let recorders = Arc::new(Mutex::new(vec![Recorder::default(); n]));
    let sent: Arc<Vec<AtomicU64>> = Arc::new((0..n).map(|_| AtomicU64::new(0)).collect());
    let rules = GapRules {
        stall: plan.stall,
        interval: plan.scenario.interval(),
    };
    let start = Instant::now() + Duration::from_millis(20);
    let measured_from = start + plan.warmup;
    let end = measured_from + plan.duration;
    progress.set_length((plan.warmup + plan.duration).as_millis() as u64);
    let clients: Vec<_> = (0..plan.clients.unwrap_or(1).max(1))
        .map(|_| {
            let (targets, recorders, sent) = (targets.to_vec(), recorders.clone(), sent.clone());
            let (scenario, timeout, round_len) = (plan.scenario, plan.timeout, plan.round);
            tokio::spawn(async move {
                tokio::time::sleep_until(start.into()).await;
                loop {
                    let now = Instant::now();
                    if now >= end {
                        break;
                    }
                    let round = ((now - start).as_nanos() / round_len.as_nanos()) as u64;
                    let t = (round % n as u64) as usize;
                    let sample = one(&targets[t], scenario, now, timeout).await;
                    if now >= measured_from {
                        sent[t].fetch_add(1, Ordering::Relaxed);
                        let second = (now - measured_from).as_secs() as usize;
                        recorders.lock().expect("recorder lock")[t]
                            .record(&sample, second, round, rules);
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep_until(measured_from.into()).await;
    let cpu_before = cpu_now(targets);
    while Instant::now() < end {
        progress.set_position(start.elapsed().as_millis() as u64);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let cpu_ns = cpu_since(targets, &cpu_before);
    for c in clients {
        let _ = c.await;
    }
    let recorders = recorders.lock().expect("recorder lock").clone();
    Outcome {
        recorders,
        sent: sent.iter().map(|s| s.load(Ordering::Relaxed)).collect(),
        dropped: vec![0; n],
        lag: histogram(),
        cpu_ns,
        elapsed: plan.duration,
    }
}

/// Memory held per open stream by one target.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HeldStreams {
    /// Target name.
    pub target: String,
    /// Streams asked for.
    pub wanted: usize,
    /// Streams that delivered their first token and stayed open.
    pub opened: usize,
    /// Resident memory before, bytes.
    pub rss_before: Option<u64>,
    /// Resident memory with every stream open, bytes.
    pub rss_open: Option<u64>,
    /// (rss_open − rss_before) / opened.
    pub bytes_per_stream: Option<u64>,
    /// How long opening them took.
    pub open_seconds: f64,
}

/// Opens `n` streams on `target` that stall after their first token, holds them for `hold`,
/// and reads the target process's memory with all of them open.
pub async fn hold_streams(
    target: Arc<Target>,
    n: usize,
    hold: Duration,
    progress: &indicatif::ProgressBar,
) -> HeldStreams {
    let rss_before = target.pid.and_then(procfs::rss_bytes);
    let opened = Arc::new(AtomicUsize::new(0));
    let (release_tx, release_rx) = tokio::sync::watch::channel(false);
    let connect_slots = Arc::new(tokio::sync::Semaphore::new(128));
    progress.set_length(n as u64);
    let t0 = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..n {
        let (target, opened, mut release, slots) = (
            target.clone(),
            opened.clone(),
            release_rx.clone(),
            connect_slots.clone(),
        );
        tasks.spawn(async move {
            let permit = slots.acquire_owned().await.expect("semaphore open");
            let req = target
                .fresh
                .post(format!("{}/v1/chat/completions", target.base))
                .header("content-type", "application/json")
                .header("x-mock-stall-after", "1")
                .body(body(Scenario::Sse {
                    tokens: 2,
                    interval_ms: 0,
                }));
            let Ok(resp) = req.send().await else { return };
            let mut stream = resp.bytes_stream();
            let mut scanner = SseScanner::new();
            'first: while let Some(Ok(chunk)) = stream.next().await {
                scanner.push(&chunk);
                while let Ok(Some(ev)) = scanner.next_event() {
                    if has_text(&ev.data) {
                        break 'first;
                    }
                }
            }
            drop(permit);
            opened.fetch_add(1, Ordering::Relaxed);
            let _ = release.wait_for(|r| *r).await;
            drop(stream);
        });
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while opened.load(Ordering::Relaxed) < n && Instant::now() < deadline && !tasks.is_empty() {
        progress.set_position(opened.load(Ordering::Relaxed) as u64);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let open_seconds = t0.elapsed().as_secs_f64();
    tokio::time::sleep(hold).await;
    let rss_open = target.pid.and_then(procfs::rss_bytes);
    let count = opened.load(Ordering::Relaxed);
    let _ = release_tx.send(true);
    // Streams that never opened may hang in connect or send; hang up on everything.
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    HeldStreams {
        target: target.name.clone(),
        wanted: n,
        opened: count,
        rss_before,
        rss_open,
        bytes_per_stream: match (rss_before, rss_open) {
            (Some(a), Some(b)) if count > 0 => Some(b.saturating_sub(a) / count as u64),
            _ => None,
        },
        open_seconds,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_detection() {
        assert!(has_text(br#"{"choices":[{"delta":{"content":"Hi"}}]}"#));
        assert!(has_text(br#"{"content":"Hi","done":false}"#));
        assert!(has_text(br#"{"choices":[{"text":"x"}]}"#));
        assert!(!has_text(
            br#"{"choices":[{"delta":{"role":"assistant","content":""}}]}"#
        ));
        assert!(!has_text(b"[DONE]"));
    }
}
