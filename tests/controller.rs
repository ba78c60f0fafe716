//! The operator end to end: a real kube-apiserver, the CRDs, `kmsgrant-operator run` as a process,
//! and the emulator as KMS.

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use kms_emulator::{EmulatorConfig, KeyState};
use serde_json::{Value, json};
use support::{Env, eventually, kubectl, kubectl_ok};

const SEED_KEY: &str = "bb6a3d22-dc93-47ac-b5bd-88df7ad35f1e";
const SEED_PRINCIPAL: &str = "13gg44z4g2sglzk0egw0u726zoyzvrs8";

fn grant_id(object: &Value) -> String {
    object["status"]["grantId"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn seed_grant_becomes_ready_with_a_matching_grant_on_kms() {
    let mut env = Env::new("ready", EmulatorConfig::for_tests(), "5s").await;
    let key = kms_emulator::NewKey {
        key_alias: "seed".into(),
        key_id: Some(SEED_KEY.into()),
        ..Default::default()
    };
    env.emulator.admin().create_key(key).unwrap();
    env.start_operator();
    env.apply(&env.grant(
        "app-encrypt",
        SEED_KEY,
        json!({"retiringPrincipal": SEED_PRINCIPAL}),
    ));
    env.wait_for("app-encrypt", "condition=Ready", 60);

    let object = env.get("app-encrypt");
    let id = grant_id(&object);
    assert!(
        id.len() == 64 && id.chars().all(|c| c.is_ascii_hexdigit()),
        "grantId {id:?}"
    );
    assert_eq!(object["status"]["keyId"], SEED_KEY);
    let identity = format!("k8s/{}/{}/app-encrypt", support::CLUSTER, env.namespace);
    assert_eq!(object["status"]["grantName"], identity.as_str());
    assert!(
        object["metadata"]["finalizers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f == "kmsgrant.io/grant")
    );

    let dump = env.emulator.admin().dump();
    let grant = dump
        .grants
        .iter()
        .find(|g| g.grant_id == id)
        .expect("the grant exists on KMS");
    assert_eq!(grant.key_id, SEED_KEY);
    assert_eq!(grant.grantee_principal, SEED_PRINCIPAL);
    assert_eq!(grant.grantee_principal_type, "user");
    assert_eq!(grant.name.as_deref(), Some(identity.as_str()));
    assert_eq!(grant.retiring_principal.as_deref(), Some(SEED_PRINCIPAL));
    let operations: BTreeSet<&str> = grant.operations.iter().map(String::as_str).collect();
    assert_eq!(
        operations,
        BTreeSet::from(["describe-key", "create-datakey", "encrypt-datakey"])
    );

    // The printer columns are filled.
    let table = kubectl_ok(&["-n", &env.namespace, "get", "kmsg", "app-encrypt"], None);
    let row = table.lines().nth(1).unwrap();
    for value in [SEED_KEY, SEED_PRINCIPAL, "True", "GrantReady", id.as_str()] {
        assert!(row.contains(value), "{value} missing from: {row}");
    }
    let events = env.events();
    assert!(
        events.iter().any(|e| e["reason"] == "GrantCreated"),
        "no GrantCreated event"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deletion_revokes_retires_or_orphans_the_grant_as_the_policy_says() {
    let mut env = Env::new("delete", EmulatorConfig::for_tests(), "5s").await;
    let key = env.new_key("deletion");
    env.start_operator();
    for policy in ["Revoke", "Retire", "Orphan"] {
        env.apply(&env.grant(
            &policy.to_lowercase(),
            &key,
            json!({"deletionPolicy": policy}),
        ));
    }
    let mut ids = Vec::new();
    for policy in ["revoke", "retire", "orphan"] {
        env.wait_for(policy, "condition=Ready", 60);
        ids.push(grant_id(&env.get(policy)));
    }
    let calls_before = env
        .emulator
        .admin()
        .calls(0)
        .last()
        .map(|c| c.seq)
        .unwrap_or(0);
    for policy in ["revoke", "retire", "orphan"] {
        kubectl_ok(
            &[
                "-n",
                &env.namespace,
                "delete",
                "kmsgrant.kmsgrant.io",
                policy,
                "--timeout=60s",
            ],
            None,
        );
    }
    let remaining: BTreeSet<String> = env
        .emulator
        .admin()
        .dump()
        .grants
        .into_iter()
        .map(|g| g.grant_id)
        .collect();
    assert!(!remaining.contains(&ids[0]), "Revoke left the grant");
    assert!(!remaining.contains(&ids[1]), "Retire left the grant");
    assert!(remaining.contains(&ids[2]), "Orphan removed the grant");
    let calls = env.emulator.admin().calls(calls_before);
    let succeeded = |op: &str, id: &str| {
        calls
            .iter()
            .any(|c| c.operation == op && c.status == 200 && c.grant_id.as_deref() == Some(id))
    };
    assert!(
        succeeded("revoke-grant", &ids[0]),
        "no revoke-grant for the Revoke policy"
    );
    assert!(
        succeeded("retire-grant", &ids[1]),
        "no retire-grant for the Retire policy"
    );
    assert!(
        !calls
            .iter()
            .any(|c| c.grant_id.as_deref() == Some(ids[2].as_str())),
        "the orphaned grant was touched"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grant_revoked_out_of_band_is_recreated_within_the_resync_interval() {
    let mut env = Env::new("drift", EmulatorConfig::for_tests(), "3s").await;
    let key = env.new_key("drift");
    env.start_operator();
    env.apply(&env.grant("drifting", &key, json!({})));
    env.wait_for("drifting", "condition=Ready", 60);
    let first = grant_id(&env.get("drifting"));

    env.emulator
        .admin()
        .revoke_out_of_band(&first)
        .expect("the grant was there");
    let revoked_at = Instant::now();
    // One resync (3 s, ±10 %) to notice, plus the reconcile itself.
    eventually("a new grant", Duration::from_secs(8), async || {
        let id = grant_id(&env.get("drifting"));
        !id.is_empty() && id != first
    })
    .await;
    let took = revoked_at.elapsed();
    let second = grant_id(&env.get("drifting"));
    assert_eq!(env.emulator.admin().grant_count(&key), Some(1));
    assert!(
        env.emulator
            .admin()
            .dump()
            .grants
            .iter()
            .any(|g| g.grant_id == second)
    );
    env.wait_for("drifting", "condition=Ready", 10);
    let events = env.events();
    assert!(
        events
            .iter()
            .any(|e| e["reason"] == "GrantRecreated" && e["type"] == "Warning"),
        "no Warning GrantRecreated event"
    );
    eprintln!("drift repaired in {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn changed_operations_create_the_new_grant_before_revoking_the_old() {
    let mut env = Env::new("replace", EmulatorConfig::for_tests(), "5s").await;
    let key = env.new_key("replace");
    env.start_operator();
    env.apply(&env.grant("changing", &key, json!({})));
    env.wait_for("changing", "condition=Ready", 60);
    let old = grant_id(&env.get("changing"));
    let before = env
        .emulator
        .admin()
        .calls(0)
        .last()
        .map(|c| c.seq)
        .unwrap_or(0);

    env.apply(&env.grant(
        "changing",
        &key,
        json!({"operations": ["describe-key", "decrypt-datakey"]}),
    ));
    eventually("the replacement", Duration::from_secs(30), async || {
        let object = env.get("changing");
        let id = grant_id(&object);
        !id.is_empty()
            && id != old
            && object["status"]
                .get("supersededGrant")
                .is_none_or(Value::is_null)
    })
    .await;
    env.wait_for("changing", "jsonpath={.status.observedGeneration}=2", 30);
    env.wait_for("changing", "condition=Ready", 30);
    let new = grant_id(&env.get("changing"));

    let calls = env.emulator.admin().calls(before);
    let created = calls
        .iter()
        .find(|c| c.operation == "create-grant" && c.status == 200)
        .expect("a create");
    let revoked = calls
        .iter()
        .find(|c| {
            c.operation == "revoke-grant"
                && c.status == 200
                && c.grant_id.as_deref() == Some(old.as_str())
        })
        .expect("the old grant is revoked");
    assert!(
        created.seq < revoked.seq,
        "the old grant was revoked before the new one existed"
    );
    let grants = env.emulator.admin().dump().grants;
    assert_eq!(grants.len(), 1, "exactly one grant at the end: {grants:?}");
    assert_eq!(grants[0].grant_id, new);
    let operations: BTreeSet<&str> = grants[0].operations.iter().map(String::as_str).collect();
    assert_eq!(
        operations,
        BTreeSet::from(["describe-key", "decrypt-datakey"])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn identical_specs_get_two_distinct_grants() {
    let mut env = Env::new("twins", EmulatorConfig::for_tests(), "5s").await;
    let key = env.new_key("twins");
    env.start_operator();
    for name in ["twin-a", "twin-b"] {
        env.apply(&env.grant(name, &key, json!({})));
    }
    env.wait_for("twin-a", "condition=Ready", 60);
    env.wait_for("twin-b", "condition=Ready", 60);
    let (a, b) = (grant_id(&env.get("twin-a")), grant_id(&env.get("twin-b")));
    assert_ne!(a, b, "both objects own the same grant");
    assert_eq!(env.emulator.admin().grant_count(&key), Some(2));

    kubectl_ok(
        &[
            "-n",
            &env.namespace,
            "delete",
            "kmsgrant.kmsgrant.io",
            "twin-a",
            "--timeout=60s",
        ],
        None,
    );
    let remaining: Vec<String> = env
        .emulator
        .admin()
        .dump()
        .grants
        .into_iter()
        .map(|g| g.grant_id)
        .collect();
    assert_eq!(
        remaining,
        vec![b.clone()],
        "deleting one twin must leave the other's grant"
    );
    env.wait_for("twin-b", "condition=Ready", 10);
}

/// Each failure ends in its own reason, without a retry storm; the recoverable ones recover.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_failure_ends_with_its_own_reason_and_recoverable_ones_recover() {
    let mut env = Env::new(
        "stall",
        EmulatorConfig {
            grants_per_key: 3,
            ..EmulatorConfig::for_tests()
        },
        "5s",
    )
    .await;
    let key = env.new_key("usable");
    let other_key = env.new_key("other");
    let disabled_key = env.new_key("disabled");
    env.emulator
        .admin()
        .set_key_state(&disabled_key, KeyState::Disabled)
        .unwrap();
    let full_key = env.new_key("full");
    let default_key = env
        .emulator
        .admin()
        .dump()
        .keys
        .into_iter()
        .find(|k| k.default_key)
        .expect("a default key")
        .key_id;

    // Provider configs with guardrails, and one whose Secret is wrong.
    let restricted = |suffix: &str, extra: Value| {
        let mut config = env.provider_config(extra);
        config["metadata"]["name"] = json!(format!("{}-{suffix}", env.provider));
        config
    };
    env.apply(&restricted(
        "ns",
        json!({"namespaceSelector": {"matchLabels": {"kms-grants": "allowed"}}}),
    ));
    env.apply(&restricted("keys", json!({"allowedKeyIds": [other_key]})));
    env.apply(&restricted(
        "ops",
        json!({"allowedOperations": ["describe-key"]}),
    ));
    let bad_secret = json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "wrong-credentials", "namespace": env.namespace},
        "stringData": {"accessKey": env.emulator.config().access_key, "secretKey": "not-the-secret-key"}
    });
    env.apply(&bad_secret);
    env.apply(&restricted(
        "creds",
        json!({"auth": {"type": "AccessKey", "secretRef": {"namespace": env.namespace, "name": "wrong-credentials"}}}),
    ));
    env.start_operator();

    // Fill the small key to its quota (3) through the operator, then ask for a fourth.
    for i in 0..3 {
        env.apply(&env.grant(&format!("fill-{i}"), &full_key, json!({})));
    }
    for i in 0..3 {
        env.wait_for(&format!("fill-{i}"), "condition=Ready", 60);
    }
    let provider = |suffix: &str| json!({"name": format!("{}-{suffix}", env.provider)});
    let cases: Vec<(&str, Value, &str, &str)> = vec![
        (
            "key-not-found",
            env.grant(
                "key-not-found",
                "0d0466b0-e727-4d9c-b35d-f84bb474a37f",
                json!({}),
            ),
            "Stalled",
            "KeyNotFound",
        ),
        (
            "default-key",
            env.grant("default-key", &default_key, json!({})),
            "Stalled",
            "DefaultKeyNotGrantable",
        ),
        (
            "disabled-key",
            env.grant("disabled-key", &disabled_key, json!({})),
            "Reconciling",
            "KeyDisabled",
        ),
        (
            "quota",
            env.grant("quota", &full_key, json!({})),
            "Stalled",
            "GrantQuotaExceeded",
        ),
        (
            "namespace",
            env.grant(
                "namespace",
                &key,
                json!({"providerConfigRef": provider("ns")}),
            ),
            "Stalled",
            "NamespaceNotAllowed",
        ),
        (
            "key-allowed",
            env.grant(
                "key-allowed",
                &key,
                json!({"providerConfigRef": provider("keys")}),
            ),
            "Stalled",
            "KeyNotAllowed",
        ),
        (
            "op-allowed",
            env.grant(
                "op-allowed",
                &key,
                json!({"providerConfigRef": provider("ops")}),
            ),
            "Stalled",
            "OperationNotAllowed",
        ),
        (
            "no-provider",
            env.grant(
                "no-provider",
                &key,
                json!({"providerConfigRef": {"name": "does-not-exist"}}),
            ),
            "Stalled",
            "ProviderConfigNotFound",
        ),
        (
            "bad-creds",
            env.grant(
                "bad-creds",
                &key,
                json!({"providerConfigRef": provider("creds")}),
            ),
            "Reconciling",
            "ProviderConfigNotReady",
        ),
    ];
    for (_, manifest, _, _) in &cases {
        env.apply(manifest);
    }
    for (name, _, condition, reason) in &cases {
        env.wait_for(
            name,
            &format!("jsonpath={{.status.conditions[?(@.type==\"{condition}\")].status}}=True"),
            60,
        );
        env.wait_for(
            name,
            &format!("jsonpath={{.status.conditions[?(@.type==\"Ready\")].reason}}={reason}"),
            30,
        );
        let message = env.get(name)["status"]["conditions"][0]["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(!message.is_empty(), "{name}: the condition says nothing");
    }
    // The provider config with bad credentials says so itself.
    let config: Value = serde_json::from_str(&kubectl_ok(
        &[
            "get",
            "kmspc",
            &format!("{}-creds", env.provider),
            "-o",
            "json",
        ],
        None,
    ))
    .unwrap();
    let stalled = config["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Stalled")
        .unwrap()
        .clone();
    assert_eq!(
        (stalled["status"].as_str(), stalled["reason"].as_str()),
        (Some("True"), Some("InvalidCredentials")),
        "{config}"
    );

    // No retry storm: a few seconds of being stuck cost only a handful of calls.
    let before = env
        .emulator
        .admin()
        .calls(0)
        .last()
        .map(|c| c.seq)
        .unwrap_or(0);
    tokio::time::sleep(Duration::from_secs(6)).await;
    let calls = env.emulator.admin().calls(before);
    assert!(
        calls.len() < 60,
        "{} KMS calls in 6 s while stuck: {:?}",
        calls.len(),
        calls.iter().map(|c| &c.operation).collect::<Vec<_>>()
    );
    // Stalled objects are looked at again once per --stalled-retry (5 s here), not hot-retried.
    let creates = calls
        .iter()
        .filter(|c| c.operation == "create-grant")
        .count();
    assert!(
        creates <= 2,
        "{creates} create-grant calls in 6 s while the key is full"
    );

    // The recoverable ones recover: enable the key, fix the Secret.
    env.emulator
        .admin()
        .set_key_state(&disabled_key, KeyState::Enabled)
        .unwrap();
    let fixed = json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "wrong-credentials", "namespace": env.namespace},
        "stringData": {"accessKey": env.emulator.config().access_key, "secretKey": env.emulator.config().secret_key.as_str()}
    });
    env.apply(&fixed);
    env.wait_for("disabled-key", "condition=Ready", 60);
    env.wait_for("bad-creds", "condition=Ready", 60);
    // Objects that never reached KMS are deleted without hanging on their finalizer, even
    // when their provider config does not exist.
    for name in ["no-provider", "key-not-found", "default-key", "key-allowed"] {
        kubectl_ok(
            &[
                "-n",
                &env.namespace,
                "delete",
                "kmsgrant.kmsgrant.io",
                name,
                "--timeout=30s",
            ],
            None,
        );
    }
    // The configs are still in use by the grants left here: their deletion waits for them
    // (finalizer kmsgrant.io/in-use), so do not wait.
    let _ = kubectl(
        &[
            "delete",
            "--wait=false",
            "kmspc",
            &format!("{}-ns", env.provider),
            &format!("{}-keys", env.provider),
            &format!("{}-ops", env.provider),
            &format!("{}-creds", env.provider),
        ],
        None,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn open_telekom_cloud_signing_variant_works_end_to_end() {
    let mut env = Env::new("otc-sign", EmulatorConfig::for_tests(), "5s").await;
    let key = env.new_key("otc");
    let auth = json!({"type": "AccessKey", "signingVariant": "OpenTelekomCloud",
        "secretRef": {"namespace": env.namespace, "name": "kms-credentials"}});
    env.apply(&env.provider_config(json!({"auth": auth})));
    env.start_operator();
    env.apply(&env.grant("otc-signed", &key, json!({})));
    env.wait_for("otc-signed", "condition=Ready", 60);
    let calls = env.emulator.admin().calls(0);
    let signed: Vec<_> = calls
        .iter()
        .filter(|c| c.operation == "create-grant" && c.status == 200)
        .collect();
    assert_eq!(signed.len(), 1);
    assert_eq!(env.emulator.admin().grant_count(&key), Some(1));
}

/// A Ready object is not reconciled every resync (the resync lists keys, not objects), yet it
/// follows what it depends on: its namespace losing the selector's label, and its key being
/// disabled, each show in its conditions within a few resync periods, and both recover.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_ready_object_follows_its_namespace_labels_and_its_key_state() {
    let mut env = Env::new("follows", EmulatorConfig::for_tests(), "3s").await;
    let key = env.new_key("followed");
    kubectl_ok(
        &["label", "namespace", &env.namespace, "kms-grants=allowed"],
        None,
    );
    env.apply(
        &env.provider_config(
            json!({"namespaceSelector": {"matchLabels": {"kms-grants": "allowed"}}}),
        ),
    );
    env.start_operator();
    env.apply(&env.grant("follower", &key, json!({})));
    env.wait_for("follower", "condition=Ready", 60);

    let stalled_reason = r#"jsonpath={.status.conditions[?(@.type=="Stalled")].reason}"#;
    kubectl_ok(
        &[
            "label",
            "namespace",
            &env.namespace,
            "kms-grants=denied",
            "--overwrite",
        ],
        None,
    );
    env.wait_for(
        "follower",
        &format!("{stalled_reason}=NamespaceNotAllowed"),
        30,
    );
    kubectl_ok(
        &[
            "label",
            "namespace",
            &env.namespace,
            "kms-grants=allowed",
            "--overwrite",
        ],
        None,
    );
    // A Stalled object is retried on the stalled interval; the relabel wakes it at once.
    env.wait_for("follower", "condition=Ready", 30);

    env.emulator
        .admin()
        .set_key_state(&key, KeyState::Disabled)
        .unwrap();
    // The key is described again every four resyncs (12 s here).
    let ready_reason = r#"jsonpath={.status.conditions[?(@.type=="Ready")].reason}"#;
    env.wait_for("follower", &format!("{ready_reason}=KeyDisabled"), 45);
    env.emulator
        .admin()
        .set_key_state(&key, KeyState::Enabled)
        .unwrap();
    env.wait_for("follower", "condition=Ready", 45);
}
