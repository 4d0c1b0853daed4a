//! The permission matrix: every Balances RPC × every role × own/other
//! account, with the exact status code; and the token checks.

use billing::proto;
use tonic::Code;

use crate::helpers::{TestApp, authed, spawn_app};

const OWN: &str = "own-acct";
const OTHER: &str = "other-acct";

#[derive(Debug, Clone, Copy, PartialEq)]
enum Rpc {
    CreateAccount,
    GetBalance,
    Debit,
    Credit,
    ListTransactions,
    WatchBalanceEvents,
    VerifyLedger,
}

const RPCS: [Rpc; 7] = [
    Rpc::CreateAccount,
    Rpc::GetBalance,
    Rpc::Debit,
    Rpc::Credit,
    Rpc::ListTransactions,
    Rpc::WatchBalanceEvents,
    Rpc::VerifyLedger,
];

async fn call(app: &TestApp, token: &str, rpc: Rpc, account: &str, nonce: usize) -> Code {
    let mut client = app.balances();
    let key = format!("perm-{nonce}");
    let result = match rpc {
        Rpc::CreateAccount => client
            .create_account(authed(
                token,
                proto::CreateAccountRequest {
                    account_id: format!("{account}-new-{nonce}"),
                    ..Default::default()
                },
            ))
            .await
            .map(|_| ()),
        Rpc::GetBalance => client
            .get_balance(authed(
                token,
                proto::GetBalanceRequest {
                    account_id: account.into(),
                },
            ))
            .await
            .map(|_| ()),
        Rpc::Debit => client
            .debit(authed(
                token,
                proto::DebitRequest {
                    account_id: account.into(),
                    amount: "0.01".into(),
                    idempotency_key: key,
                    ..Default::default()
                },
            ))
            .await
            .map(|_| ()),
        Rpc::Credit => client
            .credit(authed(
                token,
                proto::CreditRequest {
                    account_id: account.into(),
                    amount: "0.01".into(),
                    kind: proto::TransactionKind::Adjustment as i32,
                    idempotency_key: key,
                    ..Default::default()
                },
            ))
            .await
            .map(|_| ()),
        Rpc::ListTransactions => client
            .list_transactions(authed(
                token,
                proto::ListTransactionsRequest {
                    account_id: account.into(),
                    ..Default::default()
                },
            ))
            .await
            .map(|_| ()),
        Rpc::WatchBalanceEvents => client
            .watch_balance_events(authed(
                token,
                proto::WatchBalanceEventsRequest {
                    account_id: account.into(),
                    after_cursor: 0,
                },
            ))
            .await
            .map(|_| ()),
        Rpc::VerifyLedger => client
            .verify_ledger(authed(
                token,
                proto::VerifyLedgerRequest {
                    account_id: account.into(),
                },
            ))
            .await
            .map(|_| ()),
    };
    match result {
        Ok(()) => Code::Ok,
        Err(status) => status.code(),
    }
}

/// What the rules of DESIGN.md "Access" say a role gets for an RPC.
fn expected(role: &str, rpc: Rpc, own: bool) -> Code {
    let service_only = matches!(rpc, Rpc::CreateAccount | Rpc::Debit | Rpc::Credit);
    match role {
        "service" => Code::Ok,
        _ if service_only => Code::PermissionDenied,
        _ if own => Code::Ok,
        _ => Code::NotFound,
    }
}

#[tokio::test]
async fn every_balances_rpc_for_every_role_on_own_and_other_accounts() {
    let app = spawn_app().await;
    app.account_with_balance(OWN, "100.00").await;
    app.account_with_balance(OTHER, "100.00").await;
    let mut nonce = 0;
    let mut failures = Vec::new();
    for role in ["admin", "commercial", "billing", "viewer", "service"] {
        let token = app.token(role, if role == "service" { None } else { Some(OWN) });
        for rpc in RPCS {
            for (account, own) in [(OWN, true), (OTHER, false)] {
                nonce += 1;
                let got = call(&app, &token, rpc, account, nonce).await;
                let want = expected(role, rpc, own);
                if got != want {
                    failures.push(format!(
                        "{role} {rpc:?} own={own}: got {got:?}, want {want:?}"
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    app.stop().await;
}

#[tokio::test]
async fn every_account_at_once_is_for_the_service_role_only() {
    let app = spawn_app().await;
    app.account_with_balance(OWN, "1.00").await;
    let admin = app.token("admin", Some(OWN));
    let code = call(&app, &admin, Rpc::VerifyLedger, "", 1).await;
    assert_eq!(code, Code::PermissionDenied);
    let code = call(&app, &admin, Rpc::WatchBalanceEvents, "", 2).await;
    assert_eq!(code, Code::PermissionDenied);
    let code = call(&app, &app.service_token(), Rpc::VerifyLedger, "", 3).await;
    assert_eq!(code, Code::Ok);
    app.stop().await;
}

#[tokio::test]
async fn missing_malformed_or_foreign_tokens_are_unauthenticated() {
    let app = spawn_app().await;
    app.account_with_balance(OWN, "1.00").await;
    let request = || proto::GetBalanceRequest {
        account_id: OWN.into(),
    };

    let no_token = app
        .balances()
        .get_balance(tonic::Request::new(request()))
        .await
        .unwrap_err();
    assert_eq!(no_token.code(), Code::Unauthenticated);

    for header in ["Bearer", "Bearer not.a.jwt", "Basic dXNlcjpwYXNz", "bearer"] {
        let mut bad = tonic::Request::new(request());
        bad.metadata_mut()
            .insert("authorization", header.parse().unwrap());
        let error = app.balances().get_balance(bad).await.unwrap_err();
        assert_eq!(error.code(), Code::Unauthenticated, "{header}");
    }

    // Signed with another secret.
    let other_keys = billing::auth::KeySet::load(
        &billing::config::AuthArgs {
            jwt_secret: Some("a-completely-different-secret".into()),
            ..Default::default()
        },
        std::path::Path::new("/nonexistent"),
    )
    .unwrap();
    let foreign = other_keys.mint("mallory", "service", None, 600).unwrap();
    let error = app
        .balances()
        .get_balance(authed(&foreign, request()))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::Unauthenticated);
    assert_eq!(
        tonic_types::StatusExt::get_details_error_info(&error)
            .expect("ErrorInfo")
            .reason,
        "BEARER_TOKEN_INVALID"
    );

    // Expired.
    let claims = billing::auth::Claims {
        sub: "late".into(),
        account: None,
        roles: vec!["service".into()],
        exp: 1_000_000,
        iat: 999_000,
        nbf: None,
        iss: None,
        aud: None,
    };
    let expired = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(crate::helpers::TEST_SECRET.as_bytes()),
    )
    .unwrap();
    let error = app
        .balances()
        .get_balance(authed(&expired, request()))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::Unauthenticated);
    assert!(error.message().contains("expired"), "{}", error.message());
    // Its own reason, so a client knows to refresh the token.
    use tonic_types::StatusExt;
    assert_eq!(
        error.get_details_error_info().expect("ErrorInfo").reason,
        "BEARER_TOKEN_EXPIRED"
    );
    app.stop().await;
}

#[tokio::test]
async fn user_token_without_account_claim_or_with_unknown_role_gets_nothing() {
    let app = spawn_app().await;
    app.account_with_balance(OWN, "1.00").await;
    let secret = jsonwebtoken::EncodingKey::from_secret(crate::helpers::TEST_SECRET.as_bytes());
    let now = jsonwebtoken::get_current_timestamp();
    let mint = |account: Option<&str>, role: &str| {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &billing::auth::Claims {
                sub: "u".into(),
                account: account.map(str::to_owned),
                roles: vec![role.into()],
                exp: now + 600,
                iat: now,
                nbf: None,
                iss: None,
                aud: None,
            },
            &secret,
        )
        .unwrap()
    };
    let request = || proto::GetBalanceRequest {
        account_id: OWN.into(),
    };
    let no_account = app
        .balances()
        .get_balance(authed(&mint(None, "admin"), request()))
        .await
        .unwrap_err();
    assert_eq!(no_account.code(), Code::Unauthenticated);
    let unknown_role = app
        .balances()
        .get_balance(authed(&mint(Some(OWN), "superuser"), request()))
        .await
        .unwrap_err();
    assert_eq!(unknown_role.code(), Code::PermissionDenied);
    app.stop().await;
}

#[tokio::test]
async fn health_and_reflection_need_no_token() {
    let app = spawn_app().await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(app.channel.clone());
    let response = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "billing.v1.Balances".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        response.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    app.stop().await;
}
