//! KmsKeyPolicy: write what the audit of its key found into its status, tell of grants that
//! appear, and in `Revoke` mode revoke the undeclared ones. The key itself is listed by the drift
//! detector (once per resync, shared with every KmsGrant on it); the only KMS calls made here
//! are the revokes, one per removed grant, through the provider config's client and its rate
//! limit.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use kmsgrant_kms::{ErrorClass, ErrorReason, Grant};
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use serde_json::json;

use super::audit::{Attempt, Audit};
use super::cache::KeyRef;
use super::conditions::{Outcome, conditions, now_rfc3339, reasons};
use super::identity;
use super::report::FIELD_MANAGER;
use super::{Context, ReconcileError};
use crate::api::{
    AuditedGrant, GrantAction, GrantOwner, KmsGrant, KmsKeyPolicy, KmsKeyPolicySpec,
    KmsKeyPolicyStatus, KmsProviderConfig, UndeclaredGrants,
};

/// Individual `UnmanagedGrantFound` events per write; more new grants make one summary event.
const MAX_EVENTS_PER_WRITE: usize = 10;

/// Revokes one policy reconcile makes at most; the rest follow at once in the next (each revoke
/// waits for the provider config's rate limit too).
pub const MAX_REVOKES_PER_PASS: usize = 10;

/// How soon a policy with grants left to revoke is reconciled again.
const REVOKE_REQUEUE: Duration = Duration::from_secs(1);

/// What the operator knows of itself that the revoke decision depends on.
#[derive(Clone, Copy, Debug)]
pub struct Scope<'a> {
    /// The cluster part of this operator's grant identities.
    pub cluster: &'a str,
    /// Whether it watches only some KmsGrants (`--namespace`, `--label-selector`): then another
    /// shard's objects are invisible to it.
    pub sharded: bool,
}

/// What a policy does with one undeclared grant; pure. `attempt` is what became of a revoke
/// since the key was last listed.
pub fn grant_action(
    spec: &KmsKeyPolicySpec,
    grant: &AuditedGrant,
    scope: Scope<'_>,
    attempt: Option<Attempt>,
) -> GrantAction {
    let allowed = spec.allowed_grants.as_ref().is_some_and(|allowed| {
        allowed.grantees.contains(&grant.grantee_principal)
            || allowed
                .grant_ids
                .iter()
                .any(|id| id.eq_ignore_ascii_case(&grant.grant_id))
    });
    if allowed {
        return GrantAction::Allowed;
    }
    if grant.owner == GrantOwner::OtherCluster && !spec.revoke_other_clusters {
        return GrantAction::KeptOtherCluster;
    }
    // A grant named for this cluster's KmsGrants whose object the audit did not find: an
    // orphan, or a rebuilt cluster's grant whose KmsGrant is not applied again yet (GitOps
    // applies in no guaranteed order), or — for a sharded operator, which cannot see every
    // shard's objects nor read a shortened or legacy name back — another shard's. Revoked only
    // on the policy's word, and never by a shard.
    if grant
        .name
        .as_deref()
        .is_some_and(|name| names_this_cluster(name, scope.cluster))
        && (scope.sharded || !spec.revoke_orphans)
    {
        return GrantAction::KeptThisCluster;
    }
    match (attempt, spec.undeclared_grants) {
        (Some(Attempt::Revoked), _) => GrantAction::Revoked,
        (Some(Attempt::Failed), _) => GrantAction::RevokeFailed,
        (Some(Attempt::Unconfirmed), _) => GrantAction::RevokeUnconfirmed,
        (None, UndeclaredGrants::Report) => GrantAction::WouldRevoke,
        (None, UndeclaredGrants::Revoke) => GrantAction::Revoking,
    }
}

/// Whether a grant name carries an identity of this cluster: `k8s/<cluster>/...` or a legacy
/// `kmsgrant-<uid>` (which names no cluster, so may be this one's).
fn names_this_cluster(name: &str, cluster: &str) -> bool {
    identity::cluster_of(name) == Some(cluster) || name.starts_with(identity::LEGACY_PREFIX)
}

/// The audit's grants, each with its action.
pub fn judge_undeclared(
    spec: &KmsKeyPolicySpec,
    audit: &Audit,
    scope: Scope<'_>,
) -> Vec<AuditedGrant> {
    audit
        .reported
        .iter()
        .map(|grant| AuditedGrant {
            action: Some(grant_action(
                spec,
                grant,
                scope,
                audit.attempts.get(&grant.grant_id).copied(),
            )),
            ..grant.clone()
        })
        .collect()
}

/// The grants to revoke now: those `Revoking`, in the report's order, at most `limit`.
pub fn to_revoke(judged: &[AuditedGrant], limit: usize) -> Vec<&AuditedGrant> {
    judged
        .iter()
        .filter(|g| g.action == Some(GrantAction::Revoking))
        .take(limit)
        .collect()
}

/// Whether `Revoke` removes (or, in `Report` mode, would remove) a grant with this action.
fn revocable(action: Option<GrantAction>) -> bool {
    matches!(
        action,
        Some(
            GrantAction::WouldRevoke
                | GrantAction::Revoking
                | GrantAction::RevokeFailed
                | GrantAction::RevokeUnconfirmed
        )
    )
}

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
    let mut revoked = Vec::new();
    let mut next = None;
    let (status, outcome) = match found {
        Found::Audited { audit, key } => {
            let scope = Scope {
                cluster: &ctx.cluster,
                sharded: ctx.settings.namespace.is_some() || ctx.settings.label_selector.is_some(),
            };
            let mode = policy.spec.undeclared_grants;
            if mode == UndeclaredGrants::Revoke {
                ctx.metrics.undeclared_grants_revocable_by(&key.provider);
            }
            // Where names are not returned, every grant looks unnamed: undeclared by a name
            // that was only left out of the answer. Nothing is revoked then.
            let names_missing = ctx.keys.names_missing(&key);
            let (audit, held_back) = match names_missing {
                Some(_) => (audit, None),
                None => act_on_undeclared(policy, ctx, &key, audit, scope, &mut revoked).await,
            };
            let mut grants = judge_undeclared(&policy.spec, &audit, scope);
            if names_missing.is_some() {
                for grant in &mut grants {
                    if grant.action == Some(GrantAction::Revoking) {
                        grant.action = Some(GrantAction::WouldRevoke);
                    }
                }
            }
            let revocable_count = grants.iter().filter(|g| revocable(g.action)).count() as u32;
            if let Some(held) = &held_back {
                // The cache or the lease settles soon; a refused KmsGrant list (RBAC) does not.
                next = Some(if held.soon {
                    retry_delay(ctx)
                } else {
                    ctx.settings.resync
                });
            } else if grants
                .iter()
                .any(|g| g.action == Some(GrantAction::Revoking))
            {
                next = Some(REVOKE_REQUEUE);
            }
            let revoked_before = policy
                .status
                .as_ref()
                .and_then(|s| s.revoked_grants)
                .unwrap_or(0);
            let revoked_total = revoked_before
                + revoked
                    .iter()
                    .filter(|r: &&Revocation| r.attempt == Attempt::Revoked && r.detail.is_none())
                    .count() as u32;
            let mut message = format!(
                "{} grant(s) on key {} that no KmsGrant declares, {} of other clusters; {}",
                audit.unmanaged,
                policy.spec.key_id,
                audit.other_cluster,
                match mode {
                    UndeclaredGrants::Report => format!(
                        "Revoke would remove {revocable_count} (Report mode: nothing is revoked)"
                    ),
                    UndeclaredGrants::Revoke =>
                        format!("{revocable_count} left to revoke, {revoked_total} revoked in all"),
                }
            );
            if let Some(held) = held_back {
                message.push_str(&format!("; waiting: {}", held.why));
            }
            let status = KmsKeyPolicyStatus {
                unmanaged_grants: Some(audit.unmanaged),
                other_cluster_grants: Some(audit.other_cluster),
                revocable_grants: Some(revocable_count),
                revoked_grants: (mode == UndeclaredGrants::Revoke || revoked_total > 0)
                    .then_some(revoked_total),
                grants,
                account: Some(key.account.clone()),
                ..KmsKeyPolicyStatus::default()
            };
            let outcome = match names_missing {
                Some(grant_id) => Outcome::Stalled {
                    reason: reasons::GRANT_NAMES_NOT_RETURNED,
                    message: format!(
                        "{message}; nothing is revoked: list-grants on key {} returned grant {grant_id}, which a KmsGrant records by its name, without any name, so whose grants are whose cannot be read (what Revoke would remove is marked WouldRevoke). Fix: run `kmsgrant-operator live-test` against the account (docs/live-test.md) and send its report to the cloud's support and to kmsgrant-operator",
                        policy.spec.key_id
                    ),
                },
                None => Outcome::Ready {
                    reason: if audit.unmanaged == 0 {
                        reasons::NO_UNMANAGED_GRANTS
                    } else {
                        reasons::UNMANAGED_GRANTS_FOUND
                    },
                    message,
                },
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
    let previous_reason = policy.status.as_ref().and_then(|s| {
        s.conditions
            .iter()
            .find(|c| c.type_ == super::conditions::READY)
            .map(|c| c.reason.clone())
    });
    write_status(policy, ctx, status, &outcome).await?;
    if outcome.reason() == reasons::GRANT_NAMES_NOT_RETURNED
        && previous_reason.as_deref() != Some(reasons::GRANT_NAMES_NOT_RETURNED)
    {
        post_event(
            policy,
            ctx,
            "Warning",
            reasons::GRANT_NAMES_NOT_RETURNED,
            "Audit",
            outcome.message(),
        )
        .await;
    }
    publish_found(policy, ctx, &newly_found).await;
    publish_revoked(policy, ctx, &revoked).await;
    Ok(match (next, outcome) {
        (Some(soon), _) => Action::requeue(soon),
        // The drift detector wakes the policy after each listing.
        (None, Outcome::Ready { .. }) => Action::requeue(ctx.settings.resync * 2),
        (None, Outcome::Stalled { .. }) => Action::requeue(ctx.settings.stalled_retry),
        (None, Outcome::Progressing { .. }) => Action::requeue(ctx.settings.resync),
    })
}

/// One revoke a policy made, for its Event.
struct Revocation {
    grant: AuditedGrant,
    attempt: Attempt,
    /// What KMS said, when it was not a plain success (for `Revoked`: the grant was already
    /// gone, which is success but not counted as revoked by this policy).
    detail: Option<String>,
}

/// Why acting on undeclared grants waits.
struct HeldBack {
    why: String,
    /// Look again shortly (a cache syncing, the lease), else at the next resync (the API server
    /// refused to list KmsGrants: RBAC, which does not fix itself in seconds).
    soon: bool,
}

impl HeldBack {
    fn soon(why: &str) -> Self {
        Self {
            why: why.to_owned(),
            soon: true,
        }
    }
}

/// Acts on the undeclared grants as the policy's mode says. Both modes first confirm, from
/// every KmsGrant there is, that the grants they would revoke are undeclared (a grant found
/// declared leaves the report); `Report` stops there (once per listing), `Revoke` then revokes
/// at most [`MAX_REVOKES_PER_PASS`], each attempt recorded in the key's audit. Returns the audit
/// as it now stands, and why acting is held back when it is.
async fn act_on_undeclared(
    policy: &KmsKeyPolicy,
    ctx: &Context,
    key: &KeyRef,
    audit: Audit,
    scope: Scope<'_>,
    done: &mut Vec<Revocation>,
) -> (Audit, Option<HeldBack>) {
    let mode = policy.spec.undeclared_grants;
    let judged = judge_undeclared(&policy.spec, &audit, scope);
    let candidates: Vec<AuditedGrant> = match mode {
        UndeclaredGrants::Report if audit.checked => Vec::new(),
        UndeclaredGrants::Report => judged
            .into_iter()
            .filter(|g| g.action == Some(GrantAction::WouldRevoke))
            .collect(),
        UndeclaredGrants::Revoke => to_revoke(&judged, MAX_REVOKES_PER_PASS)
            .into_iter()
            .cloned()
            .collect(),
    };
    if candidates.is_empty() {
        return (audit, None);
    }
    // Ownership is judged from every object: never before the cache holds them all.
    if ctx.grants.wait_until_ready().now_or_never().is_none() {
        return (
            audit,
            Some(HeldBack::soon("the KmsGrant cache is not synced yet")),
        );
    }
    let undeclared = match still_undeclared(ctx, key, &candidates, scope).await {
        Ok(undeclared) => undeclared,
        Err(err) => {
            tracing::warn!(policy = %policy.name_any(), error = %err, "cannot check the KmsGrants before revoking");
            return (
                audit,
                Some(HeldBack {
                    why: format!("cannot read the KmsGrants to confirm ownership: {err}"),
                    soon: false,
                }),
            );
        }
    };
    let leader = ctx.fence.check().is_ok();
    let provider = ctx.providers.get(&key.provider);
    // Claimed in the key's audit before the call, so that no other reconcile sends it too; a
    // grant an object took meanwhile (a new import, a new object) leaves the report.
    let claimed: Vec<AuditedGrant> = {
        let mut audits = ctx.audits.lock().expect("audit lock");
        let Some(Ok(record)) = audits.get_mut(key) else {
            return (audit, None);
        };
        let declared: BTreeSet<&str> = candidates
            .iter()
            .map(|g| g.grant_id.as_str())
            .filter(|id| !undeclared.contains(*id))
            .collect();
        record.reported.retain(|g| {
            let keep = !declared.contains(g.grant_id.as_str());
            if !keep {
                let count = match g.owner {
                    GrantOwner::Unmanaged => &mut record.unmanaged,
                    GrantOwner::OtherCluster => &mut record.other_cluster,
                };
                *count = count.saturating_sub(1);
            }
            keep
        });
        if mode == UndeclaredGrants::Report {
            record.checked = true;
            return (record.clone(), None);
        }
        if !leader || provider.is_none() {
            let why = if leader {
                "the provider config is not Ready"
            } else {
                "this replica is not the leader"
            };
            return (record.clone(), Some(HeldBack::soon(why)));
        }
        let mut claimed = Vec::new();
        for grant in candidates {
            if undeclared.contains(&grant.grant_id)
                && record.reported.iter().any(|r| r.grant_id == grant.grant_id)
                && !record.attempts.contains_key(&grant.grant_id)
            {
                record
                    .attempts
                    .insert(grant.grant_id.clone(), Attempt::Unconfirmed);
                claimed.push(grant);
            }
        }
        claimed
    };
    let Some(provider) = provider else {
        return (audit, None);
    };
    let record = |grant_id: &str, attempt: Option<Attempt>| {
        if let Some(Ok(audit)) = ctx.audits.lock().expect("audit lock").get_mut(key) {
            match attempt {
                Some(attempt) => audit.attempts.insert(grant_id.to_owned(), attempt),
                None => audit.attempts.remove(grant_id),
            };
        }
    };
    let mut held_back = None;
    for grant in claimed {
        // A listing since may have shown the account dropping names (see `reconcile_policy`).
        if held_back.is_none() && ctx.keys.names_missing(key).is_some() {
            held_back = Some(HeldBack {
                why: "list-grants on the key returns grants without their names".into(),
                soon: false,
            });
        }
        if held_back.is_some() {
            record(&grant.grant_id, None);
            continue;
        }
        let result = provider
            .client
            .revoke_grant(&key.key_id, &grant.grant_id)
            .await;
        let (attempt, detail) = match result {
            Ok(()) => (Attempt::Revoked, None),
            Err(err) if err.reason == ErrorReason::WriteFenced => {
                record(&grant.grant_id, None);
                held_back = Some(HeldBack::soon("this replica is not the leader"));
                continue;
            }
            // Gone, as KMS itself says: what was wanted.
            Err(err) if err.is_already_gone() && super::plan::answered_by_kms(&err) => {
                (Attempt::Revoked, Some("it was already gone".to_owned()))
            }
            Err(err) if err.class() == ErrorClass::OutcomeUnknown || err.is_already_gone() => {
                ctx.metrics
                    .undeclared_grant_revoke_failed(&key.provider, err.reason.as_str());
                (Attempt::Unconfirmed, Some(err.to_string()))
            }
            Err(err) => {
                ctx.metrics
                    .undeclared_grant_revoke_failed(&key.provider, err.reason.as_str());
                (Attempt::Failed, Some(err.to_string()))
            }
        };
        record(&grant.grant_id, Some(attempt));
        if attempt == Attempt::Revoked {
            ctx.keys.remove(key, &grant.grant_id).await;
        }
        // Counted only when this revoke did it: a grant found already gone was revoked earlier
        // (an answer lost, a list that raced the last revoke) or by someone else.
        if attempt == Attempt::Revoked && detail.is_none() {
            ctx.metrics.undeclared_grant_revoked(&key.provider);
        }
        tracing::info!(policy = %policy.name_any(), key = %key.key_id, grant = %grant.grant_id, outcome = ?attempt, "undeclared grant revoke");
        done.push(Revocation {
            grant,
            attempt,
            detail,
        });
    }
    let now = ctx
        .audits
        .lock()
        .expect("audit lock")
        .get(key)
        .and_then(|r| r.as_ref().ok().cloned())
        .unwrap_or(audit);
    (now, held_back)
}

/// Which of `candidates` no KmsGrant owns right now, judged again just before revoking: the
/// cache as it is now (an object created since the listing counts, by name, import or recorded
/// ID), the API server for objects grants are named for, and, in a sharded operator, every
/// KmsGrant of the cluster (another shard's object may import a grant by ID). API server only,
/// no KMS call.
async fn still_undeclared(
    ctx: &Context,
    key: &KeyRef,
    candidates: &[AuditedGrant],
    scope: Scope<'_>,
) -> Result<BTreeSet<String>, kube::Error> {
    let mut objects = ctx.grants.state();
    if scope.sharded {
        let all = Api::<KmsGrant>::all(ctx.client.clone())
            .list(&ListParams::default())
            .await?;
        objects.extend(all.items.into_iter().map(Arc::new));
    }
    let claims = super::audit::Claims::of(&ctx.cluster, objects);
    let grants: Vec<Grant> = candidates
        .iter()
        .map(|g| Grant {
            key_id: key.key_id.as_str().into(),
            grant_id: g.grant_id.clone(),
            grantee_principal: g.grantee_principal.as_str().into(),
            grantee_principal_type: None,
            operations: g.operations.clone().into(),
            issuing_principal: None,
            created_at_millis: None,
            name: g.name.clone(),
            retiring_principal: None,
        })
        .collect();
    let audit = super::audit::audit(&ctx.client, &grants, &claims).await?;
    Ok(audit.reported.into_iter().map(|g| g.grant_id).collect())
}

enum Found {
    Audited { audit: Audit, key: KeyRef },
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
    let recorded = ctx.audits.lock().expect("audit lock").get(&key).cloned();
    let audit = match recorded {
        Some(Ok(audit)) => audit,
        Some(Err(outcome)) => return Err(outcome),
        // Not audited yet: the grants the controller holds for the key, if it has listed it.
        None => match ctx.keys.snapshot(&key).await {
            Some(grants) => {
                let claims = super::audit::Claims::of(&ctx.cluster, ctx.grants.state());
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
    Ok(Found::Audited { audit, key })
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
async fn publish_found(policy: &KmsKeyPolicy, ctx: &Context, found: &[String]) {
    let mut notes: Vec<String> = found.iter().take(MAX_EVENTS_PER_WRITE).cloned().collect();
    if found.len() > MAX_EVENTS_PER_WRITE {
        notes.push(format!(
            "{} more unmanaged grants on key {}; see the KmsKeyPolicy's status",
            found.len() - MAX_EVENTS_PER_WRITE,
            policy.spec.key_id
        ));
    }
    for note in notes {
        post_event(
            policy,
            ctx,
            "Warning",
            "UnmanagedGrantFound",
            "Audit",
            &note,
        )
        .await;
    }
}

/// One event per revoke: Normal `UndeclaredGrantRevoked`, or Warning
/// `UndeclaredGrantRevokeFailed` with KMS's answer. A pass makes at most
/// [`MAX_REVOKES_PER_PASS`].
async fn publish_revoked(policy: &KmsKeyPolicy, ctx: &Context, revoked: &[Revocation]) {
    for done in revoked {
        let grant = &done.grant;
        let what = format!(
            "grant {} on key {} (grantee {}, operations {}, name {:?})",
            grant.grant_id,
            policy.spec.key_id,
            grant.grantee_principal,
            grant.operations.join(","),
            grant.name.as_deref().unwrap_or_default()
        );
        let detail = done.detail.as_deref().unwrap_or_default();
        let (type_, reason, note) = match done.attempt {
            Attempt::Revoked => (
                "Normal",
                "UndeclaredGrantRevoked",
                format!(
                    "revoked {what}: declared by no KmsGrant and not on spec.allowedGrants{}",
                    if detail.is_empty() {
                        String::new()
                    } else {
                        format!(" ({detail})")
                    }
                ),
            ),
            Attempt::Unconfirmed => (
                "Warning",
                "UndeclaredGrantRevokeFailed",
                format!(
                    "revoking {what}: the answer was lost ({detail}); the next listing of the key shows whether it took effect"
                ),
            ),
            Attempt::Failed => (
                "Warning",
                "UndeclaredGrantRevokeFailed",
                format!("cannot revoke {what}: {detail}; tried again after the next listing"),
            ),
        };
        post_event(policy, ctx, type_, reason, "Revoke", &note).await;
    }
}

/// Posts one event about the policy.
///
/// Created directly rather than through the shared [`kube::runtime::events::Recorder`], which
/// folds events of one reason on one object into a series that keeps only the first note: each
/// grant must be told with its own ID.
async fn post_event(
    policy: &KmsKeyPolicy,
    ctx: &Context,
    type_: &str,
    reason: &str,
    action: &str,
    note: &str,
) {
    use k8s_openapi::api::events::v1::Event as K8sEvent;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
    // Events about cluster-scoped objects live in `default`, as the Recorder puts them.
    let events: Api<K8sEvent> = Api::namespaced(ctx.client.clone(), "default");
    let controller = "kmsgrant-operator".to_owned();
    let now = jiff::Timestamp::now();
    let event = K8sEvent {
        metadata: ObjectMeta {
            name: Some(format!("{}.{:x}", policy.name_any(), now.as_nanosecond())),
            ..ObjectMeta::default()
        },
        event_time: Some(MicroTime(now)),
        type_: Some(type_.into()),
        reason: Some(reason.into()),
        action: Some(action.into()),
        note: Some(super::conditions::truncate_message(note)),
        regarding: Some(policy.object_ref(&())),
        reporting_controller: Some(controller.clone()),
        reporting_instance: Some(
            ctx.settings
                .instance
                .clone()
                .or_else(|| std::env::var("HOSTNAME").ok())
                .unwrap_or(controller),
        ),
        ..K8sEvent::default()
    };
    if let Err(err) = events.create(&Default::default(), &event).await {
        tracing::warn!(error = %err, "cannot publish event");
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
        "apiVersion": "kmsgrant.io/v1beta1",
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::AllowedGrants;

    const ID_A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

    fn spec(mode: UndeclaredGrants, other_clusters: bool) -> KmsKeyPolicySpec {
        KmsKeyPolicySpec {
            provider_config_ref: Default::default(),
            key_id: "bb6a3d22-dc93-47ac-b5bd-88df7ad35f1e".into(),
            undeclared_grants: mode,
            allowed_grants: Some(AllowedGrants {
                grantees: vec!["trusted".into()],
                // Upper case on purpose: KMS answers in lower case.
                grant_ids: vec![ID_A.to_uppercase()],
            }),
            revoke_other_clusters: other_clusters,
            revoke_orphans: false,
        }
    }

    fn grant(id: &str, grantee: &str, name: Option<&str>, owner: GrantOwner) -> AuditedGrant {
        AuditedGrant {
            grant_id: id.into(),
            grantee_principal: grantee.into(),
            operations: vec!["decrypt-datakey".into()],
            created_at: None,
            name: name.map(str::to_owned),
            owner,
            action: None,
        }
    }

    /// Every kind of undeclared grant the audit reports, by a short label.
    fn undeclared() -> Vec<(&'static str, AuditedGrant)> {
        use GrantOwner::*;
        vec![
            (
                "hand-made",
                grant("h1", "everyone", Some("decrypt-for-everyone"), Unmanaged),
            ),
            ("unnamed", grant("h2", "someone", None, Unmanaged)),
            ("allowed grantee", grant("h3", "trusted", None, Unmanaged)),
            ("allowed id", grant(ID_A, "someone", None, Unmanaged)),
            (
                "other cluster",
                grant("o1", "peer", Some("k8s/c2/ns/app"), OtherCluster),
            ),
            (
                "prefix cluster",
                grant("o2", "peer", Some("k8s/c10/ns/app"), OtherCluster),
            ),
            (
                "orphan",
                grant("r1", "app", Some("k8s/c1/ns/gone"), Unmanaged),
            ),
            (
                "shortened",
                grant("r2", "app", Some("k8s/c1/ns/x_h0123"), Unmanaged),
            ),
            (
                "legacy",
                grant("r3", "app", Some("kmsgrant-0d6f"), Unmanaged),
            ),
        ]
    }

    fn actions(spec: &KmsKeyPolicySpec, sharded: bool) -> Vec<(&'static str, GrantAction)> {
        let scope = Scope {
            cluster: "c1",
            sharded,
        };
        undeclared()
            .into_iter()
            .map(|(label, g)| (label, grant_action(spec, &g, scope, None)))
            .collect()
    }

    #[test]
    fn revoke_selects_exactly_the_undeclared_grants_not_allowed_and_of_no_cluster() {
        use GrantAction::*;
        let revoke = spec(UndeclaredGrants::Revoke, false);
        assert_eq!(
            actions(&revoke, false),
            [
                ("hand-made", Revoking),
                ("unnamed", Revoking),
                ("allowed grantee", Allowed),
                ("allowed id", Allowed),
                ("other cluster", KeptOtherCluster),
                ("prefix cluster", KeptOtherCluster),
                // A rebuilt cluster's grants look like this until its KmsGrants are back.
                ("orphan", KeptThisCluster),
                ("shortened", KeptThisCluster),
                ("legacy", KeptThisCluster),
            ]
        );
    }

    #[test]
    fn this_clusters_orphans_go_only_on_the_policys_word_and_never_by_a_shard() {
        use GrantAction::*;
        let orphans = KmsKeyPolicySpec {
            revoke_orphans: true,
            ..spec(UndeclaredGrants::Revoke, false)
        };
        let of = |sharded| {
            actions(&orphans, sharded)
                .into_iter()
                .filter(|(label, _)| ["orphan", "shortened", "legacy"].contains(label))
                .map(|(_, action)| action)
                .collect::<Vec<_>>()
        };
        assert_eq!(of(false), [Revoking, Revoking, Revoking]);
        assert_eq!(
            of(true),
            [KeptThisCluster, KeptThisCluster, KeptThisCluster]
        );
    }

    #[test]
    fn a_sharded_operator_keeps_every_grant_named_for_this_cluster() {
        use GrantAction::*;
        let revoke = spec(UndeclaredGrants::Revoke, true);
        assert_eq!(
            actions(&revoke, true),
            [
                ("hand-made", Revoking),
                ("unnamed", Revoking),
                ("allowed grantee", Allowed),
                ("allowed id", Allowed),
                // Opted in: another cluster's grants go, whether sharded or not.
                ("other cluster", Revoking),
                ("prefix cluster", Revoking),
                ("orphan", KeptThisCluster),
                ("shortened", KeptThisCluster),
                ("legacy", KeptThisCluster),
            ]
        );
    }

    #[test]
    fn report_marks_what_revoke_would_remove_and_selects_nothing() {
        let report = spec(UndeclaredGrants::Report, false);
        let revoke = spec(UndeclaredGrants::Revoke, false);
        for ((label, reported), (_, revoked)) in actions(&report, false)
            .into_iter()
            .zip(actions(&revoke, false))
        {
            let expected = if revoked == GrantAction::Revoking {
                GrantAction::WouldRevoke
            } else {
                revoked
            };
            assert_eq!(reported, expected, "{label}");
        }
        let audit = Audit {
            reported: undeclared().into_iter().map(|(_, g)| g).collect(),
            ..Audit::default()
        };
        let scope = Scope {
            cluster: "c1",
            sharded: false,
        };
        let judged = judge_undeclared(&report, &audit, scope);
        assert!(to_revoke(&judged, MAX_REVOKES_PER_PASS).is_empty());
        assert_eq!(judged.iter().filter(|g| revocable(g.action)).count(), 2);
    }

    #[test]
    fn each_grant_is_tried_once_per_listing_and_a_pass_revokes_a_bounded_number() {
        let revoke = spec(UndeclaredGrants::Revoke, false);
        let scope = Scope {
            cluster: "c1",
            sharded: false,
        };
        let mut audit = Audit {
            reported: (0..15)
                .map(|i| grant(&format!("g{i:02}"), "someone", None, GrantOwner::Unmanaged))
                .collect(),
            ..Audit::default()
        };
        let judged = judge_undeclared(&revoke, &audit, scope);
        let first: Vec<&str> = to_revoke(&judged, MAX_REVOKES_PER_PASS)
            .iter()
            .map(|g| g.grant_id.as_str())
            .collect();
        assert_eq!(first.len(), MAX_REVOKES_PER_PASS);
        assert_eq!(first[0], "g00");
        // Whatever became of an attempt, the grant is not selected again before the next list.
        for (i, id) in first.iter().enumerate() {
            let attempt = [Attempt::Revoked, Attempt::Failed, Attempt::Unconfirmed][i % 3];
            audit.attempts.insert((*id).to_owned(), attempt);
        }
        let judged = judge_undeclared(&revoke, &audit, scope);
        let rest: Vec<&str> = to_revoke(&judged, MAX_REVOKES_PER_PASS)
            .iter()
            .map(|g| g.grant_id.as_str())
            .collect();
        assert_eq!(rest, ["g10", "g11", "g12", "g13", "g14"]);
        let action = |id: &str| judged.iter().find(|g| g.grant_id == id).unwrap().action;
        assert_eq!(action("g00"), Some(GrantAction::Revoked));
        assert_eq!(action("g01"), Some(GrantAction::RevokeFailed));
        assert_eq!(action("g02"), Some(GrantAction::RevokeUnconfirmed));
        // Revoked grants no longer count as revocable; failed and unconfirmed ones still do.
        assert_eq!(judged.iter().filter(|g| revocable(g.action)).count(), 11);
    }
}
