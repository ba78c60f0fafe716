//! Speaking to DEW/KMS: request signing now; the HTTP client, token auth and pagination follow.
pub mod signer;
