//! Keyless credentials against the emulator's IAM: an ID token exchanged for a scoped token or
//! temporary keys, refreshed ahead of expiry one exchange at a time, the last good credentials
//! kept through a failing refresh, each refusal named, and an agency of another account.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use kms_emulator::{Emulator, EmulatorConfig, NewAgency, NewKey, NewUser, RunningEmulator};
use kmsgrant_kms::{
    Agency, ClientConfig, Credentials, Domain, ErrorReason, KmsClient, Project, SecretString,
    SubjectTokenSource,
};
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, KeyPair};
use serde_json::{Value, json};

const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
const AUDIENCE: &str = "kmsgrant";
const IDP: &str = "workload_identity";
const SUB: &str = "system:serviceaccount:kmsgrant-system:kmsgrant-operator";

/// An ES256 signer standing in for a cluster's service-account issuer.
struct Issuer {
    pair: EcdsaKeyPair,
}

impl Issuer {
    fn new() -> Self {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(
            &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            pkcs8.as_ref(),
            &rng,
        )
        .unwrap();
        Self { pair }
    }

    fn jwks(&self) -> String {
        let point = self.pair.public_key().as_ref();
        json!({"keys": [{"kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": "k1",
            "x": URL_SAFE_NO_PAD.encode(&point[1..33]), "y": URL_SAFE_NO_PAD.encode(&point[33..65])}]})
        .to_string()
    }

    fn mint(&self, audience: &str, sub: &str, expires_in: i64) -> String {
        let now = jiff::Timestamp::now().as_second();
        let claims = json!({"iss": ISSUER, "aud": [audience], "sub": sub, "iat": now, "nbf": now - 1, "exp": now + expires_in});
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(json!({"alg": "ES256", "kid": "k1", "typ": "JWT"}).to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let sig = self
            .pair
            .sign(&SystemRandom::new(), input.as_bytes())
            .unwrap();
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
    }
}

/// A token source that mints a fresh token at every exchange, counting them.
struct Minting {
    issuer: Arc<Issuer>,
    audience: String,
    sub: String,
    expires_in: i64,
    reads: AtomicUsize,
}

impl SubjectTokenSource for Minting {
    fn subject_token(
        &self,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<SecretString, String>> + Send + '_>> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        let token = self.issuer.mint(&self.audience, &self.sub, self.expires_in);
        Box::pin(async move { Ok(SecretString::from(token)) })
    }
    fn describe(&self) -> String {
        "a test issuer".into()
    }
}

struct Unavailable;

impl SubjectTokenSource for Unavailable {
    fn subject_token(
        &self,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<SecretString, String>> + Send + '_>> {
        Box::pin(async { Err("file /var/run/secrets/kmsgrant/token does not exist".into()) })
    }
    fn describe(&self) -> String {
        "token file /var/run/secrets/kmsgrant/token".into()
    }
}

async fn emulator(federation_ttl: Duration) -> RunningEmulator {
    Emulator::start(EmulatorConfig {
        federation_token_ttl: federation_ttl,
        agency_token_ttl: federation_ttl,
        ..EmulatorConfig::for_tests()
    })
    .await
    .unwrap()
}

/// The admin steps of the CCE guide, with the default user's token (Security Administrator).
async fn register_identity_provider(emu: &RunningEmulator, issuer: &Issuer) {
    let settings = emu.config();
    register_identity_provider_as(
        emu,
        issuer,
        (
            &settings.username,
            &settings.password,
            &settings.domain_name,
        ),
    )
    .await;
}

/// The admin steps as an IAM user (name, password, account) of any account: the identity
/// provider is that account's, and so are its federated users.
async fn register_identity_provider_as(
    emu: &RunningEmulator,
    issuer: &Issuer,
    (user, password, domain): (&str, &str, &str),
) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::new();
    let login = http
        .post(format!("{}/auth/tokens", emu.iam_endpoint()))
        .json(
            &json!({"auth": {"identity": {"methods": ["password"], "password": {"user": {
            "name": user, "password": password, "domain": {"name": domain}}}},
            "scope": {"domain": {"name": domain}}}}),
        )
        .send()
        .await
        .unwrap();
    let admin_token = login.headers()["x-subject-token"]
        .to_str()
        .unwrap()
        .to_owned();
    let base = emu.base_url();
    let steps: [(reqwest::Method, String, Value); 4] = [
        (
            reqwest::Method::PUT,
            format!("{base}/v3/OS-FEDERATION/identity_providers/{IDP}"),
            json!({"identity_provider": {"sso_type": "virtual_user_sso", "enabled": true}}),
        ),
        (
            reqwest::Method::PUT,
            format!("{base}/v3/OS-FEDERATION/mappings/kms-operator"),
            json!({"mapping": {"rules": [{"local": [{"user": {"name": "kms-operator"}}, {"group": {"name": "kms-grant-admins"}}],
                "remote": [{"type": "sub", "any_one_of": [SUB]}]}]}}),
        ),
        (
            reqwest::Method::PUT,
            format!("{base}/v3/OS-FEDERATION/identity_providers/{IDP}/protocols/oidc"),
            json!({"protocol": {"mapping_id": "kms-operator"}}),
        ),
        (
            reqwest::Method::POST,
            format!("{base}/v3.0/OS-FEDERATION/identity-providers/{IDP}/openid-connect-config"),
            json!({"openid_connect_config": {"access_mode": "program", "idp_url": ISSUER, "client_id": AUDIENCE, "signing_key": issuer.jwks()}}),
        ),
    ];
    for (method, url, body) in steps {
        let answer = http
            .request(method, &url)
            .header("X-Auth-Token", &admin_token)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 201, "{url}");
    }
}

fn config(emu: &RunningEmulator, credentials: Credentials) -> ClientConfig {
    let mut config = ClientConfig::new(
        emu.base_url(),
        Project::Name(emu.config().project_name.clone()),
        credentials,
    );
    config.iam_endpoint = Some(emu.base_url());
    config.region = emu.config().region.clone();
    config.allow_http = true;
    config
}

fn web_identity(source: Arc<dyn SubjectTokenSource>, idp: &str) -> Credentials {
    Credentials::WebIdentity {
        identity_provider_id: idp.into(),
        token_source: source,
    }
}

fn minting(issuer: &Arc<Issuer>, audience: &str, sub: &str, expires_in: i64) -> Arc<Minting> {
    Arc::new(Minting {
        issuer: issuer.clone(),
        audience: audience.into(),
        sub: sub.into(),
        expires_in,
        reads: AtomicUsize::new(0),
    })
}

fn calls(emu: &RunningEmulator, operation: &str) -> usize {
    emu.admin()
        .calls(0)
        .iter()
        .filter(|c| c.operation == operation)
        .count()
}

fn refused_kms_calls(emu: &RunningEmulator) -> usize {
    emu.admin()
        .calls(0)
        .iter()
        .filter(|c| !c.operation.starts_with("iam:") && c.status >= 400)
        .count()
}

fn new_key(emu: &RunningEmulator) -> String {
    emu.admin()
        .create_key(NewKey {
            key_alias: "keyless".into(),
            ..NewKey::default()
        })
        .unwrap()
        .key_id
}

#[tokio::test]
async fn a_web_identity_token_is_exchanged_once_for_many_callers_and_refreshed_ahead_of_expiry() {
    let emu = emulator(Duration::from_secs(3)).await;
    let issuer = Arc::new(Issuer::new());
    register_identity_provider(&emu, &issuer).await;
    let key = new_key(&emu);
    let source = minting(&issuer, AUDIENCE, SUB, 3600);
    let kms = KmsClient::new(config(&emu, web_identity(source.clone(), IDP))).unwrap();

    // Twenty callers at once: one exchange, the project resolved from the scoped token.
    let results = futures_join(&kms, &key, 20).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert_eq!(calls(&emu, "iam:id-token"), 1, "one exchange for all");
    assert_eq!(kms.project_id().await.unwrap(), emu.config().project_id);

    // Nine seconds of calls with 3-second tokens: refreshed about every 2.4 s, never refused.
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(9) {
        kms.list_all_grants(&key, 100).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let exchanges = calls(&emu, "iam:id-token");
    assert!(
        (3..=8).contains(&exchanges),
        "about 9 / (3 - 0.6) exchanges, got {exchanges}"
    );
    assert_eq!(
        refused_kms_calls(&emu),
        0,
        "no KMS call saw an expired token"
    );
    assert_eq!(
        source.reads.load(Ordering::SeqCst),
        exchanges,
        "the token is read at every exchange"
    );
    let status = kms.credential_status();
    assert_eq!(
        (status.exchanges as usize, status.failed_exchanges),
        (exchanges, 0)
    );
    assert!(status.expires_at.is_some());
}

async fn futures_join(kms: &KmsClient, key: &str, n: usize) -> Vec<Result<(), String>> {
    let mut tasks = Vec::new();
    for _ in 0..n {
        let kms = kms.clone();
        let key = key.to_owned();
        tasks.push(tokio::spawn(async move {
            kms.list_all_grants(&key, 100)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }));
    }
    let mut results = Vec::new();
    for task in tasks {
        results.push(task.await.unwrap());
    }
    results
}

#[tokio::test]
async fn temporary_keys_from_the_federated_token_sign_kms_calls() {
    let emu = emulator(Duration::from_secs(3600)).await;
    let issuer = Arc::new(Issuer::new());
    register_identity_provider(&emu, &issuer).await;
    let key = new_key(&emu);
    let mut config = config(
        &emu,
        web_identity(minting(&issuer, AUDIENCE, SUB, 3600), IDP),
    );
    config.temporary_access_key = Some(Duration::from_secs(900));
    let kms = KmsClient::new(config).unwrap();
    kms.list_all_grants(&key, 100).await.unwrap();
    kms.list_all_grants(&key, 100).await.unwrap();
    assert_eq!(calls(&emu, "iam:id-token"), 1);
    assert_eq!(calls(&emu, "iam:securitytokens"), 1);
    let expires = kms.credential_status().expires_at.unwrap();
    let left = expires
        .duration_since(std::time::SystemTime::now())
        .unwrap();
    assert!(
        left > Duration::from_secs(800) && left <= Duration::from_secs(900),
        "{left:?}"
    );
}

#[tokio::test]
async fn a_refresh_that_fails_keeps_the_credentials_while_they_are_valid_then_names_the_cause() {
    let emu = emulator(Duration::from_secs(10)).await;
    let issuer = Arc::new(Issuer::new());
    register_identity_provider(&emu, &issuer).await;
    let key = new_key(&emu);
    // The cluster's signing key is rotated and the provider's signing_key not updated: from the
    // switch on, every exchange is refused.
    let source = Arc::new(Switching {
        good: minting(&issuer, AUDIENCE, SUB, 3600),
        bad: minting(&Arc::new(Issuer::new()), AUDIENCE, SUB, 3600),
        switched: AtomicBool::new(false),
    });
    let kms = KmsClient::new(config(&emu, web_identity(source.clone(), IDP))).unwrap();
    kms.list_all_grants(&key, 100).await.unwrap();
    source.switched.store(true, Ordering::SeqCst);
    // Past the refresh point (8 s), before the end of use (9.5 s): calls go on with the old token.
    tokio::time::sleep(Duration::from_millis(8300)).await;
    kms.list_all_grants(&key, 100).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    kms.list_all_grants(&key, 100).await.unwrap();
    let status = kms.credential_status();
    assert!(status.failed_exchanges >= 1, "{status:?}");
    assert_eq!(
        status.last_failure.as_ref().unwrap().reason,
        ErrorReason::IdentityTokenRefused
    );
    // Once the token is no longer usable, calls fail, naming why.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let err = kms.list_all_grants(&key, 100).await.unwrap_err();
    assert_eq!(err.reason, ErrorReason::IdentityTokenRefused, "{err}");
    assert_eq!(
        refused_kms_calls(&emu),
        0,
        "no expired token was ever sent to KMS"
    );
}

/// Gives the good source's tokens until switched, then the bad one's.
struct Switching {
    good: Arc<Minting>,
    bad: Arc<Minting>,
    switched: AtomicBool,
}

impl SubjectTokenSource for Switching {
    fn subject_token(
        &self,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<SecretString, String>> + Send + '_>> {
        if self.switched.load(Ordering::SeqCst) {
            self.bad.subject_token()
        } else {
            self.good.subject_token()
        }
    }
    fn describe(&self) -> String {
        "a switching source".into()
    }
}

#[tokio::test]
async fn each_refusal_of_the_exchange_is_reported_with_its_cause() {
    let emu = emulator(Duration::from_secs(3600)).await;
    let issuer = Arc::new(Issuer::new());
    register_identity_provider(&emu, &issuer).await;
    let key = new_key(&emu);
    let refusal = |source: Arc<dyn SubjectTokenSource>, idp: &str| {
        let kms = KmsClient::new(config(&emu, web_identity(source, idp))).unwrap();
        let key = key.clone();
        async move { kms.list_all_grants(&key, 100).await.unwrap_err() }
    };
    let unknown = refusal(minting(&issuer, AUDIENCE, SUB, 3600), "no_such_idp").await;
    assert_eq!(
        unknown.reason,
        ErrorReason::IdentityProviderNotFound,
        "{unknown}"
    );
    assert!(unknown.message.contains("no_such_idp"), "{unknown}");

    let audience = refusal(minting(&issuer, "sts.amazonaws.com", SUB, 3600), IDP).await;
    assert_eq!(
        audience.reason,
        ErrorReason::IdentityTokenRefused,
        "{audience}"
    );
    assert!(
        audience.message.contains("sts.amazonaws.com") && audience.message.contains("client_id"),
        "{audience}"
    );

    let unmapped = refusal(
        minting(
            &issuer,
            AUDIENCE,
            "system:serviceaccount:default:intruder",
            3600,
        ),
        IDP,
    )
    .await;
    assert_eq!(
        unmapped.reason,
        ErrorReason::IdentityTokenRefused,
        "{unmapped}"
    );
    assert!(
        unmapped
            .message
            .contains("system:serviceaccount:default:intruder")
            && unmapped.message.contains("mapping"),
        "{unmapped}"
    );

    let before = calls(&emu, "iam:id-token");
    let expired = refusal(minting(&issuer, AUDIENCE, SUB, -60), IDP).await;
    assert_eq!(
        expired.reason,
        ErrorReason::IdentityTokenExpired,
        "{expired}"
    );
    assert_eq!(
        calls(&emu, "iam:id-token"),
        before,
        "an expired token is not sent"
    );

    let missing = refusal(Arc::new(Unavailable), IDP).await;
    assert_eq!(
        missing.reason,
        ErrorReason::IdentityTokenUnavailable,
        "{missing}"
    );
    assert!(
        missing.message.contains("/var/run/secrets/kmsgrant/token"),
        "{missing}"
    );
    assert_eq!(
        refused_kms_calls(&emu),
        0,
        "no KMS call went out without credentials"
    );
}

#[tokio::test]
async fn a_user_of_another_account_assumes_an_agency_and_works_on_the_delegating_accounts_keys() {
    let emu = emulator(Duration::from_secs(3600)).await;
    let admin = emu.admin();
    let home = admin.add_domain("tenant-b", None).unwrap();
    admin
        .add_user_in_domain(
            &home.id,
            NewUser {
                name: "operator-b".into(),
                password: "b-password".into(),
                user_id: None,
                access_key: Some("TENANTBACCESSKEY0000".into()),
                secret_key: Some("tenant-b-secret".into()),
            },
        )
        .unwrap();
    admin
        .add_agency(NewAgency {
            name: "kms-grants".into(),
            domain_id: None,
            trust_domain_id: None,
            trust_domain_name: Some("tenant-b".into()),
        })
        .unwrap();
    let key = new_key(&emu);
    let password = Credentials::Password {
        username: "operator-b".into(),
        password: SecretString::from("b-password"),
        domain_name: "tenant-b".into(),
    };
    let delegating = Domain::Name(emu.config().domain_name.clone());
    for temporary in [None, Some(Duration::from_secs(3600))] {
        let mut config = config(&emu, password.clone());
        config.agency = Some(Agency {
            name: "kms-grants".into(),
            domain: delegating.clone(),
        });
        config.temporary_access_key = temporary;
        let kms = KmsClient::new(config).unwrap();
        kms.list_all_grants(&key, 100).await.unwrap();
        assert_eq!(kms.project_id().await.unwrap(), emu.config().project_id);
    }
    // The same with tenant-b's AK/SK: temporary keys of the agency, asked for with a signature.
    let mut signed = config(
        &emu,
        Credentials::AccessKey {
            keys: kmsgrant_kms::signer::AccessKeyPair::new(
                "TENANTBACCESSKEY0000",
                "tenant-b-secret",
            ),
            security_token: None,
        },
    );
    signed.agency = Some(Agency {
        name: "kms-grants".into(),
        domain: delegating.clone(),
    });
    signed.temporary_access_key = Some(Duration::from_secs(900));
    let kms = KmsClient::new(signed).unwrap();
    kms.list_all_grants(&key, 100).await.unwrap();
    assert_eq!(
        calls(&emu, "iam:securitytokens"),
        2,
        "one per agency client with temporary keys"
    );

    // Keyless in tenant-b: its own identity provider, its federated user assuming the agency.
    let issuer = Arc::new(Issuer::new());
    register_identity_provider_as(&emu, &issuer, ("operator-b", "b-password", "tenant-b")).await;
    for temporary in [None, Some(Duration::from_secs(900))] {
        let mut keyless = config(
            &emu,
            web_identity(minting(&issuer, AUDIENCE, SUB, 3600), IDP),
        );
        keyless.agency = Some(Agency {
            name: "kms-grants".into(),
            domain: delegating.clone(),
        });
        keyless.temporary_access_key = temporary;
        let kms = KmsClient::new(keyless).unwrap();
        kms.list_all_grants(&key, 100).await.unwrap();
    }
    let agency_id = emu.admin().agencies()[0].id.clone();
    let listed_by: Vec<Option<String>> = emu
        .admin()
        .calls(0)
        .into_iter()
        .filter(|c| c.operation == "list-grants")
        .map(|c| c.caller)
        .collect();
    assert!(
        listed_by
            .iter()
            .all(|caller| caller.as_deref() == Some(agency_id.as_str())),
        "KMS saw the agency every time: {listed_by:?}"
    );

    // An agency that does not trust the caller's account.
    let mut config = config(&emu, password);
    config.agency = Some(Agency {
        name: "no-such-agency".into(),
        domain: delegating,
    });
    let err = KmsClient::new(config)
        .unwrap()
        .list_all_grants(&key, 100)
        .await
        .unwrap_err();
    assert_eq!(err.reason, ErrorReason::AgencyNotAssumable, "{err}");
    assert!(err.message.contains("no-such-agency"), "{err}");
}
