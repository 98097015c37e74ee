//! Ticks on the worker threads. As on Envoy, where every worker's instance of a plugin has its
//! root context ticked, a worker's VM gets `proxy_on_tick` at the period the plugin set, on the
//! worker's thread, so that its root context can act on the requests of its own instance:
//! resume the ones it postponed (`proxy_set_effective_context`, see [`super::resume`]). The
//! plugin's background instance is ticked as well (Envoy's main thread).
//!
//! A worker's ticker starts with its first context of the plugin and ends when the plugin is
//! unloaded. It ticks only a VM that exists (none is made for a tick); the calls a tick asks for
//! are made on the worker's event loop and answered to the root context, the gRPC streams it
//! opens deliver between ticks.

use std::cell::RefCell;
use std::collections::HashSet;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::runtime::{Handle, RuntimeFlavor};
use tokio::time::Instant;

use super::callout::{self, Answer};
use super::grpc_stream::{StreamEvent, Streams};
use super::host::{Exchange, Vm};
use super::{resume, with_vm, Plugin, Slot, VMS};

/// How often an idle loop looks at the plugin's period and whether it is still loaded.
const IDLE: Duration = Duration::from_millis(200);

/// When a plugin's next tick is due, at the period it set (read again each time: a plugin may
/// change it). Shared by the workers' tickers and the background instance.
pub(super) struct Schedule {
    next: Instant,
}

impl Schedule {
    /// The first tick as soon as the plugin asks for ticks.
    pub(super) fn new() -> Self {
        Self {
            next: Instant::now(),
        }
    }

    fn period(plugin: &Plugin) -> Duration {
        Duration::from_millis(u64::from(plugin.shared.tick_ms.load(Relaxed)))
    }

    /// How long to wait before looking again: until the next tick, at most [`IDLE`].
    pub(super) fn wait(&self, plugin: &Plugin) -> Duration {
        if Self::period(plugin).is_zero() {
            return IDLE;
        }
        self.next
            .saturating_duration_since(Instant::now())
            .min(IDLE)
    }

    /// Whether a tick is due now; if so, the next one is scheduled.
    pub(super) fn due(&mut self, plugin: &Plugin) -> bool {
        let period = Self::period(plugin);
        let due = !period.is_zero() && Instant::now() >= self.next;
        if due {
            self.next = Instant::now() + period;
        }
        due
    }
}

thread_local! {
    /// The plugins (by uid) this thread ticks.
    static TICKING: RefCell<HashSet<u64>> = RefCell::new(HashSet::new());
}

/// Starts ticking this thread's VM of `plugin`, if this thread does not yet and runs an event
/// loop of its own (a worker's: a task spawned there stays on this thread, with the VM).
pub(super) fn start_here(plugin: &Arc<Plugin>) {
    let Ok(handle) = Handle::try_current() else {
        return;
    };
    if handle.runtime_flavor() != RuntimeFlavor::CurrentThread
        || !TICKING.with(|t| t.borrow_mut().insert(plugin.uid))
    {
        return;
    }
    let (weak, uid) = (Arc::downgrade(plugin), plugin.uid);
    handle.spawn(async move {
        run(weak).await;
        TICKING.with(|t| t.borrow_mut().remove(&uid));
    });
}

/// The ticker: ticks at the plugin's period and delivers what its streams bring, until the
/// plugin is unloaded.
async fn run(weak: Weak<Plugin>) {
    let mut streams: Option<Streams> = None;
    let mut schedule = Schedule::new();
    loop {
        let Some(p) = weak.upgrade() else { return };
        let wait = schedule.wait(&p);
        drop(p);
        let event = tokio::select! {
            (token, e) = next_event(&mut streams) => Some((token, e)),
            () = tokio::time::sleep(wait) => None,
        };
        let Some(p) = weak.upgrade() else { return };
        let Some(g) = ready_generation(&p) else {
            // No VM here (it failed, and a request will rebuild it): its streams ended with it.
            streams = None;
            continue;
        };
        match event {
            Some((token, e)) => {
                let answer = Answer::Stream(e);
                on_root(&p, g, |vm| {
                    vm.call_response(token, answer, None, &mut Exchange::default())
                });
            }
            None if schedule.due(&p) => {
                on_root(&p, g, Vm::tick);
            }
            None => continue,
        }
        settle(&p, g, &mut streams).await;
    }
}

/// The next event of the open streams; pending while there are none.
pub(super) async fn next_event(streams: &mut Option<Streams>) -> (u32, StreamEvent) {
    match streams {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}

/// The generation of this thread's VM of `plugin`, if it has one ready.
fn ready_generation(plugin: &Plugin) -> Option<u64> {
    VMS.with(|vms| match vms.borrow().get(&plugin.uid) {
        Some(Slot::Ready { generation, .. }) => Some(*generation),
        _ => None,
    })
}

/// Runs `f` on the root context of this thread's VM of `plugin` if it is still generation `g`
/// (a failure drops the VM, as for a request); `false` when it is not, or failed.
fn on_root(plugin: &Plugin, g: u64, f: impl FnOnce(&mut Vm) -> Result<(), String>) -> bool {
    ready_generation(plugin) == Some(g) && with_vm(plugin, |vm, _| f(vm)).is_ok()
}

/// Carries out what the root context asked in its last callback: what it asked of other
/// requests' contexts, its streams, and its calls, whose answers go back to it (and so on,
/// until none is pending).
async fn settle(plugin: &Plugin, g: u64, streams: &mut Option<Streams>) {
    let limit = plugin.cfg.buffer_bytes;
    loop {
        let mut calls = Vec::new();
        let taken = on_root(plugin, g, |vm| {
            let mut outbox = vm.take_outbox();
            resume::wake(plugin.uid, g, std::mem::take(&mut outbox.resumes));
            calls = outbox.open_streams(streams, limit);
            Ok(())
        });
        if !taken || calls.is_empty() {
            return;
        }
        for (token, answer) in callout::perform_all(calls, limit).await {
            if !on_root(plugin, g, |vm| {
                vm.call_response(token, answer, None, &mut Exchange::default())
            }) {
                return;
            }
        }
    }
}
