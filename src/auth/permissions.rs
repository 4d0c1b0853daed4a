//! The one permission table: which access each RPC needs, and which role
//! grants which access. Nothing else decides who may call what.

use super::Role;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Access {
    /// Read an account's balance, history, cards and settings.
    Read,
    /// Change one's own account: cards, funds, settings.
    Manage,
    /// Internal operations: create accounts, debit, credit.
    Service,
    /// Read an account's audit trail (who changed what): the account's
    /// admin, and services.
    Audit,
}

const TABLE: &[(&str, Access)] = &[
    ("/billing.v1.Balances/CreateAccount", Access::Service),
    ("/billing.v1.Balances/GetBalance", Access::Read),
    ("/billing.v1.Balances/Debit", Access::Service),
    ("/billing.v1.Balances/Credit", Access::Service),
    ("/billing.v1.Balances/ListTransactions", Access::Read),
    ("/billing.v1.Balances/WatchBalanceEvents", Access::Read),
    ("/billing.v1.Balances/VerifyLedger", Access::Read),
    (
        "/billing.v1.BalancePolicy/GetLowBalanceSettings",
        Access::Read,
    ),
    (
        "/billing.v1.BalancePolicy/ApplyLowBalanceSettings",
        Access::Manage,
    ),
    ("/billing.v1.BalancePolicy/ListTopUps", Access::Read),
    ("/billing.v1.BalancePolicy/GetTopUp", Access::Read),
    ("/billing.v1.PaymentMethods/AddCard", Access::Manage),
    ("/billing.v1.PaymentMethods/ConfirmCard", Access::Manage),
    (
        "/billing.v1.PaymentMethods/ListPaymentMethods",
        Access::Read,
    ),
    ("/billing.v1.PaymentMethods/GetPaymentMethod", Access::Read),
    ("/billing.v1.PaymentMethods/SetAutoCharge", Access::Manage),
    (
        "/billing.v1.PaymentMethods/ReorderPaymentMethods",
        Access::Manage,
    ),
    (
        "/billing.v1.PaymentMethods/RemovePaymentMethod",
        Access::Manage,
    ),
    ("/billing.v1.PaymentMethods/AddFunds", Access::Manage),
    ("/billing.v1.PaymentMethods/ConfirmTopUp", Access::Manage),
    (
        "/billing.v1.PaymentMethods/RetryPaymentMethod",
        Access::Manage,
    ),
    (
        "/billing.v1.Notifications/GetNotificationSettings",
        Access::Read,
    ),
    (
        "/billing.v1.Notifications/UpdateNotificationSettings",
        Access::Manage,
    ),
    ("/billing.v1.Notifications/ListNotifications", Access::Read),
    (
        "/billing.v1.Notifications/SendTestNotification",
        Access::Manage,
    ),
    ("/billing.v1.Audit/ListAuditEvents", Access::Audit),
];

/// `path` as a `&'static str` when it is a billing RPC of the table (a
/// bounded label for metrics), else `None`.
pub fn known_method(path: &str) -> Option<&'static str> {
    TABLE
        .iter()
        .find(|(method, _)| *method == path)
        .map(|(method, _)| *method)
}

/// The access an RPC path needs; `None` for paths outside `billing.v1`
/// (health, reflection), which need no token.
pub fn required_access(path: &str) -> Option<Access> {
    if !path.starts_with("/billing.v1.") {
        return None;
    }
    // An unknown billing method still needs a valid token before tonic answers UNIMPLEMENTED.
    Some(
        TABLE
            .iter()
            .find(|(method, _)| *method == path)
            .map(|(_, access)| *access)
            .unwrap_or(Access::Service),
    )
}

pub(super) fn grants(role: Role, access: Access) -> bool {
    matches!(
        (role, access),
        (
            Role::Admin | Role::Commercial | Role::Billing,
            Access::Read | Access::Manage
        ) | (Role::Viewer, Access::Read)
            | (
                Role::Service,
                Access::Read | Access::Service | Access::Audit
            )
            | (Role::Admin, Access::Audit)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_and_reflection_need_no_token() {
        assert_eq!(required_access("/grpc.health.v1.Health/Check"), None);
        assert_eq!(
            required_access("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"),
            None
        );
    }

    #[test]
    fn viewers_read_but_never_change() {
        assert!(grants(Role::Viewer, Access::Read));
        assert!(!grants(Role::Viewer, Access::Manage));
        assert!(!grants(Role::Viewer, Access::Service));
    }

    /// The roles each RPC's comment in `proto/` names are the ones this table grants.
    #[test]
    fn every_rpc_documents_in_the_proto_the_roles_this_table_grants() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/proto/billing/v1");
        let protos: String = std::fs::read_dir(dir)
            .unwrap()
            .map(|entry| std::fs::read_to_string(entry.unwrap().path()).unwrap())
            .collect();
        for (method, access) in TABLE {
            let (service, rpc) = method[1..].split_once('/').unwrap();
            let service = service.trim_start_matches("billing.v1.");
            let start = protos
                .find(&format!("service {service} {{"))
                .unwrap_or_else(|| panic!("no service {service}"));
            let body = &protos[start..];
            let at = body
                .find(&format!("rpc {rpc}("))
                .unwrap_or_else(|| panic!("no rpc {method}"));
            // The comment right above the rpc, as one line.
            let comment: Vec<&str> = body[..at]
                .lines()
                .rev()
                .skip(1)
                .map(str::trim)
                .take_while(|line| line.starts_with("//"))
                .map(|line| line.trim_start_matches('/').trim())
                .collect();
            let comment: Vec<&str> = comment.into_iter().rev().collect();
            let comment = comment.join(" ");
            let roles = match access {
                Access::Read => "Roles: admin, commercial, billing, viewer (own account), service",
                Access::Manage => "Roles: admin, commercial, billing (own account).",
                Access::Service => "Roles: service.",
                Access::Audit => "Roles: admin (own account), service.",
            };
            assert!(
                comment.contains(roles),
                "{method} ({access:?}) should say {roles:?}: {comment}"
            );
        }
    }

    #[test]
    fn only_admins_and_services_read_the_audit_trail() {
        assert_eq!(
            required_access("/billing.v1.Audit/ListAuditEvents"),
            Some(Access::Audit)
        );
        for role in Role::ALL {
            assert_eq!(
                grants(role, Access::Audit),
                matches!(role, Role::Admin | Role::Service),
                "{role:?}"
            );
        }
    }

    #[test]
    fn services_debit_but_do_not_manage_cards() {
        assert!(grants(Role::Service, Access::Service));
        assert!(!grants(Role::Service, Access::Manage));
    }
}
