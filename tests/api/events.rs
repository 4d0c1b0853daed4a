//! WatchBalanceEvents: replay then live, reconnects, the global cursor over
//! out-of-order commits, slow readers, two replicas, input checks.

use std::collections::BTreeMap;
use std::time::Duration;

use billing::auth::{Caller, Role};
use billing::events::FeedSettings;
use billing::ids::{AccountId, IdempotencyKey};
use billing::ledger::{self, EntryKind, Posting};
use billing::proto::{self, BalanceEventKind};
use billing::server::ServerSettings;
use rust_decimal::Decimal;
use tonic::Code;
use tonic::Streaming;

use crate::helpers::{TestApp, authed, fresh_database, spawn_app, spawn_app_on};

/// Generous: events normally arrive in milliseconds.
const WAIT: Duration = Duration::from_secs(10);

type EventStream = Streaming<proto::WatchBalanceEventsResponse>;

async fn watch(app: &TestApp, account: &str, after_cursor: i64) -> EventStream {
    app.balances()
        .watch_balance_events(authed(
            &app.service_token(),
            proto::WatchBalanceEventsRequest {
                account_id: account.into(),
                after_cursor,
            },
        ))
        .await
        .expect("open the event stream")
        .into_inner()
}

async fn next_event(stream: &mut EventStream) -> proto::BalanceEvent {
    tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("an event within the timeout")
        .expect("the stream stays healthy")
        .expect("the stream stays open")
        .event
        .expect("the response carries an event")
}

async fn next_events(stream: &mut EventStream, count: usize) -> Vec<proto::BalanceEvent> {
    let mut events = Vec::with_capacity(count);
    for _ in 0..count {
        events.push(next_event(stream).await);
    }
    events
}

/// A replica whose feed polls once an hour: only an announcement from
/// another replica wakes it.
async fn replica_that_hardly_polls(pool: sqlx::PgPool) -> TestApp {
    spawn_app_on(
        pool,
        ServerSettings {
            events: FeedSettings {
                poll_interval: Duration::from_secs(3600),
                ..FeedSettings::default()
            },
            ..ServerSettings::default()
        },
    )
    .await
}

async fn debit(app: &TestApp, account: &str, amount: &str, key: &str) {
    app.balances()
        .debit(authed(
            &app.service_token(),
            proto::DebitRequest {
                account_id: account.into(),
                amount: amount.into(),
                idempotency_key: key.into(),
                ..Default::default()
            },
        ))
        .await
        .expect("debit");
}

fn assert_gapless(events: &[proto::BalanceEvent], first_sequence: i64) {
    for (offset, event) in events.iter().enumerate() {
        assert_eq!(event.sequence, first_sequence + offset as i64, "{event:?}");
    }
    for pair in events.windows(2) {
        assert!(pair[0].cursor < pair[1].cursor, "{pair:?}");
    }
}

#[tokio::test]
async fn events_after_a_cursor_are_replayed_then_new_debits_arrive_live_in_order() {
    let app = spawn_app().await;
    app.account_with_balance("acme", "100.00").await;
    for i in 0..3 {
        debit(&app, "acme", "1.25", &format!("before-{i}")).await;
    }
    let mut from_start = watch(&app, "acme", 0).await;
    let history = next_events(&mut from_start, 4).await;
    assert_gapless(&history, 1);
    assert_eq!(history[0].kind, BalanceEventKind::Credited as i32);
    assert_eq!(history[0].amount, "100.00");
    assert_eq!(history[1].kind, BalanceEventKind::Debited as i32);
    assert_eq!(history[1].amount, "-1.25");
    assert_eq!(history[1].balance_after, "98.75");
    assert_eq!(history[1].total_balance_after, "98.75");
    assert_eq!(history[1].currency, "USD");
    assert_eq!(history[1].account_id, "acme");
    drop(from_start);

    let mut stream = watch(&app, "acme", history[1].cursor).await;
    let replayed = next_events(&mut stream, 2).await;
    assert_eq!(replayed, history[2..].to_vec());
    for i in 0..3 {
        debit(&app, "acme", "0.0035", &format!("live-{i}")).await;
    }
    let live = next_events(&mut stream, 3).await;
    assert_gapless(&live, 5);
    assert!(live[0].cursor > replayed[1].cursor);
    assert_eq!(live[2].amount, "-0.0035");
    assert_eq!(live[2].balance_after, "96.2395");
    drop(stream);
    app.stop().await;
}

#[tokio::test]
async fn a_client_that_reconnects_with_its_last_cursor_misses_nothing_and_sees_nothing_twice() {
    let app = spawn_app().await;
    app.account_with_balance("acme", "100.00").await;
    let writer_app = app.balances();
    let token = app.service_token();
    let writer = tokio::spawn(async move {
        let mut client = writer_app;
        for i in 0..40 {
            client
                .debit(authed(
                    &token,
                    proto::DebitRequest {
                        account_id: "acme".into(),
                        amount: "0.10".into(),
                        idempotency_key: format!("d-{i}"),
                        ..Default::default()
                    },
                ))
                .await
                .expect("debit");
        }
    });
    let mut received = Vec::new();
    let mut stream = watch(&app, "acme", 0).await;
    received.extend(next_events(&mut stream, 15).await);
    drop(stream);
    let mut stream = watch(&app, "acme", received.last().unwrap().cursor).await;
    received.extend(next_events(&mut stream, 10).await);
    drop(stream);
    let mut stream = watch(&app, "acme", received.last().unwrap().cursor).await;
    received.extend(next_events(&mut stream, 16).await);
    writer.await.unwrap();
    assert_gapless(&received, 1);
    assert_eq!(received.last().unwrap().balance_after, "96.00");
    drop(stream);
    app.stop().await;
}

fn service_caller() -> Caller {
    Caller {
        subject: "test".into(),
        account: None,
        roles: vec![Role::Service],
        trace_id: None,
        engine: false,
    }
}

fn posting(account: &str, key: &str) -> Posting {
    Posting {
        account_id: AccountId::parse(account).unwrap(),
        kind: EntryKind::Usage,
        amount: Decimal::new(1, 0),
        idempotency_key: IdempotencyKey::parse(key).unwrap(),
        description: String::new(),
        metadata: BTreeMap::new(),
        allow_overdraft: false,
    }
}

#[tokio::test]
async fn a_lower_cursor_committed_after_a_higher_one_is_delivered_first_and_never_skipped() {
    let app = spawn_app().await;
    app.account_with_balance("early", "10.00").await;
    app.account_with_balance("late", "10.00").await;
    let mut stream = watch(&app, "", 0).await;
    let openings = next_events(&mut stream, 2).await;

    // `older` takes its transaction id first; `younger` takes a higher id
    // but the LOWER cursor. A reader that trusted "writer id below xmin"
    // would deliver older's cursor while younger's lower one is pending.
    let mut older = app.pool.begin().await.unwrap();
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(&mut *older)
        .await
        .unwrap();
    let mut younger = app.pool.begin().await.unwrap();
    let lower =
        ledger::post_in_transaction(&mut younger, &service_caller(), &posting("early", "y"))
            .await
            .unwrap();
    let higher = ledger::post_in_transaction(&mut older, &service_caller(), &posting("late", "o"))
        .await
        .unwrap();
    older.commit().await.unwrap();

    // The higher cursor is committed, the lower one is not: nothing may be delivered.
    let early = tokio::time::timeout(Duration::from_millis(1500), stream.message()).await;
    assert!(
        early.is_err(),
        "delivered before the lower cursor committed: {early:?}"
    );

    younger.commit().await.unwrap();
    let delivered = next_events(&mut stream, 2).await;
    assert_eq!(delivered[0].account_id, "early");
    assert_eq!(
        delivered[0].transaction_id,
        lower.entry.transaction_id.to_string()
    );
    assert_eq!(delivered[1].account_id, "late");
    assert_eq!(
        delivered[1].transaction_id,
        higher.entry.transaction_id.to_string()
    );
    assert!(openings[1].cursor < delivered[0].cursor);
    assert!(delivered[0].cursor < delivered[1].cursor);
    drop(stream);
    app.stop().await;
}

#[tokio::test]
async fn a_stream_client_that_stops_reading_does_not_slow_debits() {
    let app = spawn_app().await;
    app.account_with_balance("acme", "1000.00").await;
    let stalled = watch(&app, "acme", 0).await;
    let mut reader = watch(&app, "", 0).await;
    for i in 0..300 {
        debit(&app, "acme", "0.01", &format!("d-{i}")).await;
    }
    let received = next_events(&mut reader, 301).await;
    assert_gapless(&received, 1);
    assert_eq!(received.last().unwrap().balance_after, "997.00");
    drop(stalled);
    drop(reader);
    app.stop().await;
}

#[tokio::test]
async fn a_debit_through_one_server_reaches_a_subscriber_of_another() {
    let (pool, _) = fresh_database().await;
    let first = spawn_app_on(pool.clone(), ServerSettings::default()).await;
    // No polling to speak of: only the notification between replicas wakes it.
    let second = replica_that_hardly_polls(pool).await;
    first.account_with_balance("acme", "5.00").await;
    let mut stream = watch(&second, "acme", 0).await;
    assert_eq!(next_event(&mut stream).await.amount, "5.00");
    debit(&first, "acme", "2.00", "through-first").await;
    let event = next_event(&mut stream).await;
    assert_eq!(event.sequence, 2);
    assert_eq!(event.balance_after, "3.00");
    drop(stream);
    first.stop().await;
    second.stop().await;
}

/// A cursor no event ever had (another database's, a typo) is refused: the
/// stream waited silently until events reached it.
#[tokio::test]
async fn an_after_cursor_beyond_the_newest_issued_is_refused_and_the_newest_is_not() {
    let app = spawn_app().await;
    app.account_with_balance("acme", "5.00").await;
    let watch = |after_cursor| {
        let mut balances = app.balances();
        let request = authed(
            &app.service_token(),
            proto::WatchBalanceEventsRequest {
                account_id: "".into(),
                after_cursor,
            },
        );
        async move { balances.watch_balance_events(request).await }
    };
    let newest: i64 = sqlx::query_scalar("SELECT max(cursor) FROM balance_events")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    let error = watch(newest + 1_000_000).await.unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument);
    assert!(
        error.message().starts_with("after_cursor"),
        "{}",
        error.message()
    );
    assert!(watch(newest).await.is_ok());
    app.stop().await;
}

#[tokio::test]
async fn a_negative_after_cursor_or_an_unknown_account_is_refused() {
    let app = spawn_app().await;
    let error = app
        .balances()
        .watch_balance_events(authed(
            &app.service_token(),
            proto::WatchBalanceEventsRequest {
                account_id: "".into(),
                after_cursor: -1,
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument);
    assert!(
        error.message().starts_with("after_cursor"),
        "{}",
        error.message()
    );
    let error = app
        .balances()
        .watch_balance_events(authed(
            &app.service_token(),
            proto::WatchBalanceEventsRequest {
                account_id: "nobody".into(),
                after_cursor: 0,
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::NotFound);
    app.stop().await;
}

#[tokio::test]
async fn streams_end_with_a_resume_cursor_when_the_server_stops() {
    let app = spawn_app().await;
    app.account_with_balance("acme", "5.00").await;
    let mut stream = watch(&app, "acme", 0).await;
    let event = next_event(&mut stream).await;
    let stopping = tokio::spawn(app.stop());
    let end = tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("the stream ends");
    match end {
        Err(status) => {
            assert_eq!(status.code(), Code::Unavailable);
            assert!(
                status
                    .message()
                    .contains(&format!("after_cursor {}", event.cursor)),
                "{}",
                status.message()
            );
        }
        Ok(None) => {}
        Ok(Some(more)) => panic!("unexpected event {more:?}"),
    }
    tokio::time::timeout(WAIT, stopping)
        .await
        .expect("the server stops")
        .unwrap();
}

#[tokio::test]
async fn a_stream_outlives_the_request_timeout() {
    // Long enough for the unary calls below on a loaded machine.
    let request_timeout = Duration::from_secs(1);
    let app = crate::helpers::spawn_app_with(ServerSettings {
        request_timeout,
        ..ServerSettings::default()
    })
    .await;
    app.account_with_balance("acme", "5.00").await;
    let mut stream = watch(&app, "acme", 0).await;
    assert_eq!(next_event(&mut stream).await.sequence, 1);
    // Arrange an idle stream older than the timeout (not synchronization).
    tokio::time::sleep(request_timeout * 2).await;
    debit(&app, "acme", "1.00", "late").await;
    assert_eq!(next_event(&mut stream).await.sequence, 2);
    drop(stream);
    app.stop().await;
}

/// Non-internal triggers whose function sends a notification.
async fn notifying_triggers(pool: &sqlx::PgPool) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT c.relname || '.' || t.tgname FROM pg_trigger t \
           JOIN pg_proc p ON p.oid = t.tgfoid JOIN pg_class c ON c.oid = t.tgrelid \
          WHERE NOT t.tgisinternal AND p.prosrc ILIKE '%notify%'",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn no_writing_transaction_notifies_yet_events_committed_on_one_replica_reach_a_stream_on_another()
 {
    let (pool, _) = fresh_database().await;
    assert_eq!(
        notifying_triggers(&pool).await,
        Vec::<String>::new(),
        "no trigger notifies inside a writing transaction"
    );
    let writer = spawn_app_on(pool.clone(), ServerSettings::default()).await;
    // No polling to speak of: only the writer's announcement wakes this replica.
    let reader = replica_that_hardly_polls(pool).await;
    // A credit and a debit (the two write paths), each committed on the writer.
    writer.account_with_balance("acme", "5.00").await;
    let mut stream = watch(&reader, "acme", 0).await;
    assert_eq!(next_event(&mut stream).await.amount, "5.00");
    debit(&writer, "acme", "2.00", "through-the-writer").await;
    let event = next_event(&mut stream).await;
    assert_eq!((event.sequence, event.balance_after.as_str()), (2, "3.00"));
    drop(stream);
    writer.stop().await;
    reader.stop().await;
}

#[tokio::test]
async fn a_replica_that_receives_no_notification_still_delivers_events_by_polling() {
    let app = crate::helpers::spawn_app_with(ServerSettings {
        events: FeedSettings {
            poll_interval: Duration::from_millis(200),
            ..FeedSettings::default()
        },
        ..ServerSettings::default()
    })
    .await;
    app.account_with_balance("acme", "5.00").await;
    let mut stream = watch(&app, "acme", 0).await;
    assert_eq!(next_event(&mut stream).await.sequence, 1);
    // A writer whose announcement never comes (lost, or a tool that sends
    // none): it commits straight to the database, waking no feed anywhere.
    ledger::post(&app.pool, &service_caller(), posting("acme", "silent"))
        .await
        .unwrap();
    let event = next_event(&mut stream).await;
    assert_eq!((event.sequence, event.balance_after.as_str()), (2, "4.00"));
    drop(stream);
    app.stop().await;
}

#[tokio::test]
async fn a_transaction_left_open_in_another_database_does_not_hold_back_the_events() {
    let app = spawn_app().await;
    app.account_with_balance("acme", "5.00").await;
    let mut stream = watch(&app, "acme", 0).await;
    assert_eq!(next_event(&mut stream).await.sequence, 1);

    // Another database of the same cluster: a transaction that holds an id
    // (so the cluster-wide xmin stays below every later id) and stays open.
    let (other, options) = fresh_database().await;
    let mut long = other.begin().await.unwrap();
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(&mut *long)
        .await
        .unwrap();

    debit(&app, "acme", "1.00", "while-another-database-is-busy").await;
    let event = next_event(&mut stream).await;
    assert_eq!((event.sequence, event.balance_after.as_str()), (2, "4.00"));
    // Still open: it was not its end that let the event through.
    sqlx::query("SELECT 1").execute(&mut *long).await.unwrap();

    long.rollback().await.unwrap();
    other.close().await;
    crate::helpers::drop_database(options.get_database().unwrap());
    drop(stream);
    app.stop().await;
}
