//! Bearer tokens: HS256 with a shared secret, or RS256/ES256 with a public
//! key. With no key configured, a development secret is kept in the data
//! directory so one command can run the service locally.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use super::{Caller, Role};
use crate::config::AuthArgs;
use crate::error::BillingError;
use crate::ids::AccountId;

/// Seconds past `exp` a token is still accepted unless configured otherwise
/// (`--jwt-leeway-secs`).
pub const DEFAULT_LEEWAY_SECS: u64 = 30;

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

pub struct KeySet {
    algorithm: Algorithm,
    decoding: DecodingKey,
    encoding: Option<EncodingKey>,
    validation: Validation,
    issuer: Option<String>,
    audience: Option<String>,
    /// Set when the development secret is in use.
    pub development_key: Option<PathBuf>,
}

impl KeySet {
    pub fn load(args: &AuthArgs, data_dir: &Path) -> anyhow::Result<KeySet> {
        let (algorithm, decoding, encoding, development_key) =
            if let Some(public_key_file) = &args.jwt_public_key_file {
                let pem = fs::read(public_key_file)
                    .with_context(|| format!("reading {}", public_key_file.display()))?;
                let private_pem = match &args.jwt_private_key_file {
                    Some(file) => Some(
                        fs::read(file).with_context(|| format!("reading {}", file.display()))?,
                    ),
                    None => None,
                };
                if let Ok(decoding) = DecodingKey::from_rsa_pem(&pem) {
                    let encoding = private_pem
                        .map(|p| EncodingKey::from_rsa_pem(&p))
                        .transpose()?;
                    (Algorithm::RS256, decoding, encoding, None)
                } else if let Ok(decoding) = DecodingKey::from_ec_pem(&pem) {
                    let encoding = private_pem
                        .map(|p| EncodingKey::from_ec_pem(&p))
                        .transpose()?;
                    (Algorithm::ES256, decoding, encoding, None)
                } else {
                    bail!(
                        "{} is neither an RSA nor an EC (P-256) public key in PEM form",
                        public_key_file.display()
                    );
                }
            } else {
                let (secret, development_key) = match (&args.jwt_secret, &args.jwt_secret_file) {
                    (Some(secret), _) => (secret.clone().into_bytes(), None),
                    (None, Some(file)) => {
                        let text = fs::read_to_string(file)
                            .with_context(|| format!("reading {}", file.display()))?;
                        (text.trim().as_bytes().to_vec(), None)
                    }
                    (None, None) => {
                        let path = data_dir.join("dev-jwt-secret");
                        (development_secret(&path)?, Some(path))
                    }
                };
                if secret.len() < 16 {
                    bail!("the JWT secret must be at least 16 bytes");
                }
                let decoding = DecodingKey::from_secret(&secret);
                let encoding = EncodingKey::from_secret(&secret);
                (Algorithm::HS256, decoding, Some(encoding), development_key)
            };
        let mut validation = Validation::new(algorithm);
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
        match &args.jwt_audience {
            Some(audience) => validation.set_audience(&[audience]),
            None => validation.validate_aud = false,
        }
        Ok(KeySet {
            algorithm,
            decoding,
            encoding,
            validation,
            issuer: args.jwt_issuer.clone(),
            audience: args.jwt_audience.clone(),
            development_key,
        })
    }

    /// How far past `exp` a token is still accepted (clock skew), in seconds.
    pub fn leeway_secs(&self) -> u64 {
        self.validation.leeway
    }

    /// The same keys with another leeway past `exp` (and before `nbf`).
    pub fn with_leeway_secs(mut self, leeway_secs: u64) -> KeySet {
        self.validation.leeway = leeway_secs;
        self
    }

    /// Verifies a bearer token and turns its claims into a [`Caller`].
    pub fn verify(&self, token: &str) -> Result<Caller, BillingError> {
        self.verify_until(token).map(|(caller, _)| caller)
    }

    /// Like [`KeySet::verify`], also returning when the token stops being
    /// accepted: its `exp` plus the leeway. Long streams end then.
    pub fn verify_until(&self, token: &str) -> Result<(Caller, SystemTime), BillingError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|error| {
                tracing::debug!(%error, "token rejected");
                BillingError::Unauthenticated(format!("invalid bearer token: {}", describe(&error)))
            })?;
        let claims = data.claims;
        // `decode` refuses a token once `now` (whole seconds) exceeds `exp + leeway`.
        let valid_until = UNIX_EPOCH
            + Duration::from_secs(
                claims
                    .exp
                    .saturating_add(self.validation.leeway)
                    .saturating_add(1),
            );
        let roles: Vec<Role> = claims.roles.iter().filter_map(|r| Role::parse(r)).collect();
        let is_service = roles.contains(&Role::Service);
        let account = match claims.account.as_deref() {
            Some(text) => Some(AccountId::parse(text).map_err(|_| {
                BillingError::Unauthenticated("invalid bearer token: bad account claim".into())
            })?),
            None if is_service => None,
            None => {
                return Err(BillingError::Unauthenticated(
                    "invalid bearer token: a user token needs an account claim".into(),
                ));
            }
        };
        Ok((
            Caller {
                subject: claims.sub,
                account,
                roles,
            },
            valid_until,
        ))
    }

    /// Mints a token (the `billing token` command and tests).
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
        let Some(encoding) = &self.encoding else {
            bail!(
                "minting {:?} tokens needs the private key (--jwt-private-key-file)",
                self.algorithm
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
            &Header::new(self.algorithm),
            &claims,
            encoding,
        )?)
    }
}

fn describe(error: &jsonwebtoken::errors::Error) -> &'static str {
    use jsonwebtoken::errors::ErrorKind;
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
