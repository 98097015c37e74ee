//! `moltghost-proxy`: the MoltGhost edge server.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use moltghost::config::Config;

/// jemalloc, whose unused pages a background thread gives back to the system a few seconds
/// after a burst: with glibc's allocator, the memory of thousands of closed streams stayed
/// resident for good (issue 17; `loadtest/memory.sh` measures both).
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read when it starts (`MALLOC_CONF`-style; the `_RJEM_MALLOC_CONF`
/// environment variable still overrides them): purge unused pages on a background thread,
/// dirty ones after 5 s, and return them to the kernel at once (no lazy `MADV_FREE` pages that
/// would still count as resident).
#[export_name = "_rjem_malloc_conf"]
static MALLOC_CONF: ConfString =
    ConfString(c"background_thread:true,dirty_decay_ms:5000,muzzy_decay_ms:0".as_ptr());

/// A C string jemalloc reads once at start.
#[repr(transparent)]
struct ConfString(*const std::ffi::c_char);
// SAFETY: it points to a static, immutable C string literal.
unsafe impl Sync for ConfString {}

/// The MoltGhost edge: authenticates, limits and forwards requests to AI agents.
///
/// Serves every agent at http://<endpoint-id>.<agents_domain>:<port>/v1/... (OpenAI-compatible
/// routes, the native /v1/chat, /v1/tools, /v1/models and /v1/health).
///
/// Examples:
///   moltghost-proxy                          # the embedded default config
///   moltghost-proxy --config conf/fleet.toml
///   moltghost-proxy --config my.toml --check # validate and exit
///   moltghost-proxy --config my.toml --upgrade && kill -QUIT <old pid>   # zero-downtime upgrade
///
/// Logs are JSON lines on stdout (RUST_LOG=debug for more). SIGTERM or Ctrl-C stops gracefully;
/// SIGHUP reloads the configuration file (plans, limits, timeouts, agents, certificates).
#[derive(Parser)]
#[command(version, verbatim_doc_comment)]
struct Args {
    /// Configuration file (TOML); the embedded default when absent.
    #[arg(long, short, env = "MOLTGHOST_CONFIG")]
    config: Option<PathBuf>,
    /// Validate the configuration, print a summary and exit.
    #[arg(long)]
    check: bool,
    /// Take over the listening sockets of the running edge (same config), which then drains:
    /// start this, then send SIGQUIT to the old process. See README "Upgrades".
    #[arg(long)]
    upgrade: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let cfg = match Config::load(args.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("moltghost-proxy: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    if args.check {
        // Plugins are compiled, started and configured, as the edge would at start.
        let reach = moltghost::plugins::Reach {
            node: std::sync::Arc::new(cfg.node("")),
            pods: None,
        };
        if let Err(e) = moltghost::plugins::PluginSet::load(&cfg.plugins, &reach) {
            eprintln!("moltghost-proxy: invalid configuration: {e}");
            return ExitCode::from(2);
        }
        println!(
            "configuration OK: {} listener(s), agents domain {}, {} plan(s), {} agent(s), {} plugin(s)",
            cfg.fixed.listen.http.len(),
            cfg.names.agents_domain,
            cfg.plans.len(),
            cfg.agents.len(),
            cfg.plugins.len()
        );
        return ExitCode::SUCCESS;
    }
    let _log = moltghost::init_tracing();
    let path = args
        .config
        .as_ref()
        .map(|p| p.canonicalize().unwrap_or_else(|_| p.clone()));
    match moltghost::server::run(cfg, path, args.upgrade) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("moltghost-proxy: {e}");
            ExitCode::from(1)
        }
    }
}
