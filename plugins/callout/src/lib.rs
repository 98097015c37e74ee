//! Authorization by an HTTP call out, as the proxy-wasm Rust SDK's `http_auth_random` example
//! does it: the request's headers pause while the plugin asks an upstream named in its
//! configuration; on a 200 the request resumes (and the answer says what the upstream said),
//! otherwise the plugin answers 403 itself (with the call's status, or, for a call that failed,
//! what `proxy_get_status` says). If the call cannot even be made (an upstream the
//! edge does not know), the plugin answers 502 with the status the host gave.
//!
//! Configuration: `{"upstream": "auth", "path": "/check", "method": "POST", "timeout_ms": 1000,
//! "tick_path": "/tick"}`. The client's `x-callout-want` header is passed on to the upstream (the tests'
//! upstream answers with it). With `tick_path`, the root context also calls the upstream there
//! every 50 ms from `on_tick` and keeps the last answer in shared data, which every answer
//! carries in `x-callout-tick` (a background refresh, as plugins that fetch keys or lists do).
//! With `"grpc": ["pkg.Service", "Method"]` it asks by a gRPC unary call instead (the message
//! is `x-callout-want`'s value, the key id goes as metadata): a reply resumes the request and is
//! shown in `x-callout-answer`; a failure answers 403 with `x-callout-status: grpc <code>
//! <message>`.

use std::time::Duration;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use serde::Deserialize;

#[derive(Deserialize, Clone)]
struct Config {
    upstream: String,
    #[serde(default = "check")]
    path: String,
    #[serde(default = "post")]
    method: String,
    #[serde(default = "second")]
    timeout_ms: u64,
    #[serde(default)]
    tick_path: Option<String>,
    /// Ask by gRPC instead: `["pkg.Service", "Method"]`.
    #[serde(default)]
    grpc: Option<(String, String)>,
}

/// Where the root context keeps the last answer to its tick call.
const TICK_ANSWER: &str = "callout.tick";

fn check() -> String {
    "/check".into()
}

fn post() -> String {
    "POST".into()
}

fn second() -> u64 {
    1000
}

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root { config: None }) });
}}

struct Root {
    config: Option<Config>,
}

impl Context for Root {
    fn on_http_call_response(
        &mut self,
        _token: u32,
        _headers: usize,
        body: usize,
        _trailers: usize,
    ) {
        let said = self
            .get_http_call_response_body(0, body)
            .unwrap_or_default();
        let _ = self.set_shared_data(TICK_ANSWER, Some(&said), None);
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let raw = self.get_plugin_configuration().unwrap_or_default();
        self.config = serde_json::from_slice(&raw).ok();
        if self.config.as_ref().is_some_and(|c| c.tick_path.is_some()) {
            self.set_tick_period(Duration::from_millis(50));
        }
        self.config.is_some()
    }

    fn on_tick(&mut self) {
        let Some(c) = &self.config else { return };
        let path = c.tick_path.as_deref().unwrap_or("/tick");
        let _ = self.dispatch_http_call(
            &c.upstream,
            vec![
                (":method", "GET"),
                (":path", path),
                (":authority", "auth.internal"),
            ],
            None,
            vec![],
            Duration::from_millis(c.timeout_ms),
        );
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Request {
            config: self.config.clone()?,
            verdict: None,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Request {
    config: Config,
    /// What the upstream said, for the answer's header.
    verdict: Option<String>,
}

impl Context for Request {
    fn on_http_call_response(
        &mut self,
        _token: u32,
        _headers: usize,
        body: usize,
        _trailers: usize,
    ) {
        let status = self.get_http_call_response_header(":status");
        let said = self
            .get_http_call_response_body(0, body)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        if status.as_deref() == Some("200") {
            self.verdict = Some(said);
            self.resume_http_request();
            return;
        }
        // A failed call has no status line; the host's status says why (Envoy: 11, "reset").
        let status = status.unwrap_or_else(|| {
            let (code, message) = self.get_grpc_status();
            format!("none ({code} {})", message.unwrap_or_default())
        });
        self.deny(&status);
    }

    fn on_grpc_call_response(&mut self, _token: u32, status: u32, size: usize) {
        if status == 0 {
            let said = self
                .get_grpc_call_response_body(0, size)
                .unwrap_or_default();
            self.verdict = Some(String::from_utf8_lossy(&said).into_owned());
            self.resume_http_request();
            return;
        }
        let (code, message) = self.get_grpc_status();
        self.deny(&format!("grpc {code} {}", message.unwrap_or_default()));
    }
}

impl Request {
    fn deny(&self, status: &str) {
        self.send_http_response(
            403,
            vec![("x-callout-status", status)],
            Some(b"Access forbidden by the callout.\n"),
        );
    }
}

impl HttpContext for Request {
    fn on_http_request_headers(&mut self, _headers: usize, _end: bool) -> Action {
        let want = self
            .get_http_request_header("x-callout-want")
            .unwrap_or_else(|| "200".into());
        let key = self
            .get_property(vec!["moltghost", "key_id"])
            .map(|k| String::from_utf8_lossy(&k).into_owned())
            .unwrap_or_default();
        let timeout = Duration::from_millis(self.config.timeout_ms);
        let dispatched = match &self.config.grpc {
            Some((service, method)) => self.dispatch_grpc_call(
                &self.config.upstream,
                service,
                method,
                vec![("x-key-id", key.as_bytes())],
                Some(want.as_bytes()),
                timeout,
            ),
            None => self.dispatch_http_call(
                &self.config.upstream,
                vec![
                    (":method", self.config.method.as_str()),
                    (":path", &self.config.path),
                    (":authority", "auth.internal"),
                    ("x-callout-want", &want),
                    ("x-key-id", &key),
                ],
                Some(b"may I?"),
                vec![],
                timeout,
            ),
        };
        match dispatched {
            Ok(_) => Action::Pause,
            Err(status) => {
                let status = format!("{status:?}");
                self.send_http_response(
                    502,
                    vec![("x-callout-status", status.as_str())],
                    Some(b"The callout could not be made.\n"),
                );
                Action::Pause
            }
        }
    }

    fn on_http_response_headers(&mut self, _headers: usize, _end: bool) -> Action {
        if let Some(v) = self.verdict.clone() {
            self.set_http_response_header("x-callout-answer", Some(&v));
        }
        if let (Some(tick), _) = self.get_shared_data(TICK_ANSWER) {
            self.set_http_response_header("x-callout-tick", Some(&String::from_utf8_lossy(&tick)));
        }
        Action::Continue
    }
}
