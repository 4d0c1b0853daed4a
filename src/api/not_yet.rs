//! Services of the API contract whose capabilities arrive in later issues.
//! Every RPC authenticates and authorizes its account like the others
//! (another account is `NOT_FOUND`), then answers `UNIMPLEMENTED` with a
//! message that says which capability will bring it.

use tonic::{Request, Response, Status};

use super::authorize_account_id;
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
        request: Request<proto::GetLowBalanceSettingsRequest>,
    ) -> Result<Response<proto::GetLowBalanceSettingsResponse>, Status> {
        authorize_account_id(&request, &request.get_ref().account_id)?;
        Err(not_yet(
            "BalancePolicy.GetLowBalanceSettings",
            "the low-balance settings and top-up engine (issue 4)",
        ))
    }

    async fn apply_low_balance_settings(
        &self,
        request: Request<proto::ApplyLowBalanceSettingsRequest>,
    ) -> Result<Response<proto::ApplyLowBalanceSettingsResponse>, Status> {
        authorize_account_id(&request, &request.get_ref().account_id)?;
        Err(not_yet(
            "BalancePolicy.ApplyLowBalanceSettings",
            "the low-balance settings and top-up engine (issue 4)",
        ))
    }

    async fn list_top_ups(
        &self,
        request: Request<proto::ListTopUpsRequest>,
    ) -> Result<Response<proto::ListTopUpsResponse>, Status> {
        authorize_account_id(&request, &request.get_ref().account_id)?;
        Err(not_yet(
            "BalancePolicy.ListTopUps",
            "the low-balance settings and top-up engine (issue 4)",
        ))
    }

    async fn get_top_up(
        &self,
        request: Request<proto::GetTopUpRequest>,
    ) -> Result<Response<proto::GetTopUpResponse>, Status> {
        authorize_account_id(&request, &request.get_ref().account_id)?;
        Err(not_yet(
            "BalancePolicy.GetTopUp",
            "the low-balance settings and top-up engine (issue 4)",
        ))
    }
}
