//! Our own types for what KMS says, and the lenient parsing of its wire format.
//!
//! KMS types several numbers as strings (`truncated`, `next_marker`, `creation_date`,
//! `key_state`); the parsers here accept either form so a server that sends the other one does not
//! break us.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;

use secrecy::SecretString;
use serde::{Deserialize, Deserializer, Serialize};

/// Whether the grantee principal is a user or an account (domain).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum GranteePrincipalType {
    /// A user ID.
    #[default]
    User,
    /// An account (domain) ID.
    Domain,
}

impl GranteePrincipalType {
    /// The value KMS uses on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::User => "user",
            Self::Domain => "domain",
        }
    }
}

// An operation a grant may allow.
// Neither the enum nor its variants carry doc comments: schemars would turn them into schema
// descriptions (and the variants into a oneOf); the CRD field that holds them says what they are.
#[allow(missing_docs)]
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
#[serde(rename_all = "kebab-case")]
pub enum Operation {
    CreateDatakey,
    CreateDatakeyWithoutPlaintext,
    EncryptDatakey,
    DecryptDatakey,
    DescribeKey,
    CreateGrant,
    RetireGrant,
    EncryptData,
    DecryptData,
}

impl Operation {
    /// Every operation, in the order of the API page.
    pub const ALL: [Operation; 9] = [
        Self::CreateDatakey,
        Self::CreateDatakeyWithoutPlaintext,
        Self::EncryptDatakey,
        Self::DecryptDatakey,
        Self::DescribeKey,
        Self::CreateGrant,
        Self::RetireGrant,
        Self::EncryptData,
        Self::DecryptData,
    ];

    /// The value KMS uses on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::CreateDatakey => "create-datakey",
            Self::CreateDatakeyWithoutPlaintext => "create-datakey-without-plaintext",
            Self::EncryptDatakey => "encrypt-datakey",
            Self::DecryptDatakey => "decrypt-datakey",
            Self::DescribeKey => "describe-key",
            Self::CreateGrant => "create-grant",
            Self::RetireGrant => "retire-grant",
            Self::EncryptData => "encrypt-data",
            Self::DecryptData => "decrypt-data",
        }
    }

    /// Parses the wire value; `None` for an operation this version does not know.
    pub fn from_wire(value: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|op| op.as_str() == value)
    }
}

/// A customer master key, as `describe-key` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyInfo {
    /// The key's ID.
    pub key_id: String,
    /// Its alias, for example `alias/app`.
    pub key_alias: String,
    /// The account (domain) that owns it.
    pub domain_id: String,
    /// Whether it can be used.
    pub state: KeyState,
    /// A Default Master Key (alias ending in `/default`): it refuses grants.
    pub default_key: bool,
}

impl KeyInfo {
    /// Whether KMS will accept a grant on this key at all.
    pub fn is_default_master_key(&self) -> bool {
        self.default_key || self.key_alias.ends_with("/default")
    }
}

/// `key_state` of a key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyState {
    /// Created without key material yet.
    PendingActivation,
    /// Usable.
    Enabled,
    /// Disabled by its owner; may be enabled again.
    Disabled,
    /// Scheduled for deletion; may be cancelled.
    PendingDeletion,
    /// Waiting for imported key material.
    PendingImport,
    /// A state this version does not know, kept verbatim.
    Other(String),
}

impl KeyState {
    /// Reads the wire value (`1` to `5`); an unknown one is kept as such.
    pub fn from_wire(value: &str) -> Self {
        match value {
            "1" => Self::PendingActivation,
            "2" => Self::Enabled,
            "3" => Self::Disabled,
            "4" => Self::PendingDeletion,
            "5" => Self::PendingImport,
            other => Self::Other(other.to_owned()),
        }
    }
}

/// A grant on a key, as `list-grants` reports it.
///
/// The fields that the grants of one key usually repeat (the key, the grantee, the issuer, the
/// operations) are shared: a listing holds each distinct value once (see [`Grants`]), which
/// keeps a cached listing of 10,000 grants some megabytes smaller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    /// The key the grant is on.
    pub key_id: Arc<str>,
    /// The grant's ID (64 hexadecimal characters).
    pub grant_id: String,
    /// Who received the permissions.
    pub grantee_principal: Arc<str>,
    /// `user` or `domain`; absent on clouds that do not report it (then `user`).
    pub grantee_principal_type: Option<Arc<str>>,
    /// The operations verbatim, in the order the server chose.
    pub operations: Arc<[String]>,
    /// Who created the grant.
    pub issuing_principal: Option<Arc<str>>,
    /// Creation time in milliseconds since the epoch.
    pub created_at_millis: Option<i64>,
    /// The grant's name, if it has one.
    pub name: Option<String>,
    /// Who may retire the grant, if anyone besides the grantee.
    pub retiring_principal: Option<String>,
}

impl Grant {
    /// The operations as a set: KMS may return them in any order.
    pub fn operation_set(&self) -> BTreeSet<&str> {
        self.operations.iter().map(String::as_str).collect()
    }

    /// The grantee type, `user` when the server does not say.
    pub fn grantee_type(&self) -> &str {
        self.grantee_principal_type.as_deref().unwrap_or("user")
    }
}

/// One page of `list-grants`, as the service answered it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GrantPage {
    /// The grants on this page.
    pub grants: Vec<Grant>,
    /// The `marker` of the next page; empty on the last.
    pub next_marker: String,
    /// Whether more pages follow.
    pub truncated: bool,
    /// How many grants the key holds in all, when the service says.
    pub total: Option<u64>,
}

/// What `create-grant` is asked to create.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewGrant {
    /// The key to grant on.
    pub key_id: String,
    /// Who receives the permissions.
    pub grantee_principal: String,
    /// Whether the grantee is a user or an account.
    pub grantee_principal_type: GranteePrincipalType,
    /// What the grantee may do.
    pub operations: Vec<Operation>,
    /// The grant's name on the cloud.
    pub name: Option<String>,
    /// Who may retire the grant.
    pub retiring_principal: Option<String>,
}

/// Used and allowed counts of the project's KMS quotas.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Quotas {
    /// Customer master keys.
    pub keys: Option<Quota>,
    /// Grants per key.
    pub grants_per_key: Option<Quota>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
/// Usage of one resource against its quota.
pub struct Quota {
    /// How many are in use.
    pub used: u64,
    /// How many are allowed.
    pub quota: u64,
}

// ---- wire format -------------------------------------------------------------------------------

#[derive(Deserialize)]
pub(crate) struct DescribeKeyResponse {
    pub key_info: WireKeyInfo,
}

#[derive(Deserialize)]
pub(crate) struct WireKeyInfo {
    pub key_id: String,
    #[serde(default)]
    pub key_alias: String,
    #[serde(default)]
    pub domain_id: String,
    #[serde(default, deserialize_with = "string_or_number")]
    pub key_state: String,
    #[serde(default, deserialize_with = "string_or_number")]
    pub default_key_flag: String,
}

impl From<WireKeyInfo> for KeyInfo {
    fn from(wire: WireKeyInfo) -> Self {
        Self {
            state: KeyState::from_wire(&wire.key_state),
            default_key: wire.default_key_flag == "1",
            key_id: wire.key_id,
            key_alias: wire.key_alias,
            domain_id: wire.domain_id,
        }
    }
}

#[derive(Deserialize)]
pub(crate) struct ListGrantsResponse {
    #[serde(default)]
    pub grants: Vec<WireGrant>,
    #[serde(default, deserialize_with = "string_or_number")]
    pub next_marker: String,
    #[serde(default, deserialize_with = "string_or_bool")]
    pub truncated: bool,
    #[serde(default, deserialize_with = "optional_u64")]
    pub total: Option<u64>,
}

#[derive(Deserialize)]
pub(crate) struct WireGrant {
    pub key_id: String,
    pub grant_id: String,
    pub grantee_principal: String,
    #[serde(default)]
    pub grantee_principal_type: Option<String>,
    #[serde(default)]
    pub operations: Vec<String>,
    #[serde(default)]
    pub issuing_principal: Option<String>,
    #[serde(default, deserialize_with = "optional_string_or_number")]
    pub creation_date: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub retiring_principal: Option<String>,
}

/// Grants decoded from listings, holding each repeated value once (see [`Grant`]). One per
/// walk of a key: its pages share the values.
#[derive(Default)]
pub(crate) struct Grants {
    strings: HashSet<Arc<str>>,
    operations: HashSet<Arc<[String]>>,
}

impl Grants {
    fn shared(&mut self, value: String) -> Arc<str> {
        if let Some(held) = self.strings.get(value.as_str()) {
            return Arc::clone(held);
        }
        let held: Arc<str> = value.into();
        self.strings.insert(Arc::clone(&held));
        held
    }

    fn shared_operations(&mut self, operations: Vec<String>) -> Arc<[String]> {
        if let Some(held) = self.operations.get(operations.as_slice()) {
            return Arc::clone(held);
        }
        let held: Arc<[String]> = operations.into();
        self.operations.insert(Arc::clone(&held));
        held
    }

    /// A listed grant, its repeated values shared with the grants decoded before it.
    pub(crate) fn decode(&mut self, wire: WireGrant) -> Grant {
        Grant {
            created_at_millis: wire.creation_date.as_deref().and_then(parse_creation_date),
            key_id: self.shared(wire.key_id),
            grant_id: wire.grant_id,
            grantee_principal: self.shared(wire.grantee_principal),
            grantee_principal_type: wire
                .grantee_principal_type
                .filter(|t| !t.is_empty())
                .map(|t| self.shared(t)),
            operations: self.shared_operations(wire.operations),
            issuing_principal: wire
                .issuing_principal
                .filter(|p| !p.is_empty())
                .map(|p| self.shared(p)),
            name: wire.name.filter(|n| !n.is_empty()),
            retiring_principal: wire.retiring_principal.filter(|p| !p.is_empty()),
        }
    }
}

impl From<WireGrant> for Grant {
    fn from(wire: WireGrant) -> Self {
        Grants::default().decode(wire)
    }
}

#[derive(Deserialize)]
pub(crate) struct CreateGrantResponse {
    pub grant_id: String,
}

/// The body of IAM's token answer (`POST /v3/auth/tokens`), the parts the client reads. The token
/// itself is not in the body: it is the answer's `X-Subject-Token` header, see [`IssuedToken`].
#[derive(Deserialize, Default)]
pub(crate) struct TokenResponse {
    #[serde(default)]
    pub token: WireToken,
}

#[derive(Deserialize, Default)]
pub(crate) struct WireToken {
    /// RFC 3339; absent or unreadable means "assume the documented lifetime".
    #[serde(default)]
    pub expires_at: Option<String>,
    /// The project the token is scoped to; present when it was asked for by project.
    #[serde(default)]
    pub project: Option<WireProjectRef>,
}

#[derive(Deserialize)]
pub(crate) struct WireProjectRef {
    #[serde(default)]
    pub id: Option<String>,
}

/// An IAM token as issued: the `X-Subject-Token` header with what the answer body says about it.
pub(crate) struct IssuedToken {
    pub token: SecretString,
    pub expires_at: Option<jiff::Timestamp>,
    pub project_id: Option<String>,
}

impl IssuedToken {
    /// Joins the header (`None` when IAM sent none) with the decoded body.
    pub fn new(subject_token: Option<SecretString>, body: TokenResponse) -> Option<Self> {
        Some(Self {
            token: subject_token?,
            expires_at: body.token.expires_at.and_then(|at| at.parse().ok()),
            project_id: body
                .token
                .project
                .and_then(|p| p.id)
                .filter(|id| !id.is_empty()),
        })
    }
}

#[derive(Deserialize)]
pub(crate) struct QuotasResponse {
    pub quotas: WireQuotas,
}

#[derive(Deserialize)]
pub(crate) struct WireQuotas {
    #[serde(default)]
    pub resources: Vec<WireQuota>,
}

#[derive(Deserialize)]
pub(crate) struct WireQuota {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(deserialize_with = "u64_from_string_or_number")]
    pub used: u64,
    #[serde(deserialize_with = "u64_from_string_or_number")]
    pub quota: u64,
}

impl From<WireQuotas> for Quotas {
    fn from(wire: WireQuotas) -> Self {
        let find = |kind: &str| {
            wire.resources
                .iter()
                .find(|r| r.kind == kind)
                .map(|r| Quota {
                    used: r.used,
                    quota: r.quota,
                })
        };
        Self {
            keys: find("CMK"),
            grants_per_key: find("grant_per_CMK"),
        }
    }
}

/// `creation_date`: the pages say seconds, every example is milliseconds. Values below 10^11 are
/// taken as seconds (10^11 ms is 1973; 10^11 s is the year 5138).
pub fn parse_creation_date(value: &str) -> Option<i64> {
    let number: i64 = value.trim().parse().ok()?;
    // Negative dates are nonsense; any other number is kept only if it fits (found by fuzzing: a
    // large negative value overflowed).
    match number {
        ..0 => None,
        0..100_000_000_000 => Some(number * 1000),
        _ => Some(number),
    }
}

fn string_or_number<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    Ok(optional_string_or_number(deserializer)?.unwrap_or_default())
}

fn optional_string_or_number<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<String>, D::Error> {
    Ok(match serde_json::Value::deserialize(deserializer)? {
        serde_json::Value::String(s) => Some(s),
        serde_json::Value::Number(n) => Some(n.to_string()),
        serde_json::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    })
}

fn string_or_bool<'de, D: Deserializer<'de>>(deserializer: D) -> Result<bool, D::Error> {
    Ok(match serde_json::Value::deserialize(deserializer)? {
        serde_json::Value::Bool(b) => b,
        serde_json::Value::String(s) => s.eq_ignore_ascii_case("true"),
        _ => false,
    })
}

fn optional_u64<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<u64>, D::Error> {
    Ok(optional_string_or_number(deserializer)?.and_then(|text| text.parse().ok()))
}

fn u64_from_string_or_number<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    let text = string_or_number(deserializer)?;
    text.parse()
        .map_err(|_| serde::de::Error::custom(format!("expected a count, got {text:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creation_date_in_milliseconds_or_seconds_becomes_milliseconds() {
        assert_eq!(
            parse_creation_date("1497341531000"),
            Some(1_497_341_531_000)
        );
        assert_eq!(parse_creation_date("1497341531"), Some(1_497_341_531_000));
        assert_eq!(parse_creation_date("soon"), None);
    }

    #[test]
    fn list_grants_page_parses_string_typed_fields_of_the_api_page() {
        let page: ListGrantsResponse = serde_json::from_str(
            r#"{"grants": [{"key_id": "1f5a7c6e-45b5-4f13-bb7e-8b4f0d5e6b73",
                 "grant_id": "7c9a3286af4fcca5f0a385ad13e1d21a50e27b6dbcab50f37f30f93b8939827d",
                 "grantee_principal": "13gg44z4g2sglzk0egw0u726zoyzvrs8",
                 "operations": ["create-datakey", "describe-key"],
                 "issuing_principal": "e4hkeeea506ex3wgnzyhi656n8hx8xa3",
                 "creation_date": "1497341531000", "name": "my_grant", "retiring_principal": ""}],
                "next_marker": "", "truncated": "false", "total": 1}"#,
        )
        .unwrap();
        assert!(!page.truncated);
        assert_eq!(page.next_marker, "");
        assert_eq!(page.total, Some(1));
        let grant = Grant::from(page.grants.into_iter().next().unwrap());
        assert_eq!(grant.created_at_millis, Some(1_497_341_531_000));
        assert_eq!(grant.retiring_principal, None);
        assert_eq!(grant.grantee_type(), "user");
        assert_eq!(
            grant.operation_set(),
            BTreeSet::from(["describe-key", "create-datakey"])
        );
    }

    #[test]
    fn the_grants_of_a_listing_share_the_values_they_repeat_and_keep_their_own() {
        let grant = |id: char, operations: &str| {
            format!(
                r#"{{"key_id": "1f5a7c6e-45b5-4f13-bb7e-8b4f0d5e6b73", "grant_id": "{}",
                    "grantee_principal": "13gg44z4g2sglzk0egw0u726zoyzvrs8",
                    "grantee_principal_type": "user", "operations": {operations},
                    "issuing_principal": "e4hkeeea506ex3wgnzyhi656n8hx8xa3", "name": "n-{id}"}}"#,
                id.to_string().repeat(64)
            )
        };
        let page: ListGrantsResponse = serde_json::from_str(&format!(
            r#"{{"grants": [{}, {}, {}]}}"#,
            grant('a', r#"["describe-key", "encrypt-datakey"]"#),
            grant('b', r#"["describe-key", "encrypt-datakey"]"#),
            grant('c', r#"["describe-key"]"#),
        ))
        .unwrap();
        let mut decoded = Grants::default();
        let grants: Vec<Grant> = page.grants.into_iter().map(|g| decoded.decode(g)).collect();
        let (a, b, c) = (&grants[0], &grants[1], &grants[2]);
        assert!(Arc::ptr_eq(&a.key_id, &c.key_id));
        assert!(Arc::ptr_eq(&a.grantee_principal, &b.grantee_principal));
        let (a_type, c_type) = (
            a.grantee_principal_type.as_ref(),
            c.grantee_principal_type.as_ref(),
        );
        assert!(Arc::ptr_eq(a_type.unwrap(), c_type.unwrap()));
        assert!(Arc::ptr_eq(
            a.issuing_principal.as_ref().unwrap(),
            b.issuing_principal.as_ref().unwrap()
        ));
        assert!(Arc::ptr_eq(&a.operations, &b.operations));
        // Equal values only: another list of operations, and every grant's own ID and name.
        assert_eq!(&*c.operations, ["describe-key".to_owned()]);
        assert_eq!(
            (a.grant_id.as_str(), b.name.as_deref()),
            (&*"a".repeat(64), Some("n-b"))
        );
    }

    #[test]
    fn truncated_and_next_marker_accept_json_booleans_and_numbers() {
        let page: ListGrantsResponse =
            serde_json::from_str(r#"{"grants": [], "next_marker": 100, "truncated": true}"#)
                .unwrap();
        assert!(page.truncated);
        assert_eq!(page.next_marker, "100");
    }

    #[test]
    fn an_iam_token_is_the_header_with_the_expiry_and_project_of_the_body() {
        use secrecy::ExposeSecret;
        let body: TokenResponse = serde_json::from_str(
            r#"{"token": {"expires_at": "2099-01-01T00:00:00.000000Z",
                "project": {"id": "p1", "name": "eu-de_x"}, "methods": ["password"]}}"#,
        )
        .unwrap();
        let issued = IssuedToken::new(Some(SecretString::from("MIIE")), body).unwrap();
        assert_eq!(issued.token.expose_secret(), "MIIE");
        assert_eq!(
            issued.expires_at,
            Some("2099-01-01T00:00:00Z".parse().unwrap())
        );
        assert_eq!(issued.project_id.as_deref(), Some("p1"));

        // A domain-scoped token, or an empty body: no project, no known expiry.
        let bare = IssuedToken::new(Some(SecretString::from("t")), TokenResponse::default());
        let bare = bare.unwrap();
        assert_eq!((bare.expires_at, bare.project_id), (None, None));

        // No header, no token, whatever the body says.
        assert!(IssuedToken::new(None, TokenResponse::default()).is_none());
    }
}
