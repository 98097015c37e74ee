//! HTTP's rules under clients a library would tidy up: raw requests on a socket against the real
//! edge (RFC 9112 §3.2, §6.1 and §9.3.2, one credential per request, lost framing), and what a
//! slow or greedy client may hold (deadlines and the connection cap).

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
    // Pingora's own parser refuses this one before any hook runs; the edge answers in its stead.
    assert_invalid(&two);
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
async fn heads_the_parser_refuses_get_the_edges_json_error() {
    let s = Stack::start("").await;
    let key = &s.key;
    let host = "Host: abc123.agent.localhost\r\n";
    let auth = format!("Authorization: Bearer {key}\r\n");
    let many: String = (0..1000).map(|i| format!("X-H{i}: v\r\n")).collect();
    let long_path = "a".repeat(100 * 1024);
    let cases = [
        format!("GET /v1/models HTTP/1.1\r\n{host}{auth}X-Folded: a\r\n b\r\n\r\n"),
        format!("GET /v1/models HTTP/1.1\r\n{host}{auth}{many}\r\n"),
        format!("GET /{long_path} HTTP/1.1\r\n{host}{auth}\r\n"),
        format!("POST /v1/chat HTTP/1.1\r\n{host}{auth}Content-Length: 3\r\nContent-Length: 4\r\n\r\nabcd"),
        format!("GET /v1/models HTTP/1.1\r\n{host}{auth}Bad Header: 1\r\n\r\n"),
        "\u{1}\u{2}\u{3} nonsense\r\n\r\n".to_owned(),
    ];
    for request in &cases {
        let answer = raw(s.port, request).await;
        let message = assert_invalid(&answer);
        assert!(message.contains("RFC 9112"), "{message}");
        let (head, _) = split(&answer);
        assert!(head.contains("connection: close"), "{answer}");
    }
    // To a HEAD request the refusal has its head only (RFC 9110 §9.3.2).
    let answer = raw(
        s.port,
        &format!("HEAD /v1/models HTTP/1.1\r\n{host}X-Folded: a\r\n b\r\n\r\n"),
    )
    .await;
    let (head, body) = split(&answer);
    assert!(
        head.starts_with("http/1.1 400") && head.contains("x-request-id:"),
        "{answer}"
    );
    assert!(body.is_empty(), "{answer}");
    // A refusal pipelined behind a served request on a kept-alive connection is answered too,
    let answer = raw(
        s.port,
        &format!(
            "{}GET /v1/models HTTP/1.1\r\n{host}{auth}X-Folded: a\r\n b\r\n\r\n",
            models(key)
        ),
    )
    .await;
    let second = answer.find("HTTP/1.1 400").expect("the second is refused");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // Bodiless: the edge cannot tell whether a head that followed another was a HEAD.
    let (head, body) = split(&answer[second..]);
    assert!(
        head.contains("x-request-id:") && head.contains("connection: close"),
        "{answer}"
    );
    assert!(
        head.contains("content-length: 0") && body.is_empty(),
        "{answer}"
    );
    assert_eq!(
        s.stats.requests.load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    let metrics = s.metrics().await;
    assert!(
        metrics.contains(&format!(
            "moltghost_connections_closed_total{{reason=\"malformed_head\"}} {}",
            cases.len() + 2
        )),
        "{metrics}"
    );
    // The edge's own requests are untouched: a served one still answers 200.
    let one = raw(
        s.port,
        &format!("GET /v1/models HTTP/1.1\r\n{host}{auth}Connection: close\r\n\r\n"),
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

/// A request for the models list on `agent`, kept alive.
fn models(key: &str) -> String {
    format!("GET /v1/models HTTP/1.1\r\nHost: abc123.agent.localhost\r\nAuthorization: Bearer {key}\r\n\r\n")
}

/// Reads what the edge sends within `within`; whether it then closed the connection.
async fn read_for(conn: &mut TcpStream, within: Duration) -> (String, bool) {
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    let until = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(until, conn.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&got).into_owned(), true),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => return (String::from_utf8_lossy(&got).into_owned(), false),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_whose_framing_is_lost_ends_the_connection() {
    let s = Stack::start("").await;
    for size in ["ffffffffffffffffffff", "-1", "zz", "0x5"] {
        let mut conn = TcpStream::connect(("127.0.0.1", s.port)).await.unwrap();
        let req = format!(
            "POST /v1/chat HTTP/1.1\r\nHost: abc123.agent.localhost\r\nAuthorization: Bearer {}\r\n\
             Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n{size}\r\nhello\r\n0\r\n\r\n{}",
            s.key,
            models(&s.key)
        );
        conn.write_all(req.as_bytes()).await.unwrap();
        let (answer, closed) = read_for(&mut conn, Duration::from_secs(10)).await;
        assert!(closed, "{size}: the connection is held: {answer}");
        assert_eq!(answer.matches("HTTP/1.1 ").count(), 1, "{size}: {answer}");
        assert!(
            assert_invalid(&answer).contains("malformed"),
            "{size}: {answer}"
        );
        assert!(split(&answer).0.contains("connection: close"), "{answer}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_in_order() {
    let s = Stack::start("").await;
    let mut conn = TcpStream::connect(("127.0.0.1", s.port)).await.unwrap();
    let body = r#"{"messages":[{"role":"user","content":"Hello"}]}"#;
    let chat = format!(
        "POST /v1/chat HTTP/1.1\r\nHost: abc123.agent.localhost\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        s.key,
        body.len()
    );
    // Three requests in one write: a bodyless one, one with a body, and one that closes.
    let last = models(&s.key).replace("\r\n\r\n", "\r\nConnection: close\r\n\r\n");
    conn.write_all(format!("{}{chat}{last}", models(&s.key)).as_bytes())
        .await
        .unwrap();
    let (answer, closed) = read_for(&mut conn, Duration::from_secs(10)).await;
    assert!(closed, "{answer}");
    let statuses: Vec<_> = answer.match_indices("HTTP/1.1 200").collect();
    assert_eq!(statuses.len(), 3, "{answer}");
    let chat_at = answer.find("chat.completion").unwrap();
    let models_at: Vec<_> = answer
        .match_indices("\"object\":\"list\"")
        .map(|(i, _)| i)
        .collect();
    assert!(models_at[0] < chat_at && chat_at < models_at[1], "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_meet_total_deadlines() {
    let s = Stack::start(
        "[limits]\nheader_timeout = \"2s\"\nbody_timeout = \"2s\"\nkeepalive_idle = \"1s\"\n",
    )
    .await;
    // Slowloris: one header line every half second, each well within any per-read timeout:
    // 408 JSON at the header's total deadline, and the connection closes.
    let mut conn = TcpStream::connect(("127.0.0.1", s.port)).await.unwrap();
    let t0 = std::time::Instant::now();
    conn.write_all(b"GET /v1/models HTTP/1.1\r\nHost: abc123.agent.localhost\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    for i in 0..10 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let line = format!("X-Slow-{i}: 1\r\n");
        if conn.write_all(line.as_bytes()).await.is_err() {
            break;
        }
        let (got, gone) = read_for(&mut conn, Duration::from_millis(10)).await;
        answer.push_str(&got);
        if gone {
            break;
        }
    }
    let took = t0.elapsed();
    let (more, _) = read_for(&mut conn, Duration::from_secs(1)).await;
    answer.push_str(&more);
    let (head, body) = split(&answer);
    assert!(head.starts_with("http/1.1 408"), "{answer}");
    assert!(
        head.contains("x-request-id:") && head.contains("connection: close"),
        "{answer}"
    );
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["code"], "request_timeout");
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(4),
        "{took:?}"
    );

    // A connection that sends nothing is idle, not slow: closed without an answer.
    let mut conn = TcpStream::connect(("127.0.0.1", s.port)).await.unwrap();
    let (nothing, closed) = read_for(&mut conn, Duration::from_secs(5)).await;
    assert!(closed && nothing.is_empty(), "{nothing}");

    // A body that stalls: 408 JSON at its deadline, and the connection closes.
    let mut conn = TcpStream::connect(("127.0.0.1", s.port)).await.unwrap();
    conn.write_all(
        format!(
            "POST /v1/chat HTTP/1.1\r\nHost: abc123.agent.localhost\r\nAuthorization: Bearer {}\r\n\
             Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"messages\"",
            s.key
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let (answer, closed) = read_for(&mut conn, Duration::from_secs(6)).await;
    assert!(closed, "{answer}");
    let (head, body) = split(&answer);
    assert!(head.starts_with("http/1.1 408"), "{answer}");
    assert!(head.contains("x-request-id:"), "{answer}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["code"], "request_timeout");

    // A kept-alive connection left idle is closed after keepalive_idle.
    let mut conn = TcpStream::connect(("127.0.0.1", s.port)).await.unwrap();
    conn.write_all(models(&s.key).as_bytes()).await.unwrap();
    let (answer, closed) = read_for(&mut conn, Duration::from_secs(4)).await;
    assert!(answer.starts_with("HTTP/1.1 200") && closed, "{answer}");
    let metrics = s.metrics().await;
    assert!(
        metrics.contains("moltghost_connections_closed_total{reason=\"header_timeout\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("moltghost_connections_closed_total{reason=\"idle\"} 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_cap_are_refused_clearly() {
    let s = Stack::start("[limits]\nmax_connections = 3\n").await;
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut conn = TcpStream::connect(("127.0.0.1", s.port)).await.unwrap();
        conn.write_all(models(&s.key).as_bytes()).await.unwrap();
        let (answer, _) = read_for(&mut conn, Duration::from_millis(500)).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        held.push(conn);
    }
    let answer = raw(s.port, &models(&s.key)).await;
    let (head, body) = split(&answer);
    assert!(head.starts_with("http/1.1 503"), "{answer}");
    assert!(
        head.contains("retry-after: 1") && head.contains("x-request-id:"),
        "{answer}"
    );
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["code"], "overloaded");
    let metrics = s.metrics().await;
    assert!(
        metrics.contains("moltghost_connections_open 3"),
        "{metrics}"
    );
    assert!(
        metrics.contains("moltghost_connections_closed_total{reason=\"over_limit\"} 1"),
        "{metrics}"
    );
    // Once one closes, a new connection is served.
    held.pop();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let answer = raw(
        s.port,
        &models(&s.key).replace("\r\n\r\n", "\r\nConnection: close\r\n\r\n"),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_given_up_on() {
    let s = Stack::start("[limits]\nsend_timeout = \"1s\"\n").await;
    let body = r#"{"model":"m","messages":[{"role":"user","content":"Hello"}],"stream":true}"#;
    let mut conn = TcpStream::connect(("127.0.0.1", s.port)).await.unwrap();
    conn.write_all(
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: abc123.agent.localhost\r\n\
             Authorization: Bearer {}\r\nContent-Type: application/json\r\nx-mock-tokens: 400000\r\n\
             Content-Length: {}\r\n\r\n{body}",
            s.key,
            body.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    // Reads nothing while the answer fills the socket's buffers, then everything there is.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let (answer, closed) = read_for(&mut conn, Duration::from_secs(30)).await;
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "{}",
        &answer[..200.min(answer.len())]
    );
    assert!(closed, "the edge still holds the connection");
    assert!(!answer.contains("[DONE]"), "the whole answer was delivered");
}
