//! KmsProviderConfig hardening end to end, against the real API server: where credentials may
//! come from, what a re-created config means, how a failing check settles, and how deletion of a
//! config in use waits for its grants.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use kms_emulator::{EmulatorConfig, ErrorInjection, FaultSettings, InjectedError};
use serde_json::{Value, json};
use support::{Env, Operator, eventually, kubectl, kubectl_ok};

fn provider_config(name: &str) -> Option<Value> {
    let out = kubectl(&["get", "kmsproviderconfig", name, "-o", "json"], None);
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).unwrap())
}

fn condition(object: &Value, type_: &str) -> Option<(String, String, String)> {
    object["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
        .map(|c| {
            (
                c["status"].as_str().unwrap_or_default().to_owned(),
                c["reason"].as_str().unwrap_or_default().to_owned(),
                c["message"].as_str().unwrap_or_default().to_owned(),
            )
        })
}

fn wait_for_config(name: &str, condition: &str, timeout_seconds: u32) {
    let out = kubectl(
        &[
            "wait",
            &format!("--for={condition}"),
            &format!("--timeout={timeout_seconds}s"),
            &format!("kmsproviderconfig/{name}"),
        ],
        None,
    );
    assert!(
        out.status.success(),
        "{name} never reached {condition}: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        serde_json::to_string_pretty(&provider_config(name)).unwrap_or_default()
    );
}

fn delete_config(name: &str) {
    kubectl_ok(
        &["delete", "kmsproviderconfig", name, "--timeout=60s"],
        None,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_secret_ref_to_another_namespace_is_refused_as_secret_namespace_not_allowed() {
    let mut env = Env::new("secretns", EmulatorConfig::for_tests(), "5s").await;
    let key = env.new_key("secret-namespace");
    // A tenant namespace holding a Secret with credentials that work.
    let tenant = support::namespace("tenant");
    env.apply(&json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "kms-credentials", "namespace": tenant},
        "stringData": {
            "accessKey": env.emulator.config().access_key,
            "secretKey": env.emulator.config().secret_key.clone()
        }
    }));
    let name = format!("{}-tenant", env.provider);
    let mut config = env.provider_config(json!({}));
    config["metadata"]["name"] = json!(name);
    config["spec"]["auth"]["secretRef"]["namespace"] = json!(tenant);
    env.apply(&config);
    env.start_operator();

    wait_for_config(
        &name,
        "jsonpath={.status.conditions[?(@.type==\"Stalled\")].reason}=SecretNamespaceNotAllowed",
        60,
    );
    let (status, _, message) = condition(&provider_config(&name).unwrap(), "Ready").unwrap();
    assert_eq!(status, "False");
    assert!(
        message.contains(&tenant) && message.contains(&env.namespace),
        "the message names both namespaces: {message}"
    );
    // A grant on it never reaches KMS.
    let mut grant = env.grant("tenant-grant", &key, json!({}));
    grant["spec"]["providerConfigRef"]["name"] = json!(name);
    env.apply(&grant);
    env.wait_for(
        "tenant-grant",
        "jsonpath={.status.conditions[?(@.type==\"Reconciling\")].reason}=ProviderConfigNotReady",
        60,
    );
    assert_eq!(env.emulator.admin().grant_count(&key), Some(0));
    // The config of the operator's own namespace works meanwhile.
    wait_for_config(&env.provider, "condition=Ready", 60);

    // The schema refuses what cannot be a namespace at all.
    let mut bad = env.provider_config(json!({}));
    bad["metadata"]["name"] = json!(format!("{}-bad", env.provider));
    bad["spec"]["auth"]["secretRef"]["namespace"] = json!("Team_A");
    let out = kubectl(&["apply", "-f", "-"], Some(&bad.to_string()));
    assert!(!out.status.success(), "an invalid namespace was accepted");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("spec.auth.secretRef.namespace"),
        "the API server names the field: {stderr}"
    );

    kubectl_ok(
        &[
            "-n",
            &env.namespace,
            "delete",
            "kmsg",
            "tenant-grant",
            "--timeout=60s",
        ],
        None,
    );
    delete_config(&name);
    kubectl_ok(&["delete", "namespace", &tenant, "--wait=false"], None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_config_deleted_and_recreated_with_other_allowed_keys_refuses_a_grant_on_the_old_key() {
    let mut env = Env::new("recreate", EmulatorConfig::for_tests(), "5s").await;
    let (old_key, new_key) = (env.new_key("old-key"), env.new_key("new-key"));
    env.apply(&env.provider_config(json!({"allowedKeyIds": [old_key]})));
    env.start_operator();
    env.apply(&env.grant("before", &old_key, json!({})));
    env.wait_for("before", "condition=Ready", 60);
    kubectl_ok(
        &[
            "-n",
            &env.namespace,
            "delete",
            "kmsg",
            "before",
            "--timeout=60s",
        ],
        None,
    );

    let old_uid = provider_config(&env.provider).unwrap()["metadata"]["uid"].clone();
    delete_config(&env.provider);
    env.apply(&env.provider_config(json!({"allowedKeyIds": [new_key]})));
    let recreated = provider_config(&env.provider).unwrap();
    assert_ne!(recreated["metadata"]["uid"], old_uid);
    assert_eq!(
        recreated["metadata"]["generation"], 1,
        "generation starts over"
    );

    env.apply(&env.grant("on-old-key", &old_key, json!({})));
    env.apply(&env.grant("on-new-key", &new_key, json!({})));
    env.wait_for(
        "on-old-key",
        "jsonpath={.status.conditions[?(@.type==\"Stalled\")].reason}=KeyNotAllowed",
        60,
    );
    env.wait_for("on-new-key", "condition=Ready", 60);
    assert_eq!(env.emulator.admin().grant_count(&old_key), Some(0));
    assert_eq!(env.emulator.admin().grant_count(&new_key), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deleting_a_config_in_use_waits_visibly_until_its_grants_are_gone() {
    let mut env = Env::new("inuse", EmulatorConfig::for_tests(), "5s").await;
    let key = env.new_key("in-use");
    env.start_operator();
    for name in ["first", "second"] {
        env.apply(&env.grant(name, &key, json!({})));
    }
    env.wait_for("first", "condition=Ready", 60);
    env.wait_for("second", "condition=Ready", 60);
    let finalizers = provider_config(&env.provider).unwrap()["metadata"]["finalizers"].clone();
    assert_eq!(finalizers, json!(["kmsgrant.io/in-use"]));

    kubectl_ok(
        &["delete", "kmsproviderconfig", &env.provider, "--wait=false"],
        None,
    );
    wait_for_config(
        &env.provider,
        "jsonpath={.status.conditions[?(@.type==\"Reconciling\")].reason}=InUse",
        30,
    );
    let config = provider_config(&env.provider).expect("the config is kept");
    assert!(config["metadata"]["deletionTimestamp"].is_string());
    let (_, _, message) = condition(&config, "Reconciling").unwrap();
    assert!(
        message.contains("2 KmsGrants")
            && message.contains(&format!("{}/first", env.namespace))
            && message.contains(&format!("{}/second", env.namespace)),
        "{message}"
    );
    // The grants still work and can still be revoked through it.
    assert_eq!(env.ready_reason("first"), "GrantReady");
    kubectl_ok(
        &[
            "-n",
            &env.namespace,
            "delete",
            "kmsg",
            "first",
            "--timeout=60s",
        ],
        None,
    );
    assert_eq!(env.emulator.admin().grant_count(&key), Some(1));
    eventually(
        "the count to drop to one",
        Duration::from_secs(30),
        async || {
            provider_config(&env.provider)
                .and_then(|c| condition(&c, "Reconciling"))
                .is_some_and(|(_, _, message)| message.contains("1 KmsGrant still uses"))
        },
    )
    .await;
    kubectl_ok(
        &[
            "-n",
            &env.namespace,
            "delete",
            "kmsg",
            "second",
            "--timeout=60s",
        ],
        None,
    );
    assert_eq!(env.emulator.admin().grant_count(&key), Some(0));
    kubectl_ok(
        &[
            "wait",
            "--for=delete",
            "--timeout=60s",
            &format!("kmsproviderconfig/{}", env.provider),
        ],
        None,
    );
}

/// resourceVersion of every KmsGrant in the namespace, and every Event there with its count.
fn snapshot(env: &Env) -> (BTreeMap<String, String>, BTreeMap<String, String>) {
    let list: Value = serde_json::from_str(&kubectl_ok(
        &["-n", &env.namespace, "get", "kmsgrants", "-o", "json"],
        None,
    ))
    .unwrap();
    let grants = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            (
                g["metadata"]["name"].as_str().unwrap().to_owned(),
                g["metadata"]["resourceVersion"]
                    .as_str()
                    .unwrap()
                    .to_owned(),
            )
        })
        .collect();
    let events = env
        .events()
        .iter()
        .map(|e| {
            (
                e["metadata"]["name"].as_str().unwrap().to_owned(),
                e["metadata"]["resourceVersion"]
                    .as_str()
                    .unwrap()
                    .to_owned(),
            )
        })
        .collect();
    (grants, events)
}

fn user_quotas_failures(env: &Env) -> usize {
    env.emulator
        .admin()
        .calls(0)
        .iter()
        .filter(|c| c.operation == "user-quotas" && c.status >= 500)
        .count()
}

fn fail_user_quotas(env: &Env, on: bool) {
    let mut faults = FaultSettings::default();
    if on {
        faults.errors.insert(
            "user-quotas".into(),
            ErrorInjection {
                rate: 1.0,
                error: InjectedError::Unavailable,
            },
        );
    }
    env.emulator.admin().set_faults(faults).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_provider_check_failing_for_one_period_under_100_ready_grants_writes_no_status_and_no_event()
 {
    let mut env = Env::new("settle", EmulatorConfig::for_tests(), "5s").await;
    let keys = [env.new_key("settle-a"), env.new_key("settle-b")];
    env.operator = Some(Operator::start_with(
        &env.namespace,
        "5s",
        &[
            "--provider-check-interval",
            "1s",
            "--provider-failure-threshold",
            "3",
        ],
    ));
    let grants: Vec<Value> = (0..100)
        .map(|i| env.grant(&format!("g{i:03}"), &keys[i % 2], json!({})))
        .collect();
    kubectl_ok(
        &["apply", "-f", "-"],
        Some(&json!({"apiVersion": "v1", "kind": "List", "items": grants}).to_string()),
    );
    kubectl_ok(
        &[
            "-n",
            &env.namespace,
            "wait",
            "--for=condition=Ready",
            "--timeout=180s",
            "kmsgrants",
            "--all",
        ],
        None,
    );
    // Let the last writes of convergence land, then take the baseline.
    let mut before = snapshot(&env);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let now = snapshot(&env);
        if now == before {
            break;
        }
        assert!(Instant::now() < deadline, "the grants never settled");
        before = now;
    }
    let config_version =
        provider_config(&env.provider).unwrap()["metadata"]["resourceVersion"].clone();

    // One whole check fails (the client's 8 attempts, all 503), then KMS is well again.
    let failures_before = user_quotas_failures(&env);
    fail_user_quotas(&env, true);
    eventually("one failed check", Duration::from_secs(60), async || {
        user_quotas_failures(&env) >= failures_before + 8
    })
    .await;
    fail_user_quotas(&env, false);
    // A few good checks afterwards.
    let calls = env.emulator.admin().calls(0).len();
    eventually(
        "checks after the blip",
        Duration::from_secs(30),
        async || {
            env.emulator.admin().calls(0)[calls..]
                .iter()
                .filter(|c| c.operation == "user-quotas" && c.status == 200)
                .count()
                >= 3
        },
    )
    .await;

    let after = snapshot(&env);
    let changed: Vec<&String> = after
        .0
        .iter()
        .filter(|(name, version)| before.0.get(*name) != Some(version))
        .map(|(name, _)| name)
        .collect();
    assert!(changed.is_empty(), "grant objects written: {changed:?}");
    assert_eq!(after.1, before.1, "events created or updated");
    let config = provider_config(&env.provider).unwrap();
    assert_eq!(
        config["metadata"]["resourceVersion"], config_version,
        "the config's status was rewritten"
    );
    assert_eq!(condition(&config, "Ready").unwrap().0, "True");

    // A lasting failure: the config goes NotReady, the grants, whose own calls work, stay Ready,
    // and a deletion still revokes.
    fail_user_quotas(&env, true);
    wait_for_config(&env.provider, "condition=Ready=False", 120);
    let (_, reason, _) =
        condition(&provider_config(&env.provider).unwrap(), "Reconciling").unwrap();
    assert_eq!(reason, "KmsUnavailable");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let ready = kubectl_ok(
        &[
            "-n",
            &env.namespace,
            "get",
            "kmsgrants",
            "-o",
            "jsonpath={.items[*].status.conditions[?(@.type==\"Ready\")].status}",
        ],
        None,
    );
    assert_eq!(
        ready.split_whitespace().filter(|s| *s == "True").count(),
        100,
        "{ready}"
    );
    let on_key = env.emulator.admin().grant_count(&keys[0]).unwrap();
    kubectl_ok(
        &[
            "-n",
            &env.namespace,
            "delete",
            "kmsg",
            "g000",
            "--timeout=60s",
        ],
        None,
    );
    assert_eq!(env.emulator.admin().grant_count(&keys[0]), Some(on_key - 1));
    fail_user_quotas(&env, false);
    wait_for_config(&env.provider, "condition=Ready", 60);
}

/// The `EndpointInCatalog` condition of the config (status, message), once it names `reason`.
async fn wait_for_catalog_reason(name: &str, reason: &str) -> (String, String) {
    let mut last = None;
    eventually(
        &format!("{name}: EndpointInCatalog {reason}"),
        Duration::from_secs(60),
        async || {
            last = provider_config(name).and_then(|c| condition(&c, "EndpointInCatalog"));
            last.as_ref().is_some_and(|(_, r, _)| r == reason)
        },
    )
    .await;
    let (status, _, message) = last.unwrap();
    (status, message)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_copied_endpoint_or_a_wrong_region_is_a_condition_and_an_event_naming_the_fix() {
    let mut env = Env::new("catalog", EmulatorConfig::for_tests(), "30s").await;
    env.start_operator();
    wait_for_config(&env.provider, "condition=Ready", 60);
    let (status, message) = wait_for_catalog_reason(&env.provider, "EndpointListed").await;
    assert_eq!(status, "True", "{message}");

    // The same KMS under another host name than the catalog lists: still usable (a private
    // endpoint is fine), but told, with the catalog's endpoint as the fix.
    let port = env.emulator.addr().port();
    env.apply(&env.provider_config(json!({"endpoint": format!("http://localhost:{port}")})));
    let (status, message) = wait_for_catalog_reason(&env.provider, "EndpointNotInCatalog").await;
    assert_eq!(status, "False");
    assert!(
        message.contains(&format!(
            "set spec.endpoint to the catalog's {}",
            env.emulator.base_url()
        )),
        "{message}"
    );
    wait_for_config(&env.provider, "condition=Ready", 60);

    // The endpoint of one region with another region configured.
    env.apply(&env.provider_config(json!({"region": "eu-nl"})));
    let (status, message) = wait_for_catalog_reason(&env.provider, "EndpointOfOtherRegion").await;
    assert_eq!(status, "False");
    let region = env.emulator.config().region.clone();
    assert!(
        message.contains(&format!("set spec.region to {region:?}")),
        "{message}"
    );

    // Each mismatch was told once as a Warning event on the config (cluster-scoped objects'
    // events live in `default`).
    let events: Value = serde_json::from_str(&kubectl_ok(
        &[
            "-n",
            "default",
            "get",
            "events.events.k8s.io",
            "--field-selector",
            &format!("regarding.name={}", env.provider),
            "-o",
            "json",
        ],
        None,
    ))
    .unwrap();
    let reasons: Vec<&str> = events["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "Warning")
        .filter_map(|e| e["reason"].as_str())
        .collect();
    for reason in ["EndpointNotInCatalog", "EndpointOfOtherRegion"] {
        assert!(reasons.contains(&reason), "no {reason} event: {reasons:?}");
    }

    // Fixed: listed again.
    env.apply(&env.provider_config(json!({})));
    let (status, _) = wait_for_catalog_reason(&env.provider, "EndpointListed").await;
    assert_eq!(status, "True");
}
