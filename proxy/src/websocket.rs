//! The WebSocket bridge: `GET /ws`, upgraded once the caller is admitted, then many messages
//! per connection. Each `{"action":"message"}` goes the HTTP requests' way through the
//! [`Pipeline`] (rate, then prepare: plugins and translation; open: stream cap, quota,
//! upstream; conclude) and its answer streams back as `{"content"}` frames and a last
//! `{"done":true}` (the native stream's translation, [`NativeRelay`], shared with SSE); errors
//! come as `{"error"}` frames.
//!
//! Frames are read and written by `tungstenite`'s codec over the upgraded session's bytes
//! ([`Wire`]): reads are cancel-safe (only the session's read is awaited in a `select!`), and
//! every write happens outside one, so a frame is never cut.
//!
//! The socket ends with a close code: 1000 when the client closes, 1001 when the edge drains
//! for an upgrade or the agent is terminated, 1008 when the key is revoked or expires, 1013 when
//! the agent is paused, 1009 for a message over `limits.max_body_bytes`, 1002/1007 for a broken
//! frame or text.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::time::{Duration, Instant as StdInstant};

use bytes::{Bytes, BytesMut};
use http::Version;
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::Session;
use tokio::time::Instant;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, Role, WebSocket, WebSocketConfig};
use tungstenite::Message;

use crate::error::EdgeError;
use crate::forward;
use crate::pipeline::accounting::Outcome;
use crate::pipeline::open::Opened;
use crate::pipeline::prepare::Preparation;
use crate::pipeline::relay::native::NativeRelay;
use crate::pipeline::relay::{check_status, OpenGauge};
use crate::pipeline::{self, ClientConnection, Downstream, Pipeline, RequestCtx};
use crate::plugins::Verdict;
use crate::policy::{self, Admission, AdmissionWatch};
use crate::routing::Route;
use crate::ws::{self, ClientMessage};

/// Messages a client may send ahead while an answer streams; more is refused, one by one.
const MAX_QUEUED: usize = 16;

/// How long the edge waits for the client's reply to its close frame.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// Serves `GET /ws` for an admitted caller: checks the handshake, switches protocols, then
/// answers messages until either side closes. Errors before the switch are the usual JSON.
pub async fn serve(
    p: &Pipeline,
    session: &mut Session,
    ctx: &mut RequestCtx,
    admission: Admission,
) -> Result<(), EdgeError> {
    let (accept, subprotocol) = handshake(session.req_header())?;
    let mut h = ResponseHeader::build_no_case(101, Some(6)).expect("101 is a status");
    h.insert_header("upgrade", "websocket")
        .expect("static value");
    h.insert_header("connection", "Upgrade")
        .expect("static value");
    h.insert_header("sec-websocket-accept", accept)
        .expect("base64 is a header value");
    if subprotocol {
        h.insert_header("sec-websocket-protocol", ws::SUBPROTOCOL)
            .expect("static value");
    }
    pipeline::respond::decorate(&mut h, ctx);
    ctx.responded_with(101);
    session
        .write_response_header(Box::new(h), true)
        .await
        .map_err(|_| EdgeError::ClientClosed)?;
    // The bridge keeps its own time: pings while idle, the runtime's deadlines while answering.
    session.set_read_timeout(None);

    let max = p.cfg().limits.max_body_bytes;
    let config = WebSocketConfig::default()
        .max_message_size(Some(max))
        .max_frame_size(Some(max));
    let mut conn = Connection {
        socket: WebSocket::from_raw_socket(Wire::default(), Role::Server, Some(config)),
        queue: VecDeque::new(),
        head: session.req_header().clone(),
        client: ClientConnection::of(session),
        watch: AdmissionWatch::new(p.plane.registry.clone(), admission.clone()),
        admission,
        trace: ctx.record.trace,
        heard: Instant::now(),
        closed: false,
    };
    let _open = OpenGauge::new(&p.plane.metrics.open_websockets);
    let end = conn.run(p, session).await;
    conn.close(session, end).await;
    Ok(())
}

/// Checks the upgrade request (RFC 6455 §4.2.1): the `Sec-WebSocket-Accept` value to answer
/// with, and whether the client offered the `moltghost` subprotocol.
fn handshake(head: &RequestHeader) -> Result<(String, bool), EdgeError> {
    let bad = |m: &'static str| Err(EdgeError::InvalidRequest(m.into()));
    let has_token = |name: &str, token: &str| {
        head.headers.get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    if head.version != Version::HTTP_11 {
        return bad(
            "GET /ws is a WebSocket over HTTP/1.1; this request came over another HTTP version",
        );
    }
    if !has_token("upgrade", "websocket") || !has_token("connection", "upgrade") {
        return bad("GET /ws is a WebSocket: send `Connection: Upgrade` and `Upgrade: websocket`");
    }
    if head
        .headers
        .get("sec-websocket-version")
        .is_none_or(|v| v.as_bytes() != b"13")
    {
        return bad("`Sec-WebSocket-Version: 13` is required");
    }
    let Some(key) = head
        .headers
        .get("sec-websocket-key")
        .filter(|k| k.len() == 24)
    else {
        return bad("`Sec-WebSocket-Key` is missing or malformed");
    };
    let offer = ws::offer(
        head.headers
            .get_all("sec-websocket-protocol")
            .iter()
            .map(|v| v.as_bytes()),
    );
    if offer.key.is_some() && !offer.moltghost {
        // The edge must answer with an offered subprotocol, and never echoes a key.
        return bad("offer the `moltghost` subprotocol beside `bearer.<key>`");
    }
    Ok((
        tungstenite::handshake::derive_accept_key(key.as_bytes()),
        offer.moltghost,
    ))
}

/// The socket's bytes in both directions for `tungstenite`'s codec, which works over std I/O:
/// what the client sent waits in `input` (empty: `WouldBlock`), what the edge sends collects in
/// `output` until it is written to the session.
#[derive(Default)]
struct Wire {
    input: BytesMut,
    output: Vec<u8>,
}

impl Read for Wire {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.input.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = buf.len().min(self.input.len());
        buf[..n].copy_from_slice(&self.input.split_to(n));
        Ok(n)
    }
}

impl Write for Wire {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Why a socket ends, and the close frame that says so.
#[derive(Debug)]
enum End {
    /// The client closed (its close frame is answered) or went away.
    Client,
    /// The edge is draining for an upgrade or a stop.
    Draining,
    /// The client stopped answering pings.
    Silent,
    /// An error that ends the socket, sent as an error frame first, then the close code.
    Error(EdgeError, u16),
    /// An error already sent as a frame that ends the socket: its code, and the close code.
    Refused(&'static str, u16),
}

/// One open WebSocket.
struct Connection {
    socket: WebSocket<Wire>,
    /// Messages that arrived while an answer streamed, answered in order.
    queue: VecDeque<Bytes>,
    /// The upgrade request's head (what the plugins and the runtime see of each message).
    head: RequestHeader,
    client: ClientConnection,
    admission: Admission,
    watch: AdmissionWatch,
    /// The upgrade request's span: each message's span is its child, in the same trace.
    trace: moltghost_protocol::trace::TraceParent,
    /// When the client last sent anything.
    heard: Instant,
    /// The close handshake is done (or the client is gone).
    closed: bool,
}

impl Connection {
    /// Answers messages until the socket ends.
    async fn run(&mut self, p: &Pipeline, session: &mut Session) -> End {
        let ping_every = p.cfg().limits.websocket_ping_interval;
        let mut next_ping = Instant::now() + ping_every;
        let mut draining = p.plane.draining.subscribe();
        loop {
            while let Some(text) = self.queue.pop_front() {
                if let Some(end) = self.answer(p, session, text).await {
                    return end;
                }
            }
            if *draining.borrow_and_update() {
                return End::Draining;
            }
            let incoming = tokio::select! {
                biased;
                e = self.watch.revoked() => {
                    let code = ws::close_code(&e);
                    return End::Error(e, code);
                }
                _ = draining.changed() => None,
                _ = tokio::time::sleep_until(next_ping) => None,
                r = read_more(session, &mut self.socket) => Some(r),
            };
            match incoming {
                Some(Ok(())) => self.heard = Instant::now(),
                Some(Err(end)) => return end,
                None => {}
            }
            match self.take_messages() {
                Ok(()) => {}
                Err(end) => return end,
            }
            let now = Instant::now();
            if now >= next_ping {
                if now.duration_since(self.heard) > 2 * ping_every {
                    return End::Silent;
                }
                let _ = self.socket.write(Message::Ping(Bytes::new()));
                next_ping = now + ping_every;
            }
            // Pongs, pings and error frames go out now, not with the next wake-up.
            if let Err(end) = self.flush(session).await {
                return end;
            }
        }
    }

    /// Decodes every whole message in the buffer: texts go to the queue, control frames are
    /// answered by the codec.
    fn take_messages(&mut self) -> Result<(), End> {
        loop {
            match self.next_message()? {
                Some(t) if self.queue.len() < MAX_QUEUED => self.queue.push_back(t),
                Some(_) => self.queue_error(&EdgeError::InvalidRequest(
                    format!("too many messages waiting: at most {MAX_QUEUED} may be queued").into(),
                )),
                None => return Ok(()),
            }
        }
    }

    /// Queues an error frame (written with the next flush).
    fn queue_error(&mut self, e: &EdgeError) {
        let _ = self.socket.write(Message::text(e.to_json().to_string()));
    }

    /// The next message decoded from what has arrived, if whole.
    fn next_message(&mut self) -> Result<Option<Bytes>, End> {
        loop {
            return match self.socket.read() {
                Ok(Message::Text(t)) => Ok(Some(Bytes::from(t))),
                Ok(Message::Binary(_)) => {
                    self.queue_error(&EdgeError::InvalidRequest(
                        "messages are JSON text frames; binary frames are not accepted".into(),
                    ));
                    continue;
                }
                Ok(Message::Close(_)) => {
                    self.closed = true;
                    Err(End::Client)
                }
                Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => continue,
                Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
                Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                    self.closed = true;
                    Err(End::Client)
                }
                Err(tungstenite::Error::Capacity(e)) => Err(End::Error(
                    EdgeError::InvalidRequest(format!("message too large: {e}").into()),
                    1009,
                )),
                Err(tungstenite::Error::Utf8(_)) => Err(End::Error(
                    EdgeError::InvalidRequest("a text frame is not UTF-8".into()),
                    1007,
                )),
                Err(e) => Err(End::Error(
                    EdgeError::InvalidRequest(format!("broken WebSocket frame: {e}").into()),
                    1002,
                )),
            };
        }
    }

    /// Writes what the codec has ready (answers, pongs, pings) to the client.
    async fn flush(&mut self, session: &mut Session) -> Result<(), End> {
        let _ = self.socket.flush();
        let out = std::mem::take(&mut self.socket.get_mut().output);
        if out.is_empty() {
            return Ok(());
        }
        session
            .write_response_body(Some(Bytes::from(out)), false)
            .await
            .map_err(|_| {
                self.closed = true;
                End::Client
            })
    }

    /// Sends one frame now.
    async fn send(&mut self, session: &mut Session, frame: String) -> Result<(), End> {
        if self.socket.write(Message::text(frame)).is_err() {
            self.closed = true;
            return Err(End::Client);
        }
        self.flush(session).await
    }

    /// Answers one message: its own access-log line and metrics, like an HTTP request. `Some`
    /// when the socket must end.
    async fn answer(&mut self, p: &Pipeline, session: &mut Session, text: Bytes) -> Option<End> {
        let mut ctx = RequestCtx::new();
        ctx.record.request_id = p.ids.for_request(None);
        ctx.record.trace.trace_id = self.trace.trace_id;
        ctx.record.trace.flags = self.trace.flags;
        ctx.record.trace_parent = Some(self.trace.span_id);
        ctx.record.route = Some(Route::Ws);
        ctx.admitted(&self.admission);
        let mut sent = 0u64;
        let result = self
            .serve_message(p, session, &mut ctx, text, &mut sent)
            .await;
        let end = match result {
            Ok(()) => None,
            Err(Failure::Socket(end)) => Some(end),
            Err(Failure::Plugin { status, frame }) => {
                ctx.record.status = status;
                ctx.record.error = Some("policy_denied");
                sent += frame.len() as u64;
                self.send(session, frame).await.err()
            }
            Err(Failure::Edge(e)) => {
                ctx.record.error = Some(e.code());
                if ctx.record.status == 0 {
                    ctx.record.status = e.status();
                }
                let frame = e.to_json().to_string();
                sent += frame.len() as u64;
                match self.send(session, frame).await {
                    Err(end) => Some(end),
                    // A key or agent that no longer admits ends the socket, not just the answer.
                    Ok(()) => self.still_admitted(p, &e),
                }
            }
        };
        p.log(&mut ctx, "WS", sent);
        end
    }

    /// After an error frame for `sent`: the socket's end when the key or agent no longer
    /// admits it.
    fn still_admitted(&self, p: &Pipeline, sent: &EdgeError) -> Option<End> {
        let now = policy::still_admitted(&p.plane.registry.load(), &self.admission).err()?;
        let code = ws::close_code(&now);
        Some(if now.code() == sent.code() {
            End::Refused(now.code(), code) // its frame just went
        } else {
            End::Error(now, code)
        })
    }

    /// A message's way through the pipeline and its answer as frames.
    async fn serve_message(
        &mut self,
        p: &Pipeline,
        session: &mut Session,
        ctx: &mut RequestCtx,
        text: Bytes,
        sent: &mut u64,
    ) -> Result<(), Failure> {
        let now = Instant::now();
        policy::still_admitted(&p.plane.registry.load(), &self.admission)?;
        p.rate(&self.admission, ctx)?;
        let mut down = Downstream::WebSocket {
            head: Box::new(self.head.clone()),
            conn: self.client.clone(),
        };
        let prepared = match p
            .prepare(&mut down, ctx, &self.admission, Some(Route::Ws), text, now)
            .await?
        {
            Preparation::Forward(prepared) => *prepared,
            Preparation::Answered(verdict) => return Err(plugin_failure(verdict)),
        };
        let mut opened = p.open(&mut down, ctx, &self.admission, prepared).await?;
        let result = self.relay(session, ctx, &mut opened, sent).await;
        let outcome = match &result {
            Ok(Answered::Whole) => Outcome::Completed,
            Ok(Answered::Cancelled) => Outcome::Cancelled,
            Err(Failure::Edge(e)) => Outcome::failed(e),
            Err(Failure::Socket(_) | Failure::Plugin { .. }) => {
                Outcome::failed(&EdgeError::ClientClosed)
            }
        };
        p.conclude(ctx, &self.admission.agent, opened, outcome)
            .await;
        result.map(|_| ())
    }

    /// The runtime's stream as frames, while the client's frames are read between them
    /// (pings answered, `cancel` obeyed, messages queued).
    async fn relay(
        &mut self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        x: &mut Opened,
        sent: &mut u64,
    ) -> Result<Answered, Failure> {
        check_status(&mut x.inbound, forward::unwatched(), &mut x.guard, true).await?;
        let mut h = ResponseHeader::build_no_case(200, Some(2)).expect("200 is a status");
        h.insert_header("content-type", "application/json")
            .expect("static value");
        ctx.filter_response_header(&mut h).await?;
        ctx.record.status = 200;
        let mut relay = NativeRelay::new();
        let mut accounting = x.accounting.as_mut();
        loop {
            let events = tokio::select! {
                r = relay.next(forward::unwatched(), &mut x.inbound, &mut x.guard, accounting.as_deref_mut()) => r?,
                r = read_more(session, &mut self.socket) => {
                    r.map_err(Failure::Socket)?;
                    self.heard = Instant::now();
                    if self.take_cancel()? {
                        ctx.record.error = Some("cancelled");
                        let last = relay.cancelled(&ctx.record.request_id, accounting);
                        self.frame(session, ctx, last, true, sent).await?;
                        return Ok(Answered::Cancelled);
                    }
                    self.flush(session).await?;
                    continue;
                }
            };
            let Some(events) = events else { break };
            for event in events {
                ctx.record.first_token.get_or_insert_with(StdInstant::now);
                self.frame(session, ctx, event, false, sent).await?;
            }
        }
        let last = relay.end(&ctx.record.request_id, accounting)?;
        self.frame(session, ctx, last, true, sent).await?;
        Ok(Answered::Whole)
    }

    /// Sends one answer frame, through the response plugins.
    async fn frame(
        &mut self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        event: serde_json::Value,
        end: bool,
        sent: &mut u64,
    ) -> Result<(), Failure> {
        let text = Bytes::from(event.to_string());
        let text = ctx.filter_response_body(text, end).await?;
        if text.is_empty() {
            return Ok(());
        }
        let Ok(text) = String::from_utf8(text.into()) else {
            return Err(
                EdgeError::PluginFailed("a plugin made a frame that is not UTF-8".into()).into(),
            );
        };
        *sent += text.len() as u64;
        self.send(session, text).await.map_err(Failure::Socket)
    }

    /// Takes the client's frames that arrived mid-answer; true when one was `cancel`.
    fn take_cancel(&mut self) -> Result<bool, Failure> {
        let before = self.queue.len();
        self.take_messages().map_err(Failure::Socket)?;
        let mut cancel = false;
        let fresh: Vec<Bytes> = self.queue.drain(before..).collect();
        for text in fresh {
            match ClientMessage::parse(&text) {
                Ok(ClientMessage::Cancel) => cancel = true,
                _ => self.queue.push_back(text),
            }
        }
        Ok(cancel)
    }

    /// Ends the socket: the error frame and close frame the end calls for, the client's close
    /// reply awaited briefly, then the connection closed.
    async fn close(&mut self, session: &mut Session, end: End) {
        let (code, reason): (u16, String) = match &end {
            End::Client => (1000, String::new()),
            End::Draining => (1001, "the edge is restarting: reconnect".into()),
            End::Silent => (1001, "no answer to pings".into()),
            End::Error(e, code) => {
                self.queue_error(e);
                (*code, e.code().to_owned())
            }
            End::Refused(error, code) => (*code, (*error).to_owned()),
        };
        if !self.closed || matches!(end, End::Client) {
            let _ = self.socket.close(Some(CloseFrame {
                code: CloseCode::from(code),
                reason: reason.into(),
            }));
            let _ = self.flush(session).await;
        }
        if !self.closed {
            // The close handshake: wait for the client's reply (RFC 6455 §7.1.1).
            let _ = tokio::time::timeout(CLOSE_WAIT, async {
                loop {
                    match self.next_message() {
                        Ok(Some(_)) => {} // too late: the edge said it closes
                        Ok(None) => {
                            if read_more(session, &mut self.socket).await.is_err() {
                                break;
                            }
                        }
                        Err(_) => break,
                    }
                }
            })
            .await;
        }
        let _ = session.write_response_body(None, true).await;
    }
}

/// Reads the client's next bytes into the codec's buffer. Cancel-safe: only the session's read
/// is awaited.
async fn read_more(session: &mut Session, socket: &mut WebSocket<Wire>) -> Result<(), End> {
    match session.read_request_body().await {
        Ok(Some(bytes)) => {
            socket.get_mut().input.extend_from_slice(&bytes);
            Ok(())
        }
        Ok(None) | Err(_) => Err(End::Client),
    }
}

/// How a message's answer ended well: whole, or cancelled by the client.
enum Answered {
    Whole,
    Cancelled,
}

/// What a plugin's decision before the runtime means for a WebSocket message: a plugin's own
/// JSON error goes out as it wrote it (its code, its message); anything else is the table's.
fn plugin_failure(verdict: Verdict) -> Failure {
    if let Verdict::Respond(local) = &verdict {
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&local.body) {
            if v.get("error").is_some() {
                return Failure::Plugin {
                    status: local.status,
                    frame: v.to_string(),
                };
            }
        }
    }
    Failure::Edge(verdict.into_error())
}

/// Why a message's answer stopped: the edge's error (sent as an error frame), a plugin's own
/// error answer (sent as it wrote it), or the socket's end.
enum Failure {
    Edge(EdgeError),
    Plugin { status: u16, frame: String },
    Socket(End),
}

impl From<EdgeError> for Failure {
    fn from(e: EdgeError) -> Self {
        Self::Edge(e)
    }
}

impl From<End> for Failure {
    fn from(e: End) -> Self {
        Self::Socket(e)
    }
}
