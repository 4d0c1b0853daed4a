//! Every setting: its flag, its environment variable and its default.
//! `serve`, `migrate` and `token` share the database and key settings.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use rust_decimal::Decimal;

pub use crate::notifications::SmtpSecurity;

#[derive(Debug, Parser)]
#[command(
    name = "billing",
    version,
    about = "Prepaid billing over gRPC: balances, cards, auto top-up, alerts"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gRPC server (migrates the database first unless `--migrate=false`).
    Serve(Box<ServeArgs>),
    /// Apply database migrations and exit.
    Migrate(MigrateArgs),
    /// Mint a bearer token with the configured (or development) key.
    Token(Box<TokenArgs>),
    /// Load and latency scenarios against a running server (see BENCHMARKS.md).
    Bench(Box<crate::bench::BenchArgs>),
}

#[derive(Debug, Clone, Args)]
pub struct DatabaseArgs {
    /// Postgres URL. When unset: a server on localhost, else a private cluster in the data directory.
    /// TLS: `?sslmode=require` (encrypt), `verify-ca`/`verify-full` with `&sslrootcert=/path/ca.pem`.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// File holding the Postgres URL (e.g. a mounted Kubernetes Secret); DATABASE_URL wins when both are set.
    #[arg(long, env = "DATABASE_URL_FILE")]
    pub database_url_file: Option<PathBuf>,
    /// Port of the local Postgres server tried when DATABASE_URL is unset.
    #[arg(long, env = "BILLING_LOCAL_PG_PORT", default_value_t = 5432)]
    pub local_pg_port: u16,
    /// Database created and used on the local server or the private cluster.
    #[arg(long, env = "BILLING_DATABASE_NAME", default_value = "billing")]
    pub database_name: String,
    /// Where the private Postgres cluster, the development JWT key and .eml files live.
    #[arg(long, env = "BILLING_DATA_DIR", default_value = "billing-data")]
    pub data_dir: PathBuf,
    /// Directory of the Postgres server binaries (initdb, pg_ctl) for the private cluster; found automatically when unset.
    #[arg(long, env = "BILLING_PG_BINARIES")]
    pub pg_binaries: Option<PathBuf>,
    /// Largest number of pooled database connections.
    #[arg(long, env = "BILLING_DB_MAX_CONNECTIONS", default_value_t = 16)]
    pub db_max_connections: u32,
}

impl DatabaseArgs {
    /// The configured Postgres URL: `DATABASE_URL`, else the contents of `DATABASE_URL_FILE`.
    pub fn url(&self) -> anyhow::Result<Option<String>> {
        match (&self.database_url, &self.database_url_file) {
            (Some(url), _) => Ok(Some(url.clone())),
            (None, Some(path)) => read_secret_file(path, "DATABASE_URL_FILE").map(Some),
            (None, None) => Ok(None),
        }
    }
}

/// A secret from a file (trailing newline trimmed); the error names the file and the setting.
pub fn read_secret_file(path: &std::path::Path, setting: &str) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("reading {setting} {}: {e}", path.display()))?;
    let text = text.trim_end_matches(['\n', '\r']).to_owned();
    anyhow::ensure!(!text.is_empty(), "{setting} {} is empty", path.display());
    Ok(text)
}

/// How bearer tokens are verified: static keys (an HS256 secret, or PEM
/// public keys), an identity provider's JWKS, or both; and how the claims of
/// a verified token become a caller (see README "Identity providers").
#[derive(Debug, Clone, Args)]
pub struct AuthArgs {
    /// HS256 shared secret for bearer tokens.
    #[arg(long, env = "BILLING_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// File holding the HS256 shared secret (re-read when it changes).
    #[arg(long, env = "BILLING_JWT_SECRET_FILE")]
    pub jwt_secret_file: Option<PathBuf>,
    /// PEM public key (RS256, ES256 or EdDSA) that verifies tokens, or a directory of `*.pem`
    /// keys; repeat (or comma-separate) to accept several keys, e.g. the old and the new one
    /// during a rotation. Re-read when the files change, without a restart.
    #[arg(long, env = "BILLING_JWT_PUBLIC_KEY_FILE", value_delimiter = ',')]
    pub jwt_public_key_file: Vec<PathBuf>,
    /// PEM private key matching a public key; only `billing token` uses it.
    #[arg(long, env = "BILLING_JWT_PRIVATE_KEY_FILE")]
    pub jwt_private_key_file: Option<PathBuf>,
    /// Required `iss` claim, when set (also the OIDC issuer of --jwt-oidc-discovery).
    #[arg(long, env = "BILLING_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// Required audience, when set: the token's `aud` (a string, or an array) must contain it.
    #[arg(long, env = "BILLING_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// URL of the identity provider's JWK set (RS256, ES256 and EdDSA keys, chosen by `kid`).
    #[arg(long, env = "BILLING_JWT_JWKS_URL")]
    pub jwt_jwks_url: Option<String>,
    /// Find the JWK set's URL (`jwks_uri`) in `<--jwt-issuer>/.well-known/openid-configuration`.
    #[arg(
        long,
        env = "BILLING_JWT_OIDC_DISCOVERY",
        conflicts_with = "jwt_jwks_url",
        requires = "jwt_issuer"
    )]
    pub jwt_oidc_discovery: bool,
    /// Seconds between scheduled refreshes of the JWK set.
    #[arg(long, env = "BILLING_JWT_JWKS_REFRESH_SECS", default_value_t = 300)]
    pub jwt_jwks_refresh_secs: u64,
    /// Least seconds between two refreshes caused by a token whose `kid` is not in the set
    /// (a token with an unknown `kid` never causes more fetches than this allows).
    #[arg(long, env = "BILLING_JWT_JWKS_MIN_REFRESH_SECS", default_value_t = 30)]
    pub jwt_jwks_min_refresh_secs: u64,
    /// Seconds between checks of the key files (--jwt-public-key-file, --jwt-secret-file) for changes.
    #[arg(long, env = "BILLING_JWT_KEY_RELOAD_SECS", default_value_t = 10)]
    pub jwt_key_reload_secs: u64,
    /// Claim(s) holding the caller's roles: a name or a dotted path (`realm_access.roles`),
    /// an array of strings or a space-separated string (`scope`); comma-separate several.
    #[arg(
        long,
        env = "BILLING_JWT_ROLES_CLAIM",
        value_delimiter = ',',
        default_value = "roles"
    )]
    pub jwt_roles_claim: Vec<String>,
    /// Provider role names to billing roles, `NAME=ROLE,…` (e.g. `billing-admin=admin,svc=service`).
    /// When set, only mapped names grant a role; unset, names are billing's own.
    #[arg(long, env = "BILLING_JWT_ROLE_MAP", value_delimiter = ',', value_parser = crate::auth::RoleMapping::parse)]
    pub jwt_role_map: Vec<crate::auth::RoleMapping>,
    /// Claim holding the one account a token may reach: a name or a dotted path.
    #[arg(long, env = "BILLING_JWT_ACCOUNT_CLAIM", default_value = "account")]
    pub jwt_account_claim: String,
}

impl Default for AuthArgs {
    /// No key configured (the development key) and every other setting at its default.
    fn default() -> Self {
        Self {
            jwt_secret: None,
            jwt_secret_file: None,
            jwt_public_key_file: Vec::new(),
            jwt_private_key_file: None,
            jwt_issuer: None,
            jwt_audience: None,
            jwt_jwks_url: None,
            jwt_oidc_discovery: false,
            jwt_jwks_refresh_secs: 300,
            jwt_jwks_min_refresh_secs: 30,
            jwt_key_reload_secs: 10,
            jwt_roles_claim: vec!["roles".into()],
            jwt_role_map: Vec::new(),
            jwt_account_claim: "account".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address the gRPC server listens on.
    #[arg(long, env = "BILLING_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// Validate the whole configuration (flags, environment, `_FILE`s, key files) and exit 0
    /// without connecting anywhere.
    #[arg(long)]
    pub check: bool,
    /// Apply database migrations before serving; `false` when a separate `billing migrate` does it
    /// (the Helm chart), so the runtime role needs no DDL rights.
    #[arg(long, env = "BILLING_MIGRATE", default_value_t = true, action = clap::ArgAction::Set)]
    pub migrate: bool,
    /// PEM certificate chain for gRPC over TLS (with --tls-key-file); unset serves plaintext.
    /// Read at start-up: restart the process to load a renewed certificate.
    #[arg(long, env = "BILLING_TLS_CERT_FILE", requires = "tls_key_file")]
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of the gRPC TLS certificate.
    #[arg(long, env = "BILLING_TLS_KEY_FILE", requires = "tls_cert_file")]
    pub tls_key_file: Option<PathBuf>,
    #[command(flatten)]
    pub database: DatabaseArgs,
    #[command(flatten)]
    pub auth: AuthArgs,
    #[command(flatten)]
    pub mail: MailArgs,
    #[command(flatten)]
    pub policy: PolicyArgs,
    #[command(flatten)]
    pub gateway: GatewayArgs,
    /// Longest a unary RPC may run (milliseconds); a shorter grpc-timeout wins.
    #[arg(long, env = "BILLING_REQUEST_TIMEOUT_MS", default_value_t = 10_000)]
    pub request_timeout_ms: u64,
    /// RPCs in flight at once; beyond it calls are refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "BILLING_CONCURRENCY_LIMIT", default_value_t = 512)]
    pub concurrency_limit: usize,
    /// How often the database is pinged for the health status (milliseconds).
    #[arg(long, env = "BILLING_HEALTH_INTERVAL_MS", default_value_t = 1_000)]
    pub health_interval_ms: u64,
    /// After SIGTERM/SIGINT, how long in-flight RPCs and streams may take to finish (milliseconds).
    #[arg(long, env = "BILLING_SHUTDOWN_GRACE_MS", default_value_t = 10_000)]
    pub shutdown_grace_ms: u64,
    /// Most waiting debits committed in one transaction (group commit); 1 turns it off.
    #[arg(long, env = "BILLING_DEBIT_BATCH_MAX", default_value_t = 128)]
    pub debit_batch_max: usize,
    /// Most accounts whose debits share one transaction; 1 keeps each
    /// transaction to one account (group commit per account only).
    #[arg(long, env = "BILLING_DEBIT_BATCH_ACCOUNTS", default_value_t = 128)]
    pub debit_batch_accounts: usize,
    /// Most debit transactions of this replica in flight at once (each holds a pooled connection).
    #[arg(long, env = "BILLING_DEBIT_BATCH_IN_FLIGHT", default_value_t = 4)]
    pub debit_batch_in_flight: usize,
    /// While one debit batch is forming (taken, locked, written; not yet
    /// committing), how long the next waits before starting beside it
    /// (milliseconds). Debits arriving meanwhile join the next batch
    /// together (the batch pipeline, BENCHMARKS.md); 0 turns it off: every
    /// free debit starts a batch at once.
    #[arg(long, env = "BILLING_DEBIT_BATCH_PATIENCE_MS", default_value_t = 5)]
    pub debit_batch_patience_ms: u64,
    /// Log format (the container image and the Helm chart set json).
    #[arg(long, env = "BILLING_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Address of the HTTP server for Prometheus `/metrics`.
    #[arg(long, env = "BILLING_METRICS_LISTEN", default_value = "127.0.0.1:9090")]
    pub metrics_listen: SocketAddr,
    /// Address of the HTTP server for the payment gateway's webhook (`POST /stripe/webhook`);
    /// bound only with `--gateway stripe` and a webhook secret. Separate from metrics.
    #[arg(long, env = "BILLING_WEBHOOK_LISTEN", default_value = "127.0.0.1:8080")]
    pub webhook_listen: SocketAddr,
    /// Largest gRPC message accepted or sent (bytes); larger requests are refused.
    #[arg(long, env = "BILLING_MAX_MESSAGE_BYTES", default_value_t = 1024 * 1024)]
    pub max_message_bytes: usize,
    /// Largest HTTP/2 header list (metadata) a request may carry (bytes).
    #[arg(long, env = "BILLING_MAX_HEADER_LIST_BYTES", default_value_t = 16 * 1024)]
    pub max_header_list_bytes: u32,
    /// HTTP/2 keep-alive ping interval (seconds); keeps long streams alive through proxies.
    #[arg(long, env = "BILLING_KEEPALIVE_INTERVAL_SECS", default_value_t = 30)]
    pub keepalive_interval_secs: u64,
    /// How long a keep-alive ping may go unanswered before the connection is closed (seconds).
    #[arg(long, env = "BILLING_KEEPALIVE_TIMEOUT_SECS", default_value_t = 10)]
    pub keepalive_timeout_secs: u64,
    /// How long a new connection may take to send its opening bytes (the HTTP/2 preface or
    /// the TLS hello) and, with TLS, to finish the handshake (milliseconds); then it is closed.
    #[arg(long, env = "BILLING_HANDSHAKE_TIMEOUT_MS", default_value_t = 10_000)]
    pub handshake_timeout_ms: u64,
    /// Open gRPC connections, all peers; at the cap the oldest connection that has sent
    /// nothing yet is closed to make room, else the new one is refused.
    #[arg(long, env = "BILLING_MAX_CONNECTIONS", default_value_t = 1024)]
    pub max_connections: usize,
    /// Open gRPC connections of one peer IP address; beyond it new ones are closed at once.
    #[arg(long, env = "BILLING_MAX_CONNECTIONS_PER_PEER", default_value_t = 256)]
    pub max_connections_per_peer: usize,
    /// HTTP/2 streams (calls) open at once on one connection (SETTINGS_MAX_CONCURRENT_STREAMS).
    #[arg(long, env = "BILLING_MAX_CONCURRENT_STREAMS", default_value_t = 200)]
    pub max_concurrent_streams: u32,
    /// Open WatchBalanceEvents streams of one caller (token subject and watched account)
    /// on this replica; beyond it RESOURCE_EXHAUSTED.
    #[arg(long, env = "BILLING_STREAMS_PER_CALLER", default_value_t = 50)]
    pub streams_per_caller: usize,
    /// Open WatchBalanceEvents streams on this replica, all callers; beyond it RESOURCE_EXHAUSTED.
    #[arg(long, env = "BILLING_STREAMS_PER_REPLICA", default_value_t = 10_000)]
    pub streams_per_replica: usize,
    /// SendTestNotification calls per account per hour on this replica (a token bucket of this size).
    #[arg(long, env = "BILLING_TEST_NOTIFICATIONS_PER_HOUR", default_value_t = 5)]
    pub test_notifications_per_hour: u32,
    /// UpdateNotificationSettings calls per account per hour on this replica (a token bucket of this size).
    #[arg(
        long,
        env = "BILLING_NOTIFICATION_SETTINGS_CHANGES_PER_HOUR",
        default_value_t = 30
    )]
    pub notification_settings_changes_per_hour: u32,
    /// Seconds a bearer token is still accepted after its `exp` (clock skew); streams end then.
    #[arg(long, env = "BILLING_JWT_LEEWAY_SECS", default_value_t = crate::auth::DEFAULT_LEEWAY_SECS)]
    pub jwt_leeway_secs: u64,
}

impl ServeArgs {
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.shutdown_grace_ms)
    }

    pub fn health_interval(&self) -> Duration {
        Duration::from_millis(self.health_interval_ms.max(50))
    }
}

#[derive(Debug, Clone, Args)]
pub struct PolicyArgs {
    /// Smallest refill amount "Apply Changes" accepts in USD and EUR (> 0;
    /// other currencies: --refill-bounds).
    #[arg(long, env = "BILLING_REFILL_MIN", default_value = "30.00", value_parser = parse_money)]
    pub refill_min: Decimal,
    /// Largest refill amount "Apply Changes" accepts in USD and EUR (and the
    /// largest single automatic charge).
    #[arg(long, env = "BILLING_REFILL_MAX", default_value = "10000.00", value_parser = parse_money)]
    pub refill_max: Decimal,
    /// Refill bounds of other currencies, over the built-in defaults (about
    /// 30–10,000 USD each, e.g. JPY 3000..1500000): `CUR=MIN..MAX,…`.
    #[arg(long, env = "BILLING_REFILL_BOUNDS", default_value = "", value_parser = crate::topup::parse_refill_bounds)]
    pub refill_bounds: crate::topup::RefillBounds,
    /// Times the gateway is asked about a charge whose outcome is unknown
    /// before the top-up becomes NEEDS_ATTENTION (an ERROR, and the account's
    /// charges stay blocked until an operator resolves it).
    #[arg(long, env = "BILLING_TOP_UP_RECONCILE_MAX_TRIES", default_value_t = 20)]
    pub top_up_reconcile_max_tries: i32,
    /// Seconds a top-up waits for the customer's 3-D Secure (ConfirmTopUp)
    /// before it ends FAILED with authentication_expired.
    #[arg(
        long,
        env = "BILLING_TOP_UP_ACTION_EXPIRY_SECS",
        default_value_t = 86_400
    )]
    pub top_up_action_expiry_secs: u32,
    /// The user panel's address (https://…); "action needed" emails link to
    /// it with `?top_up_id=<id>`, where the customer finishes 3-D Secure.
    #[arg(long, env = "BILLING_PANEL_URL")]
    pub panel_url: Option<String>,
    /// Default cap on automatic top-ups per rolling 24 hours (per account, changeable in the settings).
    #[arg(long, env = "BILLING_MAX_TOP_UPS_PER_DAY", default_value_t = 10)]
    pub max_top_ups_per_day: i32,
    /// Default cap on the amount charged automatically per rolling 24 hours; unset = none.
    #[arg(long, env = "BILLING_MAX_TOP_UP_AMOUNT_PER_DAY", value_parser = parse_money)]
    pub max_top_up_amount_per_day: Option<Decimal>,
    /// Seconds before each retry round of a top-up whose every method failed (the last repeats).
    #[arg(
        long,
        env = "BILLING_TOP_UP_RETRY_SECS",
        value_delimiter = ',',
        default_value = "3600,21600,86400"
    )]
    pub top_up_retry_secs: Vec<u64>,
    /// Rounds (over every method) per low-balance crossing before giving up.
    #[arg(long, env = "BILLING_TOP_UP_MAX_ATTEMPTS", default_value_t = 5)]
    pub top_up_max_attempts: i32,
    /// Seconds before asking the gateway about a charge whose outcome is unknown.
    #[arg(long, env = "BILLING_TOP_UP_RECONCILE_SECS", default_value_t = 30)]
    pub top_up_reconcile_secs: u32,
    /// Seconds a replica may drive a top-up before another may take over (longer than the gateway timeout).
    #[arg(long, env = "BILLING_TOP_UP_LEASE_SECS", default_value_t = 90)]
    pub top_up_lease_secs: u32,
    /// Seconds after which an unfinished Add Funds/retry (the process driving it died) is reconciled at the gateway.
    #[arg(long, env = "BILLING_TOP_UP_ABANDONED_SECS", default_value_t = 600)]
    pub top_up_abandoned_secs: u32,
    /// Run the balance-policy decisions and the top-up engine in this process.
    #[arg(long, env = "BILLING_ENGINES", default_value_t = true, action = clap::ArgAction::Set)]
    pub engines: bool,
}

impl PolicyArgs {
    /// The engine's rules; errors name the setting at fault.
    pub fn config(&self) -> anyhow::Result<crate::topup::PolicyConfig> {
        let mut refill_bounds = self.refill_bounds.clone();
        for code in ["USD", "EUR"] {
            let currency = crate::money::Currency::parse(code).map_err(anyhow::Error::msg)?;
            refill_bounds
                .set(currency, self.refill_min, self.refill_max)
                .map_err(|e| anyhow::anyhow!("--refill-min/--refill-max: {e}"))?;
        }
        Ok(crate::topup::PolicyConfig {
            refill_bounds,
            default_max_top_ups_per_day: self.max_top_ups_per_day.max(1),
            default_max_amount_per_day: self.max_top_up_amount_per_day,
            retry_backoff: self
                .top_up_retry_secs
                .iter()
                .map(|secs| {
                    chrono::Duration::seconds(i64::try_from(*secs).unwrap_or(i64::MAX / 1000))
                })
                .collect(),
            max_rounds: self.top_up_max_attempts.max(1),
            reconcile_after: chrono::Duration::seconds(i64::from(
                self.top_up_reconcile_secs.max(1),
            )),
            lease: chrono::Duration::seconds(i64::from(self.top_up_lease_secs.max(1))),
            abandoned_after: chrono::Duration::seconds(i64::from(
                self.top_up_abandoned_secs.max(1),
            )),
            reconcile_max_tries: self.top_up_reconcile_max_tries.max(1),
            action_expiry: chrono::Duration::seconds(i64::from(
                self.top_up_action_expiry_secs.max(1),
            )),
            panel_url: self.panel_url.clone().filter(|url| !url.is_empty()),
        })
    }
}

fn parse_money(text: &str) -> Result<Decimal, String> {
    crate::money::parse_positive_amount(text, 2).map_err(|e| format!("amount {e}"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum GatewayKind {
    /// The built-in card-processor simulator (test cards only).
    Sandbox,
    /// Stripe's API: real cards (or Stripe's test mode with sk_test_ keys).
    Stripe,
}

#[derive(Debug, Clone, Args)]
pub struct GatewayArgs {
    /// The payment gateway: sandbox (simulated) or stripe.
    #[arg(long = "gateway", env = "BILLING_GATEWAY", value_enum, default_value_t = GatewayKind::Sandbox)]
    pub kind: GatewayKind,
    /// Stripe secret key (sk_test_… / sk_live_… or a restricted rk_… key).
    #[arg(long, env = "BILLING_STRIPE_SECRET_KEY", hide_env_values = true)]
    pub stripe_secret_key: Option<crate::gateway::stripe::SecretKey>,
    /// File holding the Stripe secret key (e.g. a mounted Kubernetes Secret).
    #[arg(long, env = "BILLING_STRIPE_SECRET_KEY_FILE")]
    pub stripe_secret_key_file: Option<PathBuf>,
    /// Signing secret (whsec_…) of the Stripe webhook endpoint.
    #[arg(long, env = "BILLING_STRIPE_WEBHOOK_SECRET", hide_env_values = true)]
    pub stripe_webhook_secret: Option<crate::gateway::stripe::signature::WebhookSecret>,
    /// File holding the webhook signing secret.
    #[arg(long, env = "BILLING_STRIPE_WEBHOOK_SECRET_FILE")]
    pub stripe_webhook_secret_file: Option<PathBuf>,
    /// Stripe's API base URL (a test server's in tests).
    #[arg(long, env = "BILLING_STRIPE_API_BASE", default_value = crate::gateway::stripe::DEFAULT_API_BASE)]
    pub stripe_api_base: String,
    /// Longest wait for one Stripe call (milliseconds); past it a charge's outcome is unknown and reconciled.
    #[arg(long, env = "BILLING_STRIPE_TIMEOUT_MS", default_value_t = 30_000)]
    pub stripe_timeout_ms: u64,
    /// Where Stripe sends the customer back after a 3-D Secure redirect (the panel's page).
    #[arg(long, env = "BILLING_STRIPE_RETURN_URL")]
    pub stripe_return_url: Option<String>,
}

impl GatewayArgs {
    /// The Stripe settings; an error naming the missing setting when there is no key.
    pub fn stripe_settings(&self) -> anyhow::Result<crate::gateway::StripeSettings> {
        use crate::gateway::stripe::SecretKey;
        use anyhow::Context;
        let key = match (&self.stripe_secret_key, &self.stripe_secret_key_file) {
            (Some(key), _) => key.clone(),
            (None, Some(path)) => {
                SecretKey::new(std::fs::read_to_string(path).with_context(|| {
                    format!("reading the stripe secret key from {}", path.display())
                })?)
            }
            (None, None) => anyhow::bail!(
                "--gateway stripe needs a secret key: set BILLING_STRIPE_SECRET_KEY or BILLING_STRIPE_SECRET_KEY_FILE"
            ),
        };
        Ok(crate::gateway::StripeSettings {
            api_base: self.stripe_api_base.clone(),
            secret_key: key,
            timeout: Duration::from_millis(self.stripe_timeout_ms.max(1)),
            return_url: self.stripe_return_url.clone(),
        })
    }

    /// The webhook signing secret, when configured.
    pub fn webhook_secret(
        &self,
    ) -> anyhow::Result<Option<crate::gateway::stripe::signature::WebhookSecret>> {
        use anyhow::Context;
        Ok(
            match (
                &self.stripe_webhook_secret,
                &self.stripe_webhook_secret_file,
            ) {
                (Some(secret), _) => Some(secret.clone()),
                (None, Some(path)) => Some(crate::gateway::stripe::signature::WebhookSecret::new(
                    std::fs::read_to_string(path).with_context(|| {
                        format!("reading the stripe webhook secret from {}", path.display())
                    })?,
                )),
                (None, None) => None,
            },
        )
    }
}

#[derive(Debug, Clone, Args)]
pub struct MailArgs {
    /// SMTP server; unset writes every email as an .eml file in <data-dir>/outbox.
    #[arg(long, env = "BILLING_SMTP_HOST")]
    pub smtp_host: Option<String>,
    #[arg(long, env = "BILLING_SMTP_PORT", default_value_t = 587)]
    pub smtp_port: u16,
    /// none, starttls or tls.
    #[arg(long, env = "BILLING_SMTP_SECURITY", value_enum, default_value_t = SmtpSecurity::Starttls)]
    pub smtp_security: SmtpSecurity,
    #[arg(long, env = "BILLING_SMTP_USERNAME")]
    pub smtp_username: Option<String>,
    #[arg(long, env = "BILLING_SMTP_PASSWORD", hide_env_values = true)]
    pub smtp_password: Option<String>,
    /// File holding the SMTP password (e.g. a mounted Kubernetes Secret).
    #[arg(long, env = "BILLING_SMTP_PASSWORD_FILE")]
    pub smtp_password_file: Option<PathBuf>,
    /// The From: address of every email.
    #[arg(
        long,
        env = "BILLING_MAIL_FROM",
        default_value = "Billing <billing@localhost>"
    )]
    pub mail_from: String,
    /// Seconds to wait before each retry of an undelivered email; after the last, it is marked failed.
    #[arg(
        long,
        env = "BILLING_MAIL_RETRY_SECS",
        value_delimiter = ',',
        default_value = "30,120,600,3600,21600"
    )]
    pub mail_retry_secs: Vec<u64>,
    /// Seconds a claimed email is reserved for the replica sending it (longer than the SMTP timeout of 30 s).
    #[arg(long, env = "BILLING_MAIL_CLAIM_SECS", default_value_t = 120)]
    pub mail_claim_secs: u32,
    /// How often each replica looks for due emails (milliseconds).
    #[arg(long, env = "BILLING_OUTBOX_POLL_MS", default_value_t = 500)]
    pub outbox_poll_ms: u64,
}

impl MailArgs {
    /// The SMTP password: `BILLING_SMTP_PASSWORD`, else the contents of `BILLING_SMTP_PASSWORD_FILE`.
    pub fn password(&self) -> anyhow::Result<Option<String>> {
        match (&self.smtp_password, &self.smtp_password_file) {
            (Some(password), _) => Ok(Some(password.clone())),
            (None, Some(path)) => read_secret_file(path, "BILLING_SMTP_PASSWORD_FILE").map(Some),
            (None, None) => Ok(None),
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct MigrateArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// Log format.
    #[arg(long, env = "BILLING_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Args)]
pub struct TokenArgs {
    /// admin, commercial, billing, viewer or service.
    #[arg(long, default_value = "service")]
    pub role: String,
    /// The one account the token may reach: required for every role but service; a service
    /// token with an account reaches only that account, without one it reaches every account.
    #[arg(long)]
    pub account: Option<String>,
    /// The `sub` claim: who is calling.
    #[arg(long, default_value = "cli")]
    pub subject: String,
    /// Lifetime in seconds, at least 1.
    #[arg(long, default_value_t = 3600, value_parser = clap::value_parser!(u64).range(1..))]
    pub ttl_seconds: u64,
    /// Where the development key lives when no key is configured.
    #[arg(long, env = "BILLING_DATA_DIR", default_value = "billing-data")]
    pub data_dir: PathBuf,
    #[command(flatten)]
    pub auth: AuthArgs,
}
