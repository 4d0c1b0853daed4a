//! Group commit for debits: the waiting debits of many accounts share one
//! transaction.
//!
//! Every debit joins one in-process queue, in arrival order. Up to
//! [`BatchSettings::max_in_flight`] leader tasks each take a batch from it —
//! up to `max_debits` debits of up to `max_accounts` accounts, leaving out
//! the accounts that are in another leader's batch right now, so one
//! account's debits are applied in arrival order, one batch after the
//! other — and apply it in one transaction, in four round trips (below).
//!
//! With [`BatchSettings::forming_patience`] above zero (the default) the
//! leaders form a pipeline: one batch at a time is *forming* — taken
//! off the queue, locked, checked and written — while the batches before it
//! wait for their commits. The next batch is taken when the forming one
//! sends its `COMMIT` (or fails), so it holds every debit that arrived
//! meanwhile, and the commit's wait for the disk overlaps the next batch's
//! work. A debit that finds no batch forming starts one at once (no
//! waiting when the service is idle); one that finds a batch forming for
//! longer than [`BatchSettings::forming_patience`] (its lock waits for another
//! transaction) starts a new one beside it, so a slow lock never holds up
//! every other account. Under load this makes batches as large as the
//! arrivals allow — each batch costs its round trips and its commit once,
//! whatever its size — instead of many small batches started side by side.
//!
//! Each batch:
//!
//! 1. BEGIN;
//! 2. one statement ([`batch_lock.sql`]) locks every account of the batch
//!    **in account id order** — so two replicas whose batches share accounts
//!    wait for each other and cannot deadlock — reads the batch's keys
//!    already stored and takes one entry id per debit;
//! 3. each debit is checked on its own, in arrival order within its account:
//!    withdrawn (its caller is gone), a stored key, a key earlier in the
//!    batch, then the funds left by the debits before it; a refused debit
//!    writes nothing and spoils nothing. One statement
//!    ([`batch_debit.sql`]) writes the accepted debits of every account;
//! 4. COMMIT. Every caller is answered only after the commit that holds its
//!    entry; if the transaction fails, every accepted debit of the batch
//!    gets the error.
//!
//! The stored keys are read optimistically with the lock; an acceptance is
//! verified by the write (a key stored meanwhile is noticed and the batch
//! redone), and a refusal is never answered from that read: the keys are
//! read again under the locks before any debit is refused.
//!
//! Batches lock in one order, but other writers that lock several accounts
//! in one transaction (the balance-policy decider, in event order) may not:
//! a batch that Postgres picks as a deadlock victim has written nothing and
//! is redone, a few times, before its callers are told to retry.
//!
//! After the commit the batch wakes this process's event feed
//! ([`CommitSignal`]); the balance-policy subscriber decides on the
//! crossings it made from their events (it sends the low-balance email
//! before the top-up it starts can send a receipt).
//!
//! With no contention a batch holds one debit and costs what a plain debit
//! costs. The row locks still serialize against other replicas and other
//! writers (credits, top-ups).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::{PgConnection, PgPool, Postgres, Row, Transaction};
use tokio::sync::oneshot;
use uuid::Uuid;

use super::accounts::account_from_row;
use super::postings::BALANCE_LIMIT;
use super::{Account, EntryKind, LedgerEntry, Posting, PostingResult, idempotency};
use crate::auth::Caller;
use crate::error::{BillingError, Reason};
use crate::events::CommitSignal;

type Reply = oneshot::Sender<Result<PostingResult, BillingError>>;

/// Deadlocks a batch survives (it is redone) before its callers are told to retry.
const DEADLOCK_REDOS: u32 = 3;

/// How debits are grouped into transactions.
#[derive(Debug, Clone, Copy)]
pub struct BatchSettings {
    /// Most debits in one transaction; 1 turns group commit off.
    pub max_debits: usize,
    /// Most accounts in one transaction; 1 keeps each transaction to one
    /// account (group commit per account only).
    pub max_accounts: usize,
    /// Most batch transactions of this process in flight at once (each
    /// holds one pooled connection while it runs).
    pub max_in_flight: usize,
    /// How long a forming batch keeps the next one from starting (see the
    /// module header); past it, a debit that arrives starts another batch
    /// beside it. Default 5 ms, a few of a batch's round trips; zero turns
    /// the pipeline off (every free debit starts a batch at once).
    pub forming_patience: Duration,
}

impl Default for BatchSettings {
    fn default() -> Self {
        Self {
            max_debits: 128,
            max_accounts: 128,
            max_in_flight: 4,
            forming_patience: Duration::from_millis(5),
        }
    }
}

pub(super) struct Waiting {
    pub(super) caller: Caller,
    pub(super) posting: Posting,
    pub(super) fingerprint: String,
    reply: Reply,
}

impl Waiting {
    fn account(&self) -> &str {
        self.posting.account_id.as_str()
    }
}

/// The queue every leader takes its batches from.
#[derive(Default)]
struct Queue {
    /// In arrival order.
    waiting: VecDeque<Waiting>,
    /// Accounts in a batch that has not answered yet.
    busy: HashSet<String>,
    /// Leader tasks running.
    leaders: usize,
    /// The batch forming now, if any (see the module header).
    forming: Option<FormingBatch>,
    /// Numbers the forming batches, so a batch that stops forming after a
    /// newer one started beside it leaves the newer one's mark alone.
    formed: u64,
    /// The forming batch whose patience a timer already watches.
    watched: Option<u64>,
}

/// The mark of the batch that is forming.
#[derive(Debug, Clone, Copy)]
struct FormingBatch {
    number: u64,
    since: Instant,
}

impl Queue {
    /// True when a new batch may start forming now: none is forming, or
    /// the one forming has taken `patience` already.
    fn may_form(&self, now: Instant, patience: Duration) -> bool {
        self.forming
            .is_none_or(|forming| now.saturating_duration_since(forming.since) >= patience)
    }

    /// Marks a new batch as forming; returns its number.
    fn start_forming(&mut self, now: Instant) -> u64 {
        self.formed += 1;
        self.forming = Some(FormingBatch {
            number: self.formed,
            since: now,
        });
        self.formed
    }

    /// True when some waiting debit's account is in no batch.
    fn has_free_debit(&self) -> bool {
        self.waiting
            .iter()
            .any(|w| !self.busy.contains(w.account()))
    }

    /// When free debits wait only because a batch is forming: the moment
    /// its patience runs out, unless a timer already watches it.
    fn watch_forming(&mut self, patience: Duration) -> Option<Instant> {
        let forming = self.forming?;
        if self.watched == Some(forming.number) {
            return None;
        }
        self.watched = Some(forming.number);
        Some(forming.since + patience)
    }
}

/// What a queued debit or a finished batch sets going.
enum Next {
    /// A leader for the forming batch of this number (already counted).
    Lead(u64),
    /// A check at this moment, when the forming batch's patience runs out.
    CheckAt(Instant),
    Nothing,
}

/// Coalesces concurrent debits of any accounts (see the module header).
#[derive(Clone)]
pub struct DebitBatcher {
    pool: PgPool,
    settings: BatchSettings,
    queue: Arc<Mutex<Queue>>,
    commits: CommitSignal,
}

impl DebitBatcher {
    pub fn new(pool: PgPool, settings: BatchSettings) -> Self {
        Self {
            pool,
            settings: BatchSettings {
                max_debits: settings.max_debits.max(1),
                max_accounts: settings.max_accounts.max(1),
                max_in_flight: settings.max_in_flight.max(1),
                forming_patience: settings.forming_patience,
            },
            queue: Arc::default(),
            commits: CommitSignal::default(),
        }
    }

    /// Given after every commit that wrote debits (wakes this process's
    /// event feed and, through it, the other replicas).
    pub fn with_commit_signal(mut self, commits: CommitSignal) -> Self {
        self.commits = commits;
        self
    }

    /// Debits queued and not yet taken into a batch.
    pub fn waiting(&self) -> usize {
        self.lock_queue().waiting.len()
    }

    fn lock_queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
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
        let waiting = Waiting {
            caller: caller.clone(),
            fingerprint: posting.fingerprint(),
            posting,
            reply,
        };
        let next = {
            let mut queue = self.lock_queue();
            // A busy account's leader takes this debit when its batch ends;
            // a forming batch's leader starts the next batch when it commits
            // (or a timer, if that takes longer than the patience).
            let free = !queue.busy.contains(waiting.account());
            queue.waiting.push_back(waiting);
            if free && queue.leaders < self.settings.max_in_flight {
                self.start_or_watch(&mut queue)
            } else {
                Next::Nothing
            }
        };
        self.set_going(next);
        answer.await.map_err(|_| {
            BillingError::Unexpected(anyhow::anyhow!("the debit batch ended without an answer"))
        })?
    }

    /// With a free debit waiting and a leader to spare: starts a batch
    /// forming now if none is (or the one forming ran out of patience),
    /// else watches the forming one's patience.
    fn start_or_watch(&self, queue: &mut Queue) -> Next {
        let now = Instant::now();
        if queue.may_form(now, self.settings.forming_patience) {
            queue.leaders += 1;
            Next::Lead(queue.start_forming(now))
        } else {
            queue
                .watch_forming(self.settings.forming_patience)
                .map_or(Next::Nothing, Next::CheckAt)
        }
    }

    /// Starts what `next` says, outside the queue's lock. Tasks, not the
    /// caller's future: a cancelled caller must not strand the queue.
    fn set_going(&self, next: Next) {
        match next {
            Next::Lead(number) => {
                let batcher = self.clone();
                tokio::spawn(async move { batcher.lead(number).await });
            }
            Next::CheckAt(at) => {
                let batcher = self.clone();
                tokio::spawn(async move {
                    tokio::time::sleep_until(at.into()).await;
                    batcher.check_waiting();
                });
            }
            Next::Nothing => {}
        }
    }

    /// Starts a batch for the free debits still waiting, if a leader is to spare.
    fn check_waiting(&self) {
        let next = {
            let mut queue = self.lock_queue();
            if queue.leaders < self.settings.max_in_flight && queue.has_free_debit() {
                self.start_or_watch(&mut queue)
            } else {
                Next::Nothing
            }
        };
        self.set_going(next);
    }

    async fn lead(self, mut number: u64) {
        let mut batch = self.first_batch(number);
        while !batch.is_empty() {
            // The batch's accounts, each once, in id order: locked by the
            // batch, freed after it.
            let mut accounts: Vec<String> = batch.iter().map(|w| w.account().to_owned()).collect();
            accounts.sort_unstable();
            accounts.dedup();
            let results = {
                let mut forming = Forming {
                    batcher: &self,
                    number: Some(number),
                };
                self.apply(&batch, &accounts, &mut forming).await
                // Dropping `forming` ends it on every path that did not commit.
            };
            for (waiting, result) in batch.drain(..).zip(results) {
                // A caller that went away just misses its answer; its debit stands.
                let _ = waiting.reply.send(result);
            }
            (batch, number) = self.next_batch(&accounts);
        }
    }

    /// Takes the first batch of a leader started for the forming batch
    /// `number`; a leader that gets none ends.
    fn first_batch(&self, number: u64) -> Vec<Waiting> {
        let mut queue = self.lock_queue();
        let batch = take(&mut queue, &self.settings);
        if batch.is_empty() {
            queue.leaders -= 1;
            if queue.forming.is_some_and(|f| f.number == number) {
                queue.forming = None;
            }
        }
        batch
    }

    /// Frees the accounts of the batch just answered and, unless another
    /// batch is forming, takes the next one; a leader that gets none ends
    /// (counted under the same lock, so a debit queued meanwhile starts a
    /// new one, and the forming batch, or its patience's timer, starts the
    /// next).
    fn next_batch(&self, done: &[String]) -> (Vec<Waiting>, u64) {
        let next = {
            let mut queue = self.lock_queue();
            for account in done {
                queue.busy.remove(account);
            }
            let now = Instant::now();
            let free = queue.has_free_debit();
            if free && queue.may_form(now, self.settings.forming_patience) {
                let number = queue.start_forming(now);
                let batch = take(&mut queue, &self.settings);
                debug_assert!(!batch.is_empty(), "a free debit joins the batch");
                return (batch, number);
            }
            queue.leaders -= 1;
            if free {
                queue
                    .watch_forming(self.settings.forming_patience)
                    .map_or(Next::Nothing, Next::CheckAt)
            } else {
                Next::Nothing
            }
        };
        self.set_going(next);
        (Vec::new(), 0)
    }

    /// The forming batch `number` has sent its commit or failed: the next
    /// batch may form. If debits are waiting for it, a leader starts it.
    fn formed(&self, number: u64) {
        let next = {
            let mut queue = self.lock_queue();
            if queue.forming.is_none_or(|f| f.number != number) {
                return;
            }
            queue.forming = None;
            if queue.leaders < self.settings.max_in_flight && queue.has_free_debit() {
                self.start_or_watch(&mut queue)
            } else {
                Next::Nothing
            }
        };
        self.set_going(next);
    }

    /// Applies one batch, redoing it after a missed key or a deadlock;
    /// one result per debit.
    /// `accounts`: the batch's accounts, each once, sorted.
    async fn apply(
        &self,
        batch: &[Waiting],
        accounts: &[String],
        forming: &mut Forming<'_>,
    ) -> BatchResults {
        let mut read = Read::Optimistic;
        let mut deadlocks = 0;
        loop {
            match apply_batch(&self.pool, batch, accounts, read, forming).await {
                Ok(Applied::Done(done)) => {
                    if done.committed {
                        self.commits.committed();
                    }
                    return done.results;
                }
                Ok(Applied::KeyMissed) => {
                    tracing::debug!("a key of the batch was stored concurrently; redoing it");
                    read = Read::AfterLock;
                }
                Ok(Applied::Deadlock) if deadlocks < DEADLOCK_REDOS => {
                    deadlocks += 1;
                    tracing::info!(deadlocks, "a debit batch was a deadlock victim; redoing it");
                }
                Ok(Applied::Deadlock) => {
                    return batch
                        .iter()
                        .map(|_| {
                            Err(BillingError::unavailable(
                                Reason::ConcurrentChange,
                                "a concurrent change conflicted; retry",
                            ))
                        })
                        .collect();
                }
                Err(error) => return batch.iter().map(|_| Err(copy_error(&error))).collect(),
            }
        }
    }
}

/// Takes the next batch off the queue: debits in arrival order, skipping
/// accounts busy in another batch, up to the settings' limits. Once one of
/// an account's debits is skipped, so are its later ones (the reasons —
/// busy, too many accounts, a full batch — last for the whole pass), which
/// keeps each account's debits in arrival order.
fn take(queue: &mut Queue, settings: &BatchSettings) -> Vec<Waiting> {
    let mut batch = Vec::new();
    let mut accounts: HashSet<String> = HashSet::new();
    let mut left = VecDeque::with_capacity(queue.waiting.len());
    while let Some(waiting) = queue.waiting.pop_front() {
        if batch.len() >= settings.max_debits {
            left.push_back(waiting);
            left.append(&mut queue.waiting);
            break;
        }
        let account = waiting.account();
        let joins = accounts.contains(account)
            || (!queue.busy.contains(account) && accounts.len() < settings.max_accounts);
        if joins {
            accounts.insert(account.to_owned());
            batch.push(waiting);
        } else {
            left.push_back(waiting);
        }
    }
    queue.waiting = left;
    queue.busy.extend(accounts);
    batch
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

/// What a batch does to one account.
pub(super) struct AccountOutcome {
    pub(super) account_id: String,
    /// Its accepted debits, in sequence order.
    pub(super) accepted: Vec<Accepted>,
    /// The balance and version after them.
    pub(super) balance: Decimal,
    pub(super) version: i64,
}

/// How the batch's stored idempotency keys are read.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Read {
    /// With the locks, in one round trip (see `batch_lock.sql`).
    Optimistic,
    /// In a statement after the locks: always current.
    AfterLock,
}

type BatchResults = Vec<Result<PostingResult, BillingError>>;

/// A batch applied (committed, or rolled back because nothing was accepted).
struct Done {
    results: BatchResults,
    committed: bool,
}

enum Applied {
    Done(Done),
    /// An optimistic read missed a key stored meanwhile; nothing was
    /// committed: redo with [`Read::AfterLock`].
    KeyMissed,
    /// Postgres chose this batch as a deadlock victim; nothing was committed.
    Deadlock,
}

fn is_deadlock(error: &sqlx::Error) -> bool {
    error
        .as_database_error()
        .and_then(|e| e.code())
        .is_some_and(|code| code == "40P01")
}

/// A leader's hold on the forming batch: ended once, when the batch sends
/// its commit, or when it is dropped (the batch failed or wrote nothing).
struct Forming<'a> {
    batcher: &'a DebitBatcher,
    number: Option<u64>,
}

impl Forming<'_> {
    fn end(&mut self) {
        if let Some(number) = self.number.take() {
            self.batcher.formed(number);
        }
    }
}

impl Drop for Forming<'_> {
    fn drop(&mut self) {
        self.end();
    }
}

async fn apply_batch(
    pool: &PgPool,
    batch: &[Waiting],
    accounts: &[String],
    read: Read,
    forming: &mut Forming<'_>,
) -> Result<Applied, BillingError> {
    let mut transaction = pool.begin().await?;
    match apply_in(&mut transaction, batch, accounts, read).await {
        Ok(Step::Commit {
            done,
            debits,
            accounts,
        }) => {
            // The next batch forms while this one waits for its commit.
            forming.end();
            transaction.commit().await?;
            crate::telemetry::metrics::debit_batch_committed(debits, accounts);
            for _ in 0..debits {
                crate::telemetry::metrics::debit_posted();
            }
            Ok(Applied::Done(done))
        }
        Ok(Step::Rollback(applied)) => {
            transaction.rollback().await?;
            Ok(applied)
        }
        Err(Failure::Deadlock) => {
            // Release the locks it holds before it is redone.
            transaction.rollback().await?;
            Ok(Applied::Deadlock)
        }
        Err(Failure::Other(error)) => Err(error),
    }
}

/// Why a batch's statements failed.
enum Failure {
    Deadlock,
    Other(BillingError),
}

impl From<sqlx::Error> for Failure {
    fn from(error: sqlx::Error) -> Self {
        if is_deadlock(&error) {
            Failure::Deadlock
        } else {
            Failure::Other(error.into())
        }
    }
}

impl From<BillingError> for Failure {
    fn from(error: BillingError) -> Self {
        Failure::Other(error)
    }
}

/// How a batch's transaction ends.
enum Step {
    /// Commit: `debits` debits of `accounts` accounts were written.
    Commit {
        done: Done,
        debits: usize,
        accounts: usize,
    },
    /// Roll back (nothing to write, or a missed key), then report this.
    Rollback(Applied),
}

/// An account as the lock statement found it.
struct Locked {
    account: Account,
    /// Popped from the back: ascending, one per debit of the account.
    entry_ids: Vec<i64>,
}

/// Runs the batch's statements and says how its transaction ends.
async fn apply_in(
    transaction: &mut Transaction<'static, Postgres>,
    batch: &[Waiting],
    accounts: &[String],
    read: Read,
) -> Result<Step, Failure> {
    let debit_accounts: Vec<&str> = batch.iter().map(Waiting::account).collect();
    let keys: Vec<&str> = batch
        .iter()
        .map(|w| w.posting.idempotency_key.as_str())
        .collect();
    let rows = sqlx::query(include_str!("batch_lock.sql"))
        .bind(&debit_accounts)
        .bind(&keys)
        .bind(accounts)
        .fetch_all(&mut **transaction)
        .await?;
    let mut locked: HashMap<String, Locked> = HashMap::with_capacity(rows.len());
    let mut now: Option<DateTime<Utc>> = None;
    let mut optimistic = StoredKeys::new();
    for row in &rows {
        let account = account_from_row(row)?;
        // The transaction's start time: every entry and event of the batch carries it.
        now = Some(row.try_get("now").map_err(BillingError::from)?);
        let mut entry_ids: Vec<i64> = row.try_get("entry_ids").map_err(BillingError::from)?;
        entry_ids.sort_unstable_by(|a, b| b.cmp(a));
        if read == Read::Optimistic {
            parse_stored_keys(
                &account.account_id,
                row.try_get("stored_keys").map_err(BillingError::from)?,
                &mut optimistic,
            )?;
        }
        locked.insert(account.account_id.clone(), Locked { account, entry_ids });
    }
    let now = now.unwrap_or_else(Utc::now);
    let mut fresh = read == Read::AfterLock;
    let stored = if fresh {
        lookup(transaction, &debit_accounts, &keys).await?
    } else {
        optimistic
    };
    let mut decided = decide(&locked, batch, &stored, now)?;
    if !fresh && decided.refused {
        // No refusal is answered from an optimistic read: a transaction a
        // lock waited for may have stored one of these keys (a retry of a
        // debit that has already taken effect). Read the keys again, now
        // that the locks are held, and decide again.
        let stored = lookup(transaction, &debit_accounts, &keys).await?;
        fresh = true;
        decided = decide(&locked, batch, &stored, now)?;
    }
    let Decided {
        mut results,
        outcomes,
        ..
    } = decided;
    let debits: usize = outcomes.iter().map(|o| o.accepted.len()).sum();
    let moving = outcomes.iter().filter(|o| !o.accepted.is_empty()).count();
    if debits > 0 {
        let written = super::batch_write::write(transaction, batch, &outcomes, now).await?;
        if written.keys_stored != debits as i64 {
            // Only an optimistic read can miss a key: the lock's snapshot predates it.
            if fresh {
                return Err(Failure::Other(BillingError::Unexpected(anyhow::anyhow!(
                    "an idempotency key of the batch was stored without the account's lock"
                ))));
            }
            return Ok(Step::Rollback(Applied::KeyMissed));
        }
        if written.accounts_moved != moving as i64 {
            return Err(Failure::Other(BillingError::Unexpected(anyhow::anyhow!(
                "a locked account of the batch was not updated"
            ))));
        }
    }
    for outcome in outcomes {
        for Accepted { index, result } in outcome.accepted {
            results[index] = Some(Ok(result));
        }
    }
    // Duplicates of an in-batch key were answered with a clone in `decide`.
    let results = results
        .into_iter()
        .map(|result| {
            result.unwrap_or_else(|| {
                Err(BillingError::Unexpected(anyhow::anyhow!(
                    "a debit of the batch was left unanswered"
                )))
            })
        })
        .collect();
    let done = Done {
        results,
        committed: debits > 0,
    };
    if debits == 0 {
        // Nothing to write: end the transaction without a commit record.
        return Ok(Step::Rollback(Applied::Done(done)));
    }
    Ok(Step::Commit {
        done,
        debits,
        accounts: moving,
    })
}

/// What each debit of the batch gets, decided against the locked accounts.
struct Decided {
    results: Vec<Option<Result<PostingResult, BillingError>>>,
    /// One per account found, with what it accepted.
    outcomes: Vec<AccountOutcome>,
    /// Some debit was refused for its amount (funds or the balance limit).
    refused: bool,
}

/// Checks each debit on its own, account by account, in arrival order within
/// each: withdrawn, a stored key, a key earlier in the batch, then the funds
/// left by the debits before it.
fn decide(
    locked: &HashMap<String, Locked>,
    batch: &[Waiting],
    stored: &StoredKeys,
    now: DateTime<Utc>,
) -> Result<Decided, BillingError> {
    let mut results: Vec<Option<Result<PostingResult, BillingError>>> =
        batch.iter().map(|_| None).collect();
    // Each account's debits, in arrival order.
    let mut by_account: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (index, waiting) in batch.iter().enumerate() {
        by_account.entry(waiting.account()).or_default().push(index);
    }
    let mut outcomes = Vec::with_capacity(by_account.len());
    let mut refused = false;
    for (account_id, indices) in by_account {
        let Some(found) = locked.get(account_id) else {
            for index in indices {
                results[index] = Some(Err(BillingError::NotFound("account")));
            }
            continue;
        };
        let outcome = decide_account(
            found,
            batch,
            &indices,
            stored,
            now,
            &mut results,
            &mut refused,
        )?;
        outcomes.push(outcome);
    }
    Ok(Decided {
        results,
        outcomes,
        refused,
    })
}

/// One account's debits of the batch, in arrival order.
fn decide_account(
    found: &Locked,
    batch: &[Waiting],
    indices: &[usize],
    stored: &StoredKeys,
    now: DateTime<Utc>,
    results: &mut [Option<Result<PostingResult, BillingError>>],
    refused: &mut bool,
) -> Result<AccountOutcome, BillingError> {
    let account = &found.account;
    let mut entry_ids = found.entry_ids.clone();
    let mut balance = account.balance;
    let mut version = account.version;
    let mut accepted: Vec<Accepted> = Vec::new();
    // Keys accepted earlier in this batch on this account: their fingerprint and position.
    let mut in_batch: HashMap<&str, (&str, usize)> = HashMap::new();
    for &index in indices {
        let waiting = &batch[index];
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
        if let Some((operation, fingerprint, response)) =
            stored.get(&(account.account_id.clone(), key.to_owned()))
        {
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
                *refused = true;
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
    Ok(AccountOutcome {
        account_id: account.account_id.clone(),
        accepted,
        balance,
        version,
    })
}

/// Stored keys by (account, key): operation, request hash, response.
type StoredKeys = HashMap<(String, String), (String, String, serde_json::Value)>;

/// The batch's keys already stored, read after the locks.
async fn lookup(
    connection: &mut PgConnection,
    accounts: &[&str],
    keys: &[&str],
) -> Result<StoredKeys, BillingError> {
    let rows: Vec<(String, String, String, String, String)> = sqlx::query_as(
        "SELECT k.account_id, k.idempotency_key, k.operation, k.request_hash, k.response::TEXT \
           FROM idempotency_keys k \
           JOIN unnest($1::TEXT[], $2::TEXT[]) AS d (account_id, idempotency_key) \
             ON k.account_id = d.account_id AND k.idempotency_key = d.idempotency_key",
    )
    .bind(accounts)
    .bind(keys)
    .fetch_all(connection)
    .await?;
    let mut stored = StoredKeys::with_capacity(rows.len());
    for (account, key, operation, hash, response) in rows {
        let response = serde_json::from_str(&response)
            .map_err(|e| BillingError::Unexpected(anyhow::anyhow!("stored response: {e}")))?;
        stored.insert((account, key), (operation, hash, response));
    }
    Ok(stored)
}

/// `[[key, operation, request_hash, response], …]` of one account, from `batch_lock.sql`.
fn parse_stored_keys(
    account_id: &str,
    json: Option<String>,
    into: &mut StoredKeys,
) -> Result<(), BillingError> {
    let Some(json) = json else {
        return Ok(());
    };
    let rows: Vec<(String, String, String, serde_json::Value)> = serde_json::from_str(&json)
        .map_err(|e| BillingError::Unexpected(anyhow::anyhow!("stored keys: {e}")))?;
    for (key, operation, hash, response) in rows {
        into.insert((account_id.to_owned(), key), (operation, hash, response));
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::auth::Role;
    use crate::ids::{AccountId, IdempotencyKey};

    fn waiting(account: &str, key: &str) -> Waiting {
        let (reply, _) = oneshot::channel();
        Waiting {
            caller: Caller {
                subject: "test".into(),
                account: None,
                roles: vec![Role::Service],
                trace_id: None,
                engine: false,
            },
            posting: Posting {
                account_id: AccountId::parse(account).unwrap(),
                kind: EntryKind::Usage,
                amount: Decimal::ONE,
                idempotency_key: IdempotencyKey::parse(key).unwrap(),
                description: String::new(),
                metadata: BTreeMap::new(),
                allow_overdraft: false,
            },
            fingerprint: String::new(),
            reply,
        }
    }

    fn queue(debits: &[(&str, &str)], busy: &[&str]) -> Queue {
        Queue {
            waiting: debits.iter().map(|(a, k)| waiting(a, k)).collect(),
            busy: busy.iter().map(|a| (*a).to_owned()).collect(),
            leaders: 1,
            forming: None,
            formed: 0,
            watched: None,
        }
    }

    fn keys(batch: &[Waiting]) -> Vec<&str> {
        batch
            .iter()
            .map(|w| w.posting.idempotency_key.as_str())
            .collect()
    }

    fn settings(max_debits: usize, max_accounts: usize) -> BatchSettings {
        BatchSettings {
            max_debits,
            max_accounts,
            max_in_flight: 4,
            forming_patience: Duration::ZERO,
        }
    }

    #[test]
    fn a_batch_takes_the_debits_of_many_accounts_in_arrival_order() {
        let mut queue = queue(&[("a", "1"), ("b", "2"), ("a", "3"), ("c", "4")], &[]);
        let batch = take(&mut queue, &settings(128, 128));
        assert_eq!(keys(&batch), ["1", "2", "3", "4"]);
        assert!(queue.waiting.is_empty());
        assert_eq!(queue.busy.len(), 3);
    }

    #[test]
    fn an_account_busy_in_another_batch_keeps_every_later_debit_waiting() {
        let mut queue = queue(&[("a", "1"), ("b", "2"), ("a", "3")], &["a"]);
        let batch = take(&mut queue, &settings(128, 128));
        assert_eq!(keys(&batch), ["2"]);
        assert_eq!(keys(queue.waiting.make_contiguous()), ["1", "3"]);
    }

    #[test]
    fn an_account_left_out_of_a_full_batch_is_left_out_whole_so_its_order_holds() {
        // At most two accounts: c's debits wait, even the one after a's and b's.
        let mut queue = queue(
            &[("a", "1"), ("b", "2"), ("c", "3"), ("a", "4"), ("c", "5")],
            &[],
        );
        let batch = take(&mut queue, &settings(128, 2));
        assert_eq!(keys(&batch), ["1", "2", "4"]);
        assert_eq!(keys(queue.waiting.make_contiguous()), ["3", "5"]);
        // At most two debits: everything after the second waits.
        let mut queue = self::queue(&[("a", "1"), ("b", "2"), ("a", "3")], &[]);
        let batch = take(&mut queue, &settings(2, 128));
        assert_eq!(keys(&batch), ["1", "2"]);
        assert_eq!(keys(queue.waiting.make_contiguous()), ["3"]);
    }
}
