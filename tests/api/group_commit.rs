//! Group commit: concurrent debits to one account share transactions, yet
//! each is checked, answered and recorded as if it ran alone.

use std::collections::HashMap;

use billing::ledger::{self, BatchSettings, DebitBatcher};
use billing::proto;
use tonic::Code;

use billing::server::ServerSettings;

use crate::helpers::{TestApp, authed, count_rows, spawn_app, spawn_app_on};

fn debit(amount: &str, key: &str) -> proto::DebitRequest {
    proto::DebitRequest {
        account_id: "hot".into(),
        amount: amount.into(),
        idempotency_key: key.into(),
        description: "call".into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn two_hundred_concurrent_debits_with_retries_and_refusals_keep_every_rule() {
    let app = spawn_app().await;
    app.account_with_balance("hot", "100.00").await;
    let token = app.service_token();
    // 120 distinct keys for 1.00 each (only 100 fit), and a retry of each of the first 80.
    let keys: Vec<String> = (0..120).chain(0..80).map(|i| format!("call-{i}")).collect();
    let mut tasks = Vec::new();
    for key in keys {
        let mut client = app.balances();
        let token = token.clone();
        tasks.push(tokio::spawn(async move {
            let outcome = client.debit(authed(&token, debit("1.00", &key))).await;
            (key, outcome.map(|r| r.into_inner()))
        }));
    }
    let mut outcomes: HashMap<String, Vec<Result<proto::DebitResponse, tonic::Status>>> =
        HashMap::new();
    for task in tasks {
        let (key, outcome) = task.await.unwrap();
        outcomes.entry(key).or_default().push(outcome);
    }

    let mut versions = Vec::new();
    let mut transaction_ids = Vec::new();
    for (key, results) in &outcomes {
        match &results[0] {
            Ok(first) => {
                for other in &results[1..] {
                    let other = other.as_ref().expect("a retry of a debit that took effect");
                    assert_eq!(
                        other.transaction, first.transaction,
                        "{key}: retry gets the first result"
                    );
                    assert_eq!(other.version, first.version);
                }
                versions.push(first.version);
                transaction_ids.push(first.transaction.clone().unwrap().transaction_id);
            }
            Err(status) => {
                assert_eq!(status.code(), Code::FailedPrecondition, "{key}: {status:?}");
                assert!(status.message().contains("insufficient funds"));
                for other in &results[1..] {
                    assert_eq!(other.as_ref().unwrap_err().code(), Code::FailedPrecondition);
                }
            }
        }
    }
    versions.sort_unstable();
    assert_eq!(
        versions,
        (2..=101).collect::<Vec<i64>>(),
        "one version per accepted debit"
    );
    transaction_ids.sort();
    transaction_ids.dedup();
    assert_eq!(transaction_ids.len(), 100);

    let balance = app
        .balances()
        .get_balance(authed(
            &token,
            proto::GetBalanceRequest {
                account_id: "hot".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(balance.balance, "0.00");
    assert_eq!(balance.version, 101);
    let sequences: Vec<i64> = sqlx::query_scalar(
        "SELECT sequence FROM balance_events WHERE account_id = 'hot' ORDER BY cursor",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(
        sequences,
        (1..=101).collect::<Vec<i64>>(),
        "gapless, in cursor order"
    );
    let sum: rust_decimal::Decimal =
        sqlx::query_scalar("SELECT sum(amount) FROM ledger_entries WHERE account_id = 'hot'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(sum, rust_decimal::Decimal::ZERO, "balance == sum(entries)");
    assert_eq!(count_rows(&app.pool, "ledger_entries").await, 101);
    let audited: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_log WHERE action = 'debit'")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(audited, 100, "one audit row per accepted debit");

    // The same key for a different request is refused, and changes nothing.
    let accepted_key = outcomes
        .iter()
        .find(|(_, results)| results[0].is_ok())
        .map(|(key, _)| key.clone())
        .unwrap();
    let reused = app
        .balances()
        .debit(authed(&token, debit("2.00", &accepted_key)))
        .await
        .unwrap_err();
    assert_eq!(reused.code(), Code::AlreadyExists);
    assert_eq!(count_rows(&app.pool, "ledger_entries").await, 101);
    app.stop().await;
}

#[tokio::test]
async fn a_refused_debit_in_a_batch_does_not_stop_the_others() {
    let app = spawn_app().await;
    app.account_with_balance("hot", "10.00").await;
    let token = app.service_token();
    let mut tasks = Vec::new();
    // One debit that can never fit among many small ones.
    for i in 0..40 {
        let amount = if i == 7 { "1000.00" } else { "0.25" };
        let mut client = app.balances();
        let token = token.clone();
        tasks.push(tokio::spawn(async move {
            client
                .debit(authed(&token, debit(amount, &format!("k-{i}"))))
                .await
                .map(|r| r.into_inner())
        }));
    }
    let mut accepted = 0;
    for (i, task) in tasks.into_iter().enumerate() {
        match task.await.unwrap() {
            Ok(_) => accepted += 1,
            Err(status) => {
                assert_eq!(i, 7);
                assert_eq!(status.code(), Code::FailedPrecondition);
            }
        }
    }
    assert_eq!(accepted, 39);
    let balance = app
        .balances()
        .get_balance(authed(
            &token,
            proto::GetBalanceRequest {
                account_id: "hot".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(balance.balance, "0.25");
    app.stop().await;
}

#[tokio::test]
async fn retries_through_two_replicas_take_effect_once() {
    let app = spawn_app().await;
    app.account_with_balance("hot", "1000.00").await;
    let options = (*app.pool.connect_options()).clone();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .connect_with(options)
        .await
        .unwrap();
    let replica = spawn_app_on(pool, ServerSettings::default()).await;
    let token = app.service_token();
    // Each key goes to both replicas at once: their batches race for the row lock.
    let mut tasks = Vec::new();
    for i in 0..60 {
        for server in [&app, &replica] {
            let mut client = server.balances();
            let token = token.clone();
            tasks.push(tokio::spawn(async move {
                let response = client
                    .debit(authed(&token, debit("1.00", &format!("twice-{i}"))))
                    .await
                    .expect("both replicas answer")
                    .into_inner();
                (i, response.transaction.unwrap().transaction_id)
            }));
        }
    }
    let mut by_key: HashMap<i32, Vec<String>> = HashMap::new();
    for task in tasks {
        let (i, transaction_id) = task.await.unwrap();
        by_key.entry(i).or_default().push(transaction_id);
    }
    for (i, ids) in &by_key {
        assert_eq!(ids[0], ids[1], "key {i}: one effect, one result");
    }
    assert_eq!(count_rows(&app.pool, "ledger_entries").await, 61);
    let balance: rust_decimal::Decimal =
        sqlx::query_scalar("SELECT balance FROM accounts WHERE account_id = 'hot'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(balance, rust_decimal::Decimal::new(94000, 2));
    replica.stop().await;
    app.stop().await;
}

#[tokio::test]
async fn a_key_stored_while_the_batch_waited_for_the_lock_is_still_honoured() {
    let app = spawn_app().await;
    app.account_with_balance("hot", "10.00").await;
    // Another writer holds the account's lock and stores the key for another request.
    let mut other = app.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM accounts WHERE account_id = 'hot' FOR UPDATE")
        .execute(&mut *other)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO idempotency_keys (account_id, idempotency_key, operation, request_hash, response) \
         VALUES ('hot', 'contested', 'post', 'another request', '{}')",
    )
    .execute(&mut *other)
    .await
    .unwrap();
    let mut client = app.balances();
    let token = app.service_token();
    let waiting = tokio::spawn(async move {
        client
            .debit(authed(&token, debit("1.00", "contested")))
            .await
    });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    other.commit().await.unwrap();

    let refused = waiting.await.unwrap().unwrap_err();
    assert_eq!(refused.code(), Code::AlreadyExists, "{refused:?}");
    assert_eq!(
        count_rows(&app.pool, "ledger_entries").await,
        1,
        "nothing written"
    );
    app.stop().await;
}

/// How many backends of this test's database wait for a lock.
async fn waiting_for_locks(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity \
          WHERE datname = current_database() AND wait_event_type = 'Lock'",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Issue 13: the same `Debit{8.00, K}` sent to two replicas while a third
/// writer holds the row: one commits it (balance 2.00), and the other, whose
/// key read predates that commit, must answer with that debit — never
/// "insufficient funds" from its stale read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_refusal_is_answered_from_an_optimistic_key_read_a_retry_on_another_replica_gets_the_committed_debit()
 {
    let app = spawn_app().await;
    app.account_with_balance("hot", "10.00").await;
    let options = (*app.pool.connect_options()).clone();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .connect_with(options)
        .await
        .unwrap();
    let replica = spawn_app_on(pool, ServerSettings::default()).await;
    let token = app.service_token();

    for round in 0..3 {
        let key = format!("retried-{round}");
        if round > 0 {
            app.balances()
                .credit(authed(
                    &token,
                    proto::CreditRequest {
                        account_id: "hot".into(),
                        amount: "8.00".into(),
                        kind: proto::TransactionKind::Adjustment as i32,
                        idempotency_key: format!("refill-{round}"),
                        ..Default::default()
                    },
                ))
                .await
                .unwrap();
        }
        // A third writer holds the account's row lock.
        let mut holder = app.pool.begin().await.unwrap();
        sqlx::query("SELECT 1 FROM accounts WHERE account_id = 'hot' FOR UPDATE")
            .execute(&mut *holder)
            .await
            .unwrap();
        let mut tasks = Vec::new();
        for server in [&app, &replica] {
            let mut client = server.balances();
            let token = token.clone();
            let key = key.clone();
            tasks.push(tokio::spawn(async move {
                client.debit(authed(&token, debit("8.00", &key))).await
            }));
        }
        crate::helpers::eventually("both replicas' batches wait for the row lock", || async {
            waiting_for_locks(&app.pool).await >= 2
        })
        .await;
        holder.commit().await.unwrap();

        let mut transaction_ids = Vec::new();
        for task in tasks {
            let answer = tokio::time::timeout(std::time::Duration::from_secs(10), task)
                .await
                .expect("each replica answers the debit within 10 s")
                .unwrap()
                .unwrap_or_else(|status| {
                    panic!("round {round}: a retry of a committed debit was refused: {status:?}")
                })
                .into_inner();
            assert_eq!(answer.balance, "2.00", "round {round}");
            transaction_ids.push(answer.transaction.unwrap().transaction_id);
        }
        assert_eq!(
            transaction_ids[0], transaction_ids[1],
            "round {round}: one debit, one result"
        );
    }
    let debits: i64 =
        sqlx::query_scalar("SELECT count(*) FROM ledger_entries WHERE kind = 'usage'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(debits, 3, "each key took effect once");
    replica.stop().await;
    app.stop().await;
}

// ---- Group commit across accounts (issue 18) ----
//
// These drive a `DebitBatcher` directly (as the Debit RPC does) so that a
// test can hold account rows locked and know which debits wait together:
// with one batch in flight, debits queued while its batch waits for a lock
// all go into the next batch, one transaction.

fn service_caller() -> billing::auth::Caller {
    billing::auth::Caller {
        subject: "test".into(),
        account: None,
        roles: vec![billing::auth::Role::Service],
        trace_id: None,
        engine: false,
    }
}

fn posting(account: &str, amount: &str, key: &str) -> ledger::Posting {
    ledger::Posting {
        account_id: billing::ids::AccountId::parse(account).unwrap(),
        kind: ledger::EntryKind::Usage,
        amount: amount.parse().unwrap(),
        idempotency_key: billing::ids::IdempotencyKey::parse(key).unwrap(),
        description: String::new(),
        metadata: Default::default(),
        allow_overdraft: false,
    }
}

/// One batch in flight at a time: what queues while it waits goes together.
fn one_batch_at_a_time(pool: &sqlx::PgPool) -> DebitBatcher {
    DebitBatcher::new(
        pool.clone(),
        BatchSettings {
            max_in_flight: 1,
            ..BatchSettings::default()
        },
    )
}

type DebitTask = tokio::task::JoinHandle<Result<ledger::PostingResult, billing::BillingError>>;

fn spawn_debit(batcher: &DebitBatcher, account: &str, amount: &str, key: &str) -> DebitTask {
    let batcher = batcher.clone();
    let posting = posting(account, amount, key);
    tokio::spawn(async move { batcher.debit(&service_caller(), posting).await })
}

/// A transaction holding these accounts' row locks.
async fn hold_locks(
    pool: &sqlx::PgPool,
    accounts: &[&str],
) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut holder = pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM accounts WHERE account_id = ANY($1) ORDER BY account_id FOR UPDATE")
        .bind(accounts)
        .execute(&mut *holder)
        .await
        .unwrap();
    holder
}

async fn queued(batcher: &DebitBatcher, what: &str, count: usize) {
    crate::helpers::eventually(what, || async { batcher.waiting() == count }).await;
}

/// Runs `debits` (account, amount, key) as ONE batch: a first debit on
/// `gate` waits for a lock the test holds, the others queue behind it, and
/// are taken together once the lock is released. Returns their answers, in order.
async fn as_one_batch(
    app: &TestApp,
    gate: &str,
    debits: &[(&str, &str, &str)],
) -> Vec<Result<ledger::PostingResult, billing::BillingError>> {
    let batcher = one_batch_at_a_time(&app.pool);
    let holder = hold_locks(&app.pool, &[gate]).await;
    let first = spawn_debit(&batcher, gate, "0.01", "gate");
    crate::helpers::eventually("the first batch waits for the held lock", || async {
        waiting_for_locks(&app.pool).await >= 1 && batcher.waiting() == 0
    })
    .await;
    let tasks: Vec<DebitTask> = debits
        .iter()
        .map(|(account, amount, key)| spawn_debit(&batcher, account, amount, key))
        .collect();
    queued(
        &batcher,
        "every debit queued behind the first batch",
        debits.len(),
    )
    .await;
    holder.commit().await.unwrap();
    first.await.unwrap().expect("the gate debit");
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.unwrap());
    }
    answers
}

/// The accounts whose usage entries each transaction wrote (by `xmin`).
async fn accounts_per_commit(pool: &sqlx::PgPool) -> Vec<(i64, i64)> {
    sqlx::query_as(
        "SELECT count(DISTINCT account_id), count(*) FROM ledger_entries WHERE kind = 'usage' \
          GROUP BY xmin::TEXT ORDER BY 1 DESC",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn debits_of_many_accounts_share_one_commit_and_each_gets_its_own_answer() {
    let app = spawn_app().await;
    let accounts: Vec<String> = (0..20).map(|i| format!("many-{i:02}")).collect();
    app.account_with_balance("gate", "1.00").await;
    for account in &accounts {
        app.account_with_balance(account, "10.00").await;
    }
    // Two debits per account, in arrival order, interleaved across accounts.
    let mut debits = Vec::new();
    for round in 0..2 {
        for account in &accounts {
            debits.push((
                account.as_str(),
                if round == 0 { "1.00" } else { "2.50" },
                format!("d{round}"),
            ));
        }
    }
    let debits: Vec<(&str, &str, &str)> = debits
        .iter()
        .map(|(a, m, k)| (*a, *m, k.as_str()))
        .collect();
    let answers = as_one_batch(&app, "gate", &debits).await;

    for ((account, _, key), answer) in debits.iter().zip(&answers) {
        let answer = answer.as_ref().expect("every debit fits");
        assert_eq!(answer.entry.account_id, *account);
        let (balance, version) = if *key == "d0" {
            ("9.00", 2)
        } else {
            ("6.50", 3)
        };
        assert_eq!(answer.balance, balance.parse().unwrap(), "{account} {key}");
        assert_eq!(answer.version, version, "{account} {key}: in arrival order");
    }
    let commits = accounts_per_commit(&app.pool).await;
    assert_eq!(
        commits[0],
        (20, 40),
        "the 40 debits of 20 accounts were written by one transaction: {commits:?}"
    );
    // Each account's events follow its sequence in cursor order.
    for account in &accounts {
        let sequences: Vec<i64> = sqlx::query_scalar(
            "SELECT sequence FROM balance_events WHERE account_id = $1 ORDER BY cursor",
        )
        .bind(account)
        .fetch_all(&app.pool)
        .await
        .unwrap();
        assert_eq!(sequences, vec![1, 2, 3], "{account}");
        let balance: rust_decimal::Decimal =
            sqlx::query_scalar("SELECT balance FROM accounts WHERE account_id = $1")
                .bind(account)
                .fetch_one(&app.pool)
                .await
                .unwrap();
        let sum: rust_decimal::Decimal =
            sqlx::query_scalar("SELECT sum(amount) FROM ledger_entries WHERE account_id = $1")
                .bind(account)
                .fetch_one(&app.pool)
                .await
                .unwrap();
        assert_eq!(balance, sum, "{account}: balance == sum(entries)");
    }
    let audited: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM audit_log WHERE action = 'debit' AND account_id LIKE 'many-%'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(audited, 40, "one audit row per debit");
    app.stop().await;
}

#[tokio::test]
async fn a_refusal_inside_a_batch_of_many_accounts_refuses_only_that_debit() {
    let app = spawn_app().await;
    app.account_with_balance("gate", "1.00").await;
    for account in ["mixed-a", "mixed-b", "mixed-c"] {
        app.account_with_balance(account, "5.00").await;
    }
    app.account_with_balance("mixed-used", "5.00").await;
    // A key already used on one account for another request.
    DebitBatcher::new(app.pool.clone(), BatchSettings::default())
        .debit(&service_caller(), posting("mixed-used", "1.00", "taken"))
        .await
        .unwrap();
    let answers = as_one_batch(
        &app,
        "gate",
        &[
            ("mixed-a", "3.00", "k1"),
            ("mixed-b", "9.00", "k1"), // more than the balance
            ("mixed-c", "1.00", "k1"),
            ("mixed-a", "3.00", "k2"),       // 2.00 left after k1
            ("mixed-used", "2.00", "taken"), // the same key for another request
            ("nobody", "1.00", "k1"),        // no such account
            ("mixed-b", "4.00", "k2"),
        ],
    )
    .await;
    let code = |i: usize| match &answers[i] {
        Ok(_) => "ok",
        Err(billing::BillingError::FailedPrecondition { .. }) => "failed_precondition",
        Err(billing::BillingError::AlreadyExists { .. }) => "already_exists",
        Err(billing::BillingError::NotFound(_)) => "not_found",
        Err(other) => panic!("unexpected {other:?}"),
    };
    let codes: Vec<&str> = (0..answers.len()).map(code).collect();
    assert_eq!(
        codes,
        [
            "ok",
            "failed_precondition",
            "ok",
            "failed_precondition",
            "already_exists",
            "not_found",
            "ok"
        ]
    );
    let balances: Vec<(String, String)> = sqlx::query_as(
        "SELECT account_id, balance::TEXT FROM accounts WHERE account_id LIKE 'mixed-%' ORDER BY 1",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    let balances: Vec<(&str, &str)> = balances
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    assert_eq!(
        balances,
        [
            ("mixed-a", "2.000000"),
            ("mixed-b", "1.000000"),
            ("mixed-c", "4.000000"),
            ("mixed-used", "4.000000")
        ]
    );
    let commits = accounts_per_commit(&app.pool).await;
    assert_eq!(
        commits[0],
        (3, 3),
        "the accepted debits shared one commit: {commits:?}"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_caller_cancelled_while_its_batch_waits_for_a_lock_withdraws_its_debit_alone() {
    let app = spawn_app().await;
    for account in ["gate", "stays", "leaves"] {
        app.account_with_balance(account, "10.00").await;
    }
    let batcher = one_batch_at_a_time(&app.pool);
    let gate = hold_locks(&app.pool, &["gate"]).await;
    let first = spawn_debit(&batcher, "gate", "1.00", "gate");
    crate::helpers::eventually("the first batch waits for the gate's lock", || async {
        waiting_for_locks(&app.pool).await >= 1 && batcher.waiting() == 0
    })
    .await;
    let second = hold_locks(&app.pool, &["leaves", "stays"]).await;
    let leaving = spawn_debit(&batcher, "leaves", "1.00", "k");
    let staying = spawn_debit(&batcher, "stays", "1.00", "k");
    queued(&batcher, "both debits queued", 2).await;
    gate.commit().await.unwrap();
    first.await.unwrap().unwrap();
    crate::helpers::eventually(
        "both debits taken into a batch that waits for their locks",
        || async { batcher.waiting() == 0 && waiting_for_locks(&app.pool).await >= 1 },
    )
    .await;
    // The caller goes away (a deadline, a disconnect) while its batch waits.
    leaving.abort();
    assert!(leaving.await.unwrap_err().is_cancelled());
    second.commit().await.unwrap();
    let kept = staying
        .await
        .unwrap()
        .expect("the other debit of the batch");
    assert_eq!(kept.balance, "9.00".parse().unwrap());
    let entries: Vec<String> = sqlx::query_scalar(
        "SELECT account_id FROM ledger_entries WHERE kind = 'usage' ORDER BY account_id",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(
        entries,
        ["gate", "stays"],
        "the withdrawn debit wrote nothing"
    );
    app.stop().await;
}

async fn deadlocks(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar("SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()")
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_batching_overlapping_accounts_in_opposite_orders_never_deadlock() {
    let app = spawn_app().await;
    let accounts: Vec<String> = (0..16).map(|i| format!("both-{i:02}")).collect();
    for account in &accounts {
        app.account_with_balance(account, "100.00").await;
    }
    let options = (*app.pool.connect_options()).clone();
    let other_pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .connect_with(options)
        .await
        .unwrap();
    // Two replicas: each its own pool and batcher, one batch in flight each.
    let replicas = [
        one_batch_at_a_time(&app.pool),
        one_batch_at_a_time(&other_pool),
    ];
    let deadlocks_before = deadlocks(&app.pool).await;
    let names: Vec<&str> = accounts.iter().map(String::as_str).collect();
    for round in 0..3 {
        // Every account held: each replica's first batch waits, the rest queue.
        let holder = hold_locks(&app.pool, &names).await;
        let ascending: Vec<&str> = names.clone();
        let descending: Vec<&str> = names.iter().rev().copied().collect();
        let mut tasks = Vec::new();
        for (index, (replica, order)) in replicas.iter().zip([&ascending, &descending]).enumerate()
        {
            let key = if index == 0 { "up" } else { "down" };
            tasks.push(spawn_debit(
                replica,
                order[0],
                "1.00",
                &format!("{key}-{round}-first"),
            ));
            crate::helpers::eventually(
                "the replica's first batch waits for a held lock",
                || async {
                    replica.waiting() == 0 && waiting_for_locks(&app.pool).await > index as i64
                },
            )
            .await;
            for account in &order[1..] {
                tasks.push(spawn_debit(
                    replica,
                    account,
                    "1.00",
                    &format!("{key}-{round}"),
                ));
            }
            queued(
                replica,
                "the replica's other debits queued",
                order.len() - 1,
            )
            .await;
        }
        // Released at once: each replica's second batch locks all 15 other accounts.
        holder.commit().await.unwrap();
        for task in tasks {
            tokio::time::timeout(std::time::Duration::from_secs(30), task)
                .await
                .expect("every debit is answered within 30 s")
                .unwrap()
                .expect("no debit fails");
        }
    }
    assert_eq!(
        deadlocks(&app.pool).await,
        deadlocks_before,
        "no deadlock was detected"
    );
    let commits = accounts_per_commit(&app.pool).await;
    assert!(
        commits
            .iter()
            .filter(|(accounts, _)| *accounts == 15)
            .count()
            >= 6,
        "each round, each replica wrote 15 accounts in one transaction: {commits:?}"
    );
    for account in &accounts {
        let balance: rust_decimal::Decimal =
            sqlx::query_scalar("SELECT balance FROM accounts WHERE account_id = $1")
                .bind(account)
                .fetch_one(&app.pool)
                .await
                .unwrap();
        assert_eq!(
            balance,
            rust_decimal::Decimal::new(9400, 2),
            "{account}: 6 debits of 1.00"
        );
    }
    app.stop().await;
}

/// A batcher whose leaders pipeline: up to four batches in flight, and a
/// forming batch keeps the next from starting for `patience`.
fn pipelined(pool: &sqlx::PgPool, patience: std::time::Duration) -> DebitBatcher {
    DebitBatcher::new(
        pool.clone(),
        BatchSettings {
            max_in_flight: 4,
            forming_patience: patience,
            ..BatchSettings::default()
        },
    )
}

#[tokio::test]
async fn debits_arriving_while_a_batch_forms_wait_and_join_the_next_batch_together() {
    let app = spawn_app().await;
    app.account_with_balance("gate", "10.00").await;
    let accounts: Vec<String> = (0..10).map(|i| format!("next-{i:02}")).collect();
    for account in &accounts {
        app.account_with_balance(account, "10.00").await;
    }
    // The forming batch waits for a lock for as long as the test holds it;
    // the patience outlasts the test.
    let batcher = pipelined(&app.pool, std::time::Duration::from_secs(600));
    let gate = hold_locks(&app.pool, &["gate"]).await;
    let first = spawn_debit(&batcher, "gate", "1.00", "gate");
    crate::helpers::eventually("the forming batch waits for the gate's lock", || async {
        waiting_for_locks(&app.pool).await >= 1 && batcher.waiting() == 0
    })
    .await;
    let tasks: Vec<DebitTask> = accounts
        .iter()
        .map(|account| spawn_debit(&batcher, account, "1.00", "k"))
        .collect();
    // Free leaders are left, yet no second batch starts while one forms.
    queued(&batcher, "every other debit waits for the next batch", 10).await;
    assert!(tasks.iter().all(|task| !task.is_finished()));
    gate.commit().await.unwrap();
    first.await.unwrap().expect("the gate debit");
    for task in tasks {
        let answer = task.await.unwrap().expect("every debit fits");
        assert_eq!(answer.balance, "9.00".parse().unwrap());
    }
    let commits = accounts_per_commit(&app.pool).await;
    assert_eq!(
        commits,
        vec![(10, 10), (1, 1)],
        "the ten debits that waited were written by one transaction"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_batch_waiting_for_a_lock_holds_up_other_accounts_only_for_the_patience() {
    let app = spawn_app().await;
    for account in ["gate", "other"] {
        app.account_with_balance(account, "10.00").await;
    }
    // Long enough that the other debit arrives while the gate's batch is
    // still within it: only the patience's timer can start its batch.
    let patience = std::time::Duration::from_secs(1);
    let batcher = pipelined(&app.pool, patience);
    let gate = hold_locks(&app.pool, &["gate"]).await;
    let first = spawn_debit(&batcher, "gate", "1.00", "gate");
    crate::helpers::eventually("the forming batch waits for the gate's lock", || async {
        waiting_for_locks(&app.pool).await >= 1 && batcher.waiting() == 0
    })
    .await;
    // The gate stays locked until the other account's debit is answered:
    // a batch must have started beside the one still forming. (The bound
    // only keeps a broken batcher from hanging the suite.)
    let other = spawn_debit(&batcher, "other", "1.00", "k");
    let answer = tokio::time::timeout(patience * 30, other)
        .await
        .expect("the other account's debit was held up by the batch waiting for the gate")
        .unwrap()
        .expect("the other account's debit");
    assert_eq!(answer.balance, "9.00".parse().unwrap());
    assert!(!first.is_finished(), "the gate's batch still waits");
    gate.commit().await.unwrap();
    let gated = first.await.unwrap().expect("the gate debit");
    assert_eq!(gated.balance, "9.00".parse().unwrap());
    app.stop().await;
}
