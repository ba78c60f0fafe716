//! Pure decisions: given what the object wants and what the key holds, what to do next.
//! No I/O here; the reconciler fetches, calls [`plan`], and carries the result out.

use std::collections::BTreeSet;

use crate::api::{GrantRef, KmsGrant, Operation};
use kmsgrant_kms::{Grant, NewGrant};

/// The grant an object wants, derived from its spec and UID.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredGrant {
    pub key_id: String,
    /// `spec.name`, or a name derived from the object's UID.
    pub name: String,
    pub grantee_principal: String,
    pub grantee_principal_type: crate::api::GranteePrincipalType,
    pub operations: BTreeSet<Operation>,
    pub retiring_principal: Option<String>,
}

impl DesiredGrant {
    pub fn of(grant: &KmsGrant, uid: &str) -> Self {
        let spec = &grant.spec;
        Self {
            key_id: spec.key_id.clone(),
            name: spec
                .name
                .clone()
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| derived_name(uid)),
            grantee_principal: spec.grantee_principal.clone(),
            grantee_principal_type: spec.grantee_principal_type,
            operations: spec.operation_set(),
            retiring_principal: spec.retiring_principal.clone().filter(|p| !p.is_empty()),
        }
    }

    /// Whether a grant on the cloud is exactly this one (operations compared as a set).
    pub fn is_matched_by(&self, grant: &Grant) -> bool {
        let operations: BTreeSet<&str> = self.operations.iter().map(|op| op.as_str()).collect();
        grant.key_id == self.key_id
            && grant.name.as_deref() == Some(self.name.as_str())
            && grant.grantee_principal == self.grantee_principal
            && grant.grantee_type() == self.grantee_principal_type.as_str()
            && grant.operation_set() == operations
            && grant.retiring_principal == self.retiring_principal
    }

    pub fn to_new_grant(&self) -> NewGrant {
        NewGrant {
            key_id: self.key_id.clone(),
            grantee_principal: self.grantee_principal.clone(),
            grantee_principal_type: self.grantee_principal_type,
            operations: self.operations.iter().copied().collect(),
            name: Some(self.name.clone()),
            retiring_principal: self.retiring_principal.clone(),
        }
    }
}

/// The grant name of an object without `spec.name`: unique to the object, so after a crash that
/// lost the status write the object finds its own grant again and nobody else's.
pub fn derived_name(uid: &str) -> String {
    format!("kmsgrant-{uid}")
}

/// What the owned grant (from status) looks like on the cloud.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OwnedGrant<'a> {
    /// Status names no grant.
    None,
    /// Status names a grant that is on the cloud.
    Present(&'a Grant),
    /// Status names a grant the cloud no longer has (revoked or retired out of band).
    Vanished(GrantRef),
}

/// The next step for one object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    /// The owned grant matches the spec: nothing to write on the cloud.
    InSync { grant_id: String },
    /// A grant left over from a replacement is still on the cloud: revoke it (the new one exists).
    RevokeSuperseded(GrantRef),
    /// A matching grant nobody owns exists (our own create whose answer or status write was lost):
    /// take it instead of creating a duplicate. `supersede` is the owned grant it replaces.
    Adopt {
        grant_id: String,
        supersede: Option<GrantRef>,
    },
    /// Create the grant. `supersede`: the owned grant it replaces (spec changed), revoked after.
    /// `recreate`: the owned grant vanished from the cloud (drift).
    Create {
        supersede: Option<GrantRef>,
        recreate: bool,
    },
}

/// Decides the next step. `candidates` are the grants on the desired key; `owned_elsewhere` says
/// whether another KmsGrant already owns a grant ID.
pub fn plan(
    desired: &DesiredGrant,
    owned: OwnedGrant<'_>,
    superseded: Option<&GrantRef>,
    candidates: &[Grant],
    owned_elsewhere: impl Fn(&str) -> bool,
) -> Plan {
    let owned_ref = match &owned {
        OwnedGrant::Present(grant) if desired.is_matched_by(grant) => {
            return match superseded {
                Some(old) if old.grant_id != grant.grant_id => Plan::RevokeSuperseded(old.clone()),
                _ => Plan::InSync {
                    grant_id: grant.grant_id.clone(),
                },
            };
        }
        OwnedGrant::Present(grant) => Some(GrantRef {
            key_id: grant.key_id.clone(),
            grant_id: grant.grant_id.clone(),
        }),
        OwnedGrant::None | OwnedGrant::Vanished(_) => None,
    };
    // One replacement at a time: finish the previous one before superseding another grant.
    if let (Some(old), Some(_)) = (superseded, &owned_ref) {
        return Plan::RevokeSuperseded(old.clone());
    }
    let adoptable = candidates.iter().find(|grant| {
        desired.is_matched_by(grant)
            && owned_ref
                .as_ref()
                .is_none_or(|o| o.grant_id != grant.grant_id)
            && !owned_elsewhere(&grant.grant_id)
    });
    if let Some(grant) = adoptable {
        return Plan::Adopt {
            grant_id: grant.grant_id.clone(),
            supersede: owned_ref,
        };
    }
    Plan::Create {
        recreate: matches!(owned, OwnedGrant::Vanished(_)),
        supersede: owned_ref,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::GranteePrincipalType;

    const KEY: &str = "bb6a3d22-dc93-47ac-b5bd-88df7ad35f1e";
    const OTHER_KEY: &str = "0d0466b0-e727-4d9c-b35d-f84bb474a37f";

    fn desired() -> DesiredGrant {
        DesiredGrant {
            key_id: KEY.into(),
            name: "my_grant".into(),
            grantee_principal: "alice".into(),
            grantee_principal_type: GranteePrincipalType::User,
            operations: [Operation::DescribeKey, Operation::EncryptDatakey].into(),
            retiring_principal: None,
        }
    }

    fn grant(id: &str, operations: &[&str]) -> Grant {
        Grant {
            key_id: KEY.into(),
            grant_id: id.into(),
            grantee_principal: "alice".into(),
            grantee_principal_type: Some("user".into()),
            operations: operations.iter().map(|s| s.to_string()).collect(),
            issuing_principal: Some("operator".into()),
            created_at_millis: Some(1),
            name: Some("my_grant".into()),
            retiring_principal: None,
        }
    }

    fn gref(id: &str) -> GrantRef {
        GrantRef {
            key_id: KEY.into(),
            grant_id: id.into(),
        }
    }

    const MATCHING: &[&str] = &["encrypt-datakey", "describe-key"];
    const OLD: &[&str] = &["describe-key"];
    fn nobody(_: &str) -> bool {
        false
    }

    #[test]
    fn matching_owned_grant_needs_no_write_whatever_the_operation_order() {
        let g = grant("a", MATCHING);
        assert_eq!(
            plan(
                &desired(),
                OwnedGrant::Present(&g),
                None,
                std::slice::from_ref(&g),
                nobody
            ),
            Plan::InSync {
                grant_id: "a".into()
            }
        );
    }

    #[test]
    fn first_run_creates_when_nothing_matches() {
        let unrelated = Grant {
            name: Some("other".into()),
            ..grant("x", MATCHING)
        };
        assert_eq!(
            plan(&desired(), OwnedGrant::None, None, &[unrelated], nobody),
            Plan::Create {
                supersede: None,
                recreate: false
            }
        );
    }

    #[test]
    fn adopts_existing_grant_after_lost_status_write() {
        let g = grant("a", MATCHING);
        assert_eq!(
            plan(&desired(), OwnedGrant::None, None, &[g], nobody),
            Plan::Adopt {
                grant_id: "a".into(),
                supersede: None
            }
        );
    }

    #[test]
    fn never_adopts_a_grant_another_kmsgrant_owns() {
        let g = grant("a", MATCHING);
        let plan = plan(&desired(), OwnedGrant::None, None, &[g], |id| id == "a");
        assert_eq!(
            plan,
            Plan::Create {
                supersede: None,
                recreate: false
            }
        );
    }

    #[test]
    fn vanished_grant_is_recreated() {
        let plan = plan(
            &desired(),
            OwnedGrant::Vanished(gref("gone")),
            None,
            &[],
            nobody,
        );
        assert_eq!(
            plan,
            Plan::Create {
                supersede: None,
                recreate: true
            }
        );
    }

    #[test]
    fn spec_change_creates_the_new_grant_and_supersedes_the_old() {
        let old = grant("old", OLD);
        let plan = plan(
            &desired(),
            OwnedGrant::Present(&old),
            None,
            std::slice::from_ref(&old),
            nobody,
        );
        assert_eq!(
            plan,
            Plan::Create {
                supersede: Some(gref("old")),
                recreate: false
            }
        );
    }

    #[test]
    fn crash_between_create_and_status_write_of_a_replacement_adopts_the_new_grant() {
        let old = grant("old", OLD);
        let new = grant("new", MATCHING);
        let plan = plan(
            &desired(),
            OwnedGrant::Present(&old),
            None,
            &[old.clone(), new],
            nobody,
        );
        assert_eq!(
            plan,
            Plan::Adopt {
                grant_id: "new".into(),
                supersede: Some(gref("old"))
            }
        );
    }

    #[test]
    fn superseded_grant_is_revoked_once_the_new_one_is_in_place() {
        let new = grant("new", MATCHING);
        let plan = plan(
            &desired(),
            OwnedGrant::Present(&new),
            Some(&gref("old")),
            std::slice::from_ref(&new),
            nobody,
        );
        assert_eq!(plan, Plan::RevokeSuperseded(gref("old")));
    }

    #[test]
    fn a_second_spec_change_first_finishes_the_pending_replacement() {
        let current = grant("current", OLD);
        let plan = plan(
            &desired(),
            OwnedGrant::Present(&current),
            Some(&gref("older")),
            std::slice::from_ref(&current),
            nobody,
        );
        assert_eq!(plan, Plan::RevokeSuperseded(gref("older")));
    }

    #[test]
    fn key_change_creates_on_the_new_key_and_supersedes_the_grant_on_the_old_key() {
        let on_old_key = Grant {
            key_id: OTHER_KEY.into(),
            ..grant("old", MATCHING)
        };
        let plan = plan(
            &desired(),
            OwnedGrant::Present(&on_old_key),
            None,
            &[],
            nobody,
        );
        let supersede = GrantRef {
            key_id: OTHER_KEY.into(),
            grant_id: "old".into(),
        };
        assert_eq!(
            plan,
            Plan::Create {
                supersede: Some(supersede),
                recreate: false
            }
        );
    }

    #[test]
    fn grants_differing_in_name_grantee_type_or_retiring_principal_do_not_match() {
        let d = desired();
        assert!(d.is_matched_by(&grant("a", MATCHING)));
        assert!(!d.is_matched_by(&Grant {
            name: Some("renamed".into()),
            ..grant("a", MATCHING)
        }));
        assert!(!d.is_matched_by(&Grant {
            grantee_principal_type: Some("domain".into()),
            ..grant("a", MATCHING)
        }));
        assert!(!d.is_matched_by(&Grant {
            retiring_principal: Some("bob".into()),
            ..grant("a", MATCHING)
        }));
        assert!(!d.is_matched_by(&grant(
            "a",
            &["describe-key", "encrypt-datakey", "create-grant"]
        )));
        // A cloud that does not report the grantee type means `user`.
        assert!(d.is_matched_by(&Grant {
            grantee_principal_type: None,
            ..grant("a", MATCHING)
        }));
    }

    #[test]
    fn derived_names_satisfy_the_api_pattern() {
        let name = derived_name("4f9a1c2e-7b3d-4e5f-8a9b-0c1d2e3f4a5b");
        assert!(
            name.len() <= 255
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || ":/_-".contains(c))
        );
    }
}
