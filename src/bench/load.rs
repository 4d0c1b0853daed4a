//! Closed-loop (or paced) callers: debits spread or hot, and the no-op RPC.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use super::report::{self, Report};
use super::{Bench, Scenario, with_token};
use crate::proto::{self, balances_client::BalancesClient};

pub(crate) const HOT_ACCOUNT: &str = "bench-hot";
const FUNDING: &str = "100000000.00";

pub(crate) fn spread_account(index: usize) -> String {
    format!("bench-{index:05}")
}

pub(super) async fn run(bench: &Bench) -> anyhow::Result<Report> {
    let scenario = bench.args.scenario;
    let accounts: Vec<String> = match scenario {
        Scenario::DebitSpread => (0..bench.args.accounts.max(1))
            .map(spread_account)
            .collect(),
        Scenario::DebitHot => vec![HOT_ACCOUNT.to_owned()],
        _ => Vec::new(),
    };
    ensure_funded(bench, &accounts).await?;
    let accounts = Arc::new(accounts);
    let warmup = Duration::from_secs(bench.args.warmup_secs);
    let measure = Duration::from_secs(bench.args.duration_secs.max(1));
    let start = Instant::now();
    let measure_from = start + warmup;
    let deadline = measure_from + measure;
    let next_account = Arc::new(AtomicUsize::new(0));
    let pace = bench
        .args
        .rate
        .map(|rate| Duration::from_secs_f64(bench.args.concurrency as f64 / rate.max(0.001)));
    let mut workers = Vec::new();
    let callers = bench.args.concurrency.max(1);
    for worker in 0..callers {
        let mut balances = BalancesClient::new(bench.channel(worker));
        let mut health = HealthClient::new(bench.channel(worker));
        let token = bench.token.clone();
        let accounts = accounts.clone();
        let next_account = next_account.clone();
        let amount = bench.args.amount.clone();
        let run_id = bench.run_id.clone();
        workers.push(tokio::spawn(async move {
            let mut latencies = report::histogram();
            let (mut ok, mut errors, mut samples) = (0u64, 0u64, Vec::new());
            // Callers paced at the same instant would arrive in bursts of
            // `concurrency` calls: spread their first calls evenly over one
            // period, so arrivals are evenly spaced at the asked rate.
            let mut ticker = pace.map(|pace| {
                let offset = pace.mul_f64(worker as f64 / callers as f64);
                let mut ticker =
                    tokio::time::interval_at(tokio::time::Instant::now() + offset, pace);
                ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                ticker
            });
            let mut call = 0u64;
            loop {
                if let Some(ticker) = ticker.as_mut() {
                    ticker.tick().await;
                }
                let began = Instant::now();
                if began >= deadline {
                    break;
                }
                call += 1;
                let outcome = if scenario == Scenario::Noop {
                    health
                        .check(HealthCheckRequest {
                            service: String::new(),
                        })
                        .await
                        .map(|_| ())
                } else {
                    let index = next_account.fetch_add(1, Ordering::Relaxed) % accounts.len();
                    balances
                        .debit(with_token(
                            &token,
                            proto::DebitRequest {
                                account_id: accounts[index].clone(),
                                amount: amount.clone(),
                                idempotency_key: format!("{run_id}-{worker}-{call}"),
                                description: "bench".into(),
                                ..Default::default()
                            },
                        ))
                        .await
                        .map(|_| ())
                };
                if began < measure_from {
                    continue;
                }
                match outcome {
                    Ok(()) => {
                        ok += 1;
                        report::record(&mut latencies, began.elapsed());
                    }
                    Err(status) => {
                        errors += 1;
                        if samples.len() < 3 {
                            samples.push(format!("{:?}: {}", status.code(), status.message()));
                        }
                    }
                }
            }
            (latencies, ok, errors, samples)
        }));
    }
    let mut latency = report::histogram();
    let (mut ok, mut errors, mut error_samples) = (0, 0, Vec::new());
    for worker in workers {
        let (histogram, worker_ok, worker_errors, samples) = worker.await?;
        latency.add(histogram).context("merging histograms")?;
        ok += worker_ok;
        errors += worker_errors;
        error_samples.extend(samples);
    }
    error_samples.truncate(5);
    Ok(Report {
        scenario: format!("{scenario:?}"),
        concurrency: bench.args.concurrency,
        elapsed: measure,
        ok,
        errors,
        latency_of: "call start to response".into(),
        latency,
        extra: serde_json::json!({
            "accounts": accounts.len(),
            "rate_target": bench.args.rate,
        }),
        error_samples,
    })
}

/// Creates and funds missing accounts (idempotently, so reruns reuse them).
pub(crate) async fn ensure_funded(bench: &Bench, accounts: &[String]) -> anyhow::Result<()> {
    let next = Arc::new(AtomicUsize::new(0));
    let accounts = Arc::new(accounts.to_vec());
    let mut workers = Vec::new();
    for worker in 0..bench.args.concurrency.clamp(1, 32) {
        let mut client = BalancesClient::new(bench.channel(worker));
        let token = bench.token.clone();
        let (next, accounts) = (next.clone(), accounts.clone());
        workers.push(tokio::spawn(async move {
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                let Some(account_id) = accounts.get(index) else {
                    return anyhow::Ok(());
                };
                let existing = client
                    .get_balance(with_token(
                        &token,
                        proto::GetBalanceRequest {
                            account_id: account_id.clone(),
                        },
                    ))
                    .await;
                if existing.is_ok_and(|b| b.get_ref().version > 0) {
                    continue;
                }
                client
                    .create_account(with_token(
                        &token,
                        proto::CreateAccountRequest {
                            account_id: account_id.clone(),
                            currency: "USD".into(),
                            display_name: "bench".into(),
                            ..Default::default()
                        },
                    ))
                    .await
                    .with_context(|| format!("creating {account_id}"))?;
                client
                    .credit(with_token(
                        &token,
                        proto::CreditRequest {
                            account_id: account_id.clone(),
                            amount: FUNDING.into(),
                            kind: proto::TransactionKind::Adjustment as i32,
                            idempotency_key: format!("bench-funding-{account_id}"),
                            description: "bench funding".into(),
                            ..Default::default()
                        },
                    ))
                    .await
                    .with_context(|| format!("funding {account_id}"))?;
            }
        }));
    }
    for worker in workers {
        worker.await??;
    }
    Ok(())
}
