//! The benchmark (never a test): the operator binary against a real local control plane and the
//! in-process emulator, scenario by scenario (converge, steady, drift, change, delete, failover;
//! and runs of their own: ceiling, fairness, clusters), with the emulator's latency and throttle
//! and the provider config's rate limit as parameters. Prints a
//! table, writes JSON and regenerates `docs/benchmarks.md`. Run through `scripts/bench`, which
//! starts the control plane, builds the operator and passes both.
//!
//! The operator runs as its own process, so its peak RSS and CPU seconds (from /proc) are the
//! operator's alone; the emulator and this harness run in the benchmark's process.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kms_emulator::{Emulator, EmulatorConfig, FaultSettings, NewKey, StatsSnapshot};
use kmsgrant::api::KmsGrant;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use serde_json::{Value, json};

/// The charts' drawing: standalone SVG from the measured series.
#[path = "bench/svg.rs"]
mod svg;

#[derive(Parser, Debug, Clone)]
#[command(about = "Benchmark the operator at scale against the emulator")]
struct Args {
    /// Kubeconfig of the control plane.
    #[arg(long)]
    kubeconfig: PathBuf,
    /// The operator binary to run.
    #[arg(long)]
    operator: PathBuf,
    /// How that binary was built, for the report (scripts/bench: `release`, the profile of the
    /// image users run, unless told otherwise).
    #[arg(long, default_value = "release")]
    operator_profile: String,
    /// Runs as GRANTS/KEYS, one after the other (e.g. 1000/10,10000/100); a run may name its
    /// own scenarios after a colon, joined by `+` (e.g. 1000/10:converge,10000/100).
    /// For the scale target (the rate at 10,000 on 100 keys against the rate at 1,000 on 10) the
    /// first run is the reference.
    #[arg(long, value_delimiter = ',', default_value = "2000/20")]
    runs: Vec<String>,
    /// Emulator latency per KMS call.
    #[arg(long, default_value_t = 20)]
    latency_ms: u64,
    /// Emulator throttle (requests per second per credential); 0 for none.
    #[arg(long, default_value_t = 50.0)]
    throttle: f64,
    /// The provider config's rateLimit.requestsPerSecond (and burst).
    #[arg(long, default_value_t = 1000.0)]
    rate_limit: f64,
    /// The operator's resync interval, in seconds (the operator's default is 300; shorter keeps
    /// the steady and drift scenarios short, longer than a converge keeps its drift pass out of
    /// the converge's calls).
    #[arg(long, default_value_t = 60)]
    resync: u64,
    /// Steady periods (resyncs) to watch.
    #[arg(long, default_value_t = 5)]
    steady_periods: u32,
    /// The operator's --concurrency.
    #[arg(long, default_value_t = 16)]
    concurrency: u16,
    /// Scenarios to run, in order.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "converge,steady,drift,change,failover,delete"
    )]
    scenarios: Vec<String>,
    /// Where to write the JSON figures.
    #[arg(long, default_value = "target/bench.json")]
    json: PathBuf,
    /// The Markdown report to regenerate (empty: none).
    #[arg(long, default_value = "docs/benchmarks.md")]
    doc: String,
    /// Append this invocation's section to the doc instead of rewriting it.
    #[arg(long)]
    append: bool,
    /// The operator's --log-level (its log is kept in the temp directory, named in the JSON).
    #[arg(long, default_value = "warn")]
    log_level: String,
    /// Give up on a scenario after this many seconds.
    #[arg(long, default_value_t = 1800)]
    timeout: u64,
}

/// What the watcher saw of each object.
#[derive(Default)]
struct Seen {
    /// name → when it was first seen Ready at its current generation.
    ready_at: HashMap<String, Instant>,
    /// name → (generation, observedGeneration, Ready).
    state: HashMap<String, (i64, i64, bool)>,
}

struct Operator {
    child: Child,
    admin: String,
}

impl Operator {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// (peak RSS KiB, current RSS KiB, CPU seconds) of the operator process.
    fn usage(&self) -> (u64, u64, f64) {
        usage_of(self.pid())
    }

    /// One series of the operator's /metrics.
    async fn metric(&self, name: &str) -> Option<f64> {
        metric(&self.admin, name).await
    }
}

/// (peak RSS KiB, current RSS KiB, CPU seconds) of process `pid` (zeros once it is gone).
fn usage_of(pid: u32) -> (u64, u64, f64) {
    {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let kib = |field: &str| {
            status
                .lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Fields after the command's closing parenthesis; utime and stime are the 12th and 13th.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks: f64 = fields
            .get(11)
            .zip(fields.get(12))
            .map(|(u, s)| u.parse::<f64>().unwrap_or(0.0) + s.parse::<f64>().unwrap_or(0.0))
            .unwrap_or(0.0);
        (kib("VmHWM:"), kib("VmRSS:"), ticks / 100.0)
    }
}

/// CPU seconds so far of the processes whose command is `name` (the control plane's
/// kube-apiserver and etcd: the only ones of that name while the benchmark runs).
fn cpu_of_command(name: &str) -> f64 {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == name)
        })
        .map(|pid| usage_of(pid).2)
        .sum()
}

/// What a run looked like every half second, for the charts.
struct Sample {
    /// Seconds since the run's first scenario started.
    t: f64,
    /// Objects Ready at their current generation.
    ready: usize,
    /// KMS calls so far by operation (every attempt, 429s included).
    calls: BTreeMap<String, u64>,
    /// The operator's resident memory.
    rss_mib: f64,
}

/// Samples the run until aborted: Ready objects from the watcher, KMS calls from the emulator,
/// RSS of whichever operator process runs (`pid`; the failover scenario replaces it).
fn start_sampling(
    seen: Arc<Mutex<Seen>>,
    kms: kms_emulator::EmulatorAdmin,
    pid: Arc<AtomicU32>,
    samples: Arc<Mutex<Vec<Sample>>>,
) -> tokio::task::JoinHandle<()> {
    let started = Instant::now();
    tokio::spawn(async move {
        loop {
            let ready = seen
                .lock()
                .unwrap()
                .state
                .values()
                .filter(|(generation, observed, ready)| *ready && observed == generation)
                .count();
            let calls = kms
                .stats()
                .by_status
                .iter()
                .map(|(operation, outcomes)| (operation.clone(), outcomes.values().sum()))
                .collect();
            let (_, rss, _) = usage_of(pid.load(Ordering::Relaxed));
            samples.lock().unwrap().push(Sample {
                t: started.elapsed().as_secs_f64(),
                ready,
                calls,
                rss_mib: rss as f64 / 1024.0,
            });
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    })
}

/// The samples as JSON columns, with where each scenario started.
fn series_json(samples: &[Sample], marks: &[(String, f64)]) -> Value {
    let operations: std::collections::BTreeSet<&String> =
        samples.iter().flat_map(|s| s.calls.keys()).collect();
    let calls: serde_json::Map<String, Value> = operations
        .into_iter()
        .map(|operation| {
            let column: Vec<u64> = samples
                .iter()
                .map(|s| s.calls.get(operation).copied().unwrap_or(0))
                .collect();
            (operation.clone(), json!(column))
        })
        .collect();
    json!({
        "t": samples.iter().map(|s| (s.t * 10.0).round() / 10.0).collect::<Vec<_>>(),
        "ready": samples.iter().map(|s| s.ready).collect::<Vec<_>>(),
        "rss_mib": samples.iter().map(|s| (s.rss_mib * 10.0).round() / 10.0).collect::<Vec<_>>(),
        "calls": calls,
        "scenarios": marks.iter().map(|(name, t)| json!({"scenario": name, "t": t})).collect::<Vec<_>>(),
    })
}

/// The operator's /metrics at `admin` (empty when it does not answer).
async fn metrics_text(admin: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut stream) = tokio::net::TcpStream::connect(admin).await else {
        return String::new();
    };
    if stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: operator\r\n\r\n")
        .await
        .is_err()
    {
        return String::new();
    }
    let mut text = String::new();
    let _ = stream.read_to_string(&mut text).await;
    text
}

/// One series of the operator's /metrics at `admin`.
async fn metric(admin: &str, name: &str) -> Option<f64> {
    metrics_text(admin)
        .await
        .lines()
        .find(|l| l.starts_with(name) && !l.starts_with('#'))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
}

/// The series of `text` whose name and labels start with `prefix`, each by its labels.
fn series_by_labels(text: &str, prefix: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| l.starts_with(prefix) && !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series[prefix.len()..].to_owned(), value.parse().ok()?))
        })
        .collect()
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Kube API requests of the API server, by "VERB resource[/subresource]", for our group and events.
async fn apiserver_requests(client: &kube::Client) -> BTreeMap<String, u64> {
    let request = http::Request::get("/metrics").body(Vec::new()).unwrap();
    let text = client.request_text(request).await.unwrap_or_default();
    let mut counts = BTreeMap::new();
    for line in text.lines() {
        let Some(labels) = line
            .strip_prefix("apiserver_request_total{")
            .and_then(|l| l.split_once('}'))
        else {
            continue;
        };
        let label = |name: &str| {
            labels.0.split(',').find_map(|kv| {
                kv.strip_prefix(&format!("{name}=\""))
                    .map(|v| v.trim_end_matches('"').to_owned())
            })
        };
        let resource = label("resource").unwrap_or_default();
        let group = label("group").unwrap_or_default();
        if group != "kmsgrant.io" && resource != "events" && resource != "namespaces" {
            continue;
        }
        let mut what = format!("{} {resource}", label("verb").unwrap_or_default());
        if let Some(sub) = label("subresource").filter(|s| !s.is_empty()) {
            what = format!("{what}/{sub}");
        }
        let value: f64 = labels.1.trim().parse().unwrap_or(0.0);
        *counts.entry(what).or_insert(0) += value as u64;
    }
    counts
}

fn delta(after: &BTreeMap<String, u64>, before: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0)))
        .filter(|(_, v)| *v > 0)
        .collect()
}

fn kms_delta(
    after: &StatsSnapshot,
    before: &StatsSnapshot,
) -> BTreeMap<String, BTreeMap<String, u64>> {
    let mut out = BTreeMap::new();
    for (op, outcomes) in &after.by_status {
        for (outcome, n) in outcomes {
            let d = n - before.count(op, outcome);
            if d > 0 {
                out.entry(op.clone())
                    .or_insert_with(BTreeMap::new)
                    .insert(outcome.clone(), d);
            }
        }
    }
    out
}

fn all_calls(kms: &BTreeMap<String, BTreeMap<String, u64>>) -> u64 {
    kms.values().flat_map(|o| o.values()).sum()
}

fn throttled(kms: &BTreeMap<String, BTreeMap<String, u64>>) -> u64 {
    kms.values().filter_map(|o| o.get("429")).sum()
}

fn is_write(verb_resource: &str) -> bool {
    !["GET ", "LIST ", "WATCH "]
        .iter()
        .any(|v| verb_resource.starts_with(v))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

struct Run<'a> {
    args: &'a Args,
    client: kube::Client,
    grants: usize,
    keys: usize,
    namespace: String,
    emulator: kms_emulator::RunningEmulator,
    /// The running operator (the failover scenario replaces it).
    operator: Mutex<Operator>,
    /// Its process ID, for the sampler.
    operator_pid: Arc<AtomicU32>,
    seen: Arc<Mutex<Seen>>,
    api: Api<KmsGrant>,
    apply: PatchParams,
}

impl Run<'_> {
    /// The admin address of the running operator.
    fn admin(&self) -> String {
        self.operator.lock().unwrap().admin.clone()
    }

    fn deadline(&self, started: Instant, what: &str) -> anyhow::Result<()> {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(self.args.timeout),
            "{what}: gave up after {} s",
            self.args.timeout
        );
        Ok(())
    }

    /// Runs `body`, measuring KMS calls, kube requests and operator CPU around it.
    async fn measured<F, Fut>(&self, name: &str, body: F) -> anyhow::Result<Value>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<Value>>,
    {
        let kms_before = self.emulator.admin().stats();
        let kube_before = apiserver_requests(&self.client).await;
        let (_, _, cpu_before) = self.operator.lock().unwrap().usage();
        let started = Instant::now();
        let mut figures = body().await?;
        let elapsed = started.elapsed().as_secs_f64();
        let (peak, rss, cpu_after) = self.operator.lock().unwrap().usage();
        let kms = kms_delta(&self.emulator.admin().stats(), &kms_before);
        let kube = delta(&apiserver_requests(&self.client).await, &kube_before);
        let kube_writes: u64 = kube
            .iter()
            .filter(|(k, _)| is_write(k))
            .map(|(_, v)| v)
            .sum();
        let total = all_calls(&kms);
        let figures_obj = figures.as_object_mut().expect("figures are an object");
        figures_obj.insert("scenario".into(), json!(name));
        figures_obj.entry("seconds").or_insert(json!(elapsed));
        figures_obj.insert("kms_calls".into(), json!(kms));
        figures_obj.insert("kms_calls_total".into(), json!(total));
        figures_obj.insert("kms_throttled".into(), json!(throttled(&kms)));
        figures_obj.insert(
            "kms_throttled_share".into(),
            json!(if total == 0 {
                0.0
            } else {
                throttled(&kms) as f64 / total as f64
            }),
        );
        figures_obj.insert("kube_requests".into(), json!(kube));
        figures_obj.insert("kube_writes".into(), json!(kube_writes));
        figures_obj.insert("operator_cpu_seconds".into(), json!(cpu_after - cpu_before));
        figures_obj.insert("operator_peak_rss_mib".into(), json!(peak as f64 / 1024.0));
        figures_obj.insert("operator_rss_mib".into(), json!(rss as f64 / 1024.0));
        figures_obj.insert(
            "learned_rate".into(),
            json!(metric(&self.admin(), "kmsgrant_kms_rate_limit_requests_per_second").await),
        );
        eprintln!("bench: {name} done in {elapsed:.1} s");
        Ok(figures)
    }

    async fn converge(&self, key_ids: &[String]) -> anyhow::Result<Value> {
        let started = Instant::now();
        let mut applied_at = HashMap::new();
        let manifests: Vec<(String, Value)> = (0..self.grants)
            .map(|i| {
                let name = format!("g{i:05}");
                let grant = json!({"apiVersion": "kmsgrant.io/v1beta1", "kind": "KmsGrant",
                    "metadata": {"name": name, "namespace": self.namespace},
                    "spec": {"providerConfigRef": {"name": self.namespace}, "keyId": key_ids[i % self.keys],
                        "granteePrincipal": "13gg44z4g2sglzk0egw0u726zoyzvrs8",
                        "operations": ["describe-key", "encrypt-datakey"]}});
                (name, grant)
            })
            .collect();
        // Applied 16 at a time, as a GitOps tool would sync a directory.
        let stamps: Vec<(String, Instant)> = futures::stream::iter(manifests.iter())
            .map(|(name, grant)| {
                let (api, apply) = (self.api.clone(), self.apply.clone());
                async move {
                    api.patch(name, &apply, &Patch::Apply(grant)).await?;
                    Ok::<_, kube::Error>((name.clone(), Instant::now()))
                }
            })
            .buffer_unordered(16)
            .try_collect()
            .await?;
        applied_at.extend(stamps);
        let applied = started.elapsed().as_secs_f64();
        loop {
            let ready = self.seen.lock().unwrap().ready_at.len();
            if ready >= self.grants {
                break;
            }
            self.deadline(
                started,
                &format!("converge ({ready} of {} Ready)", self.grants),
            )?;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let seconds = started.elapsed().as_secs_f64();
        let seen = self.seen.lock().unwrap();
        let mut per_object: Vec<f64> = applied_at
            .iter()
            .filter_map(|(name, at)| {
                seen.ready_at
                    .get(name)
                    .map(|r| r.saturating_duration_since(*at).as_secs_f64())
            })
            .collect();
        per_object.sort_by(f64::total_cmp);
        Ok(json!({
            "seconds": seconds,
            "applied_seconds": applied,
            "grants_per_second": self.grants as f64 / seconds,
            "p50_seconds": percentile(&per_object, 0.5),
            "p99_seconds": percentile(&per_object, 0.99),
            "floor": self.grants + 2 * self.keys,
        }))
    }

    async fn steady(&self) -> anyhow::Result<Value> {
        let resync = Duration::from_secs(self.args.resync);
        // Periods start right after converging: the first drift pass is one of them.
        let mut periods = Vec::new();
        for _ in 0..self.args.steady_periods {
            let figures = self
                .measured("steady period", || async {
                    tokio::time::sleep(resync).await;
                    Ok(json!({}))
                })
                .await?;
            periods.push(figures);
        }
        let sum = |field: &str| -> f64 {
            periods
                .iter()
                .map(|p| p[field].as_f64().unwrap_or(0.0))
                .sum::<f64>()
        };
        let writes: u64 = periods
            .iter()
            .map(|p| {
                let kms = &p["kms_calls"];
                ["create-grant", "revoke-grant", "retire-grant"]
                    .iter()
                    .map(|op| {
                        kms[op]
                            .as_object()
                            .map_or(0, |o| o.values().filter_map(Value::as_u64).sum())
                    })
                    .sum::<u64>()
            })
            .sum();
        let lists: u64 = periods
            .iter()
            .map(|p| {
                p["kms_calls"]["list-grants"]
                    .as_object()
                    .map_or(0, |o| o.values().filter_map(Value::as_u64).sum())
            })
            .sum();
        let n = f64::from(self.args.steady_periods.max(1));
        Ok(json!({
            "periods": self.args.steady_periods,
            "kms_writes": writes,
            "lists_per_period": lists as f64 / n,
            "kube_writes_per_period": sum("kube_writes") / n,
            "cpu_seconds_per_period": sum("operator_cpu_seconds") / n,
        }))
    }

    async fn drift(&self) -> anyhow::Result<Value> {
        let admin = self.emulator.admin();
        let grants = admin.dump().grants;
        let revoked = grants.len() / 10;
        let started = Instant::now();
        for grant in grants.iter().step_by(10).take(revoked) {
            admin.revoke_out_of_band(&grant.grant_id);
        }
        loop {
            let held: usize = admin.grant_counts().values().sum();
            if held >= self.grants {
                break;
            }
            self.deadline(
                started,
                &format!("drift ({held} of {} grants)", self.grants),
            )?;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(
            json!({"revoked": revoked, "seconds": started.elapsed().as_secs_f64(),
            "resync_seconds": self.args.resync}),
        )
    }

    async fn change(&self) -> anyhow::Result<Value> {
        // Every tenth object of each key (objects go round-robin over the keys).
        let changed: Vec<String> = (0..self.grants)
            .filter(|i| (i / self.keys).is_multiple_of(10))
            .map(|i| format!("g{i:05}"))
            .collect();
        let started = Instant::now();
        let patch =
            json!({"spec": {"operations": ["describe-key", "encrypt-datakey", "decrypt-datakey"]}});
        futures::stream::iter(changed.iter())
            .map(|name| {
                let api = self.api.clone();
                let patch = patch.clone();
                async move {
                    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                        .await
                }
            })
            .buffer_unordered(16)
            .try_collect::<Vec<_>>()
            .await?;
        loop {
            let done = {
                let seen = self.seen.lock().unwrap();
                changed
                    .iter()
                    .filter(|name| {
                        seen.state
                            .get(*name)
                            .is_some_and(|(generation, observed, ready)| {
                                *generation > 1 && observed == generation && *ready
                            })
                    })
                    .count()
            };
            if done == changed.len() {
                break;
            }
            self.deadline(started, &format!("change ({done} of {})", changed.len()))?;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(
            json!({"changed": changed.len(), "seconds": started.elapsed().as_secs_f64(),
            "floor": 2 * changed.len()}),
        )
    }

    /// The converge with the cloud out of the way (run with --throttle 0), then the API
    /// server's own bound for the same writes, with the CPU of every process that shares the
    /// machine meanwhile: what bounds the operator when the cloud does not. Two rows.
    async fn ceiling(&self, key_ids: &[String]) -> anyhow::Result<Vec<Value>> {
        let shared = || {
            [
                cpu_of_command("kube-apiserver"),
                cpu_of_command("etcd"),
                usage_of(std::process::id()).2,
            ]
        };
        let before = shared();
        let mut figures = self.measured("ceiling", || self.converge(key_ids)).await?;
        let after = shared();
        let bound = self.kube_write_bound().await?;
        let kms_bound = (self.grants as f64 * self.args.latency_ms as f64
            / 1000.0
            / f64::from(self.args.concurrency.max(1)))
        .max(f(&figures, "floor") / self.args.rate_limit);
        let extra = json!({
            "cpu_seconds_by_process": {
                "operator": f(&figures, "operator_cpu_seconds"),
                "kube-apiserver": after[0] - before[0],
                "etcd": after[1] - before[1],
                "bench (harness, watcher, emulator)": after[2] - before[2],
            },
            "write_bound_seconds": bound["seconds"],
            "write_bound_writes": bound["writes"],
            "kms_bound_seconds": kms_bound,
            "cpus": std::thread::available_parallelism().map_or(1, |n| n.get()),
        });
        let object = figures.as_object_mut().expect("figures are an object");
        object.extend(extra.as_object().expect("an object").clone());
        Ok(vec![
            figures,
            json!({
                "scenario": "API-server write bound",
                "seconds": bound["seconds"],
                "kms_calls": {}, "kms_calls_total": 0, "kms_throttled": 0, "kms_throttled_share": 0.0,
                "kube_requests": {}, "kube_writes": bound["writes"],
                "writes_per_second": bound["writes_per_second"], "in_flight": bound["in_flight"],
                "objects": bound["objects"],
            }),
        ])
    }

    /// The API server's own bound for the writes a converge makes, measured by this harness
    /// with no operator involved: for each converged object, the four writes its converge made
    /// (the object's apply, a merge patch of its metadata in place of the finalizer patch, a
    /// server-side apply of its status copied from the converged object, an event), taken as
    /// fast as the API server answers with as many in flight as during the converge (the
    /// harness's 16 applies and the operator's concurrency). In a namespace the operator does not
    /// watch, deleted before the figures are returned.
    async fn kube_write_bound(&self) -> anyhow::Result<Value> {
        let namespace = format!("{}-writes", self.namespace);
        let namespaces = Api::<Namespace>::all(self.client.clone());
        let ns = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}});
        namespaces
            .patch(&namespace, &self.apply, &Patch::Apply(&ns))
            .await?;
        let converged = self.api.list(&ListParams::default()).await?.items;
        let api: Api<KmsGrant> = Api::namespaced(self.client.clone(), &namespace);
        let events: Api<k8s_openapi::api::events::v1::Event> =
            Api::namespaced(self.client.clone(), &namespace);
        let status_manager = PatchParams::apply("kmsgrant-bench-status").force();
        let in_flight = 16 + usize::from(self.args.concurrency);
        let started = Instant::now();
        futures::stream::iter(converged.iter())
            .map(|object| {
                let (api, events, apply, status_manager, namespace) = (
                    api.clone(),
                    events.clone(),
                    self.apply.clone(),
                    status_manager.clone(),
                    namespace.clone(),
                );
                async move {
                    let name = object.metadata.name.clone().unwrap_or_default();
                    let manifest = json!({"apiVersion": "kmsgrant.io/v1beta1", "kind": "KmsGrant",
                        "metadata": {"name": name, "namespace": namespace}, "spec": object.spec});
                    let created = api.patch(&name, &apply, &Patch::Apply(&manifest)).await?;
                    let stand_in = json!({"metadata": {
                        "resourceVersion": created.metadata.resource_version,
                        "labels": {"bench.kmsgrant.io/finalizer-stand-in": "true"}}});
                    api.patch(&name, &PatchParams::default(), &Patch::Merge(&stand_in))
                        .await?;
                    let status = json!({"apiVersion": "kmsgrant.io/v1beta1", "kind": "KmsGrant",
                        "status": object.status});
                    api.patch_status(&name, &status_manager, &Patch::Apply(&status))
                        .await?;
                    let now = jiff::Timestamp::now();
                    let event: k8s_openapi::api::events::v1::Event = serde_json::from_value(json!({
                        // Named as the operator names its events: the object's name and the time.
                        "metadata": {"name": format!("{name}.{:x}", now.as_nanosecond()), "namespace": namespace},
                        "eventTime": now.to_string(),
                        "action": "CreateGrant", "reason": "GrantCreated", "type": "Normal",
                        "note": "Created grant 0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef on key 0d0466b0-e727-4d9c-b35d-f84bb474a37f",
                        "reportingController": "kmsgrant.io/operator", "reportingInstance": "kmsgrant-bench",
                        "regarding": {"apiVersion": "kmsgrant.io/v1beta1", "kind": "KmsGrant",
                            "name": name, "namespace": namespace, "uid": created.metadata.uid}}))?;
                    events.create(&PostParams::default(), &event).await?;
                    Ok::<_, anyhow::Error>(())
                }
            })
            .buffer_unordered(in_flight)
            .try_collect::<Vec<()>>()
            .await?;
        let seconds = started.elapsed().as_secs_f64();
        // Emptied here (this control plane runs no namespace controller to do it), and gone
        // before the next figure is taken: deleting loads the API server too.
        api.delete_collection(&DeleteParams::default(), &ListParams::default())
            .await?;
        events
            .delete_collection(&DeleteParams::default(), &ListParams::default())
            .await?;
        while !api
            .list_metadata(&ListParams::default().limit(1))
            .await?
            .items
            .is_empty()
        {
            self.deadline(started, "the write-bound objects' deletion")?;
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let _ = namespaces
            .delete(&namespace, &DeleteParams::default())
            .await;
        let writes = 4 * converged.len();
        Ok(
            json!({"seconds": seconds, "objects": converged.len(), "writes": writes,
            "writes_per_second": writes as f64 / seconds, "in_flight": in_flight}),
        )
    }

    /// Stops the operator (`stop`) and starts a new one on objects that are all in sync, and
    /// measures the new one from its start until steady: every object reconciled once (its
    /// `kmsgrant_reconciles_total` for KmsGrants reaches N), then the KMS call log quiet for two
    /// seconds; the time is until the last call or the last first reconcile, whichever is later.
    /// The floor is what it takes to know the cloud again: one list walk (one page, ≤ 100
    /// grants) and one describe per key; nothing is written anywhere.
    async fn failover(&self, stop: Stop, log: &std::path::Path) -> anyhow::Result<Value> {
        let name = stop.scenario();
        eprintln!("bench: {name}");
        {
            let mut old = self.operator.lock().unwrap();
            let pid = old.pid().to_string();
            match stop {
                Stop::Kill => old.child.kill()?,
                Stop::Term => {
                    let sent = Command::new("kill").args(["-TERM", &pid]).status()?;
                    anyhow::ensure!(sent.success(), "cannot signal the operator ({pid})");
                }
            }
            let status = old.child.wait()?;
            if matches!(stop, Stop::Term) {
                anyhow::ensure!(
                    status.success(),
                    "the operator's clean stop exited {status}"
                );
            }
        }
        let kms_before = self.emulator.admin().stats();
        let kube_before = apiserver_requests(&self.client).await;
        let started = Instant::now();
        let log = log.with_extension(match stop {
            Stop::Kill => "after-sigkill.log",
            Stop::Term => "after-sigterm.log",
        });
        let new = start_operator(self.args, &self.namespace, &log)?;
        let admin = new.admin.clone();
        self.operator_pid.store(new.pid(), Ordering::Relaxed);
        *self.operator.lock().unwrap() = new;
        let reconciles = async || -> f64 {
            series_by_labels(
                &metrics_text(&admin).await,
                "kmsgrant_reconciles_total{kind=\"KmsGrant\"",
            )
            .values()
            .sum()
        };
        while reconciles().await < self.grants as f64 {
            self.deadline(started, &format!("{name}: every object reconciled once"))?;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let reconciled = started.elapsed().as_secs_f64();
        let calls = || all_calls(&kms_delta(&self.emulator.admin().stats(), &kms_before));
        let (mut seen, mut last_change) = (calls(), Instant::now());
        while last_change.elapsed() < Duration::from_secs(2) {
            self.deadline(started, &format!("{name}: KMS calls quiet"))?;
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = calls();
            if now != seen {
                (seen, last_change) = (now, Instant::now());
            }
        }
        let seconds = last_change.saturating_duration_since(started).as_secs_f64();
        let (peak, rss, cpu) = self.operator.lock().unwrap().usage();
        let kms = kms_delta(&self.emulator.admin().stats(), &kms_before);
        let kube = delta(&apiserver_requests(&self.client).await, &kube_before);
        let kube_writes: u64 = kube
            .iter()
            .filter(|(k, _)| is_write(k))
            .map(|(_, v)| v)
            .sum();
        let own_writes = series_by_labels(
            &metrics_text(&admin).await,
            "kmsgrant_grant_kube_writes_total",
        );
        let total = all_calls(&kms);
        eprintln!("bench: {name} steady in {seconds:.1} s");
        Ok(json!({
            "scenario": name,
            "seconds": seconds,
            "reconciled_seconds": reconciled,
            "floor": 2 * self.keys,
            "kms_calls": kms,
            "kms_calls_total": total,
            "kms_throttled": throttled(&kms),
            "kms_throttled_share": if total == 0 { 0.0 } else { throttled(&kms) as f64 / total as f64 },
            "kube_requests": kube,
            "kube_writes": kube_writes,
            "operator_kube_writes": own_writes,
            // The new process's own, from its start.
            "operator_cpu_seconds": cpu,
            "operator_peak_rss_mib": peak as f64 / 1024.0,
            "operator_rss_mib": rss as f64 / 1024.0,
            "learned_rate": metric(&admin, "kmsgrant_kms_rate_limit_requests_per_second").await,
            "operator_log": log,
        }))
    }

    async fn delete(&self) -> anyhow::Result<Value> {
        let started = Instant::now();
        self.api
            .delete_collection(&DeleteParams::default(), &ListParams::default())
            .await?;
        loop {
            let held: usize = self.emulator.admin().grant_counts().values().sum();
            let objects = self
                .api
                .list_metadata(&ListParams::default().limit(1))
                .await?
                .items
                .len();
            if held == 0 && objects == 0 {
                break;
            }
            self.deadline(started, &format!("delete ({held} grants, objects left)"))?;
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        // One revoke per object, and the one fresh list per key that finds a grant whose create
        // answer was lost (the objects being deleted on a key share it).
        Ok(json!({"seconds": started.elapsed().as_secs_f64(), "floor": self.grants + self.keys}))
    }
}

/// Starts the operator on `namespace`, logging to `log`, with its admin server on a free port.
fn start_operator(args: &Args, namespace: &str, log: &std::path::Path) -> anyhow::Result<Operator> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let admin = format!("127.0.0.1:{port}");
    let file = std::fs::File::create(log)?;
    let child = Command::new(&args.operator)
        .args(["run", "--allow-http-endpoints", "--kubeconfig"])
        .arg(&args.kubeconfig)
        .args(["--namespace", namespace, "--secret-namespace", namespace])
        .args(["--resync-interval", &format!("{}s", args.resync)])
        .args(["--concurrency", &args.concurrency.to_string()])
        .args(["--admin-address", &admin, "--log-level", &args.log_level])
        .stdout(file.try_clone()?)
        .stderr(file)
        .stdin(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot start {}", args.operator.display()))?;
    Ok(Operator { child, admin })
}

/// How the failover scenario stops the running operator.
#[derive(Clone, Copy)]
enum Stop {
    /// SIGKILL, as a crash or an OOM kill.
    Kill,
    /// SIGTERM, as Kubernetes stops a pod; waits for the exit.
    Term,
}

impl Stop {
    fn scenario(self) -> &'static str {
        match self {
            Self::Kill => "failover (SIGKILL)",
            Self::Term => "failover (SIGTERM)",
        }
    }
}

async fn run_one(
    args: &Args,
    client: &kube::Client,
    grants: usize,
    keys: usize,
    index: usize,
    scenario_names: &[String],
) -> anyhow::Result<Value> {
    anyhow::ensure!(
        keys > 0 && grants.div_ceil(keys) <= 100,
        "at most 100 grants per key"
    );
    let apply = PatchParams::apply("kmsgrant-bench").force();
    // The cloud's quota is 100 grants per key; a full key has no room for the change scenario's
    // create-before-revoke, so the quota is raised by a tenth (said in the report).
    let per_key = grants.div_ceil(keys);
    let emulator = Emulator::start(EmulatorConfig {
        grants_per_key: (per_key + per_key / 10 + 1).max(100),
        keys_per_project: keys + 10,
        ..EmulatorConfig::for_tests()
    })
    .await?;
    let key_ids = create_keys(&emulator, "bench", keys)?;
    set_bench_faults(&emulator, args)?;
    let namespace = format!("bench-{}-{index}", std::process::id());
    let ns = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}});
    Api::<Namespace>::all(client.clone())
        .patch(&namespace, &apply, &Patch::Apply(&ns))
        .await?;
    let config = emulator.config();
    let secret = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "kms", "namespace": namespace},
        "stringData": {"accessKey": config.access_key, "secretKey": config.secret_key.as_str()}});
    Api::<Secret>::namespaced(client.clone(), &namespace)
        .patch("kms", &apply, &Patch::Apply(&secret))
        .await?;
    let burst = args.rate_limit.ceil() as u64;
    let provider = json!({"apiVersion": "kmsgrant.io/v1beta1", "kind": "KmsProviderConfig",
        "metadata": {"name": namespace},
        "spec": {"endpoint": emulator.base_url(), "projectId": config.project_id, "region": config.region,
            "auth": {"type": "AccessKey", "secretRef": {"namespace": namespace, "name": "kms"}},
            "rateLimit": {"requestsPerSecond": args.rate_limit, "burst": burst}}});
    Api::<kmsgrant::api::KmsProviderConfig>::all(client.clone())
        .patch(&namespace, &apply, &Patch::Apply(&provider))
        .await?;

    let log = std::env::temp_dir().join(format!("{namespace}-operator.log"));
    let operator = start_operator(args, &namespace, &log)?;

    let api: Api<KmsGrant> = Api::namespaced(client.clone(), &namespace);
    let seen = Arc::new(Mutex::new(Seen::default()));
    let watch = {
        let (api, seen) = (api.clone(), Arc::clone(&seen));
        tokio::spawn(async move {
            let mut stream = watcher(api, watcher::Config::default()).boxed();
            while let Ok(Some(event)) = stream.try_next().await {
                let objects = match event {
                    watcher::Event::Apply(o) | watcher::Event::InitApply(o) => vec![o],
                    _ => continue,
                };
                let mut seen = seen.lock().unwrap();
                for object in objects {
                    let name = object.metadata.name.clone().unwrap_or_default();
                    let generation = object.metadata.generation.unwrap_or(0);
                    let observed = object
                        .status
                        .as_ref()
                        .and_then(|s| s.observed_generation)
                        .unwrap_or(0);
                    let ready = is_ready(&object);
                    if ready && observed == generation {
                        seen.ready_at
                            .entry(name.clone())
                            .or_insert_with(Instant::now);
                    }
                    seen.state.insert(name, (generation, observed, ready));
                }
            }
        })
    };
    // The objects arrive once the operator has verified its provider config, as they would in a
    // cluster where the operator runs already (earlier ones would first say ProviderConfigNotReady).
    let configs = Api::<kmsgrant::api::KmsProviderConfig>::all(client.clone());
    let waiting = Instant::now();
    loop {
        let ready = configs.get_opt(&namespace).await?.is_some_and(|c| {
            c.status.is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == kmsgrant::api::ConditionStatus::True)
            })
        });
        if ready {
            break;
        }
        anyhow::ensure!(
            waiting.elapsed() < Duration::from_secs(120),
            "the operator did not verify provider config {namespace} within 120 s (log: {})",
            log.display()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let operator_pid = Arc::new(AtomicU32::new(operator.pid()));
    let samples = Arc::new(Mutex::new(Vec::new()));
    let sampler = start_sampling(
        Arc::clone(&seen),
        emulator.admin(),
        Arc::clone(&operator_pid),
        Arc::clone(&samples),
    );
    let sampling_since = Instant::now();
    let mut marks = Vec::new();
    let run = Run {
        args,
        client: client.clone(),
        grants,
        keys,
        namespace: namespace.clone(),
        emulator,
        operator: Mutex::new(operator),
        operator_pid,
        seen,
        api,
        apply,
    };
    let mut scenarios = Vec::new();
    for scenario in scenario_names {
        eprintln!("bench: {grants} grants on {keys} keys: {scenario}");
        marks.push((
            scenario.clone(),
            (sampling_since.elapsed().as_secs_f64() * 10.0).round() / 10.0,
        ));
        let figures = match scenario.as_str() {
            "converge" => run.measured("converge", || run.converge(&key_ids)).await?,
            "steady" => run.measured("steady", || run.steady()).await?,
            "drift" => run.measured("drift", || run.drift()).await?,
            "change" => run.measured("change", || run.change()).await?,
            "delete" => run.measured("delete", || run.delete()).await?,
            "ceiling" => {
                // Two rows: the converge with no throttle, then the API server's own bound.
                scenarios.extend(run.ceiling(&key_ids).await?);
                continue;
            }
            "failover" => {
                // Two rows: a crash, then a clean stop, each followed by a new operator.
                for stop in [Stop::Kill, Stop::Term] {
                    scenarios.push(run.failover(stop, &log).await?);
                }
                continue;
            }
            other => anyhow::bail!("unknown scenario {other:?}"),
        };
        scenarios.push(figures);
    }
    let (peak, _, cpu) = run.operator.lock().unwrap().usage();
    // The run's peak is the highest of every operator process it ran: a failover replaces the
    // process, and the one measured last (the newest) is not the one that held the most.
    let peak_mib = scenarios
        .iter()
        .filter_map(|s| s["operator_peak_rss_mib"].as_f64())
        .fold(peak as f64 / 1024.0, f64::max);
    sampler.abort();
    let series = series_json(&samples.lock().unwrap(), &marks);
    watch.abort();
    drop(run.operator);
    let _ = Api::<Namespace>::all(client.clone())
        .delete(&namespace, &DeleteParams::default())
        .await;
    Ok(
        json!({"grants": grants, "keys": keys, "scenarios": scenarios,
        "operator_peak_rss_mib": peak_mib, "operator_cpu_seconds": cpu,
        "operator_log": log, "series": series}),
    )
}

/// The charts of one run from its series: Ready objects while converging against the throttle
/// bound, KMS calls per second by operation, and the operator's RSS, over the whole run. Each
/// with the file name it is written under (`stem`).
fn charts(run: &Value, args: &Args) -> Vec<(&'static str, svg::Chart)> {
    let series = &run["series"];
    let column = |name: &str| -> Vec<f64> {
        series[name]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_f64)
            .collect()
    };
    let t = column("t");
    if t.len() < 2 {
        return Vec::new();
    }
    let (grants, keys) = (
        run["grants"].as_u64().unwrap_or(0),
        run["keys"].as_u64().unwrap_or(0),
    );
    let marks: Vec<(String, f64)> = series["scenarios"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| Some((m["scenario"].as_str()?.to_owned(), m["t"].as_f64()?)))
        .collect();
    let markers = || -> Vec<svg::Marker> {
        marks
            .iter()
            .map(|(label, x)| svg::Marker {
                x: *x,
                label: label.clone(),
            })
            .collect()
    };
    let mut out = Vec::new();

    // Ready while converging, from the converge scenario's start to the next one's.
    if let Some(index) = marks.iter().position(|(name, _)| name == "converge") {
        let from = marks[index].1;
        let to = marks.get(index + 1).map_or(f64::INFINITY, |m| m.1);
        let ready = column("ready");
        let points: Vec<(f64, f64)> = t
            .iter()
            .zip(&ready)
            .filter(|(at, _)| **at >= from && **at <= to)
            .map(|(at, n)| (at - from, *n))
            .collect();
        let end = points.last().map_or(0.0, |p| p.0);
        let mut lines = vec![svg::Series {
            label: "Ready objects".into(),
            points,
            dashed: false,
        }];
        if args.throttle > 0.0 {
            // The floor of calls (N creates + K lists + K describes) through the emulator's
            // throttle, a token bucket that starts full (one second's worth): no operator can be
            // Ready above this line.
            let floor = (grants + 2 * keys) as f64;
            let burst = args.throttle.max(1.0).min(floor);
            let full = (floor - burst) / args.throttle;
            let share = grants as f64 / floor;
            lines.push(svg::Series {
                label: format!(
                    "throttle bound: {floor:.0} calls at {} req/s after a {burst:.0}-call burst",
                    args.throttle
                ),
                points: vec![
                    (0.0, burst * share),
                    (full, grants as f64),
                    (end.max(full), grants as f64),
                ],
                dashed: true,
            });
        }
        out.push((
            "ready",
            svg::Chart {
                title: format!("Ready objects while converging {grants} grants on {keys} keys"),
                x_label: "seconds since the objects were applied".into(),
                y_label: "objects Ready".into(),
                series: lines,
                markers: Vec::new(),
            },
        ));
    }

    // Calls per second by operation, over 1-second windows (two samples).
    let window = 2;
    let calls: Vec<svg::Series> = series["calls"]
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(operation, counts)| {
            let counts: Vec<f64> = counts
                .as_array()?
                .iter()
                .filter_map(Value::as_f64)
                .collect();
            let points: Vec<(f64, f64)> = (window..counts.len().min(t.len()))
                .step_by(window)
                .map(|i| {
                    let dt = (t[i] - t[i - window]).max(0.001);
                    (t[i], (counts[i] - counts[i - window]) / dt)
                })
                .collect();
            let any =
                counts.last().copied().unwrap_or(0.0) > counts.first().copied().unwrap_or(0.0);
            any.then(|| svg::Series {
                label: operation.clone(),
                points,
                dashed: false,
            })
        })
        .collect();
    if !calls.is_empty() {
        out.push((
            "calls",
            svg::Chart {
                title: format!("KMS calls per second by operation, {grants} grants on {keys} keys"),
                x_label: "seconds since the run started".into(),
                y_label: "calls per second (1 s windows)".into(),
                series: calls,
                markers: markers(),
            },
        ));
    }

    let rss = column("rss_mib");
    out.push((
        "rss",
        svg::Chart {
            title: format!("Operator resident memory, {grants} grants on {keys} keys"),
            x_label: "seconds since the run started".into(),
            y_label: "RSS (MiB)".into(),
            series: vec![svg::Series {
                label: "operator RSS".into(),
                // A sample between a stopped operator and its successor reads no process.
                points: t
                    .iter()
                    .copied()
                    .zip(rss)
                    .filter(|(_, mib)| *mib > 0.0)
                    .collect(),
                dashed: false,
            }],
            markers: markers(),
        },
    ));
    out
}

/// Writes each run's charts beside the doc (`<doc dir>/benchmarks/<commit>-<N>x<K>-<scenarios>-<chart>.svg`)
/// and returns the Markdown that shows them.
fn write_charts(report: &Value, args: &Args) -> anyhow::Result<String> {
    let doc = std::path::Path::new(&args.doc);
    let dir_name = "benchmarks";
    let dir = doc
        .parent()
        .unwrap_or(std::path::Path::new("."))
        .join(dir_name);
    let commit = report["commit"].as_str().unwrap_or("unknown");
    let mut markdown = String::new();
    for run in report["runs"].as_array().into_iter().flatten() {
        let drawn = charts(run, args);
        if drawn.is_empty() {
            continue;
        }
        std::fs::create_dir_all(&dir)?;
        // Named by commit, size and the run's scenarios: two runs of one size in one commit's
        // report (the default scenarios, the ceiling) must not draw over each other's files.
        let scenarios: Vec<&str> = run["series"]["scenarios"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|mark| mark["scenario"].as_str())
            .collect();
        let size = format!(
            "{}x{}-{}",
            run["grants"].as_u64().unwrap_or(0),
            run["keys"].as_u64().unwrap_or(0),
            scenarios.join("-")
        );
        let _ = writeln!(
            markdown,
            "\n### Charts: {} grants on {} keys\n",
            run["grants"], run["keys"]
        );
        for (stem, chart) in drawn {
            let file = format!("{commit}-{size}-{stem}.svg");
            std::fs::write(dir.join(&file), chart.svg())?;
            let _ = writeln!(markdown, "![{}]({dir_name}/{file})\n", chart.title);
        }
    }
    Ok(markdown)
}

/// `count` new keys on the emulator, aliased `<prefix>-<i>`.
fn create_keys(
    emulator: &kms_emulator::RunningEmulator,
    prefix: &str,
    count: usize,
) -> anyhow::Result<Vec<String>> {
    (0..count)
        .map(|i| {
            emulator
                .admin()
                .create_key(NewKey {
                    key_alias: format!("{prefix}-{i}"),
                    ..NewKey::default()
                })
                .map(|key| key.key_id)
                .map_err(anyhow::Error::msg)
        })
        .collect()
}

/// The emulator's latency and throttle from the flags.
fn set_bench_faults(emulator: &kms_emulator::RunningEmulator, args: &Args) -> anyhow::Result<()> {
    emulator
        .admin()
        .set_faults(FaultSettings {
            latency_ms: args.latency_ms,
            throttle_per_second: (args.throttle > 0.0).then_some(args.throttle),
            ..FaultSettings::default()
        })
        .map_err(anyhow::Error::msg)
}

fn is_ready(grant: &KmsGrant) -> bool {
    grant.status.as_ref().is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == kmsgrant::api::ConditionStatus::True)
    })
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .next()
                .map(|l| l.split_whitespace().nth(1).unwrap_or("0").to_owned())
        })
        .and_then(|kib| kib.parse::<u64>().ok())
        .map_or_else(String::new, |kib| format!(", {} GiB", kib / 1024 / 1024));
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    format!("{cpus} CPUs ({model}){memory}; load average at the end {load}")
}

fn command_output(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

fn f(v: &Value, field: &str) -> f64 {
    v[field].as_f64().unwrap_or(0.0)
}

/// The table, as Markdown (printed and written to the doc).
fn table(report: &Value, args: &Args) -> String {
    let mut out = String::new();
    let throttle_rate = if args.throttle > 0.0 {
        args.throttle.min(args.rate_limit)
    } else {
        args.rate_limit
    };
    for run in report["runs"].as_array().into_iter().flatten() {
        let (n, k) = (
            run["grants"].as_u64().unwrap_or(0),
            run["keys"].as_u64().unwrap_or(0),
        );
        let _ = writeln!(out, "\n### {n} grants on {k} keys\n");
        let _ = writeln!(
            out,
            "| scenario | time | KMS calls (floor) | throttled | kube writes | operator CPU | peak RSS | learned rate | notes |"
        );
        let _ = writeln!(
            out,
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
        );
        for s in run["scenarios"].as_array().into_iter().flatten() {
            let name = s["scenario"].as_str().unwrap_or_default();
            let kms = s["kms_calls"]
                .as_object()
                .map(|o| {
                    o.iter()
                        .map(|(op, outcomes)| {
                            let total: u64 = outcomes
                                .as_object()
                                .map_or(0, |m| m.values().filter_map(Value::as_u64).sum());
                            format!("{total} {op}")
                        })
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .unwrap_or_default();
            let floor = s["floor"]
                .as_u64()
                .map(|fl| format!(" (floor {fl})"))
                .unwrap_or_default();
            let notes = match name {
                "converge" => {
                    let bound = f(s, "floor") / throttle_rate;
                    format!(
                        "{:.0} grants/s; per object p50 {:.1} s, p99 {:.1} s; throttle bound {:.1} s ({:.2} ×)",
                        f(s, "grants_per_second"),
                        f(s, "p50_seconds"),
                        f(s, "p99_seconds"),
                        bound,
                        f(s, "seconds") / bound
                    )
                }
                "steady" => format!(
                    "per period of {} s: {:.1} lists, {:.1} kube writes, {:.2} CPU s; {} KMS writes in {} periods",
                    args.resync,
                    f(s, "lists_per_period"),
                    f(s, "kube_writes_per_period"),
                    f(s, "cpu_seconds_per_period"),
                    s["kms_writes"],
                    s["periods"]
                ),
                "drift" => format!(
                    "{} revoked out of band; resync {} s",
                    s["revoked"], args.resync
                ),
                "change" => format!("{} objects changed", s["changed"]),
                "ceiling" => {
                    let cpu = &s["cpu_seconds_by_process"];
                    format!(
                        "no throttle: {:.0} grants/s; the API server's write bound for the same writes {:.1} s ({:.2} ×); KMS bound {:.1} s; operator CPU {:.2} ms per object; CPU s during the converge: operator {:.1}, kube-apiserver {:.1}, etcd {:.1}, harness and emulator {:.1} ({} CPUs: {:.1} CPU s in {:.1} s)",
                        f(s, "grants_per_second"),
                        f(s, "write_bound_seconds"),
                        f(s, "seconds") / f(s, "write_bound_seconds"),
                        f(s, "kms_bound_seconds"),
                        1000.0 * f(s, "operator_cpu_seconds") / n.max(1) as f64,
                        f(cpu, "operator"),
                        f(cpu, "kube-apiserver"),
                        f(cpu, "etcd"),
                        f(cpu, "bench (harness, watcher, emulator)"),
                        s["cpus"],
                        s["cpus"].as_f64().unwrap_or(1.0) * f(s, "seconds"),
                        f(s, "seconds"),
                    )
                }
                "API-server write bound" => format!(
                    "this harness alone, no operator: per object its apply, a metadata patch, a status apply and an event, {} in flight: {:.0} writes/s",
                    s["in_flight"],
                    f(s, "writes_per_second")
                ),
                failover if failover.starts_with("failover") => format!(
                    "new operator: every object reconciled by {:.1} s, steady (KMS quiet) at {:.1} s; its CPU and peak RSS from its start; its own KmsGrant writes: {}",
                    f(s, "reconciled_seconds"),
                    f(s, "seconds"),
                    s["operator_kube_writes"]
                ),
                _ => String::new(),
            };
            let _ = writeln!(
                out,
                "| {name} | {:.1} s | {} = {kms}{floor} | {} ({:.1} %) | {} | {:.1} s | {:.0} MiB | {} | {notes} |",
                f(s, "seconds"),
                s["kms_calls_total"],
                s["kms_throttled"],
                100.0 * f(s, "kms_throttled_share"),
                s["kube_writes"],
                f(s, "operator_cpu_seconds"),
                f(s, "operator_peak_rss_mib"),
                s["learned_rate"]
                    .as_f64()
                    .map_or("-".into(), |r| format!("{r:.1}/s")),
            );
        }
        let _ = writeln!(
            out,
            "\nKube API requests by verb (API server's `apiserver_request_total`, KmsGrants, provider configs, events, namespaces; includes this harness's own applies, watch and polls):\n"
        );
        for s in run["scenarios"].as_array().into_iter().flatten() {
            let _ = writeln!(
                out,
                "- {}: {}",
                s["scenario"].as_str().unwrap_or_default(),
                s["kube_requests"]
            );
        }
    }
    out
}

fn scenario<'a>(run: &'a Value, name: &str) -> Option<&'a Value> {
    run["scenarios"]
        .as_array()?
        .iter()
        .find(|s| s["scenario"] == name)
}

/// Status writes of a scenario: the API server's count of PATCH and APPLY on kmsgrants/status.
fn status_writes(s: &Value) -> u64 {
    ["PATCH kmsgrants/status", "APPLY kmsgrants/status"]
        .iter()
        .filter_map(|k| s["kube_requests"][k].as_u64())
        .sum()
}

/// The issue's targets, each with the figure it is judged on and whether it is met.
fn targets(report: &Value, args: &Args) -> String {
    let mut out = String::new();
    let mark = |met: bool| if met { "met" } else { "**not met**" };
    let throttle_rate = if args.throttle > 0.0 {
        args.throttle.min(args.rate_limit)
    } else {
        args.rate_limit
    };
    let runs: Vec<&Value> = report["runs"].as_array().into_iter().flatten().collect();
    let first_rate = runs
        .first()
        .and_then(|r| scenario(r, "converge"))
        .map(|c| f(c, "grants_per_second"));
    let _ = writeln!(
        out,
        "
### Targets
"
    );
    for (index, run) in runs.iter().enumerate() {
        let (n, k) = (
            run["grants"].as_u64().unwrap_or(0),
            run["keys"].as_u64().unwrap_or(0),
        );
        // Figures reported without a target, written after the run's target lines.
        let mut reported: Vec<String> = Vec::new();
        let mut line = |what: String, met: bool| {
            let _ = writeln!(out, "- {n}/{k}: {what}: {}", mark(met));
        };
        if let Some(c) = scenario(run, "converge") {
            let bound = f(c, "floor") / throttle_rate;
            let ratio = f(c, "seconds") / bound;
            line(
                format!(
                    "converge {:.1} s ≤ 1.1 × the throttle bound {bound:.1} s ({ratio:.2} ×)",
                    f(c, "seconds")
                ),
                ratio <= 1.1,
            );
            let (calls, floor) = (f(c, "kms_calls_total"), f(c, "floor"));
            line(
                format!(
                    "converge KMS calls {calls:.0} ≤ 1.02 × the floor {floor:.0} ({:.3} ×)",
                    calls / floor
                ),
                calls <= 1.02 * floor,
            );
            let writes = status_writes(c);
            line(
                format!("converge status writes {writes} for {n} objects (one per object)"),
                writes <= n,
            );
            if index > 0
                && let Some(first) = first_rate
            {
                let rate = f(c, "grants_per_second");
                line(
                    format!(
                        "converge rate {rate:.1} grants/s ≥ 0.8 × the first run's {first:.1} ({:.2} ×)",
                        rate / first
                    ),
                    rate >= 0.8 * first,
                );
            }
        }
        if let Some(s) = scenario(run, "steady") {
            let kms_writes = s["kms_writes"].as_u64().unwrap_or(0);
            let kube = f(s, "kube_writes_per_period");
            let lists = f(s, "lists_per_period");
            let cpu = f(s, "cpu_seconds_per_period");
            line(
                format!(
                    "steady: {kms_writes} KMS writes, {kube:.1} kube writes and {lists:.1} lists (≤ {k}) per period"
                ),
                kms_writes == 0 && kube == 0.0 && lists <= k as f64,
            );
            line(
                format!("steady: operator CPU per idle resync {cpu:.2} s ≤ 1 s"),
                cpu <= 1.0,
            );
        }
        if let Some(d) = scenario(run, "drift") {
            let seconds = f(d, "seconds");
            line(
                format!(
                    "drift repaired in {seconds:.1} s, within one resync ({} s)",
                    args.resync
                ),
                seconds <= args.resync as f64,
            );
        }
        for s in run["scenarios"].as_array().into_iter().flatten() {
            let name = s["scenario"].as_str().unwrap_or_default();
            if !name.starts_with("failover") {
                continue;
            }
            let (calls, floor) = (f(s, "kms_calls_total"), f(s, "floor"));
            line(
                format!(
                    "{name}: KMS calls {calls:.0} ≤ 1.02 × {k} lists + {k} describes ({:.3} ×)",
                    calls / floor
                ),
                calls <= 1.02 * floor,
            );
            let kms_writes: u64 = ["create-grant", "revoke-grant", "retire-grant"]
                .iter()
                .filter_map(|op| s["kms_calls"][op].as_object())
                .flat_map(|o| o.values().filter_map(Value::as_u64))
                .sum();
            line(
                format!("{name}: {kms_writes} KMS writes (none)"),
                kms_writes == 0,
            );
            let kube = |keys: &[&str]| -> u64 {
                keys.iter()
                    .filter_map(|k| s["kube_requests"][k].as_u64())
                    .sum()
            };
            let (status, events, patches) = (
                status_writes(s),
                kube(&["POST events", "PATCH events", "PUT events"]),
                kube(&["PATCH kmsgrants", "APPLY kmsgrants", "PUT kmsgrants"]),
            );
            line(
                format!(
                    "{name}: {status} status writes, {events} event writes, {patches} object patches for {n} objects in sync (none)"
                ),
                status == 0 && events == 0 && patches == 0,
            );
            let bound = calls / throttle_rate;
            let seconds = f(s, "seconds");
            line(
                format!(
                    "{name}: steady in {seconds:.1} s ≤ 1.2 × the {bound:.1} s its KMS calls take at the throttle"
                ),
                seconds <= 1.2 * bound,
            );
        }
        if let Some(c) = scenario(run, "ceiling") {
            let (seconds, bound) = (f(c, "seconds"), f(c, "write_bound_seconds"));
            line(
                format!(
                    "ceiling: converge with no throttle {seconds:.1} s ≤ 1.2 × the API server's write bound {bound:.1} s for the same {} writes ({:.2} ×)",
                    c["write_bound_writes"],
                    seconds / bound
                ),
                seconds <= 1.2 * bound,
            );
            let cpu = &c["cpu_seconds_by_process"];
            let busy: f64 = cpu
                .as_object()
                .into_iter()
                .flatten()
                .filter_map(|(_, v)| v.as_f64())
                .sum();
            let cpus = c["cpus"].as_f64().unwrap_or(1.0);
            let bounds = [
                (
                    "the KMS (latency over concurrency)",
                    f(c, "kms_bound_seconds"),
                ),
                ("the API server's writes", bound),
                ("the operator's own CPU", f(cpu, "operator")),
                ("the machine's CPUs, shared by all processes", busy / cpus),
            ];
            let (what, at) = bounds
                .iter()
                .copied()
                .fold(("nothing", 0.0), |max, b| if b.1 > max.1 { b } else { max });
            reported.push(format!(
                "- {n}/{k}: ceiling: {:.0} grants/s, operator CPU {:.2} ms per converged object; the largest bound is {what} ({at:.1} s; {})",
                f(c, "grants_per_second"),
                1000.0 * f(cpu, "operator") / n.max(1) as f64,
                bounds
                    .iter()
                    .map(|(w, s)| format!("{w} {s:.1} s"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        for name in ["change", "delete"] {
            if let Some(s) = scenario(run, name) {
                let (calls, floor) = (f(s, "kms_calls_total"), f(s, "floor"));
                line(
                    format!(
                        "{name} KMS calls {calls:.0} against the floor {floor:.0} ({:.3} ×)",
                        calls / floor
                    ),
                    calls <= 1.02 * floor,
                );
            }
        }
        let worst = run["scenarios"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| f(s, "kms_throttled_share"))
            .fold(0.0, f64::max);
        line(
            format!(
                "throttled answers ≤ 2 % of calls in every scenario (worst {:.2} %)",
                100.0 * worst
            ),
            worst <= 0.02,
        );
        let rss = f(run, "operator_peak_rss_mib");
        // Issue 27's target for the release binary at 10,000 objects (59 MiB when it was set).
        line(
            format!("operator peak RSS {rss:.0} MiB ≤ 48 MiB"),
            rss <= 48.0,
        );
        for text in reported {
            let _ = writeln!(out, "{text}");
        }
    }
    out
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // The commit measured: taken before the runs, as the tree may move on while they last.
    let commit = command_output("git", &["rev-parse", "--short", "HEAD"]);
    // The doc itself does not count: an earlier invocation (--append) may just have written it.
    let dirty = command_output("git", &["status", "--porcelain", "--untracked-files=no"])
        .lines()
        // `XY path` with X or Y blank (the whole output comes trimmed): the path after the status.
        .filter_map(|line| line.trim_start().split_once(' '))
        .any(|(_, path)| path.trim_start() != args.doc.as_str());
    let client = kmsgrant::process::kube_client(Some(args.kubeconfig.clone()), None).await?;
    let crds: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
        Api::all(client.clone());
    let apply = PatchParams::apply("kmsgrant-bench").force();
    for crd in kmsgrant::api::crds() {
        crds.patch(
            crd.metadata.name.as_deref().unwrap(),
            &apply,
            &Patch::Apply(&crd),
        )
        .await?;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut runs = Vec::new();
    for (index, spec) in args.runs.iter().enumerate() {
        let (size, own) = match spec.split_once(':') {
            Some((size, own)) => (size, own.split('+').map(str::to_owned).collect()),
            None => (spec.as_str(), args.scenarios.clone()),
        };
        let (n, k) = size
            .split_once('/')
            .context("a run is GRANTS/KEYS[:SCENARIO+...]")?;
        if own == ["fairness"] {
            runs.push(run_fairness(&args, &client, n.parse()?, k.parse()?).await?);
            continue;
        }
        if own == ["clusters"] {
            runs.push(run_clusters(&args, &client, n.parse()?, k.parse()?).await?);
            continue;
        }
        runs.push(run_one(&args, &client, n.parse()?, k.parse()?, index, &own).await?);
    }
    let report = json!({
        "commit": commit, "dirty": dirty,
        "date": command_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        "machine": machine(),
        "parameters": {"latency_ms": args.latency_ms, "throttle_per_second": args.throttle,
            "rate_limit": args.rate_limit, "resync_seconds": args.resync, "concurrency": args.concurrency,
            "steady_periods": args.steady_periods, "scenarios": args.scenarios, "runs": args.runs},
        "runs": runs,
    });
    if let Some(parent) = args.json.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&args.json, serde_json::to_string_pretty(&report)?)?;
    // Scenarios of their own (fairness, clusters) have tables of their own; the others share one.
    let runs_of = |special: bool| -> Vec<Value> {
        report["runs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|run| {
                (run.get("fairness").is_some() || run.get("clusters").is_some()) == special
            })
            .cloned()
            .collect()
    };
    let mut table = String::new();
    let scenario_runs = runs_of(false);
    if !scenario_runs.is_empty() {
        let mut shared = report.clone();
        shared["runs"] = json!(scenario_runs);
        table = self::table(&shared, &args) + &targets(&shared, &args);
    }
    for run in runs_of(true) {
        if run.get("fairness").is_some() {
            table.push_str(&fairness_table(&run, &args));
        } else {
            table.push_str(&clusters_table(&run, &args));
        }
    }
    println!("{table}");
    if !args.doc.is_empty() {
        let mut doc = String::new();
        if args.append {
            doc = std::fs::read_to_string(&args.doc).unwrap_or_default();
        } else {
            let _ = writeln!(doc, "# Benchmarks\n");
            let _ = writeln!(
                doc,
                "Written by `scripts/bench` (examples/bench.rs); do not edit by hand. Re-run it to refresh."
            );
        }
        let _ = writeln!(
            doc,
            "\n## `scripts/bench {}`\n",
            std::env::args()
                .skip(1)
                .skip_while(|a| a != "--operator")
                .skip(2)
                .collect::<Vec<_>>()
                .join(" ")
        );
        let _ = writeln!(
            doc,
            "- commit: `{commit}`{}",
            if dirty {
                " (with uncommitted changes)"
            } else {
                ""
            }
        );
        let _ = writeln!(
            doc,
            "- date: {}",
            report["date"].as_str().unwrap_or_default()
        );
        let _ = writeln!(
            doc,
            "- machine: {} (the load counts the run itself: the operator, the emulator, the harness and the API server share these CPUs)",
            report["machine"].as_str().unwrap_or_default()
        );
        let _ = writeln!(
            doc,
            "- parameters: emulator latency {} ms, emulator throttle {} req/s, provider config rateLimit {} req/s (burst the same), resync {} s, operator concurrency {}, {} steady periods",
            args.latency_ms,
            args.throttle,
            args.rate_limit,
            args.resync,
            args.concurrency,
            args.steady_periods
        );
        let build = match args.operator_profile.as_str() {
            "release" => "the release-profile binary (as in the image)".to_owned(),
            "dev" | "debug" => {
                "the dev-profile binary (dependencies optimised, our code not)".to_owned()
            }
            other => format!("the {other}-profile binary"),
        };
        let _ = writeln!(
            doc,
            "- the operator is {build}, run as its own process: its CPU seconds and peak RSS come from /proc and are the operator's alone; the emulator and the harness run in the benchmark's process"
        );
        let _ = writeln!(
            doc,
            "- the emulator's grants-per-key quota is raised to the grants per key + 10 % (a full key has no room for the change scenario's create-before-revoke), its keys quota to K + 10; KMS calls are counted on the emulator (every attempt, 429s included); floors: converge N creates + K lists + K describes, change one create and one revoke per change, delete one revoke per object and one list per key (the fresh list that finds a grant whose create answer was lost), failover (a new operator after SIGKILL, then after SIGTERM, on objects in sync) K lists + K describes and no write; its time is from the new process's start until every object was reconciled once and the KMS calls went quiet for 2 s"
        );
        doc.push_str(&table);
        doc.push_str(&write_charts(&report, &args)?);
        if let Ok(extra) = std::env::var("KMSGRANT_BENCH_NOTE") {
            let _ = writeln!(doc, "\n{extra}");
        }
        std::fs::write(&args.doc, doc)?;
        eprintln!("bench: wrote {} and {}", args.json.display(), args.doc);
    }
    Ok(())
}

/// The fairness scenario (docs/tenants.md): tenant A applies `grants` KmsGrants on `keys` keys of
/// one account while tenant B, in another namespace on the same account (the same provider
/// config), applies one grant once all of A's are applied. Measured with fair scheduling on and off: B's time to Ready alone
/// and during A's burst, and A's converge time against the throttle's bound for its floor of
/// calls.
async fn run_fairness(
    args: &Args,
    client: &kube::Client,
    grants: usize,
    keys: usize,
) -> anyhow::Result<Value> {
    let mut modes = Vec::new();
    for fair in [true, false] {
        modes.push(fairness_mode(args, client, grants, keys, fair).await?);
    }
    Ok(json!({"grants": grants, "keys": keys, "fairness": modes}))
}

async fn fairness_mode(
    args: &Args,
    client: &kube::Client,
    grants: usize,
    keys: usize,
    fair: bool,
) -> anyhow::Result<Value> {
    anyhow::ensure!(
        keys > 0 && grants.div_ceil(keys) <= 100,
        "at most 100 grants per key"
    );
    let apply = PatchParams::apply("kmsgrant-bench").force();
    let emulator = Emulator::start(EmulatorConfig {
        keys_per_project: keys + 10,
        ..EmulatorConfig::for_tests()
    })
    .await?;
    let a_keys = create_keys(&emulator, "tenant-a", keys)?;
    let b_key = create_keys(&emulator, "tenant-b", 1)?.remove(0);
    set_bench_faults(&emulator, args)?;
    let run_id = format!(
        "fair-{}-{}",
        std::process::id(),
        if fair { "on" } else { "off" }
    );
    let label = json!({"kmsgrant.io/bench": run_id});
    let (ns_a, ns_b) = (format!("{run_id}-a"), format!("{run_id}-b"));
    for ns in [&ns_a, &ns_b] {
        let object = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}});
        Api::<Namespace>::all(client.clone())
            .patch(ns, &apply, &Patch::Apply(&object))
            .await?;
    }
    let config = emulator.config();
    let secret = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "kms", "namespace": ns_a},
        "stringData": {"accessKey": config.access_key, "secretKey": config.secret_key.as_str()}});
    Api::<Secret>::namespaced(client.clone(), &ns_a)
        .patch("kms", &apply, &Patch::Apply(&secret))
        .await?;
    let provider = json!({"apiVersion": "kmsgrant.io/v1beta1", "kind": "KmsProviderConfig",
        "metadata": {"name": run_id, "labels": label},
        "spec": {"endpoint": emulator.base_url(), "projectId": config.project_id, "region": config.region,
            "auth": {"type": "AccessKey", "secretRef": {"namespace": ns_a, "name": "kms"}},
            "rateLimit": {"requestsPerSecond": args.rate_limit, "burst": args.rate_limit.ceil() as u64}}});
    let configs = Api::<kmsgrant::api::KmsProviderConfig>::all(client.clone());
    configs
        .patch(&run_id, &apply, &Patch::Apply(&provider))
        .await?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let admin = format!("127.0.0.1:{port}");
    let log = std::env::temp_dir().join(format!("{run_id}-operator.log"));
    let file = std::fs::File::create(&log)?;
    let child = Command::new(&args.operator)
        .args(["run", "--allow-http-endpoints", "--kubeconfig"])
        .arg(&args.kubeconfig)
        .args(["--label-selector", &format!("kmsgrant.io/bench={run_id}")])
        .args(["--secret-namespace", &ns_a, "--migrate-storage=false"])
        .args(["--resync-interval", &format!("{}s", args.resync)])
        .args(["--concurrency", &args.concurrency.to_string()])
        .arg(format!("--fair-scheduling={fair}"))
        .args(["--admin-address", &admin, "--log-level", &args.log_level])
        .stdout(file.try_clone()?)
        .stderr(file)
        .stdin(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot start {}", args.operator.display()))?;
    let operator = Operator { child, admin };
    let waiting = Instant::now();
    while !configs.get_opt(&run_id).await?.is_some_and(|c| {
        c.status.is_some_and(|s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == kmsgrant::api::ConditionStatus::True)
        })
    }) {
        anyhow::ensure!(
            waiting.elapsed() < Duration::from_secs(120),
            "provider config {run_id} not verified within 120 s (log: {})",
            log.display()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Ready times of every object of the run, by namespace/name.
    let ready_at: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let watch = {
        let ready_at = Arc::clone(&ready_at);
        let api: Api<KmsGrant> = Api::all(client.clone());
        let selector = format!("kmsgrant.io/bench={run_id}");
        tokio::spawn(async move {
            let mut stream = watcher(api, watcher::Config::default().labels(&selector)).boxed();
            while let Ok(Some(event)) = stream.try_next().await {
                let (watcher::Event::Apply(o) | watcher::Event::InitApply(o)) = event else {
                    continue;
                };
                if is_ready(&o) {
                    let key = format!(
                        "{}/{}",
                        o.metadata.namespace.clone().unwrap_or_default(),
                        o.metadata.name.clone().unwrap_or_default()
                    );
                    ready_at
                        .lock()
                        .unwrap()
                        .entry(key)
                        .or_insert_with(Instant::now);
                }
            }
        })
    };
    let grant = |ns: &str, name: &str, key: &str| {
        json!({"apiVersion": "kmsgrant.io/v1beta1", "kind": "KmsGrant",
            "metadata": {"name": name, "namespace": ns, "labels": label},
            "spec": {"providerConfigRef": {"name": run_id}, "keyId": key,
                "granteePrincipal": "13gg44z4g2sglzk0egw0u726zoyzvrs8",
                "operations": ["describe-key", "encrypt-datakey"]}})
    };
    let ready_latency = |ns: &str, name: &str, applied: Instant| {
        let ready_at = Arc::clone(&ready_at);
        let key = format!("{ns}/{name}");
        let timeout = Duration::from_secs(args.timeout);
        async move {
            loop {
                if let Some(at) = ready_at.lock().unwrap().get(&key) {
                    return Ok::<f64, anyhow::Error>(
                        at.saturating_duration_since(applied).as_secs_f64(),
                    );
                }
                anyhow::ensure!(applied.elapsed() < timeout, "{key} not Ready");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    let b_api: Api<KmsGrant> = Api::namespaced(client.clone(), &ns_b);
    // B alone: no burst.
    let applied = Instant::now();
    b_api
        .patch(
            "alone",
            &apply,
            &Patch::Apply(grant(&ns_b, "alone", &b_key)),
        )
        .await?;
    let b_alone = ready_latency(&ns_b, "alone", applied).await?;

    // A's burst, applied 16 at a time as a GitOps tool syncs a directory; B applies one grant
    // once all of them are applied.
    let before = emulator.admin().stats();
    let a_api: Api<KmsGrant> = Api::namespaced(client.clone(), &ns_a);
    let started = Instant::now();
    let burst = {
        let (a_api, apply) = (a_api.clone(), apply.clone());
        let manifests: Vec<(String, Value)> = (0..grants)
            .map(|i| {
                let name = format!("a{i:05}");
                let object = grant(&ns_a, &name, &a_keys[i % keys]);
                (name, object)
            })
            .collect();
        tokio::spawn(async move {
            futures::stream::iter(manifests)
                .map(|(name, object)| {
                    let (a_api, apply) = (a_api.clone(), apply.clone());
                    async move { a_api.patch(&name, &apply, &Patch::Apply(&object)).await }
                })
                .buffer_unordered(16)
                .try_collect::<Vec<_>>()
                .await
                .map(|_| Instant::now())
        })
    };
    let a_prefix = format!("{ns_a}/");
    while ready_at_count(&ready_at, &a_prefix) == 0
        && started.elapsed() < Duration::from_secs(args.timeout)
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A's objects are all in (its whole queue is waiting on the throttle): then B applies one.
    while !burst.is_finished() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let b_applied = Instant::now();
    let b_at = b_applied.saturating_duration_since(started).as_secs_f64();
    let a_ready_when_b_applied = ready_at_count(&ready_at, &a_prefix);
    b_api
        .patch(
            "during",
            &apply,
            &Patch::Apply(grant(&ns_b, "during", &b_key)),
        )
        .await?;
    let b_during = ready_latency(&ns_b, "during", b_applied).await?;
    let a_applied_at = burst.await??;
    let a_applied_seconds = a_applied_at
        .saturating_duration_since(started)
        .as_secs_f64();
    while ready_at_count(&ready_at, &a_prefix) < grants {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(args.timeout),
            "tenant A did not converge ({} of {grants})",
            ready_at_count(&ready_at, &a_prefix)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let a_converge = started.elapsed().as_secs_f64();
    let kms = kms_delta(&emulator.admin().stats(), &before);
    let total = all_calls(&kms);
    // A's floor: one create per object, one list and one describe per key (B's one create and
    // its key's list are within the noise and counted too).
    let floor = grants + 2 * keys + 2;
    let bound = if args.throttle > 0.0 {
        floor as f64 / args.throttle
    } else {
        0.0
    };
    let deferrals = operator.metric("kmsgrant_fair_deferrals_total").await;
    let (peak, _, cpu) = operator.usage();
    watch.abort();
    drop(operator);
    for ns in [&ns_a, &ns_b] {
        let _ = Api::<Namespace>::all(client.clone())
            .delete(ns, &DeleteParams::default())
            .await;
    }
    eprintln!(
        "bench: fairness {}: B alone {b_alone:.2} s, B during A's burst {b_during:.2} s, A converged in {a_converge:.1} s (bound {bound:.1} s)",
        if fair { "on" } else { "off" }
    );
    Ok(json!({
        "fair_scheduling": fair,
        "b_alone_seconds": b_alone,
        "b_during_burst_seconds": b_during,
        "b_applied_after_seconds": b_at,
        "a_ready_when_b_applied": a_ready_when_b_applied,
        "a_applied_seconds": a_applied_seconds,
        "a_converge_seconds": a_converge,
        "a_bound_seconds": bound,
        "a_converge_over_bound": if bound > 0.0 { a_converge / bound } else { 0.0 },
        "kms_calls_total": total,
        "kms_throttled": throttled(&kms),
        "deferrals": deferrals,
        "operator_peak_rss_mib": peak as f64 / 1024.0,
        "operator_cpu_seconds": cpu,
        "operator_log": log,
    }))
}

/// How many operators (clusters) the `clusters` scenario runs on one account.
const CLUSTERS: usize = 3;

/// Several clusters on one account: `CLUSTERS` operators, each with its own `--cluster-name`,
/// label selector, provider config and `grants` objects on its own `keys` keys, all on one
/// emulated account whose throttle they share (the emulator throttles per credential; they use
/// one). They share this control plane too, which real clusters would not: the API server is not
/// what is measured here, the shared throttle is. All apply at once, 16 at a time each.
async fn run_clusters(
    args: &Args,
    client: &kube::Client,
    grants: usize,
    keys: usize,
) -> anyhow::Result<Value> {
    anyhow::ensure!(
        keys > 0 && grants.div_ceil(keys) <= 100,
        "at most 100 grants per key"
    );
    let apply = PatchParams::apply("kmsgrant-bench").force();
    let emulator = Emulator::start(EmulatorConfig {
        keys_per_project: CLUSTERS * keys + 10,
        ..EmulatorConfig::for_tests()
    })
    .await?;
    let run_id = format!("clusters-{}", std::process::id());
    let config = emulator.config();
    let ready_at: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let mut clusters = Vec::new();
    for index in 0..CLUSTERS {
        let name = format!("{run_id}-c{index}");
        let key_ids = create_keys(&emulator, &name, keys)?;
        let label = json!({"kmsgrant.io/bench": name});
        let ns = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}});
        Api::<Namespace>::all(client.clone())
            .patch(&name, &apply, &Patch::Apply(&ns))
            .await?;
        let secret = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "kms", "namespace": name},
            "stringData": {"accessKey": config.access_key, "secretKey": config.secret_key.as_str()}});
        Api::<Secret>::namespaced(client.clone(), &name)
            .patch("kms", &apply, &Patch::Apply(&secret))
            .await?;
        let provider = json!({"apiVersion": "kmsgrant.io/v1beta1", "kind": "KmsProviderConfig",
            "metadata": {"name": name, "labels": label},
            "spec": {"endpoint": emulator.base_url(), "projectId": config.project_id, "region": config.region,
                "auth": {"type": "AccessKey", "secretRef": {"namespace": name, "name": "kms"}},
                "rateLimit": {"requestsPerSecond": args.rate_limit, "burst": args.rate_limit.ceil() as u64}}});
        Api::<kmsgrant::api::KmsProviderConfig>::all(client.clone())
            .patch(&name, &apply, &Patch::Apply(&provider))
            .await?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let admin = format!("127.0.0.1:{port}");
        let log = std::env::temp_dir().join(format!("{name}-operator.log"));
        let file = std::fs::File::create(&log)?;
        let child = Command::new(&args.operator)
            .args(["run", "--allow-http-endpoints", "--kubeconfig"])
            .arg(&args.kubeconfig)
            .args(["--label-selector", &format!("kmsgrant.io/bench={name}")])
            .args(["--cluster-name", &format!("bench-c{index}")])
            .args(["--secret-namespace", &name, "--migrate-storage=false"])
            .args(["--resync-interval", &format!("{}s", args.resync)])
            .args(["--concurrency", &args.concurrency.to_string()])
            .args(["--admin-address", &admin, "--log-level", &args.log_level])
            .stdout(file.try_clone()?)
            .stderr(file)
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {}", args.operator.display()))?;
        clusters.push((name, key_ids, Operator { child, admin }, log));
    }
    let configs = Api::<kmsgrant::api::KmsProviderConfig>::all(client.clone());
    let waiting = Instant::now();
    for (name, _, _, log) in &clusters {
        while !configs.get_opt(name).await?.is_some_and(|c| {
            c.status.is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == kmsgrant::api::ConditionStatus::True)
            })
        }) {
            anyhow::ensure!(
                waiting.elapsed() < Duration::from_secs(120),
                "provider config {name} not verified within 120 s (log: {})",
                log.display()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let watch = {
        let ready_at = Arc::clone(&ready_at);
        let api: Api<KmsGrant> = Api::all(client.clone());
        let prefix = format!("{run_id}-c");
        tokio::spawn(async move {
            let mut stream = watcher(api, watcher::Config::default()).boxed();
            while let Ok(Some(event)) = stream.try_next().await {
                let (watcher::Event::Apply(o) | watcher::Event::InitApply(o)) = event else {
                    continue;
                };
                let namespace = o.metadata.namespace.clone().unwrap_or_default();
                if namespace.starts_with(&prefix) && is_ready(&o) {
                    let key = format!(
                        "{namespace}/{}",
                        o.metadata.name.clone().unwrap_or_default()
                    );
                    ready_at
                        .lock()
                        .unwrap()
                        .entry(key)
                        .or_insert_with(Instant::now);
                }
            }
        })
    };
    set_bench_faults(&emulator, args)?;
    let before = emulator.admin().stats();
    let started = Instant::now();
    let mut applying = Vec::new();
    for (name, key_ids, _, _) in &clusters {
        let api: Api<KmsGrant> = Api::namespaced(client.clone(), name);
        let apply = apply.clone();
        let manifests: Vec<(String, Value)> = (0..grants)
            .map(|i| {
                let object = format!("g{i:05}");
                let manifest = json!({"apiVersion": "kmsgrant.io/v1beta1", "kind": "KmsGrant",
                    "metadata": {"name": object, "namespace": name, "labels": {"kmsgrant.io/bench": name}},
                    "spec": {"providerConfigRef": {"name": name}, "keyId": key_ids[i % keys],
                        "granteePrincipal": "13gg44z4g2sglzk0egw0u726zoyzvrs8",
                        "operations": ["describe-key", "encrypt-datakey"]}});
                (object, manifest)
            })
            .collect();
        applying.push(tokio::spawn(async move {
            futures::stream::iter(manifests)
                .map(|(object, manifest)| {
                    let (api, apply) = (api.clone(), apply.clone());
                    async move { api.patch(&object, &apply, &Patch::Apply(&manifest)).await }
                })
                .buffer_unordered(16)
                .try_collect::<Vec<_>>()
                .await
                .map(|_| ())
        }));
    }
    for task in applying {
        task.await??;
    }
    let mut converged: Vec<Option<f64>> = vec![None; CLUSTERS];
    while converged.iter().any(Option::is_none) {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(args.timeout),
            "clusters did not converge: {converged:?}"
        );
        for (index, (name, ..)) in clusters.iter().enumerate() {
            if converged[index].is_none()
                && ready_at_count(&ready_at, &format!("{name}/")) >= grants
            {
                converged[index] = Some(started.elapsed().as_secs_f64());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let converge_kms = kms_delta(&emulator.admin().stats(), &before);
    let seconds: Vec<f64> = converged.into_iter().flatten().collect();
    // The combined floor: every cluster's creates, and a list and a describe per key.
    let floor = CLUSTERS * (grants + 2 * keys);
    let bound = if args.throttle > 0.0 {
        floor as f64 / args.throttle
    } else {
        0.0
    };
    // Afterwards, one resync period: each cluster lists its keys once and writes nothing.
    let steady_before = emulator.admin().stats();
    tokio::time::sleep(Duration::from_secs(args.resync)).await;
    let steady_kms = kms_delta(&emulator.admin().stats(), &steady_before);
    let usage: Vec<(u64, f64)> = clusters
        .iter()
        .map(|(_, _, operator, _)| {
            let (peak, _, cpu) = operator.usage();
            (peak, cpu)
        })
        .collect();
    watch.abort();
    for (name, ..) in &clusters {
        let _ = Api::<Namespace>::all(client.clone())
            .delete(name, &DeleteParams::default())
            .await;
    }
    let logs: Vec<String> = clusters
        .iter()
        .map(|(_, _, _, log)| log.display().to_string())
        .collect();
    drop(clusters);
    let total = all_calls(&converge_kms);
    let slowest = seconds.iter().copied().fold(0.0, f64::max);
    let mean = seconds.iter().sum::<f64>() / seconds.len().max(1) as f64;
    let spread = seconds
        .iter()
        .map(|s| (s - mean).abs() / mean.max(f64::EPSILON))
        .fold(0.0, f64::max);
    let steady_writes: u64 = ["create-grant", "revoke-grant", "retire-grant"]
        .iter()
        .filter_map(|op| steady_kms.get(*op))
        .flat_map(|outcomes| outcomes.values())
        .sum();
    let steady_lists: u64 = steady_kms
        .get("list-grants")
        .map_or(0, |outcomes| outcomes.values().sum());
    eprintln!(
        "bench: {CLUSTERS} clusters × {grants} on one account: converged in {seconds:?} s (bound {bound:.1} s), {total} calls, {} throttled",
        throttled(&converge_kms)
    );
    Ok(json!({
        "grants": grants, "keys": keys,
        "clusters": {
            "count": CLUSTERS,
            "converge_seconds": seconds,
            "slowest_seconds": slowest,
            "bound_seconds": bound,
            "slowest_over_bound": if bound > 0.0 { slowest / bound } else { 0.0 },
            "largest_deviation_from_mean": spread,
            "floor": floor,
            "kms_calls": converge_kms,
            "kms_calls_total": total,
            "kms_throttled": throttled(&converge_kms),
            "kms_throttled_share": if total == 0 { 0.0 } else { throttled(&converge_kms) as f64 / total as f64 },
            "steady_kms_calls": steady_kms,
            "steady_lists": steady_lists,
            "steady_writes": steady_writes,
            "steady_list_floor": CLUSTERS * keys,
            "operator_peak_rss_mib": usage.iter().map(|(peak, _)| *peak as f64 / 1024.0).collect::<Vec<_>>(),
            "operator_cpu_seconds": usage.iter().map(|(_, cpu)| *cpu).collect::<Vec<_>>(),
            "operator_logs": logs,
        }
    }))
}

/// The several-clusters section of the report, with issue 27's targets.
fn clusters_table(run: &Value, args: &Args) -> String {
    let c = &run["clusters"];
    let number = |field: &str| c[field].as_f64().unwrap_or(0.0);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n### {} clusters on one account, {} grants on {} keys each\n\n{} operators, each with its own `--cluster-name`, label selector and provider config, share one emulated account (one credential, one throttle of {} req/s, latency {} ms) and this control plane; all apply their objects at once (16 at a time each).\n",
        c["count"], run["grants"], run["keys"], c["count"], args.throttle, args.latency_ms
    );
    let _ = writeln!(
        out,
        "| converged (each cluster) | slowest / bound (combined floor {} calls / throttle) | largest deviation from the mean | KMS calls | throttled | steady period: lists (floor) / writes | peak RSS (each) | CPU (each) |",
        c["floor"]
    );
    let _ = writeln!(out, "| --- | --- | --- | --- | --- | --- | --- | --- |");
    let list = |field: &str, unit: &str| -> String {
        c[field]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_f64)
            .map(|v| format!("{v:.1}{unit}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let _ = writeln!(
        out,
        "| {} | {:.1} s / {:.1} s = {:.2} × | {:.0} % | {} | {} ({:.2} %) | {} ({}) / {} | {} | {} |",
        list("converge_seconds", " s"),
        number("slowest_seconds"),
        number("bound_seconds"),
        number("slowest_over_bound"),
        100.0 * number("largest_deviation_from_mean"),
        c["kms_calls_total"],
        c["kms_throttled"],
        100.0 * number("kms_throttled_share"),
        c["steady_lists"],
        c["steady_list_floor"],
        c["steady_writes"],
        list("operator_peak_rss_mib", " MiB"),
        list("operator_cpu_seconds", " s"),
    );
    let _ = writeln!(out);
    let mut line = |text: String, met: bool| {
        let _ = writeln!(out, "- {text}: {}", if met { "met" } else { "**not met**" });
    };
    if number("bound_seconds") > 0.0 {
        line(
            format!(
                "all converge within 1.1 × the bound of the combined floor ({:.2} ×)",
                number("slowest_over_bound")
            ),
            number("slowest_over_bound") <= 1.1,
        );
    }
    line(
        format!(
            "each cluster's converge time within ±20 % of the others' mean (largest deviation {:.0} %)",
            100.0 * number("largest_deviation_from_mean")
        ),
        number("largest_deviation_from_mean") <= 0.2,
    );
    line(
        format!(
            "throttled answers ≤ 2 % of calls ({:.2} %)",
            100.0 * number("kms_throttled_share")
        ),
        number("kms_throttled_share") <= 0.02,
    );
    line(
        format!(
            "steady afterwards at the floor: {} lists for {} keys in one resync, {} writes",
            c["steady_lists"], c["steady_list_floor"], c["steady_writes"]
        ),
        c["steady_writes"].as_u64() == Some(0)
            && c["steady_lists"].as_u64() <= c["steady_list_floor"].as_u64(),
    );
    out
}

fn ready_at_count(ready_at: &Mutex<HashMap<String, Instant>>, prefix: &str) -> usize {
    ready_at
        .lock()
        .unwrap()
        .keys()
        .filter(|k| k.starts_with(prefix))
        .count()
}

/// The fairness section of the report.
fn fairness_table(run: &Value, args: &Args) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nTenant A applies {} KmsGrants on {} keys of one account (16 at a time); tenant B, in another namespace on the same account and provider config, applies one grant alone first, then one once all of A's objects are applied (A's queue waits on the throttle). Throttle {} req/s, latency {} ms, operator concurrency {}.\n",
        run["grants"], run["keys"], args.throttle, args.latency_ms, args.concurrency
    );
    let _ = writeln!(
        out,
        "| fair scheduling | B alone: Ready after | B during A's burst: Ready after | A converged | A's bound (floor / throttle) | A / bound | throttled | deferrals | operator CPU | peak RSS |"
    );
    let _ = writeln!(
        out,
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    );
    for mode in run["fairness"].as_array().into_iter().flatten() {
        let f = |k: &str| mode[k].as_f64().unwrap_or(0.0);
        let _ = writeln!(
            out,
            "| {} | {:.2} s | {:.2} s | {:.1} s | {:.1} s | {:.2} | {} of {} | {} | {:.1} s | {:.0} MiB |",
            if mode["fair_scheduling"] == true {
                "on (default)"
            } else {
                "off"
            },
            f("b_alone_seconds"),
            f("b_during_burst_seconds"),
            f("a_converge_seconds"),
            f("a_bound_seconds"),
            f("a_converge_over_bound"),
            mode["kms_throttled"],
            mode["kms_calls_total"],
            mode["deferrals"]
                .as_f64()
                .map_or("–".to_owned(), |d| format!("{d:.0}")),
            f("operator_cpu_seconds"),
            f("operator_peak_rss_mib"),
        );
    }
    out
}
