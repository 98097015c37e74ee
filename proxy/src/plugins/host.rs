//! The Proxy-Wasm host on wasmtime: every import a plugin declares, and one plugin VM.
//!
//! Host calls never trust the plugin: every pointer and length is checked against its memory
//! (`InvalidMemoryAccess`), every map it writes is decoded defensively (`ParseFailure`), and what
//! this host does not offer (HTTP and gRPC calls, foreign functions, queues across VMs) answers
//! `InternalFailure` or `NotFound`, statuses the SDKs handle, never `Unimplemented`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU32, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use wasmtime::{
    Caller, Engine, Extern, FuncType, Linker, Memory, Module, Store, StoreLimits,
    StoreLimitsBuilder, TypedFunc, Val, ValType,
};

use super::abi::{self, BufferType, Headers, MapType, Status};

/// What a request exposes to plugins: headers, body, answer, and the properties.
#[derive(Default)]
pub struct Exchange {
    /// The request's headers (names lowercase), as the runtime will get them.
    pub request_headers: Headers,
    /// The request body, as the runtime will get it (shared with the edge until a plugin
    /// replaces it).
    pub request_body: Bytes,
    /// The response's headers, once known.
    pub response_headers: Headers,
    /// The response body chunk being passed (shared with the edge until a plugin replaces it).
    pub response_body: Bytes,
    /// Properties by name (`request.path`, `moltghost.account`, ...).
    pub properties: Arc<HashMap<&'static str, Vec<u8>>>,
    /// Properties a plugin set.
    pub set_properties: HashMap<String, Vec<u8>>,
    /// A local response a plugin asked for.
    pub local_response: Option<LocalResponse>,
}

/// An answer a plugin sends instead of the runtime's.
#[derive(Debug, Clone)]
pub struct LocalResponse {
    /// Status.
    pub status: u16,
    /// The plugin's reason ("status code details").
    pub details: String,
    /// Body.
    pub body: Vec<u8>,
    /// Extra headers.
    pub headers: Headers,
}

/// What every VM of one plugin shares: its configuration, shared data, metrics, tick period.
pub struct Shared {
    /// The plugin's name (logs, metrics).
    pub name: String,
    /// Its `config`, handed over as the plugin configuration buffer.
    pub config: Vec<u8>,
    /// Key-value store with compare-and-swap, shared by this plugin's VMs.
    pub data: Mutex<HashMap<String, (Vec<u8>, u32)>>,
    /// Metrics the plugin defined: name, kind (0 counter, 1 gauge, 2 histogram), value.
    pub metrics: Mutex<Vec<(String, i32, Arc<AtomicI64>)>>,
    /// Tick period the root context asked for, in milliseconds (0: none).
    pub tick_ms: AtomicU32,
}

impl Shared {
    /// A plugin's shared state.
    pub fn new(name: &str, config: Vec<u8>) -> Self {
        Self {
            name: name.to_owned(),
            config,
            data: Mutex::new(HashMap::new()),
            metrics: Mutex::new(Vec::new()),
            tick_ms: AtomicU32::new(0),
        }
    }
}

/// A VM's host-side state.
pub struct Host {
    limits: StoreLimits,
    shared: Arc<Shared>,
    /// The request being served by the current call, if any.
    pub exchange: Option<Exchange>,
}

/// The calls a VM exports, by name.
struct Exports {
    context_create: TypedFunc<(i32, i32), ()>,
    vm_start: Option<TypedFunc<(i32, i32), i32>>,
    configure: Option<TypedFunc<(i32, i32), i32>>,
    request_headers: Option<TypedFunc<(i32, i32, i32), i32>>,
    request_body: Option<TypedFunc<(i32, i32, i32), i32>>,
    response_headers: Option<TypedFunc<(i32, i32, i32), i32>>,
    response_body: Option<TypedFunc<(i32, i32, i32), i32>>,
    log: Option<TypedFunc<i32, ()>>,
    done: Option<TypedFunc<i32, i32>>,
    delete: Option<TypedFunc<i32, ()>>,
    tick: Option<TypedFunc<i32, ()>>,
}

/// The root context every VM creates first.
pub const ROOT_CONTEXT: i32 = 1;

/// One instance of a plugin: its store, memory and exports.
pub struct Vm {
    store: Store<Host>,
    instance: wasmtime::Instance,
    exports: Exports,
    next_context: i32,
    deadline_ticks: u64,
}

/// A compiled plugin, ready to instantiate quickly.
pub struct Compiled {
    pre: wasmtime::InstancePre<Host>,
    memory_limit: usize,
    /// The plugin handles response bodies (`proxy_on_response_body`).
    pub sees_response_body: bool,
}

/// Which phase a request callback is for.
#[derive(Debug, Clone, Copy)]
pub enum Phase {
    /// `proxy_on_request_headers`.
    RequestHeaders,
    /// `proxy_on_request_body`.
    RequestBody,
    /// `proxy_on_response_headers`.
    ResponseHeaders,
    /// `proxy_on_response_body`.
    ResponseBody,
}

/// Compiles `wasm` and links every import it declares.
pub fn compile(engine: &Engine, wasm: &[u8], memory_limit: usize) -> Result<Compiled, String> {
    let module = Module::new(engine, wasm).map_err(|e| format!("not a valid module: {e:#}"))?;
    link(engine, module, memory_limit)
}

/// Links a compiled module's imports (see [`compile`]).
pub fn link(engine: &Engine, module: Module, memory_limit: usize) -> Result<Compiled, String> {
    let abi = ["proxy_abi_version_0_2_1", "proxy_abi_version_0_2_0"];
    if !module.exports().any(|e| abi.contains(&e.name())) {
        return Err("not a Proxy-Wasm plugin (no proxy_abi_version_0_2_1 or _0_2_0 export)".into());
    }
    let mut linker: Linker<Host> = Linker::new(engine);
    define_host(&mut linker).map_err(|e| format!("linking: {e:#}"))?;
    define_wasi(&mut linker).map_err(|e| format!("linking: {e:#}"))?;
    // Whatever else it imports answers as "not offered here", never a failure to load.
    let mut probe = Store::new(engine, dummy_host());
    for import in module.imports() {
        if let wasmtime::ExternType::Func(ty) = import.ty() {
            if linker
                .get(&mut probe, import.module(), import.name())
                .is_err()
            {
                let status = if import.module() == "wasi_snapshot_preview1" {
                    52 // ENOSYS
                } else {
                    Status::InternalFailure as i32
                };
                define_unsupported(&mut linker, import.module(), import.name(), ty, status)
                    .map_err(|e| format!("linking {}: {e:#}", import.name()))?;
            }
        }
    }
    let pre = linker
        .instantiate_pre(&module)
        .map_err(|e| format!("cannot link: {e:#}"))?;
    let sees_response_body = module.get_export("proxy_on_response_body").is_some();
    Ok(Compiled {
        pre,
        memory_limit,
        sees_response_body,
    })
}

fn dummy_host() -> Host {
    Host {
        limits: StoreLimits::default(),
        shared: Arc::new(Shared::new("", Vec::new())),
        exchange: None,
    }
}

fn define_unsupported(
    linker: &mut Linker<Host>,
    module: &str,
    name: &str,
    ty: FuncType,
    status: i32,
) -> wasmtime::Result<()> {
    let results: Vec<ValType> = ty.results().collect();
    linker.func_new(module, name, ty, move |_, _, out| {
        for (slot, t) in out.iter_mut().zip(&results) {
            *slot = match t {
                ValType::I32 => Val::I32(status),
                ValType::I64 => Val::I64(0),
                ValType::F32 => Val::F32(0),
                ValType::F64 => Val::F64(0),
                _ => Val::null_func_ref(),
            };
        }
        Ok(())
    })?;
    Ok(())
}

impl Compiled {
    /// A new VM: instantiated, started (`_initialize`), its root context created, started and
    /// configured. A plugin that refuses its configuration fails here.
    pub fn instantiate(
        &self,
        engine: &Engine,
        shared: Arc<Shared>,
        deadline: Duration,
    ) -> Result<Vm, String> {
        let host = Host {
            limits: StoreLimitsBuilder::new()
                .memory_size(self.memory_limit)
                .instances(1)
                .build(),
            shared: shared.clone(),
            exchange: None,
        };
        let mut store = Store::new(engine, host);
        store.limiter(|h| &mut h.limits);
        let deadline_ticks = deadline.as_millis().max(1) as u64;
        store.set_epoch_deadline(deadline_ticks);
        store.epoch_deadline_trap();
        let instance = self
            .pre
            .instantiate(&mut store)
            .map_err(|e| format!("instantiation failed: {e:#}"))?;
        let func = |store: &mut Store<Host>, name: &str| instance.get_func(&mut *store, name);
        for init in ["_initialize", "_start"] {
            if let Some(f) = func(&mut store, init) {
                let f = f
                    .typed::<(), ()>(&store)
                    .map_err(|e| format!("{init}: {e}"))?;
                f.call(&mut store, ())
                    .map_err(|e| format!("{init} failed: {e:#}"))?;
                break;
            }
        }
        macro_rules! typed {
            ($name:literal) => {
                match func(&mut store, $name) {
                    Some(f) => Some(
                        f.typed(&store)
                            .map_err(|e| format!("{}: unexpected signature: {e}", $name))?,
                    ),
                    None => None,
                }
            };
        }
        let exports = Exports {
            context_create: typed!("proxy_on_context_create")
                .ok_or("no proxy_on_context_create export")?,
            vm_start: typed!("proxy_on_vm_start"),
            configure: typed!("proxy_on_configure"),
            request_headers: typed!("proxy_on_request_headers"),
            request_body: typed!("proxy_on_request_body"),
            response_headers: typed!("proxy_on_response_headers"),
            response_body: typed!("proxy_on_response_body"),
            log: typed!("proxy_on_log"),
            done: typed!("proxy_on_done"),
            delete: typed!("proxy_on_delete"),
            tick: typed!("proxy_on_tick"),
        };
        let mut vm = Vm {
            store,
            instance,
            exports,
            next_context: ROOT_CONTEXT + 1,
            deadline_ticks,
        };
        vm.arm();
        vm.exports
            .context_create
            .call(&mut vm.store, (ROOT_CONTEXT, 0))
            .map_err(|e| format!("root context: {e:#}"))?;
        if let Some(start) = vm.exports.vm_start.clone() {
            vm.arm();
            let ok = start
                .call(&mut vm.store, (ROOT_CONTEXT, 0))
                .map_err(|e| format!("proxy_on_vm_start: {e:#}"))?;
            if ok == 0 {
                return Err(
                    "the plugin refused to start (proxy_on_vm_start returned false)".into(),
                );
            }
        }
        if let Some(configure) = vm.exports.configure.clone() {
            vm.arm();
            let size = shared.config.len() as i32;
            let ok = configure
                .call(&mut vm.store, (ROOT_CONTEXT, size))
                .map_err(|e| format!("proxy_on_configure: {e:#}"))?;
            if ok == 0 {
                return Err(
                    "the plugin refused its configuration (proxy_on_configure returned false)"
                        .into(),
                );
            }
        }
        Ok(vm)
    }
}

impl Vm {
    /// Gives the next call its full deadline.
    fn arm(&mut self) {
        self.store.set_epoch_deadline(self.deadline_ticks);
    }

    /// Creates a request (HTTP) context under the root context.
    pub fn create_context(&mut self) -> Result<i32, String> {
        let id = self.next_context;
        self.next_context = self.next_context.wrapping_add(1).max(ROOT_CONTEXT + 1);
        self.arm();
        self.exports
            .context_create
            .call(&mut self.store, (id, ROOT_CONTEXT))
            .map_err(|e| format!("{e:#}"))?;
        Ok(id)
    }

    /// Runs one request phase with `exchange` visible to the plugin, and returns it with the
    /// plugin's action. `Err` is a trap, a deadline or a memory limit: the VM must be dropped.
    pub fn phase(
        &mut self,
        phase: Phase,
        context: i32,
        exchange: &mut Exchange,
        end_of_stream: bool,
    ) -> Result<abi::Action, String> {
        let (f, size) = match phase {
            Phase::RequestHeaders => (
                self.exports.request_headers.clone(),
                exchange.request_headers.len(),
            ),
            Phase::RequestBody => (
                self.exports.request_body.clone(),
                exchange.request_body.len(),
            ),
            Phase::ResponseHeaders => (
                self.exports.response_headers.clone(),
                exchange.response_headers.len(),
            ),
            Phase::ResponseBody => (
                self.exports.response_body.clone(),
                exchange.response_body.len(),
            ),
        };
        let Some(f) = f else {
            return Ok(abi::Action::Continue);
        };
        self.store.data_mut().exchange = Some(std::mem::take(exchange));
        self.arm();
        let r = f.call(
            &mut self.store,
            (context, size as i32, i32::from(end_of_stream)),
        );
        *exchange = self.store.data_mut().exchange.take().unwrap_or_default();
        r.map(abi::Action::from_raw).map_err(|e| format!("{e:#}"))
    }

    /// Ends a request context: `proxy_on_log`, `proxy_on_done`, `proxy_on_delete`.
    pub fn finish(&mut self, context: i32, exchange: &mut Exchange) -> Result<(), String> {
        self.store.data_mut().exchange = Some(std::mem::take(exchange));
        let mut result = Ok(());
        for step in 0..3 {
            self.arm();
            let r = match step {
                0 => self
                    .exports
                    .log
                    .clone()
                    .map(|f| f.call(&mut self.store, context)),
                1 => self
                    .exports
                    .done
                    .clone()
                    .map(|f| f.call(&mut self.store, context).map(|_| ())),
                _ => self
                    .exports
                    .delete
                    .clone()
                    .map(|f| f.call(&mut self.store, context)),
            };
            if let Some(Err(e)) = r {
                result = Err(format!("{e:#}"));
                break;
            }
        }
        *exchange = self.store.data_mut().exchange.take().unwrap_or_default();
        result
    }

    /// Delivers a tick to the root context.
    pub fn tick(&mut self) -> Result<(), String> {
        if let Some(f) = self.exports.tick.clone() {
            self.arm();
            f.call(&mut self.store, ROOT_CONTEXT)
                .map_err(|e| format!("{e:#}"))?;
        }
        Ok(())
    }
}

// ------------------------------------------------------------------ guest memory

fn memory(caller: &mut Caller<'_, Host>) -> Option<Memory> {
    match caller.get_export("memory") {
        Some(Extern::Memory(m)) => Some(m),
        _ => None,
    }
}

/// The guest bytes at `ptr..ptr+len`, copied; `None` when out of bounds.
fn read(caller: &mut Caller<'_, Host>, ptr: i32, len: i32) -> Option<Vec<u8>> {
    let mem = memory(caller)?;
    let (ptr, len) = (ptr as u32 as usize, len as u32 as usize);
    mem.data(&*caller)
        .get(ptr..ptr.checked_add(len)?)
        .map(<[u8]>::to_vec)
}

fn write_bytes(caller: &mut Caller<'_, Host>, ptr: i32, bytes: &[u8]) -> Option<()> {
    let mem = memory(caller)?;
    let ptr = ptr as u32 as usize;
    mem.data_mut(&mut *caller)
        .get_mut(ptr..ptr.checked_add(bytes.len())?)?
        .copy_from_slice(bytes);
    Some(())
}

fn write_u32(caller: &mut Caller<'_, Host>, ptr: i32, v: u32) -> Option<()> {
    write_bytes(caller, ptr, &v.to_le_bytes())
}

/// Copies `bytes` into memory the guest allocates, and writes its address and size to the
/// guest's `ret_ptr` and `ret_size`. A trap in the guest's allocator propagates.
fn give(
    caller: &mut Caller<'_, Host>,
    bytes: &[u8],
    ret_ptr: i32,
    ret_size: i32,
) -> wasmtime::Result<Status> {
    let alloc = ["proxy_on_memory_allocate", "malloc"]
        .iter()
        .find_map(|n| caller.get_export(n).and_then(Extern::into_func));
    let Some(alloc) = alloc else {
        return Ok(Status::InternalFailure);
    };
    let alloc = alloc.typed::<i32, i32>(&*caller)?;
    let addr = if bytes.is_empty() {
        0
    } else {
        alloc.call(&mut *caller, bytes.len() as i32)?
    };
    if !bytes.is_empty() && (addr == 0 || write_bytes(caller, addr, bytes).is_none()) {
        return Ok(Status::InvalidMemoryAccess);
    }
    if write_u32(caller, ret_ptr, addr as u32).is_none()
        || write_u32(caller, ret_size, bytes.len() as u32).is_none()
    {
        return Ok(Status::InvalidMemoryAccess);
    }
    Ok(Status::Ok)
}

fn exchange<'a>(caller: &'a mut Caller<'_, Host>) -> Option<&'a mut Exchange> {
    caller.data_mut().exchange.as_mut()
}

fn map(ex: &mut Exchange, t: MapType) -> Option<&mut Headers> {
    match t {
        MapType::RequestHeaders => Some(&mut ex.request_headers),
        MapType::ResponseHeaders => Some(&mut ex.response_headers),
        MapType::RequestTrailers | MapType::ResponseTrailers => None,
    }
}

/// The value, or return the status (from a host call returning `wasmtime::Result<i32>`).
macro_rules! try_status {
    ($e:expr, $s:expr) => {
        match $e {
            Some(v) => v,
            None => return Ok($s as i32),
        }
    };
}

/// The value, or return the status (from a host call returning `i32`).
macro_rules! try_raw {
    ($e:expr, $s:expr) => {
        match $e {
            Some(v) => v,
            None => return $s as i32,
        }
    };
}

// ------------------------------------------------------------------ the env imports

fn define_host(l: &mut Linker<Host>) -> wasmtime::Result<()> {
    l.func_wrap(
        "env",
        "proxy_log",
        |mut c: Caller<'_, Host>, level: i32, ptr: i32, len: i32| -> i32 {
            let Some(msg) = read(&mut c, ptr, len) else {
                return Status::InvalidMemoryAccess as i32;
            };
            let msg = String::from_utf8_lossy(&msg);
            let plugin = c.data().shared.name.as_str();
            match level {
                0 => tracing::trace!(target: "plugin", plugin, "{msg}"),
                1 => tracing::debug!(target: "plugin", plugin, "{msg}"),
                2 => tracing::info!(target: "plugin", plugin, "{msg}"),
                3 => tracing::warn!(target: "plugin", plugin, "{msg}"),
                _ => tracing::error!(target: "plugin", plugin, "{msg}"),
            }
            Status::Ok as i32
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_get_log_level",
        |mut c: Caller<'_, Host>, ret: i32| -> i32 {
            let level = if tracing::enabled!(target: "plugin", tracing::Level::TRACE) {
                0
            } else if tracing::enabled!(target: "plugin", tracing::Level::DEBUG) {
                1
            } else {
                2
            };
            try_raw!(write_u32(&mut c, ret, level), Status::InvalidMemoryAccess);
            Status::Ok as i32
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_get_current_time_nanoseconds",
        |mut c: Caller<'_, Host>, ret: i32| -> i32 {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos() as u64;
            try_raw!(
                write_bytes(&mut c, ret, &now.to_le_bytes()),
                Status::InvalidMemoryAccess
            );
            Status::Ok as i32
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_set_tick_period_milliseconds",
        |c: Caller<'_, Host>, ms: i32| -> i32 {
            c.data().shared.tick_ms.store(ms as u32, Relaxed);
            Status::Ok as i32
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_set_effective_context",
        |_: Caller<'_, Host>, _ctx: i32| -> i32 { Status::Ok as i32 },
    )?;
    l.func_wrap("env", "proxy_done", |_: Caller<'_, Host>| -> i32 {
        Status::Ok as i32
    })?;
    for name in ["proxy_continue_stream", "proxy_close_stream"] {
        l.func_wrap("env", name, |_: Caller<'_, Host>, _stream: i32| -> i32 {
            Status::Ok as i32
        })?;
    }
    // ABI 0.2.0's names for the same.
    for name in [
        "proxy_continue_request",
        "proxy_continue_response",
        "proxy_clear_route_cache",
    ] {
        l.func_wrap("env", name, |_: Caller<'_, Host>| -> i32 {
            Status::Ok as i32
        })?;
    }

    // Header maps.
    l.func_wrap(
        "env",
        "proxy_get_header_map_pairs",
        |mut c: Caller<'_, Host>, t: i32, ret_ptr: i32, ret_size: i32| -> wasmtime::Result<i32> {
            let t = try_status!(MapType::from_raw(t), Status::BadArgument);
            let bytes = {
                let ex = try_status!(exchange(&mut c), Status::NotFound);
                match map(ex, t) {
                    Some(m) => abi::encode_map(m.iter().map(|(k, v)| (k.as_str(), v.as_slice()))),
                    None => abi::encode_map(std::iter::empty()),
                }
            };
            Ok(give(&mut c, &bytes, ret_ptr, ret_size)? as i32)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_set_header_map_pairs",
        |mut c: Caller<'_, Host>, t: i32, ptr: i32, len: i32| -> wasmtime::Result<i32> {
            let t = try_status!(MapType::from_raw(t), Status::BadArgument);
            let raw = try_status!(read(&mut c, ptr, len), Status::InvalidMemoryAccess);
            let pairs = try_status!(abi::decode_map(&raw), Status::ParseFailure);
            if !pairs
                .iter()
                .all(|(k, _)| abi::valid_header_name(k) || k.starts_with(':'))
                || !pairs.iter().all(|(_, v)| abi::valid_header_value(v))
            {
                return Ok(Status::BadArgument as i32);
            }
            let ex = try_status!(exchange(&mut c), Status::NotFound);
            let m = try_status!(map(ex, t), Status::BadArgument);
            *m = pairs;
            Ok(Status::Ok as i32)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_get_header_map_value",
        |mut c: Caller<'_, Host>,
         t: i32,
         kp: i32,
         kl: i32,
         ret_ptr: i32,
         ret_size: i32|
         -> wasmtime::Result<i32> {
            let t = try_status!(MapType::from_raw(t), Status::BadArgument);
            let key = try_status!(read(&mut c, kp, kl), Status::InvalidMemoryAccess);
            let key = String::from_utf8_lossy(&key).to_ascii_lowercase();
            let value = {
                let ex = try_status!(exchange(&mut c), Status::NotFound);
                let m = try_status!(map(ex, t), Status::NotFound);
                try_status!(
                    m.iter().find(|(k, _)| *k == key).map(|(_, v)| v.clone()),
                    Status::NotFound
                )
            };
            Ok(give(&mut c, &value, ret_ptr, ret_size)? as i32)
        },
    )?;
    for (name, mode) in [
        ("proxy_add_header_map_value", 0),
        ("proxy_replace_header_map_value", 1),
    ] {
        l.func_wrap(
            "env",
            name,
            move |mut c: Caller<'_, Host>, t: i32, kp: i32, kl: i32, vp: i32, vl: i32| -> i32 {
                let t = try_raw!(MapType::from_raw(t), Status::BadArgument);
                let key = try_raw!(read(&mut c, kp, kl), Status::InvalidMemoryAccess);
                let value = try_raw!(read(&mut c, vp, vl), Status::InvalidMemoryAccess);
                let key = String::from_utf8_lossy(&key).to_ascii_lowercase();
                if !(abi::valid_header_name(&key) || key.starts_with(':'))
                    || !abi::valid_header_value(&value)
                {
                    return Status::BadArgument as i32;
                }
                let ex = try_raw!(exchange(&mut c), Status::NotFound);
                let m = try_raw!(map(ex, t), Status::BadArgument);
                if mode == 1 {
                    m.retain(|(k, _)| *k != key);
                }
                m.push((key, value));
                Status::Ok as i32
            },
        )?;
    }
    l.func_wrap(
        "env",
        "proxy_remove_header_map_value",
        |mut c: Caller<'_, Host>, t: i32, kp: i32, kl: i32| -> i32 {
            let t = try_raw!(MapType::from_raw(t), Status::BadArgument);
            let key = try_raw!(read(&mut c, kp, kl), Status::InvalidMemoryAccess);
            let key = String::from_utf8_lossy(&key).to_ascii_lowercase();
            let ex = try_raw!(exchange(&mut c), Status::NotFound);
            let m = try_raw!(map(ex, t), Status::BadArgument);
            m.retain(|(k, _)| *k != key);
            Status::Ok as i32
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_get_header_map_size",
        |mut c: Caller<'_, Host>, t: i32, ret: i32| -> i32 {
            let t = try_raw!(MapType::from_raw(t), Status::BadArgument);
            let n = {
                let ex = try_raw!(exchange(&mut c), Status::NotFound);
                map(ex, t).map_or(0, |m| m.len())
            };
            try_raw!(
                write_u32(&mut c, ret, n as u32),
                Status::InvalidMemoryAccess
            );
            Status::Ok as i32
        },
    )?;

    // Buffers.
    l.func_wrap(
        "env",
        "proxy_get_buffer_bytes",
        |mut c: Caller<'_, Host>,
         t: i32,
         start: i32,
         max: i32,
         ret_ptr: i32,
         ret_size: i32|
         -> wasmtime::Result<i32> {
            let t = try_status!(BufferType::from_raw(t), Status::BadArgument);
            let (start, max) = (start as u32 as usize, max as u32 as usize);
            let bytes = {
                let config = c.data().shared.config.clone();
                let buf: &[u8] = match t {
                    BufferType::PluginConfiguration => &config,
                    BufferType::VmConfiguration => &[],
                    BufferType::RequestBody | BufferType::ResponseBody => {
                        let ex = try_status!(c.data().exchange.as_ref(), Status::NotFound);
                        let b = if t == BufferType::RequestBody {
                            &ex.request_body
                        } else {
                            &ex.response_body
                        };
                        let end = start.saturating_add(max).min(b.len());
                        if start > b.len() {
                            return Ok(Status::BadArgument as i32);
                        }
                        let out = b[start..end].to_vec();
                        return Ok(give(&mut c, &out, ret_ptr, ret_size)? as i32);
                    }
                };
                if start > buf.len() {
                    return Ok(Status::BadArgument as i32);
                }
                buf[start..start.saturating_add(max).min(buf.len())].to_vec()
            };
            if bytes.is_empty() && t != BufferType::PluginConfiguration {
                return Ok(Status::NotFound as i32);
            }
            Ok(give(&mut c, &bytes, ret_ptr, ret_size)? as i32)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_set_buffer_bytes",
        |mut c: Caller<'_, Host>, t: i32, start: i32, size: i32, ptr: i32, len: i32| -> i32 {
            let t = try_raw!(BufferType::from_raw(t), Status::BadArgument);
            let data = try_raw!(read(&mut c, ptr, len), Status::InvalidMemoryAccess);
            let ex = try_raw!(exchange(&mut c), Status::NotFound);
            let b = match t {
                BufferType::RequestBody => &mut ex.request_body,
                BufferType::ResponseBody => &mut ex.response_body,
                _ => return Status::BadArgument as i32,
            };
            let (start, size) = (start as u32 as usize, size as u32 as usize);
            if start > b.len() {
                return Status::BadArgument as i32;
            }
            let end = start.saturating_add(size).min(b.len());
            let mut next = Vec::with_capacity(b.len() - (end - start) + data.len());
            next.extend_from_slice(&b[..start]);
            next.extend_from_slice(&data);
            next.extend_from_slice(&b[end..]);
            *b = Bytes::from(next);
            Status::Ok as i32
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_get_buffer_status",
        |mut c: Caller<'_, Host>, t: i32, len_ptr: i32, flags_ptr: i32| -> i32 {
            let t = try_raw!(BufferType::from_raw(t), Status::BadArgument);
            let n = match (t, c.data().exchange.as_ref()) {
                (BufferType::RequestBody, Some(ex)) => ex.request_body.len(),
                (BufferType::ResponseBody, Some(ex)) => ex.response_body.len(),
                (BufferType::PluginConfiguration, _) => c.data().shared.config.len(),
                _ => 0,
            };
            try_raw!(
                write_u32(&mut c, len_ptr, n as u32),
                Status::InvalidMemoryAccess
            );
            try_raw!(write_u32(&mut c, flags_ptr, 0), Status::InvalidMemoryAccess);
            Status::Ok as i32
        },
    )?;

    // The local response: the request ends here with the plugin's answer.
    l.func_wrap(
        "env",
        "proxy_send_local_response",
        |mut c: Caller<'_, Host>,
         status: i32,
         dp: i32,
         dl: i32,
         bp: i32,
         bl: i32,
         hp: i32,
         hl: i32,
         _grpc: i32|
         -> i32 {
            let details = try_raw!(read(&mut c, dp, dl), Status::InvalidMemoryAccess);
            let body = try_raw!(read(&mut c, bp, bl), Status::InvalidMemoryAccess);
            let raw = try_raw!(read(&mut c, hp, hl), Status::InvalidMemoryAccess);
            let headers = try_raw!(abi::decode_map(&raw), Status::ParseFailure);
            if !(200..600).contains(&status) {
                return Status::BadArgument as i32;
            }
            let headers = headers
                .into_iter()
                .filter(|(k, v)| abi::valid_header_name(k) && abi::valid_header_value(v))
                .collect();
            let ex = try_raw!(exchange(&mut c), Status::NotFound);
            ex.local_response = Some(LocalResponse {
                status: status as u16,
                details: String::from_utf8_lossy(&details).into_owned(),
                body,
                headers,
            });
            Status::Ok as i32
        },
    )?;

    // Properties.
    l.func_wrap(
        "env",
        "proxy_get_property",
        |mut c: Caller<'_, Host>,
         pp: i32,
         pl: i32,
         ret_ptr: i32,
         ret_size: i32|
         -> wasmtime::Result<i32> {
            let path = try_status!(read(&mut c, pp, pl), Status::InvalidMemoryAccess);
            let name = try_status!(abi::property_name(&path), Status::BadArgument);
            let value = match name.as_str() {
                "plugin_name" => Some(c.data().shared.name.as_bytes().to_vec()),
                "plugin_root_id" | "root_id" => Some(c.data().shared.name.as_bytes().to_vec()),
                "plugin_vm_id" | "vm_id" => Some(Vec::new()),
                _ => c.data().exchange.as_ref().and_then(|ex| {
                    ex.set_properties
                        .get(&name)
                        .cloned()
                        .or_else(|| ex.properties.get(name.as_str()).cloned())
                        .or_else(|| request_header_property(ex, &name))
                }),
            };
            let value = try_status!(value, Status::NotFound);
            Ok(give(&mut c, &value, ret_ptr, ret_size)? as i32)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_set_property",
        |mut c: Caller<'_, Host>, pp: i32, pl: i32, vp: i32, vl: i32| -> i32 {
            let path = try_raw!(read(&mut c, pp, pl), Status::InvalidMemoryAccess);
            let value = try_raw!(read(&mut c, vp, vl), Status::InvalidMemoryAccess);
            let name = try_raw!(abi::property_name(&path), Status::BadArgument);
            let ex = try_raw!(exchange(&mut c), Status::NotFound);
            ex.set_properties.insert(name, value);
            Status::Ok as i32
        },
    )?;

    // Shared data (compare-and-swap).
    l.func_wrap(
        "env",
        "proxy_get_shared_data",
        |mut c: Caller<'_, Host>,
         kp: i32,
         kl: i32,
         ret_ptr: i32,
         ret_size: i32,
         ret_cas: i32|
         -> wasmtime::Result<i32> {
            let key = try_status!(read(&mut c, kp, kl), Status::InvalidMemoryAccess);
            let key = String::from_utf8_lossy(&key).into_owned();
            let found = c
                .data()
                .shared
                .data
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&key)
                .cloned();
            let (value, cas) = try_status!(found, Status::NotFound);
            let s = give(&mut c, &value, ret_ptr, ret_size)?;
            if s != Status::Ok {
                return Ok(s as i32);
            }
            try_status!(write_u32(&mut c, ret_cas, cas), Status::InvalidMemoryAccess);
            Ok(Status::Ok as i32)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_set_shared_data",
        |mut c: Caller<'_, Host>, kp: i32, kl: i32, vp: i32, vl: i32, cas: i32| -> i32 {
            let key = try_raw!(read(&mut c, kp, kl), Status::InvalidMemoryAccess);
            let value = try_raw!(read(&mut c, vp, vl), Status::InvalidMemoryAccess);
            let key = String::from_utf8_lossy(&key).into_owned();
            let mut data = c
                .data()
                .shared
                .data
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let current = data.get(&key).map_or(0, |(_, cas)| *cas);
            if cas != 0 && cas as u32 != current {
                return Status::CasMismatch as i32;
            }
            data.insert(key, (value, current.wrapping_add(1).max(1)));
            Status::Ok as i32
        },
    )?;

    // Metrics.
    l.func_wrap(
        "env",
        "proxy_define_metric",
        |mut c: Caller<'_, Host>, kind: i32, np: i32, nl: i32, ret: i32| -> i32 {
            if !(0..=2).contains(&kind) {
                return Status::BadArgument as i32;
            }
            let name = try_raw!(read(&mut c, np, nl), Status::InvalidMemoryAccess);
            let name = String::from_utf8_lossy(&name).into_owned();
            let id = {
                let mut m = c
                    .data()
                    .shared
                    .metrics
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                match m.iter().position(|(n, k, _)| *n == name && *k == kind) {
                    Some(i) => i,
                    None => {
                        m.push((name, kind, Arc::new(AtomicI64::new(0))));
                        m.len() - 1
                    }
                }
            };
            try_raw!(
                write_u32(&mut c, ret, id as u32),
                Status::InvalidMemoryAccess
            );
            Status::Ok as i32
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_increment_metric",
        |c: Caller<'_, Host>, id: i32, delta: i64| -> i32 {
            match metric(c.data(), id) {
                Some((2, _)) => Status::BadArgument as i32,
                Some((_, v)) => {
                    v.fetch_add(delta, Relaxed);
                    Status::Ok as i32
                }
                None => Status::NotFound as i32,
            }
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_record_metric",
        |c: Caller<'_, Host>, id: i32, value: i64| -> i32 {
            match metric(c.data(), id) {
                Some((_, v)) => {
                    v.store(value, Relaxed);
                    Status::Ok as i32
                }
                None => Status::NotFound as i32,
            }
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_get_metric",
        |mut c: Caller<'_, Host>, id: i32, ret: i32| -> i32 {
            let v = match metric(c.data(), id) {
                Some((2, _)) => return Status::BadArgument as i32,
                Some((_, v)) => v.load(Relaxed),
                None => return Status::NotFound as i32,
            };
            try_raw!(
                write_bytes(&mut c, ret, &v.to_le_bytes()),
                Status::InvalidMemoryAccess
            );
            Status::Ok as i32
        },
    )?;
    Ok(())
}

/// A plugin's metric by id: its kind (0 counter, 1 gauge, 2 histogram) and its value.
fn metric(host: &Host, id: i32) -> Option<(i32, Arc<AtomicI64>)> {
    let m = host
        .shared
        .metrics
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    m.get(id as u32 as usize)
        .map(|(_, kind, v)| (*kind, v.clone()))
}

/// `request.headers.<name>`-style lookups that Envoy offers as attributes.
fn request_header_property(ex: &Exchange, name: &str) -> Option<Vec<u8>> {
    let (map, key) = if let Some(k) = name.strip_prefix("request.headers.") {
        (&ex.request_headers, k)
    } else if let Some(k) = name.strip_prefix("response.headers.") {
        (&ex.response_headers, k)
    } else if name == "request.headers" {
        return Some(abi::encode_map(
            ex.request_headers
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_slice())),
        ));
    } else if name == "response.headers" {
        return Some(abi::encode_map(
            ex.response_headers
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_slice())),
        ));
    } else {
        return None;
    };
    map.iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(key))
        .map(|(_, v)| v.clone())
}

// ------------------------------------------------------------------ WASI, as little as SDKs use

fn define_wasi(l: &mut Linker<Host>) -> wasmtime::Result<()> {
    const W: &str = "wasi_snapshot_preview1";
    // Standard output and error go to the log; nothing else is writable.
    l.func_wrap(W, "fd_write", |mut c: Caller<'_, Host>, fd: i32, iovs: i32, n: i32, ret: i32| -> i32 {
        if fd != 1 && fd != 2 {
            return 8; // EBADF
        }
        let mut total = 0u32;
        let mut text = Vec::new();
        for i in 0..n.clamp(0, 64) {
            let Some(iov) = read(&mut c, iovs.wrapping_add(i * 8), 8) else { return 21 }; // EFAULT
            let ptr = i32::from_le_bytes(iov[0..4].try_into().unwrap_or_default());
            let len = i32::from_le_bytes(iov[4..8].try_into().unwrap_or_default());
            let Some(bytes) = read(&mut c, ptr, len) else { return 21 };
            total = total.wrapping_add(bytes.len() as u32);
            text.extend_from_slice(&bytes);
        }
        tracing::info!(target: "plugin", plugin = %c.data().shared.name, "{}", String::from_utf8_lossy(&text).trim_end());
        if write_u32(&mut c, ret, total).is_none() {
            return 21;
        }
        0
    })?;
    l.func_wrap(
        W,
        "random_get",
        |mut c: Caller<'_, Host>, ptr: i32, len: i32| -> i32 {
            let len = len as u32 as usize;
            if len > 1 << 20 {
                return 28; // EINVAL
            }
            let bytes: Vec<u8> = (0..len).map(|_| rand::random()).collect();
            if write_bytes(&mut c, ptr, &bytes).is_none() {
                return 21;
            }
            0
        },
    )?;
    l.func_wrap(
        W,
        "clock_time_get",
        |mut c: Caller<'_, Host>, _id: i32, _precision: i64, ret: i32| -> i32 {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos() as u64;
            if write_bytes(&mut c, ret, &now.to_le_bytes()).is_none() {
                return 21;
            }
            0
        },
    )?;
    for name in ["environ_sizes_get", "args_sizes_get"] {
        l.func_wrap(
            W,
            name,
            |mut c: Caller<'_, Host>, count: i32, size: i32| -> i32 {
                if write_u32(&mut c, count, 0).is_none() || write_u32(&mut c, size, 0).is_none() {
                    return 21;
                }
                0
            },
        )?;
    }
    for name in ["environ_get", "args_get"] {
        l.func_wrap(W, name, |_: Caller<'_, Host>, _: i32, _: i32| -> i32 { 0 })?;
    }
    l.func_wrap(W, "sched_yield", |_: Caller<'_, Host>| -> i32 { 0 })?;
    l.func_wrap(
        W,
        "proc_exit",
        |_: Caller<'_, Host>, code: i32| -> wasmtime::Result<()> {
            Err(wasmtime::Error::msg(format!(
                "the plugin exited with code {code}"
            )))
        },
    )?;
    Ok(())
}

/// A module that imports every host call this host defines and exports `call_<n>` forwarding to
/// the `n`th (in [`host_calls`] order), plus memory and an allocator: fuzzers and tests use it
/// to drive host calls with arbitrary pointers and lengths.
pub fn host_call_module() -> String {
    let mut imports = String::new();
    let mut exports = String::new();
    let sig = |tys: &[ValType]| -> Vec<&'static str> {
        tys.iter()
            .map(|t| match t {
                ValType::I64 => "i64",
                _ => "i32",
            })
            .collect()
    };
    for (i, (module, name, params, results)) in host_calls().into_iter().enumerate() {
        let (p, r) = (sig(&params), sig(&results));
        let decl = format!("(param {}) (result {})", p.join(" "), r.join(" "))
            .replace("(param )", "")
            .replace("(result )", "");
        imports.push_str(&format!(
            "(import \"{module}\" \"{name}\" (func $h{i} {decl}))\n"
        ));
        let gets: String = (0..p.len()).map(|j| format!("(local.get {j}) ")).collect();
        exports.push_str(&format!(
            "(func (export \"call_{i}\") {decl} {gets}(call $h{i}))\n"
        ));
    }
    format!(
        "(module\n{imports}(memory (export \"memory\") 2 4)\n(global $next (mut i32) (i32.const 4096))\n\
         (func (export \"proxy_on_memory_allocate\") (param i32) (result i32)\n\
           (local $at i32) (local.set $at (global.get $next))\n\
           (if (i32.gt_u (i32.add (local.get $at) (local.get 0)) (i32.const 131072)) (then (return (i32.const 0))))\n\
           (global.set $next (i32.add (local.get $at) (local.get 0))) (local.get $at))\n\
         (func (export \"proxy_abi_version_0_2_1\"))\n\
         (func (export \"proxy_on_context_create\") (param i32 i32))\n{exports})"
    )
}

/// Every host call this host defines: module, name, parameter and result types.
pub fn host_calls() -> Vec<(String, String, Vec<ValType>, Vec<ValType>)> {
    let engine = Engine::default();
    let mut linker: Linker<Host> = Linker::new(&engine);
    define_host(&mut linker).expect("host calls link");
    define_wasi(&mut linker).expect("WASI calls link");
    let mut store = Store::new(&engine, dummy_host());
    let funcs: Vec<(String, String, wasmtime::Func)> = linker
        .iter(&mut store)
        .filter_map(|(m, n, e)| Some((m.to_owned(), n.to_owned(), e.into_func()?)))
        .collect();
    let mut out: Vec<_> = funcs
        .into_iter()
        .map(|(m, n, f)| {
            let ty = f.ty(&store);
            (m, n, ty.params().collect(), ty.results().collect())
        })
        .collect();
    out.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
    out
}

impl Vm {
    /// Calls the export `name` with `args` (each converted to the parameter's type) while
    /// `exchange` is visible, for fuzzers and tests. Traps come back as `Err`.
    pub fn call_raw(
        &mut self,
        name: &str,
        args: &[i64],
        exchange: &mut Exchange,
    ) -> Result<(), String> {
        let instance_func = self
            .exports_func(name)
            .ok_or_else(|| format!("no export {name}"))?;
        let ty = instance_func.ty(&self.store);
        let params: Vec<Val> = ty
            .params()
            .zip(args.iter().chain(std::iter::repeat(&0)))
            .map(|(t, a)| match t {
                ValType::I64 => Val::I64(*a),
                _ => Val::I32(*a as i32),
            })
            .collect();
        let mut results: Vec<Val> = ty.results().map(|_| Val::I32(0)).collect();
        self.store.data_mut().exchange = Some(std::mem::take(exchange));
        self.arm();
        let r = instance_func.call(&mut self.store, &params, &mut results);
        *exchange = self.store.data_mut().exchange.take().unwrap_or_default();
        r.map_err(|e| format!("{e:#}"))
    }

    fn exports_func(&mut self, name: &str) -> Option<wasmtime::Func> {
        self.instance.get_func(&mut self.store, name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_host_call_survives_wild_pointers() {
        let engine = Engine::default();
        let compiled = compile(&engine, host_call_module().as_bytes(), 1 << 20).unwrap();
        let shared = Arc::new(Shared::new("t", b"{}".to_vec()));
        let mut vm = compiled
            .instantiate(&engine, shared, Duration::from_secs(1))
            .unwrap();
        let mut ex = Exchange {
            request_headers: vec![("a".into(), b"b".to_vec())],
            request_body: Bytes::from_static(b"body"),
            ..Exchange::default()
        };
        let n = host_calls().len();
        for i in 0..n {
            for args in [
                [0i64; 10],
                [-1; 10],
                [70_000, 5, 1 << 31, 3, 131_071, 9, 0, 0, 0, 0],
            ] {
                // Traps (proc_exit) are fine; panics are not.
                let _ = vm.call_raw(&format!("call_{i}"), &args, &mut ex);
            }
        }
    }
}
