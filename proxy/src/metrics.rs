//! Metrics in Prometheus's text format, served by the admin listener at `/metrics`. Every
//! request is recorded once, in the logging phase, from what its context collected.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

use crate::access::AccessRecord;

/// Latency buckets, in seconds: 50 µs to 60 s.
const BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0, 30.0, 60.0,
];

/// The edge's metrics.
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    duration: HistogramVec,
    overhead: HistogramVec,
    upstream_ttfb: HistogramVec,
    ttft: HistogramVec,
    tokens: IntCounterVec,
    plugin_time: HistogramVec,
    /// Streams being relayed now.
    pub open_streams: IntGauge,
    /// WebSockets open now.
    pub open_websockets: IntGauge,
    /// Client connections open now.
    pub open_connections: IntGauge,
    /// 1 while the usage journal takes writes (metered requests are refused otherwise).
    pub journal_writable: IntGauge,
    /// Client connections refused at the cap, and closed by the edge, by reason.
    pub connections_ended: IntCounterVec,
    /// Quota lease operations with the store (draw, give_back, renew, reclaim), by result.
    pub lease_operations: IntCounterVec,
    /// Tokens drawn into this edge's leases, given back from them, and reclaimed from the
    /// leases of edges that went quiet.
    pub lease_tokens: IntCounterVec,
    store_up: IntGauge,
    store_stale: IntGauge,
    generation: IntGauge,
}

fn histogram(name: &str, help: &str, labels: &[&str]) -> HistogramVec {
    HistogramVec::new(
        HistogramOpts::new(name, help).buckets(BUCKETS.to_vec()),
        labels,
    )
    .expect("valid histogram")
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let registry = Registry::new();
        let m = Self {
            requests: IntCounterVec::new(
                Opts::new("moltghost_requests_total", "Requests answered, by route, status, error code and agent"),
                &["route", "status", "code", "agent"],
            )
            .expect("valid counter"),
            duration: histogram("moltghost_request_duration_seconds", "Time from request to the end of the answer", &["route"]),
            overhead: histogram(
                "moltghost_edge_overhead_seconds",
                "Time from the request to the edge starting to send it to the runtime (admission, body, translation)",
                &["route"],
            ),
            upstream_ttfb: histogram(
                "moltghost_upstream_response_seconds",
                "Time from starting to send the request to the runtime (connect included) to its response header",
                &["route"],
            ),
            ttft: histogram("moltghost_time_to_first_token_seconds", "Time from request to the first streamed byte sent", &["route"]),
            tokens: IntCounterVec::new(Opts::new("moltghost_tokens_total", "Tokens accounted, by agent"), &["agent"]).expect("valid counter"),
            plugin_time: histogram("moltghost_plugin_seconds", "Time a request spent in WASM policy plugins (every phase, every plugin)", &["route"]),
            open_streams: IntGauge::new("moltghost_open_streams", "Streams being relayed now").expect("valid gauge"),
            open_websockets: IntGauge::new("moltghost_open_websockets", "WebSockets open now").expect("valid gauge"),
            open_connections: IntGauge::new("moltghost_connections_open", "Client connections open now").expect("valid gauge"),
            journal_writable: IntGauge::new("moltghost_journal_writable", "1 while the usage journal takes writes; 0: metered requests are refused").expect("valid gauge"),
            connections_ended: IntCounterVec::new(
                Opts::new("moltghost_connections_closed_total", "Client connections the edge refused or closed: over_limit (503), header_timeout (408), malformed_head (400 for a head the HTTP parser refused), idle (nothing sent within header_timeout)"),
                &["reason"],
            )
            .expect("valid counter"),
            lease_operations: IntCounterVec::new(
                Opts::new("moltghost_quota_lease_operations_total", "Quota lease operations with the store, by op (draw, give_back, renew, reclaim) and result (ok, dry, error)"),
                &["op", "result"],
            )
            .expect("valid counter"),
            lease_tokens: IntCounterVec::new(
                Opts::new("moltghost_quota_lease_tokens_total", "Tokens moved between the quota pools and this edge's leases, by direction (drawn, given_back, reclaimed)"),
                &["direction"],
            )
            .expect("valid counter"),
            store_up: IntGauge::new("moltghost_store_up", "1 when the last contact with the store succeeded").expect("valid gauge"),
            store_stale: IntGauge::new("moltghost_store_stale_seconds", "Seconds since the last successful contact with the store").expect("valid gauge"),
            generation: IntGauge::new("moltghost_snapshot_generation", "Store revision the edge serves from").expect("valid gauge"),
            registry,
        };
        for c in [
            Box::new(m.requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.plugin_time.clone()),
            Box::new(m.tokens.clone()),
            Box::new(m.connections_ended.clone()),
            Box::new(m.lease_operations.clone()),
            Box::new(m.lease_tokens.clone()),
        ] {
            m.registry.register(c).expect("unique metric");
        }
        for h in [&m.duration, &m.overhead, &m.upstream_ttfb, &m.ttft] {
            m.registry
                .register(Box::new(h.clone()))
                .expect("unique metric");
        }
        m.journal_writable.set(1);
        for g in [
            &m.open_streams,
            &m.open_websockets,
            &m.open_connections,
            &m.journal_writable,
            &m.store_up,
            &m.store_stale,
            &m.generation,
        ] {
            m.registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
        }
        m
    }

    /// Records a finished request.
    pub fn record(&self, ctx: &AccessRecord) {
        let route = ctx.route.map_or("-", |r| r.path());
        let agent = ctx.agent.as_deref().unwrap_or("-");
        let mut status = itoa::Buffer::new();
        self.requests
            .with_label_values(&[
                route,
                status.format(ctx.status),
                ctx.error.unwrap_or(""),
                agent,
            ])
            .inc();
        self.duration
            .with_label_values(&[route])
            .observe(ctx.started.elapsed().as_secs_f64());
        if let (Some(sent), Some(header)) = (ctx.upstream_sent, ctx.first_byte) {
            self.overhead
                .with_label_values(&[route])
                .observe(sent.duration_since(ctx.started).as_secs_f64());
            self.upstream_ttfb
                .with_label_values(&[route])
                .observe(header.duration_since(sent).as_secs_f64());
        }
        if let Some(t) = ctx.first_token {
            self.ttft
                .with_label_values(&[route])
                .observe(t.duration_since(ctx.started).as_secs_f64());
        }
        if let Some(spent) = ctx.plugin_time {
            self.plugin_time
                .with_label_values(&[route])
                .observe(spent.as_secs_f64());
        }
        if let Some(n) = ctx.tokens.filter(|n| *n > 0) {
            self.tokens.with_label_values(&[agent]).inc_by(n);
        }
    }

    /// The text exposition, with the store gauges brought up to date.
    pub fn render(&self, store_up: bool, stale_seconds: i64, generation: u64) -> String {
        self.store_up.set(i64::from(store_up));
        self.store_stale.set(stale_seconds);
        self.generation.set(generation as i64);
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding cannot fail");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}
