//! An identity provider's signing keys, read from its JWK set (`jwks_uri`):
//! fetched at start, cached, refreshed on a schedule, and refreshed early
//! when a token names a `kid` the cache does not hold — at most once per
//! minimum interval, so tokens with made-up `kid`s cannot make billing
//! hammer the provider. The URL is configured, or discovered from the
//! issuer's `/.well-known/openid-configuration`.
//!
//! Keys are parsed by `jsonwebtoken`'s JWK support; only signature keys of
//! RS256, ES256 (P-256) and EdDSA (Ed25519) are kept. A fetch that fails, or
//! returns no usable key, leaves the cached keys as they were.

use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde::Deserialize;

use super::keys::VerifyingKey;

/// Where the JWK set is.
#[derive(Debug, Clone)]
pub(super) enum JwksLocation {
    /// `--jwt-jwks-url`.
    Url(String),
    /// `jwks_uri` of `<issuer>/.well-known/openid-configuration`.
    Discovery { issuer: String },
}

/// How often the set is fetched.
#[derive(Debug, Clone, Copy)]
pub(super) struct JwksTiming {
    /// Between scheduled refreshes.
    pub refresh_interval: Duration,
    /// Least time between two refreshes caused by unknown `kid`s.
    pub min_unknown_kid_interval: Duration,
}

pub(super) struct Jwks {
    http: reqwest::Client,
    location: JwksLocation,
    timing: JwksTiming,
    /// The set's URL once known (discovery fills it on the first success).
    jwks_uri: Mutex<Option<String>>,
    keys: RwLock<Arc<Vec<VerifyingKey>>>,
    /// When an unknown `kid` last caused a refresh; held during that refresh,
    /// so concurrent tokens with the same new `kid` wait for one fetch.
    last_unknown_kid_refresh: tokio::sync::Mutex<Option<Instant>>,
}

/// The fields of an OpenID Provider Configuration document that billing reads.
#[derive(Deserialize)]
struct ProviderMetadata {
    issuer: String,
    jwks_uri: String,
}

/// A JWK set whose keys are parsed one by one (a key of an unknown type is skipped, not fatal).
#[derive(Deserialize)]
struct RawJwkSet {
    keys: Vec<serde_json::Value>,
}

const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// A JWK set larger than this is refused (a provider publishes a few keys).
const MAX_DOCUMENT_BYTES: usize = 1024 * 1024;

impl Jwks {
    pub fn new(location: JwksLocation, timing: JwksTiming) -> anyhow::Result<Jwks> {
        let jwks_uri = match &location {
            JwksLocation::Url(url) => {
                check_url(url).context("--jwt-jwks-url")?;
                Some(url.clone())
            }
            JwksLocation::Discovery { issuer } => {
                check_url(issuer).context("--jwt-issuer (for --jwt-oidc-discovery)")?;
                None
            }
        };
        let http = reqwest::Client::builder()
            .timeout(FETCH_TIMEOUT)
            .connect_timeout(FETCH_TIMEOUT)
            .user_agent(concat!("billing/", env!("CARGO_PKG_VERSION")))
            .build()
            .context("building the JWKS HTTP client")?;
        Ok(Jwks {
            http,
            location,
            timing,
            jwks_uri: Mutex::new(jwks_uri),
            keys: RwLock::new(Arc::new(Vec::new())),
            last_unknown_kid_refresh: tokio::sync::Mutex::new(None),
        })
    }

    pub fn timing(&self) -> JwksTiming {
        self.timing
    }

    /// The cached keys.
    pub fn keys(&self) -> Arc<Vec<VerifyingKey>> {
        self.keys
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Whether the cache holds a key with this `kid`.
    pub fn knows(&self, kid: &str) -> bool {
        self.keys()
            .iter()
            .any(|key| key.kid.as_deref() == Some(kid))
    }

    /// Fetches the set now and replaces the cache (a scheduled refresh, or
    /// the first fetch). A failure is logged and keeps the cache.
    pub async fn refresh(&self) -> bool {
        match self.fetch().await {
            Ok(keys) => {
                let kids: Vec<&str> = keys.iter().filter_map(|k| k.kid.as_deref()).collect();
                tracing::debug!(keys = keys.len(), kids = ?kids, "JWKS refreshed");
                *self
                    .keys
                    .write()
                    .unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(keys);
                true
            }
            Err(error) => {
                tracing::warn!(
                    error = format!("{error:#}"),
                    "JWKS refresh failed; the cached keys stay in use"
                );
                false
            }
        }
    }

    /// A token named `kid`, which the cache does not hold: refresh, unless an
    /// unknown `kid` already caused a refresh less than the minimum interval
    /// ago. Returns once the cache is as fresh as it will get.
    pub async fn refresh_for_unknown_kid(&self, kid: &str) {
        let mut last = self.last_unknown_kid_refresh.lock().await;
        // Another token with this kid may have caused the refresh we waited for.
        if self.knows(kid) {
            return;
        }
        if last.is_some_and(|at| at.elapsed() < self.timing.min_unknown_kid_interval) {
            tracing::debug!(kid, "unknown kid: JWKS refreshed recently, not again yet");
            return;
        }
        *last = Some(Instant::now());
        tracing::info!(kid, "unknown kid: refreshing the JWKS");
        self.refresh().await;
    }

    async fn fetch(&self) -> anyhow::Result<Vec<VerifyingKey>> {
        let url = self.jwks_uri().await?;
        let document: RawJwkSet = self.get_json(&url).await?;
        let mut keys = Vec::new();
        for value in document.keys {
            match serde_json::from_value::<Jwk>(value) {
                Ok(jwk) => {
                    if let Some(key) = verifying_key(&jwk) {
                        keys.push(key);
                    }
                }
                Err(error) => tracing::debug!(%error, "JWKS entry skipped: not a JWK"),
            }
        }
        if keys.is_empty() {
            bail!("{url} holds no RS256, ES256 or EdDSA signature key");
        }
        Ok(keys)
    }

    /// The set's URL: configured, or discovered (once) from the issuer.
    async fn jwks_uri(&self) -> anyhow::Result<String> {
        if let Some(url) = self
            .jwks_uri
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
        {
            return Ok(url);
        }
        let JwksLocation::Discovery { issuer } = &self.location else {
            bail!("no JWKS URL");
        };
        let document = format!(
            "{}/.well-known/openid-configuration",
            issuer.trim_end_matches('/')
        );
        let metadata: ProviderMetadata = self.get_json(&document).await?;
        // OpenID Connect Discovery 1.0 §4.3: the document must name the issuer it was read from.
        if metadata.issuer.trim_end_matches('/') != issuer.trim_end_matches('/') {
            bail!(
                "{document} names the issuer {:?}, not {issuer:?}",
                metadata.issuer
            );
        }
        check_url(&metadata.jwks_uri).with_context(|| format!("jwks_uri of {document}"))?;
        tracing::info!(jwks_uri = %metadata.jwks_uri, "JWKS discovered");
        *self
            .jwks_uri
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(metadata.jwks_uri.clone());
        Ok(metadata.jwks_uri)
    }

    async fn get_json<T: serde::de::DeserializeOwned>(&self, url: &str) -> anyhow::Result<T> {
        let response = self
            .http
            .get(url)
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .with_context(|| format!("fetching {url}"))?;
        let status = response.status();
        if !status.is_success() {
            bail!("{url} answered HTTP {status}");
        }
        let body = response
            .bytes()
            .await
            .with_context(|| format!("reading {url}"))?;
        if body.len() > MAX_DOCUMENT_BYTES {
            bail!("{url} answered more than {MAX_DOCUMENT_BYTES} bytes");
        }
        serde_json::from_slice(&body).with_context(|| format!("{url} is not the JSON expected"))
    }
}

/// An http(s) URL, or an error saying why not.
fn check_url(text: &str) -> anyhow::Result<()> {
    let url = url::Url::parse(text).with_context(|| format!("{text:?} is not a URL"))?;
    if !matches!(url.scheme(), "https" | "http") {
        bail!("{text:?} is not an http(s) URL");
    }
    Ok(())
}

/// The verifying key of a JWK: a signature key (no `use`, or `use: sig`) of
/// RS256, ES256 or EdDSA whose `alg`, when given, matches its key type.
/// Symmetric (`oct`) keys are never taken from a JWKS.
fn verifying_key(jwk: &Jwk) -> Option<VerifyingKey> {
    let kid = jwk.common.key_id.clone();
    if matches!(&jwk.common.public_key_use, Some(key_use) if *key_use != PublicKeyUse::Signature) {
        return None;
    }
    let algorithm = match (&jwk.algorithm, jwk.common.key_algorithm) {
        (AlgorithmParameters::RSA(_), None | Some(KeyAlgorithm::RS256)) => Algorithm::RS256,
        (AlgorithmParameters::EllipticCurve(ec), None | Some(KeyAlgorithm::ES256))
            if ec.curve == EllipticCurve::P256 =>
        {
            Algorithm::ES256
        }
        (AlgorithmParameters::OctetKeyPair(okp), None | Some(KeyAlgorithm::EdDSA))
            if okp.curve == EllipticCurve::Ed25519 =>
        {
            Algorithm::EdDSA
        }
        _ => {
            tracing::debug!(kid = ?kid, alg = ?jwk.common.key_algorithm, "JWKS key skipped: not an RS256, ES256 or EdDSA signature key");
            return None;
        }
    };
    match DecodingKey::from_jwk(jwk) {
        Ok(key) => Some(VerifyingKey {
            algorithm,
            key,
            kid,
        }),
        Err(error) => {
            tracing::warn!(kid = ?kid, %error, "JWKS key skipped: it does not parse");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn jwk(value: serde_json::Value) -> Jwk {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn symmetric_encryption_and_mismatched_keys_are_not_taken_from_a_jwks() {
        let oct = jwk(json!({"kty": "oct", "kid": "h", "k": "c2VjcmV0LXNlY3JldC1zZWNyZXQ"}));
        assert!(verifying_key(&oct).is_none());
        let ed = json!({"kty": "OKP", "crv": "Ed25519", "kid": "e",
                        "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"});
        assert_eq!(
            verifying_key(&jwk(ed.clone())).unwrap().algorithm,
            Algorithm::EdDSA
        );
        let mut encryption = ed.clone();
        encryption["use"] = json!("enc");
        assert!(verifying_key(&jwk(encryption)).is_none());
        let mut wrong_alg = ed;
        wrong_alg["alg"] = json!("RS256");
        assert!(verifying_key(&jwk(wrong_alg)).is_none());
    }
}
