//! Configuration: the TOML file format ([`FileConfig`]) and the one internal [`Config`] the edge
//! runs on, validated once at load. Every error names the key and what is wrong with it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::lifecycle::AgentState;
use crate::upstream::UpstreamTarget;

/// The embedded default configuration, used when no `--config` is given.
pub const DEFAULT_CONFIG: &str = include_str!("../../conf/moltghost.toml");

/// A configuration that failed to load: the key and what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

fn bad(key: impl std::fmt::Display, what: impl std::fmt::Display) -> ConfigError {
    ConfigError(format!("config key `{key}`: {what}"))
}

// ---------------------------------------------------------------- file format

/// The file as written: strings where the operator writes durations and URLs.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    listen: FileListen,
    #[serde(default)]
    edge: FileEdge,
    #[serde(default)]
    limits: FileLimits,
    #[serde(default)]
    store: FileStore,
    #[serde(default)]
    admin: FileAdmin,
    #[serde(default)]
    tls: Option<FileTls>,
    #[serde(default)]
    tunnel: FileTunnel,
    #[serde(default)]
    plugins: Vec<FilePlugin>,
    #[serde(default)]
    plans: Vec<FilePlan>,
    #[serde(default)]
    agents: Vec<FileAgent>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTls {
    #[serde(default)]
    plain_http: Option<String>,
    #[serde(default)]
    http2: Option<bool>,
    #[serde(default)]
    reload_interval: Option<String>,
    #[serde(default)]
    certificates: Vec<FileCert>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileCert {
    names: Vec<String>,
    cert: String,
    key: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileListen {
    #[serde(default = "default_http")]
    http: Vec<String>,
    #[serde(default)]
    https: Vec<String>,
    #[serde(default = "default_admin_listen")]
    admin: String,
}

impl Default for FileListen {
    fn default() -> Self {
        Self {
            http: default_http(),
            https: Vec::new(),
            admin: default_admin_listen(),
        }
    }
}

fn default_http() -> Vec<String> {
    vec!["127.0.0.1:8080".into()]
}
fn default_admin_listen() -> String {
    "127.0.0.1:9901".into()
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileEdge {
    agents_domain: Option<String>,
    public_url: Option<String>,
    data_dir: Option<String>,
    threads: Option<usize>,
    grace_period: Option<String>,
    shutdown_timeout: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileLimits {
    max_body_bytes: Option<usize>,
    request_timeout: Option<String>,
    max_timeout: Option<String>,
    stream_idle_timeout: Option<String>,
    websocket_ping_interval: Option<String>,
    connect_timeout: Option<String>,
    upstream_keepalive: Option<String>,
    default_max_tokens: Option<u64>,
    enabled: Option<bool>,
    rate_limit_status: Option<u16>,
    rate_sketch_slots: Option<usize>,
    fleet_sync: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileStore {
    url: Option<String>,
    poll_interval: Option<String>,
    last_used_flush: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FilePlugin {
    name: String,
    path: String,
    #[serde(default)]
    config: Option<toml::Value>,
    #[serde(default)]
    fail: Option<String>,
    #[serde(default)]
    agents: Vec<String>,
    #[serde(default)]
    routes: Vec<String>,
    #[serde(default)]
    deadline: Option<String>,
    #[serde(default)]
    memory_mb: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileTunnel {
    private_key: Option<String>,
    preshared_key: Option<String>,
    mtu: Option<usize>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileAdmin {
    jwt_secret: Option<String>,
    key_secret: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FilePlan {
    name: String,
    requests_per_minute: u32,
    tokens_per_month: u64,
    #[serde(default = "default_streams")]
    concurrent_streams: u32,
}

fn default_streams() -> u32 {
    16
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileAgent {
    id: String,
    name: Option<String>,
    upstream: String,
    #[serde(default)]
    state: Option<String>,
    account: Option<String>,
}

// ---------------------------------------------------------------- the internal config

/// The configuration the edge runs on. Built only by [`Config::load`] / [`Config::from_toml`].
#[derive(Debug, Clone)]
pub struct Config {
    /// Public listeners (plain HTTP).
    pub http_listen: Vec<SocketAddr>,
    /// Public TLS listeners.
    pub https_listen: Vec<SocketAddr>,
    /// TLS settings, when there are TLS listeners.
    pub tls: Option<TlsConfig>,
    /// The admin API listener.
    pub admin_listen: SocketAddr,
    /// `Host: <endpoint-id>.<agents_domain>` selects the agent.
    pub agents_domain: String,
    /// How endpoints are printed, with `{id}` for the endpoint id.
    pub public_url: String,
    /// Where the embedded store and generated secrets live.
    pub data_dir: PathBuf,
    /// Worker threads of the proxy service.
    pub threads: usize,
    /// Pingora's grace period before a graceful stop begins.
    pub grace_period: Duration,
    /// How long a graceful stop waits for in-flight requests.
    pub shutdown_timeout: Duration,
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
    /// Whether rate limits, stream caps, quotas and usage metering apply. Off only to measure
    /// the bare edge, or where usage is metered elsewhere; keys and lifecycle always apply.
    pub limits_enabled: bool,
    /// Status of rate refusals: 403 (the spec) or 429 (lets OpenAI SDKs retry by themselves).
    pub rate_limit_status: u16,
    /// Columns of the rate sketches (4 rows each); more means fewer key collisions.
    pub rate_sketch_slots: usize,
    /// How often an edge ships its ledger journal and exchanges limit state with the fleet.
    pub fleet_sync: Duration,
    /// The store: `sqlite://PATH` or `postgres://...`.
    pub store_url: String,
    /// How often the edge checks the store for changes it was not notified of.
    pub store_poll_interval: Duration,
    /// How often key last-used times are written.
    pub last_used_flush: Duration,
    /// Secret that signs admin JWTs (HS256); from config or `MOLTGHOST_ADMIN_SECRET`, else
    /// generated in the data directory.
    pub admin_jwt_secret: Option<String>,
    /// Secret that keys the API-key HMAC; from config or `MOLTGHOST_KEY_SECRET`, else generated
    /// in the data directory. Every edge of a fleet must share it.
    pub key_secret: Option<String>,
    /// WireGuard: how the edge reaches pods.
    pub tunnel: TunnelConfig,
    /// WASM policy plugins, in the order they run.
    pub plugins: Vec<crate::plugins::PluginConfig>,
    /// Plans by name.
    pub plans: Vec<Plan>,
    /// Agents declared in the file, seeded into the store at start.
    pub agents: Vec<AgentSeed>,
}

/// The edge's side of its WireGuard tunnels.
#[derive(Clone, PartialEq, Eq)]
pub struct TunnelConfig {
    /// The edge's private key (base64); else `MOLTGHOST_WG_KEY`, else `wg_key` in the data
    /// directory, created on first start.
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

/// The `[[plugins]]`: names unique, files there, fail policy known, limits sane. (The modules
/// themselves are compiled and started when the edge loads the configuration.)
fn plugins(files: Vec<FilePlugin>) -> Result<Vec<crate::plugins::PluginConfig>, ConfigError> {
    let mut out: Vec<crate::plugins::PluginConfig> = Vec::with_capacity(files.len());
    for (i, p) in files.into_iter().enumerate() {
        let key = |k: &str| format!("plugins[{i}].{k}");
        if p.name.is_empty() || out.iter().any(|o| o.name == p.name) {
            return Err(bad(key("name"), "must be present and unique"));
        }
        let path = std::path::PathBuf::from(&p.path);
        if !path.is_file() {
            return Err(bad(key("path"), format!("no such file: {}", p.path)));
        }
        let fail_open = match p.fail.as_deref().unwrap_or("closed") {
            "closed" => false,
            "open" => true,
            other => {
                return Err(bad(
                    key("fail"),
                    format!("`closed` or `open`, not {other:?}"),
                ))
            }
        };
        let config = match p.config {
            None => String::new(),
            Some(toml::Value::String(s)) => s,
            // A table (or any other value) reaches the plugin as JSON.
            Some(v) => serde_json::to_string(&v).map_err(|e| bad(key("config"), e))?,
        };
        let deadline = duration(&key("deadline"), &p.deadline, Duration::from_millis(10))?;
        let memory_mb = p.memory_mb.unwrap_or(64);
        if !(1..=1024).contains(&memory_mb) {
            return Err(bad(key("memory_mb"), "must be between 1 and 1024"));
        }
        out.push(crate::plugins::PluginConfig {
            name: p.name,
            path,
            config,
            fail_open,
            agents: p.agents,
            routes: p.routes,
            deadline,
            memory_bytes: (memory_mb as usize) << 20,
        });
    }
    Ok(out)
}

fn duration(key: &str, v: &Option<String>, default: Duration) -> Result<Duration, ConfigError> {
    match v {
        None => Ok(default),
        Some(s) => {
            let d = humantime::parse_duration(s).map_err(|e| {
                bad(
                    key,
                    format!("expected a duration like \"30s\" or \"5m\", got {s:?} ({e})"),
                )
            })?;
            if d.is_zero() {
                return Err(bad(key, "must be greater than zero"));
            }
            Ok(d)
        }
    }
}

fn addr(key: &str, s: &str) -> Result<SocketAddr, ConfigError> {
    s.parse().map_err(|_| {
        bad(
            key,
            format!("expected an address like \"127.0.0.1:8080\", got {s:?}"),
        )
    })
}

/// True for a valid endpoint id or name label: 1–63 of `a-z0-9-`, not starting or ending in `-`.
pub fn is_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

impl Config {
    /// Connection settings for upstream peers.
    pub fn peer_settings(&self) -> crate::upstream::PeerSettings {
        crate::upstream::PeerSettings {
            connect_timeout: self.connect_timeout,
            read_timeout: self.stream_idle_timeout,
            keepalive: self.upstream_keepalive,
        }
    }

    /// Loads `path`, or the embedded default when `None`.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        match path {
            None => Self::from_toml(DEFAULT_CONFIG),
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .map_err(|e| ConfigError(format!("cannot read {}: {e}", p.display())))?;
                Self::from_toml(&text).map_err(|e| ConfigError(format!("{}: {}", p.display(), e.0)))
            }
        }
    }

    /// Parses and validates a TOML document.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let file: FileConfig = toml::from_str(text).map_err(|e| ConfigError(e.to_string()))?;
        Self::validate(file)
    }

    fn validate(f: FileConfig) -> Result<Self, ConfigError> {
        let plugins = plugins(f.plugins)?;
        let tunnel = TunnelConfig {
            private_key: match f.tunnel.private_key {
                Some(k) => {
                    crate::tunnel::keys::decode(&k).map_err(|e| bad("tunnel.private_key", &e))?;
                    Some(k)
                }
                None => std::env::var("MOLTGHOST_WG_KEY")
                    .ok()
                    .filter(|k| !k.is_empty()),
            },
            preshared_key: f
                .tunnel
                .preshared_key
                .map(|k| crate::tunnel::keys::decode(&k))
                .transpose()
                .map_err(|e| bad("tunnel.preshared_key", &e))?,
            mtu: match f.tunnel.mtu.unwrap_or(1420) {
                m @ 576..=65_000 => m,
                _ => return Err(bad("tunnel.mtu", "must be between 576 and 65000")),
            },
        };
        if f.listen.http.is_empty() {
            return Err(bad("listen.http", "needs at least one address"));
        }
        let http_listen = f
            .listen
            .http
            .iter()
            .enumerate()
            .map(|(i, s)| addr(&format!("listen.http[{i}]"), s))
            .collect::<Result<Vec<_>, _>>()?;
        let admin_listen = addr("listen.admin", &f.listen.admin)?;
        let https_listen = f
            .listen
            .https
            .iter()
            .enumerate()
            .map(|(i, s)| addr(&format!("listen.https[{i}]"), s))
            .collect::<Result<Vec<_>, _>>()?;
        let tls = match (f.tls, https_listen.is_empty()) {
            (None, true) => None,
            (None, false) => {
                return Err(bad(
                    "tls.certificates",
                    "listen.https needs at least one certificate",
                ))
            }
            (Some(t), _) => {
                if t.certificates.is_empty() {
                    return Err(bad("tls.certificates", "needs at least one certificate"));
                }
                let mut certificates = Vec::new();
                for (i, c) in t.certificates.into_iter().enumerate() {
                    if c.names.is_empty() || c.names.iter().any(|n| n.is_empty()) {
                        return Err(bad(
                            format!("tls.certificates[{i}].names"),
                            "name at least one host (or *.domain)",
                        ));
                    }
                    for (k, path) in [("cert", &c.cert), ("key", &c.key)] {
                        if !Path::new(path).is_file() {
                            return Err(bad(
                                format!("tls.certificates[{i}].{k}"),
                                format!("no file at {path:?}"),
                            ));
                        }
                    }
                    certificates.push(crate::tls::CertSpec {
                        names: c.names,
                        cert: c.cert.into(),
                        key: c.key.into(),
                    });
                }
                let plain_http = match t.plain_http.as_deref().unwrap_or("serve") {
                    "serve" => PlainHttp::Serve,
                    "redirect" => PlainHttp::Redirect,
                    "refuse" => PlainHttp::Refuse,
                    other => {
                        return Err(bad(
                            "tls.plain_http",
                            format!("expected serve, redirect or refuse, got {other:?}"),
                        ))
                    }
                };
                Some(TlsConfig {
                    certificates,
                    plain_http,
                    http2: t.http2.unwrap_or(true),
                    reload_interval: duration(
                        "tls.reload_interval",
                        &t.reload_interval,
                        Duration::from_secs(10),
                    )?,
                })
            }
        };

        let agents_domain = f
            .edge
            .agents_domain
            .unwrap_or_else(|| "agent.localhost".into())
            .to_ascii_lowercase();
        if agents_domain.is_empty() || !agents_domain.split('.').all(is_label) {
            return Err(bad(
                "edge.agents_domain",
                format!("not a valid domain: {agents_domain:?}"),
            ));
        }
        let port = http_listen[0].port();
        let public_url = f
            .edge
            .public_url
            .unwrap_or_else(|| format!("http://{{id}}.{agents_domain}:{port}"));
        if !public_url.contains("{id}") {
            return Err(bad(
                "edge.public_url",
                "must contain {id}, where the endpoint id goes",
            ));
        }
        let threads = f.edge.threads.unwrap_or(2);
        if threads == 0 || threads > 512 {
            return Err(bad("edge.threads", "must be between 1 and 512"));
        }

        let max_body_bytes = f.limits.max_body_bytes.unwrap_or(8 * 1024 * 1024);
        if max_body_bytes == 0 {
            return Err(bad("limits.max_body_bytes", "must be greater than zero"));
        }

        let rate_limit_status = f.limits.rate_limit_status.unwrap_or(403);
        if !matches!(rate_limit_status, 403 | 429) {
            return Err(bad(
                "limits.rate_limit_status",
                "must be 403 (the spec's) or 429",
            ));
        }
        let rate_sketch_slots = f.limits.rate_sketch_slots.unwrap_or(32 * 1024);
        if !(64..=16 * 1024 * 1024).contains(&rate_sketch_slots) {
            return Err(bad(
                "limits.rate_sketch_slots",
                "must be between 64 and 16777216",
            ));
        }
        let default_max_tokens = f.limits.default_max_tokens.unwrap_or(1024);
        if default_max_tokens == 0 {
            return Err(bad(
                "limits.default_max_tokens",
                "must be greater than zero",
            ));
        }

        let store_url = f
            .store
            .url
            .unwrap_or_else(|| "sqlite://moltghost.db".into());
        if !(store_url.starts_with("sqlite:")
            || store_url.starts_with("postgres://")
            || store_url.starts_with("postgresql://"))
        {
            return Err(bad(
                "store.url",
                format!("expected sqlite://PATH or postgres://..., got {store_url:?}"),
            ));
        }

        let mut plans = Vec::new();
        for (i, p) in f.plans.into_iter().enumerate() {
            if !is_label(&p.name) {
                return Err(bad(
                    format!("plans[{i}].name"),
                    "use 1-63 of a-z, 0-9 and -",
                ));
            }
            if plans.iter().any(|q: &Plan| q.name == p.name) {
                return Err(bad(
                    format!("plans[{i}].name"),
                    format!("plan {:?} is declared twice", p.name),
                ));
            }
            if p.requests_per_minute == 0 || p.concurrent_streams == 0 {
                return Err(bad(
                    format!("plans[{i}]"),
                    "requests_per_minute and concurrent_streams must be > 0",
                ));
            }
            plans.push(Plan {
                name: p.name,
                requests_per_minute: p.requests_per_minute,
                tokens_per_month: p.tokens_per_month,
                concurrent_streams: p.concurrent_streams,
            });
        }
        if plans.is_empty() {
            plans.push(Plan {
                name: "default".into(),
                requests_per_minute: 600,
                tokens_per_month: 10_000_000,
                concurrent_streams: 16,
            });
        }

        let mut agents: Vec<AgentSeed> = Vec::new();
        for (i, a) in f.agents.into_iter().enumerate() {
            if !is_label(&a.id) {
                return Err(bad(
                    format!("agents[{i}].id"),
                    format!("{:?}: use 1-63 of a-z, 0-9 and -", a.id),
                ));
            }
            if agents.iter().any(|b| b.endpoint_id == a.id) {
                return Err(bad(
                    format!("agents[{i}].id"),
                    format!("agent {:?} is declared twice", a.id),
                ));
            }
            let upstream = UpstreamTarget::parse(&a.upstream)
                .map_err(|e| bad(format!("agents[{i}].upstream"), e))?;
            let state = match a.state.as_deref() {
                None => AgentState::Running,
                Some(s) => s
                    .parse()
                    .map_err(|e| bad(format!("agents[{i}].state"), e))?,
            };
            agents.push(AgentSeed {
                name: a.name.unwrap_or_else(|| a.id.clone()),
                endpoint_id: a.id,
                account: a.account.unwrap_or_else(|| "default".into()),
                upstream,
                state,
            });
        }

        Ok(Self {
            http_listen,
            https_listen,
            tls,
            admin_listen,
            agents_domain,
            public_url,
            data_dir: PathBuf::from(f.edge.data_dir.unwrap_or_else(|| ".moltghost".into())),
            threads,
            grace_period: duration(
                "edge.grace_period",
                &f.edge.grace_period,
                Duration::from_secs(1),
            )?,
            shutdown_timeout: duration(
                "edge.shutdown_timeout",
                &f.edge.shutdown_timeout,
                Duration::from_secs(10),
            )?,
            max_body_bytes,
            request_timeout: duration(
                "limits.request_timeout",
                &f.limits.request_timeout,
                Duration::from_secs(600),
            )?,
            max_timeout: duration(
                "limits.max_timeout",
                &f.limits.max_timeout,
                Duration::from_secs(3600),
            )?,
            stream_idle_timeout: duration(
                "limits.stream_idle_timeout",
                &f.limits.stream_idle_timeout,
                Duration::from_secs(120),
            )?,
            websocket_ping_interval: duration(
                "limits.websocket_ping_interval",
                &f.limits.websocket_ping_interval,
                Duration::from_secs(30),
            )?,
            connect_timeout: duration(
                "limits.connect_timeout",
                &f.limits.connect_timeout,
                Duration::from_secs(5),
            )?,
            upstream_keepalive: duration(
                "limits.upstream_keepalive",
                &f.limits.upstream_keepalive,
                Duration::from_secs(60),
            )?,
            default_max_tokens,
            limits_enabled: f.limits.enabled.unwrap_or(true),
            rate_limit_status,
            rate_sketch_slots,
            fleet_sync: duration(
                "limits.fleet_sync",
                &f.limits.fleet_sync,
                Duration::from_millis(500),
            )?,
            store_url,
            store_poll_interval: duration(
                "store.poll_interval",
                &f.store.poll_interval,
                Duration::from_millis(500),
            )?,
            last_used_flush: duration(
                "store.last_used_flush",
                &f.store.last_used_flush,
                Duration::from_secs(10),
            )?,
            admin_jwt_secret: f.admin.jwt_secret,
            key_secret: f.admin.key_secret,
            tunnel,
            plugins,
            plans,
            agents,
        })
    }

    /// The plan called `name`.
    pub fn plan(&self, name: &str) -> Option<&Plan> {
        self.plans.iter().find(|p| p.name == name)
    }

    /// The public URL of an agent's endpoint.
    pub fn endpoint_url(&self, endpoint_id: &str) -> String {
        self.public_url.replace("{id}", endpoint_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_is_valid() {
        let c = Config::from_toml(DEFAULT_CONFIG).unwrap();
        assert_eq!(c.agents_domain, "agent.localhost");
        assert_eq!(c.max_body_bytes, 8 * 1024 * 1024);
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
        let e = Config::from_toml("[edge]\nnope = 1").unwrap_err();
        assert!(e.0.contains("nope"), "{e}");
        let e = Config::from_toml(
            "[[agents]]\nid = \"a\"\nupstream = \"http://127.0.0.1:1\"\nstate = \"dancing\"",
        )
        .unwrap_err();
        assert!(e.0.contains("agents[0].state"), "{e}");
    }
}
