//! WASM policy plugins: a Proxy-Wasm (ABI 0.2.1, and 0.2.0) host on wasmtime, so that plugins
//! built with any Proxy-Wasm SDK run unchanged.
//!
//! - [`abi`]: the ABI's plain data (statuses, map encoding), free of wasmtime.
//! - [`host`]: the host calls and one plugin VM.
//! - this module: the configured plugin set, one VM per plugin per worker thread (the edge's
//!   workers do not steal work, so a request's context stays in its thread's VM), and
//!   [`PluginRun`], a request's walk through the plugins' phases.
//!
//! Modules are compiled once when the configuration loads (a module that does not compile,
//! link, start or accept its configuration is refused then). Every call runs under an epoch
//! deadline and a memory limit; a VM that traps or overruns is dropped and rebuilt with
//! back-off, and the request in flight follows the plugin's fail policy.

pub mod abi;
mod calls;
pub mod host;
pub mod shared;
mod wasi;

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use wasmtime::Engine;

use self::abi::{Action, Headers};
use self::host::{Compiled, Exchange, LocalResponse, Phase, Shared, Vm};

/// A plugin as the configuration declares it (validated).
#[derive(Debug, Clone, PartialEq)]
pub struct PluginConfig {
    /// Name (logs, metrics, properties).
    pub name: String,
    /// The `.wasm` file.
    pub path: std::path::PathBuf,
    /// Handed to the plugin as its configuration (a TOML table arrives as JSON).
    pub config: String,
    /// `true`: a failing plugin is skipped; `false` (the default): the request is refused.
    pub fail_open: bool,
    /// Only these agents (endpoint ids or names); all when empty.
    pub agents: Vec<String>,
    /// Only these routes (`/v1/chat`, `/v1/chat/completions`, ...); all when empty.
    pub routes: Vec<String>,
    /// Longest a single call may run.
    pub deadline: Duration,
    /// Most memory a VM may have.
    pub memory_bytes: usize,
    /// The plugin sees the client's `Authorization` header (hidden by default: the key id,
    /// account and agent are properties).
    pub sees_authorization: bool,
    /// Envoy's `root_id` (default empty): which root context a module that has several
    /// starts (the AssemblyScript SDK picks its factory by it).
    pub root_id: String,
    /// Envoy's `vm_id` (default empty): plugins with the same one share data.
    pub vm_id: String,
    /// Envoy's VM configuration, handed to `proxy_on_vm_start` (a table arrives as JSON).
    pub vm_config: String,
}

/// The process's wasmtime engine: epoch interruption (ticked every millisecond by a thread of
/// its own) and the pooling instance allocator.
pub fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        let mut cfg = wasmtime::Config::new();
        cfg.epoch_interruption(true);
        let mut pool = wasmtime::PoolingAllocationConfig::default();
        pool.total_memories(512)
            .total_tables(512)
            .total_core_instances(512)
            .max_memory_size(1 << 30);
        cfg.allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&cfg)
            .or_else(|_| {
                // A machine that cannot reserve the pool's address space: allocate on demand.
                let mut cfg = wasmtime::Config::new();
                cfg.epoch_interruption(true);
                Engine::new(&cfg)
            })
            .expect("a wasmtime engine");
        let ticker = engine.weak();
        std::thread::Builder::new()
            .name("moltghost-wasm-epoch".into())
            .spawn(move || loop {
                std::thread::sleep(Duration::from_millis(1));
                match ticker.upgrade() {
                    Some(e) => e.increment_epoch(),
                    None => return,
                }
            })
            .expect("the epoch thread");
        engine
    })
}

static NEXT_UID: AtomicU64 = AtomicU64::new(1);

/// The module compiled from `wasm`, compiled once per distinct file content in this process
/// (a reload of unchanged plugins, or one file listed twice, does not compile again).
fn compiled_module(wasm: &[u8]) -> Result<wasmtime::Module, String> {
    use sha2::Digest;
    static MODULES: OnceLock<std::sync::Mutex<HashMap<[u8; 32], wasmtime::Module>>> =
        OnceLock::new();
    let key: [u8; 32] = sha2::Sha256::digest(wasm).into();
    let cache = MODULES.get_or_init(Default::default);
    if let Some(m) = cache.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
        return Ok(m.clone());
    }
    let m =
        wasmtime::Module::new(engine(), wasm).map_err(|e| format!("not a valid module: {e:#}"))?;
    cache
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(key, m.clone());
    Ok(m)
}

/// A loaded plugin.
pub struct Plugin {
    uid: u64,
    cfg: PluginConfig,
    compiled: Compiled,
    /// What its VMs share (configuration, shared data, its metrics).
    pub shared: Arc<Shared>,
    /// Calls that trapped or overran, since load.
    pub failures: AtomicU64,
}

impl Plugin {
    /// Compiles and test-starts the plugin: an error here refuses the configuration.
    pub fn load(cfg: PluginConfig) -> Result<Arc<Self>, String> {
        let wasm = std::fs::read(&cfg.path)
            .map_err(|e| format!("plugin `{}`: {}: {e}", cfg.name, cfg.path.display()))?;
        let module =
            |wasm: &[u8]| compiled_module(wasm).map_err(|e| format!("plugin `{}`: {e}", cfg.name));
        let compiled = host::link(engine(), module(&wasm)?, cfg.memory_bytes)
            .map_err(|e| format!("plugin `{}`: {e}", cfg.name))?;
        let shared = Arc::new(
            Shared::new(&cfg.name, cfg.config.clone().into_bytes()).with_vm(
                &cfg.root_id,
                &cfg.vm_id,
                cfg.vm_config.clone().into_bytes(),
            ),
        );
        // Started and configured once now, so that a bad plugin fails the load, not a request.
        compiled
            .instantiate(
                engine(),
                shared.clone(),
                cfg.deadline.max(Duration::from_secs(1)),
            )
            .map_err(|e| format!("plugin `{}`: {e}", cfg.name))?;
        let plugin = Arc::new(Self {
            uid: NEXT_UID.fetch_add(1, Relaxed),
            cfg,
            compiled,
            shared,
            failures: AtomicU64::new(0),
        });
        start_ticks(&plugin);
        Ok(plugin)
    }

    /// The plugin's name.
    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    fn applies(&self, route: &str, agent_id: &str, agent_name: &str) -> bool {
        (self.cfg.routes.is_empty() || self.cfg.routes.iter().any(|r| r == route))
            && (self.cfg.agents.is_empty()
                || self
                    .cfg
                    .agents
                    .iter()
                    .any(|a| a == agent_id || a == agent_name))
    }
}

/// Ticks, for plugins whose root context asked for them: on a VM of their own, on a thread of
/// their own, for as long as the plugin is loaded.
fn start_ticks(plugin: &Arc<Plugin>) {
    let weak = Arc::downgrade(plugin);
    let _ = std::thread::Builder::new()
        .name(format!("moltghost-wasm-tick-{}", plugin.cfg.name))
        .spawn(move || {
            let mut vm: Option<Vm> = None;
            loop {
                let Some(p) = weak.upgrade() else { return };
                let period = p.shared.tick_ms.load(Relaxed);
                if period == 0 {
                    drop(p);
                    std::thread::sleep(Duration::from_millis(200));
                    continue;
                }
                if vm.is_none() {
                    vm = p
                        .compiled
                        .instantiate(engine(), p.shared.clone(), p.cfg.deadline)
                        .ok();
                }
                if let Some(v) = vm.as_mut() {
                    if let Err(e) = v.tick() {
                        tracing::warn!(plugin = %p.cfg.name, error = %e, "plugin tick failed: its VM is rebuilt");
                        vm = None;
                    }
                }
                drop(p);
                std::thread::sleep(Duration::from_millis(u64::from(period.max(1))));
            }
        });
}

/// The configured plugins, in order.
#[derive(Default)]
pub struct PluginSet {
    plugins: Vec<Arc<Plugin>>,
}

impl PluginSet {
    /// Loads every plugin; the first that fails refuses the whole set.
    pub fn load(configs: &[PluginConfig]) -> Result<Self, String> {
        let plugins = configs
            .iter()
            .cloned()
            .map(Plugin::load)
            .collect::<Result<_, _>>()?;
        Ok(Self { plugins })
    }

    /// The plugins.
    pub fn plugins(&self) -> &[Arc<Plugin>] {
        &self.plugins
    }

    /// A request's run through the plugins that apply to it, or `None` when none does.
    pub fn start(
        self: &Arc<Self>,
        route: &str,
        agent_id: &str,
        agent_name: &str,
        properties: HashMap<&'static str, Vec<u8>>,
    ) -> Option<PluginRun> {
        let active: Vec<usize> = (0..self.plugins.len())
            .filter(|&i| self.plugins[i].applies(route, agent_id, agent_name))
            .collect();
        if active.is_empty() {
            return None;
        }
        Some(PluginRun {
            set: self.clone(),
            contexts: active.into_iter().map(|i| (i, None)).collect(),
            exchange: Exchange {
                properties: Arc::new(properties),
                ..Exchange::default()
            },
            thread: std::thread::current().id(),
            authorization: Vec::new(),
            decisions: Vec::new(),
            spent: Duration::ZERO,
            finished: false,
        })
    }
}

/// A plugin VM on this thread, or why there is none.
enum Slot {
    Ready {
        vm: Box<Vm>,
        generation: u64,
    },
    /// Failed: rebuilt no sooner than `until`.
    Broken {
        until: Instant,
        failures: u32,
    },
}

thread_local! {
    static VMS: RefCell<HashMap<u64, Slot>> = RefCell::new(HashMap::new());
    static GENERATION: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Runs `f` on this thread's VM of `plugin` (made on first use, or after a failure once the
/// back-off has passed). `Err` when there is no VM or `f` failed; a failure drops the VM.
fn with_vm<T>(
    plugin: &Plugin,
    f: impl FnOnce(&mut Vm, u64) -> Result<T, String>,
) -> Result<T, String> {
    VMS.with(|vms| {
        let mut vms = vms.borrow_mut();
        let failures = match vms.get(&plugin.uid) {
            Some(Slot::Broken { until, failures }) => {
                if Instant::now() < *until {
                    return Err("the plugin failed recently and is backing off".to_string());
                }
                *failures
            }
            _ => 0,
        };
        if !matches!(vms.get(&plugin.uid), Some(Slot::Ready { .. })) {
            match plugin
                .compiled
                .instantiate(engine(), plugin.shared.clone(), plugin.cfg.deadline)
            {
                Ok(vm) => {
                    let generation = GENERATION.with(|g| {
                        g.set(g.get() + 1);
                        g.get()
                    });
                    vms.insert(
                        plugin.uid,
                        Slot::Ready {
                            vm: Box::new(vm),
                            generation,
                        },
                    );
                }
                Err(e) => {
                    vms.insert(plugin.uid, broken(failures + 1));
                    return Err(e);
                }
            }
        }
        let Some(Slot::Ready { vm, generation }) = vms.get_mut(&plugin.uid) else {
            unreachable!("made just above")
        };
        let generation = *generation;
        match f(vm, generation) {
            Ok(v) => Ok(v),
            Err(e) => {
                plugin.failures.fetch_add(1, Relaxed);
                tracing::warn!(plugin = %plugin.cfg.name, error = %e, "plugin failed: its VM is dropped and rebuilt after a back-off");
                vms.insert(plugin.uid, broken(failures + 1));
                Err(e)
            }
        }
    })
}

/// Back-off after the `n`th failure in a row: 10 ms doubling to 5 s.
fn broken(n: u32) -> Slot {
    let wait = Duration::from_millis(10 << n.min(9)).min(Duration::from_secs(5));
    Slot::Broken {
        until: Instant::now() + wait,
        failures: n,
    }
}

/// Drops this thread's VMs of plugins no longer loaded (after a reload).
pub fn forget_unloaded(set: &PluginSet) {
    VMS.with(|vms| {
        vms.borrow_mut()
            .retain(|uid, _| set.plugins.iter().any(|p| p.uid == *uid))
    });
}

/// How a request's run through the plugins ended a phase.
#[derive(Debug)]
pub enum Verdict {
    /// A plugin answered instead of the runtime.
    Respond(LocalResponse),
    /// A fail-closed plugin failed; the message names it (and says nothing of its internals,
    /// which the log has).
    Failed(String),
    /// A plugin reset the stream.
    Reset,
}

impl Verdict {
    /// The verdict as the edge's error, from the one table: a fail-closed failure is
    /// `plugin_failed`, a local answer `policy_denied` with the plugin's status and reason.
    pub fn into_error(self) -> crate::error::EdgeError {
        match self {
            Self::Failed(m) => crate::error::EdgeError::PluginFailed(m.into()),
            Self::Reset => crate::error::EdgeError::StreamReset,
            Self::Respond(local) => crate::error::EdgeError::Denied {
                status: local.status,
                message: if local.details.is_empty() {
                    "Denied by policy".into()
                } else {
                    local.details
                },
            },
        }
    }
}

/// One request's walk through the plugins: contexts in this thread's VMs, the exchange they
/// see, what they decided.
pub struct PluginRun {
    set: Arc<PluginSet>,
    /// Per active plugin: its index, and its context (id, VM generation) once created.
    contexts: Vec<(usize, Option<(i32, u64)>)>,
    exchange: Exchange,
    thread: std::thread::ThreadId,
    /// The client's `Authorization`, kept out of the exchange but for plugins that may see it.
    authorization: Headers,
    /// `plugin:decision` for the access log.
    pub decisions: Vec<String>,
    /// Time spent in plugin calls.
    pub spent: Duration,
    finished: bool,
}

impl PluginRun {
    /// True when some active plugin handles response bodies (answers are then re-framed,
    /// since their length may change).
    pub fn sees_response_body(&self) -> bool {
        self.contexts
            .iter()
            .any(|(i, _)| self.set.plugins[*i].compiled.sees_response_body)
    }

    /// Runs `phase` through every active plugin in order.
    fn run(&mut self, phase: Phase, end_of_stream: bool) -> Result<(), Verdict> {
        if std::thread::current().id() != self.thread {
            // The request moved threads (it should not): its contexts are elsewhere.
            return Ok(());
        }
        let started = Instant::now();
        let set = self.set.clone();
        let mut result = Ok(());
        for (i, ctx) in self.contexts.iter_mut() {
            let plugin = &set.plugins[*i];
            let exchange = &mut self.exchange;
            let shown = plugin.cfg.sees_authorization && !self.authorization.is_empty();
            if shown {
                exchange
                    .request_headers
                    .extend(self.authorization.iter().cloned());
            }
            let outcome = with_vm(plugin, |vm, generation| {
                let id = match *ctx {
                    Some((id, g)) if g == generation => id,
                    // Its VM was rebuilt since: the context is gone with it.
                    Some(_) => return Err("the plugin's VM was rebuilt mid-request".into()),
                    None => {
                        let id = vm.create_context()?;
                        *ctx = Some((id, generation));
                        id
                    }
                };
                vm.phase(phase, id, exchange, end_of_stream)
            });
            if shown {
                exchange
                    .request_headers
                    .retain(|(k, _)| k != "authorization");
            }
            match outcome {
                Ok(action) => {
                    if std::mem::take(&mut self.exchange.reset) {
                        self.decisions.push(format!("{}:reset", plugin.cfg.name));
                        result = Err(Verdict::Reset);
                        break;
                    }
                    if let Some(local) = self.exchange.local_response.take() {
                        self.decisions
                            .push(format!("{}:respond {}", plugin.cfg.name, local.status));
                        result = Err(Verdict::Respond(local));
                        break;
                    }
                    if action == Action::Pause && matches!(phase, Phase::RequestHeaders) {
                        // Paused for the body: the body phase follows anyway.
                        continue;
                    }
                }
                Err(e) if plugin.cfg.fail_open => {
                    self.decisions.push(format!("{}:skipped", plugin.cfg.name));
                    tracing::debug!(plugin = %plugin.cfg.name, error = %e, "plugin skipped (fail open)");
                    *ctx = None;
                }
                Err(_) => {
                    // What went wrong (a trap's backtrace, say) is in the log, not the answer.
                    self.decisions.push(format!("{}:failed", plugin.cfg.name));
                    result = Err(Verdict::Failed(format!(
                        "policy plugin `{}` failed",
                        plugin.cfg.name
                    )));
                    *ctx = None;
                    break;
                }
            }
        }
        self.spent += started.elapsed();
        result
    }

    /// The request: headers (names lowercase) and the whole body, before any upstream
    /// connection. Plugins may change both, or answer instead.
    pub fn on_request(&mut self, headers: &mut Headers, body: &mut Bytes) -> Result<(), Verdict> {
        let (authorization, rest) = std::mem::take(headers)
            .into_iter()
            .partition(|(k, _)| k == "authorization");
        self.authorization = authorization;
        self.exchange.request_headers = rest;
        self.exchange.request_body = body.clone();
        let r = self
            .run(Phase::RequestHeaders, body.is_empty())
            .and_then(|()| {
                if body.is_empty() {
                    Ok(())
                } else {
                    self.run(Phase::RequestBody, true)
                }
            });
        *headers = std::mem::take(&mut self.exchange.request_headers);
        headers.extend(self.authorization.iter().cloned());
        *body = std::mem::take(&mut self.exchange.request_body);
        if r.is_ok() && self.decisions.is_empty() {
            self.decisions.push("allow".into());
        }
        r
    }

    /// The response's headers (status in `:status`). Plugins may change them or answer instead.
    pub fn on_response_headers(&mut self, headers: &mut Headers) -> Result<(), Verdict> {
        self.exchange.response_code = headers
            .iter()
            .find(|(k, _)| k == ":status")
            .and_then(|(_, v)| std::str::from_utf8(v).ok()?.parse().ok());
        self.exchange.response_headers = std::mem::take(headers);
        let r = self.run(Phase::ResponseHeaders, false);
        *headers = std::mem::take(&mut self.exchange.response_headers);
        r
    }

    /// A response body chunk, as it passes (`end_of_stream` on the last). Plugins may rewrite it.
    pub fn on_response_body(
        &mut self,
        chunk: Bytes,
        end_of_stream: bool,
    ) -> Result<Bytes, Verdict> {
        self.exchange.response_size += chunk.len() as u64;
        if !self.sees_response_body() {
            return Ok(chunk);
        }
        self.exchange.response_body = chunk;
        self.run(Phase::ResponseBody, end_of_stream)?;
        Ok(std::mem::take(&mut self.exchange.response_body))
    }

    /// Ends the request in every plugin (`proxy_on_log`, `_done`, `_delete`).
    pub fn finish(&mut self) {
        if self.finished || std::thread::current().id() != self.thread {
            return;
        }
        self.finished = true;
        let set = self.set.clone();
        for (i, ctx) in &self.contexts {
            let Some((id, g)) = *ctx else { continue };
            let plugin = &set.plugins[*i];
            let exchange = &mut self.exchange;
            let _ = with_vm(plugin, |vm, generation| {
                if generation != g {
                    return Ok(());
                }
                vm.finish(id, exchange)
            });
        }
    }
}

impl Drop for PluginRun {
    fn drop(&mut self) {
        self.finish();
    }
}

impl std::fmt::Debug for PluginRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginRun")
            .field("decisions", &self.decisions)
            .field("spent", &self.spent)
            .finish()
    }
}

/// A request header as plugins see it: pseudo-headers (`:method`, `:path`, `:authority`,
/// `:scheme`) first, then every header, names lowercase.
pub fn request_headers(h: &pingora_http::RequestHeader, scheme: &str) -> Headers {
    let mut out = Vec::with_capacity(h.headers.len() + 4);
    out.push((":method".into(), h.method.as_str().as_bytes().to_vec()));
    let path = h.uri.path_and_query().map_or("/", |p| p.as_str());
    out.push((":path".into(), path.as_bytes().to_vec()));
    let authority = h
        .headers
        .get("host")
        .map(|v| v.as_bytes().to_vec())
        .or_else(|| h.uri.authority().map(|a| a.as_str().as_bytes().to_vec()))
        .unwrap_or_default();
    out.push((":authority".into(), authority));
    out.push((":scheme".into(), scheme.as_bytes().to_vec()));
    for (k, v) in h.headers.iter() {
        out.push((k.as_str().to_owned(), v.as_bytes().to_vec()));
    }
    out
}

/// Puts what plugins left of the request's headers back (pseudo-headers are not changeable).
pub fn apply_request_headers(h: &mut pingora_http::RequestHeader, headers: &Headers) {
    let names: Vec<http::HeaderName> = h.headers.keys().cloned().collect();
    for n in names {
        h.remove_header(&n);
    }
    for (k, v) in headers.iter().filter(|(k, _)| !k.starts_with(':')) {
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(k.as_bytes()),
            http::HeaderValue::from_bytes(v),
        ) {
            let _ = h.append_header(name, value);
        }
    }
}

/// A response header as plugins see it: `:status`, then every header.
pub fn response_headers(h: &pingora_http::ResponseHeader) -> Headers {
    let mut out = Vec::with_capacity(h.headers.len() + 1);
    out.push((":status".into(), h.status.as_str().as_bytes().to_vec()));
    for (k, v) in h.headers.iter() {
        out.push((k.as_str().to_owned(), v.as_bytes().to_vec()));
    }
    out
}

/// Puts what plugins left of the response's headers back (`:status` included).
pub fn apply_response_headers(h: &mut pingora_http::ResponseHeader, headers: &Headers) {
    let names: Vec<http::HeaderName> = h.headers.keys().cloned().collect();
    for n in names {
        h.remove_header(&n);
    }
    for (k, v) in headers {
        if k == ":status" {
            if let Some(s) = std::str::from_utf8(v)
                .ok()
                .and_then(|s| s.parse::<u16>().ok())
            {
                let _ = h.set_status(s);
            }
        } else if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(k.as_bytes()),
            http::HeaderValue::from_bytes(v),
        ) {
            let _ = h.append_header(name, value);
        }
    }
}

/// Every plugin's failures and the metrics plugins defined, in Prometheus's text format
/// (appended to `/metrics`).
pub fn prometheus(set: &PluginSet) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    if set.plugins.is_empty() {
        return out;
    }
    let _ = writeln!(out, "# HELP moltghost_plugin_failures_total Plugin calls that trapped, overran their deadline or memory, or found the plugin backing off\n# TYPE moltghost_plugin_failures_total counter");
    for p in &set.plugins {
        let _ = writeln!(
            out,
            "moltghost_plugin_failures_total{{plugin=\"{}\"}} {}",
            p.cfg.name,
            p.failures.load(Relaxed)
        );
    }
    let _ = writeln!(out, "# HELP moltghost_plugin_metric Metrics plugins defined (proxy_define_metric), by plugin, name and kind\n# TYPE moltghost_plugin_metric gauge");
    for p in &set.plugins {
        p.shared.each_metric(|m| {
            let kind = ["counter", "gauge", "histogram"][m.kind.clamp(0, 2) as usize];
            let name: String = m
                .name
                .chars()
                .map(|c| {
                    if c == '"' || c == '\\' || c == '\n' {
                        '_'
                    } else {
                        c
                    }
                })
                .collect();
            let _ = writeln!(
                out,
                "moltghost_plugin_metric{{plugin=\"{}\",name=\"{name}\",kind=\"{kind}\"}} {}",
                p.cfg.name,
                m.value.load(Relaxed)
            );
        });
    }
    out
}

/// What `f` logs, as text (for tests of what plugins leave in the log).
#[cfg(test)]
fn logged(f: impl FnOnce()) -> String {
    #[derive(Clone, Default)]
    struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);
    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let log = Captured::default();
    let writer = log.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    tracing::subscriber::with_default(subscriber, f);
    let text = String::from_utf8_lossy(&log.0.lock().unwrap()).into_owned();
    text
}
