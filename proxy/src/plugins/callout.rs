//! HTTP calls out (`proxy_http_call`), as Envoy's wasm filter makes them: to an upstream the
//! plugin's configuration names (`upstreams = { name = "http://..." }`, Envoy's cluster; a pod
//! behind WireGuard, `wg://KEY@host:port`, is reached through the edge's tunnel, see
//! [`super::pod_call`]), with
//! the plugin's headers (`:method`, `:path` and `:authority` required), body and timeout. The
//! host call only records the call and hands back a token; the request's walk through the
//! plugins ([`super::PluginRun`]) makes it once the phase returns, without blocking the worker,
//! and delivers the answer to `proxy_on_http_call_response` on the root context, where the
//! SDKs route it to the context that called by its token. A call that fails (refused, timed
//! out, too large) is delivered as Envoy delivers it: with no headers, no body, no trailers.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use wasmtime::{Caller, Linker};

use super::abi::{self, Headers, Status};
use super::calls::{give, read, write_u32};
use super::host::Host;

/// Calls one request may have waiting at once (past it `proxy_http_call` answers
/// `InternalFailure`, logged once).
pub const MAX_PENDING: usize = 64;
/// The longest a call may take (a plugin's larger timeout, or none, is cut to it).
pub const MAX_TIMEOUT: Duration = Duration::from_secs(60);

/// A call a plugin asked for, not yet made.
#[derive(Debug, Clone)]
pub struct CallRequest {
    /// The token the plugin got for it.
    pub token: u32,
    /// Where: the upstream's URL with the plugin's `:path`.
    pub url: url::Url,
    /// `:method`.
    pub method: http::Method,
    /// The other headers (`:authority` as `host`).
    pub headers: Headers,
    /// The body.
    pub body: Vec<u8>,
    /// The plugin's timeout, within [`MAX_TIMEOUT`].
    pub timeout: Duration,
    /// A gRPC unary call ([`super::grpc`]), not an HTTP call.
    pub grpc: bool,
    /// Through a pod's tunnel, not straight to `url`.
    pub via: Option<super::pod_call::Via>,
}

/// What a call's callback is given.
#[derive(Debug, Clone)]
pub enum Answer {
    /// An HTTP call's answer.
    Http(CallResponse),
    /// A gRPC call's reply message, or its failure.
    Grpc(Result<Bytes, super::grpc::GrpcStatus>),
    /// What a gRPC stream brought.
    Stream(super::grpc_stream::StreamEvent),
}

/// An answer, as the callback sees it (all empty when the call failed).
#[derive(Debug, Clone, Default)]
pub struct CallResponse {
    /// The call failed (refused, timed out, too large): `proxy_get_status` says so.
    pub failed: bool,
    /// `:status` first, then the headers, names lowercase.
    pub headers: Headers,
    /// The body.
    pub body: Bytes,
    /// The trailers (HTTP/1.1 answers have none).
    pub trailers: Headers,
}

/// The upstreams a plugin's configuration names, by name, checked once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallUpstreams {
    /// `http://` and `https://` URLs.
    pub urls: HashMap<String, url::Url>,
    /// Pods behind WireGuard (`wg://KEY@host:port[/base]`, as an agent's upstream).
    pub pods: HashMap<String, crate::upstream::UpstreamTarget>,
}

/// Parses a plugin's `upstreams`: each an `http` or `https` URL, or a pod.
pub fn upstreams(table: &HashMap<String, String>) -> Result<CallUpstreams, String> {
    let mut out = CallUpstreams::default();
    for (name, raw) in table {
        if raw.starts_with("wg://") {
            let pod = crate::upstream::UpstreamTarget::parse(raw)
                .map_err(|e| format!("upstream `{name}`: {e}"))?;
            out.pods.insert(name.clone(), pod);
            continue;
        }
        let url = url::Url::parse(raw).map_err(|e| format!("upstream `{name}`: {e}"))?;
        if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
            return Err(format!(
                "upstream `{name}`: {raw:?} is not an http://, https:// or wg:// URL"
            ));
        }
        out.urls.insert(name.clone(), url);
    }
    Ok(out)
}

/// Defines `proxy_http_call` and `proxy_get_status`.
pub(super) fn define(l: &mut Linker<Host>) -> wasmtime::Result<()> {
    // As Envoy: during the callback of a failed HTTP call, `BrokenConnection` and "reset"; in
    // a gRPC call's close, its status code and message; else 0 and nothing.
    l.func_wrap(
        "env",
        "proxy_get_status",
        |mut c: Caller<'_, Host>,
         code_ptr: i32,
         msg_ptr: i32,
         msg_size: i32|
         -> wasmtime::Result<i32> {
            let (code, message) = c.data().call_status.clone();
            if write_u32(&mut c, code_ptr, code).is_none() {
                return Ok(Status::InvalidMemoryAccess as i32);
            }
            Ok(give(&mut c, message.as_bytes(), msg_ptr, msg_size)? as i32)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_http_call",
        |mut c: Caller<'_, Host>,
         up: i32,
         up_len: i32,
         hp: i32,
         hl: i32,
         bp: i32,
         bl: i32,
         tp: i32,
         tl: i32,
         timeout_ms: i32,
         token_ptr: i32|
         -> i32 {
            let Some(upstream) = read(&mut c, up, up_len) else {
                return Status::InvalidMemoryAccess as i32;
            };
            let (Some(headers), Some(body), Some(_trailers)) = (
                read(&mut c, hp, hl),
                read(&mut c, bp, bl),
                read(&mut c, tp, tl),
            ) else {
                return Status::InvalidMemoryAccess as i32;
            };
            let Some(headers) = abi::decode_map(&headers) else {
                return Status::ParseFailure as i32;
            };
            let via = std::str::from_utf8(&upstream)
                .ok()
                .and_then(|name| super::pod_call::via(c.data(), name));
            let base = match &via {
                Some(v) => Some(v.base().clone()),
                None => upstream_url(c.data(), &upstream),
            };
            let Some(base) = base else {
                return Status::BadArgument as i32;
            };
            let Some(mut request) = request(&base, headers, body, timeout_ms) else {
                return Status::BadArgument as i32;
            };
            request.via = via;
            record(&mut c, request, token_ptr)
        },
    )?;
    Ok(())
}

/// The URL of the upstream the plugin's configuration names `name`; `None` (Envoy: an unknown
/// cluster, `BadArgument`) for any other.
pub(super) fn upstream_url(host: &Host, name: &[u8]) -> Option<url::Url> {
    let name = std::str::from_utf8(name).ok()?;
    host.shared.upstreams.get(name).cloned()
}

/// Records a call to be made once the current callback returns, and writes its token to the
/// guest's `token_ptr`.
pub(super) fn record(c: &mut Caller<'_, Host>, mut request: CallRequest, token_ptr: i32) -> i32 {
    let host = c.data_mut();
    if host.calls_out.len() >= MAX_PENDING {
        host.shared.unsupported("calls out (over 64 pending)", 10);
        return Status::InternalFailure as i32;
    }
    host.next_token = host.next_token.wrapping_add(1).max(1);
    request.token = host.next_token;
    let token = request.token;
    host.calls_out.push(request);
    if write_u32(c, token_ptr, token).is_none() {
        c.data_mut().calls_out.pop();
        return Status::InvalidMemoryAccess as i32;
    }
    Status::Ok as i32
}

/// Drops call `token`: not made if it is still waiting, its answer not delivered if it is in
/// flight. `NotFound` for a token never handed out.
pub(super) fn cancel(host: &mut Host, token: u32) -> Status {
    if let Some(i) = host.calls_out.iter().position(|c| c.token == token) {
        host.calls_out.remove(i);
        return Status::Ok;
    }
    if token == 0 || token > host.next_token {
        return Status::NotFound;
    }
    host.cancelled.push(token);
    Status::Ok
}

/// A plugin's timeout in milliseconds as the call's: 0 or less, or past [`MAX_TIMEOUT`], is
/// [`MAX_TIMEOUT`].
pub fn timeout(ms: i32) -> Duration {
    match ms {
        t if t > 0 => Duration::from_millis(t as u64).min(MAX_TIMEOUT),
        _ => MAX_TIMEOUT,
    }
}

/// The call the plugin's headers describe, or `None` (Envoy's `BadArgument`) when `:method`,
/// `:path` or `:authority` is missing or unusable.
fn request(
    base: &url::Url,
    headers: Headers,
    body: Vec<u8>,
    timeout_ms: i32,
) -> Option<CallRequest> {
    let pseudo = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    };
    let method = http::Method::from_bytes(pseudo(":method")?.as_bytes()).ok()?;
    let path = pseudo(":path")?;
    let authority = pseudo(":authority")?;
    if !path.starts_with('/') || authority.is_empty() {
        return None;
    }
    let url = base.join(path).ok()?;
    let mut rest: Headers = headers
        .iter()
        .filter(|(k, v)| !k.starts_with(':') && abi::valid_header_value(v))
        .filter(|(k, _)| abi::valid_header_name(k) && k != "host")
        .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
        .collect();
    rest.push(("host".into(), authority.as_bytes().to_vec()));
    Some(CallRequest {
        token: 0,
        url,
        method,
        headers: rest,
        body,
        timeout: timeout(timeout_ms),
        grpc: false,
        via: None,
    })
}

thread_local! {
    // One client per worker thread: its connections live on that worker's runtime.
    static CLIENT: reqwest::Client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("an HTTP client");
}

/// Makes the call, HTTP or gRPC; an answer whose body passes `max_body` bytes is a failure.
pub async fn perform(call: CallRequest, max_body: usize) -> Answer {
    if call.grpc {
        Answer::Grpc(super::grpc::perform(call, max_body).await)
    } else {
        Answer::Http(http(call, max_body).await)
    }
}

/// Makes an HTTP call; an answer whose body passes `max_body` bytes, like any failure, comes
/// back empty (as Envoy reports a failed call).
async fn http(mut call: CallRequest, max_body: usize) -> CallResponse {
    let failed = || CallResponse {
        failed: true,
        ..CallResponse::default()
    };
    if let Some(via) = call.via.take() {
        let timeout = call.timeout;
        let answer = tokio::time::timeout(timeout, super::pod_call::http(call, via, max_body));
        return answer.await.ok().flatten().unwrap_or_else(failed);
    }
    let client = CLIENT.with(Clone::clone);
    let mut builder = client
        .request(call.method, call.url)
        .timeout(call.timeout)
        .body(call.body);
    for (k, v) in &call.headers {
        builder = builder.header(k.as_str(), v.as_slice());
    }
    let answer = async {
        let mut resp = builder.send().await.ok()?;
        let mut headers: Headers = Vec::with_capacity(resp.headers().len() + 1);
        headers.push((":status".into(), resp.status().as_str().as_bytes().to_vec()));
        for (k, v) in resp.headers() {
            headers.push((k.as_str().to_owned(), v.as_bytes().to_vec()));
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.ok()? {
            if body.len() + chunk.len() > max_body {
                return None;
            }
            body.extend_from_slice(&chunk);
        }
        Some(CallResponse {
            failed: false,
            headers,
            body: body.into(),
            trailers: Vec::new(),
        })
    };
    answer.await.unwrap_or_else(failed)
}

/// Makes `calls` concurrently: each token with its answer, in the order asked.
pub async fn perform_all(calls: Vec<CallRequest>, max_body: usize) -> Vec<(u32, Answer)> {
    futures_util::future::join_all(calls.into_iter().map(|c| async move {
        let token = c.token;
        (token, perform(c, max_body).await)
    }))
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(&str, &str)]) -> Headers {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
            .collect()
    }

    #[test]
    fn a_call_needs_method_path_and_authority_as_on_envoy() {
        let base = url::Url::parse("http://127.0.0.1:9/base/").unwrap();
        let full = h(&[
            (":method", "POST"),
            (":path", "/check?x=1"),
            (":authority", "auth.local"),
            ("x-a", "1"),
        ]);
        let r = request(&base, full.clone(), b"b".to_vec(), 250).unwrap();
        assert_eq!(r.url.as_str(), "http://127.0.0.1:9/check?x=1");
        assert_eq!(r.method, http::Method::POST);
        assert_eq!(r.timeout, Duration::from_millis(250));
        assert!(r.headers.contains(&("host".into(), b"auth.local".to_vec())));
        assert!(r.headers.contains(&("x-a".into(), b"1".to_vec())));
        for missing in [":method", ":path", ":authority"] {
            let some: Headers = full.iter().filter(|(k, _)| k != missing).cloned().collect();
            assert!(request(&base, some, Vec::new(), 0).is_none(), "{missing}");
        }
        assert_eq!(
            request(&base, full, Vec::new(), 0).unwrap().timeout,
            MAX_TIMEOUT
        );
    }

    #[test]
    fn upstreams_must_be_http_urls_or_pods() {
        let key = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=";
        let ok = HashMap::from([
            ("a".to_string(), "https://x.test:8443".to_string()),
            ("p".to_string(), format!("wg://{key}@127.0.0.1:51820/auth")),
        ]);
        let parsed = upstreams(&ok).unwrap();
        assert_eq!(parsed.urls.len(), 1);
        assert_eq!(
            parsed.pods["p"].to_string(),
            format!("wg://{key}@127.0.0.1:51820/auth")
        );
        for bad in [
            "ftp://x",
            "not a url",
            "unix:/tmp/s",
            "wg://nokey@127.0.0.1:1",
        ] {
            let t = HashMap::from([("a".to_string(), bad.to_string())]);
            assert!(upstreams(&t).is_err(), "{bad}");
        }
    }
}
