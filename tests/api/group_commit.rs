//! Group commit: concurrent debits to one account share transactions, yet
//! each is checked, answered and recorded as if it ran alone.

use std::collections::HashMap;

use billing::proto;
use tonic::Code;

use billing::server::ServerSettings;

use crate::helpers::{authed, count_rows, spawn_app, spawn_app_on};

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
