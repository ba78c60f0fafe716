//! Aliases: `update-key-alias` moves an alias between keys the way the API page describes (one
//! alias per key, unique in the project), and `describe-key` by `alias/<alias>` follows it.
mod support;

use reqwest::StatusCode;
use serde_json::json;
use support::Harness;

async fn resolve(h: &Harness, alias: &str) -> (StatusCode, Option<String>, Option<String>) {
    let answer = h
        .kms("describe-key", json!({"key_id": format!("alias/{alias}")}))
        .await;
    (
        answer.status,
        answer.body["key_info"]["key_id"]
            .as_str()
            .map(str::to_owned),
        answer.error_code().map(str::to_owned),
    )
}

#[tokio::test]
async fn an_alias_moves_from_one_key_to_another_in_two_updates() {
    let h = Harness::start().await;
    let a = h.create_key("app").await;
    let b = h.create_key("app-next").await;
    assert_eq!(resolve(&h, "app").await.1.as_deref(), Some(a.as_str()));

    // The alias is taken while A holds it.
    let taken = h
        .kms("update-key-alias", json!({"key_id": b, "key_alias": "app"}))
        .await;
    assert_eq!(taken.error_code(), Some("KMS.1104"));

    // A gives it up: between the two updates nobody holds it.
    let away = h
        .kms(
            "update-key-alias",
            json!({"key_id": a, "key_alias": "app-retired"}),
        )
        .await;
    assert_eq!(away.status, StatusCode::OK, "{:?}", away.body);
    assert_eq!(
        away.body,
        json!({"key_info": {"key_id": a, "key_alias": "app-retired"}})
    );
    let (status, _, code) = resolve(&h, "app").await;
    assert_eq!(
        (status, code.as_deref()),
        (StatusCode::NOT_FOUND, Some("KMS.0207"))
    );

    let moved = h
        .kms("update-key-alias", json!({"key_id": b, "key_alias": "app"}))
        .await;
    assert_eq!(moved.status, StatusCode::OK, "{:?}", moved.body);
    assert_eq!(resolve(&h, "app").await.1.as_deref(), Some(b.as_str()));
    assert_eq!(
        resolve(&h, "app-retired").await.1.as_deref(),
        Some(a.as_str())
    );
    // The old alias of B is free again, and a key may set its own alias again.
    assert_eq!(resolve(&h, "app-next").await.0, StatusCode::NOT_FOUND);
    let again = h
        .kms("update-key-alias", json!({"key_id": b, "key_alias": "app"}))
        .await;
    assert_eq!(again.status, StatusCode::OK);
    // list-keys and the state dump agree.
    let listed = h.kms("list-keys", json!({})).await;
    let details = listed.body["key_details"].as_array().unwrap();
    let alias_of = |id: &str| {
        details
            .iter()
            .find(|k| k["key_id"] == id)
            .map(|k| k["key_alias"].clone())
    };
    assert_eq!(alias_of(&a), Some(json!("app-retired")));
    assert_eq!(alias_of(&b), Some(json!("app")));
    h.shutdown().await;
}

#[tokio::test]
async fn grants_stay_on_their_key_when_its_alias_moves() {
    let h = Harness::start().await;
    let a = h.create_key("data").await;
    let grant = h.create_grant(&a).await;
    let renamed = h
        .kms(
            "update-key-alias",
            json!({"key_id": a, "key_alias": "data-old"}),
        )
        .await;
    assert_eq!(renamed.status, StatusCode::OK);
    let listed = h.list_grants(json!({"key_id": a})).await;
    assert_eq!(listed.body["grants"][0]["grant_id"], grant.as_str());
    h.shutdown().await;
}

#[tokio::test]
async fn a_disabled_key_may_change_its_alias_and_the_call_is_counted() {
    let h = Harness::start().await;
    let key = h.create_key("dormant").await;
    h.kms("disable-key", json!({"key_id": key})).await;
    h.emulator.admin().clear_stats();
    let renamed = h
        .kms(
            "update-key-alias",
            json!({"key_id": key, "key_alias": "dormant-2"}),
        )
        .await;
    assert_eq!(renamed.status, StatusCode::OK);
    let calls = h.emulator.admin().calls(0);
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].operation, "update-key-alias");
    assert_eq!(calls[0].key_id.as_deref(), Some(key.as_str()));
    h.shutdown().await;
}
