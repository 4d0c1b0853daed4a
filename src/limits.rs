//! The per-request deadline, as a tower layer inside the RPC log: the
//! shorter of the caller's `grpc-timeout` and the server's request timeout.
//! A request past it is dropped (nothing it had not committed is written)
//! and answered `DEADLINE_EXCEEDED`.
//!
//! tonic also enforces `grpc-timeout`, outside every layer, but answers
//! `CANCELLED`; this layer fires up to a millisecond earlier so callers get
//! the code the gRPC spec names. It also turns the errors of the layers
//! below (load shedding's `Overloaded`) into statuses, so the RPC log and
//! metrics see a code for every call.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tower::{BoxError, Layer, Service};

/// Margin by which this deadline precedes tonic's own `grpc-timeout` timer.
const AHEAD_OF_TONIC: Duration = Duration::from_millis(1);

#[derive(Clone)]
pub struct DeadlineLayer {
    server_timeout: Duration,
}

impl DeadlineLayer {
    pub fn new(server_timeout: Duration) -> Self {
        Self { server_timeout }
    }
}

impl<S> Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Deadline {
            inner,
            server_timeout: self.server_timeout,
        }
    }
}

#[derive(Clone)]
pub struct Deadline<S> {
    inner: S,
    server_timeout: Duration,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, B, R> Service<http::Request<B>> for Deadline<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>> + Send,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    R: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let requested = request
            .headers()
            .get("grpc-timeout")
            .and_then(|value| value.to_str().ok())
            .and_then(parse_grpc_timeout);
        let limit = match requested {
            Some(requested) if requested < self.server_timeout => {
                requested.saturating_sub(AHEAD_OF_TONIC)
            }
            _ => self.server_timeout,
        };
        let future = self.inner.call(request);
        Box::pin(async move {
            match tokio::time::timeout(limit, future).await {
                Ok(Ok(response)) => Ok(response),
                Ok(Err(error)) => {
                    Ok(crate::api::error::status_from_layer_error(error.into()).into_http())
                }
                Err(_) => Ok(crate::api::error::deadline_exceeded().into_http()),
            }
        })
    }
}

/// Load shedding over a global concurrency limit, for every call but the
/// health checks: `/grpc.health.v1.Health/*` goes straight to the inner
/// service, so probes answer while the server sheds load.
#[derive(Clone)]
pub struct LimitExceptHealthLayer {
    limit: tower::limit::GlobalConcurrencyLimitLayer,
}

impl LimitExceptHealthLayer {
    pub fn new(max_in_flight: usize) -> Self {
        Self {
            limit: tower::limit::GlobalConcurrencyLimitLayer::new(max_in_flight),
        }
    }
}

impl<S: Clone> Layer<S> for LimitExceptHealthLayer {
    type Service = LimitExceptHealth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        LimitExceptHealth {
            limited: tower::load_shed::LoadShed::new(self.limit.layer(inner.clone())),
            inner,
        }
    }
}

#[derive(Clone)]
pub struct LimitExceptHealth<S> {
    inner: S,
    limited: tower::load_shed::LoadShed<tower::limit::ConcurrencyLimit<S>>,
}

const HEALTH_PREFIX: &str = "/grpc.health.v1.Health/";

impl<S, B> Service<http::Request<B>> for LimitExceptHealth<S>
where
    S: Service<http::Request<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    S::Response: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Readiness of the limit is decided per call (`oneshot` below): a
        // shed call answers RESOURCE_EXHAUSTED instead of waiting here.
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        use tower::ServiceExt;
        if request.uri().path().starts_with(HEALTH_PREFIX) {
            let future = self.inner.call(request);
            return Box::pin(async move { future.await.map_err(Into::into) });
        }
        let limited = self.limited.clone();
        Box::pin(limited.oneshot(request))
    }
}

/// `grpc-timeout`: up to 8 digits and a unit (H, M, S, m, u, n).
fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount * 3600),
        "M" => Duration::from_secs(amount * 60),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_units_parse() {
        assert_eq!(parse_grpc_timeout("1m"), Some(Duration::from_millis(1)));
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_grpc_timeout("100u"), Some(Duration::from_micros(100)));
        assert_eq!(parse_grpc_timeout("123456789S"), None);
        assert_eq!(parse_grpc_timeout("5x"), None);
        assert_eq!(parse_grpc_timeout("m"), None);
    }
}
