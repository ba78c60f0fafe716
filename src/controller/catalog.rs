//! A provider config's endpoint and region against IAM's service catalog. A copied endpoint of
//! another region or cloud, or a region that does not match the endpoint, otherwise shows only
//! later as keys that cannot be found; the catalog names the fix at once. Shared by the
//! provider controller (a condition and an event) and `kmsgrant-operator check` (a finding).

use kmsgrant_kms::{CatalogEndpoint, Url};

/// The condition type on a provider config's status.
pub const CONDITION_TYPE: &str = "EndpointInCatalog";

/// How the configured endpoint and region compare with IAM's catalog.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CatalogVerdict {
    /// The catalog lists the endpoint for the region (or for every region).
    Listed,
    /// The catalog lists the endpoint, but for other regions than `spec.region`.
    OtherRegion {
        /// The regions the catalog lists the endpoint for.
        endpoint_regions: Vec<String>,
    },
    /// The catalog lists no KMS endpoint for `spec.region`.
    RegionNotListed,
    /// The catalog lists other endpoints for the region (a copied endpoint; a private endpoint
    /// also lands here, which is why this is a warning, never a refusal).
    OtherEndpoint {
        /// The endpoints the catalog lists for the region.
        listed: Vec<String>,
    },
    /// The catalog could not be read (no IAM endpoint, a refused or failed call).
    Unknown { why: String },
}

fn host_and_port(url: &str) -> Option<String> {
    Url::parse(url).ok().map(|u| {
        format!(
            "{}:{}",
            u.host_str().unwrap_or_default(),
            u.port_or_known_default().unwrap_or(443)
        )
    })
}

/// Compares `endpoint` and `region` (none: any) with the catalog's KMS entries.
pub fn compare(
    entries: &[CatalogEndpoint],
    endpoint: &str,
    region: Option<&str>,
) -> CatalogVerdict {
    let configured = host_and_port(endpoint);
    let in_region: Vec<&CatalogEndpoint> = entries
        .iter()
        .filter(|e| {
            region.is_none() || e.region.as_deref() == region || e.region.as_deref() == Some("*")
        })
        .collect();
    let same_host = |e: &&CatalogEndpoint| {
        let host = host_and_port(&e.url);
        host.is_some() && host == configured
    };
    if in_region.iter().any(same_host) {
        return CatalogVerdict::Listed;
    }
    let endpoint_regions: Vec<String> = entries
        .iter()
        .filter(same_host)
        .map(|e| e.region.clone().unwrap_or_default())
        .collect();
    if !endpoint_regions.is_empty() {
        return CatalogVerdict::OtherRegion { endpoint_regions };
    }
    if in_region.is_empty() {
        return CatalogVerdict::RegionNotListed;
    }
    CatalogVerdict::OtherEndpoint {
        listed: in_region.iter().map(|e| e.url.clone()).collect(),
    }
}

impl CatalogVerdict {
    /// Whether the configuration disagrees with the catalog.
    pub fn is_mismatch(&self) -> bool {
        !matches!(self, Self::Listed | Self::Unknown { .. })
    }

    /// The condition reason: one of a bounded set.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Listed => "EndpointListed",
            Self::OtherRegion { .. } => "EndpointOfOtherRegion",
            Self::RegionNotListed => "RegionNotInCatalog",
            Self::OtherEndpoint { .. } => "EndpointNotInCatalog",
            Self::Unknown { .. } => "CatalogUnavailable",
        }
    }

    /// What was found, for a condition message or a finding.
    pub fn message(&self, endpoint: &str, region: Option<&str>) -> String {
        let shown_region = region.unwrap_or("(any)");
        match self {
            Self::Listed => {
                format!("IAM's catalog lists {endpoint} for KMS in region {shown_region}")
            }
            Self::OtherRegion { endpoint_regions } => format!(
                "IAM's catalog lists {endpoint} for KMS in region {endpoint_regions:?}, not in spec.region {:?}",
                region.unwrap_or_default()
            ),
            Self::RegionNotListed => format!(
                "IAM's catalog lists no KMS endpoint for region {:?}",
                region.unwrap_or_default()
            ),
            Self::OtherEndpoint { listed } => format!(
                "IAM's catalog lists KMS of region {:?} at {}, not at {endpoint} (a private endpoint is fine; a copied endpoint of another region or cloud is not)",
                region.unwrap_or_default(),
                listed.join(", ")
            ),
            Self::Unknown { why } => format!("cannot read IAM's service catalog: {why}"),
        }
    }

    /// The fix to name, when there is one.
    pub fn fix(&self, region: Option<&str>) -> Option<String> {
        match self {
            Self::Listed | Self::Unknown { .. } => None,
            Self::OtherRegion { endpoint_regions } => Some(format!(
                "set spec.region to {:?} (the endpoint's region), or the endpoint of region {:?}",
                endpoint_regions[0],
                region.unwrap_or_default()
            )),
            Self::RegionNotListed => Some(
                "check spec.region: the catalog names the regions this account's KMS serves"
                    .to_owned(),
            ),
            Self::OtherEndpoint { listed } => {
                Some(format!("set spec.endpoint to the catalog's {}", listed[0]))
            }
        }
    }

    /// The condition's status: True when listed, False on a mismatch, Unknown when unread.
    pub fn condition_status(&self) -> &'static str {
        match self {
            Self::Listed => "True",
            Self::Unknown { .. } => "Unknown",
            _ => "False",
        }
    }

    /// Message and fix in one text, as a condition message or an event note.
    pub fn note(&self, endpoint: &str, region: Option<&str>) -> String {
        match self.fix(region) {
            Some(fix) => format!("{}: {fix}", self.message(endpoint, region)),
            None => self.message(endpoint, region),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(region: &str, url: &str) -> CatalogEndpoint {
        CatalogEndpoint {
            region: Some(region.to_owned()),
            url: url.to_owned(),
        }
    }

    fn catalog() -> Vec<CatalogEndpoint> {
        vec![
            entry("eu-de", "https://kms.eu-de.otc.t-systems.com/v1.0"),
            entry("eu-nl", "https://kms.eu-nl.otc.t-systems.com/v1.0"),
        ]
    }

    #[test]
    fn the_endpoint_of_the_configured_region_is_listed_whatever_the_path() {
        let verdict = compare(
            &catalog(),
            "https://kms.eu-de.otc.t-systems.com",
            Some("eu-de"),
        );
        assert_eq!(verdict, CatalogVerdict::Listed);
        assert!(!verdict.is_mismatch());
        assert_eq!(verdict.condition_status(), "True");
    }

    #[test]
    fn the_endpoint_of_another_region_names_the_region_to_set() {
        let verdict = compare(
            &catalog(),
            "https://kms.eu-nl.otc.t-systems.com",
            Some("eu-de"),
        );
        assert_eq!(verdict.reason(), "EndpointOfOtherRegion");
        assert!(verdict.fix(Some("eu-de")).unwrap().contains("\"eu-nl\""));
        assert_eq!(verdict.condition_status(), "False");
    }

    #[test]
    fn a_copied_endpoint_names_the_catalogs_endpoint() {
        let verdict = compare(
            &catalog(),
            "https://kms.ap-southeast-1.myhuaweicloud.com",
            Some("eu-de"),
        );
        assert_eq!(verdict.reason(), "EndpointNotInCatalog");
        assert_eq!(
            verdict.fix(Some("eu-de")).unwrap(),
            "set spec.endpoint to the catalog's https://kms.eu-de.otc.t-systems.com/v1.0"
        );
    }

    #[test]
    fn a_region_the_catalog_does_not_know_is_told() {
        let verdict = compare(&catalog(), "https://kms.example", Some("xx-yy"));
        assert_eq!(verdict, CatalogVerdict::RegionNotListed);
        assert!(
            verdict
                .note("https://kms.example", Some("xx-yy"))
                .contains("spec.region")
        );
    }

    #[test]
    fn an_unreadable_catalog_is_unknown_never_a_mismatch() {
        let verdict = CatalogVerdict::Unknown {
            why: "no IAM endpoint configured".into(),
        };
        assert!(!verdict.is_mismatch());
        assert_eq!(verdict.condition_status(), "Unknown");
        assert_eq!(verdict.fix(None), None);
    }
}
