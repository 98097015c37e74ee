//! What a peer is, shared by the core and the device layer: which side of the tunnel it is,
//! how it is configured, the addresses inside the tunnel, and the counters it keeps.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::AtomicU64;

use boringtun::x25519::{PublicKey, StaticSecret};

/// The edge's address inside every tunnel.
pub const EDGE_ADDR: Ipv4Addr = Ipv4Addr::new(10, 7, 0, 1);
/// The pod's address inside every tunnel.
pub const POD_ADDR: Ipv4Addr = Ipv4Addr::new(10, 7, 0, 2);

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
