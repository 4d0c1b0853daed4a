//! `billing.v1.Balances`: the ledger over gRPC.

use std::pin::Pin;

use futures::StreamExt;
use rust_decimal::Decimal;
use sqlx::PgPool;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::caller_limits::CallerLimits;
use super::convert::{metadata, optional_time, timestamp};
use super::error::status_with_reason;
use super::{authorize, authorize_account_id};
use crate::auth::TokenValidUntil;
use crate::error::{BillingError, Reason, Violations};
use crate::events::{
    self, BalanceEvent, BalanceEventKind, EventFilter, EventHub, WatchEnd, WatchSettings, Watcher,
};
use crate::ids::{AccountId, IdempotencyKey, parse_email, parse_text};
use crate::ledger::{
    self, EntryFilter, EntryKind, LedgerEntry, NewAccount, Posting, PostingResult,
};
use crate::money::{self, Currency, USAGE_SCALE};
use crate::paging::{self, Page};
use crate::proto::{self, balances_server::Balances};
use crate::telemetry::links::{self, Cause};

#[derive(Clone)]
pub struct BalancesApi {
    pool: PgPool,
    debits: ledger::DebitBatcher,
    hub: EventHub,
    watch_settings: WatchSettings,
    limits: CallerLimits,
}

impl BalancesApi {
    pub fn new(
        pool: PgPool,
        debits: ledger::DebitBatcher,
        hub: EventHub,
        watch_settings: WatchSettings,
        limits: CallerLimits,
    ) -> Self {
        Self {
            pool,
            debits,
            hub,
            watch_settings,
            limits,
        }
    }
}

/// The metadata key (trailer) of a stream's end status that holds the
/// cursor to resume after, as decimal digits.
pub const RESUME_CURSOR_METADATA_KEY: &str = "billing-resume-after-cursor";

type EventStream =
    Pin<Box<dyn Stream<Item = Result<proto::WatchBalanceEventsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Balances for BalancesApi {
    async fn create_account(
        &self,
        request: Request<proto::CreateAccountRequest>,
    ) -> Result<Response<proto::CreateAccountResponse>, Status> {
        let (caller, account_id) = authorize_account_id(&request, &request.get_ref().account_id)?;
        let message = request.into_inner();
        let mut violations = Violations::new();
        let currency = if message.currency.is_empty() {
            Some(Currency::USD)
        } else {
            violations.check(
                Currency::parse(&message.currency)
                    .map_err(|reason| BillingError::invalid("currency", reason)),
            )
        };
        // The credit's scale is its currency's; an unknown currency leaves it unchecked.
        let credit_limit = match currency {
            _ if message.credit.is_empty() => Some(Decimal::ZERO),
            Some(currency) => violations.check(
                money::parse_amount(&message.credit, currency.minor_units())
                    .map_err(|e| BillingError::invalid("credit", e.to_string())),
            ),
            None => None,
        };
        let billing_email = if message.billing_email.is_empty() {
            Some(String::new())
        } else {
            violations.check(parse_email("billing_email", &message.billing_email))
        };
        let idempotency_key = if message.idempotency_key.is_empty() {
            Some(None)
        } else {
            violations
                .check(IdempotencyKey::parse(&message.idempotency_key))
                .map(Some)
        };
        let display_name = violations.check(parse_text("display_name", &message.display_name, 200));
        let (
            Some(currency),
            Some(credit_limit),
            Some(billing_email),
            Some(idempotency_key),
            Some(display_name),
        ) = (
            currency,
            credit_limit,
            billing_email,
            idempotency_key,
            display_name,
        )
        else {
            return Err(violations.into_error().into());
        };
        let new_account = NewAccount {
            account_id,
            currency,
            display_name,
            billing_email,
            credit_limit,
            idempotency_key,
        };
        let account = ledger::create_account(&self.pool, &caller, new_account).await?;
        Ok(Response::new(proto::CreateAccountResponse {
            account: Some(account_to_proto(&account)),
        }))
    }

    async fn get_balance(
        &self,
        request: Request<proto::GetBalanceRequest>,
    ) -> Result<Response<proto::GetBalanceResponse>, Status> {
        let (_, account_id) = authorize_account_id(&request, &request.get_ref().account_id)?;
        let account = ledger::get_account(&self.pool, &account_id).await?;
        let currency = account.currency;
        Ok(Response::new(proto::GetBalanceResponse {
            account_id: account.account_id.clone(),
            balance: currency.format(account.balance),
            credit: currency.format(account.credit_limit),
            total_balance: currency.format(account.total_balance()),
            currency: currency.code().to_owned(),
            version: account.version,
        }))
    }

    async fn debit(
        &self,
        request: Request<proto::DebitRequest>,
    ) -> Result<Response<proto::DebitResponse>, Status> {
        let (caller, account_id) = authorize_account_id(&request, &request.get_ref().account_id)?;
        let message = request.into_inner();
        let mut violations = Violations::new();
        let parsed = (
            violations.check(parse_usage_amount(&message.amount)),
            violations.check(IdempotencyKey::parse(&message.idempotency_key)),
            violations.check(parse_text("description", &message.description, 500)),
            violations.check(metadata("metadata", message.metadata)),
        );
        let (Some(amount), Some(idempotency_key), Some(description), Some(metadata)) = parsed
        else {
            return Err(violations.into_error().into());
        };
        let posting = Posting {
            account_id,
            kind: EntryKind::Usage,
            amount,
            idempotency_key,
            description,
            metadata,
            allow_overdraft: message.allow_overdraft,
        };
        let result = self.debits.debit(&caller, posting).await?;
        links::remember(Cause::Transaction(result.entry.transaction_id));
        let (transaction, balance, total_balance, version) = posting_to_proto(&result)?;
        Ok(Response::new(proto::DebitResponse {
            transaction: Some(transaction),
            balance,
            total_balance,
            version,
        }))
    }

    async fn credit(
        &self,
        request: Request<proto::CreditRequest>,
    ) -> Result<Response<proto::CreditResponse>, Status> {
        let (caller, account_id) = authorize_account_id(&request, &request.get_ref().account_id)?;
        let message = request.into_inner();
        let mut violations = Violations::new();
        let kind = match proto::TransactionKind::try_from(message.kind) {
            Ok(proto::TransactionKind::Adjustment) => Some(EntryKind::Adjustment),
            Ok(proto::TransactionKind::Refund) => Some(EntryKind::Refund),
            Ok(proto::TransactionKind::Promotion) => Some(EntryKind::Promotion),
            _ => {
                violations.add(
                    "kind",
                    "must be TRANSACTION_KIND_ADJUSTMENT, TRANSACTION_KIND_REFUND or TRANSACTION_KIND_PROMOTION",
                );
                None
            }
        };
        let parsed = (
            kind,
            violations.check(parse_usage_amount(&message.amount)),
            violations.check(IdempotencyKey::parse(&message.idempotency_key)),
            violations.check(parse_text("description", &message.description, 500)),
            violations.check(metadata("metadata", message.metadata)),
        );
        let (Some(kind), Some(amount), Some(idempotency_key), Some(description), Some(metadata)) =
            parsed
        else {
            return Err(violations.into_error().into());
        };
        let posting = Posting {
            account_id,
            kind,
            amount,
            idempotency_key,
            description,
            metadata,
            allow_overdraft: false,
        };
        let result = ledger::post(&self.pool, &caller, posting).await?;
        links::remember(Cause::Transaction(result.entry.transaction_id));
        // Its event is committed: wake this process's feed, and the other replicas'.
        self.hub.feed().commits().committed();
        let (transaction, balance, total_balance, version) = posting_to_proto(&result)?;
        Ok(Response::new(proto::CreditResponse {
            transaction: Some(transaction),
            balance,
            total_balance,
            version,
        }))
    }

    async fn list_transactions(
        &self,
        request: Request<proto::ListTransactionsRequest>,
    ) -> Result<Response<proto::ListTransactionsResponse>, Status> {
        let (_, account_id) = authorize_account_id(&request, &request.get_ref().account_id)?;
        let message = request.into_inner();
        let mut violations = Violations::new();
        let page = violations.check(Page::parse(message.page_size, &message.page_token));
        let kinds = violations.check(
            message
                .kinds
                .iter()
                .map(|&kind| {
                    entry_kind_from_proto(kind)
                        .ok_or_else(|| BillingError::invalid("kinds", "contains an unknown kind"))
                })
                .collect::<Result<Vec<_>, _>>(),
        );
        let created_after = violations.check(optional_time("created_after", message.created_after));
        let created_before =
            violations.check(optional_time("created_before", message.created_before));
        let (Some(page), Some(kinds), Some(created_after), Some(created_before)) =
            (page, kinds, created_after, created_before)
        else {
            return Err(violations.into_error().into());
        };
        let filter = EntryFilter {
            kinds,
            created_after,
            created_before,
        };
        let account = ledger::get_account(&self.pool, &account_id).await?;
        let entries = ledger::list_entries(&self.pool, &account_id, &filter, &page).await?;
        let next_page_token =
            paging::next_token(entries.len(), &page, entries.last().map(|e| e.entry_id));
        Ok(Response::new(proto::ListTransactionsResponse {
            transactions: entries
                .iter()
                .map(|e| entry_to_proto(e, account.currency))
                .collect(),
            next_page_token,
        }))
    }

    type WatchBalanceEventsStream = EventStream;

    async fn watch_balance_events(
        &self,
        request: Request<proto::WatchBalanceEventsRequest>,
    ) -> Result<Response<Self::WatchBalanceEventsStream>, Status> {
        let account_id = match request.get_ref().account_id.as_str() {
            "" => None,
            text => Some(AccountId::parse(text)?),
        };
        let caller = authorize(&request, account_id.as_ref())?;
        let after_cursor = request.get_ref().after_cursor;
        if after_cursor < 0 {
            return Err(BillingError::invalid("after_cursor", "must not be negative").into());
        }
        // A cursor no event ever had (another database's, a typo) would wait
        // silently for events that take until then to come.
        if after_cursor > 0 {
            let issued: Option<i64> = sqlx::query_scalar(
                "SELECT pg_sequence_last_value('balance_events_cursor_seq'::regclass)",
            )
            .fetch_one(&self.pool)
            .await
            .map_err(BillingError::from)?;
            let issued = issued.unwrap_or(0);
            if after_cursor > issued {
                return Err(BillingError::invalid(
                    "after_cursor",
                    format!(
                        "is beyond the newest cursor issued ({issued}): resume with a cursor this service gave"
                    ),
                )
                .into());
            }
        }
        // Counted from here until the stream ends (the permit lives in the stream).
        let permit = self
            .limits
            .open_stream(&caller.subject, account_id.as_ref().map(AccountId::as_str))?;
        // The stream ends when the token does (its `exp` plus the leeway).
        let valid_until = request.extensions().get::<TokenValidUntil>().map(|until| {
            let left = until
                .0
                .duration_since(std::time::SystemTime::now())
                .unwrap_or_default();
            tokio::time::Instant::now() + left
        });
        let filter = match account_id {
            Some(account_id) => {
                // Unknown accounts are NOT_FOUND, as in every other RPC.
                ledger::get_account(&self.pool, &account_id).await?;
                EventFilter::Account(account_id)
            }
            None => EventFilter::AllAccounts,
        };
        let Watcher { events, end, .. } = events::watch(
            &self.hub,
            filter,
            after_cursor,
            &self.watch_settings,
            valid_until,
        );
        // The gauge counts the stream until tonic drops it (client gone or ended).
        let open = crate::telemetry::metrics::OpenStream::new();
        let delivered = ReceiverStream::new(events).map(move |event| {
            let _held = (&open, &permit);
            Ok(proto::WatchBalanceEventsResponse {
                event: Some(event_to_proto(&event)),
            })
        });
        // After the last buffered event: why the server ended the stream, if it did.
        let ending = futures::stream::once(end)
            .filter_map(|end| async move { end.ok().map(|end| Err(watch_end_status(end))) });
        Ok(Response::new(Box::pin(delivered.chain(ending))))
    }

    async fn verify_ledger(
        &self,
        request: Request<proto::VerifyLedgerRequest>,
    ) -> Result<Response<proto::VerifyLedgerResponse>, Status> {
        let account_id = match request.get_ref().account_id.as_str() {
            "" => None,
            text => Some(AccountId::parse(text)?),
        };
        authorize(&request, account_id.as_ref())?;
        let report = ledger::verify_ledger(&self.pool, account_id.as_ref()).await?;
        Ok(Response::new(proto::VerifyLedgerResponse {
            accounts_checked: report.accounts_checked,
            mismatches: report
                .mismatches
                .into_iter()
                .map(|m| proto::LedgerMismatch {
                    account_id: m.account_id,
                    balance: m.balance.normalize().to_string(),
                    sum_of_entries: m.sum_of_entries.normalize().to_string(),
                })
                .collect(),
        }))
    }
}

/// The status that ends a stream: the cursor to resume after is in the
/// message and, machine-readable, in the `billing-resume-after-cursor` trailer.
fn watch_end_status(end: WatchEnd) -> Status {
    let resume_after = end.resume_after();
    let mut status = match end {
        WatchEnd::TooFarBehind { .. } => BillingError::ResourceExhausted {
            reason: Reason::SubscriberTooFarBehind,
            message: format!("subscriber too far behind: resume with after_cursor {resume_after}"),
        }
        .into(),
        WatchEnd::ShuttingDown { .. } => BillingError::unavailable(
            Reason::ServerShuttingDown,
            format!("server shutting down: resume with after_cursor {resume_after}"),
        )
        .into(),
        WatchEnd::Interrupted { .. } => BillingError::unavailable(
            Reason::StreamInterrupted,
            format!("event stream interrupted: resume with after_cursor {resume_after}"),
        )
        .into(),
        WatchEnd::TokenExpired { .. } => status_with_reason(
            tonic::Code::Unauthenticated,
            &format!(
                "the bearer token expired: reconnect with a fresh token and after_cursor {resume_after}"
            ),
            Reason::BearerTokenExpired,
        ),
    };
    status.metadata_mut().insert(
        RESUME_CURSOR_METADATA_KEY,
        resume_after.to_string().parse().expect("digits"),
    );
    status
}

fn event_to_proto(event: &BalanceEvent) -> proto::BalanceEvent {
    let currency = event.currency;
    let kind = match event.kind {
        BalanceEventKind::Debited => proto::BalanceEventKind::Debited,
        BalanceEventKind::Credited => proto::BalanceEventKind::Credited,
        BalanceEventKind::ToppedUp => proto::BalanceEventKind::ToppedUp,
    };
    proto::BalanceEvent {
        cursor: event.cursor,
        account_id: event.account_id.clone(),
        sequence: event.sequence,
        kind: kind as i32,
        amount: currency.format(event.amount),
        balance_after: currency.format(event.balance_after),
        total_balance_after: currency.format(event.total_balance_after),
        transaction_id: event.transaction_id.to_string(),
        created_at: Some(timestamp(event.created_at)),
        currency: currency.code().to_owned(),
    }
}

fn parse_usage_amount(text: &str) -> Result<Decimal, BillingError> {
    money::parse_positive_amount(text, USAGE_SCALE)
        .map_err(|e| BillingError::invalid("amount", e.to_string()))
}

pub(crate) fn account_to_proto(account: &ledger::Account) -> proto::Account {
    let currency = account.currency;
    proto::Account {
        account_id: account.account_id.clone(),
        currency: currency.code().to_owned(),
        display_name: account.display_name.clone(),
        billing_email: account.billing_email.clone(),
        balance: currency.format(account.balance),
        credit: currency.format(account.credit_limit),
        total_balance: currency.format(account.total_balance()),
        version: account.version,
        created_at: Some(timestamp(account.created_at)),
    }
}

fn posting_to_proto(
    result: &PostingResult,
) -> Result<(proto::Transaction, String, String, i64), BillingError> {
    let currency = ledger::currency_from_column(&result.currency)?;
    Ok((
        entry_to_proto(&result.entry, currency),
        currency.format(result.balance),
        currency.format(result.total_balance),
        result.version,
    ))
}

pub(crate) fn entry_to_proto(entry: &LedgerEntry, currency: Currency) -> proto::Transaction {
    proto::Transaction {
        transaction_id: entry.transaction_id.to_string(),
        account_id: entry.account_id.clone(),
        kind: entry_kind_to_proto(entry.kind) as i32,
        amount: currency.format(entry.amount),
        balance_after: currency.format(entry.balance_after),
        description: entry.description.clone(),
        metadata: entry.metadata.clone().into_iter().collect(),
        idempotency_key: entry.idempotency_key.clone().unwrap_or_default(),
        created_at: Some(timestamp(entry.created_at)),
        currency: currency.code().to_owned(),
    }
}

fn entry_kind_to_proto(kind: EntryKind) -> proto::TransactionKind {
    match kind {
        EntryKind::Usage => proto::TransactionKind::Usage,
        EntryKind::Adjustment => proto::TransactionKind::Adjustment,
        EntryKind::Refund => proto::TransactionKind::Refund,
        EntryKind::Promotion => proto::TransactionKind::Promotion,
        EntryKind::TopUp => proto::TransactionKind::TopUp,
    }
}

fn entry_kind_from_proto(kind: i32) -> Option<EntryKind> {
    EntryKind::ALL
        .into_iter()
        .find(|k| entry_kind_to_proto(*k) as i32 == kind)
}
