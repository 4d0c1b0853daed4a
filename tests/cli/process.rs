//! Starting `billing serve` as a child process, and finding free ports.

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const SECRET: &str = "cli-test-secret-0123456789abcdef";

pub fn billing() -> Command {
    Command::new(env!("CARGO_BIN_EXE_billing"))
}

/// A token minted by `billing token --role <role> [--account <account>]`
/// with the tests' secret.
pub fn token(role: &str, account: Option<&str>) -> String {
    let mut command = billing();
    command
        .args(["token", "--role", role])
        .env("BILLING_JWT_SECRET", SECRET);
    if let Some(account) = account {
        command.args(["--account", account]);
    }
    let output = command.output().unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct Serve {
    pub child: Child,
    pub address: SocketAddr,
}

impl Serve {
    /// Starts `billing serve` with `configure` applied, logs into `log_file`,
    /// and waits (up to two minutes) until it accepts connections.
    pub fn start(log_file: &Path, configure: impl FnOnce(&mut Command)) -> Serve {
        let mut serve = Serve::spawn(log_file, configure);
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if std::net::TcpStream::connect(serve.address).is_ok() {
                break;
            }
            if let Ok(Some(status)) = serve.child.try_wait() {
                panic!(
                    "billing serve exited early ({status}):\n{}",
                    std::fs::read_to_string(log_file).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "billing serve did not start listening"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        serve
    }

    /// Starts `billing serve` like [`Serve::start`] without waiting for it.
    pub fn spawn(log_file: &Path, configure: impl FnOnce(&mut Command)) -> Serve {
        let port = free_port();
        let address: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let log = std::fs::File::create(log_file).unwrap();
        let mut command = billing();
        command
            .arg("serve")
            .env("BILLING_LISTEN", address.to_string())
            // Several servers run at once: each its own metrics port.
            .env(
                "BILLING_METRICS_LISTEN",
                format!("127.0.0.1:{}", free_port()),
            )
            .env_remove("DATABASE_URL")
            .env("RUST_LOG", "info")
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log));
        configure(&mut command);
        let child = command.spawn().expect("spawn billing serve");
        Serve { child, address }
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn terminate(self) -> std::process::ExitStatus {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        self.wait_for_exit()
    }

    /// Waits (up to a minute) for the process to exit, after a signal sent.
    pub fn wait_for_exit(mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("billing serve did not stop after SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Creates a fresh empty database on the test server, named under this
/// run's prefix (`billing_cli_<run>_`, see [`crate::test_db::run_id`]), and
/// returns its URL.
pub async fn fresh_database_url() -> String {
    let prefix = format!("billing_cli_{}_", crate::test_db::run_id());
    let (_, name) = crate::test_db::create(&prefix).await;
    let server_url = crate::test_db::server_url();
    let base = server_url
        .rsplit_once('/')
        .map(|(base, _)| base.to_owned())
        .unwrap();
    format!("{base}/{name}")
}

/// A temporary directory the `postgres` user can traverse (for private clusters when root).
pub fn shared_temp_dir() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("billing-test-")
        .tempdir_in("/tmp")
        .unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    dir
}
