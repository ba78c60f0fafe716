//! `scripts/node-demo`, the one command docs/development.md gives for the operator as pods on a
//! real node, run to the Ready grant with `--exit-when-ready`: node, image, the chart installed
//! with the steps of docs/install.md, the emulator on the node's address, the example grant Ready
//! through the operator's pod, and the host given back.
//!
//! Gated as tests/node_cluster.rs is: where a node cannot run (not root, no cgroups) the test
//! prints why and returns; `KMSGRANT_REQUIRE_NODE=1` (CI) makes that a failure. It brings up a
//! node of its own, so it runs after tests/node_cluster.rs's node is down (cargo runs the test
//! binaries one at a time).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const REPO: &str = env!("CARGO_MANIFEST_DIR");
const OPERATOR_BIN: &str = env!("CARGO_BIN_EXE_kmsgrant-operator");

fn script(name: &str) -> PathBuf {
    Path::new(REPO).join("scripts").join(name)
}

/// The `kms-emulator` binary of this build: the workspace's test build (`scripts/test`) puts it
/// next to the operator's. Built here only when this test runs alone, in a directory of its own
/// so as not to wait for the lock of the build that runs this test.
fn emulator_binary() -> PathBuf {
    let beside = Path::new(OPERATOR_BIN).with_file_name("kms-emulator");
    if beside.exists() {
        return beside;
    }
    let target = Path::new(OPERATOR_BIN)
        .parent()
        .unwrap()
        .join("node-demo-emulator");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let built = Command::new(cargo)
        .current_dir(REPO)
        .args([
            "build",
            "--locked",
            "-p",
            "kms-emulator",
            "--bin",
            "kms-emulator",
        ])
        .arg("--target-dir")
        .arg(&target)
        .stderr(Stdio::inherit())
        .status()
        .unwrap();
    assert!(built.success(), "building kms-emulator failed");
    target.join("debug/kms-emulator")
}

#[test]
fn node_demo_readies_the_example_grant_through_the_pod_and_gives_the_host_back() {
    let check = Command::new(script("node-cluster"))
        .arg("check")
        .output()
        .unwrap();
    if check.status.code() == Some(3) {
        let reason = String::from_utf8_lossy(&check.stderr).trim().to_owned();
        assert!(
            std::env::var_os("KMSGRANT_REQUIRE_NODE").is_none(),
            "KMSGRANT_REQUIRE_NODE is set but {reason}"
        );
        eprintln!("node tier skipped: {reason}");
        return;
    }
    assert!(
        check.status.success(),
        "scripts/node-cluster check: {}",
        String::from_utf8_lossy(&check.stderr)
    );

    let emulator = emulator_binary();
    let dir = std::env::temp_dir().join(format!("kmsgrant-node-demo.{}", std::process::id()));
    let started = std::time::Instant::now();
    let out = Command::new(script("node-demo"))
        .args(["--exit-when-ready", "--operator-binary", OPERATOR_BIN])
        .arg("--emulator-binary")
        .arg(&emulator)
        .arg(&dir)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "scripts/node-demo failed (messages above):\n{stdout}"
    );
    eprintln!(
        "figure: scripts/node-demo to a Ready grant and back in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    // What it prints: the operator's pods, the grant Ready, and the KUBECONFIG line.
    assert!(
        stdout.contains(&format!(
            "export KUBECONFIG={}",
            dir.join("kubeconfig").display()
        )),
        "{stdout}"
    );
    let grant = stdout
        .lines()
        .find(|l| l.contains("app-encrypt"))
        .unwrap_or_else(|| panic!("the example grant is not listed:\n{stdout}"));
    assert!(
        grant.contains("True") && grant.contains("GrantReady"),
        "not Ready: {grant}"
    );
    assert!(
        stdout
            .lines()
            .filter(|l| l.starts_with("kmsgrant-operator-") && l.contains("Running"))
            .count()
            >= 1,
        "no operator pod running:\n{stdout}"
    );

    // The node is down and the host given back (tests/node_host_restore.rs compares it all; here
    // the bridge and the node's processes).
    assert!(
        !Path::new("/sys/class/net/kmsgnode0").exists(),
        "the node's bridge is still there"
    );
    let needle = dir.to_string_lossy().into_owned();
    let left: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|raw| String::from_utf8_lossy(&raw).replace('\0', " "))
        .filter(|cmdline| cmdline.contains(&needle))
        .collect();
    assert!(left.is_empty(), "left running: {left:#?}");
    let _ = std::fs::remove_dir_all(&dir);
}
