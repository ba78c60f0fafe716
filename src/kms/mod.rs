//! Speaking to DEW/KMS (and the two IAM calls it needs): our own types in and out, every page,
//! both auth methods, classified errors, bounded retries, a shared rate limit. No reqwest type
//! crosses this module's boundary.

mod client;
mod config;
mod error;
mod rate_limit;
mod secret;
pub mod signer;
mod types;

pub use client::{
    ClientMetrics, KmsClient, MAX_ERROR_MESSAGE_CHARS, MAX_GRANTS_PER_KEY, MAX_PAGE_SIZE,
};
pub use config::{
    ClientConfig, Credentials, DEFAULT_MAX_RESPONSE_BYTES, Project, RateLimitConfig, RetryPolicy,
};
pub use error::{Call, ErrorClass, ErrorReason, KmsError};
pub use secret::Secret;
pub use types::{Grant, KeyInfo, KeyState, NewGrant, Quota, Quotas, parse_creation_date};
