//! Speaking to DEW/KMS (and the two IAM calls it needs): our own types in and out, every page,
//! both auth methods, classified errors, bounded retries, a shared rate limit. No reqwest type
//! crosses this module's boundary.

#![deny(missing_docs)]

pub mod address_policy;
mod client;
mod config;
mod error;
mod rate_limit;
mod session;

mod types;

pub use client::{
    CatalogEndpoint, ClientMetrics, EndpointProbe, KmsClient, MAX_ERROR_MESSAGE_CHARS,
    MAX_GRANTS_PER_KEY, MAX_PAGE_SIZE,
};
pub use config::{
    Agency, ClientConfig, Credentials, DEFAULT_MAX_RESPONSE_BYTES, Domain, LearnedRate, Project,
    RateLimitConfig, RetryPolicy, SubjectTokenSource, WriteGate,
};
pub use error::{Call, ErrorClass, ErrorReason, KmsError};
pub use reqwest::Url;
pub use secrecy::{ExposeSecret, SecretString};
pub use session::CredentialStatus;
pub use types::{
    Grant, GrantPage, GranteePrincipalType, KeyInfo, KeyState, NewGrant, Operation, Quota, Quotas,
    parse_creation_date,
};

/// The request signer this client uses, for callers that build credentials.
pub use kmsgrant_kms_signer as signer;
