//! The configuration file as the operator writes it: TOML, strings where they write durations
//! and URLs, unknown keys refused. [`super::Config`] is built from it once and validated.

use serde::Deserialize;

/// The file as written: strings where the operator writes durations and URLs.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub listen: FileListen,
    #[serde(default)]
    pub edge: FileEdge,
    #[serde(default)]
    pub limits: FileLimits,
    #[serde(default)]
    pub store: FileStore,
    #[serde(default)]
    pub admin: FileAdmin,
    #[serde(default)]
    pub tls: Option<FileTls>,
    #[serde(default)]
    pub tunnel: FileTunnel,
    #[serde(default)]
    pub traces: FileTraces,
    #[serde(default)]
    pub plugins: Vec<FilePlugin>,
    #[serde(default)]
    pub plans: Vec<FilePlan>,
    #[serde(default)]
    pub agents: Vec<FileAgent>,
}

/// `[tls]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileTls {
    #[serde(default)]
    pub plain_http: Option<String>,
    #[serde(default)]
    pub http2: Option<bool>,
    #[serde(default)]
    pub reload_interval: Option<String>,
    #[serde(default)]
    pub certificates: Vec<FileCert>,
}

/// One of `[[tls.certificates]]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileCert {
    pub names: Vec<String>,
    pub cert: String,
    pub key: String,
}

/// `[listen]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileListen {
    #[serde(default = "default_http")]
    pub http: Vec<String>,
    #[serde(default)]
    pub https: Vec<String>,
    #[serde(default = "default_admin_listen")]
    pub admin: String,
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

/// `[edge]`.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct FileEdge {
    pub agents_domain: Option<String>,
    pub public_url: Option<String>,
    pub data_dir: Option<String>,
    pub threads: Option<usize>,
    pub grace_period: Option<String>,
    pub shutdown_timeout: Option<String>,
    pub metadata: Option<std::collections::BTreeMap<String, String>>,
    pub server_timing: Option<bool>,
}

/// `[limits]`.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct FileLimits {
    pub max_body_bytes: Option<usize>,
    pub request_timeout: Option<String>,
    pub max_timeout: Option<String>,
    pub stream_idle_timeout: Option<String>,
    pub websocket_ping_interval: Option<String>,
    pub connect_timeout: Option<String>,
    pub upstream_keepalive: Option<String>,
    pub default_max_tokens: Option<u64>,
    pub enabled: Option<bool>,
    pub rate_limit_status: Option<u16>,
    pub rate_sketch_slots: Option<usize>,
    pub fleet_sync: Option<String>,
    pub lease_horizon: Option<String>,
    pub lease_ttl: Option<String>,
    pub lease_wait: Option<String>,
    pub lease_idle: Option<String>,
    pub header_timeout: Option<String>,
    pub body_timeout: Option<String>,
    pub keepalive_idle: Option<String>,
    pub send_timeout: Option<String>,
    pub max_connections: Option<usize>,
}

/// `[store]`.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct FileStore {
    pub url: Option<String>,
    pub session_url: Option<String>,
    pub poll_interval: Option<String>,
    pub last_used_flush: Option<String>,
    pub max_connections: Option<u32>,
    pub request_rows: Option<bool>,
}

/// One of `[[plugins]]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilePlugin {
    pub name: String,
    pub path: String,
    #[serde(default)]
    pub config: Option<toml::Value>,
    #[serde(default)]
    pub fail: Option<String>,
    #[serde(default)]
    pub agents: Vec<String>,
    #[serde(default)]
    pub routes: Vec<String>,
    #[serde(default)]
    pub deadline: Option<String>,
    #[serde(default)]
    pub memory_mb: Option<u64>,
    #[serde(default)]
    pub sees_authorization: bool,
    #[serde(default)]
    pub root_id: Option<String>,
    #[serde(default)]
    pub vm_id: Option<String>,
    #[serde(default)]
    pub vm_config: Option<toml::Value>,
    #[serde(default)]
    pub upstreams: std::collections::HashMap<String, String>,
    #[serde(default)]
    pub buffer_kb: Option<u64>,
    #[serde(default)]
    pub service: bool,
}

/// `[traces]`.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct FileTraces {
    pub otlp_endpoint: Option<String>,
    pub otlp_protocol: Option<String>,
    pub sampling_ratio: Option<f64>,
}

/// `[tunnel]`.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct FileTunnel {
    pub private_key: Option<String>,
    pub preshared_key: Option<String>,
    pub mtu: Option<usize>,
}

/// `[admin]`.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct FileAdmin {
    pub jwt_secret: Option<String>,
    pub key_secret: Option<String>,
}

/// One of `[[plans]]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilePlan {
    pub name: String,
    pub requests_per_minute: u32,
    pub tokens_per_month: u64,
    #[serde(default = "default_streams")]
    pub concurrent_streams: u32,
}

fn default_streams() -> u32 {
    16
}

/// One of `[[agents]]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileAgent {
    pub id: String,
    pub name: Option<String>,
    pub upstream: String,
    #[serde(default)]
    pub state: Option<String>,
    pub account: Option<String>,
}
