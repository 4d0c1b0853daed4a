//! From a verified token's claims to a [`Caller`], the way identity
//! providers send them: roles from one or more claims (`roles`,
//! `realm_access.roles`, a space-separated `scope`), renamed by an optional
//! map from the provider's names to billing's roles; the account from a
//! configurable claim.

use serde_json::Value;

use super::{Caller, Role};
use crate::config::AuthArgs;
use crate::error::BillingError;
use crate::ids::AccountId;

/// One entry of `--jwt-role-map`: the provider's role name `from` grants billing's role `to`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleMapping {
    pub from: String,
    pub to: Role,
}

impl RoleMapping {
    /// Parses `NAME=ROLE` (`billing-admin=admin`); the error names the billing roles.
    pub fn parse(text: &str) -> Result<RoleMapping, String> {
        let (from, to) = text
            .split_once('=')
            .ok_or_else(|| format!("{text:?} is not NAME=ROLE"))?;
        let from = from.trim();
        if from.is_empty() {
            return Err(format!("{text:?} has no provider role name before '='"));
        }
        let to = Role::parse(to.trim()).ok_or_else(|| {
            format!(
                "{text:?}: {:?} is not a billing role (admin, commercial, billing, viewer, service)",
                to.trim()
            )
        })?;
        Ok(RoleMapping {
            from: from.to_owned(),
            to,
        })
    }
}

/// Where the caller's roles and account are read in the claims.
#[derive(Debug, Clone)]
pub(super) struct ClaimMapping {
    roles_claims: Vec<String>,
    /// `None`: role names are billing's own.
    role_map: Option<Vec<RoleMapping>>,
    account_claim: String,
}

impl ClaimMapping {
    pub(super) fn from_args(args: &AuthArgs) -> ClaimMapping {
        let roles_claims: Vec<String> = args
            .jwt_roles_claim
            .iter()
            .map(|claim| claim.trim().to_owned())
            .filter(|claim| !claim.is_empty())
            .collect();
        ClaimMapping {
            roles_claims: if roles_claims.is_empty() {
                vec!["roles".into()]
            } else {
                roles_claims
            },
            role_map: (!args.jwt_role_map.is_empty()).then(|| args.jwt_role_map.clone()),
            account_claim: match args.jwt_account_claim.trim() {
                "" => "account".into(),
                claim => claim.to_owned(),
            },
        }
    }

    /// The caller a verified token's claims describe. A token without an
    /// account claim reaches nothing unless it has the service role.
    pub(super) fn caller(&self, claims: &Value) -> Result<Caller, BillingError> {
        let subject = claims
            .get("sub")
            .and_then(Value::as_str)
            .filter(|sub| !sub.is_empty())
            .ok_or_else(|| rejected("the sub claim is missing"))?;
        // The subject lands in the audit trail and in logs as sent: OpenID
        // Connect caps it at 255 characters, and control or bidirectional
        // override characters would let a token's issuer make it read as
        // someone else there.
        crate::ids::parse_text("sub", subject, 255).map_err(|_| {
            rejected("the sub claim is longer than 255 characters or holds control or bidirectional override characters")
        })?;
        let mut roles = Vec::new();
        for claim in &self.roles_claims {
            for name in role_names(lookup(claims, claim)) {
                for role in self.billing_roles(name) {
                    if !roles.contains(&role) {
                        roles.push(role);
                    }
                }
            }
        }
        let account = match lookup(claims, &self.account_claim) {
            None | Some(Value::Null) => None,
            Some(Value::String(text)) => {
                Some(AccountId::parse(text).map_err(|_| rejected("bad account claim"))?)
            }
            Some(_) => return Err(rejected("bad account claim")),
        };
        if account.is_none() && !roles.contains(&Role::Service) {
            return Err(rejected("a user token needs an account claim"));
        }
        Ok(Caller {
            subject: subject.to_owned(),
            account,
            roles,
            trace_id: None,
            engine: false,
        })
    }

    fn billing_roles<'a>(&'a self, name: &'a str) -> Box<dyn Iterator<Item = Role> + 'a> {
        match &self.role_map {
            None => Box::new(Role::parse(name).into_iter()),
            Some(map) => Box::new(
                map.iter()
                    .filter(move |mapping| mapping.from == name)
                    .map(|mapping| mapping.to),
            ),
        }
    }
}

fn rejected(why: &str) -> BillingError {
    BillingError::Unauthenticated(format!("invalid bearer token: {why}"))
}

/// The claim named `path`: a top-level claim of exactly that name (Auth0's
/// namespaced claims such as `https://billing.example/roles` hold dots),
/// else the dotted path through nested objects (`realm_access.roles`).
fn lookup<'a>(claims: &'a Value, path: &str) -> Option<&'a Value> {
    claims.get(path).or_else(|| {
        path.split('.')
            .try_fold(claims, |value, part| value.get(part))
    })
}

/// Role names in a claim: an array of strings, or one space-separated
/// string (OAuth `scope`); anything else holds none.
fn role_names(value: Option<&Value>) -> Vec<&str> {
    match value {
        Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).collect(),
        Some(Value::String(text)) => text.split_whitespace().collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn mapping(roles_claims: &[&str], role_map: &[&str], account_claim: &str) -> ClaimMapping {
        ClaimMapping::from_args(&AuthArgs {
            jwt_roles_claim: roles_claims.iter().map(|c| (*c).to_owned()).collect(),
            jwt_role_map: role_map
                .iter()
                .map(|m| RoleMapping::parse(m).unwrap())
                .collect(),
            jwt_account_claim: account_claim.into(),
            ..AuthArgs::default()
        })
    }

    #[test]
    fn roles_from_a_nested_claim_are_renamed_by_the_role_map() {
        let mapping = mapping(
            &["realm_access.roles"],
            &["billing-admin=admin", "billing-viewer=viewer"],
            "billing_account",
        );
        let caller = mapping
            .caller(&json!({
                "sub": "f:1234",
                "billing_account": "acme",
                "realm_access": {"roles": ["offline_access", "billing-admin", "admin"]},
            }))
            .unwrap();
        // `admin` is not in the map: with a map, only mapped names grant a role.
        assert_eq!(caller.roles, vec![Role::Admin]);
        assert_eq!(caller.account.unwrap().as_str(), "acme");
    }

    #[test]
    fn a_scope_string_is_split_on_spaces_and_namespaced_claims_keep_their_dots() {
        let mapping = mapping(
            &["scope", "https://billing.example/roles"],
            &["billing:read=viewer", "ops=billing"],
            "https://billing.example/account",
        );
        let caller = mapping
            .caller(&json!({
                "sub": "auth0|42",
                "scope": "openid billing:read",
                "https://billing.example/roles": ["ops"],
                "https://billing.example/account": "initech",
            }))
            .unwrap();
        assert_eq!(caller.roles, vec![Role::Viewer, Role::Billing]);
        assert_eq!(caller.account.unwrap().as_str(), "initech");
    }

    #[test]
    fn without_a_role_map_names_are_billings_own_and_unknown_names_grant_nothing() {
        let mapping = mapping(&["roles"], &[], "account");
        let caller = mapping
            .caller(&json!({"sub": "x", "account": "acme", "roles": ["viewer", "root"]}))
            .unwrap();
        assert_eq!(caller.roles, vec![Role::Viewer]);
    }

    #[test]
    fn a_user_token_needs_an_account_and_a_non_string_account_is_refused() {
        let mapping = mapping(&["roles"], &[], "account");
        assert!(
            mapping
                .caller(&json!({"sub": "x", "roles": ["admin"]}))
                .is_err()
        );
        assert!(
            mapping
                .caller(&json!({"sub": "x", "roles": ["admin"], "account": 7}))
                .is_err()
        );
        let service = mapping
            .caller(&json!({"sub": "svc", "roles": ["service"]}))
            .unwrap();
        assert!(service.account.is_none());
    }

    #[test]
    fn a_subject_that_could_read_as_someone_else_in_the_audit_trail_is_refused() {
        let mapping = mapping(&["roles"], &[], "account");
        for subject in [
            "admin\u{202E}nimda",
            "ops\u{2066}x\u{2069}",
            "line\nbreak",
            &"s".repeat(256),
        ] {
            let refused = mapping
                .caller(&json!({"sub": subject, "roles": ["service"]}))
                .unwrap_err();
            assert!(
                refused.to_string().contains("sub claim"),
                "{subject:?}: {refused}"
            );
        }
        let longest = "s".repeat(255);
        for subject in ["auth0|42", "\u{05D0}\u{200F}x", longest.as_str()] {
            assert!(
                mapping
                    .caller(&json!({"sub": subject, "roles": ["service"]}))
                    .is_ok(),
                "{subject:?}"
            );
        }
    }

    #[test]
    fn role_map_entries_name_a_billing_role() {
        assert!(RoleMapping::parse("billing-admin=admin").is_ok());
        assert!(RoleMapping::parse("billing-admin=root").is_err());
        assert!(RoleMapping::parse("=admin").is_err());
        assert!(RoleMapping::parse("admin").is_err());
    }
}
