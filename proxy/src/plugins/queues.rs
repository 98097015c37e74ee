//! Shared queues, as Envoy has them: a queue is registered by name within a VM id
//! (`proxy_register_shared_queue`; registering again returns the same id and makes the caller
//! its receiver), found from any plugin by VM id and name (`proxy_resolve_shared_queue`), and
//! fed and drained by id (`proxy_enqueue_shared_queue`, `proxy_dequeue_shared_queue`). An
//! enqueue wakes the receiver: `proxy_on_queue_ready` on the registering plugin's background
//! instance (where a service plugin lives, and where ticks run). Queues live as long as the
//! process, like shared data, and each holds at most [`MAX_QUEUE_BYTES`].

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard, OnceLock};

use wasmtime::{Caller, Linker};

use super::abi::Status;
use super::calls::{give, read, write_u32};
use super::host::Host;

/// The most a queue may hold, its items together; past it an enqueue is refused.
pub const MAX_QUEUE_BYTES: usize = 16 << 20;
/// Queues the process may have.
pub const MAX_QUEUES: usize = 4_096;

/// Where a queue's receiver is woken: the background loop of the plugin that registered it.
pub type Wake = tokio::sync::mpsc::UnboundedSender<u32>;

#[derive(Default)]
struct Queue {
    items: VecDeque<Vec<u8>>,
    bytes: usize,
    wake: Option<Wake>,
}

#[derive(Default)]
struct Queues {
    by_name: HashMap<(String, String), u32>,
    queues: HashMap<u32, Queue>,
}

fn queues() -> MutexGuard<'static, Queues> {
    static QUEUES: OnceLock<Mutex<Queues>> = OnceLock::new();
    QUEUES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

/// The id of queue `name` in `vm_id`, made now if new; `wake` becomes its receiver.
pub fn register(vm_id: &str, name: &str, wake: Option<Wake>) -> Result<u32, Status> {
    let mut q = queues();
    let key = (vm_id.to_owned(), name.to_owned());
    let id = match q.by_name.get(&key) {
        Some(&id) => id,
        None if q.queues.len() >= MAX_QUEUES => return Err(Status::InternalFailure),
        None => {
            let id = q.queues.len() as u32 + 1;
            q.by_name.insert(key, id);
            q.queues.insert(id, Queue::default());
            id
        }
    };
    if let (Some(w), Some(queue)) = (wake, q.queues.get_mut(&id)) {
        queue.wake = Some(w);
    }
    Ok(id)
}

/// The id of queue `name` in `vm_id`, if registered.
pub fn resolve(vm_id: &str, name: &str) -> Option<u32> {
    queues()
        .by_name
        .get(&(vm_id.to_owned(), name.to_owned()))
        .copied()
}

/// Adds `item` to queue `id` and wakes its receiver.
pub fn enqueue(id: u32, item: Vec<u8>) -> Status {
    let mut q = queues();
    let Some(queue) = q.queues.get_mut(&id) else {
        return Status::NotFound;
    };
    if queue.bytes + item.len() > MAX_QUEUE_BYTES {
        return Status::InternalFailure;
    }
    queue.bytes += item.len();
    queue.items.push_back(item);
    if let Some(w) = &queue.wake {
        // A receiver gone (its plugin unloaded) leaves the items for the next one.
        let _ = w.send(id);
    }
    Status::Ok
}

/// The oldest item of queue `id`: `Empty` when there is none.
pub fn dequeue(id: u32) -> Result<Vec<u8>, Status> {
    let mut q = queues();
    let queue = q.queues.get_mut(&id).ok_or(Status::NotFound)?;
    let item = queue.items.pop_front().ok_or(Status::Empty)?;
    queue.bytes -= item.len();
    Ok(item)
}

/// Defines the four shared-queue calls.
pub(super) fn define(l: &mut Linker<Host>) -> wasmtime::Result<()> {
    l.func_wrap(
        "env",
        "proxy_register_shared_queue",
        |mut c: Caller<'_, Host>, np: i32, nl: i32, token_ptr: i32| -> i32 {
            let Some(name) = read(&mut c, np, nl) else {
                return Status::InvalidMemoryAccess as i32;
            };
            let shared = c.data().shared.clone();
            let wake = shared.wake();
            let name = String::from_utf8_lossy(&name);
            match register(&shared.vm_id, &name, wake) {
                Ok(id) => written(&mut c, token_ptr, id),
                Err(s) => {
                    shared.unsupported("proxy_register_shared_queue (over 4096 queues)", s as i32);
                    s as i32
                }
            }
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_resolve_shared_queue",
        |mut c: Caller<'_, Host>, vp: i32, vl: i32, np: i32, nl: i32, token_ptr: i32| -> i32 {
            let (Some(vm_id), Some(name)) = (read(&mut c, vp, vl), read(&mut c, np, nl)) else {
                return Status::InvalidMemoryAccess as i32;
            };
            let found = resolve(
                &String::from_utf8_lossy(&vm_id),
                &String::from_utf8_lossy(&name),
            );
            match found {
                Some(id) => written(&mut c, token_ptr, id),
                None => Status::NotFound as i32,
            }
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_enqueue_shared_queue",
        |mut c: Caller<'_, Host>, id: i32, dp: i32, dl: i32| -> i32 {
            let Some(item) = read(&mut c, dp, dl) else {
                return Status::InvalidMemoryAccess as i32;
            };
            let s = enqueue(id as u32, item);
            if s == Status::InternalFailure {
                c.data()
                    .shared
                    .unsupported("proxy_enqueue_shared_queue (queue full)", s as i32);
            }
            s as i32
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_dequeue_shared_queue",
        |mut c: Caller<'_, Host>, id: i32, ret_ptr: i32, ret_size: i32| -> wasmtime::Result<i32> {
            match dequeue(id as u32) {
                Ok(item) => Ok(give(&mut c, &item, ret_ptr, ret_size)? as i32),
                Err(s) => Ok(s as i32),
            }
        },
    )?;
    Ok(())
}

fn written(c: &mut Caller<'_, Host>, ptr: i32, id: u32) -> i32 {
    match write_u32(c, ptr, id) {
        Some(()) => Status::Ok as i32,
        None => Status::InvalidMemoryAccess as i32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_queue_is_found_by_vm_id_and_name_and_wakes_its_receiver() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let id = register("q-vm", "hits", None).unwrap();
        assert_eq!(register("q-vm", "hits", Some(tx)), Ok(id), "the same queue");
        assert_eq!(resolve("q-vm", "hits"), Some(id));
        assert_eq!(resolve("other-vm", "hits"), None);
        assert_eq!(dequeue(id), Err(Status::Empty));
        assert_eq!(enqueue(id, b"a".to_vec()), Status::Ok);
        assert_eq!(enqueue(id, b"b".to_vec()), Status::Ok);
        assert_eq!((rx.try_recv(), rx.try_recv()), (Ok(id), Ok(id)));
        assert_eq!(dequeue(id), Ok(b"a".to_vec()));
        assert_eq!(dequeue(id), Ok(b"b".to_vec()));
        assert_eq!(enqueue(u32::MAX, Vec::new()), Status::NotFound);
        assert_eq!(dequeue(u32::MAX), Err(Status::NotFound));
    }

    #[test]
    fn a_queue_is_bounded() {
        let id = register("q-vm", "big", None).unwrap();
        let big = vec![0u8; MAX_QUEUE_BYTES / 2];
        assert_eq!(enqueue(id, big.clone()), Status::Ok);
        assert_eq!(enqueue(id, big.clone()), Status::Ok);
        assert_eq!(enqueue(id, vec![0]), Status::InternalFailure);
        assert!(dequeue(id).is_ok());
        assert_eq!(enqueue(id, vec![0]), Status::Ok);
    }
}
