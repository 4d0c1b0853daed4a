//! Balances: accounts, debits, credits, idempotency, history, the invariant.

use std::collections::HashSet;

use billing::proto::{self, TransactionKind};
use tonic::Code;

use crate::helpers::{authed, count_rows, spawn_app};

fn debit(account: &str, amount: &str, key: &str) -> proto::DebitRequest {
    proto::DebitRequest {
        account_id: account.into(),
        amount: amount.into(),
        idempotency_key: key.into(),
        description: "call to +4420".into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn new_account_starts_at_zero_in_its_own_currency() {
    let app = spawn_app().await;
    let token = app.service_token();
    let created = app
        .balances()
        .create_account(authed(
            &token,
            proto::CreateAccountRequest {
                account_id: "eu-1".into(),
                currency: "EUR".into(),
                display_name: "Société Générale — Ü".into(),
                billing_email: "billing@example.eu".into(),
                credit: "5.00".into(),
                idempotency_key: String::new(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .account
        .unwrap();
    assert_eq!(created.currency, "EUR");
    assert_eq!(created.display_name, "Société Générale — Ü");
    let balance = app
        .balances()
        .get_balance(authed(
            &token,
            proto::GetBalanceRequest {
                account_id: "eu-1".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(balance.balance, "0.00");
    assert_eq!(balance.credit, "5.00");
    assert_eq!(balance.total_balance, "5.00");
    assert_eq!(balance.currency, "EUR");
    assert_eq!(balance.version, 0);
    app.stop().await;
}

#[tokio::test]
async fn creating_the_same_account_again_is_idempotent_but_different_fields_are_refused() {
    let app = spawn_app().await;
    app.account_with_balance("acme", "0").await;
    let token = app.service_token();
    let same = proto::CreateAccountRequest {
        account_id: "acme".into(),
        currency: "USD".into(),
        billing_email: "acme@example.com".into(),
        ..Default::default()
    };
    app.balances()
        .create_account(authed(&token, same.clone()))
        .await
        .unwrap();
    let different = proto::CreateAccountRequest {
        currency: "EUR".into(),
        ..same
    };
    let error = app
        .balances()
        .create_account(authed(&token, different))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::AlreadyExists);
    assert_eq!(count_rows(&app.pool, "accounts").await, 1);
    app.stop().await;
}

#[tokio::test]
async fn debit_moves_the_balance_and_records_entry_event_and_audit() {
    let app = spawn_app().await;
    app.account_with_balance("acme", "10.00").await;
    let token = app.service_token();
    let response = app
        .balances()
        .debit(authed(&token, debit("acme", "0.0035", "call-1")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.balance, "9.9965");
    assert_eq!(response.version, 2);
    let transaction = response.transaction.unwrap();
    assert_eq!(transaction.amount, "-0.0035");
    assert_eq!(transaction.kind, TransactionKind::Usage as i32);

    let (sequence, kind, total_after): (i64, String, rust_decimal::Decimal) = sqlx::query_as(
        "SELECT sequence, kind, total_balance_after FROM balance_events WHERE transaction_id = $1::uuid",
    )
    .bind(&transaction.transaction_id)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!((sequence, kind.as_str()), (2, "debited"));
    assert_eq!(total_after.to_string(), "9.996500");
    let audits: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM audit_log WHERE action = 'debit' AND account_id = 'acme'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(audits, 1);
    app.stop().await;
}

#[tokio::test]
async fn debit_beyond_total_balance_is_refused_and_changes_nothing() {
    let app = spawn_app().await;
    app.account_with_balance("acme", "1.00").await;
    let token = app.service_token();
    let entries_before = count_rows(&app.pool, "ledger_entries").await;
    let error = app
        .balances()
        .debit(authed(&token, debit("acme", "1.000001", "too-much")))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::FailedPrecondition);
    assert!(
        error.message().contains("insufficient funds"),
        "{}",
        error.message()
    );
    assert_eq!(
        count_rows(&app.pool, "ledger_entries").await,
        entries_before
    );
    assert_eq!(count_rows(&app.pool, "idempotency_keys").await, 1);
    // The refused key was not consumed: the same key works once funds allow it.
    let ok = app
        .balances()
        .debit(authed(&token, debit("acme", "1.00", "too-much")))
        .await;
    assert!(ok.is_ok());
    app.stop().await;
}

#[tokio::test]
async fn overdraft_debit_for_usage_that_already_happened_goes_below_zero() {
    let app = spawn_app().await;
    app.account_with_balance("acme", "1.00").await;
    let token = app.service_token();
    let response = app
        .balances()
        .debit(authed(
            &token,
            proto::DebitRequest {
                allow_overdraft: true,
                ..debit("acme", "3.50", "ended-call")
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.balance, "-2.50");
    assert_eq!(response.total_balance, "-2.50");
    app.stop().await;
}

#[tokio::test]
async fn credit_limit_lets_usage_spend_below_zero_balance() {
    let app = spawn_app().await;
    let token = app.service_token();
    app.balances()
        .create_account(authed(
            &token,
            proto::CreateAccountRequest {
                account_id: "postpaid".into(),
                credit: "10.00".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    let response = app
        .balances()
        .debit(authed(&token, debit("postpaid", "7", "d1")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (response.balance.as_str(), response.total_balance.as_str()),
        ("-7.00", "3.00")
    );
    let refused = app
        .balances()
        .debit(authed(&token, debit("postpaid", "3.01", "d2")))
        .await;
    assert_eq!(refused.unwrap_err().code(), Code::FailedPrecondition);
    app.stop().await;
}

#[tokio::test]
async fn same_idempotency_key_and_request_returns_the_first_result_once() {
    let app = spawn_app().await;
    app.account_with_balance("acme", "10.00").await;
    let token = app.service_token();
    let first = app
        .balances()
        .debit(authed(&token, debit("acme", "2.00", "retry-me")))
        .await
        .unwrap()
        .into_inner();
    let second = app
        .balances()
        .debit(authed(&token, debit("acme", "2.00", "retry-me")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first, second);
    let balance = app
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
    assert_eq!(balance.balance, "8.00");
    assert_eq!(count_rows(&app.pool, "ledger_entries").await, 2);
    app.stop().await;
}

#[tokio::test]
async fn same_idempotency_key_with_a_different_request_is_already_exists() {
    let app = spawn_app().await;
    app.account_with_balance("acme", "10.00").await;
    let token = app.service_token();
    app.balances()
        .debit(authed(&token, debit("acme", "2.00", "k")))
        .await
        .unwrap();
    let error = app
        .balances()
        .debit(authed(&token, debit("acme", "2.01", "k")))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::AlreadyExists);
    assert!(
        error.message().contains("idempotency_key"),
        "{}",
        error.message()
    );
    // A credit reusing a debit's key is a different request too.
    let credit = app
        .balances()
        .credit(authed(
            &token,
            proto::CreditRequest {
                account_id: "acme".into(),
                amount: "2.00".into(),
                kind: TransactionKind::Refund as i32,
                idempotency_key: "k".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(credit.code(), Code::AlreadyExists);
    assert_eq!(count_rows(&app.pool, "ledger_entries").await, 2);
    app.stop().await;
}

#[tokio::test]
async fn concurrent_retries_of_one_key_take_effect_once() {
    let app = spawn_app().await;
    app.account_with_balance("acme", "100.00").await;
    let token = app.service_token();
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let mut client = app.balances();
        let token = token.clone();
        tasks.push(tokio::spawn(async move {
            client
                .debit(authed(&token, debit("acme", "5.00", "same")))
                .await
                .map(|r| r.into_inner())
        }));
    }
    let mut transaction_ids = HashSet::new();
    for task in tasks {
        let response = task.await.unwrap().expect("every retry succeeds");
        transaction_ids.insert(response.transaction.unwrap().transaction_id);
    }
    assert_eq!(transaction_ids.len(), 1);
    assert_eq!(count_rows(&app.pool, "ledger_entries").await, 2);
    app.stop().await;
}

#[tokio::test]
async fn credits_accept_only_adjustment_refund_and_promotion() {
    let app = spawn_app().await;
    app.account_with_balance("acme", "0").await;
    let token = app.service_token();
    for kind in [
        TransactionKind::Adjustment,
        TransactionKind::Refund,
        TransactionKind::Promotion,
    ] {
        let response = app
            .balances()
            .credit(authed(
                &token,
                proto::CreditRequest {
                    account_id: "acme".into(),
                    amount: "1.25".into(),
                    kind: kind as i32,
                    idempotency_key: format!("{kind:?}"),
                    ..Default::default()
                },
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(response.transaction.unwrap().kind, kind as i32);
    }
    for kind in [
        TransactionKind::Unspecified,
        TransactionKind::Usage,
        TransactionKind::TopUp,
    ] {
        let error = app
            .balances()
            .credit(authed(
                &token,
                proto::CreditRequest {
                    account_id: "acme".into(),
                    amount: "1.25".into(),
                    kind: kind as i32,
                    idempotency_key: "bad-kind".into(),
                    ..Default::default()
                },
            ))
            .await
            .unwrap_err();
        assert_eq!(error.code(), Code::InvalidArgument);
        assert!(error.message().starts_with("kind"), "{}", error.message());
    }
    app.stop().await;
}

#[tokio::test]
async fn transactions_page_newest_first_and_filter_by_kind_and_time() {
    let app = spawn_app().await;
    app.account_with_balance("acme", "100.00").await;
    let token = app.service_token();
    for i in 0..7 {
        app.balances()
            .debit(authed(&token, debit("acme", "1.00", &format!("d{i}"))))
            .await
            .unwrap();
    }
    let mut seen = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = app
            .balances()
            .list_transactions(authed(
                &token,
                proto::ListTransactionsRequest {
                    account_id: "acme".into(),
                    page_size: 3,
                    page_token: page_token.clone(),
                    ..Default::default()
                },
            ))
            .await
            .unwrap()
            .into_inner();
        seen.extend(page.transactions);
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert_eq!(seen.len(), 8);
    assert_eq!(seen.first().unwrap().balance_after, "93.00");
    assert_eq!(
        seen.last().unwrap().kind,
        TransactionKind::Adjustment as i32
    );
    let unique: HashSet<_> = seen.iter().map(|t| t.transaction_id.clone()).collect();
    assert_eq!(unique.len(), 8);

    let only_adjustments = app
        .balances()
        .list_transactions(authed(
            &token,
            proto::ListTransactionsRequest {
                account_id: "acme".into(),
                kinds: vec![TransactionKind::Adjustment as i32],
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(only_adjustments.transactions.len(), 1);

    let future = prost_types::Timestamp {
        seconds: chrono::Utc::now().timestamp() + 3600,
        nanos: 0,
    };
    let none_after = app
        .balances()
        .list_transactions(authed(
            &token,
            proto::ListTransactionsRequest {
                account_id: "acme".into(),
                created_after: Some(future),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(none_after.transactions.is_empty());
    let all_before = app
        .balances()
        .list_transactions(authed(
            &token,
            proto::ListTransactionsRequest {
                account_id: "acme".into(),
                created_before: Some(future),
                page_size: 100,
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all_before.transactions.len(), 8);
    app.stop().await;
}

#[tokio::test]
async fn fifty_concurrent_debits_on_one_account_lose_no_update() {
    let app = spawn_app().await;
    app.account_with_balance("hot", "1000.00").await;
    let token = app.service_token();
    let mut tasks = Vec::new();
    for i in 0..60 {
        let mut client = app.balances();
        let token = token.clone();
        tasks.push(tokio::spawn(async move {
            client
                .debit(authed(&token, debit("hot", "1.0035", &format!("hot-{i}"))))
                .await
                .map(|r| r.into_inner().version)
        }));
    }
    let mut versions = HashSet::new();
    for task in tasks {
        versions.insert(task.await.unwrap().expect("debit succeeds"));
    }
    assert_eq!(versions.len(), 60, "every debit saw its own version");
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
    assert_eq!(balance.balance, "939.79");
    assert_eq!(balance.version, 61);
    let report = app
        .balances()
        .verify_ledger(authed(
            &token,
            proto::VerifyLedgerRequest {
                account_id: String::new(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(report.accounts_checked, 1);
    assert!(report.mismatches.is_empty(), "{:?}", report.mismatches);
    let sequences: Vec<i64> = sqlx::query_scalar(
        "SELECT sequence FROM balance_events WHERE account_id = 'hot' ORDER BY sequence",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(
        sequences,
        (1..=61).collect::<Vec<i64>>(),
        "event sequence is gapless"
    );
    app.stop().await;
}

#[tokio::test]
async fn verify_ledger_reports_a_tampered_balance() {
    let app = spawn_app().await;
    app.account_with_balance("acme", "10.00").await;
    sqlx::query("UPDATE accounts SET balance = balance + 1 WHERE account_id = 'acme'")
        .execute(&app.pool)
        .await
        .unwrap();
    let report = app
        .balances()
        .verify_ledger(authed(
            &app.service_token(),
            proto::VerifyLedgerRequest {
                account_id: "acme".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(report.mismatches.len(), 1);
    assert_eq!(report.mismatches[0].sum_of_entries, "10");
    app.stop().await;
}

#[tokio::test]
async fn ledger_entries_cannot_be_updated_or_deleted() {
    let app = spawn_app().await;
    app.account_with_balance("acme", "10.00").await;
    let update = sqlx::query("UPDATE ledger_entries SET amount = 1")
        .execute(&app.pool)
        .await;
    assert!(update.is_err());
    let delete = sqlx::query("DELETE FROM ledger_entries")
        .execute(&app.pool)
        .await;
    assert!(delete.is_err());
    app.stop().await;
}

#[tokio::test]
async fn unknown_account_is_not_found() {
    let app = spawn_app().await;
    let error = app
        .balances()
        .get_balance(authed(
            &app.service_token(),
            proto::GetBalanceRequest {
                account_id: "ghost".into(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::NotFound);
    let error = app
        .balances()
        .debit(authed(&app.service_token(), debit("ghost", "1", "k")))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::NotFound);
    app.stop().await;
}

/// Every field of every Balances request, each with a bad value: INVALID_ARGUMENT
/// naming the field, and nothing written.
#[tokio::test]
async fn bad_input_names_the_field_and_writes_nothing() {
    let app = spawn_app().await;
    app.account_with_balance("acme", "10.00").await;
    let token = app.service_token();
    let tables = [
        "accounts",
        "ledger_entries",
        "balance_events",
        "idempotency_keys",
        "audit_log",
    ];
    let mut before = Vec::new();
    for table in tables {
        before.push(count_rows(&app.pool, table).await);
    }

    let good_debit = debit("acme", "1.00", "k-bad");
    let mut many = std::collections::HashMap::new();
    for i in 0..33 {
        many.insert(format!("k{i}"), "v".to_string());
    }
    let debit_cases: Vec<(&str, proto::DebitRequest)> = vec![
        (
            "account_id",
            proto::DebitRequest {
                account_id: String::new(),
                ..good_debit.clone()
            },
        ),
        (
            "account_id",
            proto::DebitRequest {
                account_id: "a'; DROP TABLE accounts;--".into(),
                ..good_debit.clone()
            },
        ),
        (
            "account_id",
            proto::DebitRequest {
                account_id: "x".repeat(65),
                ..good_debit.clone()
            },
        ),
        (
            "amount",
            proto::DebitRequest {
                amount: String::new(),
                ..good_debit.clone()
            },
        ),
        (
            "amount",
            proto::DebitRequest {
                amount: "1e3".into(),
                ..good_debit.clone()
            },
        ),
        (
            "amount",
            proto::DebitRequest {
                amount: "-1".into(),
                ..good_debit.clone()
            },
        ),
        (
            "amount",
            proto::DebitRequest {
                amount: "0".into(),
                ..good_debit.clone()
            },
        ),
        (
            "amount",
            proto::DebitRequest {
                amount: "0.0000001".into(),
                ..good_debit.clone()
            },
        ),
        (
            "amount",
            proto::DebitRequest {
                amount: "１２".into(),
                ..good_debit.clone()
            },
        ),
        (
            "amount",
            proto::DebitRequest {
                amount: "9".repeat(30),
                ..good_debit.clone()
            },
        ),
        (
            "idempotency_key",
            proto::DebitRequest {
                idempotency_key: String::new(),
                ..good_debit.clone()
            },
        ),
        (
            "idempotency_key",
            proto::DebitRequest {
                idempotency_key: "has space".into(),
                ..good_debit.clone()
            },
        ),
        (
            "idempotency_key",
            proto::DebitRequest {
                idempotency_key: "k".repeat(129),
                ..good_debit.clone()
            },
        ),
        (
            "description",
            proto::DebitRequest {
                description: "d".repeat(501),
                ..good_debit.clone()
            },
        ),
        (
            "description",
            proto::DebitRequest {
                description: "bell\u{7}".into(),
                ..good_debit.clone()
            },
        ),
        (
            "metadata",
            proto::DebitRequest {
                metadata: many,
                ..good_debit.clone()
            },
        ),
        (
            "metadata",
            proto::DebitRequest {
                metadata: [(String::new(), "v".to_string())].into_iter().collect(),
                ..good_debit.clone()
            },
        ),
    ];
    for (field, request) in debit_cases {
        let error = app
            .balances()
            .debit(authed(&token, request.clone()))
            .await
            .unwrap_err();
        assert_eq!(error.code(), Code::InvalidArgument, "{field}: {request:?}");
        assert!(
            error.message().starts_with(field),
            "{field}: {}",
            error.message()
        );
    }

    let good_credit = proto::CreditRequest {
        account_id: "acme".into(),
        amount: "1.00".into(),
        kind: TransactionKind::Refund as i32,
        idempotency_key: "c-bad".into(),
        ..Default::default()
    };
    let credit_cases: Vec<(&str, proto::CreditRequest)> = vec![
        (
            "account_id",
            proto::CreditRequest {
                account_id: "bad id".into(),
                ..good_credit.clone()
            },
        ),
        (
            "amount",
            proto::CreditRequest {
                amount: "+1".into(),
                ..good_credit.clone()
            },
        ),
        (
            "amount",
            proto::CreditRequest {
                amount: "1.".into(),
                ..good_credit.clone()
            },
        ),
        (
            "kind",
            proto::CreditRequest {
                kind: 99,
                ..good_credit.clone()
            },
        ),
        (
            "idempotency_key",
            proto::CreditRequest {
                idempotency_key: String::new(),
                ..good_credit.clone()
            },
        ),
    ];
    for (field, request) in credit_cases {
        let error = app
            .balances()
            .credit(authed(&token, request.clone()))
            .await
            .unwrap_err();
        assert_eq!(error.code(), Code::InvalidArgument, "{field}: {request:?}");
        assert!(
            error.message().starts_with(field),
            "{field}: {}",
            error.message()
        );
    }

    let good_create = proto::CreateAccountRequest {
        account_id: "new-1".into(),
        currency: "USD".into(),
        ..Default::default()
    };
    let create_cases: Vec<(&str, proto::CreateAccountRequest)> = vec![
        (
            "account_id",
            proto::CreateAccountRequest {
                account_id: "ü".into(),
                ..good_create.clone()
            },
        ),
        (
            "currency",
            proto::CreateAccountRequest {
                currency: "usd".into(),
                ..good_create.clone()
            },
        ),
        (
            "currency",
            proto::CreateAccountRequest {
                currency: "XYZ".into(),
                ..good_create.clone()
            },
        ),
        (
            "billing_email",
            proto::CreateAccountRequest {
                billing_email: "not-an-email".into(),
                ..good_create.clone()
            },
        ),
        (
            "display_name",
            proto::CreateAccountRequest {
                display_name: "n".repeat(201),
                ..good_create.clone()
            },
        ),
        (
            "credit",
            proto::CreateAccountRequest {
                credit: "-5".into(),
                ..good_create.clone()
            },
        ),
        (
            "credit",
            proto::CreateAccountRequest {
                credit: "1.001".into(),
                ..good_create.clone()
            },
        ),
        (
            "idempotency_key",
            proto::CreateAccountRequest {
                idempotency_key: "\u{1F4A5}".into(),
                ..good_create.clone()
            },
        ),
    ];
    for (field, request) in create_cases {
        let error = app
            .balances()
            .create_account(authed(&token, request.clone()))
            .await
            .unwrap_err();
        assert_eq!(error.code(), Code::InvalidArgument, "{field}: {request:?}");
        assert!(
            error.message().starts_with(field),
            "{field}: {}",
            error.message()
        );
    }

    let list_cases: Vec<(&str, proto::ListTransactionsRequest)> = vec![
        (
            "page_size",
            proto::ListTransactionsRequest {
                account_id: "acme".into(),
                page_size: -1,
                ..Default::default()
            },
        ),
        (
            "page_token",
            proto::ListTransactionsRequest {
                account_id: "acme".into(),
                page_token: "zzz".into(),
                ..Default::default()
            },
        ),
        (
            "kinds",
            proto::ListTransactionsRequest {
                account_id: "acme".into(),
                kinds: vec![42],
                ..Default::default()
            },
        ),
        (
            "created_after",
            proto::ListTransactionsRequest {
                account_id: "acme".into(),
                created_after: Some(prost_types::Timestamp {
                    seconds: 0,
                    nanos: -1,
                }),
                ..Default::default()
            },
        ),
    ];
    for (field, request) in list_cases {
        let error = app
            .balances()
            .list_transactions(authed(&token, request.clone()))
            .await
            .unwrap_err();
        assert_eq!(error.code(), Code::InvalidArgument, "{field}: {request:?}");
        assert!(
            error.message().starts_with(field),
            "{field}: {}",
            error.message()
        );
    }
    let error = app
        .balances()
        .get_balance(authed(
            &token,
            proto::GetBalanceRequest {
                account_id: String::new(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument);

    for (table, count) in tables.iter().zip(before) {
        assert_eq!(count_rows(&app.pool, table).await, count, "{table} changed");
    }
    app.stop().await;
}
