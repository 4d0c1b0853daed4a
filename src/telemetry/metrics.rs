//! Prometheus metrics: the process-wide registries and the plain functions
//! the domain calls (`metrics::debit_posted()`, …).
//!
//! RPCs are counted under the names of the gRPC ecosystem's Prometheus
//! middleware (go-grpc-prometheus, grpc-ecosystem/go-grpc-middleware), so
//! the usual gRPC dashboards and alerts work unchanged:
//! `grpc_server_started_total`, `grpc_server_handled_total` (with
//! `grpc_code`) and the histogram `grpc_server_handling_seconds`, labelled
//! `grpc_type` (unary, server_stream, bidi_stream), `grpc_service`
//! (`billing.v1.Balances`) and `grpc_method` (`Debit`); codes are named as
//! gRPC names them (`OK`, `InvalidArgument`, `Canceled`, …). Everything
//! else is the service's own, prefixed `billing_`.
//!
//! Labels are bounded: RPCs from the permission table (others are
//! `unknown`), gRPC codes, top-up statuses, gateway operations and decline
//! codes, notification kinds — never account ids, amounts or card data.
//! Gauges of database state (outbox depth, subscriber lag) are refreshed in
//! the background ([`refresh_database_gauges`]) so a scrape never waits on
//! the database; pool use is read at scrape time. The standard `process_*`
//! metrics (CPU, memory, open files) come along.

use std::sync::LazyLock;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

struct Metrics {
    registry: Registry,
    /// The `grpc_server_*` metrics, under their standard (unprefixed) names.
    grpc_registry: Registry,
    grpc_started: IntCounterVec,
    grpc_handled: IntCounterVec,
    grpc_handling: HistogramVec,
    gateway_calls: HistogramVec,
    debits: IntCounter,
    top_ups: IntCounterVec,
    declines: IntCounterVec,
    notifications: IntCounterVec,
    event_streams: IntGauge,
    event_reads: IntCounterVec,
    event_streams_lagged: IntCounter,
    limits_refused: IntCounterVec,
    connections_open: IntGauge,
    outbox_pending: IntGauge,
    subscriber_lag: IntGaugeVec,
    pool_connections: IntGaugeVec,
    pool_max: IntGauge,
    engine_decisions: IntCounterVec,
    charge_duration: Histogram,
    batch_debits: Histogram,
    batch_accounts: Histogram,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let registry = Registry::new_custom(Some("billing".into()), None).expect("metric prefix");
    let counter = |name: &str, help: &str, labels: &[&str]| {
        let metric = IntCounterVec::new(Opts::new(name, help), labels).expect("counter");
        registry.register(Box::new(metric.clone())).expect("unique");
        metric
    };
    let gauge = |name: &str, help: &str| {
        let metric = IntGauge::new(name, help).expect("gauge");
        registry.register(Box::new(metric.clone())).expect("unique");
        metric
    };
    let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
        let metric = IntGaugeVec::new(Opts::new(name, help), labels).expect("gauge");
        registry.register(Box::new(metric.clone())).expect("unique");
        metric
    };
    let grpc_registry = Registry::new();
    let grpc_counter = |name: &str, help: &str, labels: &[&str]| {
        let metric = IntCounterVec::new(Opts::new(name, help), labels).expect("counter");
        grpc_registry
            .register(Box::new(metric.clone()))
            .expect("unique");
        metric
    };
    let grpc_started = grpc_counter(
        "grpc_server_started_total",
        "Total number of RPCs started on the server.",
        &["grpc_type", "grpc_service", "grpc_method"],
    );
    let grpc_handled = grpc_counter(
        "grpc_server_handled_total",
        "Total number of RPCs completed on the server, regardless of success or failure.",
        &["grpc_type", "grpc_service", "grpc_method", "grpc_code"],
    );
    let grpc_handling = HistogramVec::new(
        HistogramOpts::new(
            "grpc_server_handling_seconds",
            "Histogram of response latency (seconds) of gRPC that had been application-level handled by the server.",
        ),
        &["grpc_type", "grpc_service", "grpc_method"],
    )
    .expect("histogram");
    grpc_registry
        .register(Box::new(grpc_handling.clone()))
        .expect("unique");
    let gateway_calls = HistogramVec::new(
        HistogramOpts::new(
            "gateway_request_duration_seconds",
            "Latency of every payment gateway call, by operation and result",
        ),
        &["operation", "result"],
    )
    .expect("histogram");
    registry
        .register(Box::new(gateway_calls.clone()))
        .expect("unique");
    let charge_duration = Histogram::with_opts(HistogramOpts::new(
        "gateway_charge_duration_seconds",
        "Latency of payment gateway charges (charge and confirm_charge)",
    ))
    .expect("histogram");
    registry
        .register(Box::new(charge_duration.clone()))
        .expect("unique");
    // Group commit: 1, 2, 4 … 128 (the largest batch by default) and beyond.
    let batch_histogram = |name: &str, help: &str| {
        let metric = Histogram::with_opts(
            HistogramOpts::new(name, help)
                .buckets(prometheus::exponential_buckets(1.0, 2.0, 9).expect("buckets")),
        )
        .expect("histogram");
        registry.register(Box::new(metric.clone())).expect("unique");
        metric
    };
    let batch_debits = batch_histogram(
        "debit_batch_debits",
        "Debits written by one group-commit transaction",
    );
    let batch_accounts = batch_histogram(
        "debit_batch_accounts",
        "Accounts whose debits one group-commit transaction wrote",
    );
    let debits =
        IntCounter::new("debits_total", "Usage debits posted to the ledger").expect("counter");
    registry.register(Box::new(debits.clone())).expect("unique");
    Metrics {
        grpc_registry,
        grpc_started,
        grpc_handled,
        grpc_handling,
        gateway_calls,
        debits,
        top_ups: counter(
            "top_ups_total",
            "Top-ups settled (manual and automatic), by outcome",
            &["outcome"],
        ),
        declines: counter(
            "card_declines_total",
            "Card charges declined, by decline code",
            &["code"],
        ),
        notifications: counter(
            "notifications_total",
            "Email delivery attempts, by notification kind and outcome (sent, retry, failed)",
            &["kind", "outcome"],
        ),
        engine_decisions: counter(
            "engine_decisions_total",
            "Decisions of the engines (auto top-up, alerts), by engine and decision",
            &["engine", "decision"],
        ),
        event_streams: gauge(
            "event_streams_open",
            "WatchBalanceEvents streams open on this replica",
        ),
        event_reads: counter(
            "event_reads_total",
            "Queries of balance events by reader: `shared` (the process's one reader, per committed range) or `stream` (a stream catching up on its own)",
            &["reader"],
        ),
        event_streams_lagged: {
            let metric = IntCounter::new(
                "event_streams_lagged_total",
                "Streams that fell behind the shared event reader and caught up from the database",
            )
            .expect("counter");
            registry.register(Box::new(metric.clone())).expect("unique");
            metric
        },
        limits_refused: counter(
            "limits_refused_total",
            "Connections, streams and calls refused by an abuse limit, by limit",
            &["limit"],
        ),
        connections_open: gauge(
            "grpc_connections_open",
            "gRPC connections open on this replica (those still waiting for their first bytes included)",
        ),
        outbox_pending: gauge(
            "outbox_pending",
            "Emails waiting in the outbox (all replicas)",
        ),
        subscriber_lag: gauge_vec(
            "event_subscriber_lag",
            "Events between the newest balance event and each engine subscriber's cursor",
            &["subscriber"],
        ),
        pool_connections: gauge_vec(
            "db_pool_connections",
            "Database connections of this replica's pool, by state (idle, in_use)",
            &["state"],
        ),
        pool_max: gauge(
            "db_pool_max_connections",
            "Largest size of this replica's pool",
        ),
        charge_duration,
        batch_debits,
        batch_accounts,
        registry,
    }
});

/// The labels of one RPC in the `grpc_server_*` metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RpcLabels {
    /// `unary`, `server_stream` or `bidi_stream`.
    pub grpc_type: &'static str,
    /// `billing.v1.Balances`; `unknown` for a path outside the known RPCs.
    pub grpc_service: &'static str,
    /// `Debit`; `unknown` likewise.
    pub grpc_method: &'static str,
}

/// An RPC began.
pub fn rpc_started(rpc: RpcLabels) {
    METRICS
        .grpc_started
        .with_label_values(&[rpc.grpc_type, rpc.grpc_service, rpc.grpc_method])
        .inc();
}

/// An RPC answered with `code` after `seconds` (to its response headers).
pub fn rpc_handled(rpc: RpcLabels, code: tonic::Code, seconds: f64) {
    let metrics = &*METRICS;
    metrics
        .grpc_handled
        .with_label_values(&[
            rpc.grpc_type,
            rpc.grpc_service,
            rpc.grpc_method,
            grpc_code_name(code),
        ])
        .inc();
    metrics
        .grpc_handling
        .with_label_values(&[rpc.grpc_type, rpc.grpc_service, rpc.grpc_method])
        .observe(seconds);
}

/// A gRPC code as gRPC itself names it (`codes.Code.String()` in grpc-go),
/// the `grpc_code` label dashboards filter on.
pub fn grpc_code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "Canceled",
        Unknown => "Unknown",
        InvalidArgument => "InvalidArgument",
        DeadlineExceeded => "DeadlineExceeded",
        NotFound => "NotFound",
        AlreadyExists => "AlreadyExists",
        PermissionDenied => "PermissionDenied",
        ResourceExhausted => "ResourceExhausted",
        FailedPrecondition => "FailedPrecondition",
        Aborted => "Aborted",
        OutOfRange => "OutOfRange",
        Unimplemented => "Unimplemented",
        Internal => "Internal",
        Unavailable => "Unavailable",
        DataLoss => "DataLoss",
        Unauthenticated => "Unauthenticated",
    }
}

/// A usage debit written to the ledger (idempotent replays do not count).
pub fn debit_posted() {
    METRICS.debits.inc();
}

/// A group-commit transaction committed `debits` debits of `accounts` accounts.
pub fn debit_batch_committed(debits: usize, accounts: usize) {
    let metrics = &*METRICS;
    metrics.batch_debits.observe(debits as f64);
    metrics.batch_accounts.observe(accounts as f64);
}

/// A top-up reached `outcome` (a top-up status: succeeded, failed,
/// requires_action, unknown).
pub fn top_up_finished(outcome: &str) {
    METRICS.top_ups.with_label_values(&[outcome]).inc();
}

/// The gateway declined a charge with `code` (e.g. `insufficient_funds`).
pub fn card_declined(code: &str) {
    METRICS.declines.with_label_values(&[code]).inc();
}

/// A payment gateway call (`operation`: setup_card, confirm_setup, charge,
/// find_charge, confirm_charge, detach) took `seconds` and came to `result`
/// (succeeded, declined, requires_action, unknown, error). Charges
/// (charge, confirm_charge) are also in `billing_gateway_charge_duration_seconds`.
pub fn gateway_call_observed(operation: &'static str, result: &'static str, seconds: f64) {
    let metrics = &*METRICS;
    metrics
        .gateway_calls
        .with_label_values(&[operation, result])
        .observe(seconds);
    if matches!(operation, "charge" | "confirm_charge") {
        metrics.charge_duration.observe(seconds);
    }
}

/// An email of `kind` was sent, scheduled for retry or given up (`outcome`).
pub fn notification_finished(kind: &str, outcome: &str) {
    METRICS
        .notifications
        .with_label_values(&[kind, outcome])
        .inc();
}

/// An engine (`auto_top_up`, `low_balance_alert`) took `decision`
/// (e.g. `charge`, `skip_cooldown`, `alert`).
pub fn engine_decision(engine: &str, decision: &str) {
    METRICS
        .engine_decisions
        .with_label_values(&[engine, decision])
        .inc();
}

pub fn stream_opened() {
    METRICS.event_streams.inc();
}

pub fn stream_closed() {
    METRICS.event_streams.dec();
}

/// The shared event reader ran one query.
pub fn event_reader_read() {
    METRICS.event_reads.with_label_values(&["shared"]).inc();
}

/// A stream ran a query of its own (catch-up).
pub fn event_stream_read() {
    METRICS.event_reads.with_label_values(&["stream"]).inc();
}

/// A stream fell behind the shared reader (it catches up from the database).
pub fn event_stream_lagged() {
    METRICS.event_streams_lagged.inc();
}

/// An abuse limit refused a connection, stream or call; `limit` is a fixed name.
pub fn limit_refused(limit: &'static str) {
    METRICS.limits_refused.with_label_values(&[limit]).inc();
}

/// A gRPC connection was accepted (+1) or closed (-1).
pub fn connections_open_add(delta: i64) {
    METRICS.connections_open.add(delta);
}

/// Counts an open event stream for as long as it lives.
pub struct OpenStream(());

impl OpenStream {
    pub fn new() -> OpenStream {
        stream_opened();
        OpenStream(())
    }
}

impl Default for OpenStream {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        stream_closed();
    }
}

/// Scrape-time gauges: pending outbox rows.
pub fn set_outbox_pending(pending: i64) {
    METRICS.outbox_pending.set(pending);
}

/// Scrape-time gauges: how far `subscriber` is behind the newest event.
pub fn set_subscriber_lag(subscriber: &str, lag: i64) {
    METRICS
        .subscriber_lag
        .with_label_values(&[subscriber])
        .set(lag);
}

/// Scrape-time gauges: the pool's connections.
pub fn set_pool_use(size: u32, idle: usize, max: u32) {
    let metrics = &*METRICS;
    let idle = idle as i64;
    metrics
        .pool_connections
        .with_label_values(&["idle"])
        .set(idle);
    metrics
        .pool_connections
        .with_label_values(&["in_use"])
        .set((i64::from(size) - idle).max(0));
    metrics.pool_max.set(i64::from(max));
}

/// Every metric in the Prometheus text exposition format, with the
/// process collector's `process_*` (unprefixed, as Prometheus names them).
pub fn render() -> String {
    let mut buffer = Vec::new();
    let mut families = METRICS.registry.gather();
    families.extend(METRICS.grpc_registry.gather());
    families.extend(prometheus::gather());
    if let Err(error) = TextEncoder::new().encode(&families, &mut buffer) {
        tracing::warn!(%error, "encoding metrics failed");
    }
    String::from_utf8(buffer).unwrap_or_default()
}

/// The content type of [`render`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Refreshes the database gauges (outbox depth, subscriber lag) every
/// `interval` until `stop`; each query is bounded, a failure leaves the last
/// values. `/metrics` only reads them.
pub async fn refresh_database_gauges(
    pool: sqlx::PgPool,
    interval: std::time::Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let bound = interval.clamp(
        std::time::Duration::from_millis(100),
        std::time::Duration::from_secs(2),
    );
    loop {
        let pending = sqlx::query_scalar::<_, i64>(
            "SELECT COUNT(*) FROM notifications WHERE status = 'pending'",
        )
        .fetch_one(&pool);
        match tokio::time::timeout(bound, pending).await {
            Ok(Ok(pending)) => set_outbox_pending(pending),
            Ok(Err(error)) => tracing::debug!(%error, "outbox depth not measured"),
            Err(_) => tracing::debug!("outbox depth not measured: the database did not answer"),
        }
        let lags = sqlx::query_as::<_, (String, i64)>(
            "SELECT s.name, GREATEST(COALESCE((SELECT MAX(cursor) FROM balance_events), 0) - s.cursor, 0) \
               FROM event_subscribers s",
        )
        .fetch_all(&pool);
        match tokio::time::timeout(bound, lags).await {
            Ok(Ok(lags)) => {
                for (subscriber, lag) in lags {
                    set_subscriber_lag(&subscriber, lag);
                }
            }
            Ok(Err(error)) => tracing::debug!(%error, "subscriber lag not measured"),
            Err(_) => tracing::debug!("subscriber lag not measured: the database did not answer"),
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.wait_for(|stop| *stop) => return,
        }
    }
}
