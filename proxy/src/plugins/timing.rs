//! How long requests spend in each plugin: a Prometheus histogram per plugin, kept in atomics so
//! that workers record it without a lock or a label lookup (the per-plugin budget of the
//! performance work is read from it: at most 20 µs per plugin per request at p99).

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Upper bounds of the buckets, in microseconds: a plugin's request is a few µs to a few ms.
const BUCKETS_US: [u64; 14] = [
    5, 10, 15, 20, 30, 50, 100, 250, 500, 1_000, 2_500, 10_000, 50_000, 250_000,
];

/// One plugin's time per request (all its calls in one request: context, phases, log, end).
#[derive(Debug, Default)]
pub struct RequestTime {
    /// Requests whose time fell in each bucket (not cumulative; rendering adds them up).
    buckets: [AtomicU64; BUCKETS_US.len()],
    count: AtomicU64,
    sum_ns: AtomicU64,
}

impl RequestTime {
    /// Counts one request that spent `spent` in the plugin.
    pub fn observe(&self, spent: Duration) {
        let us = spent.as_micros();
        if let Some(i) = BUCKETS_US.iter().position(|&b| us <= u128::from(b)) {
            self.buckets[i].fetch_add(1, Relaxed);
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_ns
            .fetch_add(spent.as_nanos().min(u128::from(u64::MAX)) as u64, Relaxed);
    }

    /// The histogram's series for `plugin` in Prometheus's text format (after its `# TYPE`).
    pub fn render(&self, plugin: &str, out: &mut String) {
        const NAME: &str = "moltghost_plugin_request_seconds";
        let mut cumulative = 0;
        for (bound, n) in BUCKETS_US.iter().zip(&self.buckets) {
            cumulative += n.load(Relaxed);
            let le = *bound as f64 / 1e6;
            let _ = writeln!(
                out,
                "{NAME}_bucket{{plugin=\"{plugin}\",le=\"{le}\"}} {cumulative}"
            );
        }
        let count = self.count.load(Relaxed);
        let sum = self.sum_ns.load(Relaxed) as f64 / 1e9;
        let _ = writeln!(
            out,
            "{NAME}_bucket{{plugin=\"{plugin}\",le=\"+Inf\"}} {count}\n{NAME}_sum{{plugin=\"{plugin}\"}} {sum}\n{NAME}_count{{plugin=\"{plugin}\"}} {count}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_end_with_every_request() {
        let t = RequestTime::default();
        for us in [3, 5, 6, 19, 21, 400_000] {
            t.observe(Duration::from_micros(us));
        }
        let mut out = String::new();
        t.render("p", &mut out);
        assert!(
            out.contains("_bucket{plugin=\"p\",le=\"0.000005\"} 2\n"),
            "{out}"
        );
        assert!(out.contains("le=\"0.00001\"} 3\n"), "{out}");
        assert!(out.contains("le=\"0.00002\"} 4\n"), "{out}");
        assert!(out.contains("le=\"0.00003\"} 5\n"), "{out}");
        assert!(out.contains("le=\"0.25\"} 5\n"), "{out}");
        assert!(out.contains("le=\"+Inf\"} 6\n"), "{out}");
        assert!(out.contains("_count{plugin=\"p\"} 6"), "{out}");
        assert!(out.contains("_sum{plugin=\"p\"} 0.40005"), "{out}");
    }
}
