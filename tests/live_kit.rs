//! `kmsgrant-operator live-test`, proven on the emulator: pointed at it through the
//! `KMSGRANT_LIVE_*` variables every case matches and no grant of the kit is left; with a
//! difference injected (list-grants without names) the name round trip is reported as DIFFERS
//! and the cleanup still removes every grant the run made, by ID, even after Ctrl-C; a grant the
//! kit did not name is never touched; a missing variable is named, exit 2. Loopback only.

mod support;

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use kms_emulator::{Emulator, EmulatorConfig, FaultSettings, RunningEmulator};
use serde_json::Value;
use support::{OPERATOR_BIN, grant_by_hand, kms_client_of};

const PRINCIPAL: &str = "0d0466b00d0466b00d0466b0";
const KIT_PREFIX: &str = "kmsgrant-live-test/";

struct World {
    emulator: RunningEmulator,
    key: String,
}

async fn world(alias: &str) -> World {
    let emulator = Emulator::start(EmulatorConfig::for_tests()).await.unwrap();
    let key = emulator
        .admin()
        .create_key(kms_emulator::NewKey {
            key_alias: alias.into(),
            ..Default::default()
        })
        .unwrap()
        .key_id;
    World { emulator, key }
}

/// `live-test` as a user runs it: the account in the environment, nothing on the command line
/// but the output format and the emulator's plain http.
fn live_test(world: &World, extra: &[&str]) -> Command {
    let config = world.emulator.config();
    let mut command = Command::new(OPERATOR_BIN);
    command
        .arg("live-test")
        .arg("--allow-http-endpoints")
        .args(extra)
        .env("KMSGRANT_LIVE_ENDPOINT", world.emulator.base_url())
        .env("KMSGRANT_LIVE_REGION", &config.region)
        .env("KMSGRANT_LIVE_PROJECT_ID", &config.project_id)
        .env("KMSGRANT_LIVE_ACCESS_KEY", &config.access_key)
        .env("KMSGRANT_LIVE_SECRET_KEY", config.secret_key.as_str())
        .env("KMSGRANT_LIVE_SIGNING", "Huawei")
        .env("KMSGRANT_LIVE_KEY_ID", &world.key)
        .env("KMSGRANT_LIVE_PRINCIPAL", PRINCIPAL)
        .env_remove("KMSGRANT_LIVE_IAM_ENDPOINT");
    command
}

/// Runs the command off the runtime that serves the emulator.
async fn output(mut command: Command) -> Output {
    tokio::task::spawn_blocking(move || command.output().expect("the binary runs"))
        .await
        .unwrap()
}

fn json_report(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "live-test printed no JSON report ({e}):\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn result_of<'a>(report: &'a Value, case: &str) -> &'a Value {
    report["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["case"] == case)
        .unwrap_or_else(|| panic!("no case {case}: {report:#}"))
}

/// The grants on the key whose name the kit gives.
fn kit_grants(world: &World) -> Vec<kms_emulator::Grant> {
    world
        .emulator
        .admin()
        .dump()
        .grants
        .into_iter()
        .filter(|g| {
            g.key_id == world.key && g.name.as_deref().is_some_and(|n| n.starts_with(KIT_PREFIX))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pointed_at_the_emulator_every_case_matches_and_no_kit_grant_is_left() {
    let world = world("live-kit-ok").await;
    let out = output(live_test(&world, &["-o", "json"])).await;
    let report = json_report(&out);
    assert!(
        out.status.success(),
        "exit {:?}: {report:#}\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    let cases = report["cases"].as_array().unwrap();
    assert!(cases.len() >= 20, "{} cases", cases.len());
    assert_eq!(cases[0]["case"], "name-round-trip", "grant identity first");
    for case in cases {
        let expected = if case["case"] == "throttling" {
            "skip"
        } else {
            "ok"
        };
        assert_eq!(case["result"], expected, "{case:#}");
        assert!(case["documented"].as_str().is_some_and(|d| !d.is_empty()));
    }
    assert_eq!(report["summary"]["differs"], 0);
    assert_eq!(report["summary"]["errors"], 0);
    assert_eq!(report["cleanup"]["left"], serde_json::json!([]));
    assert!(report["footer"].as_str().unwrap().contains("bug report"));
    assert!(kit_grants(&world).is_empty(), "{:?}", kit_grants(&world));
    assert_eq!(world.emulator.admin().grant_count(&world.key), Some(0));
    // Every grant the kit created carried its run's prefix, and every create it sent named one.
    let run = report["run"].as_str().unwrap();
    let creates: Vec<_> = world
        .emulator
        .admin()
        .calls(0)
        .into_iter()
        .filter(|c| c.operation == "create-grant")
        .collect();
    assert!(creates.len() >= 15, "{} creates", creates.len());
    for create in &creates {
        let name = create.grant_name.as_deref().unwrap_or_default();
        assert!(
            name.starts_with(&format!("{KIT_PREFIX}{run}/")),
            "create-grant named {name:?}"
        );
    }
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains(world.emulator.config().secret_key.as_str()),
        "the report holds no credential"
    );
    world.emulator.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_listing_grants_without_names_differs_and_is_still_cleaned_up_by_id() {
    let world = world("live-kit-no-names").await;
    let kms = kms_client_of(&world.emulator);
    let foreign = grant_by_hand(&kms, &world.key, PRINCIPAL, Some("app-grant")).await;
    world
        .emulator
        .admin()
        .set_faults(FaultSettings {
            omit_grant_names: true,
            ..Default::default()
        })
        .unwrap();

    let out = output(live_test(&world, &["-o", "json"])).await;
    let report = json_report(&out);
    assert_eq!(out.status.code(), Some(1), "{report:#}");
    let round_trip = result_of(&report, "name-round-trip");
    assert_eq!(round_trip["result"], "differs", "{round_trip:#}");
    assert!(
        round_trip["got"]
            .as_str()
            .unwrap()
            .contains("without a name"),
        "{round_trip:#}"
    );
    assert!(
        round_trip["consequence"]
            .as_str()
            .unwrap()
            .contains("GrantNamesNotReturned"),
        "{round_trip:#}"
    );
    assert_eq!(
        result_of(&report, "operator-lifecycle")["result"],
        "differs"
    );
    // What does not depend on names still matches.
    for case in [
        "paging",
        "revoke-and-list",
        "revoke-unknown-grant",
        "describe-key",
    ] {
        assert_eq!(result_of(&report, case)["result"], "ok", "{case}");
    }
    assert_eq!(report["cleanup"]["left"], serde_json::json!([]));

    // Stopped by Ctrl-C while the paging case holds three grants it cannot find by name: the
    // cleanup revokes them by the IDs the run created.
    let mut faults = world.emulator.admin().faults();
    faults.latency_ms = 300;
    world.emulator.admin().set_faults(faults).unwrap();
    let mut child = live_test(&world, &["-o", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while world.emulator.admin().grant_count(&world.key) != Some(4) {
        assert!(
            Instant::now() < deadline,
            "the paging case never held its three grants"
        );
        assert!(child.try_wait().unwrap().is_none(), "the kit ended early");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let interrupt = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(interrupt.success());
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    let report = json_report(&out);
    assert_eq!(out.status.code(), Some(1), "{report:#}");
    assert_eq!(report["interrupted"], true);
    let removed = report["cleanup"]["removed"].as_array().unwrap();
    assert!(!removed.is_empty(), "{report:#}");
    assert!(
        removed.iter().all(|g| g["found_by"] == "grant ID"),
        "{removed:#?}"
    );
    assert_eq!(report["cleanup"]["left"], serde_json::json!([]));

    world
        .emulator
        .admin()
        .set_faults(FaultSettings::default())
        .unwrap();
    assert!(kit_grants(&world).is_empty(), "{:?}", kit_grants(&world));
    let left: Vec<String> = world
        .emulator
        .admin()
        .dump()
        .grants
        .into_iter()
        .map(|g| g.grant_id)
        .collect();
    assert_eq!(
        left,
        [foreign],
        "only the grant the kit did not make is left"
    );
    world.emulator.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_the_kit_did_not_name_is_never_touched() {
    let world = world("live-kit-foreign").await;
    let kms = kms_client_of(&world.emulator);
    let named = grant_by_hand(&kms, &world.key, PRINCIPAL, Some("app-grant")).await;
    let unnamed = grant_by_hand(&kms, &world.key, PRINCIPAL, None).await;
    let earlier_run = grant_by_hand(
        &kms,
        &world.key,
        PRINCIPAL,
        Some("kmsgrant-live-test/0123456789ab/name-round-trip"),
    )
    .await;
    let before = world.emulator.admin().calls(0).last().unwrap().seq;

    let out = output(live_test(&world, &[])).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.lines()
            .next()
            .unwrap()
            .starts_with("kmsgrant-operator live-test"),
        "{text}"
    );
    assert!(text.contains("ok       name-round-trip"), "{text}");
    assert!(
        text.contains("note     1 grant(s) of earlier kit runs are on the key, untouched"),
        "{text}"
    );
    assert!(text.contains(&earlier_run), "{text}");
    assert!(text.trim_end().ends_with("holds no credential."), "{text}");

    let mut left: Vec<String> = world
        .emulator
        .admin()
        .dump()
        .grants
        .into_iter()
        .map(|g| g.grant_id)
        .collect();
    left.sort();
    let mut expected = vec![named.clone(), unnamed.clone(), earlier_run.clone()];
    expected.sort();
    assert_eq!(left, expected);
    let touched: Vec<_> = world
        .emulator
        .admin()
        .calls(before)
        .into_iter()
        .filter(|c| matches!(c.operation.as_str(), "revoke-grant" | "retire-grant"))
        .filter(|c| {
            c.grant_id.as_deref().is_some_and(|id| {
                [named.as_str(), unnamed.as_str(), earlier_run.as_str()].contains(&id)
            })
        })
        .collect();
    assert!(touched.is_empty(), "{touched:?}");
    world.emulator.shutdown().await;
}

#[tokio::test]
async fn without_the_account_it_names_every_missing_variable_and_exits_2() {
    let mut command = Command::new(OPERATOR_BIN);
    command.arg("live-test");
    for (name, _) in std::env::vars() {
        if name.starts_with("KMSGRANT_LIVE_") {
            command.env_remove(name);
        }
    }
    let out = output(command).await;
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for variable in [
        "KMSGRANT_LIVE_ENDPOINT",
        "KMSGRANT_LIVE_REGION",
        "KMSGRANT_LIVE_PROJECT_ID",
        "KMSGRANT_LIVE_ACCESS_KEY",
        "KMSGRANT_LIVE_SECRET_KEY",
        "KMSGRANT_LIVE_SIGNING",
        "KMSGRANT_LIVE_KEY_ID",
        "KMSGRANT_LIVE_PRINCIPAL",
    ] {
        assert!(stderr.contains(variable), "{variable}: {stderr}");
    }
    assert!(out.stdout.is_empty(), "no report without an account");
}
