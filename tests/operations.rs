//! Running the operator as a platform team does: metrics and health endpoints, two replicas with
//! leader election, and JSON logs that never contain a secret.

mod support;

use std::time::{Duration, Instant};

use kms_emulator::EmulatorConfig;
use serde_json::json;
use support::{Env, Operator, eventually};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn get(url: &str) -> Option<(u16, String)> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let response = reqwest::Client::new()
        .get(url)
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()?;
    let status = response.status().as_u16();
    Some((status, response.text().await.unwrap_or_default()))
}

/// The value of one series in a Prometheus text exposition (0 when absent).
fn series(text: &str, name_and_labels: &str) -> f64 {
    text.lines()
        .find_map(|line| {
            line.strip_prefix(name_and_labels)
                .and_then(|rest| rest.trim().split(' ').next()?.parse().ok())
        })
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_health_and_readiness_describe_a_working_operator() {
    let mut env = Env::new("metrics", EmulatorConfig::for_tests(), "5s").await;
    let key = env.new_key("metrics");
    let port = free_port();
    let admin = format!("http://127.0.0.1:{port}");
    env.operator = Some(Operator::start_with(
        &env.namespace,
        "5s",
        &["--admin-address", &format!("127.0.0.1:{port}")],
    ));
    eventually("/healthz", Duration::from_secs(30), async || {
        get(&format!("{admin}/healthz"))
            .await
            .is_some_and(|(s, _)| s == 200)
    })
    .await;
    eventually("/readyz", Duration::from_secs(30), async || {
        get(&format!("{admin}/readyz"))
            .await
            .is_some_and(|(s, _)| s == 200)
    })
    .await;

    env.apply(&env.grant("measured", &key, json!({})));
    env.wait_for("measured", "condition=Ready", 60);
    let (status, text) = get(&format!("{admin}/metrics"))
        .await
        .expect("metrics answer");
    assert_eq!(status, 200);
    let expect_at_least = |series_name: &str, min: f64| {
        let value = series(&text, series_name);
        assert!(
            value >= min,
            "{series_name} = {value}, expected at least {min}\n{text}"
        );
    };
    expect_at_least(
        "kmsgrant_reconciles_total{kind=\"KmsGrant\",result=\"ok\",reason=\"GrantReady\"}",
        1.0,
    );
    expect_at_least(
        "kmsgrant_reconciles_total{kind=\"KmsProviderConfig\",result=\"ok\",reason=\"Reconciled\"}",
        1.0,
    );
    expect_at_least(
        "kmsgrant_reconcile_duration_seconds_count{kind=\"KmsGrant\"}",
        1.0,
    );
    expect_at_least(
        "kmsgrant_kms_calls_total{operation=\"create-grant\",outcome=\"ok\"}",
        1.0,
    );
    expect_at_least(
        "kmsgrant_kms_calls_total{operation=\"list-grants\",outcome=\"ok\"}",
        1.0,
    );
    expect_at_least(
        "kmsgrant_kms_calls_total{operation=\"describe-key\",outcome=\"ok\"}",
        1.0,
    );
    expect_at_least(
        "kmsgrant_kms_call_duration_seconds_count{operation=\"create-grant\"}",
        1.0,
    );
    expect_at_least("kmsgrant_objects{condition=\"Ready\"}", 1.0);
    expect_at_least("kmsgrant_grant_cache_lookups_total{result=\"miss\"}", 1.0);
    expect_at_least("kmsgrant_leader", 1.0);
    assert_eq!(
        series(
            &text,
            "kmsgrant_kms_calls_total{operation=\"create-grant\",outcome=\"ok\"}"
        ),
        1.0
    );
    assert!(
        text.contains("kmsgrant_kms_throttle_wait_seconds_total"),
        "{text}"
    );
    assert!(text.contains("kmsgrant_drift_repairs_total"), "{text}");
    assert!(
        !text.contains("measured"),
        "an object name leaked into a metric label"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_leader_election_one_replica_writes_and_a_standby_takes_over_when_it_dies() {
    let env = Env::new("leader", EmulatorConfig::for_tests(), "5s").await;
    let key = env.new_key("leader");
    let ports = [free_port(), free_port()];
    let flags = |port: u16| {
        vec![
            "--leader-election".to_owned(),
            "--lease-duration".to_owned(),
            "4s".to_owned(),
            "--admin-address".to_owned(),
            format!("127.0.0.1:{port}"),
        ]
    };
    // The pod's name and namespace (the lease's, without --lease-namespace): replica 0 by flags,
    // replica 1 by the Downward API's environment variables.
    let start = |replica: usize| {
        let mut args = flags(ports[replica]);
        let pod_name = format!("replica-{replica}");
        let envs = if replica == 0 {
            args.extend(["--pod-name".to_owned(), pod_name]);
            args.extend(["--pod-namespace".to_owned(), env.namespace.clone()]);
            vec![]
        } else {
            vec![
                ("KMSGRANT_POD_NAME", pod_name),
                ("KMSGRANT_POD_NAMESPACE", env.namespace.clone()),
            ]
        };
        Operator::start_with_env(
            &env.namespace,
            "5s",
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
            &envs
                .iter()
                .map(|(k, v)| (*k, v.as_str()))
                .collect::<Vec<_>>(),
        )
    };
    let mut replicas = vec![Some(start(0)), Some(start(1))];
    let metrics = async |port: u16| {
        get(&format!("http://127.0.0.1:{port}/metrics"))
            .await
            .map(|(_, t)| t)
            .unwrap_or_default()
    };
    let mut leader = None;
    eventually(
        "a replica to become leader",
        Duration::from_secs(30),
        async || {
            for (i, port) in ports.iter().enumerate() {
                if series(&metrics(*port).await, "kmsgrant_leader") == 1.0 {
                    leader = Some(i);
                }
            }
            leader.is_some()
        },
    )
    .await;
    let leader = leader.unwrap();
    let standby = 1 - leader;
    // The leader holds the Lease in its pod's namespace as <pod name>-<pid>.
    let lease: serde_json::Value = serde_json::from_str(&support::kubectl_ok(
        &[
            "-n",
            &env.namespace,
            "get",
            "lease",
            "kmsgrant-operator",
            "-o",
            "json",
        ],
        None,
    ))
    .unwrap();
    let pid = replicas[leader].as_ref().unwrap().pid();
    assert_eq!(
        lease["spec"]["holderIdentity"],
        format!("replica-{leader}-{pid}")
    );

    env.apply(&env.grant("first", &key, json!({})));
    env.wait_for("first", "condition=Ready", 60);
    // Its events name it as the reporting instance.
    let mut created = None;
    eventually(
        "the GrantCreated event",
        Duration::from_secs(30),
        async || {
            created = env
                .events()
                .into_iter()
                .find(|e| e["reason"] == "GrantCreated");
            created.is_some()
        },
    )
    .await;
    assert_eq!(
        created.unwrap()["reportingInstance"],
        format!("replica-{leader}")
    );
    let creates = async |port| {
        series(
            &metrics(port).await,
            "kmsgrant_kms_calls_total{operation=\"create-grant\",outcome=\"ok\"}",
        )
    };
    assert_eq!(
        creates(ports[leader]).await,
        1.0,
        "the leader made the write"
    );
    assert_eq!(
        creates(ports[standby]).await,
        0.0,
        "the standby wrote to KMS while another replica led"
    );
    assert_eq!(
        series(&metrics(ports[standby]).await, "kmsgrant_leader"),
        0.0
    );
    // A standby is ready (it can take over); only the leader reconciles.
    assert_eq!(
        get(&format!("http://127.0.0.1:{}/readyz", ports[standby]))
            .await
            .map(|(s, _)| s),
        Some(200)
    );

    // The leader dies without releasing its lease; the standby takes over after it expires.
    replicas[leader].take().unwrap().kill();
    let killed_at = Instant::now();
    env.apply(&env.grant("second", &key, json!({})));
    env.wait_for("second", "condition=Ready", 60);
    eprintln!(
        "the standby converged a new grant {:?} after the leader died",
        killed_at.elapsed()
    );
    assert_eq!(
        creates(ports[standby]).await,
        1.0,
        "the new leader made the second write"
    );
    assert_eq!(
        series(&metrics(ports[standby]).await, "kmsgrant_leader"),
        1.0
    );
    assert_eq!(env.emulator.admin().grant_count(&key), Some(2));
    drop(replicas);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn json_logs_at_trace_level_parse_line_by_line_and_hold_no_secret() {
    let mut env = Env::new("logs", EmulatorConfig::for_tests(), "5s").await;
    let key = env.new_key("logs");
    // A password-auth provider too, so a token and a password travel.
    let password_secret = json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "password-credentials", "namespace": env.namespace},
        "stringData": {"username": env.emulator.config().username, "password": env.emulator.config().password.as_str(),
            "domainName": env.emulator.config().domain_name}
    });
    env.apply(&password_secret);
    let mut by_password = env.provider_config(json!({
        "auth": {"type": "Password", "secretRef": {"namespace": env.namespace, "name": "password-credentials"}}
    }));
    by_password["metadata"]["name"] = json!(format!("{}-password", env.provider));
    env.apply(&by_password);
    let operator = Operator::start_with(
        &env.namespace,
        "5s",
        &["--log-format", "json", "--log-level", "trace"],
    );
    let log = operator.log.clone();
    env.operator = Some(operator);
    env.apply(&env.grant("signed", &key, json!({})));
    env.apply(&env.grant(
        "token",
        &key,
        json!({"providerConfigRef": {"name": format!("{}-password", env.provider)}}),
    ));
    env.wait_for("signed", "condition=Ready", 60);
    env.wait_for("token", "condition=Ready", 60);
    kubectl_delete(&env, "token");
    env.kill_operator();

    let text = std::fs::read_to_string(&log).unwrap();
    let mut lines = 0;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let parsed: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            parsed.get("level").is_some() && parsed.get("timestamp").is_some(),
            "{line}"
        );
        lines += 1;
    }
    assert!(lines > 50, "only {lines} log lines at trace level");
    let config = env.emulator.config();
    for secret in [config.secret_key.as_str(), config.password.as_str()] {
        assert!(
            !text.contains(secret),
            "a secret value is in the operator's log {}",
            log.display()
        );
    }
    assert!(
        !text.to_ascii_lowercase().contains("x-auth-token\":\"") && !text.contains("Signature="),
        "credentials in the log"
    );
}

fn kubectl_delete(env: &Env, name: &str) {
    support::kubectl_ok(
        &[
            "-n",
            &env.namespace,
            "delete",
            "kmsgrant.kmsgrant.io",
            name,
            "--timeout=60s",
        ],
        None,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_lets_the_reconcile_in_flight_finish_its_kms_calls_before_exit() {
    let env = Env::new("sigterm", EmulatorConfig::for_tests(), "5s").await;
    let key = env.new_key("slow");
    let mut operator = Operator::start(&env.namespace, "5s");
    // Wait for the provider config to be verified before slowing KMS down.
    let config_ready = "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}=True";
    let out = support::kubectl(
        &[
            "wait",
            &format!("--for={config_ready}"),
            "--timeout=60s",
            &format!("kmspc/{}", env.provider),
        ],
        None,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Every KMS answer now takes 2 s: describe-key, list-grants and create-grant take 6 s together.
    let slow = kms_emulator::FaultSettings {
        latency_ms: 2000,
        ..Default::default()
    };
    env.emulator.admin().set_faults(slow).unwrap();

    env.apply(&env.grant("slow", &key, json!({})));
    // The finalizer is the reconcile's first write, before any KMS call.
    env.wait_for(
        "slow",
        "jsonpath={.metadata.finalizers[0]}=kmsgrant.io/grant",
        30,
    );
    let status = operator.terminate();
    assert!(
        status.success(),
        "the operator did not exit cleanly: {status:?} (log {})",
        operator.log.display()
    );
    // The reconcile that was under way finished: the grant exists and its ID is in status.
    assert_eq!(
        env.emulator.admin().grant_count(&key),
        Some(1),
        "the in-flight create was cut off"
    );
    let id = env.get("slow")["status"]["grantId"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert_eq!(
        id.len(),
        64,
        "the status write after the create was cut off"
    );
    let log = std::fs::read_to_string(&operator.log).unwrap();
    assert!(
        log.contains("shutting down") && log.contains("controllers stopped"),
        "{log}"
    );
}
