//! The edge's tunnels: one WireGuard link per pod, and the in-process bridge Pingora reaches
//! them through.
//!
//! Pingora 0.9 never reuses a connection made by a `custom_l4` connector (pingora#883), so a
//! pod's peer is a CONNECT proxy on a Unix socket of this process (`HttpPeer::new_proxy`):
//! Pingora pools the bridged connections like any other, and each pod's peers get their own
//! `group_key`. The bridge reads the CONNECT head, opens a TCP connection inside the pod's
//! tunnel and copies bytes both ways.

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use boringtun::x25519::{PublicKey, StaticSecret};
use moltghost_protocol::connect;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::task::AbortHandle;

use super::{bind_udp, keys, Link, LinkConfig, Role};

/// Every tunnel of this edge.
pub struct Tunnels {
    secret: StaticSecret,
    public: String,
    preshared: Option<[u8; 32]>,
    mtu: usize,
    socket_path: PathBuf,
    connect_timeout: Duration,
    links: Mutex<HashMap<String, PodLink>>,
    next_index: AtomicU32,
    rt: tokio::runtime::Handle,
}

struct PodLink {
    link: Arc<Link>,
    tasks: [AbortHandle; 2],
}

impl Drop for PodLink {
    fn drop(&mut self) {
        self.link.close();
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// A pod's tunnel as an upstream sees it.
#[derive(Clone)]
pub struct PodTunnel {
    /// The id Pingora's CONNECT names the pod by.
    pub id: String,
    /// The Unix socket of the bridge.
    pub socket_path: PathBuf,
    /// The link, for its health.
    pub link: Arc<Link>,
}

impl PodTunnel {
    /// A pool key for Pingora: this pod's connections are never shared with another's.
    pub fn group_key(&self) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.id.hash(&mut h);
        h.finish()
    }
}

impl std::fmt::Debug for PodTunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodTunnel").field("id", &self.id).finish()
    }
}

impl Tunnels {
    /// Starts the tunnel runtime (its own two threads, so that tunnel timers never wait behind
    /// request work) and the bridge's Unix socket in `data_dir`.
    pub fn start(
        secret: StaticSecret,
        preshared: Option<[u8; 32]>,
        mtu: usize,
        data_dir: &Path,
        connect_timeout: Duration,
    ) -> std::io::Result<Arc<Self>> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("moltghost-tunnel")
            .enable_all()
            .build()?;
        let handle = rt.handle().clone();
        std::thread::Builder::new()
            .name("moltghost-tunnel".into())
            .spawn(move || rt.block_on(std::future::pending::<()>()))?;
        let dir = data_dir
            .canonicalize()
            .unwrap_or_else(|_| data_dir.to_path_buf());
        let socket_path = dir.join(format!("tunnel.{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&socket_path);
        let listener = std::os::unix::net::UnixListener::bind(&socket_path)?;
        listener.set_nonblocking(true)?;
        let tunnels = Arc::new(Self {
            public: keys::public_of(&secret),
            secret,
            preshared,
            mtu,
            socket_path,
            connect_timeout,
            links: Mutex::new(HashMap::new()),
            next_index: AtomicU32::new(1),
            rt: handle,
        });
        let weak = Arc::downgrade(&tunnels);
        tunnels.rt.spawn(async move {
            let listener = match tokio::net::UnixListener::from_std(listener) {
                Ok(l) => l,
                Err(e) => return tracing::error!(error = %e, "tunnel bridge socket"),
            };
            while let Ok((conn, _)) = listener.accept().await {
                let Some(tunnels) = weak.upgrade() else {
                    return;
                };
                tokio::spawn(async move { tunnels.bridge(conn).await });
            }
        });
        Ok(tunnels)
    }

    /// The edge's public key, as pods are told it (`moltghost-pod --edge-key`).
    pub fn public_key(&self) -> &str {
        &self.public
    }

    /// The tunnel to the pod with public key `key` at `endpoint`, made on first use.
    pub fn pod(&self, key: &[u8; 32], endpoint: SocketAddr) -> std::io::Result<PodTunnel> {
        let id = format!("{}@{endpoint}", hex::encode(key));
        let mut links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = links.get(&id) {
            return Ok(PodTunnel {
                id,
                socket_path: self.socket_path.clone(),
                link: p.link.clone(),
            });
        }
        let _rt = self.rt.enter();
        let local: SocketAddr = if endpoint.is_ipv6() {
            "[::]:0".parse().expect("an address")
        } else {
            "0.0.0.0:0".parse().expect("an address")
        };
        let (send, recv) = bind_udp(local)?;
        let link = Link::new(
            LinkConfig {
                secret: self.secret.clone(),
                peer: PublicKey::from(*key),
                preshared: self.preshared,
                endpoint: Some(endpoint),
                role: Role::Initiator,
                index: self.next_index.fetch_add(1, Relaxed) & 0x00ff_ffff,
                mtu: self.mtu,
                keepalive: None,
            },
            send,
        );
        let timers = self.rt.spawn(link.clone().run_timers()).abort_handle();
        let rx = link.clone();
        let receiver = self
            .rt
            .spawn(super::receive(recv, move |batch| rx.input(batch)))
            .abort_handle();
        tracing::info!(pod = %keys::encode(key), %endpoint, "wireguard tunnel to pod");
        links.insert(
            id.clone(),
            PodLink {
                link: link.clone(),
                tasks: [timers, receiver],
            },
        );
        Ok(PodTunnel {
            id,
            socket_path: self.socket_path.clone(),
            link,
        })
    }

    /// Every tunnel's counters in Prometheus's text format (appended to `/metrics`).
    pub fn prometheus(&self) -> String {
        use std::fmt::Write;
        let links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        let stats: Vec<(String, super::LinkStatus)> = links
            .values()
            .map(|p| {
                let s = p.link.status();
                let pod = format!(
                    "{}@{}",
                    keys::encode(p.link.peer_key()),
                    s.endpoint.as_deref().unwrap_or("")
                );
                (pod, s)
            })
            .collect();
        drop(links);
        let mut out = String::new();
        type Get = fn(&super::LinkStatus) -> Option<f64>;
        let families: [(&str, &str, &str, Get); 10] = [
            (
                "moltghost_tunnel_up",
                "gauge",
                "1 when a handshake completed within 180 s",
                |s| Some(u8::from(s.up).into()),
            ),
            (
                "moltghost_tunnel_last_handshake_seconds",
                "gauge",
                "Seconds since the last completed handshake",
                |s| s.last_handshake_seconds_ago,
            ),
            (
                "moltghost_tunnel_handshakes_total",
                "counter",
                "Handshakes completed",
                |s| Some(s.handshakes as f64),
            ),
            (
                "moltghost_tunnel_received_bytes_total",
                "counter",
                "Payload bytes received through the tunnel",
                |s| Some(s.rx_bytes as f64),
            ),
            (
                "moltghost_tunnel_sent_bytes_total",
                "counter",
                "Payload bytes sent through the tunnel",
                |s| Some(s.tx_bytes as f64),
            ),
            (
                "moltghost_tunnel_received_packets_total",
                "counter",
                "Datagrams received and accepted",
                |s| Some(s.rx_packets as f64),
            ),
            (
                "moltghost_tunnel_sent_packets_total",
                "counter",
                "Datagrams sent",
                |s| Some(s.tx_packets as f64),
            ),
            (
                "moltghost_tunnel_loss_ratio",
                "gauge",
                "boringtun's packet-loss estimate",
                |s| Some(s.loss.into()),
            ),
            (
                "moltghost_tunnel_refused_packets_total",
                "counter",
                "Datagrams refused by the noise layer plus inner packets with a forged source",
                |s| Some((s.rejected + s.spoofed) as f64),
            ),
            (
                "moltghost_tunnel_dropped_packets_total",
                "counter",
                "Datagrams dropped because the UDP socket was full",
                |s| Some(s.send_drops as f64),
            ),
        ];
        for (name, kind, help, get) in families {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (pod, s) in &stats {
                if let Some(v) = get(s) {
                    let _ = writeln!(out, "{name}{{pod=\"{pod}\"}} {v}");
                }
            }
        }
        out
    }

    /// Closes the tunnels of pods no agent uses any more.
    pub fn retain(&self, used: &HashSet<String>) {
        let mut links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        links.retain(|id, _| used.contains(id));
    }

    /// One bridged connection: CONNECT head in, a connection through the named pod's tunnel,
    /// then bytes both ways until either side closes.
    async fn bridge(&self, mut conn: UnixStream) {
        let mut head = Vec::with_capacity(256);
        let mut buf = [0u8; 1024];
        let (port, pod, rest) = loop {
            let n = match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            head.extend_from_slice(&buf[..n]);
            match connect::parse(&head) {
                Ok(None) => continue,
                Ok(Some(r)) => break (r.port, r.pod.to_owned(), head[r.head_len..].to_vec()),
                Err(e) => {
                    tracing::warn!(error = e, "tunnel bridge: bad CONNECT");
                    let _ = conn.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
                    return;
                }
            }
        };
        let link = {
            let links = self.links.lock().unwrap_or_else(|p| p.into_inner());
            links.get(&pod).map(|p| p.link.clone())
        };
        let Some(link) = link else {
            let _ = conn.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n").await;
            return;
        };
        let mut inner = match link.connect(port, self.connect_timeout).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, pod = %pod, "tunnel connect failed");
                let _ = conn.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n").await;
                return;
            }
        };
        if conn.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.is_err()
            || inner.write_all(&rest).await.is_err()
        {
            return;
        }
        let _ = tokio::io::copy_bidirectional_with_sizes(&mut conn, &mut inner, 64 << 10, 64 << 10)
            .await;
    }
}
