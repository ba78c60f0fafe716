//! Prometheus metrics. Labels are low-cardinality by construction: kinds, results, reasons,
//! operations and outcomes come from fixed sets; no label carries an object name — except the
//! per-object series behind `--per-object-metrics` (off by default), one series per object, read
//! from the objects' status at scrape time. The audit gauges carry a provider config and a key
//! ID: keys are bounded by the account's key quota, not by the number of objects.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

use kmsgrant_kms::{Call, ClientMetrics, ErrorReason};
use kube::runtime::reflector::Store;

use crate::api::{ConditionStatus, KmsGrant, KmsProviderConfig};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReconcileLabels {
    kind: &'static str,
    result: &'static str,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KubeWriteLabels {
    write: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KmsCallLabels {
    operation: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationLabels {
    operation: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RetryLabels {
    operation: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConditionLabels {
    condition: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CacheLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KeyLabels {
    provider: String,
    key: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MigratedLabels {
    kind: String,
    /// `managed_fields` when the object's managedFields were rewritten too, else `storage`.
    rewrite: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StorageKindLabels {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RevokedLabels {
    provider: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ExchangeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RevokeFailureLabels {
    provider: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GrantLabels {
    namespace: String,
    name: String,
    condition: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProviderLabels {
    name: String,
    condition: String,
    reason: String,
}

/// Where the status-derived gauges are read from at scrape time: the controllers' caches.
struct StatusSources {
    grants: Store<KmsGrant>,
    providers: Store<KmsProviderConfig>,
}

/// Every metric of the operator, in one registry.
pub struct Metrics {
    registry: Registry,
    reconciles: Family<ReconcileLabels, Counter>,
    reconcile_duration: Family<KindLabels, Histogram>,
    kms_calls: Family<KmsCallLabels, Counter>,
    kms_duration: Family<OperationLabels, Histogram>,
    kms_retries: Family<RetryLabels, Counter>,
    throttle_wait: Counter<f64, AtomicU64>,
    learned_rate: Gauge<f64, AtomicU64>,
    objects: Family<ConditionLabels, Gauge>,
    drift_repairs: Counter,
    kube_writes: Family<KubeWriteLabels, Counter>,
    cluster_name_conflicts: Counter,
    cache_lookups: Family<CacheLabels, Counter>,
    leader: Gauge,
    /// The condition each object was last seen in, to keep the `objects` gauge exact.
    object_conditions: Mutex<HashMap<String, &'static str>>,
    provider_configs: Family<ConditionLabels, Gauge>,
    unmanaged_grants: Family<KeyLabels, Gauge>,
    other_cluster_grants: Family<KeyLabels, Gauge>,
    grant_names_not_returned: Family<KeyLabels, Gauge>,
    undeclared_revoked: Family<RevokedLabels, Counter>,
    undeclared_revoke_failures: Family<RevokeFailureLabels, Counter>,
    credential_exchanges: Family<ExchangeLabels, Counter>,
    credentials_expiry: Family<RevokedLabels, Gauge<f64, AtomicU64>>,
    credential_refresh_failures: Family<RevokedLabels, Gauge>,
    storage_migrated_objects: Family<MigratedLabels, Counter>,
    fair_deferrals: Counter,
    storage_migration_complete: Family<StorageKindLabels, Gauge>,
    /// The keys the audit gauges have a series for.
    audited_keys: Mutex<std::collections::HashSet<KeyLabels>>,
    /// `Some` with `--per-object-metrics`.
    per_object: Option<PerObject>,
    sources: Mutex<Option<StatusSources>>,
}

/// The opt-in series that name objects.
struct PerObject {
    grants: Family<GrantLabels, Gauge>,
    providers: Family<ProviderLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// The low-cardinality metrics only.
    pub fn new() -> Self {
        Self::with_per_object_series(false)
    }

    /// With `per_object`, also one series per KmsGrant and per KmsProviderConfig, labelled with
    /// its name (`kmsgrant_grant_ready`, `kmsgrant_provider_config_ready`).
    pub fn with_per_object_series(per_object: bool) -> Self {
        let mut registry = Registry::with_prefix("kmsgrant");
        registry.register(
            "build",
            "The operator's version (always 1)",
            Info::new(BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            }),
        );
        let reconciles = Family::<ReconcileLabels, Counter>::default();
        registry.register(
            "reconciles",
            "Reconciles by kind, result and reason",
            reconciles.clone(),
        );
        let reconcile_duration = Family::<KindLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 16))
        });
        registry.register(
            "reconcile_duration_seconds",
            "Time spent in one reconcile",
            reconcile_duration.clone(),
        );
        let kms_calls = Family::<KmsCallLabels, Counter>::default();
        registry.register(
            "kms_calls",
            "KMS and IAM HTTP attempts by operation and outcome",
            kms_calls.clone(),
        );
        let kms_duration = Family::<OperationLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 16))
        });
        registry.register(
            "kms_call_duration_seconds",
            "Latency of one KMS or IAM HTTP attempt",
            kms_duration.clone(),
        );
        let kms_retries = Family::<RetryLabels, Counter>::default();
        registry.register(
            "kms_retries",
            "KMS calls retried by operation and reason",
            kms_retries.clone(),
        );
        let throttle_wait = Counter::<f64, AtomicU64>::default();
        registry.register(
            "kms_throttle_wait_seconds",
            "Time spent waiting for the client-side rate limit (pacing, not errors)",
            throttle_wait.clone(),
        );
        let learned_rate = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "kms_rate_limit_requests_per_second",
            "The request rate the KMS client paces at, learned from throttled answers (of the \
             client that answered last; with one provider config, its rate)",
            learned_rate.clone(),
        );
        let objects = Family::<ConditionLabels, Gauge>::default();
        registry.register(
            "objects",
            "KmsGrants by their current condition (Ready, Reconciling, Stalled)",
            objects.clone(),
        );
        let drift_repairs = Counter::default();
        registry.register(
            "drift_repairs",
            "Grants recreated after vanishing from the cloud",
            drift_repairs.clone(),
        );
        let kube_writes = Family::<KubeWriteLabels, Counter>::default();
        registry.register(
            "grant_kube_writes",
            "Writes to the API server for KmsGrants (write: finalizer, status, event) by outcome \
             (ok, not_found, conflict, error)",
            kube_writes.clone(),
        );
        let cluster_name_conflicts = Counter::default();
        registry.register(
            "cluster_name_conflicts",
            "KmsGrants found sharing their identity with another live cluster of the same cluster name (reason ClusterNameInUse), counted when found",
            cluster_name_conflicts.clone(),
        );
        let cache_lookups = Family::<CacheLabels, Counter>::default();
        registry.register(
            "grant_cache_lookups",
            "Grant snapshot lookups served from the cache (hit) or by listing (miss)",
            cache_lookups.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this process holds the leader lease (or runs without leader election)",
            leader.clone(),
        );
        let provider_configs = Family::<ConditionLabels, Gauge>::default();
        registry.register(
            "provider_configs",
            "KmsProviderConfigs by their current condition (Ready, Reconciling, Stalled)",
            provider_configs.clone(),
        );
        let unmanaged_grants = Family::<KeyLabels, Gauge>::default();
        registry.register(
            "unmanaged_grants",
            "Grants on a key in use that no KmsGrant declares (hand-made, other tools, orphaned), \
             as of the key's last listing",
            unmanaged_grants.clone(),
        );
        let other_cluster_grants = Family::<KeyLabels, Gauge>::default();
        registry.register(
            "other_cluster_grants",
            "Grants on a key in use named for another cluster's KmsGrants, as of the key's last \
             listing",
            other_cluster_grants.clone(),
        );
        let grant_names_not_returned = Family::<KeyLabels, Gauge>::default();
        registry.register(
            "grant_names_not_returned",
            "1 when a key's last listing returned a grant this operator recorded by its name \
             without any name (nothing is adopted or revoked by name there), 0 when names came \
             back",
            grant_names_not_returned.clone(),
        );
        let undeclared_revoked = Family::<RevokedLabels, Counter>::default();
        registry.register(
            "undeclared_grants_revoked",
            "Undeclared grants revoked by KmsKeyPolicies in Revoke mode, by provider config",
            undeclared_revoked.clone(),
        );
        let undeclared_revoke_failures = Family::<RevokeFailureLabels, Counter>::default();
        registry.register(
            "undeclared_grant_revoke_failures",
            "Revokes of undeclared grants that failed or whose answer was lost, by provider config \
             and reason",
            undeclared_revoke_failures.clone(),
        );
        let credential_exchanges = Family::<ExchangeLabels, Counter>::default();
        registry.register(
            "credential_exchanges",
            "Exchanges for new KMS credentials (IAM token, ID-token exchange, agency, temporary \
             keys), by outcome (ok or the failure's reason)",
            credential_exchanges.clone(),
        );
        let credentials_expiry = Family::<RevokedLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "credentials_expiry_timestamp_seconds",
            "When the credentials a provider config's client uses expire (Unix seconds; only for \
             credentials that expire: tokens, web identity, agencies, temporary keys)",
            credentials_expiry.clone(),
        );
        let credential_refresh_failures = Family::<RevokedLabels, Gauge>::default();
        registry.register(
            "credential_refresh_failures",
            "Failed exchanges in a row of a provider config's client since its last good one \
             (0 while refreshing works)",
            credential_refresh_failures.clone(),
        );
        let fair_deferrals = Counter::default();
        registry.register(
            "fair_deferrals",
            "Reconciles with KMS work handed back to the queue because their namespace or provider \
             config was over its fair share (another tenant was waiting)",
            fair_deferrals.clone(),
        );
        let storage_migrated_objects = Family::<MigratedLabels, Counter>::default();
        registry.register(
            "storage_migration_objects",
            "Objects the storage migration rewrote at kmsgrant.io/v1beta1, by kind and rewrite \
             (storage only, or managedFields of v1alpha1 too)",
            storage_migrated_objects.clone(),
        );
        let storage_migration_complete = Family::<StorageKindLabels, Gauge>::default();
        registry.register(
            "storage_migration_complete",
            "1 once every object of the kind is stored at v1beta1 and the CRD's storedVersions is \
             [v1beta1], 0 while the migration runs",
            storage_migration_complete.clone(),
        );
        for condition in ["Ready", "Reconciling", "Stalled"] {
            objects.get_or_create(&ConditionLabels { condition }).set(0);
            provider_configs
                .get_or_create(&ConditionLabels { condition })
                .set(0);
        }
        let per_object = per_object.then(|| {
            let grants = Family::<GrantLabels, Gauge>::default();
            registry.register(
                "grant_ready",
                "1 when the KmsGrant is Ready, else 0; condition and reason say why (per object, opt-in)",
                grants.clone(),
            );
            let providers = Family::<ProviderLabels, Gauge>::default();
            registry.register(
                "provider_config_ready",
                "1 when the KmsProviderConfig is Ready, else 0; condition and reason say why (per object, opt-in)",
                providers.clone(),
            );
            PerObject { grants, providers }
        });
        Self {
            registry,
            reconciles,
            reconcile_duration,
            kms_calls,
            kms_duration,
            kms_retries,
            throttle_wait,
            learned_rate,
            objects,
            drift_repairs,
            kube_writes,
            cluster_name_conflicts,
            cache_lookups,
            leader,
            object_conditions: Mutex::new(HashMap::new()),
            provider_configs,
            unmanaged_grants,
            other_cluster_grants,
            grant_names_not_returned,
            undeclared_revoked,
            undeclared_revoke_failures,
            credential_exchanges,
            credentials_expiry,
            credential_refresh_failures,
            storage_migrated_objects,
            fair_deferrals,
            storage_migration_complete,
            audited_keys: Mutex::new(std::collections::HashSet::new()),
            per_object,
            sources: Mutex::new(None),
        }
    }

    /// What a provider config's client says of its credentials: their expiry (for credentials
    /// that expire) and the failed refreshes in a row. `None` removes the config's series.
    pub fn provider_credentials(
        &self,
        provider: &str,
        status: Option<&kmsgrant_kms::CredentialStatus>,
    ) {
        let labels = RevokedLabels {
            provider: provider.to_owned(),
        };
        match status {
            Some(status) => {
                match status.expires_at {
                    None => {
                        self.credentials_expiry.remove(&labels);
                    }
                    Some(expires_at) => {
                        let seconds = expires_at
                            .duration_since(std::time::UNIX_EPOCH)
                            .unwrap_or_default()
                            .as_secs_f64();
                        self.credentials_expiry.get_or_create(&labels).set(seconds);
                    }
                }
                self.credential_refresh_failures
                    .get_or_create(&labels)
                    .set(i64::from(status.consecutive_failures));
            }
            None => {
                self.credentials_expiry.remove(&labels);
                self.credential_refresh_failures.remove(&labels);
            }
        }
    }

    /// Reads the status-derived gauges from these caches at every scrape.
    pub fn read_status_from(&self, grants: Store<KmsGrant>, providers: Store<KmsProviderConfig>) {
        *self.sources.lock().expect("metrics lock") = Some(StatusSources { grants, providers });
    }

    /// Sets the gauges derived from the objects' status, from scratch: deleted objects vanish.
    fn refresh_from_status(&self, sources: Option<&StatusSources>) {
        let Some(sources) = sources else {
            return;
        };
        let providers = sources.providers.state();
        let mut counts: HashMap<&'static str, i64> = HashMap::new();
        for config in &providers {
            let conditions = config.status.as_ref().map(|s| s.conditions.as_slice());
            if let Some((condition, _)) = current_condition(conditions.unwrap_or_default()) {
                *counts.entry(condition).or_default() += 1;
            }
        }
        for condition in ["Ready", "Reconciling", "Stalled"] {
            self.provider_configs
                .get_or_create(&ConditionLabels { condition })
                .set(counts.get(condition).copied().unwrap_or_default());
        }
        let Some(per_object) = &self.per_object else {
            return;
        };
        per_object.providers.clear();
        for config in &providers {
            let conditions = config.status.as_ref().map(|s| s.conditions.as_slice());
            if let Some((condition, reason)) = current_condition(conditions.unwrap_or_default()) {
                per_object
                    .providers
                    .get_or_create(&ProviderLabels {
                        name: config.metadata.name.clone().unwrap_or_default(),
                        condition: condition.to_owned(),
                        reason: reason.to_owned(),
                    })
                    .set(i64::from(condition == "Ready"));
            }
        }
        per_object.grants.clear();
        for grant in sources.grants.state() {
            let conditions = grant.status.as_ref().map(|s| s.conditions.as_slice());
            if let Some((condition, reason)) = current_condition(conditions.unwrap_or_default()) {
                per_object
                    .grants
                    .get_or_create(&GrantLabels {
                        namespace: grant.metadata.namespace.clone().unwrap_or_default(),
                        name: grant.metadata.name.clone().unwrap_or_default(),
                        condition: condition.to_owned(),
                        reason: reason.to_owned(),
                    })
                    .set(i64::from(condition == "Ready"));
            }
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        // Held while encoding, so that a concurrent scrape never sees the gauges half refreshed.
        let sources = self.sources.lock().expect("metrics lock");
        self.refresh_from_status(sources.as_ref());
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }

    pub fn reconciled(
        &self,
        kind: &'static str,
        result: &'static str,
        reason: &str,
        took: Duration,
    ) {
        self.reconciles
            .get_or_create(&ReconcileLabels {
                kind,
                result,
                reason: reason.to_owned(),
            })
            .inc();
        self.reconcile_duration
            .get_or_create(&KindLabels { kind })
            .observe(took.as_secs_f64());
    }

    /// Records the condition an object is in now (`None` once it is deleted).
    pub fn object_condition(&self, object: &str, condition: Option<&'static str>) {
        let mut conditions = self.object_conditions.lock().expect("metrics lock");
        let previous = match condition {
            Some(condition) => conditions.insert(object.to_owned(), condition),
            None => conditions.remove(object),
        };
        if previous == condition {
            return;
        }
        if let Some(previous) = previous {
            self.objects
                .get_or_create(&ConditionLabels {
                    condition: previous,
                })
                .dec();
        }
        if let Some(condition) = condition {
            self.objects
                .get_or_create(&ConditionLabels { condition })
                .inc();
        }
    }

    /// One write to the API server for a KmsGrant: `write` is `finalizer`, `status` or `event`.
    /// `failed`: the error it met, `None` when it succeeded.
    pub fn grant_kube_write(&self, write: &'static str, failed: Option<&kube::Error>) {
        let outcome = match failed {
            None => "ok",
            Some(kube::Error::Api(status)) if status.is_not_found() => "not_found",
            Some(kube::Error::Api(status)) if status.code == 409 => "conflict",
            Some(_) => "error",
        };
        self.kube_writes
            .get_or_create(&KubeWriteLabels { write, outcome })
            .inc();
    }

    pub fn drift_repaired(&self) {
        self.drift_repairs.inc();
    }

    /// An object was found sharing its identity with another live cluster.
    pub fn cluster_name_conflict(&self) {
        self.cluster_name_conflicts.inc();
    }

    pub fn cache_lookup(&self, hit: bool) {
        self.cache_lookups
            .get_or_create(&CacheLabels {
                result: if hit { "hit" } else { "miss" },
            })
            .inc();
    }

    /// What the audit of one key found.
    pub fn key_audited(&self, provider: &str, key: &str, unmanaged: u32, other_cluster: u32) {
        let labels = KeyLabels {
            provider: provider.to_owned(),
            key: key.to_owned(),
        };
        self.unmanaged_grants
            .get_or_create(&labels)
            .set(i64::from(unmanaged));
        self.other_cluster_grants
            .get_or_create(&labels)
            .set(i64::from(other_cluster));
        self.audited_keys
            .lock()
            .expect("metrics lock")
            .insert(labels);
    }

    /// What a listing of a key said about grant names: missing (1) or returned (0).
    pub fn grant_names_listed(&self, provider: &str, key: &str, missing: bool) {
        let labels = KeyLabels {
            provider: provider.to_owned(),
            key: key.to_owned(),
        };
        self.grant_names_not_returned
            .get_or_create(&labels)
            .set(i64::from(missing));
        self.audited_keys
            .lock()
            .expect("metrics lock")
            .insert(labels);
    }

    /// A KmsKeyPolicy in Revoke mode uses this provider config: its counter exists from 0, so
    /// that `increase()` sees the first revoke.
    pub fn undeclared_grants_revocable_by(&self, provider: &str) {
        self.undeclared_revoked
            .get_or_create(&RevokedLabels {
                provider: provider.to_owned(),
            })
            .inc_by(0);
    }

    /// A KmsKeyPolicy revoked an undeclared grant.
    pub fn undeclared_grant_revoked(&self, provider: &str) {
        self.undeclared_revoked
            .get_or_create(&RevokedLabels {
                provider: provider.to_owned(),
            })
            .inc();
    }

    /// A KmsKeyPolicy's revoke of an undeclared grant failed; `reason` is a KMS error reason.
    pub fn undeclared_grant_revoke_failed(&self, provider: &str, reason: &'static str) {
        self.undeclared_revoke_failures
            .get_or_create(&RevokeFailureLabels {
                provider: provider.to_owned(),
                reason,
            })
            .inc();
    }

    /// Drops the audit series of every key not in `keep` (provider, key): keys no longer in use.
    pub fn retain_audited_keys(&self, keep: &std::collections::HashSet<(String, String)>) {
        let mut audited = self.audited_keys.lock().expect("metrics lock");
        audited.retain(|labels| {
            let kept = keep.contains(&(labels.provider.clone(), labels.key.clone()));
            if !kept {
                self.unmanaged_grants.remove(labels);
                self.other_cluster_grants.remove(labels);
                self.grant_names_not_returned.remove(labels);
            }
            kept
        });
    }

    pub fn fair_deferral(&self) {
        self.fair_deferrals.inc();
    }

    pub fn set_leader(&self, leader: bool) {
        self.leader.set(i64::from(leader));
    }
}

impl crate::storage_migration::ProgressSink for Metrics {
    fn object_rewritten(&self, kind: &str, managed_fields: bool) {
        self.storage_migrated_objects
            .get_or_create(&MigratedLabels {
                kind: kind.to_owned(),
                rewrite: if managed_fields {
                    "managed_fields"
                } else {
                    "storage"
                },
            })
            .inc();
    }

    fn kind_migrated(&self, kind: &str, done: bool) {
        self.storage_migration_complete
            .get_or_create(&StorageKindLabels {
                kind: kind.to_owned(),
            })
            .set(i64::from(done));
    }
}

/// The kstatus condition that is True (Stalled before Reconciling before Ready) and its reason.
fn current_condition(conditions: &[crate::api::Condition]) -> Option<(&'static str, &str)> {
    ["Stalled", "Reconciling", "Ready"]
        .into_iter()
        .find_map(|type_| {
            conditions
                .iter()
                .find(|c| c.type_ == type_ && c.status == ConditionStatus::True)
                .map(|c| (type_, c.reason.as_str()))
        })
}

impl ClientMetrics for Metrics {
    fn attempt_finished(&self, call: Call, outcome: &'static str, latency: Duration) {
        self.kms_calls
            .get_or_create(&KmsCallLabels {
                operation: call.as_str(),
                outcome,
            })
            .inc();
        self.kms_duration
            .get_or_create(&OperationLabels {
                operation: call.as_str(),
            })
            .observe(latency.as_secs_f64());
    }

    fn retried(&self, call: Call, reason: ErrorReason) {
        self.kms_retries
            .get_or_create(&RetryLabels {
                operation: call.as_str(),
                reason: reason.as_str(),
            })
            .inc();
    }

    fn throttle_waited(&self, waited: Duration) {
        self.throttle_wait.inc_by(waited.as_secs_f64());
    }

    fn rate_limit(&self, requests_per_second: f64) {
        self.learned_rate.set(requests_per_second);
    }

    fn credentials_exchanged(&self, outcome: &'static str) {
        self.credential_exchanges
            .get_or_create(&ExchangeLabels { outcome })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_gauge_follows_each_object_through_its_conditions() {
        let metrics = Metrics::new();
        metrics.object_condition("ns/a", Some("Reconciling"));
        metrics.object_condition("ns/a", Some("Ready"));
        metrics.object_condition("ns/b", Some("Stalled"));
        metrics.object_condition("ns/b", Some("Stalled"));
        let text = metrics.encode();
        assert!(
            text.contains("kmsgrant_objects{condition=\"Ready\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("kmsgrant_objects{condition=\"Reconciling\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("kmsgrant_objects{condition=\"Stalled\"} 1"),
            "{text}"
        );
        metrics.object_condition("ns/b", None);
        assert!(
            metrics
                .encode()
                .contains("kmsgrant_objects{condition=\"Stalled\"} 0")
        );
    }

    fn condition(type_: &str, reason: &str) -> serde_json::Value {
        serde_json::json!({"type": type_, "status": "True", "reason": reason, "message": "",
            "lastTransitionTime": "2026-11-30T23:00:00Z"})
    }

    fn grant(namespace: &str, name: &str, conditions: serde_json::Value) -> KmsGrant {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "kmsgrant.io/v1beta1", "kind": "KmsGrant",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"keyId": "bb6a3d22-dc93-47ac-b5bd-88df7ad35f1e",
                "granteePrincipal": "abc", "operations": ["describe-key"]},
            "status": {"conditions": conditions}
        }))
        .unwrap()
    }

    fn provider(name: &str, conditions: serde_json::Value) -> KmsProviderConfig {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "kmsgrant.io/v1beta1", "kind": "KmsProviderConfig",
            "metadata": {"name": name},
            "spec": {"endpoint": "https://kms.example", "region": "eu-de", "projectId": "p",
                "auth": {"type": "AccessKey", "secretRef": {"namespace": "ns", "name": "s"}}},
            "status": {"conditions": conditions}
        }))
        .unwrap()
    }

    /// Caches holding two grants (one Ready, one Stalled) and two provider configs.
    fn caches() -> (
        Store<KmsGrant>,
        kube::runtime::reflector::store::Writer<KmsGrant>,
        Store<KmsProviderConfig>,
    ) {
        use kube::runtime::watcher::Event;
        let (grants, mut grant_writer) = kube::runtime::reflector::store::<KmsGrant>();
        let (providers, mut provider_writer) =
            kube::runtime::reflector::store::<KmsProviderConfig>();
        grant_writer.apply_watcher_event(&Event::Apply(grant(
            "team-a",
            "app",
            serde_json::json!([condition("Ready", "GrantReady")]),
        )));
        grant_writer.apply_watcher_event(&Event::Apply(grant(
            "team-b",
            "broken",
            serde_json::json!([condition("Stalled", "KeyNotFound")]),
        )));
        provider_writer.apply_watcher_event(&Event::Apply(provider(
            "default",
            serde_json::json!([condition("Ready", "CredentialsVerified")]),
        )));
        provider_writer.apply_watcher_event(&Event::Apply(provider(
            "other",
            serde_json::json!([condition("Stalled", "InvalidCredentials")]),
        )));
        (grants, grant_writer, providers)
    }

    #[test]
    fn build_info_carries_the_version() {
        let text = Metrics::new().encode();
        assert!(
            text.contains(&format!(
                "kmsgrant_build_info{{version=\"{}\"}} 1",
                env!("CARGO_PKG_VERSION")
            )),
            "{text}"
        );
    }

    #[test]
    fn by_default_no_series_names_an_object() {
        let metrics = Metrics::new();
        let (grants, _writer, providers) = caches();
        metrics.read_status_from(grants, providers);
        let text = metrics.encode();
        assert!(
            text.contains("kmsgrant_provider_configs{condition=\"Ready\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("kmsgrant_provider_configs{condition=\"Stalled\"} 1"),
            "{text}"
        );
        for name in ["app", "broken", "team-a", "default", "other"] {
            assert!(!text.contains(&format!("\"{name}\"")), "{name} in\n{text}");
        }
        assert!(!text.contains("kmsgrant_grant_ready"), "{text}");
    }

    #[test]
    fn per_object_series_name_each_object_and_follow_its_status() {
        use kube::runtime::watcher::Event;
        let metrics = Metrics::with_per_object_series(true);
        let (grants, mut grant_writer, providers) = caches();
        metrics.read_status_from(grants, providers);
        let text = metrics.encode();
        for series in [
            "kmsgrant_grant_ready{namespace=\"team-a\",name=\"app\",condition=\"Ready\",reason=\"GrantReady\"} 1",
            "kmsgrant_grant_ready{namespace=\"team-b\",name=\"broken\",condition=\"Stalled\",reason=\"KeyNotFound\"} 0",
            "kmsgrant_provider_config_ready{name=\"default\",condition=\"Ready\",reason=\"CredentialsVerified\"} 1",
            "kmsgrant_provider_config_ready{name=\"other\",condition=\"Stalled\",reason=\"InvalidCredentials\"} 0",
        ] {
            assert!(text.contains(series), "{series} missing in\n{text}");
        }
        // The fixed grant changes its series; a deleted one loses it.
        grant_writer.apply_watcher_event(&Event::Apply(grant(
            "team-b",
            "broken",
            serde_json::json!([condition("Ready", "GrantReady")]),
        )));
        grant_writer.apply_watcher_event(&Event::Delete(grant(
            "team-a",
            "app",
            serde_json::json!([]),
        )));
        let text = metrics.encode();
        assert!(
            text.contains("kmsgrant_grant_ready{namespace=\"team-b\",name=\"broken\",condition=\"Ready\",reason=\"GrantReady\"} 1"),
            "{text}"
        );
        assert!(!text.contains("KeyNotFound"), "{text}");
        assert!(!text.contains("name=\"app\""), "{text}");
    }

    #[test]
    fn audit_gauges_have_one_series_per_key_in_use() {
        let metrics = Metrics::new();
        metrics.key_audited("default", "key-1", 2, 1);
        metrics.key_audited("default", "key-2", 0, 0);
        let text = metrics.encode();
        assert!(
            text.contains("kmsgrant_unmanaged_grants{provider=\"default\",key=\"key-1\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("kmsgrant_other_cluster_grants{provider=\"default\",key=\"key-1\"} 1"),
            "{text}"
        );
        metrics.grant_names_listed("default", "key-1", true);
        metrics.grant_names_listed("default", "key-2", false);
        let text = metrics.encode();
        assert!(
            text.contains(
                "kmsgrant_grant_names_not_returned{provider=\"default\",key=\"key-1\"} 1"
            ),
            "{text}"
        );
        metrics.retain_audited_keys(&[("default".to_owned(), "key-2".to_owned())].into());
        let text = metrics.encode();
        assert!(!text.contains("key-1"), "{text}");
        assert!(
            text.contains(
                "kmsgrant_grant_names_not_returned{provider=\"default\",key=\"key-2\"} 0"
            ),
            "{text}"
        );
        assert!(
            text.contains("kmsgrant_unmanaged_grants{provider=\"default\",key=\"key-2\"} 0"),
            "{text}"
        );
    }

    #[test]
    fn exclusive_mode_counts_revokes_per_provider_from_zero() {
        let metrics = Metrics::new();
        metrics.undeclared_grants_revocable_by("default");
        let text = metrics.encode();
        assert!(
            text.contains("kmsgrant_undeclared_grants_revoked_total{provider=\"default\"} 0"),
            "{text}"
        );
        metrics.undeclared_grant_revoked("default");
        metrics.undeclared_grants_revocable_by("default");
        metrics.undeclared_grant_revoke_failed("default", "PermissionDenied");
        let text = metrics.encode();
        assert!(
            text.contains("kmsgrant_undeclared_grants_revoked_total{provider=\"default\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("kmsgrant_undeclared_grant_revoke_failures_total{provider=\"default\",reason=\"PermissionDenied\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn kms_attempts_are_counted_by_operation_and_outcome() {
        let metrics = Metrics::new();
        metrics.attempt_finished(Call::CreateGrant, "ok", Duration::from_millis(3));
        metrics.attempt_finished(Call::CreateGrant, "Throttled", Duration::from_millis(1));
        metrics.retried(Call::CreateGrant, ErrorReason::Throttled);
        let text = metrics.encode();
        assert!(
            text.contains("kmsgrant_kms_calls_total{operation=\"create-grant\",outcome=\"ok\"} 1"),
            "{text}"
        );
        assert!(
            text.contains(
                "kmsgrant_kms_retries_total{operation=\"create-grant\",reason=\"Throttled\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("kmsgrant_kms_call_duration_seconds_count{operation=\"create-grant\"} 2"),
            "{text}"
        );
    }
}
