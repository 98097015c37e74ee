//! OpenTelemetry traces: the edge's request spans reach an OTLP/HTTP collector of the test's
//! own (decoded with `opentelemetry-proto`), in the client's trace, with the span the runtime
//! got as its parent.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use common::{PodProc, Stack};
use moltghost_protocol::trace::Hex;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use serde_json::json;

type Received = Arc<Mutex<Vec<Span>>>;

/// An OTLP/HTTP collector on loopback that keeps every span it is sent.
async fn collector() -> (u16, Received) {
    let spans: Received = Arc::default();
    let app = axum::Router::new()
        .route(
            "/v1/traces",
            axum::routing::post(|State(spans): State<Received>, body: Bytes| async move {
                let req = ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
                keep(req, &spans);
                ""
            }),
        )
        .with_state(spans.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (port, spans)
}

/// Keeps the spans of an export, checking that each batch names the edge (or a pod's sidecar)
/// as its service.
fn keep(req: ExportTraceServiceRequest, kept: &Received) {
    for rs in req.resource_spans {
        let resource = rs.resource.expect("a resource");
        assert!(resource.attributes.iter().any(|a| a.key == "service.name"
            && matches!(&a.value.as_ref().unwrap().value, Some(Any::StringValue(v)) if v == "moltghost-edge" || v == "moltghost-pod")));
        for ss in rs.scope_spans {
            kept.lock().unwrap().extend(ss.spans);
        }
    }
}

fn hex(b: &[u8]) -> String {
    Hex(b).to_string()
}

/// An edge that exports its spans to the collector on `port` by `protocol`.
async fn edge_exporting(port: u16, protocol: &str) -> Stack {
    Stack::start(&format!(
        "[traces]\notlp_endpoint = \"http://127.0.0.1:{port}\"\notlp_protocol = \"{protocol}\"\n"
    ))
    .await
}

/// The spans received once `enough` says so (within 10 s: the exporter batches for 1 s).
async fn spans_until(received: &Received, enough: impl Fn(&[Span]) -> bool) -> Vec<Span> {
    let t0 = Instant::now();
    loop {
        let spans = received.lock().unwrap().clone();
        if enough(&spans) {
            return spans;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "spans received: {spans:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The requests' own spans (`SERVER`), without their phases.
fn requests(spans: &[Span]) -> Vec<&Span> {
    spans
        .iter()
        .filter(|s| s.kind == SpanKind::Server as i32)
        .collect()
}

/// A span's attribute, as text.
fn attribute(span: &Span, key: &str) -> Option<String> {
    let v = span.attributes.iter().find(|a| a.key == key)?;
    match v.value.as_ref()?.value.as_ref()? {
        Any::StringValue(s) => Some(s.clone()),
        Any::IntValue(i) => Some(i.to_string()),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_spans_reach_an_otlp_collector_in_the_clients_trace() {
    let (port, received) = collector().await;
    let s = edge_exporting(port, "http/protobuf").await;
    let c = s.client();
    let client_trace = "0af7651916cd43dd8448eb211c80319c";
    let r = c
        .post(s.url("abc123", "/v1/chat/completions"))
        .header(
            "traceparent",
            format!("00-{client_trace}-b7ad6b7169203331-01"),
        )
        .header("x-mock-echo", "traceparent")
        .json(&json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let runtime_parent = r.headers()["x-mock-echoed"]
        .to_str()
        .unwrap()
        .split('-')
        .nth(2)
        .unwrap()
        .to_owned();
    r.bytes().await.unwrap();
    // A stream, in a trace of the edge's own.
    let r = c
        .post(s.url("abc123", "/v1/chat/completions"))
        .json(&json!({"messages": [{"role": "user", "content": "hi"}], "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();

    let spans = spans_until(&received, |s| requests(s).len() >= 2).await;
    let roots = requests(&spans);
    let traced = roots
        .iter()
        .find(|r| hex(&r.trace_id) == client_trace)
        .expect("the client's trace continued");
    assert_eq!(
        hex(&traced.parent_span_id),
        "b7ad6b7169203331",
        "the client's span is the parent"
    );
    assert_eq!(
        hex(&traced.span_id),
        runtime_parent,
        "the runtime's parent is the edge's span"
    );
    assert_eq!(traced.name, "POST /v1/chat/completions");
    for (key, want) in [
        ("http.response.status_code", "200"),
        ("moltghost.agent", "abc123"),
        ("gen_ai.usage.output_tokens", "3"),
        ("gen_ai.request.model", "m"),
    ] {
        assert_eq!(attribute(traced, key).as_deref(), Some(want), "{key}");
    }
    assert!(attribute(traced, "moltghost.key_id").is_some());
    assert!(attribute(traced, "gen_ai.usage.input_tokens").is_some());
    // Never a key.
    let secret = s.key.rsplit('_').next().unwrap();
    assert!(!format!("{spans:?}").contains(secret));

    let children = |root: &Span| -> Vec<String> {
        let mut names: Vec<String> = spans
            .iter()
            .filter(|s| s.parent_span_id == root.span_id && s.trace_id == root.trace_id)
            .inspect(|s| {
                assert!(s.start_time_unix_nano >= root.start_time_unix_nano, "{s:?}");
                assert!(s.end_time_unix_nano <= root.end_time_unix_nano, "{s:?}");
            })
            .map(|s| s.name.clone())
            .collect();
        names.sort();
        names
    };
    assert_eq!(
        children(traced),
        ["admission", "open", "prepare", "relay", "upstream"]
    );
    let stream = roots
        .iter()
        .find(|r| hex(&r.trace_id) != client_trace)
        .unwrap();
    assert!(
        stream.parent_span_id.is_empty(),
        "a trace of the edge's own"
    );
    assert_eq!(
        children(stream),
        [
            "admission",
            "first token",
            "open",
            "prepare",
            "relay",
            "upstream"
        ]
    );
}

/// A gRPC collector on loopback (HTTP/2 without TLS, as OTLP/gRPC runs in a cluster): it checks
/// the method and the framing, keeps the spans, and answers a trailers-only OK.
async fn grpc_collector() -> (u16, Received) {
    let spans: Received = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let kept = spans.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let kept = kept.clone();
            tokio::spawn(async move {
                let mut conn = h2::server::handshake(socket).await.unwrap();
                // Each call on a task of its own: the connection must go on being polled
                // for a call's body to arrive.
                while let Some(Ok((req, respond))) = conn.accept().await {
                    tokio::spawn(export(req, respond, kept.clone()));
                }
            });
        }
    });
    (port, spans)
}

/// One `Export` call: checks and decodes it, keeps its spans, answers a trailers-only OK.
async fn export(
    req: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<bytes::Bytes>,
    kept: Received,
) {
    assert_eq!(
        req.uri().path(),
        "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
    );
    assert_eq!(req.headers()["content-type"], "application/grpc");
    let mut body = req.into_body();
    let mut message = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        let _ = body.flow_control().release_capacity(chunk.len());
        message.extend_from_slice(&chunk);
    }
    let len = u32::from_be_bytes(message[1..5].try_into().unwrap()) as usize;
    assert_eq!(
        (message[0], message.len()),
        (0, 5 + len),
        "one uncompressed frame"
    );
    let req = ExportTraceServiceRequest::decode(&message[5..]).unwrap();
    keep(req, &kept);
    let ok = http::Response::builder()
        .status(200)
        .header("content-type", "application/grpc")
        .header("grpc-status", "0")
        .body(())
        .unwrap();
    respond.send_response(ok, true).unwrap();
}

/// `traces.otlp_protocol = "grpc"`: the same spans, by the `TraceService/Export` call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_spans_reach_a_grpc_collector() {
    let (port, received) = grpc_collector().await;
    let s = edge_exporting(port, "grpc").await;
    let r = s
        .client()
        .post(s.url("abc123", "/v1/chat/completions"))
        .header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .json(&json!({"messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();
    let spans = spans_until(&received, |s| !requests(s).is_empty()).await;
    let root = requests(&spans)[0];
    assert_eq!(hex(&root.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(hex(&root.parent_span_id), "00f067aa0ba902b7");
    assert!(spans.iter().any(|s| s.name == "upstream"), "{spans:?}");
}

/// A WebSocket's messages are spans of their own, children of the upgrade request's span, in
/// the client's trace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_websocket_message_is_a_child_span_of_the_upgrade() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::{client::IntoClientRequest, Message};
    let (port, received) = collector().await;
    let s = edge_exporting(port, "http/protobuf").await;
    let mut req = format!("ws://127.0.0.1:{}/ws", s.port)
        .into_client_request()
        .unwrap();
    for (k, v) in [
        ("host", format!("abc123.agent.localhost:{}", s.port)),
        ("authorization", format!("Bearer {}", s.key)),
        (
            "traceparent",
            "00-5bf92f3577b34da6a3ce929d0e0e4736-10f067aa0ba902b7-01".into(),
        ),
    ] {
        req.headers_mut().insert(k, v.parse().unwrap());
    }
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    for _ in 0..2 {
        let ask = json!({"action": "message", "messages": [{"role": "user", "content": "Hello!"}]});
        ws.send(Message::text(ask.to_string())).await.unwrap();
        loop {
            let Some(Ok(Message::Text(t))) = ws.next().await else {
                continue;
            };
            let v: serde_json::Value = serde_json::from_str(&t).unwrap();
            if v["done"] == true {
                break;
            }
        }
    }
    ws.close(None).await.unwrap();
    // The upgrade request's span comes when the socket ends; each message's at its answer.
    let spans = spans_until(&received, |s| {
        let server = requests(s);
        server.iter().any(|r| r.name.starts_with("GET "))
            && server.iter().filter(|r| r.name.starts_with("WS ")).count() == 2
    })
    .await;
    let server = requests(&spans);
    let upgrade = server.iter().find(|r| r.name.starts_with("GET ")).unwrap();
    assert_eq!(hex(&upgrade.trace_id), "5bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(hex(&upgrade.parent_span_id), "10f067aa0ba902b7");
    for m in server.iter().filter(|r| r.name.starts_with("WS ")) {
        assert_eq!(m.trace_id, upgrade.trace_id);
        assert_eq!(m.parent_span_id, upgrade.span_id, "{m:?}");
    }
}

/// Through a pod: the sidecar (`--otlp-endpoint`) adds a span of its own between the edge's
/// request span and the runtime, which gets the sidecar's span as its parent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pods_sidecar_adds_its_span_between_the_edge_and_the_runtime() {
    let (port, received) = collector().await;
    let (tunnel_cfg, edge_public, _) = common::edge_tunnel_key();
    let s = Stack::start(&format!(
        "{tunnel_cfg}[traces]\notlp_endpoint = \"http://127.0.0.1:{port}\"\n"
    ))
    .await;
    let addr = ([127, 0, 0, 1], common::free_udp_port()).into();
    let collector_url = format!("http://127.0.0.1:{port}");
    let pod = PodProc::start_with(
        addr,
        &edge_public,
        s.runtime,
        &s.admin_url(),
        &["--otlp-endpoint", &collector_url],
    );
    s.admin_post(
        "/v1/admin/agents",
        json!({"name": "traced-pod", "endpoint_id": "traced-pod", "upstream": pod.upstream()}),
    )
    .await;
    let r = s
        .post_as("traced-pod", "/v1/chat/completions", Some(&s.key))
        .header("x-mock-echo", "traceparent")
        .json(&json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let runtime_got = r.headers()["x-mock-echoed"].to_str().unwrap().to_owned();
    r.bytes().await.unwrap();

    let spans = spans_until(&received, |s| {
        s.iter().any(|x| x.name == "pod") && s.iter().any(|x| x.name.starts_with("POST "))
    })
    .await;
    let pod_span = spans.iter().find(|x| x.name == "pod").unwrap();
    let edge = spans.iter().find(|x| x.name.starts_with("POST ")).unwrap();
    assert_eq!(pod_span.trace_id, edge.trace_id);
    assert_eq!(
        pod_span.parent_span_id, edge.span_id,
        "the pod's parent is the edge's span"
    );
    assert_eq!(pod_span.kind, SpanKind::Server as i32);
    assert_eq!(
        runtime_got,
        format!("00-{}-{}-01", hex(&edge.trace_id), hex(&pod_span.span_id)),
        "the runtime's parent is the pod's span"
    );
    assert_eq!(
        attribute(pod_span, "moltghost.agent").as_deref(),
        Some("traced-pod")
    );
    assert_eq!(
        attribute(pod_span, "url.path").as_deref(),
        Some("/v1/chat/completions")
    );
    assert!(pod_span.start_time_unix_nano >= edge.start_time_unix_nano);
    assert!(pod_span.end_time_unix_nano <= edge.end_time_unix_nano);
}
