//! `kmsgrant-operator dev`, run as a person would but non-interactively: it starts its own local
//! control plane, brings the example grant to Ready, prints its status and the KUBECONFIG line.

use std::process::Command;

#[test]
fn dev_brings_the_example_grant_to_ready_and_prints_the_kubeconfig_line() {
    let dir = std::env::temp_dir().join(format!("kmsgrant-dev-test-{}", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_kmsgrant-operator"))
        .args([
            "dev",
            "--exit-when-ready",
            "--emulator-listen",
            "127.0.0.1:0",
            "--dir",
        ])
        .arg(&dir)
        .output()
        .expect("the binary runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "dev failed:\n{stdout}\n{stderr}");
    assert!(
        stdout.contains(&format!(
            "export KUBECONFIG={}",
            dir.join("kubeconfig").display()
        )),
        "{stdout}"
    );
    let ready = stdout
        .lines()
        .find(|l| l.trim_start().starts_with("Ready"))
        .unwrap_or_default();
    assert!(
        ready.contains("True") && ready.contains("GrantReady"),
        "not Ready:\n{stdout}"
    );
    let grant_id = stdout
        .lines()
        .find_map(|l| l.trim_start().strip_prefix("grant id"))
        .unwrap_or_default()
        .trim();
    assert!(
        grant_id.len() == 64 && grant_id.chars().all(|c| c.is_ascii_hexdigit()),
        "{stdout}"
    );
    // --exit-when-ready also stopped the control plane it started.
    let status = Command::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/scripts/control-plane"
    ))
    .arg("status")
    .arg(&dir)
    .status()
    .unwrap();
    assert!(
        !status.success(),
        "the control plane in {} is still running",
        dir.display()
    );
    let _ = std::fs::remove_dir_all(&dir);
}
