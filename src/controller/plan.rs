//! Pure decisions: given what the object wants and what the cloud holds, what to do next.
//! No I/O here; the reconciler fetches, calls these, and carries the result out.
//!
//! Ownership is decided from the listed grants and their names alone (see [`super::identity`]):
//! an object owns the grants named for its identity (and, from older versions, for its UID), and
//! a grant it imported by ID. Nothing else is ever adopted, revoked or retired.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use super::conditions::{Outcome, reasons};
use super::identity::Identity;
use crate::api::{
    DeletionPolicy, GrantRef, GranteePrincipalType, KmsGrantSpec, KmsGrantStatus,
    KmsProviderConfigSpec, Operation,
};
use kmsgrant_kms::{ErrorClass, ErrorReason, Grant, KeyInfo, KeyState, KmsError, NewGrant};

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
            // A key named by alias is resolved by the reconciler, which sets it.
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
        grant.key_id == self.key_id
            && grant.grantee_principal == self.grantee_principal
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
            key_id: self.key_id.clone(),
            grant_id: grant_id.to_owned(),
            grantee_principal: self.grantee_principal.clone(),
            grantee_principal_type: Some(self.grantee_principal_type.as_str().to_owned()),
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
    /// Whether `grants` was listed in this reconcile (not from a snapshot).
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
        key_id: grant.key_id.clone(),
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
                .filter(|g| g.key_id != desired.key_id),
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

/// What the provider config allows this object to do with `spec.importGrantId`.
pub fn admit_import<'a>(
    spec: &'a KmsGrantSpec,
    config_name: &str,
    selector: Option<&LabelSelector>,
    namespace: &str,
    namespace_labels: &BTreeMap<String, String>,
) -> Result<Option<&'a str>, Outcome> {
    let Some(import) = spec.import_grant_id.as_deref() else {
        return Ok(None);
    };
    let allowed = selector.is_some_and(|s| namespace_allowed(Some(s), namespace_labels));
    if allowed {
        Ok(Some(import))
    } else {
        Err(Outcome::Stalled {
            reason: reasons::IMPORT_NOT_ALLOWED,
            message: format!(
                "spec.importGrantId is set but KmsProviderConfig {config_name:?} does not allow import in namespace {namespace:?} (importNamespaceSelector); ask the platform team, or remove the field"
            ),
        })
    }
}

/// The provider config's guardrails: `None` when the object may use it.
pub fn admit(
    spec: &KmsGrantSpec,
    config_name: &str,
    config: &KmsProviderConfigSpec,
    namespace: &str,
    namespace_labels: &BTreeMap<String, String>,
) -> Option<Outcome> {
    if !namespace_allowed(config.namespace_selector.as_ref(), namespace_labels) {
        return Some(Outcome::Stalled {
            reason: reasons::NAMESPACE_NOT_ALLOWED,
            message: format!(
                "namespace {namespace:?} does not match the namespaceSelector of KmsProviderConfig {config_name:?}; ask the platform team to allow it"
            ),
        });
    }
    // A key named by alias is checked once resolved (`resolved_key_allowed`).
    if let Some(allowed) = &config.allowed_key_ids
        && let Some(key_id) = &spec.key_id
        && !allowed.contains(key_id)
    {
        return Some(Outcome::Stalled {
            reason: reasons::KEY_NOT_ALLOWED,
            message: format!(
                "key {key_id} is not in allowedKeyIds of KmsProviderConfig {config_name:?}"
            ),
        });
    }
    if let Some(allowed) = &config.allowed_operations {
        let refused: Vec<&str> = spec
            .operations
            .iter()
            .filter(|op| !allowed.contains(op))
            .map(|op| op.as_str())
            .collect();
        if !refused.is_empty() {
            return Some(Outcome::Stalled {
                reason: reasons::OPERATION_NOT_ALLOWED,
                message: format!(
                    "operations {refused:?} are not in allowedOperations of KmsProviderConfig {config_name:?}"
                ),
            });
        }
    }
    None
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
            message,
        },
        (_, reason) => Outcome::Stalled {
            reason: reason.as_str(),
            message,
        },
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

/// Whether a namespace with these labels may use a provider config with this selector.
pub fn namespace_allowed(
    selector: Option<&LabelSelector>,
    labels: &BTreeMap<String, String>,
) -> bool {
    let Some(selector) = selector else {
        return true;
    };
    // The CRD schema rejects malformed expressions; one stored before that rule existed
    // allows nothing rather than everything.
    kube::core::Selector::try_from(selector.clone())
        .is_ok_and(|selector| kube::core::SelectorExt::matches(&selector, labels))
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

/// One key on one account where deletion looks for the object's grants, with the grant that
/// status records there, if any.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct CleanupPlace {
    pub account: String,
    pub key_id: String,
    pub recorded_grant: Option<String>,
}

/// Where deletion looks: the recorded grant's account and key, the spec's key on the account the
/// config reaches now (a create whose answer or status write was lost left a grant findable only
/// by its name there), and a replaced grant's; one place per account and key. `Err` when status
/// names a grant but no account is known for it (recorded by an older version, and the config
/// that could tell is missing or not usable).
pub fn cleanup_places(
    policy: DeletionPolicy,
    status: &KmsGrantStatus,
    spec_key_id: &str,
    current_account: Option<&str>,
    config_name: &str,
) -> Result<Vec<CleanupPlace>, Outcome> {
    let recorded_account = status
        .account
        .clone()
        .or_else(|| current_account.map(str::to_owned));
    if recorded_account.is_none()
        && (status.grant_id.is_some() || status.superseded_grant.is_some())
    {
        return Err(Outcome::Progressing {
            reason: reasons::PROVIDER_CONFIG_NOT_READY,
            message: format!(
                "cannot clean up: KmsProviderConfig {config_name:?} is missing or not Ready"
            ),
        });
    }
    let mut places = Vec::new();
    if policy != DeletionPolicy::Orphan {
        if let (Some(account), Some(key_id)) = (&recorded_account, &status.key_id) {
            places.push(CleanupPlace {
                account: account.clone(),
                key_id: key_id.clone(),
                recorded_grant: status.grant_id.clone(),
            });
        }
        if let Some(account) = current_account {
            places.push(CleanupPlace {
                account: account.to_owned(),
                key_id: spec_key_id.to_owned(),
                recorded_grant: None,
            });
        }
    }
    if let Some(old) = &status.superseded_grant
        && let Some(account) = old.account.clone().or(recorded_account)
    {
        places.push(CleanupPlace {
            account,
            key_id: old.key_id.clone(),
            recorded_grant: Some(old.grant_id.clone()),
        });
    }
    places.sort();
    // One place per account and key, keeping a recorded grant if any entry has one.
    places.dedup_by(|later, earlier| {
        let same = later.account == earlier.account && later.key_id == earlier.key_id;
        if same && earlier.recorded_grant.is_none() {
            earlier.recorded_grant = later.recorded_grant.take();
        }
        same
    });
    Ok(places)
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

    fn spec() -> KmsGrantSpec {
        serde_json::from_value(serde_json::json!({
            "keyId": KEY, "granteePrincipal": "alice", "operations": ["describe-key"],
            "importGrantId": "h"
        }))
        .unwrap()
    }

    fn config(extra: serde_json::Value) -> KmsProviderConfigSpec {
        let mut value = serde_json::json!({
            "endpoint": "https://kms", "projectId": "p",
            "auth": {"type": "AccessKey", "secretRef": {"namespace": "s", "name": "n"}}
        });
        value
            .as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn guardrails_refuse_namespace_key_and_operations_by_name() {
        let labels = BTreeMap::from([("kms".to_owned(), "yes".to_owned())]);
        let reason = |c: serde_json::Value, labels: &BTreeMap<String, String>| {
            admit(&spec(), "default", &config(c), "team-a", labels).map(|o| o.reason())
        };
        assert_eq!(reason(serde_json::json!({}), &BTreeMap::new()), None);
        assert_eq!(
            reason(
                serde_json::json!({"namespaceSelector": {"matchLabels": {"kms": "yes"}}}),
                &BTreeMap::new()
            ),
            Some(reasons::NAMESPACE_NOT_ALLOWED)
        );
        assert_eq!(
            reason(
                serde_json::json!({"namespaceSelector": {"matchLabels": {"kms": "yes"}}}),
                &labels
            ),
            None
        );
        assert_eq!(
            reason(serde_json::json!({"allowedKeyIds": [OTHER_KEY]}), &labels),
            Some(reasons::KEY_NOT_ALLOWED)
        );
        assert_eq!(
            reason(
                serde_json::json!({"allowedOperations": ["encrypt-datakey"]}),
                &labels
            ),
            Some(reasons::OPERATION_NOT_ALLOWED)
        );
    }

    #[test]
    fn import_is_off_unless_the_provider_config_allows_the_namespace() {
        let spec = spec();
        let labels = BTreeMap::from([("import".to_owned(), "yes".to_owned())]);
        let selector: LabelSelector =
            serde_json::from_value(serde_json::json!({"matchLabels": {"import": "yes"}})).unwrap();
        assert_eq!(
            admit_import(&spec, "default", None, "team-a", &labels)
                .unwrap_err()
                .reason(),
            reasons::IMPORT_NOT_ALLOWED
        );
        assert!(
            admit_import(
                &spec,
                "default",
                Some(&selector),
                "team-a",
                &BTreeMap::new()
            )
            .is_err()
        );
        assert_eq!(
            admit_import(&spec, "default", Some(&selector), "team-a", &labels),
            Ok(Some("h"))
        );
        let everyone = LabelSelector::default();
        assert_eq!(
            admit_import(
                &spec,
                "default",
                Some(&everyone),
                "team-a",
                &BTreeMap::new()
            ),
            Ok(Some("h"))
        );
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
    fn a_key_by_alias_is_checked_against_allowed_key_ids_once_resolved() {
        let by_alias: KmsGrantSpec = serde_json::from_value(serde_json::json!({
            "keyRef": {"alias": "alias/app"}, "granteePrincipal": "alice",
            "operations": ["describe-key"]
        }))
        .unwrap();
        let only_other = config(serde_json::json!({"allowedKeyIds": [OTHER_KEY]}));
        // Before resolution nothing is known of the key: only namespace and operations count.
        assert_eq!(
            admit(&by_alias, "p", &only_other, "team-a", &BTreeMap::new()),
            None
        );
        let refused = resolved_key_allowed("alias/app", KEY, "p", &only_other).unwrap();
        assert_eq!(refused.reason(), reasons::KEY_NOT_ALLOWED);
        assert_eq!(requeue(&refused), Requeue::StalledRetry);
        for part in ["alias/app", KEY, "allowedKeyIds", "\"p\""] {
            assert!(refused.message().contains(part), "{}", refused.message());
        }
        let allowed = config(serde_json::json!({"allowedKeyIds": [OTHER_KEY, KEY]}));
        assert_eq!(resolved_key_allowed("alias/app", KEY, "p", &allowed), None);
        assert_eq!(
            resolved_key_allowed("alias/app", KEY, "p", &config(serde_json::json!({}))),
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

    fn place(account: &str, key_id: &str, recorded: Option<&str>) -> CleanupPlace {
        CleanupPlace {
            account: account.into(),
            key_id: key_id.into(),
            recorded_grant: recorded.map(str::to_owned),
        }
    }

    fn recorded_status(account: Option<&str>) -> KmsGrantStatus {
        KmsGrantStatus {
            grant_id: Some("g1".into()),
            key_id: Some(KEY.into()),
            account: account.map(str::to_owned),
            ..KmsGrantStatus::default()
        }
    }

    #[test]
    fn cleanup_looks_once_on_the_recorded_key_keeping_the_recorded_grant() {
        let places = cleanup_places(
            DeletionPolicy::Revoke,
            &recorded_status(Some("acct")),
            KEY,
            Some("acct"),
            "p",
        );
        assert_eq!(places, Ok(vec![place("acct", KEY, Some("g1"))]));
    }

    #[test]
    fn cleanup_of_an_object_without_status_looks_for_its_name_on_the_spec_key() {
        let places = cleanup_places(
            DeletionPolicy::Revoke,
            &KmsGrantStatus::default(),
            KEY,
            Some("acct"),
            "p",
        );
        assert_eq!(places, Ok(vec![place("acct", KEY, None)]));
    }

    #[test]
    fn cleanup_after_a_repoint_looks_on_the_old_account_and_the_new_one() {
        let places = cleanup_places(
            DeletionPolicy::Revoke,
            &recorded_status(Some("old")),
            OTHER_KEY,
            Some("new"),
            "p",
        )
        .unwrap();
        assert_eq!(
            places,
            vec![place("new", OTHER_KEY, None), place("old", KEY, Some("g1"))]
        );
    }

    #[test]
    fn orphan_cleanup_looks_only_where_a_replaced_grant_lives() {
        let mut status = recorded_status(Some("acct"));
        assert_eq!(
            cleanup_places(DeletionPolicy::Orphan, &status, KEY, Some("acct"), "p"),
            Ok(vec![])
        );
        status.superseded_grant = Some(GrantRef {
            key_id: OTHER_KEY.into(),
            grant_id: "g0".into(),
            account: None,
        });
        assert_eq!(
            cleanup_places(DeletionPolicy::Orphan, &status, KEY, Some("acct"), "p"),
            Ok(vec![place("acct", OTHER_KEY, Some("g0"))])
        );
    }

    #[test]
    fn a_recorded_grant_on_an_unknown_account_waits_for_its_provider_config() {
        let places = cleanup_places(
            DeletionPolicy::Revoke,
            &recorded_status(None),
            KEY,
            None,
            "p",
        );
        assert!(
            matches!(places, Err(Outcome::Progressing { reason, .. }) if reason == reasons::PROVIDER_CONFIG_NOT_READY)
        );
        // Nothing recorded and no config: nothing of the object's can be found, nothing to wait for.
        assert_eq!(
            cleanup_places(
                DeletionPolicy::Revoke,
                &KmsGrantStatus::default(),
                KEY,
                None,
                "p"
            ),
            Ok(vec![])
        );
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
