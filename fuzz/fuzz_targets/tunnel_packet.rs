//! The tunnel's receive path, on the I/O-free core (no sockets): arbitrary datagrams into a
//! pod-side core, and arbitrary inner packets, properly encrypted by an established peer, into
//! its TCP stack; then its timers.
#![no_main]

use std::net::SocketAddr;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use boringtun::noise::{Tunn, TunnResult};
use libfuzzer_sys::fuzz_target;
use moltghost::tunnel::core::Core;
use moltghost::tunnel::{keys, Counters, LinkConfig, Role};

struct Fixture {
    pod: Mutex<Core>,
    edge: Mutex<Tunn>,
    edge_addr: SocketAddr,
    /// The core's clock: it only moves forward, as a real one does (a clock that went back
    /// kept the core's timers, and so the freeing of closed streams, from ever falling due).
    now: Mutex<Instant>,
}

/// A pod core and an edge peer that completed a handshake with it.
static FIXTURE: LazyLock<Fixture> = LazyLock::new(|| {
    let (pod_secret, edge_secret) = (keys::generate(), keys::generate());
    let pod_public = boringtun::x25519::PublicKey::from(&pod_secret);
    let edge_public = boringtun::x25519::PublicKey::from(&edge_secret);
    let edge_addr: SocketAddr = "192.0.2.1:51820".parse().unwrap();
    let start = Instant::now();
    let mut pod = Core::new(
        LinkConfig {
            secret: pod_secret,
            peer: edge_public,
            preshared: None,
            endpoint: None,
            role: Role::Responder {
                port: 80,
                backlog: 4,
            },
            index: 1,
            mtu: 1420,
            keepalive: None,
        },
        Arc::new(Counters::default()),
        start,
    );
    let mut edge = Tunn::new(edge_secret, pod_public, None, None, 2, None);
    let mut buf = vec![0u8; 2048];
    let init = match edge.format_handshake_initiation(&mut buf, false) {
        TunnResult::WriteToNetwork(d) => d.to_vec(),
        other => panic!("no handshake initiation: {other:?}"),
    };
    pod.input(&init, edge_addr, start);
    let (response, to) = pod.io.transmit.pop_front().expect("a handshake response");
    assert_eq!(to, edge_addr);
    let mut out = vec![0u8; 2048];
    assert!(matches!(
        edge.decapsulate(None, &response, &mut out),
        TunnResult::WriteToNetwork(_)
    ));
    Fixture {
        pod: Mutex::new(pod),
        edge: Mutex::new(edge),
        edge_addr,
        now: Mutex::new(start),
    }
});

fuzz_target!(|data: &[u8]| {
    let f = &*FIXTURE;
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut pod = f.pod.lock().unwrap();
    // The core's clock moves on with the input, so its timers run too.
    let now = {
        let mut now = f.now.lock().unwrap();
        *now += Duration::from_millis(u64::from(mode) * 7);
        *now
    };
    if mode % 2 == 0 {
        pod.input(rest, f.edge_addr, now);
    } else {
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
        pod.input(&datagram, f.edge_addr, now);
    }
    pod.pump(now);
    // Connections the input opened are accepted and dropped at once, so they do not pile up.
    while let Some(h) = pod.accept() {
        pod.socket(h).abort();
        pod.release(h, now);
    }
    pod.tick(now);
    // What the core asked the device layer to send goes nowhere: give the buffers back.
    while let Some((d, _)) = pod.io.transmit.pop_front() {
        pod.io.recycle(d);
    }
});
