//! The reference agent runtime: an OpenAI-compatible server with deterministic, timed answers.
//!
//! Defaults come from [`RuntimeConfig`]; each request may override them with headers, so one
//! runtime serves every test scenario:
//!
//! | header | effect |
//! |---|---|
//! | `x-mock-ttft-ms` | delay before the first token |
//! | `x-mock-interval-ms` | delay between tokens |
//! | `x-mock-tokens` | how many completion tokens (capped by `max_tokens`) |
//! | `x-mock-stall-after` | stop sending (but keep the connection) after N tokens |
//! | `x-mock-abort-after` | drop the connection after N tokens |
//! | `x-mock-status` | answer with this HTTP status and an OpenAI-style error |
//! | `x-mock-no-usage` | never report usage, even when asked |
//! | `x-mock-echo` | a whole chat answer carries `x-mock-echoed`: the request header it names (what the runtime was sent, e.g. `traceparent`) |

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::stream;
use serde::Deserialize;
use serde_json::{json, Value};

/// The words the runtime answers with, in order, cycling. The first sentence matches the spec's
/// example answer.
const WORDS: &[&str] = &[
    "Hello!",
    " I'm",
    " ready",
    " to",
    " help",
    ".",
    " Your",
    " top",
    " deal",
    " is",
    " Acme",
    " Inc",
    " worth",
    " $500K",
    ".",
    " The",
    " pipeline",
    " looks",
    " healthy",
    " this",
    " quarter",
    ".",
    // Personal data, one token each, for the redaction plugin's tests.
    " Questions?",
    " Mail",
    " sales@acme.example",
    " or",
    " pay",
    " by",
    " card",
    " 4111-1111-1111-1111",
    ".",
];

/// The message roles the runtime knows.
const ROLES: &[&str] = &[
    "system",
    "developer",
    "user",
    "assistant",
    "tool",
    "function",
];

/// Skills the runtime knows for `/v1/tools`.
const SKILLS: &[&str] = &["crm_query", "slack_notify", "echo"];

/// Default behaviour of the runtime; each field can be overridden per request by a header.
#[derive(Clone, Debug)]
pub struct RuntimeConfig {
    /// Model name reported in answers and `/v1/models`.
    pub model: String,
    /// Delay before the first token.
    pub ttft: Duration,
    /// Delay between tokens.
    pub interval: Duration,
    /// Completion tokens per answer (capped by the request's `max_tokens`).
    pub tokens: u32,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            model: "llama3.1-70b".into(),
            ttft: Duration::from_millis(0),
            interval: Duration::from_millis(0),
            tokens: 16,
        }
    }
}

/// Counters a test reads to see what the runtime saw (for example, that a cancel reached it).
#[derive(Default, Debug)]
pub struct Stats {
    /// Requests received on any route.
    pub requests: AtomicU64,
    /// Streams started.
    pub streams_started: AtomicU64,
    /// Streams that sent their last event.
    pub streams_completed: AtomicU64,
    /// Streams dropped before their end because the client went away.
    pub streams_cancelled: AtomicU64,
}

impl Stats {
    fn snapshot(&self) -> Value {
        json!({
            "requests": self.requests.load(Ordering::Relaxed),
            "streams_started": self.streams_started.load(Ordering::Relaxed),
            "streams_completed": self.streams_completed.load(Ordering::Relaxed),
            "streams_cancelled": self.streams_cancelled.load(Ordering::Relaxed),
        })
    }
}

#[derive(Clone)]
struct AppState {
    cfg: Arc<RuntimeConfig>,
    stats: Arc<Stats>,
    next_id: Arc<AtomicU64>,
}

/// Builds the runtime's router and the counters it updates.
pub fn router(cfg: RuntimeConfig) -> (Router, Arc<Stats>) {
    let stats = Arc::new(Stats::default());
    let state = AppState {
        cfg: Arc::new(cfg),
        stats: stats.clone(),
        next_id: Arc::new(AtomicU64::new(1)),
    };
    let app = Router::new()
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/tools", post(tools))
        .route("/mock/stats", get(stats_handler))
        .layer(axum::middleware::from_fn(echo_caller))
        .with_state(state);
    (app, stats)
}

/// Echoes the caller a pod's sidecar named (`x-moltghost-account`, `-key-id`, `-agent`) as
/// `x-mock-caller: account/key/agent`, and the request's `Host` and path as `x-mock-host` and
/// `x-mock-path`, so that tests see what reached the runtime.
async fn echo_caller(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let h = req.headers();
    let get = |n: &str| h.get(n).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let caller = get("x-moltghost-account").map(|a| {
        format!(
            "{a}/{}/{}",
            get("x-moltghost-key-id").unwrap_or_default(),
            get("x-moltghost-agent").unwrap_or_default()
        )
    });
    let host = h.get("host").cloned();
    let path =
        axum::http::HeaderValue::from_str(req.uri().path_and_query().map_or("/", |p| p.as_str()))
            .ok();
    let mut resp = next.run(req).await;
    if let Some(v) = caller.and_then(|c| axum::http::HeaderValue::from_str(&c).ok()) {
        resp.headers_mut().insert("x-mock-caller", v);
    }
    for (name, value) in [("x-mock-host", host), ("x-mock-path", path)] {
        if let Some(v) = value {
            resp.headers_mut().insert(name, v);
        }
    }
    resp
}

/// Serves the runtime on `listener` until the process ends. Token events are small writes:
/// without `TCP_NODELAY`, Nagle and delayed ACKs hold them back by 40 ms.
pub async fn serve(listener: tokio::net::TcpListener, cfg: RuntimeConfig) -> std::io::Result<()> {
    let (app, _) = router(cfg);
    axum::serve(nodelay(listener), app).await
}

fn nodelay(
    listener: tokio::net::TcpListener,
) -> impl axum::serve::Listener<Addr = std::net::SocketAddr> {
    use axum::serve::ListenerExt;
    listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    })
}

/// Starts the runtime on an ephemeral loopback port in the current tokio runtime and returns its
/// address and counters: the form tests use.
pub async fn spawn(cfg: RuntimeConfig) -> std::io::Result<(std::net::SocketAddr, Arc<Stats>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (app, stats) = router(cfg);
    tokio::spawn(async move {
        let _ = axum::serve(nodelay(listener), app).await;
    });
    Ok((addr, stats))
}

async fn stats_handler(State(st): State<AppState>) -> Json<Value> {
    Json(st.stats.snapshot())
}

async fn models(State(st): State<AppState>) -> Json<Value> {
    st.stats.requests.fetch_add(1, Ordering::Relaxed);
    Json(json!({
        "object": "list",
        "data": [{"id": st.cfg.model, "object": "model", "created": 1741264535, "owned_by": "moltghost"}]
    }))
}

/// Per-request behaviour: the defaults overridden by `x-mock-*` headers.
#[derive(Clone, Debug)]
struct Plan {
    ttft: Duration,
    interval: Duration,
    tokens: u32,
    stall_after: Option<u32>,
    abort_after: Option<u32>,
    status: Option<u16>,
    no_usage: bool,
}

fn header_u64(h: &HeaderMap, name: &str) -> Option<u64> {
    h.get(name)?.to_str().ok()?.trim().parse().ok()
}

impl Plan {
    fn new(cfg: &RuntimeConfig, h: &HeaderMap, max_tokens: Option<u64>) -> Self {
        let tokens = header_u64(h, "x-mock-tokens").unwrap_or(cfg.tokens as u64);
        let tokens = max_tokens.map_or(tokens, |m| tokens.min(m)) as u32;
        Self {
            ttft: header_u64(h, "x-mock-ttft-ms").map_or(cfg.ttft, Duration::from_millis),
            interval: header_u64(h, "x-mock-interval-ms")
                .map_or(cfg.interval, Duration::from_millis),
            tokens,
            stall_after: header_u64(h, "x-mock-stall-after").map(|v| v as u32),
            abort_after: header_u64(h, "x-mock-abort-after").map(|v| v as u32),
            status: header_u64(h, "x-mock-status").map(|v| v as u16),
            no_usage: h.contains_key("x-mock-no-usage"),
        }
    }
}

#[derive(Deserialize, Default)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Deserialize)]
struct ChatRequest {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    messages: Vec<ChatMessage>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default, deserialize_with = "moltghost_protocol::chat::count")]
    max_tokens: Option<u64>,
    #[serde(default, deserialize_with = "moltghost_protocol::chat::count")]
    max_completion_tokens: Option<u64>,
    #[serde(default)]
    tools: Option<Vec<Value>>,
}

#[derive(Deserialize)]
struct CompletionRequest {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    prompt: Value,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default, deserialize_with = "moltghost_protocol::chat::count")]
    max_tokens: Option<u64>,
}

/// Word count of a text, the runtime's notion of tokens.
fn count_words(s: &str) -> u64 {
    s.split_whitespace().count() as u64
}

fn text_of(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts.iter().map(text_of).collect::<Vec<_>>().join(" "),
        Value::Object(o) => o
            .get("text")
            .or_else(|| o.get("content"))
            .map(text_of)
            .unwrap_or_default(),
        _ => String::new(),
    }
}

fn prompt_tokens_chat(messages: &[ChatMessage]) -> u64 {
    messages
        .iter()
        .map(|m| 3 + count_words(&text_of(&m.content)))
        .sum()
}

fn error_response(status: u16, message: &str) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        status,
        Json(json!({"error": {"message": message, "type": if status.is_server_error() { "server_error" } else { "invalid_request_error" }, "code": match status.as_u16() {
            404 => "not_found",
            s if s < 500 => "invalid_request",
            _ => "runtime_error",
        }}})),
    )
        .into_response()
}

fn bad_request(e: impl std::fmt::Display) -> Response {
    error_response(400, &format!("invalid request body: {e}"))
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The completion's pieces: token `i` of the answer, with an optional prefix naming the tools the
/// runtime was offered (so tests can see them arrive).
fn token_text(i: u32, tool_names: &str) -> String {
    let w = WORDS[i as usize % WORDS.len()];
    if i == 0 && !tool_names.is_empty() {
        format!("[tools: {tool_names}] {w}")
    } else {
        w.to_string()
    }
}

fn tool_names(tools: &Option<Vec<Value>>) -> String {
    tools
        .iter()
        .flatten()
        .filter_map(|t| t.pointer("/function/name").and_then(Value::as_str))
        .collect::<Vec<_>>()
        .join(",")
}

fn finish_reason(plan: &Plan, max_tokens: Option<u64>) -> &'static str {
    match max_tokens {
        Some(m) if plan.tokens as u64 >= m => "length",
        _ => "stop",
    }
}

/// What a stream sends, built per token by the route that owns the format.
struct StreamSpec {
    plan: Plan,
    /// Event before the first token (the assistant role chunk on chat).
    head: Option<Value>,
    /// Event for token `i`.
    token_event: Box<dyn Fn(u32) -> Value + Send>,
    /// Events after the last token (finish, then usage if asked).
    tail: Vec<Value>,
}

fn sse(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

/// Streams `spec` as server-sent events from a producer task. A send that fails means the client
/// went away: that is counted as a cancel, which is how tests see a disconnect reach the runtime.
fn sse_response(stats: Arc<Stats>, spec: StreamSpec) -> Response {
    stats.streams_started.fetch_add(1, Ordering::Relaxed);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    tokio::spawn(async move {
        let plan = &spec.plan;
        let send = |b: Result<Bytes, std::io::Error>| {
            let tx = tx.clone();
            async move { tx.send(b).await.is_ok() }
        };
        let cancelled = || stats.streams_cancelled.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(plan.ttft).await;
        if let Some(head) = &spec.head {
            if !send(Ok(sse(head))).await {
                cancelled();
                return;
            }
        }
        for i in 0..plan.tokens {
            // No timer for back-to-back tokens: a zero sleep still waits for the timer's next
            // tick (a millisecond).
            if i > 0 && !plan.interval.is_zero() {
                tokio::time::sleep(plan.interval).await;
            }
            if plan.abort_after == Some(i) {
                // An error item makes hyper drop the connection mid-body: a broken stream. The
                // tokens before it go out first (hyper drops what it has not written yet).
                tokio::time::sleep(Duration::from_millis(20)).await;
                let _ = send(Err(std::io::Error::other("aborted on request"))).await;
                return;
            }
            if plan.stall_after == Some(i) {
                tx.closed().await;
                cancelled();
                return;
            }
            if !send(Ok(sse(&(spec.token_event)(i)))).await {
                cancelled();
                return;
            }
        }
        for ev in &spec.tail {
            if !send(Ok(sse(ev))).await {
                cancelled();
                return;
            }
        }
        if send(Ok(Bytes::from_static(b"data: [DONE]\n\n"))).await {
            stats.streams_completed.fetch_add(1, Ordering::Relaxed);
        } else {
            cancelled();
        }
    });
    let body = stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    Response::builder()
        .status(200)
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(Body::from_stream(body))
        .expect("static response parts are valid")
}

fn usage(prompt: u64, completion: u32) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion as u64})
}

async fn chat_completions(State(st): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    st.stats.requests.fetch_add(1, Ordering::Relaxed);
    let req: ChatRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return bad_request(e),
    };
    let max_tokens = req.max_completion_tokens.or(req.max_tokens);
    let plan = Plan::new(&st.cfg, &headers, max_tokens);
    if let Some(status) = plan.status {
        return error_response(status, "error requested by x-mock-status");
    }
    if req.messages.is_empty() {
        return bad_request("`messages` must hold at least one message");
    }
    if let Some(m) = req
        .messages
        .iter()
        .find(|m| !ROLES.contains(&m.role.as_str()))
    {
        return bad_request(format!("unknown role `{}`", m.role));
    }
    let id = format!("chatcmpl-{}", st.next_id.fetch_add(1, Ordering::Relaxed));
    let model = req.model.clone().unwrap_or_else(|| st.cfg.model.clone());
    let created = now_secs();
    let tools = tool_names(&req.tools);
    let prompt = prompt_tokens_chat(&req.messages);
    let finish = finish_reason(&plan, max_tokens);
    if !req.stream {
        if !plan.ttft.is_zero() || !plan.interval.is_zero() {
            tokio::time::sleep(plan.ttft + plan.interval * plan.tokens.saturating_sub(1)).await;
        }
        let content: String = (0..plan.tokens).map(|i| token_text(i, &tools)).collect();
        let mut answer = json!({
            "id": id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}],
        });
        if !plan.no_usage {
            answer["usage"] = usage(prompt, plan.tokens);
        }
        let mut resp = Json(answer).into_response();
        let echoed = headers
            .get("x-mock-echo")
            .and_then(|name| headers.get(name.to_str().ok()?));
        if let Some(v) = echoed {
            resp.headers_mut().insert("x-mock-echoed", v.clone());
        }
        return resp;
    }
    let include_usage = req.stream_options.is_some_and(|o| o.include_usage) && !plan.no_usage;
    let chunk = {
        let (id, model) = (id.clone(), model.clone());
        move |delta: Value, finish: Value| {
            json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
        }
    };
    let mut tail = vec![chunk(json!({}), json!(finish))];
    if include_usage {
        tail.push(
            json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                         "choices": [], "usage": usage(prompt, plan.tokens)}),
        );
    }
    let head = Some(chunk(
        json!({"role": "assistant", "content": ""}),
        Value::Null,
    ));
    let token_event =
        Box::new(move |i| chunk(json!({"content": token_text(i, &tools)}), Value::Null));
    sse_response(
        st.stats.clone(),
        StreamSpec {
            plan,
            head,
            token_event,
            tail,
        },
    )
}

async fn completions(State(st): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    st.stats.requests.fetch_add(1, Ordering::Relaxed);
    let req: CompletionRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return bad_request(e),
    };
    let plan = Plan::new(&st.cfg, &headers, req.max_tokens);
    if let Some(status) = plan.status {
        return error_response(status, "error requested by x-mock-status");
    }
    let strings =
        |v: &Value| v.is_string() || v.as_array().is_some_and(|a| a.iter().all(Value::is_string));
    if !req.prompt.is_null() && !strings(&req.prompt) {
        return bad_request("`prompt` must be a string or an array of strings");
    }
    let id = format!("cmpl-{}", st.next_id.fetch_add(1, Ordering::Relaxed));
    let model = req.model.clone().unwrap_or_else(|| st.cfg.model.clone());
    let created = now_secs();
    let prompt = count_words(&text_of(&req.prompt));
    let finish = finish_reason(&plan, req.max_tokens);
    if !req.stream {
        tokio::time::sleep(plan.ttft + plan.interval * plan.tokens.saturating_sub(1)).await;
        let text: String = (0..plan.tokens).map(|i| token_text(i, "")).collect();
        let mut answer = json!({
            "id": id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": finish}],
        });
        if !plan.no_usage {
            answer["usage"] = usage(prompt, plan.tokens);
        }
        return Json(answer).into_response();
    }
    let include_usage = req.stream_options.is_some_and(|o| o.include_usage) && !plan.no_usage;
    let chunk = {
        let (id, model) = (id.clone(), model.clone());
        move |text: String, finish: Value| {
            json!({"id": id, "object": "text_completion", "created": created, "model": model,
                   "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": finish}]})
        }
    };
    let mut tail = vec![chunk(String::new(), json!(finish))];
    if include_usage {
        tail.push(
            json!({"id": id, "object": "text_completion", "created": created, "model": model,
                         "choices": [], "usage": usage(prompt, plan.tokens)}),
        );
    }
    let token_event = Box::new(move |i| chunk(token_text(i, ""), Value::Null));
    sse_response(
        st.stats.clone(),
        StreamSpec {
            plan,
            head: None,
            token_event,
            tail,
        },
    )
}

#[derive(Deserialize)]
struct ToolCall {
    tool: String,
    #[serde(default)]
    arguments: serde_json::Map<String, Value>,
}

/// One chat message: a role (a string) and any content; other fields are ignored.
#[derive(Deserialize)]
struct ChatMessage {
    role: String,
    #[serde(default)]
    content: Value,
}

async fn tools(State(st): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    st.stats.requests.fetch_add(1, Ordering::Relaxed);
    if let Some(status) = header_u64(&headers, "x-mock-status") {
        return error_response(status as u16, "error requested by x-mock-status");
    }
    let call: ToolCall = match serde_json::from_slice(&body) {
        Ok(c) => c,
        Err(e) => return bad_request(e),
    };
    if !SKILLS.contains(&call.tool.as_str()) {
        return error_response(404, &format!("unknown tool '{}'", call.tool));
    }
    Json(json!({"tool": call.tool, "result": {"ok": true, "echo": call.arguments}})).into_response()
}
