//! Regression guard on what converging and idling cost: call counts against the floor, never
//! times. 200 grants on 4 keys must take 200 creates, one describe per key, about one list walk
//! per key and one status write per object; the resync period right after converging must
//! write nothing, neither to KMS nor to Kubernetes; deleting them must take one revoke each and a
//! few list walks per key, not one per object.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use kms_emulator::EmulatorConfig;
use kmsgrant::api::{KmsGrant, KmsGrantStatus};
use kube::api::Api;
use kube::runtime::watcher;
use serde_json::{Value, json};
use support::{Env, kubectl_ok};

/// Status writes per object, as a watch of the namespace sees them: every version whose status
/// differs from the object's previous version (a write that changes nothing makes no version).
#[derive(Default)]
struct StatusWrites {
    last: HashMap<String, Option<KmsGrantStatus>>,
    writes: HashMap<String, usize>,
}

impl StatusWrites {
    fn total(&self) -> usize {
        self.writes.values().sum()
    }
}

async fn watch_status_writes(namespace: &str) -> Arc<Mutex<StatusWrites>> {
    let client = kube::Client::try_from(
        kube::Config::from_custom_kubeconfig(
            kube::config::Kubeconfig::read_from(support::kubeconfig()).unwrap(),
            &Default::default(),
        )
        .await
        .unwrap(),
    )
    .unwrap();
    let api: Api<KmsGrant> = Api::namespaced(client, namespace);
    let seen = Arc::new(Mutex::new(StatusWrites::default()));
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let shared = Arc::clone(&seen);
    tokio::spawn(async move {
        let mut ready_tx = Some(ready_tx);
        let mut stream = watcher(api, watcher::Config::default()).boxed();
        while let Ok(Some(event)) = stream.try_next().await {
            let object = match event {
                watcher::Event::Apply(o) | watcher::Event::InitApply(o) => o,
                watcher::Event::InitDone => {
                    if let Some(tx) = ready_tx.take() {
                        let _ = tx.send(());
                    }
                    continue;
                }
                _ => continue,
            };
            let name = object.metadata.name.clone().unwrap_or_default();
            let mut seen = shared.lock().unwrap();
            let previous = seen.last.insert(name.clone(), object.status.clone());
            if previous.flatten() != object.status {
                *seen.writes.entry(name).or_default() += 1;
            }
        }
    });
    ready_rx.await.expect("the watch of the namespace started");
    seen
}

const GRANTS: usize = 200;

/// The tests take turns: each counts requests on the one API server (Namespace GETs) and its
/// emulator's calls against the clock, which another test's work would disturb.
static TURNS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
const KEYS: usize = 4;

fn count(calls: &[kms_emulator::CallRecord], operation: &str) -> usize {
    calls.iter().filter(|c| c.operation == operation).count()
}

/// Every object the operator may write, by kind/name, with its resourceVersion: the KmsGrants,
/// the provider config and the events of the namespace. Any write bumps one of them.
fn written_objects(env: &Env) -> BTreeMap<String, String> {
    let mut versions = BTreeMap::new();
    for (namespaced, kind) in [
        (true, "kmsgrants.kmsgrant.io"),
        (true, "events"),
        (false, "kmsproviderconfigs.kmsgrant.io"),
    ] {
        let mut args = vec!["get", kind, "-o", "json"];
        if namespaced {
            args.extend(["-n", &env.namespace]);
        }
        let list: Value = serde_json::from_str(&kubectl_ok(&args, None)).unwrap();
        for item in list["items"].as_array().unwrap() {
            let name = item["metadata"]["name"].as_str().unwrap_or_default();
            if !namespaced && name != env.provider {
                continue;
            }
            versions.insert(
                format!("{kind}/{name}"),
                item["metadata"]["resourceVersion"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            );
        }
    }
    versions
}

/// Waits until the emulator's call log has been quiet for two seconds.
async fn until_kms_quiet(env: &Env) {
    let mut seen = support::last_seq(env);
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let now = support::last_seq(env);
        if now == seen {
            return;
        }
        seen = now;
    }
}

/// GETs of Namespaces the API server has answered, from its own metrics.
fn namespace_gets() -> u64 {
    kubectl_ok(&["get", "--raw", "/metrics"], None)
        .lines()
        .filter(|l| {
            l.starts_with("apiserver_request_total{")
                && l.contains("resource=\"namespaces\"")
                && l.contains("verb=\"GET\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn converging_200_grants_on_4_keys_costs_the_floor_and_a_steady_period_writes_nothing() {
    let _turn = TURNS.lock().await;
    let resync = Duration::from_secs(15);
    let mut env = Env::new("cost-guard", EmulatorConfig::for_tests(), "15s").await;
    let keys: Vec<String> = (0..KEYS)
        .map(|i| env.new_key(&format!("guard-{i}")))
        .collect();
    // A namespaceSelector (matching this namespace's label): the check reads watched labels.
    env.apply(
        &env.provider_config(json!({"namespaceSelector": {"matchLabels":
        {support::TEST_LABEL: env.namespace}}})),
    );
    env.start_operator();
    // The provider config verifies (user-quotas) before the objects arrive.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let status_writes = watch_status_writes(&env.namespace).await;
    env.emulator.admin().clear_stats();
    let items: Vec<Value> = (0..GRANTS)
        .map(|i| env.grant(&format!("g{i:03}"), &keys[i % KEYS], json!({})))
        .collect();
    env.apply(&json!({"apiVersion": "v1", "kind": "List", "items": items}));
    env.wait_all_ready(240);

    let calls = env.emulator.admin().calls(0);
    let (creates, lists, describes) = (
        count(&calls, "create-grant"),
        count(&calls, "list-grants"),
        count(&calls, "describe-key"),
    );
    eprintln!(
        "{GRANTS} grants on {KEYS} keys: {creates} create-grant, {lists} list-grants, \
         {describes} describe-key, {} calls in all (floor {})",
        calls.len(),
        GRANTS + 2 * KEYS
    );
    assert_eq!(creates, GRANTS, "one create per object");
    assert_eq!(describes, KEYS, "one describe-key per key");
    // One walk per key to converge, plus the drift detector's one walk per key per resync
    // period that the run lasted (a loaded machine makes it last several periods).
    let start_ms = calls.first().map_or(0, |c| c.at_ms);
    let periods = calls.last().map_or(0, |c| c.at_ms - start_ms) / resync.as_millis() as u64;
    let allowed = KEYS * (1 + periods as usize + 1);
    assert!(
        lists <= allowed,
        "{lists} list-grants walks for {KEYS} keys (allowed {allowed}), at ms (key): {:?}; last call at {} ms",
        calls
            .iter()
            .filter(|c| c.operation == "list-grants")
            .map(|c| (c.at_ms - start_ms, c.key_id.clone().unwrap_or_default()))
            .collect::<Vec<_>>(),
        calls.last().map_or(0, |c| c.at_ms - start_ms)
    );
    let quotas = count(&calls, "user-quotas");
    assert!(
        quotas <= 2,
        "{quotas} user-quotas (health checks) while converging"
    );
    assert_eq!(
        calls.len(),
        creates + lists + describes + quotas,
        "calls beyond create, list and describe: {:?}",
        calls
            .iter()
            .map(|c| c.operation.as_str())
            .filter(|op| {
                !["create-grant", "list-grants", "describe-key", "user-quotas"].contains(op)
            })
            .collect::<Vec<_>>()
    );

    // One status write per object to converge: the one that records its grant and Ready.
    {
        let seen = status_writes.lock().unwrap();
        let repeated: BTreeMap<&String, &usize> =
            seen.writes.iter().filter(|(_, n)| **n > 1).collect();
        assert!(
            repeated.is_empty(),
            "objects whose status was written more than once to converge ({} writes for {GRANTS} objects): {repeated:?}",
            seen.total()
        );
    }

    // The whole period right after converging, first drift pass included, writes nothing.
    let status_writes_before = status_writes.lock().unwrap().total();
    let before_kube = written_objects(&env);
    let before = env.emulator.admin().calls(0).last().map_or(0, |c| c.seq);
    let namespace_gets_before = namespace_gets();
    tokio::time::sleep(resync + Duration::from_secs(1)).await;
    // The namespaceSelector check reads watched labels, so no GET of the Namespace per object
    // (kubectl's applies GET it, hence the allowance).
    let namespace_gets = namespace_gets() - namespace_gets_before;
    assert!(
        namespace_gets < 10,
        "{namespace_gets} GETs of a Namespace in one period for {GRANTS} objects"
    );
    let calls = env.emulator.admin().calls(before);
    let kms_writes = count(&calls, "create-grant")
        + count(&calls, "revoke-grant")
        + count(&calls, "retire-grant");
    assert_eq!(kms_writes, 0, "KMS writes in a steady period: {calls:?}");
    let lists = count(&calls, "list-grants");
    // One period may hold two passes (its two ends); never more than that per key.
    assert!(
        lists <= 2 * KEYS,
        "{lists} list-grants in one steady period"
    );
    let after_kube = written_objects(&env);
    let changed: Vec<&String> = after_kube
        .iter()
        .filter(|(name, version)| before_kube.get(*name) != Some(*version))
        .map(|(name, _)| name)
        .collect();
    assert!(
        changed.is_empty(),
        "Kubernetes writes in a steady period: {changed:?}"
    );
    assert_eq!(
        status_writes.lock().unwrap().total(),
        status_writes_before,
        "status writes in a steady period"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn objects_deleted_without_a_finalizer_leave_no_key_being_listed() {
    let _turn = TURNS.lock().await;
    let resync = Duration::from_secs(4);
    let mut env = Env::new("cost-orphan", EmulatorConfig::for_tests(), "4s").await;
    let key = env.new_key("orphaned");
    env.start_operator();
    let items: Vec<Value> = (0..10)
        .map(|i| env.grant(&format!("o{i}"), &key, json!({"deletionPolicy": "Orphan"})))
        .collect();
    env.apply(&json!({"apiVersion": "v1", "kind": "List", "items": items}));
    env.wait_all_ready(120);
    // Orphan: no finalizer, so the operator never sees a last reconcile of these objects.
    kubectl_ok(
        &[
            "-n",
            &env.namespace,
            "delete",
            "kmsgrants.kmsgrant.io",
            "--all",
        ],
        None,
    );
    // One period to notice they are gone, then two periods in which the key is not listed.
    tokio::time::sleep(resync * 2).await;
    let before = env.emulator.admin().calls(0).last().map_or(0, |c| c.seq);
    tokio::time::sleep(resync * 2).await;
    let calls = env.emulator.admin().calls(before);
    assert_eq!(
        count(&calls, "list-grants"),
        0,
        "the key of deleted objects is still listed: {calls:?}"
    );
    assert_eq!(
        env.emulator.admin().grant_count(&key),
        Some(10),
        "Orphan keeps the grants"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deleting_200_grants_on_4_keys_revokes_each_once_and_shares_the_lists() {
    let _turn = TURNS.lock().await;
    let resync = Duration::from_secs(15);
    let mut env = Env::new("cost-delete", EmulatorConfig::for_tests(), "15s").await;
    let keys: Vec<String> = (0..KEYS)
        .map(|i| env.new_key(&format!("delete-{i}")))
        .collect();
    let port = support::free_port();
    env.start_operator_with(&["--admin-address", &format!("127.0.0.1:{port}")]);
    let items: Vec<Value> = (0..GRANTS)
        .map(|i| env.grant(&format!("d{i:03}"), &keys[i % KEYS], json!({})))
        .collect();
    env.apply(&json!({"apiVersion": "v1", "kind": "List", "items": items}));
    env.wait_all_ready(240);
    // KMS answers as a real cloud does, not at once: the deletions arrive while walks are in
    // flight, as they do at scale.
    env.emulator
        .admin()
        .set_faults(kms_emulator::FaultSettings {
            latency_ms: 20,
            ..kms_emulator::FaultSettings::default()
        })
        .unwrap();
    let before = env.emulator.admin().calls(0).last().map_or(0, |c| c.seq);
    let finalizer_writes = async || -> f64 {
        grant_kube_writes(port)
            .await
            .iter()
            .filter(|(labels, _)| labels.contains("write=\"finalizer\""))
            .map(|(_, n)| n)
            .sum()
    };
    let finalizer_writes_before = finalizer_writes().await;
    let client = kube::Client::try_from(
        kube::Config::from_custom_kubeconfig(
            kube::config::Kubeconfig::read_from(support::kubeconfig()).unwrap(),
            &Default::default(),
        )
        .await
        .unwrap(),
    )
    .unwrap();
    // One request for all of them, as `kubectl delete` of a label or a GitOps prune would.
    Api::<KmsGrant>::namespaced(client, &env.namespace)
        .delete_collection(
            &kube::api::DeleteParams::default(),
            &kube::api::ListParams::default(),
        )
        .await
        .unwrap();
    kubectl_ok(
        &[
            "-n",
            &env.namespace,
            "wait",
            "--for=delete",
            "kmsgrants.kmsgrant.io",
            "--all",
            "--timeout=240s",
        ],
        None,
    );
    for key in &keys {
        assert_eq!(env.emulator.admin().grant_count(key), Some(0), "key {key}");
    }
    let calls = env.emulator.admin().calls(before);
    let (revokes, lists) = (count(&calls, "revoke-grant"), count(&calls, "list-grants"));
    let start_ms = calls.first().map_or(0, |c| c.at_ms);
    let periods = calls.last().map_or(0, |c| c.at_ms - start_ms) / resync.as_millis() as u64;
    eprintln!(
        "deleting {GRANTS} grants on {KEYS} keys: {revokes} revoke-grant, {lists} list-grants \
         over {periods} resync periods, {} calls in all",
        calls.len()
    );
    assert_eq!(revokes, GRANTS, "one revoke per object");
    // One finalizer patch per object, the one that releases it: none repeated, none sent to an
    // object already gone.
    let finalizer_patches = finalizer_writes().await - finalizer_writes_before;
    assert_eq!(
        finalizer_patches,
        GRANTS as f64,
        "finalizer patches to delete {GRANTS} objects: {:?}",
        grant_kube_writes(port).await
    );
    // Each deletion needs a list that started after it was asked for; the objects being deleted
    // on a key share one, so a few walks per key (the deletions arrive over a moment, not at
    // once: 14 to 24 walks for the 4 keys measured alone, more spread on a loaded machine), and
    // the drift detector's one per key per period — never one per object (50 per key here).
    let allowed = KEYS * (8 + periods as usize + 1);
    assert!(
        lists <= allowed,
        "{lists} list-grants walks to delete {GRANTS} objects on {KEYS} keys (allowed {allowed})"
    );
}

/// The operator's own count of its writes to the API server for KmsGrants, by write (finalizer,
/// status, event) and outcome, from its /metrics.
async fn grant_kube_writes(port: u16) -> BTreeMap<String, f64> {
    support::metrics(port)
        .await
        .lines()
        .filter_map(|line| line.strip_prefix("kmsgrant_grant_kube_writes_total"))
        .filter_map(|rest| {
            let (labels, value) = rest.rsplit_once(' ')?;
            Some((labels.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// KmsGrant reconciles the operator has finished, any result, from its /metrics.
async fn grant_reconciles(port: u16) -> f64 {
    support::metrics(port)
        .await
        .lines()
        .filter(|line| line.starts_with("kmsgrant_reconciles_total{kind=\"KmsGrant\""))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A new operator takes over objects that are all in sync, after its predecessor crashed
/// (SIGKILL) and after it stopped cleanly (SIGTERM). Steady means: every object reconciled once
/// (the operator's reconcile count reaches the number of objects) and then the KMS call log quiet
/// for two seconds. The cost model's floor for a takeover is what it takes to know the cloud: one
/// `list-grants` walk per key (one page here: 50 grants) and one `describe-key` per key, plus the
/// provider config's credential check (`user-quotas`); nothing is written anywhere — no
/// create or revoke, no status, no event, no finalizer, for objects already in sync.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_operator_after_a_crash_or_a_clean_stop_reaches_steady_with_one_list_per_key_and_no_write()
 {
    let _turn = TURNS.lock().await;
    // Longer than the test: the only drift pass in the window is the one a start makes.
    let resync = "10m";
    let mut env = Env::new("cost-failover", EmulatorConfig::for_tests(), resync).await;
    let keys: Vec<String> = (0..KEYS)
        .map(|i| env.new_key(&format!("failover-{i}")))
        .collect();
    let start = |env: &mut Env| -> u16 {
        let port = support::free_port();
        env.operator = Some(support::Operator::start_with(
            &env.namespace,
            resync,
            &["--admin-address", &format!("127.0.0.1:{port}")],
        ));
        port
    };
    start(&mut env);
    let items: Vec<Value> = (0..GRANTS)
        .map(|i| env.grant(&format!("f{i:03}"), &keys[i % KEYS], json!({})))
        .collect();
    env.apply(&json!({"apiVersion": "v1", "kind": "List", "items": items}));
    env.wait_all_ready(240);
    // The events that follow each status write land.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let status_writes = watch_status_writes(&env.namespace).await;

    for stop in ["SIGKILL", "SIGTERM"] {
        let mut operator = env.operator.take().expect("an operator runs");
        match stop {
            "SIGKILL" => operator.kill(),
            _ => assert!(operator.terminate().success(), "a clean stop exits 0"),
        }
        let status_writes_before = status_writes.lock().unwrap().total();
        let before_kube = written_objects(&env);
        let before = support::last_seq(&env);
        let started = std::time::Instant::now();
        let port = start(&mut env);
        support::eventually(
            &format!("every object reconciled once by the operator started after {stop}"),
            Duration::from_secs(120),
            async || grant_reconciles(port).await >= GRANTS as f64,
        )
        .await;
        // Then the KMS call log quiet for two seconds.
        until_kms_quiet(&env).await;
        let steady = started.elapsed().saturating_sub(Duration::from_secs(2));
        let calls = env.emulator.admin().calls(before);
        let writes = grant_kube_writes(port).await;
        eprintln!(
            "after {stop}: steady in {steady:?} (reconciles {}), KMS calls {:?}, kube writes {writes:?}",
            grant_reconciles(port).await,
            calls
                .iter()
                .fold(BTreeMap::<&str, usize>::new(), |mut by, c| {
                    *by.entry(c.operation.as_str()).or_default() += 1;
                    by
                })
        );
        for key in &keys {
            let on_key = |op: &str| {
                calls
                    .iter()
                    .filter(|c| c.operation == op && c.key_id.as_deref() == Some(key.as_str()))
                    .count()
            };
            assert_eq!(on_key("list-grants"), 1, "list walks of {key} after {stop}");
            assert!(
                on_key("describe-key") <= 1,
                "{} describe-key of {key} after {stop}",
                on_key("describe-key")
            );
        }
        let beyond: Vec<&str> = calls
            .iter()
            .map(|c| c.operation.as_str())
            .filter(|op| !["list-grants", "describe-key", "user-quotas"].contains(op))
            .collect();
        assert!(
            beyond.is_empty(),
            "KMS calls beyond the floor after {stop}: {beyond:?}"
        );
        assert!(
            count(&calls, "user-quotas") <= 1,
            "{} credential checks after {stop}",
            count(&calls, "user-quotas")
        );
        assert!(
            writes.is_empty(),
            "writes for KmsGrants by the operator started after {stop}: {writes:?}"
        );
        let changed: Vec<String> = written_objects(&env)
            .into_iter()
            .filter(|(name, version)| before_kube.get(name) != Some(version))
            .map(|(name, _)| name)
            .collect();
        assert!(
            changed.is_empty(),
            "Kubernetes objects written after {stop}: {changed:?}"
        );
        assert_eq!(
            status_writes.lock().unwrap().total(),
            status_writes_before,
            "status writes after {stop}"
        );
    }
}

/// The provider config's `status.learnedRateLimit`, if any.
fn learned_rate_limit(env: &Env) -> Option<Value> {
    let config: Value = serde_json::from_str(&kubectl_ok(
        &[
            "get",
            "kmsproviderconfigs.kmsgrant.io",
            &env.provider,
            "-o",
            "json",
        ],
        None,
    ))
    .unwrap();
    config["status"].get("learnedRateLimit").cloned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_operator_starts_at_the_throttle_its_predecessor_learned_and_is_not_throttled() {
    let _turn = TURNS.lock().await;
    const THROTTLE: f64 = 10.0;
    const THROTTLED_KEYS: usize = 16;
    let resync = "10m";
    let mut emulator = EmulatorConfig::for_tests();
    emulator.faults.throttle_per_second = Some(THROTTLE);
    let mut env = Env::new("cost-learned-rate", emulator, resync).await;
    let keys: Vec<String> = (0..THROTTLED_KEYS)
        .map(|i| env.new_key(&format!("learned-{i}")))
        .collect();
    let start = |env: &mut Env| -> u16 {
        let port = support::free_port();
        env.operator = Some(support::Operator::start_with(
            &env.namespace,
            resync,
            &["--admin-address", &format!("127.0.0.1:{port}")],
        ));
        port
    };
    // The provider config allows 1,000 requests a second (the test default); the account takes 10.
    start(&mut env);
    let items: Vec<Value> = (0..2 * THROTTLED_KEYS)
        .map(|i| env.grant(&format!("l{i:03}"), &keys[i % THROTTLED_KEYS], json!({})))
        .collect();
    env.apply(&json!({"apiVersion": "v1", "kind": "List", "items": items}));
    env.wait_all_ready(240);
    // The converge met the throttle; the leader wrote what it learned into the config's status.
    let calls = env.emulator.admin().calls(0);
    assert!(
        calls.iter().any(|c| c.status == 429),
        "the first operator's burst met the throttle"
    );
    let mut recorded = None;
    support::eventually(
        "the learned rate limit recorded in the provider config's status",
        Duration::from_secs(30),
        async || {
            recorded = learned_rate_limit(&env);
            recorded.is_some()
        },
    )
    .await;
    let recorded = recorded.unwrap();
    let rate = recorded["requestsPerSecond"].as_u64().unwrap();
    let throttled = recorded["throttledRequestsPerSecond"].as_u64().unwrap();
    assert!(
        (1..=THROTTLE as u64).contains(&rate) && throttled >= rate,
        "{recorded}"
    );
    assert!(
        recorded["lastThrottleTime"]
            .as_str()
            .is_some_and(|t| t.parse::<jiff::Timestamp>().is_ok()),
        "{recorded}"
    );

    // A new operator after a crash: it starts at the recorded rate, so its look at every key (a
    // list and a describe each, 32 calls against a throttle of 10 a second) meets no 429, and it
    // writes nothing, the config's status included.
    let restart = |env: &mut Env| {
        env.operator.take().expect("an operator runs").kill();
        std::thread::sleep(Duration::from_secs(2));
        let before = support::last_seq(env);
        let port = start(env);
        (before, port)
    };
    let until_reconciled = async |port: u16, env: &Env| {
        support::eventually(
            "every object reconciled by the new operator",
            Duration::from_secs(120),
            async || grant_reconciles(port).await >= (2 * THROTTLED_KEYS) as f64,
        )
        .await;
        until_kms_quiet(env).await;
    };
    let before_kube = written_objects(&env);
    let (before, port) = restart(&mut env);
    until_reconciled(port, &env).await;
    let calls = env.emulator.admin().calls(before);
    let throttled_calls: Vec<String> = calls
        .iter()
        .filter(|c| c.status == 429)
        .map(|c| format!("{} #{} at {} ms", c.operation, c.seq, c.at_ms))
        .collect();
    assert!(
        throttled_calls.is_empty(),
        "throttled answers to the operator that started from the learned rate {recorded}: {throttled_calls:?} of {} calls",
        calls.len()
    );
    assert_eq!(
        count(&calls, "list-grants"),
        THROTTLED_KEYS,
        "one list walk per key"
    );
    assert_eq!(
        written_objects(&env),
        before_kube,
        "Kubernetes objects written by the new operator"
    );

    // The same start without the record bursts into the throttle: what the record saves.
    kubectl_ok(
        &[
            "patch",
            "kmsproviderconfigs.kmsgrant.io",
            &env.provider,
            "--subresource=status",
            "--type=merge",
            "-p",
            r#"{"status":{"learnedRateLimit":null}}"#,
        ],
        None,
    );
    let (before, port) = restart(&mut env);
    until_reconciled(port, &env).await;
    let calls = env.emulator.admin().calls(before);
    assert!(
        calls.iter().any(|c| c.status == 429),
        "an operator starting at spec.rateLimit meets the throttle"
    );
    // ... and records what it learned for the next one.
    support::eventually(
        "the learned rate limit recorded again",
        Duration::from_secs(30),
        async || learned_rate_limit(&env).is_some(),
    )
    .await;
}
