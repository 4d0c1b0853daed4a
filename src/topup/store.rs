//! The SQL of top-ups and their attempts.

use rust_decimal::Decimal;
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, Row};
use uuid::Uuid;

use super::{
    AttemptOutcome, PendingChallenge, TopUp, TopUpAttempt, TopUpStatus, Trigger, new_top_up_id,
};
use crate::error::BillingError;
use crate::ids::AccountId;
use crate::ledger::currency_from_column;
use crate::paging::Page;

macro_rules! top_up_columns {
    () => {
        "top_up_id, top_up_seq, account_id, trigger, status, amount, currency, payment_method_id, \
         transaction_id, failure_reason, next_attempt_at, challenge_id, challenge_url, created_at, rounds, \
         crossing_key, reconcile_tries"
    };
}

const SELECT_SQL: &str = concat!(
    "SELECT ",
    top_up_columns!(),
    " FROM top_ups WHERE account_id = $1 AND top_up_id = $2"
);
const LOCK_SQL: &str = concat!(
    "SELECT ",
    top_up_columns!(),
    " FROM top_ups WHERE account_id = $1 AND top_up_id = $2 FOR UPDATE"
);
const LIST_SQL: &str = concat!(
    "SELECT ",
    top_up_columns!(),
    " FROM top_ups WHERE account_id = $1 AND ($2::bigint IS NULL OR top_up_seq < $2) ",
    "ORDER BY top_up_seq DESC LIMIT $3"
);
const INSERT_SQL: &str = concat!(
    "INSERT INTO top_ups (top_up_id, account_id, trigger, status, amount, currency, payment_method_id, crossing_key, ",
    "created_at, updated_at) VALUES ($1, $2, $3, 'PENDING', $4, $5, $6, $7, $8, $8) RETURNING ",
    top_up_columns!()
);

fn unexpected(what: &str, text: &str) -> BillingError {
    BillingError::Unexpected(anyhow::anyhow!("unknown {what} {text:?} in the database"))
}

fn top_up_from_row(row: &PgRow) -> Result<(i64, TopUp), BillingError> {
    let trigger: String = row.try_get("trigger")?;
    let status: String = row.try_get("status")?;
    let currency: String = row.try_get("currency")?;
    let challenge_id: Option<String> = row.try_get("challenge_id")?;
    let challenge_url: Option<String> = row.try_get("challenge_url")?;
    let top_up = TopUp {
        top_up_id: row.try_get("top_up_id")?,
        account_id: row.try_get("account_id")?,
        trigger: Trigger::parse(&trigger).ok_or_else(|| unexpected("trigger", &trigger))?,
        status: TopUpStatus::parse(&status).ok_or_else(|| unexpected("status", &status))?,
        amount: row.try_get("amount")?,
        currency: currency_from_column(&currency)?,
        payment_method_id: row.try_get("payment_method_id")?,
        transaction_id: row.try_get("transaction_id")?,
        failure_reason: row.try_get("failure_reason")?,
        next_attempt_at: row.try_get("next_attempt_at")?,
        challenge: challenge_id.map(|challenge_id| PendingChallenge {
            challenge_id,
            redirect_url: challenge_url.unwrap_or_default(),
        }),
        created_at: row.try_get("created_at")?,
        rounds: row.try_get("rounds")?,
        crossing_key: row.try_get("crossing_key")?,
        reconcile_tries: row.try_get("reconcile_tries")?,
        attempts: Vec::new(),
    };
    Ok((row.try_get("top_up_seq")?, top_up))
}

async fn with_attempts(
    connection: &mut PgConnection,
    mut top_up: TopUp,
) -> Result<TopUp, BillingError> {
    let rows = sqlx::query(
        "SELECT attempt_number, payment_method_id, outcome, decline_code, hard_decline, amount, attempted_at, \
                round, challenge_id, challenge_url \
           FROM top_up_attempts WHERE top_up_id = $1 ORDER BY attempt_number",
    )
    .bind(&top_up.top_up_id)
    .fetch_all(connection)
    .await?;
    top_up.attempts = rows
        .iter()
        .map(|row| {
            let outcome: String = row.try_get("outcome")?;
            let challenge_id: Option<String> = row.try_get("challenge_id")?;
            let challenge_url: Option<String> = row.try_get("challenge_url")?;
            Ok(TopUpAttempt {
                round: row.try_get("round")?,
                challenge: challenge_id.map(|challenge_id| PendingChallenge {
                    challenge_id,
                    redirect_url: challenge_url.unwrap_or_default(),
                }),
                attempt_number: row.try_get("attempt_number")?,
                payment_method_id: row.try_get("payment_method_id")?,
                outcome: AttemptOutcome::parse(&outcome)
                    .ok_or_else(|| unexpected("outcome", &outcome))?,
                decline_code: row.try_get("decline_code")?,
                hard_decline: row.try_get("hard_decline")?,
                amount: row.try_get("amount")?,
                attempted_at: row.try_get("attempted_at")?,
            })
        })
        .collect::<Result<_, BillingError>>()?;
    Ok(top_up)
}

/// One top-up of an account with its attempts; another account's is `NOT_FOUND`.
pub async fn get(
    connection: &mut PgConnection,
    account_id: &AccountId,
    top_up_id: &str,
) -> Result<TopUp, BillingError> {
    let row = sqlx::query(SELECT_SQL)
        .bind(account_id.as_str())
        .bind(top_up_id)
        .fetch_optional(&mut *connection)
        .await?
        .ok_or(BillingError::NotFound("top-up"))?;
    let (_, top_up) = top_up_from_row(&row)?;
    with_attempts(connection, top_up).await
}

/// One transaction whose reads all see one snapshot (`REPEATABLE READ`,
/// read-only): a top-up and its attempts are two queries, and read apart
/// they can straddle a commit (the top-up still waiting, its attempt
/// already settled).
pub async fn snapshot(
    pool: &sqlx::PgPool,
) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, BillingError> {
    let mut transaction = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *transaction)
        .await?;
    Ok(transaction)
}

/// Locks a top-up row for a read-modify-write.
pub(super) async fn lock(
    connection: &mut PgConnection,
    account_id: &AccountId,
    top_up_id: &str,
) -> Result<TopUp, BillingError> {
    let row = sqlx::query(LOCK_SQL)
        .bind(account_id.as_str())
        .bind(top_up_id)
        .fetch_optional(&mut *connection)
        .await?
        .ok_or(BillingError::NotFound("top-up"))?;
    let (_, top_up) = top_up_from_row(&row)?;
    with_attempts(connection, top_up).await
}

/// Newest first, with the paging key of the last row.
pub async fn list(
    connection: &mut PgConnection,
    account_id: &AccountId,
    page: &Page,
) -> Result<(Vec<TopUp>, Option<i64>), BillingError> {
    let rows = sqlx::query(LIST_SQL)
        .bind(account_id.as_str())
        .bind(page.after_id)
        .bind(page.size)
        .fetch_all(&mut *connection)
        .await?;
    let mut top_ups = Vec::with_capacity(rows.len());
    let mut last_seq = None;
    for row in &rows {
        let (seq, top_up) = top_up_from_row(row)?;
        last_seq = Some(seq);
        top_ups.push(with_attempts(connection, top_up).await?);
    }
    Ok((top_ups, last_seq))
}

#[derive(Debug, Clone)]
pub(super) struct NewTopUp<'a> {
    pub account_id: &'a AccountId,
    pub trigger: Trigger,
    pub amount: Decimal,
    pub currency: crate::money::Currency,
    pub payment_method_id: Option<&'a str>,
    pub crossing_key: Option<&'a str>,
    pub now: chrono::DateTime<chrono::Utc>,
}

pub(super) async fn insert(
    connection: &mut PgConnection,
    new: NewTopUp<'_>,
) -> Result<TopUp, BillingError> {
    let row = sqlx::query(INSERT_SQL)
        .bind(new_top_up_id())
        .bind(new.account_id.as_str())
        .bind(new.trigger.as_str())
        .bind(new.amount)
        .bind(new.currency.code())
        .bind(new.payment_method_id)
        .bind(new.crossing_key)
        .bind(new.now)
        .fetch_one(connection)
        .await?;
    Ok(top_up_from_row(&row)?.1)
}

/// Records the outcome of one attempt (recorded `UNKNOWN` before its gateway call).
pub(super) async fn settle_attempt(
    connection: &mut PgConnection,
    top_up_id: &str,
    attempt_number: i32,
    outcome: AttemptOutcome,
    decline: Option<(&str, bool)>,
    gateway_charge_id: Option<&str>,
    challenge: Option<&PendingChallenge>,
) -> Result<(), BillingError> {
    let (decline_code, hard_decline) = decline.unwrap_or(("", false));
    sqlx::query(
        "UPDATE top_up_attempts SET outcome = $3, decline_code = $4, hard_decline = $5, \
                gateway_charge_id = COALESCE($6, gateway_charge_id), \
                challenge_id = COALESCE($7, challenge_id), challenge_url = COALESCE($8, challenge_url) \
          WHERE top_up_id = $1 AND attempt_number = $2",
    )
    .bind(top_up_id)
    .bind(attempt_number)
    .bind(outcome.as_str())
    .bind(decline_code)
    .bind(hard_decline)
    .bind(gateway_charge_id)
    .bind(challenge.map(|c| c.challenge_id.as_str()))
    .bind(challenge.map(|c| c.redirect_url.as_str()))
    .execute(connection)
    .await?;
    Ok(())
}

/// Moves a top-up to `status`, with the ledger transaction, failure reason
/// and challenge that go with it, and ends its lease.
pub(super) async fn finish(
    connection: &mut PgConnection,
    top_up_id: &str,
    status: TopUpStatus,
    transaction_id: Option<Uuid>,
    failure_reason: &str,
    challenge: Option<&PendingChallenge>,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<(), BillingError> {
    sqlx::query(
        "UPDATE top_ups SET status = $2, transaction_id = COALESCE($3, transaction_id), failure_reason = $4, \
                challenge_id = $5, challenge_url = $6, next_attempt_at = NULL, waits_for = NULL, lease_until = NULL, \
                lease_owner = NULL, updated_at = $7 \
          WHERE top_up_id = $1",
    )
    .bind(top_up_id)
    .bind(status.as_str())
    .bind(transaction_id)
    .bind(failure_reason)
    .bind(challenge.map(|c| c.challenge_id.as_str()))
    .bind(challenge.map(|c| c.redirect_url.as_str()))
    .bind(now)
    .execute(connection)
    .await?;
    Ok(())
}

/// The account and trigger of a top-up found by id alone (a processor's
/// webhook names only the top-up).
pub async fn owner(
    connection: &mut PgConnection,
    top_up_id: &str,
) -> Result<Option<(AccountId, Trigger)>, BillingError> {
    let row: Option<(String, String)> =
        sqlx::query_as("SELECT account_id, trigger FROM top_ups WHERE top_up_id = $1")
            .bind(top_up_id)
            .fetch_optional(connection)
            .await?;
    row.map(|(account, trigger)| {
        Ok((
            AccountId::parse(&account)?,
            Trigger::parse(&trigger).ok_or_else(|| unexpected("trigger", &trigger))?,
        ))
    })
    .transpose()
}
