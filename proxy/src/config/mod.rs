//! Configuration, in the manner of memorysafety/river: the file format ([`file`]: serde,
//! unknown keys refused) apart from the internal [`Config`] the edge runs on, which is grouped
//! in sections that convert and validate themselves ([`sections`]), once, at load.
//!
//! Whether a key can be reloaded follows from where it lives: everything in [`Fixed`] changes
//! only with a restart or an upgrade (a reload that changes any of it is refused, naming the
//! key), everything else is put in force by a reload. Validation is pure: the files a config
//! names (certificates, plugins) are checked by [`Config::load`], and the environment is read
//! at start by the server.

pub mod file;
mod sections;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use crate::lifecycle::AgentState;
use crate::upstream::UpstreamTarget;

pub use sections::is_label;

/// The embedded default configuration, used when no `--config` is given.
pub const DEFAULT_CONFIG: &str = include_str!("../../../conf/moltghost.toml");

/// A configuration that failed to load: the key and what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

fn bad(key: impl std::fmt::Display, what: impl std::fmt::Display) -> ConfigError {
    ConfigError(format!("config key `{key}`: {what}"))
}

/// The configuration the edge runs on. Built only by [`Config::load`] / [`Config::from_toml`].
#[derive(Debug, Clone)]
pub struct Config {
    /// What only a restart or an upgrade changes.
    pub fixed: Fixed,
    /// How agents are named: `Host` → agent, and how endpoints are printed.
    pub names: Names,
    /// Whether answers carry a `Server-Timing` header (`edge.server_timing`).
    pub server_timing: bool,
    /// Request limits and timeouts.
    pub limits: Limits,
    /// TLS termination, when there are TLS listeners (certificates reload; turning TLS on or
    /// off is in [`Fixed`]).
    pub tls: Option<TlsConfig>,
    /// WASM policy plugins, in the order they run.
    pub plugins: Vec<crate::plugins::PluginConfig>,
    /// Plans by name (never empty).
    pub plans: Vec<Plan>,
    /// Agents declared in the file, seeded into the store at start and at each reload.
    pub agents: Vec<AgentSeed>,
}

/// Everything a reload cannot change: the process holds it (listening sockets, threads, the
/// store link, the tunnels' key, the secrets) or reads it once at start. Its field names are
/// the file's keys, so a refused reload names the key that changed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Fixed {
    /// `[listen]`.
    pub listen: Listen,
    /// `[edge]`'s process settings.
    pub edge: Process,
    /// `[store]`.
    pub store: StoreSettings,
    /// `[limits]`' settings read once at start.
    pub limits: FixedLimits,
    /// Whether TLS is terminated at all.
    #[serde(rename = "tls (on or off)")]
    pub tls: bool,
    /// `[tunnel]`: live tunnels hold the key.
    pub tunnel: TunnelConfig,
    /// `[admin]`'s secrets.
    pub admin: Secrets,
    /// `[traces]`: the span exporter is started once.
    pub traces: crate::traces::TraceSettings,
}

/// The listeners.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Listen {
    /// Public listeners (plain HTTP); at least one.
    pub http: Vec<SocketAddr>,
    /// Public TLS listeners.
    pub https: Vec<SocketAddr>,
    /// The admin API listener.
    pub admin: SocketAddr,
}

/// The process: where its state lives, its threads, how it stops.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Process {
    /// Where the embedded store and generated secrets live.
    pub data_dir: PathBuf,
    /// Worker threads of the proxy service.
    pub threads: usize,
    /// Pingora's grace period before a graceful stop begins.
    pub grace_period: Duration,
    /// How long a graceful stop waits for in-flight requests.
    pub shutdown_timeout: Duration,
    /// The operator's metadata about this edge, shown to plugins as `node.metadata.<key>`.
    pub metadata: std::collections::BTreeMap<String, String>,
}

/// The store and how the edge follows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StoreSettings {
    /// `sqlite://PATH` or `postgres://...`.
    pub url: String,
    /// PostgreSQL itself (or a session-mode pool) when `url` is a pooler in transaction mode:
    /// LISTEN and the migrations' advisory lock need a session of their own.
    pub session_url: Option<String>,
    /// How often the edge checks the store for changes it was not notified of.
    pub poll_interval: Duration,
    /// How often key last-used times are written.
    pub last_used_flush: Duration,
    /// The most connections the edge's pool opens (`None`: 8 to PostgreSQL, 4 to SQLite);
    /// the change listener takes one more.
    pub max_connections: Option<u32>,
    /// Whether the store keeps a row per metered request (`usage_requests`) beside the
    /// per-minute rollups: support finds a request by its `x-request-id`.
    pub request_rows: bool,
}

/// Limits that size structures or tasks made once at start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FixedLimits {
    /// Columns of the rate sketches (4 rows each); more means fewer key collisions.
    pub rate_sketch_slots: usize,
    /// How often an edge ships its ledger journal and exchanges limit state with the fleet.
    pub fleet_sync: Duration,
    /// How quota leases are sized and kept (`limits.lease_*`).
    #[serde(flatten)]
    pub leases: crate::quota::LeaseSettings,
}

/// The secrets from the file (else from the environment or generated at start).
#[derive(Clone, PartialEq, Eq, Serialize)]
pub struct Secrets {
    /// Signs admin JWTs (HS256); else `MOLTGHOST_ADMIN_SECRET`, else generated in the data
    /// directory.
    pub jwt_secret: Option<String>,
    /// Keys the API-key HMAC; else `MOLTGHOST_KEY_SECRET`, else generated in the data
    /// directory. Every edge of a fleet must share it.
    pub key_secret: Option<String>,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Secrets never reach a log.
        let set = |s: &Option<String>| s.as_ref().map(|_| "<set>");
        f.debug_struct("Secrets")
            .field("jwt_secret", &set(&self.jwt_secret))
            .field("key_secret", &set(&self.key_secret))
            .finish()
    }
}

/// How agents are named.
#[derive(Debug, Clone)]
pub struct Names {
    /// `Host: <endpoint-id>.<agents_domain>` selects the agent.
    pub agents_domain: String,
    /// How endpoints are printed, with `{id}` for the endpoint id.
    pub public_url: String,
}

/// Request limits and timeouts (all reloadable).
#[derive(Debug, Clone)]
pub struct Limits {
    /// Whether rate limits, stream caps, quotas and usage metering apply. Off only to measure
    /// the bare edge, or where usage is metered elsewhere; keys and lifecycle always apply.
    pub enabled: bool,
    /// Largest request body accepted (413 above).
    pub max_body_bytes: usize,
    /// Deadline of a whole request when the client sets none (504 after).
    pub request_timeout: Duration,
    /// Largest `timeout_seconds` a client may ask for.
    pub max_timeout: Duration,
    /// Longest silence between two reads from the runtime.
    pub stream_idle_timeout: Duration,
    /// How often an idle WebSocket is pinged; one that stays silent for two intervals is closed.
    pub websocket_ping_interval: Duration,
    /// Timeout of connecting to an upstream.
    pub connect_timeout: Duration,
    /// How long an idle upstream connection stays pooled.
    pub upstream_keepalive: Duration,
    /// Completion tokens reserved for a request that names no `max_tokens`.
    pub default_max_tokens: u64,
    /// Status of rate refusals: 403 (the spec) or 429 (lets OpenAI SDKs retry by themselves).
    pub rate_limit_status: u16,
    /// What a client connection may take of the edge.
    pub clients: ClientLimits,
}

/// Deadlines and caps of client connections: what a slow or idle client may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientLimits {
    /// Total time for a request's header, from the connection's accept or the end of the
    /// previous answer (plus [`ClientLimits::keepalive_idle`] on a kept-alive connection); past
    /// it the connection is closed.
    pub header_timeout: Duration,
    /// Total time for a request's body (408 after).
    pub body_timeout: Duration,
    /// How long a kept-alive connection may wait idle for its next request.
    pub keepalive_idle: Duration,
    /// Longest stall of one write of an answer to a client that reads slowly; past it the
    /// edge gives up on the answer and closes the connection.
    pub send_timeout: Duration,
    /// Open client connections, beyond which a new one is refused with 503 `overloaded`.
    pub max_connections: usize,
}

/// The edge's side of its WireGuard tunnels.
#[derive(Clone, PartialEq, Eq, Serialize)]
pub struct TunnelConfig {
    /// The edge's private key (base64), checked at load. When the file names none, the edge
    /// takes `MOLTGHOST_WG_KEY` at start, else `wg_key` in the data directory (created on
    /// first start).
    pub private_key: Option<String>,
    /// A preshared key every pod also holds (base64), as `wg`'s `PresharedKey`.
    pub preshared_key: Option<[u8; 32]>,
    /// Largest packet inside the tunnel.
    pub mtu: usize,
}

impl std::fmt::Debug for TunnelConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Secrets never reach a log.
        f.debug_struct("TunnelConfig")
            .field("private_key", &self.private_key.as_ref().map(|_| "<set>"))
            .field("preshared_key", &self.preshared_key.map(|_| "<set>"))
            .field("mtu", &self.mtu)
            .finish()
    }
}

/// What a plain-HTTP listener does when TLS is configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlainHttp {
    /// Serve it (development, or TLS terminated in front of the edge).
    Serve,
    /// Answer 308 to the same URL on HTTPS.
    Redirect,
    /// Refuse with 403 JSON.
    Refuse,
}

/// TLS termination settings.
#[derive(Debug, Clone)]
pub struct TlsConfig {
    /// Certificates and the names they serve; the first serves unknown names.
    pub certificates: Vec<crate::tls::CertSpec>,
    /// What plain-HTTP listeners do.
    pub plain_http: PlainHttp,
    /// Offer HTTP/2 by ALPN (HTTP/1.1 always).
    pub http2: bool,
    /// How often certificate files are checked for changes.
    pub reload_interval: Duration,
}

/// A plan: what an account may use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Name accounts refer to.
    pub name: String,
    /// Requests per minute per key.
    pub requests_per_minute: u32,
    /// Tokens per calendar month per account.
    pub tokens_per_month: u64,
    /// Concurrent streams per key.
    pub concurrent_streams: u32,
}

/// An agent declared in the config file.
#[derive(Debug, Clone)]
pub struct AgentSeed {
    /// Endpoint id (the host label).
    pub endpoint_id: String,
    /// Human name.
    pub name: String,
    /// Owning account.
    pub account: String,
    /// Where its runtime is.
    pub upstream: UpstreamTarget,
    /// Lifecycle state at first start.
    pub state: AgentState,
}

impl Config {
    /// Loads `path`, or the embedded default when `None`, and checks that the files it names
    /// are there.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let cfg = match path {
            None => Self::from_toml(DEFAULT_CONFIG)?,
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .map_err(|e| ConfigError(format!("cannot read {}: {e}", p.display())))?;
                Self::from_toml(&text)
                    .map_err(|e| ConfigError(format!("{}: {}", p.display(), e.0)))?
            }
        };
        cfg.check_files().map_err(|e| match path {
            Some(p) => ConfigError(format!("{}: {}", p.display(), e.0)),
            None => e,
        })?;
        Ok(cfg)
    }

    /// Parses and validates a TOML document. Pure: reads no file and no environment.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let file: file::FileConfig =
            toml::from_str(text).map_err(|e| ConfigError(e.to_string()))?;
        sections::build(file)
    }

    /// The files the config names exist: certificates and keys, plugin modules.
    pub fn check_files(&self) -> Result<(), ConfigError> {
        for (i, c) in self.tls.iter().flat_map(|t| &t.certificates).enumerate() {
            for (k, path) in [("cert", &c.cert), ("key", &c.key)] {
                if !path.is_file() {
                    return Err(bad(
                        format!("tls.certificates[{i}].{k}"),
                        format!("no file at {path:?}"),
                    ));
                }
            }
        }
        for (i, p) in self.plugins.iter().enumerate() {
            if !p.path.is_file() {
                return Err(bad(
                    format!("plugins[{i}].path"),
                    format!("no such file: {}", p.path.display()),
                ));
            }
        }
        Ok(())
    }

    /// The first key that `next` changes and only a restart or an upgrade can (anything in
    /// [`Fixed`]), as the file names it.
    pub fn restart_only_change(&self, next: &Config) -> Option<String> {
        if self.fixed == next.fixed {
            return None;
        }
        let cur = serde_json::to_value(&self.fixed).expect("plain data serializes");
        let next = serde_json::to_value(&next.fixed).expect("plain data serializes");
        Some(first_difference(&cur, &next, "", 2).unwrap_or_else(|| "a restart-only key".into()))
    }

    /// The edge as plugins see it (Envoy's `node`): `edge_id` and the configured metadata.
    pub fn node(&self, edge_id: &str) -> crate::plugins::Node {
        crate::plugins::Node {
            id: edge_id.to_owned(),
            metadata: self.fixed.edge.metadata.clone(),
        }
    }

    /// Connection settings for upstream peers.
    pub fn peer_settings(&self) -> crate::upstream::PeerSettings {
        crate::upstream::PeerSettings {
            connect_timeout: self.limits.connect_timeout,
            read_timeout: self.limits.stream_idle_timeout,
            keepalive: self.limits.upstream_keepalive,
        }
    }

    /// The plan called `name`.
    pub fn plan(&self, name: &str) -> Option<&Plan> {
        self.plans.iter().find(|p| p.name == name)
    }

    /// The public URL of an agent's endpoint.
    pub fn endpoint_url(&self, endpoint_id: &str) -> String {
        self.names.public_url.replace("{id}", endpoint_id)
    }
}

/// The dotted path (at most `depth` levels) of the first place where `a` and `b` differ.
fn first_difference(
    a: &serde_json::Value,
    b: &serde_json::Value,
    at: &str,
    depth: usize,
) -> Option<String> {
    if a == b {
        return None;
    }
    match (a, b) {
        (serde_json::Value::Object(x), serde_json::Value::Object(y)) if depth > 0 => {
            x.iter().find_map(|(k, v)| {
                let path = if at.is_empty() {
                    k.clone()
                } else {
                    format!("{at}.{k}")
                };
                first_difference(
                    v,
                    y.get(k).unwrap_or(&serde_json::Value::Null),
                    &path,
                    depth - 1,
                )
            })
        }
        _ => Some(at.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_is_valid() {
        let c = Config::from_toml(DEFAULT_CONFIG).unwrap();
        assert_eq!(c.names.agents_domain, "agent.localhost");
        assert_eq!(c.limits.max_body_bytes, 8 * 1024 * 1024);
    }

    #[test]
    fn errors_name_the_key() {
        let e = Config::from_toml("[limits]\nrequest_timeout = \"soon\"").unwrap_err();
        assert!(e.0.contains("limits.request_timeout"), "{e}");
        let e = Config::from_toml("[[agents]]\nid = \"a\"\nupstream = \"ftp://x\"").unwrap_err();
        assert!(e.0.contains("agents[0].upstream"), "{e}");
        let e = Config::from_toml("[[agents]]\nid = \"A_B\"\nupstream = \"http://127.0.0.1:1\"")
            .unwrap_err();
        assert!(e.0.contains("agents[0].id"), "{e}");
        let e = Config::from_toml("[store]\nmax_connections = 1").unwrap_err();
        assert!(e.0.contains("store.max_connections"), "{e}");
        let e = Config::from_toml("[traces]\notlp_endpoint = \"grpc://c\"").unwrap_err();
        assert!(e.0.contains("traces.otlp_endpoint"), "{e}");
        let e = Config::from_toml("[traces]\notlp_protocol = \"thrift\"").unwrap_err();
        assert!(e.0.contains("traces.otlp_protocol"), "{e}");
        let e = Config::from_toml("[traces]\nsampling_ratio = 2.0").unwrap_err();
        assert!(e.0.contains("traces.sampling_ratio"), "{e}");
        let e = Config::from_toml("[store]\nsession_url = \"postgres://pg/db\"").unwrap_err();
        assert!(e.0.contains("store.session_url"), "{e}");
        let e = Config::from_toml("[edge]\nnope = 1").unwrap_err();
        assert!(e.0.contains("nope"), "{e}");
        let e = Config::from_toml(
            "[[agents]]\nid = \"a\"\nupstream = \"http://127.0.0.1:1\"\nstate = \"dancing\"",
        )
        .unwrap_err();
        assert!(e.0.contains("agents[0].state"), "{e}");
    }

    #[test]
    fn the_edges_metadata_is_its_node_for_plugins() {
        let c = Config::from_toml("[edge]\nmetadata = { region = \"eu-west\", \"a.b\" = \"c\" }")
            .unwrap();
        let node = c.node("e1");
        assert_eq!(node.id, "e1");
        assert_eq!(node.metadata["region"], "eu-west");
        assert_eq!(node.metadata["a.b"], "c");
        let next = Config::from_toml("[edge]\nmetadata = { region = \"us\" }").unwrap();
        assert_eq!(
            c.restart_only_change(&next).as_deref(),
            Some("edge.metadata")
        );
    }

    #[test]
    fn a_reload_may_change_what_is_not_fixed() {
        let cur = Config::from_toml("").unwrap();
        let next = Config::from_toml(
            "[edge]\nagents_domain = \"agents.example\"\n[limits]\nrequest_timeout = \"5s\"\n\
             [[plans]]\nname = \"pro\"\nrequests_per_minute = 5\ntokens_per_month = 9",
        )
        .unwrap();
        assert_eq!(cur.restart_only_change(&next), None);
    }

    #[test]
    fn a_reload_that_changes_a_fixed_key_names_it() {
        let cur = Config::from_toml("").unwrap();
        for (file, key) in [
            ("[listen]\nhttp = [\"127.0.0.1:1\"]", "listen.http"),
            ("[listen]\nadmin = \"127.0.0.1:2\"", "listen.admin"),
            ("[edge]\nthreads = 3", "edge.threads"),
            ("[edge]\ndata_dir = \"/elsewhere\"", "edge.data_dir"),
            ("[store]\nurl = \"postgres://db/x\"", "store.url"),
            (
                "[limits]\nrate_sketch_slots = 128",
                "limits.rate_sketch_slots",
            ),
            ("[limits]\nfleet_sync = \"2s\"", "limits.fleet_sync"),
            ("[traces]\nsampling_ratio = 0.5", "traces.sampling_ratio"),
            ("[limits]\nlease_ttl = \"10s\"", "limits.lease_ttl"),
            ("[tunnel]\nmtu = 1280", "tunnel.mtu"),
            ("[admin]\nkey_secret = \"other\"", "admin.key_secret"),
        ] {
            let next = Config::from_toml(file).unwrap();
            assert_eq!(
                cur.restart_only_change(&next).as_deref(),
                Some(key),
                "{file}"
            );
        }
    }

    #[test]
    fn validation_reads_no_file_and_no_environment() {
        // A plugin whose file is missing validates; loading checks the file.
        let text = "[[plugins]]\nname = \"p\"\npath = \"/no/such/plugin.wasm\"";
        let c = Config::from_toml(text).unwrap();
        let e = c.check_files().unwrap_err();
        assert!(e.0.contains("plugins[0].path"), "{e}");
        // The tunnel key is the file's alone; the environment is read at start.
        assert_eq!(c.fixed.tunnel.private_key, None);
    }

    #[test]
    fn secrets_never_reach_debug_output() {
        let c = Config::from_toml("[admin]\njwt_secret = \"hunter2\"\nkey_secret = \"s3cret\"")
            .unwrap();
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("s3cret"),
            "{shown}"
        );
    }
}
