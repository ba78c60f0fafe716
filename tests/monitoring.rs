//! What a platform team monitors with: the alert rules (unit-tested with the pinned promtool),
//! the Grafana dashboard, and the same two shipped by the chart and by the kustomize component;
//! and every metric they use really exported by a running operator.

mod support;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use kms_emulator::{EmulatorConfig, ErrorInjection, FaultSettings, InjectedError};
use serde_json::{Value, json};
use support::{Env, Operator, REPO, kubectl_ok};

const ALERTS: &str = "charts/kmsgrant-operator/files/alerts.yaml";
const DASHBOARD: &str = "charts/kmsgrant-operator/files/grafana-dashboard.json";

fn repo(path: &str) -> String {
    Path::new(REPO).join(path).to_str().unwrap().to_owned()
}

/// Runs the project's promtool (built from source on first use by `scripts/promtool`).
fn promtool(args: &[&str]) -> Output {
    Command::new(repo("scripts/promtool"))
        .args(args)
        .current_dir(REPO)
        .stdin(Stdio::null())
        .output()
        .expect("cannot run scripts/promtool")
}

fn assert_ok(what: &str, out: &Output) {
    assert!(
        out.status.success(),
        "{what} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn alert_rules() -> Value {
    serde_saphyr::from_str(&std::fs::read_to_string(repo(ALERTS)).unwrap()).unwrap()
}

fn dashboard() -> Value {
    serde_json::from_str(&std::fs::read_to_string(repo(DASHBOARD)).unwrap()).unwrap()
}

/// Every PromQL expression of the alert rules and of the dashboard's panels.
fn expressions() -> Vec<String> {
    let mut exprs = Vec::new();
    for group in alert_rules()["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            exprs.push(rule["expr"].as_str().unwrap().to_owned());
        }
    }
    for panel in dashboard()["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            exprs.push(target["expr"].as_str().unwrap().to_owned());
        }
    }
    exprs
}

/// The metric names (`kmsgrant_...`) an expression reads.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(at) = expr[i..].find("kmsgrant_") {
        let start = i + at;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        let preceded =
            start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        if !preceded {
            names.insert(expr[start..end].to_owned());
        }
        i = end;
    }
    names
}

#[test]
fn alert_rules_pass_promtool_check_and_their_unit_tests() {
    assert_ok(
        "promtool check rules",
        &promtool(&["check", "rules", ALERTS]),
    );
    let out = promtool(&["test", "rules", "tests/alerts/alerts.test.yaml"]);
    assert_ok("promtool test rules", &out);
    // Each alert has a test case.
    let tests = std::fs::read_to_string(repo("tests/alerts/alerts.test.yaml")).unwrap();
    for group in alert_rules()["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            let alert = rule["alert"].as_str().unwrap();
            assert!(
                tests.contains(&format!("alertname: {alert}\n")),
                "no promtool test for {alert}"
            );
        }
    }
}

#[test]
fn every_alert_has_a_runbook_section() {
    let runbooks = std::fs::read_to_string(repo("docs/alerts.md")).unwrap();
    for group in alert_rules()["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            let alert = rule["alert"].as_str().unwrap();
            assert!(
                runbooks.contains(&format!("\n## {alert}\n")),
                "docs/alerts.md has no section for {alert}"
            );
            assert_eq!(
                rule["annotations"]["runbook_url"],
                format!(
                    "https://github.com/kmsgrant/kmsgrant-operator/blob/main/docs/alerts.md#{}",
                    alert.to_lowercase()
                )
            );
            assert!(
                ["warning", "critical"].contains(&rule["labels"]["severity"].as_str().unwrap()),
                "{alert} has no severity"
            );
        }
    }
}

/// `deploy/components/monitoring` ships what the chart ships: the same rule groups, the same
/// dashboard, and a ServiceMonitor for the metrics Service of `deploy/`.
#[test]
fn kustomize_component_ships_the_charts_alerts_and_dashboard() {
    // An overlay as the docs show it; kustomize wants its bases as relative paths.
    let overlay = tempfile::tempdir().unwrap();
    let up = "../".repeat(overlay.path().components().count() - 1);
    let base = format!("{up}{}", REPO.trim_start_matches('/'));
    std::fs::write(
        overlay.path().join("kustomization.yaml"),
        format!("resources: [{base}/deploy]\ncomponents: [{base}/deploy/components/monitoring]\n"),
    )
    .unwrap();
    let rendered: Vec<Value> = serde_saphyr::from_str_multiple::<Value, Vec<Value>>(&kubectl_ok(
        &["kustomize", overlay.path().to_str().unwrap()],
        None,
    ))
    .unwrap();
    let find = |kind: &str| -> &Value {
        let found: Vec<&Value> = rendered.iter().filter(|o| o["kind"] == kind).collect();
        assert_eq!(found.len(), 1, "one {kind} expected");
        found[0]
    };
    let rule = find("PrometheusRule");
    assert_eq!(rule["metadata"]["namespace"], "kmsgrant-system");
    assert!(
        rule["spec"]["groups"] == alert_rules()["groups"],
        "deploy/components/monitoring/prometheusrule.yaml differs from {ALERTS}: copy its groups"
    );
    let dashboard_map = rendered
        .iter()
        .find(|o| {
            o["kind"] == "ConfigMap" && o["metadata"]["name"] == "kmsgrant-operator-dashboard"
        })
        .expect("the dashboard ConfigMap");
    assert_eq!(
        dashboard_map["metadata"]["labels"]["grafana_dashboard"],
        "1"
    );
    assert!(
        dashboard_map["data"]["kmsgrant-operator.json"].as_str()
            == Some(std::fs::read_to_string(repo(DASHBOARD)).unwrap().as_str()),
        "deploy/components/monitoring/grafana-dashboard.json differs from {DASHBOARD}: cp {DASHBOARD} deploy/components/monitoring/"
    );
    let monitor = find("ServiceMonitor");
    let service = rendered
        .iter()
        .find(|o| o["kind"] == "Service")
        .expect("the metrics Service");
    for (label, value) in monitor["spec"]["selector"]["matchLabels"]
        .as_object()
        .unwrap()
    {
        assert_eq!(
            &service["metadata"]["labels"][label], value,
            "the ServiceMonitor does not select the metrics Service"
        );
    }
    assert_eq!(monitor["spec"]["endpoints"][0]["port"], "metrics");
    assert_eq!(monitor["spec"]["endpoints"][0]["honorLabels"], true);
}

/// Every dashboard panel has a query, and every query and alert reads kmsgrant series.
#[test]
fn dashboard_panels_all_query_the_operators_metrics() {
    let dashboard = dashboard();
    assert_eq!(dashboard["uid"], "kmsgrant-operator");
    for panel in dashboard["panels"].as_array().unwrap() {
        if panel["type"] == "row" {
            continue;
        }
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "panel {} has no query", panel["title"]);
        for target in targets {
            let expr = target["expr"].as_str().unwrap();
            assert!(
                !metric_names(expr).is_empty(),
                "panel {}: {expr} reads no kmsgrant metric",
                panel["title"]
            );
            assert_eq!(target["datasource"]["uid"], "${datasource}");
        }
    }
}

async fn scrape(url: &str) -> Option<String> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let response = reqwest::Client::new()
        .get(url)
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()?;
    response.status().is_success().then_some(())?;
    response.text().await.ok()
}

/// Whether the exposition has the metric `name` as a query names it: a sample of that name, or a
/// declared family it belongs to (a counter `F` has samples `F_total`, a histogram `F_bucket`,
/// `F_sum`, `F_count`, an info `F_info`). A labelled family appears only once it has a series.
fn exported(text: &str, name: &str) -> bool {
    let sample = text.lines().any(|l| {
        l.strip_prefix(name)
            .is_some_and(|rest| rest.starts_with(['{', ' ']))
    });
    let declared = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .any(|l| {
            let family = l.split(' ').next().unwrap_or_default();
            ["", "_total", "_bucket", "_sum", "_count", "_info"]
                .iter()
                .any(|suffix| format!("{family}{suffix}") == name)
        });
    sample || declared
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_metric_a_dashboard_panel_or_alert_uses_is_exported() {
    let mut env = Env::new("monitoring", EmulatorConfig::for_tests(), "5s").await;
    let key = env.new_key("monitoring");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    env.operator = Some(Operator::start_with(
        &env.namespace,
        "5s",
        &[
            "--admin-address",
            &format!("127.0.0.1:{port}"),
            "--per-object-metrics",
        ],
    ));
    let url = format!("http://127.0.0.1:{port}/metrics");
    // Some series exist only once their event happened: a retried KMS call, here, by failing
    // every describe-key until the operator has retried one, then letting the grant through.
    env.emulator
        .admin()
        .set_faults(FaultSettings {
            errors: [(
                "describe-key".to_owned(),
                ErrorInjection {
                    rate: 1.0,
                    error: InjectedError::Unavailable,
                },
            )]
            .into(),
            ..FaultSettings::default()
        })
        .unwrap();
    env.apply(&env.grant("watched", &key, json!({})));
    let deadline = Instant::now() + Duration::from_secs(60);
    while !scrape(&url)
        .await
        .is_some_and(|t| t.contains("kmsgrant_kms_retries_total{operation=\"describe-key\""))
    {
        assert!(Instant::now() < deadline, "no describe-key retry counted");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    env.emulator
        .admin()
        .set_faults(FaultSettings::default())
        .unwrap();
    env.wait_for("watched", "condition=Ready", 60);
    // The audit's gauges and exclusive mode's counters: a grant made by hand on the key, a
    // KmsKeyPolicy in Revoke mode whose first revoke fails (503), then goes through.
    support::grant_by_hand(&support::kms_client(&env), &key, "someone", None).await;
    env.emulator
        .admin()
        .set_faults(FaultSettings {
            errors: [(
                "revoke-grant".to_owned(),
                ErrorInjection {
                    rate: 1.0,
                    error: InjectedError::Unavailable,
                },
            )]
            .into(),
            ..FaultSettings::default()
        })
        .unwrap();
    let policy = format!("{}-monitoring", env.namespace);
    env.apply(&json!({
        "apiVersion": "kmsgrant.io/v1beta1", "kind": "KmsKeyPolicy",
        "metadata": {"name": policy, "labels": {support::TEST_LABEL: env.namespace}},
        "spec": {"providerConfigRef": {"name": env.provider}, "keyId": key,
            "undeclaredGrants": "Revoke"}
    }));
    for (series, then) in [
        (
            "kmsgrant_undeclared_grant_revoke_failures_total{",
            Some(FaultSettings::default()),
        ),
        ("kmsgrant_undeclared_grants_revoked_total{", None),
    ] {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !scrape(&url).await.is_some_and(|t| {
            t.lines()
                .any(|l| l.starts_with(series) && !l.ends_with(" 0"))
        }) {
            assert!(Instant::now() < deadline, "{series} never counted");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        if let Some(faults) = then {
            env.emulator.admin().set_faults(faults).unwrap();
        }
    }
    kubectl_ok(&["delete", "kmskeypolicies.kmsgrant.io", &policy], None);
    // The per-object series are read from the operator's caches at scrape time.
    let needle = format!(
        "kmsgrant_grant_ready{{namespace=\"{}\",name=\"watched\",condition=\"Ready\",reason=\"GrantReady\"}} 1",
        env.namespace
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let text = loop {
        let text = scrape(&url).await.unwrap_or_default();
        if text.contains(&needle) {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "{needle} never appeared:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    let used: BTreeSet<String> = expressions().iter().flat_map(|e| metric_names(e)).collect();
    assert!(
        used.len() >= 12,
        "too few metrics found in the queries: {used:?}"
    );
    let missing: Vec<&String> = used.iter().filter(|name| !exported(&text, name)).collect();
    assert!(
        missing.is_empty(),
        "used by a panel or an alert but not exported: {missing:?}\n{text}"
    );
    // The series the alerts name objects with carry this run's objects.
    assert!(
        text.contains(&format!(
            "kmsgrant_provider_config_ready{{name=\"{}\",condition=\"Ready\",reason=\"CredentialsVerified\"}} 1",
            env.provider
        )),
        "{text}"
    );
    assert!(
        text.contains("kmsgrant_provider_configs{condition=\"Ready\"} 1"),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "kmsgrant_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        )),
        "{text}"
    );
}
