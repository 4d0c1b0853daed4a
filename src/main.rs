//! The `billing` command line: wiring only.

use anyhow::Context;
use clap::Parser;

use billing::config::{Cli, Command};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            billing::telemetry::init(args.log_format);
            billing::server::run(*args).await
        }
        Command::Migrate(args) => {
            billing::telemetry::init(billing::config::LogFormat::Text);
            let database = billing::db::Database::open(&args.database).await?;
            billing::db::migrate(&database.pool).await?;
            tracing::info!("migrations applied");
            database.close().await;
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
