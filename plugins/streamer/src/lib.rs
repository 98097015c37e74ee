//! A policy that talks to a gRPC service over a stream, as plugins written for Envoy do with
//! the proxy-wasm Rust SDK's `open_grpc_stream`: each request's headers pause while the plugin
//! sends the words of its `x-say` header as messages on a stream to `echo.Echo/Talk` and
//! half-closes it; the service's replies, its initial metadata (`x-echo`) and trailing metadata
//! (`x-said`) are collected, and when the stream closes with status OK the request resumes, and
//! its answer carries them in `x-stream-said`, `x-stream-ready` and `x-stream-count`; any other
//! status answers 403
//! with `x-stream-status: grpc <code> <message>`. With `x-stream-mode: cancel` the plugin cancels
//! the stream after the first reply and resumes at once; with `x-stream-mode: leave` it lets
//! the request go on at once and leaves the stream open (it ends with the request). A stream that cannot be opened answers
//! 502 with the host's status in `x-stream-status`.
//!
//! Its root context also keeps a stream open to `echo.Echo/Feed` (opened on its first tick),
//! whose every message it stores in shared data; each answer carries the latest in `x-feed`
//! (a background subscription, as plugins that follow a control plane do).
//!
//! Configuration: `{"upstream": "echo"}`.

use std::time::Duration;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use serde::Deserialize;

#[derive(Deserialize, Clone)]
struct Config {
    upstream: String,
}

/// Where the root context keeps the feed's last message.
const FEED: &str = "streamer.feed";

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(Root { config: None, feed: None })
    });
}}

struct Root {
    config: Option<Config>,
    feed: Option<u32>,
}

impl Context for Root {
    fn on_grpc_stream_message(&mut self, _token: u32, size: usize) {
        if let Some(message) = self.get_grpc_call_response_body(0, size) {
            let _ = self.set_shared_data(FEED, Some(&message), None);
        }
    }

    fn on_grpc_stream_close(&mut self, _token: u32, _status: u32) {
        // Opened again on the next tick.
        self.feed = None;
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _: usize) -> bool {
        let Some(raw) = self.get_plugin_configuration() else {
            return false;
        };
        self.config = serde_json::from_slice(&raw).ok();
        self.set_tick_period(Duration::from_millis(50));
        self.config.is_some()
    }

    fn on_tick(&mut self) {
        let (Some(config), None) = (&self.config, self.feed) else {
            return;
        };
        self.feed = self
            .open_grpc_stream(&config.upstream, "echo.Echo", "Feed", vec![])
            .ok();
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, _: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Talk {
            upstream: self.config.as_ref()?.upstream.clone(),
            replies: Vec::new(),
            ready: String::new(),
            said: String::new(),
            cancel: false,
        }))
    }
}

struct Talk {
    upstream: String,
    replies: Vec<String>,
    ready: String,
    said: String,
    cancel: bool,
}

impl Context for Talk {
    fn on_grpc_stream_initial_metadata(&mut self, _token: u32, _headers: u32) {
        let ready = self.get_grpc_stream_initial_metadata_value("x-echo");
        self.ready = String::from_utf8_lossy(&ready.unwrap_or_default()).into_owned();
    }

    fn on_grpc_stream_message(&mut self, token: u32, size: usize) {
        let message = self
            .get_grpc_call_response_body(0, size)
            .unwrap_or_default();
        self.replies
            .push(String::from_utf8_lossy(&message).into_owned());
        if self.cancel {
            let _ = self.cancel_grpc_stream(token);
            self.resume_http_request();
        }
    }

    fn on_grpc_stream_trailing_metadata(&mut self, _token: u32, _trailers: u32) {
        let said = self.get_grpc_stream_trailing_metadata_value("x-said");
        self.said = String::from_utf8_lossy(&said.unwrap_or_default()).into_owned();
    }

    fn on_grpc_stream_close(&mut self, _token: u32, status: u32) {
        if status == 0 {
            self.resume_http_request();
            return;
        }
        let (code, message) = self.get_grpc_status();
        let status = format!("grpc {code} {}", message.unwrap_or_default());
        self.send_http_response(403, vec![("x-stream-status", &status)], None);
    }
}

impl HttpContext for Talk {
    fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
        self.cancel = self.get_http_request_header("x-stream-mode").as_deref() == Some("cancel");
        let say = self
            .get_http_request_header("x-say")
            .unwrap_or_else(|| "hi".into());
        let token = match self.open_grpc_stream(
            &self.upstream,
            "echo.Echo",
            "Talk",
            vec![("x-who", b"streamer")],
        ) {
            Ok(token) => token,
            Err(status) => {
                let status = format!("{status:?}");
                self.send_http_response(502, vec![("x-stream-status", &status)], None);
                return Action::Pause;
            }
        };
        for word in say.split(',') {
            let _ = self.send_grpc_stream_message(token, Some(word.as_bytes()), false);
        }
        let mode = self.get_http_request_header("x-stream-mode");
        if mode.as_deref() == Some("leave") {
            return Action::Continue;
        }
        if !self.cancel {
            let _ = self.close_grpc_stream(token);
        }
        Action::Pause
    }

    fn on_http_response_headers(&mut self, _: usize, _: bool) -> Action {
        self.set_http_response_header("x-stream-said", Some(&self.replies.join(",")));
        self.set_http_response_header("x-stream-ready", Some(&self.ready));
        self.set_http_response_header("x-stream-count", Some(&self.said));
        if let (Some(feed), _) = self.get_shared_data(FEED) {
            self.set_http_response_header("x-feed", Some(&String::from_utf8_lossy(&feed)));
        }
        Action::Continue
    }
}
