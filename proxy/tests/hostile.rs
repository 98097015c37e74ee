//! The hostile catalog: what an attacker or a broken runtime sends, each case with one concrete
//! outcome, against one real edge (raw sockets where a client library would tidy the request).
//! Refusals must not reach the runtime; after the catalog the edge is alive and serving.
//!
//! Groups: framing and smuggling, sizes, slow clients, bodies, routing and Host, credentials,
//! internal headers, upgrades, WebSocket frames, runtime misbehaviour, admin tokens.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::Stack;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What a case must end in.
#[derive(Debug, Clone, PartialEq)]
enum Want {
    /// The edge's JSON error: this status and code, with an `x-request-id`.
    Error(u16, &'static str),
    /// Closed without an answer.
    Closed,
    /// Served: 200.
    Served,
    /// Served (200), and the connection then closed: whatever followed was not read.
    ServedAlone,
    /// A stream that began (200) and ended with an SSE error event of this code.
    StreamError(&'static str),
}

/// What the edge sent back.
#[derive(Debug)]
struct Answer {
    status: Option<u16>,
    head: String,
    body: String,
}

impl Answer {
    fn parse(raw: &[u8]) -> Self {
        let text = String::from_utf8_lossy(raw).into_owned();
        let Some((head, body)) = text.split_once("\r\n\r\n") else {
            return Self {
                status: None,
                head: text,
                body: String::new(),
            };
        };
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .filter(|_| head.starts_with("HTTP/1."));
        Self {
            status,
            head: head.to_ascii_lowercase(),
            body: body.to_owned(),
        }
    }

    /// Whether it is what `want` says.
    fn check(&self, want: &Want) -> Result<(), String> {
        let json_code = || {
            serde_json::from_str::<Value>(self.body.trim())
                .ok()
                .and_then(|v| v["error"]["code"].as_str().map(str::to_owned))
        };
        let ok = match want {
            Want::Error(status, code) => {
                self.status == Some(*status)
                    && self.head.contains("x-request-id:")
                    && self.head.contains("content-type: application/json")
                    && json_code().as_deref() == Some(*code)
            }
            Want::Closed => self.status.is_none() && self.head.is_empty(),
            Want::Served => self.status == Some(200),
            Want::ServedAlone => {
                self.status == Some(200)
                    && self.head.contains("connection: close")
                    && !self.body.contains("HTTP/1.1")
            }
            Want::StreamError(code) => {
                self.status == Some(200)
                    && self.body.contains("event: error")
                    && self.body.contains(&format!("\"code\":\"{code}\""))
            }
        };
        if ok {
            Ok(())
        } else {
            Err(format!(
                "status {:?}, head {:?}, body {:?}",
                self.status,
                self.head,
                &self.body[..self.body.len().min(300)]
            ))
        }
    }
}

/// Sends `parts` (with `pause` between them) and reads until the edge closes, at most 15 s.
async fn exchange(port: u16, parts: &[Vec<u8>], pause: Duration) -> Result<Vec<u8>, String> {
    let mut conn = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            tokio::time::sleep(pause).await;
        }
        if conn.write_all(p).await.is_err() {
            break;
        }
    }
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let read = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    match read {
        Ok(()) => Ok(out),
        Err(_) => Err(format!(
            "connection held open 15 s; got {:?}",
            String::from_utf8_lossy(&out[..out.len().min(300)])
        )),
    }
}

/// One case: raw bytes (sent in parts), the outcome, and whether the runtime may see it.
struct Case {
    name: &'static str,
    parts: Vec<Vec<u8>>,
    pause: Duration,
    want: Want,
    reaches_runtime: bool,
}

fn case(name: &'static str, raw: String, want: Want) -> Case {
    let reaches_runtime = matches!(
        want,
        Want::Served | Want::ServedAlone | Want::StreamError(_)
    );
    Case {
        name,
        parts: vec![raw.into_bytes()],
        pause: Duration::ZERO,
        want,
        reaches_runtime,
    }
}

const HOST: &str = "abc123.agent.localhost";
const CHAT: &str = r#"{"messages":[{"role":"user","content":"Hello"}]}"#;

/// A request with `head_lines` (each ending in CRLF) and `body` (with its Content-Length).
fn post(path: &str, head_lines: &str, body: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nHost: {HOST}\r\n{head_lines}Content-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// A chunked request with `chunks` given raw (sizes and data as the attacker wrote them).
fn chunked(auth: &str, chunks: &str) -> String {
    format!(
        "POST /v1/chat HTTP/1.1\r\nHost: {HOST}\r\n{auth}Content-Type: application/json\r\n\
         Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n{chunks}"
    )
}

fn get(path: &str, head_lines: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: {HOST}\r\n{head_lines}Connection: close\r\n\r\n")
}

/// Framing and smuggling: Content-Length and Transfer-Encoding variants, obs-fold, chunk sizes
/// and extensions, broken request lines.
fn framing(auth: &str) -> Vec<Case> {
    let b = CHAT;
    let n = b.len();
    let te = |v: &str| {
        format!(
            "POST /v1/chat HTTP/1.1\r\nHost: {HOST}\r\n{auth}Content-Type: application/json\r\n\
             Transfer-Encoding: {v}\r\nConnection: close\r\n\r\n{n:x}\r\n{b}\r\n0\r\n\r\n"
        )
    };
    let cl = |v: &str| {
        format!(
            "POST /v1/chat HTTP/1.1\r\nHost: {HOST}\r\n{auth}Content-Type: application/json\r\n\
             Content-Length: {v}\r\nConnection: close\r\n\r\n{b}"
        )
    };
    vec![
        // Pingora reads it by Transfer-Encoding alone and ends the connection after the
        // answer (RFC 9112 §6.3): what follows on the connection is never read as a request.
        case(
            "cl-and-te",
            format!(
                "POST /v1/chat HTTP/1.1\r\nHost: {HOST}\r\n{auth}Content-Length: {n}\r\n\
                 Transfer-Encoding: chunked\r\n\r\n{n:x}\r\n{b}\r\n0\r\n\r\n\
                 GET /v1/models HTTP/1.1\r\nHost: {HOST}\r\n{auth}\r\n"
            ),
            Want::ServedAlone,
        ),
        case(
            "two-content-lengths",
            cl(&format!("{n}\r\nContent-Length: {}", n + 1)),
            Want::Error(400, "invalid_request"),
        ),
        case(
            "two-equal-content-lengths",
            cl(&format!("{n}\r\nContent-Length: {n}")),
            Want::Error(400, "invalid_request"),
        ),
        case(
            "content-length-list",
            cl(&format!("{n}, {n}")),
            Want::Error(400, "invalid_request"),
        ),
        case(
            "content-length-negative",
            cl("-1"),
            Want::Error(400, "invalid_request"),
        ),
        case(
            "content-length-plus",
            cl(&format!("+{n}")),
            Want::Error(400, "invalid_request"),
        ),
        case(
            "content-length-past-u64",
            cl("99999999999999999999999"),
            Want::Error(400, "invalid_request"),
        ),
        case("te-chunked-uppercase", te("CHUNKED"), Want::Served),
        case(
            "te-gzip-then-chunked",
            te("gzip, chunked"),
            Want::Error(400, "invalid_request"),
        ),
        case(
            "te-xchunked",
            te("xchunked"),
            Want::Error(400, "invalid_request"),
        ),
        case(
            "te-identity",
            te("identity"),
            Want::Error(400, "invalid_request"),
        ),
        case(
            "te-space-before-colon",
            format!(
                "POST /v1/chat HTTP/1.1\r\nHost: {HOST}\r\n{auth}Transfer-Encoding : chunked\r\n\
                 Connection: close\r\n\r\n{n:x}\r\n{b}\r\n0\r\n\r\n"
            ),
            Want::Error(400, "invalid_request"),
        ),
        case(
            "te-obs-fold",
            format!(
                "POST /v1/chat HTTP/1.1\r\nHost: {HOST}\r\n{auth}Transfer-Encoding:\r\n chunked\r\n\
                 Connection: close\r\n\r\n{n:x}\r\n{b}\r\n0\r\n\r\n"
            ),
            Want::Error(400, "invalid_request"),
        ),
        case(
            "obs-fold-in-a-header",
            get("/v1/models", &format!("{auth}X-Folded: a\r\n b\r\n")),
            Want::Error(400, "invalid_request"),
        ),
        case(
            "chunk-size-past-64-bits",
            chunked(auth, "ffffffffffffffffffff\r\nhello\r\n0\r\n\r\n"),
            Want::Error(400, "invalid_request"),
        ),
        case(
            "chunk-size-negative",
            chunked(auth, "-1\r\nhello\r\n0\r\n\r\n"),
            Want::Error(400, "invalid_request"),
        ),
        case(
            "chunk-size-not-hex",
            chunked(auth, "zz\r\nhello\r\n0\r\n\r\n"),
            Want::Error(400, "invalid_request"),
        ),
        case(
            "chunk-size-0x-prefix",
            chunked(auth, "0x5\r\nhello\r\n0\r\n\r\n"),
            Want::Error(400, "invalid_request"),
        ),
        case(
            "chunk-extension",
            chunked(auth, &format!("{n:x};name=value\r\n{b}\r\n0\r\n\r\n")),
            Want::Served,
        ),
        case(
            "chunk-size-leading-zeros",
            chunked(auth, &format!("000{n:x}\r\n{b}\r\n0\r\n\r\n")),
            Want::Served,
        ),
        case(
            "chunk-data-longer-than-its-size",
            chunked(auth, &format!("2\r\n{b}\r\n0\r\n\r\n")),
            Want::Error(400, "invalid_request"),
        ),
        case(
            "chunk-extension-of-64-kib",
            chunked(
                auth,
                &format!("{n:x};x={}\r\n{b}\r\n0\r\n\r\n", "a".repeat(64 * 1024)),
            ),
            Want::Error(400, "invalid_request"),
        ),
        case(
            "bare-lf-line-endings",
            format!(
                "GET /v1/models HTTP/1.1\nHost: {HOST}\n{}Connection: close\n\n",
                auth.replace("\r\n", "\n")
            ),
            Want::Served,
        ),
        case(
            "garbage-request-line",
            "GARBAGE\r\n\r\n".into(),
            Want::Error(400, "invalid_request"),
        ),
        case(
            "http-0-9",
            "GET /v1/models\r\n\r\n".into(),
            Want::Error(400, "invalid_request"),
        ),
        case(
            "unknown-http-version",
            format!("GET /v1/models HTTP/1.7\r\nHost: {HOST}\r\n{auth}Connection: close\r\n\r\n"),
            Want::Error(400, "invalid_request"),
        ),
        case(
            "nul-in-a-header-value",
            get("/v1/models", &format!("{auth}X-Nul: a\0b\r\n")),
            Want::Error(400, "invalid_request"),
        ),
        case(
            "space-in-a-header-name",
            get("/v1/models", &format!("{auth}X Bad: a\r\n")),
            Want::Error(400, "invalid_request"),
        ),
    ]
}

/// Sizes: header count and size, path, body, Content-Length against the limit.
fn sizes(auth: &str) -> Vec<Case> {
    let many = |n: usize| (0..n).map(|i| format!("X-H{i}: v\r\n")).collect::<String>();
    vec![
        case(
            "300-headers",
            get("/v1/models", &format!("{auth}{}", many(300))),
            Want::Error(400, "invalid_request"),
        ),
        case(
            "90-headers",
            get("/v1/models", &format!("{auth}{}", many(90))),
            Want::Served,
        ),
        case(
            "a-64-kib-header-value",
            get(
                "/v1/models",
                &format!("{auth}X-Big: {}\r\n", "a".repeat(64 * 1024)),
            ),
            Want::Served,
        ),
        case(
            "a-head-over-1-mib",
            get(
                "/v1/models",
                &format!("{auth}X-Huge: {}\r\n", "a".repeat(1100 * 1024)),
            ),
            Want::Error(400, "invalid_request"),
        ),
        case(
            "a-100-kib-path",
            get(&format!("/v1/{}", "a".repeat(100 * 1024)), auth),
            Want::Error(400, "invalid_request"),
        ),
        case(
            "declared-body-over-the-limit",
            format!(
                "POST /v1/chat HTTP/1.1\r\nHost: {HOST}\r\n{auth}Content-Type: application/json\r\n\
                 Content-Length: 2000000\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n"
            ),
            Want::Error(413, "request_too_large"),
        ),
        case(
            "chunked-body-over-the-limit",
            chunked(
                auth,
                &format!("{:x}\r\n{}\r\n0\r\n\r\n", 1_100_000, "a".repeat(1_100_000)),
            ),
            Want::Error(413, "request_too_large"),
        ),
        case(
            "empty-body",
            post("/v1/chat", auth, ""),
            Want::Error(400, "invalid_request"),
        ),
    ]
}

/// Slow clients: a header, a body, and nothing at all (one that stops reading an answer is
/// `http_rules.rs`'s `a_client_that_stops_reading_is_given_up_on`).
fn slow(auth: &str) -> Vec<Case> {
    let trickle: Vec<Vec<u8>> =
        std::iter::once(format!("GET /v1/models HTTP/1.1\r\nHost: {HOST}\r\n"))
            .chain((0..8).map(|i| format!("X-Slow-{i}: 1\r\n")))
            .map(String::into_bytes)
            .collect();
    vec![
        Case {
            name: "header-one-line-every-half-second",
            parts: trickle,
            pause: Duration::from_millis(500),
            want: Want::Error(408, "request_timeout"),
            reaches_runtime: false,
        },
        Case {
            name: "body-that-stalls",
            parts: vec![format!(
                "POST /v1/chat HTTP/1.1\r\nHost: {HOST}\r\n{auth}Content-Type: application/json\r\n\
                 Content-Length: 100\r\n\r\n{{\"messages\""
            )
            .into_bytes()],
            pause: Duration::ZERO,
            want: Want::Error(408, "request_timeout"),
            reaches_runtime: false,
        },
        Case {
            name: "connection-that-sends-nothing",
            parts: vec![Vec::new()],
            pause: Duration::ZERO,
            want: Want::Closed,
            reaches_runtime: false,
        },
    ]
}

/// Bodies: encodings, nesting, numbers, duplicates, types, sizes.
fn bodies(auth: &str) -> Vec<Case> {
    let openai = |body: &str| post("/v1/chat/completions", auth, body);
    let native = |body: &str| post("/v1/chat", auth, body);
    let bad = Want::Error(400, "invalid_request");
    let mut invalid_utf8 = post(
        "/v1/chat",
        auth,
        r#"{"messages":[{"role":"user","content":"AB"}]}"#,
    )
    .into_bytes();
    let at = invalid_utf8.len() - 5;
    invalid_utf8[at] = 0xff;
    vec![
        Case {
            name: "invalid-utf8",
            parts: vec![invalid_utf8],
            pause: Duration::ZERO,
            want: bad.clone(),
            reaches_runtime: false,
        },
        case(
            "nested-100k-deep",
            native(&"[".repeat(100_000)),
            bad.clone(),
        ),
        case(
            "number-past-f64",
            native(r#"{"messages":[{"role":"user","content":"x"}],"temperature":1e400}"#),
            bad.clone(),
        ),
        case(
            "nan",
            native(r#"{"messages":[{"role":"user","content":"x"}],"temperature":NaN}"#),
            bad.clone(),
        ),
        case(
            "duplicate-keys",
            native(r#"{"messages":[{"role":"user","content":"x"}],"messages":[]}"#),
            bad.clone(),
        ),
        case(
            "messages-a-string",
            native(r#"{"messages":"hello"}"#),
            bad.clone(),
        ),
        case("messages-missing", native("{}"), bad.clone()),
        case("top-level-array", native("[1,2,3]"), bad.clone()),
        case(
            "stream-a-string",
            native(r#"{"messages":[{"role":"user","content":"x"}],"stream":"yes"}"#),
            bad.clone(),
        ),
        case(
            "max-tokens-zero",
            openai(r#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":0}"#),
            bad.clone(),
        ),
        case(
            "max-tokens-a-trillion",
            openai(
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":1000000000000}"#,
            ),
            bad.clone(),
        ),
        case(
            "timeout-seconds-negative",
            native(r#"{"messages":[{"role":"user","content":"x"}],"timeout_seconds":-1}"#),
            bad.clone(),
        ),
        case(
            "openai-messages-an-object",
            openai(r#"{"model":"m","messages":{"role":"user"}}"#),
            bad.clone(),
        ),
        case(
            "20k-messages",
            native(&format!(
                r#"{{"messages":[{}]}}"#,
                vec![r#"{"role":"user","content":"a"}"#; 20_000].join(",")
            )),
            Want::Served,
        ),
        case(
            "a-900-kib-string",
            native(&format!(
                r#"{{"messages":[{{"role":"user","content":"{}"}}]}}"#,
                "a".repeat(900 * 1024)
            )),
            Want::Served,
        ),
    ]
}

/// Routing and Host.
fn routing(auth: &str) -> Vec<Case> {
    let with_host = |host: &str, path: &str| {
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n{auth}Connection: close\r\n\r\n")
    };
    let method = |m: &str| {
        format!("{m} /v1/models HTTP/1.1\r\nHost: {HOST}\r\n{auth}Connection: close\r\n\r\n")
    };
    vec![
        case(
            "unknown-agent",
            with_host("nobody.agent.localhost", "/v1/models"),
            Want::Error(404, "not_found"),
        ),
        case(
            "host-in-capitals",
            with_host("ABC123.AGENT.LOCALHOST", "/v1/models"),
            Want::Served,
        ),
        case(
            "host-with-a-port",
            with_host("abc123.agent.localhost:8080", "/v1/models"),
            Want::Served,
        ),
        case(
            "absolute-form-naming-another-host",
            format!(
                "GET http://nobody.agent.localhost/v1/models HTTP/1.1\r\nHost: {HOST}\r\n{auth}\
                 Connection: close\r\n\r\n"
            ),
            Want::Error(400, "invalid_request"),
        ),
        case(
            "dot-segments",
            get("/v1/../v1/models", auth),
            Want::Error(404, "not_found"),
        ),
        case(
            "percent-encoded-path",
            get("/v1/%6dodels", auth),
            Want::Error(404, "not_found"),
        ),
        case(
            "double-slash",
            get("//v1/models", auth),
            Want::Error(404, "not_found"),
        ),
        case(
            "unknown-method",
            method("FROB"),
            Want::Error(405, "method_not_allowed"),
        ),
        case(
            "trace",
            method("TRACE"),
            Want::Error(405, "method_not_allowed"),
        ),
        case(
            "connect",
            format!("CONNECT {HOST}:443 HTTP/1.1\r\nHost: {HOST}:443\r\n\r\n"),
            Want::Error(405, "method_not_allowed"),
        ),
        case(
            "paused-agent",
            with_host("paused1.agent.localhost", "/v1/models"),
            Want::Error(503, "agent_paused"),
        ),
    ]
}

/// Credentials: scheme casing, duplicates, place, whitespace, scope, size.
fn credentials(key: &str, other_key: &str) -> Vec<Case> {
    let models = |auth: &str| get("/v1/models", auth);
    let refused = Want::Error(401, "invalid_api_key");
    vec![
        case(
            "scheme-in-lower-case",
            models(&format!("Authorization: bearer {key}\r\n")),
            Want::Served,
        ),
        case(
            "no-scheme",
            models(&format!("Authorization: {key}\r\n")),
            refused.clone(),
        ),
        case(
            "key-in-the-query-string",
            get(&format!("/v1/models?api_key={key}"), ""),
            refused.clone(),
        ),
        case(
            "trailing-whitespace",
            models(&format!("Authorization: Bearer {key}   \r\n")),
            Want::Served,
        ),
        case(
            "two-spaces-after-the-scheme",
            models(&format!("Authorization: Bearer  {key}\r\n")),
            Want::Served,
        ),
        case(
            "key-of-another-agent",
            models(&format!("Authorization: Bearer {other_key}\r\n")),
            refused.clone(),
        ),
        case(
            "a-10-kib-key",
            models(&format!(
                "Authorization: Bearer molt_{}\r\n",
                "a".repeat(10 * 1024)
            )),
            refused.clone(),
        ),
        case(
            "basic-auth",
            models("Authorization: Basic dXNlcjpwYXNz\r\n"),
            refused.clone(),
        ),
        case(
            "empty-bearer",
            models("Authorization: Bearer \r\n"),
            refused.clone(),
        ),
        case("no-credentials", models(""), refused.clone()),
        case(
            "key-with-one-character-changed",
            models(&format!(
                "Authorization: Bearer {}{}\r\n",
                &key[..key.len() - 1],
                // Another character than the key's own last one (a key ending in `x` made
                // this case send the key itself, one run in ~60).
                if key.ends_with('x') { 'y' } else { 'x' }
            )),
            refused,
        ),
        case(
            "two-authorization-headers",
            models(&format!(
                "Authorization: Bearer {key}\r\nAuthorization: Bearer {key}\r\n"
            )),
            Want::Error(400, "invalid_request"),
        ),
    ]
}

/// Upgrades the edge must not honour.
fn upgrades(auth: &str) -> Vec<Case> {
    vec![
        case(
            "h2c-upgrade",
            get(
                "/v1/models",
                &format!(
                    "{auth}Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\nConnection: Upgrade, HTTP2-Settings\r\n"
                ),
            ),
            Want::Served,
        ),
        case(
            "websocket-upgrade-on-chat",
            format!(
                "GET /v1/chat HTTP/1.1\r\nHost: {HOST}\r\n{auth}Upgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ),
            Want::Error(405, "method_not_allowed"),
        ),
        case(
            "ws-without-upgrade-headers",
            get("/ws", auth),
            Want::Error(400, "invalid_request"),
        ),
        case(
            "ws-with-a-wrong-version",
            format!(
                "GET /ws HTTP/1.1\r\nHost: {HOST}\r\n{auth}Upgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\nConnection: close\r\n\r\n"
            ),
            Want::Error(400, "invalid_request"),
        ),
        case(
            "h2-preface-on-the-plain-port",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".into(),
            Want::Error(400, "invalid_request"),
        ),
    ]
}

/// The runtime misbehaving, through an agent whose upstream is [`BadRuntime`].
fn runtime(auth: &str) -> Vec<Case> {
    let on = |bad: &str, path: &str, body: &str| {
        format!(
            "POST {path} HTTP/1.1\r\nHost: hostile1.agent.localhost\r\n{auth}x-bad: {bad}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    };
    let streamed = r#"{"messages":[{"role":"user","content":"Hello"}],"stream":true}"#;
    let openai_stream =
        r#"{"model":"m","messages":[{"role":"user","content":"Hello"}],"stream":true}"#;
    let reaching = |name, raw, want| Case {
        reaches_runtime: true,
        ..case(name, raw, want)
    };
    vec![
        reaching(
            "runtime-5xx",
            on("status-500", "/v1/chat", CHAT),
            Want::Error(502, "upstream_unavailable"),
        ),
        reaching(
            "runtime-4xx",
            on("status-400", "/v1/chat", CHAT),
            Want::Error(400, "invalid_request"),
        ),
        reaching(
            "runtime-head-then-close",
            on("head-then-close", "/v1/chat", CHAT),
            Want::Error(502, "upstream_unavailable"),
        ),
        reaching(
            "runtime-not-http",
            on("garbage", "/v1/chat", CHAT),
            Want::Error(502, "upstream_unavailable"),
        ),
        reaching(
            "runtime-silent-past-timeout-seconds",
            on(
                "silent",
                "/v1/chat",
                r#"{"messages":[{"role":"user","content":"x"}],"timeout_seconds":1}"#,
            ),
            Want::Error(504, "timeout"),
        ),
        reaching(
            "runtime-sse-line-of-2-mib",
            on("huge-sse-line", "/v1/chat", streamed),
            Want::StreamError("upstream_unavailable"),
        ),
        reaching(
            "runtime-invalid-json-events",
            on("invalid-events", "/v1/chat", streamed),
            Want::Served,
        ),
        reaching(
            "runtime-stream-without-usage",
            on("no-usage-stream", "/v1/chat/completions", openai_stream),
            Want::Served,
        ),
        reaching(
            "runtime-answer-of-50-mib",
            on(
                "huge-answer",
                "/v1/chat/completions",
                r#"{"model":"m","messages":[{"role":"user","content":"x"}]}"#,
            ),
            Want::Served,
        ),
        reaching(
            "runtime-stream-cut-mid-way",
            on("cut-stream", "/v1/chat", streamed),
            Want::StreamError("upstream_unavailable"),
        ),
    ]
}

/// A runtime that misbehaves as each request's `x-bad` header asks; it records every head it
/// receives.
struct BadRuntime {
    port: u16,
    heads: Arc<Mutex<Vec<String>>>,
    requests: Arc<AtomicU64>,
}

impl BadRuntime {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let requests = Arc::new(AtomicU64::new(0));
        let (h, r) = (heads.clone(), requests.clone());
        tokio::spawn(async move {
            loop {
                let Ok((conn, _)) = listener.accept().await else {
                    return;
                };
                let (h, r) = (h.clone(), r.clone());
                tokio::spawn(async move {
                    let _ = Self::serve(conn, h, r).await;
                });
            }
        });
        Self {
            port,
            heads,
            requests,
        }
    }

    async fn serve(
        mut conn: TcpStream,
        heads: Arc<Mutex<Vec<String>>>,
        requests: Arc<AtomicU64>,
    ) -> std::io::Result<()> {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 8192];
        let end = loop {
            let n = conn.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        while buf.len() < end + length {
            let n = conn.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        requests.fetch_add(1, Ordering::Relaxed);
        let bad = head
            .lines()
            .find_map(|l| l.strip_prefix("x-bad:"))
            .map(|v| v.trim().to_owned())
            .unwrap_or_default();
        heads.lock().unwrap().push(head);
        let chunk_of = |content: &str| {
            format!(
                "data: {{\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{content}\"}},\"finish_reason\":null}}]}}\n\n"
            )
        };
        let finish = "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n";
        let sse_head =
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n";
        match bad.as_str() {
            "status-500" => {
                let body = r#"{"error":{"message":"boom","type":"server_error"}}"#;
                conn.write_all(format!("HTTP/1.1 500 Internal Server Error\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len()).as_bytes()).await?;
            }
            "status-400" => {
                let body =
                    r#"{"error":{"message":"no such model","type":"invalid_request_error"}}"#;
                conn.write_all(format!("HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len()).as_bytes()).await?;
            }
            "head-then-close" => {
                conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{\"id\":").await?;
            }
            "garbage" => conn.write_all(b"NOT HTTP AT ALL\r\n\r\n").await?,
            "silent" => tokio::time::sleep(Duration::from_secs(30)).await,
            "huge-sse-line" => {
                conn.write_all(sse_head.as_bytes()).await?;
                conn.write_all(chunk_of("Hi").as_bytes()).await?;
                conn.write_all(b"data: ").await?;
                conn.write_all(&vec![b'a'; 2 * 1024 * 1024]).await?;
            }
            "invalid-events" => {
                conn.write_all(sse_head.as_bytes()).await?;
                let body = format!(
                    "data: {{nope\n\n{}data: [1,2\n\n{finish}data: [DONE]\n\n",
                    chunk_of("Hi")
                );
                conn.write_all(body.as_bytes()).await?;
            }
            "no-usage-stream" => {
                conn.write_all(sse_head.as_bytes()).await?;
                let body = format!(
                    "{}{}{finish}data: [DONE]\n\n",
                    chunk_of("Hi"),
                    chunk_of(" there")
                );
                conn.write_all(body.as_bytes()).await?;
            }
            "cut-stream" => {
                conn.write_all(sse_head.as_bytes()).await?;
                conn.write_all(format!("{}{}", chunk_of("Hi"), chunk_of(" there")).as_bytes())
                    .await?;
            }
            "huge-answer" => {
                let content = "a".repeat(50 * 1024 * 1024);
                let body = format!(
                    "{{\"id\":\"c1\",\"object\":\"chat.completion\",\"choices\":[{{\"index\":0,\"message\":{{\"role\":\"assistant\",\"content\":\"{content}\"}},\"finish_reason\":\"stop\"}}]}}"
                );
                conn.write_all(format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n", body.len()).as_bytes()).await?;
                conn.write_all(body.as_bytes()).await?;
            }
            _ => {
                let body = r#"{"id":"c1","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"fine"},"finish_reason":"stop"}],"usage":{"prompt_tokens":2,"completion_tokens":1,"total_tokens":3}}"#;
                conn.write_all(format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len()).as_bytes()).await?;
            }
        }
        conn.shutdown().await
    }
}

/// Runs `cases`, returning the failures (name: why).
async fn run(s: &Stack, bad: &BadRuntime, cases: Vec<Case>) -> Vec<String> {
    let mut failures = Vec::new();
    for c in cases {
        let before =
            s.stats.requests.load(Ordering::Relaxed) + bad.requests.load(Ordering::Relaxed);
        let got = exchange(s.port, &c.parts, c.pause).await;
        let after = s.stats.requests.load(Ordering::Relaxed) + bad.requests.load(Ordering::Relaxed);
        let outcome = got.and_then(|raw| Answer::parse(&raw).check(&c.want));
        if let Err(why) = outcome {
            failures.push(format!("{}: want {:?}; {why}", c.name, c.want));
        } else if !c.reaches_runtime && after != before {
            failures.push(format!("{}: refused, yet the runtime saw it", c.name));
        }
    }
    failures
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hostile_catalog() {
    let bad = BadRuntime::start().await;
    let s = Stack::start(&format!(
        "[limits]\nheader_timeout = \"2s\"\nbody_timeout = \"2s\"\nkeepalive_idle = \"2s\"\n\
         send_timeout = \"2s\"\nmax_body_bytes = 1048576\nwebsocket_ping_interval = \"1s\"\n\
         [[agents]]\nid = \"hostile1\"\nupstream = \"http://127.0.0.1:{}\"\n",
        bad.port
    ))
    .await;
    let other = s
        .admin_post(
            "/v1/admin/keys",
            serde_json::json!({"name": "other", "account": "default", "agents": ["paused1"]}),
        )
        .await;
    let other_key = other["key"].as_str().unwrap().to_owned();
    let auth = format!("Authorization: Bearer {}\r\n", s.key);

    let mut cases = Vec::new();
    cases.extend(framing(&auth));
    cases.extend(sizes(&auth));
    cases.extend(slow(&auth));
    cases.extend(bodies(&auth));
    cases.extend(routing(&auth));
    cases.extend(credentials(&s.key, &other_key));
    cases.extend(upgrades(&auth));
    cases.extend(runtime(&auth));
    let http_cases = cases.len();
    let mut failures = run(&s, &bad, cases).await;

    // Headers the edge owns never reach the runtime as the client sent them, nor does the key.
    bad.heads.lock().unwrap().clear();
    let forged = exchange(
        s.port,
        &[format!(
            "POST /v1/chat HTTP/1.1\r\nHost: hostile1.agent.localhost\r\n{auth}\
             X-Moltghost-Identity: forged\r\nX-Moltghost-Account: acct_forged\r\nX-Forwarded-For: 6.6.6.6\r\n\
             X-Request-Id: bad id\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{CHAT}",
            CHAT.len()
        )
        .into_bytes()],
        Duration::ZERO,
    )
    .await
    .unwrap();
    let forged = Answer::parse(&forged);
    let seen = bad.heads.lock().unwrap().join("\n");
    for (what, ok) in [
        ("served", forged.status == Some(200)),
        ("no forged identity", !seen.contains("forged")),
        (
            "no key",
            !seen.contains(&s.key.to_ascii_lowercase()) && !seen.contains("authorization"),
        ),
        (
            "the real client address last",
            seen.contains("x-forwarded-for: 6.6.6.6, 127.0.0.1"),
        ),
        (
            "a fresh request id",
            !forged.head.contains("x-request-id: bad"),
        ),
    ] {
        if !ok {
            failures.push(format!(
                "internal headers: {what}; runtime saw {seen:?}; answer {forged:?}"
            ));
        }
    }

    failures.extend(websocket_cases(&s).await);
    failures.extend(admin_cases(&s).await);

    // The edge is alive and serving after all of it.
    let alive = exchange(
        s.port,
        &[get("/v1/models", &auth).into_bytes()],
        Duration::ZERO,
    )
    .await
    .map(|raw| Answer::parse(&raw).status);
    assert_eq!(
        alive,
        Ok(Some(200)),
        "the edge after the catalog:\n{}",
        s.log()
    );
    let total = http_cases + 1 + WS_CASES + ADMIN_CASES;
    assert!(total >= 80, "the catalog has {total} cases");
    assert!(
        failures.is_empty(),
        "{} of {total} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

const WS_CASES: usize = 7;

/// A WebSocket opened raw, then `frames` sent; the close code the edge ends with (or the
/// answer, for the flood case).
async fn websocket_cases(s: &Stack) -> Vec<String> {
    let mask = |payload: &[u8], opcode: u8, fin: bool, masked: bool| {
        let mut f = vec![(if fin { 0x80 } else { 0 }) | opcode];
        let len = payload.len();
        let m = if masked { 0x80 } else { 0 };
        if len < 126 {
            f.push(m | len as u8);
        } else if len < 65536 {
            f.push(m | 126);
            f.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            f.push(m | 127);
            f.extend_from_slice(&(len as u64).to_be_bytes());
        }
        if masked {
            let key = [1u8, 2, 3, 4];
            f.extend_from_slice(&key);
            f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        } else {
            f.extend_from_slice(payload);
        }
        f
    };
    let message = br#"{"action":"message","messages":[{"role":"user","content":"Hi"}]}"#;
    let mut flood = Vec::new();
    for _ in 0..5000 {
        flood.extend(mask(b"p", 0x9, true, true));
    }
    flood.extend(mask(message, 0x1, true, true));
    let cases: Vec<(&str, Vec<u8>, Result<u16, &str>)> = vec![
        (
            "ws-unmasked-frame",
            mask(message, 0x1, true, false),
            Ok(1002),
        ),
        (
            "ws-message-over-the-limit",
            mask(&vec![b'a'; 1_100_000], 0x1, true, true),
            Ok(1009),
        ),
        (
            "ws-invalid-utf8",
            mask(b"\xff\xfe", 0x1, true, true),
            Ok(1007),
        ),
        ("ws-reserved-opcode", mask(b"x", 0x3, true, true), Ok(1002)),
        (
            "ws-fragment-never-finished",
            mask(b"{\"action\"", 0x1, false, true),
            Ok(1001),
        ),
        (
            "ws-not-json",
            mask(b"hello", 0x1, true, true),
            Err("invalid_request"),
        ),
        ("ws-ping-flood-then-a-message", flood, Err("\"done\":true")),
    ];
    assert_eq!(cases.len(), WS_CASES);
    let mut failures = Vec::new();
    for (name, frames, want) in cases {
        let mut conn = TcpStream::connect(("127.0.0.1", s.port)).await.unwrap();
        conn.write_all(
            format!(
                "GET /ws HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Bearer {}\r\nUpgrade: websocket\r\n\
                 Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
                s.key
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        let _ = conn.write_all(&frames).await;
        let mut got = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        let _ = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match conn.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        got.extend_from_slice(&buf[..n]);
                        if let Err(text) = want {
                            if String::from_utf8_lossy(&got).contains(text) {
                                return;
                            }
                        }
                    }
                }
            }
        })
        .await;
        let text = String::from_utf8_lossy(&got);
        let ok = match want {
            Ok(code) => close_code(&got) == Some(code),
            Err(needle) => text.contains(needle),
        };
        if !ok || !text.starts_with("HTTP/1.1 101") {
            failures.push(format!(
                "{name}: want {want:?}; close code {:?}, got {:?}",
                close_code(&got),
                &text[..text.len().min(300)]
            ));
        }
    }
    failures
}

/// The code of the last close frame the server sent in `raw` (after the 101 head).
fn close_code(raw: &[u8]) -> Option<u16> {
    let start = raw.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let mut i = start;
    let mut code = None;
    while i + 2 <= raw.len() {
        let opcode = raw[i] & 0x0f;
        let mut len = (raw[i + 1] & 0x7f) as usize;
        let mut at = i + 2;
        if len == 126 {
            len = u16::from_be_bytes([*raw.get(at)?, *raw.get(at + 1)?]) as usize;
            at += 2;
        } else if len == 127 {
            len = u64::from_be_bytes(raw.get(at..at + 8)?.try_into().ok()?) as usize;
            at += 8;
        }
        if opcode == 0x8 && len >= 2 {
            code = Some(u16::from_be_bytes([*raw.get(at)?, *raw.get(at + 1)?]));
        }
        i = at + len;
    }
    code
}

const ADMIN_CASES: usize = 7;

/// Admin API tokens: none, `alg: none`, a wrong secret, expired, the wrong scope, garbage, and
/// a good one.
async fn admin_cases(s: &Stack) -> Vec<String> {
    use base64::Engine;
    let b64 = |v: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
    let exp = moltghost::store::now() + 3600;
    let alg_none = format!(
        "{}.{}.",
        b64(r#"{"alg":"none","typ":"JWT"}"#),
        b64(&format!(r#"{{"sub":"x","exp":{exp},"scope":"write"}}"#))
    );
    let mint = |secret: &str, scope: &str, ttl: i64| {
        moltghost::admin::mint_token(secret, "tests", scope, ttl).unwrap()
    };
    let cases: Vec<(&str, Option<String>, u16)> = vec![
        ("admin-no-token", None, 401),
        ("admin-alg-none", Some(alg_none), 401),
        (
            "admin-wrong-secret",
            Some(mint("another-secret-0123456789abcdef", "write", 3600)),
            401,
        ),
        (
            "admin-expired",
            Some(mint(common::ADMIN_SECRET, "write", -120)),
            401,
        ),
        (
            "admin-read-scope-writing",
            Some(mint(common::ADMIN_SECRET, "read", 3600)),
            403,
        ),
        ("admin-garbage", Some("a.b.c".into()), 401),
        (
            "admin-good-token",
            Some(mint(common::ADMIN_SECRET, "write", 3600)),
            201,
        ),
    ];
    assert_eq!(cases.len(), ADMIN_CASES);
    let client = reqwest::Client::new();
    let mut failures = Vec::new();
    for (name, token, want) in cases {
        let mut req = client
            .post(format!("{}/v1/admin/keys", s.admin_url()))
            .json(&serde_json::json!({"name": name, "account": "default"}));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        let body: Value = r.json().await.unwrap_or(Value::Null);
        let json_ok = want == 201 || body["error"]["code"].is_string();
        if status != want || !json_ok {
            failures.push(format!("{name}: want {want}; got {status} {body}"));
        }
    }
    failures
}
