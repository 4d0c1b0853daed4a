//! The small set of errors every domain operation returns. Each variant is
//! mapped once to a gRPC code in `api::error`; every message except
//! `Unexpected`'s is safe to show to a client.

#[derive(Debug, thiserror::Error)]
pub enum BillingError {
    /// The caller's input is wrong; `field` names the request field.
    #[error("{field}: {reason}")]
    InvalidArgument { field: String, reason: String },
    /// The thing does not exist, or belongs to another account.
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("{0}")]
    AlreadyExists(String),
    /// The request is valid but the state does not allow it (e.g. insufficient funds).
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    Unauthenticated(String),
    /// A dependency (the database) is unreachable; retrying later may succeed.
    #[error("{0}")]
    Unavailable(String),
    #[error(transparent)]
    Unexpected(#[from] anyhow::Error),
}

impl BillingError {
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

pub type BillingResult<T> = Result<T, BillingError>;
