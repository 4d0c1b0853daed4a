//! `billing.v1.PaymentMethods`: the Payment Methods page over gRPC.

use tonic::{Request, Response, Status};

use super::authorize_account_id;
use super::convert::timestamp;
use super::convert::{checked_id, required_id};
use crate::card::CardDetails;
use crate::error::{BillingError, Violations};
use crate::gateway::CardSource;
use crate::ids::IdempotencyKey;
use crate::payment_methods::{
    BillingAddress, MethodStatus, NewCard, PaymentMethod, PaymentMethods,
};
use crate::proto::{self, add_card_request::Source, payment_methods_server};
use crate::topup::{
    self, AttemptOutcome, FundsRequest, FundsResult, PendingChallenge, TopUpStatus, TopUps, Trigger,
};

#[derive(Clone)]
pub struct PaymentMethodsApi {
    methods: PaymentMethods,
    /// Add Funds and Retry charge through the one top-up charge path.
    top_ups: TopUps,
}

impl PaymentMethodsApi {
    pub fn new(methods: PaymentMethods, top_ups: TopUps) -> Self {
        Self { methods, top_ups }
    }
}

#[tonic::async_trait]
impl payment_methods_server::PaymentMethods for PaymentMethodsApi {
    async fn add_card(
        &self,
        request: Request<proto::AddCardRequest>,
    ) -> Result<Response<proto::AddCardResponse>, Status> {
        let (caller, account_id) = authorize_account_id(&request, &request.get_ref().account_id)?;
        let message = request.into_inner();
        let mut violations = Violations::new();
        let source = match message.source {
            Some(Source::Card(card)) => violations
                .check(CardDetails::parse(
                    &card.number,
                    card.exp_month,
                    card.exp_year,
                    &card.cvc,
                    &card.holder_name,
                    chrono::Utc::now().date_naive(),
                ))
                .map(CardSource::Card),
            Some(Source::GatewayToken(token)) if !token.is_empty() => violations
                .check(crate::ids::parse_text("gateway_token", &token, 255))
                .map(CardSource::Token),
            _ => {
                violations.add("card", "a card or a gateway_token is required");
                None
            }
        };
        let billing_address = violations.check(BillingAddress::parse(address_from_proto(
            message.billing_address,
        )));
        let idempotency_key = violations.check(IdempotencyKey::parse(&message.idempotency_key));
        let (Some(source), Some(billing_address), Some(idempotency_key)) =
            (source, billing_address, idempotency_key)
        else {
            return Err(violations.into_error().into());
        };
        let new = NewCard {
            account_id,
            source,
            billing_address,
            idempotency_key,
        };
        let method = self.methods.add_card(&caller, new).await?;
        Ok(Response::new(proto::AddCardResponse {
            next_action: pending_next_action(&method),
            payment_method: Some(method_to_proto(&method)),
        }))
    }

    async fn confirm_card(
        &self,
        request: Request<proto::ConfirmCardRequest>,
    ) -> Result<Response<proto::ConfirmCardResponse>, Status> {
        let (caller, account_id) = authorize_account_id(&request, &request.get_ref().account_id)?;
        let message = request.into_inner();
        let mut violations = Violations::new();
        let id = violations.check(required_id("payment_method_id", &message.payment_method_id));
        let authenticated = violations.check(authentication_result(message.authentication_result));
        let (Some(id), Some(authenticated)) = (id, authenticated) else {
            return Err(violations.into_error().into());
        };
        let method = self
            .methods
            .confirm_card(&caller, &account_id, &id, authenticated)
            .await?;
        Ok(Response::new(proto::ConfirmCardResponse {
            payment_method: Some(method_to_proto(&method)),
        }))
    }

    async fn list_payment_methods(
        &self,
        request: Request<proto::ListPaymentMethodsRequest>,
    ) -> Result<Response<proto::ListPaymentMethodsResponse>, Status> {
        let (_, account_id) = authorize_account_id(&request, &request.get_ref().account_id)?;
        let message = request.into_inner();
        // Tokens carry the priority of the last method returned.
        let page = crate::paging::Page::parse(message.page_size, &message.page_token)?;
        let after_priority = page.after_id.unwrap_or(0);
        let page_size = usize::try_from(page.size).unwrap_or(usize::MAX);
        let methods: Vec<PaymentMethod> = self
            .methods
            .list(&account_id)
            .await?
            .into_iter()
            .filter(|m| i64::from(m.priority) > after_priority)
            .take(page_size)
            .collect();
        let next_page_token = crate::paging::next_token(
            methods.len(),
            &page,
            methods.last().map(|m| i64::from(m.priority)),
        );
        Ok(Response::new(proto::ListPaymentMethodsResponse {
            payment_methods: methods.iter().map(method_to_proto).collect(),
            next_page_token,
        }))
    }

    async fn get_payment_method(
        &self,
        request: Request<proto::GetPaymentMethodRequest>,
    ) -> Result<Response<proto::GetPaymentMethodResponse>, Status> {
        let (_, account_id) = authorize_account_id(&request, &request.get_ref().account_id)?;
        let id = required_id("payment_method_id", &request.get_ref().payment_method_id)?;
        let method = self.methods.get(&account_id, &id).await?;
        Ok(Response::new(proto::GetPaymentMethodResponse {
            payment_method: Some(method_to_proto(&method)),
        }))
    }

    async fn set_auto_charge(
        &self,
        request: Request<proto::SetAutoChargeRequest>,
    ) -> Result<Response<proto::SetAutoChargeResponse>, Status> {
        let (caller, account_id) = authorize_account_id(&request, &request.get_ref().account_id)?;
        let message = request.into_inner();
        let id = required_id("payment_method_id", &message.payment_method_id)?;
        let method = self
            .methods
            .set_auto_charge(&caller, &account_id, &id, message.enabled)
            .await?;
        Ok(Response::new(proto::SetAutoChargeResponse {
            payment_method: Some(method_to_proto(&method)),
        }))
    }

    async fn reorder_payment_methods(
        &self,
        request: Request<proto::ReorderPaymentMethodsRequest>,
    ) -> Result<Response<proto::ReorderPaymentMethodsResponse>, Status> {
        let (caller, account_id) = authorize_account_id(&request, &request.get_ref().account_id)?;
        let ids = request.into_inner().payment_method_ids;
        let mut violations = Violations::new();
        for (index, id) in ids.iter().enumerate() {
            violations.check(checked_id(&format!("payment_method_ids[{index}]"), id));
        }
        violations.finish()?;
        let methods = self.methods.reorder(&caller, &account_id, ids).await?;
        Ok(Response::new(proto::ReorderPaymentMethodsResponse {
            payment_methods: methods.iter().map(method_to_proto).collect(),
        }))
    }

    async fn remove_payment_method(
        &self,
        request: Request<proto::RemovePaymentMethodRequest>,
    ) -> Result<Response<proto::RemovePaymentMethodResponse>, Status> {
        let (caller, account_id) = authorize_account_id(&request, &request.get_ref().account_id)?;
        let id = required_id("payment_method_id", &request.get_ref().payment_method_id)?;
        let method = self.methods.remove(&caller, &account_id, &id).await?;
        Ok(Response::new(proto::RemovePaymentMethodResponse {
            payment_method: Some(method_to_proto(&method)),
        }))
    }

    async fn add_funds(
        &self,
        request: Request<proto::AddFundsRequest>,
    ) -> Result<Response<proto::AddFundsResponse>, Status> {
        let (caller, account_id) = authorize_account_id(&request, &request.get_ref().account_id)?;
        let message = request.into_inner();
        let mut violations = Violations::new();
        let payment_method_id = violations.check(
            Some(message.payment_method_id)
                .filter(|id| !id.is_empty())
                .map(|id| checked_id("payment_method_id", &id))
                .transpose(),
        );
        let idempotency_key = violations.check(IdempotencyKey::parse(&message.idempotency_key));
        violations.check(amount_shape(&message.amount, true));
        let (Some(payment_method_id), Some(idempotency_key)) = (payment_method_id, idempotency_key)
        else {
            return Err(violations.into_error().into());
        };
        violations.finish()?;
        let funds = FundsRequest {
            account_id,
            trigger: Trigger::Manual,
            amount: message.amount,
            payment_method_id,
            idempotency_key,
        };
        let result = self.top_ups.add_funds(&caller, funds).await?;
        Ok(Response::new(proto::AddFundsResponse {
            next_action: top_up_next_action(&result),
            balance: result.top_up.currency.format(result.balance),
            top_up: Some(top_up_to_proto(&result.top_up)),
        }))
    }

    async fn retry_payment_method(
        &self,
        request: Request<proto::RetryPaymentMethodRequest>,
    ) -> Result<Response<proto::RetryPaymentMethodResponse>, Status> {
        let (caller, account_id) = authorize_account_id(&request, &request.get_ref().account_id)?;
        let message = request.into_inner();
        let mut violations = Violations::new();
        let payment_method_id =
            violations.check(required_id("payment_method_id", &message.payment_method_id));
        let idempotency_key = violations.check(IdempotencyKey::parse(&message.idempotency_key));
        violations.check(amount_shape(&message.amount, false));
        let (Some(payment_method_id), Some(idempotency_key)) = (payment_method_id, idempotency_key)
        else {
            return Err(violations.into_error().into());
        };
        violations.finish()?;
        let funds = FundsRequest {
            account_id,
            trigger: Trigger::Retry,
            amount: message.amount,
            payment_method_id: Some(payment_method_id),
            idempotency_key,
        };
        let result = self.top_ups.add_funds(&caller, funds).await?;
        Ok(Response::new(proto::RetryPaymentMethodResponse {
            payment_method: result.payment_method.as_ref().map(method_to_proto),
            top_up: Some(top_up_to_proto(&result.top_up)),
        }))
    }

    async fn confirm_top_up(
        &self,
        request: Request<proto::ConfirmTopUpRequest>,
    ) -> Result<Response<proto::ConfirmTopUpResponse>, Status> {
        let (caller, account_id) = authorize_account_id(&request, &request.get_ref().account_id)?;
        let message = request.into_inner();
        let mut violations = Violations::new();
        let top_up_id = violations.check(required_id("top_up_id", &message.top_up_id));
        let authenticated = violations.check(authentication_result(message.authentication_result));
        let (Some(top_up_id), Some(authenticated)) = (top_up_id, authenticated) else {
            return Err(violations.into_error().into());
        };
        let result = self
            .top_ups
            .confirm_top_up(&caller, &account_id, &top_up_id, authenticated)
            .await?;
        Ok(Response::new(proto::ConfirmTopUpResponse {
            balance: result.top_up.currency.format(result.balance),
            top_up: Some(top_up_to_proto(&result.top_up)),
        }))
    }
}

/// The shape of a charge amount (a positive decimal), checked with the
/// other fields; its scale is the account currency's, checked with the
/// account. Empty is allowed where the amount has a default.
fn amount_shape(text: &str, required: bool) -> Result<(), BillingError> {
    if text.is_empty() && !required {
        return Ok(());
    }
    // Decimal's own limit: the currency's (smaller) scale is checked later.
    const ANY_SCALE: u32 = 28;
    crate::money::parse_positive_amount(text, ANY_SCALE)
        .map(|_| ())
        .map_err(|e| BillingError::invalid("amount", e.to_string()))
}

fn authentication_result(value: i32) -> Result<bool, BillingError> {
    match proto::AuthenticationResult::try_from(value) {
        Ok(proto::AuthenticationResult::Passed) => Ok(true),
        Ok(proto::AuthenticationResult::Failed) => Ok(false),
        _ => Err(BillingError::invalid(
            "authentication_result",
            "must be AUTHENTICATION_RESULT_PASSED or AUTHENTICATION_RESULT_FAILED",
        )),
    }
}

fn address_from_proto(address: Option<proto::BillingAddress>) -> BillingAddress {
    let address = address.unwrap_or_default();
    BillingAddress {
        line1: address.line1,
        line2: address.line2,
        city: address.city,
        postal_code: address.postal_code,
        state: address.state,
        country: address.country,
    }
}

fn next_action(challenge: &PendingChallenge) -> proto::NextAction {
    proto::NextAction {
        r#type: "three_d_secure".into(),
        redirect_url: challenge.redirect_url.clone(),
        challenge_id: challenge.challenge_id.clone(),
    }
}

fn pending_next_action(method: &PaymentMethod) -> Option<proto::NextAction> {
    match (&method.challenge, method.status) {
        (Some(challenge), MethodStatus::PendingAuthentication) => Some(next_action(challenge)),
        _ => None,
    }
}

fn top_up_next_action(result: &FundsResult) -> Option<proto::NextAction> {
    match (&result.top_up.challenge, result.top_up.status) {
        (Some(challenge), TopUpStatus::RequiresAction) => Some(next_action(challenge)),
        _ => None,
    }
}

pub(crate) fn method_to_proto(method: &PaymentMethod) -> proto::PaymentMethod {
    let status = match method.status {
        MethodStatus::PendingAuthentication => proto::PaymentMethodStatus::PendingAuthentication,
        MethodStatus::Active => proto::PaymentMethodStatus::Active,
        MethodStatus::TemporarilyDisabled => proto::PaymentMethodStatus::TemporarilyDisabled,
        MethodStatus::Failed => proto::PaymentMethodStatus::Failed,
        MethodStatus::Removed => proto::PaymentMethodStatus::Removed,
    };
    let address = &method.billing_address;
    proto::PaymentMethod {
        payment_method_id: method.payment_method_id.clone(),
        account_id: method.account_id.clone(),
        status: status as i32,
        brand: method.brand.clone(),
        last4: method.last4.clone(),
        exp_month: method.exp_month,
        exp_year: method.exp_year,
        holder_name: method.holder_name.clone(),
        auto_charge: method.auto_charge,
        priority: method.priority,
        primary: method.primary,
        disabled_reason: method.disabled_reason.clone(),
        created_at: Some(timestamp(method.created_at)),
        billing_address: Some(proto::BillingAddress {
            line1: address.line1.clone(),
            line2: address.line2.clone(),
            city: address.city.clone(),
            postal_code: address.postal_code.clone(),
            state: address.state.clone(),
            country: address.country.clone(),
        }),
    }
}

pub(crate) fn top_up_to_proto(top_up: &topup::TopUp) -> proto::TopUp {
    let trigger = match top_up.trigger {
        Trigger::Automatic => proto::TopUpTrigger::Automatic,
        Trigger::Manual => proto::TopUpTrigger::Manual,
        Trigger::Retry => proto::TopUpTrigger::Retry,
    };
    let status = match top_up.status {
        TopUpStatus::Pending => proto::TopUpStatus::Pending,
        TopUpStatus::Succeeded => proto::TopUpStatus::Succeeded,
        TopUpStatus::RetryScheduled => proto::TopUpStatus::RetryScheduled,
        TopUpStatus::Failed => proto::TopUpStatus::Failed,
        TopUpStatus::RequiresAction => proto::TopUpStatus::RequiresAction,
        TopUpStatus::Unknown => proto::TopUpStatus::Unknown,
        TopUpStatus::CapReached => proto::TopUpStatus::CapReached,
        TopUpStatus::Canceled => proto::TopUpStatus::Canceled,
        TopUpStatus::NeedsAttention => proto::TopUpStatus::NeedsAttention,
    };
    let currency = top_up.currency;
    proto::TopUp {
        top_up_id: top_up.top_up_id.clone(),
        account_id: top_up.account_id.clone(),
        trigger: trigger as i32,
        status: status as i32,
        amount: currency.format(top_up.amount),
        currency: currency.code().to_owned(),
        attempts: top_up
            .attempts
            .iter()
            .map(|attempt| proto::TopUpAttempt {
                attempt_number: attempt.attempt_number,
                payment_method_id: attempt.payment_method_id.clone(),
                outcome: match attempt.outcome {
                    AttemptOutcome::Succeeded => proto::AttemptOutcome::Succeeded,
                    AttemptOutcome::Declined => proto::AttemptOutcome::Declined,
                    AttemptOutcome::RequiresAction => proto::AttemptOutcome::RequiresAction,
                    AttemptOutcome::Unknown => proto::AttemptOutcome::Unknown,
                } as i32,
                decline_code: attempt.decline_code.clone(),
                hard_decline: attempt.hard_decline,
                amount: currency.format(attempt.amount),
                attempted_at: Some(timestamp(attempt.attempted_at)),
            })
            .collect(),
        transaction_id: top_up
            .transaction_id
            .map(|id| id.to_string())
            .unwrap_or_default(),
        created_at: Some(timestamp(top_up.created_at)),
        next_attempt_at: top_up.next_attempt_at.map(timestamp),
        failure_reason: top_up.failure_reason.clone(),
    }
}
