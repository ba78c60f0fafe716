//! Shared by the end-to-end tests: a real kube-apiserver + etcd, kubectl, and the CRDs.
//!
//! `scripts/test` starts one control plane for the whole run and passes its kubeconfig in
//! `KMSGRANT_TEST_KUBECONFIG`. Without it (a plain `cargo test`), each test binary starts its own
//! through `scripts/control-plane`, which stops when the test process exits. When neither works the
//! tests fail and say why: nothing is skipped.
#![allow(dead_code)] // Each test binary uses its own part of this module.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

pub const REPO: &str = env!("CARGO_MANIFEST_DIR");
pub const OPERATOR_BIN: &str = env!("CARGO_BIN_EXE_kmsgrant-operator");

/// The kubeconfig of the control plane this test process uses.
pub fn kubeconfig() -> &'static Path {
    static KUBECONFIG: OnceLock<PathBuf> = OnceLock::new();
    KUBECONFIG.get_or_init(|| {
        if let Some(path) = std::env::var_os("KMSGRANT_TEST_KUBECONFIG") {
            let path = PathBuf::from(path);
            assert!(path.is_file(), "KMSGRANT_TEST_KUBECONFIG={} does not exist", path.display());
            return path;
        }
        let dir = std::env::temp_dir().join(format!("kmsgrant-test-{}", std::process::id()));
        let output = Command::new(Path::new(REPO).join("scripts/control-plane"))
            .arg("up")
            .arg(&dir)
            .args(["--owner-pid", &std::process::id().to_string()])
            .stderr(Stdio::inherit())
            .output()
            .expect("cannot run scripts/control-plane");
        assert!(
            output.status.success(),
            "the local control plane did not start (scripts/control-plane up {}): see its messages above",
            dir.display()
        );
        dir.join("kubeconfig")
    })
}

/// Runs kubectl against the test control plane.
pub fn kubectl(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig())
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl must be installed");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    child.wait_with_output().unwrap()
}

/// Runs kubectl and returns stdout, failing the test with kubectl's stderr when it fails.
pub fn kubectl_ok(args: &[&str], stdin: Option<&str>) -> String {
    let out = kubectl(args, stdin);
    assert!(
        out.status.success(),
        "kubectl {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Installs the CRDs exactly as a person would, `kmsgrant-operator crd | kubectl apply -f -`, and waits until they are
/// Established. Once per test process.
pub fn install_crds() {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        let crds = Command::new(OPERATOR_BIN).arg("crd").output().unwrap();
        assert!(crds.status.success(), "kmsgrant-operator crd failed");
        kubectl_ok(
            &["apply", "--server-side", "--force-conflicts", "-f", "-"],
            Some(&String::from_utf8(crds.stdout).unwrap()),
        );
        kubectl_ok(
            &[
                "wait",
                "--for=condition=Established",
                "--timeout=60s",
                "crd/kmsgrants.kmsgrant.io",
                "crd/kmsproviderconfigs.kmsgrant.io",
            ],
            None,
        );
        // Established comes before the API server has published the schema to OpenAPI, which
        // `kubectl explain` and client-side tooling read.
        for kind in ["kmsgrant", "kmsproviderconfig"] {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
            while !kubectl(&["explain", kind], None).status.success() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the {kind} schema was never published to OpenAPI"
                );
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
        }
    });
}

/// A namespace of its own for one test, so tests can run in parallel against one API server.
pub fn namespace(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let name = format!(
        "{prefix}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    kubectl_ok(&["create", "namespace", &name], None);
    name
}
