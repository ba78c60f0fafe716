//! Grant identity on the cloud, end to end: ownership read from grant names survives rebuilt
//! clusters, shards, other namespaces, lost answers, repointed provider configs and imports.

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use kms_emulator::{EmulatorConfig, FaultSettings};
use serde_json::{Value, json};
use support::{CLUSTER, Env, Operator, StallingProxy, TEST_LABEL, eventually, kubectl, kubectl_ok};

fn grant_id(object: &Value) -> String {
    object["status"]["grantId"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

fn calls(env: &Env, operation: &str) -> usize {
    env.emulator
        .admin()
        .calls(0)
        .iter()
        .filter(|c| c.operation == operation)
        .count()
}

/// Another namespace served by its own operator (a shard), on the same emulator as `env`.
struct Shard {
    namespace: String,
    operator: Option<Operator>,
}

impl Shard {
    fn new(env: &Env, prefix: &str, provider_extra: Value) -> Self {
        let namespace = support::namespace(prefix);
        kubectl_ok(
            &[
                "label",
                "namespace",
                &namespace,
                &format!("{TEST_LABEL}={namespace}"),
            ],
            None,
        );
        let secret = json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "kms-credentials", "namespace": namespace},
            "stringData": {
                "accessKey": env.emulator.config().access_key,
                "secretKey": env.emulator.config().secret_key.as_str()
            }
        });
        env.apply(&secret);
        let mut config = env.provider_config(provider_extra);
        config["metadata"]["name"] = json!(namespace);
        config["metadata"]["labels"][TEST_LABEL] = json!(namespace);
        config["spec"]["auth"]["secretRef"]["namespace"] = json!(namespace);
        env.apply(&config);
        Self {
            namespace,
            operator: None,
        }
    }

    fn start_operator(&mut self) {
        self.operator = Some(Operator::start(&self.namespace, "5s"));
    }

    fn grant(&self, env: &Env, name: &str, key: &str, extra: Value) -> Value {
        let mut grant = env.grant(name, key, extra);
        grant["metadata"]["namespace"] = json!(self.namespace);
        grant["metadata"]["labels"][TEST_LABEL] = json!(self.namespace);
        grant["spec"]["providerConfigRef"]["name"] = json!(self.namespace);
        grant
    }

    fn get(&self, name: &str) -> Value {
        support::get_grant(&self.namespace, name)
    }

    fn reason(&self, name: &str) -> String {
        let object = self.get(name);
        object["status"]["conditions"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["type"] == "Ready"))
            .and_then(|c| c["reason"].as_str())
            .unwrap_or_default()
            .to_owned()
    }
}

fn delete(namespace: &str, name: &str) {
    kubectl_ok(
        &[
            "-n",
            namespace,
            "delete",
            "kmsgrant.kmsgrant.io",
            name,
            "--timeout=60s",
        ],
        None,
    );
}

fn grants_on(env: &Env, key: &str) -> Vec<kms_emulator::Grant> {
    env.emulator
        .admin()
        .dump()
        .grants
        .into_iter()
        .filter(|g| g.key_id == key)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn committed_then_5xx_create_leaves_exactly_one_grant() {
    let mut env = Env::new("commit5xx", EmulatorConfig::for_tests(), "5s").await;
    let key = env.new_key("commit5xx");
    let mut faults = FaultSettings::default();
    faults
        .error_after_commit
        .insert("create-grant".into(), 1.0 / 3.0);
    env.emulator.admin().set_faults(faults).unwrap();
    env.start_operator();
    let names: Vec<String> = (0..30).map(|i| format!("g{i}")).collect();
    for name in &names {
        env.apply(&env.grant(name, &key, json!({})));
    }
    for name in &names {
        env.wait_for(name, "condition=Ready", 120);
    }
    let answered_500 = env
        .emulator
        .admin()
        .calls(0)
        .iter()
        .filter(|c| c.operation == "create-grant" && c.status == 500)
        .count();
    assert!(
        answered_500 > 3,
        "only {answered_500} creates were answered 500 after committing"
    );
    let on_kms = grants_on(&env, &key);
    assert_eq!(on_kms.len(), 30, "one grant per object, no duplicate left");
    let owned: BTreeSet<String> = names.iter().map(|n| grant_id(&env.get(n))).collect();
    let present: BTreeSet<String> = on_kms.into_iter().map(|g| g.grant_id).collect();
    assert_eq!(owned, present);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_shards_never_touch_each_others_grants() {
    let mut env = Env::new("shard-a", EmulatorConfig::for_tests(), "5s").await;
    let key = env.new_key("shards");
    let mut b = Shard::new(&env, "shard-b", json!({}));
    env.start_operator();
    b.start_operator();
    env.apply(&env.grant("same", &key, json!({})));
    env.apply(&b.grant(&env, "same", &key, json!({})));
    env.wait_for("same", "condition=Ready", 60);
    eventually("b's grant Ready", Duration::from_secs(60), async || {
        b.reason("same") == "GrantReady"
    })
    .await;
    let (a_id, b_id) = (grant_id(&env.get("same")), grant_id(&b.get("same")));
    assert_ne!(a_id, b_id, "the shards share a grant");
    let names: BTreeSet<String> = grants_on(&env, &key)
        .into_iter()
        .filter_map(|g| g.name)
        .collect();
    assert_eq!(
        names,
        BTreeSet::from([
            format!("k8s/{CLUSTER}/{}/same", env.namespace),
            format!("k8s/{CLUSTER}/{}/same", b.namespace)
        ])
    );
    delete(&env.namespace, "same");
    let left: Vec<String> = grants_on(&env, &key)
        .into_iter()
        .map(|g| g.grant_id)
        .collect();
    assert_eq!(
        left,
        vec![b_id.clone()],
        "deleting a's object must leave b's grant"
    );
    // b's operator, resyncing, still owns its grant and adopted nothing.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(grant_id(&b.get("same")), b_id);
    assert_eq!(b.reason("same"), "GrantReady");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn identical_spec_in_another_namespace_cannot_adopt_or_revoke() {
    let mut env = Env::new("victim", EmulatorConfig::for_tests(), "5s").await;
    let key = env.new_key("tenants");
    // The attacker's namespace may even import: it still cannot take another object's grant.
    let mut b = Shard::new(&env, "attacker", json!({"importNamespaceSelector": {}}));
    env.start_operator();
    b.start_operator();
    env.apply(&env.grant("app", &key, json!({})));
    env.wait_for("app", "condition=Ready", 60);
    let victim = grant_id(&env.get("app"));

    // Spoofing the identity by name is refused by the API server: v1beta1 has no such field,
    // v1alpha1 refuses any value for it.
    let mut spoof = b.grant(&env, "spoof-name", &key, json!({}));
    spoof["spec"]["name"] = json!(format!("k8s/{CLUSTER}/{}/app", env.namespace));
    for (api_version, refusal) in [
        ("kmsgrant.io/v1beta1", "unknown field \"spec.name\""),
        ("kmsgrant.io/v1alpha1", "spec.name was removed"),
    ] {
        spoof["apiVersion"] = json!(api_version);
        let out = kubectl(&["apply", "-f", "-"], Some(&spoof.to_string()));
        assert!(
            !out.status.success(),
            "a manifest with spec.name was accepted at {api_version}"
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(refusal), "{stderr}");
    }

    // Importing the victim's grant by ID is Stalled, never adopted.
    env.apply(&b.grant(&env, "spoof-import", &key, json!({"importGrantId": victim})));
    // The identical spec under the same object name gets a grant of its own.
    env.apply(&b.grant(&env, "app", &key, json!({})));
    eventually("the import refused", Duration::from_secs(60), async || {
        b.reason("spoof-import") == "ImportRefused"
    })
    .await;
    eventually("b's own grant", Duration::from_secs(60), async || {
        b.reason("app") == "GrantReady"
    })
    .await;
    assert!(grant_id(&b.get("spoof-import")).is_empty());
    assert_ne!(grant_id(&b.get("app")), victim);

    delete(&b.namespace, "spoof-import");
    delete(&b.namespace, "app");
    let left: Vec<String> = grants_on(&env, &key)
        .into_iter()
        .map(|g| g.grant_id)
        .collect();
    assert_eq!(
        left,
        vec![victim.clone()],
        "the victim's grant must survive"
    );
    assert!(
        !env.emulator
            .admin()
            .calls(0)
            .iter()
            .any(|c| c.operation.ends_with("-grant")
                && c.operation != "create-grant"
                && c.operation != "list-grants"
                && c.grant_id.as_deref() == Some(victim.as_str())),
        "something revoked or retired the victim's grant"
    );
    env.wait_for("app", "condition=Ready", 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rebuilt_cluster_adopts_its_grants() {
    let mut env = Env::new("rebuilt", EmulatorConfig::for_tests(), "5s").await;
    let key = env.new_key("rebuilt");
    env.start_operator();
    let names: Vec<String> = (0..50).map(|i| format!("app-{i}")).collect();
    for name in &names {
        env.apply(&env.grant(name, &key, json!({})));
    }
    let mut before = Vec::new();
    for name in &names {
        env.wait_for(name, "condition=Ready", 120);
        before.push(grant_id(&env.get(name)));
    }
    // The cluster is lost: the operator stops, and every object disappears without cleanup (as an
    // etcd loss would). The grants stay on KMS.
    env.kill_operator();
    for name in &names {
        kubectl_ok(
            &[
                "-n",
                &env.namespace,
                "patch",
                "kmsgrants",
                name,
                "--type=merge",
                "-p",
                r#"{"metadata":{"finalizers":null}}"#,
            ],
            None,
        );
    }
    kubectl_ok(
        &[
            "-n",
            &env.namespace,
            "delete",
            "kmsgrants",
            "--all",
            "--wait",
        ],
        None,
    );
    assert_eq!(env.emulator.admin().grant_count(&key), Some(50));
    // A new cluster with the same cluster name: the same manifests are applied again (new UIDs,
    // no status), and a new operator starts.
    let creates_before = calls(&env, "create-grant");
    for name in &names {
        env.apply(&env.grant(name, &key, json!({})));
    }
    env.start_operator();
    let mut after = Vec::new();
    for name in &names {
        env.wait_for(name, "condition=Ready", 120);
        after.push(grant_id(&env.get(name)));
    }
    assert_eq!(
        calls(&env, "create-grant"),
        creates_before,
        "a grant was created again"
    );
    assert_eq!(after, before, "every object holds its old grant");
    assert_eq!(env.emulator.admin().grant_count(&key), Some(50));
    assert!(env.events().iter().any(|e| e["reason"] == "GrantAdopted"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn import_writes_manifests_that_adopt_without_creating() {
    let mut env = Env::new("import", EmulatorConfig::for_tests(), "5s").await;
    env.apply(&env.provider_config(json!({"importNamespaceSelector": {}})));
    let key = env.new_key("import");
    let kms = support::kms_client(&env);
    let mut hand_made = BTreeSet::new();
    for i in 0..3 {
        let grant = kmsgrant_kms::NewGrant {
            key_id: key.clone(),
            grantee_principal: format!("user{i}"),
            grantee_principal_type: kmsgrant::api::GranteePrincipalType::User,
            operations: vec![
                kmsgrant::api::Operation::DescribeKey,
                kmsgrant::api::Operation::EncryptDatakey,
            ],
            name: Some(format!("terraform-{i}")),
            retiring_principal: (i == 0).then(|| "retirer".to_owned()),
        };
        hand_made.insert(kms.create_grant(&grant).await.unwrap());
    }
    let out = std::process::Command::new(support::OPERATOR_BIN)
        .args(["import", "--key", &key, "--provider-config", &env.provider])
        .args(["--namespace", &env.namespace, "--allow-http-endpoints"])
        .args(["--kubeconfig", support::kubeconfig().to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "import failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let yaml = String::from_utf8(out.stdout).unwrap();
    assert_eq!(yaml.matches("kind: KmsGrant").count(), 3, "{yaml}");
    let creates_before = calls(&env, "create-grant");
    env.start_operator();
    kubectl_ok(&["apply", "-f", "-"], Some(&yaml));
    // The test operator watches labelled objects only.
    kubectl_ok(
        &[
            "-n",
            &env.namespace,
            "label",
            "kmsgrants",
            "--all",
            &format!("{TEST_LABEL}={}", env.namespace),
        ],
        None,
    );
    let list: Value = serde_json::from_str(&kubectl_ok(
        &["-n", &env.namespace, "get", "kmsgrants", "-o", "json"],
        None,
    ))
    .unwrap();
    let names: Vec<String> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["metadata"]["name"].as_str().unwrap().to_owned())
        .collect();
    let mut adopted = BTreeSet::new();
    for name in &names {
        env.wait_for(name, "condition=Ready", 60);
        adopted.insert(grant_id(&env.get(name)));
    }
    assert_eq!(adopted, hand_made);
    assert_eq!(
        calls(&env, "create-grant"),
        creates_before,
        "applying the import created a grant"
    );
    assert_eq!(env.emulator.admin().grant_count(&key), Some(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn import_of_another_objects_grant_is_refused() {
    let mut env = Env::new("import-refused", EmulatorConfig::for_tests(), "5s").await;
    env.apply(&env.provider_config(json!({"importNamespaceSelector": {}})));
    let key = env.new_key("refused");
    // A namespace the provider config does not allow to import.
    let mut closed = Shard::new(
        &env,
        "import-closed",
        json!({"importNamespaceSelector": {"matchLabels": {"import": "yes"}}}),
    );
    env.start_operator();
    closed.start_operator();
    env.apply(&env.grant("owner", &key, json!({})));
    env.wait_for("owner", "condition=Ready", 60);
    let owned = grant_id(&env.get("owner"));
    env.apply(&env.grant("thief", &key, json!({"importGrantId": owned})));
    env.wait_for(
        "thief",
        "jsonpath={.status.conditions[?(@.type==\"Stalled\")].reason}=ImportRefused",
        60,
    );
    let kms = support::kms_client(&env);
    let hand = kms
        .create_grant(&kmsgrant_kms::NewGrant {
            key_id: key.clone(),
            grantee_principal: "someone".into(),
            grantee_principal_type: kmsgrant::api::GranteePrincipalType::User,
            operations: vec![kmsgrant::api::Operation::DescribeKey],
            name: Some("by-hand".into()),
            retiring_principal: None,
        })
        .await
        .unwrap();
    env.apply(&closed.grant(&env, "importer", &key, json!({"importGrantId": hand})));
    eventually("ImportNotAllowed", Duration::from_secs(60), async || {
        closed.reason("importer") == "ImportNotAllowed"
    })
    .await;
    delete(&env.namespace, "thief");
    delete(&closed.namespace, "importer");
    let left: BTreeSet<String> = grants_on(&env, &key)
        .into_iter()
        .map(|g| g.grant_id)
        .collect();
    assert_eq!(left, BTreeSet::from([owned, hand]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn delete_after_provider_repoint_revokes_on_the_old_account_or_says_why() {
    let mut env = Env::new("repoint", EmulatorConfig::for_tests(), "5s").await;
    let key = env.new_key("repoint");
    let other = kms_emulator::Emulator::start(EmulatorConfig::for_tests())
        .await
        .unwrap();
    // The same key ID exists on the other account, so the repointed config keeps working.
    other
        .admin()
        .create_key(kms_emulator::NewKey {
            key_alias: "repoint".into(),
            key_id: Some(key.clone()),
            ..Default::default()
        })
        .unwrap();
    env.start_operator();
    env.apply(&env.grant("moved", &key, json!({})));
    env.wait_for("moved", "condition=Ready", 60);
    let first = grant_id(&env.get("moved"));

    // The provider config is pointed at another account (same credentials work there).
    env.apply(&env.provider_config(json!({
        "endpoint": other.base_url(), "iamEndpoint": other.base_url()
    })));
    env.wait_for(
        "moved",
        "jsonpath={.status.conditions[?(@.type==\"Ready\")].reason}=GrantAccountUnreachable",
        60,
    );
    assert_eq!(
        env.emulator.admin().grant_count(&key),
        Some(1),
        "the first grant stays until it can be revoked"
    );
    kubectl_ok(
        &[
            "-n",
            &env.namespace,
            "delete",
            "kmsgrants",
            "moved",
            "--wait=false",
        ],
        None,
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let object = env.get("moved");
    let message = object["status"]["conditions"][0]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        message.contains(&first) && message.contains("no Ready KmsProviderConfig"),
        "{message}"
    );

    // Another config reaching the first account lets deletion revoke there.
    let mut old_account = env.provider_config(json!({}));
    old_account["metadata"]["name"] = json!(format!("{}-old", env.provider));
    env.apply(&old_account);
    eventually("the object deleted", Duration::from_secs(60), async || {
        !kubectl(&["-n", &env.namespace, "get", "kmsgrants", "moved"], None)
            .status
            .success()
    })
    .await;
    assert_eq!(
        env.emulator.admin().grant_count(&key),
        Some(0),
        "the grant on the old account was not revoked"
    );
    assert_eq!(
        other.admin().grant_count(&key),
        Some(0),
        "the grant on the new account was not revoked"
    );
    other.shutdown().await;
}

/// Status is written whole by server-side apply: a field written during a replacement
/// (`supersededGrant`, on a key change) is gone once the replacement is done.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn key_change_revokes_on_the_old_key_and_clears_the_superseded_grant_from_status() {
    let mut env = Env::new("rekey", EmulatorConfig::for_tests(), "5s").await;
    let (old_key, new_key) = (env.new_key("old"), env.new_key("new"));
    env.start_operator();
    env.apply(&env.grant("rekeyed", &old_key, json!({})));
    env.wait_for("rekeyed", "condition=Ready", 60);
    let old = grant_id(&env.get("rekeyed"));
    env.apply(&env.grant("rekeyed", &new_key, json!({})));
    eventually(
        "the grant on the new key",
        Duration::from_secs(30),
        async || {
            let object = env.get("rekeyed");
            object["status"]["keyId"] == new_key.as_str()
                && object["status"]["observedGeneration"] == 2
                && object["status"].get("supersededGrant").is_none()
        },
    )
    .await;
    env.wait_for("rekeyed", "condition=Ready", 30);
    assert_eq!(env.emulator.admin().grant_count(&old_key), Some(0));
    assert_eq!(env.emulator.admin().grant_count(&new_key), Some(1));
    // The superseded grant was recorded on the way (so a crash could not leak it) and then
    // removed by omission, which only server-side apply does.
    let revoked_old = env
        .emulator
        .admin()
        .calls(0)
        .iter()
        .any(|c| c.operation == "revoke-grant" && c.grant_id.as_deref() == Some(old.as_str()));
    assert!(revoked_old, "the grant on the old key was not revoked");
    let object: Value = serde_json::from_str(&kubectl_ok(
        &[
            "-n",
            &env.namespace,
            "get",
            "kmsgrants",
            "rekeyed",
            "-o",
            "json",
            "--show-managed-fields",
        ],
        None,
    ))
    .unwrap();
    let managers: Vec<&str> = object["metadata"]["managedFields"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["subresource"] == "status")
        .map(|m| m["manager"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(managers, vec!["kmsgrant-operator"], "one status writer");
    assert_eq!(
        object["metadata"]["managedFields"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["subresource"] == "status")
            .unwrap()["operation"],
        "Apply"
    );
}

/// A second live cluster: its own control plane (torn down when this is dropped, also when a
/// test fails, and by `--owner-pid` if the test process dies), with the CRDs, `env`'s namespace,
/// credentials and provider config, and an operator of its own on `env`'s emulator.
struct SecondCluster {
    dir: std::path::PathBuf,
    kubeconfig: std::path::PathBuf,
    operator: Option<Operator>,
}

impl SecondCluster {
    fn up(env: &Env, tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "kmsgrant-second-cluster-{tag}-{}",
            std::process::id()
        ));
        let up = std::process::Command::new(
            std::path::Path::new(support::REPO).join("scripts/control-plane"),
        )
        .arg("up")
        .arg(&dir)
        .args(["--owner-pid", &std::process::id().to_string()])
        .output()
        .unwrap();
        assert!(
            up.status.success(),
            "{}",
            String::from_utf8_lossy(&up.stderr)
        );
        let cluster = Self {
            kubeconfig: dir.join("kubeconfig"),
            dir,
            operator: None,
        };
        let crds = std::process::Command::new(support::OPERATOR_BIN)
            .arg("crd")
            .output()
            .unwrap();
        cluster.at(
            &["apply", "--server-side", "-f", "-"],
            Some(&String::from_utf8(crds.stdout).unwrap()),
        );
        cluster.at(
            &[
                "wait",
                "--for=condition=Established",
                "--timeout=60s",
                "crd/kmsgrants.kmsgrant.io",
                "crd/kmsproviderconfigs.kmsgrant.io",
                "crd/kmskeypolicies.kmsgrant.io",
            ],
            None,
        );
        cluster.at(&["create", "namespace", &env.namespace], None);
        let secret = json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "kms-credentials", "namespace": env.namespace},
            "stringData": {
                "accessKey": env.emulator.config().access_key,
                "secretKey": env.emulator.config().secret_key.as_str()
            }
        });
        cluster.apply(&secret);
        cluster.apply(&env.provider_config(json!({})));
        cluster
    }

    /// kubectl against this cluster.
    fn at(&self, args: &[&str], stdin: Option<&str>) -> String {
        let mut full = vec!["--kubeconfig", self.kubeconfig.to_str().unwrap()];
        full.extend_from_slice(args);
        kubectl_ok(&full, stdin)
    }

    fn apply(&self, manifest: &Value) {
        self.at(&["apply", "-f", "-"], Some(&manifest.to_string()));
    }

    fn start_operator(&mut self, namespace: &str, extra: &[&str]) {
        let mut flags = vec!["--kubeconfig", self.kubeconfig.to_str().unwrap()];
        flags.extend_from_slice(extra);
        self.operator = Some(Operator::start_with(namespace, "5s", &flags));
    }

    fn get(&self, namespace: &str, name: &str) -> Value {
        serde_json::from_str(&self.at(
            &["-n", namespace, "get", "kmsgrants", name, "-o", "json"],
            None,
        ))
        .unwrap()
    }
}

impl Drop for SecondCluster {
    fn drop(&mut self) {
        if let Some(mut operator) = self.operator.take() {
            operator.kill();
        }
        let _ = std::process::Command::new(
            std::path::Path::new(support::REPO).join("scripts/control-plane"),
        )
        .arg("down")
        .arg(&self.dir)
        .output();
    }
}

/// Two clusters, each with the operator's default cluster name (its kube-system UID), the same
/// namespace and object names, on one key: two grants, and deleting one leaves the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_clusters_on_one_key_with_defaults_stay_apart() {
    let mut env = Env::new("clusters", EmulatorConfig::for_tests(), "5s").await;
    let key = env.new_key("clusters");
    env.start_operator_with(&["--cluster-name="]);
    env.apply(&env.grant("app", &key, json!({})));

    // A second cluster: its own control plane, the same namespace, provider and manifest.
    let mut second = SecondCluster::up(&env, "defaults");
    second.apply(&env.grant("app", &key, json!({})));
    second.start_operator(&env.namespace, &["--cluster-name="]);
    env.wait_for("app", "condition=Ready", 60);
    second.at(
        &[
            "-n",
            &env.namespace,
            "wait",
            "--for=condition=Ready",
            "--timeout=60s",
            "kmsgrants/app",
        ],
        None,
    );
    let here = grant_id(&env.get("app"));
    let there = grant_id(&second.get(&env.namespace, "app"));
    assert_ne!(here, there, "two clusters share one grant");
    let names: BTreeSet<String> = grants_on(&env, &key)
        .into_iter()
        .filter_map(|g| g.name)
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    let uid = |config: &std::path::Path| {
        kubectl_ok(
            &[
                "--kubeconfig",
                config.to_str().unwrap(),
                "get",
                "namespace",
                "kube-system",
                "-o",
                "jsonpath={.metadata.uid}",
            ],
            None,
        )
    };
    assert!(names.contains(&format!(
        "k8s/{}/{}/app",
        uid(support::kubeconfig()),
        env.namespace
    )));
    assert!(names.contains(&format!(
        "k8s/{}/{}/app",
        uid(&second.kubeconfig),
        env.namespace
    )));

    second.at(
        &[
            "-n",
            &env.namespace,
            "delete",
            "kmsgrants",
            "app",
            "--timeout=60s",
        ],
        None,
    );
    let left: Vec<String> = grants_on(&env, &key)
        .into_iter()
        .map(|g| g.grant_id)
        .collect();
    assert_eq!(
        left,
        vec![here],
        "deleting in one cluster must leave the other's grant"
    );
}

/// Two live clusters started with the SAME `--cluster-name` (a copy-pasted `clusterName`), one
/// account, one key, the same namespace and object name; each cluster's object names its own
/// principal (one per region), so each takes the other's grant for a replaced one of its own.
/// Before the fix they replaced each other's grant at every resync. Now the one revoke each
/// makes is the signature: neither revokes again, the first cluster keeps a grant that stays,
/// both objects say `ClusterNameInUse`, and each operator counts the conflict once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_live_clusters_with_one_name_stop_revoking_each_others_grants_and_say_so() {
    let mut env = Env::new("samename", EmulatorConfig::for_tests(), "5s").await;
    let key = env.new_key("samename");
    let (port_a, port_b) = (support::free_port(), support::free_port());
    let admin_a = format!("--admin-address=127.0.0.1:{port_a}");
    let admin_b = format!("--admin-address=127.0.0.1:{port_b}");
    env.start_operator_with(&[&admin_a]);
    env.apply(&env.grant("app", &key, json!({})));
    env.wait_for("app", "condition=Ready", 60);
    let first = grant_id(&env.get("app"));

    let mut second = SecondCluster::up(&env, "samename");
    let mark = support::last_seq(&env);
    second.apply(&env.grant(
        "app",
        &key,
        json!({"granteePrincipal": "2b8d0c1e5f7a4c3e9d6b1a0f4e2c8d7b"}),
    ));
    second.start_operator(&env.namespace, &[&admin_b]);

    let reason_of = |object: &Value| {
        object["status"]["conditions"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["status"] == "True"))
            .and_then(|c| c["reason"].as_str())
            .unwrap_or_default()
            .to_owned()
    };
    let both_say_so = || {
        reason_of(&env.get("app")) == "ClusterNameInUse"
            && reason_of(&second.get(&env.namespace, "app")) == "ClusterNameInUse"
    };
    eventually(
        "both objects report ClusterNameInUse",
        Duration::from_secs(90),
        async || both_say_so(),
    )
    .await;
    let settled = support::last_seq(&env);
    let kept_here = grant_id(&env.get("app"));
    let kept_there = grant_id(&second.get(&env.namespace, "app"));
    // Four resyncs of each operator after detection.
    tokio::time::sleep(Duration::from_secs(20)).await;

    let name = identity(&env, "app");
    let calls = env.emulator.admin().calls(mark);
    let creates: Vec<&str> = calls
        .iter()
        .filter(|c| c.operation == "create-grant" && c.grant_name.as_deref() == Some(name.as_str()))
        .filter_map(|c| c.grant_id.as_deref())
        .collect();
    let revokes: Vec<&str> = calls
        .iter()
        .filter(|c| c.operation == "revoke-grant" && c.status == 200)
        .filter_map(|c| c.grant_id.as_deref())
        .collect();
    let left: BTreeSet<String> = grants_named(&env, "app")
        .into_iter()
        .map(|g| g.grant_id)
        .collect();
    eprintln!(
        "first cluster's grant at first {first}, kept {kept_here}; second's {kept_there}; creates: {creates:?}; revokes: {revokes:?}; grants now: {left:?}"
    );
    assert!(
        !env.emulator
            .admin()
            .calls(settled)
            .iter()
            .any(|c| c.operation == "revoke-grant" || c.operation == "create-grant"),
        "nothing is revoked or created once both detected the conflict"
    );
    assert!(
        revokes.len() <= 2,
        "at most the one revoke per cluster that shows a second writer: {revokes:?}"
    );
    assert!(both_say_so(), "the condition stays");
    assert_eq!(grant_id(&env.get("app")), kept_here);
    assert_eq!(
        left,
        BTreeSet::from([kept_here.clone(), kept_there.clone()]),
        "each cluster keeps its own grant and leaves the other's"
    );
    for (port, cluster) in [(port_a, "first"), (port_b, "second")] {
        let text = support::metrics(port).await;
        assert_eq!(
            support::series(&text, "kmsgrant_cluster_name_conflicts_total"),
            Some(1.0),
            "the {cluster} cluster counts the conflict once: {text}"
        );
    }
    let events = env.events();
    assert!(
        events.iter().any(|e| e["reason"] == "ClusterNameInUse"
            && e["type"] == "Warning"
            && e["message"]
                .as_str()
                .is_some_and(|m| m.contains(&kept_there) && m.contains("--cluster-name"))),
        "a Warning event names the other cluster's grant and the fix: {events:?}"
    );

    // The second cluster goes away: its object is deleted, and its operator revokes only its
    // own grant; the first cluster's condition clears at its next resync.
    second.at(
        &[
            "-n",
            &env.namespace,
            "delete",
            "kmsgrants",
            "app",
            "--timeout=60s",
        ],
        None,
    );
    assert_eq!(
        grants_named(&env, "app")
            .into_iter()
            .map(|g| g.grant_id)
            .collect::<Vec<_>>(),
        vec![kept_here.clone()],
        "deleting in the second cluster leaves the first cluster's grant"
    );
    env.wait_for("app", "condition=Ready", 30);
    assert_eq!(grant_id(&env.get("app")), kept_here);
}

fn unix_ms(timestamp: &str) -> u64 {
    let at: jiff::Timestamp = timestamp.parse().unwrap();
    u64::try_from(at.as_millisecond()).unwrap()
}

/// The lease as the API server has it; null until the first replica has created it (on a busy
/// machine the first look can come before that).
fn lease(namespace: &str) -> Value {
    let out = kubectl(
        &[
            "-n",
            namespace,
            "get",
            "lease",
            "kmsgrant-test",
            "-o",
            "json",
        ],
        None,
    );
    if !out.status.success() {
        return Value::Null;
    }
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

/// The leader loses the API server (a proxy stalls) but still reaches KMS, where grants keep
/// being revoked out of band. Its fence closes a renew deadline after its last renew, before a
/// standby can take over: in the emulator's call log, no write lands between the old leader's
/// fence and the new leader's acquireTime, and the new leader then repairs the grant.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stalled_leader_stops_writing_before_the_new_leader_starts() {
    let env = Env::new("stalled", EmulatorConfig::for_tests(), "2s").await;
    let key = env.new_key("stalled");
    let proxy = StallingProxy::start().await;
    let proxied = proxy.kubeconfig(&env.namespace);
    let election = [
        "--leader-election",
        "--lease-name",
        "kmsgrant-test",
        "--lease-namespace",
        &env.namespace,
        "--lease-duration",
        "6s",
    ];
    let mut flags = election.to_vec();
    flags.extend(["--kubeconfig", proxied.to_str().unwrap()]);
    let mut old_leader = Operator::start_with(&env.namespace, "2s", &flags);
    eventually(
        "the first replica leads",
        Duration::from_secs(30),
        async || lease(&env.namespace)["spec"]["holderIdentity"].is_string(),
    )
    .await;
    let old_identity = lease(&env.namespace)["spec"]["holderIdentity"].clone();
    let mut standby = Operator::start_with(&env.namespace, "2s", &election);
    env.apply(&env.grant("g", &key, json!({})));
    env.wait_for("g", "condition=Ready", 60);

    proxy.stall();
    let stalled_at = Instant::now();
    // The old leader's last renew, read past the proxy.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let last_renew = unix_ms(lease(&env.namespace)["spec"]["renewTime"].as_str().unwrap());
    // Keep giving both replicas a reason to write: the grant vanishes again and again.
    let mut taken_over = None;
    while stalled_at.elapsed() < Duration::from_secs(40) {
        for grant in grants_on(&env, &key) {
            env.emulator.admin().revoke_out_of_band(&grant.grant_id);
        }
        let current = lease(&env.namespace);
        if taken_over.is_none() && current["spec"]["holderIdentity"] != old_identity {
            taken_over = Some(unix_ms(current["spec"]["acquireTime"].as_str().unwrap()));
        }
        if let Some(at) = taken_over
            && env
                .emulator
                .admin()
                .calls(0)
                .iter()
                .any(|c| c.operation == "create-grant" && c.status == 200 && c.at_ms > at + 2000)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let taken_over = taken_over.expect("the standby never took over");
    // Fence: writes start only within 2/3 of the 6 s lease after the last renew began.
    let fence = last_renew + 4000;
    let writes: Vec<u64> = env
        .emulator
        .admin()
        .calls(0)
        .iter()
        .filter(|c| {
            matches!(
                c.operation.as_str(),
                "create-grant" | "revoke-grant" | "retire-grant"
            )
        })
        .map(|c| c.at_ms)
        .collect();
    let in_between: Vec<&u64> = writes
        .iter()
        .filter(|&&at| at > fence + 250 && at < taken_over)
        .collect();
    eprintln!(
        "last renew {last_renew}, fence {fence} (+{} ms), takeover {taken_over} (+{} ms), writes after the stall: {:?}",
        fence - last_renew,
        taken_over - last_renew,
        writes
            .iter()
            .filter(|&&at| at > last_renew)
            .map(|at| at - last_renew)
            .collect::<Vec<_>>()
    );
    assert!(
        in_between.is_empty(),
        "writes landed after the old leader's fence ({fence}) and before the takeover ({taken_over}): {in_between:?}"
    );
    assert!(
        fence < taken_over,
        "the standby took over before the old leader's fence closed"
    );
    assert!(
        writes.iter().any(|&at| at >= taken_over),
        "the new leader never repaired the grant"
    );
    // The old leader gave up on its own.
    let status = {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = old_leader.try_wait() {
                break status;
            }
            assert!(Instant::now() < deadline, "the stalled leader kept running");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    assert!(
        !status.success(),
        "the stalled leader should exit with an error"
    );
    standby.kill();
}

fn identity(env: &Env, name: &str) -> String {
    format!("k8s/{CLUSTER}/{}/{name}", env.namespace)
}

/// Every grant on the emulator named for `name`'s identity.
fn grants_named(env: &Env, name: &str) -> Vec<kms_emulator::Grant> {
    let identity = identity(env, name);
    env.emulator
        .admin()
        .dump()
        .grants
        .into_iter()
        .filter(|g| g.name.as_deref() == Some(identity.as_str()))
        .collect()
}

/// Creates a grant on `key` named for `name`'s identity, behind the operator's back.
async fn named_by_hand(env: &Env, key: &str, name: &str) -> String {
    let kms = support::kms_client(env);
    support::grant_by_hand(
        &kms,
        key,
        "13gg44z4g2sglzk0egw0u726zoyzvrs8",
        Some(&identity(env, name)),
    )
    .await
}

fn faults_losing_creates_and_lists() -> FaultSettings {
    let mut faults = FaultSettings::default();
    faults.drop_after_commit.insert("create-grant".into(), 1.0);
    faults.errors.insert(
        "list-grants".into(),
        kms_emulator::ErrorInjection {
            rate: 1.0,
            error: kms_emulator::InjectedError::Unavailable,
        },
    );
    faults
}

/// Waits until a `create-grant` for `name` on `key` committed and its answer was dropped.
async fn wait_for_lost_create(env: &Env, name: &str, key: &str) {
    let identity = identity(env, name);
    eventually(
        &format!("a create for {name} on {key} whose answer is lost"),
        Duration::from_secs(60),
        async || {
            env.emulator.admin().calls(0).iter().any(|c| {
                c.operation == "create-grant"
                    && c.dropped
                    && c.key_id.as_deref() == Some(key)
                    && c.grant_name.as_deref() == Some(identity.as_str())
            })
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_duplicate_made_behind_the_operators_back_is_revoked_within_a_resync_keeping_the_recorded_grant()
 {
    const RESYNC: Duration = Duration::from_secs(5);
    let mut env = Env::new("dup", EmulatorConfig::for_tests(), "5s").await;
    let (key, other_key) = (env.new_key("dup-a"), env.new_key("dup-b"));
    env.start_operator();
    env.apply(&env.grant("x", &key, json!({})));
    env.apply(&env.grant("y", &other_key, json!({})));
    env.wait_for("x", "condition=Ready", 60);
    env.wait_for("y", "condition=Ready", 60);
    let recorded = grant_id(&env.get("x"));

    // A second grant with x's identity on its own key, and one on a key x does not name.
    let same_key = named_by_hand(&env, &key, "x").await;
    let other_key_grant = named_by_hand(&env, &other_key, "x").await;
    let mark = support::last_seq(&env);
    // A reader's fresh walk of x's key (an import the snapshot lacks) puts the duplicate into
    // the key's snapshot before any drift pass lists it.
    let kms = support::kms_client(&env);
    let hand = support::grant_by_hand(&kms, &key, "importee", Some("made-by-hand")).await;
    let mut import = env.grant("imp", &key, json!({"importGrantId": hand}));
    import["spec"]["granteePrincipal"] = json!("importee");
    import["spec"]["operations"] = json!(["describe-key", "decrypt-datakey"]);
    env.apply(&import);

    eventually("x's duplicates revoked", RESYNC * 4, async || {
        grants_named(&env, "x").len() == 1
    })
    .await;
    let left = grants_named(&env, "x");
    assert_eq!(
        left[0].grant_id, recorded,
        "the recorded grant is the one kept"
    );
    assert_eq!(grant_id(&env.get("x")), recorded);
    let after = env.emulator.admin().calls(mark);
    let revoked: BTreeSet<&str> = after
        .iter()
        .filter(|c| c.operation == "revoke-grant" && c.status == 200)
        .filter_map(|c| c.grant_id.as_deref())
        .collect();
    assert!(
        revoked.contains(same_key.as_str()) && revoked.contains(other_key_grant.as_str()),
        "both duplicates revoked by the operator: {revoked:?}"
    );
    let x_identity = identity(&env, "x");
    assert!(
        !after.iter().any(|c| c.operation == "create-grant"
            && c.grant_name.as_deref() == Some(x_identity.as_str())),
        "nothing was created for x"
    );
    assert_eq!(grants_named(&env, "y").len(), 1, "y's grant untouched");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_grant_whose_create_answer_was_lost_before_a_key_change_is_revoked_alive_or_deleted() {
    let mut env = Env::new("lostkey", EmulatorConfig::for_tests(), "5s").await;
    let keys: Vec<String> = (0..4)
        .map(|i| env.new_key(&format!("lostkey-{i}")))
        .collect();
    env.start_operator();
    // x lives on, z is deleted; w and v keep keys[1] and keys[3] in use (listed by the drift
    // pass, and fresh in the operator's cache so that a create there needs no list).
    for (name, key) in [
        ("x", &keys[0]),
        ("z", &keys[0]),
        ("w", &keys[1]),
        ("v", &keys[3]),
    ] {
        env.apply(&env.grant(name, key, json!({})));
    }
    for name in ["x", "z", "w", "v"] {
        env.wait_for(name, "condition=Ready", 60);
    }

    // x moves to keys[1], z to keys[3]; each create commits but its answer is lost and no list
    // can tell (list-grants fails), so status still records the grant on keys[0]. Then both
    // move on to keys[2] before any listing saw the lost grants.
    env.emulator
        .admin()
        .set_faults(faults_losing_creates_and_lists())
        .unwrap();
    let moves = [("x", &keys[1]), ("z", &keys[3])];
    for (name, key) in moves {
        env.apply(&env.grant(name, key, json!({})));
    }
    for (name, key) in moves {
        wait_for_lost_create(&env, name, key).await;
    }
    for (name, _) in moves {
        env.apply(&env.grant(name, &keys[2], json!({})));
    }
    // Faults stay until the operator has worked on the new spec (and failed to list keys[2]),
    // so that no pass with the old spec lists the lost grant first.
    for (name, _) in moves {
        eventually(
            &format!("{name}'s new spec observed"),
            Duration::from_secs(60),
            async || {
                let object = env.get(name);
                object["status"]["observedGeneration"] == object["metadata"]["generation"]
            },
        )
        .await;
    }
    env.emulator
        .admin()
        .set_faults(FaultSettings::default())
        .unwrap();
    // z goes, maybe before a drift pass has seen its grant on keys[3]: its cleanup finds it
    // there anyway (the key's snapshot was made uncertain by the lost answer).
    delete(&env.namespace, "z");
    assert_eq!(
        grants_named(&env, "z"),
        vec![],
        "deleting z left a grant of it behind"
    );

    env.wait_for("x", "condition=Ready", 60);
    eventually(
        "x holds exactly one grant, on the key it names",
        Duration::from_secs(30),
        async || {
            let held = grants_named(&env, "x");
            held.len() == 1 && held[0].key_id == keys[2]
        },
    )
    .await;
    assert_eq!(grant_id(&env.get("x")), grants_named(&env, "x")[0].grant_id);
    for name in ["w", "v"] {
        assert_eq!(
            grants_named(&env, name).len(),
            1,
            "{name}'s grant untouched"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_leader_deleting_an_object_finds_its_grant_on_a_key_it_has_not_listed_yet() {
    // No drift pass within the test: only the cleanup itself can find the grant.
    let mut env = Env::new("newleader", EmulatorConfig::for_tests(), "120s").await;
    let keys: Vec<String> = (0..3)
        .map(|i| env.new_key(&format!("newleader-{i}")))
        .collect();
    env.start_operator();
    env.apply(&env.grant("x", &keys[0], json!({})));
    env.apply(&env.grant("w", &keys[1], json!({})));
    env.wait_for("x", "condition=Ready", 60);
    env.wait_for("w", "condition=Ready", 60);
    // The leader creates a grant for x on keys[1] and dies before recording it; meanwhile x
    // moves to keys[2] and is deleted.
    env.kill_operator();
    let stray = named_by_hand(&env, &keys[1], "x").await;
    env.apply(&env.grant("x", &keys[2], json!({})));
    kubectl_ok(
        &[
            "-n",
            &env.namespace,
            "delete",
            "kmsgrant.kmsgrant.io",
            "x",
            "--wait=false",
        ],
        None,
    );
    env.start_operator();
    eventually("x deleted", Duration::from_secs(60), async || {
        kubectl(
            &["-n", &env.namespace, "get", "kmsgrant.kmsgrant.io", "x"],
            None,
        )
        .status
        .code()
            == Some(1)
    })
    .await;
    assert_eq!(grants_named(&env, "x"), vec![], "x left {stray} behind");
    assert_eq!(grants_named(&env, "w").len(), 1, "w's grant untouched");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_second_key_change_before_the_first_old_grant_was_revoked_leaves_one_grant() {
    // No drift pass within the test: the reconcile alone must keep track of both old grants.
    let mut env = Env::new("twomoves", EmulatorConfig::for_tests(), "120s").await;
    let keys: Vec<String> = (0..3)
        .map(|i| env.new_key(&format!("twomoves-{i}")))
        .collect();
    env.start_operator();
    env.apply(&env.grant("x", &keys[0], json!({})));
    env.wait_for("x", "condition=Ready", 60);
    // Revokes fail for a while: the move to keys[1] creates there and records the grant on
    // keys[0] as superseded, which cannot go yet; then x moves on to keys[2].
    let mut faults = FaultSettings::default();
    faults.errors.insert(
        "revoke-grant".into(),
        kms_emulator::ErrorInjection {
            rate: 1.0,
            error: kms_emulator::InjectedError::Unavailable,
        },
    );
    env.emulator.admin().set_faults(faults).unwrap();
    env.apply(&env.grant("x", &keys[1], json!({})));
    eventually(
        "x's grant on keys[1] recorded, the old one superseded",
        Duration::from_secs(60),
        async || {
            let status = env.get("x")["status"].clone();
            status["keyId"] == json!(keys[1])
                && status["supersededGrant"]["keyId"] == json!(keys[0])
        },
    )
    .await;
    env.apply(&env.grant("x", &keys[2], json!({})));
    eventually(
        "x's move to keys[2] observed",
        Duration::from_secs(60),
        async || {
            let object = env.get("x");
            object["status"]["observedGeneration"] == object["metadata"]["generation"]
        },
    )
    .await;
    env.emulator
        .admin()
        .set_faults(FaultSettings::default())
        .unwrap();
    eventually(
        "x holds exactly one grant, on keys[2]",
        Duration::from_secs(60),
        async || {
            let held = grants_named(&env, "x");
            held.len() == 1 && held[0].key_id == keys[2]
        },
    )
    .await;
    env.wait_for("x", "condition=Ready", 60);
    assert_eq!(env.get("x")["status"]["supersededGrant"], Value::Null);
}

/// The reason of an object's condition `type_`, or "" when absent.
fn condition_reason(object: &Value, type_: &str) -> String {
    object["status"]["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == type_))
        .and_then(|c| c["reason"].as_str())
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_account_listing_grants_without_names_holds_adoption_and_revokes_back_loudly() {
    let mut env = Env::new("no-names", EmulatorConfig::for_tests(), "2s").await;
    let key = env.new_key("no-names");
    // Another cluster's grant, which exclusive mode keeps while names say whose it is.
    let kms = support::kms_client(&env);
    let theirs = support::grant_by_hand(
        &kms,
        &key,
        "0d0466b00d0466b00d0466b0",
        Some("k8s/another-cluster/team-a/app"),
    )
    .await;
    let policy_name = env.namespace.clone();
    env.apply(&json!({
        "apiVersion": "kmsgrant.io/v1beta1", "kind": "KmsKeyPolicy",
        "metadata": {"name": policy_name, "labels": {TEST_LABEL: env.namespace}},
        "spec": {"providerConfigRef": {"name": env.provider}, "keyId": key,
                 "undeclaredGrants": "Revoke"}
    }));
    let policy = || -> Value {
        serde_json::from_str(&kubectl_ok(
            &[
                "get",
                "kmskeypolicies.kmsgrant.io",
                &policy_name,
                "-o",
                "json",
            ],
            None,
        ))
        .unwrap()
    };
    env.start_operator();
    env.apply(&env.grant("kept", &key, json!({})));
    env.apply(&env.grant("deleted", &key, json!({})));
    env.wait_for("kept", "condition=Ready", 60);
    env.wait_for("deleted", "condition=Ready", 60);
    eventually(
        "the policy keeps the other cluster's grant",
        Duration::from_secs(60),
        async || {
            policy()["status"]["grants"]
                .as_array()
                .is_some_and(|g| g.iter().any(|g| g["action"] == "KeptOtherCluster"))
        },
    )
    .await;
    let deleted_id = grant_id(&env.get("deleted"));
    let before = support::last_seq(&env);

    env.emulator
        .admin()
        .set_faults(FaultSettings {
            omit_grant_names: true,
            ..Default::default()
        })
        .unwrap();
    let stalled =
        r#"jsonpath={.status.conditions[?(@.type=="Stalled")].reason}=GrantNamesNotReturned"#;
    env.wait_for("kept", stalled, 60);
    env.wait_for("deleted", stalled, 60);
    let message = env.get("kept")["status"]["conditions"][0]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(message.contains("kmsgrant-operator live-test"), "{message}");
    assert!(
        env.events()
            .iter()
            .any(|e| e["reason"] == "GrantNamesNotReturned"
                && e["type"] == "Warning"
                && e["involvedObject"]["name"] == "kept"),
        "a Warning event on the object"
    );
    eventually(
        "the policy says why it revokes nothing",
        Duration::from_secs(30),
        async || condition_reason(&policy(), "Stalled") == "GrantNamesNotReturned",
    )
    .await;
    kubectl_ok(
        &[
            "-n",
            &env.namespace,
            "delete",
            "kmsgrant",
            "deleted",
            "--wait=false",
        ],
        None,
    );
    // Several drift passes: nothing is created, adopted, revoked or retired, deletion waits.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let writes: Vec<String> = env
        .emulator
        .admin()
        .calls(before)
        .into_iter()
        .filter(|c| {
            matches!(
                c.operation.as_str(),
                "create-grant" | "revoke-grant" | "retire-grant"
            )
        })
        .map(|c| format!("{} {:?}", c.operation, c.grant_id))
        .collect();
    assert!(writes.is_empty(), "no KMS write without names: {writes:?}");
    assert_eq!(env.emulator.admin().grant_count(&key), Some(3));
    let waiting = env.get("deleted");
    assert!(waiting["metadata"]["deletionTimestamp"].is_string());
    assert_eq!(
        condition_reason(&waiting, "Stalled"),
        "GrantNamesNotReturned",
        "{waiting:#}"
    );

    // Names come back: the object is Ready again without a new grant, the deletion revokes
    // its grant, and the other cluster's grant stays.
    env.emulator
        .admin()
        .set_faults(FaultSettings::default())
        .unwrap();
    env.wait_for("kept", "condition=Ready", 60);
    env.wait_for("deleted", "delete", 60);
    eventually(
        "the policy is Ready again",
        Duration::from_secs(30),
        async || {
            policy()["status"]["conditions"]
                .as_array()
                .is_some_and(|c| {
                    c.iter()
                        .any(|c| c["type"] == "Ready" && c["status"] == "True")
                })
        },
    )
    .await;
    let writes: Vec<(String, Option<String>)> = env
        .emulator
        .admin()
        .calls(before)
        .into_iter()
        .filter(|c| {
            matches!(
                c.operation.as_str(),
                "create-grant" | "revoke-grant" | "retire-grant"
            )
        })
        .map(|c| (c.operation, c.grant_id))
        .collect();
    assert_eq!(
        writes,
        [("revoke-grant".to_owned(), Some(deleted_id))],
        "one revoke, the deleted object's"
    );
    let mut left: Vec<String> = env
        .emulator
        .admin()
        .dump()
        .grants
        .into_iter()
        .map(|g| g.grant_id)
        .collect();
    left.sort();
    let mut expected = vec![grant_id(&env.get("kept")), theirs];
    expected.sort();
    assert_eq!(left, expected);
    kubectl_ok(
        &["delete", "kmskeypolicies.kmsgrant.io", &policy_name],
        None,
    );
}
