//! Prometheus metrics. Labels are low-cardinality by construction: kinds, results, reasons,
//! operations and outcomes come from fixed sets; no label ever carries an object or key name.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use kmsgrant_kms::{Call, ClientMetrics, ErrorReason};

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
    cache_lookups: Family<CacheLabels, Counter>,
    leader: Gauge,
    /// The condition each object was last seen in, to keep the `objects` gauge exact.
    object_conditions: Mutex<HashMap<String, &'static str>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("kmsgrant");
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
        for condition in ["Ready", "Reconciling", "Stalled"] {
            objects.get_or_create(&ConditionLabels { condition }).set(0);
        }
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
            cache_lookups,
            leader,
            object_conditions: Mutex::new(HashMap::new()),
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
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

    pub fn drift_repaired(&self) {
        self.drift_repairs.inc();
    }

    pub fn cache_lookup(&self, hit: bool) {
        self.cache_lookups
            .get_or_create(&CacheLabels {
                result: if hit { "hit" } else { "miss" },
            })
            .inc();
    }

    pub fn set_leader(&self, leader: bool) {
        self.leader.set(i64::from(leader));
    }
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
