//! Finding Postgres, creating the database, the pool and migrations.
//!
//! The order of the embedded defaults: `DATABASE_URL` if set; else a server
//! on localhost (port configurable); else a private cluster started from the
//! installed Postgres binaries in the data directory (see [`embedded`]).

pub mod embedded;
mod error;
pub mod nodelay;

use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, bail};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgPool};

use crate::config::DatabaseArgs;
pub use embedded::PrivateCluster;

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The pool, and the private cluster when this process started one.
pub struct Database {
    pub pool: PgPool,
    pub connect_options: PgConnectOptions,
    pub private_cluster: Option<PrivateCluster>,
    /// Where the data is, for the start-up log line.
    pub description: String,
}

impl Database {
    pub async fn open(args: &DatabaseArgs) -> anyhow::Result<Database> {
        let url = args.url()?;
        let (server_options, private_cluster, description) =
            locate_server(args, url.as_deref()).await?;
        let database_options = match &url {
            Some(_) => server_options.clone(),
            None => server_options.clone().database(&args.database_name),
        };
        create_database_if_missing(&database_options).await?;
        let pool = PgPoolOptions::new()
            .max_connections(args.db_max_connections.max(2))
            .acquire_timeout(Duration::from_secs(5))
            // No ping before each checkout: a round trip per transaction; a dead
            // connection fails its statement instead and is dropped.
            .test_before_acquire(false)
            .after_connect(after_connect(&database_options))
            .connect_with(database_options.clone())
            .await
            .map_err(|error| connect_error(&database_options, error))?;
        Ok(Database {
            pool,
            connect_options: database_options,
            private_cluster,
            description,
        })
    }

    /// Closes the pool, then stops the private cluster if this process started it.
    pub async fn close(self) {
        self.pool.close().await;
        if let Some(cluster) = self.private_cluster {
            cluster.stop();
        }
    }
}

/// What the pool does with each new connection: `TCP_NODELAY` on TCP
/// connections (see [`nodelay`]; a unix socket has no Nagle delay).
#[allow(clippy::type_complexity)]
pub fn after_connect(
    options: &PgConnectOptions,
) -> impl Fn(
    &mut sqlx::PgConnection,
    sqlx::pool::PoolConnectionMetadata,
) -> futures::future::BoxFuture<'_, Result<(), sqlx::Error>>
+ Send
+ Sync
+ 'static {
    let tcp_port = options.get_socket().is_none().then(|| options.get_port());
    move |_connection, _metadata| {
        Box::pin(async move {
            if let Some(port) = tcp_port {
                nodelay::set_on_sockets_to(port);
            }
            Ok(())
        })
    }
}

/// Applies this binary's migrations that the database lacks. Migrations the
/// database has but this binary does not know (a newer version applied them:
/// a rollback) are skipped with a WARN, so an older binary still starts.
pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    warn_about_newer_migrations(pool).await?;
    let mut migrator = sqlx::migrate!("./migrations");
    migrator.set_ignore_missing(true);
    migrator
        .run(pool)
        .await
        .context("running database migrations")
}

/// For `serve --migrate=false`: the database must have every migration this
/// binary knows (newer unknown ones are fine, with a WARN).
pub async fn check_schema(pool: &PgPool) -> anyhow::Result<()> {
    let applied = warn_about_newer_migrations(pool).await?;
    let missing: Vec<String> = MIGRATOR
        .iter()
        .filter(|m| m.migration_type.is_up_migration() && !applied.contains(&m.version))
        .map(|m| format!("{} ({})", m.version, m.description))
        .collect();
    if !missing.is_empty() {
        bail!(
            "the database schema is older than this binary: migration(s) {} not applied; \
             run `billing migrate` (the Helm chart's migration Job) or start with --migrate=true",
            missing.join(", ")
        );
    }
    Ok(())
}

/// The successfully applied migration versions, after a WARN naming the ones this binary does not know.
async fn warn_about_newer_migrations(pool: &PgPool) -> anyhow::Result<Vec<i64>> {
    let table_exists: bool =
        sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
            .fetch_one(pool)
            .await
            .context("reading the applied migrations")?;
    if !table_exists {
        return Ok(Vec::new());
    }
    let applied: Vec<i64> =
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success ORDER BY version")
            .fetch_all(pool)
            .await
            .context("reading the applied migrations")?;
    let unknown: Vec<i64> = applied
        .iter()
        .copied()
        .filter(|version| !MIGRATOR.iter().any(|m| m.version == *version))
        .collect();
    if !unknown.is_empty() {
        tracing::warn!(
            unknown = ?unknown,
            known_up_to = MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0),
            "the database has migrations this binary does not know (applied by a newer version); \
             skipping them and starting anyway"
        );
    }
    Ok(applied)
}

/// A connection failure as one sentence that says what failed: TLS, DNS,
/// refused, authentication, missing database, with the server and sslmode.
pub fn connect_error(options: &PgConnectOptions, error: sqlx::Error) -> anyhow::Error {
    let server = match options.get_socket() {
        Some(socket) => format!("socket {}", socket.display()),
        None => format!("{}:{}", options.get_host(), options.get_port()),
    };
    let database = options.get_database().unwrap_or("postgres");
    let user = options.get_username();
    let ssl_mode = format!("{:?}", options.get_ssl_mode()).to_lowercase();
    let what = match &error {
        sqlx::Error::Tls(cause) => format!(
            "TLS with the Postgres server {server} failed (sslmode={ssl_mode}): {cause}; \
             check sslrootcert (the CA that signed the server certificate) and the host name in the URL"
        ),
        // rustls reports a failed handshake (untrusted or mismatched certificate) as an I/O error.
        sqlx::Error::Io(io) if is_tls_failure(io) => format!(
            "TLS with the Postgres server {server} failed (sslmode={ssl_mode}): {io}; \
             check sslrootcert (the CA that signed the server certificate) and the host name in the URL"
        ),
        sqlx::Error::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
            format!(
                "the Postgres server {server} refused the connection: is it running and listening there?"
            )
        }
        sqlx::Error::Io(io)
            if io.to_string().contains("failed to lookup address")
                || io.to_string().contains("Name or service not known") =>
        {
            format!("the Postgres host in {server} could not be resolved (DNS): {io}")
        }
        sqlx::Error::Io(io) => format!("connecting to the Postgres server {server}: {io}"),
        sqlx::Error::Database(db) => match db.code().as_deref() {
            Some("28P01") | Some("28000") => format!(
                "Postgres at {server} rejected user {user:?} (authentication failed): {}",
                db.message()
            ),
            Some("3D000") => format!(
                "the database {database:?} does not exist on {server} and could not be created: {}",
                db.message()
            ),
            _ => format!(
                "Postgres at {server} refused the connection: {}",
                db.message()
            ),
        },
        sqlx::Error::PoolTimedOut => format!(
            "no connection to the Postgres server {server} within the time limit (unreachable, or every connection attempt failed)"
        ),
        other => {
            format!("connecting to the Postgres server {server} (sslmode={ssl_mode}): {other}")
        }
    };
    anyhow::anyhow!(what)
}

/// True when the database answers a trivial query.
pub async fn ping(pool: &PgPool) -> bool {
    sqlx::query_scalar::<_, i32>("SELECT 1")
        .fetch_one(pool)
        .await
        .is_ok()
}

fn is_tls_failure(error: &std::io::Error) -> bool {
    let text = error.to_string().to_lowercase();
    ["certificate", "tls", "handshake", "alert"]
        .iter()
        .any(|word| text.contains(word))
}

/// The options of a configured `DATABASE_URL`; `sslrootcert` must be a readable file.
pub fn parse_url(url: &str) -> anyhow::Result<PgConnectOptions> {
    let scheme = url.split_once("://").map(|(scheme, _)| scheme);
    if !matches!(scheme, Some("postgres") | Some("postgresql")) {
        bail!(
            "DATABASE_URL is not a valid Postgres URL: it must start with postgres:// or postgresql:// \
             (postgres://user:password@host:5432/db?sslmode=require)"
        );
    }
    // The error of a malformed URL may quote it: never echo the password.
    let options = PgConnectOptions::from_str(url).map_err(|error| {
        anyhow::anyhow!(
            "DATABASE_URL is not a valid Postgres URL (postgres://user:password@host:5432/db?sslmode=require): {}",
            redact(&error.to_string(), url)
        )
    })?;
    if let Some(root_cert) = url::Url::parse(url).ok().and_then(|u| {
        u.query_pairs()
            .find(|(k, _)| k == "sslrootcert" || k == "ssl-root-cert" || k == "ssl-ca")
            .map(|(_, v)| v.into_owned())
    }) {
        std::fs::metadata(&root_cert)
            .map_err(|e| anyhow::anyhow!("sslrootcert {root_cert} of DATABASE_URL: {e}"))?;
    } else if let Ok(root_cert) = std::env::var("PGSSLROOTCERT") {
        std::fs::metadata(&root_cert)
            .map_err(|e| anyhow::anyhow!("PGSSLROOTCERT {root_cert}: {e}"))?;
    }
    Ok(options)
}

fn redact(text: &str, url: &str) -> String {
    match url::Url::parse(url)
        .ok()
        .and_then(|u| u.password().map(str::to_owned))
    {
        Some(password) if !password.is_empty() => text.replace(&password, "***"),
        _ => text.to_owned(),
    }
}

async fn locate_server(
    args: &DatabaseArgs,
    url: Option<&str>,
) -> anyhow::Result<(PgConnectOptions, Option<PrivateCluster>, String)> {
    if let Some(url) = url {
        let options = parse_url(url)?;
        let description = format!(
            "DATABASE_URL (database {:?})",
            options.get_database().unwrap_or("postgres")
        );
        return Ok((options, None, description));
    }
    let local = PgConnectOptions::new()
        .host("localhost")
        .port(args.local_pg_port)
        .username("postgres")
        .database("postgres");
    if answers(&local).await {
        let description = format!(
            "local server localhost:{} (database {:?})",
            args.local_pg_port, args.database_name
        );
        return Ok((local, None, description));
    }
    let Some(binaries) = embedded::find_binaries(args.pg_binaries.as_deref()) else {
        bail!(
            "no PostgreSQL found: set DATABASE_URL, start a server on localhost:{}, or install PostgreSQL \
             (e.g. `apt-get install postgresql`) so billing can start a private one in {}",
            args.local_pg_port,
            args.data_dir.display()
        );
    };
    let cluster = PrivateCluster::start(&binaries, &args.data_dir.join("postgres"))?;
    let options = cluster.connect_options();
    let description = format!(
        "private cluster in {} (database {:?})",
        cluster.data_dir().display(),
        args.database_name
    );
    Ok((options, Some(cluster), description))
}

async fn answers(options: &PgConnectOptions) -> bool {
    let attempt = tokio::time::timeout(Duration::from_secs(3), options.connect()).await;
    match attempt {
        Ok(Ok(connection)) => {
            let _ = connection.close().await;
            true
        }
        _ => false,
    }
}

async fn create_database_if_missing(options: &PgConnectOptions) -> anyhow::Result<()> {
    let name = options.get_database().unwrap_or("postgres").to_owned();
    if name == "postgres" {
        return Ok(());
    }
    // Connecting to the target database first avoids needing CREATEDB when it exists;
    // only "does not exist" (3D000) goes on to create it, every other failure is reported as is.
    match tokio::time::timeout(Duration::from_secs(10), options.connect()).await {
        Ok(Ok(connection)) => {
            let _ = connection.close().await;
            return Ok(());
        }
        Ok(Err(sqlx::Error::Database(db))) if db.code().as_deref() == Some("3D000") => {}
        Ok(Err(error)) => return Err(connect_error(options, error)),
        Err(_) => {
            let server = format!("{}:{}", options.get_host(), options.get_port());
            bail!(
                "the Postgres server {server} did not answer within 10 s (firewall, wrong host or port?)"
            );
        }
    }
    let maintenance_options = options.clone().database("postgres");
    let mut maintenance = maintenance_options.connect().await.map_err(|error| {
        connect_error(&maintenance_options, error).context(format!(
            "database {name:?} does not exist; connecting to the postgres database to create it"
        ))
    })?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(&name)
            .fetch_one(&mut maintenance)
            .await
            .context("looking the database up")?;
    if !exists {
        // The name comes from configuration, not from clients; quoting makes any name safe.
        let quoted = name.replace('"', "\"\"");
        let created = sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{quoted}\"")))
            .execute(&mut maintenance)
            .await;
        // Another replica may have created it at the same moment (42P04 duplicate_database).
        if let Err(error) = created {
            let duplicate = error
                .as_database_error()
                .and_then(|e| e.code())
                .is_some_and(|code| code == "42P04" || code == "23505");
            if !duplicate {
                return Err(error).context(format!("creating database {name:?}"));
            }
        }
        tracing::info!(database = %name, "database created");
    }
    let _ = maintenance.close().await;
    Ok(())
}
