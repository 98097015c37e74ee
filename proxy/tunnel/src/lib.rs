//! Userspace WireGuard for MoltGhost: the edge reaches each agent pod through a tunnel (no
//! kernel module, no privileges), and the pod's sidecar terminates it with the same code.
//!
//! - [`core`]: the state machine without I/O (boringtun's noise and smoltcp's TCP for one peer):
//!   datagrams, ticks and stream operations in; datagrams to send and packets delivered out.
//! - [`link`]: the device layer around it: the UDP socket, the timer task, wakers, and
//!   connections as tokio streams.
//! - [`peer`]: what a peer is (role, configuration, addresses, counters), shared by both.
//! - [`tun`]: the pod's `--tun` mode, where its kernel's TCP carries the connections.
//! - [`keys`]: x25519 keys in `wg`'s base64.

pub mod core;
pub mod keys;
pub mod link;
pub mod peer;
mod queue;
pub mod tun;

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;

pub use link::{Link, LinkStatus, Stream};
pub use peer::{Counters, LinkConfig, Role, EDGE_ADDR, POD_ADDR};

/// The port the runtime is reached on inside a pod's tunnel.
pub const POD_PORT: u16 = 80;

/// UDP buffers: at the kernel's default (~200 KiB) about 10% of a fast stream's packets were
/// dropped on loopback.
const UDP_BUFFER: libc::c_int = 4 << 20;

/// Binds the UDP socket a tunnel speaks through: non-blocking, with 4 MiB buffers (forced past
/// `net.core.rmem_max` where the process may). Returns the sending half (usable from any
/// thread) and the receiving half (on the current tokio runtime).
pub fn bind_udp(addr: SocketAddr) -> io::Result<(Arc<UdpSocket>, tokio::net::UdpSocket)> {
    let udp = UdpSocket::bind(addr)?;
    udp.set_nonblocking(true)?;
    for (force, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        if setsockopt(&udp, force).is_err() {
            let _ = setsockopt(&udp, plain);
        }
    }
    let recv = tokio::net::UdpSocket::from_std(udp.try_clone()?)?;
    Ok((Arc::new(udp), recv))
}

fn setsockopt(udp: &UdpSocket, opt: libc::c_int) -> io::Result<()> {
    let v = UDP_BUFFER;
    // SAFETY: a valid socket and a c_int option value of the right size.
    let r = unsafe {
        libc::setsockopt(
            udp.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Receives datagrams for ever, in batches (what is waiting, up to 64 at a time), and hands
/// each batch to `deliver`. Batching lets the TCP stack run once per batch, not per packet.
pub async fn receive(
    udp: tokio::net::UdpSocket,
    mut deliver: impl FnMut(&mut dyn Iterator<Item = (&[u8], SocketAddr)>),
) {
    const BATCH: usize = 64;
    const ROOM: usize = 65_536;
    let mut buf = vec![0u8; BATCH * ROOM];
    let mut meta: Vec<(usize, usize, SocketAddr)> = Vec::with_capacity(BATCH);
    loop {
        meta.clear();
        match udp.recv_from(&mut buf[..ROOM]).await {
            Ok((n, from)) => meta.push((0, n, from)),
            Err(e) => {
                tracing::debug!(error = %e, "tunnel receive");
                continue;
            }
        }
        while meta.len() < BATCH {
            let at = meta.len() * ROOM;
            match udp.try_recv_from(&mut buf[at..at + ROOM]) {
                Ok((n, from)) => meta.push((at, n, from)),
                Err(_) => break,
            }
        }
        deliver(&mut meta.iter().map(|&(at, n, from)| (&buf[at..at + n], from)));
    }
}
