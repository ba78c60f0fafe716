//! Tenants with their own accounts (docs/tenants.md), on the real API server: two namespaces,
//! each with a `KmsNamespacedProviderConfig` on an emulator of its own (two accounts), one
//! operator watching both. Each tenant's grants land on its own account; a grant cannot use
//! another namespace's config, nor a config its Secret from another namespace; endpoints the
//! tenant policy refuses (loopback, the metadata address, a cluster Service address, a name
//! resolving to loopback, a redirect to loopback) are refused with no connection made to them
//! (counted on listeners of our own); deleting a tenant's objects revokes its grants and leaves
//! the other tenant's alone. A namespace over the platform's object limit gets no new grant,
//! and a condition naming the rule, until one of its objects goes.
//!
//! The emulators listen on 127.0.0.3, the only network the operator's tenant policy allows here
//! (`--tenant-allowed-networks 127.0.0.3/32`); the counting listeners sit on 127.0.0.1, which it
//! refuses like any loopback address.

mod support;

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use kms_emulator::EmulatorConfig;
use serde_json::{Value, json};
use support::{OPERATOR_BIN, TEST_LABEL, eventually, install_crds, kubectl, kubectl_ok};

const PRINCIPAL: &str = "13gg44z4g2sglzk0egw0u726zoyzvrs8";

/// A TCP listener that counts the connections made to it (and answers none).
struct CountingListener {
    address: std::net::SocketAddr,
    connections: Arc<AtomicUsize>,
}

impl CountingListener {
    async fn on(ip: &str) -> Self {
        let listener = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
        let address = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let count = connections.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                drop(stream);
            }
        });
        Self {
            address,
            connections,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

/// An HTTP server on 127.0.0.3 answering every request with a redirect to `target`.
async fn redirecting_to(target: String) -> String {
    let listener = tokio::net::TcpListener::bind(("127.0.0.3", 0))
        .await
        .unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut stream, _)) = listener.accept().await {
            let target = target.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let _ = stream.read(&mut buf).await;
                let answer = format!(
                    "HTTP/1.1 307 Temporary Redirect\r\nLocation: {target}/\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                );
                let _ = stream.write_all(answer.as_bytes()).await;
            });
        }
    });
    format!("http://{address}")
}

/// The operator watching every namespace, for objects carrying this run's label.
struct TenantOperator {
    child: Child,
}

impl TenantOperator {
    fn start(run: &str, log_name: &str) -> Self {
        Self::start_with(run, log_name, &[])
    }

    /// With `extra` flags after the others (a flag given twice takes its last value).
    fn start_with(run: &str, log_name: &str, extra: &[&str]) -> Self {
        let dir = std::env::temp_dir().join("kmsgrant-e2e");
        std::fs::create_dir_all(&dir).unwrap();
        let log = std::fs::File::create(dir.join(log_name)).unwrap();
        let child = Command::new(OPERATOR_BIN)
            .args(["run", "--cluster-name", support::CLUSTER])
            .args(["--kubeconfig", support::kubeconfig().to_str().unwrap()])
            .args(["--label-selector", &format!("{TEST_LABEL}={run}")])
            .args(["--resync-interval", "3s", "--backoff-max", "3s"])
            .args(["--stalled-retry", "3s", "--provider-check-interval", "3s"])
            .args(["--admin-address", "127.0.0.1:0"])
            .args(["--migrate-storage=false"])
            // The tenant policy: the emulators' address and names, plain http for them.
            .args(["--tenant-allowed-networks", "127.0.0.3/32"])
            .args(["--tenant-endpoint-hosts", "localhost"])
            .arg("--tenant-allow-http")
            .args(["--log-level", "kmsgrant=debug,info"])
            .args(extra)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        Self { child }
    }
}

impl Drop for TenantOperator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One tenant: a namespace, an emulator (its account) with a key, a Secret and a config.
struct Tenant {
    namespace: String,
    emulator: kms_emulator::RunningEmulator,
    key_id: String,
    run: String,
}

impl Tenant {
    async fn new(run: &str, prefix: &str) -> Self {
        let namespace = support::namespace(prefix);
        let emulator = kms_emulator::Emulator::start(EmulatorConfig {
            listen: "127.0.0.3:0".parse().unwrap(),
            ..EmulatorConfig::default()
        })
        .await
        .unwrap();
        let key_id = emulator
            .admin()
            .create_key(kms_emulator::NewKey {
                key_alias: format!("{prefix}-key"),
                ..Default::default()
            })
            .unwrap()
            .key_id;
        let tenant = Self {
            namespace,
            emulator,
            key_id,
            run: run.to_owned(),
        };
        let config = tenant.emulator.config();
        tenant.apply(&json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "kms-credentials", "namespace": tenant.namespace},
            "stringData": {"accessKey": config.access_key, "secretKey": config.secret_key.as_str()}
        }));
        tenant.apply(&tenant.config("own", &tenant.emulator.base_url(), "kms-credentials"));
        tenant
    }

    fn apply(&self, manifest: &Value) {
        kubectl_ok(&["apply", "-f", "-"], Some(&manifest.to_string()));
    }

    fn config(&self, name: &str, endpoint: &str, secret: &str) -> Value {
        let config = self.emulator.config();
        json!({
            "apiVersion": "kmsgrant.io/v1beta1", "kind": "KmsNamespacedProviderConfig",
            "metadata": {"name": name, "namespace": self.namespace, "labels": {TEST_LABEL: self.run}},
            "spec": {
                "endpoint": endpoint,
                "region": config.region,
                "projectId": config.project_id,
                "auth": {"type": "AccessKey", "secretRef": {"name": secret}},
                "rateLimit": {"requestsPerSecond": 100, "burst": 100}
            }
        })
    }

    fn grant(&self, name: &str, config: &str, key_id: &str) -> Value {
        json!({
            "apiVersion": "kmsgrant.io/v1beta1", "kind": "KmsGrant",
            "metadata": {"name": name, "namespace": self.namespace, "labels": {TEST_LABEL: self.run}},
            "spec": {
                "providerConfigRef": {"kind": "KmsNamespacedProviderConfig", "name": config},
                "keyId": key_id,
                "granteePrincipal": PRINCIPAL,
                "operations": ["describe-key", "encrypt-datakey"]
            }
        })
    }

    fn condition(&self, kind: &str, name: &str, type_: &str) -> (String, String, String) {
        let out = kubectl(
            &["-n", &self.namespace, "get", kind, name, "-o", "json"],
            None,
        );
        let object: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        object["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["type"] == type_)
            .map(|c| {
                (
                    c["status"].as_str().unwrap_or_default().to_owned(),
                    c["reason"].as_str().unwrap_or_default().to_owned(),
                    c["message"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .unwrap_or_default()
    }

    async fn wait_condition(&self, kind: &str, name: &str, type_: &str, reason: &str) -> String {
        let mut message = String::new();
        eventually(
            &format!(
                "{kind} {}/{name} {type_} with reason {reason}",
                self.namespace
            ),
            Duration::from_secs(60),
            async || {
                let (status, found, text) = self.condition(kind, name, type_);
                message = text;
                status == "True" && found == reason
            },
        )
        .await;
        message
    }

    fn grants_on_key(&self) -> usize {
        self.emulator
            .admin()
            .grant_count(&self.key_id)
            .unwrap_or_default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tenants_on_two_accounts_stay_apart_and_nothing_reaches_a_refused_address() {
    install_crds();
    let run = format!("tenants-{}", std::process::id());
    let a = Tenant::new(&run, "tenant-a").await;
    let b = Tenant::new(&run, "tenant-b").await;
    let _operator = TenantOperator::start(&run, &format!("{run}-operator.log"));

    // Each tenant's config is Ready and its grant lands on its own account.
    a.wait_condition(
        "kmsnamespacedproviderconfig",
        "own",
        "Ready",
        "CredentialsVerified",
    )
    .await;
    b.wait_condition(
        "kmsnamespacedproviderconfig",
        "own",
        "Ready",
        "CredentialsVerified",
    )
    .await;
    a.apply(&a.grant("app", "own", &a.key_id));
    b.apply(&b.grant("app", "own", &b.key_id));
    a.wait_condition("kmsgrant", "app", "Ready", "GrantReady")
        .await;
    b.wait_condition("kmsgrant", "app", "Ready", "GrantReady")
        .await;
    assert_eq!((a.grants_on_key(), b.grants_on_key()), (1, 1));

    // B cannot use A's config: the name resolves in B's own namespace, where there is none.
    b.apply(&b.grant("borrowed", "a-only", &a.key_id));
    a.apply(&a.config("a-only", &a.emulator.base_url(), "kms-credentials"));
    let message = b
        .wait_condition("kmsgrant", "borrowed", "Stalled", "ProviderConfigNotFound")
        .await;
    assert!(
        message.contains(&b.namespace) || message.contains("a-only"),
        "{message}"
    );
    // A config in A naming a Secret that exists only in B reads A's namespace only.
    b.apply(&json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "b-only", "namespace": b.namespace},
        "stringData": {"accessKey": "x", "secretKey": "y"}
    }));
    a.apply(&a.config("secret-elsewhere", &a.emulator.base_url(), "b-only"));
    a.wait_condition(
        "kmsnamespacedproviderconfig",
        "secret-elsewhere",
        "Stalled",
        "SecretNotFound",
    )
    .await;

    // Endpoints the policy refuses: no connection ever reaches them.
    let loopback = CountingListener::on("127.0.0.1").await;
    let redirect_target = CountingListener::on("127.0.0.1").await;
    let redirector = redirecting_to(redirect_target.url()).await;
    let service_ip = kubectl_ok(
        &[
            "-n",
            "default",
            "get",
            "service",
            "kubernetes",
            "-o",
            "jsonpath={.spec.clusterIP}",
        ],
        None,
    );
    let refused = [
        ("loopback", loopback.url(), "EndpointNotAllowed"),
        (
            "named-loopback",
            format!("http://localhost:{}", loopback.address.port()),
            "EndpointNotAllowed",
        ),
        (
            "metadata",
            "http://169.254.169.254".to_owned(),
            "EndpointNotAllowed",
        ),
        (
            "service",
            format!("https://{service_ip}"),
            "EndpointNotAllowed",
        ),
        ("redirect", redirector, "RedirectRefused"),
    ];
    for (name, endpoint, _) in &refused {
        a.apply(&a.config(name, endpoint, "kms-credentials"));
    }
    for (name, endpoint, reason) in &refused {
        let message = a
            .wait_condition("kmsnamespacedproviderconfig", name, "Stalled", reason)
            .await;
        assert!(
            !message.is_empty(),
            "{name} ({endpoint}): a message naming the rule"
        );
    }
    // A grant on a refused config is not Ready and creates nothing anywhere.
    a.apply(&a.grant("via-metadata", "metadata", &a.key_id));
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_ne!(a.condition("kmsgrant", "via-metadata", "Ready").0, "True");
    assert_eq!(loopback.connections(), 0, "nothing reached 127.0.0.1");
    assert_eq!(
        redirect_target.connections(),
        0,
        "the redirect was not followed"
    );
    assert_eq!((a.grants_on_key(), b.grants_on_key()), (1, 1));

    // Deleting tenant A's objects (as the namespace controller does when the namespace goes:
    // everything at once, the Secret too) revokes A's grant and leaves B's alone.
    kubectl_ok(
        &[
            "-n",
            &a.namespace,
            "delete",
            "kmsgrants,kmsnamespacedproviderconfigs,secrets",
            "--all",
            "--wait=false",
        ],
        None,
    );
    eventually(
        "tenant A's KmsGrants gone",
        Duration::from_secs(60),
        async || {
            let out = kubectl_ok(
                &["-n", &a.namespace, "get", "kmsgrants", "-o", "name"],
                None,
            );
            out.trim().is_empty()
        },
    )
    .await;
    assert_eq!(a.grants_on_key(), 0, "A's grant revoked on A's account");
    assert_eq!(b.grants_on_key(), 1, "B's grant untouched");
    b.wait_condition("kmsgrant", "app", "Ready", "GrantReady")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_over_its_object_limit_gets_no_new_grant_and_a_condition_naming_the_rule() {
    install_crds();
    let run = format!("ns-limit-{}", std::process::id());
    let tenant = Tenant::new(&run, "ns-limit").await;
    // A stalled retry far beyond the test: the waiting object is served when another goes
    // because the deletion wakes it, not because its retry came round.
    let _operator = TenantOperator::start_with(
        &run,
        &format!("{run}-operator.log"),
        &[
            "--tenant-max-objects-per-namespace",
            "2",
            "--stalled-retry",
            "10m",
        ],
    );
    tenant
        .wait_condition(
            "kmsnamespacedproviderconfig",
            "own",
            "Ready",
            "CredentialsVerified",
        )
        .await;

    // Three at once (likely within one second of creation time: the name decides then).
    let objects: Vec<Value> = ["first", "second", "third"]
        .iter()
        .map(|name| tenant.grant(name, "own", &tenant.key_id))
        .collect();
    tenant.apply(&json!({"apiVersion": "v1", "kind": "List", "items": objects}));
    tenant
        .wait_condition("kmsgrant", "first", "Ready", "GrantReady")
        .await;
    tenant
        .wait_condition("kmsgrant", "second", "Ready", "GrantReady")
        .await;
    let message = tenant
        .wait_condition("kmsgrant", "third", "Stalled", "NamespaceObjectLimit")
        .await;
    for part in [
        "3 KmsGrants",
        "at most 2 objects per namespace",
        "--tenant-max-objects-per-namespace",
    ] {
        assert!(message.contains(part), "{part}: {message}");
    }
    let (ready, reason, _) = tenant.condition("kmsgrant", "third", "Ready");
    assert_eq!(
        (ready.as_str(), reason.as_str()),
        ("False", "NamespaceObjectLimit")
    );
    eventually(
        "a Warning NamespaceObjectLimit event on the third object",
        Duration::from_secs(30),
        async || {
            let out = kubectl_ok(
                &[
                    "-n",
                    &tenant.namespace,
                    "get",
                    "events",
                    "--field-selector",
                    "involvedObject.name=third,reason=NamespaceObjectLimit,type=Warning",
                    "-o",
                    "name",
                ],
                None,
            );
            !out.trim().is_empty()
        },
    )
    .await;
    // A few more resync periods: the third stays without a grant, and no create was ever sent
    // for it.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_ne!(tenant.condition("kmsgrant", "third", "Ready").0, "True");
    assert_eq!(tenant.grants_on_key(), 2);
    let creates = |calls: &[kms_emulator::CallRecord]| -> Vec<String> {
        calls
            .iter()
            .filter(|c| c.operation == "create-grant")
            .map(|c| c.grant_name.clone().unwrap_or_default())
            .collect()
    };
    let before = creates(&tenant.emulator.admin().calls(0));
    assert_eq!(before.len(), 2, "one create per served object: {before:?}");
    assert!(
        before.iter().all(|name| !name.ends_with("/third")),
        "{before:?}"
    );

    // One served object goes: the third is served now, long before its stalled retry.
    kubectl_ok(
        &[
            "-n",
            &tenant.namespace,
            "delete",
            "kmsgrant",
            "first",
            "--wait=false",
        ],
        None,
    );
    tenant
        .wait_condition("kmsgrant", "third", "Ready", "GrantReady")
        .await;
    eventually(
        "the first object's grant revoked, the third's in place",
        Duration::from_secs(30),
        async || tenant.grants_on_key() == 2,
    )
    .await;
    assert!(
        creates(&tenant.emulator.admin().calls(0))
            .iter()
            .any(|name| name.ends_with("/third"))
    );
}
