//! The outermost layer of every RPC: a span (the OpenTelemetry server span,
//! child of the caller's W3C `traceparent`, with the attributes of the
//! OpenTelemetry RPC semantic conventions: `rpc.system`, `rpc.service`,
//! `rpc.method`, `rpc.grpc.status_code`), one log line with method, gRPC
//! code and latency (its `trace_id` and `span_id` are the span's, as on
//! every line logged inside it), and the `grpc_server_*` metrics.
//!
//! tonic-tracing-opentelemetry (tonic 0.14) makes the same server span, but
//! with a fixed set of fields (no `account_id`) at TRACE level; this layer
//! has to time the call and write its log line anyway, so it makes the span
//! too. No maintained crate exports the `grpc_server_*` Prometheus metrics
//! for tonic 0.14 (tonic_prometheus_layer is on tonic 0.13).
//!
//! The span declares `account_id` empty: the account is in the request
//! body, so the handlers record it (`api::authorize`).
//!
//! An RPC ends with its status: in the response headers for an error
//! answered at once (trailers-only), else in the trailers after the last
//! message. So the line and the metrics are written when the response's
//! body ends ([`RecordedBody`]): a `WatchBalanceEvents` stream is counted
//! and logged once, when it ends, with the code it ended with and its whole
//! duration, not as `OK` when it opens; one the client leaves is `Cancelled`.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use tower::{Layer, Service};
use tracing::Instrument;
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::limit_log::LimitLog;
use super::metrics::{self, RpcLabels};
use super::otel;

#[derive(Clone, Default)]
pub struct RpcLogLayer;

impl<S> Layer<S> for RpcLogLayer {
    type Service = RpcLog<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcLog { inner }
    }
}

#[derive(Clone)]
pub struct RpcLog<S> {
    inner: S,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

/// The bounded metric labels of `path`: a billing RPC of the permission
/// table or a health/reflection method; anything else is `unknown` (unknown
/// paths are not labels).
fn rpc_labels(path: &str) -> RpcLabels {
    const INFRASTRUCTURE: [&str; 4] = [
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    ];
    const STREAMS: [&str; 2] = [
        "/billing.v1.Balances/WatchBalanceEvents",
        "/grpc.health.v1.Health/Watch",
    ];
    let known = crate::auth::known_method(path)
        .or_else(|| INFRASTRUCTURE.iter().copied().find(|known| *known == path));
    let Some((grpc_service, grpc_method)) = known.and_then(|k| k[1..].split_once('/')) else {
        return RpcLabels {
            grpc_type: "unary",
            grpc_service: "unknown",
            grpc_method: "unknown",
        };
    };
    let grpc_type = if STREAMS.contains(&path) {
        "server_stream"
    } else if grpc_service.contains(".ServerReflection") {
        "bidi_stream"
    } else {
        "unary"
    };
    RpcLabels {
        grpc_type,
        grpc_service,
        grpc_method,
    }
}

/// Records the end of an RPC once: when its status goes out, or (dropped
/// before that: the client went away) as `Cancelled`.
struct Finish {
    rpc: RpcLabels,
    path: String,
    started: Instant,
    span: tracing::Span,
    done: bool,
    /// Refused by a per-caller limit (`billing-limit` metadata): logged by
    /// the limit itself, not counted as load shedding.
    limited: bool,
}

impl Finish {
    fn record(&mut self, code: tonic::Code, error: Option<&dyn std::fmt::Display>) {
        self.done = true;
        let elapsed = self.started.elapsed().as_secs_f64();
        let latency_ms = elapsed * 1000.0;
        let code_name = format!("{code:?}");
        metrics::rpc_handled(self.rpc, code, elapsed);
        self.span.record("rpc.grpc.status_code", code as i32);
        if is_server_fault(code) {
            self.span.record("otel.status_code", "ERROR");
        }
        let method = self.path.as_str();
        // Shed calls are counted, and summarised once per interval: an
        // overload must not turn into a flood of log lines.
        if code == tonic::Code::ResourceExhausted && error.is_none() && !self.limited {
            OVERLOAD_LOG.refused(&method);
            return;
        }
        // A stream ended UNAVAILABLE was interrupted on purpose (shutdown, a
        // lagging stream) and told where to resume: the span and the
        // metrics keep the code, the line is not an ERROR (a shutdown ends
        // thousands of streams at once).
        let interrupted_stream = self.rpc.grpc_type != "unary" && code == tonic::Code::Unavailable;
        // Inside the span: the line carries its trace_id and span_id.
        self.span.in_scope(|| match error {
            Some(error) => {
                tracing::error!(target: "billing::rpc", method, code = %code_name, latency_ms, %error, "rpc failed")
            }
            None if is_server_fault(code) && !interrupted_stream => {
                tracing::error!(target: "billing::rpc", method, code = %code_name, latency_ms, "rpc")
            }
            // Health probes and reflection: frequent and uninteresting.
            None if method.starts_with("/grpc.") => {
                tracing::debug!(target: "billing::rpc", method, code = %code_name, latency_ms, "rpc")
            }
            // Success and the caller's mistakes (INVALID_ARGUMENT, NOT_FOUND, …).
            None => {
                tracing::info!(target: "billing::rpc", method, code = %code_name, latency_ms, "rpc")
            }
        });
    }
}

impl Drop for Finish {
    fn drop(&mut self) {
        if !self.done {
            self.record(tonic::Code::Cancelled, None);
        }
    }
}

/// Shed calls: the first is logged at once, then one summary line per
/// [`LIMIT_LOG_INTERVAL`](super::limit_log::LIMIT_LOG_INTERVAL) with the
/// count since the last line, like every other limit; also counted in
/// `billing_limits_refused_total{limit="overload"}`.
static OVERLOAD_LOG: LimitLog =
    LimitLog::new("overload", "overloaded: calls shed with RESOURCE_EXHAUSTED");

/// Codes that mean the server failed (the span is marked as an error);
/// the caller's mistakes are not the server's errors.
fn is_server_fault(code: tonic::Code) -> bool {
    use tonic::Code::*;
    matches!(
        code,
        Unknown | DeadlineExceeded | Unimplemented | Internal | Unavailable | DataLoss
    )
}

/// A response body that records its RPC's end (its [`Finish`]) when the
/// trailers go out — with their `grpc-status` — or, dropped before that
/// (the client went away mid-stream), as `Cancelled`.
struct RecordedBody<R> {
    inner: R,
    /// `None` once recorded (or for an answer recorded from its headers).
    finish: Option<Finish>,
}

impl<R> http_body::Body for RecordedBody<R>
where
    R: http_body::Body + Unpin,
    R::Error: std::fmt::Display,
{
    type Data = R::Data;
    type Error = R::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref()
                    && let Some(mut finish) = self.finish.take()
                {
                    finish.record(grpc_status(trailers), None);
                }
            }
            Poll::Ready(Some(Err(error))) => {
                if let Some(mut finish) = self.finish.take() {
                    finish.record(tonic::Code::Unknown, Some(error));
                }
            }
            // Ended without trailers: no status was sent.
            Poll::Ready(None) => {
                if let Some(mut finish) = self.finish.take() {
                    finish.record(tonic::Code::Unknown, None);
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The `grpc-status` of headers or trailers; `OK` when absent.
fn grpc_status(headers: &http::HeaderMap) -> tonic::Code {
    let code = headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .unwrap_or(0);
    tonic::Code::from(code)
}

impl<S, B, R> Service<http::Request<B>> for RpcLog<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>> + Send,
    S::Future: Send + 'static,
    S::Error: std::fmt::Display,
    R: http_body::Body<Data = bytes::Bytes> + Unpin + Send + 'static,
    R::Error: Into<tonic::codegen::StdError> + std::fmt::Display,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let path = request.uri().path().to_owned();
        let labels = rpc_labels(&path);
        metrics::rpc_started(labels);
        let (service, rpc) = path
            .trim_start_matches('/')
            .split_once('/')
            .unwrap_or(("", ""));
        let span = tracing::info_span!(
            target: "billing::rpc",
            "rpc",
            otel.name = %path.trim_start_matches('/'),
            otel.kind = "server",
            otel.status_code = Empty,
            rpc.system = "grpc",
            rpc.service = %service,
            rpc.method = %rpc,
            rpc.grpc.status_code = Empty,
            account_id = Empty,
        );
        let parent = otel::extract_parent(request.headers());
        if otel::trace_id_of(&parent).is_some() {
            // Fails only when no OpenTelemetry layer is installed: nothing to parent then.
            let _ = span.set_parent(parent);
        }
        let mut finish = Finish {
            rpc: labels,
            path,
            started: Instant::now(),
            span: span.clone(),
            done: false,
            limited: false,
        };
        let future = span.in_scope(|| self.inner.call(request));
        Box::pin(
            async move {
                match future.await {
                    Ok(response) => {
                        finish.limited = response
                            .headers()
                            .contains_key(crate::api::LIMIT_METADATA_KEY);
                        // An error answered at once is trailers-only: its code
                        // is in the headers. Otherwise the code comes in the
                        // trailers, when the body ends.
                        let finish = if response.headers().contains_key("grpc-status") {
                            finish.record(grpc_status(response.headers()), None);
                            None
                        } else {
                            Some(finish)
                        };
                        Ok(response
                            .map(|inner| tonic::body::Body::new(RecordedBody { inner, finish })))
                    }
                    Err(error) => {
                        finish.record(tonic::Code::Unknown, Some(&error));
                        Err(error)
                    }
                }
            }
            .instrument(span),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rpc_labels_are_bounded_to_known_rpcs_with_their_grpc_type() {
        let labels = |path| {
            let rpc = rpc_labels(path);
            (rpc.grpc_type, rpc.grpc_service, rpc.grpc_method)
        };
        assert_eq!(
            labels("/billing.v1.Balances/Debit"),
            ("unary", "billing.v1.Balances", "Debit")
        );
        assert_eq!(
            labels("/billing.v1.Balances/WatchBalanceEvents"),
            ("server_stream", "billing.v1.Balances", "WatchBalanceEvents")
        );
        assert_eq!(
            labels("/grpc.health.v1.Health/Check"),
            ("unary", "grpc.health.v1.Health", "Check")
        );
        assert_eq!(
            labels("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo").0,
            "bidi_stream"
        );
        assert_eq!(
            labels("/billing.v1.Balances/acct-123"),
            ("unary", "unknown", "unknown")
        );
        assert_eq!(labels("/anything/else"), ("unary", "unknown", "unknown"));
    }
}
