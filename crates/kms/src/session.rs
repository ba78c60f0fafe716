//! The credentials KMS calls are made with, when they are not a static AK/SK: an IAM token (from
//! a password, or from an OpenID Connect ID token exchanged at IAM), optionally an agency assumed
//! with it, optionally turned into temporary AK/SK. Each lives a limited time; this module gets
//! them, refreshes them ahead of expiry, one exchange at a time per client, and keeps using the
//! last good ones while a refresh fails and they are still valid.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use reqwest::Method;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::time::Instant;

use super::client::{Auth, KmsClient, decode, join};
use super::config::{Agency, Credentials, Domain, Project};
use super::error::{Call, ErrorReason, KmsError};
use super::types::{IssuedToken, TokenResponse};
use kmsgrant_kms_signer::AccessKeyPair;
use secrecy::{ExposeSecret, SecretString};

/// What a session authenticates KMS calls with.
#[derive(Clone)]
pub(crate) enum SessionCredential {
    /// Sent as `X-Auth-Token`.
    Token(SecretString),
    /// Temporary AK/SK, signing each call, with `X-Security-Token`.
    TemporaryKeys {
        keys: AccessKeyPair,
        security_token: SecretString,
    },
}

/// One set of credentials as issued.
pub(crate) struct Session {
    pub credential: SessionCredential,
    /// Counts sessions of this client: a KMS call refused with session N drops N only.
    pub generation: u64,
    /// From here on a new session is fetched (in the background while this one is usable).
    refresh_at: Instant,
    /// After this the session is not sent any more (a few seconds before it expires).
    usable_until: Instant,
}

/// What a client knows about its credentials, for metrics and the provider config's status.
#[derive(Clone, Debug, Default)]
pub struct CredentialStatus {
    /// When the credentials in use expire; `None` for static AK/SK or before the first exchange.
    pub expires_at: Option<SystemTime>,
    /// Exchanges that succeeded, since the client was built.
    pub exchanges: u64,
    /// Exchanges that failed, since the client was built.
    pub failed_exchanges: u64,
    /// Failed exchanges since the last one that worked.
    pub consecutive_failures: u32,
    /// Why the last exchange failed, while no later one worked.
    pub last_failure: Option<KmsError>,
}

/// The session of one client and the bookkeeping of its refreshes.
#[derive(Default)]
pub(crate) struct SessionState {
    current: std::sync::Mutex<Option<Arc<Session>>>,
    /// Held for the whole of an exchange: one at a time (single-flight).
    exchanging: tokio::sync::Mutex<()>,
    /// A background refresh is under way.
    refreshing: AtomicBool,
    book: std::sync::Mutex<Book>,
}

#[derive(Default)]
struct Book {
    generation: u64,
    status: CredentialStatus,
    /// No exchange starts before this after a failure (backing off, doubling up to a minute).
    not_before: Option<Instant>,
}

impl SessionState {
    fn current(&self) -> Option<Arc<Session>> {
        self.current.lock().expect("session lock").clone()
    }

    pub(crate) fn status(&self) -> CredentialStatus {
        self.book.lock().expect("session book").status.clone()
    }

    fn backing_off(&self, now: Instant) -> Option<KmsError> {
        let book = self.book.lock().expect("session book");
        match book.not_before {
            Some(at) if now < at => book.status.last_failure.clone(),
            _ => None,
        }
    }
}

/// How early a session of `lifetime` is refreshed: a fifth of its life, at most ten minutes
/// (a 60 s token at 48 s, a 15-minute temporary key at 12 minutes, a 24-hour token 10 minutes
/// before it expires).
pub(crate) fn refresh_margin(lifetime: Duration) -> Duration {
    (lifetime / 5).min(Duration::from_secs(600))
}

/// How long before expiry a session stops being sent: a twentieth of its life, at most 30 s.
fn expiry_safety(lifetime: Duration) -> Duration {
    (lifetime / 20).min(Duration::from_secs(30))
}

/// The wait after the `failures`-th failed exchange in a row: 1 s, doubling, at most a minute.
fn backoff_after(failures: u32) -> Duration {
    Duration::from_secs(1u64 << failures.saturating_sub(1).min(6)).min(Duration::from_secs(60))
}

impl KmsClient {
    /// Whether KMS calls use a session rather than the static AK/SK of the config.
    pub(crate) fn uses_session(&self) -> bool {
        !matches!(self.inner.config.credentials, Credentials::AccessKey { .. })
            || self.inner.config.agency.is_some()
            || self.inner.config.temporary_access_key.is_some()
    }

    /// The state of this client's credentials (expiry, exchanges, the last failure).
    pub fn credential_status(&self) -> CredentialStatus {
        self.inner.session.status()
    }

    /// A session to authenticate with: the current one while it is fresh; while it is due for
    /// refresh but still usable, the current one, with one refresh started in the background;
    /// otherwise a new one, fetched by one caller while the others wait for it.
    pub(crate) async fn session(&self) -> Result<Arc<Session>, KmsError> {
        let state = &self.inner.session;
        let now = Instant::now();
        if let Some(session) = state.current() {
            if now < session.refresh_at {
                return Ok(session);
            }
            if now < session.usable_until {
                self.refresh_in_background();
                return Ok(session);
            }
        }
        let _exchange = state.exchanging.lock().await;
        let now = Instant::now();
        if let Some(session) = state.current().filter(|s| now < s.usable_until) {
            return Ok(session);
        }
        if let Some(failure) = state.backing_off(now) {
            return Err(failure);
        }
        self.exchange_and_keep().await
    }

    /// Forgets session `generation` (KMS refused it), unless a newer one replaced it already.
    pub(crate) fn drop_session(&self, generation: u64) {
        let mut current = self.inner.session.current.lock().expect("session lock");
        if current.as_ref().is_some_and(|s| s.generation == generation) {
            *current = None;
        }
    }

    fn refresh_in_background(&self) {
        let state = &self.inner.session;
        if state.backing_off(Instant::now()).is_some()
            || state.refreshing.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let client = self.clone();
        tokio::spawn(async move {
            {
                let state = &client.inner.session;
                let _exchange = state.exchanging.lock().await;
                let due = state
                    .current()
                    .is_none_or(|s| Instant::now() >= s.refresh_at);
                if due && let Err(err) = client.exchange_and_keep().await {
                    tracing::warn!(reason = err.reason.as_str(), error = %err, "refreshing the credentials failed; the current ones stay in use while they are valid");
                }
            }
            client
                .inner
                .session
                .refreshing
                .store(false, Ordering::Release);
        });
    }

    /// One exchange (under `exchanging`), recorded; a new session replaces the current one.
    async fn exchange_and_keep(&self) -> Result<Arc<Session>, KmsError> {
        let started = Instant::now();
        let result = self.exchange().await;
        let state = &self.inner.session;
        let mut book = state.book.lock().expect("session book");
        match result {
            Ok(fresh) => {
                book.generation += 1;
                let lifetime = fresh
                    .expires_at
                    .duration_since(SystemTime::now())
                    .unwrap_or_default();
                let session = Arc::new(Session {
                    credential: fresh.credential,
                    generation: book.generation,
                    refresh_at: started + lifetime.saturating_sub(refresh_margin(lifetime)),
                    usable_until: started + lifetime.saturating_sub(expiry_safety(lifetime)),
                });
                book.status.expires_at = Some(fresh.expires_at);
                book.status.exchanges += 1;
                book.status.consecutive_failures = 0;
                book.status.last_failure = None;
                book.not_before = None;
                drop(book);
                self.inner.metrics.credentials_exchanged("ok");
                tracing::debug!(
                    ?lifetime,
                    generation = session.generation,
                    "got new credentials"
                );
                *state.current.lock().expect("session lock") = Some(session.clone());
                Ok(session)
            }
            Err(err) => {
                book.status.failed_exchanges += 1;
                book.status.consecutive_failures =
                    book.status.consecutive_failures.saturating_add(1);
                book.status.last_failure = Some(err.clone());
                book.not_before =
                    Some(Instant::now() + backoff_after(book.status.consecutive_failures));
                drop(book);
                self.inner
                    .metrics
                    .credentials_exchanged(err.reason.as_str());
                Err(err)
            }
        }
    }

    /// Base credentials, then the agency, then temporary keys: as configured.
    async fn exchange(&self) -> Result<Fresh, KmsError> {
        let config = &self.inner.config;
        let agency = config.agency.as_ref();
        let temporary = config.temporary_access_key;
        // The base token is the final one only without agency and temporary keys: then it is
        // scoped to the project; otherwise it only has to prove who we are.
        let final_base = agency.is_none() && temporary.is_none();
        let base = match &config.credentials {
            Credentials::Password { domain_name, .. } => {
                let scope = if final_base {
                    json!({"project": self.project_scope()})
                } else {
                    json!({"domain": {"name": domain_name}})
                };
                Some(self.password_token(scope).await?)
            }
            Credentials::WebIdentity {
                identity_provider_id,
                token_source,
            } => {
                let scope = final_base.then(|| json!({"project": self.project_scope()}));
                let id_token = token_source.subject_token().await.map_err(|why| {
                    KmsError::new(
                        Call::SubjectToken,
                        ErrorReason::IdentityTokenUnavailable,
                        format!("no ID token from {}: {why}", token_source.describe()),
                    )
                })?;
                Some(
                    self.id_token_exchange(identity_provider_id, &id_token, scope)
                        .await?,
                )
            }
            Credentials::AccessKey { .. } => None,
        };
        // Who asks IAM: the base token, or for AccessKey the AK/SK signature (temporary keys of
        // an agency only: IAM gives agency tokens to token holders).
        let caller = || match (&base, &config.credentials) {
            (Some(token), _) => Ok(Auth::Token(token.token.clone(), 0)),
            (
                None,
                Credentials::AccessKey {
                    keys,
                    security_token,
                },
            ) if agency.is_some() && temporary.is_some() => Ok(Auth::Signed {
                keys: keys.clone(),
                security_token: security_token.clone(),
                project_id: None,
                generation: None,
            }),
            _ => Err(KmsError::new(
                Call::IamAssumeAgency,
                ErrorReason::InvalidConfiguration,
                "an agency on AccessKey auth needs temporary keys (temporaryAccessKey): IAM gives agency tokens only to token holders",
            )),
        };
        match (agency, temporary) {
            (None, None) => {
                let token = base.expect("no session without a base token");
                Ok(Fresh::token(token))
            }
            (Some(agency), None) => {
                let token = self.agency_token(agency, &caller()?).await?;
                Ok(Fresh::token(token))
            }
            (agency, Some(duration)) => {
                let identity = match agency {
                    None => {
                        json!({"methods": ["token"], "token": {"duration_seconds": duration.as_secs()}})
                    }
                    Some(agency) => {
                        let mut assume = agency_body(agency);
                        assume["duration_seconds"] = json!(duration.as_secs());
                        json!({"methods": ["assume_role"], "assume_role": assume})
                    }
                };
                let call = if agency.is_some() {
                    Call::IamAssumeAgency
                } else {
                    Call::IamSecurityToken
                };
                self.temporary_keys(call, identity, &caller()?).await
            }
        }
    }

    /// `{"id": ...}` or `{"name": ...}` of the configured project.
    pub(crate) fn project_scope(&self) -> Value {
        match (&self.inner.config.project, self.inner.project_id.get()) {
            (_, Some(id)) => json!({"id": id}),
            (Project::Name(name), None) => json!({"name": name}),
            (Project::Id(id), None) => json!({"id": id}),
        }
    }

    /// A token scoped to `scope`, and a scoped token's project ID remembered.
    async fn iam_token_call(
        &self,
        call: Call,
        path: &str,
        body: Value,
        auth: &Auth,
        extra_header: Option<(&'static str, &str)>,
    ) -> Result<IssuedToken, KmsError> {
        let url = join(self.iam_base()?, path);
        let body = body.to_string().into_bytes();
        let answer = self
            .with_retries(call, || {
                self.send_with(call, Method::POST, &url, Some(&body), auth, extra_header)
            })
            .await?;
        let described: TokenResponse = decode(call, answer.body)?;
        let issued = IssuedToken::new(answer.subject_token, described).ok_or_else(|| {
            KmsError::new(
                call,
                ErrorReason::UnexpectedResponse,
                "IAM answered without X-Subject-Token",
            )
        })?;
        if let Some(id) = &issued.project_id {
            let _ = self.inner.project_id.set(id.clone());
        }
        Ok(issued)
    }

    async fn password_token(&self, scope: Value) -> Result<IssuedToken, KmsError> {
        let Credentials::Password {
            username,
            password,
            domain_name,
        } = &self.inner.config.credentials
        else {
            unreachable!("password tokens only with password credentials")
        };
        let body = json!({"auth": {
            "identity": {"methods": ["password"], "password": {"user": {
                "name": username, "password": password.expose_secret(), "domain": {"name": domain_name}}}},
            "scope": scope}});
        self.iam_token_call(Call::IamToken, "v3/auth/tokens", body, &Auth::None, None)
            .await
    }

    /// `POST /v3.0/OS-AUTH/id-token/tokens` with `X-Idp-Id`. An expired ID token is not sent;
    /// a refused one is explained with its (non-secret) claims.
    async fn id_token_exchange(
        &self,
        identity_provider_id: &str,
        id_token: &SecretString,
        scope: Option<Value>,
    ) -> Result<IssuedToken, KmsError> {
        let claims = IdTokenClaims::peek(id_token.expose_secret());
        let now = jiff::Timestamp::now().as_second();
        if let Some(claims) = &claims {
            if claims.exp.is_some_and(|exp| exp <= now) {
                return Err(KmsError::new(
                    Call::IamIdToken,
                    ErrorReason::IdentityTokenExpired,
                    format!(
                        "the ID token ({}) expired at {}; the token source must give a fresh one (a projected token is rotated by the kubelet)",
                        claims.summary(),
                        claims.exp.map(seconds_rfc3339).unwrap_or_default()
                    ),
                ));
            }
            if claims.nbf.is_some_and(|nbf| nbf > now) {
                return Err(KmsError::new(
                    Call::IamIdToken,
                    ErrorReason::IdentityTokenExpired,
                    format!(
                        "the ID token ({}) is not valid before {}: check the clocks",
                        claims.summary(),
                        claims.nbf.map(seconds_rfc3339).unwrap_or_default()
                    ),
                ));
            }
        }
        let mut auth = json!({"id_token": {"id": id_token.expose_secret()}});
        if let Some(scope) = scope {
            auth["scope"] = scope;
        }
        let body = json!({ "auth": auth });
        self.iam_token_call(
            Call::IamIdToken,
            "v3.0/OS-AUTH/id-token/tokens",
            body,
            &Auth::None,
            Some(("x-idp-id", identity_provider_id)),
        )
        .await
        .map_err(|mut err| {
            let shown = claims
                .as_ref()
                .map(IdTokenClaims::summary)
                .unwrap_or_else(|| "not a readable JWT".into());
            match err.reason {
                ErrorReason::IdentityTokenRefused => {
                    err.message = format!(
                        "IAM refused the ID token of identity provider {identity_provider_id:?} ({}); the token has {shown}. IAM takes it only if aud contains the provider's client_id, iss equals its idp_url, a key of its signing_key (the issuer's JWKS) signed it, a mapping rule matches (sub), and the provider is enabled",
                        err.message
                    );
                }
                ErrorReason::IdentityProviderNotFound => {
                    err.message = format!(
                        "IAM has no identity provider {identity_provider_id:?} set up for OpenID Connect ({}); create it with protocol oidc, a mapping and its OpenID Connect configuration, or fix webIdentity.identityProviderId",
                        err.message
                    );
                }
                _ => {}
            }
            err
        })
    }

    async fn agency_token(&self, agency: &Agency, caller: &Auth) -> Result<IssuedToken, KmsError> {
        let body = json!({"auth": {
            "identity": {"methods": ["assume_role"], "assume_role": agency_body(agency)},
            "scope": {"project": self.project_scope()}}});
        self.iam_token_call(Call::IamAssumeAgency, "v3/auth/tokens", body, caller, None)
            .await
            .map_err(|err| explain_agency(err, agency))
    }

    async fn temporary_keys(
        &self,
        call: Call,
        identity: Value,
        caller: &Auth,
    ) -> Result<Fresh, KmsError> {
        let url = join(self.iam_base()?, "v3.0/OS-CREDENTIAL/securitytokens");
        let body = json!({"auth": {"identity": identity}})
            .to_string()
            .into_bytes();
        let answer = self
            .with_retries(call, || {
                self.send_with(call, Method::POST, &url, Some(&body), caller, None)
            })
            .await
            .map_err(|err| match &self.inner.config.agency {
                Some(agency) if call == Call::IamAssumeAgency => explain_agency(err, agency),
                _ => err,
            })?;
        let issued: SecurityTokenResponse = decode(call, answer.body)?;
        let expires_at = issued
            .credential
            .expires_at
            .parse::<jiff::Timestamp>()
            .ok()
            .map(SystemTime::from)
            .ok_or_else(|| {
                KmsError::new(
                    call,
                    ErrorReason::UnexpectedResponse,
                    "temporary credentials without a readable expires_at",
                )
            })?;
        Ok(Fresh {
            credential: SessionCredential::TemporaryKeys {
                keys: AccessKeyPair::new(issued.credential.access, issued.credential.secret),
                security_token: SecretString::from(issued.credential.securitytoken),
            },
            expires_at,
        })
    }
}

/// A session before it is kept.
struct Fresh {
    credential: SessionCredential,
    expires_at: SystemTime,
}

impl Fresh {
    fn token(issued: IssuedToken) -> Self {
        Self {
            credential: SessionCredential::Token(issued.token),
            // Without an expiry in the answer: the documented 24 hours of an IAM token.
            expires_at: issued
                .expires_at
                .map(SystemTime::from)
                .unwrap_or_else(|| SystemTime::now() + Duration::from_secs(24 * 3600)),
        }
    }
}

fn agency_body(agency: &Agency) -> Value {
    match &agency.domain {
        Domain::Name(name) => json!({"agency_name": agency.name, "domain_name": name}),
        Domain::Id(id) => json!({"agency_name": agency.name, "domain_id": id}),
    }
}

fn explain_agency(mut err: KmsError, agency: &Agency) -> KmsError {
    if err.reason == ErrorReason::AgencyNotAssumable {
        let domain = match &agency.domain {
            Domain::Name(name) => format!("domain {name:?}"),
            Domain::Id(id) => format!("domain ID {id:?}"),
        };
        err.message = format!(
            "cannot assume agency {:?} of {domain} ({}); the delegating account must have created the agency for this account, and the caller needs Agent Operator (iam:agencies:assume)",
            agency.name, err.message
        );
    }
    err
}

#[derive(Deserialize)]
struct SecurityTokenResponse {
    credential: WireCredential,
}

#[derive(Deserialize)]
struct WireCredential {
    access: String,
    secret: String,
    expires_at: String,
    securitytoken: String,
}

/// The claims of an ID token that explain a refusal, read without verifying anything (IAM
/// verifies); never the token itself.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct IdTokenClaims {
    pub iss: Option<String>,
    pub aud: Vec<String>,
    pub sub: Option<String>,
    pub exp: Option<i64>,
    pub nbf: Option<i64>,
}

impl IdTokenClaims {
    /// The claims of a JWT's payload, or `None` when it is not one.
    pub(crate) fn peek(jwt: &str) -> Option<Self> {
        use base64::Engine as _;
        let payload = jwt.trim().split('.').nth(1)?;
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload.trim_end_matches('='))
            .ok()?;
        let claims: Value = serde_json::from_slice(&bytes).ok()?;
        let text = |name: &str| claims[name].as_str().map(str::to_owned);
        let aud = match &claims["aud"] {
            Value::String(one) => vec![one.clone()],
            Value::Array(many) => many
                .iter()
                .filter_map(|a| a.as_str().map(str::to_owned))
                .collect(),
            _ => Vec::new(),
        };
        Some(Self {
            iss: text("iss"),
            aud,
            sub: text("sub"),
            exp: claims["exp"].as_i64(),
            nbf: claims["nbf"].as_i64(),
        })
    }

    fn summary(&self) -> String {
        format!(
            "iss {:?}, aud {:?}, sub {:?}",
            self.iss.as_deref().unwrap_or(""),
            self.aud,
            self.sub.as_deref().unwrap_or("")
        )
    }
}

fn seconds_rfc3339(seconds: i64) -> String {
    jiff::Timestamp::from_second(seconds)
        .map(|t| t.to_string())
        .unwrap_or_else(|_| seconds.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refresh_comes_a_fifth_of_the_lifetime_early_at_most_ten_minutes() {
        assert_eq!(
            refresh_margin(Duration::from_secs(60)),
            Duration::from_secs(12)
        );
        assert_eq!(
            refresh_margin(Duration::from_secs(900)),
            Duration::from_secs(180)
        );
        assert_eq!(
            refresh_margin(Duration::from_secs(86_400)),
            Duration::from_secs(600)
        );
        assert_eq!(
            expiry_safety(Duration::from_secs(60)),
            Duration::from_secs(3)
        );
        assert_eq!(
            expiry_safety(Duration::from_secs(3600)),
            Duration::from_secs(30)
        );
    }

    #[test]
    fn failed_exchanges_back_off_doubling_up_to_a_minute() {
        let waits: Vec<u64> = (1..=9).map(|n| backoff_after(n).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
    }

    #[test]
    fn id_token_claims_are_read_without_the_signature_and_never_panic() {
        use base64::Engine as _;
        let encode =
            |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
        let header = encode(&json!({"alg": "RS256"}));
        let payload = encode(
            &json!({"iss": "https://kubernetes.default.svc", "aud": ["kmsgrant"],
            "sub": "system:serviceaccount:kmsgrant-system:kmsgrant-operator", "exp": 100, "nbf": 40}),
        );
        let claims = IdTokenClaims::peek(&format!("{header}.{payload}.c2ln")).unwrap();
        assert_eq!(claims.aud, ["kmsgrant"]);
        assert_eq!(claims.exp, Some(100));
        assert_eq!(claims.nbf, Some(40));
        assert!(
            claims
                .summary()
                .contains("system:serviceaccount:kmsgrant-system:kmsgrant-operator")
        );
        let single = encode(&json!({"aud": "one"}));
        assert_eq!(
            IdTokenClaims::peek(&format!("h.{single}.s")).unwrap().aud,
            ["one"]
        );
        for junk in [
            "",
            "abc",
            "a.%%%.c",
            "a.bm90IGpzb24.c",
            "..",
            "\u{1F600}.\u{1F600}",
        ] {
            assert_eq!(IdTokenClaims::peek(junk), None, "{junk:?}");
        }
    }
}
