//! Idempotency keys: the first result of a request is stored with a
//! fingerprint of the request; a retry with the same key and the same
//! request gets that result back, a different request is refused.
//! Callers hold the account's row lock, so checking then recording is race-free.

use sha2::{Digest, Sha256};
use sqlx::PgConnection;

use crate::error::{BillingError, Reason};

/// A stable fingerprint of an operation's meaningful fields.
pub fn request_fingerprint(operation: &str, fields: &[&str]) -> String {
    let mut hasher = Sha256::new();
    hasher.update(operation.as_bytes());
    for field in fields {
        hasher.update([0u8]);
        hasher.update((field.len() as u64).to_le_bytes());
        hasher.update(field.as_bytes());
    }
    hex::encode(hasher.finalize())
}

/// The stored response when this key was used before for the same request.
pub(crate) async fn previous_response(
    connection: &mut PgConnection,
    account_id: &str,
    key: &str,
    operation: &str,
    fingerprint: &str,
) -> Result<Option<serde_json::Value>, BillingError> {
    let row: Option<(String, String, serde_json::Value)> = sqlx::query_as(
        "SELECT operation, request_hash, response FROM idempotency_keys WHERE account_id = $1 AND idempotency_key = $2",
    )
    .bind(account_id)
    .bind(key)
    .fetch_optional(connection)
    .await?;
    match row {
        None => Ok(None),
        Some((stored_operation, stored_fingerprint, response))
            if stored_operation == operation && stored_fingerprint == fingerprint =>
        {
            Ok(Some(response))
        }
        Some(_) => Err(BillingError::already_exists(
            Reason::IdempotencyKeyReused,
            "idempotency_key was already used for a different request on this account",
        )),
    }
}

pub(crate) async fn remember_response(
    connection: &mut PgConnection,
    account_id: &str,
    key: &str,
    operation: &str,
    fingerprint: &str,
    response: serde_json::Value,
) -> Result<(), BillingError> {
    sqlx::query(
        "INSERT INTO idempotency_keys (account_id, idempotency_key, operation, request_hash, response) \
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(account_id)
    .bind(key)
    .bind(operation)
    .bind(fingerprint)
    .bind(response)
    .execute(connection)
    .await?;
    Ok(())
}

/// Forgets a key stored for this request (a reservation whose request was
/// refused and changed nothing); the caller holds the account's row lock.
pub(crate) async fn forget_response(
    connection: &mut PgConnection,
    account_id: &str,
    key: &str,
    operation: &str,
    fingerprint: &str,
) -> Result<(), BillingError> {
    sqlx::query(
        "DELETE FROM idempotency_keys \
          WHERE account_id = $1 AND idempotency_key = $2 AND operation = $3 AND request_hash = $4",
    )
    .bind(account_id)
    .bind(key)
    .bind(operation)
    .bind(fingerprint)
    .execute(connection)
    .await?;
    Ok(())
}

pub(crate) fn decode<T: serde::de::DeserializeOwned>(
    value: serde_json::Value,
) -> Result<T, BillingError> {
    serde_json::from_value(value).map_err(|e| {
        BillingError::Unexpected(anyhow::anyhow!(
            "stored idempotent response is unreadable: {e}"
        ))
    })
}

pub(crate) fn encode<T: serde::Serialize>(value: &T) -> Result<serde_json::Value, BillingError> {
    serde_json::to_value(value).map_err(|e| BillingError::Unexpected(e.into()))
}
