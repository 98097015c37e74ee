//! A plugin call's deadline in CPU time, on wasmtime's wall-clock epochs.
//!
//! Epoch interruption is cheap (a counter the engine's thread ticks every millisecond) but it
//! measures wall time: a worker the kernel takes off the CPU for 10 ms in the middle of a
//! 50 µs call would see that call "overrun" a 10 ms deadline, and the request would follow
//! the plugin's fail policy (refused, or let through unchecked) because the machine was busy.
//! So the epoch deadline is only the moment to look: when it passes, the call is stopped if its
//! thread has really been on the CPU for a good part of the last window, and given another
//! window otherwise — up to a wall-time ceiling, so that a call starved of CPU still ends.
//! Reading the thread's CPU clock happens only when a deadline passes, never on a normal call.

use std::time::Duration;

/// How many windows past the first a call may be given while its thread is kept off the CPU.
const MAX_EXTENSIONS: u32 = 9;

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
