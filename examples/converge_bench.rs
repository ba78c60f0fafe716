//! Benchmark (not a test): how long N KmsGrants on K keys take to become Ready and to be revoked,
//! what that costs in KMS calls, and the process's peak memory. Run through `scripts/bench`, which
//! starts a local control plane and passes its kubeconfig.
//!
//! usage: converge_bench KUBECONFIG [GRANTS] [KEYS]

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kms_emulator::{Emulator, EmulatorConfig, NewKey};
use kmsgrant::api::KmsGrant;
use kmsgrant::controller::{self, Settings};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use serde_json::json;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let kubeconfig = args
        .get(1)
        .expect("usage: converge_bench KUBECONFIG [GRANTS] [KEYS]");
    let grants: usize = args.get(2).map_or(Ok(500), |a| a.parse())?;
    let keys: usize = args.get(3).map_or(Ok(10), |a| a.parse())?;
    let client = kmsgrant::process::kube_client(Some(kubeconfig.into()), None).await?;
    let apply = PatchParams::apply("converge-bench").force();

    let emulator = Emulator::start(EmulatorConfig {
        grants_per_key: 100,
        ..EmulatorConfig::for_tests()
    })
    .await?;
    let key_ids: Vec<String> = (0..keys)
        .map(|i| {
            emulator
                .admin()
                .create_key(NewKey {
                    key_alias: format!("bench-{i}"),
                    ..NewKey::default()
                })
                .unwrap()
                .key_id
        })
        .collect();
    let crds: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
        Api::all(client.clone());
    for crd in kmsgrant::api::crds() {
        crds.patch(
            crd.metadata.name.as_deref().unwrap(),
            &apply,
            &Patch::Apply(&crd),
        )
        .await?;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let namespace = format!("bench-{}", std::process::id());
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
    let provider = json!({"apiVersion": "kmsgrant.io/v1alpha1", "kind": "KmsProviderConfig",
        "metadata": {"name": namespace},
        "spec": {"endpoint": emulator.base_url(), "projectId": config.project_id, "region": config.region,
            "auth": {"type": "AccessKey", "secretRef": {"namespace": namespace, "name": "kms"}},
            "rateLimit": {"requestsPerSecond": 1000, "burst": 1000}}});
    Api::<kmsgrant::api::KmsProviderConfig>::all(client.clone())
        .patch(&namespace, &apply, &Patch::Apply(&provider))
        .await?;

    let settings = Settings {
        resync: Duration::from_secs(60),
        concurrency: 16,
        namespace: Some(namespace.clone()),
        secret_namespace: Some(namespace.clone()),
        allow_http: true,
        ..Settings::default()
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let metrics = Arc::new(kmsgrant::metrics::Metrics::new());
    let operator = tokio::spawn(controller::run(
        client.clone(),
        settings,
        metrics,
        Arc::new(AtomicBool::new(false)),
        async {
            let _ = stopped.await;
        },
    ));
    tokio::time::sleep(Duration::from_secs(2)).await;
    emulator.admin().clear_stats();

    let api: Api<KmsGrant> = Api::namespaced(client.clone(), &namespace);
    let started = Instant::now();
    let manifests: Vec<_> = (0..grants)
        .map(|i| {
            json!({"apiVersion": "kmsgrant.io/v1alpha1", "kind": "KmsGrant",
                "metadata": {"name": format!("g{i:05}"), "namespace": namespace},
                "spec": {"providerConfigRef": {"name": namespace}, "keyId": key_ids[i % keys],
                    "granteePrincipal": "13gg44z4g2sglzk0egw0u726zoyzvrs8", "operations": ["describe-key", "encrypt-datakey"]}})
        })
        .collect();
    // Applied 16 at a time, as a GitOps tool would sync a directory.
    futures::stream::iter(manifests.iter().enumerate())
        .map(|(i, grant)| {
            let (api, apply) = (api.clone(), apply.clone());
            async move {
                api.patch(&format!("g{i:05}"), &apply, &Patch::Apply(grant))
                    .await
            }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<_>>()
        .await?;
    let applied = started.elapsed();
    loop {
        let ready = api
            .list(&ListParams::default())
            .await?
            .items
            .iter()
            .filter(|g| is_ready(g))
            .count();
        if ready == grants {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(900),
            "only {ready} of {grants} Ready after 15 min"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let converged = started.elapsed();
    let stats = emulator.admin().stats();
    let count = |op: &str| stats.count(op, "200");
    println!(
        "{grants} grants on {keys} keys: applied in {applied:.1?}, all Ready after {converged:.1?} ({:.0} grants/s)",
        grants as f64 / converged.as_secs_f64()
    );
    println!(
        "  KMS calls: {} create-grant, {} list-grants, {} describe-key, {} in all",
        count("create-grant"),
        count("list-grants"),
        count("describe-key"),
        stats.total
    );

    emulator.admin().clear_stats();
    let started = Instant::now();
    api.delete_collection(&DeleteParams::default(), &ListParams::default())
        .await?;
    while !emulator.admin().dump().grants.is_empty()
        || !api.list(&ListParams::default()).await?.items.is_empty()
    {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(900),
            "deletion did not finish in 15 min"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    println!(
        "  deleted (revoked) all in {:.1?}; {} revoke-grant calls",
        started.elapsed(),
        emulator.admin().stats().count("revoke-grant", "200")
    );
    println!(
        "  peak memory of this process (operator + emulator): {}",
        peak_memory()
    );
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), operator).await;
    Ok(())
}

fn is_ready(grant: &KmsGrant) -> bool {
    grant.status.as_ref().is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == kmsgrant::api::ConditionStatus::True)
    })
}

fn peak_memory() -> String {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .map(|l| l.trim_start_matches("VmHWM:").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into())
}
