//! The audit log: every change, who made it, under which role, and when.
//! Written inside the transaction of the change it records.

use sqlx::PgConnection;

use crate::auth::Caller;
use crate::error::BillingError;

pub async fn record(
    connection: &mut PgConnection,
    caller: &Caller,
    action: &str,
    account_id: Option<&str>,
    details: serde_json::Value,
) -> Result<(), BillingError> {
    sqlx::query("INSERT INTO audit_log (actor, role, action, account_id, details) VALUES ($1, $2, $3, $4, $5)")
        .bind(&caller.subject)
        .bind(caller.roles_label())
        .bind(action)
        .bind(account_id)
        .bind(details)
        .execute(connection)
        .await?;
    Ok(())
}
