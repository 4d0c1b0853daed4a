//! The outbox sender, run by every replica: claims one due row at a time
//! with `FOR UPDATE SKIP LOCKED`, sends it while holding the row lock, and
//! marks it sent — or counts the attempt, keeps the error and schedules the
//! next try from the retry schedule, until the schedule runs out.

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
}

impl Default for SenderSettings {
    fn default() -> Self {
        Self {
            poll_interval: Duration::from_millis(500),
            retry_schedule: [30, 120, 600, 3600, 21_600]
                .into_iter()
                .map(Duration::from_secs)
                .collect(),
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

/// Sends every due message (one transaction each); returns how many were handled.
pub async fn send_due(
    pool: &PgPool,
    mailer: &dyn Mailer,
    settings: &SenderSettings,
) -> Result<usize, BillingError> {
    let mut handled = 0;
    loop {
        let mut transaction = pool.begin().await?;
        let row = sqlx::query(
            "SELECT notification_id, kind, recipients, subject, body_text, attempts FROM notifications \
              WHERE status = 'pending' AND next_attempt_at <= now() \
              ORDER BY next_attempt_at, seq LIMIT 1 FOR UPDATE SKIP LOCKED",
        )
        .fetch_optional(&mut *transaction)
        .await?;
        let Some(row) = row else {
            return Ok(handled);
        };
        let notification_id: uuid::Uuid = row.try_get("notification_id")?;
        let attempts: i32 = row.try_get::<i32, _>("attempts")? + 1;
        let kind: String = row.try_get("kind")?;
        let email = OutgoingEmail {
            id: notification_id.to_string(),
            to: row.try_get("recipients")?,
            subject: row.try_get("subject")?,
            body_text: row.try_get("body_text")?,
        };
        match mailer.send(&email).await {
            Ok(()) => {
                sqlx::query(
                    "UPDATE notifications SET status = 'sent', attempts = $2, sent_at = now(), last_error = NULL \
                     WHERE notification_id = $1",
                )
                .bind(notification_id)
                .bind(attempts)
                .execute(&mut *transaction)
                .await?;
                tracing::info!(%notification_id, attempts, "notification sent");
                metrics::notification_finished(&kind, "sent");
            }
            Err(error) => {
                let retry_in = settings.retry_schedule.get(attempts as usize - 1).copied();
                let status = if retry_in.is_some() {
                    "pending"
                } else {
                    "failed"
                };
                sqlx::query(
                    "UPDATE notifications SET status = $2, attempts = $3, last_error = $4, \
                            next_attempt_at = now() + make_interval(secs => $5) \
                      WHERE notification_id = $1",
                )
                .bind(notification_id)
                .bind(status)
                .bind(attempts)
                .bind(error.to_string())
                .bind(retry_in.unwrap_or_default().as_secs_f64())
                .execute(&mut *transaction)
                .await?;
                tracing::warn!(%notification_id, attempts, %error, status, "notification not delivered");
                let outcome = if retry_in.is_some() {
                    "retry"
                } else {
                    "failed"
                };
                metrics::notification_finished(&kind, outcome);
            }
        }
        transaction.commit().await?;
        handled += 1;
    }
}
