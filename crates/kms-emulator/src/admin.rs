//! The admin API under `/_emulator/` and its in-process twin [`EmulatorAdmin`]: faults,
//! statistics, the call log, state dump and reset, and helpers that set up worlds for tests.
//!
//! | call | body | answer |
//! | --- | --- | --- |
//! | `GET /_emulator/config` | | account facts, endpoints, the default user and access key |
//! | `GET /_emulator/state` | | `{"keys": [Key], "grants": [Grant], "users": [UserSummary]}` |
//! | `POST /_emulator/reset` | | 204: only Default Master Keys, no grants, stats cleared, start-up faults |
//! | `GET /_emulator/stats` | | `{"total", "by_status": {op: {"200": n, "dropped": n}}, "by_error_code": {op: {code: n}}}` |
//! | `DELETE /_emulator/stats` | | 204, counters and call log cleared |
//! | `GET /_emulator/calls?after=SEQ` | | `[{"seq", "operation", "status", "error_code"?, "dropped", "key_id"?, "grant_id"?, "caller"?, "at_ms"}]` |
//! | `GET`/`PUT`/`DELETE /_emulator/faults` | [`FaultSettings`] | the settings in force |
//! | `POST /_emulator/keys` | `{"key_alias", "key_id"?, "creator"?, "key_state"?, "default_key"?}` | 201 Key |
//! | `PUT /_emulator/keys/{key_id}/state` | `{"key_state": "3"}` | Key |
//! | `GET /_emulator/keys/{key_id}/grant-count` | | `{"key_id", "grant_count"}` |
//! | `GET /_emulator/grant-counts` | | `{key_id: n}` |
//! | `DELETE /_emulator/grants/{grant_id}` | | the removed Grant (out of band: no KMS call counted) |
//! | `POST /_emulator/users` | `{"name", "password", "user_id"?, "access_key"?, "secret_key"?}` | 201 UserSummary |
//! | `POST /_emulator/tokens` | `{"user_id"?, "scope"?: "project"\|"domain", "ttl_seconds"?}` | 201 `{"token", "expires_at_ms"}` |
//! | `POST /_emulator/domains` | `{"name", "id"?}` | 201 Domain (another account: the other party of an agency) |
//! | `POST /_emulator/domains/{domain_id}/users` | as `/users` | 201 UserSummary, a user of that domain |
//! | `POST /_emulator/agencies` | [`NewAgency`] | 201 Agency |
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::auth::unix_ms;
use super::faults::FaultSettings;
use super::server::Shared;
use super::state::{
    Agency, Domain, Grant, Key, KeyState, SYSTEM_PRINCIPAL, TokenScope, User, random_hex,
};
use super::stats::{CallRecord, StatsSnapshot};

/// A key to create out of band.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewKey {
    pub key_alias: String,
    /// A chosen ID (`8-4-4-4-12` lowercase hex); random when absent.
    #[serde(default)]
    pub key_id: Option<String>,
    /// User ID of the creator (who may revoke); the default user when absent.
    #[serde(default)]
    pub creator: Option<String>,
    /// `"1"`..`"5"`; enabled when absent.
    #[serde(default)]
    pub key_state: Option<String>,
    /// A Default Master Key (refuses grants).
    #[serde(default)]
    pub default_key: bool,
}

/// A user to add: for tests of revoke/retire permissions.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewUser {
    pub name: String,
    pub password: String,
    /// 32 hex characters when absent.
    #[serde(default)]
    pub user_id: Option<String>,
    #[serde(default)]
    pub access_key: Option<String>,
    #[serde(default)]
    pub secret_key: Option<String>,
}

/// An agency a delegating domain creates (on the console or with the agency API): users of the
/// trusted domain may assume it (`assume_role`) and act in the delegating domain.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewAgency {
    pub name: String,
    /// The delegating domain; the emulator's own when absent (the one with the KMS project).
    #[serde(default)]
    pub domain_id: Option<String>,
    /// The delegated (trusted) domain, by ID or name.
    #[serde(default)]
    pub trust_domain_id: Option<String>,
    #[serde(default)]
    pub trust_domain_name: Option<String>,
}

/// A user without secrets.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct UserSummary {
    pub name: String,
    pub user_id: String,
    pub access_key: Option<String>,
}

impl From<&User> for UserSummary {
    fn from(user: &User) -> Self {
        Self {
            name: user.name.clone(),
            user_id: user.user_id.clone(),
            access_key: user.access_key.clone(),
        }
    }
}

/// `GET /_emulator/state`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StateDump {
    pub keys: Vec<Key>,
    pub grants: Vec<Grant>,
    pub users: Vec<UserSummary>,
}

/// In-process control of a running emulator (the same operations as the HTTP admin API).
#[derive(Clone, Debug)]
pub struct EmulatorAdmin {
    shared: Arc<Shared>,
}

impl EmulatorAdmin {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    fn now_ms() -> u64 {
        unix_ms(SystemTime::now())
    }

    pub fn create_key(&self, new_key: NewKey) -> Result<Key, String> {
        let key_state = match new_key.key_state.as_deref() {
            None => KeyState::Enabled,
            Some(text) => {
                KeyState::parse(text).ok_or_else(|| format!("key_state {text:?} is not 1..5"))?
            }
        };
        let creator = new_key.creator.unwrap_or_else(|| {
            if new_key.default_key {
                SYSTEM_PRINCIPAL.to_owned()
            } else {
                self.shared.config.user_id.clone()
            }
        });
        let key = self.shared.world().admin_create_key(
            new_key.key_id,
            &new_key.key_alias,
            &creator,
            key_state,
            new_key.default_key,
            Self::now_ms(),
        )?;
        self.shared.mark_dirty();
        Ok(key)
    }

    pub fn set_key_state(&self, key_id: &str, key_state: KeyState) -> Option<Key> {
        let key = self
            .shared
            .world()
            .admin_set_key_state(key_id, key_state, Self::now_ms());
        self.shared.mark_dirty();
        key
    }

    pub fn grant_count(&self, key_id: &str) -> Option<usize> {
        self.shared.world().grant_count(key_id)
    }

    pub fn grant_counts(&self) -> BTreeMap<String, usize> {
        self.shared.world().grant_counts().into_iter().collect()
    }

    /// Removes a grant as someone else would (no KMS call is counted).
    pub fn revoke_out_of_band(&self, grant_id: &str) -> Option<Grant> {
        let grant = self.shared.world().admin_remove_grant(grant_id);
        self.shared.mark_dirty();
        grant
    }

    pub fn add_user(&self, new_user: NewUser) -> UserSummary {
        let domain_id = self.shared.config.domain_id.clone();
        self.add_user_in_domain(&domain_id, new_user)
            .expect("the emulator's own domain exists")
    }

    /// A user of another domain (see [`EmulatorAdmin::add_domain`]).
    pub fn add_user_in_domain(
        &self,
        domain_id: &str,
        new_user: NewUser,
    ) -> Result<UserSummary, String> {
        let mut world = self.shared.world();
        if world.domain_by(Some(domain_id), None).is_none() {
            return Err(format!("no domain {domain_id}"));
        }
        let user = User {
            name: new_user.name,
            user_id: new_user.user_id.unwrap_or_else(|| random_hex(16)),
            domain_id: domain_id.to_owned(),
            password: new_user.password,
            access_key: new_user.access_key,
            secret_key: new_user.secret_key,
        };
        let summary = UserSummary::from(&user);
        world.add_user(user);
        Ok(summary)
    }

    /// Another domain (account), with no project: the other party of an agency.
    pub fn add_domain(&self, name: &str, id: Option<String>) -> Result<Domain, String> {
        self.shared.world().add_domain(Domain {
            id: id.unwrap_or_else(|| random_hex(16)),
            name: name.to_owned(),
        })
    }

    pub fn add_agency(&self, new_agency: NewAgency) -> Result<Agency, String> {
        let mut world = self.shared.world();
        let trust = world
            .domain_by(
                new_agency.trust_domain_id.as_deref(),
                new_agency.trust_domain_name.as_deref(),
            )
            .ok_or("trust_domain_id or trust_domain_name must name a domain")?;
        world.add_agency(Agency {
            id: random_hex(16),
            name: new_agency.name,
            domain_id: new_agency
                .domain_id
                .unwrap_or_else(|| self.shared.config.domain_id.clone()),
            trust_domain_id: trust.id,
        })
    }

    pub fn domains(&self) -> Vec<Domain> {
        self.shared.world().domains()
    }

    pub fn agencies(&self) -> Vec<Agency> {
        self.shared.world().agencies().to_vec()
    }

    /// Issues a token directly; a `ttl_seconds` of 0 or less gives an already expired token.
    pub fn issue_token(&self, user_id: &str, scope: TokenScope, ttl_seconds: i64) -> (String, u64) {
        let (token, issued) =
            self.shared
                .world()
                .issue_token(user_id, scope, Self::now_ms(), ttl_seconds * 1000);
        (token, issued.expires_at_ms)
    }

    pub fn stats(&self) -> StatsSnapshot {
        self.shared.stats.lock().expect("stats lock").snapshot()
    }

    /// Calls with a sequence number above `after`, oldest first (`0` for all kept).
    pub fn calls(&self, after: u64) -> Vec<CallRecord> {
        self.shared
            .stats
            .lock()
            .expect("stats lock")
            .calls_after(after)
    }

    pub fn clear_stats(&self) {
        self.shared.stats.lock().expect("stats lock").clear();
    }

    pub fn faults(&self) -> FaultSettings {
        (*self.shared.faults()).clone()
    }

    pub fn set_faults(&self, faults: FaultSettings) -> Result<(), String> {
        faults.validate()?;
        self.shared.set_faults(faults);
        Ok(())
    }

    /// Keys and grants back to the start, statistics cleared, faults back to the start-up ones.
    /// Users and tokens stay valid.
    pub fn reset(&self) {
        self.shared.world().reset(Self::now_ms());
        self.clear_stats();
        self.shared.set_faults(self.shared.config.faults.clone());
        self.shared.mark_dirty();
    }

    pub fn dump(&self) -> StateDump {
        let world = self.shared.world();
        let saved = world.keys_and_grants();
        StateDump {
            keys: saved.keys,
            grants: saved.grants,
            users: world.users().iter().map(UserSummary::from).collect(),
        }
    }
}

pub fn router() -> Router<Arc<Shared>> {
    Router::new()
        .route("/config", get(config))
        .route("/state", get(state))
        .route("/reset", post(reset))
        .route("/stats", get(stats).delete(clear_stats))
        .route("/calls", get(calls))
        .route("/faults", get(faults).put(set_faults).delete(clear_faults))
        .route("/keys", post(create_key))
        .route("/keys/{key_id}/state", put(set_key_state))
        .route("/keys/{key_id}/grant-count", get(grant_count))
        .route("/grant-counts", get(grant_counts))
        .route("/grants/{grant_id}", delete(remove_grant))
        .route("/users", post(add_user))
        .route("/tokens", post(issue_token))
        .route("/domains", post(add_domain).get(list_domains))
        .route("/domains/{domain_id}/users", post(add_user_in_domain))
        .route("/agencies", post(add_agency).get(list_agencies))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewDomain {
    name: String,
    #[serde(default)]
    id: Option<String>,
}

async fn add_domain(State(shared): State<Arc<Shared>>, body: axum::body::Bytes) -> Response {
    let request: NewDomain = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(error) => return bad_request(error.to_string()),
    };
    match admin(shared).add_domain(&request.name, request.id) {
        Ok(domain) => (StatusCode::CREATED, axum::Json(domain)).into_response(),
        Err(error) => bad_request(error),
    }
}

async fn list_domains(State(shared): State<Arc<Shared>>) -> Response {
    axum::Json(admin(shared).domains()).into_response()
}

async fn add_user_in_domain(
    State(shared): State<Arc<Shared>>,
    Path(domain_id): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let new_user: NewUser = match serde_json::from_slice(&body) {
        Ok(new_user) => new_user,
        Err(error) => return bad_request(error.to_string()),
    };
    match admin(shared).add_user_in_domain(&domain_id, new_user) {
        Ok(user) => (StatusCode::CREATED, axum::Json(user)).into_response(),
        Err(_) => not_found("domain"),
    }
}

async fn add_agency(State(shared): State<Arc<Shared>>, body: axum::body::Bytes) -> Response {
    let request: NewAgency = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(error) => return bad_request(error.to_string()),
    };
    match admin(shared).add_agency(request) {
        Ok(agency) => (StatusCode::CREATED, axum::Json(agency)).into_response(),
        Err(error) => bad_request(error),
    }
}

async fn list_agencies(State(shared): State<Arc<Shared>>) -> Response {
    axum::Json(admin(shared).agencies()).into_response()
}

fn admin(shared: Arc<Shared>) -> EmulatorAdmin {
    EmulatorAdmin::new(shared)
}

fn bad_request(message: String) -> Response {
    (
        StatusCode::BAD_REQUEST,
        axum::Json(json!({"error": message})),
    )
        .into_response()
}

fn not_found(what: &str) -> Response {
    (
        StatusCode::NOT_FOUND,
        axum::Json(json!({"error": format!("{what} not found")})),
    )
        .into_response()
}

async fn config(State(shared): State<Arc<Shared>>) -> Response {
    let c = &shared.config;
    let base = format!("http://{}", shared.local_addr);
    axum::Json(json!({
        "base_url": base,
        "kms_endpoint": format!("{base}/v1.0/{}", c.project_id),
        "iam_endpoint": format!("{base}/v3"),
        "region": c.region,
        "project_id": c.project_id,
        "project_name": c.project_name,
        "domain_id": c.domain_id,
        "domain_name": c.domain_name,
        "username": c.username,
        "user_id": c.user_id,
        "access_key": c.access_key,
        "grants_per_key": c.grants_per_key,
        "keys_per_project": c.keys_per_project,
    }))
    .into_response()
}

async fn state(State(shared): State<Arc<Shared>>) -> Response {
    axum::Json(admin(shared).dump()).into_response()
}

async fn reset(State(shared): State<Arc<Shared>>) -> StatusCode {
    admin(shared).reset();
    StatusCode::NO_CONTENT
}

async fn stats(State(shared): State<Arc<Shared>>) -> Response {
    axum::Json(admin(shared).stats()).into_response()
}

async fn clear_stats(State(shared): State<Arc<Shared>>) -> StatusCode {
    admin(shared).clear_stats();
    StatusCode::NO_CONTENT
}

#[derive(Deserialize)]
struct CallsQuery {
    #[serde(default)]
    after: u64,
}

async fn calls(State(shared): State<Arc<Shared>>, Query(query): Query<CallsQuery>) -> Response {
    axum::Json(admin(shared).calls(query.after)).into_response()
}

async fn faults(State(shared): State<Arc<Shared>>) -> Response {
    axum::Json(admin(shared).faults()).into_response()
}

async fn set_faults(State(shared): State<Arc<Shared>>, body: axum::body::Bytes) -> Response {
    let settings: FaultSettings = match serde_json::from_slice(&body) {
        Ok(settings) => settings,
        Err(error) => return bad_request(error.to_string()),
    };
    let admin = admin(shared);
    match admin.set_faults(settings) {
        Ok(()) => axum::Json(admin.faults()).into_response(),
        Err(error) => bad_request(error),
    }
}

async fn clear_faults(State(shared): State<Arc<Shared>>) -> Response {
    let admin = admin(shared);
    let _ = admin.set_faults(FaultSettings::default());
    axum::Json(admin.faults()).into_response()
}

async fn create_key(State(shared): State<Arc<Shared>>, body: axum::body::Bytes) -> Response {
    let new_key: NewKey = match serde_json::from_slice(&body) {
        Ok(new_key) => new_key,
        Err(error) => return bad_request(error.to_string()),
    };
    match admin(shared).create_key(new_key) {
        Ok(key) => (StatusCode::CREATED, axum::Json(key)).into_response(),
        Err(error) => bad_request(error),
    }
}

#[derive(Deserialize)]
struct KeyStateBody {
    key_state: String,
}

async fn set_key_state(
    State(shared): State<Arc<Shared>>,
    Path(key_id): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let Some(key_state) = serde_json::from_slice::<KeyStateBody>(&body)
        .ok()
        .and_then(|b| KeyState::parse(&b.key_state))
    else {
        return bad_request("expected {\"key_state\": \"1\"..\"5\"}".into());
    };
    match admin(shared).set_key_state(&key_id, key_state) {
        Some(key) => axum::Json(key).into_response(),
        None => not_found("key"),
    }
}

async fn grant_count(State(shared): State<Arc<Shared>>, Path(key_id): Path<String>) -> Response {
    match admin(shared).grant_count(&key_id) {
        Some(count) => axum::Json(json!({"key_id": key_id, "grant_count": count})).into_response(),
        None => not_found("key"),
    }
}

async fn grant_counts(State(shared): State<Arc<Shared>>) -> Response {
    axum::Json(admin(shared).grant_counts()).into_response()
}

async fn remove_grant(State(shared): State<Arc<Shared>>, Path(grant_id): Path<String>) -> Response {
    match admin(shared).revoke_out_of_band(&grant_id) {
        Some(grant) => axum::Json(grant).into_response(),
        None => not_found("grant"),
    }
}

async fn add_user(State(shared): State<Arc<Shared>>, body: axum::body::Bytes) -> Response {
    match serde_json::from_slice::<NewUser>(&body) {
        Ok(new_user) => (
            StatusCode::CREATED,
            axum::Json(admin(shared).add_user(new_user)),
        )
            .into_response(),
        Err(error) => bad_request(error.to_string()),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenRequest {
    #[serde(default)]
    user_id: Option<String>,
    #[serde(default)]
    scope: Option<String>,
    #[serde(default)]
    ttl_seconds: Option<i64>,
}

async fn issue_token(State(shared): State<Arc<Shared>>, body: axum::body::Bytes) -> Response {
    let request: TokenRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(error) => return bad_request(error.to_string()),
    };
    let scope = match request.scope.as_deref() {
        None | Some("project") => TokenScope::Project(shared.config.project_id.clone()),
        Some("domain") => TokenScope::Domain,
        Some(other) => return bad_request(format!("scope {other:?} is not project|domain")),
    };
    let user_id = request
        .user_id
        .unwrap_or_else(|| shared.config.user_id.clone());
    let ttl = request
        .ttl_seconds
        .unwrap_or(shared.config.token_ttl.as_secs() as i64);
    let (token, expires_at_ms) = admin(shared).issue_token(&user_id, scope, ttl);
    (
        StatusCode::CREATED,
        axum::Json(json!({"token": token, "expires_at_ms": expires_at_ms})),
    )
        .into_response()
}
