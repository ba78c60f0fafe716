//! The graduation from `kmsgrant.io/v1alpha1` to `v1beta1` on a real API server, stage by stage
//! (docs/versioning.md): only v1alpha1 (the CRDs of commit 84dffa1) -> both served -> v1beta1
//! stored and migrated by the operator -> v1alpha1 no longer served -> removed. Objects made at
//! each stage survive every step with no grant created or revoked on the emulator beyond their
//! first; a rollback from the second stage to the first works; kubectl warns at v1alpha1; a GitOps
//! field manager still owns its fields after the migration; `migrate --check` and `--cluster`.
//! The `helm upgrade` path is tests/api_upgrade_helm.rs.
//!
//! It changes the CRDs, so it has a control plane of its own (one per test binary).

mod graduation;
mod support;

use std::time::Duration;

use graduation::*;
use serde_json::json;
use support::{eventually, kubectl, kubectl_ok};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_stage_of_the_graduation_keeps_every_object_and_grant() {
    let control_plane = support::own_control_plane();

    // Stage 0, an older release: spec.name was a real field. One object stores a value there.
    apply_crds_ok(&v1alpha1_only_crds());
    apply_crds_ok(&crd_before_the_tombstone());
    let world = World::new("kmsgrant.io/v1alpha1").await;
    kubectl_ok(
        &["apply", "-f", "-"],
        Some(
            &world
                .grant(
                    "kmsgrant.io/v1alpha1",
                    "legacy",
                    json!({"name": "grant-left-by-v0"}),
                )
                .to_string(),
        ),
    );

    // Stage 1, today's main: only v1alpha1. A GitOps tool applies an object server-side.
    apply_crds_ok(&v1alpha1_only_crds());
    let mut alpha = world.grant(
        "kmsgrant.io/v1alpha1",
        "alpha",
        json!({"retiringPrincipal": PRINCIPAL}),
    );
    alpha["metadata"]["labels"] = json!({"team": "a", "tier": "gold"});
    kubectl_ok(
        &[
            "apply",
            "--server-side",
            "--field-manager=argocd",
            "-f",
            "-",
        ],
        Some(&alpha.to_string()),
    );
    assert_eq!(stored_versions(CRDS[0]), ["v1alpha1"]);

    // Stage 2: both served, v1alpha1 stored. Rolling back to stage 1 and forth again works: the
    // API server never stored anything at v1beta1.
    apply_crds_ok(&crds_at("introduced"));
    kubectl_ok(
        &[
            "-n",
            &world.namespace,
            "get",
            "kmsgrants.v1beta1.kmsgrant.io",
            "alpha",
        ],
        None,
    );
    apply_crds_ok(&v1alpha1_only_crds());
    assert_eq!(stored_versions(CRDS[0]), ["v1alpha1"]);
    kubectl_ok(
        &[
            "-n",
            &world.namespace,
            "get",
            "kmsgrants.v1alpha1.kmsgrant.io",
            "alpha",
            "legacy",
        ],
        None,
    );
    apply_crds_ok(&crds_at("introduced"));

    // The new operator starts: the removed spec.name is kept before anything can prune it.
    let operator = ClusterWideOperator::start(&world.namespace);
    let beta = world.grant("kmsgrant.io/v1beta1", "beta", json!({}));
    kubectl_ok(&["apply", "-f", "-"], Some(&beta.to_string()));
    world.wait_all_ready(&["legacy", "alpha", "beta"]).await;
    let legacy = support::get_grant(&world.namespace, "legacy");
    assert_eq!(
        legacy["metadata"]["annotations"]["kmsgrant.io/legacy-grant-name"], "grant-left-by-v0",
        "{legacy}"
    );
    let warnings = world.events("LegacyGrantName");
    assert_eq!(warnings.len(), 1, "reported once: {warnings:?}");
    assert!(
        warnings[0]["note"]
            .as_str()
            .unwrap()
            .contains("spec.importGrantId"),
        "{}",
        warnings[0]
    );
    let grants = world.grant_ids();
    assert_eq!(world.writes(), (3, 0), "one create per object, no revoke");
    assert!(grants.values().all(|id| id.len() == 64), "{grants:?}");
    // v1alpha1 still stores: the operator leaves storedVersions alone.
    assert_eq!(stored_versions(CRDS[0]), ["v1alpha1"]);
    drop(operator);

    // Stage 3: v1beta1 stored, v1alpha1 deprecated. The upgraded operator migrates storage.
    apply_crds_ok(&crds_at("stored"));
    let operator = ClusterWideOperator::start(&world.namespace);
    eventually(
        "storedVersions [v1beta1] on every CRD",
        Duration::from_secs(90),
        async || CRDS.iter().all(|crd| stored_versions(crd) == ["v1beta1"]),
    )
    .await;
    let objects = all_objects("v1beta1");
    assert_eq!(managed_by_v1alpha1(&objects), Vec::<String>::new());
    assert_eq!(objects.len(), 4, "three grants and one provider config");
    let metrics = support::metrics(operator.admin_port).await;
    for kind in ["KmsGrant", "KmsProviderConfig", "KmsKeyPolicy"] {
        assert_eq!(
            support::series(
                &metrics,
                &format!("kmsgrant_storage_migration_complete{{kind=\"{kind}\"}}")
            ),
            Some(1.0),
            "{metrics}"
        );
    }
    assert_eq!(world.events("StorageMigrated").len(), 3);
    // The legacy name survived the rewrite that pruned spec.name.
    let legacy = support::get_grant(&world.namespace, "legacy");
    assert_eq!(
        legacy["metadata"]["annotations"]["kmsgrant.io/legacy-grant-name"],
        "grant-left-by-v0"
    );
    assert!(legacy["spec"].get("name").is_none(), "{legacy}");

    // kubectl with a v1alpha1 manifest sees the deprecation warning.
    let gamma = world.grant("kmsgrant.io/v1alpha1", "gamma", json!({}));
    let warning = stderr_of_kubectl_apply(&gamma);
    assert!(
        warning.contains("kmsgrant.io/v1alpha1 KmsGrant is deprecated")
            && warning.contains("kmsgrant-operator migrate -f"),
        "{warning}"
    );
    world.wait_all_ready(&["gamma"]).await;

    // The GitOps field manager still owns its fields: applying at v1beta1 without the label
    // `tier` removes it (a spec change would replace the grant, which is not the point here).
    let mut alpha_beta = world.grant(
        "kmsgrant.io/v1beta1",
        "alpha",
        json!({"retiringPrincipal": PRINCIPAL}),
    );
    alpha_beta["metadata"]["labels"] = json!({"team": "a"});
    kubectl_ok(
        &[
            "apply",
            "--server-side",
            "--field-manager=argocd",
            "-f",
            "-",
        ],
        Some(&alpha_beta.to_string()),
    );
    let alpha_now = support::get_grant(&world.namespace, "alpha");
    assert_eq!(
        alpha_now["metadata"]["labels"],
        json!({"team": "a"}),
        "{alpha_now}"
    );

    // Before v1alpha1 stops being served, the check refuses while anything manages it: gamma was
    // applied at v1alpha1 after the migration.
    let check = migrate(&["--check"]);
    let report = String::from_utf8_lossy(&check.stdout).into_owned()
        + &String::from_utf8_lossy(&check.stderr);
    assert_eq!(check.status.code(), Some(1), "{report}");
    assert!(report.contains("gamma"), "{report}");
    let run = migrate(&["--cluster"]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let check = migrate(&["--check"]);
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );

    // Stage 4: v1alpha1 no longer served.
    apply_crds_ok(&crds_at("unserved"));
    let gone = kubectl(
        &[
            "-n",
            &world.namespace,
            "get",
            "kmsgrants.v1alpha1.kmsgrant.io",
        ],
        None,
    );
    assert!(!gone.status.success(), "v1alpha1 must not be served");
    let delta = world.grant("kmsgrant.io/v1beta1", "delta", json!({}));
    kubectl_ok(&["apply", "-f", "-"], Some(&delta.to_string()));
    world.wait_all_ready(&["delta"]).await;
    let mut grants = grants;
    grants.extend(
        world
            .grant_ids()
            .into_iter()
            .filter(|(n, _)| n == "gamma" || n == "delta"),
    );
    // Stage 5: v1alpha1 removed; the API server accepts it because storedVersions is [v1beta1].
    apply_crds_ok(&crds_at("removed"));
    // The GitOps tool applies again at v1beta1: no managedFields name a version that is gone.
    alpha_beta["metadata"]["labels"] = json!({"team": "b"});
    kubectl_ok(
        &[
            "apply",
            "--server-side",
            "--field-manager=argocd",
            "-f",
            "-",
        ],
        Some(&alpha_beta.to_string()),
    );
    let alpha_now = support::get_grant(&world.namespace, "alpha");
    assert_eq!(alpha_now["metadata"]["labels"], json!({"team": "b"}));
    world
        .wait_all_ready(&["legacy", "alpha", "beta", "gamma", "delta"])
        .await;
    // Give the operator a few resyncs: nothing it sees may make it write to KMS.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let after = world.grant_ids();
    for (name, id) in &grants {
        assert_eq!(after.get(name), Some(id), "{name} kept its grant");
    }
    assert_eq!(after.len(), 5);
    assert_eq!(
        world.writes(),
        (5, 0),
        "one create per object over every stage, no revoke; operator log:\n{}",
        operator.log()
    );
    drop(operator);
    support::remove_own_control_plane(&control_plane);
}

/// `kmsgrant-operator migrate ARGS` against the test control plane.
fn migrate(args: &[&str]) -> std::process::Output {
    std::process::Command::new(support::OPERATOR_BIN)
        .arg("migrate")
        .args(args)
        .args(["--kubeconfig", support::kubeconfig().to_str().unwrap()])
        .output()
        .unwrap()
}
