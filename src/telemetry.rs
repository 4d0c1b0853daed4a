//! Structured logs through `tracing`: text for people, JSON for containers.
//! `RUST_LOG` filters (default `info`).

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,h2=warn,tower=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(true);
    let result = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
    // A second init (tests start several servers in one process) keeps the first.
    let _ = result;
}

/// One log line per RPC: method, gRPC code and latency (DEBUG when it succeeded,
/// WARN when it did not).
pub mod rpc_log {
    use std::future::Future;
    use std::pin::Pin;
    use std::task::{Context, Poll};
    use std::time::Instant;

    use tower::{Layer, Service};

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

    impl<S, B, R> Service<http::Request<B>> for RpcLog<S>
    where
        S: Service<http::Request<B>, Response = http::Response<R>> + Send,
        S::Future: Send + 'static,
        S::Error: std::fmt::Display,
    {
        type Response = S::Response;
        type Error = S::Error;
        type Future = BoxFuture<Self::Response, Self::Error>;

        fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            self.inner.poll_ready(cx)
        }

        fn call(&mut self, request: http::Request<B>) -> Self::Future {
            let method = request.uri().path().to_owned();
            let started = Instant::now();
            let future = self.inner.call(request);
            Box::pin(async move {
                let result = future.await;
                let latency_ms = started.elapsed().as_secs_f64() * 1000.0;
                match &result {
                    Ok(response) => {
                        // Errors are trailers-only responses: the code is in the headers.
                        // A successful unary call carries its code in the trailers (0).
                        let code = response
                            .headers()
                            .get("grpc-status")
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| v.parse::<i32>().ok())
                            .unwrap_or(0);
                        let code_name = format!("{:?}", tonic::Code::from(code));
                        // Successful calls at DEBUG: at thousands of debits a
                        // second an INFO line each is a formatted write(2) per call.
                        if code == 0 || method.starts_with("/grpc.") {
                            tracing::debug!(target: "billing::rpc", %method, code = %code_name, latency_ms, "rpc");
                        } else {
                            tracing::warn!(target: "billing::rpc", %method, code = %code_name, latency_ms, "rpc");
                        }
                    }
                    Err(error) => {
                        tracing::warn!(target: "billing::rpc", %method, %error, latency_ms, "rpc failed")
                    }
                }
                result
            })
        }
    }
}
