//! `Stripe-Signature` verification: `t=<unix time>,v1=<hex>[,v1=<hex>…]`,
//! each `v1` an HMAC-SHA256, keyed by the endpoint's signing secret
//! (`whsec_…`, used whole), of `"{t}.{raw body}"`. Any one matching `v1` is
//! enough (Stripe sends several while a secret is being rolled); `v0` and
//! unknown schemes are ignored; the timestamp must be within the tolerance.

use std::fmt;

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Stripe's default tolerance, and its libraries'.
pub const DEFAULT_TOLERANCE_SECS: i64 = 300;

/// The endpoint's signing secret; never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookSecret(String);

impl WebhookSecret {
    pub fn new(secret: impl Into<String>) -> Self {
        Self(secret.into().trim().to_owned())
    }
}

impl fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WebhookSecret(***)")
    }
}

impl std::str::FromStr for WebhookSecret {
    type Err = std::convert::Infallible;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Ok(Self::new(text))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("missing or malformed Stripe-Signature header")]
    Malformed,
    #[error("the signature timestamp is outside the tolerance")]
    Stale,
    #[error("no v1 signature matches")]
    Mismatch,
}

fn mac(secret: &WebhookSecret, timestamp: &str, body: &[u8]) -> HmacSha256 {
    let mut mac =
        HmacSha256::new_from_slice(secret.0.as_bytes()).expect("HMAC takes keys of any length");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// Checks `header` against the raw request `body` at time `now` (unix seconds).
pub fn verify(
    secret: &WebhookSecret,
    header: &str,
    body: &[u8],
    now: i64,
    tolerance_secs: i64,
) -> Result<(), SignatureError> {
    let mut timestamp = None;
    let mut signatures = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", value)) => timestamp = Some(value),
            Some(("v1", value)) => signatures.push(value),
            _ => {}
        }
    }
    let timestamp = timestamp.ok_or(SignatureError::Malformed)?;
    let seconds: i64 = timestamp.parse().map_err(|_| SignatureError::Malformed)?;
    if signatures.is_empty() {
        return Err(SignatureError::Malformed);
    }
    if (now - seconds).abs() > tolerance_secs {
        return Err(SignatureError::Stale);
    }
    let expected = mac(secret, timestamp, body);
    let matches = signatures.iter().any(|signature| {
        hex::decode(signature)
            // `verify_slice` compares in constant time.
            .is_ok_and(|bytes| expected.clone().verify_slice(&bytes).is_ok())
    });
    if matches {
        Ok(())
    } else {
        Err(SignatureError::Mismatch)
    }
}

/// A `Stripe-Signature` header for `body` at `timestamp`, as Stripe computes
/// it (for tests and local tooling that replays events).
pub fn sign(secret: &WebhookSecret, timestamp: i64, body: &[u8]) -> String {
    let signature = mac(secret, &timestamp.to_string(), body)
        .finalize()
        .into_bytes();
    format!("t={timestamp},v1={}", hex::encode(signature))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_750_000_000;

    fn secret() -> WebhookSecret {
        WebhookSecret::new("whsec_test_secret")
    }

    #[test]
    fn a_known_vector_matches() {
        // `printf '1750000000.{}' | openssl dgst -sha256 -hmac whsec_test_secret`
        let expected =
            "t=1750000000,v1=724a6568482dadaf7a5f693eda34cde452615b1397de3512115f0f3af3d7eb93";
        assert_eq!(sign(&secret(), NOW, b"{}"), expected);
        assert_eq!(verify(&secret(), expected, b"{}", NOW, 300), Ok(()));
    }

    #[test]
    fn wrong_secret_body_or_stale_timestamp_is_refused() {
        let header = sign(&secret(), NOW, b"{\"id\":1}");
        let other = WebhookSecret::new("whsec_other");
        assert_eq!(
            verify(&other, &header, b"{\"id\":1}", NOW, 300),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify(&secret(), &header, b"{\"id\":2}", NOW, 300),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify(&secret(), &header, b"{\"id\":1}", NOW + 301, 300),
            Err(SignatureError::Stale)
        );
        assert_eq!(
            verify(&secret(), &header, b"{\"id\":1}", NOW + 300, 300),
            Ok(())
        );
    }

    #[test]
    fn any_one_of_several_v1_signatures_is_enough() {
        let good = sign(&secret(), NOW, b"x");
        let good_v1 = good.split_once(",v1=").unwrap().1;
        let header = format!("t={NOW},v1={},v0=abc,v1={good_v1}", "00".repeat(32));
        assert_eq!(verify(&secret(), &header, b"x", NOW, 300), Ok(()));
    }

    #[test]
    fn headers_without_timestamp_or_v1_are_malformed() {
        for header in [
            "",
            "v1=abc",
            "t=1750000000",
            "t=soon,v1=00",
            "t=1750000000,v0=00",
        ] {
            assert_eq!(
                verify(&secret(), header, b"x", NOW, 300),
                Err(SignatureError::Malformed),
                "{header}"
            );
        }
    }
}
