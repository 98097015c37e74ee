//! A service plugin and the filter that feeds it, through a shared queue, as Envoy's
//! singleton-service pattern does it. With configuration `{"role": "service"}` (configured as
//! `service = true`) the root context registers the queue `hits` and, each time it is woken,
//! drains it and keeps the count and the last item in shared data. With `{"role": "filter"}`
//! every request enqueues its caller's key id on `hits` (found by VM id) and every answer
//! carries the count so far in `x-collector-count`. Both must share a `vm_id`.

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use serde::Deserialize;

#[derive(Deserialize, Default, Clone)]
struct Config {
    #[serde(default)]
    role: String,
}

const COUNT: &str = "collector.count";
const LAST: &str = "collector.last";

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

#[derive(Default)]
struct Root {
    config: Config,
    vm_id: String,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let raw = self.get_plugin_configuration().unwrap_or_default();
        self.config = serde_json::from_slice(&raw).unwrap_or_default();
        self.vm_id = self
            .get_property(vec!["plugin_vm_id"])
            .map(|v| String::from_utf8_lossy(&v).into_owned())
            .unwrap_or_default();
        if self.config.role == "service" {
            self.register_shared_queue("hits");
        }
        true
    }

    fn on_queue_ready(&mut self, queue: u32) {
        let mut count = self
            .get_shared_data(COUNT)
            .0
            .and_then(|v| String::from_utf8(v).ok()?.parse::<u64>().ok())
            .unwrap_or(0);
        while let Ok(Some(item)) = self.dequeue_shared_queue(queue) {
            count += 1;
            let _ = self.set_shared_data(LAST, Some(&item), None);
        }
        let _ = self.set_shared_data(COUNT, Some(count.to_string().as_bytes()), None);
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Filter {
            vm_id: self.vm_id.clone(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Filter {
    vm_id: String,
}

impl Context for Filter {}

impl HttpContext for Filter {
    fn on_http_request_headers(&mut self, _headers: usize, _end: bool) -> Action {
        let key = self
            .get_property(vec!["moltghost", "key_id"])
            .unwrap_or_default();
        if let Some(queue) = self.resolve_shared_queue(&self.vm_id, "hits") {
            let _ = self.enqueue_shared_queue(queue, Some(&key));
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _headers: usize, _end: bool) -> Action {
        if let (Some(count), _) = self.get_shared_data(COUNT) {
            let count = String::from_utf8_lossy(&count).into_owned();
            self.set_http_response_header("x-collector-count", Some(&count));
        }
        Action::Continue
    }
}
