//! `stream-flood`: what one tenant's idle streams cost another tenant.
//! The other tenant debits its accounts (closed loop, `--concurrency`
//! callers on `--connections` connections of their own) twice: without
//! the flood, then while `--streams` idle `WatchBalanceEvents` streams of
//! the flooding tenant's account are open. The streams are spread over
//! as many viewer tokens (subjects) of that tenant as its per-caller
//! limit needs (`--streams-per-caller`, the server's
//! `BILLING_STREAMS_PER_CALLER`), 100 streams per connection.

use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use tonic::transport::{Channel, Endpoint};

use super::load::{ensure_funded, spread_account};
use super::report::{self, Report};
use super::{Bench, with_token};
use crate::proto::{self, balances_client::BalancesClient};

const FLOOD_ACCOUNT: &str = "bench-flood";
/// The other tenant's accounts.
const VICTIM_ACCOUNTS: usize = 100;

pub(super) async fn run(bench: &Bench) -> anyhow::Result<Report> {
    let accounts: Vec<String> = (0..VICTIM_ACCOUNTS).map(spread_account).collect();
    ensure_funded(bench, &accounts).await?;
    let _ = BalancesClient::new(bench.channel(0))
        .create_account(bench.request(proto::CreateAccountRequest {
            account_id: FLOOD_ACCOUNT.into(),
            currency: "USD".into(),
            display_name: "bench flood".into(),
            ..Default::default()
        }))
        .await;
    let debit_channels = connect(&bench.args.target, bench.args.connections.max(1)).await?;
    let measure = Duration::from_secs(bench.args.duration_secs.max(1));
    let warmup = Duration::from_secs(bench.args.warmup_secs);

    let (quiet, quiet_errors) =
        debits(bench, &debit_channels, &accounts, "quiet", warmup, measure).await?;

    // The flood: idle streams, none of which will ever get an event.
    let per_caller = bench.args.streams_per_caller.max(1);
    let stream_channels =
        connect(&bench.args.target, bench.args.streams.div_ceil(100).max(1)).await?;
    let started = Instant::now();
    let mut streams = Vec::with_capacity(bench.args.streams);
    let mut refused = 0u64;
    let mut samples = Vec::new();
    for chunk in (0..bench.args.streams).collect::<Vec<_>>().chunks(500) {
        let opening = chunk.iter().map(|&index| {
            let token = bench.viewer_token(FLOOD_ACCOUNT, &format!("flood-{}", index / per_caller));
            let mut client =
                BalancesClient::new(stream_channels[index / 100 % stream_channels.len()].clone());
            async move {
                let token = token?;
                anyhow::Ok(
                    client
                        .watch_balance_events(with_token(
                            &token,
                            proto::WatchBalanceEventsRequest {
                                account_id: FLOOD_ACCOUNT.into(),
                                after_cursor: 0,
                            },
                        ))
                        .await,
                )
            }
        });
        for opened in futures::future::join_all(opening).await {
            match opened? {
                Ok(stream) => streams.push(stream.into_inner()),
                Err(status) => {
                    refused += 1;
                    if samples.len() < 3 {
                        samples.push(format!("{:?}: {}", status.code(), status.message()));
                    }
                }
            }
        }
    }
    let opened_in = started.elapsed();
    let (flooded, flooded_errors) = debits(
        bench,
        &debit_channels,
        &accounts,
        "flooded",
        warmup,
        measure,
    )
    .await?;
    let held = streams.len();
    drop(streams);

    let p99 = |h: &Histogram<u64>| h.value_at_quantile(0.99) as f64 / 1000.0;
    let p50 = |h: &Histogram<u64>| h.value_at_quantile(0.50) as f64 / 1000.0;
    let ratio = p99(&flooded) / p99(&quiet).max(0.001);
    Ok(Report {
        scenario: "StreamFlood".into(),
        concurrency: bench.args.concurrency,
        elapsed: measure,
        ok: flooded.len(),
        errors: flooded_errors,
        latency_of: "the other tenant's debits while the flood is open".into(),
        extra: serde_json::json!({
            "streams_open": held,
            "streams_refused": refused,
            "streams_opened_in_s": opened_in.as_secs_f64(),
            "flood_callers": held.div_ceil(per_caller),
            "without_flood_ms": { "p50": p50(&quiet), "p99": p99(&quiet), "samples": quiet.len(), "errors": quiet_errors },
            "with_flood_ms": { "p50": p50(&flooded), "p99": p99(&flooded), "samples": flooded.len() },
            "p99_ratio": ratio,
            "p99_within_2x": ratio <= 2.0,
        }),
        latency: flooded,
        error_samples: samples,
    })
}

async fn connect(target: &str, count: usize) -> anyhow::Result<Vec<Channel>> {
    let mut channels = Vec::with_capacity(count);
    for _ in 0..count {
        channels.push(
            Endpoint::from_shared(target.to_owned())?
                .connect_timeout(Duration::from_secs(5))
                .tcp_nodelay(true)
                .connect()
                .await
                .with_context(|| format!("connecting to {target}"))?,
        );
    }
    Ok(channels)
}

/// Closed-loop debits over `accounts` for `warmup` + `measure`; the latencies
/// of the measured part and the error count.
async fn debits(
    bench: &Bench,
    channels: &[Channel],
    accounts: &[String],
    phase: &str,
    warmup: Duration,
    measure: Duration,
) -> anyhow::Result<(Histogram<u64>, u64)> {
    let measure_from = Instant::now() + warmup;
    let deadline = measure_from + measure;
    let mut workers = Vec::new();
    for worker in 0..bench.args.concurrency.max(1) {
        let mut client = BalancesClient::new(channels[worker % channels.len()].clone());
        let token = bench.token.clone();
        let accounts = accounts.to_vec();
        let prefix = format!("{}-{phase}-{worker}", bench.run_id);
        let amount = bench.args.amount.clone();
        workers.push(tokio::spawn(async move {
            let mut latencies = report::histogram();
            let mut errors = 0u64;
            for call in 0usize.. {
                let began = Instant::now();
                if began >= deadline {
                    break;
                }
                let outcome = client
                    .debit(with_token(
                        &token,
                        proto::DebitRequest {
                            account_id: accounts[(worker + call) % accounts.len()].clone(),
                            amount: amount.clone(),
                            idempotency_key: format!("{prefix}-{call}"),
                            description: "bench".into(),
                            ..Default::default()
                        },
                    ))
                    .await;
                if began < measure_from {
                    continue;
                }
                match outcome {
                    Ok(_) => report::record(&mut latencies, began.elapsed()),
                    Err(_) => errors += 1,
                }
            }
            (latencies, errors)
        }));
    }
    let mut latency = report::histogram();
    let mut errors = 0;
    for worker in workers {
        let (histogram, worker_errors) = worker.await?;
        latency.add(histogram).context("merging histograms")?;
        errors += worker_errors;
    }
    Ok((latency, errors))
}
