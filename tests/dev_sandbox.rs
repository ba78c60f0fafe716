//! `kmsgrant-operator dev`, run as a person would but non-interactively: it starts its own local
//! control plane, brings the example grant to Ready, prints its status and the KUBECONFIG line.
//! And the README's sandbox and docs/getting-started.md, followed command by command.

mod doc_commands;

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
    // Keyless by default: the grant was made with an exchanged ServiceAccount token, no Secret.
    let said = format!("{stdout}{stderr}");
    assert!(
        said.contains("KmsProviderConfig 'default' is keyless: no Secret"),
        "{said}"
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

/// Processes whose command line mentions `needle`, or that are in process group `group`, that are
/// still running (zombies, which have exited, do not count).
fn live_processes(needle: &str, group: u32) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // pid (comm) state ppid pgrp ...; comm may contain spaces, so split after the last ')'.
        let after_comm: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        if after_comm.first() == Some(&"Z") {
            continue;
        }
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|raw| String::from_utf8_lossy(&raw).replace('\0', " "))
            .unwrap_or_default();
        let in_group = after_comm.get(2) == Some(&group.to_string().as_str());
        if cmdline.contains(needle) || in_group {
            found.push(format!("{pid}: {}", cmdline.trim()));
        }
    }
    found
}

#[test]
fn ctrl_c_stops_the_operator_the_emulator_and_the_control_plane() {
    use std::io::BufRead;
    use std::os::unix::process::CommandExt;

    let dir = std::env::temp_dir().join(format!("kmsgrant-dev-ctrl-c-{}", std::process::id()));
    let stderr_path =
        std::env::temp_dir().join(format!("kmsgrant-dev-ctrl-c-{}.log", std::process::id()));
    let _cleanup = StopControlPlane(dir.clone());
    // Its own process group, as a shell gives a foreground job: Ctrl-C signals the whole group.
    let mut dev = Command::new(env!("CARGO_BIN_EXE_kmsgrant-operator"))
        .args(["dev", "--emulator-listen", "127.0.0.1:0", "--dir"])
        .arg(&dir)
        .process_group(0)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .expect("the binary runs");
    let group = dev.id();
    let stdout = dev.stdout.take().unwrap();
    let (lines_tx, lines) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = String::new();
    while !seen.contains("The sandbox is ready") {
        match lines.recv_timeout(std::time::Duration::from_secs(180)) {
            Ok(line) => seen.push_str(&(line + "\n")),
            Err(_) => {
                let _ = dev.kill();
                panic!(
                    "dev did not get ready:\n{seen}\n{}",
                    std::fs::read_to_string(&stderr_path).unwrap_or_default()
                );
            }
        }
    }
    let needle = dir.to_string_lossy().into_owned();
    let started = live_processes(&needle, group);
    assert!(
        started.iter().any(|p| p.contains("kube-apiserver"))
            && started.iter().any(|p| p.contains("etcd")),
        "the sandbox's control plane is not among {started:#?}"
    );

    // Ctrl-C, as the terminal sends it: SIGINT to the foreground process group.
    let sent = Command::new("kill")
        .args(["-INT", "--", &format!("-{group}")])
        .status()
        .unwrap();
    assert!(sent.success());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let status = loop {
        if let Some(status) = dev.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = dev.kill();
            panic!(
                "dev did not stop within 60 s of Ctrl-C:\n{}",
                std::fs::read_to_string(&stderr_path).unwrap_or_default()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
    let left = live_processes(&needle, group);
    assert!(
        left.is_empty(),
        "left running after Ctrl-C: {left:#?}\n(started: {started:#?})\n{stderr}"
    );
    assert!(status.success(), "dev exited with {status}:\n{stderr}");
    assert!(
        stderr.contains("stopping the local control plane"),
        "dev did not say what it stops:\n{stderr}"
    );
    let _ = std::fs::remove_file(&stderr_path);
}

/// Stops a control plane the test's `dev` left behind, so a failing test leaks no process.
struct StopControlPlane(std::path::PathBuf);

impl Drop for StopControlPlane {
    fn drop(&mut self) {
        let _ = Command::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/scripts/control-plane"
        ))
        .arg("down")
        .arg(&self.0)
        .output();
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The test that runs the command blocks of README.md and docs/getting-started.md marked
/// `<!-- run by tests/dev_sandbox.rs::... -->` with its name.
const NEWCOMER: &str = "a_newcomer_reaches_a_ready_grant_following_the_readme_and_getting_started";

/// What a newcomer does: the README's sandbox, then docs/getting-started.md, each command block as
/// written, in order, in a shell of its own (as "in another shell" says) that keeps the `export`s
/// of the blocks before it. The sandbox command (`cargo run --features dev -- dev`) is this test's
/// build of the same binary; it keeps running until the end, when Ctrl-C stops it. The user's
/// home is a fresh directory, so the documented `~/.cache/kmsgrant-operator/dev` is where `dev`
/// puts the sandbox; only the emulator listens on a free port instead of 8480.
#[test]
fn a_newcomer_reaches_a_ready_grant_following_the_readme_and_getting_started() {
    use std::io::BufRead;
    use std::os::unix::process::CommandExt;

    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let steps: Vec<doc_commands::Block> = ["README.md", "docs/getting-started.md"]
        .iter()
        .flat_map(|doc| doc_commands::blocks(repo, doc))
        .filter(|b| b.is_run_by("tests/dev_sandbox.rs", NEWCOMER))
        .collect();
    assert!(
        steps.iter().any(|s| s.doc == "README.md") && steps.len() >= 6,
        "the marked blocks are gone: {steps:#?}"
    );

    let home = tempfile::tempdir().unwrap();
    let real_home = std::path::PathBuf::from(std::env::var_os("HOME").expect("HOME is set"));
    // The cached control-plane binaries (and Go's caches, should they need building) stay where
    // they are; only what the guide touches lives in the new home.
    let cache = std::env::var_os("KMSGRANT_CACHE_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("XDG_CACHE_HOME")
                .map(std::path::PathBuf::from)
                .unwrap_or_else(|| real_home.join(".cache"))
                .join("kmsgrant-operator")
        });
    let shell = |program: &str| {
        let mut command = Command::new(program);
        command
            .current_dir(repo)
            .env("HOME", home.path())
            .env("KMSGRANT_CACHE_DIR", &cache)
            .env("KMSGRANT_DEV_EMULATOR_LISTEN", "127.0.0.1:0")
            .env_remove("XDG_CACHE_HOME")
            .env_remove("KUBECONFIG")
            .env_remove("KMSGRANT_DEV_DIR")
            .env_remove("KMSGRANT_DEV_KUBECONFIG");
        for (var, default) in [("GOPATH", "go"), ("GOCACHE", ".cache/go-build")] {
            if std::env::var_os(var).is_none() {
                command.env(var, real_home.join(default));
            }
        }
        command
    };
    let sandbox_dir = home.path().join(".cache/kmsgrant-operator/dev");
    let _cleanup = StopControlPlane(sandbox_dir.clone());
    let stderr_path = home.path().join("dev.log");

    let mut sandbox = Running(None);
    let mut exports = String::new();
    let mut said = String::new();
    for step in &steps {
        let text = step.text.trim();
        if let Some(args) = text.strip_prefix("cargo run --features dev -- ") {
            // The README and the guide both start it: the second finds it running.
            if sandbox.0.is_some() {
                continue;
            }
            let mut dev = shell(env!("CARGO_BIN_EXE_kmsgrant-operator"))
                .args(args.split_whitespace())
                .process_group(0)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::piped())
                .stderr(std::fs::File::create(&stderr_path).unwrap())
                .spawn()
                .expect("the binary runs");
            let stdout = dev.stdout.take().unwrap();
            sandbox.0 = Some(dev);
            let (lines_tx, lines) = std::sync::mpsc::channel::<String>();
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if lines_tx.send(line).is_err() {
                        break;
                    }
                }
            });
            // Up to its last line, which names the emulator.
            let mut seen = String::new();
            while !seen.contains("KMS emulator:") {
                match lines.recv_timeout(std::time::Duration::from_secs(300)) {
                    Ok(line) => seen.push_str(&(line + "\n")),
                    Err(_) => {
                        panic!(
                            "{}: the sandbox did not get ready:\n{seen}\n{}",
                            step.at(),
                            std::fs::read_to_string(&stderr_path).unwrap_or_default()
                        );
                    }
                }
            }
            // The line the docs tell the reader to paste is the one `dev` prints.
            let printed = format!(
                "export KUBECONFIG={}",
                sandbox_dir.join("kubeconfig").display()
            );
            assert!(seen.contains(&printed), "dev printed:\n{seen}");
            continue;
        }
        assert!(
            !text.contains("cargo run"),
            "{}: the sandbox command keeps running, so it stands alone in its block",
            step.at()
        );
        assert!(
            sandbox.0.is_some(),
            "{}: runs before the sandbox",
            step.at()
        );
        let out = shell("bash")
            .arg("-c")
            .arg(format!("set -euo pipefail\n{exports}{text}\n"))
            .output()
            .unwrap();
        let output = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("--- {}\n{text}\n--- output\n{output}", step.at());
        assert!(
            out.status.success(),
            "{}: failed ({}):\n{text}\n{output}\nthe sandbox said:\n{}",
            step.at(),
            out.status,
            std::fs::read_to_string(&stderr_path).unwrap_or_default()
        );
        for line in text.lines().filter(|l| l.starts_with("export ")) {
            exports.push_str(line);
            exports.push('\n');
        }
        said.push_str(&output);
    }

    // What the guide says the reader sees.
    for word in [
        "GrantReady",
        "k8s/",
        "reports-decrypt",
        "GrantCreated",
        "GrantReplaced",
        "GrantRevoked",
    ] {
        assert!(said.contains(word), "the guide promises {word}:\n{said}");
    }

    // Ctrl-C in the first shell.
    let dev = sandbox.0.as_mut().expect("a block starts the sandbox");
    let group = dev.id();
    let sent = Command::new("kill")
        .args(["-INT", "--", &format!("-{group}")])
        .status()
        .unwrap();
    assert!(sent.success());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let status = loop {
        if let Some(status) = dev.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            panic!("dev did not stop within 60 s of Ctrl-C");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert!(
        status.success(),
        "dev exited with {status}:\n{}",
        std::fs::read_to_string(&stderr_path).unwrap_or_default()
    );
}

/// A `dev` in a process group of its own: killed with its group if the test ends before it does.
struct Running(Option<std::process::Child>);

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0
            && matches!(child.try_wait(), Ok(None))
        {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", child.id())])
                .status();
            let _ = child.wait();
        }
    }
}
