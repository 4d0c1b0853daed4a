//! The auto top-up engine end to end: settings, crossings, fallback to the
//! next card, retries on a clock the test moves, caps, unknown outcomes,
//! and exactly one top-up per crossing with three replicas.

mod clocked;
mod confirm;
mod crossings;
mod live_state;
mod policy_api;
mod reaction;

use std::sync::Arc;
use std::time::Duration;

use billing::proto::{self, balance_policy_client::BalancePolicyClient};
use billing::server::ServerSettings;
use billing::topup::{ManualClock, PolicyConfig};
use tonic::transport::Channel;

use crate::helpers::{TestApp, authed, eventually, spawn_app_on, spawn_app_with};
use crate::payment_methods::add_active_card;

pub const ACCT: &str = "acme";
pub const VISA: &str = "4242424242424242";
pub const DECLINES: &str = "4000000000000341";
pub const DECLINES_OFF_SESSION: &str = "4000000000004954";
pub const TIMES_OUT: &str = "4000000000009904";
pub const OFF_SESSION_3DS: &str = "4000003800000446";

/// Engines on, a clock the test moves, fast polling.
pub fn engine_settings(clock: Arc<ManualClock>) -> ServerSettings {
    ServerSettings {
        engines: true,
        engine_poll: Duration::from_millis(50),
        clock,
        policy: PolicyConfig::default(),
        ..Default::default()
    }
}

pub struct Scenario {
    pub app: TestApp,
    pub clock: Arc<ManualClock>,
    pub admin: String,
}

/// A server with engines, account `acme` holding `opening`, and these cards
/// added in this order (the first gets auto-charge; the others are switched on).
pub async fn scenario(opening: &str, cards: &[&str]) -> (Scenario, Vec<String>) {
    scenario_with(engine_settings, opening, cards).await
}

/// [`scenario`] on a server with the settings `settings` makes from the clock.
pub async fn scenario_with(
    settings: impl FnOnce(Arc<ManualClock>) -> ServerSettings,
    opening: &str,
    cards: &[&str],
) -> (Scenario, Vec<String>) {
    let clock = Arc::new(ManualClock::starting_now());
    let app = spawn_app_with(settings(clock.clone())).await;
    with_account_and_cards(app, clock, opening, cards).await
}

/// [`scenario`] on a server whose card processor `processor` makes from
/// the database.
pub async fn scenario_on(
    processor: impl FnOnce(sqlx::PgPool) -> Arc<dyn billing::gateway::PaymentGateway>,
    opening: &str,
    cards: &[&str],
) -> (Scenario, Vec<String>) {
    let (pool, _) = crate::helpers::fresh_database().await;
    let clock = Arc::new(ManualClock::starting_now());
    let settings = ServerSettings {
        gateway: Some(processor(pool.clone())),
        ..engine_settings(clock.clone())
    };
    let app = spawn_app_on(pool, settings).await.owning_its_database();
    with_account_and_cards(app, clock, opening, cards).await
}

async fn with_account_and_cards(
    app: TestApp,
    clock: Arc<ManualClock>,
    opening: &str,
    cards: &[&str],
) -> (Scenario, Vec<String>) {
    app.account_with_balance(ACCT, opening).await;
    let admin = app.token("admin", Some(ACCT));
    let mut ids = Vec::new();
    for number in cards {
        let id = add_active_card(&app, &admin, ACCT, number).await;
        crate::payment_methods::client(&app)
            .set_auto_charge(authed(
                &admin,
                proto::SetAutoChargeRequest {
                    account_id: ACCT.into(),
                    payment_method_id: id.clone(),
                    enabled: true,
                },
            ))
            .await
            .unwrap();
        ids.push(id);
    }
    (Scenario { app, clock, admin }, ids)
}

/// Another replica on the same database (its own pool, feed and engines).
pub async fn replica(first: &Scenario) -> TestApp {
    replica_with(first, engine_settings(first.clock.clone())).await
}

/// Another server on `first`'s database with its own pool and `settings`.
pub async fn replica_with(first: &Scenario, settings: ServerSettings) -> TestApp {
    let options = (*first.app.pool.connect_options()).clone();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .connect_with(options)
        .await
        .unwrap();
    spawn_app_on(pool, settings).await
}

pub fn policy(app: &TestApp) -> BalancePolicyClient<Channel> {
    BalancePolicyClient::new(app.channel.clone())
}

pub fn settings(threshold: &str, refill: &str) -> proto::ApplyLowBalanceSettingsRequest {
    proto::ApplyLowBalanceSettingsRequest {
        account_id: ACCT.into(),
        auto_refill_enabled: true,
        threshold: threshold.into(),
        refill_amount: refill.into(),
        ..Default::default()
    }
}

pub async fn apply(
    s: &Scenario,
    request: proto::ApplyLowBalanceSettingsRequest,
) -> proto::ApplyLowBalanceSettingsResponse {
    policy(&s.app)
        .apply_low_balance_settings(authed(&s.admin, request))
        .await
        .unwrap()
        .into_inner()
}

pub async fn debit(app: &TestApp, amount: &str, key: &str) {
    app.balances()
        .debit(authed(
            &app.service_token(),
            proto::DebitRequest {
                account_id: ACCT.into(),
                amount: amount.into(),
                idempotency_key: key.into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap();
}

/// A manual adjustment credit (lifts the balance without a card).
pub async fn credit(app: &TestApp, amount: &str, key: &str) {
    app.balances()
        .credit(authed(
            &app.service_token(),
            proto::CreditRequest {
                account_id: ACCT.into(),
                amount: amount.into(),
                kind: proto::TransactionKind::Adjustment as i32,
                idempotency_key: key.into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap();
}

pub async fn top_ups(app: &TestApp, token: &str) -> Vec<proto::TopUp> {
    policy(app)
        .list_top_ups(authed(
            token,
            proto::ListTopUpsRequest {
                account_id: ACCT.into(),
                page_size: 100,
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .top_ups
}

pub fn status_of(top_up: &proto::TopUp) -> proto::TopUpStatus {
    proto::TopUpStatus::try_from(top_up.status).unwrap()
}

/// Waits until the account's only top-up reaches `status`, and returns it.
pub async fn wait_for_top_up(s: &Scenario, status: proto::TopUpStatus) -> proto::TopUp {
    eventually(&format!("a top-up {status:?}"), || async {
        top_ups(&s.app, &s.admin)
            .await
            .first()
            .is_some_and(|t| status_of(t) == status)
    })
    .await;
    top_ups(&s.app, &s.admin).await.remove(0)
}

pub async fn balance(app: &TestApp) -> String {
    crate::payment_methods::balance(app, ACCT).await
}

pub async fn sandbox_charges(app: &TestApp) -> i64 {
    sqlx::query_scalar("SELECT COUNT(*) FROM sandbox_charges WHERE outcome = 'succeeded'")
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

pub async fn ledger_top_ups(app: &TestApp) -> i64 {
    sqlx::query_scalar("SELECT COUNT(*) FROM ledger_entries WHERE kind = 'top_up'")
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

pub async fn settle_briefly() {
    // Lets the engines run a few polls so that a wrong second charge would show.
    tokio::time::sleep(Duration::from_millis(400)).await;
}
