//! Postpones every request until its root context's next tick, as the Go SDK's
//! `postpone_requests` example does: the request's headers pause and leave the context's id
//! with the root context, whose `on_tick` chooses each postponed context
//! (`set_effective_context`) and resumes it. Its body pauses too: as on Envoy, a body callback
//! that continues would resume the request at once (the Go example postpones only requests
//! without a body). With `"then": "answer"` the tick answers the
//! postponed requests itself (429 and a body), with `"then": "reset"` it resets them.
//!
//! On the way back it tries the host's foreign functions as a plugin author would: it compresses
//! a text with `compress`, inflates it again with `uncompress`, and says in `x-foreign` whether
//! the round trip held (`roundtrip-ok`) and what `declare_property`, a function this host does
//! not offer, answered. `x-postponed-ms` says how long the request waited for its tick.
//!
//! Configuration: `{"tick_ms": 200, "then": "continue"}`.

use std::cell::RefCell;
use std::rc::Rc;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, Status};
use serde::Deserialize;

#[derive(Deserialize, Clone, Default)]
struct Config {
    #[serde(default)]
    tick_ms: u64,
    #[serde(default)]
    then: String,
}

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

#[derive(Default)]
struct Root {
    config: Config,
    postponed: Rc<RefCell<Vec<u32>>>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let raw = self.get_plugin_configuration().unwrap_or_default();
        self.config = serde_json::from_slice(&raw).unwrap_or_default();
        let ms = if self.config.tick_ms == 0 {
            200
        } else {
            self.config.tick_ms
        };
        self.set_tick_period(std::time::Duration::from_millis(ms));
        true
    }

    fn on_tick(&mut self) {
        let postponed = std::mem::take(&mut *self.postponed.borrow_mut());
        for id in postponed {
            if hostcalls::set_effective_context(id).is_err() {
                log::warn!("context {id} is gone");
                continue;
            }
            let done = match self.config.then.as_str() {
                "answer" => hostcalls::send_http_response(
                    429,
                    vec![("x-postponed-by", "tick")],
                    Some(b"come back later\n"),
                ),
                "reset" => hostcalls::reset_http_request(),
                _ => hostcalls::resume_http_request(),
            };
            log::info!("context {id} released from the tick: {done:?}");
        }
    }

    fn create_http_context(&self, id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Request {
            id,
            postponed: self.postponed.clone(),
            since: 0,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Request {
    id: u32,
    postponed: Rc<RefCell<Vec<u32>>>,
    since: u128,
}

impl Context for Request {}

fn now_ms() -> u128 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis())
}

impl HttpContext for Request {
    fn on_http_request_headers(&mut self, _n: usize, _end: bool) -> Action {
        self.postponed.borrow_mut().push(self.id);
        self.since = now_ms();
        Action::Pause
    }

    fn on_http_request_body(&mut self, _size: usize, _end: bool) -> Action {
        Action::Pause
    }

    fn on_http_response_headers(&mut self, _n: usize, _end: bool) -> Action {
        let waited = now_ms().saturating_sub(self.since);
        self.set_http_response_header("x-postponed-ms", Some(&waited.to_string()));
        let text = b"hello world! hello world! hello world!";
        let roundtrip = hostcalls::call_foreign_function("compress", Some(text))
            .ok()
            .flatten()
            .and_then(|z| hostcalls::call_foreign_function("uncompress", Some(&z)).ok())
            .flatten();
        let declared = hostcalls::call_foreign_function("declare_property", Some(b""));
        let foreign = format!(
            "{} declare_property:{}",
            if roundtrip.as_deref() == Some(&text[..]) {
                "roundtrip-ok"
            } else {
                "roundtrip-failed"
            },
            match declared {
                Err(Status::NotFound) => "not-found",
                Err(_) => "error",
                Ok(_) => "ok",
            }
        );
        self.set_http_response_header("x-foreign", Some(&foreign));
        Action::Continue
    }
}
