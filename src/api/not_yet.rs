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
