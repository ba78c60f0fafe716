//! `kmsgrant-operator check`: what is wrong with an install, and how to fix it.
//!
//! The cluster side (API server, CRDs at this binary's versions and schemas, the operator holding
//! a fresh leader lease, the admission policy bound) and, for each KmsProviderConfig, the cloud
//! side (endpoint name, TLS and clock, credentials, project, read-only probes on keys, and with
//! `--write-probe` one grant created, listed by its name and revoked). Every line says ok or what
//! is wrong and the fix; `-o json` for pipelines; exit 1 when something failed.

use std::collections::BTreeSet;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use serde::Serialize;

use crate::api::{KmsGrant, KmsProviderConfig};
use crate::controller::{catalog, fix_for};
use kmsgrant_kms::{ErrorReason, GranteePrincipalType, KmsClient, KmsError, NewGrant, Operation};

/// Options of `kmsgrant-operator check`.
#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// Kubeconfig to use (default: KUBECONFIG or the in-cluster config).
    #[arg(long, env = "KMSGRANT_KUBECONFIG", value_name = "FILE")]
    pub kubeconfig: Option<std::path::PathBuf>,
    /// Kubeconfig context to use.
    #[arg(long, env = "KMSGRANT_CONTEXT")]
    pub context: Option<String>,
    /// The operator's namespace (its Secrets, Lease and Deployment).
    #[arg(
        long,
        env = "KMSGRANT_CHECK_NAMESPACE",
        default_value = "kmsgrant-system"
    )]
    pub namespace: String,
    /// The operator's leader-election Lease.
    #[arg(long, env = "KMSGRANT_LEASE_NAME", default_value = "kmsgrant-operator")]
    pub lease_name: String,
    /// Check only these KmsProviderConfigs (repeatable; default: all).
    #[arg(
        long = "provider-config",
        env = "KMSGRANT_CHECK_PROVIDER_CONFIGS",
        value_delimiter = ',',
        value_name = "NAME"
    )]
    pub provider_configs: Vec<String>,
    /// Probe this key (describe-key, list-grants); default: up to three keys the config's
    /// KmsGrants use, else its first allowedKeyIds entry.
    #[arg(long, env = "KMSGRANT_CHECK_KEY", value_name = "KEY_ID")]
    pub key: Option<String>,
    /// Also create one grant on the probed key to `--principal`, check that list-grants returns
    /// it with its name, and revoke it.
    #[arg(long, env = "KMSGRANT_CHECK_WRITE_PROBE", requires = "principal")]
    pub write_probe: bool,
    /// The grantee of the write probe's grant (a user ID of the account).
    #[arg(long, env = "KMSGRANT_CHECK_PRINCIPAL", value_name = "USER_ID")]
    pub principal: Option<String>,
    /// Only the cluster side, or only the cloud side.
    #[arg(long, env = "KMSGRANT_CHECK_ONLY", value_enum)]
    pub only: Option<Side>,
    /// `text` or `json`.
    #[arg(
        short = 'o',
        long,
        env = "KMSGRANT_CHECK_OUTPUT",
        value_enum,
        default_value = "text"
    )]
    pub output: Output,
    /// Accept plain http:// endpoints (local emulators only).
    #[arg(long, env = "KMSGRANT_ALLOW_HTTP_ENDPOINTS")]
    pub allow_http_endpoints: bool,
}

/// Which half of the checks to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Side {
    Cluster,
    Cloud,
}

/// Output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Text,
    Json,
}

/// How one check went.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Warn,
    Fail,
    Skip,
}

/// One line of the report.
#[derive(Clone, Debug, Serialize)]
pub struct Finding {
    /// What was checked (`crd`, `credentials`, `key`, ...).
    pub check: &'static str,
    /// Of what (a CRD, a provider config, a key).
    pub target: String,
    pub status: Status,
    pub message: String,
    /// What to do about it, when it is not ok.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Finding {
    fn ok(check: &'static str, target: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            check,
            target: target.into(),
            status: Status::Ok,
            message: message.into(),
            fix: None,
        }
    }

    fn bad(
        status: Status,
        check: &'static str,
        target: impl Into<String>,
        message: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Self {
            check,
            target: target.into(),
            status,
            message: message.into(),
            fix: Some(fix.into()),
        }
    }
}

/// The most a probe of the clock may be off before signatures are refused (APIGW.0303).
const SIGNATURE_WINDOW: Duration = Duration::from_secs(15 * 60);
/// Clock differences above this are worth a warning.
const CLOCK_WARNING: Duration = Duration::from_secs(60);

impl CheckArgs {
    pub fn run(self) -> ExitCode {
        let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
        let findings = runtime.block_on(self.findings());
        let failed = findings.iter().any(|f| f.status == Status::Fail);
        match self.output {
            Output::Json => println!(
                "{}",
                serde_json::to_string_pretty(&findings).expect("findings serialise")
            ),
            Output::Text => print!("{}", render(&findings)),
        }
        if failed {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        }
    }

    /// Every finding, in order: cluster, then each provider config.
    pub async fn findings(&self) -> Vec<Finding> {
        let client = match crate::process::kube_client(
            self.kubeconfig.clone(),
            self.context.clone(),
        )
        .await
        {
            Ok(client) => client,
            Err(err) => {
                return vec![Finding::bad(
                    Status::Fail,
                    "cluster",
                    "kubeconfig",
                    format!("cannot build a Kubernetes client: {err:#}"),
                    "set KUBECONFIG or --kubeconfig to a working kubeconfig",
                )];
            }
        };
        let mut findings = Vec::new();
        match client.apiserver_version().await {
            Ok(version) => findings.push(Finding::ok(
                "cluster",
                "api-server",
                format!(
                    "Kubernetes {}.{} ({})",
                    version.major, version.minor, version.git_version
                ),
            )),
            Err(err) => {
                findings.push(Finding::bad(
                    Status::Fail,
                    "cluster",
                    "api-server",
                    format!("the API server does not answer: {err}"),
                    "check the kubeconfig's server, the network, and that the cluster is up",
                ));
                return findings;
            }
        }
        if self.only != Some(Side::Cloud) {
            findings.extend(self.cluster(&client).await);
        }
        if self.only != Some(Side::Cluster) {
            findings.extend(self.cloud(&client).await);
        }
        findings
    }

    async fn cluster(&self, client: &kube::Client) -> Vec<Finding> {
        let mut findings = Vec::new();
        let installed = Api::<CustomResourceDefinition>::all(client.clone());
        for expected in crate::api::crds() {
            let name = expected.name_any();
            findings.push(match installed.get_opt(&name).await {
                Ok(Some(crd)) => compare_crd(&expected, &crd),
                Ok(None) => Finding::bad(
                    Status::Fail,
                    "crd",
                    &name,
                    "not installed",
                    "install the CRDs: kmsgrant-operator crd | kubectl apply --server-side -f -",
                ),
                Err(err) => Finding::bad(
                    Status::Fail,
                    "crd",
                    &name,
                    format!("cannot read it: {err}"),
                    "the checking identity needs get on customresourcedefinitions",
                ),
            });
        }
        findings.push(self.leader(client).await);
        findings.push(self.deployment(client).await);
        findings.push(admission(client).await);
        findings
    }

    /// The operator runs: someone holds its lease and renewed it recently.
    async fn leader(&self, client: &kube::Client) -> Finding {
        let target = format!("{}/{}", self.namespace, self.lease_name);
        let lease = match Api::<Lease>::namespaced(client.clone(), &self.namespace)
            .get_opt(&self.lease_name)
            .await
        {
            Ok(Some(lease)) => lease,
            Ok(None) => {
                return Finding::bad(
                    Status::Fail,
                    "operator",
                    target,
                    "no leader-election Lease: the operator is not running (or runs without --leader-election, or with another --lease-name)",
                    "install or start the operator (docs/install.md); kubectl -n kmsgrant-system get pods",
                );
            }
            Err(err) => {
                return Finding::bad(
                    Status::Warn,
                    "operator",
                    target,
                    format!("cannot read the Lease: {err}"),
                    "the checking identity needs get on leases in the operator's namespace",
                );
            }
        };
        let spec = lease.spec.unwrap_or_default();
        let holder = spec.holder_identity.unwrap_or_default();
        let duration = Duration::from_secs(spec.lease_duration_seconds.unwrap_or(15).max(1) as u64);
        let renewed = spec
            .renew_time
            .map(|t| SystemTime::from(t.0))
            .and_then(|t| SystemTime::now().duration_since(t).ok());
        match renewed {
            _ if holder.is_empty() => Finding::bad(
                Status::Fail,
                "operator",
                target,
                "the Lease has no holder: no replica leads",
                "kubectl -n kmsgrant-system logs deploy/kmsgrant-operator (alert KmsGrantOperatorNoLeader)",
            ),
            Some(age) if age > duration * 2 => Finding::bad(
                Status::Fail,
                "operator",
                target,
                format!(
                    "leader {holder} last renewed {} s ago (lease {} s): it is gone or stuck",
                    age.as_secs(),
                    duration.as_secs()
                ),
                "kubectl -n kmsgrant-system get pods; a replica takes over once the lease expires",
            ),
            _ => Finding::ok(
                "operator",
                target,
                format!(
                    "leader {holder}, lease renewed within {} s",
                    duration.as_secs()
                ),
            ),
        }
    }

    /// The operator's Deployment, if it runs in the cluster.
    async fn deployment(&self, client: &kube::Client) -> Finding {
        let deployments = Api::<Deployment>::namespaced(client.clone(), &self.namespace)
            .list(&ListParams::default().labels("app.kubernetes.io/name=kmsgrant-operator"))
            .await;
        match deployments {
            Ok(list) if list.items.is_empty() => Finding {
                check: "operator",
                target: format!("{}/deployment", self.namespace),
                status: Status::Skip,
                message: "no Deployment labelled app.kubernetes.io/name=kmsgrant-operator (fine when the operator runs elsewhere)".into(),
                fix: None,
            },
            Ok(list) => {
                let deployment = &list.items[0];
                let status = deployment.status.clone().unwrap_or_default();
                let wanted = deployment
                    .spec
                    .as_ref()
                    .and_then(|s| s.replicas)
                    .unwrap_or(1);
                let ready = status.ready_replicas.unwrap_or(0);
                let target = format!("{}/{}", self.namespace, deployment.name_any());
                if ready >= wanted {
                    Finding::ok("operator", target, format!("{ready}/{wanted} replicas ready"))
                } else if ready > 0 {
                    Finding::bad(
                        Status::Warn,
                        "operator",
                        target,
                        format!("{ready}/{wanted} replicas ready"),
                        "kubectl -n kmsgrant-system describe pods -l app.kubernetes.io/name=kmsgrant-operator",
                    )
                } else {
                    Finding::bad(
                        Status::Fail,
                        "operator",
                        target,
                        format!("0/{wanted} replicas ready"),
                        "kubectl -n kmsgrant-system describe pods -l app.kubernetes.io/name=kmsgrant-operator; the readiness probe waits for the caches to sync",
                    )
                }
            }
            Err(err) => Finding::bad(
                Status::Warn,
                "operator",
                format!("{}/deployment", self.namespace),
                format!("cannot list Deployments: {err}"),
                "the checking identity needs list on deployments in the operator's namespace",
            ),
        }
    }

    async fn cloud(&self, client: &kube::Client) -> Vec<Finding> {
        let configs = match Api::<KmsProviderConfig>::all(client.clone())
            .list(&ListParams::default())
            .await
        {
            Ok(list) => list.items,
            Err(err) => {
                return vec![Finding::bad(
                    Status::Fail,
                    "provider",
                    "kmsproviderconfigs",
                    format!("cannot list KmsProviderConfigs: {err}"),
                    "install the CRDs, and give the checking identity list on kmsproviderconfigs",
                )];
            }
        };
        let wanted: BTreeSet<&str> = self.provider_configs.iter().map(String::as_str).collect();
        let grants = Api::<KmsGrant>::all(client.clone())
            .list(&ListParams::default())
            .await
            .map(|l| l.items)
            .unwrap_or_default();
        let mut findings = Vec::new();
        for name in &wanted {
            if !configs.iter().any(|c| c.name_any() == *name) {
                findings.push(Finding::bad(
                    Status::Fail,
                    "provider",
                    *name,
                    "no such KmsProviderConfig",
                    "kubectl get kmsproviderconfigs",
                ));
            }
        }
        if configs.is_empty() {
            findings.push(Finding::bad(
                Status::Warn,
                "provider",
                "kmsproviderconfigs",
                "no KmsProviderConfig: KmsGrants have nothing to use",
                "create one (deploy/examples/kmsproviderconfig-keyless.yaml, docs/keyless.md)",
            ));
        }
        for config in configs
            .iter()
            .filter(|c| wanted.is_empty() || wanted.contains(c.name_any().as_str()))
        {
            findings.extend(self.provider(client, config, &grants).await);
        }
        findings
    }

    async fn provider(
        &self,
        client: &kube::Client,
        config: &KmsProviderConfig,
        grants: &[KmsGrant],
    ) -> Vec<Finding> {
        let name = config.name_any();
        let mut findings = Vec::new();
        let secret = match &config.spec.auth.secret_ref {
            Some(secret_ref) => {
                match Api::<Secret>::namespaced(client.clone(), &secret_ref.namespace)
                    .get_opt(&secret_ref.name)
                    .await
                {
                    Ok(Some(secret)) => Some(secret),
                    Ok(None) => {
                        findings.push(Finding::bad(
                        Status::Fail,
                        "credentials",
                        &name,
                        format!("Secret {}/{} does not exist", secret_ref.namespace, secret_ref.name),
                        "create it with the keys of spec.auth.type (docs/resources.md, KmsProviderConfig), or go keyless (docs/keyless.md)",
                    ));
                        return findings;
                    }
                    Err(err) => {
                        findings.push(Finding::bad(
                        Status::Fail,
                        "credentials",
                        &name,
                        format!("cannot read Secret {}/{}: {err}", secret_ref.namespace, secret_ref.name),
                        "run check with an identity that may read Secrets in the operator's namespace",
                    ));
                        return findings;
                    }
                }
            }
            None => None,
        };
        // Keyless: a token file is the operator pod's, not readable here; a TokenRequest is made
        // with the checking identity.
        let keyless = crate::controller::credentials::KeylessSettings {
            token_dir: "/".into(),
            service_account_namespace: None,
            kube: client.clone(),
        };
        let client_config = match crate::controller::client_config(
            &config.spec,
            secret.as_ref(),
            &keyless,
            self.allow_http_endpoints,
        ) {
            Ok(c) => c,
            Err(outcome) => {
                findings.push(Finding::bad(
                    Status::Fail,
                    "credentials",
                    &name,
                    outcome.message().to_owned(),
                    "fix the provider config or its Secret as the message says",
                ));
                return findings;
            }
        };
        let kms = match KmsClient::new(client_config) {
            Ok(kms) => kms,
            Err(err) => {
                findings.push(Finding::bad(
                    Status::Fail,
                    "endpoint",
                    &name,
                    err.to_string(),
                    fix_for(&err),
                ));
                return findings;
            }
        };
        let endpoint_ok = probe(&mut findings, &kms, &name, &config.spec.endpoint, false).await;
        if let Some(iam) = &config.spec.iam_endpoint
            && iam != &config.spec.endpoint
        {
            probe(&mut findings, &kms, &name, iam, true).await;
        }
        if !endpoint_ok {
            return findings;
        }
        let project = match kms.project_id().await {
            Ok(project) => project,
            Err(err) => {
                findings.push(failure("credentials", &name, &err));
                return findings;
            }
        };
        match kms.user_quotas().await {
            Ok(_) => findings.push(Finding::ok(
                "credentials",
                &name,
                format!(
                    "{:?} auth works in project {project}",
                    config.spec.auth.type_
                ),
            )),
            Err(err) => {
                findings.push(failure("credentials", &name, &err));
                return findings;
            }
        }
        if config.spec.iam_endpoint.is_some() {
            findings.push(catalog_finding(&kms, &name, &config.spec).await);
        }
        if let (Some(region), Some(project_name)) = (&config.spec.region, &config.spec.project_name)
            && !project_name.starts_with(region.as_str())
        {
            findings.push(Finding::bad(
                Status::Warn,
                "project",
                &name,
                format!("project {project_name:?} does not belong to region {region:?} by name"),
                "on both clouds a region's projects are named after it (eu-de, eu-de_sub): check spec.region and spec.projectName",
            ));
        }
        let keys = self.keys_to_probe(config, grants);
        if keys.is_empty() {
            findings.push(Finding {
                check: "key",
                target: name.clone(),
                status: Status::Skip,
                message:
                    "no key to probe: no KmsGrant uses this config and it lists no allowedKeyIds"
                        .into(),
                fix: Some("pass --key KEY_ID".into()),
            });
        }
        for key in &keys {
            let target = format!("{name} {key}");
            match kms.describe_key(key).await {
                Ok(info) if info.is_default_master_key() => findings.push(Finding::bad(
                    Status::Fail,
                    "key",
                    &target,
                    format!(
                        "{} is a default master key: it refuses grants",
                        info.key_alias
                    ),
                    "use a customer master key",
                )),
                Ok(info) if info.state == kmsgrant_kms::KeyState::Enabled => {
                    findings.push(Finding::ok(
                        "key",
                        &target,
                        format!("describe-key: {} enabled", info.key_alias),
                    ))
                }
                Ok(info) => findings.push(Finding::bad(
                    Status::Warn,
                    "key",
                    &target,
                    format!("the key is {:?}: grants on it wait", info.state),
                    "enable the key (KMS console) or cancel its deletion",
                )),
                Err(err) => {
                    findings.push(failure("key", &target, &err));
                    continue;
                }
            }
            match kms.list_all_grants(key, kmsgrant_kms::MAX_PAGE_SIZE).await {
                Ok(list) => findings.push(Finding::ok(
                    "list-grants",
                    &target,
                    format!(
                        "{} grant(s) of at most {}",
                        list.len(),
                        kmsgrant_kms::MAX_GRANTS_PER_KEY
                    ),
                )),
                Err(err) => {
                    findings.push(failure("list-grants", &target, &err));
                    continue;
                }
            }
        }
        if self.write_probe
            && let (Some(key), Some(principal)) = (keys.first(), &self.principal)
        {
            findings.push(write_probe(&kms, &name, key, principal).await);
        }
        findings
    }

    fn keys_to_probe(&self, config: &KmsProviderConfig, grants: &[KmsGrant]) -> Vec<String> {
        if let Some(key) = &self.key {
            return vec![key.clone()];
        }
        let name = config.name_any();
        let mut keys: Vec<String> = Vec::new();
        for grant in grants.iter().filter(|g| {
            g.spec.provider_config_ref.kind == crate::api::ProviderConfigKind::KmsProviderConfig
                && g.spec.provider_config_ref.name == name
        }) {
            let key = grant
                .status
                .as_ref()
                .and_then(|s| s.key_id.clone())
                .or_else(|| grant.spec.key_id.clone())
                .unwrap_or_default();
            if !key.is_empty() && !key.starts_with("alias/") && !keys.contains(&key) {
                keys.push(key);
            }
            if keys.len() == 3 {
                break;
            }
        }
        if keys.is_empty()
            && let Some(first) = config.spec.allowed_key_ids.iter().flatten().next()
        {
            keys.push(first.clone());
        }
        keys
    }
}

/// The endpoint's name, TLS and clock; false when it cannot be reached.
async fn probe(
    findings: &mut Vec<Finding>,
    kms: &KmsClient,
    name: &str,
    url: &str,
    iam: bool,
) -> bool {
    let what = if iam { "iam-endpoint" } else { "endpoint" };
    let target = format!("{name} {url}");
    match kms.probe_endpoint(iam).await {
        Ok(answer) => {
            findings.push(Finding::ok(
                what,
                &target,
                format!(
                    "reached (HTTP {}) in {} ms",
                    answer.status,
                    answer.round_trip.as_millis()
                ),
            ));
            if let Some(server) = answer.server_time {
                findings.push(clock(&target, server, SystemTime::now()));
            }
            true
        }
        Err(err) => {
            findings.push(failure(what, &target, &err));
            false
        }
    }
}

/// The local clock against the endpoint's `Date`.
pub fn clock(target: &str, server: SystemTime, local: SystemTime) -> Finding {
    let (skew, ahead) = match local.duration_since(server) {
        Ok(d) => (d, true),
        Err(e) => (e.duration(), false),
    };
    let direction = if ahead { "ahead of" } else { "behind" };
    let message = format!(
        "this machine's clock is {} s {direction} the endpoint's",
        skew.as_secs()
    );
    if skew > SIGNATURE_WINDOW {
        Finding::bad(
            Status::Fail,
            "clock",
            target,
            message + ": AK/SK signatures more than 15 minutes off are refused (APIGW.0303)",
            "synchronise the clocks with NTP (chrony, systemd-timesyncd) on the nodes",
        )
    } else if skew > CLOCK_WARNING {
        Finding::bad(
            Status::Warn,
            "clock",
            target,
            message,
            "synchronise the clocks with NTP; signatures fail beyond 15 minutes",
        )
    } else {
        Finding::ok("clock", target, message)
    }
}

/// What to do when an account lists grants without the names they were created with.
const NAMES_NOT_RETURNED_FIX: &str = "run `kmsgrant-operator live-test` against this account (docs/live-test.md) and attach its report to a bug report for kmsgrant-operator and the cloud's support; until names come back, KmsGrants on such keys stay Stalled (GrantNamesNotReturned) and nothing is adopted or revoked by name";

/// A grant created to `principal`, found again by its name, revoked.
async fn write_probe(kms: &KmsClient, name: &str, key: &str, principal: &str) -> Finding {
    let target = format!("{name} {key}");
    let grant_name = format!("kmsgrant-check/{:016x}", fastrand::u64(..));
    let created = kms
        .create_grant(&NewGrant {
            key_id: key.to_owned(),
            grantee_principal: principal.to_owned(),
            grantee_principal_type: GranteePrincipalType::User,
            operations: vec![Operation::DescribeKey],
            name: Some(grant_name.clone()),
            retiring_principal: None,
        })
        .await;
    let grant_id = match created {
        Ok(id) => id,
        Err(err) => return failure("write-probe", &target, &err),
    };
    let listed = kms
        .list_all_grants(key, kmsgrant_kms::MAX_PAGE_SIZE)
        .await
        .map(|grants| grants.into_iter().find(|g| g.grant_id == grant_id));
    // Always revoked, whatever the listing said.
    let revoked = kms.revoke_grant(key, &grant_id).await;
    match (listed, revoked) {
        (_, Err(err)) => {
            let mut finding = failure("write-probe", &target, &err);
            finding.message = format!(
                "created grant {grant_id} ({grant_name}) but could not revoke it: {}",
                finding.message
            );
            finding
        }
        (Err(err), Ok(())) => failure("write-probe", &target, &err),
        (Ok(None), Ok(())) => Finding::bad(
            Status::Fail,
            "write-probe",
            target,
            format!("grant {grant_id} was created but list-grants does not return it"),
            "report it: the operator finds its grants by listing",
        ),
        (Ok(Some(grant)), Ok(())) if grant.name.as_deref() != Some(grant_name.as_str()) => {
            let listed = match &grant.name {
                None => "without its name (the answer has no `name` field, which the API page lists as optional)".to_owned(),
                Some(other) => format!("with the name {other:?}"),
            };
            Finding::bad(
                Status::Fail,
                "write-probe",
                target,
                format!(
                    "list-grants returned the probe's grant {grant_id}, created as {grant_name:?}, {listed}: grant identity (docs/identity.md) cannot work on this account, and the operator refuses to adopt or revoke grants by name on keys where it sees this (reason GrantNamesNotReturned)"
                ),
                NAMES_NOT_RETURNED_FIX,
            )
        }
        (Ok(Some(_)), Ok(())) => Finding::ok(
            "write-probe",
            target,
            format!("created {grant_name}, listed it by name, revoked it"),
        ),
    }
}

/// A failed call as a finding, with the fix its reason calls for.
fn failure(check: &'static str, target: &str, err: &KmsError) -> Finding {
    let status = match err.reason {
        ErrorReason::KeyDisabled | ErrorReason::KeyPendingDeletion | ErrorReason::KeyNotEnabled => {
            Status::Warn
        }
        _ => Status::Fail,
    };
    Finding::bad(status, check, target, err.to_string(), fix_for(err))
}

/// The installed CRD against this binary's: Established, same versions, same schemas.
/// The KMS endpoint and region against IAM's service catalog: a wrong region or a copied
/// endpoint of another region shows here before it shows as keys that cannot be found.
async fn catalog_finding(
    kms: &kmsgrant_kms::KmsClient,
    name: &str,
    spec: &crate::api::KmsProviderConfigSpec,
) -> Finding {
    let entries = match kms.kms_catalog().await {
        Ok(entries) => entries,
        Err(err) => {
            return Finding {
                check: "catalog",
                target: name.to_owned(),
                status: Status::Skip,
                message: format!("cannot read IAM's service catalog: {err}"),
                fix: None,
            };
        }
    };
    let region = spec.region.as_deref();
    let verdict = catalog::compare(&entries, &spec.endpoint, region);
    let message = verdict.message(&spec.endpoint, region);
    match verdict.fix(region) {
        None => Finding::ok("catalog", name, message),
        Some(fix) => Finding::bad(Status::Warn, "catalog", name, message, fix),
    }
}

fn compare_crd(
    expected: &CustomResourceDefinition,
    installed: &CustomResourceDefinition,
) -> Finding {
    let name = expected.name_any();
    let established = installed
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| {
            c.iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
        });
    if !established {
        return Finding::bad(
            Status::Fail,
            "crd",
            name,
            "installed but not Established",
            "kubectl get crd -o yaml shows why (a name conflict, an invalid schema)",
        );
    }
    let versions = |crd: &CustomResourceDefinition| -> Vec<String> {
        crd.spec.versions.iter().map(|v| v.name.clone()).collect()
    };
    const UPGRADE: &str = "apply this binary's CRDs: kmsgrant-operator crd | kubectl apply --server-side -f - (the chart does it on upgrade)";
    if versions(expected) != versions(installed) {
        return Finding::bad(
            Status::Fail,
            "crd",
            name,
            format!(
                "serves versions {:?}, this binary expects {:?}",
                versions(installed),
                versions(expected)
            ),
            UPGRADE,
        );
    }
    let schema = |crd: &CustomResourceDefinition| -> Vec<serde_json::Value> {
        crd.spec
            .versions
            .iter()
            .map(|v| serde_json::to_value(&v.schema).unwrap_or_default())
            .collect()
    };
    if schema(expected) != schema(installed) {
        return Finding::bad(
            Status::Warn,
            "crd",
            name,
            "installed, but its schema differs from this binary's (an older or newer release)",
            UPGRADE,
        );
    }
    let storage = installed
        .spec
        .versions
        .iter()
        .find(|v| v.storage)
        .map(|v| v.name.clone())
        .unwrap_or_default();
    let stored: Vec<String> = installed
        .status
        .as_ref()
        .and_then(|s| s.stored_versions.clone())
        .unwrap_or_default();
    if stored.iter().any(|v| *v != storage) {
        return Finding::bad(
            Status::Warn,
            "crd",
            name,
            format!(
                "objects may still be stored at an older version: status.storedVersions is {stored:?}, the storage version {storage}"
            ),
            "the operator's leader migrates them (storageMigration.enabled); or run kmsgrant-operator migrate --cluster, then migrate --check (docs/versioning.md)",
        );
    }
    Finding::ok(
        "crd",
        name,
        format!("Established, versions {:?}", versions(installed)),
    )
}

/// The guardrails admission policy and its binding (optional, but recommended).
async fn admission(client: &kube::Client) -> Finding {
    use k8s_openapi::api::admissionregistration::v1::{
        ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
    };
    let name = "kmsgrant-guardrails";
    let policy = Api::<ValidatingAdmissionPolicy>::all(client.clone())
        .get_opt(name)
        .await;
    let binding = Api::<ValidatingAdmissionPolicyBinding>::all(client.clone())
        .get_opt(name)
        .await;
    match (policy, binding) {
        (Ok(Some(_)), Ok(Some(_))) => {
            Finding::ok("admission", name, "policy and binding installed")
        }
        (Ok(Some(_)), Ok(None)) => Finding::bad(
            Status::Warn,
            "admission",
            name,
            "the policy is installed but not bound: it checks nothing",
            "kubectl apply -f deploy/admission/guardrails.yaml (the binding is in the same file)",
        ),
        (Ok(None), _) => Finding::bad(
            Status::Warn,
            "admission",
            name,
            "no admission guardrails: a KmsGrant outside a provider config's guardrails is only refused by the operator, after it was stored",
            "kubectl apply -f deploy/admission/guardrails.yaml, or the chart's default admissionPolicy.enabled",
        ),
        (Err(err), _) | (_, Err(err)) => Finding::bad(
            Status::Skip,
            "admission",
            name,
            format!("cannot read admission policies: {err}"),
            "needs Kubernetes 1.30 or later and get on validatingadmissionpolicies",
        ),
    }
}

/// The report as people read it.
pub fn render(findings: &[Finding]) -> String {
    let mut out = String::new();
    for finding in findings {
        let status = match finding.status {
            Status::Ok => "ok  ",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
            Status::Skip => "skip",
        };
        out.push_str(&format!(
            "{status}  {:<12} {}: {}\n",
            finding.check, finding.target, finding.message
        ));
        if let Some(fix) = &finding.fix
            && finding.status != Status::Ok
        {
            out.push_str(&format!("      fix: {fix}\n"));
        }
    }
    let count = |s: Status| findings.iter().filter(|f| f.status == s).count();
    out.push_str(&format!(
        "{} checks: {} ok, {} warnings, {} failed, {} skipped\n",
        findings.len(),
        count(Status::Ok),
        count(Status::Warn),
        count(Status::Fail),
        count(Status::Skip)
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clocks_within_a_minute_are_ok_and_beyond_fifteen_fail() {
        let server = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let at = |seconds: i64| {
            if seconds >= 0 {
                server + Duration::from_secs(seconds as u64)
            } else {
                server - Duration::from_secs((-seconds) as u64)
            }
        };
        assert_eq!(clock("t", server, at(30)).status, Status::Ok);
        assert_eq!(clock("t", server, at(-300)).status, Status::Warn);
        let far = clock("t", server, at(-16 * 60));
        assert_eq!(far.status, Status::Fail);
        assert!(far.message.contains("960 s behind"), "{}", far.message);
        assert!(far.fix.unwrap().contains("NTP"));
    }

    #[test]
    fn every_failure_reason_names_a_fix() {
        for reason in [
            ErrorReason::ConnectionFailed,
            ErrorReason::InvalidCredentials,
            ErrorReason::ClockSkew,
            ErrorReason::PermissionDenied,
            ErrorReason::WrongProject,
            ErrorReason::KeyNotFound,
            ErrorReason::GrantQuotaExceeded,
            ErrorReason::IdentityTokenRefused,
        ] {
            let fix = fix_for(&KmsError::new(kmsgrant_kms::Call::DescribeKey, reason, "x"));
            assert_ne!(fix, "see the message", "{reason:?}");
        }
    }

    fn established(mut crd: CustomResourceDefinition) -> CustomResourceDefinition {
        use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
            CustomResourceDefinitionCondition, CustomResourceDefinitionStatus,
        };
        crd.status = Some(CustomResourceDefinitionStatus {
            conditions: Some(vec![CustomResourceDefinitionCondition {
                type_: "Established".into(),
                status: "True".into(),
                ..Default::default()
            }]),
            ..Default::default()
        });
        crd
    }

    #[test]
    fn installed_crds_are_judged_by_establishment_versions_and_schema() {
        let expected = crate::api::crds().remove(0);
        assert_eq!(
            compare_crd(&expected, &established(expected.clone())).status,
            Status::Ok
        );
        assert_eq!(
            compare_crd(&expected, &expected).status,
            Status::Fail,
            "not Established"
        );

        let mut other_versions = established(expected.clone());
        other_versions.spec.versions[0].name = "v1alpha0".into();
        let finding = compare_crd(&expected, &other_versions);
        assert_eq!(finding.status, Status::Fail);
        assert!(
            finding
                .fix
                .unwrap()
                .contains("kmsgrant-operator crd | kubectl apply")
        );

        let mut older_schema = established(expected.clone());
        older_schema.spec.versions[0].schema = None;
        assert_eq!(compare_crd(&expected, &older_schema).status, Status::Warn);
    }

    #[tokio::test]
    async fn the_write_probe_fails_with_the_fix_when_its_grant_lists_without_its_name() {
        let emulator = kms_emulator::Emulator::start(kms_emulator::EmulatorConfig::for_tests())
            .await
            .unwrap();
        let key = emulator
            .admin()
            .create_key(kms_emulator::NewKey {
                key_alias: "probed".into(),
                ..Default::default()
            })
            .unwrap()
            .key_id;
        let kms = crate::controller::test_support::emulator_client(&emulator);
        let probe = write_probe(&kms, "default", &key, "0d0466b00d0466b00d0466b0").await;
        assert_eq!(probe.status, Status::Ok, "{probe:?}");

        emulator
            .admin()
            .set_faults(kms_emulator::FaultSettings {
                omit_grant_names: true,
                ..Default::default()
            })
            .unwrap();
        let probe = write_probe(&kms, "default", &key, "0d0466b00d0466b00d0466b0").await;
        assert_eq!(probe.status, Status::Fail, "{probe:?}");
        assert!(probe.message.contains("without its name"), "{probe:?}");
        assert!(probe.message.contains("GrantNamesNotReturned"), "{probe:?}");
        let fix = probe.fix.unwrap();
        assert!(fix.contains("kmsgrant-operator live-test"), "{fix}");
        assert_eq!(
            emulator.admin().grant_count(&key),
            Some(0),
            "the probe's grant is revoked either way"
        );
        emulator.shutdown().await;
    }

    #[test]
    fn the_text_report_shows_the_fix_under_each_problem_and_counts() {
        let findings = vec![
            Finding::ok("crd", "kmsgrants.kmsgrant.io", "Established"),
            Finding::bad(
                Status::Fail,
                "key",
                "default k",
                "no such key",
                "check the key ID",
            ),
        ];
        let text = render(&findings);
        assert!(
            text.contains(
                "FAIL  key          default k: no such key\n      fix: check the key ID\n"
            ),
            "{text}"
        );
        assert!(
            text.ends_with("2 checks: 1 ok, 0 warnings, 1 failed, 0 skipped\n"),
            "{text}"
        );
    }
}
