//! Shared by the end-to-end tests: a real kube-apiserver + etcd, kubectl, and the CRDs.
//!
//! `scripts/test` starts one control plane for the whole run and passes its kubeconfig in
//! `KMSGRANT_TEST_KUBECONFIG`. Without it (a plain `cargo test`), each test binary starts its own
//! through `scripts/control-plane`, which stops when the test process exits. When neither works the
//! tests fail and say why: nothing is skipped.
#![allow(dead_code)] // Each test binary uses its own part of this module.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

pub const REPO: &str = env!("CARGO_MANIFEST_DIR");
pub const OPERATOR_BIN: &str = env!("CARGO_BIN_EXE_kmsgrant-operator");

static KUBECONFIG: OnceLock<PathBuf> = OnceLock::new();

/// The kubeconfig of the control plane this test process uses.
pub fn kubeconfig() -> &'static Path {
    KUBECONFIG.get_or_init(|| {
        if let Some(path) = std::env::var_os("KMSGRANT_TEST_KUBECONFIG") {
            let path = PathBuf::from(path);
            assert!(
                path.is_file(),
                "KMSGRANT_TEST_KUBECONFIG={} does not exist",
                path.display()
            );
            return path;
        }
        start_control_plane("kmsgrant-test")
    })
}

/// Starts a control plane of this process's own in a temporary directory (stopped when the
/// process exits) and returns its kubeconfig.
fn start_control_plane(prefix: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("{prefix}-{}", std::process::id()));
    let output = Command::new(Path::new(REPO).join("scripts/control-plane"))
        .arg("up")
        .arg(&dir)
        .args(["--owner-pid", &std::process::id().to_string()])
        .stderr(Stdio::inherit())
        .output()
        .expect("cannot run scripts/control-plane");
    assert!(
        output.status.success(),
        "the local control plane did not start (scripts/control-plane up {}): see its messages above",
        dir.display()
    );
    dir.join("kubeconfig")
}

/// A control plane owned by this test process alone, even under `scripts/test` (whose shared one
/// other test processes use), so that the test may restart its API server. Every helper here uses
/// it from then on; call it before anything else talks to an API server. Returns its directory,
/// for [`restart_api_server`].
pub fn own_control_plane() -> PathBuf {
    let kubeconfig = start_control_plane("kmsgrant-own");
    let dir = kubeconfig.parent().unwrap().to_path_buf();
    assert!(
        KUBECONFIG.set(kubeconfig).is_ok(),
        "own_control_plane() must come before anything uses the shared control plane"
    );
    dir
}

/// Restarts the kube-apiserver of a control plane from [`own_control_plane`] (SIGTERM, then a new
/// process on the same port; etcd and its data stay up) and returns once it answers `/readyz`.
pub fn restart_api_server(dir: &Path) {
    let output = Command::new(Path::new(REPO).join("scripts/control-plane"))
        .arg("restart-apiserver")
        .arg(dir)
        .stderr(Stdio::inherit())
        .output()
        .expect("cannot run scripts/control-plane");
    assert!(
        output.status.success(),
        "scripts/control-plane restart-apiserver {} failed: see its messages above",
        dir.display()
    );
}

/// Stops a control plane from [`own_control_plane`] and removes its directory (its etcd data and
/// logs); a failing test returns before this and keeps them for a look.
pub fn remove_own_control_plane(dir: &Path) {
    let _ = Command::new(Path::new(REPO).join("scripts/control-plane"))
        .arg("down")
        .arg(dir)
        .output();
    let _ = std::fs::remove_dir_all(dir);
}

/// Runs kubectl against the test control plane.
pub fn kubectl(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig())
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl must be installed");
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

/// Runs kubectl and returns stdout, failing the test with kubectl's stderr when it fails.
pub fn kubectl_ok(args: &[&str], stdin: Option<&str>) -> String {
    let out = kubectl(args, stdin);
    assert!(
        out.status.success(),
        "kubectl {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Installs the CRDs exactly as a person would, `kmsgrant-operator crd | kubectl apply -f -`, and waits until they are
/// Established. Once per test process.
pub fn install_crds() {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        let crds = Command::new(OPERATOR_BIN).arg("crd").output().unwrap();
        assert!(crds.status.success(), "kmsgrant-operator crd failed");
        kubectl_ok(
            &["apply", "--server-side", "--force-conflicts", "-f", "-"],
            Some(&String::from_utf8(crds.stdout).unwrap()),
        );
        kubectl_ok(
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
        // Established comes before the API server has published the schema to OpenAPI, which
        // `kubectl explain` and client-side tooling read.
        for kind in ["kmsgrant", "kmsproviderconfig", "kmskeypolicy"] {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
            while !kubectl(&["explain", kind], None).status.success() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the {kind} schema was never published to OpenAPI"
                );
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
        }
    });
}

/// A namespace of its own for one test, so tests can run in parallel against one API server.
pub fn namespace(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let name = format!(
        "{prefix}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    kubectl_ok(&["create", "namespace", &name], None);
    name
}

/// One end-to-end world per test: a namespace, an emulator, a provider config named after the
/// namespace, and an operator process that sees only these (by namespace and label), so tests run
/// in parallel against one API server without seeing each other.
pub struct Env {
    pub namespace: String,
    pub provider: String,
    pub emulator: kms_emulator::RunningEmulator,
    pub operator: Option<Operator>,
    resync: &'static str,
}

pub const TEST_LABEL: &str = "kmsgrant.io/test";
/// The cluster name test operators run with (`--cluster-name`).
pub const CLUSTER: &str = "e2e";

impl Env {
    /// A world with a `default`-like provider config named after the namespace.
    pub async fn new(
        prefix: &str,
        emulator: kms_emulator::EmulatorConfig,
        resync: &'static str,
    ) -> Self {
        install_crds();
        let namespace = namespace(prefix);
        kubectl_ok(
            &[
                "label",
                "namespace",
                &namespace,
                &format!("{TEST_LABEL}={namespace}"),
            ],
            None,
        );
        let emulator = kms_emulator::Emulator::start(emulator).await.unwrap();
        let env = Self {
            provider: namespace.clone(),
            namespace,
            emulator,
            operator: None,
            resync,
        };
        env.write_secret(env.emulator.config().secret_key.as_str());
        env.apply(&env.provider_config(serde_json::json!({})));
        env
    }

    /// The credentials Secret, with the given secret key.
    pub fn write_secret(&self, secret_key: &str) {
        let secret = serde_json::json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "kms-credentials", "namespace": self.namespace},
            "stringData": {"accessKey": self.emulator.config().access_key, "secretKey": secret_key}
        });
        self.apply(&secret);
    }

    /// The provider config, with `extra` merged into its spec.
    pub fn provider_config(&self, extra: serde_json::Value) -> serde_json::Value {
        let mut spec = serde_json::json!({
            "endpoint": self.emulator.base_url(),
            "iamEndpoint": self.emulator.base_url(),
            "region": self.emulator.config().region,
            "projectId": self.emulator.config().project_id,
            "auth": {"type": "AccessKey", "secretRef": {"namespace": self.namespace, "name": "kms-credentials"}},
            "rateLimit": {"requestsPerSecond": 1000, "burst": 1000}
        });
        for (k, v) in extra.as_object().unwrap() {
            spec[k] = v.clone();
        }
        serde_json::json!({
            "apiVersion": "kmsgrant.io/v1beta1", "kind": "KmsProviderConfig",
            "metadata": {"name": self.provider, "labels": {TEST_LABEL: self.namespace}},
            "spec": spec
        })
    }

    pub fn start_operator(&mut self) {
        self.operator = Some(Operator::start(&self.namespace, self.resync));
    }

    /// Starts the operator with extra flags (which override the defaults).
    pub fn start_operator_with(&mut self, extra: &[&str]) {
        self.operator = Some(Operator::start_with(&self.namespace, self.resync, extra));
    }

    /// SIGKILL, as a crash would.
    pub fn kill_operator(&mut self) {
        if let Some(mut operator) = self.operator.take() {
            operator.kill();
        }
    }

    pub fn apply(&self, manifest: &serde_json::Value) {
        kubectl_ok(&["apply", "-f", "-"], Some(&manifest.to_string()));
    }

    pub fn new_key(&self, alias: &str) -> String {
        let key = kms_emulator::NewKey {
            key_alias: alias.into(),
            ..Default::default()
        };
        self.emulator.admin().create_key(key).unwrap().key_id
    }

    /// A KmsGrant in this namespace using this provider.
    pub fn grant(&self, name: &str, key_id: &str, extra: serde_json::Value) -> serde_json::Value {
        let mut spec = serde_json::json!({
            "providerConfigRef": {"name": self.provider},
            "keyId": key_id,
            "granteePrincipal": "13gg44z4g2sglzk0egw0u726zoyzvrs8",
            "operations": ["describe-key", "create-datakey", "encrypt-datakey"],
        });
        for (k, v) in extra.as_object().unwrap() {
            spec[k] = v.clone();
        }
        serde_json::json!({
            "apiVersion": "kmsgrant.io/v1beta1", "kind": "KmsGrant",
            "metadata": {"name": name, "namespace": self.namespace, "labels": {TEST_LABEL: self.namespace}},
            "spec": spec
        })
    }

    pub fn get(&self, name: &str) -> serde_json::Value {
        get_grant(&self.namespace, name)
    }

    /// Waits for a condition, e.g. `condition=Ready` or `jsonpath={.status.conditions[?(@.type=="Stalled")].reason}=KeyNotFound`.
    pub fn wait_for(&self, name: &str, condition: &str, timeout_seconds: u32) {
        let out = kubectl(
            &[
                "-n",
                &self.namespace,
                "wait",
                &format!("--for={condition}"),
                &format!("--timeout={timeout_seconds}s"),
                &format!("kmsgrant/{name}"),
            ],
            None,
        );
        if !out.status.success() {
            let object = kubectl(
                &[
                    "-n",
                    &self.namespace,
                    "get",
                    "kmsgrants",
                    name,
                    "-o",
                    "yaml",
                ],
                None,
            );
            panic!(
                "{name} never reached {condition}: {}\n{}\noperator log: {}",
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&object.stdout),
                self.operator
                    .as_ref()
                    .map(|o| o.log.display().to_string())
                    .unwrap_or_default()
            );
        }
    }

    /// Waits until every KmsGrant of the test's namespace is Ready.
    pub fn wait_all_ready(&self, timeout_seconds: u32) {
        let out = kubectl(
            &[
                "-n",
                &self.namespace,
                "wait",
                "--for=condition=Ready",
                "kmsgrants.kmsgrant.io",
                "--all",
                &format!("--timeout={timeout_seconds}s"),
            ],
            None,
        );
        assert!(
            out.status.success(),
            "not every KmsGrant became Ready: {}\noperator log: {:?}",
            String::from_utf8_lossy(&out.stderr),
            self.operator.as_ref().map(|o| o.log.clone())
        );
    }

    /// The Ready condition's reason (or "" when absent).
    pub fn ready_reason(&self, name: &str) -> String {
        let object = self.get(name);
        object["status"]["conditions"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["type"] == "Ready"))
            .and_then(|c| c["reason"].as_str())
            .unwrap_or_default()
            .to_owned()
    }

    pub fn events(&self) -> Vec<serde_json::Value> {
        let list: serde_json::Value = serde_json::from_str(&kubectl_ok(
            &["-n", &self.namespace, "get", "events", "-o", "json"],
            None,
        ))
        .unwrap();
        list["items"].as_array().cloned().unwrap_or_default()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.kill_operator();
    }
}

/// `kmsgrant-operator run` as a child process, logging to a file.
pub struct Operator {
    child: std::process::Child,
    pub log: PathBuf,
}

impl Operator {
    pub fn start(namespace: &str, resync: &str) -> Self {
        Self::start_with(namespace, resync, &[])
    }

    /// Starts an operator with extra flags (which may override the defaults above).
    pub fn start_with(namespace: &str, resync: &str, extra: &[&str]) -> Self {
        Self::start_with_env(namespace, resync, extra, &[])
    }

    /// Starts an operator with extra flags and environment variables.
    pub fn start_with_env(
        namespace: &str,
        resync: &str,
        extra: &[&str],
        envs: &[(&str, &str)],
    ) -> Self {
        static STARTS: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join("kmsgrant-e2e");
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join(format!(
            "{namespace}-operator-{}.log",
            STARTS.fetch_add(1, Ordering::Relaxed)
        ));
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(OPERATOR_BIN)
            .args([
                "run",
                "--allow-http-endpoints",
                "--backoff-min",
                "200ms",
                "--backoff-max",
                "5s",
                "--stalled-retry",
                "5s",
                "--cluster-name",
                CLUSTER,
            ])
            .args([
                "--kubeconfig",
                kubeconfig().to_str().unwrap(),
                "--namespace",
                namespace,
                "--secret-namespace",
                namespace,
            ])
            .args([
                "--label-selector",
                &format!("{TEST_LABEL}={namespace}"),
                "--resync-interval",
                resync,
            ])
            .args([
                "--log-level",
                "kmsgrant=debug,info",
                "--admin-address",
                "127.0.0.1:0",
            ])
            .args(extra)
            .envs(envs.iter().copied())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("the operator starts");
        Self { child, log }
    }

    /// The process ID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status, once the process has exited.
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, as Kubernetes stops a pod; waits for the exit and returns its status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill runs");
        assert!(sent.success(), "cannot signal the operator");
        self.child.wait().expect("the operator exits")
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A TCP proxy between an operator and the API server that can be stalled: bytes stop flowing,
/// connections stay open (as a partitioned or frozen API server looks).
pub struct StallingProxy {
    pub port: u16,
    stalled: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl StallingProxy {
    /// A proxy in front of the test control plane's API server.
    pub async fn start() -> Self {
        let kubeconfig = std::fs::read_to_string(kubeconfig()).unwrap();
        let upstream = kubeconfig
            .lines()
            .find_map(|l| l.trim().strip_prefix("server: https://"))
            .unwrap()
            .to_owned();
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let stalled = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stalled.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                    continue;
                };
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                for (mut from, mut to) in [
                    (
                        Box::new(client_read) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
                        Box::new(server_write) as Box<dyn tokio::io::AsyncWrite + Unpin + Send>,
                    ),
                    (Box::new(server_read), Box::new(client_write)),
                ] {
                    let flag = flag.clone();
                    tokio::spawn(async move {
                        use tokio::io::{AsyncReadExt, AsyncWriteExt};
                        let mut buf = vec![0u8; 16 * 1024];
                        loop {
                            let Ok(n) = from.read(&mut buf).await else {
                                return;
                            };
                            if n == 0 {
                                return;
                            }
                            while flag.load(Ordering::SeqCst) {
                                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                            }
                            if to.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    });
                }
            }
        });
        Self { port, stalled }
    }

    pub fn stall(&self) {
        self.stalled
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn resume(&self) {
        self.stalled
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }

    /// A kubeconfig that reaches the API server through this proxy.
    pub fn kubeconfig(&self, name: &str) -> PathBuf {
        let original = std::fs::read_to_string(kubeconfig()).unwrap();
        let upstream = original
            .lines()
            .find_map(|l| l.trim().strip_prefix("server: https://"))
            .unwrap()
            .to_owned();
        let path = std::env::temp_dir().join(format!("{name}-proxied.kubeconfig"));
        let proxied = original.replace(&upstream, &format!("127.0.0.1:{}", self.port));
        std::fs::write(&path, proxied).unwrap();
        path
    }
}

/// Polls `check` every 200 ms until it holds; fails naming `what` after `timeout`. The one
/// polling loop of the end-to-end tests.
pub async fn eventually(
    what: &str,
    timeout: std::time::Duration,
    mut check: impl AsyncFnMut() -> bool,
) {
    let deadline = std::time::Instant::now() + timeout;
    while !check().await {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// The KmsGrant `name` in `namespace`, as JSON.
pub fn get_grant(namespace: &str, name: &str) -> serde_json::Value {
    serde_json::from_str(&kubectl_ok(
        &["-n", namespace, "get", "kmsgrants", name, "-o", "json"],
        None,
    ))
    .unwrap()
}

// What the audit and exclusive-mode tests share: a KMS client of their own (to make grants by
// hand), the drift passes in the emulator's call log, and the operator's /metrics.

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub async fn metrics(port: u16) -> String {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let Ok(response) = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .timeout(std::time::Duration::from_secs(2))
        .send()
        .await
    else {
        return String::new();
    };
    response.text().await.unwrap_or_default()
}

/// The value of one series (None when absent).
pub fn series(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        line.strip_prefix(name_and_labels)
            .and_then(|rest| rest.trim().split(' ').next()?.parse().ok())
    })
}

/// A client of the test's emulator (KMS and IAM), signed with its access key.
pub fn kms_client(env: &Env) -> kmsgrant_kms::KmsClient {
    kms_client_of(&env.emulator)
}

/// A client of `emulator` (KMS and IAM), signed with its access key.
pub fn kms_client_of(emulator: &kms_emulator::RunningEmulator) -> kmsgrant_kms::KmsClient {
    let settings = emulator.config();
    let mut config = kmsgrant_kms::ClientConfig::new(
        emulator.base_url(),
        kmsgrant_kms::Project::Id(settings.project_id.clone()),
        kmsgrant_kms::Credentials::AccessKey {
            keys: kmsgrant_kms::signer::AccessKeyPair::new(
                &settings.access_key,
                settings.secret_key.as_str(),
            ),
            security_token: None,
        },
    );
    config.iam_endpoint = Some(emulator.base_url());
    config.region = settings.region.clone();
    config.allow_http = true;
    kmsgrant_kms::KmsClient::new(config).unwrap()
}

pub async fn grant_by_hand(
    kms: &kmsgrant_kms::KmsClient,
    key: &str,
    grantee: &str,
    name: Option<&str>,
) -> String {
    kms.create_grant(&kmsgrant_kms::NewGrant {
        key_id: key.to_owned(),
        grantee_principal: grantee.to_owned(),
        grantee_principal_type: kmsgrant::api::GranteePrincipalType::User,
        operations: vec![
            kmsgrant::api::Operation::DescribeKey,
            kmsgrant::api::Operation::DecryptDatakey,
        ],
        name: name.map(str::to_owned),
        retiring_principal: None,
    })
    .await
    .unwrap()
}

/// The drift passes in the call log after `after`: each pass lists every key once, within
/// milliseconds, and passes are a resync apart. Waits for `passes` + 2 of them and returns the
/// middle `passes` (the first and the last may be cut by the window), each as the KMS calls made
/// from its first list to the next pass's first list, by operation and key.
pub async fn passes(
    env: &Env,
    after: u64,
    passes: usize,
) -> Vec<std::collections::BTreeMap<(String, String), usize>> {
    let admin = env.emulator.admin();
    let starts = |calls: &[kms_emulator::CallRecord]| -> Vec<usize> {
        let mut starts = Vec::new();
        let mut last_list: Option<u64> = None;
        for (i, call) in calls.iter().enumerate() {
            if call.operation != "list-grants" {
                continue;
            }
            if last_list.is_none_or(|at| call.at_ms > at + 1000) {
                starts.push(i);
            }
            last_list = Some(call.at_ms);
        }
        starts
    };
    eventually(
        &format!("{} drift passes", passes + 2),
        std::time::Duration::from_secs(120),
        async || starts(&admin.calls(after)).len() >= passes + 2,
    )
    .await;
    let calls = admin.calls(after);
    let starts = starts(&calls);
    starts
        .windows(2)
        .skip(1)
        .take(passes)
        .map(|w| {
            let mut by_call = std::collections::BTreeMap::new();
            for call in &calls[w[0]..w[1]] {
                *by_call
                    .entry((
                        call.operation.clone(),
                        call.key_id.clone().unwrap_or_default(),
                    ))
                    .or_default() += 1;
            }
            by_call
        })
        .collect()
}

pub fn last_seq(env: &Env) -> u64 {
    env.emulator
        .admin()
        .calls(0)
        .last()
        .map(|c| c.seq)
        .unwrap_or(0)
}

pub fn lists(
    pass: &std::collections::BTreeMap<(String, String), usize>,
) -> std::collections::BTreeMap<String, usize> {
    pass.iter()
        .filter(|((op, _), _)| op == "list-grants")
        .map(|((_, key), n)| (key.clone(), *n))
        .collect()
}

// Keyless: the control plane's own ServiceAccount issuer as an OpenID Connect identity provider in
// the emulator's IAM, set up with the cloud admin's documented calls (docs/keyless.md).

/// The user name `register_cluster_issuer`'s mapping gives the operator's ServiceAccount.
pub const FEDERATED_USER: &str = "kmsgrant-operator";

/// A key created by the federated user of identity provider `idp`: KMS lets only a key's creator
/// revoke grants on it, so keyless tests that delete grants use keys of the operator's identity.
pub fn federated_key(env: &Env, alias: &str, idp: &str) -> String {
    let key = kms_emulator::NewKey {
        key_alias: alias.into(),
        creator: Some(kms_emulator::federated_user_id(idp, FEDERATED_USER)),
        ..Default::default()
    };
    env.emulator.admin().create_key(key).unwrap().key_id
}

/// A password token of the emulator's default user (Security Administrator).
pub async fn admin_token(emulator: &kms_emulator::RunningEmulator) -> String {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let settings = emulator.config();
    let answer = reqwest::Client::new()
        .post(format!("{}/auth/tokens", emulator.iam_endpoint()))
        .json(&serde_json::json!({"auth": {"identity": {"methods": ["password"], "password": {"user": {
            "name": settings.username, "password": settings.password, "domain": {"name": settings.domain_name}}}},
            "scope": {"project": {"id": settings.project_id}}}}))
        .send()
        .await
        .unwrap();
    answer.headers()["x-subject-token"]
        .to_str()
        .unwrap()
        .to_owned()
}

/// One IAM management call as the default user; panics unless it succeeds.
pub async fn iam_admin(
    emulator: &kms_emulator::RunningEmulator,
    method: reqwest::Method,
    path: &str,
    body: serde_json::Value,
) {
    let token = admin_token(emulator).await;
    let answer = reqwest::Client::new()
        .request(method, format!("{}{path}", emulator.base_url()))
        .header("X-Auth-Token", token)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert!(
        answer.status().is_success(),
        "{path}: {}",
        answer.text().await.unwrap_or_default()
    );
}

/// The CCE guide's admin steps with this control plane as the issuer: identity provider `idp`,
/// a mapping admitting `subjects` only, the `oidc` protocol, and the OpenID Connect
/// configuration with the API server's issuer URL and JWKS and `client_id`.
pub async fn register_cluster_issuer(
    emulator: &kms_emulator::RunningEmulator,
    idp: &str,
    client_id: &str,
    subjects: &[String],
) {
    use reqwest::Method;
    use serde_json::json;
    iam_admin(
        emulator,
        Method::PUT,
        &format!("/v3/OS-FEDERATION/identity_providers/{idp}"),
        json!({"identity_provider": {"sso_type": "virtual_user_sso", "enabled": true, "description": "this cluster's ServiceAccounts"}}),
    )
    .await;
    iam_admin(
        emulator,
        Method::PUT,
        &format!("/v3/OS-FEDERATION/mappings/{idp}-mapping"),
        json!({"mapping": {"rules": [{"local": [{"user": {"name": FEDERATED_USER}}, {"group": {"name": "kms-grant-admins"}}],
            "remote": [{"type": "sub", "any_one_of": subjects}]}]}}),
    )
    .await;
    iam_admin(
        emulator,
        Method::PUT,
        &format!("/v3/OS-FEDERATION/identity_providers/{idp}/protocols/oidc"),
        json!({"protocol": {"mapping_id": format!("{idp}-mapping")}}),
    )
    .await;
    iam_admin(
        emulator,
        Method::POST,
        &format!("/v3.0/OS-FEDERATION/identity-providers/{idp}/openid-connect-config"),
        json!({"openid_connect_config": {"access_mode": "program", "idp_url": cluster_issuer(),
            "client_id": client_id, "signing_key": cluster_jwks()}}),
    )
    .await;
}

/// The API server's ServiceAccount issuer, from its discovery document.
pub fn cluster_issuer() -> String {
    let discovery: serde_json::Value = serde_json::from_str(&kubectl_ok(
        &["get", "--raw", "/.well-known/openid-configuration"],
        None,
    ))
    .unwrap();
    discovery["issuer"].as_str().unwrap().to_owned()
}

/// The API server's ServiceAccount signing keys (`/openid/v1/jwks`).
pub fn cluster_jwks() -> String {
    kubectl_ok(&["get", "--raw", "/openid/v1/jwks"], None)
        .trim()
        .to_owned()
}
