//! The operator the way users run it: the image built by `scripts/image`, on a one-node
//! Kubernetes built from source (`scripts/node-cluster`), installed by the chart and by
//! `kubectl apply -k deploy/`, reconciling against the emulator through the pod network.
//!
//! One node serves the whole binary (it stops when the test process exits); the tests take turns,
//! as they install the same release. Where a node cannot run (not root, no cgroups), every test
//! prints the reason and returns; `KMSGRANT_REQUIRE_NODE=1` turns that into a failure (CI).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use kms_emulator::{CallRecord, Emulator, EmulatorAdmin, EmulatorConfig, FaultSettings, NewKey};
use serde_json::{Value, json};

const REPO: &str = env!("CARGO_MANIFEST_DIR");
const OPERATOR_BIN: &str = env!("CARGO_BIN_EXE_kmsgrant-operator");
const RELEASE: &str = "kmsgrant-operator";
const SYSTEM: &str = "kmsgrant-system";
const SEED_KEY: &str = "bb6a3d22-dc93-47ac-b5bd-88df7ad35f1e";
const WRITES: [&str; 3] = ["create-grant", "revoke-grant", "retire-grant"];

struct Node {
    dir: PathBuf,
    kubeconfig: PathBuf,
    bridge: String,
    ranges: Vec<(String, String)>,
    emulator: EmulatorAdmin,
    emulator_url: String,
    emulator_config: EmulatorConfig,
}

/// The node, or `None` (reason printed) where this machine cannot run one.
fn node() -> Option<&'static Node> {
    // A node that failed to start is not retried by every test: the first failure is kept.
    static NODE: OnceLock<Result<Option<Node>, String>> = OnceLock::new();
    let started = NODE.get_or_init(|| {
        std::panic::catch_unwind(start_node).map_err(|panic| {
            panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default()
        })
    });
    match started {
        Ok(node) => node.as_ref(),
        Err(message) => panic!("the node did not start: {message}"),
    }
}

/// Tests install the same release: one at a time.
fn turn() -> MutexGuard<'static, ()> {
    static TURN: Mutex<()> = Mutex::new(());
    TURN.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn script(name: &str) -> PathBuf {
    Path::new(REPO).join("scripts").join(name)
}

fn start_node() -> Option<Node> {
    let check = Command::new(script("node-cluster"))
        .arg("check")
        .output()
        .unwrap();
    if check.status.code() == Some(3) {
        let reason = String::from_utf8_lossy(&check.stderr).trim().to_owned();
        assert!(
            std::env::var_os("KMSGRANT_REQUIRE_NODE").is_none(),
            "KMSGRANT_REQUIRE_NODE is set but {reason}"
        );
        eprintln!("node tier skipped: {reason}");
        return None;
    }
    assert!(
        check.status.success(),
        "scripts/node-cluster check: {}",
        String::from_utf8_lossy(&check.stderr)
    );
    let dir = std::env::temp_dir().join(format!("kmsgrant-node.{}", std::process::id()));
    let started = Instant::now();
    let up = Command::new(script("node-cluster"))
        .arg("up")
        .arg(&dir)
        .args(["--owner-pid", &std::process::id().to_string()])
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    if !up.status.success() {
        // Give the host back before failing, so the next run starts clean.
        let _ = Command::new(script("node-cluster"))
            .arg("down")
            .arg(&dir)
            .status();
        panic!(
            "scripts/node-cluster up {} failed (messages above)",
            dir.display()
        );
    }
    eprintln!(
        "figure: node cluster up in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let started = Instant::now();
    let image = dir.join("operator-image.tar");
    let built = Command::new(script("image"))
        .args(["--binary", OPERATOR_BIN, "--out"])
        .arg(&image)
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(
        built.status.success(),
        "scripts/image failed (messages above)"
    );
    let loaded = Command::new(script("node-cluster"))
        .arg("load")
        .arg(&dir)
        .arg(&image)
        .output()
        .unwrap();
    assert!(
        loaded.status.success(),
        "loading the image: {}",
        String::from_utf8_lossy(&loaded.stderr)
    );
    eprintln!(
        "figure: operator image ({} MB) built and imported in {:.1} s",
        std::fs::metadata(&image).unwrap().len() / 1_000_000,
        started.elapsed().as_secs_f64()
    );

    let env = String::from_utf8(
        Command::new(script("node-cluster"))
            .arg("env")
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let env: BTreeMap<&str, &str> = env
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .collect();
    let node_ip: IpAddr = env["NODE_IP"].parse().unwrap();
    let ranges = ["NODE_RANGE", "POD_RANGE", "SERVICE_RANGE"]
        .iter()
        .map(|name| (name.to_string(), env[name].to_owned()))
        .collect();

    // The emulator serves on the node's own address, which the pods reach through their gateway.
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let config = EmulatorConfig {
                listen: (node_ip, 0).into(),
                ..EmulatorConfig::for_tests()
            };
            let emulator = Emulator::start(config)
                .await
                .expect("emulator on the node address");
            sender
                .send((
                    emulator.admin(),
                    emulator.base_url(),
                    emulator.config().clone(),
                ))
                .unwrap();
            std::future::pending::<()>().await;
        });
    });
    let (emulator, emulator_url, emulator_config) = receiver.recv().unwrap();
    emulator
        .create_key(NewKey {
            key_alias: "seed".into(),
            key_id: Some(SEED_KEY.into()),
            ..Default::default()
        })
        .unwrap();
    Some(Node {
        kubeconfig: dir.join("kubeconfig"),
        dir,
        bridge: env["BRIDGE"].to_owned(),
        ranges,
        emulator,
        emulator_url,
        emulator_config,
    })
}

impl Node {
    fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> Output {
        run(
            Command::new("kubectl")
                .arg("--kubeconfig")
                .arg(&self.kubeconfig)
                .args(args),
            stdin,
        )
    }

    fn kubectl_ok(&self, args: &[&str], stdin: Option<&str>) -> String {
        let out = self.kubectl(args, stdin);
        assert!(
            out.status.success(),
            "kubectl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn get(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        serde_json::from_str(&self.kubectl_ok(&all, None)).unwrap()
    }

    fn apply(&self, manifest: &Value) {
        self.kubectl_ok(&["apply", "-f", "-"], Some(&manifest.to_string()));
    }

    fn helm(&self, args: &[&str]) -> Output {
        static HELM: OnceLock<PathBuf> = OnceLock::new();
        let helm = HELM.get_or_init(|| {
            let helm = Command::new(script("helm"))
                .arg("--print-path")
                .output()
                .unwrap();
            assert!(
                helm.status.success(),
                "scripts/helm: {}",
                String::from_utf8_lossy(&helm.stderr)
            );
            PathBuf::from(String::from_utf8(helm.stdout).unwrap().trim())
        });
        run(
            Command::new(helm)
                .arg("--kubeconfig")
                .arg(&self.kubeconfig)
                .args(args),
            None,
        )
    }

    fn helm_ok(&self, args: &[&str]) -> String {
        let out = self.helm(args);
        assert!(
            out.status.success(),
            "helm {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn ctr(&self, args: &[&str]) -> String {
        let out = run(
            Command::new("ctr")
                .arg("--address")
                .arg(self.dir.join("containerd/containerd.sock"))
                .args(["-n", "k8s.io"])
                .args(args),
            None,
        );
        assert!(
            out.status.success(),
            "ctr {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// The chart with its defaults (the image is the one `scripts/image` tagged), plus plain
    /// http for the emulator; waits for Available. Kept installed for the next test.
    fn helm_release(&self) {
        if !self
            .helm(&["status", RELEASE, "-n", SYSTEM])
            .status
            .success()
        {
            let started = Instant::now();
            self.helm_ok(&[
                "install",
                RELEASE,
                &format!("{REPO}/charts/kmsgrant-operator"),
                "-n",
                SYSTEM,
                "--create-namespace",
                "--set",
                "extraArgs={--allow-http-endpoints}",
            ]);
            self.wait_available(SYSTEM, RELEASE, 180);
            eprintln!(
                "figure: helm install to Deployment Available in {:.1} s; {}",
                started.elapsed().as_secs_f64(),
                self.pod_start_to_ready(SYSTEM)
            );
        }
        self.seed_provider(SYSTEM);
    }

    fn wait_available(&self, namespace: &str, deployment: &str, seconds: u32) {
        let out = self.kubectl(
            &[
                "-n",
                namespace,
                "wait",
                "--for=condition=Available",
                &format!("--timeout={seconds}s"),
                &format!("deployment/{deployment}"),
            ],
            None,
        );
        if !out.status.success() {
            let pods = self.kubectl(&["-n", namespace, "describe", "pods"], None);
            panic!(
                "deployment {namespace}/{deployment} not Available: {}\n{}",
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&pods.stdout)
            );
        }
    }

    /// "pod start to Ready" of each operator pod, from the pod's own timestamps.
    fn pod_start_to_ready(&self, namespace: &str) -> String {
        let pods = self.operator_pods(namespace);
        let figures: Vec<String> = pods
            .iter()
            .filter_map(|pod| {
                let created = timestamp(&pod["metadata"]["creationTimestamp"])?;
                let ready = pod["status"]["conditions"]
                    .as_array()?
                    .iter()
                    .find(|c| c["type"] == "Ready" && c["status"] == "True")?;
                let ready = timestamp(&ready["lastTransitionTime"])?;
                Some(format!("{} s", ready - created))
            })
            .collect();
        format!("pod created to Ready: {}", figures.join(", "))
    }

    fn operator_pods(&self, namespace: &str) -> Vec<Value> {
        let pods = self.get(&[
            "-n",
            namespace,
            "get",
            "pods",
            "-l",
            "app.kubernetes.io/name=kmsgrant-operator",
        ]);
        pods["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|pod| pod["metadata"]["deletionTimestamp"].is_null())
            .cloned()
            .collect()
    }

    /// The credentials Secret and the `default` provider config of deploy/examples, pointed at
    /// the emulator.
    fn seed_provider(&self, namespace: &str) {
        let config = &self.emulator_config;
        self.apply(&json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "kms-credentials", "namespace": namespace},
            "stringData": {"accessKey": config.access_key, "secretKey": config.secret_key}
        }));
        let mut provider = yaml_file("deploy/examples/kmsproviderconfig-default.yaml");
        let spec = &mut provider["spec"];
        spec["endpoint"] = json!(self.emulator_url);
        spec["iamEndpoint"] = json!(self.emulator_url);
        spec["region"] = json!(config.region);
        spec["projectId"] = json!(config.project_id);
        spec.as_object_mut().unwrap().remove("projectName");
        spec["auth"]["secretRef"]["namespace"] = json!(namespace);
        self.apply(&provider);
    }

    fn lease_holder_pod(&self, namespace: &str, lease: &str) -> Option<String> {
        let lease = self.kubectl(
            &["-n", namespace, "get", "lease", lease, "-o", "json"],
            None,
        );
        let lease: Value = serde_json::from_slice(&lease.stdout).ok()?;
        let holder = lease["spec"]["holderIdentity"].as_str()?;
        // The identity is KMSGRANT_POD_NAME-PID.
        Some(holder.rsplit_once('-')?.0.to_owned())
    }

    /// The pod's IP; a pod that has just started (it may already hold the Lease) can run before
    /// the kubelet reports its IP, so this waits for it.
    fn pod_ip(&self, namespace: &str, pod: &str) -> IpAddr {
        let mut ip = None;
        wait_until(&format!("pod {pod} to report its IP"), 60, || {
            ip = self.get(&["-n", namespace, "get", "pod", pod])["status"]["podIP"]
                .as_str()
                .and_then(|ip| ip.parse().ok());
            ip.is_some()
        });
        ip.expect("waited for it")
    }

    /// The host PID of a pod's operator container, from containerd.
    fn container_pid(&self, namespace: &str, pod: &str) -> u32 {
        let pod = self.get(&["-n", namespace, "get", "pod", pod]);
        let id = pod["status"]["containerStatuses"][0]["containerID"]
            .as_str()
            .unwrap();
        let id = id.trim_start_matches("containerd://");
        let tasks = self.ctr(&["tasks", "ls"]);
        tasks
            .lines()
            .find_map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                (fields.first() == Some(&id)).then(|| fields[1].parse().unwrap())
            })
            .unwrap_or_else(|| panic!("no containerd task {id}:\n{tasks}"))
    }

    fn grant(&self, name: &str, key_id: &str) -> Value {
        json!({
            "apiVersion": "kmsgrant.io/v1beta1", "kind": "KmsGrant",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {
                "keyId": key_id,
                "granteePrincipal": "13gg44z4g2sglzk0egw0u726zoyzvrs8",
                "operations": ["describe-key", "create-datakey"],
            }
        })
    }

    fn wait_grant_ready(&self, name: &str, seconds: u32) {
        let out = self.kubectl(
            &[
                "-n",
                "default",
                "wait",
                "--for=condition=Ready",
                &format!("--timeout={seconds}s"),
                &format!("kmsgrants.kmsgrant.io/{name}"),
            ],
            None,
        );
        if !out.status.success() {
            let object = self.kubectl(
                &[
                    "-n",
                    "default",
                    "get",
                    "kmsgrants.kmsgrant.io",
                    name,
                    "-o",
                    "yaml",
                ],
                None,
            );
            panic!(
                "KmsGrant {name} not Ready: {}\n{}",
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&object.stdout)
            );
        }
    }

    fn new_key(&self, alias: &str) -> String {
        self.emulator
            .create_key(NewKey {
                key_alias: alias.into(),
                ..Default::default()
            })
            .unwrap()
            .key_id
    }

    fn last_call(&self) -> u64 {
        self.emulator.calls(0).last().map_or(0, |call| call.seq)
    }

    fn writes_after(&self, seq: u64) -> Vec<CallRecord> {
        self.emulator
            .calls(seq)
            .into_iter()
            .filter(|call| WRITES.contains(&call.operation.as_str()) && call.status == 200)
            .collect()
    }
}

fn run(command: &mut Command, stdin: Option<&str>) -> Output {
    use std::io::Write;
    let mut child = command
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    child.wait_with_output().unwrap()
}

fn yaml_file(path: &str) -> Value {
    let text = std::fs::read_to_string(Path::new(REPO).join(path)).unwrap();
    serde_saphyr::from_str(&text).unwrap()
}

/// Seconds since the epoch of an RFC 3339 timestamp.
fn timestamp(value: &Value) -> Option<i64> {
    let parsed: jiff::Timestamp = value.as_str()?.parse().ok()?;
    Some(parsed.as_second())
}

/// Polls `check` every 200 ms until it holds; fails naming `what` after `seconds`.
fn wait_until(what: &str, seconds: u64, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    while !check() {
        assert!(Instant::now() < deadline, "{what}: not within {seconds} s");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn in_range(ip: IpAddr, cidr: &str) -> bool {
    let (base, bits) = cidr.split_once('/').unwrap();
    let (IpAddr::V4(ip), Ok(IpAddr::V4(base))) = (ip, base.parse::<IpAddr>()) else {
        return false;
    };
    let bits: u32 = bits.parse().unwrap();
    let mask = if bits == 0 {
        0
    } else {
        u32::MAX << (32 - bits)
    };
    u32::from(ip) & mask == u32::from(base) & mask
}

#[test]
fn kubectl_apply_k_deploy_becomes_available_and_ready_only_after_the_caches_sync() {
    let Some(node) = node() else { return };
    let _turn = turn();
    // deploy/ and the chart install the same objects: the chart's release goes first.
    if node
        .helm(&["status", RELEASE, "-n", SYSTEM])
        .status
        .success()
    {
        node.helm_ok(&[
            "uninstall",
            RELEASE,
            "-n",
            SYSTEM,
            "--wait",
            "--timeout=120s",
        ]);
    }
    // Its pods gone and its Lease with them, so the Lease below is deploy/'s.
    wait_until("the chart's pods are gone", 120, || {
        node.get(&["-n", SYSTEM, "get", "pods"])["items"]
            .as_array()
            .is_none_or(Vec::is_empty)
    });
    node.kubectl_ok(
        &[
            "-n",
            SYSTEM,
            "delete",
            "lease",
            "kmsgrant-operator",
            "--ignore-not-found",
        ],
        None,
    );
    let _cleanup = KustomizeCleanup {
        node,
        crds_before: node
            .kubectl(&["get", "crd", "kmsgrants.kmsgrant.io"], None)
            .status
            .success(),
    };
    let rendered = node.kubectl_ok(&["kustomize", &format!("{REPO}/deploy")], None);
    let objects: Vec<Value> = serde_saphyr::from_str_multiple::<Value, Vec<Value>>(&rendered)
        .unwrap()
        .into_iter()
        .filter(|object| !object.is_null())
        .collect();
    // Everything but the ClusterRoleBindings: the operator cannot list KmsGrants, so the leader's
    // caches cannot sync, and it must not report Ready.
    let (bindings, rest): (Vec<Value>, Vec<Value>) = objects
        .into_iter()
        .partition(|o| o["kind"] == "ClusterRoleBinding");
    assert!(!bindings.is_empty(), "deploy/ has no ClusterRoleBinding");
    node.apply(&json!({"apiVersion": "v1", "kind": "List", "items": rest}));

    // The leader runs but is not Ready: its /readyz answers 503 (the standby is Ready as a
    // standby, and takes three failed probes to turn unready should it become the leader).
    let mut leader = String::new();
    wait_until(
        "a running leader pod, not Ready, whose readiness probe fails with 503",
        180,
        || {
            let Some(pod) = node.lease_holder_pod(SYSTEM, "kmsgrant-operator") else {
                return false;
            };
            // The holder may be a pod on its way out; only a live one counts.
            let found = node.kubectl(&["-n", SYSTEM, "get", "pod", &pod, "-o", "json"], None);
            let Ok(status) = serde_json::from_slice::<Value>(&found.stdout) else {
                return false;
            };
            let container = &status["status"]["containerStatuses"][0];
            if !status["metadata"]["deletionTimestamp"].is_null()
                || container["ready"] != false
                || !container["state"]["running"].is_object()
            {
                return false;
            }
            let events = node.get(&[
                "-n",
                SYSTEM,
                "get",
                "events",
                "--field-selector",
                &format!("involvedObject.name={pod}"),
            ]);
            leader = pod;
            events["items"].as_array().unwrap().iter().any(|e| {
                e["reason"] == "Unhealthy"
                    && e["message"]
                        .as_str()
                        .unwrap_or_default()
                        .contains("Readiness probe failed")
                    && e["message"].as_str().unwrap_or_default().contains("503")
            })
        },
    );
    let deployment = node.get(&["-n", SYSTEM, "get", "deployment", "kmsgrant-operator"]);
    let available = deployment["status"]["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == "Available").cloned());
    assert_ne!(
        available.map(|c| c["status"].clone()),
        Some(json!("True")),
        "{deployment}"
    );

    let started = Instant::now();
    node.apply(&json!({"apiVersion": "v1", "kind": "List", "items": bindings}));
    node.wait_available(SYSTEM, "kmsgrant-operator", 120);
    eprintln!(
        "figure: deploy/ Available {:.1} s after its RBAC let the caches sync; {}",
        started.elapsed().as_secs_f64(),
        node.pod_start_to_ready(SYSTEM)
    );
    let leader_pod = node.get(&["-n", SYSTEM, "get", "pod", &leader]);
    assert_eq!(leader_pod["status"]["containerStatuses"][0]["ready"], true);
}

/// Removes what `kubectl apply -k deploy/` created, even when the test fails, so the chart can
/// be installed next: the namespace, the cluster-wide RBAC, and the CRDs if they were new.
struct KustomizeCleanup {
    node: &'static Node,
    crds_before: bool,
}

impl Drop for KustomizeCleanup {
    fn drop(&mut self) {
        let node = self.node;
        node.kubectl(&["delete", "namespace", SYSTEM, "--timeout=120s"], None);
        node.kubectl(
            &[
                "delete",
                "clusterrole,clusterrolebinding",
                "-l",
                "app.kubernetes.io/part-of=kmsgrant-operator",
            ],
            None,
        );
        node.kubectl(
            &[
                "delete",
                "validatingadmissionpolicy,validatingadmissionpolicybinding",
                "kmsgrant-guardrails",
                "--ignore-not-found",
            ],
            None,
        );
        if !self.crds_before {
            node.kubectl(
                &[
                    "delete",
                    "crd",
                    "kmsgrants.kmsgrant.io",
                    "kmsproviderconfigs.kmsgrant.io",
                    "kmskeypolicies.kmsgrant.io",
                ],
                None,
            );
        }
    }
}

#[test]
fn helm_install_with_chart_defaults_readies_the_seed_grant_through_the_pod_network() {
    let Some(node) = node() else { return };
    let _turn = turn();
    node.helm_release();
    let deployment = node.get(&["-n", SYSTEM, "get", "deployment", RELEASE]);
    assert_eq!(deployment["status"]["readyReplicas"], 2, "{deployment}");
    let image = &deployment["spec"]["template"]["spec"]["containers"][0]["image"];
    assert_eq!(
        image, "ghcr.io/kmsgrant/kmsgrant-operator:0.1.0",
        "the chart's default image"
    );

    let before = node.last_call();
    let seed = yaml_file("deploy/examples/kmsgrant-seed.yaml");
    node.apply(&seed);
    node.wait_grant_ready("app-encrypt", 120);

    let leader = node.lease_holder_pod(SYSTEM, RELEASE).expect("a leader");
    let leader_ip = node.pod_ip(SYSTEM, &leader);
    let pod_range = &node.ranges[1].1;
    assert!(
        in_range(leader_ip, pod_range),
        "leader {leader} at {leader_ip}, outside {pod_range}"
    );
    let writes = node.writes_after(before);
    let create = writes
        .iter()
        .find(|call| call.operation == "create-grant" && call.key_id.as_deref() == Some(SEED_KEY))
        .unwrap_or_else(|| panic!("no create-grant on the seed key: {writes:?}"));
    assert_eq!(
        create.peer,
        Some(leader_ip),
        "the grant was created from the leader pod"
    );
    assert_eq!(node.emulator.grant_count(SEED_KEY), Some(1));
}

#[test]
fn operator_pods_run_as_65532_with_a_read_only_root_no_capabilities_and_runtime_default_seccomp() {
    let Some(node) = node() else { return };
    let _turn = turn();
    node.helm_release();
    for pod in node.operator_pods(SYSTEM) {
        let name = pod["metadata"]["name"].as_str().unwrap();
        let pid = node.container_pid(SYSTEM, name);
        // What the kernel enforces on the process, not what the manifest asks for.
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let field = |key: &str| {
            status
                .lines()
                .find_map(|line| line.strip_prefix(&format!("{key}:")))
                .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
                .split_whitespace()
                .collect::<Vec<_>>()
        };
        assert_eq!(field("Uid"), ["65532"; 4], "{name}: uids");
        assert_eq!(field("Gid"), ["65532"; 4], "{name}: gids");
        for caps in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
            assert_eq!(field(caps), ["0000000000000000"], "{name}: {caps}");
        }
        assert_eq!(field("NoNewPrivs"), ["1"], "{name}: no_new_privs");
        assert_eq!(
            field("Seccomp"),
            ["2"],
            "{name}: seccomp filter mode (RuntimeDefault)"
        );
        let mounts = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
        let root = mounts
            .lines()
            .find(|line| line.split_whitespace().nth(4) == Some("/"))
            .unwrap();
        let options = root.split_whitespace().nth(5).unwrap();
        assert!(
            options.split(',').any(|o| o == "ro"),
            "{name}: root mounted {options}"
        );
        let root_dir = format!("/proc/{pid}/root");
        for shell in ["bin/sh", "bin/bash", "usr/bin/sh", "busybox"] {
            assert!(
                !Path::new(&root_dir).join(shell).exists(),
                "{name}: the image has {shell}"
            );
        }
    }
}

#[test]
fn operator_logs_are_json_lines_without_the_secret() {
    let Some(node) = node() else { return };
    let _turn = turn();
    node.helm_release();
    // Some traffic to log: a grant through the seed provider.
    let key = node.new_key("logs");
    node.apply(&node.grant("logs-grant", &key));
    node.wait_grant_ready("logs-grant", 120);
    let secret = node.emulator_config.secret_key.as_str();
    let mut lines = 0;
    for pod in node.operator_pods(SYSTEM) {
        let name = pod["metadata"]["name"].as_str().unwrap();
        let logs = node.kubectl_ok(&["-n", SYSTEM, "logs", name], None);
        for line in logs.lines().filter(|l| !l.trim().is_empty()) {
            let parsed: Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{name}: not JSON ({e}): {line}"));
            assert!(parsed.is_object(), "{name}: {line}");
            assert!(
                !line.contains(secret),
                "{name} logged the secret key: {line}"
            );
            lines += 1;
        }
    }
    assert!(lines > 0, "no log lines at all");
    node.kubectl_ok(
        &[
            "-n",
            "default",
            "delete",
            "kmsgrants.kmsgrant.io",
            "logs-grant",
            "--timeout=60s",
        ],
        None,
    );
}

#[test]
fn failover_moves_the_lease_and_the_old_leader_writes_nothing_after_the_new_one() {
    let Some(node) = node() else { return };
    let _turn = turn();
    node.helm_release();
    let key = node.new_key("failover");

    // 1. `kubectl delete pod` of the leader: SIGTERM, drain, lease released.
    let old = node.lease_holder_pod(SYSTEM, RELEASE).expect("a leader");
    let old_ip = node.pod_ip(SYSTEM, &old);
    let before = node.last_call();
    let started = Instant::now();
    node.kubectl_ok(&["-n", SYSTEM, "delete", "pod", &old, "--wait=false"], None);
    let mut new = String::new();
    wait_until("another pod holds the Lease", 60, || {
        match node.lease_holder_pod(SYSTEM, RELEASE) {
            Some(holder) if holder != old => {
                new = holder;
                true
            }
            _ => false,
        }
    });
    let moved = started.elapsed();
    node.apply(&node.grant("failover-1", &key));
    node.wait_grant_ready("failover-1", 120);
    eprintln!(
        "figure: leader pod deleted -> Lease moved in {:.1} s, new grant Ready after {:.1} s",
        moved.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    let new_ip = node.pod_ip(SYSTEM, &new);
    let writes = node.writes_after(before);
    let first_new = writes
        .iter()
        .find(|call| call.peer == Some(new_ip))
        .unwrap_or_else(|| panic!("no write from the new leader {new} ({new_ip}): {writes:?}"));
    let late: Vec<&CallRecord> = writes
        .iter()
        .filter(|call| call.peer == Some(old_ip) && call.seq > first_new.seq)
        .collect();
    assert!(
        late.is_empty(),
        "the old leader {old} wrote after the new one's first write: {late:?}"
    );
    assert!(
        writes
            .iter()
            .all(|call| call.peer == Some(old_ip) || call.peer == Some(new_ip)),
        "{writes:?}"
    );

    // 2. SIGKILL of the leader's process: no drain, no release; the Lease must still end up held
    //    by a live process that converges a new grant.
    node.wait_available(SYSTEM, RELEASE, 120);
    let victim = node.lease_holder_pod(SYSTEM, RELEASE).expect("a leader");
    let pid = node.container_pid(SYSTEM, &victim);
    let lease_before = node.get(&["-n", SYSTEM, "get", "lease", RELEASE]);
    let before = node.last_call();
    let started = Instant::now();
    let killed = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    node.apply(&node.grant("failover-2", &key));
    node.wait_grant_ready("failover-2", 120);
    let lease_after = node.get(&["-n", SYSTEM, "get", "lease", RELEASE]);
    let holder = lease_after["spec"]["holderIdentity"].as_str().unwrap();
    assert_ne!(
        lease_before["spec"]["renewTime"], lease_after["spec"]["renewTime"],
        "the Lease is renewed by a live process after the kill"
    );
    let holder_pod = node.lease_holder_pod(SYSTEM, RELEASE).unwrap();
    let holder_ip = node.pod_ip(SYSTEM, &holder_pod);
    let writes = node.writes_after(before);
    assert!(!writes.is_empty());
    assert!(
        writes.iter().all(|call| call.peer == Some(holder_ip)),
        "writes after the kill come from the current leader {holder} only: {writes:?}"
    );
    eprintln!(
        "figure: leader SIGKILLed -> Lease held by {holder} (transitions {} -> {}), new grant Ready after {:.1} s",
        lease_before["spec"]["leaseTransitions"],
        lease_after["spec"]["leaseTransitions"],
        started.elapsed().as_secs_f64()
    );
    for name in ["failover-1", "failover-2"] {
        node.kubectl_ok(
            &[
                "-n",
                "default",
                "delete",
                "kmsgrants.kmsgrant.io",
                name,
                "--timeout=60s",
            ],
            None,
        );
    }
    assert_eq!(node.emulator.grant_count(&key), Some(0));
}

#[test]
fn deleting_the_leader_pod_during_50_creates_drains_within_the_grace_period_without_duplicates() {
    let Some(node) = node() else { return };
    let _turn = turn();
    node.helm_release();
    node.wait_available(SYSTEM, RELEASE, 120);
    let key = node.new_key("drain");
    let leader = node.lease_holder_pod(SYSTEM, RELEASE).expect("a leader");
    let grace =
        node.get(&["-n", SYSTEM, "get", "pod", &leader])["spec"]["terminationGracePeriodSeconds"]
            .as_i64()
            .unwrap();

    // Every status update of the leader pod until it is gone: its container's last state.
    let mut watch = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(&node.kubeconfig)
        .args([
            "-n",
            SYSTEM,
            "get",
            "pod",
            &leader,
            "--watch",
            "--output-watch-events",
            "-o",
            "json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = watch.stdout.take().unwrap();
    let watcher = std::thread::spawn(move || {
        let mut terminated = None;
        let mut text = String::new();
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            text.push_str(&line);
            text.push('\n');
            // kubectl prints one pretty JSON object per event.
            let Ok(event) = serde_json::from_str::<Value>(&text) else {
                continue;
            };
            text.clear();
            let state = &event["object"]["status"]["containerStatuses"][0]["state"]["terminated"];
            if state.is_object() {
                terminated = Some((
                    state.clone(),
                    event["object"]["metadata"]["deletionTimestamp"].clone(),
                ));
            }
            if event["type"] == "DELETED" {
                break;
            }
        }
        terminated
    });

    // Every KMS call takes half a second, so the leader has calls in flight when it is deleted.
    node.emulator
        .set_faults(FaultSettings {
            latency_ms: 500,
            ..FaultSettings::default()
        })
        .unwrap();
    let names: Vec<String> = (0..50).map(|i| format!("drain-{i:02}")).collect();
    let items: Vec<Value> = names.iter().map(|name| node.grant(name, &key)).collect();
    node.apply(&json!({"apiVersion": "v1", "kind": "List", "items": items}));
    // Delete once the leader is mid-way: some grants created, most not yet.
    wait_until("the leader started creating grants", 60, || {
        node.emulator.grant_count(&key).unwrap_or(0) >= 3
    });
    let started = Instant::now();
    node.kubectl_ok(
        &["-n", SYSTEM, "delete", "pod", &leader, "--wait=false"],
        None,
    );
    let created_at_delete = node.emulator.grant_count(&key).unwrap_or(0);
    let terminated = watcher.join().unwrap();
    let _ = watch.kill();
    let _ = watch.wait();
    node.emulator.set_faults(FaultSettings::default()).unwrap();
    let (state, deletion) =
        terminated.expect("the leader pod's container terminated state was seen");
    eprintln!(
        "figure: leader pod deleted during 50 creates ({created_at_delete} created by then); container exited {} ({}) {:.1} s after the delete (grace {grace} s)",
        state["exitCode"],
        state["reason"],
        started.elapsed().as_secs_f64()
    );
    // Exit code 0: the process drained and exited on SIGTERM; 137 would be the kubelet's SIGKILL
    // at the end of the grace period.
    assert_eq!(state["exitCode"], 0, "{state}");
    let (Some(deleted), Some(finished)) = (timestamp(&deletion), timestamp(&state["finishedAt"]))
    else {
        panic!("timestamps: {deletion} {state}")
    };
    assert!(
        finished - deleted <= grace,
        "finished {finished}, deleted {deleted}, grace {grace}"
    );

    for name in &names {
        node.wait_grant_ready(name, 180);
    }
    let grants = node.emulator.dump();
    let mut by_name: BTreeMap<String, usize> = BTreeMap::new();
    for grant in grants.grants.iter().filter(|g| g.key_id == key) {
        *by_name
            .entry(grant.name.clone().unwrap_or_default())
            .or_default() += 1;
    }
    let duplicates: Vec<_> = by_name.iter().filter(|(_, n)| **n > 1).collect();
    assert!(duplicates.is_empty(), "duplicate grants: {duplicates:?}");
    assert_eq!(by_name.len(), names.len(), "grants on the key: {by_name:?}");
    // Each grant is named for its object's identity, k8s/<cluster>/default/<object>.
    assert_eq!(
        by_name
            .keys()
            .filter_map(|name| name.strip_prefix("k8s/"))
            .filter_map(|rest| rest
                .split_once("/default/")
                .map(|(_, object)| object.to_owned()))
            .collect::<BTreeSet<_>>(),
        names.iter().cloned().collect::<BTreeSet<_>>()
    );
    let mut delete = vec![
        "-n",
        "default",
        "delete",
        "kmsgrants.kmsgrant.io",
        "--timeout=120s",
    ];
    delete.extend(names.iter().map(String::as_str));
    node.kubectl_ok(&delete, None);
    assert_eq!(node.emulator.grant_count(&key), Some(0));
}

#[test]
fn helm_upgrade_applies_a_changed_value_and_uninstall_keeps_the_crds_and_grants() {
    let Some(node) = node() else { return };
    let _turn = turn();
    node.helm_release();
    let grant = node.grant("kept-grant", &node.new_key("kept"));
    node.apply(&grant);
    node.wait_grant_ready("kept-grant", 120);

    node.helm_ok(&[
        "upgrade",
        RELEASE,
        &format!("{REPO}/charts/kmsgrant-operator"),
        "-n",
        SYSTEM,
        "--reuse-values",
        "--set",
        "logLevel=debug",
    ]);
    node.kubectl_ok(
        &[
            "-n",
            SYSTEM,
            "rollout",
            "status",
            &format!("deployment/{RELEASE}"),
            "--timeout=180s",
        ],
        None,
    );
    let deployment = node.get(&["-n", SYSTEM, "get", "deployment", RELEASE]);
    let args = &deployment["spec"]["template"]["spec"]["containers"][0]["args"];
    assert!(
        args.as_array()
            .unwrap()
            .iter()
            .any(|a| a == "--log-level=debug"),
        "{args}"
    );
    for pod in node.operator_pods(SYSTEM) {
        assert!(
            pod["spec"]["containers"][0]["args"]
                .as_array()
                .unwrap()
                .iter()
                .any(|a| a == "--log-level=debug")
        );
    }
    node.wait_available(SYSTEM, RELEASE, 120);

    node.helm_ok(&[
        "uninstall",
        RELEASE,
        "-n",
        SYSTEM,
        "--wait",
        "--timeout=120s",
    ]);
    assert!(
        !node
            .kubectl(&["-n", SYSTEM, "get", "deployment", RELEASE], None)
            .status
            .success()
    );
    for crd in [
        "kmsgrants.kmsgrant.io",
        "kmsproviderconfigs.kmsgrant.io",
        "kmskeypolicies.kmsgrant.io",
    ] {
        assert!(
            node.kubectl(&["get", "crd", crd], None).status.success(),
            "{crd} was deleted"
        );
    }
    let kept = node.get(&[
        "-n",
        "default",
        "get",
        "kmsgrants.kmsgrant.io",
        "kept-grant",
    ]);
    assert!(kept["metadata"]["deletionTimestamp"].is_null(), "{kept}");
    // Reinstalled for whatever runs next; it takes the kept grant over.
    node.helm_release();
    node.kubectl_ok(
        &[
            "-n",
            "default",
            "delete",
            "kmsgrants.kmsgrant.io",
            "kept-grant",
            "--timeout=60s",
        ],
        None,
    );
}

#[test]
fn packets_to_unused_addresses_of_the_node_ranges_are_dropped_on_this_machine() {
    let Some(node) = node() else { return };
    let _turn = turn();
    let services = node.get(&["get", "services", "-A"]);
    let cluster_ips: BTreeSet<String> = services["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["spec"]["clusterIP"].as_str().map(str::to_owned))
        .collect();
    let pods = node.get(&["get", "pods", "-A"]);
    let pod_ips: BTreeSet<String> = pods["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["status"]["podIP"].as_str().map(str::to_owned))
        .collect();
    let default_route = String::from_utf8(
        Command::new("ip")
            .args(["-4", "route", "show", "default"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let uplink = default_route
        .split_whitespace()
        .skip_while(|w| *w != "dev")
        .nth(1)
        .map(str::to_owned);

    for (name, range) in &node.ranges {
        let base = range
            .split('/')
            .next()
            .unwrap()
            .rsplit_once('.')
            .unwrap()
            .0
            .to_owned();
        let unused = (200..255)
            .map(|n| format!("{base}.{n}"))
            .find(|ip| !cluster_ips.contains(ip) && !pod_ips.contains(ip))
            .unwrap();
        // Routed onto the node's bridge, where nothing answers: it never reaches another interface.
        let route = String::from_utf8(
            Command::new("ip")
                .args(["route", "get", &unused])
                .output()
                .unwrap()
                .stdout,
        )
        .unwrap();
        assert!(
            route.contains(&format!("dev {} ", node.bridge)),
            "{name} {unused}: {route}"
        );
        assert!(!route.contains(" via "), "{name} {unused}: {route}");
        // Forced out of the machine's uplink (as a stray policy route would), the guard drops it
        // before it leaves: the kernel refuses the send.
        let Some(uplink) = &uplink else { continue };
        let sent = Command::new("python3")
            .args([
                "-c",
                "import socket,sys\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n\
                 s.setsockopt(socket.SOL_SOCKET,socket.SO_BINDTODEVICE,sys.argv[1].encode())\n\
                 try:\n    s.sendto(b'x',(sys.argv[2],9)); print('sent')\n\
                 except PermissionError: print('dropped')",
                uplink,
                &unused,
            ])
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&sent.stdout).trim(),
            "dropped",
            "{name} {unused} via {uplink}: {sent:?}"
        );
    }
    let forward = Command::new("iptables")
        .args([
            "-w",
            "-t",
            "mangle",
            "-C",
            "FORWARD",
            "-i",
            &node.bridge,
            "!",
            "-o",
            &node.bridge,
            "-j",
            "DROP",
        ])
        .status()
        .unwrap();
    assert!(
        forward.success(),
        "no rule dropping forwarding from the pod bridge to other interfaces"
    );
}

#[test]
fn the_dockerfile_local_target_builds_without_a_pull_and_its_image_starts() {
    let Some(node) = node() else { return };
    let _turn = turn();
    let tag = "localhost/kmsgrant-operator:dockerfile";
    let image = node.dir.join("dockerfile-image.tar");
    let built = Command::new(script("image"))
        .args([
            "--dockerfile",
            "--binary",
            OPERATOR_BIN,
            "--tag",
            tag,
            "--out",
        ])
        .arg(&image)
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(
        built.status.success(),
        "scripts/image --dockerfile failed (messages above)"
    );
    let loaded = Command::new(script("node-cluster"))
        .arg("load")
        .arg(&node.dir)
        .arg(&image)
        .output()
        .unwrap();
    assert!(
        loaded.status.success(),
        "{}",
        String::from_utf8_lossy(&loaded.stderr)
    );
    // Under the restricted profile, as the Deployment runs it; `crd` prints and exits.
    node.apply(&json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "dockerfile-image", "namespace": "default"},
        "spec": {
            "restartPolicy": "Never",
            "securityContext": {"runAsNonRoot": true, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": "operator", "image": tag, "imagePullPolicy": "Never", "args": ["crd"],
                "securityContext": {
                    "allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
                    "capabilities": {"drop": ["ALL"]}
                }
            }]
        }
    }));
    wait_until("the Dockerfile's image ran to completion", 120, || {
        let pod = node.get(&["-n", "default", "get", "pod", "dockerfile-image"]);
        let phase = pod["status"]["phase"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert_ne!(phase, "Failed", "{pod}");
        phase == "Succeeded"
    });
    let logs = node.kubectl_ok(&["-n", "default", "logs", "dockerfile-image"], None);
    assert!(logs.contains("kind: CustomResourceDefinition"), "{logs}");
    node.kubectl_ok(
        &["-n", "default", "delete", "pod", "dockerfile-image"],
        None,
    );
}

/// Keyless on the real node: the chart mounts a projected ServiceAccount token into the operator
/// pods (the kubelet writes and rotates it), the node cluster's own issuer is registered in the
/// emulator's IAM, and the `default` provider config names no Secret. The seed grant becomes
/// Ready created by the federated identity from the leader pod, with no cloud credential stored
/// anywhere in the cluster. Afterwards the AccessKey `default` of the other tests comes back.
#[test]
fn operator_pods_exchange_their_projected_token_and_ready_the_seed_grant_with_no_stored_credential()
{
    let Some(node) = node() else { return };
    let _turn = turn();
    node.helm_release();
    let audience = "kmsgrant-node";
    node.helm_ok(&[
        "upgrade",
        RELEASE,
        &format!("{REPO}/charts/kmsgrant-operator"),
        "-n",
        SYSTEM,
        "--reuse-values",
        "--set",
        "webIdentity.projectedToken.enabled=true",
        "--set",
        &format!("webIdentity.projectedToken.audience={audience}"),
        "--set",
        "webIdentity.projectedToken.expirationSeconds=600",
    ]);
    node.kubectl_ok(
        &[
            "-n",
            SYSTEM,
            "rollout",
            "status",
            &format!("deployment/{RELEASE}"),
            "--timeout=180s",
        ],
        None,
    );
    let deployment = node.get(&["-n", SYSTEM, "get", "deployment", RELEASE]);
    let account = deployment["spec"]["template"]["spec"]["serviceAccountName"]
        .as_str()
        .unwrap()
        .to_owned();

    // The cloud admin's steps (docs/keyless.md) against the emulator, with this cluster's issuer.
    let discovery: Value = serde_json::from_str(
        &node.kubectl_ok(&["get", "--raw", "/.well-known/openid-configuration"], None),
    )
    .unwrap();
    let jwks = node.kubectl_ok(&["get", "--raw", "/openid/v1/jwks"], None);
    let subject = format!("system:serviceaccount:{SYSTEM}:{account}");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::new();
        let config = &node.emulator_config;
        let login = http
            .post(format!("{}/v3/auth/tokens", node.emulator_url))
            .json(&json!({"auth": {"identity": {"methods": ["password"], "password": {"user": {
                "name": config.username, "password": config.password, "domain": {"name": config.domain_name}}}},
                "scope": {"domain": {"name": config.domain_name}}}}))
            .send()
            .await
            .unwrap();
        let token = login.headers()["x-subject-token"].to_str().unwrap().to_owned();
        for (method, path, body) in [
            (reqwest::Method::PUT, "/v3/OS-FEDERATION/identity_providers/node_cluster".to_owned(),
                json!({"identity_provider": {"sso_type": "virtual_user_sso", "enabled": true}})),
            (reqwest::Method::PUT, "/v3/OS-FEDERATION/mappings/node-operator".to_owned(),
                json!({"mapping": {"rules": [{"local": [{"user": {"name": "kmsgrant-operator"}}, {"group": {"name": "kms-grant-admins"}}],
                    "remote": [{"type": "sub", "any_one_of": [subject]}]}]}})),
            (reqwest::Method::PUT, "/v3/OS-FEDERATION/identity_providers/node_cluster/protocols/oidc".to_owned(),
                json!({"protocol": {"mapping_id": "node-operator"}})),
            (reqwest::Method::POST, "/v3.0/OS-FEDERATION/identity-providers/node_cluster/openid-connect-config".to_owned(),
                json!({"openid_connect_config": {"access_mode": "program", "idp_url": discovery["issuer"],
                    "client_id": audience, "signing_key": jwks.trim()}})),
        ] {
            let answer = http
                .request(method, format!("{}{path}", node.emulator_url))
                .header("X-Auth-Token", &token)
                .json(&body)
                .send()
                .await
                .unwrap();
            assert!(answer.status().is_success() || answer.status() == 409, "{path}: {}", answer.status());
        }
    });

    // No Secret: the default config exchanges the pods' projected token.
    node.kubectl_ok(
        &[
            "-n",
            SYSTEM,
            "delete",
            "secret",
            "kms-credentials",
            "--ignore-not-found",
        ],
        None,
    );
    let mut provider = yaml_file("deploy/examples/kmsproviderconfig-keyless.yaml");
    let spec = &mut provider["spec"];
    spec["endpoint"] = json!(node.emulator_url);
    spec["iamEndpoint"] = json!(node.emulator_url);
    spec["region"] = json!(node.emulator_config.region);
    spec["projectId"] = json!(node.emulator_config.project_id);
    spec.as_object_mut().unwrap().remove("projectName");
    spec["auth"]["webIdentity"]["identityProviderId"] = json!("node_cluster");
    node.apply(&provider);
    let credentials: Vec<String> = node.get(&["get", "secrets", "-A"])["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| {
            let keys: Vec<&str> = s["data"]
                .as_object()
                .map(|d| d.keys().map(String::as_str).collect())
                .unwrap_or_default();
            keys.iter()
                .any(|k| ["accessKey", "secretKey", "password", "securityToken"].contains(k))
        })
        .map(|s| format!("{}/{}", s["metadata"]["namespace"], s["metadata"]["name"]))
        .collect();
    assert!(
        credentials.is_empty(),
        "cloud credentials stored in the cluster: {credentials:?}"
    );

    // A key of the federated user (only a key's creator may revoke grants on it).
    let key = node
        .emulator
        .create_key(NewKey {
            key_alias: "keyless".into(),
            creator: Some(kms_emulator::federated_user_id(
                "node_cluster",
                "kmsgrant-operator",
            )),
            ..Default::default()
        })
        .unwrap()
        .key_id;
    let before = node.last_call();
    let mut grant = yaml_file("deploy/examples/kmsgrant-seed.yaml");
    grant["metadata"]["name"] = json!("keyless-seed");
    grant["spec"]["keyId"] = json!(key);
    node.apply(&grant);
    node.wait_grant_ready("keyless-seed", 120);
    let create = node
        .writes_after(before)
        .into_iter()
        .find(|call| call.operation == "create-grant")
        .expect("a create-grant");
    assert_ne!(
        create.caller.as_deref(),
        Some(node.emulator_config.user_id.as_str()),
        "created by the federated identity, not the IAM user"
    );
    let leader = node.lease_holder_pod(SYSTEM, RELEASE).expect("a leader");
    assert_eq!(
        create.peer,
        Some(node.pod_ip(SYSTEM, &leader)),
        "from the leader pod"
    );
    let exchanges = node
        .emulator
        .calls(0)
        .into_iter()
        .filter(|c| c.operation == "iam:id-token" && c.status == 201)
        .count();
    assert!(exchanges >= 1);
    eprintln!(
        "figure: keyless seed grant Ready on the node after {exchanges} ID-token exchange(s)"
    );

    // Revoked keyless too; then the other tests' AccessKey default is back.
    let deleted = node.kubectl(
        &[
            "-n",
            "default",
            "delete",
            "kmsgrant",
            "keyless-seed",
            "--timeout=120s",
        ],
        None,
    );
    if !deleted.status.success() {
        let grant = node.kubectl(
            &[
                "-n",
                "default",
                "get",
                "kmsgrant",
                "keyless-seed",
                "-o",
                "yaml",
            ],
            None,
        );
        let logs = node.kubectl(&["-n", SYSTEM, "logs", &leader, "--tail=60"], None);
        panic!(
            "keyless-seed not deleted: {}\n{}\n{}",
            String::from_utf8_lossy(&deleted.stderr),
            String::from_utf8_lossy(&grant.stdout),
            String::from_utf8_lossy(&logs.stdout)
        );
    }
    assert_eq!(node.emulator.grant_count(&key), Some(0), "revoked");
    node.seed_provider(SYSTEM);
}
