//! The guarantees, checked against the database, the sandbox gateway's own
//! records, the SMTP server's mailbox and the event stream.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use billing::proto;
use rust_decimal::Decimal;
use sqlx::PgPool;
use tokio_stream::StreamExt;
use tonic::transport::Channel;

use crate::driver::{SettingsChange, authed};
use crate::harness::Sink;

#[derive(Default)]
pub struct Report {
    pub violations: Vec<String>,
    pub invariants_checked: u64,
    pub entries: i64,
    pub top_ups: i64,
    pub emails: usize,
    pub resent_after_kill: usize,
}

impl Report {
    fn check(&mut self, what: &str, offenders: Vec<String>) {
        self.invariants_checked += 1;
        for offender in offenders {
            self.violations.push(format!("{what}: {offender}"));
        }
    }
}

async fn strings(pool: &PgPool, sql: &'static str) -> Vec<String> {
    sqlx::query_scalar::<_, String>(sql)
        .fetch_all(pool)
        .await
        .unwrap()
}

/// Waits until no top-up, email or decision is still in flight.
pub async fn wait_until_quiet(pool: &PgPool, limit: Duration) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    loop {
        let open: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM top_ups WHERE status IN ('PENDING', 'UNKNOWN', 'RETRY_SCHEDULED')")
            .fetch_one(pool)
            .await
            .unwrap_or(1);
        let pending: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM notifications WHERE status = 'pending'")
                .fetch_one(pool)
                .await
                .unwrap_or(1);
        let behind: bool = sqlx::query_scalar(
            "SELECT COALESCE((SELECT cursor FROM event_subscribers WHERE name = 'balance-policy'), 0) < COALESCE((SELECT MAX(cursor) FROM balance_events), 0)",
        )
        .fetch_one(pool)
        .await
        .unwrap_or(true);
        if open == 0 && pending == 0 && !behind {
            return Ok(());
        }
        if Instant::now() > deadline {
            let open_ones: Vec<String> = sqlx::query_scalar(
                "SELECT t.top_up_id || ' ' || t.trigger || ' ' || t.status || ' rounds ' || t.rounds \
                        || ' attempts ' || (SELECT COUNT(*) FROM top_up_attempts a WHERE a.top_up_id = t.top_up_id) \
                        || ' lease ' || COALESCE(t.lease_until::text, '-') \
                   FROM top_ups t WHERE t.status IN ('PENDING', 'UNKNOWN', 'RETRY_SCHEDULED')",
            )
            .fetch_all(pool)
            .await
            .unwrap_or_default();
            return Err(format!(
                "{open} top-ups open ({}), {pending} emails pending, decisions behind: {behind}",
                open_ones.join("; ")
            ));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

pub async fn run_all(
    pool: &PgPool,
    channel: &Channel,
    service_token: &str,
    sink: &Sink,
    kill_times: &[std::time::SystemTime],
    settings_changes: &[SettingsChange],
) -> Report {
    let mut report = Report {
        entries: sqlx::query_scalar("SELECT COUNT(*) FROM ledger_entries")
            .fetch_one(pool)
            .await
            .unwrap(),
        top_ups: sqlx::query_scalar("SELECT COUNT(*) FROM top_ups")
            .fetch_one(pool)
            .await
            .unwrap(),
        ..Report::default()
    };

    report.check(
        "balance == sum(ledger) and version == entries",
        strings(
            pool,
            "SELECT a.account_id FROM accounts a LEFT JOIN ledger_entries e ON e.account_id = a.account_id \
              GROUP BY a.account_id, a.balance, a.version \
             HAVING a.balance <> COALESCE(SUM(e.amount), 0) OR a.version <> COUNT(e.entry_id)",
        )
        .await,
    );
    report.check(
        "per-account event sequence gapless",
        strings(
            pool,
            "SELECT a.account_id FROM accounts a LEFT JOIN balance_events v ON v.account_id = a.account_id \
              GROUP BY a.account_id, a.version \
             HAVING COUNT(v.cursor) <> a.version OR COALESCE(MAX(v.sequence), 0) <> a.version",
        )
        .await,
    );
    report.check(
        "every successful gateway charge has a ledger credit",
        strings(
            pool,
            "SELECT c.idempotency_key FROM sandbox_charges c WHERE c.outcome = 'succeeded' AND NOT EXISTS ( \
               SELECT 1 FROM top_up_attempts a JOIN top_ups t ON t.top_up_id = a.top_up_id \
                 JOIN ledger_entries e ON e.account_id = t.account_id AND e.idempotency_key = 'top-up ' || a.top_up_id \
                WHERE a.gateway_idempotency_key = c.idempotency_key)",
        )
        .await,
    );
    report.check(
        "no ledger credit without a successful charge",
        strings(
            pool,
            "SELECT e.idempotency_key FROM ledger_entries e WHERE e.kind = 'top_up' AND NOT EXISTS ( \
               SELECT 1 FROM top_up_attempts a JOIN sandbox_charges c ON c.idempotency_key = a.gateway_idempotency_key \
                WHERE c.outcome = 'succeeded' AND e.idempotency_key = 'top-up ' || a.top_up_id)",
        )
        .await,
    );
    report.check(
        "no top-up charged twice",
        strings(
            pool,
            "SELECT a.top_up_id FROM top_up_attempts a JOIN sandbox_charges c ON c.idempotency_key = a.gateway_idempotency_key \
              WHERE c.outcome = 'succeeded' GROUP BY a.top_up_id HAVING COUNT(*) > 1",
        )
        .await,
    );
    report.check(
        "no idempotent request took effect twice",
        strings(
            pool,
            "SELECT account_id || '/' || idempotency_key FROM ledger_entries \
              GROUP BY account_id, idempotency_key HAVING COUNT(*) > 1",
        )
        .await,
    );
    report.check(
        "at most one open automatic top-up per account",
        strings(
            pool,
            "SELECT account_id FROM top_ups WHERE trigger = 'AUTOMATIC' \
                AND status IN ('PENDING', 'RETRY_SCHEDULED', 'UNKNOWN') \
              GROUP BY account_id HAVING COUNT(*) > 1",
        )
        .await,
    );
    report.check(
        "no automatic charge while auto refill is off",
        charged_while_auto_refill_off(pool, settings_changes).await,
    );
    report.check(
        "automatic top-ups of an account never overlap",
        strings(
            pool,
            "SELECT top_up_id FROM ( \
               SELECT top_up_id, created_at, status, \
                      LAG(updated_at) OVER (PARTITION BY account_id ORDER BY created_at) AS previous_end \
                 FROM top_ups WHERE trigger = 'AUTOMATIC' AND status <> 'CAP_REACHED') t \
              WHERE previous_end > created_at",
        )
        .await,
    );

    // Every notification delivered exactly once, and nothing else delivered.
    let received = sink.received();
    report.emails = received.len();
    let mut by_id: HashMap<String, usize> = HashMap::new();
    let mut first_seen: HashMap<String, std::time::SystemTime> = HashMap::new();
    for message in &received {
        let id = message
            .message_id
            .trim_start_matches('<')
            .trim_end_matches('>')
            .trim_end_matches("@billing")
            .to_owned();
        *by_id.entry(id.clone()).or_default() += 1;
        let first = first_seen.entry(id).or_insert(message.at);
        *first = (*first).min(message.at);
    }
    // SMTP cannot close this window: a sender killed (kill -9) after the
    // server accepted a message but before the outbox row was marked sent
    // sends it again after its claim expires. Such a copy is counted, not a
    // violation, only when a kill happened within a second of the first copy.
    let killed_near = |at: std::time::SystemTime| {
        kill_times.iter().any(|kill| {
            let gap = kill.duration_since(at).unwrap_or_else(|e| e.duration());
            gap <= Duration::from_secs(1)
        })
    };
    let rows: Vec<(uuid::Uuid, String)> =
        sqlx::query_as("SELECT notification_id, status FROM notifications")
            .fetch_all(pool)
            .await
            .unwrap();
    let mut offenders = Vec::new();
    for (id, status) in &rows {
        let key = id.to_string();
        let count = by_id.remove(&key).unwrap_or(0);
        if status == "sent" && count == 2 && first_seen.get(&key).is_some_and(|at| killed_near(*at))
        {
            report.resent_after_kill += 1;
            continue;
        }
        if status != "sent" || count != 1 {
            offenders.push(format!("{id} is {status} and was delivered {count} times"));
        }
    }
    offenders.extend(
        by_id
            .keys()
            .map(|id| format!("{id} delivered but not in the outbox")),
    );
    report.check("every notification delivered exactly once", offenders);

    // The event stream, replayed from the start, equals the ledger.
    let ledger: Vec<(String, uuid::Uuid, Decimal, Decimal)> = sqlx::query_as(
        "SELECT account_id, transaction_id, amount, balance_after FROM ledger_entries ORDER BY account_id, entry_id",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let mut stream = proto::balances_client::BalancesClient::new(channel.clone())
        .watch_balance_events(authed(
            service_token,
            proto::WatchBalanceEventsRequest {
                account_id: String::new(),
                after_cursor: 0,
            },
        ))
        .await
        .expect("watch every account")
        .into_inner();
    let mut events = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while events.len() < ledger.len() && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(5), stream.next()).await {
            Ok(Some(Ok(message))) => events.push(message.event.unwrap()),
            _ => break,
        }
    }
    events.sort_by(|a, b| {
        (a.account_id.as_str(), a.sequence).cmp(&(b.account_id.as_str(), b.sequence))
    });
    let replayed: Vec<(String, String, Decimal, Decimal)> = events
        .iter()
        .map(|e| {
            (
                e.account_id.clone(),
                e.transaction_id.clone(),
                e.amount.parse().unwrap(),
                e.balance_after.parse().unwrap(),
            )
        })
        .collect();
    let expected: Vec<(String, String, Decimal, Decimal)> = ledger
        .into_iter()
        .map(|(a, t, amount, balance)| (a, t.to_string(), amount, balance))
        .collect();
    let mut offenders = Vec::new();
    if replayed != expected {
        offenders.push(format!(
            "{} events replayed, {} ledger entries; first difference at {:?}",
            replayed.len(),
            expected.len(),
            replayed.iter().zip(&expected).position(|(a, b)| a != b)
        ));
    }
    report.check(
        "event stream replayed from the start equals the ledger",
        offenders,
    );
    report
}

/// Automatic attempts made at a moment when auto refill was known to be off:
/// after an "off" Apply was answered, with no other Apply of the account in
/// flight or answered since (an attempt begun before the Apply committed
/// is mid-charge, which the rule allows).
async fn charged_while_auto_refill_off(pool: &PgPool, changes: &[SettingsChange]) -> Vec<String> {
    let attempts: Vec<(String, String, i32, chrono::DateTime<chrono::Utc>)> = sqlx::query_as(
        "SELECT t.account_id, a.top_up_id, a.attempt_number, a.attempted_at FROM top_up_attempts a \
           JOIN top_ups t ON t.top_up_id = a.top_up_id WHERE t.trigger = 'AUTOMATIC'",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let mut offenders = Vec::new();
    for (account, top_up_id, number, attempted_at) in attempts {
        let at: std::time::SystemTime = attempted_at.into();
        let known_off = changes.iter().any(|off| {
            off.account == account
                && !off.auto_refill
                && off.answered.is_some_and(|answered| answered < at)
                && changes.iter().all(|other| {
                    std::ptr::eq(other, off)
                        || other.account != account
                        || !other.applied
                        || other.sent > at
                        || other.answered.is_some_and(|answered| answered < off.sent)
                })
        });
        if known_off {
            offenders.push(format!(
                "{account}: {top_up_id} attempt {number} at {attempted_at}"
            ));
        }
    }
    offenders
}
