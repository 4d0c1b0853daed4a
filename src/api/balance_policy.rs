//! `billing.v1.BalancePolicy`: the Low Balance Settings panel and the
//! history of top-ups.

use std::sync::Arc;

use rust_decimal::Decimal;
use sqlx::PgPool;
use tokio::sync::Notify;
use tonic::{Request, Response, Status};

use super::authorize_account_id;
use super::convert::{required_id, timestamp};
use super::payment_methods::top_up_to_proto;
use crate::error::{BillingError, Violations};
use crate::ledger;
use crate::money::{self, Currency};
use crate::paging::{self, Page};
use crate::proto::{self, balance_policy_server::BalancePolicy};
use crate::topup::{self, Clock, LowBalanceSettings, PolicyConfig, SettingsChange};

#[derive(Clone)]
pub struct BalancePolicyApi {
    pool: PgPool,
    config: PolicyConfig,
    clock: Arc<dyn Clock>,
    /// Wakes this process's top-up engine when applying started a top-up.
    wake: Arc<Notify>,
}

impl BalancePolicyApi {
    pub fn new(
        pool: PgPool,
        config: PolicyConfig,
        clock: Arc<dyn Clock>,
        wake: Arc<Notify>,
    ) -> Self {
        Self {
            pool,
            config,
            clock,
            wake,
        }
    }
}

/// An amount of the account's currency in whole minor units; empty is zero.
fn settings_amount(field: &str, text: &str, currency: Currency) -> Result<Decimal, BillingError> {
    if text.is_empty() {
        return Ok(Decimal::ZERO);
    }
    money::parse_amount(text, currency.minor_units())
        .map_err(|e| BillingError::invalid(field, e.to_string()))
}

#[tonic::async_trait]
impl BalancePolicy for BalancePolicyApi {
    async fn get_low_balance_settings(
        &self,
        request: Request<proto::GetLowBalanceSettingsRequest>,
    ) -> Result<Response<proto::GetLowBalanceSettingsResponse>, Status> {
        let (_, account_id) = authorize_account_id(&request, &request.get_ref().account_id)?;
        let settings = topup::get_settings(&self.pool, &account_id, &self.config).await?;
        Ok(Response::new(proto::GetLowBalanceSettingsResponse {
            settings: Some(settings_to_proto(&settings)),
        }))
    }

    async fn apply_low_balance_settings(
        &self,
        request: Request<proto::ApplyLowBalanceSettingsRequest>,
    ) -> Result<Response<proto::ApplyLowBalanceSettingsResponse>, Status> {
        let (caller, account_id) = authorize_account_id(&request, &request.get_ref().account_id)?;
        let message = request.into_inner();
        let currency = ledger::get_account(&self.pool, &account_id).await?.currency;
        let mut violations = Violations::new();
        let max_top_ups_per_day = match message.max_top_ups_per_day {
            0 => Some(None),
            n if !(1..=1000).contains(&n) => {
                violations.add("max_top_ups_per_day", "must be between 1 and 1000");
                None
            }
            n => Some(Some(n)),
        };
        let max_amount_per_day = match message.max_amount_per_day.as_str() {
            "" => Some(None),
            "0" => Some(Some(None)),
            text => violations
                .check(
                    currency
                        .parse_charge_amount(text)
                        .map_err(|e| BillingError::invalid("max_amount_per_day", e.to_string())),
                )
                .map(|cap| Some(Some(cap))),
        };
        let threshold =
            violations.check(settings_amount("threshold", &message.threshold, currency));
        let refill_amount = violations.check(settings_amount(
            "refill_amount",
            &message.refill_amount,
            currency,
        ));
        if let Some(refill_amount) = refill_amount {
            violations.check(topup::check_refill_amount(
                message.auto_refill_enabled,
                refill_amount,
                currency,
                &self.config,
            ));
            // A cap below one refill would stop every automatic top-up.
            if message.auto_refill_enabled
                && let Some(Some(Some(cap))) = max_amount_per_day
                && cap < refill_amount
            {
                violations.add(
                    "max_amount_per_day",
                    format!(
                        "must be at least refill_amount ({}): a smaller cap stops every automatic top-up",
                        currency.display(refill_amount)
                    ),
                );
            }
        }
        let parsed = (
            threshold,
            refill_amount,
            violations.check(settings_amount(
                "notification_threshold",
                &message.notification_threshold,
                currency,
            )),
            max_top_ups_per_day,
            max_amount_per_day,
        );
        let (
            Some(threshold),
            Some(refill_amount),
            Some(notification_threshold),
            Some(max_top_ups_per_day),
            Some(max_amount_per_day),
        ) = parsed
        else {
            return Err(violations.into_error().into());
        };
        let change = SettingsChange {
            auto_refill_enabled: message.auto_refill_enabled,
            threshold,
            refill_amount,
            notification_enabled: message.notification_enabled,
            notification_threshold,
            max_top_ups_per_day,
            max_amount_per_day,
        };
        // A refill amount out of bounds alone passes the let-else above.
        violations.finish()?;
        let (settings, started) = topup::apply_settings(
            &self.pool,
            &caller,
            &account_id,
            change,
            &self.config,
            self.clock.as_ref(),
        )
        .await?;
        if let Some(top_up_id) = &started {
            // The engine's drive of this top-up links back to this call.
            crate::telemetry::links::remember(crate::telemetry::links::Cause::TopUp(
                top_up_id.clone(),
            ));
            self.wake.notify_one();
        }
        Ok(Response::new(proto::ApplyLowBalanceSettingsResponse {
            settings: Some(settings_to_proto(&settings)),
            started_top_up_id: started.unwrap_or_default(),
        }))
    }

    async fn list_top_ups(
        &self,
        request: Request<proto::ListTopUpsRequest>,
    ) -> Result<Response<proto::ListTopUpsResponse>, Status> {
        let (_, account_id) = authorize_account_id(&request, &request.get_ref().account_id)?;
        let message = request.into_inner();
        let page = Page::parse(message.page_size, &message.page_token)?;
        ledger::get_account(&self.pool, &account_id).await?;
        let mut connection = self.pool.acquire().await.map_err(BillingError::from)?;
        let (top_ups, last_seq) = topup::list(&mut connection, &account_id, &page).await?;
        Ok(Response::new(proto::ListTopUpsResponse {
            next_page_token: paging::next_token(top_ups.len(), &page, last_seq),
            top_ups: top_ups.iter().map(top_up_to_proto).collect(),
        }))
    }

    async fn get_top_up(
        &self,
        request: Request<proto::GetTopUpRequest>,
    ) -> Result<Response<proto::GetTopUpResponse>, Status> {
        let (_, account_id) = authorize_account_id(&request, &request.get_ref().account_id)?;
        let top_up_id = required_id("top_up_id", &request.get_ref().top_up_id)?;
        let top_up_id = top_up_id.as_str();
        let mut connection = self.pool.acquire().await.map_err(BillingError::from)?;
        let top_up = topup::get(&mut connection, &account_id, top_up_id).await?;
        Ok(Response::new(proto::GetTopUpResponse {
            top_up: Some(top_up_to_proto(&top_up)),
        }))
    }
}

fn settings_to_proto(settings: &LowBalanceSettings) -> proto::LowBalanceSettings {
    let currency = settings.currency;
    proto::LowBalanceSettings {
        account_id: settings.account_id.clone(),
        auto_refill_enabled: settings.auto_refill_enabled,
        threshold: currency.format(settings.threshold),
        refill_amount: currency.format(settings.refill_amount),
        notification_enabled: settings.notification_enabled,
        notification_threshold: currency.format(settings.notification_threshold),
        max_top_ups_per_day: settings.max_top_ups_per_day,
        max_amount_per_day: settings
            .max_amount_per_day
            .map(|cap| currency.format(cap))
            .unwrap_or_default(),
        currency: currency.code().to_owned(),
        updated_at: settings.updated_at.map(timestamp),
    }
}
