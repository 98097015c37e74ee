//! `moltghost-pod`: the sidecar that runs next to an agent runtime and terminates the edge's
//! WireGuard tunnel.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use moltghost_pod::{JwksSource, PodConfig};
use moltghost_tunnel::keys;

/// The MoltGhost pod sidecar: the agent runtime's end of the edge's WireGuard tunnel.
///
/// It listens on UDP, accepts handshakes only from the edge's key(s), checks the caller identity
/// the edge signs into every request (x-moltghost-identity, against the edge's JWKS), and
/// forwards to the runtime with the caller as x-moltghost-account, -key-id and -agent headers.
///
/// Set-up, once per pod:
///   moltghost-pod keygen                          # prints the pod's public key
///   moltghost agent create my-agent --pod <that key>@<pod host>:51820
///   moltghost-pod run --edge-key <edge public key> --upstream http://127.0.0.1:8080 \
///       --jwks http://<edge admin>/.well-known/jwks.json
///
/// The edge's public key is in `moltghost status --json` (tunnel.public_key) or the admin API's
/// /v1/admin/status. The pod's private key stays in its state directory.
#[derive(Parser)]
#[command(version, verbatim_doc_comment)]
struct Cli {
    /// Where the pod keeps its private key.
    #[arg(
        long,
        global = true,
        env = "MOLTGHOST_POD_STATE",
        default_value = ".moltghost-pod"
    )]
    state_dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the pod's public key, making its key pair on first use.
    Keygen,
    /// Run the sidecar.
    Run(RunArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// UDP address to listen on.
    #[arg(long, env = "MOLTGHOST_POD_LISTEN", default_value = "0.0.0.0:51820")]
    listen: SocketAddr,
    /// The edge's WireGuard public key; repeat it to accept two during a key rotation.
    #[arg(
        long = "edge-key",
        env = "MOLTGHOST_EDGE_KEY",
        value_delimiter = ',',
        required = true
    )]
    edge_keys: Vec<String>,
    /// The agent runtime: http://host:port (no path: the edge sends the route's own).
    #[arg(long, env = "MOLTGHOST_POD_UPSTREAM")]
    upstream: String,
    /// The edge's identity keys: the admin API's JWKS URL, or a JWKS file.
    #[arg(long, env = "MOLTGHOST_POD_JWKS")]
    jwks: String,
    /// A file holding the preshared key (base64), if the edge uses one.
    #[arg(long)]
    preshared_key_file: Option<PathBuf>,
    /// Largest packet inside the tunnel (the edge's `tunnel.mtu`).
    #[arg(long, default_value_t = 1420)]
    mtu: usize,
    /// Carry the connections with this pod's kernel TCP through a TUN device of this name
    /// (address 10.7.0.2/24; needs CAP_NET_ADMIN and `ip`), instead of the userspace stack:
    /// recovers from packet loss faster.
    #[arg(long, value_name = "NAME")]
    tun: Option<String>,
    /// Export a span for each request the edge's trace samples to this OpenTelemetry
    /// collector (OTLP over HTTP with protobuf, e.g. http://collector:4318); the runtime then
    /// gets the sidecar's span as its parent. Off when absent.
    #[arg(long, env = "MOLTGHOST_POD_OTLP_ENDPOINT", value_name = "URL")]
    otlp_endpoint: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let secret = match moltghost_common::secrets::wireguard_key(None, &cli.state_dir, "wg_key") {
        Ok(k) => k,
        Err(e) => return fail(&format!("pod key: {e}")),
    };
    match cli.command {
        Command::Keygen => {
            println!("{}", keys::public_of(&secret));
            ExitCode::SUCCESS
        }
        Command::Run(args) => {
            let _log = moltghost_common::init_tracing();
            match run(args, secret) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(&e),
            }
        }
    }
}

fn run(args: RunArgs, secret: boringtun::x25519::StaticSecret) -> Result<(), String> {
    let edge_keys = args
        .edge_keys
        .iter()
        .map(|k| keys::public(k).map_err(|e| format!("--edge-key {k:?}: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    let preshared = args
        .preshared_key_file
        .map(|p| {
            std::fs::read_to_string(&p)
                .map_err(|e| format!("{}: {e}", p.display()))
                .and_then(|k| keys::decode(&k))
        })
        .transpose()?;
    let upstream = runtime_address(&args.upstream)?;
    let jwks = if args.jwks.starts_with("http://") || args.jwks.starts_with("https://") {
        JwksSource::Url(args.jwks)
    } else {
        JwksSource::File(args.jwks.into())
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let _pod = moltghost_pod::start(PodConfig {
            listen: args.listen,
            secret,
            edge_keys,
            preshared,
            upstream,
            jwks,
            mtu: args.mtu,
            tun: args.tun,
            otlp_endpoint: args.otlp_endpoint,
        })
        .await?;
        let _ = tokio::signal::ctrl_c().await;
        Ok(())
    })
}

/// The runtime's address from `http://host:port` (resolved once, at start).
fn runtime_address(url: &str) -> Result<SocketAddr, String> {
    let bad = || format!("--upstream must be http://host:port, got {url:?}");
    let u = url::Url::parse(url).map_err(|_| bad())?;
    if u.scheme() != "http" || !matches!(u.path(), "" | "/") || u.query().is_some() {
        return Err(bad());
    }
    let host = u
        .host_str()
        .ok_or_else(bad)?
        .trim_matches(|c| c == '[' || c == ']');
    (host, u.port_or_known_default().unwrap_or(80))
        .to_socket_addrs()
        .map_err(|e| format!("--upstream {url}: {e}"))?
        .next()
        .ok_or_else(|| format!("--upstream {url}: no address"))
}

fn fail(e: &str) -> ExitCode {
    eprintln!("moltghost-pod: {e}");
    ExitCode::from(1)
}
