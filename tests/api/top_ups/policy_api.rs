//! BalancePolicy: "Apply Changes" validation, applying below the threshold,
//! GetTopUp, and the permission matrix.

use billing::proto::{self, TopUpStatus};
use tonic::Code;

use super::*;
use crate::helpers::count_rows;

#[tokio::test]
async fn settings_default_to_off_and_apply_round_trips() {
    let (s, _) = scenario("50.00", &[VISA]).await;
    let before = policy(&s.app)
        .get_low_balance_settings(authed(
            &s.admin,
            proto::GetLowBalanceSettingsRequest {
                account_id: ACCT.into(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .settings
        .unwrap();
    assert!(!before.auto_refill_enabled && !before.notification_enabled);
    assert_eq!(before.max_top_ups_per_day, 10);
    let applied = apply(
        &s,
        proto::ApplyLowBalanceSettingsRequest {
            notification_enabled: true,
            notification_threshold: "20.00".into(),
            ..settings("10.00", "50.00")
        },
    )
    .await;
    assert!(applied.started_top_up_id.is_empty());
    let after = policy(&s.app)
        .get_low_balance_settings(authed(
            &s.app.token("viewer", Some(ACCT)),
            proto::GetLowBalanceSettingsRequest {
                account_id: ACCT.into(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .settings
        .unwrap();
    assert_eq!(
        (after.threshold.as_str(), after.refill_amount.as_str()),
        ("10.00", "50.00")
    );
    assert_eq!(after.notification_threshold, "20.00");
    assert!(after.auto_refill_enabled && after.notification_enabled);
    assert_eq!(after.currency, "USD");
    s.app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applying_while_already_below_the_threshold_starts_a_top_up_at_once() {
    let (s, _) = scenario("5.00", &[VISA]).await;
    let applied = apply(&s, settings("10.00", "50.00")).await;
    assert!(!applied.started_top_up_id.is_empty());
    let top_up = wait_for_top_up(&s, TopUpStatus::Succeeded).await;
    assert_eq!(top_up.top_up_id, applied.started_top_up_id);
    let fetched = policy(&s.app)
        .get_top_up(authed(
            &s.admin,
            proto::GetTopUpRequest {
                account_id: ACCT.into(),
                top_up_id: top_up.top_up_id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .top_up
        .unwrap();
    assert_eq!(fetched.attempts.len(), 1);
    assert!(fetched.attempts[0].attempted_at.is_some());
    assert_eq!(balance(&s.app).await, "55.00");
    // Applying again while a top-up is done and the balance is fine starts nothing.
    assert!(
        apply(&s, settings("10.00", "50.00"))
            .await
            .started_top_up_id
            .is_empty()
    );
    s.app.stop().await;
}

#[tokio::test]
async fn enabling_auto_refill_needs_an_active_auto_charge_card() {
    let (s, _) = scenario("50.00", &[]).await;
    let error = policy(&s.app)
        .apply_low_balance_settings(authed(&s.admin, settings("10.00", "50.00")))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::FailedPrecondition);
    assert_eq!(count_rows(&s.app.pool, "low_balance_settings").await, 0);
    // Notifications alone need no card.
    apply(
        &s,
        proto::ApplyLowBalanceSettingsRequest {
            account_id: ACCT.into(),
            notification_enabled: true,
            notification_threshold: "5.00".into(),
            ..Default::default()
        },
    )
    .await;
    s.app.stop().await;
}

#[tokio::test]
async fn bad_settings_name_the_field_and_change_nothing() {
    let (s, _) = scenario("50.00", &[VISA]).await;
    let cases = [
        ("refill_amount", settings("10.00", "29.99")),
        ("refill_amount", settings("10.00", "10000.01")),
        ("refill_amount", settings("10.00", "50.001")),
        ("threshold", settings("-1", "50.00")),
        ("threshold", settings("1e2", "50.00")),
        (
            "notification_threshold",
            proto::ApplyLowBalanceSettingsRequest {
                notification_threshold: "abc".into(),
                ..settings("10.00", "50.00")
            },
        ),
        (
            "max_top_ups_per_day",
            proto::ApplyLowBalanceSettingsRequest {
                max_top_ups_per_day: -3,
                ..settings("10.00", "50.00")
            },
        ),
        (
            "max_amount_per_day",
            proto::ApplyLowBalanceSettingsRequest {
                max_amount_per_day: "-5".into(),
                ..settings("10.00", "50.00")
            },
        ),
        // Below one refill: every automatic top-up would be CAP_REACHED.
        (
            "max_amount_per_day",
            proto::ApplyLowBalanceSettingsRequest {
                max_amount_per_day: "49.99".into(),
                ..settings("10.00", "50.00")
            },
        ),
    ];
    for (field, request) in cases {
        let error = policy(&s.app)
            .apply_low_balance_settings(authed(&s.admin, request))
            .await
            .unwrap_err();
        assert_eq!(error.code(), Code::InvalidArgument, "{field}");
        assert!(
            error.message().starts_with(field),
            "{field}: {}",
            error.message()
        );
    }
    let missing = policy(&s.app)
        .get_top_up(authed(
            &s.admin,
            proto::GetTopUpRequest {
                account_id: ACCT.into(),
                top_up_id: "tu_nope".into(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    assert_eq!(count_rows(&s.app.pool, "low_balance_settings").await, 0);
    assert_eq!(count_rows(&s.app.pool, "top_ups").await, 0);
    s.app.stop().await;
}

#[tokio::test]
async fn balance_policy_rpcs_for_every_role_on_own_and_other_accounts() {
    let (s, _) = scenario("50.00", &[VISA]).await;
    s.app.account_with_balance("other", "0").await;
    let mut failures = Vec::new();
    for role in ["admin", "commercial", "billing", "viewer", "service"] {
        let token = s.app.token(role, (role != "service").then_some(ACCT));
        for account in [ACCT, "other"] {
            for rpc in ["get", "apply", "list", "get_top_up"] {
                let mut client = policy(&s.app);
                let result = match rpc {
                    "get" => client
                        .get_low_balance_settings(authed(
                            &token,
                            proto::GetLowBalanceSettingsRequest {
                                account_id: account.into(),
                            },
                        ))
                        .await
                        .map(|_| ()),
                    "apply" => client
                        .apply_low_balance_settings(authed(
                            &token,
                            proto::ApplyLowBalanceSettingsRequest {
                                account_id: account.into(),
                                ..Default::default()
                            },
                        ))
                        .await
                        .map(|_| ()),
                    "list" => client
                        .list_top_ups(authed(
                            &token,
                            proto::ListTopUpsRequest {
                                account_id: account.into(),
                                ..Default::default()
                            },
                        ))
                        .await
                        .map(|_| ()),
                    _ => client
                        .get_top_up(authed(
                            &token,
                            proto::GetTopUpRequest {
                                account_id: account.into(),
                                top_up_id: "tu_x".into(),
                            },
                        ))
                        .await
                        .map(|_| ()),
                };
                let got = result.err().map(|e| e.code()).unwrap_or(Code::Ok);
                let want = match (role, rpc, account) {
                    ("service", "apply", _) | ("viewer", "apply", _) => Code::PermissionDenied,
                    (_, "get_top_up", _) => Code::NotFound, // no such top-up anywhere; another account is NOT_FOUND too
                    ("service", _, _) => Code::Ok,
                    (_, _, ACCT) => Code::Ok,
                    _ => Code::NotFound,
                };
                if got != want {
                    failures.push(format!(
                        "{role} {rpc} {account}: got {got:?}, want {want:?}"
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    s.app.stop().await;
}
