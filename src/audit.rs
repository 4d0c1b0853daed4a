//! The audit trail: every change, who made it (a person's or a service's
//! token, or one of billing's own engines), under which role, with which
//! request (the client's idempotency key, the trace id), and when. Written
//! inside the transaction of the change it records; append-only (a trigger
//! refuses UPDATE and DELETE); read by `Audit.ListAuditEvents`.
//!
//! An action is the snake_case name of the RPC that made the change
//! (`add_card`, `debit`, `apply_low_balance_settings`, …) or of the engine's
//! step (`start_top_up`, `finish_top_up`, `disable_payment_method`, …). The
//! details name the change's targets (`<kind>_id`, `<kind>_ids`) and its
//! parameters; never card data (numbers, CVC, brand or last digits) and
//! never secrets.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool, Row};

use crate::auth::{Caller, Role};
use crate::error::BillingError;
use crate::ids::{AccountId, IdempotencyKey};
use crate::paging::Page;

/// Who acted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActorType {
    /// A token of one of the account's users.
    User,
    /// A token with the service role (an internal microservice).
    Service,
    /// One of billing's own engines (automatic top-ups, a payment
    /// processor's webhook).
    Engine,
}

impl ActorType {
    pub fn of(caller: &Caller) -> ActorType {
        if caller.engine {
            ActorType::Engine
        } else if caller.roles.contains(&Role::Service) {
            ActorType::Service
        } else {
            ActorType::User
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ActorType::User => "user",
            ActorType::Service => "service",
            ActorType::Engine => "engine",
        }
    }

    fn parse(text: &str) -> Option<ActorType> {
        [ActorType::User, ActorType::Service, ActorType::Engine]
            .into_iter()
            .find(|kind| kind.as_str() == text)
    }
}

/// Records a change that took no idempotency key (settings, engine steps).
pub async fn record(
    connection: &mut PgConnection,
    caller: &Caller,
    action: &str,
    account_id: Option<&str>,
    details: serde_json::Value,
) -> Result<(), BillingError> {
    record_keyed(connection, caller, action, account_id, None, details).await
}

/// Records a change made under a client's idempotency key (the service's
/// own internal keys are not a request's and are left out).
pub async fn record_keyed(
    connection: &mut PgConnection,
    caller: &Caller,
    action: &str,
    account_id: Option<&str>,
    idempotency_key: Option<&IdempotencyKey>,
    details: serde_json::Value,
) -> Result<(), BillingError> {
    let idempotency_key = idempotency_key
        .filter(|key| !key.is_internal())
        .map(IdempotencyKey::as_str);
    sqlx::query(
        "INSERT INTO audit_log (actor, role, actor_type, action, account_id, details, idempotency_key, trace_id) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(&caller.subject)
    .bind(caller.roles_label())
    .bind(ActorType::of(caller).as_str())
    .bind(action)
    .bind(account_id)
    .bind(details)
    .bind(idempotency_key)
    .bind(caller.trace_id.as_deref())
    .execute(connection)
    .await?;
    Ok(())
}

/// One change of the trail, as `ListAuditEvents` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditEvent {
    /// The row's id: the trail's order (and the page token's key).
    pub audit_id: i64,
    pub account_id: String,
    pub actor_subject: String,
    pub actor_type: ActorType,
    /// The actor's roles, as billing names them.
    pub actor_roles: Vec<String>,
    pub action: String,
    /// `(kind, id)`: what the change touched, e.g. `("payment_method", "pm_…")`.
    pub targets: Vec<(String, String)>,
    /// The change's other parameters, as text.
    pub details: BTreeMap<String, String>,
    pub idempotency_key: Option<String>,
    pub trace_id: Option<String>,
    pub created_at: DateTime<Utc>,
}

/// Which events of one account to list; every filter is optional.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    /// Exactly this actor (`sub`, or the engine's name).
    pub actor_subject: Option<String>,
    /// Exactly this action.
    pub action: Option<String>,
    /// Inclusive.
    pub created_after: Option<DateTime<Utc>>,
    /// Exclusive.
    pub created_before: Option<DateTime<Utc>>,
}

/// Keys of the details that are never shown, whatever wrote them.
const WITHHELD_DETAILS: [&str; 7] = [
    "brand",
    "last4",
    "card_number",
    "number",
    "cvc",
    "exp_month",
    "exp_year",
];

/// The account's events, newest first, filtered and paged.
pub async fn list(
    pool: &PgPool,
    account_id: &AccountId,
    filter: &AuditFilter,
    page: &Page,
) -> Result<Vec<AuditEvent>, BillingError> {
    let rows = sqlx::query(
        "SELECT audit_id, account_id, actor, role, actor_type, action, details, idempotency_key, \
                trace_id, created_at \
           FROM audit_log \
          WHERE account_id = $1 \
            AND ($2::text IS NULL OR actor = $2) \
            AND ($3::text IS NULL OR action = $3) \
            AND ($4::timestamptz IS NULL OR created_at >= $4) \
            AND ($5::timestamptz IS NULL OR created_at < $5) \
            AND ($6::bigint IS NULL OR audit_id < $6) \
          ORDER BY audit_id DESC \
          LIMIT $7",
    )
    .bind(account_id.as_str())
    .bind(filter.actor_subject.as_deref())
    .bind(filter.action.as_deref())
    .bind(filter.created_after)
    .bind(filter.created_before)
    .bind(page.after_id)
    .bind(page.size)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|row| {
            let role: String = row.try_get("role")?;
            let actor_type: String = row.try_get("actor_type")?;
            let details: serde_json::Value = row.try_get("details")?;
            let (targets, details) = split_details(details);
            Ok(AuditEvent {
                audit_id: row.try_get("audit_id")?,
                account_id: row.try_get("account_id")?,
                actor_subject: row.try_get("actor")?,
                actor_type: ActorType::parse(&actor_type).ok_or_else(|| {
                    BillingError::Unexpected(anyhow::anyhow!("unknown actor type {actor_type:?}"))
                })?,
                actor_roles: role
                    .split(',')
                    .filter(|r| !r.is_empty())
                    .map(str::to_owned)
                    .collect(),
                action: row.try_get("action")?,
                targets,
                details,
                idempotency_key: row.try_get("idempotency_key")?,
                trace_id: row.try_get("trace_id")?,
                created_at: row.try_get("created_at")?,
            })
        })
        .collect()
}

/// Targets (`<kind>_id` and `<kind>_ids` keys) apart from the other details
/// (as text); card data is withheld.
fn split_details(details: serde_json::Value) -> (Vec<(String, String)>, BTreeMap<String, String>) {
    let mut targets = Vec::new();
    let mut rest = BTreeMap::new();
    let serde_json::Value::Object(map) = details else {
        return (targets, rest);
    };
    for (key, value) in map {
        if WITHHELD_DETAILS.contains(&key.as_str()) {
            continue;
        }
        if let Some(kind) = key.strip_suffix("_ids")
            && let serde_json::Value::Array(ids) = &value
        {
            targets.extend(ids.iter().map(|id| (kind.to_owned(), text(id))));
            continue;
        }
        if let Some(kind) = key.strip_suffix("_id") {
            targets.push((kind.to_owned(), text(&value)));
            continue;
        }
        rest.insert(key, text(&value));
    }
    (targets, rest)
}

/// A JSON value as text: strings as they are, arrays of scalars comma-separated, the rest as JSON.
fn text(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::String(text) => text.clone(),
        serde_json::Value::Array(items)
            if items
                .iter()
                .all(|item| !item.is_array() && !item.is_object()) =>
        {
            items.iter().map(text).collect::<Vec<_>>().join(",")
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn targets_are_split_from_details_and_card_data_is_withheld() {
        let (targets, details) = split_details(json!({
            "payment_method_id": "pm_1",
            "payment_method_ids": ["pm_2", "pm_3"],
            "brand": "visa",
            "last4": "4242",
            "amount": "30.00",
            "enabled": true,
            "disabled_kinds": ["low_balance", "test"],
        }));
        assert_eq!(
            targets,
            vec![
                ("payment_method".to_owned(), "pm_1".to_owned()),
                ("payment_method".to_owned(), "pm_2".to_owned()),
                ("payment_method".to_owned(), "pm_3".to_owned()),
            ]
        );
        assert_eq!(
            details,
            BTreeMap::from([
                ("amount".to_owned(), "30.00".to_owned()),
                ("disabled_kinds".to_owned(), "low_balance,test".to_owned()),
                ("enabled".to_owned(), "true".to_owned()),
            ])
        );
    }
}
