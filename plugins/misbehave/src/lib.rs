//! A plugin that misbehaves on purpose, for the edge's safety tests: with configuration
//! `{"mode": "loop"}` it never returns, `"alloc"` allocates without end, `"trap"` traps,
//! `"ok"` behaves (and counts requests in shared data and a metric, and edits trailers),
//! `"reset"` resets the stream, `"key"` answers 418 when it can see the client's
//! `Authorization` (which the edge hides unless the plugin may see it), `"answer"` answers 451
//! itself with a body and a header. `"on": "response"`
//! moves the misbehaviour to the response body. `"tick_ms": N` asks for ticks and counts them
//! in the metric `misbehave_ticks`.

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MetricType};
use serde::Deserialize;

#[derive(Deserialize, Default, Clone)]
struct Config {
    #[serde(default)]
    mode: String,
    #[serde(default)]
    on: String,
    #[serde(default)]
    tick_ms: u64,
}

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

#[derive(Default)]
struct Root {
    config: Config,
    metric: u32,
    ticks: u32,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let raw = self.get_plugin_configuration().unwrap_or_default();
        self.config = serde_json::from_slice(&raw).unwrap_or_default();
        self.metric =
            proxy_wasm::hostcalls::define_metric(MetricType::Counter, "misbehave_requests")
                .unwrap_or(0);
        self.ticks = proxy_wasm::hostcalls::define_metric(MetricType::Counter, "misbehave_ticks")
            .unwrap_or(0);
        if self.config.tick_ms > 0 {
            self.set_tick_period(std::time::Duration::from_millis(self.config.tick_ms));
        }
        true
    }

    fn on_tick(&mut self) {
        let _ = proxy_wasm::hostcalls::increment_metric(self.ticks, 1);
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Request {
            config: self.config.clone(),
            metric: self.metric,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Request {
    config: Config,
    metric: u32,
}

impl Context for Request {}

impl Request {
    fn misbehave(&self) {
        match self.config.mode.as_str() {
            "loop" => {
                let mut x: u64 = 0;
                loop {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            }
            "alloc" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1u8; 1 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            "trap" => std::process::abort(),
            "reset" if self.config.on == "response" => self.reset_http_response(),
            "reset" => self.reset_http_request(),
            "answer" => self.send_http_response(
                451,
                vec![("x-misbehave", "answered")],
                Some(b"unavailable for legal reasons"),
            ),
            "key" if self.get_http_request_header("authorization").is_some() => {
                self.send_http_response(418, vec![], Some(b"the key was visible"));
            }
            _ => {}
        }
    }
}

impl HttpContext for Request {
    fn on_http_request_headers(&mut self, _headers: usize, _end: bool) -> Action {
        if self.config.on != "response" {
            self.misbehave();
        }
        let _ = proxy_wasm::hostcalls::increment_metric(self.metric, 1);
        // Shared data with compare-and-swap: a request counter across VMs.
        loop {
            let (value, cas) = self.get_shared_data("requests");
            let n = value
                .and_then(|v| String::from_utf8(v).ok())
                .and_then(|s| s.parse::<u64>().ok())
                .unwrap_or(0);
            if self
                .set_shared_data("requests", Some((n + 1).to_string().as_bytes()), cas)
                .is_ok()
            {
                break;
            }
        }
        self.set_http_request_header("x-misbehave-seen", Some("1"));
        // Trailer calls are accepted (the SDK unwraps them: a refusal would trap).
        self.add_http_request_trailer("x-misbehave-trailer", "1");
        self.set_http_request_trailer("x-misbehave-trailer", Some("2"));
        assert_eq!(
            self.get_http_request_trailer("x-misbehave-trailer")
                .as_deref(),
            Some("2")
        );
        self.set_http_request_trailer("x-misbehave-trailer", None);
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _headers: usize, _end: bool) -> Action {
        if self.config.on == "response" && self.config.mode == "answer" {
            self.misbehave();
            return Action::Pause;
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, _size: usize, _end: bool) -> Action {
        if self.config.on == "response" {
            self.misbehave();
        }
        Action::Continue
    }
}
