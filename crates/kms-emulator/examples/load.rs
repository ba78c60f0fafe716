//! Load benchmark of the emulator over loopback (a command, not a test):
//!
//! ```text
//! cargo run --release -p kms-emulator --example load -- [SECONDS] [CONCURRENCY]
//! ```
//!
//! Starts the emulator in-process on a free port, then for SECONDS (default 5) per phase keeps
//! CONCURRENCY (default 32) keep-alive clients busy with: list-grants on a key with 10 grants,
//! list-grants on a key with 100 grants (one full page), list-grants with every request signed
//! (`SDK-HMAC-SHA256`, `Access=` variant, by `kmsgrant_kms_signer`) instead of a token, and
//! create-grant. Prints requests per second and the status counts of each phase. Client and
//! server share the machine, so the figures are a lower bound for the emulator alone.
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::HeaderMap;
use kms_emulator::{Emulator, EmulatorConfig, TokenScope};
use kmsgrant_kms_signer::{
    self as signer, self, AccessKeyPair, RequestParts, SdkDateTime, SignatureHeaders, SigningScheme,
};
use serde_json::{Value, json};

struct Phase {
    name: &'static str,
    action: &'static str,
    body: Value,
    /// Sign every request with this key pair instead of sending the token.
    signed_by: Option<AccessKeyPair>,
}

/// `X-Sdk-Date` and `Authorization` for a POST of `body` to `url`, signing `content-type`.
fn signature_headers(url: &str, body: &[u8], credentials: &AccessKeyPair) -> SignatureHeaders {
    let parsed = reqwest::Url::parse(url).expect("valid URL");
    let mut headers = HeaderMap::new();
    headers.insert(
        "content-type",
        "application/json".parse().expect("valid header"),
    );
    let request = RequestParts {
        method: "POST",
        path: parsed.path(),
        query: parsed.query().unwrap_or(""),
        headers: &headers,
        body,
    };
    signer::sign(
        &request,
        credentials,
        &SigningScheme::Access,
        SdkDateTime::now(),
    )
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
    let body = Arc::new(serde_json::to_vec(&phase.body).expect("body serialises"));
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (http, url, token, body) = (http.clone(), url.clone(), token.to_owned(), body.clone());
        let signed_by = phase.signed_by.clone();
        workers.push(tokio::spawn(async move {
            let mut statuses: BTreeMap<u16, u64> = BTreeMap::new();
            while Instant::now() < deadline {
                let mut request = http
                    .post(&url)
                    .header("Content-Type", "application/json")
                    .body(body.as_ref().clone());
                request = match &signed_by {
                    None => request.header("X-Auth-Token", &token),
                    Some(credentials) => {
                        let signed = signature_headers(&url, &body, credentials);
                        request
                            .header("X-Sdk-Date", signed.x_sdk_date)
                            .header("Authorization", signed.authorization)
                    }
                };
                let response = request.send().await.expect("the emulator answers");
                let status = response.status().as_u16();
                let _ = response.bytes().await.expect("body");
                *statuses.entry(status).or_default() += 1;
            }
            statuses
        }));
    }
    let mut statuses: BTreeMap<u16, u64> = BTreeMap::new();
    for worker in workers {
        for (status, count) in worker.await.expect("worker") {
            *statuses.entry(status).or_default() += count;
        }
    }
    let total: u64 = statuses.values().sum();
    (total as f64 / started.elapsed().as_secs_f64(), statuses)
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let seconds: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(5);
    let concurrency: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(32);
    // reqwest is built without a TLS provider; plain http needs none, but the builder wants one.
    let _ = rustls::crypto::ring::default_provider().install_default();

    // No grant quota, so create-grant can run for the whole phase on one key.
    let config = EmulatorConfig {
        grants_per_key: usize::MAX,
        ..EmulatorConfig::for_tests()
    };
    let emulator = Emulator::start(config).await.expect("emulator starts");
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .build()
        .expect("client");
    let project = TokenScope::Project(emulator.config().project_id.clone());
    let (token, _) = emulator
        .admin()
        .issue_token(&emulator.config().user_id, project, 3600);
    let url = |action: &str| format!("{}/kms/{action}", emulator.kms_endpoint());

    let mut keys = Vec::new();
    for (alias, grants) in [("load-10", 10), ("load-100", 100), ("load-create", 0)] {
        let created: Value = http
            .post(url("create-key"))
            .header("X-Auth-Token", &token)
            .json(&json!({"key_alias": alias}))
            .send()
            .await
            .expect("create-key")
            .json()
            .await
            .expect("create-key answer");
        let key_id = created["key_info"]["key_id"]
            .as_str()
            .expect("key_id")
            .to_owned();
        for i in 0..grants {
            let grant = json!({"key_id": key_id, "grantee_principal": format!("user{i}"),
                               "operations": ["describe-key", "encrypt-datakey"], "name": format!("grant-{i}")});
            http.post(url("create-grant"))
                .header("X-Auth-Token", &token)
                .json(&grant)
                .send()
                .await
                .expect("create-grant");
        }
        keys.push(key_id);
    }
    let credentials = AccessKeyPair {
        access_key: emulator.config().access_key.clone(),
        secret_key: emulator.config().secret_key.as_str().into(),
    };
    let list = |key: &str| json!({"key_id": key, "limit": "100"});
    let phases = [
        Phase {
            name: "list-grants (10 grants)",
            action: "list-grants",
            body: list(&keys[0]),
            signed_by: None,
        },
        Phase {
            name: "list-grants (100 grants)",
            action: "list-grants",
            body: list(&keys[1]),
            signed_by: None,
        },
        Phase {
            name: "list-grants signed (10)",
            action: "list-grants",
            body: list(&keys[0]),
            signed_by: Some(credentials),
        },
        Phase {
            name: "create-grant",
            action: "create-grant",
            body: json!({"key_id": keys[2], "grantee_principal": "loaduser", "operations": ["describe-key"]}),
            signed_by: None,
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
