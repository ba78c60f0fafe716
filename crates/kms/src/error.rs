//! The one error type of the KMS boundary, classified so callers decide without parsing strings.

use std::fmt;
use std::time::Duration;

/// The KMS calls this client makes; used in errors, logs and metric labels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Call {
    /// `describe-key`
    DescribeKey,
    /// `list-grants`
    ListGrants,
    /// `create-grant`
    CreateGrant,
    /// `revoke-grant`
    RevokeGrant,
    /// `retire-grant`
    RetireGrant,
    /// `user-quotas`
    UserQuotas,
    /// IAM `POST /v3/auth/tokens`
    IamToken,
    /// IAM `GET /v3/projects`
    IamProjects,
    /// `GET /v3/auth/catalog`.
    IamCatalog,
    /// IAM `POST /v3.0/OS-AUTH/id-token/tokens`: an ID token exchanged for an IAM token
    IamIdToken,
    /// IAM `POST /v3.0/OS-CREDENTIAL/securitytokens`: temporary AK/SK
    IamSecurityToken,
    /// IAM `assume_role` (an agency token or temporary AK/SK of an agency)
    IamAssumeAgency,
    /// Not a call: reading the ID token to exchange (a file, a TokenRequest)
    SubjectToken,
    /// An unauthenticated `GET` of an endpoint (`check`)
    Probe,
    /// Not a call: building the client from its configuration, before anything is sent.
    ClientSetup,
}

impl Call {
    /// The label used in logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::DescribeKey => "describe-key",
            Self::ListGrants => "list-grants",
            Self::CreateGrant => "create-grant",
            Self::RevokeGrant => "revoke-grant",
            Self::RetireGrant => "retire-grant",
            Self::UserQuotas => "user-quotas",
            Self::IamToken => "iam-token",
            Self::IamProjects => "iam-projects",
            Self::IamCatalog => "iam-catalog",
            Self::IamIdToken => "iam-id-token",
            Self::IamSecurityToken => "iam-security-token",
            Self::IamAssumeAgency => "iam-assume-agency",
            Self::SubjectToken => "subject-token",
            Self::Probe => "probe",
            Self::ClientSetup => "client-setup",
        }
    }

    /// Whether the call changes state on the cloud (so a lost response leaves the outcome open).
    pub fn is_write(self) -> bool {
        matches!(
            self,
            Self::CreateGrant | Self::RevokeGrant | Self::RetireGrant
        )
    }
}

impl fmt::Display for Call {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a call failed: a fixed set, used for conditions, events and metric labels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorReason {
    /// The key does not exist (KMS.0207).
    KeyNotFound,
    /// Grants are not allowed on a Default Master Key (KMS.0211).
    DefaultKeyNotGrantable,
    /// The key is disabled (KMS.0209).
    KeyDisabled,
    /// The key is scheduled for deletion (KMS.0210).
    KeyPendingDeletion,
    /// The key is not enabled (KMS.1301).
    KeyNotEnabled,
    /// A principal is not a valid user or account ID (KMS.2402).
    InvalidPrincipal,
    /// The request was malformed in a way the caller must fix (KMS.0202/0204/0205/0206/0308/2401,
    /// 1601/1602, 0215).
    InvalidRequest,
    /// The key (KMS.2404) or the project (KMS.2405) holds as many grants as allowed.
    GrantQuotaExceeded,
    /// The grant ID is unknown on this key (KMS.2501): revoked or retired already.
    GrantNotFound,
    /// The grant belongs to another key (KMS.2502).
    GrantKeyMismatch,
    /// The credentials lack the IAM permission (KMS.0306/0307/0326/0330, IAM 403).
    PermissionDenied,
    /// The token is scoped to another project, or the URL names another project (KMS.0305/0321).
    WrongProject,
    /// The credentials were rejected (bad AK/SK signature, bad password: APIGW.0301, IAM 401).
    InvalidCredentials,
    /// The token is missing, invalid or expired even after getting a new one (KMS.0301–0303).
    TokenRejected,
    /// The request was signed at a time more than 15 minutes off the server's clock (APIGW.0303).
    ClockSkew,
    /// The gateway throttled us (429, APIG.0308).
    Throttled,
    /// The service failed (5xx, KMS.0100–0104, KMS.2403).
    ServiceUnavailable,
    /// No answer in time.
    Timeout,
    /// The connection could not be made.
    ConnectionFailed,
    /// A write was sent but its answer was lost: it may or may not have taken effect.
    OutcomeUnknown,
    /// The answer was not what the API documents.
    UnexpectedResponse,
    /// The client is configured in a way that cannot work (bad URL, missing IAM endpoint, bad CA).
    InvalidConfiguration,
    /// The endpoint answered with a redirect. Redirects are never followed: the request carries
    /// credentials (token, signature, IAM password) that must reach only the configured host.
    RedirectRefused,
    /// The answer was larger than the client accepts (`ClientConfig::max_response_bytes`).
    ResponseTooLarge,
    /// A `list-grants` walk went on past what a key can hold (100 grants plus a page): the
    /// endpoint is looping or hostile.
    ListRunaway,
    /// A write was not sent: the caller's write gate was closed (the replica lost its leader
    /// lease while the write waited for the rate limit or a retry).
    WriteFenced,
    /// IAM knows no identity provider (or OpenID Connect configuration, protocol or mapping) by
    /// the configured ID (`X-Idp-Id`; 404 IAM.0004).
    IdentityProviderNotFound,
    /// IAM refused the ID token (401 IAM.0001): wrong audience or issuer, a signature no key of
    /// the provider's `signing_key` verifies, or no mapping rule matching its subject; or the
    /// provider is disabled (403).
    IdentityTokenRefused,
    /// The ID token expired (or is not valid yet) before it could be exchanged.
    IdentityTokenExpired,
    /// No ID token to exchange: the token file is missing, unreadable or empty, or the
    /// TokenRequest for the ServiceAccount failed.
    IdentityTokenUnavailable,
    /// The agency cannot be assumed: it or its domain does not exist, it does not trust the
    /// caller's account, or the caller lacks Agent Operator (`iam:agencies:assume`).
    AgencyNotAssumable,
    /// The endpoint's address is refused by the client's address policy (a tenant's endpoint
    /// naming or resolving to loopback, link-local, private or cluster addresses).
    AddressNotAllowed,
}

impl ErrorReason {
    /// CamelCase, stable: usable as a condition reason and a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::KeyNotFound => "KeyNotFound",
            Self::DefaultKeyNotGrantable => "DefaultKeyNotGrantable",
            Self::KeyDisabled => "KeyDisabled",
            Self::KeyPendingDeletion => "KeyPendingDeletion",
            Self::KeyNotEnabled => "KeyNotEnabled",
            Self::InvalidPrincipal => "InvalidPrincipal",
            Self::InvalidRequest => "InvalidRequest",
            Self::GrantQuotaExceeded => "GrantQuotaExceeded",
            Self::GrantNotFound => "GrantNotFound",
            Self::GrantKeyMismatch => "GrantKeyMismatch",
            Self::PermissionDenied => "PermissionDenied",
            Self::WrongProject => "WrongProject",
            Self::InvalidCredentials => "InvalidCredentials",
            Self::TokenRejected => "TokenRejected",
            Self::ClockSkew => "ClockSkew",
            Self::Throttled => "Throttled",
            Self::ServiceUnavailable => "ServiceUnavailable",
            Self::Timeout => "Timeout",
            Self::ConnectionFailed => "ConnectionFailed",
            Self::OutcomeUnknown => "OutcomeUnknown",
            Self::UnexpectedResponse => "UnexpectedResponse",
            Self::InvalidConfiguration => "InvalidConfiguration",
            Self::RedirectRefused => "RedirectRefused",
            Self::ResponseTooLarge => "ResponseTooLarge",
            Self::ListRunaway => "ListRunaway",
            Self::WriteFenced => "WriteFenced",
            Self::IdentityProviderNotFound => "IdentityProviderNotFound",
            Self::IdentityTokenRefused => "IdentityTokenRefused",
            Self::IdentityTokenExpired => "IdentityTokenExpired",
            Self::IdentityTokenUnavailable => "IdentityTokenUnavailable",
            Self::AgencyNotAssumable => "AgencyNotAssumable",
            Self::AddressNotAllowed => "AddressNotAllowed",
        }
    }

    /// What a caller should do about it.
    pub fn class(self) -> ErrorClass {
        match self {
            Self::Throttled | Self::ServiceUnavailable | Self::Timeout | Self::ConnectionFailed => {
                ErrorClass::Retryable
            }
            Self::OutcomeUnknown => ErrorClass::OutcomeUnknown,
            Self::KeyDisabled
            | Self::KeyPendingDeletion
            | Self::KeyNotEnabled
            | Self::ClockSkew
            | Self::IdentityTokenUnavailable
            | Self::IdentityTokenExpired => ErrorClass::RetryLater,
            _ => ErrorClass::Terminal,
        }
    }
}

/// How a caller should treat an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    /// A person has to change something (spec, key, credentials, IAM policy, quota).
    Terminal,
    /// Transient: the client already retried within its deadline; try again later.
    Retryable,
    /// The state of the key blocks the call for now; it may change (key re-enabled, clock fixed).
    RetryLater,
    /// A write whose result is unknown: look before doing it again.
    OutcomeUnknown,
}

/// A failed KMS or IAM call.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{call} failed ({}{}): {message}", reason.as_str(), code.as_deref().map(|c| format!(", {c}")).unwrap_or_default())]
pub struct KmsError {
    /// The call that failed.
    pub call: Call,
    /// Why, from a fixed set.
    pub reason: ErrorReason,
    /// HTTP status, when there was an answer.
    pub status: Option<u16>,
    /// `error_code` of the answer (`KMS.0207`, `APIG.0308`, ...).
    pub code: Option<String>,
    /// What the server (or the transport) said.
    pub message: String,
    /// `X-Request-Id` of the answer, for support cases.
    pub request_id: Option<String>,
    /// How long the server asked us to wait (`Retry-After`).
    pub retry_after: Option<Duration>,
}

impl KmsError {
    /// An error with no HTTP answer behind it.
    pub fn new(call: Call, reason: ErrorReason, message: impl Into<String>) -> Self {
        Self {
            call,
            reason,
            status: None,
            code: None,
            message: message.into(),
            request_id: None,
            retry_after: None,
        }
    }

    /// Whether to give up, retry, or re-authenticate.
    pub fn class(&self) -> ErrorClass {
        self.reason.class()
    }

    /// For revoke and retire: the grant (or its key) is already gone, which is what was wanted.
    pub fn is_already_gone(&self) -> bool {
        matches!(self.call, Call::RevokeGrant | Call::RetireGrant)
            && matches!(
                self.reason,
                ErrorReason::GrantNotFound | ErrorReason::KeyNotFound
            )
    }

    /// Whether the call may be retried at once by the client itself.
    pub(crate) fn is_retryable_now(&self) -> bool {
        self.class() == ErrorClass::Retryable
    }

    /// Whether a fresh IAM token may fix it.
    pub(crate) fn is_token_problem(&self) -> bool {
        matches!(
            self.code.as_deref(),
            Some("KMS.0301" | "KMS.0302" | "KMS.0303")
        )
    }
}

/// Maps an error answer of KMS, IAM or the API gateway to a reason.
pub(crate) fn classify(call: Call, status: u16, code: &str) -> ErrorReason {
    use ErrorReason::*;
    // A write answered 5xx may have committed before the failure: never repeat it blindly.
    if call.is_write() && status >= 500 {
        return OutcomeUnknown;
    }
    // The federation and credential calls answer IAM's own codes (IAM.0001, 0003, 0004, ...);
    // their status says which step failed.
    match (call, status) {
        (Call::IamIdToken, 404) => return IdentityProviderNotFound,
        (Call::IamIdToken, 401 | 403) => return IdentityTokenRefused,
        (Call::IamAssumeAgency, 403 | 404) => return AgencyNotAssumable,
        (Call::IamAssumeAgency | Call::IamSecurityToken, 401) => return TokenRejected,
        (Call::IamIdToken | Call::IamAssumeAgency | Call::IamSecurityToken, 400) => {
            return InvalidRequest;
        }
        _ => {}
    }
    match code {
        "KMS.0207" => KeyNotFound,
        "KMS.0211" => DefaultKeyNotGrantable,
        "KMS.0209" => KeyDisabled,
        "KMS.0210" => KeyPendingDeletion,
        "KMS.1301" => KeyNotEnabled,
        "KMS.2402" => InvalidPrincipal,
        "KMS.2404" | "KMS.2405" => GrantQuotaExceeded,
        "KMS.2501" => GrantNotFound,
        "KMS.2502" => GrantKeyMismatch,
        "KMS.2403" => ServiceUnavailable,
        "KMS.0202" | "KMS.0204" | "KMS.0205" | "KMS.0206" | "KMS.0308" | "KMS.2401"
        | "KMS.1601" | "KMS.1602" | "KMS.0215" => InvalidRequest,
        "KMS.0301" | "KMS.0302" | "KMS.0303" => TokenRejected,
        "KMS.0305" | "KMS.0321" => WrongProject,
        "KMS.0306" | "KMS.0307" | "KMS.0326" | "KMS.0330" => PermissionDenied,
        "APIGW.0303" => ClockSkew,
        "APIGW.0301" | "APIGW.0101" => InvalidCredentials,
        "APIG.0308" | "APIGW.0308" => Throttled,
        _ => match status {
            429 => Throttled,
            500..=599 => ServiceUnavailable,
            401 => InvalidCredentials,
            403 if call == Call::IamToken => InvalidCredentials,
            // Our token request is fixed; what IAM can refuse in it is the project scope.
            400 | 404 if call == Call::IamToken => WrongProject,
            403 => PermissionDenied,
            404 if matches!(
                call,
                Call::DescribeKey | Call::RevokeGrant | Call::RetireGrant | Call::ListGrants
            ) =>
            {
                KeyNotFound
            }
            _ => UnexpectedResponse,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documented_codes_map_to_their_reasons_and_classes() {
        let cases = [
            (
                404,
                "KMS.0207",
                ErrorReason::KeyNotFound,
                ErrorClass::Terminal,
            ),
            (
                400,
                "KMS.0211",
                ErrorReason::DefaultKeyNotGrantable,
                ErrorClass::Terminal,
            ),
            (
                400,
                "KMS.0209",
                ErrorReason::KeyDisabled,
                ErrorClass::RetryLater,
            ),
            (
                400,
                "KMS.0210",
                ErrorReason::KeyPendingDeletion,
                ErrorClass::RetryLater,
            ),
            (
                400,
                "KMS.1301",
                ErrorReason::KeyNotEnabled,
                ErrorClass::RetryLater,
            ),
            (
                400,
                "KMS.2402",
                ErrorReason::InvalidPrincipal,
                ErrorClass::Terminal,
            ),
            (
                400,
                "KMS.2404",
                ErrorReason::GrantQuotaExceeded,
                ErrorClass::Terminal,
            ),
            (
                400,
                "KMS.2405",
                ErrorReason::GrantQuotaExceeded,
                ErrorClass::Terminal,
            ),
            (
                400,
                "KMS.2403",
                ErrorReason::ServiceUnavailable,
                ErrorClass::Retryable,
            ),
            (
                400,
                "KMS.2501",
                ErrorReason::GrantNotFound,
                ErrorClass::Terminal,
            ),
            (
                400,
                "KMS.2502",
                ErrorReason::GrantKeyMismatch,
                ErrorClass::Terminal,
            ),
            (
                400,
                "KMS.2401",
                ErrorReason::InvalidRequest,
                ErrorClass::Terminal,
            ),
            (
                403,
                "KMS.0303",
                ErrorReason::TokenRejected,
                ErrorClass::Terminal,
            ),
            (
                403,
                "KMS.0321",
                ErrorReason::WrongProject,
                ErrorClass::Terminal,
            ),
            (
                403,
                "KMS.0306",
                ErrorReason::PermissionDenied,
                ErrorClass::Terminal,
            ),
            (
                401,
                "APIGW.0301",
                ErrorReason::InvalidCredentials,
                ErrorClass::Terminal,
            ),
            (
                401,
                "APIGW.0303",
                ErrorReason::ClockSkew,
                ErrorClass::RetryLater,
            ),
            (
                429,
                "APIG.0308",
                ErrorReason::Throttled,
                ErrorClass::Retryable,
            ),
            (
                500,
                "KMS.0100",
                ErrorReason::ServiceUnavailable,
                ErrorClass::Retryable,
            ),
            (
                503,
                "KMS.0104",
                ErrorReason::ServiceUnavailable,
                ErrorClass::Retryable,
            ),
            (
                502,
                "",
                ErrorReason::ServiceUnavailable,
                ErrorClass::Retryable,
            ),
        ];
        for (status, code, reason, class) in cases {
            // A read: a write answered 5xx is another matter (below).
            let got = classify(Call::DescribeKey, status, code);
            assert_eq!((got, got.class()), (reason, class), "{status} {code}");
        }
    }

    #[test]
    fn a_write_answered_5xx_has_an_unknown_outcome_and_is_not_retried() {
        for call in [Call::CreateGrant, Call::RevokeGrant, Call::RetireGrant] {
            for (status, code) in [(500, "KMS.0100"), (503, "KMS.0104"), (502, "")] {
                let reason = classify(call, status, code);
                assert_eq!(reason, ErrorReason::OutcomeUnknown, "{call} {status}");
                assert!(!KmsError::new(call, reason, "").is_retryable_now());
            }
            // Throttling is refused before anything happens: safe to retry.
            assert_eq!(classify(call, 429, "APIG.0308"), ErrorReason::Throttled);
        }
    }

    #[test]
    fn unknown_grant_on_revoke_or_retire_counts_as_already_gone() {
        for call in [Call::RevokeGrant, Call::RetireGrant] {
            let err = KmsError::new(call, classify(call, 400, "KMS.2501"), "invalid grant");
            assert!(err.is_already_gone());
            let err = KmsError::new(call, classify(call, 404, "KMS.0207"), "no key");
            assert!(err.is_already_gone());
        }
        let err = KmsError::new(
            Call::CreateGrant,
            classify(Call::CreateGrant, 404, "KMS.0207"),
            "no key",
        );
        assert!(!err.is_already_gone());
    }

    #[test]
    fn reasons_are_camel_case_words() {
        let reasons = [
            ErrorReason::KeyNotFound,
            ErrorReason::OutcomeUnknown,
            ErrorReason::InvalidConfiguration,
            ErrorReason::RedirectRefused,
            ErrorReason::ResponseTooLarge,
            ErrorReason::ListRunaway,
        ];
        for reason in reasons {
            let text = reason.as_str();
            assert!(
                text.chars().next().unwrap().is_ascii_uppercase()
                    && text.chars().all(|c| c.is_ascii_alphanumeric())
            );
        }
    }
}
