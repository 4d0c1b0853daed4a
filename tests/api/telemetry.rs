//! Telemetry: `/metrics` counts RPCs under the `grpc_server_*` names of the
//! gRPC ecosystem, and debits; every gateway charge, the engine's automatic
//! ones included, is timed; a caller's `traceparent` becomes the parent of
//! the exported server span (received over real OTLP/gRPC), with a span
//! per SQL statement (no bound values) and per gateway call, and no card
//! data in any span; the engine's spans link to the calls that caused them;
//! the JSON log lines carry trace_id and span_id.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use billing::proto;
use billing::server::ServerSettings;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::helpers::{authed, eventually, spawn_app_with};
use crate::payment_methods::{add_active_card, add_card_request, card, funds};

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_SPAN_ID: &str = "00f067aa0ba902b7";

fn traced<T>(token: &str, message: T) -> tonic::Request<T> {
    let mut request = authed(token, message);
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{TRACE_ID}-{PARENT_SPAN_ID}-01")
            .parse()
            .unwrap(),
    );
    request
}

/// GET `path` over plain HTTP/1.1; the body.
async fn http_get(address: SocketAddr, path: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_lowercase().contains("content-type: text/plain"),
        "{head}"
    );
    body.to_owned()
}

/// The value of the sample of `name` whose labels include every `labels` pair (0 when absent).
pub(crate) fn sample(metrics: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    metrics
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| {
            line.starts_with(&format!("{name} ")) || line.starts_with(&format!("{name}{{"))
        })
        .filter(|line| {
            labels
                .iter()
                .all(|(key, value)| line.contains(&format!("{key}=\"{value}\"")))
        })
        .map(|line| line.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum()
}

/// A stream's status comes in its trailers when it ends: it was counted
/// `OK` (and logged with a latency of a fraction of a millisecond) as soon
/// as it opened, and never with the code it really ended with.
#[tokio::test]
async fn a_stream_is_counted_once_when_it_ends_with_the_code_it_ended_with() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let metrics_address = listener.local_addr().unwrap();
    let app = spawn_app_with(ServerSettings {
        metrics_listener: Some(Arc::new(listener)),
        ..Default::default()
    })
    .await;
    app.account_with_balance("acme", "10.00").await;
    let watch = [
        ("grpc_type", "server_stream"),
        ("grpc_service", "billing.v1.Balances"),
        ("grpc_method", "WatchBalanceEvents"),
    ];
    let with_code = |code| {
        let mut labels = watch.to_vec();
        labels.push(("grpc_code", code));
        labels
    };
    let before = http_get(metrics_address, "/metrics").await;

    let mut stream = app
        .balances()
        .watch_balance_events(authed(
            &app.service_token(),
            proto::WatchBalanceEventsRequest {
                account_id: "acme".into(),
                after_cursor: 0,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    // The opening credit's event: the stream is open and live.
    assert!(stream.message().await.unwrap().is_some());
    let open = http_get(metrics_address, "/metrics").await;
    assert!(
        sample(&open, "grpc_server_started_total", &watch)
            >= sample(&before, "grpc_server_started_total", &watch) + 1.0
    );
    // Other tests share the registry, but no stream of theirs ends `OK`.
    assert_eq!(
        sample(&open, "grpc_server_handled_total", &with_code("OK")),
        sample(&before, "grpc_server_handled_total", &with_code("OK")),
        "an open stream was counted as handled"
    );

    drop(stream);
    eventually(
        "the stream counted Canceled when its client left",
        || async {
            let after = http_get(metrics_address, "/metrics").await;
            sample(&after, "grpc_server_handled_total", &with_code("Canceled"))
                >= sample(&before, "grpc_server_handled_total", &with_code("Canceled")) + 1.0
        },
    )
    .await;
    let after = http_get(metrics_address, "/metrics").await;
    assert_eq!(
        sample(&after, "grpc_server_handled_total", &with_code("OK")),
        sample(&before, "grpc_server_handled_total", &with_code("OK"))
    );
    app.stop().await;
}

#[tokio::test]
async fn rpc_metrics_use_the_grpc_server_names_by_service_method_and_code_and_debits_are_counted() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let metrics_address = listener.local_addr().unwrap();
    let app = spawn_app_with(ServerSettings {
        metrics_listener: Some(Arc::new(listener)),
        ..Default::default()
    })
    .await;
    app.account_with_balance("acme", "10.00").await;
    let debit_rpc = [
        ("grpc_type", "unary"),
        ("grpc_service", "billing.v1.Balances"),
        ("grpc_method", "Debit"),
    ];
    let with_code = |code| {
        let mut labels = debit_rpc.to_vec();
        labels.push(("grpc_code", code));
        labels
    };
    let (debit_ok, refused) = (with_code("OK"), with_code("FailedPrecondition"));
    let before = http_get(metrics_address, "/metrics").await;

    let token = app.service_token();
    let debit = |key: &str, amount: &str| proto::DebitRequest {
        account_id: "acme".into(),
        amount: amount.into(),
        idempotency_key: key.into(),
        ..Default::default()
    };
    app.balances()
        .debit(authed(&token, debit("m-1", "1.00")))
        .await
        .unwrap();
    let error = app
        .balances()
        .debit(authed(&token, debit("m-2", "999.00")))
        .await
        .unwrap_err();
    assert_eq!(error.code(), tonic::Code::FailedPrecondition);

    let after = http_get(metrics_address, "/metrics").await;
    // Other tests share the process-wide registry: counters only grow.
    let grew = |name: &str, labels: &[(&str, &str)], by: f64| {
        sample(&after, name, labels) >= sample(&before, name, labels) + by
    };
    assert!(grew("grpc_server_started_total", &debit_rpc, 2.0));
    assert!(grew("grpc_server_handled_total", &debit_ok, 1.0));
    assert!(grew("grpc_server_handled_total", &refused, 1.0));
    assert!(grew("grpc_server_handling_seconds_count", &debit_rpc, 2.0));
    assert!(
        after.contains("# TYPE grpc_server_handling_seconds histogram"),
        "{after}"
    );
    assert!(
        sample(&after, "billing_debits_total", &[])
            >= sample(&before, "billing_debits_total", &[]) + 1.0
    );
    for gauge in [
        "billing_outbox_pending",
        "billing_db_pool_connections",
        "billing_db_pool_max_connections",
        "billing_event_streams_open",
    ] {
        assert!(
            after.contains(&format!("\n{gauge}")),
            "{gauge} missing:\n{after}"
        );
    }
    assert!(!after.contains("acme"), "account ids are never labels");
    app.stop().await;
}

#[tokio::test]
async fn every_gateway_charge_is_timed_the_engines_automatic_ones_included() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let metrics_address = listener.local_addr().unwrap();
    let clock = Arc::new(billing::topup::ManualClock::starting_now());
    let app = spawn_app_with(ServerSettings {
        metrics_listener: Some(Arc::new(listener)),
        ..crate::top_ups::engine_settings(clock.clone())
    })
    .await;
    app.account_with_balance("acme", "0").await;
    let admin = app.token("admin", Some("acme"));
    let scenario = crate::top_ups::Scenario {
        app,
        clock,
        admin: admin.clone(),
    };
    let app = &scenario.app;
    add_active_card(app, &admin, "acme", crate::payment_methods::VISA).await;
    let before = http_get(metrics_address, "/metrics").await;

    // A manual charge (Add Funds)…
    crate::payment_methods::client(app)
        .add_funds(authed(&admin, funds("40.00", "", "timed-manual")))
        .await
        .unwrap();
    // …and an automatic one: the engine charges when the balance falls below 10.00.
    crate::top_ups::apply(&scenario, crate::top_ups::settings("10.00", "30.00")).await;
    crate::top_ups::debit(app, "35.00", "below-threshold").await;
    eventually("the automatic top-up succeeds", || async {
        crate::top_ups::top_ups(app, &admin).await.iter().any(|t| {
            t.trigger == proto::TopUpTrigger::Automatic as i32
                && t.status == proto::TopUpStatus::Succeeded as i32
        })
    })
    .await;

    let after = http_get(metrics_address, "/metrics").await;
    let charges = |text: &str| sample(text, "billing_gateway_charge_duration_seconds_count", &[]);
    assert!(
        charges(&after) >= charges(&before) + 2.0,
        "both charges timed: {} then {}",
        charges(&before),
        charges(&after)
    );
    let by_operation = [("operation", "charge"), ("result", "succeeded")];
    let calls = |text: &str| {
        sample(
            text,
            "billing_gateway_request_duration_seconds_count",
            &by_operation,
        )
    };
    assert!(calls(&after) >= calls(&before) + 2.0);
    scenario.app.stop().await;
}

/// An OTLP/gRPC trace receiver keeping every span it is sent.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Span>>>,
    resources: Arc<Mutex<Vec<opentelemetry_proto::tonic::resource::v1::Resource>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for resource in request.into_inner().resource_spans {
            self.resources
                .lock()
                .unwrap()
                .extend(resource.resource.clone());
            for scope in resource.scope_spans {
                spans.extend(scope.spans);
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// The string value of resource attribute `key` of the first export that had it.
fn attribute_of_resource(collector: &Collector, key: &str) -> Option<String> {
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    collector
        .resources
        .lock()
        .unwrap()
        .iter()
        .find_map(|resource| {
            resource
                .attributes
                .iter()
                .find(|kv| kv.key == key)
                .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                    Value::StringValue(text) => Some(text.clone()),
                    _ => None,
                })
        })
}

fn attribute(span: &Span, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .map(|kv| format!("{:?}", kv.value))
}

/// `billing serve` as a child process exporting traces to `collector`.
struct ServeProcess {
    child: std::process::Child,
    address: SocketAddr,
}

impl ServeProcess {
    /// Traces go to `collector` when given; stdout (JSON logs) is captured.
    fn start(database_url: &str, collector: Option<SocketAddr>) -> ServeProcess {
        let free = || {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
        };
        let (address, metrics) = (free(), free());
        let data_dir = tempfile::tempdir().unwrap();
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_billing"));
        if let Some(collector) = collector {
            command.env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{collector}"));
        }
        let child = command
            .arg("serve")
            .env("DATABASE_URL", database_url)
            .env("BILLING_JWT_SECRET", crate::helpers::TEST_SECRET)
            .env("BILLING_LISTEN", address.to_string())
            .env("BILLING_METRICS_LISTEN", metrics.to_string())
            .env("BILLING_DATA_DIR", data_dir.keep())
            .env("BILLING_LOG_FORMAT", "json")
            .env("OTEL_SERVICE_NAME", "billing-under-test")
            .env_remove("RUST_LOG")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("start billing serve");
        ServeProcess { child, address }
    }

    /// SIGTERM, then waits for a clean exit (which flushes the spans); its stdout.
    fn terminate(self) -> String {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let output = self.child.wait_with_output().unwrap();
        assert!(
            output.status.success(),
            "billing serve exited with {}",
            output.status
        );
        String::from_utf8(output.stdout).unwrap()
    }

    /// Waits until it accepts connections; a channel to it.
    async fn connect(&self) -> tonic::transport::Channel {
        let address = self.address;
        eventually("billing serve accepts connections", || async move {
            tokio::net::TcpStream::connect(address).await.is_ok()
        })
        .await;
        tonic::transport::Channel::from_shared(format!("http://{address}"))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }
}

/// A fresh database for a child process: its pool and URL.
async fn fresh_database_url() -> (sqlx::PgPool, String) {
    let (pool, options) = crate::helpers::fresh_database().await;
    let server_url = crate::helpers::server_url();
    let url = format!(
        "{}/{}",
        server_url.rsplit_once('/').unwrap().0,
        options.get_database().unwrap()
    );
    (pool, url)
}

async fn create_account(channel: &tonic::transport::Channel, token: &str) {
    proto::balances_client::BalancesClient::new(channel.clone())
        .create_account(authed(
            token,
            proto::CreateAccountRequest {
                account_id: "acme".into(),
                currency: "USD".into(),
                billing_email: "acme@example.com".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_callers_traceparent_parents_the_exported_rpc_span_and_no_card_data_is_exported() {
    let (collector, receiver_address) = start_collector().await;
    let (pool, database_url) = fresh_database_url().await;
    let server = ServeProcess::start(&database_url, Some(receiver_address));
    let channel = server.connect().await;
    let keys = crate::helpers::test_keys();
    let service = keys.mint("test", "service", None, 600).unwrap();
    create_account(&channel, &service).await;
    let number = "4242424242424242";
    let admin = keys.mint("test", "admin", Some("acme"), 600).unwrap();
    proto::payment_methods_client::PaymentMethodsClient::new(channel)
        .add_card(traced(
            &admin,
            add_card_request("acme", card(number), "trace-card"),
        ))
        .await
        .unwrap();
    let gateway_token: String = sqlx::query_scalar("SELECT gateway_token FROM payment_methods")
        .fetch_one(&pool)
        .await
        .unwrap();
    // Spans are batched: the exit on SIGTERM must flush them.
    tokio::task::spawn_blocking(move || server.terminate())
        .await
        .unwrap();
    assert_eq!(
        attribute_of_resource(&collector, "service.name").as_deref(),
        Some("billing-under-test")
    );

    let spans = collector.spans.lock().unwrap().clone();
    let names: Vec<_> = spans.iter().map(|span| span.name.as_str()).collect();
    let rpc = spans
        .iter()
        .find(|span| span.name == "billing.v1.PaymentMethods/AddCard")
        .unwrap_or_else(|| panic!("no AddCard span among {names:?}"));
    assert_eq!(hex(&rpc.trace_id), TRACE_ID);
    assert_eq!(hex(&rpc.parent_span_id), PARENT_SPAN_ID);
    assert!(attribute(rpc, "account_id").is_some_and(|v| v.contains("acme")));
    assert!(attribute(rpc, "rpc.grpc.status_code").is_some_and(|v| v.contains("IntValue(0)")));
    let everything = format!("{spans:?}");
    assert!(!everything.contains(number), "a card number in span data");
    assert!(
        !everything.contains(&gateway_token),
        "a gateway token in span data"
    );
    assert!(
        !everything.to_lowercase().contains("cvc"),
        "a CVC field in span data"
    );

    // A span per SQL statement, in the caller's trace, with the SQL as
    // written: placeholders, never the bound values.
    let statements: Vec<&Span> = spans
        .iter()
        .filter(|span| hex(&span.trace_id) == TRACE_ID)
        .filter(|span| attribute(span, "db.system.name").is_some_and(|v| v.contains("postgresql")))
        .collect();
    assert!(
        statements.len() >= 3,
        "database spans of AddCard: {names:?}"
    );
    assert!(
        statements
            .iter()
            .any(|span| attribute(span, "db.query.text").is_some_and(|v| v.contains("$1"))),
        "statements keep their placeholders"
    );
    for statement in &statements {
        let text = format!("{statement:?}");
        assert!(
            !text.contains("acme"),
            "a bound value in a database span: {text}"
        );
        assert_eq!(statement.kind, SpanKind::Client as i32);
    }
    // The gateway call, timed and traced in the same trace.
    let setup = spans
        .iter()
        .find(|span| span.name == "gateway.setup_card")
        .unwrap_or_else(|| panic!("no gateway.setup_card span among {names:?}"));
    assert_eq!(hex(&setup.trace_id), TRACE_ID);
    assert!(attribute(setup, "result").is_some_and(|v| v.contains("succeeded")));
}

/// An OTLP/gRPC receiver on a free port: the collector and its address.
async fn start_collector() -> (Collector, SocketAddr) {
    let collector = Collector::default();
    let receiver = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let receiver_address = receiver.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(receiver)),
    );
    (collector, receiver_address)
}

#[tokio::test]
async fn engine_spans_link_to_the_call_that_caused_their_work() {
    let (collector, receiver_address) = start_collector().await;
    let (_pool, database_url) = fresh_database_url().await;
    let server = ServeProcess::start(&database_url, Some(receiver_address));
    let channel = server.connect().await;
    let keys = crate::helpers::test_keys();
    let service = keys.mint("test", "service", None, 600).unwrap();
    let admin = keys.mint("test", "admin", Some("acme"), 600).unwrap();
    create_account(&channel, &service).await;
    let balances = proto::balances_client::BalancesClient::new(channel.clone());
    balances
        .clone()
        .credit(authed(
            &service,
            proto::CreditRequest {
                account_id: "acme".into(),
                amount: "20.00".into(),
                kind: proto::TransactionKind::Adjustment as i32,
                idempotency_key: "opening".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    proto::payment_methods_client::PaymentMethodsClient::new(channel.clone())
        .add_card(authed(
            &admin,
            add_card_request("acme", card("4242424242424242"), "linked-card"),
        ))
        .await
        .unwrap();
    let mut policy = proto::balance_policy_client::BalancePolicyClient::new(channel.clone());
    policy
        .apply_low_balance_settings(authed(
            &admin,
            proto::ApplyLowBalanceSettingsRequest {
                account_id: "acme".into(),
                auto_refill_enabled: true,
                threshold: "10.00".into(),
                refill_amount: "30.00".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    // The usage that crosses the threshold, in the caller's trace.
    balances
        .clone()
        .debit(traced(
            &service,
            proto::DebitRequest {
                account_id: "acme".into(),
                amount: "15.00".into(),
                idempotency_key: "crossing".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let top_ups = policy
            .list_top_ups(authed(
                &admin,
                proto::ListTopUpsRequest {
                    account_id: "acme".into(),
                    ..Default::default()
                },
            ))
            .await
            .unwrap()
            .into_inner()
            .top_ups;
        if top_ups
            .first()
            .is_some_and(|t| t.status == proto::TopUpStatus::Succeeded as i32)
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no automatic top-up within 60 s: {top_ups:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    tokio::task::spawn_blocking(move || server.terminate())
        .await
        .unwrap();

    let spans = collector.spans.lock().unwrap().clone();
    let names: Vec<_> = spans.iter().map(|span| span.name.as_str()).collect();
    let debit = spans
        .iter()
        .find(|span| span.name == "billing.v1.Balances/Debit")
        .unwrap_or_else(|| panic!("no Debit span among {names:?}"));
    assert_eq!(hex(&debit.trace_id), TRACE_ID);
    let linked_to = |span: &Span, target: &Span| {
        span.links
            .iter()
            .any(|link| link.trace_id == target.trace_id && link.span_id == target.span_id)
    };
    // The decision on the debit's event: a trace of its own, linked to the debit.
    let decision = spans
        .iter()
        .find(|span| span.name == "engine.decide" && linked_to(span, debit))
        .unwrap_or_else(|| panic!("no engine.decide span linked to the Debit among {names:?}"));
    assert_ne!(hex(&decision.trace_id), TRACE_ID);
    // The engine's charge of the top-up it started, linked to the decision.
    let drive = spans
        .iter()
        .find(|span| span.name == "top_up.drive" && linked_to(span, decision))
        .unwrap_or_else(|| panic!("no top_up.drive span linked to the decision among {names:?}"));
    let charge = spans
        .iter()
        .find(|span| span.name == "gateway.charge" && span.trace_id == drive.trace_id)
        .unwrap_or_else(|| panic!("no gateway.charge span in the drive's trace among {names:?}"));
    assert!(attribute(charge, "off_session").is_some_and(|v| v.contains("true")));
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn the_json_rpc_log_line_has_method_code_latency_trace_id_and_span_id() {
    let (_pool, database_url) = fresh_database_url().await;
    let server = ServeProcess::start(&database_url, None);
    let channel = server.connect().await;
    let service = crate::helpers::test_keys()
        .mint("test", "service", None, 600)
        .unwrap();
    create_account(&channel, &service).await;
    proto::balances_client::BalancesClient::new(channel)
        .get_balance(traced(
            &service,
            proto::GetBalanceRequest {
                account_id: "acme".into(),
            },
        ))
        .await
        .unwrap();
    let text = tokio::task::spawn_blocking(move || server.terminate())
        .await
        .unwrap();

    let line = text
        .lines()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).expect("every line is JSON"))
        .find(|line| line["method"] == "/billing.v1.Balances/GetBalance")
        .unwrap_or_else(|| panic!("no GetBalance rpc line in:\n{text}"));
    assert_eq!(line["message"], "rpc");
    assert_eq!(line["code"], "Ok");
    assert!(
        line["latency_ms"].as_f64().is_some_and(|ms| ms >= 0.0),
        "{line}"
    );
    // Traces are off here: the id is the caller's, so logs and traces still join.
    assert_eq!(line["trace_id"], TRACE_ID);
    assert!(
        line["span_id"]
            .as_str()
            .is_some_and(|id| id.len() == 16 && id != PARENT_SPAN_ID),
        "the line's own span: {line}"
    );
    assert_eq!(line["span"]["account_id"], "acme");
    // Every line written inside a span carries its ids.
    for line in text.lines() {
        let line: serde_json::Value = serde_json::from_str(line).unwrap();
        if line.get("span").is_some() {
            assert!(
                line["trace_id"].is_string() && line["span_id"].is_string(),
                "{line}"
            );
        }
    }
}
