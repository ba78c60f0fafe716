//! The custom resource types of group `kmsgrant.io`, version `v1beta1` (`v1alpha1` is derived
//! from it, see [`versions`]): data and schema only, no I/O. The CRD YAML in `crds/` is generated
//! from these types (`kmsgrant-operator crd`).

mod grant;
mod policy;
mod provider;
mod tenant;
pub mod versions;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use grant::{
    DeletionPolicy, GrantRef, GranteePrincipalType, KeyAliasRef, KmsGrant, KmsGrantSpec,
    KmsGrantStatus, Operation, ProviderConfigKind, ProviderConfigRef, RevokedDuplicate,
};
pub use policy::{
    AllowedGrants, AuditedGrant, GrantAction, GrantOwner, KmsKeyPolicy, KmsKeyPolicySpec,
    KmsKeyPolicyStatus, UndeclaredGrants,
};
pub use provider::{
    AgencyReference, AuthConfig, AuthType, KmsProviderConfig, KmsProviderConfigSpec,
    KmsProviderConfigStatus, LearnedRateLimit, RateLimit, SecretReference,
    ServiceAccountTokenReference, SigningVariant, TemporaryAccessKey, WebIdentity,
};
pub use tenant::{
    KmsNamespacedProviderConfig, KmsNamespacedProviderConfigSpec, LocalSecretReference,
    LocalServiceAccountTokenReference, NamespacedAuthConfig, NamespacedWebIdentity,
};

pub use versions::{API_VERSION, ApiStage};

/// The API group of every resource here.
pub const GROUP: &str = "kmsgrant.io";

/// KMS key IDs (`key_id`), from the API pages.
pub const KEY_ID_PATTERN: &str = r"^[0-9a-z]{8}-[0-9a-z]{4}-[0-9a-z]{4}-[0-9a-z]{4}-[0-9a-z]{12}$";
/// A key named by alias, as `describe-key` takes it: `alias/` and the KMS alias charset.
pub const KEY_ALIAS_PATTERN: &str = r"^alias/[a-zA-Z0-9:/_-]{1,255}$";
/// Grantee, retiring and issuing principals (user or account IDs), from the API pages.
pub const PRINCIPAL_PATTERN: &str = r"^[a-zA-Z0-9]{1,64}$";
/// Grant IDs (`grant_id`): 64 hexadecimal characters.
pub const GRANT_ID_PATTERN: &str = r"^[0-9a-fA-F]{64}$";

/// Every CustomResourceDefinition this operator serves, in install order, as this release ships
/// them ([`ApiStage::CURRENT`]).
pub fn crds() -> Vec<CustomResourceDefinition> {
    crds_at(ApiStage::CURRENT)
}

/// The CRDs of one step of the API's graduation (docs/versioning.md).
pub fn crds_at(stage: ApiStage) -> Vec<CustomResourceDefinition> {
    vec![
        KmsGrant::crd(),
        KmsProviderConfig::crd(),
        KmsKeyPolicy::crd(),
    ]
    .into_iter()
    .map(|crd| versions::at_stage(unwrap_descriptions(crd), stage))
    // New in v1beta1: it never had another version.
    .chain(std::iter::once(unwrap_descriptions(
        KmsNamespacedProviderConfig::crd(),
    )))
    .collect()
}

/// Doc comments are wrapped at 100 columns; `kubectl explain` wraps on its own, so line breaks
/// inside a paragraph are joined and only paragraph breaks are kept.
fn unwrap_descriptions(crd: CustomResourceDefinition) -> CustomResourceDefinition {
    fn walk(node: &mut serde_json::Value) {
        match node {
            serde_json::Value::Object(map) => {
                for (key, value) in map.iter_mut() {
                    match (key.as_str(), value) {
                        ("description", serde_json::Value::String(text)) => {
                            let paragraphs: Vec<String> = text
                                .split("\n\n")
                                .map(|p| p.split_whitespace().collect::<Vec<_>>().join(" "))
                                .collect();
                            *text = paragraphs.join("\n\n");
                        }
                        (_, value) => walk(value),
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(walk),
            _ => {}
        }
    }
    let mut value = serde_json::to_value(crd).expect("a CRD serialises to JSON");
    walk(&mut value);
    serde_json::from_value(value).expect("only descriptions changed")
}

/// The YAML document of one CRD, as committed in `crds/`.
pub fn crd_yaml(crd: &CustomResourceDefinition) -> String {
    serde_saphyr::to_string(crd).expect("a CRD always serialises to YAML")
}

/// The file name of one CRD in `crds/`.
pub fn crd_file_name(crd: &CustomResourceDefinition) -> String {
    format!("{}.yaml", crd.metadata.name.as_deref().unwrap_or("crd"))
}

/// `metav1.Condition`'s rule for `type`: an optional DNS subdomain prefix and a qualified name.
pub const CONDITION_TYPE_PATTERN: &str = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$";
/// `metav1.Condition`'s rule for `reason`.
pub const CONDITION_REASON_PATTERN: &str = r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$";

/// A condition in the kstatus convention (`Ready`, `Reconciling`, `Stalled`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Condition type: `Ready`, `Reconciling` or `Stalled`.
    #[serde(rename = "type")]
    #[schemars(length(min = 1, max = 316), pattern(CONDITION_TYPE_PATTERN))]
    pub type_: Word,
    /// `True`, `False` or `Unknown`.
    pub status: ConditionStatus,
    /// Why the condition has this status: a CamelCase word from a fixed, documented set.
    #[schemars(length(min = 1, max = 1024), pattern(CONDITION_REASON_PATTERN))]
    pub reason: Word,
    /// What is wrong and what to do about it, for people.
    // Shared: a KmsGrant's three conditions carry the same message (see `controller::slim`),
    // which the grant cache then holds once instead of three times (3 MiB at 10,000 objects).
    #[serde(default)]
    #[schemars(length(max = 32768))]
    pub message: std::sync::Arc<str>,
    /// The `metadata.generation` this condition was computed for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub observed_generation: Option<i64>,
    /// When the status last changed (RFC 3339).
    // Shared like the message: a KmsGrant's conditions usually changed at the same moment.
    #[schemars(extend("format" = "date-time"))]
    pub last_transition_time: std::sync::Arc<str>,
}

/// A short string that many objects repeat, such as a condition's type and reason: decoded
/// values are held once per process (a bounded set of them), so the grant cache keeps one copy
/// of `GrantReady` instead of one per object and condition. Compares and reads as a `str`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, JsonSchema)]
#[serde(transparent)]
#[schemars(transparent)]
pub struct Word(std::sync::Arc<str>);

impl Word {
    /// The longest value held once; longer ones are not repeated words.
    const MAX_SHARED_LEN: usize = 64;
    /// How many distinct values are held at most: the documented types and reasons are some
    /// dozens; values beyond (a status edited by hand) simply get their own copy.
    const MAX_SHARED: usize = 1024;

    /// `value`, sharing the copy already held when there is one.
    pub fn new(value: &str) -> Self {
        use std::collections::HashSet;
        use std::sync::{Arc, LazyLock, Mutex};
        static HELD: LazyLock<Mutex<HashSet<Arc<str>>>> = LazyLock::new(Mutex::default);
        if value.len() > Self::MAX_SHARED_LEN {
            return Self(value.into());
        }
        let mut held = HELD
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(word) = held.get(value) {
            return Self(Arc::clone(word));
        }
        let word: Arc<str> = value.into();
        if held.len() < Self::MAX_SHARED {
            held.insert(Arc::clone(&word));
        }
        Self(word)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for Word {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = std::borrow::Cow::<'de, str>::deserialize(deserializer)?;
        Ok(Self::new(&value))
    }
}

impl std::ops::Deref for Word {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for Word {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for Word {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Word {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&*self.0, f)
    }
}

impl std::fmt::Display for Word {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl Default for Word {
    fn default() -> Self {
        Self::new("")
    }
}

impl From<&str> for Word {
    fn from(value: &str) -> Self {
        Self::new(value)
    }
}

impl From<String> for Word {
    fn from(value: String) -> Self {
        Self::new(&value)
    }
}

impl From<&String> for Word {
    fn from(value: &String) -> Self {
        Self::new(value)
    }
}

impl PartialEq<str> for Word {
    fn eq(&self, other: &str) -> bool {
        *self.0 == *other
    }
}

impl PartialEq<&str> for Word {
    fn eq(&self, other: &&str) -> bool {
        *self.0 == **other
    }
}

impl PartialEq<String> for Word {
    fn eq(&self, other: &String) -> bool {
        *self.0 == **other
    }
}

impl PartialEq<Word> for str {
    fn eq(&self, other: &Word) -> bool {
        *self == *other.0
    }
}

impl PartialEq<Word> for &str {
    fn eq(&self, other: &Word) -> bool {
        **self == *other.0
    }
}

/// The status of a condition.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ConditionStatus {
    True,
    False,
    Unknown,
}
