//! Allow-list: admits a request only from listed client addresses and with listed header values.
//!
//! Configuration (JSON; a TOML table in the edge's config becomes this):
//! ```json
//! {"addresses": ["127.0.0.1", "10.0.0.0/8"], "headers": {"x-team": ["search", "billing"]}}
//! ```
//! Both parts are optional; an empty allow-list admits everyone. Refusals are 403 with a JSON
//! error in the edge's format.

use std::collections::HashMap;
use std::net::IpAddr;
use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use serde::Deserialize;

#[derive(Deserialize, Default, Clone)]
struct Config {
    #[serde(default)]
    addresses: Vec<String>,
    #[serde(default)]
    headers: HashMap<String, Vec<String>>,
}

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

#[derive(Default)]
struct Root {
    config: Rc<Config>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let Some(raw) = self.get_plugin_configuration() else {
            return true;
        };
        match serde_json::from_slice(&raw) {
            Ok(c) => {
                self.config = Rc::new(c);
                true
            }
            Err(e) => {
                log::error!("allowlist: bad configuration: {e}");
                false
            }
        }
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Request {
            config: self.config.clone(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Request {
    config: Rc<Config>,
}

impl Context for Request {}

/// `addr` is `pattern`, or inside it when the pattern is a CIDR block.
fn matches(addr: IpAddr, pattern: &str) -> bool {
    let (net, bits) = match pattern.split_once('/') {
        Some((n, b)) => (n, b.parse::<u32>().ok()),
        None => (pattern, None),
    };
    let Ok(net) = net.parse::<IpAddr>() else {
        return false;
    };
    match (addr, net, bits) {
        (a, n, None) => a == n,
        (IpAddr::V4(a), IpAddr::V4(n), Some(b)) if b <= 32 => {
            let mask = if b == 0 { 0 } else { u32::MAX << (32 - b) };
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n), Some(b)) if b <= 128 => {
            let mask = if b == 0 { 0 } else { u128::MAX << (128 - b) };
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

impl Request {
    fn deny(&self, why: &str) -> Action {
        let body = serde_json::json!({"error": {"message": why, "code": "not_allowed", "type": "permission_error"}});
        self.send_http_response(
            403,
            vec![("content-type", "application/json")],
            Some(body.to_string().as_bytes()),
        );
        Action::Pause
    }
}

impl HttpContext for Request {
    fn on_http_request_headers(&mut self, _headers: usize, _end: bool) -> Action {
        if !self.config.addresses.is_empty() {
            // Envoy's `source.address` is "ip:port".
            let source = self
                .get_property(vec!["source", "address"])
                .and_then(|v| String::from_utf8(v).ok())
                .unwrap_or_default();
            let ip = source
                .parse::<std::net::SocketAddr>()
                .map(|s| s.ip())
                .or_else(|_| source.parse::<IpAddr>());
            let allowed = ip.is_ok_and(|ip| self.config.addresses.iter().any(|p| matches(ip, p)));
            if !allowed {
                log::info!("allowlist: address {source} refused");
                return self.deny("this client address is not allowed");
            }
        }
        for (name, values) in &self.config.headers {
            let got = self.get_http_request_header(name);
            if !got.is_some_and(|v| values.iter().any(|w| *w == v)) {
                return self.deny(&format!("header {name} is missing or not allowed"));
            }
        }
        Action::Continue
    }
}
