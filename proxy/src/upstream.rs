//! Where an agent's runtime is and how the edge reaches it: one interface for every kind of
//! upstream. A plain `http://` URL is served here; the WireGuard tunnel plugs in beside it.

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use pingora_core::upstreams::peer::HttpPeer;

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
}

impl UpstreamTarget {
    /// Parses `http://host:port[/base]`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let url = url::Url::parse(s).map_err(|e| format!("not a URL ({e}): {s:?}"))?;
        if url.scheme() != "http" {
            return Err(format!("expected an http:// URL, got {s:?}"));
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
}

impl Upstream {
    /// Resolves `target` (DNS happens here, off the request path).
    pub fn resolve(target: UpstreamTarget, settings: PeerSettings) -> Self {
        let UpstreamTarget::Http { host, port, .. } = &target;
        let authority = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        let peer = (host.as_str(), *port)
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve {host}: {e}"))
            .and_then(|mut addrs| addrs.next().ok_or_else(|| format!("{host} has no address")))
            .map(|addr: SocketAddr| {
                let mut peer = HttpPeer::new(addr, false, String::new());
                peer.options.connection_timeout = Some(settings.connect_timeout);
                peer.options.read_timeout = Some(settings.read_timeout);
                peer.options.idle_timeout = Some(settings.keepalive);
                peer
            });
        Self {
            target,
            peer,
            authority,
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

    /// The runtime's path for a route path (`/v1/...`), with the base path in front.
    pub fn path(&self, route_path: &str) -> String {
        let UpstreamTarget::Http { base_path, .. } = &self.target;
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
    }
}
