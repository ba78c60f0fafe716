//! Keyless auth end to end: the control plane's own ServiceAccount issuer registered as an
//! OpenID Connect identity provider in the emulator's IAM (its JWKS from `/openid/v1/jwks`), the
//! operator exchanging ServiceAccount tokens (TokenRequest, or a token file as a projected volume
//! gives) for IAM tokens. No Secret holds a cloud credential.
//!
//! The refresh run lasts `KMSGRANT_KEYLESS_MINUTES` (default 1.5) with IAM tokens living
//! `KMSGRANT_KEYLESS_TOKEN_SECONDS` (default 20); the long run of the issue is
//! `KMSGRANT_KEYLESS_MINUTES=10 KMSGRANT_KEYLESS_TOKEN_SECONDS=60 scripts/test --test keyless refresh`.

mod support;

use std::time::{Duration, Instant};

use kms_emulator::{EmulatorConfig, NewAgency, NewUser, RunningEmulator};
use serde_json::{Value, json};
use support::{Env, eventually, free_port, kubectl, kubectl_ok, metrics, series};

const IDP: &str = "cluster_workloads";
const CLIENT_ID: &str = "kmsgrant-e2e";
const OPERATOR_SA: &str = "kms-keyless";

fn subject(namespace: &str, account: &str) -> String {
    format!("system:serviceaccount:{namespace}:{account}")
}

async fn register_cluster_issuer(emulator: &RunningEmulator, subjects: &[String]) {
    support::register_cluster_issuer(emulator, IDP, CLIENT_ID, subjects).await;
}

async fn set_identity_provider_enabled(emulator: &RunningEmulator, enabled: bool) {
    support::iam_admin(
        emulator,
        reqwest::Method::PATCH,
        &format!("/v3/OS-FEDERATION/identity_providers/{IDP}"),
        json!({"identity_provider": {"enabled": enabled}}),
    )
    .await;
}

fn service_account(namespace: &str, name: &str) {
    kubectl_ok(&["-n", namespace, "create", "serviceaccount", name], None);
}

fn web_identity(namespace: &str, account: &str, audience: &str) -> Value {
    json!({"type": "WebIdentity", "webIdentity": {"identityProviderId": IDP,
        "serviceAccountRef": {"namespace": namespace, "name": account, "audiences": [audience]}}})
}

/// A provider config of this test, named `name`, with `spec` merged in.
fn provider_named(env: &Env, name: &str, spec: Value) -> Value {
    let mut config = env.provider_config(spec);
    config["metadata"]["name"] = json!(name);
    config
}

fn config_condition(name: &str) -> Option<(String, String, String)> {
    let out = kubectl(&["get", "kmsproviderconfig", name, "-o", "json"], None);
    let config: Value = serde_json::from_slice(&out.stdout).ok()?;
    config["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Ready")
        .map(|c| {
            (
                c["status"].as_str().unwrap_or_default().to_owned(),
                c["reason"].as_str().unwrap_or_default().to_owned(),
                c["message"].as_str().unwrap_or_default().to_owned(),
            )
        })
}

async fn wait_config_ready(name: &str) {
    eventually(
        &format!("{name} Ready"),
        Duration::from_secs(60),
        async || config_condition(name).is_some_and(|(status, ..)| status == "True"),
    )
    .await;
}

fn no_secrets(namespace: &str) -> bool {
    kubectl_ok(&["-n", namespace, "get", "secrets", "-o", "name"], None)
        .trim()
        .is_empty()
}

/// KMS calls (not IAM) refused for their credentials.
fn refused_kms_calls(emulator: &RunningEmulator) -> Vec<String> {
    emulator
        .admin()
        .calls(0)
        .into_iter()
        .filter(|c| !c.operation.starts_with("iam:") && matches!(c.status, 401 | 403))
        .map(|c| format!("{} {} {:?}", c.operation, c.status, c.error_code))
        .collect()
}

fn exchanges(emulator: &RunningEmulator) -> (usize, usize) {
    let calls = emulator.admin().calls(0);
    let ok = calls
        .iter()
        .filter(|c| c.operation == "iam:id-token" && c.status == 201)
        .count();
    let failed = calls
        .iter()
        .filter(|c| c.operation == "iam:id-token" && c.status != 201)
        .count();
    (ok, failed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_grant_becomes_ready_with_no_secret_in_the_cluster_from_a_token_request_or_a_token_file()
{
    let mut env = Env::new("keyless-ready", EmulatorConfig::for_tests(), "30s").await;
    kubectl_ok(
        &["-n", &env.namespace, "delete", "secret", "kms-credentials"],
        None,
    );
    service_account(&env.namespace, OPERATOR_SA);
    register_cluster_issuer(&env.emulator, &[subject(&env.namespace, OPERATOR_SA)]).await;
    env.apply(
        &env.provider_config(json!({"auth": web_identity(&env.namespace, OPERATOR_SA, CLIENT_ID)})),
    );
    // A projected token as the kubelet writes it, for the second config.
    let token_dir = tempfile::tempdir().unwrap();
    let token = kubectl_ok(
        &[
            "-n",
            &env.namespace,
            "create",
            "token",
            OPERATOR_SA,
            "--audience",
            CLIENT_ID,
            "--duration",
            "10m",
        ],
        None,
    );
    std::fs::write(token_dir.path().join("token"), token.trim()).unwrap();
    let from_file = format!("{}-file", env.provider);
    env.apply(&provider_named(
        &env,
        &from_file,
        json!({"auth": {"type": "WebIdentity", "webIdentity": {"identityProviderId": IDP,
            "tokenFile": token_dir.path().join("token").to_str().unwrap()}}}),
    ));
    env.start_operator_with(&[
        "--web-identity-token-dir",
        token_dir.path().to_str().unwrap(),
    ]);
    let key = support::federated_key(&env, "keyless", IDP);
    env.apply(&env.grant("by-token-request", &key, json!({})));
    env.apply(&env.grant(
        "by-token-file",
        &key,
        json!({"providerConfigRef": {"name": from_file}}),
    ));
    env.wait_for("by-token-request", "condition=Ready", 90);
    env.wait_for("by-token-file", "condition=Ready", 90);
    wait_config_ready(&env.provider).await;
    wait_config_ready(&from_file).await;
    assert!(no_secrets(&env.namespace), "no Secret holds a credential");
    // KMS saw the federated user, never the emulator's IAM user.
    let creates: Vec<_> = env
        .emulator
        .admin()
        .calls(0)
        .into_iter()
        .filter(|c| c.operation == "create-grant" && c.status == 200)
        .collect();
    assert_eq!(creates.len(), 2);
    for call in &creates {
        assert_ne!(
            call.caller.as_deref(),
            Some(env.emulator.config().user_id.as_str())
        );
    }
    assert!(refused_kms_calls(&env.emulator).is_empty());
    // Deleting revokes, keyless too (the keys are the federated user's: only a key's creator
    // may revoke grants on it).
    kubectl_ok(
        &[
            "-n",
            &env.namespace,
            "delete",
            "kmsgrant",
            "by-token-request",
            "by-token-file",
            "--timeout=60s",
        ],
        None,
    );
    assert_eq!(env.emulator.admin().grant_count(&key), Some(0));
    kubectl_ok(
        &["delete", "kmsproviderconfig", &from_file, "--wait=false"],
        None,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_refused_exchange_is_a_condition_on_the_provider_config_naming_its_cause() {
    let mut env = Env::new("keyless-refused", EmulatorConfig::for_tests(), "30s").await;
    let ns = env.namespace.clone();
    service_account(&ns, OPERATOR_SA);
    service_account(&ns, "intruder");
    register_cluster_issuer(&env.emulator, &[subject(&ns, OPERATOR_SA)]).await;
    let token_dir = tempfile::tempdir().unwrap();
    // A token whose exp has passed (the API server mints none that short): caught before it is sent.
    let expired_claims = base64_url(
        &json!({"iss": "https://kubernetes.default.svc.cluster.local",
        "aud": [CLIENT_ID], "sub": subject(&ns, OPERATOR_SA), "exp": 1_600_000_000})
        .to_string(),
    );
    std::fs::write(
        token_dir.path().join("expired"),
        format!("{}.{expired_claims}.c2ln", base64_url(r#"{"alg":"RS256"}"#)),
    )
    .unwrap();
    let admin = env.emulator.admin();
    add_tenant_b_operator(&admin);
    env.apply(&json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "tenant-b-password", "namespace": ns},
        "stringData": {"username": "operator-b", "password": "b-password", "domainName": "tenant-b"}}));
    let token_file = |name: &str| token_dir.path().join(name).to_str().unwrap().to_owned();
    let cases: Vec<(&str, Value, &str, String)> = vec![
        (
            "unknown-idp",
            json!({"type": "WebIdentity", "webIdentity": {"identityProviderId": "no_such_provider",
                "serviceAccountRef": {"namespace": ns, "name": OPERATOR_SA, "audiences": [CLIENT_ID]}}}),
            "IdentityProviderNotFound",
            "no_such_provider".into(),
        ),
        (
            "wrong-audience",
            web_identity(&ns, OPERATOR_SA, "sts.example.com"),
            "IdentityTokenRefused",
            "sts.example.com".into(),
        ),
        (
            "unmapped-subject",
            web_identity(&ns, "intruder", CLIENT_ID),
            "IdentityTokenRefused",
            subject(&ns, "intruder"),
        ),
        (
            "expired-token",
            json!({"type": "WebIdentity", "webIdentity": {"identityProviderId": IDP, "tokenFile": token_file("expired")}}),
            "IdentityTokenExpired",
            "expired".into(),
        ),
        (
            "missing-token-file",
            json!({"type": "WebIdentity", "webIdentity": {"identityProviderId": IDP, "tokenFile": token_file("absent")}}),
            "IdentityTokenUnavailable",
            "absent".into(),
        ),
        (
            "file-elsewhere",
            json!({"type": "WebIdentity", "webIdentity": {"identityProviderId": IDP,
                "tokenFile": "/var/run/secrets/kubernetes.io/serviceaccount/token"}}),
            "TokenFileNotAllowed",
            "--web-identity-token-dir".into(),
        ),
        (
            "account-elsewhere",
            web_identity("kube-system", "default", CLIENT_ID),
            "ServiceAccountNamespaceNotAllowed",
            "kube-system".into(),
        ),
        (
            "agency-refused",
            json!({"type": "Password", "secretRef": {"namespace": ns, "name": "tenant-b-password"},
                "agency": {"name": "no-such-agency", "domainName": env.emulator.config().domain_name}}),
            "AgencyNotAssumable",
            "no-such-agency".into(),
        ),
    ];
    for (suffix, auth, ..) in &cases {
        env.apply(&provider_named(
            &env,
            &format!("{ns}-{suffix}"),
            json!({"auth": auth}),
        ));
    }
    env.start_operator_with(&[
        "--web-identity-token-dir",
        token_dir.path().to_str().unwrap(),
    ]);
    for (suffix, _, reason, named) in &cases {
        let name = format!("{ns}-{suffix}");
        eventually(
            &format!("{name}: {reason}"),
            Duration::from_secs(60),
            async || {
                config_condition(&name)
                    .is_some_and(|(status, got, _)| status == "False" && got == *reason)
            },
        )
        .await;
        let (_, _, message) = config_condition(&name).unwrap();
        assert!(message.contains(named.as_str()), "{name}: {message}");
    }
    assert!(
        refused_kms_calls(&env.emulator).is_empty(),
        "nothing reached KMS"
    );
    for (suffix, ..) in &cases {
        kubectl_ok(
            &[
                "delete",
                "kmsproviderconfig",
                &format!("{ns}-{suffix}"),
                "--wait=false",
            ],
            None,
        );
    }
}

/// A second account, tenant-b, with an IAM user operator-b (password b-password).
fn add_tenant_b_operator(admin: &kms_emulator::EmulatorAdmin) {
    let home = admin.add_domain("tenant-b", None).unwrap();
    admin
        .add_user_in_domain(
            &home.id,
            NewUser {
                name: "operator-b".into(),
                password: "b-password".into(),
                user_id: None,
                access_key: None,
                secret_key: None,
            },
        )
        .unwrap();
}

fn base64_url(text: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn switching_a_provider_config_from_access_key_to_web_identity_creates_and_revokes_nothing() {
    let mut env = Env::new("keyless-switch", EmulatorConfig::for_tests(), "2s").await;
    service_account(&env.namespace, OPERATOR_SA);
    register_cluster_issuer(&env.emulator, &[subject(&env.namespace, OPERATOR_SA)]).await;
    env.start_operator();
    let key = env.new_key("switch");
    env.apply(&env.grant("steady", &key, json!({})));
    env.wait_for("steady", "condition=Ready", 60);
    let grant_id = env.get("steady")["status"]["grantId"].clone();
    let since = support::last_seq(&env);
    env.apply(
        &env.provider_config(json!({"auth": web_identity(&env.namespace, OPERATOR_SA, CLIENT_ID)})),
    );
    kubectl_ok(
        &["-n", &env.namespace, "delete", "secret", "kms-credentials"],
        None,
    );
    // Several resyncs with the new credentials.
    eventually(
        "KMS calls made keyless",
        Duration::from_secs(60),
        async || {
            env.emulator
                .admin()
                .calls(since)
                .iter()
                .filter(|c| c.operation == "list-grants" && c.status == 200)
                .filter(|c| c.caller.as_deref() != Some(env.emulator.config().user_id.as_str()))
                .count()
                >= 3
        },
    )
    .await;
    wait_config_ready(&env.provider).await;
    let writes: Vec<String> = env
        .emulator
        .admin()
        .calls(since)
        .into_iter()
        .filter(|c| {
            matches!(
                c.operation.as_str(),
                "create-grant" | "revoke-grant" | "retire-grant"
            )
        })
        .map(|c| format!("{} {}", c.operation, c.status))
        .collect();
    assert!(writes.is_empty(), "the switch wrote to KMS: {writes:?}");
    assert_eq!(env.get("steady")["status"]["grantId"], grant_id);
    env.wait_for("steady", "condition=Ready", 5);
    assert_eq!(env.emulator.admin().grant_count(&key), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agency_of_the_delegating_account_creates_the_grant_there() {
    let mut env = Env::new("keyless-agency", EmulatorConfig::for_tests(), "30s").await;
    let admin = env.emulator.admin();
    // The operator's own account is tenant-b; the keys are the emulator's account's, which made
    // an agency trusting tenant-b.
    add_tenant_b_operator(&admin);
    let agency = admin
        .add_agency(NewAgency {
            name: "kms-grants".into(),
            domain_id: None,
            trust_domain_id: None,
            trust_domain_name: Some("tenant-b".into()),
        })
        .unwrap();
    env.apply(&json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "kms-credentials", "namespace": env.namespace},
        "stringData": {"username": "operator-b", "password": "b-password", "domainName": "tenant-b"}}));
    env.apply(&env.provider_config(json!({
        "projectId": null,
        "projectName": env.emulator.config().project_name,
        "auth": {"type": "Password", "secretRef": {"namespace": env.namespace, "name": "kms-credentials"},
            "agency": {"name": "kms-grants", "domainName": env.emulator.config().domain_name},
            "temporaryAccessKey": {"durationSeconds": 900}}})));
    env.start_operator();
    let key = env.new_key("delegated");
    env.apply(&env.grant("delegated", &key, json!({})));
    env.wait_for("delegated", "condition=Ready", 60);
    assert_eq!(env.emulator.admin().grant_count(&key), Some(1));
    let create = env
        .emulator
        .admin()
        .calls(0)
        .into_iter()
        .find(|c| c.operation == "create-grant" && c.status == 200)
        .unwrap();
    assert_eq!(
        create.caller.as_deref(),
        Some(agency.id.as_str()),
        "KMS saw the agency"
    );
    let config: Value = serde_json::from_str(&kubectl_ok(
        &["get", "kmsproviderconfig", &env.provider, "-o", "json"],
        None,
    ))
    .unwrap();
    assert_eq!(
        config["status"]["projectId"],
        env.emulator.config().project_id.as_str()
    );
}

/// Short-lived IAM tokens for a while: refreshed ahead of expiry, about once per lifetime minus
/// margin, no KMS call ever refused; then a refresh that fails while the token is still valid
/// changes nothing anyone can see.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refresh_keeps_kms_calls_valid_with_short_tokens_and_a_failed_refresh_changes_nothing_visible()
 {
    let minutes: f64 = std::env::var("KMSGRANT_KEYLESS_MINUTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1.5);
    let lifetime: u64 = std::env::var("KMSGRANT_KEYLESS_TOKEN_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let emulator = EmulatorConfig {
        federation_token_ttl: Duration::from_secs(lifetime),
        ..EmulatorConfig::for_tests()
    };
    let mut env = Env::new("keyless-refresh", emulator, "2s").await;
    kubectl_ok(
        &["-n", &env.namespace, "delete", "secret", "kms-credentials"],
        None,
    );
    service_account(&env.namespace, OPERATOR_SA);
    register_cluster_issuer(&env.emulator, &[subject(&env.namespace, OPERATOR_SA)]).await;
    env.apply(
        &env.provider_config(json!({"auth": web_identity(&env.namespace, OPERATOR_SA, CLIENT_ID)})),
    );
    let port = free_port();
    env.start_operator_with(&[
        "--provider-check-interval",
        "5s",
        "--admin-address",
        &format!("127.0.0.1:{port}"),
    ]);
    let keys: Vec<String> = (0..3)
        .map(|i| env.new_key(&format!("refresh-{i}")))
        .collect();
    for (i, key) in keys.iter().enumerate() {
        env.apply(&env.grant(&format!("g{i}"), key, json!({})));
    }
    for i in 0..keys.len() {
        env.wait_for(&format!("g{i}"), "condition=Ready", 60);
    }
    let (first, _) = exchanges(&env.emulator);
    let started = Instant::now();
    let run = Duration::from_secs_f64(minutes * 60.0);
    while started.elapsed() < run {
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(
            refused_kms_calls(&env.emulator).is_empty(),
            "{:?}",
            refused_kms_calls(&env.emulator)
        );
    }
    let (ok, failed) = exchanges(&env.emulator);
    let kms_calls = env
        .emulator
        .admin()
        .calls(0)
        .iter()
        .filter(|c| !c.operation.starts_with("iam:"))
        .count();
    let margin = lifetime as f64 / 5.0;
    let expected = run.as_secs_f64() / (lifetime as f64 - margin);
    let during = (ok - first) as f64;
    println!(
        "keyless refresh: {:.1} min, token lifetime {lifetime} s, margin {margin:.0} s: {during} exchanges (expected about {expected:.1}), {failed} failed, {kms_calls} KMS calls, 0 refused",
        minutes
    );
    assert_eq!(failed, 0);
    assert!(
        during >= expected * 0.6 && during <= expected * 1.6 + 1.0,
        "{during} exchanges in {minutes} min, expected about {expected:.1}"
    );
    let text = metrics(port).await;
    let expiry = series(
        &text,
        &format!(
            "kmsgrant_credentials_expiry_timestamp_seconds{{provider=\"{}\"}}",
            env.provider
        ),
    )
    .expect("the expiry metric");
    let now = jiff::Timestamp::now().as_second() as f64;
    assert!(
        expiry > now && expiry <= now + lifetime as f64 + 1.0,
        "{expiry} vs {now}"
    );

    // A refresh that fails while the token is valid: the provider is disabled until IAM has
    // refused one exchange, then enabled again.
    let config_version = |name: &str| {
        kubectl_ok(
            &[
                "get",
                "kmsproviderconfig",
                name,
                "-o",
                "jsonpath={.metadata.resourceVersion}",
            ],
            None,
        )
    };
    let grant_versions = |env: &Env| -> Vec<String> {
        (0..3)
            .map(|i| env.get(&format!("g{i}"))["metadata"]["resourceVersion"].to_string())
            .collect()
    };
    let (before_config, before_grants) = (config_version(&env.provider), grant_versions(&env));
    set_identity_provider_enabled(&env.emulator, false).await;
    eventually(
        "a refused refresh",
        Duration::from_secs(lifetime + 10),
        async || exchanges(&env.emulator).1 > 0,
    )
    .await;
    set_identity_provider_enabled(&env.emulator, true).await;
    let (ok_before, _) = exchanges(&env.emulator);
    eventually(
        "a refresh that works again",
        Duration::from_secs(lifetime),
        async || exchanges(&env.emulator).0 > ok_before,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        refused_kms_calls(&env.emulator).is_empty(),
        "{:?}",
        refused_kms_calls(&env.emulator)
    );
    assert_eq!(
        config_version(&env.provider),
        before_config,
        "the provider config's status did not move"
    );
    assert_eq!(
        grant_versions(&env),
        before_grants,
        "no grant's status moved"
    );
    let text = metrics(port).await;
    assert!(
        series(
            &text,
            "kmsgrant_credential_exchanges_total{outcome=\"IdentityTokenRefused\"}"
        )
        .unwrap_or(0.0)
            >= 1.0,
        "the failed refresh is counted"
    );
}
