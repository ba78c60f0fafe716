//! The graduation from `kmsgrant.io/v1alpha1` to `v1beta1` on a real API server, stage by stage
//! (docs/versioning.md): only v1alpha1 (the CRDs of commit 84dffa1) -> both served -> v1beta1
//! stored and migrated by the operator -> v1alpha1 no longer served -> removed. Objects made at
//! each stage survive every step with no grant created or revoked on the emulator beyond their
//! first; a rollback from the second stage to the first works; kubectl warns at v1alpha1; a GitOps
//! field manager still owns its fields after the migration; and a `helm upgrade` from the chart of
//! 84dffa1 brings the new CRDs without touching an object.
//!
//! Each test changes the CRDs, so each has a control plane of its own.

mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use kms_emulator::EmulatorConfig;
use serde_json::{Value, json};
use support::{OPERATOR_BIN, REPO, eventually, free_port, kubectl, kubectl_ok};

const CRDS: [&str; 3] = [
    "kmsgrants.kmsgrant.io",
    "kmsproviderconfigs.kmsgrant.io",
    "kmskeypolicies.kmsgrant.io",
];
const PRINCIPAL: &str = "13gg44z4g2sglzk0egw0u726zoyzvrs8";

/// The CRDs of 84dffa1, the last main that knew only v1alpha1.
fn v1alpha1_only_crds() -> String {
    CRDS.iter()
        .map(|crd| {
            std::fs::read_to_string(
                Path::new(REPO).join(format!("tests/fixtures/v1alpha1-crds/{crd}.yaml")),
            )
            .unwrap()
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

/// The CRDs of one stage, as `kmsgrant-operator crd --api-stage STAGE` prints them.
fn crds_at(stage: &str) -> String {
    let out = Command::new(OPERATOR_BIN)
        .args(["crd", "--api-stage", stage])
        .output()
        .unwrap();
    assert!(out.status.success(), "crd --api-stage {stage} failed");
    String::from_utf8(out.stdout).unwrap()
}

/// Applies CRDs as an upgrade would (server-side, the chart's field manager), returning kubectl's
/// output so a refusal can be inspected.
fn apply_crds(yaml: &str) -> std::process::Output {
    kubectl(
        &[
            "apply",
            "--server-side",
            "--force-conflicts",
            "--field-manager=helm",
            "-f",
            "-",
        ],
        Some(yaml),
    )
}

fn apply_crds_ok(yaml: &str) {
    let out = apply_crds(yaml);
    assert!(
        out.status.success(),
        "applying CRDs failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut args = vec!["wait", "--for=condition=Established", "--timeout=60s"];
    let names: Vec<String> = CRDS.iter().map(|c| format!("crd/{c}")).collect();
    args.extend(names.iter().map(String::as_str));
    kubectl_ok(&args, None);
    // Discovery must show the new versions before kubectl is asked for them.
    std::thread::sleep(Duration::from_secs(2));
}

fn stored_versions(crd: &str) -> Vec<String> {
    let text = kubectl_ok(
        &["get", "crd", crd, "-o", "jsonpath={.status.storedVersions}"],
        None,
    );
    serde_json::from_str(&text).unwrap_or_default()
}

/// Every object of the three kinds at `version`, as JSON.
fn all_objects(version: &str) -> Vec<Value> {
    let mut all = Vec::new();
    for kind in ["kmsgrants", "kmsproviderconfigs", "kmskeypolicies"] {
        let text = kubectl_ok(
            &[
                "get",
                &format!("{kind}.{version}.kmsgrant.io"),
                "-A",
                "-o",
                "json",
            ],
            None,
        );
        let list: Value = serde_json::from_str(&text).unwrap();
        all.extend(list["items"].as_array().unwrap().iter().cloned());
    }
    all
}

fn managed_by_v1alpha1(objects: &[Value]) -> Vec<String> {
    objects
        .iter()
        .filter(|o| {
            o["metadata"]["managedFields"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|m| m["apiVersion"] == "kmsgrant.io/v1alpha1")
        })
        .map(|o| o["metadata"]["name"].as_str().unwrap().to_owned())
        .collect()
}

/// The operator, watching every namespace (so it migrates storage), killed when dropped.
struct ClusterWideOperator {
    child: Child,
    admin_port: u16,
    log: std::path::PathBuf,
}

impl ClusterWideOperator {
    fn start(secret_namespace: &str) -> Self {
        let admin_port = free_port();
        let dir = std::env::temp_dir().join("kmsgrant-e2e");
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join(format!(
            "api-versions-{}-{admin_port}.log",
            std::process::id()
        ));
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(OPERATOR_BIN)
            .args(["run", "--allow-http-endpoints", "--cluster-name", "e2e"])
            .args(["--kubeconfig", support::kubeconfig().to_str().unwrap()])
            .args(["--secret-namespace", secret_namespace])
            .args(["--resync-interval", "5s", "--backoff-max", "5s"])
            .args(["--log-level", "kmsgrant=debug,info"])
            .args(["--admin-address", &format!("127.0.0.1:{admin_port}")])
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        Self {
            child,
            admin_port,
            log,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for ClusterWideOperator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A namespace, an emulator with one key, the credentials Secret and a provider config at
/// `api_version`.
struct World {
    namespace: String,
    emulator: kms_emulator::RunningEmulator,
    key_id: String,
}

impl World {
    async fn new(api_version: &str) -> Self {
        let namespace = support::namespace("graduation");
        let emulator = kms_emulator::Emulator::start(EmulatorConfig::default())
            .await
            .unwrap();
        let key_id = emulator
            .admin()
            .create_key(kms_emulator::NewKey {
                key_alias: "graduation".into(),
                ..Default::default()
            })
            .unwrap()
            .key_id;
        let config = emulator.config();
        let secret = json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "kms-credentials", "namespace": namespace},
            "stringData": {"accessKey": config.access_key, "secretKey": config.secret_key.as_str()}
        });
        kubectl_ok(&["apply", "-f", "-"], Some(&secret.to_string()));
        let provider = json!({
            "apiVersion": api_version, "kind": "KmsProviderConfig",
            "metadata": {"name": "default"},
            "spec": {
                "endpoint": emulator.base_url(),
                "region": config.region,
                "projectId": config.project_id,
                "auth": {"type": "AccessKey", "secretRef": {"namespace": namespace, "name": "kms-credentials"}},
                "rateLimit": {"requestsPerSecond": 1000, "burst": 1000}
            }
        });
        kubectl_ok(&["apply", "-f", "-"], Some(&provider.to_string()));
        Self {
            namespace,
            emulator,
            key_id,
        }
    }

    fn grant(&self, api_version: &str, name: &str, extra: Value) -> Value {
        let mut spec = json!({
            "keyId": self.key_id,
            "granteePrincipal": PRINCIPAL,
            "operations": ["describe-key", "encrypt-datakey"],
        });
        for (k, v) in extra.as_object().unwrap() {
            spec[k] = v.clone();
        }
        json!({
            "apiVersion": api_version, "kind": "KmsGrant",
            "metadata": {"name": name, "namespace": self.namespace},
            "spec": spec
        })
    }

    /// Creates and revokes on the emulator so far.
    fn writes(&self) -> (usize, usize) {
        let calls = self.emulator.admin().calls(0);
        let count = |op: &str| {
            calls
                .iter()
                .filter(|c| c.operation == op && c.status == 200)
                .count()
        };
        (count("create-grant"), count("revoke-grant"))
    }

    fn grant_ids(&self) -> std::collections::BTreeMap<String, String> {
        let text = kubectl_ok(
            &["-n", &self.namespace, "get", "kmsgrants", "-o", "json"],
            None,
        );
        let list: Value = serde_json::from_str(&text).unwrap();
        list["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| {
                (
                    o["metadata"]["name"].as_str().unwrap().to_owned(),
                    o["status"]["grantId"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                )
            })
            .collect()
    }

    async fn wait_all_ready(&self, names: &[&str]) {
        for name in names {
            eventually(
                &format!("KmsGrant {name} Ready"),
                Duration::from_secs(90),
                async || {
                    let out = kubectl(
                        &[
                            "-n",
                            &self.namespace,
                            "get",
                            "kmsgrant",
                            name,
                            "-o",
                            "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
                        ],
                        None,
                    );
                    String::from_utf8_lossy(&out.stdout) == "True"
                },
            )
            .await;
        }
    }

    fn events(&self, reason: &str) -> Vec<Value> {
        let text = kubectl_ok(
            &[
                "get",
                "events.events.k8s.io",
                "-A",
                "-o",
                "json",
                &format!("--field-selector=reason={reason}"),
            ],
            None,
        );
        let list: Value = serde_json::from_str(&text).unwrap();
        list["items"].as_array().unwrap().clone()
    }
}

/// The CRD of 84dffa1 for KmsGrant with the tombstone rule taken off `spec.name`: the schema of
/// the releases before it, when `spec.name` was a real field. How objects that still store a
/// value there came to be.
fn crd_before_the_tombstone() -> String {
    let text = std::fs::read_to_string(
        Path::new(REPO).join("tests/fixtures/v1alpha1-crds/kmsgrants.kmsgrant.io.yaml"),
    )
    .unwrap();
    let mut crd: Value = serde_saphyr::from_str(&text).unwrap();
    let name = &mut crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
        ["name"];
    name.as_object_mut()
        .unwrap()
        .remove("x-kubernetes-validations");
    serde_json::to_string(&crd).unwrap()
}

fn stderr_of_kubectl_apply(manifest: &Value) -> String {
    let out = kubectl(&["apply", "-f", "-"], Some(&manifest.to_string()));
    assert!(
        out.status.success(),
        "kubectl apply failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn migrate(args: &[&str]) -> std::process::Output {
    Command::new(OPERATOR_BIN)
        .arg("migrate")
        .args(args)
        .args(["--kubeconfig", support::kubeconfig().to_str().unwrap()])
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_stage_of_the_graduation_keeps_every_object_and_grant() {
    let control_plane = support::own_control_plane();

    // Stage 0, an older release: spec.name was a real field. One object stores a value there.
    apply_crds_ok(&v1alpha1_only_crds());
    apply_crds_ok(&crd_before_the_tombstone());
    let world = World::new("kmsgrant.io/v1alpha1").await;
    kubectl_ok(
        &["apply", "-f", "-"],
        Some(
            &world
                .grant(
                    "kmsgrant.io/v1alpha1",
                    "legacy",
                    json!({"name": "grant-left-by-v0"}),
                )
                .to_string(),
        ),
    );

    // Stage 1, today's main: only v1alpha1. A GitOps tool applies an object server-side.
    apply_crds_ok(&v1alpha1_only_crds());
    let mut alpha = world.grant(
        "kmsgrant.io/v1alpha1",
        "alpha",
        json!({"retiringPrincipal": PRINCIPAL}),
    );
    alpha["metadata"]["labels"] = json!({"team": "a", "tier": "gold"});
    kubectl_ok(
        &[
            "apply",
            "--server-side",
            "--field-manager=argocd",
            "-f",
            "-",
        ],
        Some(&alpha.to_string()),
    );
    assert_eq!(stored_versions(CRDS[0]), ["v1alpha1"]);

    // Stage 2: both served, v1alpha1 stored. Rolling back to stage 1 and forth again works: the
    // API server never stored anything at v1beta1.
    apply_crds_ok(&crds_at("introduced"));
    kubectl_ok(
        &[
            "-n",
            &world.namespace,
            "get",
            "kmsgrants.v1beta1.kmsgrant.io",
            "alpha",
        ],
        None,
    );
    apply_crds_ok(&v1alpha1_only_crds());
    assert_eq!(stored_versions(CRDS[0]), ["v1alpha1"]);
    kubectl_ok(
        &[
            "-n",
            &world.namespace,
            "get",
            "kmsgrants.v1alpha1.kmsgrant.io",
            "alpha",
            "legacy",
        ],
        None,
    );
    apply_crds_ok(&crds_at("introduced"));

    // The new operator starts: the removed spec.name is kept before anything can prune it.
    let operator = ClusterWideOperator::start(&world.namespace);
    let beta = world.grant("kmsgrant.io/v1beta1", "beta", json!({}));
    kubectl_ok(&["apply", "-f", "-"], Some(&beta.to_string()));
    world.wait_all_ready(&["legacy", "alpha", "beta"]).await;
    let legacy = support::get_grant(&world.namespace, "legacy");
    assert_eq!(
        legacy["metadata"]["annotations"]["kmsgrant.io/legacy-grant-name"], "grant-left-by-v0",
        "{legacy}"
    );
    let warnings = world.events("LegacyGrantName");
    assert_eq!(warnings.len(), 1, "reported once: {warnings:?}");
    assert!(
        warnings[0]["note"]
            .as_str()
            .unwrap()
            .contains("spec.importGrantId"),
        "{}",
        warnings[0]
    );
    let grants = world.grant_ids();
    assert_eq!(world.writes(), (3, 0), "one create per object, no revoke");
    assert!(grants.values().all(|id| id.len() == 64), "{grants:?}");
    // v1alpha1 still stores: the operator leaves storedVersions alone.
    assert_eq!(stored_versions(CRDS[0]), ["v1alpha1"]);
    drop(operator);

    // Stage 3: v1beta1 stored, v1alpha1 deprecated. The upgraded operator migrates storage.
    apply_crds_ok(&crds_at("stored"));
    let operator = ClusterWideOperator::start(&world.namespace);
    eventually(
        "storedVersions [v1beta1] on every CRD",
        Duration::from_secs(90),
        async || CRDS.iter().all(|crd| stored_versions(crd) == ["v1beta1"]),
    )
    .await;
    let objects = all_objects("v1beta1");
    assert_eq!(managed_by_v1alpha1(&objects), Vec::<String>::new());
    assert_eq!(objects.len(), 4, "three grants and one provider config");
    let metrics = support::metrics(operator.admin_port).await;
    for kind in ["KmsGrant", "KmsProviderConfig", "KmsKeyPolicy"] {
        assert_eq!(
            support::series(
                &metrics,
                &format!("kmsgrant_storage_migration_complete{{kind=\"{kind}\"}}")
            ),
            Some(1.0),
            "{metrics}"
        );
    }
    assert_eq!(world.events("StorageMigrated").len(), 3);
    // The legacy name survived the rewrite that pruned spec.name.
    let legacy = support::get_grant(&world.namespace, "legacy");
    assert_eq!(
        legacy["metadata"]["annotations"]["kmsgrant.io/legacy-grant-name"],
        "grant-left-by-v0"
    );
    assert!(legacy["spec"].get("name").is_none(), "{legacy}");

    // kubectl with a v1alpha1 manifest sees the deprecation warning.
    let gamma = world.grant("kmsgrant.io/v1alpha1", "gamma", json!({}));
    let warning = stderr_of_kubectl_apply(&gamma);
    assert!(
        warning.contains("kmsgrant.io/v1alpha1 KmsGrant is deprecated")
            && warning.contains("kmsgrant-operator migrate -f"),
        "{warning}"
    );
    world.wait_all_ready(&["gamma"]).await;

    // The GitOps field manager still owns its fields: applying at v1beta1 without the label
    // `tier` removes it (a spec change would replace the grant, which is not the point here).
    let mut alpha_beta = world.grant(
        "kmsgrant.io/v1beta1",
        "alpha",
        json!({"retiringPrincipal": PRINCIPAL}),
    );
    alpha_beta["metadata"]["labels"] = json!({"team": "a"});
    kubectl_ok(
        &[
            "apply",
            "--server-side",
            "--field-manager=argocd",
            "-f",
            "-",
        ],
        Some(&alpha_beta.to_string()),
    );
    let alpha_now = support::get_grant(&world.namespace, "alpha");
    assert_eq!(
        alpha_now["metadata"]["labels"],
        json!({"team": "a"}),
        "{alpha_now}"
    );

    // Before v1alpha1 stops being served, the check refuses while anything manages it: gamma was
    // applied at v1alpha1 after the migration.
    let check = migrate(&["--check"]);
    let report = String::from_utf8_lossy(&check.stdout).into_owned()
        + &String::from_utf8_lossy(&check.stderr);
    assert_eq!(check.status.code(), Some(1), "{report}");
    assert!(report.contains("gamma"), "{report}");
    let run = migrate(&["--cluster"]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let check = migrate(&["--check"]);
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );

    // Stage 4: v1alpha1 no longer served.
    apply_crds_ok(&crds_at("unserved"));
    let gone = kubectl(
        &[
            "-n",
            &world.namespace,
            "get",
            "kmsgrants.v1alpha1.kmsgrant.io",
        ],
        None,
    );
    assert!(!gone.status.success(), "v1alpha1 must not be served");
    let delta = world.grant("kmsgrant.io/v1beta1", "delta", json!({}));
    kubectl_ok(&["apply", "-f", "-"], Some(&delta.to_string()));
    world.wait_all_ready(&["delta"]).await;
    let mut grants = grants;
    grants.extend(
        world
            .grant_ids()
            .into_iter()
            .filter(|(n, _)| n == "gamma" || n == "delta"),
    );
    // Stage 5: v1alpha1 removed; the API server accepts it because storedVersions is [v1beta1].
    apply_crds_ok(&crds_at("removed"));
    // The GitOps tool applies again at v1beta1: no managedFields name a version that is gone.
    alpha_beta["metadata"]["labels"] = json!({"team": "b"});
    kubectl_ok(
        &[
            "apply",
            "--server-side",
            "--field-manager=argocd",
            "-f",
            "-",
        ],
        Some(&alpha_beta.to_string()),
    );
    let alpha_now = support::get_grant(&world.namespace, "alpha");
    assert_eq!(alpha_now["metadata"]["labels"], json!({"team": "b"}));
    world
        .wait_all_ready(&["legacy", "alpha", "beta", "gamma", "delta"])
        .await;
    // Give the operator a few resyncs: nothing it sees may make it write to KMS.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let after = world.grant_ids();
    for (name, id) in &grants {
        assert_eq!(after.get(name), Some(id), "{name} kept its grant");
    }
    assert_eq!(after.len(), 5);
    assert_eq!(
        world.writes(),
        (5, 0),
        "one create per object over every stage, no revoke; operator log:\n{}",
        operator.log()
    );
    drop(operator);
    support::remove_own_control_plane(&control_plane);
}

fn helm(args: &[&str]) -> std::process::Output {
    Command::new(Path::new(REPO).join("scripts/helm"))
        .args(args)
        .args(["--kubeconfig", support::kubeconfig().to_str().unwrap()])
        .current_dir(REPO)
        .stdin(Stdio::null())
        .output()
        .expect("cannot run scripts/helm")
}

fn helm_ok(args: &[&str]) {
    let out = helm(args);
    assert!(
        out.status.success(),
        "helm {} failed:\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A copy of the chart whose CRDs are those of `stage`, as a later release would ship them.
fn chart_at_stage(stage: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let copy = Command::new("cp")
        .args(["-a", &format!("{REPO}/charts/kmsgrant-operator")])
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(copy.success());
    let out = Command::new(OPERATOR_BIN)
        .args(["crd", "--api-stage", stage, "--output-dir"])
        .arg(dir.path().join("kmsgrant-operator/files/crds"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_upgrade_from_the_chart_of_84dffa1_migrates_without_touching_a_grant_and_guards_the_next_step()
 {
    let control_plane = support::own_control_plane();
    let old_chart = Path::new(REPO).join("tests/fixtures/kmsgrant-operator-chart-84dffa1.tgz");
    helm_ok(&[
        "install",
        "kmsgrant",
        old_chart.to_str().unwrap(),
        "--namespace",
        "kmsgrant-system",
        "--create-namespace",
    ]);
    kubectl_ok(
        &[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/kmsgrants.kmsgrant.io",
        ],
        None,
    );
    std::thread::sleep(Duration::from_secs(2));
    let world = World::new("kmsgrant.io/v1alpha1").await;
    // What today's main leaves behind: objects applied by a GitOps tool at v1alpha1, each with
    // its identity-named grant on KMS (made here through the API, as that operator made them).
    let kms = support::kms_client_of(&world.emulator);
    let mut made = std::collections::BTreeMap::new();
    for name in ["one", "two"] {
        let manifest = world.grant("kmsgrant.io/v1alpha1", name, json!({}));
        kubectl_ok(
            &[
                "apply",
                "--server-side",
                "--field-manager=argocd",
                "-f",
                "-",
            ],
            Some(&manifest.to_string()),
        );
        let grant_id = kms
            .create_grant(&kmsgrant_kms::NewGrant {
                key_id: world.key_id.clone(),
                grantee_principal: PRINCIPAL.to_owned(),
                grantee_principal_type: kmsgrant::api::GranteePrincipalType::User,
                operations: vec![
                    kmsgrant::api::Operation::DescribeKey,
                    kmsgrant::api::Operation::EncryptDatakey,
                ],
                name: Some(kmsgrant::controller::identity::grant_name(
                    "e2e",
                    &world.namespace,
                    name,
                )),
                retiring_principal: None,
            })
            .await
            .unwrap();
        made.insert(name.to_owned(), grant_id);
    }
    let before = world.writes();

    helm_ok(&[
        "upgrade",
        "kmsgrant",
        "charts/kmsgrant-operator",
        "--namespace",
        "kmsgrant-system",
    ]);
    // The upgraded CRDs store v1beta1; v1alpha1 objects are still stored as they were.
    kubectl_ok(
        &[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/kmsgrants.kmsgrant.io",
        ],
        None,
    );
    let crd: Value = serde_json::from_str(&kubectl_ok(
        &["get", "crd", "kmsgrants.kmsgrant.io", "-o", "json"],
        None,
    ))
    .unwrap();
    let storage: Vec<&str> = crd["spec"]["versions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["storage"] == true)
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(storage, ["v1beta1"]);

    // A later chart that stops serving v1alpha1 is refused while v1alpha1 may still be stored.
    let next = chart_at_stage("unserved");
    let refused = helm(&[
        "upgrade",
        "kmsgrant",
        next.path().join("kmsgrant-operator").to_str().unwrap(),
        "--namespace",
        "kmsgrant-system",
    ]);
    let message = String::from_utf8_lossy(&refused.stderr).into_owned();
    assert!(
        !refused.status.success() && message.contains("status.storedVersions"),
        "{message}"
    );

    // The upgraded operator (here out of the cluster: no node runs its pods) adopts the grants
    // and migrates what is stored.
    let operator = ClusterWideOperator::start(&world.namespace);
    world.wait_all_ready(&["one", "two"]).await;
    eventually(
        "storedVersions [v1beta1] on every CRD",
        Duration::from_secs(90),
        async || CRDS.iter().all(|crd| stored_versions(crd) == ["v1beta1"]),
    )
    .await;
    assert_eq!(
        managed_by_v1alpha1(&all_objects("v1beta1")),
        Vec::<String>::new()
    );
    let ids = world.grant_ids();
    for (name, id) in &made {
        assert_eq!(ids.get(name), Some(id), "{name} adopted its grant");
    }
    // An object applied at v1alpha1 since still blocks the next chart, by its managedFields.
    let late = world.grant("kmsgrant.io/v1alpha1", "late", json!({}));
    kubectl_ok(&["apply", "-f", "-"], Some(&late.to_string()));
    let refused = helm(&[
        "upgrade",
        "kmsgrant",
        next.path().join("kmsgrant-operator").to_str().unwrap(),
        "--namespace",
        "kmsgrant-system",
    ]);
    let message = String::from_utf8_lossy(&refused.stderr).into_owned();
    assert!(
        !refused.status.success() && message.contains("late"),
        "{message}"
    );
    let migrated = migrate(&["--cluster"]);
    assert!(
        migrated.status.success(),
        "{}",
        String::from_utf8_lossy(&migrated.stderr)
    );
    helm_ok(&[
        "upgrade",
        "kmsgrant",
        next.path().join("kmsgrant-operator").to_str().unwrap(),
        "--namespace",
        "kmsgrant-system",
    ]);
    world.wait_all_ready(&["late"]).await;
    let before = (before.0 + 1, before.1);

    tokio::time::sleep(Duration::from_secs(8)).await;
    assert_eq!(
        world.writes(),
        before,
        "no grant created or revoked by the upgrade; operator log:\n{}",
        operator.log()
    );
    drop(operator);
    support::remove_own_control_plane(&control_plane);
}
