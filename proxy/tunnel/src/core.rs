//! The tunnel's state machine, without I/O, in the manner of boringtun's `noise` module: one
//! WireGuard peer (boringtun's [`Tunn`]) and the TCP connections inside its tunnel (a smoltcp
//! interface). Datagrams, ticks and stream operations go in, with the time; what must happen on
//! the wire comes out in [`Io`]: datagrams to send, inner packets delivered (TUN mode),
//! connections accepted. It opens no socket, reads no clock and wakes no task; the device layer
//! ([`crate::link`]) does, so a fuzzer or a test drives this directly.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::noise::{Tunn, TunnResult};
use smoltcp::iface::{Config as IfaceConfig, Interface, SocketHandle, SocketSet};
use smoltcp::socket::tcp::{self, State as TcpState};
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr};

use crate::peer::{Counters, LinkConfig, Role, EDGE_ADDR, POD_ADDR};
use crate::queue::Queue;

/// How often boringtun's timers are ticked (it asks for every 100–250 ms).
pub(crate) const TICK: Duration = Duration::from_millis(100);
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

/// What the core asks of the device layer. Buffers are reused: the device layer hands sent
/// datagrams back with [`Io::recycle`].
#[derive(Default)]
pub struct Io {
    /// Datagrams to send, and where to.
    pub transmit: VecDeque<(Vec<u8>, SocketAddr)>,
    /// Decrypted inner packets for a TUN device (in TUN mode only).
    pub delivered: VecDeque<Vec<u8>>,
    /// A connection the peer opened is waiting in [`Core::accept`].
    pub accepted: bool,
    /// A TCP timer falls due before the timer task's planned wake-up: wake it now.
    pub wake_timer: bool,
    spare: Vec<Vec<u8>>,
}

impl Io {
    fn transmit(&mut self, datagram: &[u8], to: SocketAddr) {
        let buf = self.filled(datagram);
        self.transmit.push_back((buf, to));
    }

    fn deliver(&mut self, packet: &[u8]) {
        let buf = self.filled(packet);
        self.delivered.push_back(buf);
    }

    fn filled(&mut self, bytes: &[u8]) -> Vec<u8> {
        let mut buf = self.spare.pop().unwrap_or_default();
        buf.clear();
        buf.extend_from_slice(bytes);
        buf
    }

    /// Gives a sent datagram's (or a delivered packet's) buffer back for reuse.
    pub fn recycle(&mut self, buf: Vec<u8>) {
        if self.spare.len() < 64 {
            self.spare.push(buf);
        }
    }
}

/// One peer's tunnel state: noise session, TCP stack, connections.
pub struct Core {
    tunn: Tunn,
    endpoint: Option<SocketAddr>,
    iface: Interface,
    sockets: SocketSet<'static>,
    dev: Queue,
    scratch: Vec<u8>,
    local: IpAddress,
    peer: IpAddress,
    role: Role,
    next_port: u16,
    listeners: Vec<SocketHandle>,
    accepted: VecDeque<SocketHandle>,
    closing: Vec<(SocketHandle, Instant)>,
    next_tick: Instant,
    deadline: Instant,
    last_rx: Instant,
    last_forced: Instant,
    /// Decrypted packets go to [`Io::delivered`] (a TUN device) instead of the TCP stack.
    raw: bool,
    counters: Arc<Counters>,
    /// What the device layer must do.
    pub io: Io,
}

impl Core {
    /// A peer's state as `cfg` describes it, counting into `counters`, at `now`.
    pub fn new(cfg: LinkConfig, counters: Arc<Counters>, now: Instant) -> Self {
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
        let mut dev = Queue::new(cfg.mtu);
        let mut icfg = IfaceConfig::new(HardwareAddress::Ip);
        icfg.random_seed = rand::random();
        let mut iface = Interface::new(icfg, &mut dev, now_smol(now));
        iface.update_ip_addrs(|a| {
            let _ = a.push(IpCidr::new(IpAddress::Ipv4(local), 24));
        });
        let mut core = Self {
            tunn,
            endpoint: cfg.endpoint,
            iface,
            sockets: SocketSet::new(Vec::new()),
            dev,
            scratch: vec![0; DATAGRAM_ROOM],
            local: IpAddress::Ipv4(local),
            peer: IpAddress::Ipv4(peer),
            role: cfg.role,
            next_port: 10_000 + rand::random::<u16>() % 50_000,
            listeners: Vec::new(),
            accepted: VecDeque::new(),
            closing: Vec::new(),
            next_tick: now,
            deadline: now,
            last_rx: now,
            last_forced: now,
            raw: false,
            counters,
            io: Io::default(),
        };
        core.replenish_listeners();
        core
    }

    /// From now on decrypted packets are delivered raw ([`Io::delivered`]), for a TUN device,
    /// instead of going to the TCP stack.
    pub fn deliver_raw(&mut self) {
        self.raw = true;
    }

    /// When the peer was last heard from.
    pub fn last_heard(&self) -> Instant {
        self.last_rx
    }

    /// Where the peer is, as last authenticated.
    pub fn endpoint(&self) -> Option<SocketAddr> {
        self.endpoint
    }

    /// boringtun's session statistics: time since the last handshake, bytes sent and
    /// received, loss estimate, round-trip time.
    pub fn stats(&self) -> (Option<Duration>, usize, usize, f32, Option<u32>) {
        self.tunn.stats()
    }

    /// One datagram from `from` through the noise layer: handshakes and cookies are answered
    /// (then the packets queued while they were pending), an authenticated packet from the
    /// peer's inner address goes to the TCP stack (or [`Io::delivered`]). Call
    /// [`Core::pump`] after a batch.
    pub fn input(&mut self, datagram: &[u8], from: SocketAddr, now: Instant) {
        let packet = match self
            .tunn
            .decapsulate(Some(from.ip()), datagram, &mut self.scratch)
        {
            TunnResult::Done => None,
            TunnResult::Err(e) => {
                self.counters.rejected.fetch_add(1, Relaxed);
                tracing::trace!(error = ?e, %from, "wireguard datagram refused");
                return;
            }
            TunnResult::WriteToNetwork(reply) => {
                self.io.transmit(reply, from);
                // A completed handshake releases the packets queued while it was pending.
                while let TunnResult::WriteToNetwork(queued) =
                    self.tunn.decapsulate(None, &[], &mut self.scratch)
                {
                    self.io.transmit(queued, from);
                }
                None
            }
            TunnResult::WriteToTunnelV4(p, src) => Some((p, IpAddr::V4(src))),
            TunnResult::WriteToTunnelV6(p, src) => Some((p, IpAddr::V6(src))),
        };
        self.counters.rx_datagrams.fetch_add(1, Relaxed);
        self.last_rx = now;
        // Message types 1 and 2 (initiation, response) that passed the noise layer.
        if matches!(datagram.first(), Some(1 | 2)) {
            self.counters.handshakes.fetch_add(1, Relaxed);
        }
        // Authenticated: the peer is where this came from (roaming).
        if self.endpoint != Some(from) {
            tracing::debug!(%from, "wireguard peer endpoint set");
            self.endpoint = Some(from);
        }
        if let Some((p, src)) = packet {
            // boringtun does not check the inner source: only the peer's address may enter.
            if IpAddress::from(src) != self.peer {
                self.counters.spoofed.fetch_add(1, Relaxed);
                return;
            }
            if self.raw {
                self.io.deliver(p);
            } else {
                self.dev.push_rx(p);
            }
        }
    }

    /// Encrypts one inner packet (from a TUN device) for the peer.
    pub fn encapsulate(&mut self, packet: &[u8]) {
        if let TunnResult::WriteToNetwork(d) = self.tunn.encapsulate(packet, &mut self.scratch) {
            if let Some(to) = self.endpoint {
                self.io.transmit(d, to);
            }
        }
    }

    /// Runs the TCP stack: what it received is processed, what it wants to send is encrypted
    /// for the peer, connections the peer opened are made ready to accept.
    pub fn pump(&mut self, now: Instant) {
        let smol = now_smol(now);
        self.iface.poll(smol, &mut self.dev, &mut self.sockets);
        if matches!(self.role, Role::Responder { .. }) && self.take_accepted() {
            self.io.accepted = true;
        }
        while let Some(p) = self.dev.tx.pop_front() {
            if let TunnResult::WriteToNetwork(d) = self.tunn.encapsulate(&p, &mut self.scratch) {
                if let Some(to) = self.endpoint {
                    self.io.transmit(d, to);
                }
            }
            self.dev.recycle(p);
        }
        // A retransmit or delayed ACK due before the timer task's next wake-up.
        if let Some(d) = self.iface.poll_delay(smol, &self.sockets) {
            if now + Duration::from(d) < self.deadline {
                self.io.wake_timer = true;
            }
        }
    }

    /// The timers: boringtun's (handshake retries, keep-alive, rekeying, session expiry) every
    /// [`TICK`], smoltcp's when due; streams whose peer never finished closing are dropped; a
    /// peer we wait on that went silent gets a fresh handshake. Returns how long until the
    /// next call is due.
    pub fn tick(&mut self, now: Instant) -> Duration {
        if now >= self.next_tick {
            self.next_tick = now + TICK;
            if let TunnResult::WriteToNetwork(d) = self.tunn.update_timers(&mut self.scratch) {
                if let Some(to) = self.endpoint {
                    self.io.transmit(d, to);
                }
            }
            self.reap(now);
            if self.peer_silent(now) {
                self.rehandshake(now);
            }
        }
        self.pump(now);
        let tcp = self
            .iface
            .poll_delay(now_smol(now), &self.sockets)
            .map(Duration::from)
            .unwrap_or(TICK);
        let sleep = tcp.min(self.next_tick.saturating_duration_since(now));
        self.deadline = now + sleep;
        sleep
    }

    /// Starts a handshake now, even though the session has not expired: the peer went silent
    /// while we wait on it, most likely because it restarted and lost the session. Its fresh
    /// TCP stack then resets the connections it no longer knows, and their users retry.
    fn rehandshake(&mut self, now: Instant) {
        self.last_forced = now;
        if let TunnResult::WriteToNetwork(d) = self
            .tunn
            .format_handshake_initiation(&mut self.scratch, true)
        {
            if let Some(to) = self.endpoint {
                self.io.transmit(d, to);
            }
        }
    }

    /// Opens a TCP connection to `port` on the peer (the connection completes as datagrams
    /// come and go; see [`Core::socket`]'s state).
    pub fn connect(&mut self, port: u16, now: Instant) -> Result<SocketHandle, String> {
        let local_port = self.next_port;
        self.next_port = if local_port >= 60_000 {
            10_000
        } else {
            local_port + 1
        };
        let handle = self.sockets.add(new_socket());
        let remote = (self.peer, port);
        let local = (self.local, local_port);
        let sock = self.sockets.get_mut::<tcp::Socket>(handle);
        if let Err(e) = sock.connect(self.iface.context(), remote, local) {
            self.sockets.remove(handle);
            return Err(format!("tunnel connect: {e}"));
        }
        self.pump(now);
        Ok(handle)
    }

    /// The next connection the peer opened, if any (responders only).
    pub fn accept(&mut self) -> Option<SocketHandle> {
        self.accepted.pop_front()
    }

    /// A connection's TCP socket.
    pub fn socket(&mut self, handle: SocketHandle) -> &mut tcp::Socket<'static> {
        self.sockets.get_mut::<tcp::Socket>(handle)
    }

    /// Closes a connection its user dropped; its socket is freed once the close completes.
    pub fn release(&mut self, handle: SocketHandle, now: Instant) {
        self.socket(handle).close();
        self.closing.push((handle, now));
        self.pump(now);
    }

    /// Aborts every connection (the link is closing).
    pub fn abort_all(&mut self, now: Instant) {
        for (_, s) in self.sockets.iter_mut() {
            let smoltcp::socket::Socket::Tcp(s) = s;
            s.abort();
        }
        self.pump(now);
    }

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

/// smoltcp's clock from ours: microseconds since a fixed origin taken on first use.
fn now_smol(now: Instant) -> smoltcp::time::Instant {
    static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let origin = *ORIGIN.get_or_init(|| now);
    smoltcp::time::Instant::from_micros(now.saturating_duration_since(origin).as_micros() as i64)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys;

    const EDGE: &str = "192.0.2.1:40000";
    const POD: &str = "192.0.2.2:51820";

    fn config(
        secret: boringtun::x25519::StaticSecret,
        peer: &boringtun::x25519::StaticSecret,
        role: Role,
    ) -> LinkConfig {
        LinkConfig {
            secret,
            peer: boringtun::x25519::PublicKey::from(peer),
            preshared: None,
            endpoint: matches!(role, Role::Initiator).then(|| POD.parse().unwrap()),
            role,
            index: 1,
            mtu: 1420,
            keepalive: None,
        }
    }

    /// An edge core and a pod core that know each other's keys.
    fn pair(now: Instant) -> (Core, Core) {
        let (e, p) = (keys::generate(), keys::generate());
        let edge = Core::new(
            config(e.clone(), &p, Role::Initiator),
            Arc::new(Counters::default()),
            now,
        );
        let pod = Core::new(
            config(
                p,
                &e,
                Role::Responder {
                    port: 80,
                    backlog: 2,
                },
            ),
            Arc::new(Counters::default()),
            now,
        );
        (edge, pod)
    }

    /// Carries every datagram each side wants to send to the other until both are quiet,
    /// the clock moving a millisecond a round (so delayed ACKs go out).
    fn shuttle(edge: &mut Core, pod: &mut Core, now: &mut Instant) {
        for _ in 0..100 {
            let mut moved = false;
            while let Some((d, to)) = edge.io.transmit.pop_front() {
                assert_eq!(to, POD.parse().unwrap());
                pod.input(&d, EDGE.parse().unwrap(), *now);
                moved = true;
            }
            while let Some((d, to)) = pod.io.transmit.pop_front() {
                assert_eq!(to, EDGE.parse().unwrap());
                edge.input(&d, POD.parse().unwrap(), *now);
                moved = true;
            }
            *now += Duration::from_millis(1);
            edge.pump(*now);
            pod.pump(*now);
            if !moved && edge.io.transmit.is_empty() && pod.io.transmit.is_empty() {
                return;
            }
        }
    }

    #[test]
    fn two_cores_handshake_and_carry_a_connection_without_sockets() {
        let mut now = Instant::now();
        let (mut edge, mut pod) = pair(now);
        let conn = edge.connect(80, now).unwrap();
        shuttle(&mut edge, &mut pod, &mut now);
        assert_eq!(edge.socket(conn).state(), TcpState::Established);
        assert!(pod.io.accepted, "the pod was told a connection is waiting");
        let accepted = pod.accept().expect("the pod accepts the connection");
        assert_eq!(edge.socket(conn).send_slice(b"hello, pod").unwrap(), 10);
        edge.pump(now);
        shuttle(&mut edge, &mut pod, &mut now);
        let mut buf = [0u8; 64];
        let n = pod.socket(accepted).recv_slice(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"hello, pod");
        assert_eq!(
            pod.endpoint(),
            Some(EDGE.parse().unwrap()),
            "the pod learned where the edge is"
        );
        assert!(edge.stats().0.is_some(), "a handshake completed");
        // Closing from the edge ends the pod's side too.
        edge.release(conn, now);
        shuttle(&mut edge, &mut pod, &mut now);
        assert!(!pod.socket(accepted).may_recv());
    }

    #[test]
    fn a_stranger_gets_no_answer() {
        let now = Instant::now();
        let (_, mut pod) = pair(now);
        let (stranger_key, other) = (keys::generate(), keys::generate());
        let mut stranger = Core::new(
            config(stranger_key, &other, Role::Initiator),
            Arc::new(Counters::default()),
            now,
        );
        stranger.connect(80, now).unwrap();
        let (init, _) = stranger
            .io
            .transmit
            .pop_front()
            .expect("a handshake initiation");
        pod.input(&init, EDGE.parse().unwrap(), now);
        assert!(
            pod.io.transmit.is_empty(),
            "nothing is sent to an unknown key"
        );
        assert_eq!(pod.counters.rejected.load(Relaxed), 1);
        assert_eq!(pod.endpoint(), None);
    }

    #[test]
    fn an_inner_packet_from_another_address_is_dropped() {
        let mut now = Instant::now();
        let (mut edge, mut pod) = pair(now);
        edge.connect(80, now).unwrap();
        shuttle(&mut edge, &mut pod, &mut now);
        // A well-formed IPv4 header whose source is not the edge's tunnel address.
        let mut packet = vec![0u8; 40];
        packet[0] = 0x45;
        packet[2..4].copy_from_slice(&40u16.to_be_bytes());
        packet[8] = 64;
        packet[9] = 6;
        packet[12..16].copy_from_slice(&[10, 7, 0, 9]);
        packet[16..20].copy_from_slice(&[10, 7, 0, 2]);
        edge.encapsulate(&packet);
        let (d, _) = edge.io.transmit.pop_front().expect("an encrypted packet");
        pod.input(&d, EDGE.parse().unwrap(), now);
        assert_eq!(pod.counters.spoofed.load(Relaxed), 1);
    }

    #[test]
    fn raw_mode_delivers_packets_instead_of_the_tcp_stack() {
        let mut now = Instant::now();
        let (mut edge, mut pod) = pair(now);
        pod.deliver_raw();
        edge.connect(80, now).unwrap();
        shuttle(&mut edge, &mut pod, &mut now);
        let syn = pod
            .io
            .delivered
            .pop_front()
            .expect("the SYN, delivered raw");
        assert_eq!(syn[0] >> 4, 4);
        assert_eq!(&syn[12..16], &[10, 7, 0, 1]);
        assert!(pod.accept().is_none(), "the TCP stack saw nothing");
    }
}
