//! The native `/v1/chat` format: requests translated to the runtime's chat completions, answers
//! and streams translated back. The streamed payload is the same one the WebSocket sends.

use bytes::Bytes;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::error::EdgeError;

/// The largest `max_tokens` a request may ask for: more than any model answers, small enough
/// that a quota reservation never overflows.
pub const MAX_TOKENS: u64 = 1_000_000;

/// A count (`max_tokens`): a non-negative integer, also written as an integral number such as
/// `16.0` (JSON does not tell them apart; JSON Schema's `integer` allows both).
pub fn count<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let v = Option::<serde_json::Number>::deserialize(d)?;
    v.map(|n| {
        n.as_u64()
            .or_else(|| {
                n.as_f64()
                    .filter(|f| f.fract() == 0.0 && (0.0..9.007_199_254_740_992e15).contains(f))
                    .map(|f| f as u64)
            })
            .ok_or_else(|| serde::de::Error::custom(format!("expected a count, got {n}")))
    })
    .transpose()
}

/// A native chat request, as the spec writes it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NativeChatRequest {
    /// The conversation.
    pub messages: Vec<Message>,
    /// Stream the answer as server-sent events.
    #[serde(default)]
    pub stream: bool,
    /// Sampling temperature, 0 to 2.
    #[serde(default)]
    pub temperature: Option<f64>,
    /// Cap on completion tokens.
    #[serde(default, deserialize_with = "count")]
    pub max_tokens: Option<u64>,
    /// Skill names, offered to the runtime as function tools.
    #[serde(default)]
    pub tools: Option<Vec<String>>,
    /// The edge's deadline for the whole answer, in seconds.
    #[serde(default)]
    pub timeout_seconds: Option<f64>,
    /// Model to ask the runtime for; the runtime's default when absent.
    #[serde(default)]
    pub model: Option<String>,
}

/// One message of the conversation.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Message {
    /// `system`, `user`, `assistant` or `tool`.
    pub role: String,
    /// Text, or OpenAI content parts.
    pub content: Value,
    /// Optional participant name.
    #[serde(default)]
    pub name: Option<String>,
    /// For `tool` messages: the call answered.
    #[serde(default)]
    pub tool_call_id: Option<String>,
}

fn text_len(v: &Value) -> usize {
    match v {
        Value::String(s) => s.len(),
        Value::Array(a) => a.iter().map(|p| p.get("text").map_or(0, text_len)).sum(),
        _ => 0,
    }
}

fn invalid(msg: impl Into<String>) -> EdgeError {
    EdgeError::InvalidRequest(msg.into().into())
}

/// Checks a list of OpenAI-style messages: non-empty, known roles, text or parts as content.
pub fn validate_messages(messages: &[Message]) -> Result<(), EdgeError> {
    if messages.is_empty() {
        return Err(invalid("`messages` must contain at least one message"));
    }
    for (i, m) in messages.iter().enumerate() {
        if !matches!(
            m.role.as_str(),
            "system" | "user" | "assistant" | "tool" | "developer"
        ) {
            return Err(invalid(format!(
                "messages[{i}].role: expected system, user, assistant or tool, got {:?}",
                m.role
            )));
        }
        let parts_ok = match &m.content {
            Value::String(_) => true,
            Value::Array(parts) => parts.iter().all(Value::is_object),
            _ => false,
        };
        if !parts_ok {
            return Err(invalid(format!(
                "messages[{i}].content: expected a string or an array of parts (objects)"
            )));
        }
    }
    Ok(())
}

impl NativeChatRequest {
    /// Parses and checks a body; every message names the field at fault.
    pub fn parse(body: &[u8]) -> Result<Self, EdgeError> {
        serde_json::from_slice::<Self>(body)
            .map_err(|e| invalid(format!("invalid JSON body: {e}")))?
            .checked()
    }

    /// Takes and checks a request already parsed as JSON (a WebSocket message's fields).
    pub fn from_value(v: Value) -> Result<Self, EdgeError> {
        serde_json::from_value::<Self>(v)
            .map_err(|e| invalid(format!("invalid message: {e}")))?
            .checked()
    }

    fn checked(self) -> Result<Self, EdgeError> {
        let req = self;
        validate_messages(&req.messages)?;
        if let Some(t) = req.temperature {
            if !(0.0..=2.0).contains(&t) {
                return Err(invalid("`temperature` must be between 0 and 2"));
            }
        }
        if req
            .max_tokens
            .is_some_and(|m| !(1..=MAX_TOKENS).contains(&m))
        {
            return Err(invalid(format!(
                "`max_tokens` must be between 1 and {MAX_TOKENS}"
            )));
        }
        if let Some(t) = req.timeout_seconds {
            // A deadline under a second is a mistake (an answer takes longer), never a policy.
            if !(t.is_finite() && t >= 1.0) {
                return Err(invalid("`timeout_seconds` must be at least 1"));
            }
        }
        for (i, t) in req.tools.iter().flatten().enumerate() {
            let ok = !t.is_empty()
                && t.len() <= 64
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            if !ok {
                return Err(invalid(format!(
                    "tools[{i}]: a skill name is 1-64 of A-Z, a-z, 0-9, _ and -"
                )));
            }
        }
        Ok(req)
    }

    /// The prompt's likely token count (see [`crate::usage::OpenAiRequest::prompt_estimate`]).
    pub fn prompt_estimate(&self) -> u64 {
        let bytes: usize = self.messages.iter().map(|m| text_len(&m.content)).sum();
        crate::usage::estimate_tokens(bytes) + 4 * self.messages.len() as u64
    }

    /// The runtime's chat-completions request for this one. Streams always ask for usage, which
    /// the native answer reports.
    pub fn to_openai(&self) -> Vec<u8> {
        let mut o = Map::new();
        if let Some(m) = &self.model {
            o.insert("model".into(), json!(m));
        }
        let messages: Vec<Value> = self
            .messages
            .iter()
            .map(|m| {
                let mut v = json!({"role": m.role, "content": m.content});
                if let Some(n) = &m.name {
                    v["name"] = json!(n);
                }
                if let Some(id) = &m.tool_call_id {
                    v["tool_call_id"] = json!(id);
                }
                v
            })
            .collect();
        o.insert("messages".into(), Value::Array(messages));
        o.insert("stream".into(), json!(self.stream));
        if self.stream {
            o.insert("stream_options".into(), json!({"include_usage": true}));
        }
        if let Some(t) = self.temperature {
            o.insert("temperature".into(), json!(t));
        }
        if let Some(m) = self.max_tokens {
            o.insert("max_tokens".into(), json!(m));
        }
        if let Some(tools) = &self.tools {
            let tools: Vec<Value> = tools
                .iter()
                .map(|name| {
                    json!({"type": "function", "function": {
                        "name": name, "parameters": {"type": "object", "properties": {}}
                    }})
                })
                .collect();
            o.insert("tools".into(), Value::Array(tools));
        }
        serde_json::to_vec(&Value::Object(o)).expect("a JSON value always serializes")
    }
}

/// Checks that a pass-through body is a JSON object (the OpenAI routes take nothing else).
pub fn check_json_object(body: &[u8]) -> Result<(), EdgeError> {
    match serde_json::from_slice::<serde::de::IgnoredAny>(body) {
        Ok(_) if body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{') => Ok(()),
        Ok(_) => Err(EdgeError::InvalidRequest(
            "the request body must be a JSON object".into(),
        )),
        Err(e) => Err(EdgeError::InvalidRequest(
            format!("invalid JSON body: {e}").into(),
        )),
    }
}

pub use crate::usage::{Billed, Usage};

/// The native `usage`: what the request was billed when the edge meters it (`billed`; marked
/// `"estimated": true` when the runtime reported no usage and the edge estimated it), else the
/// runtime's counts (OpenAI's three fields); plus `tokens`, the total, as the spec's quick-start
/// answer shows it.
fn native_usage(billed: Option<Billed>, reported: Option<&Value>) -> Value {
    let (u, estimated) = match billed {
        Some(b) => (b.usage, b.estimated),
        None => (
            reported
                .and_then(|u| serde_json::from_value(u.clone()).ok())
                .unwrap_or_default(),
            false,
        ),
    };
    let mut out = json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.total(),
        "tokens": u.total(),
    });
    if estimated {
        out["estimated"] = json!(true);
    }
    out
}

fn native_id(upstream_id: Option<&str>, request_id: &str) -> String {
    let raw = upstream_id.unwrap_or(request_id);
    let raw = raw.strip_prefix("chatcmpl-").unwrap_or(raw);
    format!("msg_{raw}")
}

/// Translates a runtime's chat completion into the native answer; `billed`: what the edge
/// billed for it, when it meters the request.
pub fn answer_from_openai(
    body: &[u8],
    request_id: &str,
    billed: Option<Billed>,
) -> Result<Bytes, EdgeError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| {
        EdgeError::UpstreamUnavailable(
            format!("the runtime answered with invalid JSON: {e}").into(),
        )
    })?;
    let choice = v.pointer("/choices/0");
    let message = choice.and_then(|c| c.get("message"));
    let mut out = json!({
        "id": native_id(v.get("id").and_then(Value::as_str), request_id),
        "object": "chat.completion",
        "created": v.get("created").cloned().unwrap_or(json!(0)),
        "model": v.get("model").cloned().unwrap_or(Value::Null),
        "finish_reason": choice.and_then(|c| c.get("finish_reason")).cloned().unwrap_or(Value::Null),
        "content": message.and_then(|m| m.get("content")).cloned().unwrap_or(json!("")),
        "usage": native_usage(billed, v.get("usage")),
    });
    if let Some(calls) = message
        .and_then(|m| m.get("tool_calls"))
        .filter(|c| !c.is_null())
    {
        out["tool_calls"] = calls.clone();
    }
    Ok(Bytes::from(out.to_string()))
}

/// Turns the runtime's chat-completion chunks into native stream events, one at a time.
#[derive(Debug, Default)]
pub struct NativeStream {
    id: Option<String>,
    model: Option<Value>,
    finish_reason: Option<Value>,
    usage: Option<Value>,
}

impl NativeStream {
    /// A translator for one stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// The native event for one upstream `data:` payload, if it carries text. Usage and finish
    /// reason are kept for [`NativeStream::finish`].
    pub fn on_data(&mut self, data: &[u8]) -> Option<Value> {
        if data == b"[DONE]" {
            return None;
        }
        let v: Value = serde_json::from_slice(data).ok()?;
        if self.id.is_none() {
            self.id = v.get("id").and_then(Value::as_str).map(str::to_owned);
            self.model = v.get("model").cloned();
        }
        if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
            self.usage = Some(u.clone());
        }
        let choice = v.pointer("/choices/0")?;
        if let Some(f) = choice.get("finish_reason").filter(|f| !f.is_null()) {
            self.finish_reason = Some(f.clone());
        }
        let content = choice
            .pointer("/delta/content")
            .and_then(Value::as_str)
            .filter(|c| !c.is_empty())?;
        Some(json!({"content": content, "done": false}))
    }

    /// The last event: `done`, finish reason and usage (`billed`: what the edge billed, when
    /// it meters the request).
    pub fn finish(&self, request_id: &str, billed: Option<Billed>) -> Value {
        json!({
            "done": true,
            "id": native_id(self.id.as_deref(), request_id),
            "model": self.model.clone().unwrap_or(Value::Null),
            "finish_reason": self.finish_reason.clone().unwrap_or(json!("stop")),
            "usage": native_usage(billed, self.usage.as_ref()),
        })
    }

    /// Whether the runtime reported a finish reason (a stream without one was cut short).
    pub fn finished(&self) -> bool {
        self.finish_reason.is_some()
    }
}

/// One native event as a server-sent event.
pub fn sse_event(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_request_translates() {
        let body = br#"{"messages":[{"role":"system","content":"You are a sales analyst"},{"role":"user","content":"Analyze this deal"}],
            "stream":true,"temperature":0.7,"max_tokens":2048,"tools":["crm_query","slack_notify"],"timeout_seconds":300}"#;
        let req = NativeChatRequest::parse(body).unwrap();
        let out: Value = serde_json::from_slice(&req.to_openai()).unwrap();
        assert_eq!(out["stream_options"]["include_usage"], true);
        assert_eq!(out["tools"][1]["function"]["name"], "slack_notify");
        assert_eq!(out["max_tokens"], 2048);
        assert_eq!(req.timeout_seconds, Some(300.0));
    }

    #[test]
    fn bad_requests_say_what() {
        let cases: [(&[u8], &str); 6] = [
            (b"{", "invalid JSON"),
            (br#"{"messages":[]}"#, "at least one"),
            (
                br#"{"messages":[{"role":"robot","content":"x"}]}"#,
                "messages[0].role",
            ),
            (
                br#"{"messages":[{"role":"user","content":"x"}],"temperature":9}"#,
                "temperature",
            ),
            (
                br#"{"messages":[{"role":"user","content":"x"}],"tools":["a b"]}"#,
                "tools[0]",
            ),
            (
                br#"{"messages":[{"role":"user","content":"x"}],"bogus":1}"#,
                "bogus",
            ),
        ];
        for (body, want) in cases {
            let e = NativeChatRequest::parse(body).unwrap_err();
            assert_eq!(e.status(), 400);
            assert!(e.message().contains(want), "{} !~ {want}", e.message());
        }
    }

    #[test]
    fn answer_and_stream_translate() {
        let up = br#"{"id":"chatcmpl-7","created":5,"model":"m","choices":[{"message":{"content":"Hi"},"finish_reason":"stop"}],
            "usage":{"prompt_tokens":4,"completion_tokens":1,"total_tokens":5}}"#;
        let a: Value = serde_json::from_slice(&answer_from_openai(up, "r", None).unwrap()).unwrap();
        assert_eq!(a["id"], "msg_7");
        assert_eq!(a["content"], "Hi");
        assert_eq!(a["usage"]["total_tokens"], 5);
        assert_eq!(a["usage"]["tokens"], 5);

        let mut s = NativeStream::new();
        assert!(s
            .on_data(
                br#"{"id":"chatcmpl-7","choices":[{"delta":{"role":"assistant","content":""}}]}"#
            )
            .is_none());
        assert_eq!(
            s.on_data(br#"{"choices":[{"delta":{"content":"Hi"}}]}"#)
                .unwrap()["content"],
            "Hi"
        );
        assert!(s
            .on_data(br#"{"choices":[{"delta":{},"finish_reason":"stop"}]}"#)
            .is_none());
        assert!(s.on_data(br#"{"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}"#).is_none());
        let last = s.finish("r", None);
        assert_eq!(last["done"], true);
        assert_eq!(last["usage"]["total_tokens"], 2);
        assert_eq!(last["finish_reason"], "stop");
        assert!(last["usage"].get("estimated").is_none());
        // What the edge billed wins, marked when it was estimated.
        let billed = Billed {
            usage: Usage {
                prompt_tokens: 4,
                completion_tokens: 3,
                total_tokens: 7,
            },
            estimated: true,
        };
        let last = s.finish("r", Some(billed));
        assert_eq!(last["usage"]["tokens"], 7);
        assert_eq!(last["usage"]["estimated"], true);
    }
}
