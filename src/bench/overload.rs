//! Overload: far more callers than the server admits (`--concurrency` well
//! above its `--concurrency-limit`). Counts admitted calls and calls shed
//! with `RESOURCE_EXHAUSTED`/`UNAVAILABLE` (never queued forever), samples
//! the server's memory while loaded (`--server-pid`), then checks that it
//! recovers: once the load stops, every call is admitted again.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tonic::Code;

use super::load::{ensure_funded, spread_account};
use super::report::{self, Report};
use super::{Bench, rss_kib, with_token};
use crate::proto::{self, balances_client::BalancesClient};

pub(super) async fn run(bench: &Bench) -> anyhow::Result<Report> {
    let accounts: Vec<String> = (0..bench.args.accounts.clamp(1, 1000))
        .map(spread_account)
        .collect();
    // Setting up may itself be shed by a small limit: try again.
    let mut setup = ensure_funded(bench, &accounts).await;
    for _ in 0..20 {
        if setup.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
        setup = ensure_funded(bench, &accounts).await;
    }
    setup?;
    let rss_before = bench.args.server_pid.and_then(rss_kib);
    let deadline = Instant::now() + Duration::from_secs(bench.args.duration_secs.max(1));
    let sampler = bench.args.server_pid.map(|pid| {
        tokio::spawn(async move {
            let mut peak = 0;
            while Instant::now() < deadline {
                peak = peak.max(rss_kib(pid).unwrap_or(0));
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            peak
        })
    });
    let mut workers = Vec::new();
    for worker in 0..bench.args.concurrency.max(1) {
        let mut client = BalancesClient::new(bench.channel(worker));
        let token = bench.token.clone();
        let accounts = accounts.clone();
        let run_id = bench.run_id.clone();
        workers.push(tokio::spawn(async move {
            let mut admitted = report::histogram();
            let mut codes: BTreeMap<String, u64> = BTreeMap::new();
            let mut call = 0usize;
            while Instant::now() < deadline {
                call += 1;
                let began = Instant::now();
                let request = proto::DebitRequest {
                    account_id: accounts[(worker + call) % accounts.len()].clone(),
                    amount: "0.01".into(),
                    idempotency_key: format!("{run_id}-o{worker}-{call}"),
                    ..Default::default()
                };
                let code = match client.debit(with_token(&token, request)).await {
                    Ok(_) => {
                        report::record(&mut admitted, began.elapsed());
                        Code::Ok
                    }
                    Err(status) => status.code(),
                };
                *codes.entry(format!("{code:?}")).or_default() += 1;
            }
            (admitted, codes)
        }));
    }
    let mut latency = report::histogram();
    let mut codes: BTreeMap<String, u64> = BTreeMap::new();
    for worker in workers {
        let (histogram, worker_codes) = worker.await?;
        latency.add(histogram)?;
        for (code, count) in worker_codes {
            *codes.entry(code).or_default() += count;
        }
    }
    let rss_peak = match sampler {
        Some(task) => Some(task.await?),
        None => None,
    };

    // Recovery: the load has stopped; every call must be admitted again.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut client = BalancesClient::new(bench.channel(0));
    let (mut recovered, probes) = (0, 50);
    for probe in 0..probes {
        let request = proto::DebitRequest {
            account_id: accounts[probe % accounts.len()].clone(),
            amount: "0.01".into(),
            idempotency_key: format!("{}-recovery-{probe}", bench.run_id),
            ..Default::default()
        };
        if client
            .debit(with_token(&bench.token, request))
            .await
            .is_ok()
        {
            recovered += 1;
        }
    }
    let ok = codes.get("Ok").copied().unwrap_or(0);
    let shed = codes.get("ResourceExhausted").copied().unwrap_or(0)
        + codes.get("Unavailable").copied().unwrap_or(0);
    let total: u64 = codes.values().sum();
    Ok(Report {
        scenario: "Overload".into(),
        concurrency: bench.args.concurrency,
        elapsed: Duration::from_secs(bench.args.duration_secs.max(1)),
        ok,
        errors: total - ok,
        latency_of: "admitted debits, call start to response".into(),
        latency,
        extra: serde_json::json!({
            "codes": codes,
            "shed": shed,
            "other_errors": total - ok - shed,
            "server_rss_kib_before": rss_before,
            "server_rss_kib_peak_under_load": rss_peak,
            "server_rss_kib_after": bench.args.server_pid.and_then(rss_kib),
            "recovery_probes": probes,
            "recovery_admitted": recovered,
        }),
        error_samples: Vec::new(),
    })
}
