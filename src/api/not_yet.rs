//! Services of the API contract whose capabilities arrive in later issues.
//! Every RPC authenticates like the others, then answers `UNIMPLEMENTED`
//! with a message that says which capability will bring it.

use tonic::{Request, Response, Status};

use crate::proto;

fn not_yet(rpc: &str, capability: &str) -> Status {
    Status::unimplemented(format!(
        "{rpc} is not implemented yet; it arrives with {capability}"
    ))
}

#[derive(Clone, Default)]
pub struct BalancePolicyApi;

#[tonic::async_trait]
impl proto::balance_policy_server::BalancePolicy for BalancePolicyApi {
    async fn get_low_balance_settings(
        &self,
        _request: Request<proto::GetLowBalanceSettingsRequest>,
    ) -> Result<Response<proto::GetLowBalanceSettingsResponse>, Status> {
        Err(not_yet(
            "BalancePolicy.GetLowBalanceSettings",
            "the low-balance settings and top-up engine (issue 4)",
        ))
    }

    async fn apply_low_balance_settings(
        &self,
        _request: Request<proto::ApplyLowBalanceSettingsRequest>,
    ) -> Result<Response<proto::ApplyLowBalanceSettingsResponse>, Status> {
        Err(not_yet(
            "BalancePolicy.ApplyLowBalanceSettings",
            "the low-balance settings and top-up engine (issue 4)",
        ))
    }

    async fn list_top_ups(
        &self,
        _request: Request<proto::ListTopUpsRequest>,
    ) -> Result<Response<proto::ListTopUpsResponse>, Status> {
        Err(not_yet(
            "BalancePolicy.ListTopUps",
            "the low-balance settings and top-up engine (issue 4)",
        ))
    }

    async fn get_top_up(
        &self,
        _request: Request<proto::GetTopUpRequest>,
    ) -> Result<Response<proto::GetTopUpResponse>, Status> {
        Err(not_yet(
            "BalancePolicy.GetTopUp",
            "the low-balance settings and top-up engine (issue 4)",
        ))
    }
}

#[derive(Clone, Default)]
pub struct PaymentMethodsApi;

#[tonic::async_trait]
impl proto::payment_methods_server::PaymentMethods for PaymentMethodsApi {
    async fn add_card(
        &self,
        _request: Request<proto::AddCardRequest>,
    ) -> Result<Response<proto::AddCardResponse>, Status> {
        Err(not_yet(
            "PaymentMethods.AddCard",
            "payment methods (issue 3)",
        ))
    }

    async fn confirm_card(
        &self,
        _request: Request<proto::ConfirmCardRequest>,
    ) -> Result<Response<proto::ConfirmCardResponse>, Status> {
        Err(not_yet(
            "PaymentMethods.ConfirmCard",
            "payment methods (issue 3)",
        ))
    }

    async fn list_payment_methods(
        &self,
        _request: Request<proto::ListPaymentMethodsRequest>,
    ) -> Result<Response<proto::ListPaymentMethodsResponse>, Status> {
        Err(not_yet(
            "PaymentMethods.ListPaymentMethods",
            "payment methods (issue 3)",
        ))
    }

    async fn get_payment_method(
        &self,
        _request: Request<proto::GetPaymentMethodRequest>,
    ) -> Result<Response<proto::GetPaymentMethodResponse>, Status> {
        Err(not_yet(
            "PaymentMethods.GetPaymentMethod",
            "payment methods (issue 3)",
        ))
    }

    async fn set_auto_charge(
        &self,
        _request: Request<proto::SetAutoChargeRequest>,
    ) -> Result<Response<proto::SetAutoChargeResponse>, Status> {
        Err(not_yet(
            "PaymentMethods.SetAutoCharge",
            "payment methods (issue 3)",
        ))
    }

    async fn reorder_payment_methods(
        &self,
        _request: Request<proto::ReorderPaymentMethodsRequest>,
    ) -> Result<Response<proto::ReorderPaymentMethodsResponse>, Status> {
        Err(not_yet(
            "PaymentMethods.ReorderPaymentMethods",
            "payment methods (issue 3)",
        ))
    }

    async fn remove_payment_method(
        &self,
        _request: Request<proto::RemovePaymentMethodRequest>,
    ) -> Result<Response<proto::RemovePaymentMethodResponse>, Status> {
        Err(not_yet(
            "PaymentMethods.RemovePaymentMethod",
            "payment methods (issue 3)",
        ))
    }

    async fn add_funds(
        &self,
        _request: Request<proto::AddFundsRequest>,
    ) -> Result<Response<proto::AddFundsResponse>, Status> {
        Err(not_yet(
            "PaymentMethods.AddFunds",
            "payment methods (issue 3)",
        ))
    }

    async fn retry_payment_method(
        &self,
        _request: Request<proto::RetryPaymentMethodRequest>,
    ) -> Result<Response<proto::RetryPaymentMethodResponse>, Status> {
        Err(not_yet(
            "PaymentMethods.RetryPaymentMethod",
            "payment methods (issue 3)",
        ))
    }
}
