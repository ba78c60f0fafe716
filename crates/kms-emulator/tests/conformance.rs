//! The conformance table: each case a request and the HTTP status and `error_code` the
//! documented service answers (shared/design/kms-api.md, the reference error table).
mod support;

use kms_emulator::{KeyState, NewKey, NewUser, TokenScope};
use reqwest::StatusCode;
use serde_json::{Value, json};
use support::{GRANTEE, Harness, ToSign, Variant, default_key_id};

/// How a case authenticates.
#[derive(Clone, Copy, Debug)]
enum Auth {
    Token,
    None,
    UnknownToken,
    ExpiredToken,
    DomainToken,
    /// A token of another user, who neither created the key nor holds any grant.
    StrangerToken,
    /// The default user's token, against another project in the URL.
    TokenOtherProject,
    SignedHuawei,
    SignedOtc,
    SignedOtherProject,
    BadSignature,
    /// X-Sdk-Date 16 minutes in the past.
    Skewed,
    MissingDate,
}

struct Case {
    name: &'static str,
    method: &'static str,
    action: &'static str,
    /// `{K}` enabled key, `{K2}` another enabled key, `{D}` disabled, `{PD}` pending deletion,
    /// `{DK}` Default Master Key, `{FULL}` key at its grant quota, `{G}` a grant on K,
    /// `{G2}` a grant on K2, `{NOKEY}` / `{NOGRANT}` well-formed but unknown, `{HUGE}` 1 MiB + 1.
    body: &'static str,
    auth: Auth,
    status: u16,
    code: Option<&'static str>,
}

const fn case(
    name: &'static str,
    action: &'static str,
    body: &'static str,
    status: u16,
    code: Option<&'static str>,
) -> Case {
    Case {
        name,
        method: "POST",
        action,
        body,
        auth: Auth::Token,
        status,
        code,
    }
}

const fn authed(name: &'static str, auth: Auth, status: u16, code: Option<&'static str>) -> Case {
    Case {
        name,
        method: "POST",
        action: "list-grants",
        body: r#"{"key_id":"{K}"}"#,
        auth,
        status,
        code,
    }
}

const OPS: &str = r#""operations":["describe-key","create-datakey"]"#;

fn cases() -> Vec<Case> {
    let g = |name, body, status, code| case(name, "create-grant", body, status, code);
    vec![
        // create-grant validation
        g(
            "create-grant succeeds",
            r#"{"key_id":"{K}","grantee_principal":"abc123",OPS}"#,
            200,
            None,
        ),
        g("body is not JSON", "{not json", 400, Some("KMS.0202")),
        g("body is a JSON array", "[1,2]", 400, Some("KMS.0202")),
        g(
            "key_id missing",
            r#"{"grantee_principal":"abc123",OPS}"#,
            400,
            Some("KMS.0204"),
        ),
        g(
            "key_id empty",
            r#"{"key_id":"","grantee_principal":"abc123",OPS}"#,
            400,
            Some("KMS.0204"),
        ),
        g(
            "grantee missing",
            r#"{"key_id":"{K}",OPS}"#,
            400,
            Some("KMS.0204"),
        ),
        g(
            "operations missing",
            r#"{"key_id":"{K}","grantee_principal":"abc123"}"#,
            400,
            Some("KMS.0204"),
        ),
        g(
            "operations empty",
            r#"{"key_id":"{K}","grantee_principal":"abc123","operations":[]}"#,
            400,
            Some("KMS.0204"),
        ),
        g(
            "key_id malformed",
            r#"{"key_id":"not-a-key","grantee_principal":"abc123",OPS}"#,
            400,
            Some("KMS.0205"),
        ),
        g(
            "key_id upper case",
            r#"{"key_id":"0D0466B0-E727-4D9C-B35D-F84BB474A37F","grantee_principal":"abc123",OPS}"#,
            400,
            Some("KMS.0205"),
        ),
        g(
            "key_id not a string",
            r#"{"key_id":7,"grantee_principal":"abc123",OPS}"#,
            400,
            Some("KMS.0308"),
        ),
        g(
            "grantee with a dash",
            r#"{"key_id":"{K}","grantee_principal":"abc-123",OPS}"#,
            400,
            Some("KMS.2402"),
        ),
        g(
            "grantee of 65 characters",
            r#"{"key_id":"{K}","grantee_principal":"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",OPS}"#,
            400,
            Some("KMS.2402"),
        ),
        g(
            "retiring principal invalid",
            r#"{"key_id":"{K}","grantee_principal":"abc123","retiring_principal":"a b",OPS}"#,
            400,
            Some("KMS.2402"),
        ),
        g(
            "create-grant alone",
            r#"{"key_id":"{K}","grantee_principal":"abc123","operations":["create-grant"]}"#,
            400,
            Some("KMS.2401"),
        ),
        g(
            "unknown operation",
            r#"{"key_id":"{K}","grantee_principal":"abc123","operations":["describe-key","fly"]}"#,
            400,
            Some("KMS.0308"),
        ),
        g(
            "operations not an array",
            r#"{"key_id":"{K}","grantee_principal":"abc123","operations":"describe-key"}"#,
            400,
            Some("KMS.0308"),
        ),
        g(
            "name with a space",
            r#"{"key_id":"{K}","grantee_principal":"abc123","name":"my grant",OPS}"#,
            400,
            Some("KMS.0308"),
        ),
        g(
            "grantee_principal_type group",
            r#"{"key_id":"{K}","grantee_principal":"abc123","grantee_principal_type":"group",OPS}"#,
            400,
            Some("KMS.0308"),
        ),
        g(
            "grantee_principal_type domain",
            r#"{"key_id":"{K}","grantee_principal":"abc123","grantee_principal_type":"domain",OPS}"#,
            200,
            None,
        ),
        g(
            "sequence of 35 characters",
            r#"{"key_id":"{K}","grantee_principal":"abc123","sequence":"919c82d4-8046-4722-9094-35c3c6524cf",OPS}"#,
            400,
            Some("KMS.0206"),
        ),
        g(
            "sequence of 36 characters",
            r#"{"key_id":"{K}","grantee_principal":"abc123","sequence":"919c82d4-8046-4722-9094-35c3c6524cff",OPS}"#,
            200,
            None,
        ),
        g(
            "unknown key",
            r#"{"key_id":"{NOKEY}","grantee_principal":"abc123",OPS}"#,
            404,
            Some("KMS.0207"),
        ),
        g(
            "Default Master Key refuses grants",
            r#"{"key_id":"{DK}","grantee_principal":"abc123",OPS}"#,
            400,
            Some("KMS.0211"),
        ),
        g(
            "disabled key",
            r#"{"key_id":"{D}","grantee_principal":"abc123",OPS}"#,
            400,
            Some("KMS.0209"),
        ),
        g(
            "key pending deletion",
            r#"{"key_id":"{PD}","grantee_principal":"abc123",OPS}"#,
            400,
            Some("KMS.0210"),
        ),
        g(
            "key at its grant quota",
            r#"{"key_id":"{FULL}","grantee_principal":"abc123",OPS}"#,
            400,
            Some("KMS.2404"),
        ),
        // list-grants
        case(
            "list-grants with limit as a number",
            "list-grants",
            r#"{"key_id":"{K}","limit":5}"#,
            200,
            None,
        ),
        case(
            "list-grants with empty limit and marker",
            "list-grants",
            r#"{"key_id":"{K}","limit":"","marker":""}"#,
            200,
            None,
        ),
        case(
            "limit 0",
            "list-grants",
            r#"{"key_id":"{K}","limit":"0"}"#,
            400,
            Some("KMS.1601"),
        ),
        case(
            "limit 101",
            "list-grants",
            r#"{"key_id":"{K}","limit":"101"}"#,
            400,
            Some("KMS.1601"),
        ),
        case(
            "limit not a number",
            "list-grants",
            r#"{"key_id":"{K}","limit":"ten"}"#,
            400,
            Some("KMS.1601"),
        ),
        case(
            "negative marker",
            "list-grants",
            r#"{"key_id":"{K}","marker":"-1"}"#,
            400,
            Some("KMS.1602"),
        ),
        case(
            "marker not a number",
            "list-grants",
            r#"{"key_id":"{K}","marker":"abc"}"#,
            400,
            Some("KMS.1602"),
        ),
        case(
            "marker past the end",
            "list-grants",
            r#"{"key_id":"{K}","marker":"5000"}"#,
            200,
            None,
        ),
        case(
            "list-grants without key_id",
            "list-grants",
            r#"{"limit":"10"}"#,
            400,
            Some("KMS.0204"),
        ),
        case(
            "list-grants of an unknown key",
            "list-grants",
            r#"{"key_id":"{NOKEY}"}"#,
            404,
            Some("KMS.0207"),
        ),
        case(
            "list-grants of a disabled key",
            "list-grants",
            r#"{"key_id":"{D}"}"#,
            200,
            None,
        ),
        // revoke / retire
        case(
            "revoke without grant_id",
            "revoke-grant",
            r#"{"key_id":"{K}"}"#,
            400,
            Some("KMS.0204"),
        ),
        case(
            "revoke a malformed grant_id",
            "revoke-grant",
            r#"{"key_id":"{K}","grant_id":"xyz"}"#,
            400,
            Some("KMS.2501"),
        ),
        case(
            "revoke an unknown grant",
            "revoke-grant",
            r#"{"key_id":"{K}","grant_id":"{NOGRANT}"}"#,
            400,
            Some("KMS.2501"),
        ),
        case(
            "revoke a grant of another key",
            "revoke-grant",
            r#"{"key_id":"{K}","grant_id":"{G2}"}"#,
            400,
            Some("KMS.2502"),
        ),
        case(
            "revoke on an unknown key",
            "revoke-grant",
            r#"{"key_id":"{NOKEY}","grant_id":"{G}"}"#,
            404,
            Some("KMS.0207"),
        ),
        case(
            "revoke on a Default Master Key",
            "revoke-grant",
            r#"{"key_id":"{DK}","grant_id":"{G}"}"#,
            400,
            Some("KMS.0211"),
        ),
        Case {
            auth: Auth::StrangerToken,
            ..case(
                "revoke by someone not the key's creator",
                "revoke-grant",
                r#"{"key_id":"{K}","grant_id":"{G}"}"#,
                403,
                Some("KMS.0306"),
            )
        },
        Case {
            auth: Auth::StrangerToken,
            ..case(
                "retire by someone without permission",
                "retire-grant",
                r#"{"key_id":"{K}","grant_id":"{G}"}"#,
                403,
                Some("KMS.0306"),
            )
        },
        case(
            "retire a grant of another key",
            "retire-grant",
            r#"{"key_id":"{K}","grant_id":"{G2}"}"#,
            400,
            Some("KMS.2502"),
        ),
        // keys
        case(
            "create-key with an alias ending /default",
            "create-key",
            r#"{"key_alias":"obs/default"}"#,
            400,
            Some("KMS.1101"),
        ),
        case(
            "create-key with an alias with a space",
            "create-key",
            r#"{"key_alias":"a b"}"#,
            400,
            Some("KMS.1101"),
        ),
        case(
            "create-key with a taken alias",
            "create-key",
            r#"{"key_alias":"conformance-k"}"#,
            400,
            Some("KMS.1104"),
        ),
        case(
            "create-key with an unknown key_spec",
            "create-key",
            r#"{"key_alias":"x1","key_spec":"DES"}"#,
            400,
            Some("KMS.0308"),
        ),
        case(
            "create-key without alias",
            "create-key",
            r#"{}"#,
            400,
            Some("KMS.0204"),
        ),
        case(
            "enable an enabled key",
            "enable-key",
            r#"{"key_id":"{K}"}"#,
            400,
            Some("KMS.1201"),
        ),
        case(
            "disable a disabled key",
            "disable-key",
            r#"{"key_id":"{D}"}"#,
            400,
            Some("KMS.1301"),
        ),
        case(
            "disable a Default Master Key",
            "disable-key",
            r#"{"key_id":"{DK}"}"#,
            400,
            Some("KMS.0211"),
        ),
        case(
            "enable a key pending deletion",
            "enable-key",
            r#"{"key_id":"{PD}"}"#,
            400,
            Some("KMS.0210"),
        ),
        case(
            "schedule deletion in 6 days",
            "schedule-key-deletion",
            r#"{"key_id":"{K}","pending_days":"6"}"#,
            400,
            Some("KMS.1401"),
        ),
        case(
            "schedule deletion in 1097 days",
            "schedule-key-deletion",
            r#"{"key_id":"{K}","pending_days":"1097"}"#,
            400,
            Some("KMS.1401"),
        ),
        case(
            "schedule deletion without pending_days",
            "schedule-key-deletion",
            r#"{"key_id":"{K}"}"#,
            400,
            Some("KMS.0204"),
        ),
        case(
            "schedule deletion twice",
            "schedule-key-deletion",
            r#"{"key_id":"{PD}","pending_days":"7"}"#,
            400,
            Some("KMS.1402"),
        ),
        case(
            "cancel deletion of a key not pending",
            "cancel-key-deletion",
            r#"{"key_id":"{K}"}"#,
            400,
            Some("KMS.1501"),
        ),
        // update-key-alias (kms_02_0026)
        case(
            "update-key-alias succeeds",
            "update-key-alias",
            r#"{"key_id":"{D}","key_alias":"conformance-renamed"}"#,
            200,
            None,
        ),
        case(
            "update-key-alias without key_id",
            "update-key-alias",
            r#"{"key_alias":"conformance-x"}"#,
            400,
            Some("KMS.0204"),
        ),
        case(
            "update-key-alias with a malformed key_id",
            "update-key-alias",
            r#"{"key_id":"alias/conformance-k","key_alias":"conformance-x"}"#,
            400,
            Some("KMS.0205"),
        ),
        case(
            "update-key-alias without key_alias",
            "update-key-alias",
            r#"{"key_id":"{K}"}"#,
            400,
            Some("KMS.0204"),
        ),
        case(
            "update-key-alias to an alias ending /default",
            "update-key-alias",
            r#"{"key_id":"{K}","key_alias":"app/default"}"#,
            400,
            Some("KMS.1101"),
        ),
        case(
            "update-key-alias to an alias with a space",
            "update-key-alias",
            r#"{"key_id":"{K}","key_alias":"a b"}"#,
            400,
            Some("KMS.1101"),
        ),
        case(
            "update-key-alias to another key's alias",
            "update-key-alias",
            r#"{"key_id":"{K}","key_alias":"conformance-k2"}"#,
            400,
            Some("KMS.1104"),
        ),
        case(
            "update-key-alias of an unknown key",
            "update-key-alias",
            r#"{"key_id":"{NOKEY}","key_alias":"conformance-x"}"#,
            404,
            Some("KMS.0207"),
        ),
        case(
            "update-key-alias of a Default Master Key",
            "update-key-alias",
            r#"{"key_id":"{DK}","key_alias":"conformance-x"}"#,
            400,
            Some("KMS.0211"),
        ),
        case(
            "update-key-alias of a key pending deletion",
            "update-key-alias",
            r#"{"key_id":"{PD}","key_alias":"conformance-x"}"#,
            400,
            Some("KMS.0210"),
        ),
        case(
            "update-key-alias with a bad sequence",
            "update-key-alias",
            r#"{"key_id":"{K}","key_alias":"conformance-x","sequence":"short"}"#,
            400,
            Some("KMS.0206"),
        ),
        Case {
            method: "GET",
            ..case(
                "update-key-alias by GET",
                "update-key-alias",
                "",
                405,
                Some("KMS.0215"),
            )
        },
        case(
            "describe an unknown alias",
            "describe-key",
            r#"{"key_id":"alias/nothing-here"}"#,
            404,
            Some("KMS.0207"),
        ),
        case(
            "describe by alias",
            "describe-key",
            r#"{"key_id":"alias/conformance-k"}"#,
            200,
            None,
        ),
        case(
            "describe a malformed key ID",
            "describe-key",
            r#"{"key_id":"1234"}"#,
            400,
            Some("KMS.0205"),
        ),
        case(
            "list-keys with key_state 9",
            "list-keys",
            r#"{"key_state":"9"}"#,
            400,
            Some("KMS.0308"),
        ),
        case(
            "list-keys with limit 0",
            "list-keys",
            r#"{"limit":"0"}"#,
            400,
            Some("KMS.1601"),
        ),
        // methods and URLs
        Case {
            method: "GET",
            ..case(
                "GET on create-grant",
                "create-grant",
                "",
                405,
                Some("KMS.0215"),
            )
        },
        Case {
            method: "GET",
            ..case("GET user-quotas", "user-quotas", "", 200, None)
        },
        case(
            "POST on user-quotas",
            "user-quotas",
            "{}",
            405,
            Some("KMS.0215"),
        ),
        case("unknown action", "make-coffee", "{}", 400, Some("KMS.0201")),
        case(
            "a body over 1 MiB",
            "create-key",
            r#"{"key_alias":"{HUGE}"}"#,
            400,
            Some("KMS.0203"),
        ),
        // authentication
        authed(
            "no token and no signature",
            Auth::None,
            403,
            Some("KMS.0301"),
        ),
        authed("unknown token", Auth::UnknownToken, 403, Some("KMS.0302")),
        authed("expired token", Auth::ExpiredToken, 403, Some("KMS.0303")),
        authed(
            "domain-scoped token",
            Auth::DomainToken,
            403,
            Some("KMS.0305"),
        ),
        authed(
            "token of another project than the URL",
            Auth::TokenOtherProject,
            403,
            Some("KMS.0321"),
        ),
        authed("signature, Huawei variant", Auth::SignedHuawei, 200, None),
        authed(
            "signature, Open Telekom Cloud variant",
            Auth::SignedOtc,
            200,
            None,
        ),
        authed(
            "signature for another project than the URL",
            Auth::SignedOtherProject,
            403,
            Some("KMS.0321"),
        ),
        authed("bad signature", Auth::BadSignature, 401, Some("APIGW.0301")),
        authed(
            "clock skew of 16 minutes",
            Auth::Skewed,
            401,
            Some("APIGW.0303"),
        ),
        authed(
            "signature without X-Sdk-Date",
            Auth::MissingDate,
            401,
            Some("APIGW.0301"),
        ),
    ]
}

struct World {
    replacements: Vec<(&'static str, String)>,
    stranger_token: String,
    expired_token: String,
    domain_token: String,
}

async fn build_world(h: &Harness) -> World {
    let k = h.create_key("conformance-k").await;
    let k2 = h.create_key("conformance-k2").await;
    let d = h.create_key("conformance-d").await;
    assert_eq!(
        h.kms("disable-key", json!({"key_id": d})).await.status,
        StatusCode::OK
    );
    let pd = h.create_key("conformance-pd").await;
    let scheduled = h
        .kms(
            "schedule-key-deletion",
            json!({"key_id": pd, "pending_days": "7"}),
        )
        .await;
    assert_eq!(scheduled.body["key_state"], "4");
    let full = h.create_key("conformance-full").await;
    for _ in 0..h.emulator.config().grants_per_key {
        h.create_grant(&full).await;
    }
    let g = h.create_grant(&k).await;
    let g2 = h.create_grant(&k2).await;
    let admin = h.emulator.admin();
    let stranger = admin.add_user(NewUser {
        name: "stranger".into(),
        password: "stranger-password".into(),
        user_id: None,
        access_key: None,
        secret_key: None,
    });
    let project = TokenScope::Project(h.project_id());
    let (stranger_token, _) = admin.issue_token(&stranger.user_id, project.clone(), 3600);
    let user_id = h.emulator.config().user_id.clone();
    let (expired_token, _) = admin.issue_token(&user_id, project, 0);
    let domain_token = h
        .password_token(json!({"domain": {"name": h.emulator.config().domain_name}}))
        .await;
    World {
        replacements: vec![
            ("{K}", k),
            ("{K2}", k2),
            ("{D}", d),
            ("{PD}", pd),
            ("{DK}", default_key_id(&h.emulator, "obs/default")),
            ("{FULL}", full),
            ("{G2}", g2),
            ("{G}", g),
            ("{NOKEY}", "0d0466b0-e727-4d9c-b35d-f84bb474a37f".into()),
            (
                "{NOGRANT}",
                "7c9a3286af4fcca5f0a385ad13e1d21a50e27b6dbcab50f37f30f93b8939827d".into(),
            ),
            ("OPS", OPS.into()),
            ("{HUGE}", "a".repeat((1 << 20) + 1)),
        ],
        stranger_token,
        expired_token,
        domain_token,
    }
}

async fn run_case(h: &Harness, world: &World, case: &Case) -> (StatusCode, Option<String>, Value) {
    let mut body = case.body.to_owned();
    for (placeholder, value) in &world.replacements {
        body = body.replace(placeholder, value);
    }
    let config = h.emulator.config();
    let mut project = h.project_id();
    if matches!(
        case.auth,
        Auth::TokenOtherProject | Auth::SignedOtherProject
    ) {
        project = "ffffffffffffffffffffffffffffffff".into();
    }
    let path = format!("/v1.0/{project}/kms/{}", case.action);
    let url = format!("{}{path}", h.emulator.base_url());
    let method = reqwest::Method::from_bytes(case.method.as_bytes()).unwrap();
    let mut request = h
        .http
        .request(method, &url)
        .header("content-type", "application/json")
        .body(body.clone());
    let token = match case.auth {
        Auth::Token | Auth::TokenOtherProject => Some(h.token.clone()),
        Auth::UnknownToken => Some("MIInotatoken".into()),
        Auth::ExpiredToken => Some(world.expired_token.clone()),
        Auth::DomainToken => Some(world.domain_token.clone()),
        Auth::StrangerToken => Some(world.stranger_token.clone()),
        _ => None,
    };
    if let Some(token) = token {
        request = request.header("X-Auth-Token", token);
    }
    let host = h.emulator.addr().to_string();
    let to_sign = ToSign {
        method: case.method,
        path: &path,
        query: "",
        headers: &[("host", &host), ("content-type", "application/json")],
        body: body.as_bytes(),
    };
    let secret = config.secret_key.as_str();
    let otc = Variant::Otc {
        region: config.region.clone(),
        service: "kms".into(),
    };
    let huawei = Variant::Huawei;
    let signed = match case.auth {
        Auth::SignedHuawei | Auth::SignedOtherProject => Some(h.sign(&huawei, &to_sign)),
        Auth::SignedOtc => Some(h.sign(&otc, &to_sign)),
        Auth::BadSignature => Some(h.sign_with(&huawei, "wrong-secret", 0, &to_sign)),
        Auth::Skewed => Some(h.sign_with(&huawei, secret, -960, &to_sign)),
        Auth::MissingDate => {
            // Signed over a date the request does not carry.
            let signature = h.sign(&huawei, &to_sign);
            request = request.header("authorization", signature.authorization);
            None
        }
        _ => None,
    };
    if let Some(signature) = signed {
        request = signature.apply(request);
    }
    let answer = h.send(request).await;
    let code = answer.error_code().map(str::to_owned);
    (answer.status, code, answer.body)
}

#[tokio::test]
async fn every_conformance_case_answers_the_documented_status_and_error_code() {
    let h = Harness::start().await;
    let world = build_world(&h).await;
    let cases = cases();
    assert!(cases.len() >= 40, "the table has {} cases", cases.len());
    let mut failures = Vec::new();
    for case in &cases {
        let (status, code, body) = run_case(&h, &world, case).await;
        if status.as_u16() != case.status || code.as_deref() != case.code {
            failures.push(format!(
                "{}: expected {} {:?}, got {} {:?} {body}",
                case.name,
                case.status,
                case.code,
                status.as_u16(),
                code
            ));
        }
        if let Some(code) = case.code {
            let flat = code.starts_with("APIG");
            let shape_ok = if flat {
                body["error_msg"].is_string() && body["request_id"].is_string()
            } else {
                body["error"]["error_msg"].is_string()
            };
            if !shape_ok {
                failures.push(format!(
                    "{}: error body has the wrong shape: {body}",
                    case.name
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    h.shutdown().await;
}

#[tokio::test]
async fn admin_created_keys_follow_the_same_rules_as_api_created_ones() {
    let h = Harness::start().await;
    let admin = h.emulator.admin();
    let key = admin
        .create_key(NewKey {
            key_alias: "made-by-admin".into(),
            key_id: Some("0d0466b0-e727-4d9c-b35d-f84bb474a37f".into()),
            creator: Some("someoneelse".into()),
            key_state: Some("3".into()),
            default_key: false,
        })
        .unwrap();
    let grant =
        json!({"key_id": key.key_id, "grantee_principal": GRANTEE, "operations": ["describe-key"]});
    assert_eq!(
        h.kms("create-grant", grant.clone()).await.error_code(),
        Some("KMS.0209")
    );
    admin.set_key_state(&key.key_id, KeyState::Enabled).unwrap();
    let created = h.kms("create-grant", grant).await;
    assert_eq!(created.status, StatusCode::OK);
    let grant_id = created.body["grant_id"].as_str().unwrap();
    let revoke = h
        .kms(
            "revoke-grant",
            json!({"key_id": key.key_id, "grant_id": grant_id}),
        )
        .await;
    assert_eq!(
        revoke.error_code(),
        Some("KMS.0306"),
        "only the creator 'someoneelse' may revoke"
    );
    h.shutdown().await;
}
