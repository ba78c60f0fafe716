//! The platform team's policy on tenant provider configs (`KmsNamespacedProviderConfig`): which
//! hosts their endpoints may name and which addresses those may reach, and how fast they may
//! call. Checked before a client is built and again at every connection, so a tenant cannot make
//! the operator's pod send requests (with credentials) to the metadata service, a cluster Service
//! or a loopback admin port (docs/tenants.md).

use std::net::IpAddr;

use kmsgrant_kms::address_policy::{AddressPolicy, IpNetwork};

use super::conditions::{Outcome, reasons};
use crate::api::KmsProviderConfigSpec;

/// The public endpoints of both clouds (docs/design kms-api.md, "Endpoints").
pub const DEFAULT_TENANT_HOSTS: &str = "kms.*.otc.t-systems.com,iam.*.otc.t-systems.com,\
kms.*.myhuaweicloud.com,iam.*.myhuaweicloud.com,iam.myhuaweicloud.com";

/// A host pattern: a DNS name in which `*` stands for one or more labels (`kms.*.otc.t-systems.com`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostPattern(String);

impl std::str::FromStr for HostPattern {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim().to_ascii_lowercase();
        let valid = !text.is_empty()
            && text.split('.').all(|label| {
                label == "*"
                    || (!label.is_empty()
                        && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
            });
        if valid {
            Ok(Self(text))
        } else {
            Err(format!(
                "{text:?} is not a host pattern: DNS labels, with * for one or more labels (kms.*.otc.t-systems.com)"
            ))
        }
    }
}

impl std::fmt::Display for HostPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl HostPattern {
    /// Whether `host` (a DNS name, not an address) matches.
    pub fn matches(&self, host: &str) -> bool {
        let host = host.to_ascii_lowercase();
        let host: Vec<&str> = host.trim_end_matches('.').split('.').collect();
        let pattern: Vec<&str> = self.0.split('.').collect();
        fn walk(pattern: &[&str], host: &[&str]) -> bool {
            match (pattern.split_first(), host.split_first()) {
                (None, None) => true,
                (Some((&"*", rest)), Some(_)) => {
                    // One or more labels.
                    (1..=host.len()).any(|taken| walk(rest, &host[taken..]))
                }
                (Some((label, rest)), Some((first, more))) => label == first && walk(rest, more),
                _ => false,
            }
        }
        walk(&pattern, &host)
    }
}

/// What tenant configs may do.
#[derive(Clone, Debug)]
pub struct TenantPolicy {
    /// Hosts their endpoints may name.
    pub hosts: Vec<HostPattern>,
    /// Addresses those may resolve to: public unicast plus these networks.
    pub addresses: AddressPolicy,
    /// Plain http (local emulators, tests).
    pub allow_http: bool,
    /// The highest `rateLimit.requestsPerSecond` a tenant config gets (its share of the
    /// operator's calls); 0: no cap.
    pub max_requests_per_second: u32,
}

impl Default for TenantPolicy {
    fn default() -> Self {
        Self {
            hosts: DEFAULT_TENANT_HOSTS
                .split(',')
                .map(|h| h.parse().expect("the default patterns are valid"))
                .collect(),
            addresses: AddressPolicy::default(),
            allow_http: false,
            max_requests_per_second: 50,
        }
    }
}

impl TenantPolicy {
    /// The policy from the operator's flags.
    pub fn from_flags(
        hosts: &[String],
        networks: &[String],
        allow_http: bool,
        max_requests_per_second: u32,
    ) -> Result<Self, String> {
        Ok(Self {
            hosts: hosts
                .iter()
                .filter(|h| !h.trim().is_empty())
                .map(|h| h.parse())
                .collect::<Result<_, _>>()?,
            addresses: AddressPolicy {
                allowed_networks: networks
                    .iter()
                    .filter(|n| !n.trim().is_empty())
                    .map(|n| n.trim().parse::<IpNetwork>())
                    .collect::<Result<_, _>>()?,
            },
            allow_http,
            max_requests_per_second,
        })
    }

    /// Checks a tenant config's endpoints before anything is sent: scheme, host pattern, and the
    /// addresses each host resolves to. The refusal names the field and the rule.
    pub async fn check(&self, spec: &KmsProviderConfigSpec) -> Result<(), Outcome> {
        let endpoints = std::iter::once(("spec.endpoint", spec.endpoint.as_str())).chain(
            spec.iam_endpoint
                .as_deref()
                .map(|iam| ("spec.iamEndpoint", iam)),
        );
        for (field, endpoint) in endpoints {
            self.check_endpoint(field, endpoint).await?;
        }
        Ok(())
    }

    async fn check_endpoint(&self, field: &str, endpoint: &str) -> Result<(), Outcome> {
        let refuse = |rule: String| Outcome::Stalled {
            reason: reasons::ENDPOINT_NOT_ALLOWED,
            message: format!(
                "{field} {endpoint:?} is refused by the platform's tenant policy: {rule}; ask the platform team (operator flags --tenant-endpoint-hosts, --tenant-allowed-networks)"
            ),
        };
        let url =
            kmsgrant_kms::Url::parse(endpoint).map_err(|e| refuse(format!("not a URL ({e})")))?;
        match url.scheme() {
            "https" => {}
            "http" if self.allow_http => {}
            other => return Err(refuse(format!("scheme {other:?}: only https is allowed"))),
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(refuse("credentials in the URL".into()));
        }
        let host = url
            .host_str()
            .ok_or_else(|| refuse("no host".into()))?
            .trim_matches(['[', ']'])
            .to_owned();
        let port = url.port_or_known_default().unwrap_or(443);
        if let Ok(ip) = host.parse::<IpAddr>() {
            // An address is allowed only inside the platform's allowed networks.
            if !self
                .addresses
                .allowed_networks
                .iter()
                .any(|n| n.contains(ip))
            {
                return Err(refuse(format!(
                    "an IP address as host ({ip}); name a host the policy allows ({})",
                    self.patterns()
                )));
            }
        } else if !self.hosts.iter().any(|p| p.matches(&host)) {
            return Err(refuse(format!(
                "host {host:?} matches none of the allowed host patterns ({})",
                self.patterns()
            )));
        }
        self.addresses
            .resolve(&host, port)
            .await
            .map_err(refuse)
            .map(|_| ())
    }

    fn patterns(&self) -> String {
        self.hosts
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_patterns_match_whole_labels_only() {
        let pattern: HostPattern = "kms.*.otc.t-systems.com".parse().unwrap();
        assert!(pattern.matches("kms.eu-de.otc.t-systems.com"));
        assert!(pattern.matches("KMS.eu-ch2.sc.otc.t-systems.com"));
        assert!(!pattern.matches("kms.otc.t-systems.com"));
        assert!(!pattern.matches("kms.eu-de.otc.t-systems.com.evil.example"));
        assert!(!pattern.matches("evilkms.eu-de.otc.t-systems.com"));
        let exact: HostPattern = "iam.myhuaweicloud.com".parse().unwrap();
        assert!(exact.matches("iam.myhuaweicloud.com"));
        assert!(!exact.matches("iam.myhuaweicloud.com.cn"));
        assert!("kms..com".parse::<HostPattern>().is_err());
        assert!("kms_*.com".parse::<HostPattern>().is_err());
    }

    fn spec(endpoint: &str) -> KmsProviderConfigSpec {
        serde_json::from_value(serde_json::json!({
            "endpoint": endpoint, "projectId": "p",
            "auth": {"type": "AccessKey", "secretRef": {"namespace": "t", "name": "s"}}
        }))
        .unwrap()
    }

    async fn refusal(policy: &TenantPolicy, endpoint: &str) -> String {
        match policy.check(&spec(endpoint)).await {
            Err(outcome) => {
                assert_eq!(outcome.reason(), reasons::ENDPOINT_NOT_ALLOWED);
                outcome.message().to_owned()
            }
            Ok(()) => panic!("{endpoint} must be refused"),
        }
    }

    #[tokio::test]
    async fn the_default_policy_refuses_addresses_other_hosts_and_plain_http() {
        let policy = TenantPolicy::default();
        assert!(
            refusal(&policy, "https://127.0.0.1:8443")
                .await
                .contains("IP address")
        );
        assert!(
            refusal(&policy, "https://169.254.169.254/latest")
                .await
                .contains("IP address")
        );
        assert!(
            refusal(&policy, "https://[::1]:443")
                .await
                .contains("IP address")
        );
        assert!(
            refusal(&policy, "https://kubernetes.default.svc")
                .await
                .contains("matches none")
        );
        assert!(
            refusal(&policy, "http://kms.eu-de.otc.t-systems.com")
                .await
                .contains("only https")
        );
        assert!(
            refusal(&policy, "https://user:pw@kms.eu-de.otc.t-systems.com")
                .await
                .contains("credentials")
        );
    }

    #[tokio::test]
    async fn an_allowed_host_that_resolves_to_loopback_is_refused() {
        let policy = TenantPolicy::from_flags(&["localhost".into()], &[], true, 0).unwrap();
        let message = refusal(&policy, "http://localhost:9").await;
        assert!(message.contains("loopback"), "{message}");
    }

    #[tokio::test]
    async fn an_allowed_network_opens_it_for_addresses_and_names() {
        let policy =
            TenantPolicy::from_flags(&["localhost".into()], &["127.0.0.0/8".into()], true, 0)
                .unwrap();
        policy.check(&spec("http://127.0.0.1:9")).await.unwrap();
        policy.check(&spec("http://localhost:9")).await.unwrap();
        assert!(
            refusal(&policy, "http://169.254.169.254")
                .await
                .contains("IP address")
        );
    }
}
