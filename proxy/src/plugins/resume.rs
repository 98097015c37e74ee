//! A paused request resumed from another context of its VM. As on Envoy, a callback may choose
//! another request's context (`proxy_set_effective_context`) and resume, answer or reset it:
//! a root context's tick resuming the requests it postponed (the Go SDK's `postpone_requests`),
//! or one request's call answer releasing others that waited for it. Every context of a worker's
//! VM lives on that worker's thread, so the waiting is a thread-local table: a request paused
//! with nothing of its own pending registers here ([`wait`]), and what another callback asked
//! of it reaches it through [`wake`] once that callback returns.

use std::cell::RefCell;
use std::collections::HashMap;
use std::time::Duration;

use tokio::sync::oneshot;

use super::host::LocalResponse;

/// What another context asked of a paused request.
#[derive(Debug)]
pub enum Resume {
    /// `proxy_continue_stream`: go on.
    Continue,
    /// `proxy_close_stream`: end it as a reset.
    Reset,
    /// `proxy_send_local_response`: answer it.
    Respond(LocalResponse),
}

/// A waiting context: its plugin, its VM's generation, its id.
type Key = (u64, u64, i32);

thread_local! {
    static WAITING: RefCell<HashMap<Key, oneshot::Sender<Resume>>> = RefCell::new(HashMap::new());
}

/// Waits at most `limit` for another callback to act on context `context` of generation
/// `generation` of plugin `plugin`'s VM on this thread; `None` past the limit.
pub async fn wait(plugin: u64, generation: u64, context: i32, limit: Duration) -> Option<Resume> {
    let key = (plugin, generation, context);
    let (tx, rx) = oneshot::channel();
    WAITING.with(|w| w.borrow_mut().insert(key, tx));
    // Unregistered however the wait ends (also when the request is dropped meanwhile).
    let _registered = Registered(key);
    tokio::time::timeout(limit, rx).await.ok()?.ok()
}

struct Registered(Key);

impl Drop for Registered {
    fn drop(&mut self) {
        WAITING.with(|w| w.borrow_mut().remove(&self.0));
    }
}

/// Hands what a callback of plugin `plugin`'s VM (generation `generation`) asked of other
/// contexts to those waiting; a context that is not waiting ignores it (a request that is not
/// paused has nothing to resume).
pub fn wake(plugin: u64, generation: u64, resumes: Vec<(i32, Resume)>) {
    for (context, resume) in resumes {
        let waiter = WAITING.with(|w| w.borrow_mut().remove(&(plugin, generation, context)));
        if let Some(tx) = waiter {
            let _ = tx.send(resume);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_waiting_context_gets_what_was_asked_of_it_and_no_other_does() {
        let waiting = tokio::spawn(async { wait(7, 1, 3, Duration::from_secs(5)).await });
        tokio::task::yield_now().await;
        wake(7, 2, vec![(3, Resume::Reset)]);
        wake(7, 1, vec![(4, Resume::Reset), (3, Resume::Continue)]);
        assert!(matches!(waiting.await.unwrap(), Some(Resume::Continue)));
        assert!(WAITING.with(|w| w.borrow().is_empty()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_ends_at_its_limit_and_leaves_nothing_behind() {
        assert!(wait(7, 1, 3, Duration::from_millis(10)).await.is_none());
        assert!(WAITING.with(|w| w.borrow().is_empty()));
    }
}
