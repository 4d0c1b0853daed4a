//! Bearer tokens: verified with static keys (an HS256 secret, or PEM public
//! keys of RS256, ES256 or EdDSA — several at once during a rotation) and/or
//! an identity provider's JWK set; minted by `billing token`. With no key
//! configured at all, a development secret is kept in the data directory so
//! one command can run the service locally.
//!
//! A token is checked against the keys of its header's algorithm only (an
//! RS256 public key never verifies an HS256 token), and, when it names a
//! `kid` the JWK set does not hold, once more after a (rate-limited) refresh
//! of the set. Its claims become a [`Caller`] through the configured claim
//! mapping (`claims`).

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::claims::ClaimMapping;
use super::jwks::{Jwks, JwksLocation, JwksTiming};
use super::keys::{StaticKeys, StaticSource};
use super::{Caller, Role};
use crate::config::AuthArgs;
use crate::error::BillingError;
use crate::ids::AccountId;

/// Seconds past `exp` a token is still accepted unless configured otherwise
/// (`--jwt-leeway-secs`).
pub const DEFAULT_LEEWAY_SECS: u64 = 30;

/// The claims `billing token` writes (billing's own shape: `account`, `roles`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    #[serde(default)]
    pub roles: Vec<String>,
    pub exp: u64,
    #[serde(default)]
    pub iat: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
}

/// The algorithms a JWK set may supply keys for.
const JWKS_ALGORITHMS: [Algorithm; 3] = [Algorithm::RS256, Algorithm::ES256, Algorithm::EdDSA];

/// Every key that verifies tokens, how claims map to a caller, and (for
/// `billing token`) the key that signs.
pub struct KeySet {
    source: StaticSource,
    static_keys: RwLock<Arc<StaticKeys>>,
    /// The last reload problem logged (logged again only when it changes).
    reload_problem: Mutex<Option<String>>,
    reload_interval: Duration,
    jwks: Option<Jwks>,
    encoding: Option<(Algorithm, EncodingKey)>,
    /// The claim rules, one copy per algorithm a key may have (each accepts only its own).
    validations: Vec<(Algorithm, Validation)>,
    claims: ClaimMapping,
    /// Whether the claim settings are billing's own (what `mint` writes).
    default_claims: bool,
    issuer: Option<String>,
    audience: Option<String>,
    /// Set when the development secret is in use.
    pub development_key: Option<PathBuf>,
}

/// Why the cached keys did not verify a token.
enum Rejection {
    /// The header names a `kid` the JWK set does not hold.
    UnknownKid(String),
    Invalid(BillingError),
}

impl KeySet {
    /// Reads the configured keys (no network: a JWK set is fetched by [`KeySet::start`]).
    pub fn load(args: &AuthArgs, data_dir: &Path) -> anyhow::Result<KeySet> {
        let jwks_location = match (&args.jwt_jwks_url, args.jwt_oidc_discovery) {
            (Some(url), _) => Some(JwksLocation::Url(url.clone())),
            (None, true) => Some(JwksLocation::Discovery {
                issuer: args
                    .jwt_issuer
                    .clone()
                    .context("--jwt-oidc-discovery needs --jwt-issuer")?,
            }),
            (None, false) => None,
        };
        let mut development_key = None;
        let source = if !args.jwt_public_key_file.is_empty() {
            StaticSource::PublicKeys(args.jwt_public_key_file.clone())
        } else if let Some(secret) = &args.jwt_secret {
            StaticSource::Secret(secret.clone().into_bytes())
        } else if let Some(file) = &args.jwt_secret_file {
            StaticSource::SecretFile(file.clone())
        } else if jwks_location.is_some() {
            StaticSource::None
        } else {
            let path = data_dir.join("dev-jwt-secret");
            development_secret(&path)?;
            development_key = Some(path.clone());
            StaticSource::SecretFile(path)
        };
        let static_keys = source.load()?;
        let encoding = match (&args.jwt_private_key_file, &source) {
            (Some(file), _) => Some(private_key(file)?),
            (None, StaticSource::Secret(secret)) => {
                Some((Algorithm::HS256, EncodingKey::from_secret(secret)))
            }
            (None, StaticSource::SecretFile(path)) => {
                let text = fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                Some((
                    Algorithm::HS256,
                    EncodingKey::from_secret(text.trim().as_bytes()),
                ))
            }
            (None, _) => None,
        };
        let jwks = jwks_location
            .map(|location| {
                Jwks::new(
                    location,
                    JwksTiming {
                        refresh_interval: Duration::from_secs(args.jwt_jwks_refresh_secs.max(1)),
                        min_unknown_kid_interval: Duration::from_secs(
                            args.jwt_jwks_min_refresh_secs,
                        ),
                    },
                )
            })
            .transpose()?;
        let mut validation = Validation::new(Algorithm::HS256);
        validation.validate_nbf = true;
        validation.leeway = DEFAULT_LEEWAY_SECS;
        // A configured issuer or audience must be present, not only right when present.
        let mut required = vec!["exp", "sub"];
        if args.jwt_issuer.is_some() {
            required.push("iss");
        }
        if args.jwt_audience.is_some() {
            required.push("aud");
        }
        validation.set_required_spec_claims(&required);
        match &args.jwt_issuer {
            Some(issuer) => validation.set_issuer(&[issuer]),
            None => validation.iss = None,
        }
        // `aud` may be a string or an array; jsonwebtoken accepts an array that contains it.
        match &args.jwt_audience {
            Some(audience) => validation.set_audience(&[audience]),
            None => validation.validate_aud = false,
        }
        let defaults = AuthArgs::default();
        Ok(KeySet {
            source,
            static_keys: RwLock::new(Arc::new(static_keys)),
            reload_problem: Mutex::new(None),
            reload_interval: Duration::from_secs(args.jwt_key_reload_secs.max(1)),
            jwks,
            encoding,
            validations: [
                Algorithm::HS256,
                Algorithm::RS256,
                Algorithm::ES256,
                Algorithm::EdDSA,
            ]
            .into_iter()
            .map(|algorithm| {
                let mut for_algorithm = validation.clone();
                for_algorithm.algorithms = vec![algorithm];
                (algorithm, for_algorithm)
            })
            .collect(),
            claims: ClaimMapping::from_args(args),
            default_claims: args.jwt_roles_claim == defaults.jwt_roles_claim
                && args.jwt_role_map.is_empty()
                && args.jwt_account_claim == defaults.jwt_account_claim,
            issuer: args.jwt_issuer.clone(),
            audience: args.jwt_audience.clone(),
            development_key,
        })
    }

    /// One line on where the keys come from (for `serve --check` and the start-up log).
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        let algorithms: Vec<String> = self
            .static_keys()
            .keys
            .iter()
            .map(|k| format!("{:?}", k.algorithm))
            .collect();
        match &self.source {
            StaticSource::PublicKeys(paths) => parts.push(format!(
                "{} public key(s) ({}) from {} path(s), re-read every {} s",
                algorithms.len(),
                algorithms.join(", "),
                paths.len(),
                self.reload_interval.as_secs()
            )),
            StaticSource::Secret(_) => parts.push("HS256 secret".into()),
            StaticSource::SecretFile(path) if self.development_key.is_some() => {
                parts.push(format!("development HS256 key {}", path.display()))
            }
            StaticSource::SecretFile(_) => parts.push(format!(
                "HS256 secret file, re-read every {} s",
                self.reload_interval.as_secs()
            )),
            StaticSource::None => {}
        }
        if let Some(jwks) = &self.jwks {
            let timing = jwks.timing();
            parts.push(format!(
                "JWKS refreshed every {} s and on an unknown kid (at most every {} s)",
                timing.refresh_interval.as_secs(),
                timing.min_unknown_kid_interval.as_secs()
            ));
        }
        parts.join("; ")
    }

    fn static_keys(&self) -> Arc<StaticKeys> {
        self.static_keys
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Fetches the JWK set (when configured; a failure is logged, and tokens
    /// are refused until a later refresh succeeds), then spawns the task that
    /// refreshes it on schedule and re-reads changed key files, until `stop`.
    /// `None` when there is nothing to refresh.
    pub async fn start(
        self: &Arc<Self>,
        mut stop: watch::Receiver<bool>,
    ) -> Option<tokio::task::JoinHandle<()>> {
        if let Some(jwks) = &self.jwks
            && !jwks.refresh().await
        {
            tracing::warn!(
                "the JWKS could not be fetched at start: tokens of the identity provider are refused until it is"
            );
        }
        let reload = self.source.reloadable();
        if self.jwks.is_none() && !reload {
            return None;
        }
        let keys = self.clone();
        Some(tokio::spawn(async move {
            let jwks_every = keys
                .jwks
                .as_ref()
                .map_or(Duration::MAX, |jwks| jwks.timing().refresh_interval);
            let mut jwks_tick = tokio::time::interval_at(
                tokio::time::Instant::now() + jwks_every.min(Duration::from_secs(86_400 * 365)),
                jwks_every.min(Duration::from_secs(86_400 * 365)),
            );
            jwks_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut reload_tick = tokio::time::interval_at(
                tokio::time::Instant::now() + keys.reload_interval,
                keys.reload_interval,
            );
            reload_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.changed() => return,
                    _ = jwks_tick.tick(), if keys.jwks.is_some() => {
                        if let Some(jwks) = &keys.jwks {
                            jwks.refresh().await;
                        }
                    }
                    _ = reload_tick.tick(), if reload => {
                        let keys = keys.clone();
                        let _ = tokio::task::spawn_blocking(move || keys.reload_if_changed()).await;
                    }
                }
            }
        }))
    }

    /// Re-reads the key files when their contents changed; returns whether
    /// the keys in use changed. A file that cannot be read or parsed leaves
    /// the keys as they were (and is logged once per problem).
    pub fn reload_if_changed(&self) -> bool {
        if !self.source.reloadable() {
            return false;
        }
        let current = self.static_keys().digest;
        let loaded = match self.source.digest() {
            Ok(digest) if digest == current => return false,
            Ok(_) => self.source.load(),
            Err(error) => Err(error),
        };
        let mut problem = self
            .reload_problem
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match loaded {
            Ok(keys) => {
                tracing::info!(
                    keys = keys.keys.len(),
                    "JWT key files changed: keys reloaded"
                );
                *self
                    .static_keys
                    .write()
                    .unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(keys);
                *problem = None;
                true
            }
            Err(error) => {
                let message = format!("{error:#}");
                if problem.as_deref() != Some(message.as_str()) {
                    tracing::warn!(error = %message, "JWT key files changed but cannot be used; the previous keys stay in use");
                    *problem = Some(message);
                }
                false
            }
        }
    }

    /// Verifies a bearer token with the keys in hand (static keys and the
    /// cached JWK set; no network) and turns its claims into a [`Caller`].
    pub fn verify(&self, token: &str) -> Result<Caller, BillingError> {
        self.verify_until(token).map(|(caller, _)| caller)
    }

    /// Like [`KeySet::verify`], also returning when the token stops being
    /// accepted: its `exp` plus the leeway. Long streams end then.
    pub fn verify_until(&self, token: &str) -> Result<(Caller, SystemTime), BillingError> {
        self.verify_cached(token)
            .map_err(|rejection| match rejection {
                Rejection::UnknownKid(_) => unknown_kid(),
                Rejection::Invalid(error) => error,
            })
    }

    /// How far past `exp` a token is still accepted (clock skew), in seconds.
    pub fn leeway_secs(&self) -> u64 {
        self.validations
            .first()
            .map(|(_, validation)| validation.leeway)
            .unwrap_or(DEFAULT_LEEWAY_SECS)
    }

    /// The same keys with another leeway past `exp` (and before `nbf`).
    pub fn with_leeway_secs(mut self, leeway_secs: u64) -> KeySet {
        for (_, validation) in &mut self.validations {
            validation.leeway = leeway_secs;
        }
        self
    }

    /// [`KeySet::verify`], and when the token names a `kid` the JWK set does
    /// not hold, once more after refreshing the set (at most once per
    /// minimum interval, whatever the tokens say).
    /// Returns the caller and when the token stops being accepted (its `exp`
    /// plus the leeway).
    pub async fn authenticate(&self, token: &str) -> Result<(Caller, SystemTime), BillingError> {
        match self.verify_cached(token) {
            Ok(verified) => Ok(verified),
            Err(Rejection::Invalid(error)) => Err(error),
            Err(Rejection::UnknownKid(kid)) => {
                if let Some(jwks) = &self.jwks {
                    jwks.refresh_for_unknown_kid(&kid).await;
                }
                self.verify_until(token)
            }
        }
    }

    fn verify_cached(&self, token: &str) -> Result<(Caller, SystemTime), Rejection> {
        let header = jsonwebtoken::decode_header(token).map_err(|error| invalid(&error))?;
        let static_keys = self.static_keys();
        let jwks_keys = self.jwks.as_ref().map(Jwks::keys).unwrap_or_default();
        let accepted = static_keys.keys.iter().any(|k| k.algorithm == header.alg)
            || (self.jwks.is_some() && JWKS_ALGORITHMS.contains(&header.alg));
        if !accepted {
            return Err(rejected("algorithm not accepted"));
        }
        let candidates = static_keys
            .keys
            .iter()
            .filter(|key| key.algorithm == header.alg)
            .chain(jwks_keys.iter().filter(|key| {
                key.algorithm == header.alg
                    && (header.kid.is_none() || key.kid.as_deref() == header.kid.as_deref())
            }));
        let Some((_, validation)) = self.validations.iter().find(|(a, _)| *a == header.alg) else {
            return Err(rejected("algorithm not accepted"));
        };
        for key in candidates {
            match jsonwebtoken::decode::<serde_json::Value>(token, &key.key, validation) {
                Ok(data) => {
                    let caller = self
                        .claims
                        .caller(&data.claims)
                        .map_err(Rejection::Invalid)?;
                    // `decode` refuses a token once `now` (whole seconds) exceeds `exp + leeway`.
                    let exp = data.claims.get("exp").and_then(serde_json::Value::as_u64);
                    let valid_until = UNIX_EPOCH
                        + Duration::from_secs(
                            exp.unwrap_or(0)
                                .saturating_add(validation.leeway)
                                .saturating_add(1),
                        );
                    return Ok((caller, valid_until));
                }
                // Signed by another key: try the next one of this algorithm.
                Err(error) if *error.kind() == ErrorKind::InvalidSignature => continue,
                Err(error) => return Err(invalid(&error)),
            }
        }
        match (&self.jwks, header.kid) {
            (Some(jwks), Some(kid))
                if JWKS_ALGORITHMS.contains(&header.alg) && !jwks.knows(&kid) =>
            {
                Err(Rejection::UnknownKid(kid))
            }
            _ => Err(rejected("bad signature")),
        }
    }

    /// Mints a token (the `billing token` command and tests). A service
    /// token with an `account` reaches only that account.
    pub fn mint(
        &self,
        subject: &str,
        role: &str,
        account: Option<&str>,
        ttl_seconds: u64,
    ) -> anyhow::Result<String> {
        let Some(parsed_role) = Role::parse(role) else {
            bail!("unknown role {role:?}: use admin, commercial, billing, viewer or service");
        };
        if parsed_role != Role::Service && account.is_none() {
            bail!("role {role} needs --account");
        }
        if let Some(account) = account {
            AccountId::parse(account).map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        // The same rule as verifying (`claims.rs`): a token the service
        // would refuse is never minted.
        if subject.is_empty() {
            bail!("--subject must not be empty");
        }
        crate::ids::parse_text("--subject", subject, 255).map_err(|e| anyhow::anyhow!("{e}"))?;
        if !self.default_claims {
            bail!(
                "billing token writes billing's own claims (roles, account): it cannot mint for \
                 --jwt-roles-claim, --jwt-role-map or --jwt-account-claim; use the identity provider's tokens"
            );
        }
        let Some((algorithm, encoding)) = &self.encoding else {
            bail!(
                "minting needs a signing key: the private key (--jwt-private-key-file) or the HS256 secret"
            );
        };
        let now = jsonwebtoken::get_current_timestamp();
        let claims = Claims {
            sub: subject.to_owned(),
            account: account.map(str::to_owned),
            roles: vec![role.to_owned()],
            exp: now + ttl_seconds,
            iat: now,
            nbf: None,
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
        };
        Ok(jsonwebtoken::encode(
            &Header::new(*algorithm),
            &claims,
            encoding,
        )?)
    }
}

fn unknown_kid() -> BillingError {
    BillingError::Unauthenticated("invalid bearer token: signed by an unknown key (kid)".to_owned())
}

fn rejected(why: &str) -> Rejection {
    Rejection::Invalid(BillingError::Unauthenticated(format!(
        "invalid bearer token: {why}"
    )))
}

fn invalid(error: &jsonwebtoken::errors::Error) -> Rejection {
    tracing::debug!(%error, "token rejected");
    if *error.kind() == ErrorKind::ExpiredSignature {
        return Rejection::Invalid(BillingError::TokenExpired(
            "invalid bearer token: expired".to_owned(),
        ));
    }
    rejected(describe(error))
}

fn describe(error: &jsonwebtoken::errors::Error) -> &'static str {
    match error.kind() {
        ErrorKind::ExpiredSignature => "expired",
        ErrorKind::ImmatureSignature => "not yet valid",
        ErrorKind::InvalidIssuer => "wrong issuer",
        ErrorKind::InvalidAudience => "wrong audience",
        ErrorKind::InvalidSignature => "bad signature",
        ErrorKind::InvalidAlgorithm => "algorithm not accepted",
        ErrorKind::MissingRequiredClaim(_) => "a required claim is missing",
        _ => "malformed",
    }
}

/// The signing key of a PEM private key file, with its algorithm.
fn private_key(file: &Path) -> anyhow::Result<(Algorithm, EncodingKey)> {
    let pem = fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    if let Ok(key) = EncodingKey::from_rsa_pem(&pem) {
        Ok((Algorithm::RS256, key))
    } else if let Ok(key) = EncodingKey::from_ec_pem(&pem) {
        Ok((Algorithm::ES256, key))
    } else if let Ok(key) = EncodingKey::from_ed_pem(&pem) {
        Ok((Algorithm::EdDSA, key))
    } else {
        bail!(
            "{} is not an RSA, EC (P-256, PKCS#8) or Ed25519 private key in PEM form",
            file.display()
        )
    }
}

/// Reads the development secret, creating it (mode 0600) on first use.
fn development_secret(path: &Path) -> anyhow::Result<Vec<u8>> {
    if let Ok(text) = fs::read_to_string(path) {
        return Ok(text.trim().as_bytes().to_vec());
    }
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    let secret = hex::encode(rand::random::<[u8; 32]>());
    let created = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path);
    match created {
        Ok(mut file) => file.write_all(secret.as_bytes())?,
        // Another process created it first: use theirs.
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(error) => return Err(error).with_context(|| format!("creating {}", path.display())),
    }
    Ok(fs::read_to_string(path)?.trim().as_bytes().to_vec())
}
