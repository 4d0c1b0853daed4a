//! Group commit for debits: concurrent debits to one account share one
//! transaction.
//!
//! Each account has an in-process queue. The first debit to find it empty
//! starts a leader task, which repeatedly takes up to `max_batch` waiting
//! debits and applies them, in arrival order, inside one transaction under one
//! row lock: each is checked on its own for idempotency (stored keys and keys
//! earlier in the batch) and for funds (against the balance left by the debits
//! before it), so a refused debit writes nothing and spoils nothing. The
//! accepted ones are written by one statement ([`batch_debit.sql`]). Every
//! caller is answered only after the commit that holds its entry; a caller
//! that is gone (timed out) before its debit is applied withdraws it; if the
//! transaction fails, every accepted debit of the batch gets the error.
//!
//! The stored keys are read optimistically with the lock; an acceptance is
//! verified by the write (a key stored meanwhile is noticed and the batch
//! redone), and a refusal is never answered from that read: the keys are
//! read again under the lock before any debit is refused.
//!
//! With no contention a batch holds one debit, and the cost is that of a plain
//! debit in four round trips (BEGIN, lock with the key lookup, write, COMMIT). The row lock
//! still serializes against other replicas and other writers (credits, top-ups).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::{PgConnection, PgPool, Row};
use tokio::sync::oneshot;
use uuid::Uuid;

use super::accounts::account_from_row;
use super::postings::BALANCE_LIMIT;
use super::{Account, EntryKind, LedgerEntry, Posting, PostingResult, idempotency};
use crate::auth::Caller;
use crate::error::{BillingError, Reason};

type Reply = oneshot::Sender<Result<PostingResult, BillingError>>;

pub(super) struct Waiting {
    pub(super) caller: Caller,
    pub(super) posting: Posting,
    pub(super) fingerprint: String,
    reply: Reply,
}

/// Coalesces concurrent debits per account (see the module header).
#[derive(Clone)]
pub struct DebitBatcher {
    pool: PgPool,
    max_batch: usize,
    /// An account is present while its leader runs; the vector is what waits.
    queues: Arc<Mutex<HashMap<String, Vec<Waiting>>>>,
}

impl DebitBatcher {
    pub fn new(pool: PgPool, max_batch: usize) -> Self {
        Self {
            pool,
            max_batch: max_batch.max(1),
            queues: Arc::default(),
        }
    }

    /// Debits the account; answers after the commit that contains this debit.
    pub async fn debit(
        &self,
        caller: &Caller,
        posting: Posting,
    ) -> Result<PostingResult, BillingError> {
        debug_assert!(posting.kind.is_debit(), "the batcher posts debits only");
        debug_assert!(posting.amount > Decimal::ZERO);
        let (reply, answer) = oneshot::channel();
        let account_id = posting.account_id.as_str().to_owned();
        let waiting = Waiting {
            caller: caller.clone(),
            fingerprint: posting.fingerprint(),
            posting,
            reply,
        };
        let lead = {
            let mut queues = self.queues.lock().unwrap_or_else(|e| e.into_inner());
            match queues.get_mut(&account_id) {
                Some(queue) => {
                    queue.push(waiting);
                    None
                }
                None => {
                    queues.insert(account_id.clone(), Vec::new());
                    Some(waiting)
                }
            }
        };
        if let Some(first) = lead {
            // A task, not this future: a cancelled caller must not strand the queue.
            let batcher = self.clone();
            tokio::spawn(async move { batcher.lead(account_id, vec![first]).await });
        }
        answer.await.map_err(|_| {
            BillingError::Unexpected(anyhow::anyhow!("the debit batch ended without an answer"))
        })?
    }

    async fn lead(self, account_id: String, mut batch: Vec<Waiting>) {
        loop {
            let mut outcome = apply_batch(&self.pool, &account_id, &batch, Read::Optimistic).await;
            if matches!(outcome, Ok(None)) {
                tracing::debug!(%account_id, "a key of the batch was stored concurrently; redoing it");
                outcome = apply_batch(&self.pool, &account_id, &batch, Read::AfterLock).await;
            }
            let results = match outcome {
                Ok(Some(results)) => results,
                Ok(None) => batch
                    .iter()
                    .map(|_| {
                        Err(BillingError::unavailable(
                            Reason::ConcurrentChange,
                            "a concurrent change conflicted; retry",
                        ))
                    })
                    .collect(),
                Err(error) => batch.iter().map(|_| Err(copy_error(&error))).collect(),
            };
            for (waiting, result) in batch.drain(..).zip(results) {
                // A caller that went away just misses its answer; its debit stands.
                let _ = waiting.reply.send(result);
            }
            let mut queues = self.queues.lock().unwrap_or_else(|e| e.into_inner());
            let Some(queue) = queues.get_mut(&account_id) else {
                return;
            };
            if queue.is_empty() {
                queues.remove(&account_id);
                return;
            }
            let take = queue.len().min(self.max_batch);
            batch.extend(queue.drain(..take));
        }
    }
}

/// A batch-wide failure, once per caller (`BillingError` is not `Clone`).
fn copy_error(error: &BillingError) -> BillingError {
    match error {
        BillingError::NotFound(what) => BillingError::NotFound(what),
        BillingError::Unavailable { reason, message } => {
            BillingError::unavailable(*reason, message)
        }
        BillingError::FailedPrecondition {
            reason,
            subject,
            message,
        } => BillingError::precondition(*reason, subject, message),
        other => BillingError::Unexpected(anyhow::anyhow!("{other:#}")),
    }
}

/// One accepted debit, ready to be written.
pub(super) struct Accepted {
    pub(super) index: usize,
    pub(super) result: PostingResult,
}

/// How the batch's stored idempotency keys are read.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Read {
    /// With the lock, in one round trip (see `batch_lock.sql`).
    Optimistic,
    /// In a statement after the lock: always current.
    AfterLock,
}

type BatchResults = Vec<Result<PostingResult, BillingError>>;

/// The batch's results; `None` when an optimistic read missed a key stored
/// meanwhile (nothing was committed: redo with [`Read::AfterLock`]).
async fn apply_batch(
    pool: &PgPool,
    account_id: &str,
    batch: &[Waiting],
    read: Read,
) -> Result<Option<BatchResults>, BillingError> {
    let keys: Vec<&str> = batch
        .iter()
        .map(|w| w.posting.idempotency_key.as_str())
        .collect();
    let mut transaction = pool.begin().await?;
    let row = sqlx::query(include_str!("batch_lock.sql"))
        .bind(account_id)
        .bind(&keys)
        .bind(batch.len() as i64)
        .fetch_optional(&mut *transaction)
        .await?
        .ok_or(BillingError::NotFound("account"))?;
    let account = account_from_row(&row)?;
    // The transaction's start time: every entry and event of the batch carries it.
    let now: DateTime<Utc> = row.try_get("now")?;
    // Popped from the back: entries are written in sequence order with increasing ids.
    let mut entry_ids: Vec<i64> = row.try_get("entry_ids")?;
    entry_ids.sort_unstable_by(|a, b| b.cmp(a));
    let mut stored = match read {
        Read::Optimistic => parse_stored_keys(row.try_get("stored_keys")?)?,
        Read::AfterLock => lookup(&mut transaction, account_id, &keys).await?,
    };
    let mut fresh = read == Read::AfterLock;
    let mut decided = decide(&account, batch, &stored, entry_ids.clone(), now)?;
    if !fresh && decided.refused {
        // No refusal is answered from an optimistic read: the transaction the
        // lock waited for may have stored one of these keys (a retry of a
        // debit that has already taken effect). Read the keys again, now
        // that the lock is held, and decide again.
        stored = lookup(&mut transaction, account_id, &keys).await?;
        fresh = true;
        decided = decide(&account, batch, &stored, entry_ids, now)?;
    }
    let Decided {
        mut results,
        accepted,
        balance,
        version,
        ..
    } = decided;

    if !accepted.is_empty() {
        let keys_stored = super::batch_write::write(
            &mut transaction,
            &account,
            batch,
            &accepted,
            balance,
            version,
            now,
        )
        .await?;
        if keys_stored != accepted.len() as i64 {
            // Only an optimistic read can miss a key: the lock's snapshot predates it.
            transaction.rollback().await?;
            if fresh {
                return Err(BillingError::Unexpected(anyhow::anyhow!(
                    "an idempotency key of the batch was stored without the account's lock"
                )));
            }
            return Ok(None);
        }
        transaction.commit().await?;
        for _ in &accepted {
            crate::telemetry::metrics::debit_posted();
        }
    } else {
        transaction.rollback().await?;
    }
    for Accepted { index, result } in accepted {
        results[index] = Some(Ok(result));
    }
    // Duplicates of an in-batch key were answered with a clone above.
    Ok(Some(
        results
            .into_iter()
            .map(|result| {
                result.unwrap_or_else(|| {
                    Err(BillingError::Unexpected(anyhow::anyhow!(
                        "a debit of the batch was left unanswered"
                    )))
                })
            })
            .collect(),
    ))
}

/// What each debit of the batch gets, decided against the locked account.
struct Decided {
    results: Vec<Option<Result<PostingResult, BillingError>>>,
    accepted: Vec<Accepted>,
    balance: Decimal,
    version: i64,
    /// Some debit was refused for its amount (funds or the balance limit).
    refused: bool,
}

/// Checks each debit on its own, in arrival order: cancelled, a stored key,
/// a key earlier in the batch, then the funds left by the debits before it.
fn decide(
    account: &Account,
    batch: &[Waiting],
    stored: &StoredKeys,
    mut entry_ids: Vec<i64>,
    now: DateTime<Utc>,
) -> Result<Decided, BillingError> {
    let mut balance = account.balance;
    let mut version = account.version;
    let mut refused = false;
    let mut results: Vec<Option<Result<PostingResult, BillingError>>> =
        batch.iter().map(|_| None).collect();
    let mut accepted: Vec<Accepted> = Vec::new();
    // Keys accepted earlier in this batch: their fingerprint and result.
    let mut in_batch: HashMap<&str, (&str, usize)> = HashMap::new();
    for (index, waiting) in batch.iter().enumerate() {
        // A caller cut off (timeout, disconnect) while the batch waited for
        // the lock withdraws its debit, as a rolled-back transaction would.
        if waiting.reply.is_closed() {
            results[index] = Some(Err(BillingError::unavailable(
                Reason::RequestCancelled,
                "the request was cancelled",
            )));
            continue;
        }
        let key = waiting.posting.idempotency_key.as_str();
        if let Some((operation, fingerprint, response)) = stored.get(key) {
            results[index] = Some(
                if operation == "post" && *fingerprint == waiting.fingerprint {
                    idempotency::decode(response.clone())
                } else {
                    Err(reused_key())
                },
            );
            continue;
        }
        if let Some((fingerprint, position)) = in_batch.get(key) {
            results[index] = Some(if *fingerprint == waiting.fingerprint {
                Ok(accepted[*position].result.clone())
            } else {
                Err(reused_key())
            });
            continue;
        }
        match next_balance(account, balance, &waiting.posting) {
            Err(refusal) => {
                refused = true;
                results[index] = Some(Err(refusal));
            }
            Ok(new_balance) => {
                balance = new_balance;
                version += 1;
                let entry_id = entry_ids.pop().ok_or_else(|| {
                    BillingError::Unexpected(anyhow::anyhow!("too few entry ids for the batch"))
                })?;
                let result = posting_result(account, waiting, entry_id, balance, version, now);
                in_batch.insert(key, (&waiting.fingerprint, accepted.len()));
                accepted.push(Accepted { index, result });
            }
        }
    }
    Ok(Decided {
        results,
        accepted,
        balance,
        version,
        refused,
    })
}

type StoredKeys = HashMap<String, (String, String, serde_json::Value)>;

/// The batch's keys already stored on the account, read after the lock.
async fn lookup(
    connection: &mut PgConnection,
    account_id: &str,
    keys: &[&str],
) -> Result<StoredKeys, BillingError> {
    let rows: Vec<(String, String, String, String)> = sqlx::query_as(
        "SELECT idempotency_key, operation, request_hash, response::TEXT FROM idempotency_keys \
         WHERE account_id = $1 AND idempotency_key = ANY($2)",
    )
    .bind(account_id)
    .bind(keys)
    .fetch_all(connection)
    .await?;
    rows.into_iter()
        .map(|(key, operation, hash, response)| {
            let response = serde_json::from_str(&response)
                .map_err(|e| BillingError::Unexpected(anyhow::anyhow!("stored response: {e}")))?;
            Ok((key, (operation, hash, response)))
        })
        .collect()
}

/// `[[key, operation, request_hash, response], …]` from `batch_lock.sql`.
fn parse_stored_keys(json: Option<String>) -> Result<StoredKeys, BillingError> {
    let Some(json) = json else {
        return Ok(StoredKeys::new());
    };
    let rows: Vec<(String, String, String, serde_json::Value)> = serde_json::from_str(&json)
        .map_err(|e| BillingError::Unexpected(anyhow::anyhow!("stored keys: {e}")))?;
    Ok(rows
        .into_iter()
        .map(|(key, operation, hash, response)| (key, (operation, hash, response)))
        .collect())
}

fn reused_key() -> BillingError {
    BillingError::already_exists(
        Reason::IdempotencyKeyReused,
        "idempotency_key was already used for a different request on this account",
    )
}

/// The balance after this debit, or why it is refused.
fn next_balance(
    account: &Account,
    balance: Decimal,
    posting: &Posting,
) -> Result<Decimal, BillingError> {
    let new_balance = balance + posting.signed_amount();
    let total_before = balance + account.credit_limit;
    if !posting.allow_overdraft && new_balance + account.credit_limit < Decimal::ZERO {
        return Err(BillingError::precondition(
            Reason::InsufficientFunds,
            format!("accounts/{}", account.account_id),
            format!(
                "insufficient funds: total_balance is {}, the debit is {}",
                account.currency.display(total_before),
                account.currency.display(posting.amount)
            ),
        ));
    }
    if new_balance.abs() >= Decimal::from(BALANCE_LIMIT) {
        return Err(BillingError::precondition(
            Reason::BalanceLimitExceeded,
            format!("accounts/{}", account.account_id),
            "the balance would exceed the largest allowed",
        ));
    }
    Ok(new_balance)
}

fn posting_result(
    account: &Account,
    waiting: &Waiting,
    entry_id: i64,
    balance: Decimal,
    version: i64,
    created_at: DateTime<Utc>,
) -> PostingResult {
    let posting = &waiting.posting;
    PostingResult {
        entry: LedgerEntry {
            entry_id,
            transaction_id: Uuid::now_v7(),
            account_id: account.account_id.clone(),
            kind: EntryKind::Usage,
            amount: posting.signed_amount(),
            balance_after: balance,
            description: posting.description.clone(),
            metadata: posting.metadata.clone(),
            idempotency_key: Some(posting.idempotency_key.as_str().to_owned()),
            created_at,
        },
        balance,
        total_balance: balance + account.credit_limit,
        version,
        currency: account.currency.code().to_owned(),
    }
}
