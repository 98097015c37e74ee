//! `loadtest`: measures OpenAI-compatible endpoints the way their users feel them.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use moltghost_loadtest::harness::pacer::Arrivals;
use moltghost_loadtest::harness::report::{self, RunReport};
use moltghost_loadtest::harness::run::{self, Plan, Scenario};
use moltghost_loadtest::harness::target::{Target, TargetSpec};
use moltghost_loadtest::harness::{plot, procfs};
use serde_json::{json, Value};

/// Open-loop load against one or more OpenAI-compatible endpoints, compared in the same run.
///
/// Each --target gets turns (--round) in rotation at the same arrival rate, so the figures
/// compare like with like on a shared machine; the first target is the baseline that the
/// others' "added" latency is measured against. Latency counts from each request's intended
/// send time (no coordinated omission).
///
/// Examples:
///   # the edge against the runtime behind it, 500 req/s, small chat requests
///   loadtest --target direct=http://127.0.0.1:9100 \
///            --target edge=http://abc123.agent.localhost:8080 --key edge=molti_... \
///            --scenario chat --rate 500 --duration 20s
///   # the noise floor: the same endpoint twice
///   loadtest --target a=http://127.0.0.1:9100 --target b=http://127.0.0.1:9100 --rate 500
///   # token streams, a rate sweep, JSON and plots
///   loadtest ... --scenario sse --tokens 64 --interval-ms 20 --rates 50,100,200 \
///            --json out.json --svg-dir plots/
///   # closed loop, as wrk does: latency at one client, throughput at 16
///   loadtest --target direct=... --target edge=... --key edge=... --clients 1,16
///   # memory per open stream of the edge process
///   loadtest --target edge=... --key edge=... --pid edge=$(pgrep moltghost-proxy) \
///            --scenario idle --streams 1000,5000
///   # any endpoint, HTTPS too (--http2 NAME lets that target negotiate HTTP/2)
///   loadtest --target prod=https://abc123.agent.example.com --key prod=$KEY --http2 prod --rate 20
///   # the WebSocket against native SSE on the same edge: ws:// or wss:// targets send each
///   # request as a message on a kept socket (/ws); --native NAME uses /v1/chat
///   loadtest --target sse=http://abc123.agent.localhost:8080 --native sse \
///            --target ws=ws://abc123.agent.localhost:8080 --key sse=$KEY --key ws=$KEY \
///            --scenario sse --tokens 32 --interval-ms 20 --rate 100
#[derive(Parser)]
#[command(version, verbatim_doc_comment)]
struct Args {
    /// NAME=URL of an endpoint (repeat; the first is the baseline): http(s):// for HTTP,
    /// ws(s):// for the WebSocket (/ws, a message per request on kept sockets).
    #[arg(long = "target", required = true)]
    targets: Vec<String>,
    /// NAME=KEY: send `Authorization: Bearer KEY` to that target.
    #[arg(long = "key")]
    keys: Vec<String>,
    /// NAME=HEADER:VALUE: an extra header for that target.
    #[arg(long = "header")]
    headers: Vec<String>,
    /// NAME=PID: the process serving that target (CPU per request, memory per stream).
    #[arg(long = "pid")]
    pids: Vec<String>,
    /// NAME: let that target use HTTP/2 (negotiated by ALPN over https); others use HTTP/1.1.
    #[arg(long = "http2")]
    http2: Vec<String>,
    /// NAME: that target's chats go to the native route, /v1/chat, instead of OpenAI's.
    #[arg(long = "native")]
    native: Vec<String>,
    /// What each request does.
    #[arg(long, value_enum, default_value = "chat")]
    scenario: ScenarioArg,
    /// Requests per second, all targets together.
    #[arg(long, default_value_t = 200.0)]
    rate: f64,
    /// A rate sweep (comma-separated); overrides --rate.
    #[arg(long, value_delimiter = ',')]
    rates: Vec<f64>,
    /// Closed loop instead of arrivals at a rate: this many clients, each sending its next
    /// request as soon as its last is answered, as `wrk -c N` does (comma-separated for several
    /// runs, e.g. 1,16: latency at c=1, saturation throughput at c=16); overrides --rate.
    #[arg(long, value_delimiter = ',')]
    clients: Vec<usize>,
    /// Poisson arrivals instead of evenly spaced ones.
    #[arg(long)]
    poisson: bool,
    /// Seed of the Poisson arrivals.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Measured time per rate.
    #[arg(long, default_value = "10s", value_parser = humantime_duration)]
    duration: Duration,
    /// Unmeasured time before it.
    #[arg(long, default_value = "2s", value_parser = humantime_duration)]
    warmup: Duration,
    /// Length of each target's turn.
    #[arg(long, default_value = "500ms", value_parser = humantime_duration)]
    round: Duration,
    /// Most requests in flight; further arrivals are dropped and counted.
    #[arg(long, default_value_t = 2000)]
    max_in_flight: usize,
    /// Per-request timeout.
    #[arg(long, default_value = "30s", value_parser = humantime_duration)]
    timeout: Duration,
    /// A token gap longer than this is a stall.
    #[arg(long, default_value = "250ms", value_parser = humantime_duration)]
    stall: Duration,
    /// sse: tokens per answer (sent as x-mock-tokens to the reference runtime).
    #[arg(long, default_value_t = 64)]
    tokens: u32,
    /// sse: milliseconds between tokens (x-mock-interval-ms).
    #[arg(long, default_value_t = 20)]
    interval_ms: u64,
    /// cancel: tokens to read before hanging up.
    #[arg(long, default_value_t = 2)]
    cancel_after: u32,
    /// idle: how many streams to hold open (comma-separated for several runs).
    #[arg(long, value_delimiter = ',', default_value = "1000")]
    streams: Vec<usize>,
    /// idle: how long to hold them.
    #[arg(long, default_value = "2s", value_parser = humantime_duration)]
    hold: Duration,
    /// cancel: the reference runtime's /mock/stats URL, to check that it saw every cancel.
    #[arg(long)]
    runtime_stats: Option<String>,
    /// Accept any TLS certificate.
    #[arg(long)]
    insecure: bool,
    /// Write the JSON report here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write SVG plots into this directory.
    #[arg(long)]
    svg_dir: Option<PathBuf>,
    /// Append Markdown tables to this file.
    #[arg(long)]
    markdown: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum ScenarioArg {
    /// Small JSON chat completions on kept-alive connections.
    Chat,
    /// Streamed chat completions (--tokens, --interval-ms).
    Sse,
    /// Chat on a new connection per request.
    Churn,
    /// Streams the client drops after --cancel-after tokens.
    Cancel,
    /// Hold --streams streams open and measure memory per stream.
    Idle,
}

fn humantime_duration(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d.is_zero() {
        return Err("must be greater than zero".into());
    }
    Ok(d)
}

/// `10s`, `500ms`, `2m`, `1h`.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .ok_or_else(|| format!("{s:?}: add a unit (ms, s, m, h)"))?;
    let (n, unit) = s.split_at(split);
    let n: f64 = n.parse().map_err(|_| format!("{s:?}: not a number"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("{s:?}: unit is ms, s, m or h")),
    };
    Ok(Duration::from_secs_f64(secs))
}

fn split_pair<'a>(s: &'a str, what: &str) -> Result<(&'a str, &'a str), String> {
    s.split_once('=')
        .ok_or_else(|| format!("{what}: expected NAME=VALUE, got {s:?}"))
}

fn specs(a: &Args) -> Result<Vec<TargetSpec>, String> {
    let mut specs: Vec<TargetSpec> = a
        .targets
        .iter()
        .map(|t| TargetSpec::parse(t))
        .collect::<Result<_, _>>()?;
    let find = |specs: &mut Vec<TargetSpec>, name: &str| -> Result<usize, String> {
        specs
            .iter()
            .position(|s| s.name == name)
            .ok_or_else(|| format!("no --target named {name:?}"))
    };
    for k in &a.keys {
        let (n, v) = split_pair(k, "--key")?;
        let i = find(&mut specs, n)?;
        specs[i].key = Some(v.into());
    }
    for h in &a.headers {
        let (n, v) = split_pair(h, "--header")?;
        let (k, v) = v
            .split_once(':')
            .ok_or_else(|| format!("--header {n}: expected HEADER:VALUE"))?;
        let i = find(&mut specs, n)?;
        specs[i].headers.push((k.trim().into(), v.trim().into()));
    }
    for n in &a.http2 {
        let i = find(&mut specs, n)?;
        specs[i].http2 = true;
    }
    for n in &a.native {
        let i = find(&mut specs, n)?;
        specs[i].native = true;
    }
    for p in &a.pids {
        let (n, v) = split_pair(p, "--pid")?;
        let i = find(&mut specs, n)?;
        specs[i].pid = Some(
            v.trim()
                .parse()
                .map_err(|_| format!("--pid {n}: not a pid"))?,
        );
    }
    Ok(specs)
}

fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|c| {
        c.lines()
            .find(|l| l.starts_with("model name"))
            .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
    });
    json!({
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "cpu_model": cpu,
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
    })
}

fn progress(quiet: bool, what: &str) -> indicatif::ProgressBar {
    if quiet {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(1);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg:>24} [{bar:40}] {percent:>3}%")
            .expect("template")
            .progress_chars("=> "),
    );
    bar.set_message(what.to_owned());
    bar
}

async fn runtime_cancels(url: &Option<String>) -> Option<u64> {
    let v: Value = reqwest::get(url.as_ref()?).await.ok()?.json().await.ok()?;
    v["streams_cancelled"].as_u64()
}

async fn main_async(a: Args) -> Result<(), String> {
    procfs::raise_nofile();
    let targets: Vec<Arc<Target>> = specs(&a)?
        .iter()
        .map(|s| Target::new(s, a.insecure).map(Arc::new))
        .collect::<Result<_, _>>()?;
    let mut runs = Vec::new();
    let mut held = Vec::new();
    let mut markdown = String::new();
    if a.scenario == ScenarioArg::Idle {
        for &n in &a.streams {
            for t in &targets {
                let bar = progress(a.quiet, &format!("{} {n} streams", t.name));
                let h = run::hold_streams(t.clone(), n, a.hold, &bar).await;
                bar.finish_and_clear();
                println!(
                    "{}: {}/{} streams open in {:.1}s; {}",
                    h.target,
                    h.opened,
                    h.wanted,
                    h.open_seconds,
                    h.bytes_per_stream
                        .map_or("give --pid to read memory".into(), |b| format!(
                            "{:.1} KiB per open stream",
                            b as f64 / 1024.0
                        ))
                );
                markdown += &format!(
                    "| {} | {} | {}/{} | {} |\n",
                    h.target,
                    n,
                    h.opened,
                    h.wanted,
                    h.bytes_per_stream
                        .map_or("-".into(), |b| format!("{:.1}", b as f64 / 1024.0))
                );
                held.push(h);
            }
        }
        markdown = format!("#### held streams\n\n| target | streams | open | KiB per stream |\n|---|---|---|---|\n{markdown}");
    } else {
        let scenario = match a.scenario {
            ScenarioArg::Chat => Scenario::Chat,
            ScenarioArg::Sse => Scenario::Sse {
                tokens: a.tokens,
                interval_ms: a.interval_ms,
            },
            ScenarioArg::Churn => Scenario::Churn,
            ScenarioArg::Cancel => Scenario::Cancel {
                after_tokens: a.cancel_after,
            },
            ScenarioArg::Idle => unreachable!("handled above"),
        };
        // Each run is a rate (open loop) or a number of clients (closed loop).
        let loads: Vec<(f64, Option<usize>)> = if !a.clients.is_empty() {
            a.clients.iter().map(|&c| (0.0, Some(c.max(1)))).collect()
        } else if !a.rates.is_empty() {
            a.rates.iter().map(|&r| (r, None)).collect()
        } else {
            vec![(a.rate, None)]
        };
        for (rate, clients) in loads {
            let plan = Plan {
                scenario,
                rate,
                clients,
                arrivals: if a.poisson {
                    Arrivals::Poisson { seed: a.seed }
                } else {
                    Arrivals::Constant
                },
                duration: a.duration,
                warmup: a.warmup,
                round: a.round,
                max_in_flight: a.max_in_flight,
                timeout: a.timeout,
                stall: a.stall,
            };
            let cancels_before = runtime_cancels(&a.runtime_stats).await;
            let out = match clients {
                Some(c) => {
                    let bar = progress(a.quiet, &format!("{} c={c}", scenario.name()));
                    let out = run::closed_loop(&targets, &plan, &bar).await;
                    bar.finish_and_clear();
                    out
                }
                None => {
                    let bar = progress(a.quiet, &format!("{} @ {rate}/s", scenario.name()));
                    let out = run::open_loop(&targets, &plan, &bar).await;
                    bar.finish_and_clear();
                    out
                }
            };
            let rep = RunReport::new(&plan, &targets, &out);
            print!("{}", rep.summary());
            if let (Some(before), Scenario::Cancel { .. }) = (cancels_before, scenario) {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let after = runtime_cancels(&a.runtime_stats).await.unwrap_or(before);
                let cancelled: u64 = out.recorders.iter().map(|r| r.ok).sum();
                println!(
                    "runtime saw {} cancels for {} client hang-ups (measured part)",
                    after - before,
                    cancelled
                );
            }
            if let Some(dir) = &a.svg_dir {
                std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
                let stem = rep.stem();
                std::fs::write(
                    dir.join(format!("{stem}-spectrum.svg")),
                    plot::spectrum(&rep, &out.recorders),
                )
                .map_err(|e| e.to_string())?;
                std::fs::write(
                    dir.join(format!("{stem}-p99-over-time.svg")),
                    plot::timeline(&rep),
                )
                .map_err(|e| e.to_string())?;
            }
            markdown += &rep.markdown();
            markdown += "\n";
            runs.push(rep);
        }
        if runs.len() > 1 && a.clients.is_empty() {
            let table = sweep_table(&runs);
            print!("{table}");
            markdown += &table;
        }
    }
    if let Some(path) = &a.json {
        let doc = report::document(&runs, &held, machine());
        std::fs::write(path, serde_json::to_string_pretty(&doc).expect("JSON"))
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    if let Some(path) = &a.markdown {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| e.to_string())?;
        writeln!(f, "{markdown}").map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Highest rate at which each target kept p99 under 1, 5 and 10 ms with no errors or drops.
fn sweep_table(runs: &[RunReport]) -> String {
    let mut s =
        "\n| target | highest rate with p99 < 1 ms | < 5 ms | < 10 ms |\n|---|---|---|---|\n"
            .to_string();
    for (i, t) in runs[0].targets.iter().enumerate() {
        let best = |limit: u64| {
            runs.iter()
                .filter(|r| {
                    let x = &r.targets[i];
                    x.latency_us.p99 < limit && x.errors.is_empty() && x.dropped == 0 && x.ok > 0
                })
                .map(|r| r.target_rps)
                .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))))
                .map_or("-".into(), |v| format!("{v}"))
        };
        s += &format!(
            "| {} | {} | {} | {} |\n",
            t.name,
            best(1000),
            best(5000),
            best(10_000)
        );
    }
    s
}

fn main() -> ExitCode {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    match rt.block_on(main_async(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("loadtest: {e}");
            ExitCode::from(2)
        }
    }
}
