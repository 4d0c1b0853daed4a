//! The event stream: delivery latency under debits, and many idle streams.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;

use super::report::{self, Report};
use super::{Bench, load, rss_kib, with_token};
use crate::proto::{self, balances_client::BalancesClient};

const EVENTS_ACCOUNT: &str = "bench-events";
const IDLE_ACCOUNT: &str = "bench-idle";

/// Commit → subscriber, bounded on both sides (the commit itself is not
/// observable from a client):
/// - the reported latency is the subscriber's receive time − the event's
///   `created_at`, the debit transaction's *start* (`now()`): commit →
///   subscriber plus the transaction's own time, an upper bound;
/// - `extra.from_answer_ms` is receive − the time the writer got its `Debit`
///   answer, which the server sends right after the commit: a lower bound
///   (zero when the event arrived first).
///
/// Both clocks are this machine's.
pub(super) async fn events(bench: &Bench) -> anyhow::Result<Report> {
    load::ensure_funded(bench, &[EVENTS_ACCOUNT.to_owned()]).await?;
    let started = SystemTime::now();
    let mut subscriber = BalancesClient::new(bench.channel(0));
    let mut stream = subscriber
        .watch_balance_events(bench.request(proto::WatchBalanceEventsRequest {
            account_id: EVENTS_ACCOUNT.into(),
            after_cursor: 0,
        }))
        .await
        .context("subscribing")?
        .into_inner();
    let measure = Duration::from_secs(bench.args.duration_secs.max(1));
    let deadline = Instant::now() + measure;
    let pace = Duration::from_secs_f64(
        bench.args.concurrency as f64 / bench.args.rate.unwrap_or(200.0).max(0.001),
    );
    // transaction_id → when its Debit was answered.
    let answered: Arc<Mutex<HashMap<String, SystemTime>>> = Arc::default();
    let mut writers = Vec::new();
    for worker in 0..bench.args.concurrency.max(1) {
        let mut client = BalancesClient::new(bench.channel(worker + 1));
        let token = bench.token.clone();
        let answered = answered.clone();
        let (amount, run_id) = (bench.args.amount.clone(), bench.run_id.clone());
        writers.push(tokio::spawn(async move {
            let mut ticker = tokio::time::interval(pace);
            let (mut ok, mut errors) = (0u64, 0u64);
            for call in 0.. {
                ticker.tick().await;
                if Instant::now() >= deadline {
                    break;
                }
                let debit = client
                    .debit(with_token(
                        &token,
                        proto::DebitRequest {
                            account_id: EVENTS_ACCOUNT.into(),
                            amount: amount.clone(),
                            idempotency_key: format!("{run_id}-ev-{worker}-{call}"),
                            ..Default::default()
                        },
                    ))
                    .await;
                let at = SystemTime::now();
                match debit {
                    Ok(response) => {
                        ok += 1;
                        if let Some(transaction) = response.into_inner().transaction {
                            answered
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .insert(transaction.transaction_id, at);
                        }
                    }
                    Err(_) => errors += 1,
                }
            }
            (ok, errors)
        }));
    }
    let mut latency = report::histogram();
    let mut received = 0u64;
    let mut arrivals: Vec<(String, SystemTime)> = Vec::new();
    let listen_until = deadline + Duration::from_secs(2);
    loop {
        let message = match tokio::time::timeout_at(listen_until.into(), stream.message()).await {
            Err(_) | Ok(Ok(None)) => break,
            Ok(Ok(Some(message))) => message,
            Ok(Err(status)) => return Err(status).context("the event stream failed"),
        };
        let now = SystemTime::now();
        let Some(event) = message.event else {
            continue;
        };
        let Some(created_at) = event.created_at else {
            continue;
        };
        let created_at = SystemTime::try_from(created_at).unwrap_or(now);
        if created_at < started {
            continue; // replayed history
        }
        received += 1;
        report::record(
            &mut latency,
            now.duration_since(created_at).unwrap_or_default(),
        );
        arrivals.push((event.transaction_id, now));
    }
    let (mut ok, mut errors) = (0, 0);
    for writer in writers {
        let (writer_ok, writer_errors) = writer.await?;
        ok += writer_ok;
        errors += writer_errors;
    }
    let mut from_answer = report::histogram();
    {
        let answered = answered.lock().unwrap_or_else(|e| e.into_inner());
        for (transaction_id, at) in &arrivals {
            if let Some(answer) = answered.get(transaction_id) {
                report::record(
                    &mut from_answer,
                    at.duration_since(*answer).unwrap_or_default(),
                );
            }
        }
    }
    let quantile = |q: f64| {
        if from_answer.is_empty() {
            0.0
        } else {
            from_answer.value_at_quantile(q) as f64 / 1000.0
        }
    };
    Ok(Report {
        scenario: "Events".into(),
        concurrency: bench.args.concurrency,
        elapsed: measure,
        ok: received,
        errors,
        latency_of: "event created_at (transaction start) to subscriber receive: an upper bound of commit to subscriber".into(),
        latency,
        extra: serde_json::json!({
            "debits_ok": ok,
            "events_received": received,
            "from_answer_ms": {
                "of": "Debit answered (just after its commit) to subscriber receive: a lower bound of commit to subscriber",
                "p50": quantile(0.50),
                "p99": quantile(0.99),
                "samples": from_answer.len(),
            },
        }),
        error_samples: Vec::new(),
    })
}

/// Opens `--streams` streams on an account with no events (viewer tokens of
/// as many callers as the per-caller limit needs), holds them, and reads the
/// server's RSS before and after.
pub(super) async fn idle(bench: &Bench) -> anyhow::Result<Report> {
    let mut setup = BalancesClient::new(bench.channel(0));
    let _ = setup
        .create_account(bench.request(proto::CreateAccountRequest {
            account_id: IDLE_ACCOUNT.into(),
            currency: "USD".into(),
            display_name: "bench".into(),
            ..Default::default()
        }))
        .await;
    let rss_before = bench.args.server_pid.and_then(rss_kib);
    let started = Instant::now();
    let mut latency = report::histogram();
    let mut streams = Vec::with_capacity(bench.args.streams);
    let mut errors = 0u64;
    let mut error_samples = Vec::new();
    for chunk_start in (0..bench.args.streams).step_by(500) {
        let chunk_end = (chunk_start + 500).min(bench.args.streams);
        let opening = (chunk_start..chunk_end).map(|index| {
            let mut client = BalancesClient::new(bench.channel(index));
            // One caller may hold `--streams-per-caller` streams: as many callers as needed.
            let subject = format!("idle-{}", index / bench.args.streams_per_caller.max(1));
            let token = bench.viewer_token(IDLE_ACCOUNT, &subject);
            async move {
                let request = with_token(
                    &token?,
                    proto::WatchBalanceEventsRequest {
                        account_id: IDLE_ACCOUNT.into(),
                        after_cursor: 0,
                    },
                );
                let began = Instant::now();
                let opened = client.watch_balance_events(request).await;
                anyhow::Ok((opened, began.elapsed()))
            }
        });
        for result in futures::future::join_all(opening).await {
            let (opened, took) = result?;
            match opened {
                Ok(stream) => {
                    report::record(&mut latency, took);
                    streams.push(stream.into_inner());
                }
                Err(status) => {
                    errors += 1;
                    if error_samples.len() < 3 {
                        error_samples.push(format!("{:?}: {}", status.code(), status.message()));
                    }
                }
            }
        }
    }
    let opened_in = started.elapsed();
    tokio::time::sleep(Duration::from_secs(bench.args.duration_secs.max(1))).await;
    let rss_held = bench.args.server_pid.and_then(rss_kib);
    let held = streams.len();
    drop(streams);
    Ok(Report {
        scenario: "IdleStreams".into(),
        concurrency: bench.args.streams,
        elapsed: opened_in,
        ok: held as u64,
        errors,
        latency_of: "opening a stream (response headers)".into(),
        latency,
        extra: serde_json::json!({
            "streams_held": held,
            "connections": bench.channels.len(),
            "server_rss_mib_before": rss_before.map(|k| k as f64 / 1024.0),
            "server_rss_mib_held": rss_held.map(|k| k as f64 / 1024.0),
        }),
        error_samples,
    })
}
