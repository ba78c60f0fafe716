//! `kmsgrant-operator import`: KmsGrant manifests that take over a key's existing grants by ID.
//!
//! Lists the key's grants through a KmsProviderConfig (its endpoint, project and Secret) and
//! prints one KmsGrant per grant, with `spec.importGrantId` and the grant's own fields, so that
//! applying them adopts the grants and creates none. Grants named for a KmsGrant identity
//! (`k8s/...`, `kmsgrant-<uid>`) are left out with a comment: they belong to objects already, and
//! a rebuilt cluster re-applies those objects' manifests instead.

use std::process::ExitCode;

use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use serde_json::json;

use crate::api::{KmsProviderConfig, Operation};
use crate::controller::identity;
use kmsgrant_kms::{Grant, KmsClient};

/// Options of `kmsgrant-operator import`.
#[derive(Debug, clap::Args)]
pub struct ImportArgs {
    /// ID of the key whose grants to import.
    #[arg(long, env = "KMSGRANT_IMPORT_KEY")]
    pub key: String,
    /// The KmsProviderConfig whose endpoint, project and credentials are used.
    #[arg(long, env = "KMSGRANT_PROVIDER_CONFIG", default_value = "default")]
    pub provider_config: String,
    /// Namespace of the KmsGrants written.
    #[arg(long, env = "KMSGRANT_IMPORT_NAMESPACE", default_value = "default")]
    pub namespace: String,
    /// Kubeconfig to use (default: KUBECONFIG or the in-cluster config).
    #[arg(long, env = "KMSGRANT_KUBECONFIG", value_name = "FILE")]
    pub kubeconfig: Option<std::path::PathBuf>,
    /// Kubeconfig context to use.
    #[arg(long, env = "KMSGRANT_CONTEXT")]
    pub context: Option<String>,
    /// Accept plain http:// endpoints (local emulators only).
    #[arg(long, env = "KMSGRANT_ALLOW_HTTP_ENDPOINTS")]
    pub allow_http_endpoints: bool,
}

impl ImportArgs {
    pub fn run(self) -> ExitCode {
        let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
        match runtime.block_on(self.manifests()) {
            Ok(yaml) => {
                print!("{yaml}");
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("error: {err:#}");
                ExitCode::FAILURE
            }
        }
    }

    async fn manifests(&self) -> anyhow::Result<String> {
        let client =
            crate::process::kube_client(self.kubeconfig.clone(), self.context.clone()).await?;
        let config = Api::<KmsProviderConfig>::all(client.clone())
            .get(&self.provider_config)
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot read KmsProviderConfig {:?}: {e}",
                    self.provider_config
                )
            })?;
        let secret = match &config.spec.auth.secret_ref {
            Some(secret_ref) => Some(
                Api::<Secret>::namespaced(client.clone(), &secret_ref.namespace)
                    .get(&secret_ref.name)
                    .await
                    .map_err(|e| {
                        anyhow::anyhow!(
                            "cannot read Secret {}/{}: {e}",
                            secret_ref.namespace,
                            secret_ref.name
                        )
                    })?,
            ),
            None => None,
        };
        // WebIdentity: a ServiceAccount token is requested with the caller's own kube
        // credentials; a token file is read where this command runs.
        let keyless = crate::controller::credentials::KeylessSettings {
            token_dir: "/".into(),
            service_account_namespace: None,
            kube: client,
        };
        let client_config = crate::controller::client_config(
            &config.spec,
            secret.as_ref(),
            &keyless,
            self.allow_http_endpoints,
        )
        .map_err(|outcome| anyhow::anyhow!("{}", outcome.message()))?;
        let kms = KmsClient::new(client_config)?;
        let grants = kms
            .list_all_grants(&self.key, kmsgrant_kms::MAX_PAGE_SIZE)
            .await?;
        Ok(render(
            &grants,
            &self.key,
            &self.provider_config,
            &self.namespace,
        ))
    }
}

/// The manifests for `grants`, one YAML document each, with a comment for each grant left out.
pub fn render(grants: &[Grant], key: &str, provider_config: &str, namespace: &str) -> String {
    let mut out = format!(
        "# kmsgrant-operator import --key {key} --provider-config {provider_config} --namespace {namespace}\n\
         # Applying these adopts the grants by ID (spec.importGrantId) and creates none. The\n\
         # provider config must allow import in the namespace (spec.importNamespaceSelector).\n"
    );
    for grant in grants {
        if let Some(name) = grant
            .name
            .as_deref()
            .filter(|n| identity::is_identity_name(n))
        {
            out.push_str(&format!(
                "# skipped grant {}: its name {name:?} is a KmsGrant's identity\n",
                grant.grant_id
            ));
            continue;
        }
        let operations: Option<Vec<Operation>> = grant
            .operations
            .iter()
            .map(|op| Operation::from_wire(op))
            .collect();
        let Some(operations) = operations else {
            out.push_str(&format!(
                "# skipped grant {}: operations {:?} include one this version does not know\n",
                grant.grant_id, grant.operations
            ));
            continue;
        };
        let mut spec = json!({
            "providerConfigRef": {"name": provider_config},
            "keyId": grant.key_id,
            "granteePrincipal": grant.grantee_principal,
            "granteePrincipalType": grant.grantee_type(),
            "operations": operations,
            "importGrantId": grant.grant_id,
        });
        if let Some(retiring) = grant
            .retiring_principal
            .as_deref()
            .filter(|p| !p.is_empty())
        {
            spec["retiringPrincipal"] = json!(retiring);
        }
        let manifest = json!({
            "apiVersion": "kmsgrant.io/v1beta1",
            "kind": "KmsGrant",
            "metadata": {
                "name": format!("imported-{}", &grant.grant_id[..grant.grant_id.len().min(16)]).to_lowercase(),
                "namespace": namespace,
                "annotations": {
                    "kmsgrant.io/imported-grant-name": grant.name.clone().unwrap_or_default(),
                },
            },
            "spec": spec,
        });
        out.push_str("---\n");
        out.push_str(&serde_saphyr::to_string(&manifest).expect("a manifest serialises to YAML"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(id: &str, name: Option<&str>, operations: &[&str]) -> Grant {
        Grant {
            key_id: "bb6a3d22-dc93-47ac-b5bd-88df7ad35f1e".into(),
            grant_id: id.into(),
            grantee_principal: "alice".into(),
            grantee_principal_type: Some("domain".into()),
            operations: operations.iter().map(|s| s.to_string()).collect(),
            issuing_principal: None,
            created_at_millis: None,
            name: name.map(str::to_owned),
            retiring_principal: Some("bob".into()),
        }
    }

    #[test]
    fn manifests_import_foreign_grants_by_id_and_skip_identities() {
        let hand = "a".repeat(64);
        let owned = "b".repeat(64);
        let yaml = render(
            &[
                grant(&hand, Some("made-by-hand"), &["describe-key"]),
                grant(&owned, Some("k8s/c1/team-a/app"), &["describe-key"]),
            ],
            "bb6a3d22-dc93-47ac-b5bd-88df7ad35f1e",
            "default",
            "team-a",
        );
        let docs: Vec<serde_json::Value> = yaml
            .split("\n---\n")
            .skip(1)
            .map(|d| serde_saphyr::from_str(d).unwrap())
            .collect();
        assert_eq!(docs.len(), 1, "{yaml}");
        let spec = &docs[0]["spec"];
        assert_eq!(spec["importGrantId"], hand.as_str());
        assert_eq!(spec["granteePrincipalType"], "domain");
        assert_eq!(spec["retiringPrincipal"], "bob");
        assert_eq!(spec["operations"], json!(["describe-key"]));
        assert_eq!(docs[0]["metadata"]["namespace"], "team-a");
        assert!(yaml.contains(&format!("# skipped grant {owned}")));
    }
}
