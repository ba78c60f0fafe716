//! The provider configs' guardrails at admission: the ValidatingAdmissionPolicy and binding that
//! `deploy/admission/guardrails.yaml` ships (and the chart carries), enforced by the real
//! kube-apiserver at `kubectl create`/`apply`, with no webhook and no operator running.
//!
//! The API server is shared by every test binary of a `scripts/test` run, and other tests store
//! grants that their provider configs refuse on purpose (to see the controller's own checks). So
//! the shipped policy and binding are applied under names of this process (a chart installed by
//! another test may own the shipped names), and the binding is narrowed to the namespaces this
//! process labels: everything else (the CEL, the paramRef that selects every KmsProviderConfig,
//! parameterNotFoundAction, validationActions) is the shipped one.

mod support;

use std::sync::OnceLock;
use std::time::Duration;

use serde_json::{Value, json};
use support::{eventually, install_crds, kubectl, kubectl_ok, namespace};

const KEY_A: &str = "bb6a3d22-dc93-47ac-b5bd-88df7ad35f1e";
const KEY_B: &str = "0b4e2f6c-1d2a-4c3b-9e8f-7a6b5c4d3e2f";
const PRINCIPAL: &str = "13gg44z4g2sglzk0egw0u726zoyzvrs8";
/// Namespaces of this process carry this label with the process ID; the binding selects them.
const SCOPE_LABEL: &str = "kmsgrant.io/admission-test";
/// How long a new or changed policy, binding or provider config may take to reach the API
/// server's admission plugin (it reads them through informers).
const PROPAGATION: Duration = Duration::from_secs(60);

fn shipped() -> Vec<Value> {
    let path = std::path::Path::new(support::REPO).join("deploy/admission/guardrails.yaml");
    let yaml = std::fs::read_to_string(&path).unwrap();
    serde_saphyr::from_str_multiple::<Value, Vec<Value>>(&yaml)
        .expect("deploy/admission/guardrails.yaml parses")
        .into_iter()
        .filter(|o| !o.is_null())
        .collect()
}

/// The name of this process's copies: the shipped name would clash with a chart installed by
/// another test on the same API server.
fn policy_name() -> String {
    format!("kmsgrant-guardrails-test-{}", std::process::id())
}

/// Applies this process's copies of the shipped policy and binding. Once per process.
fn install_guardrails() {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        install_crds();
        let objects = shipped();
        let kinds: Vec<&str> = objects
            .iter()
            .map(|o| o["kind"].as_str().unwrap())
            .collect();
        assert_eq!(
            kinds,
            [
                "ValidatingAdmissionPolicy",
                "ValidatingAdmissionPolicyBinding"
            ]
        );
        let (mut policy, mut binding) = (objects[0].clone(), objects[1].clone());
        assert_eq!(policy["metadata"]["name"], "kmsgrant-guardrails");
        assert_eq!(binding["spec"]["policyName"], policy["metadata"]["name"]);
        assert!(
            binding["spec"]["matchResources"].is_null(),
            "the shipped binding covers every namespace; this test narrows it itself"
        );
        policy["metadata"]["name"] = json!(policy_name());
        binding["metadata"]["name"] = json!(policy_name());
        binding["spec"]["policyName"] = json!(policy_name());
        binding["spec"]["matchResources"] = json!({
            "namespaceSelector": {"matchLabels": {SCOPE_LABEL: std::process::id().to_string()}}
        });
        let list = json!({"apiVersion": "v1", "kind": "List", "items": [policy, binding]});
        kubectl_ok(
            &["apply", "--server-side", "--force-conflicts", "-f", "-"],
            Some(&list.to_string()),
        );
    });
}

/// A namespace of this test, inside the binding's scope, with these extra labels.
fn scoped_namespace(prefix: &str, labels: &[(&str, &str)]) -> String {
    let name = namespace(prefix);
    let pid = std::process::id().to_string();
    let mut args = vec![
        "label".to_owned(),
        "namespace".to_owned(),
        name.clone(),
        format!("{SCOPE_LABEL}={pid}"),
    ];
    args.extend(labels.iter().map(|(k, v)| format!("{k}={v}")));
    kubectl_ok(&args.iter().map(String::as_str).collect::<Vec<_>>(), None);
    name
}

/// A provider config of this process (cluster-scoped: the name carries the process ID) with
/// these guardrails in its spec.
fn provider_config(name: &str, guardrails: Value) -> Value {
    let mut spec = json!({
        "endpoint": "https://kms.eu-de.otc.t-systems.com",
        "region": "eu-de",
        "projectId": "0123456789abcdef0123456789abcdef",
        "auth": {"type": "AccessKey", "secretRef": {"namespace": "kmsgrant-system", "name": "kms-credentials"}}
    });
    for (k, v) in guardrails.as_object().unwrap() {
        spec[k] = v.clone();
    }
    json!({
        "apiVersion": "kmsgrant.io/v1beta1", "kind": "KmsProviderConfig",
        "metadata": {"name": name}, "spec": spec
    })
}

fn config_name(what: &str) -> String {
    format!("admission-{what}-{}", std::process::id())
}

fn grant(namespace: &str, name: &str, config: &str, key: &str, operations: &[&str]) -> Value {
    json!({
        "apiVersion": "kmsgrant.io/v1beta1", "kind": "KmsGrant",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "providerConfigRef": {"name": config},
            "keyId": key,
            "granteePrincipal": PRINCIPAL,
            "operations": operations
        }
    })
}

fn apply(manifest: &Value) -> std::process::Output {
    kubectl(
        &["apply", "--server-side", "-f", "-"],
        Some(&manifest.to_string()),
    )
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The refusal of `manifest` by the guardrails, once the policy, the binding and the provider
/// config it names have reached the admission plugin: until then the API server lets the object
/// through (a dry run, so nothing is stored meanwhile). Then the same object is applied for real,
/// must be refused with the same message, and must not exist.
async fn refusal(manifest: &Value) -> String {
    let body = manifest.to_string();
    let mut last = String::new();
    eventually(
        "the guardrails to refuse the grant (a server dry run)",
        PROPAGATION,
        async || {
            let out = kubectl(
                &["apply", "--server-side", "--dry-run=server", "-f", "-"],
                Some(&body),
            );
            last = stderr(&out);
            !out.status.success()
        },
    )
    .await;
    assert!(
        last.contains(&format!("ValidatingAdmissionPolicy '{}'", policy_name())),
        "refused, but not by the guardrails: {last}"
    );
    let out = apply(manifest);
    assert!(!out.status.success(), "the real apply was admitted");
    let message = stderr(&out);
    assert!(message.contains("is forbidden"), "{message}");
    let (namespace, name) = (
        manifest["metadata"]["namespace"].as_str().unwrap(),
        manifest["metadata"]["name"].as_str().unwrap(),
    );
    let get = kubectl(&["get", "kmsgrant", "-n", namespace, name], None);
    assert!(
        stderr(&get).contains("NotFound"),
        "a refused grant was stored"
    );
    message
}

fn admitted(manifest: &Value) {
    let out = apply(manifest);
    assert!(out.status.success(), "refused: {}", stderr(&out));
    let (namespace, name) = (
        manifest["metadata"]["namespace"].as_str().unwrap(),
        manifest["metadata"]["name"].as_str().unwrap(),
    );
    kubectl_ok(&["get", "kmsgrant", "-n", namespace, name], None);
}

fn assert_names(message: &str, parts: &[&str]) {
    for part in parts {
        assert!(message.contains(part), "{part:?} missing from: {message}");
    }
}

#[tokio::test]
async fn key_outside_allowed_key_ids_is_refused_and_an_allowed_key_admitted() {
    install_guardrails();
    let config = config_name("key");
    kubectl_ok(
        &["apply", "--server-side", "-f", "-"],
        Some(&provider_config(&config, json!({"allowedKeyIds": [KEY_A]})).to_string()),
    );
    let ns = scoped_namespace("admission-key", &[]);

    let message = refusal(&grant(&ns, "other-key", &config, KEY_B, &["describe-key"])).await;
    assert_names(
        &message,
        &[
            "guardrail allowedKeyIds",
            "spec.keyId",
            KEY_B,
            &config,
            "KeyNotAllowed",
        ],
    );
    admitted(&grant(
        &ns,
        "allowed-key",
        &config,
        KEY_A,
        &["describe-key"],
    ));
}

/// A key named by alias cannot be resolved in the API server: its key check is skipped (the
/// controller checks the resolved key), while its operations and namespace are checked as for any
/// grant.
#[tokio::test]
async fn a_grant_naming_its_key_by_alias_skips_only_the_key_check() {
    install_guardrails();
    let config = config_name("alias");
    kubectl_ok(
        &["apply", "--server-side", "-f", "-"],
        Some(
            &provider_config(
                &config,
                json!({
                    "allowedKeyIds": [KEY_A],
                    "allowedOperations": ["describe-key"],
                    "namespaceSelector": {"matchLabels": {"kms-grants": "allowed"}}
                }),
            )
            .to_string(),
        ),
    );
    let allowed = scoped_namespace("admission-alias", &[("kms-grants", "allowed")]);
    let other = scoped_namespace("admission-alias-no", &[]);
    let by_alias = |namespace: &str, name: &str, operations: &[&str]| {
        let mut manifest = grant(namespace, name, &config, KEY_A, operations);
        let spec = manifest["spec"].as_object_mut().unwrap();
        spec.remove("keyId");
        spec.insert("keyRef".into(), json!({"alias": "alias/anything"}));
        manifest
    };

    let message = refusal(&by_alias(&allowed, "alias-ops", &["decrypt-datakey"])).await;
    assert_names(
        &message,
        &[
            "guardrail allowedOperations",
            "decrypt-datakey",
            "OperationNotAllowed",
        ],
    );
    let message = refusal(&by_alias(&other, "alias-ns", &["describe-key"])).await;
    assert_names(
        &message,
        &["guardrail namespaceSelector", &other, "NamespaceNotAllowed"],
    );
    admitted(&by_alias(&allowed, "alias-ok", &["describe-key"]));
    // The same grant by a key ID outside allowedKeyIds is still refused.
    let by_id = grant(&allowed, "id-not-ok", &config, KEY_B, &["describe-key"]);
    let message = refusal(&by_id).await;
    assert_names(&message, &["guardrail allowedKeyIds", KEY_B]);
}

#[tokio::test]
async fn operations_outside_allowed_operations_are_refused_and_allowed_ones_admitted() {
    install_guardrails();
    let config = config_name("ops");
    kubectl_ok(
        &["apply", "--server-side", "-f", "-"],
        Some(
            &provider_config(
                &config,
                json!({"allowedOperations": ["describe-key", "encrypt-datakey"]}),
            )
            .to_string(),
        ),
    );
    let ns = scoped_namespace("admission-ops", &[]);

    let message = refusal(&grant(
        &ns,
        "too-much",
        &config,
        KEY_A,
        &["describe-key", "decrypt-datakey", "create-grant"],
    ))
    .await;
    assert_names(
        &message,
        &[
            "guardrail allowedOperations",
            "spec.operations",
            "decrypt-datakey, create-grant",
            &config,
            "OperationNotAllowed",
        ],
    );
    assert!(
        !message.contains("describe-key"),
        "names an allowed operation: {message}"
    );
    admitted(&grant(
        &ns,
        "just-enough",
        &config,
        KEY_A,
        &["describe-key", "encrypt-datakey"],
    ));
}

/// matchLabels and every matchExpressions operator, against namespaces that pass and fail each.
#[tokio::test]
async fn namespace_outside_the_namespace_selector_is_refused_and_a_matching_one_admitted() {
    install_guardrails();
    let config = config_name("ns");
    kubectl_ok(
        &["apply", "--server-side", "-f", "-"],
        Some(
            &provider_config(
                &config,
                json!({"namespaceSelector": {
                    "matchLabels": {"kms-grants": "allowed"},
                    "matchExpressions": [
                        {"key": "tier", "operator": "In", "values": ["prod", "staging"]},
                        {"key": "team", "operator": "NotIn", "values": ["sandbox"]},
                        {"key": "cost-center", "operator": "Exists"},
                        {"key": "frozen", "operator": "DoesNotExist"}
                    ]
                }}),
            )
            .to_string(),
        ),
    );
    let good = [
        ("kms-grants", "allowed"),
        ("tier", "prod"),
        ("cost-center", "42"),
    ];
    let with = |change: (&'static str, &'static str)| {
        let mut labels: Vec<(&str, &str)> = good
            .iter()
            .filter(|(k, _)| *k != change.0)
            .copied()
            .collect();
        if !change.1.is_empty() {
            labels.push(change);
        }
        labels
    };
    let failing: Vec<(&str, Vec<(&str, &str)>)> = vec![
        ("matchLabels value", with(("kms-grants", "denied"))),
        ("matchLabels key missing", with(("kms-grants", ""))),
        ("In: other value", with(("tier", "dev"))),
        ("In: key missing", with(("tier", ""))),
        (
            "NotIn: listed value",
            good.iter().copied().chain([("team", "sandbox")]).collect(),
        ),
        ("Exists: key missing", with(("cost-center", ""))),
        (
            "DoesNotExist: key present",
            good.iter().copied().chain([("frozen", "yes")]).collect(),
        ),
    ];
    // The first refusal also waits for the config to reach the admission plugin.
    for (case, labels) in failing {
        let ns = scoped_namespace("admission-ns", &labels);
        let message = refusal(&grant(&ns, "app", &config, KEY_A, &["describe-key"])).await;
        assert_names(
            &message,
            &[
                "guardrail namespaceSelector",
                &format!("namespace {ns} (metadata.namespace)"),
                "spec.namespaceSelector",
                &config,
                "NamespaceNotAllowed",
            ],
        );
        eprintln!("refused as it should: {case}");
    }
    // NotIn matches a namespace without the key; a further label changes nothing.
    let ns = scoped_namespace("admission-ns", &good);
    admitted(&grant(&ns, "app", &config, KEY_A, &["describe-key"]));
    let ns = scoped_namespace(
        "admission-ns",
        &good
            .iter()
            .copied()
            .chain([("team", "payments")])
            .collect::<Vec<_>>(),
    );
    admitted(&grant(&ns, "app", &config, KEY_A, &["describe-key"]));
}

/// The API server evaluates the policy once per KmsProviderConfig; only the one a grant names
/// applies, and a grant naming none that exists is let through for the controller to report
/// (ProviderConfigNotFound).
#[tokio::test]
async fn only_the_named_provider_config_applies_and_a_missing_one_lets_the_grant_through() {
    install_guardrails();
    let (strict, open) = (config_name("strict"), config_name("open"));
    for (name, guardrails) in [
        (
            &strict,
            json!({"allowedKeyIds": [KEY_A], "allowedOperations": ["describe-key"],
                   "namespaceSelector": {"matchLabels": {"kms-grants": "allowed"}}}),
        ),
        (&open, json!({})),
    ] {
        kubectl_ok(
            &["apply", "--server-side", "-f", "-"],
            Some(&provider_config(name, guardrails).to_string()),
        );
    }
    let ns = scoped_namespace("admission-which", &[]);
    refusal(&grant(&ns, "strict", &strict, KEY_B, &["decrypt-datakey"])).await;
    admitted(&grant(&ns, "open", &open, KEY_B, &["decrypt-datakey"]));
    admitted(&grant(
        &ns,
        "missing",
        &config_name("never-created"),
        KEY_B,
        &["decrypt-datakey"],
    ));
}

/// Tightening a provider config refuses new grants (and changes to a stored grant's spec) once the
/// API server has the new version; a grant stored before stays, and its metadata (finalizers,
/// labels) can still be changed, so the controller can still finish and delete it.
#[tokio::test]
async fn a_changed_provider_config_takes_effect_for_new_objects() {
    install_guardrails();
    let config = config_name("changed");
    let apply_config = |key_ids: &[&str]| {
        kubectl_ok(
            &["apply", "--server-side", "-f", "-"],
            Some(&provider_config(&config, json!({"allowedKeyIds": key_ids})).to_string()),
        );
    };
    apply_config(&[KEY_A]);
    let ns = scoped_namespace("admission-changed", &[]);
    // In effect: KEY_B refused, KEY_A admitted and stored.
    refusal(&grant(&ns, "probe", &config, KEY_B, &["describe-key"])).await;
    let stored = grant(&ns, "stored", &config, KEY_A, &["describe-key"]);
    admitted(&stored);

    // Now only KEY_B is allowed: the same spec under a new name is refused, once the change is in.
    apply_config(&[KEY_B]);
    let message = refusal(&grant(&ns, "new", &config, KEY_A, &["describe-key"])).await;
    assert_names(&message, &["guardrail allowedKeyIds", "spec.keyId", KEY_A]);
    admitted(&grant(&ns, "probe", &config, KEY_B, &["describe-key"]));

    // The stored grant: metadata updates pass, a spec change is checked against the new config.
    kubectl_ok(
        &["label", "kmsgrant", "-n", &ns, "stored", "touched=yes"],
        None,
    );
    kubectl_ok(
        &[
            "patch",
            "kmsgrant",
            "-n",
            &ns,
            "stored",
            "--type=merge",
            "-p",
            r#"{"metadata":{"finalizers":["kmsgrant.io/test"]}}"#,
        ],
        None,
    );
    let out = kubectl(
        &[
            "patch",
            "kmsgrant",
            "-n",
            &ns,
            "stored",
            "--type=merge",
            "-p",
            r#"{"spec":{"operations":["describe-key","encrypt-datakey"]}}"#,
        ],
        None,
    );
    assert!(
        !out.status.success(),
        "a changed spec skipped the guardrails"
    );
    assert_names(&stderr(&out), &["guardrail allowedKeyIds", "spec.keyId"]);
    kubectl_ok(
        &[
            "patch",
            "kmsgrant",
            "-n",
            &ns,
            "stored",
            "--type=merge",
            "-p",
            &format!(r#"{{"spec":{{"keyId":"{KEY_B}"}}}}"#),
        ],
        None,
    );
    kubectl_ok(
        &[
            "patch",
            "kmsgrant",
            "-n",
            &ns,
            "stored",
            "--type=merge",
            "-p",
            r#"{"metadata":{"finalizers":null}}"#,
        ],
        None,
    );
    kubectl_ok(
        &["delete", "kmsgrant", "-n", &ns, "stored", "--wait=false"],
        None,
    );
}

/// deploy/examples/guardrails.yaml does what its comments and the README say: its grant is
/// refused in a namespace without the label and admitted once the namespace has it, and adding
/// `decrypt-datakey` is refused naming the operation.
#[tokio::test]
async fn the_shipped_example_is_refused_and_admitted_as_documented() {
    install_guardrails();
    let path = std::path::Path::new(support::REPO).join("deploy/examples/guardrails.yaml");
    let objects: Vec<Value> = serde_saphyr::from_str_multiple::<Value, Vec<Value>>(
        &std::fs::read_to_string(path).unwrap(),
    )
    .unwrap()
    .into_iter()
    .filter(|o| !o.is_null())
    .collect();
    let (mut config, mut example) = (objects[0].clone(), objects[1].clone());
    assert_eq!(config["kind"], "KmsProviderConfig");
    assert_eq!(example["kind"], "KmsGrant");
    assert_eq!(
        example["spec"]["providerConfigRef"]["name"],
        config["metadata"]["name"]
    );
    // Cluster-scoped: a name of this process, so parallel runs do not meet.
    let name = config_name("example");
    config["metadata"]["name"] = json!(name);
    example["spec"]["providerConfigRef"]["name"] = json!(name);
    kubectl_ok(
        &["apply", "--server-side", "-f", "-"],
        Some(&config.to_string()),
    );

    let unlabelled = scoped_namespace("admission-example", &[]);
    example["metadata"]["namespace"] = json!(unlabelled);
    let message = refusal(&example).await;
    assert_names(
        &message,
        &[
            "guardrail namespaceSelector",
            &format!("namespace {unlabelled} (metadata.namespace)"),
            "NamespaceNotAllowed",
        ],
    );

    let labelled = scoped_namespace("admission-example", &[("kms-grants", "allowed")]);
    example["metadata"]["namespace"] = json!(labelled);
    let mut more = example.clone();
    more["spec"]["operations"]
        .as_array_mut()
        .unwrap()
        .push(json!("decrypt-datakey"));
    let message = refusal(&more).await;
    assert_names(
        &message,
        &[&format!(
            "guardrail allowedOperations: spec.operations decrypt-datakey not in spec.allowedOperations of KmsProviderConfig {name} (OperationNotAllowed)"
        )],
    );
    admitted(&example);
}

/// `spec.importGrantId` is refused at `kubectl apply` where the config does not allow import for
/// the namespace (importNamespaceSelector absent or not matching), as the controller would refuse
/// it (ImportNotAllowed); a grant without it is not concerned.
#[tokio::test]
async fn an_import_outside_the_import_namespace_selector_is_refused_and_an_allowed_one_admitted() {
    install_guardrails();
    let importing = |ns: &str, config: &str| {
        let mut manifest = grant(ns, "imported", config, KEY_A, &["describe-key"]);
        manifest["spec"]["importGrantId"] = json!("7c9a1e4b".repeat(8));
        manifest
    };
    let selective = config_name("import");
    let closed = config_name("no-import");
    for (config, guardrails) in [
        (
            &selective,
            json!({"importNamespaceSelector": {"matchLabels": {"imports": "allowed"}}}),
        ),
        (&closed, json!({})),
    ] {
        kubectl_ok(
            &["apply", "--server-side", "-f", "-"],
            Some(&provider_config(config, guardrails).to_string()),
        );
    }
    let plain = scoped_namespace("admission-import", &[]);
    let allowed = scoped_namespace("admission-import", &[("imports", "allowed")]);
    for (ns, config) in [(&plain, &selective), (&allowed, &closed)] {
        let message = refusal(&importing(ns, config)).await;
        assert_names(
            &message,
            &[
                "guardrail importNamespaceSelector",
                "spec.importGrantId",
                &format!("namespace {ns}"),
                config,
                "ImportNotAllowed",
            ],
        );
    }
    admitted(&importing(&allowed, &selective));
    admitted(&grant(
        &plain,
        "plain",
        &selective,
        KEY_A,
        &["describe-key"],
    ));
}
