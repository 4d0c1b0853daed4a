//! The SQL of payment methods.

use sqlx::postgres::PgRow;
use sqlx::{PgConnection, Row};

use super::{BillingAddress, MethodStatus, PaymentMethod};
use crate::error::{BillingError, Reason};
use crate::ids::AccountId;
use crate::ledger::currency_from_column;
use crate::money::Currency;
use crate::topup::PendingChallenge;

macro_rules! method_columns {
    () => {
        "payment_method_id, account_id, status, brand, last4, exp_month, exp_year, holder_name, \
         address_line1, address_line2, address_city, address_postal_code, address_state, address_country, \
         gateway_token, auto_charge, priority, disabled_reason, challenge_id, challenge_url, created_at"
    };
}

const LIST_LIVE_SQL: &str = concat!(
    "SELECT ",
    method_columns!(),
    " FROM payment_methods WHERE account_id = $1 AND status <> 'REMOVED' ORDER BY priority, created_at"
);
const SELECT_ONE_SQL: &str = concat!(
    "SELECT ",
    method_columns!(),
    " FROM payment_methods WHERE account_id = $1 AND payment_method_id = $2"
);
const INSERT_SQL: &str = concat!(
    "INSERT INTO payment_methods (payment_method_id, account_id, status, brand, last4, exp_month, exp_year, ",
    "holder_name, address_line1, address_line2, address_city, address_postal_code, address_state, ",
    "address_country, gateway, gateway_token, fingerprint, auto_charge, priority, disabled_reason, ",
    "challenge_id, challenge_url) ",
    "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, ",
    "(SELECT COALESCE(MAX(priority), 0) + 1 FROM payment_methods WHERE account_id = $2 AND status <> 'REMOVED'), ",
    "$19, $20, $21)"
);

fn method_from_row(row: &PgRow) -> Result<PaymentMethod, BillingError> {
    let status: String = row.try_get("status")?;
    let challenge_id: Option<String> = row.try_get("challenge_id")?;
    let challenge_url: Option<String> = row.try_get("challenge_url")?;
    Ok(PaymentMethod {
        payment_method_id: row.try_get("payment_method_id")?,
        account_id: row.try_get("account_id")?,
        status: MethodStatus::parse(&status).ok_or_else(|| {
            BillingError::Unexpected(anyhow::anyhow!("unknown payment method status {status:?}"))
        })?,
        brand: row.try_get("brand")?,
        last4: row.try_get("last4")?,
        exp_month: row.try_get("exp_month")?,
        exp_year: row.try_get("exp_year")?,
        holder_name: row.try_get("holder_name")?,
        billing_address: BillingAddress {
            line1: row.try_get("address_line1")?,
            line2: row.try_get("address_line2")?,
            city: row.try_get("address_city")?,
            postal_code: row.try_get("address_postal_code")?,
            state: row.try_get("address_state")?,
            country: row.try_get("address_country")?,
        },
        auto_charge: row.try_get("auto_charge")?,
        priority: row.try_get("priority")?,
        primary: false,
        disabled_reason: row.try_get("disabled_reason")?,
        challenge: challenge_id.map(|challenge_id| PendingChallenge {
            challenge_id,
            redirect_url: challenge_url.unwrap_or_default(),
        }),
        created_at: row.try_get("created_at")?,
        gateway_token: row.try_get("gateway_token")?,
    })
}

/// Locks the account row; every change to its methods holds this lock.
pub(super) async fn lock_account(
    connection: &mut PgConnection,
    account_id: &AccountId,
) -> Result<Currency, BillingError> {
    let currency: String =
        sqlx::query_scalar("SELECT currency FROM accounts WHERE account_id = $1 FOR UPDATE")
            .bind(account_id.as_str())
            .fetch_optional(connection)
            .await?
            .ok_or(BillingError::NotFound("account"))?;
    currency_from_column(&currency)
}

/// Every method not removed, in charge-priority order, the primary marked.
pub(super) async fn list_live(
    connection: &mut PgConnection,
    account_id: &AccountId,
) -> Result<Vec<PaymentMethod>, BillingError> {
    let rows = sqlx::query(LIST_LIVE_SQL)
        .bind(account_id.as_str())
        .fetch_all(connection)
        .await?;
    let mut methods = rows
        .iter()
        .map(method_from_row)
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(primary) = methods
        .iter_mut()
        .find(|m| m.status == MethodStatus::Active && m.auto_charge)
    {
        primary.primary = true;
    }
    Ok(methods)
}

/// One method of the account (removed ones too), the primary flag set;
/// another account's method is `NOT_FOUND`.
pub(super) async fn find(
    connection: &mut PgConnection,
    account_id: &AccountId,
    payment_method_id: &str,
) -> Result<PaymentMethod, BillingError> {
    if let Some(method) = list_live(&mut *connection, account_id)
        .await?
        .into_iter()
        .find(|m| m.payment_method_id == payment_method_id)
    {
        return Ok(method);
    }
    let row = sqlx::query(SELECT_ONE_SQL)
        .bind(account_id.as_str())
        .bind(payment_method_id)
        .fetch_optional(connection)
        .await?
        .ok_or(BillingError::NotFound("payment method"))?;
    method_from_row(&row)
}

/// A method that may still change: not removed.
pub(super) async fn find_live(
    connection: &mut PgConnection,
    account_id: &AccountId,
    payment_method_id: &str,
) -> Result<PaymentMethod, BillingError> {
    let method = find(connection, account_id, payment_method_id).await?;
    if method.status == MethodStatus::Removed {
        return Err(BillingError::precondition(
            Reason::PaymentMethodRemoved,
            format!("payment_methods/{payment_method_id}"),
            "the payment method was removed; add the card again",
        ));
    }
    Ok(method)
}

pub(super) struct NewMethod<'a> {
    pub payment_method_id: &'a str,
    pub account_id: &'a AccountId,
    pub status: MethodStatus,
    pub card: &'a crate::gateway::SavedCard,
    pub holder_name: &'a str,
    pub address: &'a BillingAddress,
    pub gateway: &'a str,
    pub auto_charge: bool,
    pub disabled_reason: &'a str,
    pub challenge: Option<&'a PendingChallenge>,
}

pub(super) async fn insert(
    connection: &mut PgConnection,
    new: NewMethod<'_>,
) -> Result<(), BillingError> {
    sqlx::query(INSERT_SQL)
        .bind(new.payment_method_id)
        .bind(new.account_id.as_str())
        .bind(new.status.as_str())
        .bind(&new.card.brand)
        .bind(&new.card.last4)
        .bind(new.card.exp_month as i32)
        .bind(new.card.exp_year)
        .bind(new.holder_name)
        .bind(&new.address.line1)
        .bind(&new.address.line2)
        .bind(&new.address.city)
        .bind(&new.address.postal_code)
        .bind(&new.address.state)
        .bind(&new.address.country)
        .bind(new.gateway)
        .bind(&new.card.token)
        .bind(&new.card.fingerprint)
        .bind(new.auto_charge)
        .bind(new.disabled_reason)
        .bind(new.challenge.map(|c| c.challenge_id.as_str()))
        .bind(new.challenge.map(|c| c.redirect_url.as_str()))
        .execute(connection)
        .await?;
    Ok(())
}

/// The live method with this fingerprint, if any (duplicate detection).
pub(super) async fn live_with_fingerprint(
    connection: &mut PgConnection,
    account_id: &AccountId,
    fingerprint: &str,
) -> Result<Option<String>, BillingError> {
    Ok(sqlx::query_scalar(
        "SELECT payment_method_id FROM payment_methods \
          WHERE account_id = $1 AND fingerprint = $2 AND status NOT IN ('REMOVED', 'FAILED')",
    )
    .bind(account_id.as_str())
    .bind(fingerprint)
    .fetch_optional(connection)
    .await?)
}

/// True when no card of the account but `except` is `ACTIVE` (the first card
/// to become ACTIVE is the one auto-charged).
pub(super) async fn no_active_card(
    connection: &mut PgConnection,
    account_id: &AccountId,
    except: Option<&str>,
) -> Result<bool, BillingError> {
    let active: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM payment_methods WHERE account_id = $1 AND status = 'ACTIVE'                            AND payment_method_id IS DISTINCT FROM $2)",
    )
    .bind(account_id.as_str())
    .bind(except)
    .fetch_one(connection)
    .await?;
    Ok(!active)
}

/// A guarded state change: only a card whose status is one of `from` moves
/// to `to` (auto-charge set when `Some`, the reason recorded). A removed card
/// is never in `from` unless asked, so it can never come back. Returns true
/// when the card changed.
pub(super) async fn transition(
    connection: &mut PgConnection,
    payment_method_id: &str,
    from: &[MethodStatus],
    to: MethodStatus,
    auto_charge: Option<bool>,
    reason: &str,
) -> Result<bool, BillingError> {
    let from: Vec<&str> = from.iter().map(|s| s.as_str()).collect();
    let changed = sqlx::query(
        "UPDATE payment_methods \
            SET status = $3, auto_charge = COALESCE($4, auto_charge), disabled_reason = $5, updated_at = now(), \
                challenge_id = CASE WHEN $3 = 'PENDING_AUTHENTICATION' THEN challenge_id END, \
                challenge_url = CASE WHEN $3 = 'PENDING_AUTHENTICATION' THEN challenge_url END \
          WHERE payment_method_id = $1 AND status = ANY($2)",
    )
    .bind(payment_method_id)
    .bind(&from)
    .bind(to.as_str())
    .bind(auto_charge)
    .bind(reason)
    .execute(connection)
    .await?;
    Ok(changed.rows_affected() == 1)
}

/// Sets status, auto-charge and reason; clears the challenge unless still
/// pending. A removed card never changes again (guarded in SQL).
pub(super) async fn update_state(
    connection: &mut PgConnection,
    payment_method_id: &str,
    status: MethodStatus,
    auto_charge: bool,
    disabled_reason: &str,
) -> Result<(), BillingError> {
    sqlx::query(
        "UPDATE payment_methods \
            SET status = $2, auto_charge = $3, disabled_reason = $4, updated_at = now(), \
                challenge_id = CASE WHEN $2 = 'PENDING_AUTHENTICATION' THEN challenge_id END, \
                challenge_url = CASE WHEN $2 = 'PENDING_AUTHENTICATION' THEN challenge_url END, \
                priority = CASE WHEN $2 = 'REMOVED' THEN 0 ELSE priority END, \
                removed_at = CASE WHEN $2 = 'REMOVED' THEN now() ELSE removed_at END \
          WHERE payment_method_id = $1 AND status <> 'REMOVED'",
    )
    .bind(payment_method_id)
    .bind(status.as_str())
    .bind(auto_charge)
    .bind(disabled_reason)
    .execute(connection)
    .await?;
    Ok(())
}

/// Gives the listed methods priorities 1, 2, … in this order.
pub(super) async fn set_priorities(
    connection: &mut PgConnection,
    ordered_ids: &[String],
) -> Result<(), BillingError> {
    sqlx::query(
        "UPDATE payment_methods p SET priority = t.position, updated_at = now() \
           FROM unnest($1::text[]) WITH ORDINALITY AS t(payment_method_id, position) \
          WHERE p.payment_method_id = t.payment_method_id",
    )
    .bind(ordered_ids)
    .execute(connection)
    .await?;
    Ok(())
}

/// The account and id of the card waiting for 3-D Secure that the gateway saved as `gateway_token`.
pub(super) async fn pending_by_token(
    connection: &mut PgConnection,
    gateway: &str,
    gateway_token: &str,
) -> Result<Option<(String, String)>, BillingError> {
    Ok(sqlx::query_as(
        "SELECT account_id, payment_method_id FROM payment_methods \
          WHERE gateway = $1 AND gateway_token = $2 AND status = 'PENDING_AUTHENTICATION'",
    )
    .bind(gateway)
    .bind(gateway_token)
    .fetch_optional(connection)
    .await?)
}
