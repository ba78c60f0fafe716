//! The controllers: KmsGrant (grants on the cloud) and KmsProviderConfig (clients and their
//! credentials), the per-key grant cache they share, and the drift detector.

mod audit;
mod cache;
pub mod catalog;
mod conditions;
pub mod credentials;
mod execute;
pub mod fairness;
mod fixes;
mod grant;
pub mod identity;
mod keyref;
mod learned_rate;
mod namespaces;
mod observe;
mod plan;
mod policy;
mod provider;
mod report;
mod scope;
pub mod tenancy;
#[cfg(test)]
pub(crate) mod test_support;
mod warm;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller};
use kube::runtime::events::Reporter;
use kube::runtime::reflector::{self, ObjectRef, Store, reflector};
use kube::runtime::utils::PredicateConfig;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use tokio::sync::mpsc;

pub use cache::KeyRef;
pub use conditions::{Outcome, reasons};
pub use fixes::{fix_for, fix_for_reason};
pub use plan::FINALIZER;
pub use plan::{DesiredGrant, Plan, plan};
pub use provider::client_config;
pub use report::FIELD_MANAGER;

use crate::api::{KmsGrant, KmsKeyPolicy, KmsNamespacedProviderConfig, KmsProviderConfig};
use crate::metrics::Metrics;

/// How the controllers pace themselves.
#[derive(Clone)]
pub struct Settings {
    /// How often every key in use is listed to detect drift (Ready objects: see `wake_sync_due`).
    pub resync: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// How long a Stalled object waits before it is looked at again (changes wake it earlier).
    pub stalled_retry: Duration,
    /// Reconciles running at once.
    pub concurrency: u16,
    /// `limit` of each list-grants page.
    pub page_size: u32,
    /// Namespace whose Secrets are watched (the operator's own).
    pub secret_namespace: Option<String>,
    /// Allow `http://` endpoints (local emulators only).
    pub allow_http: bool,
    /// Watch KmsGrants in this namespace only (default: all).
    pub namespace: Option<String>,
    /// Reconcile only KmsGrants and KmsProviderConfigs with these labels (sharding).
    pub label_selector: Option<String>,
    /// The cluster part of every grant's identity name; empty: the UID of the `kube-system`
    /// namespace (unique per cluster, but new when a cluster is rebuilt).
    pub cluster_name: String,
    /// Closed when this replica may not write to KMS (leader election).
    pub fence: crate::leader::Fence,
    /// How often a provider config's credentials are checked (`user-quotas`).
    pub provider_check_interval: Duration,
    /// Consecutive failed checks before a verified provider config is reported NotReady.
    pub provider_failure_threshold: u32,
    /// This replica's name (its pod), reported as the instance of every event it records.
    pub instance: Option<String>,
    /// `webIdentity.tokenFile` must lie under this directory.
    pub web_identity_token_dir: std::path::PathBuf,
    /// What tenant configs (`KmsNamespacedProviderConfig`) may reach and how fast.
    pub tenant_policy: tenancy::TenantPolicy,
    /// Share KMS work fairly across provider configs and namespaces (see [`fairness`]).
    pub fair_scheduling: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            resync: Duration::from_secs(300),
            backoff_min: Duration::from_secs(1),
            backoff_max: Duration::from_secs(300),
            stalled_retry: Duration::from_secs(300),
            concurrency: 8,
            page_size: kmsgrant_kms::MAX_PAGE_SIZE,
            secret_namespace: None,
            allow_http: false,
            namespace: None,
            label_selector: None,
            cluster_name: String::new(),
            fence: crate::leader::Fence::open(),
            provider_check_interval: Duration::from_secs(60),
            provider_failure_threshold: 3,
            instance: None,
            web_identity_token_dir: credentials::DEFAULT_TOKEN_DIR.into(),
            tenant_policy: tenancy::TenantPolicy::default(),
            fair_scheduling: true,
        }
    }
}

impl Settings {
    /// A grant snapshot is reused for this long. The drift detector refreshes every key once per
    /// resync, so object reconciles in between never list.
    fn snapshot_max_age(&self) -> Duration {
        self.resync * 2
    }

    fn key_info_max_age(&self) -> Duration {
        self.resync * 4
    }

    /// `status.lastSyncTime` is rewritten at least this often even when nothing changed.
    fn sync_time_refresh(&self) -> Duration {
        (self.resync * 10).max(Duration::from_secs(3600))
    }
}

/// Errors that stop a reconcile (KMS failures become conditions instead).
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("Kubernetes API call failed: {0}")]
    Kube(#[source] kube::Error),
    #[error(transparent)]
    NotLeader(#[from] crate::leader::NotLeader),
}

impl ReconcileError {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Kube(_) => "KubernetesApiError",
            Self::NotLeader(_) => "NotLeader",
        }
    }
}

/// Shared by every reconcile.
pub struct Context {
    client: Client,
    settings: Settings,
    recorder: report::Events,
    keys: cache::KeyCache,
    providers: provider::ProviderRegistry,
    provider_configs: Store<KmsProviderConfig>,
    grants: Store<KmsGrant>,
    interest: Interest,
    backoff: report::Backoff,
    metrics: Arc<Metrics>,
    /// The cluster part of grant identities.
    cluster: String,
    /// Checked before every KMS write.
    fence: crate::leader::Fence,
    /// Namespace labels for namespaceSelector checks (one metadata watch).
    namespaces: namespaces::NamespaceLabels,
    /// Which key each KmsKeyPolicy audits.
    policies: policy::PolicyInterest,
    key_policies: Store<KmsKeyPolicy>,
    /// What the last drift pass found on each audited key.
    audits: Mutex<HashMap<KeyRef, policy::AuditRecord>>,
    /// Bumped after each event the grant cache has applied: what was read from the cache
    /// before is still current while it has not moved.
    grant_events: Arc<std::sync::atomic::AtomicU64>,
    /// Objects to reconcile now (the drift detector's queue).
    wake: mpsc::UnboundedSender<ObjectRef<KmsGrant>>,
    /// Set once a drift pass has listed every key in use: before that (a new leader's first
    /// minutes), a grant of a deleted object may sit on a key this process has not listed yet.
    listed_every_key: std::sync::atomic::AtomicBool,
    /// Both caches (KmsGrants, provider configs) hold the cluster's objects: set once, by the
    /// readiness task (the operator's /readyz says the same).
    caches_synced: Arc<std::sync::atomic::AtomicBool>,
    /// Fair shares of KMS work across configs and namespaces.
    fair: fairness::FairGate,
}

impl Context {
    /// Where keyless credentials may come from, as this operator's settings say.
    fn keyless_settings(&self) -> credentials::KeylessSettings {
        credentials::KeylessSettings {
            token_dir: self.settings.web_identity_token_dir.clone(),
            service_account_namespace: self.settings.secret_namespace.clone(),
            kube: self.client.clone(),
        }
    }

    /// Wakes the objects of `namespace` waiting under the tenant object limit
    /// ([`tenancy::namespace_share`]): one of theirs is going, so the next may be served now
    /// rather than at its stalled retry.
    fn wake_over_limit(&self, namespace: &str) {
        if self.settings.tenant_policy.max_objects_per_namespace == 0 {
            return;
        }
        for object in self.grants.state() {
            let waiting = object.metadata.namespace.as_deref() == Some(namespace)
                && object.status.as_ref().is_some_and(|status| {
                    status.conditions.iter().any(|c| {
                        c.type_ == conditions::READY && c.reason == reasons::NAMESPACE_OBJECT_LIMIT
                    })
                });
            if waiting {
                let _ = self.wake.send(ObjectRef::from_obj(object.as_ref()));
            }
        }
    }

    /// Wakes the objects (by UID) whose cleanup waits for a walk that has now been made.
    fn wake_deleting(&self, uids: &[String]) {
        if uids.is_empty() {
            return;
        }
        let uids: std::collections::HashSet<&str> = uids.iter().map(String::as_str).collect();
        for object in self.grants.state() {
            if object
                .metadata
                .uid
                .as_deref()
                .is_some_and(|uid| uids.contains(uid))
            {
                let _ = self.wake.send(ObjectRef::from_obj(object.as_ref()));
            }
        }
    }
}

/// Which objects use which key, so drift on a key wakes only them. One entry per object, so it
/// is kept small: the object's name and namespace only (no resourceVersion or UID), and the key
/// shared by every object on it.
#[derive(Default)]
struct Interest {
    /// By `namespace/name` ([`interest_key`]): 16 bytes a key where an `ObjectRef` takes 96
    /// (1.5 MiB at 10,000 objects, the table's spare capacity included).
    by_object: Mutex<HashMap<Box<str>, Arc<KeyRef>>>,
    /// The one copy of each key in use (pruned by [`Self::keys`]).
    shared: Mutex<HashMap<KeyRef, Arc<KeyRef>>>,
}

impl Interest {
    fn register(&self, object: &ObjectRef<KmsGrant>, key: &KeyRef) {
        // KeyRef's equality looks at the account and the key, not at the config's name.
        let same = |known: &KeyRef| known == key && known.provider == key.provider;
        let object = interest_key(object);
        let mut by_object = self.by_object.lock().expect("interest lock");
        if by_object.get(&object).is_some_and(|known| same(known)) {
            return;
        }
        let key = {
            let mut shared = self.shared.lock().expect("interest lock");
            match shared.get(key) {
                Some(known) if same(known) => Arc::clone(known),
                _ => Arc::clone(
                    shared
                        .entry(key.clone())
                        .insert_entry(Arc::new(key.clone()))
                        .get(),
                ),
            }
        };
        by_object.insert(object, key);
    }

    fn forget(&self, object: &ObjectRef<KmsGrant>) {
        self.by_object
            .lock()
            .expect("interest lock")
            .remove(&interest_key(object));
    }

    /// The key `object` is registered on.
    fn key_of(&self, object: &ObjectRef<KmsGrant>) -> Option<Arc<KeyRef>> {
        self.by_object
            .lock()
            .expect("interest lock")
            .get(&interest_key(object))
            .cloned()
    }

    /// Every registered object.
    fn objects(&self) -> Vec<ObjectRef<KmsGrant>> {
        self.by_object
            .lock()
            .expect("interest lock")
            .keys()
            .map(|object| object_of(object))
            .collect()
    }

    /// The keys in use and how many objects are on each. Counts, not the objects: the drift
    /// pass needs the objects of a key only when it changed ([`Self::objects_on`]), and copying
    /// every object's reference once per period is what memory peaks are made of at scale.
    fn keys(&self) -> BTreeMap<KeyRef, usize> {
        self.shared
            .lock()
            .expect("interest lock")
            .retain(|_, key| Arc::strong_count(key) > 1);
        let mut keys: BTreeMap<KeyRef, usize> = BTreeMap::new();
        for key in self.by_object.lock().expect("interest lock").values() {
            if let Some(count) = keys.get_mut(key.as_ref()) {
                *count += 1;
            } else {
                keys.insert(KeyRef::clone(key), 1);
            }
        }
        keys
    }

    /// The objects on `key` (on its account, whichever config reaches it).
    fn objects_on(&self, key: &KeyRef) -> Vec<ObjectRef<KmsGrant>> {
        self.by_object
            .lock()
            .expect("interest lock")
            .iter()
            .filter(|(_, known)| known.as_ref() == key)
            .map(|(object, _)| object_of(object))
            .collect()
    }
}

/// `namespace/name`, which no other object shares: a namespace has no `/`.
fn interest_key(object: &ObjectRef<KmsGrant>) -> Box<str> {
    format!(
        "{}/{}",
        object.namespace.as_deref().unwrap_or_default(),
        object.name
    )
    .into()
}

/// The object of an [`interest_key`]: its name and namespace (no resourceVersion or UID).
fn object_of(key: &str) -> ObjectRef<KmsGrant> {
    let (namespace, name) = key.split_once('/').unwrap_or(("", key));
    let object = ObjectRef::new(name);
    match namespace {
        "" => object,
        namespace => object.within(namespace),
    }
}

/// Runs both controllers and the drift detector until `shutdown` resolves. No KmsGrant is
/// written (reconciles wait, and the operator is not ready) until `before_writes` is done: the
/// caller's chores that must see the objects as stored (the legacy `spec.name` kept by
/// [`crate::storage_migration`]) run while the caches fill.
pub async fn run(
    client: Client,
    settings: Settings,
    metrics: Arc<Metrics>,
    ready: Arc<std::sync::atomic::AtomicBool>,
    before_writes: impl std::future::Future<Output = ()> + Send + 'static,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) -> anyhow::Result<()> {
    let shutdown = futures::FutureExt::shared(Box::pin(shutdown));
    let reporter = Reporter {
        controller: "kmsgrant-operator".into(),
        instance: settings.instance.clone(),
    };
    let configs: Api<KmsProviderConfig> = Api::all(client.clone());
    let grants: Api<KmsGrant> = match &settings.namespace {
        Some(namespace) => Api::namespaced(client.clone(), namespace),
        None => Api::all(client.clone()),
    };
    let selected = match &settings.label_selector {
        Some(selector) => watcher::Config::default().labels(selector),
        None => watcher::Config::default(),
    };

    let cluster = tokio::select! {
        cluster = cluster_name(&client, &settings.cluster_name) => cluster?,
        () = shutdown.clone() => return Ok(()),
    };
    tracing::info!(cluster = %cluster, "grant identities are k8s/{cluster}/<namespace>/<name>");
    // A config's own status writes (its conditions, the learned rate) do not wake it: every
    // reconcile of a config is a check, a KMS call.
    let provider_controller = config_controller(&configs, &selected);
    let provider_store = provider_controller.store();
    // Tenants' own configs: in the watched namespace only, when the operator has one.
    let tenant_configs: Api<KmsNamespacedProviderConfig> = match &settings.namespace {
        Some(namespace) => Api::namespaced(client.clone(), namespace),
        None => Api::all(client.clone()),
    };
    let tenant_controller = config_controller(&tenant_configs, &selected);
    let tenant_store = tenant_controller.store();
    // The grant cache holds every selected object: without what the controller never reads
    // (managedFields, kubectl's last-applied copy of the object) it costs a fraction.
    let (grant_store, grant_writer) = reflector::store();
    let grant_events = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let applied = Arc::clone(&grant_events);
    // The keys of the objects in sync, as the first list arrives (see `warm`).
    let (first_list, seen_keys) = warm::FirstList::new();
    let mut first_list = Some(first_list);
    let grant_controller = Controller::for_stream(
        reflector(
            grant_writer,
            watcher(grants, selected.clone().page_size(GRANT_LIST_PAGE))
                .default_backoff()
                .modify(slim),
        )
        .inspect(move |event| {
            applied.fetch_add(1, std::sync::atomic::Ordering::Release);
            match event {
                Ok(watcher::Event::InitApply(object)) => {
                    if let Some(first_list) = first_list.as_mut() {
                        first_list.saw(object);
                    }
                }
                Ok(watcher::Event::InitDone) => first_list = None,
                _ => {}
            }
        })
        .applied_objects(),
        grant_store.clone(),
    );
    let policy_controller =
        Controller::new(Api::<KmsKeyPolicy>::all(client.clone()), selected.clone());
    let policy_store = policy_controller.store();
    metrics.read_status_from(grant_store.clone(), provider_store.clone());
    // Objects to reconcile now: on keys whose grants or state changed, in relabelled namespaces.
    let (drift_tx, drift_rx) = mpsc::unbounded_channel::<ObjectRef<KmsGrant>>();
    let ctx = Arc::new(Context {
        recorder: report::Events::new(client.clone(), reporter, metrics.clone()),
        keys: cache::KeyCache::default(),
        providers: provider::ProviderRegistry::new(provider_store.clone(), tenant_store.clone()),
        provider_configs: provider_store.clone(),
        grants: grant_store.clone(),
        interest: Interest::default(),
        backoff: report::Backoff::new(settings.backoff_min, settings.backoff_max),
        metrics,
        namespaces: namespaces::NamespaceLabels::new(
            client.clone(),
            grant_store.clone(),
            drift_tx.clone(),
        ),
        client: client.clone(),
        cluster,
        fence: settings.fence.clone(),
        settings: settings.clone(),
        policies: policy::PolicyInterest::default(),
        key_policies: policy_store.clone(),
        audits: Mutex::default(),
        grant_events,
        wake: drift_tx.clone(),
        listed_every_key: std::sync::atomic::AtomicBool::new(false),
        caches_synced: Arc::clone(&ready),
        // Half of the workers may hold KMS work; the others keep the queue moving.
        fair: fairness::FairGate::new(usize::from(settings.concurrency) / 2),
    });

    // Secrets changing (credentials rotated or fixed) wake the configs that use them.
    let secrets: Api<Secret> = match &settings.secret_namespace {
        Some(namespace) => Api::namespaced(client.clone(), namespace),
        None => Api::all(client.clone()),
    };
    let store_for_secrets = provider_store.clone();
    let provider_controller = provider_controller
        .watches(
            secrets,
            watcher::Config::default(),
            move |secret: Secret| {
                let (name, namespace) = (secret.name_any(), secret.namespace().unwrap_or_default());
                store_for_secrets
                    .state()
                    .into_iter()
                    .filter(move |c| {
                        c.spec
                            .auth
                            .secret_ref
                            .as_ref()
                            .is_some_and(|r| r.name == name && r.namespace == namespace)
                    })
                    .map(|c| ObjectRef::from_obj(c.as_ref()))
                    .collect::<Vec<_>>()
            },
        )
        .with_config(ControllerConfig::default().concurrency(2))
        .graceful_shutdown_on(shutdown.clone())
        .run(
            |config, ctx: Arc<Context>| async move {
                let started = std::time::Instant::now();
                let result = provider::reconcile(config, ctx.clone()).await;
                let (outcome, reason) = match &result {
                    Ok(_) => ("ok", "Reconciled"),
                    Err(err) => ("error", err.reason()),
                };
                ctx.metrics
                    .reconciled("KmsProviderConfig", outcome, reason, started.elapsed());
                result
            },
            provider_error_policy,
            ctx.clone(),
        )
        .for_each(|result| async move {
            if let Err(err) = result {
                tracing::debug!(error = %err, "provider config reconcile failed");
            }
        });

    // Tenant configs: the same checks and status as cluster configs, through their projection.
    let tenant_controller = tenant_controller
        .with_config(ControllerConfig::default().concurrency(2))
        .graceful_shutdown_on(shutdown.clone())
        .run(
            |tenant, ctx: Arc<Context>| async move {
                let started = std::time::Instant::now();
                let config = Arc::new(provider::as_cluster_config(&tenant));
                let result = provider::reconcile(config, ctx.clone()).await;
                let (outcome, reason) = match &result {
                    Ok(_) => ("ok", "Reconciled"),
                    Err(err) => ("error", err.reason()),
                };
                ctx.metrics.reconciled(
                    "KmsNamespacedProviderConfig",
                    outcome,
                    reason,
                    started.elapsed(),
                );
                result
            },
            |tenant: Arc<KmsNamespacedProviderConfig>, err: &ReconcileError, ctx: Arc<Context>| {
                tracing::warn!(provider = %provider::tenant_key(&tenant.namespace().unwrap_or_default(), &tenant.name_any()), reason = err.reason(), error = %err, "tenant provider config reconcile failed");
                Action::requeue(ctx.settings.backoff_min.max(Duration::from_secs(5)))
            },
            ctx.clone(),
        )
        .for_each(|result| async move {
            if let Err(err) = result {
                tracing::debug!(error = %err, "tenant provider config reconcile failed");
            }
        });

    // KmsKeyPolicies: status from the audits the drift detector makes, which wakes them.
    let (audit_tx, audit_rx) = mpsc::unbounded_channel::<ObjectRef<KmsKeyPolicy>>();
    let policy_controller = policy_controller
        // A provider config changing (becoming Ready, say) wakes the policies that name it.
        .watches_stream(
            config_changes(&configs),
            move |config: KmsProviderConfig| {
                let name = config.name_any();
                policy_store
                    .state()
                    .into_iter()
                    .filter(move |p| p.spec.provider_config_ref.name == name)
                    .map(|p| ObjectRef::from_obj(p.as_ref()))
                    .collect::<Vec<_>>()
            },
        )
        .reconcile_on(tokio_stream::wrappers::UnboundedReceiverStream::new(
            audit_rx,
        ))
        .with_config(ControllerConfig::default().concurrency(2))
        .graceful_shutdown_on(shutdown.clone())
        .run(
            policy::reconcile,
            |policy: Arc<KmsKeyPolicy>, err: &ReconcileError, ctx: Arc<Context>| {
                tracing::warn!(policy = %policy.name_any(), reason = err.reason(), error = %err, "key policy reconcile failed");
                Action::requeue(policy::retry_delay(&ctx))
            },
            ctx.clone(),
        )
        .for_each(|result| async move {
            if let Err(err) = result {
                tracing::debug!(error = %err, "key policy reconcile failed");
            }
        });

    let grants_of_tenant = grant_store.clone();
    let grant_controller = grant_controller
        // A provider config changing (becoming Ready, say) wakes the grants that use it.
        .watches_stream(
            config_changes(&configs),
            move |config: KmsProviderConfig| {
                let name = config.name_any();
                grant_store
                    .state()
                    .into_iter()
                    .filter(move |g| provider::key_of(g) == name)
                    .map(|g| ObjectRef::from_obj(g.as_ref()))
                    .collect::<Vec<_>>()
            },
        )
        .watches_stream(
            config_changes(&tenant_configs),
            move |tenant: KmsNamespacedProviderConfig| {
                let key = provider::tenant_key(
                    &tenant.namespace().unwrap_or_default(),
                    &tenant.name_any(),
                );
                grants_of_tenant
                    .state()
                    .into_iter()
                    .filter(move |g| provider::key_of(g) == key)
                    .map(|g| ObjectRef::from_obj(g.as_ref()))
                    .collect::<Vec<_>>()
            },
        )
        .reconcile_on(tokio_stream::wrappers::UnboundedReceiverStream::new(
            drift_rx,
        ))
        .with_config(ControllerConfig::default().concurrency(settings.concurrency))
        .graceful_shutdown_on(shutdown.clone())
        .run(grant::reconcile, grant_error_policy, ctx.clone())
        .for_each(|result| async move {
            match result {
                Ok((object, _)) => tracing::trace!(object = %object, "reconciled"),
                Err(err) => tracing::debug!(error = %err, "grant reconcile failed"),
            }
        });

    let detector = drift_detector(ctx.clone(), drift_tx, audit_tx, shutdown.clone());
    let rate_recorder = learned_rate::recorder(ctx.clone(), shutdown.clone());
    // Ready (and reconciles go on) once both caches hold the cluster's objects and what must
    // come before the first write is done.
    let readiness = {
        let (grants, configs) = (ctx.grants.clone(), ctx.provider_configs.clone());
        let shutdown = shutdown.clone();
        async move {
            tokio::select! {
                _ = async {
                    tokio::join!(grants.wait_until_ready(), configs.wait_until_ready(), before_writes)
                } => {
                    ready.store(true, std::sync::atomic::Ordering::Release);
                    tracing::info!("caches synced");
                }
                () = shutdown => {}
            }
        }
    };
    // Meanwhile, the first look at every key the objects in sync hold grants on.
    let first_look = {
        let (ctx, shutdown) = (ctx.clone(), shutdown.clone());
        async move {
            tokio::select! {
                () = warm::first_look(ctx, seen_keys) => {}
                () = shutdown => {}
            }
        }
    };
    tracing::info!(resync = ?settings.resync, concurrency = settings.concurrency, "controllers started");
    tokio::join!(
        provider_controller,
        tenant_controller,
        grant_controller,
        policy_controller,
        detector,
        rate_recorder,
        readiness,
        first_look
    );
    tracing::info!("controllers stopped");
    Ok(())
}

/// The controller of one kind of provider config, woken by what its check looks at (see
/// [`provider::wakes_its_check`]), not by its own status writes.
fn config_controller<K: provider::ConfigObject>(
    api: &Api<K>,
    selected: &watcher::Config,
) -> Controller<K> {
    let (store, writer) = reflector::store();
    Controller::for_stream(
        reflector(
            writer,
            watcher(api.clone(), selected.clone()).default_backoff(),
        )
        .applied_objects()
        .predicate_filter(provider::wakes_its_check::<K>, PredicateConfig::default()),
        store,
    )
}

/// KmsGrants per page of the grant cache's lists. A page is decoded whole, managedFields and
/// all, before `slim` sees its objects: at the runtime's default of 500 a new leader's first list
/// at 10,000 objects held some megabytes more at its peak than the cache it filled. 100 keeps
/// that small for a few more requests (a hundred for 10,000 objects, while the first look at
/// the keys goes on).
const GRANT_LIST_PAGE: u32 = 100;

/// The changes of provider configs that matter to the grants and policies using them: anything
/// but the learned rate limit the leader records (which would otherwise wake every grant of the
/// config each time the cloud throttles).
fn config_changes<K>(
    api: &Api<K>,
) -> impl futures::Stream<Item = Result<K, watcher::Error>> + Send + 'static
where
    K: provider::ConfigObject,
{
    watcher(api.clone(), watcher::Config::default())
        .default_backoff()
        .applied_objects()
        .predicate_filter(provider::wakes_its_users::<K>, PredicateConfig::default())
}

/// Drops from a cached object what the controller never reads, and holds the message and the
/// transition time its conditions share once (the three usually carry the same; decoded, each
/// has its own copy). Their types and reasons are shared across objects as they are decoded
/// (see [`crate::api::Word`]).
fn slim(grant: &mut KmsGrant) {
    let meta = grant.meta_mut();
    meta.managed_fields = None;
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
    if let Some(status) = grant.status.as_mut()
        && let Some((first, rest)) = status.conditions.split_first_mut()
    {
        for condition in rest {
            if condition.message == first.message {
                condition.message = Arc::clone(&first.message);
            }
            if condition.last_transition_time == first.last_transition_time {
                condition.last_transition_time = Arc::clone(&first.last_transition_time);
            }
        }
    }
}

/// The configured cluster name, else the UID of `kube-system`: two clusters installed with
/// defaults never share identities. A rebuilt cluster gets a new UID, so disaster recovery sets
/// the name explicitly. Reading `kube-system` is retried (the operator stays not Ready): its RBAC
/// may arrive after the pod, and a crash loop would only delay it.
async fn cluster_name(client: &Client, configured: &str) -> anyhow::Result<String> {
    if !configured.is_empty() {
        anyhow::ensure!(
            identity::valid_cluster_name(configured),
            "--cluster-name {configured:?} must be 1-63 letters, digits, '-' or '_'"
        );
        return Ok(configured.to_owned());
    }
    use k8s_openapi::api::core::v1::Namespace;
    let api = Api::<Namespace>::all(client.clone());
    let mut delay = Duration::from_secs(1);
    loop {
        match api.get("kube-system").await {
            Ok(namespace) => {
                let uid = namespace
                    .uid()
                    .ok_or_else(|| anyhow::anyhow!("namespace kube-system has no UID"))?;
                anyhow::ensure!(
                    identity::valid_cluster_name(&uid),
                    "the UID of kube-system ({uid:?}) is not a valid cluster name; set --cluster-name"
                );
                return Ok(uid);
            }
            Err(err) => {
                tracing::warn!(error = %err, retry_in = ?delay, "no --cluster-name given and cannot read namespace kube-system for its UID; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }
    }
}

fn grant_error_policy(object: Arc<KmsGrant>, err: &ReconcileError, ctx: Arc<Context>) -> Action {
    tracing::warn!(object = %ObjectRef::from_obj(object.as_ref()), reason = err.reason(), error = %err, "reconcile failed");
    Action::requeue(ctx.backoff.next(&ObjectRef::from_obj(object.as_ref())))
}

fn provider_error_policy(
    config: Arc<KmsProviderConfig>,
    err: &ReconcileError,
    ctx: Arc<Context>,
) -> Action {
    tracing::warn!(provider = %config.name_any(), reason = err.reason(), error = %err, "provider config reconcile failed");
    Action::requeue(ctx.settings.backoff_min.max(Duration::from_secs(5)))
}

/// Records what a listing of `key` said about grant names (see [`identity::NamesListed`]): in
/// the key cache, which the key's objects and policies consult before anything is adopted or
/// revoked by name, in the `kmsgrant_grant_names_not_returned` gauge, and once per change in
/// the log. True when it changed what was known of the key.
fn names_listed(ctx: &Context, key: &KeyRef, evidence: &identity::NamesListed) -> bool {
    let changed = ctx.keys.names_listed(key, evidence);
    let missing = matches!(evidence, identity::NamesListed::Missing { .. });
    ctx.metrics
        .grant_names_listed(&key.provider, &key.key_id, missing);
    match evidence {
        identity::NamesListed::Missing { grant_id } if changed => tracing::warn!(
            key = %key.key_id,
            grant = %grant_id,
            "list-grants returned a grant this operator recorded by its name without any name: this account does not return grant names, so nothing on the key is adopted or revoked by name until it does (GrantNamesNotReturned); run `kmsgrant-operator live-test` against the account and report it"
        ),
        identity::NamesListed::Returned if changed => {
            tracing::info!(key = %key.key_id, "list-grants returns grant names on the key again")
        }
        _ => {}
    }
    changed
}

/// Objects deleted without our finalizer (Orphan) never reach a last reconcile: drop what we
/// kept about them (their key interest, backoff and condition gauge), or their keys would keep
/// being listed.
fn forget_deleted(ctx: &Context) {
    let gone: Vec<ObjectRef<KmsGrant>> = ctx
        .interest
        .objects()
        .into_iter()
        .filter(|object| ctx.grants.get(object).is_none())
        .collect();
    for object in gone {
        tracing::debug!(object = %object, "forgetting a deleted object");
        ctx.interest.forget(&object);
        ctx.backoff.reset(&object);
        let namespace = object.namespace.clone().unwrap_or_default();
        ctx.metrics
            .object_condition(&format!("{namespace}/{}", object.name), None);
    }
}

/// Wakes the Ready objects whose `status.lastSyncTime` is due for its refresh (older than
/// `sync_time_refresh`): a reconcile that finds nothing to change rewrites it then. Done here,
/// once per resync, instead of a timer per object in the controller's queue (at 10,000 objects,
/// megabytes that only ever fire once an hour). Not Ready objects keep their own retry timers.
fn wake_sync_due(ctx: &Context, wake: &mpsc::UnboundedSender<ObjectRef<KmsGrant>>) {
    let refresh = i64::try_from(ctx.settings.sync_time_refresh().as_secs()).unwrap_or(i64::MAX);
    let now = jiff::Timestamp::now();
    for object in ctx.grants.state() {
        let Some(status) = object.status.as_ref() else {
            continue;
        };
        let ready = status
            .conditions
            .iter()
            .any(|c| c.type_ == conditions::READY && c.status == crate::api::ConditionStatus::True);
        let due = status
            .last_sync_time
            .as_deref()
            .and_then(|t| t.parse::<jiff::Timestamp>().ok())
            .is_none_or(|t| now.duration_since(t).as_secs() >= refresh);
        if ready && due && object.metadata.deletion_timestamp.is_none() {
            let _ = wake.send(ObjectRef::from_obj(object.as_ref()));
        }
    }
}

/// Lists every key in use (and every key a KmsKeyPolicy audits) once per resync, and describes
/// a key in use when its description is due; wakes the objects on keys whose grants or state
/// changed; audits each key from the same list (no further KMS call) for the
/// `unmanaged_grants` gauges and the KmsKeyPolicies, which it wakes.
async fn drift_detector(
    ctx: Arc<Context>,
    wake: mpsc::UnboundedSender<ObjectRef<KmsGrant>>,
    wake_policies: mpsc::UnboundedSender<ObjectRef<KmsKeyPolicy>>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let tick = async {
        // A fixed cadence: exactly one list per key per period (objects' own requeues are jittered).
        let mut interval = tokio::time::interval(ctx.settings.resync);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        interval.tick().await;
        loop {
            interval.tick().await;
            forget_deleted(&ctx);
            wake_sync_due(&ctx, &wake);
            drift_pass(&ctx, &wake, &wake_policies).await;
        }
    };
    tokio::select! {
        () = tick => {}
        () = shutdown => {}
    }
}

/// One pass over every key.
async fn drift_pass(
    ctx: &Context,
    wake: &mpsc::UnboundedSender<ObjectRef<KmsGrant>>,
    wake_policies: &mpsc::UnboundedSender<ObjectRef<KmsKeyPolicy>>,
) {
    // Aliases first: their answers describe the keys they name, which are then not described
    // again.
    keyref::refresh_aliases(ctx, wake).await;
    let mut keys: BTreeMap<KeyRef, usize> = ctx.interest.keys();
    // Policies deleted since (they have no finalizer) are no longer audited.
    for policy in ctx.policies.policies() {
        if ctx.key_policies.get(&policy).is_none() {
            ctx.policies.forget(&policy);
        }
    }
    let mut audited = ctx.policies.keys();
    // Keys only a policy or a provider config's `auditKeyIds` names are listed too: the one
    // cost an audit can add.
    for key in audited.keys() {
        keys.entry(key.clone()).or_default();
    }
    for (name, provider) in ctx.providers.all() {
        let Some(key_ids) = provider
            .spec
            .audit_key_ids
            .as_ref()
            .filter(|k| !k.is_empty())
        else {
            continue;
        };
        if ctx.providers.get(&name).is_none() {
            continue;
        }
        let Ok(account) = provider::account_of(&provider).await else {
            continue;
        };
        for key_id in key_ids {
            keys.entry(KeyRef {
                provider: name.clone(),
                account: account.clone(),
                key_id: key_id.clone(),
            })
            .or_default();
        }
    }
    let mut in_use = std::collections::HashSet::new();
    let mut records = HashMap::new();
    let mut claims = None;
    let mut listed_every_key = true;
    for (key, objects) in keys {
        let Some(provider) = ctx.providers.get(&key.provider) else {
            listed_every_key = false;
            continue;
        };
        in_use.insert((key.provider.clone(), key.key_id.clone()));
        let listed = ctx
            .keys
            .refresh(&provider.client, &key, ctx.settings.page_size)
            .await;
        let grants = match listed {
            Ok((changed, grants)) => {
                // The key's state (enabled, disabled, pending deletion) matters to the objects on
                // it only; it is described when its description is due.
                let state_changed = objects > 0
                    && ctx
                        .keys
                        .key_state_changed(&provider.client, &key, ctx.settings.key_info_max_age())
                        .await
                        .unwrap_or_else(|err| {
                            tracing::debug!(key = %key.key_id, error = %err, "key state check failed");
                            false
                        });
                if changed || state_changed {
                    tracing::debug!(key = %key.key_id, objects, grants = changed, state = state_changed, "key changed");
                    for object in ctx.interest.objects_on(&key) {
                        let _ = wake.send(object);
                    }
                }
                grants
            }
            Err(err) => {
                tracing::debug!(key = %key.key_id, error = %err, "drift check failed");
                let outcome = if err.reason == kmsgrant_kms::ErrorReason::KeyNotFound
                    && plan::answered_by_kms(&err)
                {
                    plan::key_not_found(&key.key_id)
                } else {
                    plan::failure_outcome(&err)
                };
                records.insert(key, Err(outcome));
                listed_every_key = false;
                continue;
            }
        };
        // What the objects claim, read after the list: an object created meanwhile counts.
        let claims = claims_now(ctx, &mut claims);
        // Names are what ownership is read from: a key whose listing drops them holds its
        // objects and policies back (they are woken to say so), and lets them go when it no
        // longer does.
        if let Some(evidence) = claims.names_listed(&grants)
            && names_listed(ctx, &key, &evidence)
        {
            for object in ctx.interest.objects_on(&key) {
                let _ = wake.send(object);
            }
        }
        // An object holding a grant here that its status does not record (a duplicate, or a
        // grant on a key it no longer names) is woken whatever the snapshot saw before: its
        // reconcile looks at this key too and keeps one grant.
        let unrecorded = claims.unrecorded(&grants);
        for object in &unrecorded {
            tracing::info!(key = %key.key_id, object = %object, "a grant named for the object is not the one its status records; waking it to keep one");
            let _ = wake.send(object.clone());
        }
        ctx.keys.found_unrecorded(
            &key,
            unrecorded
                .into_iter()
                .map(|o| (o.namespace.unwrap_or_default(), o.name))
                .collect(),
        );
        match audit::audit(&ctx.client, &grants, claims).await {
            Ok(found) => {
                ctx.metrics.key_audited(
                    &key.provider,
                    &key.key_id,
                    found.unmanaged,
                    found.other_cluster,
                );
                records.insert(key, Ok(found));
            }
            Err(err) => {
                tracing::warn!(key = %key.key_id, error = %err, "cannot audit the key's grants");
            }
        }
    }
    if listed_every_key {
        ctx.listed_every_key
            .store(true, std::sync::atomic::Ordering::Release);
    }
    ctx.metrics.retain_audited_keys(&in_use);
    {
        let mut audits = ctx.audits.lock().expect("audit lock");
        audits.retain(|key, _| audited.contains_key(key));
        for (key, record) in records {
            if audited.contains_key(&key) {
                audits.insert(key, record);
            }
        }
    }
    for policy in audited.drain().flat_map(|(_, policies)| policies) {
        let _ = wake_policies.send(policy);
    }
}

/// What the cached objects claim now. Built from the whole cache, so read once per drift pass
/// rather than once per key: built again only when the cache has applied an event since.
fn claims_now<'a>(
    ctx: &Context,
    claims: &'a mut Option<(u64, audit::Claims)>,
) -> &'a audit::Claims {
    // Read before the cache: an event applied meanwhile shows as a later count next time.
    let seen = ctx.grant_events.load(std::sync::atomic::Ordering::Acquire);
    if claims.as_ref().is_none_or(|(at, _)| *at != seen) {
        *claims = Some((seen, audit::Claims::of(&ctx.cluster, ctx.grants.state())));
    }
    &claims.as_ref().expect("claims built above").1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slim_holds_a_message_and_a_time_the_conditions_share_once_and_words_once_per_process() {
        let mut grant: KmsGrant = serde_json::from_value(serde_json::json!({
            "apiVersion": "kmsgrant.io/v1beta1", "kind": "KmsGrant",
            "metadata": {"name": "app", "namespace": "team-a", "managedFields": [{"manager": "x"}]},
            "spec": {"keyId": "0d0466b4-5fa4-4c6f-9f3c-6b4e5f7a8b9c", "granteePrincipal": "u1", "operations": ["describe-key"]},
            "status": {"conditions": [
                {"type": "Ready", "status": "True", "reason": "GrantReady", "message": "grant g on key k matches the spec", "lastTransitionTime": "2026-01-01T00:00:00Z"},
                {"type": "Reconciling", "status": "False", "reason": "GrantReady", "message": "grant g on key k matches the spec", "lastTransitionTime": "2026-01-01T00:00:00Z"},
                {"type": "Stalled", "status": "False", "reason": "GrantReady", "message": "another", "lastTransitionTime": "2026-01-01T00:00:00Z"}
            ]}
        }))
        .expect("a KmsGrant");
        let before = grant.clone();
        slim(&mut grant);
        assert_eq!(grant.metadata.managed_fields, None);
        // Equal, field for field: the status a reconcile compares with is the one it read.
        assert_eq!(grant.status, before.status);
        let conditions = &grant.status.as_ref().expect("status").conditions;
        assert!(Arc::ptr_eq(&conditions[0].message, &conditions[1].message));
        assert!(!Arc::ptr_eq(&conditions[0].message, &conditions[2].message));
        assert!(Arc::ptr_eq(
            &conditions[0].last_transition_time,
            &conditions[2].last_transition_time
        ));
        // One copy of a reason for every object and condition that gives it.
        let word_ptr = |word: &crate::api::Word| word.as_str().as_ptr();
        assert_eq!(
            word_ptr(&conditions[0].reason),
            word_ptr(&conditions[2].reason)
        );
        assert_eq!(
            word_ptr(&conditions[0].reason),
            word_ptr(&crate::api::Word::new("GrantReady"))
        );
    }

    fn key(key_id: &str) -> KeyRef {
        KeyRef {
            provider: "default".into(),
            account: "https://kms.example 1".into(),
            key_id: key_id.into(),
        }
    }

    #[test]
    fn interest_names_objects_by_namespace_and_name_alone() {
        let interest = Interest::default();
        let mut app = ObjectRef::<KmsGrant>::new("app").within("team-a");
        app.extra.resource_version = Some("7".into());
        app.extra.uid = Some("uid-1".into());
        let other = ObjectRef::<KmsGrant>::new("app").within("team-b");
        interest.register(&app, &key("k1"));
        interest.register(&other, &key("k2"));
        // Found again by name and namespace, whatever resourceVersion or UID a reference carries.
        let bare = ObjectRef::<KmsGrant>::new("app").within("team-a");
        assert_eq!(interest.key_of(&bare).as_deref(), Some(&key("k1")));
        let on_k1 = interest.objects_on(&key("k1"));
        assert_eq!(on_k1, vec![bare.clone()]);
        assert_eq!(on_k1[0].namespace.as_deref(), Some("team-a"));
        assert_eq!(on_k1[0].extra.uid, None);
        assert_eq!(interest.keys().len(), 2);
        interest.forget(&app);
        assert_eq!(interest.key_of(&bare), None);
        assert_eq!(interest.objects(), vec![other]);
        assert_eq!(interest.keys().len(), 1);
    }
}
