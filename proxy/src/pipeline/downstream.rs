//! The client a request came from, as the shared stages need it: an HTTP request's session, or
//! a WebSocket message (the upgrade's head; the bridge watches the socket itself).

use std::net::SocketAddr;

use pingora_http::RequestHeader;
use pingora_proxy::Session;

use crate::forward;

/// An HTTP request, or one message of a WebSocket.
pub enum Downstream<'a> {
    /// An HTTP request.
    Http(&'a mut Session),
    /// One message of a WebSocket.
    WebSocket {
        /// The upgrade request's head, a fresh copy per message (plugins may change it).
        head: Box<RequestHeader>,
        /// The client's address.
        addr: Option<SocketAddr>,
        /// The edge's address the client connected to.
        local: Option<SocketAddr>,
        /// The TLS version the socket came over (`None`: plain).
        tls: Option<&'static str>,
    },
}

impl Downstream<'_> {
    /// The request head.
    pub fn head(&self) -> &RequestHeader {
        match self {
            Self::Http(s) => s.req_header(),
            Self::WebSocket { head, .. } => head,
        }
    }

    /// The request head, to change.
    pub fn head_mut(&mut self) -> &mut RequestHeader {
        match self {
            Self::Http(s) => s.req_header_mut(),
            Self::WebSocket { head, .. } => head,
        }
    }

    /// The client's address.
    pub fn client_addr(&self) -> Option<SocketAddr> {
        match self {
            Self::Http(s) => client_addr(s),
            Self::WebSocket { addr, .. } => *addr,
        }
    }

    /// The edge's address the client connected to.
    pub fn server_addr(&self) -> Option<SocketAddr> {
        match self {
            Self::Http(s) => server_addr(s),
            Self::WebSocket { local, .. } => *local,
        }
    }

    /// Whether the request came over TLS.
    pub fn is_tls(&self) -> bool {
        self.tls_version().is_some()
    }

    /// The TLS version the request came over, by Envoy's names (`TLSv1.3`); `None` for plain
    /// HTTP.
    pub fn tls_version(&self) -> Option<&'static str> {
        match self {
            Self::Http(s) => tls_version(s),
            Self::WebSocket { tls, .. } => *tls,
        }
    }

    /// Resolves when the client hangs up while the edge waits on the runtime.
    pub async fn hangup(&mut self) {
        match self {
            Self::Http(s) => forward::hangup(s).await,
            Self::WebSocket { .. } => forward::unwatched().await,
        }
    }
}

/// Whether `session` came over TLS.
pub fn is_tls(session: &Session) -> bool {
    tls_version(session).is_some()
}

/// The TLS version `session` came over, by Envoy's names (rustls says `TLSv1_3`).
pub fn tls_version(session: &Session) -> Option<&'static str> {
    let digest = session.digest()?.ssl_digest.as_ref()?;
    Some(match digest.version.as_ref() {
        "TLSv1_3" | "TLSv1.3" => "TLSv1.3",
        "TLSv1_2" | "TLSv1.2" => "TLSv1.2",
        _ => "unknown",
    })
}

/// The client's address of `session`, when it is an IP socket.
pub fn client_addr(session: &Session) -> Option<SocketAddr> {
    session.client_addr().and_then(|a| a.as_inet()).copied()
}

/// The edge's address `session` came in on, when it is an IP socket.
pub fn server_addr(session: &Session) -> Option<SocketAddr> {
    session.server_addr().and_then(|a| a.as_inet()).copied()
}
