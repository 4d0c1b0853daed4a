//! The outbox sender, run by every replica: claims one due row at a time
//! with `FOR UPDATE SKIP LOCKED`, sends it, and marks it sent — or keeps the
//! error and schedules the next try from the retry schedule, until the
//! schedule runs out. Stored recipients the mailer would refuse are left
//! out (and named in `last_error`); the others still get the message.

use std::sync::Arc;
use std::time::Duration;

use sqlx::{PgPool, Row};
use tokio::sync::watch;

use super::mailer::{Mailer, OutgoingEmail};
use crate::error::BillingError;
use crate::telemetry::metrics;

#[derive(Debug, Clone)]
pub struct SenderSettings {
    pub poll_interval: Duration,
    /// Wait before the 2nd, 3rd … attempt; after the last, the message is `failed`.
    pub retry_schedule: Vec<Duration>,
    /// How long a claimed message is reserved for its sender (longer than the SMTP timeout).
    pub claim_lease: Duration,
}

impl Default for SenderSettings {
    fn default() -> Self {
        Self {
            poll_interval: Duration::from_millis(500),
            retry_schedule: [30, 120, 600, 3600, 21_600]
                .into_iter()
                .map(Duration::from_secs)
                .collect(),
            claim_lease: Duration::from_secs(120),
        }
    }
}

pub async fn run_sender(
    pool: PgPool,
    mailer: Arc<dyn Mailer>,
    settings: SenderSettings,
    mut stop: watch::Receiver<bool>,
) {
    tracing::info!(mailer = %mailer.describe(), "email sender running");
    loop {
        match send_due(&pool, mailer.as_ref(), &settings).await {
            Ok(0) => {}
            Ok(sent) => tracing::debug!(sent, "outbox pass"),
            Err(error) => tracing::warn!(%error, "outbox pass failed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(settings.poll_interval) => {}
            _ = stop.changed() => return,
        }
    }
}

/// Sends every due message; returns how many were handled.
///
/// Two steps per message, no transaction open while SMTP talks: a claim
/// (counts the attempt and pushes `next_attempt_at` past a lease, so no
/// other replica takes it meanwhile), then the send, then the result. When
/// the database is unreachable right after a successful send, marking it
/// sent is retried until the lease ends — so a database restart does not
/// make the message go out twice.
pub async fn send_due(
    pool: &PgPool,
    mailer: &dyn Mailer,
    settings: &SenderSettings,
) -> Result<usize, BillingError> {
    let mut handled = 0;
    loop {
        let claimed = sqlx::query(
            "UPDATE notifications SET attempts = attempts + 1, next_attempt_at = now() + make_interval(secs => $1) \
              WHERE notification_id = ( \
                    SELECT notification_id FROM notifications \
                     WHERE status = 'pending' AND next_attempt_at <= now() \
                     ORDER BY next_attempt_at, seq LIMIT 1 FOR UPDATE SKIP LOCKED) \
          RETURNING notification_id, kind, recipients, subject, body_text, attempts",
        )
        .bind(settings.claim_lease.as_secs_f64())
        .fetch_optional(pool)
        .await?;
        let Some(row) = claimed else {
            return Ok(handled);
        };
        let notification_id: uuid::Uuid = row.try_get("notification_id")?;
        let attempts: i32 = row.try_get("attempts")?;
        let kind: String = row.try_get("kind")?;
        let stored: Vec<String> = row.try_get("recipients")?;
        // Rows stored before addresses were checked by the mailer's parser
        // may hold bad ones: they must not silence the good ones.
        let (to, skipped) = split_recipients(&stored);
        if to.is_empty() {
            let error = format!("no valid recipient: {}", skipped.join("; "));
            sqlx::query(
                "UPDATE notifications SET status = 'failed', last_error = $2 \
                  WHERE notification_id = $1 AND status = 'pending'",
            )
            .bind(notification_id)
            .bind(&error)
            .execute(pool)
            .await?;
            metrics::notification_finished(&kind, "failed");
            tracing::warn!(%notification_id, attempts, "notification not delivered: no valid recipient");
            handled += 1;
            continue;
        }
        let note = (!skipped.is_empty())
            .then(|| format!("not sent to invalid recipients: {}", skipped.join("; ")));
        let email = OutgoingEmail {
            id: notification_id.to_string(),
            to,
            subject: row.try_get("subject")?,
            body_text: row.try_get("body_text")?,
        };
        match mailer.send(&email).await {
            Ok(()) => {
                mark_sent(pool, notification_id, settings.claim_lease, note.as_deref()).await?;
                if note.is_some() {
                    tracing::warn!(%notification_id, skipped = skipped.len(), "notification sent, but not to its invalid recipients");
                }
                metrics::notification_finished(&kind, "sent");
                tracing::info!(%notification_id, attempts, "notification sent");
            }
            Err(error) => {
                let retry_in = settings.retry_schedule.get(attempts as usize - 1).copied();
                let status = if retry_in.is_some() {
                    "pending"
                } else {
                    "failed"
                };
                sqlx::query(
                    "UPDATE notifications SET status = $2, last_error = $3, \
                            next_attempt_at = now() + make_interval(secs => $4) \
                      WHERE notification_id = $1 AND status = 'pending'",
                )
                .bind(notification_id)
                .bind(status)
                .bind(match &note {
                    Some(note) => format!("{error}; {note}"),
                    None => error.to_string(),
                })
                .bind(retry_in.unwrap_or_default().as_secs_f64())
                .execute(pool)
                .await?;
                metrics::notification_finished(
                    &kind,
                    if retry_in.is_some() {
                        "retry"
                    } else {
                        "failed"
                    },
                );
                tracing::warn!(%notification_id, attempts, %error, status, "notification not delivered");
            }
        }
        handled += 1;
    }
}

/// The stored recipients the mailer accepts, and a description (with its
/// index) of each one it would refuse.
fn split_recipients(stored: &[String]) -> (Vec<String>, Vec<String>) {
    let mut valid = Vec::with_capacity(stored.len());
    let mut skipped = Vec::new();
    for (index, address) in stored.iter().enumerate() {
        match crate::ids::parse_email(&format!("recipients[{index}]"), address) {
            Ok(address) => valid.push(address),
            Err(error) => skipped.push(error.to_string()),
        }
    }
    (valid, skipped)
}

/// Marks the row sent; `note` (recipients left out) is kept as its `last_error`.
async fn mark_sent(
    pool: &PgPool,
    notification_id: uuid::Uuid,
    lease: Duration,
    note: Option<&str>,
) -> Result<(), BillingError> {
    let deadline = tokio::time::Instant::now() + lease;
    loop {
        let marked = sqlx::query(
            "UPDATE notifications SET status = 'sent', sent_at = now(), last_error = $2 WHERE notification_id = $1",
        )
        .bind(notification_id)
        .bind(note)
        .execute(pool)
        .await;
        match marked {
            Ok(_) => return Ok(()),
            Err(error) if tokio::time::Instant::now() < deadline => {
                tracing::warn!(%notification_id, %error, "sent, but not yet recorded; retrying");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(error) => return Err(error.into()),
        }
    }
}
