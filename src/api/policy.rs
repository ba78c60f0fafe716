//! `KmsKeyPolicy`: one key whose grants the operator audits, and what it found. Owned by
//! platform teams.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{Condition, GRANT_ID_PATTERN, KEY_ID_PATTERN, PRINCIPAL_PATTERN, ProviderConfigRef};

/// Reports (and, opted in, revokes) the grants on one KMS key that no KmsGrant declares.
// Each `printcolumn(...)` repeats `type_ = ...`, which clippy mistakes for a duplicated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "kmsgrant.io",
    version = "v1beta1",
    kind = "KmsKeyPolicy",
    status = "KmsKeyPolicyStatus",
    shortname = "kmskp",
    category = "kms",
    doc = "KmsKeyPolicy audits one KMS key: its status lists the grants on the key that no KmsGrant declares (hand-made, left by other tools or orphaned) and counts those of other clusters, as the operator sees them at each resync. With spec.undeclaredGrants Revoke it also revokes them, except the allow-listed ones.",
    printcolumn(
        name = "Key",
        type_ = "string",
        json_path = ".spec.keyId",
        description = "ID of the audited customer master key"
    ),
    printcolumn(
        name = "Mode",
        type_ = "string",
        json_path = ".spec.undeclaredGrants",
        description = "Report (list only) or Revoke (remove undeclared grants)"
    ),
    printcolumn(
        name = "Unmanaged",
        type_ = "integer",
        json_path = ".status.unmanagedGrants",
        description = "Grants on the key that no KmsGrant declares"
    ),
    printcolumn(
        name = "Other-Clusters",
        type_ = "integer",
        json_path = ".status.otherClusterGrants",
        description = "Grants named for another cluster's KmsGrants"
    ),
    printcolumn(
        name = "Revocable",
        type_ = "integer",
        json_path = ".status.revocableGrants",
        description = "Undeclared grants that Revoke removes (in Report mode: would remove)"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "Whether the key was listed and compared"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason",
        description = "Why the audit is or is not ready",
        priority = "1"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct KmsKeyPolicySpec {
    /// The KmsProviderConfig whose account holds the key (and whose credentials list its
    /// grants). Defaults to the one named `default`. Only the cluster-scoped `KmsProviderConfig`:
    /// a cluster-scoped policy has no namespace to find a namespaced config in.
    #[serde(default)]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "!has(self.kind) || self.kind == 'KmsProviderConfig'",
        "message": "a KmsKeyPolicy can only name a KmsProviderConfig (cluster-scoped)",
        "fieldPath": ".kind",
        "reason": "FieldValueInvalid"
    }]))]
    pub provider_config_ref: ProviderConfigRef,

    /// ID of the customer master key to audit (36 characters: lower-case letters and digits in
    /// groups of 8-4-4-4-12).
    #[schemars(pattern(KEY_ID_PATTERN), length(min = 36, max = 36))]
    pub key_id: String,

    /// What to do with the grants on the key that no KmsGrant declares. `Report` (the default,
    /// a dry run): list them in status, each marked with what `Revoke` would do, and count those
    /// it would remove (`status.revocableGrants`); nothing on KMS changes. `Revoke`: revoke them,
    /// paced by the provider config's rate limit, one Event each; never a grant a KmsGrant owns,
    /// one on `allowedGrants`, one named for another cluster (unless `revokeOtherClusters`), nor,
    /// in a sharded operator, one named for this cluster's KmsGrants.
    #[serde(default)]
    pub undeclared_grants: UndeclaredGrants,

    /// Undeclared grants that may stay on the key in `Revoke` mode, by grantee or by grant ID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_grants: Option<AllowedGrants>,

    /// Whether `Revoke` also removes grants named for another cluster's KmsGrants
    /// (`k8s/<other cluster>/...`), which that cluster's operator manages. Default false: they
    /// are counted and kept.
    #[serde(default)]
    pub revoke_other_clusters: bool,

    /// Whether `Revoke` also removes grants named for a KmsGrant of this cluster
    /// (`k8s/<this cluster>/...`, `kmsgrant-<uid>`) whose object does not exist: one an
    /// `Orphan` deletion left. Default false, because such a grant is also what a cluster rebuilt
    /// from Git holds until its KmsGrants are applied again (in whatever order GitOps applies
    /// them). Honoured by an operator that watches every KmsGrant only; a sharded one cannot
    /// tell an orphan from another shard's grant.
    #[serde(default)]
    pub revoke_orphans: bool,
}

/// What happens to grants on the key that no KmsGrant declares.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum UndeclaredGrants {
    /// List them in status and Events; change nothing on KMS (a dry run of `Revoke`).
    #[default]
    Report,
    /// Revoke those not allow-listed.
    Revoke,
}

/// Undeclared grants that `Revoke` leaves in place.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AllowedGrants {
    /// Grantee principals (user or account IDs, 1-64 letters and digits) whose grants stay.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "set"), length(max = 100), inner(pattern(PRINCIPAL_PATTERN)))]
    pub grantees: Vec<String>,

    /// IDs of grants (64 hexadecimal characters) that stay.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "set"), length(max = 100), inner(pattern(GRANT_ID_PATTERN)))]
    pub grant_ids: Vec<String>,
}

/// What the last audit of the key found, written by the operator only.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KmsKeyPolicyStatus {
    /// Grants on the key that no KmsGrant of this cluster declares and that carry no other
    /// cluster's identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unmanaged_grants: Option<u32>,

    /// Grants named for a KmsGrant of another cluster (`k8s/<other cluster>/...`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub other_cluster_grants: Option<u32>,

    /// Undeclared grants that `Revoke` removes, or in `Report` mode would remove (those whose
    /// `action` is `WouldRevoke`, `Revoking`, `RevokeFailed` or `RevokeUnconfirmed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revocable_grants: Option<u32>,

    /// How many grants this policy has revoked, in all (a grant KMS said was already gone is not
    /// counted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_grants: Option<u32>,

    /// The grants counted above (at most 100; a key holds no more), unmanaged ones first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 100))]
    pub grants: Vec<AuditedGrant>,

    /// The cloud account (`<endpoint> <projectId>`) the key was listed on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,

    /// The `metadata.generation` the conditions describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// When the result was last written (RFC 3339): when it changed, else at least hourly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("format" = "date-time"))]
    pub last_audit_time: Option<String>,

    /// Ready (the key was listed and compared), Reconciling and Stalled, in the kstatus
    /// convention.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// One grant found on the key, with what an auditor needs and nothing more.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuditedGrant {
    /// ID of the grant.
    pub grant_id: String,
    /// The user or account that holds the permissions.
    pub grantee_principal: String,
    /// The operations the grant allows.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub operations: Vec<String>,
    /// When the grant was created (RFC 3339), when KMS says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("format" = "date-time"))]
    pub created_at: Option<String>,
    /// The grant's name on the cloud, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `Unmanaged`: no KmsGrant declares it. `OtherCluster`: named for another cluster's
    /// KmsGrant.
    pub owner: GrantOwner,
    /// What the policy does with it (see `spec.undeclaredGrants`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<GrantAction>,
}

/// What a KmsKeyPolicy does with an undeclared grant.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum GrantAction {
    /// On `spec.allowedGrants`: stays.
    Allowed,
    /// Another cluster's, and `spec.revokeOtherClusters` is false: stays.
    KeptOtherCluster,
    /// Named for a KmsGrant of this cluster (`k8s/<this cluster>/...` or `kmsgrant-<uid>`) that
    /// does not exist, or that a sharded operator cannot see: an `Orphan` deletion's grant, a
    /// rebuilt cluster's before its KmsGrants are applied again, another shard's. It stays unless
    /// `spec.revokeOrphans` is set (and the operator watches every KmsGrant).
    KeptThisCluster,
    /// `Report` mode: `Revoke` would revoke it.
    WouldRevoke,
    /// `Revoke` mode: to be revoked (a pass revokes a bounded number).
    Revoking,
    /// Revoked; gone from the list after the key's next listing.
    Revoked,
    /// The revoke failed (see the policy's Warning events); tried again after the next listing.
    RevokeFailed,
    /// The revoke's answer was lost; the next listing shows whether it took effect.
    RevokeUnconfirmed,
}

/// Whose a reported grant is.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, JsonSchema,
)]
pub enum GrantOwner {
    /// No KmsGrant declares it: made by hand, by another tool, or left by an `Orphan` deletion.
    Unmanaged,
    /// Named `k8s/<cluster>/...` for a cluster other than this operator's.
    OtherCluster,
}
