//! `GET /ws`: the WebSocket bridge against a real edge and runtime, with a real client
//! (`tokio-tungstenite`): frames, many messages per socket, both ways to carry the key, the
//! error table as frames, limits, cancel, revocation and pause ending open sockets.

mod common;

use std::time::Duration;

use common::Stack;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The upgrade request for agent `agent` on `s`, with `headers`.
fn request(
    s: &Stack,
    agent: &str,
    headers: &[(&str, String)],
) -> tungstenite::handshake::client::Request {
    let mut req = format!("ws://127.0.0.1:{}/ws", s.port)
        .into_client_request()
        .unwrap();
    req.headers_mut().insert(
        "host",
        format!("{agent}.agent.localhost:{}", s.port)
            .parse()
            .unwrap(),
    );
    for (k, v) in headers {
        req.headers_mut().insert(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    req
}

async fn connect(s: &Stack, headers: &[(&str, String)]) -> Ws {
    let (ws, resp) = tokio_tungstenite::connect_async(request(s, "abc123", headers))
        .await
        .unwrap_or_else(|e| panic!("upgrade refused: {e:?}\n{}", s.log()));
    assert_eq!(resp.status(), 101);
    assert!(resp.headers().contains_key("x-request-id"));
    ws
}

fn bearer(key: &str) -> (&'static str, String) {
    ("authorization", format!("Bearer {key}"))
}

/// The next JSON frame (pings and pongs skipped), within 10 s.
async fn frame(ws: &mut Ws) -> Value {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("a frame within 10 s")
            .expect("the socket is open")
            .expect("a valid frame");
        match m {
            Message::Text(t) => return serde_json::from_str(&t).unwrap(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// Sends a message and reads its answer: the text and the last frame.
async fn ask(ws: &mut Ws, body: Value) -> (String, Value) {
    ws.send(Message::text(body.to_string())).await.unwrap();
    let mut text = String::new();
    loop {
        let f = frame(ws).await;
        if f.get("error").is_some() || f["done"] == true {
            return (text, f);
        }
        assert_eq!(f["done"], false, "{f}");
        text += f["content"].as_str().unwrap();
    }
}

fn hello() -> Value {
    json!({"action": "message", "messages": [{"role": "user", "content": "Hello!"}]})
}

/// The close frame's code, once the edge closes.
async fn close_code(ws: &mut Ws) -> u16 {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("the edge closes within 10 s")
        {
            Some(Ok(Message::Close(Some(f)))) => return f.code.into(),
            Some(Ok(Message::Close(None))) | None => return 1005,
            Some(Ok(_)) => continue,
            Some(Err(e)) => panic!("{e:?}"),
        }
    }
}

#[tokio::test]
async fn messages_stream_as_frames_on_one_socket() {
    let s = Stack::start("").await;
    let mut ws = connect(&s, &[bearer(&s.key)]).await;
    for round in 0..3 {
        let (text, done) = ask(&mut ws, hello()).await;
        assert!(!text.is_empty(), "round {round}");
        assert_eq!(done["done"], true);
        assert_eq!(done["finish_reason"], "stop");
        let usage = &done["usage"];
        assert!(usage["completion_tokens"].as_u64().unwrap() > 0, "{done}");
        assert_eq!(
            usage["total_tokens"].as_u64().unwrap(),
            usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
        );
    }
    // The native options travel: max_tokens caps the answer.
    let mut capped = hello();
    capped["max_tokens"] = json!(3);
    let (_, done) = ask(&mut ws, capped).await;
    assert_eq!(done["usage"]["completion_tokens"], 3, "{done}");
    assert_eq!(done["finish_reason"], "length");
    // Ping → pong.
    ws.send(Message::Ping(b"hi".to_vec().into())).await.unwrap();
    match ws.next().await.unwrap().unwrap() {
        Message::Pong(p) => assert_eq!(&p[..], b"hi"),
        other => panic!("{other:?}"),
    }
    // Bad messages get error frames; the socket stays usable.
    for (bad, code) in [
        (json!({"messages": []}), "invalid_request"),
        (json!({"action": "dance"}), "invalid_request"),
        (
            json!({"action": "message", "messages": "x"}),
            "invalid_request",
        ),
        (
            json!({"action": "message", "messages": [{"role": "user", "content": "x"}], "timeout_seconds": 99999999}),
            "invalid_request",
        ),
    ] {
        let (_, f) = ask(&mut ws, bad).await;
        assert_eq!(f["error"]["code"], code, "{f}");
        assert!(f["error"]["message"].as_str().unwrap().len() > 5);
    }
    ws.send(Message::Binary(vec![1, 2].into())).await.unwrap();
    assert_eq!(frame(&mut ws).await["error"]["code"], "invalid_request");
    let (text, _) = ask(&mut ws, hello()).await;
    assert!(!text.is_empty());
    // A clean close: the client's 1000 echoed.
    ws.close(Some(tungstenite::protocol::CloseFrame {
        code: tungstenite::protocol::frame::coding::CloseCode::Normal,
        reason: "".into(),
    }))
    .await
    .unwrap();
    assert_eq!(close_code(&mut ws).await, 1000);

    // Every answered message is accounted: 5 answers (4 + the capped one) under the test key.
    let line = s.ledger_for("tests", 5).await;
    assert!(line["total_tokens"].as_u64().unwrap() > 0, "{line}");
    // And each has its own access-log line, method WS, route /ws; the key never appears.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = s.log();
    let lines = log
        .lines()
        .filter(|l| l.contains("\"method\":\"WS\"") && l.contains("\"route\":\"/ws\""))
        .count();
    assert_eq!(lines, 9, "{log}");
    assert!(!log.contains(&s.key));
    let metrics = s.metrics().await;
    assert!(
        metrics.contains(
            "moltghost_requests_total{agent=\"abc123\",code=\"\",route=\"/ws\",status=\"200\"}"
        ),
        "{metrics}"
    );
    assert!(metrics.contains("moltghost_open_websockets 0"), "{metrics}");
}

#[tokio::test]
async fn keys_are_checked_before_the_upgrade() {
    let s = Stack::start("").await;
    for headers in [
        vec![],
        vec![bearer("molti_nope_nope")],
        vec![(
            "sec-websocket-protocol",
            "moltghost, bearer.molti_x_y".to_string(),
        )],
    ] {
        match tokio_tungstenite::connect_async(request(&s, "abc123", &headers)).await {
            Err(tungstenite::Error::Http(resp)) => {
                assert_eq!(resp.status(), 401);
                let body: Value = serde_json::from_slice(resp.body().as_deref().unwrap()).unwrap();
                assert_eq!(body["error"]["code"], "invalid_api_key");
            }
            other => panic!("{headers:?}: {other:?}"),
        }
    }
    // A browser's key in the subprotocol; the edge picks `moltghost` and never echoes the key.
    let (mut ws, resp) = tokio_tungstenite::connect_async(request(
        &s,
        "abc123",
        &[(
            "sec-websocket-protocol",
            format!("moltghost, bearer.{}", s.key),
        )],
    ))
    .await
    .unwrap();
    assert_eq!(resp.headers()["sec-websocket-protocol"], "moltghost");
    let (text, _) = ask(&mut ws, hello()).await;
    assert!(!text.is_empty());
    // The agent's lifecycle is checked before the upgrade too, with the table's statuses.
    for (agent, status) in [("paused1", 503), ("gone1", 410), ("init1", 202)] {
        match tokio_tungstenite::connect_async(request(&s, agent, &[bearer(&s.key)])).await {
            Err(tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), status, "{agent}"),
            other => panic!("{agent}: {other:?}"),
        }
    }
    // Not a WebSocket handshake: a clear 400.
    let r = s.client().get(s.url("abc123", "/ws")).send().await.unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Upgrade"),
        "{body}"
    );
}

#[tokio::test]
async fn limits_apply_per_message() {
    let s = Stack::start(
        "[[plans]]\nname = \"small\"\nrequests_per_minute = 4\ntokens_per_month = 100000\nconcurrent_streams = 4\n\
         [[plans]]\nname = \"tiny\"\nrequests_per_minute = 1000\ntokens_per_month = 60\nconcurrent_streams = 4\n",
    )
    .await;
    for (plan, code) in [("small", "rate_limited"), ("tiny", "quota_exceeded")] {
        s.admin_post("/v1/admin/accounts", json!({"name": plan, "plan": plan}))
            .await;
        s.admin_post("/v1/admin/agents", json!({"name": format!("{plan}-agent"), "endpoint_id": format!("{plan}1"), "account": plan, "upstream": format!("http://{}", s.runtime)}))
            .await;
        let key = s
            .admin_post("/v1/admin/keys", json!({"name": plan, "account": plan}))
            .await["key"]
            .as_str()
            .unwrap()
            .to_owned();
        tokio::time::sleep(Duration::from_millis(600)).await;
        let (mut ws, _) =
            tokio_tungstenite::connect_async(request(&s, &format!("{plan}1"), &[bearer(&key)]))
                .await
                .unwrap_or_else(|e| panic!("{plan}: {e:?}\n{}", s.log()));
        let mut refused = None;
        for _ in 0..8 {
            let (_, last) = ask(&mut ws, hello()).await;
            if let Some(e) = last.get("error") {
                refused = Some(e.clone());
                break;
            }
        }
        let e = refused.unwrap_or_else(|| panic!("{plan}: never refused"));
        assert_eq!(e["code"], code, "{plan}: {e}");
        // A refused message leaves the socket open: the next one is answered (or refused) too.
        let (_, next) = ask(&mut ws, hello()).await;
        assert!(
            next.get("error").is_some() || next["done"] == true,
            "{next}"
        );
    }
}

#[tokio::test]
async fn cancel_stops_the_answer_and_revocation_and_pause_close_the_socket() {
    let s = Stack::start("").await;
    let slow = [
        bearer(&s.key),
        ("x-mock-interval-ms", "50".to_string()),
        ("x-mock-tokens", "200".to_string()),
    ];
    let mut ws = connect(&s, &slow).await;
    ws.send(Message::text(hello().to_string())).await.unwrap();
    assert_eq!(frame(&mut ws).await["done"], false);
    ws.send(Message::text(json!({"action": "cancel"}).to_string()))
        .await
        .unwrap();
    let done = loop {
        let f = frame(&mut ws).await;
        if f["done"] == true {
            break f;
        }
    };
    assert_eq!(done["finish_reason"], "cancelled", "{done}");

    // A key revoked mid-answer: an error frame, then close 1008.
    let k = s
        .admin_post(
            "/v1/admin/keys",
            json!({"name": "doomed", "account": "default"}),
        )
        .await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let mut ws = connect(
        &s,
        &[
            bearer(k["key"].as_str().unwrap()),
            ("x-mock-interval-ms", "50".to_string()),
            ("x-mock-tokens", "200".to_string()),
        ],
    )
    .await;
    ws.send(Message::text(hello().to_string())).await.unwrap();
    assert_eq!(frame(&mut ws).await["done"], false);
    s.admin_post("/v1/admin/keys/revoke", json!({"id": k["id"]}))
        .await;
    let err = loop {
        let f = frame(&mut ws).await;
        if f.get("error").is_some() {
            break f;
        }
    };
    assert_eq!(err["error"]["code"], "invalid_api_key");
    // Then the close, and nothing between (one error frame, not two).
    match ws.next().await.unwrap().unwrap() {
        Message::Close(Some(f)) => assert_eq!(u16::from(f.code), 1008),
        other => panic!("{other:?}"),
    }

    // An idle socket whose agent is paused: close 1013 (try again later).
    let mut ws = connect(&s, &[bearer(&s.key)]).await;
    let (text, _) = ask(&mut ws, hello()).await;
    assert!(!text.is_empty());
    s.admin_post("/v1/admin/agents/abc123/pause", json!({}))
        .await;
    let err = frame(&mut ws).await;
    assert_eq!(err["error"]["code"], "agent_paused", "{err}");
    assert_eq!(close_code(&mut ws).await, 1013);
    s.admin_post("/v1/admin/agents/abc123/start", json!({}))
        .await;
}

#[tokio::test]
async fn idle_sockets_are_pinged_and_silent_ones_closed() {
    let s = Stack::start("[limits]\nwebsocket_ping_interval = \"1s\"\n").await;
    // A client that reads answers the edge's pings (tungstenite pongs as it reads): it stays.
    let mut alive = connect(&s, &[bearer(&s.key)]).await;
    // One that reads nothing for 3.5 s never pongs: closed with 1001 after two silent intervals.
    let mut silent = connect(&s, &[bearer(&s.key)]).await;
    let reader = tokio::spawn(async move {
        let mut pings = 0;
        let deadline = tokio::time::Instant::now() + Duration::from_millis(3500);
        while let Ok(Some(m)) = tokio::time::timeout_at(deadline, alive.next()).await {
            if let Ok(Message::Ping(_)) = m {
                pings += 1;
            }
        }
        (alive, pings)
    });
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let (mut alive, pings) = reader.await.unwrap();
    assert!(pings >= 2, "{pings} pings");
    let (text, _) = ask(&mut alive, hello()).await;
    assert!(!text.is_empty(), "the answering client is still served");
    assert_eq!(close_code(&mut silent).await, 1001);
}
