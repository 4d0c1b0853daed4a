//! Stripe's REST API as this gateway uses it: form-encoded requests with a
//! bearer secret key, JSON objects back, and the mapping of Stripe's
//! statuses and error codes to [`Outcome`]s.
//!
//! Nothing here logs or returns the secret key, a client secret or card data;
//! Stripe's human `message` is never copied into an error either.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use anyhow::Context;
use reqwest::StatusCode;
use serde::Deserialize;

use crate::gateway::{Challenge, Charge, Outcome};

/// A Stripe secret key (`sk_…` or a restricted `rk_…`); never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretKey(String);

impl SecretKey {
    pub fn new(key: impl Into<String>) -> Self {
        Self(key.into().trim().to_owned())
    }

    pub(super) fn expose(&self) -> &str {
        &self.0
    }

    /// `sk_test_…`/`rk_test_…`: Stripe's test mode.
    pub fn is_test_mode(&self) -> bool {
        self.0.starts_with("sk_test_") || self.0.starts_with("rk_test_")
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey(***)")
    }
}

impl std::str::FromStr for SecretKey {
    type Err = std::convert::Infallible;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Ok(Self::new(text))
    }
}

/// What came back over HTTP: a status and a JSON body.
#[derive(Debug)]
pub(super) struct Reply {
    pub status: StatusCode,
    pub body: serde_json::Value,
}

/// The request may or may not have reached Stripe (timeout, connection reset).
#[derive(Debug, thiserror::Error)]
#[error("stripe did not answer: {0}")]
pub(super) struct NoAnswer(pub String);

impl Reply {
    pub fn is_success(&self) -> bool {
        self.status.is_success()
    }

    pub fn object<T: for<'de> Deserialize<'de>>(&self, what: &str) -> anyhow::Result<T> {
        serde_json::from_value(self.body.clone())
            .with_context(|| format!("reading a stripe {what}"))
    }

    pub fn error(&self) -> StripeError {
        serde_json::from_value::<ErrorBody>(self.body.clone())
            .map(|body| body.error)
            .unwrap_or_default()
    }
}

#[derive(Clone)]
pub(super) struct Client {
    http: reqwest::Client,
    base: String,
    secret: SecretKey,
}

impl Client {
    pub fn new(base: &str, secret: SecretKey, timeout: Duration) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .user_agent(concat!("billing/", env!("CARGO_PKG_VERSION")))
            .build()
            .context("building the stripe HTTP client")?;
        Ok(Self {
            http,
            base: base.trim_end_matches('/').to_owned(),
            secret,
        })
    }

    pub async fn post(
        &self,
        path: &str,
        form: &[(&str, String)],
        idempotency_key: Option<&str>,
    ) -> Result<Reply, NoAnswer> {
        let mut request = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(self.secret.expose())
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body(encode_form(form));
        if let Some(key) = idempotency_key {
            request = request.header("Idempotency-Key", key);
        }
        self.send(request).await
    }

    pub async fn get(&self, path: &str, query: &[(&str, &str)]) -> Result<Reply, NoAnswer> {
        let mut url = format!("{}{path}", self.base);
        if !query.is_empty() {
            let pairs: Vec<(&str, String)> =
                query.iter().map(|(k, v)| (*k, (*v).to_owned())).collect();
            url = format!("{url}?{}", encode_form(&pairs));
        }
        let request = self.http.get(url).bearer_auth(self.secret.expose());
        self.send(request).await
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Result<Reply, NoAnswer> {
        // reqwest's errors name the URL but never the headers, so the key stays out.
        let response = request
            .send()
            .await
            .map_err(|e| NoAnswer(describe_transport_error(&e)))?;
        let status = response.status();
        let bytes = response
            .bytes()
            .await
            .map_err(|e| NoAnswer(describe_transport_error(&e)))?;
        let body = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
        Ok(Reply { status, body })
    }
}

fn describe_transport_error(error: &reqwest::Error) -> String {
    if error.is_timeout() {
        "timeout".into()
    } else if error.is_connect() {
        "connection failed".into()
    } else {
        "transport error".into()
    }
}

/// `application/x-www-form-urlencoded`, Stripe's request format (`a[b]=c` for nesting).
pub(super) fn encode_form(pairs: &[(&str, String)]) -> String {
    fn encode(text: &str, out: &mut String) {
        for byte in text.bytes() {
            match byte {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'*' => {
                    out.push(byte as char)
                }
                b' ' => out.push('+'),
                _ => out.push_str(&format!("%{byte:02X}")),
            }
        }
    }
    let mut out = String::new();
    for (index, (name, value)) in pairs.iter().enumerate() {
        if index > 0 {
            out.push('&');
        }
        encode(name, &mut out);
        out.push('=');
        encode(value, &mut out);
    }
    out
}

#[derive(Debug, Deserialize)]
struct ErrorBody {
    error: StripeError,
}

/// Stripe's `error` object (only what we read).
#[derive(Debug, Default, Deserialize)]
pub(super) struct StripeError {
    #[serde(rename = "type", default)]
    pub kind: String,
    #[serde(default)]
    pub code: Option<String>,
    #[serde(default)]
    pub decline_code: Option<String>,
    #[serde(default)]
    pub payment_intent: Option<PaymentIntent>,
    #[serde(default)]
    pub setup_intent: Option<SetupIntent>,
}

impl StripeError {
    /// `type/code` for logs and refusals; never Stripe's human message.
    pub fn label(&self) -> String {
        format!(
            "{}/{}",
            if self.kind.is_empty() {
                "unknown"
            } else {
                &self.kind
            },
            self.code.as_deref().unwrap_or("-")
        )
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
pub(super) struct NextAction {
    #[serde(default)]
    pub redirect_to_url: Option<RedirectToUrl>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub(super) struct RedirectToUrl {
    #[serde(default)]
    pub url: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub(super) struct LastError {
    #[serde(default)]
    pub code: Option<String>,
    #[serde(default)]
    pub decline_code: Option<String>,
}

/// `payment_method` of an intent: an id, or the object when expanded.
fn id_or_object<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<String>, D::Error> {
    let value = Option::<serde_json::Value>::deserialize(deserializer)?;
    Ok(match value {
        Some(serde_json::Value::String(id)) => Some(id),
        Some(serde_json::Value::Object(object)) => object
            .get("id")
            .and_then(|id| id.as_str())
            .map(str::to_owned),
        _ => None,
    })
}

#[derive(Debug, Clone, Default, Deserialize)]
pub(super) struct SetupIntent {
    pub id: String,
    pub status: String,
    #[serde(default, deserialize_with = "id_or_object")]
    pub payment_method: Option<String>,
    #[serde(default)]
    pub next_action: Option<NextAction>,
    #[serde(default)]
    pub last_setup_error: Option<LastError>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub(super) struct PaymentIntent {
    pub id: String,
    pub status: String,
    #[serde(default)]
    pub next_action: Option<NextAction>,
    #[serde(default)]
    pub last_payment_error: Option<LastError>,
    #[serde(default)]
    pub metadata: HashMap<String, String>,
}

#[derive(Debug, Deserialize)]
pub(super) struct PaymentMethodObject {
    pub id: String,
    #[serde(default)]
    pub card: Option<CardObject>,
}

#[derive(Debug, Deserialize)]
pub(super) struct CardObject {
    pub brand: String,
    pub last4: String,
    pub exp_month: u32,
    pub exp_year: i32,
    #[serde(default)]
    pub fingerprint: Option<String>,
}

#[derive(Debug, Deserialize)]
pub(super) struct Customer {
    pub id: String,
}

#[derive(Debug, Deserialize)]
pub(super) struct SearchResult<T> {
    pub data: Vec<T>,
}

/// Decline codes after which the same card must not be charged again
/// (the card is gone, wrong, or the issuer said never). Everything else —
/// `insufficient_funds`, `generic_decline`/`card_declined`, `processing_error`,
/// `try_again_later`, `do_not_honor` (issuers use it as a generic refusal),
/// velocity limits — is soft: the engine may try the card again later.
const HARD_DECLINES: &[&str] = &[
    "expired_card",
    "incorrect_cvc",
    "invalid_cvc",
    "incorrect_number",
    "invalid_number",
    "invalid_expiry_month",
    "invalid_expiry_year",
    "invalid_account",
    "stolen_card",
    "lost_card",
    "pickup_card",
    "fraudulent",
    "merchant_blacklist",
    "restricted_card",
    "card_not_supported",
    "currency_not_supported",
    "do_not_try_again",
    "revocation_of_all_authorizations",
    "revocation_of_authorization",
    "stop_payment_order",
    "security_violation",
    "transaction_not_allowed",
    "new_account_information_available",
];

pub fn is_hard_decline(code: &str) -> bool {
    HARD_DECLINES.contains(&code)
}

fn challenge_of(intent_id: &str, next_action: Option<&NextAction>) -> Challenge {
    Challenge {
        challenge_id: intent_id.to_owned(),
        redirect_url: next_action
            .and_then(|action| action.redirect_to_url.as_ref())
            .and_then(|redirect| redirect.url.clone())
            .unwrap_or_default(),
    }
}

/// A failed confirmation: `authentication_required` needs the customer,
/// anything else is a decline named by its most specific code.
fn outcome_of_failure(
    code: Option<&str>,
    decline_code: Option<&str>,
    intent_id: &str,
    next_action: Option<&NextAction>,
) -> Outcome {
    if code == Some("authentication_required") || decline_code == Some("authentication_required") {
        return Outcome::RequiresAction {
            challenge: challenge_of(intent_id, next_action),
        };
    }
    let code = decline_code.or(code).unwrap_or("card_declined").to_owned();
    let hard = is_hard_decline(&code);
    Outcome::Declined { code, hard }
}

/// A PaymentIntent's state as a charge.
pub(super) fn charge_of_intent(intent: &PaymentIntent) -> Charge {
    let outcome = match intent.status.as_str() {
        "succeeded" => Outcome::Succeeded,
        "requires_action" => Outcome::RequiresAction {
            challenge: challenge_of(&intent.id, intent.next_action.as_ref()),
        },
        "requires_payment_method" | "canceled" => {
            let error = intent.last_payment_error.clone().unwrap_or_default();
            let fallback = if intent.status == "canceled" {
                "canceled"
            } else {
                "card_declined"
            };
            outcome_of_failure(
                Some(error.code.as_deref().unwrap_or(fallback)),
                error.decline_code.as_deref(),
                &intent.id,
                intent.next_action.as_ref(),
            )
        }
        // processing, requires_confirmation, requires_capture: not final yet.
        _ => Outcome::Unknown,
    };
    Charge {
        charge_id: Some(intent.id.clone()),
        outcome,
    }
}

/// A `card_error` answer (HTTP 402) to a PaymentIntent confirmation.
pub(super) fn charge_of_card_error(error: &StripeError) -> Charge {
    let intent = error.payment_intent.as_ref();
    let intent_id = intent.map(|i| i.id.as_str()).unwrap_or_default();
    Charge {
        charge_id: intent.map(|i| i.id.clone()),
        outcome: outcome_of_failure(
            error.code.as_deref(),
            error.decline_code.as_deref(),
            intent_id,
            intent.and_then(|i| i.next_action.as_ref()),
        ),
    }
}

/// A SetupIntent's state as the outcome of saving a card.
pub(super) fn outcome_of_setup(intent: &SetupIntent) -> Outcome {
    match intent.status.as_str() {
        "succeeded" => Outcome::Succeeded,
        "requires_action" => Outcome::RequiresAction {
            challenge: challenge_of(&intent.id, intent.next_action.as_ref()),
        },
        "requires_payment_method" | "canceled" => {
            let error = intent.last_setup_error.clone().unwrap_or_default();
            let code = error
                .decline_code
                .or(error.code)
                .unwrap_or_else(|| "setup_failed".into());
            let hard = is_hard_decline(&code);
            Outcome::Declined { code, hard }
        }
        _ => Outcome::Unknown,
    }
}

/// A `card_error` answer (HTTP 402) to a SetupIntent confirmation.
pub(super) fn setup_outcome_of_card_error(error: &StripeError) -> Outcome {
    let code = error
        .decline_code
        .clone()
        .or_else(|| error.code.clone())
        .unwrap_or_else(|| "card_declined".into());
    let hard = is_hard_decline(&code);
    Outcome::Declined { code, hard }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_encoding_escapes_brackets_quotes_and_spaces() {
        let encoded = encode_form(&[
            ("metadata[idempotency_key]", "tu_1:attempt-1".into()),
            ("query", "metadata['k']:'a b'".into()),
        ]);
        assert_eq!(
            encoded,
            "metadata%5Bidempotency_key%5D=tu_1%3Aattempt-1&query=metadata%5B%27k%27%5D%3A%27a+b%27"
        );
    }

    #[test]
    fn stolen_and_expired_cards_are_hard_declines_insufficient_funds_is_soft() {
        for hard in ["stolen_card", "expired_card", "lost_card", "incorrect_cvc"] {
            assert!(is_hard_decline(hard), "{hard}");
        }
        for soft in [
            "insufficient_funds",
            "generic_decline",
            "card_declined",
            "processing_error",
            "try_again_later",
            "do_not_honor",
        ] {
            assert!(!is_hard_decline(soft), "{soft}");
        }
    }

    #[test]
    fn off_session_authentication_required_is_requires_action_not_a_decline() {
        let intent = PaymentIntent {
            id: "pi_1".into(),
            status: "requires_payment_method".into(),
            last_payment_error: Some(LastError {
                code: Some("authentication_required".into()),
                decline_code: Some("authentication_required".into()),
            }),
            ..Default::default()
        };
        assert!(matches!(
            charge_of_intent(&intent).outcome,
            Outcome::RequiresAction { .. }
        ));
    }

    #[test]
    fn the_secret_key_never_prints() {
        let key = SecretKey::new("sk_test_abcdef");
        assert_eq!(format!("{key:?}"), "SecretKey(***)");
        assert!(key.is_test_mode());
    }
}
