//! Token usage: reading the runtime's `usage`, and metering a stream as it passes so that every
//! token is accounted for (exactly when the runtime reports usage, estimated when it does not).

use serde::{Deserialize, Serialize};

/// Token counts, as OpenAI reports them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct Usage {
    /// Tokens in the prompt.
    #[serde(default)]
    pub prompt_tokens: u64,
    /// Tokens generated.
    #[serde(default)]
    pub completion_tokens: u64,
    /// Their sum.
    #[serde(default)]
    pub total_tokens: u64,
}

impl Usage {
    /// The total, trusting the parts when the runtime left it out.
    pub fn total(&self) -> u64 {
        self.total_tokens
            .max(self.prompt_tokens + self.completion_tokens)
    }
}

/// What a request was billed: the runtime's counts, or the edge's estimate when it gave none.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Billed {
    /// The counts.
    pub usage: Usage,
    /// Whether the edge estimated them (the runtime reported no usage).
    pub estimated: bool,
}

#[derive(Deserialize)]
struct WithUsage {
    #[serde(default)]
    usage: Option<Usage>,
}

/// The `usage` object of a JSON answer or chunk, if it has one.
pub fn usage_of(json: &[u8]) -> Option<Usage> {
    serde_json::from_slice::<WithUsage>(json).ok()?.usage
}

/// A rough token count for text the runtime did not count: one token per four bytes, at least
/// one for non-empty text (the usual rule of thumb for English with BPE tokenizers).
pub fn estimate_tokens(text_bytes: usize) -> u64 {
    (text_bytes as u64).div_ceil(4)
}

/// A completion as the meter reads it: a stream's chunk (text in `delta`) or a whole answer
/// (text in `message`); text completions carry `text`.
#[derive(Deserialize)]
struct Completion<'a> {
    #[serde(default, borrow)]
    choices: Vec<Choice<'a>>,
    #[serde(default)]
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct Choice<'a> {
    #[serde(default, borrow)]
    delta: Option<Content<'a>>,
    #[serde(default, borrow)]
    message: Option<Content<'a>>,
    #[serde(default, borrow)]
    text: Option<std::borrow::Cow<'a, str>>,
}

impl Choice<'_> {
    fn text(&self) -> &str {
        self.delta
            .as_ref()
            .or(self.message.as_ref())
            .and_then(|c| c.content.as_deref())
            .or(self.text.as_deref())
            .unwrap_or("")
    }
}

#[derive(Deserialize)]
struct Content<'a> {
    #[serde(default, borrow)]
    content: Option<std::borrow::Cow<'a, str>>,
}

/// What one SSE event of an OpenAI stream meant to the meter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// Carries generated text (or other choice data).
    Content,
    /// Carries only usage (`"choices": []`): the chunk a client that did not ask for usage must
    /// not see.
    UsageOnly,
    /// `[DONE]`.
    Done,
    /// Anything else (not JSON, an error object, …).
    Other,
}

/// Meters an OpenAI stream (chat or text completions) event by event.
#[derive(Debug, Default, Clone)]
pub struct StreamMeter {
    /// The usage the runtime reported, if it did.
    pub reported: Option<Usage>,
    /// Bytes of generated text seen.
    pub content_bytes: usize,
    /// Events that carried text.
    pub content_events: u64,
    /// Whether `[DONE]` was seen.
    pub done: bool,
}

impl StreamMeter {
    /// A meter with nothing seen.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes one event's `data`.
    pub fn observe(&mut self, data: &[u8]) -> EventKind {
        if data == b"[DONE]" {
            self.done = true;
            return EventKind::Done;
        }
        let Ok(chunk) = serde_json::from_slice::<Completion<'_>>(data) else {
            return EventKind::Other;
        };
        self.take(&chunk);
        match (chunk.choices.is_empty(), chunk.usage.is_some()) {
            (false, _) => EventKind::Content,
            (true, true) => EventKind::UsageOnly,
            (true, false) => EventKind::Other,
        }
    }

    /// Takes a whole answer (a chat or text completion): its usage, else its text for the
    /// estimate. An answer that is not a completion adds nothing.
    pub fn observe_answer(&mut self, body: &[u8]) {
        match serde_json::from_slice::<Completion<'_>>(body) {
            Ok(answer) => self.take(&answer),
            Err(_) => self.reported = usage_of(body).or(self.reported),
        }
    }

    fn take(&mut self, c: &Completion<'_>) {
        if let Some(u) = c.usage {
            self.reported = Some(u);
        }
        for text in c.choices.iter().map(Choice::text) {
            if !text.is_empty() {
                self.content_bytes += text.len();
                self.content_events += 1;
            }
        }
    }

    /// Completion tokens delivered so far: the runtime's count if it gave one, else the larger
    /// of the events that carried text and the byte estimate.
    pub fn completion_tokens(&self) -> u64 {
        match self.reported {
            Some(u) => u.completion_tokens,
            None => self.content_events.max(estimate_tokens(self.content_bytes)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meters_a_chat_stream() {
        let mut m = StreamMeter::new();
        assert_eq!(
            m.observe(br#"{"choices":[{"delta":{"role":"assistant","content":""}}]}"#),
            EventKind::Content
        );
        assert_eq!(
            m.observe(br#"{"choices":[{"delta":{"content":"Hello"}}]}"#),
            EventKind::Content
        );
        assert_eq!(
            m.observe(br#"{"choices":[{"text":" there"}]}"#),
            EventKind::Content
        );
        assert_eq!(m.completion_tokens(), 3); // max(2 events, 11 bytes / 4)
        assert_eq!(
            m.observe(br#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":7,"total_tokens":10}}"#),
            EventKind::UsageOnly
        );
        assert_eq!(m.completion_tokens(), 7);
        assert_eq!(m.observe(b"[DONE]"), EventKind::Done);
        assert!(m.done);
        assert_eq!(m.observe(b"{oops"), EventKind::Other);
    }

    #[test]
    fn meters_a_whole_answer() {
        let mut m = StreamMeter::new();
        m.observe_answer(
            br#"{"choices":[{"message":{"role":"assistant","content":"Hello there, friend"}}]}"#,
        );
        assert_eq!((m.reported, m.completion_tokens()), (None, 5)); // 19 bytes / 4
        let mut m = StreamMeter::new();
        m.observe_answer(
            br#"{"choices":[{"text":"abcd"}],"usage":{"prompt_tokens":1,"completion_tokens":2}}"#,
        );
        assert_eq!(m.completion_tokens(), 2);
        let mut m = StreamMeter::new();
        m.observe_answer(
            br#"{"choices":[{"message":{"content":[1]}}],"usage":{"completion_tokens":9}}"#,
        );
        assert_eq!(m.completion_tokens(), 9);
        m.observe_answer(b"not json");
        assert_eq!(m.completion_tokens(), 9);
    }

    #[test]
    fn usage_from_answers() {
        let u =
            usage_of(br#"{"id":"x","usage":{"prompt_tokens":4,"completion_tokens":2}}"#).unwrap();
        assert_eq!(u.total(), 6);
        assert!(usage_of(br#"{"id":"x"}"#).is_none());
        assert_eq!(estimate_tokens(9), 3);
    }
}

/// The `model` a JSON request names (for traces), if it names one as a string.
pub fn model_of(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Model<'a> {
        #[serde(default, borrow)]
        model: Option<std::borrow::Cow<'a, str>>,
    }
    let m: Model<'_> = serde_json::from_slice(body).ok()?;
    m.model.map(std::borrow::Cow::into_owned)
}

/// What the edge needs to know of an OpenAI chat or text completion request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OpenAiRequest {
    /// `stream: true`.
    pub stream: bool,
    /// `stream_options.include_usage: true`.
    pub include_usage: bool,
    /// `max_completion_tokens` or `max_tokens`.
    pub max_tokens: Option<u64>,
    /// Bytes of prompt text (message contents, or `prompt`).
    pub prompt_bytes: usize,
    /// Messages in the conversation (0 for text completions).
    pub messages: usize,
}

#[derive(Deserialize)]
struct Peek {
    #[serde(default)]
    stream: Option<serde_json::Value>,
    #[serde(default)]
    stream_options: Option<serde_json::Value>,
    #[serde(default)]
    max_tokens: Option<serde_json::Value>,
    #[serde(default)]
    max_completion_tokens: Option<serde_json::Value>,
    #[serde(default)]
    messages: Option<serde_json::Value>,
    #[serde(default)]
    prompt: Option<serde_json::Value>,
}

fn text_bytes(v: &serde_json::Value) -> usize {
    match v {
        serde_json::Value::String(s) => s.len(),
        serde_json::Value::Array(a) => a.iter().map(text_bytes).sum(),
        serde_json::Value::Object(o) => o
            .get("text")
            .or_else(|| o.get("content"))
            .map_or(0, text_bytes),
        _ => 0,
    }
}

/// Reads the fields that matter for accounting; the body must be a JSON object. Field types
/// are checked only as far as accounting needs (the runtime validates the rest).
pub fn inspect_openai(body: &[u8]) -> Result<OpenAiRequest, String> {
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err("the request body must be a JSON object".into());
    }
    let p: Peek = serde_json::from_slice(body).map_err(|e| format!("invalid JSON body: {e}"))?;
    let stream = match p.stream {
        None | Some(serde_json::Value::Null) => false,
        Some(serde_json::Value::Bool(b)) => b,
        Some(_) => return Err("`stream` must be a boolean".into()),
    };
    let max = |v: Option<serde_json::Value>, name: &str| match v {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(v) => match crate::chat::count(v) {
            Ok(Some(n)) if (1..=crate::chat::MAX_TOKENS).contains(&n) => Ok(Some(n)),
            _ => Err(format!(
                "`{name}` must be an integer between 1 and {}",
                crate::chat::MAX_TOKENS
            )),
        },
    };
    let max_tokens =
        max(p.max_completion_tokens, "max_completion_tokens")?.or(max(p.max_tokens, "max_tokens")?);
    let include_usage = p
        .stream_options
        .as_ref()
        .and_then(|o| o.get("include_usage"))
        .and_then(|v| v.as_bool())
        .unwrap_or(false);
    let (prompt_bytes, messages) = match (&p.messages, &p.prompt) {
        (Some(serde_json::Value::Array(m)), _) => (
            m.iter()
                .map(|x| x.get("content").map_or(0, text_bytes))
                .sum(),
            m.len(),
        ),
        (Some(_), _) => return Err("`messages` must be an array".into()),
        (None, Some(prompt)) => (text_bytes(prompt), 0),
        (None, None) => (0, 0),
    };
    Ok(OpenAiRequest {
        stream,
        include_usage,
        max_tokens,
        prompt_bytes,
        messages,
    })
}

impl OpenAiRequest {
    /// The prompt's likely token count: four bytes a token, plus a few per message.
    pub fn prompt_estimate(&self) -> u64 {
        estimate_tokens(self.prompt_bytes) + 4 * self.messages as u64
    }
}

/// The same request asking for usage in its stream (`stream_options.include_usage`), so the edge
/// can account for it exactly; the extra chunk is then hidden from the client.
pub fn request_usage(body: &[u8]) -> Result<Vec<u8>, String> {
    let mut v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("invalid JSON body: {e}"))?;
    let obj = v
        .as_object_mut()
        .ok_or("the request body must be a JSON object")?;
    let opts = obj
        .entry("stream_options")
        .or_insert_with(|| serde_json::json!({}));
    if opts.is_null() {
        *opts = serde_json::json!({});
    }
    match opts.as_object_mut() {
        Some(o) => {
            o.insert("include_usage".into(), serde_json::Value::Bool(true));
        }
        None => return Err("`stream_options` must be an object".into()),
    }
    serde_json::to_vec(&v).map_err(|e| e.to_string())
}

#[cfg(test)]
mod request_tests {
    use super::*;

    #[test]
    fn inspects_requests() {
        let r = inspect_openai(br#"{"model":"m","messages":[{"role":"user","content":"12345678"}],"stream":true,"max_tokens":50}"#).unwrap();
        assert_eq!(
            r,
            OpenAiRequest {
                stream: true,
                include_usage: false,
                max_tokens: Some(50),
                prompt_bytes: 8,
                messages: 1
            }
        );
        assert_eq!(r.prompt_estimate(), 6);
        let r = inspect_openai(br#"{"prompt":"abcd","stream_options":{"include_usage":true}}"#)
            .unwrap();
        assert!(r.include_usage && r.prompt_bytes == 4);
        assert!(inspect_openai(b"[1]").is_err());
        assert!(inspect_openai(br#"{"stream":"yes"}"#).is_err());
        assert!(inspect_openai(br#"{"max_tokens":-1}"#).is_err());
        assert_eq!(
            model_of(br#"{"model":"llama3.1-70b","messages":[]}"#).as_deref(),
            Some("llama3.1-70b")
        );
        assert_eq!(model_of(br#"{"model":7}"#), None);
        assert_eq!(model_of(b"[]"), None);
        let body = request_usage(br#"{"stream":true}"#).unwrap();
        assert!(inspect_openai(&body).unwrap().include_usage);
        assert!(request_usage(br#"{"stream_options":3}"#).is_err());
    }
}
