//! Notifications: settings, the outbox, delivery through a real SMTP server
//! (aiosmtpd), retries while it is down, exactly-once across replicas.

use std::collections::HashSet;

use billing::notifications::{Notice, enqueue};
use billing::proto::{self, NotificationKind, NotificationStatus};
use tonic::Code;

use crate::helpers::{
    SmtpSink, authed, count_rows, eventually, mail_settings, spawn_app_on, spawn_app_with,
};

pub(crate) fn notifications(
    app: &crate::helpers::TestApp,
) -> proto::notifications_client::NotificationsClient<tonic::transport::Channel> {
    proto::notifications_client::NotificationsClient::new(app.channel.clone())
}

pub(crate) async fn list(app: &crate::helpers::TestApp, token: &str) -> Vec<proto::Notification> {
    notifications(app)
        .list_notifications(authed(
            token,
            proto::ListNotificationsRequest {
                account_id: "acme".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .notifications
}

#[tokio::test]
async fn a_test_email_reaches_every_recipient_through_smtp() {
    let sink = SmtpSink::start(SmtpSink::free_port());
    let app = spawn_app_with(mail_settings(SmtpSink::mailer(sink.port))).await;
    app.account_with_balance("acme", "12.50").await;
    let token = app.token("admin", Some("acme"));
    let settings = notifications(&app)
        .update_notification_settings(authed(
            &token,
            proto::UpdateNotificationSettingsRequest {
                account_id: "acme".into(),
                recipients: vec!["ops@acme.example".into(), "cfo@acme.example".into()],
                enabled_kinds: vec![],
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .settings
        .unwrap();
    assert_eq!(
        settings.recipients,
        vec!["ops@acme.example", "cfo@acme.example"]
    );
    assert_eq!(settings.enabled_kinds.len(), 9);

    let sent = notifications(&app)
        .send_test_notification(authed(
            &token,
            proto::SendTestNotificationRequest {
                account_id: "acme".into(),
                idempotency_key: "t1".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .notification
        .unwrap();
    assert_eq!(sent.kind, NotificationKind::Test as i32);
    eventually("the email arrives", || async { sink.messages().len() == 1 }).await;
    let email = &sink.messages()[0];
    assert_eq!(email.envelope_to, "ops@acme.example, cfo@acme.example");
    assert_eq!(email.subject, "Test notification for account acme");
    assert!(email.body.contains("12.50 USD"), "{}", email.body);
    assert!(
        email.message_id.contains(&sent.notification_id),
        "{}",
        email.message_id
    );
    eventually("listed as sent", || async {
        list(&app, &token).await[0].status == NotificationStatus::Sent as i32
    })
    .await;
    let listed = &list(&app, &token).await[0];
    assert_eq!((listed.attempts, listed.recipients.len()), (1, 2));
    assert!(listed.sent_at.is_some());
    app.stop().await;
}

#[tokio::test]
async fn the_same_test_request_twice_sends_one_email() {
    let sink = SmtpSink::start(SmtpSink::free_port());
    let app = spawn_app_with(mail_settings(SmtpSink::mailer(sink.port))).await;
    app.account_with_balance("acme", "0").await;
    let token = app.token("billing", Some("acme"));
    let request = || proto::SendTestNotificationRequest {
        account_id: "acme".into(),
        idempotency_key: "same".into(),
    };
    let first = notifications(&app)
        .send_test_notification(authed(&token, request()))
        .await
        .unwrap()
        .into_inner();
    let second = notifications(&app)
        .send_test_notification(authed(&token, request()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        first.notification.unwrap().notification_id,
        second.notification.unwrap().notification_id
    );
    eventually("sent", || async {
        list(&app, &token)
            .await
            .iter()
            .all(|n| n.status == NotificationStatus::Sent as i32)
    })
    .await;
    assert_eq!(sink.messages().len(), 1);
    app.stop().await;
}

#[tokio::test]
async fn while_smtp_is_down_delivery_is_retried_and_succeeds_once_it_is_back() {
    let port = SmtpSink::free_port();
    let app = spawn_app_with(mail_settings(SmtpSink::mailer(port))).await;
    app.account_with_balance("acme", "0").await;
    let token = app.token("admin", Some("acme"));
    notifications(&app)
        .send_test_notification(authed(
            &token,
            proto::SendTestNotificationRequest {
                account_id: "acme".into(),
                idempotency_key: "down".into(),
            },
        ))
        .await
        .unwrap();
    eventually("two failed attempts recorded", || async {
        let listed = list(&app, &token).await;
        listed[0].attempts >= 2
            && !listed[0].last_error.is_empty()
            && listed[0].status == NotificationStatus::Pending as i32
    })
    .await;
    let sink = SmtpSink::start(port);
    eventually("delivered after the server returned", || async {
        sink.messages().len() == 1
    })
    .await;
    eventually("listed as sent", || async {
        list(&app, &token).await[0].status == NotificationStatus::Sent as i32
    })
    .await;
    let listed = &list(&app, &token).await[0];
    assert!(listed.attempts >= 3, "{listed:?}");
    assert!(listed.last_error.is_empty());
    assert_eq!(sink.messages().len(), 1);
    app.stop().await;
}

#[tokio::test]
async fn three_replicas_send_each_message_exactly_once() {
    let sink = SmtpSink::start(SmtpSink::free_port());
    // The first replica creates the database; two more serve the same one.
    let first = spawn_app_with(mail_settings(SmtpSink::mailer(sink.port))).await;
    first.account_with_balance("acme", "0").await;
    let mut transaction = first.pool.begin().await.unwrap();
    for i in 0..30 {
        enqueue(
            &mut transaction,
            "acme",
            &Notice::Test,
            &format!("bulk-{i}"),
        )
        .await
        .unwrap()
        .unwrap();
    }
    transaction.commit().await.unwrap();
    let second = spawn_app_on(
        first.pool.clone(),
        mail_settings(SmtpSink::mailer(sink.port)),
    )
    .await;
    let third = spawn_app_on(
        first.pool.clone(),
        mail_settings(SmtpSink::mailer(sink.port)),
    )
    .await;
    eventually("all 30 delivered", || async { sink.messages().len() >= 30 }).await;
    // A sender marks its message sent after the SMTP server accepted it: the
    // last marks may land a moment after the last message arrived.
    eventually("all 30 marked sent", || async {
        let pending: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM notifications WHERE status <> 'sent'")
                .fetch_one(&first.pool)
                .await
                .unwrap();
        pending == 0
    })
    .await;
    let ids: HashSet<String> = sink.messages().into_iter().map(|m| m.message_id).collect();
    assert_eq!(ids.len(), 30);
    assert_eq!(sink.messages().len(), 30, "a message was sent twice");
    third.stop().await;
    second.stop().await;
    first.stop().await;
}

#[tokio::test]
async fn a_switched_off_kind_is_not_queued() {
    let app = spawn_app_with(Default::default()).await;
    app.account_with_balance("acme", "0").await;
    let token = app.token("admin", Some("acme"));
    let settings = notifications(&app)
        .update_notification_settings(authed(
            &token,
            proto::UpdateNotificationSettingsRequest {
                account_id: "acme".into(),
                recipients: vec![],
                enabled_kinds: vec![
                    NotificationKind::LowBalance as i32,
                    NotificationKind::TopUpReceipt as i32,
                ],
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .settings
        .unwrap();
    assert_eq!(
        settings.recipients,
        vec!["acme@example.com"],
        "the billing email by default"
    );
    assert!(
        settings
            .enabled_kinds
            .contains(&(NotificationKind::Test as i32)),
        "test emails are always on"
    );
    assert!(
        !settings
            .enabled_kinds
            .contains(&(NotificationKind::BalanceDepleted as i32))
    );
    let mut transaction = app.pool.begin().await.unwrap();
    let depleted = Notice::BalanceDepleted {
        total_balance: rust_decimal::Decimal::ZERO,
    };
    assert!(
        enqueue(&mut transaction, "acme", &depleted, "d-1")
            .await
            .unwrap()
            .is_none()
    );
    let low = Notice::LowBalance {
        total_balance: rust_decimal::Decimal::ONE,
        threshold: rust_decimal::Decimal::TEN,
        auto_refill: None,
    };
    assert!(
        enqueue(&mut transaction, "acme", &low, "l-1")
            .await
            .unwrap()
            .is_some()
    );
    transaction.commit().await.unwrap();
    assert_eq!(count_rows(&app.pool, "notifications").await, 1);
    app.stop().await;
}

#[tokio::test]
async fn without_smtp_messages_are_written_as_eml_files() {
    let folder = tempfile::tempdir().unwrap();
    let mailer = std::sync::Arc::new(
        billing::notifications::FileMailer::new(folder.path().to_owned(), "billing@localhost")
            .unwrap(),
    );
    let app = spawn_app_with(mail_settings(mailer)).await;
    app.account_with_balance("acme", "3.00").await;
    let token = app.token("admin", Some("acme"));
    let sent = notifications(&app)
        .send_test_notification(authed(
            &token,
            proto::SendTestNotificationRequest {
                account_id: "acme".into(),
                idempotency_key: "eml".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .notification
        .unwrap();
    let path = folder.path().join(format!("{}.eml", sent.notification_id));
    eventually("the .eml file is written", || async { path.exists() }).await;
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("To: acme@example.com"), "{text}");
    assert!(
        text.contains("Subject: Test notification for account acme"),
        "{text}"
    );
    app.stop().await;
}

#[tokio::test]
async fn invalid_recipients_are_rejected_by_field_and_nothing_changes() {
    let app = spawn_app_with(Default::default()).await;
    app.account_with_balance("acme", "0").await;
    let token = app.token("admin", Some("acme"));
    for (recipients, field) in [
        (
            vec!["ok@example.com".to_string(), "not-an-address".to_string()],
            "recipients[1]",
        ),
        (
            vec!["a@b.example\r\nBcc: x@evil.example".to_string()],
            "recipients[0]",
        ),
        (vec!["x@example.com".to_string(); 11], "recipients"),
    ] {
        let error = notifications(&app)
            .update_notification_settings(authed(
                &token,
                proto::UpdateNotificationSettingsRequest {
                    account_id: "acme".into(),
                    recipients,
                    enabled_kinds: vec![],
                },
            ))
            .await
            .unwrap_err();
        assert_eq!(error.code(), Code::InvalidArgument);
        assert!(
            error.message().starts_with(field),
            "{field}: {}",
            error.message()
        );
    }
    let bad_kind = notifications(&app)
        .update_notification_settings(authed(
            &token,
            proto::UpdateNotificationSettingsRequest {
                account_id: "acme".into(),
                recipients: vec![],
                enabled_kinds: vec![77],
            },
        ))
        .await
        .unwrap_err();
    assert!(
        bad_kind.message().starts_with("enabled_kinds"),
        "{}",
        bad_kind.message()
    );
    let bad_key = notifications(&app)
        .send_test_notification(authed(
            &token,
            proto::SendTestNotificationRequest {
                account_id: "acme".into(),
                idempotency_key: String::new(),
            },
        ))
        .await
        .unwrap_err();
    assert!(
        bad_key.message().starts_with("idempotency_key"),
        "{}",
        bad_key.message()
    );
    assert_eq!(count_rows(&app.pool, "notification_settings").await, 0);
    assert_eq!(count_rows(&app.pool, "notifications").await, 0);
    app.stop().await;
}

#[tokio::test]
async fn notification_rpcs_for_every_role_on_own_and_other_accounts() {
    let app = spawn_app_with(Default::default()).await;
    app.account_with_balance("own", "0").await;
    app.account_with_balance("other", "0").await;
    let mut failures = Vec::new();
    let mut nonce = 0;
    for role in ["admin", "commercial", "billing", "viewer", "service"] {
        let token = app.token(role, (role != "service").then_some("own"));
        for account in ["own", "other"] {
            for rpc in ["get", "update", "list", "test"] {
                nonce += 1;
                let mut client = notifications(&app);
                let result = match rpc {
                    "get" => client
                        .get_notification_settings(authed(
                            &token,
                            proto::GetNotificationSettingsRequest {
                                account_id: account.into(),
                            },
                        ))
                        .await
                        .map(|_| ()),
                    "update" => client
                        .update_notification_settings(authed(
                            &token,
                            proto::UpdateNotificationSettingsRequest {
                                account_id: account.into(),
                                ..Default::default()
                            },
                        ))
                        .await
                        .map(|_| ()),
                    "list" => client
                        .list_notifications(authed(
                            &token,
                            proto::ListNotificationsRequest {
                                account_id: account.into(),
                                ..Default::default()
                            },
                        ))
                        .await
                        .map(|_| ()),
                    _ => client
                        .send_test_notification(authed(
                            &token,
                            proto::SendTestNotificationRequest {
                                account_id: account.into(),
                                idempotency_key: format!("k{nonce}"),
                            },
                        ))
                        .await
                        .map(|_| ()),
                };
                let got = result.err().map(|s| s.code()).unwrap_or(Code::Ok);
                let manages = matches!(rpc, "update" | "test");
                let want = match (role, manages, account) {
                    ("service", true, _) => Code::PermissionDenied,
                    ("service", false, _) => Code::Ok,
                    ("viewer", true, _) => Code::PermissionDenied,
                    (_, _, "own") => Code::Ok,
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
    app.stop().await;
}

/// Sends a test notification as the admin of `account` with `key`.
async fn send_test(app: &crate::helpers::TestApp, account: &str, key: &str) -> proto::Notification {
    notifications(app)
        .send_test_notification(authed(
            &app.token("admin", Some(account)),
            proto::SendTestNotificationRequest {
                account_id: account.into(),
                idempotency_key: key.into(),
            },
        ))
        .await
        .unwrap_or_else(|status| panic!("test notification of {account} with {key}: {status:?}"))
        .into_inner()
        .notification
        .unwrap()
}

async fn set_recipients(app: &crate::helpers::TestApp, account: &str, recipients: &[&str]) {
    notifications(app)
        .update_notification_settings(authed(
            &app.token("admin", Some(account)),
            proto::UpdateNotificationSettingsRequest {
                account_id: account.into(),
                recipients: recipients.iter().map(|r| r.to_string()).collect(),
                enabled_kinds: vec![],
            },
        ))
        .await
        .unwrap();
}

/// Issue 13: `test:{account}:{key}` made account `org` with key `emea:hello`
/// and account `org:emea` with key `hello` the same dedupe key.
#[tokio::test]
async fn a_dedupe_key_is_scoped_by_account_and_never_returns_or_preempts_another_accounts_notification()
 {
    let app = crate::helpers::spawn_app().await;
    app.account_with_balance("org", "0").await;
    app.account_with_balance("org:emea", "0").await;
    set_recipients(&app, "org:emea", &["private@emea.example"]).await;

    // Another account's notification is never returned for a key built like its own.
    let emea = send_test(&app, "org:emea", "hello").await;
    let org = send_test(&app, "org", "emea:hello").await;
    assert_ne!(org.notification_id, emea.notification_id);
    assert_eq!(org.account_id, "org");
    assert_eq!(org.recipients, vec!["org@example.com"]);
    assert_eq!(org.subject, "Test notification for account org");

    // Nor can one account pre-empt another's future key.
    let org_first = send_test(&app, "org", "emea:later").await;
    let emea_later = send_test(&app, "org:emea", "later").await;
    assert_ne!(org_first.notification_id, emea_later.notification_id);
    assert_eq!(emea_later.account_id, "org:emea");
    assert_eq!(emea_later.recipients, vec!["private@emea.example"]);

    // The same request again is still the same notification, on each account.
    assert_eq!(
        send_test(&app, "org:emea", "hello").await.notification_id,
        emea.notification_id
    );
    assert_eq!(
        send_test(&app, "org", "emea:hello").await.notification_id,
        org.notification_id
    );
    assert_eq!(count_rows(&app.pool, "notifications").await, 4);

    // The outbox itself: the same key on two accounts is two messages.
    let mut transaction = app.pool.begin().await.unwrap();
    let a = enqueue(&mut transaction, "org", &Notice::Test, "shared")
        .await
        .unwrap()
        .unwrap();
    let b = enqueue(&mut transaction, "org:emea", &Notice::Test, "shared")
        .await
        .unwrap()
        .unwrap();
    transaction.commit().await.unwrap();
    assert_ne!(a.notification_id, b.notification_id);
    assert_eq!(
        (a.account_id.as_str(), b.account_id.as_str()),
        ("org", "org:emea")
    );
    app.stop().await;
}
