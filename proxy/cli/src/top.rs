//! `moltghost top`: a live view of one edge or a fleet, refreshed from each edge's admin
//! listener: its Prometheus `/metrics` (requests, errors, added latency, streams, tunnels) and
//! the ledger's usage by key (the busiest keys). Rates are the difference between two scrapes.
//! A plain terminal is enough (ANSI escapes, no curses): it works over SSH, and `q` or Ctrl-C
//! leaves it with the terminal as it was.

use std::collections::HashMap;
use std::fmt::Write;
use std::time::{Duration, Instant};

use clap::Args;
use moltghost_protocol::prometheus::{self, Sample};
use tokio::sync::mpsc;

use crate::client::{Admin, Failure};

/// `moltghost top`'s options.
#[derive(Args)]
pub struct TopArgs {
    /// Another edge's admin URL, for a fleet (repeat it); the admin API found as for every
    /// command is the first edge.
    #[arg(long = "edge", value_name = "URL")]
    edges: Vec<String>,
    /// How often the view refreshes.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// Print this many views, then exit (for scripts and logs: no terminal needed).
    #[arg(long)]
    frames: Option<u32>,
}

/// What one scrape of the fleet adds up to.
#[derive(Debug, Default, Clone)]
struct Totals {
    requests: f64,
    errors: f64,
    by_agent: HashMap<String, f64>,
    /// Added latency (`moltghost_edge_overhead_seconds`): cumulative count by bucket bound.
    overhead: Vec<(f64, f64)>,
    streams: f64,
    websockets: f64,
    connections: f64,
    /// (pod, up, seconds since its last handshake).
    tunnels: Vec<(String, bool, Option<f64>)>,
    /// Edges that answered.
    edges_up: usize,
    /// Requests by key id, from the ledger (this month).
    by_key: HashMap<String, f64>,
}

impl Totals {
    /// Adds one edge's scrape.
    fn add(&mut self, samples: &[Sample]) {
        self.edges_up += 1;
        for s in samples {
            match s.name.as_str() {
                "moltghost_requests_total" => {
                    self.requests += s.value;
                    if s.label("code").is_some_and(|c| !c.is_empty()) {
                        self.errors += s.value;
                    }
                    let agent = s.label("agent").unwrap_or("-").to_owned();
                    *self.by_agent.entry(agent).or_default() += s.value;
                }
                "moltghost_edge_overhead_seconds_bucket" => {
                    let Some(le) = s.label("le").and_then(|l| match l {
                        "+Inf" => Some(f64::INFINITY),
                        l => l.parse().ok(),
                    }) else {
                        continue;
                    };
                    match self.overhead.iter_mut().find(|(b, _)| *b == le) {
                        Some((_, n)) => *n += s.value,
                        None => self.overhead.push((le, s.value)),
                    }
                }
                "moltghost_open_streams" => self.streams += s.value,
                "moltghost_open_websockets" => self.websockets += s.value,
                "moltghost_connections_open" => self.connections += s.value,
                "moltghost_tunnel_up" => {
                    let pod = s.label("pod").unwrap_or("-").to_owned();
                    self.tunnels.push((pod, s.value > 0.0, None));
                }
                "moltghost_tunnel_last_handshake_seconds" => {
                    let pod = s.label("pod").unwrap_or("-");
                    if let Some(t) = self.tunnels.iter_mut().find(|t| t.0 == pod) {
                        t.2 = Some(s.value);
                    }
                }
                _ => {}
            }
        }
        self.overhead.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
}

/// The `q`-quantile of a histogram's increase (cumulative counts by bound), interpolated within
/// its bucket as Prometheus's `histogram_quantile` does; `None` without observations.
fn quantile(now: &[(f64, f64)], before: &[(f64, f64)], q: f64) -> Option<f64> {
    let was = |le: f64| {
        before
            .iter()
            .find(|(b, _)| *b == le)
            .map_or(0.0, |(_, n)| *n)
    };
    let buckets: Vec<(f64, f64)> = now.iter().map(|&(le, n)| (le, n - was(le))).collect();
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(le, n) in &buckets {
        if n >= rank {
            if le.is_infinite() {
                return Some(lower.0);
            }
            let share = if n > lower.1 {
                (rank - lower.1) / (n - lower.1)
            } else {
                0.0
            };
            return Some(lower.0 + (le - lower.0) * share);
        }
        lower = (le, n);
    }
    None
}

/// The `n` largest increases of `now` over `before`, per second over `secs`.
fn busiest(
    now: &HashMap<String, f64>,
    before: &HashMap<String, f64>,
    secs: f64,
    n: usize,
) -> Vec<(String, f64)> {
    let mut v: Vec<(String, f64)> = now
        .iter()
        .map(|(k, x)| {
            (
                k.clone(),
                (x - before.get(k).copied().unwrap_or(0.0)) / secs,
            )
        })
        .filter(|(_, r)| *r > 0.0)
        .collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    v.truncate(n);
    v
}

/// One view, from two scrapes `secs` apart, of `edges` edges.
fn render(now: &Totals, before: &Totals, secs: f64, edges: usize) -> String {
    let ms = |s: Option<f64>| s.map_or("-".to_owned(), |s| format!("{:.2} ms", s * 1000.0));
    let mut out = String::new();
    let _ = writeln!(
        out,
        "moltghost top: {} of {edges} edge{} answering, every {secs:.1} s (q or Ctrl-C to quit)\n",
        now.edges_up,
        if edges == 1 { "" } else { "s" }
    );
    let _ = writeln!(
        out,
        "requests/s {:>9.1}   errors/s {:>7.1}   added latency p50 {}  p99 {}",
        (now.requests - before.requests).max(0.0) / secs,
        (now.errors - before.errors).max(0.0) / secs,
        ms(quantile(&now.overhead, &before.overhead, 0.5)),
        ms(quantile(&now.overhead, &before.overhead, 0.99)),
    );
    let _ = writeln!(
        out,
        "open streams {:>7}   websockets {:>5}   connections {:>6}\n",
        now.streams, now.websockets, now.connections
    );
    let _ = writeln!(out, "{:<40} {:>10}", "AGENT", "requests/s");
    for (agent, r) in busiest(&now.by_agent, &before.by_agent, secs, 5) {
        let _ = writeln!(out, "{agent:<40} {r:>10.1}");
    }
    let _ = writeln!(out, "\n{:<40} {:>10}", "KEY (ledger)", "requests/s");
    for (key, r) in busiest(&now.by_key, &before.by_key, secs, 5) {
        let _ = writeln!(out, "{key:<40} {r:>10.1}");
    }
    let _ = writeln!(out, "\n{:<60} {:>4} {:>10}", "TUNNEL", "UP", "HANDSHAKE");
    for (pod, up, age) in &now.tunnels {
        let age = age.map_or("-".to_owned(), |a| format!("{a:.0} s ago"));
        let up = if *up { "yes" } else { "NO" };
        let _ = writeln!(out, "{pod:<60} {up:>4} {age:>10}");
    }
    out
}

/// Scrapes every edge (an edge that does not answer is left out of the sums) and the ledger.
async fn scrape(edges: &[Admin]) -> Totals {
    let mut t = Totals::default();
    for e in edges {
        if let Ok(text) = e.text("/metrics").await {
            t.add(&prometheus::parse(&text));
        }
    }
    if let Ok(v) = edges[0].get("/v1/admin/usage?by=key").await {
        for line in v["usage"].as_array().into_iter().flatten() {
            if let (Some(k), Some(n)) = (line["group"].as_str(), line["requests"].as_f64()) {
                t.by_key.insert(k.to_owned(), n);
            }
        }
    }
    t
}

/// The terminal in character-at-a-time mode without echo (signals kept: Ctrl-C is SIGINT),
/// restored when dropped. Nothing when standard input is not a terminal.
struct Keys {
    saved: Option<libc::termios>,
}

impl Keys {
    fn new() -> Self {
        // SAFETY: tcgetattr and tcsetattr on fd 0 with a zeroed, then filled, termios.
        unsafe {
            if libc::isatty(0) != 1 {
                return Self { saved: None };
            }
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(0, &mut t) != 0 {
                return Self { saved: None };
            }
            let saved = t;
            t.c_lflag &= !(libc::ICANON | libc::ECHO);
            t.c_cc[libc::VMIN] = 1;
            t.c_cc[libc::VTIME] = 0;
            libc::tcsetattr(0, libc::TCSANOW, &t);
            Self { saved: Some(saved) }
        }
    }
}

impl Drop for Keys {
    fn drop(&mut self) {
        if let Some(t) = self.saved {
            // SAFETY: restores the attributes read in `new`.
            unsafe {
                libc::tcsetattr(0, libc::TCSANOW, &t);
            }
        }
    }
}

/// Sends once when `q` is typed (read on a thread of its own: standard input blocks).
fn quit_key() -> mpsc::Receiver<()> {
    let (tx, rx) = mpsc::channel(1);
    std::thread::spawn(move || {
        use std::io::Read;
        let mut b = [0u8; 1];
        while let Ok(1) = std::io::stdin().read(&mut b) {
            if b[0] == b'q' || b[0] == b'Q' {
                let _ = tx.blocking_send(());
                return;
            }
        }
    });
    rx
}

/// Runs the view until `q`, Ctrl-C, or `--frames` views.
pub async fn run(args: TopArgs, first: Admin, token: Option<String>) -> Result<(), Failure> {
    let mut edges = vec![first];
    for url in &args.edges {
        edges.push(Admin::at(url, token.clone().unwrap_or_default())?);
    }
    // SAFETY: isatty only asks about the descriptor.
    let interactive = args.frames.is_none() && unsafe { libc::isatty(1) } == 1;
    let _keys = interactive.then(Keys::new);
    let mut quit = quit_key();
    // Listening from now on: a Ctrl-C that comes while a scrape runs is kept for the next wait.
    let mut interrupt =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
            .map_err(|e| Failure::Unreachable(format!("cannot watch for Ctrl-C: {e}")))?;
    if interactive {
        // The alternate screen, cursor hidden: the shell's screen comes back on exit.
        print!("\x1b[?1049h\x1b[?25l");
    }
    let mut before = scrape(&edges).await;
    let mut at = Instant::now();
    let mut shown = 0;
    let result = loop {
        tokio::select! {
            _ = tokio::time::sleep(args.interval) => {}
            _ = quit.recv() => break Ok(()),
            _ = interrupt.recv() => break Ok(()),
        }
        let now = scrape(&edges).await;
        if now.edges_up == 0 {
            break Err(Failure::Unreachable(
                "no edge answered on its admin listener".into(),
            ));
        }
        let secs = at.elapsed().as_secs_f64();
        let view = render(&now, &before, secs, edges.len());
        if interactive {
            print!("\x1b[H\x1b[2J{}", view.replace('\n', "\r\n"));
        } else {
            println!("{view}");
        }
        use std::io::Write as _;
        let _ = std::io::stdout().flush();
        (before, at) = (now, Instant::now());
        shown += 1;
        if args.frames.is_some_and(|n| shown >= n) {
            break Ok(());
        }
    };
    if interactive {
        print!("\x1b[?25h\x1b[?1049l");
        use std::io::Write as _;
        let _ = std::io::stdout().flush();
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_within_the_bucket() {
        let before = [(0.001, 0.0), (0.01, 0.0), (f64::INFINITY, 0.0)];
        let now = [(0.001, 50.0), (0.01, 100.0), (f64::INFINITY, 100.0)];
        let p50 = quantile(&now, &before, 0.5).unwrap();
        assert!((p50 - 0.001).abs() < 1e-9, "{p50}");
        let p99 = quantile(&now, &before, 0.99).unwrap();
        assert!((p99 - (0.001 + 0.009 * 49.0 / 50.0)).abs() < 1e-9, "{p99}");
        assert_eq!(quantile(&now, &now, 0.5), None, "no new observations");
    }

    #[test]
    fn a_view_shows_rates_between_two_scrapes() {
        let scrape = |n: f64, errors: f64| {
            let mut t = Totals::default();
            t.add(&prometheus::parse(&format!(
                "moltghost_requests_total{{agent=\"abc123\",code=\"\",status=\"200\"}} {n}\n\
                 moltghost_requests_total{{agent=\"-\",code=\"invalid_api_key\",status=\"401\"}} {errors}\n\
                 moltghost_open_streams 2\n\
                 moltghost_tunnel_up{{pod=\"k@127.0.0.1:51820\"}} 1\n\
                 moltghost_tunnel_last_handshake_seconds{{pod=\"k@127.0.0.1:51820\"}} 12\n"
            )));
            t
        };
        let view = render(&scrape(30.0, 4.0), &scrape(10.0, 2.0), 2.0, 1);
        assert!(view.contains("requests/s      11.0"), "{view}");
        assert!(view.contains("errors/s     1.0"), "{view}");
        assert!(view.contains("abc123"), "{view}");
        assert!(view.contains("12 s ago"), "{view}");
    }
}
