//! sqlx errors become domain errors here, and only here.

use crate::error::{BillingError, Reason};

impl From<sqlx::Error> for BillingError {
    fn from(error: sqlx::Error) -> Self {
        match &error {
            sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) => {
                BillingError::unavailable(
                    Reason::DatabaseUnavailable,
                    "the database is unavailable; retry later",
                )
            }
            sqlx::Error::Database(db) => match db.code().as_deref() {
                // serialization_failure, deadlock_detected: safe to retry.
                Some("40001") | Some("40P01") => BillingError::unavailable(
                    Reason::ConcurrentChange,
                    "a concurrent change conflicted; retry",
                ),
                // admin_shutdown, crash_shutdown, cannot_connect_now
                Some("57P01") | Some("57P02") | Some("57P03") => BillingError::unavailable(
                    Reason::DatabaseUnavailable,
                    "the database is unavailable; retry later",
                ),
                _ => BillingError::Unexpected(anyhow::Error::new(error)),
            },
            _ => BillingError::Unexpected(anyhow::Error::new(error)),
        }
    }
}
