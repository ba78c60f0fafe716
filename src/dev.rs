//! `kmsgrant-operator dev`: the whole product on one machine, in one command.
//!
//! A local control plane (or your cluster), the emulator as KMS with the example's key, the CRDs,
//! a `default` KmsProviderConfig and its Secret, the operator, and the example grant, whose status
//! is printed together with the `export KUBECONFIG=...` line to keep going with kubectl.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};
use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::wait::{await_condition, conditions};
use serde_json::json;

use crate::api::{KmsGrant, KmsProviderConfig};
use crate::controller::{self, Settings};
use kms_emulator::{Emulator, EmulatorConfig, NewKey};

/// The example grant applied by `dev` (also shipped in deploy/examples/).
pub const EXAMPLE_GRANT: &str = include_str!("../deploy/examples/kmsgrant-seed.yaml");
const FIELD_MANAGER: &str = "kmsgrant-dev";
const OPERATOR_NAMESPACE: &str = "kmsgrant-system";

/// Options of `kmsgrant-operator dev`.
#[derive(Debug, clap::Args)]
pub struct DevArgs {
    /// Where the local control plane keeps its state, certificates and kubeconfig.
    #[arg(long, env = "KMSGRANT_DEV_DIR", value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Use this cluster instead of starting a local control plane.
    #[arg(long, env = "KMSGRANT_DEV_KUBECONFIG", value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// Kubeconfig context to use with --kubeconfig.
    #[arg(long, env = "KMSGRANT_DEV_CONTEXT")]
    pub context: Option<String>,
    /// Address of the KMS emulator (port 0 picks a free one).
    #[arg(
        long,
        env = "KMSGRANT_DEV_EMULATOR_LISTEN",
        default_value = "127.0.0.1:8480"
    )]
    pub emulator_listen: std::net::SocketAddr,
    /// Resync interval of the operator.
    #[arg(long, env = "KMSGRANT_DEV_RESYNC_INTERVAL", default_value = "30s", value_parser = crate::process::parse_duration)]
    pub resync_interval: Duration,
    /// The script that builds and starts the local control plane (kube-apiserver and etcd).
    /// Default: `scripts/control-plane` of the checkout this binary was built from.
    #[arg(long, env = "KMSGRANT_DEV_CONTROL_PLANE_SCRIPT", value_name = "FILE", default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/control-plane"))]
    pub control_plane_script: PathBuf,
    /// Stop (and stop the local control plane) once the example grant is Ready, instead of
    /// running until Ctrl-C. For CI and scripts.
    #[arg(long, env = "KMSGRANT_DEV_EXIT_WHEN_READY")]
    pub exit_when_ready: bool,
    /// How the `default` provider config authenticates. `keyless`: no Secret; the cluster's
    /// ServiceAccount issuer is registered in the emulator's IAM as an OpenID Connect identity
    /// provider and the operator exchanges tokens of ServiceAccount kmsgrant-system/kmsgrant-operator
    /// (docs/keyless.md, the same steps). `access-key`: an AK/SK Secret.
    #[arg(long, env = "KMSGRANT_DEV_AUTH", value_enum, default_value = "keyless")]
    pub auth: DevAuth,
}

/// The `default` provider config's auth in the sandbox.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DevAuth {
    /// Workload identity: a ServiceAccount token exchanged at IAM; no stored credential.
    Keyless,
    /// An access key / secret key pair in a Secret.
    AccessKey,
}

/// The identity provider and `client_id` the sandbox registers in the emulator's IAM.
const DEV_IDENTITY_PROVIDER: &str = "kmsgrant_dev_cluster";
const DEV_CLIENT_ID: &str = "kmsgrant-dev";
const DEV_SERVICE_ACCOUNT: &str = "kmsgrant-operator";
/// The IAM user the mapping makes of the operator's ServiceAccount.
const DEV_FEDERATED_USER: &str = "kmsgrant-operator";

impl DevArgs {
    pub fn run(self) -> ExitCode {
        if let Err(err) = crate::telemetry::init("info,kube_runtime=warn", "text") {
            eprintln!("error: {err}");
            return ExitCode::from(2);
        }
        let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
        match runtime.block_on(self.sandbox()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("error: {err:#}");
                ExitCode::FAILURE
            }
        }
    }

    async fn sandbox(self) -> anyhow::Result<()> {
        // Caught from here on, so Ctrl-C never kills `dev` before it has stopped what it started.
        let mut interrupt = Interrupt::install()?;
        let local_dir = match &self.kubeconfig {
            Some(_) => None,
            None => Some(self.dir.clone().unwrap_or_else(default_dir)),
        };
        let result = match (&self.kubeconfig, &local_dir) {
            (Some(path), _) => self.with_cluster(path, &mut interrupt).await,
            (None, Some(dir)) => {
                say(
                    "starting the local control plane (the first run builds kube-apiserver and etcd: ~6 min)",
                );
                // With --owner-pid the control plane also goes when this process dies without
                // cleaning up (SIGKILL, a crash).
                let owner = std::process::id().to_string();
                match control_plane(
                    &self.control_plane_script,
                    &["up", &dir.to_string_lossy(), "--owner-pid", &owner],
                ) {
                    Ok(()) => {
                        self.with_cluster(&dir.join("kubeconfig"), &mut interrupt)
                            .await
                    }
                    Err(err) => Err(err),
                }
            }
            (None, None) => unreachable!("one of the two is set"),
        };
        if let Some(dir) = &local_dir {
            say(&format!(
                "stopping the local control plane (its state stays in {})",
                dir.display()
            ));
            let _ = control_plane(
                &self.control_plane_script,
                &["down", &dir.to_string_lossy()],
            );
        }
        result
    }

    async fn with_cluster(
        &self,
        kubeconfig: &Path,
        interrupt: &mut Interrupt,
    ) -> anyhow::Result<()> {
        let client =
            crate::process::kube_client(Some(kubeconfig.to_owned()), self.context.clone()).await?;

        let emulator = Emulator::start(EmulatorConfig {
            listen: self.emulator_listen,
            ..EmulatorConfig::default()
        })
        .await
        .with_context(|| format!("cannot start the KMS emulator on {}", self.emulator_listen))?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let mut operator = None;
        let result = tokio::select! {
            result = self.bring_up(&client, &emulator, kubeconfig, &mut operator, stopped) => result.map(|()| true),
            () = interrupt.recv() => Ok(false),
        };
        match result {
            Ok(true) if self.exit_when_ready => say("--exit-when-ready: stopping the sandbox"),
            Ok(true) => {
                say("running; Ctrl-C stops the operator, the emulator and the local control plane");
                interrupt.recv().await;
                say("stopping the operator and the emulator");
            }
            Ok(false) => say("interrupted: stopping what was started"),
            Err(_) => {}
        }
        let _ = stop.send(());
        if let Some(operator) = operator {
            let _ = tokio::time::timeout(Duration::from_secs(10), operator).await;
        }
        emulator.shutdown().await;
        result.map(|_| ())
    }

    /// Everything up to the example grant being Ready; the operator task is left in `operator`.
    async fn bring_up(
        &self,
        client: &kube::Client,
        emulator: &kms_emulator::RunningEmulator,
        kubeconfig: &Path,
        operator: &mut Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
        stopped: tokio::sync::oneshot::Receiver<()>,
    ) -> anyhow::Result<()> {
        let example: KmsGrant =
            serde_saphyr::from_str(EXAMPLE_GRANT).expect("the shipped example parses");
        // Only a key's creator may revoke grants on it: keyless, the operator signs in as the
        // federated user the identity provider's mapping names, so the key is that user's.
        let creator = (self.auth == DevAuth::Keyless)
            .then(|| kms_emulator::federated_user_id(DEV_IDENTITY_PROVIDER, DEV_FEDERATED_USER));
        let key = NewKey {
            key_alias: "dev-demo".into(),
            key_id: example.spec.key_id.clone(),
            creator,
            ..NewKey::default()
        };
        emulator
            .admin()
            .create_key(key)
            .map_err(|e| anyhow::anyhow!("cannot create the demo key: {e}"))?;
        say(&format!(
            "KMS emulator on {} with key {}",
            emulator.base_url(),
            example.spec.key_label()
        ));

        install_crds(client).await?;
        say("CRDs installed and Established");
        match self.auth {
            DevAuth::Keyless => {
                install_keyless_provider(client, emulator).await?;
                say(&format!(
                    "KmsProviderConfig 'default' is keyless: no Secret; this cluster's ServiceAccount issuer is identity provider {DEV_IDENTITY_PROVIDER} in the emulator's IAM, and the operator exchanges tokens of ServiceAccount {OPERATOR_NAMESPACE}/{DEV_SERVICE_ACCOUNT} for IAM tokens"
                ));
            }
            DevAuth::AccessKey => {
                install_provider(client, emulator).await?;
                say(
                    "KmsProviderConfig 'default' and Secret kmsgrant-system/kms-credentials point at the emulator",
                );
            }
        }

        let settings = Settings {
            resync: self.resync_interval,
            secret_namespace: Some(OPERATOR_NAMESPACE.into()),
            allow_http: true,
            ..Settings::default()
        };
        let metrics = std::sync::Arc::new(crate::metrics::Metrics::new());
        let ready = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        *operator = Some(tokio::spawn(controller::run(
            client.clone(),
            settings,
            metrics,
            ready,
            // A sandbox's cluster is new: no object stored at v1alpha1 holds a spec.name.
            std::future::ready(()),
            async {
                let _ = stopped.await;
            },
        )));
        say("operator running");

        let namespace = example
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let name = example.metadata.name.clone().unwrap_or_default();
        let grants: Api<KmsGrant> = Api::namespaced(client.clone(), &namespace);
        grants
            .patch(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&example),
            )
            .await
            .context("cannot apply the example grant")?;
        say(&format!(
            "applied deploy/examples/kmsgrant-seed.yaml ({namespace}/{name}); waiting for Ready"
        ));
        let ready = tokio::time::timeout(
            Duration::from_secs(120),
            await_condition(grants.clone(), &name, |object: Option<&KmsGrant>| {
                object.and_then(|o| o.status.as_ref()).is_some_and(|s| {
                    s.conditions.iter().any(|c| {
                        c.type_ == "Ready" && c.status == crate::api::ConditionStatus::True
                    })
                })
            }),
        )
        .await;
        let object = grants.get(&name).await?;
        print_status(&object);
        if ready.is_err() {
            bail!(
                "the example grant did not become Ready within 2 minutes; see its conditions above"
            );
        }
        println!();
        println!("The sandbox is ready. In another shell:");
        println!("export KUBECONFIG={}", kubeconfig.display());
        println!("kubectl get kmsgrants -A");
        println!(
            "KMS emulator: {} (admin API under {}/_emulator/)",
            emulator.base_url(),
            emulator.base_url()
        );
        Ok(())
    }
}

/// SIGINT (Ctrl-C) and SIGTERM. Registered at once: a signal that arrives while `dev` is busy (in
/// `scripts/control-plane up`, say) is kept and seen at the next `recv`.
struct Interrupt {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
}

impl Interrupt {
    fn install() -> anyhow::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            int: signal(SignalKind::interrupt()).context("cannot catch SIGINT")?,
            term: signal(SignalKind::terminate()).context("cannot catch SIGTERM")?,
        })
    }

    async fn recv(&mut self) {
        tokio::select! {
            _ = self.int.recv() => {}
            _ = self.term.recv() => {}
        }
    }
}

fn say(message: &str) {
    eprintln!("dev: {message}");
}

fn default_dir() -> PathBuf {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    cache.join("kmsgrant-operator").join("dev")
}

/// Runs the control-plane script (`scripts/control-plane` of a checkout).
fn control_plane(script: &Path, args: &[&str]) -> anyhow::Result<()> {
    if !script.exists() {
        bail!(
            "{} is missing. `dev` starts kube-apiserver and etcd with scripts/control-plane of a \
             kmsgrant-operator checkout: pass --control-plane-script CHECKOUT/scripts/control-plane \
             (it builds them on first use), or --kubeconfig FILE to use a cluster you have",
            script.display()
        );
    }
    let status = std::process::Command::new(script)
        .args(args)
        .stdout(std::process::Stdio::null())
        .status()
        .with_context(|| format!("cannot run {}", script.display()))?;
    if !status.success() {
        bail!(
            "scripts/control-plane {} failed (its messages are above)",
            args.join(" ")
        );
    }
    Ok(())
}

async fn install_crds(client: &kube::Client) -> anyhow::Result<()> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in crate::api::crds() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        api.patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&crd),
        )
        .await
        .with_context(|| format!("cannot install CRD {name}"))?;
        tokio::time::timeout(
            Duration::from_secs(60),
            await_condition(api.clone(), &name, conditions::is_crd_established()),
        )
        .await
        .with_context(|| format!("CRD {name} not Established after 60 s"))??;
    }
    Ok(())
}

async fn operator_namespace(client: &kube::Client) -> anyhow::Result<()> {
    let apply = PatchParams::apply(FIELD_MANAGER).force();
    let namespace =
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": OPERATOR_NAMESPACE}});
    Api::<Namespace>::all(client.clone())
        .patch(OPERATOR_NAMESPACE, &apply, &Patch::Apply(&namespace))
        .await?;
    Ok(())
}

/// The keyless `default` provider config, after the cloud admin's steps of docs/keyless.md
/// against the emulator's IAM: identity provider, mapping for the operator's ServiceAccount,
/// protocol, and the OpenID Connect configuration with this cluster's issuer and JWKS.
async fn install_keyless_provider(
    client: &kube::Client,
    emulator: &kms_emulator::RunningEmulator,
) -> anyhow::Result<()> {
    operator_namespace(client).await?;
    let apply = PatchParams::apply(FIELD_MANAGER).force();
    let account = json!({"apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": {"name": DEV_SERVICE_ACCOUNT, "namespace": OPERATOR_NAMESPACE}});
    Api::<k8s_openapi::api::core::v1::ServiceAccount>::namespaced(
        client.clone(),
        OPERATOR_NAMESPACE,
    )
    .patch(DEV_SERVICE_ACCOUNT, &apply, &Patch::Apply(&account))
    .await?;
    let get = |path: &str| {
        http::Request::get(path)
            .body(Vec::new())
            .expect("a GET request")
    };
    let discovery: serde_json::Value = serde_json::from_str(
        &client
            .request_text(get("/.well-known/openid-configuration"))
            .await
            .context("reading the cluster's OpenID Connect discovery document")?,
    )?;
    let jwks = client
        .request_text(get("/openid/v1/jwks"))
        .await
        .context("reading the cluster's JWKS (/openid/v1/jwks)")?;
    let config = emulator.config();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::new();
    let login = http
        .post(format!("{}/v3/auth/tokens", emulator.base_url()))
        .json(&json!({"auth": {"identity": {"methods": ["password"], "password": {"user": {
            "name": config.username, "password": config.password, "domain": {"name": config.domain_name}}}},
            "scope": {"domain": {"name": config.domain_name}}}}))
        .send()
        .await?;
    let admin_token = login
        .headers()
        .get("x-subject-token")
        .and_then(|v| v.to_str().ok())
        .context("the emulator's IAM gave no admin token")?
        .to_owned();
    let subject = format!("system:serviceaccount:{OPERATOR_NAMESPACE}:{DEV_SERVICE_ACCOUNT}");
    let steps = [
        (
            reqwest::Method::PUT,
            format!("/v3/OS-FEDERATION/identity_providers/{DEV_IDENTITY_PROVIDER}"),
            json!({"identity_provider": {"sso_type": "virtual_user_sso", "enabled": true, "description": "kmsgrant-operator dev sandbox"}}),
        ),
        (
            reqwest::Method::PUT,
            "/v3/OS-FEDERATION/mappings/kmsgrant-operator".to_owned(),
            json!({"mapping": {"rules": [{"local": [{"user": {"name": DEV_FEDERATED_USER}}, {"group": {"name": "kms-grant-admins"}}],
                "remote": [{"type": "sub", "any_one_of": [subject]}]}]}}),
        ),
        (
            reqwest::Method::PUT,
            format!("/v3/OS-FEDERATION/identity_providers/{DEV_IDENTITY_PROVIDER}/protocols/oidc"),
            json!({"protocol": {"mapping_id": "kmsgrant-operator"}}),
        ),
        (
            reqwest::Method::POST,
            format!(
                "/v3.0/OS-FEDERATION/identity-providers/{DEV_IDENTITY_PROVIDER}/openid-connect-config"
            ),
            json!({"openid_connect_config": {"access_mode": "program", "idp_url": discovery["issuer"],
                "client_id": DEV_CLIENT_ID, "signing_key": jwks.trim()}}),
        ),
    ];
    for (method, path, body) in steps {
        let answer = http
            .request(method, format!("{}{path}", emulator.base_url()))
            .header("X-Auth-Token", &admin_token)
            .json(&body)
            .send()
            .await?;
        // A second `dev` on the same emulator state finds them there already.
        if !answer.status().is_success() && answer.status() != reqwest::StatusCode::CONFLICT {
            bail!(
                "setting up the emulator's identity provider: {path} answered {}: {}",
                answer.status(),
                answer.text().await.unwrap_or_default()
            );
        }
    }
    let provider = json!({
        "apiVersion": "kmsgrant.io/v1beta1", "kind": "KmsProviderConfig",
        "metadata": {"name": "default"},
        "spec": {
            "endpoint": emulator.base_url(),
            "iamEndpoint": emulator.base_url(),
            "region": config.region,
            "projectId": config.project_id,
            "auth": {"type": "WebIdentity", "webIdentity": {
                "identityProviderId": DEV_IDENTITY_PROVIDER,
                "serviceAccountRef": {"namespace": OPERATOR_NAMESPACE, "name": DEV_SERVICE_ACCOUNT, "audiences": [DEV_CLIENT_ID]}}}
        }
    });
    Api::<KmsProviderConfig>::all(client.clone())
        .patch("default", &apply, &Patch::Apply(&provider))
        .await?;
    Ok(())
}

async fn install_provider(
    client: &kube::Client,
    emulator: &kms_emulator::RunningEmulator,
) -> anyhow::Result<()> {
    operator_namespace(client).await?;
    let apply = PatchParams::apply(FIELD_MANAGER).force();
    let config = emulator.config();
    let secret = json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "kms-credentials", "namespace": OPERATOR_NAMESPACE},
        "stringData": {"accessKey": config.access_key, "secretKey": config.secret_key}
    });
    Api::<Secret>::namespaced(client.clone(), OPERATOR_NAMESPACE)
        .patch("kms-credentials", &apply, &Patch::Apply(&secret))
        .await?;
    let provider = json!({
        "apiVersion": "kmsgrant.io/v1beta1", "kind": "KmsProviderConfig",
        "metadata": {"name": "default"},
        "spec": {
            "endpoint": emulator.base_url(),
            "iamEndpoint": emulator.base_url(),
            "region": config.region,
            "projectId": config.project_id,
            "auth": {"type": "AccessKey", "secretRef": {"namespace": OPERATOR_NAMESPACE, "name": "kms-credentials"}}
        }
    });
    Api::<KmsProviderConfig>::all(client.clone())
        .patch("default", &apply, &Patch::Apply(&provider))
        .await?;
    Ok(())
}

fn print_status(object: &KmsGrant) {
    let status = object.status.clone().unwrap_or_default();
    println!();
    println!(
        "KmsGrant {}/{}",
        object.metadata.namespace.as_deref().unwrap_or_default(),
        object.metadata.name.as_deref().unwrap_or_default()
    );
    println!("  key        {}", object.spec.key_label());
    println!("  grantee    {}", object.spec.grantee_principal);
    println!(
        "  operations {}",
        object
            .spec
            .operations
            .iter()
            .map(|o| o.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("  grant id   {}", status.grant_id.as_deref().unwrap_or("-"));
    for condition in &status.conditions {
        println!(
            "  {:<11} {:<7} {} — {}",
            condition.type_,
            format!("{:?}", condition.status),
            condition.reason,
            condition.message
        );
    }
}
