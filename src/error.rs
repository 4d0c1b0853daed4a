//! The small set of errors every domain operation returns. Each variant is
//! mapped once to a gRPC status in `api::error`, with the rich error details
//! of `google.rpc` (`ErrorInfo` with a stable [`Reason`], `BadRequest`,
//! `PreconditionFailure`, `RetryInfo`); every message except `Unexpected`'s
//! is safe to show to a client.
//!
//! Request validation collects: [`Violations`] gathers every bad field of a
//! request, so one answer names them all.

use std::fmt;
use std::time::Duration;

/// Why a call failed, stable and machine-readable: the `ErrorInfo.reason` a
/// client branches on. Mirrors `billing.v1.ErrorReason` in
/// `proto/billing/v1/errors.proto` (the value name without its
/// `ERROR_REASON_` prefix); a unit test keeps the two in step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    // INVALID_ARGUMENT
    InvalidField,
    RefillOutOfBounds,
    CardExpired,
    // NOT_FOUND
    AccountNotFound,
    PaymentMethodNotFound,
    TopUpNotFound,
    NotificationNotFound,
    SubscriberNotFound,
    ResourceNotFound,
    // ALREADY_EXISTS
    IdempotencyKeyReused,
    AccountExists,
    CardAlreadySaved,
    // FAILED_PRECONDITION
    InsufficientFunds,
    BalanceLimitExceeded,
    PaymentMethodRemoved,
    PaymentMethodNotActive,
    PaymentMethodPendingAuthentication,
    NoPrimaryPaymentMethod,
    NoAutoChargePaymentMethod,
    ChargeOutcomeUnknown,
    NotAwaitingAuthentication,
    GatewayRejected,
    CardUnknownToGateway,
    NoRecipient,
    // PERMISSION_DENIED, UNAUTHENTICATED
    RoleNotAllowed,
    BearerTokenInvalid,
    BearerTokenExpired,
    // UNAVAILABLE
    DatabaseUnavailable,
    ConcurrentChange,
    GatewayUnavailable,
    RequestCancelled,
    ServerShuttingDown,
    StreamInterrupted,
    // RESOURCE_EXHAUSTED
    Overloaded,
    SubscriberTooFarBehind,
    StreamLimitReached,
    RateLimited,
    // DEADLINE_EXCEEDED, INTERNAL
    DeadlineExceeded,
    Internal,
}

impl Reason {
    /// Every reason, in the order of `billing.v1.ErrorReason` (value 1 first).
    pub const ALL: [Reason; 39] = [
        Reason::InvalidField,
        Reason::RefillOutOfBounds,
        Reason::CardExpired,
        Reason::AccountNotFound,
        Reason::PaymentMethodNotFound,
        Reason::TopUpNotFound,
        Reason::NotificationNotFound,
        Reason::SubscriberNotFound,
        Reason::ResourceNotFound,
        Reason::IdempotencyKeyReused,
        Reason::AccountExists,
        Reason::CardAlreadySaved,
        Reason::InsufficientFunds,
        Reason::BalanceLimitExceeded,
        Reason::PaymentMethodRemoved,
        Reason::PaymentMethodNotActive,
        Reason::PaymentMethodPendingAuthentication,
        Reason::NoPrimaryPaymentMethod,
        Reason::NoAutoChargePaymentMethod,
        Reason::ChargeOutcomeUnknown,
        Reason::NotAwaitingAuthentication,
        Reason::GatewayRejected,
        Reason::CardUnknownToGateway,
        Reason::NoRecipient,
        Reason::RoleNotAllowed,
        Reason::BearerTokenInvalid,
        Reason::DatabaseUnavailable,
        Reason::ConcurrentChange,
        Reason::GatewayUnavailable,
        Reason::RequestCancelled,
        Reason::ServerShuttingDown,
        Reason::StreamInterrupted,
        Reason::Overloaded,
        Reason::SubscriberTooFarBehind,
        Reason::DeadlineExceeded,
        Reason::Internal,
        Reason::BearerTokenExpired,
        Reason::StreamLimitReached,
        Reason::RateLimited,
    ];

    /// The `ErrorInfo.reason` string, e.g. `"INSUFFICIENT_FUNDS"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::InvalidField => "INVALID_FIELD",
            Reason::RefillOutOfBounds => "REFILL_OUT_OF_BOUNDS",
            Reason::CardExpired => "CARD_EXPIRED",
            Reason::AccountNotFound => "ACCOUNT_NOT_FOUND",
            Reason::PaymentMethodNotFound => "PAYMENT_METHOD_NOT_FOUND",
            Reason::TopUpNotFound => "TOP_UP_NOT_FOUND",
            Reason::NotificationNotFound => "NOTIFICATION_NOT_FOUND",
            Reason::SubscriberNotFound => "SUBSCRIBER_NOT_FOUND",
            Reason::ResourceNotFound => "RESOURCE_NOT_FOUND",
            Reason::IdempotencyKeyReused => "IDEMPOTENCY_KEY_REUSED",
            Reason::AccountExists => "ACCOUNT_EXISTS",
            Reason::CardAlreadySaved => "CARD_ALREADY_SAVED",
            Reason::InsufficientFunds => "INSUFFICIENT_FUNDS",
            Reason::BalanceLimitExceeded => "BALANCE_LIMIT_EXCEEDED",
            Reason::PaymentMethodRemoved => "PAYMENT_METHOD_REMOVED",
            Reason::PaymentMethodNotActive => "PAYMENT_METHOD_NOT_ACTIVE",
            Reason::PaymentMethodPendingAuthentication => "PAYMENT_METHOD_PENDING_AUTHENTICATION",
            Reason::NoPrimaryPaymentMethod => "NO_PRIMARY_PAYMENT_METHOD",
            Reason::NoAutoChargePaymentMethod => "NO_AUTO_CHARGE_PAYMENT_METHOD",
            Reason::ChargeOutcomeUnknown => "CHARGE_OUTCOME_UNKNOWN",
            Reason::NotAwaitingAuthentication => "NOT_AWAITING_AUTHENTICATION",
            Reason::GatewayRejected => "GATEWAY_REJECTED",
            Reason::CardUnknownToGateway => "CARD_UNKNOWN_TO_GATEWAY",
            Reason::NoRecipient => "NO_RECIPIENT",
            Reason::RoleNotAllowed => "ROLE_NOT_ALLOWED",
            Reason::BearerTokenInvalid => "BEARER_TOKEN_INVALID",
            Reason::DatabaseUnavailable => "DATABASE_UNAVAILABLE",
            Reason::ConcurrentChange => "CONCURRENT_CHANGE",
            Reason::GatewayUnavailable => "GATEWAY_UNAVAILABLE",
            Reason::RequestCancelled => "REQUEST_CANCELLED",
            Reason::ServerShuttingDown => "SERVER_SHUTTING_DOWN",
            Reason::StreamInterrupted => "STREAM_INTERRUPTED",
            Reason::Overloaded => "OVERLOADED",
            Reason::SubscriberTooFarBehind => "SUBSCRIBER_TOO_FAR_BEHIND",
            Reason::DeadlineExceeded => "DEADLINE_EXCEEDED",
            Reason::Internal => "INTERNAL",
            Reason::BearerTokenExpired => "BEARER_TOKEN_EXPIRED",
            Reason::StreamLimitReached => "STREAM_LIMIT_REACHED",
            Reason::RateLimited => "RATE_LIMITED",
        }
    }

    /// How long a client should wait before retrying a call that failed
    /// for this reason (the `RetryInfo.retry_delay` of UNAVAILABLE and
    /// RESOURCE_EXHAUSTED answers).
    pub fn retry_delay(self) -> Duration {
        match self {
            Reason::ConcurrentChange | Reason::RequestCancelled => Duration::from_millis(100),
            Reason::Overloaded | Reason::StreamInterrupted | Reason::SubscriberTooFarBehind => {
                Duration::from_millis(500)
            }
            Reason::GatewayUnavailable | Reason::StreamLimitReached => Duration::from_secs(5),
            // A rate limit's refusal carries its own wait (`api::error::limit_refusal`).
            Reason::RateLimited => Duration::from_secs(60),
            _ => Duration::from_secs(1),
        }
    }

    /// The reason of a `NotFound(what)` error.
    pub fn not_found(what: &str) -> Reason {
        match what {
            "account" => Reason::AccountNotFound,
            "payment method" => Reason::PaymentMethodNotFound,
            "top-up" => Reason::TopUpNotFound,
            "notification" => Reason::NotificationNotFound,
            "subscriber" => Reason::SubscriberNotFound,
            _ => Reason::ResourceNotFound,
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One bad field of a request: its path (`card.exp_month`,
/// `recipients[2]`), what is wrong, and why in machine terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    pub field: String,
    pub description: String,
    /// [`Reason::InvalidField`] unless a more precise reason applies.
    pub reason: Reason,
}

impl fmt::Display for FieldViolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.description)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BillingError {
    /// The caller's input is wrong: every bad field found (at least one).
    /// The message is `"field: description"`, joined by `"; "`.
    #[error("{}", describe_violations(.0))]
    InvalidArgument(Vec<FieldViolation>),
    /// The thing does not exist, or belongs to another account.
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("{message}")]
    AlreadyExists { reason: Reason, message: String },
    /// The request is valid but the state does not allow it (e.g.
    /// insufficient funds). `subject` names what is in the wrong state
    /// (`accounts/acme`, `payment_methods/pm_…`), empty when nothing more
    /// precise than the request applies.
    #[error("{message}")]
    FailedPrecondition {
        reason: Reason,
        subject: String,
        message: String,
    },
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    Unauthenticated(String),
    /// UNAUTHENTICATED because the bearer token expired (its `exp` plus the
    /// leeway): reason `BEARER_TOKEN_EXPIRED`, so a client knows to refresh
    /// its token rather than give up.
    #[error("{0}")]
    TokenExpired(String),
    /// A dependency (the database, the gateway) is unreachable or a
    /// conflict happened; retrying after `reason.retry_delay()` may succeed.
    #[error("{message}")]
    Unavailable { reason: Reason, message: String },
    /// A limit of the service was reached; retrying later may succeed.
    #[error("{message}")]
    ResourceExhausted { reason: Reason, message: String },
    #[error(transparent)]
    Unexpected(#[from] anyhow::Error),
}

fn describe_violations(violations: &[FieldViolation]) -> String {
    let described: Vec<String> = violations.iter().map(ToString::to_string).collect();
    described.join("; ")
}

impl BillingError {
    /// One bad field, for the general reason [`Reason::InvalidField`].
    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self::invalid_because(Reason::InvalidField, field, description)
    }

    /// One bad field, for a precise `reason` (e.g. [`Reason::CardExpired`]).
    pub fn invalid_because(
        reason: Reason,
        field: impl Into<String>,
        description: impl Into<String>,
    ) -> Self {
        Self::InvalidArgument(vec![FieldViolation {
            field: field.into(),
            description: description.into(),
            reason,
        }])
    }

    /// The state does not allow the request; see [`BillingError::FailedPrecondition`].
    pub fn precondition(
        reason: Reason,
        subject: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self::FailedPrecondition {
            reason,
            subject: subject.into(),
            message: message.into(),
        }
    }

    pub fn already_exists(reason: Reason, message: impl Into<String>) -> Self {
        Self::AlreadyExists {
            reason,
            message: message.into(),
        }
    }

    pub fn unavailable(reason: Reason, message: impl Into<String>) -> Self {
        Self::Unavailable {
            reason,
            message: message.into(),
        }
    }

    /// The stable reason of this error (the `ErrorInfo.reason` clients see).
    /// Several field violations with different reasons are [`Reason::InvalidField`].
    pub fn reason(&self) -> Reason {
        match self {
            BillingError::InvalidArgument(violations) => match violations.split_first() {
                Some((first, rest)) if rest.iter().all(|v| v.reason == first.reason) => {
                    first.reason
                }
                _ => Reason::InvalidField,
            },
            BillingError::NotFound(what) => Reason::not_found(what),
            BillingError::AlreadyExists { reason, .. }
            | BillingError::FailedPrecondition { reason, .. }
            | BillingError::Unavailable { reason, .. }
            | BillingError::ResourceExhausted { reason, .. } => *reason,
            BillingError::PermissionDenied(_) => Reason::RoleNotAllowed,
            BillingError::Unauthenticated(_) => Reason::BearerTokenInvalid,
            BillingError::TokenExpired(_) => Reason::BearerTokenExpired,
            BillingError::Unexpected(_) => Reason::Internal,
        }
    }
}

/// The most field violations one error lists (see [`Violations::into_error`]).
pub const MAX_REPORTED_VIOLATIONS: usize = 20;

/// Collects every field violation of a request instead of stopping at the
/// first. Parse each field through [`Violations::check`], then turn the
/// collected `Option`s into values with a `let … else` that returns
/// [`Violations::into_error`]:
///
/// ```
/// # use billing::error::{BillingError, Violations};
/// # fn parse(text: &str) -> Result<u32, BillingError> {
/// #     text.parse().map_err(|_| BillingError::invalid("n", "is not a number"))
/// # }
/// let mut violations = Violations::new();
/// let a = violations.check(parse("1"));
/// let b = violations.check(parse("x"));
/// let (Some(a), Some(b)) = (a, b) else {
///     let error = violations.into_error();
///     assert_eq!(error.to_string(), "n: is not a number");
///     return;
/// };
/// # let _ = (a, b);
/// ```
#[derive(Debug, Default)]
pub struct Violations {
    found: Vec<FieldViolation>,
    /// An error other than a bad field met while parsing (never expected
    /// from a parser; kept so nothing is lost).
    other: Option<BillingError>,
}

impl Violations {
    pub fn new() -> Self {
        Self::default()
    }

    /// The value of `result`; on an error, `None` after recording it.
    pub fn check<T>(&mut self, result: Result<T, BillingError>) -> Option<T> {
        match result {
            Ok(value) => Some(value),
            Err(BillingError::InvalidArgument(violations)) => {
                self.found.extend(violations);
                None
            }
            Err(other) => {
                self.other.get_or_insert(other);
                None
            }
        }
    }

    /// Records one bad field.
    pub fn add(&mut self, field: impl Into<String>, description: impl Into<String>) {
        self.found.push(FieldViolation {
            field: field.into(),
            description: description.into(),
            reason: Reason::InvalidField,
        });
    }

    pub fn is_empty(&self) -> bool {
        self.found.is_empty() && self.other.is_none()
    }

    /// `Ok` when nothing was recorded, else the error naming every bad field.
    pub fn finish(self) -> Result<(), BillingError> {
        if self.is_empty() {
            Ok(())
        } else {
            Err(self.into_error())
        }
    }

    /// The error naming every bad field recorded (an error other than a bad
    /// field first, if one was met). At most [`MAX_REPORTED_VIOLATIONS`] are
    /// listed, then one entry (field `request`) counting the rest: the
    /// message and the details travel in HTTP/2 headers, which clients
    /// bound.
    pub fn into_error(self) -> BillingError {
        match self.other {
            Some(other) => other,
            None if self.found.is_empty() => BillingError::Unexpected(anyhow::anyhow!(
                "a request failed validation without a recorded violation"
            )),
            None => {
                let mut found = self.found;
                if found.len() > MAX_REPORTED_VIOLATIONS {
                    let more = found.len() - MAX_REPORTED_VIOLATIONS;
                    found.truncate(MAX_REPORTED_VIOLATIONS);
                    found.push(FieldViolation {
                        field: "request".into(),
                        description: format!("and {more} more invalid fields not listed"),
                        reason: Reason::InvalidField,
                    });
                }
                BillingError::InvalidArgument(found)
            }
        }
    }
}

pub type BillingResult<T> = Result<T, BillingError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_violation_reads_as_before_several_are_joined() {
        assert_eq!(
            BillingError::invalid("amount", "must be positive").to_string(),
            "amount: must be positive"
        );
        let mut violations = Violations::new();
        violations.add("card.exp_month", "must be 1 to 12");
        violations.add("card.cvc", "must be 3 digits for this card");
        assert_eq!(
            violations.into_error().to_string(),
            "card.exp_month: must be 1 to 12; card.cvc: must be 3 digits for this card"
        );
    }

    #[test]
    fn validation_collects_every_violation_not_only_the_first() {
        let mut violations = Violations::new();
        let a: Option<u32> = violations.check(Err(BillingError::invalid("a", "bad")));
        let b: Option<u32> = violations.check(Ok(2));
        let c: Option<u32> = violations.check(Err(BillingError::invalid("c", "bad")));
        assert_eq!((a, b, c), (None, Some(2), None));
        match violations.into_error() {
            BillingError::InvalidArgument(found) => {
                let fields: Vec<_> = found.iter().map(|v| v.field.as_str()).collect();
                assert_eq!(fields, ["a", "c"]);
            }
            other => panic!("not INVALID_ARGUMENT: {other:?}"),
        }
        assert!(Violations::new().finish().is_ok());
    }

    #[test]
    fn a_flood_of_violations_is_listed_up_to_a_bound_then_counted() {
        let mut violations = Violations::new();
        for index in 0..500 {
            violations.add(format!("payment_method_ids[{index}]"), "is not a valid id");
        }
        let BillingError::InvalidArgument(listed) = violations.into_error() else {
            panic!("not INVALID_ARGUMENT");
        };
        assert_eq!(listed.len(), MAX_REPORTED_VIOLATIONS + 1);
        assert_eq!(listed[MAX_REPORTED_VIOLATIONS].field, "request");
        assert!(
            listed[MAX_REPORTED_VIOLATIONS]
                .description
                .contains("480 more")
        );
    }

    #[test]
    fn the_reason_of_several_violations_is_theirs_when_shared_else_invalid_field() {
        let refill = BillingError::invalid_because(Reason::RefillOutOfBounds, "refill_amount", "x");
        assert_eq!(refill.reason(), Reason::RefillOutOfBounds);
        let mut violations = Violations::new();
        violations.check::<()>(Err(refill));
        violations.add("threshold", "is not a number");
        assert_eq!(violations.into_error().reason(), Reason::InvalidField);
    }

    #[test]
    fn reason_names_are_unique_screaming_snake_case() {
        let mut seen = std::collections::HashSet::new();
        for reason in Reason::ALL {
            let name = reason.as_str();
            assert!(seen.insert(name), "{name} twice");
            assert!(
                name.bytes().all(|b| b.is_ascii_uppercase() || b == b'_'),
                "{name}"
            );
        }
    }
}
