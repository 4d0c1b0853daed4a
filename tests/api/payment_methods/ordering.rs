//! Charge priority and the primary after add, reorder, remove and auto-charge changes.

use billing::proto;
use tonic::Code;

use super::*;
use crate::helpers::authed;

/// (last4, priority, auto_charge, primary) of each listed method, in order.
async fn shape(app: &TestApp, token: &str) -> Vec<(String, i32, bool, bool)> {
    list(app, token, ACCT)
        .await
        .into_iter()
        .map(|m| (m.last4, m.priority, m.auto_charge, m.primary))
        .collect()
}

fn row(last4: &str, priority: i32, auto_charge: bool, primary: bool) -> (String, i32, bool, bool) {
    (last4.into(), priority, auto_charge, primary)
}

async fn set_auto(app: &TestApp, token: &str, id: &str, enabled: bool) -> proto::PaymentMethod {
    client(app)
        .set_auto_charge(authed(
            token,
            proto::SetAutoChargeRequest {
                account_id: ACCT.into(),
                payment_method_id: id.into(),
                enabled,
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .payment_method
        .unwrap()
}

async fn reorder(
    app: &TestApp,
    token: &str,
    ids: &[&str],
) -> Result<Vec<proto::PaymentMethod>, tonic::Status> {
    client(app)
        .reorder_payment_methods(authed(
            token,
            proto::ReorderPaymentMethodsRequest {
                account_id: ACCT.into(),
                payment_method_ids: ids.iter().map(|s| s.to_string()).collect(),
            },
        ))
        .await
        .map(|r| r.into_inner().payment_methods)
}

#[tokio::test]
async fn priority_and_primary_follow_adds_reorders_auto_charge_and_removal() {
    let (app, token) = app_with_accounts().await;
    let visa = add_active_card(&app, &token, ACCT, VISA).await;
    let master = add_active_card(&app, &token, ACCT, MASTERCARD).await;
    let amex = add_active_card(&app, &token, ACCT, AMEX).await;
    assert_eq!(
        shape(&app, &token).await,
        vec![
            row("4242", 1, true, true),
            row("4444", 2, false, false),
            row("0005", 3, false, false)
        ]
    );

    let reordered = reorder(&app, &token, &[&amex, &master, &visa])
        .await
        .unwrap();
    assert_eq!(
        reordered
            .iter()
            .map(|m| m.last4.as_str())
            .collect::<Vec<_>>(),
        ["0005", "4444", "4242"]
    );
    // The primary is the first ACTIVE auto-charge method, not the first listed.
    assert_eq!(
        shape(&app, &token).await,
        vec![
            row("0005", 1, false, false),
            row("4444", 2, false, false),
            row("4242", 3, true, true)
        ]
    );

    let enabled = set_auto(&app, &token, &master, true).await;
    assert!(enabled.auto_charge && enabled.primary);
    assert_eq!(
        shape(&app, &token).await,
        vec![
            row("0005", 1, false, false),
            row("4444", 2, true, true),
            row("4242", 3, true, false)
        ]
    );
    assert!(!set_auto(&app, &token, &master, false).await.primary);
    assert!(set_auto(&app, &token, &master, true).await.primary);

    client(&app)
        .remove_payment_method(authed(
            &token,
            proto::RemovePaymentMethodRequest {
                account_id: ACCT.into(),
                payment_method_id: master.clone(),
            },
        ))
        .await
        .unwrap();
    // Removed methods are not listed; the others close ranks and the next auto-charge method is primary.
    assert_eq!(
        shape(&app, &token).await,
        vec![row("0005", 1, false, false), row("4242", 2, true, true)]
    );
    // The removed id is no longer part of a valid permutation.
    let error = reorder(&app, &token, &[&visa, &amex, &master])
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument);
    reorder(&app, &token, &[&visa, &amex]).await.unwrap();
    assert_eq!(
        shape(&app, &token).await,
        vec![row("4242", 1, true, true), row("0005", 2, false, false)]
    );
    let audits = count_where(
        &app,
        "SELECT COUNT(*) FROM audit_log WHERE action IN ('reorder_payment_methods', 'set_auto_charge', 'remove_payment_method')",
    )
    .await;
    assert_eq!(audits, 2 + 3 + 1);
    app.stop().await;
}

#[tokio::test]
async fn reorder_must_be_an_exact_permutation_and_changes_nothing_otherwise() {
    let (app, token) = app_with_accounts().await;
    let visa = add_active_card(&app, &token, ACCT, VISA).await;
    let master = add_active_card(&app, &token, ACCT, MASTERCARD).await;
    let other_token = app.token("admin", Some(OTHER));
    let foreign = add_active_card(&app, &other_token, OTHER, AMEX).await;
    let before = shape(&app, &token).await;
    for ids in [
        vec![visa.as_str()],
        vec![visa.as_str(), visa.as_str()],
        vec![visa.as_str(), master.as_str(), master.as_str()],
        vec![visa.as_str(), foreign.as_str()],
        vec![visa.as_str(), master.as_str(), foreign.as_str()],
        vec![visa.as_str(), "pm_does_not_exist"],
        vec![],
    ] {
        let error = reorder(&app, &token, &ids).await.unwrap_err();
        assert_eq!(error.code(), Code::InvalidArgument, "{ids:?}");
        assert!(
            error.message().starts_with("payment_method_ids"),
            "{}",
            error.message()
        );
        assert!(
            !error.message().contains(&foreign),
            "nothing about the other account leaks"
        );
    }
    assert_eq!(shape(&app, &token).await, before);
    app.stop().await;
}

#[tokio::test]
async fn list_pages_in_priority_order() {
    let (app, token) = app_with_accounts().await;
    for n in 0..3 {
        add_active_card(&app, &token, ACCT, &unique_visa(n)).await;
    }
    let page = |page_token: String| {
        let app = &app;
        let token = token.clone();
        async move {
            client(app)
                .list_payment_methods(authed(
                    &token,
                    proto::ListPaymentMethodsRequest {
                        account_id: ACCT.into(),
                        page_size: 2,
                        page_token,
                    },
                ))
                .await
                .unwrap()
                .into_inner()
        }
    };
    let first = page(String::new()).await;
    assert_eq!(
        first
            .payment_methods
            .iter()
            .map(|m| m.priority)
            .collect::<Vec<_>>(),
        [1, 2]
    );
    let second = page(first.next_page_token).await;
    assert_eq!(
        second
            .payment_methods
            .iter()
            .map(|m| m.priority)
            .collect::<Vec<_>>(),
        [3]
    );
    assert!(second.next_page_token.is_empty());
    app.stop().await;
}
