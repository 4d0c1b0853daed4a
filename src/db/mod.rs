//! Finding Postgres, creating the database, the pool and migrations.
//!
//! The order of the embedded defaults: `DATABASE_URL` if set; else a server
//! on localhost (port configurable); else a private cluster started from the
//! installed Postgres binaries in the data directory (see [`embedded`]).

pub mod embedded;
mod error;

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
        let (server_options, private_cluster, description) = locate_server(args).await?;
        let database_options = match &args.database_url {
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
            .connect_with(database_options.clone())
            .await
            .context("connecting the database pool")?;
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

pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    MIGRATOR
        .run(pool)
        .await
        .context("running database migrations")
}

/// True when the database answers a trivial query.
pub async fn ping(pool: &PgPool) -> bool {
    sqlx::query_scalar::<_, i32>("SELECT 1")
        .fetch_one(pool)
        .await
        .is_ok()
}

async fn locate_server(
    args: &DatabaseArgs,
) -> anyhow::Result<(PgConnectOptions, Option<PrivateCluster>, String)> {
    if let Some(url) = &args.database_url {
        let options =
            PgConnectOptions::from_str(url).context("DATABASE_URL is not a valid Postgres URL")?;
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
    // Connecting to the target database first avoids needing CREATEDB when it exists.
    if tokio::time::timeout(Duration::from_secs(10), options.connect())
        .await
        .is_ok_and(|r| r.is_ok())
    {
        return Ok(());
    }
    let mut maintenance = options
        .clone()
        .database("postgres")
        .connect()
        .await
        .context("connecting to the postgres maintenance database")?;
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
