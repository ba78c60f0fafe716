//! What the graduation tests share (tests/api_versions.rs, tests/api_upgrade_helm.rs): the CRDs
//! of each stage, a cluster-wide operator, a tenant-less world of one namespace and emulator.
//! Each test binary runs one test on a control plane of its own.
#![allow(dead_code)] // Each test binary uses its own part.

use super::support;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use kms_emulator::EmulatorConfig;
use serde_json::{Value, json};
use support::{OPERATOR_BIN, REPO, eventually, free_port, kubectl, kubectl_ok};

pub const CRDS: [&str; 3] = [
    "kmsgrants.kmsgrant.io",
    "kmsproviderconfigs.kmsgrant.io",
    "kmskeypolicies.kmsgrant.io",
];
pub const PRINCIPAL: &str = "13gg44z4g2sglzk0egw0u726zoyzvrs8";

/// The CRDs of 84dffa1, the last main that knew only v1alpha1.
pub fn v1alpha1_only_crds() -> String {
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
pub fn crds_at(stage: &str) -> String {
    let out = Command::new(OPERATOR_BIN)
        .args(["crd", "--api-stage", stage])
        .output()
        .unwrap();
    assert!(out.status.success(), "crd --api-stage {stage} failed");
    String::from_utf8(out.stdout).unwrap()
}

/// Applies CRDs as an upgrade would (server-side, the chart's field manager), returning kubectl's
/// output so a refusal can be inspected.
pub fn apply_crds(yaml: &str) -> std::process::Output {
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

pub fn apply_crds_ok(yaml: &str) {
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

pub fn stored_versions(crd: &str) -> Vec<String> {
    let text = kubectl_ok(
        &["get", "crd", crd, "-o", "jsonpath={.status.storedVersions}"],
        None,
    );
    serde_json::from_str(&text).unwrap_or_default()
}

/// Every object of the three kinds at `version`, as JSON.
pub fn all_objects(version: &str) -> Vec<Value> {
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

pub fn managed_by_v1alpha1(objects: &[Value]) -> Vec<String> {
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
pub struct ClusterWideOperator {
    child: Child,
    pub admin_port: u16,
    log: std::path::PathBuf,
}

impl ClusterWideOperator {
    pub fn start(secret_namespace: &str) -> Self {
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

    pub fn log(&self) -> String {
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
pub struct World {
    pub namespace: String,
    pub emulator: kms_emulator::RunningEmulator,
    pub key_id: String,
}

impl World {
    pub async fn new(api_version: &str) -> Self {
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

    pub fn grant(&self, api_version: &str, name: &str, extra: Value) -> Value {
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
    pub fn writes(&self) -> (usize, usize) {
        let calls = self.emulator.admin().calls(0);
        let count = |op: &str| {
            calls
                .iter()
                .filter(|c| c.operation == op && c.status == 200)
                .count()
        };
        (count("create-grant"), count("revoke-grant"))
    }

    pub fn grant_ids(&self) -> std::collections::BTreeMap<String, String> {
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

    pub async fn wait_all_ready(&self, names: &[&str]) {
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

    pub fn events(&self, reason: &str) -> Vec<Value> {
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
pub fn crd_before_the_tombstone() -> String {
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

pub fn stderr_of_kubectl_apply(manifest: &Value) -> String {
    let out = kubectl(&["apply", "-f", "-"], Some(&manifest.to_string()));
    assert!(
        out.status.success(),
        "kubectl apply failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub fn helm(args: &[&str]) -> std::process::Output {
    Command::new(Path::new(REPO).join("scripts/helm"))
        .args(args)
        .args(["--kubeconfig", support::kubeconfig().to_str().unwrap()])
        .current_dir(REPO)
        .stdin(Stdio::null())
        .output()
        .expect("cannot run scripts/helm")
}

pub fn helm_ok(args: &[&str]) {
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
pub fn chart_at_stage(stage: &str) -> tempfile::TempDir {
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
