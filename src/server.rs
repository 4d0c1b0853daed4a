//! The gRPC server: router, tower layers (RPC span/log/metrics, deadline,
//! load shedding, a global concurrency limit, auth), message and header
//! size limits, gzip compression, keep-alive, health, reflection, the metrics HTTP server and
//! graceful shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc, watch};
use tonic::transport::Server;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use tower::ServiceBuilder;

use crate::api::{
    AuditApi, BalancePolicyApi, BalancesApi, CallerLimitSettings, CallerLimits, NotificationsApi,
    PaymentMethodsApi,
};
use crate::auth::{AuthLayer, KeySet};
use crate::config::ServeArgs;
use crate::db::{self, Database};
use crate::events::{EventFeed, EventHub, FeedSettings, HubSettings, WatchSettings};
use crate::gateway::{PaymentGateway, SandboxGateway};
use crate::ledger::{BatchSettings, DebitBatcher};
use crate::limits::{DeadlineLayer, LimitExceptHealthLayer};
use crate::notifications::{self, FileMailer, Mailer, SenderSettings, SmtpMailer, SmtpSettings};
use crate::payment_methods::PaymentMethods;
use crate::proto;
use crate::telemetry::rpc_log::RpcLogLayer;
use crate::topup::{
    self, Clock, PolicyConfig, PolicyDecider, SystemClock, TopUpEngine, TopUpReactor, TopUps,
};
use crate::transport::{StreamsPerConnectionLayer, TransportLimits};

/// The liveness health service: SERVING while the process can serve,
/// whatever the database does (the readiness statuses follow the database).
pub const LIVENESS_SERVICE: &str = "liveness";

/// The health-checked service names, besides the overall "", that follow the database.
pub const SERVICE_NAMES: [&str; 5] = [
    "billing.v1.Balances",
    "billing.v1.BalancePolicy",
    "billing.v1.PaymentMethods",
    "billing.v1.Notifications",
    "billing.v1.Audit",
];

/// Every service accepts gzip-compressed requests and compresses its
/// responses with gzip when the client accepts it (`grpc-accept-encoding`).
const GZIP: tonic::codec::CompressionEncoding = tonic::codec::CompressionEncoding::Gzip;

/// The largest request message any billing RPC decodes; larger ones are
/// refused (tonic answers `OUT_OF_RANGE`) before a handler runs.
pub const MAX_REQUEST_MESSAGE_BYTES: usize = 1024 * 1024;
/// The largest HTTP/2 header list (gRPC metadata) a request may carry.
pub const MAX_HEADER_LIST_BYTES: u32 = 16 * 1024;

/// Settings of a running server that tests also choose.
#[derive(Clone)]
pub struct ServerSettings {
    pub request_timeout: Duration,
    pub concurrency_limit: usize,
    pub health_interval: Duration,
    /// `None`: no email sender runs in this process (the outbox still fills).
    pub mailer: Option<Arc<dyn Mailer>>,
    pub sender: SenderSettings,
    /// How the balance event feed follows the database.
    pub events: FeedSettings,
    /// Per-stream buffers of `WatchBalanceEvents`.
    pub watch: WatchSettings,
    /// The shared event reader's batch size and per-stream hand-over buffer.
    pub hub: HubSettings,
    /// Handshake timeout, connection caps, HTTP/2 streams per connection.
    pub transport: TransportLimits,
    /// Streams per caller and per replica; rates of test emails and settings changes.
    pub caller_limits: CallerLimitSettings,
    /// Low-balance settings bounds, top-up retries and caps.
    pub policy: PolicyConfig,
    /// Run the balance-policy decisions and the top-up engine in this process.
    pub engines: bool,
    /// How often the top-up engine looks for due top-ups without being woken.
    pub engine_poll: Duration,
    pub clock: Arc<dyn Clock>,
    /// Largest gRPC message decoded or encoded by every service.
    pub max_message_bytes: usize,
    /// Largest HTTP/2 header list of a request.
    pub max_header_list_bytes: u32,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    /// Where `/metrics` is served over HTTP; `None`: no HTTP server (tests
    /// bind port 0 and pass the listener).
    pub metrics_listener: Option<Arc<std::net::TcpListener>>,
    /// How waiting debits are grouped into transactions (group commit).
    pub debit_batches: BatchSettings,
    /// The payment gateway; `None`: the sandbox simulator on this database.
    pub gateway: Option<Arc<dyn PaymentGateway>>,
    /// Verifies the Stripe webhook (`POST /stripe/webhook`).
    pub stripe_webhook_secret: Option<crate::gateway::stripe::signature::WebhookSecret>,
    /// Where the webhook is served over HTTP; `None`: on the metrics listener.
    pub webhook_listener: Option<Arc<std::net::TcpListener>>,
    /// gRPC over TLS; `None`: plaintext.
    pub tls: Option<tonic::transport::ServerTlsConfig>,
    /// How often the database gauges of `/metrics` are refreshed (a scrape never queries).
    pub metrics_refresh: Duration,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(10),
            concurrency_limit: 512,
            health_interval: Duration::from_secs(1),
            mailer: None,
            sender: SenderSettings::default(),
            events: FeedSettings::default(),
            watch: WatchSettings::default(),
            hub: HubSettings::default(),
            transport: TransportLimits::default(),
            caller_limits: CallerLimitSettings::default(),
            policy: PolicyConfig::default(),
            engines: false,
            engine_poll: Duration::from_millis(250),
            clock: Arc::new(SystemClock),
            max_message_bytes: 1024 * 1024,
            max_header_list_bytes: 16 * 1024,
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
            metrics_listener: None,
            debit_batches: BatchSettings::default(),
            gateway: None,
            stripe_webhook_secret: None,
            webhook_listener: None,
            tls: None,
            metrics_refresh: Duration::from_secs(5),
        }
    }
}

/// `billing serve --check`: every setting parsed and validated (URL,
/// `_FILE`s, key and certificate files, gateway and mail settings), nothing
/// connected, nothing written. Returns the lines to print.
pub fn check(args: &ServeArgs) -> anyhow::Result<Vec<String>> {
    let mut report = Vec::new();
    match args.database.url()? {
        Some(url) => {
            let options = db::parse_url(&url)?;
            let ssl_mode = format!("{:?}", options.get_ssl_mode()).to_lowercase();
            report.push(format!(
                "database: {}:{} database {:?} user {:?} sslmode={ssl_mode}",
                options.get_host(),
                options.get_port(),
                options.get_database().unwrap_or("postgres"),
                options.get_username(),
            ));
        }
        None => report.push(format!(
            "database: none configured (DATABASE_URL unset): localhost:{} or a private cluster in {}",
            args.database.local_pg_port,
            args.database.data_dir.display()
        )),
    }
    let auth = &args.auth;
    if !auth.jwt_public_key_file.is_empty()
        || auth.jwt_secret.is_some()
        || auth.jwt_secret_file.is_some()
        || auth.jwt_jwks_url.is_some()
        || auth.jwt_oidc_discovery
    {
        // Keys in files are read; a JWK set is fetched only by `serve`.
        let keys = KeySet::load(auth, &args.database.data_dir)
            .context("loading the JWT verification key")?;
        report.push(format!("jwt: {}", keys.describe()));
    } else {
        report.push(
            "jwt: none configured: a development key would be used (not for production)".into(),
        );
    }
    let _ = args.mail.password()?;
    if let Some(host) = &args.mail.smtp_host {
        build_mailer(args)?;
        report.push(format!(
            "mail: smtp {host}:{} ({:?})",
            args.mail.smtp_port, args.mail.smtp_security
        ));
    } else {
        report.push(format!(
            "mail: no SMTP host: emails are written to {}",
            args.database.data_dir.join("outbox").display()
        ));
    }
    match args.gateway.kind {
        crate::config::GatewayKind::Sandbox => report.push("gateway: sandbox".into()),
        crate::config::GatewayKind::Stripe => {
            let settings = args.gateway.stripe_settings()?;
            let webhook = args.gateway.webhook_secret()?;
            report.push(format!(
                "gateway: stripe ({} mode), webhook {}",
                if settings.secret_key.is_test_mode() {
                    "test"
                } else {
                    "live"
                },
                match webhook {
                    Some(_) => format!("on {}", args.webhook_listen),
                    None => "off (no webhook secret)".into(),
                }
            ));
        }
    }
    if load_tls(args)?.is_some() {
        report.push("grpc: TLS".into());
    }
    report.push(format!(
        "listen: gRPC {}, metrics {}; migrations: {}",
        args.listen,
        args.metrics_listen,
        if args.migrate {
            "applied at start"
        } else {
            "left to `billing migrate`"
        }
    ));
    Ok(report)
}

/// The gRPC TLS configuration from the certificate and key files, if set.
fn load_tls(args: &ServeArgs) -> anyhow::Result<Option<tonic::transport::ServerTlsConfig>> {
    let (Some(cert), Some(key)) = (&args.tls_cert_file, &args.tls_key_file) else {
        return Ok(None);
    };
    let cert_pem = std::fs::read(cert).with_context(|| {
        format!(
            "reading the TLS certificate {} (--tls-cert-file)",
            cert.display()
        )
    })?;
    let key_pem = std::fs::read(key)
        .with_context(|| format!("reading the TLS key {} (--tls-key-file)", key.display()))?;
    anyhow::ensure!(
        String::from_utf8_lossy(&cert_pem).contains("BEGIN CERTIFICATE"),
        "{} (--tls-cert-file) holds no PEM certificate",
        cert.display()
    );
    anyhow::ensure!(
        String::from_utf8_lossy(&key_pem).contains("PRIVATE KEY"),
        "{} (--tls-key-file) holds no PEM private key",
        key.display()
    );
    let identity = tonic::transport::Identity::from_pem(cert_pem, key_pem);
    Ok(Some(
        tonic::transport::ServerTlsConfig::new().identity(identity),
    ))
}

/// Binds (reserves) `address` without listening yet, so a port in use is
/// reported at once while connections are accepted only once serving; a
/// failure names the flag and the variable that change it.
fn bind(
    address: SocketAddr,
    what: &str,
    flag: &str,
    env: &str,
) -> anyhow::Result<tokio::net::TcpSocket> {
    let bound = (|| {
        let socket = if address.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.bind(address)?;
        std::io::Result::Ok(socket)
    })();
    bound.map_err(|error| {
        let hint = if what == "gRPC" {
            " (the metrics port is set by --metrics-listen / BILLING_METRICS_LISTEN)"
        } else {
            ""
        };
        if error.kind() == std::io::ErrorKind::AddrInUse {
            anyhow::anyhow!(
                "{address} ({what}) is already in use by another process: choose another address with {flag} or {env}{hint}"
            )
        } else {
            anyhow::anyhow!("cannot listen on {address} ({what}): {error}; choose another address with {flag} or {env}{hint}")
        }
    })
}

/// The data directory: created 0700, an existing one tightened to 0700 (it holds keys and emails).
fn prepare_data_dir(path: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .with_context(|| {
            format!(
                "creating the data directory {} (--data-dir, BILLING_DATA_DIR)",
                path.display()
            )
        })?;
    let metadata = std::fs::metadata(path)?;
    // 0710 with the postgres group is the private cluster's doing (root only).
    if metadata.uid() == nix::unistd::Uid::effective().as_raw()
        && metadata.mode() & 0o067 != 0
        && metadata.mode() & 0o7777 != 0o710
    {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("chmod 0700 {}", path.display()))?;
        tracing::info!(data_dir = %path.display(), "data directory made private (0700)");
    }
    Ok(())
}

/// `billing serve`: find or start Postgres, migrate, serve until SIGINT/SIGTERM.
pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let signalled = shutdown_signal();
    prepare_data_dir(&args.database.data_dir)?;
    // The ports first: one in use is reported at once, naming the setting to change.
    let listener = bind(args.listen, "gRPC", "--listen", "BILLING_LISTEN")?;
    let metrics_socket = bind(
        args.metrics_listen,
        "metrics",
        "--metrics-listen",
        "BILLING_METRICS_LISTEN",
    )?;
    let webhook_secret = args.gateway.webhook_secret()?;
    let webhook_socket = match (args.gateway.kind, &webhook_secret) {
        (crate::config::GatewayKind::Stripe, Some(_)) => Some(bind(
            args.webhook_listen,
            "webhook",
            "--webhook-listen",
            "BILLING_WEBHOOK_LISTEN",
        )?),
        _ => None,
    };
    let tls = load_tls(&args)?;
    let database = Database::open(&args.database).await?;
    if args.migrate {
        db::migrate(&database.pool).await?;
    } else {
        db::check_schema(&database.pool).await?;
    }
    tracing::info!(database = %database.description, migrated = args.migrate, "database ready");
    let keys = Arc::new(
        KeySet::load(&args.auth, &args.database.data_dir)?.with_leeway_secs(args.jwt_leeway_secs),
    );
    tracing::info!(keys = %keys.describe(), "bearer tokens verified with");
    if let Some(path) = &keys.development_key {
        tracing::warn!(
            key = %path.display(),
            "no JWT key configured: using a development key; mint a token with `billing token --role service` \
             (or `--role admin --account <id>`)"
        );
    }
    // Connections are accepted from here on.
    let listener = listener.listen(1024).context("listening for gRPC")?;
    let metrics_listener = metrics_socket
        .listen(1024)
        .and_then(|listener| listener.into_std())
        .context("listening for metrics")?;
    let webhook_listener = match webhook_socket {
        Some(socket) => Some(Arc::new(
            socket
                .listen(1024)
                .and_then(|listener| listener.into_std())
                .context("listening for the webhook")?,
        )),
        None => None,
    };
    tracing::info!(address = %metrics_listener.local_addr()?, "metrics served over HTTP at /metrics");
    if let Some(webhook) = &webhook_listener {
        tracing::info!(address = %webhook.local_addr()?, "stripe webhook served over HTTP at /stripe/webhook");
    }
    let mailer = build_mailer(&args)?;
    tracing::info!(mail = %mailer.describe(), "emails go to");
    let settings = ServerSettings {
        request_timeout: args.request_timeout(),
        concurrency_limit: args.concurrency_limit,
        health_interval: args.health_interval(),
        mailer: Some(mailer),
        sender: SenderSettings {
            poll_interval: Duration::from_millis(args.mail.outbox_poll_ms.max(10)),
            retry_schedule: args
                .mail
                .mail_retry_secs
                .iter()
                .copied()
                .map(Duration::from_secs)
                .collect(),
            claim_lease: Duration::from_secs(u64::from(args.mail.mail_claim_secs.max(1))),
        },
        policy: args.policy.config()?,
        engines: args.policy.engines,
        max_message_bytes: args.max_message_bytes,
        max_header_list_bytes: args.max_header_list_bytes,
        keepalive_interval: Duration::from_secs(args.keepalive_interval_secs.max(1)),
        keepalive_timeout: Duration::from_secs(args.keepalive_timeout_secs.max(1)),
        metrics_listener: Some(Arc::new(metrics_listener)),
        debit_batches: BatchSettings {
            max_debits: args.debit_batch_max,
            max_accounts: args.debit_batch_accounts,
            max_in_flight: args.debit_batch_in_flight,
            forming_patience: Duration::from_millis(args.debit_batch_patience_ms),
        },
        gateway: build_gateway(&args, &database.pool)?,
        stripe_webhook_secret: webhook_secret,
        webhook_listener,
        tls,
        transport: TransportLimits {
            handshake_timeout: Duration::from_millis(args.handshake_timeout_ms.max(1)),
            max_connections: args.max_connections.max(1),
            max_connections_per_peer: args.max_connections_per_peer.max(1),
            max_concurrent_streams: args.max_concurrent_streams.max(1),
        },
        caller_limits: CallerLimitSettings {
            streams_per_caller: args.streams_per_caller.max(1),
            streams_per_replica: args.streams_per_replica.max(1),
            test_notifications_per_hour: args.test_notifications_per_hour.max(1),
            settings_changes_per_hour: args.notification_settings_changes_per_hour.max(1),
        },
        ..ServerSettings::default()
    };
    warn_if_descriptors_short(settings.transport.max_connections);
    let (stop_sender, stop_receiver) = watch::channel(false);
    tokio::spawn(async move {
        signalled.await;
        let _ = stop_sender.send(true);
    });
    let mut drain_deadline = stop_receiver.clone();
    let grace = args.shutdown_grace();
    let mut stop = stop_receiver;
    let stopped = async move {
        let _ = stop.wait_for(|stop| *stop).await;
    };
    let result = tokio::select! {
        result = serve(listener, database.pool.clone(), keys, settings, stopped) => result,
        _ = async {
            let _ = drain_deadline.wait_for(|stop| *stop).await;
            tokio::time::sleep(grace).await;
        } => {
            tracing::warn!(grace_ms = grace.as_millis() as u64, "in-flight requests did not finish in time; closing them");
            Ok(())
        }
    };
    database.close().await;
    tracing::info!("billing stopped");
    result
}

/// `None` for the sandbox (built in `serve`); the Stripe gateway when configured.
fn build_gateway(
    args: &ServeArgs,
    pool: &PgPool,
) -> anyhow::Result<Option<Arc<dyn PaymentGateway>>> {
    match args.gateway.kind {
        crate::config::GatewayKind::Sandbox => Ok(None),
        crate::config::GatewayKind::Stripe => {
            let settings = args.gateway.stripe_settings()?;
            let mode = if settings.secret_key.is_test_mode() {
                "test"
            } else {
                "live"
            };
            tracing::info!(api = %settings.api_base, mode, "payment gateway: stripe");
            if args.gateway.webhook_secret()?.is_none() {
                tracing::warn!(
                    "BILLING_STRIPE_WEBHOOK_SECRET is not set: stripe webhooks cannot be verified"
                );
            }
            Ok(Some(Arc::new(crate::gateway::StripeGateway::new(
                pool.clone(),
                settings,
            )?)))
        }
    }
}

fn build_mailer(args: &ServeArgs) -> anyhow::Result<Arc<dyn Mailer>> {
    let mail = &args.mail;
    Ok(match &mail.smtp_host {
        Some(host) => Arc::new(SmtpMailer::new(&SmtpSettings {
            host: host.clone(),
            port: mail.smtp_port,
            security: mail.smtp_security,
            username: mail.smtp_username.clone(),
            password: mail.password()?,
            from: mail.mail_from.clone(),
            timeout: Duration::from_secs(30),
        })?),
        None => Arc::new(FileMailer::new(
            args.database.data_dir.join("outbox"),
            &mail.mail_from,
        )?),
    })
}

/// Serves on `listener` until `shutdown` completes, then drains in-flight RPCs.
pub async fn serve(
    listener: TcpListener,
    pool: PgPool,
    keys: Arc<KeySet>,
    settings: ServerSettings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    let (stop_sender, stop_receiver) = watch::channel(false);
    // Liveness: this process answers; it does not follow the database.
    health_reporter
        .set_service_status(LIVENESS_SERVICE, ServingStatus::Serving)
        .await;
    // The first status is known before the first call can ask for it.
    let first_status = check_database(&pool, settings.health_interval).await;
    report_status(&health_reporter, first_status).await;
    let address = listener
        .local_addr()
        .context("the gRPC listener's address")?;
    let health_task = tokio::spawn(watch_database_health(
        pool.clone(),
        health_reporter,
        first_status,
        settings.health_interval,
        stop_receiver.clone(),
    ));

    let sender_task = settings.mailer.clone().map(|mailer| {
        tokio::spawn(notifications::run_sender(
            pool.clone(),
            mailer,
            settings.sender.clone(),
            stop_receiver.clone(),
        ))
    });
    // One feed per process, and one shared reader on it that every stream of this server follows.
    let feed = EventFeed::start(pool.clone(), settings.events.clone());
    let hub = EventHub::start(&feed, settings.hub.clone());
    let caller_limits = CallerLimits::new(&settings.caller_limits);

    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        // google.rpc error details, so reflection clients (grpcurl) decode them.
        .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("building reflection v1")?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        // google.rpc error details, so reflection clients (grpcurl) decode them.
        .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .context("building reflection v1alpha")?;

    // The sandbox simulator (its state in this database) unless another
    // gateway is given; every call to it timed and traced.
    let gateway = crate::telemetry::gateway::InstrumentedGateway::wrap(
        settings
            .gateway
            .clone()
            .unwrap_or_else(|| Arc::new(SandboxGateway::new(pool.clone()))),
    );
    let wake_engine = Arc::new(Notify::new());
    // The payment gateway's webhook (Stripe): on its own listener, else on the metrics one.
    let webhook = match (&settings.stripe_webhook_secret, &settings.gateway) {
        (Some(secret), Some(_)) => Some(crate::gateway::stripe::webhook::webhook_router(
            crate::gateway::stripe::webhook::WebhookState::new(
                pool.clone(),
                gateway.clone(),
                secret.clone(),
                settings.policy.clone(),
                settings.clock.clone(),
                wake_engine.clone(),
            ),
        )),
        _ => None,
    };
    let (webhook_on_metrics, webhook_task) = match (&settings.webhook_listener, webhook) {
        (Some(listener), Some(router)) => (
            None,
            Some(spawn_http_server(listener, router, stop_receiver.clone())?),
        ),
        (_, webhook) => (webhook, None),
    };
    let metrics_task = match &settings.metrics_listener {
        Some(listener) => Some(spawn_http_server(
            listener,
            crate::http::router(pool.clone(), webhook_on_metrics),
            stop_receiver.clone(),
        )?),
        None => None,
    };
    let top_ups = TopUps::new(
        pool.clone(),
        gateway.clone(),
        settings.clock.clone(),
        settings.policy.clone(),
        wake_engine.clone(),
    )
    .with_commit_signal(feed.commits());
    // Group commit; each commit wakes this process's feed in memory.
    let debits =
        DebitBatcher::new(pool.clone(), settings.debit_batches).with_commit_signal(feed.commits());
    // `/metrics` reads the database gauges from this snapshot: a scrape never waits on Postgres.
    let gauges_task = settings.metrics_listener.as_ref().map(|_| {
        tokio::spawn(crate::telemetry::metrics::refresh_database_gauges(
            pool.clone(),
            settings.metrics_refresh,
            stop_receiver.clone(),
        ))
    });
    let engine_tasks = if settings.engines {
        // Top-ups the subscriber starts go straight to the reactor
        // (src/topup/react.rs), not through an engine pass.
        let (started, started_receiver) = mpsc::channel(topup::REACTOR_CHANNEL);
        let decisions = tokio::spawn(topup::run_policy_decisions(
            pool.clone(),
            feed.clone(),
            PolicyDecider {
                config: settings.policy.clone(),
                clock: settings.clock.clone(),
            },
            wake_engine.clone(),
            Some(started),
            stop_receiver.clone(),
        ));
        let reactor = tokio::spawn(
            TopUpReactor::new(top_ups.clone()).run(started_receiver, stop_receiver.clone()),
        );
        let engine = TopUpEngine {
            top_ups: top_ups.clone(),
            poll_interval: settings.engine_poll,
        };
        let stop = stop_receiver.clone();
        let charging = tokio::spawn(async move { engine.run(stop).await });
        vec![decisions, reactor, charging]
    } else {
        Vec::new()
    };
    if gateway.name() == "sandbox" {
        tracing::info!(
            gateway = gateway.name(),
            "payment gateway: sandbox (simulated card processor, test cards only)"
        );
    }

    // The first JWKS fetch happens before serving; then refreshes and key-file reloads.
    let keys_task = keys.start(stop_receiver.clone()).await;
    let layers = ServiceBuilder::new()
        .layer(StreamsPerConnectionLayer::new(
            settings.transport.max_concurrent_streams,
        ))
        .layer(RpcLogLayer)
        .layer(DeadlineLayer::new(settings.request_timeout))
        // Health checks skip the load limits: probes must not fail because of load.
        .layer(LimitExceptHealthLayer::new(settings.concurrency_limit))
        .layer(AuthLayer::new(keys));

    let max_message = settings.max_message_bytes;
    let mut builder = Server::builder();
    if let Some(tls) = settings.tls.clone() {
        builder = builder
            .tls_config(tls.timeout(settings.transport.handshake_timeout))
            .context("the gRPC TLS certificate and key")?;
    }
    if first_status == ServingStatus::Serving {
        tracing::info!(%address, tls = settings.tls.is_some(), "billing serving gRPC");
    } else {
        tracing::warn!(
            %address,
            "billing listening for gRPC, NOT_SERVING until the database answers"
        );
    }
    // The request timeout is enforced by `DeadlineLayer` (answering DEADLINE_EXCEEDED).
    let served = builder
        .http2_keepalive_interval(Some(settings.keepalive_interval))
        .http2_keepalive_timeout(Some(settings.keepalive_timeout))
        .http2_max_header_list_size(settings.max_header_list_bytes)
        .max_concurrent_streams(settings.transport.max_concurrent_streams)
        .layer(layers)
        .add_service(health_service.accept_compressed(GZIP).send_compressed(GZIP))
        .add_service(reflection_v1.accept_compressed(GZIP).send_compressed(GZIP))
        .add_service(
            reflection_v1alpha
                .accept_compressed(GZIP)
                .send_compressed(GZIP),
        )
        .add_service(
            proto::balances_server::BalancesServer::new(BalancesApi::new(
                pool.clone(),
                debits,
                hub.clone(),
                settings.watch.clone(),
                caller_limits.clone(),
            ))
            .max_decoding_message_size(max_message)
            .max_encoding_message_size(max_message)
            .accept_compressed(GZIP)
            .send_compressed(GZIP),
        )
        .add_service(
            proto::balance_policy_server::BalancePolicyServer::new(BalancePolicyApi::new(
                pool.clone(),
                settings.policy.clone(),
                settings.clock.clone(),
                wake_engine.clone(),
            ))
            .max_decoding_message_size(max_message)
            .max_encoding_message_size(max_message)
            .accept_compressed(GZIP)
            .send_compressed(GZIP),
        )
        .add_service(
            proto::payment_methods_server::PaymentMethodsServer::new(PaymentMethodsApi::new(
                PaymentMethods::new(pool.clone(), gateway),
                top_ups.clone(),
            ))
            .max_decoding_message_size(max_message)
            .max_encoding_message_size(max_message)
            .accept_compressed(GZIP)
            .send_compressed(GZIP),
        )
        .add_service(
            proto::notifications_server::NotificationsServer::new(NotificationsApi::new(
                pool.clone(),
                caller_limits.clone(),
            ))
            .max_decoding_message_size(max_message)
            .max_encoding_message_size(max_message)
            .accept_compressed(GZIP)
            .send_compressed(GZIP),
        )
        .add_service(
            proto::audit_server::AuditServer::new(AuditApi::new(pool.clone()))
                .max_decoding_message_size(max_message)
                .max_encoding_message_size(max_message),
        )
        .serve_with_incoming_shutdown(
            crate::transport::incoming(listener, settings.transport.clone()),
            {
                let feed = feed.clone();
                async move {
                    shutdown.await;
                    tracing::info!(
                        "shutting down: ending event streams, draining in-flight requests"
                    );
                    // Streams end (clients resume from their cursor) so the drain can finish.
                    feed.stop();
                }
            },
        )
        .await;
    feed.stop();
    let _ = stop_sender.send(true);
    let _ = health_task.await;
    for task in engine_tasks {
        let _ = task.await;
    }
    if let Some(task) = sender_task {
        let _ = task.await;
    }
    for task in [metrics_task, webhook_task, gauges_task, keys_task]
        .into_iter()
        .flatten()
    {
        let _ = task.await;
    }
    served.context("serving gRPC")
}

/// Serves `router` over HTTP on (a handle of) `listener` until `stop` turns true.
fn spawn_http_server(
    listener: &std::net::TcpListener,
    router: axum::Router,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = listener.try_clone().context("HTTP listener")?;
    listener.set_nonblocking(true).context("HTTP listener")?;
    let listener = TcpListener::from_std(listener).context("HTTP listener")?;
    Ok(tokio::spawn(async move {
        let stopped = async move {
            let _ = stop.wait_for(|stop| *stop).await;
        };
        if let Err(error) = axum::serve(listener, router)
            .with_graceful_shutdown(stopped)
            .await
        {
            tracing::error!(%error, "HTTP server failed");
        }
    }))
}

/// Pings the database every `interval`; the overall and per-service health
/// follows it: `NOT_SERVING` while it is unreachable, `SERVING` once it answers.
async fn watch_database_health(
    pool: PgPool,
    reporter: HealthReporter,
    mut last: ServingStatus,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.changed() => return,
        }
        let status = check_database(&pool, interval).await;
        if status != last {
            report_status(&reporter, status).await;
            last = status;
        }
    }
}

async fn check_database(pool: &PgPool, interval: Duration) -> ServingStatus {
    let reachable = tokio::time::timeout(interval.max(Duration::from_secs(2)), db::ping(pool))
        .await
        .unwrap_or(false);
    if reachable {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    }
}

async fn report_status(reporter: &HealthReporter, status: ServingStatus) {
    if status == ServingStatus::Serving {
        tracing::info!("database reachable: SERVING");
    } else {
        tracing::warn!("database unreachable: NOT_SERVING");
    }
    reporter.set_service_status("", status).await;
    for name in SERVICE_NAMES {
        reporter.set_service_status(name, status).await;
    }
}

/// Warns when the process may run out of file descriptors before it
/// reaches its connection cap (each connection is one descriptor; the
/// database pool, files and listeners need some more).
fn warn_if_descriptors_short(max_connections: usize) {
    const RESERVE: u64 = 256;
    if let Ok((soft, _)) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        && soft < max_connections as u64 + RESERVE
    {
        tracing::warn!(
            descriptor_limit = soft,
            max_connections,
            "the open-file limit is below --max-connections plus {RESERVE}: lower BILLING_MAX_CONNECTIONS or raise the limit (ulimit -n)"
        );
    }
}

/// Registers the SIGINT and SIGTERM handlers now and returns a future that
/// completes on the first of them. Registered before anything else starts,
/// a signal that arrives during start-up (binding, Postgres, migrations) is
/// kept, not fatal: the service finishes starting, then stops cleanly.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send {
    use tokio::signal::unix::{SignalKind, signal};
    let interrupt = signal(SignalKind::interrupt());
    let terminate = signal(SignalKind::terminate());
    async move {
        match (interrupt, terminate) {
            (Ok(mut interrupt), Ok(mut terminate)) => tokio::select! {
                _ = interrupt.recv() => tracing::info!("SIGINT received"),
                _ = terminate.recv() => tracing::info!("SIGTERM received"),
            },
            (Err(error), _) | (_, Err(error)) => {
                tracing::error!(%error, "cannot listen for SIGINT/SIGTERM; stop with SIGKILL");
                std::future::pending::<()>().await;
            }
        }
    }
}
