//! Request ids: the client's own `x-request-id` when it is sane, else a fresh one.

use std::sync::atomic::{AtomicU64, Ordering};

/// Makes request ids: a random per-process prefix and a counter (unique, cheap, no syscalls).
pub struct RequestIds {
    prefix: u64,
    counter: AtomicU64,
}

impl Default for RequestIds {
    fn default() -> Self {
        Self {
            prefix: rand::random::<u64>() & 0xffff_ffff_ffff,
            counter: AtomicU64::new(0),
        }
    }
}

impl RequestIds {
    /// The id for a request that carried `client_id` (the value of its `x-request-id`).
    pub fn for_request(&self, client_id: Option<&[u8]>) -> String {
        match client_id {
            Some(id)
                if !id.is_empty() && id.len() <= 128 && id.iter().all(|b| b.is_ascii_graphic()) =>
            {
                String::from_utf8_lossy(id).into_owned()
            }
            _ => format!(
                "req_{:012x}{:08x}",
                self.prefix,
                self.counter.fetch_add(1, Ordering::Relaxed)
            ),
        }
    }
}
