//! Exclusive mode end to end (KmsKeyPolicy `spec.undeclaredGrants`), on a real API server with
//! the emulator as KMS: `Report` shows what `Revoke` would remove and writes nothing to KMS;
//! `Revoke` removes exactly the undeclared, non-allow-listed grants with one `revoke-grant` each
//! and no extra list; another cluster's grants only with the opt-in; a sharded operator (every
//! test operator is one: `--namespace` and `--label-selector`) keeps grants named for this
//! cluster that it cannot see, and another shard's imported grant; lost and failed revokes are
//! judged by the next listing.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use kms_emulator::{EmulatorConfig, ErrorInjection, FaultSettings, InjectedError};
use serde_json::{Value, json};
use support::{
    CLUSTER, Env, Operator, TEST_LABEL, eventually, free_port, grant_by_hand, kms_client,
    kubectl_ok, last_seq, lists, metrics, passes, series,
};

const RESYNC: &str = "4s";

fn key_policy(env: &Env, name: &str, key: &str, extra: Value) -> Value {
    let mut spec = json!({"providerConfigRef": {"name": env.provider}, "keyId": key});
    for (k, v) in extra.as_object().unwrap() {
        spec[k] = v.clone();
    }
    json!({
        "apiVersion": "kmsgrant.io/v1beta1", "kind": "KmsKeyPolicy",
        "metadata": {"name": name, "labels": {TEST_LABEL: env.namespace}},
        "spec": spec
    })
}

fn policy(name: &str) -> Value {
    serde_json::from_str(&kubectl_ok(
        &["get", "kmskeypolicies.kmsgrant.io", name, "-o", "json"],
        None,
    ))
    .unwrap()
}

fn patch_policy(name: &str, spec: Value) {
    kubectl_ok(
        &[
            "patch",
            "kmskeypolicies.kmsgrant.io",
            name,
            "--type=merge",
            "-p",
            &json!({"spec": spec}).to_string(),
        ],
        None,
    );
}

/// The policy's listed grants: grant ID → action.
fn actions(policy: &Value) -> BTreeMap<String, String> {
    policy["status"]["grants"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|g| {
            (
                g["grantId"].as_str().unwrap().to_owned(),
                g["action"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// Events about one KmsKeyPolicy with this reason, by note.
fn events(name: &str, reason: &str) -> Vec<(String, String)> {
    let list: Value = serde_json::from_str(&kubectl_ok(
        &[
            "get",
            "events",
            "-A",
            "--field-selector",
            &format!("involvedObject.kind=KmsKeyPolicy,involvedObject.name={name},reason={reason}"),
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
        .map(|e| {
            (
                e["type"].as_str().unwrap_or_default().to_owned(),
                e["message"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// The grant IDs on a key, as the emulator holds them.
fn on_key(env: &Env, key: &str) -> BTreeSet<String> {
    env.emulator
        .admin()
        .dump()
        .grants
        .into_iter()
        .filter(|g| g.key_id == key)
        .map(|g| g.grant_id)
        .collect()
}

/// KMS writes after `after`: (operation, grant ID) of every create, revoke and retire.
fn writes(env: &Env, after: u64) -> Vec<(String, String)> {
    env.emulator
        .admin()
        .calls(after)
        .into_iter()
        .filter(|c| {
            ["create-grant", "revoke-grant", "retire-grant"].contains(&c.operation.as_str())
        })
        .map(|c| (c.operation, c.grant_id.unwrap_or_default()))
        .collect()
}

fn revokes_of(env: &Env, after: u64, grant: &str) -> usize {
    writes(env, after)
        .iter()
        .filter(|(op, id)| op == "revoke-grant" && id == grant)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn report_changes_nothing_and_revoke_removes_exactly_the_undeclared_grants() {
    let mut env = Env::new("exclusive", EmulatorConfig::for_tests(), RESYNC).await;
    let key = env.new_key("exclusive");
    let port = free_port();
    env.operator = Some(Operator::start_with(
        &env.namespace,
        RESYNC,
        &["--admin-address", &format!("127.0.0.1:{port}")],
    ));
    env.apply(&env.grant("app", &key, json!({})));
    env.apply(&env.grant("left", &key, json!({"deletionPolicy": "Orphan"})));
    for name in ["app", "left"] {
        env.wait_for(name, "condition=Ready", 60);
    }
    let app = env.get("app")["status"]["grantId"]
        .as_str()
        .unwrap()
        .to_owned();
    let left = env.get("left")["status"]["grantId"]
        .as_str()
        .unwrap()
        .to_owned();
    // An Orphan deletion: the grant stays, named k8s/e2e/<namespace>/left, declared by nobody.
    kubectl_ok(
        &[
            "-n",
            &env.namespace,
            "delete",
            "kmsgrants.kmsgrant.io",
            "left",
        ],
        None,
    );

    // Grants made by hand, one of each kind.
    let kms = kms_client(&env);
    let hand = grant_by_hand(&kms, &key, "everyone", Some("decrypt-for-everyone")).await;
    let unnamed = grant_by_hand(&kms, &key, "someone", None).await;
    let trusted = grant_by_hand(&kms, &key, "trusted", Some("break-glass")).await;
    let by_id = grant_by_hand(&kms, &key, "partner", None).await;
    let foreign = grant_by_hand(&kms, &key, "peer", Some("k8s/other-cluster/team-x/app")).await;
    // Named for a KmsGrant of this cluster in a namespace this shard does not watch (it does
    // not exist anywhere: a sharded operator still cannot tell), and an old-style name.
    let ghost_name = format!("k8s/{CLUSTER}/{}-elsewhere/ghost", env.namespace);
    let ghost = grant_by_hand(&kms, &key, "app", Some(&ghost_name)).await;
    let legacy = grant_by_hand(
        &kms,
        &key,
        "app",
        Some("kmsgrant-5d1e0c9a-33f4-4d0e-9a35-0a4f5e6b7c8d"),
    )
    .await;
    // Imported by ID by a KmsGrant of another shard: a namespace without this test's label,
    // which this operator neither watches nor is told about.
    let imported = grant_by_hand(&kms, &key, "tfuser", Some("terraform-import")).await;
    let shard_b = support::namespace("exclusive-shard-b");
    kubectl_ok(
        &["apply", "-f", "-"],
        Some(
            &json!({
                "apiVersion": "kmsgrant.io/v1beta1", "kind": "KmsGrant",
                "metadata": {"name": "imports", "namespace": shard_b},
                "spec": {"providerConfigRef": {"name": env.provider}, "keyId": key,
                    "granteePrincipal": "tfuser", "operations": ["describe-key", "decrypt-datakey"],
                    "importGrantId": imported}
            })
            .to_string(),
        ),
    );

    // Report (the default): what Revoke would do, per grant; the grant IDs allow-listed in
    // upper case (the schema takes both, KMS answers in lower case).
    let name = format!("{}-keypolicy", env.namespace);
    env.apply(&key_policy(
        &env,
        &name,
        &key,
        json!({"allowedGrants": {"grantees": ["trusted"], "grantIds": [by_id.to_uppercase()]}}),
    ));
    let expected_report: BTreeMap<String, String> = [
        (&hand, "WouldRevoke"),
        (&unnamed, "WouldRevoke"),
        (&trusted, "Allowed"),
        (&by_id, "Allowed"),
        (&foreign, "KeptOtherCluster"),
        (&ghost, "KeptThisCluster"),
        (&legacy, "KeptThisCluster"),
        (&left, "KeptThisCluster"),
    ]
    .into_iter()
    .map(|(id, action)| (id.clone(), action.to_owned()))
    .collect();
    eventually(
        "the dry run shows what Revoke would do",
        Duration::from_secs(60),
        async || actions(&policy(&name)) == expected_report,
    )
    .await;
    let status = policy(&name)["status"].clone();
    assert_eq!(status["revocableGrants"], 2, "{status}");
    assert!(status.get("revokedGrants").is_none(), "{status}");
    assert_eq!(policy(&name)["spec"]["undeclaredGrants"], "Report");
    assert_eq!(policy(&name)["spec"]["revokeOtherClusters"], false);

    // A grant made by hand now appears at the next listing; Report writes nothing to KMS.
    let late = grant_by_hand(&kms, &key, "latecomer", None).await;
    let report_from = last_seq(&env);
    eventually(
        "the new grant appears as WouldRevoke",
        Duration::from_secs(60),
        async || actions(&policy(&name)).get(&late).map(String::as_str) == Some("WouldRevoke"),
    )
    .await;
    let report_passes = passes(&env, report_from, 2).await;
    for pass in &report_passes {
        assert_eq!(lists(pass), BTreeMap::from([(key.clone(), 1)]), "{pass:?}");
    }
    assert_eq!(writes(&env, report_from), [], "Report wrote to KMS");
    assert_eq!(policy(&name)["status"]["revocableGrants"], 3);
    let all_before = on_key(&env, &key);

    // Revoke: exactly the three undeclared, non-allow-listed grants of no other cluster go, one
    // revoke-grant each.
    let revoke_from = last_seq(&env);
    patch_policy(&name, json!({"undeclaredGrants": "Revoke"}));
    let gone: BTreeSet<String> = [&hand, &unnamed, &late].into_iter().cloned().collect();
    eventually(
        "the undeclared grants are revoked",
        Duration::from_secs(60),
        async || on_key(&env, &key).is_disjoint(&gone),
    )
    .await;
    let kept: BTreeSet<String> = all_before.difference(&gone).cloned().collect();
    assert_eq!(on_key(&env, &key), kept);
    for id in [
        &app, &trusted, &by_id, &foreign, &ghost, &legacy, &left, &imported,
    ] {
        assert!(kept.contains(id), "{id} must stay");
    }
    let revoked: Vec<(String, String)> = writes(&env, revoke_from);
    assert_eq!(
        revoked
            .iter()
            .map(|(_, id)| id.clone())
            .collect::<BTreeSet<_>>(),
        gone,
        "{revoked:?}"
    );
    assert_eq!(
        revoked.len(),
        3,
        "one revoke-grant per removed grant: {revoked:?}"
    );
    assert!(revoked.iter().all(|(op, _)| op == "revoke-grant"));

    // After the next listing: nothing left to revoke, the count kept, an event per grant.
    // Until the next listing a revoked grant stays in status as Revoked; then it is gone.
    let mut expected_revoke = expected_report.clone();
    for id in [&hand, &unnamed] {
        expected_revoke.remove(id);
    }
    eventually(
        "the status shows them revoked",
        Duration::from_secs(60),
        async || {
            let found = policy(&name);
            let mut listed = actions(&found);
            let revoked_listed = gone
                .iter()
                .filter_map(|id| listed.remove(id))
                .all(|action| action == "Revoked");
            found["status"]["revokedGrants"] == 3 && revoked_listed && listed == expected_revoke
        },
    )
    .await;
    eventually(
        "the next listing drops them",
        Duration::from_secs(60),
        async || {
            let found = policy(&name);
            found["status"]["revocableGrants"] == 0 && actions(&found) == expected_revoke
        },
    )
    .await;
    let told = events(&name, "UndeclaredGrantRevoked");
    assert_eq!(told.len(), 3, "{told:?}");
    for (id, grantee) in [
        (&hand, "everyone"),
        (&unnamed, "someone"),
        (&late, "latecomer"),
    ] {
        assert!(
            told.iter().any(|(kind, note)| kind == "Normal"
                && note.contains(id.as_str())
                && note.contains(&format!("grantee {grantee}"))),
            "{id}: {told:?}"
        );
    }
    let revoked_series = format!(
        "kmsgrant_undeclared_grants_revoked_total{{provider=\"{}\"}}",
        env.provider
    );
    assert_eq!(series(&metrics(port).await, &revoked_series), Some(3.0));

    // In steady state Revoke costs what the audit costs: one list per pass, no write.
    let steady_from = last_seq(&env);
    for pass in &passes(&env, steady_from, 2).await {
        assert_eq!(lists(pass), BTreeMap::from([(key.clone(), 1)]), "{pass:?}");
    }
    assert_eq!(writes(&env, steady_from), []);

    // Opted in, another cluster's grant goes too; the grants named for this cluster stay.
    let opt_in_from = last_seq(&env);
    patch_policy(&name, json!({"revokeOtherClusters": true}));
    eventually(
        "the other cluster's grant is revoked",
        Duration::from_secs(60),
        async || !on_key(&env, &key).contains(&foreign),
    )
    .await;
    assert_eq!(
        writes(&env, opt_in_from),
        [("revoke-grant".to_owned(), foreign.clone())]
    );
    let mut kept = kept;
    kept.remove(&foreign);
    assert_eq!(on_key(&env, &key), kept);
    eventually("the count follows", Duration::from_secs(60), async || {
        policy(&name)["status"]["revokedGrants"] == 4
    })
    .await;

    // The managed grant was never touched.
    assert_eq!(env.get("app")["status"]["grantId"], app.as_str());
    assert_eq!(env.ready_reason("app"), "GrantReady");
    kubectl_ok(&["delete", "kmskeypolicies.kmsgrant.io", &name], None);
    kubectl_ok(&["delete", "namespace", &shard_b, "--wait=false"], None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lost_and_failed_revokes_are_judged_by_the_next_listing() {
    let mut env = Env::new("exclusive-faults", EmulatorConfig::for_tests(), RESYNC).await;
    let key = env.new_key("exclusive-faults");
    env.start_operator();
    let name = format!("{}-keypolicy", env.namespace);
    env.apply(&key_policy(
        &env,
        &name,
        &key,
        json!({"undeclaredGrants": "Revoke"}),
    ));
    eventually("the policy is Ready", Duration::from_secs(60), async || {
        policy(&name)["status"]["revocableGrants"] == 0
    })
    .await;
    let kms = kms_client(&env);
    let admin = env.emulator.admin();

    // The revoke takes effect but its answer is a 500: unconfirmed, and the next listing shows
    // it gone, so it is never sent again.
    admin
        .set_faults(FaultSettings {
            error_after_commit: [("revoke-grant".to_owned(), 1.0)].into(),
            ..FaultSettings::default()
        })
        .unwrap();
    let from = last_seq(&env);
    let lost = grant_by_hand(&kms, &key, "someone", None).await;
    eventually("the grant is gone", Duration::from_secs(60), async || {
        !on_key(&env, &key).contains(&lost)
    })
    .await;
    eventually(
        "a Warning says the answer was lost",
        Duration::from_secs(30),
        async || {
            events(&name, "UndeclaredGrantRevokeFailed")
                .iter()
                .any(|(kind, note)| {
                    kind == "Warning" && note.contains(&lost) && note.contains("answer was lost")
                })
        },
    )
    .await;
    passes(&env, last_seq(&env), 2).await;
    assert_eq!(revokes_of(&env, from, &lost), 1);
    assert!(!actions(&policy(&name)).contains_key(&lost));

    // Refused before it takes effect (503, which a write cannot tell from a lost answer): tried again once per listing, never more, until it
    // goes through.
    admin
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
    let from = last_seq(&env);
    let failing = grant_by_hand(&kms, &key, "someone", None).await;
    // (The emulator logs an injected error without the request's IDs: count every revoke, this
    // is the only grant to revoke.)
    let revokes = |after| {
        writes(&env, after)
            .iter()
            .filter(|(op, _)| op == "revoke-grant")
            .count()
    };
    eventually(
        "the revoke is retried at a later listing",
        Duration::from_secs(60),
        async || revokes(from) >= 2,
    )
    .await;
    eventually("the status says so", Duration::from_secs(30), async || {
        actions(&policy(&name)).get(&failing).map(String::as_str) == Some("RevokeUnconfirmed")
    })
    .await;
    for pass in passes(&env, last_seq(&env), 2).await {
        let revokes: usize = pass
            .iter()
            .filter(|((op, _), _)| op == "revoke-grant")
            .map(|(_, n)| n)
            .sum();
        assert_eq!(revokes, 1, "one revoke per listing: {pass:?}");
    }
    admin.set_faults(FaultSettings::default()).unwrap();
    eventually("it goes through", Duration::from_secs(60), async || {
        !on_key(&env, &key).contains(&failing)
    })
    .await;

    // More than one pass's worth: every grant goes, with exactly one revoke each.
    let from = last_seq(&env);
    let many: BTreeSet<String> =
        futures::future::join_all((0..12).map(|_| grant_by_hand(&kms, &key, "someone", None)))
            .await
            .into_iter()
            .collect();
    eventually(
        "all twelve are revoked",
        Duration::from_secs(60),
        async || on_key(&env, &key).is_empty(),
    )
    .await;
    for id in &many {
        assert_eq!(revokes_of(&env, from, id), 1, "{id}");
    }
    eventually("the count follows", Duration::from_secs(60), async || {
        // The grant whose answer was lost is not counted: the operator never learnt it worked.
        policy(&name)["status"]["revokedGrants"] == 13
    })
    .await;
    kubectl_ok(&["delete", "kmskeypolicies.kmsgrant.io", &name], None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn revokes_wait_for_the_provider_configs_rate_limit() {
    let mut env = Env::new("exclusive-paced", EmulatorConfig::for_tests(), RESYNC).await;
    let key = env.new_key("exclusive-paced");
    // Two requests a second, no burst beyond one: eight revokes cannot take less than 3.5 s.
    env.apply(&env.provider_config(json!({"rateLimit": {"requestsPerSecond": 2, "burst": 1}})));
    let kms = kms_client(&env);
    let from = last_seq(&env);
    let made: BTreeSet<String> =
        futures::future::join_all((0..8).map(|_| grant_by_hand(&kms, &key, "someone", None)))
            .await
            .into_iter()
            .collect();
    let port = free_port();
    env.operator = Some(Operator::start_with(
        &env.namespace,
        RESYNC,
        &["--admin-address", &format!("127.0.0.1:{port}")],
    ));
    let name = format!("{}-keypolicy", env.namespace);
    env.apply(&key_policy(
        &env,
        &name,
        &key,
        json!({"undeclaredGrants": "Revoke"}),
    ));
    eventually(
        "all eight are revoked",
        Duration::from_secs(90),
        async || on_key(&env, &key).is_empty(),
    )
    .await;
    let revokes: Vec<u64> = env
        .emulator
        .admin()
        .calls(from)
        .into_iter()
        .filter(|c| c.operation == "revoke-grant")
        .map(|c| c.at_ms)
        .collect();
    assert_eq!(revokes.len(), made.len(), "one revoke each");
    // A lower bound only: the limiter makes the revokes at least this slow, never faster.
    let span = revokes.last().unwrap() - revokes.first().unwrap();
    assert!(span >= 3000, "eight revokes in {span} ms at 2/s");
    let waited = series(
        &metrics(port).await,
        "kmsgrant_kms_throttle_wait_seconds_total",
    );
    assert!(waited.is_some_and(|s| s > 0.0), "{waited:?}");
    kubectl_ok(&["delete", "kmskeypolicies.kmsgrant.io", &name], None);
}
