//! Low-balance alerts and the other notifications, decided by the engines
//! on balance events and delivered to a real SMTP server (aiosmtpd).

use std::sync::Arc;

use billing::proto::{self, NotificationKind, TopUpStatus};
use billing::server::ServerSettings;
use billing::topup::ManualClock;

use crate::helpers::{SmtpSink, TestApp, authed, eventually, mail_settings, spawn_app_with};
use crate::payment_methods::{add_active_card, card, client};
use crate::top_ups::{
    ACCT, DECLINES, OFF_SESSION_3DS, Scenario, VISA, debit, engine_settings, settings, top_ups,
    wait_for_top_up,
};

fn settings_with_mail(clock: Arc<ManualClock>, sink: &SmtpSink) -> ServerSettings {
    let mail = mail_settings(SmtpSink::mailer(sink.port));
    ServerSettings {
        mailer: mail.mailer,
        sender: mail.sender,
        ..engine_settings(clock)
    }
}

async fn start(sink: &SmtpSink, opening: &str, cards: &[&str]) -> Scenario {
    let clock = Arc::new(ManualClock::starting_now());
    let app = spawn_app_with(settings_with_mail(clock.clone(), sink)).await;
    app.account_with_balance(ACCT, opening).await;
    let admin = app.token("admin", Some(ACCT));
    for (i, number) in cards.iter().enumerate() {
        let id = add_active_card(&app, &admin, ACCT, number).await;
        if i > 0 {
            client(&app)
                .set_auto_charge(authed(
                    &admin,
                    proto::SetAutoChargeRequest {
                        account_id: ACCT.into(),
                        payment_method_id: id,
                        enabled: true,
                    },
                ))
                .await
                .unwrap();
        }
    }
    Scenario { app, clock, admin }
}

async fn replica(first: &Scenario, sink: &SmtpSink) -> TestApp {
    crate::top_ups::replica_with(first, settings_with_mail(first.clock.clone(), sink)).await
}

async fn apply(s: &Scenario, request: proto::ApplyLowBalanceSettingsRequest) {
    crate::top_ups::apply(s, request).await;
}

fn subjects(sink: &SmtpSink) -> Vec<String> {
    sink.messages().into_iter().map(|m| m.subject).collect()
}

async fn listed(s: &Scenario) -> Vec<proto::Notification> {
    proto::notifications_client::NotificationsClient::new(s.app.channel.clone())
        .list_notifications(authed(
            &s.admin,
            proto::ListNotificationsRequest {
                account_id: ACCT.into(),
                page_size: 100,
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .notifications
}

/// The product's promise: alert threshold 20.00, top-up threshold 10.00, a
/// debit from 25.00 to 5.00 → first one low-balance email, then one top-up
/// receipt, each exactly once with three replicas, both in ListNotifications.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn low_balance_email_then_one_receipt_each_exactly_once_with_three_replicas() {
    let sink = SmtpSink::start(SmtpSink::free_port());
    let s = start(&sink, "25.00", &[VISA]).await;
    let second = replica(&s, &sink).await;
    let third = replica(&s, &sink).await;
    apply(
        &s,
        proto::ApplyLowBalanceSettingsRequest {
            notification_enabled: true,
            notification_threshold: "20.00".into(),
            ..settings("10.00", "50.00")
        },
    )
    .await;
    debit(&second, "20.00", "call").await;
    eventually("two emails", || async { sink.messages().len() >= 2 }).await;
    crate::top_ups::settle_briefly().await;
    let mail = sink.messages();
    assert_eq!(mail.len(), 2, "{:?}", subjects(&sink));
    assert_eq!(mail[0].subject, "Low balance: 5.00 USD on account acme");
    assert!(
        mail[0]
            .body
            .contains("below your alert threshold of 20.00 USD"),
        "{}",
        mail[0].body
    );
    assert_eq!(mail[1].subject, "Receipt: 50.00 USD added to account acme");
    assert!(
        mail[1].body.contains("Visa ending in 4242"),
        "{}",
        mail[1].body
    );
    assert!(
        mail[1].body.contains("New balance: 55.00 USD."),
        "{}",
        mail[1].body
    );
    assert_eq!(mail[0].envelope_to, "acme@example.com");
    eventually("both listed as sent", || async {
        let listed = listed(&s).await;
        listed.len() == 2
            && listed
                .iter()
                .all(|n| n.status == proto::NotificationStatus::Sent as i32)
    })
    .await;
    let kinds: Vec<i32> = listed(&s).await.iter().map(|n| n.kind).collect();
    assert_eq!(
        kinds,
        vec![
            NotificationKind::TopUpReceipt as i32,
            NotificationKind::LowBalance as i32
        ],
        "newest first"
    );
    third.stop().await;
    second.stop().await;
    s.app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_alert_per_crossing_rearmed_only_when_the_balance_rises_back() {
    let sink = SmtpSink::start(SmtpSink::free_port());
    let s = start(&sink, "30.00", &[]).await;
    apply(
        &s,
        proto::ApplyLowBalanceSettingsRequest {
            account_id: ACCT.into(),
            notification_enabled: true,
            notification_threshold: "20.00".into(),
            ..Default::default()
        },
    )
    .await;
    debit(&s.app, "15.00", "d1").await; // 30 -> 15: alert
    debit(&s.app, "3.00", "d2").await; // 15 -> 12: still below, no alert
    eventually("the first alert", || async { sink.messages().len() == 1 }).await;
    crate::top_ups::credit(&s.app, "8.00", "c1").await; // 12 -> 20: back at the threshold, re-armed
    debit(&s.app, "0.01", "d3").await; // 20 -> 19.99: alert again
    eventually("the second alert", || async { sink.messages().len() == 2 }).await;
    crate::top_ups::settle_briefly().await;
    let subjects = subjects(&sink);
    assert_eq!(
        subjects,
        vec![
            "Low balance: 15.00 USD on account acme",
            "Low balance: 19.99 USD on account acme"
        ]
    );
    s.app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declines_say_which_card_was_disabled_and_that_the_top_up_failed() {
    let sink = SmtpSink::start(SmtpSink::free_port());
    let s = start(&sink, "20.00", &[DECLINES]).await;
    apply(&s, settings("10.00", "30.00")).await;
    debit(&s.app, "15.00", "d1").await;
    wait_for_top_up(&s, TopUpStatus::RetryScheduled).await;
    eventually("two emails", || async { sink.messages().len() == 2 }).await;
    let mail = sink.messages();
    assert_eq!(
        mail[0].subject,
        "Your Visa ending in 0341 was disabled for auto-charge"
    );
    assert!(
        mail[0].body.contains("declined (card_declined)"),
        "{}",
        mail[0].body
    );
    assert_eq!(
        mail[1].subject,
        "Top-up of 30.00 USD failed on account acme"
    );
    assert!(
        mail[1].body.contains("We will try again at"),
        "{}",
        mail[1].body
    );
    assert!(
        mail[1].body.contains("Current balance: 5.00 USD"),
        "{}",
        mail[1].body
    );
    for message in &mail {
        assert!(
            !message.body.contains("4000000000000341"),
            "no full card number in email"
        );
    }
    s.app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authentication_required_and_balance_depleted_are_told() {
    let sink = SmtpSink::start(SmtpSink::free_port());
    let s = start(&sink, "20.00", &[OFF_SESSION_3DS]).await;
    apply(&s, settings("10.00", "30.00")).await;
    s.app
        .balances()
        .debit(authed(
            &s.app.service_token(),
            proto::DebitRequest {
                account_id: ACCT.into(),
                amount: "25.00".into(),
                idempotency_key: "big".into(),
                allow_overdraft: true,
                ..Default::default()
            },
        ))
        .await
        .unwrap(); // 20 -> -5: depleted, and a top-up that needs the customer
    wait_for_top_up(&s, TopUpStatus::RequiresAction).await;
    eventually("two emails", || async { sink.messages().len() == 2 }).await;
    let mail = sink.messages();
    let depleted = mail
        .iter()
        .find(|m| m.subject == "Balance depleted on account acme")
        .expect("depleted email");
    assert!(depleted.body.contains("-5.00 USD"), "{}", depleted.body);
    let action = mail
        .iter()
        .find(|m| m.subject.starts_with("Action needed"))
        .expect("authentication email");
    assert_eq!(
        action.subject,
        "Action needed: authenticate a payment of 30.00 USD"
    );
    assert!(
        action.body.contains("Visa ending in 0446"),
        "{}",
        action.body
    );
    assert!(action.body.contains("Add Funds"), "{}", action.body);
    s.app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reaching_the_daily_cap_is_told_not_silent() {
    let sink = SmtpSink::start(SmtpSink::free_port());
    let s = start(&sink, "20.00", &[VISA]).await;
    apply(
        &s,
        proto::ApplyLowBalanceSettingsRequest {
            max_top_ups_per_day: 1,
            ..settings("10.00", "30.00")
        },
    )
    .await;
    debit(&s.app, "15.00", "d1").await;
    wait_for_top_up(&s, TopUpStatus::Succeeded).await;
    debit(&s.app, "30.00", "d2").await;
    wait_for_top_up(&s, TopUpStatus::CapReached).await;
    eventually("receipt and cap emails", || async {
        sink.messages().len() == 2
    })
    .await;
    let cap = &sink.messages()[1];
    assert_eq!(cap.subject, "Auto top-up limit reached on account acme");
    assert!(
        cap.body
            .contains("at most 1 automatic top-ups per 24 hours"),
        "{}",
        cap.body
    );
    assert_eq!(top_ups(&s.app, &s.admin).await.len(), 2);
    s.app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_card_expiring_this_month_gets_one_reminder() {
    use chrono::Datelike;
    let sink = SmtpSink::start(SmtpSink::free_port());
    let s = start(&sink, "20.00", &[]).await;
    // The month the engine's pass below sees (two hours on: near the end of
    // a month that is already the next one).
    let today = billing::topup::Clock::now(s.clock.as_ref()) + chrono::Duration::hours(2);
    let mut details = card(VISA);
    details.exp_month = today.month() as i32;
    details.exp_year = today.year();
    client(&s.app)
        .add_card(authed(
            &s.admin,
            proto::AddCardRequest {
                account_id: ACCT.into(),
                source: Some(proto::add_card_request::Source::Card(details)),
                idempotency_key: "exp".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    // The engine checks hourly; move its clock so the next pass looks again.
    s.clock.advance(chrono::Duration::hours(2));
    eventually("the reminder", || async { sink.messages().len() == 1 }).await;
    let reminder = &sink.messages()[0];
    assert_eq!(reminder.subject, "Your Visa ending in 4242 expires soon");
    assert!(
        reminder
            .body
            .contains(&format!("{:02}/{}", today.month(), today.year())),
        "{}",
        reminder.body
    );
    s.clock.advance(chrono::Duration::hours(2));
    crate::top_ups::settle_briefly().await;
    assert_eq!(sink.messages().len(), 1, "once per card");
    s.app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kind_switched_off_is_not_sent_but_the_others_are() {
    let sink = SmtpSink::start(SmtpSink::free_port());
    let s = start(&sink, "25.00", &[VISA]).await;
    proto::notifications_client::NotificationsClient::new(s.app.channel.clone())
        .update_notification_settings(authed(
            &s.admin,
            proto::UpdateNotificationSettingsRequest {
                account_id: ACCT.into(),
                recipients: vec!["ops@acme.example".into()],
                enabled_kinds: vec![NotificationKind::TopUpReceipt as i32],
            },
        ))
        .await
        .unwrap();
    apply(
        &s,
        proto::ApplyLowBalanceSettingsRequest {
            notification_enabled: true,
            notification_threshold: "20.00".into(),
            ..settings("10.00", "50.00")
        },
    )
    .await;
    debit(&s.app, "20.00", "d1").await;
    wait_for_top_up(&s, TopUpStatus::Succeeded).await;
    eventually("the receipt", || async { !sink.messages().is_empty() }).await;
    crate::top_ups::settle_briefly().await;
    assert_eq!(
        subjects(&sink),
        vec!["Receipt: 50.00 USD added to account acme"]
    );
    assert_eq!(sink.messages()[0].envelope_to, "ops@acme.example");
    s.app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enabling_alerts_while_already_below_the_threshold_alerts_at_once() {
    let sink = SmtpSink::start(SmtpSink::free_port());
    let s = start(&sink, "12.00", &[]).await;
    let alerts = proto::ApplyLowBalanceSettingsRequest {
        account_id: ACCT.into(),
        notification_enabled: true,
        notification_threshold: "20.00".into(),
        ..Default::default()
    };
    apply(&s, alerts.clone()).await;
    eventually("the alert", || async { sink.messages().len() == 1 }).await;
    assert_eq!(
        sink.messages()[0].subject,
        "Low balance: 12.00 USD on account acme"
    );
    // Applying the same settings again is not a new alert.
    apply(&s, alerts).await;
    crate::top_ups::settle_briefly().await;
    assert_eq!(sink.messages().len(), 1);
    s.app.stop().await;
}
