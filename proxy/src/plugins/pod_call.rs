//! HTTP calls out to a pod behind WireGuard: a plugin's upstream written as an agent's is,
//! `wg://KEY@host:port[/base]`. The call goes through the edge's own tunnel to that pod (made
//! at load, kept while the plugin is loaded) to the pod's sidecar, which, as for every request
//! it carries, wants a caller identity signed by the edge: a request's calls carry the
//! request's caller (its account, key id, agent and request id), a root context's calls an
//! identity naming only the plugin (`key = plugin:<name>`, no account or agent).

use std::net::ToSocketAddrs;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;

use super::abi::Headers;
use super::callout::{CallRequest, CallResponse};
use super::host::Host;
use crate::identity::IdentityKey;
use crate::tunnel::bridge::{PodTunnel, Tunnels};
use crate::upstream::UpstreamTarget;

/// A pod a plugin calls: its tunnel, and the key that signs the callers' identities.
pub struct PodRoute {
    /// The pod's address inside its tunnel, with the upstream's base path: a call's `:path`
    /// goes after it.
    pub base: url::Url,
    /// The tunnel to the pod.
    pub tunnel: PodTunnel,
    /// Signs the caller identity the pod checks.
    pub identity: Arc<IdentityKey>,
}

/// How one call reaches a pod: the route and the identity it carries.
#[derive(Clone)]
pub struct Via {
    route: Arc<PodRoute>,
    identity: String,
}

impl PodRoute {
    /// The route to pod `target` (a [`UpstreamTarget::Pod`]) through `tunnels`, its callers'
    /// identities signed with `identity`.
    pub fn open(
        target: &UpstreamTarget,
        tunnels: &Tunnels,
        identity: Arc<IdentityKey>,
    ) -> Result<Self, String> {
        let UpstreamTarget::Pod {
            key,
            host,
            port,
            base_path,
        } = target
        else {
            return Err(format!("{target} is not a pod"));
        };
        let endpoint = (host.as_str(), *port)
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve {host}: {e}"))?
            .next()
            .ok_or_else(|| format!("{host} has no address"))?;
        let tunnel = tunnels.pod(key, endpoint).map_err(|e| e.to_string())?;
        let base = format!(
            "http://{}:{}{base_path}/",
            crate::tunnel::POD_ADDR,
            crate::tunnel::POD_PORT
        );
        Ok(Self {
            base: url::Url::parse(&base).map_err(|e| e.to_string())?,
            tunnel,
            identity,
        })
    }
}

impl Via {
    /// Where the call's `:path` goes: the pod's address and the upstream's base path.
    pub fn base(&self) -> &url::Url {
        &self.route.base
    }
}

impl std::fmt::Debug for Via {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Via")
            .field("pod", &self.route.tunnel.id)
            .finish()
    }
}

/// The way through a pod for a call to upstream `name`, if `name` is a pod: the identity of
/// the request the current callback serves, or the plugin's own for a root context's call.
pub(super) fn via(host: &Host, name: &str) -> Option<Via> {
    let route = host.shared.pods.get(name)?.clone();
    let facts = host.exchange.as_ref().and_then(|e| e.facts.as_deref());
    let identity = match facts {
        Some(f) => route.identity.sign(
            &f.admission.account.id,
            &f.admission.key.id,
            &f.admission.agent.endpoint_id,
            &f.id,
        ),
        None => route
            .identity
            .sign("", &format!("plugin:{}", host.shared.name), "", ""),
    };
    Some(Via { route, identity })
}

/// Makes `call` through the pod's tunnel (HTTP/1.1, one connection per call); any failure,
/// or an answer past `max_body` bytes, is `None`.
pub(super) async fn http(call: CallRequest, via: Via, max_body: usize) -> Option<CallResponse> {
    let link = via.route.tunnel.link.clone();
    let stream = link
        .connect(crate::tunnel::POD_PORT, call.timeout)
        .await
        .ok()?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .ok()?;
    let driver = tokio::spawn(conn);
    let mut path = call.url.path().to_owned();
    if let Some(q) = call.url.query() {
        path.push('?');
        path.push_str(q);
    }
    let mut req = http::Request::builder().method(call.method).uri(path);
    for (k, v) in &call.headers {
        req = req.header(k.as_str(), v.as_slice());
    }
    req = req.header("x-moltghost-identity", via.identity);
    let req = req.body(Full::new(Bytes::from(call.body))).ok()?;
    let resp = sender.send_request(req).await.ok()?;
    let mut headers: Headers = Vec::with_capacity(resp.headers().len() + 1);
    headers.push((":status".into(), resp.status().as_str().as_bytes().to_vec()));
    for (k, v) in resp.headers() {
        headers.push((k.as_str().to_owned(), v.as_bytes().to_vec()));
    }
    let body = Limited::new(resp.into_body(), max_body)
        .collect()
        .await
        .ok()?
        .to_bytes();
    driver.abort();
    Some(CallResponse {
        failed: false,
        headers,
        body,
        trailers: Vec::new(),
    })
}
