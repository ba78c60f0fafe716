//! KmsGrant: fetch what is needed, ask [`plan`](super::plan::plan), carry the answer out.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use serde_json::json;

use super::cache::KeyRef;
use super::conditions::{Outcome, conditions, millis_rfc3339, now_rfc3339, reasons};
use super::plan::{DesiredGrant, OwnedGrant, Plan, derived_name, plan};
use super::provider::{Provider, namespace_allowed};
use super::{Context, ReconcileError};
use crate::api::{DeletionPolicy, GrantRef, KmsGrant, KmsGrantStatus, KmsProviderConfig};
use kmsgrant_kms::{ErrorClass, ErrorReason, Grant, KeyState, KmsError};

/// The finalizer that makes deletion wait for the grant to be revoked or retired.
pub const FINALIZER: &str = "kmsgrant.io/grant";

pub async fn reconcile(object: Arc<KmsGrant>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    let started = std::time::Instant::now();
    let result = reconcile_object(&object, &ctx).await;
    let (outcome, reason) = match &result {
        Ok((_, reason)) => ("ok", *reason),
        Err(err) => ("error", err.reason()),
    };
    ctx.metrics
        .reconciled("KmsGrant", outcome, reason, started.elapsed());
    result.map(|(action, _)| action)
}

/// One reconcile; returns what to do next and the reason it ended with (for metrics).
async fn reconcile_object(
    object: &KmsGrant,
    ctx: &Context,
) -> Result<(Action, &'static str), ReconcileError> {
    let Some(uid) = object.uid() else {
        return Ok((Action::await_change(), "NoUid"));
    };
    let object_ref = ObjectRef::from_obj(object);
    if object.meta().deletion_timestamp.is_some() {
        ctx.interest.forget(&object_ref);
        ctx.metrics.object_condition(&object_key(object), None);
        return cleanup(object, &uid, ctx)
            .await
            .map(|action| (action, reasons::DELETING));
    }
    let has_finalizer = object.finalizers().iter().any(|f| f == FINALIZER);
    let wants_finalizer = object.spec.deletion_policy != DeletionPolicy::Orphan
        || object
            .status
            .as_ref()
            .is_some_and(|s| s.superseded_grant.is_some());
    if wants_finalizer && !has_finalizer {
        set_finalizer(object, ctx, true).await?;
    } else if !wants_finalizer && has_finalizer {
        set_finalizer(object, ctx, false).await?;
    }

    let mut work = Work {
        object,
        uid: &uid,
        ctx,
        status: object.status.clone().unwrap_or_default(),
        events: Vec::new(),
    };
    let outcome = work.converge(&object_ref).await;
    let outcome = match outcome {
        Ok(outcome) => outcome,
        Err(Failure::Kms(err)) => kms_failure_outcome(&err),
        Err(Failure::Kube(err)) => return Err(ReconcileError::Kube(err)),
    };
    let requeue = match &outcome {
        Outcome::Ready { .. } => {
            ctx.backoff.reset(&object_ref);
            ctx.settings.jittered_resync()
        }
        Outcome::Stalled { .. } => {
            ctx.backoff.reset(&object_ref);
            ctx.settings.stalled_retry
        }
        Outcome::Progressing { reason, .. } if *reason == reasons::OUTCOME_UNKNOWN => {
            Duration::from_secs(1)
        }
        Outcome::Progressing { .. } => ctx.backoff.next(&object_ref),
    };
    let Work {
        mut status, events, ..
    } = work;
    // Status first (it records what was done on KMS), then what happened, for people.
    write_status(object, ctx, &mut status, &outcome).await?;
    for (type_, reason, note) in events {
        publish(object, ctx, type_, reason, note).await;
    }
    status_transition_event(object, ctx, &outcome).await;
    let condition = match &outcome {
        Outcome::Ready { .. } => super::conditions::READY,
        Outcome::Progressing { .. } => super::conditions::RECONCILING,
        Outcome::Stalled { .. } => super::conditions::STALLED,
    };
    ctx.metrics
        .object_condition(&object_key(object), Some(condition));
    Ok((Action::requeue(requeue), outcome.reason()))
}

fn object_key(object: &KmsGrant) -> String {
    format!(
        "{}/{}",
        object.namespace().unwrap_or_default(),
        object.name_any()
    )
}

enum Failure {
    Kms(KmsError),
    Kube(kube::Error),
}

impl From<KmsError> for Failure {
    fn from(err: KmsError) -> Self {
        Self::Kms(err)
    }
}

impl From<kube::Error> for Failure {
    fn from(err: kube::Error) -> Self {
        Self::Kube(err)
    }
}

struct Work<'a> {
    object: &'a KmsGrant,
    uid: &'a str,
    ctx: &'a Context,
    status: KmsGrantStatus,
    /// Events to publish once status is written.
    events: Vec<(EventType, &'static str, String)>,
}

impl Work<'_> {
    async fn converge(&mut self, object_ref: &ObjectRef<KmsGrant>) -> Result<Outcome, Failure> {
        let spec = &self.object.spec;
        let provider_name = &spec.provider_config_ref.name;
        let provider = match self.provider(provider_name).await? {
            Ok(provider) => provider,
            Err(outcome) => return Ok(outcome),
        };
        if let Some(outcome) = self.guardrails(&provider).await? {
            return Ok(outcome);
        }
        let key = KeyRef {
            provider: provider_name.clone(),
            key_id: spec.key_id.clone(),
        };
        self.ctx.interest.register(object_ref, &key);
        if let Some(outcome) = self.check_key(&provider, &key).await? {
            return Ok(outcome);
        }

        let desired = DesiredGrant::of(self.object, self.uid);
        let max_age = self.ctx.settings.snapshot_max_age();
        let page_size = self.ctx.settings.page_size;
        // Decide and create under the key's write lock, so two objects never take one grant.
        let write_lock = self.ctx.keys.write_lock(&key).await;
        let candidates = self
            .ctx
            .keys
            .grants(
                &provider.client,
                &key,
                max_age,
                page_size,
                &self.ctx.metrics,
            )
            .await?;
        let owned_ref = self.status.grant_id.clone().map(|grant_id| GrantRef {
            key_id: self
                .status
                .key_id
                .clone()
                .unwrap_or_else(|| spec.key_id.clone()),
            grant_id,
        });
        let owned_key_grants = match &owned_ref {
            Some(owned) if owned.key_id != key.key_id => {
                let owned_key = KeyRef {
                    provider: provider_name.clone(),
                    key_id: owned.key_id.clone(),
                };
                match self
                    .ctx
                    .keys
                    .grants(
                        &provider.client,
                        &owned_key,
                        max_age,
                        page_size,
                        &self.ctx.metrics,
                    )
                    .await
                {
                    Ok(grants) => grants,
                    Err(err) if err.reason == ErrorReason::KeyNotFound => Vec::new(),
                    Err(err) => return Err(err.into()),
                }
            }
            _ => Vec::new(),
        };
        let owned = match &owned_ref {
            None => OwnedGrant::None,
            Some(owned) => candidates
                .iter()
                .chain(owned_key_grants.iter())
                .find(|g| g.grant_id == owned.grant_id && g.key_id == owned.key_id)
                .map(OwnedGrant::Present)
                .unwrap_or_else(|| OwnedGrant::Vanished(owned.clone())),
        };
        let owners = self.ctx.owners();
        let uid = self.uid;
        let next = plan(
            &desired,
            owned.clone(),
            self.status.superseded_grant.as_ref(),
            &candidates,
            |grant_id| {
                owners.get(grant_id).is_some_and(|owner| owner != uid)
                    || self
                        .ctx
                        .keys
                        .claimant(grant_id)
                        .is_some_and(|owner| owner != uid)
            },
        );
        tracing::debug!(?next, "planned");
        match next {
            Plan::InSync { grant_id } => {
                let grant = candidates.iter().find(|g| g.grant_id == grant_id).cloned();
                self.record_owned(&desired, &grant_id, grant.as_ref());
                Ok(in_sync(&grant_id, &desired.key_id))
            }
            Plan::RevokeSuperseded(old) => {
                self.revoke_superseded(&provider, provider_name, &old)
                    .await?;
                Ok(Outcome::Progressing {
                    reason: reasons::REPLACING,
                    message: format!(
                        "revoked grant {} that the current grant replaced",
                        old.grant_id
                    ),
                })
            }
            Plan::Adopt {
                grant_id,
                supersede,
            } => {
                self.ctx.keys.claim(&grant_id, self.uid);
                let grant = candidates.iter().find(|g| g.grant_id == grant_id).cloned();
                self.record_owned(&desired, &grant_id, grant.as_ref());
                self.status.superseded_grant = supersede.clone();
                if supersede.is_some() {
                    // A revoke follows: record the new grant first, in case we die during it.
                    self.persist().await?;
                }
                self.event(
                    EventType::Normal,
                    "GrantAdopted",
                    format!(
                        "adopted existing grant {grant_id} on key {}",
                        desired.key_id
                    ),
                );
                if let Some(old) = supersede {
                    drop(write_lock);
                    self.revoke_superseded(&provider, provider_name, &old)
                        .await?;
                }
                Ok(in_sync(&grant_id, &desired.key_id))
            }
            Plan::Create {
                supersede,
                recreate,
            } => {
                let result = provider.client.create_grant(&desired.to_new_grant()).await;
                let grant_id = match result {
                    Ok(grant_id) => grant_id,
                    Err(err) => {
                        if err.class() == ErrorClass::OutcomeUnknown {
                            // The grant may exist: look before creating again (it will be adopted).
                            self.ctx.keys.invalidate(&key).await;
                        }
                        return Err(err.into());
                    }
                };
                self.ctx.keys.claim(&grant_id, self.uid);
                self.ctx
                    .keys
                    .insert(&key, created_grant(&desired, &grant_id))
                    .await;
                drop(write_lock);
                self.record_owned(&desired, &grant_id, None);
                self.status.superseded_grant = supersede.clone();
                // Without a revoke to follow, the status write right after this reconcile
                // records the grant (one patch instead of two); with one, record it first.
                if supersede.is_some() {
                    self.persist().await?;
                }
                let (kind, reason, note) = match (&supersede, recreate) {
                    (_, true) => {
                        self.ctx.metrics.drift_repaired();
                        (
                            EventType::Warning,
                            "GrantRecreated",
                            format!("grant vanished from the cloud; created {grant_id}"),
                        )
                    }
                    (Some(old), false) => (
                        EventType::Normal,
                        "GrantReplaced",
                        format!(
                            "spec changed: created {grant_id}, revoking {}",
                            old.grant_id
                        ),
                    ),
                    (None, false) => (
                        EventType::Normal,
                        "GrantCreated",
                        format!("created grant {grant_id} on key {}", desired.key_id),
                    ),
                };
                self.event(kind, reason, note);
                if let Some(old) = supersede {
                    self.revoke_superseded(&provider, provider_name, &old)
                        .await?;
                }
                Ok(in_sync(&grant_id, &desired.key_id))
            }
        }
    }

    /// The verified provider, or the condition explaining why there is none.
    async fn provider(&self, name: &str) -> Result<Result<Provider, Outcome>, Failure> {
        let exists = self
            .ctx
            .provider_configs
            .get(&ObjectRef::<KmsProviderConfig>::new(name))
            .is_some()
            || Api::<KmsProviderConfig>::all(self.ctx.client.clone())
                .get_opt(name)
                .await?
                .is_some();
        if !exists {
            return Ok(Err(Outcome::Stalled {
                reason: reasons::PROVIDER_CONFIG_NOT_FOUND,
                message: format!(
                    "KmsProviderConfig {name:?} does not exist; create it or set spec.providerConfigRef.name"
                ),
            }));
        }
        Ok(self.ctx.providers.get(name).ok_or_else(|| Outcome::Progressing {
            reason: reasons::PROVIDER_CONFIG_NOT_READY,
            message: format!("KmsProviderConfig {name:?} is not Ready; see its conditions (kubectl describe kmspc {name})"),
        }))
    }

    async fn guardrails(&self, provider: &Provider) -> Result<Option<Outcome>, Failure> {
        let spec = &self.object.spec;
        let config = &spec.provider_config_ref.name;
        if provider.spec.namespace_selector.is_some() {
            let namespace = self.object.namespace().unwrap_or_default();
            let labels = self.ctx.namespaces.labels(&namespace).await?;
            if !namespace_allowed(provider.spec.namespace_selector.as_ref(), &labels) {
                return Ok(Some(Outcome::Stalled {
                    reason: reasons::NAMESPACE_NOT_ALLOWED,
                    message: format!(
                        "namespace {namespace:?} does not match the namespaceSelector of KmsProviderConfig {config:?}; ask the platform team to allow it"
                    ),
                }));
            }
        }
        if let Some(allowed) = &provider.spec.allowed_key_ids
            && !allowed.contains(&spec.key_id)
        {
            {
                return Ok(Some(Outcome::Stalled {
                    reason: reasons::KEY_NOT_ALLOWED,
                    message: format!(
                        "key {} is not in allowedKeyIds of KmsProviderConfig {config:?}",
                        spec.key_id
                    ),
                }));
            }
        }
        if let Some(allowed) = &provider.spec.allowed_operations {
            let refused: Vec<&str> = spec
                .operations
                .iter()
                .filter(|op| !allowed.contains(op))
                .map(|op| op.as_str())
                .collect();
            if !refused.is_empty() {
                return Ok(Some(Outcome::Stalled {
                    reason: reasons::OPERATION_NOT_ALLOWED,
                    message: format!(
                        "operations {refused:?} are not in allowedOperations of KmsProviderConfig {config:?}"
                    ),
                }));
            }
        }
        Ok(None)
    }

    async fn check_key(
        &self,
        provider: &Provider,
        key: &KeyRef,
    ) -> Result<Option<Outcome>, Failure> {
        let info = match self
            .ctx
            .keys
            .key_info(&provider.client, key, self.ctx.settings.key_info_max_age())
            .await
        {
            Ok(info) => info,
            Err(err) if err.reason == ErrorReason::KeyNotFound => {
                return Ok(Some(Outcome::Stalled {
                    reason: reasons::KEY_NOT_FOUND,
                    message: format!(
                        "key {} does not exist in this project; fix spec.keyId",
                        key.key_id
                    ),
                }));
            }
            Err(err) => return Err(err.into()),
        };
        if info.is_default_master_key() {
            return Ok(Some(Outcome::Stalled {
                reason: reasons::DEFAULT_KEY_NOT_GRANTABLE,
                message: format!(
                    "key {} is a Default Master Key ({}), which KMS never grants; use a customer master key",
                    key.key_id, info.key_alias
                ),
            }));
        }
        let waiting = |reason, what: &str| {
            Some(Outcome::Progressing {
                reason,
                message: format!("key {} is {what}; retrying until it is enabled", key.key_id),
            })
        };
        Ok(match info.state {
            KeyState::Enabled => None,
            KeyState::Disabled => waiting(reasons::KEY_DISABLED, "disabled"),
            KeyState::PendingDeletion => {
                waiting(reasons::KEY_PENDING_DELETION, "scheduled for deletion")
            }
            _ => waiting(reasons::KEY_NOT_ENABLED, "not enabled"),
        })
    }

    async fn revoke_superseded(
        &mut self,
        provider: &Provider,
        provider_name: &str,
        old: &GrantRef,
    ) -> Result<(), Failure> {
        let key = KeyRef {
            provider: provider_name.to_owned(),
            key_id: old.key_id.clone(),
        };
        match provider
            .client
            .revoke_grant(&old.key_id, &old.grant_id)
            .await
        {
            Ok(()) => {}
            Err(err) if err.is_already_gone() => {}
            Err(err) => {
                if err.class() == ErrorClass::OutcomeUnknown {
                    self.ctx.keys.invalidate(&key).await;
                }
                return Err(err.into());
            }
        }
        self.ctx.keys.remove(&key, &old.grant_id).await;
        self.ctx.keys.release(&old.grant_id);
        self.status.superseded_grant = None;
        self.persist().await?;
        self.event(
            EventType::Normal,
            "GrantRevoked",
            format!("revoked grant {} (replaced)", old.grant_id),
        );
        Ok(())
    }

    fn record_owned(&mut self, desired: &DesiredGrant, grant_id: &str, grant: Option<&Grant>) {
        let status = &mut self.status;
        if status.grant_id.as_deref() != Some(grant_id) {
            status.issuing_principal = None;
            status.created_at = None;
        }
        status.grant_id = Some(grant_id.to_owned());
        status.key_id = Some(desired.key_id.clone());
        status.grant_name = Some(desired.name.clone());
        if let Some(grant) = grant {
            status.issuing_principal = grant
                .issuing_principal
                .clone()
                .or(status.issuing_principal.take());
            status.created_at = grant
                .created_at_millis
                .and_then(millis_rfc3339)
                .or(status.created_at.take());
        }
    }

    /// Writes the grant fields of status at once (before any other step can crash).
    async fn persist(&self) -> Result<(), Failure> {
        let patch = json!({"status": {
            "grantId": self.status.grant_id,
            "keyId": self.status.key_id,
            "grantName": self.status.grant_name,
            "issuingPrincipal": self.status.issuing_principal,
            "createdAt": self.status.created_at,
            "supersededGrant": self.status.superseded_grant,
        }});
        api(self.object, &self.ctx.client)
            .patch_status(
                &self.object.name_any(),
                &PatchParams::default(),
                &Patch::Merge(patch),
            )
            .await?;
        Ok(())
    }

    fn event(&mut self, type_: EventType, reason: &'static str, note: String) {
        self.events.push((type_, reason, note));
    }
}

fn in_sync(grant_id: &str, key_id: &str) -> Outcome {
    Outcome::Ready {
        reason: reasons::GRANT_READY,
        message: format!("grant {grant_id} on key {key_id} matches the spec"),
    }
}

/// A grant we just created, as list-grants would show it (minus what only the server knows).
fn created_grant(desired: &DesiredGrant, grant_id: &str) -> Grant {
    Grant {
        key_id: desired.key_id.clone(),
        grant_id: grant_id.to_owned(),
        grantee_principal: desired.grantee_principal.clone(),
        grantee_principal_type: Some(desired.grantee_principal_type.as_str().to_owned()),
        operations: desired
            .operations
            .iter()
            .map(|op| op.as_str().to_owned())
            .collect(),
        issuing_principal: None,
        created_at_millis: None,
        name: Some(desired.name.clone()),
        retiring_principal: desired.retiring_principal.clone(),
    }
}

fn kms_failure_outcome(err: &KmsError) -> Outcome {
    let message = format!("{err}");
    match (err.class(), err.reason) {
        (ErrorClass::OutcomeUnknown, _) => Outcome::Progressing {
            reason: reasons::OUTCOME_UNKNOWN,
            message: format!("{message}; checking the key's grants before trying again"),
        },
        (ErrorClass::Retryable, _) => Outcome::Progressing {
            reason: reasons::KMS_UNAVAILABLE,
            message,
        },
        (_, ErrorReason::GrantQuotaExceeded) => Outcome::Stalled {
            reason: reasons::GRANT_QUOTA_EXCEEDED,
            message: format!(
                "{message}; the key holds as many grants as allowed (100): revoke unused grants or use another key"
            ),
        },
        (ErrorClass::RetryLater, reason) => Outcome::Progressing {
            reason: reason.as_str(),
            message,
        },
        (_, reason) => Outcome::Stalled {
            reason: reason.as_str(),
            message,
        },
    }
}

/// Deletion: revoke, retire or leave the grant, then let the object go.
async fn cleanup(object: &KmsGrant, uid: &str, ctx: &Context) -> Result<Action, ReconcileError> {
    if !object.finalizers().iter().any(|f| f == FINALIZER) {
        return Ok(Action::await_change());
    }
    let status = object.status.clone().unwrap_or_default();
    let policy = object.spec.deletion_policy;
    let provider_name = &object.spec.provider_config_ref.name;
    let mut targets: Vec<(GrantRef, DeletionPolicy)> = Vec::new();
    if let Some(old) = &status.superseded_grant {
        targets.push((old.clone(), DeletionPolicy::Revoke));
    }
    let owned = status.grant_id.clone().map(|grant_id| GrantRef {
        key_id: status
            .key_id
            .clone()
            .unwrap_or_else(|| object.spec.key_id.clone()),
        grant_id,
    });
    if let Some(owned) = owned.clone().filter(|_| policy != DeletionPolicy::Orphan) {
        targets.push((owned, policy));
    }
    let provider = ctx.providers.get(provider_name);
    if targets.is_empty() && provider.is_none() {
        // Status names no grant and there is no provider to look with: nothing of ours can be
        // found on KMS, and deletion must not hang on a config that never worked.
        tracing::info!(provider = %provider_name, "no grant recorded and no usable provider; nothing to clean up");
    } else if !targets.is_empty() || (owned.is_none() && policy != DeletionPolicy::Orphan) {
        let Some(provider) = provider else {
            let outcome = Outcome::Progressing {
                reason: reasons::PROVIDER_CONFIG_NOT_READY,
                message: format!(
                    "cannot clean up: KmsProviderConfig {provider_name:?} is missing or not Ready"
                ),
            };
            let mut status = status.clone();
            write_status(object, ctx, &mut status, &outcome).await?;
            return Ok(Action::requeue(
                ctx.backoff.next(&ObjectRef::from_obj(object)),
            ));
        };
        if owned.is_none()
            && object.spec.name.as_deref().is_none_or(str::is_empty)
            && policy != DeletionPolicy::Orphan
        {
            // A create whose status write was lost: our derived name finds the grant.
            let key = KeyRef {
                provider: provider_name.clone(),
                key_id: object.spec.key_id.clone(),
            };
            let name = derived_name(uid);
            match ctx
                .keys
                .grants(
                    &provider.client,
                    &key,
                    Duration::ZERO,
                    ctx.settings.page_size,
                    &ctx.metrics,
                )
                .await
            {
                Ok(grants) => targets.extend(
                    grants
                        .iter()
                        .filter(|g| g.name.as_deref() == Some(name.as_str()))
                        .map(|g| {
                            (
                                GrantRef {
                                    key_id: g.key_id.clone(),
                                    grant_id: g.grant_id.clone(),
                                },
                                policy,
                            )
                        }),
                ),
                Err(err) if err.reason == ErrorReason::KeyNotFound => {}
                Err(err) if err.class() == ErrorClass::Terminal => {
                    // Only a lost status write could have left a grant; a lookup that cannot
                    // work (credentials, permissions) must not block deletion forever.
                    publish(
                        object,
                        ctx,
                        EventType::Warning,
                        "CleanupLookupFailed",
                        format!(
                            "could not check key {} for a grant of this object: {err}",
                            key.key_id
                        ),
                    )
                    .await;
                }
                Err(err) => return cleanup_failed(object, ctx, &err).await,
            }
        }
        for (target, how) in &targets {
            let key = KeyRef {
                provider: provider_name.clone(),
                key_id: target.key_id.clone(),
            };
            let result = match how {
                DeletionPolicy::Retire => {
                    provider
                        .client
                        .retire_grant(&target.key_id, &target.grant_id)
                        .await
                }
                _ => {
                    provider
                        .client
                        .revoke_grant(&target.key_id, &target.grant_id)
                        .await
                }
            };
            let done_now = match result {
                Ok(()) => true,
                Err(err) if err.is_already_gone() => false,
                Err(err) => {
                    if err.class() == ErrorClass::OutcomeUnknown {
                        ctx.keys.invalidate(&key).await;
                    }
                    return cleanup_failed(object, ctx, &err).await;
                }
            };
            ctx.keys.remove(&key, &target.grant_id).await;
            ctx.keys.release(&target.grant_id);
            if done_now {
                let (reason, verb) = if *how == DeletionPolicy::Retire {
                    ("GrantRetired", "retired")
                } else {
                    ("GrantRevoked", "revoked")
                };
                publish(
                    object,
                    ctx,
                    EventType::Normal,
                    reason,
                    format!("{verb} grant {}", target.grant_id),
                )
                .await;
            }
        }
    } else if policy == DeletionPolicy::Orphan
        && let Some(owned) = &owned
    {
        publish(
            object,
            ctx,
            EventType::Normal,
            "GrantOrphaned",
            format!("left grant {} on the cloud", owned.grant_id),
        )
        .await;
    }
    set_finalizer(object, ctx, false).await?;
    ctx.backoff.reset(&ObjectRef::from_obj(object));
    Ok(Action::await_change())
}

async fn cleanup_failed(
    object: &KmsGrant,
    ctx: &Context,
    err: &KmsError,
) -> Result<Action, ReconcileError> {
    let outcome = match kms_failure_outcome(err) {
        Outcome::Stalled { reason, message } => Outcome::Stalled {
            reason,
            message: format!("cannot clean up: {message}"),
        },
        other => other,
    };
    let mut status = object.status.clone().unwrap_or_default();
    publish(
        object,
        ctx,
        EventType::Warning,
        "CleanupFailed",
        outcome.message().to_owned(),
    )
    .await;
    write_status(object, ctx, &mut status, &outcome).await?;
    Ok(Action::requeue(
        if err.class() == ErrorClass::OutcomeUnknown {
            Duration::from_secs(1)
        } else {
            ctx.backoff.next(&ObjectRef::from_obj(object))
        },
    ))
}

fn api(object: &KmsGrant, client: &kube::Client) -> Api<KmsGrant> {
    Api::namespaced(client.clone(), &object.namespace().unwrap_or_default())
}

async fn set_finalizer(
    object: &KmsGrant,
    ctx: &Context,
    present: bool,
) -> Result<(), ReconcileError> {
    let mut finalizers: Vec<String> = object
        .finalizers()
        .iter()
        .filter(|f| *f != FINALIZER)
        .cloned()
        .collect();
    if present {
        finalizers.push(FINALIZER.to_owned());
    }
    // Sending the resourceVersion makes a concurrent change to the list fail (409) instead of
    // being overwritten.
    let patch = json!({"metadata": {"resourceVersion": object.resource_version(), "finalizers": finalizers}});
    api(object, &ctx.client)
        .patch(
            &object.name_any(),
            &PatchParams::default(),
            &Patch::Merge(patch),
        )
        .await
        .map_err(ReconcileError::Kube)?;
    Ok(())
}

/// Writes conditions and the rest of status, unless nothing changed.
async fn write_status(
    object: &KmsGrant,
    ctx: &Context,
    status: &mut KmsGrantStatus,
    outcome: &Outcome,
) -> Result<(), ReconcileError> {
    let previous = object.status.clone().unwrap_or_default();
    let generation = object.meta().generation;
    let now = now_rfc3339();
    status.observed_generation = generation;
    status.conditions = conditions(outcome, generation, &previous.conditions, &now);
    status.last_sync_time = previous.last_sync_time.clone();
    let mut unchanged = status.clone();
    unchanged.last_sync_time = previous.last_sync_time.clone();
    let sync_is_recent = previous
        .last_sync_time
        .as_deref()
        .and_then(|t| t.parse::<jiff::Timestamp>().ok())
        .is_some_and(|t| {
            jiff::Timestamp::now().duration_since(t).as_secs()
                < ctx.settings.sync_time_refresh().as_secs() as i64
        });
    if unchanged == previous && sync_is_recent {
        return Ok(());
    }
    status.last_sync_time = Some(now);
    api(object, &ctx.client)
        .patch_status(
            &object.name_any(),
            &PatchParams::default(),
            &Patch::Merge(json!({"status": status})),
        )
        .await
        .map_err(ReconcileError::Kube)?;
    Ok(())
}

/// A Warning event when the object enters a failing state (once per transition, not per retry).
async fn status_transition_event(object: &KmsGrant, ctx: &Context, outcome: &Outcome) {
    let previous_reason = object
        .status
        .as_ref()
        .and_then(|s| {
            s.conditions
                .iter()
                .find(|c| c.type_ == super::conditions::READY)
        })
        .map(|c| c.reason.clone());
    if outcome.is_ready() || previous_reason.as_deref() == Some(outcome.reason()) {
        return;
    }
    if matches!(outcome, Outcome::Progressing { reason, .. } if *reason == reasons::CREATING || *reason == reasons::REPLACING)
    {
        return;
    }
    publish(
        object,
        ctx,
        EventType::Warning,
        outcome.reason(),
        outcome.message().to_owned(),
    )
    .await;
}

async fn publish(object: &KmsGrant, ctx: &Context, type_: EventType, reason: &str, note: String) {
    let event = Event {
        type_,
        reason: reason.to_owned(),
        note: Some(note),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(err) = ctx.recorder.publish(&event, &object.object_ref(&())).await {
        tracing::warn!(error = %err, "cannot publish event");
    }
}

/// The owner of every grant named in the status of a stored KmsGrant, by grant ID.
pub(super) fn owners_from(objects: &[Arc<KmsGrant>]) -> BTreeMap<String, String> {
    let mut owners = BTreeMap::new();
    for object in objects {
        let (Some(uid), Some(status)) = (object.uid(), object.status.as_ref()) else {
            continue;
        };
        for grant_id in status
            .grant_id
            .iter()
            .chain(status.superseded_grant.iter().map(|g| &g.grant_id))
        {
            owners.insert(grant_id.clone(), uid.clone());
        }
    }
    owners
}
