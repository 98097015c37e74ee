//! A plugin call's deadline in CPU time, on wasmtime's wall-clock epochs.
//!
//! Epoch interruption is cheap (a counter the engine's thread ticks every 5 ms) but it
//! measures wall time: a worker the kernel takes off the CPU for 10 ms in the middle of a
//! 50 µs call would see that call "overrun" a 10 ms deadline, and the request would follow
//! the plugin's fail policy (refused, or let through unchecked) because the machine was busy.
//! So the epoch deadline is only the moment to look: when it passes, the call is stopped if its
//! thread has really been on the CPU for a good part of the last window, and given another
//! window otherwise — up to a wall-time ceiling, so that a call starved of CPU still ends.
//! Reading the thread's CPU clock happens only when a deadline passes, never on a normal call.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::Duration;

/// How many windows past the first a call may be given while its thread is kept off the CPU.
const MAX_EXTENSIONS: u32 = 9;

/// The epoch ticker's pace while calls run, and the unit deadlines are counted in. Each tick
/// wakes a thread that may take a core from a worker in the middle of a plugin's few-µs call;
/// at 5 ms rather than 1 ms that happens a fifth as often (BENCHMARKS.md, "Plugin cost per
/// request"), and a 10 ms deadline is still two ticks.
pub const TICK: Duration = Duration::from_millis(5);
/// Its pace once no call has started for [`IDLE_AFTER`] ticks: an idle edge with plugins
/// loaded is woken 50 times a second, not 200. A call that starts meanwhile sees its first
/// tick at most this late.
const IDLE_TICK: Duration = Duration::from_millis(20);
/// Ticks without a call after which the ticker slows down.
const IDLE_AFTER: u32 = 40;

/// A call started since the ticker last looked.
static CALLED: AtomicBool = AtomicBool::new(false);

/// Notes that a call is about to run (read-mostly: a store only when the flag is clear, so
/// workers do not fight over the cache line).
pub fn note_call() {
    if !CALLED.load(Relaxed) {
        CALLED.store(true, Relaxed);
    }
}

/// How long the ticker sleeps before its next tick; `idle` counts its ticks without a call.
pub fn next_tick(idle: &mut u32) -> Duration {
    pace(CALLED.swap(false, Relaxed), idle)
}

/// The ticker's pace after a tick in which a call started (`called`) or not.
fn pace(called: bool, idle: &mut u32) -> Duration {
    *idle = if called { 0 } else { idle.saturating_add(1) };
    if *idle < IDLE_AFTER {
        TICK
    } else {
        IDLE_TICK
    }
}

/// What to do when a call's epoch deadline passes.
#[derive(Debug, PartialEq, Eq)]
pub enum Expiry {
    /// Look again after another window.
    Extend,
    /// Stop the call: it ran its deadline's worth of CPU, or the wall-time ceiling passed.
    Stop,
}

/// One call's deadline state (reset before every call).
#[derive(Debug, Default)]
pub struct CallClock {
    /// The thread's CPU time when the last window began (set at the first expiry).
    window_start: Option<Duration>,
    extensions: u32,
}

impl CallClock {
    /// Forgets the previous call.
    pub fn reset(&mut self) {
        *self = Self::default();
    }

    /// The deadline (`window` long) passed and the thread has used `cpu_now` of CPU in all.
    /// A call is stopped once a whole window passes in which it used at least half of it: a
    /// plugin that spins is stopped after about twice its deadline, one descheduled is not.
    pub fn expired(&mut self, window: Duration, cpu_now: Duration) -> Expiry {
        let ran = match self.window_start {
            // The first expiry: no CPU reading from the call's start (it would cost a system
            // call on every call); the next window is measured.
            None => Duration::ZERO,
            Some(start) => cpu_now.saturating_sub(start),
        };
        if ran >= window / 2 || self.extensions >= MAX_EXTENSIONS {
            return Expiry::Stop;
        }
        self.window_start = Some(cpu_now);
        self.extensions += 1;
        Expiry::Extend
    }
}

/// The CPU time this thread has used.
pub fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the clock id is a constant Linux supports.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        // Never seen on Linux; counting the call as busy keeps the deadline a deadline.
        return Duration::MAX;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_call_that_spins_is_stopped_after_its_second_window() {
        let mut c = CallClock::default();
        assert_eq!(c.expired(10 * MS, 100 * MS), Expiry::Extend);
        assert_eq!(c.expired(10 * MS, 109 * MS), Expiry::Stop);
    }

    #[test]
    fn a_call_kept_off_the_cpu_is_given_more_windows_up_to_the_ceiling() {
        let mut c = CallClock::default();
        let mut cpu = 100 * MS;
        for _ in 0..=MAX_EXTENSIONS - 1 {
            assert_eq!(c.expired(10 * MS, cpu), Expiry::Extend);
            cpu += MS;
        }
        assert_eq!(c.expired(10 * MS, cpu), Expiry::Stop);
    }

    #[test]
    fn reset_starts_the_next_call_afresh() {
        let mut c = CallClock::default();
        c.expired(10 * MS, Duration::ZERO);
        c.reset();
        assert_eq!(c.expired(10 * MS, 50 * MS), Expiry::Extend);
    }

    #[test]
    fn the_ticker_slows_down_only_when_no_call_starts() {
        let mut idle = 0;
        for _ in 0..IDLE_AFTER - 1 {
            assert_eq!(pace(false, &mut idle), TICK);
        }
        assert_eq!(pace(false, &mut idle), IDLE_TICK);
        assert_eq!(pace(true, &mut idle), TICK);
        assert_eq!(idle, 0);
    }

    #[test]
    fn the_threads_cpu_clock_advances_with_work() {
        let a = thread_cpu_time();
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        assert!(thread_cpu_time() > a);
    }
}
