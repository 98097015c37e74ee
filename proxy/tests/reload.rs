//! Configuration reload (SIGHUP and the admin API) while traffic flows.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::Stack;
use futures_util::StreamExt;
use serde_json::{json, Value};

const PLAN: &str = "[[plans]]\nname = \"p\"\nrequests_per_minute = 1000\ntokens_per_month = 100000000\nconcurrent_streams = 16\n";

async fn status(s: &Stack, key: &str) -> u16 {
    let body = json!({"messages": [{"role": "user", "content": "hi"}]});
    s.post_as("abc123", "/v1/chat/completions", Some(key))
        .json(&body)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

async fn reload_via_admin(s: &Stack) -> (u16, Value) {
    let r = s.reload().await;
    (r.status().as_u16(), r.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_plans_without_dropping_a_stream() {
    let s = Stack::start(PLAN).await;
    let conf = s.dir.path().join("edge.toml");
    // A stream that runs across the reload.
    let resp = s
        .client()
        .post(s.url("abc123", "/v1/chat/completions"))
        .header("x-mock-interval-ms", "100")
        .header("x-mock-tokens", "15")
        .json(&json!({"messages": [{"role": "user", "content": "hi"}], "stream": true}))
        .send()
        .await
        .unwrap();
    let mut body = resp.bytes_stream();
    body.next().await.unwrap().unwrap();

    let text = std::fs::read_to_string(&conf).unwrap();
    std::fs::write(
        &conf,
        text.replace("requests_per_minute = 1000", "requests_per_minute = 3"),
    )
    .unwrap();
    Command::new("kill")
        .args(["-HUP", &s.child.id().to_string()])
        .status()
        .unwrap();
    let t0 = Instant::now();
    while !s.log().contains("configuration reloaded") {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "no reload: {}",
            s.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The new plan is in force for new requests of a fresh key.
    let k = s
        .admin_post(
            "/v1/admin/keys",
            json!({"name": "after", "agents": ["abc123"]}),
        )
        .await;
    let k = k["key"].as_str().unwrap();
    let statuses: Vec<u16> = futures_util::future::join_all((0..4).map(|_| status(&s, k))).await;
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        3,
        "{statuses:?}"
    );
    assert!(statuses.contains(&403), "{statuses:?}");
    // The stream opened before the reload finished whole.
    let mut rest = String::new();
    while let Some(c) = body.next().await {
        rest.push_str(&String::from_utf8_lossy(&c.unwrap()));
    }
    assert!(rest.ends_with("data: [DONE]\n\n"), "{rest}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_cannot_apply_is_refused_and_changes_nothing() {
    let s = Stack::start(PLAN).await;
    let conf = s.dir.path().join("edge.toml");
    let original = std::fs::read_to_string(&conf).unwrap();

    std::fs::write(
        &conf,
        original.replace(&format!("127.0.0.1:{}\"]", s.port), "127.0.0.1:1\"]"),
    )
    .unwrap();
    let (code, v) = reload_via_admin(&s).await;
    assert_eq!(code, 400, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("listen.http"),
        "{v}"
    );

    std::fs::write(
        &conf,
        original.replace("[store]", "[limits]\nrequest_timeout = \"soon\"\n[store]"),
    )
    .unwrap();
    let (code, v) = reload_via_admin(&s).await;
    assert_eq!(code, 400, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("limits.request_timeout"),
        "{v}"
    );

    // Still serving with the running config; a valid file reloads.
    assert_eq!(status(&s, &s.key).await, 200);
    std::fs::write(&conf, &original).unwrap();
    let (code, v) = reload_via_admin(&s).await;
    assert_eq!((code, v["reloaded"].as_bool()), (200, Some(true)), "{v}");
}
