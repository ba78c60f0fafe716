//! The CRDs as a real kube-apiserver enforces them: what `kubectl apply` accepts, what it rejects
//! and how the message names the field.

mod support;

use serde_json::{Value, json};
use support::{install_crds, kubectl, kubectl_ok, namespace};

const SEED_KEY: &str = "bb6a3d22-dc93-47ac-b5bd-88df7ad35f1e";
const SEED_PRINCIPAL: &str = "13gg44z4g2sglzk0egw0u726zoyzvrs8";

/// The example request of the seed page "Creating a Grant", written as a KmsGrant.
fn seed_grant(namespace: &str, name: &str) -> Value {
    json!({
        "apiVersion": "kmsgrant.io/v1beta1",
        "kind": "KmsGrant",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "keyId": SEED_KEY,
            "operations": ["describe-key", "create-datakey", "encrypt-datakey"],
            "granteePrincipal": SEED_PRINCIPAL,
            "retiringPrincipal": SEED_PRINCIPAL
        }
    })
}

fn provider_config(name: &str) -> Value {
    json!({
        "apiVersion": "kmsgrant.io/v1beta1",
        "kind": "KmsProviderConfig",
        "metadata": {"name": name},
        "spec": {
            "endpoint": "https://kms.eu-de.otc.t-systems.com",
            "iamEndpoint": "https://iam.eu-de.otc.t-systems.com",
            "region": "eu-de",
            "projectId": "0123456789abcdef0123456789abcdef",
            "auth": {"type": "AccessKey", "secretRef": {"namespace": "kmsgrant-system", "name": "kms-credentials"}}
        }
    })
}

fn create(manifest: &Value) -> std::process::Output {
    kubectl(&["create", "-f", "-"], Some(&manifest.to_string()))
}

fn get_json(args: &[&str]) -> Value {
    serde_json::from_str(&kubectl_ok(&[args, &["-o", "json"]].concat(), None)).unwrap()
}

/// Sets (or, with `None`, removes) the value at a JSON pointer, creating objects on the way.
fn set(mut doc: Value, pointer: &str, value: Option<Value>) -> Value {
    let (parent, key) = pointer.rsplit_once('/').unwrap();
    let mut node = &mut doc;
    for part in parent.split('/').skip(1) {
        node = node
            .as_object_mut()
            .unwrap()
            .entry(part)
            .or_insert_with(|| json!({}));
    }
    let object = node.as_object_mut().unwrap();
    match value {
        Some(value) => {
            object.insert(key.to_owned(), value);
        }
        None => {
            object.remove(key);
        }
    }
    doc
}

#[test]
fn crds_install_and_become_established() {
    install_crds();
    for crd in [
        "kmsgrants.kmsgrant.io",
        "kmsproviderconfigs.kmsgrant.io",
        "kmskeypolicies.kmsgrant.io",
    ] {
        let crd = get_json(&["get", "crd", crd]);
        let established = crd["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["type"] == "Established" && c["status"] == "True");
        assert!(
            established,
            "{} is not Established: {}",
            crd["metadata"]["name"], crd["status"]
        );
    }
    // Short names and the category resolve.
    kubectl_ok(&["get", "kmsg", "-A"], None);
    kubectl_ok(&["get", "kmspc"], None);
    kubectl_ok(&["get", "kmskp"], None);
    kubectl_ok(&["get", "kmsgrants", "-A"], None);
    // The category `kms` lists every kind of ours at once.
    let ns = namespace("category");
    kubectl_ok(
        &["create", "-f", "-"],
        Some(&seed_grant(&ns, "in-category").to_string()),
    );
    let listed = kubectl_ok(&["get", "kms", "-A", "-o", "name"], None);
    assert!(
        listed.contains("kmsgrant.kmsgrant.io/in-category"),
        "{listed}"
    );
    let kinds = kubectl_ok(&["api-resources", "--categories=kms", "-o", "name"], None);
    assert_eq!(
        kinds.split_whitespace().collect::<Vec<_>>(),
        [
            "kmsgrants.kmsgrant.io",
            "kmskeypolicies.kmsgrant.io",
            "kmsnamespacedproviderconfigs.kmsgrant.io",
            "kmsproviderconfigs.kmsgrant.io"
        ]
    );
    // No category shadows a kind's own names: the singular gets and deletes exactly one grant.
    let got = kubectl_ok(
        &["get", "kmsgrant", "in-category", "-n", &ns, "-o", "name"],
        None,
    );
    assert_eq!(got.trim(), "kmsgrant.kmsgrant.io/in-category");
    let deleted = kubectl_ok(
        &[
            "delete",
            "kmsgrant",
            "in-category",
            "-n",
            &ns,
            "--wait=false",
        ],
        None,
    );
    assert!(deleted.contains("in-category"), "{deleted}");
}

#[test]
fn seed_example_grant_is_accepted_with_schema_defaults() {
    install_crds();
    let ns = namespace("seed");
    let out = create(&seed_grant(&ns, "app-encrypt"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let stored = get_json(&["-n", &ns, "get", "kmsgrants", "app-encrypt"]);
    let spec = &stored["spec"];
    assert_eq!(spec["keyId"], SEED_KEY);
    assert_eq!(
        spec["operations"],
        json!(["describe-key", "create-datakey", "encrypt-datakey"])
    );
    assert!(spec.get("name").is_none());
    assert_eq!(spec["retiringPrincipal"], SEED_PRINCIPAL);
    // Defaults come from the schema, applied by the API server.
    assert_eq!(spec["granteePrincipalType"], "user");
    assert_eq!(spec["deletionPolicy"], "Revoke");
    assert_eq!(
        spec["providerConfigRef"],
        json!({"kind": "KmsProviderConfig", "name": "default"})
    );
}

#[test]
fn minimal_grant_and_grant_with_every_operation_are_accepted() {
    install_crds();
    let ns = namespace("accept");
    let minimal = json!({
        "apiVersion": "kmsgrant.io/v1beta1",
        "kind": "KmsGrant",
        "metadata": {"name": "minimal", "namespace": ns},
        "spec": {"keyId": SEED_KEY, "granteePrincipal": "abc", "operations": ["describe-key"]}
    });
    let out = create(&minimal);
    assert!(
        out.status.success(),
        "minimal: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let every: Vec<&str> = kmsgrant::api::Operation::ALL
        .iter()
        .map(|op| op.as_str())
        .collect();
    let all = set(
        seed_grant(&ns, "every-operation"),
        "/spec/operations",
        Some(json!(every)),
    );
    let all = set(all, "/spec/granteePrincipalType", Some(json!("domain")));
    let all = set(all, "/spec/deletionPolicy", Some(json!("Orphan")));
    let out = create(&all);
    assert!(
        out.status.success(),
        "every operation: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stored = get_json(&["-n", &ns, "get", "kmsgrants", "every-operation"]);
    assert_eq!(stored["spec"]["operations"].as_array().unwrap().len(), 9);

    // A key by alias instead of by ID; "alias/default" is a customer alias named "default", not
    // a Default Master Key's ".../default".
    for (name, alias) in [
        ("by-alias", "alias/app"),
        ("by-nested-alias", "alias/team-a/app:v2_x"),
        ("by-alias-named-default", "alias/default"),
    ] {
        let by_alias = json!({
            "apiVersion": "kmsgrant.io/v1beta1",
            "kind": "KmsGrant",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"keyRef": {"alias": alias}, "granteePrincipal": "abc", "operations": ["describe-key"]}
        });
        let out = create(&by_alias);
        assert!(
            out.status.success(),
            "{alias}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stored = get_json(&["-n", &ns, "get", "kmsgrants", name]);
        assert_eq!(stored["spec"]["keyRef"]["alias"], alias);
        assert!(stored["spec"].get("keyId").is_none(), "{stored}");
    }
}

#[test]
fn valid_provider_configs_are_accepted() {
    install_crds();
    let suffix = std::process::id();
    let by_id = provider_config(&format!("by-id-{suffix}"));
    let out = create(&by_id);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let by_name = set(
        provider_config(&format!("by-name-{suffix}")),
        "/spec/projectId",
        None,
    );
    let by_name = set(by_name, "/spec/projectName", Some(json!("eu-de")));
    let by_name = set(by_name, "/spec/auth/type", Some(json!("Password")));
    let by_name = set(
        by_name,
        "/spec/namespaceSelector",
        Some(json!({"matchLabels": {"kms-grants": "allowed"}})),
    );
    let by_name = set(by_name, "/spec/allowedKeyIds", Some(json!([SEED_KEY])));
    let by_name = set(
        by_name,
        "/spec/allowedOperations",
        Some(json!(["describe-key", "encrypt-datakey"])),
    );
    let out = create(&by_name);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let keyless = set(
        provider_config(&format!("keyless-{suffix}")),
        "/spec/auth",
        Some(
            json!({"type": "WebIdentity", "webIdentity": {"identityProviderId": "cce_workloads",
            "serviceAccountRef": {"namespace": "kmsgrant-system", "name": "kms-keyless", "audiences": ["kmsgrant"]}},
            "agency": {"name": "kms-grants", "domainName": "acme-prod"}, "temporaryAccessKey": {}}),
        ),
    );
    let out = create(&keyless);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stored = get_json(&["get", "kmspc", &format!("keyless-{suffix}")]);
    assert_eq!(
        stored["spec"]["auth"]["temporaryAccessKey"]["durationSeconds"],
        3600
    );
    assert_eq!(
        stored["spec"]["auth"]["webIdentity"]["serviceAccountRef"]["expirationSeconds"],
        3600
    );
    kubectl_ok(&["delete", "kmspc", &format!("keyless-{suffix}")], None);

    let stored = get_json(&["get", "kmspc", &format!("by-id-{suffix}")]);
    assert_eq!(
        stored["spec"]["rateLimit"],
        json!({"requestsPerSecond": 10, "burst": 20})
    );
    kubectl_ok(
        &[
            "delete",
            "kmspc",
            &format!("by-id-{suffix}"),
            &format!("by-name-{suffix}"),
        ],
        None,
    );
}

#[test]
fn kubectl_explain_describes_operations() {
    install_crds();
    let explained = kubectl_ok(&["explain", "kmsgrant.spec.operations"], None);
    // kubectl wraps descriptions to the terminal width.
    let explained = explained.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(
        explained.contains("`create-grant` cannot be the only value"),
        "no description in:\n{explained}"
    );
    let spec = kubectl_ok(&["explain", "kmsgrant.spec"], None);
    for field in [
        "keyId",
        "granteePrincipal",
        "granteePrincipalType",
        "deletionPolicy",
        "providerConfigRef",
    ] {
        assert!(
            spec.contains(field),
            "kubectl explain kmsgrant.spec does not list {field}:\n{spec}"
        );
    }
}

struct BadManifest {
    case: &'static str,
    manifest: Value,
    /// What the API server's message must contain: the field path, and what is expected.
    expect: &'static [&'static str],
}

fn bad_grants(ns: &str) -> Vec<BadManifest> {
    let g = |name: &str| seed_grant(ns, name);
    let with = |name: &str, pointer: &str, value: Value| set(g(name), pointer, Some(value));
    let without = |name: &str, pointer: &str| set(g(name), pointer, None);
    vec![
        BadManifest {
            case: "keyId too short",
            manifest: with(
                "b1",
                "/spec/keyId",
                json!("bb6a3d22-dc93-47ac-b5bd-88df7ad35f1"),
            ),
            expect: &["spec.keyId", "should be at least 36 chars long"],
        },
        BadManifest {
            case: "keyId in upper case",
            manifest: with(
                "b2",
                "/spec/keyId",
                json!("BB6A3D22-DC93-47AC-B5BD-88DF7AD35F1E"),
            ),
            expect: &["spec.keyId", "should match"],
        },
        BadManifest {
            case: "keyId without dashes",
            manifest: with(
                "b3",
                "/spec/keyId",
                json!("bb6a3d22xdc93x47acxb5bdx88df7ad35f1e"),
            ),
            expect: &["spec.keyId", "should match"],
        },
        BadManifest {
            case: "keyId of 37 characters",
            manifest: with(
                "b4",
                "/spec/keyId",
                json!("bb6a3d22-dc93-47ac-b5bd-88df7ad35f1ee"),
            ),
            expect: &["spec.keyId", "may not be more than 36"],
        },
        BadManifest {
            case: "keyId missing",
            manifest: without("b5", "/spec/keyId"),
            expect: &["spec.keyId", "Required value", "spec.keyRef"],
        },
        BadManifest {
            case: "keyId and keyRef both set",
            manifest: with("b5a", "/spec/keyRef", json!({"alias": "alias/app"})),
            expect: &["spec.keyRef", "spec.keyId", "mutually exclusive"],
        },
        BadManifest {
            case: "keyRef alias without the alias/ prefix",
            manifest: set(
                without("b5b", "/spec/keyId"),
                "/spec/keyRef",
                Some(json!({"alias": "application"})),
            ),
            expect: &["spec.keyRef.alias", "should match"],
        },
        BadManifest {
            case: "keyRef alias with a space",
            manifest: set(
                without("b5c", "/spec/keyId"),
                "/spec/keyRef",
                Some(json!({"alias": "alias/my app"})),
            ),
            expect: &["spec.keyRef.alias", "should match"],
        },
        BadManifest {
            case: "keyRef alias of a Default Master Key",
            manifest: set(
                without("b5d", "/spec/keyId"),
                "/spec/keyRef",
                Some(json!({"alias": "alias/obs/default"})),
            ),
            expect: &["spec.keyRef.alias", "Default Master Keys"],
        },
        BadManifest {
            case: "keyRef without alias",
            manifest: set(
                without("b5e", "/spec/keyId"),
                "/spec/keyRef",
                Some(json!({})),
            ),
            expect: &["spec.keyRef.alias", "Required value"],
        },
        BadManifest {
            case: "granteePrincipal missing",
            manifest: without("b6", "/spec/granteePrincipal"),
            expect: &["spec.granteePrincipal", "Required value"],
        },
        BadManifest {
            case: "operations empty",
            manifest: with("b7", "/spec/operations", json!([])),
            expect: &["spec.operations", "at least 1 items"],
        },
        BadManifest {
            case: "operations with an unknown value",
            manifest: with(
                "b8",
                "/spec/operations",
                json!(["describe-key", "delete-key"]),
            ),
            expect: &["spec.operations[1]", "Unsupported value: \"delete-key\""],
        },
        BadManifest {
            case: "operations duplicated",
            manifest: with(
                "b9",
                "/spec/operations",
                json!(["describe-key", "describe-key"]),
            ),
            expect: &["spec.operations[1]", "Duplicate value"],
        },
        BadManifest {
            case: "operations only create-grant",
            manifest: with("b10", "/spec/operations", json!(["create-grant"])),
            expect: &["spec.operations", "create-grant cannot be the only value"],
        },
        BadManifest {
            case: "granteePrincipal of 65 characters",
            manifest: with("b11", "/spec/granteePrincipal", json!("a".repeat(65))),
            expect: &["spec.granteePrincipal", "may not be more than 64"],
        },
        BadManifest {
            case: "granteePrincipal with a dash",
            manifest: with("b12", "/spec/granteePrincipal", json!("user-1")),
            expect: &["spec.granteePrincipal", "should match"],
        },
        BadManifest {
            case: "granteePrincipal with a dot",
            manifest: with("b13", "/spec/granteePrincipal", json!("user.1")),
            expect: &["spec.granteePrincipal", "should match"],
        },
        BadManifest {
            case: "retiringPrincipal with a dash",
            manifest: with("b14", "/spec/retiringPrincipal", json!("user-1")),
            expect: &["spec.retiringPrincipal", "should match"],
        },
        BadManifest {
            case: "name at v1beta1 (not in the schema)",
            manifest: with("b15", "/spec/name", json!("my_grant")),
            expect: &["unknown field \"spec.name\""],
        },
        BadManifest {
            case: "name at v1alpha1 (removed: the grant name is the object's identity)",
            manifest: {
                let mut m = with("b15a", "/spec/name", json!("my_grant"));
                m["apiVersion"] = json!("kmsgrant.io/v1alpha1");
                m
            },
            expect: &["spec.name", "spec.name was removed"],
        },
        BadManifest {
            case: "importGrantId that is not hexadecimal",
            manifest: with("b16", "/spec/importGrantId", json!("g".repeat(64))),
            expect: &["spec.importGrantId", "should match"],
        },
        BadManifest {
            case: "importGrantId shorter than 64 characters",
            manifest: with("b17", "/spec/importGrantId", json!("a".repeat(63))),
            expect: &["spec.importGrantId", "at least 64"],
        },
        BadManifest {
            case: "granteePrincipalType neither user nor domain",
            manifest: with("b18", "/spec/granteePrincipalType", json!("group")),
            expect: &["spec.granteePrincipalType", "Unsupported value: \"group\""],
        },
        BadManifest {
            case: "deletionPolicy not Revoke, Retire or Orphan",
            manifest: with("b19", "/spec/deletionPolicy", json!("Delete")),
            expect: &["spec.deletionPolicy", "Unsupported value: \"Delete\""],
        },
        BadManifest {
            case: "operations not a list",
            manifest: with("b20", "/spec/operations", json!("describe-key")),
            expect: &["spec.operations", "must be of type array"],
        },
        BadManifest {
            case: "providerConfigRef with an empty name",
            manifest: with("b21", "/spec/providerConfigRef", json!({"name": ""})),
            expect: &["spec.providerConfigRef.name", "at least 1 chars long"],
        },
        BadManifest {
            case: "spec missing",
            manifest: without("b22", "/spec"),
            expect: &["spec", "Required value"],
        },
    ]
}

fn key_policy(name: &str) -> Value {
    json!({
        "apiVersion": "kmsgrant.io/v1beta1", "kind": "KmsKeyPolicy",
        "metadata": {"name": name},
        "spec": {"providerConfigRef": {"name": "default"},
            "keyId": "bb6a3d22-dc93-47ac-b5bd-88df7ad35f1e"}
    })
}

fn bad_key_policies() -> Vec<BadManifest> {
    let suffix = std::process::id();
    let k = |n: &str| key_policy(&format!("{n}-{suffix}"));
    vec![
        BadManifest {
            case: "key policy without keyId",
            manifest: set(k("k1"), "/spec/keyId", None),
            expect: &["spec.keyId", "Required value"],
        },
        BadManifest {
            case: "key policy with an upper-case keyId",
            manifest: set(
                k("k2"),
                "/spec/keyId",
                Some(json!("BB6A3D22-DC93-47AC-B5BD-88DF7AD35F1E")),
            ),
            expect: &["spec.keyId", "should match"],
        },
        BadManifest {
            case: "key policy with an empty provider config name",
            manifest: set(k("k3"), "/spec/providerConfigRef/name", Some(json!(""))),
            expect: &["spec.providerConfigRef.name"],
        },
        BadManifest {
            case: "key policy whose undeclaredGrants is neither Report nor Revoke",
            manifest: set(k("k4"), "/spec/undeclaredGrants", Some(json!("Delete"))),
            expect: &["spec.undeclaredGrants", "Unsupported value: \"Delete\""],
        },
        BadManifest {
            case: "key policy allowing a grant ID that is not 64 hex digits",
            manifest: set(
                k("k5"),
                "/spec/allowedGrants",
                Some(json!({"grantIds": ["51f2"]})),
            ),
            expect: &["spec.allowedGrants.grantIds[0]", "should match"],
        },
        BadManifest {
            case: "key policy allowing a grantee that is no principal",
            manifest: set(
                k("k6"),
                "/spec/allowedGrants",
                Some(json!({"grantees": ["everyone@example"]})),
            ),
            expect: &["spec.allowedGrants.grantees[0]", "should match"],
        },
        BadManifest {
            case: "key policy allowing more than 100 grantees",
            manifest: set(
                k("k7"),
                "/spec/allowedGrants",
                Some(json!({"grantees": (0..101).map(|i| format!("user{i}")).collect::<Vec<_>>()})),
            ),
            expect: &["spec.allowedGrants.grantees", "must have at most 100 items"],
        },
        BadManifest {
            case: "key policy allowing one grant ID twice",
            manifest: set(
                k("k8"),
                "/spec/allowedGrants",
                Some(json!({"grantIds": ["a".repeat(64), "a".repeat(64)]})),
            ),
            expect: &["spec.allowedGrants.grantIds[1]", "Duplicate value"],
        },
        BadManifest {
            case: "key policy with revokeOtherClusters not a boolean",
            manifest: set(k("k9"), "/spec/revokeOtherClusters", Some(json!("yes"))),
            expect: &["spec.revokeOtherClusters", "must be of type boolean"],
        },
    ]
}

fn bad_provider_configs() -> Vec<BadManifest> {
    let suffix = std::process::id();
    let p = |n: &str| provider_config(&format!("{n}-{suffix}"));
    vec![
        BadManifest {
            case: "provider config without endpoint",
            manifest: set(p("p1"), "/spec/endpoint", None),
            expect: &["spec.endpoint", "Required value"],
        },
        BadManifest {
            case: "provider config endpoint not a URL",
            manifest: set(
                p("p2"),
                "/spec/endpoint",
                Some(json!("kms.eu-de.otc.t-systems.com")),
            ),
            expect: &["spec.endpoint", "should match"],
        },
        BadManifest {
            case: "provider config endpoint with a space",
            manifest: set(p("p3"), "/spec/endpoint", Some(json!("https://kms eu-de"))),
            expect: &["spec.endpoint"],
        },
        BadManifest {
            case: "provider config with an unknown auth type",
            manifest: set(p("p4"), "/spec/auth/type", Some(json!("Certificate"))),
            expect: &["spec.auth.type", "Unsupported value: \"Certificate\""],
        },
        BadManifest {
            case: "provider config with both projectId and projectName",
            manifest: set(p("p5"), "/spec/projectName", Some(json!("eu-de"))),
            expect: &[
                "spec.projectId",
                "set exactly one of projectId or projectName",
            ],
        },
        BadManifest {
            case: "provider config with neither projectId nor projectName",
            manifest: set(p("p6"), "/spec/projectId", None),
            expect: &[
                "spec.projectId",
                "set exactly one of projectId or projectName",
            ],
        },
        BadManifest {
            case: "provider config with Password auth and no iamEndpoint",
            manifest: set(
                set(p("p7"), "/spec/auth/type", Some(json!("Password"))),
                "/spec/iamEndpoint",
                None,
            ),
            expect: &["spec.iamEndpoint", "required when auth.type is Password"],
        },
        BadManifest {
            case: "provider config without a secretRef",
            manifest: set(p("p8"), "/spec/auth/secretRef", None),
            expect: &[
                "spec.auth.secretRef",
                "secretRef is required for type AccessKey and Password",
            ],
        },
        BadManifest {
            case: "provider config with WebIdentity auth and a secretRef",
            manifest: set(
                p("k1"),
                "/spec/auth",
                Some(
                    json!({"type": "WebIdentity", "secretRef": {"namespace": "kmsgrant-system", "name": "x"},
                    "webIdentity": {"identityProviderId": "idp", "tokenFile": "/var/run/secrets/kmsgrant/token"}}),
                ),
            ),
            expect: &["spec.auth.secretRef", "must be absent for WebIdentity"],
        },
        BadManifest {
            case: "provider config with WebIdentity auth and no webIdentity",
            manifest: set(p("k2"), "/spec/auth", Some(json!({"type": "WebIdentity"}))),
            expect: &["spec.auth.webIdentity", "required for type WebIdentity"],
        },
        BadManifest {
            case: "provider config with both a token file and a ServiceAccount",
            manifest: set(
                p("k3"),
                "/spec/auth",
                Some(
                    json!({"type": "WebIdentity", "webIdentity": {"identityProviderId": "idp",
                    "tokenFile": "/var/run/secrets/kmsgrant/token",
                    "serviceAccountRef": {"namespace": "kmsgrant-system", "name": "sa", "audiences": ["a"]}}}),
                ),
            ),
            expect: &[
                "spec.auth.webIdentity.tokenFile",
                "set exactly one of tokenFile or serviceAccountRef",
            ],
        },
        BadManifest {
            case: "provider config with a token file path climbing out",
            manifest: set(
                p("k4"),
                "/spec/auth",
                Some(
                    json!({"type": "WebIdentity", "webIdentity": {"identityProviderId": "idp",
                    "tokenFile": "/var/run/secrets/kmsgrant/../kubernetes.io/serviceaccount/token"}}),
                ),
            ),
            expect: &["spec.auth.webIdentity.tokenFile", "without '..' segments"],
        },
        BadManifest {
            case: "provider config with temporary keys on AccessKey auth",
            manifest: set(
                p("k5"),
                "/spec/auth/temporaryAccessKey",
                Some(json!({"durationSeconds": 3600})),
            ),
            expect: &[
                "spec.auth.temporaryAccessKey",
                "temporaryAccessKey needs type WebIdentity or an agency",
            ],
        },
        BadManifest {
            case: "provider config with an agency on AccessKey auth without temporary keys",
            manifest: set(
                p("k6"),
                "/spec/auth/agency",
                Some(json!({"name": "kms", "domainName": "acme"})),
            ),
            expect: &["spec.auth.agency", "needs temporaryAccessKey"],
        },
        BadManifest {
            case: "provider config with an agency naming its domain twice",
            manifest: set(
                set(p("k7"), "/spec/auth/type", Some(json!("Password"))),
                "/spec/auth/agency",
                Some(json!({"name": "kms", "domainName": "acme", "domainId": "0123456789abcdef"})),
            ),
            expect: &[
                "spec.auth.agency.domainName",
                "exactly one of domainName or domainId",
            ],
        },
        BadManifest {
            case: "provider config with WebIdentity auth and no iamEndpoint",
            manifest: set(
                set(
                    p("k8"),
                    "/spec/auth",
                    Some(
                        json!({"type": "WebIdentity", "webIdentity": {"identityProviderId": "idp",
                        "tokenFile": "/var/run/secrets/kmsgrant/token"}}),
                    ),
                ),
                "/spec/iamEndpoint",
                None,
            ),
            expect: &[
                "spec.iamEndpoint",
                "required for WebIdentity auth or an agency",
            ],
        },
        BadManifest {
            case: "provider config with temporary keys living less than 15 minutes",
            manifest: set(
                p("k9"),
                "/spec/auth",
                Some(
                    json!({"type": "WebIdentity", "webIdentity": {"identityProviderId": "idp",
                    "tokenFile": "/var/run/secrets/kmsgrant/token"}, "temporaryAccessKey": {"durationSeconds": 600}}),
                ),
            ),
            expect: &[
                "spec.auth.temporaryAccessKey.durationSeconds",
                "greater than or equal to 900",
            ],
        },
        BadManifest {
            case: "provider config requesting ServiceAccount tokens without an audience",
            manifest: set(
                p("k10"),
                "/spec/auth",
                Some(
                    json!({"type": "WebIdentity", "webIdentity": {"identityProviderId": "idp",
                    "serviceAccountRef": {"namespace": "kmsgrant-system", "name": "sa", "audiences": []}}}),
                ),
            ),
            expect: &["spec.auth.webIdentity.serviceAccountRef.audiences"],
        },
        BadManifest {
            case: "provider config with a zero rate limit",
            manifest: set(
                p("p9"),
                "/spec/rateLimit",
                Some(json!({"requestsPerSecond": 0})),
            ),
            expect: &[
                "spec.rateLimit.requestsPerSecond",
                "should be greater than or equal to 1",
            ],
        },
        BadManifest {
            case: "provider config allowing a malformed key ID",
            manifest: set(p("p10"), "/spec/allowedKeyIds", Some(json!(["not-a-key"]))),
            expect: &["spec.allowedKeyIds[0]", "should match"],
        },
        BadManifest {
            case: "provider config auditing a malformed key ID",
            manifest: set(p("p10a"), "/spec/auditKeyIds", Some(json!(["not-a-key"]))),
            expect: &["spec.auditKeyIds[0]", "should match"],
        },
        BadManifest {
            case: "provider config namespaceSelector with an unknown operator",
            manifest: set(
                p("p11"),
                "/spec/namespaceSelector",
                Some(
                    json!({"matchExpressions": [{"key": "tier", "operator": "Like", "values": ["prod"]}]}),
                ),
            ),
            expect: &[
                "spec.namespaceSelector.matchExpressions",
                "operator In or NotIn",
            ],
        },
        BadManifest {
            case: "provider config namespaceSelector In without values",
            manifest: set(
                p("p12"),
                "/spec/namespaceSelector",
                Some(json!({"matchExpressions": [{"key": "tier", "operator": "In"}]})),
            ),
            expect: &[
                "spec.namespaceSelector.matchExpressions",
                "at least one value",
            ],
        },
    ]
}

#[test]
fn bad_manifests_are_rejected_by_the_api_server_naming_the_field() {
    install_crds();
    let ns = namespace("reject");
    let cases: Vec<BadManifest> = bad_grants(&ns)
        .into_iter()
        .chain(bad_provider_configs())
        .chain(bad_key_policies())
        .collect();
    assert!(cases.len() >= 30);
    let mut failures = Vec::new();
    for case in &cases {
        let out = create(&case.manifest);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.success() {
            failures.push(format!("{}: accepted, expected a rejection", case.case));
            continue;
        }
        let missing: Vec<&&str> = case
            .expect
            .iter()
            .filter(|needle| !stderr.contains(**needle))
            .collect();
        if !missing.is_empty() {
            failures.push(format!(
                "{}: message lacks {missing:?}:\n  {stderr}",
                case.case
            ));
        }
        // A rejected object is not stored.
        let kind = case.manifest["kind"].as_str().unwrap();
        let name = case.manifest["metadata"]["name"].as_str().unwrap();
        let exists = kubectl(&["-n", &ns, "get", kind, name], None);
        if exists.status.success() {
            failures.push(format!("{}: rejected, yet {kind}/{name} exists", case.case));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

/// Unknown fields: rejected under strict field validation (kubectl's default), pruned when the
/// client asks for no validation, so a typo never reaches the controller silently as data.
#[test]
fn unknown_field_is_rejected_under_strict_validation_and_pruned_otherwise() {
    install_crds();
    let ns = namespace("unknown");
    let manifest = set(
        seed_grant(&ns, "typo"),
        "/spec/granteePrincipalTyp",
        Some(json!("domain")),
    );

    let strict = kubectl(
        &["create", "--validate=strict", "-f", "-"],
        Some(&manifest.to_string()),
    );
    assert!(
        !strict.status.success(),
        "accepted an unknown field under strict validation"
    );
    let stderr = String::from_utf8_lossy(&strict.stderr);
    assert!(
        stderr.contains("unknown field \"spec.granteePrincipalTyp\""),
        "{stderr}"
    );

    let lax = kubectl(
        &["create", "--validate=false", "-f", "-"],
        Some(&manifest.to_string()),
    );
    assert!(
        lax.status.success(),
        "{}",
        String::from_utf8_lossy(&lax.stderr)
    );
    let stored = get_json(&["-n", &ns, "get", "kmsgrants", "typo"]);
    assert!(
        stored["spec"].get("granteePrincipalTyp").is_none(),
        "unknown field was stored: {stored}"
    );
    assert_eq!(stored["spec"]["granteePrincipalType"], "user");
}

#[test]
fn kubectl_get_shows_the_printer_columns() {
    install_crds();
    let ns = namespace("columns");
    kubectl_ok(
        &["create", "-f", "-"],
        Some(&seed_grant(&ns, "columns").to_string()),
    );
    let table = kubectl_ok(&["get", "kmsg", "-A"], None);
    let header = table.lines().next().unwrap();
    for column in [
        "NAMESPACE",
        "NAME",
        "KEY",
        "ALIAS",
        "GRANTEE",
        "OPERATIONS",
        "READY",
        "REASON",
        "GRANT-ID",
        "AGE",
    ] {
        assert!(
            header.split_whitespace().any(|c| c == column),
            "no {column} column in: {header}"
        );
    }
    let row = table
        .lines()
        .find(|l| l.starts_with(&ns))
        .expect("our object is listed");
    assert!(
        row.contains(SEED_KEY) && row.contains(SEED_PRINCIPAL),
        "{row}"
    );
    assert!(row.contains("describe-key"), "{row}");

    let name = format!("columns-{}", std::process::id());
    kubectl_ok(
        &["create", "-f", "-"],
        Some(&provider_config(&name).to_string()),
    );
    let table = kubectl_ok(&["get", "kmspc", &name], None);
    let header = table.lines().next().unwrap();
    for column in ["NAME", "ENDPOINT", "REGION", "AUTH", "READY", "AGE"] {
        assert!(
            header.split_whitespace().any(|c| c == column),
            "no {column} column in: {header}"
        );
    }
    kubectl_ok(&["delete", "kmspc", &name], None);

    // A key policy: its mode shown, Report by default (the dry run), other clusters kept.
    let name = format!("columns-{}", std::process::id());
    kubectl_ok(&["create", "-f", "-"], Some(&key_policy(&name).to_string()));
    let table = kubectl_ok(&["get", "kmskp", &name], None);
    let mut lines = table.lines();
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "NAME",
            "KEY",
            "MODE",
            "UNMANAGED",
            "OTHER-CLUSTERS",
            "REVOCABLE",
            "READY",
            "AGE"
        ]
    );
    assert!(lines.next().unwrap().contains(" Report "), "{table}");
    let stored = get_json(&["get", "kmskp", &name]);
    assert_eq!(stored["spec"]["undeclaredGrants"], "Report");
    assert_eq!(stored["spec"]["revokeOtherClusters"], false);
    assert!(stored["spec"].get("allowedGrants").is_none(), "{stored}");
    kubectl_ok(&["delete", "kmskp", &name], None);
}

#[test]
fn shipped_examples_are_accepted_by_the_api_server() {
    install_crds();
    // The credentials Secret template lives in the operator's namespace, which `kubectl apply -k
    // deploy/` creates; a server dry run cannot create it, so create it as the install would.
    let repo = std::path::Path::new(support::REPO);
    let operator_namespace = repo.join("deploy/operator/namespace.yaml");
    kubectl_ok(
        &[
            "apply",
            "--server-side",
            "-f",
            operator_namespace.to_str().unwrap(),
        ],
        None,
    );
    let examples = repo.join("deploy/examples");
    for entry in std::fs::read_dir(&examples).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let out = kubectl(
                &["apply", "--dry-run=server", "-f", path.to_str().unwrap()],
                None,
            );
            assert!(
                out.status.success(),
                "{}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}
