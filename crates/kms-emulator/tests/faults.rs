//! Misbehaviour on purpose and observation: injected errors and the throttle at their configured
//! rates (measured over hundreds of calls, with generous bounds), latency, commit-then-drop,
//! counters, the call log, the admin HTTP API, reset and the state file.
mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use kms_emulator::{Emulator, EmulatorConfig, ErrorInjection, FaultSettings, InjectedError};
use reqwest::StatusCode;
use serde_json::{Value, json};
use support::{GRANTEE, Harness, ToSign, Variant};

fn errors(pairs: &[(&str, f64, InjectedError)]) -> BTreeMap<String, ErrorInjection> {
    pairs
        .iter()
        .map(|(op, rate, error)| {
            (
                (*op).to_owned(),
                ErrorInjection {
                    rate: *rate,
                    error: *error,
                },
            )
        })
        .collect()
}

#[tokio::test]
async fn injected_errors_answer_the_configured_code_at_about_the_configured_rate() {
    let h = Harness::start().await;
    let key_id = h.create_key("inject").await;
    let admin = h.emulator.admin();
    admin
        .set_faults(FaultSettings {
            errors: errors(&[("list-grants", 0.3, InjectedError::Internal)]),
            ..Default::default()
        })
        .unwrap();
    let mut failed = 0;
    for _ in 0..300 {
        let answer = h.list_grants(json!({"key_id": key_id})).await;
        match answer.status {
            StatusCode::OK => {}
            StatusCode::INTERNAL_SERVER_ERROR => {
                assert_eq!(answer.error_code(), Some("KMS.0100"));
                failed += 1;
            }
            other => panic!("unexpected {other}"),
        }
    }
    // Binomial(300, 0.3): mean 90, sd 7.9; the bounds are about 5 sd wide.
    assert!(
        (50..=130).contains(&failed),
        "{failed} of 300 failed at rate 0.3"
    );
    assert_eq!(admin.stats().count("list-grants", "500"), failed);
    assert_eq!(
        h.create_grant(&key_id).await.len(),
        64,
        "other operations are untouched"
    );

    admin
        .set_faults(FaultSettings {
            errors: errors(&[
                ("*", 1.0, InjectedError::Unavailable),
                ("describe-key", 1.0, InjectedError::Throttled),
            ]),
            ..Default::default()
        })
        .unwrap();
    let unavailable = h.list_grants(json!({"key_id": key_id})).await;
    assert_eq!(
        (unavailable.status, unavailable.error_code()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("KMS.0104"))
    );
    assert!(unavailable.body["error"]["error_msg"].is_string());
    let throttled = h.kms("describe-key", json!({"key_id": key_id})).await;
    assert_eq!(
        (throttled.status, throttled.error_code()),
        (StatusCode::TOO_MANY_REQUESTS, Some("APIG.0308"))
    );
    assert!(
        throttled.body["request_id"].is_string(),
        "gateway errors use the flat body"
    );
    h.shutdown().await;
}

#[tokio::test]
async fn the_throttle_answers_429_beyond_the_rate_of_each_credential() {
    let h = Harness::start().await;
    let key_id = h.create_key("throttle").await;
    h.emulator
        .admin()
        .set_faults(FaultSettings {
            throttle_per_second: Some(20.0),
            ..Default::default()
        })
        .unwrap();
    let started = Instant::now();
    let (mut ok, mut throttled) = (0u64, 0u64);
    for _ in 0..300 {
        let answer = h.list_grants(json!({"key_id": key_id})).await;
        match (answer.status, answer.error_code()) {
            (StatusCode::OK, None) => ok += 1,
            (StatusCode::TOO_MANY_REQUESTS, Some("APIG.0308")) => throttled += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    let allowed = 20.0 + 20.0 * started.elapsed().as_secs_f64();
    assert!(ok >= 20, "the first second's worth passes: {ok}");
    assert!(
        (ok as f64) <= allowed + 2.0,
        "{ok} passed, at most {allowed:.0} allowed"
    );
    assert_eq!(ok + throttled, 300);

    // Another credential (the access key) has its own budget.
    let path = format!("/v1.0/{}/kms/list-keys", h.project_id());
    let signed = h
        .send_signed(
            &Variant::Huawei,
            &ToSign {
                method: "POST",
                path: &path,
                query: "",
                headers: &[],
                body: b"{}",
            },
        )
        .await;
    assert_eq!(signed.status, StatusCode::OK);
    h.shutdown().await;
}

#[tokio::test]
async fn latency_delays_every_kms_call_by_at_least_the_fixed_part() {
    let h = Harness::start().await;
    h.emulator
        .admin()
        .set_faults(FaultSettings {
            latency_ms: 40,
            jitter_ms: 20,
            ..Default::default()
        })
        .unwrap();
    for _ in 0..5 {
        let started = Instant::now();
        assert_eq!(h.kms("list-keys", json!({})).await.status, StatusCode::OK);
        assert!(started.elapsed() >= Duration::from_millis(40));
    }
    h.shutdown().await;
}

#[tokio::test]
async fn a_dropped_create_or_revoke_takes_effect_but_is_never_answered() {
    let h = Harness::start().await;
    let key_id = h.create_key("drop").await;
    let admin = h.emulator.admin();
    admin
        .set_faults(FaultSettings {
            drop_after_commit: [("create-grant".to_owned(), 1.0)].into(),
            ..Default::default()
        })
        .unwrap();
    let sent = h
        .http
        .post(h.kms_url("create-grant"))
        .header("X-Auth-Token", &h.token)
        .json(&json!({"key_id": key_id, "grantee_principal": GRANTEE, "operations": ["describe-key"]}))
        .send()
        .await;
    assert!(sent.is_err(), "no answer: {sent:?}");
    assert_eq!(admin.grant_count(&key_id), Some(1), "but the grant exists");
    assert_eq!(admin.stats().count("create-grant", "dropped"), 1);

    let grant_id = admin
        .dump()
        .grants
        .into_iter()
        .find(|g| g.key_id == key_id)
        .unwrap()
        .grant_id;
    admin
        .set_faults(FaultSettings {
            drop_after_commit: [("revoke-grant".to_owned(), 1.0)].into(),
            ..Default::default()
        })
        .unwrap();
    let revoke = h
        .http
        .post(h.kms_url("revoke-grant"))
        .header("X-Auth-Token", &h.token)
        .json(&json!({"key_id": key_id, "grant_id": grant_id}))
        .send()
        .await;
    assert!(revoke.is_err());
    assert_eq!(
        admin.grant_count(&key_id),
        Some(0),
        "the revoke took effect"
    );
    let retried = h
        .kms(
            "revoke-grant",
            json!({"key_id": key_id, "grant_id": grant_id}),
        )
        .await;
    assert_eq!(
        retried.error_code(),
        Some("KMS.2501"),
        "a retry finds the grant gone"
    );
    h.shutdown().await;
}

#[tokio::test]
async fn commit_then_drop_happens_at_about_the_configured_rate() {
    let h = Harness::start_with(EmulatorConfig {
        grants_per_key: 1000,
        ..EmulatorConfig::for_tests()
    })
    .await;
    let key_id = h.create_key("drop-rate").await;
    let admin = h.emulator.admin();
    admin
        .set_faults(FaultSettings {
            drop_after_commit: [("create-grant".to_owned(), 0.5)].into(),
            ..Default::default()
        })
        .unwrap();
    let mut unanswered = 0;
    for _ in 0..200 {
        let sent = h
            .http
            .post(h.kms_url("create-grant"))
            .header("X-Auth-Token", &h.token)
            .json(&json!({"key_id": key_id, "grantee_principal": GRANTEE, "operations": ["describe-key"]}))
            .send()
            .await;
        if sent.is_err() {
            unanswered += 1;
        }
    }
    // Binomial(200, 0.5): mean 100, sd 7.1.
    assert!(
        (65..=135).contains(&unanswered),
        "{unanswered} of 200 dropped at rate 0.5"
    );
    assert_eq!(admin.stats().count("create-grant", "dropped"), unanswered);
    assert_eq!(
        admin.grant_count(&key_id),
        Some(200),
        "every write took effect"
    );
    h.shutdown().await;
}

#[tokio::test]
async fn omitted_grant_names_leave_the_grants_and_their_names_in_place() {
    let h = Harness::start().await;
    let key_id = h.create_key("names").await;
    // Retirable by the caller too, so list-retirable-grants shows it.
    let me = h.emulator.config().user_id.clone();
    let named = |name: &str| {
        json!({"key_id": key_id, "grantee_principal": GRANTEE, "operations": ["describe-key"],
               "name": name, "retiring_principal": me})
    };
    assert_eq!(
        h.kms("create-grant", named("k8s/c1/ns/app")).await.status,
        StatusCode::OK
    );
    let names = |answer: &Value| -> Vec<Option<String>> {
        answer["grants"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g["name"].as_str().map(str::to_owned))
            .collect()
    };
    let listed = h.list_grants(json!({"key_id": key_id})).await;
    assert_eq!(names(&listed.body), [Some("k8s/c1/ns/app".to_owned())]);

    h.emulator
        .admin()
        .set_faults(FaultSettings {
            omit_grant_names: true,
            ..Default::default()
        })
        .unwrap();
    let stripped = h.list_grants(json!({"key_id": key_id})).await;
    assert_eq!(stripped.status, StatusCode::OK);
    assert_eq!(names(&stripped.body), [None], "{}", stripped.body);
    let grant = &stripped.body["grants"][0];
    assert!(grant.get("name").is_none(), "the field is absent: {grant}");
    // Everything else is answered as before, paging included.
    for field in [
        "grant_id",
        "grantee_principal",
        "operations",
        "retiring_principal",
    ] {
        assert_eq!(grant[field], listed.body["grants"][0][field], "{field}");
    }
    assert_eq!(stripped.body["truncated"], "false");
    assert_eq!(stripped.body["total"], 1);
    let retirable = h.kms("list-retirable-grants", json!({})).await;
    assert_eq!(names(&retirable.body), [None], "{}", retirable.body);
    // Only the answers lose the name: the grant keeps it.
    let dump = h.emulator.admin().dump();
    assert_eq!(dump.grants[0].name.as_deref(), Some("k8s/c1/ns/app"));

    h.emulator
        .admin()
        .set_faults(FaultSettings::default())
        .unwrap();
    let again = h.list_grants(json!({"key_id": key_id})).await;
    assert_eq!(names(&again.body), [Some("k8s/c1/ns/app".to_owned())]);
    h.shutdown().await;
}

#[tokio::test]
async fn counters_and_the_call_log_show_what_was_called_in_order() {
    let h = Harness::start().await;
    let admin = h.emulator.admin();
    admin.clear_stats();
    let key_id = h.create_key("log").await;
    let grant_id = h.create_grant(&key_id).await;
    h.kms(
        "revoke-grant",
        json!({"key_id": key_id, "grant_id": grant_id}),
    )
    .await;
    h.kms(
        "revoke-grant",
        json!({"key_id": key_id, "grant_id": grant_id}),
    )
    .await;

    let stats = admin.stats();
    assert_eq!(stats.count("create-grant", "200"), 1);
    assert_eq!(stats.count("revoke-grant", "200"), 1);
    assert_eq!(stats.count("revoke-grant", "400"), 1);
    assert_eq!(stats.by_error_code["revoke-grant"]["KMS.2501"], 1);

    let calls: Value = h
        .send(
            h.http
                .get(format!("{}/_emulator/calls", h.emulator.base_url())),
        )
        .await
        .body;
    let operations: Vec<&str> = calls
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["operation"].as_str().unwrap())
        .collect();
    assert_eq!(
        operations,
        ["create-key", "create-grant", "revoke-grant", "revoke-grant"]
    );
    assert_eq!(calls[1]["grant_id"], grant_id.as_str());
    assert_eq!(calls[2]["key_id"], key_id.as_str());
    assert_eq!(calls[3]["error_code"], "KMS.2501");
    let later = admin.calls(calls[1]["seq"].as_u64().unwrap());
    assert_eq!(later.len(), 2);
    h.shutdown().await;
}

#[tokio::test]
async fn the_admin_http_api_sets_faults_dumps_state_and_resets() {
    let h = Harness::start().await;
    let base = format!("{}/_emulator", h.emulator.base_url());
    let key = h
        .send(h.http.post(format!("{base}/keys")).json(
            &json!({"key_alias": "admin-key", "key_id": "0d0466b0-e727-4d9c-b35d-f84bb474a37f"}),
        ))
        .await;
    assert_eq!(key.status, StatusCode::CREATED);
    let key_id = "0d0466b0-e727-4d9c-b35d-f84bb474a37f";
    let grant_id = h.create_grant(key_id).await;
    let count = h
        .send(h.http.get(format!("{base}/keys/{key_id}/grant-count")))
        .await;
    assert_eq!(count.body, json!({"key_id": key_id, "grant_count": 1}));
    let disabled = h
        .send(
            h.http
                .put(format!("{base}/keys/{key_id}/state"))
                .json(&json!({"key_state": "3"})),
        )
        .await;
    assert_eq!(disabled.body["key_state"], "3");

    let faults = json!({"latency_ms": 0, "jitter_ms": 0, "errors": {"create-key": {"rate": 1.0, "error": "unavailable"}},
                        "throttle_per_second": null, "drop_after_commit": {"revoke-grant": 0.25},
                        "error_after_commit": {"create-grant": 0.5}, "clock_offset_seconds": 0,
                        "omit_grant_names": false});
    let set = h
        .send(h.http.put(format!("{base}/faults")).json(&faults))
        .await;
    assert_eq!(set.body, faults);
    let bad = h
        .send(
            h.http
                .put(format!("{base}/faults"))
                .json(&json!({"drop_after_commit": {"list-keys": 0.5}})),
        )
        .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        h.kms("create-key", json!({"key_alias": "x"}))
            .await
            .error_code(),
        Some("KMS.0104")
    );

    let state = h.send(h.http.get(format!("{base}/state"))).await.body;
    assert_eq!(state["grants"][0]["grant_id"], grant_id.as_str());
    assert!(state["keys"].as_array().unwrap().len() >= 3);
    assert_eq!(
        state["users"][0]["access_key"],
        h.emulator.config().access_key.as_str()
    );
    assert!(
        !state
            .to_string()
            .contains(h.emulator.config().secret_key.as_str()),
        "no secrets in the dump"
    );

    let removed = h
        .send(h.http.delete(format!("{base}/grants/{grant_id}")))
        .await;
    assert_eq!(removed.body["grant_id"], grant_id.as_str());
    assert_eq!(
        h.send(h.http.post(format!("{base}/reset"))).await.status,
        StatusCode::NO_CONTENT
    );
    let after = h.send(h.http.get(format!("{base}/state"))).await.body;
    let aliases: Vec<&str> = after["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["key_alias"].as_str().unwrap())
        .collect();
    assert_eq!(aliases, ["obs/default", "evs/default"]);
    assert_eq!(
        h.send(h.http.get(format!("{base}/stats"))).await.body["total"],
        0
    );
    assert_eq!(
        h.send(h.http.get(format!("{base}/faults"))).await.body["errors"],
        json!({})
    );
    assert_eq!(
        h.kms("list-keys", json!({})).await.status,
        StatusCode::OK,
        "tokens survive a reset"
    );
    h.shutdown().await;
}

#[tokio::test]
async fn the_state_file_keeps_keys_and_grants_across_restarts() {
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("state.json");
    let config = EmulatorConfig {
        state_file: Some(path.clone()),
        ..EmulatorConfig::for_tests()
    };
    let h = Harness::start_with(config.clone()).await;
    let key_id = h.create_key("persisted").await;
    let grant_id = h.create_grant(&key_id).await;
    h.shutdown().await;
    assert!(path.exists());

    let again = Emulator::start(config).await.unwrap();
    let dump = again.admin().dump();
    assert!(
        dump.keys
            .iter()
            .any(|k| k.key_id == key_id && k.key_alias == "persisted")
    );
    assert!(dump.grants.iter().any(|g| g.grant_id == grant_id));
    assert_eq!(
        dump.keys.iter().filter(|k| k.default_key).count(),
        2,
        "no duplicate default keys"
    );
    again.shutdown().await;
}

#[test]
fn the_cli_prints_its_defaults_at_start() {
    use std::io::{BufRead, BufReader};
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_kms-emulator"))
        .args(["--listen", "127.0.0.1:0", "--grants-per-key", "7"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let banner: Vec<String> = (0..12)
        .map_while(|_| lines.next().and_then(Result::ok))
        .collect();
    child.kill().unwrap();
    child.wait().unwrap();
    let banner = banner.join("\n");
    assert!(
        banner.starts_with("KMS emulator listening on http://127.0.0.1:"),
        "{banner}"
    );
    for expected in [
        "/v1.0/0a1b2c3d4e5f40718293a4b5c6d7e8f9/kms/",
        "EMULATORACCESSKEY000",
        "emulator-password",
        "7 grants per key",
    ] {
        assert!(
            banner.contains(expected),
            "{expected} missing from\n{banner}"
        );
    }
}
