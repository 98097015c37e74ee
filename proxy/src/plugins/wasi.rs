//! WASI preview 1, as little as the Proxy-Wasm SDKs' runtimes use: standard output and error
//! to the log, clocks, random bytes, empty arguments and environment.

use std::time::{SystemTime, UNIX_EPOCH};

use wasmtime::{Caller, Linker};

use super::calls::{read, write_bytes, write_u32};
use super::host::Host;

/// Defines the WASI imports.
pub(super) fn define(l: &mut Linker<Host>) -> wasmtime::Result<()> {
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
