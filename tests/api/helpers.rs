//! `spawn_app()`: a billing server on 127.0.0.1:0 against a fresh database,
//! with clients and tokens for every role.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use billing::auth::KeySet;
use billing::config::AuthArgs;
use billing::proto;
use billing::server::{ServerSettings, serve};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Executor, PgPool};
use tokio::sync::oneshot;
use tonic::transport::Channel;

pub const TEST_SECRET: &str = "test-secret-at-least-16-bytes-long";

/// The server every test database lives on: TEST_DATABASE_URL or the local default.
pub use crate::test_db::server_url;

pub fn init_logs() {
    if std::env::var("TEST_LOG").is_ok() {
        let _telemetry = billing::telemetry::init(billing::config::LogFormat::Text);
    }
}

/// This run's prefix of test database names (`billing_test_<run>_`, see
/// [`crate::test_db::run_id`]).
pub fn run_prefix() -> &'static str {
    static PREFIX: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    PREFIX.get_or_init(|| format!("billing_test_{}_", crate::test_db::run_id()))
}

/// Drops a test database (ours: it carries this run's prefix), closing
/// whatever still uses it. Best effort and bounded: runs on its own thread and
/// runtime so that it also works from `Drop` while a test panics.
pub fn drop_database(name: &str) {
    if !name.starts_with(run_prefix()) {
        return;
    }
    let name = name.to_owned();
    let dropper = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime to drop the test database");
        runtime.block_on(async {
            let server: PgConnectOptions = server_url().parse().ok()?;
            let dropped = tokio::time::timeout(Duration::from_secs(10), async {
                let mut admin = server.connect().await.ok()?;
                admin
                    .execute(sqlx::AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
                    )))
                    .await
                    .ok()
            })
            .await;
            if !matches!(dropped, Ok(Some(_))) {
                eprintln!("note: could not drop test database {name} (scripts/test.sh drops it at the end of the run)");
            }
            Some(())
        });
    });
    let _ = dropper.join();
}

/// Creates an empty, migrated database with a unique name under this run's
/// prefix and returns its pool. A [`TestApp`] made by `spawn_app*` drops its
/// database when it ends; databases made here for other uses are dropped by
/// scripts/test.sh at the end of the run.
pub async fn fresh_database() -> (PgPool, PgConnectOptions) {
    let (server, name) = crate::test_db::create(run_prefix()).await;
    let options = server.database(&name);
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .after_connect(billing::db::after_connect(&options))
        .connect_with(options.clone())
        .await
        .expect("connect to the test database");
    billing::db::migrate(&pool).await.expect("migrate");
    (pool, options)
}

pub fn test_keys() -> Arc<KeySet> {
    let args = AuthArgs {
        jwt_secret: Some(TEST_SECRET.into()),
        ..Default::default()
    };
    Arc::new(KeySet::load(&args, std::path::Path::new("/nonexistent")).expect("test keys"))
}

#[allow(dead_code)]
pub struct TestApp {
    pub address: SocketAddr,
    pub pool: PgPool,
    pub keys: Arc<KeySet>,
    pub channel: Channel,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    /// The database this app created (`spawn_app*`), dropped when it ends;
    /// `None` for a server on a pool the test owns (replicas share it).
    owned_database: Option<String>,
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(ServerSettings::default()).await
}

pub async fn spawn_app_with(settings: ServerSettings) -> TestApp {
    init_logs();
    let (pool, _) = fresh_database().await;
    spawn_app_on(pool, settings).await.owning_its_database()
}

/// A server on an existing pool (tests that control the database themselves).
pub async fn spawn_app_on(pool: PgPool, settings: ServerSettings) -> TestApp {
    spawn_app_on_with_keys(pool, settings, test_keys()).await
}

/// A server on a fresh database that verifies tokens with `keys` (e.g. RS256).
#[allow(dead_code)]
pub async fn spawn_app_with_keys(keys: Arc<KeySet>) -> TestApp {
    init_logs();
    let (pool, _) = fresh_database().await;
    spawn_app_on_with_keys(pool, ServerSettings::default(), keys)
        .await
        .owning_its_database()
}

/// A server on a fresh database with `settings`, verifying tokens with `keys`.
#[allow(dead_code)]
pub async fn spawn_app_with_settings_and_keys(
    settings: ServerSettings,
    keys: Arc<KeySet>,
) -> TestApp {
    init_logs();
    let (pool, _) = fresh_database().await;
    spawn_app_on_with_keys(pool, settings, keys)
        .await
        .owning_its_database()
}

async fn spawn_app_on_with_keys(
    pool: PgPool,
    settings: ServerSettings,
    keys: Arc<KeySet>,
) -> TestApp {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (shutdown_sender, shutdown_receiver) = oneshot::channel::<()>();
    let server = tokio::spawn(serve(
        listener,
        pool.clone(),
        keys.clone(),
        settings,
        async {
            let _ = shutdown_receiver.await;
        },
    ));
    let channel = Channel::from_shared(format!("http://{address}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .expect("connect to the test server");
    TestApp {
        address,
        pool,
        keys,
        channel,
        shutdown: Some(shutdown_sender),
        server: Some(server),
        owned_database: None,
    }
}

impl TestApp {
    /// Marks the app's database as its own: dropped when the app ends.
    pub fn owning_its_database(mut self) -> Self {
        self.owned_database = self
            .pool
            .connect_options()
            .get_database()
            .map(str::to_owned);
        self
    }

    pub fn token(&self, role: &str, account: Option<&str>) -> String {
        self.keys
            .mint("test", role, account, 600)
            .expect("mint token")
    }

    pub fn service_token(&self) -> String {
        self.token("service", None)
    }

    pub fn balances(&self) -> proto::balances_client::BalancesClient<Channel> {
        proto::balances_client::BalancesClient::new(self.channel.clone())
    }

    /// Creates a USD account through the API and credits `opening` (if not zero).
    pub async fn account_with_balance(&self, account_id: &str, opening: &str) {
        let token = self.service_token();
        self.balances()
            .create_account(authed(
                &token,
                proto::CreateAccountRequest {
                    account_id: account_id.into(),
                    currency: "USD".into(),
                    // ':' may be in an account id, never in an email's local part.
                    billing_email: format!("{}@example.com", account_id.replace(':', ".")),
                    ..Default::default()
                },
            ))
            .await
            .expect("create account");
        if opening != "0" {
            self.balances()
                .credit(authed(
                    &token,
                    proto::CreditRequest {
                        account_id: account_id.into(),
                        amount: opening.into(),
                        kind: proto::TransactionKind::Adjustment as i32,
                        idempotency_key: format!("opening-{account_id}"),
                        ..Default::default()
                    },
                ))
                .await
                .expect("opening credit");
        }
    }

    pub async fn stop(mut self) {
        if let Some(sender) = self.shutdown.take() {
            let _ = sender.send(());
        }
        if let Some(server) = self.server.take() {
            // Bounded: a server that does not drain is a failure of the test.
            tokio::time::timeout(Duration::from_secs(30), server)
                .await
                .expect("the test server stops within 30 s of its shutdown signal")
                .ok();
        }
    }
}

/// Drops the app's own database when the test ends, passed or failed
/// (replicas started on the same pool end before it: they are declared later).
impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(sender) = self.shutdown.take() {
            let _ = sender.send(());
        }
        if let Some(name) = self.owned_database.take() {
            drop_database(&name);
        }
    }
}

/// A request carrying `authorization: Bearer <token>`.
pub fn authed<T>(token: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

/// Counts rows of a table (to prove that a refused request wrote nothing).
pub async fn count_rows(pool: &PgPool, table: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT COUNT(*) FROM {table}")))
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Row counts of every table in schema public, in one round trip: equal
/// before and after a call proves the call wrote nothing.
#[allow(dead_code)]
pub async fn table_counts(pool: &PgPool) -> std::collections::BTreeMap<String, i64> {
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT tablename::text FROM pg_tables WHERE schemaname = 'public' ORDER BY tablename",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let union = tables
        .iter()
        .map(|t| format!("SELECT '{t}'::text, COUNT(*) FROM \"{t}\""))
        .collect::<Vec<_>>()
        .join(" UNION ALL ");
    sqlx::query_as::<_, (String, i64)>(sqlx::AssertSqlSafe(union))
        .fetch_all(pool)
        .await
        .unwrap()
        .into_iter()
        .collect()
}

/// Polls `check` until it returns true; panics with `what` after 20 s.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A real SMTP server (aiosmtpd) in a child process, saving what it receives.
pub struct SmtpSink {
    child: std::process::Child,
    pub port: u16,
    pub folder: tempfile::TempDir,
}

#[derive(Debug, Clone)]
pub struct ReceivedEmail {
    pub envelope_to: String,
    pub subject: String,
    pub message_id: String,
    pub body: String,
}

impl SmtpSink {
    pub fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    pub fn start(port: u16) -> SmtpSink {
        use std::io::BufRead;
        let folder = tempfile::tempdir().unwrap();
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/smtp_sink.py");
        let mut child = std::process::Command::new("python3")
            .arg(script)
            .arg(port.to_string())
            .arg(folder.path())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3 with aiosmtpd (pip install aiosmtpd)");
        let stdout = child.stdout.take().unwrap();
        let (sender, receiver) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = std::io::BufReader::new(stdout).read_line(&mut line);
            let _ = sender.send(line);
        });
        let Ok(ready) = receiver.recv_timeout(Duration::from_secs(30)) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "timed out after 30 s waiting for the SMTP sink (tests/support/smtp_sink.py) to print READY"
            );
        };
        assert_eq!(
            ready.trim(),
            "READY",
            "the SMTP sink did not start (is aiosmtpd installed?)"
        );
        SmtpSink {
            child,
            port,
            folder,
        }
    }

    pub fn messages(&self) -> Vec<ReceivedEmail> {
        let mut names: Vec<_> = std::fs::read_dir(self.folder.path())
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "eml"))
            .collect();
        names.sort();
        names
            .iter()
            .map(|path| {
                let text = std::fs::read_to_string(path).unwrap();
                let (headers, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
                let header = |name: &str| {
                    headers
                        .lines()
                        .find_map(|line| line.strip_prefix(&format!("{name}: ")).map(str::to_owned))
                        .unwrap_or_default()
                };
                ReceivedEmail {
                    envelope_to: header("X-Envelope-To"),
                    subject: header("Subject"),
                    message_id: header("Message-ID"),
                    body: body.replace("=\r\n", "").replace("\r\n", "\n"),
                }
            })
            .collect()
    }

    pub fn mailer(port: u16) -> Arc<dyn billing::notifications::Mailer> {
        Arc::new(
            billing::notifications::SmtpMailer::new(&billing::notifications::SmtpSettings {
                host: "127.0.0.1".into(),
                port,
                security: billing::notifications::SmtpSecurity::None,
                username: None,
                password: None,
                from: "Billing <billing@test.example>".into(),
                timeout: Duration::from_secs(5),
            })
            .unwrap(),
        )
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Server settings with a mailer and fast polling/retries, for mail tests.
pub fn mail_settings(mailer: Arc<dyn billing::notifications::Mailer>) -> ServerSettings {
    ServerSettings {
        mailer: Some(mailer),
        sender: billing::notifications::SenderSettings {
            poll_interval: Duration::from_millis(50),
            retry_schedule: vec![Duration::from_millis(200); 50],
            claim_lease: Duration::from_secs(30),
        },
        ..Default::default()
    }
}
