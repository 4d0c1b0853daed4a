//! Abuse by a paying tenant (issue 17): transport limits (handshake timeout,
//! connection caps, HTTP/2 streams per connection), per-caller limits (open
//! streams, rates of test emails and settings changes), streams that end
//! with their token, email addresses the mailer accepts, and the shared
//! event reader (a quiet stream costs nothing, a slow one misses nothing).

use std::time::Duration;

use billing::api::{CallerLimitSettings, LIMIT_METADATA_KEY, RESUME_CURSOR_METADATA_KEY};
use billing::events::{self, EventFeed, EventFilter, EventHub, FeedSettings, HubSettings};
use billing::ids::AccountId;
use billing::proto::{self, NotificationStatus};
use billing::server::ServerSettings;
use billing::transport::TransportLimits;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tonic::Code;
use tonic::transport::Channel;

use crate::helpers::{
    SmtpSink, TestApp, authed, count_rows, eventually, mail_settings, spawn_app, spawn_app_with,
    spawn_app_with_settings_and_keys, table_counts, test_keys,
};
use crate::notifications::notifications;

/// Generous bound of every wait: these things normally take milliseconds.
const WAIT: Duration = Duration::from_secs(20);

fn settings_with_transport(transport: TransportLimits) -> ServerSettings {
    ServerSettings {
        transport,
        ..ServerSettings::default()
    }
}

/// Waits (bounded) until the server closes `socket`: a read returns end of
/// file or a reset.
async fn closed_by_server(socket: &mut TcpStream, what: &str) {
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(WAIT, socket.read(&mut byte))
        .await
        .unwrap_or_else(|_| {
            panic!("timed out after {WAIT:?} waiting for the server to close {what}")
        });
    match read {
        Ok(0) | Err(_) => {}
        Ok(_) => panic!("{what}: the server sent bytes instead of closing"),
    }
}

async fn health_check(address: std::net::SocketAddr) -> Result<(), String> {
    let channel = Channel::from_shared(format!("http://{address}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    tokio::time::timeout(
        WAIT,
        health.check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        }),
    )
    .await
    .map_err(|_| "health check timed out".to_owned())?
    .map(drop)
    .map_err(|status| format!("health check: {status:?}"))
}

#[tokio::test]
async fn a_connection_that_sends_nothing_is_closed_after_the_handshake_timeout() {
    let app = spawn_app_with(settings_with_transport(TransportLimits {
        handshake_timeout: Duration::from_millis(300),
        ..TransportLimits::default()
    }))
    .await;
    let mut silent = TcpStream::connect(app.address).await.unwrap();
    closed_by_server(&mut silent, "a connection that sent nothing").await;
    // One byte is not a handshake either.
    let mut one_byte = TcpStream::connect(app.address).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut one_byte, b"P")
        .await
        .unwrap();
    closed_by_server(&mut one_byte, "a connection that sent one byte").await;
    // Real clients are not affected.
    health_check(app.address).await.unwrap();
    app.stop().await;
}

#[tokio::test]
async fn connections_beyond_the_per_peer_cap_are_closed_at_once() {
    // The test client's channel is one connection of 127.0.0.1 already.
    let app = spawn_app_with(settings_with_transport(TransportLimits {
        handshake_timeout: Duration::from_secs(3600),
        max_connections_per_peer: 3,
        ..TransportLimits::default()
    }))
    .await;
    let first = TcpStream::connect(app.address).await.unwrap();
    let _second = TcpStream::connect(app.address).await.unwrap();
    let mut third = TcpStream::connect(app.address).await.unwrap();
    // Closed long before its handshake timeout: by the cap.
    closed_by_server(&mut third, "a connection beyond the per-peer cap").await;
    // Once one closes, the peer may connect again.
    drop(first);
    eventually(
        "a new client is admitted once a connection closed",
        || async { health_check(app.address).await.is_ok() },
    )
    .await;
    app.stop().await;
}

#[tokio::test]
async fn at_the_connection_cap_the_oldest_silent_connection_makes_room_for_a_health_check() {
    let app = spawn_app_with(settings_with_transport(TransportLimits {
        handshake_timeout: Duration::from_secs(3600),
        max_connections: 3,
        ..TransportLimits::default()
    }))
    .await;
    // With the test client's connection, the server is full.
    let mut oldest = TcpStream::connect(app.address).await.unwrap();
    let _newer = TcpStream::connect(app.address).await.unwrap();
    // Arrange connections that have been silent for longer than the 1 s
    // after which one may be closed to make room (not synchronization).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    health_check(app.address)
        .await
        .expect("a health check gets through a server full of silent connections");
    closed_by_server(&mut oldest, "the oldest silent connection").await;
    app.stop().await;
}

#[tokio::test]
async fn at_the_connection_cap_with_every_connection_active_a_new_one_is_closed() {
    let app = spawn_app_with(settings_with_transport(TransportLimits {
        handshake_timeout: Duration::from_secs(3600),
        max_connections: 2,
        ..TransportLimits::default()
    }))
    .await;
    // The test client's connection and a second active client fill the server.
    let second = Channel::from_shared(format!("http://{}", app.address))
        .unwrap()
        .connect()
        .await
        .unwrap();
    tonic_health::pb::health_client::HealthClient::new(second.clone())
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();
    let mut third = TcpStream::connect(app.address).await.unwrap();
    closed_by_server(&mut third, "a connection beyond the total cap").await;
    // The active clients keep working.
    app.account_with_balance("acme", "1.00").await;
    app.stop().await;
}

#[tokio::test]
async fn a_connection_may_hold_only_its_http2_concurrent_streams() {
    let app = spawn_app_with(settings_with_transport(TransportLimits {
        max_concurrent_streams: 2,
        ..TransportLimits::default()
    }))
    .await;
    app.account_with_balance("acme", "1.00").await;
    let token = app.service_token();
    let open = || {
        let mut client = app.balances();
        let token = token.clone();
        async move {
            client
                .watch_balance_events(authed(
                    &token,
                    proto::WatchBalanceEventsRequest {
                        account_id: "acme".into(),
                        after_cursor: 0,
                    },
                ))
                .await
                .expect("open a stream")
                .into_inner()
        }
    };
    let first = open().await;
    let _second = open().await;
    // A third call on the same connection waits for a free stream.
    let mut client = app.balances();
    let third_token = token.clone();
    let mut third = tokio::spawn(async move {
        client
            .get_balance(authed(
                &third_token,
                proto::GetBalanceRequest {
                    account_id: "acme".into(),
                },
            ))
            .await
    });
    let early = tokio::time::timeout(Duration::from_millis(500), &mut third).await;
    assert!(
        early.is_err(),
        "a third call ran beside two open streams: {early:?}"
    );
    drop(first);
    let answered = tokio::time::timeout(WAIT, third)
        .await
        .expect("the waiting call runs once a stream closes")
        .unwrap();
    assert_eq!(answered.unwrap().into_inner().balance, "1.00");
    app.stop().await;
}

fn limits_settings(limits: CallerLimitSettings) -> ServerSettings {
    ServerSettings {
        caller_limits: limits,
        ..ServerSettings::default()
    }
}

async fn open_stream(
    app: &TestApp,
    token: &str,
    account: &str,
) -> Result<tonic::Streaming<proto::WatchBalanceEventsResponse>, tonic::Status> {
    app.balances()
        .watch_balance_events(authed(
            token,
            proto::WatchBalanceEventsRequest {
                account_id: account.into(),
                after_cursor: 0,
            },
        ))
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test]
async fn a_caller_beyond_its_open_stream_limit_gets_resource_exhausted_naming_the_limit() {
    let app = spawn_app_with(limits_settings(CallerLimitSettings {
        streams_per_caller: 2,
        ..CallerLimitSettings::default()
    }))
    .await;
    app.account_with_balance("acme", "1.00").await;
    let viewer = app.keys.mint("ann", "viewer", Some("acme"), 600).unwrap();
    let first = open_stream(&app, &viewer, "acme").await.unwrap();
    let _second = open_stream(&app, &viewer, "acme").await.unwrap();
    let refused = open_stream(&app, &viewer, "acme").await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(
        refused
            .message()
            .contains("limit: 2 per token subject and account"),
        "{}",
        refused.message()
    );
    assert_eq!(
        refused.metadata().get(LIMIT_METADATA_KEY).unwrap(),
        "streams_per_caller"
    );
    // Another caller of the same account is counted apart.
    let other = app.keys.mint("bob", "viewer", Some("acme"), 600).unwrap();
    let _bobs = open_stream(&app, &other, "acme").await.unwrap();
    // A closed stream gives its slot back.
    drop(first);
    eventually(
        "the caller may open a stream again after closing one",
        || async { open_stream(&app, &viewer, "acme").await.is_ok() },
    )
    .await;
    app.stop().await;
}

#[tokio::test]
async fn streams_beyond_the_replica_limit_get_resource_exhausted_naming_the_limit() {
    let app = spawn_app_with(limits_settings(CallerLimitSettings {
        streams_per_replica: 2,
        ..CallerLimitSettings::default()
    }))
    .await;
    app.account_with_balance("acme", "1.00").await;
    let mut held = Vec::new();
    for subject in ["ann", "bob"] {
        let token = app.keys.mint(subject, "viewer", Some("acme"), 600).unwrap();
        held.push(open_stream(&app, &token, "acme").await.unwrap());
    }
    let refused = open_stream(&app, &app.service_token(), "")
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(
        refused.message().contains("limit: 2 per replica"),
        "{}",
        refused.message()
    );
    assert_eq!(
        refused.metadata().get(LIMIT_METADATA_KEY).unwrap(),
        "streams_per_replica"
    );
    drop(held);
    app.stop().await;
}

#[tokio::test]
async fn send_test_notification_is_rate_limited_per_account() {
    let app = spawn_app().await;
    app.account_with_balance("acme", "0").await;
    app.account_with_balance("initech", "0").await;
    let admin = app.token("admin", Some("acme"));
    let send = |key: String| {
        let mut client = notifications(&app);
        let admin = admin.clone();
        async move {
            client
                .send_test_notification(authed(
                    &admin,
                    proto::SendTestNotificationRequest {
                        account_id: "acme".into(),
                        idempotency_key: key,
                    },
                ))
                .await
        }
    };
    for i in 0..5 {
        send(format!("t{i}"))
            .await
            .expect("within the default 5 per hour");
    }
    let refused = send("t5".into()).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(
        refused
            .message()
            .contains("at most 5 test notifications per hour per account"),
        "{}",
        refused.message()
    );
    assert_eq!(
        refused.metadata().get(LIMIT_METADATA_KEY).unwrap(),
        "test_notifications_per_account"
    );
    assert_eq!(count_rows(&app.pool, "notifications").await, 5);
    // Another account has its own bucket.
    notifications(&app)
        .send_test_notification(authed(
            &app.token("admin", Some("initech")),
            proto::SendTestNotificationRequest {
                account_id: "initech".into(),
                idempotency_key: "t0".into(),
            },
        ))
        .await
        .expect("another account is not limited by acme's use");
    app.stop().await;
}

#[tokio::test]
async fn notification_settings_changes_are_rate_limited_per_account() {
    let app = spawn_app_with(limits_settings(CallerLimitSettings {
        settings_changes_per_hour: 3,
        ..CallerLimitSettings::default()
    }))
    .await;
    app.account_with_balance("acme", "0").await;
    let admin = app.token("admin", Some("acme"));
    let update = |recipient: &str| {
        let mut client = notifications(&app);
        let admin = admin.clone();
        let recipient = recipient.to_owned();
        async move {
            client
                .update_notification_settings(authed(
                    &admin,
                    proto::UpdateNotificationSettingsRequest {
                        account_id: "acme".into(),
                        recipients: vec![recipient],
                        enabled_kinds: vec![],
                    },
                ))
                .await
        }
    };
    // An invalid request uses up nothing.
    assert_eq!(
        update("not-an-address").await.unwrap_err().code(),
        Code::InvalidArgument
    );
    for i in 0..3 {
        update(&format!("ops{i}@acme.example")).await.unwrap();
    }
    let refused = update("spam@victim.example").await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(
        refused
            .message()
            .contains("at most 3 notification settings changes per hour per account"),
        "{}",
        refused.message()
    );
    let stored: Vec<String> = sqlx::query_scalar(
        "SELECT recipients FROM notification_settings WHERE account_id = 'acme'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(
        stored,
        vec!["ops2@acme.example"],
        "the refused change wrote nothing"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_stream_ends_unauthenticated_when_its_token_expires_and_resuming_from_its_cursor_misses_nothing()
 {
    // No leeway: the stream ends at the token's `exp`.
    let keys = std::sync::Arc::new(
        std::sync::Arc::try_unwrap(test_keys())
            .ok()
            .unwrap()
            .with_leeway_secs(0),
    );
    let app = spawn_app_with_settings_and_keys(ServerSettings::default(), keys).await;
    app.account_with_balance("acme", "100.00").await;
    let debit = |key: &'static str| {
        let mut client = app.balances();
        let token = app.service_token();
        async move {
            client
                .debit(authed(
                    &token,
                    proto::DebitRequest {
                        account_id: "acme".into(),
                        amount: "1.00".into(),
                        idempotency_key: key.into(),
                        ..Default::default()
                    },
                ))
                .await
                .expect("debit");
        }
    };
    let short_lived = app.keys.mint("ann", "viewer", Some("acme"), 2).unwrap();
    let mut stream = open_stream(&app, &short_lived, "acme").await.unwrap();
    let mut received = Vec::new();
    received.push(next(&mut stream).await.unwrap().unwrap().event.unwrap());
    debit("before-expiry").await;
    // Events until the token expires, then the end: UNAUTHENTICATED with the cursor.
    let end = loop {
        match next(&mut stream).await {
            Ok(Some(message)) => received.push(message.event.unwrap()),
            Ok(None) => panic!("the stream ended without a status"),
            Err(status) => break status,
        }
    };
    assert_eq!(end.code(), Code::Unauthenticated, "{end:?}");
    let resume: i64 = end
        .metadata()
        .get(RESUME_CURSOR_METADATA_KEY)
        .expect("the resume cursor as metadata")
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        end.message().contains(&format!("after_cursor {resume}")),
        "{}",
        end.message()
    );
    assert!(resume >= received.last().unwrap().cursor);
    // The same token is refused now, on streams as on unary calls.
    assert_eq!(
        open_stream(&app, &short_lived, "acme")
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );
    // Events committed while the client had no stream.
    for key in ["between-1", "between-2", "between-3"] {
        debit(key).await;
    }
    let fresh = app.keys.mint("ann", "viewer", Some("acme"), 600).unwrap();
    let mut resumed = app
        .balances()
        .watch_balance_events(authed(
            &fresh,
            proto::WatchBalanceEventsRequest {
                account_id: "acme".into(),
                after_cursor: resume,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let total: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM balance_events")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    while (received.len() as i64) < total {
        received.push(next(&mut resumed).await.unwrap().unwrap().event.unwrap());
    }
    let sequences: Vec<i64> = received.iter().map(|e| e.sequence).collect();
    assert_eq!(
        sequences,
        (1..=total).collect::<Vec<_>>(),
        "none lost, none twice"
    );
    assert_eq!(received.last().unwrap().balance_after, "96.00");
    drop(resumed);
    app.stop().await;
}

async fn next(
    stream: &mut tonic::Streaming<proto::WatchBalanceEventsResponse>,
) -> Result<Option<proto::WatchBalanceEventsResponse>, tonic::Status> {
    tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("a message within the wait")
}

const BAD_ADDRESSES: [&str; 4] = [
    "ops,team@a.example",
    "x<y@a.example",
    "a;b@a.example",
    "a(comment)@a.example",
];

#[tokio::test]
async fn email_addresses_the_mailer_refuses_are_invalid_argument_naming_field_and_index() {
    let app = spawn_app().await;
    app.account_with_balance("acme", "0").await;
    let admin = app.token("admin", Some("acme"));
    let before = table_counts(&app.pool).await;
    for bad in BAD_ADDRESSES {
        let error = notifications(&app)
            .update_notification_settings(authed(
                &admin,
                proto::UpdateNotificationSettingsRequest {
                    account_id: "acme".into(),
                    recipients: vec![
                        "ops@acme.example".into(),
                        "cfo@acme.example".into(),
                        bad.into(),
                    ],
                    enabled_kinds: vec![],
                },
            ))
            .await
            .unwrap_err();
        assert_eq!(error.code(), Code::InvalidArgument, "{bad}");
        assert!(
            error.message().starts_with("recipients[2]"),
            "{bad}: {}",
            error.message()
        );
        let error = app
            .balances()
            .create_account(authed(
                &app.service_token(),
                proto::CreateAccountRequest {
                    account_id: "initech".into(),
                    billing_email: bad.into(),
                    ..Default::default()
                },
            ))
            .await
            .unwrap_err();
        assert_eq!(error.code(), Code::InvalidArgument, "{bad}");
        assert!(
            error.message().starts_with("billing_email"),
            "{bad}: {}",
            error.message()
        );
    }
    assert_eq!(table_counts(&app.pool).await, before, "nothing changed");
    app.stop().await;
}

/// Notification `id` of acme, as the API lists it.
async fn listed(app: &TestApp, admin: &str, id: &str) -> proto::Notification {
    crate::notifications::list(app, admin)
        .await
        .into_iter()
        .find(|n| n.notification_id == id)
        .unwrap()
}

#[tokio::test]
async fn a_bad_stored_recipient_does_not_stop_the_others_and_is_named_in_last_error() {
    let sink = SmtpSink::start(SmtpSink::free_port());
    let app = spawn_app_with(mail_settings(SmtpSink::mailer(sink.port))).await;
    app.account_with_balance("acme", "0").await;
    // Rows stored before addresses were checked by the mailer's parser.
    let mut stored = vec!["ops@acme.example".to_owned()];
    stored.extend(BAD_ADDRESSES.iter().map(|a| a.to_string()));
    stored.push("cfo@acme.example".into());
    sqlx::query(
        "INSERT INTO notification_settings (account_id, recipients, disabled_kinds) VALUES ('acme', $1, '{}')",
    )
    .bind(&stored)
    .execute(&app.pool)
    .await
    .unwrap();
    let admin = app.token("admin", Some("acme"));
    let sent = notifications(&app)
        .send_test_notification(authed(
            &admin,
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
    eventually("the email reaches the valid recipients", || async {
        sink.messages().len() == 1
    })
    .await;
    assert_eq!(
        sink.messages()[0].envelope_to,
        "ops@acme.example, cfo@acme.example"
    );
    eventually("the notification is marked sent", || async {
        listed(&app, &admin, &sent.notification_id).await.status == NotificationStatus::Sent as i32
    })
    .await;
    let notification = listed(&app, &admin, &sent.notification_id).await;
    for (index, bad) in BAD_ADDRESSES.iter().enumerate() {
        let named = format!("recipients[{}]: {bad:?}", index + 1);
        assert!(
            notification.last_error.contains(&named),
            "{named} in {:?}",
            notification.last_error
        );
    }
    assert!(!notification.last_error.contains("ops@acme.example"));
    app.stop().await;
}

#[tokio::test]
async fn a_stored_list_of_only_bad_recipients_fails_at_once_naming_them() {
    let sink = SmtpSink::start(SmtpSink::free_port());
    let app = spawn_app_with(mail_settings(SmtpSink::mailer(sink.port))).await;
    app.account_with_balance("acme", "0").await;
    sqlx::query(
        "INSERT INTO notification_settings (account_id, recipients, disabled_kinds) VALUES ('acme', $1, '{}')",
    )
    .bind(vec!["x<y@a.example".to_owned()])
    .execute(&app.pool)
    .await
    .unwrap();
    notifications(&app)
        .send_test_notification(authed(
            &app.token("admin", Some("acme")),
            proto::SendTestNotificationRequest {
                account_id: "acme".into(),
                idempotency_key: "t1".into(),
            },
        ))
        .await
        .unwrap();
    eventually("the notification fails for good", || async {
        let row: Option<(String, Option<String>)> =
            sqlx::query_as("SELECT status, last_error FROM notifications")
                .fetch_optional(&app.pool)
                .await
                .unwrap();
        matches!(row, Some((status, Some(error))) if status == "failed" && error.contains("recipients[0]"))
    })
    .await;
    assert!(sink.messages().is_empty());
    app.stop().await;
}

/// A feed and a shared reader of its own on `app`'s database (the server
/// has its own; these are what the tests below look into).
fn own_hub(app: &TestApp, settings: HubSettings) -> (EventFeed, EventHub) {
    let feed = EventFeed::start(app.pool.clone(), FeedSettings::default());
    let hub = EventHub::start(&feed, settings);
    (feed, hub)
}

async fn debits(app: &TestApp, account: &str, count: usize, prefix: &str) {
    let token = app.service_token();
    for i in 0..count {
        app.balances()
            .debit(authed(
                &token,
                proto::DebitRequest {
                    account_id: account.into(),
                    amount: "0.01".into(),
                    idempotency_key: format!("{prefix}-{i}"),
                    ..Default::default()
                },
            ))
            .await
            .expect("debit");
    }
}

#[tokio::test]
async fn a_stream_of_a_quiet_account_is_never_woken_or_queried() {
    let app = spawn_app().await;
    app.account_with_balance("busy", "100.00").await;
    app.account_with_balance("quiet", "0").await;
    let (feed, hub) = own_hub(&app, HubSettings::default());
    let settings = events::WatchSettings::default();
    let account = |id: &str| EventFilter::Account(AccountId::parse(id).unwrap());
    let quiet = events::watch(&hub, account("quiet"), 0, &settings, None);
    let mut busy = events::watch(&hub, account("busy"), 0, &settings, None);
    debits(&app, "busy", 20, "d").await;
    for sequence in 1..=21 {
        let event = tokio::time::timeout(WAIT, busy.events.recv())
            .await
            .expect("the busy stream's events within the wait")
            .expect("the busy stream stays open");
        assert_eq!(event.sequence, sequence);
    }
    // The busy stream was handed its events by the shared reader...
    assert!(
        busy.stats
            .wakeups
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );
    // ...while the quiet one was never woken, and queried at most its catch-up.
    assert_eq!(
        quiet
            .stats
            .wakeups
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    assert!(quiet.stats.reads.load(std::sync::atomic::Ordering::Relaxed) <= 1);
    assert!(quiet.events.is_empty());
    feed.stop();
    app.stop().await;
}

#[tokio::test]
async fn a_slow_consumer_falls_behind_the_shared_reader_and_misses_nothing() {
    let app = spawn_app().await;
    app.account_with_balance("acme", "100.00").await;
    // Tiny buffers: the consumer below overflows them at once.
    let (feed, hub) = own_hub(
        &app,
        HubSettings {
            batch_size: 2,
            stream_buffer_batches: 1,
        },
    );
    let settings = events::WatchSettings {
        buffer: 1,
        batch_size: 3,
        stall_timeout: Duration::from_secs(3600),
    };
    let filter = EventFilter::Account(AccountId::parse("acme").unwrap());
    let mut slow = events::watch(&hub, filter, 0, &settings, None);
    // Nobody reads while 30 debits commit.
    debits(&app, "acme", 30, "d").await;
    let mut received = Vec::new();
    while received.len() < 31 {
        let event = tokio::time::timeout(WAIT, slow.events.recv())
            .await
            .expect("the next event within the wait")
            .expect("the stream stays open");
        received.push(event);
    }
    let sequences: Vec<i64> = received.iter().map(|e| e.sequence).collect();
    assert_eq!(sequences, (1..=31).collect::<Vec<_>>());
    assert!(
        slow.stats
            .lag_recoveries
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1,
        "the stream fell behind the shared reader"
    );
    // It rejoined the shared reader: a new event comes live.
    debits(&app, "acme", 1, "after").await;
    let event = tokio::time::timeout(WAIT, slow.events.recv())
        .await
        .expect("the live event within the wait")
        .unwrap();
    assert_eq!(event.sequence, 32);
    feed.stop();
    app.stop().await;
}

#[tokio::test]
async fn over_tls_the_handshake_timeout_closes_a_stalled_handshake_and_clients_still_connect() {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let cert = std::fs::read(fixtures.join("grpc-tls-cert.pem")).unwrap();
    let key = std::fs::read(fixtures.join("grpc-tls-key.pem")).unwrap();
    let ca = std::fs::read(fixtures.join("grpc-tls-ca.pem")).unwrap();
    let (pool, _) = crate::helpers::fresh_database().await;
    let database = sqlx::PgPool::connect_options(&pool)
        .get_database()
        .map(str::to_owned);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(billing::server::serve(
        listener,
        pool.clone(),
        test_keys(),
        ServerSettings {
            tls: Some(ServerTlsConfig::new().identity(Identity::from_pem(&cert, &key))),
            transport: TransportLimits {
                handshake_timeout: Duration::from_millis(500),
                ..TransportLimits::default()
            },
            ..ServerSettings::default()
        },
        async {
            let _ = stopped.await;
        },
    ));
    // A TLS client gets through the limited listener.
    let channel = Channel::from_shared(format!("https://localhost:{}", address.port()))
        .unwrap()
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(&ca))
                .domain_name("localhost"),
        )
        .unwrap()
        .connect()
        .await
        .expect("a TLS client connects");
    tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("a health check over TLS");
    // A handshake that starts (a record header announcing a ClientHello)
    // and never finishes is closed by the TLS handshake timeout.
    let mut stalled = TcpStream::connect(address).await.unwrap();
    let mut opening = vec![0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc];
    opening.resize(40, 0x03);
    tokio::io::AsyncWriteExt::write_all(&mut stalled, &opening)
        .await
        .unwrap();
    closed_by_server(&mut stalled, "a TLS handshake that never finishes").await;
    let _ = stop.send(());
    tokio::time::timeout(WAIT, server)
        .await
        .expect("the server stops")
        .unwrap()
        .unwrap();
    pool.close().await;
    if let Some(name) = database {
        crate::helpers::drop_database(&name);
    }
}
