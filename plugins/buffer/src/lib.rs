//! Sees the answer whole, as the proxy-wasm Rust SDK's `http_body` example does: it pauses the
//! body until its end (the host buffers it), then rewrites it at once, so that a phrase split
//! across chunks is still found. It replaces `find` with `replace` and, at the end, appends a
//! line saying how many bytes it saw whole and in how many calls.
//!
//! Configuration: `{"find": " Acme Inc", "replace": " [name]", "hold_headers": false}`.
//! `hold_headers` pauses the answer's headers too, so that nothing reaches the client before
//! the body has been seen whole. `keep_length` leaves the answer's `content-length` although the
//! length changes (a plugin bug the edge must not turn into a misframed answer).

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use serde::Deserialize;

#[derive(Deserialize, Clone, Default)]
struct Config {
    #[serde(default)]
    find: String,
    #[serde(default)]
    replace: String,
    #[serde(default)]
    hold_headers: bool,
    #[serde(default)]
    keep_length: bool,
}

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

#[derive(Default)]
struct Root {
    config: Config,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let raw = self.get_plugin_configuration().unwrap_or_default();
        self.config = serde_json::from_slice(&raw).unwrap_or_default();
        true
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Answer {
            config: self.config.clone(),
            calls: 0,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Answer {
    config: Config,
    calls: u32,
}

impl Context for Answer {}

impl HttpContext for Answer {
    fn on_http_response_headers(&mut self, _headers: usize, _end: bool) -> Action {
        // The length changes: as the SDK's example does, drop it.
        if !self.config.keep_length {
            self.set_http_response_header("content-length", None);
        }
        if self.config.hold_headers {
            Action::Pause
        } else {
            Action::Continue
        }
    }

    fn on_http_response_body(&mut self, size: usize, end: bool) -> Action {
        self.calls += 1;
        if !end {
            return Action::Pause;
        }
        let body = self.get_http_response_body(0, size).unwrap_or_default();
        let mut text = String::from_utf8_lossy(&body).into_owned();
        if !self.config.find.is_empty() {
            text = text.replace(&self.config.find, &self.config.replace);
        }
        text.push_str(&format!(
            ": seen whole: {} bytes in {} calls\n\n",
            body.len(),
            self.calls
        ));
        self.set_http_response_body(0, size, text.as_bytes());
        Action::Continue
    }
}
