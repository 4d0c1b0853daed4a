//! `billing token`: the rule for `--role service --account X` (the token
//! reaches only X) is what the help says and what the token carries.

use serde_json::Value;

use crate::process::{SECRET, billing};

fn claims_of(token: &str) -> Value {
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    validation.validate_aud = false;
    jsonwebtoken::decode::<Value>(
        token,
        &jsonwebtoken::DecodingKey::from_secret(SECRET.as_bytes()),
        &validation,
    )
    .expect("a token signed with the configured secret")
    .claims
}

fn mint(args: &[&str]) -> std::process::Output {
    billing()
        .arg("token")
        .args(args)
        .env("BILLING_JWT_SECRET", SECRET)
        .output()
        .unwrap()
}

#[test]
fn token_help_says_a_service_token_with_an_account_reaches_only_that_account() {
    let output = billing().args(["token", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&output.stdout).replace('\n', " ");
    let help = help.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(
        help.contains("a service token with an account reaches only that account"),
        "{help}"
    );
}

#[test]
fn a_service_token_minted_with_an_account_is_bound_to_it() {
    let output = mint(&[
        "--role",
        "service",
        "--account",
        "acme",
        "--subject",
        "meter",
    ]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let claims = claims_of(String::from_utf8(output.stdout).unwrap().trim());
    assert_eq!(claims["account"], "acme");
    assert_eq!(claims["roles"], serde_json::json!(["service"]));
    assert_eq!(claims["sub"], "meter");

    let output = mint(&["--role", "service"]);
    assert!(output.status.success());
    let claims = claims_of(String::from_utf8(output.stdout).unwrap().trim());
    assert!(claims.get("account").is_none(), "{claims}");

    let output = mint(&["--role", "admin"]);
    assert!(!output.status.success(), "a user role needs --account");
    assert!(String::from_utf8_lossy(&output.stderr).contains("--account"));
}

#[test]
fn a_token_that_would_be_born_expired_is_refused_naming_the_flag() {
    for ttl in ["0", "-5"] {
        let output = mint(&["--role", "service", &format!("--ttl-seconds={ttl}")]);
        assert!(
            !output.status.success(),
            "--ttl-seconds {ttl} minted a token"
        );
        assert!(
            String::from_utf8_lossy(&output.stderr).contains("--ttl-seconds"),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let output = mint(&["--role", "service", "--ttl-seconds", "1"]);
    assert!(output.status.success());
}

#[test]
fn a_subject_the_service_would_refuse_is_never_minted_and_the_error_names_the_flag() {
    let too_long = "s".repeat(256);
    for subject in ["", "ops\u{202E}x", "a\nb", too_long.as_str()] {
        let output = mint(&["--role", "service", "--subject", subject]);
        assert!(
            !output.status.success(),
            "--subject {subject:?} minted a token"
        );
        assert!(
            String::from_utf8_lossy(&output.stderr).contains("--subject"),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let output = mint(&["--role", "service", "--subject", &"s".repeat(255)]);
    assert!(output.status.success());
}
