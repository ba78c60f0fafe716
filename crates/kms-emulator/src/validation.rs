//! Pure parsing of KMS request bodies into typed requests, with the API's validation rules.
//! Every rule answers with the error code the service documents.
use serde_json::{Map, Value};

use super::errors::{ErrorCode, KmsError};

/// Grants and keys returned in one page when no `limit` is sent, and the largest `limit`.
pub const MAX_PAGE_SIZE: usize = 100;

/// The operations a grant may give (the documented seven plus the Huawei SDK's two).
pub const GRANT_OPERATIONS: [&str; 9] = [
    "create-datakey",
    "create-datakey-without-plaintext",
    "encrypt-datakey",
    "decrypt-datakey",
    "describe-key",
    "create-grant",
    "retire-grant",
    "encrypt-data",
    "decrypt-data",
];

const KEY_SPECS: [&str; 9] = [
    "AES_256", "RSA_2048", "RSA_3072", "RSA_4096", "EC_P256", "EC_P384", "HMAC_256", "HMAC_384",
    "HMAC_512",
];
const KEY_USAGES: [&str; 3] = ["ENCRYPT_DECRYPT", "SIGN_VERIFY", "GENERATE_VERIFY_MAC"];

type Fields = Map<String, Value>;

/// The JSON object of a request; an empty body counts as `{}`.
pub fn parse_body(body: &[u8]) -> Result<Fields, KmsError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(fields)) => Ok(fields),
        _ => Err(ErrorCode::InvalidJson.into()),
    }
}

fn optional_string<'a>(fields: &'a Fields, name: &str) -> Result<Option<&'a str>, KmsError> {
    match fields.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => Ok(Some(text)),
        Some(_) => Err(ErrorCode::InvalidParameter.into()),
    }
}

fn required_string<'a>(fields: &'a Fields, name: &str) -> Result<&'a str, KmsError> {
    match optional_string(fields, name)? {
        Some(text) if !text.is_empty() => Ok(text),
        _ => Err(ErrorCode::ParametersMissing.into()),
    }
}

pub fn is_key_id(text: &str) -> bool {
    let groups: Vec<&str> = text.split('-').collect();
    groups.len() == 5
        && groups.iter().zip([8, 4, 4, 4, 12]).all(|(group, len)| {
            group.len() == len
                && group
                    .bytes()
                    .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase())
        })
}

pub fn is_grant_id(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit())
}

pub fn is_principal(text: &str) -> bool {
    (1..=64).contains(&text.len()) && text.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// Grant names and key aliases: `^[a-zA-Z0-9:/_-]{1,255}$`.
pub fn is_name(text: &str) -> bool {
    (1..=255).contains(&text.len())
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b":/_-".contains(&b))
}

fn key_id(fields: &Fields) -> Result<String, KmsError> {
    let key_id = required_string(fields, "key_id")?;
    if !is_key_id(key_id) {
        return Err(ErrorCode::InvalidKeyId.into());
    }
    Ok(key_id.to_owned())
}

fn grant_id(fields: &Fields) -> Result<String, KmsError> {
    let grant_id = required_string(fields, "grant_id")?;
    if !is_grant_id(grant_id) {
        return Err(ErrorCode::InvalidGrantId.into());
    }
    Ok(grant_id.to_owned())
}

/// `sequence` is optional; when sent it is a 36-character serial number.
fn check_sequence(fields: &Fields) -> Result<(), KmsError> {
    match optional_string(fields, "sequence")? {
        Some(sequence) if !sequence.is_empty() && sequence.chars().count() != 36 => {
            Err(ErrorCode::InvalidSequence.into())
        }
        _ => Ok(()),
    }
}

/// A string or a JSON number (the Huawei Terraform provider sends `"limit": 100`).
fn string_or_number(
    fields: &Fields,
    name: &str,
    invalid: ErrorCode,
) -> Result<Option<String>, KmsError> {
    match fields.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) if text.trim().is_empty() => Ok(None),
        Some(Value::String(text)) => Ok(Some(text.trim().to_owned())),
        Some(Value::Number(number)) => Ok(Some(number.to_string())),
        Some(_) => Err(invalid.into()),
    }
}

/// Page bounds from `limit` and `marker`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Page {
    pub offset: usize,
    pub limit: usize,
}

fn page(fields: &Fields) -> Result<Page, KmsError> {
    let limit = match string_or_number(fields, "limit", ErrorCode::InvalidLimit)? {
        None => MAX_PAGE_SIZE,
        Some(text) => match text.parse::<usize>() {
            Ok(limit) if (1..=MAX_PAGE_SIZE).contains(&limit) => limit,
            _ => return Err(ErrorCode::InvalidLimit.into()),
        },
    };
    let offset = match string_or_number(fields, "marker", ErrorCode::InvalidMarker)? {
        None => 0,
        Some(text) => text
            .parse::<usize>()
            .map_err(|_| KmsError(ErrorCode::InvalidMarker))?,
    };
    Ok(Page { offset, limit })
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CreateKey {
    pub key_alias: String,
    pub key_spec: String,
    pub key_usage: String,
    pub key_description: String,
    pub origin: String,
}

pub fn create_key(fields: &Fields) -> Result<CreateKey, KmsError> {
    let key_alias = required_string(fields, "key_alias")?;
    if !is_name(key_alias) || key_alias.ends_with("/default") {
        return Err(ErrorCode::InvalidAlias.into());
    }
    let key_spec = optional_string(fields, "key_spec")?
        .filter(|s| !s.is_empty())
        .unwrap_or("AES_256");
    if !KEY_SPECS.contains(&key_spec) {
        return Err(ErrorCode::InvalidParameter.into());
    }
    let default_usage = match key_spec {
        "AES_256" => "ENCRYPT_DECRYPT",
        spec if spec.starts_with("HMAC") => "GENERATE_VERIFY_MAC",
        _ => "SIGN_VERIFY",
    };
    let key_usage = optional_string(fields, "key_usage")?
        .filter(|s| !s.is_empty())
        .unwrap_or(default_usage);
    if !KEY_USAGES.contains(&key_usage) {
        return Err(ErrorCode::InvalidParameter.into());
    }
    let key_description = optional_string(fields, "key_description")?.unwrap_or("");
    if key_description.chars().count() > 255 {
        return Err(ErrorCode::InvalidDescription.into());
    }
    let origin = optional_string(fields, "origin")?
        .filter(|s| !s.is_empty())
        .unwrap_or("kms");
    if !["kms", "external"].contains(&origin) {
        return Err(ErrorCode::InvalidParameter.into());
    }
    check_sequence(fields)?;
    Ok(CreateKey {
        key_alias: key_alias.to_owned(),
        key_spec: key_spec.to_owned(),
        key_usage: key_usage.to_owned(),
        key_description: key_description.to_owned(),
        origin: origin.to_owned(),
    })
}

/// `update-key-alias`: give the key `key_id` the alias `key_alias` (in place of its own).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpdateKeyAlias {
    pub key_id: String,
    pub key_alias: String,
}

/// The fields are checked in the order of the API page: `key_id` (missing KMS.0204, malformed
/// KMS.0205), then `key_alias` (missing KMS.0204; outside `^[a-zA-Z0-9:/_-]{1,255}$` or ending
/// `/default` KMS.1101), then `sequence`.
pub fn update_key_alias(fields: &Fields) -> Result<UpdateKeyAlias, KmsError> {
    let key_id = key_id(fields)?;
    let key_alias = required_string(fields, "key_alias")?;
    if !is_name(key_alias) || key_alias.ends_with("/default") {
        return Err(ErrorCode::InvalidAlias.into());
    }
    check_sequence(fields)?;
    Ok(UpdateKeyAlias {
        key_id,
        key_alias: key_alias.to_owned(),
    })
}

/// How `describe-key` names a key: by ID, `alias/<alias>`, or alias URN.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyReference {
    Id(String),
    Alias(String),
    /// `kms:<region>:<domain_id>:alias:<alias>`
    Urn {
        region: String,
        domain_id: String,
        alias: String,
    },
}

pub fn describe_key(fields: &Fields) -> Result<KeyReference, KmsError> {
    let key_id = required_string(fields, "key_id")?;
    check_sequence(fields)?;
    if let Some(alias) = key_id.strip_prefix("alias/") {
        return if is_name(alias) {
            Ok(KeyReference::Alias(alias.to_owned()))
        } else {
            Err(ErrorCode::InvalidKeyId.into())
        };
    }
    if let Some(rest) = key_id.strip_prefix("kms:") {
        let parts: Vec<&str> = rest.splitn(4, ':').collect();
        if let [region, domain_id, "alias", alias] = parts.as_slice()
            && is_name(alias)
        {
            return Ok(KeyReference::Urn {
                region: (*region).to_owned(),
                domain_id: (*domain_id).to_owned(),
                alias: (*alias).to_owned(),
            });
        }
        return Err(ErrorCode::InvalidKeyId.into());
    }
    if !is_key_id(key_id) {
        return Err(ErrorCode::InvalidKeyId.into());
    }
    Ok(KeyReference::Id(key_id.to_owned()))
}

/// A request naming one key by ID (enable, disable, cancel deletion).
pub fn key_only(fields: &Fields) -> Result<String, KmsError> {
    let key_id = key_id(fields)?;
    check_sequence(fields)?;
    Ok(key_id)
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListKeys {
    pub page: Page,
    pub key_state: Option<String>,
}

pub fn list_keys(fields: &Fields) -> Result<ListKeys, KmsError> {
    let page = page(fields)?;
    let key_state = match optional_string(fields, "key_state")? {
        None | Some("") => None,
        Some(state) if matches!(state, "1" | "2" | "3" | "4" | "5") => Some(state.to_owned()),
        Some(_) => return Err(ErrorCode::InvalidParameter.into()),
    };
    check_sequence(fields)?;
    Ok(ListKeys { page, key_state })
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScheduleKeyDeletion {
    pub key_id: String,
    pub pending_days: u32,
}

pub fn schedule_key_deletion(fields: &Fields) -> Result<ScheduleKeyDeletion, KmsError> {
    let key_id = key_id(fields)?;
    let pending_days =
        match string_or_number(fields, "pending_days", ErrorCode::InvalidPendingDays)? {
            None => return Err(ErrorCode::ParametersMissing.into()),
            Some(text) => match text.parse::<u32>() {
                Ok(days) if (7..=1096).contains(&days) => days,
                _ => return Err(ErrorCode::InvalidPendingDays.into()),
            },
        };
    check_sequence(fields)?;
    Ok(ScheduleKeyDeletion {
        key_id,
        pending_days,
    })
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CreateGrant {
    pub key_id: String,
    pub grantee_principal: String,
    pub grantee_principal_type: String,
    /// De-duplicated, in the order sent.
    pub operations: Vec<String>,
    pub name: Option<String>,
    pub retiring_principal: Option<String>,
}

pub fn create_grant(fields: &Fields) -> Result<CreateGrant, KmsError> {
    let key_id = key_id(fields)?;
    let grantee_principal = required_string(fields, "grantee_principal")?;
    let operations = match fields.get("operations") {
        None | Some(Value::Null) => return Err(ErrorCode::ParametersMissing.into()),
        Some(Value::Array(values)) if values.is_empty() => {
            return Err(ErrorCode::ParametersMissing.into());
        }
        Some(Value::Array(values)) => values,
        Some(_) => return Err(ErrorCode::InvalidParameter.into()),
    };
    if !is_principal(grantee_principal) {
        return Err(ErrorCode::InvalidUserId.into());
    }
    let mut unique = Vec::with_capacity(operations.len());
    for operation in operations {
        let Some(operation) = operation
            .as_str()
            .filter(|op| GRANT_OPERATIONS.contains(op))
        else {
            return Err(ErrorCode::InvalidParameter.into());
        };
        if !unique.iter().any(|seen: &String| seen == operation) {
            unique.push(operation.to_owned());
        }
    }
    if unique == ["create-grant"] {
        return Err(ErrorCode::CreateGrantOnly.into());
    }
    let name = match optional_string(fields, "name")? {
        None | Some("") => None,
        Some(name) if is_name(name) => Some(name.to_owned()),
        Some(_) => return Err(ErrorCode::InvalidParameter.into()),
    };
    let retiring_principal = match optional_string(fields, "retiring_principal")? {
        None | Some("") => None,
        Some(principal) if is_principal(principal) => Some(principal.to_owned()),
        Some(_) => return Err(ErrorCode::InvalidUserId.into()),
    };
    let grantee_principal_type = match optional_string(fields, "grantee_principal_type")? {
        None | Some("") => "user",
        Some(kind @ ("user" | "domain")) => kind,
        Some(_) => return Err(ErrorCode::InvalidParameter.into()),
    };
    check_sequence(fields)?;
    Ok(CreateGrant {
        key_id,
        grantee_principal: grantee_principal.to_owned(),
        grantee_principal_type: grantee_principal_type.to_owned(),
        operations: unique,
        name,
        retiring_principal,
    })
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListGrants {
    pub key_id: String,
    pub page: Page,
}

pub fn list_grants(fields: &Fields) -> Result<ListGrants, KmsError> {
    let key_id = key_id(fields)?;
    let page = page(fields)?;
    check_sequence(fields)?;
    Ok(ListGrants { key_id, page })
}

pub fn list_retirable_grants(fields: &Fields) -> Result<Page, KmsError> {
    let page = page(fields)?;
    check_sequence(fields)?;
    Ok(page)
}

/// Revoke and retire name a grant on a key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GrantOnKey {
    pub key_id: String,
    pub grant_id: String,
}

pub fn grant_on_key(fields: &Fields) -> Result<GrantOnKey, KmsError> {
    let key_id = key_id(fields)?;
    let grant_id = grant_id(fields)?;
    check_sequence(fields)?;
    Ok(GrantOnKey { key_id, grant_id })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fields(value: Value) -> Fields {
        value.as_object().cloned().unwrap()
    }

    fn code_of<T: std::fmt::Debug>(result: Result<T, KmsError>) -> &'static str {
        result.expect_err("should be rejected").code().code()
    }

    #[test]
    fn limit_is_accepted_as_string_number_or_empty() {
        let key = "0d0466b0-e727-4d9c-b35d-f84bb474a37f";
        for (limit, expected) in [
            (json!("7"), 7),
            (json!(7), 7),
            (json!(""), 100),
            (Value::Null, 100),
        ] {
            let request = list_grants(&fields(json!({"key_id": key, "limit": limit}))).unwrap();
            assert_eq!(request.page.limit, expected);
        }
        for bad in [
            json!("0"),
            json!("101"),
            json!("-1"),
            json!("x"),
            json!(1.5),
            json!(true),
        ] {
            assert_eq!(
                code_of(list_grants(&fields(json!({"key_id": key, "limit": bad})))),
                "KMS.1601"
            );
        }
        for bad in [json!("-1"), json!("abc"), json!(-3)] {
            assert_eq!(
                code_of(list_grants(&fields(json!({"key_id": key, "marker": bad})))),
                "KMS.1602"
            );
        }
    }

    #[test]
    fn create_grant_keeps_operations_unique_and_rejects_create_grant_alone() {
        let base =
            json!({"key_id": "0d0466b0-e727-4d9c-b35d-f84bb474a37f", "grantee_principal": "abc"});
        let mut request = fields(base.clone());
        request.insert(
            "operations".into(),
            json!(["describe-key", "describe-key", "create-grant"]),
        );
        assert_eq!(
            create_grant(&request).unwrap().operations,
            ["describe-key", "create-grant"]
        );
        request.insert("operations".into(), json!(["create-grant", "create-grant"]));
        assert_eq!(code_of(create_grant(&request)), "KMS.2401");
    }

    #[test]
    fn describe_key_accepts_id_alias_and_urn() {
        assert_eq!(
            describe_key(&fields(json!({"key_id": "alias/4555"}))).unwrap(),
            KeyReference::Alias("4555".into())
        );
        assert_eq!(
            describe_key(&fields(
                json!({"key_id": "kms:eu-de-ring0:3ba44455500dd43127:alias:4555"})
            ))
            .unwrap(),
            KeyReference::Urn {
                region: "eu-de-ring0".into(),
                domain_id: "3ba44455500dd43127".into(),
                alias: "4555".into()
            }
        );
        assert_eq!(
            code_of(describe_key(&fields(json!({"key_id": "not-a-key"})))),
            "KMS.0205"
        );
    }
}
