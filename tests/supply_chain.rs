//! What a security review of the install reads: the software bill of materials `scripts/sbom`
//! writes (alone and inside the image `scripts/image` packs) and the pins that keep the
//! Dockerfile's build in step with the scripts'.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

const REPO: &str = env!("CARGO_MANIFEST_DIR");
const OPERATOR_BIN: &str = env!("CARGO_BIN_EXE_kmsgrant-operator");
const SBOM_IN_IMAGE: &str = "usr/share/doc/kmsgrant-operator/sbom.cdx.json";

fn script(name: &str) -> PathBuf {
    Path::new(REPO).join("scripts").join(name)
}

fn succeeded(what: &str, output: Output) -> Output {
    assert!(
        output.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// The SBOM of the operator alone, as `scripts/sbom` prints it.
fn operator_sbom() -> Value {
    let output = succeeded(
        "scripts/sbom",
        Command::new(script("sbom")).output().unwrap(),
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

/// name -> versions, from Cargo.lock.
fn locked_versions() -> BTreeMap<String, BTreeSet<String>> {
    let lock = std::fs::read_to_string(Path::new(REPO).join("Cargo.lock")).unwrap();
    let mut versions: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut name = None;
    for line in lock.lines() {
        if let Some(value) = line.strip_prefix("name = ") {
            name = Some(value.trim_matches('"').to_owned());
        } else if let (Some(value), Some(name)) = (line.strip_prefix("version = "), name.take()) {
            versions
                .entry(name)
                .or_default()
                .insert(value.trim_matches('"').to_owned());
        }
    }
    versions
}

/// name -> versions of the crates (`pkg:cargo/` components) the SBOM lists.
fn crates(sbom: &Value) -> BTreeMap<String, BTreeSet<String>> {
    let mut crates: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for component in sbom["components"].as_array().unwrap() {
        if component["purl"]
            .as_str()
            .unwrap()
            .starts_with("pkg:cargo/")
        {
            crates
                .entry(component["name"].as_str().unwrap().to_owned())
                .or_default()
                .insert(component["version"].as_str().unwrap().to_owned());
        }
    }
    crates
}

fn property<'a>(sbom: &'a Value, name: &str) -> &'a str {
    sbom["metadata"]["properties"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .and_then(|p| p["value"].as_str())
        .unwrap_or_else(|| panic!("no metadata property {name}"))
}

/// The fields CycloneDX 1.5 requires, a purl for every crate, and a dependency graph that names
/// only components of the document.
fn assert_valid_cyclonedx(sbom: &Value) {
    assert_eq!(sbom["bomFormat"], "CycloneDX");
    assert_eq!(sbom["specVersion"], "1.5");
    assert_eq!(sbom["version"], 1);
    assert!(
        sbom["serialNumber"]
            .as_str()
            .unwrap()
            .starts_with("urn:uuid:"),
        "{}",
        sbom["serialNumber"]
    );
    let subject = &sbom["metadata"]["component"];
    let mut refs = BTreeSet::from([subject["bom-ref"].as_str().unwrap().to_owned()]);
    for component in sbom["components"].as_array().unwrap() {
        let name = component["name"].as_str().unwrap();
        let version = component["version"].as_str().unwrap();
        assert!(!name.is_empty() && !version.is_empty(), "{component}");
        assert!(component["type"].is_string(), "{component}");
        let purl = component["purl"].as_str().unwrap();
        if purl.starts_with("pkg:cargo/") {
            assert_eq!(
                purl,
                format!("pkg:cargo/{name}@{}", version.replace('+', "%2B")),
                "{component}"
            );
        }
        let bom_ref = component["bom-ref"].as_str().unwrap();
        assert!(refs.insert(bom_ref.to_owned()), "{bom_ref} twice");
    }
    for dependency in sbom["dependencies"].as_array().unwrap() {
        let from = dependency["ref"].as_str().unwrap();
        assert!(refs.contains(from), "dependency of unknown {from}");
        for to in dependency["dependsOn"].as_array().unwrap() {
            assert!(
                refs.contains(to.as_str().unwrap()),
                "{from} -> unknown {to}"
            );
        }
    }
}

#[test]
fn sbom_lists_the_crates_compiled_into_the_operator_at_their_locked_versions() {
    let sbom = operator_sbom();
    assert_valid_cyclonedx(&sbom);
    assert_eq!(sbom["metadata"]["component"]["name"], "kmsgrant-operator");
    let listed = crates(&sbom);
    let locked = locked_versions();
    for name in [
        "kmsgrant-kms",
        "kmsgrant-kms-signer",
        "kube",
        "kube-runtime",
        "k8s-openapi",
        "tokio",
        "rustls",
        "ring",
        "tikv-jemallocator",
        "clap_complete",
    ] {
        let versions = listed
            .get(name)
            .unwrap_or_else(|| panic!("{name} is not listed"));
        assert_eq!(versions, &locked[name], "{name}: listed against Cargo.lock");
    }
    // Every crate listed is one Cargo.lock pins, at a version it pins.
    for (name, versions) in &listed {
        assert!(
            locked
                .get(name)
                .is_some_and(|locked| versions.is_subset(locked)),
            "{name} {versions:?} is not in Cargo.lock"
        );
    }
    let std = sbom["components"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "rust-std")
        .expect("the standard library is listed");
    assert!(std["version"].as_str().unwrap().starts_with("1."), "{std}");
}

#[test]
fn sbom_leaves_out_dev_dependencies_the_emulator_and_what_runs_only_at_compile_time() {
    let listed = crates(&operator_sbom());
    for name in [
        // dev-dependencies only: the emulator never ships, nor do the test helpers
        "kms-emulator",
        "proptest",
        "tempfile",
        // the `otel` feature, which the image does not enable
        "opentelemetry",
        "tracing-opentelemetry",
        // procedural macros and their helpers run in the compiler, not in the binary
        "serde_derive",
        "tokio-macros",
        "syn",
    ] {
        assert!(
            !listed.contains_key(name),
            "{name} is listed but not in the binary"
        );
    }
}

#[test]
fn image_carries_its_sbom_inside_and_next_to_the_tar() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("operator.tar");
    succeeded(
        "scripts/image",
        Command::new(script("image"))
            .args(["--binary", OPERATOR_BIN, "--out"])
            .arg(&image)
            .output()
            .unwrap(),
    );
    let beside = std::fs::read(dir.path().join("operator.sbom.cdx.json"))
        .expect("IMAGE.sbom.cdx.json next to IMAGE.tar");

    // The image's one layer, and the SBOM in it.
    let tar = |args: &[&str], input: Option<&[u8]>| -> Vec<u8> {
        let mut command = Command::new("tar");
        command.args(args);
        let output = match input {
            None => command.output().unwrap(),
            Some(bytes) => {
                let layer = dir.path().join("layer.tar");
                std::fs::write(&layer, bytes).unwrap();
                command.arg("-f").arg(&layer).output().unwrap()
            }
        };
        succeeded(&format!("tar {args:?}"), output).stdout
    };
    let image_path = image.to_str().unwrap();
    let manifest: Value =
        serde_json::from_slice(&tar(&["-xOf", image_path, "manifest.json"], None)).unwrap();
    let layer = tar(
        &[
            "-xOf",
            image_path,
            manifest[0]["Layers"][0].as_str().unwrap(),
        ],
        None,
    );
    let inside = tar(&["-xO", SBOM_IN_IMAGE], Some(&layer));
    assert_eq!(
        inside, beside,
        "the SBOM in the image and next to it differ"
    );

    let sbom: Value = serde_json::from_slice(&inside).unwrap();
    assert_valid_cyclonedx(&sbom);
    let subject = &sbom["metadata"]["component"];
    assert_eq!(subject["type"], "container");
    assert_eq!(subject["name"], "ghcr.io/kmsgrant/kmsgrant-operator");
    // The OS files: each library and the CA bundle under the Debian package it comes from.
    let components = sbom["components"].as_array().unwrap();
    let paths_of = |package: &str| -> Vec<String> {
        let component = components
            .iter()
            .find(|c| c["name"] == package)
            .unwrap_or_else(|| panic!("no {package} in the image's SBOM"));
        assert!(
            component["purl"]
                .as_str()
                .unwrap()
                .starts_with(&format!("pkg:deb/debian/{package}@")),
            "{component}"
        );
        assert!(
            !component["version"].as_str().unwrap().is_empty(),
            "{component}"
        );
        component["properties"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["name"] == "kmsgrant:image-path")
            .map(|p| p["value"].as_str().unwrap().to_owned())
            .collect()
    };
    assert!(
        paths_of("libc6").iter().any(|p| p.ends_with("/libc.so.6")),
        "libc.so.6 under libc6"
    );
    assert_eq!(
        paths_of("ca-certificates"),
        ["/etc/ssl/certs/ca-certificates.crt"]
    );
    assert!(crates(&sbom).contains_key("kmsgrant-operator"));
    // The test build is a plain `cargo build`: no embedded list to check the crates against,
    // and the SBOM says so rather than claiming it was checked.
    assert!(
        property(&sbom, "kmsgrant:crates-check").starts_with("not checked"),
        "{}",
        property(&sbom, "kmsgrant:crates-check")
    );
}

#[test]
fn dockerfile_pins_the_toolchain_and_cargo_auditable_the_scripts_use() {
    let read = |file: &str| std::fs::read_to_string(Path::new(REPO).join(file)).unwrap();
    let value_after = |text: &str, prefix: &str| -> String {
        text.lines()
            .find_map(|line| line.strip_prefix(prefix))
            .unwrap_or_else(|| panic!("no line starting {prefix:?}"))
            .trim()
            .trim_matches('"')
            .to_owned()
    };
    let dockerfile = read("Dockerfile");
    assert_eq!(
        value_after(&dockerfile, "ARG RUST_VERSION="),
        value_after(&read("rust-toolchain.toml"), "channel = "),
    );
    assert_eq!(
        value_after(&dockerfile, "ARG CARGO_AUDITABLE_VERSION="),
        value_after(&read("scripts/cargo-auditable"), "version="),
    );
    assert!(dockerfile.contains("cargo auditable build --release --locked"));
    assert!(read("scripts/image").contains("scripts/cargo-auditable build --release --locked"));
}
