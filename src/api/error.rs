//! Domain errors become gRPC statuses here, once. Unexpected errors are
//! logged with their cause and reach the client only as "internal error".

use tonic::Status;

use crate::error::BillingError;

impl From<BillingError> for Status {
    fn from(error: BillingError) -> Status {
        match error {
            BillingError::InvalidArgument { .. } => Status::invalid_argument(error.to_string()),
            BillingError::NotFound(_) => Status::not_found(error.to_string()),
            BillingError::AlreadyExists(message) => Status::already_exists(message),
            BillingError::FailedPrecondition(message) => Status::failed_precondition(message),
            BillingError::PermissionDenied(message) => Status::permission_denied(message),
            BillingError::Unauthenticated(message) => Status::unauthenticated(message),
            BillingError::Unavailable(message) => Status::unavailable(message),
            BillingError::Unexpected(cause) => {
                tracing::error!(error = ?cause, "unexpected error");
                Status::internal("internal error")
            }
        }
    }
}
