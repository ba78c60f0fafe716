//! IAM federation with OpenID Connect, the pure part: identity providers, mappings, protocols and
//! OpenID Connect configurations as stored, the ID-token (JWT) check against the uploaded JWKS
//! (`signing_key`; RS256 and ES256), and mapping rules applied to the token's claims.
//! The HTTP calls are in [`super::federation_api`].
use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// `PUT /v3/OS-FEDERATION/identity_providers/{id}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct IdentityProvider {
    pub id: String,
    pub description: String,
    pub enabled: bool,
    pub sso_type: String,
    /// The account that registered it: its federated users are users of that account.
    #[serde(skip)]
    pub domain_id: String,
}

/// `PUT /v3/OS-FEDERATION/mappings/{id}`: the rules as sent, and parsed.
#[derive(Clone, Debug)]
pub struct Mapping {
    pub id: String,
    pub rules_json: Value,
    pub rules: Vec<Rule>,
}

#[derive(Clone, Debug)]
pub struct Rule {
    /// `{"user": {"name"}}` and `{"group": {"name"}}` entries, names possibly with `{N}`.
    pub user: Option<String>,
    pub groups: Vec<String>,
    pub remote: Vec<Remote>,
}

#[derive(Clone, Debug)]
pub struct Remote {
    /// The claim's name.
    pub claim: String,
    pub condition: Condition,
}

#[derive(Clone, Debug)]
pub enum Condition {
    /// No condition: the claim's value is a placeholder value (`{0}`, `{1}`, ... in order).
    Direct,
    AnyOneOf(Vec<Pattern>),
    NotAnyOf(Vec<Pattern>),
}

#[derive(Clone, Debug)]
pub enum Pattern {
    Exact(String),
    /// `"regex": true`: the pattern must match the whole value.
    Regex(regex::Regex),
}

impl Pattern {
    fn matches(&self, value: &str) -> bool {
        match self {
            Self::Exact(exact) => exact == value,
            Self::Regex(regex) => regex.is_match(value),
        }
    }
}

/// `POST|PUT|GET /v3.0/OS-FEDERATION/identity-providers/{idp_id}/openid-connect-config`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenIdConnectConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_mode: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idp_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorization_endpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_mode: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_key: Option<String>,
}

fn length_ok(value: &Option<String>, min: usize, max: usize) -> bool {
    value
        .as_deref()
        .is_some_and(|v| (min..=max).contains(&v.chars().count()))
}

impl OpenIdConnectConfig {
    /// Fields of `update` that are set replace ours.
    pub fn merge(&mut self, update: OpenIdConnectConfig) {
        macro_rules! take {
            ($($field:ident),*) => { $( if update.$field.is_some() { self.$field = update.$field; } )* };
        }
        take!(
            access_mode,
            idp_url,
            client_id,
            authorization_endpoint,
            scope,
            response_type,
            response_mode,
            signing_key
        );
    }

    /// The page's constraints; `Err` names the offending field.
    pub fn validate(&self) -> Result<(), String> {
        match self.access_mode.as_deref() {
            Some("program") => {}
            Some("program_console") => {
                if !length_ok(&self.authorization_endpoint, 10, 255) {
                    return Err("authorization_endpoint (10-255 characters) is required with access_mode program_console".into());
                }
                let scopes: Vec<&str> = self
                    .scope
                    .as_deref()
                    .unwrap_or_default()
                    .split(' ')
                    .filter(|s| !s.is_empty())
                    .collect();
                if scopes.is_empty()
                    || scopes.len() > 10
                    || !scopes.contains(&"openid")
                    || scopes
                        .iter()
                        .any(|s| !["openid", "email", "profile"].contains(s))
                {
                    return Err("scope must hold openid and at most openid, email, profile".into());
                }
                if self.response_type.as_deref() != Some("id_token") {
                    return Err("response_type must be id_token".into());
                }
                if !matches!(
                    self.response_mode.as_deref(),
                    Some("fragment" | "form_post")
                ) {
                    return Err("response_mode must be fragment or form_post".into());
                }
            }
            _ => return Err("access_mode must be program or program_console".into()),
        }
        if !length_ok(&self.idp_url, 10, 255) {
            return Err("idp_url must have 10 to 255 characters".into());
        }
        if !length_ok(&self.client_id, 5, 255) {
            return Err("client_id must have 5 to 255 characters".into());
        }
        if !length_ok(&self.signing_key, 10, 30_000) {
            return Err("signing_key must have 10 to 30000 characters".into());
        }
        Jwks::parse(self.signing_key.as_deref().unwrap_or_default())?;
        Ok(())
    }
}

/// Everything federation-related the world holds.
#[derive(Clone, Debug, Default)]
pub struct Federation {
    pub identity_providers: BTreeMap<String, IdentityProvider>,
    pub mappings: BTreeMap<String, Mapping>,
    /// (idp_id, protocol_id) -> mapping_id
    pub protocols: BTreeMap<(String, String), String>,
    /// idp_id -> configuration
    pub oidc_configs: BTreeMap<String, OpenIdConnectConfig>,
}

// ---- mappings ----

/// Parses and checks `mapping.rules`: each rule has `local` (user and group entries) and
/// `remote` (claims, at most one of `any_one_of` / `not_any_of`, optional `regex`), and every
/// `{N}` in `local` names one of the rule's remote entries without a condition.
pub fn parse_rules(rules: &Value) -> Result<Vec<Rule>, String> {
    let rules = rules
        .as_array()
        .filter(|rules| !rules.is_empty())
        .ok_or("mapping.rules must be a non-empty array")?;
    rules
        .iter()
        .enumerate()
        .map(|(i, rule)| parse_rule(rule).map_err(|e| format!("rules[{i}]: {e}")))
        .collect()
}

fn strings(value: &Value, what: &str) -> Result<Vec<String>, String> {
    value
        .as_array()
        .ok_or(format!("{what} must be an array of strings"))?
        .iter()
        .map(|v| {
            v.as_str()
                .map(str::to_owned)
                .ok_or(format!("{what} must be an array of strings"))
        })
        .collect()
}

fn parse_rule(rule: &Value) -> Result<Rule, String> {
    let remote_entries = rule["remote"]
        .as_array()
        .filter(|r| !r.is_empty())
        .ok_or("remote must be a non-empty array")?;
    let mut remote = Vec::new();
    for entry in remote_entries {
        let claim = entry["type"]
            .as_str()
            .filter(|t| !t.is_empty())
            .ok_or("remote[].type must be a string")?;
        let regex = match entry.get("regex") {
            None => false,
            Some(Value::Bool(flag)) => *flag,
            Some(_) => return Err("remote[].regex must be a boolean".into()),
        };
        let patterns = |key: &str| -> Result<Vec<Pattern>, String> {
            strings(&entry[key], &format!("remote[].{key}"))?
                .into_iter()
                .map(|text| {
                    if regex {
                        regex::Regex::new(&format!("^(?:{text})$"))
                            .map(Pattern::Regex)
                            .map_err(|e| format!("remote[].{key}: {e}"))
                    } else {
                        Ok(Pattern::Exact(text))
                    }
                })
                .collect()
        };
        let condition = match (entry.get("any_one_of"), entry.get("not_any_of")) {
            (Some(_), Some(_)) => {
                return Err("any_one_of and not_any_of are mutually exclusive".into());
            }
            (Some(_), None) => Condition::AnyOneOf(patterns("any_one_of")?),
            (None, Some(_)) => Condition::NotAnyOf(patterns("not_any_of")?),
            (None, None) => Condition::Direct,
        };
        remote.push(Remote {
            claim: claim.to_owned(),
            condition,
        });
    }
    let direct = remote
        .iter()
        .filter(|r| matches!(r.condition, Condition::Direct))
        .count();
    let local = rule["local"]
        .as_array()
        .filter(|l| !l.is_empty())
        .ok_or("local must be a non-empty array")?;
    let mut user = None;
    let mut groups = Vec::new();
    for entry in local {
        let name_of = |kind: &str| -> Result<Option<String>, String> {
            match entry.get(kind) {
                None => Ok(None),
                Some(object) => object["name"]
                    .as_str()
                    .filter(|n| !n.is_empty())
                    .map(|n| Some(n.to_owned()))
                    .ok_or(format!("local[].{kind}.name must be a string")),
            }
        };
        let (u, g) = (name_of("user")?, name_of("group")?);
        if u.is_none() && g.is_none() {
            return Err("local[] entries hold a user or a group".into());
        }
        for name in u.iter().chain(g.iter()) {
            for index in placeholders(name)? {
                if index >= direct {
                    return Err(format!(
                        "{{{index}}} names no remote entry without a condition ({direct} in this rule)"
                    ));
                }
            }
        }
        if let Some(u) = u {
            user = Some(u);
        }
        groups.extend(g);
    }
    Ok(Rule {
        user,
        groups,
        remote,
    })
}

/// The indices of `{N}` placeholders in `name`.
fn placeholders(name: &str) -> Result<Vec<usize>, String> {
    let mut found = Vec::new();
    let mut rest = name;
    while let Some(start) = rest.find('{') {
        let after = &rest[start + 1..];
        let end = after.find('}').ok_or(format!("unclosed {{ in {name:?}"))?;
        let index = after[..end]
            .parse::<usize>()
            .map_err(|_| format!("{{{}}} in {name:?} is not a placeholder", &after[..end]))?;
        found.push(index);
        rest = &after[end + 1..];
    }
    Ok(found)
}

/// The values of a claim as strings: a string, the strings of an array, or a number or boolean
/// as text. `None` when the claim is absent or of another type.
fn claim_values(claims: &Map<String, Value>, name: &str) -> Option<Vec<String>> {
    let scalar = |v: &Value| match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    };
    match claims.get(name)? {
        Value::Array(items) => items.iter().map(scalar).collect(),
        other => scalar(other).map(|v| vec![v]),
    }
}

/// What a mapping made of a token's claims.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapped {
    pub user_name: String,
    pub groups: Vec<String>,
}

/// The federated user's name when no matching rule names one (the name the API pages show).
pub const DEFAULT_FEDERATED_USER: &str = "FederationUser";

/// Applies every rule; a rule matches when each remote entry's claim is present and its
/// condition holds. The user name comes from the first matching rule that names one; groups are
/// those of all matching rules. `None` when no rule matches.
pub fn apply_mapping(rules: &[Rule], claims: &Map<String, Value>) -> Option<Mapped> {
    let mut user_name = None;
    let mut groups: Vec<String> = Vec::new();
    let mut matched = false;
    for rule in rules {
        let mut direct = Vec::new();
        let holds = rule.remote.iter().all(|remote| {
            let Some(values) = claim_values(claims, &remote.claim) else {
                return false;
            };
            match &remote.condition {
                Condition::Direct => {
                    direct.push(values.join(","));
                    true
                }
                Condition::AnyOneOf(patterns) => {
                    values.iter().any(|v| patterns.iter().any(|p| p.matches(v)))
                }
                Condition::NotAnyOf(patterns) => {
                    !values.iter().any(|v| patterns.iter().any(|p| p.matches(v)))
                }
            }
        });
        if !holds {
            continue;
        }
        matched = true;
        let fill = |name: &str| {
            let mut out = name.to_owned();
            for (i, value) in direct.iter().enumerate() {
                out = out.replace(&format!("{{{i}}}"), value);
            }
            out
        };
        if user_name.is_none() {
            user_name = rule.user.as_deref().map(fill);
        }
        for group in &rule.groups {
            let group = fill(group);
            if !groups.contains(&group) {
                groups.push(group);
            }
        }
    }
    matched.then(|| Mapped {
        user_name: user_name.unwrap_or_else(|| DEFAULT_FEDERATED_USER.to_owned()),
        groups,
    })
}

// ---- JWKS and ID tokens ----

/// A public key of the uploaded JWKS.
#[derive(Clone, Debug)]
pub struct Jwk {
    pub kid: Option<String>,
    pub alg: Option<String>,
    pub key: PublicKey,
}

#[derive(Clone, Debug)]
pub enum PublicKey {
    Rsa {
        n: Vec<u8>,
        e: Vec<u8>,
    },
    /// P-256, as the uncompressed point `04 || x || y`.
    P256(Vec<u8>),
    /// Another key type or curve: kept so a `kid` naming it fails as unsupported.
    Other,
}

#[derive(Clone, Debug)]
pub struct Jwks(pub Vec<Jwk>);

fn b64(field: &Value, what: &str) -> Result<Vec<u8>, String> {
    let text = field
        .as_str()
        .ok_or(format!("{what} must be a base64url string"))?;
    URL_SAFE_NO_PAD
        .decode(text.trim_end_matches('='))
        .map_err(|_| format!("{what} is not base64url"))
}

impl Jwks {
    /// `{"keys": [...]}` as a string (the `signing_key` field).
    pub fn parse(text: &str) -> Result<Self, String> {
        let value: Value =
            serde_json::from_str(text).map_err(|_| "signing_key is not JSON".to_owned())?;
        let keys = value["keys"]
            .as_array()
            .ok_or("signing_key must be a JWKS: {\"keys\": [...]}")?;
        let mut parsed = Vec::new();
        for key in keys {
            let key_type = key["kty"].as_str().ok_or("a key has no kty")?;
            let public = match (key_type, key["crv"].as_str()) {
                ("RSA", _) => PublicKey::Rsa {
                    n: b64(&key["n"], "n")?,
                    e: b64(&key["e"], "e")?,
                },
                ("EC", Some("P-256")) => {
                    let (x, y) = (b64(&key["x"], "x")?, b64(&key["y"], "y")?);
                    if x.len() != 32 || y.len() != 32 {
                        return Err("a P-256 key needs 32-byte x and y".into());
                    }
                    let mut point = vec![4];
                    point.extend(x);
                    point.extend(y);
                    PublicKey::P256(point)
                }
                _ => PublicKey::Other,
            };
            parsed.push(Jwk {
                kid: key["kid"].as_str().map(str::to_owned),
                alg: key["alg"].as_str().map(str::to_owned),
                key: public,
            });
        }
        Ok(Self(parsed))
    }
}

/// Why an ID token was refused (all answer 401 IAM.0001; the reason goes to `X-Emulator-Detail`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenRejection {
    #[error("the ID token is not a JWT (header.payload.signature, base64url JSON)")]
    Malformed,
    #[error("the ID token's alg {0:?} is not supported (RS256, ES256)")]
    UnsupportedAlgorithm(String),
    #[error("no key of the identity provider's signing_key fits the ID token (kid {0:?})")]
    NoKey(Option<String>),
    #[error("the ID token's signature does not verify")]
    BadSignature,
    #[error("the ID token's iss {0:?} is not the identity provider's idp_url")]
    WrongIssuer(String),
    #[error("the ID token's aud does not contain the identity provider's client_id")]
    WrongAudience,
    #[error("the ID token has no numeric exp")]
    NoExpiry,
    #[error("the ID token expired")]
    Expired,
    #[error("the ID token is not valid yet (nbf)")]
    NotYetValid,
}

/// Checks `jwt` against the configuration and returns its claims. Order: shape, algorithm, key,
/// signature, `iss`, `aud`, `exp`, `nbf`. No clock leeway.
pub fn verify_id_token(
    jwt: &str,
    config: &OpenIdConnectConfig,
    now_seconds: i64,
) -> Result<Map<String, Value>, TokenRejection> {
    let mut parts = jwt.trim().split('.');
    let (Some(header), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenRejection::Malformed);
    };
    let decode = |part: &str| {
        URL_SAFE_NO_PAD
            .decode(part)
            .map_err(|_| TokenRejection::Malformed)
    };
    let header_json: Map<String, Value> =
        serde_json::from_slice(&decode(header)?).map_err(|_| TokenRejection::Malformed)?;
    let claims: Map<String, Value> =
        serde_json::from_slice(&decode(payload)?).map_err(|_| TokenRejection::Malformed)?;
    let signature = decode(signature)?;
    let alg = header_json
        .get("alg")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    if alg != "RS256" && alg != "ES256" {
        return Err(TokenRejection::UnsupportedAlgorithm(alg));
    }
    let kid = header_json
        .get("kid")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let jwks = Jwks::parse(config.signing_key.as_deref().unwrap_or_default())
        .map_err(|_| TokenRejection::NoKey(kid.clone()))?;
    let candidates: Vec<&Jwk> = jwks
        .0
        .iter()
        .filter(|key| kid.is_none() || key.kid == kid)
        .filter(|key| key.alg.as_deref().is_none_or(|a| a == alg))
        .filter(|key| {
            matches!(
                (&key.key, alg.as_str()),
                (PublicKey::Rsa { .. }, "RS256") | (PublicKey::P256(_), "ES256")
            )
        })
        .collect();
    if candidates.is_empty() {
        return Err(TokenRejection::NoKey(kid));
    }
    let signed = format!("{header}.{payload}");
    let verified = candidates.iter().any(|key| match &key.key {
        PublicKey::Rsa { n, e } => ring::signature::RsaPublicKeyComponents { n, e }
            .verify(
                &ring::signature::RSA_PKCS1_2048_8192_SHA256,
                signed.as_bytes(),
                &signature,
            )
            .is_ok(),
        PublicKey::P256(point) => ring::signature::UnparsedPublicKey::new(
            &ring::signature::ECDSA_P256_SHA256_FIXED,
            point,
        )
        .verify(signed.as_bytes(), &signature)
        .is_ok(),
        PublicKey::Other => false,
    });
    if !verified {
        return Err(TokenRejection::BadSignature);
    }
    let issuer = claims
        .get("iss")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if Some(issuer) != config.idp_url.as_deref() {
        return Err(TokenRejection::WrongIssuer(issuer.to_owned()));
    }
    let client_id = config.client_id.as_deref().unwrap_or_default();
    let audience_ok = match claims.get("aud") {
        Some(Value::String(aud)) => aud == client_id,
        Some(Value::Array(auds)) => auds.iter().any(|a| a.as_str() == Some(client_id)),
        _ => false,
    };
    if !audience_ok {
        return Err(TokenRejection::WrongAudience);
    }
    let time = |name: &str| claims.get(name).and_then(Value::as_f64);
    let expiry = time("exp").ok_or(TokenRejection::NoExpiry)?;
    if expiry <= now_seconds as f64 {
        return Err(TokenRejection::Expired);
    }
    if time("nbf").is_some_and(|nbf| nbf > now_seconds as f64) {
        return Err(TokenRejection::NotYetValid);
    }
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn claims(value: Value) -> Map<String, Value> {
        value.as_object().unwrap().clone()
    }

    #[test]
    fn rules_map_sub_with_placeholders_and_conditions() {
        let rules = parse_rules(&json!([
            {"local": [{"user": {"name": "k8s-{0}"}}, {"group": {"name": "kms-operators"}}],
             "remote": [{"type": "sub"}, {"type": "sub", "any_one_of": ["system:serviceaccount:kmsgrant:operator"]}]},
            {"local": [{"group": {"name": "readers-{0}"}}],
             "remote": [{"type": "team"}, {"type": "sub", "regex": true, "any_one_of": ["system:serviceaccount:kmsgrant:.*"]},
                        {"type": "env", "not_any_of": ["prod"]}]},
        ]))
        .unwrap();
        let operator = claims(
            json!({"sub": "system:serviceaccount:kmsgrant:operator", "team": "blue", "env": "dev"}),
        );
        assert_eq!(
            apply_mapping(&rules, &operator),
            Some(Mapped {
                user_name: "k8s-system:serviceaccount:kmsgrant:operator".into(),
                groups: vec!["kms-operators".into(), "readers-blue".into()],
            })
        );
        let other = claims(
            json!({"sub": "system:serviceaccount:kmsgrant:other", "team": "red", "env": "dev"}),
        );
        assert_eq!(
            apply_mapping(&rules, &other),
            Some(Mapped {
                user_name: DEFAULT_FEDERATED_USER.into(),
                groups: vec!["readers-red".into()]
            })
        );
        let prod = claims(
            json!({"sub": "system:serviceaccount:kmsgrant:other", "team": "red", "env": "prod"}),
        );
        assert_eq!(
            apply_mapping(&rules, &prod),
            None,
            "not_any_of refuses prod"
        );
        // The regex matches whole values only.
        let prefixed =
            claims(json!({"sub": "x-system:serviceaccount:kmsgrant:a", "team": "t", "env": "dev"}));
        assert_eq!(apply_mapping(&rules, &prefixed), None);
        assert_eq!(apply_mapping(&rules, &claims(json!({}))), None);
    }

    #[test]
    fn invalid_rules_are_refused() {
        for (rules, why) in [
            (json!([]), "empty"),
            (
                json!([{"local": [{"user": {"name": "u"}}], "remote": []}]),
                "no remote",
            ),
            (
                json!([{"local": [], "remote": [{"type": "sub"}]}]),
                "no local",
            ),
            (
                json!([{"local": [{"user": {"name": "{1}"}}], "remote": [{"type": "sub"}]}]),
                "placeholder out of range",
            ),
            (
                json!([{"local": [{"user": {"name": "{0}"}}], "remote": [{"type": "sub", "any_one_of": ["a"]}]}]),
                "conditions are no placeholders",
            ),
            (
                json!([{"local": [{"user": {"name": "u"}}], "remote": [{"type": "sub", "any_one_of": ["a"], "not_any_of": ["b"]}]}]),
                "both conditions",
            ),
            (
                json!([{"local": [{"user": {"name": "u"}}], "remote": [{"type": "sub", "regex": true, "any_one_of": ["("]}]}]),
                "bad regex",
            ),
            (
                json!([{"local": [{"role": {"name": "u"}}], "remote": [{"type": "sub"}]}]),
                "unknown local",
            ),
        ] {
            assert!(parse_rules(&rules).is_err(), "{why}");
        }
    }
}
