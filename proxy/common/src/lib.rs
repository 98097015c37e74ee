//! What every MoltGhost binary shares (the edge, the CLI, the pod sidecar), and nothing that
//! would make one of them link what it does not use: the JSON log set-up, secrets kept on disk,
//! the caller identity the edge signs and the pod verifies, admin API tokens, and span export
//! over OTLP.

pub mod admin_token;
pub mod identity;
pub mod logwriter;
#[cfg(feature = "otlp")]
pub mod otlp;
pub mod secrets;

/// Seconds since the Unix epoch.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Sets up `tracing`: JSON lines on stdout, filtered by `RUST_LOG` (default `info`), buffered
/// off the request path ([`logwriter`]). Keep the guard for the life of the process: dropping
/// it writes out what is left.
pub fn init_tracing() -> logwriter::FlushGuard {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,pingora=warn".into());
    let (writer, guard) = logwriter::stdout();
    let _ = tracing_subscriber::fmt()
        .json()
        .with_env_filter(filter)
        .with_current_span(false)
        .with_writer(writer)
        .try_init();
    guard
}
