//! The sandbox gateway: a simulated card processor keeping its state in its
//! own tables (`sandbox_cards`, `sandbox_charges`). Test card numbers decide
//! what happens (see [`Behaviour`] and the README's table). It stores only a
//! token, brand, last 4, expiry, fingerprint and the behaviour label — never
//! a number or a CVC.

use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use chrono::Datelike;
use sqlx::{PgPool, Row};

use super::{
    CardSource, Challenge, Charge, ChargeRequest, GatewayError, Outcome, PaymentGateway, SavedCard,
    Setup,
};
use crate::card::{CardDetails, CardNumber};

/// What a test card does. Any other valid number behaves like `Succeeds`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    Succeeds,
    AlwaysAuthenticates,
    AuthenticatesOnSetup,
    AuthenticatesThenInsufficientFunds,
    DeclinedAtSetup,
    DeclinesCharges,
    ExpiredCard,
    IncorrectCvc,
    ProcessingError,
    TimesOut,
    AuthenticatesOffSession,
    DeclinesOffSession,
    /// A slow processor: set-up and detach take [`SandboxGateway::with_stall`]'s time.
    Stalls,
}

const TEST_CARDS: &[(&str, Behaviour)] = &[
    ("4242424242424242", Behaviour::Succeeds),
    ("4000002760003184", Behaviour::AlwaysAuthenticates),
    ("4000002500003155", Behaviour::AuthenticatesOnSetup),
    (
        "4000008260003178",
        Behaviour::AuthenticatesThenInsufficientFunds,
    ),
    ("4000000000000002", Behaviour::DeclinedAtSetup),
    ("4000000000000341", Behaviour::DeclinesCharges),
    ("4000000000000069", Behaviour::ExpiredCard),
    ("4000000000000127", Behaviour::IncorrectCvc),
    ("4000000000000119", Behaviour::ProcessingError),
    ("4000000000009904", Behaviour::TimesOut),
    ("4000003800000446", Behaviour::AuthenticatesOffSession),
    ("4000000000004954", Behaviour::DeclinesOffSession),
    ("4000000000003014", Behaviour::Stalls),
];

/// Client-side tokens the sandbox accepts instead of a raw card, and the card each stands for.
const TEST_TOKENS: &[(&str, &str)] = &[
    ("tok_visa", "4242424242424242"),
    ("tok_mastercard", "5555555555554444"),
    ("tok_amex", "378282246310005"),
    ("tok_threeDSecureRequired", "4000002760003184"),
    ("tok_chargeDeclined", "4000000000000341"),
];

impl Behaviour {
    fn of(number: &CardNumber) -> Behaviour {
        TEST_CARDS
            .iter()
            .find(|(digits, _)| *digits == number.expose_digits())
            .map_or(Behaviour::Succeeds, |(_, behaviour)| *behaviour)
    }

    fn as_str(self) -> &'static str {
        match self {
            Behaviour::Succeeds => "succeeds",
            Behaviour::AlwaysAuthenticates => "always_authenticates",
            Behaviour::AuthenticatesOnSetup => "authenticates_on_setup",
            Behaviour::AuthenticatesThenInsufficientFunds => {
                "authenticates_then_insufficient_funds"
            }
            Behaviour::DeclinedAtSetup => "declined_at_setup",
            Behaviour::DeclinesCharges => "declines_charges",
            Behaviour::ExpiredCard => "expired_card",
            Behaviour::IncorrectCvc => "incorrect_cvc",
            Behaviour::ProcessingError => "processing_error",
            Behaviour::TimesOut => "times_out",
            Behaviour::AuthenticatesOffSession => "authenticates_off_session",
            Behaviour::DeclinesOffSession => "declines_off_session",
            Behaviour::Stalls => "stalls",
        }
    }

    fn parse(text: &str) -> Behaviour {
        ALL_BEHAVIOURS
            .into_iter()
            .find(|b| b.as_str() == text)
            .unwrap_or(Behaviour::Succeeds)
    }

    fn setup_outcome(self) -> SetupState {
        match self {
            Behaviour::AlwaysAuthenticates
            | Behaviour::AuthenticatesOnSetup
            | Behaviour::AuthenticatesThenInsufficientFunds => SetupState::RequiresAction,
            Behaviour::DeclinedAtSetup => SetupState::Failed,
            _ => SetupState::Succeeded,
        }
    }

    /// What the processor really did with a charge (a timeout hides it from the caller).
    fn charge_result(self, off_session: bool) -> (&'static str, &'static str, bool) {
        match self {
            Behaviour::AlwaysAuthenticates => ("requires_action", "", false),
            Behaviour::AuthenticatesOffSession if off_session => ("requires_action", "", false),
            Behaviour::DeclinesOffSession if off_session => {
                ("declined", "insufficient_funds", false)
            }
            Behaviour::AuthenticatesThenInsufficientFunds => {
                ("declined", "insufficient_funds", false)
            }
            Behaviour::DeclinesCharges => ("declined", "card_declined", false),
            Behaviour::ExpiredCard => ("declined", "expired_card", true),
            Behaviour::IncorrectCvc => ("declined", "incorrect_cvc", true),
            Behaviour::ProcessingError => ("declined", "processing_error", false),
            _ => ("succeeded", "", false),
        }
    }
}

const ALL_BEHAVIOURS: [Behaviour; 13] = [
    Behaviour::Succeeds,
    Behaviour::AlwaysAuthenticates,
    Behaviour::AuthenticatesOnSetup,
    Behaviour::AuthenticatesThenInsufficientFunds,
    Behaviour::DeclinedAtSetup,
    Behaviour::DeclinesCharges,
    Behaviour::ExpiredCard,
    Behaviour::IncorrectCvc,
    Behaviour::ProcessingError,
    Behaviour::TimesOut,
    Behaviour::AuthenticatesOffSession,
    Behaviour::DeclinesOffSession,
    Behaviour::Stalls,
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SetupState {
    RequiresAction,
    Succeeded,
    Failed,
}

impl SetupState {
    fn as_str(self) -> &'static str {
        match self {
            SetupState::RequiresAction => "requires_action",
            SetupState::Succeeded => "succeeded",
            SetupState::Failed => "failed",
        }
    }
}

fn challenge(challenge_id: String) -> Challenge {
    Challenge {
        redirect_url: format!("https://sandbox.billing.invalid/3ds/{challenge_id}"),
        challenge_id,
    }
}

fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::new_v4().simple())
}

/// How long the stalling test card's set-up and detach take by default.
pub const DEFAULT_STALL: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct SandboxGateway {
    pool: PgPool,
    stall: Duration,
}

impl SandboxGateway {
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            stall: DEFAULT_STALL,
        }
    }

    /// The time the stalling test card (4000 0000 0000 3014) takes to be set
    /// up or detached: a slow processor, for tests.
    pub fn with_stall(self, stall: Duration) -> Self {
        Self { stall, ..self }
    }

    /// A card that a test token stands for, expiring in three years.
    fn card_for_token(token: &str) -> Result<CardDetails, GatewayError> {
        let number = TEST_TOKENS
            .iter()
            .find(|(name, _)| *name == token)
            .map(|(_, number)| *number)
            .ok_or(GatewayError::UnknownToken)?;
        let today = chrono::Utc::now().date_naive();
        let cvc = if number.starts_with('3') {
            "1234"
        } else {
            "123"
        };
        CardDetails::parse(number, 12, today.year() + 3, cvc, "", today)
            .map_err(|_| GatewayError::Rejected("the test token's card is invalid".into()))
    }
}

macro_rules! charge_columns {
    () => {
        "charge_id, token, amount, outcome, decline_code, hard_decline, challenge_id"
    };
}
const INSERT_CHARGE_SQL: &str = concat!(
    "INSERT INTO sandbox_charges (charge_id, idempotency_key, token, amount, currency, off_session, outcome, ",
    "decline_code, hard_decline, challenge_id) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ",
    "ON CONFLICT (idempotency_key) DO NOTHING RETURNING ",
    charge_columns!()
);
const SELECT_CHARGE_SQL: &str = concat!(
    "SELECT ",
    charge_columns!(),
    " FROM sandbox_charges WHERE idempotency_key = $1"
);

fn charge_from_row(row: &sqlx::postgres::PgRow) -> Result<Charge, GatewayError> {
    let outcome: String = row.try_get("outcome").context("reading a sandbox charge")?;
    let outcome = match outcome.as_str() {
        "succeeded" => Outcome::Succeeded,
        "requires_action" => {
            let id: Option<String> = row
                .try_get("challenge_id")
                .context("reading a sandbox charge")?;
            Outcome::RequiresAction {
                challenge: challenge(id.unwrap_or_default()),
            }
        }
        _ => Outcome::Declined {
            code: row
                .try_get("decline_code")
                .context("reading a sandbox charge")?,
            hard: row
                .try_get("hard_decline")
                .context("reading a sandbox charge")?,
        },
    };
    Ok(Charge {
        charge_id: Some(
            row.try_get("charge_id")
                .context("reading a sandbox charge")?,
        ),
        outcome,
    })
}

#[async_trait]
impl PaymentGateway for SandboxGateway {
    fn name(&self) -> &'static str {
        "sandbox"
    }

    async fn setup_card(
        &self,
        _account_reference: &str,
        source: CardSource,
    ) -> Result<Setup, GatewayError> {
        let card = match source {
            CardSource::Card(card) => card,
            CardSource::Token(token) => Self::card_for_token(&token)?,
        };
        let behaviour = Behaviour::of(&card.number);
        if behaviour == Behaviour::Stalls {
            tokio::time::sleep(self.stall).await;
        }
        let state = behaviour.setup_outcome();
        let token = new_id("tok_sbx");
        let challenge_id = (state == SetupState::RequiresAction).then(|| new_id("chl_sbx"));
        let saved = SavedCard {
            token: token.clone(),
            brand: card.number.brand().as_str().to_owned(),
            last4: card.number.last4().to_owned(),
            exp_month: card.expiry.month,
            exp_year: card.expiry.year,
            fingerprint: card.number.fingerprint(),
        };
        sqlx::query(
            "INSERT INTO sandbox_cards (token, brand, last4, exp_month, exp_year, fingerprint, behaviour, setup_status, challenge_id) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(&saved.token)
        .bind(&saved.brand)
        .bind(&saved.last4)
        .bind(saved.exp_month as i32)
        .bind(saved.exp_year)
        .bind(&saved.fingerprint)
        .bind(behaviour.as_str())
        .bind(state.as_str())
        .bind(&challenge_id)
        .execute(&self.pool)
        .await
        .context("saving a sandbox card")?;
        let outcome = match (state, challenge_id) {
            (SetupState::RequiresAction, Some(id)) => Outcome::RequiresAction {
                challenge: challenge(id),
            },
            (SetupState::Failed, _) => Outcome::Declined {
                code: "card_declined".into(),
                hard: false,
            },
            _ => Outcome::Succeeded,
        };
        Ok(Setup {
            card: saved,
            outcome,
        })
    }

    async fn confirm_setup(
        &self,
        token: &str,
        authenticated: bool,
    ) -> Result<Outcome, GatewayError> {
        let new_state = if authenticated {
            SetupState::Succeeded
        } else {
            SetupState::Failed
        };
        let updated = sqlx::query(
            "UPDATE sandbox_cards SET setup_status = $2, challenge_id = NULL \
              WHERE token = $1 AND detached_at IS NULL AND setup_status = 'requires_action'",
        )
        .bind(token)
        .bind(new_state.as_str())
        .execute(&self.pool)
        .await
        .context("confirming a sandbox card")?;
        if updated.rows_affected() == 0 {
            // The same confirmation again (a replay, or one racing it) gets
            // the same answer, as a processor's set-up state would give.
            let settled: Option<String> = sqlx::query_scalar(
                "SELECT setup_status FROM sandbox_cards WHERE token = $1 AND detached_at IS NULL",
            )
            .bind(token)
            .fetch_optional(&self.pool)
            .await
            .context("reading a sandbox card")?;
            if settled.as_deref() != Some(new_state.as_str()) {
                return Err(GatewayError::Rejected(
                    "the card has no open authentication challenge".into(),
                ));
            }
        }
        Ok(if authenticated {
            Outcome::Succeeded
        } else {
            Outcome::Declined {
                code: "authentication_failed".into(),
                hard: false,
            }
        })
    }

    async fn charge(&self, request: ChargeRequest) -> Result<Charge, GatewayError> {
        let card: Option<(String, String)> = sqlx::query_as(
            "SELECT behaviour, setup_status FROM sandbox_cards WHERE token = $1 AND detached_at IS NULL",
        )
        .bind(&request.token)
        .fetch_optional(&self.pool)
        .await
        .context("reading a sandbox card")?;
        let (behaviour, setup_status) = card.ok_or(GatewayError::UnknownToken)?;
        if setup_status != SetupState::Succeeded.as_str() {
            return Err(GatewayError::Rejected(
                "the card is not set up for charges".into(),
            ));
        }
        let behaviour = Behaviour::parse(&behaviour);
        let (outcome, decline_code, hard) = behaviour.charge_result(request.off_session);
        let challenge_id = (outcome == "requires_action").then(|| new_id("chl_sbx"));
        // A repeated key returns the charge made the first time and charges nothing.
        let inserted = sqlx::query(INSERT_CHARGE_SQL)
            .bind(new_id("ch_sbx"))
            .bind(&request.idempotency_key)
            .bind(&request.token)
            .bind(request.amount)
            .bind(request.currency.code())
            .bind(request.off_session)
            .bind(outcome)
            .bind(decline_code)
            .bind(hard)
            .bind(&challenge_id)
            .fetch_optional(&self.pool)
            .await
            .context("recording a sandbox charge")?;
        if let Some(row) = inserted {
            if behaviour == Behaviour::TimesOut {
                // The processor charged, but the answer never arrived.
                return Ok(Charge {
                    charge_id: None,
                    outcome: Outcome::Unknown,
                });
            }
            return charge_from_row(&row);
        }
        let row = sqlx::query(SELECT_CHARGE_SQL)
            .bind(&request.idempotency_key)
            .fetch_one(&self.pool)
            .await
            .context("reading a sandbox charge")?;
        let same_token: String = row.try_get("token").context("reading a sandbox charge")?;
        let same_amount: rust_decimal::Decimal =
            row.try_get("amount").context("reading a sandbox charge")?;
        if same_token != request.token || same_amount != request.amount {
            return Err(GatewayError::Rejected(
                "idempotency key reused with different charge parameters".into(),
            ));
        }
        charge_from_row(&row)
    }

    async fn find_charge(&self, idempotency_key: &str) -> Result<Option<Charge>, GatewayError> {
        let row = sqlx::query(SELECT_CHARGE_SQL)
            .bind(idempotency_key)
            .fetch_optional(&self.pool)
            .await
            .context("reading a sandbox charge")?;
        row.as_ref().map(charge_from_row).transpose()
    }

    async fn confirm_charge(
        &self,
        idempotency_key: &str,
        authenticated: bool,
    ) -> Result<Charge, GatewayError> {
        // Passed: the card's own behaviour decides (one that authenticates and
        // then has no funds is declined); failed: declined as such.
        sqlx::query(
            "UPDATE sandbox_charges c \
                SET outcome = CASE WHEN NOT $2 THEN 'declined' \
                                   WHEN s.behaviour = 'authenticates_then_insufficient_funds' THEN 'declined' \
                                   ELSE 'succeeded' END, \
                    decline_code = CASE WHEN NOT $2 THEN 'authentication_failed' \
                                        WHEN s.behaviour = 'authenticates_then_insufficient_funds' THEN 'insufficient_funds' \
                                        ELSE '' END, \
                    challenge_id = NULL \
               FROM sandbox_cards s \
              WHERE s.token = c.token AND c.idempotency_key = $1 AND c.outcome = 'requires_action'",
        )
        .bind(idempotency_key)
        .bind(authenticated)
        .execute(&self.pool)
        .await
        .context("confirming a sandbox charge")?;
        self.find_charge(idempotency_key)
            .await?
            .ok_or_else(|| GatewayError::Rejected("no charge was made with this key".into()))
    }

    async fn detach(&self, token: &str) -> Result<(), GatewayError> {
        let behaviour: Option<String> =
            sqlx::query_scalar("SELECT behaviour FROM sandbox_cards WHERE token = $1")
                .bind(token)
                .fetch_optional(&self.pool)
                .await
                .context("reading a sandbox card")?;
        if behaviour.as_deref().map(Behaviour::parse) == Some(Behaviour::Stalls) {
            tokio::time::sleep(self.stall).await;
        }
        sqlx::query(
            "UPDATE sandbox_cards SET detached_at = COALESCE(detached_at, now()) WHERE token = $1",
        )
        .bind(token)
        .execute(&self.pool)
        .await
        .context("detaching a sandbox card")?;
        Ok(())
    }
}
