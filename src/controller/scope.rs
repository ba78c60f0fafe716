//! The scope of one reconcile, decided before the cloud is read: whether the object may use its
//! provider config and key (the guardrails, import, the key's state), and where deletion looks
//! for its grants. Pure; [`super::observe`] consults it so that nothing outside an object's scope
//! is ever listed or described for it.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use super::conditions::{Outcome, reasons};
use crate::api::{DeletionPolicy, KmsGrantSpec, KmsGrantStatus, KmsProviderConfigSpec};

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
    // A key named by alias is checked once resolved (`plan::resolved_key_allowed`).
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
    Ok(one_per_key(places))
}

/// One place per account and key, keeping a recorded grant if any entry has one.
fn one_per_key(mut places: Vec<CleanupPlace>) -> Vec<CleanupPlace> {
    places.sort();
    places.dedup_by(|later, earlier| {
        let same = later.account == earlier.account && later.key_id == earlier.key_id;
        if same && earlier.recorded_grant.is_none() {
            earlier.recorded_grant = later.recorded_grant.take();
        }
        same
    });
    places
}

/// What a pass may read for an object.
#[derive(Debug, PartialEq, Eq)]
pub enum Scope {
    /// An alive object admitted by its provider config.
    Live {
        /// The account the config reaches.
        account: String,
        /// `spec.importGrantId`, admitted for the namespace.
        import: Option<String>,
        /// Keys the object used before on this account (a key change in progress).
        elsewhere: Vec<String>,
        /// The account and key of a replaced grant that lives on another account.
        superseded: Option<(String, String)>,
    },
    /// A deleted object: where its grants may be.
    Deleting { places: Vec<CleanupPlace> },
}

/// What [`of`] decides from.
pub struct Facts<'a> {
    pub spec: &'a KmsGrantSpec,
    pub status: &'a KmsGrantStatus,
    pub deleting: bool,
    pub config_name: &'a str,
    /// Whether a config of that name exists at all.
    pub config_exists: bool,
    /// The config's spec and the account it reaches, when the object may use it now.
    pub config: Option<(&'a KmsProviderConfigSpec, &'a str)>,
    pub namespace: &'a str,
    pub namespace_labels: &'a BTreeMap<String, String>,
    /// `(account, key)`s where a grant named for this object was seen that status does not
    /// record (a create whose answer was lost before a spec change, a late write of a replica
    /// that lost its lease): looked at as well, so that it is removed.
    pub unrecorded: &'a [(String, String)],
}

/// What a pass may read for an object; `Err` says why it cannot go on now.
pub fn of(facts: Facts<'_>) -> Result<Scope, Outcome> {
    let Facts {
        spec,
        status,
        deleting,
        config_name,
        config_exists,
        config,
        namespace,
        namespace_labels,
        unrecorded,
    } = facts;
    // A key named by alias: the key status records (observe adds the alias's current key).
    let spec_key = spec
        .key_id
        .as_deref()
        .or(status.key_id.as_deref())
        .unwrap_or_default();
    if deleting {
        let mut places = cleanup_places(
            spec.deletion_policy,
            status,
            spec_key,
            config.map(|(_, account)| account),
            config_name,
        )?;
        if spec.deletion_policy != DeletionPolicy::Orphan && !unrecorded.is_empty() {
            places.extend(unrecorded.iter().map(|(account, key_id)| CleanupPlace {
                account: account.clone(),
                key_id: key_id.clone(),
                recorded_grant: None,
            }));
            places = one_per_key(places);
        }
        // An alias that never resolved names no key to look at.
        places.retain(|place| !place.key_id.is_empty());
        return Ok(Scope::Deleting { places });
    }
    if !config_exists {
        return Err(Outcome::Stalled {
            reason: reasons::PROVIDER_CONFIG_NOT_FOUND,
            message: format!(
                "KmsProviderConfig {config_name:?} does not exist; create it or set spec.providerConfigRef.name"
            ),
        });
    }
    let Some((config, account)) = config else {
        return Err(Outcome::Progressing {
            reason: reasons::PROVIDER_CONFIG_NOT_READY,
            message: format!(
                "KmsProviderConfig {config_name:?} is not Ready; see its conditions (kubectl describe kmspc {config_name})"
            ),
        });
    };
    if let Some(outcome) = admit(spec, config_name, config, namespace, namespace_labels) {
        return Err(outcome);
    }
    let import = admit_import(
        spec,
        config_name,
        config.import_namespace_selector.as_ref(),
        namespace,
        namespace_labels,
    )?
    .map(str::to_owned);
    let mut elsewhere: Vec<String> = status.key_id.iter().cloned().collect();
    if let Some(old) = &status.superseded_grant
        && old.account.as_deref().is_none_or(|a| a == account)
    {
        elsewhere.push(old.key_id.clone());
    }
    elsewhere.extend(
        unrecorded
            .iter()
            .filter(|(on, _)| on == account)
            .map(|(_, key_id)| key_id.clone()),
    );
    // For a key named by alias, observe drops the key it resolves to.
    elsewhere.retain(|k| Some(k) != spec.key_id.as_ref());
    let mut seen = std::collections::HashSet::new();
    elsewhere.retain(|k| seen.insert(k.clone()));
    let superseded = match &status.superseded_grant {
        Some(old) => old
            .account
            .as_deref()
            .filter(|a| *a != account)
            .map(|a| (a.to_owned(), old.key_id.clone())),
        // Recorded on the account the config reached before it was pointed elsewhere.
        None => status
            .account
            .as_deref()
            .filter(|a| status.grant_id.is_some() && *a != account)
            .map(|a| {
                let key_id = status
                    .key_id
                    .clone()
                    .or_else(|| spec.key_id.clone())
                    .unwrap_or_default();
                (a.to_owned(), key_id)
            }),
    };
    Ok(Scope::Live {
        account: account.to_owned(),
        import,
        elsewhere,
        superseded,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::GrantRef;

    const KEY: &str = "bb6a3d22-dc93-47ac-b5bd-88df7ad35f1e";
    const OTHER_KEY: &str = "0d0466b0-e727-4d9c-b35d-f84bb474a37f";

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
    fn a_key_by_alias_passes_the_key_check_until_resolved() {
        let by_alias: KmsGrantSpec = serde_json::from_value(serde_json::json!({
            "keyRef": {"alias": "alias/app"}, "granteePrincipal": "alice",
            "operations": ["describe-key"]
        }))
        .unwrap();
        let reason = |c: serde_json::Value| {
            admit(&by_alias, "p", &config(c), "team-a", &BTreeMap::new()).map(|o| o.reason())
        };
        // Before resolution nothing is known of the key: only namespace and operations count.
        assert_eq!(
            reason(serde_json::json!({"allowedKeyIds": [OTHER_KEY]})),
            None
        );
        assert_eq!(
            reason(serde_json::json!({"allowedOperations": ["encrypt-datakey"]})),
            Some(reasons::OPERATION_NOT_ALLOWED)
        );
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
        status.superseded_grant = Some(Box::new(GrantRef {
            key_id: OTHER_KEY.into(),
            grant_id: "g0".into(),
            account: None,
        }));
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
    fn keys_holding_an_unrecorded_grant_are_looked_at_alive_and_deleted() {
        let config = config(serde_json::json!({}));
        let labels = BTreeMap::new();
        let mut spec = spec();
        spec.import_grant_id = None;
        let orphan = KmsGrantSpec {
            deletion_policy: DeletionPolicy::Orphan,
            ..spec.clone()
        };
        let status = recorded_status(Some("acct"));
        let unrecorded = [
            ("acct".to_owned(), OTHER_KEY.to_owned()),
            ("acct".to_owned(), KEY.to_owned()),
            ("elsewhere".to_owned(), OTHER_KEY.to_owned()),
        ];
        let facts = |deleting: bool, spec| Facts {
            spec,
            status: &status,
            deleting,
            config_name: "p",
            config_exists: true,
            config: Some((&config, "acct")),
            namespace: "team-a",
            namespace_labels: &labels,
            unrecorded: &unrecorded,
        };
        // Alive: the other key on the config's account is looked at with the keys status
        // records; the spec's own key is read anyway, another account's is not the config's.
        match of(facts(false, &spec)) {
            Ok(Scope::Live { elsewhere, .. }) => assert_eq!(elsewhere, vec![OTHER_KEY.to_owned()]),
            other => panic!("{other:?}"),
        }
        // Deleted: every such key is a place to look, on whichever account.
        match of(facts(true, &spec)) {
            Ok(Scope::Deleting { places }) => assert_eq!(
                places,
                vec![
                    place("acct", OTHER_KEY, None),
                    place("acct", KEY, Some("g1")),
                    place("elsewhere", OTHER_KEY, None),
                ]
            ),
            other => panic!("{other:?}"),
        }
        // An Orphan deletion leaves the object's grants, duplicates included.
        match of(facts(true, &orphan)) {
            Ok(Scope::Deleting { places }) => assert_eq!(places, vec![]),
            other => panic!("{other:?}"),
        }
    }
}
