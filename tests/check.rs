//! `kmsgrant-operator check` against the real API server and the emulator: all ok on a healthy
//! install (with the write probe leaving nothing behind), and each injected fault found with the
//! fix it calls for and a non-zero exit.

mod support;

use std::process::Command;

use kms_emulator::{EmulatorConfig, ErrorInjection, FaultSettings, InjectedError};
use serde_json::{Value, json};
use support::{Env, OPERATOR_BIN, kubeconfig};

const LEASE: &str = "check-lease";

/// Runs `check -o json` for this test's namespace and provider config; (exit ok, findings).
fn check(env: &Env, extra: &[&str]) -> (bool, Vec<Value>) {
    let out = Command::new(OPERATOR_BIN)
        .args([
            "check",
            "-o",
            "json",
            "--allow-http-endpoints",
            "--kubeconfig",
        ])
        .arg(kubeconfig())
        .args(["--namespace", &env.namespace, "--lease-name", LEASE])
        .args(["--provider-config", &env.provider])
        .args(extra)
        .output()
        .expect("the binary runs");
    let findings: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "check printed no JSON ({e}):\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.success(), findings)
}

/// The findings of one check, e.g. `credentials`.
fn of<'a>(findings: &'a [Value], check: &str) -> Vec<&'a Value> {
    findings.iter().filter(|f| f["check"] == check).collect()
}

fn status_of(findings: &[Value], check: &str) -> String {
    of(findings, check)
        .first()
        .map(|f| f["status"].as_str().unwrap_or_default().to_owned())
        .unwrap_or_else(|| panic!("no {check} finding: {findings:#?}"))
}

fn fix_of(findings: &[Value], check: &str) -> String {
    of(findings, check)
        .iter()
        .find(|f| f["status"] != "ok")
        .and_then(|f| f["fix"].as_str())
        .unwrap_or_else(|| panic!("no fix for {check}: {findings:#?}"))
        .to_owned()
}

async fn healthy_env(prefix: &str) -> (Env, String) {
    let mut env = Env::new(prefix, EmulatorConfig::for_tests(), "30s").await;
    env.start_operator_with(&[
        "--leader-election",
        "--lease-namespace",
        &env.namespace.clone(),
        "--lease-name",
        LEASE,
    ]);
    let key = env.new_key("checked");
    env.apply(&env.grant("checked", &key, json!({})));
    env.wait_for("checked", "condition=Ready", 60);
    (env, key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_healthy_install_checks_ok_and_the_write_probe_leaves_nothing_behind() {
    let (env, key) = healthy_env("check-ok").await;
    let (ok, findings) = check(
        &env,
        &["--write-probe", "--principal", "0d0466b00d0466b00d0466b0"],
    );
    assert!(ok, "{findings:#?}");
    for crd in of(&findings, "crd") {
        assert_eq!(crd["status"], "ok", "{crd}");
    }
    assert_eq!(of(&findings, "crd").len(), 4);
    for check in [
        "operator",
        "endpoint",
        "clock",
        "credentials",
        "catalog",
        "key",
        "list-grants",
        "write-probe",
    ] {
        assert!(
            of(&findings, check).iter().any(|f| f["status"] == "ok"),
            "{check} not ok: {findings:#?}"
        );
    }
    assert!(
        of(&findings, "key")[0]["target"]
            .as_str()
            .unwrap()
            .contains(&key),
        "the key the grant uses was probed"
    );
    assert!(
        findings.iter().all(|f| f["status"] != "fail"),
        "{findings:#?}"
    );
    // The probe's grant is gone again; the KmsGrant's is there.
    assert_eq!(env.emulator.admin().grant_count(&key), Some(1));
    let writes: Vec<String> = env
        .emulator
        .admin()
        .calls(0)
        .into_iter()
        .filter(|c| {
            c.grant_name
                .as_deref()
                .is_some_and(|n| n.starts_with("kmsgrant-check/"))
        })
        .map(|c| c.operation)
        .collect();
    assert_eq!(writes, ["create-grant"], "one probe grant created");

    // The text report: one line per check, a summary, exit 0.
    let out = Command::new(OPERATOR_BIN)
        .args(["check", "--allow-http-endpoints", "--kubeconfig"])
        .arg(kubeconfig())
        .args([
            "--namespace",
            &env.namespace,
            "--lease-name",
            LEASE,
            "--provider-config",
            &env.provider,
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("ok    credentials"), "{text}");
    assert!(text.lines().last().unwrap().contains("0 failed"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_injected_fault_is_found_with_its_fix_and_a_failing_exit() {
    let (mut env, key) = healthy_env("check-faults").await;

    // Wrong credentials.
    env.write_secret("not-the-secret-key");
    let (ok, findings) = check(&env, &["--only", "cloud"]);
    assert!(!ok);
    assert_eq!(status_of(&findings, "credentials"), "fail");
    assert!(
        fix_of(&findings, "credentials").contains("AK/SK"),
        "{findings:#?}"
    );
    env.write_secret(env.emulator.config().secret_key.clone().as_str());

    // A key of another project (or none at all).
    let (ok, findings) = check(
        &env,
        &[
            "--only",
            "cloud",
            "--key",
            "0d0466b0-e727-4d9c-b35d-f84bb474a37f",
        ],
    );
    assert!(!ok);
    assert_eq!(status_of(&findings, "key"), "fail");
    assert!(
        fix_of(&findings, "key").contains("projectId"),
        "{findings:#?}"
    );

    // The identity lacks the KMS permission.
    let forbid = |operation: &str| FaultSettings {
        errors: [(
            operation.to_owned(),
            ErrorInjection {
                rate: 1.0,
                error: InjectedError::Forbidden,
            },
        )]
        .into(),
        ..FaultSettings::default()
    };
    env.emulator
        .admin()
        .set_faults(forbid("list-grants"))
        .unwrap();
    let (ok, findings) = check(&env, &["--only", "cloud"]);
    assert!(!ok);
    assert_eq!(status_of(&findings, "key"), "ok");
    assert_eq!(status_of(&findings, "list-grants"), "fail");
    assert!(
        fix_of(&findings, "list-grants").contains("least-privilege"),
        "{findings:#?}"
    );

    // This machine's clock 20 minutes behind the cloud's: signatures refused.
    env.emulator
        .admin()
        .set_faults(FaultSettings {
            clock_offset_seconds: 20 * 60,
            ..FaultSettings::default()
        })
        .unwrap();
    let (ok, findings) = check(&env, &["--only", "cloud"]);
    assert!(!ok);
    assert_eq!(status_of(&findings, "clock"), "fail", "{findings:#?}");
    assert!(fix_of(&findings, "clock").contains("NTP"));
    assert_eq!(status_of(&findings, "credentials"), "fail");
    assert!(
        fix_of(&findings, "credentials").contains("clocks"),
        "{findings:#?}"
    );
    env.emulator
        .admin()
        .set_faults(FaultSettings::default())
        .unwrap();

    // An endpoint nothing listens on.
    let closed = support::free_port();
    env.apply(&env.provider_config(json!({"endpoint": format!("http://127.0.0.1:{closed}")})));
    let (ok, findings) = check(&env, &["--only", "cloud"]);
    assert!(!ok);
    assert_eq!(status_of(&findings, "endpoint"), "fail");
    assert!(
        fix_of(&findings, "endpoint").contains("spec.endpoint"),
        "{findings:#?}"
    );
    assert!(
        of(&findings, "credentials").is_empty(),
        "nothing sent past an unreachable endpoint"
    );
    env.apply(&env.provider_config(json!({})));

    // The operator gone: no fresh lease holder.
    env.kill_operator();
    support::kubectl_ok(&["-n", &env.namespace, "delete", "lease", LEASE], None);
    let (ok, findings) = check(&env, &["--only", "cluster"]);
    assert!(!ok);
    assert_eq!(status_of(&findings, "operator"), "fail");
    assert!(
        fix_of(&findings, "operator").contains("operator"),
        "{findings:#?}"
    );
    // The cloud side was fine all along once the faults were gone.
    let (_, findings) = check(&env, &["--only", "cloud"]);
    assert_eq!(status_of(&findings, "credentials"), "ok", "{findings:#?}");
    assert_eq!(env.emulator.admin().grant_count(&key), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_copied_endpoint_or_a_wrong_region_is_told_by_the_iam_catalog() {
    let env = Env::new("check-catalog", EmulatorConfig::for_tests(), "30s").await;
    let (_, findings) = check(&env, &["--only", "cloud"]);
    assert_eq!(status_of(&findings, "catalog"), "ok", "{findings:#?}");

    // The same KMS under another host name than the catalog's: not the endpoint IAM lists.
    let port = env.emulator.addr().port();
    env.apply(&env.provider_config(json!({"endpoint": format!("http://localhost:{port}")})));
    let (_, findings) = check(&env, &["--only", "cloud"]);
    assert_eq!(status_of(&findings, "catalog"), "warn", "{findings:#?}");
    assert!(
        fix_of(&findings, "catalog").contains("set spec.endpoint to the catalog's"),
        "{findings:#?}"
    );

    // The endpoint of one region with another region configured.
    env.apply(&env.provider_config(json!({"region": "eu-nl"})));
    let (_, findings) = check(&env, &["--only", "cloud"]);
    assert_eq!(status_of(&findings, "catalog"), "warn", "{findings:#?}");
    let region = env.emulator.config().region.clone();
    assert!(
        fix_of(&findings, "catalog").contains(&format!("set spec.region to {region:?}")),
        "{findings:#?}"
    );
}
