//! A client in another language: `tests/cli/python/billing_client.py`
//! (grpcio, stubs generated from `proto/` at each run) against `billing
//! serve` — an account, a 3-D Secure card, a 6-decimal debit, settings, the
//! event stream until an automatic top-up, and the structured details of
//! three failures read without parsing a message. scripts/test.sh and
//! .ci/run install grpcio, grpcio-tools and grpcio-status.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::process::{SECRET, Serve, fresh_database_url, token};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_grpcio_client_runs_the_product_and_reads_structured_errors() {
    let available = Command::new("python3")
        .args(["-c", "import grpc, grpc_tools, grpc_status"])
        .status()
        .is_ok_and(|status| status.success());
    assert!(
        available,
        "python3 with grpcio, grpcio-tools and grpcio-status is needed \
         (python3 -m pip install grpcio grpcio-tools grpcio-status)"
    );
    let database_url = fresh_database_url().await;
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::start(&dir.path().join("serve.log"), |command| {
        command
            .env("DATABASE_URL", &database_url)
            .env("BILLING_JWT_SECRET", SECRET)
            .env("BILLING_DATA_DIR", dir.path().join("data"));
    });
    let root = env!("CARGO_MANIFEST_DIR");
    let output_file = dir.path().join("python.out");
    let log = std::fs::File::create(&output_file).unwrap();
    let mut client = Command::new("python3")
        .arg(format!("{root}/tests/cli/python/billing_client.py"))
        .args(["--address", &serve.address.to_string()])
        .args(["--proto", &format!("{root}/proto")])
        .args(["--service-token", &token("service", None)])
        .args(["--admin-token", &token("admin", Some("acme"))])
        .args(["--other-admin-token", &token("admin", Some("globex"))])
        .stdout(Stdio::from(log.try_clone().unwrap()))
        .stderr(Stdio::from(log))
        .spawn()
        .expect("run python3");
    // Bounded: the script's own waits are 30-60 s each; 5 minutes covers a loaded machine.
    let deadline = Instant::now() + Duration::from_secs(300);
    let status = loop {
        if let Some(status) = client.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = client.kill();
            panic!(
                "the Python client did not finish within 5 minutes:\n{}",
                std::fs::read_to_string(&output_file).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let output = std::fs::read_to_string(&output_file).unwrap_or_default();
    assert!(
        status.success(),
        "the Python client failed ({status}):\n{output}\nserver log:\n{}",
        std::fs::read_to_string(dir.path().join("serve.log")).unwrap_or_default()
    );
    assert!(
        output.contains("python client: all checks passed"),
        "{output}"
    );
    let stopped = serve.terminate();
    assert!(
        stopped.success(),
        "serve exited with {stopped} after SIGTERM"
    );
}
