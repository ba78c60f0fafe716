//! `KmsProviderConfig`: where and as whom the operator talks to KMS. Owned by platform teams.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{Condition, KEY_ID_PATTERN, Operation};

/// The KMS endpoint, region, project and credentials that KmsGrants naming this config use, and
/// the guardrails on what those grants may do.
// Each `printcolumn(...)` repeats `type_ = ...`, which clippy mistakes for a duplicated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "kmsgrant.io",
    version = "v1beta1",
    kind = "KmsProviderConfig",
    status = "KmsProviderConfigStatus",
    shortname = "kmspc",
    category = "kms",
    doc = "KmsProviderConfig says which KMS endpoint, region and project the operator uses and which credentials it signs with, and limits which namespaces, keys and operations KmsGrants may use.",
    printcolumn(
        name = "Endpoint",
        type_ = "string",
        json_path = ".spec.endpoint",
        description = "KMS endpoint"
    ),
    printcolumn(
        name = "Region",
        type_ = "string",
        json_path = ".spec.region",
        description = "Cloud region"
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
    ),
    printcolumn(
        name = "Agency",
        type_ = "string",
        json_path = ".spec.auth.agency.name",
        description = "The agency the operator assumes, if any",
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
        "rule": "self.auth.type != 'Password' || has(self.iamEndpoint)",
        "message": "iamEndpoint is required when auth.type is Password (tokens come from IAM)",
        "fieldPath": ".iamEndpoint",
        "reason": "FieldValueRequired"
    },
    {
        "rule": "!(self.auth.type == 'WebIdentity' || has(self.auth.agency)) || has(self.iamEndpoint)",
        "message": "iamEndpoint is required for WebIdentity auth or an agency (tokens come from IAM)",
        "fieldPath": ".iamEndpoint",
        "reason": "FieldValueRequired"
    },
    {
        "rule": "!has(self.projectName) || has(self.iamEndpoint)",
        "message": "iamEndpoint is required when projectName is set (the project ID is looked up in IAM)",
        "fieldPath": ".iamEndpoint",
        "reason": "FieldValueRequired"
    }
]))]
pub struct KmsProviderConfigSpec {
    /// Base URL of the KMS endpoint, for example `https://kms.eu-de.otc.t-systems.com`. Plain
    /// `http://` is for local emulators only.
    #[schemars(length(min = 1, max = 2048), pattern(URL_PATTERN))]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "isURL(self)",
        "message": "must be an http(s) URL such as https://kms.eu-de.otc.t-systems.com"
    }]))]
    pub endpoint: String,

    /// Base URL of the IAM endpoint, for example `https://iam.eu-de.otc.t-systems.com`. Needed for
    /// Password auth and to resolve `projectName`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 2048), pattern(URL_PATTERN))]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "isURL(self)",
        "message": "must be an http(s) URL such as https://iam.eu-de.otc.t-systems.com"
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

    /// Name of the project the keys live in (on Open Telekom Cloud the default project is named
    /// after the region, e.g. `eu-de`); its ID is looked up through IAM. Set this or `projectId`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^[a-zA-Z0-9_.-]{1,64}$"))]
    pub project_name: Option<String>,

    /// How the operator authenticates to KMS.
    pub auth: AuthConfig,

    /// Only KmsGrants in namespaces whose labels match may use this config. Absent: every
    /// namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "!has(self.matchExpressions) || self.matchExpressions.all(e, (e.operator in ['In', 'NotIn'] && has(e.values) && size(e.values) > 0) || (e.operator in ['Exists', 'DoesNotExist'] && (!has(e.values) || size(e.values) == 0)))",
        "message": "each matchExpressions entry needs operator In or NotIn with at least one value, or Exists or DoesNotExist without values",
        "fieldPath": ".matchExpressions",
        "reason": "FieldValueInvalid"
    }]))]
    pub namespace_selector: Option<LabelSelector>,

    /// KmsGrants in namespaces whose labels match may take over existing grants by ID
    /// (`spec.importGrantId`). Absent: import is off. `{}` allows every namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "!has(self.matchExpressions) || self.matchExpressions.all(e, (e.operator in ['In', 'NotIn'] && has(e.values) && size(e.values) > 0) || (e.operator in ['Exists', 'DoesNotExist'] && (!has(e.values) || size(e.values) == 0)))",
        "message": "each matchExpressions entry needs operator In or NotIn with at least one value, or Exists or DoesNotExist without values",
        "fieldPath": ".matchExpressions",
        "reason": "FieldValueInvalid"
    }]))]
    pub import_namespace_selector: Option<LabelSelector>,

    /// If set, KmsGrants using this config may only grant on these key IDs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-kubernetes-list-type" = "set"), length(max = 1000), inner(pattern(KEY_ID_PATTERN)))]
    pub allowed_key_ids: Option<Vec<String>>,

    /// Keys on this account whose grants the unmanaged-grant audit counts
    /// (`kmsgrant_unmanaged_grants`) even when no KmsGrant uses them. Each such key costs one
    /// `list-grants` walk per resync; keys KmsGrants use are audited anyway, at no extra cost. A
    /// KmsKeyPolicy on a key also shows what was found in its status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-kubernetes-list-type" = "set"), length(max = 1000), inner(pattern(KEY_ID_PATTERN)))]
    pub audit_key_ids: Option<Vec<String>>,

    /// If set, KmsGrants using this config may only grant these operations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-kubernetes-list-type" = "set"), length(max = 9))]
    pub allowed_operations: Option<Vec<Operation>>,

    /// Client-side rate limit for KMS calls made with this config, shared by all its KmsGrants.
    #[serde(default)]
    pub rate_limit: RateLimit,

    /// PEM bundle of extra certificate authorities to trust for the endpoints (private
    /// endpoints).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_bundle: Option<String>,
}

pub(super) const URL_PATTERN: &str = r"^https?://[^\s/?#]+[^\s]*$";

/// How the operator authenticates to KMS.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "(self.type == 'WebIdentity') != has(self.secretRef)",
        "message": "secretRef is required for type AccessKey and Password and must be absent for WebIdentity (it needs no Secret)",
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
        "message": "temporaryAccessKey needs type WebIdentity or an agency (AccessKey auth already signs with AK/SK; a Password token gains nothing from it)",
        "fieldPath": ".temporaryAccessKey",
        "reason": "FieldValueInvalid"
    },
    {
        "rule": "!(self.type == 'AccessKey' && has(self.agency)) || has(self.temporaryAccessKey)",
        "message": "an agency on AccessKey auth needs temporaryAccessKey (IAM gives agency tokens only to token holders)",
        "fieldPath": ".agency",
        "reason": "FieldValueInvalid"
    }
]))]
pub struct AuthConfig {
    /// `WebIdentity`: no stored secret; the operator exchanges a Kubernetes ServiceAccount token
    /// (OpenID Connect) at IAM for a token (`webIdentity`). `AccessKey`: sign each request with
    /// an access key / secret key pair (Secret keys `accessKey`, `secretKey`, optional
    /// `securityToken`). `Password`: get IAM tokens with a user's password (Secret keys
    /// `username`, `password`, `domainName`).
    #[serde(rename = "type")]
    pub type_: AuthType,
    /// The Secret holding the credentials (AccessKey and Password only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretReference>,
    /// Where the ID token comes from and which IAM identity provider takes it (WebIdentity only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub web_identity: Option<WebIdentity>,
    /// An agency of another account, assumed on top of the credentials above: grants are then
    /// made in the delegating account, whose project `projectId`/`projectName` names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agency: Option<AgencyReference>,
    /// Sign KMS calls with temporary AK/SK and `X-Security-Token` (`OS-CREDENTIAL/
    /// securitytokens`) instead of sending the IAM token. Absent: the IAM token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temporary_access_key: Option<TemporaryAccessKey>,
    /// AK/SK signature format (AccessKey auth and temporary keys): `Huawei` signs
    /// `SDK-HMAC-SHA256 Access=<AK>, ...` as Huawei Cloud's SDKs do; `OpenTelekomCloud` signs
    /// `SDK-HMAC-SHA256 Credential=<AK>/<date>/<region>/kms/sdk_request, ...` with a derived key, as
    /// Open Telekom Cloud's gophertelekomcloud does.
    #[serde(default)]
    pub signing_variant: SigningVariant,
}

/// OpenID Connect federation: a ServiceAccount token exchanged at
/// `POST /v3.0/OS-AUTH/id-token/tokens` for an IAM token. Set `tokenFile` or
/// `serviceAccountRef`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.tokenFile) != has(self.serviceAccountRef)",
    "message": "set exactly one of tokenFile or serviceAccountRef",
    "fieldPath": ".tokenFile",
    "reason": "FieldValueInvalid"
}]))]
pub struct WebIdentity {
    /// The IAM identity provider (protocol `oidc`) whose OpenID Connect configuration holds the
    /// cluster's issuer, JWKS and `client_id`; sent as `X-Idp-Id`.
    #[schemars(length(min = 1, max = 64), pattern(r"^[A-Za-z0-9_-]+$"))]
    pub identity_provider_id: String,
    /// A projected ServiceAccount token of the operator's pod (audience: the provider's
    /// `client_id`), re-read at every exchange. Must lie under the operator's
    /// `--web-identity-token-dir` (default `/var/run/secrets/kmsgrant`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 2, max = 4096), pattern(r"^/[^\s]*$"))]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "!self.matches('(^|/)[.][.](/|$)')",
        "message": "must be an absolute path without '..' segments"
    }]))]
    pub token_file: Option<String>,
    /// A ServiceAccount in the operator's namespace for which the operator requests a token
    /// (TokenRequest) with these audiences at every exchange.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_ref: Option<ServiceAccountTokenReference>,
}

/// A ServiceAccount whose tokens the operator requests.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceAccountTokenReference {
    /// Must be the operator's own namespace (`ServiceAccountNamespaceNotAllowed` otherwise).
    #[schemars(length(min = 1, max = 63), pattern(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub namespace: String,
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
    #[serde(default = "ServiceAccountTokenReference::default_expiration_seconds")]
    #[schemars(range(min = 600, max = 86400))]
    pub expiration_seconds: i64,
}

impl ServiceAccountTokenReference {
    fn default_expiration_seconds() -> i64 {
        3600
    }
}

/// An agency (`assume_role`) of the delegating account.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.domainName) != has(self.domainId)",
    "message": "set exactly one of domainName or domainId (the delegating account)",
    "fieldPath": ".domainName",
    "reason": "FieldValueInvalid"
}]))]
pub struct AgencyReference {
    /// `agency_name`, as the delegating account created it.
    #[schemars(length(min = 1, max = 64))]
    pub name: String,
    /// The delegating account's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub domain_name: Option<String>,
    /// The delegating account's ID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^[a-zA-Z0-9-]{1,64}$"))]
    pub domain_id: Option<String>,
}

/// Temporary AK/SK for KMS calls.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TemporaryAccessKey {
    /// Lifetime asked for (`duration_seconds`, 900 to 86400); refreshed a fifth of it early.
    #[serde(default = "TemporaryAccessKey::default_duration_seconds")]
    #[schemars(range(min = 900, max = 86400))]
    pub duration_seconds: u32,
}

impl TemporaryAccessKey {
    fn default_duration_seconds() -> u32 {
        3600
    }
}

/// The AK/SK signature format.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum SigningVariant {
    /// `Access=<AK>`, key = SK.
    #[default]
    Huawei,
    /// `Credential=<AK>/<date>/<region>/kms/sdk_request`, derived key.
    OpenTelekomCloud,
}

/// An authentication method.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum AuthType {
    /// OpenID Connect federation with a Kubernetes ServiceAccount token: no stored secret.
    WebIdentity,
    /// AK/SK request signing (`SDK-HMAC-SHA256`).
    AccessKey,
    /// IAM password authentication with project-scoped tokens.
    Password,
}

/// A Secret by namespace and name.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretReference {
    /// Namespace of the Secret: must be the operator's own namespace (its `--secret-namespace`,
    /// normally `kmsgrant-system`); any other is refused with `SecretNamespaceNotAllowed`, so a
    /// config can never make the operator read a Secret elsewhere.
    #[schemars(length(min = 1, max = 63), pattern(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub namespace: String,
    /// Name of the Secret.
    #[schemars(
        length(min = 1, max = 253),
        pattern(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub name: String,
}

/// A token bucket: a sustained rate with a burst allowance.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RateLimit {
    /// Sustained requests per second.
    #[serde(default = "RateLimit::default_requests_per_second")]
    #[schemars(range(min = 1, max = 10000))]
    pub requests_per_second: u32,
    /// Requests that may be sent at once after a quiet period.
    #[serde(default = "RateLimit::default_burst")]
    #[schemars(range(min = 1, max = 10000))]
    pub burst: u32,
}

impl RateLimit {
    fn default_requests_per_second() -> u32 {
        10
    }
    fn default_burst() -> u32 {
        20
    }
}

impl Default for RateLimit {
    fn default() -> Self {
        Self {
            requests_per_second: Self::default_requests_per_second(),
            burst: Self::default_burst(),
        }
    }
}

/// What the operator observed about this config.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KmsProviderConfigStatus {
    /// The project ID in use (resolved from `projectName` when that is given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project_id: Option<String>,
    /// The `metadata.generation` the conditions describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready (the credentials work against the endpoint), Reconciling and Stalled.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// What the operator learned of the account's throttle the last time the cloud answered
    /// 429: a new leader or a restarted operator starts at that rate instead of
    /// `spec.rateLimit` while it is recent, so a failover does not begin with a burst of
    /// throttled calls. Written by the operator only when the cloud throttles it (at once when
    /// lower, else at most once a minute of throttling), never when nothing is throttled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub learned_rate_limit: Option<LearnedRateLimit>,
}

/// The account's throttle as the operator last learned it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LearnedRateLimit {
    /// The rate the operator paced at after the cloud's last 429, in requests per second
    /// (rounded down).
    #[schemars(range(min = 1))]
    pub requests_per_second: u32,
    /// The rate the cloud throttled, in requests per second (rounded up).
    #[schemars(range(min = 1))]
    pub throttled_requests_per_second: u32,
    /// When the cloud throttled (RFC 3339).
    pub last_throttle_time: String,
}
