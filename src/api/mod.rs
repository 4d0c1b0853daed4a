//! The gRPC adapters: one per service, each thin — authorize, parse the
//! request into domain types, call the domain, convert the result.

mod audit;
mod balance_policy;
mod balances;
mod caller_limits;
mod convert;
pub mod error;
mod notifications;
mod payment_methods;

pub use audit::AuditApi;
pub use balance_policy::BalancePolicyApi;
pub use balances::{BalancesApi, RESUME_CURSOR_METADATA_KEY};
pub use caller_limits::{
    CallerLimitSettings, CallerLimits, LIMIT_METADATA_KEY, RETRY_AFTER_METADATA_KEY, StreamPermit,
};
pub use notifications::NotificationsApi;
pub use payment_methods::PaymentMethodsApi;

use tonic::{Request, Status};

use crate::auth::{self, Access, Caller};
use crate::ids::AccountId;

/// The authenticated caller of `request`, checked against `account`
/// (`None` = every account) with the access the permission table gave the RPC.
pub(crate) fn authorize<T>(
    request: &Request<T>,
    account: Option<&AccountId>,
) -> Result<Caller, Status> {
    let caller = request
        .extensions()
        .get::<Caller>()
        .cloned()
        .ok_or_else(|| {
            Status::from(crate::error::BillingError::Unauthenticated(
                "missing authorization: Bearer <token>".into(),
            ))
        })?;
    let access = request
        .extensions()
        .get::<Access>()
        .copied()
        .ok_or_else(|| {
            Status::from(crate::error::BillingError::Unexpected(anyhow::anyhow!(
                "the auth layer left no access for this call"
            )))
        })?;
    if let Some(account) = account {
        // The RPC span (telemetry::rpc_log) declares the field; the body alone knows it.
        tracing::Span::current().record("account_id", account.as_str());
    }
    auth::authorize_account(&caller, access, account)?;
    Ok(caller)
}

/// Parses the request's account id (naming the field) and authorizes the caller for it.
pub(crate) fn authorize_account_id<T>(
    request: &Request<T>,
    account_id: &str,
) -> Result<(Caller, AccountId), Status> {
    let account_id = AccountId::parse(account_id)?;
    let caller = authorize(request, Some(&account_id))?;
    Ok((caller, account_id))
}
