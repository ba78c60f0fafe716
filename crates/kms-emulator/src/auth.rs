//! Who is calling: an IAM token (`X-Auth-Token`) or an `SDK-HMAC-SHA256` signature of either
//! variant, checked against the emulated users.
use std::time::SystemTime;

use axum::http::HeaderMap;

use super::errors::{ErrorCode, IamError, KmsError};
use super::state::{Caller, TokenScope, World};
use kmsgrant_kms_signer::{self as signer, RequestParts, SdkDateTime, SignatureError};

/// An authenticated KMS caller and the credential the throttle counts against.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Authenticated {
    pub caller: Caller,
    /// `ak:<access key>` or `user:<user id>` (tokens of one user share a budget).
    pub credential: String,
}

pub fn unix_ms(time: SystemTime) -> u64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|value| value.to_str().ok())
        .map(str::trim)
        .filter(|value| !value.is_empty())
}

/// Why a signed request was refused.
enum SignedRejection {
    Signature(SignatureError),
    /// A temporary access key without its security token, or with another one.
    SecurityToken,
    /// A temporary access key past its expiry.
    Expired,
}

/// Who signed: a user's permanent access key, or a temporary one presented with its
/// `X-Security-Token` (signed or not) before it expires.
fn verify_signature(
    world: &World,
    request: &RequestParts<'_>,
    now: SystemTime,
) -> Result<(String, String), SignedRejection> {
    let verified =
        signer::verify(
            request,
            SdkDateTime::from_system_time(now),
            |access_key| match world.user_by_access_key(access_key) {
                Some(user) => user.secret_key.as_deref().map(signer::SecretKey::from),
                None => world
                    .credential(access_key)
                    .map(|credential| signer::SecretKey::from(credential.secret.as_str())),
            },
        )
        .map_err(SignedRejection::Signature)?;
    if let Some(user) = world.user_by_access_key(&verified.access_key) {
        return Ok((user.user_id.clone(), user.domain_id.clone()));
    }
    let credential = world
        .credential(&verified.access_key)
        .ok_or(SignedRejection::Signature(SignatureError::UnknownAccessKey))?;
    if header(request.headers, "x-security-token") != Some(credential.security_token.as_str()) {
        return Err(SignedRejection::SecurityToken);
    }
    if credential.expires_at_ms <= unix_ms(now) {
        return Err(SignedRejection::Expired);
    }
    Ok((credential.user_id.clone(), credential.domain_id.clone()))
}

/// Authenticates a KMS call for the project named in the URL.
/// A token is used when `X-Auth-Token` is sent, otherwise the `Authorization` signature.
pub fn authenticate_kms(
    world: &World,
    url_project_id: &str,
    request: &RequestParts<'_>,
    now: SystemTime,
) -> Result<Authenticated, KmsError> {
    if let Some(token) = header(request.headers, "x-auth-token") {
        let issued = world
            .token(token)
            .ok_or(KmsError(ErrorCode::TokenInvalid))?;
        if issued.expires_at_ms <= unix_ms(now) {
            return Err(ErrorCode::TokenExpired.into());
        }
        match &issued.scope {
            TokenScope::Domain | TokenScope::Unscoped => {
                return Err(ErrorCode::TokenNotProjectScoped.into());
            }
            TokenScope::Project(project_id) if project_id != url_project_id => {
                return Err(ErrorCode::ProjectMismatch.into());
            }
            TokenScope::Project(_) => {}
        }
        let user_id = issued.user_id.clone();
        return Ok(Authenticated {
            credential: format!("user:{user_id}"),
            caller: Caller { user_id },
        });
    }
    if request.headers.get("authorization").is_none() {
        return Err(ErrorCode::TokenMissing.into());
    }
    let (user_id, domain_id) =
        verify_signature(world, request, now).map_err(|error| match error {
            SignedRejection::Signature(SignatureError::ClockSkew { .. }) => {
                KmsError(ErrorCode::ClockSkew)
            }
            SignedRejection::Signature(_) => KmsError(ErrorCode::SignatureRejected),
            SignedRejection::SecurityToken => KmsError(ErrorCode::SecurityTokenRejected),
            SignedRejection::Expired => KmsError(ErrorCode::SecurityTokenExpired),
        })?;
    let header_project = header(request.headers, "x-project-id");
    // The project belongs to the emulator's domain: keys of other domains cannot use it.
    if url_project_id != world.account.project_id
        || domain_id != world.account.domain_id
        || header_project.is_some_and(|p| p != url_project_id)
    {
        return Err(ErrorCode::ProjectMismatch.into());
    }
    let access_key =
        signer::parse_authorization(header(request.headers, "authorization").unwrap_or_default())
            .map(|parsed| parsed.access_key)
            .unwrap_or_default();
    Ok(Authenticated {
        caller: Caller { user_id },
        credential: format!("ak:{access_key}"),
    })
}

/// Authenticates an IAM read (catalog, domains, projects): any valid token, or a signature.
pub fn authenticate_iam(
    world: &World,
    request: &RequestParts<'_>,
    now: SystemTime,
) -> Result<String, IamError> {
    if let Some(token) = header(request.headers, "x-auth-token") {
        return match world.token(token) {
            Some(issued) if issued.expires_at_ms > unix_ms(now) => Ok(issued.user_id.clone()),
            _ => Err(IamError::unauthorized()),
        };
    }
    verify_signature(world, request, now)
        .map(|(user_id, _)| user_id)
        .map_err(|_| IamError::unauthorized())
}

/// Who calls an IAM API: the user (or federated user, or agency) and its domain, with the token
/// when one was used.
#[derive(Clone, Debug)]
pub struct IamPrincipal {
    pub user_id: String,
    pub domain_id: String,
    pub token: Option<crate::state::IssuedToken>,
}

/// A valid, unexpired `X-Auth-Token`, or else a signature (permanent or temporary access key).
pub fn authenticate_principal(
    world: &World,
    request: &RequestParts<'_>,
    now: SystemTime,
) -> Option<IamPrincipal> {
    if let Some(token) = header(request.headers, "x-auth-token") {
        let issued = world
            .token(token)
            .filter(|issued| issued.expires_at_ms > unix_ms(now))?;
        return Some(IamPrincipal {
            user_id: issued.user_id.clone(),
            domain_id: issued.domain_id.clone(),
            token: Some(issued.clone()),
        });
    }
    request.headers.get("authorization")?;
    let (user_id, domain_id) = verify_signature(world, request, now).ok()?;
    Some(IamPrincipal {
        user_id,
        domain_id,
        token: None,
    })
}
