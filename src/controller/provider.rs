//! KmsProviderConfig: turn a config and its Secret into a working KMS client, and say whether the
//! credentials work.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use serde_json::json;

use super::conditions::{Outcome, conditions, now_rfc3339, reasons};
use super::{Context, ReconcileError};
use crate::api::{
    AuthType, KmsProviderConfig, KmsProviderConfigSpec, KmsProviderConfigStatus, SigningVariant,
};
use kmsgrant_kms::signer::{AccessKeyPair, SigningScheme};
use kmsgrant_kms::{
    ClientConfig, Credentials, ErrorClass, KmsClient, KmsError, Project, RateLimitConfig,
    SecretString,
};

/// A provider config whose credentials were verified, with its client.
#[derive(Clone)]
pub struct Provider {
    pub client: KmsClient,
    pub spec: KmsProviderConfigSpec,
    /// Changes whenever the config's spec or its Secret changes.
    pub fingerprint: String,
}

/// The verified providers by config name.
#[derive(Default)]
pub struct ProviderRegistry {
    providers: RwLock<HashMap<String, Provider>>,
}

impl ProviderRegistry {
    pub fn get(&self, name: &str) -> Option<Provider> {
        self.providers
            .read()
            .expect("registry lock")
            .get(name)
            .cloned()
    }

    fn set(&self, name: &str, provider: Provider) {
        self.providers
            .write()
            .expect("registry lock")
            .insert(name.to_owned(), provider);
    }

    fn remove(&self, name: &str) {
        self.providers.write().expect("registry lock").remove(name);
    }
}

/// Why a provider config is not usable, as a condition.
struct NotUsable(Outcome);

pub async fn reconcile(
    config: Arc<KmsProviderConfig>,
    ctx: Arc<Context>,
) -> Result<Action, ReconcileError> {
    let name = config.name_any();
    let outcome = match build_and_check(&config, &ctx).await {
        Ok((provider, project_id)) => {
            let changed = ctx
                .providers
                .get(&name)
                .is_none_or(|p| p.fingerprint != provider.fingerprint);
            if changed {
                ctx.keys.forget_provider(&name);
                ctx.providers.set(&name, provider);
                tracing::info!(provider = %name, "provider config verified");
            }
            write_status(
                &config,
                &ctx,
                &Outcome::Ready {
                    reason: reasons::PROVIDER_READY,
                    message: format!(
                        "authenticated against {} in project {project_id}",
                        config.spec.endpoint
                    ),
                },
                Some(project_id),
            )
            .await?;
            return Ok(Action::requeue(
                ctx.settings.resync.max(Duration::from_secs(60)),
            ));
        }
        Err(NotUsable(outcome)) => outcome,
    };
    ctx.providers.remove(&name);
    ctx.keys.forget_provider(&name);
    write_status(&config, &ctx, &outcome, None).await?;
    Ok(match outcome {
        Outcome::Stalled { .. } => Action::requeue(ctx.settings.stalled_retry),
        _ => Action::requeue(ctx.settings.backoff_min.max(Duration::from_secs(5))),
    })
}

async fn build_and_check(
    config: &KmsProviderConfig,
    ctx: &Context,
) -> Result<(Provider, String), NotUsable> {
    let spec = &config.spec;
    let secret_ref = &spec.auth.secret_ref;
    let secret = Api::<Secret>::namespaced(ctx.client.clone(), &secret_ref.namespace)
        .get_opt(&secret_ref.name)
        .await
        .map_err(|e| {
            NotUsable(Outcome::Progressing {
                reason: reasons::SECRET_NOT_FOUND,
                message: format!("cannot read Secret {}/{}: {e}", secret_ref.namespace, secret_ref.name),
            })
        })?
        .ok_or_else(|| {
            NotUsable(Outcome::Stalled {
                reason: reasons::SECRET_NOT_FOUND,
                message: format!(
                    "Secret {}/{} does not exist; create it with the credentials for auth type {:?}",
                    secret_ref.namespace, secret_ref.name, spec.auth.type_
                ),
            })
        })?;
    let fingerprint = format!(
        "{}/{}",
        config.meta().generation.unwrap_or_default(),
        secret.resource_version().unwrap_or_default()
    );
    // Nothing changed since the last check: check again with the same client (its pool, token
    // and resolved project), instead of building a new one and logging in again.
    if let Some(current) = ctx
        .providers
        .get(&config.name_any())
        .filter(|p| p.fingerprint == fingerprint)
    {
        let project_id = current
            .client
            .project_id()
            .await
            .map_err(|e| NotUsable(kms_outcome(&e)))?;
        current
            .client
            .user_quotas()
            .await
            .map_err(|e| NotUsable(kms_outcome(&e)))?;
        return Ok((current, project_id));
    }
    let data = secret_data(&secret);
    let credentials = credentials(spec.auth.type_, &data).map_err(|missing| {
        NotUsable(Outcome::Stalled {
            reason: reasons::SECRET_INCOMPLETE,
            message: format!(
                "Secret {}/{} has no key {missing:?}; add it",
                secret_ref.namespace, secret_ref.name
            ),
        })
    })?;
    let project = match (&spec.project_id, &spec.project_name) {
        (Some(id), _) => Project::Id(id.clone()),
        (None, Some(name)) => Project::Name(name.clone()),
        (None, None) => {
            return Err(NotUsable(Outcome::Stalled {
                reason: reasons::INVALID_SPEC,
                message: "set spec.projectId or spec.projectName".into(),
            }));
        }
    };
    let mut client_config = ClientConfig::new(spec.endpoint.clone(), project, credentials);
    client_config.iam_endpoint = spec.iam_endpoint.clone();
    client_config.region = spec.region.clone().unwrap_or_default();
    client_config.signing = match spec.auth.signing_variant {
        SigningVariant::Huawei => SigningScheme::Access,
        SigningVariant::OpenTelekomCloud => SigningScheme::Credential {
            region: client_config.region.clone(),
            service: "kms".into(),
        },
    };
    client_config.rate_limit = RateLimitConfig {
        requests_per_second: f64::from(spec.rate_limit.requests_per_second),
        burst: spec.rate_limit.burst,
    };
    client_config.ca_bundle = spec.ca_bundle.clone();
    client_config.allow_http = ctx.settings.allow_http;
    let client = KmsClient::with_metrics(client_config, ctx.metrics.clone())
        .map_err(|e| NotUsable(kms_outcome(&e)))?;
    // One cheap authenticated call proves endpoint, project and credentials.
    let project_id = client
        .project_id()
        .await
        .map_err(|e| NotUsable(kms_outcome(&e)))?;
    client
        .user_quotas()
        .await
        .map_err(|e| NotUsable(kms_outcome(&e)))?;
    Ok((
        Provider {
            client,
            spec: spec.clone(),
            fingerprint,
        },
        project_id,
    ))
}

fn secret_data(secret: &Secret) -> BTreeMap<String, String> {
    let mut data: BTreeMap<String, String> = secret.string_data.clone().unwrap_or_default();
    for (key, value) in secret.data.clone().unwrap_or_default() {
        if let Ok(text) = String::from_utf8(value.0) {
            data.entry(key).or_insert(text);
        }
    }
    data
}

fn credentials(
    auth: AuthType,
    data: &BTreeMap<String, String>,
) -> Result<Credentials, &'static str> {
    let get = |key: &'static str| {
        data.get(key)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
            .ok_or(key)
    };
    Ok(match auth {
        AuthType::AccessKey => Credentials::AccessKey {
            keys: AccessKeyPair::new(get("accessKey")?, get("secretKey")?),
            security_token: get("securityToken").ok().map(SecretString::from),
        },
        AuthType::Password => Credentials::Password {
            username: get("username")?,
            password: SecretString::from(get("password")?),
            domain_name: get("domainName")?,
        },
    })
}

/// The condition for a KMS failure while checking a provider.
fn kms_outcome(err: &KmsError) -> Outcome {
    let message = format!("{err}; check the endpoint, project and the credentials in the Secret");
    match err.class() {
        ErrorClass::Retryable | ErrorClass::OutcomeUnknown => Outcome::Progressing {
            reason: reasons::KMS_UNAVAILABLE,
            message,
        },
        _ => Outcome::Stalled {
            reason: err.reason.as_str(),
            message,
        },
    }
}

async fn write_status(
    config: &KmsProviderConfig,
    ctx: &Context,
    outcome: &Outcome,
    project_id: Option<String>,
) -> Result<(), ReconcileError> {
    let previous = config.status.clone().unwrap_or_default();
    let generation = config.meta().generation;
    let status = KmsProviderConfigStatus {
        project_id: project_id.or(previous.project_id.clone()),
        observed_generation: generation,
        conditions: conditions(outcome, generation, &previous.conditions, &now_rfc3339()),
    };
    if status == previous {
        return Ok(());
    }
    let api = Api::<KmsProviderConfig>::all(ctx.client.clone());
    api.patch_status(
        &config.name_any(),
        &PatchParams::default(),
        &Patch::Merge(json!({"status": status})),
    )
    .await
    .map_err(ReconcileError::Kube)?;
    Ok(())
}

/// Whether a namespace with these labels may use a provider config with this selector.
pub fn namespace_allowed(
    selector: Option<&LabelSelector>,
    labels: &BTreeMap<String, String>,
) -> bool {
    let Some(selector) = selector else {
        return true;
    };
    // The CRD schema rejects malformed expressions; one stored before that rule existed
    // allows nothing rather than everything.
    kube::core::Selector::try_from(selector.clone())
        .is_ok_and(|selector| kube::core::SelectorExt::matches(&selector, labels))
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn namespace_selector_matches_labels_and_expressions() {
        let selector = LabelSelector {
            match_labels: Some(labels(&[("kms-grants", "allowed")])),
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "tier".into(),
                operator: "NotIn".into(),
                values: Some(vec!["sandbox".into()]),
            }]),
        };
        assert!(namespace_allowed(None, &labels(&[])));
        assert!(namespace_allowed(
            Some(&selector),
            &labels(&[("kms-grants", "allowed")])
        ));
        assert!(!namespace_allowed(
            Some(&selector),
            &labels(&[("kms-grants", "allowed"), ("tier", "sandbox")])
        ));
        assert!(!namespace_allowed(Some(&selector), &labels(&[])));
    }

    #[test]
    fn a_selector_with_an_unknown_operator_allows_no_namespace() {
        let selector = LabelSelector {
            match_labels: None,
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "tier".into(),
                operator: "Like".into(),
                values: Some(vec!["prod".into()]),
            }]),
        };
        assert!(!namespace_allowed(
            Some(&selector),
            &labels(&[("tier", "prod")])
        ));
    }

    #[test]
    fn credentials_name_the_missing_secret_key() {
        let data = labels(&[("accessKey", "AK")]);
        assert_eq!(
            credentials(AuthType::AccessKey, &data).unwrap_err(),
            "secretKey"
        );
        let data = labels(&[("username", "u"), ("password", "p")]);
        assert_eq!(
            credentials(AuthType::Password, &data).unwrap_err(),
            "domainName"
        );
    }
}
