//! A plugin's background instance: one VM on a thread of its own, for what belongs to no
//! request: ticks (`proxy_on_tick`), the shared queues it registered (`proxy_on_queue_ready`),
//! the calls out its root context makes from those (this thread waits for them: a tick comes
//! late rather than overlapping its calls), the gRPC streams it opens (what they bring is
//! delivered as it comes, between ticks), and the whole life of a service plugin. The
//! instance is made when first needed (at once for a service plugin, whose root context then
//! registers its queues) and rebuilt after a failure (its streams end with it); the thread
//! ends when the plugin is unloaded.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Weak};

use tokio::sync::mpsc::{self, UnboundedReceiver};

use super::callout::{self, Answer};
use super::grpc_stream::{StreamEvent, Streams};
use super::host::{Exchange, Vm};
use super::ticks::{next_event, Schedule};
use super::{engine, Plugin};

/// Starts `plugin`'s background thread.
pub(super) fn start(plugin: &Arc<Plugin>) {
    let (wake, woken) = mpsc::unbounded_channel();
    plugin.shared.set_wake(wake);
    let weak = Arc::downgrade(plugin);
    let _ = std::thread::Builder::new()
        .name(format!("moltghost-wasm-bg-{}", plugin.cfg.name))
        .spawn(move || run(weak, woken));
}

/// What woke the background loop.
enum Event {
    Queue(u32),
    Stream(u32, StreamEvent),
    Timeout,
}

fn run(weak: Weak<Plugin>, mut woken: UnboundedReceiver<u32>) {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return;
    };
    rt.block_on(async move {
        let mut bg = Background {
            vm: None,
            streams: None,
        };
        let mut schedule = Schedule::new();
        loop {
            let Some(p) = weak.upgrade() else { return };
            if p.cfg.service && bg.vm.is_none() {
                bg.deliver(&p, |_| Ok(())).await;
            }
            let wait = schedule.wait(&p);
            drop(p);
            let event = tokio::select! {
                queue = woken.recv() => match queue {
                    Some(queue) => Event::Queue(queue),
                    None => return,
                },
                (token, e) = next_event(&mut bg.streams) => Event::Stream(token, e),
                () = tokio::time::sleep(wait) => Event::Timeout,
            };
            let Some(p) = weak.upgrade() else { return };
            match event {
                Event::Queue(queue) => bg.deliver(&p, |v| v.queue_ready(queue)).await,
                Event::Stream(token, e) => {
                    let answer = Answer::Stream(e);
                    bg.deliver(&p, |v| {
                        v.call_response(token, answer, None, &mut Exchange::default())
                    })
                    .await;
                }
                Event::Timeout if schedule.due(&p) => {
                    bg.deliver(&p, Vm::tick).await;
                }
                Event::Timeout => {}
            }
        }
    });
}

/// The background instance and the streams its root context opened.
struct Background {
    vm: Option<Vm>,
    streams: Option<Streams>,
}

impl Background {
    /// Runs `f` on the background instance (made if there is none), then what it asked for; a
    /// failure drops the instance (and its streams), to be rebuilt when next needed.
    async fn deliver(&mut self, p: &Plugin, f: impl FnOnce(&mut Vm) -> Result<(), String>) {
        if self.vm.is_none() {
            match p
                .compiled
                .instantiate(engine(), p.shared.clone(), p.cfg.deadline)
            {
                Ok(v) => self.vm = Some(v),
                Err(e) => {
                    tracing::warn!(plugin = %p.cfg.name, error = %e, "plugin's background instance failed to start");
                    return;
                }
            }
        }
        let Some(v) = self.vm.as_mut() else { return };
        let r = match f(v) {
            Ok(()) => self.settle(p.cfg.buffer_bytes).await,
            Err(e) => Err(e),
        };
        if let Err(e) = r {
            p.failures.fetch_add(1, Relaxed);
            tracing::warn!(plugin = %p.cfg.name, error = %e, "plugin's background call failed: its instance is rebuilt");
            self.vm = None;
            self.streams = None;
        }
    }

    /// Carries out what the root context asked of its streams, and makes the calls it asked
    /// for (and those its callbacks ask for), delivering their answers, until none is pending.
    async fn settle(&mut self, limit: usize) -> Result<(), String> {
        loop {
            let Some(vm) = self.vm.as_mut() else {
                return Ok(());
            };
            let calls = vm.take_outbox().open_streams(&mut self.streams, limit);
            if calls.is_empty() {
                return Ok(());
            }
            for (token, answer) in callout::perform_all(calls, limit).await {
                vm.call_response(token, answer, None, &mut Exchange::default())?;
            }
        }
    }
}
