//! 3-D Secure at charge time: ConfirmTopUp finishes a manual, retry or
//! automatic top-up that waits for the customer; it expires after a while.

use billing::proto::{self, TopUpStatus};
use chrono::Duration;

use super::*;
use crate::payment_methods::{add_funds, client, funds};

const ALWAYS_3DS: &str = "4000002760003184";

async fn confirm_top_up(
    app: &TestApp,
    token: &str,
    account: &str,
    top_up_id: &str,
    passed: bool,
) -> Result<proto::ConfirmTopUpResponse, tonic::Status> {
    let result = if passed {
        proto::AuthenticationResult::Passed
    } else {
        proto::AuthenticationResult::Failed
    };
    client(app)
        .confirm_top_up(authed(
            token,
            proto::ConfirmTopUpRequest {
                account_id: account.into(),
                top_up_id: top_up_id.into(),
                authentication_result: result as i32,
            },
        ))
        .await
        .map(|r| r.into_inner())
}

async fn count(app: &TestApp, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(&app.pool).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_funds_with_a_card_that_always_asks_for_3ds_is_credited_once_when_confirmed() {
    let (s, cards) = scenario("0", &[ALWAYS_3DS]).await;
    let waiting = add_funds(&s.app, &s.admin, funds("25.00", &cards[0], "add-1"))
        .await
        .unwrap();
    let top_up = waiting.top_up.unwrap();
    assert_eq!(status_of(&top_up), TopUpStatus::RequiresAction);
    let action = waiting.next_action.expect("a 3-D Secure challenge");
    assert!(!action.challenge_id.is_empty());
    assert_eq!(waiting.balance, "0.00");

    let confirmed = confirm_top_up(&s.app, &s.admin, ACCT, &top_up.top_up_id, true)
        .await
        .unwrap();
    assert_eq!(
        status_of(confirmed.top_up.as_ref().unwrap()),
        TopUpStatus::Succeeded
    );
    assert_eq!(confirmed.balance, "25.00");

    // Again: the same answer, nothing charged or credited twice.
    let again = confirm_top_up(&s.app, &s.admin, ACCT, &top_up.top_up_id, true)
        .await
        .unwrap();
    assert_eq!(
        status_of(again.top_up.as_ref().unwrap()),
        TopUpStatus::Succeeded
    );
    assert_eq!(again.balance, "25.00");
    assert_eq!(sandbox_charges(&s.app).await, 1);
    assert_eq!(ledger_top_ups(&s.app).await, 1);
    assert_eq!(balance(&s.app).await, "25.00");
    s.app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_challenge_ends_the_top_up_failed_and_credits_nothing() {
    let (s, cards) = scenario("0", &[ALWAYS_3DS]).await;
    let waiting = add_funds(&s.app, &s.admin, funds("25.00", &cards[0], "add-1"))
        .await
        .unwrap();
    let top_up_id = waiting.top_up.unwrap().top_up_id;
    let failed = confirm_top_up(&s.app, &s.admin, ACCT, &top_up_id, false)
        .await
        .unwrap();
    let top_up = failed.top_up.unwrap();
    assert_eq!(status_of(&top_up), TopUpStatus::Failed);
    assert_eq!(top_up.failure_reason, "authentication_failed");
    assert_eq!(balance(&s.app).await, "0.00");
    assert_eq!(ledger_top_ups(&s.app).await, 0);
    s.app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_automatic_top_up_waiting_for_the_customer_is_completed_by_confirm_top_up() {
    let (s, _) = scenario("20.00", &[OFF_SESSION_3DS]).await;
    apply(&s, settings("10.00", "30.00")).await;
    debit(&s.app, "15.00", "usage-1").await;
    let waiting = wait_for_top_up(&s, TopUpStatus::RequiresAction).await;
    let confirmed = confirm_top_up(&s.app, &s.admin, ACCT, &waiting.top_up_id, true)
        .await
        .unwrap();
    assert_eq!(
        status_of(confirmed.top_up.as_ref().unwrap()),
        TopUpStatus::Succeeded
    );
    assert_eq!(confirmed.balance, "35.00");
    confirm_top_up(&s.app, &s.admin, ACCT, &waiting.top_up_id, true)
        .await
        .unwrap();
    settle_briefly().await;
    assert_eq!(balance(&s.app).await, "35.00");
    assert_eq!(ledger_top_ups(&s.app).await, 1);
    assert_eq!(
        count(
            &s.app,
            "SELECT COUNT(*) FROM notifications WHERE kind = 'top_up_receipt'"
        )
        .await,
        1,
        "one receipt"
    );
    s.app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirming_another_accounts_or_a_settled_top_up_is_refused() {
    let (s, cards) = scenario("0", &[VISA]).await;
    s.app.account_with_balance("other", "0").await;
    let other_admin = s.app.token("admin", Some("other"));
    let settled = add_funds(&s.app, &s.admin, funds("30.00", &cards[0], "add-1"))
        .await
        .unwrap()
        .top_up
        .unwrap();
    let not_found = confirm_top_up(&s.app, &other_admin, "other", &settled.top_up_id, true)
        .await
        .unwrap_err();
    assert_eq!(not_found.code(), tonic::Code::NotFound);
    let not_waiting = confirm_top_up(&s.app, &s.admin, ACCT, &settled.top_up_id, true)
        .await
        .unwrap_err();
    assert_eq!(not_waiting.code(), tonic::Code::FailedPrecondition);
    assert!(
        not_waiting.message().contains("SUCCEEDED"),
        "{}",
        not_waiting.message()
    );
    let unspecified = client(&s.app)
        .confirm_top_up(authed(
            &s.admin,
            proto::ConfirmTopUpRequest {
                account_id: ACCT.into(),
                top_up_id: settled.top_up_id.clone(),
                authentication_result: 0,
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(unspecified.code(), tonic::Code::InvalidArgument);
    assert!(unspecified.message().contains("authentication_result"));
    assert_eq!(balance(&s.app).await, "30.00");
    s.app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_top_up_waiting_for_authentication_expires_and_the_crossing_is_freed() {
    let (s, _) = scenario("20.00", &[OFF_SESSION_3DS]).await;
    apply(&s, settings("10.00", "30.00")).await;
    debit(&s.app, "15.00", "usage-1").await;
    let waiting = wait_for_top_up(&s, TopUpStatus::RequiresAction).await;
    s.clock.advance(Duration::hours(25));
    eventually("the waiting top-up expires", || async {
        top_ups(&s.app, &s.admin)
            .await
            .iter()
            .any(|t| t.top_up_id == waiting.top_up_id && status_of(t) == TopUpStatus::Failed)
    })
    .await;
    // The crossing is free again: the next top-up of the still-low account starts.
    eventually("the next top-up of the freed crossing starts", || async {
        top_ups(&s.app, &s.admin)
            .await
            .iter()
            .any(|t| t.top_up_id != waiting.top_up_id)
    })
    .await;
    let listed = top_ups(&s.app, &s.admin).await;
    let expired = listed
        .iter()
        .find(|t| t.top_up_id == waiting.top_up_id)
        .unwrap();
    assert_eq!(expired.failure_reason, "authentication_expired");
    assert_eq!(balance(&s.app).await, "5.00");
    s.app.stop().await;
}

/// The expiry and the decision on the next top-up are one step under the
/// account lock: while another transaction holds the account row, the
/// expiry pass waits, and the waiting top-up is not seen `FAILED` with
/// nothing open after it (the model test once caught that window).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expiring_top_up_and_the_next_one_are_decided_in_one_step_under_the_account_lock() {
    let (s, _) = scenario("20.00", &[OFF_SESSION_3DS]).await;
    apply(&s, settings("10.00", "30.00")).await;
    debit(&s.app, "15.00", "usage-1").await;
    let waiting = wait_for_top_up(&s, TopUpStatus::RequiresAction).await;

    let mut holder = s.app.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM accounts WHERE account_id = $1 FOR UPDATE")
        .bind(ACCT)
        .execute(&mut *holder)
        .await
        .unwrap();
    s.clock.advance(Duration::hours(25));
    let pool = s.app.pool.clone();
    eventually("the expiry pass waits for the account lock", || {
        let pool = pool.clone();
        async move {
            let waiters: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
                  WHERE NOT l.granted AND a.datname = current_database()",
            )
            .fetch_one(&pool)
            .await
            .unwrap();
            waiters > 0
        }
    })
    .await;
    let status: String = sqlx::query_scalar("SELECT status FROM top_ups WHERE top_up_id = $1")
        .bind(&waiting.top_up_id)
        .fetch_one(&s.app.pool)
        .await
        .unwrap();
    assert_eq!(
        status, "REQUIRES_ACTION",
        "the top-up expired before the account lock was taken"
    );
    holder.rollback().await.unwrap();

    // Once expired, the next top-up is already there, in the same snapshot.
    eventually("the waiting top-up expires", || {
        let pool = pool.clone();
        let id = waiting.top_up_id.clone();
        async move {
            let (expired, next_open): (bool, bool) = sqlx::query_as(
                "SELECT \
                   EXISTS (SELECT 1 FROM top_ups WHERE top_up_id = $1 AND status = 'FAILED'), \
                   EXISTS (SELECT 1 FROM top_ups WHERE top_up_id <> $1 AND trigger = 'AUTOMATIC')",
            )
            .bind(&id)
            .fetch_one(&pool)
            .await
            .unwrap();
            assert!(
                !expired || next_open,
                "the top-up expired and no next top-up was decided with it"
            );
            expired
        }
    })
    .await;
    s.app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_action_needed_email_links_to_the_panel_with_the_top_up_id() {
    let clock = std::sync::Arc::new(billing::topup::ManualClock::starting_now());
    let mut settings = engine_settings(clock.clone());
    settings.policy.panel_url = Some("https://panel.example/billing".into());
    let app = crate::helpers::spawn_app_with(settings).await;
    app.account_with_balance(ACCT, "20.00").await;
    let admin = app.token("admin", Some(ACCT));
    crate::payment_methods::add_active_card(&app, &admin, ACCT, OFF_SESSION_3DS).await;
    let s = Scenario { app, clock, admin };
    apply(&s, settings_for_email()).await;
    debit(&s.app, "15.00", "usage-1").await;
    let waiting = wait_for_top_up(&s, TopUpStatus::RequiresAction).await;
    let body: String = sqlx::query_scalar(
        "SELECT body_text FROM notifications WHERE kind = 'authentication_required'",
    )
    .fetch_one(&s.app.pool)
    .await
    .unwrap();
    assert!(
        body.contains(&format!(
            "https://panel.example/billing?top_up_id={}",
            waiting.top_up_id
        )),
        "{body}"
    );
    s.app.stop().await;
}

fn settings_for_email() -> proto::ApplyLowBalanceSettingsRequest {
    settings("10.00", "30.00")
}

async fn remove_card(s: &Scenario, card: &str) {
    client(&s.app)
        .remove_payment_method(authed(
            &s.admin,
            proto::RemovePaymentMethodRequest {
                account_id: ACCT.into(),
                payment_method_id: card.into(),
            },
        ))
        .await
        .unwrap();
}

/// The rule: a confirmation charges only what a charge made now could —
/// the live state under the account lock, not the state when the challenge
/// was asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_confirmation_never_charges_a_card_removed_while_the_challenge_waited() {
    let (s, cards) = scenario("0", &[ALWAYS_3DS]).await;
    let waiting = add_funds(&s.app, &s.admin, funds("30.00", &cards[0], "add-1"))
        .await
        .unwrap();
    let top_up_id = waiting.top_up.unwrap().top_up_id;
    remove_card(&s, &cards[0]).await;

    // Refused — or, when the engine ended the top-up first (a challenge on
    // a removed card can never be answered), answered as it stands.
    match confirm_top_up(&s.app, &s.admin, ACCT, &top_up_id, true).await {
        Err(refused) => {
            assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
            assert!(
                refused.message().contains("removed"),
                "{}",
                refused.message()
            );
        }
        Ok(answer) => assert_eq!(status_of(&answer.top_up.unwrap()), TopUpStatus::Failed),
    }
    assert_eq!(
        failure_reason_of(&s, &top_up_id).await,
        (TopUpStatus::Failed, "payment_method_removed".into())
    );
    // Confirming again answers the ended top-up and charges nothing either.
    let again = confirm_top_up(&s.app, &s.admin, ACCT, &top_up_id, true)
        .await
        .unwrap();
    assert_eq!(status_of(&again.top_up.unwrap()), TopUpStatus::Failed);
    assert_eq!(sandbox_charges(&s.app).await, 0);
    assert_eq!(ledger_top_ups(&s.app).await, 0);
    assert_eq!(balance(&s.app).await, "0.00");
    s.app.stop().await;
}

/// An automatic top-up of `ACCT` (20.00, threshold 10.00, refill 30.00)
/// waiting for 3-D Secure after a 15.00 debit.
async fn automatic_top_up_waiting_for_the_customer() -> (Scenario, proto::TopUp) {
    let (s, _) = scenario("20.00", &[OFF_SESSION_3DS]).await;
    apply(&s, settings("10.00", "30.00")).await;
    debit(&s.app, "15.00", "usage-1").await;
    let waiting = wait_for_top_up(&s, TopUpStatus::RequiresAction).await;
    (s, waiting)
}

/// A passed confirmation of `top_up_id` is refused, the top-up ends
/// `CANCELED` with `reason`, and nothing is charged or credited.
async fn refused_and_canceled(s: &Scenario, top_up_id: &str, reason: &str, balance_now: &str) {
    let refused = confirm_top_up(&s.app, &s.admin, ACCT, top_up_id, true)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(
        refused.message().contains("CANCELED"),
        "{}",
        refused.message()
    );
    assert_eq!(
        failure_reason_of(s, top_up_id).await,
        (TopUpStatus::Canceled, reason.into())
    );
    settle_briefly().await;
    assert_eq!(sandbox_charges(&s.app).await, 0);
    assert_eq!(ledger_top_ups(&s.app).await, 0);
    assert_eq!(balance(&s.app).await, balance_now);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_confirmation_never_charges_an_automatic_top_up_after_auto_refill_was_switched_off() {
    let (s, waiting) = automatic_top_up_waiting_for_the_customer().await;
    apply(
        &s,
        proto::ApplyLowBalanceSettingsRequest {
            auto_refill_enabled: false,
            ..settings("10.00", "30.00")
        },
    )
    .await;
    refused_and_canceled(&s, &waiting.top_up_id, "auto_refill_disabled", "5.00").await;
    s.app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_confirmation_never_charges_an_automatic_top_up_after_the_balance_was_restored() {
    let (s, waiting) = automatic_top_up_waiting_for_the_customer().await;
    credit(&s.app, "50.00", "by-hand").await;
    refused_and_canceled(&s, &waiting.top_up_id, "balance_restored", "55.00").await;
    s.app.stop().await;
}

/// One confirmation takes the attempt and charges; the others answer the
/// top-up as it stands (`PENDING` while that charge is in flight).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_confirmations_charge_once_and_the_others_answer_the_top_up_as_it_stands() {
    let (s, cards) = scenario("0", &[ALWAYS_3DS]).await;
    let waiting = add_funds(&s.app, &s.admin, funds("25.00", &cards[0], "add-1"))
        .await
        .unwrap();
    let top_up_id = waiting.top_up.unwrap().top_up_id;
    let confirmations = (0..8).map(|_| confirm_top_up(&s.app, &s.admin, ACCT, &top_up_id, true));
    for answer in futures::future::join_all(confirmations).await {
        let answer = answer.unwrap();
        let status = status_of(answer.top_up.as_ref().unwrap());
        assert!(
            matches!(status, TopUpStatus::Succeeded | TopUpStatus::Pending),
            "{status:?}"
        );
    }
    settle_briefly().await;
    assert_eq!(sandbox_charges(&s.app).await, 1);
    assert_eq!(ledger_top_ups(&s.app).await, 1);
    assert_eq!(balance(&s.app).await, "25.00");
    s.app.stop().await;
}

async fn failure_reason_of(s: &Scenario, top_up_id: &str) -> (TopUpStatus, String) {
    let top_up = top_ups(&s.app, &s.admin)
        .await
        .into_iter()
        .find(|t| t.top_up_id == top_up_id)
        .unwrap();
    (status_of(&top_up), top_up.failure_reason)
}

/// The rule: the first answer to take the challenge decides; another
/// answer while its gateway call is in flight gets the top-up as it stands.
/// (A failed answer that had read the top-up before a passed one took it
/// went on to the gateway anyway and ended both FAILED.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_answer_to_take_a_challenge_decides_and_a_later_one_gets_it_as_it_stands() {
    let (s, cards) = scenario("0", &[ALWAYS_3DS]).await;
    let waiting = add_funds(&s.app, &s.admin, funds("25.00", &cards[0], "add-1"))
        .await
        .unwrap();
    let top_up_id = waiting.top_up.unwrap().top_up_id;
    // The processor is slow: its charge row stays locked until we let go.
    let mut slow = s.app.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM sandbox_charges FOR UPDATE")
        .execute(&mut *slow)
        .await
        .unwrap();
    let failed = confirm_top_up(&s.app, &s.admin, ACCT, &top_up_id, false);
    let meanwhile = async {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while failure_reason_of(&s, &top_up_id).await.0 != TopUpStatus::Pending {
            assert!(std::time::Instant::now() < deadline, "never taken");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let passed = confirm_top_up(&s.app, &s.admin, ACCT, &top_up_id, true).await;
        slow.rollback().await.unwrap();
        passed
    };
    let (failed, passed) = futures::join!(failed, meanwhile);
    assert_eq!(
        status_of(passed.unwrap().top_up.as_ref().unwrap()),
        TopUpStatus::Pending
    );
    let failed = failed.unwrap().top_up.unwrap();
    assert_eq!(status_of(&failed), TopUpStatus::Failed);
    assert_eq!(failed.failure_reason, "authentication_failed");
    assert_eq!(sandbox_charges(&s.app).await, 0);
    assert_eq!(ledger_top_ups(&s.app).await, 0);
    assert_eq!(balance(&s.app).await, "0.00");
    s.app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_to_a_top_up_that_already_ended_changes_nothing() {
    let (s, cards) = scenario("0", &[ALWAYS_3DS]).await;
    let waiting = add_funds(&s.app, &s.admin, funds("30.00", &cards[0], "add-1"))
        .await
        .unwrap();
    let top_up_id = waiting.top_up.unwrap().top_up_id;
    remove_card(&s, &cards[0]).await;
    // Refused, or (the engine ended it first) answered as it stands.
    let _ = confirm_top_up(&s.app, &s.admin, ACCT, &top_up_id, true).await;
    eventually("the top-up ended", || async {
        failure_reason_of(&s, &top_up_id).await.0 == TopUpStatus::Failed
    })
    .await;
    let ended = failure_reason_of(&s, &top_up_id).await;
    assert_eq!(
        ended,
        (TopUpStatus::Failed, "payment_method_removed".into())
    );
    let audited = count(
        &s.app,
        "SELECT COUNT(*) FROM audit_log WHERE action = 'finish_top_up'",
    )
    .await;
    for passed in [false, true] {
        let answer = confirm_top_up(&s.app, &s.admin, ACCT, &top_up_id, passed)
            .await
            .unwrap();
        assert_eq!(status_of(&answer.top_up.unwrap()), TopUpStatus::Failed);
        assert_eq!(failure_reason_of(&s, &top_up_id).await, ended);
    }
    assert_eq!(
        count(
            &s.app,
            "SELECT COUNT(*) FROM audit_log WHERE action = 'finish_top_up'"
        )
        .await,
        audited
    );
    assert_eq!(sandbox_charges(&s.app).await, 0);
    s.app.stop().await;
}

/// A challenge nobody can answer any more does not hold the account below
/// its threshold: an automatic top-up waiting for 3-D Secure on a card that
/// was removed ends `FAILED` (`payment_method_removed`) at once — not after
/// the day the challenge may wait — and the crossing goes on with the other
/// cards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_automatic_top_up_waiting_on_a_removed_card_ends_and_the_next_card_is_charged() {
    let (s, waiting) = automatic_top_up_waiting_for_the_customer().await;
    let visa = crate::payment_methods::add_active_card(&s.app, &s.admin, ACCT, VISA).await;
    client(&s.app)
        .set_auto_charge(authed(
            &s.admin,
            proto::SetAutoChargeRequest {
                account_id: ACCT.into(),
                payment_method_id: visa.clone(),
                enabled: true,
            },
        ))
        .await
        .unwrap();
    remove_card(&s, &waiting.attempts[0].payment_method_id).await;

    eventually("the next card refilled the account", || async {
        top_ups(&s.app, &s.admin)
            .await
            .iter()
            .any(|t| status_of(t) == TopUpStatus::Succeeded)
    })
    .await;
    assert_eq!(
        failure_reason_of(&s, &waiting.top_up_id).await,
        (TopUpStatus::Failed, "payment_method_removed".into())
    );
    assert_eq!(balance(&s.app).await, "35.00");
    assert_eq!(sandbox_charges(&s.app).await, 1);
    assert_eq!(ledger_top_ups(&s.app).await, 1);
    s.app.stop().await;
}
