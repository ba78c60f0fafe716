//! Grant behaviour as clients see it: pagination, quotas, key states, revoke and retire rules,
//! the shape of listed grants, and correctness under concurrent calls.
mod support;

use std::collections::BTreeSet;

use kms_emulator::{EmulatorConfig, NewUser, TokenScope};
use reqwest::StatusCode;
use serde_json::{Value, json};
use support::{GRANTEE, Harness, default_key_id};

/// Pages through list-grants with `limit` (a string), checking every page's invariants.
async fn walk(h: &Harness, key_id: &str, limit: usize) -> (Vec<String>, usize) {
    let mut seen = Vec::new();
    let mut marker = String::new();
    loop {
        let page = h
            .list_grants(json!({"key_id": key_id, "limit": limit.to_string(), "marker": marker}))
            .await;
        assert_eq!(page.status, StatusCode::OK, "{:?}", page.body);
        let grants = page.body["grants"].as_array().unwrap();
        assert!(grants.len() <= limit);
        assert!(page.body["total"].is_u64(), "total is an integer");
        let truncated = page.body["truncated"]
            .as_str()
            .expect("truncated is a string");
        let next_marker = page.body["next_marker"]
            .as_str()
            .expect("next_marker is a string");
        seen.extend(
            grants
                .iter()
                .map(|g| g["grant_id"].as_str().unwrap().to_owned()),
        );
        match truncated {
            "true" => {
                assert_eq!(grants.len(), limit, "a truncated page is full");
                assert_eq!(
                    next_marker,
                    seen.len().to_string(),
                    "next_marker is the offset of the next page"
                );
                assert_ne!(next_marker, marker, "the marker advances");
                marker = next_marker.to_owned();
            }
            "false" => {
                assert_eq!(next_marker, "", "next_marker is empty on the last page");
                let total = page.body["total"].as_u64().unwrap() as usize;
                assert!(seen.len() <= total, "never more grants than the total");
                return (seen, total);
            }
            other => panic!("truncated is {other:?}"),
        }
    }
}

#[tokio::test]
async fn pagination_walks_return_every_grant_exactly_once() {
    let h = Harness::start().await;
    for count in [0usize, 1, 99, 100] {
        let key_id = h.create_key(&format!("walk-{count}")).await;
        let mut created = BTreeSet::new();
        for _ in 0..count {
            created.insert(h.create_grant(&key_id).await);
        }
        for limit in [1usize, 7, 100] {
            let (seen, total) = walk(&h, &key_id, limit).await;
            assert_eq!(total, count, "total over {count} grants");
            assert_eq!(seen.len(), count, "{count} grants with pages of {limit}");
            assert_eq!(
                seen.iter().cloned().collect::<BTreeSet<_>>(),
                created,
                "no grant twice, none missing"
            );
        }
    }
    h.shutdown().await;
}

#[tokio::test]
async fn without_limit_one_page_holds_all_grants_and_a_marker_past_the_end_is_an_empty_last_page() {
    let h = Harness::start().await;
    let key_id = h.create_key("nolimit").await;
    for _ in 0..12 {
        h.create_grant(&key_id).await;
    }
    let page = h.list_grants(json!({"key_id": key_id})).await;
    assert_eq!(page.body["grants"].as_array().unwrap().len(), 12);
    assert_eq!(page.body["truncated"], "false");
    assert_eq!(page.body["next_marker"], "");
    let numeric = h.list_grants(json!({"key_id": key_id, "limit": 100})).await;
    assert_eq!(
        numeric.body["grants"].as_array().unwrap().len(),
        12,
        "limit as a JSON number works"
    );
    let past = h
        .list_grants(json!({"key_id": key_id, "limit": "5", "marker": "40"}))
        .await;
    assert_eq!(past.status, StatusCode::OK);
    assert_eq!(
        past.body,
        json!({"grants": [], "next_marker": "", "truncated": "false", "total": 12})
    );
    h.shutdown().await;
}

#[tokio::test]
async fn listed_grants_carry_every_field_with_operations_in_another_order() {
    let h = Harness::start().await;
    let key_id = h.create_key("shape").await;
    let sent = ["describe-key", "create-datakey", "encrypt-datakey"];
    let created = h
        .kms(
            "create-grant",
            json!({"key_id": key_id, "operations": sent, "grantee_principal": GRANTEE, "name": "my_grant", "retiring_principal": GRANTEE}),
        )
        .await;
    let grant_id = created.body["grant_id"].as_str().unwrap().to_owned();
    assert_eq!(grant_id.len(), 64);
    assert!(grant_id.chars().all(|c| c.is_ascii_hexdigit()));
    let bare = h
        .kms(
            "create-grant",
            json!({"key_id": key_id, "operations": ["describe-key"], "grantee_principal": "abc"}),
        )
        .await;
    assert_eq!(bare.status, StatusCode::OK);

    let listed = h.list_grants(json!({"key_id": key_id})).await.body;
    let grants = listed["grants"].as_array().unwrap();
    let full = grants
        .iter()
        .find(|g| g["grant_id"] == grant_id.as_str())
        .unwrap();
    assert_eq!(full["key_id"], key_id.as_str());
    assert_eq!(full["grantee_principal"], GRANTEE);
    assert_eq!(full["grantee_principal_type"], "user");
    assert_eq!(full["name"], "my_grant");
    assert_eq!(full["retiring_principal"], GRANTEE);
    assert_eq!(
        full["issuing_principal"],
        h.emulator.config().user_id.as_str()
    );
    let operations: Vec<&str> = full["operations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_str().unwrap())
        .collect();
    assert_ne!(operations, sent, "operations come back in another order");
    assert_eq!(
        operations.iter().collect::<BTreeSet<_>>(),
        sent.iter().collect::<BTreeSet<_>>()
    );
    let creation = full["creation_date"]
        .as_str()
        .expect("creation_date is a string");
    let millis: u64 = creation.parse().unwrap();
    assert!(
        millis > 1_600_000_000_000,
        "creation_date is in milliseconds: {creation}"
    );

    let other = grants
        .iter()
        .find(|g| g["grant_id"] != grant_id.as_str())
        .unwrap();
    assert_eq!(other["grantee_principal_type"], "user", "always present");
    assert!(other.get("name").is_none() && other.get("retiring_principal").is_none());
    h.shutdown().await;
}

#[tokio::test]
async fn the_per_key_quota_frees_up_after_a_revoke() {
    let h = Harness::start_with(EmulatorConfig {
        grants_per_key: 3,
        ..EmulatorConfig::for_tests()
    })
    .await;
    let key_id = h.create_key("quota").await;
    let grants = [
        h.create_grant(&key_id).await,
        h.create_grant(&key_id).await,
        h.create_grant(&key_id).await,
    ];
    let refused = h
        .kms(
            "create-grant",
            json!({"key_id": key_id, "grantee_principal": "x", "operations": ["describe-key"]}),
        )
        .await;
    assert_eq!(
        (refused.status, refused.error_code()),
        (StatusCode::BAD_REQUEST, Some("KMS.2404"))
    );
    let quotas = h
        .send(
            h.http
                .get(h.kms_url("user-quotas"))
                .header("X-Auth-Token", &h.token),
        )
        .await;
    assert_eq!(
        quotas.body["quotas"]["resources"][1],
        json!({"type": "grant_per_CMK", "used": 3, "quota": 3})
    );
    assert_eq!(
        h.kms(
            "revoke-grant",
            json!({"key_id": key_id, "grant_id": grants[0]})
        )
        .await
        .status,
        StatusCode::OK
    );
    h.create_grant(&key_id).await;
    assert_eq!(h.emulator.admin().grant_count(&key_id), Some(3));
    h.shutdown().await;
}

#[tokio::test]
async fn default_master_keys_exist_from_the_start_and_refuse_grants() {
    let h = Harness::start().await;
    let described = h
        .kms("describe-key", json!({"key_id": "alias/obs/default"}))
        .await;
    assert_eq!(described.status, StatusCode::OK);
    assert_eq!(described.body["key_info"]["default_key_flag"], "1");
    let key_id = default_key_id(&h.emulator, "obs/default");
    let refused = h
        .kms(
            "create-grant",
            json!({"key_id": key_id, "grantee_principal": GRANTEE, "operations": ["describe-key"]}),
        )
        .await;
    assert_eq!(refused.error_code(), Some("KMS.0211"));
    let keys = h.kms("list-keys", json!({})).await;
    assert!(
        keys.body["key_details"]
            .as_array()
            .unwrap()
            .iter()
            .any(|k| k["key_alias"] == "evs/default")
    );
    h.shutdown().await;
}

#[tokio::test]
async fn disabled_and_pending_deletion_keys_refuse_grants_until_enabled_again() {
    let h = Harness::start().await;
    let key_id = h.create_key("lifecycle").await;
    let grant =
        json!({"key_id": key_id, "grantee_principal": GRANTEE, "operations": ["describe-key"]});
    let disabled = h.kms("disable-key", json!({"key_id": key_id})).await;
    assert_eq!(
        disabled.body,
        json!({"key_info": {"key_id": key_id, "key_state": "3"}})
    );
    assert_eq!(
        h.kms("create-grant", grant.clone()).await.error_code(),
        Some("KMS.0209")
    );
    let enabled = h.kms("enable-key", json!({"key_id": key_id})).await;
    assert_eq!(enabled.body["key_info"]["key_state"], "2");
    assert_eq!(
        h.kms("create-grant", grant.clone()).await.status,
        StatusCode::OK
    );

    let scheduled = h
        .kms(
            "schedule-key-deletion",
            json!({"key_id": key_id, "pending_days": "7"}),
        )
        .await;
    assert_eq!(scheduled.body, json!({"key_id": key_id, "key_state": "4"}));
    assert_eq!(
        h.kms("create-grant", grant.clone()).await.error_code(),
        Some("KMS.0210")
    );
    let described = h.kms("describe-key", json!({"key_id": key_id})).await;
    assert_ne!(described.body["key_info"]["scheduled_deletion_date"], "");
    let cancelled = h
        .kms("cancel-key-deletion", json!({"key_id": key_id}))
        .await;
    assert_eq!(cancelled.body, json!({"key_id": key_id, "key_state": "3"}));
    assert_eq!(
        h.kms("create-grant", grant.clone()).await.error_code(),
        Some("KMS.0209")
    );
    h.kms("enable-key", json!({"key_id": key_id})).await;
    assert_eq!(h.kms("create-grant", grant).await.status, StatusCode::OK);
    h.shutdown().await;
}

#[tokio::test]
async fn revoking_an_unknown_or_already_revoked_grant_answers_invalid_grant_id() {
    let h = Harness::start().await;
    let key_id = h.create_key("revoke-twice").await;
    let other_key = h.create_key("revoke-other").await;
    let grant_id = h.create_grant(&key_id).await;
    let mismatch = h
        .kms(
            "revoke-grant",
            json!({"key_id": other_key, "grant_id": grant_id}),
        )
        .await;
    assert_eq!(mismatch.error_code(), Some("KMS.2502"));
    let first = h
        .kms(
            "revoke-grant",
            json!({"key_id": key_id, "grant_id": grant_id}),
        )
        .await;
    assert_eq!(
        (first.status, first.body.clone()),
        (StatusCode::OK, json!({}))
    );
    let second = h
        .kms(
            "revoke-grant",
            json!({"key_id": key_id, "grant_id": grant_id}),
        )
        .await;
    assert_eq!(
        (second.status, second.error_code()),
        (StatusCode::BAD_REQUEST, Some("KMS.2501"))
    );
    let out_of_band = h.create_grant(&key_id).await;
    assert!(
        h.emulator
            .admin()
            .revoke_out_of_band(&out_of_band)
            .is_some()
    );
    let gone = h
        .kms(
            "revoke-grant",
            json!({"key_id": key_id, "grant_id": out_of_band}),
        )
        .await;
    assert_eq!(gone.error_code(), Some("KMS.2501"));
    h.shutdown().await;
}

#[tokio::test]
async fn retire_is_allowed_to_the_grantor_the_retiring_principal_and_a_grantee_holding_retire_grant()
 {
    let h = Harness::start().await;
    let admin = h.emulator.admin();
    let mut tokens = std::collections::HashMap::new();
    let mut ids = std::collections::HashMap::new();
    for name in ["grantee", "retirer", "stranger"] {
        let user = admin.add_user(NewUser {
            name: name.into(),
            password: "pw".into(),
            user_id: None,
            access_key: None,
            secret_key: None,
        });
        tokens.insert(
            name,
            admin
                .issue_token(&user.user_id, TokenScope::Project(h.project_id()), 3600)
                .0,
        );
        ids.insert(name, user.user_id);
    }
    let key_id = h.create_key("retire").await;
    let create = |operations: Value, retiring: Option<&str>| {
        let mut body = json!({"key_id": key_id, "grantee_principal": ids["grantee"], "operations": operations});
        if let Some(retiring) = retiring {
            body["retiring_principal"] = json!(retiring);
        }
        body
    };
    let retire = |grant_id: &str| json!({"key_id": key_id, "grant_id": grant_id});
    let grant_id = |answer: support::Answer| answer.body["grant_id"].as_str().unwrap().to_owned();

    // A grantee without retire-grant and a stranger may not; the grantor may.
    let plain = grant_id(
        h.kms("create-grant", create(json!(["describe-key"]), None))
            .await,
    );
    for who in ["grantee", "stranger"] {
        let refused = h
            .kms_with_token(&tokens[who], "retire-grant", retire(&plain))
            .await;
        assert_eq!(
            (refused.status, refused.error_code()),
            (StatusCode::FORBIDDEN, Some("KMS.0306")),
            "{who}"
        );
    }
    assert_eq!(
        h.kms("retire-grant", retire(&plain)).await.status,
        StatusCode::OK,
        "the grantor"
    );

    let with_retirer = grant_id(
        h.kms(
            "create-grant",
            create(json!(["describe-key"]), Some(&ids["retirer"])),
        )
        .await,
    );
    let listed = h
        .kms_with_token(
            &tokens["retirer"],
            "list-retirable-grants",
            json!({"limit": "", "marker": ""}),
        )
        .await;
    assert_eq!(listed.body["total"], 1);
    assert_eq!(listed.body["grants"][0]["grant_id"], with_retirer.as_str());
    assert_eq!(
        h.kms_with_token(&tokens["retirer"], "retire-grant", retire(&with_retirer))
            .await
            .status,
        StatusCode::OK
    );

    let holding = grant_id(
        h.kms(
            "create-grant",
            create(json!(["describe-key", "retire-grant"]), None),
        )
        .await,
    );
    assert_eq!(
        h.kms_with_token(&tokens["grantee"], "retire-grant", retire(&holding))
            .await
            .status,
        StatusCode::OK
    );

    // Revoke belongs to the key's creator alone.
    let revocable = grant_id(
        h.kms(
            "create-grant",
            create(json!(["describe-key", "retire-grant"]), None),
        )
        .await,
    );
    let refused = h
        .kms_with_token(&tokens["grantee"], "revoke-grant", retire(&revocable))
        .await;
    assert_eq!(refused.error_code(), Some("KMS.0306"));
    assert_eq!(
        h.kms("revoke-grant", retire(&revocable)).await.status,
        StatusCode::OK
    );
    h.shutdown().await;
}

#[tokio::test]
async fn concurrent_create_grants_never_exceed_the_quota() {
    let h = Harness::start().await;
    let key_id = h.create_key("concurrent").await;
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let http = h.http.clone();
        let url = h.kms_url("create-grant");
        let token = h.token.clone();
        let key_id = key_id.clone();
        tasks.push(tokio::spawn(async move {
            let mut statuses = Vec::new();
            for _ in 0..25 {
                let response = http
                    .post(&url)
                    .header("X-Auth-Token", &token)
                    .json(&json!({"key_id": key_id, "grantee_principal": GRANTEE, "operations": ["describe-key"]}))
                    .send()
                    .await
                    .unwrap();
                statuses.push(response.status().as_u16());
            }
            statuses
        }));
    }
    let mut ok = 0;
    let mut refused = 0;
    for task in tasks {
        for status in task.await.unwrap() {
            match status {
                200 => ok += 1,
                400 => refused += 1,
                other => panic!("unexpected status {other}"),
            }
        }
    }
    assert_eq!((ok, refused), (100, 100));
    assert_eq!(h.emulator.admin().grant_count(&key_id), Some(100));
    let (seen, total) = walk(&h, &key_id, 100).await;
    assert_eq!((seen.len(), total), (100, 100));
    h.shutdown().await;
}
