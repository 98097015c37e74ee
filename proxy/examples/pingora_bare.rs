//! The framework's floor, for the benchmarks: a minimal Pingora `ProxyHttp` that forwards every
//! request to one upstream and does nothing else (no key, no limit, no plugin, no access log).
//! `loadtest/compare.sh` runs it beside the edge with the same thread count and the same
//! Pingora settings, so that what the edge adds can be read against what Pingora itself costs.
//!
//! ```text
//! cargo run --release -p moltghost --example pingora_bare -- \
//!     --listen 127.0.0.1:18085 --upstream 127.0.0.1:19100 [--threads 2]
//! ```

use async_trait::async_trait;
use pingora_core::server::configuration::{Opt, ServerConf};
use pingora_core::server::Server;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_proxy::{ProxyHttp, Session};

/// Forwards to `upstream`, plain HTTP/1.1, on Pingora's pooled connections.
struct Bare {
    upstream: String,
}

#[async_trait]
impl ProxyHttp for Bare {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut (),
    ) -> pingora_error::Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(
            self.upstream.as_str(),
            false,
            String::new(),
        )))
    }
}

fn main() {
    let mut listen = "127.0.0.1:18085".to_owned();
    let mut upstream = "127.0.0.1:19100".to_owned();
    let mut threads = 2;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--listen" => listen = value,
            "--upstream" => upstream = value,
            "--threads" => threads = value.parse().expect("--threads: a number"),
            other => panic!("unknown flag {other} (--listen, --upstream, --threads)"),
        }
    }
    // The edge's own Pingora settings: a request stays on its worker thread.
    let conf = ServerConf {
        threads,
        work_stealing: false,
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(Opt::default(), conf);
    server.bootstrap();
    let mut service = pingora_proxy::http_proxy_service(&server.configuration, Bare { upstream });
    service.add_tcp(&listen);
    server.add_service(service);
    server.run_forever();
}
