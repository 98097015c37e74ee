//! WASI preview 1 as proxy-wasm-cpp-host (Envoy's host) stubs it, under both module names it
//! answers to (`wasi_snapshot_preview1`, `wasi_unstable`): standard output and error go to the
//! log, clocks and random bytes are real, and every file, path and socket call gets the errno
//! cpp-host gives. The SDKs' language runtimes start on exactly this surface: Go's, for one,
//! expects `fd_prestat_get` to say `EBADF` (nothing preopened) and sleeps in `poll_oneoff`.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use wasmtime::{Caller, Linker};

use super::calls::{read, write_bytes, write_u32};
use super::host::Host;

const SUCCESS: i32 = 0;
const EBADF: i32 = 8;
const EFAULT: i32 = 21;
const EINVAL: i32 = 28;
const ENOENT: i32 = 44;
const ENOSYS: i32 = 52;
const ENOTDIR: i32 = 20;
const ENOTSUP: i32 = 58;

/// The largest `random_get` (cpp-host's `PROXY_WASM_HOST_WASI_RANDOM_GET_MAX_SIZE_BYTES`).
const RANDOM_MAX: u32 = 64 << 10;
/// A line a plugin writes without a newline is logged once it reaches this size.
const LINE_MAX: usize = 4 << 10;

/// The two names modules import WASI under.
const MODULES: [&str; 2] = ["wasi_snapshot_preview1", "wasi_unstable"];

/// Defines the WASI imports.
pub(super) fn define(l: &mut Linker<Host>) -> wasmtime::Result<()> {
    for m in MODULES {
        stdio(l, m)?;
        clocks_and_random(l, m)?;
        arguments(l, m)?;
        files(l, m)?;
        paths_and_sockets(l, m)?;
    }
    Ok(())
}

fn is_stdio(fd: i32) -> bool {
    fd == 1 || fd == 2
}

/// Standard output (info) and error (error) to the log, a line at a time.
fn stdio(l: &mut Linker<Host>, m: &str) -> wasmtime::Result<()> {
    l.func_wrap(
        m,
        "fd_write",
        |mut c: Caller<'_, Host>, fd: i32, iovs: i32, n: i32, ret: i32| -> i32 {
            write_stdio(&mut c, fd, iovs, n, ret)
        },
    )?;
    l.func_wrap(
        m,
        "fd_pwrite",
        |mut c: Caller<'_, Host>, fd: i32, iovs: i32, n: i32, _offset: i64, ret: i32| -> i32 {
            write_stdio(&mut c, fd, iovs, n, ret)
        },
    )?;
    l.func_wrap(
        m,
        "fd_fdstat_get",
        |mut c: Caller<'_, Host>, fd: i32, out: i32| -> i32 {
            if !is_stdio(fd) {
                return EBADF;
            }
            // filetype and flags 0, rights: fd_write only.
            let mut stat = [0u8; 24];
            stat[8] = 64;
            if write_bytes(&mut c, out, &stat).is_none() {
                return EFAULT;
            }
            SUCCESS
        },
    )?;
    Ok(())
}

fn write_stdio(c: &mut Caller<'_, Host>, fd: i32, iovs: i32, n: i32, ret: i32) -> i32 {
    if !is_stdio(fd) {
        return EBADF;
    }
    let mut total = 0u32;
    for i in 0..n.clamp(0, 1024) {
        let Some(iov) = read(c, iovs.wrapping_add(i * 8), 8) else {
            return EFAULT;
        };
        let ptr = i32::from_le_bytes([iov[0], iov[1], iov[2], iov[3]]);
        let len = i32::from_le_bytes([iov[4], iov[5], iov[6], iov[7]]);
        if len == 0 {
            continue;
        }
        let Some(bytes) = read(c, ptr, len) else {
            return EFAULT;
        };
        total = total.wrapping_add(bytes.len() as u32);
        c.data_mut().stdio_write(fd == 2, &bytes);
    }
    if write_u32(c, ret, total).is_none() {
        return EFAULT;
    }
    SUCCESS
}

impl Drop for Host {
    /// What a plugin wrote without a final newline is logged when its VM goes (a trap's last
    /// words are often that).
    fn drop(&mut self) {
        for error in [false, true] {
            if !self.stdio[usize::from(error)].is_empty() {
                self.stdio[usize::from(error)].push(b'\n');
                self.stdio_write(error, &[]);
            }
        }
    }
}

impl Host {
    /// Appends what a plugin wrote to standard output or error, and logs each whole line (or a
    /// long fragment): Go's runtime, for one, writes a panic a few bytes at a time.
    fn stdio_write(&mut self, error: bool, bytes: &[u8]) {
        let buf = &mut self.stdio[usize::from(error)];
        buf.extend_from_slice(bytes);
        while let Some(end) =
            memchr::memchr(b'\n', buf).or((buf.len() >= LINE_MAX).then_some(LINE_MAX))
        {
            let line: Vec<u8> = buf.drain(..=end.min(buf.len() - 1)).collect();
            let text = String::from_utf8_lossy(&line);
            let text = text.trim_end_matches('\n');
            if !self.shared.may_log() {
                continue;
            }
            let plugin = &self.shared.name;
            if error {
                tracing::error!(target: "plugin", %plugin, "{text}");
            } else {
                tracing::info!(target: "plugin", %plugin, "{text}");
            }
        }
    }
}

/// Nanoseconds on a monotonic clock (from the first call: WASI fixes no origin).
fn monotonic_nanos() -> u64 {
    static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    ORIGIN.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

fn clocks_and_random(l: &mut Linker<Host>, m: &str) -> wasmtime::Result<()> {
    l.func_wrap(
        m,
        "clock_time_get",
        |mut c: Caller<'_, Host>, id: i32, _precision: i64, ret: i32| -> i32 {
            let now = match id {
                0 => SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_nanos() as u64,
                1 => monotonic_nanos(),
                _ => return ENOTSUP,
            };
            if write_bytes(&mut c, ret, &now.to_le_bytes()).is_none() {
                return EFAULT;
            }
            SUCCESS
        },
    )?;
    l.func_wrap(
        m,
        "clock_res_get",
        |mut c: Caller<'_, Host>, id: i32, ret: i32| -> i32 {
            if !(0..=1).contains(&id) {
                return ENOTSUP;
            }
            if write_bytes(&mut c, ret, &1u64.to_le_bytes()).is_none() {
                return EFAULT;
            }
            SUCCESS
        },
    )?;
    l.func_wrap(
        m,
        "random_get",
        |mut c: Caller<'_, Host>, ptr: i32, len: i32| -> i32 {
            let len = len as u32;
            if len > RANDOM_MAX {
                return EINVAL;
            }
            let mut bytes = vec![0u8; len as usize];
            rand::Rng::fill(&mut rand::thread_rng(), &mut bytes[..]);
            if write_bytes(&mut c, ptr, &bytes).is_none() {
                return EFAULT;
            }
            SUCCESS
        },
    )?;
    // Nothing to wait for: no events, at once (Go's scheduler calls it to sleep).
    l.func_wrap(
        m,
        "poll_oneoff",
        |mut c: Caller<'_, Host>, _in: i32, _out: i32, _n: i32, ret: i32| -> i32 {
            if write_u32(&mut c, ret, 0).is_none() {
                return EFAULT;
            }
            SUCCESS
        },
    )?;
    l.func_wrap(m, "sched_yield", |_: Caller<'_, Host>| -> i32 { SUCCESS })?;
    // cpp-host logs and returns; returning into a module that asked to exit runs code that
    // expects never to run, so here the call ends (a trap, handled as any plugin failure).
    l.func_wrap(
        m,
        "proc_exit",
        |_: Caller<'_, Host>, code: i32| -> wasmtime::Result<()> {
            Err(wasmtime::Error::msg(format!(
                "the plugin exited with code {code}"
            )))
        },
    )?;
    Ok(())
}

/// No arguments and an empty environment.
fn arguments(l: &mut Linker<Host>, m: &str) -> wasmtime::Result<()> {
    for name in ["environ_sizes_get", "args_sizes_get"] {
        l.func_wrap(
            m,
            name,
            |mut c: Caller<'_, Host>, count: i32, size: i32| -> i32 {
                if write_u32(&mut c, count, 0).is_none() || write_u32(&mut c, size, 0).is_none() {
                    return EFAULT;
                }
                SUCCESS
            },
        )?;
    }
    for name in ["environ_get", "args_get"] {
        l.func_wrap(m, name, |_: Caller<'_, Host>, _: i32, _: i32| -> i32 {
            SUCCESS
        })?;
    }
    Ok(())
}

/// File descriptors: only standard output and error exist, and nothing is preopened.
fn files(l: &mut Linker<Host>, m: &str) -> wasmtime::Result<()> {
    l.func_wrap(
        m,
        "fd_prestat_get",
        |_: Caller<'_, Host>, _fd: i32, _buf: i32| -> i32 { EBADF },
    )?;
    l.func_wrap(
        m,
        "fd_prestat_dir_name",
        |_: Caller<'_, Host>, _: i32, _: i32, _: i32| -> i32 { ENOSYS },
    )?;
    l.func_wrap(
        m,
        "fd_filestat_get",
        |_: Caller<'_, Host>, _: i32, _: i32| -> i32 { EBADF },
    )?;
    l.func_wrap(
        m,
        "fd_read",
        |_: Caller<'_, Host>, _: i32, _: i32, _: i32, _: i32| -> i32 { ENOSYS },
    )?;
    l.func_wrap(
        m,
        "fd_pread",
        |_: Caller<'_, Host>, _: i32, _: i32, _: i32, _: i64, _: i32| -> i32 { ENOSYS },
    )?;
    l.func_wrap(
        m,
        "fd_fdstat_set_flags",
        |_: Caller<'_, Host>, _: i32, _: i32| -> i32 { ENOSYS },
    )?;
    // cpp-host says these succeed (and logs seek and close as errors).
    l.func_wrap(
        m,
        "fd_seek",
        |_: Caller<'_, Host>, _: i32, _: i64, _: i32, _: i32| -> i32 { SUCCESS },
    )?;
    l.func_wrap(m, "fd_close", |_: Caller<'_, Host>, _: i32| -> i32 {
        SUCCESS
    })?;
    l.func_wrap(
        m,
        "fd_advise",
        |_: Caller<'_, Host>, _: i32, _: i64, _: i64, _: i32| -> i32 { SUCCESS },
    )?;
    let stdio_only = |fd: i32| if is_stdio(fd) { SUCCESS } else { EBADF };
    l.func_wrap(
        m,
        "fd_allocate",
        move |_: Caller<'_, Host>, fd: i32, _: i64, _: i64| -> i32 { stdio_only(fd) },
    )?;
    l.func_wrap(
        m,
        "fd_datasync",
        move |_: Caller<'_, Host>, fd: i32| -> i32 { stdio_only(fd) },
    )?;
    l.func_wrap(m, "fd_sync", move |_: Caller<'_, Host>, fd: i32| -> i32 {
        stdio_only(fd)
    })?;
    l.func_wrap(
        m,
        "fd_fdstat_set_rights",
        move |_: Caller<'_, Host>, fd: i32, _: i64, _: i64| -> i32 { stdio_only(fd) },
    )?;
    l.func_wrap(
        m,
        "fd_filestat_set_size",
        move |_: Caller<'_, Host>, fd: i32, _: i64| -> i32 { stdio_only(fd) },
    )?;
    l.func_wrap(
        m,
        "fd_filestat_set_times",
        move |_: Caller<'_, Host>, fd: i32, _: i64, _: i64, _: i32| -> i32 { stdio_only(fd) },
    )?;
    l.func_wrap(
        m,
        "fd_renumber",
        |_: Caller<'_, Host>, fd: i32, to: i32| -> i32 {
            if is_stdio(fd) && is_stdio(to) {
                ENOTSUP
            } else {
                EBADF
            }
        },
    )?;
    l.func_wrap(
        m,
        "fd_tell",
        |mut c: Caller<'_, Host>, fd: i32, ret: i32| -> i32 {
            if !is_stdio(fd) {
                return EBADF;
            }
            if write_bytes(&mut c, ret, &0u64.to_le_bytes()).is_none() {
                return EFAULT;
            }
            SUCCESS
        },
    )?;
    l.func_wrap(
        m,
        "fd_readdir",
        |mut c: Caller<'_, Host>, _: i32, _: i32, _: i32, _: i64, ret: i32| -> i32 {
            if write_u32(&mut c, ret, 0).is_none() {
                return EFAULT;
            }
            ENOTDIR
        },
    )?;
    Ok(())
}

/// No file system and no sockets.
fn paths_and_sockets(l: &mut Linker<Host>, m: &str) -> wasmtime::Result<()> {
    l.func_wrap(
        m,
        "path_open",
        |_: Caller<'_, Host>,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i64,
         _: i64,
         _: i32,
         _: i32|
         -> i32 { ENOENT },
    )?;
    l.func_wrap(
        m,
        "path_filestat_get",
        |_: Caller<'_, Host>, _: i32, _: i32, _: i32, _: i32, _: i32| -> i32 { ENOTSUP },
    )?;
    l.func_wrap(
        m,
        "path_filestat_set_times",
        |_: Caller<'_, Host>, _: i32, _: i32, _: i32, _: i32, _: i64, _: i64, _: i32| -> i32 {
            ENOTSUP
        },
    )?;
    l.func_wrap(
        m,
        "path_link",
        |_: Caller<'_, Host>, _: i32, _: i32, _: i32, _: i32, _: i32, _: i32, _: i32| -> i32 {
            ENOTSUP
        },
    )?;
    l.func_wrap(
        m,
        "path_rename",
        |_: Caller<'_, Host>, _: i32, _: i32, _: i32, _: i32, _: i32, _: i32| -> i32 { ENOTSUP },
    )?;
    l.func_wrap(
        m,
        "path_symlink",
        |_: Caller<'_, Host>, _: i32, _: i32, _: i32, _: i32, _: i32| -> i32 { ENOTSUP },
    )?;
    for name in [
        "path_create_directory",
        "path_remove_directory",
        "path_unlink_file",
    ] {
        l.func_wrap(
            m,
            name,
            |_: Caller<'_, Host>, _: i32, _: i32, _: i32| -> i32 { ENOTSUP },
        )?;
    }
    l.func_wrap(
        m,
        "path_readlink",
        |mut c: Caller<'_, Host>, _: i32, _: i32, _: i32, _: i32, _: i32, ret: i32| -> i32 {
            if write_u32(&mut c, ret, 0).is_none() {
                return EFAULT;
            }
            ENOTSUP
        },
    )?;
    l.func_wrap(
        m,
        "sock_accept",
        |mut c: Caller<'_, Host>, _: i32, _: i32, ret: i32| -> i32 {
            if write_u32(&mut c, ret, 0).is_none() {
                return EFAULT;
            }
            ENOTSUP
        },
    )?;
    l.func_wrap(
        m,
        "sock_recv",
        |mut c: Caller<'_, Host>, _: i32, _: i32, _: i32, _: i32, size: i32, flags: i32| -> i32 {
            if write_u32(&mut c, size, 0).is_none() || write_bytes(&mut c, flags, &[0, 0]).is_none()
            {
                return EFAULT;
            }
            ENOTSUP
        },
    )?;
    l.func_wrap(
        m,
        "sock_send",
        |mut c: Caller<'_, Host>, _: i32, _: i32, _: i32, _: i32, ret: i32| -> i32 {
            if write_u32(&mut c, ret, 0).is_none() {
                return EFAULT;
            }
            ENOTSUP
        },
    )?;
    l.func_wrap(
        m,
        "sock_shutdown",
        |_: Caller<'_, Host>, _: i32, _: i32| -> i32 { ENOTSUP },
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::super::host::{compile, Shared};

    /// What Go's runtime does first, in a module built by hand: it looks for preopened
    /// directories from fd 3 until `EBADF`, sleeps in `poll_oneoff`, reads the monotonic clock,
    /// and writes a line to standard error a fragment at a time.
    const GO_LIKE_START: &str = r#"(module
      (import "wasi_snapshot_preview1" "fd_prestat_get" (func $prestat (param i32 i32) (result i32)))
      (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
      (import "wasi_snapshot_preview1" "clock_time_get" (func $clock (param i32 i64 i32) (result i32)))
      (import "wasi_unstable" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
      (memory (export "memory") 1)
      (data (i32.const 512) "runtime: hello")
      (data (i32.const 528) " from go\n")
      ;; iovecs: (512, 14) and (528, 9)
      (data (i32.const 600) "\00\02\00\00\0e\00\00\00\10\02\00\00\09\00\00\00")
      (func (export "_initialize") (local $fd i32)
        (local.set $fd (i32.const 3))
        (block $done (loop $next
          (br_if $done (i32.eq (call $prestat (local.get $fd) (i32.const 0)) (i32.const 8)))
          unreachable))
        (if (i32.ne (call $poll (i32.const 0) (i32.const 64) (i32.const 1) (i32.const 128)) (i32.const 0)) (then unreachable))
        (if (i32.ne (call $clock (i32.const 1) (i64.const 1) (i32.const 256)) (i32.const 0)) (then unreachable))
        (drop (call $write (i32.const 2) (i32.const 600) (i32.const 1) (i32.const 300)))
        (drop (call $write (i32.const 2) (i32.const 608) (i32.const 1) (i32.const 300))))
      (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 1024))
      (func (export "proxy_abi_version_0_2_1"))
      (func (export "proxy_on_context_create") (param i32 i32)))"#;

    #[test]
    fn a_go_like_runtime_starts_and_its_fragments_are_logged_as_one_line() {
        let text = super::super::logged(|| {
            let engine = wasmtime::Engine::default();
            let compiled = compile(&engine, GO_LIKE_START.as_bytes(), 1 << 20).unwrap();
            let shared = Arc::new(Shared::new("go", Vec::new()));
            compiled
                .instantiate(&engine, shared, Duration::from_secs(1))
                .expect("the runtime starts");
        });
        let lines: Vec<&str> = text.lines().filter(|l| l.contains("runtime:")).collect();
        assert_eq!(lines.len(), 1, "{text}");
        assert!(lines[0].contains("ERROR") && lines[0].contains("runtime: hello from go"));
    }
}
