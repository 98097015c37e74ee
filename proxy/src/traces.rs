//! Request spans, exported over OTLP (HTTP with protobuf, or gRPC: `traces.otlp_protocol`) to
//! the collector `traces.otlp_endpoint` names. A request's spans are built once it ends, from the instants its [`AccessRecord`]
//! already holds (no span object lives on the request path), and handed to a background task
//! that batches them and posts them: the request never waits for the collector, and a full
//! queue drops spans rather than hold anything.
//!
//! The tree, in the request's trace (the client's, continued, or the edge's own): the request's
//! span (`SERVER`, the edge's span id that the runtime got as its parent), and its phases as
//! children: `admission` (key, agent, lifecycle, request rate), `prepare` (the body, request
//! plugins, translation), `open` (stream cap, quota reservation, a wait for a lease draw
//! included, caller identity), `upstream` (`CLIENT`: connect and the runtime's response
//! header), `first token` (for streams) and `relay` (the answer, until it ends and its usage
//! is settled). A request refused before the runtime has what it reached, then `edge`.

use std::time::{Duration, Instant, SystemTime};

use moltghost_common::otlp::{self, attr, int, SpanExporter, SpanQueue};
use opentelemetry_proto::tonic::trace::v1::{span::SpanKind, status, Span, Status};

use crate::access::AccessRecord;

/// How spans travel to the collector (OpenTelemetry's names for them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Protocol {
    /// `http/protobuf`: `POST <endpoint>/v1/traces`.
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
    /// `grpc`: the `TraceService/Export` unary call, HTTP/2 without TLS upgrade.
    #[serde(rename = "grpc")]
    Grpc,
}

/// Where spans go and how many (`[traces]`).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TraceSettings {
    /// The collector's OTLP base URL; `None`: no export.
    pub otlp_endpoint: Option<String>,
    /// How spans travel to it.
    pub otlp_protocol: Protocol,
    /// The share of traces exported, decided by trace id (0 to 1), among those the client did
    /// not mark unsampled.
    pub sampling_ratio: f64,
}

impl Default for TraceSettings {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            otlp_protocol: Protocol::HttpProtobuf,
            sampling_ratio: 1.0,
        }
    }
}

/// The request path's side: turns finished requests into spans and queues them.
#[derive(Debug)]
pub struct Spans {
    queue: SpanQueue,
    /// Trace ids whose low 64 bits are under this are exported.
    threshold: u64,
}

/// The background side: batches the queued spans and sends them to the collector by the
/// configured protocol.
#[derive(Debug)]
pub struct Exporter {
    inner: SpanExporter,
    protocol: Protocol,
}

impl Spans {
    /// The two sides for `settings`, or `None` when export is off.
    pub fn new(settings: &TraceSettings, edge_id: &str) -> Option<(Self, Exporter)> {
        let endpoint = settings.otlp_endpoint.as_ref()?;
        let threshold = (settings.sampling_ratio.clamp(0.0, 1.0) * u64::MAX as f64) as u64;
        let path = match settings.otlp_protocol {
            Protocol::HttpProtobuf => "/v1/traces",
            Protocol::Grpc => "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
        };
        let url = format!("{}{path}", endpoint.trim_end_matches('/'));
        let (queue, inner) = otlp::channel(url, "moltghost-edge", edge_id);
        let exporter = Exporter {
            inner,
            protocol: settings.otlp_protocol,
        };
        Some((Self { queue, threshold }, exporter))
    }

    /// Queues the spans of request `r` (its `method`), if its trace is sampled.
    pub fn record(&self, r: &AccessRecord, method: &str) {
        let low = u64::from_be_bytes(r.trace.trace_id[8..].try_into().expect("8 bytes"));
        if r.trace.flags & 1 == 0 || low > self.threshold {
            return;
        }
        self.queue
            .push(spans_of(r, method, SystemTime::now(), Instant::now()));
    }
}

/// One `TraceService/Export` call, made as the plugins' gRPC calls are.
async fn grpc_export(url: &str, message: Vec<u8>) -> Result<(), String> {
    use crate::plugins::{callout::CallRequest, grpc};
    let call = CallRequest {
        token: 0,
        url: url::Url::parse(url).map_err(|e| e.to_string())?,
        method: http::Method::POST,
        headers: vec![
            ("content-type".into(), b"application/grpc".to_vec()),
            ("te".into(), b"trailers".to_vec()),
        ],
        body: grpc::frame(&message).to_vec(),
        timeout: Duration::from_secs(10),
        grpc: true,
        via: None,
    };
    grpc::perform(call, 64 << 10)
        .await
        .map(drop)
        .map_err(|s| format!("gRPC status {}: {}", s.code, s.message))
}

/// The spans of a request that ended at `now` (`wall` on the system clock).
fn spans_of(r: &AccessRecord, method: &str, wall: SystemTime, now: Instant) -> Vec<Span> {
    let unix = |t: Instant| otlp::unix_nanos(wall - now.saturating_duration_since(t));
    let route = r.route.map(|r| r.path()).unwrap_or("-");
    let mut attributes = vec![
        attr("http.request.method", method),
        attr("http.route", route),
        int("http.response.status_code", i64::from(r.status)),
        attr("moltghost.request_id", &r.request_id),
    ];
    for (key, value) in [
        ("moltghost.agent", &r.agent),
        ("moltghost.account", &r.account),
        ("moltghost.key_id", &r.key_id),
    ] {
        if let Some(v) = value {
            attributes.push(attr(key, v));
        }
    }
    if let Some(model) = &r.model {
        attributes.push(attr("gen_ai.request.model", model));
    }
    if let Some((input, output)) = r.usage {
        attributes.push(int("gen_ai.usage.input_tokens", input as i64));
        attributes.push(int("gen_ai.usage.output_tokens", output as i64));
    }
    if let Some(code) = r.error {
        attributes.push(attr("error.type", code));
    }
    let failed = r.status >= 500;
    let root = Span {
        trace_id: r.trace.trace_id.to_vec(),
        span_id: r.trace.span_id.to_vec(),
        parent_span_id: r.trace_parent.map(|p| p.to_vec()).unwrap_or_default(),
        flags: u32::from(r.trace.flags),
        name: format!("{method} {route}"),
        kind: SpanKind::Server as i32,
        start_time_unix_nano: unix(r.started),
        end_time_unix_nano: unix(now),
        attributes,
        status: Some(Status {
            code: if failed {
                status::StatusCode::Error
            } else {
                status::StatusCode::Unset
            } as i32,
            message: r.error.unwrap_or_default().to_owned(),
        }),
        ..Default::default()
    };
    let mut spans = vec![root];
    let mut child = |name: &str, kind: SpanKind, from: Instant, to: Instant| {
        spans.push(Span {
            trace_id: r.trace.trace_id.to_vec(),
            span_id: otlp::span_id().to_vec(),
            parent_span_id: r.trace.span_id.to_vec(),
            flags: u32::from(r.trace.flags),
            name: name.to_owned(),
            kind: kind as i32,
            start_time_unix_nano: unix(from),
            end_time_unix_nano: unix(to),
            ..Default::default()
        });
    };
    // The edge's own phases, each ending where the next starts (a phase the request never
    // reached is left out).
    let sent = r.upstream_sent.unwrap_or(now);
    let mut from = r.started;
    for (name, until) in [
        ("admission", r.admitted),
        ("prepare", r.prepared),
        ("open", r.upstream_sent),
    ] {
        let Some(until) = until else { break };
        child(name, SpanKind::Internal, from, until);
        from = until;
    }
    if from < sent {
        child("edge", SpanKind::Internal, from, sent);
    }
    if let Some(sent) = r.upstream_sent {
        let header = r.first_byte.unwrap_or(now);
        child("upstream", SpanKind::Client, sent, header);
        if let Some(first) = r.first_byte {
            if let Some(token) = r.first_token {
                child("first token", SpanKind::Internal, first, token);
            }
            child("relay", SpanKind::Internal, first, now);
        }
    }
    spans
}

impl Exporter {
    /// Batches what [`Spans::record`] queued and sends it, until the queue closes.
    pub async fn run(self) {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .expect("an HTTP client");
        let protocol = self.protocol;
        self.inner
            .run(|url, body| {
                let client = client.clone();
                async move {
                    match protocol {
                        Protocol::HttpProtobuf => otlp::post_protobuf(&client, url, body).await,
                        Protocol::Grpc => grpc_export(&url, body).await,
                    }
                }
            })
            .await;
    }
}
