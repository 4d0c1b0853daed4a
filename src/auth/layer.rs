//! The tower layer in front of every billing RPC: reads the bearer token,
//! verifies it, checks the caller's role against the permission table, and
//! puts the [`Caller`] (with the request's trace id, for the audit trail)
//! and the RPC's [`Access`] into the request extensions. A token naming an
//! unknown JWKS `kid` may wait for one (rate-limited) refresh of the set.
//! Health and reflection pass through untouched.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::Status;
use tower::{Layer, Service};

use super::{Access, Caller, KeySet, TokenValidUntil, permissions};
use crate::error::BillingError;
use crate::telemetry::otel;

#[derive(Clone)]
pub struct AuthLayer {
    keys: Arc<KeySet>,
}

impl AuthLayer {
    pub fn new(keys: Arc<KeySet>) -> Self {
        Self { keys }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            keys: self.keys.clone(),
        }
    }
}

#[derive(Clone)]
pub struct AuthService<S> {
    inner: S,
    keys: Arc<KeySet>,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, B> Service<http::Request<B>> for AuthService<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        // The clone is not ready; swap so the ready service handles this call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let Some(access) = permissions::required_access(request.uri().path()) else {
            return Box::pin(inner.call(request));
        };
        let keys = self.keys.clone();
        Box::pin(async move {
            match authenticate(&keys, request.headers(), access).await {
                Ok((mut caller, valid_until)) => {
                    caller.trace_id = trace_id(request.headers());
                    request.extensions_mut().insert(caller);
                    request
                        .extensions_mut()
                        .insert(TokenValidUntil(valid_until));
                    request.extensions_mut().insert(access);
                    inner.call(request).await
                }
                Err(status) => Ok(status.into_http::<tonic::body::Body>()),
            }
        })
    }
}

/// The trace id the audit trail records: the RPC span's (traces on), else
/// the caller's W3C `traceparent`.
fn trace_id(headers: &http::HeaderMap) -> Option<String> {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    otel::trace_id_of(&tracing::Span::current().context())
        .or_else(|| otel::trace_id_of(&otel::extract_parent(headers)))
}

async fn authenticate(
    keys: &KeySet,
    headers: &http::HeaderMap,
    access: Access,
) -> Result<(Caller, std::time::SystemTime), Status> {
    let header = headers
        .get(http::header::AUTHORIZATION)
        .ok_or_else(|| unauthenticated("missing authorization: Bearer <token>"))?;
    let token = header
        .to_str()
        .ok()
        .and_then(|value| {
            value
                .strip_prefix("Bearer ")
                .or_else(|| value.strip_prefix("bearer "))
        })
        .map(str::trim)
        .filter(|token| !token.is_empty())
        .ok_or_else(|| unauthenticated("authorization must be \"Bearer <token>\""))?;
    let (caller, valid_until) = keys
        .authenticate(token)
        .await
        .map_err(|error| match error {
            BillingError::Unauthenticated(message) => unauthenticated(&message),
            expired @ BillingError::TokenExpired(_) => expired.into(),
            _ => unauthenticated("invalid bearer token"),
        })?;
    if !caller.may(access) {
        return Err(BillingError::PermissionDenied(format!(
            "the caller's roles ({}) do not allow this call",
            if caller.roles.is_empty() {
                "none".to_owned()
            } else {
                caller.roles_label()
            }
        ))
        .into());
    }
    Ok((caller, valid_until))
}

/// UNAUTHENTICATED with its `ErrorInfo` (`BEARER_TOKEN_INVALID`).
fn unauthenticated(message: &str) -> Status {
    BillingError::Unauthenticated(message.to_owned()).into()
}
