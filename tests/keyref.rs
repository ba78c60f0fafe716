//! Keys by alias (`spec.keyRef.alias`) end to end: a real kube-apiserver, `kmsgrant-operator run`,
//! and the emulator as KMS, whose `update-key-alias` moves an alias from one key to another and
//! whose call log shows what the operator asked and in which order.

mod support;

use std::time::{Duration, Instant};

use kms_emulator::{CallRecord, EmulatorConfig};
use serde_json::{Value, json};
use support::{Env, Operator, eventually, kubectl, kubectl_ok};

/// A KmsGrant naming its key by alias.
fn by_alias(env: &Env, name: &str, alias: &str) -> Value {
    let mut manifest = env.grant(name, "unused", json!({}));
    let spec = manifest["spec"].as_object_mut().unwrap();
    spec.remove("keyId");
    spec.insert("keyRef".into(), json!({"alias": alias}));
    manifest
}

/// `update-key-alias` through the KMS API, with a token of the emulator's user.
async fn update_key_alias(env: &Env, key_id: &str, alias: &str) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = env.emulator.config();
    let (token, _) = env.emulator.admin().issue_token(
        &config.user_id,
        kms_emulator::TokenScope::Project(config.project_id.clone()),
        3600,
    );
    let answer = reqwest::Client::new()
        .post(format!(
            "{}/kms/update-key-alias",
            env.emulator.kms_endpoint()
        ))
        .header("X-Auth-Token", token)
        .json(&json!({"key_id": key_id, "key_alias": alias}))
        .send()
        .await
        .unwrap();
    let status = answer.status();
    let body = answer.text().await.unwrap_or_default();
    assert!(
        status.is_success(),
        "update-key-alias {alias}: {status} {body}"
    );
}

fn last_seq(env: &Env) -> u64 {
    env.emulator
        .admin()
        .calls(0)
        .last()
        .map(|c| c.seq)
        .unwrap_or(0)
}

fn condition<'a>(object: &'a Value, type_: &str) -> Option<&'a Value> {
    object["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
}

fn str_at<'a>(value: &'a Value, field: &str) -> &'a str {
    value[field].as_str().unwrap_or_default()
}

fn ok_calls<'a>(calls: &'a [CallRecord], operation: &str) -> Vec<&'a CallRecord> {
    calls
        .iter()
        .filter(|c| c.operation == operation && c.status == 200)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_grant_by_alias_resolves_and_is_ready_with_the_key_in_status() {
    let mut env = Env::new("alias-ready", EmulatorConfig::for_tests(), "5s").await;
    let key = env.new_key("app");
    let other = env.new_key("unrelated");
    env.start_operator();
    env.apply(&by_alias(&env, "by-alias", "alias/app"));
    env.apply(&env.grant("by-id", &other, json!({})));
    env.wait_for("by-alias", "condition=Ready", 60);
    env.wait_for("by-id", "condition=Ready", 60);

    let object = env.get("by-alias");
    assert_eq!(object["status"]["keyId"], key.as_str());
    let grant_id = str_at(&object["status"], "grantId").to_owned();
    let grants = env.emulator.admin().dump().grants;
    let grant = grants
        .iter()
        .find(|g| g.grant_id == grant_id)
        .expect("the grant exists on KMS");
    assert_eq!(grant.key_id, key);
    // A grant by key ID shows its key in the same status field.
    assert_eq!(env.get("by-id")["status"]["keyId"], other.as_str());
    // The alias was described by alias, never the key behind it by ID.
    let calls = env.emulator.admin().calls(0);
    let describes = ok_calls(&calls, "describe-key");
    assert!(
        describes
            .iter()
            .any(|c| c.key_id.as_deref() == Some("alias/app"))
    );
    assert!(
        !describes
            .iter()
            .any(|c| c.key_id.as_deref() == Some(key.as_str())),
        "the key behind the alias was described again by ID"
    );
    // Printer columns: the alias by default, the key in use with -o wide.
    let table = kubectl_ok(&["-n", &env.namespace, "get", "kmsg", "by-alias"], None);
    assert!(
        table.lines().nth(1).unwrap().contains("alias/app"),
        "{table}"
    );
    let wide = kubectl_ok(
        &[
            "-n",
            &env.namespace,
            "get",
            "kmsg",
            "by-alias",
            "-o",
            "wide",
        ],
        None,
    );
    assert!(
        wide.lines().next().unwrap().contains("KEY-IN-USE"),
        "{wide}"
    );
    assert!(wide.lines().nth(1).unwrap().contains(&key), "{wide}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn both_or_neither_key_fields_are_refused_by_the_api_server() {
    let env = Env::new("alias-schema", EmulatorConfig::for_tests(), "5s").await;
    let key = env.new_key("schema");
    let mut both = env.grant("both", &key, json!({}));
    both["spec"]["keyRef"] = json!({"alias": "alias/schema"});
    let mut neither = env.grant("neither", &key, json!({}));
    neither["spec"].as_object_mut().unwrap().remove("keyId");
    for (manifest, says) in [
        (&both, "mutually exclusive"),
        (&neither, "one of them is required"),
    ] {
        let out = kubectl(&["apply", "-f", "-"], Some(&manifest.to_string()));
        assert!(!out.status.success(), "accepted: {manifest}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        for part in ["spec.keyId", "spec.keyRef", says] {
            assert!(stderr.contains(part), "{part:?} missing from: {stderr}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unknown_alias_is_reported_creates_nothing_and_recovers_once_it_exists() {
    let mut env = Env::new("alias-unknown", EmulatorConfig::for_tests(), "5s").await;
    env.start_operator();
    env.apply(&by_alias(&env, "waiting", "alias/not-yet"));
    env.wait_for(
        "waiting",
        "jsonpath={.status.conditions[?(@.type==\"Ready\")].reason}=AliasNotFound",
        60,
    );
    let object = env.get("waiting");
    let ready = condition(&object, "Ready").unwrap();
    assert_eq!(ready["status"], "False");
    let message = str_at(ready, "message");
    for part in [
        "spec.keyRef.alias alias/not-yet",
        "names no key",
        "retrying",
    ] {
        assert!(message.contains(part), "{part:?} missing from: {message}");
    }
    assert_eq!(condition(&object, "Reconciling").unwrap()["status"], "True");
    eventually(
        "an AliasNotFound event",
        Duration::from_secs(30),
        async || {
            env.events().iter().any(|e| {
                e["reason"] == "AliasNotFound"
                    && e["type"] == "Warning"
                    && str_at(e, "message").contains("alias/not-yet")
            })
        },
    )
    .await;
    let calls = env.emulator.admin().calls(0);
    assert!(
        ok_calls(&calls, "create-grant").is_empty(),
        "a grant was created"
    );
    assert!(env.emulator.admin().dump().grants.is_empty());

    // The alias appears: the object follows by itself (retried with backoff).
    let key = env.new_key("not-yet");
    env.wait_for("waiting", "condition=Ready", 60);
    assert_eq!(env.get("waiting")["status"]["keyId"], key.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_alias_move_is_followed_without_an_access_gap() {
    // Resync 2 s: aliases are described again every 8 s (four resyncs).
    let mut env = Env::new("alias-move", EmulatorConfig::for_tests(), "2s").await;
    let old_key = env.new_key("app");
    let new_key = env.new_key("app-next");
    env.start_operator();
    env.apply(&by_alias(&env, "follows", "alias/app"));
    env.wait_for("follows", "condition=Ready", 60);
    let old_grant = str_at(&env.get("follows")["status"], "grantId").to_owned();
    let before = last_seq(&env);

    // First half of the move: the alias names no key. The object says so and keeps its grant.
    update_key_alias(&env, &old_key, "app-retired").await;
    env.wait_for(
        "follows",
        "jsonpath={.status.conditions[?(@.type==\"Ready\")].reason}=AliasNotFound",
        60,
    );
    let waiting = env.get("follows");
    assert_eq!(str_at(&waiting["status"], "grantId"), old_grant);
    assert!(
        str_at(condition(&waiting, "Ready").unwrap(), "message").contains(&old_key),
        "the message names the key whose grant is kept: {waiting}"
    );
    let grants = env.emulator.admin().dump().grants;
    assert!(
        grants.iter().any(|g| g.grant_id == old_grant),
        "the grant was revoked while the alias could not be resolved"
    );

    // Second half: the alias names the new key. The grant follows.
    update_key_alias(&env, &new_key, "app").await;
    eventually(
        "the grant to follow the alias",
        Duration::from_secs(60),
        async || {
            let object = env.get("follows");
            let status = &object["status"];
            str_at(status, "keyId") == new_key
                && status.get("supersededGrant").is_none_or(Value::is_null)
                && condition(&object, "Ready").is_some_and(|c| c["status"] == "True")
        },
    )
    .await;
    let object = env.get("follows");
    let new_grant = str_at(&object["status"], "grantId").to_owned();
    assert_ne!(new_grant, old_grant);

    let calls = env.emulator.admin().calls(before);
    let created = calls
        .iter()
        .find(|c| {
            c.operation == "create-grant"
                && c.status == 200
                && c.key_id.as_deref() == Some(new_key.as_str())
        })
        .expect("a grant created on the new key");
    let revoked = calls
        .iter()
        .find(|c| {
            c.operation == "revoke-grant"
                && c.status == 200
                && c.grant_id.as_deref() == Some(old_grant.as_str())
        })
        .expect("the old grant revoked");
    assert!(
        created.seq < revoked.seq,
        "the old grant was revoked before the new one existed"
    );
    // Nothing else was revoked, and before the create nothing was revoked at all.
    assert_eq!(ok_calls(&calls, "revoke-grant").len(), 1);
    let grants = env.emulator.admin().dump().grants;
    assert_eq!(grants.len(), 1, "exactly one grant at the end: {grants:?}");
    assert_eq!(grants[0].grant_id, new_grant);
    assert_eq!(grants[0].key_id, new_key);
    assert!(
        env.events()
            .iter()
            .any(|e| e["reason"] == "GrantReplaced" || e["reason"] == "GrantRevoked"),
        "no event tells of the replacement"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_resolved_key_outside_allowed_key_ids_is_refused() {
    let mut env = Env::new("alias-guard", EmulatorConfig::for_tests(), "5s").await;
    let allowed = env.new_key("allowed");
    let refused = env.new_key("elsewhere");
    env.apply(&env.provider_config(json!({"allowedKeyIds": [allowed]})));
    env.start_operator();
    env.apply(&by_alias(&env, "guarded", "alias/elsewhere"));
    env.apply(&by_alias(&env, "permitted", "alias/allowed"));
    env.wait_for(
        "guarded",
        "jsonpath={.status.conditions[?(@.type==\"Stalled\")].reason}=KeyNotAllowed",
        60,
    );
    env.wait_for("permitted", "condition=Ready", 60);
    let object = env.get("guarded");
    let message = str_at(condition(&object, "Stalled").unwrap(), "message");
    for part in ["alias/elsewhere", refused.as_str(), "allowedKeyIds"] {
        assert!(message.contains(part), "{part:?} missing from: {message}");
    }
    let calls = env.emulator.admin().calls(0);
    assert!(
        !calls
            .iter()
            .any(|c| c.operation == "create-grant"
                && c.key_id.as_deref() == Some(refused.as_str())),
        "a grant was attempted on the refused key"
    );
}

/// In steady state an alias is described at most once per window (four resyncs) whatever the
/// number of objects naming it, and the key behind it is never described by ID; the drift pass
/// lists the resolved key, which the audit counts as a key in use.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn describe_key_costs_at_most_one_call_per_alias_per_window() {
    const RESYNC_SECONDS: u64 = 1;
    let mut env = Env::new("alias-cost", EmulatorConfig::for_tests(), "1s").await;
    let key = env.new_key("shared");
    let other = env.new_key("second");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    env.operator = Some(Operator::start_with(
        &env.namespace,
        "1s",
        &["--admin-address", &format!("127.0.0.1:{port}")],
    ));
    for name in ["one", "two", "three"] {
        env.apply(&by_alias(&env, name, "alias/shared"));
    }
    env.apply(&by_alias(&env, "four", "alias/second"));
    env.apply(&env.grant("by-id", &key, json!({})));
    for name in ["one", "two", "three", "four", "by-id"] {
        env.wait_for(name, "condition=Ready", 60);
    }
    // Let the first describes and listings settle, then watch a steady period.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = last_seq(&env);
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(17)).await;
    let elapsed = started.elapsed();
    let calls = env.emulator.admin().calls(before);
    let window = Duration::from_secs(4 * RESYNC_SECONDS);
    let windows = (elapsed.as_secs_f64() / window.as_secs_f64()).ceil() as usize;
    let describes = |target: &str| {
        calls
            .iter()
            .filter(|c| c.operation == "describe-key" && c.key_id.as_deref() == Some(target))
            .count()
    };
    let (shared, second) = (describes("alias/shared"), describes("alias/second"));
    let (by_id, other_by_id) = (describes(&key), describes(&other));
    let lists = calls
        .iter()
        .filter(|c| c.operation == "list-grants" && c.key_id.as_deref() == Some(key.as_str()))
        .count();
    println!(
        "steady {elapsed:?} ({windows} windows of {window:?}): describe-key alias/shared {shared}, alias/second {second}, {key} by ID {by_id}, {other} by ID {other_by_id}; list-grants {key} {lists}; writes {}",
        calls
            .iter()
            .filter(|c| matches!(c.operation.as_str(), "create-grant" | "revoke-grant"))
            .count()
    );
    assert!(shared >= 1, "alias/shared never described in {elapsed:?}");
    assert!(
        shared <= windows && second <= windows,
        "more than one describe per alias per window: {shared}, {second} in {windows} windows"
    );
    assert_eq!(
        (by_id, other_by_id),
        (0, 0),
        "the keys behind the aliases were described by ID"
    );
    assert!(
        !calls
            .iter()
            .any(|c| matches!(c.operation.as_str(), "create-grant" | "revoke-grant")),
        "writes in steady state"
    );
    // The resolved keys are keys in use: listed by the drift pass and audited.
    assert!(lists >= 1, "the resolved key was not listed");
    let _ = rustls::crypto::ring::default_provider().install_default();
    let metrics = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for key_id in [&key, &other] {
        let series = format!(
            "kmsgrant_unmanaged_grants{{provider=\"{}\",key=\"{key_id}\"}}",
            env.provider
        );
        assert!(metrics.contains(&series), "{series} missing");
    }
}

/// Switching a manifest between `keyId` and `keyRef` is a change of key like any other: nothing
/// happens while both name the same key, a different key gets the grant first and the old one is
/// revoked after, and deletion revokes the grant on the key the alias named.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn switching_between_key_id_and_key_ref_is_a_key_change() {
    let mut env = Env::new("alias-switch", EmulatorConfig::for_tests(), "5s").await;
    let alpha = env.new_key("alpha");
    let beta = env.new_key("beta");
    env.start_operator();
    env.apply(&env.grant("switch", &alpha, json!({})));
    env.wait_for("switch", "condition=Ready", 60);
    let first = str_at(&env.get("switch")["status"], "grantId").to_owned();

    // The same key by alias: in sync, nothing written.
    let before = last_seq(&env);
    env.apply(&by_alias(&env, "switch", "alias/alpha"));
    env.wait_for("switch", "jsonpath={.status.observedGeneration}=2", 60);
    env.wait_for("switch", "condition=Ready", 30);
    assert_eq!(str_at(&env.get("switch")["status"], "grantId"), first);
    let calls = env.emulator.admin().calls(before);
    assert!(
        ok_calls(&calls, "create-grant").is_empty() && ok_calls(&calls, "revoke-grant").is_empty(),
        "writes for a switch that names the same key"
    );

    // Another key by alias, then back to a key ID: each time create first, then revoke.
    let mut previous = first;
    for (manifest, key, generation) in [
        (by_alias(&env, "switch", "alias/beta"), &beta, 3),
        (env.grant("switch", &alpha, json!({})), &alpha, 4),
    ] {
        let before = last_seq(&env);
        env.apply(&manifest);
        env.wait_for(
            "switch",
            &format!("jsonpath={{.status.observedGeneration}}={generation}"),
            60,
        );
        eventually(
            "the grant on the new key",
            Duration::from_secs(60),
            async || {
                let object = env.get("switch");
                str_at(&object["status"], "keyId") == key.as_str()
                    && object["status"]
                        .get("supersededGrant")
                        .is_none_or(Value::is_null)
                    && condition(&object, "Ready").is_some_and(|c| c["status"] == "True")
            },
        )
        .await;
        let calls = env.emulator.admin().calls(before);
        let created = ok_calls(&calls, "create-grant");
        let revoked = ok_calls(&calls, "revoke-grant");
        assert_eq!((created.len(), revoked.len()), (1, 1), "{calls:?}");
        assert_eq!(created[0].key_id.as_deref(), Some(key.as_str()));
        assert_eq!(revoked[0].grant_id.as_deref(), Some(previous.as_str()));
        assert!(created[0].seq < revoked[0].seq, "revoked before created");
        previous = str_at(&env.get("switch")["status"], "grantId").to_owned();
    }

    // By alias again, then deleted: the grant on the key the alias names is revoked.
    env.apply(&by_alias(&env, "switch", "alias/alpha"));
    env.wait_for("switch", "jsonpath={.status.observedGeneration}=5", 60);
    env.wait_for("switch", "condition=Ready", 30);
    kubectl_ok(
        &[
            "-n",
            &env.namespace,
            "delete",
            "kmsgrant",
            "switch",
            "--wait=true",
            "--timeout=60s",
        ],
        None,
    );
    assert!(
        env.emulator.admin().dump().grants.is_empty(),
        "a grant was left behind"
    );
}
