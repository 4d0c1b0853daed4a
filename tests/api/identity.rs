//! Production identity: tokens of an identity provider verified with the
//! keys of its JWK set (served here by a local HTTP server), picked up
//! across a key rotation without a restart, with a rate-limited refresh on
//! an unknown `kid`; `aud` arrays; roles read from the provider's claims and
//! renamed; static key files rotated without a restart; and the rule of
//! `billing token --role service --account X` (the token reaches only X).

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use billing::auth::{KeySet, RoleMapping};
use billing::config::AuthArgs;
use billing::proto;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tonic::Code;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::helpers::{TestApp, authed, eventually, spawn_app, spawn_app_with_keys};

const ISSUER: &str = "https://sso.example/realms/billing";
const AUDIENCE: &str = "billing";
const ACCT: &str = "acme";
const OTHER: &str = "globex";
/// A whole hour between refreshes caused by unknown `kid`s: within a test,
/// only the first such refresh may reach the provider.
const HOUR: u64 = 3600;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// A provider's signing key: its private half signs, its JWK is published.
struct Signer {
    algorithm: Algorithm,
    kid: String,
    key: EncodingKey,
    jwk: Value,
}

impl Signer {
    fn new(private_pem: &str, algorithm: Algorithm, kid: &str) -> Signer {
        let pem = std::fs::read(fixture(private_pem)).unwrap();
        let key = match algorithm {
            Algorithm::RS256 => EncodingKey::from_rsa_pem(&pem),
            Algorithm::ES256 => EncodingKey::from_ec_pem(&pem),
            Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem),
            other => panic!("no fixture for {other:?}"),
        }
        .unwrap();
        let mut jwk =
            serde_json::to_value(Jwk::from_encoding_key(&key, algorithm).unwrap()).unwrap();
        jwk["kid"] = json!(kid);
        jwk["use"] = json!("sig");
        Signer {
            algorithm,
            kid: kid.to_owned(),
            key,
            jwk,
        }
    }

    fn rsa(kid: &str) -> Signer {
        Signer::new("rs256-private.pem", Algorithm::RS256, kid)
    }

    fn other_rsa(kid: &str) -> Signer {
        Signer::new("rs256-b-private.pem", Algorithm::RS256, kid)
    }

    fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(self.algorithm);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.key).unwrap()
    }
}

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

/// A token as Keycloak issues it: `aud` an array, roles in
/// `realm_access.roles`, the account in a custom claim.
fn keycloak_claims(realm_roles: &[&str], account: Option<&str>) -> Value {
    let mut claims = json!({
        "exp": now() + 300,
        "iat": now(),
        "iss": ISSUER,
        "aud": ["account", AUDIENCE],
        "sub": "f3a9c1d2-7e4b-4c1a-9a55-2b8f0c6d1e77",
        "typ": "Bearer",
        "azp": "panel",
        "preferred_username": "alice",
        "realm_access": {"roles": realm_roles},
        "scope": "openid profile email",
    });
    if let Some(account) = account {
        claims["billing_account"] = json!(account);
    }
    claims
}

/// The identity provider: a local HTTP server publishing a JWK set at
/// `/jwks` (changed by `publish`), counting how often billing fetched it.
struct Provider {
    server: MockServer,
    keys: Arc<Mutex<Vec<Value>>>,
    fetches: Arc<AtomicUsize>,
}

impl Provider {
    async fn start(signers: &[&Signer]) -> Provider {
        let server = MockServer::start().await;
        let keys = Arc::new(Mutex::new(Vec::new()));
        let fetches = Arc::new(AtomicUsize::new(0));
        let (served, counted) = (keys.clone(), fetches.clone());
        Mock::given(method("GET"))
            .and(path("/jwks"))
            .respond_with(move |_: &wiremock::Request| {
                counted.fetch_add(1, Ordering::SeqCst);
                let keys = served.lock().unwrap().clone();
                ResponseTemplate::new(200).set_body_json(json!({ "keys": keys }))
            })
            .mount(&server)
            .await;
        let provider = Provider {
            server,
            keys,
            fetches,
        };
        provider.publish(signers);
        provider
    }

    /// From now on the JWK set holds exactly these keys.
    fn publish(&self, signers: &[&Signer]) {
        *self.keys.lock().unwrap() = signers.iter().map(|s| s.jwk.clone()).collect();
    }

    /// How many times billing fetched the JWK set.
    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }

    fn jwks_url(&self) -> String {
        format!("{}/jwks", self.server.uri())
    }

    fn uri(&self) -> String {
        self.server.uri()
    }
}

/// Keycloak-style settings: roles from `realm_access.roles` renamed by the map.
fn keycloak_args(jwks_url: String) -> AuthArgs {
    AuthArgs {
        jwt_jwks_url: Some(jwks_url),
        jwt_issuer: Some(ISSUER.into()),
        jwt_audience: Some(AUDIENCE.into()),
        jwt_jwks_min_refresh_secs: HOUR,
        jwt_roles_claim: vec!["realm_access.roles".into()],
        jwt_role_map: [
            "billing-admin=admin",
            "billing-viewer=viewer",
            "svc=service",
        ]
        .iter()
        .map(|m| RoleMapping::parse(m).unwrap())
        .collect(),
        jwt_account_claim: "billing_account".into(),
        ..AuthArgs::default()
    }
}

fn key_set(args: &AuthArgs) -> Arc<KeySet> {
    Arc::new(KeySet::load(args, std::path::Path::new("/nonexistent")).expect("key set"))
}

async fn get_balance(app: &TestApp, token: &str, account: &str) -> Code {
    match app
        .balances()
        .get_balance(authed(
            token,
            proto::GetBalanceRequest {
                account_id: account.into(),
            },
        ))
        .await
    {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    }
}

async fn create_account(app: &TestApp, service_token: &str, account: &str) {
    app.balances()
        .create_account(authed(
            service_token,
            proto::CreateAccountRequest {
                account_id: account.into(),
                currency: "USD".into(),
                ..Default::default()
            },
        ))
        .await
        .expect("create account");
}

#[tokio::test]
async fn a_keycloak_token_signed_by_a_key_of_the_jwks_is_accepted() {
    let key = Signer::rsa("key-2025");
    let provider = Provider::start(&[&key]).await;
    let app = spawn_app_with_keys(key_set(&keycloak_args(provider.jwks_url()))).await;
    let service = key.sign(&keycloak_claims(&["svc"], None));
    create_account(&app, &service, ACCT).await;
    assert_eq!(
        provider.fetches(),
        1,
        "fetched once, at start (before serving)"
    );
    let admin = key.sign(&keycloak_claims(
        &["offline_access", "billing-admin"],
        Some(ACCT),
    ));
    assert_eq!(get_balance(&app, &admin, ACCT).await, Code::Ok);
    assert_eq!(provider.fetches(), 1, "verified from the cache");
    app.stop().await;
}

#[tokio::test]
async fn rs256_es256_and_eddsa_keys_of_the_jwks_all_verify() {
    let signers = [
        Signer::rsa("rsa"),
        Signer::new("es256-private.pem", Algorithm::ES256, "ec"),
        Signer::new("ed25519-private.pem", Algorithm::EdDSA, "ed"),
    ];
    let provider = Provider::start(&signers.iter().collect::<Vec<_>>()).await;
    let app = spawn_app_with_keys(key_set(&keycloak_args(provider.jwks_url()))).await;
    create_account(
        &app,
        &signers[0].sign(&keycloak_claims(&["svc"], None)),
        ACCT,
    )
    .await;
    for signer in &signers {
        let token = signer.sign(&keycloak_claims(&["billing-viewer"], Some(ACCT)));
        assert_eq!(
            get_balance(&app, &token, ACCT).await,
            Code::Ok,
            "{:?}",
            signer.algorithm
        );
    }
    app.stop().await;
}

#[tokio::test]
async fn a_key_rotated_at_the_provider_is_picked_up_without_restart() {
    let old = Signer::rsa("key-1");
    let new = Signer::other_rsa("key-2");
    let provider = Provider::start(&[&old]).await;
    let app = spawn_app_with_keys(key_set(&keycloak_args(provider.jwks_url()))).await;
    create_account(&app, &old.sign(&keycloak_claims(&["svc"], None)), ACCT).await;
    let viewer_claims = keycloak_claims(&["billing-viewer"], Some(ACCT));
    assert_eq!(
        get_balance(&app, &old.sign(&viewer_claims), ACCT).await,
        Code::Ok
    );
    assert_eq!(provider.fetches(), 1);

    // The provider rotates to key-2 (key-1 still published); the running
    // server sees a token with the unknown kid key-2, refreshes once, accepts it.
    provider.publish(&[&old, &new]);
    assert_eq!(
        get_balance(&app, &new.sign(&viewer_claims), ACCT).await,
        Code::Ok
    );
    assert_eq!(
        get_balance(&app, &old.sign(&viewer_claims), ACCT).await,
        Code::Ok
    );
    assert_eq!(provider.fetches(), 2, "one refresh, for the new kid");
    app.stop().await;
}

#[tokio::test]
async fn an_unknown_kid_is_refused_after_one_refresh_and_refreshes_are_rate_limited() {
    let published = Signer::rsa("published");
    let provider = Provider::start(&[&published]).await;
    let app = spawn_app_with_keys(key_set(&keycloak_args(provider.jwks_url()))).await;
    create_account(
        &app,
        &published.sign(&keycloak_claims(&["svc"], None)),
        ACCT,
    )
    .await;
    assert_eq!(provider.fetches(), 1, "fetched at start");
    let viewer_claims = keycloak_claims(&["billing-viewer"], Some(ACCT));

    let unknown = Signer::other_rsa("never-published");
    assert_eq!(
        get_balance(&app, &unknown.sign(&viewer_claims), ACCT).await,
        Code::Unauthenticated
    );
    assert_eq!(provider.fetches(), 2, "the unknown kid caused one refresh");

    // Many more made-up kids, some at once: no further fetch this hour.
    let mut calls = Vec::new();
    for n in 0..8 {
        let forged = Signer::other_rsa(&format!("made-up-{n}"));
        let token = forged.sign(&viewer_claims);
        let app = &app;
        calls.push(async move { get_balance(app, &token, ACCT).await });
    }
    for code in futures::future::join_all(calls).await {
        assert_eq!(code, Code::Unauthenticated);
    }
    assert_eq!(provider.fetches(), 2, "unknown kids are rate limited");
    assert_eq!(
        get_balance(&app, &published.sign(&viewer_claims), ACCT).await,
        Code::Ok,
        "known keys are unaffected"
    );
    app.stop().await;
}

#[tokio::test]
async fn an_unknown_kid_refreshes_again_once_the_minimum_interval_passed() {
    let first = Signer::rsa("first");
    let second = Signer::other_rsa("second");
    let provider = Provider::start(&[&first]).await;
    let args = AuthArgs {
        jwt_jwks_min_refresh_secs: 1,
        ..keycloak_args(provider.jwks_url())
    };
    let app = spawn_app_with_keys(key_set(&args)).await;
    create_account(&app, &first.sign(&keycloak_claims(&["svc"], None)), ACCT).await;
    let viewer_claims = keycloak_claims(&["billing-viewer"], Some(ACCT));
    assert_eq!(
        get_balance(&app, &second.sign(&viewer_claims), ACCT).await,
        Code::Unauthenticated
    );
    provider.publish(&[&first, &second]);
    let token = second.sign(&viewer_claims);
    eventually(
        "the second key accepted after the minimum interval",
        || async { get_balance(&app, &token, ACCT).await == Code::Ok },
    )
    .await;
    app.stop().await;
}

#[tokio::test]
async fn the_jwks_is_refreshed_on_schedule_and_a_failed_fetch_keeps_the_cached_keys() {
    let first = Signer::rsa("first");
    let second = Signer::other_rsa("second");
    let provider = Provider::start(&[&first]).await;
    let args = AuthArgs {
        jwt_jwks_refresh_secs: 1,
        ..keycloak_args(provider.jwks_url())
    };
    let app = spawn_app_with_keys(key_set(&args)).await;
    create_account(&app, &first.sign(&keycloak_claims(&["svc"], None)), ACCT).await;
    let viewer_claims = keycloak_claims(&["billing-viewer"], Some(ACCT));
    // This hour's refresh for unknown kids is spent here.
    let token = second.sign(&viewer_claims);
    assert_eq!(get_balance(&app, &token, ACCT).await, Code::Unauthenticated);
    provider.publish(&[&first, &second]);
    eventually("the scheduled refresh brings the second key", || async {
        get_balance(&app, &token, ACCT).await == Code::Ok
    })
    .await;

    // The provider fails: the keys fetched before stay in use.
    provider.publish(&[]);
    let fetches = provider.fetches();
    eventually("a scheduled refresh that finds no key", || async {
        provider.fetches() > fetches + 1
    })
    .await;
    assert_eq!(get_balance(&app, &token, ACCT).await, Code::Ok);
    app.stop().await;
}

#[tokio::test]
async fn the_jwks_is_discovered_from_the_issuers_openid_configuration() {
    let key = Signer::new("es256-private.pem", Algorithm::ES256, "ec-1");
    let provider = Provider::start(&[&key]).await;
    Mock::given(method("GET"))
        .and(path("/.well-known/openid-configuration"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "issuer": provider.uri(),
            "jwks_uri": format!("{}/jwks", provider.uri()),
            "id_token_signing_alg_values_supported": ["RS256", "ES256"],
        })))
        .mount(&provider.server)
        .await;
    let args = AuthArgs {
        jwt_jwks_url: None,
        jwt_oidc_discovery: true,
        jwt_issuer: Some(provider.uri()),
        ..keycloak_args(String::new())
    };
    let app = spawn_app_with_keys(key_set(&args)).await;
    let mut claims = keycloak_claims(&["svc"], None);
    claims["iss"] = json!(provider.uri());
    create_account(&app, &key.sign(&claims), ACCT).await;
    assert_eq!(provider.fetches(), 1);
    app.stop().await;
}

#[tokio::test]
async fn aud_array_is_accepted_when_it_contains_the_audience_and_refused_otherwise() {
    let key = Signer::rsa("k");
    let provider = Provider::start(&[&key]).await;
    let app = spawn_app_with_keys(key_set(&keycloak_args(provider.jwks_url()))).await;
    create_account(&app, &key.sign(&keycloak_claims(&["svc"], None)), ACCT).await;
    let with_aud = |aud: Value| {
        let mut claims = keycloak_claims(&["billing-viewer"], Some(ACCT));
        match aud {
            Value::Null => {
                claims.as_object_mut().unwrap().remove("aud");
            }
            aud => claims["aud"] = aud,
        }
        key.sign(&claims)
    };
    for (aud, want) in [
        (json!(["account", "billing"]), Code::Ok),
        (json!(["billing"]), Code::Ok),
        (json!("billing"), Code::Ok),
        (json!(["account", "broker"]), Code::Unauthenticated),
        (json!([]), Code::Unauthenticated),
        (json!("account"), Code::Unauthenticated),
        (Value::Null, Code::Unauthenticated),
    ] {
        assert_eq!(
            get_balance(&app, &with_aud(aud.clone()), ACCT).await,
            want,
            "aud {aud}"
        );
    }
    app.stop().await;
}

#[tokio::test]
async fn roles_are_mapped_from_realm_access_roles() {
    let key = Signer::rsa("k");
    let provider = Provider::start(&[&key]).await;
    let app = spawn_app_with_keys(key_set(&keycloak_args(provider.jwks_url()))).await;
    create_account(&app, &key.sign(&keycloak_claims(&["svc"], None)), ACCT).await;
    let update = |token: String| {
        let app = &app;
        async move {
            match proto::notifications_client::NotificationsClient::new(app.channel.clone())
                .update_notification_settings(authed(
                    &token,
                    proto::UpdateNotificationSettingsRequest {
                        account_id: ACCT.into(),
                        ..Default::default()
                    },
                ))
                .await
            {
                Ok(_) => Code::Ok,
                Err(status) => status.code(),
            }
        }
    };
    // billing-admin → admin: manages the account.
    let admin = key.sign(&keycloak_claims(&["billing-admin"], Some(ACCT)));
    assert_eq!(update(admin).await, Code::Ok);
    // billing-viewer → viewer: reads, never changes.
    let viewer = key.sign(&keycloak_claims(&["billing-viewer"], Some(ACCT)));
    assert_eq!(get_balance(&app, &viewer, ACCT).await, Code::Ok);
    assert_eq!(update(viewer).await, Code::PermissionDenied);
    // With a map, billing's own names in the provider's claim grant nothing.
    let unmapped = key.sign(&keycloak_claims(&["admin", "service"], Some(ACCT)));
    assert_eq!(
        get_balance(&app, &unmapped, ACCT).await,
        Code::PermissionDenied
    );
    // Roles at the top level are not where this provider puts them.
    let mut top_level = keycloak_claims(&[], Some(ACCT));
    top_level["roles"] = json!(["billing-admin", "admin"]);
    assert_eq!(
        get_balance(&app, &key.sign(&top_level), ACCT).await,
        Code::PermissionDenied
    );
    app.stop().await;
}

#[tokio::test]
async fn an_auth0_token_with_namespaced_claims_and_a_scope_is_accepted() {
    let key = Signer::rsa("auth0-key");
    let provider = Provider::start(&[&key]).await;
    let issuer = "https://tenant.eu.auth0.com/";
    let args = AuthArgs {
        jwt_jwks_url: Some(provider.jwks_url()),
        jwt_issuer: Some(issuer.into()),
        jwt_audience: Some("https://billing.example/api".into()),
        jwt_roles_claim: vec!["https://billing.example/roles".into(), "scope".into()],
        jwt_role_map: ["billing:admin=admin", "billing:service=service"]
            .iter()
            .map(|m| RoleMapping::parse(m).unwrap())
            .collect(),
        jwt_account_claim: "https://billing.example/account".into(),
        jwt_jwks_min_refresh_secs: HOUR,
        ..AuthArgs::default()
    };
    let app = spawn_app_with_keys(key_set(&args)).await;
    let auth0 = |roles: Value, scope: &str, account: Option<&str>| {
        let mut claims = json!({
            "iss": issuer,
            "sub": "auth0|64f1c0ffee",
            "aud": ["https://billing.example/api", "https://tenant.eu.auth0.com/userinfo"],
            "iat": now(),
            "exp": now() + 300,
            "azp": "Xk2pAnelClientId",
            "scope": scope,
            "https://billing.example/roles": roles,
        });
        if let Some(account) = account {
            claims["https://billing.example/account"] = json!(account);
        }
        key.sign(&claims)
    };
    // A machine-to-machine token: its scope grants the service role.
    let service = auth0(json!([]), "billing:service", None);
    create_account(&app, &service, ACCT).await;
    let admin = auth0(json!(["billing:admin"]), "openid profile", Some(ACCT));
    assert_eq!(get_balance(&app, &admin, ACCT).await, Code::Ok);
    app.stop().await;
}

#[tokio::test]
async fn a_service_token_bound_to_an_account_reaches_only_that_account() {
    let app = spawn_app().await;
    app.account_with_balance(ACCT, "10.00").await;
    app.account_with_balance(OTHER, "10.00").await;
    // `billing token --role service --account acme` mints this token.
    let bound = app
        .keys
        .mint("usage-meter", "service", Some(ACCT), 600)
        .unwrap();
    assert_eq!(get_balance(&app, &bound, ACCT).await, Code::Ok);
    assert_eq!(get_balance(&app, &bound, OTHER).await, Code::NotFound);
    let debit = |account: &'static str, key: &'static str| {
        let app = &app;
        let bound = bound.clone();
        async move {
            match app
                .balances()
                .debit(authed(
                    &bound,
                    proto::DebitRequest {
                        account_id: account.into(),
                        amount: "1.00".into(),
                        idempotency_key: key.into(),
                        ..Default::default()
                    },
                ))
                .await
            {
                Ok(_) => Code::Ok,
                Err(status) => status.code(),
            }
        }
    };
    assert_eq!(debit(ACCT, "bound-1").await, Code::Ok);
    assert_eq!(debit(OTHER, "bound-2").await, Code::NotFound);
    let created = app
        .balances()
        .create_account(authed(
            &bound,
            proto::CreateAccountRequest {
                account_id: "initech".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(created.code(), Code::NotFound);
    let every_account = app
        .balances()
        .watch_balance_events(authed(
            &bound,
            proto::WatchBalanceEventsRequest {
                account_id: String::new(),
                after_cursor: 0,
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(every_account.code(), Code::PermissionDenied);
    // Without an account, a service token reaches every account.
    let unbound = app.service_token();
    assert_eq!(get_balance(&app, &unbound, OTHER).await, Code::Ok);
    app.stop().await;
}

#[tokio::test]
async fn static_key_files_are_reloaded_without_restart_and_old_tokens_work_while_both_are_configured()
 {
    let directory = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture("rs256-public.pem"),
        directory.path().join("key-1.pem"),
    )
    .unwrap();
    let args = AuthArgs {
        jwt_public_key_file: vec![directory.path().to_owned()],
        jwt_issuer: Some(ISSUER.into()),
        jwt_audience: Some(AUDIENCE.into()),
        jwt_key_reload_secs: 1,
        ..AuthArgs::default()
    };
    let app = spawn_app_with_keys(key_set(&args)).await;
    let sign = |private: &str, roles: &[&str], account: Option<&str>| {
        let key = EncodingKey::from_rsa_pem(&std::fs::read(fixture(private)).unwrap()).unwrap();
        let mut claims = json!({
            "sub": "panel", "iss": ISSUER, "aud": AUDIENCE,
            "exp": now() + 300, "iat": now(), "roles": roles,
        });
        if let Some(account) = account {
            claims["account"] = json!(account);
        }
        jsonwebtoken::encode(&Header::new(Algorithm::RS256), &claims, &key).unwrap()
    };
    create_account(&app, &sign("rs256-private.pem", &["service"], None), ACCT).await;
    let old = sign("rs256-private.pem", &["viewer"], Some(ACCT));
    let new = sign("rs256-b-private.pem", &["viewer"], Some(ACCT));
    assert_eq!(get_balance(&app, &new, ACCT).await, Code::Unauthenticated);

    // The new public key is added next to the old one.
    std::fs::copy(
        fixture("rs256-b-public.pem"),
        directory.path().join("key-2.pem"),
    )
    .unwrap();
    eventually("the added key verifies tokens", || async {
        get_balance(&app, &new, ACCT).await == Code::Ok
    })
    .await;
    assert_eq!(
        get_balance(&app, &old, ACCT).await,
        Code::Ok,
        "the old key's tokens work while both keys are configured"
    );

    // The old key is retired.
    std::fs::remove_file(directory.path().join("key-1.pem")).unwrap();
    eventually("the removed key no longer verifies", || async {
        get_balance(&app, &old, ACCT).await == Code::Unauthenticated
    })
    .await;
    assert_eq!(get_balance(&app, &new, ACCT).await, Code::Ok);
    app.stop().await;
}
