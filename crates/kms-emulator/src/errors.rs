//! The error answers of the emulated KMS, API gateway and IAM, with the codes and HTTP statuses of
//! `shared/design/kms-api.md` and the reference error table.
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// Every error code the emulator answers with. `code()` is the bounded label used in stats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// 400 KMS.0201
    InvalidUrl,
    /// 400 KMS.0202
    InvalidJson,
    /// 400 KMS.0203
    RequestTooLong,
    /// 400 KMS.0204
    ParametersMissing,
    /// 400 KMS.0205
    InvalidKeyId,
    /// 400 KMS.0206
    InvalidSequence,
    /// 400 KMS.0209
    KeyDisabled,
    /// 400 KMS.0210
    KeyPendingDeletion,
    /// 400 KMS.0211
    DefaultMasterKey,
    /// 400 KMS.0308
    InvalidParameter,
    /// 400 KMS.1101
    InvalidAlias,
    /// 400 KMS.1103
    InvalidDescription,
    /// 400 KMS.1104
    DuplicateAlias,
    /// 400 KMS.1105
    TooManyKeys,
    /// 400 KMS.1201
    KeyNotDisabled,
    /// 400 KMS.1301
    KeyNotEnabled,
    /// 400 KMS.1401
    InvalidPendingDays,
    /// 400 KMS.1402
    KeyAlreadyPendingDeletion,
    /// 400 KMS.1501
    KeyNotPendingDeletion,
    /// 400 KMS.1601
    InvalidLimit,
    /// 400 KMS.1602
    InvalidMarker,
    /// 400 KMS.2401
    CreateGrantOnly,
    /// 400 KMS.2402
    InvalidUserId,
    /// 400 KMS.2404
    TooManyKeyGrants,
    /// 400 KMS.2501
    InvalidGrantId,
    /// 400 KMS.2502
    GrantKeyMismatch,
    /// 403 KMS.0301
    TokenMissing,
    /// 403 KMS.0302
    TokenInvalid,
    /// 403 KMS.0303
    TokenExpired,
    /// 403 KMS.0305
    TokenNotProjectScoped,
    /// 403 KMS.0306
    NoPermission,
    /// 403 KMS.0321
    ProjectMismatch,
    /// 404 KMS.0207
    KeyNotFound,
    /// 405 KMS.0215
    MethodNotSupported,
    /// 500 KMS.0100
    Internal,
    /// 503 KMS.0104
    Unavailable,
    /// 401 APIGW.0301 (gateway body)
    SignatureRejected,
    /// 401 APIGW.0303 (gateway body)
    ClockSkew,
    /// 429 APIG.0308 (gateway body)
    Throttled,
    /// 401 APIGW.0301 (gateway body): a temporary access key without its `X-Security-Token`, or
    /// with another one
    SecurityTokenRejected,
    /// 401 APIGW.0301 (gateway body): a temporary access key past its `expires_at`
    SecurityTokenExpired,
}

impl ErrorCode {
    pub fn status(self) -> StatusCode {
        use ErrorCode::*;
        match self {
            TokenMissing
            | TokenInvalid
            | TokenExpired
            | TokenNotProjectScoped
            | NoPermission
            | ProjectMismatch => StatusCode::FORBIDDEN,
            KeyNotFound => StatusCode::NOT_FOUND,
            MethodNotSupported => StatusCode::METHOD_NOT_ALLOWED,
            Internal => StatusCode::INTERNAL_SERVER_ERROR,
            Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            SignatureRejected | ClockSkew | SecurityTokenRejected | SecurityTokenExpired => {
                StatusCode::UNAUTHORIZED
            }
            Throttled => StatusCode::TOO_MANY_REQUESTS,
            _ => StatusCode::BAD_REQUEST,
        }
    }

    pub fn code(self) -> &'static str {
        use ErrorCode::*;
        match self {
            InvalidUrl => "KMS.0201",
            InvalidJson => "KMS.0202",
            RequestTooLong => "KMS.0203",
            ParametersMissing => "KMS.0204",
            InvalidKeyId => "KMS.0205",
            InvalidSequence => "KMS.0206",
            KeyDisabled => "KMS.0209",
            KeyPendingDeletion => "KMS.0210",
            DefaultMasterKey => "KMS.0211",
            InvalidParameter => "KMS.0308",
            InvalidAlias => "KMS.1101",
            InvalidDescription => "KMS.1103",
            DuplicateAlias => "KMS.1104",
            TooManyKeys => "KMS.1105",
            KeyNotDisabled => "KMS.1201",
            KeyNotEnabled => "KMS.1301",
            InvalidPendingDays => "KMS.1401",
            KeyAlreadyPendingDeletion => "KMS.1402",
            KeyNotPendingDeletion => "KMS.1501",
            InvalidLimit => "KMS.1601",
            InvalidMarker => "KMS.1602",
            CreateGrantOnly => "KMS.2401",
            InvalidUserId => "KMS.2402",
            TooManyKeyGrants => "KMS.2404",
            InvalidGrantId => "KMS.2501",
            GrantKeyMismatch => "KMS.2502",
            TokenMissing => "KMS.0301",
            TokenInvalid => "KMS.0302",
            TokenExpired => "KMS.0303",
            TokenNotProjectScoped => "KMS.0305",
            NoPermission => "KMS.0306",
            ProjectMismatch => "KMS.0321",
            KeyNotFound => "KMS.0207",
            MethodNotSupported => "KMS.0215",
            Internal => "KMS.0100",
            Unavailable => "KMS.0104",
            SignatureRejected | SecurityTokenRejected | SecurityTokenExpired => "APIGW.0301",
            ClockSkew => "APIGW.0303",
            Throttled => "APIG.0308",
        }
    }

    /// The message of the reference error table.
    pub fn message(self) -> &'static str {
        use ErrorCode::*;
        match self {
            InvalidUrl => "Invalid request URL.",
            InvalidJson => "Invalid JSON format of the request message.",
            RequestTooLong => "Request message too long.",
            ParametersMissing => "Parameters missing in the request message.",
            InvalidKeyId => "Invalid key ID.",
            InvalidSequence => "Invalid sequence number.",
            KeyDisabled => "The key has been disabled.",
            KeyPendingDeletion => "The key is in Scheduled deletion state and cannot be used.",
            DefaultMasterKey => "Cannot perform this operation on Default Master Keys.",
            InvalidParameter => "Invalid parameter.",
            InvalidAlias => "Invalid key_alias.",
            InvalidDescription => "Invalid key_description.",
            DuplicateAlias => "Duplicate key aliases.",
            TooManyKeys => "Too many keys.",
            KeyNotDisabled => "The key is not disabled.",
            KeyNotEnabled => "The key is not enabled.",
            InvalidPendingDays => "Set the pending deletion period between 7 to 1096 days.",
            KeyAlreadyPendingDeletion => "The key is already in Pending deletion state.",
            KeyNotPendingDeletion => "The key is not in Pending deletion state.",
            InvalidLimit => "Invalid limit.",
            InvalidMarker => "marker must be greater than or equals 0.",
            CreateGrantOnly => "Specify an operation in addition to create-grant.",
            InvalidUserId => "Invalid user ID.",
            TooManyKeyGrants => "Too many CMK grants.",
            InvalidGrantId => "Invalid grant ID.",
            GrantKeyMismatch => "grant_id and key_id do not match.",
            TokenMissing => "Invalid or null X-Auth-Token.",
            TokenInvalid => "Invalid X-Auth-Token.",
            TokenExpired => "X-Auth-Token expired.",
            TokenNotProjectScoped => "Invalid X-Auth-Token project name.",
            NoPermission => "No access permissions.",
            ProjectMismatch => "URIs in URL and X-Auth-Token do not match.",
            KeyNotFound => "The key does not exist.",
            MethodNotSupported => "Request method not supported.",
            Internal => "Get-status error.",
            Unavailable => "A system exception occurred. Contact technical support.",
            SignatureRejected => {
                "Incorrect IAM authentication information: verify aksk signature fail"
            }
            ClockSkew => {
                "Incorrect IAM authentication information: the request time is more than 15 minutes off"
            }
            Throttled => "The throttling threshold has been reached",
            SecurityTokenRejected => {
                "Incorrect IAM authentication information: the security token is missing or does not belong to the access key"
            }
            SecurityTokenExpired => {
                "Incorrect IAM authentication information: the security token has expired"
            }
        }
    }

    /// Gateway errors use the flat `{"error_code", "error_msg", "request_id"}` body.
    pub fn is_gateway(self) -> bool {
        matches!(
            self,
            Self::SignatureRejected
                | Self::ClockSkew
                | Self::Throttled
                | Self::SecurityTokenRejected
                | Self::SecurityTokenExpired
        )
    }
}

/// A KMS (or gateway) error answer.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{} {}", .0.code(), .0.message())]
pub struct KmsError(pub ErrorCode);

impl From<ErrorCode> for KmsError {
    fn from(code: ErrorCode) -> Self {
        Self(code)
    }
}

impl KmsError {
    pub fn code(&self) -> ErrorCode {
        self.0
    }

    /// The response, with `request_id` used in the gateway body and the `X-Request-Id` header.
    pub fn into_response_with_id(self, request_id: &str) -> Response {
        let code = self.0;
        let body = if code.is_gateway() {
            json!({"error_code": code.code(), "error_msg": code.message(), "request_id": request_id})
        } else {
            json!({"error": {"error_code": code.code(), "error_msg": code.message()}})
        };
        let mut response = (code.status(), axum::Json(body)).into_response();
        if let Ok(value) = HeaderValue::from_str(request_id) {
            response.headers_mut().insert("x-request-id", value);
        }
        response
    }
}

/// An IAM (Keystone-style) error answer: `{"error": {"code", "title", "message"}}`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{status} {message}")]
pub struct IamError {
    pub status: StatusCode,
    pub message: &'static str,
}

impl IamError {
    pub fn unauthorized() -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            message: "The request you have made requires authentication.",
        }
    }

    pub fn bad_request(message: &'static str) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message,
        }
    }
}

impl IntoResponse for IamError {
    fn into_response(self) -> Response {
        let title = self.status.canonical_reason().unwrap_or("Error");
        let body = json!({"error": {"code": self.status.as_u16(), "title": title, "message": self.message}});
        (self.status, axum::Json(body)).into_response()
    }
}

/// An error of the IAM federation and credential APIs, with the `error_code` / `error_msg` the IAM
/// pages document. The `/v3.0/` calls answer the flat `{"error_msg", "error_code"}` body; the
/// Keystone-style `/v3/` calls answer `{"error": {"code", "title", "message"}}`. `detail` says
/// which check failed (the documented message is generic); it is sent as `X-Emulator-Detail`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{status} {code} {message} ({detail})")]
pub struct IamApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub detail: String,
    /// The Keystone body instead of the flat one.
    pub keystone: bool,
}

impl IamApiError {
    fn new(status: StatusCode, code: &'static str, message: String, detail: String) -> Self {
        Self {
            status,
            code,
            message,
            detail,
            keystone: false,
        }
    }

    /// 400 IAM.0011 "Request body is invalid."
    pub fn invalid_body(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "IAM.0011",
            "Request body is invalid.".into(),
            detail.into(),
        )
    }

    /// 400 IAM.0007 "Request parameter %(key)s is invalid."
    pub fn invalid_parameter(key: &str, detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "IAM.0007",
            format!("Request parameter {key} is invalid."),
            detail.into(),
        )
    }

    /// 500 IAM.0006 "An unexpected error prevented the server from fulfilling your request."
    pub fn internal(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "IAM.0006",
            "An unexpected error prevented the server from fulfilling your request.".into(),
            detail.into(),
        )
    }

    /// 401 IAM.0001 "The request you have made requires authentication."
    pub fn unauthenticated(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "IAM.0001",
            "The request you have made requires authentication.".into(),
            detail.into(),
        )
    }

    /// 403 IAM.0003 "Policy doesn't allow %(actions)s to be performed."
    pub fn forbidden(action: &str, detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "IAM.0003",
            format!("Policy doesn't allow {action} to be performed."),
            detail.into(),
        )
    }

    /// 404 IAM.0004 "Could not find %(target)s: %(target_id)s."
    pub fn not_found(target: &str, id: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "IAM.0004",
            format!("Could not find {target}: {id}."),
            format!("no {target} {id:?}"),
        )
    }

    /// 409 IAM.0005 "Conflict occurred attempting to store %(type)s - %(details)s."
    pub fn conflict(kind: &str, detail: impl Into<String>) -> Self {
        let detail = detail.into();
        Self::new(
            StatusCode::CONFLICT,
            "IAM.0005",
            format!("Conflict occurred attempting to store {kind} - {detail}."),
            detail,
        )
    }

    /// The same error with the Keystone body (the `/v3/OS-FEDERATION/` calls).
    pub fn keystone(mut self) -> Self {
        self.keystone = true;
        self
    }
}

impl IntoResponse for IamApiError {
    fn into_response(self) -> Response {
        let body = if self.keystone {
            let title = self.status.canonical_reason().unwrap_or("Error");
            json!({"error": {"code": self.status.as_u16(), "title": title, "message": self.message}})
        } else {
            json!({"error_msg": self.message, "error_code": self.code})
        };
        let mut response = (self.status, axum::Json(body)).into_response();
        let detail: String = self
            .detail
            .chars()
            .map(|c| {
                if c.is_ascii_graphic() || c == ' ' {
                    c
                } else {
                    '?'
                }
            })
            .collect();
        if let Ok(value) = HeaderValue::from_str(&detail) {
            response.headers_mut().insert("x-emulator-detail", value);
        }
        response
    }
}
