//! The Proxy-Wasm ABI's host calls (the `env` imports), defined in groups: log and time,
//! header maps and values, buffers, the local response, properties, shared data, metrics.
//!
//! Host calls never trust the plugin: every pointer and length is checked against its memory
//! (`InvalidMemoryAccess`), every map it writes is decoded defensively (`ParseFailure`), and what
//! this host does not offer answers `InternalFailure` or `NotFound`, statuses the SDKs handle.

use std::sync::atomic::{AtomicI64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use wasmtime::{Caller, Extern, Linker, Memory};

use super::abi::{self, BufferType, Headers, MapType, Status};
use super::host::{Exchange, Host, LocalResponse};
use super::resume::Resume;

/// The plugin's memory.
fn memory(caller: &mut Caller<'_, Host>) -> Option<Memory> {
    if let Some(m) = caller.data().memory {
        return Some(m);
    }
    match caller.get_export("memory") {
        Some(Extern::Memory(m)) => Some(m),
        _ => None,
    }
}

/// The guest bytes at `ptr..ptr+len`, copied; `None` when out of bounds.
pub(super) fn read(caller: &mut Caller<'_, Host>, ptr: i32, len: i32) -> Option<Vec<u8>> {
    let mem = memory(caller)?;
    let (ptr, len) = (ptr as u32 as usize, len as u32 as usize);
    mem.data(&*caller)
        .get(ptr..ptr.checked_add(len)?)
        .map(<[u8]>::to_vec)
}

pub(super) fn write_bytes(caller: &mut Caller<'_, Host>, ptr: i32, bytes: &[u8]) -> Option<()> {
    let mem = memory(caller)?;
    let ptr = ptr as u32 as usize;
    mem.data_mut(&mut *caller)
        .get_mut(ptr..ptr.checked_add(bytes.len())?)?
        .copy_from_slice(bytes);
    Some(())
}

pub(super) fn write_u32(caller: &mut Caller<'_, Host>, ptr: i32, v: u32) -> Option<()> {
    write_bytes(caller, ptr, &v.to_le_bytes())
}

/// Copies `bytes` into memory the guest allocates, and writes its address and size to the
/// guest's `ret_ptr` and `ret_size`. A trap in the guest's allocator propagates.
pub(super) fn give(
    caller: &mut Caller<'_, Host>,
    bytes: &[u8],
    ret_ptr: i32,
    ret_size: i32,
) -> wasmtime::Result<Status> {
    let addr = if bytes.is_empty() {
        0
    } else {
        // The allocator found at instantiation, taken for the call (no lookup by name, no type
        // check per call); looked up here only before it was found, or in a nested call.
        let alloc = match caller.data_mut().alloc.take() {
            Some(f) => f,
            None => {
                let found = ["proxy_on_memory_allocate", "malloc"]
                    .iter()
                    .find_map(|n| caller.get_export(n).and_then(Extern::into_func));
                let Some(f) = found else {
                    return Ok(Status::InternalFailure);
                };
                f.typed::<i32, i32>(&*caller)?
            }
        };
        let addr = alloc.call(&mut *caller, bytes.len() as i32);
        caller.data_mut().alloc.get_or_insert(alloc);
        addr?
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

/// The request the current callback acts on; `None` (the calls answer `NotFound`) in a root
/// context's own callback, or when it chose another request's context, which it may only
/// resume, answer or reset.
fn exchange<'a>(caller: &'a mut Caller<'_, Host>) -> Option<&'a mut Exchange> {
    caller.data_mut().request()
}

/// The exchange as map `t` needs it: a call's answer belongs to the callback, whatever context
/// it chose; a request's maps only to that request's own context.
fn exchange_for<'a>(caller: &'a mut Caller<'_, Host>, t: MapType) -> Option<&'a mut Exchange> {
    let host = caller.data_mut();
    match t {
        MapType::CallResponseHeaders | MapType::CallResponseTrailers => host.exchange.as_mut(),
        _ => host.request(),
    }
}

/// Carries `resume` to the other request's context the callback chose, if it chose one
/// (`true`): that request acts on it once the callback returns.
fn resumes_other(caller: &mut Caller<'_, Host>, resume: Resume) -> bool {
    let host = caller.data_mut();
    match host.foreign() {
        Some(context) => {
            host.resume_other(context, resume);
            true
        }
        None => false,
    }
}

/// A map a plugin changes: the request's or the answer's headers are then marked edited.
fn edit(ex: &mut Exchange, t: MapType) -> Option<&mut Headers> {
    match t {
        MapType::RequestHeaders => ex.request_headers_edited = true,
        MapType::ResponseHeaders => ex.response_headers_edited = true,
        _ => {}
    }
    map(ex, t)
}

fn map(ex: &mut Exchange, t: MapType) -> Option<&mut Headers> {
    Some(match t {
        MapType::RequestHeaders => &mut ex.request_headers,
        MapType::ResponseHeaders => &mut ex.response_headers,
        MapType::RequestTrailers => &mut ex.request_trailers,
        MapType::ResponseTrailers => &mut ex.response_trailers,
        MapType::CallResponseHeaders => &mut ex.call_response.as_mut()?.headers,
        MapType::CallResponseTrailers => &mut ex.call_response.as_mut()?.trailers,
    })
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

/// Defines every `env` import of the ABI, group by group.
pub(super) fn define(l: &mut Linker<Host>) -> wasmtime::Result<()> {
    log_and_time(l)?;
    header_maps(l)?;
    header_values(l)?;
    buffers(l)?;
    local_response(l)?;
    properties(l)?;
    shared_data(l)?;
    metrics(l)?;
    super::callout::define(l)?;
    super::grpc::define(l)?;
    super::queues::define(l)?;
    super::foreign::define(l)
}

/// Logging, time, ticks, and the stream and context calls.
fn log_and_time(l: &mut Linker<Host>) -> wasmtime::Result<()> {
    l.func_wrap(
        "env",
        "proxy_log",
        |mut c: Caller<'_, Host>, level: i32, ptr: i32, len: i32| -> i32 {
            let Some(msg) = read(&mut c, ptr, len) else {
                return Status::InvalidMemoryAccess as i32;
            };
            if !c.data().shared.may_log() {
                return Status::Ok as i32;
            }
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
    // As on Envoy: the rest of the callback acts on that context (another request's, to
    // resume, answer or reset it; see `resume.rs`); a context this VM does not have is refused.
    l.func_wrap(
        "env",
        "proxy_set_effective_context",
        |mut c: Caller<'_, Host>, context: i32| -> i32 {
            if c.data_mut().set_effective(context) {
                Status::Ok as i32
            } else {
                Status::BadArgument as i32
            }
        },
    )?;
    l.func_wrap("env", "proxy_done", |_: Caller<'_, Host>| -> i32 {
        Status::Ok as i32
    })?;
    // Resuming a paused request or response: the walk through the plugins goes on once the
    // current callback returns.
    l.func_wrap(
        "env",
        "proxy_continue_stream",
        |mut c: Caller<'_, Host>, stream: i32| -> i32 {
            match stream {
                0 | 1 => {
                    if resumes_other(&mut c, Resume::Continue) {
                        return Status::Ok as i32;
                    }
                    let ex = try_raw!(exchange(&mut c), Status::NotFound);
                    ex.continued = true;
                    Status::Ok as i32
                }
                2 | 3 => Status::NotFound as i32,
                _ => Status::BadArgument as i32,
            }
        },
    )?;
    // The SDKs' "reset" of the request or the response: as on Envoy, the stream ends for
    // real (before the upstream: no upstream connection at all; mid-answer: a cut).
    l.func_wrap(
        "env",
        "proxy_close_stream",
        |mut c: Caller<'_, Host>, stream: i32| -> i32 {
            match stream {
                // HttpRequest, HttpResponse.
                0 | 1 => {
                    if resumes_other(&mut c, Resume::Reset) {
                        return Status::Ok as i32;
                    }
                    let ex = try_raw!(exchange(&mut c), Status::NotFound);
                    ex.reset = true;
                    Status::Ok as i32
                }
                // Downstream, Upstream: TCP streams, which an HTTP context does not have.
                2 | 3 => Status::NotFound as i32,
                _ => Status::BadArgument as i32,
            }
        },
    )?;
    // ABI 0.2.0's names for the same.
    for name in ["proxy_continue_request", "proxy_continue_response"] {
        l.func_wrap("env", name, |mut c: Caller<'_, Host>| -> i32 {
            if resumes_other(&mut c, Resume::Continue) {
                return Status::Ok as i32;
            }
            let ex = try_raw!(exchange(&mut c), Status::NotFound);
            ex.continued = true;
            Status::Ok as i32
        })?;
    }
    // The route is chosen before plugins run: there is no cache to clear.
    l.func_wrap(
        "env",
        "proxy_clear_route_cache",
        |_: Caller<'_, Host>| -> i32 { Status::Ok as i32 },
    )?;

    Ok(())
}

/// Whole header maps: get and set all pairs.
fn header_maps(l: &mut Linker<Host>) -> wasmtime::Result<()> {
    l.func_wrap(
        "env",
        "proxy_get_header_map_pairs",
        |mut c: Caller<'_, Host>, t: i32, ret_ptr: i32, ret_size: i32| -> wasmtime::Result<i32> {
            let t = try_status!(MapType::from_raw(t), Status::BadArgument);
            let bytes = {
                let ex = try_status!(exchange_for(&mut c, t), Status::NotFound);
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
            let ex = try_status!(exchange_for(&mut c, t), Status::NotFound);
            let m = try_status!(edit(ex, t), Status::BadArgument);
            *m = pairs;
            Ok(Status::Ok as i32)
        },
    )?;
    Ok(())
}

/// One header of a map: get, add, replace, remove; and a map's size.
fn header_values(l: &mut Linker<Host>) -> wasmtime::Result<()> {
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
                let ex = try_status!(exchange_for(&mut c, t), Status::NotFound);
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
                let ex = try_raw!(exchange_for(&mut c, t), Status::NotFound);
                let m = try_raw!(edit(ex, t), Status::BadArgument);
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
            let ex = try_raw!(exchange_for(&mut c, t), Status::NotFound);
            let m = try_raw!(edit(ex, t), Status::BadArgument);
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
                let ex = try_raw!(exchange_for(&mut c, t), Status::NotFound);
                // Envoy answers the map's size in bytes (names and values), not its count.
                map(ex, t).map_or(0, |m| m.iter().map(|(k, v)| k.len() + v.len()).sum())
            };
            try_raw!(
                write_u32(&mut c, ret, n as u32),
                Status::InvalidMemoryAccess
            );
            Status::Ok as i32
        },
    )?;

    Ok(())
}

/// The buffers: bodies, the plugin and VM configuration, and their replacement, with
/// proxy-wasm-cpp-host's and Envoy's rules for where a read or a write may start.
fn buffers(l: &mut Linker<Host>) -> wasmtime::Result<()> {
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
            let buffer = try_status!(buffer(c.data(), t), Status::NotFound);
            let bytes = try_status!(
                abi::window(&buffer, start as u32, max as u32),
                Status::BadArgument
            )
            .to_vec();
            Ok(give(&mut c, &bytes, ret_ptr, ret_size)? as i32)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_set_buffer_bytes",
        |mut c: Caller<'_, Host>, t: i32, start: i32, size: i32, ptr: i32, len: i32| -> i32 {
            let t = try_raw!(BufferType::from_raw(t), Status::BadArgument);
            if buffer(c.data(), t).is_none() {
                return Status::NotFound as i32;
            }
            let data = try_raw!(read(&mut c, ptr, len), Status::InvalidMemoryAccess);
            let ex = try_raw!(exchange(&mut c), Status::NotFound);
            // Only the bodies can be written; the configurations cannot.
            let b = match t {
                BufferType::RequestBody => &mut ex.request_body,
                BufferType::ResponseBody => &mut ex.response_body,
                _ => return Status::BadArgument as i32,
            };
            match abi::splice(b, start as u32 as usize, size as u32 as usize, &data) {
                Ok(next) => {
                    *b = Bytes::from(next);
                    Status::Ok as i32
                }
                Err(s) => s as i32,
            }
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_get_buffer_status",
        |mut c: Caller<'_, Host>, t: i32, len_ptr: i32, flags_ptr: i32| -> i32 {
            let t = try_raw!(BufferType::from_raw(t), Status::BadArgument);
            let n = try_raw!(buffer(c.data(), t), Status::NotFound).len();
            try_raw!(
                write_u32(&mut c, len_ptr, n as u32),
                Status::InvalidMemoryAccess
            );
            try_raw!(write_u32(&mut c, flags_ptr, 0), Status::InvalidMemoryAccess);
            Status::Ok as i32
        },
    )?;

    Ok(())
}

/// The buffer `t` as the current call sees it (bodies only while a request is served), or
/// `None` when there is none (`NotFound`).
fn buffer(host: &Host, t: BufferType) -> Option<Bytes> {
    match t {
        BufferType::PluginConfiguration => Some(Bytes::from(host.shared.config.clone())),
        BufferType::VmConfiguration => Some(Bytes::from(host.shared.vm_config.clone())),
        BufferType::RequestBody => host.request_ref().map(|e| e.request_body.clone()),
        BufferType::ResponseBody => host.request_ref().map(|e| e.response_body.clone()),
        BufferType::CallResponseBody => host
            .exchange
            .as_ref()
            .and_then(|e| Some(e.call_response.as_ref()?.body.clone())),
        BufferType::Absent => None,
    }
}

/// The local response: the request ends here with the plugin's answer.
fn local_response(l: &mut Linker<Host>) -> wasmtime::Result<()> {
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
            let local = LocalResponse {
                status: status as u16,
                details: String::from_utf8_lossy(&details).into_owned(),
                body,
                headers,
            };
            let host = c.data_mut();
            if let Some(context) = host.foreign() {
                host.resume_other(context, Resume::Respond(local));
                return Status::Ok as i32;
            }
            let ex = try_raw!(exchange(&mut c), Status::NotFound);
            ex.local_response = Some(local);
            Status::Ok as i32
        },
    )?;

    Ok(())
}

/// Properties: Envoy's attribute names and the edge's own.
fn properties(l: &mut Linker<Host>) -> wasmtime::Result<()> {
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
            let host = c.data();
            let value = super::properties::get(&name, host.request_ref(), &host.shared);
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

    Ok(())
}

/// Shared data with compare-and-swap.
fn shared_data(l: &mut Linker<Host>) -> wasmtime::Result<()> {
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
            let found = c.data().shared.get_data(&key);
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
            c.data().shared.set_data(key, value, cas as u32) as i32
        },
    )?;

    Ok(())
}

/// Metrics: define, increment, record, get.
fn metrics(l: &mut Linker<Host>) -> wasmtime::Result<()> {
    l.func_wrap(
        "env",
        "proxy_define_metric",
        |mut c: Caller<'_, Host>, kind: i32, np: i32, nl: i32, ret: i32| -> i32 {
            let name = try_raw!(read(&mut c, np, nl), Status::InvalidMemoryAccess);
            let id = match c.data().shared.define_metric(kind, &name) {
                Ok(id) => id,
                Err(s) => return s as i32,
            };
            try_raw!(write_u32(&mut c, ret, id), Status::InvalidMemoryAccess);
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
    host.shared.metric(id as u32)
}
