//! Assembles the Pingora server from a [`Config`]: the edge service on its listeners.

use std::collections::HashMap;
use std::sync::Arc;

use pingora_core::server::configuration::{Opt, ServerConf};
use pingora_core::server::Server;

use crate::config::Config;
use crate::edge::Edge;
use crate::registry::{Agent, Registry, Snapshot};
use crate::upstream::{PeerSettings, Upstream};

/// Connection settings for upstream peers, from the config.
pub fn peer_settings(cfg: &Config) -> PeerSettings {
    PeerSettings {
        connect_timeout: cfg.connect_timeout,
        read_timeout: cfg.stream_idle_timeout,
        keepalive: cfg.upstream_keepalive,
    }
}

/// The snapshot of the agents declared in the config file.
pub fn snapshot_from_config(cfg: &Config) -> Snapshot {
    let settings = peer_settings(cfg);
    let agents: HashMap<_, _> = cfg
        .agents
        .iter()
        .map(|a| {
            let agent = Agent {
                endpoint_id: a.endpoint_id.clone(),
                name: a.name.clone(),
                account_id: a.account.clone(),
                state: a.state,
                upstream: Upstream::resolve(a.upstream.clone(), settings),
            };
            (a.endpoint_id.clone(), Arc::new(agent))
        })
        .collect();
    Snapshot {
        agents,
        generation: 1,
    }
}

/// Runs the edge until it is told to stop (SIGTERM/SIGINT: graceful; SIGQUIT: hand-over).
pub fn run(cfg: Config) -> ! {
    let cfg = Arc::new(cfg);
    let registry = Arc::new(Registry::new(snapshot_from_config(&cfg)));

    let conf = ServerConf {
        threads: cfg.threads,
        grace_period_seconds: Some(cfg.grace_period.as_secs()),
        graceful_shutdown_timeout_seconds: Some(cfg.shutdown_timeout.as_secs()),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(Opt::default(), conf);
    server.bootstrap();

    let mut edge = pingora_proxy::http_proxy_service_with_name(
        &server.configuration,
        Edge::new(cfg.clone(), registry),
        "moltghost-edge",
    );
    for addr in &cfg.http_listen {
        edge.add_tcp(&addr.to_string());
    }
    server.add_service(edge);
    tracing::info!(listen = ?cfg.http_listen, agents_domain = %cfg.agents_domain, "moltghost edge starting");
    server.run_forever()
}
