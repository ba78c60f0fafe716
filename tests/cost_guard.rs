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
    kubectl_ok(
        &[
            "-n",
            &env.namespace,
            "wait",
            "--for=condition=Ready",
            "kmsgrants.kmsgrant.io",
            "--all",
            "--timeout=240s",
        ],
        None,
    );

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
    kubectl_ok(
        &[
            "-n",
            &env.namespace,
            "wait",
            "--for=condition=Ready",
            "kmsgrants.kmsgrant.io",
            "--all",
            "--timeout=120s",
        ],
        None,
    );
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
    env.start_operator();
    let items: Vec<Value> = (0..GRANTS)
        .map(|i| env.grant(&format!("d{i:03}"), &keys[i % KEYS], json!({})))
        .collect();
    env.apply(&json!({"apiVersion": "v1", "kind": "List", "items": items}));
    kubectl_ok(
        &[
            "-n",
            &env.namespace,
            "wait",
            "--for=condition=Ready",
            "kmsgrants.kmsgrant.io",
            "--all",
            "--timeout=240s",
        ],
        None,
    );
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
    // Each deletion needs a list that started after it was asked for; the objects being deleted
    // on a key share one, so a few walks per key (the deletions arrive over a moment, not at
    // once), and the drift detector's one per key per period — not one per object.
    let allowed = KEYS * (4 + periods as usize + 1);
    assert!(
        lists <= allowed,
        "{lists} list-grants walks to delete {GRANTS} objects on {KEYS} keys (allowed {allowed})"
    );
}
