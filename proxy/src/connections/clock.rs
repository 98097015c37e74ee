//! The header clock: when the header a connection waits for must be in.
//!
//! Shared by the connection (which closes it when the clock runs out), its [`ClientStream`]
//! (which notes header bytes arriving, and knows that a write while the clock runs is not an
//! answer of the edge's) and the edge's phases (which stop and restart it).
//!
//! [`ClientStream`]: super::stream::ClientStream

use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// When the header the connection waits for must be in; none while a request is served.
#[derive(Clone)]
pub(super) struct HeaderClock(Arc<ClockState>);

struct ClockState {
    /// Milliseconds after [`epoch`]; `u64::MAX`: no deadline.
    deadline_ms: AtomicU64,
    /// Bumped by every [`HeaderClock::set`]: one wait for one header.
    wait: AtomicU64,
    /// The wait in which bytes of the header arrived (`u64::MAX`: none yet).
    begun_in: AtomicU64,
    changed: Notify,
}

/// The origin of deadlines stored as milliseconds.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl HeaderClock {
    /// A clock running out `within` from now.
    pub(super) fn starting(within: Duration) -> Self {
        let c = Self(Arc::new(ClockState {
            deadline_ms: AtomicU64::new(u64::MAX),
            wait: AtomicU64::new(0),
            begun_in: AtomicU64::new(u64::MAX),
            changed: Notify::new(),
        }));
        c.set(Some(within));
        c
    }

    /// Runs out `within` from now, or never (`None`: a request is being answered).
    pub(super) fn set(&self, within: Option<Duration>) {
        let ms = within.map_or(u64::MAX, |w| {
            (Instant::now() + w - epoch()).as_millis() as u64
        });
        self.0.wait.fetch_add(1, Ordering::AcqRel);
        self.0.deadline_ms.store(ms, Ordering::Release);
        self.0.changed.notify_one();
    }

    /// Whether a header is awaited (no request is being answered).
    pub(super) fn running(&self) -> bool {
        self.0.deadline_ms.load(Ordering::Acquire) != u64::MAX
    }

    /// Bytes arrived from the client; while a header is awaited, they are its beginning.
    pub(super) fn note_bytes(&self) {
        if self.running() {
            let wait = self.0.wait.load(Ordering::Acquire);
            self.0.begun_in.store(wait, Ordering::Release);
        }
    }

    /// Which wait for a header this is (a new one after every header read and every answer).
    pub(super) fn wait(&self) -> u64 {
        self.0.wait.load(Ordering::Acquire)
    }

    /// Whether the awaited header has begun to arrive (a client that has sent nothing since its
    /// last answer is idle, not slow).
    pub(super) fn begun(&self) -> bool {
        self.running()
            && self.0.begun_in.load(Ordering::Acquire) == self.0.wait.load(Ordering::Acquire)
    }

    fn deadline(&self) -> Option<Instant> {
        match self.0.deadline_ms.load(Ordering::Acquire) {
            u64::MAX => None,
            ms => Some(epoch() + Duration::from_millis(ms)),
        }
    }

    /// Resolves when the clock runs out.
    pub(super) async fn expired(&self) {
        loop {
            let mut changed = pin!(self.0.changed.notified());
            changed.as_mut().enable();
            match self.deadline() {
                None => changed.await,
                Some(at) if at <= Instant::now() => return,
                Some(at) => {
                    tokio::select! {
                        () = tokio::time::sleep_until(at) => {}
                        () = changed => {}
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_clock_runs_only_while_a_header_is_awaited() {
        let clock = HeaderClock::starting(Duration::from_secs(10));
        let t0 = Instant::now();
        let watch = clock.clone();
        let expired = tokio::spawn(async move {
            watch.expired().await;
            Instant::now()
        });
        tokio::time::sleep(Duration::from_secs(5)).await;
        clock.set(None); // a header is in: a long answer follows
        tokio::time::sleep(Duration::from_secs(100)).await;
        assert!(!expired.is_finished());
        clock.set(Some(Duration::from_secs(3))); // answered: the next header is awaited
        let at = expired.await.unwrap();
        assert_eq!((at - t0).as_secs(), 108);
    }

    #[test]
    fn a_header_has_begun_only_with_bytes_in_this_wait() {
        let clock = HeaderClock::starting(Duration::from_secs(10));
        assert!(!clock.begun());
        clock.note_bytes();
        assert!(clock.begun());
        clock.set(None); // being answered: a request body's bytes are not a header
        clock.note_bytes();
        assert!(!clock.begun());
        clock.set(Some(Duration::from_secs(10))); // the next wait starts idle
        assert!(!clock.begun());
    }
}
