//! A small Prometheus registry: counters and histograms the handlers update, and gauges read
//! from the schedulers, the cache and the breaker when `/metrics` is scraped.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

use moera_engine::batch::SchedulerStats;
use moera_engine::rag::breaker::BreakerState;
use moera_engine::rag::cache::CacheStats;

use crate::lock;

/// Bucket bounds (seconds) of request durations and times to first token.
const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];
/// Bucket bounds (seconds) of the time between two tokens.
const TOKEN_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// A histogram with fixed buckets.
#[derive(Debug, Clone)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Observations per bucket (not cumulative); the last counts those above every bound.
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
            count: 0,
        }
    }

    pub fn observe(&mut self, value: f64) {
        let bucket = self
            .bounds
            .iter()
            .position(|&bound| value <= bound)
            .unwrap_or(self.bounds.len());
        self.counts[bucket] += 1;
        self.sum += value;
        self.count += 1;
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    /// Writes the `_bucket`, `_sum` and `_count` lines; `labels` is `key="value"` pairs
    /// without braces (may be empty).
    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (bound, count) in self.bounds.iter().zip(&self.counts) {
            cumulative += count;
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {cumulative}"
            );
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}",
            self.count
        );
        let braces = |labels: &str| {
            if labels.is_empty() {
                String::new()
            } else {
                format!("{{{labels}}}")
            }
        };
        let _ = writeln!(out, "{name}_sum{} {}", braces(labels), self.sum);
        let _ = writeln!(out, "{name}_count{} {}", braces(labels), self.count);
    }
}

/// What the server counts itself.
#[derive(Debug)]
pub struct Metrics {
    /// Requests by route and status.
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    /// Seconds to the response's headers, by route.
    durations: Mutex<BTreeMap<String, Histogram>>,
    time_to_first_token: Mutex<Histogram>,
    inter_token: Mutex<Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            requests: Mutex::default(),
            durations: Mutex::default(),
            time_to_first_token: Mutex::new(Histogram::new(LATENCY_BUCKETS)),
            inter_token: Mutex::new(Histogram::new(TOKEN_BUCKETS)),
        }
    }
}

/// The values `/metrics` reads from elsewhere when scraped.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Every scheduler's counters, summed.
    pub scheduler: SchedulerStats,
    pub cache: CacheStats,
    pub breaker: Option<BreakerState>,
    pub training_jobs_running: usize,
}

impl Metrics {
    pub fn record_request(&self, route: &str, status: u16, elapsed: Duration) {
        *lock(&self.requests)
            .entry((route.to_string(), status))
            .or_default() += 1;
        lock(&self.durations)
            .entry(route.to_string())
            .or_insert_with(|| Histogram::new(LATENCY_BUCKETS))
            .observe(elapsed.as_secs_f64());
    }

    pub fn observe_time_to_first_token(&self, elapsed: Duration) {
        lock(&self.time_to_first_token).observe(elapsed.as_secs_f64());
    }

    pub fn observe_inter_token(&self, elapsed: Duration) {
        lock(&self.inter_token).observe(elapsed.as_secs_f64());
    }

    /// Requests counted for `route` with `status`.
    pub fn requests(&self, route: &str, status: u16) -> u64 {
        lock(&self.requests)
            .get(&(route.to_string(), status))
            .copied()
            .unwrap_or(0)
    }

    /// The Prometheus text exposition of everything.
    pub fn render(&self, snapshot: &Snapshot) -> String {
        let mut out = String::new();
        let header = |out: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
        };
        header(
            &mut out,
            "moera_requests_total",
            "counter",
            "HTTP requests by route and status.",
        );
        for ((route, status), count) in lock(&self.requests).iter() {
            let _ = writeln!(
                out,
                "moera_requests_total{{route=\"{}\",status=\"{status}\"}} {count}",
                escape(route)
            );
        }
        header(
            &mut out,
            "moera_request_duration_seconds",
            "histogram",
            "Time to a response's headers, by route.",
        );
        for (route, histogram) in lock(&self.durations).iter() {
            histogram.render(
                &mut out,
                "moera_request_duration_seconds",
                &format!("route=\"{}\"", escape(route)),
            );
        }
        header(
            &mut out,
            "moera_time_to_first_token_seconds",
            "histogram",
            "Time from a generation request to its first token.",
        );
        lock(&self.time_to_first_token).render(&mut out, "moera_time_to_first_token_seconds", "");
        header(
            &mut out,
            "moera_inter_token_latency_seconds",
            "histogram",
            "Time between two tokens of a streamed generation.",
        );
        lock(&self.inter_token).render(&mut out, "moera_inter_token_latency_seconds", "");

        let s = &snapshot.scheduler;
        let mut plain = |name: &str, kind: &str, help: &str, value: String| {
            header(&mut out, name, kind, help);
            let _ = writeln!(out, "{name} {value}");
        };
        plain(
            "moera_prompt_tokens_total",
            "counter",
            "Prompt tokens prefilled.",
            s.prompt_tokens.to_string(),
        );
        plain(
            "moera_generated_tokens_total",
            "counter",
            "Tokens generated.",
            s.generated_tokens.to_string(),
        );
        plain(
            "moera_queue_depth",
            "gauge",
            "Generation requests waiting for a place in the batch.",
            s.waiting.to_string(),
        );
        plain(
            "moera_running_sequences",
            "gauge",
            "Sequences being decoded.",
            s.running.to_string(),
        );
        plain(
            "moera_submitted_total",
            "counter",
            "Generation requests accepted by the schedulers.",
            s.submitted.to_string(),
        );
        plain(
            "moera_finished_total",
            "counter",
            "Generations that ended (finished, failed or cancelled).",
            s.finished.to_string(),
        );
        plain(
            "moera_cancelled_total",
            "counter",
            "Generations whose client went away before the end.",
            s.cancelled.to_string(),
        );
        plain(
            "moera_decode_steps_total",
            "counter",
            "Batched decode steps.",
            s.decode_steps.to_string(),
        );
        plain(
            "moera_decoded_rows_total",
            "counter",
            "Sequences carried by the decode steps (divided by the steps: the mean batch).",
            s.decoded_rows.to_string(),
        );
        plain(
            "moera_cache_hits_total",
            "counter",
            "Answers served from the result cache.",
            snapshot.cache.hits.to_string(),
        );
        plain(
            "moera_cache_misses_total",
            "counter",
            "Result cache lookups that found nothing.",
            snapshot.cache.misses.to_string(),
        );
        if let Some(state) = snapshot.breaker {
            let value = match state {
                BreakerState::Closed => 0,
                BreakerState::HalfOpen => 1,
                BreakerState::Open => 2,
            };
            plain(
                "moera_breaker_state",
                "gauge",
                "Circuit breaker of retrieval-augmented generation: 0 closed, 1 half-open, 2 open.",
                value.to_string(),
            );
        }
        plain(
            "moera_training_jobs_running",
            "gauge",
            "Training jobs running.",
            snapshot.training_jobs_running.to_string(),
        );
        out
    }
}

/// A label value as the exposition format quotes it.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let mut h = Histogram::new(&[1.0, 2.0]);
        for v in [0.5, 1.5, 1.5, 3.0] {
            h.observe(v);
        }
        let mut out = String::new();
        h.render(&mut out, "x", "route=\"/a\"");
        assert!(out.contains("x_bucket{route=\"/a\",le=\"1\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{route=\"/a\",le=\"2\"} 3\n"), "{out}");
        assert!(
            out.contains("x_bucket{route=\"/a\",le=\"+Inf\"} 4\n"),
            "{out}"
        );
        assert!(out.contains("x_sum{route=\"/a\"} 6.5\n"), "{out}");
        assert!(out.contains("x_count{route=\"/a\"} 4\n"), "{out}");
    }

    #[test]
    fn renders_every_family() {
        let metrics = Metrics::default();
        metrics.record_request("/v1/models", 200, Duration::from_millis(3));
        metrics.observe_time_to_first_token(Duration::from_millis(20));
        let text = metrics.render(&Snapshot {
            breaker: Some(BreakerState::Open),
            ..Snapshot::default()
        });
        for name in [
            "moera_requests_total{route=\"/v1/models\",status=\"200\"} 1",
            "moera_request_duration_seconds_count{route=\"/v1/models\"} 1",
            "moera_time_to_first_token_seconds_count 1",
            "moera_inter_token_latency_seconds_count 0",
            "moera_queue_depth 0",
            "moera_cancelled_total 0",
            "moera_breaker_state 2",
        ] {
            assert!(text.contains(name), "{name} missing from\n{text}");
        }
    }
}
