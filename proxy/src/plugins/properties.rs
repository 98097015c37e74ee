//! Properties (`proxy_get_property`): Envoy's attributes as far as the edge knows them, with
//! Envoy's encodings (strings as bytes; integers as 8-byte little-endian; times as nanoseconds
//! since the epoch; booleans as one byte), and the edge's own under `moltghost.`.
//!
//! Nothing is encoded before a plugin asks: a request's [`RequestFacts`] are gathered once when
//! its run through the plugins starts (shared handles and a few numbers), and a value is made
//! from them, from the live header maps (as Envoy's attributes read them, so a plugin's edit
//! of `:path` is what a later plugin's `request.path` says) or from the answer so far.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use super::abi::{self, Headers};
use super::host::{Exchange, Shared};
use crate::policy::Admission;

/// The edge as Envoy's `node`: its id in the fleet and the operator's metadata
/// (`[edge] metadata`), the same for every plugin and context, root contexts included.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Node {
    /// The edge's id (`node.id`).
    pub id: String,
    /// `node.metadata.<key>`.
    pub metadata: BTreeMap<String, String>,
}

/// What the edge knows of a request beyond its headers, gathered once per request.
#[derive(Debug, Clone)]
pub struct RequestFacts {
    /// `request.id`: the id the client is given (`x-request-id`).
    pub id: String,
    /// When the request arrived (`request.time`, and `request.duration` from it).
    pub arrived: SystemTime,
    /// `request.protocol`.
    pub version: http::Version,
    /// Over HTTPS (`request.scheme`).
    pub tls: bool,
    /// The body's size (`request.size`).
    pub body_size: u64,
    /// The head's size as it arrived (with the body: `request.total_size`).
    pub head_size: u64,
    /// The client (`source.*`).
    pub client: Option<SocketAddr>,
    /// The edge's end of the connection (`destination.*`).
    pub local: Option<SocketAddr>,
    /// `connection.tls_version`.
    pub tls_version: Option<&'static str>,
    /// `connection.id`.
    pub connection_id: ConnectionId,
    /// `connection.requested_server_name` (SNI).
    pub server_name: Option<std::sync::Arc<str>>,
    /// The route (`route_name`): its path, or the request's path when no route takes it.
    pub route: String,
    /// The caller, its account and the agent.
    pub admission: Admission,
}

/// A connection's id (Envoy's `connection.id`): known already (a WebSocket's, read when it
/// was upgraded), or the socket's kernel cookie, read (a system call) only when a plugin asks.
#[derive(Debug, Clone)]
pub enum ConnectionId {
    /// Known.
    Known(Option<u64>),
    /// The client's socket, whose cookie is the id.
    Socket(std::sync::Arc<pingora_core::protocols::SocketDigest>),
}

impl ConnectionId {
    fn get(&self) -> Option<u64> {
        match self {
            Self::Known(id) => *id,
            Self::Socket(s) => s.socket_cookie().ok(),
        }
    }
}

/// The value of property `name` (its path's segments joined by dots, as
/// [`abi::property_name`] makes it: a plugin may send Envoy's segments or one dotted name), or
/// `None` (`NotFound`). `ex` is the request's exchange (none in a root context); `plugin` is
/// what the asking plugin's VMs share. A property a plugin set comes first.
pub fn get(name: &str, ex: Option<&Exchange>, plugin: &Shared) -> Option<Vec<u8>> {
    if let Some(v) = ex.and_then(|ex| ex.set_properties.get(name)) {
        return Some(v.clone());
    }
    let path: Vec<&str> = name.split('.').collect();
    let bytes = |s: &str| Some(s.as_bytes().to_vec());
    match path.as_slice() {
        ["plugin_name"] => bytes(&plugin.name),
        ["plugin_root_id" | "root_id"] => bytes(&plugin.root_id),
        ["plugin_vm_id" | "vm_id"] => bytes(&plugin.vm_id),
        ["node", rest @ ..] | ["xds", "node", rest @ ..] => node_property(rest, &plugin.node),
        path => request_property(path, ex?),
    }
}

fn node_property(path: &[&str], node: &Node) -> Option<Vec<u8>> {
    match path {
        ["id"] => Some(node.id.as_bytes().to_vec()),
        // A key may hold dots: everything after `metadata` is the key.
        ["metadata", key @ ..] if !key.is_empty() => node
            .metadata
            .get(&key.join("."))
            .map(|v| v.as_bytes().to_vec()),
        _ => None,
    }
}

fn request_property(path: &[&str], ex: &Exchange) -> Option<Vec<u8>> {
    let facts = ex.facts.as_deref()?;
    let bytes = |s: &str| Some(s.as_bytes().to_vec());
    let int = |n: u64| Some(n.to_le_bytes().to_vec());
    let header = |map: &Headers, name: &str| {
        map.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    };
    let request = &ex.request_headers;
    let path_and_query = || header(request, ":path");
    let admission = &facts.admission;
    let agent = &admission.agent;
    match path {
        ["request", "path"] => path_and_query(),
        ["request", "url_path"] => path_and_query().map(|mut p| {
            p.truncate(p.iter().position(|&b| b == b'?').unwrap_or(p.len()));
            p
        }),
        ["request", "query"] => path_and_query().map(|p| match p.iter().position(|&b| b == b'?') {
            Some(i) => p[i + 1..].to_vec(),
            None => Vec::new(),
        }),
        ["request", "host"] => header(request, ":authority"),
        ["request", "method"] => header(request, ":method"),
        ["request", "scheme"] => bytes(if facts.tls { "https" } else { "http" }),
        ["request", "referer"] => header(request, "referer"),
        ["request", "useragent"] => header(request, "user-agent"),
        ["request", "id"] => bytes(&facts.id),
        ["request", "protocol"] => bytes(protocol(facts.version)),
        ["request", "time"] => int(nanos(facts.arrived)),
        ["request", "duration"] => {
            int(nanos(SystemTime::now()).saturating_sub(nanos(facts.arrived)))
        }
        ["request", "size"] => int(facts.body_size),
        ["request", "total_size"] => int(facts.head_size + facts.body_size),
        ["request", "headers"] => Some(encode(request)),
        // A header name may hold dots: everything after `headers` is the name.
        ["request", "headers", name @ ..] => header(request, &name.join(".")),
        ["response", "headers"] => Some(encode(&ex.response_headers)),
        ["response", "headers", name @ ..] => header(&ex.response_headers, &name.join(".")),
        ["response", "trailers", name @ ..] => header(&ex.response_trailers, &name.join(".")),
        ["response", "code"] => int(u64::from(ex.response_code?)),
        ["response", "code_details"] => ex.response_code.map(|_| b"via_upstream".to_vec()),
        ["response", "size" | "total_size"] => {
            ex.response_code?;
            int(ex.response_size)
        }
        ["source", "address"] => facts.client.map(|a| a.to_string().into_bytes()),
        ["source", "port"] => int(u64::from(facts.client?.port())),
        ["destination", "address"] => facts.local.map(|a| a.to_string().into_bytes()),
        ["destination", "port"] => int(u64::from(facts.local?.port())),
        ["upstream", "address"] => upstream(agent).map(|a| a.to_string().into_bytes()),
        ["upstream", "port"] => int(u64::from(upstream(agent)?.port())),
        // The edge asks no client for a certificate.
        ["connection", "mtls"] => Some(vec![0]),
        ["connection", "tls_version"] => facts.tls_version.and_then(bytes),
        ["connection", "id"] => int(facts.connection_id.get()?),
        ["connection", "requested_server_name"] => facts.server_name.as_deref().and_then(bytes),
        // The agent is the edge's "cluster", and the route its route.
        ["cluster_name"] | ["xds", "cluster_name"] => bytes(&agent.endpoint_id),
        ["route_name"] | ["xds", "route_name"] => bytes(&facts.route),
        // The edge's own facts, also as the dynamic metadata it publishes (Envoy filters
        // publish theirs under their name).
        ["moltghost", key] | ["metadata", "filter_metadata", "moltghost", key] => match *key {
            "account" => bytes(&admission.account.id),
            "key_id" => bytes(&admission.key.id),
            "agent" => bytes(&agent.endpoint_id),
            "agent_name" => bytes(&agent.name),
            "plan" => bytes(&admission.account.plan.name),
            "route" => bytes(&facts.route),
            _ => None,
        },
        _ => None,
    }
}

/// The agent's runtime as Envoy's `upstream.*`: the address the edge connects to, or, for a
/// pod, its address inside the tunnel (the edge's own hop to the tunnel is a Unix socket).
fn upstream(agent: &crate::registry::Agent) -> Option<SocketAddr> {
    agent
        .upstream
        .peer()
        .ok()
        .and_then(|p| p._address.as_inet().copied())
        .or_else(|| agent.upstream.authority().parse().ok())
}

fn encode(map: &Headers) -> Vec<u8> {
    abi::encode_map(map.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
}

fn nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos() as u64
}

/// `request.protocol` as Envoy spells it.
fn protocol(v: http::Version) -> &'static str {
    match v {
        http::Version::HTTP_10 => "HTTP/1.0",
        http::Version::HTTP_2 => "HTTP/2",
        http::Version::HTTP_3 => "HTTP/3",
        _ => "HTTP/1.1",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plugin() -> Shared {
        Shared::new("p", Vec::new()).with_node(std::sync::Arc::new(Node {
            id: "edge-1".into(),
            metadata: BTreeMap::from([("region".into(), "eu".into()), ("a.b".into(), "c".into())]),
        }))
    }

    #[test]
    fn the_node_and_the_plugin_are_known_in_every_context() {
        let p = plugin();
        let get = |path: &[u8]| get(&abi::property_name(path).unwrap(), None, &p);
        assert_eq!(get(b"node\0id"), Some(b"edge-1".to_vec()));
        assert_eq!(get(b"xds\0node\0id"), Some(b"edge-1".to_vec()));
        assert_eq!(get(b"node.id"), Some(b"edge-1".to_vec()));
        assert_eq!(get(b"node\0metadata\0region"), Some(b"eu".to_vec()));
        assert_eq!(get(b"xds\0node\0metadata\0a.b"), Some(b"c".to_vec()));
        assert_eq!(get(b"node\0metadata\0nope"), None);
        assert_eq!(get(b"node\0metadata"), None);
        assert_eq!(get(b"plugin_name"), Some(b"p".to_vec()));
        // A root context has no request.
        assert_eq!(get(b"request\0path"), None);
    }
}
