//! The HTTP side of the service (axum): `/metrics` in the Prometheus text
//! format, and the payment gateway's webhook when one is configured.

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use sqlx::PgPool;
use tokio::net::TcpListener;

use crate::telemetry::metrics;

pub fn router(pool: PgPool, extra: Option<Router>) -> Router {
    let router = Router::new()
        .route("/metrics", get(scrape))
        .with_state(pool);
    match extra {
        Some(extra) => router.merge(extra),
        None => router,
    }
}

/// Serves `router` on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    pool: PgPool,
    extra: Option<Router>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(pool, extra))
        .with_graceful_shutdown(shutdown)
        .await
}

async fn scrape(State(pool): State<PgPool>) -> impl IntoResponse {
    metrics::set_pool_use(
        pool.size(),
        pool.num_idle(),
        pool.options().get_max_connections(),
    );
    // Database gauges are best effort: a scrape still answers while Postgres is down.
    match sqlx::query_scalar::<_, i64>(
        "SELECT COUNT(*) FROM notifications WHERE status = 'pending'",
    )
    .fetch_one(&pool)
    .await
    {
        Ok(pending) => metrics::set_outbox_pending(pending),
        Err(error) => tracing::debug!(%error, "outbox depth not measured"),
    }
    let lags = sqlx::query_as::<_, (String, i64)>(
        "SELECT s.name, GREATEST(COALESCE((SELECT MAX(cursor) FROM balance_events), 0) - s.cursor, 0) \
           FROM event_subscribers s",
    )
    .fetch_all(&pool)
    .await;
    match lags {
        Ok(lags) => {
            for (subscriber, lag) in lags {
                metrics::set_subscriber_lag(&subscriber, lag);
            }
        }
        Err(error) => tracing::debug!(%error, "subscriber lag not measured"),
    }
    (
        [(header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
        metrics::render(),
    )
}
