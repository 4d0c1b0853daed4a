//! Top-up reaction: a debit takes the balance below the auto-refill
//! threshold; the latency is the crossing event's `created_at` (the debit's
//! transaction time, as returned by `Debit`) → the first gateway attempt's
//! `attempted_at` (as `ListTopUps` reports it). Both are database timestamps.

use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;

use super::report::{self, Report};
use super::{Bench, with_token};
use crate::proto::{
    self, balance_policy_client::BalancePolicyClient, balances_client::BalancesClient,
    payment_methods_client::PaymentMethodsClient,
};

/// How many crossings are prepared and measured at once.
const PARALLEL: usize = 4;

pub(super) async fn reaction(bench: &Bench) -> anyhow::Result<Report> {
    let started = Instant::now();
    let mut latency = report::histogram();
    let (mut ok, mut errors, mut error_samples) = (0u64, 0u64, Vec::new());
    let samples = bench.args.samples.max(1);
    for round_start in (0..samples).step_by(PARALLEL) {
        let round = (round_start..(round_start + PARALLEL).min(samples))
            .map(|index| one_crossing(bench, index));
        for outcome in futures::future::join_all(round).await {
            match outcome {
                Ok(took) => {
                    ok += 1;
                    report::record(&mut latency, took);
                }
                Err(error) => {
                    errors += 1;
                    if error_samples.len() < 3 {
                        error_samples.push(format!("{error:#}"));
                    }
                }
            }
        }
    }
    Ok(Report {
        scenario: "TopUpReaction".into(),
        concurrency: PARALLEL,
        elapsed: started.elapsed(),
        ok,
        errors,
        latency_of: "crossing event created_at to first top-up attempt attempted_at".into(),
        latency,
        extra: serde_json::Value::Null,
        error_samples,
    })
}

async fn one_crossing(bench: &Bench, index: usize) -> anyhow::Result<Duration> {
    let account_id = format!("bench-topup-{}-{index}", bench.run_id);
    let admin = bench.account_token(&account_id)?;
    let channel = bench.channel(index);
    let mut balances = BalancesClient::new(channel.clone());
    balances
        .create_account(bench.request(proto::CreateAccountRequest {
            account_id: account_id.clone(),
            currency: "USD".into(),
            billing_email: "bench@example.com".into(),
            ..Default::default()
        }))
        .await
        .context("creating the account")?;
    balances
        .credit(bench.request(proto::CreditRequest {
            account_id: account_id.clone(),
            amount: "150.00".into(),
            kind: proto::TransactionKind::Adjustment as i32,
            idempotency_key: "opening".into(),
            ..Default::default()
        }))
        .await
        .context("funding")?;
    let mut cards = PaymentMethodsClient::new(channel.clone());
    let added = cards
        .add_card(with_token(
            &admin,
            proto::AddCardRequest {
                account_id: account_id.clone(),
                source: Some(proto::add_card_request::Source::Card(proto::CardDetails {
                    number: "4242424242424242".into(),
                    exp_month: 12,
                    exp_year: 2099,
                    cvc: "123".into(),
                    holder_name: "Bench".into(),
                })),
                billing_address: Some(proto::BillingAddress {
                    line1: "1 Bench Row".into(),
                    city: "London".into(),
                    postal_code: "N1 9GU".into(),
                    country: "GB".into(),
                    ..Default::default()
                }),
                idempotency_key: "card".into(),
            },
        ))
        .await
        .context("adding the card")?
        .into_inner();
    let method = added.payment_method.context("no payment method")?;
    if added.next_action.is_some() {
        cards
            .confirm_card(with_token(
                &admin,
                proto::ConfirmCardRequest {
                    account_id: account_id.clone(),
                    payment_method_id: method.payment_method_id.clone(),
                    authentication_result: proto::AuthenticationResult::Passed as i32,
                },
            ))
            .await
            .context("confirming the card")?;
    }
    let mut policy = BalancePolicyClient::new(channel);
    policy
        .apply_low_balance_settings(with_token(
            &admin,
            proto::ApplyLowBalanceSettingsRequest {
                account_id: account_id.clone(),
                auto_refill_enabled: true,
                threshold: "100.00".into(),
                refill_amount: "50.00".into(),
                ..Default::default()
            },
        ))
        .await
        .context("enabling auto refill")?;
    let debit = balances
        .debit(bench.request(proto::DebitRequest {
            account_id: account_id.clone(),
            amount: "60.00".into(),
            idempotency_key: "crossing".into(),
            ..Default::default()
        }))
        .await
        .context("the crossing debit")?
        .into_inner();
    let crossed_at = debit
        .transaction
        .and_then(|t| t.created_at)
        .context("the debit has no time")?;
    let crossed_at = SystemTime::try_from(crossed_at)?;
    let give_up = Instant::now() + Duration::from_secs(10);
    while Instant::now() < give_up {
        let top_ups = policy
            .list_top_ups(with_token(
                &admin,
                proto::ListTopUpsRequest {
                    account_id: account_id.clone(),
                    ..Default::default()
                },
            ))
            .await?
            .into_inner()
            .top_ups;
        let first_attempt = top_ups
            .iter()
            .flat_map(|top_up| top_up.attempts.iter())
            .filter_map(|attempt| attempt.attempted_at)
            .filter_map(|at| SystemTime::try_from(at).ok())
            .min();
        if let Some(attempted_at) = first_attempt {
            return Ok(attempted_at.duration_since(crossed_at).unwrap_or_default());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    anyhow::bail!("no top-up attempt within 10 s of the crossing")
}
