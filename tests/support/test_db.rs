//! Test databases, one implementation for the `api` and `cli` test binaries
//! (each includes this file with `#[path]`): fresh, empty databases on the
//! test server, named under this run's prefix so that scripts/test.sh drops
//! them when the run ends.

use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Executor};

/// The test server: `TEST_DATABASE_URL`, else the local default.
pub fn server_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// This run's id: `BILLING_TEST_RUN` (set by scripts/test.sh for the whole
/// run) or `<unix seconds>_<pid>`. It starts with the time it was made, so a
/// clean-up can tell a day-old leftover from a database some concurrent run
/// is still using.
pub fn run_id() -> &'static str {
    static RUN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    RUN.get_or_init(|| {
        let valid = |run: &str| {
            run.len() <= 32
                && run.bytes().take(10).all(|b| b.is_ascii_digit())
                && run
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        };
        match std::env::var("BILLING_TEST_RUN") {
            Ok(run) if valid(&run) => run,
            _ => {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .expect("the clock is after 1970")
                    .as_secs();
                format!("{now}_{}", std::process::id())
            }
        }
    })
}

/// Creates an empty database named `<prefix><12 hex digits>` on the test
/// server; returns the server's options and the new name. Panics when the
/// server cannot be reached (a test cannot run without it).
pub async fn create(prefix: &str) -> (PgConnectOptions, String) {
    let server: PgConnectOptions = server_url()
        .parse()
        .expect("TEST_DATABASE_URL is a postgres URL");
    let unique = uuid::Uuid::new_v4().simple().to_string();
    let name = format!("{prefix}{}", &unique[..12]);
    let mut admin = server
        .connect()
        .await
        .expect("connect to the test Postgres server");
    admin
        .execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .await
        .expect("create test database");
    (server, name)
}
