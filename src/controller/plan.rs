//! Pure decisions: given what the object wants and what the cloud holds, what to do next.
//! No I/O here; the reconciler fetches, calls these, and carries the result out.
//!
//! Ownership is decided from the listed grants and their names alone (see [`super::identity`]):
//! an object owns the grants named for its identity (and, from older versions, for its UID), and
//! a grant it imported by ID. Nothing else is ever adopted, revoked or retired.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use kube::ResourceExt;
use kube::runtime::events::EventType;

use super::cache::KeyRef;
use super::conditions::{Outcome, reasons};
use super::identity::Identity;
use super::scope::CleanupPlace;
use crate::api::{
    DeletionPolicy, GrantRef, GranteePrincipalType, KmsGrant, KmsGrantSpec, KmsGrantStatus,
    KmsProviderConfigSpec, Operation, RevokedDuplicate,
};
use kmsgrant_kms::{
    ErrorClass, ErrorReason, Grant, KeyInfo, KeyState, KmsClient, KmsError, NewGrant,
};

/// The finalizer that makes deletion wait for the grant to be revoked or retired.
pub const FINALIZER: &str = "kmsgrant.io/grant";

/// The grant an object wants: its spec, under its identity name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredGrant {
    pub key_id: String,
    /// The object's identity, `k8s/<cluster>/<namespace>/<name>`.
    pub name: String,
    pub grantee_principal: String,
    pub grantee_principal_type: GranteePrincipalType,
    pub operations: BTreeSet<Operation>,
    pub retiring_principal: Option<String>,
}

impl DesiredGrant {
    pub fn of(spec: &KmsGrantSpec, identity: &Identity) -> Self {
        Self {
            // A key named by alias is resolved by `observe`, which sets it.
            key_id: spec.key_id.clone().unwrap_or_default(),
            name: identity.name.clone(),
            grantee_principal: spec.grantee_principal.clone(),
            grantee_principal_type: spec.grantee_principal_type,
            operations: spec.operation_set(),
            retiring_principal: spec.retiring_principal.clone().filter(|p| !p.is_empty()),
        }
    }

    /// Whether a grant gives exactly what the spec asks (operations compared as a set), whatever
    /// its name.
    pub fn fields_match(&self, grant: &Grant) -> bool {
        let operations: BTreeSet<&str> = self.operations.iter().map(|op| op.as_str()).collect();
        *grant.key_id == *self.key_id
            && *grant.grantee_principal == *self.grantee_principal
            && grant.grantee_type() == self.grantee_principal_type.as_str()
            && grant.operation_set() == operations
            && grant.retiring_principal == self.retiring_principal
    }

    pub fn to_new_grant(&self) -> NewGrant {
        NewGrant {
            key_id: self.key_id.clone(),
            grantee_principal: self.grantee_principal.clone(),
            grantee_principal_type: self.grantee_principal_type,
            operations: self.operations.iter().copied().collect(),
            name: Some(self.name.clone()),
            retiring_principal: self.retiring_principal.clone(),
        }
    }

    /// A grant we just created, as list-grants would show it (minus what only the server knows).
    pub fn created(&self, grant_id: &str) -> Grant {
        Grant {
            key_id: self.key_id.as_str().into(),
            grant_id: grant_id.to_owned(),
            grantee_principal: self.grantee_principal.as_str().into(),
            grantee_principal_type: Some(self.grantee_principal_type.as_str().into()),
            operations: self
                .operations
                .iter()
                .map(|op| op.as_str().to_owned())
                .collect(),
            issuing_principal: None,
            created_at_millis: None,
            name: Some(self.name.clone()),
            retiring_principal: self.retiring_principal.clone(),
        }
    }
}

/// What an object may call its own.
#[derive(Clone, Copy, Debug)]
pub struct Claim<'a> {
    pub identity: &'a Identity,
    /// `spec.importGrantId`, once admitted (import allowed for the namespace).
    pub import: Option<&'a str>,
}

impl Claim<'_> {
    /// Whether this object owns the grant: named for its identity, or imported by ID (never a
    /// grant that carries another object's identity).
    pub fn owns(&self, grant: &Grant) -> bool {
        let name = grant.name.as_deref();
        self.identity.names(name)
            || (self.import == Some(grant.grant_id.as_str()) && !self.identity.is_foreign(name))
    }

    /// Whether an owned grant can stay as it is: identity-named (not a legacy name) or the
    /// imported one, with the spec's fields.
    fn keeps(&self, desired: &DesiredGrant, grant: &Grant) -> bool {
        desired.fields_match(grant)
            && (grant.name.as_deref() == Some(desired.name.as_str())
                || self.import == Some(grant.grant_id.as_str()))
    }
}

/// The grants seen on the cloud for one reconcile.
#[derive(Clone, Copy, Debug)]
pub struct Observed<'a> {
    /// Every grant on the desired key.
    pub grants: &'a [Grant],
    /// Whether `grants` can be believed about what they lack: listed in this reconcile (not
    /// from a snapshot), or what status names was seen to vanish by a walk (see
    /// `KeyCache::vanished`).
    pub fresh: bool,
    /// Grants on keys the object used before (a key change in progress).
    pub elsewhere: &'a [Grant],
}

/// What status says the object held.
#[derive(Clone, Copy, Debug, Default)]
pub struct Recorded<'a> {
    pub grant: Option<&'a GrantRef>,
}

/// The next step for one object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    /// The kept grant matches the spec and is the object's only grant: nothing to write.
    /// `adopted`: status does not name it yet (a lost answer or status write, a rebuilt cluster,
    /// an import).
    InSync { keep: Grant, adopted: bool },
    /// Keep one grant and revoke the object's others: duplicates from lost answers, a grant the
    /// spec no longer matches, one on the previous key, a legacy-named one.
    RevokeExtras {
        keep: Grant,
        adopted: bool,
        revoke: Vec<GrantRef>,
    },
    /// No owned grant matches: create one (first; the owned ones it replaces are revoked after).
    /// `recreate`: status named a grant that the cloud no longer has (drift).
    Create {
        replaces: Vec<GrantRef>,
        recreate: bool,
    },
    /// The snapshot may be stale: list the key afresh and decide again before writing.
    ListAgain,
    /// Nothing can be done until a person acts.
    Refuse(Outcome),
}

fn gref(grant: &Grant) -> GrantRef {
    GrantRef {
        key_id: grant.key_id.to_string(),
        grant_id: grant.grant_id.clone(),
        account: None,
    }
}

/// Decides the next step.
pub fn plan(
    desired: &DesiredGrant,
    claim: Claim<'_>,
    observed: Observed<'_>,
    recorded: Recorded<'_>,
) -> Plan {
    if let Some(import) = claim.import {
        match observed.grants.iter().find(|g| g.grant_id == import) {
            Some(grant) if claim.identity.is_foreign(grant.name.as_deref()) => {
                return Plan::Refuse(Outcome::Stalled {
                    reason: reasons::IMPORT_REFUSED,
                    message: format!(
                        "grant {import} is named {:?}, the identity of another KmsGrant; it cannot be imported",
                        grant.name.as_deref().unwrap_or_default()
                    ),
                });
            }
            Some(_) => {}
            None if recorded.grant.is_none() && !observed.grants.iter().any(|g| claim.owns(g)) => {
                if !observed.fresh {
                    return Plan::ListAgain;
                }
                return Plan::Refuse(Outcome::Stalled {
                    reason: reasons::IMPORTED_GRANT_NOT_FOUND,
                    message: format!(
                        "spec.importGrantId {import} is not a grant on key {}; fix the ID or remove the field to create a grant",
                        desired.key_id
                    ),
                });
            }
            None => {}
        }
    }
    let owned: Vec<&Grant> = observed
        .grants
        .iter()
        .chain(
            observed
                .elsewhere
                .iter()
                .filter(|g| *g.key_id != *desired.key_id),
        )
        .filter(|g| claim.owns(g))
        .collect();
    let recorded_id = recorded.grant.map(|g| g.grant_id.as_str());
    // Prefer what status records, then the imported grant, then the oldest: every process
    // picks the same one.
    let keep = owned
        .iter()
        .filter(|g| claim.keeps(desired, g))
        .min_by_key(|g| {
            (
                Some(g.grant_id.as_str()) != recorded_id,
                Some(g.grant_id.as_str()) != claim.import,
                g.created_at_millis.unwrap_or(i64::MAX),
                g.grant_id.clone(),
            )
        });
    if let Some(keep) = keep {
        let adopted = recorded_id != Some(keep.grant_id.as_str());
        let revoke: Vec<GrantRef> = owned
            .iter()
            .filter(|g| g.grant_id != keep.grant_id)
            .map(|g| gref(g))
            .collect();
        let keep = (*keep).clone();
        return if revoke.is_empty() {
            Plan::InSync { keep, adopted }
        } else {
            Plan::RevokeExtras {
                keep,
                adopted,
                revoke,
            }
        };
    }
    let recorded_missing = recorded_id.is_some_and(|id| !owned.iter().any(|g| g.grant_id == id));
    if recorded_missing && !observed.fresh {
        // Believe a grant is gone only from a fresh list: a snapshot can be older than it.
        return Plan::ListAgain;
    }
    Plan::Create {
        recreate: recorded_missing && owned.is_empty(),
        replaces: owned.iter().map(|g| gref(g)).collect(),
    }
}

/// A second live cluster writing grants under this object's identity (the same cluster name).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecondWriter {
    /// The grants of the identity it made (newest first): never kept, adopted or revoked here.
    pub foreign: Vec<Grant>,
    /// The duplicate this cluster revoked before they appeared.
    pub revoked: String,
}

/// Whether another live cluster writes grants under this object's identity.
///
/// The signature: after this cluster revoked a grant of the identity as a duplicate
/// (`status.revokedDuplicate`), a grant of the identity appears that status does not record and
/// that was created on the cloud after everything the listing behind that revoke held. This
/// cluster never made it: every grant it created before the revoke was in that listing (a create
/// whose answer was lost included: its key is listed afresh before anything is written there
/// again), and it creates nothing while a revoke is on record (the record is cleared first, see
/// [`decide`]). Both times are the cloud's, so the operator's clock and its skew play no part,
/// nor does a leader change or a restart (the record is in status). A rebuilt cluster never
/// matches: its objects start without a record, and it adopts what it finds.
pub fn second_writer(
    identity: &Identity,
    grants: &[Grant],
    recorded: Option<&str>,
    revoked: Option<&RevokedDuplicate>,
) -> Option<SecondWriter> {
    let revoked = revoked?;
    let listed_until = super::conditions::rfc3339_millis(&revoked.listed_until)?;
    let mut foreign: Vec<Grant> = grants
        .iter()
        .filter(|g| g.name.as_deref() == Some(identity.name.as_str()))
        .filter(|g| Some(g.grant_id.as_str()) != recorded && g.grant_id != revoked.grant_id)
        .filter(|g| g.created_at_millis.is_some_and(|at| at > listed_until))
        .cloned()
        .collect();
    if foreign.is_empty() {
        return None;
    }
    foreign.sort_by_key(|g| std::cmp::Reverse(g.created_at_millis));
    Some(SecondWriter {
        foreign,
        revoked: revoked.grant_id.clone(),
    })
}

/// The record of a revoke of duplicates, decided from `listed`: `None` when the listing has no
/// creation times to bound it by (then nothing can be detected later).
pub fn revoked_duplicate(grant_id: &str, listed: &[Grant]) -> Option<RevokedDuplicate> {
    let newest = listed.iter().filter_map(|g| g.created_at_millis).max()?;
    Some(RevokedDuplicate {
        grant_id: grant_id.to_owned(),
        listed_until: super::conditions::millis_rfc3339_exact(newest)?,
        revoked_at: None,
    })
}

/// The condition while a second live cluster writes under this object's identity.
pub fn cluster_name_in_use(identity: &Identity, conflict: &SecondWriter) -> Outcome {
    let foreign: Vec<&str> = conflict
        .foreign
        .iter()
        .map(|g| g.grant_id.as_str())
        .collect();
    Outcome::Stalled {
        reason: reasons::CLUSTER_NAME_IN_USE,
        message: format!(
            "grant {} carries this object's identity {} but this cluster did not create it: it appeared after this cluster revoked {} as a duplicate, so another live cluster runs with the same --cluster-name. No grant of this identity is revoked until that stops (the grant this cluster recorded is kept, the other cluster's is left alone). Fix: give every live cluster its own --cluster-name (Helm value clusterName) and restart that operator; then revoke the grants the renamed cluster left under the old name ({}). The condition clears once no such grant remains",
            foreign[0],
            identity.name,
            conflict.revoked,
            foreign.join(", ")
        ),
    }
}

/// The guardrail `allowedKeyIds` for the key an alias resolved to: `None` when allowed. The
/// admission policy cannot resolve aliases, so this is the only check such a key gets. A grant the
/// object already holds on another key stays there.
pub fn resolved_key_allowed(
    alias: &str,
    key_id: &str,
    config_name: &str,
    config: &KmsProviderConfigSpec,
) -> Option<Outcome> {
    let allowed = config.allowed_key_ids.as_ref()?;
    if allowed.iter().any(|k| k == key_id) {
        return None;
    }
    Some(Outcome::Stalled {
        reason: reasons::KEY_NOT_ALLOWED,
        message: format!(
            "spec.keyRef.alias {alias} resolves to key {key_id}, which is not in allowedKeyIds of KmsProviderConfig {config_name:?}; ask the platform team to allow it, or point the alias at an allowed key"
        ),
    })
}

/// The condition for an alias KMS does not know (`describe-key` answered "not found"). Aliases
/// move (between the two `update-key-alias` calls of a move the alias names no key), so this is
/// retried with backoff, and a grant the object holds (on `current_key`) is kept meanwhile.
pub fn alias_not_found(alias: &str, current_key: Option<&str>) -> Outcome {
    let kept = match current_key {
        Some(key_id) => format!("; the grant on key {key_id} is kept meanwhile"),
        None => String::new(),
    };
    Outcome::Progressing {
        reason: reasons::ALIAS_NOT_FOUND,
        message: format!(
            "spec.keyRef.alias {alias} names no key in this project (describe-key: not found); create the alias with update-key-alias or create-key, or fix spec.keyRef.alias; retrying{kept}"
        ),
    }
}

/// Whether grants can be made on the key an alias resolved to: [`key_usable`], with a message
/// that names the alias as well.
pub fn alias_key_usable(alias: &str, info: &KeyInfo) -> Option<Outcome> {
    let prefix = format!(
        "spec.keyRef.alias {alias} resolves to key {}: ",
        info.key_id
    );
    match key_usable(&info.key_id, info)? {
        Outcome::Stalled { reason, message } => Some(Outcome::Stalled {
            reason,
            message: prefix + &message,
        }),
        Outcome::Progressing { reason, message } => Some(Outcome::Progressing {
            reason,
            message: prefix + &message,
        }),
        ready @ Outcome::Ready { .. } => Some(ready),
    }
}

/// The condition while a key's listing returns grants without their names: ownership is read
/// from names, so nothing is adopted, replaced or revoked by name there. Fixed on the cloud's
/// side, never by the operator; the message says how to show it.
pub fn names_not_returned(key_id: &str, grant_id: &str, deleting: bool) -> Outcome {
    let waits = if deleting {
        format!(
            "; deletion waits so that no grant of this object is left unseen (or revoke its grants on the key by hand and remove the finalizer {FINALIZER})"
        )
    } else {
        String::new()
    };
    Outcome::Stalled {
        reason: reasons::GRANT_NAMES_NOT_RETURNED,
        message: format!(
            "list-grants on key {key_id} returned grant {grant_id}, which this operator created under a name, without any name: this account does not return grant names, so no grant on the key is adopted, replaced or revoked by name until it does{waits}. Fix: run `kmsgrant-operator live-test` against the account (docs/live-test.md) and send its report to the cloud's support and to kmsgrant-operator"
        ),
    }
}

/// The condition for a key the project does not have.
pub fn key_not_found(key_id: &str) -> Outcome {
    Outcome::Stalled {
        reason: reasons::KEY_NOT_FOUND,
        message: format!("key {key_id} does not exist in this project; fix spec.keyId"),
    }
}

/// Whether grants can be made on the key: `None` when they can.
pub fn key_usable(key_id: &str, info: &KeyInfo) -> Option<Outcome> {
    if info.is_default_master_key() {
        return Some(Outcome::Stalled {
            reason: reasons::DEFAULT_KEY_NOT_GRANTABLE,
            message: format!(
                "key {key_id} is a Default Master Key ({}), which KMS never grants; use a customer master key",
                info.key_alias
            ),
        });
    }
    let waiting = |reason, what: &str| {
        Some(Outcome::Progressing {
            reason,
            message: format!("key {key_id} is {what}; retrying until it is enabled"),
        })
    };
    match info.state {
        KeyState::Enabled => None,
        KeyState::Disabled => waiting(reasons::KEY_DISABLED, "disabled"),
        KeyState::PendingDeletion => {
            waiting(reasons::KEY_PENDING_DELETION, "scheduled for deletion")
        }
        _ => waiting(reasons::KEY_NOT_ENABLED, "not enabled"),
    }
}

/// The condition for a failed KMS call: the one mapping both controllers use.
pub fn failure_outcome(err: &KmsError) -> Outcome {
    let message = format!("{err}");
    match (err.class(), err.reason) {
        (ErrorClass::OutcomeUnknown, _) => Outcome::Progressing {
            reason: reasons::OUTCOME_UNKNOWN,
            message: format!("{message}; listing the key's grants before writing again"),
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
            message: with_fix(message, reason),
        },
        (_, reason) => Outcome::Stalled {
            reason: reason.as_str(),
            message: with_fix(message, reason),
        },
    }
}

/// The message with the fix its reason calls for, so a condition says what to do.
fn with_fix(message: String, reason: ErrorReason) -> String {
    match super::fixes::fix_for_reason(reason) {
        Some(fix) => format!("{message}; fix: {fix}"),
        None => message,
    }
}

/// Whether an error is the KMS itself speaking (its error body), not a proxy or a wrong URL.
pub fn answered_by_kms(err: &KmsError) -> bool {
    err.code.as_deref().is_some_and(|c| c.starts_with("KMS."))
}

/// When to look at an object again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Requeue {
    /// In sync: at the next (jittered) resync.
    Resync,
    /// A person must act: after `--stalled-retry`, or when something changes.
    StalledRetry,
    /// A write's outcome is unknown: list and decide again at once.
    Soon,
    /// Transient trouble: per-object exponential backoff.
    Backoff,
    /// At once: the pass only prepared the next one (a list to take afresh).
    Now,
    /// When the object changes (its finalizer's watch event; nothing else to do).
    AwaitChange,
    /// After this long: what the pass waits for is due then (a cleanup's fresh list).
    After(Duration),
}

pub fn requeue(outcome: &Outcome) -> Requeue {
    match outcome {
        Outcome::Ready { .. } => Requeue::Resync,
        Outcome::Stalled { .. } => Requeue::StalledRetry,
        Outcome::Progressing { reason, .. }
            if *reason == reasons::OUTCOME_UNKNOWN || *reason == reasons::REPLACING =>
        {
            Requeue::Soon
        }
        Outcome::Progressing { .. } => Requeue::Backoff,
    }
}

/// Whether `status` says something `previous` (the object's current status) does not. The
/// create answer carries only the grant's ID, so `issuingPrincipal` and `createdAt` of a grant
/// we created are known from the next listing of its key: filling them in for the same grant is
/// no reason to write by itself (it would cost every object a second write after converging);
/// they go with the next write that is made anyway, at the latest the `lastSyncTime` refresh.
pub fn status_changed(status: &KmsGrantStatus, previous: &KmsGrantStatus) -> bool {
    let mut compared = status.clone();
    if compared.grant_id == previous.grant_id {
        if previous.issuing_principal.is_none() {
            compared.issuing_principal = None;
        }
        if previous.created_at.is_none() {
            compared.created_at = None;
        }
    }
    compared != *previous
}

/// A KMS failure during deletion, as the condition that says deletion waits.
pub fn cleanup_failure_outcome(err: &KmsError) -> Outcome {
    match failure_outcome(err) {
        Outcome::Stalled { reason, message } => Outcome::Stalled {
            reason,
            message: format!("cannot clean up: {message}"),
        },
        other => other,
    }
}

/// When a deletion that has to wait is tried again: never parked for the stalled interval, since
/// a fix (credentials, a config pointed back) should release it soon.
pub fn cleanup_requeue(outcome: &Outcome) -> Requeue {
    match requeue(outcome) {
        Requeue::Soon => Requeue::Soon,
        _ => Requeue::Backoff,
    }
}

/// What deletion removes from the cloud, from a fresh list of every key the object used.
pub fn cleanup_targets(
    policy: DeletionPolicy,
    claim: Claim<'_>,
    listed: &[Grant],
    superseded: Option<&GrantRef>,
) -> Vec<(GrantRef, DeletionPolicy)> {
    listed
        .iter()
        .filter(|g| claim.owns(g))
        .filter_map(|g| {
            let replaced = superseded.is_some_and(|s| s.grant_id == g.grant_id);
            match (policy, replaced) {
                // A grant already replaced is revoked whatever the policy says of the current one.
                (_, true) => Some((gref(g), DeletionPolicy::Revoke)),
                (DeletionPolicy::Orphan, false) => None,
                (how, false) => Some((gref(g), how)),
            }
        })
        .collect()
}

/// The account (endpoint and project) a provider config reaches; grants and caches are keyed by
/// it, never by a config's name.
pub fn account(endpoint: &str, project_id: &str) -> String {
    format!("{} {project_id}", endpoint.trim_end_matches('/'))
}

// ---------------------------------------------------------------------------------------------
// One reconcile's decision: from the object and what was observed, everything the pass does.
// ---------------------------------------------------------------------------------------------

/// What one reconcile saw before deciding (read by [`super::observe`]).
pub enum Observation {
    /// Never stored (no UID): nothing to do.
    Unstored,
    /// Deleted and no longer held by our finalizer: nothing to do.
    Released,
    /// Alive but without the finalizer it wants: nothing is read or written on KMS before
    /// deletion is sure to wait for it.
    NeedsFinalizer,
    /// Deleted and held by our finalizer: the object's grants, listed afresh where they can be.
    Deleting(Result<Deleting, Stop>),
    /// Alive: the provider, the key and the grants on it, or why the object cannot go on.
    Live(Result<Box<Live>, Stop>),
}

/// Why a reconcile could not see everything it needs.
#[derive(Debug)]
pub enum Stop {
    /// The object cannot go on now; the condition says why (not an error of the operator).
    Halted(Outcome),
    /// A KMS call failed.
    Kms(KmsError),
}

/// An alive object's world.
pub struct Live {
    pub identity: Identity,
    pub client: KmsClient,
    /// The account the provider config reaches.
    pub account: String,
    /// The spec's key on that account, and its description.
    pub key: KeyRef,
    pub key_info: Result<KeyInfo, KmsError>,
    /// `spec.importGrantId`, admitted by the guardrails.
    pub import: Option<String>,
    /// Every grant on the key, and whether they can be believed about what they lack (see
    /// [`Observed::fresh`]).
    pub grants: Arc<Vec<Grant>>,
    pub fresh: bool,
    /// Grants on keys the object used before on this account (a key change in progress).
    pub elsewhere: Vec<Grant>,
    /// The replaced grant on another account (the config was pointed elsewhere), seen there.
    pub superseded_elsewhere: Option<Place>,
    /// A grant recorded by its name that a listing of the key (or of a key the object used
    /// before) returned without one: the account does not return names (see
    /// [`super::identity::NamesListed`]).
    pub names_missing: Option<String>,
}

/// A deleted object's grants, place by place.
pub struct Deleting {
    pub identity: Identity,
    pub places: Vec<(CleanupPlace, Place)>,
    /// A key where the account lists grants without their names, and the grant that showed it.
    pub names_missing: Option<(String, String)>,
}

/// What was found on one key of one account, listed afresh.
pub enum Place {
    Listed {
        client: KmsClient,
        key: KeyRef,
        grants: Arc<Vec<Grant>>,
    },
    /// Deletions on the key are still coming in, so the walk that counts for this one is not
    /// made yet: the grants as known, which may miss one whose create answer was lost. What they
    /// hold is removed now; the object is released only from a fresh list, when that walk wakes
    /// it or at the latest after `retry`.
    Known {
        client: KmsClient,
        key: KeyRef,
        grants: Arc<Vec<Grant>>,
        retry: Duration,
    },
    /// KMS says the key does not exist: its grants went with it.
    KeyGone,
    /// No provider config reaches the account any more.
    Unreachable { account: String },
    /// The lookup cannot work (credentials, permissions) where only a lost answer could have
    /// left a grant: told, and deletion goes on.
    LookupFailed { key_id: String, error: KmsError },
}

/// An event to publish: type, reason, note.
pub type PendingEvent = (EventType, &'static str, String);

/// Which kind of pass, for how its end is reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pass {
    /// Nothing to do.
    Idle,
    /// The object is alive: status and conditions tell where it stands.
    Live,
    /// The object is being deleted: the finalizer goes once its grants are gone.
    Deleting,
}

/// A write on KMS (or on what the operator remembers of it), carried out in order by
/// [`super::execute`]; the first that fails ends the sequence.
pub enum Step {
    /// The snapshot may be stale: the next reader of the key lists it afresh.
    ListAfresh(KeyRef),
    /// Create the desired grant and record it.
    Create {
        client: KmsClient,
        key: KeyRef,
        desired: DesiredGrant,
        why: CreateWhy,
    },
    /// Revoke one of the object's grants (replaced, duplicate, on an old key or account).
    Revoke {
        client: KmsClient,
        key: KeyRef,
        target: GrantRef,
    },
    /// Revoke or retire what deletion removes on one key.
    Remove {
        client: KmsClient,
        key: KeyRef,
        targets: Vec<(GrantRef, DeletionPolicy)>,
    },
    /// Record the grant the object keeps.
    Keep(Grant),
    /// Record the grant being replaced on the old key (revoked in the next pass).
    Supersede(GrantRef),
    /// The replaced grant is gone: forget it.
    ForgetSuperseded,
    /// Tell people, once the steps before it are done.
    Tell(PendingEvent),
    /// Record the duplicate just revoked (`status.revokedDuplicate`), once the revokes before
    /// it succeeded.
    RecordRevokedDuplicate(RevokedDuplicate),
    /// Tell people, and count, that another live cluster runs with this cluster's name.
    ClusterNameInUse(PendingEvent),
}

/// Why a grant is created: it says so in the event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CreateWhy {
    /// The object has none yet.
    New,
    /// Status named a grant the cloud no longer has (drift).
    Recreate,
    /// The spec, or the key its alias names, changed: this one replaces `old`.
    Replace { old: String },
}

/// How the pass ends when every step succeeded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ending {
    /// Nothing to write to status.
    Quiet,
    /// Ready with the grant kept or created.
    InSync,
    /// Created the replacement on a new key; the old one goes in the next pass.
    Replacing,
    /// As decided.
    Outcome(Outcome),
}

/// Everything one pass does, decided before anything is written.
pub struct Decision {
    pub pass: Pass,
    /// The finalizer, when it must change; applied once the steps succeeded.
    pub finalizer: Option<bool>,
    pub steps: Vec<Step>,
    /// The status the steps record into (written unless the pass ends quietly).
    pub status: KmsGrantStatus,
    /// The account grants are recorded on.
    pub account: Option<String>,
    pub ending: Ending,
    pub requeue: Requeue,
    /// Events decided up front (an adoption).
    pub events: Vec<PendingEvent>,
    /// What a failed KMS step means for the object.
    pub on_failure: fn(&KmsError) -> Outcome,
    /// When a failed pass is tried again.
    pub retry: fn(&Outcome) -> Requeue,
}

impl Decision {
    /// The provider config whose KMS account the steps write to, if they write at all: what the
    /// fair gate shares out.
    pub fn kms_lane(&self) -> Option<&str> {
        self.steps.iter().find_map(|step| match step {
            Step::Create { key, .. } | Step::Revoke { key, .. } | Step::Remove { key, .. } => {
                Some(key.provider.as_str())
            }
            _ => None,
        })
    }

    fn idle() -> Self {
        Self {
            pass: Pass::Idle,
            finalizer: None,
            steps: Vec::new(),
            status: KmsGrantStatus::default(),
            account: None,
            ending: Ending::Quiet,
            requeue: Requeue::AwaitChange,
            events: Vec::new(),
            on_failure: failure_outcome,
            retry: requeue,
        }
    }
}

/// Decides one pass for `object` from what was observed.
pub fn decide(object: &KmsGrant, observed: Observation) -> Decision {
    match observed {
        Observation::Unstored | Observation::Released => Decision::idle(),
        // The finalizer's watch event brings the object back.
        Observation::NeedsFinalizer => Decision {
            pass: Pass::Live,
            finalizer: Some(true),
            ..Decision::idle()
        },
        Observation::Deleting(seen) => decide_deletion(object, seen),
        Observation::Live(seen) => decide_live(object, seen),
    }
}

fn decide_live(object: &KmsGrant, seen: Result<Box<Live>, Stop>) -> Decision {
    let mut status = object.status.clone().unwrap_or_default();
    let has_finalizer = object.finalizers().iter().any(|f| f == FINALIZER);
    let wants_finalizer =
        object.spec.deletion_policy != DeletionPolicy::Orphan || status.superseded_grant.is_some();
    let mut decision = Decision {
        pass: Pass::Live,
        finalizer: (wants_finalizer != has_finalizer).then_some(wants_finalizer),
        ..Decision::idle()
    };
    if wants_finalizer && !has_finalizer {
        // Nothing is written on KMS before deletion is sure to wait for it; the finalizer's
        // watch event brings the object back.
        return decision;
    }
    let live = match seen {
        Ok(live) => *live,
        Err(stop) => {
            decision.status = status;
            decision.ending = Ending::Outcome(match stop {
                Stop::Halted(outcome) => outcome,
                Stop::Kms(err) => failure_outcome(&err),
            });
            decision.requeue = decision_requeue(&decision.ending);
            return decision;
        }
    };
    if status.grant_id.is_none() {
        // status.keyId names the key in use, before a grant exists too.
        status.key_id = Some(live.key.key_id.clone());
    }
    let unusable = match &live.key_info {
        Ok(info) => match object.spec.key_alias() {
            Some(alias) => alias_key_usable(alias, info),
            None => key_usable(&live.key.key_id, info),
        },
        Err(err) if err.reason == ErrorReason::KeyNotFound => Some(key_not_found(&live.key.key_id)),
        Err(err) => Some(failure_outcome(err)),
    };
    if let Some(outcome) = unusable {
        decision.status = status;
        decision.requeue = requeue(&outcome);
        decision.ending = Ending::Outcome(outcome);
        return decision;
    }
    if let Some(grant_id) = &live.names_missing {
        // Ownership cannot be read from names here: neither adopt nor revoke, nor create a
        // grant no later pass could find again.
        let outcome = names_not_returned(&live.key.key_id, grant_id, false);
        decision.status = status;
        decision.requeue = requeue(&outcome);
        decision.ending = Ending::Outcome(outcome);
        return decision;
    }
    replaced_by_account_change(&mut status, &live.account);
    let desired = DesiredGrant {
        // The spec's key, or the key its alias resolved to.
        key_id: live.key.key_id.clone(),
        ..DesiredGrant::of(&object.spec, &live.identity)
    };
    let claim = Claim {
        identity: &live.identity,
        import: live.import.as_deref(),
    };
    let recorded = recorded_grant(&status, &live.key.key_id);
    let recorded_id = recorded.as_ref().map(|r| r.grant_id.as_str());
    // A second live cluster's grants are not this object's to keep, adopt or revoke.
    let conflict = second_writer(
        &live.identity,
        &live.grants,
        recorded_id,
        status.revoked_duplicate.as_deref(),
    );
    let without_foreign: Vec<Grant>;
    let grants: &[Grant] = match &conflict {
        Some(conflict) => {
            without_foreign = live
                .grants
                .iter()
                .filter(|g| !conflict.foreign.iter().any(|f| f.grant_id == g.grant_id))
                .cloned()
                .collect();
            &without_foreign
        }
        None => &live.grants,
    };
    let next = plan(
        &desired,
        claim,
        Observed {
            grants,
            fresh: live.fresh,
            elsewhere: &live.elsewhere,
        },
        Recorded {
            grant: recorded.as_ref(),
        },
    );
    if conflict.is_none()
        && status.revoked_duplicate.is_some()
        && matches!(next, Plan::Create { .. })
    {
        // Nothing is created while a revoke is on record: a grant this cluster made after it
        // (its answer lost) would look like another cluster's. The record goes first.
        status.revoked_duplicate = None;
        decision.status = status;
        decision.ending = Ending::Outcome(Outcome::Progressing {
            reason: reasons::CREATING,
            message: "creating a grant for this object".to_owned(),
        });
        decision.requeue = Requeue::Now;
        return decision;
    }
    let revoke = |target: &GrantRef| Step::Revoke {
        client: live.client.clone(),
        key: KeyRef {
            key_id: target.key_id.clone(),
            ..live.key.clone()
        },
        target: target.clone(),
    };
    let mut steps = Vec::new();
    let mut ending = Ending::InSync;
    match next {
        Plan::ListAgain => {
            steps.push(Step::ListAfresh(live.key.clone()));
            decision.steps = steps;
            decision.requeue = Requeue::Now;
            return decision;
        }
        Plan::Refuse(outcome) => ending = Ending::Outcome(outcome),
        Plan::InSync { keep, adopted } => {
            decision.events.extend(adoption(adopted, &keep));
            steps.push(Step::Keep(keep));
        }
        Plan::RevokeExtras {
            keep,
            adopted,
            revoke: extras,
        } => {
            decision.events.extend(adoption(adopted, &keep));
            steps.extend(extras.iter().map(revoke));
            steps.push(Step::Keep(keep));
        }
        Plan::Create { replaces, recreate } => {
            let why = match (replaces.first(), recreate) {
                (_, true) => CreateWhy::Recreate,
                (Some(old), false) => CreateWhy::Replace {
                    old: old.grant_id.clone(),
                },
                (None, false) => CreateWhy::New,
            };
            let (on_other_keys, on_this_key): (Vec<&GrantRef>, Vec<&GrantRef>) = replaces
                .iter()
                .partition(|old| old.key_id != live.key.key_id);
            // A grant on another key is found again only through status, which records one
            // (`supersededGrant`): the one it records now, else the first. Any other there (the
            // grant a previous key change superseded and could not revoke yet) is revoked before
            // the create: the recorded grant still gives access meanwhile, and a revoke that
            // fails leaves status as it was, so nothing is forgotten.
            let superseded = on_other_keys
                .iter()
                .find(|old| Some(&old.grant_id) == recorded.as_ref().map(|r| &r.grant_id))
                .or(on_other_keys.first())
                .copied();
            if let Some(kept) = superseded {
                steps.extend(
                    on_other_keys
                        .iter()
                        .filter(|old| old.grant_id != kept.grant_id)
                        .map(|old| revoke(old)),
                );
            }
            steps.push(Step::Create {
                client: live.client.clone(),
                key: live.key.clone(),
                desired: desired.clone(),
                why,
            });
            match superseded {
                // Recorded, and revoked (with any other) in the next pass.
                Some(old_key) => {
                    steps.push(Step::Supersede(old_key.clone()));
                    ending = Ending::Replacing;
                }
                None => steps.extend(on_this_key.into_iter().map(revoke)),
            }
        }
    }
    match &conflict {
        // While another cluster writes under the identity, the first revoke stays the record.
        Some(conflict) => {
            if ending == Ending::InSync {
                let outcome = cluster_name_in_use(&live.identity, conflict);
                let told = object
                    .status
                    .as_ref()
                    .is_some_and(|s| s.conditions.iter().any(|c| c.reason == outcome.reason()));
                if !told {
                    steps.push(Step::ClusterNameInUse((
                        EventType::Warning,
                        reasons::CLUSTER_NAME_IN_USE,
                        outcome.message().to_owned(),
                    )));
                }
                ending = Ending::Outcome(outcome);
            }
        }
        None => {
            let duplicate = steps.iter().find_map(|step| match step {
                Step::Revoke { target, .. }
                    if target.key_id == live.key.key_id
                        && Some(target.grant_id.as_str()) != recorded_id =>
                {
                    Some(target.grant_id.as_str())
                }
                _ => None,
            });
            if let Some(record) =
                duplicate.and_then(|grant_id| revoked_duplicate(grant_id, &live.grants))
            {
                steps.push(Step::RecordRevokedDuplicate(record));
            }
        }
    }
    if ending == Ending::InSync
        && let Some(old) = &status.superseded_grant
    {
        match &live.superseded_elsewhere {
            // Listed with the object's other grants and revoked, or gone.
            None => steps.push(Step::ForgetSuperseded),
            Some(
                Place::Listed {
                    client,
                    key,
                    grants,
                }
                | Place::Known {
                    client,
                    key,
                    grants,
                    ..
                },
            ) => {
                if let Some(grant) = grants
                    .iter()
                    .find(|g| g.grant_id == old.grant_id && claim.owns(g))
                {
                    steps.push(Step::Revoke {
                        client: client.clone(),
                        key: key.clone(),
                        target: gref(grant),
                    });
                }
                steps.push(Step::ForgetSuperseded);
            }
            Some(Place::KeyGone) => steps.push(Step::ForgetSuperseded),
            Some(Place::Unreachable { account }) => {
                ending = Ending::Outcome(unreachable_account(&old.grant_id, account));
            }
            Some(Place::LookupFailed { error, .. }) => {
                ending = Ending::Outcome(failure_outcome(error));
            }
        }
    }
    decision.status = status;
    decision.account = Some(live.account.clone());
    decision.steps = steps;
    decision.requeue = match &ending {
        // Looked at again at every resync, so that it clears once the other grants are gone.
        Ending::Outcome(outcome) if outcome.reason() == reasons::CLUSTER_NAME_IN_USE => {
            Requeue::Resync
        }
        ending => decision_requeue(ending),
    };
    decision.ending = ending;
    decision
}

/// When to come back after a pass that ends as decided.
fn decision_requeue(ending: &Ending) -> Requeue {
    match ending {
        Ending::Quiet => Requeue::AwaitChange,
        Ending::InSync => Requeue::Resync,
        Ending::Replacing => Requeue::Soon,
        Ending::Outcome(outcome) => requeue(outcome),
    }
}

fn adoption(adopted: bool, grant: &Grant) -> Option<PendingEvent> {
    adopted.then(|| {
        (
            EventType::Normal,
            "GrantAdopted",
            format!(
                "adopted grant {} ({}) on key {}",
                grant.grant_id,
                grant.name.as_deref().unwrap_or_default(),
                grant.key_id
            ),
        )
    })
}

/// A grant recorded on another account (the config was pointed elsewhere) is replaced: it is
/// revoked there once the new one is in place.
pub fn replaced_by_account_change(status: &mut KmsGrantStatus, account: &str) {
    if status.grant_id.is_some()
        && status.account.as_deref().is_some_and(|a| a != account)
        && status.superseded_grant.is_none()
    {
        status.superseded_grant = status.grant_id.clone().map(|grant_id| {
            Box::new(GrantRef {
                key_id: status.key_id.clone().unwrap_or_default(),
                grant_id,
                account: status.account.clone(),
            })
        });
        status.grant_id = None;
    }
}

/// The grant status records, on the key it records (the spec's, from older versions).
pub fn recorded_grant(status: &KmsGrantStatus, spec_key_id: &str) -> Option<GrantRef> {
    status.grant_id.clone().map(|grant_id| GrantRef {
        key_id: status
            .key_id
            .clone()
            .unwrap_or_else(|| spec_key_id.to_owned()),
        grant_id,
        account: None,
    })
}

/// The condition while a replaced grant waits on an account no config reaches.
pub fn unreachable_account(grant_id: &str, account: &str) -> Outcome {
    Outcome::Progressing {
        reason: reasons::GRANT_ACCOUNT_UNREACHABLE,
        message: format!(
            "grant {grant_id} lives on account {account:?}, which no Ready KmsProviderConfig reaches any more; point one at it so the grant can be revoked there, or remove the finalizer {FINALIZER} to leave the grant in place"
        ),
    }
}

fn decide_deletion(object: &KmsGrant, seen: Result<Deleting, Stop>) -> Decision {
    let status = object.status.clone().unwrap_or_default();
    let mut decision = Decision {
        pass: Pass::Deleting,
        status: status.clone(),
        on_failure: cleanup_failure_outcome,
        retry: cleanup_requeue,
        ..Decision::idle()
    };
    let deleting = match seen {
        Ok(deleting) => deleting,
        Err(stop) => {
            let outcome = match stop {
                Stop::Halted(outcome) => outcome,
                Stop::Kms(err) => cleanup_failure_outcome(&err),
            };
            decision.requeue = cleanup_requeue(&outcome);
            decision.ending = Ending::Outcome(outcome);
            return decision;
        }
    };
    let policy = object.spec.deletion_policy;
    // An import counts only once it was adopted (it passed the guardrails then).
    let import = object
        .spec
        .import_grant_id
        .as_deref()
        .filter(|id| status.grant_id.as_deref() == Some(*id));
    let claim = Claim {
        identity: &deleting.identity,
        import,
    };
    let superseded = status.superseded_grant.as_deref();
    // Grants are found by name for deletion: where names are not returned, whatever carries
    // the object's identity cannot be told from anyone else's. Orphan revokes nothing.
    if let Some((key_id, grant_id)) = &deleting.names_missing
        && (policy != DeletionPolicy::Orphan || superseded.is_some())
    {
        let outcome = names_not_returned(key_id, grant_id, true);
        decision.requeue = cleanup_requeue(&outcome);
        decision.ending = Ending::Outcome(outcome);
        return decision;
    }
    let mut look_again = None;
    for (place, seen) in deleting.places {
        if let Place::Known { retry, .. } = &seen {
            look_again = look_again.max(Some(*retry));
        }
        match seen {
            Place::Listed {
                client,
                key,
                grants,
            }
            | Place::Known {
                client,
                key,
                grants,
                ..
            } => {
                // Another live cluster's grants under the identity are its own to remove.
                let foreign = second_writer(
                    &deleting.identity,
                    &grants,
                    status.grant_id.as_deref(),
                    status.revoked_duplicate.as_deref(),
                )
                .map(|c| c.foreign)
                .unwrap_or_default();
                let targets = cleanup_targets(policy, claim, &grants, superseded)
                    .into_iter()
                    .filter(|(target, _)| !foreign.iter().any(|f| f.grant_id == target.grant_id))
                    .collect();
                decision.steps.push(Step::Remove {
                    targets,
                    client,
                    key,
                });
            }
            Place::KeyGone => {}
            Place::Unreachable { account } => {
                if let Some(grant_id) = &place.recorded_grant {
                    let outcome = unreachable_account(grant_id, &account);
                    decision.requeue = cleanup_requeue(&outcome);
                    decision.ending = Ending::Outcome(outcome);
                    return decision;
                }
            }
            Place::LookupFailed { key_id, error } => decision.events.push((
                EventType::Warning,
                "CleanupLookupFailed",
                format!("could not check key {key_id} for a grant of this object: {error}"),
            )),
        }
    }
    if let Some(retry) = look_again {
        // What is known is removed; the object stays until a fresh list says nothing is left.
        decision.requeue = Requeue::After(retry);
        return decision;
    }
    if policy == DeletionPolicy::Orphan
        && let Some(grant_id) = &status.grant_id
    {
        decision.steps.push(Step::Tell((
            EventType::Normal,
            "GrantOrphaned",
            format!("left grant {grant_id} on the cloud"),
        )));
    }
    decision.finalizer = Some(false);
    decision
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::GranteePrincipalType;
    use kmsgrant_kms::Call;

    const KEY: &str = "bb6a3d22-dc93-47ac-b5bd-88df7ad35f1e";
    const OTHER_KEY: &str = "0d0466b0-e727-4d9c-b35d-f84bb474a37f";
    const MATCHING: &[&str] = &["encrypt-datakey", "describe-key"];
    const OLD: &[&str] = &["describe-key"];

    fn me() -> Identity {
        Identity::new("c1", "team-a", "app", "uid-1")
    }

    fn desired() -> DesiredGrant {
        DesiredGrant {
            key_id: KEY.into(),
            name: me().name,
            grantee_principal: "alice".into(),
            grantee_principal_type: GranteePrincipalType::User,
            operations: [Operation::DescribeKey, Operation::EncryptDatakey].into(),
            retiring_principal: None,
        }
    }

    fn named(id: &str, name: &str, operations: &[&str]) -> Grant {
        Grant {
            key_id: KEY.into(),
            grant_id: id.into(),
            grantee_principal: "alice".into(),
            grantee_principal_type: Some("user".into()),
            operations: operations.iter().map(|s| s.to_string()).collect(),
            issuing_principal: Some("operator".into()),
            created_at_millis: Some(1),
            name: Some(name.into()),
            retiring_principal: None,
        }
    }

    fn mine(id: &str, operations: &[&str]) -> Grant {
        named(id, "k8s/c1/team-a/app", operations)
    }

    fn gref(id: &str) -> GrantRef {
        GrantRef {
            key_id: KEY.into(),
            grant_id: id.into(),
            account: None,
        }
    }

    fn decide(grants: &[Grant], recorded: Option<&GrantRef>, fresh: bool) -> Plan {
        let identity = me();
        plan(
            &desired(),
            Claim {
                identity: &identity,
                import: None,
            },
            Observed {
                grants,
                fresh,
                elsewhere: &[],
            },
            Recorded { grant: recorded },
        )
    }

    fn decide_import(grants: &[Grant], import: &str, fresh: bool) -> Plan {
        let identity = me();
        plan(
            &desired(),
            Claim {
                identity: &identity,
                import: Some(import),
            },
            Observed {
                grants,
                fresh,
                elsewhere: &[],
            },
            Recorded::default(),
        )
    }

    #[test]
    fn matching_owned_grant_needs_no_write_whatever_the_operation_order() {
        let g = mine("a", MATCHING);
        assert_eq!(
            decide(std::slice::from_ref(&g), Some(&gref("a")), false),
            Plan::InSync {
                keep: g,
                adopted: false
            }
        );
    }

    #[test]
    fn first_run_creates_when_the_key_holds_nothing_of_ours() {
        let hand_made = named("x", "made-by-hand", MATCHING);
        assert_eq!(
            decide(&[hand_made], None, false),
            Plan::Create {
                replaces: vec![],
                recreate: false
            }
        );
    }

    #[test]
    fn adopts_its_own_identity_grant_after_a_lost_status_write_or_a_rebuild() {
        let g = mine("a", MATCHING);
        assert_eq!(
            decide(std::slice::from_ref(&g), None, false),
            Plan::InSync {
                keep: g,
                adopted: true
            }
        );
    }

    #[test]
    fn never_adopts_a_grant_named_for_another_object_or_unnamed_even_when_fields_match() {
        let other_namespace = named("b", "k8s/c1/team-b/app", MATCHING);
        let other_cluster = named("c", "k8s/c2/team-a/app", MATCHING);
        let other_uid = named("d", "kmsgrant-uid-2", MATCHING);
        let unnamed = Grant {
            name: None,
            ..mine("e", MATCHING)
        };
        assert_eq!(
            decide(
                &[other_namespace, other_cluster, other_uid, unnamed],
                None,
                true
            ),
            Plan::Create {
                replaces: vec![],
                recreate: false
            }
        );
    }

    #[test]
    fn duplicates_of_its_own_identity_are_revoked_keeping_the_recorded_one() {
        let (a, b) = (mine("a", MATCHING), mine("b", MATCHING));
        assert_eq!(
            decide(&[a.clone(), b.clone()], Some(&gref("b")), false),
            Plan::RevokeExtras {
                keep: b,
                adopted: false,
                revoke: vec![gref("a")]
            }
        );
    }

    #[test]
    fn without_a_record_the_oldest_duplicate_is_kept_by_every_process() {
        let older = Grant {
            created_at_millis: Some(1),
            ..mine("z", MATCHING)
        };
        let newer = Grant {
            created_at_millis: Some(2),
            ..mine("a", MATCHING)
        };
        let plan = decide(&[newer.clone(), older.clone()], None, true);
        assert_eq!(
            plan,
            Plan::RevokeExtras {
                keep: older,
                adopted: true,
                revoke: vec![gref("a")]
            }
        );
    }

    #[test]
    fn a_recorded_grant_missing_from_a_snapshot_is_confirmed_by_a_fresh_list() {
        assert_eq!(decide(&[], Some(&gref("gone")), false), Plan::ListAgain);
        assert_eq!(
            decide(&[], Some(&gref("gone")), true),
            Plan::Create {
                replaces: vec![],
                recreate: true
            }
        );
    }

    #[test]
    fn spec_change_creates_first_and_replaces_the_old_grant() {
        let old = mine("old", OLD);
        assert_eq!(
            decide(std::slice::from_ref(&old), Some(&gref("old")), false),
            Plan::Create {
                replaces: vec![gref("old")],
                recreate: false
            }
        );
    }

    #[test]
    fn after_a_replacing_create_the_old_grant_is_revoked_even_if_status_was_lost() {
        let (old, new) = (mine("old", OLD), mine("new", MATCHING));
        assert_eq!(
            decide(&[old, new.clone()], Some(&gref("old")), false),
            Plan::RevokeExtras {
                keep: new,
                adopted: true,
                revoke: vec![gref("old")]
            }
        );
    }

    #[test]
    fn key_change_creates_on_the_new_key_and_revokes_the_grant_on_the_old_key() {
        let identity = me();
        let on_old_key = Grant {
            key_id: OTHER_KEY.into(),
            ..mine("old", MATCHING)
        };
        let claim = Claim {
            identity: &identity,
            import: None,
        };
        let recorded = GrantRef {
            key_id: OTHER_KEY.into(),
            grant_id: "old".into(),
            account: None,
        };
        let observed = |grants| Observed {
            grants,
            fresh: false,
            elsewhere: std::slice::from_ref(&on_old_key),
        };
        let create = plan(
            &desired(),
            claim,
            observed(&[]),
            Recorded {
                grant: Some(&recorded),
            },
        );
        assert_eq!(
            create,
            Plan::Create {
                replaces: vec![recorded.clone()],
                recreate: false
            }
        );
        let new = mine("new", MATCHING);
        let after = plan(
            &desired(),
            claim,
            observed(std::slice::from_ref(&new)),
            Recorded {
                grant: Some(&gref("new")),
            },
        );
        assert_eq!(
            after,
            Plan::RevokeExtras {
                keep: new,
                adopted: false,
                revoke: vec![recorded]
            }
        );
    }

    #[test]
    fn a_legacy_uid_named_grant_is_migrated_to_an_identity_named_one() {
        let legacy = named("old", "kmsgrant-uid-1", MATCHING);
        assert_eq!(
            decide(std::slice::from_ref(&legacy), Some(&gref("old")), false),
            Plan::Create {
                replaces: vec![gref("old")],
                recreate: false
            }
        );
    }

    #[test]
    fn grants_differing_in_grantee_type_retiring_principal_or_operations_do_not_match() {
        let d = desired();
        assert!(d.fields_match(&mine("a", MATCHING)));
        assert!(!d.fields_match(&Grant {
            grantee_principal_type: Some("domain".into()),
            ..mine("a", MATCHING)
        }));
        assert!(!d.fields_match(&Grant {
            retiring_principal: Some("bob".into()),
            ..mine("a", MATCHING)
        }));
        assert!(!d.fields_match(&mine(
            "a",
            &["describe-key", "encrypt-datakey", "create-grant"]
        )));
        // A cloud that does not report the grantee type means `user`.
        assert!(d.fields_match(&Grant {
            grantee_principal_type: None,
            ..mine("a", MATCHING)
        }));
    }

    #[test]
    fn an_imported_grant_with_matching_fields_is_kept_under_its_own_name() {
        let hand_made = named("h", "made-by-hand", MATCHING);
        assert_eq!(
            decide_import(std::slice::from_ref(&hand_made), "h", false),
            Plan::InSync {
                keep: hand_made,
                adopted: true
            }
        );
    }

    #[test]
    fn changing_an_imported_grant_creates_an_identity_named_one_first() {
        let hand_made = named("h", "made-by-hand", OLD);
        assert_eq!(
            decide_import(std::slice::from_ref(&hand_made), "h", false),
            Plan::Create {
                replaces: vec![gref("h")],
                recreate: false
            }
        );
    }

    #[test]
    fn importing_another_objects_grant_is_refused() {
        let theirs = named("t", "k8s/c1/team-b/app", MATCHING);
        let plan = decide_import(&[theirs], "t", true);
        assert!(
            matches!(&plan, Plan::Refuse(Outcome::Stalled { reason, .. }) if *reason == reasons::IMPORT_REFUSED),
            "{plan:?}"
        );
    }

    #[test]
    fn importing_a_grant_that_is_not_there_stalls_after_a_fresh_look() {
        assert_eq!(decide_import(&[], "nope", false), Plan::ListAgain);
        assert!(matches!(
            decide_import(&[], "nope", true),
            Plan::Refuse(Outcome::Stalled { reason, .. }) if reason == reasons::IMPORTED_GRANT_NOT_FOUND
        ));
    }

    #[test]
    fn a_key_by_alias_is_checked_against_allowed_key_ids_once_resolved() {
        let config = |allowed: serde_json::Value| -> KmsProviderConfigSpec {
            let mut value = serde_json::json!({
                "endpoint": "https://kms", "projectId": "p",
                "auth": {"type": "AccessKey", "secretRef": {"namespace": "s", "name": "n"}}
            });
            if !allowed.is_null() {
                value["allowedKeyIds"] = allowed;
            }
            serde_json::from_value(value).unwrap()
        };
        let only_other = config(serde_json::json!([OTHER_KEY]));
        let refused = resolved_key_allowed("alias/app", KEY, "p", &only_other).unwrap();
        assert_eq!(refused.reason(), reasons::KEY_NOT_ALLOWED);
        assert_eq!(requeue(&refused), Requeue::StalledRetry);
        for part in ["alias/app", KEY, "allowedKeyIds", "\"p\""] {
            assert!(refused.message().contains(part), "{}", refused.message());
        }
        let allowed = config(serde_json::json!([OTHER_KEY, KEY]));
        assert_eq!(resolved_key_allowed("alias/app", KEY, "p", &allowed), None);
        assert_eq!(
            resolved_key_allowed("alias/app", KEY, "p", &config(serde_json::Value::Null)),
            None
        );
    }

    #[test]
    fn an_unknown_alias_is_retried_and_keeps_the_grant_it_names() {
        let waiting = alias_not_found("alias/app", Some(OTHER_KEY));
        assert_eq!(waiting.reason(), reasons::ALIAS_NOT_FOUND);
        assert!(!waiting.is_ready());
        // An alias move passes through "no such alias": backoff, not the stalled interval.
        assert_eq!(requeue(&waiting), Requeue::Backoff);
        for part in ["spec.keyRef.alias alias/app", OTHER_KEY, "kept"] {
            assert!(waiting.message().contains(part), "{}", waiting.message());
        }
        let new = alias_not_found("alias/app", None);
        assert!(!new.message().contains("kept"), "{}", new.message());
    }

    #[test]
    fn a_resolved_key_that_cannot_be_granted_is_reported_with_its_alias() {
        let info = |state, alias: &str| KeyInfo {
            key_id: KEY.into(),
            key_alias: alias.into(),
            domain_id: "d".into(),
            state,
            default_key: false,
        };
        assert_eq!(
            alias_key_usable("alias/app", &info(KeyState::Enabled, "app")),
            None
        );
        for (state, reason) in [
            (KeyState::Disabled, reasons::KEY_DISABLED),
            (KeyState::PendingDeletion, reasons::KEY_PENDING_DELETION),
        ] {
            let outcome = alias_key_usable("alias/app", &info(state, "app")).unwrap();
            assert_eq!(outcome.reason(), reason);
            assert_eq!(requeue(&outcome), Requeue::Backoff);
            assert!(
                outcome.message().starts_with(&format!(
                    "spec.keyRef.alias alias/app resolves to key {KEY}: "
                )),
                "{}",
                outcome.message()
            );
        }
        let default =
            alias_key_usable("alias/obs/default", &info(KeyState::Enabled, "obs/default")).unwrap();
        assert_eq!(default.reason(), reasons::DEFAULT_KEY_NOT_GRANTABLE);
    }

    #[test]
    fn key_usability_names_the_state() {
        let info = |state, alias: &str| KeyInfo {
            key_id: KEY.into(),
            key_alias: alias.into(),
            domain_id: "d".into(),
            state,
            default_key: false,
        };
        assert_eq!(key_usable(KEY, &info(KeyState::Enabled, "a")), None);
        let reason = |i: KeyInfo| key_usable(KEY, &i).unwrap().reason();
        assert_eq!(reason(info(KeyState::Disabled, "a")), reasons::KEY_DISABLED);
        assert_eq!(
            reason(info(KeyState::PendingDeletion, "a")),
            reasons::KEY_PENDING_DELETION
        );
        assert_eq!(
            reason(info(KeyState::Enabled, "a/default")),
            reasons::DEFAULT_KEY_NOT_GRANTABLE
        );
        assert_eq!(key_not_found(KEY).reason(), reasons::KEY_NOT_FOUND);
    }

    fn error(call: Call, reason: ErrorReason, code: Option<&str>) -> KmsError {
        KmsError {
            code: code.map(str::to_owned),
            ..KmsError::new(call, reason, "x".repeat(40 * 1024))
        }
    }

    #[test]
    fn failures_map_to_one_outcome_each_and_requeue_accordingly() {
        let cases = [
            (
                ErrorReason::OutcomeUnknown,
                reasons::OUTCOME_UNKNOWN,
                Requeue::Soon,
            ),
            (
                ErrorReason::ServiceUnavailable,
                reasons::KMS_UNAVAILABLE,
                Requeue::Backoff,
            ),
            (
                ErrorReason::Throttled,
                reasons::KMS_UNAVAILABLE,
                Requeue::Backoff,
            ),
            (
                ErrorReason::GrantQuotaExceeded,
                reasons::GRANT_QUOTA_EXCEEDED,
                Requeue::StalledRetry,
            ),
            (
                ErrorReason::KeyDisabled,
                reasons::KEY_DISABLED,
                Requeue::Backoff,
            ),
            (
                ErrorReason::PermissionDenied,
                "PermissionDenied",
                Requeue::StalledRetry,
            ),
        ];
        for (reason, expected, when) in cases {
            let outcome = failure_outcome(&error(Call::CreateGrant, reason, None));
            assert_eq!(
                (outcome.reason(), requeue(&outcome)),
                (expected, when),
                "{reason:?}"
            );
            // A 40 KiB error_msg still makes a condition of the documented length.
            for condition in super::super::conditions::conditions(&outcome, None, &[], "t") {
                assert_eq!(
                    condition.message.chars().count(),
                    super::super::conditions::MAX_MESSAGE_CHARS
                );
            }
        }
        assert_eq!(
            requeue(&Outcome::Ready {
                reason: reasons::GRANT_READY,
                message: String::new()
            }),
            Requeue::Resync
        );
    }

    #[test]
    fn only_an_answer_with_a_kms_error_body_counts_as_the_kms_speaking() {
        assert!(answered_by_kms(&error(
            Call::ListGrants,
            ErrorReason::KeyNotFound,
            Some("KMS.0207")
        )));
        assert!(!answered_by_kms(&error(
            Call::ListGrants,
            ErrorReason::KeyNotFound,
            None
        )));
        assert!(!answered_by_kms(&error(
            Call::ListGrants,
            ErrorReason::KeyNotFound,
            Some("APIGW.0101")
        )));
    }

    #[test]
    fn deletion_removes_every_owned_grant_by_policy_and_orphan_keeps_all_but_the_replaced() {
        let identity = me();
        let claim = Claim {
            identity: &identity,
            import: None,
        };
        let listed = [
            mine("a", MATCHING),
            mine("dup", MATCHING),
            named("old", "kmsgrant-uid-1", OLD),
            named("theirs", "k8s/c1/team-b/app", MATCHING),
            named("hand", "made-by-hand", MATCHING),
        ];
        let ids = |targets: Vec<(GrantRef, DeletionPolicy)>| {
            targets
                .into_iter()
                .map(|(g, how)| (g.grant_id, how))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            ids(cleanup_targets(
                DeletionPolicy::Retire,
                claim,
                &listed,
                Some(&gref("old"))
            )),
            vec![
                ("a".into(), DeletionPolicy::Retire),
                ("dup".into(), DeletionPolicy::Retire),
                ("old".into(), DeletionPolicy::Revoke)
            ]
        );
        assert_eq!(
            ids(cleanup_targets(
                DeletionPolicy::Orphan,
                claim,
                &listed,
                Some(&gref("old"))
            )),
            vec![("old".into(), DeletionPolicy::Revoke)]
        );
        assert!(cleanup_targets(DeletionPolicy::Orphan, claim, &listed, None).is_empty());
    }

    #[test]
    fn accounts_ignore_a_trailing_slash() {
        assert_eq!(account("https://kms/", "p"), account("https://kms", "p"));
        assert_ne!(account("https://kms", "p"), account("https://kms", "q"));
    }

    #[test]
    fn a_blocked_deletion_is_retried_with_backoff_never_parked() {
        let stalled = Outcome::Stalled {
            reason: reasons::KEY_NOT_ALLOWED,
            message: String::new(),
        };
        assert_eq!(requeue(&stalled), Requeue::StalledRetry);
        assert_eq!(cleanup_requeue(&stalled), Requeue::Backoff);
        let unknown = failure_outcome(&error(Call::CreateGrant, ErrorReason::OutcomeUnknown, None));
        assert_eq!(cleanup_requeue(&unknown), Requeue::Soon);
        let refused = cleanup_failure_outcome(&error(
            Call::RevokeGrant,
            ErrorReason::PermissionDenied,
            Some("KMS.0403"),
        ));
        assert!(
            matches!(&refused, Outcome::Stalled { message, .. } if message.starts_with("cannot clean up: "))
        );
        assert_eq!(cleanup_requeue(&refused), Requeue::Backoff);
    }

    fn written(grant_id: &str) -> KmsGrantStatus {
        KmsGrantStatus {
            grant_id: Some(grant_id.into()),
            key_id: Some("k".into()),
            ..KmsGrantStatus::default()
        }
    }

    #[test]
    fn what_only_a_listing_tells_is_no_reason_to_write_for_the_same_grant() {
        let after_create = written("a");
        let listed = KmsGrantStatus {
            issuing_principal: Some("p".into()),
            created_at: Some("2026-01-01T00:00:00Z".into()),
            ..written("a")
        };
        assert!(!status_changed(&listed, &after_create));
        // Once known, a different value is a change.
        let other = KmsGrantStatus {
            created_at: Some("2026-01-02T00:00:00Z".into()),
            ..listed.clone()
        };
        assert!(status_changed(&other, &listed));
        // Another grant is a change, with whatever it brings.
        assert!(status_changed(
            &KmsGrantStatus {
                grant_id: Some("b".into()),
                ..listed.clone()
            },
            &after_create
        ));
    }
}

/// One pass decided whole, from an object and what was observed.
#[cfg(test)]
mod decision_tests {
    use super::*;
    use crate::api::KmsGrant;
    use kmsgrant_kms::{
        Call, ClientConfig, Credentials, KeyInfo, KeyState, Project, signer::AccessKeyPair,
    };

    const KEY: &str = "bb6a3d22-dc93-47ac-b5bd-88df7ad35f1e";
    const OLD_KEY: &str = "0d0466b0-e727-4d9c-b35d-f84bb474a37f";
    const ACCOUNT: &str = "https://kms p1";
    const MINE: &str = "k8s/c1/team-a/app";

    fn object(extra: serde_json::Value) -> KmsGrant {
        let mut value = serde_json::json!({
            "apiVersion": "kmsgrant.io/v1beta1", "kind": "KmsGrant",
            "metadata": {"name": "app", "namespace": "team-a", "uid": "uid-1",
                         "finalizers": [FINALIZER], "generation": 1},
            "spec": {"providerConfigRef": {"name": "default"}, "keyId": KEY,
                     "granteePrincipal": "alice", "operations": ["describe-key"]}
        });
        merge(&mut value, extra);
        serde_json::from_value(value).unwrap()
    }

    fn merge(into: &mut serde_json::Value, from: serde_json::Value) {
        match (into, from) {
            (serde_json::Value::Object(into), serde_json::Value::Object(from)) => {
                for (k, v) in from {
                    merge(into.entry(k).or_insert(serde_json::Value::Null), v);
                }
            }
            (into, from) => *into = from,
        }
    }

    fn client() -> KmsClient {
        let mut config = ClientConfig::new(
            "http://127.0.0.1:9",
            Project::Id("p1".into()),
            Credentials::AccessKey {
                keys: AccessKeyPair::new("ak", "sk"),
                security_token: None,
            },
        );
        config.allow_http = true;
        KmsClient::new(config).unwrap()
    }

    fn key(key_id: &str) -> KeyRef {
        KeyRef {
            provider: "default".into(),
            account: ACCOUNT.into(),
            key_id: key_id.into(),
        }
    }

    fn grant(id: &str, key_id: &str, name: &str, operations: &[&str]) -> Grant {
        Grant {
            key_id: key_id.into(),
            grant_id: id.into(),
            grantee_principal: "alice".into(),
            grantee_principal_type: Some("user".into()),
            operations: operations.iter().map(|s| s.to_string()).collect(),
            issuing_principal: None,
            created_at_millis: Some(1),
            name: Some(name.into()),
            retiring_principal: None,
        }
    }

    fn enabled() -> Result<KeyInfo, KmsError> {
        Ok(KeyInfo {
            key_id: KEY.into(),
            key_alias: "app".into(),
            domain_id: "d".into(),
            state: KeyState::Enabled,
            default_key: false,
        })
    }

    fn live(grants: Vec<Grant>, fresh: bool) -> Box<Live> {
        Box::new(Live {
            identity: Identity::new("c1", "team-a", "app", "uid-1"),
            client: client(),
            account: ACCOUNT.into(),
            key: key(KEY),
            key_info: enabled(),
            import: None,
            grants: Arc::new(grants),
            fresh,
            elsewhere: Vec::new(),
            superseded_elsewhere: None,
            names_missing: None,
        })
    }

    /// Steps as short labels, to compare order.
    fn steps(decision: &Decision) -> Vec<String> {
        decision
            .steps
            .iter()
            .map(|step| match step {
                Step::ListAfresh(key) => format!("list {}", key.key_id),
                Step::Create { key, why, .. } => format!("create on {} ({why:?})", key.key_id),
                Step::Revoke { target, .. } => format!("revoke {}", target.grant_id),
                Step::Remove { targets, .. } => format!(
                    "remove {}",
                    targets
                        .iter()
                        .map(|(g, how)| format!("{}:{how:?}", g.grant_id))
                        .collect::<Vec<_>>()
                        .join(",")
                ),
                Step::Keep(grant) => format!("keep {}", grant.grant_id),
                Step::Supersede(old) => format!("supersede {}", old.grant_id),
                Step::ForgetSuperseded => "forget superseded".into(),
                Step::Tell((_, reason, _)) => format!("tell {reason}"),
                Step::RecordRevokedDuplicate(revoked) => format!(
                    "record revoked {} listed until {}",
                    revoked.grant_id, revoked.listed_until
                ),
                Step::ClusterNameInUse((_, reason, _)) => format!("tell {reason} and count it"),
            })
            .collect()
    }

    fn outcome_reason(decision: &Decision) -> Option<&'static str> {
        match &decision.ending {
            Ending::Outcome(outcome) => Some(outcome.reason()),
            _ => None,
        }
    }

    #[test]
    fn a_new_object_gets_its_finalizer_before_anything_is_written_on_kms() {
        let new = object(serde_json::json!({"metadata": {"finalizers": []}}));
        for observed in [
            Observation::NeedsFinalizer,
            Observation::Live(Ok(live(vec![], true))),
        ] {
            let decision = decide(&new, observed);
            assert_eq!(decision.finalizer, Some(true));
            assert!(decision.steps.is_empty());
            assert_eq!(decision.ending, Ending::Quiet);
            assert_eq!(decision.requeue, Requeue::AwaitChange);
        }
    }

    #[test]
    fn an_object_holding_its_finalizer_creates_and_ends_in_sync() {
        let decision = decide(
            &object(serde_json::json!({})),
            Observation::Live(Ok(live(vec![], false))),
        );
        assert_eq!(decision.finalizer, None);
        assert_eq!(
            steps(&decision),
            ["create on bb6a3d22-dc93-47ac-b5bd-88df7ad35f1e (New)"]
        );
        assert_eq!(decision.ending, Ending::InSync);
        assert_eq!(decision.requeue, Requeue::Resync);
        assert_eq!(decision.account.as_deref(), Some(ACCOUNT));
    }

    /// An object whose status records "g1" by its name, on a key that lists "g1" and a
    /// duplicate of it without names.
    fn recorded_by_name_listed_unnamed(names_missing: Option<&str>) -> Decision {
        let recorded = object(serde_json::json!({"status": {
            "grantId": "g1", "grantName": MINE, "keyId": KEY, "account": ACCOUNT}}));
        let unnamed = |id: &str| Grant {
            name: None,
            ..grant(id, KEY, MINE, &["describe-key"])
        };
        let mut seen = live(vec![unnamed("g1"), unnamed("duplicate")], true);
        seen.names_missing = names_missing.map(str::to_owned);
        decide(&recorded, Observation::Live(Ok(seen)))
    }

    #[test]
    fn where_names_are_not_returned_nothing_is_adopted_created_or_revoked_and_it_says_why() {
        // What names alone would decide there: the recorded grant looks gone, so a grant is
        // created, and again at every pass, each one unfindable.
        assert_eq!(
            steps(&recorded_by_name_listed_unnamed(None)),
            ["create on bb6a3d22-dc93-47ac-b5bd-88df7ad35f1e (Recreate)"]
        );
        let decision = recorded_by_name_listed_unnamed(Some("g1"));
        assert!(decision.steps.is_empty(), "{:?}", steps(&decision));
        assert!(decision.events.is_empty());
        assert_eq!(
            outcome_reason(&decision),
            Some(reasons::GRANT_NAMES_NOT_RETURNED)
        );
        let Ending::Outcome(Outcome::Stalled { message, .. }) = &decision.ending else {
            panic!("Stalled: a person must act")
        };
        assert!(message.contains("returned grant g1"), "{message}");
        assert!(message.contains("kmsgrant-operator live-test"), "{message}");
        assert_eq!(decision.requeue, Requeue::StalledRetry);
        assert_eq!(
            decision.status.grant_id.as_deref(),
            Some("g1"),
            "status kept"
        );
        assert_eq!(decision.status.grant_name.as_deref(), Some(MINE));
    }

    #[test]
    fn an_orphan_policy_drops_the_finalizer_and_still_converges() {
        let orphan = object(serde_json::json!({"spec": {"deletionPolicy": "Orphan"}}));
        let decision = decide(&orphan, Observation::Live(Ok(live(vec![], true))));
        assert_eq!(decision.finalizer, Some(false));
        assert_eq!(decision.steps.len(), 1);
    }

    #[test]
    fn a_spec_change_creates_the_new_grant_before_it_revokes_the_old() {
        let recorded = object(
            serde_json::json!({"status": {"grantId": "old", "keyId": KEY, "account": ACCOUNT}}),
        );
        let old = grant("old", KEY, MINE, &["describe-key", "encrypt-datakey"]);
        let decision = decide(&recorded, Observation::Live(Ok(live(vec![old], false))));
        assert_eq!(
            steps(&decision),
            [
                "create on bb6a3d22-dc93-47ac-b5bd-88df7ad35f1e (Replace { old: \"old\" })",
                "revoke old"
            ]
        );
        assert_eq!(decision.ending, Ending::InSync);
    }

    #[test]
    fn a_key_change_creates_on_the_new_key_and_leaves_the_old_grant_to_the_next_pass() {
        let moved = object(
            serde_json::json!({"status": {"grantId": "old", "keyId": OLD_KEY, "account": ACCOUNT}}),
        );
        let mut seen = live(vec![], false);
        seen.elsewhere = vec![grant("old", OLD_KEY, MINE, &["describe-key"])];
        let decision = decide(&moved, Observation::Live(Ok(seen)));
        assert_eq!(
            steps(&decision),
            [
                "create on bb6a3d22-dc93-47ac-b5bd-88df7ad35f1e (Replace { old: \"old\" })",
                "supersede old"
            ]
        );
        assert_eq!(decision.ending, Ending::Replacing);
        assert_eq!(decision.requeue, Requeue::Soon);
    }

    #[test]
    fn the_pass_after_a_key_change_revokes_the_old_grant_and_forgets_it() {
        let replacing = object(serde_json::json!({"status": {
            "grantId": "new", "keyId": KEY, "account": ACCOUNT,
            "supersededGrant": {"keyId": OLD_KEY, "grantId": "old"}}}));
        let mut seen = live(vec![grant("new", KEY, MINE, &["describe-key"])], false);
        seen.elsewhere = vec![grant("old", OLD_KEY, MINE, &["describe-key"])];
        let decision = decide(&replacing, Observation::Live(Ok(seen)));
        assert_eq!(
            steps(&decision),
            ["revoke old", "keep new", "forget superseded"]
        );
        assert_eq!(decision.ending, Ending::InSync);
    }

    #[test]
    fn a_second_key_change_before_the_first_old_grant_went_forgets_neither() {
        // Moved from OLD_KEY to KEY_B (the grant there recorded, the old one superseded but not
        // revoked yet), now moved on to KEY.
        const KEY_B: &str = "7c1f3b52-0d5e-4a6b-9c8d-1e2f3a4b5c6d";
        let moving = object(serde_json::json!({"status": {
            "grantId": "b", "keyId": KEY_B, "account": ACCOUNT,
            "supersededGrant": {"keyId": OLD_KEY, "grantId": "old"}}}));
        let mut seen = live(vec![], false);
        seen.elsewhere = vec![
            grant("b", KEY_B, MINE, &["describe-key"]),
            grant("old", OLD_KEY, MINE, &["describe-key"]),
        ];
        let decision = decide(&moving, Observation::Live(Ok(seen)));
        assert_eq!(
            steps(&decision),
            [
                "revoke old",
                "create on bb6a3d22-dc93-47ac-b5bd-88df7ad35f1e (Replace { old: \"b\" })",
                "supersede b"
            ],
            "the grant status records is superseded; the one it can no longer record goes first"
        );
        assert_eq!(decision.ending, Ending::Replacing);
    }

    fn by_alias(extra: serde_json::Value) -> KmsGrant {
        let mut object = object(extra);
        object.spec.key_id = None;
        object.spec.key_ref = Some(Box::new(crate::api::KeyAliasRef {
            alias: "alias/app".into(),
        }));
        object
    }

    #[test]
    fn an_alias_move_is_a_key_change_onto_the_key_observed() {
        // The alias resolved to KEY (observe put it in `live.key`); status holds a grant on the
        // key the alias named before.
        let moved = by_alias(
            serde_json::json!({"status": {"grantId": "old", "keyId": OLD_KEY, "account": ACCOUNT}}),
        );
        let mut seen = live(vec![], false);
        seen.elsewhere = vec![grant("old", OLD_KEY, MINE, &["describe-key"])];
        let decision = decide(&moved, Observation::Live(Ok(seen)));
        assert_eq!(
            steps(&decision),
            [
                "create on bb6a3d22-dc93-47ac-b5bd-88df7ad35f1e (Replace { old: \"old\" })",
                "supersede old"
            ]
        );
        assert_eq!(decision.ending, Ending::Replacing);
        // Until the create is recorded, status still names the old grant on the old key.
        assert_eq!(decision.status.key_id.as_deref(), Some(OLD_KEY));
    }

    #[test]
    fn a_new_object_by_alias_records_the_resolved_key_and_names_the_alias_when_it_cannot_go_on() {
        let new = by_alias(serde_json::json!({}));
        let decision = decide(&new, Observation::Live(Ok(live(vec![], false))));
        assert_eq!(
            steps(&decision),
            ["create on bb6a3d22-dc93-47ac-b5bd-88df7ad35f1e (New)"]
        );
        assert_eq!(decision.status.key_id.as_deref(), Some(KEY));
        let mut seen = live(vec![], true);
        seen.key_info = Ok(KeyInfo {
            state: KeyState::PendingDeletion,
            ..enabled().unwrap()
        });
        let decision = decide(&new, Observation::Live(Ok(seen)));
        assert!(decision.steps.is_empty());
        assert_eq!(
            outcome_reason(&decision),
            Some(reasons::KEY_PENDING_DELETION)
        );
        let Ending::Outcome(outcome) = &decision.ending else {
            panic!("{:?}", decision.ending);
        };
        assert!(
            outcome.message().contains("alias/app"),
            "{}",
            outcome.message()
        );
        // An alias KMS does not know (observed as a halt): nothing written, the grant kept.
        let held = by_alias(
            serde_json::json!({"status": {"grantId": "g", "keyId": KEY, "account": ACCOUNT}}),
        );
        let decision = decide(
            &held,
            Observation::Live(Err(Stop::Halted(alias_not_found("alias/app", Some(KEY))))),
        );
        assert!(decision.steps.is_empty());
        assert_eq!(outcome_reason(&decision), Some(reasons::ALIAS_NOT_FOUND));
        assert_eq!(decision.status.grant_id.as_deref(), Some("g"));
        assert_eq!(decision.requeue, Requeue::Backoff);
    }

    #[test]
    fn a_recorded_grant_missing_from_a_snapshot_is_listed_afresh_before_anything_is_written() {
        let recorded = object(
            serde_json::json!({"status": {"grantId": "gone", "keyId": KEY, "account": ACCOUNT}}),
        );
        let decision = decide(&recorded, Observation::Live(Ok(live(vec![], false))));
        assert_eq!(
            steps(&decision),
            ["list bb6a3d22-dc93-47ac-b5bd-88df7ad35f1e"]
        );
        assert_eq!(decision.ending, Ending::Quiet);
        assert_eq!(decision.requeue, Requeue::Now);
        // From a fresh list, the grant is gone: recreated.
        let decision = decide(&recorded, Observation::Live(Ok(live(vec![], true))));
        assert_eq!(
            steps(&decision),
            ["create on bb6a3d22-dc93-47ac-b5bd-88df7ad35f1e (Recreate)"]
        );
    }

    #[test]
    fn an_unusable_key_halts_with_its_condition_and_nothing_is_written_on_kms() {
        let mut seen = live(vec![], true);
        seen.key_info = Ok(KeyInfo {
            state: KeyState::Disabled,
            ..enabled().unwrap()
        });
        let decision = decide(&object(serde_json::json!({})), Observation::Live(Ok(seen)));
        assert!(decision.steps.is_empty());
        assert_eq!(outcome_reason(&decision), Some(reasons::KEY_DISABLED));
        assert_eq!(decision.requeue, Requeue::Backoff);
        let mut seen = live(vec![], true);
        seen.key_info = Err(KmsError::new(
            Call::DescribeKey,
            ErrorReason::KeyNotFound,
            "x",
        ));
        let decision = decide(&object(serde_json::json!({})), Observation::Live(Ok(seen)));
        assert_eq!(outcome_reason(&decision), Some(reasons::KEY_NOT_FOUND));
    }

    #[test]
    fn a_failed_read_becomes_the_objects_condition() {
        let err = KmsError::new(Call::ListGrants, ErrorReason::ServiceUnavailable, "x");
        let decision = decide(
            &object(serde_json::json!({})),
            Observation::Live(Err(Stop::Kms(err))),
        );
        assert!(decision.steps.is_empty());
        assert_eq!(outcome_reason(&decision), Some(reasons::KMS_UNAVAILABLE));
        assert_eq!(decision.requeue, Requeue::Backoff);
    }

    #[test]
    fn a_replaced_grant_on_an_account_no_config_reaches_waits_once_the_new_grant_is_kept() {
        let repointed = object(
            serde_json::json!({"status": {"grantId": "old", "keyId": KEY, "account": "https://other p9"}}),
        );
        let mut seen = live(vec![grant("new", KEY, MINE, &["describe-key"])], false);
        seen.superseded_elsewhere = Some(Place::Unreachable {
            account: "https://other p9".into(),
        });
        let decision = decide(&repointed, Observation::Live(Ok(seen)));
        assert_eq!(steps(&decision), ["keep new"]);
        assert_eq!(
            outcome_reason(&decision),
            Some(reasons::GRANT_ACCOUNT_UNREACHABLE)
        );
        assert_eq!(
            decision
                .status
                .superseded_grant
                .map(|g| g.grant_id)
                .as_deref(),
            Some("old")
        );
    }

    fn deleted(extra: serde_json::Value) -> KmsGrant {
        let mut value =
            serde_json::json!({"metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z"}});
        merge(&mut value, extra);
        object(value)
    }

    fn place(account: &str, key_id: &str, recorded: Option<&str>) -> CleanupPlace {
        CleanupPlace {
            account: account.into(),
            key_id: key_id.into(),
            recorded_grant: recorded.map(str::to_owned),
        }
    }

    /// Our grant "g1" and another object's on the key.
    fn g1_and_theirs() -> Arc<Vec<Grant>> {
        Arc::new(vec![
            grant("g1", KEY, MINE, &["describe-key"]),
            grant("theirs", KEY, "k8s/c1/team-b/app", &["describe-key"]),
        ])
    }

    /// The decision for an object whose status records "g1", deleted, with `seen` on its key.
    fn decide_deletion_of_g1(seen: Place) -> Decision {
        let object = deleted(
            serde_json::json!({"status": {"grantId": "g1", "keyId": KEY, "account": ACCOUNT}}),
        );
        let found = Deleting {
            identity: Identity::new("c1", "team-a", "app", "uid-1"),
            places: vec![(place(ACCOUNT, KEY, Some("g1")), seen)],
            names_missing: None,
        };
        decide(&object, Observation::Deleting(Ok(found)))
    }

    #[test]
    fn deletion_removes_what_it_found_and_then_lets_the_object_go() {
        let decision = decide_deletion_of_g1(Place::Listed {
            client: client(),
            key: key(KEY),
            grants: g1_and_theirs(),
        });
        assert_eq!(steps(&decision), ["remove g1:Revoke"]);
        assert_eq!(decision.finalizer, Some(false));
        assert_eq!(decision.ending, Ending::Quiet);
        assert_eq!(decision.pass, Pass::Deleting);
    }

    #[test]
    fn deletion_waits_where_names_are_not_returned_unless_it_revokes_nothing() {
        let unnamed = Arc::new(vec![Grant {
            name: None,
            ..grant("g1", KEY, MINE, &["describe-key"])
        }]);
        let deleting = |extra: serde_json::Value| {
            let mut value = serde_json::json!({"status": {
                "grantId": "g1", "grantName": MINE, "keyId": KEY, "account": ACCOUNT}});
            merge(&mut value, extra);
            let found = Deleting {
                identity: Identity::new("c1", "team-a", "app", "uid-1"),
                places: vec![(
                    place(ACCOUNT, KEY, Some("g1")),
                    Place::Listed {
                        client: client(),
                        key: key(KEY),
                        grants: unnamed.clone(),
                    },
                )],
                names_missing: Some((KEY.into(), "g1".into())),
            };
            decide(&deleted(value), Observation::Deleting(Ok(found)))
        };
        let decision = deleting(serde_json::json!({}));
        assert!(decision.steps.is_empty());
        assert_eq!(decision.finalizer, None, "the object stays");
        assert_eq!(
            outcome_reason(&decision),
            Some(reasons::GRANT_NAMES_NOT_RETURNED)
        );
        let Ending::Outcome(outcome) = &decision.ending else {
            panic!("an outcome")
        };
        assert!(outcome.message().contains("deletion waits"), "{outcome:?}");
        assert_eq!(decision.requeue, Requeue::Backoff);
        let orphan = deleting(serde_json::json!({"spec": {"deletionPolicy": "Orphan"}}));
        assert_eq!(orphan.finalizer, Some(false), "Orphan revokes nothing");
    }

    #[test]
    fn deletion_without_a_fresh_list_removes_what_is_known_and_keeps_the_object_until_one() {
        let decision = decide_deletion_of_g1(Place::Known {
            client: client(),
            key: key(KEY),
            grants: g1_and_theirs(),
            retry: Duration::from_secs(7),
        });
        assert_eq!(steps(&decision), ["remove g1:Revoke"]);
        // A grant whose create answer was lost is found only by a fresh list: not released yet.
        assert_eq!(decision.finalizer, None);
        assert_eq!(decision.requeue, Requeue::After(Duration::from_secs(7)));
        assert_eq!(decision.ending, Ending::Quiet);
    }

    #[test]
    fn deletion_waits_on_a_recorded_grant_no_config_reaches_keeping_the_finalizer() {
        let object = deleted(
            serde_json::json!({"status": {"grantId": "g1", "keyId": KEY, "account": "https://other p9"}}),
        );
        let found = Deleting {
            identity: Identity::new("c1", "team-a", "app", "uid-1"),
            places: vec![(
                place("https://other p9", KEY, Some("g1")),
                Place::Unreachable {
                    account: "https://other p9".into(),
                },
            )],
            names_missing: None,
        };
        let decision = decide(&object, Observation::Deleting(Ok(found)));
        assert!(decision.steps.is_empty());
        assert_eq!(decision.finalizer, None);
        assert_eq!(
            outcome_reason(&decision),
            Some(reasons::GRANT_ACCOUNT_UNREACHABLE)
        );
        assert_eq!(decision.requeue, Requeue::Backoff);
    }

    #[test]
    fn orphan_deletion_tells_what_it_left_and_a_failed_lookup_is_told_not_blocking() {
        let object = deleted(serde_json::json!({
            "spec": {"deletionPolicy": "Orphan"},
            "status": {"grantId": "g1", "keyId": KEY, "account": ACCOUNT}}));
        let err = KmsError::new(Call::ListGrants, ErrorReason::PermissionDenied, "x");
        let found = Deleting {
            identity: Identity::new("c1", "team-a", "app", "uid-1"),
            places: vec![(
                place(ACCOUNT, OLD_KEY, None),
                Place::LookupFailed {
                    key_id: OLD_KEY.into(),
                    error: err,
                },
            )],
            names_missing: None,
        };
        let decision = decide(&object, Observation::Deleting(Ok(found)));
        assert_eq!(steps(&decision), ["tell GrantOrphaned"]);
        assert_eq!(decision.events.len(), 1);
        assert_eq!(decision.events[0].1, "CleanupLookupFailed");
        assert_eq!(decision.finalizer, Some(false));
    }

    #[test]
    fn nothing_is_done_for_an_object_never_stored_or_already_released() {
        for observed in [Observation::Unstored, Observation::Released] {
            let decision = decide(&object(serde_json::json!({})), observed);
            assert_eq!(decision.pass, Pass::Idle);
            assert!(decision.steps.is_empty() && decision.finalizer.is_none());
        }
    }

    // A second live cluster under the same cluster name (docs/identity.md).

    const SECOND: &str = "2026-01-01T00:00:02.000Z";

    fn at(id: &str, created_at_millis: i64) -> Grant {
        Grant {
            created_at_millis: Some(created_at_millis),
            ..grant(id, KEY, MINE, &["describe-key"])
        }
    }

    /// 2026-01-01T00:00:00Z plus `seconds`, in milliseconds.
    fn millis(seconds: i64) -> i64 {
        1_767_225_600_000 + seconds * 1000
    }

    /// An object recording "g1" and, when `revoked` names one, the duplicate it revoked while
    /// the key's listing held grants created until 00:00:02.
    fn recording_g1(revoked: Option<&str>, extra: serde_json::Value) -> KmsGrant {
        let mut status = serde_json::json!({"grantId": "g1", "keyId": KEY, "account": ACCOUNT});
        if let Some(revoked) = revoked {
            status["revokedDuplicate"] =
                serde_json::json!({"grantId": revoked, "listedUntil": SECOND});
        }
        merge(&mut status, extra);
        object(serde_json::json!({"status": status}))
    }

    #[test]
    fn revoking_a_duplicate_records_it_with_the_newest_creation_time_listed() {
        let decision = decide(
            &recording_g1(None, serde_json::json!({})),
            Observation::Live(Ok(live(
                vec![at("g1", millis(1)), at("dup", millis(2))],
                true,
            ))),
        );
        assert_eq!(
            steps(&decision),
            vec![
                "revoke dup".to_owned(),
                "keep g1".into(),
                format!("record revoked dup listed until {SECOND}"),
            ]
        );
        assert_eq!(decision.ending, Ending::InSync);
    }

    #[test]
    fn a_grant_of_the_identity_created_after_this_cluster_revoked_one_is_left_alone_and_reported() {
        let object = recording_g1(Some("dup"), serde_json::json!({}));
        let seen = || vec![at("g1", millis(1)), at("theirs", millis(3))];
        let decision = decide(&object, Observation::Live(Ok(live(seen(), true))));
        assert_eq!(
            steps(&decision),
            ["keep g1", "tell ClusterNameInUse and count it"],
            "nothing revoked, the recorded grant kept"
        );
        assert_eq!(
            outcome_reason(&decision),
            Some(reasons::CLUSTER_NAME_IN_USE)
        );
        assert_eq!(decision.requeue, Requeue::Resync);
        let Ending::Outcome(outcome) = &decision.ending else {
            panic!("{:?}", decision.ending)
        };
        for part in ["theirs", "dup", MINE, "--cluster-name"] {
            assert!(
                outcome.message().contains(part),
                "{part}: {}",
                outcome.message()
            );
        }
        assert!(
            decision.status.revoked_duplicate.is_some(),
            "the record stays while the conflict lasts"
        );

        // The next pass (this process or a new leader, from status alone) says it again
        // without telling or counting twice.
        let told = recording_g1(
            Some("dup"),
            serde_json::json!({"conditions": [{"type": "Stalled", "status": "True",
                "reason": "ClusterNameInUse", "message": "m",
                "lastTransitionTime": "2026-01-01T00:00:00Z"}]}),
        );
        let again = decide(&told, Observation::Live(Ok(live(seen(), true))));
        assert_eq!(steps(&again), ["keep g1"]);
        assert_eq!(outcome_reason(&again), Some(reasons::CLUSTER_NAME_IN_USE));

        // Its own grant vanished meanwhile: it makes one, and still leaves the other alone.
        let lost = decide(
            &object,
            Observation::Live(Ok(live(vec![at("theirs", millis(3))], true))),
        );
        assert_eq!(
            steps(&lost),
            [
                "create on bb6a3d22-dc93-47ac-b5bd-88df7ad35f1e (Recreate)",
                "tell ClusterNameInUse and count it"
            ]
        );
    }

    #[test]
    fn the_conflict_clears_once_the_other_clusters_grants_are_gone() {
        let decision = decide(
            &recording_g1(Some("dup"), serde_json::json!({})),
            Observation::Live(Ok(live(vec![at("g1", millis(1))], true))),
        );
        assert_eq!(steps(&decision), ["keep g1"]);
        assert_eq!(decision.ending, Ending::InSync);
    }

    #[test]
    fn a_rebuilt_cluster_without_a_record_adopts_the_oldest_and_revokes_the_rest_without_conflict()
    {
        let decision = decide(
            &object(serde_json::json!({})),
            Observation::Live(Ok(live(
                vec![at("old", millis(1)), at("new", millis(9))],
                true,
            ))),
        );
        assert_eq!(
            steps(&decision),
            [
                "revoke new".to_owned(),
                "keep old".into(),
                "record revoked new listed until 2026-01-01T00:00:09.000Z".into()
            ]
        );
        assert_eq!(decision.ending, Ending::InSync);
    }

    #[test]
    fn a_duplicate_of_its_own_from_a_lost_answer_is_still_revoked() {
        // Created before the revoke on record (its answer lost, listed only now): not foreign.
        let decision = decide(
            &recording_g1(Some("dup"), serde_json::json!({})),
            Observation::Live(Ok(live(
                vec![at("g1", millis(1)), at("lost", millis(2))],
                true,
            ))),
        );
        assert_eq!(steps(&decision)[..2], ["revoke lost", "keep g1"]);
        assert_eq!(decision.ending, Ending::InSync);
    }

    #[test]
    fn nothing_is_created_while_a_revoke_is_on_record_so_a_lost_create_never_looks_foreign() {
        let recording = recording_g1(Some("dup"), serde_json::json!({}));
        let decision = decide(&recording, Observation::Live(Ok(live(vec![], true))));
        assert!(decision.steps.is_empty(), "{:?}", steps(&decision));
        assert_eq!(decision.status.revoked_duplicate, None);
        assert_eq!(decision.requeue, Requeue::Now);
        assert_eq!(outcome_reason(&decision), Some(reasons::CREATING));

        // With the record gone (as the status write leaves it), the next pass creates; a grant
        // of that create found later is its own duplicate, revoked as any other.
        let cleared = object(
            serde_json::json!({"status": {"grantId": "g1", "keyId": KEY, "account": ACCOUNT}}),
        );
        let next = decide(&cleared, Observation::Live(Ok(live(vec![], true))));
        assert_eq!(
            steps(&next),
            ["create on bb6a3d22-dc93-47ac-b5bd-88df7ad35f1e (Recreate)"]
        );
    }

    #[test]
    fn grants_without_a_creation_time_or_created_by_then_never_look_foreign() {
        // A new leader reads the record from status; its snapshot holds the grant this cluster
        // created (no creation time known yet) and one created exactly at the bound.
        let mut unknown = at("g1", 0);
        unknown.created_at_millis = None;
        let decision = decide(
            &recording_g1(Some("dup"), serde_json::json!({})),
            Observation::Live(Ok(live(vec![unknown, at("same", millis(2))], false))),
        );
        assert_eq!(outcome_reason(&decision), None);
        assert!(steps(&decision).contains(&"revoke same".to_owned()));
    }

    #[test]
    fn deleting_in_one_cluster_leaves_the_other_clusters_grants() {
        let object = deleted(serde_json::json!({"status": {"grantId": "g1", "keyId": KEY,
            "account": ACCOUNT, "revokedDuplicate": {"grantId": "dup", "listedUntil": SECOND}}}));
        let found = Deleting {
            identity: Identity::new("c1", "team-a", "app", "uid-1"),
            places: vec![(
                place(ACCOUNT, KEY, Some("g1")),
                Place::Listed {
                    client: client(),
                    key: key(KEY),
                    grants: Arc::new(vec![at("g1", millis(1)), at("theirs", millis(3))]),
                },
            )],
            names_missing: None,
        };
        let decision = decide(&object, Observation::Deleting(Ok(found)));
        assert_eq!(steps(&decision), ["remove g1:Revoke"]);
    }
}
