//! Deployment rules, each proved on the real binary: `serve --check`,
//! secrets kept out of `--help`, `_FILE` settings, private file modes,
//! Postgres over TLS with errors that say what failed, migrations that a
//! rollback survives, `--migrate=false`, and start-up errors that name the
//! setting to change (no stack trace, one JSON line with JSON logs).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use crate::process::{Serve, billing, free_port, fresh_database_url, shared_temp_dir};

const PASSWORD: &str = "S3cretPw-do-not-print";

fn text(output: &Output) -> String {
    format!(
        "status {}\n--- stdout\n{}\n--- stderr\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Runs `billing` with `args`, a clean environment but PATH, and `env`;
/// killed (and failed) after 120 s.
fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = billing();
    command
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    command.args(args);
    for (name, value) in env {
        command.env(name, value);
    }
    let child = command
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn billing");
    let pid = child.id();
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = sender.send(child.wait_with_output());
    });
    match receiver.recv_timeout(Duration::from_secs(120)) {
        Ok(output) => output.unwrap(),
        Err(_) => {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            panic!("billing {args:?} did not finish within 120 s");
        }
    }
}

fn with_password(url: &str) -> String {
    url.replacen(
        "postgres://postgres@",
        &format!("postgres://postgres:{PASSWORD}@"),
        1,
    )
}

fn mode_of(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

#[test]
fn help_never_prints_the_password_of_database_url() {
    for command in [["serve", "--help"], ["migrate", "--help"]] {
        let output = run(
            &command,
            &[
                (
                    "DATABASE_URL",
                    &format!("postgres://billing:{PASSWORD}@db:5432/billing"),
                ),
                ("BILLING_SMTP_PASSWORD", PASSWORD),
            ],
        );
        assert!(output.status.success(), "{}", text(&output));
        assert!(!text(&output).contains(PASSWORD), "{}", text(&output));
        assert!(
            text(&output).contains("DATABASE_URL_FILE"),
            "{}",
            text(&output)
        );
    }
}

#[test]
fn serve_check_validates_the_configuration_without_connecting() {
    let dir = tempfile::tempdir().unwrap();
    let url_file = dir.path().join("database-url");
    std::fs::write(
        &url_file,
        format!("postgres://billing:{PASSWORD}@db.invalid:5432/billing?sslmode=require\n"),
    )
    .unwrap();
    let password_file = dir.path().join("smtp-password");
    std::fs::write(&password_file, "smtp-pw\n").unwrap();
    let data_dir = dir.path().join("data");
    let data_dir = data_dir.to_str().unwrap();
    // A host that does not resolve: --check connects nowhere, so it passes.
    let ok = run(
        &["serve", "--check"],
        &[
            ("DATABASE_URL_FILE", url_file.to_str().unwrap()),
            ("BILLING_SMTP_HOST", "smtp.invalid"),
            (
                "BILLING_SMTP_PASSWORD_FILE",
                password_file.to_str().unwrap(),
            ),
            ("BILLING_JWT_SECRET", crate::process::SECRET),
            ("BILLING_DATA_DIR", data_dir),
        ],
    );
    assert!(ok.status.success(), "{}", text(&ok));
    let stdout = String::from_utf8_lossy(&ok.stdout);
    assert!(stdout.contains("db.invalid:5432"), "{stdout}");
    assert!(stdout.contains("sslmode=require"), "{stdout}");
    assert!(stdout.contains("configuration OK"), "{stdout}");
    assert!(!text(&ok).contains(PASSWORD), "{}", text(&ok));
    assert!(
        !Path::new(data_dir).exists(),
        "--check wrote the data directory"
    );

    // What is wrong is named: a missing Stripe key, an unreadable _FILE, a bad URL.
    let cases: [(&[(&str, &str)], &str); 4] = [
        (
            &[("BILLING_GATEWAY", "stripe")],
            "BILLING_STRIPE_SECRET_KEY",
        ),
        (
            &[("DATABASE_URL_FILE", "/nonexistent/url")],
            "DATABASE_URL_FILE /nonexistent/url",
        ),
        (
            &[("BILLING_SMTP_PASSWORD_FILE", "/nonexistent/pw")],
            "BILLING_SMTP_PASSWORD_FILE /nonexistent/pw",
        ),
        (
            &[("DATABASE_URL", "mysql://nope")],
            "DATABASE_URL is not a valid Postgres URL",
        ),
    ];
    for (env, named) in cases {
        let mut env = env.to_vec();
        env.push(("BILLING_DATA_DIR", data_dir));
        let refused = run(&["serve", "--check"], &env);
        assert!(!refused.status.success(), "{env:?}: {}", text(&refused));
        assert!(
            text(&refused).contains(named),
            "{env:?}: {}",
            text(&refused)
        );
    }
}

#[test]
fn a_port_in_use_names_the_flag_and_variable_and_prints_no_stack_trace() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = taken.local_addr().unwrap().to_string();
    let free = format!("127.0.0.1:{}", free_port());
    let data_dir = dir.path().join("data");
    let data_dir = data_dir.to_str().unwrap();
    for (listen, metrics, named) in [
        (
            taken.as_str(),
            free.as_str(),
            ["--listen", "BILLING_LISTEN", "--metrics-listen"],
        ),
        (
            free.as_str(),
            taken.as_str(),
            [
                "--metrics-listen",
                "BILLING_METRICS_LISTEN",
                "already in use",
            ],
        ),
    ] {
        let output = run(
            &["serve"],
            &[
                ("BILLING_LISTEN", listen),
                ("BILLING_METRICS_LISTEN", metrics),
                ("BILLING_DATA_DIR", data_dir),
                ("RUST_BACKTRACE", "1"),
                ("RUST_LOG", "info"),
            ],
        );
        assert!(!output.status.success(), "{}", text(&output));
        let all = text(&output);
        for name in named {
            assert!(all.contains(name), "{name} not named:\n{all}");
        }
        assert!(all.contains(&taken), "{all}");
        assert!(!all.to_lowercase().contains("backtrace"), "{all}");
        assert!(!all.contains("Caused by"), "{all}");
    }
}

#[test]
fn with_json_logs_a_fatal_error_is_one_json_line() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = taken.local_addr().unwrap().to_string();
    let output = run(
        &["serve"],
        &[
            ("BILLING_LISTEN", &taken),
            ("BILLING_LOG_FORMAT", "json"),
            ("BILLING_DATA_DIR", dir.path().join("d").to_str().unwrap()),
            ("RUST_BACKTRACE", "1"),
        ],
    );
    assert!(!output.status.success(), "{}", text(&output));
    assert!(output.stderr.is_empty(), "{}", text(&output));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|_| panic!("not JSON: {line}")))
        .collect();
    let fatal = lines.last().expect("a fatal line");
    assert_eq!(fatal["level"], "ERROR", "{fatal}");
    assert!(
        fatal["error"].as_str().unwrap().contains("BILLING_LISTEN"),
        "{fatal}"
    );
}

#[test]
fn the_data_directory_is_0700_and_its_files_0600() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let url = runtime.block_on(fresh_database_url());
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("billing-data");
    let log = dir.path().join("serve.log");
    let server = Serve::start(&log, |command| {
        command
            .env("DATABASE_URL", &url)
            .env("BILLING_DATA_DIR", &data_dir)
            .env_remove("BILLING_JWT_SECRET")
            .env_remove("BILLING_SMTP_HOST");
    });
    assert!(server.terminate().success());
    assert_eq!(mode_of(&data_dir), 0o700);
    let mut seen = 0;
    for entry in std::fs::read_dir(&data_dir).unwrap() {
        let path = entry.unwrap().path();
        let expected = if path.is_dir() { 0o700 } else { 0o600 };
        assert_eq!(mode_of(&path), expected, "{}", path.display());
        seen += 1;
    }
    assert!(
        seen >= 2,
        "the development key and the outbox were not created"
    );

    // A data directory left world-readable by an older version is made private.
    std::fs::set_permissions(&data_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let server = Serve::start(&log, |command| {
        command
            .env("DATABASE_URL", &url)
            .env("BILLING_DATA_DIR", &data_dir);
    });
    assert!(server.terminate().success());
    assert_eq!(mode_of(&data_dir), 0o700);
}

/// The number of TLS connections to `database` right now.
async fn tls_connections(database: &str) -> i64 {
    use sqlx::ConnectOptions;
    let server = std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let options: sqlx::postgres::PgConnectOptions = server.parse().unwrap();
    let mut connection = options.connect().await.unwrap();
    sqlx::query_scalar(
        "SELECT COUNT(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
         WHERE a.datname = $1 AND s.ssl",
    )
    .bind(database)
    .fetch_one(&mut connection)
    .await
    .unwrap()
}

#[test]
fn migrate_and_serve_work_over_tls_with_sslmode_require() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let url = runtime.block_on(fresh_database_url());
    let database = url.rsplit('/').next().unwrap().to_owned();
    let tls_url = format!("{url}?sslmode=require");
    let dir = shared_temp_dir();
    let migrated = run(
        &["migrate"],
        &[
            ("DATABASE_URL", &tls_url),
            ("BILLING_DATA_DIR", dir.path().to_str().unwrap()),
        ],
    );
    assert!(migrated.status.success(), "{}", text(&migrated));

    let log = dir.path().join("serve.log");
    let server = Serve::start(&log, |command| {
        command
            .env("DATABASE_URL", &tls_url)
            .env("BILLING_MIGRATE", "false")
            .env("BILLING_JWT_SECRET", crate::process::SECRET)
            .env("BILLING_DATA_DIR", dir.path().join("data"));
    });
    let encrypted = runtime.block_on(tls_connections(&database));
    assert!(encrypted > 0, "no TLS connection from billing serve");
    assert!(server.terminate().success());
}

#[test]
fn a_tls_failure_is_reported_as_tls_with_the_server_and_sslmode() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let url = runtime.block_on(fresh_database_url());
    // The public CA bundle did not sign the local snakeoil certificate.
    let verify =
        format!("{url}?sslmode=verify-full&sslrootcert=/etc/ssl/certs/ca-certificates.crt");
    let dir = tempfile::tempdir().unwrap();
    let output = run(
        &["migrate"],
        &[
            ("DATABASE_URL", &with_password(&verify)),
            ("BILLING_DATA_DIR", dir.path().to_str().unwrap()),
            ("RUST_BACKTRACE", "1"),
        ],
    );
    assert!(!output.status.success(), "{}", text(&output));
    let all = text(&output);
    assert!(all.contains("TLS"), "{all}");
    assert!(
        all.contains("sslmode=verifyfull") || all.contains("sslmode=verify-full"),
        "{all}"
    );
    assert!(all.contains("127.0.0.1:5432"), "{all}");
    assert!(!all.contains(PASSWORD), "{all}");
    assert!(!all.to_lowercase().contains("backtrace"), "{all}");

    // Refused: named as such, not as a "maintenance database" problem.
    let refused = run(
        &["migrate"],
        &[
            (
                "DATABASE_URL",
                &format!("postgres://postgres@127.0.0.1:{}/billing", free_port()),
            ),
            ("BILLING_DATA_DIR", dir.path().to_str().unwrap()),
        ],
    );
    assert!(!refused.status.success());
    assert!(
        text(&refused).contains("refused the connection"),
        "{}",
        text(&refused)
    );
}

#[test]
fn serve_starts_against_a_database_with_an_unknown_newer_migration() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let url = runtime.block_on(fresh_database_url());
    let dir = shared_temp_dir();
    let env = [
        ("DATABASE_URL", url.as_str()),
        ("BILLING_DATA_DIR", dir.path().to_str().unwrap()),
    ];
    assert!(run(&["migrate"], &env).status.success());
    runtime.block_on(async {
        use sqlx::ConnectOptions;
        let options: sqlx::postgres::PgConnectOptions = url.parse().unwrap();
        let mut connection = options.connect().await.unwrap();
        sqlx::query(
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
             VALUES (99990101000000, 'from a newer release', true, '\\x00', 1)",
        )
        .execute(&mut connection)
        .await
        .unwrap();
    });
    // The rollback's pre-upgrade Job (`billing migrate`) and the replicas both start.
    let again = run(&["migrate"], &env);
    assert!(again.status.success(), "{}", text(&again));
    assert!(text(&again).contains("99990101000000"), "{}", text(&again));
    for migrate in ["true", "false"] {
        let log = dir.path().join(format!("serve-{migrate}.log"));
        let server = Serve::start(&log, |command| {
            command
                .env("DATABASE_URL", &url)
                .env("BILLING_MIGRATE", migrate)
                .env("BILLING_JWT_SECRET", crate::process::SECRET)
                .env("BILLING_DATA_DIR", dir.path().join("data"));
        });
        assert!(server.terminate().success());
        let logged = std::fs::read_to_string(&log).unwrap();
        assert!(logged.contains("does not know"), "{logged}");
    }
}

#[test]
fn serve_with_migrate_false_refuses_an_unmigrated_database_naming_billing_migrate() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let url = runtime.block_on(fresh_database_url());
    let dir = tempfile::tempdir().unwrap();
    let output = run(
        &["serve", "--migrate=false"],
        &[
            ("DATABASE_URL", &url),
            ("BILLING_LISTEN", &format!("127.0.0.1:{}", free_port())),
            (
                "BILLING_METRICS_LISTEN",
                &format!("127.0.0.1:{}", free_port()),
            ),
            ("BILLING_DATA_DIR", dir.path().to_str().unwrap()),
        ],
    );
    assert!(!output.status.success(), "{}", text(&output));
    assert!(
        text(&output).contains("billing migrate"),
        "{}",
        text(&output)
    );
    runtime.block_on(async {
        use sqlx::ConnectOptions;
        let options: sqlx::postgres::PgConnectOptions = url.parse().unwrap();
        let mut connection = options.connect().await.unwrap();
        let tables: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM pg_tables WHERE schemaname = 'public'")
                .fetch_one(&mut connection)
                .await
                .unwrap();
        assert_eq!(tables, 0, "--migrate=false changed the schema");
    });
}

#[test]
fn an_embedded_postgres_permission_error_names_the_path_and_the_user() {
    let dir = shared_temp_dir();
    let private = dir.path().join("private");
    std::fs::create_dir(&private).unwrap();
    let root = nix::unistd::Uid::effective().is_root();
    // As root, the cluster runs as `postgres`, which cannot traverse a 0700
    // directory of root's; as anyone else, a directory without write access.
    let mode = if root { 0o700 } else { 0o500 };
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(mode)).unwrap();
    let data_dir = private.join("clone").join("billing-data");
    if !root {
        // Unwritable for us: creating the data directory itself fails.
    }
    let output = run(
        &["migrate"],
        &[
            ("BILLING_DATA_DIR", data_dir.to_str().unwrap()),
            // Nothing listens there: no local server, so the private cluster is tried.
            ("BILLING_LOCAL_PG_PORT", &free_port().to_string()),
            ("RUST_BACKTRACE", "1"),
        ],
    );
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
    assert!(!output.status.success(), "{}", text(&output));
    let all = text(&output);
    assert!(all.contains(private.to_str().unwrap()), "{all}");
    let user = if root {
        "postgres".to_owned()
    } else {
        std::env::var("USER").unwrap_or_default()
    };
    assert!(all.contains(&format!("user {user}")), "{all}");
    assert!(
        all.contains("--data-dir") || all.contains("BILLING_DATA_DIR"),
        "{all}"
    );
    assert!(!all.to_lowercase().contains("backtrace"), "{all}");
}

/// The signal handlers are registered before anything else starts: a
/// SIGTERM that arrives while the service is still starting (here: held in
/// its migration check by a lock the test owns) is kept, and the service
/// stops cleanly once started, instead of dying of the signal.
#[test]
fn a_sigterm_during_start_up_stops_the_service_cleanly() {
    use sqlx::{Connection, Executor};
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let url = runtime.block_on(fresh_database_url());
    let migrated = billing()
        .arg("migrate")
        .env("DATABASE_URL", &url)
        .output()
        .unwrap();
    assert!(migrated.status.success(), "{migrated:?}");
    // Holds the migrations table: the starting server waits on it.
    let mut holder = runtime.block_on(async {
        let mut connection = sqlx::PgConnection::connect(&url).await.unwrap();
        connection.execute("BEGIN").await.unwrap();
        connection
            .execute("LOCK TABLE _sqlx_migrations IN ACCESS EXCLUSIVE MODE")
            .await
            .unwrap();
        connection
    });
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("serve.log");
    let server = Serve::spawn(&log, |command| {
        command
            .env("DATABASE_URL", &url)
            .env("BILLING_JWT_SECRET", crate::process::SECRET);
    });
    // The server starts and is blocked on the lock.
    runtime.block_on(async {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM pg_locks WHERE NOT granted AND relation = '_sqlx_migrations'::regclass",
            )
            .fetch_one(&mut holder)
            .await
            .unwrap();
            if waiting > 0 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the starting server never waited on the migrations table"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let pid = nix::unistd::Pid::from_raw(server.child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    runtime.block_on(async { holder.execute("COMMIT").await.unwrap() });
    let status = server.wait_for_exit();
    assert!(
        status.success(),
        "a SIGTERM during start-up ended the process with {status}:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
}
