//! The HTTP client for DEW/KMS v1.0 and the two IAM calls it needs.
//!
//! One client per provider config: it owns the connection pool, the token bucket every caller
//! shares, the cached IAM token and the resolved project ID. No reqwest type leaves this module.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use reqwest::{Method, StatusCode, Url};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::sync::OnceCell;
use tokio::time::Instant;

use super::config::{ClientConfig, Credentials, LearnedRate, Project};
use super::error::{Call, ErrorReason, KmsError, classify};
use super::rate_limit::TokenBucket;
use super::session::{SessionCredential, SessionState};
use super::types::{
    CreateGrantResponse, DescribeKeyResponse, Grant, GrantPage, Grants, KeyInfo,
    ListGrantsResponse, NewGrant, Quotas, QuotasResponse,
};
use kmsgrant_kms_signer::{self as signer, AccessKeyPair, RequestParts, SdkDateTime};
use secrecy::{ExposeSecret, SecretString};

/// Most grants a key can hold (the documented `grant_per_CMK` quota).
pub const MAX_GRANTS_PER_KEY: usize = 100;
/// The largest page we ask for.
pub const MAX_PAGE_SIZE: u32 = 100;
/// Server text kept in an error message (characters); the rest is cut, so a hostile or broken
/// endpoint cannot blow up logs, events and conditions.
pub const MAX_ERROR_MESSAGE_CHARS: usize = 512;

/// Hooks for telemetry; the operator plugs its Prometheus registry in here.
pub trait ClientMetrics: Send + Sync {
    /// One HTTP attempt finished; `outcome` is `ok` or an [`ErrorReason`] string.
    fn attempt_finished(&self, _call: Call, _outcome: &'static str, _latency: Duration) {}
    /// A call is retried after a retryable failure.
    fn retried(&self, _call: Call, _reason: ErrorReason) {}
    /// A call waited for the token bucket.
    fn throttle_waited(&self, _waited: Duration) {}
    /// The rate (requests per second) the client now paces at, after learning from an answer.
    fn rate_limit(&self, _requests_per_second: f64) {}
    /// An exchange for new credentials (IAM token, ID-token exchange, agency, temporary keys)
    /// ended; `outcome` is `ok` or an [`ErrorReason`] string.
    fn credentials_exchanged(&self, _outcome: &'static str) {}
}

struct NoMetrics;
impl ClientMetrics for NoMetrics {}

/// A KMS client; cheap to clone, all clones share one pool, bucket and token.
#[derive(Clone)]
pub struct KmsClient {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for KmsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KmsClient")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

pub(crate) struct Inner {
    pub(crate) config: ClientConfig,
    http: reqwest::Client,
    kms_base: Url,
    iam_base: Option<Url>,
    bucket: TokenBucket,
    pub(crate) project_id: OnceCell<String>,
    pub(crate) session: SessionState,
    pub(crate) metrics: Arc<dyn ClientMetrics>,
}

impl KmsClient {
    /// Builds a client that reports to no metrics; see [`KmsClient::with_metrics`].
    pub fn new(config: ClientConfig) -> Result<Self, KmsError> {
        Self::with_metrics(config, Arc::new(NoMetrics))
    }

    /// Builds a client reporting every call to `metrics`; fails on an unusable configuration
    /// (bad URL, http without permission, bad CA bundle, password auth or a project name
    /// without an IAM endpoint).
    pub fn with_metrics(
        config: ClientConfig,
        metrics: Arc<dyn ClientMetrics>,
    ) -> Result<Self, KmsError> {
        let invalid = |message: String| {
            KmsError::new(
                Call::ClientSetup,
                ErrorReason::InvalidConfiguration,
                message,
            )
        };
        let parse = |what: &str, url: &str| -> Result<Url, KmsError> {
            let parsed = Url::parse(url)
                .map_err(|e| invalid(format!("{what} {url:?} is not a URL: {e}")))?;
            match parsed.scheme() {
                "https" => Ok(parsed),
                "http" if config.allow_http => Ok(parsed),
                "http" => Err(invalid(format!(
                    "{what} {url:?} is plain http; only https is allowed"
                ))),
                other => Err(invalid(format!(
                    "{what} {url:?} has scheme {other:?}; expected https"
                ))),
            }
        };
        let kms_base = parse("endpoint", &config.endpoint)?;
        let iam_base = config
            .iam_endpoint
            .as_deref()
            .map(|u| parse("iamEndpoint", u))
            .transpose()?;
        let needs_iam = !matches!(config.credentials, Credentials::AccessKey { .. })
            || config.agency.is_some()
            || config.temporary_access_key.is_some()
            || matches!(config.project, Project::Name(_));
        if needs_iam && iam_base.is_none() {
            return Err(invalid(
                "an IAM endpoint is needed for password or web-identity auth, an agency, temporary keys or a project name".into(),
            ));
        }
        if let Some(policy) = &config.address_policy {
            for base in std::iter::once(&kms_base).chain(iam_base.as_ref()) {
                if let Some(host) = base.host_str()
                    && let Ok(ip) = host.trim_matches(['[', ']']).parse::<std::net::IpAddr>()
                    && let Some(why) = policy.refusal(ip)
                {
                    return Err(KmsError::new(
                        Call::ClientSetup,
                        ErrorReason::AddressNotAllowed,
                        format!("{base} is refused by the address policy: {why}"),
                    ));
                }
            }
        }
        let tls = tls_config(config.ca_bundle.as_deref()).map_err(invalid)?;
        let mut http = reqwest::Client::builder();
        if let Some(policy) = &config.address_policy {
            // Every connection resolves through the policy: no DNS answer reaches a refused
            // address, however it changes after a check.
            http = http.dns_resolver(std::sync::Arc::new(
                crate::address_policy::GuardedResolver {
                    policy: std::sync::Arc::new(policy.clone()),
                },
            ));
        }
        let http = http
            .tls_backend_preconfigured(tls)
            .connect_timeout(config.connect_timeout)
            .timeout(config.request_timeout)
            // Never follow a redirect: a re-sent request would carry X-Auth-Token,
            // X-Security-Token or the IAM password body to whatever host the answer names.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("kmsgrant-operator/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| invalid(format!("cannot build the HTTP client: {e}")))?;
        let project_id = OnceCell::new();
        if let Project::Id(id) = &config.project {
            project_id.set(id.clone()).expect("a new cell is empty");
        }
        Ok(Self {
            inner: Arc::new(Inner {
                bucket: TokenBucket::new(config.rate_limit, config.learned_rate),
                config,
                http,
                kms_base,
                iam_base,
                project_id,
                session: SessionState::default(),
                metrics,
            }),
        })
    }

    /// `describe-key`: by key ID, `alias/<alias>` or alias URN.
    pub async fn describe_key(&self, key_id: &str) -> Result<KeyInfo, KmsError> {
        let response: DescribeKeyResponse = self
            .kms_json(Call::DescribeKey, "describe-key", json!({"key_id": key_id}))
            .await?;
        Ok(response.key_info.into())
    }

    /// Every grant on a key, walking all pages of `list-grants` with `page_size` per page.
    pub async fn list_all_grants(
        &self,
        key_id: &str,
        page_size: u32,
    ) -> Result<Vec<Grant>, KmsError> {
        let page_size = page_size.clamp(1, MAX_PAGE_SIZE);
        let limit = page_size.to_string();
        // A key holds at most MAX_GRANTS_PER_KEY grants: a walk needs at most that many pages of
        // `page_size` plus one (a last, empty page) and never returns more than the quota plus one
        // page (grants created while we walk). Anything beyond is a looping or hostile endpoint.
        let max_pages = MAX_GRANTS_PER_KEY.div_ceil(page_size as usize) + 1;
        let max_grants = MAX_GRANTS_PER_KEY + page_size as usize;
        let runaway = |what: String| {
            KmsError::new(
                Call::ListGrants,
                ErrorReason::ListRunaway,
                format!(
                    "list-grants on {key_id} {what}, more than a key can hold ({MAX_GRANTS_PER_KEY} grants); the endpoint is looping"
                ),
            )
        };
        let mut grants = Vec::new();
        let mut decoded = Grants::default();
        let mut marker: Option<String> = None;
        let mut seen_markers = std::collections::HashSet::new();
        for _ in 0..max_pages {
            let page = self.grants_page(key_id, &limit, marker.as_deref()).await?;
            grants.extend(page.grants.into_iter().map(|grant| decoded.decode(grant)));
            if grants.len() > max_grants {
                return Err(runaway(format!("returned {} grants", grants.len())));
            }
            if !page.truncated || page.next_marker.is_empty() {
                return Ok(grants);
            }
            if marker.as_deref() == Some(page.next_marker.as_str())
                || !seen_markers.insert(page.next_marker.clone())
            {
                return Err(KmsError::new(
                    Call::ListGrants,
                    ErrorReason::UnexpectedResponse,
                    format!(
                        "list-grants on {key_id} returned marker {:?} again; the listing does not advance",
                        bounded(&page.next_marker)
                    ),
                ));
            }
            marker = Some(page.next_marker);
        }
        Err(runaway(format!(
            "went on for more than {max_pages} pages of {page_size}"
        )))
    }

    /// One page of `list-grants`: `limit` grants (sent as given; the page documents 1 to 100)
    /// from `marker` (`None`: the first page). For callers that look at paging itself; everyone
    /// else wants [`KmsClient::list_all_grants`].
    pub async fn list_grants_page(
        &self,
        key_id: &str,
        limit: u32,
        marker: Option<&str>,
    ) -> Result<GrantPage, KmsError> {
        let page = self.grants_page(key_id, &limit.to_string(), marker).await?;
        let mut decoded = Grants::default();
        Ok(GrantPage {
            grants: page
                .grants
                .into_iter()
                .map(|grant| decoded.decode(grant))
                .collect(),
            next_marker: page.next_marker,
            truncated: page.truncated,
            total: page.total,
        })
    }

    async fn grants_page(
        &self,
        key_id: &str,
        limit: &str,
        marker: Option<&str>,
    ) -> Result<ListGrantsResponse, KmsError> {
        let mut body = json!({"key_id": key_id, "limit": limit});
        if let Some(marker) = marker {
            body["marker"] = json!(marker);
        }
        self.kms_json(Call::ListGrants, "list-grants", body).await
    }

    /// `create-grant`; returns the new grant ID. A lost answer is [`ErrorReason::OutcomeUnknown`]:
    /// the grant may exist, so list before creating again.
    pub async fn create_grant(&self, grant: &NewGrant) -> Result<String, KmsError> {
        let mut body = json!({
            "key_id": grant.key_id,
            "grantee_principal": grant.grantee_principal,
            "grantee_principal_type": grant.grantee_principal_type.as_str(),
            "operations": grant.operations.iter().map(|op| op.as_str()).collect::<Vec<_>>(),
        });
        if let Some(name) = &grant.name {
            body["name"] = json!(name);
        }
        if let Some(retiring) = &grant.retiring_principal {
            body["retiring_principal"] = json!(retiring);
        }
        let response: CreateGrantResponse = self
            .kms_json(Call::CreateGrant, "create-grant", body)
            .await?;
        Ok(response.grant_id)
    }

    /// `revoke-grant`. An unknown grant or key is reported as such; see
    /// [`KmsError::is_already_gone`].
    pub async fn revoke_grant(&self, key_id: &str, grant_id: &str) -> Result<(), KmsError> {
        let body = json!({"key_id": key_id, "grant_id": grant_id});
        self.kms_call(Call::RevokeGrant, Method::POST, "revoke-grant", Some(body))
            .await
            .map(drop)
    }

    /// `retire-grant`, as the grantor, the retiring principal or a grantee holding `retire-grant`.
    pub async fn retire_grant(&self, key_id: &str, grant_id: &str) -> Result<(), KmsError> {
        let body = json!({"key_id": key_id, "grant_id": grant_id});
        self.kms_call(Call::RetireGrant, Method::POST, "retire-grant", Some(body))
            .await
            .map(drop)
    }

    /// `GET user-quotas`: also the cheapest authenticated call, used to check credentials.
    pub async fn user_quotas(&self) -> Result<Quotas, KmsError> {
        let value = self
            .kms_call(Call::UserQuotas, Method::GET, "user-quotas", None)
            .await?;
        let response: QuotasResponse = decode(Call::UserQuotas, value)?;
        Ok(response.quotas.into())
    }

    /// An unauthenticated `GET` of the KMS endpoint (or, with `iam`, the IAM endpoint): whether
    /// its name resolves and TLS holds, and the server's clock (`Date`). Any HTTP answer, 404
    /// included, counts as reached; no credential is sent.
    pub async fn probe_endpoint(&self, iam: bool) -> Result<EndpointProbe, KmsError> {
        let url = if iam {
            self.iam_base()?.clone()
        } else {
            self.inner.kms_base.clone()
        };
        let started = Instant::now();
        let response = self
            .inner
            .http
            .get(url)
            .send()
            .await
            .map_err(|e| transport_error(Call::Probe, &e))?;
        let server_time = response
            .headers()
            .get(reqwest::header::DATE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| jiff::fmt::rfc2822::parse(v).ok())
            .map(|zoned| std::time::SystemTime::from(zoned.timestamp()));
        Ok(EndpointProbe {
            status: response.status().as_u16(),
            server_time,
            round_trip: started.elapsed(),
        })
    }

    /// The project ID in use, resolving a project name through IAM on first use.
    pub async fn project_id(&self) -> Result<String, KmsError> {
        self.inner
            .project_id
            .get_or_try_init(|| self.resolve_project_id())
            .await
            .cloned()
    }

    async fn kms_json<T: DeserializeOwned>(
        &self,
        call: Call,
        action: &str,
        body: Value,
    ) -> Result<T, KmsError> {
        let value = self
            .kms_call(call, Method::POST, action, Some(body))
            .await?;
        decode(call, value)
    }

    /// One KMS call with auth, pacing, retries under the deadline, and one re-authentication.
    async fn kms_call(
        &self,
        call: Call,
        method: Method,
        action: &str,
        body: Option<Value>,
    ) -> Result<Value, KmsError> {
        let project_id = self.project_id().await?;
        let url = join(
            &self.inner.kms_base,
            &format!("v1.0/{project_id}/kms/{action}"),
        );
        let body = body.map(|b| b.to_string().into_bytes());
        let reauthenticated = std::sync::atomic::AtomicBool::new(false);
        self.with_retries(call, || async {
            let auth = self.auth_for_kms(&project_id).await?;
            let result = self
                .send(call, method.clone(), &url, body.as_deref(), &auth)
                .await;
            match result {
                Err(err)
                    if self.refused_session(&err) && !reauthenticated.load(Ordering::Relaxed) =>
                {
                    let Some(generation) = auth.session_generation() else {
                        return Err(err);
                    };
                    // Only the first caller to see the rejected session drops it.
                    self.drop_session(generation);
                    reauthenticated.store(true, Ordering::Relaxed);
                    let auth = self.auth_for_kms(&project_id).await?;
                    self.may_send(call)?;
                    self.send(call, method.clone(), &url, body.as_deref(), &auth)
                        .await
                }
                other => other,
            }
        })
        .await
        .map(|answer| answer.body)
    }

    // One span per call, attempts and retries included: a child of the reconcile that made it.
    #[tracing::instrument(name = "kms", skip_all, fields(call = call.as_str()))]
    pub(crate) async fn with_retries<F, Fut>(
        &self,
        call: Call,
        mut attempt: F,
    ) -> Result<Answer, KmsError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<Answer, KmsError>>,
    {
        let policy = self.inner.config.retry;
        let started = Instant::now();
        let mut attempts = 0;
        loop {
            attempts += 1;
            let permit = self.inner.bucket.acquire().await;
            if !permit.waited.is_zero() {
                self.inner.metrics.throttle_waited(permit.waited);
            }
            // Asked after the wait for the bucket and before every attempt: a write never goes
            // out after the caller lost the right to write.
            self.may_send(call)?;
            let err = match attempt().await {
                Ok(answer) => {
                    self.learned(|bucket| bucket.succeeded(permit));
                    return Ok(answer);
                }
                Err(err) => err,
            };
            if err.reason == ErrorReason::Throttled {
                self.learned(|bucket| bucket.throttled(permit, err.retry_after));
            } else if err.status.is_some() {
                // The cloud answered: it accepted the request, even if it refused the operation.
                self.learned(|bucket| bucket.succeeded(permit));
            }
            if !err.is_retryable_now() || attempts >= policy.max_attempts {
                return Err(err);
            }
            let backoff = policy
                .backoff(attempts)
                .max(err.retry_after.unwrap_or_default());
            if started.elapsed() + backoff >= policy.deadline {
                return Err(err);
            }
            tracing::debug!(call = %call, reason = err.reason.as_str(), attempt = attempts, ?backoff, "retrying KMS call");
            self.inner.metrics.retried(call, err.reason);
            tokio::time::sleep(backoff).await;
        }
    }

    /// `Err(WriteFenced)` when `call` is a write and the write gate is closed.
    fn may_send(&self, call: Call) -> Result<(), KmsError> {
        match &self.inner.config.write_gate {
            Some(gate) if call.is_write() && !gate.is_open() => Err(KmsError::new(
                call,
                ErrorReason::WriteFenced,
                "not sent: this client may not write now (its write gate is closed)".to_owned(),
            )),
            _ => Ok(()),
        }
    }

    /// Tells the bucket how a request went and reports the rate it now paces at.
    fn learned(&self, outcome: impl FnOnce(&TokenBucket)) {
        outcome(&self.inner.bucket);
        self.inner.metrics.rate_limit(self.inner.bucket.rate());
    }

    /// The request rate this client currently paces at: the configured rate, or less once the
    /// cloud has throttled it (learned from 429 answers, recovering additively).
    pub fn current_rate(&self) -> f64 {
        self.inner.bucket.rate()
    }

    /// What the cloud's throttle taught this client at its last cut, and how long ago; `None`
    /// when it never throttled this client. A new leader can start from it (see
    /// [`ClientConfig::learned_rate`]).
    pub fn last_cut(&self) -> Option<(LearnedRate, std::time::Duration)> {
        self.inner.bucket.last_cut()
    }

    async fn send(
        &self,
        call: Call,
        method: Method,
        url: &Url,
        body: Option<&[u8]>,
        auth: &Auth,
    ) -> Result<Answer, KmsError> {
        self.send_with(call, method, url, body, auth, None).await
    }

    /// One attempt, with `extra_header` (a non-secret header such as `X-Idp-Id`) added.
    pub(crate) async fn send_with(
        &self,
        call: Call,
        method: Method,
        url: &Url,
        body: Option<&[u8]>,
        auth: &Auth,
        extra_header: Option<(&'static str, &str)>,
    ) -> Result<Answer, KmsError> {
        let mut headers = HeaderMap::new();
        if let Some((name, value)) = extra_header {
            headers.insert(HeaderName::from_static(name), header_value(value));
        }
        headers.insert(reqwest::header::HOST, header_value(&authority(url)));
        if body.is_some() {
            headers.insert(
                reqwest::header::CONTENT_TYPE,
                HeaderValue::from_static("application/json;charset=UTF-8"),
            );
        }
        match auth {
            Auth::None => {}
            Auth::Token(token, _) => {
                let mut value = header_value(token.expose_secret());
                value.set_sensitive(true);
                headers.insert(HeaderName::from_static("x-auth-token"), value);
            }
            Auth::Signed {
                keys,
                security_token,
                project_id,
                ..
            } => {
                if let Some(project_id) = project_id {
                    headers.insert(
                        HeaderName::from_static("x-project-id"),
                        header_value(project_id),
                    );
                }
                if let Some(token) = security_token {
                    let mut value = header_value(token.expose_secret());
                    value.set_sensitive(true);
                    headers.insert(HeaderName::from_static("x-security-token"), value);
                }
                let parts = RequestParts {
                    method: method.as_str(),
                    path: url.path(),
                    query: url.query().unwrap_or(""),
                    headers: &headers,
                    body: body.unwrap_or_default(),
                };
                let signature =
                    signer::sign(&parts, keys, &self.inner.config.signing, SdkDateTime::now());
                signature.apply_to(&mut headers);
                if let Some(value) = headers.get_mut(reqwest::header::AUTHORIZATION) {
                    value.set_sensitive(true);
                }
            }
        }
        let mut request = self
            .inner
            .http
            .request(method, url.clone())
            .headers(headers);
        if let Some(body) = body {
            request = request.body(body.to_vec());
        }
        let started = Instant::now();
        let result = self.receive(call, request).await;
        let outcome = match &result {
            Ok(_) => "ok",
            Err(err) => err.reason.as_str(),
        };
        self.inner
            .metrics
            .attempt_finished(call, outcome, started.elapsed());
        result
    }

    async fn receive(
        &self,
        call: Call,
        request: reqwest::RequestBuilder,
    ) -> Result<Answer, KmsError> {
        let response = request
            .send()
            .await
            .map_err(|e| transport_error(call, &e))?;
        let status = response.status();
        let request_id = response
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        if status.is_redirection() {
            let location = response
                .headers()
                .get(reqwest::header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            // Name the host only: a Location may carry a path or query worth hiding, and the
            // message ends up in conditions.
            let target = url_host(response.url(), location);
            return Err(KmsError {
                call,
                reason: ErrorReason::RedirectRefused,
                status: Some(status.as_u16()),
                code: None,
                message: format!(
                    "the endpoint answered HTTP {} redirecting to host {target}; redirects are never followed (they would carry credentials there): set the endpoint to the final URL",
                    status.as_u16()
                ),
                request_id,
                retry_after: None,
            });
        }
        // IAM's token call answers with the token in this header, never in the body.
        let subject_token = response
            .headers()
            .get("x-subject-token")
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty())
            .map(SecretString::from);
        let bytes = read_capped(call, response, self.inner.config.max_response_bytes).await?;
        let body = parse_answer(call, status, &bytes, request_id, retry_after)?;
        Ok(Answer {
            body,
            subject_token,
        })
    }

    /// How a KMS (or IAM) call authenticates now: the config's static AK/SK, or the session.
    async fn auth_for_kms(&self, project_id: &str) -> Result<Auth, KmsError> {
        let project_id = Some(project_id.to_owned());
        match &self.inner.config.credentials {
            Credentials::AccessKey {
                keys,
                security_token,
            } if !self.uses_session() => Ok(Auth::Signed {
                keys: keys.clone(),
                security_token: security_token.clone(),
                project_id,
                generation: None,
            }),
            _ => {
                let session = self.session().await?;
                Ok(match &session.credential {
                    SessionCredential::Token(token) => {
                        Auth::Token(token.clone(), session.generation)
                    }
                    SessionCredential::TemporaryKeys {
                        keys,
                        security_token,
                    } => Auth::Signed {
                        keys: keys.clone(),
                        security_token: Some(security_token.clone()),
                        project_id,
                        generation: Some(session.generation),
                    },
                })
            }
        }
    }

    /// Whether KMS refused the credentials of a session (expired or revoked token or temporary
    /// key): worth one new session.
    fn refused_session(&self, err: &KmsError) -> bool {
        self.uses_session()
            && (err.is_token_problem()
                || matches!(
                    err.reason,
                    ErrorReason::InvalidCredentials | ErrorReason::TokenRejected
                ))
    }

    async fn resolve_project_id(&self) -> Result<String, KmsError> {
        let Project::Name(name) = &self.inner.config.project else {
            unreachable!("a project ID is set at construction")
        };
        if self.uses_session() {
            // A token scoped by project name carries the project's ID.
            self.session().await?;
            if let Some(id) = self.inner.project_id.get() {
                return Ok(id.clone());
            }
        }
        let mut url = join(self.iam_base()?, "v3/projects");
        url.query_pairs_mut().append_pair("name", name);
        let mut auth = self.auth_for_kms("").await?;
        if let Auth::Signed { project_id, .. } = &mut auth {
            *project_id = None;
        }
        let answer = self
            .with_retries(Call::IamProjects, || {
                self.send(Call::IamProjects, Method::GET, &url, None, &auth)
            })
            .await?;
        answer
            .body
            .get("projects")
            .and_then(Value::as_array)
            .and_then(|projects| {
                projects
                    .iter()
                    .find(|p| p["name"] == name.as_str())
                    .or(projects.first())
            })
            .and_then(|p| p["id"].as_str())
            .map(str::to_owned)
            .ok_or_else(|| {
                KmsError::new(
                    Call::IamProjects,
                    ErrorReason::InvalidConfiguration,
                    format!("IAM knows no project named {name:?}"),
                )
            })
    }

    /// KMS's entries in IAM's service catalog (`GET /v3/auth/catalog`): services of type `kms`
    /// or `kmsv1`, one entry per endpoint, with its region and URL.
    pub async fn kms_catalog(&self) -> Result<Vec<CatalogEndpoint>, KmsError> {
        let url = join(self.iam_base()?, "v3/auth/catalog");
        let auth = self.auth_for_kms("").await?;
        let answer = self
            .with_retries(Call::IamCatalog, || {
                self.send(Call::IamCatalog, Method::GET, &url, None, &auth)
            })
            .await?;
        Ok(answer
            .body
            .get("catalog")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter(|service| matches!(service["type"].as_str(), Some("kms" | "kmsv1")))
            .flat_map(|service| service["endpoints"].as_array().cloned().unwrap_or_default())
            .filter_map(|endpoint| {
                Some(CatalogEndpoint {
                    region: endpoint["region"].as_str().map(str::to_owned),
                    url: endpoint["url"].as_str()?.to_owned(),
                })
            })
            .collect())
    }

    pub(crate) fn iam_base(&self) -> Result<&Url, KmsError> {
        self.inner.iam_base.as_ref().ok_or_else(|| {
            KmsError::new(
                Call::IamToken,
                ErrorReason::InvalidConfiguration,
                "no IAM endpoint configured",
            )
        })
    }
}

/// One KMS endpoint of IAM's service catalog.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CatalogEndpoint {
    /// Its region (`None` when the catalog gives none).
    pub region: Option<String>,
    /// Its URL (the catalog's KMS URLs end in `/v1.0/<project>`).
    pub url: String,
}

/// What an unauthenticated request to an endpoint found.
#[derive(Clone, Debug)]
pub struct EndpointProbe {
    /// The HTTP status of the answer (any status: the endpoint was reached).
    pub status: u16,
    /// The server's clock, from its `Date` header.
    pub server_time: Option<std::time::SystemTime>,
    /// How long the request took.
    pub round_trip: Duration,
}

/// A successful answer: its JSON body and the one header a caller needs from it.
pub(crate) struct Answer {
    pub(crate) body: Value,
    /// `X-Subject-Token`: the token IAM's token call issues (absent on every other answer).
    pub(crate) subject_token: Option<SecretString>,
}

/// How one request authenticates.
pub(crate) enum Auth {
    None,
    /// `X-Auth-Token`, with the generation of the session it came from.
    Token(SecretString, u64),
    /// An AK/SK signature, with `X-Security-Token` for temporary keys and `X-Project-Id`.
    Signed {
        keys: AccessKeyPair,
        security_token: Option<SecretString>,
        project_id: Option<String>,
        /// The session the keys came from; `None` for the config's own AK/SK.
        generation: Option<u64>,
    },
}

impl Auth {
    fn session_generation(&self) -> Option<u64> {
        match self {
            Self::Token(_, generation) => Some(*generation),
            Self::Signed { generation, .. } => *generation,
            Self::None => None,
        }
    }
}

pub(crate) fn decode<T: DeserializeOwned>(call: Call, value: Value) -> Result<T, KmsError> {
    serde_json::from_value(value).map_err(|e| {
        KmsError::new(
            call,
            ErrorReason::UnexpectedResponse,
            format!("answer does not match the API: {}", bounded(&e.to_string())),
        )
    })
}

pub(crate) fn join(base: &Url, path: &str) -> Url {
    let mut url = base.clone();
    let prefix = base.path().trim_end_matches('/');
    url.set_path(&format!("{prefix}/{path}"));
    url
}

fn authority(url: &Url) -> String {
    let host = url.host_str().unwrap_or_default();
    match url.port() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_owned(),
    }
}

fn header_value(text: &str) -> HeaderValue {
    HeaderValue::from_str(text).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// A failure before an answer arrived. For writes, only a failed connect proves nothing was sent.
fn transport_error(call: Call, err: &reqwest::Error) -> KmsError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(cause) = source {
        if let Some(refused) = cause.downcast_ref::<crate::address_policy::AddressRefused>() {
            return KmsError::new(call, ErrorReason::AddressNotAllowed, refused.to_string());
        }
        source = cause.source();
    }
    let reason = if err.is_connect() {
        ErrorReason::ConnectionFailed
    } else if call.is_write() {
        ErrorReason::OutcomeUnknown
    } else if err.is_timeout() {
        ErrorReason::Timeout
    } else {
        ErrorReason::ConnectionFailed
    };
    // reqwest's Display names the URL but never headers, so no credential can leak here.
    KmsError::new(call, reason, format!("no answer: {err}"))
}

/// An answer (status and body, already capped in size) as the JSON value of a success or a
/// classified error. Pure, so it is fuzzed on its own.
fn parse_answer(
    call: Call,
    status: StatusCode,
    bytes: &[u8],
    request_id: Option<String>,
    retry_after: Option<Duration>,
) -> Result<Value, KmsError> {
    if status.is_success() {
        let value: Value = if bytes.iter().all(u8::is_ascii_whitespace) {
            json!({})
        } else {
            serde_json::from_slice(bytes).map_err(|e| {
                KmsError::new(
                    call,
                    ErrorReason::UnexpectedResponse,
                    format!("answer is not JSON: {}", bounded(&e.to_string())),
                )
            })?
        };
        return Ok(value);
    }
    let (code, message) = error_body(bytes, status);
    Err(KmsError {
        call,
        reason: classify(call, status.as_u16(), &code),
        status: Some(status.as_u16()),
        code: (!code.is_empty()).then_some(code),
        message,
        request_id: request_id.map(|id| bounded(&id)),
        retry_after,
    })
}

/// Reads an answer body chunk by chunk, refusing (before holding it) more than `max` bytes.
async fn read_capped(
    call: Call,
    mut response: reqwest::Response,
    max: usize,
) -> Result<Vec<u8>, KmsError> {
    let too_large = |size: String| {
        KmsError::new(
            call,
            ErrorReason::ResponseTooLarge,
            format!("the answer is {size}, more than the {max} bytes accepted"),
        )
    };
    if let Some(length) = response.content_length()
        && length > max as u64
    {
        return Err(too_large(format!("{length} bytes")));
    }
    let mut bytes = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| transport_error(call, &e))?
    {
        if bytes.len() + chunk.len() > max {
            return Err(too_large("longer".into()));
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(bytes)
}

/// The host a redirect points at, resolved against the request URL; `?` when unreadable.
fn url_host(base: &Url, location: &str) -> String {
    base.join(location)
        .ok()
        .and_then(|url| url.host_str().map(bounded))
        .unwrap_or_else(|| "?".into())
}

/// Server text cut to [`MAX_ERROR_MESSAGE_CHARS`] characters.
fn bounded(text: &str) -> String {
    match text.char_indices().nth(MAX_ERROR_MESSAGE_CHARS) {
        Some((end, _)) => format!("{}… (cut, {} bytes in all)", &text[..end], text.len()),
        None => text.to_owned(),
    }
}

/// `error_code` and `error_msg` from any of the error shapes: KMS's nested one, the gateway's flat
/// one, and IAM's `{"error": {"code": 401, "message": ...}}`.
fn error_body(bytes: &[u8], status: StatusCode) -> (String, String) {
    let value: Value = serde_json::from_slice(bytes).unwrap_or(Value::Null);
    let error = value
        .get("error")
        .filter(|e| e.is_object())
        .unwrap_or(&value);
    let code = error
        .get("error_code")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let message = error
        .get("error_msg")
        .or_else(|| error.get("message"))
        .and_then(Value::as_str)
        .map(bounded)
        .unwrap_or_else(|| format!("HTTP {status}"));
    (bounded(&code), message)
}

fn tls_config(ca_bundle: Option<&str>) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    if let Some(pem) = ca_bundle.filter(|pem| !pem.trim().is_empty()) {
        let mut added = 0;
        for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            let cert = cert.map_err(|e| format!("caBundle is not valid PEM: {e}"))?;
            roots
                .add(cert)
                .map_err(|e| format!("caBundle holds an unusable certificate: {e}"))?;
            added += 1;
        }
        if added == 0 {
            return Err("caBundle holds no certificate".into());
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup failed: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_bodies_of_kms_the_gateway_and_iam_are_all_read() {
        let kms = br#"{"error": {"error_code": "KMS.0207", "error_msg": "key not found"}}"#;
        assert_eq!(
            error_body(kms, StatusCode::NOT_FOUND),
            ("KMS.0207".into(), "key not found".into())
        );
        let gateway =
            br#"{"error_code": "APIG.0308", "error_msg": "throttled", "request_id": "r"}"#;
        assert_eq!(
            error_body(gateway, StatusCode::TOO_MANY_REQUESTS),
            ("APIG.0308".into(), "throttled".into())
        );
        let iam = br#"{"error": {"code": 401, "message": "The username or password is wrong.", "title": "Unauthorized"}}"#;
        assert_eq!(
            error_body(iam, StatusCode::UNAUTHORIZED).1,
            "The username or password is wrong."
        );
        assert_eq!(
            error_body(b"<html>", StatusCode::BAD_GATEWAY),
            (String::new(), "HTTP 502 Bad Gateway".into())
        );
    }

    #[test]
    fn paths_join_onto_an_endpoint_with_or_without_a_prefix() {
        let base = Url::parse("https://kms.eu-de.otc.t-systems.com").unwrap();
        assert_eq!(
            join(&base, "v1.0/p/kms/list-grants").as_str(),
            "https://kms.eu-de.otc.t-systems.com/v1.0/p/kms/list-grants"
        );
        let base = Url::parse("http://127.0.0.1:8480/prefix/").unwrap();
        assert_eq!(
            join(&base, "v3/auth/tokens").as_str(),
            "http://127.0.0.1:8480/prefix/v3/auth/tokens"
        );
        assert_eq!(authority(&base), "127.0.0.1:8480");
    }

    #[test]
    fn plain_http_is_refused_unless_allowed() {
        let creds = Credentials::AccessKey {
            keys: signer::AccessKeyPair::new("ak", "sk"),
            security_token: None,
        };
        let config = ClientConfig::new("http://127.0.0.1:1", Project::Id("p".into()), creds);
        let err = KmsClient::new(config.clone()).unwrap_err();
        assert_eq!(err.reason, ErrorReason::InvalidConfiguration);
        assert!(err.message.contains("plain http"), "{}", err.message);
        KmsClient::new(ClientConfig {
            allow_http: true,
            ..config
        })
        .unwrap();
    }

    #[test]
    fn a_bad_ca_bundle_is_a_configuration_error() {
        assert!(
            tls_config(Some("not a certificate"))
                .unwrap_err()
                .contains("no certificate")
        );
        assert!(tls_config(None).is_ok());
    }

    #[test]
    fn debug_output_of_credentials_and_client_shows_no_secret() {
        let creds = Credentials::AccessKey {
            keys: signer::AccessKeyPair::new("AKID", "very-secret-key"),
            security_token: Some(SecretString::from("session-token-value")),
        };
        let password = Credentials::Password {
            username: "alice".into(),
            password: SecretString::from("hunter2-password"),
            domain_name: "acme".into(),
        };
        let mut config = ClientConfig::new("https://kms.example", Project::Id("p".into()), creds);
        let client = KmsClient::new(config.clone()).unwrap();
        config.credentials = password;
        config.iam_endpoint = Some("https://iam.example".into());
        let printed = format!(
            "{client:?} {config:?} {:?}",
            KmsClient::new(config.clone()).unwrap()
        );
        for secret in ["very-secret-key", "session-token-value", "hunter2-password"] {
            assert!(!printed.contains(secret), "{secret} printed in {printed}");
        }
        assert!(printed.contains("AKID") && printed.contains("alice"));
    }

    /// Fuzzing of the response parser (a bounded proptest run in every suite; `PROPTEST_CASES`
    /// raises it). Seeds in `tests/fuzz-corpus/kms-answers/` run first.
    mod fuzz {
        use proptest::prelude::*;
        use proptest::test_runner::FileFailurePersistence;

        use super::super::*;
        use crate::types::{
            CreateGrantResponse, DescribeKeyResponse, Grant, IssuedToken, KeyInfo,
            ListGrantsResponse, Quotas, QuotasResponse, TokenResponse,
        };

        fn config() -> ProptestConfig {
            ProptestConfig {
                cases: std::env::var("PROPTEST_CASES")
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(512),
                failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
                    "src/client.proptest-regressions",
                ))),
                ..ProptestConfig::default()
            }
        }

        const CALLS: [Call; 8] = [
            Call::DescribeKey,
            Call::ListGrants,
            Call::CreateGrant,
            Call::RevokeGrant,
            Call::RetireGrant,
            Call::UserQuotas,
            Call::IamToken,
            Call::IamProjects,
        ];

        /// Everything the client does with an answer: parse it, decode it as each call's type.
        fn check_answer(call: Call, status: u16, body: &[u8]) -> Result<(), TestCaseError> {
            let status = StatusCode::from_u16(status).unwrap();
            match parse_answer(call, status, body, Some("id".repeat(1000)), None) {
                Ok(value) => {
                    prop_assert!(status.is_success());
                    let _ = decode::<ListGrantsResponse>(call, value.clone())
                        .map(|page| page.grants.into_iter().map(Grant::from).count());
                    let _ = decode::<DescribeKeyResponse>(call, value.clone())
                        .map(|key| KeyInfo::from(key.key_info));
                    let _ = decode::<QuotasResponse>(call, value.clone())
                        .map(|quotas| Quotas::from(quotas.quotas));
                    let _ = decode::<CreateGrantResponse>(call, value.clone());
                    let _ = decode::<TokenResponse>(call, value).map(|body| {
                        IssuedToken::new(Some(SecretString::from("t")), body)
                            .map(|token| token.expires_at)
                    });
                }
                Err(err) => {
                    prop_assert!(
                        !status.is_success() || err.reason == ErrorReason::UnexpectedResponse
                    );
                    let limit = MAX_ERROR_MESSAGE_CHARS + 64;
                    prop_assert!(
                        err.message.chars().count() <= limit,
                        "{}",
                        err.message.len()
                    );
                    prop_assert!(
                        err.code
                            .as_deref()
                            .is_none_or(|c| c.chars().count() <= limit)
                    );
                    prop_assert!(
                        err.request_id
                            .as_deref()
                            .is_none_or(|c| c.chars().count() <= limit)
                    );
                }
            }
            Ok(())
        }

        /// JSON built from the answer fields the client reads, with values of any type.
        fn answer_json() -> impl Strategy<Value = Value> {
            let names = prop_oneof![
                Just("grants"),
                Just("next_marker"),
                Just("truncated"),
                Just("total"),
                Just("key_info"),
                Just("key_id"),
                Just("grant_id"),
                Just("grantee_principal"),
                Just("grantee_principal_type"),
                Just("operations"),
                Just("creation_date"),
                Just("key_state"),
                Just("default_key_flag"),
                Just("quotas"),
                Just("resources"),
                Just("type"),
                Just("used"),
                Just("quota"),
                Just("error"),
                Just("error_code"),
                Just("error_msg"),
                Just("message"),
                Just("name"),
                Just("token"),
                Just("expires_at"),
                Just("project"),
                Just("id"),
            ];
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::Bool),
                any::<i64>().prop_map(|n| json!(n)),
                any::<u64>().prop_map(|n| json!(n)),
                any::<f64>().prop_map(|n| json!(n)),
                "-?[0-9]{1,22}".prop_map(Value::String),
                prop_oneof![
                    Just("true"),
                    Just("false"),
                    Just("CMK"),
                    Just("grant_per_CMK")
                ]
                .prop_map(|s| json!(s)),
                ".{0,40}".prop_map(Value::String),
            ];
            leaf.prop_recursive(4, 48, 6, move |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
                    prop::collection::btree_map(names.clone(), inner, 0..7).prop_map(|m| {
                        Value::Object(m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
                    }),
                ]
            })
        }

        #[test]
        fn kms_answer_seeds() {
            let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fuzz-corpus/kms-answers");
            let mut seeds = 0;
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                let body = std::fs::read(&path).unwrap();
                for call in CALLS {
                    for status in [200, 201, 400, 404, 429, 503] {
                        check_answer(call, status, &body)
                            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                    }
                }
                seeds += 1;
            }
            assert!(seeds > 0);
        }

        proptest! {
            #![proptest_config(config())]

            #[test]
            fn kms_answer_parser_takes_any_bytes(
                call in prop::sample::select(CALLS.to_vec()),
                status in 200u16..600,
                body in prop::collection::vec(any::<u8>(), 0..1024),
            ) {
                check_answer(call, status, &body)?;
            }

            #[test]
            fn kms_answer_parser_takes_any_json(
                call in prop::sample::select(CALLS.to_vec()),
                status in prop::sample::select(vec![200u16, 201, 400, 403, 404, 429, 500, 503]),
                answer in answer_json(),
            ) {
                check_answer(call, status, &serde_json::to_vec(&answer).unwrap())?;
            }

            #[test]
            fn list_pages_with_any_field_values_decode_without_panic(
                grants in prop::collection::vec(
                    (
                        ".{0,70}",
                        prop_oneof![
                            "-?[0-9]{1,22}".prop_map(Value::String),
                            any::<i64>().prop_map(|n| json!(n)),
                            any::<f64>().prop_map(|n| json!(n)),
                            ".{0,12}".prop_map(Value::String),
                        ],
                        prop::collection::vec(".{0,20}", 0..4),
                        prop::option::of(".{0,10}"),
                    ),
                    0..8,
                ),
                next_marker in prop_oneof![
                    "[0-9]{0,20}".prop_map(Value::String),
                    any::<u64>().prop_map(|n| json!(n)),
                ],
                truncated in prop_oneof![
                    Just(json!("true")), Just(json!("false")), any::<bool>().prop_map(Value::Bool),
                ],
            ) {
                let page = json!({
                    "grants": grants.iter().map(|(text, date, operations, kind)| json!({
                        "key_id": text, "grant_id": text, "grantee_principal": text,
                        "creation_date": date, "operations": operations,
                        "grantee_principal_type": kind, "name": text,
                    })).collect::<Vec<_>>(),
                    "next_marker": next_marker,
                    "truncated": truncated,
                });
                let decoded = decode::<ListGrantsResponse>(Call::ListGrants, page);
                let decoded = decoded.map(|page| page.grants.into_iter().map(Grant::from).collect::<Vec<_>>());
                if let Ok(decoded) = decoded {
                    prop_assert_eq!(decoded.len(), grants.len());
                }
            }

            #[test]
            fn error_messages_of_any_length_are_cut_and_keep_their_start(
                message in ".{0,3000}",
                code in "[A-Z]{3,5}\\.[0-9]{4}",
                nested in any::<bool>(),
            ) {
                let body = if nested {
                    json!({"error": {"error_code": code, "error_msg": message}})
                } else {
                    json!({"error_code": code, "error_msg": message})
                };
                let err = parse_answer(
                    Call::CreateGrant,
                    StatusCode::BAD_REQUEST,
                    &serde_json::to_vec(&body).unwrap(),
                    None,
                    None,
                )
                .unwrap_err();
                prop_assert_eq!(err.code.as_deref(), Some(code.as_str()));
                let kept: String = message.chars().take(MAX_ERROR_MESSAGE_CHARS).collect();
                prop_assert!(err.message.starts_with(&kept));
            }
        }
    }
}
