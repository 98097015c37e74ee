//! WASM policy plugins through the real edge: the example plugins (built from `plugins/` with
//! the public proxy-wasm SDK), plugins that loop, hoard memory or trap, and a reload.

mod common;

use std::time::{Duration, Instant};

use common::{chat, hi, plugin, Stack};
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_allowlist_admits_listed_addresses_and_header_values() {
    let s = Stack::start(&format!(
        "{}{}{}",
        plugin(
            "allow",
            "allowlist",
            "agents = [\"abc123\"]\nconfig = { addresses = [\"127.0.0.0/8\"], headers = { x-team = [\"search\", \"billing\"] } }"
        ),
        plugin(
            "elsewhere",
            "allowlist",
            "agents = [\"other\"]\nconfig = { addresses = [\"10.0.0.0/8\"] }"
        ),
        plugin("after", "redact", "agents = [\"abc123\"]"),
    ))
    .await;
    s.admin_post(
        "/v1/admin/agents",
        json!({"name": "other", "endpoint_id": "other", "upstream": format!("http://{}", s.runtime)}),
    )
    .await;
    let (status, body) = chat(&s, "abc123", hi(false), &[]).await;
    assert_eq!(status, 403, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["code"], "not_allowed");
    let (status, _) = chat(&s, "abc123", hi(false), &[("x-team", "ads")]).await;
    assert_eq!(status, 403);
    let (status, body) = chat(&s, "abc123", hi(true), &[("x-team", "search")]).await;
    assert_eq!(status, 200);
    assert!(body.ends_with("data: [DONE]\n\n"), "{body}");
    // The plugin's decisions are in the access log, per request.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = s.log();
    assert!(log.contains("\"plugins\":\"allow:respond 403\""), "{log}");
    assert!(
        log.contains("\"plugins\":\"allow\"") || log.contains("\"plugins\":\"allow"),
        "{log}"
    );
    // So is the time each plugin took, and the metrics count each plugin's requests: the one
    // after the allow-list only where the allow-list let the request through.
    assert!(log.contains("\"plugin_us_each\":\"allow:"), "{log}");
    let metrics = s.metrics().await;
    let count = |p: &str| format!("moltghost_plugin_request_seconds_count{{plugin=\"{p}\"}}");
    for (p, n) in [("allow", 3), ("after", 1), ("elsewhere", 0)] {
        assert!(
            metrics.contains(&format!("{} {n}\n", count(p))),
            "{p}: {metrics}"
        );
    }
    // A client address outside the list (the plugin for init1 wants 10/8; loopback is not).
    let r = s
        .post_as("other", "/v1/chat/completions", Some(&s.key))
        .json(&hi(false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tool_policy_denies_named_tools_in_every_shape() {
    let s = Stack::start(&plugin(
        "tools",
        "tool_policy",
        "config = { deny = { \"*\" = [\"slack_notify\"], default = [\"crm_query\"] } }",
    ))
    .await;
    let post = |path: &'static str, body: Value| {
        let r = s.post_as("abc123", path, Some(&s.key)).json(&body);
        async move {
            let resp = r.send().await.unwrap();
            let status = resp.status().as_u16();
            (status, resp.json::<Value>().await.unwrap_or_default())
        }
    };
    let (status, v) = post(
        "/v1/chat",
        json!({"messages": [{"role": "user", "content": "hi"}], "tools": ["slack_notify"]}),
    )
    .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (403, Some("tool_denied")),
        "{v}"
    );
    let (status, _) = post(
        "/v1/chat/completions",
        json!({"model": "m", "messages": [{"role": "user", "content": "hi"}],
               "tools": [{"type": "function", "function": {"name": "crm_query", "parameters": {}}}]}),
    )
    .await;
    assert_eq!(status, 403);
    let (status, _) = post(
        "/v1/tools",
        json!({"tool": "slack_notify", "arguments": {}}),
    )
    .await;
    assert_eq!(status, 403);
    let (status, v) = post("/v1/tools", json!({"tool": "echo", "arguments": {"a": 1}})).await;
    assert_eq!(status, 200, "{v}");
    let (status, _) = post(
        "/v1/chat",
        json!({"messages": [{"role": "user", "content": "hi"}], "tools": ["echo"]}),
    )
    .await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redaction_masks_addresses_and_cards_in_whole_and_streamed_answers() {
    let s = Stack::start(&plugin("redact", "redact", "")).await;
    let all = [("x-mock-tokens", "32"), ("x-mock-interval-ms", "1")];
    for stream in [false, true] {
        let (status, body) = chat(&s, "abc123", hi(stream), &all).await;
        assert_eq!(status, 200, "{body}");
        assert!(
            !body.contains("sales@acme.example") && !body.contains("4111"),
            "{body}"
        );
        assert!(
            body.contains("[email]") && body.contains("[card]"),
            "{body}"
        );
        assert!(body.contains(" Acme"), "{body}");
    }
    // The native format too, streamed.
    let r = s
        .post_as("abc123", "/v1/chat", Some(&s.key))
        .header("x-mock-tokens", "32")
        .json(&json!({"messages": [{"role": "user", "content": "hi"}], "stream": true}))
        .send()
        .await
        .unwrap();
    let body = r.text().await.unwrap();
    assert!(
        body.contains("[email]") && !body.contains("sales@acme"),
        "{body}"
    );
    assert!(body.ends_with("data: [DONE]\n\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugins_that_loop_hoard_or_trap_follow_their_fail_policy_and_the_edge_keeps_serving() {
    let misbehave = |name: &str, mode: &str, extra: &str| {
        plugin(
            name,
            "misbehave",
            &format!("agents = [\"{name}\"]\ndeadline = \"20ms\"\nmemory_mb = 16\nconfig = {{ mode = \"{mode}\" }}\n{extra}"),
        )
    };
    let s = Stack::start(&format!(
        "{}{}{}{}{}{}{}",
        misbehave("loops", "loop", ""),
        misbehave("hoards", "alloc", ""),
        misbehave("traps", "trap", ""),
        misbehave("opens", "trap", "fail = \"open\""),
        misbehave(
            "late",
            "trap",
            "config = { mode = \"trap\", on = \"response\" }"
        )
        .replace("config = { mode = \"trap\" }\n", ""),
        misbehave("counts", "ok", ""),
        misbehave("ticks", "ok", "").replace("mode = \"ok\" }", "mode = \"ok\", tick_ms = 20 }"),
    ))
    .await;
    for a in ["loops", "hoards", "traps", "opens", "late", "counts"] {
        s.admin_post(
            "/v1/admin/agents",
            json!({"name": a, "endpoint_id": a, "upstream": format!("http://{}", s.runtime)}),
        )
        .await;
    }
    for (agent, want) in [
        ("loops", 503),
        ("hoards", 503),
        ("traps", 503),
        ("opens", 200),
        ("counts", 200),
    ] {
        for _ in 0..3 {
            let t0 = Instant::now();
            let (status, body) = chat(&s, agent, hi(false), &[]).await;
            assert_eq!(status, want, "{agent}: {body}");
            if want == 503 {
                let v: Value = serde_json::from_str(&body).unwrap();
                assert_eq!(v["error"]["code"], "plugin_failed", "{body}");
                // What went wrong inside (a trap's backtrace) is for the log only.
                assert_eq!(
                    v["error"]["message"],
                    format!("policy plugin `{agent}` failed"),
                    "{body}"
                );
            }
            assert!(
                t0.elapsed() < Duration::from_secs(2),
                "{agent} took {:?}",
                t0.elapsed()
            );
        }
        // Others are served all along.
        assert_eq!(chat(&s, "abc123", hi(false), &[]).await.0, 200);
    }
    // A plugin failing mid-answer ends the stream with an error event, not a hang or a cut.
    let (status, body) = chat(&s, "late", hi(true), &[]).await;
    assert_eq!(status, 200);
    assert!(
        body.contains("event: error") && body.contains("plugin_failed"),
        "{body}"
    );
    // Metrics: failures counted, the plugin's own metric and shared data worked.
    let metrics = s.metrics().await;
    let value = |prefix: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix}:\n{metrics}"))
            .rsplit(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert!(value("moltghost_plugin_failures_total{plugin=\"loops\"}") >= 1.0);
    assert_eq!(
        value("moltghost_plugin_metric{plugin=\"counts\",name=\"misbehave_requests\",kind=\"counter\"}"),
        3.0
    );
    assert!(metrics.contains("moltghost_plugin_seconds_bucket"));
    // Ticks reach the root context that asked for them.
    assert!(
        value(
            "moltghost_plugin_metric{plugin=\"ticks\",name=\"misbehave_ticks\",kind=\"counter\"}"
        ) >= 3.0
    );
    // The edge is alive and well: still running, still answering.
    let mut s = s;
    assert!(s.child.try_wait().unwrap().is_none(), "the edge exited");
    assert_eq!(chat(&s, "abc123", hi(false), &[]).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resets_and_local_replies_work_in_every_phase_and_the_key_stays_hidden() {
    let mode = |name: &str, config: &str, extra: &str| {
        plugin(
            name,
            "misbehave",
            &format!("agents = [\"{name}\"]\nconfig = {{ {config} }}\n{extra}"),
        )
    };
    let s = Stack::start(&format!(
        "{}{}{}{}{}",
        mode("answers", "mode = \"answer\", on = \"response\"", ""),
        mode("resets", "mode = \"reset\"", ""),
        mode("cuts", "mode = \"reset\", on = \"response\"", ""),
        mode("blind", "mode = \"key\"", ""),
        mode("sees", "mode = \"key\"", "sees_authorization = true"),
    ))
    .await;
    for a in ["answers", "resets", "cuts", "blind", "sees"] {
        s.admin_post(
            "/v1/admin/agents",
            json!({"name": a, "endpoint_id": a, "upstream": format!("http://{}", s.runtime)}),
        )
        .await;
    }
    let before = s.stats.requests.load(std::sync::atomic::Ordering::Relaxed);
    // Reset before the upstream: no answer at all, and the runtime never sees the request.
    let reset = s
        .post_as("resets", "/v1/chat/completions", Some(&s.key))
        .json(&hi(false))
        .send()
        .await;
    if let Ok(r) = reset {
        panic!(
            "a reset request was answered: {} {}",
            r.status(),
            r.text().await.unwrap()
        );
    }
    assert_eq!(
        s.stats.requests.load(std::sync::atomic::Ordering::Relaxed),
        before,
        "the runtime saw a request a plugin reset"
    );
    // Reset mid-answer: the stream is cut, never completed.
    let cut = s
        .post_as("cuts", "/v1/chat/completions", Some(&s.key))
        .json(&hi(true))
        .send()
        .await;
    let body = match cut {
        Ok(r) => r.text().await,
        Err(e) => Err(e),
    };
    assert!(
        body.as_ref().map_or(true, |b| !b.contains("[DONE]")),
        "a stream a plugin reset was completed: {body:?}"
    );
    // The access log (flushed every 200 ms) says what happened to both.
    let deadline = Instant::now() + Duration::from_secs(5);
    while s.log().matches("\"stream_reset\"").count() < 2 {
        assert!(
            Instant::now() < deadline,
            "no stream_reset logged:\n{}",
            s.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A local reply from the response phase is sent whole: its status, body and headers.
    let r = s
        .post_as("answers", "/v1/chat/completions", Some(&s.key))
        .json(&hi(false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 451);
    assert_eq!(r.headers()["x-misbehave"], "answered");
    assert!(r.headers().contains_key("x-request-id"));
    assert_eq!(r.text().await.unwrap(), "unavailable for legal reasons");
    // The key is hidden from plugins unless their configuration allows it.
    assert_eq!(chat(&s, "blind", hi(false), &[]).await.0, 200);
    assert_eq!(chat(&s, "sees", hi(false), &[]).await.0, 418);
    // Others are served all along.
    assert_eq!(chat(&s, "abc123", hi(false), &[]).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_go_plugin_built_by_the_go_toolchain_starts_logs_edits_and_answers() {
    let wasm = common::go_plugin_wasm("go_headers");
    let s = Stack::start(&format!(
        "[[plugins]]\nname = \"go\"\npath = \"{}\"\nagents = [\"abc123\"]\n",
        wasm.display()
    ))
    .await;
    // Go's runtime started (the load would have failed otherwise); the plugin lets a request
    // through with its header added, and answers one itself.
    assert_eq!(chat(&s, "abc123", hi(false), &[]).await.0, 200);
    let (status, body) = chat(&s, "abc123", hi(false), &[("x-go-question", "ping")]).await;
    assert_eq!((status, body.as_str()), (200, "pong"));
    // Properties with Envoy's names and encodings.
    let body = s
        .post_as("abc123", "/v1/chat/completions?trace=1", Some(&s.key))
        .header("x-go-question", "props")
        .header("user-agent", "props-test/1")
        .json(&hi(false))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let props: std::collections::HashMap<&str, &str> =
        body.lines().filter_map(|l| l.split_once('=')).collect();
    let expect = [
        ("request.path", "/v1/chat/completions?trace=1"),
        ("request.url_path", "/v1/chat/completions"),
        (
            "request.host",
            &format!("abc123.agent.localhost:{}", s.port),
        ),
        ("request.scheme", "http"),
        ("request.method", "POST"),
        ("request.query", "trace=1"),
        ("request.useragent", "props-test/1"),
        ("request.protocol", "HTTP/1.1"),
        ("destination.address", &format!("127.0.0.1:{}", s.port)),
        ("destination.port", &s.port.to_string()),
        ("route_name", "/v1/chat/completions"),
        ("cluster_name", "abc123"),
        ("plugin_name", "go"),
        ("plugin_root_id", ""),
        ("plugin_vm_id", ""),
        ("moltghost.agent", "abc123"),
        ("metadata.filter_metadata.moltghost.agent", "abc123"),
        ("request.size", &hi(false).to_string().len().to_string()),
        ("upstream.address", &s.runtime.to_string()),
        ("upstream.port", &s.runtime.port().to_string()),
    ];
    for (name, want) in expect {
        assert_eq!(props.get(name).copied(), Some(want), "{name} in:\n{body}");
    }
    let time: u128 = props["request.time"].parse().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    assert!(
        now - time < 10_000_000_000,
        "request.time {time}, now {now}"
    );
    assert!(props["source.address"].starts_with("127.0.0.1:"), "{body}");
    // The edge's id in the fleet (Envoy's node).
    assert_eq!(props["node.id"].len(), 12, "{body}");
    // connection.id: the same for requests on one kept-alive connection, another on a new one.
    let body = hi(false).to_string();
    let ask = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: abc123.agent.localhost\r\n\
         Authorization: Bearer {}\r\nX-Go-Question: props\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        s.key,
        body.len()
    );
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", s.port))
        .await
        .unwrap();
    let first = connection_id(&mut conn, &ask).await;
    assert_eq!(connection_id(&mut conn, &ask).await, first);
    let mut other = tokio::net::TcpStream::connect(("127.0.0.1", s.port))
        .await
        .unwrap();
    assert_ne!(connection_id(&mut other, &ask).await, first);
    let deadline = Instant::now() + Duration::from_secs(5);
    while s.log().matches("go plugin saw a request").count() < 2 {
        assert!(
            Instant::now() < deadline,
            "no log line from the Go plugin:\n{}",
            s.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Asks the Go plugin for its properties on `conn` (kept alive) and gives `connection.id`.
async fn connection_id(conn: &mut tokio::net::TcpStream, ask: &str) -> u64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    conn.write_all(ask.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&got);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length = head.lines().find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse().ok())?
            });
            if body.len() >= length.expect("a framed answer") {
                let id = body.lines().find_map(|l| l.strip_prefix("connection.id="));
                return id.expect("connection.id").parse().unwrap();
            }
        }
        let n = conn.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed: {text}");
        got.extend_from_slice(&buf[..n]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_assemblyscript_sdk_plugin_runs_under_its_root_id() {
    let wasm = common::as_plugin_wasm("as_add_header");
    let conf = |root_id: &str, config: &str| {
        format!(
            "[[plugins]]\nname = \"as\"\npath = \"{}\"\nroot_id = \"{root_id}\"\n{config}\n",
            wasm.display()
        )
    };
    // The SDK finds its root context by the root id, as on Envoy.
    let s = Stack::start(&conf("add_header", "config = \"from config\"")).await;
    let r = s
        .post_as("abc123", "/v1/chat/completions", Some(&s.key))
        .json(&hi(false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["hello"], "from config");
    drop(s);
    // Under another root id it has no root context: the edge refuses it at load, naming it.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("edge.toml");
    std::fs::write(&path, conf("elsewhere", "")).unwrap();
    let (code, _, err) = common::run(
        std::process::Command::new(common::bin("moltghost-proxy"))
            .args(["--config"])
            .arg(&path)
            .arg("--check"),
    );
    assert_ne!(code, 0);
    assert!(
        err.contains("`as`") && err.contains("\"elsewhere\""),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_plugin_is_refused_at_load_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.wasm");
    std::fs::write(&junk, b"\0asm\x01\0\0\0garbage").unwrap();
    let conf = dir.path().join("edge.toml");
    std::fs::write(
        &conf,
        format!(
            "[edge]\ndata_dir = \"{}\"\n[[plugins]]\nname = \"junk\"\npath = \"{}\"\n",
            dir.path().display(),
            junk.display()
        ),
    )
    .unwrap();
    let (code, out, err) = common::run(
        std::process::Command::new(env!("CARGO_BIN_EXE_moltghost-proxy"))
            .arg("--config")
            .arg(&conf)
            .arg("--check"),
    );
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains("plugin `junk`"), "{err}");
    // A plugin that refuses its configuration.
    std::fs::write(
        &conf,
        format!(
            "[edge]\ndata_dir = \"{}\"\n[[plugins]]\nname = \"allow\"\npath = \"{}\"\nconfig = \"not json\"\n",
            dir.path().display(),
            common::plugin_wasm("allowlist").display()
        ),
    )
    .unwrap();
    let (code, _, err) = common::run(
        std::process::Command::new(env!("CARGO_BIN_EXE_moltghost-proxy"))
            .arg("--config")
            .arg(&conf)
            .arg("--check"),
    );
    assert_eq!(code, 2);
    assert!(err.contains("refused its configuration"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloading_the_plugin_set_drops_no_request() {
    // No rate limits: the load below is far above the default plan's.
    let s = Stack::start("[limits]\nenabled = false\n").await;
    let conf = s.dir.path().join("edge.toml");
    let base = std::fs::read_to_string(&conf).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (client, url, key, stop) = (
            reqwest::Client::new(),
            format!("http://127.0.0.1:{}/v1/chat/completions", s.port),
            s.key.clone(),
            stop.clone(),
        );
        load.push(tokio::spawn(async move {
            let (mut ok, mut bad) = (0, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let r = client
                    .post(&url)
                    .header("host", "abc123.agent.localhost")
                    .header("x-team", "search")
                    .bearer_auth(&key)
                    .json(&hi(true))
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status() == 200 => {
                        let body = r.text().await.unwrap_or_default();
                        if body.ends_with("data: [DONE]\n\n") {
                            ok += 1
                        } else {
                            bad.push(body)
                        }
                    }
                    Ok(r) => bad.push(format!("{}", r.status())),
                    Err(e) => bad.push(e.to_string()),
                }
            }
            (ok, bad)
        }));
    }
    for round in 0..4 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let plugins = if round % 2 == 0 {
            plugin(
                "allow",
                "allowlist",
                "config = { headers = { x-team = [\"search\"] } }",
            )
        } else {
            String::new()
        };
        std::fs::write(&conf, format!("{base}{plugins}")).unwrap();
        let r = s.admin_post("/v1/admin/reload", json!({})).await;
        assert!(
            r["message"]
                .as_str()
                .unwrap_or_default()
                .contains("reloaded")
                || r.get("error").is_none(),
            "{r}"
        );
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut ok, mut bad) = (0, Vec::new());
    for l in load {
        let (o, b) = l.await.unwrap();
        ok += o;
        bad.extend(b);
    }
    println!("{ok} requests across 4 plugin reloads");
    assert!(
        bad.is_empty(),
        "{} failed, first: {:?}",
        bad.len(),
        bad.first()
    );
    assert!(ok > 20);
    // The last set (round 3: none) is in force; with round 2's, a request without x-team was 403.
    assert_eq!(chat(&s, "abc123", hi(false), &[]).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugins_see_websocket_messages_and_frames() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Message;
    let s = Stack::start(&format!(
        "{}{}",
        plugin(
            "tools",
            "tool_policy",
            "config = { deny = { \"*\" = [\"slack_notify\"] } }"
        ),
        plugin("redact", "redact", "")
    ))
    .await;
    let mut req = format!("ws://127.0.0.1:{}/ws", s.port)
        .into_client_request()
        .unwrap();
    let h = req.headers_mut();
    h.insert(
        "host",
        format!("abc123.agent.localhost:{}", s.port)
            .parse()
            .unwrap(),
    );
    h.insert(
        "authorization",
        format!("Bearer {}", s.key).parse().unwrap(),
    );
    h.insert("x-mock-tokens", "32".parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    let mut ask = async |body: Value| {
        ws.send(Message::text(body.to_string())).await.unwrap();
        let mut frames = Vec::new();
        loop {
            let Some(Ok(Message::Text(t))) = ws.next().await else {
                panic!("socket ended")
            };
            let v: Value = serde_json::from_str(&t).unwrap();
            let last = v.get("error").is_some() || v["done"] == true;
            frames.push(v);
            if last {
                return frames;
            }
        }
    };
    // The tool policy reads the message and refuses it with its own error; the socket stays.
    let frames = ask(
        json!({"action": "message", "messages": [{"role": "user", "content": "hi"}],
                            "tools": ["slack_notify"]}),
    )
    .await;
    assert_eq!(frames.len(), 1);
    assert_eq!(frames[0]["error"]["code"], "tool_denied", "{frames:?}");
    // Redaction sees every answer frame.
    let frames =
        ask(json!({"action": "message", "messages": [{"role": "user", "content": "hi"}]})).await;
    let text: String = frames
        .iter()
        .filter_map(|f| f["content"].as_str())
        .collect();
    assert!(
        text.contains("[email]") && text.contains("[card]"),
        "{text}"
    );
    assert!(
        !text.contains("sales@acme") && !text.contains("4111"),
        "{text}"
    );
    assert_eq!(frames.last().unwrap()["done"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pseudo_header_edits_route_the_request_again_as_on_envoy_even_from_no_route() {
    let s = Stack::start(&plugin("rewrite", "rewrite", "")).await;
    let send = |path: &'static str, rewrites: &[(&'static str, &'static str)], body: Value| {
        let mut r = s.post_as("abc123", path, Some(&s.key)).json(&body);
        for (k, v) in rewrites {
            r = r.header(*k, *v);
        }
        r.send()
    };

    // `:path` to another route: the answer is that route's, and the query goes along.
    let r = send(
        "/v1/completions",
        &[("x-rewrite-path", "/v1/chat/completions?trace=1")],
        hi(false),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-mock-path"], "/v1/chat/completions?trace=1");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["object"], "chat.completion", "{v}");

    // `:method` and `:path` together: a GET route.
    let r = send(
        "/v1/chat/completions",
        &[
            ("x-rewrite-path", "/v1/models"),
            ("x-rewrite-method", "GET"),
        ],
        hi(false),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["object"], "list", "{v}");

    // `:authority`: the Host the runtime is sent; the agent is still the one admitted.
    let r = send(
        "/v1/chat/completions",
        &[("x-rewrite-authority", "inside.svc:8080")],
        hi(false),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-mock-host"], "inside.svc:8080");

    // A rewrite that leads nowhere, or to the edge's own answers: 404 in JSON; a method the
    // new route does not take: 405; an unusable `:path`: the plugin failed.
    for (rewrites, status, code) in [
        (vec![("x-rewrite-path", "/nope")], 404, "not_found"),
        (
            vec![
                ("x-rewrite-path", "/v1/health"),
                ("x-rewrite-method", "GET"),
            ],
            404,
            "not_found",
        ),
        (vec![("x-rewrite-method", "GET")], 405, "method_not_allowed"),
        (vec![("x-rewrite-path", "nope")], 503, "plugin_failed"),
    ] {
        let r = send("/v1/chat/completions", &rewrites, hi(false))
            .await
            .unwrap();
        assert_eq!(r.status(), status, "{rewrites:?}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], code, "{rewrites:?}: {v}");
    }

    // A path no route takes goes through the plugins too (after the key), as on Envoy where
    // filters run before the router: rewritten onto a route, it is served; left alone, it
    // gets its 404; without a valid key, 401 first.
    let r = send(
        "/v2/chat",
        &[("x-rewrite-path", "/v1/chat/completions")],
        hi(false),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-mock-path"], "/v1/chat/completions");
    let r = send("/v2/chat", &[], hi(false)).await.unwrap();
    assert_eq!(r.status(), 404);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "not_found", "{v}");
    let r = s
        .post_as("abc123", "/v2/chat", Some("molti_wrong"))
        .json(&hi(false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_plugin_drains_a_shared_queue_its_filter_feeds() {
    let s = Stack::start(&format!(
        "{}{}",
        plugin(
            "collector-service",
            "collector",
            "service = true\nvm_id = \"collector\"\nconfig = { role = \"service\" }"
        ),
        plugin(
            "collector",
            "collector",
            "vm_id = \"collector\"\nconfig = { role = \"filter\" }"
        ),
    ))
    .await;
    // Each request enqueues; the service, woken on its own thread, counts. The count an
    // answer carries lags by what the service has not drained yet.
    let mut count = 0;
    let deadline = Instant::now() + Duration::from_secs(5);
    for sent in 1.. {
        let r = s
            .post_as("abc123", "/v1/chat/completions", Some(&s.key))
            .json(&hi(false))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        count = r
            .headers()
            .get("x-collector-count")
            .map_or(0, |v| v.to_str().unwrap().parse().unwrap());
        assert!(count <= sent, "counted {count} of {sent} sent");
        if count >= 5 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(count >= 5, "the service drained {count}");
    // The service plugin itself runs on no request: once everything is drained, the count is
    // one per request (a service that also ran as a filter would enqueue twice).
    let sent = {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let r = s
            .post_as("abc123", "/v1/chat/completions", Some(&s.key))
            .json(&hi(false))
            .send()
            .await
            .unwrap();
        r.headers()["x-collector-count"]
            .to_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
    };
    let requests = s.stats.requests.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        sent == requests || sent + 1 == requests,
        "counted {sent} of {requests} requests"
    );
}
