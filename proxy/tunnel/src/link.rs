//! The device layer of one WireGuard peer: the [`Core`] (noise and TCP, no I/O) behind one
//! short-held mutex, the UDP socket it speaks through, the TUN device in the pod's `--tun`
//! mode, the timer task and the wakers. The edge is the initiator (it connects to the pod); the
//! pod's sidecar is the responder (it accepts on pre-created listening sockets, since smoltcp
//! has no backlog).
//!
//! Streams push their bytes into the core and send what it produced themselves (no hop through
//! a driver task on the request path); a timer task per link ticks the core, and a receive loop
//! feeds it datagrams.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use smoltcp::iface::SocketHandle;
use smoltcp::socket::tcp::State as TcpState;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;

use crate::core::Core;
use crate::peer::{Counters, LinkConfig};
use crate::tun::TunDevice;

/// A link's health, as `/v1/health` and `moltghost status` show it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LinkStatus {
    /// A handshake completed within the last 3 minutes (WireGuard's session lifetime).
    pub up: bool,
    /// Seconds since the last completed handshake.
    pub last_handshake_seconds_ago: Option<f64>,
    /// The peer's UDP address as last seen.
    pub endpoint: Option<String>,
    /// Datagrams received and sent.
    pub rx_packets: u64,
    /// Datagrams sent.
    pub tx_packets: u64,
    /// Payload bytes received and sent through the tunnel.
    pub rx_bytes: u64,
    /// Payload bytes sent.
    pub tx_bytes: u64,
    /// boringtun's packet-loss estimate (0..1) over recent sessions.
    pub loss: f32,
    /// Round-trip time of the last handshake, in milliseconds.
    pub rtt_ms: Option<u32>,
    /// Datagrams refused (wrong key, replays) and inner packets with a forged source.
    pub rejected: u64,
    /// Inner packets with a forged source address.
    pub spoofed: u64,
    /// Handshakes completed.
    pub handshakes: u64,
    /// Datagrams dropped because the UDP socket was full.
    pub send_drops: u64,
}

/// One WireGuard peer and the TCP connections inside its tunnel.
pub struct Link {
    state: Mutex<Device>,
    udp: Arc<UdpSocket>,
    wake: Notify,
    closed: AtomicBool,
    peer_key: [u8; 32],
    /// Traffic counters.
    pub counters: Arc<Counters>,
}

/// What the mutex guards: the core, and the device layer's own state beside it (so that a
/// waker is registered under the same lock the core's queue is checked under).
struct Device {
    core: Core,
    accept_waker: Option<Waker>,
    tun: Option<Arc<TunDevice>>,
}

impl Link {
    /// A link speaking through `udp` (shared with other links on a pod). Call
    /// [`Link::run_timers`] on a runtime and feed it datagrams with [`Link::input`].
    pub fn new(cfg: LinkConfig, udp: Arc<UdpSocket>) -> Arc<Self> {
        let peer_key = *cfg.peer.as_bytes();
        let counters = Arc::new(Counters::default());
        let core = Core::new(cfg, counters.clone(), Instant::now());
        Arc::new(Self {
            state: Mutex::new(Device {
                core,
                accept_waker: None,
                tun: None,
            }),
            udp,
            wake: Notify::new(),
            closed: AtomicBool::new(false),
            peer_key,
            counters,
        })
    }

    /// From now on, decrypted packets go to `tun` (the kernel's TCP) instead of the tunnel's
    /// own TCP stack; the kernel's answers come back through [`Link::send_packet`].
    pub fn attach_tun(&self, tun: Arc<TunDevice>) {
        let mut dev = self.lock();
        dev.core.deliver_raw();
        dev.tun = Some(tun);
    }

    /// Encrypts one inner packet (from a TUN device) and sends it to the peer.
    pub fn send_packet(&self, packet: &[u8]) {
        let mut dev = self.lock();
        dev.core.encapsulate(packet);
        self.flush(&mut dev);
    }

    /// When the peer was last heard from.
    pub fn last_heard(&self) -> Instant {
        self.lock().core.last_heard()
    }

    /// The peer's public key.
    pub fn peer_key(&self) -> &[u8; 32] {
        &self.peer_key
    }

    fn lock(&self) -> MutexGuard<'_, Device> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Feeds received datagrams through the core, then does what it asks (answers, packets).
    pub fn input<'a>(&self, datagrams: impl IntoIterator<Item = (&'a [u8], SocketAddr)>) {
        let mut dev = self.lock();
        let now = Instant::now();
        for (datagram, from) in datagrams {
            dev.core.input(datagram, from, now);
        }
        dev.core.pump(now);
        self.flush(&mut dev);
    }

    /// Runs the core's TCP stack now and does what it asks.
    fn pump(&self, dev: &mut Device) {
        dev.core.pump(Instant::now());
        self.flush(dev);
    }

    /// Does what the core asked: datagrams to the peer, packets to the TUN device, a waiting
    /// acceptor and the timer task woken.
    fn flush(&self, dev: &mut Device) {
        let io = &mut dev.core.io;
        while let Some((datagram, to)) = io.transmit.pop_front() {
            send(&self.udp, &self.counters, &datagram, to);
            io.recycle(datagram);
        }
        while let Some(packet) = io.delivered.pop_front() {
            if let Some(t) = &dev.tun {
                t.write(&packet);
            }
            io.recycle(packet);
        }
        if std::mem::take(&mut io.accepted) {
            if let Some(w) = dev.accept_waker.take() {
                w.wake();
            }
        }
        if std::mem::take(&mut io.wake_timer) {
            self.wake.notify_one();
        }
    }

    /// Ticks the core's timers until [`Link::close`]: when the core says they are due, or
    /// sooner when a stream's activity brings a TCP timer forward.
    pub async fn run_timers(self: Arc<Self>) {
        while !self.closed.load(Relaxed) {
            let sleep = {
                let mut dev = self.lock();
                let sleep = dev.core.tick(Instant::now());
                self.flush(&mut dev);
                sleep
            };
            tokio::select! {
                _ = tokio::time::sleep(sleep) => {}
                _ = self.wake.notified() => {}
            }
        }
    }

    /// Stops the timer task; open streams end.
    pub fn close(&self) {
        self.closed.store(true, Relaxed);
        self.wake.notify_one();
        let mut dev = self.lock();
        dev.core.abort_all(Instant::now());
        self.flush(&mut dev);
    }

    /// Opens a TCP connection to `port` on the pod, through the tunnel (handshaking first if
    /// there is no session). Fails when the pod refuses or `timeout` passes.
    pub async fn connect(self: &Arc<Self>, port: u16, timeout: Duration) -> io::Result<Stream> {
        let handle = {
            let mut dev = self.lock();
            let handle = dev
                .core
                .connect(port, Instant::now())
                .map_err(io::Error::other)?;
            self.flush(&mut dev);
            handle
        };
        let stream = Stream {
            link: self.clone(),
            handle,
        };
        let established = std::future::poll_fn(|cx| {
            let mut dev = self.lock();
            let sock = dev.core.socket(handle);
            match sock.state() {
                TcpState::SynSent | TcpState::SynReceived => {
                    sock.register_send_waker(cx.waker());
                    Poll::Pending
                }
                TcpState::Established => Poll::Ready(Ok(())),
                _ => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    "the pod refused the connection inside the tunnel",
                ))),
            }
        });
        match tokio::time::timeout(timeout, established).await {
            Ok(Ok(())) => Ok(stream),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no connection through the tunnel in time (is the pod up, and does it know this edge's key?)",
            )),
        }
    }

    /// The next connection the peer opened (responder links only).
    pub async fn accept(self: &Arc<Self>) -> Stream {
        let handle = std::future::poll_fn(|cx| {
            let mut dev = self.lock();
            match dev.core.accept() {
                Some(h) => Poll::Ready(h),
                None => {
                    dev.accept_waker = Some(cx.waker().clone());
                    Poll::Pending
                }
            }
        })
        .await;
        Stream {
            link: self.clone(),
            handle,
        }
    }

    /// The link's health.
    pub fn status(&self) -> LinkStatus {
        let dev = self.lock();
        let (since, tx, rx, loss, rtt) = dev.core.stats();
        LinkStatus {
            up: since.is_some_and(|d| d < Duration::from_secs(180)),
            last_handshake_seconds_ago: since.map(|d| d.as_secs_f64()),
            endpoint: dev.core.endpoint().map(|e| e.to_string()),
            rx_packets: self.counters.rx_datagrams.load(Relaxed),
            tx_packets: self.counters.tx_datagrams.load(Relaxed),
            rx_bytes: rx as u64,
            tx_bytes: tx as u64,
            loss,
            rtt_ms: rtt,
            rejected: self.counters.rejected.load(Relaxed),
            spoofed: self.counters.spoofed.load(Relaxed),
            handshakes: self.counters.handshakes.load(Relaxed),
            send_drops: self.counters.send_drops.load(Relaxed),
        }
    }
}

fn send(udp: &UdpSocket, counters: &Counters, datagram: &[u8], to: SocketAddr) {
    match udp.send_to(datagram, to) {
        Ok(_) => {
            counters.tx_datagrams.fetch_add(1, Relaxed);
        }
        Err(_) => {
            counters.send_drops.fetch_add(1, Relaxed);
        }
    }
}

/// A TCP connection inside the tunnel, as a tokio byte stream.
pub struct Stream {
    link: Arc<Link>,
    handle: SocketHandle,
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut dev = self.link.lock();
        let sock = dev.core.socket(self.handle);
        if sock.can_recv() {
            // A window that was more than half full reopens: tell the peer now.
            let was_full = sock.recv_queue() * 2 > sock.recv_capacity();
            let n = sock.recv_slice(buf.initialize_unfilled()).unwrap_or(0);
            buf.advance(n);
            if was_full {
                self.link.pump(&mut dev);
            }
            return Poll::Ready(Ok(()));
        }
        match sock.state() {
            TcpState::Listen | TcpState::SynSent | TcpState::SynReceived => {}
            _ if sock.may_recv() => {}
            // The peer finished sending, or the connection is gone: end of stream.
            _ => return Poll::Ready(Ok(())),
        }
        sock.register_recv_waker(cx.waker());
        Poll::Pending
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut dev = self.link.lock();
        let sock = dev.core.socket(self.handle);
        if sock.can_send() {
            let n = sock.send_slice(data).unwrap_or(0);
            self.link.pump(&mut dev);
            return Poll::Ready(Ok(n));
        }
        match sock.state() {
            TcpState::Listen | TcpState::SynSent | TcpState::SynReceived => {}
            _ if sock.may_send() => {}
            _ => {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "the tunnel connection is closed",
                )))
            }
        }
        sock.register_send_waker(cx.waker());
        Poll::Pending
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Every write already went out.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut dev = self.link.lock();
        dev.core.socket(self.handle).close();
        self.link.pump(&mut dev);
        Poll::Ready(Ok(()))
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        let mut dev = self.link.lock();
        dev.core.release(self.handle, Instant::now());
        self.link.flush(&mut dev);
    }
}
