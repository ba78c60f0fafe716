//! HTTP routes: the KMS calls under `/v1.0/{project_id}/kms/`, the IAM calls under `/v3/`, and
//! the admin API under `/_emulator/` (see [`super::admin`]).
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use serde_json::{Value, json};

use super::auth::{self, Authenticated, unix_ms};
use super::errors::{ErrorCode, IamError, KmsError};
use super::server::{ConnectionAbort, Shared};
use super::state::{TokenScope, random_hex};
use super::stats::CallRecord;
use super::validation;
use kmsgrant_kms_signer::RequestParts;

/// Request bodies larger than this are refused with KMS.0203.
pub const BODY_LIMIT: usize = 1 << 20;

/// The KMS operations the emulator serves, by their action name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Operation {
    CreateKey,
    DescribeKey,
    ListKeys,
    EnableKey,
    DisableKey,
    ScheduleKeyDeletion,
    CancelKeyDeletion,
    UpdateKeyAlias,
    CreateGrant,
    ListGrants,
    RevokeGrant,
    RetireGrant,
    ListRetirableGrants,
    UserQuotas,
}

impl Operation {
    pub const ALL: [Operation; 14] = [
        Self::CreateKey,
        Self::DescribeKey,
        Self::ListKeys,
        Self::EnableKey,
        Self::DisableKey,
        Self::ScheduleKeyDeletion,
        Self::CancelKeyDeletion,
        Self::UpdateKeyAlias,
        Self::CreateGrant,
        Self::ListGrants,
        Self::RevokeGrant,
        Self::RetireGrant,
        Self::ListRetirableGrants,
        Self::UserQuotas,
    ];

    pub fn action(self) -> &'static str {
        match self {
            Self::CreateKey => "create-key",
            Self::DescribeKey => "describe-key",
            Self::ListKeys => "list-keys",
            Self::EnableKey => "enable-key",
            Self::DisableKey => "disable-key",
            Self::ScheduleKeyDeletion => "schedule-key-deletion",
            Self::CancelKeyDeletion => "cancel-key-deletion",
            Self::UpdateKeyAlias => "update-key-alias",
            Self::CreateGrant => "create-grant",
            Self::ListGrants => "list-grants",
            Self::RevokeGrant => "revoke-grant",
            Self::RetireGrant => "retire-grant",
            Self::ListRetirableGrants => "list-retirable-grants",
            Self::UserQuotas => "user-quotas",
        }
    }

    pub fn from_action(action: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|operation| operation.action() == action)
    }

    fn method(self) -> Method {
        if self == Self::UserQuotas {
            Method::GET
        } else {
            Method::POST
        }
    }

    fn writes(self) -> bool {
        !matches!(
            self,
            Self::DescribeKey
                | Self::ListKeys
                | Self::ListGrants
                | Self::ListRetirableGrants
                | Self::UserQuotas
        )
    }
}

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1.0/{project_id}/kms/{action}", any(kms_call))
        .route("/v3/auth/tokens", post(create_token))
        .route("/v3/auth/catalog", get(catalog))
        .route("/v3/auth/domains", get(domains))
        .route("/v3/projects", get(projects))
        .route("/v3/auth/projects", get(projects))
        .merge(super::federation_api::router())
        .nest("/_emulator", super::admin::router())
        .fallback(not_found)
        .layer(axum::middleware::map_response_with_state(
            shared.clone(),
            emulator_date,
        ))
        .with_state(shared)
}

/// With a clock offset set, the `Date` header tells the emulator's (wrong) time.
async fn emulator_date(State(shared): State<Arc<Shared>>, mut response: Response) -> Response {
    let faults = shared.faults();
    if faults.clock_offset_seconds != 0 {
        let date = jiff::Timestamp::try_from(faults.now())
            .unwrap_or(jiff::Timestamp::UNIX_EPOCH)
            .strftime("%a, %d %b %Y %H:%M:%S GMT")
            .to_string();
        if let Ok(value) = axum::http::HeaderValue::from_str(&date) {
            response
                .headers_mut()
                .insert(axum::http::header::DATE, value);
        }
    }
    response
}

async fn not_found() -> Response {
    KmsError(ErrorCode::InvalidUrl).into_response_with_id(&random_hex(16))
}

fn with_request_id(mut response: Response, request_id: &str) -> Response {
    if let Ok(value) = HeaderValue::from_str(request_id) {
        response.headers_mut().insert("x-request-id", value);
    }
    response
}

/// One KMS call: latency, authentication, throttle, injected errors, the operation itself,
/// statistics, and possibly "commit, then drop the connection".
async fn kms_call(
    State(shared): State<Arc<Shared>>,
    Path((project_id, action)): Path<(String, String)>,
    request: Request,
) -> Response {
    let request_id = random_hex(16);
    let (parts, body) = request.into_parts();
    let abort = parts.extensions.get::<ConnectionAbort>().cloned();
    let faults = shared.faults();
    let delay = faults.delay();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let operation = Operation::from_action(&action);
    let label = operation.map(Operation::action).unwrap_or("unknown");
    let mut record = CallRecord {
        seq: 0,
        operation: label.to_owned(),
        status: 200,
        error_code: None,
        dropped: false,
        key_id: None,
        grant_id: None,
        grant_name: None,
        caller: None,
        peer: parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|ConnectInfo(peer)| peer.ip()),
        at_ms: unix_ms(SystemTime::now()),
    };
    let Ok(body) = axum::body::to_bytes(body, BODY_LIMIT).await else {
        let error = KmsError(ErrorCode::RequestTooLong);
        record.status = error.code().status().as_u16();
        record.error_code = Some(error.code().code());
        shared.stats.lock().expect("stats lock").record(record);
        return error.into_response_with_id(&request_id);
    };
    let request = KmsRequest {
        operation,
        project_id: &project_id,
        parts: &parts,
        body: &body,
    };
    let outcome = run_kms_call(&shared, &faults, &request, &mut record);
    let response = match outcome {
        Ok(answer) => {
            let operation = operation.expect("only known operations succeed");
            if operation.writes() {
                shared.mark_dirty();
            }
            if matches!(operation, Operation::CreateGrant | Operation::RevokeGrant)
                && faults.drops_after_commit(operation.action())
                && let Some(abort) = abort
            {
                record.dropped = true;
                record.status = 0;
                shared.stats.lock().expect("stats lock").record(record);
                abort.abort();
                // The connection task drops this future with the connection.
                return std::future::pending().await;
            }
            if operation.writes() && faults.errs_after_commit(operation.action()) {
                let error = KmsError(ErrorCode::Internal);
                record.status = error.code().status().as_u16();
                record.error_code = Some(error.code().code());
                shared.stats.lock().expect("stats lock").record(record);
                return error.into_response_with_id(&request_id);
            }
            let json = [(
                axum::http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )];
            with_request_id((StatusCode::OK, json, answer).into_response(), &request_id)
        }
        Err(error) => {
            record.status = error.code().status().as_u16();
            record.error_code = Some(error.code().code());
            error.into_response_with_id(&request_id)
        }
    };
    shared.stats.lock().expect("stats lock").record(record);
    response
}

/// A received KMS call, before anything is checked.
struct KmsRequest<'a> {
    operation: Option<Operation>,
    project_id: &'a str,
    parts: &'a axum::http::request::Parts,
    body: &'a [u8],
}

/// Authentication, throttle, injected errors and the operation; the answer as JSON bytes.
fn run_kms_call(
    shared: &Shared,
    faults: &super::faults::FaultSettings,
    request: &KmsRequest<'_>,
    record: &mut CallRecord,
) -> Result<Vec<u8>, KmsError> {
    let KmsRequest {
        operation,
        project_id,
        parts,
        body,
    } = *request;
    let method = &parts.method;
    let operation = operation.ok_or(KmsError(ErrorCode::InvalidUrl))?;
    if method != operation.method() {
        return Err(ErrorCode::MethodNotSupported.into());
    }
    let now = shared.faults().now();
    let signed = RequestParts {
        method: method.as_str(),
        path: parts.uri.path(),
        query: parts.uri.query().unwrap_or(""),
        headers: &parts.headers,
        body,
    };
    let Authenticated { caller, credential } = auth::authenticate_kms(
        &shared.world.lock().expect("world lock"),
        project_id,
        &signed,
        now,
    )?;
    record.caller = Some(caller.user_id.clone());
    if let Some(per_second) = faults.throttle_per_second {
        let admitted = shared.throttle.lock().expect("throttle lock").admit(
            &credential,
            per_second,
            std::time::Instant::now(),
        );
        if !admitted {
            return Err(ErrorCode::Throttled.into());
        }
    }
    if let Some(code) = faults.injected_error(operation.action()) {
        return Err(code.into());
    }
    let fields = validation::parse_body(body)?;
    record.key_id = fields
        .get("key_id")
        .and_then(Value::as_str)
        .map(str::to_owned);
    record.grant_id = fields
        .get("grant_id")
        .and_then(Value::as_str)
        .map(str::to_owned);
    if operation == Operation::CreateGrant {
        record.grant_name = fields
            .get("name")
            .and_then(Value::as_str)
            .map(str::to_owned);
    }
    let now_ms = unix_ms(now);
    let answer = match operation {
        Operation::CreateKey => {
            let request = validation::create_key(&fields)?;
            shared.world().create_key(&caller, request, now_ms)
        }
        Operation::DescribeKey => {
            let reference = validation::describe_key(&fields)?;
            shared.world().describe_key(&reference)
        }
        Operation::ListKeys => {
            let request = validation::list_keys(&fields)?;
            Ok(shared.world().list_keys(&request))
        }
        Operation::EnableKey => {
            let key_id = validation::key_only(&fields)?;
            shared.world().enable_key(&key_id)
        }
        Operation::DisableKey => {
            let key_id = validation::key_only(&fields)?;
            shared.world().disable_key(&key_id)
        }
        Operation::ScheduleKeyDeletion => {
            let request = validation::schedule_key_deletion(&fields)?;
            shared.world().schedule_key_deletion(&request, now_ms)
        }
        Operation::CancelKeyDeletion => {
            let key_id = validation::key_only(&fields)?;
            shared.world().cancel_key_deletion(&key_id)
        }
        Operation::UpdateKeyAlias => {
            let request = validation::update_key_alias(&fields)?;
            shared.world().update_key_alias(&request)
        }
        Operation::CreateGrant => {
            let request = validation::create_grant(&fields)?;
            shared.world().create_grant(&caller, request, now_ms)
        }
        Operation::ListGrants => {
            let request = validation::list_grants(&fields)?;
            let page = shared.world().list_grants(&request)?;
            return Ok(listed_as_faults_say(faults, page));
        }
        Operation::RevokeGrant => {
            let request = validation::grant_on_key(&fields)?;
            shared.world().revoke_grant(&caller, &request)
        }
        Operation::RetireGrant => {
            let request = validation::grant_on_key(&fields)?;
            shared.world().retire_grant(&caller, &request)
        }
        Operation::ListRetirableGrants => {
            let page = validation::list_retirable_grants(&fields)?;
            let listed = shared.world().list_retirable_grants(&caller, page);
            return Ok(listed_as_faults_say(faults, listed));
        }
        Operation::UserQuotas => Ok(shared.world().user_quotas()),
    }?;
    if operation == Operation::CreateGrant {
        record.grant_id = answer
            .get("grant_id")
            .and_then(Value::as_str)
            .map(str::to_owned);
    }
    Ok(serde_json::to_vec(&answer).expect("an answer serialises"))
}

/// A page of grants as the fault settings have it answered: without every grant's `name` under
/// `omit_grant_names`, else as the state serialised it.
fn listed_as_faults_say(faults: &super::faults::FaultSettings, page: Vec<u8>) -> Vec<u8> {
    if !faults.omit_grant_names {
        return page;
    }
    let mut value: Value = serde_json::from_slice(&page).expect("a page the state wrote parses");
    if let Some(grants) = value.get_mut("grants").and_then(Value::as_array_mut) {
        for grant in grants.iter_mut().filter_map(Value::as_object_mut) {
            grant.remove("name");
        }
    }
    serde_json::to_vec(&value).expect("a page serialises")
}

// ---- IAM ----

fn base_url(shared: &Shared, headers: &HeaderMap) -> String {
    match headers.get("host").and_then(|host| host.to_str().ok()) {
        Some(host) => format!("http://{host}"),
        None => format!("http://{}", shared.local_addr),
    }
}

fn iso8601(ms: u64) -> String {
    // IAM writes microseconds: `2026-01-02T03:04:05.678000Z`.
    jiff::Timestamp::from_millisecond(ms as i64)
        .unwrap_or(jiff::Timestamp::MAX)
        .strftime("%Y-%m-%dT%H:%M:%S.%6fZ")
        .to_string()
}

fn record_iam(shared: &Shared, operation: &str, status: StatusCode, caller: Option<String>) {
    shared.stats.lock().expect("stats lock").record(CallRecord {
        seq: 0,
        operation: format!("iam:{operation}"),
        status: status.as_u16(),
        error_code: None,
        dropped: false,
        key_id: None,
        grant_id: None,
        grant_name: None,
        caller,
        peer: None,
        at_ms: unix_ms(SystemTime::now()),
    });
}

/// The service catalog: IAM itself and KMS (types `kms` and `kmsv1`) with the project ID in the URL.
fn catalog_entries(shared: &Shared, base: &str) -> Value {
    let account = &shared.config;
    let kms_url = format!("{base}/v1.0/{}", account.project_id);
    let kms_endpoint = |id: &str| json!([{"id": id, "interface": "public", "region": account.region, "region_id": account.region, "url": kms_url}]);
    json!([
        {"endpoints": [{"id": "e0000000000000000000000000000001", "interface": "public", "region": "*", "region_id": "*", "url": format!("{base}/v3")}],
         "id": "s0000000000000000000000000000001", "name": "iam", "type": "identity"},
        {"endpoints": kms_endpoint("e0000000000000000000000000000002"),
         "id": "s0000000000000000000000000000002", "name": "kms", "type": "kms"},
        {"endpoints": kms_endpoint("e0000000000000000000000000000003"),
         "id": "s0000000000000000000000000000003", "name": "kms", "type": "kmsv1"},
    ])
}

#[derive(serde::Deserialize)]
struct TokenQuery {
    nocatalog: Option<String>,
}

/// `POST /v3/auth/tokens`: the password method, scoped to a project (by ID or name) or the
/// domain; `token` (rescoping, e.g. a federated unscoped token) and `assume_role` (an agency
/// token) are in [`super::federation_api`]. 201, token in `X-Subject-Token`.
async fn create_token(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<TokenQuery>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let with_catalog = query.nocatalog.as_ref().is_none_or(|v| v.is_empty());
    if let Ok(request) = serde_json::from_slice::<Value>(&body) {
        let methods = &request["auth"]["identity"]["methods"];
        let has = |name: &str| {
            methods
                .as_array()
                .is_some_and(|methods| methods.iter().any(|m| m == name))
        };
        if !has("password") && (has("token") || has("assume_role")) {
            let outcome = if has("token") {
                super::federation_api::rescope(&shared, &headers, &request, with_catalog)
            } else {
                super::federation_api::assume_role_token(&shared, &headers, &request, with_catalog)
            };
            return super::federation_api::respond(&shared, "tokens", outcome);
        }
    }
    let outcome = issue_token(
        &shared,
        &headers,
        &body,
        query.nocatalog.is_some_and(|v| !v.is_empty()),
    );
    let (status, caller) = match &outcome {
        Ok((_, user_id, _)) => (StatusCode::CREATED, Some(user_id.clone())),
        Err(error) => (error.status, None),
    };
    record_iam(&shared, "tokens", status, caller);
    match outcome {
        Ok((token, _, body)) => {
            let mut response = (StatusCode::CREATED, axum::Json(body)).into_response();
            if let Ok(value) = HeaderValue::from_str(&token) {
                response.headers_mut().insert("x-subject-token", value);
            }
            response
        }
        Err(error) => error.into_response(),
    }
}

fn issue_token(
    shared: &Shared,
    headers: &HeaderMap,
    body: &[u8],
    no_catalog: bool,
) -> Result<(String, String, Value), IamError> {
    let request: Value = serde_json::from_slice(body)
        .map_err(|_| IamError::bad_request("The request body is not JSON."))?;
    let identity = &request["auth"]["identity"];
    if !identity["methods"]
        .as_array()
        .is_some_and(|methods| methods.iter().any(|m| m == "password"))
    {
        return Err(IamError::bad_request(
            "Only the password method is supported.",
        ));
    }
    let user = &identity["password"]["user"];
    let password = user["password"].as_str().ok_or(IamError::bad_request(
        "auth.identity.password.user.password is missing.",
    ))?;
    let account = &shared.config;
    let domain = &user["domain"];
    let user_domain = shared
        .world()
        .domain_by(domain["id"].as_str(), domain["name"].as_str());
    let scope = &request["auth"]["scope"];
    let scope = if scope["project"].is_object() {
        let project = &scope["project"];
        let matches = project["id"].as_str() == Some(account.project_id.as_str())
            || (project["id"].is_null()
                && project["name"].as_str() == Some(account.project_name.as_str()));
        if !matches {
            return Err(IamError::bad_request(
                "The project in the scope does not exist.",
            ));
        }
        TokenScope::Project(account.project_id.clone())
    } else {
        TokenScope::Domain
    };
    let now_ms = unix_ms(SystemTime::now());
    let mut world = shared.world();
    let found = match (user["id"].as_str(), user["name"].as_str(), &user_domain) {
        (Some(id), _, _) => world.user_by_id(id),
        (None, Some(name), Some(domain)) => world
            .users()
            .iter()
            .find(|user| user.name == name && user.domain_id == domain.id),
        _ => None,
    };
    let user = found
        .filter(|user| user.password == password)
        .cloned()
        .ok_or_else(IamError::unauthorized)?;
    // The emulator's one project is in its own domain.
    if matches!(scope, TokenScope::Project(_)) && user.domain_id != account.domain_id {
        return Err(IamError::bad_request(
            "The project in the scope does not exist.",
        ));
    }
    let user_domain = world
        .domain_by(Some(&user.domain_id), None)
        .expect("a user's domain exists");
    let (token, issued) = world.issue_token(
        &user.user_id,
        scope.clone(),
        now_ms,
        account.token_ttl.as_millis() as i64,
    );
    drop(world);
    let domain = json!({"id": user_domain.id, "name": user_domain.name});
    let mut body = json!({"token": {
        "methods": ["password"],
        "expires_at": iso8601(issued.expires_at_ms),
        "issued_at": iso8601(issued.issued_at_ms),
        "user": {"domain": domain, "id": user.user_id, "name": user.name, "password_expires_at": ""},
        "roles": [{"id": "0", "name": "op_service"}],
    }});
    match scope {
        TokenScope::Project(_) => {
            body["token"]["project"] =
                json!({"domain": domain, "id": account.project_id, "name": account.project_name});
        }
        TokenScope::Domain => body["token"]["domain"] = domain,
        TokenScope::Unscoped => {}
    }
    if !no_catalog {
        body["token"]["catalog"] = catalog_entries(shared, &base_url(shared, headers));
    }
    Ok((token, user.user_id, body))
}

fn authenticate_iam_read(
    shared: &Shared,
    request: &Request<axum::body::Body>,
    operation: &str,
) -> Result<(), IamError> {
    let signed = RequestParts {
        method: request.method().as_str(),
        path: request.uri().path(),
        query: request.uri().query().unwrap_or(""),
        headers: request.headers(),
        body: b"",
    };
    let outcome = auth::authenticate_iam(&shared.world(), &signed, SystemTime::now());
    let status = if outcome.is_ok() {
        StatusCode::OK
    } else {
        StatusCode::UNAUTHORIZED
    };
    record_iam(shared, operation, status, outcome.as_ref().ok().cloned());
    outcome.map(|_| ())
}

/// `GET /v3/auth/catalog`, for token and AK/SK callers.
async fn catalog(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    if let Err(error) = authenticate_iam_read(&shared, &request, "catalog") {
        return error.into_response();
    }
    let base = base_url(&shared, request.headers());
    axum::Json(json!({"catalog": catalog_entries(&shared, &base), "links": {"self": format!("{base}/v3/auth/catalog")}}))
        .into_response()
}

/// `GET /v3/auth/domains`.
async fn domains(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    if let Err(error) = authenticate_iam_read(&shared, &request, "domains") {
        return error.into_response();
    }
    let base = base_url(&shared, request.headers());
    let account = &shared.config;
    axum::Json(json!({
        "domains": [{
            "description": "",
            "enabled": true,
            "id": account.domain_id,
            "links": {"self": format!("{base}/v3/domains/{}", account.domain_id)},
            "name": account.domain_name,
        }],
        "links": {"self": format!("{base}/v3/auth/domains"), "previous": null, "next": null},
    }))
    .into_response()
}

#[derive(serde::Deserialize)]
struct ProjectQuery {
    name: Option<String>,
    domain_id: Option<String>,
}

/// `GET /v3/projects` (and `/v3/auth/projects`), optionally filtered by `name` and `domain_id`.
async fn projects(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<ProjectQuery>,
    request: Request,
) -> Response {
    if let Err(error) = authenticate_iam_read(&shared, &request, "projects") {
        return error.into_response();
    }
    let base = base_url(&shared, request.headers());
    let account = &shared.config;
    let matches = query
        .name
        .as_deref()
        .is_none_or(|name| name == account.project_name)
        && query
            .domain_id
            .as_deref()
            .is_none_or(|domain| domain == account.domain_id);
    let projects: Vec<Value> = matches
        .then(|| {
            json!({
                "is_domain": false,
                "description": "",
                "links": {"self": format!("{base}/v3/projects/{}", account.project_id)},
                "enabled": true,
                "id": account.project_id,
                "parent_id": account.domain_id,
                "domain_id": account.domain_id,
                "name": account.project_name,
            })
        })
        .into_iter()
        .collect();
    let self_link = match request.uri().query() {
        Some(query) => format!("{base}{}?{query}", request.uri().path()),
        None => format!("{base}{}", request.uri().path()),
    };
    axum::Json(
        json!({"links": {"self": self_link, "previous": null, "next": null}, "projects": projects}),
    )
    .into_response()
}
