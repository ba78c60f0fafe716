//! `KmsGrant`: "principal P may perform operations O on key K", owned by one object.

use std::collections::BTreeSet;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{Condition, GRANT_ID_PATTERN, KEY_ALIAS_PATTERN, KEY_ID_PATTERN, PRINCIPAL_PATTERN};
// The wire enums are the client's own, with their schema, so the CRD and the client cannot drift.
pub use kmsgrant_kms::{GranteePrincipalType, Operation};

/// A grant on a KMS customer master key (CMK), kept in place by the operator.
///
/// The operator creates the grant through the KMS API, records its ID in `status.grantId`,
/// recreates it when it disappears from the cloud, replaces it when the spec changes, and
/// revokes (or retires, or leaves) it when this object is deleted.
// Each `printcolumn(...)` repeats `type_ = ...`, which clippy mistakes for a duplicated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "kmsgrant.io",
    version = "v1beta1",
    kind = "KmsGrant",
    namespaced,
    status = "KmsGrantStatus",
    shortname = "kmsg",
    category = "kms",
    doc = "KmsGrant declares a grant on a KMS customer master key: the grantee principal may perform the listed operations on the key. The operator creates, repairs, replaces and revokes the grant on the cloud to match this object.",
    printcolumn(
        name = "Key",
        type_ = "string",
        json_path = ".spec.keyId",
        description = "ID of the customer master key"
    ),
    printcolumn(
        name = "Alias",
        type_ = "string",
        json_path = ".spec.keyRef.alias",
        description = "Alias naming the key, when the key is given by alias"
    ),
    printcolumn(
        name = "Key-In-Use",
        type_ = "string",
        json_path = ".status.keyId",
        description = "The key the grant is on: spec.keyId, or the key spec.keyRef.alias resolved to",
        priority = "1"
    ),
    printcolumn(
        name = "Grantee",
        type_ = "string",
        json_path = ".spec.granteePrincipal",
        description = "User or account that receives the permissions"
    ),
    printcolumn(
        name = "Operations",
        type_ = "string",
        json_path = ".spec.operations",
        description = "Operations the grantee may perform"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "Whether the grant exists on the cloud and matches the spec"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason",
        description = "Why the grant is or is not ready"
    ),
    printcolumn(
        name = "Grant-ID",
        type_ = "string",
        json_path = ".status.grantId",
        description = "ID of the grant on the cloud"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    printcolumn(
        name = "Provider",
        type_ = "string",
        json_path = ".spec.providerConfigRef.name",
        description = "The provider config whose account holds the grant",
        priority = "1"
    )
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "has(self.keyId) || has(self.keyRef)",
        "message": "set spec.keyId (a key ID) or spec.keyRef (a key alias): one of them is required",
        "fieldPath": ".keyId",
        "reason": "FieldValueRequired"
    },
    {
        "rule": "!(has(self.keyId) && has(self.keyRef))",
        "message": "spec.keyId and spec.keyRef are mutually exclusive: set only one of them",
        "fieldPath": ".keyRef",
        "reason": "FieldValueForbidden"
    }
]))]
pub struct KmsGrantSpec {
    /// The KmsProviderConfig (cluster-scoped) that says which KMS endpoint to use and with which
    /// credentials. Defaults to the one named `default`.
    #[serde(default)]
    pub provider_config_ref: ProviderConfigRef,

    /// ID of the customer master key to grant on, for example
    /// `bb6a3d22-dc93-47ac-b5bd-88df7ad35f1e` (36 characters: lower-case letters and digits in
    /// groups of 8-4-4-4-12). Default Master Keys (alias ending in `/default`) cannot be granted.
    /// Exactly one of `keyId` and `keyRef` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(KEY_ID_PATTERN), length(min = 36, max = 36))]
    pub key_id: Option<String>,

    /// The key by alias instead of by ID: the operator resolves it with `describe-key` and
    /// follows the alias when it moves to another key (the grant is created on the new key before
    /// the one on the old key is revoked). Exactly one of `keyId` and `keyRef` is set.
    // Boxed: most objects name their key by ID, and the grant cache holds every object (see
    // `cached_object_size` below).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_ref: Option<Box<KeyAliasRef>>,

    /// ID of the user (or, with `granteePrincipalType: domain`, the account) that receives the
    /// permissions: 1 to 64 letters and digits.
    #[schemars(pattern(PRINCIPAL_PATTERN), length(min = 1, max = 64))]
    pub grantee_principal: String,

    /// Whether `granteePrincipal` is a user ID (`user`) or an account (domain) ID (`domain`).
    #[serde(default)]
    pub grantee_principal_type: GranteePrincipalType,

    /// Operations the grantee may perform on the key, each at most once. `create-grant` cannot be
    /// the only value. `encrypt-data` and `decrypt-data` are accepted by Huawei Cloud only.
    #[schemars(length(min = 1, max = 9))]
    #[schemars(extend(
        "x-kubernetes-list-type" = "set",
        "x-kubernetes-validations" = [{
            "rule": "!(self.size() == 1 && self[0] == 'create-grant')",
            "message": "create-grant cannot be the only value; add the operations the grantee needs"
        }]
    ))]
    pub operations: Vec<Operation>,

    /// Takes over an existing grant made outside the operator: the ID of the grant on `keyId`
    /// (64 hexadecimal characters). Only where the KmsProviderConfig allows import for this
    /// namespace (`importNamespaceSelector`), and never a grant whose name carries another
    /// object's identity. The grant is kept while it matches this spec; when the spec differs,
    /// an identity-named grant is created first and the imported one is then revoked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(GRANT_ID_PATTERN), length(min = 64, max = 64))]
    pub import_grant_id: Option<String>,

    /// ID of the user who may retire the grant: 1 to 64 letters and digits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(PRINCIPAL_PATTERN), length(min = 1, max = 64))]
    pub retiring_principal: Option<String>,

    /// What happens to the grant on the cloud when this object is deleted: `Revoke` it (as the
    /// key's owner), `Retire` it (as the retiring principal or grantor), or `Orphan` it (leave it
    /// in place).
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
}

impl KmsGrant {
    /// Whether deletion must wait for the operator (its finalizer): unless the grant is to be
    /// left (`Orphan`) and no replaced grant waits to be revoked.
    pub fn wants_finalizer(&self) -> bool {
        self.spec.deletion_policy != DeletionPolicy::Orphan
            || self
                .status
                .as_ref()
                .is_some_and(|s| s.superseded_grant.is_some())
    }
}

impl KmsGrantSpec {
    /// The operations as a set: KMS may return them in any order, so they compare as sets.
    pub fn operation_set(&self) -> BTreeSet<Operation> {
        self.operations.iter().copied().collect()
    }

    /// How the spec names its key, for logs and messages: the key ID, or the alias.
    pub fn key_label(&self) -> &str {
        match (&self.key_id, &self.key_ref) {
            (Some(key_id), _) => key_id,
            (None, Some(key_ref)) => &key_ref.alias,
            (None, None) => "",
        }
    }

    /// The alias the key is named by, when it is named by alias.
    pub fn key_alias(&self) -> Option<&str> {
        match (&self.key_id, &self.key_ref) {
            (None, Some(key_ref)) => Some(&key_ref.alias),
            _ => None,
        }
    }
}

/// A key named by its alias.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct KeyAliasRef {
    /// The key's alias as `describe-key` takes it: `alias/` followed by the alias (1 to 255
    /// letters, digits, `:`, `/`, `_` or `-`), for example `alias/app`. Aliases ending in
    /// `/default` belong to Default Master Keys, which KMS never grants, and are refused.
    #[schemars(pattern(KEY_ALIAS_PATTERN), length(min = 7, max = 261))]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "!self.matches('^alias/.*/default$')",
        "message": "aliases ending in /default name Default Master Keys, which KMS never grants; name a customer master key",
        "reason": "FieldValueInvalid"
    }]))]
    pub alias: String,
}

/// A reference to a provider config by kind and name.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[schemars(extend("default" = {"kind": "KmsProviderConfig", "name": "default"}))]
pub struct ProviderConfigRef {
    /// The kind of the config: `KmsProviderConfig` (cluster-scoped, the default) or
    /// `KmsNamespacedProviderConfig` (in the KmsGrant's own namespace; never another's).
    #[serde(default)]
    pub kind: ProviderConfigKind,
    /// Name of the provider config.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

impl Default for ProviderConfigRef {
    fn default() -> Self {
        Self {
            kind: ProviderConfigKind::default(),
            name: "default".to_owned(),
        }
    }
}

/// The kinds a `providerConfigRef` may name.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ProviderConfigKind {
    /// The cluster-scoped `KmsProviderConfig`.
    #[default]
    KmsProviderConfig,
    /// A `KmsNamespacedProviderConfig` of the KmsGrant's own namespace.
    KmsNamespacedProviderConfig,
}

/// What happens to the cloud grant when the KmsGrant is deleted.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum DeletionPolicy {
    /// Revoke the grant as the key's owner.
    #[default]
    Revoke,
    /// Retire the grant (as the retiring principal or the grantor).
    Retire,
    /// Leave the grant on the cloud.
    Orphan,
}

/// What the operator observed and did, written by the operator only.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KmsGrantStatus {
    /// ID of the grant this object owns on the cloud (64 hexadecimal characters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant_id: Option<String>,

    /// The key in use: the key the owned grant lives on, else the key the spec names (for
    /// `spec.keyRef`, the key its alias resolved to). It differs from the spec's key while a key
    /// change or an alias move is being carried out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,

    /// Name of the owned grant on the cloud: this object's identity
    /// `k8s/<cluster>/<namespace>/<name>` (or the name of an imported grant).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant_name: Option<String>,

    /// The cloud account the owned grant lives on: `<endpoint> <projectId>`. Deletion revokes
    /// there, even after the provider config was pointed elsewhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,

    /// The principal that issued (created) the grant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuing_principal: Option<String>,

    /// When the grant was created on the cloud (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("format" = "date-time"))]
    pub created_at: Option<String>,

    /// A grant this object owned before a spec change, kept until it has been revoked so that a
    /// crash in the middle of a replacement still cleans it up.
    // Boxed, as `revokedDuplicate`: rarely set, and the grant cache holds every object, so an
    // empty one costs a pointer instead of 72 bytes inline (see `cached_object_size` below).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub superseded_grant: Option<Box<GrantRef>>,

    /// The last grant of this object's identity that this cluster revoked as a duplicate (one
    /// status did not record). A grant of the identity created on the cloud after it that this
    /// cluster did not make is the signature of a second live cluster running with the same
    /// cluster name (reason `ClusterNameInUse`, docs/identity.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_duplicate: Option<Box<RevokedDuplicate>>,

    /// The `metadata.generation` the conditions describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// When the grant was last compared with the cloud (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("format" = "date-time"))]
    pub last_sync_time: Option<String>,

    /// Ready, Reconciling and Stalled, in the kstatus convention.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// A duplicate of the object's identity this cluster revoked (`status.revokedDuplicate`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RevokedDuplicate {
    /// ID of the revoked grant.
    pub grant_id: String,
    /// The newest creation time of the grants on the key in the listing the revoke was decided
    /// from, in the cloud's clock (RFC 3339, milliseconds). Every grant this cluster created
    /// before the revoke was in that listing, so a grant of the identity created later was made
    /// by someone else; comparing two times of the cloud's clock leaves the operator's own clock
    /// (and its skew) out.
    #[schemars(extend("format" = "date-time"))]
    pub listed_until: String,
    /// When the revoke was made, in the operator's clock (RFC 3339); for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("format" = "date-time"))]
    pub revoked_at: Option<String>,
}

/// A grant on a key, by ID.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GrantRef {
    /// ID of the key the grant is on.
    pub key_id: String,
    /// ID of the grant.
    pub grant_id: String,
    /// The cloud account (`<endpoint> <projectId>`) the grant lives on, when it is not the one
    /// `status.account` names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
}

#[cfg(test)]
mod tests {
    /// The grant cache holds every object in an `Arc` (two counts, 16 bytes), which jemalloc
    /// rounds up to its next size class: 768 bytes since the rarely set fields (`spec.keyRef`,
    /// `status.supersededGrant`, `status.revokedDuplicate`) are boxed, 1,024 before (at 10,000
    /// objects, 2.4 MiB). A field added inline may cross it again.
    #[test]
    fn cached_object_size() {
        let size = std::mem::size_of::<super::KmsGrant>();
        assert!(size + 16 <= 768, "KmsGrant is {size} bytes");
    }
}
