//! `KmsNamespacedProviderConfig`: a team's own KMS account, usable only by KmsGrants of its own
//! namespace (docs/tenants.md). The cluster-scoped `KmsProviderConfig` stays the platform team's.
//!
//! It says less than the cluster kind, on purpose: its credentials come from its own namespace
//! only (a Secret there, or a ServiceAccount there for keyless auth; never a file of the
//! operator's pod), it has no namespace selectors (its namespace is its scope), no CA bundle and
//! no audit list. Its endpoints are checked against the platform's tenant policy before any
//! request is sent. The controller works on it through [`KmsNamespacedProviderConfig::as_cluster_spec`],
//! the equivalent cluster spec, so grants, identity, import and drift repair behave the same.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::{CustomResource, ResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::provider::URL_PATTERN;
use super::{
    AgencyReference, AuthConfig, AuthType, KEY_ID_PATTERN, KmsProviderConfigSpec,
    KmsProviderConfigStatus, Operation, RateLimit, SecretReference, ServiceAccountTokenReference,
    SigningVariant, TemporaryAccessKey, WebIdentity,
};

/// A KMS account of one team, usable only by the KmsGrants of its own namespace.
// Each `printcolumn(...)` repeats `type_ = ...`, which clippy mistakes for a duplicated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "kmsgrant.io",
    version = "v1beta1",
    kind = "KmsNamespacedProviderConfig",
    namespaced,
    status = "KmsProviderConfigStatus",
    shortname = "kmsnpc",
    category = "kms",
    doc = "KmsNamespacedProviderConfig is a team's own KMS account: endpoint, project and credentials from its own namespace, usable only by KmsGrants in that namespace (spec.providerConfigRef.kind: KmsNamespacedProviderConfig). Its endpoints must pass the platform's tenant policy.",
    printcolumn(
        name = "Endpoint",
        type_ = "string",
        json_path = ".spec.endpoint",
        description = "KMS endpoint"
    ),
    printcolumn(
        name = "Auth",
        type_ = "string",
        json_path = ".spec.auth.type",
        description = "Authentication method"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "Whether the credentials work against the endpoint"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason",
        description = "Why the config is or is not ready"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    printcolumn(
        name = "Project",
        type_ = "string",
        json_path = ".status.projectId",
        description = "The project the config works in",
        priority = "1"
    )
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "has(self.projectId) != has(self.projectName)",
        "message": "set exactly one of projectId or projectName",
        "fieldPath": ".projectId",
        "reason": "FieldValueInvalid"
    },
    {
        "rule": "!(self.auth.type == 'Password' || self.auth.type == 'WebIdentity' || has(self.auth.agency) || has(self.projectName)) || has(self.iamEndpoint)",
        "message": "iamEndpoint is required for Password and WebIdentity auth, an agency or a projectName (they need IAM)",
        "fieldPath": ".iamEndpoint",
        "reason": "FieldValueRequired"
    }
]))]
pub struct KmsNamespacedProviderConfigSpec {
    /// Base URL of the KMS endpoint, for example `https://kms.eu-de.otc.t-systems.com`. https
    /// only, and a host the platform's tenant policy allows (by default the public KMS endpoints
    /// of Open Telekom Cloud and Huawei Cloud).
    #[schemars(length(min = 1, max = 2048), pattern(URL_PATTERN))]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "isURL(self)",
        "message": "must be an https URL such as https://kms.eu-de.otc.t-systems.com"
    }]))]
    pub endpoint: String,

    /// Base URL of the IAM endpoint, for example `https://iam.eu-de.otc.t-systems.com`, checked
    /// like `endpoint`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 2048), pattern(URL_PATTERN))]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "isURL(self)",
        "message": "must be an https URL such as https://iam.eu-de.otc.t-systems.com"
    }]))]
    pub iam_endpoint: Option<String>,

    /// Cloud region, for example `eu-de`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^[a-z0-9][a-z0-9-]{0,63}$"))]
    pub region: Option<String>,

    /// ID of the project the keys live in. Set this or `projectName`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^[a-zA-Z0-9-]{1,64}$"))]
    pub project_id: Option<String>,

    /// Name of the project the keys live in; its ID is looked up through IAM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^[a-zA-Z0-9_.-]{1,64}$"))]
    pub project_name: Option<String>,

    /// How the operator authenticates to this account, with credentials from this namespace.
    pub auth: NamespacedAuthConfig,

    /// KmsGrants of this namespace may take over existing grants of this account by ID
    /// (`spec.importGrantId`).
    #[serde(default)]
    pub allow_import: bool,

    /// If set, KmsGrants using this config may only grant on these key IDs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-kubernetes-list-type" = "set"), length(max = 1000), inner(pattern(KEY_ID_PATTERN)))]
    pub allowed_key_ids: Option<Vec<String>>,

    /// If set, KmsGrants using this config may only grant these operations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-kubernetes-list-type" = "set"), length(max = 9))]
    pub allowed_operations: Option<Vec<Operation>>,

    /// Client-side rate limit for KMS calls made with this config; capped by the platform's
    /// tenant policy.
    #[serde(default)]
    pub rate_limit: RateLimit,
}

/// How the operator authenticates, with credentials of the config's own namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "(self.type == 'WebIdentity') != has(self.secretRef)",
        "message": "secretRef is required for type AccessKey and Password and must be absent for WebIdentity",
        "fieldPath": ".secretRef",
        "reason": "FieldValueInvalid"
    },
    {
        "rule": "(self.type == 'WebIdentity') == has(self.webIdentity)",
        "message": "webIdentity is required for type WebIdentity and allowed only with it",
        "fieldPath": ".webIdentity",
        "reason": "FieldValueInvalid"
    },
    {
        "rule": "!has(self.temporaryAccessKey) || self.type == 'WebIdentity' || has(self.agency)",
        "message": "temporaryAccessKey needs type WebIdentity or an agency",
        "fieldPath": ".temporaryAccessKey",
        "reason": "FieldValueInvalid"
    },
    {
        "rule": "!(self.type == 'AccessKey' && has(self.agency)) || has(self.temporaryAccessKey)",
        "message": "an agency on AccessKey auth needs temporaryAccessKey",
        "fieldPath": ".agency",
        "reason": "FieldValueInvalid"
    }
]))]
pub struct NamespacedAuthConfig {
    /// `AccessKey`, `Password` or `WebIdentity`, as on KmsProviderConfig.
    #[serde(rename = "type")]
    pub type_: AuthType,
    /// The Secret in this namespace holding the credentials (AccessKey and Password only). The
    /// operator may read it only where the namespace granted it that (docs/tenants.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<LocalSecretReference>,
    /// The IAM identity provider and a ServiceAccount of this namespace whose tokens the operator
    /// requests and exchanges (WebIdentity only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub web_identity: Option<NamespacedWebIdentity>,
    /// An agency of another account, assumed on top of the credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agency: Option<AgencyReference>,
    /// Sign KMS calls with temporary AK/SK instead of sending the IAM token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temporary_access_key: Option<TemporaryAccessKey>,
    /// AK/SK signature format: `Huawei` or `OpenTelekomCloud`.
    #[serde(default)]
    pub signing_variant: SigningVariant,
}

/// A Secret of the config's own namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct LocalSecretReference {
    /// Name of the Secret.
    #[schemars(
        length(min = 1, max = 253),
        pattern(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub name: String,
}

/// Keyless auth for a tenant: only a ServiceAccount of the config's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NamespacedWebIdentity {
    /// The IAM identity provider (protocol `oidc`), sent as `X-Idp-Id`.
    #[schemars(length(min = 1, max = 64), pattern(r"^[A-Za-z0-9_-]+$"))]
    pub identity_provider_id: String,
    /// The ServiceAccount of this namespace whose tokens are exchanged.
    pub service_account_ref: LocalServiceAccountTokenReference,
}

/// A ServiceAccount of the config's own namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LocalServiceAccountTokenReference {
    /// Name of the ServiceAccount.
    #[schemars(
        length(min = 1, max = 253),
        pattern(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub name: String,
    /// The token's audiences: the identity provider's `client_id`.
    #[schemars(length(min = 1, max = 8), inner(length(min = 1, max = 256)))]
    pub audiences: Vec<String>,
    /// Requested token lifetime in seconds (600 to 86400).
    #[serde(default = "default_expiration_seconds")]
    #[schemars(range(min = 600, max = 86400))]
    pub expiration_seconds: i64,
}

fn default_expiration_seconds() -> i64 {
    3600
}

/// The label every namespace carries with its own name (set by the API server).
const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

impl KmsNamespacedProviderConfig {
    /// The cluster spec this config means, so the controller treats both kinds alike: the
    /// Secret and ServiceAccount in its own namespace, usable (and importable, if allowed) only
    /// by KmsGrants of that namespace, no CA bundle, no audit list.
    pub fn as_cluster_spec(&self) -> KmsProviderConfigSpec {
        let namespace = self.namespace().unwrap_or_default();
        let spec = &self.spec;
        let own_namespace = LabelSelector {
            match_labels: Some(BTreeMap::from([(
                NAMESPACE_NAME_LABEL.to_owned(),
                namespace.clone(),
            )])),
            match_expressions: None,
        };
        KmsProviderConfigSpec {
            endpoint: spec.endpoint.clone(),
            iam_endpoint: spec.iam_endpoint.clone(),
            region: spec.region.clone(),
            project_id: spec.project_id.clone(),
            project_name: spec.project_name.clone(),
            auth: AuthConfig {
                type_: spec.auth.type_,
                secret_ref: spec.auth.secret_ref.as_ref().map(|s| SecretReference {
                    namespace: namespace.clone(),
                    name: s.name.clone(),
                }),
                web_identity: spec.auth.web_identity.as_ref().map(|w| WebIdentity {
                    identity_provider_id: w.identity_provider_id.clone(),
                    token_file: None,
                    service_account_ref: Some(ServiceAccountTokenReference {
                        namespace: namespace.clone(),
                        name: w.service_account_ref.name.clone(),
                        audiences: w.service_account_ref.audiences.clone(),
                        expiration_seconds: w.service_account_ref.expiration_seconds,
                    }),
                }),
                agency: spec.auth.agency.clone(),
                temporary_access_key: spec.auth.temporary_access_key,
                signing_variant: spec.auth.signing_variant,
            },
            namespace_selector: Some(own_namespace.clone()),
            import_namespace_selector: spec.allow_import.then_some(own_namespace),
            allowed_key_ids: spec.allowed_key_ids.clone(),
            audit_key_ids: None,
            allowed_operations: spec.allowed_operations.clone(),
            rate_limit: spec.rate_limit,
            ca_bundle: None,
        }
    }
}
