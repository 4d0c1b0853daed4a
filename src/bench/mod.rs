//! `billing bench`: load and latency scenarios against a running server,
//! through real gRPC (the same path clients take).
//!
//! `debit-spread` and `debit-hot` run closed-loop callers (or paced ones with
//! `--rate`); `noop` calls `grpc.health.v1.Health/Check` (the transport and
//! middleware, no database); `events`, `idle-streams` and `top-up-reaction`
//! measure the event stream and the top-up engine; `stream-flood` what one
//! tenant's idle streams cost another tenant's debits. Latencies are kept in an
//! HDR histogram in microseconds.

mod flood;
mod load;
mod overload;
mod report;
mod streams;
mod topup;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, ValueEnum};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Channel, Endpoint};

use crate::auth::KeySet;
use crate::config::AuthArgs;
pub use report::Report;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// Debits spread over `--accounts` accounts (created and funded first if missing).
    DebitSpread,
    /// Debits on one account.
    DebitHot,
    /// `grpc.health.v1.Health/Check`: the no-op unary RPC, the transport's limit.
    Noop,
    /// Commit → subscriber latency of `WatchBalanceEvents` while debits run.
    Events,
    /// Holds `--streams` idle `WatchBalanceEvents` streams; reports the server's RSS.
    IdleStreams,
    /// Low-balance crossing event → the top-up's first gateway attempt.
    TopUpReaction,
    /// Far more callers than the server admits: shed vs admitted, memory, recovery.
    Overload,
    /// Another tenant's debit latency without, then with `--streams` idle streams of one tenant.
    StreamFlood,
}

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    #[arg(value_enum)]
    pub scenario: Scenario,
    /// The running server.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    pub target: String,
    /// Bearer token (service role); minted from the key settings when unset.
    #[arg(long, env = "BILLING_BENCH_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Concurrent callers.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Seconds of measurement (after the warm-up).
    #[arg(long, default_value_t = 10)]
    pub duration_secs: u64,
    /// Seconds of load before measuring.
    #[arg(long, default_value_t = 2)]
    pub warmup_secs: u64,
    /// Accounts of `debit-spread`.
    #[arg(long, default_value_t = 10_000)]
    pub accounts: usize,
    /// Total calls per second, paced over the callers (their first calls spread evenly over one period, so arrivals are evenly spaced); unset = as fast as possible.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Amount of each debit.
    #[arg(long, default_value = "0.01")]
    pub amount: String,
    /// HTTP/2 connections the callers share.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Streams of `idle-streams` and `stream-flood`.
    #[arg(long, default_value_t = 10_000)]
    pub streams: usize,
    /// Streams one viewer token may hold in `stream-flood` (the server's
    /// `BILLING_STREAMS_PER_CALLER`): the flood uses as many subjects as it needs.
    #[arg(long, default_value_t = 50)]
    pub streams_per_caller: usize,
    /// Server process whose RSS is read from /proc/<pid>/status.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Crossings measured by `top-up-reaction`.
    #[arg(long, default_value_t = 30)]
    pub samples: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Where the development key lives when no key is configured.
    #[arg(long, env = "BILLING_DATA_DIR", default_value = "billing-data")]
    pub data_dir: PathBuf,
    #[command(flatten)]
    pub auth: AuthArgs,
}

/// What every scenario gets: channels, the service token, a way to mint account tokens.
pub(crate) struct Bench {
    pub args: BenchArgs,
    pub channels: Vec<Channel>,
    pub token: MetadataValue<Ascii>,
    keys: Option<KeySet>,
    /// Unique per run: idempotency keys and fresh account names.
    pub run_id: String,
}

impl Bench {
    pub fn channel(&self, worker: usize) -> Channel {
        self.channels[worker % self.channels.len()].clone()
    }

    pub fn request<T>(&self, message: T) -> tonic::Request<T> {
        with_token(&self.token, message)
    }

    /// An admin token for one account (card and settings RPCs need one).
    pub fn account_token(&self, account_id: &str) -> anyhow::Result<MetadataValue<Ascii>> {
        let keys = self.keys.as_ref().context(
            "this scenario mints account tokens: configure the signing key, not --token",
        )?;
        let token = keys.mint("bench", "admin", Some(account_id), 3600)?;
        Ok(format!("Bearer {token}").parse()?)
    }

    /// A viewer token of `account_id` for the caller `subject`.
    pub fn viewer_token(
        &self,
        account_id: &str,
        subject: &str,
    ) -> anyhow::Result<MetadataValue<Ascii>> {
        let keys = self.keys.as_ref().context(
            "this scenario mints account tokens: configure the signing key, not --token",
        )?;
        let token = keys.mint(subject, "viewer", Some(account_id), 3600)?;
        Ok(format!("Bearer {token}").parse()?)
    }
}

pub(crate) fn with_token<T>(token: &MetadataValue<Ascii>, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", token.clone());
    request
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let keys = KeySet::load(&args.auth, &args.data_dir).ok();
    let token = match (&args.token, &keys) {
        (Some(token), _) => token.clone(),
        (None, Some(keys)) => keys.mint("bench", "service", None, 3600)?,
        (None, None) => anyhow::bail!("no --token and no signing key to mint one"),
    };
    let connections = match args.scenario {
        // hyper serves a bounded number of streams per connection.
        Scenario::IdleStreams => args.streams.div_ceil(100).max(1),
        _ => args.connections.max(1),
    };
    let mut channels = Vec::with_capacity(connections);
    for _ in 0..connections {
        let channel = Endpoint::from_shared(args.target.clone())?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .connect()
            .await
            .with_context(|| format!("connecting to {}", args.target))?;
        channels.push(channel);
    }
    let bench = Bench {
        token: format!("Bearer {token}").parse()?,
        channels,
        keys,
        run_id: uuid::Uuid::new_v4().simple().to_string()[..12].to_owned(),
        args,
    };
    let report = match bench.args.scenario {
        Scenario::DebitSpread | Scenario::DebitHot | Scenario::Noop => load::run(&bench).await?,
        Scenario::Events => streams::events(&bench).await?,
        Scenario::IdleStreams => streams::idle(&bench).await?,
        Scenario::TopUpReaction => topup::reaction(&bench).await?,
        Scenario::Overload => overload::run(&bench).await?,
        Scenario::StreamFlood => flood::run(&bench).await?,
    };
    if bench.args.json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.to_text());
    }
    Ok(())
}

/// Resident memory of a process, from /proc/<pid>/status (kibibytes).
pub(crate) fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
}
