//! KmsGrant: fetch what is needed, ask [`plan`](super::plan) what to do, carry it out, and write
//! status once.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};

use super::cache::{self, KeyRef};
use super::conditions::{Outcome, millis_rfc3339, reasons};
use super::identity::Identity;
use super::plan::{
    self, Claim, DesiredGrant, Observed, Plan, Recorded, Requeue, answered_by_kms, failure_outcome,
};
use super::provider::Provider;
use super::report::{self, FINALIZER};
use super::{Context, ReconcileError};
use crate::api::{DeletionPolicy, GrantRef, KmsGrant, KmsGrantStatus, KmsProviderConfig};
use kmsgrant_kms::{ErrorClass, ErrorReason, Grant, KmsError};

#[tracing::instrument(name = "reconcile", skip_all, fields(
    kind = "KmsGrant",
    namespace = object.metadata.namespace.as_deref().unwrap_or_default(),
    name = object.metadata.name.as_deref().unwrap_or_default(),
    key = object.spec.key_id.as_str(),
))]
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
    let identity = Identity::new(
        &ctx.cluster,
        &object.namespace().unwrap_or_default(),
        &object.name_any(),
        &uid,
    );
    let object_ref = ObjectRef::from_obj(object);
    if object.meta().deletion_timestamp.is_some() {
        ctx.interest.forget(&object_ref);
        ctx.metrics.object_condition(&object_key(object), None);
        return cleanup(object, &identity, ctx)
            .await
            .map(|action| (action, reasons::DELETING));
    }
    let has_finalizer = object.finalizers().iter().any(|f| f == FINALIZER);
    let wants_finalizer = object.spec.deletion_policy != DeletionPolicy::Orphan
        || object
            .status
            .as_ref()
            .is_some_and(|s| s.superseded_grant.is_some());
    if wants_finalizer != has_finalizer {
        report::set_finalizer(object, ctx, wants_finalizer).await?;
    }

    let mut work = Work {
        object,
        ctx,
        identity: &identity,
        status: object.status.clone().unwrap_or_default(),
        events: Vec::new(),
    };
    let outcome = match work.converge(&object_ref).await {
        Ok(outcome) | Err(Failure::Halted(outcome)) => outcome,
        Err(Failure::Kms(err)) => failure_outcome(&err),
        Err(Failure::Kube(err)) => return Err(ReconcileError::Kube(err)),
        Err(Failure::NotLeader(err)) => return Err(ReconcileError::NotLeader(err)),
    };
    let Work { status, events, .. } = work;
    // Status first (it records what was done on KMS), then what happened, for people.
    report::write_status(object, ctx, status, &outcome).await?;
    for (type_, reason, note) in events {
        report::publish(object, ctx, type_, reason, note).await;
    }
    report::status_transition_event(object, ctx, &outcome).await;
    let condition = match &outcome {
        Outcome::Ready { .. } => super::conditions::READY,
        Outcome::Progressing { .. } => super::conditions::RECONCILING,
        Outcome::Stalled { .. } => super::conditions::STALLED,
    };
    ctx.metrics
        .object_condition(&object_key(object), Some(condition));
    let action = match plan::requeue(&outcome) {
        // No timer per Ready object in the controller's queue: the drift detector wakes it when
        // its lastSyncTime is due (see `wake_sync_due`).
        Requeue::Resync => {
            ctx.backoff.reset(&object_ref);
            Action::await_change()
        }
        requeue => Action::requeue(delay(ctx, &object_ref, requeue)),
    };
    Ok((action, outcome.reason()))
}

fn delay(ctx: &Context, object: &ObjectRef<KmsGrant>, requeue: Requeue) -> Duration {
    match requeue {
        Requeue::Resync => {
            ctx.backoff.reset(object);
            ctx.settings.ready_recheck()
        }
        Requeue::StalledRetry => {
            ctx.backoff.reset(object);
            ctx.settings.stalled_retry
        }
        Requeue::Soon => Duration::from_secs(1),
        Requeue::Backoff => ctx.backoff.next(object),
    }
}

fn object_key(object: &KmsGrant) -> String {
    format!(
        "{}/{}",
        object.namespace().unwrap_or_default(),
        object.name_any()
    )
}

/// Why a reconcile step did not finish.
enum Failure {
    /// The object cannot go on now; the condition says why (not an error of the operator).
    Halted(Outcome),
    Kms(KmsError),
    Kube(kube::Error),
    NotLeader(crate::leader::NotLeader),
}

impl From<KmsError> for Failure {
    fn from(err: KmsError) -> Self {
        if err.reason == ErrorReason::WriteFenced {
            // Not sent: the lease was lost while the write waited (rate limit, retry).
            return Self::NotLeader(crate::leader::NotLeader);
        }
        Self::Kms(err)
    }
}

impl From<kube::Error> for Failure {
    fn from(err: kube::Error) -> Self {
        Self::Kube(err)
    }
}

impl From<crate::leader::NotLeader> for Failure {
    fn from(err: crate::leader::NotLeader) -> Self {
        Self::NotLeader(err)
    }
}

impl From<ReconcileError> for Failure {
    fn from(err: ReconcileError) -> Self {
        match err {
            ReconcileError::Kube(err) => Self::Kube(err),
            ReconcileError::NotLeader(err) => Self::NotLeader(err),
        }
    }
}

struct Work<'a> {
    object: &'a KmsGrant,
    ctx: &'a Context,
    identity: &'a Identity,
    status: KmsGrantStatus,
    /// Events to publish once status is written.
    events: Vec<PendingEvent>,
}

/// An event to publish once the object's state is written: type, reason, note.
type PendingEvent = (EventType, &'static str, String);

/// What a reconcile may act on, once the provider config admits the object and the key is usable.
struct Admitted {
    provider: Provider,
    account: String,
    key: KeyRef,
    import: Option<String>,
}

impl Work<'_> {
    /// fetch → decide → execute; returns where the object stands.
    async fn converge(&mut self, object_ref: &ObjectRef<KmsGrant>) -> Result<Outcome, Failure> {
        let admitted = self.admit(object_ref).await?;
        self.note_account_change(&admitted.account);
        let desired = DesiredGrant::of(&self.object.spec, self.identity);
        let next = self.decide(&admitted, &desired).await?;
        let keep = self.execute(next, &admitted, &desired).await?;
        self.record(&keep, &admitted.account);
        // A replaced grant on another account is revoked there.
        if let Some(old) = self.status.superseded_grant.clone() {
            let on_this_account = old
                .account
                .as_deref()
                .is_none_or(|a| *a == admitted.account);
            if on_this_account {
                // Listed with the object's other grants and revoked, or gone.
                self.status.superseded_grant = None;
            } else {
                self.revoke_on_other_account(&old).await?;
            }
        }
        Ok(in_sync(&keep.grant_id, &keep.key_id))
    }

    /// The provider, its guardrails and the key; [`Failure::Halted`] says why the object cannot
    /// go on.
    async fn admit(&self, object_ref: &ObjectRef<KmsGrant>) -> Result<Admitted, Failure> {
        let ctx = self.ctx;
        let spec = &self.object.spec;
        let config_name = &spec.provider_config_ref.name;
        let provider = provider_for(ctx, config_name).await?;
        let namespace = self.object.namespace().unwrap_or_default();
        let labels = namespace_labels(ctx, &namespace, &provider, spec).await?;
        if let Some(outcome) = plan::admit(spec, config_name, &provider.spec, &namespace, &labels) {
            return Err(Failure::Halted(outcome));
        }
        let import = plan::admit_import(
            spec,
            config_name,
            provider.spec.import_namespace_selector.as_ref(),
            &namespace,
            &labels,
        )
        .map_err(Failure::Halted)?
        .map(str::to_owned);
        let account = account_of(&provider).await?;
        let key = KeyRef {
            provider: config_name.clone(),
            account: account.clone(),
            key_id: spec.key_id.clone(),
        };
        ctx.interest.register(object_ref, &key);
        let unusable = match ctx
            .keys
            .key_info(&provider.client, &key, ctx.settings.key_info_max_age())
            .await
        {
            Ok(info) => plan::key_usable(&key.key_id, &info),
            Err(err) if err.reason == ErrorReason::KeyNotFound => {
                Some(plan::key_not_found(&key.key_id))
            }
            Err(err) => return Err(err.into()),
        };
        match unusable {
            Some(outcome) => Err(Failure::Halted(outcome)),
            None => Ok(Admitted {
                provider,
                account,
                key,
                import,
            }),
        }
    }

    /// A grant recorded on another account (the config was pointed elsewhere) is replaced: it
    /// is revoked there once the new one is in place.
    fn note_account_change(&mut self, account: &str) {
        if self.status.grant_id.is_some()
            && self.status.account.as_deref().is_some_and(|a| a != account)
            && self.status.superseded_grant.is_none()
        {
            self.status.superseded_grant = self.recorded().map(|g| GrantRef {
                account: self.status.account.clone(),
                ..g
            });
            self.status.grant_id = None;
        }
    }

    /// Lists what is needed and asks the plan; a snapshot that may be stale is listed afresh.
    async fn decide(&self, admitted: &Admitted, desired: &DesiredGrant) -> Result<Plan, Failure> {
        let Admitted {
            provider,
            account,
            key,
            import,
        } = admitted;
        let recorded = self.recorded();
        let claim = Claim {
            identity: self.identity,
            import: import.as_deref(),
        };
        let max_age = self.ctx.settings.snapshot_max_age();
        let (mut grants, mut fresh) = self.list(provider, key, max_age).await?;
        let elsewhere = self.grants_elsewhere(provider, account, key).await?;
        loop {
            let next = plan::plan(
                desired,
                claim,
                Observed {
                    grants: &grants,
                    fresh,
                    elsewhere: &elsewhere,
                },
                Recorded {
                    grant: recorded.as_ref(),
                },
            );
            tracing::debug!(?next, "planned");
            match next {
                Plan::ListAgain => {}
                Plan::Refuse(outcome) => return Err(Failure::Halted(outcome)),
                next => return Ok(next),
            }
            (grants, fresh) = self.list(provider, key, Duration::ZERO).await?;
        }
    }

    /// Carries a plan out; returns the grant the object keeps.
    async fn execute(
        &mut self,
        next: Plan,
        admitted: &Admitted,
        desired: &DesiredGrant,
    ) -> Result<Grant, Failure> {
        let Admitted {
            provider,
            account,
            key,
            ..
        } = admitted;
        match next {
            Plan::ListAgain | Plan::Refuse(_) => unreachable!("decided before"),
            Plan::InSync { keep, adopted } => {
                self.adopted(adopted, &keep);
                Ok(keep)
            }
            Plan::RevokeExtras {
                keep,
                adopted,
                revoke,
            } => {
                self.adopted(adopted, &keep);
                for extra in &revoke {
                    self.revoke(provider, account, extra).await?;
                }
                Ok(keep)
            }
            Plan::Create { replaces, recreate } => {
                let created = self.create(provider, key, desired).await?;
                let grant_id = &created.grant_id;
                let (kind, reason, note) = match (replaces.first(), recreate) {
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
                if let Some(old_key) = replaces.iter().find(|old| old.key_id != key.key_id) {
                    // The grant on the old key is found again only through status: record the
                    // new grant and the old one before revoking.
                    self.record(&created, account);
                    self.status.superseded_grant = Some(old_key.clone());
                    let progress = Outcome::Progressing {
                        reason: reasons::REPLACING,
                        message: format!(
                            "created grant {grant_id}; revoking the grant it replaces"
                        ),
                    };
                    report::write_status(self.object, self.ctx, self.status.clone(), &progress)
                        .await?;
                }
                for old in &replaces {
                    self.revoke(provider, account, old).await?;
                }
                Ok(created)
            }
        }
    }

    /// `create-grant`, fenced; an unknown outcome makes the next reader list the key afresh.
    async fn create(
        &self,
        provider: &Provider,
        key: &KeyRef,
        desired: &DesiredGrant,
    ) -> Result<Grant, Failure> {
        self.ctx.fence.check()?;
        match provider.client.create_grant(&desired.to_new_grant()).await {
            Ok(grant_id) => {
                let created = desired.created(&grant_id);
                self.ctx.keys.insert(key, created.clone()).await;
                Ok(created)
            }
            Err(err) => {
                if err.class() == ErrorClass::OutcomeUnknown {
                    // It may exist: list before writing again (it will be adopted).
                    self.ctx.keys.invalidate(key).await;
                }
                Err(err.into())
            }
        }
    }

    fn recorded(&self) -> Option<GrantRef> {
        self.status.grant_id.clone().map(|grant_id| GrantRef {
            key_id: self
                .status
                .key_id
                .clone()
                .unwrap_or_else(|| self.object.spec.key_id.clone()),
            grant_id,
            account: None,
        })
    }

    async fn list(
        &self,
        provider: &Provider,
        key: &KeyRef,
        max_age: Duration,
    ) -> Result<(Arc<Vec<Grant>>, bool), Failure> {
        let ctx = self.ctx;
        Ok(ctx
            .keys
            .grants(
                &provider.client,
                key,
                max_age,
                ctx.settings.page_size,
                &ctx.metrics,
            )
            .await?)
    }

    /// The grants on keys the object used before on this account (a key change in progress).
    async fn grants_elsewhere(
        &self,
        provider: &Provider,
        account: &str,
        key: &KeyRef,
    ) -> Result<Vec<Grant>, Failure> {
        let mut keys: Vec<String> = self.status.key_id.iter().cloned().collect();
        if let Some(old) = &self.status.superseded_grant
            && old.account.as_deref().is_none_or(|a| a == account)
        {
            keys.push(old.key_id.clone());
        }
        keys.retain(|k| *k != key.key_id);
        keys.dedup();
        let mut grants = Vec::new();
        for key_id in keys {
            let other = KeyRef {
                key_id,
                ..key.clone()
            };
            match self
                .list(provider, &other, self.ctx.settings.snapshot_max_age())
                .await
            {
                Ok((listed, _)) => grants.extend(listed.iter().cloned()),
                Err(Failure::Kms(err))
                    if err.reason == ErrorReason::KeyNotFound && answered_by_kms(&err) => {}
                Err(err) => return Err(err),
            }
        }
        Ok(grants)
    }

    /// Revokes one of the object's grants on this account.
    async fn revoke(
        &mut self,
        provider: &Provider,
        account: &str,
        target: &GrantRef,
    ) -> Result<(), Failure> {
        let key = KeyRef {
            provider: self.object.spec.provider_config_ref.name.clone(),
            account: account.to_owned(),
            key_id: target.key_id.clone(),
        };
        self.ctx.fence.check()?;
        match provider
            .client
            .revoke_grant(&target.key_id, &target.grant_id)
            .await
        {
            Ok(()) => self.event(
                EventType::Normal,
                "GrantRevoked",
                format!("revoked grant {} (replaced or duplicate)", target.grant_id),
            ),
            // It was listed a moment ago on this very account: gone means someone else revoked it.
            Err(err) if err.is_already_gone() && answered_by_kms(&err) => {}
            Err(err) => {
                if err.class() == ErrorClass::OutcomeUnknown || err.is_already_gone() {
                    self.ctx.keys.invalidate(&key).await;
                }
                return Err(err.into());
            }
        }
        self.ctx.keys.remove(&key, &target.grant_id).await;
        Ok(())
    }

    /// Revokes a replaced grant on the account it lives on; [`Failure::Halted`] says why it
    /// cannot.
    async fn revoke_on_other_account(&mut self, old: &GrantRef) -> Result<(), Failure> {
        let account = old.account.clone().unwrap_or_default();
        let Some((name, provider)) = provider_for_account(self.ctx, &account).await else {
            return Err(Failure::Halted(unreachable_account(
                &old.grant_id,
                &account,
            )));
        };
        let key = KeyRef {
            provider: name,
            account: account.clone(),
            key_id: old.key_id.clone(),
        };
        let claim = Claim {
            identity: self.identity,
            import: None,
        };
        let listed = match self.list(&provider, &key, Duration::ZERO).await {
            Ok((listed, _)) => listed,
            Err(Failure::Kms(err))
                if err.reason == ErrorReason::KeyNotFound && answered_by_kms(&err) =>
            {
                Arc::default()
            }
            Err(err) => return Err(err),
        };
        if let Some(grant) = listed
            .iter()
            .find(|g| g.grant_id == old.grant_id && claim.owns(g))
        {
            let target = GrantRef {
                account: None,
                ..plan_ref(grant)
            };
            self.revoke(&provider, &account, &target).await?;
        }
        self.status.superseded_grant = None;
        Ok(())
    }

    fn adopted(&mut self, adopted: bool, grant: &Grant) {
        if adopted {
            self.event(
                EventType::Normal,
                "GrantAdopted",
                format!(
                    "adopted grant {} ({}) on key {}",
                    grant.grant_id,
                    grant.name.as_deref().unwrap_or_default(),
                    grant.key_id
                ),
            );
        }
    }

    /// Records the grant the object keeps. Fields the cloud did not report are cleared rather
    /// than carried over from another grant.
    fn record(&mut self, grant: &Grant, account: &str) {
        let status = &mut self.status;
        let same = status.grant_id.as_deref() == Some(grant.grant_id.as_str());
        status.issuing_principal = grant
            .issuing_principal
            .clone()
            .or_else(|| same.then(|| status.issuing_principal.take()).flatten());
        status.created_at = grant
            .created_at_millis
            .and_then(millis_rfc3339)
            .or_else(|| same.then(|| status.created_at.take()).flatten());
        status.grant_id = Some(grant.grant_id.clone());
        status.key_id = Some(grant.key_id.clone());
        status.grant_name = grant.name.clone();
        status.account = Some(account.to_owned());
    }

    fn event(&mut self, type_: EventType, reason: &'static str, note: String) {
        self.events.push((type_, reason, note));
    }
}

fn plan_ref(grant: &Grant) -> GrantRef {
    GrantRef {
        key_id: grant.key_id.clone(),
        grant_id: grant.grant_id.clone(),
        account: None,
    }
}

fn in_sync(grant_id: &str, key_id: &str) -> Outcome {
    Outcome::Ready {
        reason: reasons::GRANT_READY,
        message: format!("grant {grant_id} on key {key_id} matches the spec"),
    }
}

fn unreachable_account(grant_id: &str, account: &str) -> Outcome {
    Outcome::Progressing {
        reason: reasons::GRANT_ACCOUNT_UNREACHABLE,
        message: format!(
            "grant {grant_id} lives on account {account:?}, which no Ready KmsProviderConfig reaches any more; point one at it so the grant can be revoked there, or remove the finalizer {FINALIZER} to leave the grant in place"
        ),
    }
}

/// The account a provider reaches: its endpoint and its (resolved) project.
pub(super) async fn account_of(provider: &Provider) -> Result<String, KmsError> {
    let project_id = provider.client.project_id().await?;
    Ok(plan::account(&provider.spec.endpoint, &project_id))
}

/// A Ready provider config reaching `account`, if any.
async fn provider_for_account(ctx: &Context, account: &str) -> Option<(String, Provider)> {
    for (name, provider) in ctx.providers.all() {
        if account_of(&provider).await.is_ok_and(|a| a == account) {
            return Some((name, provider));
        }
    }
    None
}

/// The verified provider; [`Failure::Halted`] explains why there is none.
async fn provider_for(ctx: &Context, name: &str) -> Result<Provider, Failure> {
    let exists = ctx
        .provider_configs
        .get(&ObjectRef::<KmsProviderConfig>::new(name))
        .is_some()
        || Api::<KmsProviderConfig>::all(ctx.client.clone())
            .get_opt(name)
            .await?
            .is_some();
    if !exists {
        return Err(Failure::Halted(Outcome::Stalled {
            reason: reasons::PROVIDER_CONFIG_NOT_FOUND,
            message: format!(
                "KmsProviderConfig {name:?} does not exist; create it or set spec.providerConfigRef.name"
            ),
        }));
    }
    ctx.providers.get(name).ok_or_else(|| {
        Failure::Halted(Outcome::Progressing {
            reason: reasons::PROVIDER_CONFIG_NOT_READY,
            message: format!(
                "KmsProviderConfig {name:?} is not Ready; see its conditions (kubectl describe kmspc {name})"
            ),
        })
    })
}

/// The namespace's labels, read only when a selector needs them.
async fn namespace_labels(
    ctx: &Context,
    namespace: &str,
    provider: &Provider,
    spec: &crate::api::KmsGrantSpec,
) -> Result<BTreeMap<String, String>, kube::Error> {
    let needed = provider.spec.namespace_selector.is_some()
        || (spec.import_grant_id.is_some() && provider.spec.import_namespace_selector.is_some());
    if !needed {
        return Ok(BTreeMap::new());
    }
    ctx.namespaces.labels(namespace).await
}

/// Deletion: revoke, retire or leave the object's grants, found by a fresh list on the account
/// they live on; then let the object go.
async fn cleanup(
    object: &KmsGrant,
    identity: &Identity,
    ctx: &Context,
) -> Result<Action, ReconcileError> {
    if !object.finalizers().iter().any(|f| f == FINALIZER) {
        return Ok(Action::await_change());
    }
    let mut events = Vec::new();
    let removed = remove_grants(object, identity, ctx, &mut events).await;
    // What was done is told even when the rest has to wait.
    for (type_, reason, note) in events {
        report::publish(object, ctx, type_, reason, note).await;
    }
    let blocked = match removed {
        Ok(()) => None,
        Err(Failure::Halted(outcome)) => Some(outcome),
        Err(Failure::Kms(err)) => Some(plan::cleanup_failure_outcome(&err)),
        Err(Failure::Kube(err)) => return Err(ReconcileError::Kube(err)),
        Err(Failure::NotLeader(err)) => return Err(ReconcileError::NotLeader(err)),
    };
    if let Some(outcome) = blocked {
        report::cleanup_blocked(object, ctx, &outcome).await?;
        let requeue = plan::cleanup_requeue(&outcome);
        return Ok(Action::requeue(delay(
            ctx,
            &ObjectRef::from_obj(object),
            requeue,
        )));
    }
    match report::set_finalizer(object, ctx, false).await {
        // Gone already: this reconcile ran from a cache that had not yet seen the earlier one
        // release the object; what deletion waited for is done.
        Err(ReconcileError::Kube(kube::Error::Api(status))) if status.is_not_found() => {}
        result => result?,
    }
    ctx.backoff.reset(&ObjectRef::from_obj(object));
    Ok(Action::await_change())
}

/// Removes what deletion removes, noting events; [`Failure::Halted`] says why it cannot be done
/// now.
async fn remove_grants(
    object: &KmsGrant,
    identity: &Identity,
    ctx: &Context,
    events: &mut Vec<PendingEvent>,
) -> Result<(), Failure> {
    let status = object.status.clone().unwrap_or_default();
    let policy = object.spec.deletion_policy;
    let config_name = &object.spec.provider_config_ref.name;
    // A config that is not Ready still cleans up while its revoke works.
    let current = ctx.providers.for_cleanup(config_name);
    let current_account = match &current {
        Some(provider) => Some(account_of(provider).await?),
        None => None,
    };
    // An import counts only once it was adopted (it passed the guardrails then).
    let import = object
        .spec
        .import_grant_id
        .as_deref()
        .filter(|id| status.grant_id.as_deref() == Some(*id));
    let claim = Claim { identity, import };
    let places = plan::cleanup_places(
        policy,
        &status,
        &object.spec.key_id,
        current_account.as_deref(),
        config_name,
    )
    .map_err(Failure::Halted)?;

    for place in places {
        let provider = match (&current, &current_account) {
            (Some(provider), Some(a)) if *a == place.account => {
                Some((config_name.clone(), provider.clone()))
            }
            _ => provider_for_account(ctx, &place.account).await,
        };
        let Some((name, provider)) = provider else {
            if let Some(grant_id) = &place.recorded_grant {
                return Err(Failure::Halted(unreachable_account(
                    grant_id,
                    &place.account,
                )));
            }
            continue;
        };
        let key = KeyRef {
            provider: name,
            account: place.account.clone(),
            key_id: place.key_id.clone(),
        };
        let listed = match list_for_cleanup(ctx, &provider, &key, object).await {
            Ok(Some(listed)) => listed,
            Ok(None) => continue,
            // Only a lost answer could have left a grant here; a lookup that cannot work
            // (credentials, permissions) must not block deletion forever.
            Err(Failure::Kms(err))
                if place.recorded_grant.is_none() && err.class() == ErrorClass::Terminal =>
            {
                events.push((
                    EventType::Warning,
                    "CleanupLookupFailed",
                    format!(
                        "could not check key {} for a grant of this object: {err}",
                        key.key_id
                    ),
                ));
                continue;
            }
            Err(err) => return Err(err),
        };
        let targets =
            plan::cleanup_targets(policy, claim, &listed, status.superseded_grant.as_ref());
        remove_targets(ctx, &provider, &key, &targets, events).await?;
    }
    if policy == DeletionPolicy::Orphan
        && let Some(grant_id) = &status.grant_id
    {
        events.push((
            EventType::Normal,
            "GrantOrphaned",
            format!("left grant {grant_id} on the cloud"),
        ));
    }
    Ok(())
}

/// Revokes or retires `targets` on one key. "Already gone" is believed only from a fresh list.
async fn remove_targets(
    ctx: &Context,
    provider: &Provider,
    key: &KeyRef,
    targets: &[(GrantRef, DeletionPolicy)],
    events: &mut Vec<PendingEvent>,
) -> Result<(), Failure> {
    let mut unconfirmed = Vec::new();
    for (target, how) in targets {
        ctx.fence.check()?;
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
        match result {
            Ok(()) => {
                let (reason, verb) = if *how == DeletionPolicy::Retire {
                    ("GrantRetired", "retired")
                } else {
                    ("GrantRevoked", "revoked")
                };
                events.push((
                    EventType::Normal,
                    reason,
                    format!("{verb} grant {}", target.grant_id),
                ));
            }
            Err(err) if err.is_already_gone() => unconfirmed.push(target.grant_id.clone()),
            Err(err) => {
                if err.class() == ErrorClass::OutcomeUnknown {
                    ctx.keys.invalidate(key).await;
                }
                return Err(err.into());
            }
        }
        ctx.keys.remove(key, &target.grant_id).await;
    }
    if !unconfirmed.is_empty()
        && let Some(listed) = list_fresh(ctx, provider, key).await?
        && let Some(still) = listed.iter().find(|g| unconfirmed.contains(&g.grant_id))
    {
        return Err(Failure::Halted(Outcome::Progressing {
            reason: reasons::KMS_UNAVAILABLE,
            message: format!(
                "KMS answered that grant {} is gone, but key {} still lists it; retrying",
                still.grant_id, key.key_id
            ),
        }));
    }
    Ok(())
}

/// A fresh list of the key; `None` when KMS itself says the key does not exist (its grants are
/// gone with it).
async fn list_fresh(
    ctx: &Context,
    provider: &Provider,
    key: &KeyRef,
) -> Result<Option<Arc<Vec<Grant>>>, Failure> {
    match ctx
        .keys
        .grants(
            &provider.client,
            key,
            Duration::ZERO,
            ctx.settings.page_size,
            &ctx.metrics,
        )
        .await
    {
        Ok((grants, _)) => Ok(Some(grants)),
        Err(err) if err.reason == ErrorReason::KeyNotFound && answered_by_kms(&err) => Ok(None),
        Err(err) => Err(err.into()),
    }
}

/// [`list_fresh`] for the cleanup of `object`: the objects being deleted on one key share one
/// walk that started after they all were (see [`cache::KeyCache::grants_for_cleanup`]).
async fn list_for_cleanup(
    ctx: &Context,
    provider: &Provider,
    key: &KeyRef,
    object: &KmsGrant,
) -> Result<Option<Arc<Vec<Grant>>>, Failure> {
    let Some(uid) = object.metadata.uid.as_deref() else {
        return list_fresh(ctx, provider, key).await;
    };
    match ctx
        .keys
        .grants_for_cleanup(
            &provider.client,
            key,
            uid,
            || cache::deleting_on(&ctx.grants, &key.key_id),
            ctx.settings.page_size,
            &ctx.metrics,
        )
        .await
    {
        Ok(grants) => Ok(Some(grants)),
        Err(err) if err.reason == ErrorReason::KeyNotFound && answered_by_kms(&err) => Ok(None),
        Err(err) => Err(err.into()),
    }
}
