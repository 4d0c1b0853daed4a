//! Who is calling and what they may do.
//!
//! `token` verifies and mints JWTs; `permissions` is the one table of which
//! role may call which RPC; `layer` is the tower layer that authenticates
//! every billing RPC and checks the role; [`authorize_account`] is the one
//! place an account-scoped request is matched against the caller's account.

mod layer;
mod permissions;
mod token;

pub use layer::AuthLayer;
pub use permissions::{Access, known_method, required_access};
pub use token::{Claims, DEFAULT_LEEWAY_SECS, KeySet};

use crate::error::BillingError;
use crate::ids::AccountId;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Admin,
    Commercial,
    Billing,
    Viewer,
    /// Internal microservices: any account, debits and credits.
    Service,
}

impl Role {
    pub const ALL: [Role; 5] = [
        Role::Admin,
        Role::Commercial,
        Role::Billing,
        Role::Viewer,
        Role::Service,
    ];

    pub fn parse(text: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|role| role.as_str() == text)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Commercial => "commercial",
            Role::Billing => "billing",
            Role::Viewer => "viewer",
            Role::Service => "service",
        }
    }
}

/// When the caller's token stops being accepted (its `exp` plus the
/// leeway); put into the request extensions by [`AuthLayer`] next to the
/// [`Caller`]. Streams end then.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenValidUntil(pub std::time::SystemTime);

/// An authenticated caller, put into the request extensions by [`AuthLayer`].
#[derive(Debug, Clone)]
pub struct Caller {
    pub subject: String,
    /// The one account a user token may reach; `None` for service tokens.
    pub account: Option<AccountId>,
    /// Known roles only; unknown role strings grant nothing.
    pub roles: Vec<Role>,
}

impl Caller {
    pub fn may(&self, access: Access) -> bool {
        self.roles
            .iter()
            .any(|role| permissions::grants(*role, access))
    }

    /// The roles, comma-separated, for the audit log.
    pub fn roles_label(&self) -> String {
        let names: Vec<&str> = self.roles.iter().map(|r| r.as_str()).collect();
        names.join(",")
    }

    fn reaches_every_account(&self, access: Access) -> bool {
        self.roles
            .iter()
            .any(|role| *role == Role::Service && permissions::grants(*role, access))
    }
}

/// Checks that `caller`, already allowed `access` by role, may touch
/// `account` (`None` = every account). Another account is `NOT_FOUND`, so
/// nothing about its existence leaks.
pub fn authorize_account(
    caller: &Caller,
    access: Access,
    account: Option<&AccountId>,
) -> Result<(), BillingError> {
    if !caller.may(access) {
        return Err(BillingError::PermissionDenied(format!(
            "the caller's roles ({}) do not allow this call",
            caller.roles_label()
        )));
    }
    if caller.reaches_every_account(access) {
        return Ok(());
    }
    match account {
        None => Err(BillingError::PermissionDenied(
            "only the service role may read every account; set account_id".into(),
        )),
        Some(requested) if caller.account.as_ref() == Some(requested) => Ok(()),
        Some(_) => Err(BillingError::NotFound("account")),
    }
}
