//! `kmsgrant-operator migrate -f`, run as a user runs it on a checkout: which files change, what
//! it prints, and its exit code.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

const GRANT: &str = "\
# Team A's app may encrypt with the team key.
apiVersion: kmsgrant.io/v1alpha1
kind: KmsGrant
metadata:
  name: app-key
  namespace: team-a
spec:
  providerConfigRef:
    name: default
  name: my-old-grant   # from before the identity change
  keyId: bb6a3d22-dc93-47ac-b5bd-88df7ad35f1e
  granteePrincipal: 13gg44z4g2sglzk0egw0u726zoyzvrs8
  operations: [describe-key, encrypt-datakey]
";

const MIGRATED_GRANT: &str = "\
# Team A's app may encrypt with the team key.
apiVersion: kmsgrant.io/v1beta1
kind: KmsGrant
metadata:
  name: app-key
  namespace: team-a
spec:
  providerConfigRef:
    name: default
  keyId: bb6a3d22-dc93-47ac-b5bd-88df7ad35f1e
  granteePrincipal: 13gg44z4g2sglzk0egw0u726zoyzvrs8
  operations: [describe-key, encrypt-datakey]
";

const CONFIG: &str = "\
apiVersion: v1
kind: Namespace
metadata:
  name: team-a
---
apiVersion: \"kmsgrant.io/v1alpha1\"
kind: KmsProviderConfig
metadata:
  name: default
spec:
  endpoint: https://kms.eu-de.otc.t-systems.com
";

const HELM: &str = "\
apiVersion: kmsgrant.io/v1alpha1
kind: KmsGrant
metadata:
  name: {{ .Release.Name }}
spec:
  keyId: {{ .Values.keyId }}
";

/// A checkout: a grant with spec.name, a two-document file, an unrelated file, and a copy under
/// `.git` that must never be touched.
fn checkout() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let app = dir.path().join("deploy/app");
    fs::create_dir_all(&app).unwrap();
    fs::create_dir_all(dir.path().join(".git")).unwrap();
    fs::write(app.join("grant.yaml"), GRANT).unwrap();
    fs::set_permissions(app.join("grant.yaml"), fs::Permissions::from_mode(0o640)).unwrap();
    fs::write(app.join("config.yml"), CONFIG).unwrap();
    fs::write(app.join("README.md"), GRANT).unwrap();
    fs::write(dir.path().join(".git/grant.yaml"), GRANT).unwrap();
    dir
}

fn migrate(dir: &Path, args: &[&str]) -> (Output, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_kmsgrant-operator"))
        .arg("migrate")
        .args(args)
        .current_dir(dir)
        .env_remove("KMSGRANT_MIGRATE_FILENAME")
        .env_remove("KMSGRANT_MIGRATE_DRY_RUN")
        .output()
        .unwrap();
    let stdout = String::from_utf8(out.stdout.clone()).unwrap();
    (out, stdout)
}

fn read(dir: &Path, path: &str) -> String {
    fs::read_to_string(dir.join(path)).unwrap()
}

#[test]
fn rewrites_a_checkout_in_place_prints_each_change_and_a_second_run_changes_nothing() {
    let dir = checkout();
    let (out, stdout) = migrate(dir.path(), &["-f", "deploy"]);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert_eq!(
        stdout,
        "deploy/app/config.yml: KmsProviderConfig default: apiVersion kmsgrant.io/v1alpha1 -> \
         kmsgrant.io/v1beta1\n\
         deploy/app/grant.yaml: KmsGrant team-a/app-key: apiVersion kmsgrant.io/v1alpha1 -> \
         kmsgrant.io/v1beta1\n\
         deploy/app/grant.yaml: KmsGrant team-a/app-key: removed spec.name \"my-old-grant\" (the \
         grant of that name was left on KMS: import it with spec.importGrantId or revoke it; see \
         docs/versioning.md)\n\
         files scanned: 2, documents rewritten: 2, spec.name values removed: 1, documents left \
         for hand editing: 0\n"
    );
    assert_eq!(read(dir.path(), "deploy/app/grant.yaml"), MIGRATED_GRANT);
    assert_eq!(
        read(dir.path(), "deploy/app/config.yml"),
        CONFIG.replace("\"kmsgrant.io/v1alpha1\"", "\"kmsgrant.io/v1beta1\"")
    );
    let mode = fs::metadata(dir.path().join("deploy/app/grant.yaml"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o640, "the file keeps its permissions");
    assert_eq!(read(dir.path(), "deploy/app/README.md"), GRANT);
    assert_eq!(read(dir.path(), ".git/grant.yaml"), GRANT);
    let leftovers: Vec<_> = fs::read_dir(dir.path().join("deploy/app"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|name| name.to_string_lossy().starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");

    let (out, stdout) = migrate(dir.path(), &["-f", "deploy"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        stdout,
        "files scanned: 2, documents rewritten: 0, spec.name values removed: 0, documents left \
         for hand editing: 0\n"
    );
    assert_eq!(read(dir.path(), "deploy/app/grant.yaml"), MIGRATED_GRANT);
}

#[test]
fn dry_run_prints_the_same_changes_and_writes_nothing() {
    let dir = checkout();
    let (out, stdout) = migrate(
        dir.path(),
        &["--dry-run", "-f", "deploy/app/grant.yaml,deploy"],
    );
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("deploy/app/grant.yaml: KmsGrant team-a/app-key: removed spec.name"));
    assert!(stdout.ends_with(
        "dry run, nothing written: files scanned: 2, documents rewritten: 2, spec.name values \
         removed: 1, documents left for hand editing: 0\n"
    ));
    assert_eq!(read(dir.path(), "deploy/app/grant.yaml"), GRANT);
    assert_eq!(read(dir.path(), "deploy/app/config.yml"), CONFIG);

    // The same through the environment.
    let out = Command::new(env!("CARGO_BIN_EXE_kmsgrant-operator"))
        .arg("migrate")
        .current_dir(dir.path())
        .env("KMSGRANT_MIGRATE_FILENAME", "deploy")
        .env("KMSGRANT_MIGRATE_DRY_RUN", "true")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(read(dir.path(), "deploy/app/grant.yaml"), GRANT);
}

#[test]
fn exits_1_and_leaves_a_helm_template_as_it_was_while_rewriting_the_rest() {
    let dir = checkout();
    let templates = dir.path().join("chart/templates");
    fs::create_dir_all(&templates).unwrap();
    fs::write(templates.join("grant.yaml"), HELM).unwrap();
    let (out, stdout) = migrate(dir.path(), &["-f", "chart,deploy"]);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.starts_with(
            "chart/templates/grant.yaml: document 1 at line 1: not rewritten: it \
             holds Helm template syntax ({{ }}) and is not YAML until rendered; edit it by hand\n"
        ),
        "{stdout}"
    );
    assert!(stdout.ends_with("documents left for hand editing: 1\n"));
    assert_eq!(read(dir.path(), "chart/templates/grant.yaml"), HELM);
    assert_eq!(read(dir.path(), "deploy/app/grant.yaml"), MIGRATED_GRANT);
}

#[test]
fn exits_2_without_filename_or_with_a_path_that_does_not_exist() {
    let dir = checkout();
    let (out, _) = migrate(dir.path(), &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("-f/--filename"));

    let (out, _) = migrate(dir.path(), &["-f", "deploy,missing"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read missing:"));
    assert_eq!(
        read(dir.path(), "deploy/app/grant.yaml"),
        MIGRATED_GRANT,
        "the paths that exist are still migrated"
    );
}
