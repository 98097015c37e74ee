//! Pause, buffering and HTTP calls out, as Envoy's wasm filter does them, through the real
//! edge with plugins built from `plugins/` with the public proxy-wasm SDK: `callout` (the SDK's
//! `http_auth_random` pattern: pause, call, resume or answer) and `buffer` (the SDK's
//! `http_body` pattern: pause the body until its end, rewrite it whole).

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{chat, hi, plugin, Stack};
use serde_json::{json, Value};

/// An authorization service for the callout plugin: it answers with the status the client
/// asked for in `x-callout-want` (0: never in time), and says what it heard. `GET /tick`
/// answers `tick <n>`. Counts of both.
async fn auth_service() -> (SocketAddr, Arc<AtomicU64>, Arc<AtomicU64>) {
    use axum::http::{HeaderMap, StatusCode};
    let calls = Arc::new(AtomicU64::new(0));
    let ticks = Arc::new(AtomicU64::new(0));
    let counted = calls.clone();
    let ticked = ticks.clone();
    let app = axum::Router::new()
        .route(
            "/tick",
            axum::routing::get(move || {
                let n = ticked.fetch_add(1, Relaxed) + 1;
                async move { format!("tick {n}") }
            }),
        )
        .route(
            "/check",
            axum::routing::post(move |headers: HeaderMap, body: String| {
                let counted = counted.clone();
                async move {
                    counted.fetch_add(1, Relaxed);
                    let h = |k: &str| {
                        headers
                            .get(k)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_owned()
                    };
                    let want: u16 = h("x-callout-want").parse().unwrap_or(200);
                    if want == 0 {
                        tokio::time::sleep(Duration::from_secs(5)).await;
                    }
                    let status = StatusCode::from_u16(want).unwrap_or(StatusCode::OK);
                    let said = format!("{} heard {body} from {}", h("host"), h("x-key-id"));
                    (status, said)
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, calls, ticks)
}

async fn add_agents(s: &Stack, names: &[&str]) {
    for a in names {
        s.admin_post(
            "/v1/admin/agents",
            json!({"name": a, "endpoint_id": a, "upstream": format!("http://{}", s.runtime)}),
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_plugin_pauses_calls_out_and_resumes_or_answers_without_blocking_the_edge() {
    let (auth, calls, ticks) = auth_service().await;
    let s = Stack::start(&format!(
        "{}{}{}",
        plugin(
            "guard",
            "callout",
            &format!(
                "agents = [\"guarded\"]\nconfig = {{ upstream = \"auth\", timeout_ms = 300 }}\n\
                 upstreams = {{ auth = \"http://{auth}\" }}"
            ),
        ),
        plugin(
            "ticking",
            "callout",
            &format!(
                "agents = [\"ticking\"]\nconfig = {{ upstream = \"auth\", tick_path = \"/tick\" }}\n\
                 upstreams = {{ auth = \"http://{auth}\" }}"
            ),
        ),
        plugin(
            "lost",
            "callout",
            "agents = [\"lost\"]\nconfig = { upstream = \"nowhere\" }",
        ),
    ))
    .await;
    add_agents(&s, &["guarded", "ticking", "lost"]).await;
    let served = || s.stats.requests.load(Relaxed);

    // 200 from the service: the request resumes, and the context kept what the service said.
    for stream in [false, true] {
        let r = s
            .post_as("guarded", "/v1/chat/completions", Some(&s.key))
            .json(&hi(stream))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let said = r.headers()["x-callout-answer"].to_str().unwrap().to_owned();
        assert!(
            said.starts_with("auth.internal heard may I? from "),
            "{said}"
        );
        assert!(
            said.len() > "auth.internal heard may I? from ".len(),
            "no key id: {said}"
        );
        let body = r.text().await.unwrap();
        assert!(!stream || body.contains("[DONE]"), "{body}");
    }
    assert_eq!(calls.load(Relaxed), 2);

    // 403 from the service: the plugin answers itself, and the runtime never sees the request.
    let before = served();
    let r = s
        .post_as("guarded", "/v1/chat/completions", Some(&s.key))
        .header("x-callout-want", "403")
        .json(&hi(false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(r.headers()["x-callout-status"], "403");
    assert!(r.headers().contains_key("x-request-id"));
    assert_eq!(
        r.text().await.unwrap(),
        "Access forbidden by the callout.\n"
    );
    assert_eq!(served(), before, "a denied request reached the runtime");

    // A service that does not answer in time: the callback gets no headers (as on Envoy), and
    // the plugin denies. Meanwhile the edge serves others: waiting never holds a worker.
    let slow = (0..6).map(|_| {
        let s = &s;
        async move {
            let (status, _) = chat(s, "guarded", hi(false), &[("x-callout-want", "0")]).await;
            (status, Instant::now())
        }
    });
    let quick = async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (status, _) = chat(&s, "abc123", hi(false), &[]).await;
        (status, Instant::now())
    };
    let (slow, (quick_status, quick_done)) =
        tokio::join!(futures_util::future::join_all(slow), quick);
    assert_eq!(quick_status, 200);
    for (status, done) in slow {
        assert_eq!(status, 403);
        assert!(quick_done < done, "a request waited behind the callouts");
    }
    // In the failed call's callback, `proxy_get_status` says what Envoy says: 11, "reset".
    let r = s
        .post_as("guarded", "/v1/chat/completions", Some(&s.key))
        .header("x-callout-want", "0")
        .json(&hi(false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-callout-status"], "none (11 reset)");

    // An upstream the plugin's configuration does not name: Envoy's BadArgument, which the
    // plugin turns into its own 502.
    let r = s
        .post_as("lost", "/v1/chat/completions", Some(&s.key))
        .json(&hi(false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(r.headers()["x-callout-status"], "BadArgument");

    // A root context's calls from `on_tick` are made too, and their answers delivered: the
    // plugin refreshes what it keeps in shared data in the background.
    let deadline = Instant::now() + Duration::from_secs(5);
    while ticks.load(Relaxed) < 3 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ticks.load(Relaxed) >= 3, "the tick's calls were not made");
    let r = s
        .post_as("ticking", "/v1/chat/completions", Some(&s.key))
        .json(&hi(false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let tick = r.headers()["x-callout-tick"].to_str().unwrap().to_owned();
    assert!(tick.starts_with("tick "), "{tick}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_body_is_buffered_whole_up_to_its_limit() {
    let buffer = |name: &str, config: &str, extra: &str| {
        plugin(
            name,
            "buffer",
            &format!("agents = [\"{name}\"]\nconfig = {{ {config} }}\n{extra}"),
        )
    };
    let s = Stack::start(&format!(
        "{}{}{}{}",
        buffer(
            "whole",
            "find = \"sales@acme.example\", replace = \"[mail]\"",
            ""
        ),
        buffer("held", "hold_headers = true", ""),
        buffer("small", "", "buffer_kb = 1"),
        buffer("small-held", "hold_headers = true", "buffer_kb = 1"),
    ))
    .await;
    add_agents(&s, &["whole", "held", "small", "small-held"]).await;
    let tokens = |n: &'static str| [("x-mock-tokens", n), ("x-mock-interval-ms", "30")];

    // The plugin gets the stream once, whole, after its end: it saw every chunk's bytes.
    let (status, body) = chat(&s, "whole", hi(true), &tokens("32")).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("[mail]") && !body.contains("sales@acme"),
        "{body}"
    );
    let (stream, line) = body.split_at(body.find(": seen whole: ").expect(&body));
    assert!(stream.ends_with("data: [DONE]\n\n"), "{body}");
    let seen: Vec<&str> = line.split_whitespace().collect();
    let calls: u32 = seen[6].parse().unwrap();
    assert!(calls > 2, "the body came in one piece: {line}");
    assert_eq!(
        seen[3].parse::<usize>().unwrap(),
        stream.len() - "[mail]".len() + "sales@acme.example".len(),
        "{line}"
    );

    // Headers paused too: nothing reaches the client before the whole answer is there.
    let started = Instant::now();
    let r = s
        .post_as("held", "/v1/chat/completions", Some(&s.key))
        .headers(
            tokens("10")
                .iter()
                .map(|(k, v)| (k.parse().unwrap(), v.parse().unwrap()))
                .collect(),
        )
        .json(&hi(true))
        .send()
        .await
        .unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "headers went out before the body was seen whole"
    );
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("seen whole"));

    // Past the limit, headers sent: the stream ends with an error event, never with [DONE].
    let (status, body) = chat(&s, "small", hi(true), &tokens("200")).await;
    assert_eq!(status, 200);
    assert!(
        body.contains("answer_too_large") && !body.contains("[DONE]"),
        "{body}"
    );
    // Past the limit, headers held: a whole JSON error.
    let r = s
        .post_as("small-held", "/v1/chat/completions", Some(&s.key))
        .header("x-mock-tokens", "200")
        .json(&hi(true))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    assert!(r.headers().contains_key("x-request-id"));
    let err: Value = r.json().await.unwrap();
    assert_eq!(err["error"]["code"], "answer_too_large", "{err}");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("small-held"),
        "{err}"
    );
    // Small answers pass under the same limit.
    let (status, body) = chat(&s, "small", hi(true), &[("x-mock-tokens", "2")]).await;
    assert_eq!(status, 200);
    assert!(body.contains("[DONE]"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_keeps_its_length_unless_a_plugin_drops_it() {
    let s = Stack::start(&format!(
        "{}{}{}",
        plugin("open", "allowlist", "agents = [\"open\"]"),
        plugin("whole", "buffer", "agents = [\"whole\"]"),
        plugin(
            "sloppy",
            "buffer",
            "agents = [\"sloppy\"]\nconfig = { keep_length = true }"
        ),
    ))
    .await;
    add_agents(&s, &["open", "whole", "sloppy"]).await;
    let whole = |agent: &'static str| {
        s.post_as(agent, "/v1/chat/completions", Some(&s.key))
            .json(&hi(false))
            .send()
    };

    // A header-only plugin (it exports the body callback, as every SDK's plugin does, but
    // leaves `content-length`): the answer keeps its length, no chunked coding.
    let r = whole("open").await.unwrap();
    assert_eq!(r.status(), 200);
    let length: usize = r.headers()["content-length"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(!r.headers().contains_key("transfer-encoding"));
    assert_eq!(r.bytes().await.unwrap().len(), length);

    // A plugin that changes the length and drops `content-length`, as the SDK's example does:
    // re-framed, whole.
    let r = whole("whole").await.unwrap();
    assert!(!r.headers().contains_key("content-length"));
    assert!(r.text().await.unwrap().contains("seen whole"));

    // One that changes the length but leaves `content-length` would misframe the answer: it
    // is cut instead, and the log names the plugin.
    let r = whole("sloppy").await.unwrap();
    assert!(r.headers().contains_key("content-length"));
    assert!(r.bytes().await.is_err(), "a misframed answer was completed");
    let deadline = Instant::now() + Duration::from_secs(3);
    while !s.log().contains("sloppy:length_changed\"") {
        assert!(Instant::now() < deadline, "{}", s.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(s.log().contains("remove content-length"), "{}", s.log());
}

/// A gRPC service over HTTP/2 (h2c) for the callout plugin's gRPC mode: `auth.Guard/Check`
/// replies `granted to <x-key-id>` when the message is `ok`, fails with status 7 (permission
/// denied, in a trailers-only reply) when it is `deny`, and never answers in time when `slow`.
async fn grpc_service() -> SocketAddr {
    h2_service(|req, mut respond| async move {
        let (head, mut body) = req.into_parts();
        let mut framed = Vec::new();
        while let Some(Ok(chunk)) = body.data().await {
            let _ = body.flow_control().release_capacity(chunk.len());
            framed.extend_from_slice(&chunk);
        }
        let message = framed.get(5..).unwrap_or_default().to_vec();
        let key = head.headers.get("x-key-id").cloned();
        let response = |status: &str| {
            http::Response::builder()
                .status(200)
                .header("content-type", "application/grpc")
                .header("x-grpc-path", head.uri.path())
                .header("grpc-status", status)
                .header("grpc-message", "not%20you")
                .body(())
                .unwrap()
        };
        match &message[..] {
            b"deny" => {
                let _ = respond.send_response(response("7"), true);
            }
            b"slow" => tokio::time::sleep(Duration::from_secs(5)).await,
            _ => {
                let ok = http::Response::builder()
                    .status(200)
                    .header("content-type", "application/grpc")
                    .body(())
                    .unwrap();
                let Ok(mut send) = respond.send_response(ok, false) else {
                    return;
                };
                let key = key.as_ref().and_then(|k| k.to_str().ok()).unwrap_or("");
                let reply = format!("granted to {key}");
                let mut frame = vec![0];
                frame.extend_from_slice(&(reply.len() as u32).to_be_bytes());
                frame.extend_from_slice(reply.as_bytes());
                let _ = send.send_data(frame.into(), false);
                let mut trailers = http::HeaderMap::new();
                trailers.insert("grpc-status", "0".parse().unwrap());
                let _ = send.send_trailers(trailers);
            }
        }
    })
    .await
}

/// An HTTP/2 (h2c) server on a free port: each request stream to `reply`.
async fn h2_service<F, Fut>(reply: F) -> SocketAddr
where
    F: Fn(http::Request<h2::RecvStream>, h2::server::SendResponse<bytes::Bytes>) -> Fut
        + Clone
        + Send
        + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let reply = reply.clone();
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(tcp).await else {
                    return;
                };
                while let Some(Ok((req, respond))) = conn.accept().await {
                    tokio::spawn(reply(req, respond));
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_asks_by_grpc_and_resumes_or_denies() {
    let grpc = grpc_service().await;
    let s = Stack::start(&plugin(
        "guard",
        "callout",
        &format!(
            "agents = [\"guarded\"]\nconfig = {{ upstream = \"auth\", timeout_ms = 300, \
             grpc = [\"auth.Guard\", \"Check\"] }}\nupstreams = {{ auth = \"http://{grpc}\" }}"
        ),
    ))
    .await;
    add_agents(&s, &["guarded"]).await;
    let ask = |want: &'static str| {
        s.post_as("guarded", "/v1/chat/completions", Some(&s.key))
            .header("x-callout-want", want)
            .json(&hi(false))
            .send()
    };

    // The reply's message reaches `on_grpc_call_response`; the request resumes.
    let r = ask("ok").await.unwrap();
    assert_eq!(r.status(), 200);
    let said = r.headers()["x-callout-answer"].to_str().unwrap().to_owned();
    assert!(said.starts_with("granted to ") && said.len() > 11, "{said}");

    // A failure: its code to the callback, code and message by `proxy_get_status`.
    let r = ask("deny").await.unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(r.headers()["x-callout-status"], "grpc 7 not you");

    // Past the timeout: DEADLINE_EXCEEDED (4).
    let r = ask("slow").await.unwrap();
    assert_eq!(r.status(), 403);
    let status = r.headers()["x-callout-status"].to_str().unwrap().to_owned();
    assert!(status.starts_with("grpc 4 "), "{status}");
}

/// A streaming gRPC service over HTTP/2 (h2c) for the streamer plugin. `echo.Echo/Talk` answers
/// its headers at once (`x-echo: ready <x-who>`), replies `echo:<m>` to each message as it
/// comes, and when the client half-closes ends with status OK and `x-said: <count>` in its
/// trailers; a message `fail` ends it at once with status 9 ("failed here").
/// `echo.Echo/Feed` sends `feed-<n>` every 50 ms until the client goes.
async fn stream_service() -> SocketAddr {
    h2_service(stream_reply).await
}

async fn stream_reply(
    req: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<bytes::Bytes>,
) {
    let frame = |m: &str| {
        let mut f = vec![0];
        f.extend_from_slice(&(m.len() as u32).to_be_bytes());
        f.extend_from_slice(m.as_bytes());
        bytes::Bytes::from(f)
    };
    let trailers = |pairs: &[(&'static str, &str)]| {
        let mut t = http::HeaderMap::new();
        for (k, v) in pairs {
            t.insert(*k, v.parse().unwrap());
        }
        t
    };
    let (head, mut body) = req.into_parts();
    let who = head
        .headers
        .get("x-who")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let ok = http::Response::builder()
        .status(200)
        .header("content-type", "application/grpc")
        .header("x-echo", format!("ready {who}"))
        .body(())
        .unwrap();
    let Ok(mut send) = respond.send_response(ok, false) else {
        return;
    };
    if head.uri.path() == "/echo.Echo/Feed" {
        for n in 0.. {
            if send.send_data(frame(&format!("feed-{n}")), false).is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let mut pending = Vec::new();
    let mut count = 0;
    while let Some(Ok(chunk)) = body.data().await {
        let _ = body.flow_control().release_capacity(chunk.len());
        pending.extend_from_slice(&chunk);
        while pending.len() >= 5 {
            let len = u32::from_be_bytes(pending[1..5].try_into().unwrap()) as usize;
            if pending.len() < 5 + len {
                break;
            }
            let message = String::from_utf8_lossy(&pending[5..5 + len]).into_owned();
            pending.drain(..5 + len);
            if message == "fail" {
                let t = trailers(&[("grpc-status", "9"), ("grpc-message", "failed%20here")]);
                let _ = send.send_trailers(t);
                return;
            }
            count += 1;
            let _ = send.send_data(frame(&format!("echo:{message}")), false);
        }
    }
    let _ = send.send_trailers(trailers(&[
        ("grpc-status", "0"),
        ("x-said", &count.to_string()),
    ]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_talks_over_a_grpc_stream_and_keeps_one_open_in_the_background() {
    let echo = stream_service().await;
    // A plan that lets the hundreds of requests below through.
    let s = Stack::start(&format!(
        "[[plans]]\nname = \"default\"\nrequests_per_minute = 1000000\n\
         tokens_per_month = 1000000000000\nconcurrent_streams = 1000\n{}{}",
        plugin(
            "talker",
            "streamer",
            &format!(
                "agents = [\"talks\"]\nconfig = {{ upstream = \"echo\" }}\n\
                 upstreams = {{ echo = \"http://{echo}\" }}"
            ),
        ),
        plugin(
            "astray",
            "streamer",
            "agents = [\"astray\"]\nconfig = { upstream = \"nowhere\" }",
        ),
    ))
    .await;
    add_agents(&s, &["talks", "astray"]).await;
    let say = |agent: &'static str, words: &'static str, mode: &'static str| {
        s.post_as(agent, "/v1/chat/completions", Some(&s.key))
            .header("x-say", words)
            .header("x-stream-mode", mode)
            .json(&hi(false))
            .send()
    };

    // Two messages out, the replies, the initial and trailing metadata back, then the request
    // resumes (and its answer says what the plugin heard).
    let r = say("talks", "a,b", "").await.unwrap();
    assert_eq!(r.status(), 200);
    let h = |r: &reqwest::Response, k: &str| r.headers()[k].to_str().unwrap().to_owned();
    assert_eq!(h(&r, "x-stream-said"), "echo:a,echo:b");
    assert_eq!(h(&r, "x-stream-ready"), "ready streamer");
    assert_eq!(h(&r, "x-stream-count"), "2");

    // The service ends the stream with an error: its code and message reach the plugin.
    let r = say("talks", "a,fail", "").await.unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(r.headers()["x-stream-status"], "grpc 9 failed here");

    // Cancelled after the first reply: the request goes on at once (the stream is still open
    // on the service's side when the plugin resets it).
    let r = say("talks", "x", "cancel").await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(h(&r, "x-stream-said"), "echo:x");

    // Streams left open end with their request: however many requests leave one behind, a
    // worker's VM never runs out of streams (at most 256 open at once).
    for _ in 0..600 {
        let r = say("talks", "x", "leave").await.unwrap();
        assert_eq!(r.status(), 200, "{:?}", r.headers().get("x-stream-status"));
    }
    let r = say("talks", "after", "").await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(h(&r, "x-stream-said"), "echo:after");

    // An upstream the configuration does not name: ParseFailure, as the SDK expects.
    let r = say("astray", "a", "").await.unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(r.headers()["x-stream-status"], "ParseFailure");

    // The root context's stream, opened from a tick on the background instance, delivers its
    // messages as they come: answers carry a feed that moves on.
    let feed = || async {
        let r = say("talks", "a", "").await.unwrap();
        r.headers()
            .get("x-feed")
            .map(|v| v.to_str().unwrap().to_owned())
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    let first = loop {
        if let Some(f) = feed().await {
            break f;
        }
        assert!(Instant::now() < deadline, "no feed:\n{}", s.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(first.starts_with("feed-"), "{first}");
    loop {
        let now = feed().await.unwrap();
        if now != first {
            break;
        }
        assert!(Instant::now() < deadline, "the feed stopped at {first}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The Go SDK's `postpone_requests` pattern (`postpone/`): every request pauses and leaves its
/// context with the root context, whose tick on the same worker chooses each one
/// (`set_effective_context`) and resumes, answers or resets it. On the way back the plugin
/// round-trips a text through the foreign functions `compress` and `uncompress`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tick_resumes_answers_or_resets_the_requests_its_root_context_postponed() {
    let s = Stack::start(&format!(
        "{}{}{}",
        plugin(
            "later",
            "postpone",
            "agents = [\"later\"]\nconfig = { tick_ms = 150 }"
        ),
        plugin(
            "turned-away",
            "postpone",
            "agents = [\"turned-away\"]\nconfig = { tick_ms = 150, then = \"answer\" }"
        ),
        plugin(
            "dropped",
            "postpone",
            "agents = [\"dropped\"]\nconfig = { tick_ms = 150, then = \"reset\" }"
        ),
    ))
    .await;
    add_agents(&s, &["later", "turned-away", "dropped"]).await;
    let served = || s.stats.requests.load(Relaxed);

    // Several at once, streamed or not: each waits for the next tick, then goes on whole.
    let started = Instant::now();
    let all = (0..6).map(|i| {
        let s = &s;
        async move {
            let r = s
                .post_as("later", "/v1/chat/completions", Some(&s.key))
                .json(&hi(i % 2 == 0))
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let waited: u64 = r.headers()["x-postponed-ms"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            let foreign = r.headers()["x-foreign"].to_str().unwrap().to_owned();
            let body = r.text().await.unwrap();
            (status, waited, foreign, body)
        }
    });
    for (status, waited, foreign, body) in futures_util::future::join_all(all).await {
        assert_eq!(status, 200, "{body}");
        assert!(waited <= 1_000, "waited {waited} ms for a 150 ms tick");
        assert_eq!(foreign, "roundtrip-ok declare_property:not-found");
        assert!(body.contains("chat.completion"), "{body}");
    }
    assert!(started.elapsed() < Duration::from_secs(5));

    // Answered from the tick: the plugin's 429 and body; the runtime never saw it.
    let before = served();
    let r = s
        .post_as("turned-away", "/v1/chat/completions", Some(&s.key))
        .json(&hi(false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["x-postponed-by"], "tick");
    assert_eq!(r.text().await.unwrap(), "come back later\n");
    assert_eq!(served(), before, "an answered request reached the runtime");

    // Reset from the tick: no answer at all, and nothing reached the runtime.
    let r = s
        .post_as("dropped", "/v1/chat/completions", Some(&s.key))
        .json(&hi(false))
        .send()
        .await;
    assert!(r.is_err(), "a reset request was answered: {r:?}");
    assert_eq!(served(), before, "a reset request reached the runtime");
}
