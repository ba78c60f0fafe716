//! How a [`KmsClient`](super::KmsClient) reaches KMS: endpoints, project, credentials, pacing.

use std::time::Duration;

use kmsgrant_kms_signer::{AccessKeyPair, SigningScheme};
use secrecy::SecretString;

/// Everything a client needs, built by the caller (the controller reads it from a
/// KmsProviderConfig and its Secret).
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Base URL of KMS, e.g. `https://kms.eu-de.otc.t-systems.com`.
    pub endpoint: String,
    /// Base URL of IAM; needed for password auth and to resolve a project name.
    pub iam_endpoint: Option<String>,
    /// Region, e.g. `eu-de` (used by the Open Telekom Cloud signing variant).
    pub region: String,
    /// The project the keys live in.
    pub project: Project,
    /// Who the client authenticates as.
    pub credentials: Credentials,
    /// An agency of another account assumed on top of `credentials`: KMS calls then act in the
    /// delegating account (its project is `project`).
    pub agency: Option<Agency>,
    /// KMS calls signed with temporary AK/SK and `X-Security-Token` from
    /// `OS-CREDENTIAL/securitytokens`, lasting this long (900 s to 24 h), instead of an IAM token.
    pub temporary_access_key: Option<Duration>,
    /// Which AK/SK signature format to produce.
    pub signing: SigningScheme,
    /// Client-side pacing, below the cloud's throttle.
    pub rate_limit: RateLimitConfig,
    /// What an earlier client (another process: the previous leader) learned of the cloud's
    /// throttle on this account: the new client starts at that rate instead of `rate_limit`'s
    /// and meets no throttle in its first second (see [`LearnedRate`]).
    pub learned_rate: Option<LearnedRate>,
    /// Extra trusted CAs (PEM), for private endpoints.
    pub ca_bundle: Option<String>,
    /// Plain `http://` endpoints are refused unless this is set (the emulator).
    pub allow_http: bool,
    /// Limit for opening a connection.
    pub connect_timeout: Duration,
    /// Limit for one attempt.
    pub request_timeout: Duration,
    /// How often and how patiently retryable failures are retried.
    pub retry: RetryPolicy,
    /// Largest answer body read; a larger one fails with `ResponseTooLarge` before it is held
    /// in memory. A full `list-grants` page of 100 grants is about 50 KiB.
    pub max_response_bytes: usize,
    /// Asked before every attempt of a write (`create-grant`, `revoke-grant`, `retire-grant`),
    /// retries included: a write whose first attempt was allowed is not re-sent once the gate
    /// closes (a replica that lost its leader lease while its write waited for the rate limit or
    /// a retry). `None`: always open.
    pub write_gate: Option<WriteGate>,
    /// Connect only to addresses this policy allows (public unicast plus its allowed networks),
    /// checked at every connection; IP-literal endpoints outside it are refused at once. For
    /// endpoints set by someone the operator does not trust. `None`: any address.
    pub address_policy: Option<crate::address_policy::AddressPolicy>,
}

/// Whether a write may be sent now; see [`ClientConfig::write_gate`].
#[derive(Clone)]
pub struct WriteGate(std::sync::Arc<dyn Fn() -> bool + Send + Sync>);

impl WriteGate {
    /// A gate that is open while `open` returns true.
    pub fn new(open: impl Fn() -> bool + Send + Sync + 'static) -> Self {
        Self(std::sync::Arc::new(open))
    }

    /// Whether a write may be sent now.
    pub fn is_open(&self) -> bool {
        (self.0)()
    }
}

impl std::fmt::Debug for WriteGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WriteGate")
    }
}

/// The default for [`ClientConfig::max_response_bytes`]: 4 MiB, far above any answer KMS or IAM
/// gives (an IAM token body with its catalog is the largest, some 100 KiB).
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 4 << 20;

impl ClientConfig {
    /// A config with the usual timeouts, retries and rate limit.
    pub fn new(endpoint: impl Into<String>, project: Project, credentials: Credentials) -> Self {
        Self {
            endpoint: endpoint.into(),
            iam_endpoint: None,
            region: String::new(),
            project,
            credentials,
            agency: None,
            temporary_access_key: None,
            signing: SigningScheme::Access,
            rate_limit: RateLimitConfig::default(),
            learned_rate: None,
            ca_bundle: None,
            allow_http: false,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(15),
            retry: RetryPolicy::default(),
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
            write_gate: None,
            address_policy: None,
        }
    }
}

/// The project the keys live in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Project {
    /// A project ID as IAM shows it (32 hexadecimal characters).
    Id(String),
    /// Resolved to an ID through IAM on first use.
    Name(String),
}

/// Who the client is.
#[derive(Clone, Debug)]
pub enum Credentials {
    /// AK/SK request signing, optionally with a security token (temporary credentials).
    AccessKey {
        /// The access key and its secret, signing every request.
        keys: AccessKeyPair,
        /// For temporary credentials: sent as `X-Security-Token`.
        security_token: Option<SecretString>,
    },
    /// IAM password authentication with project-scoped tokens.
    Password {
        /// IAM user name.
        username: String,
        /// The user's password, sent to IAM only.
        password: SecretString,
        /// The account (domain) the user belongs to.
        domain_name: String,
    },
    /// OpenID Connect federation: an ID token (a Kubernetes ServiceAccount token) exchanged at
    /// `POST /v3.0/OS-AUTH/id-token/tokens` for an IAM token; no long-lived secret.
    WebIdentity {
        /// The IAM identity provider (`X-Idp-Id`).
        identity_provider_id: String,
        /// Where each exchange takes its ID token from.
        token_source: std::sync::Arc<dyn SubjectTokenSource>,
    },
}

impl std::fmt::Debug for dyn SubjectTokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SubjectTokenSource({})", self.describe())
    }
}

/// Gives the OpenID Connect ID token (a JWT) to exchange at IAM; asked at every exchange, so a
/// rotated token (the kubelet rewrites a projected token file) is always the one sent.
pub trait SubjectTokenSource: Send + Sync {
    /// The current ID token, or why there is none (file missing, TokenRequest refused).
    fn subject_token(
        &self,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<SecretString, String>> + Send + '_>>;
    /// Where the token comes from, for messages (a path or a ServiceAccount; never the token).
    fn describe(&self) -> String;
}

/// An agency assumed with `assume_role`: its name and the account (domain) that made it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Agency {
    /// `agency_name`.
    pub name: String,
    /// The delegating account.
    pub domain: Domain,
}

/// An account (IAM domain), by name or ID.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Domain {
    /// `domain_name`.
    Name(String),
    /// `domain_id`.
    Id(String),
}

/// A token bucket: `requests_per_second` sustained, `burst` at once.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RateLimitConfig {
    /// Sustained requests per second.
    pub requests_per_second: f64,
    /// Requests that may go at once after a quiet period.
    pub burst: u32,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self {
            requests_per_second: 10.0,
            burst: 20,
        }
    }
}

/// What the cloud's throttle taught a client at its last cut: the rate it was cut to and the
/// rate the cloud throttled. Carried to a new client (a new leader, a restart), it starts at
/// `requests_per_second` and probes slowly above it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LearnedRate {
    /// The rate the last cut left in force.
    pub requests_per_second: f64,
    /// The rate in force when the cloud throttled.
    pub throttled_requests_per_second: f64,
}

/// Bounded retries with jittered exponential backoff under an overall deadline.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    /// Wait before the first retry (doubled each time, with jitter).
    pub initial_backoff: Duration,
    /// The longest wait between two retries.
    pub max_backoff: Duration,
    /// No retry starts after this much time since the call began.
    pub deadline: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 8,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            deadline: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    /// "Full jitter": a random wait up to the exponential bound for this attempt (1-based).
    pub fn backoff(&self, attempt: u32) -> Duration {
        let exp = self
            .initial_backoff
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(16));
        let bound = exp.min(self.max_backoff);
        bound.mul_f64(fastrand::f64())
    }
}
