//! WASM policy plugins: a Proxy-Wasm (ABI 0.2.1, and 0.2.0) host on wasmtime, so that plugins
//! built with any Proxy-Wasm SDK run unchanged.
//!
//! - [`abi`]: the ABI's plain data (statuses, map encoding), free of wasmtime.
//! - [`host`]: the host calls and one plugin VM.
//! - [`callout`]: HTTP calls out (`proxy_http_call`); [`grpc`]: gRPC unary calls.
//! - [`run`]: [`PluginRun`], a request's walk through the plugins' phases.
//! - this module: the configured plugin set, one VM per plugin per worker thread (the edge's
//!   workers do not steal work, so a request's context stays in its thread's VM).
//! - [`background`]: each plugin's instance for ticks, queues and service plugins;
//!   [`queues`]: shared queues.
//!
//! Modules are compiled once when the configuration loads (a module that does not compile,
//! link, start or accept its configuration is refused then). Every call runs under a deadline
//! of CPU time ([`deadline`]: a busy machine does not fail plugins) and a memory limit; a VM
//! that traps or overruns is dropped and rebuilt with back-off, and the request in flight
//! follows the plugin's fail policy.

pub mod abi;
mod background;
pub mod callout;
mod calls;
mod deadline;
mod foreign;
pub mod grpc;
pub mod grpc_stream;
mod headers;
pub mod host;
pub mod pod_call;
pub mod properties;
pub mod queues;
mod resume;
mod run;
pub mod shared;
mod ticks;
mod timing;
mod wasi;

pub use headers::{
    apply_request_headers, apply_response_headers, request_headers, response_headers, Rewrites,
};
pub use properties::{ConnectionId, Node, RequestFacts};
pub use run::{PluginRun, Verdict};

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use wasmtime::Engine;

use self::host::{Compiled, Shared, Vm};

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
    /// Where the plugin's HTTP calls may go, by name (Envoy's clusters).
    pub upstreams: callout::CallUpstreams,
    /// The most of an answer (or of an HTTP call's answer) the plugin may hold back.
    pub buffer_bytes: usize,
    /// A service plugin (Envoy's singleton): only its root context runs, on the plugin's
    /// background instance (ticks, queues, calls out); no request goes through it.
    pub service: bool,
}

/// The process's wasmtime engine: epoch interruption (ticked every 5 ms by a thread of
/// its own while calls run, every 20 ms when none has for a while: [`deadline::next_tick`])
/// and the pooling instance allocator.
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
            .spawn(move || {
                let mut idle = 0;
                loop {
                    std::thread::sleep(deadline::next_tick(&mut idle));
                    match ticker.upgrade() {
                        Some(e) => e.increment_epoch(),
                        None => return,
                    }
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

/// What of the edge plugins reach: the edge as Envoy's `node` and, for calls to pods, its
/// tunnels and the key that signs caller identities (absent when a configuration is only
/// checked: pods are then not opened).
#[derive(Clone, Default)]
pub struct Reach {
    /// The edge (`node.*` properties).
    pub node: Arc<Node>,
    /// The tunnels and the identity key.
    pub pods: Option<(
        Arc<crate::tunnel::bridge::Tunnels>,
        Arc<crate::identity::IdentityKey>,
    )>,
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
    /// Time requests spent in it.
    request_time: timing::RequestTime,
}

impl Plugin {
    /// Compiles and test-starts the plugin: an error here refuses the configuration.
    pub fn load(cfg: PluginConfig, reach: &Reach) -> Result<Arc<Self>, String> {
        let wasm = std::fs::read(&cfg.path)
            .map_err(|e| format!("plugin `{}`: {}: {e}", cfg.name, cfg.path.display()))?;
        let module =
            |wasm: &[u8]| compiled_module(wasm).map_err(|e| format!("plugin `{}`: {e}", cfg.name));
        let compiled = host::link(engine(), module(&wasm)?, cfg.memory_bytes)
            .map_err(|e| format!("plugin `{}`: {e}", cfg.name))?;
        let mut pods = HashMap::new();
        if let Some((tunnels, identity)) = &reach.pods {
            for (name, target) in &cfg.upstreams.pods {
                let route = pod_call::PodRoute::open(target, tunnels, identity.clone())
                    .map_err(|e| format!("plugin `{}`: upstream `{name}`: {e}", cfg.name))?;
                pods.insert(name.clone(), Arc::new(route));
            }
        }
        let shared = Arc::new(
            Shared::new(&cfg.name, cfg.config.clone().into_bytes())
                .with_vm(&cfg.root_id, &cfg.vm_id, cfg.vm_config.clone().into_bytes())
                .with_upstreams(cfg.upstreams.urls.clone())
                .with_pods(pods)
                .with_node(reach.node.clone()),
        );
        // Started and configured once now, so that a bad plugin fails the load, not a request.
        compiled
            .instantiate(engine(), shared.clone(), cfg.deadline)
            .map_err(|e| format!("plugin `{}`: {e}", cfg.name))?;
        let plugin = Arc::new(Self {
            uid: NEXT_UID.fetch_add(1, Relaxed),
            cfg,
            compiled,
            shared,
            failures: AtomicU64::new(0),
            request_time: timing::RequestTime::default(),
        });
        background::start(&plugin);
        Ok(plugin)
    }

    /// The plugin's name.
    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    /// Whether the plugin runs on a request to `route` of this agent (a service plugin runs on
    /// none).
    fn applies(&self, route: &str, agent_id: &str, agent_name: &str) -> bool {
        !self.cfg.service
            && (self.cfg.routes.is_empty() || self.cfg.routes.iter().any(|r| r == route))
            && (self.cfg.agents.is_empty()
                || self
                    .cfg
                    .agents
                    .iter()
                    .any(|a| a == agent_id || a == agent_name))
    }
}

/// The configured plugins, in order.
#[derive(Default)]
pub struct PluginSet {
    plugins: Vec<Arc<Plugin>>,
}

impl PluginSet {
    /// Loads every plugin, with what of the edge they reach; the first that fails refuses the
    /// whole set.
    pub fn load(configs: &[PluginConfig], reach: &Reach) -> Result<Self, String> {
        let plugins = configs
            .iter()
            .map(|c| Plugin::load(c.clone(), reach))
            .collect::<Result<_, _>>()?;
        Ok(Self { plugins })
    }

    /// The tunnels the plugins call pods through, by id (kept open while they are loaded).
    pub fn pod_tunnels(&self) -> impl Iterator<Item = String> + '_ {
        self.plugins
            .iter()
            .flat_map(|p| p.shared.pods.values().map(|r| r.tunnel.id.clone()))
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
        facts: impl FnOnce() -> RequestFacts,
    ) -> Option<PluginRun> {
        let active: Vec<usize> = (0..self.plugins.len())
            .filter(|&i| self.plugins[i].applies(route, agent_id, agent_name))
            .collect();
        if active.is_empty() {
            return None;
        }
        Some(PluginRun::new(self.clone(), active, facts()))
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
    let _ = writeln!(out, "# HELP moltghost_plugin_request_seconds Time a request spent in each plugin (all its calls: context, phases, log and end)\n# TYPE moltghost_plugin_request_seconds histogram");
    for p in &set.plugins {
        p.request_time.render(&p.cfg.name, &mut out);
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
