//! The KMS client against broken or hostile endpoints: tiny scripted HTTP servers on loopback
//! that redirect, send endless bodies, loop the list walk, shout in error messages or never answer.
//! Each test proves a bound: credentials stay with the configured host, memory and time stay small.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use kmsgrant_kms::signer::AccessKeyPair;
use kmsgrant_kms::{
    ClientConfig, Credentials, ErrorReason, KmsClient, MAX_ERROR_MESSAGE_CHARS, Project,
    RetryPolicy, SecretString,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const KEY: &str = "bb6a3d22-dc93-47ac-b5bd-88df7ad35f1e";
const PASSWORD: &str = "hunter2-password-never-elsewhere";
const TOKEN: &str = "MIIE-the-iam-token-never-elsewhere";
const SECURITY_TOKEN: &str = "temporary-security-token-never-elsewhere";

/// How the scripted server answers one request.
enum Reply {
    /// These bytes, then the connection stays open for the next request.
    Bytes(String),
    /// `size` bytes of body in 64 KiB writes, with or without a Content-Length.
    Huge { size: usize, declare_length: bool },
    /// Never answer.
    Silence,
}

fn json_reply(status: &str, headers: &str, body: &str) -> Reply {
    Reply::Bytes(format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\n{headers}content-length: {}\r\n\r\n{body}",
        body.len()
    ))
}

/// One request as received: the request line, headers and body, as text.
#[derive(Clone, Debug)]
struct Received {
    head: String,
    body: String,
}

impl Received {
    fn path(&self) -> &str {
        self.head.split(' ').nth(1).unwrap_or_default()
    }
}

type Script = Arc<dyn Fn(&Received, usize) -> Reply + Send + Sync>;

/// A server on `ip:0` answering by `script` (given the request and how many came before it);
/// returns its base URL and everything it received.
async fn scripted_server(ip: &str, script: Script) -> (String, Arc<Mutex<Vec<Received>>>) {
    let listener = TcpListener::bind((ip, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let received = log.clone();
    tokio::spawn(async move {
        loop {
            let Ok((socket, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(serve(socket, script.clone(), received.clone()));
        }
    });
    (format!("http://{addr}"), log)
}

async fn serve(mut socket: TcpStream, script: Script, log: Arc<Mutex<Vec<Received>>>) {
    let mut buffer = Vec::new();
    loop {
        // Read one request: the head up to the blank line, then Content-Length bytes of body.
        let head_end = loop {
            if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            let mut chunk = [0u8; 8192];
            match socket.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
        let length = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().parse::<usize>().unwrap_or(0))
            })
            .unwrap_or(0);
        while buffer.len() < head_end + length {
            let mut chunk = [0u8; 8192];
            match socket.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            }
        }
        let request = Received {
            head,
            body: String::from_utf8_lossy(&buffer[head_end..head_end + length]).into_owned(),
        };
        buffer.drain(..head_end + length);
        let count = {
            let mut log = log.lock().unwrap();
            log.push(request.clone());
            log.len() - 1
        };
        match script(&request, count) {
            Reply::Bytes(bytes) => {
                if socket.write_all(bytes.as_bytes()).await.is_err() {
                    return;
                }
            }
            Reply::Huge {
                size,
                declare_length,
            } => {
                let head = if declare_length {
                    format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {size}\r\n\r\n"
                    )
                } else {
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n\r\n"
                        .to_owned()
                };
                if socket.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                let chunk = vec![b' '; 64 * 1024];
                let mut sent = 0;
                while sent < size {
                    if socket.write_all(&chunk).await.is_err() {
                        return;
                    }
                    sent += chunk.len();
                }
                return;
            }
            Reply::Silence => {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                return;
            }
        }
    }
}

fn fast_retries(config: &mut ClientConfig) {
    config.allow_http = true;
    config.retry = RetryPolicy {
        max_attempts: 3,
        initial_backoff: Duration::from_millis(5),
        max_backoff: Duration::from_millis(20),
        deadline: Duration::from_secs(5),
    };
}

fn access_key_config(endpoint: &str) -> ClientConfig {
    let credentials = Credentials::AccessKey {
        keys: AccessKeyPair::new("AK", "SK"),
        security_token: Some(SecretString::from(SECURITY_TOKEN)),
    };
    let mut config = ClientConfig::new(endpoint, Project::Id("p".into()), credentials);
    fast_retries(&mut config);
    config
}

fn password_config(endpoint: &str, iam: &str) -> ClientConfig {
    let credentials = Credentials::Password {
        username: "alice".into(),
        password: SecretString::from(PASSWORD),
        domain_name: "acme".into(),
    };
    let mut config = ClientConfig::new(endpoint, Project::Id("p".into()), credentials);
    config.iam_endpoint = Some(iam.into());
    fast_retries(&mut config);
    config
}

/// The host a redirect sends to: another loopback address, as another machine would be.
async fn elsewhere() -> (String, Arc<Mutex<Vec<Received>>>) {
    scripted_server(
        "127.0.0.2",
        Arc::new(|_, _| json_reply("200 OK", "", r#"{"quotas": {"resources": []}}"#)),
    )
    .await
}

fn redirect_to(target: &str, path: &str) -> Reply {
    Reply::Bytes(format!(
        "HTTP/1.1 307 Temporary Redirect\r\nlocation: {target}{path}\r\ncontent-length: 0\r\n\r\n"
    ))
}

#[tokio::test]
async fn a_redirect_to_another_host_is_refused_and_no_credential_arrives_there() {
    let (other, other_log) = elsewhere().await;

    // IAM answers the password request with a 307: the password body must not be re-sent.
    let target = other.clone();
    let (iam, _) = scripted_server(
        "127.0.0.1",
        Arc::new(move |_, _| redirect_to(&target, "/v3/auth/tokens")),
    )
    .await;
    let kms = KmsClient::new(password_config(&iam, &iam)).unwrap();
    let err = kms.user_quotas().await.unwrap_err();
    assert_eq!(err.reason, ErrorReason::RedirectRefused, "{err}");
    assert!(err.message.contains("127.0.0.2"), "{err}");

    // IAM works, KMS redirects: the X-Auth-Token must not travel.
    let target = other.clone();
    let (server, log) = scripted_server(
        "127.0.0.1",
        Arc::new(move |request, _| {
            if request.path().starts_with("/v3/auth/tokens") {
                json_reply(
                    "201 Created",
                    &format!("x-subject-token: {TOKEN}\r\n"),
                    r#"{"token": {"expires_at": "2099-01-01T00:00:00Z", "project": {"id": "p"}}}"#,
                )
            } else {
                redirect_to(&target, "/v1.0/p/kms/user-quotas")
            }
        }),
    )
    .await;
    let kms = KmsClient::new(password_config(&server, &server)).unwrap();
    let err = kms.user_quotas().await.unwrap_err();
    assert_eq!(err.reason, ErrorReason::RedirectRefused, "{err}");
    assert!(
        log.lock().unwrap().iter().any(|r| r.head.contains(TOKEN)),
        "the token was sent to the configured host"
    );

    // AK/SK with a security token: the signed request is not re-sent either.
    let target = other.clone();
    let (server, _) = scripted_server(
        "127.0.0.1",
        Arc::new(move |_, _| redirect_to(&target, "/v1.0/p/kms/describe-key")),
    )
    .await;
    let kms = KmsClient::new(access_key_config(&server)).unwrap();
    let err = kms.describe_key(KEY).await.unwrap_err();
    assert_eq!(err.reason, ErrorReason::RedirectRefused, "{err}");

    let arrived = other_log.lock().unwrap().clone();
    assert!(
        arrived.is_empty(),
        "requests reached the redirect target: {arrived:?}"
    );
    for request in &arrived {
        let text = format!("{}{}", request.head, request.body);
        for secret in [PASSWORD, TOKEN, SECURITY_TOKEN] {
            assert!(!text.contains(secret), "{secret} arrived elsewhere");
        }
    }
}

#[tokio::test]
async fn a_50_mib_answer_is_refused_without_being_held_in_memory() {
    for declare_length in [false, true] {
        let (server, _) = scripted_server(
            "127.0.0.1",
            Arc::new(move |_, _| Reply::Huge {
                size: 50 << 20,
                declare_length,
            }),
        )
        .await;
        let kms = KmsClient::new(access_key_config(&server)).unwrap();
        let err = kms.list_all_grants(KEY, 100).await.unwrap_err();
        assert_eq!(err.reason, ErrorReason::ResponseTooLarge, "{err}");
        assert!(err.message.contains(&(4u32 << 20).to_string()), "{err}");
    }
    // The cap is a setting.
    let (server, _) = scripted_server(
        "127.0.0.1",
        Arc::new(|_, _| {
            json_reply(
                "200 OK",
                "",
                r#"{"grants": [], "next_marker": "", "truncated": "false", "total": 0}"#,
            )
        }),
    )
    .await;
    let mut config = access_key_config(&server);
    config.max_response_bytes = 16;
    let err = KmsClient::new(config)
        .unwrap()
        .list_all_grants(KEY, 100)
        .await
        .unwrap_err();
    assert_eq!(err.reason, ErrorReason::ResponseTooLarge, "{err}");
    // Peak memory of this process: measured from outside (docs/security.md gives the figure),
    // since the test harness shares the process.
}

fn grant_json(n: usize) -> String {
    format!(
        r#"{{"key_id": "{KEY}", "grant_id": "{n:064x}", "grantee_principal": "13gg44z4g2sglzk0egw0u726zoyzvrs8", "operations": ["describe-key"], "issuing_principal": "i", "creation_date": "1497341531000"}}"#
    )
}

#[tokio::test]
async fn an_endless_marker_chain_ends_as_list_runaway_within_the_quota_plus_one_page() {
    // Every page is full and names a new marker: at page size 7 the walk may take 100 + 7 grants.
    let (server, log) = scripted_server(
        "127.0.0.1",
        Arc::new(|_, count| {
            let grants: Vec<String> = (0..7).map(|i| grant_json(count * 7 + i)).collect();
            let body = format!(
                r#"{{"grants": [{}], "next_marker": "{}", "truncated": "true", "total": 100000}}"#,
                grants.join(","),
                (count + 1) * 7
            );
            json_reply("200 OK", "", &body)
        }),
    )
    .await;
    let kms = KmsClient::new(access_key_config(&server)).unwrap();
    let err = kms.list_all_grants(KEY, 7).await.unwrap_err();
    assert_eq!(err.reason, ErrorReason::ListRunaway, "{err}");
    let pages = log.lock().unwrap().len();
    assert_eq!(pages, 16, "pages requested before giving up");

    // Empty pages with ever new markers: bounded by pages, not by grants.
    let (server, log) = scripted_server(
        "127.0.0.1",
        Arc::new(|_, count| {
            let body = format!(
                r#"{{"grants": [], "next_marker": "{}", "truncated": "true", "total": 1}}"#,
                count + 1
            );
            json_reply("200 OK", "", &body)
        }),
    )
    .await;
    let kms = KmsClient::new(access_key_config(&server)).unwrap();
    let err = kms.list_all_grants(KEY, 100).await.unwrap_err();
    assert_eq!(err.reason, ErrorReason::ListRunaway, "{err}");
    assert_eq!(log.lock().unwrap().len(), 2, "pages requested at size 100");
}

#[tokio::test]
async fn a_40_kib_error_message_is_cut_to_a_bounded_length() {
    let shout = "A".repeat(40 * 1024);
    let body = format!(r#"{{"error": {{"error_code": "KMS.0308", "error_msg": "{shout}"}}}}"#);
    let (server, _) = scripted_server(
        "127.0.0.1",
        Arc::new(move |_, _| json_reply("400 Bad Request", "", &body)),
    )
    .await;
    let kms = KmsClient::new(access_key_config(&server)).unwrap();
    let err = kms.describe_key(KEY).await.unwrap_err();
    assert_eq!(err.reason, ErrorReason::InvalidRequest);
    assert!(err.message.starts_with("AAAA"), "{err}");
    assert!(
        err.message.chars().count() <= MAX_ERROR_MESSAGE_CHARS + 64,
        "message of {} characters",
        err.message.len()
    );
    assert!(
        err.message.contains("cut"),
        "the cut is said: {}",
        &err.message[err.message.len() - 40..]
    );
    assert!(
        err.to_string().len() < 1024,
        "Display of {} bytes",
        err.to_string().len()
    );
}

#[tokio::test]
async fn a_server_that_never_answers_ends_in_a_timeout_not_a_hang() {
    let (server, log) = scripted_server("127.0.0.1", Arc::new(|_, _| Reply::Silence)).await;
    let mut config = access_key_config(&server);
    config.request_timeout = Duration::from_millis(300);
    config.retry.max_attempts = 2;
    let kms = KmsClient::new(config).unwrap();
    let err = kms.describe_key(KEY).await.unwrap_err();
    assert_eq!(err.reason, ErrorReason::Timeout, "{err}");
    assert_eq!(log.lock().unwrap().len(), 2, "one attempt and one retry");
    // A write that times out may have happened: its outcome is unknown, and it is not retried.
    let err = kms.revoke_grant(KEY, &"0".repeat(64)).await.unwrap_err();
    assert_eq!(err.reason, ErrorReason::OutcomeUnknown, "{err}");
    assert_eq!(log.lock().unwrap().len(), 3);
}
