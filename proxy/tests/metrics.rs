//! The Prometheus endpoint, checked against the traffic sent.

mod common;

use std::time::{Duration, Instant};

use common::Stack;
use serde_json::json;

/// The value of the series whose line starts with `prefix` (name and labels as rendered).
fn value(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_was_served() {
    let s = Stack::start("").await;
    let c = s.client();
    let mut tokens = 0;
    for _ in 0..3 {
        let v: serde_json::Value = c
            .post(s.url("abc123", "/v1/chat/completions"))
            .json(&json!({"messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        tokens += v["usage"]["total_tokens"].as_u64().unwrap();
    }
    for _ in 0..2 {
        let text = c
            .post(s.url("abc123", "/v1/chat"))
            .json(&json!({"messages": [{"role": "user", "content": "hi"}], "stream": true}))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let last = text.lines().rfind(|l| l.contains("\"done\":true")).unwrap();
        let v: serde_json::Value = serde_json::from_str(last.trim_start_matches("data: ")).unwrap();
        tokens += v["usage"]["total_tokens"].as_u64().unwrap();
    }
    assert_eq!(
        c.post(s.url("paused1", "/v1/chat"))
            .body("{}")
            .send()
            .await
            .unwrap()
            .status(),
        503
    );
    let no_key = reqwest::Client::builder().no_proxy().build().unwrap();
    let r = no_key
        .get(format!("http://127.0.0.1:{}/v1/models", s.port))
        .header("host", format!("abc123.agent.localhost:{}", s.port))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    let ok = r#"moltghost_requests_total{agent="abc123",code="",route="/v1/chat/completions",status="200"}"#;
    let t0 = Instant::now();
    let text = loop {
        // Requests are recorded in the logging phase, just after their answer.
        let text = s.metrics().await;
        if value(&text, ok) == Some(3.0)
            && value(
                &text,
                "moltghost_time_to_first_token_seconds_count{route=\"/v1/chat\"}",
            ) == Some(2.0)
        {
            break text;
        }
        assert!(t0.elapsed() < Duration::from_secs(3), "{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        value(
            &text,
            r#"moltghost_requests_total{agent="abc123",code="",route="/v1/chat",status="200"}"#
        ),
        Some(2.0)
    );
    assert_eq!(
        value(
            &text,
            r#"moltghost_requests_total{agent="paused1",code="agent_paused",route="/v1/chat",status="503"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &text,
            r#"moltghost_requests_total{agent="-",code="invalid_api_key",route="/v1/models",status="401"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        value(&text, r#"moltghost_tokens_total{agent="abc123"}"#),
        Some(tokens as f64)
    );
    assert_eq!(
        value(
            &text,
            r#"moltghost_edge_overhead_seconds_count{route="/v1/chat/completions"}"#
        ),
        Some(3.0)
    );
    assert_eq!(value(&text, "moltghost_open_streams"), Some(0.0));
    // The account's quota, nearly whole: a few hundred tokens of its plan's month are used.
    let left = value(
        &text,
        r#"moltghost_quota_remaining_ratio{account="default"}"#,
    )
    .unwrap();
    assert!(left > 0.9 && left < 1.0, "{left}");
    assert_eq!(value(&text, "moltghost_store_up"), Some(1.0));
    assert!(
        text.contains("# TYPE moltghost_request_duration_seconds histogram"),
        "{text}"
    );
    // No secret in the exposition.
    assert!(!text.contains(s.key.rsplit('_').next().unwrap()));
}

/// Every `moltghost_*` name in `text`, a histogram's series (`_bucket`, `_sum`, `_count`) as
/// its family.
fn names_in(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("moltghost_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        names.insert(family.to_owned());
        rest = &tail[end..];
    }
    names
}

/// The Grafana dashboard and the alert rules in `conf/` name only metrics a running edge
/// exports, so that they cannot drift apart from the code. The edge runs a plugin, serves
/// whole answers and streams, and closes a connection, so that every family has series.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_and_the_alerts_name_only_exported_metrics() {
    let conf = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../conf");
    let dashboard = std::fs::read_to_string(conf.join("grafana/moltghost-fleet.json")).unwrap();
    let alerts = std::fs::read_to_string(conf.join("prometheus/moltghost-alerts.yml")).unwrap();
    let parsed: serde_json::Value = serde_json::from_str(&dashboard).unwrap();
    let exprs: Vec<&str> = parsed["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap())
        .map(|t| t["expr"].as_str().unwrap())
        .collect();
    assert!(exprs.len() >= 12, "{exprs:?}");
    let wanted: Vec<String> = names_in(&exprs.join("\n"))
        .into_iter()
        .chain(names_in(&alerts))
        .collect();

    let s = Stack::start(&common::plugin("redact", "redact", "")).await;
    let c = s.client();
    for stream in [false, true] {
        let r = c
            .post(s.url("abc123", "/v1/chat/completions"))
            .json(&json!({"messages": [{"role": "user", "content": "hi"}], "stream": stream}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
    }
    // A head the parser refuses: a connection the edge closes (`malformed_head`).
    {
        use std::io::{Read, Write};
        let mut raw = std::net::TcpStream::connect(("127.0.0.1", s.port)).unwrap();
        raw.write_all(b"NOT HTTP AT ALL\r\n\r\n").unwrap();
        let _ = raw.read_to_end(&mut Vec::new());
    }
    let t0 = Instant::now();
    loop {
        let exported = names_in(
            &s.metrics()
                .await
                .lines()
                .filter_map(|l| l.strip_prefix("# TYPE "))
                .collect::<Vec<_>>()
                .join("\n"),
        );
        let missing: Vec<&String> = wanted.iter().filter(|n| !exported.contains(*n)).collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "named in conf/ but not exported: {missing:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs `moltghost top` for `s` under a pseudo-terminal (Python's `pty`), sends `key` after
/// `after`, and returns its exit status and everything it wrote.
fn top_in_a_terminal(s: &Stack, key: &[u8], after: Duration) -> (i32, String) {
    const DRIVER: &str = r#"
import os, pty, select, sys, time
cmd, key, after = sys.argv[1:-2], sys.argv[-2].encode().decode("unicode_escape").encode(), float(sys.argv[-1])
pid, fd = pty.fork()
if pid == 0:
    os.execv(cmd[0], cmd)
out, t0, sent = b"", time.time(), False
while time.time() - t0 < after + 5:
    if not sent and time.time() - t0 >= after:
        os.write(fd, key)
        sent = True
    r, _, _ = select.select([fd], [], [], 0.05)
    if r:
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        break
else:
    os.kill(pid, 9)
    done, status = os.waitpid(pid, 0)
sys.stdout.write(out.decode("utf-8", "replace"))
sys.exit(os.waitstatus_to_exitcode(status))
"#;
    let key = key
        .iter()
        .map(|b| format!("\\x{b:02x}"))
        .collect::<String>();
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(DRIVER)
        .arg(common::bin("moltghost"))
        .args(["top", "--interval", "300ms"])
        .arg(&key)
        .arg(after.as_secs_f64().to_string())
        .env("MOLTGHOST_ADMIN_URL", s.admin_url())
        .env("MOLTGHOST_ADMIN_TOKEN", common::admin_token())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// `moltghost top` in a terminal: a live view of the traffic sent meanwhile, and `q` or Ctrl-C
/// leave it cleanly (exit 0, the shell's screen and cursor given back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moltghost_top_shows_the_traffic_and_quits_on_q_or_ctrl_c() {
    let s = std::sync::Arc::new(Stack::start("").await);
    let traffic = {
        let s = s.clone();
        tokio::spawn(async move {
            let c = s.client();
            let until = Instant::now() + Duration::from_secs(4);
            while Instant::now() < until {
                let _ = c
                    .post(s.url("abc123", "/v1/chat"))
                    .body(r#"{"messages":[{"role":"user","content":"hi"}]}"#)
                    .send()
                    .await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    for key in [b"q".as_slice(), b"\x03".as_slice()] {
        let s = s.clone();
        let (code, out) = tokio::task::spawn_blocking(move || {
            top_in_a_terminal(&s, key, Duration::from_millis(1500))
        })
        .await
        .unwrap();
        assert_eq!(code, 0, "{key:?} did not end it cleanly:\n{out}");
        assert!(out.contains("requests/s"), "{out}");
        assert!(out.contains("abc123"), "the agent served meanwhile:\n{out}");
        assert!(out.contains("added latency p50"), "{out}");
        assert!(
            out.ends_with("\x1b[?25h\x1b[?1049l"),
            "terminal not restored:\n{out:?}"
        );
    }
    traffic.abort();
}
