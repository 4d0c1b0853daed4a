//! Attacks on authentication and on account isolation, each a test: forged
//! and doctored tokens are UNAUTHENTICATED (or PERMISSION_DENIED when they
//! grant nothing), and every RPC aimed at another account's ids is
//! NOT_FOUND, says nothing about that account and writes nothing.
//! (Expired tokens, another HS256 secret, a missing `account` claim and an
//! unknown role are in `permissions.rs`; key-set checks in `keys.rs`.)

use std::path::PathBuf;
use std::sync::Arc;

use billing::auth::{Claims, KeySet};
use billing::config::AuthArgs;
use billing::proto::{
    self, balance_policy_client::BalancePolicyClient, notifications_client::NotificationsClient,
    payment_methods_client::PaymentMethodsClient,
};
use tonic::{Code, Status};

use crate::helpers::{TEST_SECRET, TestApp, authed, spawn_app, spawn_app_with_keys, table_counts};
use crate::payment_methods::{VISA, add_active_card, add_card_request, card, unique_visa};

const OWN: &str = "own-acct";
const OTHER: &str = "other-acct";
const ISSUER: &str = "https://panel.example";
const AUDIENCE: &str = "billing";

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// Production-like keys: RS256 public key, issuer and audience configured.
fn rs256_keys() -> Arc<KeySet> {
    Arc::new(
        KeySet::load(
            &AuthArgs {
                jwt_public_key_file: vec![fixture("rs256-public.pem")],
                jwt_private_key_file: Some(fixture("rs256-private.pem")),
                jwt_issuer: Some(ISSUER.into()),
                jwt_audience: Some(AUDIENCE.into()),
                ..Default::default()
            },
            std::path::Path::new("/nonexistent"),
        )
        .expect("rs256 keys"),
    )
}

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

fn claims(account: Option<&str>, roles: &[&str]) -> Claims {
    Claims {
        sub: "attacker".into(),
        account: account.map(str::to_owned),
        roles: roles.iter().map(|r| (*r).to_owned()).collect(),
        exp: now() + 600,
        iat: now(),
        nbf: None,
        iss: None,
        aud: None,
    }
}

fn hs256(claims: &Claims) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(TEST_SECRET.as_bytes()),
    )
    .unwrap()
}

fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]));
        }
    }
    out
}

async fn get_balance(app: &TestApp, token: &str, account: &str) -> Result<(), Status> {
    app.balances()
        .get_balance(authed(
            token,
            proto::GetBalanceRequest {
                account_id: account.into(),
            },
        ))
        .await
        .map(drop)
}

async fn debit(app: &TestApp, token: &str, account: &str, key: &str) -> Result<(), Status> {
    app.balances()
        .debit(authed(
            token,
            proto::DebitRequest {
                account_id: account.into(),
                amount: "1.00".into(),
                idempotency_key: key.into(),
                ..Default::default()
            },
        ))
        .await
        .map(drop)
}

fn code(result: Result<(), Status>) -> Code {
    result.err().map_or(Code::Ok, |s| s.code())
}

#[tokio::test]
async fn alg_none_token_is_unauthenticated() {
    let app = spawn_app().await;
    app.account_with_balance(OWN, "10.00").await;
    let header = base64url(br#"{"alg":"none","typ":"JWT"}"#);
    let payload = base64url(&serde_json::to_vec(&claims(None, &["service"])).unwrap());
    for token in [
        format!("{header}.{payload}."),
        format!("{header}.{payload}"),
    ] {
        assert_eq!(
            code(get_balance(&app, &token, OWN).await),
            Code::Unauthenticated
        );
        assert_eq!(
            code(debit(&app, &token, OWN, "none").await),
            Code::Unauthenticated
        );
    }
    // The encoder is right: the same payload with the real signature is accepted.
    let genuine = hs256(&claims(None, &["service"]));
    let signature = genuine.rsplit('.').next().unwrap();
    let header = genuine.split('.').next().unwrap();
    let resigned = format!("{header}.{payload}.{signature}");
    assert_eq!(resigned, genuine);
    assert_eq!(count_ledger(&app).await, 1, "only the opening credit");
    app.stop().await;
}

async fn count_ledger(app: &TestApp) -> i64 {
    table_counts(&app.pool).await["ledger_entries"]
}

#[tokio::test]
async fn token_signed_by_another_key_is_unauthenticated_by_an_rs256_server() {
    let app = spawn_app_with_keys(rs256_keys()).await;
    app.account_with_balance(OWN, "10.00").await;
    let mut forged_claims = claims(None, &["service"]);
    forged_claims.iss = Some(ISSUER.into());
    forged_claims.aud = Some(AUDIENCE.into());
    let es256 = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256),
        &forged_claims,
        &jsonwebtoken::EncodingKey::from_ec_pem(
            &std::fs::read(fixture("es256-private.pem")).unwrap(),
        )
        .unwrap(),
    )
    .unwrap();
    let hs = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &forged_claims,
        &jsonwebtoken::EncodingKey::from_secret(TEST_SECRET.as_bytes()),
    )
    .unwrap();
    for token in [es256, hs] {
        assert_eq!(
            code(get_balance(&app, &token, OWN).await),
            Code::Unauthenticated
        );
    }
    // The server does accept its own key's tokens.
    assert_eq!(
        code(get_balance(&app, &app.service_token(), OWN).await),
        Code::Ok
    );
    app.stop().await;
}

#[tokio::test]
async fn hs256_token_signed_with_the_rs256_public_key_is_unauthenticated() {
    let app = spawn_app_with_keys(rs256_keys()).await;
    app.account_with_balance(OWN, "10.00").await;
    let public_pem = std::fs::read(fixture("rs256-public.pem")).unwrap();
    let mut forged_claims = claims(None, &["service"]);
    forged_claims.iss = Some(ISSUER.into());
    forged_claims.aud = Some(AUDIENCE.into());
    let before = table_counts(&app.pool).await;
    // With and without the PEM's trailing newline: either could be "the key".
    for secret in [&public_pem[..], public_pem.trim_ascii_end()] {
        let forged = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &forged_claims,
            &jsonwebtoken::EncodingKey::from_secret(secret),
        )
        .unwrap();
        assert_eq!(
            code(debit(&app, &forged, OWN, "confused").await),
            Code::Unauthenticated
        );
    }
    assert_eq!(table_counts(&app.pool).await, before);
    app.stop().await;
}

#[tokio::test]
async fn token_not_yet_valid_is_unauthenticated() {
    let app = spawn_app().await;
    app.account_with_balance(OWN, "10.00").await;
    let mut early = claims(None, &["service"]);
    early.nbf = Some(now() + 3600);
    let error = get_balance(&app, &hs256(&early), OWN).await.unwrap_err();
    assert_eq!(error.code(), Code::Unauthenticated);
    assert!(error.message().contains("not yet valid"), "{error:?}");
    // Within the leeway of a clock a little behind: accepted.
    early.nbf = Some(now() + 5);
    assert_eq!(code(get_balance(&app, &hs256(&early), OWN).await), Code::Ok);
    app.stop().await;
}

#[tokio::test]
async fn wrong_issuer_or_audience_is_unauthenticated_when_configured() {
    let app = spawn_app_with_keys(rs256_keys()).await;
    app.account_with_balance(OWN, "10.00").await;
    let private = jsonwebtoken::EncodingKey::from_rsa_pem(
        &std::fs::read(fixture("rs256-private.pem")).unwrap(),
    )
    .unwrap();
    let sign = |iss: Option<&str>, aud: Option<&str>| {
        let mut c = claims(None, &["service"]);
        c.iss = iss.map(str::to_owned);
        c.aud = aud.map(str::to_owned);
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
            &c,
            &private,
        )
        .unwrap()
    };
    for (iss, aud) in [
        (Some("https://evil.example"), Some(AUDIENCE)),
        (Some(ISSUER), Some("another-service")),
        (None, Some(AUDIENCE)),
        (Some(ISSUER), None),
    ] {
        let error = get_balance(&app, &sign(iss, aud), OWN).await.unwrap_err();
        assert_eq!(error.code(), Code::Unauthenticated, "{iss:?} {aud:?}");
    }
    assert_eq!(
        code(get_balance(&app, &sign(Some(ISSUER), Some(AUDIENCE)), OWN).await),
        Code::Ok
    );
    app.stop().await;
}

#[tokio::test]
async fn token_with_an_account_but_no_roles_is_permission_denied() {
    let app = spawn_app().await;
    app.account_with_balance(OWN, "10.00").await;
    let no_roles = hs256(&claims(Some(OWN), &[]));
    let error = get_balance(&app, &no_roles, OWN).await.unwrap_err();
    assert_eq!(error.code(), Code::PermissionDenied);
    assert!(error.message().contains("none"), "{error:?}");
    // Unknown role strings next to nothing real grant nothing either.
    let made_up = hs256(&claims(Some(OWN), &["root", "ADMIN", "service "]));
    assert_eq!(
        code(debit(&app, &made_up, OWN, "made-up").await),
        Code::PermissionDenied
    );
    assert_eq!(count_ledger(&app).await, 1);
    app.stop().await;
}

#[tokio::test]
async fn tampered_payload_with_the_original_signature_is_unauthenticated() {
    let app = spawn_app().await;
    app.account_with_balance(OWN, "10.00").await;
    app.account_with_balance(OTHER, "10.00").await;
    let genuine = hs256(&claims(Some(OWN), &["viewer"]));
    assert_eq!(code(get_balance(&app, &genuine, OWN).await), Code::Ok);
    let parts: Vec<&str> = genuine.split('.').collect();
    for doctored in [
        claims(Some(OTHER), &["viewer"]),
        claims(Some(OWN), &["admin"]),
        claims(None, &["service"]),
    ] {
        let payload = base64url(&serde_json::to_vec(&doctored).unwrap());
        let tampered = format!("{}.{payload}.{}", parts[0], parts[2]);
        assert_eq!(
            code(get_balance(&app, &tampered, OTHER).await),
            Code::Unauthenticated
        );
        assert_eq!(
            code(debit(&app, &tampered, OWN, "tampered").await),
            Code::Unauthenticated
        );
    }
    assert_eq!(count_ledger(&app).await, 2, "the two opening credits");
    app.stop().await;
}

/// What the other account owns, to look for in every answer.
struct Victim {
    card_id: String,
    top_up_id: String,
    secrets: Vec<String>,
}

async fn two_accounts_with_cards_and_top_ups() -> (TestApp, String, String, Victim) {
    let app = spawn_app().await;
    app.account_with_balance(OWN, "10.00").await;
    app.account_with_balance(OTHER, "10.00").await;
    let own_admin = app.token("admin", Some(OWN));
    let other_admin = app.token("admin", Some(OTHER));
    let own_card = add_active_card(&app, &own_admin, OWN, VISA).await;
    let other_number = unique_visa(777);
    let card_id = add_active_card(&app, &other_admin, OTHER, &other_number).await;
    let top_up = PaymentMethodsClient::new(app.channel.clone())
        .add_funds(authed(
            &other_admin,
            proto::AddFundsRequest {
                account_id: OTHER.into(),
                amount: "40.00".into(),
                payment_method_id: card_id.clone(),
                idempotency_key: "victim-funds".into(),
            },
        ))
        .await
        .expect("the other account adds funds")
        .into_inner()
        .top_up
        .unwrap();
    let victim = Victim {
        secrets: vec![
            OTHER.into(),
            card_id.clone(),
            top_up.top_up_id.clone(),
            other_number[other_number.len() - 4..].to_owned(),
            format!("{OTHER}@example.com"),
            "50.00".into(),
        ],
        card_id,
        top_up_id: top_up.top_up_id,
    };
    (app, own_admin, own_card, victim)
}

/// NOT_FOUND, and the message names none of the victim's data.
fn not_found_without_leak(
    what: &str,
    result: Result<(), Status>,
    victim: &Victim,
) -> Option<String> {
    match result {
        Err(status) if status.code() == Code::NotFound => victim
            .secrets
            .iter()
            .find(|secret| status.message().contains(secret.as_str()))
            .map(|secret| format!("{what}: message leaks {secret:?}: {status:?}")),
        other => Some(format!("{what}: want NOT_FOUND, got {other:?}")),
    }
}

#[tokio::test]
async fn every_rpc_with_another_accounts_id_is_not_found_leaks_nothing_and_writes_nothing() {
    let (app, admin, _own_card, victim) = two_accounts_with_cards_and_top_ups().await;
    // A viewer for reads would do; admin reaches every Manage RPC too.
    let before = table_counts(&app.pool).await;
    let balances = app.balances();
    let policy = BalancePolicyClient::new(app.channel.clone());
    let methods = PaymentMethodsClient::new(app.channel.clone());
    let notifications = NotificationsClient::new(app.channel.clone());
    let other = || OTHER.to_owned();
    let pm = || victim.card_id.clone();
    let mut failures = Vec::new();
    let mut check = |what: &str, result: Result<(), Status>| {
        failures.extend(not_found_without_leak(what, result, &victim));
    };

    let mut b = balances.clone();
    check(
        "GetBalance",
        b.get_balance(authed(
            &admin,
            proto::GetBalanceRequest {
                account_id: other(),
            },
        ))
        .await
        .map(drop),
    );
    check(
        "ListTransactions",
        b.list_transactions(authed(
            &admin,
            proto::ListTransactionsRequest {
                account_id: other(),
                ..Default::default()
            },
        ))
        .await
        .map(drop),
    );
    check(
        "WatchBalanceEvents",
        b.watch_balance_events(authed(
            &admin,
            proto::WatchBalanceEventsRequest {
                account_id: other(),
                after_cursor: 0,
            },
        ))
        .await
        .map(drop),
    );
    check(
        "VerifyLedger",
        b.verify_ledger(authed(
            &admin,
            proto::VerifyLedgerRequest {
                account_id: other(),
            },
        ))
        .await
        .map(drop),
    );
    // Debit, Credit and CreateAccount are the service role's: a service token
    // reaches every account by design, a user token is refused by role.
    let mut p = policy.clone();
    check(
        "GetLowBalanceSettings",
        p.get_low_balance_settings(authed(
            &admin,
            proto::GetLowBalanceSettingsRequest {
                account_id: other(),
            },
        ))
        .await
        .map(drop),
    );
    check(
        "ApplyLowBalanceSettings",
        p.apply_low_balance_settings(authed(
            &admin,
            proto::ApplyLowBalanceSettingsRequest {
                account_id: other(),
                notification_enabled: true,
                notification_threshold: "5.00".into(),
                ..Default::default()
            },
        ))
        .await
        .map(drop),
    );
    check(
        "ListTopUps",
        p.list_top_ups(authed(
            &admin,
            proto::ListTopUpsRequest {
                account_id: other(),
                ..Default::default()
            },
        ))
        .await
        .map(drop),
    );
    check(
        "GetTopUp",
        p.get_top_up(authed(
            &admin,
            proto::GetTopUpRequest {
                account_id: other(),
                top_up_id: victim.top_up_id.clone(),
            },
        ))
        .await
        .map(drop),
    );
    let mut m = methods.clone();
    check(
        "AddCard",
        m.add_card(authed(
            &admin,
            add_card_request(OTHER, card(&unique_visa(31)), "intruder-card"),
        ))
        .await
        .map(drop),
    );
    check(
        "ConfirmCard",
        m.confirm_card(authed(
            &admin,
            proto::ConfirmCardRequest {
                account_id: other(),
                payment_method_id: pm(),
                authentication_result: proto::AuthenticationResult::Passed as i32,
            },
        ))
        .await
        .map(drop),
    );
    check(
        "ListPaymentMethods",
        m.list_payment_methods(authed(
            &admin,
            proto::ListPaymentMethodsRequest {
                account_id: other(),
                ..Default::default()
            },
        ))
        .await
        .map(drop),
    );
    check(
        "GetPaymentMethod",
        m.get_payment_method(authed(
            &admin,
            proto::GetPaymentMethodRequest {
                account_id: other(),
                payment_method_id: pm(),
            },
        ))
        .await
        .map(drop),
    );
    check(
        "SetAutoCharge",
        m.set_auto_charge(authed(
            &admin,
            proto::SetAutoChargeRequest {
                account_id: other(),
                payment_method_id: pm(),
                enabled: false,
            },
        ))
        .await
        .map(drop),
    );
    check(
        "ReorderPaymentMethods",
        m.reorder_payment_methods(authed(
            &admin,
            proto::ReorderPaymentMethodsRequest {
                account_id: other(),
                payment_method_ids: vec![pm()],
            },
        ))
        .await
        .map(drop),
    );
    check(
        "RemovePaymentMethod",
        m.remove_payment_method(authed(
            &admin,
            proto::RemovePaymentMethodRequest {
                account_id: other(),
                payment_method_id: pm(),
            },
        ))
        .await
        .map(drop),
    );
    check(
        "AddFunds",
        m.add_funds(authed(
            &admin,
            proto::AddFundsRequest {
                account_id: other(),
                amount: "30.00".into(),
                payment_method_id: pm(),
                idempotency_key: "intruder-funds".into(),
            },
        ))
        .await
        .map(drop),
    );
    check(
        "RetryPaymentMethod",
        m.retry_payment_method(authed(
            &admin,
            proto::RetryPaymentMethodRequest {
                account_id: other(),
                payment_method_id: pm(),
                idempotency_key: "intruder-retry".into(),
                amount: "30.00".into(),
            },
        ))
        .await
        .map(drop),
    );
    let mut n = notifications.clone();
    check(
        "GetNotificationSettings",
        n.get_notification_settings(authed(
            &admin,
            proto::GetNotificationSettingsRequest {
                account_id: other(),
            },
        ))
        .await
        .map(drop),
    );
    check(
        "UpdateNotificationSettings",
        n.update_notification_settings(authed(
            &admin,
            proto::UpdateNotificationSettingsRequest {
                account_id: other(),
                recipients: vec!["intruder@evil.example".into()],
                enabled_kinds: vec![],
            },
        ))
        .await
        .map(drop),
    );
    check(
        "ListNotifications",
        n.list_notifications(authed(
            &admin,
            proto::ListNotificationsRequest {
                account_id: other(),
                ..Default::default()
            },
        ))
        .await
        .map(drop),
    );
    check(
        "SendTestNotification",
        n.send_test_notification(authed(
            &admin,
            proto::SendTestNotificationRequest {
                account_id: other(),
                idempotency_key: "intruder-test".into(),
            },
        ))
        .await
        .map(drop),
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(table_counts(&app.pool).await, before, "nothing was written");
    app.stop().await;
}

#[tokio::test]
async fn another_accounts_payment_method_or_top_up_under_ones_own_account_is_not_found() {
    let (app, admin, own_card, victim) = two_accounts_with_cards_and_top_ups().await;
    let before = table_counts(&app.pool).await;
    let mut m = PaymentMethodsClient::new(app.channel.clone());
    let mut p = BalancePolicyClient::new(app.channel.clone());
    let own = || OWN.to_owned();
    let pm = || victim.card_id.clone();
    let mut failures = Vec::new();
    let mut check = |what: &str, result: Result<(), Status>| {
        failures.extend(not_found_without_leak(what, result, &victim));
    };
    check(
        "ConfirmCard",
        m.confirm_card(authed(
            &admin,
            proto::ConfirmCardRequest {
                account_id: own(),
                payment_method_id: pm(),
                authentication_result: proto::AuthenticationResult::Passed as i32,
            },
        ))
        .await
        .map(drop),
    );
    check(
        "GetPaymentMethod",
        m.get_payment_method(authed(
            &admin,
            proto::GetPaymentMethodRequest {
                account_id: own(),
                payment_method_id: pm(),
            },
        ))
        .await
        .map(drop),
    );
    check(
        "SetAutoCharge",
        m.set_auto_charge(authed(
            &admin,
            proto::SetAutoChargeRequest {
                account_id: own(),
                payment_method_id: pm(),
                enabled: false,
            },
        ))
        .await
        .map(drop),
    );
    check(
        "RemovePaymentMethod",
        m.remove_payment_method(authed(
            &admin,
            proto::RemovePaymentMethodRequest {
                account_id: own(),
                payment_method_id: pm(),
            },
        ))
        .await
        .map(drop),
    );
    check(
        "AddFunds",
        m.add_funds(authed(
            &admin,
            proto::AddFundsRequest {
                account_id: own(),
                amount: "30.00".into(),
                payment_method_id: pm(),
                idempotency_key: "borrowed-card".into(),
            },
        ))
        .await
        .map(drop),
    );
    check(
        "RetryPaymentMethod",
        m.retry_payment_method(authed(
            &admin,
            proto::RetryPaymentMethodRequest {
                account_id: own(),
                payment_method_id: pm(),
                idempotency_key: "borrowed-retry".into(),
                amount: "30.00".into(),
            },
        ))
        .await
        .map(drop),
    );
    // Another account's top-up under one's own account: NOT_FOUND.
    let foreign_top_up = p
        .get_top_up(authed(
            &admin,
            proto::GetTopUpRequest {
                account_id: own(),
                top_up_id: victim.top_up_id.clone(),
            },
        ))
        .await
        .map(drop);
    check("GetTopUp", foreign_top_up);
    // A foreign id inside one's own ordering is not a permutation of one's own
    // methods: refused as the caller's mistake, without confirming the id exists.
    let reordered = m
        .reorder_payment_methods(authed(
            &admin,
            proto::ReorderPaymentMethodsRequest {
                account_id: own(),
                payment_method_ids: vec![own_card.clone(), pm()],
            },
        ))
        .await;
    match reordered {
        Err(status) if matches!(status.code(), Code::InvalidArgument | Code::NotFound) => {
            if let Some(secret) = victim
                .secrets
                .iter()
                .find(|s| status.message().contains(s.as_str()))
            {
                failures.push(format!(
                    "ReorderPaymentMethods leaks {secret:?}: {status:?}"
                ));
            }
        }
        other => failures.push(format!("ReorderPaymentMethods: {other:?}")),
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(table_counts(&app.pool).await, before, "nothing was written");
    app.stop().await;
}
