//! `scripts/node-cluster down` gives the machine back exactly as `up` found it, and `up` refuses
//! clearly where a node cannot run. Needs root like the node tier (tests/node_cluster.rs); where a
//! node cannot run here, the tests print why and return (`KMSGRANT_REQUIRE_NODE=1`: fail instead).

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const REPO: &str = env!("CARGO_MANIFEST_DIR");

fn node_cluster() -> Command {
    Command::new(Path::new(REPO).join("scripts/node-cluster"))
}

fn can_run() -> bool {
    let check = node_cluster().arg("check").output().unwrap();
    if check.status.code() == Some(3) {
        let reason = String::from_utf8_lossy(&check.stderr).trim().to_owned();
        assert!(
            std::env::var_os("KMSGRANT_REQUIRE_NODE").is_none(),
            "KMSGRANT_REQUIRE_NODE is set but {reason}"
        );
        eprintln!("node tier skipped: {reason}");
        return false;
    }
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    true
}

fn snapshot() -> String {
    let out = node_cluster().arg("snapshot").output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

fn kubectl(kubeconfig: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    use std::io::Write;
    let mut child = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    drop(child.stdin.take());
    child.wait_with_output().unwrap()
}

#[test]
fn down_gives_the_host_back_as_it_was_before_up_even_with_a_pod_running() {
    if !can_run() {
        return;
    }
    // A node of an earlier test binary may still be stopping (its watchdog runs `down`).
    let deadline = Instant::now() + Duration::from_secs(300);
    while Path::new("/run/kmsgrant-node-cluster.active").exists() {
        assert!(
            Instant::now() < deadline,
            "another node cluster keeps running"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let before = snapshot();
    let dir = std::env::temp_dir().join(format!("kmsgrant-node-restore.{}", std::process::id()));
    let up = node_cluster()
        .arg("up")
        .arg(&dir)
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    let kubeconfig = dir.join("kubeconfig");
    let mut during = String::new();
    if up.status.success() {
        // A pod, so there are veths, a network namespace, cgroups, mounts and iptables rules.
        let pod = serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "sleeper", "namespace": "default"},
            "spec": {"containers": [{"name": "pause", "image": "localhost/kmsgrant/pause:local", "imagePullPolicy": "Never"}]}
        });
        let applied = kubectl(&kubeconfig, &["apply", "-f", "-"], Some(&pod.to_string()));
        let ready = kubectl(
            &kubeconfig,
            &[
                "wait",
                "--for=condition=Ready",
                "--timeout=120s",
                "pod/sleeper",
            ],
            None,
        );
        during = snapshot();
        assert!(
            applied.status.success() && ready.status.success(),
            "{applied:?} {ready:?}"
        );
    }
    let down = node_cluster()
        .arg("down")
        .arg(&dir)
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(
        up.status.success(),
        "scripts/node-cluster up failed (messages above)"
    );
    assert!(
        down.status.success(),
        "scripts/node-cluster down failed (messages above)"
    );
    assert!(
        during.contains("link kmsgnode0"),
        "the node's bridge existed while it ran:\n{during}"
    );
    assert!(
        during.contains("cgroup "),
        "the pod had cgroups while it ran:\n{during}"
    );

    let after = snapshot();
    let before_lines: std::collections::BTreeSet<&str> = before.lines().collect();
    let after_lines: std::collections::BTreeSet<&str> = after.lines().collect();
    let left: Vec<&&str> = after_lines.difference(&before_lines).collect();
    let lost: Vec<&&str> = before_lines.difference(&after_lines).collect();
    assert!(
        left.is_empty() && lost.is_empty(),
        "left behind: {left:#?}\nlost: {lost:#?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn up_refuses_without_root_naming_what_is_missing() {
    if !can_run() {
        return;
    }
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(Path::new(REPO).join("scripts/node-cluster"))
        .args(["up", "/tmp/kmsgrant-node-never"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("must run as root"), "{stderr}");
    assert!(!Path::new("/tmp/kmsgrant-node-never").exists());
}

#[test]
fn up_refuses_without_cgroups_naming_what_is_missing() {
    if !can_run() {
        return;
    }
    // A private mount namespace where /sys/fs/cgroup is an empty tmpfs: a machine without cgroups.
    let script = format!(
        "mount --make-rprivate / && mount -t tmpfs none /sys/fs/cgroup && exec {}/scripts/node-cluster up /tmp/kmsgrant-node-never",
        REPO
    );
    let out = Command::new("unshare")
        .args(["--mount", "sh", "-c", &script])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cgroup"), "{stderr}");
    assert!(!Path::new("/tmp/kmsgrant-node-never").exists());
}
