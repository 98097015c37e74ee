//! Request rewriting by pseudo-header, as Envoy plugins do it: the client's `x-rewrite-path`,
//! `x-rewrite-method` and `x-rewrite-authority` become the request's `:path`, `:method` and
//! `:authority` (Envoy routes the request again after such an edit; so does the edge). Real
//! plugins take the new values from their configuration or a lookup; taking them from the
//! request keeps the tests short.

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root) });
}}

struct Root;

impl Context for Root {}

impl RootContext for Root {
    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Rewrite))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Rewrite;

impl Context for Rewrite {}

impl HttpContext for Rewrite {
    fn on_http_request_headers(&mut self, _headers: usize, _end: bool) -> Action {
        for (from, to) in [
            ("x-rewrite-path", ":path"),
            ("x-rewrite-method", ":method"),
            ("x-rewrite-authority", ":authority"),
        ] {
            if let Some(value) = self.get_http_request_header(from) {
                self.set_http_request_header(to, Some(&value));
                self.set_http_request_header(from, None);
            }
        }
        Action::Continue
    }
}
