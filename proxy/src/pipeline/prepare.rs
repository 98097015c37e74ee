//! Preparation: what the client asked for becomes what the runtime is sent. The request-side
//! plugins see the headers and the whole body first (they may change them, or answer
//! instead); then the route's translation gives the runtime request, its deadline, whether it
//! streams, and what it may cost (for the quota reservation).

use std::time::Duration;

use bytes::Bytes;
use http::Method;
use tokio::time::Instant;

use super::{Downstream, Pipeline, RequestCtx};
use crate::chat::{self, NativeChatRequest};
use crate::error::EdgeError;
use crate::forward::Outbound;
use crate::plugins::Verdict;
use crate::policy::Admission;
use crate::registry::Agent;
use crate::routing::Route;
use crate::usage;
use crate::ws::ClientMessage;

/// How the runtime's answer is turned into the client's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Relay {
    /// OpenAI routes: status, headers and body as they are.
    Passthrough,
    /// Native chat, whole answer.
    NativeAnswer,
    /// Native chat, streamed (as SSE, or as WebSocket frames).
    NativeStream,
}

/// What a token-generating request may cost, for its quota reservation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cost {
    /// The prompt's estimated tokens.
    pub prompt: u64,
    /// The most completion tokens it asked for (or the configured default).
    pub completion_cap: u64,
}

/// The runtime request a route turns into, and what accounting it needs.
#[derive(Debug)]
pub struct Prepared {
    /// The request for the runtime.
    pub outbound: Outbound,
    /// How its answer is relayed.
    pub relay: Relay,
    /// When it times out.
    pub deadline: Instant,
    /// Streamed (counts against the concurrent-stream cap, and may be cut at the quota).
    pub stream: bool,
    /// Token-generating: what it may cost.
    pub cost: Option<Cost>,
    /// The edge asked for usage the client did not ask for.
    pub hide_usage: bool,
}

/// What preparation led to.
pub enum Preparation {
    /// A request for the runtime.
    Forward(Box<Prepared>),
    /// A plugin decided instead (its own answer, or fail-closed).
    Answered(Verdict),
}

impl Pipeline {
    /// Request-side plugins, then translation (see the module's doc). A plugin's edit of
    /// `:method` or `:path` routes the request again; one of `:authority` is the `Host` the
    /// runtime is sent. `route` is `None` for a request no route takes: after the plugins it
    /// gets its 404 or 405, unless one of them rewrote it onto a route.
    pub async fn prepare(
        &self,
        down: &mut Downstream<'_>,
        ctx: &mut RequestCtx,
        admission: &Admission,
        route: Option<Route>,
        mut body: Bytes,
        now: Instant,
    ) -> Result<Preparation, EdgeError> {
        let rewrites = match self
            .request_plugins(down, ctx, admission, route, &mut body)
            .await
        {
            Ok(rewrites) => rewrites,
            Err(verdict) => return Ok(Preparation::Answered(verdict)),
        };
        let route = match route {
            Some(Route::Ws) => Route::Ws,
            Some(route) if !rewrites.rerouted => route,
            _ => reroute(down, ctx)?,
        };
        let query = down.head().uri.query().map(|q| format!("?{q}"));
        let mut prepared = self.translate(
            route,
            &admission.agent,
            query.as_deref().unwrap_or(""),
            body,
            now,
        )?;
        if let Some(authority) = rewrites.authority {
            prepared.outbound.authority = authority;
        }
        if self.plane.spans.is_some() && prepared.cost.is_some() {
            // Only for traces: a second look at the body is not worth it otherwise.
            ctx.record.model = usage::model_of(&prepared.outbound.body);
        }
        ctx.record.prepared = Some(std::time::Instant::now());
        Ok(Preparation::Forward(Box::new(prepared)))
    }

    /// The request's headers and whole body through the plugins that apply, before any
    /// upstream connection. `Err` when a plugin decided instead; header changes are applied,
    /// and what they change of the pseudo-headers is returned.
    async fn request_plugins(
        &self,
        down: &mut Downstream<'_>,
        ctx: &mut RequestCtx,
        admission: &Admission,
        route: Option<Route>,
        body: &mut Bytes,
    ) -> Result<crate::plugins::Rewrites, Verdict> {
        let set = self.plane.plugins.load_full();
        if set.plugins().is_empty() {
            return Ok(Default::default());
        }
        let agent = &admission.agent;
        // A request no route takes is known to plugins by its path.
        let label = route.map_or_else(|| down.head().uri.path().to_owned(), |r| r.path().into());
        let facts = || facts(down, ctx, admission, label.clone(), body.len());
        let Some(mut run) = set.start(&label, &agent.endpoint_id, &agent.name, facts) else {
            return Ok(Default::default());
        };
        let scheme = if down.is_tls() { "https" } else { "http" };
        let headers = crate::plugins::request_headers(down.head(), scheme);
        let verdict = run.on_request(headers, body).await;
        ctx.plugins = Some(run);
        let Some(mut headers) = verdict? else {
            return Ok(Default::default());
        };
        if route == Some(Route::Ws) {
            // A message's route is the WebSocket's: its head is not the plugins' to rewrite.
            headers.retain(|(k, _)| !k.starts_with(':'));
        }
        crate::plugins::apply_request_headers(down.head_mut(), &headers)
            .map_err(|what| Verdict::Failed(format!("a policy plugin set {what}")))
    }

    /// The runtime request for a route, its deadline and its cost.
    fn translate(
        &self,
        route: Route,
        agent: &Agent,
        query: &str,
        body: Bytes,
        now: Instant,
    ) -> Result<Prepared, EdgeError> {
        let cfg = self.cfg();
        let plain = |method, path, body| Prepared {
            outbound: outbound(agent, method, path, body, None),
            relay: Relay::Passthrough,
            deadline: now + cfg.limits.request_timeout,
            stream: false,
            cost: None,
            hide_usage: false,
        };
        match route {
            Route::Chat => {
                let req = NativeChatRequest::parse(&body)?;
                let relay = if req.stream {
                    Relay::NativeStream
                } else {
                    Relay::NativeAnswer
                };
                self.native(req, relay, agent, now)
            }
            // A WebSocket message: always streamed, as frames.
            Route::Ws => match ClientMessage::parse(&body)? {
                ClientMessage::Message(req) => self.native(*req, Relay::NativeStream, agent, now),
                ClientMessage::Cancel => Err(EdgeError::InvalidRequest(
                    "nothing to cancel: no answer is in progress".into(),
                )),
            },
            Route::ChatCompletions | Route::Completions => {
                let req = usage::inspect_openai(&body).map_err(invalid)?;
                // Ask a stream for its usage so it is counted exactly; hide it from a client
                // that did not ask.
                let hide_usage = req.stream && !req.include_usage;
                let body = if hide_usage {
                    Bytes::from(usage::request_usage(&body).map_err(invalid)?)
                } else {
                    body
                };
                let cost = Cost {
                    prompt: req.prompt_estimate(),
                    completion_cap: req.max_tokens.unwrap_or(cfg.limits.default_max_tokens),
                };
                Ok(Prepared {
                    stream: req.stream,
                    cost: Some(cost),
                    hide_usage,
                    ..plain(
                        Method::POST,
                        agent.upstream.path(route.path()) + query,
                        body,
                    )
                })
            }
            Route::Tools => {
                chat::check_json_object(&body)?;
                Ok(plain(
                    Method::POST,
                    agent.upstream.path(route.path()) + query,
                    body,
                ))
            }
            Route::Models | Route::Health => Ok(plain(
                Method::GET,
                agent.upstream.path(route.path()) + query,
                Bytes::new(),
            )),
        }
    }

    /// A native chat request as the runtime's chat completion, with the client's deadline.
    fn native(
        &self,
        mut req: NativeChatRequest,
        relay: Relay,
        agent: &Agent,
        now: Instant,
    ) -> Result<Prepared, EdgeError> {
        let cfg = self.cfg();
        let deadline = match req.timeout_seconds {
            None => now + cfg.limits.request_timeout,
            Some(t) => {
                let t = Duration::from_secs_f64(t);
                if t > cfg.limits.max_timeout {
                    return Err(invalid(format!(
                        "`timeout_seconds` may be at most {}",
                        cfg.limits.max_timeout.as_secs()
                    )));
                }
                now + t
            }
        };
        let stream = relay != Relay::NativeAnswer;
        req.stream = stream;
        let cost = Cost {
            prompt: req.prompt_estimate(),
            completion_cap: req.max_tokens.unwrap_or(cfg.limits.default_max_tokens),
        };
        let path = agent.upstream.path(Route::ChatCompletions.path());
        let body = Bytes::from(req.to_openai());
        Ok(Prepared {
            outbound: outbound(agent, Method::POST, path, body, Some("application/json")),
            relay,
            deadline,
            stream,
            cost: Some(cost),
            hide_usage: false,
        })
    }
}

/// The route a plugin's new `:method` and `:path` lead to (or, for a request no route took and
/// no plugin rewrote, its 404 or 405). The edge's own answers (`/v1/health`) and the WebSocket
/// are chosen before plugins run: a rewrite to them finds no route.
fn reroute(down: &Downstream<'_>, ctx: &mut RequestCtx) -> Result<Route, EdgeError> {
    let head = down.head();
    let route = crate::routing::route(&head.method, head.uri.path())?;
    if matches!(route, Route::Health | Route::Ws) {
        return Err(EdgeError::NotFound(
            format!(
                "No route for {} after a policy plugin's rewrite",
                route.path()
            )
            .into(),
        ));
    }
    ctx.record.route = Some(route);
    Ok(route)
}

/// A request for `agent`'s runtime.
pub(crate) fn outbound(
    agent: &Agent,
    method: Method,
    path: String,
    body: Bytes,
    content_type: Option<&'static str>,
) -> Outbound {
    Outbound {
        method,
        path,
        authority: agent.upstream.authority().to_owned(),
        body,
        content_type,
        identity: None,
    }
}

fn invalid(msg: String) -> EdgeError {
    EdgeError::InvalidRequest(msg.into())
}

/// What plugins may ask of the request beyond its headers (see [`crate::plugins::properties`]):
/// a few numbers and shared handles, nothing encoded yet.
fn facts(
    down: &Downstream<'_>,
    ctx: &RequestCtx,
    admission: &Admission,
    route: String,
    body_len: usize,
) -> crate::plugins::RequestFacts {
    let head = down.head();
    // As it arrived: the request line's target and each header line (`name: value\r\n`).
    let head_size = head.uri.path_and_query().map_or(1, |p| p.as_str().len())
        + head
            .headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 4)
            .sum::<usize>();
    crate::plugins::RequestFacts {
        id: ctx.record.request_id.clone(),
        arrived: std::time::SystemTime::now() - ctx.record.started.elapsed(),
        version: head.version,
        tls: down.is_tls(),
        body_size: body_len as u64,
        head_size: head_size as u64,
        client: down.client_addr(),
        local: down.server_addr(),
        tls_version: down.tls_version(),
        connection_id: down.lazy_connection_id(),
        server_name: down.requested_server_name(),
        route,
        admission: admission.clone(),
    }
}
