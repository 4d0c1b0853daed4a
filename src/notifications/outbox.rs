//! The outbox table: enqueueing a message in the deciding transaction, and
//! reading what was sent.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool, Row, postgres::PgRow};
use uuid::Uuid;

use super::messages::Notice;
use super::{NotificationKind, settings};
use crate::error::BillingError;
use crate::ids::AccountId;
use crate::ledger;
use crate::paging::Page;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotificationStatus {
    Pending,
    Sent,
    Failed,
}

impl NotificationStatus {
    fn parse(text: &str) -> NotificationStatus {
        match text {
            "sent" => NotificationStatus::Sent,
            "failed" => NotificationStatus::Failed,
            _ => NotificationStatus::Pending,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Notification {
    pub seq: i64,
    pub notification_id: Uuid,
    pub account_id: String,
    pub kind: NotificationKind,
    pub dedupe_key: String,
    pub recipients: Vec<String>,
    pub subject: String,
    pub body_text: String,
    pub status: NotificationStatus,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub sent_at: Option<DateTime<Utc>>,
    pub next_attempt_at: DateTime<Utc>,
}

/// Writes one outbox row for `notice` inside the caller's transaction, unless
/// the kind is switched off or nobody would receive it. The same
/// `dedupe_key` twice yields the first row again, never a second message.
///
/// The key is scoped by `account_id` and the notice's kind at the source:
/// the unique constraint and the lookup both match them, so the same text
/// on another account is another key and another account's row is never
/// returned. Keys built from parts should come from [`dedupe_key`].
pub async fn enqueue(
    connection: &mut PgConnection,
    account_id: &str,
    notice: &Notice,
    dedupe_key: &str,
) -> Result<Option<Notification>, BillingError> {
    let settings = settings::load(connection, account_id).await?;
    let kind = notice.kind();
    if !settings.sends(kind) {
        tracing::debug!(
            account_id,
            kind = kind.as_str(),
            "notification kind switched off"
        );
        return Ok(None);
    }
    let recipients = settings.effective_recipients();
    if recipients.is_empty() {
        tracing::warn!(
            account_id,
            kind = kind.as_str(),
            "no recipient for notification"
        );
        return Ok(None);
    }
    let account = ledger::load_account(connection, account_id).await?;
    let (subject, body) = notice.render(&account);
    let inserted = sqlx::query(
        "INSERT INTO notifications (notification_id, account_id, kind, dedupe_key, recipients, subject, body_text) \
         VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (account_id, kind, dedupe_key) DO NOTHING \
         RETURNING seq, notification_id, account_id, kind, dedupe_key, recipients, subject, body_text, status, \
                   attempts, last_error, created_at, sent_at, next_attempt_at",
    )
    .bind(Uuid::now_v7())
    .bind(account_id)
    .bind(kind.as_str())
    .bind(dedupe_key)
    .bind(&recipients)
    .bind(&subject)
    .bind(&body)
    .fetch_optional(&mut *connection)
    .await?;
    let row = match inserted {
        Some(row) => {
            tracing::info!(account_id, kind = kind.as_str(), dedupe_key, "notification queued");
            row
        }
        None => {
            sqlx::query(
                "SELECT seq, notification_id, account_id, kind, dedupe_key, recipients, subject, body_text, status, \
                        attempts, last_error, created_at, sent_at, next_attempt_at \
                   FROM notifications WHERE account_id = $1 AND kind = $2 AND dedupe_key = $3",
            )
            .bind(account_id)
            .bind(kind.as_str())
            .bind(dedupe_key)
            .fetch_one(&mut *connection)
            .await?
        }
    };
    from_row(&row).map(Some)
}

/// A dedupe key built from parts, unambiguous: each part is escaped (`%` as
/// `%25`, `:` as `%3A`) and the parts are joined with `:`, so different
/// lists of parts always give different keys, whatever the parts contain.
pub fn dedupe_key(parts: &[&str]) -> String {
    let mut key = String::new();
    for (index, part) in parts.iter().enumerate() {
        if index > 0 {
            key.push(':');
        }
        for c in part.chars() {
            match c {
                '%' => key.push_str("%25"),
                ':' => key.push_str("%3A"),
                c => key.push(c),
            }
        }
    }
    key
}

pub async fn list_notifications(
    pool: &PgPool,
    account_id: &AccountId,
    page: &Page,
) -> Result<Vec<Notification>, BillingError> {
    let rows = sqlx::query(
        "SELECT seq, notification_id, account_id, kind, dedupe_key, recipients, subject, body_text, status, \
                attempts, last_error, created_at, sent_at, next_attempt_at \
           FROM notifications \
          WHERE account_id = $1 AND ($2::bigint IS NULL OR seq < $2) \
          ORDER BY seq DESC LIMIT $3",
    )
    .bind(account_id.as_str())
    .bind(page.after_id)
    .bind(page.size)
    .fetch_all(pool)
    .await?;
    rows.iter().map(from_row).collect()
}

/// One notification of the account; another account's is `NOT_FOUND`.
pub async fn get_notification(
    pool: &PgPool,
    account_id: &AccountId,
    notification_id: Uuid,
) -> Result<Notification, BillingError> {
    let row = sqlx::query(
        "SELECT seq, notification_id, account_id, kind, dedupe_key, recipients, subject, body_text, status, \
                attempts, last_error, created_at, sent_at, next_attempt_at \
           FROM notifications WHERE account_id = $1 AND notification_id = $2",
    )
    .bind(account_id.as_str())
    .bind(notification_id)
    .fetch_optional(pool)
    .await?
    .ok_or(BillingError::NotFound("notification"))?;
    from_row(&row)
}

pub(super) fn from_row(row: &PgRow) -> Result<Notification, BillingError> {
    let kind: String = row.try_get("kind")?;
    let status: String = row.try_get("status")?;
    Ok(Notification {
        seq: row.try_get("seq")?,
        notification_id: row.try_get("notification_id")?,
        account_id: row.try_get("account_id")?,
        kind: NotificationKind::parse(&kind).ok_or_else(|| {
            BillingError::Unexpected(anyhow::anyhow!("unknown notification kind {kind:?}"))
        })?,
        dedupe_key: row.try_get("dedupe_key")?,
        recipients: row.try_get("recipients")?,
        subject: row.try_get("subject")?,
        body_text: row.try_get("body_text")?,
        status: NotificationStatus::parse(&status),
        attempts: row.try_get("attempts")?,
        last_error: row.try_get("last_error")?,
        created_at: row.try_get("created_at")?,
        sent_at: row.try_get("sent_at")?,
        next_attempt_at: row.try_get("next_attempt_at")?,
    })
}

#[cfg(test)]
mod tests {
    use super::dedupe_key;

    #[test]
    fn dedupe_keys_from_different_parts_never_collide() {
        let cases: [&[&str]; 6] = [
            &["test", "org", "emea:hello"],
            &["test", "org:emea", "hello"],
            &["test", "org%3Aemea", "hello"],
            &["test", "org:emea:hello"],
            &["test:org", "emea:hello"],
            &["test", "org", "emea", "hello"],
        ];
        let keys: std::collections::HashSet<String> =
            cases.iter().map(|parts| dedupe_key(parts)).collect();
        assert_eq!(keys.len(), cases.len(), "{keys:?}");
        assert_eq!(dedupe_key(&["test", "a:b%c"]), "test:a%3Ab%25c");
    }
}
