//! `agent-runtime`: the reference OpenAI-compatible agent runtime, as a process.

use std::time::Duration;

use clap::Parser;
use moltghost_loadtest::runtime::{serve, RuntimeConfig};

/// The reference agent runtime used by MoltGhost's tests, `moltghost dev` and benchmarks.
///
/// Answers deterministically on /v1/chat/completions, /v1/completions, /v1/models, /v1/tools and
/// /health. Per-request overrides: x-mock-ttft-ms, x-mock-interval-ms, x-mock-tokens,
/// x-mock-stall-after, x-mock-abort-after, x-mock-status, x-mock-no-usage.
///
/// Example: agent-runtime --listen 127.0.0.1:9000 --interval-ms 20 --tokens 64
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:9000")]
    listen: String,
    /// Model name to report.
    #[arg(long, default_value = "llama3.1-70b")]
    model: String,
    /// Milliseconds before the first token.
    #[arg(long, default_value_t = 0)]
    ttft_ms: u64,
    /// Milliseconds between tokens.
    #[arg(long, default_value_t = 0)]
    interval_ms: u64,
    /// Completion tokens per answer.
    #[arg(long, default_value_t = 16)]
    tokens: u32,
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let listener = tokio::net::TcpListener::bind(&args.listen).await?;
    eprintln!(
        "agent-runtime listening on http://{}",
        listener.local_addr()?
    );
    let cfg = RuntimeConfig {
        model: args.model,
        ttft: Duration::from_millis(args.ttft_ms),
        interval: Duration::from_millis(args.interval_ms),
        tokens: args.tokens,
    };
    serve(listener, cfg).await
}
