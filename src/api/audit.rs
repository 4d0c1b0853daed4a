//! `billing.v1.Audit`: an account's audit trail.

use sqlx::PgPool;
use tonic::{Request, Response, Status};

use super::authorize_account_id;
use super::convert::{optional_time, timestamp};
use crate::audit::{self, ActorType, AuditEvent, AuditFilter};
use crate::error::BillingError;
use crate::paging::{self, Page};
use crate::proto::{self, audit_server::Audit};

/// Longest actor subject or action name a filter may hold.
const MAX_FILTER_CHARS: usize = 256;

/// The `Audit` service: reads the trail `crate::audit` writes.
#[derive(Clone)]
pub struct AuditApi {
    pool: PgPool,
}

impl AuditApi {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }
}

#[tonic::async_trait]
impl Audit for AuditApi {
    async fn list_audit_events(
        &self,
        request: Request<proto::ListAuditEventsRequest>,
    ) -> Result<Response<proto::ListAuditEventsResponse>, Status> {
        let (_, account_id) = authorize_account_id(&request, &request.get_ref().account_id)?;
        let message = request.into_inner();
        let page = Page::parse(message.page_size, &message.page_token)?;
        let filter = AuditFilter {
            actor_subject: optional_text("actor_subject", &message.actor_subject)?,
            action: optional_text("action", &message.action)?,
            created_after: optional_time("created_after", message.created_after)?,
            created_before: optional_time("created_before", message.created_before)?,
        };
        let events = audit::list(&self.pool, &account_id, &filter, &page).await?;
        let next_page_token =
            paging::next_token(events.len(), &page, events.last().map(|e| e.audit_id));
        Ok(Response::new(proto::ListAuditEventsResponse {
            events: events.iter().map(event_to_proto).collect(),
            next_page_token,
        }))
    }
}

/// An exact-match filter: empty means none; control characters or huge values are refused.
fn optional_text(field: &str, text: &str) -> Result<Option<String>, BillingError> {
    if text.is_empty() {
        return Ok(None);
    }
    if text.chars().count() > MAX_FILTER_CHARS || text.chars().any(char::is_control) {
        return Err(BillingError::invalid(
            field,
            format!("must be at most {MAX_FILTER_CHARS} printable characters"),
        ));
    }
    Ok(Some(text.to_owned()))
}

fn event_to_proto(event: &AuditEvent) -> proto::AuditEvent {
    proto::AuditEvent {
        audit_event_id: event.audit_id.to_string(),
        account_id: event.account_id.clone(),
        actor: Some(proto::Actor {
            subject: event.actor_subject.clone(),
            roles: event.actor_roles.clone(),
            r#type: match event.actor_type {
                ActorType::User => proto::ActorType::User,
                ActorType::Service => proto::ActorType::Service,
                ActorType::Engine => proto::ActorType::Engine,
            } as i32,
        }),
        action: event.action.clone(),
        targets: event
            .targets
            .iter()
            .map(|(kind, id)| proto::AuditTarget {
                kind: kind.clone(),
                id: id.clone(),
            })
            .collect(),
        details: event
            .details
            .iter()
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect(),
        created_at: Some(timestamp(event.created_at)),
        idempotency_key: event.idempotency_key.clone().unwrap_or_default(),
        trace_id: event.trace_id.clone().unwrap_or_default(),
    }
}
