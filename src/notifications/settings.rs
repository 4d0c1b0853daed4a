//! Who receives an account's emails and which kinds are sent.

use sqlx::{PgConnection, PgPool};

use super::NotificationKind;
use crate::audit;
use crate::auth::Caller;
use crate::error::BillingError;
use crate::ids::AccountId;

#[derive(Debug, Clone)]
pub struct NotificationSettings {
    pub account_id: String,
    /// The configured addresses; empty means the account's billing email.
    pub recipients: Vec<String>,
    pub billing_email: String,
    pub disabled_kinds: Vec<NotificationKind>,
}

impl NotificationSettings {
    /// Where messages go: the configured recipients, else the billing email.
    pub fn effective_recipients(&self) -> Vec<String> {
        if !self.recipients.is_empty() {
            return self.recipients.clone();
        }
        if self.billing_email.is_empty() {
            Vec::new()
        } else {
            vec![self.billing_email.clone()]
        }
    }

    pub fn enabled_kinds(&self) -> Vec<NotificationKind> {
        NotificationKind::ALL
            .into_iter()
            .filter(|kind| !self.disabled_kinds.contains(kind))
            .collect()
    }

    pub fn sends(&self, kind: NotificationKind) -> bool {
        kind == NotificationKind::Test || !self.disabled_kinds.contains(&kind)
    }
}

pub async fn get_settings(
    pool: &PgPool,
    account_id: &AccountId,
) -> Result<NotificationSettings, BillingError> {
    let mut connection = pool.acquire().await?;
    load(&mut connection, account_id.as_str()).await
}

pub(super) async fn load(
    connection: &mut PgConnection,
    account_id: &str,
) -> Result<NotificationSettings, BillingError> {
    type SettingsRow = (String, Option<Vec<String>>, Option<Vec<String>>);
    let row: Option<SettingsRow> = sqlx::query_as(
        "SELECT a.billing_email, s.recipients, s.disabled_kinds \
           FROM accounts a LEFT JOIN notification_settings s ON s.account_id = a.account_id \
          WHERE a.account_id = $1",
    )
    .bind(account_id)
    .fetch_optional(connection)
    .await?;
    let (billing_email, recipients, disabled) = row.ok_or(BillingError::NotFound("account"))?;
    Ok(NotificationSettings {
        account_id: account_id.to_owned(),
        recipients: recipients.unwrap_or_default(),
        billing_email,
        disabled_kinds: disabled
            .unwrap_or_default()
            .iter()
            .filter_map(|k| NotificationKind::parse(k))
            .collect(),
    })
}

/// Replaces the recipients and the enabled kinds (already validated).
pub async fn update_settings(
    pool: &PgPool,
    caller: &Caller,
    account_id: &AccountId,
    recipients: Vec<String>,
    enabled_kinds: Vec<NotificationKind>,
) -> Result<NotificationSettings, BillingError> {
    let disabled: Vec<&str> = NotificationKind::ALL
        .into_iter()
        .filter(|kind| *kind != NotificationKind::Test && !enabled_kinds.contains(kind))
        .map(NotificationKind::as_str)
        .collect();
    let mut transaction = pool.begin().await?;
    let exists: Option<i32> =
        sqlx::query_scalar("SELECT 1 FROM accounts WHERE account_id = $1 FOR UPDATE")
            .bind(account_id.as_str())
            .fetch_optional(&mut *transaction)
            .await?;
    if exists.is_none() {
        return Err(BillingError::NotFound("account"));
    }
    sqlx::query(
        "INSERT INTO notification_settings (account_id, recipients, disabled_kinds, updated_at) \
         VALUES ($1, $2, $3, now()) \
         ON CONFLICT (account_id) DO UPDATE SET recipients = $2, disabled_kinds = $3, updated_at = now()",
    )
    .bind(account_id.as_str())
    .bind(&recipients)
    .bind(&disabled)
    .execute(&mut *transaction)
    .await?;
    audit::record(
        &mut transaction,
        caller,
        "update_notification_settings",
        Some(account_id.as_str()),
        serde_json::json!({ "recipients": recipients.len(), "disabled_kinds": disabled }),
    )
    .await?;
    let settings = load(&mut transaction, account_id.as_str()).await?;
    transaction.commit().await?;
    Ok(settings)
}
