//! The `billing` command line: wiring only.

use anyhow::Context;
use clap::Parser;

use billing::config::{Cli, Command};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            let telemetry = billing::telemetry::init(args.log_format);
            let result = billing::server::run(*args).await;
            // Exporting the last spans blocks: off the runtime's worker threads.
            let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
            result
        }
        Command::Migrate(args) => {
            let telemetry = billing::telemetry::init(args.log_format);
            let database = billing::db::Database::open(&args.database).await?;
            billing::db::migrate(&database.pool).await?;
            tracing::info!("migrations applied");
            database.close().await;
            let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
            Ok(())
        }
        Command::Token(args) => {
            let keys = billing::auth::KeySet::load(&args.auth, &args.data_dir)
                .context("loading the signing key")?;
            let token = keys.mint(
                &args.subject,
                &args.role,
                args.account.as_deref(),
                args.ttl_seconds,
            )?;
            println!("{token}");
            Ok(())
        }
        Command::Bench(args) => billing::bench::run(*args).await,
    }
}
