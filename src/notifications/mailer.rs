//! Delivering one email: by SMTP (lettre), or — with no SMTP configured —
//! as an `.eml` file in a folder. The mailer knows nothing of the ledger.

use std::path::PathBuf;
use std::time::Duration;

use lettre::message::{Mailbox, header::ContentType};
use lettre::transport::smtp::authentication::Credentials;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

#[derive(Debug, Clone)]
pub struct OutgoingEmail {
    /// Also the Message-ID, so a receiver can spot a duplicate.
    pub id: String,
    pub to: Vec<String>,
    pub subject: String,
    pub body_text: String,
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct MailError(pub String);

#[async_trait::async_trait]
pub trait Mailer: Send + Sync {
    async fn send(&self, email: &OutgoingEmail) -> Result<(), MailError>;
    /// Where mail goes, for the start-up log line.
    fn describe(&self) -> String;
}

fn build_message(from: &Mailbox, email: &OutgoingEmail) -> Result<Message, MailError> {
    let mut builder = Message::builder()
        .from(from.clone())
        .subject(email.subject.clone())
        .message_id(Some(format!("<{}@billing>", email.id)))
        .header(ContentType::TEXT_PLAIN);
    // A bare address (never a display name or a list): what the API checked.
    for recipient in &email.to {
        let address: lettre::Address = recipient
            .parse()
            .map_err(|e| MailError(format!("bad recipient {recipient:?}: {e}")))?;
        builder = builder.to(Mailbox::new(None, address));
    }
    builder
        .body(email.body_text.clone())
        .map_err(|e| MailError(format!("cannot build the message: {e}")))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SmtpSecurity {
    /// Plain SMTP (local relays and test servers only).
    None,
    /// Upgrade with STARTTLS (port 587).
    Starttls,
    /// TLS from the first byte (port 465).
    Tls,
}

#[derive(Debug, Clone)]
pub struct SmtpSettings {
    pub host: String,
    pub port: u16,
    pub security: SmtpSecurity,
    pub username: Option<String>,
    pub password: Option<String>,
    pub from: String,
    pub timeout: Duration,
}

pub struct SmtpMailer {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
    description: String,
}

impl SmtpMailer {
    pub fn new(settings: &SmtpSettings) -> anyhow::Result<SmtpMailer> {
        let builder = match settings.security {
            SmtpSecurity::None => {
                AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&settings.host)
            }
            SmtpSecurity::Starttls => {
                AsyncSmtpTransport::<Tokio1Executor>::starttls_relay(&settings.host)?
            }
            SmtpSecurity::Tls => AsyncSmtpTransport::<Tokio1Executor>::relay(&settings.host)?,
        };
        let mut builder = builder.port(settings.port).timeout(Some(settings.timeout));
        if let (Some(user), Some(password)) = (&settings.username, &settings.password) {
            builder = builder.credentials(Credentials::new(user.clone(), password.clone()));
        }
        Ok(SmtpMailer {
            transport: builder.build(),
            from: settings.from.parse().map_err(|e| {
                anyhow::anyhow!("the from address {:?} is invalid: {e}", settings.from)
            })?,
            description: format!(
                "smtp://{}:{} ({})",
                settings.host,
                settings.port,
                match settings.security {
                    SmtpSecurity::None => "plain SMTP, no TLS",
                    SmtpSecurity::Starttls => "STARTTLS",
                    SmtpSecurity::Tls => "TLS",
                }
            ),
        })
    }
}

#[async_trait::async_trait]
impl Mailer for SmtpMailer {
    // Recipients and content stay out of the span: only the message id.
    #[tracing::instrument(name = "smtp.send", skip_all, fields(notification_id = %email.id))]
    async fn send(&self, email: &OutgoingEmail) -> Result<(), MailError> {
        let message = build_message(&self.from, email)?;
        self.transport
            .send(message)
            .await
            .map(|_| ())
            .map_err(|e| MailError(format!("smtp: {e}")))
    }

    fn describe(&self) -> String {
        self.description.clone()
    }
}

/// Writes each message as `<id>.eml` in a folder (no SMTP configured).
pub struct FileMailer {
    folder: PathBuf,
    from: Mailbox,
}

impl FileMailer {
    pub fn new(folder: PathBuf, from: &str) -> anyhow::Result<FileMailer> {
        std::fs::create_dir_all(&folder)?;
        Ok(FileMailer {
            folder,
            from: from
                .parse()
                .map_err(|e| anyhow::anyhow!("the from address {from:?} is invalid: {e}"))?,
        })
    }
}

#[async_trait::async_trait]
impl Mailer for FileMailer {
    async fn send(&self, email: &OutgoingEmail) -> Result<(), MailError> {
        let message = build_message(&self.from, email)?;
        let final_path = self.folder.join(format!("{}.eml", email.id));
        let temporary = self.folder.join(format!(".{}.eml.tmp", email.id));
        tokio::fs::write(&temporary, message.formatted())
            .await
            .map_err(|e| MailError(format!("writing {}: {e}", temporary.display())))?;
        tokio::fs::rename(&temporary, &final_path)
            .await
            .map_err(|e| MailError(format!("writing {}: {e}", final_path.display())))
    }

    fn describe(&self) -> String {
        format!(".eml files in {}", self.folder.display())
    }
}
