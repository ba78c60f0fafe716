//! `SDK-HMAC-SHA256` request signing, as the DEW/KMS API gateway checks it, in both variants.
//!
//! * Huawei Cloud (`huaweicloud-sdk-go-v3`, `chnsz/golangsdk`):
//!   `Authorization: SDK-HMAC-SHA256 Access=<AK>, SignedHeaders=<list>, Signature=<hex>`, where the
//!   signature is `HMAC(SK, StringToSign)`.
//! * Open Telekom Cloud (`gophertelekomcloud`, `signer_helper.go`):
//!   `Authorization: SDK-HMAC-SHA256 Credential=<AK>/<yyyymmdd>/<region>/<service>/sdk_request, ...`;
//!   the string to sign carries that scope as an extra line and the key is derived as
//!   `HMAC("SDK"+SK, date) → region → service → "sdk_request"`.
//!
//! Both share the canonical request:
//! `Method \n CanonicalURI \n CanonicalQuery \n CanonicalHeaders \n SignedHeaders \n hex(sha256(body))`.
//!
//! [`sign`] produces the headers a client adds; [`verify`] checks a received request using exactly
//! the `SignedHeaders` list it carries (real clients sign different header sets) and rejects more
//! than [`MAX_CLOCK_SKEW_SECONDS`] of clock difference. Everything here is pure: the caller passes
//! the time.
use std::time::{SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use http::HeaderMap;
pub use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};

/// The only algorithm name the gateway knows.
pub const ALGORITHM: &str = "SDK-HMAC-SHA256";
/// The header carrying the signing time, `yyyymmddThhmmssZ` in UTC.
pub const DATE_HEADER: &str = "x-sdk-date";
/// A client may send a precomputed body hash (or `UNSIGNED-PAYLOAD`) in this header.
pub const CONTENT_SHA256_HEADER: &str = "x-sdk-content-sha256";
/// The gateway rejects a signing time further than this from its own clock.
pub const MAX_CLOCK_SKEW_SECONDS: i64 = 15 * 60;

type HmacSha256 = Hmac<Sha256>;

/// A secret access key: `secrecy` keeps it out of `Debug` and zeroes it on drop.
pub type SecretKey = SecretString;

/// An access key ID and its secret.
#[derive(Clone, Debug)]
pub struct AccessKeyPair {
    pub access_key: String,
    pub secret_key: SecretKey,
}

impl AccessKeyPair {
    pub fn new(access_key: impl Into<String>, secret_key: impl Into<String>) -> Self {
        Self {
            access_key: access_key.into(),
            secret_key: SecretString::from(secret_key.into()),
        }
    }
}

/// Which of the two `Authorization` formats (and key derivations) a signature uses.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub enum SigningScheme {
    /// Huawei Cloud: `Access=<AK>`, key = SK.
    #[default]
    Access,
    /// Open Telekom Cloud: `Credential=<AK>/<date>/<region>/<service>/sdk_request`, derived key.
    /// Region and service may be empty.
    Credential { region: String, service: String },
}

/// A signing time with one-second resolution, UTC.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SdkDateTime {
    unix_seconds: i64,
}

impl SdkDateTime {
    pub fn from_unix_seconds(unix_seconds: i64) -> Self {
        Self { unix_seconds }
    }

    pub fn from_system_time(time: SystemTime) -> Self {
        let unix_seconds = match time.duration_since(UNIX_EPOCH) {
            Ok(after) => after.as_secs() as i64,
            Err(before) => -(before.duration().as_secs() as i64),
        };
        Self { unix_seconds }
    }

    pub fn now() -> Self {
        Self::from_system_time(SystemTime::now())
    }

    pub fn unix_seconds(self) -> i64 {
        self.unix_seconds
    }

    /// Parses the `X-Sdk-Date` format `yyyymmddThhmmssZ` (exactly 16 characters, UTC).
    pub fn parse(text: &str) -> Option<Self> {
        // strptime alone would accept signs and wider fields; the header has one exact shape.
        let exact_shape = text.len() == 16
            && text.bytes().enumerate().all(|(i, b)| match i {
                8 => b == b'T',
                15 => b == b'Z',
                _ => b.is_ascii_digit(),
            });
        if !exact_shape {
            return None;
        }
        let civil = jiff::civil::DateTime::strptime(SDK_DATE_FORMAT, text).ok()?;
        let timestamp = civil.to_zoned(jiff::tz::TimeZone::UTC).ok()?.timestamp();
        Some(Self {
            unix_seconds: timestamp.as_second(),
        })
    }

    /// The time in UTC as a civil date and time.
    pub fn civil(self) -> jiff::civil::DateTime {
        self.timestamp()
            .to_zoned(jiff::tz::TimeZone::UTC)
            .datetime()
    }

    /// `yyyymmddThhmmssZ`, the `X-Sdk-Date` value.
    pub fn to_basic(self) -> String {
        self.timestamp().strftime(SDK_DATE_FORMAT).to_string()
    }

    /// `yyyymmdd`, the date in an Open Telekom Cloud credential scope.
    pub fn date_stamp(self) -> String {
        self.timestamp().strftime("%Y%m%d").to_string()
    }

    fn timestamp(self) -> jiff::Timestamp {
        // Out-of-range seconds (before year -9999 or after 9999) clamp; no signer meets them.
        jiff::Timestamp::from_second(self.unix_seconds).unwrap_or(if self.unix_seconds < 0 {
            jiff::Timestamp::MIN
        } else {
            jiff::Timestamp::MAX
        })
    }
}

const SDK_DATE_FORMAT: &str = "%Y%m%dT%H%M%SZ";

/// The parts of an HTTP request that a signature covers.
#[derive(Clone, Copy, Debug)]
pub struct RequestParts<'a> {
    /// `GET`, `POST`, ...
    pub method: &'a str,
    /// The path as sent on the wire (may be percent-encoded), without the query.
    pub path: &'a str,
    /// The raw query string without `?` (`""` when none).
    pub query: &'a str,
    pub headers: &'a HeaderMap,
    pub body: &'a [u8],
}

/// The two headers a signer adds to a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignatureHeaders {
    /// Value for `X-Sdk-Date`.
    pub x_sdk_date: String,
    /// Value for `Authorization`.
    pub authorization: String,
}

impl SignatureHeaders {
    /// Adds `X-Sdk-Date` and `Authorization` to `headers`.
    pub fn apply_to(&self, headers: &mut HeaderMap) {
        // Both values are built from ASCII hex, digits and the caller's access key.
        if let Ok(value) = self.x_sdk_date.parse() {
            headers.insert("x-sdk-date", value);
        }
        if let Ok(value) = self.authorization.parse() {
            headers.insert(http::header::AUTHORIZATION, value);
        }
    }
}

/// Signs `request`: every header in `request.headers` plus `X-Sdk-Date` (set to `at`) is signed.
/// Put in the headers you want covered (`host`, `content-type`, `x-project-id`, ...) before calling;
/// headers added afterwards are sent unsigned, which the gateway accepts.
pub fn sign(
    request: &RequestParts<'_>,
    credentials: &AccessKeyPair,
    scheme: &SigningScheme,
    at: SdkDateTime,
) -> SignatureHeaders {
    let x_sdk_date = at.to_basic();
    let mut signed: Vec<(String, String)> = request
        .headers
        .keys()
        .filter(|name| name.as_str() != DATE_HEADER && *name != http::header::AUTHORIZATION)
        .map(|name| {
            let value = request
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            (name.as_str().to_owned(), canonical_header_value(value))
        })
        .collect();
    signed.push((DATE_HEADER.to_owned(), x_sdk_date.clone()));
    signed.sort();
    signed.dedup_by(|a, b| a.0 == b.0);

    let payload_hash = payload_hash(request.headers, request.body);
    let canonical = canonical_request(
        request.method,
        request.path,
        request.query,
        &signed,
        &payload_hash,
    );
    let scope = credential_scope(scheme, &at.date_stamp());
    let to_sign = string_to_sign(&x_sdk_date, scope.as_deref(), &canonical);
    let key = signing_key(&credentials.secret_key, scheme, &at.date_stamp());
    let signature = hex::encode(hmac_sha256(&key, to_sign.as_bytes()));
    let signed_headers = signed
        .iter()
        .map(|(name, _)| name.as_str())
        .collect::<Vec<_>>()
        .join(";");
    let credential = match &scope {
        None => format!("Access={}", credentials.access_key),
        Some(scope) => format!("Credential={}/{scope}", credentials.access_key),
    };
    SignatureHeaders {
        x_sdk_date,
        authorization: format!(
            "{ALGORITHM} {credential}, SignedHeaders={signed_headers}, Signature={signature}"
        ),
    }
}

/// Who signed a request that verified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedSignature {
    pub access_key: String,
    pub scheme: SigningScheme,
    pub signed_at: SdkDateTime,
}

/// Why a signature was rejected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("the Authorization header is missing")]
    MissingAuthorization,
    #[error(
        "the Authorization header is not `SDK-HMAC-SHA256 Access=|Credential=..., SignedHeaders=..., Signature=...`"
    )]
    MalformedAuthorization,
    #[error("the X-Sdk-Date header is missing")]
    MissingDate,
    #[error("the X-Sdk-Date header {0:?} is not yyyymmddThhmmssZ")]
    MalformedDate(String),
    #[error("X-Sdk-Date is not among the signed headers")]
    DateNotSigned,
    #[error("the signed header {0:?} is not in the request")]
    SignedHeaderAbsent(String),
    #[error("X-Sdk-Date is {skew_seconds} s away from the server clock (at most 900 s allowed)")]
    ClockSkew { skew_seconds: i64 },
    #[error("the access key is unknown")]
    UnknownAccessKey,
    #[error("the signature does not match the request")]
    SignatureMismatch,
}

impl SignatureError {
    /// A bounded, stable label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::MissingAuthorization => "missing_authorization",
            Self::MalformedAuthorization => "malformed_authorization",
            Self::MissingDate => "missing_date",
            Self::MalformedDate(_) => "malformed_date",
            Self::DateNotSigned => "date_not_signed",
            Self::SignedHeaderAbsent(_) => "signed_header_absent",
            Self::ClockSkew { .. } => "clock_skew",
            Self::UnknownAccessKey => "unknown_access_key",
            Self::SignatureMismatch => "signature_mismatch",
        }
    }
}

/// The fields of a parsed `Authorization: SDK-HMAC-SHA256 ...` header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParsedAuthorization {
    pub access_key: String,
    pub scheme: SigningScheme,
    /// The credential scope date (`Credential=` variant only).
    pub scope_date: Option<String>,
    pub signed_headers: Vec<String>,
    pub signature: String,
}

/// Parses an `Authorization` header value of either variant.
pub fn parse_authorization(value: &str) -> Result<ParsedAuthorization, SignatureError> {
    let rest = value
        .trim()
        .strip_prefix(ALGORITHM)
        .filter(|rest| rest.starts_with(' '))
        .ok_or(SignatureError::MalformedAuthorization)?;
    let (mut access, mut credential, mut signed_headers, mut signature) = (None, None, None, None);
    for field in rest.split(',') {
        let (name, value) = field
            .trim()
            .split_once('=')
            .ok_or(SignatureError::MalformedAuthorization)?;
        let slot = match name.trim() {
            "Access" => &mut access,
            "Credential" => &mut credential,
            "SignedHeaders" => &mut signed_headers,
            "Signature" => &mut signature,
            _ => return Err(SignatureError::MalformedAuthorization),
        };
        *slot = Some(value.trim().to_owned());
    }
    let (signed_headers, signature) = match (signed_headers, signature) {
        (Some(h), Some(s)) if !h.is_empty() && !s.is_empty() => (h, s),
        _ => return Err(SignatureError::MalformedAuthorization),
    };
    let signed_headers = signed_headers
        .split(';')
        .map(|name| name.trim().to_ascii_lowercase())
        .collect();
    let (access_key, scheme, scope_date) = match (access, credential) {
        (Some(access_key), None) if !access_key.is_empty() => {
            (access_key, SigningScheme::Access, None)
        }
        (None, Some(credential)) => {
            let parts: Vec<&str> = credential.split('/').collect();
            match parts.as_slice() {
                [access_key, date, region, service, "sdk_request"] if !access_key.is_empty() => (
                    (*access_key).to_owned(),
                    SigningScheme::Credential {
                        region: (*region).to_owned(),
                        service: (*service).to_owned(),
                    },
                    Some((*date).to_owned()),
                ),
                _ => return Err(SignatureError::MalformedAuthorization),
            }
        }
        _ => return Err(SignatureError::MalformedAuthorization),
    };
    Ok(ParsedAuthorization {
        access_key,
        scheme,
        scope_date,
        signed_headers,
        signature,
    })
}

/// Verifies a received request. `secret_for` maps an access key to its secret.
/// Uses exactly the `SignedHeaders` the request carries; `X-Sdk-Date` must be present and signed,
/// and within [`MAX_CLOCK_SKEW_SECONDS`] of `now`.
pub fn verify(
    request: &RequestParts<'_>,
    now: SdkDateTime,
    secret_for: impl FnOnce(&str) -> Option<SecretKey>,
) -> Result<VerifiedSignature, SignatureError> {
    let authorization = request
        .headers
        .get(http::header::AUTHORIZATION)
        .ok_or(SignatureError::MissingAuthorization)?
        .to_str()
        .map_err(|_| SignatureError::MalformedAuthorization)?;
    let parsed = parse_authorization(authorization)?;
    let date_text = request
        .headers
        .get(DATE_HEADER)
        .ok_or(SignatureError::MissingDate)?
        .to_str()
        .map_err(|_| SignatureError::MalformedDate(String::from("<not ASCII>")))?;
    let signed_at = SdkDateTime::parse(date_text.trim())
        .ok_or_else(|| SignatureError::MalformedDate(date_text.to_owned()))?;
    if !parsed.signed_headers.iter().any(|name| name == DATE_HEADER) {
        return Err(SignatureError::DateNotSigned);
    }
    let skew_seconds = signed_at.unix_seconds() - now.unix_seconds();
    if skew_seconds.abs() > MAX_CLOCK_SKEW_SECONDS {
        return Err(SignatureError::ClockSkew { skew_seconds });
    }
    let mut signed = Vec::with_capacity(parsed.signed_headers.len());
    for name in &parsed.signed_headers {
        let value = request
            .headers
            .get(name.as_str())
            .ok_or_else(|| SignatureError::SignedHeaderAbsent(name.clone()))?
            .to_str()
            .map_err(|_| SignatureError::SignatureMismatch)?;
        signed.push((name.clone(), canonical_header_value(value)));
    }
    let secret = secret_for(&parsed.access_key).ok_or(SignatureError::UnknownAccessKey)?;
    let provided = hex::decode(&parsed.signature).map_err(|_| SignatureError::SignatureMismatch)?;
    let key_date = parsed
        .scope_date
        .clone()
        .unwrap_or_else(|| signed_at.date_stamp());
    let key = signing_key(&secret, &parsed.scheme, &key_date);
    let scope = credential_scope(&parsed.scheme, &key_date);

    let matches = |query: &str, payload_hash: &str| {
        let canonical =
            canonical_request(request.method, request.path, query, &signed, payload_hash);
        let to_sign = string_to_sign(date_text.trim(), scope.as_deref(), &canonical);
        let mut mac = HmacSha256::new_from_slice(&key).expect("HMAC takes keys of any length");
        mac.update(to_sign.as_bytes());
        mac.verify_slice(&provided).is_ok()
    };
    let payload_hash = payload_hash(request.headers, request.body);
    // gophertelekomcloud signs a body-less POST with an empty canonical query and the query
    // string as the payload.
    let verified = matches(request.query, &payload_hash)
        || (request.method.eq_ignore_ascii_case("POST")
            && request.body.is_empty()
            && !request.query.is_empty()
            && matches("", &hex::encode(Sha256::digest(request.query.as_bytes()))));
    if !verified {
        return Err(SignatureError::SignatureMismatch);
    }
    Ok(VerifiedSignature {
        access_key: parsed.access_key,
        scheme: parsed.scheme,
        signed_at,
    })
}

/// `Method \n CanonicalURI \n CanonicalQuery \n CanonicalHeaders \n SignedHeaders \n PayloadHash`.
/// `signed` holds lowercase header names with canonical values, in the order they are signed.
pub fn canonical_request(
    method: &str,
    path: &str,
    query: &str,
    signed: &[(String, String)],
    payload_hash: &str,
) -> String {
    let mut out = String::with_capacity(256);
    out.push_str(&method.to_ascii_uppercase());
    out.push('\n');
    out.push_str(&canonical_uri(path));
    out.push('\n');
    out.push_str(&canonical_query(query));
    out.push('\n');
    for (name, value) in signed {
        out.push_str(name);
        out.push(':');
        out.push_str(value);
        out.push('\n');
    }
    out.push('\n');
    let names: Vec<&str> = signed.iter().map(|(name, _)| name.as_str()).collect();
    out.push_str(&names.join(";"));
    out.push('\n');
    out.push_str(payload_hash);
    out
}

/// `SDK-HMAC-SHA256 \n X-Sdk-Date [\n scope] \n hex(sha256(CanonicalRequest))`.
pub fn string_to_sign(x_sdk_date: &str, scope: Option<&str>, canonical_request: &str) -> String {
    let hash = hex::encode(Sha256::digest(canonical_request.as_bytes()));
    match scope {
        None => format!("{ALGORITHM}\n{x_sdk_date}\n{hash}"),
        Some(scope) => format!("{ALGORITHM}\n{x_sdk_date}\n{scope}\n{hash}"),
    }
}

fn credential_scope(scheme: &SigningScheme, date_stamp: &str) -> Option<String> {
    match scheme {
        SigningScheme::Access => None,
        SigningScheme::Credential { region, service } => {
            Some(format!("{date_stamp}/{region}/{service}/sdk_request"))
        }
    }
}

fn signing_key(secret: &SecretKey, scheme: &SigningScheme, date_stamp: &str) -> Vec<u8> {
    match scheme {
        SigningScheme::Access => secret.expose_secret().as_bytes().to_vec(),
        SigningScheme::Credential { region, service } => {
            let k_secret = format!("SDK{}", secret.expose_secret());
            let k_date = hmac_sha256(k_secret.as_bytes(), date_stamp.as_bytes());
            let k_region = hmac_sha256(&k_date, region.as_bytes());
            let k_service = hmac_sha256(&k_region, service.as_bytes());
            hmac_sha256(&k_service, b"sdk_request").to_vec()
        }
    }
}

fn hmac_sha256(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(data);
    mac.finalize().into_bytes().into()
}

fn payload_hash(headers: &HeaderMap, body: &[u8]) -> String {
    match headers
        .get(CONTENT_SHA256_HEADER)
        .and_then(|v| v.to_str().ok())
    {
        Some(precomputed) => precomputed.trim().to_owned(),
        None => hex::encode(Sha256::digest(body)),
    }
}

// Trimmed, inner whitespace runs collapsed to one space (what both SDKs produce for real values).
fn canonical_header_value(value: &str) -> String {
    value.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Each path segment percent-encoded (unreserved characters kept), always ending in `/`.
fn canonical_uri(path: &str) -> String {
    let decoded = percent_decode(path, false);
    let mut out = String::with_capacity(decoded.len() + 2);
    if !decoded.starts_with(b"/") {
        out.push('/');
    }
    for &byte in &decoded {
        if byte == b'/' {
            out.push('/');
        } else {
            push_encoded(&mut out, byte);
        }
    }
    if !out.ends_with('/') {
        out.push('/');
    }
    out
}

/// `k=v` pairs, decoded then re-encoded, sorted by key then value, joined by `&`.
fn canonical_query(query: &str) -> String {
    if query.is_empty() {
        return String::new();
    }
    let mut pairs: Vec<(String, String)> = query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (
                encode_component(&percent_decode(key, true)),
                encode_component(&percent_decode(value, true)),
            )
        })
        .collect();
    pairs.sort();
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

fn encode_component(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &byte in bytes {
        push_encoded(&mut out, byte);
    }
    out
}

fn push_encoded(out: &mut String, byte: u8) {
    if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
        out.push(byte as char);
    } else {
        out.push_str(&format!("%{byte:02X}"));
    }
}

fn percent_decode(text: &str, plus_is_space: bool) -> Vec<u8> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                match (hex_value(bytes[i + 1]), hex_value(bytes[i + 2])) {
                    (Some(high), Some(low)) => {
                        out.push(high << 4 | low);
                        i += 3;
                        continue;
                    }
                    _ => out.push(b'%'),
                }
            }
            b'+' if plus_is_space => out.push(b' '),
            other => out.push(other),
        }
        i += 1;
    }
    out
}

fn hex_value(byte: u8) -> Option<u8> {
    (byte as char).to_digit(16).map(|d| d as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    const VECTOR_DATE: &str = "20060102T150405Z";

    fn at(text: &str) -> SdkDateTime {
        SdkDateTime::parse(text).expect("valid date")
    }

    fn vector_credentials() -> AccessKeyPair {
        AccessKeyPair::new("AccessKey", "SecretKey")
    }

    fn header_map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        map
    }

    fn signature_of(authorization: &str) -> &str {
        authorization.rsplit("Signature=").next().unwrap()
    }

    #[test]
    fn huawei_get_vector_from_the_api_notes_signs_to_the_published_signature() {
        let headers = HeaderMap::new();
        let request = RequestParts {
            method: "GET",
            path: "/path",
            query: "limit=1",
            headers: &headers,
            body: b"",
        };
        let signed = sign(
            &request,
            &vector_credentials(),
            &SigningScheme::Access,
            at(VECTOR_DATE),
        );
        assert_eq!(signed.x_sdk_date, VECTOR_DATE);
        assert_eq!(
            signed.authorization,
            "SDK-HMAC-SHA256 Access=AccessKey, SignedHeaders=x-sdk-date, \
             Signature=5a2ce64c865e0e6046321c6f3d5a77ba8413eeaf355c3166c03d58d02ac79624"
        );
        let canonical = canonical_request(
            "GET",
            "/path",
            "limit=1",
            &[("x-sdk-date".into(), VECTOR_DATE.into())],
            &hex::encode(Sha256::digest(b"")),
        );
        assert_eq!(
            canonical,
            "GET\n/path/\nlimit=1\nx-sdk-date:20060102T150405Z\n\nx-sdk-date\n\
             e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn huawei_post_vector_from_the_api_notes_signs_to_the_published_signature() {
        let headers = HeaderMap::new();
        let body = b"{\"Name\":\"test\",\"Id\":1}\n";
        let request = RequestParts {
            method: "POST",
            path: "/path",
            query: "key=value",
            headers: &headers,
            body,
        };
        let signed = sign(
            &request,
            &vector_credentials(),
            &SigningScheme::Access,
            at(VECTOR_DATE),
        );
        assert_eq!(
            signature_of(&signed.authorization),
            "cecc2af119b18ab70b4d094c0750f3b42c02f254903179a0fc2cc72fc9db4f59"
        );
    }

    #[test]
    fn both_published_vectors_verify() {
        for (method, query, body, signature) in [
            (
                "GET",
                "limit=1",
                &b""[..],
                "5a2ce64c865e0e6046321c6f3d5a77ba8413eeaf355c3166c03d58d02ac79624",
            ),
            (
                "POST",
                "key=value",
                &b"{\"Name\":\"test\",\"Id\":1}\n"[..],
                "cecc2af119b18ab70b4d094c0750f3b42c02f254903179a0fc2cc72fc9db4f59",
            ),
        ] {
            let authorization = format!(
                "SDK-HMAC-SHA256 Access=AccessKey, SignedHeaders=x-sdk-date, Signature={signature}"
            );
            let headers = header_map(&[
                ("x-sdk-date", VECTOR_DATE),
                ("authorization", &authorization),
            ]);
            let request = RequestParts {
                method,
                path: "/path",
                query,
                headers: &headers,
                body,
            };
            let verified = verify(&request, at("20060102T151000Z"), |ak| {
                (ak == "AccessKey").then(|| SecretKey::from("SecretKey"))
            })
            .expect("published vector verifies");
            assert_eq!(verified.access_key, "AccessKey");
            assert_eq!(verified.scheme, SigningScheme::Access);
        }
    }

    /// The Open Telekom Cloud algorithm, written out from `signer_helper.go` independently of the
    /// code above.
    fn otc_reference_signature(
        secret: &str,
        date_time: &str,
        region: &str,
        service: &str,
        canonical_request: &str,
    ) -> String {
        fn mac(key: &[u8], data: &str) -> Vec<u8> {
            let mut m = HmacSha256::new_from_slice(key).unwrap();
            m.update(data.as_bytes());
            m.finalize().into_bytes().to_vec()
        }
        let date = &date_time[..8];
        let scope = [date, region, service, "sdk_request"].join("/");
        let hashed = hex::encode(Sha256::digest(canonical_request.as_bytes()));
        let string_to_sign = ["SDK-HMAC-SHA256", date_time, &scope, &hashed].join("\n");
        let k_date = mac(format!("SDK{secret}").as_bytes(), date);
        let k_region = mac(&k_date, region);
        let k_service = mac(&k_region, service);
        let k_signing = mac(&k_service, "sdk_request");
        hex::encode(mac(&k_signing, &string_to_sign))
    }

    #[test]
    fn otc_credential_variant_matches_the_published_algorithm() {
        let date_time = "20240301T101112Z";
        let body = br#"{"key_id":"0d0466b0-e727-4d9c-b35d-f84bb474a37f"}"#;
        let headers = header_map(&[
            ("host", "kms.eu-de.otc.t-systems.com"),
            ("content-type", "application/json"),
            ("x-project-id", "e86737682ab64b2490c48f08bcc41914"),
        ]);
        let path = "/v1.0/e86737682ab64b2490c48f08bcc41914/kms/describe-key";
        let scheme = SigningScheme::Credential {
            region: "eu-de".into(),
            service: "kms".into(),
        };
        let request = RequestParts {
            method: "POST",
            path,
            query: "",
            headers: &headers,
            body,
        };
        let signed = sign(
            &request,
            &AccessKeyPair::new("AK1", "SK1"),
            &scheme,
            at(date_time),
        );

        let canonical = format!(
            "POST\n{path}/\n\ncontent-type:application/json\nhost:kms.eu-de.otc.t-systems.com\n\
             x-project-id:e86737682ab64b2490c48f08bcc41914\nx-sdk-date:{date_time}\n\n\
             content-type;host;x-project-id;x-sdk-date\n{}",
            hex::encode(Sha256::digest(body))
        );
        let expected = otc_reference_signature("SK1", date_time, "eu-de", "kms", &canonical);
        assert_eq!(
            signed.authorization,
            format!(
                "SDK-HMAC-SHA256 Credential=AK1/20240301/eu-de/kms/sdk_request, \
                 SignedHeaders=content-type;host;x-project-id;x-sdk-date, Signature={expected}"
            )
        );
    }

    #[test]
    fn otc_credential_variant_with_empty_region_and_service_verifies() {
        let date_time = "20240301T101112Z";
        let canonical = format!(
            "GET\n/v3/projects/\nname=eu-de\nhost:127.0.0.1:8480\nx-sdk-date:{date_time}\n\nhost;x-sdk-date\n{}",
            hex::encode(Sha256::digest(b""))
        );
        let signature = otc_reference_signature("SK1", date_time, "", "", &canonical);
        let authorization = format!(
            "SDK-HMAC-SHA256 Credential=AK1/20240301///sdk_request, SignedHeaders=host;x-sdk-date, Signature={signature}"
        );
        let headers = header_map(&[
            ("host", "127.0.0.1:8480"),
            ("x-sdk-date", date_time),
            ("authorization", &authorization),
            ("accept-encoding", "gzip"),
        ]);
        let request = RequestParts {
            method: "GET",
            path: "/v3/projects",
            query: "name=eu-de",
            headers: &headers,
            body: b"",
        };
        let verified = verify(&request, at(date_time), |_| Some(SecretKey::from("SK1")))
            .expect("reference signature verifies");
        assert_eq!(
            verified.scheme,
            SigningScheme::Credential {
                region: String::new(),
                service: String::new()
            }
        );
    }

    fn signed_request_headers(scheme: &SigningScheme, date: &str, body: &[u8]) -> HeaderMap {
        let mut headers = header_map(&[
            ("host", "127.0.0.1:8480"),
            ("content-type", "application/json"),
        ]);
        let request = RequestParts {
            method: "POST",
            path: "/v1.0/p/kms/list-grants",
            query: "",
            headers: &headers,
            body,
        };
        let signed = sign(
            &request,
            &AccessKeyPair::new("AK1", "SK1"),
            scheme,
            at(date),
        );
        signed.apply_to(&mut headers);
        headers
    }

    fn check(
        headers: &HeaderMap,
        method: &str,
        path: &str,
        query: &str,
        body: &[u8],
        now: &str,
        secret: &str,
    ) -> Result<VerifiedSignature, SignatureError> {
        let request = RequestParts {
            method,
            path,
            query,
            headers,
            body,
        };
        verify(&request, at(now), |_| Some(SecretKey::from(secret)))
    }

    #[test]
    fn any_change_to_a_signed_request_fails_verification_in_both_variants() {
        let date = "20240301T101112Z";
        let body = br#"{"key_id":"0d0466b0-e727-4d9c-b35d-f84bb474a37f"}"#;
        let path = "/v1.0/p/kms/list-grants";
        for scheme in [
            SigningScheme::Access,
            SigningScheme::Credential {
                region: "eu-de".into(),
                service: "kms".into(),
            },
        ] {
            let headers = signed_request_headers(&scheme, date, body);
            assert!(
                check(&headers, "POST", path, "", body, date, "SK1").is_ok(),
                "{scheme:?}"
            );
            let changed_body = br#"{"key_id":"1d0466b0-e727-4d9c-b35d-f84bb474a37f"}"#;
            assert_eq!(
                check(&headers, "POST", path, "", changed_body, date, "SK1"),
                Err(SignatureError::SignatureMismatch)
            );
            assert_eq!(
                check(
                    &headers,
                    "POST",
                    "/v1.0/q/kms/list-grants",
                    "",
                    body,
                    date,
                    "SK1"
                ),
                Err(SignatureError::SignatureMismatch)
            );
            assert_eq!(
                check(&headers, "POST", path, "a=b", body, date, "SK1"),
                Err(SignatureError::SignatureMismatch)
            );
            assert_eq!(
                check(&headers, "POST", path, "", body, date, "SK2"),
                Err(SignatureError::SignatureMismatch)
            );
            let mut changed_header = headers.clone();
            changed_header.insert("content-type", "text/plain".parse().unwrap());
            assert_eq!(
                check(&changed_header, "POST", path, "", body, date, "SK1"),
                Err(SignatureError::SignatureMismatch)
            );
            let mut no_date = headers.clone();
            no_date.remove("x-sdk-date");
            assert_eq!(
                check(&no_date, "POST", path, "", body, date, "SK1"),
                Err(SignatureError::MissingDate)
            );
            assert!(matches!(
                check(&headers, "POST", path, "", body, "20240301T102613Z", "SK1"),
                Err(SignatureError::ClockSkew { skew_seconds: -901 })
            ));
            assert!(
                check(&headers, "POST", path, "", body, "20240301T102612Z", "SK1").is_ok(),
                "900 s is allowed"
            );
            assert!(matches!(
                check(&headers, "POST", path, "", body, "20240301T095611Z", "SK1"),
                Err(SignatureError::ClockSkew { skew_seconds: 901 })
            ));
        }
    }

    #[test]
    fn headers_added_after_signing_are_ignored() {
        let date = "20240301T101112Z";
        let mut headers = signed_request_headers(&SigningScheme::Access, date, b"{}");
        headers.insert("x-project-id", "p".parse().unwrap());
        headers.insert("user-agent", "later".parse().unwrap());
        assert!(
            check(
                &headers,
                "POST",
                "/v1.0/p/kms/list-grants",
                "",
                b"{}",
                date,
                "SK1"
            )
            .is_ok()
        );
    }

    #[test]
    fn a_signed_header_missing_from_the_request_is_named() {
        let date = "20240301T101112Z";
        let mut headers = signed_request_headers(&SigningScheme::Access, date, b"{}");
        headers.remove("content-type");
        assert_eq!(
            check(
                &headers,
                "POST",
                "/v1.0/p/kms/list-grants",
                "",
                b"{}",
                date,
                "SK1"
            ),
            Err(SignatureError::SignedHeaderAbsent("content-type".into()))
        );
    }

    #[test]
    fn authorization_headers_of_both_variants_parse() {
        let parsed = parse_authorization(
            "SDK-HMAC-SHA256 Access=AK, SignedHeaders=host;x-sdk-date, Signature=ab",
        )
        .unwrap();
        assert_eq!(parsed.access_key, "AK");
        assert_eq!(parsed.signed_headers, ["host", "x-sdk-date"]);
        let parsed =
            parse_authorization("SDK-HMAC-SHA256 Credential=AK/20240301/eu-de/kms/sdk_request, SignedHeaders=x-sdk-date, Signature=ab")
                .unwrap();
        assert_eq!(parsed.scope_date.as_deref(), Some("20240301"));
        assert_eq!(
            parsed.scheme,
            SigningScheme::Credential {
                region: "eu-de".into(),
                service: "kms".into()
            }
        );
        for bad in [
            "Bearer abc",
            "SDK-HMAC-SHA256",
            "SDK-HMAC-SHA256 Access=AK, Signature=ab",
            "SDK-HMAC-SHA256 Access=AK, SignedHeaders=x-sdk-date",
            "SDK-HMAC-SHA256 Credential=AK/20240301/eu-de/kms, SignedHeaders=x-sdk-date, Signature=ab",
            "SDK-HMAC-SHA256 Access=AK, Credential=AK/1/2/3/sdk_request, SignedHeaders=x, Signature=ab",
        ] {
            assert_eq!(
                parse_authorization(bad),
                Err(SignatureError::MalformedAuthorization),
                "{bad}"
            );
        }
    }

    #[test]
    fn sdk_dates_round_trip_and_reject_impossible_values() {
        let date = at("20240229T235959Z");
        assert_eq!(date.to_basic(), "20240229T235959Z");
        assert_eq!(date.date_stamp(), "20240229");
        assert_eq!(at("19700101T000000Z").unix_seconds(), 0);
        assert_eq!(at("20060102T150405Z").unix_seconds(), 1_136_214_245);
        assert_eq!(
            SdkDateTime::from_unix_seconds(1_136_214_245).to_basic(),
            "20060102T150405Z"
        );
        for bad in [
            "20230229T000000Z",
            "20240101T240000Z",
            "2024-01-01T00:00:00Z",
            "20240101T000000",
            "",
        ] {
            assert_eq!(SdkDateTime::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn paths_and_queries_are_canonicalised_like_the_sdks() {
        assert_eq!(canonical_uri("/v3/projects"), "/v3/projects/");
        assert_eq!(canonical_uri("/a%20b/c:d"), "/a%20b/c%3Ad/");
        assert_eq!(canonical_uri(""), "/");
        assert_eq!(
            canonical_query("name=eu-de&domain_id=x"),
            "domain_id=x&name=eu-de"
        );
        assert_eq!(canonical_query("a=x%2Fy&b"), "a=x%2Fy&b=");
    }

    #[test]
    fn secret_keys_do_not_show_in_debug_output() {
        let pair = AccessKeyPair::new("AK", "very-secret");
        assert!(!format!("{pair:?}").contains("very-secret"));
    }
}
