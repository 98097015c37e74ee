//! A buffered log writer: log lines are appended to a shared buffer that a background thread
//! writes out every [`FLUSH_EVERY`] (or as soon as it holds [`FLUSH_BYTES`]), the way nginx's
//! `access_log buffer=64k flush=1s` works. A request never makes a syscall or wakes a thread to
//! log; at worst it waits for the buffer's lock while another thread appends.

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// How often the buffer is written out.
pub const FLUSH_EVERY: Duration = Duration::from_millis(200);
/// A buffer this full is written out at once.
pub const FLUSH_BYTES: usize = 64 * 1024;

struct Shared {
    buf: Mutex<(Vec<u8>, bool)>,
    wake: Condvar,
}

/// The writer handed to `tracing-subscriber`.
#[derive(Clone)]
pub struct BufferedStdout {
    shared: Arc<Shared>,
}

/// Writes out what is buffered when dropped (at the end of `main`).
pub struct FlushGuard {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn drain(shared: &Shared) -> Vec<u8> {
    let mut g = shared.buf.lock().unwrap_or_else(|e| e.into_inner());
    std::mem::take(&mut g.0)
}

fn write_out(bytes: &[u8]) {
    if !bytes.is_empty() {
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(bytes);
        let _ = out.flush();
    }
}

/// A writer to stdout and the guard that keeps its flusher thread.
pub fn stdout() -> (BufferedStdout, FlushGuard) {
    let shared = Arc::new(Shared {
        buf: Mutex::new((Vec::with_capacity(FLUSH_BYTES), false)),
        wake: Condvar::new(),
    });
    let s = shared.clone();
    let thread = std::thread::Builder::new()
        .name("log-flush".into())
        .spawn(move || loop {
            let (bytes, stop) = {
                let g = s.buf.lock().unwrap_or_else(|e| e.into_inner());
                let (mut g, _) = s
                    .wake
                    .wait_timeout_while(g, FLUSH_EVERY, |(buf, stop)| {
                        buf.len() < FLUSH_BYTES && !*stop
                    })
                    .unwrap_or_else(|e| e.into_inner());
                (std::mem::take(&mut g.0), g.1)
            };
            write_out(&bytes);
            if stop {
                return;
            }
        })
        .expect("spawn the log flusher");
    (
        BufferedStdout {
            shared: shared.clone(),
        },
        FlushGuard {
            shared,
            thread: Some(thread),
        },
    )
}

impl Write for BufferedStdout {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let mut g = self.shared.buf.lock().unwrap_or_else(|e| e.into_inner());
        g.0.extend_from_slice(data);
        if g.0.len() >= FLUSH_BYTES {
            self.shared.wake.notify_one();
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for BufferedStdout {
    type Writer = BufferedStdout;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

impl Drop for FlushGuard {
    fn drop(&mut self) {
        self.shared.buf.lock().unwrap_or_else(|e| e.into_inner()).1 = true;
        self.shared.wake.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        write_out(&drain(&self.shared));
    }
}
