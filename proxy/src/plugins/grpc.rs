//! gRPC unary calls out (`proxy_grpc_call`), as Envoy's wasm filter makes them: to an upstream
//! the plugin's configuration names, `POST /<service>/<method>` over HTTP/2 (prior knowledge
//! on `http://`, ALPN on `https://`), the plugin's initial metadata as headers and its message
//! framed as gRPC frames it. Like HTTP calls, the host call only records the call; the answer is
//! delivered after the phase returns, on the root context: the reply's message to
//! `proxy_on_grpc_receive` (read as the gRPC receive buffer), or a failure to
//! `proxy_on_grpc_close` with its gRPC status code (`proxy_get_status` gives the code and
//! message in that callback). Streams are [`super::grpc_stream`]'s; their host calls are here.
//!
//! Statuses as the SDKs expect them: an upstream the configuration does not name is
//! `ParseFailure` (Envoy: the argument is neither a serialized `GrpcService` nor a cluster), a
//! service or method name that cannot be sent is `InternalFailure` (Envoy: the call could not
//! start). The Rust SDK traps on any other status from these calls.

use bytes::{BufMut, Bytes, BytesMut};
use wasmtime::{Caller, Linker};

use super::abi::{self, Status};
use super::callout::{self, CallRequest};
use super::calls::read;
use super::host::Host;

/// gRPC's status codes the edge itself answers with.
pub mod code {
    /// The call was cancelled.
    pub const CANCELLED: u32 = 1;
    /// The reply could not be understood.
    pub const UNKNOWN: u32 = 2;
    /// The call ran past its timeout.
    pub const DEADLINE_EXCEEDED: u32 = 4;
    /// The reply was larger than the plugin may hold.
    pub const RESOURCE_EXHAUSTED: u32 = 8;
    /// The reply was malformed.
    pub const INTERNAL: u32 = 13;
    /// The upstream could not be reached.
    pub const UNAVAILABLE: u32 = 14;
}

/// A call's failure: its gRPC status code and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrpcStatus {
    /// The code (never 0).
    pub code: u32,
    /// The message (`grpc-message`, or the edge's reason).
    pub message: String,
}

impl GrpcStatus {
    fn new(code: u32, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// Defines `proxy_grpc_call`, `proxy_grpc_stream`, `proxy_grpc_send`, `proxy_grpc_cancel` and
/// `proxy_grpc_close`.
pub(super) fn define(l: &mut Linker<Host>) -> wasmtime::Result<()> {
    l.func_wrap(
        "env",
        "proxy_grpc_call",
        |mut c: Caller<'_, Host>,
         up: i32,
         up_len: i32,
         svc: i32,
         svc_len: i32,
         method: i32,
         method_len: i32,
         md: i32,
         md_len: i32,
         msg: i32,
         msg_len: i32,
         timeout_ms: i32,
         token_ptr: i32|
         -> i32 {
            let args = [up, up_len, svc, svc_len, method, method_len, md, md_len];
            let (url, headers) = match resolve(&mut c, args) {
                Ok(target) => target,
                Err(status) => return status as i32,
            };
            let Some(message) = read(&mut c, msg, msg_len) else {
                return Status::InvalidMemoryAccess as i32;
            };
            callout::record(&mut c, unary(url, headers, &message, timeout_ms), token_ptr)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_grpc_stream",
        |mut c: Caller<'_, Host>,
         up: i32,
         up_len: i32,
         svc: i32,
         svc_len: i32,
         method: i32,
         method_len: i32,
         md: i32,
         md_len: i32,
         token_ptr: i32|
         -> i32 {
            let args = [up, up_len, svc, svc_len, method, method_len, md, md_len];
            match resolve(&mut c, args) {
                Ok((url, headers)) => streams::open(&mut c, url, headers, token_ptr),
                Err(status) => status as i32,
            }
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_grpc_send",
        |mut c: Caller<'_, Host>, token: i32, ptr: i32, len: i32, end: i32| -> i32 {
            let Some(message) = read(&mut c, ptr, len) else {
                return Status::InvalidMemoryAccess as i32;
            };
            streams::send(c.data_mut(), token as u32, &message, end != 0) as i32
        },
    )?;
    // Envoy: cancelling or closing a unary call drops it (its callback never comes); a stream
    // is reset by cancel and half-closed by close.
    type OnStream = fn(&mut Host, u32) -> Option<Status>;
    for (name, on_stream) in [
        ("proxy_grpc_cancel", streams::cancel as OnStream),
        ("proxy_grpc_close", streams::close),
    ] {
        l.func_wrap(
            "env",
            name,
            move |mut c: Caller<'_, Host>, token: i32| -> i32 {
                let host = c.data_mut();
                on_stream(host, token as u32).unwrap_or_else(|| callout::cancel(host, token as u32))
                    as i32
            },
        )?;
    }
    Ok(())
}

/// Where a call or stream the guest describes (upstream, service, method and metadata, as
/// pointer and length pairs) goes, and its headers. The statuses the SDKs expect: an upstream
/// the configuration does not name is `ParseFailure` (Envoy also takes a serialized
/// `GrpcService` there), a name that cannot be sent `InternalFailure`.
fn resolve(c: &mut Caller<'_, Host>, args: [i32; 8]) -> Result<(url::Url, abi::Headers), Status> {
    let [up, up_len, svc, svc_len, method, method_len, md, md_len] = args;
    let (Some(upstream), Some(service), Some(method), Some(metadata)) = (
        read(c, up, up_len),
        read(c, svc, svc_len),
        read(c, method, method_len),
        read(c, md, md_len),
    ) else {
        return Err(Status::InvalidMemoryAccess);
    };
    let metadata = abi::decode_map(&metadata).ok_or(Status::ParseFailure)?;
    let base = callout::upstream_url(c.data(), &upstream).ok_or(Status::ParseFailure)?;
    target(&base, &service, &method, metadata).ok_or(Status::InternalFailure)
}

/// The HTTP/2 request a unary call to `url` is: `POST`, its headers and `grpc-timeout`, the
/// message in one gRPC frame.
fn unary(url: url::Url, mut headers: abi::Headers, message: &[u8], timeout_ms: i32) -> CallRequest {
    let timeout = callout::timeout(timeout_ms);
    headers.push((
        "grpc-timeout".into(),
        format!("{}m", timeout.as_millis()).into_bytes(),
    ));
    CallRequest {
        token: 0,
        url,
        method: http::Method::POST,
        headers,
        body: frame(message).to_vec(),
        timeout,
        grpc: true,
        via: None,
    }
}

/// Where a call or stream goes (`<base>/<service>/<method>`) and its headers: the metadata
/// that may be sent as headers, then `content-type` and `te`. `None` for an unusable service
/// or method name.
fn target(
    base: &url::Url,
    service: &[u8],
    method: &[u8],
    metadata: abi::Headers,
) -> Option<(url::Url, abi::Headers)> {
    let name = |b: &[u8]| {
        std::str::from_utf8(b)
            .ok()
            .filter(|s| !s.is_empty() && s.bytes().all(|c| c.is_ascii_graphic() && c != b'/'))
            .map(str::to_owned)
    };
    let url = base
        .join(&format!("/{}/{}", name(service)?, name(method)?))
        .ok()?;
    let mut headers: abi::Headers = metadata
        .into_iter()
        .filter(|(k, v)| abi::valid_header_name(k) && abi::valid_header_value(v))
        .map(|(k, v)| (k.to_ascii_lowercase(), v))
        .filter(|(k, _)| !k.starts_with(':') && !matches!(k.as_str(), "content-type" | "te"))
        .collect();
    headers.push(("content-type".into(), b"application/grpc".to_vec()));
    headers.push(("te".into(), b"trailers".to_vec()));
    Some((url, headers))
}

/// `message` as one uncompressed gRPC frame: a zero flag, its length (4 bytes, big-endian),
/// the bytes.
pub fn frame(message: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(5 + message.len());
    out.put_u8(0);
    out.put_u32(message.len() as u32);
    out.put_slice(message);
    out.freeze()
}

/// The one message of a unary reply's body. Compressed frames (the edge asks for none), a
/// frame cut short, or bytes after it are errors.
pub fn unframe(body: Bytes) -> Result<Bytes, GrpcStatus> {
    if body.is_empty() {
        return Ok(Bytes::new());
    }
    match framed_len(&body, usize::MAX)? {
        Some(len) if body.len() == 5 + len => Ok(body.slice(5..)),
        Some(_) => Err(GrpcStatus::new(
            code::INTERNAL,
            "a gRPC reply is not exactly one message",
        )),
        None => Err(GrpcStatus::new(code::INTERNAL, "a gRPC frame cut short")),
    }
}

/// The length of the message framed at the start of `buf`, once all of it is there (`None`
/// until then). A compressed frame (the edge asks for none) or a message over `max` bytes is
/// an error.
pub(super) fn framed_len(buf: &[u8], max: usize) -> Result<Option<usize>, GrpcStatus> {
    let Some(&[flag, a, b, c, d]) = buf.first_chunk::<5>() else {
        return Ok(None);
    };
    if flag != 0 {
        return Err(GrpcStatus::new(
            code::INTERNAL,
            "a compressed gRPC message (none was asked for)",
        ));
    }
    let len = u32::from_be_bytes([a, b, c, d]) as usize;
    if len > max {
        return Err(GrpcStatus::new(
            code::RESOURCE_EXHAUSTED,
            "a reply message is too large",
        ));
    }
    Ok((buf.len() >= 5 + len).then_some(len))
}

/// The reply's status from its trailers (or, for a trailers-only reply, its headers).
pub(super) fn status_of(
    headers: &http::HeaderMap,
    trailers: Option<&http::HeaderMap>,
) -> Option<GrpcStatus> {
    let pick = |name: &str| {
        trailers
            .and_then(|t| t.get(name))
            .or_else(|| headers.get(name))
            .and_then(|v| v.to_str().ok())
    };
    let code = pick("grpc-status")?.trim().parse::<u32>().ok()?;
    let message = pick("grpc-message").unwrap_or("");
    Some(GrpcStatus::new(code, percent_decode(message)))
}

/// `grpc-message` is percent-encoded (`%XX`; nothing else is special).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b
            .get(i + 1..i + 3)
            .and_then(|h| u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok());
        match (b[i], hex) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

thread_local! {
    // HTTP/2 only: gRPC needs it, and `http://` upstreams speak it without an upgrade.
    static CLIENT: reqwest::Client = reqwest::Client::builder()
        .http2_prior_knowledge()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("an HTTP/2 client");
}

/// This thread's HTTP/2 client (its connections live on this thread's runtime).
pub(super) fn client() -> reqwest::Client {
    CLIENT.with(Clone::clone)
}

/// Makes the call: the reply's message, or why there is none.
pub async fn perform(call: CallRequest, max_body: usize) -> Result<Bytes, GrpcStatus> {
    use http_body_util::BodyExt;
    let client = client();
    let mut builder = client
        .request(call.method, call.url)
        .timeout(call.timeout)
        .body(call.body);
    for (k, v) in &call.headers {
        builder = builder.header(k.as_str(), v.as_slice());
    }
    let failed = |e: reqwest::Error| {
        if e.is_timeout() {
            GrpcStatus::new(code::DEADLINE_EXCEEDED, "the call ran past its timeout")
        } else {
            GrpcStatus::new(code::UNAVAILABLE, "the upstream could not be reached")
        }
    };
    let resp = builder.send().await.map_err(failed)?;
    if resp.status() != http::StatusCode::OK {
        return Err(GrpcStatus::new(
            code::UNAVAILABLE,
            format!("the upstream answered HTTP {}", resp.status().as_u16()),
        ));
    }
    let resp: http::Response<reqwest::Body> = resp.into();
    let (head, body) = resp.into_parts();
    let body = http_body_util::Limited::new(body, max_body + 5)
        .collect()
        .await
        .map_err(|e| match e.downcast::<reqwest::Error>() {
            Ok(e) => failed(*e),
            Err(_) => GrpcStatus::new(code::RESOURCE_EXHAUSTED, "the reply is too large"),
        })?;
    let trailers = body.trailers().cloned();
    match status_of(&head.headers, trailers.as_ref()) {
        Some(s) if s.code == 0 => unframe(body.to_bytes()),
        Some(s) => Err(s),
        None => Err(GrpcStatus::new(
            code::UNKNOWN,
            "a reply without grpc-status",
        )),
    }
}

/// The host's side of a plugin's streams: which tokens name one, and what the plugin asked of
/// them (carried out by the owner of its contexts once the callback returns).
mod streams {
    use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
    use std::sync::Arc;

    use wasmtime::Caller;

    use super::super::abi::{self, Status};
    use super::super::calls::write_u32;
    use super::super::grpc_stream::{StreamOp, StreamRequest, MAX_QUEUED_BYTES, MAX_STREAMS};
    use super::super::host::{Host, StreamState};
    use super::{code, frame};

    /// `proxy_grpc_stream`: a token for a stream to open once the callback returns.
    pub(in super::super) fn open(
        c: &mut Caller<'_, Host>,
        url: url::Url,
        headers: abi::Headers,
        token_ptr: i32,
    ) -> i32 {
        let host = c.data_mut();
        if host.streams.len() >= MAX_STREAMS {
            host.shared.unsupported(
                "proxy_grpc_stream (over 256 open in this VM)",
                Status::InternalFailure as i32,
            );
            return Status::InternalFailure as i32;
        }
        host.next_token = host.next_token.wrapping_add(1).max(1);
        let token = host.next_token;
        let queued = Arc::new(AtomicUsize::new(0));
        host.streams.insert(
            token,
            StreamState {
                queued: queued.clone(),
                ..StreamState::default()
            },
        );
        host.stream_ops.push(StreamOp::Open(StreamRequest {
            token,
            url,
            headers,
            queued,
        }));
        if write_u32(c, token_ptr, token).is_none() {
            let host = c.data_mut();
            host.streams.remove(&token);
            host.stream_ops.pop();
            return Status::InvalidMemoryAccess as i32;
        }
        Status::Ok as i32
    }

    /// `proxy_grpc_send`. A stream whose plugin has sent 1 MiB more than the upstream took
    /// is reset (`RESOURCE_EXHAUSTED` to its close callback): the SDKs expect a send to succeed.
    pub(in super::super) fn send(host: &mut Host, token: u32, message: &[u8], end: bool) -> Status {
        let Some(s) = host.streams.get_mut(&token) else {
            // Envoy: a unary call's token is a bad argument, any other is not found.
            return if token != 0 && token <= host.next_token {
                Status::BadArgument
            } else {
                Status::NotFound
            };
        };
        if s.local_closed || s.remote_closed {
            return Status::Ok;
        }
        let framed = frame(message);
        if s.queued.load(Relaxed) + framed.len() > MAX_QUEUED_BYTES {
            s.local_closed = true;
            host.shared.unsupported(
                "proxy_grpc_send (over 1 MiB waiting: the stream is reset)",
                Status::Ok as i32,
            );
            host.stream_ops.push(StreamOp::Fail(
                token,
                code::RESOURCE_EXHAUSTED,
                "the plugin sent more than the upstream took".into(),
            ));
            return Status::Ok;
        }
        s.queued.fetch_add(framed.len(), Relaxed);
        s.local_closed = end;
        host.stream_ops.push(StreamOp::Send {
            token,
            frame: framed,
            end,
        });
        Status::Ok
    }

    /// `proxy_grpc_close` on a stream: half-closed (forgotten once its close has come too).
    /// `None` when `token` names no stream.
    pub(in super::super) fn close(host: &mut Host, token: u32) -> Option<Status> {
        let s = host.streams.get_mut(&token)?;
        if s.remote_closed {
            host.streams.remove(&token);
        } else {
            s.local_closed = true;
            host.stream_ops.push(StreamOp::Close(token));
        }
        Some(Status::Ok)
    }

    /// `proxy_grpc_cancel` on a stream: reset, and no callback after. `None` when `token`
    /// names no stream.
    pub(in super::super) fn cancel(host: &mut Host, token: u32) -> Option<Status> {
        host.streams.remove(&token)?;
        host.stream_ops.push(StreamOp::Cancel(token));
        Some(Status::Ok)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_is_framed_and_unframed() {
        let framed = frame(b"hello");
        assert_eq!(&framed[..], b"\0\0\0\0\x05hello");
        assert_eq!(unframe(framed).unwrap(), Bytes::from_static(b"hello"));
        assert_eq!(unframe(Bytes::new()).unwrap(), Bytes::new());
        for bad in [
            &b"\0\0\0"[..],
            b"\0\0\0\0\x06hello",
            b"\0\0\0\0\x04hello",
            b"\x01\0\0\0\x05hello",
        ] {
            assert!(unframe(Bytes::copy_from_slice(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_call_is_a_post_to_service_and_method() {
        let base = url::Url::parse("http://127.0.0.1:9").unwrap();
        let md = vec![("x-tenant".to_string(), b"a".to_vec())];
        let (url, headers) = target(&base, b"pkg.Auth", b"Check", md).unwrap();
        let r = unary(url, headers, b"m", 300);
        assert_eq!(r.url.as_str(), "http://127.0.0.1:9/pkg.Auth/Check");
        assert!(r.grpc);
        assert!(r.headers.contains(&("x-tenant".into(), b"a".to_vec())));
        assert!(r
            .headers
            .contains(&("grpc-timeout".into(), b"300m".to_vec())));
        for (svc, method) in [(&b""[..], &b"M"[..]), (b"a/b", b"M"), (b"S", b"")] {
            assert!(target(&base, svc, method, Vec::new()).is_none());
        }
    }

    #[test]
    fn grpc_message_is_percent_decoded() {
        assert_eq!(percent_decode("no%20such%20user"), "no such user");
        assert_eq!(percent_decode("a+b%"), "a+b%");
        assert_eq!(percent_decode("%zz%41"), "%zzA");
    }
}
