//! `kmsgrant-operator run`: the operator against a cluster.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use crate::controller::{self, Settings};
use crate::process::{kube_client, shutdown_signal};

/// Options of `kmsgrant-operator run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Kubeconfig to use; in a pod the in-cluster config is used when neither this nor KUBECONFIG
    /// is set.
    #[arg(long, env = "KMSGRANT_KUBECONFIG", value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// Kubeconfig context to use (default: the current one).
    #[arg(long, env = "KMSGRANT_CONTEXT")]
    pub context: Option<String>,
    /// How often every key in use is listed to detect drift (e.g. 30s, 5m); a Ready object is
    /// re-checked when something it depends on changes, at the latest after ten intervals.
    #[arg(long, env = "KMSGRANT_RESYNC_INTERVAL", default_value = "5m", value_parser = crate::process::parse_duration)]
    pub resync_interval: Duration,
    /// Reconciles running at once.
    #[arg(long, env = "KMSGRANT_CONCURRENCY", default_value_t = 8)]
    pub concurrency: u16,
    /// First retry delay of a failing object; doubles up to --backoff-max.
    #[arg(long, env = "KMSGRANT_BACKOFF_MIN", default_value = "1s", value_parser = crate::process::parse_duration)]
    pub backoff_min: Duration,
    /// Longest retry delay of a failing object.
    #[arg(long, env = "KMSGRANT_BACKOFF_MAX", default_value = "5m", value_parser = crate::process::parse_duration)]
    pub backoff_max: Duration,
    /// How long a Stalled object waits before it is looked at again (changes wake it earlier).
    #[arg(long, env = "KMSGRANT_STALLED_RETRY", default_value = "5m", value_parser = crate::process::parse_duration)]
    pub stalled_retry: Duration,
    /// Namespace whose Secrets hold provider credentials (the operator's own namespace). A
    /// KmsProviderConfig whose secretRef names another namespace is refused
    /// (SecretNamespaceNotAllowed): the operator never reads Secrets elsewhere.
    #[arg(
        long,
        env = "KMSGRANT_SECRET_NAMESPACE",
        default_value = "kmsgrant-system"
    )]
    pub secret_namespace: String,
    /// Directory a KmsProviderConfig's `webIdentity.tokenFile` must lie in (where the projected
    /// ServiceAccount token is mounted). A config naming a file elsewhere is refused
    /// (TokenFileNotAllowed): a config can never make the operator send another file to IAM.
    #[arg(
        long,
        env = "KMSGRANT_WEB_IDENTITY_TOKEN_DIR",
        default_value = crate::controller::credentials::DEFAULT_TOKEN_DIR
    )]
    pub web_identity_token_dir: std::path::PathBuf,
    /// Hosts a KmsNamespacedProviderConfig's endpoint and iamEndpoint may name (comma-separated
    /// patterns; `*` stands for one or more DNS labels). Default: the public KMS and IAM
    /// endpoints of Open Telekom Cloud and Huawei Cloud.
    #[arg(
        long,
        env = "KMSGRANT_TENANT_ENDPOINT_HOSTS",
        value_delimiter = ',',
        default_value = crate::controller::tenancy::DEFAULT_TENANT_HOSTS
    )]
    pub tenant_endpoint_hosts: Vec<String>,
    /// Networks (CIDRs) tenant endpoints may reach although they are not public: a private KMS
    /// endpoint the platform trusts. Loopback, link-local (the metadata service), private and
    /// cluster ranges are refused otherwise, also when a name resolves to them.
    #[arg(long, env = "KMSGRANT_TENANT_ALLOWED_NETWORKS", value_delimiter = ',')]
    pub tenant_allowed_networks: Vec<String>,
    /// Let tenant endpoints be plain http (local emulators and tests only).
    #[arg(long, env = "KMSGRANT_TENANT_ALLOW_HTTP")]
    pub tenant_allow_http: bool,
    /// The highest rateLimit.requestsPerSecond a tenant config gets: its share of the operator's
    /// KMS calls (0: no cap).
    #[arg(
        long,
        env = "KMSGRANT_TENANT_MAX_REQUESTS_PER_SECOND",
        default_value_t = 50
    )]
    pub tenant_max_requests_per_second: u32,
    /// The most KmsGrants of one namespace that its KmsNamespacedProviderConfigs serve (0: no
    /// limit). Objects holding a grant come first, then the oldest; the others get no grant and
    /// the reason NamespaceObjectLimit. Lowering it revokes nothing.
    #[arg(
        long,
        env = "KMSGRANT_TENANT_MAX_OBJECTS_PER_NAMESPACE",
        default_value_t = 0
    )]
    pub tenant_max_objects_per_namespace: u32,
    /// Share KMS work fairly across provider configs and namespaces: a reconcile over its share
    /// is handed back to the queue so one tenant's burst never holds every worker (`false`:
    /// first come, first served).
    #[arg(long, env = "KMSGRANT_FAIR_SCHEDULING", default_value_t = true, action = clap::ArgAction::Set)]
    pub fair_scheduling: bool,
    /// How often each KmsProviderConfig's credentials are checked with one `user-quotas` call.
    #[arg(long, env = "KMSGRANT_PROVIDER_CHECK_INTERVAL", default_value = "1m", value_parser = crate::process::parse_duration)]
    pub provider_check_interval: Duration,
    /// Failed checks in a row before a verified KmsProviderConfig is reported NotReady (with the
    /// default interval: 2 to 3 minutes of failure). Shorter failures change no status at all.
    #[arg(long, env = "KMSGRANT_PROVIDER_FAILURE_THRESHOLD", default_value_t = 3)]
    pub provider_failure_threshold: u32,
    /// Reconcile KmsGrants in this namespace only (default: every namespace).
    #[arg(long, env = "KMSGRANT_NAMESPACE")]
    pub namespace: Option<String>,
    /// Reconcile only KmsGrants and KmsProviderConfigs matching this label selector (sharding).
    #[arg(long, env = "KMSGRANT_LABEL_SELECTOR")]
    pub label_selector: Option<String>,
    /// Accept plain http:// KMS and IAM endpoints (local emulators only; never in production).
    #[arg(long, env = "KMSGRANT_ALLOW_HTTP_ENDPOINTS")]
    pub allow_http_endpoints: bool,
    /// Address of the admin server (/metrics, /healthz, /readyz).
    #[arg(long, env = "KMSGRANT_ADMIN_ADDRESS", default_value = "0.0.0.0:8080")]
    pub admin_address: std::net::SocketAddr,
    /// Elect a leader through a Lease, so that of several replicas exactly one reconciles.
    #[arg(long, env = "KMSGRANT_LEADER_ELECTION")]
    pub leader_election: bool,
    /// Name of the leader election Lease.
    #[arg(long, env = "KMSGRANT_LEASE_NAME", default_value = "kmsgrant-operator")]
    pub lease_name: String,
    /// Namespace of the Lease (default: --pod-namespace, else kmsgrant-system).
    #[arg(long, env = "KMSGRANT_LEASE_NAMESPACE")]
    pub lease_namespace: Option<String>,
    /// How long a leader's lease lasts without renewal; a standby takes over after it.
    #[arg(long, env = "KMSGRANT_LEASE_DURATION", default_value = "15s", value_parser = crate::process::parse_duration)]
    pub lease_duration: Duration,
    /// The cluster part of every grant's name on the cloud (`k8s/<cluster>/<namespace>/<name>`):
    /// 1-63 letters, digits, `-` or `_`. Default: the UID of the kube-system namespace, unique
    /// per cluster. Set it explicitly so that a rebuilt cluster finds its grants again.
    #[arg(long, env = "KMSGRANT_CLUSTER_NAME", default_value = "")]
    pub cluster_name: String,
    /// Name of this pod (the Downward API's metadata.name): the leader election identity, with the
    /// process ID, and the instance named in events. Default: $HOSTNAME (a pod's hostname is its
    /// name).
    #[arg(long, env = "KMSGRANT_POD_NAME")]
    pub pod_name: Option<String>,
    /// Namespace of this pod (the Downward API's metadata.namespace): where the Lease lives unless
    /// --lease-namespace says otherwise.
    #[arg(long, env = "KMSGRANT_POD_NAMESPACE")]
    pub pod_namespace: Option<String>,
    /// Migrate what the cluster stores to kmsgrant.io/v1beta1 (the leader, once per CRD
    /// generation): rewrite every object and its managedFields, then the CRDs'
    /// status.storedVersions. Needs get and patch on the three CRDs and their status; with
    /// `false`, run `kmsgrant-operator migrate --cluster` instead.
    #[arg(long, env = "KMSGRANT_MIGRATE_STORAGE", default_value_t = true, action = clap::ArgAction::Set)]
    pub migrate_storage: bool,
    /// Log filter, e.g. `info` or `kmsgrant=debug,info`.
    #[arg(long, env = "KMSGRANT_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
    /// Log format: `text` or `json` (one JSON object per line).
    #[arg(long, env = "KMSGRANT_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
    /// Also export one series per KmsGrant and KmsProviderConfig, labelled with its name
    /// (kmsgrant_grant_ready, kmsgrant_provider_config_ready), so alerts can name the failing
    /// object. Off by default: the number of series grows with the number of objects.
    #[arg(long, env = "KMSGRANT_PER_OBJECT_METRICS")]
    pub per_object_metrics: bool,
    /// Send traces to this OTLP/HTTP endpoint (e.g. http://otel-collector:4318/v1/traces): a span
    /// per reconcile with the object and its key, the KMS calls as its children.
    #[cfg(feature = "otel")]
    #[arg(long, env = "KMSGRANT_OTLP_ENDPOINT", value_name = "URL")]
    pub otlp_endpoint: Option<String>,
}

impl RunArgs {
    pub fn run(self) -> ExitCode {
        let RunArgs {
            kubeconfig,
            context,
            resync_interval,
            concurrency,
            backoff_min,
            backoff_max,
            stalled_retry,
            secret_namespace,
            web_identity_token_dir,
            provider_check_interval,
            provider_failure_threshold,
            namespace,
            label_selector,
            allow_http_endpoints,
            admin_address,
            leader_election,
            lease_name,
            lease_namespace,
            lease_duration,
            cluster_name,
            pod_name,
            pod_namespace,
            log_level,
            log_format,
            per_object_metrics,
            migrate_storage,
            tenant_endpoint_hosts,
            tenant_allowed_networks,
            tenant_allow_http,
            tenant_max_requests_per_second,
            tenant_max_objects_per_namespace,
            fair_scheduling,
            #[cfg(feature = "otel")]
            otlp_endpoint,
        } = self;
        #[cfg(feature = "otel")]
        let traces = otlp_endpoint
            .map(|endpoint| crate::telemetry::init_with_otlp(&log_level, &log_format, &endpoint))
            .transpose();
        #[cfg(feature = "otel")]
        let (logging, _traces) = match traces {
            Ok(Some(guard)) => (Ok(()), Some(guard)),
            Ok(None) => (crate::telemetry::init(&log_level, &log_format), None),
            Err(err) => (Err(err), None),
        };
        #[cfg(not(feature = "otel"))]
        let logging = crate::telemetry::init(&log_level, &log_format);
        if let Err(err) = logging {
            eprintln!("error: {err}");
            return ExitCode::from(2);
        }
        let tenant_policy = match crate::controller::tenancy::TenantPolicy::from_flags(
            &tenant_endpoint_hosts,
            &tenant_allowed_networks,
            tenant_allow_http,
            tenant_max_requests_per_second,
            tenant_max_objects_per_namespace,
        ) {
            Ok(policy) => policy,
            Err(err) => {
                eprintln!("error: --tenant-endpoint-hosts / --tenant-allowed-networks: {err}");
                return ExitCode::from(2);
            }
        };
        let pod_name = pod_name
            .or_else(|| std::env::var("HOSTNAME").ok())
            .filter(|name| !name.is_empty());
        let settings = Settings {
            resync: resync_interval,
            backoff_min,
            backoff_max,
            stalled_retry,
            concurrency: concurrency.max(1),
            secret_namespace: Some(secret_namespace),
            allow_http: allow_http_endpoints,
            namespace,
            label_selector,
            cluster_name,
            provider_check_interval,
            provider_failure_threshold: provider_failure_threshold.max(1),
            instance: pod_name.clone(),
            web_identity_token_dir,
            tenant_policy,
            fair_scheduling,
            ..Settings::default()
        };
        let election = leader_election.then(|| Election {
            namespace: lease_namespace
                .or(pod_namespace)
                .filter(|namespace| !namespace.is_empty())
                .unwrap_or_else(|| "kmsgrant-system".into()),
            name: lease_name,
            duration: lease_duration,
            // Unique per process, so a restarted container never mistakes its predecessor's
            // lease for its own.
            identity: format!(
                "{}-{}",
                pod_name.as_deref().unwrap_or("kmsgrant-operator"),
                std::process::id()
            ),
        });
        let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
        let result = runtime.block_on(async move {
            let client = kube_client(kubeconfig, context).await?;
            let metrics = crate::metrics::Metrics::with_per_object_series(per_object_metrics);
            let migrate = migrate_storage.then_some(MIGRATION_CHECK_INTERVAL);
            operate(client, settings, metrics, admin_address, election, migrate).await
        });
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                tracing::error!(error = %format!("{err:#}"), "operator failed");
                eprintln!("error: {err:#}");
                ExitCode::FAILURE
            }
        }
    }
}

/// How often the leader looks whether a CRD changed and storage must be migrated again.
const MIGRATION_CHECK_INTERVAL: Duration = Duration::from_secs(300);

/// The Lease to hold and who holds it.
struct Election {
    namespace: String,
    name: String,
    duration: Duration,
    identity: String,
}

/// Serves the admin endpoints, waits for leadership when asked to, and runs the controllers until
/// SIGTERM/Ctrl-C (in-flight reconciles, and so their KMS calls, finish first) or until leadership
/// is lost (then the process exits with an error and is restarted as a standby).
async fn operate(
    client: kube::Client,
    mut settings: Settings,
    metrics: crate::metrics::Metrics,
    admin_address: std::net::SocketAddr,
    election: Option<Election>,
    migrate_storage: Option<Duration>,
) -> anyhow::Result<()> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    let metrics = Arc::new(metrics);
    let ready = Arc::new(AtomicBool::new(false));
    let (stop_admin, admin_stopped) = tokio::sync::oneshot::channel::<()>();
    crate::admin::serve(admin_address, metrics.clone(), ready.clone(), async {
        let _ = admin_stopped.await;
    })
    .await
    .map_err(|e| anyhow::anyhow!("cannot serve the admin endpoints on {admin_address}: {e}"))?;

    let shutdown = futures::FutureExt::shared(Box::pin(shutdown_signal()));
    let elector = election.map(|e| {
        crate::leader::LeaderElection::new(
            client.clone(),
            &e.namespace,
            &e.name,
            &e.identity,
            e.duration,
        )
    });
    if let Some(elector) = &elector {
        // A standby is ready: it serves metrics and waits to take over.
        ready.store(true, Ordering::Relaxed);
        tokio::select! {
            () = elector.acquire() => {}
            () = shutdown.clone() => {
                let _ = stop_admin.send(());
                return Ok(());
            }
        }
        ready.store(false, Ordering::Relaxed);
    }
    metrics.set_leader(true);
    if let Some(elector) = &elector {
        settings.fence = elector.fence();
    }

    let lost = Arc::new(AtomicBool::new(false));
    // Said once, when the lease is lost (never without leader election).
    let lost_notice = Arc::new(tokio::sync::Notify::new());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let watcher = {
        let (lost, lost_notice, shutdown) = (lost.clone(), lost_notice.clone(), shutdown.clone());
        let holding = async {
            match &elector {
                Some(elector) => elector.hold().await,
                None => std::future::pending().await,
            }
        };
        async move {
            tokio::select! {
                () = shutdown => {}
                () = holding => {
                    lost.store(true, Ordering::Relaxed);
                    lost_notice.notify_one();
                }
            }
            let _ = stop.send(());
        }
    };
    // Before any controller writes at v1beta1 (which drops the removed spec.name): keep it.
    // While the caches fill (its list and theirs overlap), not before the controllers start.
    let legacy_names_kept = {
        let (client, namespace) = (client.clone(), settings.namespace.clone());
        futures::FutureExt::shared(Box::pin(async move {
            keep_legacy_grant_names(&client, namespace.as_deref()).await;
        }))
    };
    // A namespace-scoped operator cannot see every object; `migrate --cluster` does it then.
    // After the legacy names are kept: its rewrites at v1beta1 drop spec.name too.
    let migrate_storage = migrate_storage.filter(|_| settings.namespace.is_none());
    let migration = migrate_storage.map(|interval| {
        let sink: Arc<dyn crate::storage_migration::ProgressSink> = metrics.clone();
        let (client, kept) = (client.clone(), legacy_names_kept.clone());
        tokio::spawn(async move {
            kept.await;
            crate::storage_migration::run_as_leader(client, sink, interval).await;
        })
    });
    let controllers = controller::run(
        client,
        settings,
        metrics.clone(),
        ready.clone(),
        legacy_names_kept,
        async {
            let _ = stopped.await;
        },
    );
    let (result, ()) = tokio::join!(
        async {
            tokio::select! {
                result = controllers => result,
                // Leadership lost: reconciles stuck on an unreachable API server would hold a
                // graceful shutdown forever. The fence already stops their KMS writes; give the
                // others a moment, then exit so a restart comes back as a standby.
                // Woken by the notice, not by polling: every wake of this task polls the
                // controllers' whole future, so a 100 ms poll cost CPU on an idle operator.
                () = async {
                    lost_notice.notified().await;
                    tokio::time::sleep(Duration::from_secs(3)).await;
                } => Ok(()),
            }
        },
        watcher
    );
    if let Some(migration) = migration {
        migration.abort();
    }
    metrics.set_leader(false);
    if lost.load(Ordering::Relaxed) {
        anyhow::bail!("lost the leader lease; exiting so that only one replica reconciles");
    }
    if let Some(elector) = &elector {
        elector.release().await;
    }
    let _ = stop_admin.send(());
    result
}

/// Keeps every stored `spec.name` before the controllers start, retrying while the API server
/// fails. Refused for good (no rights), it says so and lets the controllers start: the operator
/// is not held back by a one-off chore that `kmsgrant-operator migrate --cluster` can do.
async fn keep_legacy_grant_names(client: &kube::Client, namespace: Option<&str>) {
    let mut delay = Duration::from_secs(1);
    loop {
        match crate::storage_migration::preserve_legacy_grant_names(client, namespace, false).await
        {
            Ok(kept) => {
                if !kept.is_empty() {
                    tracing::warn!(
                        objects = kept.len(),
                        "kept removed spec.name values in annotations"
                    );
                }
                return;
            }
            Err(crate::storage_migration::MigrationError::Kube {
                source: kube::Error::Api(status),
                what,
            }) if status.code == 403 => {
                tracing::warn!(%what, message = %status.message,
                    "cannot look for removed spec.name values; run `kmsgrant-operator migrate --cluster`");
                return;
            }
            Err(err) => {
                tracing::warn!(error = %err, "cannot look for removed spec.name values yet; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }
    }
}
