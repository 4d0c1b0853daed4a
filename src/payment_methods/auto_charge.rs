//! What the auto top-up engine needs of payment methods: the methods it may
//! charge in priority order, and the state changes a charge causes.

use chrono::NaiveDate;
use sqlx::PgConnection;

use super::{MethodStatus, PaymentMethod, store};
use crate::error::BillingError;
use crate::ids::AccountId;

/// True when the account has an `ACTIVE` method with auto-charge on.
pub async fn has_active_auto_charge_method(
    connection: &mut PgConnection,
    account_id: &AccountId,
) -> Result<bool, BillingError> {
    let methods = store::list_live(connection, account_id).await?;
    Ok(methods
        .iter()
        .any(|m| m.status == MethodStatus::Active && m.auto_charge))
}

/// Methods with auto-charge on that are active or temporarily disabled, in
/// charge-priority order (the engine decides which of them to try).
pub async fn auto_charge_methods(
    connection: &mut PgConnection,
    account_id: &AccountId,
) -> Result<Vec<PaymentMethod>, BillingError> {
    let methods = store::list_live(connection, account_id).await?;
    Ok(methods
        .into_iter()
        .filter(|m| {
            m.auto_charge
                && matches!(
                    m.status,
                    MethodStatus::Active | MethodStatus::TemporarilyDisabled
                )
        })
        .collect())
}

/// A decline that takes a card out of automatic charging (any automatic
/// decline, and a hard decline from any path): an `ACTIVE` card becomes
/// `TEMPORARILY_DISABLED` with the reason. Guarded by its status, so a
/// removed or already disabled card never changes. Returns true when it changed.
pub async fn disable_after_decline(
    connection: &mut PgConnection,
    payment_method_id: &str,
    reason: &str,
) -> Result<bool, BillingError> {
    store::transition(
        connection,
        payment_method_id,
        &[MethodStatus::Active],
        MethodStatus::TemporarilyDisabled,
        None,
        reason,
    )
    .await
}

/// A successful charge restores a temporarily disabled card; a successful
/// Retry also turns its auto-charge back on. Guarded: a removed card stays removed.
pub async fn restore_after_success(
    connection: &mut PgConnection,
    payment_method_id: &str,
    turn_auto_charge_on: bool,
) -> Result<bool, BillingError> {
    let restored = store::transition(
        connection,
        payment_method_id,
        &[MethodStatus::TemporarilyDisabled],
        MethodStatus::Active,
        turn_auto_charge_on.then_some(true),
        "",
    )
    .await?;
    if !restored && turn_auto_charge_on {
        return store::transition(
            connection,
            payment_method_id,
            &[MethodStatus::Active],
            MethodStatus::Active,
            Some(true),
            "",
        )
        .await;
    }
    Ok(restored)
}

/// Every method of the account not removed, in charge-priority order, the primary marked.
pub async fn live_methods(
    connection: &mut PgConnection,
    account_id: &AccountId,
) -> Result<Vec<PaymentMethod>, BillingError> {
    store::list_live(connection, account_id).await
}

/// Live cards whose expiry month ends within `days` of `today` (and has not
/// ended yet), with no reminder queued so far.
pub async fn cards_expiring_soon(
    connection: &mut PgConnection,
    today: NaiveDate,
    days: i32,
) -> Result<Vec<(String, PaymentMethod)>, BillingError> {
    let accounts: Vec<(String, String)> = sqlx::query_as(
        "SELECT p.account_id, p.payment_method_id FROM payment_methods p \
          WHERE p.status IN ('ACTIVE', 'TEMPORARILY_DISABLED') \
            AND (make_date(p.exp_year, p.exp_month, 1) + interval '1 month' - interval '1 day')::date \
                BETWEEN $1 AND $1 + $2 \
            AND NOT EXISTS (SELECT 1 FROM card_expiry_reminders r WHERE r.payment_method_id = p.payment_method_id)",
    )
    .bind(today)
    .bind(days)
    .fetch_all(&mut *connection)
    .await?;
    let mut found = Vec::new();
    for (account_id, method_id) in accounts {
        let account = AccountId::parse(&account_id)?;
        let method = store::find(&mut *connection, &account, &method_id).await?;
        found.push((account_id, method));
    }
    Ok(found)
}

/// One method of the account, removed ones included.
pub async fn find_method(
    connection: &mut PgConnection,
    account_id: &AccountId,
    payment_method_id: &str,
) -> Result<PaymentMethod, BillingError> {
    store::find(connection, account_id, payment_method_id).await
}
