//! A grant's identity on the cloud: its name says which object, in which cluster, owns it.
//!
//! `k8s/<cluster>/<namespace>/<name>`. Ownership is read from this name on the listed grants,
//! never from process memory, so a restarted, rebuilt or second operator reaches the same
//! answer. Grant names allow `[a-zA-Z0-9:/_-]`, 1–255 characters; object names allow `.`, which
//! is mapped to `:` (object names never contain `:`, so the mapping is injective). A name that
//! would exceed 255 characters keeps a prefix of the object name and ends in `_h` and 32 hex
//! digits of SHA-256 over the full identity (object names never contain `_`, so a shortened name
//! never equals an unshortened one).

use kmsgrant_kms::Grant;
use sha2::{Digest, Sha256};

/// The grant name prefix of every identity.
pub const PREFIX: &str = "k8s/";
/// The prefix grants made by versions before identity names carried (`kmsgrant-<uid>`).
pub const LEGACY_PREFIX: &str = "kmsgrant-";
/// The longest grant name KMS accepts.
pub const MAX_GRANT_NAME: usize = 255;
/// The longest cluster name (a DNS label, or a UID).
pub const MAX_CLUSTER_NAME: usize = 63;

/// Whether a cluster name can be part of a grant name: 1–63 of `[a-zA-Z0-9_-]`.
pub fn valid_cluster_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_CLUSTER_NAME
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// The grant name of the object `namespace/name` in cluster `cluster`.
pub fn grant_name(cluster: &str, namespace: &str, name: &str) -> String {
    let mapped: String = name
        .chars()
        .map(|c| match c {
            '.' => ':',
            c if c.is_ascii_alphanumeric() || c == '-' => c,
            // Object names allow nothing else; anything else still yields a valid grant name.
            _ => '_',
        })
        .collect();
    let full = format!("{PREFIX}{cluster}/{namespace}/{mapped}");
    if full.len() <= MAX_GRANT_NAME {
        return full;
    }
    let digest = Sha256::digest(format!("{cluster}\n{namespace}\n{name}").as_bytes());
    let hash = hex::encode(&digest[..16]);
    let suffix = format!("_h{hash}");
    let head_len = MAX_GRANT_NAME - suffix.len();
    format!("{}{suffix}", &full[..head_len])
}

/// The name a grant of the object with this UID had before identity names.
pub fn legacy_grant_name(uid: &str) -> String {
    format!("{LEGACY_PREFIX}{uid}")
}

/// Whether a grant name claims to belong to some KmsGrant (an identity or a legacy name).
pub fn is_identity_name(name: &str) -> bool {
    name.starts_with(PREFIX) || name.starts_with(LEGACY_PREFIX)
}

/// The cluster part of an identity name.
pub fn cluster_of(name: &str) -> Option<&str> {
    name.strip_prefix(PREFIX)?.split('/').next()
}

/// Whose grant a name says it is, from the point of view of one object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// `k8s/<cluster>/<namespace>/<name>`.
    pub name: String,
    /// `kmsgrant-<uid>`: grants made for this very object by an older version.
    pub legacy_name: String,
}

impl Identity {
    pub fn new(cluster: &str, namespace: &str, name: &str, uid: &str) -> Self {
        Self {
            name: grant_name(cluster, namespace, name),
            legacy_name: legacy_grant_name(uid),
        }
    }

    /// Whether a grant with this name was made for this object.
    pub fn names(&self, grant_name: Option<&str>) -> bool {
        grant_name.is_some_and(|n| n == self.name || n == self.legacy_name)
    }

    /// Whether a grant with this name carries the identity of some other object.
    pub fn is_foreign(&self, grant_name: Option<&str>) -> bool {
        grant_name.is_some_and(|n| is_identity_name(n) && !self.names(Some(n)))
    }
}

/// What one listing of a key says about whether the account answers grant names, judged from a
/// grant the operator recorded with its name (`status.grantId` with `status.grantName`). Grants
/// are immutable on KMS, so such a grant listed without a name means the answer left it out
/// (the API page lists `name` as optional in answers): ownership by name cannot be read there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NamesListed {
    /// A recorded grant came back with its name.
    Returned,
    /// The recorded grant `grant_id` came back without any name.
    Missing { grant_id: String },
}

/// The evidence among `grants` from grants recorded under a name, `recorded` saying whether a
/// grant ID is one; `None` when no such grant is listed.
pub fn names_listed<'a>(
    grants: impl IntoIterator<Item = &'a Grant>,
    recorded: impl Fn(&str) -> bool,
) -> Option<NamesListed> {
    let mut returned = false;
    for grant in grants {
        if !recorded(&grant.grant_id) {
            continue;
        }
        match grant.name {
            None => {
                return Some(NamesListed::Missing {
                    grant_id: grant.grant_id.clone(),
                });
            }
            Some(_) => returned = true,
        }
    }
    returned.then_some(NamesListed::Returned)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid(name: &str) -> bool {
        (1..=MAX_GRANT_NAME).contains(&name.len())
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || ":/_-".contains(c))
    }

    #[test]
    fn identity_names_say_cluster_namespace_and_object() {
        assert_eq!(
            grant_name("prod-eu", "team-a", "app.encrypt"),
            "k8s/prod-eu/team-a/app:encrypt"
        );
        assert!(valid(&grant_name("prod-eu", "team-a", "app.encrypt")));
    }

    #[test]
    fn names_that_differ_only_in_dots_and_colons_or_in_the_split_stay_apart() {
        // `.` maps to `:`, which object names cannot hold, so these cannot meet.
        assert_ne!(grant_name("c", "a", "b.c"), grant_name("c", "a", "b-c"));
        // The namespace/name split is kept by `/`, which neither may hold.
        assert_ne!(grant_name("c", "ab", "c"), grant_name("c", "a", "bc"));
        assert_ne!(grant_name("c1", "a", "b"), grant_name("c", "1a", "b"));
    }

    #[test]
    fn long_names_are_shortened_with_a_hash_and_stay_distinct_and_valid() {
        let cluster = "c".repeat(MAX_CLUSTER_NAME);
        let namespace = "n".repeat(63);
        let long_a = format!("{}a", "x".repeat(252));
        let long_b = format!("{}b", "x".repeat(252));
        let a = grant_name(&cluster, &namespace, &long_a);
        let b = grant_name(&cluster, &namespace, &long_b);
        assert!(valid(&a) && valid(&b), "{a} / {b}");
        assert_eq!(a.len(), MAX_GRANT_NAME);
        assert_ne!(a, b);
        assert!(a.starts_with(&format!("k8s/{cluster}/{namespace}/xxx")));
        // A shortened name never equals a name that fits (those never contain `_`).
        let fits = grant_name("c", "n", "x");
        assert!(!fits.contains('_'));
        assert!(a.contains("_h"));
        // Deterministic: the same object gets the same name in every process.
        assert_eq!(a, grant_name(&cluster, &namespace, &long_a));
    }

    #[test]
    fn an_object_recognises_its_own_names_and_no_one_elses() {
        let me = Identity::new("c1", "team-a", "app", "uid-1");
        assert!(me.names(Some("k8s/c1/team-a/app")));
        assert!(me.names(Some("kmsgrant-uid-1")));
        assert!(!me.names(Some("k8s/c1/team-b/app")));
        assert!(!me.names(Some("k8s/c2/team-a/app")));
        assert!(!me.names(None));
        assert!(me.is_foreign(Some("k8s/c1/team-b/app")));
        assert!(me.is_foreign(Some("kmsgrant-uid-2")));
        assert!(!me.is_foreign(Some("made-by-hand")));
        assert!(!me.is_foreign(None));
        assert_eq!(cluster_of("k8s/c1/team-b/app"), Some("c1"));
    }

    #[test]
    fn only_a_grant_recorded_by_name_and_listed_without_one_says_names_are_missing() {
        let grant = |id: &str, name: Option<&str>| Grant {
            key_id: "k".into(),
            grant_id: id.into(),
            grantee_principal: "alice".into(),
            grantee_principal_type: None,
            operations: vec!["describe-key".into()].into(),
            issuing_principal: None,
            created_at_millis: None,
            name: name.map(str::to_owned),
            retiring_principal: None,
        };
        let listed = [
            grant("hand-made", None),
            grant("ours", Some("k8s/c1/a/b")),
            grant("theirs", None),
        ];
        // Unnamed grants nobody recorded by name (hand-made, imported) say nothing.
        assert_eq!(names_listed(&listed, |_| false), None);
        assert_eq!(
            names_listed(&listed, |id| id == "ours"),
            Some(NamesListed::Returned)
        );
        assert_eq!(
            names_listed(&listed, |id| id == "ours" || id == "theirs"),
            Some(NamesListed::Missing {
                grant_id: "theirs".into()
            })
        );
    }

    #[test]
    fn cluster_names_are_checked() {
        assert!(valid_cluster_name("prod-eu_1"));
        assert!(valid_cluster_name("4f9a1c2e-7b3d-4e5f-8a9b-0c1d2e3f4a5b"));
        assert!(!valid_cluster_name(""));
        assert!(!valid_cluster_name("a/b"));
        assert!(!valid_cluster_name("a.b"));
        assert!(!valid_cluster_name(&"x".repeat(64)));
    }
}
