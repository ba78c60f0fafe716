//! `helm upgrade` from the chart of commit 84dffa1 (v1alpha1 only, a packaged fixture) to this
//! chart on a real API server: the CRDs move to v1beta1 storage, the operator migrates what is
//! stored with no grant created or revoked, and a later chart that stops serving v1alpha1 is
//! refused while anything still stores or manages it. On a control plane of its own.

mod graduation;
mod support;

use std::time::Duration;

use graduation::*;
use serde_json::{Value, json};
use std::path::Path;
use support::{REPO, eventually, kubectl_ok};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_upgrade_from_the_chart_of_84dffa1_migrates_without_touching_a_grant_and_guards_the_next_step()
 {
    let control_plane = support::own_control_plane();
    let old_chart = Path::new(REPO).join("tests/fixtures/kmsgrant-operator-chart-84dffa1.tgz");
    helm_ok(&[
        "install",
        "kmsgrant",
        old_chart.to_str().unwrap(),
        "--namespace",
        "kmsgrant-system",
        "--create-namespace",
    ]);
    kubectl_ok(
        &[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/kmsgrants.kmsgrant.io",
        ],
        None,
    );
    std::thread::sleep(Duration::from_secs(2));
    let world = World::new("kmsgrant.io/v1alpha1").await;
    // What today's main leaves behind: objects applied by a GitOps tool at v1alpha1, each with
    // its identity-named grant on KMS (made here through the API, as that operator made them).
    let kms = support::kms_client_of(&world.emulator);
    let mut made = std::collections::BTreeMap::new();
    for name in ["one", "two"] {
        let manifest = world.grant("kmsgrant.io/v1alpha1", name, json!({}));
        kubectl_ok(
            &[
                "apply",
                "--server-side",
                "--field-manager=argocd",
                "-f",
                "-",
            ],
            Some(&manifest.to_string()),
        );
        let grant_id = kms
            .create_grant(&kmsgrant_kms::NewGrant {
                key_id: world.key_id.clone(),
                grantee_principal: PRINCIPAL.to_owned(),
                grantee_principal_type: kmsgrant::api::GranteePrincipalType::User,
                operations: vec![
                    kmsgrant::api::Operation::DescribeKey,
                    kmsgrant::api::Operation::EncryptDatakey,
                ],
                name: Some(kmsgrant::controller::identity::grant_name(
                    "e2e",
                    &world.namespace,
                    name,
                )),
                retiring_principal: None,
            })
            .await
            .unwrap();
        made.insert(name.to_owned(), grant_id);
    }
    let before = world.writes();

    helm_ok(&[
        "upgrade",
        "kmsgrant",
        "charts/kmsgrant-operator",
        "--namespace",
        "kmsgrant-system",
    ]);
    // The upgraded CRDs store v1beta1; v1alpha1 objects are still stored as they were.
    kubectl_ok(
        &[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/kmsgrants.kmsgrant.io",
        ],
        None,
    );
    let crd: Value = serde_json::from_str(&kubectl_ok(
        &["get", "crd", "kmsgrants.kmsgrant.io", "-o", "json"],
        None,
    ))
    .unwrap();
    let storage: Vec<&str> = crd["spec"]["versions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["storage"] == true)
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(storage, ["v1beta1"]);

    // A later chart that stops serving v1alpha1 is refused while v1alpha1 may still be stored.
    let next = chart_at_stage("unserved");
    let refused = upgrade_to(&next);
    let message = String::from_utf8_lossy(&refused.stderr).into_owned();
    assert!(
        !refused.status.success() && message.contains("status.storedVersions"),
        "{message}"
    );

    // The upgraded operator (here out of the cluster: no node runs its pods) adopts the grants
    // and migrates what is stored.
    let operator = ClusterWideOperator::start(&world.namespace);
    world.wait_all_ready(&["one", "two"]).await;
    eventually(
        "storedVersions [v1beta1] on every CRD",
        Duration::from_secs(90),
        async || CRDS.iter().all(|crd| stored_versions(crd) == ["v1beta1"]),
    )
    .await;
    assert_eq!(
        managed_by_v1alpha1(&all_objects("v1beta1")),
        Vec::<String>::new()
    );
    let ids = world.grant_ids();
    for (name, id) in &made {
        assert_eq!(ids.get(name), Some(id), "{name} adopted its grant");
    }
    // An object applied at v1alpha1 since still blocks the next chart, by its managedFields.
    let late = world.grant("kmsgrant.io/v1alpha1", "late", json!({}));
    kubectl_ok(&["apply", "-f", "-"], Some(&late.to_string()));
    let refused = upgrade_to(&next);
    let message = String::from_utf8_lossy(&refused.stderr).into_owned();
    assert!(
        !refused.status.success() && message.contains("late"),
        "{message}"
    );
    let migrated = migrate(&["--cluster"]);
    assert!(
        migrated.status.success(),
        "{}",
        String::from_utf8_lossy(&migrated.stderr)
    );
    let upgraded = upgrade_to(&next);
    assert!(
        upgraded.status.success(),
        "{}",
        String::from_utf8_lossy(&upgraded.stderr)
    );
    world.wait_all_ready(&["late"]).await;
    // That chart's guardrail policy names v1beta1 for its params, and KmsGrants are still written.
    let param = kubectl_ok(
        &[
            "get",
            "validatingadmissionpolicy",
            "kmsgrant-guardrails",
            "-o",
            "jsonpath={.spec.paramKind.apiVersion}",
        ],
        None,
    );
    assert_eq!(param, "kmsgrant.io/v1beta1");
    // Right after a CRD change the API server's admission plugin may not map the new paramKind
    // yet and refuses for a moment ("failed to find resource referenced by paramKind"); a
    // GitOps tool retries the same way.
    let after = world.grant("kmsgrant.io/v1beta1", "after", json!({}));
    eventually(
        "a KmsGrant write admitted under the next chart's policy",
        Duration::from_secs(90),
        async || {
            support::kubectl(&["apply", "-f", "-"], Some(&after.to_string()))
                .status
                .success()
        },
    )
    .await;
    world.wait_all_ready(&["after"]).await;
    let before = (before.0 + 2, before.1);

    tokio::time::sleep(Duration::from_secs(8)).await;
    assert_eq!(
        world.writes(),
        before,
        "no grant created or revoked by the upgrade; operator log:\n{}",
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

/// `helm upgrade` of the release to the chart copy in `chart` (from [`chart_at_stage`]).
fn upgrade_to(chart: &tempfile::TempDir) -> std::process::Output {
    helm(&[
        "upgrade",
        "kmsgrant",
        chart.path().join("kmsgrant-operator").to_str().unwrap(),
        "--namespace",
        "kmsgrant-system",
    ])
}
