//! A scenario's result: counts, rate and latency percentiles, as text or JSON.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde_json::{Value, json};

/// Microseconds, 1 µs to 10 minutes, 3 significant digits.
pub(crate) fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

pub(crate) fn record(histogram: &mut Histogram<u64>, latency: Duration) {
    let micros = u64::try_from(latency.as_micros())
        .unwrap_or(u64::MAX)
        .max(1);
    histogram.saturating_record(micros);
}

pub struct Report {
    pub scenario: String,
    pub concurrency: usize,
    pub elapsed: Duration,
    pub ok: u64,
    pub errors: u64,
    /// What the latency measures.
    pub latency_of: String,
    pub latency: Histogram<u64>,
    /// Scenario-specific figures.
    pub extra: Value,
    /// A few error messages, to say what failed.
    pub error_samples: Vec<String>,
}

impl Report {
    pub fn throughput(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn millis(&self, quantile: f64) -> f64 {
        if self.latency.is_empty() {
            return 0.0;
        }
        self.latency.value_at_quantile(quantile) as f64 / 1000.0
    }

    pub fn to_json(&self) -> Value {
        json!({
            "scenario": self.scenario,
            "concurrency": self.concurrency,
            "seconds": self.elapsed.as_secs_f64(),
            "ok": self.ok,
            "errors": self.errors,
            "throughput_per_s": self.throughput(),
            "latency_of": self.latency_of,
            "latency_ms": {
                "p50": self.millis(0.50),
                "p90": self.millis(0.90),
                "p99": self.millis(0.99),
                "max": self.latency.max() as f64 / 1000.0,
                "samples": self.latency.len(),
            },
            "extra": self.extra,
            "error_samples": self.error_samples,
        })
    }

    pub fn to_text(&self) -> String {
        let mut text = format!(
            "{}: {} callers, {:.1}s\n  ok {}  errors {}  throughput {:.0}/s\n  latency ({}) ms: p50 {:.2}  p90 {:.2}  p99 {:.2}  max {:.2}  ({} samples)\n",
            self.scenario,
            self.concurrency,
            self.elapsed.as_secs_f64(),
            self.ok,
            self.errors,
            self.throughput(),
            self.latency_of,
            self.millis(0.50),
            self.millis(0.90),
            self.millis(0.99),
            self.latency.max() as f64 / 1000.0,
            self.latency.len(),
        );
        if !self.extra.is_null() {
            text.push_str(&format!("  {}\n", self.extra));
        }
        for sample in &self.error_samples {
            text.push_str(&format!("  error: {sample}\n"));
        }
        text
    }
}
