//! The example requests of the seed pages (shared/seeds/) and the reference pages
//! (shared/reference/otc-kms-api, otc-iam-api) sent as written; the answers have the same fields,
//! JSON types and shapes as the example responses (copied verbatim, trailing commas and all).
mod support;

use kms_emulator::{NewKey, NewUser, TokenScope};
use reqwest::StatusCode;
use serde_json::{Value, json};
use support::Harness;

/// The documentation's examples carry trailing commas; drop them before parsing.
fn example(text: &str) -> Value {
    let mut cleaned = String::with_capacity(text.len());
    let chars: Vec<char> = text.chars().collect();
    for (i, &c) in chars.iter().enumerate() {
        if c == ','
            && chars[i + 1..]
                .iter()
                .find(|c| !c.is_whitespace())
                .is_some_and(|next| matches!(next, '}' | ']'))
        {
            continue;
        }
        cleaned.push(c);
    }
    serde_json::from_str(&cleaned)
        .unwrap_or_else(|e| panic!("example does not parse: {e}\n{cleaned}"))
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// `actual` has every field of `expected` with the same JSON type (a `null` in the example
/// stands for any value), and no field beyond those and `documented_extras` (fields the page's
/// tables list but its example omits).
fn assert_shape(actual: &Value, expected: &Value, documented_extras: &[&str], path: &str) {
    match (actual, expected) {
        (_, Value::Null) => {}
        (Value::Object(actual), Value::Object(expected)) => {
            for (name, expected_value) in expected {
                let actual_value = actual
                    .get(name)
                    .unwrap_or_else(|| panic!("{path}.{name} is missing"));
                assert_shape(
                    actual_value,
                    expected_value,
                    documented_extras,
                    &format!("{path}.{name}"),
                );
            }
            for name in actual.keys() {
                assert!(
                    expected.contains_key(name) || documented_extras.contains(&name.as_str()),
                    "{path}.{name} is not in the example"
                );
            }
        }
        (Value::Array(actual), Value::Array(expected)) => {
            if let Some(first) = expected.first() {
                assert!(!actual.is_empty(), "{path} is empty");
                for (i, item) in actual.iter().enumerate() {
                    assert_shape(item, first, documented_extras, &format!("{path}[{i}]"));
                }
            }
        }
        _ => assert_eq!(
            kind(actual),
            kind(expected),
            "{path}: {actual} vs {expected}"
        ),
    }
}

const ERROR_EXAMPLE: &str = r#"{
    "error": {
        "error_code": "KMS.XXXX",
        "error_msg": "XXX"
    }
}"#;

#[tokio::test]
async fn key_examples_of_the_reference_pages_reproduce() {
    let h = Harness::start().await;
    let created = h
        .kms("create-key", example(r#"{ "key_alias": "test" }"#))
        .await;
    assert_eq!(created.status, StatusCode::OK);
    assert_shape(
        &created.body,
        &example(
            r#"{"key_info": {"key_id": "bb6a3d22-dc93-47ac-b5bd-88df7ad35f1e", "domain_id": "b168fe00ff56492495a7d22974df2d0b"}}"#,
        ),
        &[],
        "create-key",
    );

    let key_id = "0d0466b0-e727-4d9c-b35d-f84bb474a37f";
    h.emulator
        .admin()
        .create_key(NewKey {
            key_alias: "kms_test".into(),
            key_id: Some(key_id.into()),
            ..Default::default()
        })
        .unwrap();
    let described = h
        .kms(
            "describe-key",
            example(r#"{ "key_id": "0d0466b0-e727-4d9c-b35d-f84bb474a37f" }"#),
        )
        .await;
    let describe_example = example(
        r#"{
          "key_info": {
              "key_id": "0d0466b0-e727-4d9c-b35d-f84bb474a37f",
              "domain_id": "b168fe00ff56492495a7d22974df2d0b",
              "key_alias": "kms_test",
              "realm": "aaa",
              "key_description": "",
              "creation_date": "1472442386000",
              "scheduled_deletion_date": "",
              "key_state": "2",
              "default_key_flag": "0",
              "key_type": "1",
              "expiration_time":"1501578672000",
              "origin":"kms"
              ,
          }
      }"#,
    );
    assert_shape(
        &described.body,
        &describe_example,
        &["key_spec", "key_usage"],
        "describe-key",
    );
    for field in [
        "key_id",
        "key_alias",
        "key_state",
        "default_key_flag",
        "key_type",
        "origin",
        "key_description",
        "scheduled_deletion_date",
    ] {
        assert_eq!(
            described.body["key_info"][field], describe_example["key_info"][field],
            "{field}"
        );
    }
    assert_eq!(
        described.body["key_info"]["creation_date"]
            .as_str()
            .unwrap()
            .len(),
        13,
        "milliseconds"
    );

    let listed = h
        .kms("list-keys", example(r#"{ "limit": "2", "marker": "1" }"#))
        .await;
    let list_example = example(
        r#"{
          "keys": ["0d0466b0-e727-4d9c-b35d-f84bb474a37f", "2e258389-bb1e-4568-a1d5-e1f50adf70ea"],
          "key_details": [{"key_id":"0d0466b0-e727-4d9c-b35d-f84bb474a37f", "domain_id":"00074811d5c27c4f8d48bb91e4a1dcfd",
              "key_alias":"caseuirpr", "realm":"aaaa", "key_description":"123", "creation_date":"1502799822000",
              "scheduled_deletion_date":"", "key_state":"2", "default_key_flag":"0", "key_type":"1",
              "expiration_time":"1501578672000", "origin":"kms"}],
          "next_marker": "",
          "truncated": "false",
          "total":2
      }"#,
    );
    assert_shape(
        &listed.body,
        &list_example,
        &["key_spec", "key_usage"],
        "list-keys",
    );
    assert_eq!(listed.body["keys"].as_array().unwrap().len(), 2);
    assert_eq!(
        listed.body["total"], 4,
        "two Default Master Keys and two customer keys"
    );
    assert_eq!(
        (
            listed.body["truncated"].as_str(),
            listed.body["next_marker"].as_str()
        ),
        (Some("true"), Some("3"))
    );

    let disable = h
        .kms(
            "disable-key",
            example(r#"{ "key_id": "0d0466b0-e727-4d9c-b35d-f84bb474a37f" }"#),
        )
        .await;
    assert_eq!(
        disable.body,
        example(
            r#"{ "key_info": { "key_id": "0d0466b0-e727-4d9c-b35d-f84bb474a37f", "key_state": "3" } }"#
        )
    );
    let enable = h
        .kms(
            "enable-key",
            example(r#"{ "key_id": "0d0466b0-e727-4d9c-b35d-f84bb474a37f" }"#),
        )
        .await;
    assert_eq!(
        enable.body,
        example(
            r#"{ "key_info": { "key_id": "0d0466b0-e727-4d9c-b35d-f84bb474a37f", "key_state": "2" } }"#
        )
    );
    let schedule = h
        .kms(
            "schedule-key-deletion",
            example(r#"{ "key_id": "0d0466b0-e727-4d9c-b35d-f84bb474a37f", "pending_days": "7" }"#),
        )
        .await;
    assert_eq!(
        schedule.body,
        example(r#"{ "key_id": "0d0466b0-e727-4d9c-b35d-f84bb474a37f", "key_state": "4" }"#)
    );
    let cancel = h
        .kms(
            "cancel-key-deletion",
            example(r#"{ "key_id": "0d0466b0-e727-4d9c-b35d-f84bb474a37f" }"#),
        )
        .await;
    assert_eq!(
        cancel.body,
        example(r#"{ "key_id": "0d0466b0-e727-4d9c-b35d-f84bb474a37f", "key_state": "3" }"#)
    );

    let quotas = h
        .send(
            h.http
                .get(h.kms_url("user-quotas"))
                .header("X-Auth-Token", &h.token),
        )
        .await;
    assert_shape(
        &quotas.body,
        &example(
            r#"{"quotas": {"resources": [{"type": "CMK", "used": 15, "quota": 20}, {"type": "grant_per_CMK", "used": 15, "quota": 100}]}}"#,
        ),
        &[],
        "user-quotas",
    );
    assert_eq!(
        quotas.body["quotas"]["resources"][0],
        json!({"type": "CMK", "used": 2, "quota": 100})
    );

    let missing = h
        .kms("describe-key", json!({"key_id": "alias/absent"}))
        .await;
    assert_shape(&missing.body, &example(ERROR_EXAMPLE), &[], "error");
    h.shutdown().await;
}

const SEED_CREATE_GRANT_REQUEST: &str = r#"{      
        "key_id": "bb6a3d22-dc93-47ac-b5bd-88df7ad35f1e",
        "operations": [
           "describe-key",
           "create-datakey",
           "encrypt-datakey"
         ],
         "grantee_principal":"13gg44z4g2sglzk0egw0u726zoyzvrs8",
         "name":"my_grant",
         "retiring_principal":"13gg44z4g2sglzk0egw0u726zoyzvrs8"
    }"#;

const SEED_LIST_GRANTS_RESPONSE: &str = r#"{
        "grants": [
         {"key_id": "bb6a3d22-dc93-47ac-b5bd-88df7ad35f1e",
          "grant_id": "7c9a3286af4fcca5f0a385ad13e1d21a50e27b6dbcab50f37f30f93b8939827d",
          "operations": 
          ["describe-key","create-datakey", "encrypt-datakey"],
          "grantee_principal":"13gg44z4g2sglzk0egw0u726zoyzvrs8",
          "retiring_principal":"13gg44z4g2sglzk0egw0u726zoyzvrs8",
          "issuing_principal":"e4hkeeea506ex3wgnzyhi656n8hx8xa3",
          "name":"my_grant",
          "creation_date":"1497341531000",
          }],
        "next_marker": "",
        "truncated": "false",
        "total":1
    }"#;

/// The example of "Changing the Alias of a CMK" (kms_02_0026, `POST .../kms/update-key-alias`),
/// from the Open Telekom Cloud API reference; the answer is exactly the example response.
#[tokio::test]
async fn update_key_alias_example_of_the_reference_page_reproduces() {
    let h = Harness::start().await;
    h.emulator
        .admin()
        .create_key(NewKey {
            key_alias: "before".into(),
            key_id: Some("bb6a3d22-dc93-47ac-b5bd-88df7ad35f1e".into()),
            ..Default::default()
        })
        .unwrap();
    let updated = h
        .kms(
            "update-key-alias",
            example(
                r#"{
                    "key_alias": "test",
                    "key_id": "bb6a3d22-dc93-47ac-b5bd-88df7ad35f1e"
                }"#,
            ),
        )
        .await;
    assert_eq!(updated.status, StatusCode::OK, "{:?}", updated.body);
    assert_eq!(
        updated.body,
        example(
            r#"{
                "key_info": {
                    "key_id": "bb6a3d22-dc93-47ac-b5bd-88df7ad35f1e",
                    "key_alias": "test"
                 }
            }"#
        )
    );
    let described = h.kms("describe-key", json!({"key_id": "alias/test"})).await;
    assert_eq!(
        described.body["key_info"]["key_id"],
        "bb6a3d22-dc93-47ac-b5bd-88df7ad35f1e"
    );
    h.shutdown().await;
}

#[tokio::test]
async fn grant_examples_of_the_seed_and_reference_pages_reproduce() {
    let h = Harness::start().await;
    let admin = h.emulator.admin();
    let key_id = "bb6a3d22-dc93-47ac-b5bd-88df7ad35f1e";
    admin
        .create_key(NewKey {
            key_alias: "seed-key".into(),
            key_id: Some(key_id.into()),
            ..Default::default()
        })
        .unwrap();

    let created = h
        .kms("create-grant", example(SEED_CREATE_GRANT_REQUEST))
        .await;
    assert_eq!(created.status, StatusCode::OK);
    assert_shape(
        &created.body,
        &example(
            r#"{ "grant_id": "7c9a3286af4fcca5f0a385ad13e1d21a50e27b6dbcab50f37f30f93b8939827d" }"#,
        ),
        &[],
        "create-grant",
    );
    let grant_id = created.body["grant_id"].as_str().unwrap().to_owned();

    // The page's request names another key than its response; we ask for the key we granted on.
    let listed = h
        .kms(
            "list-grants",
            json!({"key_id": key_id, "limit": "", "marker": ""}),
        )
        .await;
    let expected = example(SEED_LIST_GRANTS_RESPONSE);
    assert_shape(
        &listed.body,
        &expected,
        &["grantee_principal_type"],
        "list-grants",
    );
    let (grant, sample) = (&listed.body["grants"][0], &expected["grants"][0]);
    for field in ["key_id", "grantee_principal", "retiring_principal", "name"] {
        assert_eq!(grant[field], sample[field], "{field}");
    }
    let mut operations: Vec<&str> = grant["operations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_str().unwrap())
        .collect();
    operations.sort();
    assert_eq!(
        operations,
        ["create-datakey", "describe-key", "encrypt-datakey"]
    );
    for field in ["next_marker", "truncated", "total"] {
        assert_eq!(listed.body[field], expected[field], "{field}");
    }

    let retirer = admin.add_user(NewUser {
        name: "retirer".into(),
        password: "pw".into(),
        user_id: Some("13gg44z4g2sglzk0egw0u726zoyzvrs8".into()),
        access_key: None,
        secret_key: None,
    });
    let (retirer_token, _) =
        admin.issue_token(&retirer.user_id, TokenScope::Project(h.project_id()), 3600);
    let retirable = h
        .kms_with_token(
            &retirer_token,
            "list-retirable-grants",
            example(r#"{ "limit": "", "marker": "" }"#),
        )
        .await;
    assert_shape(
        &retirable.body,
        &expected,
        &["grantee_principal_type"],
        "list-retirable-grants",
    );

    let retire = h
        .kms_with_token(
            &retirer_token,
            "retire-grant",
            json!({"key_id": key_id, "grant_id": grant_id}),
        )
        .await;
    assert_eq!(
        (retire.status, retire.body),
        (StatusCode::OK, example("{\n}"))
    );
    let again = h
        .kms("create-grant", example(SEED_CREATE_GRANT_REQUEST))
        .await;
    let revoke_request = json!({"key_id": key_id, "grant_id": again.body["grant_id"]});
    let revoke = h.kms("revoke-grant", revoke_request).await;
    assert_eq!(
        (revoke.status, revoke.body),
        (StatusCode::OK, example("{\n}"))
    );
    h.shutdown().await;
}

#[tokio::test]
async fn iam_examples_of_the_reference_pages_reproduce() {
    let h = Harness::start().await;
    let config = h.emulator.config();
    let iam = h.emulator.iam_endpoint();
    // The page's request, with the emulator's user, password and domain.
    let request = json!({"auth": {"identity": {"methods": ["password"], "password": {"user": {
        "name": config.username, "password": config.password.as_str(), "domain": {"name": config.domain_name}}}},
        "scope": {"domain": {"name": config.domain_name}}}});
    let token = h
        .send(h.http.post(format!("{iam}/auth/tokens")).json(&request))
        .await;
    assert_eq!(token.status, StatusCode::CREATED);
    let token_example = example(
        r#"{
        "token" : {
          "methods" : ["password"],
          "expires_at" : "2015-11-09T01:42:57.527363Z",
          "issued_at" : "2015-11-09T00:42:57.527404Z",
          "user" : {
            "domain" : {
            "id" : "ded485def148s4e7d2se41d5se...",
            "name" : "domain A"
            },
            "id" : "ee4dfb6e5540447cb37419051...",
            "name" : "user A",
            "password_expires_at":"2016-11-06T15:32:17.000000",
          },
          "domain" : {
             "name" : "domain A",
             "id" : "dod4ed5e8d4e8d2e8e8d5d2d..."
          },
          "catalog": [{
              "type": "identity",
              "id": "1331e5cff2a74d76b03da12259...",
              "name": "iam",
              "endpoints": [{
                  "url": "https://sample.domain.com/v3",
                  "region": "*",
                  "region_id": "*",
                 "interface": "public",
                   "id": "089d4a381d574308a703122d3a..."
             }]
          }],
          "roles" : [{
             "name" : "role1",
             "id" : "roleid1"
             }, {
             "name" : "role2",
             "id" : "roleid2"
             }
        ]
        }
      }"#,
    );
    assert_shape(&token.body, &token_example, &[], "token");

    let projects = h
        .send(
            h.http
                .get(format!(
                    "{iam}/projects?domain_id={}&name={}",
                    config.domain_id, config.project_name
                ))
                .header("X-Auth-Token", &h.token),
        )
        .await;
    let projects_example = example(
        r#"{
        "links": {
          "self": "https://sample.domain.com/v3/projects?domain_id=c9f5525d9d24c5bbf91e74d86772029&name=region_name",
          "previous": null,
          "next": null
        },
        "projects": [
          {
            "is_domain": false,
            "description": "",
            "links": {
              "self": "https://sample.domain.com/v3/projects/e86737682ab64b2490c48f08bcc41914"
            },
            "enabled": true,
            "id": "e86737682ab64b2490c48f08bcc41914",
            "parent_id": "c9f5525d9d24c5bbf91e74d86772029",
            "domain_id": "c9f5525d9d24c5bbf91e74d86772029",
            "name": "region_name"
          }
        ]
      }"#,
    );
    assert_shape(&projects.body, &projects_example, &[], "projects");

    let domains = h
        .send(
            h.http
                .get(format!("{iam}/auth/domains"))
                .header("X-Auth-Token", &h.token),
        )
        .await;
    let domains_example = example(
        r#"{
          "domains": [{
              "description": "desc of domain",
              "enabled": true,
              "id": "37ef61",
              "links": {
                  "self": "https://sample.domain.com/v3/domains/37ef61"
              },
              "name": "my domain"
          }],
          "links": {
              "self": "https://sample.domain.com/v3/auth/domains",
              "previous": null,
              "next": null
          }
      }"#,
    );
    assert_shape(&domains.body, &domains_example, &[], "domains");

    let catalog = h
        .send(
            h.http
                .get(format!("{iam}/auth/catalog"))
                .header("X-Auth-Token", &h.token),
        )
        .await;
    let catalog_example = example(
        r#"{
     "catalog": [
       {
         "endpoints": [
           {
             "region_id": null,
             "url": "https://sample.domain.com/v2/c972a59e958e407e89b0c6d8e522df3b",
             "region": null,
             "interface": "public",
             "id": "04f0ee42038447f0a9c7b407028fd7b9"
           }
         ],
         "type": "compute",
         "id": "eb884e9f64b44dd0ac73cdc55d817286",
         "name": "nova"
       }
     ],
     "links": {
       "self": "https://sample.domain.com/v3/auth/catalog"
     }
   }"#,
    );
    assert_shape(&catalog.body, &catalog_example, &[], "catalog");
    h.shutdown().await;
}
