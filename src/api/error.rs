//! Domain errors become gRPC statuses here, once, with the rich error
//! details of the gRPC richer error model (`google.rpc.Status` in
//! `grpc-status-details-bin`): `ErrorInfo` (stable reason, domain
//! `billing.v1`) on every error, `BadRequest` with every bad field on
//! INVALID_ARGUMENT, `PreconditionFailure` on FAILED_PRECONDITION and
//! `RetryInfo` on UNAVAILABLE and RESOURCE_EXHAUSTED. The contract is
//! written in `proto/billing/v1/errors.proto`. Unexpected errors are logged
//! with their cause and reach the client only as "internal error".

use std::time::Duration;

use prost::Message;
use tonic::{Code, Status};
use tonic_types::pb;

use crate::error::{BillingError, Reason};

/// `ErrorInfo.domain` of every billing error.
pub const ERROR_DOMAIN: &str = "billing.v1";

/// The `details` of a `google.rpc.Status`, built from the `google.rpc`
/// messages of `tonic_types::pb`. (tonic-types 0.14's `ErrorDetails` drops
/// `FieldViolation.reason` when it encodes, so the messages are encoded here.)
struct Details(Vec<prost_types::Any>);

impl Details {
    /// Starts with the `ErrorInfo` every error carries.
    fn new(reason: Reason) -> Self {
        Self::with_info(reason, Default::default())
    }

    /// Starts with an `ErrorInfo` that has `metadata` (e.g. the name of the
    /// limit that refused a call).
    fn with_info(reason: Reason, metadata: std::collections::HashMap<String, String>) -> Self {
        let mut details = Details(Vec::new());
        details.add(
            "ErrorInfo",
            &pb::ErrorInfo {
                reason: reason.as_str().to_owned(),
                domain: ERROR_DOMAIN.to_owned(),
                metadata,
            },
        );
        details
    }

    fn add(&mut self, name: &str, message: &impl Message) {
        self.0.push(prost_types::Any {
            type_url: format!("type.googleapis.com/google.rpc.{name}"),
            value: message.encode_to_vec(),
        });
    }

    fn retry_after(&mut self, delay: Duration) {
        self.add(
            "RetryInfo",
            &pb::RetryInfo {
                retry_delay: Some(prost_types::Duration {
                    seconds: i64::try_from(delay.as_secs()).unwrap_or(i64::MAX),
                    nanos: i32::try_from(delay.subsec_nanos()).unwrap_or(0),
                }),
            },
        );
    }

    /// The status, its details in `grpc-status-details-bin`.
    fn into_status(self, code: Code, message: String) -> Status {
        let status = pb::Status {
            code: code as i32,
            message: message.clone(),
            details: self.0,
        };
        Status::with_details(code, message, status.encode_to_vec().into())
    }
}

impl From<BillingError> for Status {
    fn from(error: BillingError) -> Status {
        let reason = error.reason();
        let mut details = Details::new(reason);
        let (code, message) = match error {
            BillingError::InvalidArgument(violations) => {
                let message = BillingError::InvalidArgument(violations.clone()).to_string();
                let field_violations = violations
                    .into_iter()
                    .map(|violation| pb::bad_request::FieldViolation {
                        field: violation.field,
                        description: violation.description,
                        reason: violation.reason.as_str().to_owned(),
                        localized_message: None,
                    })
                    .collect();
                details.add("BadRequest", &pb::BadRequest { field_violations });
                (Code::InvalidArgument, message)
            }
            BillingError::NotFound(_) => (Code::NotFound, error.to_string()),
            BillingError::AlreadyExists { message, .. } => (Code::AlreadyExists, message),
            BillingError::FailedPrecondition {
                subject, message, ..
            } => {
                let violation = pb::precondition_failure::Violation {
                    r#type: reason.as_str().to_owned(),
                    subject,
                    description: message.clone(),
                };
                details.add(
                    "PreconditionFailure",
                    &pb::PreconditionFailure {
                        violations: vec![violation],
                    },
                );
                (Code::FailedPrecondition, message)
            }
            BillingError::PermissionDenied(message) => (Code::PermissionDenied, message),
            BillingError::Unauthenticated(message) | BillingError::TokenExpired(message) => {
                (Code::Unauthenticated, message)
            }
            BillingError::Unavailable { message, .. } => {
                details.retry_after(reason.retry_delay());
                (Code::Unavailable, message)
            }
            BillingError::ResourceExhausted { message, .. } => {
                details.retry_after(reason.retry_delay());
                (Code::ResourceExhausted, message)
            }
            BillingError::Unexpected(cause) => {
                tracing::error!(error = ?cause, "unexpected error");
                (Code::Internal, "internal error".to_owned())
            }
        };
        details.into_status(code, message)
    }
}

/// A status for an error of the tower layers under the RPC log (load
/// shedding's `Overloaded`, anything else tonic would turn into a status),
/// with the same details as every other error.
pub fn status_from_layer_error(error: tower::BoxError) -> Status {
    if error.is::<tower::load_shed::error::Overloaded>() {
        return BillingError::ResourceExhausted {
            reason: Reason::Overloaded,
            message: "the server is overloaded; retry later".into(),
        }
        .into();
    }
    let status = Status::from_error(error);
    let reason = match status.code() {
        Code::DeadlineExceeded => Reason::DeadlineExceeded,
        Code::Unavailable => Reason::ServerShuttingDown,
        Code::ResourceExhausted => Reason::Overloaded,
        _ => Reason::Internal,
    };
    with_reason(status.code(), status.message(), reason)
}

/// DEADLINE_EXCEEDED, with its `ErrorInfo`.
pub fn deadline_exceeded() -> Status {
    with_reason(
        Code::DeadlineExceeded,
        "deadline exceeded",
        Reason::DeadlineExceeded,
    )
}

/// RESOURCE_EXHAUSTED for a per-caller limit: `ErrorInfo` with `reason`
/// and the limit's name in its metadata (`limit`), and `RetryInfo` with
/// `retry_after` (the limit's own wait when it knows it, else
/// `reason.retry_delay()`). The caller adds the `billing-limit` trailer.
pub fn limit_refusal(
    reason: Reason,
    limit: &str,
    message: String,
    retry_after: Option<Duration>,
) -> Status {
    let mut details = Details::with_info(reason, [("limit".to_owned(), limit.to_owned())].into());
    details.retry_after(retry_after.unwrap_or_else(|| reason.retry_delay()));
    details.into_status(Code::ResourceExhausted, message)
}

/// A status of `code` with the `ErrorInfo` of `reason` (and `RetryInfo` on
/// UNAVAILABLE and RESOURCE_EXHAUSTED), for statuses no [`BillingError`]
/// variant describes (e.g. UNAUTHENTICATED because a stream's token expired).
pub fn status_with_reason(code: Code, message: &str, reason: Reason) -> Status {
    with_reason(code, message, reason)
}

fn with_reason(code: Code, message: &str, reason: Reason) -> Status {
    let mut details = Details::new(reason);
    if matches!(code, Code::Unavailable | Code::ResourceExhausted) {
        details.retry_after(reason.retry_delay());
    }
    details.into_status(code, message.to_owned())
}

#[cfg(test)]
mod tests {
    use tonic_types::StatusExt;

    use super::*;
    use crate::error::Violations;
    use crate::proto;

    #[test]
    fn every_reason_is_a_value_of_the_proto_error_reason_enum_in_the_same_order() {
        for (index, reason) in Reason::ALL.into_iter().enumerate() {
            let value = proto::ErrorReason::from_str_name(&format!("ERROR_REASON_{reason}"))
                .unwrap_or_else(|| panic!("{reason} is not in errors.proto"));
            assert_eq!(value as usize, index + 1, "{reason}");
        }
        // And the proto has no value the code never sends.
        let last = Reason::ALL.len() as i32;
        assert!(proto::ErrorReason::try_from(last + 1).is_err());
    }

    #[test]
    fn every_not_found_of_the_code_base_has_its_own_reason() {
        for what in [
            "account",
            "payment method",
            "top-up",
            "notification",
            "subscriber",
        ] {
            assert_ne!(Reason::not_found(what), Reason::ResourceNotFound, "{what}");
        }
        let sources = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/src"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|entry| entry.path());
        let mut pending: Vec<_> = sources.collect();
        while let Some(path) = pending.pop() {
            if path.is_dir() {
                pending.extend(
                    std::fs::read_dir(&path)
                        .unwrap()
                        .flatten()
                        .map(|e| e.path()),
                );
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            for (_, rest) in text
                .match_indices("NotFound(\"")
                .map(|(i, _)| text.split_at(i + 10))
            {
                let what = rest.split('"').next().unwrap_or_default();
                assert_ne!(
                    Reason::not_found(what),
                    Reason::ResourceNotFound,
                    "NotFound({what:?}) in {} has no reason of its own",
                    path.display()
                );
            }
        }
    }

    #[test]
    fn invalid_argument_lists_every_violation_in_bad_request() {
        let mut violations = Violations::new();
        violations.add("card.exp_month", "must be 1 to 12");
        violations.add("card.cvc", "must be 3 digits for this card");
        let status = Status::from(violations.into_error());
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(
            status.message(),
            "card.exp_month: must be 1 to 12; card.cvc: must be 3 digits for this card"
        );
        let details = status.get_error_details();
        let fields: Vec<_> = details
            .bad_request()
            .expect("BadRequest")
            .field_violations
            .iter()
            .map(|v| (v.field.as_str(), v.reason.as_str()))
            .collect();
        assert_eq!(
            fields,
            [
                ("card.exp_month", "INVALID_FIELD"),
                ("card.cvc", "INVALID_FIELD")
            ]
        );
        let info = details.error_info().expect("ErrorInfo");
        assert_eq!(
            (info.reason.as_str(), info.domain.as_str()),
            ("INVALID_FIELD", "billing.v1")
        );
    }

    #[test]
    fn failed_precondition_carries_a_precondition_failure_and_its_reason() {
        let status = Status::from(BillingError::precondition(
            Reason::InsufficientFunds,
            "accounts/acme",
            "insufficient funds: total_balance is $1.00, the debit is $2.00",
        ));
        let details = status.get_error_details();
        assert_eq!(details.error_info().unwrap().reason, "INSUFFICIENT_FUNDS");
        let violation = &details.precondition_failure().unwrap().violations[0];
        assert_eq!(violation.r#type, "INSUFFICIENT_FUNDS");
        assert_eq!(violation.subject, "accounts/acme");
        assert!(details.retry_info().is_none());
    }

    #[test]
    fn unavailable_and_resource_exhausted_say_when_to_retry() {
        for status in [
            Status::from(BillingError::unavailable(
                Reason::DatabaseUnavailable,
                "the database is unavailable; retry later",
            )),
            status_from_layer_error(Box::new(tower::load_shed::error::Overloaded::new())),
        ] {
            assert!(matches!(
                status.code(),
                Code::Unavailable | Code::ResourceExhausted
            ));
            let details = status.get_error_details();
            assert!(details.retry_info().and_then(|r| r.retry_delay).is_some());
            assert!(details.error_info().is_some());
        }
    }

    #[test]
    fn internal_errors_say_nothing_of_their_cause() {
        let status = Status::from(BillingError::Unexpected(anyhow::anyhow!(
            "secret: db password"
        )));
        assert_eq!(status.message(), "internal error");
        assert_eq!(
            status.get_error_details().error_info().unwrap().reason,
            "INTERNAL"
        );
    }
}
