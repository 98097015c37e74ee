//! The WebSocket bridge: `GET /ws`, upgraded once the caller is admitted, then many messages
//! per connection. Each `{"action":"message"}` goes the HTTP requests' way
//! ([`Edge::exchange`]: rate, plugins, translation, stream cap, quota, upstream) and its answer
//! streams back as `{"content"}` frames and a last `{"done":true}` (the native stream's events,
//! [`Edge::native_events`]); errors come as `{"error"}` frames.
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
use pingora_proxy::{ProxyHttp, Session};
use tokio::time::Instant;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, Role, WebSocket, WebSocketConfig};
use tungstenite::Message;

use crate::chat::NativeStream;
use crate::edge::{
    self, plugin_body, plugin_response_headers, Downstream, Edge, Exchange, OpenStream, Opened,
    RequestCtx,
};
use crate::error::EdgeError;
use crate::forward;
use crate::policy::{self, Admission, AdmissionWatch};
use crate::routing::Route;
use crate::sse::SseScanner;
use crate::ws::{self, ClientMessage};

/// Messages a client may send ahead while an answer streams; more is refused, one by one.
const MAX_QUEUED: usize = 16;

/// How long the edge waits for the client's reply to its close frame.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// Serves `GET /ws` for an admitted caller: checks the handshake, switches protocols, then
/// answers messages until either side closes. Errors before the switch are the usual JSON.
pub async fn serve(
    edge: &Edge,
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
    crate::response::decorate(&mut h, ctx);
    ctx.status = 101;
    ctx.responded = true;
    session
        .write_response_header(Box::new(h), true)
        .await
        .map_err(|_| EdgeError::ClientClosed)?;
    // The bridge keeps its own time: pings while idle, the runtime's deadlines while answering.
    session.set_read_timeout(None);

    let max = edge.cfg().max_body_bytes;
    let config = WebSocketConfig::default()
        .max_message_size(Some(max))
        .max_frame_size(Some(max));
    let mut conn = Connection {
        socket: WebSocket::from_raw_socket(Wire::default(), Role::Server, Some(config)),
        queue: VecDeque::new(),
        head: session.req_header().clone(),
        addr: session.client_addr().and_then(|a| a.as_inet()).copied(),
        tls: edge::is_tls(session),
        watch: AdmissionWatch::new(edge.control.registry.clone(), admission.clone()),
        admission,
        heard: Instant::now(),
        closed: false,
    };
    let _open = OpenStream::new(&edge.control.metrics.open_websockets);
    let end = conn.run(edge, session).await;
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
    addr: Option<std::net::SocketAddr>,
    tls: bool,
    admission: Admission,
    watch: AdmissionWatch,
    /// When the client last sent anything.
    heard: Instant,
    /// The close handshake is done (or the client is gone).
    closed: bool,
}

impl Connection {
    /// Answers messages until the socket ends.
    async fn run(&mut self, edge: &Edge, session: &mut Session) -> End {
        let ping_every = edge.cfg().websocket_ping_interval;
        let mut next_ping = Instant::now() + ping_every;
        let mut draining = edge.control.draining.subscribe();
        loop {
            while let Some(text) = self.queue.pop_front() {
                if let Some(end) = self.answer(edge, session, text).await {
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
    async fn answer(&mut self, edge: &Edge, session: &mut Session, text: Bytes) -> Option<End> {
        let mut ctx = edge.new_ctx();
        ctx.request_id = edge.ids.for_request(None);
        ctx.route = Some(Route::Ws);
        ctx.agent = Some(self.admission.agent.endpoint_id.clone());
        ctx.account = Some(self.admission.account.id.clone());
        ctx.key_id = Some(self.admission.key.id.clone());
        let mut sent = 0u64;
        let result = self
            .exchange(edge, session, &mut ctx, text, &mut sent)
            .await;
        let end = match result {
            Ok(()) => None,
            Err(Failure::Socket(end)) => Some(end),
            Err(Failure::Plugin { status, frame }) => {
                ctx.status = status;
                ctx.error = Some("policy_denied");
                sent += frame.len() as u64;
                self.send(session, frame).await.err()
            }
            Err(Failure::Edge(e)) => {
                ctx.error = Some(e.code());
                if ctx.status == 0 {
                    ctx.status = e.status();
                }
                let frame = e.to_json().to_string();
                sent += frame.len() as u64;
                match self.send(session, frame).await {
                    Err(end) => Some(end),
                    // A key or agent that no longer admits ends the socket, not just the answer.
                    Ok(()) => {
                        policy::still_admitted(&edge.control.registry.load(), &self.admission)
                            .err()
                            .map(|now| {
                                let code = ws::close_code(&now);
                                if now.code() == e.code() {
                                    End::Refused(now.code(), code) // its frame just went
                                } else {
                                    End::Error(now, code)
                                }
                            })
                    }
                }
            }
        };
        if let Some(run) = ctx.plugins.as_mut() {
            run.finish();
        }
        crate::logging::access(&ctx, "WS", sent);
        edge.control.metrics.record(&ctx);
        end
    }

    /// A message's way through the edge and its answer as frames.
    async fn exchange(
        &mut self,
        edge: &Edge,
        session: &mut Session,
        ctx: &mut RequestCtx,
        text: Bytes,
        sent: &mut u64,
    ) -> Result<(), Failure> {
        let now = Instant::now();
        policy::still_admitted(&edge.control.registry.load(), &self.admission)?;
        edge.rate(&self.admission, ctx)?;
        let mut down = Downstream::WebSocket {
            head: Box::new(self.head.clone()),
            addr: self.addr,
            tls: self.tls,
        };
        let exchange = match edge
            .exchange(&mut down, ctx, &self.admission, Route::Ws, text, now)
            .await?
        {
            Opened::Runtime(x) => *x,
            Opened::Plugin(crate::plugins::Verdict::Failed(m)) => {
                return Err(EdgeError::PluginFailed(m.into()).into())
            }
            Opened::Plugin(crate::plugins::Verdict::Respond(local)) => {
                // A plugin's own JSON error goes out as it wrote it (its code, its message).
                if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&local.body) {
                    if v.get("error").is_some() {
                        return Err(Failure::Plugin {
                            status: local.status,
                            frame: v.to_string(),
                        });
                    }
                }
                return Err(EdgeError::Denied {
                    status: local.status,
                    message: if local.details.is_empty() {
                        "Denied by policy".into()
                    } else {
                        local.details
                    },
                }
                .into());
            }
        };
        let Exchange {
            mut inbound,
            mut guard,
            mut metering,
            ..
        } = exchange;
        let result = self
            .relay(
                edge,
                session,
                ctx,
                &mut inbound,
                &mut guard,
                metering.as_mut(),
                sent,
            )
            .await;
        let outcome = match &result {
            Ok(()) => Ok(()),
            Err(Failure::Edge(e)) => Err(e.clone()),
            Err(Failure::Socket(_) | Failure::Plugin { .. }) => Err(EdgeError::ClientClosed),
        };
        edge.conclude(ctx, &self.admission.agent, inbound, metering, &outcome)
            .await;
        result
    }

    /// The runtime's stream as frames, while the client's frames are read between them
    /// (pings answered, `cancel` obeyed, messages queued).
    #[allow(clippy::too_many_arguments)]
    async fn relay(
        &mut self,
        edge: &Edge,
        session: &mut Session,
        ctx: &mut RequestCtx,
        inbound: &mut forward::Inbound,
        guard: &mut forward::Guard,
        mut metering: Option<&mut crate::metering::Metering>,
        sent: &mut u64,
    ) -> Result<(), Failure> {
        let status = inbound.header.status.as_u16();
        if status >= 500 {
            return Err(EdgeError::UpstreamUnavailable(
                format!("the agent runtime failed with status {status}").into(),
            )
            .into());
        }
        if status >= 300 {
            let body = inbound
                .read_to_end(forward::unwatched(), guard, 64 * 1024)
                .await?;
            return Err(edge::runtime_refusal(status, &body).into());
        }
        let mut h = ResponseHeader::build_no_case(200, Some(2)).expect("200 is a status");
        h.insert_header("content-type", "application/json")
            .expect("static value");
        plugin_response_headers(ctx, &mut h)?;
        ctx.status = 200;
        let _open = OpenStream::new(&edge.control.metrics.open_streams);
        let mut scanner = SseScanner::new();
        let mut native = NativeStream::new();
        let mut saw_done = false;
        loop {
            let events = tokio::select! {
                r = edge::next_events(forward::unwatched(), inbound, guard, &mut scanner) => r?,
                r = read_more(session, &mut self.socket) => {
                    r.map_err(Failure::Socket)?;
                    self.heard = Instant::now();
                    if self.take_cancel()? {
                        return self.finish_cancelled(session, ctx, &native, sent).await;
                    }
                    self.flush(session).await?;
                    continue;
                }
            };
            let Some((_, events)) = events else { break };
            let out = edge.native_events(
                ctx,
                &mut native,
                &events,
                metering.as_deref_mut(),
                &mut saw_done,
            )?;
            for event in out {
                ctx.first_token.get_or_insert_with(StdInstant::now);
                self.frame(session, ctx, event, false, sent).await?;
            }
        }
        let last = edge.native_end(ctx, &native, saw_done, metering)?;
        self.frame(session, ctx, last, true, sent).await
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
        let text = plugin_body(ctx, text, end)?;
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

    /// Ends a cancelled answer: the `done` frame says `cancelled` (what was delivered is
    /// accounted by [`Edge::conclude`]).
    async fn finish_cancelled(
        &mut self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        native: &NativeStream,
        sent: &mut u64,
    ) -> Result<(), Failure> {
        let mut last = native.finish(&ctx.request_id);
        last["finish_reason"] = serde_json::json!("cancelled");
        ctx.error = Some("cancelled");
        self.frame(session, ctx, last, true, sent).await
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
