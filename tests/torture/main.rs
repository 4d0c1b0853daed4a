//! The torture run: three `billing serve` processes on one private Postgres
//! cluster, concurrent random operations, `kill -9` of servers, a Postgres
//! restart and a flaky SMTP server — then every guarantee is checked.
//!
//! CI runs it small. A long run:
//! `TORTURE_SECONDS=600 TORTURE_ACCOUNTS=40 TORTURE_WORKERS=12 cargo test --release --test torture -- --nocapture`

mod checks;
mod driver;
mod harness;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use billing::auth::KeySet;
use billing::config::AuthArgs;
use billing::db::embedded::{PrivateCluster, find_binaries};
use billing::proto;
use rand::Rng;
use sqlx::ConnectOptions;
use tonic::transport::Channel;

use driver::{Driver, Tally, authed};
use harness::{SECRET, Server, Sink};

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torture_nothing_lost_nothing_charged_twice() {
    let seconds = env_number("TORTURE_SECONDS", 30);
    let account_count = env_number("TORTURE_ACCOUNTS", 8) as usize;
    let workers = env_number("TORTURE_WORKERS", 6);
    let seed = env_number("TORTURE_SEED", 20261127);

    let dir = tempfile::Builder::new()
        .prefix("billing-torture-")
        .tempdir_in("/tmp")
        .unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let cluster = PrivateCluster::start(
        &find_binaries(None).expect("postgres binaries"),
        &dir.path().join("pg"),
    )
    .unwrap();
    {
        let mut admin = cluster.connect_options().connect().await.unwrap();
        sqlx::query("CREATE DATABASE billing")
            .execute(&mut admin)
            .await
            .unwrap();
    }
    let database_url = format!(
        "postgres://postgres@localhost:5432/billing?host={}",
        cluster.data_dir().display()
    );
    let sink = Sink::start(0.2);
    let mut servers: Vec<Server> = (0..3)
        .map(|i| Server::new(i, &database_url, sink.port, dir.path()))
        .collect();
    for server in &mut servers {
        server.start();
    }
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect_with(cluster.connect_options().database("billing"))
        .await
        .unwrap();

    let keys = KeySet::load(
        &AuthArgs {
            jwt_secret: Some(SECRET.into()),
            ..Default::default()
        },
        dir.path(),
    )
    .unwrap();
    let channels: Vec<Channel> = servers
        .iter()
        .map(|s| {
            Channel::from_shared(format!("http://{}", s.address))
                .unwrap()
                .connect_timeout(Duration::from_secs(2))
                .connect_lazy()
        })
        .collect();
    let accounts: Vec<String> = (0..account_count).map(|i| format!("t{i}")).collect();
    let admin_tokens: HashMap<String, String> = accounts
        .iter()
        .map(|a| {
            (
                a.clone(),
                keys.mint("torture", "admin", Some(a), 7200).unwrap(),
            )
        })
        .collect();
    let driver = Arc::new(Driver {
        channels: channels.clone(),
        accounts: accounts.clone(),
        service_token: keys.mint("torture", "service", None, 7200).unwrap(),
        admin_tokens,
        tally: Arc::new(Mutex::new(Tally::default())),
    });

    // Accounts with an opening balance, a working card first, auto top-up and alerts on.
    for account in &accounts {
        let mut balances = proto::balances_client::BalancesClient::new(channels[0].clone());
        balances
            .create_account(authed(
                &driver.service_token,
                proto::CreateAccountRequest {
                    account_id: account.clone(),
                    billing_email: format!("{account}@torture.example"),
                    ..Default::default()
                },
            ))
            .await
            .unwrap();
        balances
            .credit(authed(
                &driver.service_token,
                proto::CreditRequest {
                    account_id: account.clone(),
                    amount: "100.00".into(),
                    kind: proto::TransactionKind::Promotion as i32,
                    idempotency_key: "opening".into(),
                    ..Default::default()
                },
            ))
            .await
            .unwrap();
        let admin = &driver.admin_tokens[account];
        let mut methods =
            proto::payment_methods_client::PaymentMethodsClient::new(channels[0].clone());
        methods
            .add_card(authed(
                admin,
                proto::AddCardRequest {
                    account_id: account.clone(),
                    source: Some(proto::add_card_request::Source::Card(proto::CardDetails {
                        number: "4242424242424242".into(),
                        exp_month: 12,
                        exp_year: 2035,
                        cvc: "123".into(),
                        holder_name: "T".into(),
                    })),
                    idempotency_key: "first-card".into(),
                    ..Default::default()
                },
            ))
            .await
            .unwrap();
        proto::balance_policy_client::BalancePolicyClient::new(channels[0].clone())
            .apply_low_balance_settings(authed(
                admin,
                proto::ApplyLowBalanceSettingsRequest {
                    account_id: account.clone(),
                    auto_refill_enabled: true,
                    threshold: "30.00".into(),
                    refill_amount: "50.00".into(),
                    notification_enabled: true,
                    notification_threshold: "45.00".into(),
                    ..Default::default()
                },
            ))
            .await
            .unwrap();
    }

    let started = Instant::now();
    let until = started + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for worker in 0..workers {
        let driver = driver.clone();
        tasks.push(tokio::spawn(async move {
            driver.run(worker, seed, until).await
        }));
    }

    // Faults: kill -9 a replica every few seconds and bring it back; restart Postgres once.
    let mut rng = driver::seeded(seed);
    let (mut kills, mut pg_restarts) = (0u64, 0u64);
    let mut kill_times = Vec::new();
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(rng.random_range(2000..4000))).await;
        if Instant::now() >= until {
            break;
        }
        let victim = rng.random_range(0..servers.len());
        servers[victim].kill();
        kills += 1;
        kill_times.push(std::time::SystemTime::now());
        tokio::time::sleep(Duration::from_millis(300)).await;
        if pg_restarts == 0 && Instant::now() > started + Duration::from_secs(seconds / 2) {
            cluster.stop();
            pg_restarts += 1;
            tokio::time::sleep(Duration::from_millis(500)).await;
            cluster.restart_if_stopped().unwrap();
        }
        let server = &mut servers[victim];
        tokio::task::block_in_place(|| server.start());
    }
    for task in tasks {
        task.await.unwrap();
    }
    for server in &mut servers {
        if !server.is_running() {
            tokio::task::block_in_place(|| server.start());
        }
    }

    // Settle what the load left open: manual top-ups with unknown outcomes.
    let unsettled = std::mem::take(&mut driver.tally.lock().unwrap().unsettled_funds);
    let mut rng = driver::seeded(seed + 1);
    for (account, request) in unsettled {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !driver
            .send_add_funds(&mut rng, &account, request.clone())
            .await
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    let outcome = checks::wait_until_quiet(&pool, Duration::from_secs(120)).await;
    let settings_changes = driver.tally.lock().unwrap().settings_changes.clone();
    let report = checks::run_all(
        &pool,
        &channels[1],
        &driver.service_token,
        &sink,
        &kill_times,
        &settings_changes,
    )
    .await;

    let tally = driver.tally.lock().unwrap();
    let mut violations = tally.violations.clone();
    violations.extend(report.violations.iter().cloned());
    if let Err(still_open) = outcome {
        violations.push(format!("did not settle: {still_open}"));
    }
    println!("torture: {seconds} s, {account_count} accounts, {workers} workers, 3 replicas");
    println!(
        "  operations {} (repeats checked {}, transient errors retried {})",
        tally.operations, tally.repeats_checked, tally.transient_errors
    );
    println!(
        "  faults: {kills} kill -9, {pg_restarts} postgres restarts, {} SMTP rejections",
        sink.rejected()
    );
    println!(
        "  ledger entries {}, top-ups {}, emails {}",
        report.entries, report.top_ups, report.emails
    );
    println!(
        "  invariants checked {}, violations {}",
        report.invariants_checked + 1,
        violations.len()
    );
    for violation in &violations {
        println!("  VIOLATION: {violation}");
    }
    assert!(violations.is_empty(), "{} violations", violations.len());
    drop(servers);
    cluster.stop();
}
