//! Production keys: RS256 and ES256 public keys verify tokens signed by
//! their private keys, and nothing else. (Test-only key pairs in tests/fixtures.)

use std::path::PathBuf;

use billing::auth::{Claims, KeySet, Role};
use billing::config::AuthArgs;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn keys(public: &str, private: Option<&str>) -> KeySet {
    KeySet::load(
        &AuthArgs {
            jwt_public_key_file: vec![fixture(public)],
            jwt_private_key_file: private.map(fixture),
            jwt_issuer: Some("https://panel.example".into()),
            jwt_audience: Some("billing".into()),
            ..Default::default()
        },
        std::path::Path::new("/nonexistent"),
    )
    .expect("load keys")
}

#[test]
fn rs256_and_es256_tokens_verify_with_their_public_keys() {
    for (public, private) in [
        ("rs256-public.pem", "rs256-private.pem"),
        ("es256-public.pem", "es256-private.pem"),
    ] {
        let keys = keys(public, Some(private));
        let token = keys.mint("panel", "billing", Some("acme"), 60).unwrap();
        let caller = keys.verify(&token).expect(public);
        assert_eq!(caller.roles, vec![Role::Billing]);
        assert_eq!(caller.account.unwrap().as_str(), "acme");
    }
}

#[test]
fn a_token_signed_by_the_other_key_type_is_refused() {
    let rsa = keys("rs256-public.pem", Some("rs256-private.pem"));
    let ec = keys("es256-public.pem", Some("es256-private.pem"));
    assert!(
        rsa.verify(&ec.mint("x", "service", None, 60).unwrap())
            .is_err()
    );
    assert!(
        ec.verify(&rsa.mint("x", "service", None, 60).unwrap())
            .is_err()
    );
}

#[test]
fn hs256_token_signed_with_the_rs256_public_key_is_refused() {
    let rsa = keys("rs256-public.pem", None);
    let public_pem = std::fs::read(fixture("rs256-public.pem")).unwrap();
    let now = jsonwebtoken::get_current_timestamp();
    let claims = Claims {
        sub: "mallory".into(),
        account: None,
        roles: vec!["service".into()],
        exp: now + 60,
        iat: now,
        nbf: None,
        iss: Some("https://panel.example".into()),
        aud: Some("billing".into()),
    };
    let forged = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(&public_pem),
    )
    .unwrap();
    assert!(rsa.verify(&forged).is_err());
}

#[test]
fn wrong_issuer_or_audience_is_refused_when_configured() {
    let rsa = keys("rs256-public.pem", Some("rs256-private.pem"));
    let private = jsonwebtoken::EncodingKey::from_rsa_pem(
        &std::fs::read(fixture("rs256-private.pem")).unwrap(),
    )
    .unwrap();
    let now = jsonwebtoken::get_current_timestamp();
    for (iss, aud) in [
        ("https://evil.example", "billing"),
        ("https://panel.example", "other"),
    ] {
        let claims = Claims {
            sub: "x".into(),
            account: None,
            roles: vec!["service".into()],
            exp: now + 60,
            iat: now,
            nbf: None,
            iss: Some(iss.into()),
            aud: Some(aud.into()),
        };
        let token = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
            &claims,
            &private,
        )
        .unwrap();
        assert!(rsa.verify(&token).is_err(), "{iss} {aud}");
    }
}

#[test]
fn minting_without_the_private_key_says_so() {
    let rsa = keys("rs256-public.pem", None);
    let error = rsa.mint("x", "service", None, 60).unwrap_err();
    assert!(error.to_string().contains("private key"), "{error}");
}
