//! One WARN line when an abuse limit bites, then at most one summary line
//! per [`LIMIT_LOG_INTERVAL`] with the count since the last line: an attack
//! that hits a limit a million times writes a handful of lines, not a
//! million. Every refusal is also counted in `billing_limits_refused_total`.

use std::fmt::Display;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::metrics;

/// How often a limit that keeps biting is summarised in the log.
pub const LIMIT_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// The log of one limit; a `static` per limit.
pub struct LimitLog {
    limit: &'static str,
    message: &'static str,
    state: Mutex<State>,
}

struct State {
    since_last_line: u64,
    total: u64,
    last_line: Option<Instant>,
}

impl LimitLog {
    /// `limit`: the limit's fixed name (a metric label); `message`: the log line's text.
    pub const fn new(limit: &'static str, message: &'static str) -> LimitLog {
        LimitLog {
            limit,
            message,
            state: Mutex::new(State {
                since_last_line: 0,
                total: 0,
                last_line: None,
            }),
        }
    }

    /// The limit refused something; `last` says what (a peer address, a
    /// limit value — never a token, an email address or card data).
    pub fn refused(&self, last: &dyn Display) {
        metrics::limit_refused(self.limit);
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.since_last_line += 1;
        state.total += 1;
        let due = state
            .last_line
            .is_none_or(|line| line.elapsed() >= LIMIT_LOG_INTERVAL);
        if !due {
            return;
        }
        let refused = std::mem::take(&mut state.since_last_line);
        let interval_secs = state.last_line.map_or(0, |line| line.elapsed().as_secs());
        state.last_line = Some(Instant::now());
        let total = state.total;
        drop(state);
        tracing::warn!(
            target: "billing::limits",
            limit = self.limit,
            refused,
            interval_secs,
            total,
            last = %last,
            "{} (one summary line per 10 s)",
            self.message
        );
    }

    #[cfg(test)]
    fn pretend_interval_passed(&self) {
        let mut state = self.state.lock().unwrap();
        state.last_line = state.last_line.map(|line| line - LIMIT_LOG_INTERVAL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_limit_that_keeps_biting_writes_one_summary_line_per_interval() {
        use std::sync::{Arc, Mutex};
        use tracing_subscriber::layer::SubscriberExt;
        #[derive(Clone)]
        struct Buffer(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buffer {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(bytes);
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buffer = Buffer(Arc::new(Mutex::new(Vec::new())));
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::registry().with(crate::telemetry::log_layer(
            crate::config::LogFormat::Json,
            move || writer.clone(),
        ));
        static LOG: LimitLog = LimitLog::new("test_limit", "test limit reached");
        tracing::subscriber::with_default(subscriber, || {
            for _ in 0..10_000 {
                LOG.refused(&"127.0.0.1");
            }
            LOG.pretend_interval_passed();
            LOG.refused(&"127.0.0.2");
        });
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert_eq!(lines[0]["refused"], 1);
        assert_eq!(lines[1]["refused"], 10_000);
        assert_eq!(lines[1]["total"], 10_001);
        assert_eq!(lines[1]["limit"], "test_limit");
        assert_eq!(lines[1]["level"], "WARN");
    }
}
