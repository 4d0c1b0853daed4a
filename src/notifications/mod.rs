//! Email notifications: settings, the outbox, the messages, the mailer and
//! the sender.
//!
//! A decision to notify (an engine's, or `SendTestNotification`) calls
//! [`enqueue`] inside its own transaction: the settings are read there, the
//! message is rendered there, and one outbox row is written with a dedupe
//! key — so the decision and the message commit together, and a decision
//! taken twice yields one message. Senders in every replica claim due rows
//! with `FOR UPDATE SKIP LOCKED` and hold the row lock while the mailer
//! sends, so no two replicas send the same row; failures are retried with
//! back-off and the error is kept.

mod mailer;
mod messages;
mod outbox;
mod sender;
mod settings;

pub use mailer::{
    FileMailer, MailError, Mailer, OutgoingEmail, SmtpMailer, SmtpSecurity, SmtpSettings,
};
pub use messages::{CardLabel, Notice};
pub use outbox::{
    Notification, NotificationStatus, dedupe_key, enqueue, get_notification, list_notifications,
};
pub use sender::{SenderSettings, run_sender, send_due};
pub use settings::{NotificationSettings, get_settings, update_settings};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NotificationKind {
    LowBalance,
    TopUpReceipt,
    TopUpFailed,
    PaymentMethodDisabled,
    AuthenticationRequired,
    CardExpiring,
    BalanceDepleted,
    TopUpCapReached,
    Test,
}

impl NotificationKind {
    pub const ALL: [NotificationKind; 9] = [
        NotificationKind::LowBalance,
        NotificationKind::TopUpReceipt,
        NotificationKind::TopUpFailed,
        NotificationKind::PaymentMethodDisabled,
        NotificationKind::AuthenticationRequired,
        NotificationKind::CardExpiring,
        NotificationKind::BalanceDepleted,
        NotificationKind::TopUpCapReached,
        NotificationKind::Test,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            NotificationKind::LowBalance => "low_balance",
            NotificationKind::TopUpReceipt => "top_up_receipt",
            NotificationKind::TopUpFailed => "top_up_failed",
            NotificationKind::PaymentMethodDisabled => "payment_method_disabled",
            NotificationKind::AuthenticationRequired => "authentication_required",
            NotificationKind::CardExpiring => "card_expiring",
            NotificationKind::BalanceDepleted => "balance_depleted",
            NotificationKind::TopUpCapReached => "top_up_cap_reached",
            NotificationKind::Test => "test",
        }
    }

    pub fn parse(text: &str) -> Option<NotificationKind> {
        NotificationKind::ALL
            .into_iter()
            .find(|kind| kind.as_str() == text)
    }
}
