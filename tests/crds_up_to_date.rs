//! `crds/` is generated from the Rust types; this fails when someone changes one but not the other.

use std::path::Path;

#[test]
fn committed_crd_yaml_matches_the_types() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("crds");
    for crd in kmsgrant::api::crds() {
        let file = dir.join(kmsgrant::api::crd_file_name(&crd));
        let committed = std::fs::read_to_string(&file).unwrap_or_default();
        assert!(
            committed == kmsgrant::api::crd_yaml(&crd),
            "{} is out of date: run `cargo run -- crd --output-dir crds` and commit the result",
            file.display()
        );
    }
}

#[test]
fn kustomization_lists_every_crd_file() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("crds");
    let kustomization = std::fs::read_to_string(dir.join("kustomization.yaml")).unwrap();
    for crd in kmsgrant::api::crds() {
        let file = kmsgrant::api::crd_file_name(&crd);
        assert!(
            kustomization.contains(&file),
            "crds/kustomization.yaml does not list {file}"
        );
    }
}

#[test]
fn crd_command_prints_every_crd() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kmsgrant-operator"))
        .arg("crd")
        .output()
        .unwrap();
    assert!(out.status.success());
    let printed = String::from_utf8(out.stdout).unwrap();
    for crd in kmsgrant::api::crds() {
        assert!(
            printed.contains(&kmsgrant::api::crd_yaml(&crd)),
            "`crd` does not print {:?}",
            crd.metadata.name
        );
    }
}
