//! kstatus conditions (`Ready`, `Reconciling`, `Stalled`) from the outcome of one reconcile.

use crate::api::{Condition, ConditionStatus};

pub const READY: &str = "Ready";
pub const RECONCILING: &str = "Reconciling";
pub const STALLED: &str = "Stalled";

/// Where an object stands after a reconcile. Every reason is a CamelCase word from
/// [`reasons`]; every message says what is wrong and what to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The goal is reached.
    Ready {
        reason: &'static str,
        message: String,
    },
    /// Work is under way or being retried; no human needed (yet).
    Progressing {
        reason: &'static str,
        message: String,
    },
    /// Progress needs a human; not hot-retried.
    Stalled {
        reason: &'static str,
        message: String,
    },
}

impl Outcome {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Ready { reason, .. }
            | Self::Progressing { reason, .. }
            | Self::Stalled { reason, .. } => reason,
        }
    }

    pub fn message(&self) -> &str {
        match self {
            Self::Ready { message, .. }
            | Self::Progressing { message, .. }
            | Self::Stalled { message, .. } => message,
        }
    }

    /// The condition type this outcome sets to true.
    pub fn condition_type(&self) -> &'static str {
        match self {
            Outcome::Ready { .. } => READY,
            Outcome::Progressing { .. } => RECONCILING,
            Outcome::Stalled { .. } => STALLED,
        }
    }

    pub fn is_ready(&self) -> bool {
        matches!(self, Self::Ready { .. })
    }
}

/// The documented condition reasons.
pub mod reasons {
    /// Ready: the grant exists on the cloud and matches the spec.
    pub const GRANT_READY: &str = "GrantReady";
    /// Ready (KmsProviderConfig): the credentials work against the endpoint.
    pub const PROVIDER_READY: &str = "CredentialsVerified";
    pub const CREATING: &str = "Creating";
    pub const REPLACING: &str = "Replacing";
    pub const DELETING: &str = "Deleting";
    pub const OUTCOME_UNKNOWN: &str = "OutcomeUnknown";
    pub const KMS_UNAVAILABLE: &str = "KmsUnavailable";
    pub const PROVIDER_CONFIG_NOT_FOUND: &str = "ProviderConfigNotFound";
    pub const PROVIDER_CONFIG_NOT_READY: &str = "ProviderConfigNotReady";
    pub const NAMESPACE_NOT_ALLOWED: &str = "NamespaceNotAllowed";
    pub const KEY_NOT_ALLOWED: &str = "KeyNotAllowed";
    pub const OPERATION_NOT_ALLOWED: &str = "OperationNotAllowed";
    pub const KEY_NOT_FOUND: &str = "KeyNotFound";
    /// `spec.keyRef.alias` names no key (yet, or any more).
    pub const ALIAS_NOT_FOUND: &str = "AliasNotFound";
    pub const DEFAULT_KEY_NOT_GRANTABLE: &str = "DefaultKeyNotGrantable";
    pub const KEY_DISABLED: &str = "KeyDisabled";
    pub const KEY_PENDING_DELETION: &str = "KeyPendingDeletion";
    pub const KEY_NOT_ENABLED: &str = "KeyNotEnabled";
    pub const GRANT_QUOTA_EXCEEDED: &str = "GrantQuotaExceeded";
    pub const INVALID_SPEC: &str = "InvalidSpec";
    pub const SECRET_NOT_FOUND: &str = "SecretNotFound";
    pub const SECRET_INCOMPLETE: &str = "SecretIncomplete";
    /// Stalled: `spec.importGrantId` is set but the provider config does not allow import here.
    pub const IMPORT_NOT_ALLOWED: &str = "ImportNotAllowed";
    /// Stalled: the grant to import carries another object's identity.
    pub const IMPORT_REFUSED: &str = "ImportRefused";
    /// Stalled: the grant to import is not on the key.
    pub const IMPORTED_GRANT_NOT_FOUND: &str = "ImportedGrantNotFound";
    /// Reconciling (deletion): the grant lives on an account no Ready provider config reaches.
    pub const GRANT_ACCOUNT_UNREACHABLE: &str = "GrantAccountUnreachable";
    /// Stalled (KmsProviderConfig): `secretRef` names a Secret outside the operator's namespace.
    pub const SECRET_NAMESPACE_NOT_ALLOWED: &str = "SecretNamespaceNotAllowed";
    /// Stalled (KmsNamespacedProviderConfig): an endpoint the platform's tenant policy refuses
    /// (scheme, host pattern, or an address it resolves to).
    pub const ENDPOINT_NOT_ALLOWED: &str = "EndpointNotAllowed";
    /// Stalled (KmsGrant on a KmsNamespacedProviderConfig): its namespace already has as many
    /// objects served by tenant configs as the platform's tenant policy allows
    /// (`--tenant-max-objects-per-namespace`); no grant is created for it.
    pub const NAMESPACE_OBJECT_LIMIT: &str = "NamespaceObjectLimit";
    /// Reconciling (KmsProviderConfig being deleted): KmsGrants still use it.
    pub const IN_USE: &str = "InUse";
    /// `webIdentity.tokenFile` lies outside the operator's `--web-identity-token-dir`.
    pub const TOKEN_FILE_NOT_ALLOWED: &str = "TokenFileNotAllowed";
    /// `webIdentity.serviceAccountRef.namespace` is not the operator's namespace.
    pub const SERVICE_ACCOUNT_NAMESPACE_NOT_ALLOWED: &str = "ServiceAccountNamespaceNotAllowed";
    /// A combination of fields this operator does not implement (never silently ignored).
    pub const UNSUPPORTED_VALUE: &str = "UnsupportedValue";
    /// Ready (KmsKeyPolicy): the key was listed; every grant on it is declared by a KmsGrant (or
    /// is another cluster's).
    pub const NO_UNMANAGED_GRANTS: &str = "NoUnmanagedGrants";
    /// Ready (KmsKeyPolicy): the key was listed; status lists grants no KmsGrant declares.
    pub const UNMANAGED_GRANTS_FOUND: &str = "UnmanagedGrantsFound";
    /// Reconciling (KmsKeyPolicy): the key is listed at the next resync.
    pub const AWAITING_LIST: &str = "AwaitingList";
    /// Stalled: the key's listing returns a grant this operator recorded by its name without
    /// any name, so ownership cannot be read from the cloud; nothing is adopted or revoked by
    /// name on the key until names come back (KmsGrant and KmsKeyPolicy).
    pub const GRANT_NAMES_NOT_RETURNED: &str = "GrantNamesNotReturned";
    /// Stalled: a grant of this object's identity that this cluster did not create appeared
    /// after this cluster revoked one as a duplicate: another live cluster runs with the same
    /// cluster name. No grant of the identity is revoked until it stops (docs/identity.md).
    pub const CLUSTER_NAME_IN_USE: &str = "ClusterNameInUse";
}

/// The longest condition message written (characters); longer ones (a KMS `error_msg` can be
/// any size) are cut and end in `…`.
pub const MAX_MESSAGE_CHARS: usize = 1024;

/// `message` cut to [`MAX_MESSAGE_CHARS`] characters.
pub fn truncate_message(message: &str) -> String {
    if message.chars().count() <= MAX_MESSAGE_CHARS {
        return message.to_owned();
    }
    let mut cut: String = message.chars().take(MAX_MESSAGE_CHARS - 1).collect();
    cut.push('…');
    cut
}

/// The three conditions for `outcome`, keeping `lastTransitionTime` of any whose status did not
/// change.
pub fn conditions(
    outcome: &Outcome,
    generation: Option<i64>,
    previous: &[Condition],
    now: &str,
) -> Vec<Condition> {
    let (ready, reconciling, stalled) = match outcome {
        Outcome::Ready { .. } => (
            ConditionStatus::True,
            ConditionStatus::False,
            ConditionStatus::False,
        ),
        Outcome::Progressing { .. } => (
            ConditionStatus::False,
            ConditionStatus::True,
            ConditionStatus::False,
        ),
        Outcome::Stalled { .. } => (
            ConditionStatus::False,
            ConditionStatus::False,
            ConditionStatus::True,
        ),
    };
    // One message for the three.
    let message: std::sync::Arc<str> = truncate_message(outcome.message()).into();
    // The three change together, usually: one copy of the time for those that changed now.
    let now: std::sync::Arc<str> = now.into();
    [
        (READY, ready),
        (RECONCILING, reconciling),
        (STALLED, stalled),
    ]
    .into_iter()
    .map(|(type_, status)| {
        let last_transition_time = previous
            .iter()
            .find(|c| c.type_ == type_ && c.status == status)
            .map(|c| std::sync::Arc::clone(&c.last_transition_time))
            .unwrap_or_else(|| std::sync::Arc::clone(&now));
        Condition {
            type_: type_.into(),
            status,
            reason: outcome.reason().into(),
            message: std::sync::Arc::clone(&message),
            observed_generation: generation,
            last_transition_time,
        }
    })
    .collect()
}

/// Now, as RFC 3339 with second precision (what the schema's date-time format expects).
pub fn now_rfc3339() -> String {
    jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

/// Milliseconds since the epoch as RFC 3339 with the milliseconds (a bound compared with other
/// times of the cloud's clock).
pub fn millis_rfc3339_exact(millis: i64) -> Option<String> {
    jiff::Timestamp::from_millisecond(millis)
        .ok()
        .map(|t| t.strftime("%Y-%m-%dT%H:%M:%S%.3fZ").to_string())
}

/// RFC 3339 as milliseconds since the epoch.
pub fn rfc3339_millis(timestamp: &str) -> Option<i64> {
    timestamp
        .parse::<jiff::Timestamp>()
        .ok()
        .map(|t| t.as_millisecond())
}

/// Milliseconds since the epoch as RFC 3339.
pub fn millis_rfc3339(millis: i64) -> Option<String> {
    jiff::Timestamp::from_millisecond(millis)
        .ok()
        .map(|t| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_outcome_sets_ready_true_and_the_others_false() {
        let outcome = Outcome::Ready {
            reason: reasons::GRANT_READY,
            message: "in sync".into(),
        };
        let conditions = conditions(&outcome, Some(3), &[], "2026-01-01T00:00:00Z");
        let status: Vec<_> = conditions
            .iter()
            .map(|c| (c.type_.as_str(), c.status))
            .collect();
        assert_eq!(
            status,
            [
                (READY, ConditionStatus::True),
                (RECONCILING, ConditionStatus::False),
                (STALLED, ConditionStatus::False)
            ]
        );
        assert!(
            conditions
                .iter()
                .all(|c| c.observed_generation == Some(3) && c.reason == "GrantReady")
        );
    }

    #[test]
    fn transition_time_changes_only_when_the_status_changes() {
        let stalled = Outcome::Stalled {
            reason: reasons::KEY_NOT_FOUND,
            message: "no key".into(),
        };
        let first = conditions(&stalled, Some(1), &[], "t1");
        let again = conditions(&stalled, Some(1), &first, "t2");
        assert!(again.iter().all(|c| &*c.last_transition_time == "t1"));
        let ready = Outcome::Ready {
            reason: reasons::GRANT_READY,
            message: String::new(),
        };
        let after = conditions(&ready, Some(2), &again, "t3");
        let time = |type_: &str| {
            after
                .iter()
                .find(|c| c.type_ == type_)
                .unwrap()
                .last_transition_time
                .clone()
        };
        assert_eq!(
            (time(READY), time(RECONCILING), time(STALLED)),
            ("t3".into(), "t1".into(), "t3".into())
        );
    }

    #[test]
    fn condition_messages_are_cut_to_the_documented_length() {
        let huge = "é".repeat(40 * 1024);
        let outcome = Outcome::Stalled {
            reason: reasons::KEY_NOT_FOUND,
            message: huge,
        };
        for condition in conditions(&outcome, None, &[], "t") {
            assert_eq!(condition.message.chars().count(), MAX_MESSAGE_CHARS);
            assert!(condition.message.ends_with('…'));
        }
        assert_eq!(truncate_message("short"), "short");
    }

    #[test]
    fn creation_dates_render_as_rfc3339() {
        assert_eq!(
            millis_rfc3339(1_497_341_531_000).as_deref(),
            Some("2017-06-13T08:12:11Z")
        );
    }
}
