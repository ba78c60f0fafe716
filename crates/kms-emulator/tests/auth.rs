//! IAM (tokens, catalog, domains, projects) and AK/SK signatures in the header styles real SDKs
//! send. Signatures are computed by an independent implementation in tests/support.
mod support;

use reqwest::StatusCode;
use serde_json::{Value, json};
use support::{Harness, ToSign, Variant};

#[tokio::test]
async fn password_tokens_are_issued_for_a_project_by_id_or_name_and_for_the_domain() {
    let h = Harness::start().await;
    let config = h.emulator.config();
    let url = format!("{}/auth/tokens", h.emulator.iam_endpoint());
    let request = |password: &str, scope: Value| {
        json!({"auth": {"identity": {"methods": ["password"], "password": {"user": {
            "name": config.username, "password": password, "domain": {"name": config.domain_name}}}},
            "scope": scope}})
    };
    let by_name = h
        .send(h.http.post(&url).json(&request(
            config.password.as_str(),
            json!({"project": {"name": "eu-de"}}),
        )))
        .await;
    assert_eq!(by_name.status, StatusCode::CREATED);
    assert!(by_name.headers.contains_key("x-subject-token"));
    let token = &by_name.body["token"];
    assert_eq!(token["project"]["id"], config.project_id.as_str());
    assert_eq!(token["project"]["name"], "eu-de");
    assert_eq!(token["methods"], json!(["password"]));
    let expires_at = token["expires_at"].as_str().unwrap();
    assert_eq!(
        expires_at.len(),
        "2015-11-09T01:42:57.527363Z".len(),
        "{expires_at}"
    );
    assert!(
        token["catalog"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["type"] == "kmsv1")
    );

    let domain = h
        .send(h.http.post(&url).json(&request(
            config.password.as_str(),
            json!({"domain": {"name": config.domain_name}}),
        )))
        .await;
    assert_eq!(domain.status, StatusCode::CREATED);
    assert_eq!(
        domain.body["token"]["domain"]["id"],
        config.domain_id.as_str()
    );
    assert!(domain.body["token"].get("project").is_none());

    let nocatalog = h
        .send(h.http.post(format!("{url}?nocatalog=true")).json(&request(
            config.password.as_str(),
            json!({"project": {"id": config.project_id}}),
        )))
        .await;
    assert!(nocatalog.body["token"].get("catalog").is_none());

    let wrong = h
        .send(
            h.http
                .post(&url)
                .json(&request("nope", json!({"project": {"name": "eu-de"}}))),
        )
        .await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    assert_eq!(wrong.body["error"]["code"], 401);
    let unknown_project = h
        .send(h.http.post(&url).json(&request(
            config.password.as_str(),
            json!({"project": {"name": "eu-nl"}}),
        )))
        .await;
    assert_eq!(unknown_project.status, StatusCode::BAD_REQUEST);
    h.shutdown().await;
}

/// A signed list-keys call: `signed` names the headers signed (values filled in here),
/// `unsigned` are sent without being signed.
async fn signed_list_keys(
    h: &Harness,
    variant: Variant,
    signed_names: &[&str],
    unsigned: &[(&str, &str)],
) -> support::Answer {
    let config = h.emulator.config();
    let path = format!("/v1.0/{}/kms/list-keys", config.project_id);
    let body = br#"{"limit":"10"}"#;
    let host = h.emulator.addr().to_string();
    // x-sdk-date is always signed and sent; host is set by the HTTP client.
    assert!(signed_names.contains(&"x-sdk-date"));
    let all = [
        ("accept", "application/json"),
        ("content-type", "application/json;charset=UTF-8"),
        ("host", host.as_str()),
        ("user-agent", "huaweicloud-usql/1.0"),
        ("x-project-id", config.project_id.as_str()),
    ];
    let signed: Vec<(&str, &str)> = all
        .iter()
        .filter(|(n, _)| signed_names.contains(n))
        .copied()
        .collect();
    let signature = h.sign(
        &variant,
        &ToSign {
            method: "POST",
            path: &path,
            query: "",
            headers: &signed,
            body,
        },
    );
    let mut request = h
        .http
        .post(format!("{}{path}", h.emulator.base_url()))
        .body(body.to_vec());
    for (name, value) in all.iter().filter(|(n, _)| *n != "host") {
        if signed_names.contains(name) || *name == "content-type" {
            request = request.header(*name, *value);
        }
    }
    for (name, value) in unsigned {
        request = request.header(*name, *value);
    }
    h.send(signature.apply(request)).await
}

#[tokio::test]
async fn huawei_go_sdk_style_signature_without_content_type_verifies() {
    let h = Harness::start().await;
    let answer = signed_list_keys(
        &h,
        Variant::Huawei,
        &["host", "x-project-id", "x-sdk-date"],
        &[],
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
    assert_eq!(answer.body["total"], 2);
    h.shutdown().await;
}

#[tokio::test]
async fn chnsz_golangsdk_style_signature_with_project_header_added_after_signing_verifies() {
    let h = Harness::start().await;
    let project = h.project_id();
    let answer = signed_list_keys(
        &h,
        Variant::Huawei,
        &["accept", "content-type", "user-agent", "x-sdk-date"],
        &[("x-project-id", project.as_str())],
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
    h.shutdown().await;
}

#[tokio::test]
async fn gophertelekomcloud_style_credential_signature_verifies_with_and_without_region() {
    let h = Harness::start().await;
    for (region, service) in [("eu-de", "kms"), ("", "")] {
        let variant = Variant::Otc {
            region: region.into(),
            service: service.into(),
        };
        let answer = signed_list_keys(
            &h,
            variant,
            &[
                "accept",
                "content-type",
                "host",
                "user-agent",
                "x-project-id",
                "x-sdk-date",
            ],
            &[],
        )
        .await;
        assert_eq!(
            answer.status,
            StatusCode::OK,
            "region {region:?}: {:?}",
            answer.body
        );
    }
    h.shutdown().await;
}

#[tokio::test]
async fn a_signature_over_a_header_the_request_lacks_is_rejected() {
    let h = Harness::start().await;
    // x-custom is signed but never sent.
    let path = format!("/v1.0/{}/kms/list-keys", h.project_id());
    let answer = h
        .send_signed(
            &Variant::Huawei,
            &ToSign {
                method: "POST",
                path: &path,
                query: "",
                headers: &[("x-custom", "1")],
                body: b"{}",
            },
        )
        .await;
    assert_eq!(
        (answer.status, answer.error_code()),
        (StatusCode::UNAUTHORIZED, Some("APIGW.0301"))
    );
    h.shutdown().await;
}

fn kms_services(catalog: &Value) -> Vec<&Value> {
    catalog
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["name"] == "kms")
        .collect()
}

#[tokio::test]
async fn the_catalog_lists_kms_for_token_and_signature_callers_with_the_project_in_the_url() {
    let h = Harness::start().await;
    let config = h.emulator.config();
    let url = format!("{}/auth/catalog", h.emulator.iam_endpoint());
    let by_token = h
        .send(h.http.get(&url).header("X-Auth-Token", &h.token))
        .await;
    assert_eq!(by_token.status, StatusCode::OK);

    let host = h.emulator.addr().to_string();
    let otc = Variant::Otc {
        region: config.region.clone(),
        service: "iam".into(),
    };
    let by_signature = h
        .send_signed(
            &otc,
            &ToSign {
                method: "GET",
                path: "/v3/auth/catalog",
                query: "",
                headers: &[("host", &host)],
                body: b"",
            },
        )
        .await;
    assert_eq!(
        by_signature.status,
        StatusCode::OK,
        "{:?}",
        by_signature.body
    );

    for answer in [&by_token, &by_signature] {
        let services = kms_services(&answer.body["catalog"]);
        let types: Vec<&str> = services
            .iter()
            .map(|s| s["type"].as_str().unwrap())
            .collect();
        assert!(
            types.contains(&"kmsv1") && types.contains(&"kms"),
            "{types:?}"
        );
        for service in services {
            let endpoint = &service["endpoints"][0];
            assert_eq!(endpoint["interface"], "public");
            assert_eq!(endpoint["region"], config.region.as_str());
            assert_eq!(endpoint["url"].as_str().unwrap(), h.emulator.kms_endpoint());
        }
        assert!(
            answer.body["links"]["self"]
                .as_str()
                .unwrap()
                .ends_with("/v3/auth/catalog")
        );
    }
    let kms_url = format!(
        "{}/kms/list-keys",
        kms_services(&by_token.body["catalog"])[0]["endpoints"][0]["url"]
            .as_str()
            .unwrap()
    );
    let listed = h
        .send(
            h.http
                .post(kms_url)
                .header("X-Auth-Token", &h.token)
                .json(&json!({})),
        )
        .await;
    assert_eq!(
        listed.status,
        StatusCode::OK,
        "the catalog URL works as a KMS endpoint"
    );

    let anonymous = h.send(h.http.get(&url)).await;
    assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED);
    h.shutdown().await;
}

#[tokio::test]
async fn domains_and_projects_are_listed_with_and_without_a_name_filter() {
    let h = Harness::start().await;
    let config = h.emulator.config();
    let iam = h.emulator.iam_endpoint();
    let domains = h
        .send(
            h.http
                .get(format!("{iam}/auth/domains"))
                .header("X-Auth-Token", &h.token),
        )
        .await;
    assert_eq!(domains.body["domains"][0]["id"], config.domain_id.as_str());
    assert_eq!(
        domains.body["domains"][0]["name"],
        config.domain_name.as_str()
    );
    assert_eq!(domains.body["domains"][0]["enabled"], true);
    assert!(domains.body["links"]["next"].is_null());

    let all = h
        .send(
            h.http
                .get(format!("{iam}/projects"))
                .header("X-Auth-Token", &h.token),
        )
        .await;
    assert_eq!(all.body["projects"].as_array().unwrap().len(), 1);
    let project = &all.body["projects"][0];
    assert_eq!(project["id"], config.project_id.as_str());
    assert_eq!(project["domain_id"], config.domain_id.as_str());
    assert_eq!(project["is_domain"], false);

    let none = h
        .send(
            h.http
                .get(format!("{iam}/projects?name=eu-nl"))
                .header("X-Auth-Token", &h.token),
        )
        .await;
    assert_eq!(none.body["projects"], json!([]));

    // The Huawei SDK looks the project up by name with a signed request.
    let host = h.emulator.addr().to_string();
    let by_name = h
        .send_signed(
            &Variant::Huawei,
            &ToSign {
                method: "GET",
                path: "/v3/projects",
                query: "name=eu-de",
                headers: &[("host", &host)],
                body: b"",
            },
        )
        .await;
    assert_eq!(by_name.status, StatusCode::OK, "{:?}", by_name.body);
    assert_eq!(by_name.body["projects"][0]["name"], "eu-de");
    h.shutdown().await;
}
