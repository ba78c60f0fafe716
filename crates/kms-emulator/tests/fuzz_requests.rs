//! Property-based fuzzing of the emulator's request parser, a short bounded run in every suite
//! (`PROPTEST_CASES` raises it): any bytes and any JSON are taken without panicking, and only what
//! the API documents is accepted. Seeds in `tests/fuzz-corpus/requests/` run first, every time; a
//! failure proptest finds is kept in `tests/fuzz_requests.proptest-regressions` and replayed first.

use std::path::Path;

use kms_emulator::validation;
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use serde_json::{Map, Value, json};

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(512),
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "tests/fuzz_requests.proptest-regressions",
        ))),
        ..ProptestConfig::default()
    }
}

fn corpus(dir: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz-corpus")
        .join(dir);
    let mut seeds: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.unwrap().path();
            (
                path.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&path).unwrap(),
            )
        })
        .collect();
    seeds.sort();
    assert!(!seeds.is_empty(), "no seeds in {}", dir.display());
    seeds
}

// ---- the emulator's request parser ----

/// JSON made of the request fields the API knows, with values of every type and shape.
fn request_json() -> impl Strategy<Value = Value> {
    let names = prop_oneof![
        Just("key_id"),
        Just("grant_id"),
        Just("grantee_principal"),
        Just("grantee_principal_type"),
        Just("retiring_principal"),
        Just("operations"),
        Just("name"),
        Just("limit"),
        Just("marker"),
        Just("sequence"),
        Just("key_alias"),
        Just("key_spec"),
        Just("key_usage"),
        Just("pending_days"),
        Just("key_state"),
        Just("origin"),
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|n| json!(n)),
        "[0-9]{1,4}".prop_map(Value::String),
        "[0-9a-z]{8}-[0-9a-z]{4}-[0-9a-z]{4}-[0-9a-z]{4}-[0-9a-z]{12}".prop_map(Value::String),
        "[0-9a-f]{64}".prop_map(Value::String),
        "[a-zA-Z0-9]{1,70}".prop_map(Value::String),
        prop_oneof![
            Just("describe-key"),
            Just("create-grant"),
            Just("encrypt-datakey"),
            Just("retire-grant"),
            Just("user"),
            Just("domain"),
            Just("AES_256"),
            Just("ENCRYPT_DECRYPT"),
        ]
        .prop_map(|s| json!(s)),
        ".{0,80}".prop_map(Value::String),
    ];
    let value = leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(".{0,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    });
    prop::collection::btree_map(names, value, 0..8).prop_map(|fields| {
        Value::Object(fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
    })
}

/// Runs every request validator on `fields` and checks what an accepted request promises.
fn check_request(fields: &Map<String, Value>) -> Result<(), TestCaseError> {
    if let Ok(grant) = validation::create_grant(fields) {
        prop_assert!(validation::is_key_id(&grant.key_id), "{grant:?}");
        prop_assert!(validation::is_principal(&grant.grantee_principal));
        prop_assert!(!grant.operations.is_empty());
        prop_assert!(
            grant
                .operations
                .iter()
                .all(|op| validation::GRANT_OPERATIONS.contains(&op.as_str()))
        );
        prop_assert!(grant.operations != ["create-grant"]);
        prop_assert!(grant.name.as_deref().is_none_or(validation::is_name));
        prop_assert!(
            grant
                .retiring_principal
                .as_deref()
                .is_none_or(validation::is_principal)
        );
        prop_assert!(matches!(
            grant.grantee_principal_type.as_str(),
            "user" | "domain"
        ));
    }
    if let Ok(list) = validation::list_grants(fields) {
        prop_assert!(validation::is_key_id(&list.key_id));
        prop_assert!((1..=validation::MAX_PAGE_SIZE).contains(&list.page.limit));
    }
    if let Ok(target) = validation::grant_on_key(fields) {
        prop_assert!(validation::is_key_id(&target.key_id));
        prop_assert!(validation::is_grant_id(&target.grant_id));
    }
    if let Ok(page) = validation::list_retirable_grants(fields) {
        prop_assert!((1..=validation::MAX_PAGE_SIZE).contains(&page.limit));
    }
    if let Ok(key) = validation::create_key(fields) {
        prop_assert!(validation::is_name(&key.key_alias) && !key.key_alias.ends_with("/default"));
    }
    if let Ok(deletion) = validation::schedule_key_deletion(fields) {
        prop_assert!((7..=1096).contains(&deletion.pending_days), "{deletion:?}");
    }
    let _ = validation::describe_key(fields);
    let _ = validation::key_only(fields);
    let _ = validation::list_keys(fields);
    Ok(())
}

#[test]
fn emulator_request_parser_seeds() {
    for (name, bytes) in corpus("requests") {
        if let Ok(fields) = validation::parse_body(&bytes) {
            check_request(&fields).unwrap_or_else(|e| panic!("seed {name}: {e}"));
        }
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn emulator_request_parser_takes_any_bytes(body in prop::collection::vec(any::<u8>(), 0..512)) {
        match validation::parse_body(&body) {
            Ok(fields) => check_request(&fields)?,
            Err(err) => prop_assert_eq!(err.code().code(), "KMS.0202"),
        }
    }

    #[test]
    fn emulator_request_parser_accepts_only_documented_requests(request in request_json()) {
        let body = serde_json::to_vec(&request).unwrap();
        let fields = validation::parse_body(&body).expect("a JSON object parses");
        check_request(&fields)?;
    }
}
