//! Adding cards: auto-charge of the first, 3-D Secure, duplicates, idempotency, tokens.

use billing::proto::{self, PaymentMethodStatus};
use tonic::Code;

use super::*;
use crate::helpers::{authed, count_rows};

#[tokio::test]
async fn first_card_is_active_with_auto_charge_and_primary() {
    let (app, token) = app_with_accounts().await;
    let added = add_card(&app, &token, ACCT, VISA).await;
    assert!(added.next_action.is_none());
    let method = added.payment_method.unwrap();
    assert_eq!(status(&method), PaymentMethodStatus::Active);
    assert_eq!(
        (method.brand.as_str(), method.last4.as_str()),
        ("visa", "4242")
    );
    assert_eq!((method.exp_month, method.exp_year), (12, next_year()));
    assert_eq!(method.holder_name, "Ada Lovelace");
    assert_eq!(method.billing_address.unwrap().country, "GB");
    assert!(method.auto_charge && method.primary);
    assert_eq!(method.priority, 1);
    let audits: i64 = count_where(
        &app,
        "SELECT COUNT(*) FROM audit_log WHERE action = 'add_card'",
    )
    .await;
    assert_eq!(audits, 1);
    app.stop().await;
}

#[tokio::test]
async fn second_card_starts_with_auto_charge_off() {
    let (app, token) = app_with_accounts().await;
    add_card(&app, &token, ACCT, VISA).await;
    let second = add_card(&app, &token, ACCT, MASTERCARD)
        .await
        .payment_method
        .unwrap();
    assert_eq!(second.brand, "mastercard");
    assert!(!second.auto_charge && !second.primary);
    assert_eq!(second.priority, 2);
    app.stop().await;
}

#[tokio::test]
async fn three_d_secure_card_is_pending_until_the_challenge_passes() {
    let (app, token) = app_with_accounts().await;
    let added = add_card(&app, &token, ACCT, SETUP_3DS).await;
    let method = added.payment_method.unwrap();
    let action = added.next_action.expect("a 3-D Secure challenge");
    assert_eq!(action.r#type, "three_d_secure");
    assert!(!action.challenge_id.is_empty() && !action.redirect_url.is_empty());
    assert_eq!(status(&method), PaymentMethodStatus::PendingAuthentication);
    assert!(method.auto_charge, "first card");
    assert!(!method.primary, "a pending card is never the primary");

    let confirmed = confirm(&app, &token, ACCT, &method.payment_method_id, true)
        .await
        .unwrap();
    assert_eq!(status(&confirmed), PaymentMethodStatus::Active);
    assert!(confirmed.primary);
    // Confirming again with the same result changes nothing.
    let again = confirm(&app, &token, ACCT, &method.payment_method_id, true)
        .await
        .unwrap();
    assert_eq!(status(&again), PaymentMethodStatus::Active);
    let wrong = confirm(&app, &token, ACCT, &method.payment_method_id, false)
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), Code::FailedPrecondition);
    app.stop().await;
}

#[tokio::test]
async fn failed_three_d_secure_marks_the_card_failed_and_it_cannot_be_charged() {
    let (app, token) = app_with_accounts().await;
    let method = add_card(&app, &token, ACCT, SETUP_3DS)
        .await
        .payment_method
        .unwrap();
    let failed = confirm(&app, &token, ACCT, &method.payment_method_id, false)
        .await
        .unwrap();
    assert_eq!(status(&failed), PaymentMethodStatus::Failed);
    assert_eq!(failed.disabled_reason, "authentication_failed");
    assert!(!failed.auto_charge && !failed.primary);
    let charge = add_funds(
        &app,
        &token,
        funds("10.00", &method.payment_method_id, "f1"),
    )
    .await
    .unwrap_err();
    assert_eq!(charge.code(), Code::FailedPrecondition);
    // The failed card does not block adding it again.
    let again = client(&app)
        .add_card(authed(
            &token,
            add_card_request(ACCT, card(SETUP_3DS), "again"),
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(again.next_action.is_some());
    app.stop().await;
}

#[tokio::test]
async fn card_pending_authentication_is_never_charged() {
    let (app, token) = app_with_accounts().await;
    let method = add_card(&app, &token, ACCT, SETUP_3DS)
        .await
        .payment_method
        .unwrap();
    let error = add_funds(
        &app,
        &token,
        funds("10.00", &method.payment_method_id, "f1"),
    )
    .await
    .unwrap_err();
    assert_eq!(error.code(), Code::FailedPrecondition);
    assert!(
        error.message().contains("3-D Secure"),
        "{}",
        error.message()
    );
    // Nor through the default (it is not the primary).
    let error = add_funds(&app, &token, funds("10.00", "", "f2"))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::FailedPrecondition);
    assert_eq!(count_rows(&app.pool, "sandbox_charges").await, 0);
    assert_eq!(count_rows(&app.pool, "top_ups").await, 0);
    app.stop().await;
}

#[tokio::test]
async fn duplicate_card_is_already_exists_until_it_is_removed() {
    let (app, token) = app_with_accounts().await;
    let first = add_card(&app, &token, ACCT, VISA)
        .await
        .payment_method
        .unwrap();
    let duplicate = client(&app)
        .add_card(authed(
            &token,
            add_card_request(ACCT, card("4242 4242 4242 4242"), "dup"),
        ))
        .await
        .unwrap_err();
    assert_eq!(duplicate.code(), Code::AlreadyExists);
    assert_eq!(count_rows(&app.pool, "payment_methods").await, 1);
    // The same card on another account is not a duplicate.
    let other = app.token("admin", Some(OTHER));
    add_card(&app, &other, OTHER, VISA).await;

    client(&app)
        .remove_payment_method(authed(
            &token,
            proto::RemovePaymentMethodRequest {
                account_id: ACCT.into(),
                payment_method_id: first.payment_method_id.clone(),
            },
        ))
        .await
        .unwrap();
    let re_added = client(&app)
        .add_card(authed(&token, add_card_request(ACCT, card(VISA), "re-add")))
        .await
        .unwrap()
        .into_inner()
        .payment_method
        .unwrap();
    assert_ne!(re_added.payment_method_id, first.payment_method_id);
    assert!(
        re_added.auto_charge,
        "it is again the account's first live card"
    );
    app.stop().await;
}

#[tokio::test]
async fn add_card_is_idempotent_by_key_and_refuses_a_different_request() {
    let (app, token) = app_with_accounts().await;
    let request = add_card_request(ACCT, card(SETUP_3DS), "card-key");
    let first = client(&app)
        .add_card(authed(&token, request.clone()))
        .await
        .unwrap()
        .into_inner();
    let replay = client(&app)
        .add_card(authed(&token, request))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.payment_method, replay.payment_method);
    assert_eq!(first.next_action, replay.next_action);
    assert_eq!(count_rows(&app.pool, "payment_methods").await, 1);
    assert_eq!(count_rows(&app.pool, "sandbox_cards").await, 1);

    let different = client(&app)
        .add_card(authed(
            &token,
            add_card_request(ACCT, card(VISA), "card-key"),
        ))
        .await
        .unwrap_err();
    assert_eq!(different.code(), Code::AlreadyExists);
    assert!(
        different.message().contains("idempotency_key"),
        "{}",
        different.message()
    );
    assert_eq!(count_rows(&app.pool, "payment_methods").await, 1);
    app.stop().await;
}

#[tokio::test]
async fn gateway_tokens_from_client_side_tokenization_are_accepted() {
    let (app, token) = app_with_accounts().await;
    let request = proto::AddCardRequest {
        account_id: ACCT.into(),
        source: Some(proto::add_card_request::Source::GatewayToken(
            "tok_amex".into(),
        )),
        billing_address: None,
        idempotency_key: "tok-1".into(),
    };
    let method = client(&app)
        .add_card(authed(&token, request.clone()))
        .await
        .unwrap()
        .into_inner();
    let method = method.payment_method.unwrap();
    assert_eq!(
        (method.brand.as_str(), method.last4.as_str()),
        ("amex", "0005")
    );
    assert_eq!(status(&method), PaymentMethodStatus::Active);

    let unknown = proto::AddCardRequest {
        source: Some(proto::add_card_request::Source::GatewayToken(
            "tok_nonsense".into(),
        )),
        idempotency_key: "tok-2".into(),
        ..request
    };
    let error = client(&app)
        .add_card(authed(&token, unknown))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument);
    assert!(
        error.message().starts_with("gateway_token"),
        "{}",
        error.message()
    );
    app.stop().await;
}

#[tokio::test]
async fn get_returns_a_method_and_removed_ones_for_history() {
    let (app, token) = app_with_accounts().await;
    let id = add_active_card(&app, &token, ACCT, VISA).await;
    let get = |id: String| {
        let app = &app;
        let token = token.clone();
        async move {
            client(app)
                .get_payment_method(authed(
                    &token,
                    proto::GetPaymentMethodRequest {
                        account_id: ACCT.into(),
                        payment_method_id: id,
                    },
                ))
                .await
                .map(|r| r.into_inner().payment_method.unwrap())
        }
    };
    let method = get(id.clone()).await.unwrap();
    assert!(method.primary);
    let removed = client(&app)
        .remove_payment_method(authed(
            &token,
            proto::RemovePaymentMethodRequest {
                account_id: ACCT.into(),
                payment_method_id: id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .payment_method
        .unwrap();
    assert_eq!(status(&removed), PaymentMethodStatus::Removed);
    assert_eq!(
        status(&get(id.clone()).await.unwrap()),
        PaymentMethodStatus::Removed
    );
    assert!(list(&app, &token, ACCT).await.is_empty());
    let detached: i64 = count_where(
        &app,
        "SELECT COUNT(*) FROM sandbox_cards WHERE detached_at IS NOT NULL",
    )
    .await;
    assert_eq!(detached, 1, "removed cards are detached at the gateway");
    app.stop().await;
}

/// The sandbox card whose set-up and detach stall (a slow processor).
const STALLS: &str = "4000000000003014";
const STALL: std::time::Duration = std::time::Duration::from_secs(5);
/// Far less than the stall: what a debit or an alert may take meanwhile.
const PROMPT: std::time::Duration = std::time::Duration::from_millis(2500);

/// A server with the engines running and a sandbox gateway stalling `STALL`;
/// `ACCT` holds 100.00, `OTHER` 25.00 with a low-balance alert at 20.00.
async fn app_with_a_stalling_gateway() -> (crate::helpers::TestApp, String) {
    let (pool, _) = crate::helpers::fresh_database().await;
    let gateway = billing::gateway::SandboxGateway::new(pool.clone()).with_stall(STALL);
    let app = crate::helpers::spawn_app_on(
        pool,
        billing::server::ServerSettings {
            engines: true,
            engine_poll: std::time::Duration::from_millis(50),
            gateway: Some(std::sync::Arc::new(gateway)),
            ..Default::default()
        },
    )
    .await;
    app.account_with_balance(ACCT, "100.00").await;
    app.account_with_balance(OTHER, "25.00").await;
    proto::balance_policy_client::BalancePolicyClient::new(app.channel.clone())
        .apply_low_balance_settings(authed(
            &app.token("admin", Some(OTHER)),
            proto::ApplyLowBalanceSettingsRequest {
                account_id: OTHER.into(),
                auto_refill_enabled: false,
                threshold: "10.00".into(),
                refill_amount: "30.00".into(),
                notification_enabled: true,
                notification_threshold: "20.00".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    let token = app.token("admin", Some(ACCT));
    (app, token)
}

async fn low_balance_alerts(app: &crate::helpers::TestApp) -> usize {
    proto::notifications_client::NotificationsClient::new(app.channel.clone())
        .list_notifications(authed(
            &app.token("admin", Some(OTHER)),
            proto::ListNotificationsRequest {
                account_id: OTHER.into(),
                page_size: 100,
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .notifications
        .iter()
        .filter(|n| n.kind == proto::NotificationKind::LowBalance as i32)
        .count()
}

/// While a gateway call is stalled: a debit on the card's account, and a
/// low-balance alert on another account (25.00 → 15.00, below 20.00).
/// Returns how long each took.
async fn debit_and_alert_meanwhile(
    app: &crate::helpers::TestApp,
    round: &str,
) -> (std::time::Duration, std::time::Duration) {
    let service = app.service_token();
    let debit = |account: &str, amount: &str| proto::DebitRequest {
        account_id: account.into(),
        amount: amount.into(),
        idempotency_key: format!("{round}-{account}"),
        description: "usage".into(),
        ..Default::default()
    };
    let started = std::time::Instant::now();
    app.balances()
        .debit(authed(&service, debit(ACCT, "1.00")))
        .await
        .expect("a debit on the account whose card is at the gateway");
    let debit_took = started.elapsed();

    let alerts_before = low_balance_alerts(app).await;
    let started = std::time::Instant::now();
    app.balances()
        .debit(authed(&service, debit(OTHER, "10.00")))
        .await
        .expect("a debit on the other account");
    crate::helpers::eventually("the other account's low-balance alert", || async {
        low_balance_alerts(app).await > alerts_before
    })
    .await;
    let alert_took = started.elapsed();
    // Back above the alert threshold for the next round.
    app.balances()
        .credit(authed(
            &service,
            proto::CreditRequest {
                account_id: OTHER.into(),
                amount: "10.00".into(),
                kind: proto::TransactionKind::Adjustment as i32,
                idempotency_key: format!("{round}-refill"),
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    (debit_took, alert_took)
}

/// Issue 13: AddCard and RemovePaymentMethod kept a transaction and the
/// account's row lock open across the gateway call; a slow processor then
/// delayed the account's debits and every account's alerts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_gateway_call_delays_neither_a_debit_on_the_account_nor_an_alert_on_another() {
    let (app, token) = app_with_a_stalling_gateway().await;

    let mut adder = client(&app);
    let request = authed(&token, add_card_request(ACCT, card(STALLS), "slow-add"));
    let adding = tokio::spawn(async move { adder.add_card(request).await });
    crate::helpers::eventually(
        "AddCard reserved its key and called the gateway",
        || async {
            count_where(
                &app,
                "SELECT COUNT(*) FROM idempotency_keys WHERE idempotency_key = 'slow-add'",
            )
            .await
                == 1
        },
    )
    .await;
    let (debit_took, alert_took) = debit_and_alert_meanwhile(&app, "during-add").await;
    assert!(
        !adding.is_finished(),
        "the set-up was still stalled while the debit and the alert went through"
    );
    assert!(
        debit_took < PROMPT,
        "a debit waited {debit_took:?} for a card set-up"
    );
    assert!(
        alert_took < PROMPT,
        "another account's alert waited {alert_took:?} for a card set-up"
    );
    let added = tokio::time::timeout(2 * STALL, adding)
        .await
        .expect("AddCard answers once the stall ends")
        .unwrap()
        .expect("the stalled card is added")
        .into_inner()
        .payment_method
        .unwrap();
    assert_eq!(status(&added), PaymentMethodStatus::Active);
    assert!(added.primary);

    let mut remover = client(&app);
    let request = authed(
        &token,
        proto::RemovePaymentMethodRequest {
            account_id: ACCT.into(),
            payment_method_id: added.payment_method_id.clone(),
        },
    );
    let removing = tokio::spawn(async move { remover.remove_payment_method(request).await });
    crate::helpers::eventually(
        "the removal committed and the detach is at the gateway",
        || async {
            count_where(
                &app,
                "SELECT COUNT(*) FROM payment_methods WHERE status = 'REMOVED'",
            )
            .await
                == 1
        },
    )
    .await;
    let (debit_took, alert_took) = debit_and_alert_meanwhile(&app, "during-remove").await;
    assert!(
        !removing.is_finished(),
        "the detach was still stalled while the debit and the alert went through"
    );
    assert!(
        debit_took < PROMPT,
        "a debit waited {debit_took:?} for a detach"
    );
    assert!(
        alert_took < PROMPT,
        "another account's alert waited {alert_took:?} for a detach"
    );
    let removed = tokio::time::timeout(2 * STALL, removing)
        .await
        .expect("RemovePaymentMethod answers once the stall ends")
        .unwrap()
        .expect("the card is removed")
        .into_inner()
        .payment_method
        .unwrap();
    assert_eq!(status(&removed), PaymentMethodStatus::Removed);
    assert_eq!(
        count_where(
            &app,
            "SELECT COUNT(*) FROM sandbox_cards WHERE detached_at IS NOT NULL"
        )
        .await,
        1,
        "detached at the gateway"
    );
    app.stop().await;
}

/// Two-phase AddCard: replays racing through the gateway call save one card
/// (the extra set-ups are detached), and every replay answers with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_card_replayed_concurrently_saves_one_card_and_detaches_the_extra_set_ups() {
    let (app, token) = app_with_accounts().await;
    let request = add_card_request(ACCT, card(VISA), "racing");
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let mut client = client(&app);
        let request = authed(&token, request.clone());
        tasks.push(tokio::spawn(async move { client.add_card(request).await }));
    }
    let mut ids = Vec::new();
    for task in tasks {
        let method = tokio::time::timeout(std::time::Duration::from_secs(10), task)
            .await
            .expect("each AddCard answers within 10 s")
            .unwrap()
            .expect("every replay succeeds")
            .into_inner()
            .payment_method
            .unwrap();
        ids.push(method.payment_method_id);
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "one card for one key: {ids:?}");
    assert_eq!(count_rows(&app.pool, "payment_methods").await, 1);
    assert_eq!(
        attached_at_the_gateway(&app, 1).await,
        1,
        "only the saved card stays attached at the gateway"
    );
    app.stop().await;
}

/// Cards still attached at the sandbox gateway once the detaches of cards
/// that were not saved (they run on their own tasks) have had up to 10 s to
/// bring the count to `expected`.
async fn attached_at_the_gateway(app: &crate::helpers::TestApp, expected: i64) -> i64 {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let attached = count_where(
            app,
            "SELECT COUNT(*) FROM sandbox_cards WHERE detached_at IS NULL",
        )
        .await;
        if attached == expected || std::time::Instant::now() > deadline {
            return attached;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// The rule: a duplicate card is `ALREADY_EXISTS` as soon as the set-up shows
/// it, and the extra set-up is detached at the gateway whatever the caller
/// does next. With a slow processor the answer waited for the detach too
/// (set-up + detach reached the caller's deadline, which then cut the detach
/// and left the card attached at the processor).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_card_is_already_exists_without_waiting_for_its_detach_and_is_detached() {
    let stall = std::time::Duration::from_secs(2);
    let (pool, _) = crate::helpers::fresh_database().await;
    let gateway = billing::gateway::SandboxGateway::new(pool.clone()).with_stall(stall);
    let app = crate::helpers::spawn_app_on(
        pool,
        billing::server::ServerSettings {
            gateway: Some(std::sync::Arc::new(gateway)),
            ..Default::default()
        },
    )
    .await;
    app.account_with_balance(ACCT, "100.00").await;
    let token = app.token("admin", Some(ACCT));
    add_card(&app, &token, ACCT, STALLS).await;

    // A deadline between one stall (the set-up) and two (set-up and detach).
    let mut again = authed(&token, add_card_request(ACCT, card(STALLS), "again"));
    again.set_timeout(stall + stall * 3 / 4);
    let error = client(&app).add_card(again).await.unwrap_err();
    assert_eq!(error.code(), tonic::Code::AlreadyExists, "{error:?}");
    assert_eq!(count_rows(&app.pool, "payment_methods").await, 1);
    assert_eq!(attached_at_the_gateway(&app, 1).await, 1);
    app.stop().await;
}

/// A set-up the gateway refused changes nothing: not even the key, which
/// the corrected request may use.
#[tokio::test]
async fn a_card_refused_by_the_gateway_leaves_its_idempotency_key_unused() {
    let (app, token) = app_with_accounts().await;
    let refused = client(&app)
        .add_card(authed(
            &token,
            proto::AddCardRequest {
                account_id: ACCT.into(),
                source: Some(proto::add_card_request::Source::GatewayToken(
                    "tok_nonsense".into(),
                )),
                billing_address: None,
                idempotency_key: "typo".into(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert_eq!(
        count_where(
            &app,
            "SELECT COUNT(*) FROM idempotency_keys WHERE idempotency_key = 'typo'"
        )
        .await,
        0
    );
    let method = client(&app)
        .add_card(authed(&token, add_card_request(ACCT, card(VISA), "typo")))
        .await
        .expect("the key is free again")
        .into_inner()
        .payment_method
        .unwrap();
    assert_eq!(status(&method), PaymentMethodStatus::Active);
    app.stop().await;
}

/// Two-phase ConfirmCard: confirmations racing through the gateway call
/// all answer with the card made `ACTIVE` once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_confirmations_of_a_card_all_answer_with_it_active() {
    let (app, token) = app_with_accounts().await;
    let added = add_card(&app, &token, ACCT, SETUP_3DS).await;
    let id = added.payment_method.unwrap().payment_method_id;
    let mut tasks = Vec::new();
    for _ in 0..3 {
        let (app_channel, token, id) = (app.channel.clone(), token.clone(), id.clone());
        tasks.push(tokio::spawn(async move {
            proto::payment_methods_client::PaymentMethodsClient::new(app_channel)
                .confirm_card(authed(
                    &token,
                    proto::ConfirmCardRequest {
                        account_id: ACCT.into(),
                        payment_method_id: id,
                        authentication_result: proto::AuthenticationResult::Passed as i32,
                    },
                ))
                .await
        }));
    }
    for task in tasks {
        let method = tokio::time::timeout(std::time::Duration::from_secs(10), task)
            .await
            .expect("each ConfirmCard answers within 10 s")
            .unwrap()
            .expect("every confirmation succeeds")
            .into_inner()
            .payment_method
            .unwrap();
        assert_eq!(status(&method), PaymentMethodStatus::Active);
    }
    let audits = count_where(
        &app,
        "SELECT COUNT(*) FROM audit_log WHERE action = 'confirm_card'",
    )
    .await;
    assert_eq!(audits, 1, "settled once");
    app.stop().await;
}
