//! Each section of the file becomes its internal section here, validated as it converts: every
//! error names the key and what is wrong with it. Pure: no file, no environment.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::file::{
    FileAdmin, FileAgent, FileConfig, FileEdge, FileLimits, FileListen, FilePlan, FilePlugin,
    FileStore, FileTls, FileTraces, FileTunnel,
};
use super::{
    bad, AgentSeed, ClientLimits, Config, ConfigError, Fixed, FixedLimits, Limits, Listen, Names,
    PlainHttp, Plan, Process, Secrets, StoreSettings, TlsConfig, TunnelConfig,
};
use crate::lifecycle::AgentState;
use crate::plugins::PluginConfig;
use crate::quota::LeaseSettings;
use crate::traces::{Protocol, TraceSettings};
use crate::upstream::UpstreamTarget;

/// The whole config from the whole file.
pub(super) fn build(f: FileConfig) -> Result<Config, ConfigError> {
    let listen = listen(f.listen)?;
    let tls = tls(f.tls, &listen)?;
    let names = names(&f.edge, &listen)?;
    let server_timing = f.edge.server_timing.unwrap_or(true);
    let fixed = Fixed {
        edge: process(f.edge)?,
        store: store(f.store)?,
        limits: fixed_limits(&f.limits)?,
        tls: tls.is_some(),
        tunnel: tunnel(f.tunnel)?,
        admin: secrets(f.admin),
        traces: traces(f.traces)?,
        listen,
    };
    Ok(Config {
        fixed,
        names,
        server_timing,
        limits: limits(f.limits)?,
        tls,
        plugins: plugins(f.plugins)?,
        plans: plans(f.plans)?,
        agents: agents(f.agents)?,
    })
}

fn listen(f: FileListen) -> Result<Listen, ConfigError> {
    if f.http.is_empty() {
        return Err(bad("listen.http", "needs at least one address"));
    }
    let list = |key: &str, v: &[String]| {
        v.iter()
            .enumerate()
            .map(|(i, s)| addr(&format!("{key}[{i}]"), s))
            .collect::<Result<Vec<_>, _>>()
    };
    Ok(Listen {
        http: list("listen.http", &f.http)?,
        https: list("listen.https", &f.https)?,
        admin: addr("listen.admin", &f.admin)?,
    })
}

fn traces(f: FileTraces) -> Result<TraceSettings, ConfigError> {
    if let Some(e) = &f.otlp_endpoint {
        let ok = url::Url::parse(e).is_ok_and(|u| matches!(u.scheme(), "http" | "https"));
        if !ok {
            return Err(bad(
                "traces.otlp_endpoint",
                format!("expected the collector's http(s):// URL, got {e:?}"),
            ));
        }
    }
    let otlp_protocol = match f.otlp_protocol.as_deref() {
        None | Some("http/protobuf") => Protocol::HttpProtobuf,
        Some("grpc") => Protocol::Grpc,
        Some(other) => {
            return Err(bad(
                "traces.otlp_protocol",
                format!("expected \"http/protobuf\" or \"grpc\", got {other:?}"),
            ))
        }
    };
    let sampling_ratio = f.sampling_ratio.unwrap_or(1.0);
    if !(0.0..=1.0).contains(&sampling_ratio) {
        return Err(bad("traces.sampling_ratio", "must be between 0 and 1"));
    }
    Ok(TraceSettings {
        otlp_endpoint: f.otlp_endpoint,
        otlp_protocol,
        sampling_ratio,
    })
}

fn process(f: FileEdge) -> Result<Process, ConfigError> {
    let threads = f.threads.unwrap_or(2);
    if threads == 0 || threads > 512 {
        return Err(bad("edge.threads", "must be between 1 and 512"));
    }
    Ok(Process {
        data_dir: PathBuf::from(f.data_dir.unwrap_or_else(|| ".moltghost".into())),
        threads,
        grace_period: duration("edge.grace_period", &f.grace_period, secs(1))?,
        shutdown_timeout: duration("edge.shutdown_timeout", &f.shutdown_timeout, secs(10))?,
        metadata: f.metadata.unwrap_or_default(),
    })
}

fn names(f: &FileEdge, listen: &Listen) -> Result<Names, ConfigError> {
    let agents_domain = f
        .agents_domain
        .as_deref()
        .unwrap_or("agent.localhost")
        .to_ascii_lowercase();
    if agents_domain.is_empty() || !agents_domain.split('.').all(is_label) {
        return Err(bad(
            "edge.agents_domain",
            format!("not a valid domain: {agents_domain:?}"),
        ));
    }
    let port = listen.http[0].port();
    let public_url = f
        .public_url
        .clone()
        .unwrap_or_else(|| format!("http://{{id}}.{agents_domain}:{port}"));
    if !public_url.contains("{id}") {
        return Err(bad(
            "edge.public_url",
            "must contain {id}, where the endpoint id goes",
        ));
    }
    Ok(Names {
        agents_domain,
        public_url,
    })
}

fn store(f: FileStore) -> Result<StoreSettings, ConfigError> {
    let url = f.url.unwrap_or_else(|| "sqlite://moltghost.db".into());
    if !(url.starts_with("sqlite:")
        || url.starts_with("postgres://")
        || url.starts_with("postgresql://"))
    {
        return Err(bad(
            "store.url",
            format!("expected sqlite://PATH or postgres://..., got {url:?}"),
        ));
    }
    if f.max_connections.is_some_and(|n| !(2..=1000).contains(&n)) {
        return Err(bad("store.max_connections", "must be between 2 and 1000"));
    }
    let postgres = |u: &str| u.starts_with("postgres://") || u.starts_with("postgresql://");
    if let Some(s) = &f.session_url {
        if !postgres(&url) || !postgres(s) {
            return Err(bad(
                "store.session_url",
                "a postgres://... URL, beside a postgres:// store.url",
            ));
        }
    }
    Ok(StoreSettings {
        url,
        session_url: f.session_url,
        poll_interval: duration("store.poll_interval", &f.poll_interval, millis(500))?,
        last_used_flush: duration("store.last_used_flush", &f.last_used_flush, secs(10))?,
        max_connections: f.max_connections,
        request_rows: f.request_rows.unwrap_or(true),
    })
}

fn fixed_limits(f: &FileLimits) -> Result<FixedLimits, ConfigError> {
    let rate_sketch_slots = f.rate_sketch_slots.unwrap_or(32 * 1024);
    if !(64..=16 * 1024 * 1024).contains(&rate_sketch_slots) {
        return Err(bad(
            "limits.rate_sketch_slots",
            "must be between 64 and 16777216",
        ));
    }
    let leases = LeaseSettings {
        horizon: duration("limits.lease_horizon", &f.lease_horizon, secs(10))?,
        ttl: duration("limits.lease_ttl", &f.lease_ttl, secs(30))?,
        wait: duration("limits.lease_wait", &f.lease_wait, millis(500))?,
        idle: duration("limits.lease_idle", &f.lease_idle, secs(20))?,
    };
    // The store keeps renewal times in whole seconds.
    if leases.ttl < secs(2) {
        return Err(bad("limits.lease_ttl", "must be at least 2s"));
    }
    if leases.wait > secs(30) {
        return Err(bad("limits.lease_wait", "must be at most 30s"));
    }
    Ok(FixedLimits {
        rate_sketch_slots,
        fleet_sync: duration("limits.fleet_sync", &f.fleet_sync, millis(500))?,
        leases,
    })
}

fn limits(f: FileLimits) -> Result<Limits, ConfigError> {
    let max_body_bytes = f.max_body_bytes.unwrap_or(8 * 1024 * 1024);
    if max_body_bytes == 0 {
        return Err(bad("limits.max_body_bytes", "must be greater than zero"));
    }
    let rate_limit_status = f.rate_limit_status.unwrap_or(403);
    if !matches!(rate_limit_status, 403 | 429) {
        return Err(bad(
            "limits.rate_limit_status",
            "must be 403 (the spec's) or 429",
        ));
    }
    let default_max_tokens = f.default_max_tokens.unwrap_or(1024);
    if default_max_tokens == 0 {
        return Err(bad(
            "limits.default_max_tokens",
            "must be greater than zero",
        ));
    }
    let d = |key: &str, v: &Option<String>, default| duration(&format!("limits.{key}"), v, default);
    Ok(Limits {
        enabled: f.enabled.unwrap_or(true),
        max_body_bytes,
        request_timeout: d("request_timeout", &f.request_timeout, secs(600))?,
        max_timeout: d("max_timeout", &f.max_timeout, secs(3600))?,
        stream_idle_timeout: d("stream_idle_timeout", &f.stream_idle_timeout, secs(120))?,
        websocket_ping_interval: d(
            "websocket_ping_interval",
            &f.websocket_ping_interval,
            secs(30),
        )?,
        connect_timeout: d("connect_timeout", &f.connect_timeout, secs(5))?,
        upstream_keepalive: d("upstream_keepalive", &f.upstream_keepalive, secs(60))?,
        default_max_tokens,
        rate_limit_status,
        clients: ClientLimits {
            header_timeout: d("header_timeout", &f.header_timeout, secs(60))?,
            body_timeout: d("body_timeout", &f.body_timeout, secs(60))?,
            keepalive_idle: d("keepalive_idle", &f.keepalive_idle, secs(60))?,
            send_timeout: d("send_timeout", &f.send_timeout, secs(60))?,
            max_connections: match f.max_connections.unwrap_or(10_000) {
                0 => return Err(bad("limits.max_connections", "must be at least 1")),
                n => n,
            },
        },
    })
}

fn tls(f: Option<FileTls>, listen: &Listen) -> Result<Option<TlsConfig>, ConfigError> {
    let t = match (f, listen.https.is_empty()) {
        (None, true) => return Ok(None),
        (None, false) => {
            return Err(bad(
                "tls.certificates",
                "listen.https needs at least one certificate",
            ))
        }
        (Some(t), _) => t,
    };
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
    Ok(Some(TlsConfig {
        certificates,
        plain_http,
        http2: t.http2.unwrap_or(true),
        reload_interval: duration("tls.reload_interval", &t.reload_interval, secs(10))?,
    }))
}

fn tunnel(f: FileTunnel) -> Result<TunnelConfig, ConfigError> {
    if let Some(k) = &f.private_key {
        crate::tunnel::keys::decode(k).map_err(|e| bad("tunnel.private_key", &e))?;
    }
    let preshared_key = f
        .preshared_key
        .map(|k| crate::tunnel::keys::decode(&k))
        .transpose()
        .map_err(|e| bad("tunnel.preshared_key", &e))?;
    let mtu = match f.mtu.unwrap_or(1420) {
        m @ 576..=65_000 => m,
        _ => return Err(bad("tunnel.mtu", "must be between 576 and 65000")),
    };
    Ok(TunnelConfig {
        private_key: f.private_key,
        preshared_key,
        mtu,
    })
}

fn secrets(f: FileAdmin) -> Secrets {
    Secrets {
        jwt_secret: f.jwt_secret,
        key_secret: f.key_secret,
    }
}

/// The `[[plugins]]`: names unique, fail policy known, limits sane. (Their files are checked
/// by [`Config::load`]; the modules are compiled when the edge loads the configuration.)
fn plugins(files: Vec<FilePlugin>) -> Result<Vec<PluginConfig>, ConfigError> {
    let mut out: Vec<PluginConfig> = Vec::with_capacity(files.len());
    for (i, p) in files.into_iter().enumerate() {
        let key = |k: &str| format!("plugins[{i}].{k}");
        if p.name.is_empty() || out.iter().any(|o| o.name == p.name) {
            return Err(bad(key("name"), "must be present and unique"));
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
        // A string reaches the plugin as it is; a table (or any other value) as JSON.
        let text = |name: &str, v: Option<toml::Value>| match v {
            None => Ok(String::new()),
            Some(toml::Value::String(s)) => Ok(s),
            Some(v) => serde_json::to_string(&v).map_err(|e| bad(key(name), e)),
        };
        let config = text("config", p.config)?;
        let vm_config = text("vm_config", p.vm_config)?;
        let deadline = duration(&key("deadline"), &p.deadline, millis(10))?;
        let memory_mb = p.memory_mb.unwrap_or(64);
        if !(1..=1024).contains(&memory_mb) {
            return Err(bad(key("memory_mb"), "must be between 1 and 1024"));
        }
        // Envoy's default buffer limit is 1 MiB per stream.
        let buffer_kb = p.buffer_kb.unwrap_or(1024);
        if !(1..=64 * 1024).contains(&buffer_kb) {
            return Err(bad(key("buffer_kb"), "must be between 1 and 65536"));
        }
        let upstreams = crate::plugins::callout::upstreams(&p.upstreams)
            .map_err(|e| bad(key("upstreams"), e))?;
        if p.service && !(p.agents.is_empty() && p.routes.is_empty()) {
            return Err(bad(
                key("service"),
                "a service plugin runs on no request: `agents` and `routes` do not apply",
            ));
        }
        out.push(PluginConfig {
            name: p.name,
            path: PathBuf::from(p.path),
            config,
            fail_open,
            agents: p.agents,
            routes: p.routes,
            deadline,
            memory_bytes: (memory_mb as usize) << 20,
            sees_authorization: p.sees_authorization,
            root_id: p.root_id.unwrap_or_default(),
            vm_id: p.vm_id.unwrap_or_default(),
            vm_config,
            upstreams,
            buffer_bytes: (buffer_kb as usize) << 10,
            service: p.service,
        });
    }
    Ok(out)
}

/// The `[[plans]]`; a `default` plan when there are none.
fn plans(files: Vec<FilePlan>) -> Result<Vec<Plan>, ConfigError> {
    let mut plans: Vec<Plan> = Vec::new();
    for (i, p) in files.into_iter().enumerate() {
        if !is_label(&p.name) {
            return Err(bad(
                format!("plans[{i}].name"),
                "use 1-63 of a-z, 0-9 and -",
            ));
        }
        if plans.iter().any(|q| q.name == p.name) {
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
    Ok(plans)
}

/// The `[[agents]]`: ids unique labels, upstreams that parse, known states.
fn agents(files: Vec<FileAgent>) -> Result<Vec<AgentSeed>, ConfigError> {
    let mut agents: Vec<AgentSeed> = Vec::new();
    for (i, a) in files.into_iter().enumerate() {
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
    Ok(agents)
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn millis(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn duration(key: &str, v: &Option<String>, default: Duration) -> Result<Duration, ConfigError> {
    let Some(s) = v else {
        return Ok(default);
    };
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
