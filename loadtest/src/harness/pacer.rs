//! The pacer: a dedicated thread that releases each request at its intended send time.
//!
//! It sleeps with a 1 ns timer slack until just before the time, then spins the last few
//! microseconds, so sends leave within a few microseconds of schedule without burning a core
//! (these machines have two). Each tick carries its intended time; latency is measured from it.

use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

/// How arrivals are spaced.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub enum Arrivals {
    /// Evenly, `1/rate` apart.
    Constant,
    /// A Poisson process (exponential gaps), seeded for repeatability.
    Poisson {
        /// RNG seed.
        seed: u64,
    },
}

/// The last stretch before a send time that is spun rather than slept.
const SPIN: Duration = Duration::from_micros(30);

/// Lowers this thread's timer slack so sleeps end close to when asked (Linux).
fn tighten_timer_slack() {
    // SAFETY: PR_SET_TIMERSLACK takes an integer and affects only the calling thread.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0);
    }
}

/// Sleeps then spins until `t`.
pub fn wait_until(t: Instant) {
    let now = Instant::now();
    if t > now + SPIN {
        std::thread::sleep(t - now - SPIN);
    }
    while Instant::now() < t {
        std::hint::spin_loop();
    }
}

/// Runs the schedule on its own thread, sending each intended time to `tx`, from `start` for
/// `duration` at `rate` per second.
pub fn spawn(
    rate: f64,
    arrivals: Arrivals,
    start: Instant,
    duration: Duration,
    tx: tokio::sync::mpsc::UnboundedSender<Instant>,
) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("pacer".into())
        .spawn(move || {
            tighten_timer_slack();
            let end = start + duration;
            let mean = 1.0 / rate;
            let mut rng = rand::rngs::StdRng::seed_from_u64(match arrivals {
                Arrivals::Poisson { seed } => seed,
                Arrivals::Constant => 0,
            });
            let mut offset = 0.0f64;
            loop {
                let t = start + Duration::from_secs_f64(offset);
                if t >= end {
                    return;
                }
                wait_until(t);
                if tx.send(t).is_err() {
                    return;
                }
                offset += match arrivals {
                    Arrivals::Constant => mean,
                    Arrivals::Poisson { .. } => -mean * (1.0 - rng.gen::<f64>()).ln(),
                };
            }
        })
        .expect("spawn the pacer thread")
}
