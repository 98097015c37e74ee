//! A plugin's background instance: one VM on a thread of its own, for what belongs to no
//! request: ticks (`proxy_on_tick`), the shared queues it registered (`proxy_on_queue_ready`),
//! the calls out its root context makes from those (this thread waits for them: a tick comes
//! late rather than overlapping its calls), and the whole life of a service plugin. The
//! instance is made when first needed (at once for a service plugin, whose root context then
//! registers its queues) and rebuilt after a failure; the thread ends when the plugin is
//! unloaded.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use super::callout;
use super::host::{Exchange, Vm};
use super::{engine, Plugin};

/// How often an idle background thread looks whether its plugin is still loaded.
const IDLE: Duration = Duration::from_millis(200);

/// Starts `plugin`'s background thread.
pub(super) fn start(plugin: &Arc<Plugin>) {
    let (wake, woken) = mpsc::channel();
    plugin.shared.set_wake(wake);
    let weak = Arc::downgrade(plugin);
    let _ = std::thread::Builder::new()
        .name(format!("moltghost-wasm-bg-{}", plugin.cfg.name))
        .spawn(move || run(weak, woken));
}

fn run(weak: Weak<Plugin>, woken: Receiver<u32>) {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return;
    };
    let mut vm: Option<Vm> = None;
    let mut next_tick = Instant::now();
    loop {
        let Some(p) = weak.upgrade() else { return };
        if p.cfg.service && vm.is_none() {
            deliver(&mut vm, &p, &rt, |_| Ok(()));
        }
        let period = Duration::from_millis(u64::from(p.shared.tick_ms.load(Relaxed)));
        let wait = if period.is_zero() {
            IDLE
        } else {
            next_tick
                .saturating_duration_since(Instant::now())
                .min(IDLE)
        };
        drop(p);
        let event = woken.recv_timeout(wait);
        let Some(p) = weak.upgrade() else { return };
        match event {
            Ok(queue) => deliver(&mut vm, &p, &rt, |v| v.queue_ready(queue)),
            Err(RecvTimeoutError::Timeout) if !period.is_zero() && Instant::now() >= next_tick => {
                next_tick = Instant::now() + period;
                deliver(&mut vm, &p, &rt, Vm::tick);
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

/// Runs `f` on the background instance (made if there is none), then the calls it asked for;
/// a failure drops the instance, to be rebuilt when next needed.
fn deliver(
    vm: &mut Option<Vm>,
    p: &Plugin,
    rt: &tokio::runtime::Runtime,
    f: impl FnOnce(&mut Vm) -> Result<(), String>,
) {
    if vm.is_none() {
        match p
            .compiled
            .instantiate(engine(), p.shared.clone(), p.cfg.deadline)
        {
            Ok(v) => *vm = Some(v),
            Err(e) => {
                tracing::warn!(plugin = %p.cfg.name, error = %e, "plugin's background instance failed to start");
                return;
            }
        }
    }
    let Some(v) = vm.as_mut() else { return };
    if let Err(e) = f(v).and_then(|()| calls(v, p.cfg.buffer_bytes, rt)) {
        p.failures.fetch_add(1, Relaxed);
        tracing::warn!(plugin = %p.cfg.name, error = %e, "plugin's background call failed: its instance is rebuilt");
        *vm = None;
    }
}

/// Makes the calls the root context asked for (and those its callbacks ask for) and delivers
/// their answers, until none is pending.
fn calls(vm: &mut Vm, limit: usize, rt: &tokio::runtime::Runtime) -> Result<(), String> {
    loop {
        let calls = vm.take_calls();
        if calls.is_empty() {
            return Ok(());
        }
        for (token, answer) in rt.block_on(callout::perform_all(calls, limit)) {
            vm.call_response(token, answer, &mut Exchange::default())?;
        }
    }
}
