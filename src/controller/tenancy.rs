//! The platform team's policy on tenant provider configs (`KmsNamespacedProviderConfig`): which
//! hosts their endpoints may name and which addresses those may reach, and how fast they may
//! call, and how many objects of a namespace they serve. Endpoints are checked before a client is
//! built and again at every connection, so a tenant cannot make the operator's pod send requests
//! (with credentials) to the metadata service, a cluster Service or a loopback admin port
//! (docs/tenants.md).

use std::net::IpAddr;

use kmsgrant_kms::address_policy::{AddressPolicy, IpNetwork};

use super::conditions::{Outcome, reasons};
use crate::api::{KmsGrant, KmsProviderConfigSpec, ProviderConfigKind};

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
    /// The most KmsGrants of one namespace that its tenant configs serve (see
    /// [`namespace_share`]); 0: no limit.
    pub max_objects_per_namespace: u32,
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
            max_objects_per_namespace: 0,
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
        max_objects_per_namespace: u32,
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
            max_objects_per_namespace,
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

/// Whether a KmsGrant counts against its namespace's object limit: it names a namespaced
/// (tenant) config and is not being deleted (its place goes to the next object at once, while
/// its grant is being revoked).
fn counts_against_limit(object: &KmsGrant) -> bool {
    object.spec.provider_config_ref.kind == ProviderConfigKind::KmsNamespacedProviderConfig
        && object.metadata.deletion_timestamp.is_none()
}

/// Status records a grant ID.
fn holds_grant(object: &KmsGrant) -> bool {
    object
        .status
        .as_ref()
        .is_some_and(|status| status.grant_id.is_some())
}

/// Whether the tenant configs of a namespace serve `object` under the platform's limit of
/// `limit` objects per namespace (0: no limit). `objects` gives the KmsGrants the controller has
/// cached (any namespace; only `object`'s are looked at), asked for only when the limit can
/// apply: not for an object that holds a grant, nor without a limit. Deterministic; it never takes a
/// grant away: objects holding a grant are always served and come first in the count, then the
/// others by creationTimestamp, then name; of those, the first `limit` are served. `Err` is the
/// refusal for an object beyond them, naming the rule, the limit, the count and the flag.
pub fn namespace_share<I>(
    objects: impl FnOnce() -> I,
    limit: u32,
    object: &KmsGrant,
) -> Result<(), Outcome>
where
    I: IntoIterator,
    I::Item: std::borrow::Borrow<KmsGrant>,
{
    use std::borrow::Borrow;
    if limit == 0 || !counts_against_limit(object) || holds_grant(object) {
        return Ok(());
    }
    let namespace = object.metadata.namespace.as_deref();
    let rank = |o: &KmsGrant| {
        (
            !holds_grant(o),
            o.metadata.creation_timestamp.as_ref().map(|t| t.0),
            o.metadata.name.clone().unwrap_or_default(),
        )
    };
    let own = rank(object);
    let (mut count, mut ahead) = (0usize, 0usize);
    for other in objects() {
        let other: &KmsGrant = other.borrow();
        if other.metadata.namespace.as_deref() != namespace || !counts_against_limit(other) {
            continue;
        }
        count += 1;
        if other.metadata.name != object.metadata.name && rank(other) < own {
            ahead += 1;
        }
    }
    // `object` itself, should the cache not hold it (yet).
    let count = count.max(ahead + 1);
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    if ahead < limit {
        return Ok(());
    }
    Err(Outcome::Stalled {
        reason: reasons::NAMESPACE_OBJECT_LIMIT,
        message: format!(
            "namespace {:?} has {count} KmsGrants on its own provider configs (KmsNamespacedProviderConfig) and the platform's tenant policy serves at most {limit} objects per namespace; this one is number {} (objects holding a grant first, then the oldest), so no grant is created for it: delete one of the others, or ask the platform team to raise --tenant-max-objects-per-namespace",
            namespace.unwrap_or_default(),
            ahead + 1,
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A KmsGrant in `namespace` on a tenant config (`tenant`) or a cluster config, created at
    /// `created` (seconds), holding a grant or not.
    fn object(namespace: &str, name: &str, created: u32, tenant: bool, grant: bool) -> KmsGrant {
        let kind = match tenant {
            true => "KmsNamespacedProviderConfig",
            false => "KmsProviderConfig",
        };
        let mut object: KmsGrant = serde_json::from_value(serde_json::json!({
            "apiVersion": "kmsgrant.io/v1beta1", "kind": "KmsGrant",
            "metadata": {
                "name": name, "namespace": namespace,
                "creationTimestamp": format!("2026-01-01T00:00:{created:02}Z"),
            },
            "spec": {
                "providerConfigRef": {"kind": kind, "name": "own"},
                "keyId": "0d0466b0-e727-4d9c-b35d-f84bb474a37f",
                "granteePrincipal": "13gg44z4g2sglzk0egw0u726zoyzvrs8",
                "operations": ["describe-key"]
            }
        }))
        .unwrap();
        if grant {
            object.status = Some(crate::api::KmsGrantStatus {
                grant_id: Some(format!("grant-{name}")),
                ..Default::default()
            });
        }
        object
    }

    /// The names of `objects` served under `limit`.
    fn served(objects: &[KmsGrant], limit: u32) -> Vec<&str> {
        objects
            .iter()
            .filter(|o| namespace_share(|| objects, limit, o).is_ok())
            .map(|o| o.metadata.name.as_deref().unwrap())
            .collect()
    }

    #[test]
    fn the_oldest_objects_are_served_up_to_the_limit_with_the_name_breaking_ties() {
        let objects = [
            object("team-a", "newest", 9, true, false),
            object("team-a", "b-same-second", 5, true, false),
            object("team-a", "a-same-second", 5, true, false),
            object("team-a", "oldest", 1, true, false),
        ];
        assert_eq!(served(&objects, 2), ["a-same-second", "oldest"]);
        assert_eq!(served(&objects, 3).len(), 3);
        assert_eq!(served(&objects, 0).len(), 4, "0: no limit");
        let refusal = namespace_share(|| &objects, 2, &objects[0]).unwrap_err();
        assert_eq!(refusal.reason(), reasons::NAMESPACE_OBJECT_LIMIT);
        assert!(matches!(refusal, Outcome::Stalled { .. }));
        let message = refusal.message();
        for part in [
            "\"team-a\"",
            "4 KmsGrants",
            "at most 2 objects per namespace",
            "number 4",
            "--tenant-max-objects-per-namespace",
        ] {
            assert!(message.contains(part), "{part}: {message}");
        }
    }

    #[test]
    fn objects_holding_a_grant_count_first_and_keep_it_when_the_limit_is_lowered() {
        let objects = [
            object("team-a", "old-waiting", 1, true, false),
            object("team-a", "holder-1", 2, true, true),
            object("team-a", "holder-2", 3, true, true),
            object("team-a", "holder-3", 4, true, true),
        ];
        // An older object without a grant does not push out one holding a grant.
        assert_eq!(served(&objects, 3), ["holder-1", "holder-2", "holder-3"]);
        // Lowered below the number holding grants: nothing is taken away, nothing new is served.
        assert_eq!(served(&objects, 1), ["holder-1", "holder-2", "holder-3"]);
        assert_eq!(served(&objects, 4).len(), 4);
    }

    #[test]
    fn cluster_configs_other_namespaces_and_objects_being_deleted_take_no_place() {
        let mut deleted = object("team-a", "deleted", 1, true, true);
        deleted.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                "2026-01-01T00:01:00Z".parse().unwrap(),
            ));
        let objects = [
            deleted,
            object("team-a", "platform", 2, false, false),
            object("team-b", "elsewhere", 3, true, true),
            object("team-a", "tenant", 4, true, false),
        ];
        assert!(namespace_share(|| &objects, 1, &objects[3]).is_ok());
        // The cluster config's object is never limited, whatever the count.
        assert!(namespace_share(|| &objects, 1, &objects[1]).is_ok());
        let crowded = [
            object("team-a", "first", 1, true, false),
            object("team-a", "platform", 5, false, false),
        ];
        assert!(namespace_share(|| &crowded, 1, &crowded[1]).is_ok());
    }

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
        let policy = TenantPolicy::from_flags(&["localhost".into()], &[], true, 0, 0).unwrap();
        let message = refusal(&policy, "http://localhost:9").await;
        assert!(message.contains("loopback"), "{message}");
    }

    #[tokio::test]
    async fn an_allowed_network_opens_it_for_addresses_and_names() {
        let policy =
            TenantPolicy::from_flags(&["localhost".into()], &["127.0.0.0/8".into()], true, 0, 0)
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
