//! The `billing` command line: wiring only.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;

use billing::config::{Cli, Command, LogFormat};

#[tokio::main]
async fn main() -> ExitCode {
    // Everything this process creates (data directory, development key,
    // outbox .eml files) is private: directories 0700, files 0600.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) if args.check => match billing::server::check(&args) {
            Ok(report) => {
                for line in report {
                    println!("{line}");
                }
                println!("configuration OK");
                ExitCode::SUCCESS
            }
            Err(error) => fatal(args.log_format, "configuration invalid", &error),
        },
        Command::Serve(args) => {
            let format = args.log_format;
            let telemetry = billing::telemetry::init(format);
            let result = billing::server::run(*args).await;
            // Exporting the last spans blocks: off the runtime's worker threads.
            let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
            finish(format, "billing serve failed", result)
        }
        Command::Migrate(args) => {
            let format = args.log_format;
            let telemetry = billing::telemetry::init(format);
            let result = async {
                let database = billing::db::Database::open(&args.database).await?;
                let migrated = billing::db::migrate(&database.pool).await;
                database.close().await;
                migrated?;
                tracing::info!("migrations applied");
                anyhow::Ok(())
            }
            .await;
            let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
            finish(format, "billing migrate failed", result)
        }
        Command::Token(args) => {
            let result = (|| {
                let keys = billing::auth::KeySet::load(&args.auth, &args.data_dir)
                    .context("loading the signing key")?;
                let token = keys.mint(
                    &args.subject,
                    &args.role,
                    args.account.as_deref(),
                    args.ttl_seconds,
                )?;
                println!("{token}");
                anyhow::Ok(())
            })();
            finish(LogFormat::Text, "billing token failed", result)
        }
        Command::Bench(args) => finish(
            LogFormat::Text,
            "billing bench failed",
            billing::bench::run(*args).await,
        ),
    }
}

fn finish(format: LogFormat, what: &str, result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => fatal(format, what, &error),
    }
}

/// Reports a fatal error as one line: the cause chain, never a backtrace
/// (even with RUST_BACKTRACE=1); a JSON object when logs are JSON.
fn fatal(format: LogFormat, what: &str, error: &anyhow::Error) -> ExitCode {
    let chain = format!("{error:#}");
    match format {
        LogFormat::Json => {
            let line = serde_json::json!({
                "timestamp": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                "level": "ERROR",
                "target": "billing",
                "message": what,
                "error": chain,
            });
            println!("{line}");
        }
        LogFormat::Text => eprintln!("Error: {chain}"),
    }
    ExitCode::FAILURE
}
