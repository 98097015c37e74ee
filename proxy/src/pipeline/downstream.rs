//! The client a request came from, as the shared stages need it: an HTTP request's session, or
//! a WebSocket message (the upgrade's head; the bridge watches the socket itself).

use std::net::SocketAddr;
use std::sync::Arc;

use pingora_http::RequestHeader;
use pingora_proxy::Session;

use crate::forward;
use crate::tls::RequestedServerName;

/// An HTTP request, or one message of a WebSocket.
pub enum Downstream<'a> {
    /// An HTTP request.
    Http(&'a mut Session),
    /// One message of a WebSocket.
    WebSocket {
        /// The upgrade request's head, a fresh copy per message (plugins may change it).
        head: Box<RequestHeader>,
        /// The connection the WebSocket lives on.
        conn: ClientConnection,
    },
}

/// What the edge knows of a client's connection, the same for every request on it.
#[derive(Debug, Clone, Default)]
pub struct ClientConnection {
    /// The client's address (IP sockets).
    pub client: Option<SocketAddr>,
    /// The edge's address the client connected to.
    pub local: Option<SocketAddr>,
    /// The TLS version, by Envoy's names (`TLSv1.3`); `None`: plain.
    pub tls: Option<&'static str>,
    /// The connection's id (Envoy's `connection.id`).
    pub id: Option<u64>,
    /// The server name the client asked for in its TLS handshake (SNI).
    pub server_name: Option<Arc<str>>,
}

impl ClientConnection {
    /// The connection `session` came on.
    pub fn of(session: &Session) -> Self {
        Self {
            client: client_addr(session),
            local: server_addr(session),
            tls: tls_version(session),
            id: connection_id(session),
            server_name: requested_server_name(session),
        }
    }
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
            Self::WebSocket { conn, .. } => conn.client,
        }
    }

    /// The edge's address the client connected to.
    pub fn server_addr(&self) -> Option<SocketAddr> {
        match self {
            Self::Http(s) => server_addr(s),
            Self::WebSocket { conn, .. } => conn.local,
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
            Self::WebSocket { conn, .. } => conn.tls,
        }
    }

    /// The connection's id for plugins, read only if one asks (see
    /// [`crate::plugins::ConnectionId`]).
    pub fn lazy_connection_id(&self) -> crate::plugins::ConnectionId {
        use crate::plugins::ConnectionId;
        match self {
            Self::Http(s) => s
                .digest()
                .and_then(|d| d.socket_digest.clone())
                .map_or(ConnectionId::Known(None), ConnectionId::Socket),
            Self::WebSocket { conn, .. } => ConnectionId::Known(conn.id),
        }
    }

    /// The server name the client asked for in its TLS handshake (SNI).
    pub fn requested_server_name(&self) -> Option<Arc<str>> {
        match self {
            Self::Http(s) => requested_server_name(s),
            Self::WebSocket { conn, .. } => conn.server_name.clone(),
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

/// The id of the connection `session` came on: the socket's cookie, a number the kernel gives no
/// other socket until it reboots (unlike a file descriptor, never reused), so a plugin can tell
/// requests on one connection from those on another, as with Envoy's connection id.
pub fn connection_id(session: &Session) -> Option<u64> {
    let socket = session.digest()?.socket_digest.as_ref()?;
    socket.socket_cookie().ok()
}

/// The server name the client of `session` asked for in its TLS handshake (SNI).
pub fn requested_server_name(session: &Session) -> Option<Arc<str>> {
    let tls = session.digest()?.ssl_digest.as_ref()?;
    Some(tls.extension.get::<RequestedServerName>()?.0.clone())
}

/// The client's address of `session`, when it is an IP socket.
pub fn client_addr(session: &Session) -> Option<SocketAddr> {
    session.client_addr().and_then(|a| a.as_inet()).copied()
}

/// The edge's address `session` came in on, when it is an IP socket.
pub fn server_addr(session: &Session) -> Option<SocketAddr> {
    session.server_addr().and_then(|a| a.as_inet()).copied()
}
