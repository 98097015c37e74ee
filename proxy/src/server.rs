//! Assembles the Pingora server from a [`Config`]: the edge service on its listeners and the
//! control plane (store follower and admin API) beside it.

use std::sync::Arc;

use pingora_core::server::configuration::{Opt, ServerConf};
use pingora_core::server::Server;
use pingora_core::services::background::background_service;

use std::time::Duration;

use async_trait::async_trait;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;

use crate::config::Config;
use crate::control::{self, Control};
use crate::edge::Edge;
use crate::identity::IdentityKey;
use crate::ledger::{Journal, Ledger};
use crate::limits::Limiter;
use crate::pipeline::Pipeline;
use crate::plane::DataPlane;
use crate::quota::QuotaBook;
use crate::registry::{LastUsed, Registry};
use crate::secrets::{self, KeyHasher};
use crate::store::{Store, StoreStatus};

/// Where the old and the new process of an upgrade meet to hand over listening sockets.
pub fn upgrade_socket(cfg: &Config) -> std::path::PathBuf {
    let dir = cfg
        .fixed
        .edge
        .data_dir
        .canonicalize()
        .unwrap_or_else(|_| cfg.fixed.edge.data_dir.clone());
    dir.join("upgrade.sock")
}

/// A failure to start, with what was being done.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StartError(String);

/// The edge's tunnels to pods, with its WireGuard key: the file's, else `MOLTGHOST_WG_KEY`,
/// else the one kept in the data directory.
fn start_tunnels(
    cfg: &Config,
    dir: &std::path::Path,
) -> Result<Arc<crate::tunnel::bridge::Tunnels>, StartError> {
    let env_key = std::env::var("MOLTGHOST_WG_KEY")
        .ok()
        .filter(|k| !k.is_empty());
    let wg_key = cfg.fixed.tunnel.private_key.clone().or(env_key);
    let wg_key = secrets::wireguard_key(wg_key.as_deref(), dir, "wg_key")
        .map_err(|e| StartError(format!("WireGuard key: {e}")))?;
    crate::tunnel::bridge::Tunnels::start(
        wg_key,
        cfg.fixed.tunnel.preshared_key,
        cfg.fixed.tunnel.mtu,
        dir,
        cfg.limits.connect_timeout,
    )
    .map_err(|e| StartError(format!("tunnel bridge in {}: {e}", dir.display())))
}

/// Everything the edge needs before it serves: secrets, the store brought up to date and seeded,
/// and the first snapshot. Done before listening, so the first request already sees the store.
fn prepare(
    cfg: &Arc<Config>,
    config_path: Option<std::path::PathBuf>,
) -> Result<Arc<Control>, StartError> {
    let dir = &cfg.fixed.edge.data_dir;
    let key_secret = secrets::load_or_create(
        cfg.fixed.admin.key_secret.as_deref(),
        "MOLTGHOST_KEY_SECRET",
        dir,
        "key_secret",
    )
    .map_err(|e| StartError(format!("key secret in {}: {e}", dir.display())))?;
    let admin_secret = secrets::load_or_create(
        cfg.fixed.admin.jwt_secret.as_deref(),
        "MOLTGHOST_ADMIN_SECRET",
        dir,
        "admin_secret",
    )
    .map_err(|e| StartError(format!("admin secret in {}: {e}", dir.display())))?;
    let identity =
        Arc::new(IdentityKey::load(dir).map_err(|e| StartError(format!("identity key: {e}")))?);
    let last_used = Arc::new(LastUsed::default());
    let tunnels = start_tunnels(cfg, dir)?;

    let edge_id = secrets::load_or_create(None, "MOLTGHOST_EDGE_ID", dir, "edge_id")
        .map(|id| id.chars().take(12).collect::<String>())
        .map_err(|e| StartError(format!("edge id in {}: {e}", dir.display())))?;
    let journal = Journal::open(dir)
        .map_err(|e| StartError(format!("usage journal in {}: {e}", dir.display())))?;
    let (quota, lease_asks) = QuotaBook::new(cfg.fixed.limits.leases);

    // The store's pool belongs to this short-lived runtime; the control plane opens its own.
    // Before serving: the schema is current, and the journal of a previous run is shipped.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let snapshot = rt
        .block_on(async {
            let store = Store::open_configured(&cfg.fixed.store, dir).await?;
            control::seed(&store, cfg).await?;
            let shipped = Journal::ship_orphans(dir, &store).await?;
            if shipped > 0 {
                tracing::info!(
                    rows = shipped,
                    "shipped the usage journal of a previous run"
                );
            }
            let contents = store.contents().await?;
            Ok::<_, crate::store::StoreError>(control::build_snapshot(
                &contents,
                cfg,
                &last_used,
                &tunnels,
                std::iter::empty(),
            ))
        })
        .map_err(|e| {
            StartError(format!(
                "cannot open the store at {}: {e}",
                crate::store::redacted(&cfg.fixed.store.url)
            ))
        })?;
    let reach = crate::plugins::Reach {
        node: Arc::new(cfg.node(&edge_id)),
        pods: Some((tunnels.clone(), identity.clone())),
    };
    let plugins = crate::plugins::PluginSet::load(&cfg.plugins, &reach).map_err(StartError)?;
    let certs = match &cfg.tls {
        Some(t) => Some(Arc::new(
            crate::tls::CertResolver::new(t.certificates.clone())
                .map_err(|e| StartError(format!("config key `tls.certificates`: {e}")))?,
        )),
        None => None,
    };
    let (spans, span_exporter) = match crate::traces::Spans::new(&cfg.fixed.traces, &edge_id) {
        Some((s, e)) => (Some(s), Some(e)),
        None => (None, None),
    };
    let plane = DataPlane {
        config: arc_swap::ArcSwap::new(cfg.clone()),
        registry: Arc::new(Registry::new(snapshot)),
        hasher: KeyHasher::new(&key_secret),
        limiter: Limiter::new(cfg.fixed.limits.rate_sketch_slots),
        quota,
        ledger: Arc::new(Ledger::new(journal, edge_id)),
        metrics: crate::metrics::Metrics::new(),
        identity,
        plugins: arc_swap::ArcSwap::from_pointee(plugins),
        store_status: Arc::new(StoreStatus::default()),
        spans,
        draining: tokio::sync::watch::Sender::new(false),
    };
    Ok(Arc::new(Control {
        plane: Arc::new(plane),
        config_path,
        last_used,
        admin_secret,
        reload: tokio::sync::Mutex::new(()),
        tunnels,
        certs,
        lease_asks: std::sync::Mutex::new(Some(lease_asks)),
        span_exporter: std::sync::Mutex::new(span_exporter),
    }))
}

/// Runs the edge until it is told to stop (SIGTERM/SIGINT: graceful; SIGQUIT: hand its
/// listening sockets to a new process started with `upgrade`, then drain), and returns so that
/// the caller can flush its logs. `config_path` is the file a reload (SIGHUP or the admin API)
/// reads again.
pub fn run(
    cfg: Config,
    config_path: Option<std::path::PathBuf>,
    upgrade: bool,
) -> Result<(), StartError> {
    let cfg = Arc::new(cfg);
    let control = prepare(&cfg, config_path)?;

    let conf = ServerConf {
        threads: cfg.fixed.edge.threads,
        // A request stays on its worker thread, with its plugin contexts in that thread's VMs.
        work_stealing: false,
        grace_period_seconds: Some(cfg.fixed.edge.grace_period.as_secs()),
        graceful_shutdown_timeout_seconds: Some(cfg.fixed.edge.shutdown_timeout.as_secs()),
        // The hand-over socket lives with the rest of the edge's state.
        upgrade_sock: upgrade_socket(&cfg).to_string_lossy().into_owned(),
        ..ServerConf::default()
    };
    let opt = Opt {
        upgrade,
        ..Opt::default()
    };
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    server.bootstrap();

    let edge = Edge::new(Pipeline::new(control.plane.clone()));
    let mut proxy = pingora_proxy::http_proxy(&server.configuration, edge);
    // CONNECT reaches the edge's own checks, which refuse it with the JSON error every other
    // refusal gets (`http::head`).
    let mut options = pingora_core::apps::HttpServerOptions::default();
    options.allow_connect_method_proxying = true;
    proxy.server_options = Some(options);
    let mut service = pingora_core::services::listening::Service::new(
        "moltghost-edge".into(),
        crate::connections::Connections::new(proxy, control.plane.clone()),
    );
    for addr in &cfg.fixed.listen.http {
        service.add_tcp(&addr.to_string());
    }
    if let (Some(certs), Some(tls)) = (&control.certs, &cfg.tls) {
        for addr in &cfg.fixed.listen.https {
            let keep_name = Box::new(crate::tls::KeepServerName);
            let mut settings = pingora_core::listeners::tls::TlsSettings::with_callbacks(keep_name)
                .map_err(|e| StartError(format!("TLS settings: {e}")))?;
            settings.set_cert_resolver(certs.clone());
            if tls.http2 {
                settings.enable_h2();
            }
            service.add_tls_with_settings(&addr.to_string(), None, settings);
        }
    }
    server.add_service(service);
    server.add_service(background_service(
        "control-plane",
        ControlPlane { control },
    ));
    tracing::info!(listen = ?cfg.fixed.listen.http, admin = %cfg.fixed.listen.admin, agents_domain = %cfg.names.agents_domain, "moltghost edge starting");
    server.run(pingora_core::server::RunArgs::default());
    tracing::info!("moltghost edge stopped");
    Ok(())
}

/// The control plane and the admin API, as a Pingora background service beside the edge.
struct ControlPlane {
    control: Arc<Control>,
}

#[async_trait]
impl BackgroundService for ControlPlane {
    async fn start(&self, shutdown: ShutdownWatch) {
        let control = self.control.clone();
        if let Some(exporter) = crate::control::take_once(&control.span_exporter) {
            // Not joined: it posts spans until the process ends, the store reachable or not.
            tokio::spawn(exporter.run());
        }
        let store = loop {
            let cfg = control.cfg();
            match Store::open_configured(&cfg.fixed.store, &cfg.fixed.edge.data_dir).await {
                Ok(s) => break s,
                Err(e) => {
                    control.status().failed(&e);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        };
        control.status().ok();
        let admin = crate::admin::serve(control.clone(), store.clone(), shutdown.clone());
        tokio::join!(control.follow(store, shutdown), admin);
    }
}
