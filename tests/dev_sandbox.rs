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
