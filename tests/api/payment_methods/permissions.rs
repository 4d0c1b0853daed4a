//! The permission matrix: every PaymentMethods RPC × every role × own/other account.

use billing::proto;
use tonic::Code;

use super::*;
use crate::helpers::authed;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Rpc {
    AddCard,
    ConfirmCard,
    List,
    Get,
    SetAutoCharge,
    Reorder,
    Remove,
    AddFunds,
    Retry,
}

const RPCS: [Rpc; 9] = [
    Rpc::AddCard,
    Rpc::ConfirmCard,
    Rpc::List,
    Rpc::Get,
    Rpc::SetAutoCharge,
    Rpc::Reorder,
    Rpc::Remove,
    Rpc::AddFunds,
    Rpc::Retry,
];

fn is_read(rpc: Rpc) -> bool {
    matches!(rpc, Rpc::List | Rpc::Get)
}

/// DESIGN.md "Access": admin/commercial/billing manage their own account,
/// viewer reads it, service reads any account and manages none; another
/// account is NOT_FOUND.
fn expected(role: &str, rpc: Rpc, own: bool) -> Code {
    match role {
        "service" if is_read(rpc) => Code::Ok,
        "service" => Code::PermissionDenied,
        "viewer" if !is_read(rpc) => Code::PermissionDenied,
        _ if own => Code::Ok,
        _ => Code::NotFound,
    }
}

struct Fixture {
    /// Per account: an ACTIVE card that every call may use.
    card: [(String, String); 2],
}

async fn call(
    app: &TestApp,
    fixture: &Fixture,
    token: &str,
    rpc: Rpc,
    own: bool,
    nonce: u32,
) -> Code {
    let admin_own = app.token("admin", Some(ACCT));
    let admin_other = app.token("admin", Some(OTHER));
    let (account, card_id, admin) = if own {
        (ACCT, fixture.card[0].1.clone(), admin_own)
    } else {
        (OTHER, fixture.card[1].1.clone(), admin_other)
    };
    let mut c = client(app);
    let key = format!("perm-{nonce}");
    let result = match rpc {
        Rpc::AddCard => c
            .add_card(authed(
                token,
                add_card_request(account, card(&unique_visa(nonce)), &key),
            ))
            .await
            .map(|_| ()),
        // Confirming an active card as passed is a no-op that answers OK.
        Rpc::ConfirmCard => confirm(app, token, account, &card_id, true)
            .await
            .map(|_| ()),
        Rpc::List => c
            .list_payment_methods(authed(
                token,
                proto::ListPaymentMethodsRequest {
                    account_id: account.into(),
                    ..Default::default()
                },
            ))
            .await
            .map(|_| ()),
        Rpc::Get => c
            .get_payment_method(authed(
                token,
                proto::GetPaymentMethodRequest {
                    account_id: account.into(),
                    payment_method_id: card_id,
                },
            ))
            .await
            .map(|_| ()),
        Rpc::SetAutoCharge => c
            .set_auto_charge(authed(
                token,
                proto::SetAutoChargeRequest {
                    account_id: account.into(),
                    payment_method_id: card_id,
                    enabled: true,
                },
            ))
            .await
            .map(|_| ()),
        Rpc::Reorder => {
            let ids = list(app, &admin, account)
                .await
                .into_iter()
                .map(|m| m.payment_method_id)
                .collect();
            c.reorder_payment_methods(authed(
                token,
                proto::ReorderPaymentMethodsRequest {
                    account_id: account.into(),
                    payment_method_ids: ids,
                },
            ))
            .await
            .map(|_| ())
        }
        Rpc::Remove => {
            let doomed = add_active_card(app, &admin, account, &unique_visa(500 + nonce)).await;
            c.remove_payment_method(authed(
                token,
                proto::RemovePaymentMethodRequest {
                    account_id: account.into(),
                    payment_method_id: doomed,
                },
            ))
            .await
            .map(|_| ())
        }
        Rpc::AddFunds => c
            .add_funds(authed(
                token,
                proto::AddFundsRequest {
                    account_id: account.into(),
                    amount: "1.00".into(),
                    payment_method_id: String::new(),
                    idempotency_key: key,
                },
            ))
            .await
            .map(|_| ()),
        Rpc::Retry => c
            .retry_payment_method(authed(
                token,
                proto::RetryPaymentMethodRequest {
                    account_id: account.into(),
                    payment_method_id: card_id,
                    idempotency_key: key,
                    amount: "1.00".into(),
                },
            ))
            .await
            .map(|_| ()),
    };
    match result {
        Ok(()) => Code::Ok,
        Err(status) => status.code(),
    }
}

#[tokio::test]
async fn every_payment_methods_rpc_for_every_role_on_own_and_other_accounts() {
    let (app, admin) = app_with_accounts().await;
    let other_admin = app.token("admin", Some(OTHER));
    let fixture = Fixture {
        card: [
            (ACCT.into(), add_active_card(&app, &admin, ACCT, VISA).await),
            (
                OTHER.into(),
                add_active_card(&app, &other_admin, OTHER, VISA).await,
            ),
        ],
    };
    let mut nonce = 0;
    let mut failures = Vec::new();
    for role in ["admin", "commercial", "billing", "viewer", "service"] {
        let token = app.token(role, if role == "service" { None } else { Some(ACCT) });
        for rpc in RPCS {
            for own in [true, false] {
                nonce += 1;
                let got = call(&app, &fixture, &token, rpc, own, nonce).await;
                let want = expected(role, rpc, own);
                if got != want {
                    failures.push(format!(
                        "{role} {rpc:?} own={own}: got {got:?}, want {want:?}"
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // Nothing was charged or removed on the other account.
    let foreign_changes = count_where(
        &app,
        "SELECT (SELECT COUNT(*) FROM top_ups WHERE account_id = 'globex') \
              + (SELECT COUNT(*) FROM payment_methods WHERE account_id = 'globex' AND status = 'REMOVED')",
    )
    .await;
    assert_eq!(foreign_changes, 0);
    app.stop().await;
}
