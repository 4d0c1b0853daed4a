//! The one charge path. Manual Add Funds, RetryPaymentMethod and automatic
//! top-ups all run through the same steps; they differ only in their inputs
//! (which cards, on- or off-session, the amount rule):
//!
//! 1. **begin** — one transaction under the account row lock: re-read the
//!    top-up, the settings, the live total balance and the cards; end an
//!    automatic top-up that is no longer wanted (`CANCELED`), apply the gate
//!    (nothing is charged while another charge of the account has an unknown
//!    outcome), compute the amount now, choose the card, and record the
//!    attempt (`UNKNOWN`) with its gateway idempotency key before any call;
//! 2. **charge** — the gateway call, with no transaction open;
//! 3. **settle** — one transaction under the account row lock: the attempt's
//!    outcome (only an attempt still `UNKNOWN` is settled, so a replay, a
//!    webhook and a reconciliation settle it once), the card's state
//!    (guarded transitions), and on success the ledger credit and the receipt.
//!
//! An attempt left `UNKNOWN` (a timeout, a crash) is reconciled by asking the
//! gateway by its key, a bounded number of times; then `NEEDS_ATTENTION`.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Datelike, Utc};
use rust_decimal::Decimal;
use sqlx::{PgConnection, PgPool};
use tokio::sync::Notify;
use uuid::Uuid;

use super::crossing::{self, Ensured, Observed};
use super::settings::{self, PolicyConfig};
use super::{
    AttemptOutcome, Clock, PendingChallenge, TopUp, TopUpStatus, Trigger, cancel_reason,
    gateway_key, ledger_key, store,
};
use crate::audit;
use crate::error::BillingError;
use crate::events::CommitSignal;
use crate::gateway::{Charge, ChargeRequest, GatewayError, Outcome, PaymentGateway};
use crate::ids::AccountId;
use crate::ledger::{self, EntryKind, Posting};
use crate::notifications::{self, CardLabel, Notice};
use crate::payment_methods::{self, MethodStatus, PaymentMethod};
use crate::telemetry::links::{self, Cause};
use crate::telemetry::metrics;

/// The top-up capability: the database, the card processor, the clock and
/// the rules. Cheap to clone.
#[derive(Clone)]
pub struct TopUps {
    pub(super) pool: PgPool,
    pub(super) gateway: Arc<dyn PaymentGateway>,
    pub(super) clock: Arc<dyn Clock>,
    pub(super) config: PolicyConfig,
    /// Woken when a top-up was started or reopened (the engine drives it).
    pub(super) wake: Arc<Notify>,
    /// Given after a settlement credited the ledger (its balance event).
    pub(super) commits: CommitSignal,
}

/// Who drives a top-up: the customer's request (present, on-session) or
/// the engine (automatic top-ups, and manual ones whose process died).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Driver {
    Caller,
    Engine,
}

/// One driver's hold on a top-up (`top_ups.lease_owner`).
#[derive(Debug, Clone)]
pub(super) struct Lease {
    pub top_up_id: String,
    pub account: AccountId,
    pub owner: Uuid,
}

/// One attempt, recorded before the gateway hears of it.
#[derive(Debug, Clone)]
struct Attempt {
    number: i32,
    card: PaymentMethod,
    amount: Decimal,
    currency: crate::money::Currency,
    off_session: bool,
    key: String,
}

enum Begin {
    Charge(Attempt),
    Reconcile(Attempt),
    /// Nothing (more) to charge now.
    Stop,
}

/// How a gateway answer arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Answer {
    /// The answer to this driver's own call.
    Direct,
    /// On its own (a processor's webhook), possibly for an attempt parked as
    /// `REQUIRES_ACTION`.
    Reported,
    /// The customer completed the challenge (ConfirmTopUp): a decline ends
    /// the top-up, whatever its trigger.
    Confirmed,
}

/// After settling an attempt: go on with the next card, or stop.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Next {
    Continue,
    Stop,
}

impl TopUps {
    pub fn new(
        pool: PgPool,
        gateway: Arc<dyn PaymentGateway>,
        clock: Arc<dyn Clock>,
        config: PolicyConfig,
        wake: Arc<Notify>,
    ) -> Self {
        Self {
            pool,
            gateway,
            clock,
            config,
            wake,
            commits: CommitSignal::default(),
        }
    }

    /// Tells this process's event feed about the credits settlements commit
    /// (otherwise readers learn of them by polling).
    pub fn with_commit_signal(mut self, commits: CommitSignal) -> Self {
        self.commits = commits;
        self
    }

    /// Decides again, on the live state of `account_id`, whether an automatic
    /// top-up starts now (a cap window passed); `rearm` first frees the
    /// account's crossing. Wakes the engine when one starts; returns true then.
    pub(super) async fn recheck_crossing(
        &self,
        account_id: &str,
        rearm: bool,
    ) -> Result<bool, BillingError> {
        let started = self.decide_crossing(account_id, rearm).await?;
        if started.is_some() {
            self.wake.notify_one();
        }
        Ok(started.is_some())
    }

    /// [`TopUps::recheck_crossing`] without waking the engine: the id of the
    /// automatic top-up it started, for a caller that drives it itself.
    pub(super) async fn decide_crossing(
        &self,
        account_id: &str,
        rearm: bool,
    ) -> Result<Option<String>, BillingError> {
        let mut transaction = self.pool.begin().await?;
        lock_account(&mut transaction, &AccountId::parse(account_id)?).await?;
        let started = self
            .recheck_locked(&mut transaction, account_id, rearm)
            .await?;
        transaction.commit().await?;
        Ok(started)
    }

    /// [`TopUps::decide_crossing`] inside the caller's transaction, which
    /// holds the account row lock; the caller commits and, when this returns
    /// the id of a started top-up, wakes the engine or drives it.
    pub(super) async fn recheck_locked(
        &self,
        connection: &mut PgConnection,
        account_id: &str,
        rearm: bool,
    ) -> Result<Option<String>, BillingError> {
        let settings = settings::load(&mut *connection, account_id, &self.config).await?;
        let live = Observed::live(&ledger::load_account(&mut *connection, account_id).await?);
        if rearm || !settings.auto_refill_enabled {
            let reason = if settings.auto_refill_enabled {
                cancel_reason::BALANCE_RESTORED
            } else {
                cancel_reason::AUTO_REFILL_DISABLED
            };
            crossing::rearm(
                &mut *connection,
                account_id,
                live.as_of,
                reason,
                self.clock.as_ref(),
            )
            .await?;
        }
        let ensured = crossing::ensure_top_up(
            &mut *connection,
            &settings,
            live,
            false,
            &self.config,
            self.clock.as_ref(),
        )
        .await?;
        Ok(match ensured {
            Ensured::Started(top_up_id) => Some(top_up_id),
            _ => None,
        })
    }

    /// Drives a top-up this driver holds the lease of until it needs nothing
    /// more now (settled, waiting for a round, the customer or a reconciliation).
    #[tracing::instrument(name = "top_up.drive", skip_all, fields(account_id = %lease.account, top_up_id = %lease.top_up_id, driver = ?driver))]
    pub(super) async fn drive(&self, lease: &Lease, driver: Driver) -> Result<(), BillingError> {
        links::link_to(&Cause::TopUp(lease.top_up_id.clone()));
        loop {
            let next = match self.begin(lease, driver).await? {
                Begin::Stop => return Ok(()),
                Begin::Charge(attempt) => {
                    let charge = self.charge(lease, &attempt).await;
                    self.settle(lease, attempt.number, charge, Answer::Direct)
                        .await?
                }
                Begin::Reconcile(attempt) => self.reconcile(lease, driver, attempt).await?,
            };
            if next == Next::Stop || !self.still_holds(lease).await? {
                return Ok(());
            }
        }
    }

    /// Takes the lease of one top-up that is not settled; `None` when
    /// another driver holds it or it is settled.
    pub(super) async fn claim(
        &self,
        account: &AccountId,
        top_up_id: &str,
    ) -> Result<Option<Lease>, BillingError> {
        let now = self.clock.now();
        let owner = Uuid::new_v4();
        let claimed = sqlx::query(
            "UPDATE top_ups SET lease_until = $3, lease_owner = $4, waits_for = NULL \
              WHERE account_id = $1 AND top_up_id = $2 AND status IN ('PENDING', 'UNKNOWN') \
                AND (lease_until IS NULL OR lease_until <= $5)",
        )
        .bind(account.as_str())
        .bind(top_up_id)
        .bind(now + self.config.lease)
        .bind(owner)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok((claimed.rows_affected() == 1).then(|| Lease {
            top_up_id: top_up_id.to_owned(),
            account: account.clone(),
            owner,
        }))
    }

    /// Ends a driver's hold; `next_attempt_at` when it should come back.
    pub(super) async fn release(
        &self,
        lease: &Lease,
        next_attempt_at: Option<DateTime<Utc>>,
    ) -> Result<(), BillingError> {
        sqlx::query(
            "UPDATE top_ups SET lease_until = NULL, lease_owner = NULL, \
                    next_attempt_at = COALESCE($3, next_attempt_at) \
              WHERE top_up_id = $1 AND lease_owner = $2",
        )
        .bind(&lease.top_up_id)
        .bind(lease.owner)
        .bind(next_attempt_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn still_holds(&self, lease: &Lease) -> Result<bool, BillingError> {
        let held: Option<bool> = sqlx::query_scalar(
            "SELECT lease_owner = $2 AND status IN ('PENDING', 'UNKNOWN') FROM top_ups WHERE top_up_id = $1",
        )
        .bind(&lease.top_up_id)
        .bind(lease.owner)
        .fetch_optional(&self.pool)
        .await?
        .flatten();
        Ok(held.unwrap_or(false))
    }

    /// Step 1: decide on the live state, under the account row lock.
    async fn begin(&self, lease: &Lease, driver: Driver) -> Result<Begin, BillingError> {
        let now = self.clock.now();
        let account = &lease.account;
        let mut transaction = self.pool.begin().await?;
        let currency = lock_account(&mut transaction, account).await?;
        let top_up = store::lock(&mut transaction, account, &lease.top_up_id).await?;
        let holder: Option<Uuid> =
            sqlx::query_scalar("SELECT lease_owner FROM top_ups WHERE top_up_id = $1")
                .bind(&lease.top_up_id)
                .fetch_one(&mut *transaction)
                .await?;
        if top_up.status.is_final() || holder != Some(lease.owner) {
            // Ended at once: a dropped transaction keeps its locks until the
            // pool gets round to rolling it back.
            transaction.commit().await?;
            return Ok(Begin::Stop);
        }
        // An attempt whose outcome is unknown is settled before anything else.
        if let Some(pending) = top_up
            .attempts
            .iter()
            .rev()
            .find(|a| a.outcome == AttemptOutcome::Unknown)
        {
            if top_up.status == TopUpStatus::Unknown
                && top_up.reconcile_tries > self.config.reconcile_max_tries
            {
                self.needs_attention(
                    &mut transaction,
                    &top_up,
                    "reconcile_exhausted: the gateway never told the outcome of the charge",
                )
                .await?;
                transaction.commit().await?;
                return Ok(Begin::Stop);
            }
            let card =
                payment_methods::find_method(&mut transaction, account, &pending.payment_method_id)
                    .await?;
            transaction.commit().await?;
            return Ok(Begin::Reconcile(Attempt {
                number: pending.attempt_number,
                key: gateway_key(&top_up.top_up_id, pending.attempt_number),
                off_session: top_up.trigger == Trigger::Automatic,
                amount: pending.amount,
                currency,
                card,
            }));
        }
        if top_up.trigger != Trigger::Automatic
            && driver == Driver::Engine
            && top_up.attempts.is_empty()
        {
            // Its process died with no attempt recorded: the gateway is
            // asked by the one attempt's key (credited if it was charged,
            // closed if it never was); nothing is charged now.
            let method_id = top_up.payment_method_id.clone().unwrap_or_default();
            let card = payment_methods::find_method(&mut transaction, account, &method_id).await?;
            let key = gateway_key(&top_up.top_up_id, 1);
            sqlx::query(
                "INSERT INTO top_up_attempts (top_up_id, attempt_number, payment_method_id, outcome, amount, \
                                              gateway_idempotency_key, round, attempted_at) \
                 VALUES ($1, 1, $2, 'UNKNOWN', $3, $4, 0, $5)",
            )
            .bind(&top_up.top_up_id)
            .bind(&card.payment_method_id)
            .bind(top_up.amount)
            .bind(&key)
            .bind(top_up.created_at)
            .execute(&mut *transaction)
            .await?;
            transaction.commit().await?;
            return Ok(Begin::Reconcile(Attempt {
                number: 1,
                card,
                amount: top_up.amount,
                currency,
                off_session: false,
                key,
            }));
        }
        let number = top_up
            .attempts
            .iter()
            .map(|a| a.attempt_number)
            .max()
            .unwrap_or(0)
            + 1;
        let chosen = match top_up.trigger {
            Trigger::Automatic => {
                self.choose_automatic(&mut transaction, &top_up, now)
                    .await?
            }
            Trigger::Manual | Trigger::Retry => {
                self.choose_manual(&mut transaction, &top_up, driver, now)
                    .await?
            }
        };
        let Some((card, amount)) = chosen else {
            transaction.commit().await?;
            return Ok(Begin::Stop);
        };
        let key = gateway_key(&top_up.top_up_id, number);
        sqlx::query(
            "INSERT INTO top_up_attempts (top_up_id, attempt_number, payment_method_id, outcome, amount, \
                                          gateway_idempotency_key, round, attempted_at) \
             VALUES ($1, $2, $3, 'UNKNOWN', $4, $5, $6, $7)",
        )
        .bind(&top_up.top_up_id)
        .bind(number)
        .bind(&card.payment_method_id)
        .bind(amount)
        .bind(&key)
        .bind(top_up.rounds)
        .bind(now)
        .execute(&mut *transaction)
        .await?;
        sqlx::query(
            "UPDATE top_ups SET amount = $2, status = 'PENDING', lease_until = $3, updated_at = $4 \
              WHERE top_up_id = $1",
        )
        .bind(&top_up.top_up_id)
        .bind(amount)
        .bind(now + self.config.lease)
        .bind(now)
        .execute(&mut *transaction)
        .await?;
        transaction.commit().await?;
        Ok(Begin::Charge(Attempt {
            number,
            card,
            amount,
            currency,
            off_session: top_up.trigger == Trigger::Automatic,
            key,
        }))
    }

    /// Whether an automatic top-up is still wanted, on the live state read
    /// under the account lock the caller holds: auto refill on, and the total
    /// balance below the threshold. If not, the top-up ends `CANCELED`
    /// (`auto_refill_disabled`, or `balance_restored` with the crossing
    /// re-armed) and `None` is returned. The one check before every
    /// automatic charge: the next attempt of a round and the customer's
    /// confirmation of a 3-D Secure challenge (`confirm.rs`).
    pub(super) async fn still_wanted(
        &self,
        connection: &mut PgConnection,
        top_up: &TopUp,
    ) -> Result<Option<(settings::LowBalanceSettings, Observed)>, BillingError> {
        let account_id = top_up.account_id.as_str();
        let settings = settings::load(&mut *connection, account_id, &self.config).await?;
        if !settings.auto_refill_enabled {
            self.cancel(connection, top_up, cancel_reason::AUTO_REFILL_DISABLED)
                .await?;
            return Ok(None);
        }
        let live = Observed::live(&ledger::load_account(&mut *connection, account_id).await?);
        if live.total >= settings.threshold {
            self.cancel(connection, top_up, cancel_reason::BALANCE_RESTORED)
                .await?;
            crossing::rearm(
                connection,
                account_id,
                live.as_of,
                cancel_reason::BALANCE_RESTORED,
                self.clock.as_ref(),
            )
            .await?;
            return Ok(None);
        }
        Ok(Some((settings, live)))
    }

    /// The card and amount of an automatic top-up's next attempt, decided on
    /// the live state; `None` after ending or parking the top-up.
    async fn choose_automatic(
        &self,
        connection: &mut PgConnection,
        top_up: &TopUp,
        now: DateTime<Utc>,
    ) -> Result<Option<(PaymentMethod, Decimal)>, BillingError> {
        let account = AccountId::parse(&top_up.account_id)?;
        let Some((settings, live)) = self.still_wanted(connection, top_up).await? else {
            return Ok(None);
        };
        let total = live.total;
        if let Some(other) = gate_closed_by(&mut *connection, &account, &top_up.top_up_id).await? {
            tracing::info!(account_id = %account, top_up_id = %top_up.top_up_id, %other, "automatic top-up waits: another charge's outcome is unknown");
            // Due again once `other`'s outcome is known (the engine's due
            // query), or after `reconcile_after` at the latest.
            sqlx::query(
                "UPDATE top_ups SET lease_until = NULL, lease_owner = NULL, next_attempt_at = $2, \
                        waits_for = $3 WHERE top_up_id = $1",
            )
            .bind(&top_up.top_up_id)
            .bind(now + self.config.reconcile_after)
            .bind(&other)
            .execute(connection)
            .await?;
            return Ok(None);
        }
        let (_, max) = self.config.refill_bounds.of(settings.currency);
        let room = crossing::cap_room(
            &mut *connection,
            account.as_str(),
            Some(&top_up.top_up_id),
            now,
        )
        .await?;
        let amount_room = settings.max_amount_per_day.map(|cap| cap - room.charged);
        let refill = settings.refill_amount.min(max);
        let Some(amount) = crossing::automatic_amount(
            settings.threshold,
            total,
            settings.refill_amount,
            max,
            amount_room,
        ) else {
            let cap = format!(
                "at most {} charged automatically per 24 hours",
                settings
                    .currency
                    .display(settings.max_amount_per_day.unwrap_or_default())
            );
            sqlx::query(
                "UPDATE top_ups SET status = 'CAP_REACHED', failure_reason = $2, lease_until = NULL, \
                        lease_owner = NULL, updated_at = $3 WHERE top_up_id = $1",
            )
            .bind(&top_up.top_up_id)
            .bind(&cap)
            .bind(now)
            .execute(&mut *connection)
            .await?;
            let crossing_id = top_up.crossing_key.clone().unwrap_or_default();
            crossing::record_cap_reached(
                connection,
                &settings,
                &crossing_id,
                refill,
                &cap,
                live,
                room.oldest,
                self.clock.as_ref(),
            )
            .await?;
            return Ok(None);
        };
        let card = self
            .next_automatic_card(&mut *connection, &account, top_up, now)
            .await?;
        match card {
            Some(card) => Ok(Some((card, amount))),
            None => {
                self.finish_round(connection, top_up).await?;
                Ok(None)
            }
        }
    }

    /// The next card of this round: active auto-charge cards in priority
    /// order, plus those this top-up soft-declined in an earlier round;
    /// never a removed, auto-charge-off, expired or hard-declined card, nor
    /// one already tried this round. Read fresh under the account lock.
    async fn next_automatic_card(
        &self,
        connection: &mut PgConnection,
        account: &AccountId,
        top_up: &TopUp,
        now: DateTime<Utc>,
    ) -> Result<Option<PaymentMethod>, BillingError> {
        let cards = payment_methods::auto_charge_methods(&mut *connection, account).await?;
        let tried_this_round = |id: &str| {
            top_up
                .attempts
                .iter()
                .any(|a| a.payment_method_id == id && a.round == top_up.rounds)
        };
        let hard_declined_here = |id: &str| {
            top_up
                .attempts
                .iter()
                .any(|a| a.payment_method_id == id && a.hard_decline)
        };
        let soft_declined_here = |id: &str| {
            top_up.attempts.iter().any(|a| {
                a.payment_method_id == id
                    && a.outcome == AttemptOutcome::Declined
                    && !a.hard_decline
            })
        };
        Ok(cards.into_iter().find(|card| {
            let id = card.payment_method_id.as_str();
            let usable = card.status == MethodStatus::Active || soft_declined_here(id);
            usable && !is_expired(card, now) && !hard_declined_here(id) && !tried_this_round(id)
        }))
    }

    /// The card and amount of a manual or retry top-up's one attempt.
    async fn choose_manual(
        &self,
        connection: &mut PgConnection,
        top_up: &TopUp,
        driver: Driver,
        now: DateTime<Utc>,
    ) -> Result<Option<(PaymentMethod, Decimal)>, BillingError> {
        if !top_up.attempts.is_empty() {
            // Its one attempt is settled; nothing more to charge.
            return Ok(None);
        }
        if driver == Driver::Engine {
            // Only the customer's own request charges on-session (see `begin`).
            return Ok(None);
        }
        let account = AccountId::parse(&top_up.account_id)?;
        let method_id = top_up.payment_method_id.clone().unwrap_or_default();
        let card = payment_methods::find_method(&mut *connection, &account, &method_id).await?;
        if let Some(reason) = card_refusal(&card, now) {
            self.finish(connection, top_up, TopUpStatus::Failed, reason, None, None)
                .await?;
            return Ok(None);
        }
        if let Some(other) = gate_closed_by(&mut *connection, &account, &top_up.top_up_id).await? {
            let reason = format!(
                "another charge of the account ({other}) has an unknown outcome; try again once it is reconciled"
            );
            self.finish(connection, top_up, TopUpStatus::Failed, &reason, None, None)
                .await?;
            return Ok(None);
        }
        Ok(Some((card, top_up.amount)))
    }

    /// Step 2: one gateway charge; transport failures are an unknown outcome.
    async fn charge(&self, lease: &Lease, attempt: &Attempt) -> Charge {
        let request = ChargeRequest {
            token: attempt.card.gateway_token.clone(),
            amount: attempt.amount,
            currency: attempt.currency,
            idempotency_key: attempt.key.clone(),
            off_session: attempt.off_session,
        };
        // Timed and traced (`gateway.charge`) by the instrumented gateway.
        let result = self.gateway.charge(request).await;
        charge_or_unknown(&lease.top_up_id, result)
    }

    /// An attempt whose outcome is unknown: the gateway is asked by its key.
    /// A charge it knows is settled; one it never saw is sent again with the
    /// same key (the same attempt: it can never charge twice) while its
    /// driver is the customer or the engine of an automatic top-up, and only
    /// if the live state allows a charge now ([`Self::may_resend`]); a
    /// manual attempt whose process died is closed once old enough.
    async fn reconcile(
        &self,
        lease: &Lease,
        driver: Driver,
        attempt: Attempt,
    ) -> Result<Next, BillingError> {
        let found = self.gateway.find_charge(&attempt.key).await;
        let now = self.clock.now();
        let charge = match found {
            Ok(Some(charge)) if charge.outcome != Outcome::Unknown => charge,
            Ok(None) => {
                let mut connection = self.pool.acquire().await?;
                let top_up = store::get(&mut connection, &lease.account, &lease.top_up_id).await?;
                drop(connection);
                let manual = top_up.trigger != Trigger::Automatic;
                if manual && driver == Driver::Engine {
                    let attempted_at = top_up
                        .attempts
                        .iter()
                        .find(|a| a.attempt_number == attempt.number)
                        .map_or(now, |a| a.attempted_at);
                    if attempted_at + self.config.abandoned_after > now {
                        self.park_unknown(lease, attempted_at + self.config.abandoned_after)
                            .await?;
                        return Ok(Next::Stop);
                    }
                    return self.close_not_processed(lease, attempt.number).await;
                }
                if !self.may_resend(lease, &attempt).await? {
                    return Ok(Next::Stop);
                }
                self.charge(lease, &attempt).await
            }
            Ok(Some(_)) => {
                self.park_unknown(lease, now + self.config.reconcile_after)
                    .await?;
                return Ok(Next::Stop);
            }
            Err(error) => {
                tracing::warn!(top_up_id = %lease.top_up_id, %error, "reconciliation failed; will ask again");
                self.park_unknown(lease, now + self.config.reconcile_after)
                    .await?;
                return Ok(Next::Stop);
            }
        };
        self.settle(lease, attempt.number, charge, Answer::Direct)
            .await
    }

    /// Why attempt-bound money may not move now — a passed 3-D Secure
    /// answer (ConfirmTopUp) or a charge the processor never saw, sent again
    /// with its key (reconciliation) — with the top-up ended if it never
    /// can; `None`: charge. Such a charge is made *now*, so it meets the
    /// rules of every charge made now, on the live state read under the
    /// account lock the caller holds, not those of the moment its attempt
    /// was recorded:
    ///
    /// - the gate is open (no other charge of the account has an unknown
    ///   outcome): else refused, nothing changed;
    /// - the attempt's card can still be charged ([`card_refusal`], the rule
    ///   of Add Funds and Retry): else the top-up ends `FAILED`
    ///   (`payment_method_removed`, `payment_method_not_active`,
    ///   `expired_card`) and an automatic one's crossing starts the next
    ///   top-up on the other cards;
    /// - an automatic top-up is still wanted ([`Self::still_wanted`]: auto
    ///   refill on, the balance below the threshold): else `CANCELED`.
    pub(super) async fn refuse_charge(
        &self,
        connection: &mut PgConnection,
        top_up: &TopUp,
        payment_method_id: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<ChargeRefused>, BillingError> {
        let account = AccountId::parse(&top_up.account_id)?;
        if let Some(other) = gate_closed_by(&mut *connection, &account, &top_up.top_up_id).await? {
            return Ok(Some(ChargeRefused::Gate { other }));
        }
        let card =
            payment_methods::find_method(&mut *connection, &account, payment_method_id).await?;
        let automatic = top_up.trigger == Trigger::Automatic;
        if let Some(failure) = card_refusal(&card, now) {
            self.finish(connection, top_up, TopUpStatus::Failed, failure, None, None)
                .await?;
            let started_next = automatic
                && self
                    .recheck_locked(connection, account.as_str(), true)
                    .await?
                    .is_some();
            return Ok(Some(ChargeRefused::Card {
                failure,
                payment_method_id: card.payment_method_id,
                started_next,
            }));
        }
        if automatic && self.still_wanted(connection, top_up).await?.is_none() {
            return Ok(Some(ChargeRefused::NotWanted));
        }
        Ok(None)
    }

    /// Whether a charge the processor never saw may be sent again with its
    /// key: only if a charge made now would be ([`Self::refuse_charge`]).
    /// Refused for good, the attempt is closed as `not_processed` (nothing
    /// was charged) with its top-up; refused by the gate, the top-up stays
    /// `UNKNOWN` and is asked about again later.
    async fn may_resend(&self, lease: &Lease, attempt: &Attempt) -> Result<bool, BillingError> {
        let now = self.clock.now();
        let mut transaction = self.pool.begin().await?;
        lock_account(&mut transaction, &lease.account).await?;
        let top_up = store::lock(&mut transaction, &lease.account, &lease.top_up_id).await?;
        let still_unknown = top_up
            .attempts
            .iter()
            .any(|a| a.attempt_number == attempt.number && a.outcome == AttemptOutcome::Unknown);
        if top_up.status.is_final() || !still_unknown {
            transaction.commit().await?;
            return Ok(false);
        }
        let refused = self
            .refuse_charge(
                &mut transaction,
                &top_up,
                &attempt.card.payment_method_id,
                now,
            )
            .await?;
        match refused {
            None => {
                transaction.commit().await?;
                Ok(true)
            }
            Some(ChargeRefused::Gate { other }) => {
                transaction.commit().await?;
                tracing::info!(top_up_id = %lease.top_up_id, %other, "not sent again: another charge's outcome is unknown");
                self.park_unknown(lease, now + self.config.reconcile_after)
                    .await?;
                Ok(false)
            }
            Some(refused) => {
                store::settle_attempt(
                    &mut transaction,
                    &top_up.top_up_id,
                    attempt.number,
                    AttemptOutcome::Declined,
                    Some(("not_processed", false)),
                    None,
                    None,
                )
                .await?;
                transaction.commit().await?;
                tracing::info!(top_up_id = %lease.top_up_id, "a charge the processor never saw is not sent again: the live state refuses it");
                if let ChargeRefused::Card {
                    started_next: true, ..
                } = refused
                {
                    self.wake.notify_one();
                }
                Ok(false)
            }
        }
    }

    /// Leaves the top-up `UNKNOWN` until `at`, the gate closed.
    async fn park_unknown(&self, lease: &Lease, at: DateTime<Utc>) -> Result<(), BillingError> {
        sqlx::query(
            "UPDATE top_ups SET status = 'UNKNOWN', next_attempt_at = $3, lease_until = NULL, \
                    lease_owner = NULL, updated_at = $4 \
              WHERE top_up_id = $1 AND lease_owner = $2 AND status IN ('PENDING', 'UNKNOWN')",
        )
        .bind(&lease.top_up_id)
        .bind(lease.owner)
        .bind(at)
        .bind(self.clock.now())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// A manual attempt the processor never saw, long after its caller went
    /// away: nothing was charged; the top-up is closed as `FAILED`.
    async fn close_not_processed(&self, lease: &Lease, number: i32) -> Result<Next, BillingError> {
        let mut transaction = self.pool.begin().await?;
        lock_account(&mut transaction, &lease.account).await?;
        let top_up = store::lock(&mut transaction, &lease.account, &lease.top_up_id).await?;
        let still_unknown = top_up
            .attempts
            .iter()
            .any(|a| a.attempt_number == number && a.outcome == AttemptOutcome::Unknown);
        if still_unknown && !top_up.status.is_final() {
            store::settle_attempt(
                &mut transaction,
                &top_up.top_up_id,
                number,
                AttemptOutcome::Declined,
                Some(("not_processed", false)),
                None,
                None,
            )
            .await?;
            self.finish(
                &mut transaction,
                &top_up,
                TopUpStatus::Failed,
                "abandoned: the request was not completed and nothing was charged",
                None,
                None,
            )
            .await?;
        }
        transaction.commit().await?;
        Ok(Next::Stop)
    }

    /// Step 3: what the gateway answered for one attempt, and its
    /// consequences. `reported`: the answer arrived on its own (a webhook)
    /// for an attempt that may have been parked as `REQUIRES_ACTION`.
    pub(super) async fn settle(
        &self,
        lease: &Lease,
        number: i32,
        charge: Charge,
        answer: Answer,
    ) -> Result<Next, BillingError> {
        let outcome = self.settle_once(lease, number, &charge, answer).await;
        match outcome {
            Err(SettleError::CreditFailed(error)) => {
                self.credit_failed(lease, number, &charge, &error).await?;
                Ok(Next::Stop)
            }
            Err(SettleError::Other(error)) => Err(error),
            Ok(next) => Ok(next),
        }
    }

    async fn settle_once(
        &self,
        lease: &Lease,
        number: i32,
        charge: &Charge,
        answer: Answer,
    ) -> Result<Next, SettleError> {
        let reported = answer != Answer::Direct;
        let now = self.clock.now();
        let account = &lease.account;
        let mut transaction = self.pool.begin().await?;
        lock_account(&mut transaction, account).await?;
        let top_up = store::lock(&mut transaction, account, &lease.top_up_id).await?;
        let Some(attempt) = top_up.attempts.iter().find(|a| a.attempt_number == number) else {
            transaction.commit().await?;
            return Ok(Next::Stop);
        };
        let open = attempt.outcome == AttemptOutcome::Unknown
            || (reported && attempt.outcome == AttemptOutcome::RequiresAction);
        // A charge that succeeded is credited whatever ended its top-up
        // meanwhile — `CANCELED` (auto refill switched off, the balance
        // restored) while the customer completed 3-D Secure at the processor,
        // or `FAILED` (expired): never charged for nothing. Only a top-up
        // already credited cannot take a second credit under its key.
        let ended = match top_up.status {
            TopUpStatus::Succeeded => true,
            TopUpStatus::Canceled => charge.outcome != Outcome::Succeeded,
            _ => false,
        };
        if !open || ended {
            // Settled already (a replay, a webhook or another replica was first).
            if open && charge.outcome == Outcome::Succeeded {
                // A card that asked for 3-D Secure in an automatic round was
                // completed after another card had refilled the account: the
                // money moved and is not credited here.
                tracing::error!(account_id = %account, top_up_id = %top_up.top_up_id, attempt = number,
                    status = top_up.status.as_str(), "a charge succeeded for a top-up already settled; refund or credit it by hand");
            }
            transaction.commit().await?;
            return Ok(Next::Continue);
        }
        let card =
            payment_methods::find_method(&mut transaction, account, &attempt.payment_method_id)
                .await?;
        let label = CardLabel {
            brand: card.brand.clone(),
            last4: card.last4.clone(),
        };
        let automatic = top_up.trigger == Trigger::Automatic;
        let (attempt_outcome, decline, challenge) = match &charge.outcome {
            Outcome::Succeeded => (AttemptOutcome::Succeeded, None, None),
            Outcome::Declined { code, hard } => {
                (AttemptOutcome::Declined, Some((code.as_str(), *hard)), None)
            }
            Outcome::RequiresAction { challenge } => (
                AttemptOutcome::RequiresAction,
                None,
                Some(PendingChallenge {
                    challenge_id: challenge.challenge_id.clone(),
                    redirect_url: challenge.redirect_url.clone(),
                }),
            ),
            Outcome::Unknown => (AttemptOutcome::Unknown, None, None),
        };
        store::settle_attempt(
            &mut transaction,
            &top_up.top_up_id,
            number,
            attempt_outcome,
            decline,
            charge.charge_id.as_deref(),
            challenge.as_ref(),
        )
        .await?;

        let mut credited = false;
        let next = match &charge.outcome {
            Outcome::Succeeded => {
                let posting = Posting {
                    account_id: account.clone(),
                    kind: EntryKind::TopUp,
                    amount: attempt.amount,
                    idempotency_key: ledger_key(&top_up.top_up_id),
                    description: format!(
                        "{} top-up, {} •••• {}",
                        top_up.trigger.label(),
                        card.brand,
                        card.last4
                    ),
                    metadata: [
                        ("top_up_id".to_owned(), top_up.top_up_id.clone()),
                        (
                            "payment_method_id".to_owned(),
                            card.payment_method_id.clone(),
                        ),
                    ]
                    .into(),
                    allow_overdraft: false,
                };
                let caller = super::engine_caller();
                let posted = ledger::post_in_transaction(&mut transaction, &caller, &posting)
                    .await
                    .map_err(SettleError::CreditFailed)?;
                links::remember(Cause::Transaction(posted.entry.transaction_id));
                credited = true;
                if payment_methods::restore_after_success(
                    &mut transaction,
                    &card.payment_method_id,
                    top_up.trigger == Trigger::Retry,
                )
                .await?
                {
                    audit::record(
                        &mut transaction,
                        &super::engine_caller(),
                        "restore_payment_method",
                        Some(account.as_str()),
                        serde_json::json!({
                            "payment_method_id": card.payment_method_id,
                            "top_up_id": top_up.top_up_id,
                        }),
                    )
                    .await?;
                }
                sqlx::query("UPDATE top_ups SET amount = $2 WHERE top_up_id = $1")
                    .bind(&top_up.top_up_id)
                    .bind(attempt.amount)
                    .execute(&mut *transaction)
                    .await?;
                self.finish(
                    &mut transaction,
                    &top_up,
                    TopUpStatus::Succeeded,
                    "",
                    Some(posted.entry.transaction_id),
                    None,
                )
                .await?;
                let notice = Notice::TopUpReceipt {
                    top_up_id: top_up.top_up_id.clone(),
                    amount: attempt.amount,
                    card: label,
                    balance_after: posted.total_balance,
                };
                let key = format!("top_up_receipt:{}", top_up.top_up_id);
                notifications::enqueue(&mut transaction, account.as_str(), &notice, &key).await?;
                tracing::info!(account_id = %account, top_up_id = %top_up.top_up_id, amount = %attempt.amount, trigger = top_up.trigger.as_str(), "top-up succeeded");
                if automatic {
                    // The chain: still below the threshold (usage arrived, or a
                    // bound or cap cut the amount) → the next top-up at once.
                    let settings =
                        settings::load(&mut transaction, account.as_str(), &self.config).await?;
                    let ensured = crossing::ensure_top_up(
                        &mut transaction,
                        &settings,
                        Observed {
                            total: posted.total_balance,
                            as_of: posted.version,
                        },
                        true,
                        &self.config,
                        self.clock.as_ref(),
                    )
                    .await?;
                    if matches!(ensured, Ensured::Started(_)) {
                        self.wake.notify_one();
                    }
                }
                Next::Stop
            }
            Outcome::Declined { code, hard } => {
                metrics::card_declined(code);
                tracing::info!(account_id = %account, top_up_id = %top_up.top_up_id, decline_code = %code, hard, trigger = top_up.trigger.as_str(), "charge declined");
                // A hard decline from any path, and any automatic decline, takes
                // the card out of automatic charging, with the reason (a failed
                // challenge is the customer's answer, not the card's).
                let confirmed = answer == Answer::Confirmed;
                if (*hard || (automatic && !confirmed))
                    && payment_methods::disable_after_decline(
                        &mut transaction,
                        &card.payment_method_id,
                        code,
                    )
                    .await?
                {
                    audit::record(
                        &mut transaction,
                        &super::engine_caller(),
                        "disable_payment_method",
                        Some(account.as_str()),
                        serde_json::json!({
                            "payment_method_id": card.payment_method_id,
                            "top_up_id": top_up.top_up_id,
                            "reason": code,
                            "hard_decline": hard,
                        }),
                    )
                    .await?;
                    let notice = Notice::PaymentMethodDisabled {
                        card: label,
                        reason: code.clone(),
                    };
                    let key = format!(
                        "payment_method_disabled:{}:{}:{number}",
                        card.payment_method_id, top_up.top_up_id
                    );
                    notifications::enqueue(&mut transaction, account.as_str(), &notice, &key)
                        .await?;
                }
                if automatic && !confirmed {
                    if top_up.status != TopUpStatus::Pending {
                        // Reported late for a parked top-up: its round goes on.
                        sqlx::query(
                            "UPDATE top_ups SET status = 'PENDING', next_attempt_at = $2, updated_at = $2 \
                              WHERE top_up_id = $1",
                        )
                        .bind(&top_up.top_up_id)
                        .bind(now)
                        .execute(&mut *transaction)
                        .await?;
                        self.wake.notify_one();
                    }
                    Next::Continue
                } else {
                    self.finish(
                        &mut transaction,
                        &top_up,
                        TopUpStatus::Failed,
                        code,
                        None,
                        None,
                    )
                    .await?;
                    Next::Stop
                }
            }
            Outcome::RequiresAction { .. } if automatic && !reported => {
                // Counts as this card not charging in this round: the next card is tried.
                Next::Continue
            }
            Outcome::RequiresAction { .. } => {
                self.finish(
                    &mut transaction,
                    &top_up,
                    TopUpStatus::RequiresAction,
                    "authentication_required",
                    None,
                    challenge.as_ref(),
                )
                .await?;
                Next::Stop
            }
            Outcome::Unknown => {
                sqlx::query(
                    "UPDATE top_ups SET status = 'UNKNOWN', failure_reason = 'gateway_timeout', next_attempt_at = $2, \
                            lease_until = NULL, lease_owner = NULL, updated_at = $3 WHERE top_up_id = $1",
                )
                .bind(&top_up.top_up_id)
                .bind(now + self.config.reconcile_after)
                .bind(now)
                .execute(&mut *transaction)
                .await?;
                Next::Stop
            }
        };
        transaction.commit().await?;
        if credited {
            // The credit's balance event is committed.
            self.commits.committed();
        }
        Ok(next)
    }

    /// A charge succeeded and its credit could not be posted: never a silent
    /// loop — an ERROR, a metric, and `NEEDS_ATTENTION` (the gate stays closed).
    async fn credit_failed(
        &self,
        lease: &Lease,
        number: i32,
        charge: &Charge,
        error: &BillingError,
    ) -> Result<(), BillingError> {
        tracing::error!(account_id = %lease.account, top_up_id = %lease.top_up_id, attempt = number, charge_id = ?charge.charge_id, %error, "charge succeeded but could not be credited");
        let mut transaction = self.pool.begin().await?;
        lock_account(&mut transaction, &lease.account).await?;
        let top_up = store::lock(&mut transaction, &lease.account, &lease.top_up_id).await?;
        store::settle_attempt(
            &mut transaction,
            &top_up.top_up_id,
            number,
            AttemptOutcome::Succeeded,
            None,
            charge.charge_id.as_deref(),
            None,
        )
        .await?;
        self.needs_attention(
            &mut transaction,
            &top_up,
            "credit_failed: the card was charged and the ledger credit could not be posted",
        )
        .await?;
        transaction.commit().await?;
        Ok(())
    }

    async fn needs_attention(
        &self,
        connection: &mut PgConnection,
        top_up: &TopUp,
        reason: &str,
    ) -> Result<(), BillingError> {
        tracing::error!(account_id = %top_up.account_id, top_up_id = %top_up.top_up_id, reason, "top-up needs attention: the account's charges stay blocked until an operator resolves it");
        self.finish(
            connection,
            top_up,
            TopUpStatus::NeedsAttention,
            reason,
            None,
            None,
        )
        .await
    }

    /// Ends an automatic top-up that is no longer wanted; nothing is charged.
    async fn cancel(
        &self,
        connection: &mut PgConnection,
        top_up: &TopUp,
        reason: &str,
    ) -> Result<(), BillingError> {
        tracing::info!(account_id = %top_up.account_id, top_up_id = %top_up.top_up_id, reason, "automatic top-up canceled");
        self.finish(
            connection,
            top_up,
            TopUpStatus::Canceled,
            reason,
            None,
            None,
        )
        .await
    }

    /// Every card of the round failed or asked for the customer: wait for
    /// the customer (`REQUIRES_ACTION`, told once) when a card asked, else
    /// schedule the next round with back-off, or give up after the last.
    async fn finish_round(
        &self,
        connection: &mut PgConnection,
        top_up: &TopUp,
    ) -> Result<(), BillingError> {
        let now = self.clock.now();
        let account_id = top_up.account_id.as_str();
        let this_round = |a: &&super::TopUpAttempt| a.round == top_up.rounds;
        let asked = top_up
            .attempts
            .iter()
            .filter(this_round)
            .find(|a| a.outcome == AttemptOutcome::RequiresAction);
        if let Some(asked) = asked {
            let challenge = asked.challenge.clone();
            self.finish(
                connection,
                top_up,
                TopUpStatus::RequiresAction,
                "authentication_required",
                None,
                challenge.as_ref(),
            )
            .await?;
            let card = payment_methods::find_method(
                &mut *connection,
                &AccountId::parse(account_id)?,
                &asked.payment_method_id,
            )
            .await?;
            let notice = Notice::AuthenticationRequired {
                top_up_id: top_up.top_up_id.clone(),
                amount: asked.amount,
                card: CardLabel {
                    brand: card.brand,
                    last4: card.last4,
                },
                action_url: self.config.panel_url.as_ref().map(|panel| {
                    let separator = if panel.contains('?') { '&' } else { '?' };
                    format!("{panel}{separator}top_up_id={}", top_up.top_up_id)
                }),
            };
            let key = format!("authentication_required:{}", top_up.top_up_id);
            notifications::enqueue(&mut *connection, account_id, &notice, &key).await?;
            return Ok(());
        }
        let rounds = top_up.rounds + 1;
        let reason = if top_up.attempts.is_empty() {
            "no active payment method with auto-charge"
        } else {
            "every payment method failed"
        };
        let last_round = rounds >= self.config.max_rounds;
        let next = (!last_round).then(|| {
            let index =
                (rounds as usize - 1).min(self.config.retry_backoff.len().saturating_sub(1));
            now + self
                .config
                .retry_backoff
                .get(index)
                .copied()
                .unwrap_or(chrono::Duration::hours(24))
        });
        let status = if last_round {
            TopUpStatus::Failed
        } else {
            TopUpStatus::RetryScheduled
        };
        sqlx::query(
            "UPDATE top_ups SET rounds = $2, status = $3, failure_reason = $4, next_attempt_at = $5, \
                    lease_until = NULL, lease_owner = NULL, updated_at = $6 WHERE top_up_id = $1",
        )
        .bind(&top_up.top_up_id)
        .bind(rounds)
        .bind(status.as_str())
        .bind(reason)
        .bind(next)
        .bind(now)
        .execute(&mut *connection)
        .await?;
        metrics::top_up_finished(status.as_str());
        audit::record(
            &mut *connection,
            &super::engine_caller(),
            if last_round {
                "finish_top_up"
            } else {
                "schedule_top_up_retry"
            },
            Some(account_id),
            serde_json::json!({
                "top_up_id": top_up.top_up_id,
                "status": status.as_str(),
                "trigger": top_up.trigger.as_str(),
                "reason": reason,
                "rounds": rounds,
                "next_attempt_at": next.map(|at| at.to_rfc3339()),
            }),
        )
        .await?;
        if last_round || rounds == 1 {
            let notice = Notice::TopUpFailed {
                top_up_id: top_up.top_up_id.clone(),
                amount: top_up.amount,
                reason: reason.to_owned(),
                next_attempt_at: next,
            };
            let key = format!(
                "top_up_failed:{}:{}",
                top_up.top_up_id,
                if last_round {
                    "final".to_owned()
                } else {
                    rounds.to_string()
                }
            );
            notifications::enqueue(&mut *connection, account_id, &notice, &key).await?;
        }
        tracing::info!(account_id, top_up_id = %top_up.top_up_id, rounds, status = status.as_str(), "top-up round failed");
        Ok(())
    }

    /// Moves a top-up to `status` and ends its lease.
    pub(super) async fn finish(
        &self,
        connection: &mut PgConnection,
        top_up: &TopUp,
        status: TopUpStatus,
        reason: &str,
        transaction_id: Option<Uuid>,
        challenge: Option<&PendingChallenge>,
    ) -> Result<(), BillingError> {
        store::finish(
            &mut *connection,
            &top_up.top_up_id,
            status,
            transaction_id,
            reason,
            challenge,
            self.clock.now(),
        )
        .await?;
        metrics::top_up_finished(status.as_str());
        audit::record(
            connection,
            &super::engine_caller(),
            "finish_top_up",
            Some(top_up.account_id.as_str()),
            serde_json::json!({
                "top_up_id": top_up.top_up_id,
                "transaction_id": transaction_id,
                "status": status.as_str(),
                "trigger": top_up.trigger.as_str(),
                "reason": reason,
            }),
        )
        .await
    }

    /// A charge result that arrived on its own (a processor's webhook) for
    /// attempt `attempt_number` of a top-up (any trigger) left `UNKNOWN` or
    /// `REQUIRES_ACTION`: settled through the same step as a synchronous
    /// answer, so the ledger is credited exactly once. Returns false when
    /// there was nothing to settle.
    pub async fn settle_reported(
        &self,
        top_up_id: &str,
        attempt_number: i32,
        charge: Charge,
    ) -> Result<bool, BillingError> {
        if charge.outcome == Outcome::Unknown {
            return Ok(false);
        }
        let Some((account, _)) = store::owner(&mut *self.pool.acquire().await?, top_up_id).await?
        else {
            return Ok(false);
        };
        let lease = Lease {
            top_up_id: top_up_id.to_owned(),
            account,
            owner: Uuid::new_v4(),
        };
        let before =
            store::get(&mut *self.pool.acquire().await?, &lease.account, top_up_id).await?;
        let open = before.attempts.iter().any(|a| {
            a.attempt_number == attempt_number
                && matches!(
                    a.outcome,
                    AttemptOutcome::Unknown | AttemptOutcome::RequiresAction
                )
        });
        if !open {
            return Ok(false);
        }
        self.settle(&lease, attempt_number, charge, Answer::Reported)
            .await?;
        Ok(true)
    }
}

enum SettleError {
    CreditFailed(BillingError),
    Other(BillingError),
}

impl<E: Into<BillingError>> From<E> for SettleError {
    fn from(error: E) -> Self {
        SettleError::Other(error.into())
    }
}

/// Locks the account row (every top-up decision and settlement holds it)
/// and returns its currency.
pub(super) async fn lock_account(
    connection: &mut PgConnection,
    account: &AccountId,
) -> Result<crate::money::Currency, BillingError> {
    let currency: String =
        sqlx::query_scalar("SELECT currency FROM accounts WHERE account_id = $1 FOR UPDATE")
            .bind(account.as_str())
            .fetch_optional(connection)
            .await?
            .ok_or(BillingError::NotFound("account"))?;
    ledger::currency_from_column(&currency)
}

/// Why attempt-bound money may not move now ([`TopUps::refuse_charge`]).
pub(super) enum ChargeRefused {
    /// Another charge of the account has an unknown outcome; nothing changed.
    Gate { other: String },
    /// The attempt's card cannot be charged (`failure`): the top-up ended
    /// `FAILED`; `started_next`: an automatic crossing started the next
    /// top-up (wake the engine).
    Card {
        failure: &'static str,
        payment_method_id: String,
        started_next: bool,
    },
    /// An automatic top-up no longer wanted: it ended `CANCELED`.
    NotWanted,
}

/// The answer to a charge the customer asked for while the gate is closed
/// by `other` (a charge of the account whose outcome is unknown).
pub(super) fn gate_refusal(other: &str) -> BillingError {
    BillingError::precondition(
        crate::error::Reason::ChargeOutcomeUnknown,
        format!("top_ups/{other}"),
        format!(
            "another charge of the account (top-up {other}) has an unknown outcome; \
             nothing else is charged until it is reconciled — try again later"
        ),
    )
}

/// The per-account gate: another top-up of the account whose charge may
/// have moved money without being settled (`UNKNOWN`, `NEEDS_ATTENTION`, or
/// an attempt in flight). Nothing else is charged while it is closed.
pub(super) async fn gate_closed_by(
    connection: &mut PgConnection,
    account: &AccountId,
    except_top_up_id: &str,
) -> Result<Option<String>, BillingError> {
    Ok(sqlx::query_scalar(
        "SELECT top_up_id FROM top_ups \
          WHERE account_id = $1 AND top_up_id <> $2 \
            AND status IN ('UNKNOWN', 'NEEDS_ATTENTION', 'PENDING') \
            AND top_up_outcome_unknown(top_up_id) \
          LIMIT 1",
    )
    .bind(account.as_str())
    .bind(except_top_up_id)
    .fetch_optional(connection)
    .await?)
}

/// A card whose expiry month has passed is never charged.
/// Why a card the customer named (Add Funds, Retry) or answered a
/// challenge for (ConfirmTopUp) cannot be charged now — the failure reason
/// its top-up ends with — or `None`. A `TEMPORARILY_DISABLED` card can: a
/// success is how it comes back.
pub(super) fn card_refusal(card: &PaymentMethod, now: DateTime<Utc>) -> Option<&'static str> {
    match card.status {
        MethodStatus::Active | MethodStatus::TemporarilyDisabled if is_expired(card, now) => {
            Some("expired_card")
        }
        MethodStatus::Active | MethodStatus::TemporarilyDisabled => None,
        MethodStatus::Removed => Some("payment_method_removed"),
        MethodStatus::Failed | MethodStatus::PendingAuthentication => {
            Some("payment_method_not_active")
        }
    }
}

fn is_expired(card: &PaymentMethod, now: DateTime<Utc>) -> bool {
    let today = now.date_naive();
    let current = today.year() * 12 + today.month() as i32;
    card.exp_year * 12 + card.exp_month < current
}

fn charge_or_unknown(top_up_id: &str, result: Result<Charge, GatewayError>) -> Charge {
    match result {
        Ok(charge) => charge,
        Err(GatewayError::UnknownToken) => Charge {
            charge_id: None,
            outcome: Outcome::Declined {
                code: "card_not_found".into(),
                hard: true,
            },
        },
        Err(GatewayError::Rejected(reason)) => {
            tracing::warn!(top_up_id, %reason, "gateway refused the charge");
            Charge {
                charge_id: None,
                outcome: Outcome::Declined {
                    code: "gateway_rejected".into(),
                    hard: true,
                },
            }
        }
        Err(GatewayError::Unexpected(error)) => {
            tracing::warn!(top_up_id, error = %error, "gateway call failed; outcome unknown");
            Charge {
                charge_id: None,
                outcome: Outcome::Unknown,
            }
        }
    }
}

/// How long a replayed request waits for the driver of the same top-up.
pub(super) const REPLAY_WAIT: Duration = Duration::from_secs(20);
