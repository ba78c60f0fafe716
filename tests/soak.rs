//! The chaos soak: KmsGrants under churn while replicas are killed, the leader's API traffic
//! stalls, one replica's clock is skewed, the API server restarts once, and the KMS misbehaves;
//! the identity invariants are checked throughout and at the end.
//!
//! It runs on a control plane of its own (not the one `scripts/test` shares), so that it can
//! restart its kube-apiserver while etcd keeps the data.
//!
//! In the suite it runs short (`KMSGRANT_SOAK_MINUTES`, default 1.5 min of chaos, 150 grants);
//! `scripts/soak MINUTES` runs the long version (1,000 grants) and writes the table to
//! `docs/reliability.md` (`KMSGRANT_SOAK_REPORT`).
//!
//! Every run prints its seed (`KMSGRANT_SOAK_SEED` replays the same churn and chaos choices) and
//! keeps what a diagnosis needs in a folder it names (`KMSGRANT_SOAK_DIR`, default
//! `$TMPDIR/kmsgrant-soak`): each replica's log, the emulator's whole call log and its final
//! grants. A failing run names every broken identity with its grants and their call-log lines.
//!
//! `KMSGRANT_SOAK_AUTH=keyless` runs it keyless: no Secret, the replicas exchange ServiceAccount
//! tokens of this control plane's issuer (registered in the emulator's IAM) for IAM tokens that
//! live `KMSGRANT_SOAK_TOKEN_SECONDS` (default 60), and the chaos adds IAM phases: exchanges
//! failing, exchanges slow, and the cluster's signing key "rotated" (IAM holding another JWKS)
//! until an admin uploads the right one. One more invariant then: no KMS call refused for its
//! credentials.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use kms_emulator::{CallRecord, EmulatorConfig, ErrorInjection, FaultSettings, InjectedError};
use kmsgrant::api::KmsGrant;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use serde_json::json;
use support::{CLUSTER, Env, Operator, StallingProxy};

const RESYNC: &str = "5s";
const RESYNC_SECONDS: u64 = 5;
const LEASE: &str = "6s";
/// Renew deadline of a 6 s lease: writes are fenced this long after the last renew began.
const FENCE_MS: u64 = 4000;
const KEYS: usize = 10;
const SKEW_SECONDS: i64 = 40;

fn setting(name: &str, default: f64) -> f64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn millis(timestamp: &str) -> Option<u64> {
    let at: jiff::Timestamp = timestamp.parse().ok()?;
    u64::try_from(at.as_millisecond()).ok()
}

/// One operator replica, restarted whenever it dies (as Kubernetes would).
struct Replica {
    flags: Vec<String>,
    skew: i64,
    process: Option<Operator>,
    namespace: String,
    /// The log of every process this replica ran, in order.
    logs: Vec<PathBuf>,
}

impl Replica {
    fn start(&mut self) {
        let flags: Vec<&str> = self.flags.iter().map(String::as_str).collect();
        let skew = self.skew.to_string();
        let envs: Vec<(&str, &str)> = if self.skew != 0 {
            vec![("KMSGRANT_TEST_CLOCK_SKEW_SECONDS", skew.as_str())]
        } else {
            vec![]
        };
        let process = Operator::start_with_env(&self.namespace, RESYNC, &flags, &envs);
        self.logs.push(process.log.clone());
        self.process = Some(process);
    }

    fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(Operator::pid)
    }

    /// Restarts it if it exited (a lost lease exits on purpose).
    fn keep_alive(&mut self) -> bool {
        let exited = self.process.as_mut().is_none_or(|p| p.try_wait().is_some());
        if exited {
            self.start();
        }
        exited
    }
}

fn rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}

#[derive(Default)]
struct Observations {
    /// (local ms when first seen, holder, renewTime ms in the holder's clock, acquireTime ms).
    lease: Vec<(u64, String, u64, u64)>,
    /// (at_ms, operation) of every KMS write answered or dropped.
    writes: Vec<(u64, String)>,
    /// Calls of any kind, by arrival time.
    calls: Vec<u64>,
    /// The emulator's whole call log, kept for the run's folder and for naming broken identities.
    call_log: Vec<CallRecord>,
    outages: Vec<(u64, u64)>,
    cross_identity: BTreeSet<String>,
    rss_max: f64,
    rss_samples: Vec<(u64, f64)>,
    kills: usize,
    stalls: usize,
    restarts: usize,
    /// (local ms when kube-apiserver was stopped, local ms when it answered /readyz again).
    api_restarts: Vec<(u64, u64)>,
    fault_phases: BTreeMap<&'static str, usize>,
}

/// Keyless runs: the identity provider and `client_id` registered for the replicas.
const SOAK_IDP: &str = "soak_cluster";
const SOAK_CLIENT_ID: &str = "kmsgrant-soak";
const SOAK_ACCOUNT: &str = "kms-keyless";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_soak_keeps_every_identity_invariant() {
    let minutes = setting("KMSGRANT_SOAK_MINUTES", 1.5);
    let long = minutes > 5.0;
    let initial = setting("KMSGRANT_SOAK_GRANTS", if long { 1000.0 } else { 150.0 }) as usize;
    let churn_per_second = setting("KMSGRANT_SOAK_CHURN", if long { 5.0 } else { 3.0 });
    let outage = Duration::from_secs(if long { 60 } else { 10 });
    let chaos_for = Duration::from_secs_f64(minutes * 60.0);
    // The API server restarts once, this far into the chaos.
    let api_restart_after = chaos_for.mul_f64(0.4);
    let started = Instant::now();
    let seed: u64 = std::env::var("KMSGRANT_SOAK_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    let run_dir = std::env::var_os("KMSGRANT_SOAK_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("kmsgrant-soak"))
        .join(format!("{}-seed-{seed}", now_ms() / 1000));
    std::fs::create_dir_all(&run_dir).unwrap();
    eprintln!(
        "soak: seed {seed} (replay the same choices with KMSGRANT_SOAK_SEED={seed}); logs and the call log go to {}",
        run_dir.display()
    );
    let control_plane = support::own_control_plane();

    let keyless = std::env::var("KMSGRANT_SOAK_AUTH").is_ok_and(|a| a == "keyless");
    let token_seconds = setting("KMSGRANT_SOAK_TOKEN_SECONDS", 60.0) as u64;
    // Room above 100 per key: replacements create first, and churn re-creates deleted names.
    let env = Env::new(
        "soak",
        EmulatorConfig {
            grants_per_key: 1000,
            federation_token_ttl: Duration::from_secs(token_seconds),
            ..EmulatorConfig::for_tests()
        },
        RESYNC,
    )
    .await;
    if keyless {
        support::kubectl_ok(
            &[
                "-n",
                &env.namespace,
                "create",
                "serviceaccount",
                SOAK_ACCOUNT,
            ],
            None,
        );
        let subject = format!("system:serviceaccount:{}:{SOAK_ACCOUNT}", env.namespace);
        support::register_cluster_issuer(&env.emulator, SOAK_IDP, SOAK_CLIENT_ID, &[subject]).await;
        env.apply(&env.provider_config(json!({"auth": {"type": "WebIdentity", "webIdentity": {
            "identityProviderId": SOAK_IDP,
            "serviceAccountRef": {"namespace": env.namespace, "name": SOAK_ACCOUNT, "audiences": [SOAK_CLIENT_ID]}}}})));
        support::kubectl_ok(
            &["-n", &env.namespace, "delete", "secret", "kms-credentials"],
            None,
        );
    }
    // Keyless: the keys are the federated user's, so that it may revoke grants on them.
    let keys: Vec<String> = (0..KEYS)
        .map(|i| {
            if keyless {
                support::federated_key(&env, &format!("soak-{i}"), SOAK_IDP)
            } else {
                env.new_key(&format!("soak-{i}"))
            }
        })
        .collect();
    let proxy = StallingProxy::start().await;
    let proxied = proxy.kubeconfig(&env.namespace);
    let election = |extra: &[&str]| {
        let mut flags: Vec<String> = [
            "--leader-election",
            "--lease-name",
            "soak",
            "--lease-namespace",
            &env.namespace,
            "--lease-duration",
            LEASE,
            "--backoff-max",
            "5s",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        flags.extend(extra.iter().map(|s| s.to_string()));
        flags
    };
    let replicas = Arc::new(Mutex::new(vec![
        Replica {
            flags: election(&["--kubeconfig", proxied.to_str().unwrap()]),
            skew: 0,
            process: None,
            namespace: env.namespace.clone(),
            logs: Vec::new(),
        },
        Replica {
            flags: election(&[]),
            skew: SKEW_SECONDS,
            process: None,
            namespace: env.namespace.clone(),
            logs: Vec::new(),
        },
    ]));
    for replica in replicas.lock().unwrap().iter_mut() {
        replica.start();
    }

    let client = kube::Client::try_from(
        kube::Config::from_custom_kubeconfig(
            kube::config::Kubeconfig::read_from(support::kubeconfig()).unwrap(),
            &Default::default(),
        )
        .await
        .unwrap(),
    )
    .unwrap();
    let api: Api<KmsGrant> = Api::namespaced(client.clone(), &env.namespace);
    let manifest = {
        let (namespace, provider) = (env.namespace.clone(), env.provider.clone());
        move |name: &str, key: &str, operations: &[&str]| -> KmsGrant {
            serde_json::from_value(json!({
                "apiVersion": "kmsgrant.io/v1beta1", "kind": "KmsGrant",
                "metadata": {"name": name, "labels": {support::TEST_LABEL: namespace}},
                "spec": {
                    "providerConfigRef": {"name": provider},
                    "keyId": key,
                    "granteePrincipal": "13gg44z4g2sglzk0egw0u726zoyzvrs8",
                    "operations": operations,
                }
            }))
            .unwrap()
        }
    };
    const OPS_A: &[&str] = &["describe-key", "create-datakey", "encrypt-datakey"];
    const OPS_B: &[&str] = &["describe-key", "decrypt-datakey"];
    let apply = PatchParams::apply("soak").force();
    for i in 0..initial {
        let name = format!("g{i}");
        let object = manifest(&name, &keys[i % KEYS], OPS_A);
        api.patch(&name, &apply, &Patch::Apply(&object))
            .await
            .unwrap();
    }

    let stop = Arc::new(AtomicBool::new(false));
    let obs = Arc::new(Mutex::new(Observations::default()));

    // Churn: create, change and delete objects, a third each. Deletes and changes pick a live
    // object, so the population stays near its start (about 100 grants per key, the real KMS
    // limit; changes move objects between keys at random).
    let churn = {
        let (api, stop, keys) = (api.clone(), stop.clone(), keys.clone());
        let manifest = manifest.clone();
        let apply = apply.clone();
        let mut next = initial;
        let mut live: Vec<String> = (0..initial).map(|i| format!("g{i}")).collect();
        let mut rng = fastrand::Rng::with_seed(seed);
        tokio::spawn(async move {
            let mut ops = 0u64;
            while !stop.load(Ordering::Relaxed) {
                match rng.u8(0..3) {
                    0 => {
                        let name = format!("g{next}");
                        next += 1;
                        let object = manifest(&name, &keys[next % KEYS], OPS_A);
                        if api
                            .patch(&name, &apply, &Patch::Apply(&object))
                            .await
                            .is_ok()
                        {
                            live.push(name);
                        }
                    }
                    1 if !live.is_empty() => {
                        let name = &live[rng.usize(0..live.len())];
                        let ops_now = if rng.bool() { OPS_A } else { OPS_B };
                        let key = &keys[rng.usize(0..KEYS)];
                        let object = manifest(name, key, ops_now);
                        let _ = api.patch(name, &apply, &Patch::Apply(&object)).await;
                    }
                    _ if !live.is_empty() => {
                        let at = rng.usize(0..live.len());
                        if api
                            .delete(&live[at], &DeleteParams::default())
                            .await
                            .is_ok()
                        {
                            live.swap_remove(at);
                        }
                    }
                    _ => {}
                }
                ops += 1;
                tokio::time::sleep(Duration::from_secs_f64(1.0 / churn_per_second)).await;
            }
            ops
        })
    };

    // Chaos: kills, stalls and KMS fault phases, one at a time at random intervals.
    let chaos = {
        let (stop, obs, replicas) = (stop.clone(), obs.clone(), replicas.clone());
        let admin = env.emulator.admin();
        let proxy_stalled = Arc::new(AtomicBool::new(false));
        let proxy = Arc::new(proxy);
        let proxy_for_chaos = proxy.clone();
        let control_plane = control_plane.clone();
        let emulator_url = env.emulator.base_url();
        let admin_token = if keyless {
            support::admin_token(&env.emulator).await
        } else {
            String::new()
        };
        tokio::spawn(async move {
            let chaos_started = Instant::now();
            let mut api_restarted = false;
            let inject = |operation: &str, rate: f64, error: InjectedError| FaultSettings {
                errors: BTreeMap::from([(operation.to_owned(), ErrorInjection { rate, error })]),
                ..FaultSettings::default()
            };
            let mut round = 0usize;
            let mut rng = fastrand::Rng::with_seed(seed.wrapping_add(1));
            while !stop.load(Ordering::Relaxed) {
                let wait = if long {
                    rng.u64(5..=60)
                } else {
                    rng.u64(3..=8)
                };
                tokio::time::sleep(Duration::from_secs(wait)).await;
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                if !api_restarted && chaos_started.elapsed() >= api_restart_after {
                    // kube-apiserver stops and starts again (etcd kept), as in a control plane
                    // upgrade: every watch and the lease renewals fail until it is back.
                    api_restarted = true;
                    let from = now_ms();
                    let dir = control_plane.clone();
                    tokio::task::spawn_blocking(move || support::restart_api_server(&dir))
                        .await
                        .unwrap();
                    obs.lock().unwrap().api_restarts.push((from, now_ms()));
                    continue;
                }
                round += 1;
                // Keyless runs add three IAM phases to the nine.
                let phases = if keyless { 12 } else { 9 };
                match round % phases {
                    0 | 4 => {
                        let which = rng.usize(0..2);
                        if let Some(p) = replicas.lock().unwrap()[which].process.as_mut() {
                            p.kill();
                        }
                        obs.lock().unwrap().kills += 1;
                    }
                    1 => {
                        proxy_for_chaos.stall();
                        proxy_stalled.store(true, Ordering::Relaxed);
                        obs.lock().unwrap().stalls += 1;
                        tokio::time::sleep(Duration::from_secs(9)).await;
                        proxy_for_chaos.resume();
                    }
                    11 => {
                        // The cluster's signing key rotates and IAM still holds the old JWKS:
                        // every exchange is refused until the admin uploads the new one.
                        let wrong = json!({"keys": [{"kty": "RSA", "kid": "rotated-away", "use": "sig",
                            "alg": "RS256", "n": "1JA_k0ReMH98zV3KmGY2Iy3XLtX5m2Yo2uBIQH1gCN679kZg0uPzxxrr6ydcDRHWmTwXtQSVFABW9G93655z8IWCXALMJ4THW7TMhw0CuxTgI8H8_i114PtKIIR6Opd7xmqpVwUEjO3SSk4dtzaAJEVIZYJTCZUIiD-D4BcUMjMEoKzKBIizPAphIXQAYRQWsiPUN-1YMcqR5Siek5_6JiUgaUs2kOOlSX4c5YQghhdENo2CAadvLeaVHzhgvrnTPLJmwaRUz8SvOKM7OBhwirFw7qERCyPpUoHAd4c3gZaEi82Q0kUlZeYA0QOgw83lZ1ISVvRpLR30oGr9lw5LtQ", "e": "AQAB"}]});
                        let set_jwks = |jwks: String| {
                            let (url, token) = (emulator_url.clone(), admin_token.clone());
                            async move {
                                let _ = rustls::crypto::ring::default_provider().install_default();
                                let answer = reqwest::Client::new()
                                    .put(format!("{url}/v3.0/OS-FEDERATION/identity-providers/{SOAK_IDP}/openid-connect-config"))
                                    .header("X-Auth-Token", token)
                                    .json(&json!({"openid_connect_config": {"signing_key": jwks}}))
                                    .send()
                                    .await
                                    .unwrap();
                                assert!(
                                    answer.status().is_success(),
                                    "{}",
                                    answer.text().await.unwrap_or_default()
                                );
                            }
                        };
                        set_jwks(wrong.to_string()).await;
                        *obs.lock()
                            .unwrap()
                            .fault_phases
                            .entry("IAM: signing key rotated, JWKS uploaded 15 s later")
                            .or_default() += 1;
                        tokio::time::sleep(Duration::from_secs(15)).await;
                        let jwks = tokio::task::spawn_blocking(support::cluster_jwks)
                            .await
                            .unwrap();
                        set_jwks(jwks).await;
                    }
                    phase => {
                        let (label, faults, hold) = match phase {
                            9 => (
                                "IAM: every exchange fails (500) for 20 s",
                                inject("iam:id-token", 1.0, InjectedError::Unavailable),
                                Duration::from_secs(20),
                            ),
                            10 => (
                                "IAM and KMS slow (2-4 s per call)",
                                FaultSettings {
                                    latency_ms: 2000,
                                    jitter_ms: 2000,
                                    ..FaultSettings::default()
                                },
                                Duration::from_secs(10),
                            ),
                            8 => (
                                "latency spike 300-800 ms",
                                FaultSettings {
                                    latency_ms: 300,
                                    jitter_ms: 500,
                                    ..FaultSettings::default()
                                },
                                Duration::from_secs(8),
                            ),
                            2 => (
                                "30% 5xx on every call",
                                inject("*", 0.3, InjectedError::Unavailable),
                                Duration::from_secs(10),
                            ),
                            5 => (
                                "429 storm",
                                FaultSettings {
                                    throttle_per_second: Some(5.0),
                                    ..FaultSettings::default()
                                },
                                Duration::from_secs(10),
                            ),
                            6 => (
                                "commit, then drop 10% of writes",
                                FaultSettings {
                                    drop_after_commit: BTreeMap::from([
                                        ("create-grant".to_owned(), 0.1),
                                        ("revoke-grant".to_owned(), 0.1),
                                    ]),
                                    ..FaultSettings::default()
                                },
                                Duration::from_secs(10),
                            ),
                            7 => (
                                "commit, then 5xx on creates",
                                FaultSettings {
                                    error_after_commit: BTreeMap::from([(
                                        "create-grant".to_owned(),
                                        0.3,
                                    )]),
                                    ..FaultSettings::default()
                                },
                                Duration::from_secs(10),
                            ),
                            _ => (
                                // 3: early, so the short run has one too.
                                "outage",
                                inject("*", 1.0, InjectedError::Unavailable),
                                outage,
                            ),
                        };
                        admin.set_faults(faults).unwrap();
                        let from = now_ms();
                        *obs.lock().unwrap().fault_phases.entry(label).or_default() += 1;
                        tokio::time::sleep(hold).await;
                        admin.set_faults(FaultSettings::default()).unwrap();
                        if label == "outage" {
                            obs.lock().unwrap().outages.push((from, now_ms()));
                        }
                    }
                }
            }
            admin.set_faults(FaultSettings::default()).unwrap();
            proxy_for_chaos.resume();
        })
    };

    // Observation: the lease, the call log, memory, and cross-identity ownership.
    let sampler = {
        let (stop, obs, replicas, api) = (stop.clone(), obs.clone(), replicas.clone(), api.clone());
        let admin = env.emulator.admin();
        let namespace = env.namespace.clone();
        let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
            Api::namespaced(client.clone(), &env.namespace);
        tokio::spawn(async move {
            let mut seq = 0u64;
            let mut tick = 0u64;
            let mut last_lease = None;
            while !stop.load(Ordering::Relaxed) {
                tick += 1;
                if let Ok(Some(lease)) = leases.get_opt("soak").await {
                    let spec = lease.spec.unwrap_or_default();
                    let record = (
                        spec.holder_identity.unwrap_or_default(),
                        spec.renew_time
                            .and_then(|t| millis(&t.0.to_string()))
                            .unwrap_or(0),
                        spec.acquire_time
                            .and_then(|t| millis(&t.0.to_string()))
                            .unwrap_or(0),
                    );
                    if last_lease.as_ref() != Some(&record) {
                        obs.lock().unwrap().lease.push((
                            now_ms(),
                            record.0.clone(),
                            record.1,
                            record.2,
                        ));
                        last_lease = Some(record);
                    }
                }
                let calls = admin.calls(seq);
                {
                    let mut o = obs.lock().unwrap();
                    for call in &calls {
                        seq = seq.max(call.seq);
                        o.calls.push(call.at_ms);
                        if matches!(
                            call.operation.as_str(),
                            "create-grant" | "revoke-grant" | "retire-grant"
                        ) {
                            o.writes.push((call.at_ms, call.operation.clone()));
                        }
                    }
                    o.call_log.extend(calls);
                    let mut restarted = 0;
                    let mut largest: f64 = 0.0;
                    let mut replicas = replicas.lock().unwrap();
                    for replica in replicas.iter_mut() {
                        if replica.keep_alive() {
                            restarted += 1;
                        }
                        if let Some(rss) = replica.pid().and_then(rss_mib) {
                            largest = largest.max(rss);
                        }
                    }
                    o.rss_max = o.rss_max.max(largest);
                    if tick.is_multiple_of(10) && largest > 0.0 {
                        o.rss_samples.push((now_ms(), largest));
                    }
                    o.restarts += restarted;
                }
                if tick.is_multiple_of(5)
                    && let Ok(list) = api.list(&ListParams::default()).await
                {
                    for object in list.items {
                        let name = object.metadata.name.clone().unwrap_or_default();
                        let identity = format!("k8s/{CLUSTER}/{namespace}/{name}");
                        let recorded = object.status.as_ref().and_then(|s| s.grant_name.clone());
                        if recorded.is_some_and(|r| r != identity) {
                            obs.lock().unwrap().cross_identity.insert(name);
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };

    tokio::time::sleep(chaos_for).await;
    stop.store(true, Ordering::Relaxed);
    let churned = churn.await.unwrap();
    chaos.await.unwrap();
    sampler.await.unwrap();
    env.emulator
        .admin()
        .set_faults(FaultSettings::default())
        .unwrap();
    for replica in replicas.lock().unwrap().iter_mut() {
        replica.keep_alive();
    }
    let chaos_ended = Instant::now();

    // Settle: every object Ready at its generation, and exactly its grant on KMS.
    let settle_limit = Duration::from_secs(300);
    let converged_after = loop {
        for replica in replicas.lock().unwrap().iter_mut() {
            replica.keep_alive();
        }
        let objects = api.list(&ListParams::default()).await.unwrap().items;
        let grants = env.emulator.admin().dump().grants;
        let on_kms: BTreeMap<String, usize> =
            grants.iter().fold(BTreeMap::new(), |mut counts, g| {
                *counts
                    .entry(g.name.clone().unwrap_or_default())
                    .or_default() += 1;
                counts
            });
        let not_ready: Vec<String> = objects
            .iter()
            .filter(|o| o.metadata.deletion_timestamp.is_none())
            .filter(|o| {
                let status = o.status.clone().unwrap_or_default();
                status.observed_generation != o.metadata.generation
                    || !status.conditions.iter().any(|c| {
                        c.type_ == "Ready" && c.status == kmsgrant::api::ConditionStatus::True
                    })
            })
            .filter_map(|o| o.metadata.name.clone())
            .collect();
        let expected = objects
            .iter()
            .filter(|o| o.metadata.deletion_timestamp.is_none())
            .count();
        // Deletions finished too, and every live object's recorded grant is on KMS: counts alone
        // could let a deleting object's grant make up for a live object that lacks one.
        let deleting = objects.len() - expected;
        let present: BTreeSet<&str> = grants.iter().map(|g| g.grant_id.as_str()).collect();
        let recorded_everywhere = objects
            .iter()
            .filter(|o| o.metadata.deletion_timestamp.is_none())
            .all(|o| {
                o.status
                    .as_ref()
                    .and_then(|s| s.grant_id.as_deref())
                    .is_some_and(|id| present.contains(id))
            });
        if not_ready.is_empty()
            && deleting == 0
            && recorded_everywhere
            && grants.len() == expected
            && on_kms.values().all(|&n| n == 1)
        {
            break Ok(chaos_ended.elapsed());
        }
        let problem = format!(
            "{} objects not Ready (e.g. {:?}), {deleting} still being deleted, {} grants for {expected} objects",
            not_ready.len(),
            not_ready.iter().take(3).collect::<Vec<_>>(),
            grants.len()
        );
        if chaos_ended.elapsed() >= settle_limit {
            // Reported in the table (and failed below), not hidden behind a panic.
            break Err(problem);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };

    // Final invariants.
    let objects = api.list(&ListParams::default()).await.unwrap().items;
    let grants = env.emulator.admin().dump().grants;
    let identities: BTreeSet<String> = objects
        .iter()
        .filter_map(|o| o.metadata.name.clone())
        .map(|name| format!("k8s/{CLUSTER}/{}/{name}", env.namespace))
        .collect();
    let mut per_identity: BTreeMap<String, usize> = BTreeMap::new();
    for grant in &grants {
        *per_identity
            .entry(grant.name.clone().unwrap_or_default())
            .or_default() += 1;
    }
    let duplicated: Vec<&String> = per_identity
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(name, _)| name)
        .collect();
    let duplicates = duplicated.len();
    let leaked: BTreeSet<String> = grants
        .iter()
        .map(|g| g.name.clone().unwrap_or_default())
        .filter(|name| !identities.contains(name))
        .collect();
    let leaks = grants
        .iter()
        .filter(|g| !identities.contains(g.name.as_deref().unwrap_or_default()))
        .count();
    let present: BTreeSet<&str> = grants.iter().map(|g| g.grant_id.as_str()).collect();
    let ready_without_grant = objects
        .iter()
        .filter(|o| o.metadata.deletion_timestamp.is_none())
        .filter(|o| {
            o.status.as_ref().is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == kmsgrant::api::ConditionStatus::True)
                    && !s.grant_id.as_deref().is_some_and(|id| present.contains(id))
            })
        })
        .count();
    // One cluster, many replicas: a ClusterNameInUse (an event ever, or a condition now) is a
    // false detection of a second writer (lost answers, leader changes, crashes, the skewed
    // replica must never look like one).
    let conflict_events: Api<k8s_openapi::api::core::v1::Event> =
        Api::namespaced(client.clone(), &env.namespace);
    let false_conflicts = conflict_events
        .list(&ListParams::default())
        .await
        .map(|list| {
            list.items
                .iter()
                .filter(|e| e.reason.as_deref() == Some("ClusterNameInUse"))
                .count()
        })
        .unwrap_or_default()
        + objects
            .iter()
            .filter(|o| {
                o.status
                    .as_ref()
                    .is_some_and(|s| s.conditions.iter().any(|c| c.reason == "ClusterNameInUse"))
            })
            .count();
    let mut o = obs.lock().unwrap();
    // The calls made while settling belong to the story too.
    let after = o.call_log.last().map_or(0, |c| c.seq);
    let settling = env.emulator.admin().calls(after);
    o.call_log.extend(settling);
    // Every broken identity by name, with its grants and every call that touched them, so that a
    // violation can be followed through the replicas' logs.
    let broken: BTreeSet<&str> = duplicated
        .iter()
        .map(|name| name.as_str())
        .chain(leaked.iter().map(String::as_str))
        .collect();
    let diagnosis = diagnose(&broken, &grants, &o.call_log, |name| {
        if leaked.contains(name) {
            "leaked: its object is gone"
        } else {
            "duplicated: more than one grant"
        }
    });
    // Writes by a non-leader: any write after a holder's fence closed and before the next
    // holder acquired (times in each holder's clock corrected by its known skew).
    let skew_of = |holder: &str, renew_ms: u64, seen_ms: u64| {
        // The skewed replica writes times 40 s ahead of the local clock.
        if renew_ms > seen_ms + 20_000 {
            let _ = holder;
            (SKEW_SECONDS * 1000) as u64
        } else {
            0
        }
    };
    // Leadership overlaps: a holder acquired before the previous holder's fence closed, so both
    // could have written at once. The call log cannot tell the replicas apart (both call from
    // 127.0.0.1), so this is checked on the Lease records instead. A renewal the sampler missed
    // makes the previous fence look earlier, never later: no false alarms.
    let mut gaps = Vec::new();
    let (mut changes, mut overlaps) = (0usize, 0usize);
    for pair in o.lease.windows(2) {
        let (seen_a, holder_a, renew_a, _) = &pair[0];
        let (seen_b, holder_b, renew_b, acquire_b) = &pair[1];
        if holder_a != holder_b && !holder_a.is_empty() {
            changes += 1;
            let renewed = renew_a - skew_of(holder_a, *renew_a, *seen_a);
            let acquired = acquire_b.saturating_sub(skew_of(holder_b, *renew_b, *seen_b));
            if acquired < renewed + FENCE_MS {
                overlaps += 1;
            }
            let fence = renewed + FENCE_MS + 250;
            if acquired > fence {
                gaps.push((fence, acquired));
            }
        }
    }
    let non_leader_writes = o
        .writes
        .iter()
        .filter(|(at, _)| gaps.iter().any(|(from, to)| at > from && at < to))
        .count();
    let outage_calls = o
        .calls
        .iter()
        .filter(|at| o.outages.iter().any(|(from, to)| *at >= from && *at <= to))
        .count();
    let cross = o.cross_identity.len();
    // Keyless: a KMS call refused for its credentials means an expired or rejected token was sent.
    let refused_credentials = o
        .call_log
        .iter()
        .filter(|c| !c.operation.starts_with("iam:") && matches!(c.status, 401 | 403))
        .filter(|c| {
            c.error_code.is_some_and(|code| {
                matches!(
                    code,
                    "KMS.0301"
                        | "KMS.0302"
                        | "KMS.0303"
                        | "APIGW.0301"
                        | "IAM.0066"
                        | "IAM.0067"
                        | "IAM.1108"
                )
            })
        })
        .count();
    let exchanges = o
        .call_log
        .iter()
        .filter(|c| c.operation == "iam:id-token")
        .fold((0usize, 0usize), |(ok, failed), c| {
            if c.status == 201 {
                (ok + 1, failed)
            } else {
                (ok, failed + 1)
            }
        });
    // The API server restart: how long it was away, and how long after it was back until the
    // lease was held again (the first Lease change the sampler saw afterwards).
    let api_restart = o
        .api_restarts
        .iter()
        .map(|(from, to)| {
            let held_again = o
                .lease
                .iter()
                .find(|(seen, holder, _, _)| seen > to && !holder.is_empty())
                .map(|(seen, _, _, _)| format!("{:.1} s", (seen - to) as f64 / 1000.0))
                .unwrap_or_else(|| "never seen".into());
            format!(
                "1 (away {:.1} s; lease held again {held_again} after it was back)",
                (to - from) as f64 / 1000.0
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    let api_restart = if api_restart.is_empty() {
        "0 (the chaos ended first)".to_owned()
    } else {
        api_restart
    };

    let table = format!(
        "| invariant | count |\n| --- | --- |\n\
         | duplicates (grants per identity > 1, after settling) | {duplicates} |\n\
         | leaks (grants whose object is gone) | {leaks} |\n\
         | cross-identity adoptions (status names another identity) | {cross} |\n\
         | objects Ready whose grant is missing | {ready_without_grant} |\n\
         | writes by a non-leader (between a fence and the next acquire) | {non_leader_writes} |\n\
         | leadership overlaps (a holder acquired before the previous one's fence closed) | {overlaps} |\n\
         | false second-writer detections (ClusterNameInUse events and conditions) | {false_conflicts} |\n\
         {}\n\
         | figure | value |\n| --- | --- |\n\
         {}\
         | chaos duration | {:.1} min |\n\
         | objects at the start / at the end | {initial} / {} |\n\
         | churn operations (create, change, delete) | {churned} |\n\
         | replica kills / lost-lease exits and restarts | {} / {} |\n\
         | API stalls longer than the lease | {} |\n\
         | kube-apiserver restarts (etcd kept) | {api_restart} |\n\
         | KMS fault phases | {} |\n\
         | KMS calls during outages ({} s each) | {outage_calls} |\n\
         | KMS writes in total | {} |\n\
         | leader changes seen | {} |\n\
         | converged after chaos stopped | {} (two resync periods: {} s) |\n\
         | peak RSS of a replica | {:.0} MiB |\n",
        if keyless {
            format!(
                "| KMS calls refused for their credentials (keyless) | {refused_credentials} |\n"
            )
        } else {
            String::new()
        },
        if keyless {
            format!(
                "| auth | keyless: IAM tokens living {token_seconds} s; ID-token exchanges {} ok, {} failed |\n",
                exchanges.0, exchanges.1
            )
        } else {
            "| auth | AccessKey |\n".to_owned()
        },
        chaos_for.as_secs_f64() / 60.0,
        objects.len(),
        o.kills,
        o.restarts,
        o.stalls,
        o.fault_phases
            .iter()
            .map(|(k, v)| format!("{k} ×{v}"))
            .collect::<Vec<_>>()
            .join(", "),
        outage.as_secs(),
        o.writes.len(),
        changes,
        match &converged_after {
            Ok(after) => format!("{:.1} s", after.as_secs_f64()),
            Err(problem) => format!("**not within {settle_limit:?}**: {problem}"),
        },
        2 * RESYNC_SECONDS,
        o.rss_max,
    );
    eprintln!("{table}");
    let converged_seconds = converged_after.as_ref().ok().map(Duration::as_secs_f64);
    keep_run(
        &run_dir,
        &replicas.lock().unwrap(),
        &o.call_log,
        &grants,
        &diagnosis,
    );
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(support::REPO)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    if let Ok(path) = std::env::var("KMSGRANT_SOAK_REPORT") {
        let rss: Vec<String> = o
            .rss_samples
            .iter()
            .step_by((o.rss_samples.len() / 12).max(1))
            .map(|(_, mib)| format!("{mib:.0}"))
            .collect();
        let report = format!(
            "### Seed {seed}\n\n\
             `KMSGRANT_SOAK_SEED={seed} scripts/soak {minutes}` at commit `{commit}`, {:.1} min in \
             all. Parameters: {initial} KmsGrants on {KEYS} keys, churn {churn_per_second}/s, two \
             replicas with leader election (lease {LEASE}), one behind a TCP proxy that stalls for \
             9 s, the other with its lease clock {SKEW_SECONDS} s ahead; replicas SIGKILLed at \
             random ({}–60 s apart); KMS phases: latency spikes, 30 % 5xx, 429 storms, \
             commit-then-drop on 10 % of writes, commit-then-5xx on 30 % of creates, a {} s \
             outage; kube-apiserver restarted once, {:.0} % into the chaos (SIGTERM, then a new \
             process on the same port; etcd and its data kept); resync {RESYNC}.{}\n\n{table}\n\
             RSS of a replica over time (MiB, sampled): {}\n",
            started.elapsed().as_secs_f64() / 60.0,
            if long { 5 } else { 3 },
            outage.as_secs(),
            api_restart_after.as_secs_f64() * 100.0 / chaos_for.as_secs_f64(),
            if keyless {
                format!(
                    " Keyless (`KMSGRANT_SOAK_AUTH=keyless`): no Secret; IAM tokens from ServiceAccount \
                     token exchanges living {token_seconds} s; IAM phases: every exchange failing \
                     for 20 s, IAM and KMS at 2–4 s per call, the signing key rotated with the \
                     new JWKS uploaded 15 s later."
                )
            } else {
                String::new()
            },
            rss.join(", ")
        );
        std::fs::write(&path, report).unwrap();
    }
    if let Ok(path) = std::env::var("KMSGRANT_SOAK_SUMMARY") {
        // One line per run, which scripts/soak gathers into the table of runs.
        let line = json!({
            "seed": seed.to_string(), "minutes": minutes, "commit": commit,
            "duplicates": duplicates, "leaks": leaks, "cross_identity": cross,
            "ready_without_grant": ready_without_grant, "non_leader_writes": non_leader_writes,
            "overlaps": overlaps, "converged_seconds": converged_seconds,
            "two_resyncs_seconds": 2 * RESYNC_SECONDS, "objects": objects.len(),
            "kills": o.kills, "leader_changes": changes, "writes": o.writes.len(),
            "auth": if keyless { "keyless" } else { "AccessKey" },
            "refused_credentials": refused_credentials, "false_conflicts": false_conflicts,
            "folder": run_dir.display().to_string(),
        });
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap();
        writeln!(file, "{line}").unwrap();
    }
    let kept = format!(
        "seed {seed} (KMSGRANT_SOAK_SEED={seed} replays it); replica logs, the call log and the final grants in {}; control plane and its logs in {}",
        run_dir.display(),
        control_plane.display(),
    );
    if let Err(problem) = &converged_after {
        panic!(
            "did not converge within {settle_limit:?} after chaos: {problem}\n{table}\n{diagnosis}\n{kept}"
        );
    }
    assert_eq!(
        (
            duplicates,
            leaks,
            cross,
            ready_without_grant,
            non_leader_writes,
            overlaps,
            refused_credentials,
            false_conflicts
        ),
        (0, 0, 0, 0, 0, 0, 0, 0),
        "invariants violated:\n{table}\n{diagnosis}\ncross-identity adoptions: {:?}\n{kept}",
        o.cross_identity.iter().take(10).collect::<Vec<_>>(),
    );
    assert_eq!(
        o.api_restarts.len(),
        1,
        "the API server was not restarted: the chaos ended before {api_restart_after:?}"
    );
    for replica in replicas.lock().unwrap().iter_mut() {
        if let Some(p) = replica.process.as_mut() {
            p.kill();
        }
    }
    support::remove_own_control_plane(&control_plane);
    // A passing run in the suite leaves nothing behind; one by hand (with a report) keeps its
    // folder for a look.
    if std::env::var_os("KMSGRANT_SOAK_REPORT").is_none() {
        let _ = std::fs::remove_dir_all(&run_dir);
    }
}

/// For each broken identity: what is wrong, its grants (ID, key, creation date) and every call
/// in the emulator's log that named it or one of its grants.
fn diagnose(
    broken: &BTreeSet<&str>,
    grants: &[kms_emulator::Grant],
    calls: &[CallRecord],
    what: impl Fn(&str) -> &'static str,
) -> String {
    let mut text = String::new();
    for name in broken {
        let held: Vec<&kms_emulator::Grant> = grants
            .iter()
            .filter(|g| g.name.as_deref().unwrap_or_default() == *name)
            .collect();
        let ids: BTreeSet<&str> = held.iter().map(|g| g.grant_id.as_str()).collect();
        text.push_str(&format!(
            "identity {:?} ({}): {} grant(s)\n",
            name,
            what(name),
            held.len()
        ));
        for grant in &held {
            text.push_str(&format!(
                "  grant {} on key {}, created {}\n",
                grant.grant_id,
                grant.key_id,
                timestamp(grant.creation_date_ms)
            ));
        }
        for call in calls.iter().filter(|c| {
            (!name.is_empty() && c.grant_name.as_deref() == Some(*name))
                || c.grant_id.as_deref().is_some_and(|id| ids.contains(id))
        }) {
            text.push_str(&format!("  call {}\n", call_line(call)));
        }
    }
    if text.is_empty() {
        text.push_str("no broken identity\n");
    }
    text
}

fn timestamp(ms: u64) -> String {
    jiff::Timestamp::from_millisecond(ms as i64)
        .map(|t| t.to_string())
        .unwrap_or_else(|_| ms.to_string())
}

fn call_line(call: &CallRecord) -> String {
    let outcome = if call.dropped {
        "committed, answer dropped".to_owned()
    } else {
        match call.error_code {
            Some(code) => format!("{} {code}", call.status),
            None => call.status.to_string(),
        }
    };
    format!(
        "#{} {} {} key {} grant {} name {}: {outcome}",
        call.seq,
        timestamp(call.at_ms),
        call.operation,
        call.key_id.as_deref().unwrap_or("-"),
        call.grant_id.as_deref().unwrap_or("-"),
        call.grant_name.as_deref().unwrap_or("-"),
    )
}

/// Keeps what a diagnosis needs in `dir`: each replica's logs, the call log (one JSON object a
/// line), the final grants and the diagnosis.
fn keep_run(
    dir: &Path,
    replicas: &[Replica],
    calls: &[CallRecord],
    grants: &[kms_emulator::Grant],
    diagnosis: &str,
) {
    for (i, replica) in replicas.iter().enumerate() {
        for (start, log) in replica.logs.iter().enumerate() {
            let kept = dir.join(format!("replica-{i}-start-{start}.log"));
            if std::fs::rename(log, &kept).is_err() {
                let _ = std::fs::copy(log, &kept);
            }
        }
    }
    let mut file = std::io::BufWriter::new(std::fs::File::create(dir.join("calls.jsonl")).unwrap());
    for call in calls {
        writeln!(file, "{}", serde_json::to_string(call).unwrap()).unwrap();
    }
    file.flush().unwrap();
    std::fs::write(
        dir.join("grants.json"),
        serde_json::to_string_pretty(grants).unwrap(),
    )
    .unwrap();
    std::fs::write(dir.join("diagnosis.txt"), diagnosis).unwrap();
}
