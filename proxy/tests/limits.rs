//! Rate limits, concurrent-stream caps, monthly token quotas and the usage ledger, end to end.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{admin_token, PgDb, Stack};
use futures_util::StreamExt;
use serde_json::{json, Value};

/// A stack whose accounts are on one plan.
fn plan(rpm: u32, tokens: u64, streams: u32) -> String {
    format!(
        "[limits]\nfleet_sync = \"100ms\"\n[[plans]]\nname = \"p\"\nrequests_per_minute = {rpm}\ntokens_per_month = {tokens}\nconcurrent_streams = {streams}\n"
    )
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(64)
        .build()
        .unwrap()
}

/// POSTs `body` to `path` of agent abc123 with `key` and extra headers.
fn post(
    s: &Stack,
    key: &str,
    path: &str,
    body: Value,
    headers: &[(&str, &str)],
) -> reqwest::RequestBuilder {
    headers.iter().fold(
        s.post_as("abc123", path, Some(key)).json(&body),
        |r, (k, v)| r.header(*k, *v),
    )
}

/// The text of the answer to `post`.
async fn post_text(
    s: &Stack,
    key: &str,
    path: &str,
    body: Value,
    headers: &[(&str, &str)],
) -> String {
    post(s, key, path, body, headers)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

async fn new_key(s: &Stack, name: &str) -> String {
    s.admin_post(
        "/v1/admin/keys",
        json!({"name": name, "agents": ["abc123"]}),
    )
    .await["key"]
        .as_str()
        .unwrap()
        .to_owned()
}

fn chat_body(stream: bool, include_usage: bool) -> Value {
    let mut b = json!({"model": "m", "messages": [{"role": "user", "content": "hi there"}], "stream": stream});
    if include_usage {
        b["stream_options"] = json!({"include_usage": true});
    }
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_token_is_accounted_exactly() {
    let s = Stack::start(&plan(10_000, 10_000_000, 16)).await;
    // The runtime counts prompt tokens as 3 per message + words: "hi there" = 5.
    let k = new_key(&s, "plain").await;
    let v: Value = post(
        &s,
        &k,
        "/v1/chat/completions",
        chat_body(false, false),
        &[("x-mock-tokens", "7")],
    )
    .send()
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(v["usage"]["total_tokens"], 12);
    let line = s.ledger_for("plain", 1).await;
    assert_eq!(
        (
            line["total_tokens"].as_u64(),
            line["estimated_requests"].as_u64()
        ),
        (Some(12), Some(0)),
        "{line}"
    );

    // Streamed, usage asked by the client: it sees the usage chunk, the ledger agrees.
    let k = new_key(&s, "asked").await;
    let text = post_text(
        &s,
        &k,
        "/v1/chat/completions",
        chat_body(true, true),
        &[("x-mock-tokens", "9")],
    )
    .await;
    assert_eq!(text.matches("\"usage\"").count(), 1, "{text}");
    assert_eq!(s.ledger_for("asked", 1).await["total_tokens"], 14);

    // Streamed, usage not asked: the edge asks, counts exactly, and hides the extra chunk.
    let k = new_key(&s, "hidden").await;
    let text = post_text(
        &s,
        &k,
        "/v1/chat/completions",
        chat_body(true, false),
        &[("x-mock-tokens", "11")],
    )
    .await;
    assert!(!text.contains("\"usage\""), "{text}");
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert_eq!(text.matches("\"content\":\"").count(), 12, "{text}"); // role chunk + 11 tokens
    let line = s.ledger_for("hidden", 1).await;
    assert_eq!(
        (
            line["total_tokens"].as_u64(),
            line["estimated_requests"].as_u64()
        ),
        (Some(16), Some(0))
    );

    // Text completions, streamed.
    let k = new_key(&s, "completions").await;
    post_text(
        &s,
        &k,
        "/v1/completions",
        json!({"prompt": "one two three", "stream": true}),
        &[("x-mock-tokens", "4")],
    )
    .await;
    assert_eq!(s.ledger_for("completions", 1).await["total_tokens"], 7);

    // The native format, both ways.
    let k = new_key(&s, "native").await;
    let nb = json!({"messages": [{"role": "user", "content": "hi there"}], "stream": true});
    post_text(&s, &k, "/v1/chat", nb, &[("x-mock-tokens", "5")]).await;
    let nb = json!({"messages": [{"role": "user", "content": "hi there"}]});
    let v: Value = post(&s, &k, "/v1/chat", nb, &[("x-mock-tokens", "6")])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["usage"]["total_tokens"], 11);
    assert_eq!(s.ledger_for("native", 2).await["total_tokens"], 10 + 11);

    // A client that hangs up after 3 tokens: what was delivered is settled, marked estimated.
    let k = new_key(&s, "gone").await;
    let resp = post(
        &s,
        &k,
        "/v1/chat/completions",
        chat_body(true, false),
        &[("x-mock-tokens", "100"), ("x-mock-interval-ms", "50")],
    )
    .send()
    .await
    .unwrap();
    let mut body = resp.bytes_stream();
    let mut seen = 0;
    while seen < 4 {
        seen += String::from_utf8_lossy(&body.next().await.unwrap().unwrap())
            .matches("\"content\"")
            .count();
    }
    drop(body);
    let line = s.ledger_for("gone", 1).await;
    let completion = line["completion_tokens"].as_u64().unwrap();
    assert!((3..=6).contains(&completion), "{line}");
    assert_eq!(line["estimated_requests"], 1);

    // The runtime breaking off after 5 tokens: settled to the 5 delivered.
    let k = new_key(&s, "aborted").await;
    let text = post_text(
        &s,
        &k,
        "/v1/chat/completions",
        chat_body(true, false),
        &[("x-mock-tokens", "20"), ("x-mock-abort-after", "5")],
    )
    .await;
    assert!(text.contains("upstream_unavailable"), "{text}");
    // 5 text events of 24 bytes: the estimate is the larger of events and bytes / 4.
    let completion = s.ledger_for("aborted", 1).await["completion_tokens"]
        .as_u64()
        .unwrap();
    assert!((5..=6).contains(&completion), "{completion}");

    // A runtime that reports no usage: the edge counts the stream itself and says so.
    let k = new_key(&s, "uncounted").await;
    post_text(
        &s,
        &k,
        "/v1/chat/completions",
        chat_body(true, false),
        &[("x-mock-tokens", "8"), ("x-mock-no-usage", "1")],
    )
    .await;
    let line = s.ledger_for("uncounted", 1).await;
    assert_eq!(line["estimated_requests"], 1);
    assert!(line["completion_tokens"].as_u64().unwrap() >= 8, "{line}");

    // Without the runtime's usage, a native answer tells the client what the ledger was
    // settled to, marked estimated; whole answers are estimated from their text too.
    let no_usage = [("x-mock-tokens", "8"), ("x-mock-no-usage", "1")];
    let k = new_key(&s, "native-uncounted").await;
    let nb = json!({"messages": [{"role": "user", "content": "hi there"}]});
    let v: Value = post(&s, &k, "/v1/chat", nb.clone(), &no_usage)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["usage"]["estimated"], true, "{v}");
    let line = s.ledger_for("native-uncounted", 1).await;
    assert_eq!(
        v["usage"]["total_tokens"], line["total_tokens"],
        "{v} {line}"
    );
    assert!(line["completion_tokens"].as_u64().unwrap() > 0, "{line}");
    let mut streamed = nb;
    streamed["stream"] = json!(true);
    let text = post_text(&s, &k, "/v1/chat", streamed, &no_usage).await;
    let last: Value = serde_json::from_str(
        common::sse_data(&text)
            .iter()
            .rev()
            .find(|d| d.contains("\"done\":true"))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(last["usage"]["estimated"], true, "{last}");
    let line = s.ledger_for("native-uncounted", 2).await;
    assert_eq!(
        line["total_tokens"].as_u64().unwrap(),
        v["usage"]["total_tokens"].as_u64().unwrap()
            + last["usage"]["total_tokens"].as_u64().unwrap(),
        "{line}"
    );
    let k = new_key(&s, "whole-uncounted").await;
    post(
        &s,
        &k,
        "/v1/chat/completions",
        chat_body(false, false),
        &no_usage,
    )
    .send()
    .await
    .unwrap();
    let line = s.ledger_for("whole-uncounted", 1).await;
    assert!(line["completion_tokens"].as_u64().unwrap() > 0, "{line}");

    // Usage is visible with the CLI.
    let out = std::process::Command::new(common::bin("moltghost"))
        .args(["usage", "--by", "key"])
        .env("MOLTGHOST_ADMIN_URL", s.admin_url())
        .env("MOLTGHOST_ADMIN_TOKEN", admin_token())
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.contains("ESTIMATED") && out.contains("of 10000000 tokens this month"),
        "{out}"
    );

    // Support answers "was this request billed, and for how much?" from the x-request-id the
    // client holds, through the admin API and the CLI.
    let k = new_key(&s, "ticket").await;
    let r = post(
        &s,
        &k,
        "/v1/chat/completions",
        chat_body(false, false),
        &[("x-request-id", "support-ticket-42")],
    )
    .send()
    .await
    .unwrap();
    assert_eq!(r.headers()["x-request-id"], "support-ticket-42");
    let answered: Value = r.json().await.unwrap();
    s.ledger_for("ticket", 1).await;
    let v = s
        .admin_get("/v1/admin/usage/requests/support-ticket-42")
        .await;
    assert_eq!(v["billed"], true, "{v}");
    assert_eq!(v["total_tokens"], answered["usage"]["total_tokens"], "{v}");
    assert_eq!(
        v["rows"][0]["key_id"],
        s.key_id("ticket").await.as_str(),
        "{v}"
    );
    let v = s.admin_get("/v1/admin/usage/requests/never-sent").await;
    assert_eq!(
        (v["billed"].clone(), v["total_tokens"].clone()),
        (json!(false), json!(0))
    );
    let cli = |id: &str| {
        let out = std::process::Command::new(common::bin("moltghost"))
            .args(["usage", "--request", id])
            .env("MOLTGHOST_ADMIN_URL", s.admin_url())
            .env("MOLTGHOST_ADMIN_TOKEN", admin_token())
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let out = cli("support-ticket-42");
    let total = answered["usage"]["total_tokens"].to_string();
    assert!(out.contains(&format!("billed {total} tokens")), "{out}");
    assert!(cli("never-sent").contains("not billed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_rate_and_stream_caps() {
    let s = Stack::start(&plan(5, 1_000_000, 2)).await;
    let k = new_key(&s, "rate").await;
    for i in 0..5 {
        let r = post(&s, &k, "/v1/chat/completions", chat_body(false, false), &[])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "request {i}");
        assert_eq!(r.headers()["x-ratelimit-limit-requests"], "5");
        assert_eq!(
            r.headers()["x-ratelimit-remaining-requests"],
            (4 - i).to_string().as_str()
        );
        assert!(r.headers().contains_key("x-ratelimit-reset-requests"));
        assert_eq!(r.headers()["x-ratelimit-limit-tokens"], "1000000");
        assert!(r.headers().contains_key("x-ratelimit-remaining-tokens"));
    }
    let r = post(&s, &k, "/v1/chat/completions", chat_body(false, false), &[])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry));
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "rate_limited");
    // Another key has its own budget.
    let other = new_key(&s, "other").await;
    assert_eq!(
        post(
            &s,
            &other,
            "/v1/chat/completions",
            chat_body(false, false),
            &[]
        )
        .send()
        .await
        .unwrap()
        .status(),
        200
    );

    // Concurrent streams: two open, the third refused until one closes.
    let s = Stack::start(
        &plan(1000, 1_000_000, 2).replace("[limits]\n", "[limits]\nrate_limit_status = 429\n"),
    )
    .await;
    let k = new_key(&s, "streams").await;
    let open = || {
        post(
            &s,
            &k,
            "/v1/chat/completions",
            chat_body(true, false),
            &[("x-mock-stall-after", "1")],
        )
        .send()
    };
    let (a, b) = (open().await.unwrap(), open().await.unwrap());
    let mut a = a.bytes_stream();
    a.next().await.unwrap().unwrap();
    let third = open().await.unwrap();
    assert_eq!(third.status(), 429, "rate_limit_status = 429 is honoured");
    let v: Value = third.json().await.unwrap();
    assert_eq!(v["error"]["code"], "rate_limited");
    drop(a);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(open().await.unwrap().status(), 200);
    drop(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quota_refuses_and_cuts_a_stream_that_crosses_it() {
    let s = Stack::start(&plan(10_000, 100, 16)).await;
    let k = new_key(&s, "q").await;
    let r = post(
        &s,
        &k,
        "/v1/chat/completions",
        chat_body(true, false),
        &[("x-mock-tokens", "300"), ("x-mock-interval-ms", "2")],
    )
    .send()
    .await
    .unwrap();
    assert_eq!(r.headers()["x-ratelimit-limit-tokens"], "100");
    let text = r.text().await.unwrap();
    assert!(
        text.contains("event: error") && text.contains("quota_exceeded"),
        "{text}"
    );
    let delivered = text.matches("\"content\":\"").count() as u64;
    assert!(delivered < 100, "cut after {delivered} tokens");
    let line = s.ledger_for("q", 1).await;
    let total = line["total_tokens"].as_u64().unwrap();
    assert!((95..=102).contains(&total), "settled {total}: {line}");

    let r = post(&s, &k, "/v1/chat/completions", chat_body(false, false), &[])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["x-should-retry"], "false");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "quota_exceeded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_parallel_requests_never_overshoot_a_small_quota() {
    // Each request: prompt 5 (runtime) / 6 estimated (+4 per message, 8 bytes), 16 completion.
    let s = Arc::new(Stack::start(&plan(100_000, 2_000, 2_000)).await);
    let k = Arc::new(new_key(&s, "burst").await);
    let (ok, refused) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let delivered = Arc::new(AtomicU64::new(0));
    let limit = Arc::new(tokio::sync::Semaphore::new(100));
    let mut tasks = Vec::new();
    for _ in 0..1000 {
        let (s, k, ok, refused, delivered, limit) = (
            s.clone(),
            k.clone(),
            ok.clone(),
            refused.clone(),
            delivered.clone(),
            limit.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let _p = limit.acquire().await.unwrap();
            let body =
                json!({"messages": [{"role": "user", "content": "hi there"}], "max_tokens": 16});
            let r = post(&s, &k, "/v1/chat/completions", body, &[])
                .send()
                .await
                .unwrap();
            match r.status().as_u16() {
                200 => {
                    let v: Value = r.json().await.unwrap();
                    delivered.fetch_add(
                        v["usage"]["total_tokens"].as_u64().unwrap(),
                        Ordering::Relaxed,
                    );
                    ok.fetch_add(1, Ordering::Relaxed);
                }
                429 => {
                    refused.fetch_add(1, Ordering::Relaxed);
                }
                other => panic!("status {other}"),
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let (ok, refused, delivered) = (
        ok.load(Ordering::Relaxed),
        refused.load(Ordering::Relaxed),
        delivered.load(Ordering::Relaxed),
    );
    println!("1000 parallel: {ok} admitted, {refused} refused, {delivered} tokens delivered of a 2000 quota");
    assert_eq!(ok + refused, 1000);
    assert!(delivered <= 2_000, "overshot: {delivered}");
    assert!(
        delivered >= 2_000 - 2 * 22,
        "quota left unused: {delivered}"
    );
    assert_eq!(
        s.ledger_for("burst", ok).await["total_tokens"].as_u64(),
        Some(delivered)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_no_usage_of_a_completed_response() {
    let mut s = Stack::start(&plan(1_000_000, 100_000_000, 1000)).await;
    let k = Arc::new(new_key(&s, "crash").await);
    let completed = Arc::new(AtomicU64::new(0));
    let completed_tokens = Arc::new(AtomicU64::new(0));
    let port = s.port;
    let mut tasks = Vec::new();
    for w in 0..8 {
        let (k, completed, completed_tokens) =
            (k.clone(), completed.clone(), completed_tokens.clone());
        tasks.push(tokio::spawn(async move {
            let c = client();
            for i in 0.. {
                let stream = (w + i) % 2 == 0;
                let mut body = json!({"messages": [{"role": "user", "content": "hi there"}], "stream": stream});
                if stream {
                    body["stream_options"] = json!({"include_usage": true});
                }
                let r = c
                    .post(format!("http://127.0.0.1:{port}/v1/chat/completions"))
                    .header("host", format!("abc123.agent.localhost:{port}"))
                    .bearer_auth(&*k)
                    .header("x-mock-tokens", "8")
                    .json(&body)
                    .send()
                    .await;
                let Ok(r) = r else { return };
                let Ok(text) = r.text().await else { return };
                // Complete only when the whole answer arrived: the JSON, or the stream to [DONE].
                let tokens = if stream {
                    if !text.ends_with("data: [DONE]\n\n") {
                        return;
                    }
                    let usage_line = text.lines().find(|l| l.contains("\"usage\"")).unwrap();
                    serde_json::from_str::<Value>(usage_line.trim_start_matches("data: ")).unwrap()["usage"]["total_tokens"].as_u64().unwrap()
                } else {
                    match serde_json::from_str::<Value>(&text) {
                        Ok(v) => v["usage"]["total_tokens"].as_u64().unwrap(),
                        Err(_) => return,
                    }
                };
                completed.fetch_add(1, Ordering::Relaxed);
                completed_tokens.fetch_add(tokens, Ordering::Relaxed);
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    s.child.kill().unwrap(); // SIGKILL
    s.child.wait().unwrap();
    for t in tasks {
        t.await.unwrap();
    }
    let (done, tokens) = (
        completed.load(Ordering::Relaxed),
        completed_tokens.load(Ordering::Relaxed),
    );
    assert!(done > 50, "only {done} requests completed before the kill");

    // The same edge comes back and ships its journal.
    s.child = common::spawn_edge(
        &s.dir.path().join("edge.toml"),
        &s.dir.path().join("edge2.log"),
    );
    common::wait_port(s.admin_port, Duration::from_secs(20));
    let t0 = Instant::now();
    let line = loop {
        let lines = s.usage_by_key().await;
        if let Some(l) = lines
            .into_iter()
            .find(|l| l["requests"].as_u64().unwrap_or(0) >= done)
        {
            break l;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the ledger lost completed responses"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (rows, ledger_tokens) = (
        line["requests"].as_u64().unwrap(),
        line["total_tokens"].as_u64().unwrap(),
    );
    println!("kill -9: clients completed {done} responses ({tokens} tokens); ledger holds {rows} ({ledger_tokens} tokens)");
    // Every completed response is there; at most the 8 in flight at the kill were journaled
    // without their client seeing the end.
    assert!(
        rows >= done && rows <= done + 8,
        "{rows} rows for {done} completed"
    );
    assert!(ledger_tokens >= tokens && ledger_tokens <= tokens + 8 * 13);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_holds_its_limits_under_skewed_load() {
    let Some(db) = PgDb::create().await else {
        return;
    };
    let extra = plan(120, 2_000, 1000);
    let a = Stack::on_store(&db.url, &extra).await;
    let b = a.another_edge(&db.url, &extra).await;
    let c = a.another_edge(&db.url, &extra).await;
    let edges = [&a, &b, &c];

    // Rate: 120 a minute for one key; 300 requests in 10 s, 80% through one edge.
    let k = new_key(&a, "skew").await;
    tokio::time::sleep(Duration::from_millis(300)).await; // every edge has the key
                                                          // The keys are the same account's: what this part uses counts against its quota below.
    let (mut admitted, mut used) = (0, 0);
    let t0 = Instant::now();
    for i in 0..300u32 {
        let e = if i % 10 < 8 {
            edges[0]
        } else {
            edges[1 + (i as usize % 2)]
        };
        let body = json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 1});
        let r = post(
            e,
            &k,
            "/v1/chat/completions",
            body,
            &[("x-mock-tokens", "1")],
        )
        .send()
        .await
        .unwrap();
        if r.status() == 200 {
            admitted += 1;
            let v: Value = r.json().await.unwrap();
            used += v["usage"]["total_tokens"].as_u64().unwrap();
        }
        let next = t0 + Duration::from_millis(33 * (u64::from(i) + 1));
        tokio::time::sleep_until(next.into()).await;
    }
    println!("fleet rate: {admitted} admitted of a 120/min limit (300 sent over 10 s, 80/10/10)");
    assert!(
        (108..=132).contains(&admitted),
        "{admitted} admitted: outside ±10% of 120"
    );

    // Quota: 2000 tokens, requests of 21 tokens (5 prompt + 16) lasting ~75 ms each, spread over
    // the three edges, 10 in flight per edge. Each edge serves only from its lease, and the
    // store never leases more than the quota: the fleet delivers at most 2000 tokens.
    let k = new_key(&a, "fleetquota").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let delivered = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for (n, e) in edges.iter().enumerate() {
        for w in 0..10 {
            let (k, delivered) = (k.clone(), delivered.clone());
            let (port, host) = (e.port, format!("abc123.agent.localhost:{}", e.port));
            tasks.push(tokio::spawn(async move {
                let c = client();
                for _ in 0..15 {
                    let r = c
                        .post(format!("http://127.0.0.1:{port}/v1/chat/completions"))
                        .header("host", &host)
                        .header("x-mock-interval-ms", "5")
                        .bearer_auth(&k)
                        .json(&json!({"messages": [{"role": "user", "content": "hi there"}], "max_tokens": 16}))
                        .send()
                        .await
                        .unwrap();
                    if r.status() != 200 {
                        break;
                    }
                    let v: Value = r.json().await.unwrap();
                    delivered.fetch_add(v["usage"]["total_tokens"].as_u64().unwrap(), Ordering::Relaxed);
                }
                let _ = (n, w);
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let delivered = delivered.load(Ordering::Relaxed);
    let total = used + delivered;
    println!("fleet quota: {used} + {delivered} tokens delivered against a 2000 quota on 3 edges");
    assert!(total <= 2_000, "the fleet went past the quota: {total}");
    // A worker stops at its first refusal, when the pool is dry and its edge's lease cannot
    // hold another request: each edge leaves less than one request unused.
    assert!(total > 2_000 - 3 * 21, "quota left unused: {total}");
}

/// Sends requests of 21 tokens through `s` until one is refused; returns the tokens delivered
/// and the refusal's status.
async fn use_up(s: &Stack, key: &str) -> (u64, u16) {
    let mut delivered = 0;
    loop {
        let r = post(
            s,
            key,
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "hi there"}], "max_tokens": 16}),
            &[],
        )
        .send()
        .await
        .unwrap();
        if r.status() != 200 {
            return (delivered, r.status().as_u16());
        }
        let v: Value = r.json().await.unwrap();
        delivered += v["usage"]["total_tokens"].as_u64().unwrap();
    }
}

/// An edge killed while it holds a lease: its unused tokens are lost to the fleet only until
/// the others see it has not renewed for two lease ttls; then they take them back and serve
/// them, and the fleet's total stays within the quota.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_edges_lease_comes_back_to_the_fleet() {
    let Some(db) = PgDb::create().await else {
        return;
    };
    let extra = "[limits]\nlease_ttl = \"2s\"\n[[plans]]\nname = \"p\"\nrequests_per_minute = 10000\ntokens_per_month = 1000\nconcurrent_streams = 100\n";
    let a = Stack::on_store(&db.url, extra).await;
    let mut b = a.another_edge(&db.url, extra).await;
    let k = new_key(&a, "deadedge").await;
    tokio::time::sleep(Duration::from_millis(500)).await; // b has the key

    // One large request on b draws a large lease (its estimate, 405), and uses 21 of it.
    let r = post(
        &b,
        &k,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "hi there"}], "max_tokens": 400}),
        &[("x-mock-tokens", "16")],
    )
    .send()
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    let on_b = r.json::<Value>().await.unwrap()["usage"]["total_tokens"]
        .as_u64()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await; // b renews what it used
    b.child.kill().unwrap(); // SIGKILL: no give-back at shutdown
    b.child.wait().unwrap();

    let (first, status) = use_up(&a, &k).await;
    assert_eq!(status, 429, "the pool is dry: {}", a.log());
    assert!(
        on_b + first <= 1_000 - 300,
        "b's lease is still held: {on_b} + {first}"
    );
    // Two ttls after b's last renewal, and a keeper's tick, a takes b's unused tokens back.
    tokio::time::sleep(Duration::from_millis(5_500)).await;
    let (second, _) = use_up(&a, &k).await;
    let total = on_b + first + second;
    println!("dead edge: {on_b} on b, {first} on a before the reclaim, {second} after");
    assert!(total <= 1_000, "past the quota: {total}");
    assert!(total >= 1_000 - 42, "b's lease did not come back: {total}");
    assert!(
        a.metrics()
            .await
            .contains("moltghost_quota_lease_tokens_total{direction=\"reclaimed\"}"),
        "the reclaim is counted"
    );
}

/// Ledger rows of one edge and account, `ids` numbering them, each at the position of its
/// number in one stream; the keys take turns among three.
fn rows(ids: std::ops::Range<u32>, tokens: u64) -> Vec<(u64, moltghost::store::UsageRow)> {
    ids.map(|i| {
        let row = moltghost::store::UsageRow {
            request_id: format!("e1-{i}"),
            client_request_id: format!("req-{i}"),
            edge_id: "e1".into(),
            account_id: "acct".into(),
            key_id: format!("k{}", i % 3),
            agent_id: "abc123".into(),
            month: "2026-12".into(),
            prompt_tokens: 1,
            completion_tokens: tokens - 1,
            total_tokens: tokens,
            estimated: false,
            outcome: "completed".into(),
            // 20 requests a second: 150 s, three minutes.
            created_at: 1_790_000_000 + i64::from(i / 20),
        };
        (u64::from(i), row)
    })
    .collect()
}

/// The shipper writes a stream's rows in multi-row statements: thousands at once (more than one
/// statement's worth) are all counted, a replay of the stream counts none twice, the rollups
/// hold one row per key and minute, and support finds a request by its x-request-id; with
/// `store.request_rows` off, only the rollups and totals are written. On SQLite and on
/// PostgreSQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shipped_rows_are_rolled_up_per_minute_and_counted_once() {
    use moltghost::store::{Shipment, Store, UsageBy};
    let dir = tempfile::tempdir().unwrap();
    let pg = PgDb::create().await;
    let mut urls = vec![format!("sqlite://{}", dir.path().join("s.db").display())];
    urls.extend(pg.as_ref().map(|p| p.url.clone()));
    for url in urls {
        for request_rows in [true, false] {
            let config = moltghost::config::Config::from_toml(&format!(
                "[store]\nurl = \"{url}\"\nrequest_rows = {request_rows}"
            ))
            .unwrap();
            let store = Store::open_configured(&config.fixed.store, dir.path())
                .await
                .unwrap();
            let stream = format!("e1-stream-{request_rows}");
            let ship = |rows: Vec<(u64, moltghost::store::UsageRow)>| {
                let (store, stream) = (store.clone(), stream.clone());
                async move {
                    let end = rows.last().map_or(0, |r| r.0 + 1);
                    store
                        .ship_usage(&Shipment {
                            stream: &stream,
                            edge_id: "e1",
                            rows: &rows,
                            end,
                        })
                        .await
                        .unwrap()
                }
            };
            assert_eq!(ship(rows(0..2_500, 3)).await, 2_500);
            // A replay of the last 1,000 with 500 new ones after them, then of all of it.
            assert_eq!(ship(rows(1_500..3_000, 3)).await, 500, "{url}");
            assert_eq!(ship(rows(0..3_000, 3)).await, 0, "{url}");
            let totals = store.month_totals("2026-12", "e1").await.unwrap();
            let runs = if request_rows { 1 } else { 2 };
            assert_eq!(totals, vec![("acct".to_string(), runs * 9_000, 0)], "{url}");
            let report = store
                .usage_report("2026-12", Some("acct"), UsageBy::Key)
                .await
                .unwrap();
            let per_key: Vec<(String, u64, u64)> = report
                .iter()
                .map(|l| (l.group.clone(), l.requests, l.total_tokens))
                .collect();
            assert_eq!(
                per_key,
                (0..3)
                    .map(|k| (format!("k{k}"), runs * 1_000, runs * 3_000))
                    .collect::<Vec<_>>(),
                "{url}"
            );
            let found = store.usage_of_request("req-2999").await.unwrap();
            assert_eq!(found.len(), 1, "{url}: found once, from the first run");
            assert_eq!(found[0].total_tokens, 3);
        }
        if let Some(pg) = &pg {
            if url == pg.url {
                // Three keys over three minutes: nine rollup rows per run, not 3,000.
                use sqlx::{Connection, Row};
                let mut conn = sqlx::PgConnection::connect(&pg.url).await.unwrap();
                let n: i64 = sqlx::query("SELECT COUNT(*) FROM usage_rollups")
                    .fetch_one(&mut conn)
                    .await
                    .unwrap()
                    .get(0);
                assert_eq!(n, 9);
            }
        }
    }
}
