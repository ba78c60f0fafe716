//! IAM federation as the IAM and CCE pages describe it: the admin steps (identity provider,
//! mapping, protocol, OpenID Connect configuration), the ID-token exchange and each documented
//! failure, scoped and unscoped tokens, temporary AK/SK, agencies. ID tokens are minted here
//! with ring: a fresh P-256 key per test (ES256) and a fixed 2048-bit test key (RS256).
mod support;

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use kms_emulator::{EmulatorConfig, NewAgency, NewUser};
use reqwest::StatusCode;
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, KeyPair, RsaKeyPair};
use serde_json::{Value, json};
use support::{Answer, Harness, ToSign, Variant};

/// A throwaway RSA key made for these tests (PKCS#8, base64); its modulus below.
const TEST_RSA_PKCS8: &str = "MIIEvgIBADANBgkqhkiG9w0BAQEFAASCBKgwggSkAgEAAoIBAQDUkD+TRF4wf3zNXcqYZjYjLdcu1fmbZija4EhAfWAI3rv2RmDS4/PHGuvrJ1wNEdaZPBe1BJUUAFb0b3frnnPwhYJcAswnhMdbtMyHDQK7FOAjwfz+LXXg+0oghHo6l3vGaqlXBQSM7dJKTh23NoAkRUhlglMJlQiIP4PgFxQyMwSgrMoEiLM8CmEhdABhFBayI9Q37VgxypHlKJ6Tn/omJSBpSzaQ46VJfhzlhCCGF0Q2jYIBp28t5pUfOGC+udM8smbBpFTPxK84ozs4GHCKsXDuoRELI+lSgcB3hzeBloSLzZDSRSVl5gDRA6DDzeVnUhJW9GktHfSgav2XDku1AgMBAAECggEAAZ+ArhrGHwKDh7GTuoesmfv/igxDYxLL35CkWe0LJsOFSxCyVxHmBTXDqjtAn5nsr1AEkf2GYjghcdgzDHcchVrjn1kRyYB2TDvhxECOw4fEhrQJvurGcmYWJLrrkFcimxB/7q9AtQ8bfV/s0qlldOwcLNLqrZFNgXV+B9/tPSKKh5oGwDkpQbISVYBSv1QoIhm9F1gllI1FORxdv1uI2hZkXX4ZjnZLSVLy3133uc54NXzMhdZ6aJpkfrm9Ly2jXKwP2EE6gh5G+gO97qfaTMfFb9yFNLPuOBNF8QhO9Pw7U1Lef+c6PzCTuN1oRHhCyH1Zl6g8C5Z4WGVwYbHvwQKBgQDt1xs0ztOjMW7jEYgMVuk4JQ+EKIsX/la6+NKHd/NxPFLiaUdpoh96WTJvUGsiIxYxhVSSmanOtBn36JWNa6wa17j7QNxuCzH6CVJvY7BPpsGJvCAxjzoD5wqVEwbA8jBm+9YPlk4/BxMqfV2cQ8JzrDFzqqb4b5fOFfHnVLvPQQKBgQDkyxMhCkS9aQm4r3PG27S3HRFQ0+B6P40FlG2GTbTeXnaRGsMwcdkknIh0bEvOHavYb/4kPdP6Yst/hjyOj2HagtrjLVtbGfHwl1oIHrHnL1ubKSV642UY9TXvbLrJtg3WgrG5BuZ+0a09LsqnwUxpoXsKhrSBEt0cFFMWnebTdQKBgA6afpkneeczSdO3Z9saGwfPfrxmoOPAQiMI1CRtQQ1a3tv4CuJ5ieVBRM+A6JMYBGzV+vNla/+9HzsRlN0yF0cup7UFroMzPMZVfDJKtLCvVILYgkGIwc8riILOwENom4A3RlV+rR9Bl/Or7uuBXZcso3yupcHrWC7XOhsyILYBAoGBAKzLEm9pqfDDW6w4FmChniKNuX4qBudNB9ym9PDxzyACh9mfNLtpwG1+KzCCed35WsfkDTSh3W7FHpv5bdLdRzIYkefxYYW0Wp0yMbTgOcw4YB8XPE9LXhczWsCwhYHCFUFlA4SSSZKOGSCULkn0GxnL83lHsxuoe4Wxc+8o4iPhAoGBAImcC0PNCxTCrKR0pscjepIMm+eH7jPagCsLt2UVvMk62Qx1s9SBEyPSpW8y1q5AHpOhLIdn6sJSeqQEDMbxLY2ItQf+l1L29zwYxnXb1mgKhXPRGcfxFUj0jxaB71IUCDiRCmfOnVuXppPXGz7CMbGd0QhH+jatWhaRK2bpOriX";
const TEST_RSA_N: &str = "1JA_k0ReMH98zV3KmGY2Iy3XLtX5m2Yo2uBIQH1gCN679kZg0uPzxxrr6ydcDRHWmTwXtQSVFABW9G93655z8IWCXALMJ4THW7TMhw0CuxTgI8H8_i114PtKIIR6Opd7xmqpVwUEjO3SSk4dtzaAJEVIZYJTCZUIiD-D4BcUMjMEoKzKBIizPAphIXQAYRQWsiPUN-1YMcqR5Siek5_6JiUgaUs2kOOlSX4c5YQghhdENo2CAadvLeaVHzhgvrnTPLJmwaRUz8SvOKM7OBhwirFw7qERCyPpUoHAd4c3gZaEi82Q0kUlZeYA0QOgw83lZ1ISVvRpLR30oGr9lw5LtQ";

const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
const CLIENT_ID: &str = "kmsgrant-client";
const IDP: &str = "workload_identity";
const SUB: &str = "system:serviceaccount:kmsgrant:operator";

enum Key {
    Es256(EcdsaKeyPair, String),
    Rs256(RsaKeyPair, String),
}

impl Key {
    fn es256(kid: &str) -> Self {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(
            &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            pkcs8.as_ref(),
            &rng,
        )
        .unwrap();
        Self::Es256(pair, kid.into())
    }

    fn rs256(kid: &str) -> Self {
        let der = STANDARD.decode(TEST_RSA_PKCS8).unwrap();
        Self::Rs256(RsaKeyPair::from_pkcs8(&der).unwrap(), kid.into())
    }

    fn jwk(&self) -> Value {
        match self {
            Self::Es256(pair, kid) => {
                let point = pair.public_key().as_ref();
                json!({"kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": kid,
                       "x": URL_SAFE_NO_PAD.encode(&point[1..33]), "y": URL_SAFE_NO_PAD.encode(&point[33..65])})
            }
            Self::Rs256(_, kid) => {
                json!({"kty": "RSA", "use": "sig", "alg": "RS256", "kid": kid, "n": TEST_RSA_N, "e": "AQAB"})
            }
        }
    }

    /// A JWT over `claims` with this key's alg and kid (or `header` as given).
    fn mint_with_header(&self, header: Value, claims: &Value) -> String {
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let rng = SystemRandom::new();
        let signature = match self {
            Self::Es256(pair, _) => pair
                .sign(&rng, signing_input.as_bytes())
                .unwrap()
                .as_ref()
                .to_vec(),
            Self::Rs256(pair, _) => {
                let mut out = vec![0; pair.public().modulus_len()];
                pair.sign(
                    &signature::RSA_PKCS1_SHA256,
                    &rng,
                    signing_input.as_bytes(),
                    &mut out,
                )
                .unwrap();
                out
            }
        };
        format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(signature))
    }

    fn mint(&self, claims: &Value) -> String {
        let (alg, kid) = match self {
            Self::Es256(_, kid) => ("ES256", kid),
            Self::Rs256(_, kid) => ("RS256", kid),
        };
        self.mint_with_header(json!({"alg": alg, "kid": kid, "typ": "JWT"}), claims)
    }
}

fn now() -> i64 {
    jiff::Timestamp::now().as_second()
}

/// The claims a kube-apiserver puts in a projected ServiceAccount token.
fn claims() -> Value {
    json!({"iss": ISSUER, "aud": [CLIENT_ID], "sub": SUB, "iat": now(), "nbf": now(), "exp": now() + 3600,
           "kubernetes.io": {"namespace": "kmsgrant", "serviceaccount": {"name": "operator"}}})
}

fn jwks(keys: &[&Key]) -> String {
    json!({"keys": keys.iter().map(|k| k.jwk()).collect::<Vec<_>>()}).to_string()
}

async fn admin_call(
    h: &Harness,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> Answer {
    let mut request = h
        .http
        .request(method, format!("{}{path}", h.emulator.base_url()))
        .header("X-Auth-Token", &h.token)
        .header("Content-Type", "application/json;charset=utf8");
    if let Some(body) = body {
        request = request.json(&body);
    }
    h.send(request).await
}

/// The documented admin steps, in the documented order, each answering its documented status.
async fn configure(h: &Harness, idp: &str, keys: &[&Key], rules: Value) {
    use reqwest::Method;
    let steps = [
        (
            Method::PUT,
            format!("/v3/OS-FEDERATION/identity_providers/{idp}"),
            json!({"identity_provider": {"sso_type": "virtual_user_sso", "enabled": true, "description": "CCE workloads"}}),
        ),
        (
            Method::PUT,
            format!("/v3/OS-FEDERATION/mappings/mapping_{idp}"),
            json!({"mapping": {"rules": rules}}),
        ),
        (
            Method::PUT,
            format!("/v3/OS-FEDERATION/identity_providers/{idp}/protocols/oidc"),
            json!({"protocol": {"mapping_id": format!("mapping_{idp}")}}),
        ),
        (
            Method::POST,
            format!("/v3.0/OS-FEDERATION/identity-providers/{idp}/openid-connect-config"),
            json!({"openid_connect_config": {"access_mode": "program", "idp_url": ISSUER, "client_id": CLIENT_ID, "signing_key": jwks(keys)}}),
        ),
    ];
    for (method, path, body) in steps {
        let answer = admin_call(h, method, &path, Some(body)).await;
        assert_eq!(
            answer.status,
            StatusCode::CREATED,
            "{path}: {:?}",
            answer.body
        );
    }
}

fn sub_rules() -> Value {
    json!([{"local": [{"user": {"name": "k8s-{0}"}}, {"group": {"name": "kms-operators"}}],
            "remote": [{"type": "sub"}, {"type": "sub", "any_one_of": [SUB]}]}])
}

async fn exchange(h: &Harness, idp: Option<&str>, jwt: &str, scope: Option<Value>) -> Answer {
    let mut auth = json!({"id_token": {"id": jwt}});
    if let Some(scope) = scope {
        auth["scope"] = scope;
    }
    let mut request = h
        .http
        .post(format!(
            "{}/v3.0/OS-AUTH/id-token/tokens",
            h.emulator.base_url()
        ))
        .header("Content-Type", "application/json;charset=utf8")
        .json(&json!({"auth": auth}));
    if let Some(idp) = idp {
        request = request.header("X-Idp-Id", idp);
    }
    h.send(request).await
}

fn project_scope(h: &Harness) -> Value {
    json!({"project": {"id": h.project_id(), "name": "eu-de"}})
}

fn subject_token(answer: &Answer) -> String {
    answer.headers["x-subject-token"]
        .to_str()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn the_admin_steps_work_verbatim_and_refuse_what_the_pages_refuse() {
    use reqwest::Method;
    let h = Harness::start().await;
    let key = Key::es256("k1");
    configure(&h, IDP, &[&key], sub_rules()).await;
    let idp = admin_call(
        &h,
        Method::GET,
        &format!("/v3/OS-FEDERATION/identity_providers/{IDP}"),
        None,
    )
    .await;
    assert_eq!(idp.body["identity_provider"]["id"], IDP);
    assert_eq!(idp.body["identity_provider"]["enabled"], true);
    assert!(
        idp.body["identity_provider"]["links"]["protocols"]
            .as_str()
            .unwrap()
            .ends_with("/protocols")
    );
    let config_path = format!("/v3.0/OS-FEDERATION/identity-providers/{IDP}/openid-connect-config");
    let read = admin_call(&h, Method::GET, &config_path, None).await;
    assert_eq!(read.status, StatusCode::OK);
    assert_eq!(read.body["openid_connect_config"]["idp_url"], ISSUER);
    let updated = admin_call(
        &h,
        Method::PUT,
        &config_path,
        Some(json!({"openid_connect_config": {"client_id": "another-client"}})),
    )
    .await;
    assert_eq!(updated.status, StatusCode::OK);
    assert_eq!(
        updated.body["openid_connect_config"]["client_id"],
        "another-client"
    );
    assert_eq!(
        updated.body["openid_connect_config"]["idp_url"], ISSUER,
        "PUT keeps fields not sent"
    );

    let refused: Vec<(Method, String, Option<Value>, u16, &str)> = vec![
        (
            Method::PUT,
            format!("/v3/OS-FEDERATION/identity_providers/{IDP}"),
            Some(json!({"identity_provider": {"enabled": true}})),
            409,
            "duplicate IdP",
        ),
        (
            Method::POST,
            config_path.clone(),
            Some(
                json!({"openid_connect_config": {"access_mode": "program", "idp_url": ISSUER, "client_id": CLIENT_ID, "signing_key": jwks(&[&key])}}),
            ),
            409,
            "second configuration",
        ),
        (
            Method::PUT,
            "/v3/OS-FEDERATION/mappings/m2".into(),
            Some(
                json!({"mapping": {"rules": [{"local": [{"user": {"name": "u"}}], "remote": [{"type": "sub", "any_one_of": ["a"], "not_any_of": ["b"]}]}]}}),
            ),
            400,
            "both conditions",
        ),
        (
            Method::PUT,
            format!("/v3/OS-FEDERATION/identity_providers/{IDP}/protocols/oidc"),
            Some(json!({"protocol": {"mapping_id": "nope"}})),
            404,
            "unknown mapping",
        ),
        (
            Method::PUT,
            "/v3/OS-FEDERATION/identity_providers/nope/protocols/oidc".into(),
            Some(json!({"protocol": {"mapping_id": format!("mapping_{IDP}")}})),
            404,
            "unknown IdP",
        ),
        (
            Method::POST,
            "/v3.0/OS-FEDERATION/identity-providers/nope/openid-connect-config".into(),
            Some(
                json!({"openid_connect_config": {"access_mode": "program", "idp_url": ISSUER, "client_id": CLIENT_ID, "signing_key": jwks(&[&key])}}),
            ),
            404,
            "config of an unknown IdP",
        ),
        (
            Method::PUT,
            config_path.clone(),
            Some(json!({"openid_connect_config": {"client_id": "abc"}})),
            400,
            "client_id under 5 characters",
        ),
        (
            Method::PUT,
            config_path.clone(),
            Some(json!({"openid_connect_config": {"signing_key": "not a jwks at all"}})),
            400,
            "signing_key not a JWKS",
        ),
        (
            Method::PUT,
            config_path.clone(),
            Some(json!({"openid_connect_config": {"access_mode": "program_console"}})),
            400,
            "console mode without its fields",
        ),
        (
            Method::PUT,
            config_path.clone(),
            Some(json!({"openid_connect_config": {"idp_url": "short"}})),
            400,
            "idp_url under 10 characters",
        ),
    ];
    for (method, path, body, status, why) in refused {
        let answer = admin_call(&h, method, &path, body).await;
        assert_eq!(answer.status.as_u16(), status, "{why}: {:?}", answer.body);
        if path.starts_with("/v3.0/") {
            assert!(
                answer.body["error_code"]
                    .as_str()
                    .unwrap()
                    .starts_with("IAM."),
                "{why}: {:?}",
                answer.body
            );
            assert!(answer.body["error_msg"].is_string(), "{why}");
        } else {
            assert_eq!(
                answer.body["error"]["code"], status,
                "{why}: {:?}",
                answer.body
            );
        }
    }
    // Without a token: 401 IAM.0001; with a federated user's token: 403 IAM.0003.
    let anonymous = h
        .send(
            h.http
                .get(format!("{}{config_path}", h.emulator.base_url())),
        )
        .await;
    assert_eq!(
        (anonymous.status, anonymous.body["error_code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("IAM.0001"))
    );
    admin_call(
        &h,
        Method::PUT,
        &config_path,
        Some(json!({"openid_connect_config": {"client_id": CLIENT_ID}})),
    )
    .await;
    let federated = exchange(&h, Some(IDP), &key.mint(&claims()), Some(project_scope(&h))).await;
    assert_eq!(
        federated.status,
        StatusCode::CREATED,
        "{:?}",
        federated.body
    );
    let forbidden = h
        .send(
            h.http
                .get(format!("{}{config_path}", h.emulator.base_url()))
                .header("X-Auth-Token", subject_token(&federated)),
        )
        .await;
    assert_eq!(
        (forbidden.status, forbidden.body["error_code"].as_str()),
        (StatusCode::FORBIDDEN, Some("IAM.0003"))
    );
    h.shutdown().await;
}

#[tokio::test]
async fn id_tokens_signed_rs256_or_es256_give_scoped_and_unscoped_tokens() {
    let h = Harness::start().await;
    let (rsa, ec) = (Key::rs256("rsa-1"), Key::es256("ec-1"));
    configure(&h, IDP, &[&rsa, &ec], sub_rules()).await;
    for key in [&rsa, &ec] {
        let scoped = exchange(&h, Some(IDP), &key.mint(&claims()), Some(project_scope(&h))).await;
        assert_eq!(scoped.status, StatusCode::CREATED, "{:?}", scoped.body);
        assert!(scoped.headers.contains_key("x-request-id"));
        let token = &scoped.body["token"];
        assert_eq!(token["methods"], json!(["mapped"]));
        assert_eq!(token["project"]["id"], h.project_id().as_str());
        assert_eq!(token["user"]["name"], format!("k8s-{SUB}"));
        assert_eq!(
            token["user"]["OS-FEDERATION"]["identity_provider"]["id"],
            IDP
        );
        assert_eq!(token["user"]["OS-FEDERATION"]["protocol"]["id"], "oidc");
        assert_eq!(
            token["user"]["OS-FEDERATION"]["groups"][0]["name"],
            "kms-operators"
        );
        assert_eq!(
            token["expires_at"].as_str().unwrap().len(),
            "2018-03-13T03:00:01.168000Z".len()
        );
        let listed = h
            .kms_with_token(&subject_token(&scoped), "list-keys", json!({}))
            .await;
        assert_eq!(
            listed.status,
            StatusCode::OK,
            "a project-scoped federated token works on KMS"
        );
    }
    // The same user every time: the key it creates, it may revoke grants of.
    let first = exchange(&h, Some(IDP), &ec.mint(&claims()), Some(project_scope(&h))).await;
    let second = exchange(&h, Some(IDP), &rsa.mint(&claims()), Some(project_scope(&h))).await;
    assert_eq!(
        first.body["token"]["user"]["id"],
        second.body["token"]["user"]["id"]
    );

    let unscoped = exchange(&h, Some(IDP), &ec.mint(&claims()), None).await;
    assert_eq!(unscoped.status, StatusCode::CREATED);
    assert!(unscoped.body["token"].get("project").is_none());
    let refused = h
        .kms_with_token(&subject_token(&unscoped), "list-keys", json!({}))
        .await;
    assert_eq!(
        refused.error_code(),
        Some("KMS.0305"),
        "an unscoped token is refused by KMS"
    );
    // Unscoped -> scoped (POST /v3/auth/tokens, method token), same expiry.
    let rescoped = h.send(h.http.post(format!("{}/auth/tokens", h.emulator.iam_endpoint())).json(&json!({
        "auth": {"identity": {"methods": ["token"], "token": {"id": subject_token(&unscoped)}},
                 "scope": {"project": {"name": "eu-de", "domain": {"name": h.emulator.config().domain_name}}}}}))).await;
    assert_eq!(rescoped.status, StatusCode::CREATED, "{:?}", rescoped.body);
    assert_eq!(
        rescoped.body["token"]["expires_at"],
        unscoped.body["token"]["expires_at"]
    );
    assert_eq!(
        h.kms_with_token(&subject_token(&rescoped), "list-keys", json!({}))
            .await
            .status,
        StatusCode::OK
    );
    // The Bearer variant gives an unscoped token too.
    let bearer = h
        .send(
            h.http
                .post(format!(
                    "{}/v3/OS-FEDERATION/identity_providers/{IDP}/protocols/oidc/auth",
                    h.emulator.base_url()
                ))
                .header("Authorization", format!("Bearer {}", rsa.mint(&claims()))),
        )
        .await;
    assert_eq!(bearer.status, StatusCode::CREATED, "{:?}", bearer.body);
    assert!(bearer.body["token"].get("project").is_none());
    let bad_bearer = h
        .send(
            h.http
                .post(format!(
                    "{}/v3/OS-FEDERATION/identity_providers/{IDP}/protocols/oidc/auth",
                    h.emulator.base_url()
                ))
                .header("Authorization", "Bearer x.y.z"),
        )
        .await;
    assert_eq!(
        (bad_bearer.status, bad_bearer.body["error"]["code"].as_u64()),
        (StatusCode::UNAUTHORIZED, Some(401))
    );

    let calls = h.emulator.admin().calls(0);
    assert!(
        calls
            .iter()
            .any(|c| c.operation == "iam:id-token" && c.status == 201)
    );
    assert!(
        calls
            .iter()
            .any(|c| c.operation == "iam:openid-connect-config" && c.status == 201)
    );
    h.shutdown().await;
}

#[tokio::test]
async fn every_documented_id_token_failure_answers_its_status_and_code() {
    use reqwest::Method;
    let h = Harness::start().await;
    let key = Key::es256("k1");
    let rules = json!([
        {"local": [{"user": {"name": "{0}"}}], "remote": [{"type": "sub"}, {"type": "sub", "any_one_of": [SUB]}]},
        {"local": [{"user": {"name": "ci-{0}"}}], "remote": [{"type": "sub"}, {"type": "sub", "regex": true, "any_one_of": ["system:serviceaccount:ci-[a-z]+:runner"]},
                                                              {"type": "env", "not_any_of": ["prod"]}]},
    ]);
    configure(&h, IDP, &[&key], rules).await;
    admin_call(
        &h,
        Method::PUT,
        "/v3/OS-FEDERATION/identity_providers/off",
        Some(json!({"identity_provider": {"enabled": false}})),
    )
    .await;
    admin_call(
        &h,
        Method::PUT,
        "/v3/OS-FEDERATION/identity_providers/bare",
        Some(json!({"identity_provider": {"enabled": true}})),
    )
    .await;
    let other = Key::es256("k1"); // same kid, another key
    let with = |patch: Value| {
        let mut c = claims();
        for (k, v) in patch.as_object().unwrap() {
            if v.is_null() {
                c.as_object_mut().unwrap().remove(k);
            } else {
                c[k] = v.clone();
            }
        }
        c
    };
    let good = key.mint(&claims());
    let tampered = {
        let mut parts: Vec<String> = good.split('.').map(str::to_owned).collect();
        parts[1] = URL_SAFE_NO_PAD
            .encode(with(json!({"sub": "system:serviceaccount:kmsgrant:evil"})).to_string());
        parts.join(".")
    };
    let cases: Vec<(&str, Option<&str>, String, u16, &str)> = vec![
        ("no X-Idp-Id", None, good.clone(), 400, "IAM.0007"),
        (
            "unknown identity provider",
            Some("nope"),
            good.clone(),
            404,
            "IAM.0004",
        ),
        (
            "disabled identity provider",
            Some("off"),
            good.clone(),
            403,
            "IAM.0003",
        ),
        (
            "no OpenID Connect configuration",
            Some("bare"),
            good.clone(),
            404,
            "IAM.0004",
        ),
        ("not a JWT", Some(IDP), "not-a-jwt".into(), 401, "IAM.0001"),
        (
            "alg none",
            Some(IDP),
            key.mint_with_header(json!({"alg": "none", "kid": "k1"}), &claims()),
            401,
            "IAM.0001",
        ),
        (
            "alg HS256",
            Some(IDP),
            key.mint_with_header(json!({"alg": "HS256", "kid": "k1"}), &claims()),
            401,
            "IAM.0001",
        ),
        (
            "unknown kid",
            Some(IDP),
            Key::es256("k9").mint(&claims()),
            401,
            "IAM.0001",
        ),
        (
            "another key's signature",
            Some(IDP),
            other.mint(&claims()),
            401,
            "IAM.0001",
        ),
        (
            "claims changed after signing",
            Some(IDP),
            tampered,
            401,
            "IAM.0001",
        ),
        (
            "wrong iss",
            Some(IDP),
            key.mint(&with(json!({"iss": "https://evil.example.com"}))),
            401,
            "IAM.0001",
        ),
        (
            "wrong aud",
            Some(IDP),
            key.mint(&with(json!({"aud": "someone-else"}))),
            401,
            "IAM.0001",
        ),
        (
            "no aud",
            Some(IDP),
            key.mint(&with(json!({"aud": null}))),
            401,
            "IAM.0001",
        ),
        (
            "expired",
            Some(IDP),
            key.mint(&with(json!({"exp": now() - 1}))),
            401,
            "IAM.0001",
        ),
        (
            "no exp",
            Some(IDP),
            key.mint(&with(json!({"exp": null}))),
            401,
            "IAM.0001",
        ),
        (
            "not valid before",
            Some(IDP),
            key.mint(&with(json!({"nbf": now() + 600}))),
            401,
            "IAM.0001",
        ),
        (
            "sub matches no rule",
            Some(IDP),
            key.mint(&with(
                json!({"sub": "system:serviceaccount:default:default"}),
            )),
            401,
            "IAM.0001",
        ),
        (
            "regex rule, not_any_of refuses",
            Some(IDP),
            key.mint(&with(
                json!({"sub": "system:serviceaccount:ci-a:runner", "env": "prod"}),
            )),
            401,
            "IAM.0001",
        ),
        (
            "regex must match the whole value",
            Some(IDP),
            key.mint(&with(
                json!({"sub": "system:serviceaccount:ci-a:runner-x", "env": "dev"}),
            )),
            401,
            "IAM.0001",
        ),
    ];
    let mut failures = Vec::new();
    for (name, idp, jwt, status, code) in &cases {
        let answer = exchange(&h, *idp, jwt, Some(project_scope(&h))).await;
        let got = (
            answer.status.as_u16(),
            answer.body["error_code"].as_str().unwrap_or_default(),
        );
        if got != (*status, *code) || !answer.body["error_msg"].is_string() {
            failures.push(format!(
                "{name}: expected {status} {code}, got {got:?} {:?} {:?}",
                answer.body,
                answer.headers.get("x-emulator-detail")
            ));
        }
    }
    // Body errors.
    let url = format!("{}/v3.0/OS-AUTH/id-token/tokens", h.emulator.base_url());
    for (name, body) in [
        ("not JSON", "{".to_owned()),
        ("no id_token", json!({"auth": {}}).to_string()),
        (
            "scope of neither kind",
            json!({"auth": {"id_token": {"id": good}, "scope": {"region": {}}}}).to_string(),
        ),
    ] {
        let answer = h
            .send(
                h.http
                    .post(&url)
                    .header("X-Idp-Id", IDP)
                    .header("content-type", "application/json")
                    .body(body),
            )
            .await;
        if (answer.status.as_u16(), answer.body["error_code"].as_str()) != (400, Some("IAM.0011")) {
            failures.push(format!(
                "{name}: expected 400 IAM.0011, got {} {:?}",
                answer.status, answer.body
            ));
        }
    }
    // Accepted: the regex rule, an aud string, a token in another project scope refused.
    for (name, jwt) in [
        (
            "regex rule",
            key.mint(&with(
                json!({"sub": "system:serviceaccount:ci-a:runner", "env": "dev"}),
            )),
        ),
        (
            "aud as a string",
            key.mint(&with(json!({"aud": CLIENT_ID}))),
        ),
    ] {
        let answer = exchange(&h, Some(IDP), &jwt, Some(project_scope(&h))).await;
        if answer.status != StatusCode::CREATED {
            failures.push(format!(
                "{name}: expected 201, got {} {:?}",
                answer.status, answer.body
            ));
        }
    }
    let other_project = exchange(
        &h,
        Some(IDP),
        &good,
        Some(json!({"project": {"name": "eu-nl"}})),
    )
    .await;
    assert_eq!(
        other_project.status,
        StatusCode::UNAUTHORIZED,
        "{:?}",
        other_project.body
    );
    assert!(
        failures.is_empty(),
        "{} failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    let stats = h.emulator.admin().stats();
    assert!(stats.by_error_code["iam:id-token"]["IAM.0001"] >= 15);
    h.shutdown().await;
}

/// A signed list-keys with a temporary key; `security_token` sent as `X-Security-Token`
/// (signed when `sign_it`).
async fn list_keys_with(
    h: &Harness,
    access: &str,
    secret: &str,
    security_token: Option<&str>,
    sign_it: bool,
) -> Answer {
    let path = format!("/v1.0/{}/kms/list-keys", h.project_id());
    let host = h.emulator.addr().to_string();
    let mut headers = vec![
        ("host", host.as_str()),
        ("content-type", "application/json"),
    ];
    if let (Some(token), true) = (security_token, sign_it) {
        headers.push(("x-security-token", token));
    }
    let signature = h.sign_as(
        &Variant::Huawei,
        access,
        secret,
        &ToSign {
            method: "POST",
            path: &path,
            query: "",
            headers: &headers,
            body: b"{}",
        },
    );
    let mut request = h
        .http
        .post(format!("{}{path}", h.emulator.base_url()))
        .header("content-type", "application/json")
        .body("{}");
    if let Some(token) = security_token {
        request = request.header("X-Security-Token", token);
    }
    h.send(signature.apply(request)).await
}

async fn security_tokens(h: &Harness, header_token: Option<&str>, body: Value) -> Answer {
    let mut request = h
        .http
        .post(format!(
            "{}/v3.0/OS-CREDENTIAL/securitytokens",
            h.emulator.base_url()
        ))
        .header("Content-Type", "application/json;charset=utf8")
        .json(&body);
    if let Some(token) = header_token {
        request = request.header("X-Auth-Token", token);
    }
    h.send(request).await
}

#[tokio::test]
async fn temporary_keys_work_on_kms_only_with_their_security_token_and_expire() {
    let h = Harness::start_with(EmulatorConfig {
        security_token_ttl: Some(Duration::from_secs(2)),
        federation_token_ttl: Duration::from_secs(3),
        ..EmulatorConfig::for_tests()
    })
    .await;
    let key = Key::es256("k1");
    configure(&h, IDP, &[&key], sub_rules()).await;
    let unscoped = subject_token(&exchange(&h, Some(IDP), &key.mint(&claims()), None).await);
    // What the Go SDK sends: the token in the body only.
    let body = |duration: Value| json!({"auth": {"identity": {"methods": ["token"], "token": {"id": unscoped, "duration_seconds": duration}}}});
    for (duration, status) in [
        (json!(899), 400),
        (json!(86401), 400),
        (json!("900"), 400),
        (json!(900), 201),
        (json!(86400), 201),
        (Value::Null, 201),
    ] {
        let answer = security_tokens(&h, None, body(duration.clone())).await;
        assert_eq!(
            answer.status.as_u16(),
            status,
            "duration_seconds {duration}: {:?}",
            answer.body
        );
        if status == 400 {
            assert_eq!(answer.body["error_code"], "IAM.0011");
        }
    }
    let answer = security_tokens(&h, None, body(json!(21600))).await;
    let credential = &answer.body["credential"];
    let (access, secret, token) = (
        credential["access"].as_str().unwrap(),
        credential["secret"].as_str().unwrap(),
        credential["securitytoken"].as_str().unwrap(),
    );
    assert!(
        credential["expires_at"].as_str().unwrap().ends_with("000Z"),
        "{credential}"
    );
    assert_eq!(
        list_keys_with(&h, access, secret, Some(token), true)
            .await
            .status,
        StatusCode::OK,
        "signed X-Security-Token"
    );
    assert_eq!(
        list_keys_with(&h, access, secret, Some(token), false)
            .await
            .status,
        StatusCode::OK,
        "unsigned X-Security-Token"
    );
    for (security_token, why) in [
        (None, "without its security token"),
        (Some("gAAAAAwrong"), "with another security token"),
    ] {
        let answer = list_keys_with(&h, access, secret, security_token, false).await;
        assert_eq!(
            (answer.status, answer.error_code()),
            (StatusCode::UNAUTHORIZED, Some("APIGW.0301")),
            "{why}"
        );
    }
    // The header wins over the body; no token at all is 401; a method that is neither is 400.
    let in_header = security_tokens(
        &h,
        Some(&unscoped),
        json!({"auth": {"identity": {"methods": ["token"], "token": {"id": "MIIunknown"}}}}),
    )
    .await;
    assert_eq!(in_header.status, StatusCode::CREATED);
    let none = security_tokens(
        &h,
        None,
        json!({"auth": {"identity": {"methods": ["token"]}}}),
    )
    .await;
    assert_eq!(
        (none.status, none.body["error_code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("IAM.0001"))
    );
    let unknown = security_tokens(
        &h,
        None,
        json!({"auth": {"identity": {"methods": ["password"]}}}),
    )
    .await;
    assert_eq!(
        (unknown.status, unknown.body["error_code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("IAM.0011"))
    );

    tokio::time::sleep(Duration::from_millis(3100)).await;
    let expired = list_keys_with(&h, access, secret, Some(token), true).await;
    assert_eq!(
        (expired.status, expired.error_code()),
        (StatusCode::UNAUTHORIZED, Some("APIGW.0301")),
        "expired"
    );
    let late = security_tokens(&h, None, body(json!(900))).await;
    assert_eq!(
        (late.status, late.body["error_code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("IAM.0001")),
        "the federated token expired too"
    );
    h.shutdown().await;
}

#[tokio::test]
async fn a_user_of_a_trusted_domain_assumes_an_agency_by_token_and_by_securitytokens() {
    let h = Harness::start().await;
    let admin = h.emulator.admin();
    let config = h.emulator.config().clone();
    let other = admin.add_domain("tenant-b", None).unwrap();
    let user_b = admin
        .add_user_in_domain(
            &other.id,
            NewUser {
                name: "operator-b".into(),
                password: "b-password".into(),
                user_id: None,
                access_key: Some("TENANTBACCESSKEY0000".into()),
                secret_key: Some("tenant-b-secret".into()),
            },
        )
        .unwrap();
    let agency = admin
        .add_agency(NewAgency {
            name: "kms-grants".into(),
            domain_id: None,
            trust_domain_id: None,
            trust_domain_name: Some("tenant-b".into()),
        })
        .unwrap();
    assert_eq!(agency.domain_id, config.domain_id);
    let iam = h.emulator.iam_endpoint();
    let login = h.send(h.http.post(format!("{iam}/auth/tokens")).json(&json!({"auth": {
        "identity": {"methods": ["password"], "password": {"user": {"name": "operator-b", "password": "b-password", "domain": {"name": "tenant-b"}}}},
        "scope": {"domain": {"name": "tenant-b"}}}}))).await;
    assert_eq!(login.status, StatusCode::CREATED, "{:?}", login.body);
    let token_b = subject_token(&login);
    assert_eq!(
        h.kms_with_token(&token_b, "list-keys", json!({}))
            .await
            .error_code(),
        Some("KMS.0305")
    );

    let assume = |token: &str, agency: &str, scope: Value| {
        h.http.post(format!("{iam}/auth/tokens")).header("X-Auth-Token", token.to_owned()).json(&json!({"auth": {
        "identity": {"methods": ["assume_role"], "assume_role": {"domain_name": config.domain_name, "xrole_name": agency}}, "scope": scope}}))
    };
    let agency_token = h
        .send(assume(
            &token_b,
            "kms-grants",
            json!({"project": {"id": config.project_id}}),
        ))
        .await;
    assert_eq!(
        agency_token.status,
        StatusCode::CREATED,
        "{:?}",
        agency_token.body
    );
    let body = &agency_token.body["token"];
    assert_eq!(body["methods"], json!(["assume_role"]));
    assert_eq!(
        body["user"]["name"],
        format!("{}/kms-grants", config.domain_name)
    );
    assert_eq!(body["assumed_by"]["user"]["id"], user_b.user_id.as_str());
    assert_eq!(body["assumed_by"]["user"]["domain"]["name"], "tenant-b");
    assert_eq!(
        h.kms_with_token(&subject_token(&agency_token), "list-keys", json!({}))
            .await
            .status,
        StatusCode::OK
    );
    let unknown = h
        .send(assume(
            &token_b,
            "nope",
            json!({"project": {"id": config.project_id}}),
        ))
        .await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    let untrusted = h
        .send(assume(
            &h.token,
            "kms-grants",
            json!({"project": {"id": config.project_id}}),
        ))
        .await;
    assert_eq!(
        untrusted.status,
        StatusCode::FORBIDDEN,
        "the agency trusts tenant-b only"
    );

    // securitytokens, assume_role: temporary keys acting as the agency in the delegating domain.
    let assume_body = |duration: i64| json!({"auth": {"identity": {"methods": ["assume_role"], "assume_role": {"domain_id": config.domain_id, "agency_name": "kms-grants", "duration_seconds": duration}}}});
    let too_short = security_tokens(&h, Some(&token_b), assume_body(600)).await;
    assert_eq!(
        (too_short.status, too_short.body["error_code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("IAM.0011"))
    );
    let answer = security_tokens(&h, Some(&token_b), assume_body(3600)).await;
    assert_eq!(answer.status, StatusCode::CREATED, "{:?}", answer.body);
    let credential = &answer.body["credential"];
    let listed = list_keys_with(
        &h,
        credential["access"].as_str().unwrap(),
        credential["secret"].as_str().unwrap(),
        credential["securitytoken"].as_str(),
        true,
    )
    .await;
    assert_eq!(listed.status, StatusCode::OK, "{:?}", listed.body);
    let calls = admin.calls(0);
    let last = calls
        .iter()
        .rev()
        .find(|c| c.operation == "list-keys")
        .unwrap();
    assert_eq!(
        last.caller.as_deref(),
        Some(agency.id.as_str()),
        "KMS sees the agency"
    );
    let no_token = security_tokens(&h, None, assume_body(3600)).await;
    assert_eq!(no_token.status, StatusCode::UNAUTHORIZED);
    let forbidden = security_tokens(&h, Some(&h.token), assume_body(3600)).await;
    assert_eq!(
        (forbidden.status, forbidden.body["error_code"].as_str()),
        (StatusCode::FORBIDDEN, Some("IAM.0003"))
    );

    // Tenant B's own keys (permanent, or temporary from its token) cannot use this account's KMS.
    let own = security_tokens(
        &h,
        Some(&token_b),
        json!({"auth": {"identity": {"methods": ["token"]}}}),
    )
    .await;
    let own = &own.body["credential"];
    let refused = list_keys_with(
        &h,
        own["access"].as_str().unwrap(),
        own["secret"].as_str().unwrap(),
        own["securitytoken"].as_str(),
        true,
    )
    .await;
    assert_eq!(refused.error_code(), Some("KMS.0321"));
    let permanent =
        list_keys_with(&h, "TENANTBACCESSKEY0000", "tenant-b-secret", None, false).await;
    assert_eq!(permanent.error_code(), Some("KMS.0321"));
    h.shutdown().await;
}

/// `iam:id-token` and `iam:securitytokens` in the fault settings fail those calls with the
/// documented 500 IAM.0006, the latency applies to them, and the KMS wildcard leaves them alone.
#[tokio::test]
async fn injected_iam_faults_fail_or_slow_the_exchange_only_when_named() {
    use kms_emulator::{ErrorInjection, FaultSettings, InjectedError};
    let h = Harness::start().await;
    let key = Key::es256("k1");
    configure(&h, IDP, &[&key], sub_rules()).await;
    let jwt = key.mint(&claims());
    let admin = h.emulator.admin();
    let named = |operation: &str| FaultSettings {
        errors: [(
            operation.to_owned(),
            ErrorInjection {
                rate: 1.0,
                error: InjectedError::Unavailable,
            },
        )]
        .into(),
        ..FaultSettings::default()
    };
    admin.set_faults(named("iam:id-token")).unwrap();
    let failed = exchange(&h, Some(IDP), &jwt, Some(project_scope(&h))).await;
    assert_eq!(failed.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(failed.body["error_code"], "IAM.0006");

    // The KMS wildcard is not an IAM fault.
    admin.set_faults(named("*")).unwrap();
    let answer = exchange(&h, Some(IDP), &jwt, Some(project_scope(&h))).await;
    assert_eq!(answer.status, StatusCode::CREATED, "{:?}", answer.body);

    admin
        .set_faults(FaultSettings {
            latency_ms: 400,
            ..FaultSettings::default()
        })
        .unwrap();
    let started = std::time::Instant::now();
    let answer = exchange(&h, Some(IDP), &jwt, Some(project_scope(&h))).await;
    assert_eq!(answer.status, StatusCode::CREATED);
    assert!(started.elapsed() >= Duration::from_millis(400));
    admin.set_faults(FaultSettings::default()).unwrap();
}
