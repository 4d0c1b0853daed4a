//! The per-account crossing state of auto top-up, and the one function that
//! decides whether an automatic top-up starts.
//!
//! The state lives in `top_up_crossings` and changes only under the account
//! row lock: `ARMED` (total balance at or above the threshold, or never
//! crossed) or `BELOW` with the id of the crossing being handled. The event
//! decider, "Apply Changes", a successful automatic top-up (the chain) and the
//! engine's cap-window resumption all call [`ensure_top_up`] with the account
//! locked, so a late event and an Apply can never both start a top-up for one
//! crossing, in any order, on any replica; and at most one automatic top-up
//! per account is open (a partial unique index says so too).

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::PgConnection;
use uuid::Uuid;

use super::settings::{LowBalanceSettings, PolicyConfig};
use super::{Clock, TopUpStatus, cancel_reason, new_top_up_id};
use crate::audit;
use crate::error::BillingError;
use crate::notifications::{self, Notice};
use crate::telemetry::metrics;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum CrossingState {
    Armed,
    Below {
        crossing_id: String,
        resume_at: Option<DateTime<Utc>>,
    },
}

/// A total balance as someone saw it, and the account version (event
/// sequence) it belongs to: the live one (`Account::version`) or an event's.
#[derive(Debug, Clone, Copy)]
pub(super) struct Observed {
    pub total: Decimal,
    pub as_of: i64,
}

impl Observed {
    pub fn live(account: &crate::ledger::Account) -> Observed {
        Observed {
            total: account.total_balance(),
            as_of: account.version,
        }
    }
}

/// True when an event may change the crossing state: newer than what the
/// state reflects, and on the other side of the threshold (a cheap read
/// without the lock; [`ensure_top_up`] decides under it).
pub(super) async fn may_change(
    connection: &mut PgConnection,
    settings: &LowBalanceSettings,
    observed: Observed,
) -> Result<bool, BillingError> {
    let below = observed.total < settings.threshold;
    let (state, as_of) = load(connection, &settings.account_id).await?;
    Ok(observed.as_of > as_of
        && match state {
            CrossingState::Armed => below,
            CrossingState::Below { .. } => !below,
        })
}

/// `state, crossing_id, resume_at, as_of_version` of `top_up_crossings`.
type CrossingRow = (String, Option<String>, Option<DateTime<Utc>>, i64);

/// The account's crossing state (`Armed` when never recorded) and the
/// account version it was decided at.
pub(super) async fn load(
    connection: &mut PgConnection,
    account_id: &str,
) -> Result<(CrossingState, i64), BillingError> {
    let row: Option<CrossingRow> = sqlx::query_as(
        "SELECT state, crossing_id, resume_at, as_of_version FROM top_up_crossings WHERE account_id = $1",
    )
    .bind(account_id)
    .fetch_optional(connection)
    .await?;
    Ok(match row {
        Some((state, Some(crossing_id), resume_at, as_of)) if state == "BELOW" => (
            CrossingState::Below {
                crossing_id,
                resume_at,
            },
            as_of,
        ),
        Some((_, _, _, as_of)) => (CrossingState::Armed, as_of),
        None => (CrossingState::Armed, 0),
    })
}

async fn store(
    connection: &mut PgConnection,
    account_id: &str,
    state: &CrossingState,
    as_of: i64,
    now: DateTime<Utc>,
) -> Result<(), BillingError> {
    let (name, crossing_id, resume_at) = match state {
        CrossingState::Armed => ("ARMED", None, None),
        CrossingState::Below {
            crossing_id,
            resume_at,
        } => ("BELOW", Some(crossing_id.as_str()), *resume_at),
    };
    sqlx::query(
        "INSERT INTO top_up_crossings (account_id, state, crossing_id, resume_at, updated_at, as_of_version) \
         VALUES ($1, $2, $3, $4, $5, $6) \
         ON CONFLICT (account_id) DO UPDATE SET state = $2, crossing_id = $3, resume_at = $4, updated_at = $5, \
                as_of_version = GREATEST(top_up_crossings.as_of_version, $6)",
    )
    .bind(account_id)
    .bind(name)
    .bind(crossing_id)
    .bind(resume_at)
    .bind(now)
    .bind(as_of)
    .execute(connection)
    .await?;
    Ok(())
}

/// Re-arms the crossing (the balance is back at or above the threshold, or
/// auto refill was switched off) and ends every open automatic top-up that is
/// not mid-charge with `reason`. A top-up being charged right now is left to
/// its driver, which re-checks the live state before its next charge.
/// The caller holds the account row lock.
pub(super) async fn rearm(
    connection: &mut PgConnection,
    account_id: &str,
    as_of: i64,
    reason: &str,
    clock: &dyn Clock,
) -> Result<u64, BillingError> {
    let now = clock.now();
    store(
        &mut *connection,
        account_id,
        &CrossingState::Armed,
        as_of,
        now,
    )
    .await?;
    let canceled_ids: Vec<String> = sqlx::query_scalar(
        "UPDATE top_ups SET status = 'CANCELED', failure_reason = $2, next_attempt_at = NULL, waits_for = NULL, updated_at = $3 \
          WHERE account_id = $1 AND trigger = 'AUTOMATIC' AND status IN ('PENDING', 'RETRY_SCHEDULED') \
            AND (lease_until IS NULL OR lease_until <= $3) \
            AND NOT EXISTS (SELECT 1 FROM top_up_attempts a \
                             WHERE a.top_up_id = top_ups.top_up_id AND a.outcome = 'UNKNOWN') \
          RETURNING top_up_id",
    )
    .bind(account_id)
    .bind(reason)
    .bind(now)
    .fetch_all(&mut *connection)
    .await?;
    for top_up_id in &canceled_ids {
        metrics::top_up_finished(TopUpStatus::Canceled.as_str());
        audit::record(
            &mut *connection,
            &super::engine_caller(),
            "finish_top_up",
            Some(account_id),
            serde_json::json!({
                "top_up_id": top_up_id,
                "status": TopUpStatus::Canceled.as_str(),
                "trigger": super::Trigger::Automatic.as_str(),
                "reason": reason,
            }),
        )
        .await?;
    }
    let canceled = canceled_ids.len() as u64;
    if canceled > 0 {
        tracing::info!(
            account_id,
            canceled,
            reason,
            "open automatic top-ups canceled"
        );
    }
    Ok(canceled)
}

/// What [`ensure_top_up`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Ensured {
    /// Nothing to start (above the threshold, auto refill off, or the
    /// crossing is already handled).
    Nothing,
    /// A new automatic top-up was recorded `PENDING`: wake the engine.
    Started(String),
    /// A cap stopped it: recorded `CAP_REACHED` and emailed.
    Capped,
}

/// Decides whether an automatic top-up starts now, from `total` — the total
/// balance the caller observed: the live one ("Apply Changes", the chain,
/// the engine), or the one an event left (the decider follows each
/// account's events in order, so every downward pass is seen). The caller
/// holds the account row lock and passes the current settings.
///
/// - auto refill off: nothing (switching it off re-arms; see [`rearm`]);
/// - total balance at or above the threshold: re-arm (ending open automatic
///   top-ups as `balance_restored`);
/// - below and armed: a new crossing, and its first top-up;
/// - below, crossing handled: a top-up only when `chain` (the previous one of
///   this crossing succeeded and left the account below) or the cap window
///   that stopped the crossing has passed; never while one is open.
pub(super) async fn ensure_top_up(
    connection: &mut PgConnection,
    settings: &LowBalanceSettings,
    observed: Observed,
    chain: bool,
    config: &PolicyConfig,
    clock: &dyn Clock,
) -> Result<Ensured, BillingError> {
    if !settings.auto_refill_enabled {
        return Ok(Ensured::Nothing);
    }
    let account_id = settings.account_id.as_str();
    let total = observed.total;
    let (state, as_of) = load(&mut *connection, account_id).await?;
    if observed.as_of < as_of {
        // Older than what the state already reflects (a late event).
        return Ok(Ensured::Nothing);
    }
    if total >= settings.threshold {
        if state != CrossingState::Armed {
            rearm(
                connection,
                account_id,
                observed.as_of,
                cancel_reason::BALANCE_RESTORED,
                clock,
            )
            .await?;
        }
        return Ok(Ensured::Nothing);
    }
    let now = clock.now();
    let crossing_id = match state {
        CrossingState::Armed => {
            metrics::engine_decision("top_up", "crossing");
            format!("cr_{}", Uuid::now_v7().simple())
        }
        CrossingState::Below {
            crossing_id,
            resume_at,
        } => {
            let resumes = resume_at.is_some_and(|at| at <= now);
            if !chain && !resumes {
                return Ok(Ensured::Nothing);
            }
            crossing_id
        }
    };
    let below = CrossingState::Below {
        crossing_id: crossing_id.clone(),
        resume_at: None,
    };
    store(&mut *connection, account_id, &below, observed.as_of, now).await?;
    if has_open_automatic(&mut *connection, account_id).await? {
        return Ok(Ensured::Nothing);
    }
    start(connection, settings, observed, &crossing_id, config, clock).await
}

async fn has_open_automatic(
    connection: &mut PgConnection,
    account_id: &str,
) -> Result<bool, BillingError> {
    let open: Option<String> = sqlx::query_scalar(
        "SELECT top_up_id FROM top_ups WHERE account_id = $1 AND trigger = 'AUTOMATIC' \
            AND status IN ('PENDING', 'RETRY_SCHEDULED', 'UNKNOWN') LIMIT 1",
    )
    .bind(account_id)
    .fetch_optional(connection)
    .await?;
    Ok(open.is_some())
}

/// Where the rolling 24 h caps stand for an account.
pub(super) struct CapRoom {
    /// Automatic top-ups started in the window (whatever their outcome).
    pub started: i64,
    /// Charged or being charged automatically in the window.
    pub charged: Decimal,
    /// When the oldest counted top-up leaves the window.
    pub oldest: Option<DateTime<Utc>>,
}

/// The caps' window: every automatic top-up started counts (only
/// `CAP_REACHED` records, which started nothing, do not); amounts count
/// when charged or possibly charged. `except` leaves one top-up out.
pub(super) async fn cap_room(
    connection: &mut PgConnection,
    account_id: &str,
    except: Option<&str>,
    now: DateTime<Utc>,
) -> Result<CapRoom, BillingError> {
    let (started, charged, oldest): (i64, Decimal, Option<DateTime<Utc>>) = sqlx::query_as(
        "SELECT COUNT(*), \
                COALESCE(SUM(amount) FILTER (WHERE status IN ('SUCCEEDED', 'UNKNOWN', 'NEEDS_ATTENTION')), 0), \
                MIN(created_at) \
           FROM top_ups \
          WHERE account_id = $1 AND trigger = 'AUTOMATIC' AND created_at > $2 \
            AND status <> 'CAP_REACHED' AND top_up_id IS DISTINCT FROM $3",
    )
    .bind(account_id)
    .bind(now - chrono::Duration::hours(24))
    .bind(except)
    .fetch_one(connection)
    .await?;
    Ok(CapRoom {
        started,
        charged,
        oldest,
    })
}

/// Records the crossing's next automatic top-up `PENDING` (its amount is
/// computed when it is charged), or `CAP_REACHED` when the count cap forbids
/// it; then the customer is told and the crossing resumes when the window allows.
async fn start(
    connection: &mut PgConnection,
    settings: &LowBalanceSettings,
    observed: Observed,
    crossing_id: &str,
    config: &PolicyConfig,
    clock: &dyn Clock,
) -> Result<Ensured, BillingError> {
    let account_id = settings.account_id.as_str();
    let now = clock.now();
    let room = cap_room(&mut *connection, account_id, None, now).await?;
    let (min, max) = config.refill_bounds.of(settings.currency);
    let refill = settings.refill_amount.clamp(min, max);
    let count_capped = room.started >= i64::from(settings.max_top_ups_per_day);
    let amount_capped = settings
        .max_amount_per_day
        .is_some_and(|cap| cap - room.charged < refill.min(cap));
    if count_capped || amount_capped {
        let cap = if count_capped {
            format!(
                "at most {} automatic top-ups per 24 hours",
                settings.max_top_ups_per_day
            )
        } else {
            format!(
                "at most {} charged automatically per 24 hours",
                settings
                    .currency
                    .display(settings.max_amount_per_day.unwrap_or_default())
            )
        };
        record_cap_reached(
            connection,
            settings,
            crossing_id,
            refill,
            &cap,
            observed,
            room.oldest,
            clock,
        )
        .await?;
        return Ok(Ensured::Capped);
    }
    let top_up_id = new_top_up_id();
    sqlx::query(
        "INSERT INTO top_ups (top_up_id, account_id, trigger, status, amount, currency, crossing_key, \
                              next_attempt_at, created_at, updated_at) \
         VALUES ($1, $2, 'AUTOMATIC', 'PENDING', $3, $4, $5, $6, $6, $6)",
    )
    .bind(&top_up_id)
    .bind(account_id)
    .bind(refill)
    .bind(settings.currency.code())
    .bind(crossing_id)
    .bind(now)
    .execute(&mut *connection)
    .await?;
    audit::record(
        connection,
        &super::engine_caller(),
        "start_top_up",
        Some(account_id),
        serde_json::json!({
            "top_up_id": top_up_id,
            "trigger": super::Trigger::Automatic.as_str(),
            "refill_amount": settings.currency.format(refill),
        }),
    )
    .await?;
    tracing::info!(account_id, %top_up_id, crossing_id, "automatic top-up started");
    Ok(Ensured::Started(top_up_id))
}

/// A cap stopped the crossing: a `CAP_REACHED` record, an email, and the
/// crossing's resumption when the oldest counted top-up leaves the window.
#[allow(clippy::too_many_arguments)]
pub(super) async fn record_cap_reached(
    connection: &mut PgConnection,
    settings: &LowBalanceSettings,
    crossing_id: &str,
    amount: Decimal,
    cap: &str,
    observed: Observed,
    oldest_counted: Option<DateTime<Utc>>,
    clock: &dyn Clock,
) -> Result<String, BillingError> {
    let total_balance = observed.total;
    let account_id = settings.account_id.as_str();
    let now = clock.now();
    let resume_at = oldest_counted.map(|t| t + chrono::Duration::hours(24));
    let top_up_id = new_top_up_id();
    sqlx::query(
        "INSERT INTO top_ups (top_up_id, account_id, trigger, status, amount, currency, crossing_key, \
                              failure_reason, next_attempt_at, created_at, updated_at) \
         VALUES ($1, $2, 'AUTOMATIC', 'CAP_REACHED', $3, $4, $5, $6, $7, $8, $8)",
    )
    .bind(&top_up_id)
    .bind(account_id)
    .bind(amount)
    .bind(settings.currency.code())
    .bind(crossing_id)
    .bind(cap)
    .bind(resume_at)
    .bind(now)
    .execute(&mut *connection)
    .await?;
    let below = CrossingState::Below {
        crossing_id: crossing_id.to_owned(),
        resume_at,
    };
    store(&mut *connection, account_id, &below, observed.as_of, now).await?;
    metrics::top_up_finished(TopUpStatus::CapReached.as_str());
    audit::record(
        &mut *connection,
        &super::engine_caller(),
        "finish_top_up",
        Some(account_id),
        serde_json::json!({
            "top_up_id": top_up_id,
            "status": TopUpStatus::CapReached.as_str(),
            "trigger": super::Trigger::Automatic.as_str(),
            "reason": cap,
        }),
    )
    .await?;
    tracing::warn!(account_id, %top_up_id, %cap, "automatic top-up not charged: cap reached");
    let notice = Notice::TopUpCapReached {
        cap: cap.to_owned(),
        total_balance,
    };
    notifications::enqueue(
        connection,
        account_id,
        &notice,
        &format!("top_up_cap_reached:{top_up_id}"),
    )
    .await?;
    Ok(top_up_id)
}

/// The smallest multiple of `refill` that lifts `total_balance` to the
/// threshold or above (at least one).
pub fn refill_multiple(threshold: Decimal, total_balance: Decimal, refill: Decimal) -> Decimal {
    if refill <= Decimal::ZERO {
        return Decimal::ONE;
    }
    let missing = threshold - total_balance;
    (missing / refill).ceil().max(Decimal::ONE)
}

/// The amount of an automatic charge, computed when charging: the smallest
/// multiple of the refill amount that lifts `total_balance` to the
/// threshold, at most `max` (the currency's largest refill) and at most
/// `room` (what the amount cap leaves). `None` when not even one refill fits
/// the room.
pub(super) fn automatic_amount(
    threshold: Decimal,
    total_balance: Decimal,
    refill: Decimal,
    max: Decimal,
    room: Option<Decimal>,
) -> Option<Decimal> {
    let refill = refill.min(max);
    let wanted = refill * refill_multiple(threshold, total_balance, refill);
    let largest = refill * (max / refill).floor().max(Decimal::ONE);
    let amount = wanted.min(largest);
    match room {
        None => Some(amount),
        Some(room) if room >= amount => Some(amount),
        Some(room) if room >= refill => Some(refill * (room / refill).floor()),
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(text: &str) -> Decimal {
        text.parse().unwrap()
    }

    #[test]
    fn one_refill_when_it_is_enough() {
        assert_eq!(refill_multiple(d("10"), d("5"), d("50")), d("1"));
    }

    #[test]
    fn the_smallest_multiple_that_reaches_the_threshold() {
        assert_eq!(refill_multiple(d("100"), d("-45"), d("50")), d("3"));
        assert_eq!(refill_multiple(d("100"), d("0"), d("50")), d("2"));
        assert_eq!(refill_multiple(d("100"), d("0.01"), d("50")), d("2"));
    }

    #[test]
    fn the_amount_is_computed_from_the_live_balance_within_bound_and_cap() {
        let max = d("10000");
        assert_eq!(
            automatic_amount(d("40"), d("39"), d("30"), max, None),
            Some(d("30"))
        );
        assert_eq!(
            automatic_amount(d("40"), d("0"), d("30"), max, None),
            Some(d("60"))
        );
        assert_eq!(
            automatic_amount(d("40"), d("0"), d("30"), d("50"), None),
            Some(d("30")),
            "never above the currency's largest refill"
        );
        assert_eq!(
            automatic_amount(d("40"), d("0"), d("30"), max, Some(d("45"))),
            Some(d("30")),
            "the amount cap cuts it to whole refills"
        );
        assert_eq!(
            automatic_amount(d("40"), d("0"), d("30"), max, Some(d("29"))),
            None
        );
    }
}
