//! One WireGuard peer: boringtun's noise state machine, a smoltcp interface carrying TCP inside
//! the tunnel, and the UDP socket it speaks through. The edge is the initiator (it connects to
//! the pod); the pod's sidecar is the responder (it accepts on pre-created listening sockets,
//! since smoltcp has no backlog).
//!
//! Everything lives behind one short-held mutex. Streams push their bytes into smoltcp and emit
//! the packets themselves (no hop through a driver task on the request path); a timer task per
//! link ticks boringtun's timers (handshakes, keep-alive, rekeying) and smoltcp's
//! (retransmits), and a receive loop feeds it datagrams.

use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use smoltcp::iface::{Config as IfaceConfig, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{Device, DeviceCapabilities, Medium, RxToken, TxToken};
use smoltcp::socket::tcp::{self, State as TcpState};
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;

/// The edge's address inside every tunnel.
pub const EDGE_ADDR: Ipv4Addr = Ipv4Addr::new(10, 7, 0, 1);
/// The pod's address inside every tunnel.
pub const POD_ADDR: Ipv4Addr = Ipv4Addr::new(10, 7, 0, 2);
/// How often boringtun's timers are ticked (it asks for every 100–250 ms).
const TICK: Duration = Duration::from_millis(100);
/// Each direction of each TCP connection in the tunnel buffers this much.
const SOCKET_BUFFER: usize = 256 * 1024;
/// How long an ACK waits for data to carry it.
const ACK_DELAY: smoltcp::time::Duration = smoltcp::time::Duration::from_millis(1);
/// How long a peer we wait on may stay silent before a fresh handshake is forced.
const SILENCE: Duration = Duration::from_secs(1);
/// A closed stream whose peer never finishes the close is dropped after this long.
const LINGER: Duration = Duration::from_secs(30);
/// Room for the largest datagram: a full inner packet plus WireGuard's overhead.
const DATAGRAM_ROOM: usize = 65_536 + 148;

/// Which side of the tunnel this is.
#[derive(Debug, Clone, Copy)]
pub enum Role {
    /// The edge: opens connections to the pod.
    Initiator,
    /// The pod: accepts connections on `port`, with `backlog` listening sockets kept ready.
    Responder {
        /// The port the runtime is reached on inside the tunnel.
        port: u16,
        /// How many connection attempts may arrive at once.
        backlog: usize,
    },
}

/// What a link is made of.
pub struct LinkConfig {
    /// This side's private key.
    pub secret: StaticSecret,
    /// The other side's public key: the only one this link talks to.
    pub peer: PublicKey,
    /// Optional preshared key (post-quantum hedge, as in `wg`).
    pub preshared: Option<[u8; 32]>,
    /// Where the peer is, when known (the initiator always knows; a responder learns it).
    pub endpoint: Option<SocketAddr>,
    /// Initiator or responder.
    pub role: Role,
    /// This link's index (boringtun's session indexes are `index << 8 | n`).
    pub index: u32,
    /// Largest inner packet (1420 fits any path; loopback can take far more).
    pub mtu: usize,
    /// Persistent keep-alive in seconds, as `wg`'s `PersistentKeepalive`.
    pub keepalive: Option<u16>,
}

/// Counters a link keeps, read by health and metrics.
#[derive(Default, Debug)]
pub struct Counters {
    /// Datagrams received and accepted by the noise layer.
    pub rx_datagrams: AtomicU64,
    /// Datagrams sent.
    pub tx_datagrams: AtomicU64,
    /// Datagrams the noise layer refused (bad MAC, replay, unknown session).
    pub rejected: AtomicU64,
    /// Decrypted packets whose inner source was not the peer's address: dropped.
    pub spoofed: AtomicU64,
    /// Datagrams the UDP socket would not take (full buffer): dropped, TCP resends.
    pub send_drops: AtomicU64,
    /// Handshakes completed (initiations answered, responses accepted).
    pub handshakes: AtomicU64,
}

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
    state: Mutex<State>,
    udp: Arc<UdpSocket>,
    wake: Notify,
    closed: AtomicBool,
    peer_key: [u8; 32],
    /// Traffic counters.
    pub counters: Counters,
}

struct State {
    tunn: Tunn,
    endpoint: Option<SocketAddr>,
    iface: Interface,
    sockets: SocketSet<'static>,
    dev: Queue,
    out: Vec<u8>,
    local: IpAddress,
    peer: IpAddress,
    role: Role,
    next_port: u16,
    listeners: Vec<SocketHandle>,
    accepted: VecDeque<SocketHandle>,
    accept_waker: Option<Waker>,
    closing: Vec<(SocketHandle, Instant)>,
    next_tick: Instant,
    deadline: Instant,
    last_rx: Instant,
    last_forced: Instant,
    tun: Option<Arc<super::tun::TunDevice>>,
}

impl Link {
    /// A link speaking through `udp` (shared with other links on a pod). Call
    /// [`Link::run_timers`] on a runtime and feed it datagrams with [`Link::input`].
    pub fn new(cfg: LinkConfig, udp: Arc<UdpSocket>) -> Arc<Self> {
        let peer_key = *cfg.peer.as_bytes();
        let tunn = Tunn::new(
            cfg.secret,
            cfg.peer,
            cfg.preshared,
            cfg.keepalive,
            cfg.index,
            None,
        );
        let (local, peer) = match cfg.role {
            Role::Initiator => (EDGE_ADDR, POD_ADDR),
            Role::Responder { .. } => (POD_ADDR, EDGE_ADDR),
        };
        let mut dev = Queue {
            rx: VecDeque::new(),
            tx: VecDeque::new(),
            spare: Vec::new(),
            mtu: cfg.mtu,
        };
        let mut icfg = IfaceConfig::new(HardwareAddress::Ip);
        icfg.random_seed = rand::random();
        let mut iface = Interface::new(icfg, &mut dev, smoltcp::time::Instant::now());
        iface.update_ip_addrs(|a| {
            let _ = a.push(IpCidr::new(IpAddress::Ipv4(local), 24));
        });
        let now = Instant::now();
        let mut state = State {
            tunn,
            endpoint: cfg.endpoint,
            iface,
            sockets: SocketSet::new(Vec::new()),
            dev,
            out: vec![0; DATAGRAM_ROOM],
            local: IpAddress::Ipv4(local),
            peer: IpAddress::Ipv4(peer),
            role: cfg.role,
            next_port: 10_000 + rand::random::<u16>() % 50_000,
            listeners: Vec::new(),
            accepted: VecDeque::new(),
            accept_waker: None,
            closing: Vec::new(),
            next_tick: now,
            deadline: now,
            last_rx: now,
            last_forced: now,
            tun: None,
        };
        state.replenish_listeners();
        Arc::new(Self {
            state: Mutex::new(state),
            udp,
            wake: Notify::new(),
            closed: AtomicBool::new(false),
            peer_key,
            counters: Counters::default(),
        })
    }

    /// From now on, decrypted packets go to `tun` (the kernel's TCP) instead of smoltcp; the
    /// kernel's answers come back through [`Link::send_packet`].
    pub fn attach_tun(&self, tun: Arc<super::tun::TunDevice>) {
        self.lock().tun = Some(tun);
    }

    /// Encrypts one inner packet (from a TUN device) and sends it to the peer.
    pub fn send_packet(&self, packet: &[u8]) {
        let mut st = self.lock();
        let State {
            tunn,
            out,
            endpoint,
            ..
        } = &mut *st;
        if let TunnResult::WriteToNetwork(d) = tunn.encapsulate(packet, out) {
            if let Some(to) = *endpoint {
                send(&self.udp, &self.counters, d, to);
            }
        }
    }

    /// When the peer was last heard from.
    pub fn last_heard(&self) -> Instant {
        self.lock().last_rx
    }

    /// The peer's public key.
    pub fn peer_key(&self) -> &[u8; 32] {
        &self.peer_key
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Feeds received datagrams through the noise layer into the TCP stack, answers what must
    /// be answered (handshakes, cookies, then the packets queued while they were pending), and
    /// emits what TCP wants to send.
    pub fn input<'a>(&self, datagrams: impl IntoIterator<Item = (&'a [u8], SocketAddr)>) {
        let mut st = self.lock();
        let st = &mut *st;
        for (datagram, from) in datagrams {
            self.decapsulate(st, datagram, from);
        }
        self.pump(st);
    }

    fn decapsulate(&self, st: &mut State, datagram: &[u8], from: SocketAddr) {
        let State {
            tunn,
            out,
            dev,
            endpoint,
            peer,
            tun,
            last_rx,
            ..
        } = st;
        let packet = match tunn.decapsulate(Some(from.ip()), datagram, out) {
            TunnResult::Done => None,
            TunnResult::Err(e) => {
                self.counters.rejected.fetch_add(1, Relaxed);
                tracing::trace!(error = ?e, %from, "wireguard datagram refused");
                return;
            }
            TunnResult::WriteToNetwork(reply) => {
                send(&self.udp, &self.counters, reply, from);
                // A completed handshake releases the packets queued while it was pending.
                while let TunnResult::WriteToNetwork(queued) = tunn.decapsulate(None, &[], out) {
                    send(&self.udp, &self.counters, queued, from);
                }
                None
            }
            TunnResult::WriteToTunnelV4(p, src) => Some((p, IpAddr::V4(src))),
            TunnResult::WriteToTunnelV6(p, src) => Some((p, IpAddr::V6(src))),
        };
        self.counters.rx_datagrams.fetch_add(1, Relaxed);
        *last_rx = Instant::now();
        // Message types 1 and 2 (initiation, response) that passed the noise layer.
        if matches!(datagram.first(), Some(1 | 2)) {
            self.counters.handshakes.fetch_add(1, Relaxed);
        }
        // Authenticated: the peer is where this came from (roaming).
        if *endpoint != Some(from) {
            tracing::debug!(%from, "wireguard peer endpoint set");
            *endpoint = Some(from);
        }
        if let Some((p, src)) = packet {
            // boringtun does not check the inner source: only the peer's address may enter.
            if IpAddress::from(src) != *peer {
                self.counters.spoofed.fetch_add(1, Relaxed);
                return;
            }
            match tun {
                Some(t) => t.write(p),
                None => dev.push_rx(p),
            }
        }
    }

    /// Runs the TCP stack and sends what it produced, encrypted, to the peer.
    fn pump(&self, st: &mut State) {
        let now = smoltcp::time::Instant::now();
        st.iface.poll(now, &mut st.dev, &mut st.sockets);
        if matches!(st.role, Role::Responder { .. }) && st.take_accepted() {
            if let Some(w) = st.accept_waker.take() {
                w.wake();
            }
        }
        let State {
            tunn,
            out,
            dev,
            endpoint,
            ..
        } = st;
        while let Some(p) = dev.tx.pop_front() {
            if let TunnResult::WriteToNetwork(d) = tunn.encapsulate(&p, out) {
                if let Some(to) = *endpoint {
                    send(&self.udp, &self.counters, d, to);
                }
            }
            dev.spare.push(p);
        }
        // A retransmit or delayed ACK due before the timer task's next wake-up: wake it now.
        if let Some(d) = st.iface.poll_delay(now, &st.sockets) {
            if Instant::now() + Duration::from(d) < st.deadline {
                self.wake.notify_one();
            }
        }
    }

    /// Ticks the timers until [`Link::close`]: boringtun's (handshake retries, keep-alive,
    /// rekeying, session expiry) every 100 ms, smoltcp's when they are due, and closes the
    /// streams whose peer never finished closing.
    pub async fn run_timers(self: Arc<Self>) {
        while !self.closed.load(Relaxed) {
            let sleep = {
                let mut st = self.lock();
                let st = &mut *st;
                let now = Instant::now();
                if now >= st.next_tick {
                    st.next_tick = now + TICK;
                    let State {
                        tunn,
                        out,
                        endpoint,
                        ..
                    } = &mut *st;
                    if let TunnResult::WriteToNetwork(d) = tunn.update_timers(out) {
                        if let Some(to) = *endpoint {
                            send(&self.udp, &self.counters, d, to);
                        }
                    }
                    st.reap(now);
                    if st.peer_silent(now) {
                        self.rehandshake(st);
                    }
                }
                self.pump(st);
                let tcp = st
                    .iface
                    .poll_delay(smoltcp::time::Instant::now(), &st.sockets)
                    .map(Duration::from)
                    .unwrap_or(TICK);
                let sleep = tcp.min(st.next_tick.saturating_duration_since(now));
                st.deadline = now + sleep;
                sleep
            };
            tokio::select! {
                _ = tokio::time::sleep(sleep) => {}
                _ = self.wake.notified() => {}
            }
        }
    }

    /// Starts a handshake now, even though the session has not expired: the peer went silent
    /// while we wait on it, most likely because it restarted and lost the session. Its fresh
    /// TCP stack then resets the connections it no longer knows, and their users retry.
    fn rehandshake(&self, st: &mut State) {
        st.last_forced = Instant::now();
        let State {
            tunn,
            out,
            endpoint,
            ..
        } = st;
        if let TunnResult::WriteToNetwork(d) = tunn.format_handshake_initiation(out, true) {
            if let Some(to) = *endpoint {
                send(&self.udp, &self.counters, d, to);
            }
        }
    }

    /// Stops the timer task; open streams end.
    pub fn close(&self) {
        self.closed.store(true, Relaxed);
        self.wake.notify_one();
        let mut st = self.lock();
        for (_, s) in st.sockets.iter_mut() {
            let smoltcp::socket::Socket::Tcp(s) = s;
            s.abort();
        }
        self.pump(&mut st);
    }

    /// Opens a TCP connection to `port` on the pod, through the tunnel (handshaking first if
    /// there is no session). Fails when the pod refuses or `timeout` passes.
    pub async fn connect(self: &Arc<Self>, port: u16, timeout: Duration) -> io::Result<Stream> {
        let handle = {
            let mut st = self.lock();
            let st = &mut *st;
            let local_port = st.next_port;
            st.next_port = if local_port >= 60_000 {
                10_000
            } else {
                local_port + 1
            };
            let sock = new_socket();
            let handle = st.sockets.add(sock);
            let remote = (st.peer, port);
            let local = (st.local, local_port);
            let sock = st.sockets.get_mut::<tcp::Socket>(handle);
            if let Err(e) = sock.connect(st.iface.context(), remote, local) {
                st.sockets.remove(handle);
                return Err(io::Error::other(format!("tunnel connect: {e}")));
            }
            self.pump(st);
            handle
        };
        let stream = Stream {
            link: self.clone(),
            handle,
        };
        let established = std::future::poll_fn(|cx| {
            let mut st = self.lock();
            let sock = st.sockets.get_mut::<tcp::Socket>(handle);
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
            let mut st = self.lock();
            match st.accepted.pop_front() {
                Some(h) => Poll::Ready(h),
                None => {
                    st.accept_waker = Some(cx.waker().clone());
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
        let st = self.lock();
        let (since, tx, rx, loss, rtt) = st.tunn.stats();
        LinkStatus {
            up: since.is_some_and(|d| d < Duration::from_secs(180)),
            last_handshake_seconds_ago: since.map(|d| d.as_secs_f64()),
            endpoint: st.endpoint.map(|e| e.to_string()),
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

impl State {
    /// Moves listening sockets that a peer connected to into the accept queue and puts fresh
    /// ones in their place. True when something was accepted.
    fn take_accepted(&mut self) -> bool {
        let before = self.accepted.len();
        let mut i = 0;
        while i < self.listeners.len() {
            let h = self.listeners[i];
            if self.sockets.get::<tcp::Socket>(h).state() == TcpState::Listen {
                i += 1;
            } else {
                self.accepted.push_back(self.listeners.swap_remove(i));
            }
        }
        self.replenish_listeners();
        self.accepted.len() > before
    }

    /// True when this initiator waits on the peer (unacknowledged data, or a connection being
    /// opened) and has heard nothing from it for [`SILENCE`] (nor forced a handshake since).
    fn peer_silent(&self, now: Instant) -> bool {
        if !matches!(self.role, Role::Initiator)
            || now.duration_since(self.last_rx) < SILENCE
            || now.duration_since(self.last_forced) < SILENCE
        {
            return false;
        }
        self.sockets.iter().any(|(_, s)| {
            let smoltcp::socket::Socket::Tcp(s) = s;
            s.send_queue() > 0 || s.state() == TcpState::SynSent
        })
    }

    fn replenish_listeners(&mut self) {
        let Role::Responder { port, backlog } = self.role else {
            return;
        };
        while self.listeners.len() < backlog {
            let mut sock = new_socket();
            sock.listen(port).expect("a nonzero port");
            self.listeners.push(self.sockets.add(sock));
        }
    }

    /// Frees the sockets of dropped streams once closed, or after [`LINGER`].
    fn reap(&mut self, now: Instant) {
        let sockets = &mut self.sockets;
        self.closing.retain(|&(h, since)| {
            let sock = sockets.get_mut::<tcp::Socket>(h);
            let done = matches!(sock.state(), TcpState::Closed | TcpState::TimeWait);
            if done || now.duration_since(since) > LINGER {
                sock.abort();
                sockets.remove(h);
                false
            } else {
                true
            }
        });
    }
}

fn new_socket() -> tcp::Socket<'static> {
    let mut sock = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; SOCKET_BUFFER]),
        tcp::SocketBuffer::new(vec![0; SOCKET_BUFFER]),
    );
    // Tokens must leave at once: no Nagle. ACKs wait 1 ms for data to ride on (an answer, the
    // next request): measured, that nearly doubles requests per second over ACKing every
    // segment, while smoltcp's default 10 ms delay turned 1% loss into 1 s stalls.
    sock.set_nagle_enabled(false);
    sock.set_ack_delay(Some(ACK_DELAY));
    // A peer that acknowledges nothing for 10 s is gone (a pod that died mid-request): the
    // connection fails rather than hanging until the request's deadline. Idle pooled
    // connections are probed, so that a dead one is found before it is reused.
    sock.set_keep_alive(Some(smoltcp::time::Duration::from_secs(20)));
    sock.set_timeout(Some(smoltcp::time::Duration::from_secs(10)));
    sock
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
        let mut st = self.link.lock();
        let st = &mut *st;
        let sock = st.sockets.get_mut::<tcp::Socket>(self.handle);
        if sock.can_recv() {
            // A window that was more than half full reopens: tell the peer now.
            let was_full = sock.recv_queue() * 2 > sock.recv_capacity();
            let n = sock.recv_slice(buf.initialize_unfilled()).unwrap_or(0);
            buf.advance(n);
            if was_full {
                self.link.pump(st);
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
        let mut st = self.link.lock();
        let st = &mut *st;
        let sock = st.sockets.get_mut::<tcp::Socket>(self.handle);
        if sock.can_send() {
            let n = sock.send_slice(data).unwrap_or(0);
            self.link.pump(st);
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
        let mut st = self.link.lock();
        st.sockets.get_mut::<tcp::Socket>(self.handle).close();
        self.link.pump(&mut st);
        Poll::Ready(Ok(()))
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        let mut st = self.link.lock();
        st.sockets.get_mut::<tcp::Socket>(self.handle).close();
        st.closing.push((self.handle, Instant::now()));
        self.link.pump(&mut st);
    }
}

/// The device smoltcp sees: packets decrypted from the peer, and packets for it to encrypt.
struct Queue {
    rx: VecDeque<Vec<u8>>,
    tx: VecDeque<Vec<u8>>,
    spare: Vec<Vec<u8>>,
    mtu: usize,
}

impl Queue {
    fn push_rx(&mut self, packet: &[u8]) {
        let mut buf = self.spare.pop().unwrap_or_default();
        buf.clear();
        buf.extend_from_slice(packet);
        self.rx.push_back(buf);
    }
}

struct Rx(Vec<u8>);
struct Tx<'a> {
    tx: &'a mut VecDeque<Vec<u8>>,
    spare: &'a mut Vec<Vec<u8>>,
}

impl RxToken for Rx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = self.spare.pop().unwrap_or_default();
        buf.clear();
        buf.resize(len, 0);
        let r = f(&mut buf);
        self.tx.push_back(buf);
        r
    }
}

impl Device for Queue {
    type RxToken<'a> = Rx;
    type TxToken<'a> = Tx<'a>;

    fn receive(
        &mut self,
        _: smoltcp::time::Instant,
    ) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        let p = self.rx.pop_front()?;
        Some((
            Rx(p),
            Tx {
                tx: &mut self.tx,
                spare: &mut self.spare,
            },
        ))
    }

    fn transmit(&mut self, _: smoltcp::time::Instant) -> Option<Self::TxToken<'_>> {
        Some(Tx {
            tx: &mut self.tx,
            spare: &mut self.spare,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = self.mtu;
        caps
    }
}
