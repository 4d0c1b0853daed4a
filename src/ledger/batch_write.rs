//! The write of a batch: one statement (`batch_debit.sql`) fed one array per column.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::{PgConnection, Row};
use uuid::Uuid;

use super::batch::{Accepted, Waiting};
use super::{Account, EntryKind, PostingResult};
use crate::error::BillingError;

/// Writes the accepted debits; returns how many idempotency keys were stored
/// (fewer than the debits: another transaction stored one first).
pub(super) async fn write(
    connection: &mut PgConnection,
    account: &Account,
    batch: &[Waiting],
    accepted: &[Accepted],
    balance: Decimal,
    version: i64,
    created_at: DateTime<Utc>,
) -> Result<i64, BillingError> {
    let mut columns = Columns::default();
    for Accepted { index, result } in accepted {
        columns.push(&batch[*index], result)?;
    }
    let row = sqlx::query(include_str!("batch_debit.sql"))
        .bind(account.account_id.as_str())
        .bind(balance)
        .bind(version)
        .bind(created_at)
        .bind(columns.entry_ids)
        .bind(columns.transaction_ids)
        .bind(columns.amounts)
        .bind(columns.balances_after)
        .bind(columns.totals_after)
        .bind(columns.sequences)
        .bind(columns.descriptions)
        .bind(columns.metadata)
        .bind(columns.keys)
        .bind(columns.request_hashes)
        .bind(columns.responses)
        .bind(columns.actors)
        .bind(columns.roles)
        .bind(columns.details)
        .bind(columns.actor_types)
        .bind(columns.trace_ids)
        .fetch_one(connection)
        .await?;
    let moved: i64 = row.try_get("version")?;
    debug_assert_eq!(moved, version, "the version counts the entries");
    Ok(row.try_get("keys_stored")?)
}

/// The batch's accepted debits, one array per column of `batch_debit.sql`.
#[derive(Default)]
struct Columns {
    entry_ids: Vec<i64>,
    transaction_ids: Vec<Uuid>,
    amounts: Vec<Decimal>,
    balances_after: Vec<Decimal>,
    totals_after: Vec<Decimal>,
    sequences: Vec<i64>,
    descriptions: Vec<String>,
    metadata: Vec<String>,
    keys: Vec<String>,
    request_hashes: Vec<String>,
    responses: Vec<String>,
    actors: Vec<String>,
    roles: Vec<String>,
    details: Vec<String>,
    actor_types: Vec<&'static str>,
    trace_ids: Vec<Option<String>>,
}

impl Columns {
    fn push(&mut self, waiting: &Waiting, result: &PostingResult) -> Result<(), BillingError> {
        let entry = &result.entry;
        let json = |value: serde_json::Result<String>| {
            value.map_err(|e| BillingError::Unexpected(e.into()))
        };
        self.entry_ids.push(entry.entry_id);
        self.transaction_ids.push(entry.transaction_id);
        self.amounts.push(entry.amount);
        self.balances_after.push(result.balance);
        self.totals_after.push(result.total_balance);
        self.sequences.push(result.version);
        self.descriptions.push(entry.description.clone());
        self.metadata
            .push(json(serde_json::to_string(&entry.metadata))?);
        self.keys
            .push(waiting.posting.idempotency_key.as_str().to_owned());
        self.request_hashes.push(waiting.fingerprint.clone());
        self.responses.push(json(serde_json::to_string(result))?);
        self.actors.push(waiting.caller.subject.clone());
        self.roles.push(waiting.caller.roles_label());
        self.actor_types
            .push(crate::audit::ActorType::of(&waiting.caller).as_str());
        self.trace_ids.push(waiting.caller.trace_id.clone());
        self.details
            .push(json(serde_json::to_string(&serde_json::json!({
                "transaction_id": entry.transaction_id,
                "kind": EntryKind::Usage.as_str(),
                "amount": entry.amount.to_string(),
            })))?);
        Ok(())
    }
}
