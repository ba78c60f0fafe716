//! The unmanaged-grant audit end to end: KmsKeyPolicy status, the `kmsgrant_unmanaged_grants`
//! gauge and Events, on a real API server with the emulator as KMS, and what it costs in KMS
//! calls (counted in the emulator's call log).

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use kms_emulator::EmulatorConfig;
use serde_json::{Value, json};
use support::{
    Env, Operator, TEST_LABEL, eventually, free_port, grant_by_hand, kms_client, kubectl_ok,
    last_seq, lists, metrics, passes, series,
};

const RESYNC: &str = "4s";

/// A KmsKeyPolicy (cluster-scoped) that the test's operator sees.
fn key_policy(env: &Env, name: &str, provider: &str, key: &str) -> Value {
    json!({
        "apiVersion": "kmsgrant.io/v1beta1", "kind": "KmsKeyPolicy",
        "metadata": {"name": name, "labels": {TEST_LABEL: env.namespace}},
        "spec": {"providerConfigRef": {"name": provider}, "keyId": key}
    })
}

fn policy(name: &str) -> Value {
    serde_json::from_str(&kubectl_ok(
        &["get", "kmskeypolicies.kmsgrant.io", name, "-o", "json"],
        None,
    ))
    .unwrap()
}

fn ready_reason(policy: &Value) -> String {
    policy["status"]["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == "Ready"))
        .map(|c| {
            format!(
                "{}/{}",
                c["status"].as_str().unwrap_or_default(),
                c["reason"].as_str().unwrap_or_default()
            )
        })
        .unwrap_or_default()
}

fn stalled_reason(policy: &Value) -> String {
    policy["status"]["conditions"]
        .as_array()
        .and_then(|c| {
            c.iter()
                .find(|c| c["type"] == "Stalled" && c["status"] == "True")
        })
        .and_then(|c| c["reason"].as_str())
        .unwrap_or_default()
        .to_owned()
}

/// UnmanagedGrantFound events about one KmsKeyPolicy, by note.
fn found_events(name: &str) -> Vec<String> {
    let list: Value = serde_json::from_str(&kubectl_ok(
        &[
            "get",
            "events",
            "-A",
            "--field-selector",
            &format!("involvedObject.kind=KmsKeyPolicy,involvedObject.name={name}"),
            "-o",
            "json",
        ],
        None,
    ))
    .unwrap();
    list["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["reason"] == "UnmanagedGrantFound")
        .map(|e| e["message"].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hand_made_grant_is_reported_within_a_resync_and_the_audit_adds_no_kms_call() {
    let mut env = Env::new("audit", EmulatorConfig::for_tests(), RESYNC).await;
    let managed = env.new_key("audit-managed");
    let other = env.new_key("audit-other");
    let unused = env.new_key("audit-unused");
    let port = free_port();
    env.operator = Some(Operator::start_with(
        &env.namespace,
        RESYNC,
        &["--admin-address", &format!("127.0.0.1:{port}")],
    ));
    env.apply(&env.grant("app", &managed, json!({})));
    env.apply(&env.grant("left", &managed, json!({"deletionPolicy": "Orphan"})));
    env.apply(&env.grant("elsewhere", &other, json!({})));
    for name in ["app", "left", "elsewhere"] {
        env.wait_for(name, "condition=Ready", 60);
    }
    let own: BTreeSet<String> = ["app", "left"]
        .iter()
        .map(|n| env.get(n)["status"]["grantId"].as_str().unwrap().to_owned())
        .collect();

    // No KmsKeyPolicy: each pass lists each key in use once, and that is all it does.
    let without = passes(&env, last_seq(&env), 3).await;
    for pass in &without {
        assert_eq!(
            lists(pass),
            BTreeMap::from([(managed.clone(), 1), (other.clone(), 1)]),
            "{pass:?}"
        );
    }
    // The gauge covers every key in use, policy or not.
    let unmanaged = |key: &str| {
        format!(
            "kmsgrant_unmanaged_grants{{provider=\"{}\",key=\"{key}\"}}",
            env.provider
        )
    };
    let text = metrics(port).await;
    assert_eq!(series(&text, &unmanaged(&managed)), Some(0.0), "{text}");
    assert_eq!(series(&text, &unmanaged(&other)), Some(0.0), "{text}");
    assert_eq!(series(&text, &unmanaged(&unused)), None, "{text}");

    // Policies on the managed key and on a key no KmsGrant uses.
    let on_managed = format!("{}-managed", env.namespace);
    let on_unused = format!("{}-unused", env.namespace);
    env.apply(&key_policy(&env, &on_managed, &env.provider, &managed));
    env.apply(&key_policy(&env, &on_unused, &env.provider, &unused));
    eventually("both policies Ready", Duration::from_secs(60), async || {
        ready_reason(&policy(&on_managed)) == "True/NoUnmanagedGrants"
            && ready_reason(&policy(&on_unused)) == "True/NoUnmanagedGrants"
    })
    .await;
    assert_eq!(policy(&on_managed)["status"]["unmanagedGrants"], 0);

    // Grants made by hand: one named, one unnamed, one named for another cluster's object.
    let kms = kms_client(&env);
    let hand = grant_by_hand(&kms, &managed, "everyone", Some("decrypt-for-everyone")).await;
    let unnamed = grant_by_hand(&kms, &managed, "someone", None).await;
    let foreign = grant_by_hand(&kms, &managed, "peer", Some("k8s/other-cluster/team-x/app")).await;
    eventually(
        "the audit reports them",
        Duration::from_secs(60),
        async || {
            let status = &policy(&on_managed)["status"];
            status["unmanagedGrants"] == 2 && status["otherClusterGrants"] == 1
        },
    )
    .await;
    let found = policy(&on_managed);
    assert_eq!(ready_reason(&found), "True/UnmanagedGrantsFound");
    let listed: BTreeMap<String, &Value> = found["status"]["grants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| (g["grantId"].as_str().unwrap().to_owned(), g))
        .collect();
    assert_eq!(
        listed.keys().cloned().collect::<BTreeSet<_>>(),
        BTreeSet::from([hand.clone(), unnamed.clone(), foreign.clone()]),
        "the objects' own grants are not reported"
    );
    assert!(own.iter().all(|id| !listed.contains_key(id)));
    let entry = listed[&hand];
    assert_eq!(entry["owner"], "Unmanaged");
    assert_eq!(entry["granteePrincipal"], "everyone");
    assert_eq!(entry["name"], "decrypt-for-everyone");
    assert_eq!(
        entry["operations"],
        json!(["decrypt-datakey", "describe-key"])
    );
    assert!(
        entry["createdAt"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')),
        "{entry}"
    );
    assert_eq!(listed[&unnamed]["owner"], "Unmanaged");
    assert!(listed[&unnamed].get("name").is_none());
    assert_eq!(listed[&foreign]["owner"], "OtherCluster");
    let text = metrics(port).await;
    assert_eq!(series(&text, &unmanaged(&managed)), Some(2.0), "{text}");
    assert_eq!(
        series(
            &text,
            &format!(
                "kmsgrant_other_cluster_grants{{provider=\"{}\",key=\"{managed}\"}}",
                env.provider
            )
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(series(&text, &unmanaged(&unused)), Some(0.0), "{text}");

    // With the audit on: the keys in use cost what they cost without it; the key only a policy
    // names is the one list added.
    let with = passes(&env, last_seq(&env), 3).await;
    for pass in &with {
        assert_eq!(
            lists(pass),
            BTreeMap::from([
                (managed.clone(), 1),
                (other.clone(), 1),
                (unused.clone(), 1)
            ]),
            "{pass:?}"
        );
        let writes: usize = pass
            .iter()
            .filter(|((op, _), _)| {
                op != "list-grants" && op != "describe-key" && op != "user-quotas"
            })
            .map(|(_, n)| n)
            .sum();
        assert_eq!(writes, 0, "{pass:?}");
    }
    eprintln!("KMS calls per pass without a KmsKeyPolicy: {without:?}");
    eprintln!("KMS calls per pass with KmsKeyPolicies: {with:?}");

    // One event per grant found, not one per resync.
    let events = found_events(&on_managed);
    assert_eq!(events.len(), 2, "{events:?}");
    for id in [&hand, &unnamed] {
        assert!(
            events.iter().any(|e| e.contains(id.as_str())),
            "{id}: {events:?}"
        );
    }

    // An Orphan deletion leaves a grant that no object declares any more.
    kubectl_ok(
        &[
            "-n",
            &env.namespace,
            "delete",
            "kmsgrants.kmsgrant.io",
            "left",
            "--timeout=60s",
        ],
        None,
    );
    eventually(
        "the orphaned grant is reported",
        Duration::from_secs(60),
        async || policy(&on_managed)["status"]["unmanagedGrants"] == 3,
    )
    .await;
    let orphaned: Vec<String> = own
        .iter()
        .filter(|id| *id != &env.get("app")["status"]["grantId"])
        .cloned()
        .collect();
    let listed = policy(&on_managed)["status"]["grants"].clone();
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .any(|g| g["grantId"] == orphaned[0].as_str() && g["owner"] == "Unmanaged"),
        "{listed}"
    );
    assert_eq!(found_events(&on_managed).len(), 3);

    for name in [&on_managed, &on_unused] {
        kubectl_ok(&["delete", "kmskeypolicies.kmsgrant.io", name], None);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_policy_says_why_it_cannot_audit() {
    let mut env = Env::new("audit-fail", EmulatorConfig::for_tests(), RESYNC).await;
    env.start_operator();
    let no_config = format!("{}-no-config", env.namespace);
    let no_key = format!("{}-no-key", env.namespace);
    env.apply(&key_policy(
        &env,
        &no_config,
        "no-such-config",
        "bb6a3d22-dc93-47ac-b5bd-88df7ad35f1e",
    ));
    env.apply(&key_policy(
        &env,
        &no_key,
        &env.provider,
        "0a0a0a0a-0a0a-0a0a-0a0a-0a0a0a0a0a0a",
    ));
    eventually("both Stalled", Duration::from_secs(60), async || {
        stalled_reason(&policy(&no_config)) == "ProviderConfigNotFound"
            && stalled_reason(&policy(&no_key)) == "KeyNotFound"
    })
    .await;
    // Pointed at a key that exists, the policy reports it (listed at the next pass: no
    // KmsGrant uses it).
    let key = env.new_key("audit-fixed");
    grant_by_hand(&kms_client(&env), &key, "everyone", None).await;
    env.apply(&key_policy(&env, &no_key, &env.provider, &key));
    eventually(
        "the fixed policy reports",
        Duration::from_secs(60),
        async || {
            let found = policy(&no_key);
            ready_reason(&found) == "True/UnmanagedGrantsFound"
                && found["status"]["unmanagedGrants"] == 1
                && found["status"]["observedGeneration"] == 2
        },
    )
    .await;
    for name in [&no_config, &no_key] {
        kubectl_ok(&["delete", "kmskeypolicies.kmsgrant.io", name], None);
    }
    // The README's example is a valid KmsKeyPolicy.
    let example = std::path::Path::new(support::REPO).join("deploy/examples/keypolicy.yaml");
    let out = kubectl_ok(
        &["apply", "--dry-run=server", "-f", example.to_str().unwrap()],
        None,
    );
    assert!(out.contains("kmskeypolicy.kmsgrant.io/seed-key"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_provider_config_can_audit_a_key_no_kms_grant_uses() {
    let mut env = Env::new("audit-keys", EmulatorConfig::for_tests(), RESYNC).await;
    let key = env.new_key("audit-keys");
    env.apply(&env.provider_config(json!({"auditKeyIds": [key]})));
    let kms = kms_client(&env);
    grant_by_hand(&kms, &key, "everyone", Some("by-hand")).await;
    let port = free_port();
    env.operator = Some(Operator::start_with(
        &env.namespace,
        RESYNC,
        &["--admin-address", &format!("127.0.0.1:{port}")],
    ));
    let series_name = format!(
        "kmsgrant_unmanaged_grants{{provider=\"{}\",key=\"{key}\"}}",
        env.provider
    );
    eventually(
        "the gauge counts the hand-made grant",
        Duration::from_secs(60),
        async || series(&metrics(port).await, &series_name) == Some(1.0),
    )
    .await;
    // Listed once per pass, as a key in use would be.
    let each = passes(&env, last_seq(&env), 2).await;
    for pass in &each {
        assert_eq!(lists(pass), BTreeMap::from([(key.clone(), 1)]), "{pass:?}");
    }
    // Taken out of the list, the key is no longer listed and loses its series.
    env.apply(&env.provider_config(json!({})));
    eventually("the series is gone", Duration::from_secs(60), async || {
        series(&metrics(port).await, &series_name).is_none()
    })
    .await;
}
