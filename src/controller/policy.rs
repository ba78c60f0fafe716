//! KmsKeyPolicy: write what the audit of its key found into its status, and tell of grants that
//! appear. The key itself is listed by the drift detector (once per resync, shared with every
//! KmsGrant on it); nothing here calls KMS.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use serde_json::json;

use super::audit::Audit;
use super::cache::KeyRef;
use super::conditions::{Outcome, conditions, now_rfc3339, reasons};
use super::report::FIELD_MANAGER;
use super::{Context, ReconcileError};
use crate::api::{GrantOwner, KmsKeyPolicy, KmsKeyPolicyStatus, KmsProviderConfig};

/// Individual `UnmanagedGrantFound` events per write; more new grants make one summary event.
const MAX_EVENTS_PER_WRITE: usize = 10;

/// What the last drift pass found on each audited key: the audit, or why the key could not be
/// listed.
pub type AuditRecord = Result<Audit, Outcome>;

/// Which key each KmsKeyPolicy audits, so the drift detector lists it and wakes the policy.
#[derive(Default)]
pub struct PolicyInterest {
    by_policy: Mutex<HashMap<ObjectRef<KmsKeyPolicy>, KeyRef>>,
}

impl PolicyInterest {
    fn register(&self, policy: &ObjectRef<KmsKeyPolicy>, key: &KeyRef) {
        self.by_policy
            .lock()
            .expect("policy lock")
            .insert(policy.clone(), key.clone());
    }

    pub fn forget(&self, policy: &ObjectRef<KmsKeyPolicy>) {
        self.by_policy.lock().expect("policy lock").remove(policy);
    }

    /// The audited keys and their policies.
    pub fn keys(&self) -> HashMap<KeyRef, Vec<ObjectRef<KmsKeyPolicy>>> {
        let mut keys: HashMap<KeyRef, Vec<ObjectRef<KmsKeyPolicy>>> = HashMap::new();
        for (policy, key) in self.by_policy.lock().expect("policy lock").iter() {
            keys.entry(key.clone()).or_default().push(policy.clone());
        }
        keys
    }

    pub fn policies(&self) -> Vec<ObjectRef<KmsKeyPolicy>> {
        self.by_policy
            .lock()
            .expect("policy lock")
            .keys()
            .cloned()
            .collect()
    }
}

pub async fn reconcile(
    policy: Arc<KmsKeyPolicy>,
    ctx: Arc<Context>,
) -> Result<Action, ReconcileError> {
    let started = std::time::Instant::now();
    let result = reconcile_policy(&policy, &ctx).await;
    let (outcome, reason) = match &result {
        Ok(_) => ("ok", "Reconciled"),
        Err(err) => ("error", err.reason()),
    };
    ctx.metrics
        .reconciled("KmsKeyPolicy", outcome, reason, started.elapsed());
    result
}

async fn reconcile_policy(policy: &KmsKeyPolicy, ctx: &Context) -> Result<Action, ReconcileError> {
    let object = ObjectRef::from_obj(policy);
    if policy.meta().deletion_timestamp.is_some() {
        ctx.policies.forget(&object);
        return Ok(Action::await_change());
    }
    let found = match find(policy, ctx, &object).await {
        Ok(found) => found,
        Err(outcome) => Found::Failed(outcome),
    };
    let (status, outcome) = match found {
        Found::Audited { audit, account } => {
            let message = format!(
                "{} grant(s) on key {} that no KmsGrant declares, {} of other clusters",
                audit.unmanaged, policy.spec.key_id, audit.other_cluster
            );
            let status = KmsKeyPolicyStatus {
                unmanaged_grants: Some(audit.unmanaged),
                other_cluster_grants: Some(audit.other_cluster),
                grants: audit.reported,
                account: Some(account),
                ..KmsKeyPolicyStatus::default()
            };
            let outcome = Outcome::Ready {
                reason: if audit.unmanaged == 0 {
                    reasons::NO_UNMANAGED_GRANTS
                } else {
                    reasons::UNMANAGED_GRANTS_FOUND
                },
                message,
            };
            (status, outcome)
        }
        // What was found before stays until the key is listed again, unless it was found for
        // another spec (another key or account).
        Found::Failed(outcome) => {
            let previous = policy.status.clone().unwrap_or_default();
            let status = if previous.observed_generation == policy.meta().generation {
                KmsKeyPolicyStatus {
                    conditions: Vec::new(),
                    observed_generation: None,
                    last_audit_time: None,
                    ..previous
                }
            } else {
                KmsKeyPolicyStatus::default()
            };
            (status, outcome)
        }
    };
    tracing::debug!(policy = %policy.name_any(), reason = outcome.reason(), "key policy audited");
    let newly_found = new_unmanaged(policy, &status);
    write_status(policy, ctx, status, &outcome).await?;
    publish_found(policy, ctx, &newly_found).await;
    Ok(match outcome {
        // The drift detector wakes the policy after each listing.
        Outcome::Ready { .. } => Action::requeue(ctx.settings.resync * 2),
        Outcome::Stalled { .. } => Action::requeue(ctx.settings.stalled_retry),
        Outcome::Progressing { .. } => Action::requeue(ctx.settings.resync),
    })
}

enum Found {
    Audited { audit: Audit, account: String },
    Failed(Outcome),
}

/// The policy's key and the last audit of it; an [`Outcome`] says why there is none.
async fn find(
    policy: &KmsKeyPolicy,
    ctx: &Context,
    object: &ObjectRef<KmsKeyPolicy>,
) -> Result<Found, Outcome> {
    let key = key_of(policy, ctx)
        .await
        .inspect_err(|_| ctx.policies.forget(object))?;
    ctx.policies.register(object, &key);
    let account = key.account.clone();
    let recorded = ctx.audits.lock().expect("audit lock").get(&key).cloned();
    let audit = match recorded {
        Some(Ok(audit)) => audit,
        Some(Err(outcome)) => return Err(outcome),
        // Not audited yet: the grants the controller holds for the key, if it has listed it.
        None => match ctx.keys.snapshot(&key).await {
            Some(grants) => {
                let claims = super::audit::Claims::of(&ctx.cluster, &ctx.grants.state());
                let audit = super::audit::audit(&ctx.client, &grants, &claims)
                    .await
                    .map_err(|err| Outcome::Progressing {
                        reason: "KubernetesApiError",
                        message: format!(
                            "cannot look up the KmsGrants grants are named for: {err}"
                        ),
                    })?;
                ctx.audits
                    .lock()
                    .expect("audit lock")
                    .insert(key.clone(), Ok(audit.clone()));
                audit
            }
            None => {
                return Err(Outcome::Progressing {
                    reason: reasons::AWAITING_LIST,
                    message: format!(
                        "key {} is listed at the next resync (every {} s)",
                        policy.spec.key_id,
                        ctx.settings.resync.as_secs()
                    ),
                });
            }
        },
    };
    Ok(Found::Audited { audit, account })
}

/// The key a policy audits, on the account its provider config reaches.
async fn key_of(policy: &KmsKeyPolicy, ctx: &Context) -> Result<KeyRef, Outcome> {
    let name = &policy.spec.provider_config_ref.name;
    let exists = ctx
        .provider_configs
        .get(&ObjectRef::<KmsProviderConfig>::new(name))
        .is_some()
        || Api::<KmsProviderConfig>::all(ctx.client.clone())
            .get_metadata_opt(name)
            .await
            // Cannot tell: say so as not Ready rather than as missing.
            .map_err(|err| Outcome::Progressing {
                reason: "KubernetesApiError",
                message: format!("cannot read KmsProviderConfig {name:?}: {err}"),
            })?
            .is_some();
    if !exists {
        return Err(Outcome::Stalled {
            reason: reasons::PROVIDER_CONFIG_NOT_FOUND,
            message: format!(
                "KmsProviderConfig {name:?} does not exist; create it or set spec.providerConfigRef.name"
            ),
        });
    }
    let Some(provider) = ctx.providers.get(name) else {
        return Err(Outcome::Progressing {
            reason: reasons::PROVIDER_CONFIG_NOT_READY,
            message: format!(
                "KmsProviderConfig {name:?} is not Ready; see its conditions (kubectl describe kmspc {name})"
            ),
        });
    };
    let account = super::provider::account_of(&provider)
        .await
        .map_err(|err| super::plan::failure_outcome(&err))?;
    Ok(KeyRef {
        provider: name.clone(),
        account,
        key_id: policy.spec.key_id.clone(),
    })
}

/// Unmanaged grants in `status` that the policy's current status does not list yet.
fn new_unmanaged(policy: &KmsKeyPolicy, status: &KmsKeyPolicyStatus) -> Vec<String> {
    let known: BTreeSet<&str> = policy
        .status
        .iter()
        .flat_map(|s| s.grants.iter())
        .map(|g| g.grant_id.as_str())
        .collect();
    status
        .grants
        .iter()
        .filter(|g| g.owner == GrantOwner::Unmanaged && !known.contains(g.grant_id.as_str()))
        .map(|g| {
            format!(
                "grant {} on key {} (grantee {}, operations {}, name {:?}) is declared by no KmsGrant",
                g.grant_id,
                policy.spec.key_id,
                g.grantee_principal,
                g.operations.join(","),
                g.name.as_deref().unwrap_or_default()
            )
        })
        .collect()
}

/// One Warning per newly found unmanaged grant (a summary beyond [`MAX_EVENTS_PER_WRITE`]).
///
/// Created directly rather than through the shared [`kube::runtime::events::Recorder`], which
/// folds events of one reason on one object into a series that keeps only the first note: each
/// grant found must be told with its own ID.
async fn publish_found(policy: &KmsKeyPolicy, ctx: &Context, found: &[String]) {
    use k8s_openapi::api::events::v1::Event as K8sEvent;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
    let mut notes: Vec<String> = found.iter().take(MAX_EVENTS_PER_WRITE).cloned().collect();
    if found.len() > MAX_EVENTS_PER_WRITE {
        notes.push(format!(
            "{} more unmanaged grants on key {}; see the KmsKeyPolicy's status",
            found.len() - MAX_EVENTS_PER_WRITE,
            policy.spec.key_id
        ));
    }
    // Events about cluster-scoped objects live in `default`, as the Recorder puts them.
    let events: Api<K8sEvent> = Api::namespaced(ctx.client.clone(), "default");
    let controller = "kmsgrant-operator".to_owned();
    for note in notes {
        let now = jiff::Timestamp::now();
        let event = K8sEvent {
            metadata: ObjectMeta {
                name: Some(format!("{}.{:x}", policy.name_any(), now.as_nanosecond())),
                ..ObjectMeta::default()
            },
            event_time: Some(MicroTime(now)),
            type_: Some("Warning".into()),
            reason: Some("UnmanagedGrantFound".into()),
            action: Some("Audit".into()),
            note: Some(super::conditions::truncate_message(&note)),
            regarding: Some(policy.object_ref(&())),
            reporting_controller: Some(controller.clone()),
            reporting_instance: Some(
                std::env::var("HOSTNAME").unwrap_or_else(|_| controller.clone()),
            ),
            ..K8sEvent::default()
        };
        if let Err(err) = events.create(&Default::default(), &event).await {
            tracing::warn!(error = %err, "cannot publish event");
        }
    }
}

/// The whole status by server-side apply, only when it changed (or `lastAuditTime` is old).
async fn write_status(
    policy: &KmsKeyPolicy,
    ctx: &Context,
    mut status: KmsKeyPolicyStatus,
    outcome: &Outcome,
) -> Result<(), ReconcileError> {
    let previous = policy.status.clone().unwrap_or_default();
    let generation = policy.meta().generation;
    let now = now_rfc3339();
    status.observed_generation = generation;
    status.conditions = conditions(outcome, generation, &previous.conditions, &now);
    status.last_audit_time = previous.last_audit_time.clone();
    let recent = previous
        .last_audit_time
        .as_deref()
        .and_then(|t| t.parse::<jiff::Timestamp>().ok())
        .is_some_and(|t| {
            jiff::Timestamp::now().duration_since(t).as_secs()
                < ctx.settings.sync_time_refresh().as_secs() as i64
        });
    if status == previous && (recent || !outcome.is_ready()) {
        return Ok(());
    }
    if outcome.is_ready() {
        status.last_audit_time = Some(now);
    }
    let patch = json!({
        "apiVersion": "kmsgrant.io/v1alpha1",
        "kind": "KmsKeyPolicy",
        "status": status,
    });
    Api::<KmsKeyPolicy>::all(ctx.client.clone())
        .patch_status(
            &policy.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(patch),
        )
        .await
        .map_err(ReconcileError::Kube)?;
    Ok(())
}

/// Requeue delay after a failed policy reconcile.
pub fn retry_delay(ctx: &Context) -> Duration {
    ctx.settings.backoff_min.max(Duration::from_secs(5))
}
