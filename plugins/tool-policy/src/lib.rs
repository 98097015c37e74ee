//! Tool policy: denies named tools per account or per API key, in the native `/v1/chat`
//! (`"tools": ["crm_query"]`), in OpenAI chat completions (`tools[].function.name`) and in
//! `/v1/tools` calls (`"tool": "crm_query"`).
//!
//! Configuration:
//! ```json
//! {"deny": {"*": ["shell"], "acc_123": ["slack_notify"]}, "deny_keys": {"key_abc": ["crm_query"]}}
//! ```
//! `*` applies to every account. The account and key come from the edge's properties
//! `moltghost.account` and `moltghost.key_id`.

use std::collections::HashMap;
use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use serde::Deserialize;
use serde_json::Value;

#[derive(Deserialize, Default, Clone)]
struct Config {
    #[serde(default)]
    deny: HashMap<String, Vec<String>>,
    #[serde(default)]
    deny_keys: HashMap<String, Vec<String>>,
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
        let raw = self.get_plugin_configuration().unwrap_or_default();
        if raw.is_empty() {
            return true;
        }
        match serde_json::from_slice(&raw) {
            Ok(c) => {
                self.config = Rc::new(c);
                true
            }
            Err(e) => {
                log::error!("tool-policy: bad configuration: {e}");
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

fn property(ctx: &dyn Context, path: &[&str]) -> String {
    ctx.get_property(path.to_vec())
        .and_then(|v| String::from_utf8(v).ok())
        .unwrap_or_default()
}

/// The tool names a request body names, whichever of the three shapes it has.
fn tools_named(body: &Value) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(t) = body.get("tool").and_then(Value::as_str) {
        out.push(t.to_owned());
    }
    for t in body
        .get("tools")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let Some(name) = t.as_str() {
            out.push(name.to_owned());
        } else if let Some(name) = t.pointer("/function/name").and_then(Value::as_str) {
            out.push(name.to_owned());
        }
    }
    out
}

impl HttpContext for Request {
    fn on_http_request_headers(&mut self, _headers: usize, end_of_stream: bool) -> Action {
        // Without a body there is nothing to check; with one, wait for all of it.
        if end_of_stream {
            Action::Continue
        } else {
            Action::Pause
        }
    }

    fn on_http_request_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        if !end_of_stream {
            return Action::Pause;
        }
        let Some(raw) = self.get_http_request_body(0, size) else {
            return Action::Continue;
        };
        // A body that is not JSON is the edge's to refuse, not this plugin's.
        let Ok(body) = serde_json::from_slice::<Value>(&raw) else {
            return Action::Continue;
        };
        let account = property(self, &["moltghost", "account"]);
        let key = property(self, &["moltghost", "key_id"]);
        let denied: Vec<&String> = ["*", account.as_str()]
            .iter()
            .filter_map(|a| self.config.deny.get(*a))
            .chain(self.config.deny_keys.get(&key))
            .flatten()
            .collect();
        if let Some(tool) = tools_named(&body).into_iter().find(|t| denied.contains(&t)) {
            log::info!("tool-policy: {tool} denied for account {account}, key {key}");
            let msg = format!("the tool `{tool}` is not allowed for this account or key");
            let err = serde_json::json!({"error": {"message": msg, "code": "tool_denied", "type": "permission_error"}});
            self.send_http_response(
                403,
                vec![("content-type", "application/json")],
                Some(err.to_string().as_bytes()),
            );
            return Action::Pause;
        }
        Action::Continue
    }
}
