//! The HTTP side of the service (axum): `/metrics` in the Prometheus text
//! format, and the payment gateway's webhook when one is configured.

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use sqlx::PgPool;

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

/// Never waits on the database: the database gauges come from the snapshot
/// `metrics::refresh_database_gauges` keeps; the pool's use is read here.
async fn scrape(State(pool): State<PgPool>) -> impl IntoResponse {
    metrics::set_pool_use(
        pool.size(),
        pool.num_idle(),
        pool.options().get_max_connections(),
    );
    (
        [(header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
        metrics::render(),
    )
}
