//! The third step of a reconcile: carry a [`Decision`] out on KMS, step by step, recording what
//! was done into the status the report writes. Every write is fenced (a replica that lost its
//! lease sends nothing); an answer that may have been lost makes the next reader of the key list
//! it afresh before anything is written there again.

use kube::runtime::events::EventType;

use super::cache::KeyRef;
use super::conditions::{Outcome, millis_rfc3339, reasons};
use super::plan::{
    CreateWhy, Decision, Ending, Pass, PendingEvent, Requeue, Step, answered_by_kms,
};
use super::{Context, ReconcileError};
use crate::api::{DeletionPolicy, GrantRef, KmsGrantStatus};
use kmsgrant_kms::{ErrorClass, ErrorReason, Grant, KmsClient, KmsError};

/// What a pass did, for the report.
pub(super) struct Executed {
    pub pass: Pass,
    /// The finalizer to set (present or absent), when it must change.
    pub finalizer: Option<bool>,
    /// The status to write and the condition it carries; `None`: status stays as it is.
    pub status: Option<(KmsGrantStatus, Outcome)>,
    /// What happened, for people, in order.
    pub events: Vec<PendingEvent>,
    pub requeue: Requeue,
}

/// Why a step did not finish.
enum StepFailure {
    Kms(KmsError),
    /// Done as far as it goes, but the object cannot go on now; the condition says why.
    Halted(Outcome),
    NotLeader(crate::leader::NotLeader),
}

impl From<KmsError> for StepFailure {
    fn from(err: KmsError) -> Self {
        if err.reason == ErrorReason::WriteFenced {
            // Not sent: the lease was lost while the write waited (rate limit, retry).
            return Self::NotLeader(crate::leader::NotLeader);
        }
        Self::Kms(err)
    }
}

impl From<crate::leader::NotLeader> for StepFailure {
    fn from(err: crate::leader::NotLeader) -> Self {
        Self::NotLeader(err)
    }
}

/// Carries `decision` out; stops at the first step that fails and says what that means.
pub(super) async fn run(ctx: &Context, decision: Decision) -> Result<Executed, ReconcileError> {
    let Decision {
        pass,
        finalizer,
        steps,
        status,
        account,
        ending,
        requeue,
        events,
        on_failure,
        retry,
    } = decision;
    let mut record = Record {
        status,
        account: account.unwrap_or_default(),
        events,
        kept: None,
    };
    for step in steps {
        let failed = match record.run(ctx, step).await {
            Ok(()) => continue,
            Err(StepFailure::NotLeader(err)) => return Err(ReconcileError::NotLeader(err)),
            Err(StepFailure::Kms(err)) => on_failure(&err),
            Err(StepFailure::Halted(outcome)) => outcome,
        };
        return Ok(Executed {
            pass,
            finalizer: None,
            requeue: retry(&failed),
            status: Some((record.status, failed)),
            events: record.events,
        });
    }
    let outcome = match ending {
        Ending::Quiet => None,
        Ending::Outcome(outcome) => Some(outcome),
        Ending::InSync => Some(record.in_sync()),
        Ending::Replacing => Some(Outcome::Progressing {
            reason: reasons::REPLACING,
            message: format!(
                "created grant {}; revoking the grant it replaces",
                record.status.grant_id.as_deref().unwrap_or_default()
            ),
        }),
    };
    Ok(Executed {
        pass,
        finalizer,
        status: outcome.map(|outcome| (record.status, outcome)),
        events: record.events,
        requeue,
    })
}

/// The status being recorded into, and what happened so far.
struct Record {
    status: KmsGrantStatus,
    account: String,
    events: Vec<PendingEvent>,
    /// The grant the object keeps, once known.
    kept: Option<Grant>,
}

impl Record {
    async fn run(&mut self, ctx: &Context, step: Step) -> Result<(), StepFailure> {
        match step {
            Step::ListAfresh(key) => ctx.keys.invalidate(&key).await,
            Step::Create {
                client,
                key,
                desired,
                why,
            } => {
                let created = create(ctx, &client, &key, &desired).await?;
                let grant_id = &created.grant_id;
                let event = match why {
                    CreateWhy::Recreate => {
                        ctx.metrics.drift_repaired();
                        (
                            EventType::Warning,
                            "GrantRecreated",
                            format!("grant vanished from the cloud; created {grant_id}"),
                        )
                    }
                    CreateWhy::Replace { old } => (
                        EventType::Normal,
                        "GrantReplaced",
                        format!(
                            "created {grant_id} to replace {old}, which no longer matches the spec or the key it names"
                        ),
                    ),
                    CreateWhy::New => (
                        EventType::Normal,
                        "GrantCreated",
                        format!("created grant {grant_id} on key {}", desired.key_id),
                    ),
                };
                self.events.push(event);
                self.keep(created);
            }
            Step::Revoke {
                client,
                key,
                target,
            } => {
                if revoke(ctx, &client, &key, &target).await? {
                    self.events.push((
                        EventType::Normal,
                        "GrantRevoked",
                        format!("revoked grant {} (replaced or duplicate)", target.grant_id),
                    ));
                }
            }
            Step::Remove {
                client,
                key,
                targets,
            } => remove(ctx, &client, &key, &targets, &mut self.events).await?,
            Step::Keep(grant) => self.keep(grant),
            Step::Supersede(old) => self.status.superseded_grant = Some(Box::new(old)),
            Step::ForgetSuperseded => self.status.superseded_grant = None,
            Step::Tell(event) => self.events.push(event),
            Step::RecordRevokedDuplicate(revoked) => {
                self.status.revoked_duplicate = Some(Box::new(crate::api::RevokedDuplicate {
                    revoked_at: Some(super::conditions::now_rfc3339()),
                    ..revoked
                }));
            }
            Step::ClusterNameInUse(event) => {
                ctx.metrics.cluster_name_conflict();
                self.events.push(event);
            }
        }
        Ok(())
    }

    /// Records the grant the object keeps. Fields the cloud did not report are cleared rather
    /// than carried over from another grant.
    fn keep(&mut self, grant: Grant) {
        let status = &mut self.status;
        let same = status.grant_id.as_deref() == Some(grant.grant_id.as_str());
        status.issuing_principal = grant
            .issuing_principal
            .as_deref()
            .map(str::to_owned)
            .or_else(|| same.then(|| status.issuing_principal.take()).flatten());
        status.created_at = grant
            .created_at_millis
            .and_then(millis_rfc3339)
            .or_else(|| same.then(|| status.created_at.take()).flatten());
        status.grant_id = Some(grant.grant_id.clone());
        status.key_id = Some(grant.key_id.to_string());
        status.grant_name = grant.name.clone();
        status.account = Some(self.account.clone());
        self.kept = Some(grant);
    }

    fn in_sync(&self) -> Outcome {
        let (grant_id, key_id) = match &self.kept {
            Some(grant) => (grant.grant_id.as_str(), &*grant.key_id),
            None => (
                self.status.grant_id.as_deref().unwrap_or_default(),
                self.status.key_id.as_deref().unwrap_or_default(),
            ),
        };
        Outcome::Ready {
            reason: reasons::GRANT_READY,
            message: format!("grant {grant_id} on key {key_id} matches the spec"),
        }
    }
}

/// `create-grant`, fenced; an unknown outcome makes the next reader list the key afresh.
async fn create(
    ctx: &Context,
    client: &KmsClient,
    key: &KeyRef,
    desired: &super::plan::DesiredGrant,
) -> Result<Grant, StepFailure> {
    ctx.fence.check()?;
    match client.create_grant(&desired.to_new_grant()).await {
        Ok(grant_id) => {
            let created = desired.created(&grant_id);
            ctx.keys.insert(key, created.clone()).await;
            Ok(created)
        }
        Err(err) => {
            if err.class() == ErrorClass::OutcomeUnknown {
                // It may exist: list before writing again (it will be adopted).
                ctx.keys.invalidate(key).await;
            }
            Err(err.into())
        }
    }
}

/// Revokes one of the object's grants; true when this call revoked it (false: KMS says it was
/// gone already, which a list just made on this very account makes believable).
async fn revoke(
    ctx: &Context,
    client: &KmsClient,
    key: &KeyRef,
    target: &GrantRef,
) -> Result<bool, StepFailure> {
    ctx.fence.check()?;
    let revoked = match client.revoke_grant(&target.key_id, &target.grant_id).await {
        Ok(()) => true,
        Err(err) if err.is_already_gone() && answered_by_kms(&err) => false,
        Err(err) => {
            if err.class() == ErrorClass::OutcomeUnknown || err.is_already_gone() {
                ctx.keys.invalidate(key).await;
            }
            return Err(err.into());
        }
    };
    ctx.keys.remove(key, &target.grant_id).await;
    Ok(revoked)
}

/// Revokes or retires what deletion removes on one key. "Already gone" is believed only from a
/// fresh list.
async fn remove(
    ctx: &Context,
    client: &KmsClient,
    key: &KeyRef,
    targets: &[(GrantRef, DeletionPolicy)],
    events: &mut Vec<PendingEvent>,
) -> Result<(), StepFailure> {
    let mut unconfirmed = Vec::new();
    for (target, how) in targets {
        ctx.fence.check()?;
        let result = match how {
            DeletionPolicy::Retire => client.retire_grant(&target.key_id, &target.grant_id).await,
            _ => client.revoke_grant(&target.key_id, &target.grant_id).await,
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
    if unconfirmed.is_empty() {
        return Ok(());
    }
    let listed = match ctx
        .keys
        .grants(
            client,
            key,
            std::time::Duration::ZERO,
            ctx.settings.page_size,
            &ctx.metrics,
        )
        .await
    {
        Ok((listed, _)) => listed,
        Err(err) if err.reason == ErrorReason::KeyNotFound && answered_by_kms(&err) => {
            return Ok(());
        }
        Err(err) => return Err(err.into()),
    };
    match listed.iter().find(|g| unconfirmed.contains(&g.grant_id)) {
        Some(still) => Err(StepFailure::Halted(Outcome::Progressing {
            reason: reasons::KMS_UNAVAILABLE,
            message: format!(
                "KMS answered that grant {} is gone, but key {} still lists it; retrying",
                still.grant_id, key.key_id
            ),
        })),
        None => Ok(()),
    }
}
