//! A model-based test of the top-up lifecycle, the cards and the ledger, in
//! the manner of TigerBeetle's simulator: random operation sequences (debit,
//! credit, apply settings, add/remove/reorder cards, auto-charge, Add Funds,
//! Retry, ConfirmTopUp, sandbox outcomes through the test cards, clock advances) run
//! against the real server with a manual clock; after every step the system
//! is let settle and checked against a small reference model of the rules:
//!
//! - the balance is what the operations and the credited top-ups make it,
//!   and equals the sum of the ledger;
//! - a debit is refused exactly when it exceeds the total balance; enabling
//!   auto refill is refused exactly when no active auto-charge card exists;
//!   Add Funds is refused exactly while another charge's outcome is unknown;
//!   a passed ConfirmTopUp is refused exactly when a charge made now could
//!   not be (its card no longer active, the gate closed, an automatic
//!   top-up no longer wanted);
//! - no automatic charge while auto refill is off, nor when the total balance
//!   is at or above the threshold at the attempt's start;
//! - no removed, auto-charge-off or hard-declined card is charged
//!   automatically; the cards' states are those the rules give (first ACTIVE
//!   card auto-charged, declines disable, successes restore, removal is final);
//! - at most one open automatic top-up per account;
//! - a credit if and only if a charge succeeded, exactly once;
//! - once settled, an account with auto refill on is at or above its
//!   threshold unless a card failure or a cap stopped the chain, and an
//!   email says so.
//!
//! Seeded and replayable: `MODEL_SEED` (default: random, printed) and
//! `MODEL_CASES` (default 200). A failing case is shrunk to a shortest
//! failing sequence, which is printed with its seed. `MODEL_CASE=N` replays
//! case N of the seed alone (`MODEL_REPEAT` times) to hunt a rare failure.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration as StdDuration;

use billing::proto::{self, TopUpStatus};
use billing::topup::{Clock, ManualClock};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rust_decimal::Decimal;

use crate::helpers::{TestApp, authed, spawn_app_with};
use crate::payment_methods::{card, client, unique_visa};
use crate::top_ups::engine_settings;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Visa,
    Declines,
    OffSession3ds,
    Hard,
    Timeout,
}

impl Kind {
    fn number(self, n: u32) -> String {
        match self {
            Kind::Visa => unique_visa(n),
            Kind::Declines => "4000000000000341".into(),
            Kind::OffSession3ds => "4000003800000446".into(),
            Kind::Hard => "4000000000000069".into(),
            Kind::Timeout => "4000000000009904".into(),
        }
    }
}

#[derive(Debug, Clone)]
enum Op {
    Debit(u32),
    Credit(u32),
    Apply {
        auto: bool,
        threshold: u32,
        refill: u32,
    },
    AddCard(Kind),
    /// Indices pick among the live cards (modulo their number).
    Remove(usize),
    SetAutoCharge(usize, bool),
    Reorder(u64),
    AddFunds(usize),
    Retry(usize),
    /// The customer passes the 3-D Secure challenge of the newest top-up
    /// waiting for one (ConfirmTopUp).
    Confirm,
    AdvanceMinutes(i64),
}

fn random_op(rng: &mut StdRng) -> Op {
    match rng.random_range(0..100) {
        0..=24 => Op::Debit([5, 10, 15, 25, 40][rng.random_range(0..5)]),
        25..=31 => Op::Credit([10, 50][rng.random_range(0..2)]),
        32..=43 => Op::Apply {
            auto: rng.random_bool(0.8),
            threshold: [10, 20, 40][rng.random_range(0..3)],
            refill: [30, 50][rng.random_range(0..2)],
        },
        44..=59 => Op::AddCard(
            [
                Kind::Visa,
                Kind::Visa,
                Kind::Declines,
                Kind::OffSession3ds,
                Kind::Hard,
                Kind::Timeout,
            ][rng.random_range(0..6)],
        ),
        60..=64 => Op::Remove(rng.random_range(0..4)),
        65..=71 => Op::SetAutoCharge(rng.random_range(0..4), rng.random_bool(0.7)),
        72..=74 => Op::Reorder(rng.random()),
        75..=81 => Op::AddFunds(rng.random_range(0..4)),
        82..=86 => Op::Retry(rng.random_range(0..4)),
        87..=90 => Op::Confirm,
        _ => Op::AdvanceMinutes([1, 61, 6 * 60 + 1, 25 * 60][rng.random_range(0..4)]),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CardState {
    Active,
    Disabled,
    Removed,
}

#[derive(Debug, Clone)]
struct ModelCard {
    id: String,
    kind: Kind,
    state: CardState,
    auto_charge: bool,
    hard_declined: bool,
}

#[derive(Debug, Clone)]
struct Settings {
    auto: bool,
    threshold: Decimal,
}

/// The reference model: what the rules say the account is.
struct Model {
    account: String,
    balance: Decimal,
    settings: Settings,
    /// Live cards in charge-priority order, then removed ones.
    cards: Vec<ModelCard>,
    /// Attempts already accounted for: (top_up_id, attempt_number) → outcome.
    settled: BTreeMap<(String, i32), i32>,
    seen_attempts: HashSet<(String, i32)>,
    credited: HashSet<String>,
    visa_serial: u32,
}

impl Model {
    fn live(&self) -> Vec<usize> {
        (0..self.cards.len())
            .filter(|i| self.cards[*i].state != CardState::Removed)
            .collect()
    }

    fn pick(&self, index: usize) -> Option<usize> {
        let live = self.live();
        (!live.is_empty()).then(|| live[index % live.len()])
    }

    fn card_mut(&mut self, id: &str) -> Option<&mut ModelCard> {
        self.cards.iter_mut().find(|c| c.id == id)
    }

    fn has_usable_auto_charge_card(&self) -> bool {
        self.cards
            .iter()
            .any(|c| c.state == CardState::Active && c.auto_charge)
    }
}

/// What the server shows of one account after a step.
struct Observed {
    balance: Decimal,
    ledger_sum: Decimal,
    top_ups: Vec<proto::TopUp>,
    methods: Vec<proto::PaymentMethod>,
}

fn d(value: u32) -> Decimal {
    Decimal::from(value)
}

fn money(text: &str) -> Decimal {
    text.parse().expect("an amount")
}

fn ensure(condition: bool, message: impl FnOnce() -> String) -> Result<(), String> {
    if condition { Ok(()) } else { Err(message()) }
}

struct Runner {
    app: TestApp,
    clock: Arc<ManualClock>,
    /// How long a top-up may wait for 3-D Secure (the server's setting).
    action_expiry: chrono::Duration,
    service: String,
    runs: u32,
}

impl Runner {
    async fn new() -> Runner {
        let clock = Arc::new(ManualClock::starting_now());
        let settings = engine_settings(clock.clone());
        let action_expiry = settings.policy.action_expiry;
        let app = spawn_app_with(settings).await;
        let service = app.service_token();
        Runner {
            app,
            clock,
            action_expiry,
            service,
            runs: 0,
        }
    }

    /// Runs `ops` on a fresh account; `Err` names the step and the broken rule.
    async fn run(&mut self, label: &str, ops: &[Op]) -> Result<(), String> {
        self.runs += 1;
        let account = format!("model-{label}-{}", self.runs);
        self.app.account_with_balance(&account, "50.00").await;
        let mut model = Model {
            account: account.clone(),
            balance: d(50),
            settings: Settings {
                auto: false,
                threshold: Decimal::ZERO,
            },
            cards: Vec::new(),
            settled: BTreeMap::new(),
            seen_attempts: HashSet::new(),
            credited: HashSet::new(),
            visa_serial: 0,
        };
        for (step, op) in ops.iter().enumerate() {
            self.apply(&mut model, op)
                .await
                .map_err(|e| format!("step {step} {op:?}: {e}"))?;
            let after_op = model.balance;
            self.quiesce(&account)
                .await
                .map_err(|e| format!("step {step} {op:?}: {e}"))?;
            let observed = self.observe(&account).await;
            self.check(&mut model, &observed, after_op, op)
                .await
                .map_err(|e| format!("step {step} {op:?}: {e}"))?;
        }
        Ok(())
    }

    fn admin(&self, account: &str) -> String {
        self.app.token("admin", Some(account))
    }

    async fn apply(&self, model: &mut Model, op: &Op) -> Result<(), String> {
        let account = model.account.clone();
        let admin = self.admin(&account);
        let methods = client(&self.app);
        match op {
            Op::Debit(amount) => {
                let result = self
                    .app
                    .balances()
                    .debit(authed(
                        &self.service,
                        proto::DebitRequest {
                            account_id: account.clone(),
                            amount: format!("{amount}.00"),
                            idempotency_key: uuid::Uuid::new_v4().to_string(),
                            ..Default::default()
                        },
                    ))
                    .await;
                let refused = d(*amount) > model.balance;
                match result {
                    Ok(_) if !refused => model.balance -= d(*amount),
                    Err(status) if refused && status.code() == tonic::Code::FailedPrecondition => {}
                    other => {
                        return Err(format!(
                            "debit {amount} on {}: expected refused={refused}, got {other:?}",
                            model.balance
                        ));
                    }
                }
            }
            Op::Credit(amount) => {
                self.app
                    .balances()
                    .credit(authed(
                        &self.service,
                        proto::CreditRequest {
                            account_id: account.clone(),
                            amount: format!("{amount}.00"),
                            kind: proto::TransactionKind::Adjustment as i32,
                            idempotency_key: uuid::Uuid::new_v4().to_string(),
                            ..Default::default()
                        },
                    ))
                    .await
                    .map_err(|e| format!("credit: {e:?}"))?;
                model.balance += d(*amount);
            }
            Op::Apply {
                auto,
                threshold,
                refill,
            } => {
                let result = crate::top_ups::policy(&self.app)
                    .apply_low_balance_settings(authed(
                        &admin,
                        proto::ApplyLowBalanceSettingsRequest {
                            account_id: account.clone(),
                            auto_refill_enabled: *auto,
                            threshold: format!("{threshold}.00"),
                            refill_amount: format!("{refill}.00"),
                            ..Default::default()
                        },
                    ))
                    .await;
                let refused = *auto && !model.has_usable_auto_charge_card();
                match result {
                    Ok(_) if !refused => {
                        model.settings = Settings {
                            auto: *auto,
                            threshold: d(*threshold),
                        };
                    }
                    Err(status) if refused && status.code() == tonic::Code::FailedPrecondition => {}
                    other => {
                        return Err(format!(
                            "apply auto={auto}: expected refused={refused}, got {other:?}"
                        ));
                    }
                }
            }
            Op::AddCard(kind) => {
                if *kind != Kind::Visa
                    && model
                        .cards
                        .iter()
                        .any(|c| c.kind == *kind && c.state != CardState::Removed)
                {
                    return Ok(()); // the same card twice is a duplicate; not this test's subject
                }
                model.visa_serial += 1;
                let number = kind.number(model.visa_serial);
                let added = methods
                    .clone()
                    .add_card(authed(
                        &admin,
                        crate::payment_methods::add_card_request(
                            &account,
                            card(&number),
                            &uuid::Uuid::new_v4().to_string(),
                        ),
                    ))
                    .await
                    .map_err(|e| format!("add card: {e:?}"))?
                    .into_inner();
                let method = added.payment_method.expect("a payment method");
                // The first card to become ACTIVE with no other ACTIVE card is auto-charged.
                let first_active = !model.cards.iter().any(|c| c.state == CardState::Active);
                model.cards.push(ModelCard {
                    id: method.payment_method_id,
                    kind: *kind,
                    state: CardState::Active,
                    auto_charge: first_active,
                    hard_declined: false,
                });
                let removed: Vec<ModelCard> = model
                    .cards
                    .iter()
                    .filter(|c| c.state == CardState::Removed)
                    .cloned()
                    .collect();
                model.cards.retain(|c| c.state != CardState::Removed);
                model.cards.extend(removed);
            }
            Op::Remove(index) => {
                let Some(i) = model.pick(*index) else {
                    return Ok(());
                };
                let id = model.cards[i].id.clone();
                methods
                    .clone()
                    .remove_payment_method(authed(
                        &admin,
                        proto::RemovePaymentMethodRequest {
                            account_id: account.clone(),
                            payment_method_id: id,
                        },
                    ))
                    .await
                    .map_err(|e| format!("remove: {e:?}"))?;
                let mut card = model.cards.remove(i);
                card.state = CardState::Removed;
                card.auto_charge = false;
                model.cards.push(card);
            }
            Op::SetAutoCharge(index, enabled) => {
                let Some(i) = model.pick(*index) else {
                    return Ok(());
                };
                methods
                    .clone()
                    .set_auto_charge(authed(
                        &admin,
                        proto::SetAutoChargeRequest {
                            account_id: account.clone(),
                            payment_method_id: model.cards[i].id.clone(),
                            enabled: *enabled,
                        },
                    ))
                    .await
                    .map_err(|e| format!("set auto-charge: {e:?}"))?;
                model.cards[i].auto_charge = *enabled;
            }
            Op::Reorder(seed) => {
                let mut live = model.live();
                if live.len() < 2 {
                    return Ok(());
                }
                live.shuffle(&mut StdRng::seed_from_u64(*seed));
                let ids: Vec<String> = live.iter().map(|i| model.cards[*i].id.clone()).collect();
                methods
                    .clone()
                    .reorder_payment_methods(authed(
                        &admin,
                        proto::ReorderPaymentMethodsRequest {
                            account_id: account.clone(),
                            payment_method_ids: ids,
                        },
                    ))
                    .await
                    .map_err(|e| format!("reorder: {e:?}"))?;
                let mut ordered: Vec<ModelCard> =
                    live.iter().map(|i| model.cards[*i].clone()).collect();
                ordered.extend(
                    model
                        .cards
                        .iter()
                        .filter(|c| c.state == CardState::Removed)
                        .cloned(),
                );
                model.cards = ordered;
            }
            Op::AddFunds(index) | Op::Retry(index) => {
                let Some(i) = model.pick(*index) else {
                    return Ok(());
                };
                let id = model.cards[i].id.clone();
                let gate_closed = self.gate_closed(&account).await;
                let key = uuid::Uuid::new_v4().to_string();
                let result = if matches!(op, Op::AddFunds(_)) {
                    methods
                        .clone()
                        .add_funds(authed(
                            &admin,
                            proto::AddFundsRequest {
                                account_id: account.clone(),
                                amount: "30.00".into(),
                                payment_method_id: id,
                                idempotency_key: key,
                            },
                        ))
                        .await
                        .map(|r| r.into_inner().top_up)
                } else {
                    methods
                        .clone()
                        .retry_payment_method(authed(
                            &admin,
                            proto::RetryPaymentMethodRequest {
                                account_id: account.clone(),
                                payment_method_id: id,
                                idempotency_key: key,
                                amount: "30.00".into(),
                            },
                        ))
                        .await
                        .map(|r| r.into_inner().top_up)
                };
                match result {
                    Ok(_) if !gate_closed => {}
                    Err(status)
                        if gate_closed && status.code() == tonic::Code::FailedPrecondition => {}
                    other => {
                        return Err(format!(
                            "manual charge: expected refused={gate_closed}, got {other:?}"
                        ));
                    }
                }
            }
            Op::Confirm => {
                let waiting: Option<(String, String, String)> = sqlx::query_as(
                    "SELECT t.top_up_id, t.trigger, a.payment_method_id FROM top_ups t \
                       JOIN top_up_attempts a ON a.top_up_id = t.top_up_id AND a.outcome = 'REQUIRES_ACTION' \
                      WHERE t.account_id = $1 AND t.status = 'REQUIRES_ACTION' \
                      ORDER BY t.top_up_seq DESC, a.attempt_number DESC LIMIT 1",
                )
                .bind(&account)
                .fetch_optional(&self.app.pool)
                .await
                .map_err(|e| e.to_string())?;
                let Some((top_up_id, trigger, card_id)) = waiting else {
                    return Ok(());
                };
                // A confirmation is a charge made now: the rules of now.
                let card_active = model
                    .cards
                    .iter()
                    .any(|c| c.id == card_id && c.state == CardState::Active);
                let wanted = trigger != "AUTOMATIC"
                    || (model.settings.auto && model.balance < model.settings.threshold);
                let gate_closed = self.gate_closed(&account).await;
                let refused = !card_active || !wanted || gate_closed;
                let result = methods
                    .clone()
                    .confirm_top_up(authed(
                        &admin,
                        proto::ConfirmTopUpRequest {
                            account_id: account.clone(),
                            top_up_id,
                            authentication_result: proto::AuthenticationResult::Passed as i32,
                        },
                    ))
                    .await
                    .map(|r| r.into_inner().top_up.map(|t| t.status));
                match result {
                    Ok(Some(status)) if !refused && status == TopUpStatus::Succeeded as i32 => {}
                    Err(status) if refused && status.code() == tonic::Code::FailedPrecondition => {}
                    other => {
                        return Err(format!(
                            "confirmation: expected refused={refused} (card active {card_active}, \
                             wanted {wanted}, gate closed {gate_closed}), got {other:?}"
                        ));
                    }
                }
            }
            Op::AdvanceMinutes(minutes) => self.clock.advance(chrono::Duration::minutes(*minutes)),
        }
        Ok(())
    }

    /// The top-up's stored scheduling columns, for a failure message.
    async fn stored_top_up(&self, top_up_id: &str) -> String {
        sqlx::query_scalar(
            "SELECT format('status %s, next_attempt_at %s, created_at %s, lease_owner %s, waits_for %s, rounds %s', \
                           status, next_attempt_at, created_at, lease_owner, waits_for, rounds) \
               FROM top_ups WHERE top_up_id = $1",
        )
        .bind(top_up_id)
        .fetch_optional(&self.app.pool)
        .await
        .ok()
        .flatten()
        .unwrap_or_else(|| "no row".into())
    }

    async fn gate_closed(&self, account: &str) -> bool {
        let open: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM top_ups WHERE account_id = $1 AND status IN ('UNKNOWN', 'NEEDS_ATTENTION')",
        )
        .bind(account)
        .fetch_one(&self.app.pool)
        .await
        .unwrap();
        open > 0
    }

    /// Waits until nothing is left to decide or charge now for the account
    /// (the decider has read its events; no top-up is due, being driven,
    /// waiting for a charge outcome that is known, or waiting for 3-D
    /// Secure past its expiry).
    async fn quiesce(&self, account: &str) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + StdDuration::from_secs(30);
        let mut calm = 0;
        loop {
            let now = self.clock.now();
            let busy: bool = sqlx::query_scalar(
                "SELECT \
                   COALESCE((SELECT MAX(cursor) FROM balance_events WHERE account_id = $1), 0) > \
                   COALESCE((SELECT cursor FROM event_subscribers WHERE name = 'balance-policy'), 0) \
                 OR EXISTS (SELECT 1 FROM top_ups WHERE account_id = $1 AND ( \
                      lease_owner IS NOT NULL \
                      OR (status = 'PENDING' AND waits_for IS NOT NULL \
                          AND NOT top_up_outcome_unknown(waits_for)) \
                      OR (status IN ('PENDING', 'RETRY_SCHEDULED', 'UNKNOWN') \
                          AND COALESCE(next_attempt_at, created_at) <= $2) \
                      OR (status = 'REQUIRES_ACTION' AND updated_at <= $3))) \
                 OR EXISTS (SELECT 1 FROM top_up_crossings WHERE account_id = $1 AND resume_at <= $2)",
            )
            .bind(account)
            .bind(now)
            .bind(now - self.action_expiry)
            .fetch_one(&self.app.pool)
            .await
            .map_err(|e| e.to_string())?;
            // Two calm reads in a row: the engine had a poll to act in between.
            calm = if busy { 0 } else { calm + 1 };
            if calm >= 3 {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                return Err("the account did not settle within 30 s".into());
            }
            tokio::time::sleep(StdDuration::from_millis(40)).await;
        }
    }

    async fn observe(&self, account: &str) -> Observed {
        let admin = self.admin(account);
        let balance = crate::payment_methods::balance(&self.app, account).await;
        let ledger_sum: Decimal = sqlx::query_scalar(
            "SELECT COALESCE(SUM(amount), 0) FROM ledger_entries WHERE account_id = $1",
        )
        .bind(account)
        .fetch_one(&self.app.pool)
        .await
        .unwrap();
        let top_ups = crate::top_ups::policy(&self.app)
            .list_top_ups(authed(
                &admin,
                proto::ListTopUpsRequest {
                    account_id: account.into(),
                    page_size: 100,
                    ..Default::default()
                },
            ))
            .await
            .unwrap()
            .into_inner()
            .top_ups;
        let methods = crate::payment_methods::list(&self.app, &admin, account).await;
        Observed {
            balance: money(&balance),
            ledger_sum,
            top_ups,
            methods,
        }
    }

    async fn check(
        &self,
        model: &mut Model,
        observed: &Observed,
        balance_after_op: Decimal,
        op: &Op,
    ) -> Result<(), String> {
        let account = model.account.clone();
        let automatic = proto::TopUpTrigger::Automatic as i32;
        let status = |t: &proto::TopUp| TopUpStatus::try_from(t.status).unwrap();

        // Newly made attempts, oldest top-up first (chains are created in order).
        let mut ordered = observed.top_ups.clone();
        ordered.reverse();
        let mut running = balance_after_op;
        let reconciled_credit = ordered.iter().any(|t| {
            status(t) == TopUpStatus::Succeeded
                && !model.credited.contains(&t.top_up_id)
                && t.attempts.iter().any(|a| {
                    a.outcome == proto::AttemptOutcome::Succeeded as i32
                        && model
                            .seen_attempts
                            .contains(&(t.top_up_id.clone(), a.attempt_number))
                })
        });
        let live_at_start: Vec<ModelCard> = model.cards.clone();
        for top_up in &ordered {
            for attempt in &top_up.attempts {
                let key = (top_up.top_up_id.clone(), attempt.attempt_number);
                let new = model.seen_attempts.insert(key.clone());
                if new && top_up.trigger == automatic {
                    ensure(model.settings.auto, || {
                        format!("automatic attempt {key:?} while auto refill is off")
                    })?;
                    if !reconciled_credit {
                        ensure(running < model.settings.threshold, || {
                            format!(
                                "automatic attempt {key:?} with total balance {running} at or above the threshold {}",
                                model.settings.threshold
                            )
                        })?;
                    }
                    let card = live_at_start
                        .iter()
                        .find(|c| c.id == attempt.payment_method_id);
                    let soft_declined_here = top_up.attempts.iter().any(|a| {
                        a.attempt_number < attempt.attempt_number
                            && a.payment_method_id == attempt.payment_method_id
                            && a.outcome == proto::AttemptOutcome::Declined as i32
                            && !a.hard_decline
                    });
                    ensure(
                        card.is_some_and(|c| {
                            c.state != CardState::Removed
                                && c.auto_charge
                                && !c.hard_declined
                                && (c.state == CardState::Active || soft_declined_here)
                        }),
                        || {
                            format!(
                                "automatic attempt {key:?} charged a card the rules forbid: {card:?}"
                            )
                        },
                    )?;
                    if attempt.outcome == proto::AttemptOutcome::Succeeded as i32 {
                        running += money(&attempt.amount);
                    }
                }
                // Card effects of settled outcomes, once each.
                let previous = model.settled.insert(key.clone(), attempt.outcome);
                if previous != Some(attempt.outcome) {
                    let trigger = top_up.trigger;
                    if let Some(card) = model.card_mut(&attempt.payment_method_id) {
                        if attempt.outcome == proto::AttemptOutcome::Declined as i32
                            && attempt.decline_code != "not_processed"
                            && (attempt.hard_decline || trigger == automatic)
                            && card.state == CardState::Active
                        {
                            card.state = CardState::Disabled;
                        }
                        if attempt.hard_decline {
                            card.hard_declined = true;
                        }
                        if attempt.outcome == proto::AttemptOutcome::Succeeded as i32
                            && card.state != CardState::Removed
                        {
                            card.state = CardState::Active;
                            if trigger == proto::TopUpTrigger::Retry as i32 {
                                card.auto_charge = true;
                            }
                        }
                    }
                }
            }
            if status(top_up) == TopUpStatus::Succeeded
                && model.credited.insert(top_up.top_up_id.clone())
            {
                model.balance += money(&top_up.amount);
            }
        }

        // The ledger.
        ensure(observed.balance == model.balance, || {
            format!(
                "balance {} but the model says {}",
                observed.balance, model.balance
            )
        })?;
        ensure(observed.ledger_sum == observed.balance, || {
            format!(
                "ledger sums to {} but the balance is {}",
                observed.ledger_sum, observed.balance
            )
        })?;

        // Credit iff a charge succeeded, exactly once.
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT metadata->>'top_up_id', COUNT(*) FROM ledger_entries \
              WHERE account_id = $1 AND kind = 'top_up' GROUP BY 1",
        )
        .bind(&account)
        .fetch_all(&self.app.pool)
        .await
        .unwrap();
        let credits: BTreeMap<String, i64> = rows.into_iter().collect();
        let charged: Vec<(String, String)> = sqlx::query_as(
            "SELECT a.top_up_id, t.status FROM sandbox_charges c \
               JOIN top_up_attempts a ON a.gateway_idempotency_key = c.idempotency_key \
               JOIN top_ups t ON t.top_up_id = a.top_up_id \
              WHERE t.account_id = $1 AND c.outcome = 'succeeded'",
        )
        .bind(&account)
        .fetch_all(&self.app.pool)
        .await
        .unwrap();
        for (top_up_id, top_up_status) in &charged {
            let credited = credits.get(top_up_id).copied().unwrap_or(0);
            ensure(
                credited == 1
                    || (credited == 0
                        && matches!(top_up_status.as_str(), "UNKNOWN" | "NEEDS_ATTENTION")),
                || {
                    format!(
                        "top-up {top_up_id} ({top_up_status}) charged and credited {credited} times"
                    )
                },
            )?;
        }
        for (top_up_id, count) in &credits {
            ensure(
                *count == 1 && charged.iter().any(|(id, _)| id == top_up_id),
                || {
                    format!(
                        "top-up {top_up_id} credited {count} times for {} charges",
                        charged.iter().filter(|(id, _)| id == top_up_id).count()
                    )
                },
            )?;
        }

        // At most one open automatic top-up.
        let open = observed
            .top_ups
            .iter()
            .filter(|t| {
                t.trigger == automatic
                    && matches!(
                        status(t),
                        TopUpStatus::Pending | TopUpStatus::RetryScheduled | TopUpStatus::Unknown
                    )
            })
            .count();
        ensure(open <= 1, || format!("{open} open automatic top-ups"))?;

        // The cards are what the rules make them.
        let server: Vec<(String, i32, bool)> = observed
            .methods
            .iter()
            .map(|m| (m.payment_method_id.clone(), m.status, m.auto_charge))
            .collect();
        let expected: Vec<(String, i32, bool)> = model
            .cards
            .iter()
            .filter(|c| c.state != CardState::Removed)
            .map(|c| {
                let state = match c.state {
                    CardState::Active => proto::PaymentMethodStatus::Active,
                    CardState::Disabled => proto::PaymentMethodStatus::TemporarilyDisabled,
                    CardState::Removed => proto::PaymentMethodStatus::Removed,
                } as i32;
                (c.id.clone(), state, c.auto_charge)
            })
            .collect();
        ensure(server == expected, || {
            format!("cards (id, status, auto_charge) are {server:?}; the rules give {expected:?}")
        })?;

        // Settled with auto refill on and still below: stopped, and the customer told.
        if model.settings.auto && model.balance < model.settings.threshold {
            let latest = observed.top_ups.iter().find(|t| t.trigger == automatic);
            let Some(latest) = latest else {
                return Err(format!(
                    "below the threshold ({} < {}) with auto refill on and no automatic top-up (after {op:?})",
                    model.balance, model.settings.threshold
                ));
            };
            let emailed = |kind: &str| {
                let pool = self.app.pool.clone();
                let account = account.clone();
                let kind = kind.to_owned();
                async move {
                    let count: i64 = sqlx::query_scalar(
                        "SELECT COUNT(*) FROM notifications WHERE account_id = $1 AND kind = $2",
                    )
                    .bind(&account)
                    .bind(&kind)
                    .fetch_one(&pool)
                    .await
                    .unwrap();
                    count > 0
                }
            };
            let told = match status(latest) {
                TopUpStatus::RetryScheduled | TopUpStatus::Failed => emailed("top_up_failed").await,
                TopUpStatus::RequiresAction => emailed("authentication_required").await,
                TopUpStatus::CapReached => emailed("top_up_cap_reached").await,
                TopUpStatus::Unknown | TopUpStatus::NeedsAttention => true,
                TopUpStatus::Pending => self.gate_closed(&account).await,
                _ => false,
            };
            if !told {
                let row = self.stored_top_up(&latest.top_up_id).await;
                return Err(format!(
                    "below the threshold ({} < {}) with auto refill on; the latest automatic top-up is {:?} ({}) and no email says why; stored: {row}; clock {}",
                    model.balance,
                    model.settings.threshold,
                    status(latest),
                    latest.failure_reason,
                    self.clock.now()
                ));
            }
        }
        Ok(())
    }
}

fn ops_for(seed: u64) -> Vec<Op> {
    let mut rng = StdRng::seed_from_u64(seed);
    let length = rng.random_range(6..18);
    // Most sequences start with a card and settings, so the interesting paths are reached.
    let mut ops = vec![Op::AddCard(Kind::Visa)];
    if rng.random_bool(0.5) {
        ops.insert(
            0,
            Op::AddCard(
                [Kind::Declines, Kind::OffSession3ds, Kind::Timeout][rng.random_range(0..3)],
            ),
        );
    }
    ops.push(Op::Apply {
        auto: true,
        threshold: [10, 20, 40][rng.random_range(0..3)],
        refill: 30,
    });
    ops.extend((0..length).map(|_| random_op(&mut rng)));
    ops
}

/// Shrinks a failing sequence: drops ops one at a time while it still fails.
async fn shrink(runner: &mut Runner, mut ops: Vec<Op>, mut failure: String) -> (Vec<Op>, String) {
    let mut budget = 60;
    let mut index = 0;
    while index < ops.len() && budget > 0 {
        let mut candidate = ops.clone();
        candidate.remove(index);
        budget -= 1;
        match runner.run("shrink", &candidate).await {
            Err(message) => {
                ops = candidate;
                failure = message;
            }
            Ok(()) => index += 1,
        }
    }
    (ops, failure)
}

/// Replays one case (`MODEL_CASE`) of `seed`, `MODEL_REPEAT` times (default
/// 1) on one server, shrinking the first failure.
async fn replay(seed: u64, case: u64) {
    let repeat: u32 = std::env::var("MODEL_REPEAT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let case_seed = seed.wrapping_add(case);
    let ops = ops_for(case_seed);
    eprintln!("replaying case {case} (case seed {case_seed}), {repeat} times: {ops:?}");
    let mut runner = Runner::new().await;
    for run in 0..repeat {
        if let Err(failure) = runner.run(&format!("r{run}"), &ops).await {
            let (shortest, failure) = shrink(&mut runner, ops, failure).await;
            runner.app.stop().await;
            panic!(
                "case {case} (MODEL_SEED={seed}) failed on run {run}: {failure}\n\
                 shortest failing sequence ({} ops):\n{shortest:#?}",
                shortest.len()
            );
        }
    }
    runner.app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn random_operation_sequences_keep_the_top_up_card_and_ledger_rules() {
    let seed: u64 = std::env::var("MODEL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    let cases: u64 = std::env::var("MODEL_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let workers: u64 = 4;
    eprintln!("model test: MODEL_SEED={seed} MODEL_CASES={cases}");
    if let Some(case) = std::env::var("MODEL_CASE")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
    {
        replay(seed, case).await;
        return;
    }
    let mut tasks = Vec::new();
    for worker in 0..workers {
        tasks.push(tokio::spawn(async move {
            let mut runner = Runner::new().await;
            let mut case = worker;
            while case < cases {
                let case_seed = seed.wrapping_add(case);
                let ops = ops_for(case_seed);
                if let Err(failure) = runner.run(&format!("c{case}"), &ops).await {
                    let (shortest, failure) = shrink(&mut runner, ops, failure).await;
                    runner.app.stop().await;
                    return Err(format!(
                        "case {case} (MODEL_SEED={seed}, case seed {case_seed}) failed: {failure}\n\
                         shortest failing sequence ({} ops):\n{shortest:#?}",
                        shortest.len()
                    ));
                }
                case += workers;
            }
            runner.app.stop().await;
            Ok(())
        }));
    }
    let mut failures = Vec::new();
    for task in tasks {
        if let Err(failure) = task.await.expect("a model worker") {
            failures.push(failure);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
