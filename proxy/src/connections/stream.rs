//! A client's HTTP/1 connection as Pingora reads and writes it, so that the answers Pingora
//! gives without asking the edge are given the edge's way.
//!
//! Pingora answers a head it cannot parse or will not accept (two `Host` headers, obs-fold, more
//! than 256 headers, a head over 1 MiB, ...) itself, before any hook of the edge runs, with an
//! empty 400. Such an answer is the only thing Pingora writes while the connection's
//! [`HeaderClock`] runs (no request is being answered) that starts with a status line, so
//! [`ClientStream`] recognises it there and writes the edge's JSON error with a request id and
//! `Connection: close` instead; what Pingora writes after it is dropped. The stream also tells
//! the clock when header bytes arrive, and gives its inner stream back when dropped, so that the
//! connection can answer a header that missed its deadline with 408 after Pingora has let go.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use pingora_core::protocols::raw_connect::ProxyDigest;
use pingora_core::protocols::tls::{SslDigest, TlsRef};
use pingora_core::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream,
    TimingDigest, UniqueID, UniqueIDType, ALPN,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::clock::HeaderClock;
use super::Refusals;
use crate::error::EdgeError;

/// Where a dropped [`ClientStream`] leaves its socket.
#[derive(Default)]
pub(super) struct Left(Mutex<Option<Leftover>>);

/// What a dropped [`ClientStream`] leaves.
pub(super) struct Leftover {
    /// The socket.
    pub stream: Stream,
    /// Whether the edge answered on it in Pingora's stead (so that it closes gently).
    pub replaced: bool,
    /// How the header last awaited began: whether an answer to it may have a body.
    pub body: Body,
}

/// Whether an answer to the awaited request may carry a body, as far as the edge can tell
/// without Pingora's parse. Only the connection's first request is sure to begin with the first
/// bytes read: a later one may have come pipelined, its beginning read with the request before
/// (and kept by Pingora), so its first bytes read say nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Body {
    /// Not a `HEAD`: the JSON error goes whole.
    Whole,
    /// A `HEAD`: the head only, with the length the body would have (RFC 9110 §9.3.2).
    HeadOnly,
    /// Not known: `Content-Length: 0`, right for either.
    Empty,
}

/// The first bytes of the connection's first request (leading empty lines skipped, as RFC 9112
/// §2.2 lets a server do).
#[derive(Default)]
struct Opening {
    bytes: [u8; 5],
    len: usize,
}

impl Opening {
    /// Notes `read`, bytes of the first request.
    fn note(&mut self, read: &[u8]) {
        let read = if self.len == 0 {
            let start = read.iter().position(|b| !matches!(b, b'\r' | b'\n'));
            &read[start.unwrap_or(read.len())..]
        } else {
            read
        };
        let n = read.len().min(self.bytes.len() - self.len);
        self.bytes[self.len..self.len + n].copy_from_slice(&read[..n]);
        self.len += n;
    }

    /// What an answer to the first request may carry.
    fn body(&self) -> Body {
        let seen = &self.bytes[..self.len];
        match seen {
            [] => Body::Empty,
            [b'H', b'E', b'A', b'D', sep] if sep.is_ascii_whitespace() => Body::HeadOnly,
            _ if b"HEAD".starts_with(seen) => Body::Empty,
            _ => Body::Whole,
        }
    }
}

impl Left {
    /// The socket, once the stream is dropped.
    pub(super) fn take(&self) -> Option<Leftover> {
        self.0.lock().ok()?.take()
    }
}

/// The client's stream, between Pingora and the socket (or TLS session).
pub(super) struct ClientStream {
    /// The socket; taken only when the stream is dropped.
    inner: Option<Stream>,
    clock: HeaderClock,
    refusals: Arc<Refusals>,
    answer: Answer,
    /// How the connection's first request began.
    opening: Opening,
    /// The clock's wait for that first request.
    first_wait: u64,
    left: Arc<Left>,
}

/// What happens to what Pingora writes.
enum Answer {
    /// It goes to the client.
    Through,
    /// The edge's answer replaces Pingora's: `.1` bytes of it are out.
    Replacing(Vec<u8>, usize),
    /// The edge's answer is out; Pingora's writes are dropped.
    Replaced,
}

impl ClientStream {
    /// `inner` under `clock`; refusals are written with `refusals`' ids, and `left` receives
    /// `inner` when the stream is dropped.
    pub(super) fn new(
        inner: Stream,
        clock: HeaderClock,
        refusals: Arc<Refusals>,
        left: Arc<Left>,
    ) -> Self {
        Self {
            inner: Some(inner),
            first_wait: clock.wait(),
            clock,
            refusals,
            answer: Answer::Through,
            opening: Opening::default(),
            left,
        }
    }

    fn io(&self) -> &Stream {
        self.inner.as_ref().expect("present until dropped")
    }

    fn io_mut(&mut self) -> Pin<&mut Stream> {
        Pin::new(self.inner.as_mut().expect("present until dropped"))
    }

    /// What an answer to the awaited request may carry.
    fn body(&self) -> Body {
        if self.clock.wait() == self.first_wait {
            self.opening.body()
        } else {
            Body::Empty
        }
    }

    /// Writes what is left of the edge's replacement answer.
    fn poll_replacement(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Answer::Replacing(bytes, at) = &mut self.answer {
            let inner = Pin::new(self.inner.as_mut().expect("present until dropped"));
            let n = ready!(inner.poll_write(cx, &bytes[*at..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            *at += n;
            if *at == bytes.len() {
                self.answer = Answer::Replaced;
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// The status of the answer `bytes` begin, if they begin one (`HTTP/1.x NNN`).
fn status_line(bytes: &[u8]) -> Option<u16> {
    let rest = bytes.strip_prefix(b"HTTP/1.")?;
    let code = rest.get(2..5)?;
    std::str::from_utf8(code).ok()?.parse().ok()
}

/// The edge's answer in place of Pingora's refusal of a head (Pingora refuses only heads, and
/// only with 400).
fn malformed_head() -> EdgeError {
    EdgeError::InvalidRequest(
        "the request is not valid HTTP/1.1 (RFC 9112): its head could not be parsed, is too \
         large or has too many headers, or it frames its body more than one way"
            .into(),
    )
}

impl AsyncWrite for ClientStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if matches!(this.answer, Answer::Through) {
            if !this.clock.running() || status_line(buf).is_none() {
                return this.io_mut().poll_write(cx, buf);
            }
            let answer = this
                .refusals
                .answer(&malformed_head(), "malformed_head", this.body());
            this.answer = Answer::Replacing(answer, 0);
        }
        ready!(this.poll_replacement(cx))?;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_replacement(cx))?;
        self.io_mut().poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_replacement(cx))?;
        self.io_mut().poll_shutdown(cx)
    }
}

impl AsyncRead for ClientStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        ready!(self.io_mut().poll_read(cx, buf))?;
        let read = &buf.filled()[before..];
        if !read.is_empty() && self.clock.running() {
            self.clock.note_bytes();
            if self.clock.wait() == self.first_wait {
                self.opening.note(read);
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl Drop for ClientStream {
    fn drop(&mut self) {
        let replaced = !matches!(self.answer, Answer::Through);
        if let (Ok(mut left), Some(stream)) = (self.left.0.lock(), self.inner.take()) {
            *left = Some(Leftover {
                stream,
                replaced,
                body: self.body(),
            });
        }
    }
}

#[async_trait]
impl Shutdown for ClientStream {
    async fn shutdown(&mut self) {
        // Pingora shuts a connection down after its refusal: the replacement goes out first.
        let _ = std::future::poll_fn(|cx| self.poll_replacement(cx)).await;
        if let Some(inner) = self.inner.as_mut() {
            inner.shutdown().await;
        }
    }
}

#[async_trait]
impl Peek for ClientStream {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        match self.inner.as_mut() {
            Some(inner) => inner.try_peek(buf).await,
            None => Ok(false),
        }
    }
}

impl UniqueID for ClientStream {
    fn id(&self) -> UniqueIDType {
        self.io().id()
    }
}

impl Ssl for ClientStream {
    fn get_ssl(&self) -> Option<&TlsRef> {
        self.io().get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        self.io().get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.io().selected_alpn_proto()
    }
}

impl GetTimingDigest for ClientStream {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.io().get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.io().get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.io().get_write_pending_time()
    }
}

impl GetProxyDigest for ClientStream {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.io().get_proxy_digest()
    }
}

impl GetSocketDigest for ClientStream {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.io().get_socket_digest()
    }
}

impl fmt::Debug for ClientStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientStream")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_opening_bytes_tell_a_head_request_across_reads() {
        let body = |reads: &[&[u8]]| {
            let mut o = Opening::default();
            reads.iter().for_each(|r| o.note(r));
            o.body()
        };
        assert_eq!(body(&[]), Body::Empty, "nothing seen");
        assert_eq!(body(&[b"HE"]), Body::Empty, "could still be HEAD");
        assert_eq!(body(&[b"HE", b"AD / HTTP/1.1"]), Body::HeadOnly);
        assert_eq!(body(&[b"\r\nHEAD\t/ HTTP/1.1"]), Body::HeadOnly);
        assert_eq!(body(&[b"GET / HTTP/1.1"]), Body::Whole);
        assert_eq!(body(&[b"H", b"EX"]), Body::Whole);
        assert_eq!(body(&[b"HEADER / HTTP/1.1"]), Body::Whole);
    }

    #[test]
    fn a_status_line_is_recognised_only_at_the_start() {
        assert_eq!(status_line(b"HTTP/1.1 400 Bad Request\r\n"), Some(400));
        assert_eq!(status_line(b"HTTP/1.0 405 Method"), Some(405));
        assert_eq!(status_line(b"0\r\n\r\n"), None);
        assert_eq!(status_line(b"HTTP/1.1 4"), None);
        assert_eq!(status_line(b"data: HTTP/1.1 400"), None);
    }
}
