//! Opening and reading accounts.

use rust_decimal::Decimal;
use sqlx::{PgPool, Row, postgres::PgRow};

use super::{Account, currency_from_column, idempotency};
use crate::audit;
use crate::auth::Caller;
use crate::error::{BillingError, Reason};
use crate::ids::{AccountId, IdempotencyKey};
use crate::money::Currency;

#[derive(Debug, Clone)]
pub struct NewAccount {
    pub account_id: AccountId,
    pub currency: Currency,
    pub display_name: String,
    pub billing_email: String,
    pub credit_limit: Decimal,
    pub idempotency_key: Option<IdempotencyKey>,
}

impl NewAccount {
    fn fingerprint(&self) -> String {
        idempotency::request_fingerprint(
            "create_account",
            &[
                self.account_id.as_str(),
                self.currency.code(),
                &self.display_name,
                &self.billing_email,
                &self.credit_limit.normalize().to_string(),
            ],
        )
    }

    fn matches(&self, existing: &Account) -> bool {
        existing.currency == self.currency
            && existing.display_name == self.display_name
            && existing.billing_email == self.billing_email
            && existing.credit_limit == self.credit_limit
    }
}

const INSERT_ACCOUNT_SQL: &str = "INSERT INTO accounts (account_id, currency, display_name, billing_email, credit_limit) \
     VALUES ($1, $2, $3, $4, $5) ON CONFLICT (account_id) DO NOTHING \
     RETURNING account_id, currency, display_name, billing_email, balance, credit_limit, version, created_at";
const SELECT_ACCOUNT_SQL: &str = "SELECT account_id, currency, display_name, billing_email, balance, credit_limit, version, created_at \
     FROM accounts WHERE account_id = $1";

/// Opens an account. Creating the same account again with the same fields
/// returns it unchanged; different fields (or a reused key) are `ALREADY_EXISTS`.
pub async fn create_account(
    pool: &PgPool,
    caller: &Caller,
    new: NewAccount,
) -> Result<Account, BillingError> {
    let mut transaction = pool.begin().await?;
    let inserted = sqlx::query(INSERT_ACCOUNT_SQL)
        .bind(new.account_id.as_str())
        .bind(new.currency.code())
        .bind(&new.display_name)
        .bind(&new.billing_email)
        .bind(new.credit_limit)
        .fetch_optional(&mut *transaction)
        .await?;

    let Some(row) = inserted else {
        // The account exists: lock it, so the key check below cannot race another create.
        let existing = account_from_row(
            &sqlx::query(LOCK_ACCOUNT_SQL)
                .bind(new.account_id.as_str())
                .fetch_one(&mut *transaction)
                .await?,
        )?;
        if let Some(key) = &new.idempotency_key {
            let previous = idempotency::previous_response(
                &mut transaction,
                new.account_id.as_str(),
                key.as_str(),
                "create_account",
                &new.fingerprint(),
            )
            .await?;
            if previous.is_some() {
                return Ok(existing);
            }
        }
        if new.matches(&existing) {
            return Ok(existing);
        }
        return Err(BillingError::already_exists(
            Reason::AccountExists,
            format!(
                "account {} already exists with different settings",
                new.account_id
            ),
        ));
    };

    let account = account_from_row(&row)?;
    if let Some(key) = &new.idempotency_key {
        idempotency::remember_response(
            &mut transaction,
            new.account_id.as_str(),
            key.as_str(),
            "create_account",
            &new.fingerprint(),
            serde_json::json!({ "account_id": account.account_id }),
        )
        .await?;
    }
    audit::record_keyed(
        &mut transaction,
        caller,
        "create_account",
        Some(new.account_id.as_str()),
        new.idempotency_key.as_ref(),
        serde_json::json!({ "currency": new.currency.code(), "credit_limit": new.credit_limit.to_string() }),
    )
    .await?;
    transaction.commit().await?;
    tracing::info!(account_id = %new.account_id, currency = %new.currency, "account created");
    Ok(account)
}

pub async fn get_account(pool: &PgPool, account_id: &AccountId) -> Result<Account, BillingError> {
    let row = sqlx::query(SELECT_ACCOUNT_SQL)
        .bind(account_id.as_str())
        .fetch_optional(pool)
        .await?
        .ok_or(BillingError::NotFound("account"))?;
    account_from_row(&row)
}

/// Reads an account inside the caller's transaction.
pub async fn load_account(
    connection: &mut sqlx::PgConnection,
    account_id: &str,
) -> Result<Account, BillingError> {
    let row = sqlx::query(SELECT_ACCOUNT_SQL)
        .bind(account_id)
        .fetch_optional(connection)
        .await?
        .ok_or(BillingError::NotFound("account"))?;
    account_from_row(&row)
}

pub(super) fn account_from_row(row: &PgRow) -> Result<Account, BillingError> {
    let currency: String = row.try_get("currency")?;
    Ok(Account {
        account_id: row.try_get("account_id")?,
        currency: currency_from_column(&currency)?,
        display_name: row.try_get("display_name")?,
        billing_email: row.try_get("billing_email")?,
        balance: row.try_get("balance")?,
        credit_limit: row.try_get("credit_limit")?,
        version: row.try_get("version")?,
        created_at: row.try_get("created_at")?,
    })
}

pub(super) const LOCK_ACCOUNT_SQL: &str = "SELECT account_id, currency, display_name, billing_email, balance, credit_limit, version, created_at \
     FROM accounts WHERE account_id = $1 FOR UPDATE";
