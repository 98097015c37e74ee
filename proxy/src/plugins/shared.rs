//! What every VM of one plugin shares: its configuration, ids and metrics; and the shared data
//! of its VM id, which, as on Envoy, every plugin with the same `vm_id` shares (and which
//! outlives reloads). Each is bounded, so that a plugin cannot grow the edge's memory by
//! calling the host in a loop.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};

use super::abi::Status;

/// Shared data a plugin may hold, keys and values together.
pub const MAX_SHARED_DATA_BYTES: usize = 64 << 20;
/// Metrics a plugin may define.
pub const MAX_METRICS: usize = 1_024;
/// The longest metric name (Envoy's names with tags stay far below).
pub const MAX_METRIC_NAME: usize = 1_024;

/// Log lines a plugin may write per second (`proxy_log` and standard output and error); past
/// it lines are dropped, and how many is said once the second is over.
pub const LOG_LINES_PER_SECOND: u32 = 200;

/// A metric's kind, as `proxy_define_metric` numbers them.
pub const HISTOGRAM: i32 = 2;

/// What every VM of one plugin shares: its configuration, shared data, metrics, tick period.
pub struct Shared {
    /// The plugin's name (logs, metrics).
    pub name: String,
    /// Its `config`, handed over as the plugin configuration buffer.
    pub config: Vec<u8>,
    /// The root id (`plugin_root_id`): the SDKs that host several root contexts in one module
    /// (AssemblyScript's) pick one by it.
    pub root_id: String,
    /// The VM id (`plugin_vm_id`): plugins with the same one share data.
    pub vm_id: String,
    /// The VM configuration buffer (`proxy_on_vm_start`).
    pub vm_config: Vec<u8>,
    /// Where `proxy_http_call` may go, by name (Envoy's clusters).
    pub upstreams: HashMap<String, url::Url>,
    /// The pods among them, reached through their tunnels (HTTP calls only).
    pub pods: HashMap<String, Arc<super::pod_call::PodRoute>>,
    /// The edge as Envoy's `node` (its id and metadata).
    pub node: Arc<super::properties::Node>,
    data: Arc<Mutex<Data>>,
    metrics: Mutex<Vec<Metric>>,
    /// Tick period the root context asked for, in milliseconds (0: none).
    pub tick_ms: AtomicU32,
    /// Where the plugin's background instance is woken for a shared queue it registered.
    wake: Mutex<Option<super::queues::Wake>>,
    /// A limit was hit and said so in the log (once per plugin, not once per call).
    warned: AtomicBool,
    /// Calls the plugin made that this host does not offer, each logged once.
    unsupported: Mutex<std::collections::HashSet<String>>,
    /// This second's log lines: when it began, lines written, lines dropped.
    log_window: Mutex<(std::time::Instant, u32, u64)>,
}

/// Key-value store with compare-and-swap.
#[derive(Default)]
struct Data {
    entries: HashMap<String, (Vec<u8>, u32)>,
    bytes: usize,
}

/// One metric a plugin defined.
pub struct Metric {
    /// Its name as the plugin gave it.
    pub name: String,
    /// 0 counter, 1 gauge, 2 histogram.
    pub kind: i32,
    /// Its value (a histogram keeps the last recorded one).
    pub value: Arc<AtomicI64>,
}

impl Shared {
    /// A plugin's shared state, with the empty root and VM ids (Envoy's defaults).
    pub fn new(name: &str, config: Vec<u8>) -> Self {
        Self {
            name: name.to_owned(),
            config,
            root_id: String::new(),
            vm_id: String::new(),
            vm_config: Vec::new(),
            upstreams: HashMap::new(),
            pods: HashMap::new(),
            node: Arc::default(),
            data: data_of(""),
            metrics: Mutex::new(Vec::new()),
            tick_ms: AtomicU32::new(0),
            wake: Mutex::new(None),
            warned: AtomicBool::new(false),
            unsupported: Mutex::default(),
            log_window: Mutex::new((std::time::Instant::now(), 0, 0)),
        }
    }

    /// The same, with these root and VM ids and VM configuration.
    pub fn with_vm(mut self, root_id: &str, vm_id: &str, vm_config: Vec<u8>) -> Self {
        self.root_id = root_id.to_owned();
        self.data = data_of(vm_id);
        self.vm_id = vm_id.to_owned();
        self.vm_config = vm_config;
        self
    }

    /// The same, with these upstreams for HTTP calls.
    pub fn with_upstreams(mut self, upstreams: HashMap<String, url::Url>) -> Self {
        self.upstreams = upstreams;
        self
    }

    /// The same, with these pods among the upstreams.
    pub fn with_pods(mut self, pods: HashMap<String, Arc<super::pod_call::PodRoute>>) -> Self {
        self.pods = pods;
        self
    }

    /// With the edge as `node`.
    pub fn with_node(mut self, node: Arc<super::properties::Node>) -> Self {
        self.node = node;
        self
    }

    /// Where a queue this plugin registers wakes it (its background instance), once that runs.
    pub fn wake(&self) -> Option<super::queues::Wake> {
        lock(&self.wake).clone()
    }

    /// Sets where queues this plugin registers wake it.
    pub fn set_wake(&self, wake: super::queues::Wake) {
        *lock(&self.wake) = Some(wake);
    }

    /// A shared value and its compare-and-swap token.
    pub fn get_data(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        lock(&self.data).entries.get(key).cloned()
    }

    /// Sets a shared value if `cas` is 0 or still current. Beyond [`MAX_SHARED_DATA_BYTES`]
    /// the value is refused with `InternalFailure` (what the SDKs report as an error).
    pub fn set_data(&self, key: String, value: Vec<u8>, cas: u32) -> Status {
        let mut data = lock(&self.data);
        let (current, old_len) = data
            .entries
            .get(&key)
            .map_or((0, 0), |(v, c)| (*c, key.len() + v.len()));
        if cas != 0 && cas != current {
            return Status::CasMismatch;
        }
        let bytes = data.bytes - old_len + key.len() + value.len();
        if bytes > MAX_SHARED_DATA_BYTES {
            drop(data);
            self.limit_hit("shared data", MAX_SHARED_DATA_BYTES);
            return Status::InternalFailure;
        }
        data.bytes = bytes;
        data.entries
            .insert(key, (value, current.wrapping_add(1).max(1)));
        Status::Ok
    }

    /// The id of the metric `name` of `kind`, defined now if new.
    pub fn define_metric(&self, kind: i32, name: &[u8]) -> Result<u32, Status> {
        if !(0..=HISTOGRAM).contains(&kind) || name.len() > MAX_METRIC_NAME {
            return Err(Status::BadArgument);
        }
        let name = String::from_utf8_lossy(name);
        let mut metrics = lock(&self.metrics);
        if let Some(i) = metrics
            .iter()
            .position(|m| m.name == name && m.kind == kind)
        {
            return Ok(i as u32);
        }
        if metrics.len() >= MAX_METRICS {
            drop(metrics);
            self.limit_hit("metrics", MAX_METRICS);
            return Err(Status::InternalFailure);
        }
        metrics.push(Metric {
            name: name.into_owned(),
            kind,
            value: Arc::new(AtomicI64::new(0)),
        });
        Ok(metrics.len() as u32 - 1)
    }

    /// A metric by id: its kind and value.
    pub fn metric(&self, id: u32) -> Option<(i32, Arc<AtomicI64>)> {
        lock(&self.metrics)
            .get(id as usize)
            .map(|m| (m.kind, m.value.clone()))
    }

    /// Calls `f` with every metric defined so far.
    pub fn each_metric(&self, mut f: impl FnMut(&Metric)) {
        lock(&self.metrics).iter().for_each(&mut f);
    }

    /// Notes that the plugin called `call`, which this host does not offer, answering
    /// `status`: logged the first time only.
    pub fn unsupported(&self, call: &str, status: i32) {
        if lock(&self.unsupported).insert(call.to_owned()) {
            tracing::warn!(plugin = %self.name, call, status, "plugin called a host function this edge does not offer (logged once per call)");
        }
    }

    /// Whether the plugin may write one more log line now ([`LOG_LINES_PER_SECOND`]).
    pub fn may_log(&self) -> bool {
        let mut w = lock(&self.log_window);
        let now = std::time::Instant::now();
        if now.duration_since(w.0) >= std::time::Duration::from_secs(1) {
            if w.2 > 0 {
                tracing::warn!(plugin = %self.name, dropped = w.2, "plugin log lines dropped (over {LOG_LINES_PER_SECOND} a second)");
            }
            *w = (now, 0, 0);
        }
        if w.1 < LOG_LINES_PER_SECOND {
            w.1 += 1;
            true
        } else {
            w.2 += 1;
            false
        }
    }

    fn limit_hit(&self, what: &str, limit: usize) {
        if !self.warned.swap(true, Relaxed) {
            tracing::warn!(plugin = %self.name, what, limit, "plugin reached a host limit; further calls over it are refused (logged once)");
        }
    }
}

/// The shared data of `vm_id`, for the life of the process (few ids are ever configured).
fn data_of(vm_id: &str) -> Arc<Mutex<Data>> {
    static BY_VM: std::sync::OnceLock<Mutex<HashMap<String, Arc<Mutex<Data>>>>> =
        std::sync::OnceLock::new();
    lock(BY_VM.get_or_init(Default::default))
        .entry(vm_id.to_owned())
        .or_default()
        .clone()
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_data_is_bounded_and_counts_replacements_once() {
        let s = Shared::new("p", Vec::new()).with_vm("", "bounded", Vec::new());
        let big = vec![0u8; MAX_SHARED_DATA_BYTES / 4];
        for _ in 0..10 {
            // The same key replaced: the old value's room is given back.
            assert_eq!(s.set_data("k".into(), big.clone(), 0), Status::Ok);
        }
        for k in ["a", "b"] {
            assert_eq!(s.set_data(k.into(), big.clone(), 0), Status::Ok);
        }
        assert_eq!(
            s.set_data("c".into(), big.clone(), 0),
            Status::InternalFailure
        );
        assert_eq!(s.set_data("c".into(), b"small".to_vec(), 0), Status::Ok);
        let (_, cas) = s.get_data("k").unwrap();
        assert_eq!(cas, 10);
        assert_eq!(s.set_data("k".into(), Vec::new(), 3), Status::CasMismatch);
    }

    #[test]
    fn plugins_with_one_vm_id_share_data_and_others_do_not() {
        let a = Shared::new("a", Vec::new()).with_vm("", "vm-1", Vec::new());
        let b = Shared::new("b", Vec::new()).with_vm("", "vm-1", Vec::new());
        let c = Shared::new("c", Vec::new()).with_vm("", "vm-2", Vec::new());
        assert_eq!(a.set_data("k".into(), b"v".to_vec(), 0), Status::Ok);
        assert_eq!(b.get_data("k").map(|(v, _)| v), Some(b"v".to_vec()));
        assert_eq!(c.get_data("k"), None);
    }

    #[test]
    fn log_lines_are_rate_limited() {
        let s = Shared::new("p", Vec::new());
        let allowed = (0..1_000).filter(|_| s.may_log()).count();
        assert_eq!(allowed, LOG_LINES_PER_SECOND as usize);
    }

    #[test]
    fn metrics_are_bounded_in_number_and_name() {
        let s = Shared::new("p", Vec::new());
        for i in 0..MAX_METRICS {
            assert_eq!(s.define_metric(0, format!("m{i}").as_bytes()), Ok(i as u32));
        }
        assert_eq!(s.define_metric(0, b"m7"), Ok(7), "an existing one is found");
        assert_eq!(s.define_metric(0, b"new"), Err(Status::InternalFailure));
        assert_eq!(
            s.define_metric(1, &vec![b'x'; MAX_METRIC_NAME + 1]),
            Err(Status::BadArgument)
        );
        assert_eq!(s.define_metric(3, b"m"), Err(Status::BadArgument));
    }
}
