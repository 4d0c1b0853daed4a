//! Verification keys that live in files or settings: PEM public keys
//! (RS256, ES256, EdDSA; several at once, so a rotation overlaps) or an
//! HS256 secret. File keys are re-read when the files change, without a
//! restart: a new key verifies from the next check on, a removed key stops
//! verifying, and a file that does not parse (e.g. half written) leaves the
//! keys in use as they were.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use jsonwebtoken::{Algorithm, DecodingKey};
use sha2::{Digest, Sha256};

/// One key that verifies signatures of exactly one algorithm.
#[derive(Clone)]
pub(super) struct VerifyingKey {
    pub algorithm: Algorithm,
    pub key: DecodingKey,
    /// The JWK `kid`; `None` for keys from files or settings.
    pub kid: Option<String>,
}

/// Where the static keys come from.
#[derive(Debug, Clone)]
pub(super) enum StaticSource {
    /// PEM public keys: files, or directories of `*.pem` files.
    PublicKeys(Vec<PathBuf>),
    /// An HS256 secret given inline (never changes while running).
    Secret(Vec<u8>),
    /// An HS256 secret in a file (the development key is one too).
    SecretFile(PathBuf),
    /// No static key (a JWKS holds every key).
    None,
}

/// Files read, with their contents.
type KeyFiles = Vec<(PathBuf, Vec<u8>)>;

/// The keys read from a [`StaticSource`], and a digest of what they were read from.
pub(super) struct StaticKeys {
    pub keys: Vec<VerifyingKey>,
    /// SHA-256 over the paths and contents read; a change means "parse again".
    pub digest: [u8; 32],
}

impl StaticSource {
    /// Whether the keys can change while running (they come from files).
    pub fn reloadable(&self) -> bool {
        matches!(
            self,
            StaticSource::PublicKeys(_) | StaticSource::SecretFile(_)
        )
    }

    /// The digest of the source's files as they are now, without parsing
    /// them (cheap enough for every reload check).
    pub fn digest(&self) -> anyhow::Result<[u8; 32]> {
        Ok(self.read_files()?.0)
    }

    /// Reads and parses every key; an error names the file at fault.
    pub fn load(&self) -> anyhow::Result<StaticKeys> {
        let (digest, files) = self.read_files()?;
        let mut keys = Vec::new();
        match self {
            StaticSource::PublicKeys(_) => {
                for (path, pem) in &files {
                    keys.push(public_key_from_pem(path, pem)?);
                }
                if keys.is_empty() {
                    bail!("no public key found (a directory needs at least one *.pem file)");
                }
            }
            StaticSource::Secret(secret) => keys.push(hs256_key(secret)?),
            StaticSource::SecretFile(path) => {
                let text = String::from_utf8_lossy(&files[0].1).trim().to_owned();
                keys.push(
                    hs256_key(text.as_bytes()).with_context(|| format!("{}", path.display()))?,
                );
            }
            StaticSource::None => {}
        }
        Ok(StaticKeys { keys, digest })
    }

    /// The files of the source with their contents, in a stable order, and their digest.
    fn read_files(&self) -> anyhow::Result<([u8; 32], KeyFiles)> {
        let mut files = Vec::new();
        match self {
            StaticSource::PublicKeys(paths) => {
                for path in paths {
                    if path.is_dir() {
                        files.extend(pem_files_in(path)?);
                    } else {
                        files.push(path.clone());
                    }
                }
            }
            StaticSource::SecretFile(path) => files.push(path.clone()),
            StaticSource::Secret(_) | StaticSource::None => {}
        }
        let mut hasher = Sha256::new();
        let mut read = Vec::with_capacity(files.len());
        for path in files {
            let bytes = fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            hasher.update(path.as_os_str().as_encoded_bytes());
            hasher.update((bytes.len() as u64).to_le_bytes());
            hasher.update(&bytes);
            read.push((path, bytes));
        }
        Ok((hasher.finalize().into(), read))
    }
}

/// The `*.pem` files of a directory (not hidden ones: a mounted Kubernetes
/// Secret keeps its versions in `..data` folders), sorted by name.
fn pem_files_in(directory: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in
        fs::read_dir(directory).with_context(|| format!("reading {}", directory.display()))?
    {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if !name.starts_with('.') && name.ends_with(".pem") && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// An RS256, ES256 or EdDSA public key from PEM text.
pub(super) fn public_key_from_pem(path: &Path, pem: &[u8]) -> anyhow::Result<VerifyingKey> {
    let (algorithm, key) = if let Ok(key) = DecodingKey::from_rsa_pem(pem) {
        (Algorithm::RS256, key)
    } else if let Ok(key) = DecodingKey::from_ec_pem(pem) {
        (Algorithm::ES256, key)
    } else if let Ok(key) = DecodingKey::from_ed_pem(pem) {
        (Algorithm::EdDSA, key)
    } else {
        bail!(
            "{} is not an RSA, EC (P-256) or Ed25519 public key in PEM form",
            path.display()
        );
    };
    Ok(VerifyingKey {
        algorithm,
        key,
        kid: None,
    })
}

/// The HS256 key of a shared secret (at least 16 bytes).
pub(super) fn hs256_key(secret: &[u8]) -> anyhow::Result<VerifyingKey> {
    if secret.len() < 16 {
        bail!("the JWT secret must be at least 16 bytes");
    }
    Ok(VerifyingKey {
        algorithm: Algorithm::HS256,
        key: DecodingKey::from_secret(secret),
        kid: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_source_reads_its_pem_files_and_skips_hidden_ones() {
        let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let directory = tempfile::tempdir().unwrap();
        fs::copy(
            fixtures.join("rs256-public.pem"),
            directory.path().join("a.pem"),
        )
        .unwrap();
        fs::copy(
            fixtures.join("es256-public.pem"),
            directory.path().join("b.pem"),
        )
        .unwrap();
        fs::write(directory.path().join(".hidden.pem"), "not a key").unwrap();
        fs::write(directory.path().join("README"), "not a key").unwrap();
        let source = StaticSource::PublicKeys(vec![directory.path().to_owned()]);
        let keys = source.load().unwrap();
        let algorithms: Vec<Algorithm> = keys.keys.iter().map(|k| k.algorithm).collect();
        assert_eq!(algorithms, vec![Algorithm::RS256, Algorithm::ES256]);
        assert_eq!(source.digest().unwrap(), keys.digest);
        fs::remove_file(directory.path().join("b.pem")).unwrap();
        assert_ne!(source.digest().unwrap(), keys.digest);
    }

    #[test]
    fn a_short_secret_is_refused() {
        assert!(StaticSource::Secret(b"short".to_vec()).load().is_err());
    }
}
