//! The edge as a Pingora [`ProxyHttp`]: one method per phase of a request, each calling into the
//! module that owns that concern.
//!
//! | phase | where |
//! |---|---|
//! | request id, timers | [`Edge::early_request_filter`] |
//! | routing and authentication (host → agent, key → caller) | [`crate::routing`], [`crate::policy`] |
//! | request rate, concurrent streams | [`crate::limits`] |
//! | lifecycle | [`crate::lifecycle`] |
//! | body | [`crate::body`] |
//! | translation to the runtime's request | [`Edge::outbound`], [`crate::chat`] |
//! | token quota (reserve) | [`crate::quota`] |
//! | upstream exchange | [`crate::forward`] |
//! | answer (pass-through, native, stream errors) and metering | [`Edge::relay`], [`crate::metering`] |
//! | access log | [`Edge::logging`] |

use std::sync::Arc;
use std::time::{Duration, Instant as StdInstant};

use async_trait::async_trait;
use bytes::Bytes;
use http::Method;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::{Error, ErrorType};
use pingora_proxy::{FailToProxy, ProxyHttp, Session};
use tokio::time::Instant;

use crate::chat::{self, NativeChatRequest, NativeStream};
use crate::config::{Config, PlainHttp};
use crate::control::Control;
use crate::error::EdgeError;
use crate::forward::{self, Forwarder, Guard, Inbound, Outbound};
use crate::ids::RequestIds;
use crate::limits::RateInfo;
use crate::metering::{Metering, Payer};
use crate::policy::{self, Admission, AdmissionWatch, RequestView};
use crate::registry::{Agent, AgentState};
use crate::routing::{self, Route};
use crate::sse::{SseEvent, SseScanner};
use crate::usage::{self, EventKind};
use crate::ws::{self, ClientMessage};
use crate::{body, lifecycle, response};

/// The largest non-streamed answer the edge reads whole (native `/v1/chat`, usage of OpenAI
/// answers).
const MAX_READ_ANSWER: usize = 16 * 1024 * 1024;

/// The edge service.
pub struct Edge {
    pub(crate) control: Arc<Control>,
    forwarder: Forwarder,
    pub(crate) ids: RequestIds,
}

/// What one request carries through its phases, and what the access log reports.
#[derive(Debug)]
pub struct RequestCtx {
    /// The request's id (the client's, or a fresh one).
    pub request_id: String,
    /// When the request arrived.
    pub started: StdInstant,
    /// Its route, once known.
    pub route: Option<Route>,
    /// Its agent's endpoint id, once known.
    pub agent: Option<String>,
    /// The caller's account id, once admitted.
    pub account: Option<String>,
    /// The caller's key id (never the key), once admitted.
    pub key_id: Option<String>,
    /// The status sent (or the error's, for a refusal).
    pub status: u16,
    /// The error code, if the request was refused or failed.
    pub error: Option<&'static str>,
    /// Whether a response header was written.
    pub responded: bool,
    /// When the edge started sending the request to the runtime.
    pub upstream_sent: Option<StdInstant>,
    /// When the first response byte from the runtime arrived.
    pub first_byte: Option<StdInstant>,
    /// When the first streamed bytes went to the client.
    pub first_token: Option<StdInstant>,
    /// The request-rate state, once admitted.
    pub rate: Option<RateInfo>,
    /// The account's token quota and what is left, once reserved.
    pub tokens_left: Option<(u64, u64)>,
    /// Tokens accounted for this request.
    pub tokens: Option<u64>,
    /// The request's run through the WASM policy plugins that apply to it.
    pub plugins: Option<crate::plugins::PluginRun>,
}

/// How the runtime's answer is turned into the client's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Relay {
    /// OpenAI routes: status, headers and body as they are.
    Passthrough,
    /// Native chat, whole answer.
    NativeAnswer,
    /// Native chat, streamed (as SSE, or as WebSocket frames by [`crate::websocket`]).
    NativeStream,
}

/// The runtime request a route turns into, and what accounting it needs.
struct Prepared {
    outbound: Outbound,
    relay: Relay,
    deadline: Instant,
    /// Streamed (counts against the concurrent-stream cap).
    stream: bool,
    /// Token-generating: (prompt estimate, completion cap) for the quota reservation.
    cost: Option<(u64, u64)>,
    /// The edge asked for usage the client did not ask for.
    hide_usage: bool,
}

/// The client a request came from, as the shared request path needs it: an HTTP request's
/// session, or a WebSocket message (the upgrade's head; the bridge watches the socket itself).
pub(crate) enum Downstream<'a> {
    /// An HTTP request.
    Http(&'a mut Session),
    /// One message of a WebSocket.
    WebSocket {
        /// The upgrade request's head, a fresh copy per message (plugins may change it).
        head: Box<pingora_http::RequestHeader>,
        /// The client's address.
        addr: Option<std::net::SocketAddr>,
        /// Whether the socket came over TLS.
        tls: bool,
    },
}

impl Downstream<'_> {
    /// The request head.
    fn head(&self) -> &pingora_http::RequestHeader {
        match self {
            Self::Http(s) => s.req_header(),
            Self::WebSocket { head, .. } => head,
        }
    }

    /// The request head, to change.
    fn head_mut(&mut self) -> &mut pingora_http::RequestHeader {
        match self {
            Self::Http(s) => s.req_header_mut(),
            Self::WebSocket { head, .. } => head,
        }
    }

    /// The client's address.
    fn client_addr(&self) -> Option<std::net::SocketAddr> {
        match self {
            Self::Http(s) => s.client_addr().and_then(|a| a.as_inet()).copied(),
            Self::WebSocket { addr, .. } => *addr,
        }
    }

    /// Whether the request came over TLS.
    fn is_tls(&self) -> bool {
        match self {
            Self::Http(s) => is_tls(s),
            Self::WebSocket { tls, .. } => *tls,
        }
    }

    /// Resolves when the client hangs up while the edge waits on the runtime.
    async fn hangup(&mut self) {
        match self {
            Self::Http(s) => forward::hangup(s).await,
            Self::WebSocket { .. } => forward::unwatched().await,
        }
    }
}

/// Whether `session` came over TLS.
pub(crate) fn is_tls(session: &Session) -> bool {
    session.digest().is_some_and(|d| d.ssl_digest.is_some())
}

/// What the shared request path led to.
pub(crate) enum Opened {
    /// The runtime answered: its response header is in.
    Runtime(Box<Exchange>),
    /// A plugin decided instead (its own answer, or fail-closed).
    Plugin(crate::plugins::Verdict),
}

/// A request sent on to the runtime: what relaying its answer needs.
pub(crate) struct Exchange {
    /// The runtime's response.
    pub inbound: Inbound,
    /// How its answer is turned into the client's.
    pub relay: Relay,
    /// Its deadline and revocation watch.
    pub guard: Guard,
    /// Its token accounting, when limits are on and the route costs tokens.
    pub metering: Option<Metering>,
    /// Its place under the concurrent-stream cap, held until the exchange ends.
    pub _stream_slot: Option<pingora_limits::inflight::Guard>,
}

fn invalid(msg: String) -> EdgeError {
    EdgeError::InvalidRequest(msg.into())
}

impl Edge {
    /// An edge configured by `cfg`, admitting requests through `control`'s snapshot, limiters
    /// and quota book.
    pub fn new(control: Arc<Control>) -> Self {
        Self {
            control,
            forwarder: Forwarder::new(1024),
            ids: RequestIds::default(),
        }
    }

    /// The config in force (a reload replaces it between requests).
    pub(crate) fn cfg(&self) -> arc_swap::Guard<Arc<Config>> {
        self.control.config.load()
    }

    /// Admission: the caller's key and the agent it reaches (see [`policy::admit`]).
    fn admit(&self, session: &Session, route: Route) -> Result<Admission, EdgeError> {
        let req = session.req_header();
        let offer = match route {
            Route::Ws => ws::offer(
                req.headers
                    .get_all("sec-websocket-protocol")
                    .iter()
                    .map(|v| v.as_bytes()),
            ),
            _ => ws::Offer::default(),
        };
        let host = req
            .headers
            .get("host")
            .and_then(|h| h.to_str().ok())
            .or_else(|| req.uri.host())
            .unwrap_or("");
        let view = RequestView {
            host,
            authorization: req.headers.get("authorization").map(|v| v.as_bytes()),
            subprotocol_key: offer.key,
            now: crate::store::now(),
        };
        policy::admit(
            &self.control.registry.load(),
            &self.control.hasher,
            &self.cfg().agents_domain,
            &view,
        )
    }

    /// Translation: the runtime request for a route, its deadline and its cost.
    fn outbound(
        &self,
        route: Route,
        agent: &Agent,
        query: &str,
        body: Bytes,
        now: Instant,
    ) -> Result<Prepared, EdgeError> {
        let default_deadline = now + self.cfg().request_timeout;
        let default_cap = self.cfg().default_max_tokens;
        let prepared =
            |method, path, body, content_type, relay, stream, cost, hide_usage| Prepared {
                outbound: Outbound {
                    method,
                    path,
                    authority: agent.upstream.authority().to_owned(),
                    body,
                    content_type,
                    identity: None,
                },
                relay,
                deadline: default_deadline,
                stream,
                cost,
                hide_usage,
            };
        let native = |mut req: NativeChatRequest, relay: Relay| {
            let mut deadline = default_deadline;
            if let Some(t) = req.timeout_seconds {
                let t = Duration::from_secs_f64(t);
                if t > self.cfg().max_timeout {
                    return Err(invalid(format!(
                        "`timeout_seconds` may be at most {}",
                        self.cfg().max_timeout.as_secs()
                    )));
                }
                deadline = now + t;
            }
            let stream = relay != Relay::NativeAnswer;
            req.stream = stream;
            let cost = (req.prompt_estimate(), req.max_tokens.unwrap_or(default_cap));
            let mut p = prepared(
                Method::POST,
                agent.upstream.path(Route::ChatCompletions.path()),
                Bytes::from(req.to_openai()),
                Some("application/json"),
                relay,
                stream,
                Some(cost),
                false,
            );
            p.deadline = deadline;
            Ok(p)
        };
        Ok(match route {
            Route::Chat => {
                let req = NativeChatRequest::parse(&body)?;
                let relay = if req.stream {
                    Relay::NativeStream
                } else {
                    Relay::NativeAnswer
                };
                native(req, relay)?
            }
            // A WebSocket message: always streamed, as frames.
            Route::Ws => match ClientMessage::parse(&body)? {
                ClientMessage::Message(req) => native(*req, Relay::NativeStream)?,
                ClientMessage::Cancel => {
                    return Err(invalid(
                        "nothing to cancel: no answer is in progress".into(),
                    ))
                }
            },
            Route::ChatCompletions | Route::Completions => {
                let req = usage::inspect_openai(&body).map_err(invalid)?;
                // Ask a stream for its usage so it is counted exactly; hide it from a client that
                // did not ask.
                let hide_usage = req.stream && !req.include_usage;
                let body = if hide_usage {
                    Bytes::from(usage::request_usage(&body).map_err(invalid)?)
                } else {
                    body
                };
                let cost = (req.prompt_estimate(), req.max_tokens.unwrap_or(default_cap));
                prepared(
                    Method::POST,
                    agent.upstream.path(route.path()) + query,
                    body,
                    None,
                    Relay::Passthrough,
                    req.stream,
                    Some(cost),
                    hide_usage,
                )
            }
            Route::Tools => {
                chat::check_json_object(&body)?;
                prepared(
                    Method::POST,
                    agent.upstream.path(route.path()) + query,
                    body,
                    None,
                    Relay::Passthrough,
                    false,
                    None,
                    false,
                )
            }
            Route::Models | Route::Health => prepared(
                Method::GET,
                agent.upstream.path(route.path()) + query,
                Bytes::new(),
                None,
                Relay::Passthrough,
                false,
                None,
                false,
            ),
        })
    }

    /// Transport: on a plain-HTTP listener of an edge that terminates TLS, redirect to HTTPS or
    /// refuse, as configured. `Ok(true)` when the redirect was written.
    async fn transport(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<bool, EdgeError> {
        let Some(tls) = &self.cfg().tls else {
            return Ok(false);
        };
        let is_tls = is_tls(session);
        match tls.plain_http {
            _ if is_tls => Ok(false),
            PlainHttp::Serve => Ok(false),
            PlainHttp::Refuse => Err(EdgeError::Forbidden(
                "plain HTTP is refused here: use https://".into(),
            )),
            PlainHttp::Redirect => {
                let req = session.req_header();
                let host = req
                    .headers
                    .get("host")
                    .and_then(|h| h.to_str().ok())
                    .unwrap_or("");
                let host = host
                    .rsplit_once(':')
                    .filter(|(h, p)| !h.ends_with(']') && p.bytes().all(|b| b.is_ascii_digit()))
                    .map_or(host, |(h, _)| h);
                let port = self.cfg().https_listen.first().map_or(443, |a| a.port());
                let authority = if port == 443 {
                    host.to_owned()
                } else {
                    format!("{host}:{port}")
                };
                let path = req.uri.path_and_query().map_or("/", |p| p.as_str());
                let mut h = response::header(308, "application/json", ctx);
                h.insert_header("location", format!("https://{authority}{path}"))
                    .map_err(|_| EdgeError::InvalidRequest("invalid Host header".into()))?;
                ctx.status = 308;
                ctx.responded = true;
                let body = serde_json::json!({"error": {"message": "use https://", "code": "https_required", "type": "invalid_request_error"}});
                response::write_json(session, h, Bytes::from(body.to_string())).await?;
                Ok(true)
            }
        }
    }

    /// The whole request after the request id: every phase in order.
    async fn serve(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<(), EdgeError> {
        if self.transport(session, ctx).await? {
            return Ok(());
        }
        let now = Instant::now();
        let route = routing::route(
            &session.req_header().method,
            session.req_header().uri.path(),
        )?;
        ctx.route = Some(route);
        let admission = self.admit(session, route)?;
        ctx.agent = Some(admission.agent.endpoint_id.clone());
        ctx.account = Some(admission.account.id.clone());
        ctx.key_id = Some(admission.key.id.clone());
        self.rate(&admission, ctx)?;
        match route {
            Route::Health => return self.health(session, ctx, &admission.agent).await,
            Route::Ws => {
                lifecycle::admit(admission.agent.state)?;
                return crate::websocket::serve(self, session, ctx, admission).await;
            }
            _ => {}
        }
        lifecycle::admit(admission.agent.state)?;
        let body = body::read(session, self.cfg().max_body_bytes).await?;
        let mut down = Downstream::Http(session);
        let exchange = match self
            .exchange(&mut down, ctx, &admission, route, body, now)
            .await?
        {
            Opened::Runtime(x) => *x,
            Opened::Plugin(verdict) => return self.plugin_verdict(session, ctx, verdict).await,
        };
        let Exchange {
            mut inbound,
            relay,
            mut guard,
            mut metering,
            ..
        } = exchange;
        let result = self
            .relay(
                session,
                ctx,
                &mut inbound,
                relay,
                &mut guard,
                metering.as_mut(),
            )
            .await;
        self.conclude(ctx, &admission.agent, inbound, metering, &result)
            .await;
        result
    }

    /// Request rate: one more request of the caller's key, or `rate_limited`.
    pub(crate) fn rate(
        &self,
        admission: &Admission,
        ctx: &mut RequestCtx,
    ) -> Result<(), EdgeError> {
        if self.cfg().limits_enabled {
            ctx.rate = Some(self.control.limiter.admit(
                &admission.key,
                &admission.account.plan,
                self.cfg().rate_limit_status,
            )?);
        }
        Ok(())
    }

    /// An admitted request's way to the runtime, shared by HTTP and the WebSocket bridge:
    /// plugins, translation, identity, stream cap, quota reservation, then the upstream
    /// exchange up to the runtime's response header.
    pub(crate) async fn exchange(
        &self,
        down: &mut Downstream<'_>,
        ctx: &mut RequestCtx,
        admission: &Admission,
        route: Route,
        mut body: Bytes,
        now: Instant,
    ) -> Result<Opened, EdgeError> {
        if let Some(verdict) = self.plugins(down, ctx, admission, route, &mut body) {
            return Ok(Opened::Plugin(verdict));
        }
        let agent = &admission.agent;
        let query = down.head().uri.query().map(|q| format!("?{q}"));
        let mut prepared =
            self.outbound(route, agent, query.as_deref().unwrap_or(""), body, now)?;
        if agent.upstream.tunnel().is_some() {
            prepared.outbound.identity = Some(self.control.identity.sign(
                &admission.account.id,
                &admission.key.id,
                &agent.endpoint_id,
                &ctx.request_id,
            ));
        }
        let limits = self.cfg().limits_enabled;
        let plan = &admission.account.plan;
        let stream_slot = if limits && prepared.stream {
            Some(self.control.limiter.open_stream(
                &admission.key,
                plan,
                self.cfg().rate_limit_status,
            )?)
        } else {
            None
        };
        let metering = match prepared.cost.filter(|_| limits) {
            Some((prompt, cap)) => {
                let reservation = self.control.quota.reserve(
                    &admission.account.id,
                    plan.tokens_per_month,
                    prompt + cap,
                    prepared.stream,
                    crate::store::now(),
                )?;
                ctx.tokens_left = Some((reservation.limit, reservation.remaining));
                let payer = Payer {
                    account_id: admission.account.id.clone(),
                    key_id: admission.key.id.clone(),
                    agent_id: agent.endpoint_id.clone(),
                };
                Some(Metering::new(
                    reservation,
                    prompt,
                    prepared.hide_usage,
                    payer,
                ))
            }
            None => None,
        };

        let peer = agent
            .upstream
            .peer()
            .map_err(|e| EdgeError::UpstreamUnavailable(e.to_owned().into()))?;
        let header = forward::upstream_header(
            down.head(),
            &prepared.outbound,
            &ctx.request_id,
            down.client_addr().map(|a| a.ip()),
        )?;
        let mut guard = Guard {
            deadline: prepared.deadline,
            watch: Some(AdmissionWatch::new(
                self.control.registry.clone(),
                admission.clone(),
            )),
        };
        ctx.upstream_sent = Some(StdInstant::now());
        let mut inbound = self
            .forwarder
            .open(
                down.hangup(),
                peer,
                &header,
                &prepared.outbound.body,
                &mut guard,
            )
            .await?;
        ctx.first_byte = Some(StdInstant::now());
        inbound.set_idle_timeout(self.cfg().stream_idle_timeout);
        Ok(Opened::Runtime(Box::new(Exchange {
            inbound,
            relay: prepared.relay,
            guard,
            metering,
            _stream_slot: stream_slot,
        })))
    }

    /// After the relay: the upstream connection back to the pool (or closed), and the tokens of
    /// an answer that ended early accounted for what was delivered.
    pub(crate) async fn conclude(
        &self,
        ctx: &mut RequestCtx,
        agent: &Agent,
        inbound: Inbound,
        mut metering: Option<Metering>,
        result: &Result<(), EdgeError>,
    ) {
        if let Ok(peer) = agent.upstream.peer() {
            self.forwarder
                .close(inbound, peer, self.cfg().upstream_keepalive)
                .await;
        }
        if let Some(m) = metering.as_mut() {
            let outcome = match result {
                Ok(()) => "ok",
                Err(e) => e.code(),
            };
            ctx.tokens = Some(m.finish(None, outcome, &self.control.ledger));
        }
    }

    /// Plugins: the request's headers and whole body go through the policy plugins that apply,
    /// before any upstream connection. `Some` when a plugin decided instead (its own answer, or
    /// fail-closed); header changes are applied to the request.
    fn plugins(
        &self,
        down: &mut Downstream<'_>,
        ctx: &mut RequestCtx,
        admission: &Admission,
        route: Route,
        body: &mut Bytes,
    ) -> Option<crate::plugins::Verdict> {
        let set = self.control.plugins.load_full();
        if set.plugins().is_empty() {
            return None;
        }
        let agent = &admission.agent;
        let client = down.client_addr();
        let head = down.head();
        let props = std::collections::HashMap::from([
            ("request.path", head.uri.path().as_bytes().to_vec()),
            ("request.url_path", head.uri.path().as_bytes().to_vec()),
            ("request.method", head.method.as_str().as_bytes().to_vec()),
            ("request.id", ctx.request_id.as_bytes().to_vec()),
            (
                "request.protocol",
                format!("{:?}", head.version).into_bytes(),
            ),
            (
                "source.address",
                client
                    .map(|a| a.to_string())
                    .unwrap_or_default()
                    .into_bytes(),
            ),
            (
                "source.port",
                i64::from(client.map_or(0, |a| a.port()))
                    .to_le_bytes()
                    .to_vec(),
            ),
            (
                "moltghost.account",
                admission.account.id.as_bytes().to_vec(),
            ),
            ("moltghost.key_id", admission.key.id.as_bytes().to_vec()),
            ("moltghost.agent", agent.endpoint_id.as_bytes().to_vec()),
            ("moltghost.agent_name", agent.name.as_bytes().to_vec()),
            (
                "moltghost.plan",
                admission.account.plan.name.as_bytes().to_vec(),
            ),
            ("moltghost.route", route.path().as_bytes().to_vec()),
        ]);
        let mut run = set.start(route.path(), &agent.endpoint_id, &agent.name, props)?;
        let scheme = if down.is_tls() { "https" } else { "http" };
        let mut headers = crate::plugins::request_headers(down.head(), scheme);
        let verdict = run.on_request(&mut headers, body);
        ctx.plugins = Some(run);
        match verdict {
            Ok(()) => {
                crate::plugins::apply_request_headers(down.head_mut(), &headers);
                None
            }
            Err(v) => Some(v),
        }
    }

    /// Sends what a plugin decided instead of the runtime's answer: its own local response, or
    /// the fail-closed error.
    async fn plugin_verdict(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        verdict: crate::plugins::Verdict,
    ) -> Result<(), EdgeError> {
        let local = match verdict {
            crate::plugins::Verdict::Failed(m) => return Err(EdgeError::PluginFailed(m.into())),
            crate::plugins::Verdict::Respond(local) => local,
        };
        let (content_type, body) = if local.body.is_empty() {
            let denied = EdgeError::Denied {
                status: local.status,
                message: if local.details.is_empty() {
                    "Denied by policy".into()
                } else {
                    local.details.clone()
                },
            };
            (
                "application/json",
                Bytes::from(denied.to_json().to_string()),
            )
        } else {
            ("text/plain", Bytes::from(local.body))
        };
        let mut h = response::header(local.status, content_type, ctx);
        for (k, v) in &local.headers {
            if let (Ok(name), Ok(value)) = (
                http::HeaderName::from_bytes(k.as_bytes()),
                http::HeaderValue::from_bytes(v),
            ) {
                let _ = h.insert_header(name, value);
            }
        }
        ctx.status = local.status;
        ctx.responded = true;
        response::write_json(session, h, body).await
    }

    /// The answer: the runtime's response turned into the client's, by relay mode.
    async fn relay(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        inbound: &mut Inbound,
        relay: Relay,
        guard: &mut Guard,
        metering: Option<&mut Metering>,
    ) -> Result<(), EdgeError> {
        let status = inbound.header.status.as_u16();
        if status >= 500 {
            return Err(EdgeError::UpstreamUnavailable(
                format!("the agent runtime failed with status {status}").into(),
            ));
        }
        if relay != Relay::Passthrough && status >= 300 {
            let body = inbound
                .read_to_end(forward::hangup(session), guard, MAX_READ_ANSWER)
                .await?;
            return Err(runtime_refusal(status, &body));
        }
        match relay {
            Relay::Passthrough if inbound.is_event_stream() => {
                self.relay_event_stream(session, ctx, inbound, guard, metering)
                    .await
            }
            Relay::Passthrough => {
                self.relay_body(session, ctx, inbound, guard, metering)
                    .await
            }
            Relay::NativeAnswer => {
                let body = inbound
                    .read_to_end(forward::hangup(session), guard, MAX_READ_ANSWER)
                    .await?;
                let answer = chat::answer_from_openai(&body, &ctx.request_id)?;
                if let Some(m) = metering {
                    ctx.tokens = Some(m.finish(usage::usage_of(&body), "ok", &self.control.ledger));
                }
                let mut h = response::header(200, "application/json", ctx);
                if plugin_response_headers(ctx, &mut h)? {
                    h.remove_header("content-length");
                }
                let answer = plugin_body(ctx, answer, true)?;
                ctx.responded = true;
                ctx.status = h.status.as_u16();
                response::write_json(session, h, answer).await
            }
            Relay::NativeStream => {
                self.relay_native_stream(session, ctx, inbound, guard, metering)
                    .await
            }
        }
    }

    /// The runtime's response header, passed on (hop-by-hop headers dropped).
    async fn pass_header(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        inbound: &Inbound,
        stream: bool,
    ) -> Result<(), EdgeError> {
        let up = &inbound.header;
        let mut h =
            pingora_http::ResponseHeader::build_no_case(up.status, Some(up.headers.len() + 8))
                .expect("status from a parsed response");
        for (name, value) in up.headers.iter() {
            if !forward::dropped_downstream(name.as_str()) {
                h.append_header(name.clone(), value.clone())
                    .expect("parsed header");
            }
        }
        let rewrites = plugin_response_headers(ctx, &mut h)?;
        response::decorate(&mut h, ctx);
        if stream || rewrites || !h.headers.contains_key("content-length") {
            response::streaming(session, &mut h);
        }
        ctx.status = h.status.as_u16();
        ctx.responded = true;
        session
            .write_response_header(Box::new(h), false)
            .await
            .map_err(|_| EdgeError::ClientClosed)
    }

    /// A whole (not streamed) OpenAI answer, chunk by chunk. The last chunk is held until the
    /// answer's usage is in the ledger, so an answer the client has is never unaccounted.
    async fn relay_body(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        inbound: &mut Inbound,
        guard: &mut Guard,
        metering: Option<&mut Metering>,
    ) -> Result<(), EdgeError> {
        self.pass_header(session, ctx, inbound, false).await?;
        // The usage is read from the whole answer; it is copied only when it spans chunks.
        let mut spanned: Option<Vec<u8>> = None;
        let mut held: Option<Bytes> = None;
        while let Some(chunk) = inbound.next_chunk(forward::hangup(session), guard).await? {
            if let Some(prev) = held.replace(chunk) {
                if metering.is_some() {
                    let copy = spanned.get_or_insert_with(Vec::new);
                    if copy.len() + prev.len() <= MAX_READ_ANSWER {
                        copy.extend_from_slice(&prev);
                    }
                }
                let prev = plugin_body(ctx, prev, false)?;
                session
                    .write_response_body(Some(prev), false)
                    .await
                    .map_err(|_| EdgeError::ClientClosed)?;
            }
        }
        if let Some(m) = metering {
            let reported = match (spanned.as_mut(), held.as_ref()) {
                (Some(copy), Some(last)) => {
                    copy.extend_from_slice(last);
                    usage::usage_of(copy)
                }
                (None, Some(only)) => usage::usage_of(only),
                (_, None) => None,
            };
            ctx.tokens = Some(m.finish(reported, "ok", &self.control.ledger));
        }
        let held = match held {
            Some(last) => Some(plugin_body(ctx, last, true)?),
            None if ctx.plugins.is_some() => Some(plugin_body(ctx, Bytes::new(), true)?),
            None => None,
        };
        session
            .write_response_body(held, true)
            .await
            .map_err(|_| EdgeError::ClientClosed)
    }

    /// An OpenAI event stream. Without metering chunks pass as they are. With it, complete
    /// events pass byte for byte (the whole chunk, uncopied, when it ends on an event
    /// boundary), except the usage chunk the edge asked for on its own; `[DONE]` waits for the
    /// ledger, and a stream that crosses the quota is cut.
    async fn relay_event_stream(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        inbound: &mut Inbound,
        guard: &mut Guard,
        metering: Option<&mut Metering>,
    ) -> Result<(), EdgeError> {
        self.pass_header(session, ctx, inbound, true).await?;
        let _open = OpenStream::new(&self.control.metrics.open_streams);
        let Some(m) = metering else {
            loop {
                match inbound.next_chunk(forward::hangup(session), guard).await {
                    Ok(Some(chunk)) => {
                        if let Err(e) = write(session, ctx, chunk).await {
                            return end_stream_with_error(session, ctx, e).await;
                        }
                    }
                    Ok(None) => return finish(session, ctx).await,
                    Err(e) => return end_stream_with_error(session, ctx, e).await,
                }
            }
        };
        let mut scanner = SseScanner::new();
        loop {
            let (chunk, events) =
                match next_events(forward::hangup(session), inbound, guard, &mut scanner).await {
                    Ok(Some(x)) => x,
                    Ok(None) => break,
                    Err(e) => return end_stream_with_error(session, ctx, e).await,
                };
            let mut out = Vec::with_capacity(events.len());
            for ev in events {
                let kind = m.meter.observe(&ev.data);
                if kind == EventKind::Done {
                    ctx.tokens = Some(m.finish(None, "ok", &self.control.ledger));
                }
                if !(m.hide_usage && kind == EventKind::UsageOnly) {
                    out.push(ev.raw);
                }
            }
            if m.crossed() && !m.is_finished() {
                ctx.tokens = Some(m.finish(None, "quota_exceeded", &self.control.ledger));
                return end_stream_with_error(session, ctx, EdgeError::QuotaExceeded).await;
            }
            let whole =
                scanner.buffered() == 0 && out.iter().map(Bytes::len).sum::<usize>() == chunk.len();
            let bytes = if whole {
                chunk
            } else {
                Bytes::from(out.concat())
            };
            if !bytes.is_empty() {
                if let Err(e) = write(session, ctx, bytes).await {
                    return end_stream_with_error(session, ctx, e).await;
                }
            }
        }
        let rest = scanner.take_rest();
        if !rest.is_empty() {
            if let Err(e) = write(session, ctx, rest).await {
                return end_stream_with_error(session, ctx, e).await;
            }
        }
        ctx.tokens = Some(m.finish(None, "ok", &self.control.ledger));
        finish(session, ctx).await
    }

    /// Native chat, streamed: the runtime's chunks as native events, then `done` and `[DONE]`.
    async fn relay_native_stream(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        inbound: &mut Inbound,
        guard: &mut Guard,
        mut metering: Option<&mut Metering>,
    ) -> Result<(), EdgeError> {
        let mut h = response::header(200, "text/event-stream", ctx);
        h.insert_header("cache-control", "no-cache")
            .expect("static value");
        plugin_response_headers(ctx, &mut h)?;
        response::streaming(session, &mut h);
        ctx.status = 200;
        ctx.responded = true;
        session
            .write_response_header(Box::new(h), false)
            .await
            .map_err(|_| EdgeError::ClientClosed)?;
        let _open = OpenStream::new(&self.control.metrics.open_streams);
        let mut scanner = SseScanner::new();
        let mut native = NativeStream::new();
        let mut saw_done = false;
        loop {
            let events =
                match next_events(forward::hangup(session), inbound, guard, &mut scanner).await {
                    Ok(Some((_, events))) => events,
                    Ok(None) => break,
                    Err(e) => return end_stream_with_error(session, ctx, e).await,
                };
            let out = match self.native_events(
                ctx,
                &mut native,
                &events,
                metering.as_deref_mut(),
                &mut saw_done,
            ) {
                Ok(out) => out,
                Err(e) => return end_stream_with_error(session, ctx, e).await,
            };
            if !out.is_empty() {
                let mut bytes = Vec::new();
                for event in &out {
                    bytes.extend_from_slice(&chat::sse_event(event));
                }
                if let Err(e) = write(session, ctx, bytes.into()).await {
                    return end_stream_with_error(session, ctx, e).await;
                }
            }
        }
        let last = match self.native_end(ctx, &native, saw_done, metering) {
            Ok(last) => last,
            Err(e) => return end_stream_with_error(session, ctx, e).await,
        };
        let mut tail = chat::sse_event(&last).to_vec();
        tail.extend_from_slice(b"data: [DONE]\n\n");
        let tail = plugin_body(ctx, Bytes::from(tail), true)?;
        session
            .write_response_body(Some(tail), true)
            .await
            .map_err(|_| EdgeError::ClientClosed)
    }

    /// A native stream's events (SSE and WebSocket alike) for the runtime's `events`, metered;
    /// a stream that crosses the quota ends with `quota_exceeded`.
    pub(crate) fn native_events(
        &self,
        ctx: &mut RequestCtx,
        native: &mut NativeStream,
        events: &[SseEvent],
        mut metering: Option<&mut Metering>,
        saw_done: &mut bool,
    ) -> Result<Vec<serde_json::Value>, EdgeError> {
        let mut out = Vec::new();
        for ev in events {
            *saw_done |= ev.data == b"[DONE]";
            if let Some(m) = metering.as_deref_mut() {
                m.meter.observe(&ev.data);
            }
            if let Some(event) = native.on_data(&ev.data) {
                out.push(event);
            }
        }
        if let Some(m) = metering {
            if m.crossed() {
                ctx.tokens = Some(m.finish(None, "quota_exceeded", &self.control.ledger));
                return Err(EdgeError::QuotaExceeded);
            }
        }
        Ok(out)
    }

    /// A native stream's last event (`done`, finish reason, usage), once its tokens are in the
    /// ledger; an error when the runtime cut the stream short.
    pub(crate) fn native_end(
        &self,
        ctx: &mut RequestCtx,
        native: &NativeStream,
        saw_done: bool,
        metering: Option<&mut Metering>,
    ) -> Result<serde_json::Value, EdgeError> {
        if !saw_done && !native.finished() {
            return Err(EdgeError::UpstreamUnavailable(
                "the agent ended its stream early".into(),
            ));
        }
        if let Some(m) = metering {
            ctx.tokens = Some(m.finish(None, "ok", &self.control.ledger));
        }
        Ok(native.finish(&ctx.request_id))
    }

    /// `/v1/health`: answered by the edge: the agent's state and whether its runtime answers.
    async fn health(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        agent: &Agent,
    ) -> Result<(), EdgeError> {
        if agent.state == AgentState::Terminated {
            return Err(EdgeError::AgentTerminated);
        }
        let mut pod = match agent.upstream.peer() {
            Ok(peer) => self.probe(session, ctx, peer, agent).await,
            Err(e) => serde_json::json!({"reachable": false, "error": e}),
        };
        if let Some(t) = agent.upstream.tunnel() {
            pod["tunnel"] = serde_json::json!(t.link.status());
        }
        let status = &self.control.status;
        let body = serde_json::json!({
            "agent": agent.endpoint_id,
            "name": agent.name,
            "state": agent.state.as_str(),
            "pod": pod,
            "edge": {
                "store": if status.healthy() { "ok" } else { "unreachable" },
                "store_stale_seconds": status.stale_for(),
                "generation": self.control.registry.load().generation,
            },
        });
        ctx.status = 200;
        ctx.responded = true;
        response::write_json(
            session,
            response::header(200, "application/json", ctx),
            Bytes::from(body.to_string()),
        )
        .await
    }

    /// Asks the runtime's `/health`, within a second.
    async fn probe(
        &self,
        session: &mut Session,
        ctx: &RequestCtx,
        peer: &HttpPeer,
        agent: &Agent,
    ) -> serde_json::Value {
        let out = Outbound {
            method: Method::GET,
            path: agent.upstream.path("/health"),
            authority: agent.upstream.authority().to_owned(),
            body: Bytes::new(),
            content_type: None,
            identity: agent.upstream.tunnel().map(|_| {
                self.control.identity.sign(
                    ctx.account.as_deref().unwrap_or_default(),
                    ctx.key_id.as_deref().unwrap_or_default(),
                    &agent.endpoint_id,
                    &ctx.request_id,
                )
            }),
        };
        let started = StdInstant::now();
        let header =
            match forward::upstream_header(session.req_header(), &out, "health-probe", None) {
                Ok(h) => h,
                Err(e) => return serde_json::json!({"reachable": false, "error": e.message()}),
            };
        let mut guard = Guard {
            deadline: Instant::now() + Duration::from_secs(1),
            watch: None,
        };
        match self
            .forwarder
            .open(
                forward::hangup(session),
                peer,
                &header,
                &out.body,
                &mut guard,
            )
            .await
        {
            Ok(mut inbound) => {
                let ok = inbound.header.status.is_success();
                let _ = inbound
                    .read_to_end(forward::hangup(session), &mut guard, 64 * 1024)
                    .await;
                self.forwarder
                    .close(inbound, peer, self.cfg().upstream_keepalive)
                    .await;
                serde_json::json!({
                    "reachable": ok,
                    "latency_ms": (started.elapsed().as_secs_f64() * 1000.0 * 1000.0).round() / 1000.0,
                })
            }
            Err(e) => serde_json::json!({"reachable": false, "error": e.message()}),
        }
    }
}

/// Writes a streamed body chunk to the client, noting when the first one went.
async fn write(session: &mut Session, ctx: &mut RequestCtx, bytes: Bytes) -> Result<(), EdgeError> {
    ctx.first_token.get_or_insert_with(StdInstant::now);
    let bytes = plugin_body(ctx, bytes, false)?;
    if bytes.is_empty() {
        return Ok(());
    }
    session
        .write_response_body(Some(bytes), false)
        .await
        .map_err(|_| EdgeError::ClientClosed)
}

/// Counts a stream in the open-streams gauge for as long as it lives.
pub(crate) struct OpenStream<'a>(&'a prometheus::IntGauge);

impl<'a> OpenStream<'a> {
    /// Counts one more open stream until dropped.
    pub(crate) fn new(gauge: &'a prometheus::IntGauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for OpenStream<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Plugins' view of the response header; true when they will see (and may rewrite) the body,
/// which is then re-framed.
pub(crate) fn plugin_response_headers(
    ctx: &mut RequestCtx,
    h: &mut pingora_http::ResponseHeader,
) -> Result<bool, EdgeError> {
    let Some(run) = ctx.plugins.as_mut() else {
        return Ok(false);
    };
    let mut headers = crate::plugins::response_headers(h);
    match run.on_response_headers(&mut headers) {
        Ok(()) => {
            crate::plugins::apply_response_headers(h, &headers);
            if run.sees_response_body() {
                h.remove_header("content-length");
            }
            Ok(run.sees_response_body())
        }
        Err(crate::plugins::Verdict::Failed(m)) => Err(EdgeError::PluginFailed(m.into())),
        Err(crate::plugins::Verdict::Respond(local)) => Err(EdgeError::Denied {
            status: local.status,
            message: local.details,
        }),
    }
}

/// A response body chunk through the plugins.
pub(crate) fn plugin_body(
    ctx: &mut RequestCtx,
    bytes: Bytes,
    end: bool,
) -> Result<Bytes, EdgeError> {
    match ctx.plugins.as_mut() {
        None => Ok(bytes),
        Some(run) => run.on_response_body(bytes, end).map_err(|v| match v {
            crate::plugins::Verdict::Failed(m) => EdgeError::PluginFailed(m.into()),
            crate::plugins::Verdict::Respond(local) => EdgeError::Denied {
                status: local.status,
                message: local.details,
            },
        }),
    }
}

/// Ends the client's body (the plugins see its end first).
async fn finish(session: &mut Session, ctx: &mut RequestCtx) -> Result<(), EdgeError> {
    let last = plugin_body(ctx, Bytes::new(), true)?;
    if !last.is_empty() {
        session
            .write_response_body(Some(last), false)
            .await
            .map_err(|_| EdgeError::ClientClosed)?;
    }
    session
        .write_response_body(None, true)
        .await
        .map_err(|_| EdgeError::ClientClosed)
}

/// Reads the runtime's next chunk of an event stream: the chunk and the events it completed;
/// `None` at the end of the body.
pub(crate) async fn next_events(
    hangup: impl std::future::Future<Output = ()>,
    inbound: &mut Inbound,
    guard: &mut Guard,
    scanner: &mut SseScanner,
) -> Result<Option<(Bytes, Vec<SseEvent>)>, EdgeError> {
    let Some(chunk) = inbound.next_chunk(hangup, guard).await? else {
        return Ok(None);
    };
    scanner.push(&chunk);
    let mut events = Vec::new();
    while let Some(ev) = scanner.next_event().map_err(|e| {
        EdgeError::UpstreamUnavailable(format!("the agent broke its stream: {e}").into())
    })? {
        events.push(ev);
    }
    Ok(Some((chunk, events)))
}

/// The runtime's own 4xx, with its message when it gave one.
pub(crate) fn runtime_refusal(status: u16, body: &[u8]) -> EdgeError {
    let message = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            v.pointer("/error/message")
                .and_then(|m| m.as_str())
                .map(str::to_owned)
        })
        .unwrap_or_else(|| format!("the agent runtime refused the request with status {status}"));
    EdgeError::Upstream { status, message }
}

/// Ends a stream whose headers were sent: the error as an SSE event, then the end of the body.
/// The body is complete, so the connection stays usable; the error goes to the access log.
async fn end_stream_with_error(
    session: &mut Session,
    ctx: &mut RequestCtx,
    err: EdgeError,
) -> Result<(), EdgeError> {
    if err == EdgeError::ClientClosed {
        return Err(err);
    }
    ctx.error = Some(err.code());
    session
        .write_response_body(Some(err.to_sse_event()), true)
        .await
        .map_err(|_| EdgeError::ClientClosed)
}

#[async_trait]
impl ProxyHttp for Edge {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            request_id: String::new(),
            started: StdInstant::now(),
            route: None,
            agent: None,
            account: None,
            key_id: None,
            status: 0,
            error: None,
            responded: false,
            upstream_sent: None,
            first_byte: None,
            first_token: None,
            rate: None,
            tokens_left: None,
            tokens: None,
            plugins: None,
        }
    }

    async fn early_request_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> pingora_error::Result<()> {
        ctx.started = StdInstant::now();
        ctx.request_id = self.ids.for_request(
            session
                .req_header()
                .headers
                .get("x-request-id")
                .map(|v| v.as_bytes()),
        );
        Ok(())
    }

    async fn request_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> pingora_error::Result<bool> {
        let Err(err) = self.serve(session, ctx).await else {
            return Ok(true);
        };
        ctx.error = Some(err.code());
        if !ctx.responded {
            ctx.status = err.status();
            if err != EdgeError::ClientClosed
                && response::write_error(session, &err, ctx).await.is_ok()
            {
                return Ok(true);
            }
        }
        // Headers are out (or nobody is listening): drop the connection so a cut body is never
        // mistaken for a whole one.
        Error::e_explain(ErrorType::ConnectionClosed, err.to_string())
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut RequestCtx,
    ) -> pingora_error::Result<Box<HttpPeer>> {
        // Every request is answered in `request_filter`; Pingora's own proxy path is never used.
        Error::e_explain(
            ErrorType::InternalError,
            "the edge forwards requests itself",
        )
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        if session.response_written().is_none() && !ctx.responded {
            let err =
                EdgeError::InvalidRequest(format!("bad request: {}", e.etype().as_str()).into());
            ctx.status = err.status();
            let _ = response::write_error(session, &err, ctx).await;
        }
        FailToProxy {
            error_code: ctx.status,
            can_reuse_downstream: false,
        }
    }

    fn suppress_error_log(&self, _session: &Session, ctx: &RequestCtx, _error: &Error) -> bool {
        // Broken streams and disconnects are reported once, by the access log.
        ctx.error.is_some()
    }

    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut RequestCtx) {
        if let Some(run) = ctx.plugins.as_mut() {
            // The plugins' log phase, then their contexts end.
            run.finish();
        }
        crate::logging::access(
            ctx,
            session.req_header().method.as_str(),
            session.body_bytes_sent() as u64,
        );
        self.control.metrics.record(ctx);
    }
}
