//! HTTP's rules under clients a library would tidy up: raw requests on a socket against the real
//! edge (RFC 9112 §3.2 and §6.1, and one credential per request).

mod common;

use std::time::Duration;

use common::Stack;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends `request` as it is and reads until the edge closes (at most 20 s): the whole answer.
async fn raw(port: u16, request: &str) -> String {
    let mut conn = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    conn.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), conn.read_to_end(&mut answer))
        .await
        .expect("the edge closes the connection")
        .unwrap();
    String::from_utf8_lossy(&answer).into_owned()
}

/// The answer's head (lowercased) and body.
fn split(answer: &str) -> (String, String) {
    let (head, body) = answer.split_once("\r\n\r\n").expect("a head");
    (head.to_ascii_lowercase(), body.to_owned())
}

/// Asserts a 400 JSON `invalid_request` with a request id, and returns its message.
fn assert_invalid(answer: &str) -> String {
    let (head, body) = split(answer);
    assert!(head.starts_with("http/1.1 400"), "{answer}");
    assert!(head.contains("x-request-id:"), "{answer}");
    assert!(head.contains("content-type: application/json"), "{answer}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("a JSON body");
    assert_eq!(v["error"]["code"], "invalid_request", "{answer}");
    v["error"]["message"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_to_an_http_1_0_client_is_not_chunked() {
    let s = Stack::start("").await;
    let body = r#"{"messages":[{"role":"user","content":"Hello"}],"stream":true}"#;
    let answer = raw(
        s.port,
        &format!(
            "POST /v1/chat HTTP/1.0\r\nHost: abc123.agent.localhost\r\nAuthorization: Bearer {}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            s.key,
            body.len()
        ),
    )
    .await;
    let (head, body) = split(&answer);
    assert!(head.contains(" 200 "), "{answer}");
    assert!(!head.contains("transfer-encoding"), "{answer}");
    // Close-delimited: the body is the events themselves, no chunk sizes between them.
    assert!(body.starts_with("data: {"), "{body}");
    assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");
    assert!(body
        .lines()
        .filter(|l| !l.is_empty())
        .all(|l| l.starts_with("data: ")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_1_1_without_one_host_is_refused() {
    let s = Stack::start("").await;
    let key = &s.key;
    let none = raw(
        s.port,
        &format!(
            "GET /v1/models HTTP/1.1\r\nAuthorization: Bearer {key}\r\nConnection: close\r\n\r\n"
        ),
    )
    .await;
    assert!(assert_invalid(&none).contains("Host"));
    let two = raw(
        s.port,
        &format!(
            "GET /v1/models HTTP/1.1\r\nHost: abc123.agent.localhost\r\nHost: other.agent.localhost\r\n\
             Authorization: Bearer {key}\r\nConnection: close\r\n\r\n"
        ),
    )
    .await;
    // Pingora's own parser refuses this one before any hook runs: a 400 and a closed
    // connection, but not yet the JSON body every other error has (issue 15, item 3).
    assert!(two.starts_with("HTTP/1.1 400"), "{two}");
    // One Host is served.
    let one = raw(
        s.port,
        &format!(
            "GET /v1/models HTTP/1.1\r\nHost: abc123.agent.localhost\r\nAuthorization: Bearer {key}\r\n\
             Connection: close\r\n\r\n"
        ),
    )
    .await;
    assert!(one.starts_with("HTTP/1.1 200"), "{one}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_authorization_headers_are_refused_whatever_their_order() {
    let s = Stack::start("").await;
    let key = &s.key;
    for (first, second) in [
        (key.as_str(), "molti_nope_x"),
        ("molti_nope_x", key.as_str()),
    ] {
        let answer = raw(
            s.port,
            &format!(
                "GET /v1/models HTTP/1.1\r\nHost: abc123.agent.localhost\r\nAuthorization: Bearer {first}\r\n\
                 Authorization: Bearer {second}\r\nConnection: close\r\n\r\n"
            ),
        )
        .await;
        assert!(assert_invalid(&answer).contains("Authorization"));
    }
    assert_eq!(
        s.stats.requests.load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}
