//! `KmsKeyPolicy`: one key whose grants the operator audits, and what it found. Owned by
//! platform teams.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{Condition, KEY_ID_PATTERN, ProviderConfigRef};

/// Reports the grants on one KMS key that no KmsGrant declares.
// Each `printcolumn(...)` repeats `type_ = ...`, which clippy mistakes for a duplicated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "kmsgrant.io",
    version = "v1alpha1",
    kind = "KmsKeyPolicy",
    status = "KmsKeyPolicyStatus",
    shortname = "kmskp",
    category = "kms",
    doc = "KmsKeyPolicy audits one KMS key: its status lists the grants on the key that no KmsGrant declares (hand-made, left by other tools or orphaned) and counts those of other clusters, as the operator sees them at each resync.",
    printcolumn(
        name = "Key",
        type_ = "string",
        json_path = ".spec.keyId",
        description = "ID of the audited customer master key"
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
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "Whether the key was listed and compared"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct KmsKeyPolicySpec {
    /// The KmsProviderConfig whose account holds the key (and whose credentials list its
    /// grants). Defaults to the one named `default`.
    #[serde(default)]
    pub provider_config_ref: ProviderConfigRef,

    /// ID of the customer master key to audit (36 characters: lower-case letters and digits in
    /// groups of 8-4-4-4-12).
    #[schemars(pattern(KEY_ID_PATTERN), length(min = 36, max = 36))]
    pub key_id: String,
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
    pub created_at: Option<String>,
    /// The grant's name on the cloud, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `Unmanaged`: no KmsGrant declares it. `OtherCluster`: named for another cluster's
    /// KmsGrant.
    pub owner: GrantOwner,
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
