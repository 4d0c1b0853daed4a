//! Tower limits: beyond the concurrency limit calls are shed at once with
//! RESOURCE_EXHAUSTED (never queued), and a request that outlives its
//! timeout is cut off without writing anything.

use std::time::Duration;

use billing::proto;
use billing::server::ServerSettings;
use billing::telemetry::metrics;
use tonic::Code;

use crate::helpers::{authed, count_rows, spawn_app_with};
use crate::telemetry::sample;

/// Holds the account's row lock in an open transaction, so a debit blocks.
async fn lock_account(
    pool: &sqlx::PgPool,
    account: &str,
) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut transaction = pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM accounts WHERE account_id = $1 FOR UPDATE")
        .bind(account)
        .execute(&mut *transaction)
        .await
        .unwrap();
    transaction
}

async fn wait_until_a_query_waits_on_a_lock(pool: &sqlx::PgPool) {
    for _ in 0..200 {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(pool)
        .await
        .unwrap();
        if waiting > 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the debit never blocked on the row lock");
}

fn debit(key: &str) -> proto::DebitRequest {
    proto::DebitRequest {
        account_id: "acme".into(),
        amount: "1.00".into(),
        idempotency_key: key.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn calls_beyond_the_concurrency_limit_are_shed_not_queued() {
    let app = spawn_app_with(ServerSettings {
        concurrency_limit: 1,
        ..Default::default()
    })
    .await;
    app.account_with_balance("acme", "10.00").await;
    let token = app.service_token();
    let overload = [("limit", "overload")];
    let shed_before = sample(
        &metrics::render(),
        "billing_limits_refused_total",
        &overload,
    );
    let lock = lock_account(&app.pool, "acme").await;
    let mut blocked_client = app.balances();
    let blocked_token = token.clone();
    let blocked = tokio::spawn(async move {
        blocked_client
            .debit(authed(&blocked_token, debit("held")))
            .await
    });
    wait_until_a_query_waits_on_a_lock(&app.pool).await;

    let shed = app
        .balances()
        .get_balance(authed(
            &token,
            proto::GetBalanceRequest {
                account_id: "acme".into(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(shed.code(), Code::ResourceExhausted);
    // Counted like every limit (other tests share the registry: it only grows).
    let shed_after = sample(
        &metrics::render(),
        "billing_limits_refused_total",
        &overload,
    );
    assert!(
        shed_after >= shed_before + 1.0,
        "the shed call is counted: {shed_before} -> {shed_after}"
    );

    lock.rollback().await.unwrap();
    let admitted = blocked.await.unwrap();
    assert!(
        admitted.is_ok(),
        "the admitted call still finishes: {admitted:?}"
    );
    let recovered = app
        .balances()
        .get_balance(authed(
            &token,
            proto::GetBalanceRequest {
                account_id: "acme".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(recovered.balance, "9.00");
    app.stop().await;
}

#[tokio::test]
async fn health_checks_are_never_shed_while_other_calls_are() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    let app = spawn_app_with(ServerSettings {
        concurrency_limit: 1,
        ..Default::default()
    })
    .await;
    app.account_with_balance("acme", "10.00").await;
    let token = app.service_token();
    let lock = lock_account(&app.pool, "acme").await;
    let mut blocked_client = app.balances();
    let blocked_token = token.clone();
    let blocked = tokio::spawn(async move {
        blocked_client
            .debit(authed(&blocked_token, debit("held")))
            .await
    });
    wait_until_a_query_waits_on_a_lock(&app.pool).await;

    // The limit is full: a billing call is shed…
    let shed = app
        .balances()
        .get_balance(authed(
            &token,
            proto::GetBalanceRequest {
                account_id: "acme".into(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(shed.code(), Code::ResourceExhausted);
    // …while every health check still answers.
    let mut health = tonic_health::pb::health_client::HealthClient::new(app.channel.clone());
    for service in ["", "liveness", "billing.v1.Balances"] {
        for _ in 0..20 {
            let answer = health
                .check(HealthCheckRequest {
                    service: service.into(),
                })
                .await
                .unwrap_or_else(|status| panic!("health {service:?} was refused: {status:?}"));
            assert_eq!(answer.into_inner().status, ServingStatus::Serving as i32);
        }
    }
    lock.rollback().await.unwrap();
    assert!(blocked.await.unwrap().is_ok());
    app.stop().await;
}

#[tokio::test]
async fn a_request_past_its_timeout_is_cut_off_and_writes_nothing() {
    let app = spawn_app_with(ServerSettings {
        request_timeout: Duration::from_millis(300),
        ..Default::default()
    })
    .await;
    app.account_with_balance("acme", "10.00").await;
    let entries = count_rows(&app.pool, "ledger_entries").await;
    let lock = lock_account(&app.pool, "acme").await;
    let error = app
        .balances()
        .debit(authed(&app.service_token(), debit("slow")))
        .await
        .unwrap_err();
    assert!(
        matches!(error.code(), Code::Cancelled | Code::DeadlineExceeded),
        "{error:?}"
    );
    lock.rollback().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(count_rows(&app.pool, "ledger_entries").await, entries);
    app.stop().await;
}

#[tokio::test]
async fn a_call_with_a_one_millisecond_grpc_timeout_gets_deadline_exceeded() {
    let app = spawn_app_with(ServerSettings::default()).await;
    app.account_with_balance("acme", "10.00").await;
    let entries = count_rows(&app.pool, "ledger_entries").await;
    // The debit cannot finish while the row is locked: only the deadline ends it.
    let lock = lock_account(&app.pool, "acme").await;
    let mut request = authed(&app.service_token(), debit("hurried"));
    request.set_timeout(Duration::from_millis(1));
    // tonic's Channel would also time the call out itself (as CANCELLED) and
    // race the server's answer: this client leaves the deadline to the server.
    let plain_http2 =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .http2_only(true)
            .build_http::<tonic::body::Body>();
    let origin = format!("http://{}", app.address).parse().unwrap();
    let error = proto::balances_client::BalancesClient::with_origin(plain_http2, origin)
        .debit(request)
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::DeadlineExceeded, "{error:?}");
    lock.rollback().await.unwrap();
    // The server is fine afterwards, and the cut-off debit wrote nothing.
    let balance = app
        .balances()
        .get_balance(authed(
            &app.service_token(),
            proto::GetBalanceRequest {
                account_id: "acme".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(balance.balance, "10.00");
    assert_eq!(count_rows(&app.pool, "ledger_entries").await, entries);
    app.stop().await;
}

#[tokio::test]
async fn a_message_larger_than_the_limit_is_refused_and_the_server_stays_up() {
    let app = spawn_app_with(ServerSettings {
        max_message_bytes: 64 * 1024,
        ..Default::default()
    })
    .await;
    app.account_with_balance("acme", "10.00").await;
    let mut oversized = debit("big");
    oversized.description = "x".repeat(100 * 1024);
    let error = app
        .balances()
        .debit(authed(&app.service_token(), oversized))
        .await
        .unwrap_err();
    assert!(
        matches!(error.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{error:?}"
    );
    app.balances()
        .debit(authed(&app.service_token(), debit("small")))
        .await
        .expect("a normal message still passes");
    app.stop().await;
}
