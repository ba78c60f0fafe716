//! What platform teams install: the kustomize tree `deploy/`, the Helm chart
//! `charts/kmsgrant-operator/` (rendered by the helm that `scripts/helm` builds) and the RBAC they
//! carry, checked against the real local API server; and the operator running with nothing but
//! that RBAC.

mod support;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use kms_emulator::EmulatorConfig;
use serde_json::{Value, json};
use support::{
    Env, OPERATOR_BIN, REPO, TEST_LABEL, eventually, install_crds, kubectl, kubectl_ok, namespace,
};

const OPERATOR_NAMESPACE: &str = "kmsgrant-system";
const SERVICE_ACCOUNT: &str = "system:serviceaccount:kmsgrant-system:kmsgrant-operator";
const CHART: &str = "charts/kmsgrant-operator";

fn repo(path: &str) -> String {
    Path::new(REPO).join(path).to_str().unwrap().to_owned()
}

/// Runs the project's helm (built from source on first use by `scripts/helm`).
fn helm(args: &[&str]) -> Output {
    Command::new(repo("scripts/helm"))
        .args(args)
        .current_dir(REPO)
        .stdin(Stdio::null())
        .output()
        .expect("cannot run scripts/helm")
}

fn helm_ok(args: &[&str]) -> String {
    let out = helm(args);
    assert!(
        out.status.success(),
        "helm {} failed:\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The objects of a multi-document YAML stream (empty documents dropped).
fn objects(yaml: &str) -> Vec<Value> {
    serde_saphyr::from_str_multiple::<Value, Vec<Value>>(yaml)
        .expect("rendered YAML parses")
        .into_iter()
        .filter(|object| !object.is_null())
        .collect()
}

fn kinds(objects: &[Value]) -> Vec<String> {
    objects
        .iter()
        .map(|o| o["kind"].as_str().unwrap().to_owned())
        .collect()
}

fn find<'a>(objects: &'a [Value], kind: &str) -> Vec<&'a Value> {
    objects.iter().filter(|o| o["kind"] == kind).collect()
}

fn one<'a>(objects: &'a [Value], kind: &str) -> &'a Value {
    let found = find(objects, kind);
    assert_eq!(
        found.len(),
        1,
        "expected one {kind} in {:?}",
        kinds(objects)
    );
    found[0]
}

/// `kubectl apply --dry-run=server` of these objects; fails the test with kubectl's message, and
/// also when the API server warns that the pod template breaks the namespace's Pod Security level.
fn apply_dry_run(objects: &[Value]) -> String {
    let list = json!({"apiVersion": "v1", "kind": "List", "items": objects});
    let out = kubectl(
        &["apply", "--dry-run=server", "-f", "-"],
        Some(&list.to_string()),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "server dry run failed: {stderr}");
    assert!(
        !stderr.contains("PodSecurity"),
        "the pod template breaks the restricted Pod Security Standard: {stderr}"
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The operator's namespace, created for real from `deploy/operator/namespace.yaml` (with its
/// restricted Pod Security labels) — see `kustomize_tree_applies_cleanly_with_server_side_dry_run`.
fn operator_namespace() {
    static CREATED: OnceLock<()> = OnceLock::new();
    CREATED.get_or_init(|| {
        // Server-side apply creates or updates in one call, so concurrent tests cannot race.
        kubectl_ok(
            &[
                "apply",
                "--server-side",
                "-f",
                &repo("deploy/operator/namespace.yaml"),
            ],
            None,
        );
    });
}

/// Tests that apply the operator's objects in its namespace, for real or as a server dry run,
/// take turns: a dry run that finds the ServiceAccount missing plans a create, which fails with
/// AlreadyExists when another test has just created it for real.
fn operator_namespace_turn() -> std::sync::MutexGuard<'static, ()> {
    static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());
    TURN.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn container(deployment: &Value) -> &Value {
    &deployment["spec"]["template"]["spec"]["containers"][0]
}

fn args(deployment: &Value) -> Vec<String> {
    container(deployment)["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_owned())
        .collect()
}

/// The hardening the issue asks for, stated once for every way of installing.
fn assert_hardened(deployment: &Value) {
    let pod = &deployment["spec"]["template"]["spec"];
    let c = container(deployment);
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(pod["securityContext"]["runAsUser"], 65532);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(c["securityContext"]["capabilities"]["drop"], json!(["ALL"]));
    for kind in ["requests", "limits"] {
        for resource in ["cpu", "memory"] {
            assert!(
                c["resources"][kind][resource].is_string(),
                "no {kind}.{resource}"
            );
        }
    }
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["livenessProbe"]["httpGet"]["port"], "admin");
    assert_eq!(c["readinessProbe"]["httpGet"]["port"], "admin");
    assert_eq!(c["ports"][0]["name"], "admin");
    // The credentials Secret and the Lease are looked for in the pod's own namespace, and the
    // pod's name (--pod-name) is the leader election identity and the instance named in events.
    assert_eq!(
        c["env"][0],
        json!({"name": "KMSGRANT_POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}})
    );
    assert_eq!(
        c["env"][1],
        json!({"name": "KMSGRANT_POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}})
    );
    assert!(args(deployment).contains(&"--secret-namespace=$(KMSGRANT_POD_NAMESPACE)".to_owned()));
}

/// Deleting a CRD deletes every KmsGrant (and a running operator revokes their grants): Argo CD
/// and Flux must not prune or delete the CRDs by themselves.
fn assert_gitops_tools_keep(crd: &Value) {
    let annotations = &crd["metadata"]["annotations"];
    assert_eq!(
        annotations["argocd.argoproj.io/sync-options"],
        "Delete=false,Prune=false"
    );
    assert_eq!(annotations["kustomize.toolkit.fluxcd.io/prune"], "disabled");
}

#[test]
fn kustomize_tree_applies_cleanly_with_server_side_dry_run() {
    let _turn = operator_namespace_turn();
    // A server dry run persists nothing, so the Namespace that `kubectl apply -k deploy/` creates
    // first does not exist for the namespaced objects after it, and they would fail with
    // NotFound. Creating that one object for real (from the tree's own namespace.yaml, as the real
    // apply would) lets the dry run check everything else; the Namespace itself is still part of
    // the dry run. Its restricted Pod Security labels make the API server warn about any pod
    // template that breaks them, which apply_dry_run turns into a failure.
    operator_namespace();
    let rendered = objects(&kubectl_ok(&["kustomize", &repo("deploy")], None));
    let out = kubectl(&["apply", "-k", &repo("deploy"), "--dry-run=server"], None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "apply -k deploy/ failed: {stderr}");
    assert!(!stderr.contains("PodSecurity"), "{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    for object in &rendered {
        let name = object["metadata"]["name"].as_str().unwrap();
        assert!(
            stdout.contains(&format!("/{name} ")) && stdout.contains("(server dry run)"),
            "{} {name} missing from the dry run:\n{stdout}",
            object["kind"]
        );
    }

    let mut found = kinds(&rendered);
    found.sort();
    assert_eq!(
        found,
        [
            "ClusterRole",
            "ClusterRole",
            "ClusterRole",
            "ClusterRole",
            "ClusterRole",
            "ClusterRoleBinding",
            "CustomResourceDefinition",
            "CustomResourceDefinition",
            "CustomResourceDefinition",
            "CustomResourceDefinition",
            "Deployment",
            "Namespace",
            "PodDisruptionBudget",
            "Role",
            "RoleBinding",
            "Service",
            "ServiceAccount",
            "ValidatingAdmissionPolicy",
            "ValidatingAdmissionPolicyBinding"
        ]
    );
    for crd in find(&rendered, "CustomResourceDefinition") {
        assert_gitops_tools_keep(crd);
    }
    let deployment = one(&rendered, "Deployment");
    assert_hardened(deployment);
    assert_eq!(deployment["spec"]["replicas"], 2);
    let args = args(deployment);
    for flag in ["--leader-election", "--log-format=json"] {
        assert!(args.contains(&flag.to_owned()), "{flag} not in {args:?}");
    }
    assert_eq!(
        one(&rendered, "Service")["spec"]["ports"][0]["name"],
        "metrics"
    );
}

/// The chart and the kustomize tree ship the same guardrails at admission (tests/admission.rs
/// runs them against the API server): the chart's file is a byte-for-byte copy, and the rendered
/// objects differ only in their labels.
#[test]
fn chart_and_kustomize_tree_ship_the_same_admission_policy() {
    let shipped = std::fs::read_to_string(repo("deploy/admission/guardrails.yaml")).unwrap();
    let copy =
        std::fs::read_to_string(repo(&format!("{CHART}/files/admission/guardrails.yaml"))).unwrap();
    assert!(
        shipped == copy,
        "{CHART}/files/admission/guardrails.yaml differs: cp deploy/admission/guardrails.yaml {CHART}/files/admission/"
    );
    let chart = objects(&helm_ok(&[
        "template",
        "kmsgrant-operator",
        CHART,
        "--namespace",
        OPERATOR_NAMESPACE,
    ]));
    let tree = objects(&kubectl_ok(&["kustomize", &repo("deploy")], None));
    for kind in [
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
    ] {
        let (chart, tree) = (one(&chart, kind), one(&tree, kind));
        assert_eq!(chart["metadata"]["name"], "kmsgrant-guardrails");
        assert_eq!(chart["metadata"]["name"], tree["metadata"]["name"]);
        assert_eq!(chart["spec"], tree["spec"], "{kind}");
        assert_eq!(
            chart["metadata"]["labels"]["app.kubernetes.io/managed-by"],
            "Helm"
        );
    }
    // Evaluated by the API server itself: the operator's RBAC has no rights on them.
    for role in find(&tree, "ClusterRole")
        .into_iter()
        .chain(find(&tree, "Role"))
    {
        assert!(
            !role.to_string().contains("admissionregistration"),
            "{role}"
        );
    }
}

/// ValidatingAdmissionPolicy v1 is GA in Kubernetes 1.30; the chart supports 1.29. There the
/// chart says which value to turn off instead of failing on an unknown kind at install time.
#[test]
fn helm_chart_needs_kubernetes_1_30_for_the_admission_policy() {
    let out = helm(&["template", "k", CHART, "--kube-version", "1.29.5"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "rendered on 1.29");
    assert!(
        stderr.contains("admissionPolicy.enabled") && stderr.contains("1.30"),
        "{stderr}"
    );
    let rendered = objects(&helm_ok(&[
        "template",
        "k",
        CHART,
        "--kube-version",
        "1.29.5",
        "--set",
        "admissionPolicy.enabled=false",
    ]));
    assert!(find(&rendered, "ValidatingAdmissionPolicy").is_empty());
    let rendered = objects(&helm_ok(&[
        "template",
        "k",
        CHART,
        "--kube-version",
        "1.30.0",
    ]));
    one(&rendered, "ValidatingAdmissionPolicyBinding");
}

/// The chart's copies of the CRDs are the generated ones (`crds/`), byte for byte.
#[test]
fn chart_carries_the_generated_crds() {
    for name in [
        "kmsgrants.kmsgrant.io.yaml",
        "kmsproviderconfigs.kmsgrant.io.yaml",
        "kmskeypolicies.kmsgrant.io.yaml",
        "kmsnamespacedproviderconfigs.kmsgrant.io.yaml",
    ] {
        let generated = std::fs::read_to_string(repo(&format!("crds/{name}"))).unwrap();
        let copy = std::fs::read_to_string(repo(&format!("{CHART}/files/crds/{name}"))).unwrap();
        assert!(
            generated == copy,
            "{CHART}/files/crds/{name} differs from crds/{name}: cp crds/*.kmsgrant.io.yaml {CHART}/files/crds/"
        );
    }
}

const NON_DEFAULT_VALUES: &str = "\
replicas: 3
logLevel: kmsgrant=debug,info
logFormat: text
labelSelector: shard=a
resyncInterval: 1m
concurrency: 4
image: {repository: registry.example.com/kmsgrant-operator, tag: 9.9.9, pullPolicy: Always}
resources:
  requests: {cpu: 100m, memory: 128Mi}
  limits: {cpu: '1', memory: 512Mi}
metrics: {port: 9090}
serviceMonitor: {enabled: true, interval: 15s, labels: {release: prometheus}}
crds: {install: false}
leaderElection: {leaseName: shard-a, leaseDuration: 20s}
appRoles: {create: false}
admissionPolicy: {enabled: false}
tenants: {maxObjectsPerNamespace: 25}
";

#[test]
fn helm_lint_passes_with_default_and_non_default_values() {
    helm_ok(&["lint", "--strict", CHART]);
    let values = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        values.path(),
        format!("{NON_DEFAULT_VALUES}watchNamespace: team-a\n"),
    )
    .unwrap();
    helm_ok(&[
        "lint",
        "--strict",
        CHART,
        "-f",
        values.path().to_str().unwrap(),
    ]);
}

#[test]
fn helm_chart_with_default_values_applies_cleanly_with_server_side_dry_run() {
    let _turn = operator_namespace_turn();
    operator_namespace();
    let rendered = objects(&helm_ok(&[
        "template",
        "kmsgrant-operator",
        CHART,
        "--namespace",
        OPERATOR_NAMESPACE,
    ]));
    apply_dry_run(&rendered);

    let mut found = kinds(&rendered);
    found.sort();
    assert_eq!(
        found,
        [
            "ClusterRole",
            "ClusterRole",
            "ClusterRole",
            "ClusterRole",
            "ClusterRole",
            "ClusterRoleBinding",
            "CustomResourceDefinition",
            "CustomResourceDefinition",
            "CustomResourceDefinition",
            "CustomResourceDefinition",
            "Deployment",
            "PodDisruptionBudget",
            "Role",
            "RoleBinding",
            "Service",
            "ServiceAccount",
            "ValidatingAdmissionPolicy",
            "ValidatingAdmissionPolicyBinding"
        ],
        "no ServiceMonitor unless asked for"
    );
    for crd in find(&rendered, "CustomResourceDefinition") {
        assert_eq!(
            crd["metadata"]["annotations"]["helm.sh/resource-policy"], "keep",
            "helm uninstall must not delete the CRDs (and with them every KmsGrant)"
        );
        assert_gitops_tools_keep(crd);
    }
    let deployment = one(&rendered, "Deployment");
    assert_hardened(deployment);
    assert_eq!(deployment["spec"]["replicas"], 2);
    assert_eq!(
        container(deployment)["image"],
        format!(
            "ghcr.io/kmsgrant/kmsgrant-operator:{}",
            env!("CARGO_PKG_VERSION")
        )
    );
    let args = args(deployment);
    for flag in [
        "--leader-election",
        "--lease-name=kmsgrant-operator",
        "--log-format=json",
        "--admin-address=0.0.0.0:8080",
        "--tenant-max-objects-per-namespace=0",
    ] {
        assert!(args.contains(&flag.to_owned()), "{flag} not in {args:?}");
    }
    assert!(!args.iter().any(|a| a.starts_with("--namespace")));
    // The chart's RBAC is the kustomize tree's RBAC, the application teams' roles included.
    let kustomized = objects(&kubectl_ok(&["kustomize", &repo("deploy")], None));
    for (kind, name) in [
        ("ClusterRole", "kmsgrant-operator"),
        ("ClusterRole", "kmsgrant-edit"),
        ("ClusterRole", "kmsgrant-view"),
        ("Role", "kmsgrant-operator"),
    ] {
        let (chart, tree) = (named(&rendered, kind, name), named(&kustomized, kind, name));
        assert_eq!(
            rules_by_resource(chart),
            rules_by_resource(tree),
            "{kind} {name} differs between chart and deploy/"
        );
        for (label, value) in tree["metadata"]["labels"].as_object().into_iter().flatten() {
            if label.starts_with("rbac.authorization.k8s.io/") {
                assert_eq!(
                    &chart["metadata"]["labels"][label], value,
                    "{name}: {label}"
                );
            }
        }
    }
}

fn named<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in {:?}", kinds(objects)))
}

/// (resource, resourceNames) -> sorted verbs, to compare rules however they are grouped.
fn rules_by_resource(role: &Value) -> std::collections::BTreeMap<String, Vec<String>> {
    let mut rules = std::collections::BTreeMap::new();
    for rule in role["rules"].as_array().unwrap() {
        for group in rule["apiGroups"].as_array().unwrap() {
            for resource in rule["resources"].as_array().unwrap() {
                let key = format!(
                    "{}/{} {}",
                    group.as_str().unwrap(),
                    resource.as_str().unwrap(),
                    rule["resourceNames"]
                );
                let verbs: &mut Vec<String> = rules.entry(key).or_default();
                verbs.extend(
                    rule["verbs"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|v| v.as_str().unwrap().to_owned()),
                );
                verbs.sort();
            }
        }
    }
    rules
}

#[test]
fn helm_chart_with_non_default_values_applies_cleanly_with_server_side_dry_run() {
    let _turn = operator_namespace_turn();
    install_crds(); // crds.install is off here: the CRDs come first, as the docs say.
    let release_namespace = namespace("helm-release");
    kubectl_ok(
        &[
            "label",
            "namespace",
            &release_namespace,
            "pod-security.kubernetes.io/warn=restricted",
        ],
        None,
    );
    let watched = namespace("helm-watched");
    let values = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        values.path(),
        format!("{NON_DEFAULT_VALUES}watchNamespace: {watched}\n"),
    )
    .unwrap();
    let rendered = objects(&helm_ok(&[
        "template",
        "shard-a",
        CHART,
        "--namespace",
        &release_namespace,
        "-f",
        values.path().to_str().unwrap(),
    ]));

    // The ServiceMonitor is rendered; its CRD (Prometheus Operator) is not installed here, so it
    // is checked by shape and everything else by the API server.
    let monitor = one(&rendered, "ServiceMonitor");
    assert_eq!(monitor["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(monitor["metadata"]["labels"]["release"], "prometheus");
    assert_eq!(
        monitor["spec"]["endpoints"],
        json!([{"port": "metrics", "path": "/metrics", "interval": "15s", "scrapeTimeout": "10s", "honorLabels": true}])
    );
    let service = one(&rendered, "Service");
    for (label, value) in monitor["spec"]["selector"]["matchLabels"]
        .as_object()
        .unwrap()
    {
        assert_eq!(
            &service["metadata"]["labels"][label], value,
            "the ServiceMonitor does not select the metrics Service"
        );
    }
    assert_eq!(service["spec"]["ports"][0]["port"], 9090);
    let rest: Vec<Value> = rendered
        .iter()
        .filter(|o| o["kind"] != "ServiceMonitor")
        .cloned()
        .collect();
    apply_dry_run(&rest);

    assert!(
        find(&rendered, "CustomResourceDefinition").is_empty(),
        "crds.install: false"
    );
    assert!(
        find(&rendered, "ValidatingAdmissionPolicy").is_empty()
            && find(&rendered, "ValidatingAdmissionPolicyBinding").is_empty(),
        "admissionPolicy.enabled: false"
    );
    let deployment = one(&rendered, "Deployment");
    assert_hardened(deployment);
    assert_eq!(deployment["spec"]["replicas"], 3);
    assert_eq!(
        container(deployment)["image"],
        "registry.example.com/kmsgrant-operator:9.9.9"
    );
    assert_eq!(container(deployment)["imagePullPolicy"], "Always");
    assert_eq!(
        container(deployment)["resources"]["limits"]["memory"],
        "512Mi"
    );
    assert_eq!(container(deployment)["ports"][0]["containerPort"], 9090);
    let args = args(deployment);
    for flag in [
        "--log-level=kmsgrant=debug,info".to_owned(),
        "--log-format=text".to_owned(),
        format!("--namespace={watched}"),
        "--label-selector=shard=a".to_owned(),
        "--resync-interval=1m".to_owned(),
        "--concurrency=4".to_owned(),
        "--admin-address=0.0.0.0:9090".to_owned(),
        "--leader-election".to_owned(),
        "--lease-name=shard-a".to_owned(),
        "--lease-duration=20s".to_owned(),
        "--tenant-max-objects-per-namespace=25".to_owned(),
    ] {
        assert!(args.contains(&flag), "{flag} not in {args:?}");
    }

    // Watching one namespace, the rights on KmsGrants and Events are confined to it.
    let cluster_rules = rules_by_resource(one(&rendered, "ClusterRole"));
    assert!(
        !cluster_rules
            .keys()
            .any(|k| k.contains("kmsgrants") || k.contains("events")),
        "{cluster_rules:?}"
    );
    let roles = find(&rendered, "Role");
    let grant_role = roles
        .iter()
        .find(|r| r["metadata"]["namespace"] == watched.as_str())
        .expect("a Role in the watched namespace");
    let grant_rules = rules_by_resource(grant_role);
    assert!(grant_rules.contains_key("kmsgrant.io/kmsgrants null"));
    assert!(grant_rules.contains_key("events.k8s.io/events null"));
    let own_role = roles
        .iter()
        .find(|r| r["metadata"]["namespace"] == release_namespace.as_str())
        .expect("a Role in the release namespace");
    assert!(rules_by_resource(own_role).contains_key(r#"coordination.k8s.io/leases ["shard-a"]"#));
    assert!(
        find(&rendered, "PodDisruptionBudget").len() == 1,
        "several replicas get a PodDisruptionBudget"
    );
}

#[test]
fn helm_chart_refuses_several_replicas_without_leader_election() {
    let out = helm(&[
        "template",
        "x",
        CHART,
        "--set",
        "replicas=2,leaderElection.enabled=false",
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("needs leaderElection.enabled"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The RBAC objects of `deploy/`, applied for real, and a kubeconfig that authenticates with a
/// token of the operator's ServiceAccount (as in a pod).
fn service_account_kubeconfig(dir: &Path) -> std::path::PathBuf {
    static RBAC: OnceLock<()> = OnceLock::new();
    RBAC.get_or_init(|| {
        let _turn = operator_namespace_turn();
        install_crds();
        operator_namespace();
        let rbac: Vec<Value> = objects(&kubectl_ok(&["kustomize", &repo("deploy")], None))
            .into_iter()
            .filter(|o| {
                [
                    "ServiceAccount",
                    "ClusterRole",
                    "ClusterRoleBinding",
                    "Role",
                    "RoleBinding",
                ]
                .contains(&o["kind"].as_str().unwrap())
            })
            .collect();
        assert_eq!(rbac.len(), 9);
        let list = json!({"apiVersion": "v1", "kind": "List", "items": rbac});
        kubectl_ok(
            &["apply", "--server-side", "--force-conflicts", "-f", "-"],
            Some(&list.to_string()),
        );
    });
    let token = kubectl_ok(
        &[
            "create",
            "token",
            "kmsgrant-operator",
            "-n",
            OPERATOR_NAMESPACE,
            "--duration=1h",
        ],
        None,
    );
    let admin: Value =
        serde_saphyr::from_str(&std::fs::read_to_string(support::kubeconfig()).unwrap()).unwrap();
    let cluster = &admin["clusters"][0]["cluster"];
    let kubeconfig = json!({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "local", "cluster": cluster}],
        "users": [{"name": "kmsgrant-operator", "user": {"token": token.trim()}}],
        "contexts": [{"name": "operator", "context": {"cluster": "local", "user": "kmsgrant-operator"}}],
        "current-context": "operator"
    });
    let path = dir.join("operator-kubeconfig");
    std::fs::write(&path, kubeconfig.to_string()).unwrap();
    path
}

/// kubectl as the operator's ServiceAccount.
fn kubectl_as_operator(kubeconfig: &Path, args: &[&str]) -> Output {
    Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("kubectl must be installed")
}

/// `kmsgrant-operator run` with the ServiceAccount's kubeconfig; killed on drop.
struct OperatorAsServiceAccount {
    child: std::process::Child,
    log: std::path::PathBuf,
}

impl OperatorAsServiceAccount {
    fn start(kubeconfig: &Path, env: &Env, log: std::path::PathBuf) -> Self {
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(OPERATOR_BIN)
            .args(["run", "--kubeconfig", kubeconfig.to_str().unwrap()])
            .args(["--allow-http-endpoints", "--resync-interval", "5s"])
            .args(["--backoff-min", "200ms", "--backoff-max", "5s"])
            .args(["--namespace", &env.namespace])
            .args(["--secret-namespace", OPERATOR_NAMESPACE])
            .args([
                "--label-selector",
                &format!("{TEST_LABEL}={}", env.namespace),
            ])
            .args(["--log-level", "kmsgrant=debug,info"])
            // As in the Deployment: leader election on the Lease the Role lets it renew, so the
            // Lease rules are exercised too, and an admin server off the shared default port.
            // (Set as variables: a build without these flags ignores them.)
            .env("KMSGRANT_LEADER_ELECTION", "true")
            .env("KMSGRANT_LEASE_NAME", "kmsgrant-operator")
            .env("KMSGRANT_LEASE_NAMESPACE", OPERATOR_NAMESPACE)
            .env("KMSGRANT_ADMIN_ADDRESS", "127.0.0.1:0")
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("the operator starts");
        Self { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for OperatorAsServiceAccount {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_for(operator: &OperatorAsServiceAccount, namespace: &str, object: &str, condition: &str) {
    let mut args = vec!["wait", "--timeout=60s"];
    let condition = format!("--for={condition}");
    args.push(&condition);
    if !namespace.is_empty() {
        args.extend(["-n", namespace]);
    }
    args.push(object);
    let out = kubectl(&args, None);
    assert!(
        out.status.success(),
        "{object} never reached {condition}: {}\noperator log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        operator.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_with_only_the_shipped_rbac_converges_and_revokes_a_grant() {
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = service_account_kubeconfig(dir.path());
    let env = Env::new("rbac", EmulatorConfig::for_tests(), "5s").await;

    // The ServiceAccount reads Secrets only in its own namespace, so the credentials live there,
    // and the provider config's namespaceSelector makes it read the grant's Namespace too.
    let secret_name = format!("kms-credentials-{}", env.namespace);
    env.apply(&json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": secret_name, "namespace": OPERATOR_NAMESPACE},
        "stringData": {
            "accessKey": env.emulator.config().access_key,
            "secretKey": env.emulator.config().secret_key.as_str(),
        }
    }));
    env.apply(&env.provider_config(json!({
        "auth": {"type": "AccessKey", "secretRef": {"namespace": OPERATOR_NAMESPACE, "name": secret_name}},
        "namespaceSelector": {"matchLabels": {TEST_LABEL: env.namespace}},
    })));
    let key = env.new_key("rbac");

    let operator =
        OperatorAsServiceAccount::start(&kubeconfig, &env, dir.path().join("operator.log"));
    wait_for(
        &operator,
        "",
        &format!("kmsproviderconfig/{}", env.provider),
        "condition=Ready",
    );
    env.apply(&env.grant("app", &key, json!({})));
    wait_for(&operator, &env.namespace, "kmsgrant/app", "condition=Ready");

    let object = env.get("app");
    let grant_id = object["status"]["grantId"].as_str().unwrap().to_owned();
    assert_eq!(
        object["metadata"]["finalizers"],
        json!(["kmsgrant.io/grant"])
    );
    assert!(
        env.emulator
            .admin()
            .dump()
            .grants
            .iter()
            .any(|g| g.grant_id == grant_id)
    );
    // Events are the only thing a missing rule would not turn into a condition: look for them.
    eventually(
        "a GrantCreated event",
        Duration::from_secs(30),
        async || env.events().iter().any(|e| e["reason"] == "GrantCreated"),
    )
    .await;

    // Deleting revokes the grant on KMS and removes the finalizer: the object goes away.
    kubectl_ok(
        &[
            "delete",
            "-n",
            &env.namespace,
            "kmsgrant/app",
            "--timeout=60s",
        ],
        None,
    );
    assert!(
        !env.emulator
            .admin()
            .dump()
            .grants
            .iter()
            .any(|g| g.grant_id == grant_id),
        "the grant was not revoked; operator log:\n{}",
        operator.log()
    );
    assert!(
        !operator.log().to_lowercase().contains("forbidden"),
        "the operator was refused something:\n{}",
        operator.log()
    );

    // The same token cannot read a Secret in another namespace (Env wrote one in its namespace).
    let out = kubectl_as_operator(
        &kubeconfig,
        &["get", "secret", "kms-credentials", "-n", &env.namespace],
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("forbidden"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn operator_service_account_has_exactly_the_rights_it_needs() {
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = service_account_kubeconfig(dir.path());
    // Asked with the ServiceAccount's own token (a SelfSubjectAccessReview), not by impersonation.
    let can = |args: &[&str]| -> bool {
        let mut all = vec!["auth", "can-i"];
        all.extend(args);
        let out = kubectl_as_operator(&kubeconfig, &all);
        match String::from_utf8_lossy(&out.stdout).trim() {
            "yes" => true,
            "no" => false,
            other => panic!(
                "kubectl auth can-i {}: {other} {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            ),
        }
    };
    let allowed: &[&[&str]] = &[
        &["watch", "kmsgrants.kmsgrant.io", "-A"],
        &["patch", "kmsgrants.kmsgrant.io", "-n", "team-a"],
        &[
            "patch",
            "kmsgrants.kmsgrant.io",
            "--subresource=status",
            "-n",
            "team-a",
        ],
        &["list", "kmsproviderconfigs.kmsgrant.io"],
        // Tenants' own configs: watched, finalizer, status.
        &["watch", "kmsnamespacedproviderconfigs.kmsgrant.io", "-A"],
        &[
            "patch",
            "kmsnamespacedproviderconfigs.kmsgrant.io",
            "-n",
            "team-a",
        ],
        &[
            "patch",
            "kmsnamespacedproviderconfigs.kmsgrant.io",
            "--subresource=status",
            "-n",
            "team-a",
        ],
        // The in-use finalizer of a KmsProviderConfig.
        &["patch", "kmsproviderconfigs.kmsgrant.io"],
        &[
            "patch",
            "kmsproviderconfigs.kmsgrant.io",
            "--subresource=status",
        ],
        &["watch", "kmskeypolicies.kmsgrant.io"],
        &[
            "patch",
            "kmskeypolicies.kmsgrant.io",
            "--subresource=status",
        ],
        &["get", "namespaces/team-a"],
        // namespaceSelector checks read labels from a watch of Namespaces (metadata only).
        &["list", "namespaces"],
        &["watch", "namespaces"],
        &["create", "events.events.k8s.io", "-n", "team-a"],
        &["patch", "events.events.k8s.io", "-n", "team-a"],
        &["watch", "secrets", "-n", OPERATOR_NAMESPACE],
        &[
            "create",
            "leases.coordination.k8s.io",
            "-n",
            OPERATOR_NAMESPACE,
        ],
        &[
            "update",
            "leases.coordination.k8s.io/kmsgrant-operator",
            "-n",
            OPERATOR_NAMESPACE,
        ],
        // Storage migration to v1beta1 (docs/versioning.md): its own three CRDs only, and a key
        // policy's managedFields rewritten on the object.
        &[
            "get",
            "customresourcedefinitions.apiextensions.k8s.io/kmsgrants.kmsgrant.io",
        ],
        &[
            "patch",
            "customresourcedefinitions.apiextensions.k8s.io/kmskeypolicies.kmsgrant.io",
            "--subresource=status",
        ],
        &["patch", "kmskeypolicies.kmsgrant.io"],
    ];
    let denied: &[&[&str]] = &[
        // Secrets only in its own namespace, and never written.
        &["get", "secrets", "-n", "team-a"],
        &["list", "secrets", "-A"],
        &["update", "secrets", "-n", OPERATOR_NAMESPACE],
        // KmsGrants and provider configs belong to people: never created or deleted (patched only
        // for finalizers). A tenant's Secrets and ServiceAccount tokens only where the tenant
        // bound kmsgrant-tenant-credentials (docs/tenants.md).
        &[
            "create",
            "kmsnamespacedproviderconfigs.kmsgrant.io",
            "-n",
            "team-a",
        ],
        &["create", "serviceaccounts/token", "-n", "team-a"],
        &["create", "kmsgrants.kmsgrant.io", "-n", "team-a"],
        &["update", "kmsgrants.kmsgrant.io", "-n", "team-a"],
        &["delete", "kmsgrants.kmsgrant.io", "-n", "team-a"],
        &["update", "kmsproviderconfigs.kmsgrant.io"],
        &["delete", "kmsproviderconfigs.kmsgrant.io"],
        // KmsKeyPolicies belong to people too: the operator writes their status (and patches
        // them only to move managedFields to v1beta1).
        &["create", "kmskeypolicies.kmsgrant.io"],
        &["update", "kmskeypolicies.kmsgrant.io"],
        &["update", "customresourcedefinitions.apiextensions.k8s.io"],
        &[
            "patch",
            "customresourcedefinitions.apiextensions.k8s.io/certificates.cert-manager.io",
        ],
        &["list", "customresourcedefinitions.apiextensions.k8s.io"],
        &["update", "namespaces/team-a"],
        &["delete", "events.events.k8s.io", "-n", "team-a"],
        &["create", "events", "-n", "team-a"],
        // Only its own Lease, only in its own namespace.
        &[
            "update",
            "leases.coordination.k8s.io/someone-else",
            "-n",
            OPERATOR_NAMESPACE,
        ],
        &[
            "delete",
            "leases.coordination.k8s.io",
            "-n",
            OPERATOR_NAMESPACE,
        ],
        &["create", "leases.coordination.k8s.io", "-n", "team-a"],
        &["get", "configmaps", "-n", OPERATOR_NAMESPACE],
        &["create", "pods", "-n", OPERATOR_NAMESPACE],
    ];
    let mut wrong = Vec::new();
    for args in allowed {
        if !can(args) {
            wrong.push(format!("cannot {}", args.join(" ")));
        }
    }
    for args in denied {
        if can(args) {
            wrong.push(format!("can {}", args.join(" ")));
        }
    }
    assert!(wrong.is_empty(), "{SERVICE_ACCOUNT}: {wrong:#?}");
}

/// `values.schema.json` turns a typo into an error naming the key, in `helm lint` and in a real
/// `helm install` against the API server, instead of a value silently ignored.
#[test]
fn helm_values_schema_rejects_typos_in_lint_and_install() {
    let release_namespace = namespace("helm-schema");
    let release = format!("schema-{}", std::process::id());
    let kubeconfig = support::kubeconfig().to_str().unwrap().to_owned();
    let typos: &[(&str, &str)] = &[
        ("replica=3", "replica"),
        ("image.tagg=1.0", "tagg"),
        ("logFormat=yaml", "logFormat"),
        ("metrics.port=http", "port"),
        ("resyncInterval=soon", "resyncInterval"),
    ];
    for (set, key) in typos {
        let lint = helm(&["lint", CHART, "--set", set]);
        let stderr = format!(
            "{}{}",
            String::from_utf8_lossy(&lint.stdout),
            String::from_utf8_lossy(&lint.stderr)
        );
        assert!(!lint.status.success(), "helm lint accepted {set}");
        assert!(
            stderr.contains(key),
            "helm lint --set {set} does not name {key}: {stderr}"
        );

        let install = helm(&[
            "install",
            &release,
            CHART,
            "--namespace",
            &release_namespace,
            "--kubeconfig",
            &kubeconfig,
            "--set",
            "crds.install=false,appRoles.create=false",
            "--set",
            set,
        ]);
        let stderr = String::from_utf8_lossy(&install.stderr);
        assert!(!install.status.success(), "helm install accepted {set}");
        assert!(
            stderr.contains("schema") && stderr.contains(key),
            "helm install --set {set}: {stderr}"
        );
    }
    // Nothing was installed, and the same install without the typo passes the API server.
    let out = helm(&[
        "install",
        &release,
        CHART,
        "--namespace",
        &release_namespace,
        "--kubeconfig",
        &kubeconfig,
        "--set",
        "crds.install=false,appRoles.create=false",
        "--dry-run=server",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let releases = helm_ok(&[
        "list",
        "--namespace",
        &release_namespace,
        "--kubeconfig",
        &kubeconfig,
        "-q",
    ]);
    assert!(releases.trim().is_empty(), "{releases}");
}

/// The values platform teams expect: names, the ServiceAccount, security contexts (and the
/// OpenShift variant without a fixed UID), topology spread, priority class, an image digest, the
/// alerts and the dashboard.
#[test]
fn helm_chart_platform_values_render_and_apply_cleanly() {
    let _turn = operator_namespace_turn();
    operator_namespace();
    let values = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        values.path(),
        "\
fullnameOverride: kms-grants
serviceAccount: {annotations: {iam.example.com/role: kms-operator}}
image: {digest: 'sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef'}
openshift: true
podSecurityContext: {runAsNonRoot: true, runAsUser: 65532, seccompProfile: {type: RuntimeDefault}, fsGroup: 65532}
containerSecurityContext:
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  runAsNonRoot: true
  capabilities: {drop: [ALL]}
topologySpreadConstraints:
  - {maxSkew: 1, topologyKey: topology.kubernetes.io/zone, whenUnsatisfiable: ScheduleAnyway}
priorityClassName: system-cluster-critical
appRoles: {create: false}
crds: {install: false}
metrics: {perObject: true}
prometheusRule:
  enabled: true
  labels: {release: prometheus}
  additionalAlertLabels: {team: platform}
  runbookBaseUrl: https://wiki.example.com/kmsgrant
grafanaDashboard: {enabled: true, namespace: monitoring, annotations: {grafana_folder: Platform}}
",
    )
    .unwrap();
    let rendered = objects(&helm_ok(&[
        "template",
        "kmsgrant-operator",
        CHART,
        "--namespace",
        OPERATOR_NAMESPACE,
        "-f",
        values.path().to_str().unwrap(),
    ]));
    let deployment = one(&rendered, "Deployment");
    assert_eq!(deployment["metadata"]["name"], "kms-grants");
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "kms-grants");
    // OpenShift's restricted SCC assigns the UID: none is fixed, the rest stays hardened.
    assert_eq!(
        pod["securityContext"],
        json!({"runAsNonRoot": true, "seccompProfile": {"type": "RuntimeDefault"}})
    );
    assert_eq!(
        container(deployment)["securityContext"]["readOnlyRootFilesystem"],
        true
    );
    assert_eq!(pod["priorityClassName"], "system-cluster-critical");
    assert_eq!(
        pod["topologySpreadConstraints"][0]["labelSelector"]["matchLabels"],
        deployment["spec"]["selector"]["matchLabels"],
        "a spread constraint without a selector gets the pods' own"
    );
    assert_eq!(
        container(deployment)["image"],
        "ghcr.io/kmsgrant/kmsgrant-operator@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
    );
    assert!(args(deployment).contains(&"--per-object-metrics".to_owned()));
    let account = one(&rendered, "ServiceAccount");
    assert_eq!(account["metadata"]["name"], "kms-grants");
    assert_eq!(
        account["metadata"]["annotations"]["iam.example.com/role"],
        "kms-operator"
    );
    for binding in find(&rendered, "ClusterRoleBinding")
        .into_iter()
        .chain(find(&rendered, "RoleBinding"))
    {
        assert_eq!(binding["subjects"][0]["name"], "kms-grants");
    }

    // The alerts: the rule file's groups, with the runbook base and the extra labels of the values.
    let rule = one(&rendered, "PrometheusRule");
    assert_eq!(rule["metadata"]["labels"]["release"], "prometheus");
    let shipped: Value = serde_saphyr::from_str(
        &std::fs::read_to_string(repo(&format!("{CHART}/files/alerts.yaml"))).unwrap(),
    )
    .unwrap();
    let rules = rule["spec"]["groups"][0]["rules"].as_array().unwrap();
    assert_eq!(
        rules.len(),
        shipped["groups"][0]["rules"].as_array().unwrap().len()
    );
    for (rendered_rule, shipped_rule) in rules
        .iter()
        .zip(shipped["groups"][0]["rules"].as_array().unwrap())
    {
        let alert = shipped_rule["alert"].as_str().unwrap();
        assert_eq!(rendered_rule["expr"], shipped_rule["expr"], "{alert}");
        assert_eq!(rendered_rule["labels"]["team"], "platform", "{alert}");
        assert_eq!(
            rendered_rule["labels"]["severity"],
            shipped_rule["labels"]["severity"]
        );
        assert_eq!(
            rendered_rule["annotations"]["runbook_url"],
            format!("https://wiki.example.com/kmsgrant#{}", alert.to_lowercase())
        );
    }
    let dashboard = one(&rendered, "ConfigMap");
    assert_eq!(dashboard["metadata"]["namespace"], "monitoring");
    assert_eq!(dashboard["metadata"]["labels"]["grafana_dashboard"], "1");
    assert_eq!(
        dashboard["metadata"]["annotations"]["grafana_folder"],
        "Platform"
    );
    let json: Value = serde_json::from_str(
        dashboard["data"]["kmsgrant-operator.json"]
            .as_str()
            .unwrap(),
    )
    .expect("the dashboard is JSON");
    assert_eq!(json["uid"], "kmsgrant-operator");

    // The API server takes everything but the PrometheusRule, whose CRD is not installed here, and
    // the ConfigMap, whose namespace does not exist; those two are checked by shape above.
    let rest: Vec<Value> = rendered
        .iter()
        .filter(|o| o["kind"] != "PrometheusRule" && o["kind"] != "ConfigMap")
        .cloned()
        .collect();
    apply_dry_run(&rest);
}

/// charts/kmsgrant-operator/README.md is what scripts/chart-readme makes of values.yaml.
#[test]
fn chart_readme_is_generated_from_the_values_comments() {
    let out = Command::new(repo("scripts/chart-readme"))
        .output()
        .expect("python3 runs scripts/chart-readme");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let generated = String::from_utf8(out.stdout).unwrap();
    let committed = std::fs::read_to_string(repo(&format!("{CHART}/README.md"))).unwrap();
    assert!(
        generated == committed,
        "{CHART}/README.md is stale: run scripts/chart-readme --write"
    );
    for value in [
        "image.digest",
        "openshift",
        "metrics.perObject",
        "topologySpreadConstraints",
    ] {
        assert!(
            generated.contains(&format!("| `{value}` |")),
            "{value} undocumented"
        );
    }
}

/// The Argo CD health check of docs/gitops.md: its argocd-cm, as written there, is a ConfigMap
/// the API server accepts, with one script for every kind of the group (`kmsgrant.io/*`), while
/// the per-kind key form cannot carry that wildcard.
#[test]
fn argo_cd_health_check_in_the_docs_covers_the_group_with_a_valid_config_map() {
    let docs = std::fs::read_to_string(repo("docs/gitops.md")).unwrap();
    let section = &docs[docs.find("## Argo CD").unwrap()..];
    let start = section.find("```yaml\n").unwrap() + "```yaml\n".len();
    let manifest = &section[start..start + section[start..].find("```").unwrap()];
    let mut config_map: Value = serde_saphyr::from_str(manifest).unwrap();
    let customizations: Value = serde_saphyr::from_str(
        config_map["data"]["resource.customizations"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    let script = customizations["kmsgrant.io/*"]["health.lua"]
        .as_str()
        .expect("one health script for kmsgrant.io/*");
    for word in [
        "Ready",
        "Stalled",
        "Reconciling",
        "observedGeneration",
        "Healthy",
        "Degraded",
    ] {
        assert!(script.contains(word), "the script does not look at {word}");
    }
    let ns = namespace("argocd");
    config_map["metadata"]["namespace"] = json!(ns);
    let out = kubectl(
        &["apply", "--dry-run=server", "-f", "-"],
        Some(&config_map.to_string()),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let wildcard_key = json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "argocd-cm", "namespace": ns},
        "data": {"resource.customizations.health.kmsgrant.io_*": script}
    });
    let out = kubectl(
        &["apply", "--dry-run=server", "-f", "-"],
        Some(&wildcard_key.to_string()),
    );
    assert!(!out.status.success(), "a ConfigMap key with * was accepted");
}

/// Aggregates `role`'s rules from the ClusterRoles its aggregationRule selects, as
/// kube-controller-manager's clusterrole-aggregation controller does in every cluster (the local
/// control plane runs no controller-manager, so the test does this one step itself; the selectors
/// are the built-in role's own, and the API server's RBAC authorizer decides every check below).
fn aggregate(role: &str) {
    let builtin: Value = serde_json::from_str(&kubectl_ok(
        &["get", "clusterrole", role, "-o", "json"],
        None,
    ))
    .unwrap();
    let mut rules: Vec<Value> = Vec::new();
    for selector in builtin["aggregationRule"]["clusterRoleSelectors"]
        .as_array()
        .unwrap_or_else(|| panic!("{role} has no aggregationRule"))
    {
        let labels: Vec<String> = selector["matchLabels"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| format!("{k}={}", v.as_str().unwrap()))
            .collect();
        let selected: Value = serde_json::from_str(&kubectl_ok(
            &["get", "clusterroles", "-l", &labels.join(","), "-o", "json"],
            None,
        ))
        .unwrap();
        for source in selected["items"].as_array().unwrap() {
            for rule in source["rules"].as_array().into_iter().flatten() {
                if !rules.contains(rule) {
                    rules.push(rule.clone());
                }
            }
        }
    }
    kubectl_ok(
        &[
            "patch",
            "clusterrole",
            role,
            "--type=merge",
            "-p",
            &json!({"rules": rules}).to_string(),
        ],
        None,
    );
}

/// An application team gets KmsGrants through the built-in roles: `edit` in its namespace may
/// create them there (and nowhere else) but no KmsProviderConfig; `view` may read but not write.
#[test]
fn builtin_edit_and_view_roles_carry_the_kmsgrant_roles() {
    install_crds();
    let app_roles: Vec<Value> = objects(&kubectl_ok(&["kustomize", &repo("deploy")], None))
        .into_iter()
        .filter(|o| o["kind"] == "ClusterRole" && o["metadata"]["name"] != "kmsgrant-operator")
        .collect();
    assert_eq!(app_roles.len(), 4);
    kubectl_ok(
        &["apply", "--server-side", "--force-conflicts", "-f", "-"],
        Some(&json!({"apiVersion": "v1", "kind": "List", "items": app_roles}).to_string()),
    );
    for role in ["admin", "edit", "view"] {
        aggregate(role);
    }

    let team = namespace("team");
    let other = namespace("other-team");
    let editor = format!("editor-{}", std::process::id());
    let viewer = format!("viewer-{}", std::process::id());
    kubectl_ok(
        &[
            "create",
            "rolebinding",
            "editors",
            "-n",
            &team,
            "--clusterrole=edit",
            "--user",
            &editor,
        ],
        None,
    );
    kubectl_ok(
        &[
            "create",
            "rolebinding",
            "viewers",
            "-n",
            &team,
            "--clusterrole=view",
            "--user",
            &viewer,
        ],
        None,
    );
    let can = |user: &str, args: &[&str]| -> bool {
        let mut all = vec!["auth", "can-i", "--as", user];
        all.extend(args);
        let out = kubectl(&all, None);
        match String::from_utf8_lossy(&out.stdout).trim() {
            "yes" => true,
            "no" => false,
            other => panic!(
                "can-i {}: {other} {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            ),
        }
    };
    let grants = "kmsgrants.kmsgrant.io";
    let configs = "kmsproviderconfigs.kmsgrant.io";
    let tenant_configs = "kmsnamespacedproviderconfigs.kmsgrant.io";
    let admin = format!("admin-{}", std::process::id());
    kubectl_ok(
        &[
            "create",
            "rolebinding",
            "admins",
            "-n",
            &team,
            "--clusterrole=admin",
            "--user",
            &admin,
        ],
        None,
    );
    let expectations: &[(&str, &[&str], bool)] = &[
        // A namespace's own provider configs are for its admins, like cert-manager Issuers.
        (&admin, &["create", tenant_configs, "-n", &team], true),
        (&admin, &["delete", tenant_configs, "-n", &team], true),
        (&admin, &["create", tenant_configs, "-n", &other], false),
        (
            &admin,
            &["patch", tenant_configs, "--subresource=status", "-n", &team],
            false,
        ),
        (&admin, &["create", configs], false),
        (&editor, &["create", tenant_configs, "-n", &team], false),
        (&editor, &["get", tenant_configs, "-n", &team], true),
        (&viewer, &["list", tenant_configs, "-n", &team], true),
        (&viewer, &["create", tenant_configs, "-n", &team], false),
        (&editor, &["create", grants, "-n", &team], true),
        (&editor, &["update", grants, "-n", &team], true),
        (&editor, &["delete", grants, "-n", &team], true),
        (&editor, &["deletecollection", grants, "-n", &team], true),
        (&editor, &["watch", grants, "-n", &team], true),
        (&editor, &["create", grants, "-n", &other], false),
        (
            &editor,
            &["patch", grants, "--subresource=status", "-n", &team],
            false,
        ),
        (&editor, &["create", configs], false),
        (&editor, &["get", configs], false),
        (&viewer, &["get", grants, "-n", &team], true),
        (&viewer, &["list", grants, "-n", &team], true),
        (&viewer, &["watch", grants, "-n", &team], true),
        (&viewer, &["create", grants, "-n", &team], false),
        (&viewer, &["delete", grants, "-n", &team], false),
        (&viewer, &["patch", grants, "-n", &team], false),
        (&viewer, &["list", grants, "-n", &other], false),
    ];
    let mut wrong = Vec::new();
    for (user, args, expected) in expectations {
        if can(user, args) != *expected {
            wrong.push(format!(
                "{user} {} {}",
                if *expected { "cannot" } else { "can" },
                args.join(" ")
            ));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");

    // And for real, by impersonation: the editor creates a grant, the viewer reads it and may not
    // delete it, the editor may not create a provider config.
    let grant = json!({
        "apiVersion": "kmsgrant.io/v1beta1", "kind": "KmsGrant",
        "metadata": {"name": "team-grant", "namespace": team},
        "spec": {"keyId": "bb6a3d22-dc93-47ac-b5bd-88df7ad35f1e",
            "granteePrincipal": "13gg44z4g2sglzk0egw0u726zoyzvrs8", "operations": ["describe-key"],
            "deletionPolicy": "Orphan"}
    });
    kubectl_ok(
        &["create", "--as", &editor, "-f", "-"],
        Some(&grant.to_string()),
    );
    let listed = kubectl_ok(
        &["get", "kmsg", "-n", &team, "--as", &viewer, "-o", "name"],
        None,
    );
    assert!(listed.contains("team-grant"), "{listed}");
    let out = kubectl(
        &[
            "delete",
            "kmsgrant",
            "team-grant",
            "-n",
            &team,
            "--as",
            &viewer,
        ],
        None,
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("forbidden"));
    let config = json!({
        "apiVersion": "kmsgrant.io/v1beta1", "kind": "KmsProviderConfig",
        "metadata": {"name": format!("team-{}", std::process::id())},
        "spec": {"endpoint": "https://kms.example.com", "region": "eu-de", "projectId": "p",
            "auth": {"type": "AccessKey", "secretRef": {"namespace": "kmsgrant-system", "name": "s"}}}
    });
    let out = kubectl(
        &["create", "--as", &editor, "-f", "-"],
        Some(&config.to_string()),
    );
    assert!(
        !out.status.success(),
        "the editor created a KmsProviderConfig"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("forbidden"));
}

/// The chart's NetworkPolicy with values a platform team would set: Prometheus' namespace as the
/// only scraper, the API server pinned to its address and port, KMS in one CIDR, and a private
/// endpoint through `extraEgress`.
const NETWORK_POLICY_VALUES: &str = "\
metrics: {port: 9090}
networkPolicy:
  enabled: true
  metricsFrom: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: monitoring}}}]
  apiServer: {ports: [6443], to: [{ipBlock: {cidr: 10.0.0.10/32}}]}
  https: {cidrs: [100.125.0.0/16]}
  extraEgress: [{to: [{ipBlock: {cidr: 10.1.2.3/32}}], ports: [{port: 8443, protocol: TCP}]}]
";

/// The (port, protocol) pairs of a NetworkPolicy rule.
fn policy_ports(rule: &Value) -> Vec<(i64, String)> {
    rule["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["port"].as_i64().unwrap(),
                p["protocol"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn tcp(ports: &[i64]) -> Vec<(i64, String)> {
    ports.iter().map(|&p| (p, "TCP".to_owned())).collect()
}

/// The policy selects exactly the Deployment's pods (its selector, which the pod template's
/// labels carry).
fn assert_selects_the_operator_pods(policy: &Value, deployment: &Value) {
    let selector = &deployment["spec"]["selector"]["matchLabels"];
    assert_eq!(
        policy["spec"]["podSelector"],
        json!({"matchLabels": selector})
    );
    for (label, value) in selector.as_object().unwrap() {
        assert_eq!(
            &deployment["spec"]["template"]["metadata"]["labels"][label],
            value
        );
    }
    assert_eq!(
        policy["metadata"]["namespace"],
        deployment["metadata"]["namespace"]
    );
}

/// The chart rendered with `networkPolicy.enabled=true` and defaults otherwise.
fn chart_network_policy_with_defaults() -> (Value, Value) {
    let rendered = objects(&helm_ok(&[
        "template",
        "kmsgrant-operator",
        CHART,
        "--namespace",
        OPERATOR_NAMESPACE,
        "--set",
        "networkPolicy.enabled=true",
    ]));
    (
        one(&rendered, "NetworkPolicy").clone(),
        one(&rendered, "Deployment").clone(),
    )
}

#[test]
fn helm_chart_renders_no_network_policy_unless_enabled() {
    let rendered = objects(&helm_ok(&["template", "kmsgrant-operator", CHART]));
    assert!(
        find(&rendered, "NetworkPolicy").is_empty(),
        "existing installs must not change"
    );
}

/// Enabled with the defaults: in only on the admin port, from anywhere; out to DNS in
/// kube-system, to the API server on 443 and 6443 anywhere, and to HTTPS anywhere.
#[test]
fn helm_network_policy_defaults_admit_the_admin_port_and_let_out_dns_api_server_and_https() {
    let (policy, deployment) = chart_network_policy_with_defaults();
    assert_selects_the_operator_pods(&policy, &deployment);
    assert_eq!(policy["spec"]["policyTypes"], json!(["Ingress", "Egress"]));
    assert_eq!(
        policy["spec"]["ingress"],
        json!([{"ports": [{"port": container(&deployment)["ports"][0]["containerPort"], "protocol": "TCP"}]}])
    );
    assert_eq!(policy["spec"]["ingress"][0]["ports"][0]["port"], 8080);
    let egress = policy["spec"]["egress"].as_array().unwrap();
    assert_eq!(egress.len(), 3, "{egress:?}");
    assert_eq!(
        policy_ports(&egress[0]),
        [(53, "UDP".to_owned()), (53, "TCP".to_owned())]
    );
    assert_eq!(
        egress[0]["to"],
        json!([{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}}}])
    );
    assert_eq!(policy_ports(&egress[1]), tcp(&[443, 6443]));
    assert_eq!(policy_ports(&egress[2]), tcp(&[443]));
    for rule in &egress[1..] {
        assert!(rule.get("to").is_none(), "any destination: {rule}");
    }
}

#[test]
fn helm_network_policy_admits_only_the_admin_port_and_lets_out_only_dns_api_server_and_https() {
    let values = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(values.path(), NETWORK_POLICY_VALUES).unwrap();
    let values = values.path().to_str().unwrap();
    helm_ok(&["lint", "--strict", CHART, "-f", values]);
    let rendered = objects(&helm_ok(&[
        "template",
        "guarded",
        CHART,
        "--namespace",
        OPERATOR_NAMESPACE,
        "-f",
        values,
    ]));
    let policy = one(&rendered, "NetworkPolicy");
    let deployment = one(&rendered, "Deployment");
    assert_eq!(policy["metadata"]["name"], "guarded-kmsgrant-operator");
    assert_selects_the_operator_pods(policy, deployment);
    assert_eq!(
        policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/instance"], "guarded",
        "another release's pods are not selected"
    );
    assert_eq!(policy["spec"]["policyTypes"], json!(["Ingress", "Egress"]));

    // In: the admin port the Deployment listens on, from Prometheus' namespace only.
    assert_eq!(container(deployment)["ports"][0]["containerPort"], 9090);
    assert_eq!(
        policy["spec"]["ingress"],
        json!([{
            "ports": [{"port": 9090, "protocol": "TCP"}],
            "from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
        }])
    );

    // Out: DNS, the API server, KMS/IAM, the private endpoint; nothing else.
    let egress = policy["spec"]["egress"].as_array().unwrap();
    assert_eq!(egress.len(), 4, "{egress:?}");
    assert_eq!(
        policy_ports(&egress[0]),
        [(53, "UDP".to_owned()), (53, "TCP".to_owned())]
    );
    assert_eq!(
        egress[0]["to"][0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"],
        "kube-system"
    );
    assert_eq!(policy_ports(&egress[1]), tcp(&[6443]));
    assert_eq!(
        egress[1]["to"],
        json!([{"ipBlock": {"cidr": "10.0.0.10/32"}}])
    );
    assert_eq!(policy_ports(&egress[2]), tcp(&[443]));
    assert_eq!(
        egress[2]["to"],
        json!([{"ipBlock": {"cidr": "100.125.0.0/16"}}])
    );
    assert_eq!(
        egress[3],
        json!({"to": [{"ipBlock": {"cidr": "10.1.2.3/32"}}], "ports": [{"port": 8443, "protocol": "TCP"}]})
    );

    let _turn = operator_namespace_turn();
    operator_namespace();
    let out = apply_dry_run(&rendered);
    assert!(
        out.contains(
            "networkpolicy.networking.k8s.io/guarded-kmsgrant-operator created (server dry run)"
        ),
        "{out}"
    );
}

/// The values schema covers the new keys too: a typo fails instead of silently leaving a port
/// closed or open.
#[test]
fn helm_values_schema_rejects_typos_in_the_network_policy() {
    for set in [
        "networkPolicy.enabeld=true",
        "networkPolicy.apiServer.port=6443",
        "networkPolicy.https.cidrs={kms.example.com}",
        "networkPolicy.metricsFrom[0].namespaceSelektor.x=y",
    ] {
        let out = helm(&["lint", CHART, "--set", set]);
        assert!(!out.status.success(), "helm lint accepted {set}");
    }
}

/// `deploy/components/network-policy` is the chart's policy with its defaults, for `deploy/`'s
/// pods, and applies together with `deploy/`.
#[test]
fn kustomize_network_policy_component_applies_with_deploy_and_matches_the_chart() {
    // An overlay as the docs show it; kustomize wants its bases as relative paths.
    let overlay = tempfile::tempdir().unwrap();
    let up = "../".repeat(overlay.path().components().count() - 1);
    let base = format!("{up}{}", REPO.trim_start_matches('/'));
    std::fs::write(
        overlay.path().join("kustomization.yaml"),
        format!(
            "resources: [{base}/deploy]\ncomponents: [{base}/deploy/components/network-policy]\n"
        ),
    )
    .unwrap();
    let overlay = overlay.path().to_str().unwrap();
    let rendered = objects(&kubectl_ok(&["kustomize", overlay], None));
    let policy = one(&rendered, "NetworkPolicy");
    let deployment = one(&rendered, "Deployment");
    assert_eq!(policy["metadata"]["name"], "kmsgrant-operator");
    assert_selects_the_operator_pods(policy, deployment);
    assert_eq!(
        policy["spec"]["ingress"][0]["ports"][0]["port"],
        container(deployment)["ports"][0]["containerPort"]
    );
    let (chart, _) = chart_network_policy_with_defaults();
    for field in ["policyTypes", "ingress", "egress"] {
        assert_eq!(
            policy["spec"][field], chart["spec"][field],
            "{field} differs between the component and the chart"
        );
    }

    let _turn = operator_namespace_turn();
    operator_namespace();
    let out = kubectl(&["apply", "-k", overlay, "--dry-run=server"], None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "apply -k failed: {stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout
            .contains("networkpolicy.networking.k8s.io/kmsgrant-operator created (server dry run)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("deployment.apps/kmsgrant-operator") && stdout.contains("(server dry run)"),
        "{stdout}"
    );
}

/// The projected token for keyless auth: none by default; when enabled, mounted read-only at
/// the directory the operator's `--web-identity-token-dir` names, with the audience asked for,
/// and refused without an audience.
#[test]
fn helm_web_identity_mounts_the_projected_token_where_the_operator_reads_it() {
    let default = objects(&helm_ok(&["template", "t", CHART, "-n", "kmsgrant-system"]));
    let deployment = one(&default, "Deployment");
    assert!(deployment["spec"]["template"]["spec"]["volumes"].is_null());
    assert!(container(deployment)["volumeMounts"].is_null());

    let rendered = objects(&helm_ok(&[
        "template",
        "t",
        CHART,
        "-n",
        "kmsgrant-system",
        "--set",
        "webIdentity.projectedToken.enabled=true",
        "--set",
        "webIdentity.projectedToken.audience=my-client-id",
        "--set",
        "webIdentity.projectedToken.expirationSeconds=7200",
        "--set",
        "webIdentity.tokenRequestServiceAccounts={kms-keyless}",
    ]));
    let deployment = one(&rendered, "Deployment");
    let volume = &deployment["spec"]["template"]["spec"]["volumes"][0];
    let source = &volume["projected"]["sources"][0]["serviceAccountToken"];
    assert_eq!(source["audience"], "my-client-id");
    assert_eq!(source["expirationSeconds"], 7200);
    assert_eq!(source["path"], "token");
    let mount = &container(deployment)["volumeMounts"][0];
    assert_eq!(mount["name"], volume["name"]);
    assert_eq!(mount["readOnly"], true);
    assert!(
        args(deployment).contains(&format!(
            "--web-identity-token-dir={}",
            mount["mountPath"].as_str().unwrap()
        )),
        "{:?}",
        args(deployment)
    );
    // Tokens for the named ServiceAccount only, in the release namespace.
    let role = named(&rendered, "Role", "t-kmsgrant-operator");
    let token_rule = role["spec"]["rules"]
        .as_array()
        .or(role["rules"].as_array())
        .unwrap()
        .iter()
        .find(|r| r["resources"][0] == "serviceaccounts/token")
        .expect("a serviceaccounts/token rule");
    assert_eq!(
        token_rule["resourceNames"],
        serde_json::json!(["kms-keyless"])
    );
    assert_eq!(token_rule["verbs"], serde_json::json!(["create"]));

    let out = helm(&[
        "template",
        "t",
        CHART,
        "--set",
        "webIdentity.projectedToken.enabled=true",
    ]);
    assert!(!out.status.success(), "enabled without an audience renders");
    assert!(String::from_utf8_lossy(&out.stderr).contains("audience"));
}

/// `deploy/components/web-identity` mounts the same projected token into `deploy/`'s operator.
#[test]
fn kustomize_web_identity_component_mounts_the_projected_token() {
    let overlay = tempfile::tempdir().unwrap();
    let up = "../".repeat(overlay.path().components().count() - 1);
    let base = format!("{up}{}", REPO.trim_start_matches('/'));
    std::fs::write(
        overlay.path().join("kustomization.yaml"),
        format!(
            "resources: [{base}/deploy]\ncomponents: [{base}/deploy/components/web-identity]\n"
        ),
    )
    .unwrap();
    let overlay = overlay.path().to_str().unwrap();
    let rendered = objects(&kubectl_ok(&["kustomize", overlay], None));
    let deployment = one(&rendered, "Deployment");
    let volume = &deployment["spec"]["template"]["spec"]["volumes"][0];
    assert_eq!(
        volume["projected"]["sources"][0]["serviceAccountToken"]["path"],
        "token"
    );
    let mount = &container(deployment)["volumeMounts"][0];
    assert_eq!(mount["mountPath"], "/var/run/secrets/kmsgrant");
    assert_eq!(mount["readOnly"], true);
    assert_eq!(container(deployment)["name"], "operator");
}
