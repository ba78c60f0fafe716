//! Who the operator is at KMS, as a provider config says: a Secret's AK/SK or password, or no
//! secret at all (WebIdentity: a ServiceAccount token exchanged at IAM), optionally an agency and
//! temporary keys on top. Refuses what would let a config make the operator send something it
//! must not: a file outside the token directory, a ServiceAccount outside its namespace.

use std::path::{Component, Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use kube::api::{Api, PostParams};

use super::conditions::{Outcome, reasons};
use crate::api::{AuthType, KmsProviderConfigSpec, ServiceAccountTokenReference, WebIdentity};
use kmsgrant_kms::signer::AccessKeyPair;
use kmsgrant_kms::{Agency, Credentials, Domain, SecretString, SubjectTokenSource};

/// Where keyless credentials may come from: the operator's settings, not the config's.
#[derive(Clone)]
pub struct KeylessSettings {
    /// `tokenFile` must lie under this directory.
    pub token_dir: PathBuf,
    /// `serviceAccountRef.namespace` must be this (the operator's namespace); `None`: any.
    pub service_account_namespace: Option<String>,
    /// Requests ServiceAccount tokens.
    pub kube: kube::Client,
}

/// The default of `--web-identity-token-dir`: where the chart mounts the projected token.
pub const DEFAULT_TOKEN_DIR: &str = "/var/run/secrets/kmsgrant";

/// Largest token file read (a ServiceAccount JWT is about 1 KiB).
const MAX_TOKEN_BYTES: u64 = 64 * 1024;

/// The credentials (and agency, temporary keys) a config asks for; `secret` is the Secret its
/// `secretRef` names (read by the caller), absent for WebIdentity.
pub fn credentials(
    spec: &KmsProviderConfigSpec,
    secret: Option<&Secret>,
    keyless: &KeylessSettings,
) -> Result<(Credentials, Option<Agency>, Option<Duration>), Outcome> {
    let auth = &spec.auth;
    let credentials = match auth.type_ {
        AuthType::WebIdentity => {
            let web = auth.web_identity.as_ref().ok_or_else(|| Outcome::Stalled {
                reason: reasons::INVALID_SPEC,
                message: "spec.auth.webIdentity is required for type WebIdentity".into(),
            })?;
            Credentials::WebIdentity {
                identity_provider_id: web.identity_provider_id.clone(),
                token_source: token_source(web, keyless)?,
            }
        }
        AuthType::AccessKey | AuthType::Password => {
            let secret = secret.ok_or_else(|| Outcome::Stalled {
                reason: reasons::INVALID_SPEC,
                message: format!("spec.auth.secretRef is required for type {:?}", auth.type_),
            })?;
            from_secret(auth.type_, secret)?
        }
    };
    let agency = auth.agency.as_ref().map(|agency| Agency {
        name: agency.name.clone(),
        domain: match (&agency.domain_id, &agency.domain_name) {
            (Some(id), _) => Domain::Id(id.clone()),
            (None, name) => Domain::Name(name.clone().unwrap_or_default()),
        },
    });
    let temporary = auth
        .temporary_access_key
        .map(|t| Duration::from_secs(u64::from(t.duration_seconds.clamp(900, 86_400))));
    Ok((credentials, agency, temporary))
}

fn from_secret(type_: AuthType, secret: &Secret) -> Result<Credentials, Outcome> {
    let data: std::collections::BTreeMap<String, String> = secret
        .data
        .iter()
        .flatten()
        .filter_map(|(k, v)| String::from_utf8(v.0.clone()).ok().map(|v| (k.clone(), v)))
        .chain(
            secret
                .string_data
                .iter()
                .flatten()
                .map(|(k, v)| (k.clone(), v.clone())),
        )
        .collect();
    let field = |key: &'static str| {
        data.get(key)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
            .ok_or(key)
    };
    let missing = |key: &str| Outcome::Stalled {
        reason: reasons::SECRET_INCOMPLETE,
        message: format!(
            "Secret {}/{} has no key {key:?}; add it",
            secret.metadata.namespace.as_deref().unwrap_or_default(),
            secret.metadata.name.as_deref().unwrap_or_default()
        ),
    };
    match type_ {
        AuthType::AccessKey => Ok(Credentials::AccessKey {
            keys: AccessKeyPair::new(
                field("accessKey").map_err(missing)?,
                field("secretKey").map_err(missing)?,
            ),
            security_token: field("securityToken").ok().map(SecretString::from),
        }),
        AuthType::Password => Ok(Credentials::Password {
            username: field("username").map_err(missing)?,
            password: SecretString::from(field("password").map_err(missing)?),
            domain_name: field("domainName").map_err(missing)?,
        }),
        AuthType::WebIdentity => unreachable!("WebIdentity reads no Secret"),
    }
}

fn token_source(
    web: &WebIdentity,
    keyless: &KeylessSettings,
) -> Result<Arc<dyn SubjectTokenSource>, Outcome> {
    match (&web.token_file, &web.service_account_ref) {
        (Some(path), None) => {
            let path = allowed_token_file(path, &keyless.token_dir)?;
            Ok(Arc::new(TokenFile { path }))
        }
        (None, Some(account)) => {
            if let Some(allowed) = &keyless.service_account_namespace
                && &account.namespace != allowed
            {
                return Err(Outcome::Stalled {
                    reason: reasons::SERVICE_ACCOUNT_NAMESPACE_NOT_ALLOWED,
                    message: format!(
                        "spec.auth.webIdentity.serviceAccountRef.namespace is {:?}, but the operator requests tokens only for ServiceAccounts of its own namespace {allowed:?}",
                        account.namespace
                    ),
                });
            }
            Ok(Arc::new(ServiceAccountToken {
                kube: keyless.kube.clone(),
                account: account.clone(),
            }))
        }
        _ => Err(Outcome::Stalled {
            reason: reasons::INVALID_SPEC,
            message: "spec.auth.webIdentity needs exactly one of tokenFile or serviceAccountRef"
                .into(),
        }),
    }
}

/// `path` if it is absolute, has no `..` and lies under `dir`; else `TokenFileNotAllowed`.
pub fn allowed_token_file(path: &str, dir: &Path) -> Result<PathBuf, Outcome> {
    let candidate = Path::new(path);
    let plain = candidate.is_absolute()
        && candidate
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
    if plain && candidate.starts_with(dir) && candidate != dir {
        return Ok(candidate.to_path_buf());
    }
    Err(Outcome::Stalled {
        reason: reasons::TOKEN_FILE_NOT_ALLOWED,
        message: format!(
            "spec.auth.webIdentity.tokenFile is {path:?}, but the operator reads ID tokens only from files under {} (its --web-identity-token-dir); mount the projected token there",
            dir.display()
        ),
    })
}

/// A projected ServiceAccount token file, re-read at every exchange (the kubelet rotates it).
struct TokenFile {
    path: PathBuf,
}

impl SubjectTokenSource for TokenFile {
    fn subject_token(
        &self,
    ) -> Pin<Box<dyn Future<Output = Result<SecretString, String>> + Send + '_>> {
        Box::pin(async move {
            use tokio::io::AsyncReadExt as _;
            let file = tokio::fs::File::open(&self.path)
                .await
                .map_err(|e| format!("cannot open it: {e}"))?;
            let mut text = String::new();
            file.take(MAX_TOKEN_BYTES)
                .read_to_string(&mut text)
                .await
                .map_err(|e| format!("cannot read it: {e}"))?;
            let token = text.trim();
            if token.is_empty() {
                return Err("it is empty".into());
            }
            Ok(SecretString::from(token.to_owned()))
        })
    }

    fn describe(&self) -> String {
        format!("token file {}", self.path.display())
    }
}

/// A token requested for a ServiceAccount (TokenRequest) at every exchange.
struct ServiceAccountToken {
    kube: kube::Client,
    account: ServiceAccountTokenReference,
}

impl SubjectTokenSource for ServiceAccountToken {
    fn subject_token(
        &self,
    ) -> Pin<Box<dyn Future<Output = Result<SecretString, String>> + Send + '_>> {
        Box::pin(async move {
            let request = TokenRequest {
                spec: TokenRequestSpec {
                    audiences: self.account.audiences.clone(),
                    expiration_seconds: Some(self.account.expiration_seconds.clamp(600, 86_400)),
                    bound_object_ref: None,
                },
                ..TokenRequest::default()
            };
            let answer =
                Api::<ServiceAccount>::namespaced(self.kube.clone(), &self.account.namespace)
                    .create_token_request(&self.account.name, &PostParams::default(), &request)
                    .await
                    .map_err(|e| format!("the TokenRequest failed: {e}"))?;
            answer
                .status
                .map(|s| s.token)
                .filter(|t| !t.is_empty())
                .map(SecretString::from)
                .ok_or_else(|| "the TokenRequest answered without a token".into())
        })
    }

    fn describe(&self) -> String {
        format!(
            "ServiceAccount {}/{}",
            self.account.namespace, self.account.name
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(pairs: &[(&str, &str)]) -> Secret {
        Secret {
            metadata: kube::api::ObjectMeta {
                name: Some("kms-credentials".into()),
                namespace: Some("kmsgrant-system".into()),
                ..Default::default()
            },
            string_data: Some(
                pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ..Default::default()
        }
    }

    #[test]
    fn credentials_name_the_missing_secret_key() {
        let missing = |type_, pairs: &[(&str, &str)]| {
            from_secret(type_, &secret(pairs))
                .unwrap_err()
                .message()
                .to_owned()
        };
        assert!(missing(AuthType::AccessKey, &[("accessKey", "AK")]).contains("\"secretKey\""));
        assert!(
            missing(AuthType::Password, &[("username", "u"), ("password", "p")])
                .contains("Secret kmsgrant-system/kms-credentials has no key \"domainName\"")
        );
        assert!(
            from_secret(
                AuthType::AccessKey,
                &secret(&[("accessKey", "AK"), ("secretKey", "SK")])
            )
            .is_ok()
        );
    }

    #[test]
    fn token_files_are_taken_only_from_under_the_token_directory() {
        let dir = Path::new(DEFAULT_TOKEN_DIR);
        assert!(allowed_token_file("/var/run/secrets/kmsgrant/token", dir).is_ok());
        assert!(allowed_token_file("/var/run/secrets/kmsgrant/sub/token", dir).is_ok());
        for refused in [
            "/var/run/secrets/kubernetes.io/serviceaccount/token",
            "/var/run/secrets/kmsgrant/../kubernetes.io/serviceaccount/token",
            "/var/run/secrets/kmsgrant",
            "/var/run/secrets/kmsgrant-evil/token",
            "var/run/secrets/kmsgrant/token",
            "/etc/passwd",
        ] {
            let outcome = allowed_token_file(refused, dir).unwrap_err();
            assert_eq!(
                outcome.reason(),
                reasons::TOKEN_FILE_NOT_ALLOWED,
                "{refused}"
            );
            assert!(outcome.message().contains("--web-identity-token-dir"));
        }
    }
}
