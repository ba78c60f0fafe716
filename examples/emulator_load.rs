//! Load benchmark of the emulator over loopback (a command, not a test):
//!
//! ```text
//! cargo run --release --example emulator_load -- [SECONDS] [CONCURRENCY]
//! ```
//!
//! Starts the emulator in-process on a free port, then for SECONDS (default 5) per phase keeps
//! CONCURRENCY (default 32) keep-alive clients busy with: list-grants on a key with 10 grants,
//! list-grants on a key with 100 grants (one full page), and create-grant. Prints requests per
//! second and the status counts of each phase.
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kmsgrant::emulator::{Emulator, EmulatorConfig};
use serde_json::{Value, json};

struct Phase {
    name: &'static str,
    action: &'static str,
    body: Value,
}

async fn run_phase(
    http: &reqwest::Client,
    url: String,
    token: &str,
    phase: &Phase,
    seconds: u64,
    concurrency: usize,
) -> (f64, BTreeMap<u16, u64>) {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let body = Arc::new(serde_json::to_vec(&phase.body).unwrap());
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (http, url, token, body) = (http.clone(), url.clone(), token.to_owned(), body.clone());
        workers.push(tokio::spawn(async move {
            let mut statuses: BTreeMap<u16, u64> = BTreeMap::new();
            while Instant::now() < deadline {
                let response = http
                    .post(&url)
                    .header("X-Auth-Token", &token)
                    .header("Content-Type", "application/json")
                    .body(body.as_ref().clone())
                    .send()
                    .await
                    .expect("request");
                let status = response.status().as_u16();
                let _ = response.bytes().await.expect("body");
                *statuses.entry(status).or_default() += 1;
            }
            statuses
        }));
    }
    let mut statuses: BTreeMap<u16, u64> = BTreeMap::new();
    for worker in workers {
        for (status, count) in worker.await.unwrap() {
            *statuses.entry(status).or_default() += count;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let total: u64 = statuses.values().sum();
    let _ = phase.name;
    (total as f64 / elapsed, statuses)
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let seconds: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(5);
    let concurrency: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(32);
    let _ = rustls::crypto::ring::default_provider().install_default();

    let config = EmulatorConfig {
        grants_per_key: usize::MAX,
        ..EmulatorConfig::for_tests()
    };
    let emulator = Emulator::start(config).await.expect("emulator starts");
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .build()
        .unwrap();
    let (token, _) = emulator.admin().issue_token(
        &emulator.config().user_id,
        kmsgrant::emulator::TokenScope::Project(emulator.config().project_id.clone()),
        3600,
    );
    let url = |action: &str| format!("{}/kms/{action}", emulator.kms_endpoint());
    let mut keys = Vec::new();
    for (alias, grants) in [("load-10", 10), ("load-100", 100), ("load-create", 0)] {
        let created: Value = http
            .post(url("create-key"))
            .header("X-Auth-Token", &token)
            .json(&json!({"key_alias": alias}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let key_id = created["key_info"]["key_id"].as_str().unwrap().to_owned();
        for i in 0..grants {
            let grant = json!({"key_id": key_id, "grantee_principal": format!("user{i}"), "operations": ["describe-key", "encrypt-datakey"], "name": format!("grant-{i}")});
            http.post(url("create-grant"))
                .header("X-Auth-Token", &token)
                .json(&grant)
                .send()
                .await
                .unwrap();
        }
        keys.push(key_id);
    }
    let phases = [
        Phase {
            name: "list-grants (10 grants)",
            action: "list-grants",
            body: json!({"key_id": keys[0], "limit": "100"}),
        },
        Phase {
            name: "list-grants (100 grants)",
            action: "list-grants",
            body: json!({"key_id": keys[1], "limit": "100"}),
        },
        Phase {
            name: "create-grant",
            action: "create-grant",
            body: json!({"key_id": keys[2], "grantee_principal": "loaduser", "operations": ["describe-key"]}),
        },
    ];
    println!(
        "emulator load over loopback: {seconds} s per phase, {concurrency} concurrent keep-alive clients"
    );
    for phase in &phases {
        let (rate, statuses) = run_phase(
            &http,
            url(phase.action),
            &token,
            phase,
            seconds,
            concurrency,
        )
        .await;
        println!(
            "{:<26} {:>9.0} requests/s   statuses {:?}",
            phase.name, rate, statuses
        );
    }
    emulator.shutdown().await;
}
