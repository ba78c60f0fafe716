//! The kit: one client on one key, the run's name prefix, what the run created, and the cleanup
//! that revokes all of it and nothing else.

use std::sync::Mutex;
use std::time::Duration;

use super::report::{CleanedGrant, Cleanup};
use super::{Account, NAME_PREFIX};
use crate::api::SigningVariant;
use crate::controller::fix_for;
use kmsgrant_kms::signer::{AccessKeyPair, SigningScheme};
use kmsgrant_kms::{
    ClientConfig, Credentials, ErrorClass, ErrorReason, ExposeSecret, Grant, GranteePrincipalType,
    KmsClient, KmsError, NewGrant, Operation, Project, RateLimitConfig, RetryPolicy,
};

/// Free grant slots the key needs: the most grants the kit holds on it at once (paging's three)
/// and one for a case that surprises it.
const FREE_SLOTS_NEEDED: usize = 4;

/// A grant this run created.
#[derive(Clone, Debug)]
struct Created {
    grant_id: String,
    name: String,
    revoked: bool,
}

/// A throttled answer seen during the run.
#[derive(Clone, Debug)]
pub(super) struct Throttled {
    pub(super) call: &'static str,
    pub(super) status: Option<u16>,
    pub(super) code: Option<String>,
    pub(super) retry_after: Option<Duration>,
}

/// One run against one key.
pub struct Kit {
    pub(super) client: KmsClient,
    pub(super) account: Account,
    pub(super) run: String,
    created: Mutex<Vec<Created>>,
    throttles: Mutex<Vec<Throttled>>,
}

/// What the kit learnt before its cases.
pub(super) struct Preflight {
    pub(super) earlier_runs: Vec<CleanedGrant>,
}

pub(super) fn client_config(account: &Account, secret_key: &str) -> ClientConfig {
    let mut config = ClientConfig::new(
        account.endpoint.clone(),
        Project::Id(account.project_id.clone()),
        Credentials::AccessKey {
            keys: AccessKeyPair::new(&account.access_key, secret_key),
            security_token: None,
        },
    );
    config.iam_endpoint = account.iam_endpoint.clone();
    config.region = account.region.clone();
    config.signing = match account.signing {
        SigningVariant::Huawei => SigningScheme::Access,
        SigningVariant::OpenTelekomCloud => SigningScheme::Credential {
            region: account.region.clone(),
            service: "kms".into(),
        },
    };
    config.allow_http = account.allow_http;
    // Gentle, and every answer seen as the account gave it: the kit retries (and records)
    // throttled and failed reads itself.
    config.rate_limit = RateLimitConfig {
        requests_per_second: 5.0,
        burst: 5,
    };
    config.retry = RetryPolicy {
        max_attempts: 1,
        ..RetryPolicy::default()
    };
    config.request_timeout = Duration::from_secs(30);
    config
}

impl Kit {
    pub fn new(account: Account) -> Result<Self, String> {
        let config = client_config(&account, account.secret_key.expose_secret());
        let client =
            KmsClient::new(config).map_err(|err| format!("{err}; fix: {}", fix_for(&err)))?;
        Ok(Self {
            client,
            account,
            run: format!("{:012x}", fastrand::u64(..) >> 16),
            created: Mutex::new(Vec::new()),
            throttles: Mutex::new(Vec::new()),
        })
    }

    /// This run's grant name prefix, `kmsgrant-live-test/<run>/`.
    pub fn prefix(&self) -> String {
        format!("{NAME_PREFIX}{}/", self.run)
    }

    pub(super) fn name(&self, case: &str) -> String {
        format!("{}{case}", self.prefix())
    }

    pub(super) fn key(&self) -> &str {
        &self.account.key_id
    }

    fn created(&self) -> std::sync::MutexGuard<'_, Vec<Created>> {
        self.created.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A call, retried while the account throttles or fails transiently (reads; a write answered
    /// 5xx is never repeated), each throttled answer recorded for the throttling case.
    pub(super) async fn kms<T>(
        &self,
        mut call: impl AsyncFnMut() -> Result<T, KmsError>,
    ) -> Result<T, KmsError> {
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let err = match call().await {
                Ok(answer) => return Ok(answer),
                Err(err) => err,
            };
            if err.reason == ErrorReason::Throttled {
                self.throttles
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(Throttled {
                        call: err.call.as_str(),
                        status: err.status,
                        code: err.code.clone(),
                        retry_after: err.retry_after,
                    });
            }
            if err.class() != ErrorClass::Retryable || attempt >= 6 {
                return Err(err);
            }
            let wait = err
                .retry_after
                .unwrap_or(Duration::from_millis(500) * attempt);
            tokio::time::sleep(wait.min(Duration::from_secs(30))).await;
        }
    }

    /// `create-grant` of a grant named by this run (anything else is a bug of the kit); a grant
    /// ID the account answers is recorded for the cleanup, whatever the case expected.
    pub(super) async fn create_grant(&self, grant: NewGrant) -> Result<String, KmsError> {
        let name = grant.name.clone().unwrap_or_default();
        assert!(
            name.starts_with(&self.prefix()),
            "the kit creates only grants named for its run, not {name:?}"
        );
        let created = self
            .kms(async || self.client.create_grant(&grant).await)
            .await;
        if let Ok(grant_id) = &created {
            self.created().push(Created {
                grant_id: grant_id.clone(),
                name,
                revoked: false,
            });
        }
        created
    }

    /// A grant on the key to the principal, named `name`.
    pub(super) async fn create(
        &self,
        name: &str,
        operations: &[Operation],
        retiring_principal: Option<&str>,
    ) -> Result<String, KmsError> {
        self.create_grant(self.grant(name, operations, retiring_principal))
            .await
    }

    pub(super) fn grant(
        &self,
        name: &str,
        operations: &[Operation],
        retiring_principal: Option<&str>,
    ) -> NewGrant {
        NewGrant {
            key_id: self.key().to_owned(),
            grantee_principal: self.account.principal.clone(),
            grantee_principal_type: GranteePrincipalType::User,
            operations: operations.to_vec(),
            name: Some(name.to_owned()),
            retiring_principal: retiring_principal.map(str::to_owned),
        }
    }

    /// `revoke-grant` of a grant this run created; the only grants the kit ever revokes.
    pub(super) async fn revoke(&self, grant_id: &str) -> Result<(), KmsError> {
        assert!(
            self.created().iter().any(|c| c.grant_id == grant_id),
            "the kit revokes only grants its run created, not {grant_id}"
        );
        let revoked = self
            .kms(async || self.client.revoke_grant(self.key(), grant_id).await)
            .await;
        if revoked.is_ok() || revoked.as_ref().is_err_and(KmsError::is_already_gone) {
            self.mark_revoked(grant_id);
        }
        revoked
    }

    pub(super) fn mark_revoked(&self, grant_id: &str) {
        for created in self.created().iter_mut() {
            if created.grant_id == grant_id {
                created.revoked = true;
            }
        }
    }

    /// Revokes a case's grants at its end; what fails here is the cleanup's to finish.
    pub(super) async fn revoke_all(&self, grant_ids: &[String]) {
        for grant_id in grant_ids {
            let _ = self.revoke(grant_id).await;
        }
    }

    pub(super) async fn list(&self) -> Result<Vec<Grant>, KmsError> {
        self.kms(async || {
            self.client
                .list_all_grants(self.key(), kmsgrant_kms::MAX_PAGE_SIZE)
                .await
        })
        .await
    }

    /// The key exists, is a customer master key, enabled, and has room for the kit's grants.
    pub(super) async fn preflight(&self) -> Result<Preflight, String> {
        let key = self.key();
        let info = self
            .kms(async || self.client.describe_key(key).await)
            .await
            .map_err(|err| {
                format!(
                    "describe-key {key} failed, so no case can run: {err}; fix: {}",
                    fix_for(&err)
                )
            })?;
        if info.is_default_master_key() {
            return Err(format!(
                "key {key} ({}) is a Default Master Key, which refuses grants: name a customer master key of its own",
                info.key_alias
            ));
        }
        if info.state != kmsgrant_kms::KeyState::Enabled {
            return Err(format!(
                "key {key} is {:?}: enable it, or name an enabled customer master key",
                info.state
            ));
        }
        let listed = self.list().await.map_err(|err| {
            format!(
                "list-grants on {key} failed, so no case can run: {err}; fix: {}",
                fix_for(&err)
            )
        })?;
        let free = kmsgrant_kms::MAX_GRANTS_PER_KEY.saturating_sub(listed.len());
        if free < FREE_SLOTS_NEEDED {
            return Err(format!(
                "key {key} holds {} grants; the kit needs {FREE_SLOTS_NEEDED} free of the 100 a key may hold: use a key of its own",
                listed.len()
            ));
        }
        let earlier_runs = listed
            .iter()
            .filter(|g| {
                g.name
                    .as_deref()
                    .is_some_and(|n| n.starts_with(NAME_PREFIX))
            })
            .map(|g| CleanedGrant {
                grant_id: g.grant_id.clone(),
                name: g.name.clone(),
                found_by: "name",
                error: None,
            })
            .collect();
        Ok(Preflight { earlier_runs })
    }

    /// Lists the key and revokes every grant of this run (by its prefix, or by the IDs the run
    /// created), then lists again to say what is left. Nothing else is revoked.
    pub async fn cleanup(&self) -> Cleanup {
        let prefix = self.prefix();
        let created = self.created().clone();
        let mut cleanup = Cleanup::default();
        let named = |g: &Grant| g.name.as_deref().is_some_and(|n| n.starts_with(&prefix));
        let ours = |g: &Grant| named(g) || created.iter().any(|c| c.grant_id == g.grant_id);
        let targets: Vec<CleanedGrant> = match self.list().await {
            Ok(listed) => listed
                .iter()
                .filter(|g| ours(g))
                .map(|g| CleanedGrant {
                    grant_id: g.grant_id.clone(),
                    name: g.name.clone().or_else(|| {
                        created
                            .iter()
                            .find(|c| c.grant_id == g.grant_id)
                            .map(|c| c.name.clone())
                    }),
                    found_by: if named(g) { "name" } else { "grant ID" },
                    error: None,
                })
                .collect(),
            Err(err) => {
                cleanup.error = Some(format!(
                    "cannot list key {} to find this run's grants ({err}); revoked the grant IDs the run created instead",
                    self.key()
                ));
                created
                    .iter()
                    .filter(|c| !c.revoked)
                    .map(|c| CleanedGrant {
                        grant_id: c.grant_id.clone(),
                        name: Some(c.name.clone()),
                        found_by: "grant ID",
                        error: None,
                    })
                    .collect()
            }
        };
        for mut target in targets {
            let id = target.grant_id.clone();
            let revoked = self
                .kms(async || self.client.revoke_grant(self.key(), &id).await)
                .await;
            match revoked {
                Ok(()) => cleanup.removed.push(target),
                Err(err) if err.is_already_gone() => {}
                Err(err) => {
                    target.error = Some(err.to_string());
                    cleanup.left.push(target);
                }
            }
        }
        match self.list().await {
            Ok(listed) => {
                for grant in listed.iter().filter(|g| ours(g)) {
                    if !cleanup.left.iter().any(|l| l.grant_id == grant.grant_id) {
                        cleanup.left.push(CleanedGrant {
                            grant_id: grant.grant_id.clone(),
                            name: grant.name.clone(),
                            found_by: if named(grant) { "name" } else { "grant ID" },
                            error: Some("still listed after the cleanup revoked it".into()),
                        });
                    }
                }
                if cleanup.error.is_some() && cleanup.left.is_empty() {
                    cleanup.error = None;
                }
            }
            Err(err) => {
                cleanup.error = Some(format!(
                    "cannot list key {} to confirm that nothing of this run is left: {err}",
                    self.key()
                ));
            }
        }
        cleanup
    }

    pub(super) fn throttles(&self) -> Vec<Throttled> {
        self.throttles
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::live_test::{Verdict, guarded};
    use kmsgrant_kms::SecretString;

    fn emulator_account(emulator: &kms_emulator::RunningEmulator, key_id: &str) -> Account {
        let config = emulator.config();
        Account {
            endpoint: emulator.base_url(),
            iam_endpoint: None,
            region: config.region.clone(),
            project_id: config.project_id.clone(),
            access_key: config.access_key.clone(),
            secret_key: SecretString::from(config.secret_key.clone()),
            signing: SigningVariant::Huawei,
            key_id: key_id.into(),
            principal: "0d0466b00d0466b00d0466b0".into(),
            allow_http: true,
        }
    }

    #[tokio::test]
    async fn a_case_that_panics_after_creating_a_grant_leaves_nothing_behind_even_unnamed() {
        let emulator = kms_emulator::Emulator::start(kms_emulator::EmulatorConfig::for_tests())
            .await
            .unwrap();
        let key = emulator
            .admin()
            .create_key(kms_emulator::NewKey {
                key_alias: "live-panic".into(),
                ..Default::default()
            })
            .unwrap()
            .key_id;
        // The account lists grants without names: the cleanup has only the IDs the run made.
        emulator
            .admin()
            .set_faults(kms_emulator::FaultSettings {
                omit_grant_names: true,
                ..Default::default()
            })
            .unwrap();
        let kit = Kit::new(emulator_account(&emulator, &key)).unwrap();
        let verdict = guarded(async {
            let created = kit
                .create(&kit.name("boom"), &[Operation::DescribeKey], None)
                .await;
            assert!(created.is_err(), "a case went wrong after {created:?}");
            Verdict::Ok {
                message: String::new(),
            }
        })
        .await;
        let Verdict::Error { message } = verdict else {
            panic!("a panic is an error")
        };
        assert!(message.contains("a case went wrong"), "{message}");
        assert_eq!(emulator.admin().grant_count(&key), Some(1));
        let cleanup = kit.cleanup().await;
        assert_eq!(cleanup.removed.len(), 1, "{cleanup:?}");
        assert_eq!(cleanup.removed[0].found_by, "grant ID");
        assert_eq!(
            cleanup.removed[0].name.as_deref(),
            Some(kit.name("boom").as_str()),
            "named from what the run recorded"
        );
        assert!(cleanup.left.is_empty() && cleanup.error.is_none());
        assert_eq!(emulator.admin().grant_count(&key), Some(0));
        emulator.shutdown().await;
    }
}
