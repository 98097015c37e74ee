//! Spans to an OpenTelemetry collector (OTLP), off the request path, for the edge and the pod
//! sidecar alike: the request path queues finished spans ([`SpanQueue::push`], never waiting:
//! a full queue drops them), and a background task ([`SpanExporter::run`]) batches them and
//! hands each batch, encoded as an `ExportTraceServiceRequest`, to a transport (HTTP with
//! protobuf here, [`post_protobuf`]; the edge also has gRPC).

use std::future::Future;
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
use prost::Message;
use tokio::sync::mpsc;

/// Requests whose spans wait for export at most (past it a request's spans are dropped).
const QUEUE: usize = 4096;
/// Spans sent in one export at most.
const BATCH: usize = 512;
/// How long a span waits for its batch to fill.
const LINGER: Duration = Duration::from_secs(1);

/// The request path's side: where finished spans go.
#[derive(Debug, Clone)]
pub struct SpanQueue {
    tx: mpsc::Sender<Vec<Span>>,
}

/// The background side: batches the queued spans and exports them.
#[derive(Debug)]
pub struct SpanExporter {
    rx: mpsc::Receiver<Vec<Span>>,
    url: String,
    resource: Resource,
}

/// The two sides, for spans of service `service` (instance `instance`) exported to `url`.
pub fn channel(url: String, service: &str, instance: &str) -> (SpanQueue, SpanExporter) {
    let (tx, rx) = mpsc::channel(QUEUE);
    let resource = Resource {
        attributes: vec![
            attr("service.name", service),
            attr("service.instance.id", instance),
        ],
        ..Default::default()
    };
    (SpanQueue { tx }, SpanExporter { rx, url, resource })
}

impl SpanQueue {
    /// Queues one request's spans; dropped when the collector cannot keep up (spans never hold
    /// a request).
    pub fn push(&self, spans: Vec<Span>) {
        let _ = self.tx.try_send(spans);
    }
}

impl SpanExporter {
    /// Batches what was queued and hands each batch to `send` (with the URL), until the queue
    /// closes. Failures are logged when export starts or stops failing, not for every batch.
    pub async fn run<F, Fut>(mut self, send: F)
    where
        F: Fn(String, Vec<u8>) -> Fut,
        Fut: Future<Output = Result<(), String>>,
    {
        let mut failing = false;
        loop {
            let Some(mut batch) = self.rx.recv().await else {
                return;
            };
            let deadline = tokio::time::Instant::now() + LINGER;
            while batch.len() < BATCH {
                match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                    Ok(Some(more)) => batch.extend(more),
                    Ok(None) | Err(_) => break,
                }
            }
            let body = ExportTraceServiceRequest {
                resource_spans: vec![ResourceSpans {
                    resource: Some(self.resource.clone()),
                    scope_spans: vec![ScopeSpans {
                        scope: Some(InstrumentationScope {
                            name: "moltghost".into(),
                            version: env!("CARGO_PKG_VERSION").into(),
                            ..Default::default()
                        }),
                        spans: batch,
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
            }
            .encode_to_vec();
            match send(self.url.clone(), body).await {
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!(error = %e, collector = %self.url, "trace export failing; spans are dropped");
                }
                Ok(()) if failing => {
                    failing = false;
                    tracing::info!(collector = %self.url, "trace export works again");
                }
                _ => {}
            }
        }
    }
}

/// OTLP over HTTP with protobuf: `POST <url>` (the collector's `/v1/traces`).
pub async fn post_protobuf(
    client: &reqwest::Client,
    url: String,
    body: Vec<u8>,
) -> Result<(), String> {
    client
        .post(url)
        .header("content-type", "application/x-protobuf")
        .body(body)
        .send()
        .await
        .map_err(|e| e.to_string())?
        .error_for_status()
        .map(drop)
        .map_err(|e| e.to_string())
}

/// A new span id: random, never all zeros.
pub fn span_id() -> [u8; 8] {
    let mut id: [u8; 8] = rand::random();
    id[7] |= 1;
    id
}

/// A string attribute.
pub fn attr(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.to_owned())),
        }),
        ..Default::default()
    }
}

/// An integer attribute.
pub fn int(key: &str, value: i64) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(any_value::Value::IntValue(value)),
        }),
        ..Default::default()
    }
}

/// Nanoseconds since the Unix epoch of `t` (0 before it).
pub fn unix_nanos(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}
