//! The Proxy-Wasm host on wasmtime: one plugin VM (compile, link, instantiate, run a phase).
//! The host calls it links are defined in [`super::calls`] (the ABI's `env` imports, in groups)
//! and [`super::wasi`]; whatever else a module imports (calls of other ABI versions) answers
//! `InternalFailure` (`ENOSYS` for WASI), a status the SDKs handle, never a failure to load.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use wasmtime::{
    Engine, FuncType, Linker, Module, Store, StoreLimits, StoreLimitsBuilder, TypedFunc,
    UpdateDeadline, Val, ValType,
};

use super::abi::{self, Headers, Status};
use super::callout::{Answer, CallRequest, CallResponse};
use super::deadline::{self, CallClock, Expiry};
use super::grpc_stream::{StreamEvent, StreamOp};
use super::resume::Resume;
pub use super::shared::Shared;

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
    /// Trailers plugins added to the request: seen by later plugins and phases, not sent (the
    /// runtime gets a whole body with its length, and no trailers).
    pub request_trailers: Headers,
    /// Trailers plugins added to the response: as for the request's.
    pub response_trailers: Headers,
    /// What the edge knows of the request, for properties.
    pub facts: Option<Arc<super::properties::RequestFacts>>,
    /// A plugin edited the request's headers (they must be put back into the request).
    pub request_headers_edited: bool,
    /// A plugin edited the answer's headers.
    pub response_headers_edited: bool,
    /// Properties a plugin set.
    pub set_properties: HashMap<String, Vec<u8>>,
    /// A local response a plugin asked for.
    pub local_response: Option<LocalResponse>,
    /// A plugin reset the stream (`proxy_close_stream`).
    pub reset: bool,
    /// The answer's status, once its header is known (`response.code`).
    pub response_code: Option<u16>,
    /// Bytes of the answer's body so far (`response.size`).
    pub response_size: u64,
    /// A plugin resumed the stream (`proxy_continue_stream`, or 0.2.0's
    /// `proxy_continue_request`/`_response`).
    pub continued: bool,
    /// The answer to an HTTP call, while its callback runs.
    pub call_response: Option<CallResponse>,
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

/// A VM's host-side state.
pub struct Host {
    limits: StoreLimits,
    pub(super) shared: Arc<Shared>,
    /// The request being served by the current call, if any.
    pub exchange: Option<Exchange>,
    /// The context whose request `exchange` is (`None`: the root context's own callback).
    own: Option<i32>,
    /// The context the current callback chose to act on (`proxy_set_effective_context`).
    effective: Option<i32>,
    /// The live contexts of this VM (the root context's included).
    contexts: HashSet<i32>,
    /// What the current callback asked of other requests' contexts.
    resumes: Vec<(i32, Resume)>,
    /// Standard output and error written so far without a newline.
    pub(super) stdio: [Vec<u8>; 2],
    /// HTTP calls the plugin asked for, to be made once the current call returns.
    pub(super) calls_out: Vec<CallRequest>,
    /// The last HTTP call token handed out.
    pub(super) next_token: u32,
    /// The plugin's memory and allocator (`proxy_on_memory_allocate` or `malloc`), found once
    /// at instantiation: host calls use them on every request.
    pub(super) memory: Option<wasmtime::Memory>,
    pub(super) alloc: Option<TypedFunc<i32, i32>>,
    /// What `proxy_get_status` answers: the status of the call whose callback runs.
    pub(super) call_status: (u32, String),
    /// Calls the plugin cancelled while they were in flight: their answers are dropped.
    pub(super) cancelled: Vec<u32>,
    /// What the plugin asked of its gRPC streams since this was last taken.
    pub(super) stream_ops: Vec<StreamOp>,
    /// The gRPC streams the plugin has, by token.
    pub(super) streams: HashMap<u32, StreamState>,
    /// The current call's deadline (CPU time) and how far it has run past it.
    deadline: Duration,
    clock: CallClock,
}

/// One gRPC stream as the host knows it.
#[derive(Debug, Default)]
pub struct StreamState {
    /// Bytes sent and not yet taken by the connection.
    pub queued: Arc<std::sync::atomic::AtomicUsize>,
    /// The plugin half-closed it (or the edge reset it).
    pub local_closed: bool,
    /// Its close was delivered.
    pub remote_closed: bool,
}

/// What a plugin asked for during a callback, for the owner of its contexts to carry out.
#[derive(Debug, Default)]
pub struct Outbox {
    /// HTTP and gRPC unary calls to make.
    pub calls: Vec<CallRequest>,
    /// What to do with its gRPC streams.
    pub streams: Vec<StreamOp>,
    /// What it asked of other requests' contexts, by context id.
    pub resumes: Vec<(i32, Resume)>,
}

impl Outbox {
    /// Carries out what was asked of the streams in `streams` (made on the first open; reply
    /// messages up to `max_message` bytes), and gives back the calls to make.
    pub fn open_streams(
        self,
        streams: &mut Option<super::grpc_stream::Streams>,
        max_message: usize,
    ) -> Vec<CallRequest> {
        if !self.streams.is_empty() {
            streams
                .get_or_insert_with(|| super::grpc_stream::Streams::new(max_message))
                .apply(self.streams);
        }
        self.calls
    }
}

/// Which callback a call's answer goes to, with its arguments after the context and token.
enum Callback {
    /// `proxy_on_http_call_response`: headers, body size, trailers.
    Http((i32, i32, i32)),
    /// One of the gRPC callbacks, with its one argument.
    Grpc(GrpcCallback, i32),
}

/// The gRPC callbacks, all `(root context, token, n)`.
#[derive(Clone, Copy)]
enum GrpcCallback {
    /// `proxy_on_grpc_receive`: the message's size.
    Receive,
    /// `proxy_on_grpc_close`: the gRPC status code.
    Close,
    /// `proxy_on_grpc_receive_initial_metadata`: the number of headers.
    InitialMetadata,
    /// `proxy_on_grpc_receive_trailing_metadata`: the number of trailers.
    TrailingMetadata,
}

/// What a callback for a call or stream is given: the answer it may read, the status
/// `proxy_get_status` then gives, and which callback it is.
type Delivery = (CallResponse, Option<(u32, String)>, Callback);

/// `proxy_on_http_call_response(root, token, headers, body size, trailers)`.
type CallResponseFn = TypedFunc<(i32, i32, i32, i32, i32), ()>;

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
    http_call_response: Option<CallResponseFn>,
    grpc_receive: Option<TypedFunc<(i32, i32, i32), ()>>,
    grpc_close: Option<TypedFunc<(i32, i32, i32), ()>>,
    grpc_initial_metadata: Option<TypedFunc<(i32, i32, i32), ()>>,
    grpc_trailing_metadata: Option<TypedFunc<(i32, i32, i32), ()>>,
    queue_ready: Option<TypedFunc<(i32, i32), ()>>,
}

impl Exports {
    /// The callback of a request phase, if the plugin exports it.
    fn phase(&self, phase: Phase) -> Option<&TypedFunc<(i32, i32, i32), i32>> {
        match phase {
            Phase::RequestHeaders => self.request_headers.as_ref(),
            Phase::RequestBody => self.request_body.as_ref(),
            Phase::ResponseHeaders => self.response_headers.as_ref(),
            Phase::ResponseBody => self.response_body.as_ref(),
        }
    }
}

/// The root context every VM creates first.
pub const ROOT_CONTEXT: i32 = 1;

/// One instance of a plugin: its store, memory and exports.
pub struct Vm {
    store: Store<Host>,
    instance: wasmtime::Instance,
    exports: Exports,
    next_context: i32,
    deadline: Duration,
}

/// The deadline of the calls that start a VM (`_initialize`, the root context, `proxy_on_vm_start`,
/// `proxy_on_configure`): start-up work such as a Go runtime's is not a request's.
const START_DEADLINE: Duration = Duration::from_secs(1);

/// Epoch ticks (one every [`deadline::TICK`]) in `d`, at least one.
fn ticks(d: Duration) -> u64 {
    d.as_nanos().div_ceil(deadline::TICK.as_nanos()).max(1) as u64
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

impl Phase {
    /// A headers phase: pausing it waits for a resume (a paused body is buffered instead).
    pub fn is_headers(self) -> bool {
        matches!(self, Self::RequestHeaders | Self::ResponseHeaders)
    }
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
    super::calls::define(&mut linker).map_err(|e| format!("linking: {e:#}"))?;
    super::wasi::define(&mut linker).map_err(|e| format!("linking: {e:#}"))?;
    // Whatever else it imports answers as "not offered here", never a failure to load.
    let mut probe = Store::new(engine, dummy_host());
    for import in module.imports() {
        if let wasmtime::ExternType::Func(ty) = import.ty() {
            if linker
                .get(&mut probe, import.module(), import.name())
                .is_err()
            {
                let status = if import.module().starts_with("wasi") {
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

impl Host {
    /// The context the current callback acts on when it is not the one whose request is
    /// visible: another request's (set by `proxy_set_effective_context`), reached only to
    /// resume, answer or reset it.
    pub(super) fn foreign(&self) -> Option<i32> {
        let own = self.own.unwrap_or(ROOT_CONTEXT);
        self.effective.filter(|&e| e != own)
    }

    /// The request the current callback acts on, if it may see one.
    pub(super) fn request(&mut self) -> Option<&mut Exchange> {
        if self.foreign().is_some() {
            return None;
        }
        self.exchange.as_mut()
    }

    /// As [`Self::request`], to read.
    pub(super) fn request_ref(&self) -> Option<&Exchange> {
        if self.foreign().is_some() {
            return None;
        }
        self.exchange.as_ref()
    }

    /// `proxy_set_effective_context`: `false` for a context this VM does not have.
    pub(super) fn set_effective(&mut self, context: i32) -> bool {
        let known = self.contexts.contains(&context);
        if known {
            self.effective = Some(context);
        }
        known
    }

    /// Asks `resume` of another request's context (the paused request gets it through
    /// [`super::resume::wake`]).
    pub(super) fn resume_other(&mut self, context: i32, resume: Resume) {
        self.resumes.push((context, resume));
    }

    fn new(limits: StoreLimits, shared: Arc<Shared>, deadline: Duration) -> Self {
        Self {
            limits,
            shared,
            exchange: None,
            own: None,
            effective: None,
            contexts: HashSet::from([ROOT_CONTEXT]),
            resumes: Vec::new(),
            stdio: Default::default(),
            calls_out: Vec::new(),
            next_token: 0,
            memory: None,
            alloc: None,
            call_status: (0, String::new()),
            cancelled: Vec::new(),
            stream_ops: Vec::new(),
            streams: HashMap::new(),
            deadline,
            clock: CallClock::default(),
        }
    }
}

fn dummy_host() -> Host {
    Host::new(
        StoreLimits::default(),
        Arc::new(Shared::new("", Vec::new())),
        Duration::ZERO,
    )
}

fn define_unsupported(
    linker: &mut Linker<Host>,
    module: &str,
    name: &str,
    ty: FuncType,
    status: i32,
) -> wasmtime::Result<()> {
    let results: Vec<ValType> = ty.results().collect();
    let call = name.to_owned();
    linker.func_new(module, name, ty, move |c, _, out| {
        c.data().shared.unsupported(&call, status);
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
        // Start-up calls get at least START_DEADLINE; requests get `deadline` afterwards.
        let start_deadline = deadline.max(START_DEADLINE);
        let limits = StoreLimitsBuilder::new()
            .memory_size(self.memory_limit)
            .instances(1)
            .build();
        let host = Host::new(limits, shared.clone(), start_deadline);
        let mut store = Store::new(engine, host);
        store.limiter(|h| &mut h.limits);
        deadline::note_call();
        store.set_epoch_deadline(ticks(start_deadline));
        store.epoch_deadline_callback(|mut cx| {
            let host = cx.data_mut();
            let window = host.deadline;
            match host.clock.expired(window, deadline::thread_cpu_time()) {
                Expiry::Extend => Ok(UpdateDeadline::Continue(ticks(window))),
                Expiry::Stop => Err(wasmtime::Error::msg(format!(
                    "the call ran past its deadline ({window:?} of CPU time)"
                ))),
            }
        });
        let instance = self
            .pre
            .instantiate(&mut store)
            .map_err(|e| format!("instantiation failed: {e:#}"))?;
        let memory = instance.get_memory(&mut store, "memory");
        let alloc = ["proxy_on_memory_allocate", "malloc"]
            .iter()
            .find_map(|n| instance.get_typed_func::<i32, i32>(&mut store, n).ok());
        let host = store.data_mut();
        (host.memory, host.alloc) = (memory, alloc);
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
            http_call_response: typed!("proxy_on_http_call_response"),
            grpc_receive: typed!("proxy_on_grpc_receive"),
            grpc_close: typed!("proxy_on_grpc_close"),
            grpc_initial_metadata: typed!("proxy_on_grpc_receive_initial_metadata"),
            grpc_trailing_metadata: typed!("proxy_on_grpc_receive_trailing_metadata"),
            queue_ready: typed!("proxy_on_queue_ready"),
        };
        let mut vm = Vm {
            store,
            instance,
            exports,
            next_context: ROOT_CONTEXT + 1,
            deadline: start_deadline,
        };
        vm.arm();
        vm.exports
            .context_create
            .call(&mut vm.store, (ROOT_CONTEXT, 0))
            .map_err(|e| {
                format!(
                    "root context under root_id {:?} (a module with several root contexts picks one by it): {e:#}",
                    shared.root_id
                )
            })?;
        if let Some(start) = vm.exports.vm_start.clone() {
            vm.arm();
            let size = shared.vm_config.len() as i32;
            let ok = start
                .call(&mut vm.store, (ROOT_CONTEXT, size))
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
        vm.deadline = deadline;
        Ok(vm)
    }
}

impl Vm {
    /// Gives the next call its full deadline.
    fn arm(&mut self) {
        deadline::note_call();
        let host = self.store.data_mut();
        host.deadline = self.deadline;
        host.effective = None;
        host.clock.reset();
        self.store.set_epoch_deadline(ticks(self.deadline));
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
        self.store.data_mut().contexts.insert(id);
        Ok(id)
    }

    /// Whether requests other than `context`'s have contexts in this VM (one of them could
    /// resume it).
    pub fn others_live(&self, context: i32) -> bool {
        let contexts = &self.store.data().contexts;
        contexts.iter().any(|&c| c != context && c != ROOT_CONTEXT)
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
        let size = match phase {
            Phase::RequestHeaders => exchange.request_headers.len(),
            Phase::RequestBody => exchange.request_body.len(),
            Phase::ResponseHeaders => exchange.response_headers.len(),
            Phase::ResponseBody => exchange.response_body.len(),
        };
        if self.exports.phase(phase).is_none() {
            return Ok(abi::Action::Continue);
        }
        self.lend(Some(context), exchange);
        self.arm();
        // Borrowed, not cloned: a `TypedFunc`'s clone counts references in the engine's type
        // registry, atomics every worker thread shares, on every call.
        let f = self.exports.phase(phase).expect("checked above");
        let r = f.call(
            &mut self.store,
            (context, size as i32, i32::from(end_of_stream)),
        );
        self.take_back(exchange);
        r.map(abi::Action::from_raw).map_err(|e| format!("{e:#}"))
    }

    /// Ends a request context: `proxy_on_log`, `proxy_on_done`, `proxy_on_delete`.
    pub fn finish(&mut self, context: i32, exchange: &mut Exchange) -> Result<(), String> {
        self.lend(Some(context), exchange);
        let mut result = Ok(());
        for step in 0..3 {
            self.arm();
            let e = &self.exports;
            let r = match step {
                0 => e.log.as_ref().map(|f| f.call(&mut self.store, context)),
                1 => e
                    .done
                    .as_ref()
                    .map(|f| f.call(&mut self.store, context).map(|_| ())),
                _ => e.delete.as_ref().map(|f| f.call(&mut self.store, context)),
            };
            if let Some(Err(e)) = r {
                result = Err(format!("{e:#}"));
                break;
            }
        }
        self.take_back(exchange);
        self.store.data_mut().contexts.remove(&context);
        result
    }

    /// Makes `exchange`, the request of `context`, visible to the next call.
    fn lend(&mut self, context: Option<i32>, exchange: &mut Exchange) {
        let host = self.store.data_mut();
        host.exchange = Some(std::mem::take(exchange));
        host.own = context;
    }

    /// Takes back what [`Self::lend`] lent, as the call left it.
    fn take_back(&mut self, exchange: &mut Exchange) {
        let host = self.store.data_mut();
        *exchange = host.exchange.take().unwrap_or_default();
        host.own = None;
    }

    /// The calls the plugin asked for, and what it asked of its streams, since this was last
    /// asked.
    pub fn take_outbox(&mut self) -> Outbox {
        let host = self.store.data_mut();
        Outbox {
            calls: std::mem::take(&mut host.calls_out),
            streams: std::mem::take(&mut host.stream_ops),
            resumes: std::mem::take(&mut host.resumes),
        }
    }

    /// Delivers the answer to call `token` on the root context, as Envoy does (the SDKs find
    /// the calling context by the token), with `exchange`, the request of `context` (`None`
    /// for the root context's own calls), visible so that the callback can resume or answer
    /// its request: an HTTP answer to `proxy_on_http_call_response`, a gRPC
    /// reply to `proxy_on_grpc_receive`, a gRPC failure to `proxy_on_grpc_close`. A cancelled
    /// call's answer is dropped.
    pub fn call_response(
        &mut self,
        token: u32,
        answer: Answer,
        context: Option<i32>,
        exchange: &mut Exchange,
    ) -> Result<(), String> {
        let host = self.store.data_mut();
        if let Some(i) = host.cancelled.iter().position(|&t| t == token) {
            host.cancelled.swap_remove(i);
            return Ok(());
        }
        let (response, status, callback) = match answer {
            Answer::Http(r) => {
                let status = r
                    .failed
                    .then(|| (Status::BrokenConnection as u32, "reset".to_string()));
                let args = (
                    r.headers.len() as i32,
                    r.body.len() as i32,
                    r.trailers.len() as i32,
                );
                (r, status, Callback::Http(args))
            }
            Answer::Grpc(Ok(message)) => {
                let len = message.len() as i32;
                let r = CallResponse {
                    body: message,
                    ..CallResponse::default()
                };
                (r, None, Callback::Grpc(GrpcCallback::Receive, len))
            }
            Answer::Grpc(Err(e)) => {
                let code = e.code as i32;
                let status = Some((e.code, e.message));
                let callback = Callback::Grpc(GrpcCallback::Close, code);
                (CallResponse::default(), status, callback)
            }
            Answer::Stream(event) => match self.stream_event(token, event) {
                Some(delivery) => delivery,
                None => return Ok(()),
            },
        };
        exchange.call_response = Some(response);
        self.lend(context, exchange);
        let host = self.store.data_mut();
        if let Some(s) = status {
            host.call_status = s;
        }
        self.arm();
        let (root, token) = (ROOT_CONTEXT, token as i32);
        let r = match callback {
            Callback::Http((h, b, t)) => match &self.exports.http_call_response {
                Some(f) => f.call(&mut self.store, (root, token, h, b, t)),
                None => Ok(()),
            },
            Callback::Grpc(which, n) => {
                let f = match which {
                    GrpcCallback::Receive => &self.exports.grpc_receive,
                    GrpcCallback::Close => &self.exports.grpc_close,
                    GrpcCallback::InitialMetadata => &self.exports.grpc_initial_metadata,
                    GrpcCallback::TrailingMetadata => &self.exports.grpc_trailing_metadata,
                };
                match f {
                    Some(f) => f.call(&mut self.store, (root, token, n)),
                    None => Ok(()),
                }
            }
        };
        self.store.data_mut().call_status = (0, String::new());
        self.take_back(exchange);
        exchange.call_response = None;
        r.map_err(|e| format!("{e:#}"))
    }

    /// What a stream's event gives its callback (the metadata as the gRPC metadata maps, a
    /// message as the gRPC receive buffer), or `None` for a stream the plugin cancelled. A
    /// close marks the stream closed, and forgets it if the plugin had closed its side too.
    fn stream_event(&mut self, token: u32, event: StreamEvent) -> Option<Delivery> {
        let streams = &mut self.store.data_mut().streams;
        let state = streams.get_mut(&token)?;
        let mut r = CallResponse::default();
        let (status, which, n) = match event {
            StreamEvent::InitialMetadata(headers) => {
                r.headers = headers;
                (None, GrpcCallback::InitialMetadata, r.headers.len())
            }
            StreamEvent::Message(body) => {
                r.body = body;
                (None, GrpcCallback::Receive, r.body.len())
            }
            StreamEvent::TrailingMetadata(trailers) => {
                r.trailers = trailers;
                (None, GrpcCallback::TrailingMetadata, r.trailers.len())
            }
            StreamEvent::Close(code, message) => {
                state.remote_closed = true;
                if state.local_closed {
                    streams.remove(&token);
                }
                (Some((code, message)), GrpcCallback::Close, code as usize)
            }
        };
        Some((r, status, Callback::Grpc(which, n as i32)))
    }

    /// Forgets streams `tokens` (their owner, a request, ended: they are reset with it).
    pub fn forget_streams(&mut self, tokens: &[u32]) {
        let streams = &mut self.store.data_mut().streams;
        for t in tokens {
            streams.remove(t);
        }
    }

    /// Tells the root context that shared queue `id` has items (`proxy_on_queue_ready`).
    pub fn queue_ready(&mut self, id: u32) -> Result<(), String> {
        if self.exports.queue_ready.is_some() {
            self.arm();
            let f = self.exports.queue_ready.as_ref().expect("checked above");
            f.call(&mut self.store, (ROOT_CONTEXT, id as i32))
                .map_err(|e| format!("{e:#}"))?;
        }
        Ok(())
    }

    /// Delivers a tick to the root context.
    pub fn tick(&mut self) -> Result<(), String> {
        if self.exports.tick.is_some() {
            self.arm();
            let f = self.exports.tick.as_ref().expect("checked above");
            f.call(&mut self.store, ROOT_CONTEXT)
                .map_err(|e| format!("{e:#}"))?;
        }
        Ok(())
    }
}

// ------------------------------------------------------------------ guest memory

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
    super::calls::define(&mut linker).expect("host calls link");
    super::wasi::define(&mut linker).expect("WASI calls link");
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
        self.lend(None, exchange);
        self.arm();
        let r = instance_func.call(&mut self.store, &params, &mut results);
        self.take_back(exchange);
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
    fn a_call_this_host_does_not_offer_is_logged_once_and_answers_a_status() {
        const CALLS_OUT: &str = r#"(module
          (import "env" "proxy_call_of_a_later_abi" (func $ff (param i32 i32 i32 i32 i32 i32) (result i32)))
          (memory (export "memory") 1)
          (func (export "_initialize")
            (if (i32.ne (call $ff (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0)) (i32.const 10))
              (then unreachable))
            (drop (call $ff (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0))))
          (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 1024))
          (func (export "proxy_abi_version_0_2_1"))
          (func (export "proxy_on_context_create") (param i32 i32)))"#;
        let text = super::super::logged(|| {
            let engine = Engine::default();
            let compiled = compile(&engine, CALLS_OUT.as_bytes(), 1 << 20).unwrap();
            let shared = Arc::new(Shared::new("callout", Vec::new()));
            compiled
                .instantiate(&engine, shared, Duration::from_secs(1))
                .expect("it starts: the call answered InternalFailure");
        });
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("proxy_call_of_a_later_abi"))
            .collect();
        assert_eq!(lines.len(), 1, "{text}");
        assert!(lines[0].contains("callout"), "{text}");
    }

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
