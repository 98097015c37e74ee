//! The tunnel's receive path: arbitrary datagrams into a pod-side link, and arbitrary inner
//! packets, properly encrypted by an established peer, into its TCP stack.
#![no_main]

use std::net::{SocketAddr, UdpSocket};
use std::sync::{Arc, LazyLock, Mutex};

use boringtun::noise::{Tunn, TunnResult};
use libfuzzer_sys::fuzz_target;
use moltghost::tunnel::{keys, Link, LinkConfig, Role};

struct Fixture {
    pod: Arc<Link>,
    edge: Mutex<Tunn>,
    edge_addr: SocketAddr,
}

/// A pod link and an edge peer that completed a handshake with it.
static FIXTURE: LazyLock<Fixture> = LazyLock::new(|| {
    let (pod_secret, edge_secret) = (keys::generate(), keys::generate());
    let pod_public = boringtun::x25519::PublicKey::from(&pod_secret);
    let edge_public = boringtun::x25519::PublicKey::from(&edge_secret);
    let pod_udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    pod_udp.set_nonblocking(true).unwrap();
    let edge_udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let edge_addr = edge_udp.local_addr().unwrap();
    let pod = Link::new(
        LinkConfig {
            secret: pod_secret,
            peer: edge_public,
            preshared: None,
            endpoint: None,
            role: Role::Responder { port: 80, backlog: 4 },
            index: 1,
            mtu: 1420,
            keepalive: None,
        },
        Arc::new(pod_udp),
    );
    let mut edge = Tunn::new(edge_secret, pod_public, None, None, 2, None);
    let mut buf = vec![0u8; 2048];
    let init = match edge.format_handshake_initiation(&mut buf, false) {
        TunnResult::WriteToNetwork(d) => d.to_vec(),
        other => panic!("no handshake initiation: {other:?}"),
    };
    pod.input([(&init[..], edge_addr)]);
    let n = edge_udp.recv(&mut buf).unwrap();
    let response = buf[..n].to_vec();
    let mut out = vec![0u8; 2048];
    assert!(matches!(
        edge.decapsulate(None, &response, &mut out),
        TunnResult::WriteToNetwork(_)
    ));
    Fixture {
        pod,
        edge: Mutex::new(edge),
        edge_addr,
    }
});

fuzz_target!(|data: &[u8]| {
    let f = &*FIXTURE;
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 2 == 0 {
        f.pod.input([(rest, f.edge_addr)]);
        return;
    }
    // An inner packet from the right source to the pod, so that the TCP stack parses it.
    let mut packet = rest.to_vec();
    if packet.len() >= 20 && mode % 4 == 1 {
        packet[0] = 0x45;
        packet[12..16].copy_from_slice(&[10, 7, 0, 1]);
        packet[16..20].copy_from_slice(&[10, 7, 0, 2]);
    }
    let mut out = vec![0u8; packet.len() + 148];
    let datagram = match f.edge.lock().unwrap().encapsulate(&packet, &mut out) {
        TunnResult::WriteToNetwork(d) => d.to_vec(),
        _ => return,
    };
    f.pod.input([(&datagram[..], f.edge_addr)]);
});
