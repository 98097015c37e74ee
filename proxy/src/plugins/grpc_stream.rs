//! gRPC streams out (`proxy_grpc_stream`, `proxy_grpc_send`, `_close`, `_cancel`), as Envoy's
//! wasm filter opens them: to an upstream the plugin's configuration names, `POST
//! /<service>/<method>` over HTTP/2 with the plugin's initial metadata, each message framed as
//! gRPC frames it, sent as the plugin sends it, and each reply message handed over as it comes.
//!
//! The host calls only record what the plugin asked for ([`StreamOp`]); the owner of the
//! plugin's contexts (a request's run through the plugins, or the plugin's background
//! instance) applies them to its [`Streams`] once the callback returns, and delivers what the
//! streams bring back ([`StreamEvent`]) on the root context, where the SDKs find the stream's
//! context by its token: the reply's initial metadata to
//! `proxy_on_grpc_receive_initial_metadata`, each message to `proxy_on_grpc_receive`, the
//! trailers to `proxy_on_grpc_receive_trailing_metadata`, the end to `proxy_on_grpc_close`.
//!
//! As on Envoy: `close` half-closes (the plugin sends no more; replies still come), `cancel`
//! resets the stream (no callback comes after it), and a stream ends with the context that
//! owns it (a request's streams with the request). Nothing here blocks a thread: each stream
//! is a task on the owner's runtime, and what it brings back waits in a bounded queue (a
//! plugin that does not read makes the upstream wait, by HTTP/2 flow control).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use http_body_util::BodyExt;
use tokio::sync::mpsc;

use super::abi::Headers;
use super::grpc::{self, code};

/// Streams one VM may have open at once: a plugin on one worker thread, all its requests
/// together, or its background instance (past it `proxy_grpc_stream` answers
/// `InternalFailure`, logged once).
pub const MAX_STREAMS: usize = 256;
/// Bytes a stream may have sent and not yet taken by the upstream (past it the stream is
/// reset: its close says `RESOURCE_EXHAUSTED`). With [`MAX_STREAMS`], at most 256 MiB a VM.
pub const MAX_QUEUED_BYTES: usize = 1 << 20;
/// Events the streams of one owner may have waiting to be delivered.
const EVENTS: usize = 64;

/// What a plugin asked of its streams during one callback, in order.
#[derive(Debug)]
pub enum StreamOp {
    /// Open a stream.
    Open(StreamRequest),
    /// Send a message (`end`: and half-close).
    Send {
        /// The stream.
        token: u32,
        /// The message, framed.
        frame: Bytes,
        /// Half-close after it.
        end: bool,
    },
    /// Half-close: the plugin sends no more.
    Close(u32),
    /// Reset: nothing more either way, and no callback.
    Cancel(u32),
    /// Reset by the edge: the plugin's close callback gets this status code and message.
    Fail(u32, u32, String),
}

/// A stream to open.
#[derive(Debug)]
pub struct StreamRequest {
    /// The token the plugin got for it.
    pub token: u32,
    /// Where: the upstream's URL with `/<service>/<method>`.
    pub url: url::Url,
    /// The plugin's initial metadata, then `content-type` and `te`.
    pub headers: Headers,
    /// Bytes queued to send and not yet taken by the connection (shared with the host, which
    /// refuses a send past [`MAX_QUEUED_BYTES`]).
    pub queued: Arc<AtomicUsize>,
}

/// What a stream brings back, in order: initial metadata (unless the reply is trailers-only),
/// messages, trailing metadata, and always a close last.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamEvent {
    /// The reply's headers.
    InitialMetadata(Headers),
    /// One message.
    Message(Bytes),
    /// The reply's trailers.
    TrailingMetadata(Headers),
    /// The stream ended: its gRPC status code (0: OK) and message.
    Close(u32, String),
}

/// One open stream.
struct Open {
    /// Where the plugin's messages go; `None` once half-closed.
    body: Option<mpsc::UnboundedSender<Bytes>>,
    task: tokio::task::AbortHandle,
}

/// The streams one owner has open, and what they brought back not yet delivered.
pub struct Streams {
    open: HashMap<u32, Open>,
    /// Every stream ever opened here, for the host to forget when the owner ends.
    opened: Vec<u32>,
    /// Closes the edge decided ([`StreamOp::Fail`]), delivered before what the queue holds.
    failed: VecDeque<(u32, StreamEvent)>,
    tx: mpsc::Sender<(u32, StreamEvent)>,
    rx: mpsc::Receiver<(u32, StreamEvent)>,
    /// The largest reply message a plugin may be given.
    max_message: usize,
}

impl Streams {
    /// No streams yet; reply messages larger than `max_message` bytes end their stream
    /// (`RESOURCE_EXHAUSTED`).
    pub fn new(max_message: usize) -> Self {
        let (tx, rx) = mpsc::channel(EVENTS);
        Self {
            open: HashMap::new(),
            opened: Vec::new(),
            failed: VecDeque::new(),
            tx,
            rx,
            max_message,
        }
    }

    /// Carries out what the plugin asked, in order. Opening spawns the stream's task on the
    /// current runtime.
    pub fn apply(&mut self, ops: Vec<StreamOp>) {
        for op in ops {
            match op {
                StreamOp::Open(req) => {
                    let (body, outgoing) = mpsc::unbounded_channel();
                    let token = req.token;
                    let task = tokio::spawn(run(req, outgoing, self.tx.clone(), self.max_message));
                    self.opened.push(token);
                    self.open.insert(
                        token,
                        Open {
                            body: Some(body),
                            task: task.abort_handle(),
                        },
                    );
                }
                StreamOp::Send { token, frame, end } => {
                    if let Some(s) = self.open.get_mut(&token) {
                        if let Some(body) = &s.body {
                            let _ = body.send(frame);
                        }
                        if end {
                            s.body = None;
                        }
                    }
                }
                StreamOp::Close(token) => {
                    if let Some(s) = self.open.get_mut(&token) {
                        s.body = None;
                    }
                }
                StreamOp::Cancel(token) => {
                    if let Some(s) = self.open.remove(&token) {
                        s.task.abort();
                    }
                }
                StreamOp::Fail(token, code, message) => {
                    if let Some(s) = self.open.get(&token) {
                        s.task.abort();
                        self.failed
                            .push_back((token, StreamEvent::Close(code, message)));
                    }
                }
            }
        }
    }

    /// Every stream opened here (the host's record of each must end with the owner).
    pub fn opened(&self) -> &[u32] {
        &self.opened
    }

    /// True while a stream is open (it will bring back at least its close).
    pub fn any_open(&self) -> bool {
        !self.open.is_empty()
    }

    /// The next event already here, if any.
    pub fn ready(&mut self) -> Option<(u32, StreamEvent)> {
        loop {
            let (token, event) = match self.failed.pop_front() {
                Some(f) => f,
                None => self.rx.try_recv().ok()?,
            };
            if let Some(e) = self.accept(token, event) {
                return Some((token, e));
            }
        }
    }

    /// The next event; pending forever when no stream is open.
    pub async fn next(&mut self) -> (u32, StreamEvent) {
        loop {
            if let Some(e) = self.ready() {
                return e;
            }
            if self.open.is_empty() {
                return std::future::pending().await;
            }
            let Some((token, event)) = self.rx.recv().await else {
                return std::future::pending().await;
            };
            if let Some(e) = self.accept(token, event) {
                return (token, e);
            }
        }
    }

    /// An event of a stream still open (a cancelled stream's are dropped); its close forgets it.
    fn accept(&mut self, token: u32, event: StreamEvent) -> Option<StreamEvent> {
        self.open.get(&token)?;
        if matches!(event, StreamEvent::Close(..)) {
            self.open.remove(&token);
        }
        Some(event)
    }
}

impl Drop for Streams {
    fn drop(&mut self) {
        for s in self.open.values() {
            s.task.abort();
        }
    }
}

/// Runs one stream until it ends, and says how.
async fn run(
    req: StreamRequest,
    outgoing: mpsc::UnboundedReceiver<Bytes>,
    events: mpsc::Sender<(u32, StreamEvent)>,
    max_message: usize,
) {
    let token = req.token;
    let send = |e: StreamEvent| {
        let events = events.clone();
        async move { events.send((token, e)).await.is_ok() }
    };
    let (code, message) = match exchange(req, outgoing, &send, max_message).await {
        Ok(s) | Err(s) => s,
    };
    send(StreamEvent::Close(code, message)).await;
}

/// The stream's exchange: the plugin's messages out, the reply's events in. `Ok` with the
/// status the upstream ended it with, `Err` with the edge's reason for ending it.
async fn exchange<F, Fut>(
    req: StreamRequest,
    mut outgoing: mpsc::UnboundedReceiver<Bytes>,
    send: &F,
    max_message: usize,
) -> Result<(u32, String), (u32, String)>
where
    F: Fn(StreamEvent) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let queued = req.queued.clone();
    let body = futures_util::stream::poll_fn(move |cx| {
        outgoing.poll_recv(cx).map(|frame| {
            frame.map(|f: Bytes| {
                queued.fetch_sub(f.len(), Relaxed);
                Ok::<_, std::convert::Infallible>(f)
            })
        })
    });
    let mut builder = grpc::client()
        .post(req.url)
        .body(reqwest::Body::wrap_stream(body));
    for (k, v) in &req.headers {
        builder = builder.header(k.as_str(), v.as_slice());
    }
    let unreachable = |_| {
        (
            code::UNAVAILABLE,
            "the upstream could not be reached".into(),
        )
    };
    let resp = builder.send().await.map_err(unreachable)?;
    if resp.status() != http::StatusCode::OK {
        return Err((
            code::UNAVAILABLE,
            format!("the upstream answered HTTP {}", resp.status().as_u16()),
        ));
    }
    let resp: http::Response<reqwest::Body> = resp.into();
    let (head, mut body) = resp.into_parts();
    // A trailers-only reply: its headers are the trailing metadata, and it ends here.
    if let Some(status) = grpc::status_of(&head.headers, None) {
        send(StreamEvent::TrailingMetadata(metadata(&head.headers))).await;
        return Ok((status.code, status.message));
    }
    if !send(StreamEvent::InitialMetadata(metadata(&head.headers))).await {
        return Err((code::CANCELLED, "cancelled".into()));
    }
    let mut pending = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| (code::UNAVAILABLE, "the stream was reset".to_string()))?;
        let frame = match frame.into_data() {
            Ok(data) => {
                pending.extend_from_slice(&data);
                while let Some(message) = next_message(&mut pending, max_message)? {
                    if !send(StreamEvent::Message(message)).await {
                        return Err((code::CANCELLED, "cancelled".into()));
                    }
                }
                continue;
            }
            Err(frame) => frame,
        };
        if let Ok(trailers) = frame.into_trailers() {
            send(StreamEvent::TrailingMetadata(metadata(&trailers))).await;
            if !pending.is_empty() {
                return Err((code::INTERNAL, "a gRPC frame cut short".into()));
            }
            return grpc::status_of(&head.headers, Some(&trailers))
                .map(|s| (s.code, s.message))
                .ok_or((code::UNKNOWN, "a reply without grpc-status".into()));
        }
    }
    Err((code::INTERNAL, "the stream ended without trailers".into()))
}

/// The next whole message in `pending`, taken out of it; `None` until one has arrived.
fn next_message(pending: &mut BytesMut, max: usize) -> Result<Option<Bytes>, (u32, String)> {
    let framed = grpc::framed_len(pending, max).map_err(|s| (s.code, s.message))?;
    let Some(len) = framed else {
        return Ok(None);
    };
    pending.advance(5);
    Ok(Some(pending.split_to(len).freeze()))
}

/// Headers as metadata for the plugin (names lowercase).
fn metadata(map: &http::HeaderMap) -> Headers {
    map.iter()
        .map(|(k, v)| (k.as_str().to_owned(), v.as_bytes().to_vec()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_cut_from_frames_as_they_arrive() {
        let mut pending = BytesMut::new();
        pending.extend_from_slice(&grpc::frame(b"one"));
        pending.extend_from_slice(&grpc::frame(b"two")[..4]);
        assert_eq!(
            next_message(&mut pending, 10).unwrap(),
            Some(Bytes::from_static(b"one"))
        );
        assert_eq!(next_message(&mut pending, 10).unwrap(), None);
        pending.extend_from_slice(&grpc::frame(b"two")[4..]);
        assert_eq!(
            next_message(&mut pending, 10).unwrap(),
            Some(Bytes::from_static(b"two"))
        );
        assert!(pending.is_empty());
        pending.extend_from_slice(&grpc::frame(b"too long"));
        assert_eq!(
            next_message(&mut pending, 4).unwrap_err().0,
            code::RESOURCE_EXHAUSTED
        );
        let mut compressed = BytesMut::from(&b"\x01\0\0\0\x01x"[..]);
        assert_eq!(
            next_message(&mut compressed, 4).unwrap_err().0,
            code::INTERNAL
        );
    }
}
