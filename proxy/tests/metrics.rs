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
    assert_eq!(value(&text, "moltghost_store_up"), Some(1.0));
    assert!(
        text.contains("# TYPE moltghost_request_duration_seconds histogram"),
        "{text}"
    );
    // No secret in the exposition.
    assert!(!text.contains(s.key.rsplit('_').next().unwrap()));
}
