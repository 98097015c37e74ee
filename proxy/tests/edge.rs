//! The core edge end to end: the real binary, the reference runtime, and real clients.

mod common;

use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::{run, sse_data, Stack};
use futures_util::StreamExt;
use serde_json::{json, Value};

const HELLO: &str =
    r#"{"messages": [{"role": "user", "content": "Hello, agent!"}], "stream": false}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spec_curl_examples_work_as_printed() {
    let s = Stack::start("").await;
    let url = s.url("abc123", "/v1/chat");
    let auth = format!("Authorization: Bearer {}", s.key);
    // "Test Connection"
    let (code, out, err) = run(Command::new("curl").args([
        "-sS",
        "-X",
        "POST",
        &url,
        "-H",
        &auth,
        "-H",
        "Content-Type: application/json",
        "-d",
        HELLO,
    ]));
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert!(
        v["content"]
            .as_str()
            .unwrap()
            .starts_with("Hello! I'm ready to help"),
        "{v}"
    );
    assert_eq!(v["model"], "llama3.1-70b");
    assert!(v["id"].as_str().unwrap().starts_with("msg_"));
    assert_eq!(v["finish_reason"], "stop");
    // The quick start's `usage.tokens` and the full format's fields, both.
    assert_eq!(v["usage"]["tokens"], v["usage"]["total_tokens"]);
    assert_eq!(
        v["usage"]["total_tokens"],
        v["usage"]["prompt_tokens"].as_u64().unwrap() + 16
    );

    // "Streaming response (SSE)" with --no-buffer.
    let (code, out, err) = run(Command::new("curl").args([
        "-sS",
        "-X",
        "POST",
        &url,
        "-H",
        &auth,
        "-d",
        r#"{"messages": [{"role": "user", "content": "..."}], "stream": true}"#,
        "--no-buffer",
    ]));
    assert_eq!(code, 0, "{err}");
    let data = sse_data(&out);
    assert_eq!(data.last().unwrap(), "[DONE]");
    let events: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let text: String = events
        .iter()
        .filter_map(|e| e["content"].as_str())
        .collect();
    assert!(text.starts_with("Hello! I'm ready to help"), "{text}");
    let last = events.last().unwrap();
    assert_eq!(last["done"], true);
    assert_eq!(last["usage"]["completion_tokens"], 16);
    assert!(events[..events.len() - 1]
        .iter()
        .all(|e| e["done"] == false));
}

/// Arrival time of each `content` event of a native stream.
async fn token_arrivals(resp: reqwest::Response) -> Vec<Duration> {
    let start = Instant::now();
    let mut arrivals = Vec::new();
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.unwrap();
        let n = String::from_utf8_lossy(&chunk)
            .matches("\"content\"")
            .count();
        arrivals.extend(std::iter::repeat_n(start.elapsed(), n));
    }
    arrivals
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_tokens_arrive_as_the_runtime_sends_them() {
    let s = Stack::start("").await;
    for (path, body) in [
        (
            "/v1/chat",
            json!({"messages": [{"role": "user", "content": "hi"}], "stream": true}),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "hi"}], "stream": true}),
        ),
    ] {
        let resp = s
            .client()
            .post(s.url("abc123", path))
            .header("x-mock-interval-ms", "150")
            .header("x-mock-tokens", "6")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.headers()["content-type"], "text/event-stream");
        let t = token_arrivals(resp).await;
        assert!(t.len() >= 6, "{path}: {t:?}");
        // Each token is its own arrival, spaced by the runtime's interval: not bunched at the end.
        let gaps: Vec<_> = t
            .windows(2)
            .map(|w| w[1] - w[0])
            .filter(|g| *g > Duration::from_millis(75))
            .collect();
        assert!(gaps.len() >= 4, "{path}: tokens bunched: {t:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_cancels_the_upstream_request() {
    let s = Stack::start("").await;
    let resp = s
        .client()
        .post(s.url("abc123", "/v1/chat/completions"))
        .header("x-mock-interval-ms", "100")
        .header("x-mock-tokens", "100")
        .json(&json!({"messages": [{"role": "user", "content": "hi"}], "stream": true}))
        .send()
        .await
        .unwrap();
    let mut body = resp.bytes_stream();
    body.next().await.unwrap().unwrap();
    drop(body);
    let t0 = Instant::now();
    while s.stats.streams_cancelled.load(Ordering::Relaxed) == 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(3),
            "the runtime never saw the cancel"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    eprintln!("cancel reached the runtime in {:?}", t0.elapsed());
    assert_eq!(s.stats.streams_completed.load(Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_mib_bodies_pass_on_every_route_and_large_ones_get_413() {
    let s = Stack::start("").await;
    let c = s.client();
    let words = "word ".repeat(220_000); // 1.1 MB
    let content = &words[..1024 * 1024 - 100];
    for path in ["/v1/chat", "/v1/chat/completions"] {
        let resp = c
            .post(s.url("abc123", path))
            .header("expect", "100-continue")
            .json(&json!({"messages": [{"role": "user", "content": content}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{path}");
        let v: Value = resp.json().await.unwrap();
        let prompt = v["usage"]["prompt_tokens"].as_u64().unwrap();
        assert!(
            prompt > 200_000,
            "{path}: the runtime saw only {prompt} words"
        );
    }
    let big = "x".repeat(9 * 1024 * 1024);
    let resp = c
        .post(s.url("abc123", "/v1/chat"))
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "request_too_large");
}

/// Sends a request and checks the error answer's status, code, type and headers.
async fn expect_error(
    c: &reqwest::Client,
    req: reqwest::RequestBuilder,
    status: u16,
    code: &str,
    headers: &[(&str, &str)],
) -> Value {
    let _ = c;
    let resp = req.send().await.unwrap();
    assert_eq!(resp.status().as_u16(), status, "for {code}");
    assert!(
        resp.headers().contains_key("x-request-id"),
        "{code}: no x-request-id"
    );
    assert_eq!(resp.headers()["content-type"], "application/json", "{code}");
    for (k, v) in headers {
        assert_eq!(
            resp.headers().get(*k).map(|v| v.to_str().unwrap()),
            Some(*v),
            "{code}: header {k}"
        );
    }
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], code, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{v}"
    );
    assert!(v["error"]["type"].is_string(), "{v}");
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_of_the_table_is_json_with_its_headers() {
    let s = Stack::start("").await;
    let c = s.client();
    let chat = |agent: &str| c.post(s.url(agent, "/v1/chat")).body(HELLO);
    let v = expect_error(
        &c,
        chat("paused1"),
        503,
        "agent_paused",
        &[("retry-after", "60")],
    )
    .await;
    assert_eq!(
        v,
        json!({"error": {"message": "Agent is paused", "code": "agent_paused", "type": "service_unavailable"}})
    );
    expect_error(
        &c,
        chat("init1"),
        202,
        "agent_initializing",
        &[("retry-after", "60")],
    )
    .await;
    expect_error(
        &c,
        chat("gone1"),
        410,
        "agent_terminated",
        &[("x-should-retry", "false")],
    )
    .await;
    expect_error(&c, chat("down1"), 502, "upstream_unavailable", &[]).await;
    expect_error(&c, chat("nosuch"), 404, "not_found", &[]).await;
    expect_error(
        &c,
        c.post(s.url("abc123", "/v2/nothing")),
        404,
        "not_found",
        &[],
    )
    .await;
    expect_error(
        &c,
        c.get(s.url("abc123", "/v1/chat")),
        405,
        "method_not_allowed",
        &[("allow", "POST")],
    )
    .await;
    expect_error(
        &c,
        c.post(s.url("abc123", "/v1/chat")).body("{not json"),
        400,
        "invalid_request",
        &[],
    )
    .await;
    expect_error(
        &c,
        c.post(s.url("abc123", "/v1/chat/completions"))
            .body("[1,2]"),
        400,
        "invalid_request",
        &[],
    )
    .await;
    let v = expect_error(
        &c,
        c.post(s.url("abc123", "/v1/chat"))
            .body(r#"{"messages":[{"role":"user","content":"x"}],"temperature":7}"#),
        400,
        "invalid_request",
        &[],
    )
    .await;
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("temperature"));
    // timeout_seconds is the edge's deadline: 504, not Pingora's 502.
    let slow = c
        .post(s.url("abc123", "/v1/chat"))
        .header("x-mock-ttft-ms", "3000")
        .body(r#"{"messages":[{"role":"user","content":"x"}],"timeout_seconds":1}"#);
    let t0 = Instant::now();
    expect_error(&c, slow, 504, "timeout", &[]).await;
    assert!(t0.elapsed() < Duration::from_millis(2500));
    // A failing runtime is 502; its own 4xx reaches the client.
    let failing = chat("abc123").header("x-mock-status", "500");
    expect_error(&c, failing, 502, "upstream_unavailable", &[]).await;
    let refused = chat("abc123").header("x-mock-status", "422");
    expect_error(&c, refused, 422, "invalid_request", &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_broken_after_its_headers_ends_with_an_error_event() {
    let s = Stack::start("").await;
    let c = s.client();
    for path in ["/v1/chat", "/v1/chat/completions"] {
        let body = c
            .post(s.url("abc123", path))
            .header("x-mock-abort-after", "3")
            .json(&json!({"messages": [{"role": "user", "content": "hi"}], "stream": true}))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(
            body.contains("event: error\ndata: {\"error\""),
            "{path}: {body}"
        );
        assert!(body.contains("upstream_unavailable"), "{path}: {body}");
        assert_eq!(body.matches("Hello!").count(), 1, "{path}: {body}");
    }
    // The deadline passing mid-stream ends it the same way, with `timeout`.
    let body = c
        .post(s.url("abc123", "/v1/chat"))
        .header("x-mock-interval-ms", "400")
        .json(&json!({"messages": [{"role": "user", "content": "hi"}], "stream": true, "timeout_seconds": 1}))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        body.contains("event: error") && body.contains("\"timeout\""),
        "{body}"
    );
}

/// A request's trace (W3C Trace Context): the edge continues the client's `traceparent`, sends
/// the runtime its own span as the parent, and logs the trace, its span and the client's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runtime_gets_the_edges_span_in_the_clients_trace() {
    let s = Stack::start("").await;
    let c = s.client();
    let client = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let mut edge_spans = Vec::new();
    for (id, sent) in [("traced-1", Some(client)), ("traced-2", None)] {
        let mut req = c
            .post(s.url("abc123", "/v1/chat/completions"))
            .header("x-request-id", id)
            .header("x-mock-echo", "traceparent")
            .json(&json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}));
        if let Some(t) = sent {
            req = req.header("traceparent", t);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 200);
        let got = r.headers()["x-mock-echoed"].to_str().unwrap().to_owned();
        let parts: Vec<&str> = got.split('-').collect();
        assert_eq!((parts.len(), parts[0], parts[3]), (4, "00", "01"), "{got}");
        assert_eq!(parts[1].len(), 32, "{got}");
        assert_eq!(parts[2].len(), 16, "{got}");
        if sent.is_some() {
            assert_eq!(
                parts[1], "0af7651916cd43dd8448eb211c80319c",
                "the client's trace"
            );
            assert_ne!(parts[2], "b7ad6b7169203331", "the edge's own span");
        } else {
            assert_ne!(
                parts[1], "0af7651916cd43dd8448eb211c80319c",
                "a trace of its own"
            );
        }
        edge_spans.push((id, parts[1].to_owned(), parts[2].to_owned()));
    }
    // The access log has the same trace and span, and the client's span as the parent.
    let t0 = std::time::Instant::now();
    for (id, trace, span) in edge_spans {
        let line = loop {
            let log = s.log();
            if let Some(l) = log
                .lines()
                .find(|l| l.contains(&format!("\"request_id\":\"{id}\"")))
            {
                break l.to_owned();
            }
            assert!(
                t0.elapsed() < Duration::from_secs(3),
                "no access line for {id}:\n{log}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let v: Value = serde_json::from_str(&line).unwrap();
        let fields = if v["fields"].is_object() {
            &v["fields"]
        } else {
            &v
        };
        assert_eq!(fields["trace_id"], trace.as_str(), "{line}");
        assert_eq!(fields["span_id"], span.as_str(), "{line}");
        let parent = if id == "traced-1" {
            json!("b7ad6b7169203331")
        } else {
            Value::Null
        };
        assert_eq!(
            fields.get("parent_span_id").cloned().unwrap_or(Value::Null),
            parent,
            "{line}"
        );
    }
}

/// The `Server-Timing` metrics of an answer, as (name, milliseconds).
fn server_timing(r: &reqwest::Response) -> Vec<(String, f64)> {
    let Some(v) = r.headers().get("server-timing") else {
        return Vec::new();
    };
    v.to_str()
        .unwrap()
        .split(", ")
        .map(|m| {
            let (name, dur) = m.split_once(";dur=").expect("name;dur=ms");
            (name.to_owned(), dur.parse().expect("milliseconds"))
        })
        .collect()
}

/// Every answer carries `Server-Timing` (W3C, what browsers' developer tools show): the edge's
/// own time and, for an answer from the runtime, the runtime's time to its response header.
/// `edge.server_timing = false`, reloaded, turns it off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_carry_the_edges_own_time_in_server_timing() {
    let s = Stack::start("").await;
    let c = s.client();
    let r = c
        .post(s.url("abc123", "/v1/chat/completions"))
        .header("x-mock-ttft-ms", "150")
        .json(&json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let t = server_timing(&r);
    assert_eq!(
        t.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        ["edge", "upstream"],
        "{t:?}"
    );
    assert!(t[0].1 > 0.0 && t[0].1 < 150.0, "the edge's own time: {t:?}");
    assert!(t[1].1 >= 150.0, "the runtime's, its 150 ms included: {t:?}");
    // An answer the edge makes itself is all edge time.
    let r = c
        .post(s.url("abc123", "/v1/chat"))
        .header("authorization", "Bearer mg_live_nope")
        .body(HELLO)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(server_timing(&r).len(), 1, "{:?}", server_timing(&r));
    assert_eq!(server_timing(&r)[0].0, "edge");

    let conf = s.dir.path().join("edge.toml");
    let text = std::fs::read_to_string(&conf).unwrap();
    std::fs::write(
        &conf,
        text.replace("[edge]\n", "[edge]\nserver_timing = false\n"),
    )
    .unwrap();
    let r = s.reload().await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let r = c
        .post(s.url("abc123", "/v1/chat"))
        .body(HELLO)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("server-timing").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_tools_models_health_and_request_ids() {
    let s = Stack::start("").await;
    let c = s.client();
    let r = c
        .post(s.url("abc123", "/v1/tools"))
        .json(&json!({"tool": "crm_query", "arguments": {"q": "top"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["result"]["echo"]["q"], "top");
    let r = c.get(s.url("abc123", "/v1/models")).send().await.unwrap();
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["data"][0]["id"], "llama3.1-70b");
    let r = c.get(s.url("abc123", "/v1/health")).send().await.unwrap();
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["state"], "running");
    assert_eq!(v["pod"]["reachable"], true);
    let v: Value = c
        .get(s.url("down1", "/v1/health"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["pod"]["reachable"], false);
    // The client's request id is kept, on success and on error.
    for agent in ["abc123", "paused1"] {
        let r = c
            .post(s.url(agent, "/v1/chat"))
            .header("x-request-id", "my-trace-42")
            .body(HELLO)
            .send()
            .await
            .unwrap();
        assert_eq!(r.headers()["x-request-id"], "my-trace-42");
    }
    // Skill names reach the runtime as function tools.
    let v: Value = c
        .post(s.url("abc123", "/v1/chat"))
        .json(&json!({"messages": [{"role": "user", "content": "x"}], "tools": ["crm_query", "slack_notify"]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        v["content"]
            .as_str()
            .unwrap()
            .starts_with("[tools: crm_query,slack_notify]"),
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_openai_python_client_works() {
    if !common::have_openai_python() {
        return;
    }
    let s = Stack::start("").await;
    // A key scoped to one agent reaches it without a Host naming it, as the README's snippet does.
    let scoped = s
        .admin_post(
            "/v1/admin/keys",
            json!({"name": "python", "agents": ["abc123"]}),
        )
        .await;
    let (code, out, err) = run(Command::new("python3")
        .arg(common::client_script("openai_client.py"))
        .args([
            &format!("http://127.0.0.1:{}/v1", s.port),
            &format!("abc123.agent.localhost:{}", s.port),
            &s.key,
            scoped["key"].as_str().unwrap(),
        ]));
    println!("{out}");
    assert_eq!(code, 0, "openai client failed:\n{out}\n{err}");
    assert!(out.contains("all openai checks passed"));
}

#[test]
fn check_refuses_a_bad_config_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.toml");
    std::fs::write(&p, "[limits]\nmax_body_bytes = 0\n").unwrap();
    let (code, _, err) = run(Command::new(env!("CARGO_BIN_EXE_moltghost-proxy"))
        .arg("--config")
        .arg(&p)
        .arg("--check"));
    assert_eq!(code, 2);
    assert!(err.contains("limits.max_body_bytes"), "{err}");
    let (code, out, _) = run(Command::new(env!("CARGO_BIN_EXE_moltghost-proxy")).arg("--check"));
    assert_eq!(code, 0);
    assert!(out.contains("configuration OK"));
}
