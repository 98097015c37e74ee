//! Where an agent's runtime is and how the edge reaches it: one interface for every kind of
//! upstream. A plain `http://` URL is reached directly (development); a pod, `wg://KEY@host:port`,
//! through the edge's WireGuard tunnel to it ([`crate::tunnel`]).

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, ToSocketAddrs};
use std::time::Duration;

use moltghost_protocol::connect::POD_HEADER;
use pingora_core::upstreams::peer::HttpPeer;

use crate::tunnel::bridge::{PodTunnel, Tunnels};

/// An upstream as stored and configured: what the operator wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamTarget {
    /// A plain HTTP runtime: `http://host:port[/base]`.
    Http {
        /// Host name or address.
        host: String,
        /// TCP port.
        port: u16,
        /// Path prefix before the route's `/v1/...` path, without a trailing slash.
        base_path: String,
    },
    /// A pod behind WireGuard: `wg://<public key>@host:port[/base]`, the key in `wg`'s base64.
    Pod {
        /// The pod's WireGuard public key.
        key: [u8; 32],
        /// The pod's UDP host.
        host: String,
        /// The pod's UDP port.
        port: u16,
        /// Path prefix before the route's `/v1/...` path, without a trailing slash.
        base_path: String,
    },
}

impl UpstreamTarget {
    /// Parses `http://host:port[/base]` or `wg://KEY@host:port[/base]`.
    pub fn parse(s: &str) -> Result<Self, String> {
        if let Some(rest) = s.strip_prefix("wg://") {
            return Self::parse_pod(rest);
        }
        let url = url::Url::parse(s).map_err(|e| format!("not a URL ({e}): {s:?}"))?;
        if url.scheme() != "http" {
            return Err(format!(
                "expected http://host:port or wg://<public key>@host:port, got {s:?}"
            ));
        }
        if !url.username().is_empty()
            || url.password().is_some()
            || url.query().is_some()
            || url.fragment().is_some()
        {
            return Err(format!(
                "an upstream URL takes no credentials, query or fragment: {s:?}"
            ));
        }
        let host = url.host_str().ok_or_else(|| format!("no host in {s:?}"))?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = url.port_or_known_default().unwrap_or(80);
        let base_path = url.path().trim_end_matches('/').to_string();
        Ok(Self::Http {
            host,
            port,
            base_path,
        })
    }

    /// Parses a pod's `KEY@host:port[/base]` (what `moltghost agent create --pod` takes).
    pub fn parse_pod(s: &str) -> Result<Self, String> {
        let (key, addr) = s
            .split_once('@')
            .ok_or_else(|| format!("expected <public key>@host:port, got {s:?}"))?;
        let key = crate::tunnel::keys::decode(key).map_err(|e| format!("pod key: {e}"))?;
        let Self::Http {
            host,
            port,
            base_path,
        } = Self::parse(&format!("http://{addr}"))?
        else {
            unreachable!("an http:// URL parses as Http")
        };
        if !addr.contains(':') || addr.ends_with(']') {
            return Err(format!("a pod needs its UDP port: {s:?}"));
        }
        Ok(Self::Pod {
            key,
            host,
            port,
            base_path,
        })
    }

    fn base_path(&self) -> &str {
        match self {
            Self::Http { base_path, .. } | Self::Pod { base_path, .. } => base_path,
        }
    }
}

impl fmt::Display for UpstreamTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Http {
                host,
                port,
                base_path,
            } if host.contains(':') => write!(f, "http://[{host}]:{port}{base_path}"),
            Self::Http {
                host,
                port,
                base_path,
            } => write!(f, "http://{host}:{port}{base_path}"),
            Self::Pod {
                key,
                host,
                port,
                base_path,
            } => {
                let key = crate::tunnel::keys::encode(key);
                if host.contains(':') {
                    write!(f, "wg://{key}@[{host}]:{port}{base_path}")
                } else {
                    write!(f, "wg://{key}@{host}:{port}{base_path}")
                }
            }
        }
    }
}

/// Connection settings shared by every upstream peer.
#[derive(Debug, Clone, Copy)]
pub struct PeerSettings {
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// Longest silence between two reads.
    pub read_timeout: Duration,
    /// How long an idle connection stays pooled.
    pub keepalive: Duration,
}

/// A resolved upstream, ready to connect to. Built when the snapshot is built, never per request.
#[derive(Debug, Clone)]
pub struct Upstream {
    target: UpstreamTarget,
    peer: Result<HttpPeer, String>,
    authority: String,
    tunnel: Option<PodTunnel>,
}

impl Upstream {
    /// Resolves `target` (DNS happens here, off the request path); a pod's tunnel is made (or
    /// found) in `tunnels`.
    pub fn resolve(target: UpstreamTarget, settings: PeerSettings, tunnels: &Tunnels) -> Self {
        let (host, port) = match &target {
            UpstreamTarget::Http { host, port, .. } | UpstreamTarget::Pod { host, port, .. } => {
                (host.as_str(), *port)
            }
        };
        let addr = (host, port)
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve {host}: {e}"))
            .and_then(|mut addrs| addrs.next().ok_or_else(|| format!("{host} has no address")));
        let (peer, authority, tunnel) = match &target {
            UpstreamTarget::Http { .. } => {
                let authority = if host.contains(':') {
                    format!("[{host}]:{port}")
                } else {
                    format!("{host}:{port}")
                };
                (
                    addr.map(|a| HttpPeer::new(a, false, String::new())),
                    authority,
                    None,
                )
            }
            UpstreamTarget::Pod { key, .. } => {
                let tunnel = addr.and_then(|a| tunnels.pod(key, a).map_err(|e| e.to_string()));
                let peer = tunnel.as_ref().map(|t| {
                    let headers =
                        BTreeMap::from([(POD_HEADER.to_string(), t.id.clone().into_bytes())]);
                    let socket = t.socket_path.to_string_lossy();
                    let mut peer = HttpPeer::new_proxy(
                        &socket,
                        IpAddr::V4(crate::tunnel::POD_ADDR),
                        crate::tunnel::POD_PORT,
                        false,
                        "",
                        headers,
                    );
                    peer.group_key = t.group_key();
                    peer
                });
                let authority = format!("{}:{}", crate::tunnel::POD_ADDR, crate::tunnel::POD_PORT);
                (peer.map_err(|e| e.to_string()), authority, tunnel.ok())
            }
        };
        let peer = peer.map(|mut peer| {
            peer.options.connection_timeout = Some(settings.connect_timeout);
            peer.options.read_timeout = Some(settings.read_timeout);
            peer.options.idle_timeout = Some(settings.keepalive);
            peer
        });
        Self {
            target,
            peer,
            authority,
            tunnel,
        }
    }

    /// The peer to connect to, or why there is none.
    pub fn peer(&self) -> Result<&HttpPeer, &str> {
        self.peer.as_ref().map_err(String::as_str)
    }

    /// The `Host` header the runtime expects.
    pub fn authority(&self) -> &str {
        &self.authority
    }

    /// The pod's tunnel, when the upstream is a pod.
    pub fn tunnel(&self) -> Option<&PodTunnel> {
        self.tunnel.as_ref()
    }

    /// The runtime's path for a route path (`/v1/...`), with the base path in front.
    pub fn path(&self, route_path: &str) -> String {
        let base_path = self.target.base_path();
        let mut p = String::with_capacity(base_path.len() + route_path.len());
        p.push_str(base_path);
        p.push_str(route_path);
        p
    }

    /// What was configured.
    pub fn target(&self) -> &UpstreamTarget {
        &self.target
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_http_urls() {
        let t = UpstreamTarget::parse("http://127.0.0.1:9000/").unwrap();
        assert_eq!(
            t,
            UpstreamTarget::Http {
                host: "127.0.0.1".into(),
                port: 9000,
                base_path: String::new()
            }
        );
        assert_eq!(t.to_string(), "http://127.0.0.1:9000");
        let t = UpstreamTarget::parse("http://runtime/openai").unwrap();
        assert_eq!(t.to_string(), "http://runtime:80/openai");
        assert!(UpstreamTarget::parse("https://x").is_err());
        assert!(UpstreamTarget::parse("http://u:p@x").is_err());
        assert!(UpstreamTarget::parse("nonsense").is_err());
        let key = "YNqHwpcAmVj0lVzPSt3oUnL7cRPKB/geYqVfMPr0hHw=";
        let t = UpstreamTarget::parse(&format!("wg://{key}@127.0.0.1:51820")).unwrap();
        assert_eq!(t.to_string(), format!("wg://{key}@127.0.0.1:51820"));
        assert!(UpstreamTarget::parse_pod(&format!("{key}@127.0.0.1")).is_err());
        assert!(UpstreamTarget::parse_pod("short@127.0.0.1:1").is_err());
        assert!(UpstreamTarget::parse("wg://127.0.0.1:1").is_err());
    }
}
