//! The IAM federation and credential calls over HTTP, as a cloud admin and a workload make them:
//! identity providers, mappings and protocols (`/v3/OS-FEDERATION/`, Keystone error bodies),
//! the OpenID Connect configuration, the ID-token exchange and temporary AK/SK (`/v3.0/`, flat
//! `{"error_msg", "error_code"}` bodies), and the `token` / `assume_role` methods of
//! `POST /v3/auth/tokens`. Every call is in the call log as `iam:<operation>`.
use std::sync::Arc;
use std::time::SystemTime;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{post, put};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::auth::{self, IamPrincipal, unix_ms};
use super::errors::IamApiError;
use super::federation::{self, IdentityProvider, Mapping, OpenIdConnectConfig};
use super::server::Shared;
use super::state::{
    AssumedAgency, FederatedUser, IssuedToken, TemporaryCredential, TokenIdentity, TokenScope,
    World, random_hex,
};
use super::stats::CallRecord;
use kmsgrant_kms_signer::RequestParts;

/// `duration_seconds` of `securitytokens`: 15 minutes to 24 hours, 15 minutes when absent.
pub const DURATION_SECONDS: std::ops::RangeInclusive<i64> = 900..=86_400;
pub const DEFAULT_DURATION_SECONDS: i64 = 900;

pub fn router() -> Router<Arc<Shared>> {
    Router::new()
        .route(
            "/v3/OS-FEDERATION/identity_providers/{id}",
            put(put_idp)
                .get(get_idp)
                .patch(patch_idp)
                .delete(delete_idp),
        )
        .route(
            "/v3/OS-FEDERATION/mappings/{id}",
            put(put_mapping)
                .get(get_mapping)
                .patch(patch_mapping)
                .delete(delete_mapping),
        )
        .route(
            "/v3/OS-FEDERATION/identity_providers/{idp_id}/protocols/{protocol_id}",
            put(put_protocol)
                .get(get_protocol)
                .patch(put_protocol)
                .delete(delete_protocol),
        )
        .route(
            "/v3/OS-FEDERATION/identity_providers/{idp_id}/protocols/{protocol_id}/auth",
            post(protocol_auth).get(protocol_auth),
        )
        .route(
            "/v3.0/OS-FEDERATION/identity-providers/{idp_id}/openid-connect-config",
            post(oidc_config).put(oidc_config).get(oidc_config),
        )
        .route("/v3.0/OS-AUTH/id-token/tokens", post(id_token_tokens))
        .route("/v3.0/OS-CREDENTIAL/securitytokens", post(security_tokens))
}

/// A successful answer.
pub struct Reply {
    pub status: StatusCode,
    pub body: Value,
    pub caller: Option<String>,
    /// Sent as `X-Subject-Token`.
    pub subject_token: Option<String>,
}

/// Records the call and turns the outcome into a response with an `X-Request-Id`.
pub fn respond(shared: &Shared, operation: &str, outcome: Result<Reply, IamApiError>) -> Response {
    let (status, error_code, caller) = match &outcome {
        Ok(reply) => (reply.status, None, reply.caller.clone()),
        Err(error) => (error.status, Some(error.code), None),
    };
    shared.stats.lock().expect("stats lock").record(CallRecord {
        seq: 0,
        operation: format!("iam:{operation}"),
        status: status.as_u16(),
        error_code,
        dropped: false,
        key_id: None,
        grant_id: None,
        grant_name: None,
        caller,
        peer: None,
        at_ms: unix_ms(SystemTime::now()),
    });
    let mut response = match outcome {
        Ok(reply) => {
            let mut response = if reply.body.is_null() {
                reply.status.into_response()
            } else {
                (reply.status, axum::Json(reply.body)).into_response()
            };
            if let Some(token) = reply.subject_token
                && let Ok(value) = HeaderValue::from_str(&token)
            {
                response.headers_mut().insert("x-subject-token", value);
            }
            response
        }
        Err(error) => error.into_response(),
    };
    if let Ok(value) = HeaderValue::from_str(&random_hex(16)) {
        response.headers_mut().insert("x-request-id", value);
    }
    response
}

fn base_url(shared: &Shared, headers: &HeaderMap) -> String {
    match headers.get("host").and_then(|host| host.to_str().ok()) {
        Some(host) => format!("http://{host}"),
        None => format!("http://{}", shared.local_addr),
    }
}

pub fn iso8601(ms: u64) -> String {
    jiff::Timestamp::from_millisecond(ms as i64)
        .unwrap_or(jiff::Timestamp::MAX)
        .strftime("%Y-%m-%dT%H:%M:%S.%6fZ")
        .to_string()
}

/// The user ID a federated user gets: stable for its identity provider and the user name its
/// mapping gives, so tests can make it the creator of keys (only a key's creator may revoke
/// grants on it) before it ever signed in.
pub fn federated_user_id(idp_id: &str, user_name: &str) -> String {
    derived_id(&["federated", idp_id, user_name])
}

/// A stable 32-hex-character ID derived from `parts` (federated users and groups have no
/// registry here, but the same name must give the same ID every time).
fn derived_id(parts: &[&str]) -> String {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update(part.as_bytes());
        hasher.update([0]);
    }
    hex::encode(&hasher.finalize()[..16])
}

fn parse_json(body: &[u8]) -> Result<Value, IamApiError> {
    serde_json::from_slice::<Value>(body)
        .ok()
        .filter(Value::is_object)
        .ok_or_else(|| IamApiError::invalid_body("the body is not a JSON object"))
}

/// The caller of a management call: a token (or signature) of an IAM user of the emulator's
/// account. Users there hold Security Administrator; federated users and agencies do not.
fn security_administrator(
    shared: &Shared,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
    action: &str,
) -> Result<String, IamApiError> {
    let world = shared.world();
    let principal = principal(&world, method, uri, headers, body)
        .ok_or_else(|| IamApiError::unauthenticated("no valid X-Auth-Token or signature"))?;
    // An IAM user (not a federated user, not an agency) administers its own account.
    let is_admin = world
        .user_by_id(&principal.user_id)
        .is_some_and(|user| user.domain_id == principal.domain_id)
        && principal
            .token
            .as_ref()
            .is_none_or(|token| token.identity == TokenIdentity::User);
    if !is_admin {
        return Err(IamApiError::forbidden(
            action,
            "only IAM users hold Security Administrator (of their own account)",
        ));
    }
    Ok(principal.user_id)
}

fn principal(
    world: &World,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> Option<IamPrincipal> {
    let request = RequestParts {
        method: method.as_str(),
        path: uri.path(),
        query: uri.query().unwrap_or(""),
        headers,
        body,
    };
    auth::authenticate_principal(world, &request, SystemTime::now())
}

// ---- identity providers ----

fn idp_json(base: &str, idp: &IdentityProvider) -> Value {
    let link = format!("{base}/v3/OS-FEDERATION/identity_providers/{}", idp.id);
    json!({"identity_provider": {
        "description": idp.description,
        "enabled": idp.enabled,
        "id": idp.id,
        "sso_type": idp.sso_type,
        "remote_ids": [],
        "links": {"protocols": format!("{link}/protocols"), "self": link},
    }})
}

fn idp_fields(
    body: &Value,
    existing: Option<&IdentityProvider>,
) -> Result<IdentityProvider, IamApiError> {
    let fields = body
        .get("identity_provider")
        .filter(|v| v.is_object())
        .ok_or_else(|| IamApiError::invalid_body("identity_provider is missing").keystone())?;
    let mut idp = existing.cloned().unwrap_or(IdentityProvider {
        id: String::new(),
        description: String::new(),
        enabled: false,
        sso_type: "virtual_user_sso".into(),
        domain_id: String::new(),
    });
    if let Some(description) = fields.get("description") {
        idp.description = description
            .as_str()
            .ok_or_else(|| IamApiError::invalid_body("description must be a string").keystone())?
            .to_owned();
    }
    if let Some(enabled) = fields.get("enabled") {
        idp.enabled = enabled
            .as_bool()
            .ok_or_else(|| IamApiError::invalid_body("enabled must be a boolean").keystone())?;
    }
    if let Some(sso_type) = fields.get("sso_type") {
        match sso_type.as_str() {
            Some(kind @ ("virtual_user_sso" | "iam_user_sso")) => idp.sso_type = kind.to_owned(),
            _ => {
                return Err(IamApiError::invalid_body(
                    "sso_type must be virtual_user_sso or iam_user_sso",
                )
                .keystone());
            }
        }
    }
    Ok(idp)
}

async fn put_idp(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let outcome = (|| {
        let caller = security_administrator(
            &shared,
            &method,
            &uri,
            &headers,
            &body,
            "iam:identityProviders:create",
        )
        .map_err(IamApiError::keystone)?;
        if id.is_empty() || id.chars().count() > 64 {
            return Err(IamApiError::invalid_parameter("id", "1 to 64 characters").keystone());
        }
        let mut idp = idp_fields(&parse_json(&body).map_err(IamApiError::keystone)?, None)?;
        idp.id = id.clone();
        let mut world = shared.world();
        idp.domain_id = world
            .user_by_id(&caller)
            .map(|user| user.domain_id.clone())
            .unwrap_or_else(|| world.account.domain_id.clone());
        if world.federation.identity_providers.contains_key(&id) {
            return Err(
                IamApiError::conflict("identity_provider", format!("Duplicate ID, {id}"))
                    .keystone(),
            );
        }
        world
            .federation
            .identity_providers
            .insert(id.clone(), idp.clone());
        Ok(Reply {
            status: StatusCode::CREATED,
            body: idp_json(&base_url(&shared, &headers), &idp),
            caller: Some(caller),
            subject_token: None,
        })
    })();
    respond(&shared, "identity-provider", outcome)
}

async fn get_idp(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let outcome = (|| {
        let caller = security_administrator(
            &shared,
            &method,
            &uri,
            &headers,
            b"",
            "iam:identityProviders:get",
        )
        .map_err(IamApiError::keystone)?;
        let world = shared.world();
        let idp = world
            .federation
            .identity_providers
            .get(&id)
            .ok_or_else(|| IamApiError::not_found("identity_provider", &id).keystone())?;
        Ok(Reply {
            status: StatusCode::OK,
            body: idp_json(&base_url(&shared, &headers), idp),
            caller: Some(caller),
            subject_token: None,
        })
    })();
    respond(&shared, "identity-provider", outcome)
}

async fn patch_idp(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let outcome = (|| {
        let caller = security_administrator(
            &shared,
            &method,
            &uri,
            &headers,
            &body,
            "iam:identityProviders:update",
        )
        .map_err(IamApiError::keystone)?;
        let request = parse_json(&body).map_err(IamApiError::keystone)?;
        let mut world = shared.world();
        let existing = world
            .federation
            .identity_providers
            .get(&id)
            .ok_or_else(|| IamApiError::not_found("identity_provider", &id).keystone())?;
        let idp = idp_fields(&request, Some(existing))?;
        world
            .federation
            .identity_providers
            .insert(id.clone(), idp.clone());
        Ok(Reply {
            status: StatusCode::OK,
            body: idp_json(&base_url(&shared, &headers), &idp),
            caller: Some(caller),
            subject_token: None,
        })
    })();
    respond(&shared, "identity-provider", outcome)
}

async fn delete_idp(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let outcome = (|| {
        let caller = security_administrator(
            &shared,
            &method,
            &uri,
            &headers,
            b"",
            "iam:identityProviders:delete",
        )
        .map_err(IamApiError::keystone)?;
        let mut world = shared.world();
        if world.federation.identity_providers.remove(&id).is_none() {
            return Err(IamApiError::not_found("identity_provider", &id).keystone());
        }
        world.federation.protocols.retain(|(idp, _), _| idp != &id);
        world.federation.oidc_configs.remove(&id);
        Ok(Reply {
            status: StatusCode::NO_CONTENT,
            body: Value::Null,
            caller: Some(caller),
            subject_token: None,
        })
    })();
    respond(&shared, "identity-provider", outcome)
}

// ---- mappings ----

fn mapping_json(base: &str, mapping: &Mapping) -> Value {
    json!({"mapping": {
        "id": mapping.id,
        "rules": mapping.rules_json,
        "links": {"self": format!("{base}/v3/OS-FEDERATION/mappings/{}", mapping.id)},
    }})
}

fn mapping_from(id: &str, body: &[u8]) -> Result<Mapping, IamApiError> {
    let request = parse_json(body).map_err(IamApiError::keystone)?;
    let rules_json = request["mapping"]["rules"].clone();
    let rules = federation::parse_rules(&rules_json)
        .map_err(|detail| IamApiError::invalid_body(detail).keystone())?;
    Ok(Mapping {
        id: id.to_owned(),
        rules_json,
        rules,
    })
}

async fn put_mapping(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let creating = method == Method::PUT;
    let outcome = (|| {
        let action = if creating {
            "iam:mappings:create"
        } else {
            "iam:mappings:update"
        };
        let caller = security_administrator(&shared, &method, &uri, &headers, &body, action)
            .map_err(IamApiError::keystone)?;
        let mapping = mapping_from(&id, &body)?;
        let mut world = shared.world();
        let exists = world.federation.mappings.contains_key(&id);
        if creating && exists {
            return Err(IamApiError::conflict("mapping", format!("Duplicate ID, {id}")).keystone());
        }
        if !creating && !exists {
            return Err(IamApiError::not_found("mapping", &id).keystone());
        }
        world
            .federation
            .mappings
            .insert(id.clone(), mapping.clone());
        Ok(Reply {
            status: if creating {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            },
            body: mapping_json(&base_url(&shared, &headers), &mapping),
            caller: Some(caller),
            subject_token: None,
        })
    })();
    respond(&shared, "mapping", outcome)
}

async fn patch_mapping(
    state: State<Arc<Shared>>,
    id: Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    put_mapping(state, id, method, uri, headers, body).await
}

async fn get_mapping(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let outcome = (|| {
        let caller =
            security_administrator(&shared, &method, &uri, &headers, b"", "iam:mappings:get")
                .map_err(IamApiError::keystone)?;
        let world = shared.world();
        let mapping = world
            .federation
            .mappings
            .get(&id)
            .ok_or_else(|| IamApiError::not_found("mapping", &id).keystone())?;
        Ok(Reply {
            status: StatusCode::OK,
            body: mapping_json(&base_url(&shared, &headers), mapping),
            caller: Some(caller),
            subject_token: None,
        })
    })();
    respond(&shared, "mapping", outcome)
}

async fn delete_mapping(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let outcome = (|| {
        let caller =
            security_administrator(&shared, &method, &uri, &headers, b"", "iam:mappings:delete")
                .map_err(IamApiError::keystone)?;
        let mut world = shared.world();
        if world.federation.mappings.remove(&id).is_none() {
            return Err(IamApiError::not_found("mapping", &id).keystone());
        }
        Ok(Reply {
            status: StatusCode::NO_CONTENT,
            body: Value::Null,
            caller: Some(caller),
            subject_token: None,
        })
    })();
    respond(&shared, "mapping", outcome)
}

// ---- protocols ----

fn protocol_json(base: &str, idp_id: &str, protocol_id: &str, mapping_id: &str) -> Value {
    let idp = format!("{base}/v3/OS-FEDERATION/identity_providers/{idp_id}");
    json!({"protocol": {
        "id": protocol_id,
        "mapping_id": mapping_id,
        "links": {"identity_provider": idp, "self": format!("{idp}/protocols/{protocol_id}")},
    }})
}

/// `PUT` registers (201; 409 when registered), `PATCH` changes the mapping (200).
async fn put_protocol(
    State(shared): State<Arc<Shared>>,
    Path((idp_id, protocol_id)): Path<(String, String)>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let creating = method == Method::PUT;
    let outcome = (|| {
        let action = if creating {
            "iam:identityProviders:createProtocol"
        } else {
            "iam:identityProviders:updateProtocol"
        };
        let caller = security_administrator(&shared, &method, &uri, &headers, &body, action)
            .map_err(IamApiError::keystone)?;
        if !matches!(protocol_id.as_str(), "oidc" | "saml") {
            return Err(IamApiError::invalid_parameter("protocol_id", "oidc or saml").keystone());
        }
        let request = parse_json(&body).map_err(IamApiError::keystone)?;
        let mapping_id = request["protocol"]["mapping_id"]
            .as_str()
            .ok_or_else(|| IamApiError::invalid_body("protocol.mapping_id is missing").keystone())?
            .to_owned();
        let mut world = shared.world();
        if !world.federation.identity_providers.contains_key(&idp_id) {
            return Err(IamApiError::not_found("identity_provider", &idp_id).keystone());
        }
        if !world.federation.mappings.contains_key(&mapping_id) {
            return Err(IamApiError::not_found("mapping", &mapping_id).keystone());
        }
        let key = (idp_id.clone(), protocol_id.clone());
        let exists = world.federation.protocols.contains_key(&key);
        if creating && exists {
            return Err(
                IamApiError::conflict("protocol", format!("Duplicate ID, {protocol_id}"))
                    .keystone(),
            );
        }
        if !creating && !exists {
            return Err(IamApiError::not_found("protocol", &protocol_id).keystone());
        }
        world.federation.protocols.insert(key, mapping_id.clone());
        Ok(Reply {
            status: if creating {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            },
            body: protocol_json(
                &base_url(&shared, &headers),
                &idp_id,
                &protocol_id,
                &mapping_id,
            ),
            caller: Some(caller),
            subject_token: None,
        })
    })();
    respond(&shared, "protocol", outcome)
}

async fn get_protocol(
    State(shared): State<Arc<Shared>>,
    Path((idp_id, protocol_id)): Path<(String, String)>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let outcome = (|| {
        let caller = security_administrator(
            &shared,
            &method,
            &uri,
            &headers,
            b"",
            "iam:identityProviders:getProtocol",
        )
        .map_err(IamApiError::keystone)?;
        let world = shared.world();
        let mapping_id = world
            .federation
            .protocols
            .get(&(idp_id.clone(), protocol_id.clone()))
            .ok_or_else(|| IamApiError::not_found("protocol", &protocol_id).keystone())?;
        Ok(Reply {
            status: StatusCode::OK,
            body: protocol_json(
                &base_url(&shared, &headers),
                &idp_id,
                &protocol_id,
                mapping_id,
            ),
            caller: Some(caller),
            subject_token: None,
        })
    })();
    respond(&shared, "protocol", outcome)
}

async fn delete_protocol(
    State(shared): State<Arc<Shared>>,
    Path((idp_id, protocol_id)): Path<(String, String)>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let outcome = (|| {
        let caller = security_administrator(
            &shared,
            &method,
            &uri,
            &headers,
            b"",
            "iam:identityProviders:deleteProtocol",
        )
        .map_err(IamApiError::keystone)?;
        let mut world = shared.world();
        if world
            .federation
            .protocols
            .remove(&(idp_id.clone(), protocol_id.clone()))
            .is_none()
        {
            return Err(IamApiError::not_found("protocol", &protocol_id).keystone());
        }
        Ok(Reply {
            status: StatusCode::NO_CONTENT,
            body: Value::Null,
            caller: Some(caller),
            subject_token: None,
        })
    })();
    respond(&shared, "protocol", outcome)
}

// ---- OpenID Connect configuration ----

/// `POST` creates (201; 409 when one exists), `PUT` updates the fields sent (200), `GET` reads.
async fn oidc_config(
    State(shared): State<Arc<Shared>>,
    Path(idp_id): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let outcome = (|| {
        let action = match method {
            Method::POST => "iam:identityProviders:createOIDCConfig",
            Method::PUT => "iam:identityProviders:updateOIDCConfig",
            _ => "iam:identityProviders:getOIDCConfig",
        };
        let caller = security_administrator(&shared, &method, &uri, &headers, &body, action)?;
        let mut world = shared.world();
        if !world.federation.identity_providers.contains_key(&idp_id) {
            return Err(IamApiError::not_found("identity_provider", &idp_id));
        }
        let existing = world.federation.oidc_configs.get(&idp_id).cloned();
        let config = if method == Method::GET {
            existing.ok_or_else(|| IamApiError::not_found("openid_connect_config", &idp_id))?
        } else {
            let request = parse_json(&body)?;
            let update: OpenIdConnectConfig =
                serde_json::from_value(request["openid_connect_config"].clone()).map_err(|e| {
                    IamApiError::invalid_body(format!("openid_connect_config: {e}"))
                })?;
            let mut config = match (&method, existing) {
                (&Method::POST, Some(_)) => {
                    return Err(IamApiError::conflict(
                        "openid_connect_config",
                        format!("the identity provider {idp_id} has one"),
                    ));
                }
                (&Method::POST, None) => OpenIdConnectConfig::default(),
                (_, Some(existing)) => existing,
                (_, None) => {
                    return Err(IamApiError::not_found("openid_connect_config", &idp_id));
                }
            };
            config.merge(update);
            config.validate().map_err(IamApiError::invalid_body)?;
            world
                .federation
                .oidc_configs
                .insert(idp_id.clone(), config.clone());
            config
        };
        Ok(Reply {
            status: if method == Method::POST {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            },
            body: json!({"openid_connect_config": config}),
            caller: Some(caller),
            subject_token: None,
        })
    })();
    respond(&shared, "openid-connect-config", outcome)
}

// ---- tokens ----

/// The scope a token asks for, within `domain_id` (the domain of the token's user). The
/// emulator's one project belongs to its own domain. An absent scope is `Unscoped`.
pub fn resolve_scope(
    world: &World,
    scope: &Value,
    domain_id: &str,
) -> Result<TokenScope, IamApiError> {
    if scope.is_null() {
        return Ok(TokenScope::Unscoped);
    }
    let account = &world.account;
    if let Some(project) = scope.get("project").filter(|p| p.is_object()) {
        let (id, name) = (project["id"].as_str(), project["name"].as_str());
        if id.is_none() && name.is_none() {
            return Err(IamApiError::invalid_body(
                "scope.project needs an id or a name",
            ));
        }
        let matches = match id {
            Some(id) => id == account.project_id,
            None => name == Some(account.project_name.as_str()),
        };
        if !matches || domain_id != account.domain_id {
            return Err(IamApiError::unauthenticated(
                "the scope's project is not in the user's domain",
            ));
        }
        return Ok(TokenScope::Project(account.project_id.clone()));
    }
    if let Some(domain) = scope.get("domain").filter(|d| d.is_object()) {
        let (id, name) = (domain["id"].as_str(), domain["name"].as_str());
        if id.is_none() && name.is_none() {
            return Err(IamApiError::invalid_body(
                "scope.domain needs an id or a name",
            ));
        }
        let found = world.domain_by(id, name);
        if found.is_none_or(|d| d.id != domain_id) {
            return Err(IamApiError::unauthenticated(
                "the scope's domain is not the user's domain",
            ));
        }
        return Ok(TokenScope::Domain);
    }
    Err(IamApiError::invalid_body(
        "scope must hold a project or a domain",
    ))
}

/// The catalog of the token answers: IAM, and KMS (types `kms` and `kmsv1`).
pub fn catalog(world: &World, base: &str) -> Value {
    let account = &world.account;
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

/// The `token` object of an answer.
pub fn token_body(
    world: &World,
    base: &str,
    token: &IssuedToken,
    methods: &[&str],
    with_catalog: bool,
) -> Value {
    let domain = world
        .domain_by(Some(&token.domain_id), None)
        .map(|d| json!({"id": d.id, "name": d.name}))
        .unwrap_or_else(|| json!({"id": token.domain_id, "name": ""}));
    let mut user = json!({"domain": domain, "id": token.user_id});
    match &token.identity {
        TokenIdentity::User => {
            user["name"] = json!(
                world
                    .user_by_id(&token.user_id)
                    .map(|u| u.name.clone())
                    .unwrap_or_default()
            );
            user["password_expires_at"] = json!("");
        }
        TokenIdentity::Federated(federated) => {
            user["name"] = json!(federated.name);
            user["OS-FEDERATION"] = json!({
                "identity_provider": {"id": federated.idp_id},
                "protocol": {"id": federated.protocol_id},
                "groups": federated.groups.iter().map(|g| json!({"id": derived_id(&["group", &token.domain_id, g]), "name": g})).collect::<Vec<_>>(),
            });
        }
        TokenIdentity::Agency(agency) => {
            user["name"] = json!(format!(
                "{}/{}",
                domain["name"].as_str().unwrap_or_default(),
                agency.agency_name
            ));
        }
    }
    let mut body = json!({
        "methods": methods,
        "expires_at": iso8601(token.expires_at_ms),
        "issued_at": iso8601(token.issued_at_ms),
        "user": user,
        "roles": [{"id": "0", "name": "op_service"}],
    });
    if let TokenIdentity::Agency(agency) = &token.identity {
        let by_domain = world
            .domain_by(Some(&agency.by_domain_id), None)
            .map(|d| json!({"id": d.id, "name": d.name}))
            .unwrap_or(Value::Null);
        body["assumed_by"] = json!({"user": {"domain": by_domain, "id": agency.by_user_id, "name": agency.by_user_name}});
    }
    match &token.scope {
        TokenScope::Project(project_id) => {
            body["project"] =
                json!({"domain": domain, "id": project_id, "name": world.account.project_name});
            if with_catalog {
                body["catalog"] = catalog(world, base);
            }
        }
        TokenScope::Domain => {
            body["domain"] = domain;
            if with_catalog {
                body["catalog"] = catalog(world, base);
            }
        }
        TokenScope::Unscoped => {}
    }
    json!({"token": body})
}

/// The ID-token exchange shared by both calls: IdP, its configuration, protocol and mapping,
/// then the token, then the mapping, then the scope.
fn exchange(
    shared: &Shared,
    headers: &HeaderMap,
    idp_id: &str,
    protocol_id: &str,
    id_token: &str,
    scope: &Value,
) -> Result<Reply, IamApiError> {
    let (config, mapping, idp_domain) = {
        let world = shared.world();
        let idp = world
            .federation
            .identity_providers
            .get(idp_id)
            .ok_or_else(|| IamApiError::not_found("identity_provider", idp_id))?;
        if !idp.enabled {
            return Err(IamApiError::forbidden(
                "iam:identityProviders:authenticate",
                format!("the identity provider {idp_id} is disabled"),
            ));
        }
        let config = world
            .federation
            .oidc_configs
            .get(idp_id)
            .cloned()
            .ok_or_else(|| IamApiError::not_found("openid_connect_config", idp_id))?;
        let mapping_id = world
            .federation
            .protocols
            .get(&(idp_id.to_owned(), protocol_id.to_owned()))
            .ok_or_else(|| IamApiError::not_found("protocol", protocol_id))?;
        let mapping = world
            .federation
            .mappings
            .get(mapping_id)
            .cloned()
            .ok_or_else(|| IamApiError::not_found("mapping", mapping_id))?;
        (config, mapping, idp.domain_id.clone())
    };
    let now_ms = unix_ms(SystemTime::now());
    let claims = federation::verify_id_token(id_token, &config, (now_ms / 1000) as i64)
        .map_err(|rejection| IamApiError::unauthenticated(rejection.to_string()))?;
    let mapped = federation::apply_mapping(&mapping.rules, &claims).ok_or_else(|| {
        IamApiError::unauthenticated(format!(
            "no rule of mapping {} matches the ID token",
            mapping.id
        ))
    })?;
    let mut world = shared.world();
    // The federated user belongs to the account that registered the identity provider.
    let domain_id = if idp_domain.is_empty() {
        world.account.domain_id.clone()
    } else {
        idp_domain
    };
    let scope = resolve_scope(&world, scope, &domain_id)?;
    let user_id = federated_user_id(idp_id, &mapped.user_name);
    let (token, issued) = world.store_token(IssuedToken {
        user_id: user_id.clone(),
        scope,
        issued_at_ms: now_ms,
        expires_at_ms: now_ms + shared.config.federation_token_ttl.as_millis() as u64,
        domain_id,
        identity: TokenIdentity::Federated(FederatedUser {
            idp_id: idp_id.to_owned(),
            protocol_id: protocol_id.to_owned(),
            name: mapped.user_name,
            groups: mapped.groups,
        }),
    });
    let body = token_body(
        &world,
        &base_url(shared, headers),
        &issued,
        &["mapped"],
        true,
    );
    Ok(Reply {
        status: StatusCode::CREATED,
        body,
        caller: Some(user_id),
        subject_token: Some(token),
    })
}

/// `POST /v3.0/OS-AUTH/id-token/tokens` with `X-Idp-Id`.
/// The fault settings' latency, and an injected failure (500 IAM.0006) when `errors` names
/// `iam:<operation>` (the KMS wildcard `*` does not reach IAM): exchanges that are slow or fail.
async fn injected_iam_fault(shared: &Shared, operation: &str) -> Option<IamApiError> {
    let faults = shared.faults();
    let delay = faults.delay();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let key = format!("iam:{operation}");
    let injection = faults.errors.get(&key)?;
    (fastrand::f64() < injection.rate)
        .then(|| IamApiError::internal(format!("injected fault on {key}")))
}

async fn id_token_tokens(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(fault) = injected_iam_fault(&shared, "id-token").await {
        return respond(&shared, "id-token", Err(fault));
    }
    let outcome = (|| {
        let request = parse_json(&body)?;
        let id_token = request["auth"]["id_token"]["id"]
            .as_str()
            .filter(|t| !t.is_empty())
            .ok_or_else(|| IamApiError::invalid_body("auth.id_token.id is missing"))?;
        let scope = &request["auth"]["scope"];
        if !scope.is_null() && !scope.is_object() {
            return Err(IamApiError::invalid_body("auth.scope must be an object"));
        }
        let idp_id = headers
            .get("x-idp-id")
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .ok_or_else(|| IamApiError::invalid_parameter("'idp id'", "X-Idp-Id is missing"))?;
        exchange(&shared, &headers, idp_id, "oidc", id_token, scope)
    })();
    respond(&shared, "id-token", outcome)
}

/// `POST /v3/OS-FEDERATION/identity_providers/{idp_id}/protocols/{protocol_id}/auth` with
/// `Authorization: Bearer <ID token>`: an unscoped token.
async fn protocol_auth(
    State(shared): State<Arc<Shared>>,
    Path((idp_id, protocol_id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let outcome = (|| {
        let id_token = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                IamApiError::unauthenticated("Authorization: Bearer <ID token> is missing")
                    .keystone()
            })?;
        exchange(
            &shared,
            &headers,
            &idp_id,
            &protocol_id,
            id_token,
            &Value::Null,
        )
        .map_err(IamApiError::keystone)
    })();
    respond(&shared, "federation-auth", outcome)
}

/// `POST /v3/auth/tokens`, method `token`: the same user and expiry, in the scope asked for.
pub fn rescope(
    shared: &Shared,
    headers: &HeaderMap,
    request: &Value,
    with_catalog: bool,
) -> Result<Reply, IamApiError> {
    let presented = request["auth"]["identity"]["token"]["id"]
        .as_str()
        .ok_or_else(|| IamApiError::invalid_body("auth.identity.token.id is missing").keystone())?;
    let now_ms = unix_ms(SystemTime::now());
    let mut world = shared.world();
    let original = world
        .token(presented)
        .filter(|t| t.expires_at_ms > now_ms)
        .cloned()
        .ok_or_else(|| {
            IamApiError::unauthenticated("the token is unknown or expired").keystone()
        })?;
    let scope = request["auth"]["scope"].clone();
    if scope.is_null() {
        return Err(IamApiError::invalid_body("auth.scope is required").keystone());
    }
    let scope =
        resolve_scope(&world, &scope, &original.domain_id).map_err(IamApiError::keystone)?;
    let (token, issued) = world.store_token(IssuedToken {
        scope,
        issued_at_ms: now_ms,
        ..original
    });
    let body = token_body(
        &world,
        &base_url(shared, headers),
        &issued,
        &["token"],
        with_catalog,
    );
    Ok(Reply {
        status: StatusCode::CREATED,
        body,
        caller: Some(issued.user_id.clone()),
        subject_token: Some(token),
    })
}

/// The agency `assume_role` names (`agency_name`, or `xrole_name` as the examples write it, in
/// the domain of `domain_id` or `domain_name`), if the caller's domain is the one it trusts.
/// Users of the trusted domain hold Agent Operator here.
fn assumable(
    world: &World,
    caller: &IamPrincipal,
    assume: &Value,
) -> Result<(String, String, AssumedAgency), IamApiError> {
    let name = assume["agency_name"]
        .as_str()
        .or_else(|| assume["xrole_name"].as_str())
        .ok_or_else(|| IamApiError::invalid_body("assume_role.agency_name is missing"))?;
    let (domain_id, domain_name) = (assume["domain_id"].as_str(), assume["domain_name"].as_str());
    if domain_id.is_none() && domain_name.is_none() {
        return Err(IamApiError::invalid_body(
            "assume_role needs domain_id or domain_name",
        ));
    }
    let domain = world.domain_by(domain_id, domain_name).ok_or_else(|| {
        IamApiError::not_found("domain", domain_id.or(domain_name).unwrap_or_default())
    })?;
    let agency = world
        .agency(&domain.id, name)
        .ok_or_else(|| IamApiError::not_found("agency", name))?;
    if agency.trust_domain_id != caller.domain_id {
        return Err(IamApiError::forbidden(
            "iam:agencies:assume",
            format!("agency {name} does not trust the caller's domain"),
        ));
    }
    let by_user_name = match caller.token.as_ref().map(|t| &t.identity) {
        Some(TokenIdentity::Federated(federated)) => federated.name.clone(),
        _ => world
            .user_by_id(&caller.user_id)
            .map(|u| u.name.clone())
            .unwrap_or_default(),
    };
    Ok((
        agency.id.clone(),
        domain.id,
        AssumedAgency {
            agency_name: agency.name.clone(),
            by_user_id: caller.user_id.clone(),
            by_user_name,
            by_domain_id: caller.domain_id.clone(),
        },
    ))
}

fn token_caller(world: &World, headers: &HeaderMap) -> Result<IamPrincipal, IamApiError> {
    let now_ms = unix_ms(SystemTime::now());
    let token = headers
        .get("x-auth-token")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .ok_or_else(|| IamApiError::unauthenticated("X-Auth-Token is missing"))?;
    let issued = world
        .token(token)
        .filter(|t| t.expires_at_ms > now_ms)
        .ok_or_else(|| IamApiError::unauthenticated("the X-Auth-Token is unknown or expired"))?;
    Ok(IamPrincipal {
        user_id: issued.user_id.clone(),
        domain_id: issued.domain_id.clone(),
        token: Some(issued.clone()),
    })
}

/// `POST /v3/auth/tokens`, method `assume_role`: an agency token, with `X-Auth-Token` of a user
/// of the trusted domain.
pub fn assume_role_token(
    shared: &Shared,
    headers: &HeaderMap,
    request: &Value,
    with_catalog: bool,
) -> Result<Reply, IamApiError> {
    let now_ms = unix_ms(SystemTime::now());
    let mut world = shared.world();
    let caller = token_caller(&world, headers).map_err(IamApiError::keystone)?;
    let (agency_id, domain_id, assumed) =
        assumable(&world, &caller, &request["auth"]["identity"]["assume_role"])
            .map_err(IamApiError::keystone)?;
    let scope = request["auth"]["scope"].clone();
    if scope.is_null() {
        return Err(IamApiError::invalid_body("auth.scope is required").keystone());
    }
    let scope = resolve_scope(&world, &scope, &domain_id).map_err(IamApiError::keystone)?;
    let (token, issued) = world.store_token(IssuedToken {
        user_id: agency_id,
        scope,
        issued_at_ms: now_ms,
        expires_at_ms: now_ms + shared.config.agency_token_ttl.as_millis() as u64,
        domain_id,
        identity: TokenIdentity::Agency(assumed),
    });
    let body = token_body(
        &world,
        &base_url(shared, headers),
        &issued,
        &["assume_role"],
        with_catalog,
    );
    Ok(Reply {
        status: StatusCode::CREATED,
        body,
        caller: Some(caller.user_id),
        subject_token: Some(token),
    })
}

/// `duration_seconds` when present: an integer in [`DURATION_SECONDS`].
fn duration_seconds(value: &Value) -> Result<i64, IamApiError> {
    match value {
        Value::Null => Ok(DEFAULT_DURATION_SECONDS),
        value => value
            .as_i64()
            .filter(|d| DURATION_SECONDS.contains(d))
            .ok_or_else(|| {
                IamApiError::invalid_body("duration_seconds must be an integer from 900 to 86400")
            }),
    }
}

/// `POST /v3.0/OS-CREDENTIAL/securitytokens`: methods `token` (the token in `X-Auth-Token`, or
/// else in `auth.identity.token.id`) and `assume_role` (`X-Auth-Token` of a user of the domain
/// the agency trusts).
async fn security_tokens(
    State(shared): State<Arc<Shared>>,
    http_method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(fault) = injected_iam_fault(&shared, "securitytokens").await {
        return respond(&shared, "securitytokens", Err(fault));
    }
    let outcome = (|| {
        let request = parse_json(&body)?;
        let identity = &request["auth"]["identity"];
        let methods = identity["methods"]
            .as_array()
            .ok_or_else(|| IamApiError::invalid_body("auth.identity.methods is missing"))?;
        let method = match methods.as_slice() {
            [one] => one.as_str().unwrap_or_default(),
            _ => "",
        };
        let now_ms = unix_ms(SystemTime::now());
        let mut world = shared.world();
        let (user_id, domain_id, caller, duration) = match method {
            "token" => {
                let duration = duration_seconds(&identity["token"]["duration_seconds"])?;
                let from_header = headers
                    .get("x-auth-token")
                    .and_then(|v| v.to_str().ok())
                    .map(str::trim)
                    .filter(|v| !v.is_empty());
                let token = from_header
                    .or_else(|| identity["token"]["id"].as_str())
                    .ok_or_else(|| {
                        IamApiError::unauthenticated(
                            "no token in X-Auth-Token or auth.identity.token.id",
                        )
                    })?;
                let issued = world
                    .token(token)
                    .filter(|t| t.expires_at_ms > now_ms)
                    .ok_or_else(|| {
                        IamApiError::unauthenticated("the token is unknown or expired")
                    })?;
                (
                    issued.user_id.clone(),
                    issued.domain_id.clone(),
                    issued.user_id.clone(),
                    duration,
                )
            }
            "assume_role" => {
                let assume = &identity["assume_role"];
                let duration = duration_seconds(&assume["duration_seconds"])?;
                // A token of a user of the trusted domain, or (Huawei Cloud's IAM-user variant)
                // that user's AK/SK signature.
                let caller = if headers.contains_key("x-auth-token") {
                    token_caller(&world, &headers)?
                } else {
                    principal(&world, &http_method, &uri, &headers, &body).ok_or_else(|| {
                        IamApiError::unauthenticated("no valid X-Auth-Token or AK/SK signature")
                    })?
                };
                let (agency_id, domain_id, _) = assumable(&world, &caller, assume)?;
                (agency_id, domain_id, caller.user_id, duration)
            }
            _ => {
                return Err(IamApiError::invalid_body(
                    "auth.identity.methods must be [\"token\"] or [\"assume_role\"]",
                ));
            }
        };
        let lifetime_ms = shared
            .config
            .security_token_ttl
            .map(|ttl| ttl.as_millis() as u64)
            .unwrap_or(duration as u64 * 1000);
        let credential = TemporaryCredential {
            secret: random_secret(),
            security_token: format!("gAAAAAemulator{}", random_hex(64)),
            user_id,
            domain_id,
            issued_at_ms: now_ms,
            expires_at_ms: now_ms + lifetime_ms,
        };
        let (secret, security_token, expires_at_ms) = (
            credential.secret.clone(),
            credential.security_token.clone(),
            credential.expires_at_ms,
        );
        let access = world.issue_credential(credential);
        Ok(Reply {
            status: StatusCode::CREATED,
            body: json!({"credential": {
                "access": access,
                "secret": secret,
                "expires_at": iso8601(expires_at_ms),
                "securitytoken": security_token,
            }}),
            caller: Some(caller),
            subject_token: None,
        })
    })();
    respond(&shared, "securitytokens", outcome)
}

/// 40 letters and digits, like an IAM secret key.
fn random_secret() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    (0..40)
        .map(|_| ALPHABET[fastrand::usize(..ALPHABET.len())] as char)
        .collect()
}
