//! The operator under load, faults and crashes, with the KMS calls counted on the emulator.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use kms_emulator::{EmulatorConfig, ErrorInjection, FaultSettings, InjectedError};
use serde_json::{Value, json};
use support::{Env, kubectl_ok};

/// Applies many objects in one kubectl call.
fn apply_all(env: &Env, items: Vec<Value>) {
    env.apply(&json!({"apiVersion": "v1", "kind": "List", "items": items}));
}

fn grant_ids(env: &Env) -> Vec<String> {
    let list: Value = serde_json::from_str(&kubectl_ok(
        &[
            "-n",
            &env.namespace,
            "get",
            "kmsgrants.kmsgrant.io",
            "-o",
            "json",
        ],
        None,
    ))
    .unwrap();
    list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            o["status"]["grantId"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect()
}

fn count(calls: &[kms_emulator::CallRecord], operation: &str) -> usize {
    calls.iter().filter(|c| c.operation == operation).count()
}

fn last_seq(env: &Env) -> u64 {
    env.emulator
        .admin()
        .calls(0)
        .last()
        .map(|c| c.seq)
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_duplicate_grant_survives_five_crashes_and_lost_create_answers() {
    let mut env = Env::new("crash", EmulatorConfig::for_tests(), "5s").await;
    let keys: Vec<String> = (0..4).map(|i| env.new_key(&format!("crash-{i}"))).collect();
    let faults = FaultSettings {
        drop_after_commit: BTreeMap::from([("create-grant".to_owned(), 0.1)]),
        ..FaultSettings::default()
    };
    env.emulator.admin().set_faults(faults).unwrap();
    let items = (0..200)
        .map(|i| env.grant(&format!("g{i:03}"), &keys[i % 4], json!({})))
        .collect();
    env.start_operator();
    apply_all(&env, items);

    // Kill the operator (SIGKILL) five times while it converges.
    let started = Instant::now();
    for kill in 0..5 {
        tokio::time::sleep(Duration::from_millis(1200 + 300 * kill)).await;
        env.kill_operator();
        env.start_operator();
    }
    env.wait_all_ready(240);
    eprintln!(
        "200 grants converged through 5 crashes in {:?}",
        started.elapsed()
    );

    let dropped = env
        .emulator
        .admin()
        .calls(0)
        .iter()
        .filter(|c| c.operation == "create-grant" && c.dropped)
        .count();
    let on_kms: BTreeSet<String> = env
        .emulator
        .admin()
        .dump()
        .grants
        .into_iter()
        .map(|g| g.grant_id)
        .collect();
    let owned: BTreeSet<String> = grant_ids(&env).into_iter().collect();
    assert_eq!(
        on_kms.len(),
        200,
        "the emulator holds {} grants, expected exactly 200 ({dropped} answers were lost)",
        on_kms.len()
    );
    assert_eq!(
        owned, on_kms,
        "every object owns one distinct grant and every grant is owned"
    );
    assert!(
        dropped > 0,
        "no create answer was lost; the fault did not apply"
    );

    env.emulator
        .admin()
        .set_faults(FaultSettings::default())
        .unwrap();
    kubectl_ok(
        &[
            "-n",
            &env.namespace,
            "delete",
            "kmsgrants.kmsgrant.io",
            "--all",
            "--timeout=240s",
        ],
        None,
    );
    assert_eq!(
        env.emulator.admin().dump().grants.len(),
        0,
        "grants left after deleting every KmsGrant"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn everything_converges_under_20_percent_injected_5xx_and_429_with_bounded_calls() {
    let mut env = Env::new("faults", EmulatorConfig::for_tests(), "5s").await;
    let keys: Vec<String> = (0..2)
        .map(|i| env.new_key(&format!("faulty-{i}")))
        .collect();
    let inject = |error| ErrorInjection { rate: 0.2, error };
    let faults = FaultSettings {
        errors: BTreeMap::from([
            (
                "create-grant".to_owned(),
                inject(InjectedError::Unavailable),
            ),
            ("list-grants".to_owned(), inject(InjectedError::Throttled)),
            ("describe-key".to_owned(), inject(InjectedError::Internal)),
        ]),
        ..FaultSettings::default()
    };
    env.start_operator();
    // Let the provider config verify before the faults start.
    tokio::time::sleep(Duration::from_secs(2)).await;
    env.emulator.admin().set_faults(faults).unwrap();
    let before = last_seq(&env);
    apply_all(
        &env,
        (0..50)
            .map(|i| env.grant(&format!("f{i:02}"), &keys[i % 2], json!({})))
            .collect(),
    );
    env.wait_all_ready(180);

    let calls = env.emulator.admin().calls(before);
    let on_kms = env.emulator.admin().dump().grants.len();
    assert_eq!(on_kms, 50, "exactly one grant per object");
    let creates = count(&calls, "create-grant");
    // 50 creates at a 20 % failure rate need about 62 attempts; a hot loop would need thousands.
    assert!(creates < 120, "{creates} create-grant calls for 50 grants");
    assert!(
        calls.len() < 400,
        "{} KMS calls in all for 50 grants",
        calls.len()
    );
    eprintln!(
        "50 grants under faults: {} calls, {creates} creates",
        calls.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn converging_100_grants_on_one_key_costs_100_creates_and_at_most_3_list_walks() {
    let mut env = Env::new("cost-one", EmulatorConfig::for_tests(), "20s").await;
    let key = env.new_key("busy");
    env.start_operator();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = last_seq(&env);
    apply_all(
        &env,
        (0..100)
            .map(|i| env.grant(&format!("c{i:03}"), &key, json!({})))
            .collect(),
    );
    env.wait_all_ready(180);
    let calls = env.emulator.admin().calls(before);
    let creates = count(&calls, "create-grant");
    // Each walk of up to 100 grants is one page at limit 100.
    let lists = count(&calls, "list-grants");
    eprintln!(
        "100 grants on one key: {creates} create-grant, {lists} list-grants, {} describe-key",
        count(&calls, "describe-key")
    );
    assert_eq!(creates, 100);
    assert!(lists <= 3, "{lists} list-grants walks");
    assert_eq!(env.emulator.admin().grant_count(&key), Some(100));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ready_grants_cost_no_writes_and_one_list_per_key_per_resync() {
    let resync = Duration::from_secs(4);
    let mut env = Env::new("cost-idle", EmulatorConfig::for_tests(), "4s").await;
    let keys: Vec<String> = (0..5).map(|i| env.new_key(&format!("idle-{i}"))).collect();
    env.start_operator();
    apply_all(
        &env,
        (0..100)
            .map(|i| env.grant(&format!("i{i:03}"), &keys[i % 5], json!({})))
            .collect(),
    );
    env.wait_all_ready(180);
    // Let the first drift pass fill in what only a listing tells (issuer, creation date).
    tokio::time::sleep(resync * 2).await;

    let before = last_seq(&env);
    let window = resync * 3 - Duration::from_millis(500);
    tokio::time::sleep(window).await;
    let calls = env.emulator.admin().calls(before);
    let writes = count(&calls, "create-grant")
        + count(&calls, "revoke-grant")
        + count(&calls, "retire-grant");
    let lists = count(&calls, "list-grants");
    eprintln!(
        "100 Ready grants on 5 keys over 3 resyncs: {lists} list-grants, {} calls in all",
        calls.len()
    );
    assert_eq!(writes, 0, "KMS writes while everything is Ready");
    assert!(
        lists <= 5 * 3,
        "{lists} list-grants for 5 keys in 3 resync periods"
    );
    let per_key: BTreeMap<String, usize> = calls
        .iter()
        .filter(|c| c.operation == "list-grants")
        .fold(BTreeMap::new(), |mut m, c| {
            *m.entry(c.key_id.clone().unwrap_or_default()).or_default() += 1;
            m
        });
    assert!(
        per_key.values().all(|n| *n <= 3),
        "lists per key: {per_key:?}"
    );
}
