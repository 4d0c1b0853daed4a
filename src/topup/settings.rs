//! Low Balance Settings: "Automatically refill when threshold is reached"
//! (threshold, refill amount), "Low balance notification" (its threshold),
//! and the daily caps. "Apply Changes" validates everything first and may
//! start a top-up at once.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::{PgConnection, PgPool, Row};

use super::Clock;
use crate::audit;
use crate::auth::Caller;
use crate::error::{BillingError, Reason};
use crate::ids::AccountId;
use crate::ledger;
use crate::money::Currency;
use crate::notifications::{self, Notice};

/// Service-wide rules for the settings and the engine.
#[derive(Debug, Clone)]
pub struct PolicyConfig {
    /// Smallest and largest refill amount per currency (also the largest
    /// single automatic charge, and Retry's default when no refill is set).
    pub refill_bounds: super::RefillBounds,
    pub default_max_top_ups_per_day: i32,
    pub default_max_amount_per_day: Option<Decimal>,
    /// Waits before the 2nd, 3rd … round when every method failed (the last repeats).
    pub retry_backoff: Vec<chrono::Duration>,
    /// Rounds per crossing before giving up.
    pub max_rounds: i32,
    /// Wait before asking the gateway about a charge whose outcome is unknown.
    pub reconcile_after: chrono::Duration,
    /// How long one replica may drive a top-up without renewing its lease
    /// (must exceed the gateway's timeout); then another replica takes over.
    pub lease: chrono::Duration,
    /// A manual top-up (Add Funds, retry) still open this long after its
    /// last change is reconciled by the engine (the process driving it
    /// died; a caller that goes away does not stop its charge).
    pub abandoned_after: chrono::Duration,
    /// Times the gateway is asked about an unknown outcome before the
    /// top-up becomes `NEEDS_ATTENTION`.
    pub reconcile_max_tries: i32,
    /// A top-up waiting for the customer's 3-D Secure (`REQUIRES_ACTION`)
    /// this long ends `FAILED` with `authentication_expired`.
    pub action_expiry: chrono::Duration,
    /// The user panel's address; "action needed" emails link to it with
    /// `?top_up_id=<id>` so the customer can finish 3-D Secure.
    pub panel_url: Option<String>,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            refill_bounds: super::RefillBounds::default(),
            default_max_top_ups_per_day: 10,
            default_max_amount_per_day: None,
            retry_backoff: vec![
                chrono::Duration::hours(1),
                chrono::Duration::hours(6),
                chrono::Duration::hours(24),
            ],
            max_rounds: 5,
            reconcile_after: chrono::Duration::seconds(30),
            lease: chrono::Duration::seconds(90),
            abandoned_after: chrono::Duration::minutes(10),
            reconcile_max_tries: 20,
            action_expiry: chrono::Duration::hours(24),
            panel_url: None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct LowBalanceSettings {
    pub account_id: String,
    pub currency: Currency,
    pub auto_refill_enabled: bool,
    pub threshold: Decimal,
    pub refill_amount: Decimal,
    pub notification_enabled: bool,
    pub notification_threshold: Decimal,
    pub max_top_ups_per_day: i32,
    pub max_amount_per_day: Option<Decimal>,
    pub updated_at: Option<DateTime<Utc>>,
}

/// "Apply Changes", already parsed into amounts of the account's currency.
#[derive(Debug, Clone)]
pub struct SettingsChange {
    pub auto_refill_enabled: bool,
    pub threshold: Decimal,
    pub refill_amount: Decimal,
    pub notification_enabled: bool,
    pub notification_threshold: Decimal,
    /// `None` keeps the current value.
    pub max_top_ups_per_day: Option<i32>,
    /// `None` keeps it; `Some(None)` removes the cap.
    pub max_amount_per_day: Option<Option<Decimal>>,
}

pub async fn get_settings(
    pool: &PgPool,
    account_id: &AccountId,
    config: &PolicyConfig,
) -> Result<LowBalanceSettings, BillingError> {
    let mut connection = pool.acquire().await?;
    load(&mut connection, account_id.as_str(), config).await
}

/// The account's low-balance settings (the defaults when it has none).
/// Errors: `NotFound` when the account does not exist; database errors.
pub async fn load(
    connection: &mut PgConnection,
    account_id: &str,
    config: &PolicyConfig,
) -> Result<LowBalanceSettings, BillingError> {
    let account = ledger::load_account(&mut *connection, account_id).await?;
    let row = sqlx::query(SELECT_SETTINGS_SQL)
        .bind([account_id])
        .fetch_optional(connection)
        .await?;
    match row {
        Some(row) => from_row(&row, account.currency),
        None => Ok(defaults(account_id, account.currency, config)),
    }
}

/// The settings of several accounts in one round trip, for accounts known
/// to exist with the given currency (the balance events of one batch):
/// stored settings, else the defaults. Keyed by account id.
pub async fn load_many(
    connection: &mut PgConnection,
    accounts: &[(&str, Currency)],
    config: &PolicyConfig,
) -> Result<std::collections::HashMap<String, LowBalanceSettings>, BillingError> {
    let ids: Vec<&str> = accounts.iter().map(|(id, _)| *id).collect();
    let rows = sqlx::query(SELECT_SETTINGS_SQL)
        .bind(&ids)
        .fetch_all(connection)
        .await?;
    let mut settings = std::collections::HashMap::with_capacity(accounts.len());
    for (account_id, currency) in accounts {
        settings.insert(
            (*account_id).to_owned(),
            defaults(account_id, *currency, config),
        );
    }
    for row in &rows {
        let account_id: String = row.try_get("account_id")?;
        if let Some(entry) = settings.get_mut(&account_id) {
            *entry = from_row(row, entry.currency)?;
        }
    }
    Ok(settings)
}

const SELECT_SETTINGS_SQL: &str = "\
SELECT account_id, auto_refill_enabled, threshold, refill_amount, notification_enabled, \
       notification_threshold, max_top_ups_per_day, max_amount_per_day, updated_at \
  FROM low_balance_settings WHERE account_id = ANY($1)";

fn from_row(
    row: &sqlx::postgres::PgRow,
    currency: Currency,
) -> Result<LowBalanceSettings, BillingError> {
    Ok(LowBalanceSettings {
        account_id: row.try_get("account_id")?,
        currency,
        auto_refill_enabled: row.try_get("auto_refill_enabled")?,
        threshold: row.try_get("threshold")?,
        refill_amount: row.try_get("refill_amount")?,
        notification_enabled: row.try_get("notification_enabled")?,
        notification_threshold: row.try_get("notification_threshold")?,
        max_top_ups_per_day: row.try_get("max_top_ups_per_day")?,
        max_amount_per_day: row.try_get("max_amount_per_day")?,
        updated_at: row.try_get("updated_at")?,
    })
}

/// An account without stored settings: no alert, no auto refill, the configured caps.
fn defaults(account_id: &str, currency: Currency, config: &PolicyConfig) -> LowBalanceSettings {
    LowBalanceSettings {
        account_id: account_id.to_owned(),
        currency,
        auto_refill_enabled: false,
        threshold: Decimal::ZERO,
        refill_amount: Decimal::ZERO,
        notification_enabled: false,
        notification_threshold: Decimal::ZERO,
        max_top_ups_per_day: config.default_max_top_ups_per_day,
        max_amount_per_day: config.default_max_amount_per_day,
        updated_at: None,
    }
}

/// `refill_amount` lies within the refill bounds of `currency`, whenever
/// auto refill is on or an amount is given (`REFILL_OUT_OF_BOUNDS`).
pub fn check_refill_amount(
    auto_refill_enabled: bool,
    refill_amount: Decimal,
    currency: Currency,
    config: &PolicyConfig,
) -> Result<(), BillingError> {
    let refill_checked = auto_refill_enabled || !refill_amount.is_zero();
    let (min_refill, max_refill) = config.refill_bounds.of(currency);
    if refill_checked && (refill_amount < min_refill || refill_amount > max_refill) {
        return Err(BillingError::invalid_because(
            Reason::RefillOutOfBounds,
            "refill_amount",
            format!(
                "must be between {} and {}",
                currency.display(min_refill),
                currency.display(max_refill)
            ),
        ));
    }
    Ok(())
}

/// Validates and stores the settings; when auto refill is on and the
/// balance is already below the threshold, starts a top-up at once and
/// returns its id.
pub async fn apply_settings(
    pool: &PgPool,
    caller: &Caller,
    account_id: &AccountId,
    change: SettingsChange,
    config: &PolicyConfig,
    clock: &dyn Clock,
) -> Result<(LowBalanceSettings, Option<String>), BillingError> {
    let mut transaction = pool.begin().await?;
    let account = sqlx::query_scalar::<_, String>(
        "SELECT currency FROM accounts WHERE account_id = $1 FOR UPDATE",
    )
    .bind(account_id.as_str())
    .fetch_optional(&mut *transaction)
    .await?;
    if account.is_none() {
        return Err(BillingError::NotFound("account"));
    }
    let current = load(&mut transaction, account_id.as_str(), config).await?;
    check_refill_amount(
        change.auto_refill_enabled,
        change.refill_amount,
        current.currency,
        config,
    )?;
    if change.auto_refill_enabled {
        let usable =
            crate::payment_methods::has_active_auto_charge_method(&mut transaction, account_id)
                .await?;
        if !usable {
            return Err(BillingError::precondition(
                Reason::NoAutoChargePaymentMethod,
                format!("accounts/{account_id}"),
                "auto refill needs an active payment method with auto-charge on; add a card first",
            ));
        }
    }
    let max_top_ups_per_day = change
        .max_top_ups_per_day
        .unwrap_or(current.max_top_ups_per_day);
    let max_amount_per_day = change
        .max_amount_per_day
        .unwrap_or(current.max_amount_per_day);
    let row = sqlx::query(
        "INSERT INTO low_balance_settings (account_id, auto_refill_enabled, threshold, refill_amount, \
                notification_enabled, notification_threshold, max_top_ups_per_day, max_amount_per_day, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
         ON CONFLICT (account_id) DO UPDATE SET auto_refill_enabled = $2, threshold = $3, refill_amount = $4, \
                notification_enabled = $5, notification_threshold = $6, max_top_ups_per_day = $7, \
                max_amount_per_day = $8, updated_at = $9 \
         RETURNING updated_at",
    )
    .bind(account_id.as_str())
    .bind(change.auto_refill_enabled)
    .bind(change.threshold)
    .bind(change.refill_amount)
    .bind(change.notification_enabled)
    .bind(change.notification_threshold)
    .bind(max_top_ups_per_day)
    .bind(max_amount_per_day)
    .bind(clock.now())
    .fetch_one(&mut *transaction)
    .await?;
    audit::record(
        &mut transaction,
        caller,
        "apply_low_balance_settings",
        Some(account_id.as_str()),
        serde_json::json!({
            "auto_refill_enabled": change.auto_refill_enabled,
            "threshold": change.threshold.to_string(),
            "refill_amount": change.refill_amount.to_string(),
            "notification_enabled": change.notification_enabled,
            "notification_threshold": change.notification_threshold.to_string(),
            "max_top_ups_per_day": max_top_ups_per_day,
            "max_amount_per_day": max_amount_per_day.map(|d| d.to_string()),
        }),
    )
    .await?;
    let settings = LowBalanceSettings {
        account_id: account_id.as_str().to_owned(),
        currency: current.currency,
        auto_refill_enabled: change.auto_refill_enabled,
        threshold: change.threshold,
        refill_amount: change.refill_amount,
        notification_enabled: change.notification_enabled,
        notification_threshold: change.notification_threshold,
        max_top_ups_per_day,
        max_amount_per_day,
        updated_at: row.try_get("updated_at")?,
    };
    let live = super::crossing::Observed::live(
        &ledger::load_account(&mut transaction, account_id.as_str()).await?,
    );
    let total = live.total;
    let stamp = settings
        .updated_at
        .map(|t| t.timestamp_micros())
        .unwrap_or_default();
    // Already below a newly set alert threshold: the alert goes out now, not at the next crossing.
    let alert_changed = !current.notification_enabled
        || current.notification_threshold != settings.notification_threshold;
    if settings.notification_enabled && alert_changed && total < settings.notification_threshold {
        let notice = Notice::LowBalance {
            total_balance: total,
            threshold: settings.notification_threshold,
            auto_refill: settings
                .auto_refill_enabled
                .then_some(settings.refill_amount),
        };
        let key = format!("low_balance:{account_id}:apply:{stamp}");
        notifications::enqueue(&mut transaction, account_id.as_str(), &notice, &key).await?;
    }
    // A crossing a cap stopped resumes at once when the caps were raised or
    // removed: it waited for the rolling window of caps that no longer hold.
    let loosened = max_top_ups_per_day > current.max_top_ups_per_day
        || match (current.max_amount_per_day, max_amount_per_day) {
            (Some(_), None) => true,
            (Some(old), Some(new)) => new > old,
            (None, _) => false,
        };
    let capped = matches!(
        super::crossing::load(&mut transaction, account_id.as_str())
            .await?
            .0,
        super::crossing::CrossingState::Below {
            resume_at: Some(_),
            ..
        }
    );
    // The crossing state is shared with the event decider under this lock:
    // switching auto refill off ends the open automatic top-ups and disarms
    // the crossing; switching it on (or re-applying) starts a top-up only
    // when it arms a new crossing, or resumes one a loosened cap stopped.
    let started = if settings.auto_refill_enabled {
        match super::crossing::ensure_top_up(
            &mut transaction,
            &settings,
            live,
            loosened && capped,
            config,
            clock,
        )
        .await?
        {
            super::crossing::Ensured::Started(top_up_id) => Some(top_up_id),
            _ => None,
        }
    } else {
        super::crossing::rearm(
            &mut transaction,
            account_id.as_str(),
            live.as_of,
            super::cancel_reason::AUTO_REFILL_DISABLED,
            clock,
        )
        .await?;
        None
    };
    transaction.commit().await?;
    Ok((settings, started))
}
