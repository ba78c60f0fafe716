//! Which addresses a client may connect to: against server-side request forgery when the
//! endpoint comes from someone the operator does not trust (a tenant's provider config).
//!
//! Only public unicast addresses, plus the networks the platform allows. The check runs where
//! the connection is made: every connection resolves its host through [`GuardedResolver`], which
//! drops refused addresses, so a DNS answer that changes between a check and a connection (DNS
//! rebinding) cannot reach loopback, link-local (the metadata service at 169.254.169.254),
//! private or cluster ranges. Redirects are never followed by this client anyway.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;

/// An IP network, `10.0.0.0/8` or `fd00::/8`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpNetwork {
    address: IpAddr,
    prefix: u8,
}

impl IpNetwork {
    /// Whether `ip` lies in this network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.address, canonical(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for IpNetwork {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let address: IpAddr = address
            .parse()
            .map_err(|_| format!("{text:?} is not an IP network (e.g. 10.0.0.0/8)"))?;
        let max = if address.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{text:?}: the prefix length must be 0 to {max}"))?,
            None => max,
        };
        Ok(Self { address, prefix })
    }
}

impl std::fmt::Display for IpNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.address, self.prefix)
    }
}

/// What a client may connect to: public unicast addresses and `allowed_networks`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AddressPolicy {
    /// Networks allowed although they are not public (a private KMS endpoint the platform
    /// trusts; loopback in tests).
    pub allowed_networks: Vec<IpNetwork>,
}

impl AddressPolicy {
    /// Whether a connection to `ip` is allowed.
    pub fn allows(&self, ip: IpAddr) -> bool {
        is_public(ip) || self.allowed_networks.iter().any(|n| n.contains(ip))
    }

    /// Why `ip` is refused, or `None` when it is allowed.
    pub fn refusal(&self, ip: IpAddr) -> Option<String> {
        (!self.allows(ip)).then(|| {
            format!(
                "{ip} is {} and not in the allowed networks{}",
                kind_of(canonical(ip)),
                if self.allowed_networks.is_empty() {
                    String::new()
                } else {
                    format!(
                        " ({})",
                        self.allowed_networks
                            .iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                }
            )
        })
    }

    /// The addresses `host` resolves to, or why none may be used.
    pub async fn resolve(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, String> {
        if let Ok(ip) = host.trim_matches(['[', ']']).parse::<IpAddr>() {
            return match self.refusal(ip) {
                None => Ok(vec![SocketAddr::new(ip, port)]),
                Some(why) => Err(why),
            };
        }
        let found: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
            .await
            .map_err(|e| format!("cannot resolve {host}: {e}"))?
            .collect();
        let (allowed, refused): (Vec<SocketAddr>, Vec<SocketAddr>) =
            found.into_iter().partition(|a| self.allows(a.ip()));
        if allowed.is_empty() {
            return Err(match refused.first() {
                Some(first) => format!(
                    "{host} resolves only to refused addresses: {}",
                    self.refusal(first.ip()).unwrap_or_default()
                ),
                None => format!("{host} resolves to no address"),
            });
        }
        Ok(allowed)
    }
}

/// IPv4-mapped IPv6 addresses are judged as the IPv4 address they carry.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

fn kind_of(ip: IpAddr) -> &'static str {
    match ip {
        IpAddr::V4(v4) if v4.is_loopback() => "a loopback address",
        IpAddr::V4(v4) if v4.is_link_local() => {
            "link-local (the cloud metadata service lives there)"
        }
        IpAddr::V4(v4) if v4.is_private() => "a private address",
        IpAddr::V6(v6) if v6.is_loopback() => "a loopback address",
        IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80 => "link-local",
        IpAddr::V6(v6) if (v6.segments()[0] & 0xfe00) == 0xfc00 => {
            "a unique local (private) address"
        }
        _ => "not a public unicast address",
    }
}

/// Whether `ip` is a public unicast address: not loopback, link-local, private, shared (CGNAT),
/// documentation, benchmarking, multicast, broadcast, reserved or unspecified.
pub fn is_public(ip: IpAddr) -> bool {
    match canonical(ip) {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => is_public_v6(v6),
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_broadcast()
        || ip.is_documentation()
        || ip.is_multicast()
        || a == 0
        // Shared address space (RFC 6598, carrier-grade NAT).
        || (a == 100 && (64..128).contains(&b))
        // IETF protocol assignments, and benchmarking (RFC 2544).
        || (a == 192 && b == 0 && c == 0)
        || (a == 198 && (18..20).contains(&b))
        // Reserved (240.0.0.0/4).
        || a >= 240)
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    let first = ip.segments()[0];
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        // Unique local fc00::/7, link-local fe80::/10.
        || (first & 0xfe00) == 0xfc00
        || (first & 0xffc0) == 0xfe80
        // Documentation 2001:db8::/32.
        || (first == 0x2001 && ip.segments()[1] == 0x0db8)
        // NAT64 (64:ff9b::/96) and IPv4-compatible (::/96): they carry an IPv4 address.
        || (first == 0x0064 && ip.segments()[1] == 0xff9b)
        || ip.segments()[..6].iter().all(|s| *s == 0))
}

/// A connection refused by the policy, found again in the transport error's chain.
#[derive(Debug)]
pub(crate) struct AddressRefused(pub String);

impl std::fmt::Display for AddressRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "address policy: {}", self.0)
    }
}

impl std::error::Error for AddressRefused {}

/// A reqwest resolver that hands out only the addresses the policy allows.
#[derive(Clone, Debug)]
pub(crate) struct GuardedResolver {
    pub policy: Arc<AddressPolicy>,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.policy.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let addresses = policy.resolve(&host, 0).await.map_err(
                |why| -> Box<dyn std::error::Error + Send + Sync> { Box::new(AddressRefused(why)) },
            )?;
            Ok(Box::new(addresses.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn loopback_link_local_private_and_cluster_ranges_are_refused() {
        let policy = AddressPolicy::default();
        for refused in [
            "127.0.0.1",
            "127.1.2.3",
            "169.254.169.254",
            "10.96.0.1",
            "172.16.5.4",
            "192.168.1.1",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "::1",
            "::",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
        ] {
            assert!(!policy.allows(ip(refused)), "{refused} must be refused");
            assert!(policy.refusal(ip(refused)).is_some());
        }
        for allowed in ["80.158.0.1", "1.1.1.1", "2a01:4f8::1"] {
            assert!(policy.allows(ip(allowed)), "{allowed} is public");
        }
        assert!(
            policy
                .refusal(ip("169.254.169.254"))
                .unwrap()
                .contains("metadata")
        );
    }

    #[test]
    fn allowed_networks_open_exactly_their_range() {
        let policy = AddressPolicy {
            allowed_networks: vec![
                "10.20.0.0/16".parse().unwrap(),
                "127.0.0.1".parse().unwrap(),
            ],
        };
        assert!(policy.allows(ip("10.20.3.4")));
        assert!(!policy.allows(ip("10.21.0.1")));
        assert!(policy.allows(ip("127.0.0.1")));
        assert!(!policy.allows(ip("127.0.0.2")));
        assert!(policy.allows(ip("::ffff:10.20.0.9")));
    }

    #[test]
    fn networks_parse_and_refuse_nonsense_with_the_expected_form() {
        assert_eq!(
            "fd00::/8".parse::<IpNetwork>().unwrap().to_string(),
            "fd00::/8"
        );
        assert!(
            "10.0.0.0/33"
                .parse::<IpNetwork>()
                .unwrap_err()
                .contains("0 to 32")
        );
        assert!(
            "ten"
                .parse::<IpNetwork>()
                .unwrap_err()
                .contains("10.0.0.0/8")
        );
    }

    #[tokio::test]
    async fn a_name_resolving_to_loopback_is_refused_before_any_connection() {
        let policy = AddressPolicy::default();
        let err = policy.resolve("localhost", 443).await.unwrap_err();
        assert!(err.contains("loopback"), "{err}");
        let err = policy.resolve("169.254.169.254", 80).await.unwrap_err();
        assert!(err.contains("link-local"), "{err}");
    }
}
