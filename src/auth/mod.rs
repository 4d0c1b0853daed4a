//! Who is calling and what they may do.
//!
//! `token` verifies and mints JWTs with the keys of `keys` (files and
//! secrets, re-read on change) and `jwks` (an identity provider's JWK set);
//! `claims` turns a verified token's claims into a [`Caller`];
//! `permissions` is the one table of which role may call which RPC; `layer`
//! is the tower layer that authenticates every billing RPC and checks the
//! role; [`authorize_account`] is the one place an account-scoped request is
//! matched against the caller's account.

mod claims;
mod jwks;
mod keys;
mod layer;
mod permissions;
mod token;

pub use claims::RoleMapping;
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
    /// Internal microservices: debits and credits; every account, or only
    /// the one of its token's account claim.
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
    /// The one account the token may reach, whatever its roles; `None` only
    /// for service tokens without an account claim, which reach every account.
    pub account: Option<AccountId>,
    /// Known roles only; unknown role strings grant nothing.
    pub roles: Vec<Role>,
    /// The request's W3C trace id (32 hex digits), written to the audit
    /// trail; `None` when the request carried none and traces are off.
    pub trace_id: Option<String>,
    /// One of billing's own engines (the top-up engine, a payment
    /// processor's webhook), not the bearer of a token.
    pub engine: bool,
}

impl Caller {
    /// Billing's own engine `subject`, acting with the service role on any account.
    pub fn engine(subject: &str) -> Caller {
        Caller {
            subject: subject.to_owned(),
            account: None,
            roles: vec![Role::Service],
            trace_id: None,
            engine: true,
        }
    }

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

    /// A service token without an account claim (or an engine), for an
    /// access the service role grants. A token bound to an account never is.
    fn reaches_every_account(&self, access: Access) -> bool {
        self.account.is_none()
            && self
                .roles
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
            "only a service token without an account claim may read every account; set account_id"
                .into(),
        )),
        Some(requested) if caller.account.as_ref() == Some(requested) => Ok(()),
        Some(_) => Err(BillingError::NotFound("account")),
    }
}
