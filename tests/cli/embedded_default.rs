//! The embedded default: no DATABASE_URL and nothing on the local port, so
//! `serve` starts a private cluster in its data directory, serves, and finds
//! the same data after a restart. Also: the development key and `billing token`.

use billing::proto;
use billing::proto::balances_client::BalancesClient;

use crate::process::{Serve, billing, free_port, shared_temp_dir};

fn token(data_dir: &std::path::Path) -> String {
    let output = billing()
        .args(["token", "--role", "service", "--data-dir"])
        .arg(data_dir)
        .env_remove("BILLING_JWT_SECRET")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

fn authed<T>(token: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_without_database_url_starts_a_private_cluster_and_keeps_its_data() {
    let dir = shared_temp_dir();
    let data_dir = dir.path().join("data");
    let unused_port = free_port();
    let configure = |command: &mut std::process::Command| {
        command
            .env("BILLING_DATA_DIR", &data_dir)
            .env("BILLING_LOCAL_PG_PORT", unused_port.to_string())
            .env_remove("BILLING_JWT_SECRET");
    };

    let first = Serve::start(&dir.path().join("first.log"), configure);
    let log = std::fs::read_to_string(dir.path().join("first.log")).unwrap();
    assert!(
        data_dir.join("postgres").join("PG_VERSION").exists(),
        "no cluster in the data dir:\n{log}"
    );
    assert!(
        data_dir.join("dev-jwt-secret").exists(),
        "no development key:\n{log}"
    );
    let token = token(&data_dir);
    let mut client = BalancesClient::connect(format!("http://{}", first.address))
        .await
        .unwrap();
    client
        .create_account(authed(
            &token,
            proto::CreateAccountRequest {
                account_id: "kept".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    client
        .credit(authed(
            &token,
            proto::CreditRequest {
                account_id: "kept".into(),
                amount: "42.00".into(),
                kind: proto::TransactionKind::Promotion as i32,
                idempotency_key: "welcome".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    drop(client);
    assert!(first.terminate().success());

    let second = Serve::start(&dir.path().join("second.log"), configure);
    let mut client = BalancesClient::connect(format!("http://{}", second.address))
        .await
        .unwrap();
    let balance = client
        .get_balance(authed(
            &token,
            proto::GetBalanceRequest {
                account_id: "kept".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(balance.balance, "42.00");
    drop(client);
    assert!(second.terminate().success());
    let log = std::fs::read_to_string(dir.path().join("second.log")).unwrap();
    assert!(log.contains("private postgres cluster stopped"), "{log}");
}

#[test]
fn no_postgres_anywhere_says_how_to_get_one() {
    let dir = shared_temp_dir();
    let output = billing()
        .arg("migrate")
        .env_remove("DATABASE_URL")
        .env("BILLING_LOCAL_PG_PORT", free_port().to_string())
        .env("BILLING_DATA_DIR", dir.path().join("data"))
        // No pg_config and no /usr/lib/postgresql on this PATH is not enough (the
        // fallback scans /usr/lib/postgresql), so point the look-up at nothing.
        .env("BILLING_PG_BINARIES", "/nonexistent")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("no PostgreSQL found"), "{stderr}");
    assert!(stderr.contains("DATABASE_URL"), "{stderr}");
}
