//! `billing.v1.Notifications`: recipients, kinds, the outbox, a test email.

use sqlx::PgPool;
use tonic::{Request, Response, Status};

use super::authorize_account_id;
use super::caller_limits::CallerLimits;
use super::convert::timestamp;
use crate::error::{BillingError, Reason, Violations};
use crate::ids::{IdempotencyKey, parse_email};
use crate::notifications::{
    self, Notice, Notification, NotificationKind, NotificationSettings, NotificationStatus,
};
use crate::paging::{self, Page};
use crate::proto::{self, notifications_server::Notifications};

const MAX_RECIPIENTS: usize = 10;

#[derive(Clone)]
pub struct NotificationsApi {
    pool: PgPool,
    limits: CallerLimits,
}

impl NotificationsApi {
    pub fn new(pool: PgPool, limits: CallerLimits) -> Self {
        Self { pool, limits }
    }
}

#[tonic::async_trait]
impl Notifications for NotificationsApi {
    async fn get_notification_settings(
        &self,
        request: Request<proto::GetNotificationSettingsRequest>,
    ) -> Result<Response<proto::GetNotificationSettingsResponse>, Status> {
        let (_, account_id) = authorize_account_id(&request, &request.get_ref().account_id)?;
        let settings = notifications::get_settings(&self.pool, &account_id).await?;
        Ok(Response::new(proto::GetNotificationSettingsResponse {
            settings: Some(settings_to_proto(&settings)),
        }))
    }

    async fn update_notification_settings(
        &self,
        request: Request<proto::UpdateNotificationSettingsRequest>,
    ) -> Result<Response<proto::UpdateNotificationSettingsResponse>, Status> {
        let (caller, account_id) = authorize_account_id(&request, &request.get_ref().account_id)?;
        let message = request.into_inner();
        let mut violations = Violations::new();
        if message.recipients.len() > MAX_RECIPIENTS {
            return Err(BillingError::invalid(
                "recipients",
                format!("allows at most {MAX_RECIPIENTS} addresses"),
            )
            .into());
        }
        let mut recipients = Vec::new();
        for (index, address) in message.recipients.iter().enumerate() {
            let Some(parsed) =
                violations.check(parse_email(&format!("recipients[{index}]"), address.trim()))
            else {
                continue;
            };
            if !recipients.contains(&parsed) {
                recipients.push(parsed);
            }
        }
        let kinds = if message.enabled_kinds.is_empty() {
            NotificationKind::ALL.to_vec()
        } else {
            violations
                .check(
                    message
                        .enabled_kinds
                        .iter()
                        .map(|&k| {
                            kind_from_proto(k).ok_or_else(|| {
                                BillingError::invalid("enabled_kinds", "contains an unknown kind")
                            })
                        })
                        .collect::<Result<Vec<_>, _>>(),
                )
                .unwrap_or_default()
        };
        violations.finish()?;
        // Valid requests only use up the account's rate (a typo costs nothing).
        self.limits.settings_change(account_id.as_str())?;
        let settings =
            notifications::update_settings(&self.pool, &caller, &account_id, recipients, kinds)
                .await?;
        Ok(Response::new(proto::UpdateNotificationSettingsResponse {
            settings: Some(settings_to_proto(&settings)),
        }))
    }

    async fn list_notifications(
        &self,
        request: Request<proto::ListNotificationsRequest>,
    ) -> Result<Response<proto::ListNotificationsResponse>, Status> {
        let (_, account_id) = authorize_account_id(&request, &request.get_ref().account_id)?;
        let message = request.into_inner();
        let page = Page::parse(message.page_size, &message.page_token)?;
        let rows = notifications::list_notifications(&self.pool, &account_id, &page).await?;
        let next_page_token = paging::next_token(rows.len(), &page, rows.last().map(|n| n.seq));
        Ok(Response::new(proto::ListNotificationsResponse {
            notifications: rows.iter().map(notification_to_proto).collect(),
            next_page_token,
        }))
    }

    async fn send_test_notification(
        &self,
        request: Request<proto::SendTestNotificationRequest>,
    ) -> Result<Response<proto::SendTestNotificationResponse>, Status> {
        let (caller, account_id) = authorize_account_id(&request, &request.get_ref().account_id)?;
        let key = IdempotencyKey::parse(&request.get_ref().idempotency_key)?;
        self.limits.test_notification(account_id.as_str())?;
        let mut transaction = self.pool.begin().await.map_err(BillingError::from)?;
        // Scoped by the account (and the kind) in the outbox itself; the key is the client's.
        let dedupe_key = notifications::dedupe_key(&["test", key.as_str()]);
        let queued = notifications::enqueue(
            &mut transaction,
            account_id.as_str(),
            &Notice::Test,
            &dedupe_key,
        )
        .await?
        .ok_or_else(|| {
            BillingError::precondition(
                Reason::NoRecipient,
                format!("accounts/{account_id}"),
                "the account has no recipient: set recipients or a billing email",
            )
        })?;
        crate::audit::record_keyed(
            &mut transaction,
            &caller,
            "send_test_notification",
            Some(account_id.as_str()),
            Some(&key),
            serde_json::json!({ "notification_id": queued.notification_id }),
        )
        .await?;
        transaction.commit().await.map_err(BillingError::from)?;
        Ok(Response::new(proto::SendTestNotificationResponse {
            notification: Some(notification_to_proto(&queued)),
        }))
    }
}

fn settings_to_proto(settings: &NotificationSettings) -> proto::NotificationSettings {
    proto::NotificationSettings {
        account_id: settings.account_id.clone(),
        recipients: settings.effective_recipients(),
        enabled_kinds: settings
            .enabled_kinds()
            .into_iter()
            .map(|k| kind_to_proto(k) as i32)
            .collect(),
    }
}

fn notification_to_proto(notification: &Notification) -> proto::Notification {
    proto::Notification {
        notification_id: notification.notification_id.to_string(),
        account_id: notification.account_id.clone(),
        kind: kind_to_proto(notification.kind) as i32,
        recipients: notification.recipients.clone(),
        subject: notification.subject.clone(),
        status: match notification.status {
            NotificationStatus::Pending => proto::NotificationStatus::Pending,
            NotificationStatus::Sent => proto::NotificationStatus::Sent,
            NotificationStatus::Failed => proto::NotificationStatus::Failed,
        } as i32,
        attempts: notification.attempts,
        last_error: notification.last_error.clone().unwrap_or_default(),
        created_at: Some(timestamp(notification.created_at)),
        sent_at: notification.sent_at.map(timestamp),
        next_attempt_at: (notification.status == NotificationStatus::Pending)
            .then(|| timestamp(notification.next_attempt_at)),
    }
}

pub(crate) fn kind_to_proto(kind: NotificationKind) -> proto::NotificationKind {
    match kind {
        NotificationKind::LowBalance => proto::NotificationKind::LowBalance,
        NotificationKind::TopUpReceipt => proto::NotificationKind::TopUpReceipt,
        NotificationKind::TopUpFailed => proto::NotificationKind::TopUpFailed,
        NotificationKind::PaymentMethodDisabled => proto::NotificationKind::PaymentMethodDisabled,
        NotificationKind::AuthenticationRequired => proto::NotificationKind::AuthenticationRequired,
        NotificationKind::CardExpiring => proto::NotificationKind::CardExpiring,
        NotificationKind::BalanceDepleted => proto::NotificationKind::BalanceDepleted,
        NotificationKind::TopUpCapReached => proto::NotificationKind::TopUpCapReached,
        NotificationKind::Test => proto::NotificationKind::Test,
    }
}

fn kind_from_proto(value: i32) -> Option<NotificationKind> {
    NotificationKind::ALL
        .into_iter()
        .find(|k| kind_to_proto(*k) as i32 == value)
}
