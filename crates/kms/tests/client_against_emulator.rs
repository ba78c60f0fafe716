//! The KMS client against the emulator on loopback, with both auth methods.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kms_emulator::{
    Emulator, EmulatorConfig, ErrorInjection, FaultSettings, InjectedError, NewKey, RunningEmulator,
};
use kmsgrant_kms::{
    ClientConfig, Credentials, ErrorClass, ErrorReason, KmsClient, NewGrant, Project,
    RateLimitConfig, RetryPolicy, SecretString,
};
use kmsgrant_kms::{GranteePrincipalType, Operation};
use kmsgrant_kms_signer::AccessKeyPair;

const GRANTEE: &str = "13gg44z4g2sglzk0egw0u726zoyzvrs8";

#[derive(Clone, Copy, Debug)]
enum AuthMethod {
    AccessKey,
    Password,
}

async fn emulator(grants_per_key: usize) -> RunningEmulator {
    Emulator::start(EmulatorConfig {
        grants_per_key,
        ..EmulatorConfig::for_tests()
    })
    .await
    .unwrap()
}

fn config(emu: &RunningEmulator, auth: AuthMethod) -> ClientConfig {
    let settings = emu.config();
    let credentials = match auth {
        AuthMethod::AccessKey => Credentials::AccessKey {
            keys: AccessKeyPair::new(&settings.access_key, &settings.secret_key),
            security_token: None,
        },
        AuthMethod::Password => Credentials::Password {
            username: settings.username.clone(),
            password: SecretString::from(settings.password.as_str()),
            domain_name: settings.domain_name.clone(),
        },
    };
    let mut config = ClientConfig::new(
        emu.base_url(),
        Project::Id(settings.project_id.clone()),
        credentials,
    );
    config.iam_endpoint = Some(emu.base_url());
    config.region = settings.region.clone();
    config.allow_http = true;
    config.rate_limit = RateLimitConfig {
        requests_per_second: 5000.0,
        burst: 5000,
    };
    config.retry = RetryPolicy {
        max_attempts: 12,
        initial_backoff: Duration::from_millis(5),
        max_backoff: Duration::from_millis(100),
        deadline: Duration::from_secs(10),
    };
    config
}

fn client(emu: &RunningEmulator, auth: AuthMethod) -> KmsClient {
    KmsClient::new(config(emu, auth)).unwrap()
}

fn new_key(emu: &RunningEmulator, alias: &str) -> String {
    emu.admin()
        .create_key(NewKey {
            key_alias: alias.into(),
            ..NewKey::default()
        })
        .unwrap()
        .key_id
}

fn new_grant(key_id: &str, name: Option<String>) -> NewGrant {
    NewGrant {
        key_id: key_id.into(),
        grantee_principal: GRANTEE.into(),
        grantee_principal_type: GranteePrincipalType::User,
        operations: vec![
            Operation::DescribeKey,
            Operation::CreateDatakey,
            Operation::EncryptDatakey,
        ],
        name,
        retiring_principal: Some(GRANTEE.into()),
    }
}

#[tokio::test]
async fn lists_every_grant_of_keys_with_0_1_99_and_100_grants_at_page_sizes_1_7_and_100() {
    for auth in [AuthMethod::AccessKey, AuthMethod::Password] {
        let emu = emulator(100).await;
        let kms = client(&emu, auth);
        for count in [0usize, 1, 99, 100] {
            let key = new_key(&emu, &format!("paging-{count}"));
            let mut created = HashSet::new();
            for i in 0..count {
                created.insert(
                    kms.create_grant(&new_grant(&key, Some(format!("g{i}"))))
                        .await
                        .unwrap(),
                );
            }
            assert_eq!(emu.admin().grant_count(&key), Some(count));
            for page_size in [1, 7, 100] {
                let grants = kms.list_all_grants(&key, page_size).await.unwrap();
                let listed: HashSet<String> = grants.iter().map(|g| g.grant_id.clone()).collect();
                assert_eq!(
                    grants.len(),
                    count,
                    "{auth:?}: {count} grants at page size {page_size}"
                );
                assert_eq!(
                    listed, created,
                    "{auth:?}: {count} grants at page size {page_size}"
                );
                for grant in &grants {
                    assert_eq!(&*grant.key_id, key.as_str());
                    assert_eq!(&*grant.grantee_principal, GRANTEE);
                    assert_eq!(grant.retiring_principal.as_deref(), Some(GRANTEE));
                    assert_eq!(
                        grant.operation_set(),
                        ["describe-key", "create-datakey", "encrypt-datakey"].into()
                    );
                    assert!(
                        grant
                            .created_at_millis
                            .is_some_and(|ms| ms > 1_600_000_000_000)
                    );
                }
            }
        }
        emu.shutdown().await;
    }
}

#[tokio::test]
async fn one_page_at_a_time_shows_the_marker_truncated_and_total_the_service_answers() {
    let emu = emulator(100).await;
    let kms = client(&emu, AuthMethod::AccessKey);
    let key = new_key(&emu, "one-page");
    for i in 0..3 {
        kms.create_grant(&new_grant(&key, Some(format!("g{i}"))))
            .await
            .unwrap();
    }
    let first = kms.list_grants_page(&key, 2, None).await.unwrap();
    assert_eq!(first.grants.len(), 2);
    assert!(first.truncated);
    assert_eq!(first.next_marker, "2");
    assert_eq!(first.total, Some(3));
    let last = kms
        .list_grants_page(&key, 2, Some(&first.next_marker))
        .await
        .unwrap();
    assert_eq!(last.grants.len(), 1);
    assert!(!last.truncated);
    assert_eq!(last.next_marker, "");
    let names: HashSet<String> = first
        .grants
        .iter()
        .chain(&last.grants)
        .filter_map(|g| g.name.clone())
        .collect();
    assert_eq!(names, ["g0", "g1", "g2"].map(String::from).into());
    // The limit goes out as given: the service judges it.
    let refused = kms.list_grants_page(&key, 101, None).await.unwrap_err();
    assert_eq!(refused.code.as_deref(), Some("KMS.1601"));
    emu.shutdown().await;
}

/// A server that answers every list-grants with the same non-empty `next_marker`.
async fn looping_server() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut socket, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut buffer = vec![0u8; 65536];
                loop {
                    let Ok(n) = socket.read(&mut buffer).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    let body =
                        r#"{"grants": [], "next_marker": "5", "truncated": "true", "total": 10}"#;
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if socket.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    format!("http://{addr}")
}

#[tokio::test]
async fn a_marker_that_does_not_advance_is_an_error_not_a_loop() {
    let endpoint = looping_server().await;
    let credentials = Credentials::AccessKey {
        keys: AccessKeyPair::new("AK", "SK"),
        security_token: None,
    };
    let mut config = ClientConfig::new(endpoint, Project::Id("p".into()), credentials);
    config.allow_http = true;
    let kms = KmsClient::new(config).unwrap();
    let err = tokio::time::timeout(
        Duration::from_secs(10),
        kms.list_all_grants("bb6a3d22-dc93-47ac-b5bd-88df7ad35f1e", 7),
    )
    .await
    .expect("the walk ends")
    .unwrap_err();
    assert_eq!(err.reason, ErrorReason::UnexpectedResponse);
    assert!(err.message.contains("does not advance"), "{err}");
}

#[tokio::test]
async fn creates_all_land_once_with_30_percent_injected_5xx_and_429_and_no_retry_past_the_deadline()
{
    for auth in [AuthMethod::AccessKey, AuthMethod::Password] {
        let emu = emulator(500).await;
        let key = new_key(&emu, "flaky");
        let config = config(&emu, auth);
        let deadline = config.retry.deadline;
        let kms = KmsClient::new(config).unwrap();
        for (phase, error) in [
            InjectedError::Internal,
            InjectedError::Unavailable,
            InjectedError::Throttled,
        ]
        .into_iter()
        .enumerate()
        {
            let errors = BTreeMap::from([(
                "create-grant".to_owned(),
                ErrorInjection { rate: 0.3, error },
            )]);
            emu.admin()
                .set_faults(FaultSettings {
                    errors,
                    ..FaultSettings::default()
                })
                .unwrap();
            let calls = if phase == 2 { 66 } else { 67 };
            for i in 0..calls {
                let started = Instant::now();
                let grant = new_grant(&key, Some(format!("p{phase}-{i}")));
                let mut result = kms.create_grant(&grant).await;
                // A 5xx answer to a write may hide a commit: the client reports it as unknown
                // and never repeats it; the caller looks, and writes again only if it is absent.
                while let Err(err) = &result
                    && err.reason == ErrorReason::OutcomeUnknown
                    && error != InjectedError::Throttled
                {
                    let listed = kms.list_all_grants(&key, 100).await.unwrap();
                    match listed.iter().find(|g| g.name == grant.name) {
                        Some(found) => result = Ok(found.grant_id.clone()),
                        None => result = kms.create_grant(&grant).await,
                    }
                }
                let took = started.elapsed();
                assert!(
                    result.is_ok(),
                    "{auth:?} {error:?}: {:?}",
                    result.unwrap_err()
                );
                // Bounded: no retry starts after the deadline (one attempt may still be under way).
                assert!(
                    took < deadline + Duration::from_secs(5),
                    "{auth:?}: a create took {took:?}"
                );
            }
        }
        // Injected errors commit nothing: exactly one grant per successful create, no duplicates.
        assert_eq!(emu.admin().grant_count(&key), Some(200), "{auth:?}");
        let stats = emu.admin().stats();
        let failed: u64 = ["500", "503", "429"]
            .iter()
            .map(|s| stats.count("create-grant", s))
            .sum();
        assert!(
            failed > 20,
            "{auth:?}: only {failed} injected failures; the faults did not apply"
        );
        emu.shutdown().await;
    }
}

#[tokio::test]
async fn a_lost_answer_to_a_write_is_reported_as_outcome_unknown() {
    for auth in [AuthMethod::AccessKey, AuthMethod::Password] {
        let emu = emulator(100).await;
        let key = new_key(&emu, "lossy");
        let kms = client(&emu, auth);
        let drop_all = |op: &str| FaultSettings {
            drop_after_commit: BTreeMap::from([(op.to_owned(), 1.0)]),
            ..FaultSettings::default()
        };

        emu.admin().set_faults(drop_all("create-grant")).unwrap();
        let err = kms
            .create_grant(&new_grant(&key, Some("lost".into())))
            .await
            .unwrap_err();
        assert_eq!(
            (err.reason, err.class()),
            (ErrorReason::OutcomeUnknown, ErrorClass::OutcomeUnknown),
            "{auth:?}: {err}"
        );
        // The write took effect, once: the client did not blindly try again.
        assert_eq!(emu.admin().grant_count(&key), Some(1));
        let grant_id = kms.list_all_grants(&key, 100).await.unwrap()[0]
            .grant_id
            .clone();

        emu.admin().set_faults(drop_all("revoke-grant")).unwrap();
        let err = kms.revoke_grant(&key, &grant_id).await.unwrap_err();
        assert_eq!(err.reason, ErrorReason::OutcomeUnknown, "{auth:?}: {err}");
        assert_eq!(emu.admin().grant_count(&key), Some(0));

        // Looking again shows the revoke happened: the grant is already gone.
        emu.admin().set_faults(FaultSettings::default()).unwrap();
        let err = kms.revoke_grant(&key, &grant_id).await.unwrap_err();
        assert!(err.is_already_gone(), "{auth:?}: {err}");
        emu.shutdown().await;
    }
}

#[tokio::test]
async fn a_token_that_expires_mid_run_costs_exactly_one_reauthentication() {
    let emu = Emulator::start(EmulatorConfig {
        token_ttl: Duration::from_secs(3),
        ..EmulatorConfig::for_tests()
    })
    .await
    .unwrap();
    let key = new_key(&emu, "expiring");
    let kms = client(&emu, AuthMethod::Password);
    let started = Instant::now();
    // Eight callers at once, for longer than one token lives but shorter than two.
    let workers: Vec<_> = (0..8)
        .map(|_| {
            let kms = kms.clone();
            let key = key.clone();
            tokio::spawn(async move {
                let mut calls = 0;
                while started.elapsed() < Duration::from_millis(4500) {
                    kms.describe_key(&key)
                        .await
                        .expect("every call succeeds across the expiry");
                    calls += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                calls
            })
        })
        .collect();
    let mut calls = 0;
    for worker in workers {
        calls += worker.await.unwrap();
    }
    assert!(calls > 100, "only {calls} calls were made");
    let stats = emu.admin().stats();
    assert_eq!(
        stats.count("iam:tokens", "201"),
        2,
        "one token, then exactly one re-authentication: {stats:?}"
    );
    assert_eq!(
        stats.count("describe-key", "403"),
        0,
        "no call was sent with an expired token"
    );
    emu.shutdown().await;
}

#[tokio::test]
async fn a_project_name_is_resolved_to_its_id_through_iam() {
    let emu = emulator(100).await;
    let key = new_key(&emu, "by-name");
    for auth in [AuthMethod::AccessKey, AuthMethod::Password] {
        let mut config = config(&emu, auth);
        config.project = Project::Name(emu.config().project_name.clone());
        let kms = KmsClient::new(config).unwrap();
        assert_eq!(
            kms.project_id().await.unwrap(),
            emu.config().project_id,
            "{auth:?}"
        );
        assert_eq!(kms.describe_key(&key).await.unwrap().key_id, key);
    }
    emu.shutdown().await;
}

#[tokio::test]
async fn terminal_failures_map_to_their_documented_reasons() {
    for auth in [AuthMethod::AccessKey, AuthMethod::Password] {
        let emu = emulator(2).await;
        let kms = client(&emu, auth);
        let key = new_key(&emu, "terminal");
        let other_key = new_key(&emu, "other");
        let reason = |result: Result<String, kmsgrant_kms::KmsError>| result.unwrap_err().reason;

        let missing = "0d0466b0-e727-4d9c-b35d-f84bb474a37f";
        assert_eq!(
            kms.describe_key(missing).await.unwrap_err().reason,
            ErrorReason::KeyNotFound,
            "{auth:?}"
        );
        assert_eq!(
            reason(kms.create_grant(&new_grant(missing, None)).await),
            ErrorReason::KeyNotFound
        );

        let default_key = kms.describe_key("alias/obs/default").await.unwrap();
        assert!(default_key.is_default_master_key(), "{default_key:?}");
        let err = kms
            .create_grant(&new_grant(&default_key.key_id, None))
            .await
            .unwrap_err();
        assert_eq!(
            err.reason,
            ErrorReason::DefaultKeyNotGrantable,
            "{auth:?}: {err}"
        );

        let mut bad_principal = new_grant(&key, None);
        bad_principal.grantee_principal = "not-a-principal".into();
        assert_eq!(
            reason(kms.create_grant(&bad_principal).await),
            ErrorReason::InvalidPrincipal,
            "{auth:?}"
        );

        let only_create = NewGrant {
            operations: vec![Operation::CreateGrant],
            ..new_grant(&key, None)
        };
        assert_eq!(
            reason(kms.create_grant(&only_create).await),
            ErrorReason::InvalidRequest,
            "{auth:?}"
        );

        // The per-key quota (2 here): the third grant is refused.
        let first = kms.create_grant(&new_grant(&key, None)).await.unwrap();
        kms.create_grant(&new_grant(&key, None)).await.unwrap();
        let err = kms.create_grant(&new_grant(&key, None)).await.unwrap_err();
        assert_eq!(
            (err.reason, err.class()),
            (ErrorReason::GrantQuotaExceeded, ErrorClass::Terminal),
            "{auth:?}"
        );

        let err = kms.revoke_grant(&other_key, &first).await.unwrap_err();
        assert_eq!(err.reason, ErrorReason::GrantKeyMismatch, "{auth:?}: {err}");
        kms.revoke_grant(&key, &first).await.unwrap();
        let err = kms.revoke_grant(&key, &first).await.unwrap_err();
        assert!(err.is_already_gone(), "{auth:?}: revoking twice: {err}");

        emu.admin()
            .set_key_state(&other_key, kms_emulator::KeyState::Disabled);
        let err = kms
            .create_grant(&new_grant(&other_key, None))
            .await
            .unwrap_err();
        assert_eq!(
            (err.reason, err.class()),
            (ErrorReason::KeyDisabled, ErrorClass::RetryLater),
            "{auth:?}"
        );

        // Credentials that do not work.
        let mut wrong = config(&emu, auth);
        wrong.credentials = match auth {
            AuthMethod::AccessKey => Credentials::AccessKey {
                keys: AccessKeyPair::new(&emu.config().access_key, "wrong-secret"),
                security_token: None,
            },
            AuthMethod::Password => Credentials::Password {
                username: emu.config().username.clone(),
                password: SecretString::from("wrong-password"),
                domain_name: emu.config().domain_name.clone(),
            },
        };
        let err = KmsClient::new(wrong)
            .unwrap()
            .describe_key(&key)
            .await
            .unwrap_err();
        assert_eq!(
            err.reason,
            ErrorReason::InvalidCredentials,
            "{auth:?}: {err}"
        );

        let mut elsewhere = config(&emu, auth);
        elsewhere.project = Project::Id("ffffffffffffffffffffffffffffffff".into());
        let err = KmsClient::new(elsewhere)
            .unwrap()
            .describe_key(&key)
            .await
            .unwrap_err();
        assert!(
            matches!(
                err.reason,
                ErrorReason::WrongProject
                    | ErrorReason::InvalidCredentials
                    | ErrorReason::PermissionDenied
            ),
            "{auth:?}: {err}"
        );
        emu.shutdown().await;
    }
}

/// Collects every log line, at trace level, of everything in this test process.
#[derive(Clone, Default)]
struct CapturedLogs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for CapturedLogs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn no_secret_appears_in_logs_at_trace_level() {
    let logs = CapturedLogs::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .finish();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    tracing::subscriber::with_default(subscriber, || {
        runtime.block_on(async {
            let emu = emulator(100).await;
            let key = new_key(&emu, "logged");
            for auth in [AuthMethod::AccessKey, AuthMethod::Password] {
                let kms = client(&emu, auth);
                let id = kms.create_grant(&new_grant(&key, None)).await.unwrap();
                kms.list_all_grants(&key, 1).await.unwrap();
                kms.revoke_grant(&key, &id).await.unwrap();
                let _ = kms.revoke_grant(&key, &id).await;
                tracing::debug!(client = ?kms, "client in use");
            }
            emu.shutdown().await;
        })
    });
    let logs = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.lines().count() > 10,
        "too little was logged to prove anything:\n{logs}"
    );
    let config = EmulatorConfig::for_tests();
    for secret in [config.secret_key.as_str(), config.password.as_str()] {
        assert!(!logs.contains(secret), "a secret appears in the logs");
    }
    assert!(
        !logs.to_ascii_lowercase().contains("x-auth-token: "),
        "a token header appears in the logs"
    );
}

#[tokio::test]
async fn both_signing_variants_are_accepted_by_the_emulator() {
    let emu = emulator(100).await;
    let key = new_key(&emu, "variants");
    let schemes = [
        kmsgrant_kms_signer::SigningScheme::Access,
        kmsgrant_kms_signer::SigningScheme::Credential {
            region: emu.config().region.clone(),
            service: "kms".into(),
        },
        kmsgrant_kms_signer::SigningScheme::Credential {
            region: String::new(),
            service: String::new(),
        },
    ];
    for scheme in schemes {
        let mut config = config(&emu, AuthMethod::AccessKey);
        config.signing = scheme.clone();
        let kms = KmsClient::new(config).unwrap();
        let id = kms
            .create_grant(&new_grant(&key, None))
            .await
            .unwrap_or_else(|e| panic!("{scheme:?}: {e}"));
        assert!(
            kms.list_all_grants(&key, 7)
                .await
                .unwrap()
                .iter()
                .any(|g| g.grant_id == id),
            "{scheme:?}"
        );
        kms.revoke_grant(&key, &id).await.unwrap();
        // The project lookup through IAM is signed the same way.
        let mut by_name = self::config(&emu, AuthMethod::AccessKey);
        by_name.signing = scheme.clone();
        by_name.project = Project::Name(emu.config().project_name.clone());
        assert_eq!(
            KmsClient::new(by_name).unwrap().project_id().await.unwrap(),
            emu.config().project_id,
            "{scheme:?}"
        );
    }
    // A wrong secret key fails in either variant.
    let mut wrong = config(&emu, AuthMethod::AccessKey);
    wrong.signing = kmsgrant_kms_signer::SigningScheme::Credential {
        region: "eu-de".into(),
        service: "kms".into(),
    };
    wrong.credentials = Credentials::AccessKey {
        keys: AccessKeyPair::new(&emu.config().access_key, "wrong"),
        security_token: None,
    };
    let err = KmsClient::new(wrong)
        .unwrap()
        .describe_key(&key)
        .await
        .unwrap_err();
    assert_eq!(err.reason, ErrorReason::InvalidCredentials);
    emu.shutdown().await;
}

#[tokio::test]
async fn a_write_is_not_re_sent_once_the_write_gate_closes() {
    let emu = emulator(100).await;
    let key = new_key(&emu, "gate");
    // Open for the first attempt only, as a replica whose lease is lost while it waits to retry.
    let asked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut config = config(&emu, AuthMethod::AccessKey);
    let counter = asked.clone();
    config.write_gate = Some(kmsgrant_kms::WriteGate::new(move || {
        counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0
    }));
    let kms = KmsClient::new(config).unwrap();
    // Reads never ask the gate.
    assert_eq!(kms.list_all_grants(&key, 100).await.unwrap().len(), 0);
    assert_eq!(asked.load(std::sync::atomic::Ordering::SeqCst), 0);
    // Every create is throttled: the first attempt goes out, the retry would.
    emu.admin()
        .set_faults(FaultSettings {
            errors: BTreeMap::from([(
                "create-grant".to_owned(),
                ErrorInjection {
                    rate: 1.0,
                    error: InjectedError::Throttled,
                },
            )]),
            ..FaultSettings::default()
        })
        .unwrap();
    emu.admin().clear_stats();
    let err = kms
        .create_grant(&new_grant(&key, Some("fenced".into())))
        .await
        .unwrap_err();
    assert_eq!(err.reason, ErrorReason::WriteFenced, "{err}");
    assert_eq!(err.class(), ErrorClass::Terminal);
    let stats = emu.admin().stats();
    assert_eq!(
        stats.count("create-grant", "429"),
        1,
        "only the first attempt was sent"
    );
    assert_eq!(stats.total, 1);
    assert_eq!(emu.admin().grant_count(&key), Some(0));
}
