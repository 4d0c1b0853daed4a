//! Readiness follows the database, liveness does not, and `/metrics` does
//! not wait for it: a private cluster (never the machine's shared server)
//! is stopped and started under a running server.
//! Also: reflection answers on v1 as well as v1alpha.

use std::time::Duration;

use billing::db::embedded::{PrivateCluster, find_binaries};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::process::shared_temp_dir;

async fn status_of(client: &mut HealthClient<tonic::transport::Channel>, service: &str) -> i32 {
    client
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .map(|r| r.into_inner().status)
        .unwrap_or(-1)
}

/// Polls until every service reports `want` (or panics after 60 s).
async fn wait_for(client: &mut HealthClient<tonic::transport::Channel>, want: ServingStatus) {
    let services = ["", "billing.v1.Balances", "billing.v1.PaymentMethods"];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let mut all = true;
        for service in services {
            all &= status_of(client, service).await == want as i32;
        }
        if all {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "health never became {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// GET /metrics on `address`, bounded by `limit`: the body, or why not.
async fn scrape(address: std::net::SocketAddr, limit: Duration) -> Result<String, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(address).await?;
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: billing\r\nConnection: close\r\n\r\n")
            .await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        std::io::Result::Ok(response)
    };
    match tokio::time::timeout(limit, exchange).await {
        Ok(Ok(response)) if response.starts_with("HTTP/1.1 200") => Ok(response),
        Ok(Ok(response)) => Err(format!("unexpected answer: {response}")),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err(format!("no answer within {limit:?}")),
    }
}

#[tokio::test]
async fn while_postgres_is_down_readiness_is_not_serving_but_liveness_and_metrics_answer() {
    let dir = shared_temp_dir();
    let binaries = find_binaries(None).expect("PostgreSQL server binaries are installed");
    let cluster =
        PrivateCluster::start(&binaries, &dir.path().join("pg")).expect("start a private cluster");
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(1))
        .connect_with(cluster.connect_options())
        .await
        .unwrap();
    billing::db::migrate(&pool).await.unwrap();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let metrics_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let metrics_address = metrics_listener.local_addr().unwrap();
    let settings = billing::server::ServerSettings {
        health_interval: Duration::from_millis(200),
        metrics_listener: Some(std::sync::Arc::new(metrics_listener)),
        metrics_refresh: Duration::from_millis(200),
        ..Default::default()
    };
    let keys = std::sync::Arc::new(
        billing::auth::KeySet::load(
            &billing::config::AuthArgs {
                jwt_secret: Some(crate::process::SECRET.into()),
                ..Default::default()
            },
            dir.path(),
        )
        .unwrap(),
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(billing::server::serve(
        listener,
        pool,
        keys,
        settings,
        async {
            let _ = stopped.await;
        },
    ));
    let channel = tonic::transport::Channel::from_shared(format!("http://{address}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel.clone());

    wait_for(&mut health, ServingStatus::Serving).await;
    assert_eq!(
        status_of(&mut health, "liveness").await,
        ServingStatus::Serving as i32
    );
    cluster.stop();
    wait_for(&mut health, ServingStatus::NotServing).await;
    // Past the chart's liveness window (periodSeconds × failureThreshold would be 30 s;
    // here several health intervals): the process is still alive and says so.
    for _ in 0..10 {
        assert_eq!(
            status_of(&mut health, "liveness").await,
            ServingStatus::Serving as i32,
            "liveness followed the database"
        );
        let metrics = scrape(metrics_address, Duration::from_secs(1)).await;
        assert!(
            metrics.as_ref().is_ok_and(|m| {
                m.contains("grpc_server_handled_total") && m.contains("process_cpu_seconds_total")
            }),
            "/metrics while Postgres is down: {metrics:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        status_of(&mut health, "").await,
        ServingStatus::NotServing as i32
    );
    cluster.restart_if_stopped().unwrap();
    wait_for(&mut health, ServingStatus::Serving).await;

    // Reflection v1 (grpcurl 1.8 speaks v1alpha, which the grpcurl test covers).
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection answer: {response:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"billing.v1.PaymentMethods".to_string()),
        "{names:?}"
    );

    let _ = stop.send(());
    server.await.unwrap().unwrap();
    cluster.stop();
}
