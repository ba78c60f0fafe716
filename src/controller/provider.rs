//! KmsProviderConfig: turn a config and its Secret into a working KMS client, and say whether the
//! credentials work.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use k8s_openapi::api::core::v1::{ObjectReference, Secret};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Resource, ResourceExt};
use serde_json::json;

use super::catalog::{self, CatalogVerdict};
use super::conditions::{Outcome, conditions, now_rfc3339, reasons, truncate_message};
use super::credentials::KeylessSettings;
use super::{Context, ReconcileError};
use crate::api::{
    Condition, ConditionStatus, KmsGrant, KmsNamespacedProviderConfig, KmsProviderConfig,
    KmsProviderConfigSpec, KmsProviderConfigStatus, ProviderConfigKind, SecretReference,
    SigningVariant,
};
use kmsgrant_kms::signer::SigningScheme;
use kmsgrant_kms::{ClientConfig, KmsClient, KmsError, Project, RateLimitConfig};

/// Holds a KmsProviderConfig until no KmsGrant this operator reconciles uses it, so deleting a
/// config in use cannot strand grants in Terminating.
pub const FINALIZER: &str = "kmsgrant.io/in-use";

/// The registry key of the provider config a KmsGrant names: the name of a cluster-scoped
/// `KmsProviderConfig`, or `<namespace>/<name>` of a `KmsNamespacedProviderConfig` in the
/// grant's own namespace (cluster names never hold a `/`). A grant cannot name another
/// namespace's config: the namespace is always its own.
pub fn key_of(grant: &KmsGrant) -> String {
    let reference = &grant.spec.provider_config_ref;
    match reference.kind {
        ProviderConfigKind::KmsProviderConfig => reference.name.clone(),
        ProviderConfigKind::KmsNamespacedProviderConfig => {
            tenant_key(&grant.namespace().unwrap_or_default(), &reference.name)
        }
    }
}

/// The registry key of a namespaced config.
pub fn tenant_key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

/// `(namespace, name)` of a namespaced config's key; `None` for a cluster config.
pub fn split_tenant_key(key: &str) -> Option<(&str, &str)> {
    key.split_once('/')
}

/// A namespaced config as the controller handles every config: a `KmsProviderConfig` named by
/// its registry key, with the spec it means ([`KmsNamespacedProviderConfig::as_cluster_spec`]),
/// its UID, generation, finalizers and status. Never sent to the API server.
pub fn as_cluster_config(tenant: &KmsNamespacedProviderConfig) -> KmsProviderConfig {
    let mut config = KmsProviderConfig::new(
        &tenant_key(&tenant.namespace().unwrap_or_default(), &tenant.name_any()),
        tenant.as_cluster_spec(),
    );
    let meta = tenant.meta();
    config.metadata.uid = meta.uid.clone();
    config.metadata.generation = meta.generation;
    config.metadata.resource_version = meta.resource_version.clone();
    config.metadata.finalizers = meta.finalizers.clone();
    config.metadata.deletion_timestamp = meta.deletion_timestamp.clone();
    config.status = tenant.status.clone();
    config
}

/// A provider config turned into a client, with the spec it was built from.
#[derive(Clone)]
pub struct Provider {
    pub client: KmsClient,
    pub spec: KmsProviderConfigSpec,
    /// The config object this was built for: a config deleted and re-created under the same name
    /// is another object and never gets this client, caches or guardrails.
    pub uid: String,
    /// Changes whenever the config (UID, generation) or its Secret changes.
    pub fingerprint: String,
}

/// A provider config object, cluster-scoped or a tenant's: what the watches that wake on its
/// changes need of it.
pub trait ConfigObject:
    Resource<DynamicType = ()>
    + Clone
    + serde::de::DeserializeOwned
    + std::fmt::Debug
    + Send
    + Sync
    + 'static
{
    fn config_status(&self) -> Option<&KmsProviderConfigStatus>;
}

impl ConfigObject for KmsProviderConfig {
    fn config_status(&self) -> Option<&KmsProviderConfigStatus> {
        self.status.as_ref()
    }
}

impl ConfigObject for KmsNamespacedProviderConfig {
    fn config_status(&self) -> Option<&KmsProviderConfigStatus> {
        self.status.as_ref()
    }
}

fn hash_of(value: impl std::hash::Hash) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
    BuildHasherDefault::<DefaultHasher>::default().hash_one(value)
}

/// What a config's own reconcile (a check: a KMS call) wakes for: a new object under its name, its
/// spec, its finalizers, its deletion. Not its status, which the operator writes itself: a woken
/// check after each of its own writes would be a second call for nothing.
pub fn wakes_its_check<K: Resource>(config: &K) -> Option<u64> {
    let meta = config.meta();
    Some(hash_of((
        meta.uid.as_deref(),
        meta.generation,
        meta.deletion_timestamp.is_some(),
        meta.finalizers.as_deref(),
    )))
}

/// What wakes the grants and key policies using a config: its spec, its deletion and its status
/// (it becoming Ready or not), but not the learned rate limit, written when the cloud throttles.
pub fn wakes_its_users<K: ConfigObject>(config: &K) -> Option<u64> {
    let meta = config.meta();
    let mut status = config.config_status().cloned().unwrap_or_default();
    status.learned_rate_limit = None;
    Some(hash_of((
        meta.uid.as_deref(),
        meta.generation,
        meta.deletion_timestamp.is_some(),
        serde_json::to_string(&status).unwrap_or_default(),
    )))
}

/// The account a provider reaches: its endpoint and its (resolved) project.
pub(super) async fn account_of(provider: &Provider) -> Result<String, KmsError> {
    let project_id = provider.client.project_id().await?;
    Ok(super::plan::account(&provider.spec.endpoint, &project_id))
}

/// The provider configs as one KmsGrant's pass sees them (see [`ProviderRegistry::view`]).
pub struct ProviderView {
    /// The config the object names.
    pub name: String,
    pub exists: bool,
    pub current: Option<Provider>,
    /// The account `current` reaches, or why it could not be told.
    pub account: Option<Result<String, KmsError>>,
    /// Other accounts status records grants on, with a config reaching each (by name).
    pub reaching: BTreeMap<String, (String, Provider)>,
}

/// One registered provider and what its checks said.
#[derive(Clone)]
struct Entry {
    provider: Provider,
    /// The credentials worked once with this fingerprint: grants may use the client. Stays true
    /// through later failed checks, which only the config's own conditions report.
    verified: bool,
    /// Consecutive failed periodic checks.
    failed_checks: u32,
    /// The endpoint and region against IAM's catalog, read once per build.
    catalog: Option<CatalogVerdict>,
    /// When the last check succeeded.
    passed_at: Option<tokio::time::Instant>,
}

/// A config woken again this soon after a passed check of the same config and Secret (its Secret's
/// watch starting, say, right after the config's own first check) is not checked again: nothing
/// the check looks at changed.
const RECHECK_AFTER: Duration = Duration::from_secs(10);

/// The providers by config name, checked against the config objects the operator sees.
pub struct ProviderRegistry {
    providers: RwLock<HashMap<String, Entry>>,
    /// The UID of each config object this process has checked at least once (whatever the check
    /// found), by registry key: until then a config's Ready in the API server is the previous
    /// operator's word, and "no provider here" means "not checked yet", not "not Ready".
    checked: RwLock<HashMap<String, String>>,
    configs: Store<KmsProviderConfig>,
    tenant_configs: Store<KmsNamespacedProviderConfig>,
}

impl ProviderRegistry {
    pub fn new(
        configs: Store<KmsProviderConfig>,
        tenant_configs: Store<KmsNamespacedProviderConfig>,
    ) -> Self {
        Self {
            providers: RwLock::default(),
            checked: RwLock::default(),
            configs,
            tenant_configs,
        }
    }

    /// The UID of the config object behind a registry key, as the cache holds it.
    fn cached_uid(&self, key: &str) -> Option<String> {
        match split_tenant_key(key) {
            Some((namespace, name)) => self
                .tenant_configs
                .get(&ObjectRef::<KmsNamespacedProviderConfig>::new(name).within(namespace))?
                .uid(),
            None => self
                .configs
                .get(&ObjectRef::<KmsProviderConfig>::new(key))?
                .uid(),
        }
    }

    /// The status of the config object `uid` behind a registry key, as the cache holds it (empty
    /// when it has none); `None` when the cache holds no such object.
    pub fn cached_status(&self, key: &str, uid: &str) -> Option<KmsProviderConfigStatus> {
        let (cached_uid, status) = match split_tenant_key(key) {
            Some((namespace, name)) => {
                let config = self
                    .tenant_configs
                    .get(&ObjectRef::<KmsNamespacedProviderConfig>::new(name).within(namespace))?;
                (config.uid(), config.status.clone())
            }
            None => {
                let config = self
                    .configs
                    .get(&ObjectRef::<KmsProviderConfig>::new(key))?;
                (config.uid(), config.status.clone())
            }
        };
        (cached_uid.as_deref() == Some(uid)).then(|| status.unwrap_or_default())
    }

    /// Whether the config behind a registry key exists (asked of the API server when the
    /// cache does not hold it).
    async fn exists(&self, client: &kube::Client, key: &str) -> Result<bool, kube::Error> {
        if self.cached_uid(key).is_some() {
            return Ok(true);
        }
        Ok(match split_tenant_key(key) {
            Some((namespace, name)) => {
                Api::<KmsNamespacedProviderConfig>::namespaced(client.clone(), namespace)
                    .get_opt(name)
                    .await?
                    .is_some()
            }
            None => Api::<KmsProviderConfig>::all(client.clone())
                .get_opt(key)
                .await?
                .is_some(),
        })
    }

    /// Notes that this process has checked the config object `uid` behind `name`.
    fn mark_checked(&self, name: &str, uid: Option<String>) {
        if let Some(uid) = uid {
            self.checked
                .write()
                .expect("registry lock")
                .insert(name.to_owned(), uid);
        }
    }

    /// Waits, at most `wait`, until this process has checked the config behind `name` once
    /// (returns at once when the cache holds no such config). A new operator starts its grant
    /// and provider controllers together: without this, the grants it reaches before its first
    /// check of their config would be written NotReady (status and a Warning event) and back,
    /// though nothing changed.
    pub async fn until_checked(&self, name: &str, wait: Duration) {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let Some(uid) = self.cached_uid(name) else {
                return;
            };
            if self.checked.read().expect("registry lock").get(name) == Some(&uid)
                || tokio::time::Instant::now() >= deadline
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The provider KmsGrants may use: built for the config object that exists now and verified.
    /// It stays usable while later checks fail (a blip of the check endpoint is no reason to stop
    /// grants whose own calls work); a changed config or Secret replaces it.
    pub fn get(&self, name: &str) -> Option<Provider> {
        self.current(name)
            .filter(|entry| entry.verified)
            .map(|entry| entry.provider)
    }

    /// The client cleanup may use: the current config's, verified or not. A config that is not
    /// Ready never blocks the revoke of a grant while the revoke itself works.
    pub fn for_cleanup(&self, name: &str) -> Option<Provider> {
        self.current(name).map(|entry| entry.provider)
    }

    /// Every provider built for a config object that exists now, verified or not, with its
    /// config's name: cleanup looks among them for the account a grant lives on.
    pub fn all(&self) -> Vec<(String, Provider)> {
        let names: Vec<String> = self
            .providers
            .read()
            .expect("registry lock")
            .keys()
            .cloned()
            .collect();
        names
            .into_iter()
            .filter_map(|name| self.for_cleanup(&name).map(|provider| (name, provider)))
            .collect()
    }

    /// A provider built for an existing config that reaches `account` and that KmsGrants of
    /// `namespace` may use, with its config's name: a cluster config, or a namespaced config of
    /// that namespace. Never another tenant's credentials for this namespace's grants.
    pub async fn for_account(&self, account: &str, namespace: &str) -> Option<(String, Provider)> {
        for (name, provider) in self.all() {
            if split_tenant_key(&name).is_some_and(|(owner, _)| owner != namespace) {
                continue;
            }
            if account_of(&provider).await.is_ok_and(|a| a == account) {
                return Some((name, provider));
            }
        }
        None
    }

    /// What one KmsGrant's pass needs to know of provider configs: whether the named one exists
    /// (in the cache, else asked of the API server), the client the object may use (verified;
    /// for `cleanup`, the current one whatever its checks say), the account it reaches, and a
    /// provider for each of `elsewhere` (accounts status records grants on) that another config
    /// reaches.
    pub async fn view(
        &self,
        client: &kube::Client,
        name: &str,
        namespace: &str,
        cleanup: bool,
        elsewhere: &[&str],
    ) -> Result<ProviderView, kube::Error> {
        let current = if cleanup {
            self.for_cleanup(name)
        } else {
            self.get(name)
        };
        let exists = current.is_some() || self.exists(client, name).await?;
        let account = match &current {
            Some(provider) => Some(account_of(provider).await),
            None => None,
        };
        let here = account.as_ref().and_then(|a| a.as_ref().ok());
        let mut reaching = BTreeMap::new();
        for account in elsewhere {
            if Some(*account) != here.map(String::as_str)
                && !reaching.contains_key(*account)
                && let Some(found) = self.for_account(account, namespace).await
            {
                reaching.insert((*account).to_owned(), found);
            }
        }
        Ok(ProviderView {
            name: name.to_owned(),
            exists,
            current,
            account,
            reaching,
        })
    }

    fn current(&self, name: &str) -> Option<Entry> {
        let uid = self.cached_uid(name)?;
        self.entry(name).filter(|entry| entry.provider.uid == uid)
    }

    fn entry(&self, name: &str) -> Option<Entry> {
        self.providers
            .read()
            .expect("registry lock")
            .get(name)
            .cloned()
    }

    fn set(&self, name: &str, entry: Entry) {
        self.providers
            .write()
            .expect("registry lock")
            .insert(name.to_owned(), entry);
    }

    fn update(
        &self,
        name: &str,
        fingerprint: &str,
        change: impl FnOnce(&mut Entry),
    ) -> Option<Entry> {
        let mut providers = self.providers.write().expect("registry lock");
        let entry = providers
            .get_mut(name)
            .filter(|e| e.provider.fingerprint == fingerprint)?;
        change(entry);
        Some(entry.clone())
    }

    fn remove(&self, name: &str) {
        self.providers.write().expect("registry lock").remove(name);
    }
}

/// Why a provider config is not usable, as a condition.
struct NotUsable(Outcome);

pub async fn reconcile(
    config: Arc<KmsProviderConfig>,
    ctx: Arc<Context>,
) -> Result<Action, ReconcileError> {
    let name = config.name_any();
    if config.meta().deletion_timestamp.is_some() {
        return release_when_unused(&config, &ctx).await;
    }
    let config = if config.finalizers().iter().any(|f| f == FINALIZER) {
        config
    } else {
        match add_finalizer(&config, &ctx).await? {
            // The patch wakes this config again, with the finalizer in place.
            None => return Ok(Action::await_change()),
            Some(current) => Arc::new(current),
        }
    };
    let settled_retry = ctx.settings.provider_check_interval;
    let checked = check(&config, &ctx).await;
    ctx.providers.mark_checked(&name, config.uid());
    let outcome = match checked {
        Checked::Ready(project_id) => {
            write_status(
                &config,
                &ctx,
                &Outcome::Ready {
                    reason: reasons::PROVIDER_READY,
                    message: format!(
                        "authenticated against {} in project {project_id}",
                        config.spec.endpoint
                    ),
                },
                Some(project_id),
            )
            .await?;
            return Ok(Action::requeue(settled_retry));
        }
        Checked::Failing {
            failed_checks,
            outcome,
        } => {
            let threshold = ctx.settings.provider_failure_threshold.max(1);
            if failed_checks < threshold {
                // A verified config whose check failed: NotReady only once the failure has
                // lasted `threshold` checks, so a blip writes nothing and wakes no grant.
                tracing::warn!(provider = %name, failed_checks, threshold, reason = outcome.reason(), message = outcome.message(), "provider check failed; NotReady only after {threshold} failed checks in a row");
                return Ok(Action::requeue(settled_retry));
            }
            tracing::warn!(provider = %name, failed_checks, reason = outcome.reason(), "provider check keeps failing; the config is NotReady (grants keep their client while their own calls work)");
            write_status(&config, &ctx, &outcome, None).await?;
            return Ok(Action::requeue(settled_retry));
        }
        Checked::NotUsable(NotUsable(outcome)) => outcome,
    };
    write_status(&config, &ctx, &outcome, None).await?;
    Ok(match outcome {
        Outcome::Stalled { .. } => Action::requeue(ctx.settings.stalled_retry),
        _ => Action::requeue(ctx.settings.backoff_min.max(Duration::from_secs(5))),
    })
}

/// What one check of a config found.
enum Checked {
    /// Usable; the project ID in use.
    Ready(String),
    /// A verified client whose check failed now, `failed_checks` times in a row.
    Failing {
        failed_checks: u32,
        outcome: Outcome,
    },
    /// Not usable as configured (or not verified yet).
    NotUsable(NotUsable),
}

async fn check(config: &KmsProviderConfig, ctx: &Context) -> Checked {
    let name = config.name_any();
    let built = match build(config, ctx).await {
        Ok(built) => built,
        Err(not_usable) => {
            if !matches!(not_usable.0, Outcome::Progressing { .. }) {
                // Refused as configured: no client may be used with it any more.
                ctx.providers.remove(&name);
                ctx.keys.forget_provider(&name);
                ctx.metrics.provider_credentials(&name, None);
            }
            return Checked::NotUsable(not_usable);
        }
    };
    let fingerprint = built.fingerprint.clone();
    // Read once per spec: a status that already tells the catalog's verdict on this generation
    // (written by an earlier process) is kept, so a restart or a new leader adds no call.
    if ctx
        .providers
        .entry(&name)
        .is_some_and(|entry| entry.catalog.is_none())
        && catalog_told(config).is_none()
    {
        let verdict = read_catalog(&built).await;
        if verdict.is_mismatch() {
            tracing::warn!(provider = %name, reason = verdict.reason(), "{}", verdict.note(&built.spec.endpoint, built.spec.region.as_deref()));
            ctx.recorder
                .tell(
                    &regarding(config),
                    EventType::Warning,
                    verdict.reason(),
                    verdict.note(&built.spec.endpoint, built.spec.region.as_deref()),
                )
                .await;
        }
        ctx.providers
            .update(&name, &fingerprint, |entry| entry.catalog = Some(verdict));
    }
    if ctx.providers.entry(&name).is_some_and(|entry| {
        entry.provider.fingerprint == fingerprint
            && entry.verified
            && entry.failed_checks == 0
            && entry
                .passed_at
                .is_some_and(|at| at.elapsed() < RECHECK_AFTER)
    }) && let Ok(project_id) = built.client.project_id().await
    {
        return Checked::Ready(project_id);
    }
    // One cheap authenticated call proves endpoint, project and credentials.
    let verdict = async {
        let project_id = built.client.project_id().await?;
        built.client.user_quotas().await?;
        Ok::<_, KmsError>(project_id)
    }
    .await;
    ctx.metrics
        .provider_credentials(&name, Some(&built.client.credential_status()));
    match verdict {
        Ok(project_id) => {
            let mut was_healthy = true;
            ctx.providers.update(&name, &fingerprint, |entry| {
                was_healthy = entry.verified && entry.failed_checks == 0;
                entry.verified = true;
                entry.failed_checks = 0;
                entry.passed_at = Some(tokio::time::Instant::now());
            });
            if !was_healthy {
                tracing::info!(provider = %name, "provider config verified");
            }
            Checked::Ready(project_id)
        }
        Err(err) => {
            let outcome = kms_outcome(&err);
            let entry = ctx.providers.update(&name, &fingerprint, |entry| {
                if entry.verified {
                    entry.failed_checks = entry.failed_checks.saturating_add(1);
                }
            });
            match entry {
                Some(entry) if entry.verified => Checked::Failing {
                    failed_checks: entry.failed_checks,
                    outcome,
                },
                _ => Checked::NotUsable(NotUsable(outcome)),
            }
        }
    }
}

/// The registered provider for the config and Secret as they are now: the existing one when
/// nothing changed (its pool, token and resolved project), else a new client, registered
/// unverified, with the caches of the old one dropped.
async fn build(config: &KmsProviderConfig, ctx: &Context) -> Result<Provider, NotUsable> {
    let name = config.name_any();
    let tenant_namespace = split_tenant_key(&name).map(|(namespace, _)| namespace.to_owned());
    let mut tenant_spec;
    let spec = match &tenant_namespace {
        Some(_) => {
            // Before anything is sent, not even the Secret read: the endpoints must pass the
            // platform's policy, and the rate its cap.
            ctx.settings
                .tenant_policy
                .check(&config.spec)
                .await
                .map_err(NotUsable)?;
            tenant_spec = config.spec.clone();
            let cap = ctx.settings.tenant_policy.max_requests_per_second;
            if cap > 0 {
                let limit = &mut tenant_spec.rate_limit;
                limit.requests_per_second = limit.requests_per_second.min(cap);
                limit.burst = limit.burst.min(cap.saturating_mul(2));
            }
            &tenant_spec
        }
        None => &config.spec,
    };
    let secret = match &spec.auth.secret_ref {
        Some(secret_ref) => {
            Some(read_secret(secret_ref, spec, ctx, tenant_namespace.as_deref()).await?)
        }
        None => None,
    };
    let uid = config.uid().unwrap_or_default();
    let fingerprint = format!(
        "{uid}/{}/{}",
        config.meta().generation.unwrap_or_default(),
        secret
            .as_ref()
            .and_then(|s| s.resource_version())
            .unwrap_or_default()
    );
    if let Some(current) = ctx
        .providers
        .entry(&name)
        .filter(|e| e.provider.fingerprint == fingerprint)
    {
        return Ok(current.provider);
    }
    let mut keyless = ctx.keyless_settings();
    if let Some(namespace) = &tenant_namespace {
        // A tenant's ServiceAccount lives in its own namespace, and nowhere else.
        keyless.service_account_namespace = Some(namespace.clone());
    }
    let mut client_config = client_config(spec, secret.as_ref(), &keyless, ctx.settings.allow_http)
        .map_err(NotUsable)?;
    if tenant_namespace.is_some() {
        client_config.allow_http = ctx.settings.tenant_policy.allow_http;
        client_config.address_policy = Some(ctx.settings.tenant_policy.addresses.clone());
    }
    // Start at the account's throttle as the last leader learned it, when that is recent.
    client_config.learned_rate = super::learned_rate::seed(
        config
            .status
            .as_ref()
            .and_then(|status| status.learned_rate_limit.as_ref()),
        jiff::Timestamp::now(),
    );
    // Every attempt of a write asks the leader fence, retries included.
    let fence = ctx.fence.clone();
    client_config.write_gate = Some(kmsgrant_kms::WriteGate::new(move || fence.check().is_ok()));
    let client = KmsClient::with_metrics(client_config, ctx.metrics.clone())
        .map_err(|e| NotUsable(kms_outcome(&e)))?;
    let provider = Provider {
        client,
        spec: spec.clone(),
        uid,
        fingerprint,
    };
    // A new config object, spec or Secret: nothing cached under the old client may be reused.
    ctx.keys.forget_provider(&name);
    ctx.providers.set(
        &name,
        Entry {
            provider: provider.clone(),
            verified: false,
            failed_checks: 0,
            catalog: None,
            passed_at: None,
        },
    );
    tracing::info!(provider = %name, auth = ?spec.auth.type_, starting_rate = provider.client.current_rate(), "provider config (re)built; checking its credentials");
    Ok(provider)
}

/// The Secret `secret_ref` names, if the operator may read it: in its own namespace for a
/// cluster config, in the config's namespace for a tenant's.
async fn read_secret(
    secret_ref: &SecretReference,
    spec: &KmsProviderConfigSpec,
    ctx: &Context,
    tenant_namespace: Option<&str>,
) -> Result<Secret, NotUsable> {
    let allowed = match tenant_namespace {
        Some(namespace) => Some(namespace.to_owned()),
        None => ctx.settings.secret_namespace.clone(),
    };
    if let Some(allowed) = &allowed
        && &secret_ref.namespace != allowed
    {
        return Err(NotUsable(Outcome::Stalled {
            reason: reasons::SECRET_NAMESPACE_NOT_ALLOWED,
            message: format!(
                "spec.auth.secretRef.namespace is {:?}, but the operator reads credentials only from its own namespace {allowed:?}; move the Secret there",
                secret_ref.namespace
            ),
        }));
    }
    Api::<Secret>::namespaced(ctx.client.clone(), &secret_ref.namespace)
        .get_opt(&secret_ref.name)
        .await
        .map_err(|e| {
            NotUsable(Outcome::Progressing {
                reason: reasons::SECRET_NOT_FOUND,
                message: format!("cannot read Secret {}/{}: {e}", secret_ref.namespace, secret_ref.name),
            })
        })?
        .ok_or_else(|| {
            NotUsable(Outcome::Stalled {
                reason: reasons::SECRET_NOT_FOUND,
                message: format!(
                    "Secret {}/{} does not exist; create it with the credentials for auth type {:?}",
                    secret_ref.namespace, secret_ref.name, spec.auth.type_
                ),
            })
        })
}

/// The KMS client settings of a provider config and its Secret (absent for WebIdentity); also
/// used by `import`.
pub fn client_config(
    spec: &KmsProviderConfigSpec,
    secret: Option<&Secret>,
    keyless: &KeylessSettings,
    allow_http: bool,
) -> Result<ClientConfig, Outcome> {
    let (credentials, agency, temporary_access_key) =
        super::credentials::credentials(spec, secret, keyless)?;
    let project = match (&spec.project_id, &spec.project_name) {
        (Some(id), _) => Project::Id(id.clone()),
        (None, Some(name)) => Project::Name(name.clone()),
        (None, None) => {
            return Err(Outcome::Stalled {
                reason: reasons::INVALID_SPEC,
                message: "set spec.projectId or spec.projectName".into(),
            });
        }
    };
    let mut client_config = ClientConfig::new(spec.endpoint.clone(), project, credentials);
    client_config.agency = agency;
    client_config.temporary_access_key = temporary_access_key;
    client_config.iam_endpoint = spec.iam_endpoint.clone();
    client_config.region = spec.region.clone().unwrap_or_default();
    client_config.signing = match spec.auth.signing_variant {
        SigningVariant::Huawei => SigningScheme::Access,
        SigningVariant::OpenTelekomCloud => SigningScheme::Credential {
            region: client_config.region.clone(),
            service: "kms".into(),
        },
    };
    client_config.rate_limit = RateLimitConfig {
        requests_per_second: f64::from(spec.rate_limit.requests_per_second),
        burst: spec.rate_limit.burst,
    };
    client_config.ca_bundle = spec.ca_bundle.clone();
    client_config.allow_http = allow_http;
    Ok(client_config)
}

/// A config being deleted: keep it (and its client, for the grants' cleanup) while KmsGrants use
/// it; say how many; let it go when none does.
async fn release_when_unused(
    config: &KmsProviderConfig,
    ctx: &Context,
) -> Result<Action, ReconcileError> {
    let name = config.name_any();
    if !config.finalizers().iter().any(|f| f == FINALIZER) {
        return Ok(Action::await_change());
    }
    let mut users: Vec<String> = ctx
        .grants
        .state()
        .iter()
        .filter(|g| key_of(g) == name)
        .map(|g| format!("{}/{}", g.namespace().unwrap_or_default(), g.name_any()))
        .collect();
    if users.is_empty() {
        set_finalizer(config, ctx, false).await?;
        ctx.providers.remove(&name);
        ctx.keys.forget_provider(&name);
        ctx.metrics.provider_credentials(&name, None);
        tracing::info!(provider = %name, "provider config deleted; no KmsGrant uses it");
        return Ok(Action::await_change());
    }
    users.sort();
    let count = users.len();
    let shown: Vec<&str> = users.iter().take(5).map(String::as_str).collect();
    let more = if count > shown.len() {
        format!(" and {} more", count - shown.len())
    } else {
        String::new()
    };
    let outcome = Outcome::Progressing {
        reason: reasons::IN_USE,
        message: format!(
            "deletion waits: {count} KmsGrant{} still use{} this config ({}{more}); delete them or point them at another config",
            if count == 1 { "" } else { "s" },
            if count == 1 { "s" } else { "" },
            shown.join(", ")
        ),
    };
    write_status(config, ctx, &outcome, None).await?;
    // Grants going away do not wake a config; look again soon.
    Ok(Action::requeue(IN_USE_RECHECK))
}

/// How often a config whose deletion waits for its KmsGrants looks again.
const IN_USE_RECHECK: Duration = Duration::from_secs(2);

/// Adds our finalizer; `Some(config)` when the config read back from the API server had it
/// already. A 409 means the cached copy is behind, most often behind our own patch: the Secret
/// watch's first event queues the config again right after the reconcile that added the
/// finalizer, and that second reconcile can start before the patch's watch event reaches the
/// cache. Failing would hold the config back by the retry delay (5 s) for nothing; one GET
/// tells what is true now.
async fn add_finalizer(
    config: &KmsProviderConfig,
    ctx: &Context,
) -> Result<Option<KmsProviderConfig>, ReconcileError> {
    match set_finalizer(config, ctx, true).await {
        Err(ReconcileError::Kube(kube::Error::Api(status))) if status.is_conflict() => {
            let key = config.name_any();
            let current = match split_tenant_key(&key) {
                Some((namespace, name)) => as_cluster_config(
                    &Api::<KmsNamespacedProviderConfig>::namespaced(ctx.client.clone(), namespace)
                        .get(name)
                        .await
                        .map_err(ReconcileError::Kube)?,
                ),
                None => Api::<KmsProviderConfig>::all(ctx.client.clone())
                    .get(&key)
                    .await
                    .map_err(ReconcileError::Kube)?,
            };
            if current.finalizers().iter().any(|f| f == FINALIZER) {
                return Ok(Some(current));
            }
            set_finalizer(&current, ctx, true).await.map(|()| None)
        }
        result => result.map(|()| None),
    }
}

async fn set_finalizer(
    config: &KmsProviderConfig,
    ctx: &Context,
    present: bool,
) -> Result<(), ReconcileError> {
    let key = config.name_any();
    match split_tenant_key(&key) {
        Some((namespace, name)) => {
            // The real object, by name, with the finalizers and resourceVersion the projection
            // carries (a concurrent change fails with 409 instead of being overwritten).
            let mut finalizers: Vec<String> = config
                .finalizers()
                .iter()
                .filter(|f| *f != FINALIZER)
                .cloned()
                .collect();
            if present {
                finalizers.push(FINALIZER.to_owned());
            }
            let patch = json!({"metadata": {"resourceVersion": config.resource_version(), "finalizers": finalizers}});
            Api::<KmsNamespacedProviderConfig>::namespaced(ctx.client.clone(), namespace)
                .patch(name, &PatchParams::default(), &Patch::Merge(patch))
                .await
                .map(|_| ())
                .map_err(ReconcileError::Kube)
        }
        None => {
            let api = Api::<KmsProviderConfig>::all(ctx.client.clone());
            super::report::patch_finalizer(&api, config, FINALIZER, present).await
        }
    }
}

/// The endpoint and region against IAM's catalog (one IAM read per built client).
async fn read_catalog(provider: &Provider) -> CatalogVerdict {
    match provider.client.kms_catalog().await {
        Ok(entries) => catalog::compare(
            &entries,
            &provider.spec.endpoint,
            provider.spec.region.as_deref(),
        ),
        Err(err) => CatalogVerdict::Unknown {
            why: err.to_string(),
        },
    }
}

/// The config object itself, for events: a tenant's is its namespaced kind.
fn regarding(config: &KmsProviderConfig) -> ObjectReference {
    let key = config.name_any();
    match split_tenant_key(&key) {
        Some((namespace, name)) => ObjectReference {
            api_version: Some(KmsNamespacedProviderConfig::api_version(&()).into_owned()),
            kind: Some(KmsNamespacedProviderConfig::kind(&()).into_owned()),
            namespace: Some(namespace.to_owned()),
            name: Some(name.to_owned()),
            uid: config.uid(),
            ..ObjectReference::default()
        },
        None => config.object_ref(&()),
    }
}

/// The `EndpointInCatalog` condition the config's status holds for its current generation.
fn catalog_told(config: &KmsProviderConfig) -> Option<&Condition> {
    config.status.as_ref()?.conditions.iter().find(|c| {
        c.type_ == catalog::CONDITION_TYPE
            && c.observed_generation.is_some()
            && c.observed_generation == config.meta().generation
    })
}

/// The `EndpointInCatalog` condition for `verdict`, keeping its transition time while its
/// status stays.
fn catalog_condition(
    verdict: &CatalogVerdict,
    spec: &KmsProviderConfigSpec,
    generation: Option<i64>,
    previous: &[Condition],
    now: &str,
) -> Condition {
    let status = match verdict.condition_status() {
        "True" => ConditionStatus::True,
        "False" => ConditionStatus::False,
        _ => ConditionStatus::Unknown,
    };
    let last_transition_time = previous
        .iter()
        .find(|c| c.type_ == catalog::CONDITION_TYPE && c.status == status)
        .map(|c| std::sync::Arc::clone(&c.last_transition_time))
        .unwrap_or_else(|| now.into());
    Condition {
        type_: catalog::CONDITION_TYPE.into(),
        status,
        reason: verdict.reason().into(),
        message: truncate_message(&verdict.note(&spec.endpoint, spec.region.as_deref())).into(),
        observed_generation: generation,
        last_transition_time,
    }
}

/// The condition for a KMS failure while checking a provider: the shared mapping, with a hint.
fn kms_outcome(err: &KmsError) -> Outcome {
    const HINT: &str = "; check the endpoint, project and the credentials in the Secret";
    use kmsgrant_kms::ErrorReason::*;
    if matches!(
        err.reason,
        IdentityProviderNotFound
            | IdentityTokenRefused
            | IdentityTokenExpired
            | IdentityTokenUnavailable
            | AgencyNotAssumable
    ) {
        // These messages say what to fix already.
        return super::plan::failure_outcome(err);
    }
    if super::fixes::fix_for_reason(err.reason).is_some() {
        // The message names the fix already.
        return super::plan::failure_outcome(err);
    }
    match super::plan::failure_outcome(err) {
        Outcome::Progressing { reason, message } => Outcome::Progressing {
            reason,
            message: message + HINT,
        },
        Outcome::Stalled { reason, message } => Outcome::Stalled {
            reason,
            message: message + HINT,
        },
        ready => ready,
    }
}

async fn write_status(
    config: &KmsProviderConfig,
    ctx: &Context,
    outcome: &Outcome,
    project_id: Option<String>,
) -> Result<(), ReconcileError> {
    let previous = config.status.clone().unwrap_or_default();
    let generation = config.meta().generation;
    let now = now_rfc3339();
    let mut status = KmsProviderConfigStatus {
        project_id: project_id.or(previous.project_id.clone()),
        observed_generation: generation,
        conditions: conditions(outcome, generation, &previous.conditions, &now),
        // The learned rate's own writer keeps it (see `learned_rate`); a merge patch without it
        // leaves it as it is.
        learned_rate_limit: previous.learned_rate_limit.clone(),
    };
    // The catalog's verdict on the client in use; none when no client could be built.
    let verdict = ctx
        .providers
        .entry(&config.name_any())
        .filter(|entry| entry.provider.uid == config.uid().unwrap_or_default())
        .and_then(|entry| entry.catalog);
    if verdict.is_none()
        && let Some(told) = catalog_told(config)
    {
        status.conditions.push(told.clone());
    } else if let Some(verdict) = verdict {
        status.conditions.push(catalog_condition(
            &verdict,
            &config.spec,
            generation,
            &previous.conditions,
            &now,
        ));
    }
    if status == previous {
        return Ok(());
    }
    patch_status(ctx, &config.name_any(), json!({"status": status}))
        .await
        .map_err(ReconcileError::Kube)
}

/// A JSON merge patch of the status of the config behind a registry key (a cluster config, or a
/// tenant's `namespace/name`).
pub(super) async fn patch_status(
    ctx: &Context,
    key: &str,
    patch: serde_json::Value,
) -> Result<(), kube::Error> {
    let patch = Patch::Merge(patch);
    match split_tenant_key(key) {
        Some((namespace, name)) => {
            Api::<KmsNamespacedProviderConfig>::namespaced(ctx.client.clone(), namespace)
                .patch_status(name, &PatchParams::default(), &patch)
                .await
                .map(|_| ())
        }
        None => Api::<KmsProviderConfig>::all(ctx.client.clone())
            .patch_status(key, &PatchParams::default(), &patch)
            .await
            .map(|_| ()),
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};

    use super::super::scope::namespace_allowed;
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn namespace_selector_matches_labels_and_expressions() {
        let selector = LabelSelector {
            match_labels: Some(labels(&[("kms-grants", "allowed")])),
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "tier".into(),
                operator: "NotIn".into(),
                values: Some(vec!["sandbox".into()]),
            }]),
        };
        assert!(namespace_allowed(None, &labels(&[])));
        assert!(namespace_allowed(
            Some(&selector),
            &labels(&[("kms-grants", "allowed")])
        ));
        assert!(!namespace_allowed(
            Some(&selector),
            &labels(&[("kms-grants", "allowed"), ("tier", "sandbox")])
        ));
        assert!(!namespace_allowed(Some(&selector), &labels(&[])));
    }

    #[test]
    fn a_selector_with_an_unknown_operator_allows_no_namespace() {
        let selector = LabelSelector {
            match_labels: None,
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "tier".into(),
                operator: "Like".into(),
                values: Some(vec!["prod".into()]),
            }]),
        };
        assert!(!namespace_allowed(
            Some(&selector),
            &labels(&[("tier", "prod")])
        ));
    }
}
