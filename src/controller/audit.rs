//! The unmanaged-grant audit: which grants on a key no KmsGrant owns.
//!
//! Computed from the lists the drift detector already makes (no KMS call of its own), by the
//! identity scheme alone ([`super::identity`], [`super::plan::Claim`]):
//! - a grant named for an identity of this cluster is managed while its object exists (looked up
//!   in the operator's cache, else asked of the API server: another shard's object, or one the
//!   cache has not seen yet); with the object gone (an `Orphan` deletion) it is unmanaged;
//! - a grant named `kmsgrant-<uid>` (older versions) is managed while an object with that UID
//!   exists;
//! - a grant imported (or being imported) by ID by an object that may own it is managed;
//! - a grant named `k8s/<another cluster>/...` is another cluster's, counted apart;
//! - everything else (unnamed, hand-made, another tool's) is unmanaged.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::reflector::ObjectRef;

use super::conditions::millis_rfc3339;
use super::identity::{self, Identity};
use super::plan::Claim;
use crate::api::{AuditedGrant, GrantOwner, KmsGrant};
use kmsgrant_kms::Grant;

/// The most grants a status lists per key (a key holds at most 100).
pub const MAX_LISTED: usize = 100;

/// What one audit of a key found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Audit {
    pub unmanaged: u32,
    pub other_cluster: u32,
    /// The grants counted, unmanaged first, then by grant ID; at most [`MAX_LISTED`].
    pub reported: Vec<AuditedGrant>,
    /// Revokes a KmsKeyPolicy attempted since the key was listed, by grant ID. A new listing
    /// makes a new audit without any: each grant is tried at most once per listing, and a lost
    /// answer is judged by the next list, never by a blind second revoke.
    pub attempts: BTreeMap<String, Attempt>,
    /// Whether the grants a `Report` policy would revoke were checked against every KmsGrant
    /// since the listing (see `policy::act_on_undeclared`).
    pub checked: bool,
}

/// What became of a revoke of an undeclared grant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attempt {
    /// Revoked, or KMS said it was already gone.
    Revoked,
    /// Refused; tried again after the next listing.
    Failed,
    /// Sent, but the answer was lost (or is still awaited): the next listing tells.
    Unconfirmed,
}

/// How one grant stands before the API server is asked about objects the cache lacks.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Verdict {
    Managed,
    Reported(GrantOwner),
    /// Named for `namespace/name` of this cluster, an object the cache does not hold.
    AskApiServer {
        namespace: String,
        name: String,
    },
}

/// The KmsGrant a grant name of this cluster points at, when it can be read back from the name
/// (a shortened name, ending in `_h` and a hash, cannot).
fn named_object(grant_name: &str, cluster: &str) -> Option<(String, String)> {
    let rest = grant_name
        .strip_prefix(identity::PREFIX)?
        .strip_prefix(cluster)?
        .strip_prefix('/')?;
    let (namespace, mapped) = rest.split_once('/')?;
    let dns = |s: &str, extra: &[char]| {
        !s.is_empty()
            && s.len() <= 253
            && s.chars().all(|c| {
                c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || extra.contains(&c)
            })
    };
    if !dns(namespace, &[]) || namespace.len() > 63 || !dns(mapped, &[':']) {
        return None;
    }
    Some((namespace.to_owned(), mapped.replace(':', ".")))
}

/// What the objects in the cache claim, indexed once per pass for every key.
pub struct Claims {
    cluster: String,
    /// The objects, as the cache held them (shared, not copied).
    objects: Vec<Arc<KmsGrant>>,
    /// Identity and legacy names of every object (as [`fingerprint`]s), to the object's place in
    /// `objects`.
    names: HashMap<u64, usize>,
    /// Grant IDs recorded in status (as [`fingerprint`]s).
    recorded: HashSet<u64>,
    /// Of those, the ones status records with the grant's name (`status.grantName`).
    recorded_named: HashSet<u64>,
    /// `spec.importGrantId` → the identities of the objects importing it.
    imports: HashMap<String, Vec<Identity>>,
}

impl Claims {
    pub fn of(cluster: &str, objects: Vec<Arc<KmsGrant>>) -> Self {
        let mut claims = Self {
            cluster: cluster.to_owned(),
            objects: Vec::new(),
            names: HashMap::new(),
            recorded: HashSet::new(),
            recorded_named: HashSet::new(),
            imports: HashMap::new(),
        };
        for (index, object) in objects.iter().enumerate() {
            let identity = Identity::new(
                cluster,
                &object.namespace().unwrap_or_default(),
                &object.name_any(),
                &object.uid().unwrap_or_default(),
            );
            if let Some(status) = object.status.as_ref()
                && let Some(id) = status.grant_id.as_deref()
            {
                claims.recorded.insert(fingerprint(id));
                if status.grant_name.is_some() {
                    claims.recorded_named.insert(fingerprint(id));
                }
            }
            claims.names.insert(fingerprint(&identity.name), index);
            claims
                .names
                .insert(fingerprint(&identity.legacy_name), index);
            if let Some(import) = &object.spec.import_grant_id {
                claims
                    .imports
                    .entry(import.clone())
                    .or_default()
                    .push(identity);
            }
        }
        claims.objects = objects;
        claims
    }

    /// The objects that hold a grant among `grants` (one key's listing) by their name that their
    /// status does not record (as the owned grant or the one being replaced): a duplicate from
    /// a lost answer, a create that landed after a crash or a spec change, a grant made by hand
    /// with the object's identity. Their reconcile removes it, whatever the key's snapshot saw
    /// before. An object whose own create is still being recorded shows here too; waking it
    /// costs a reconcile from the snapshot and no KMS call.
    pub fn unrecorded(&self, grants: &[Grant]) -> Vec<ObjectRef<KmsGrant>> {
        let mut found: Vec<usize> = grants
            .iter()
            .filter_map(|grant| {
                let index = *self.names.get(&fingerprint(grant.name.as_deref()?))?;
                let status = self.objects[index].status.as_ref();
                let recorded = status.is_some_and(|s| {
                    s.grant_id.as_deref() == Some(grant.grant_id.as_str())
                        || s.superseded_grant
                            .as_ref()
                            .is_some_and(|old| old.grant_id == grant.grant_id)
                });
                // Two names sharing a fingerprint (see there) only cost that object a reconcile,
                // which matches names exactly.
                (!recorded).then_some(index)
            })
            .collect();
        found.sort_unstable();
        found.dedup();
        found
            .into_iter()
            .map(|index| ObjectRef::from_obj(self.objects[index].as_ref()))
            .collect()
    }

    /// What one key's listing says about grant names, from the grants objects record by name
    /// (see [`identity::NamesListed`]). A fingerprint shared by chance can only make an unnamed
    /// grant look like evidence of missing names: then the key is held back — the safe side.
    pub fn names_listed(&self, grants: &[Grant]) -> Option<identity::NamesListed> {
        identity::names_listed(grants, |id| self.recorded_named.contains(&fingerprint(id)))
    }

    /// Whether some object owns the grant, as [`Claim::owns`] decides for each.
    fn owned(&self, grant: &Grant) -> bool {
        let name = grant.name.as_deref();
        name.is_some_and(|n| self.names.contains_key(&fingerprint(n)))
            || self.recorded.contains(&fingerprint(&grant.grant_id))
            || self.imports.get(&grant.grant_id).is_some_and(|identities| {
                identities.iter().any(|identity| {
                    Claim {
                        identity,
                        import: Some(&grant.grant_id),
                    }
                    .owns(grant)
                })
            })
    }
}

/// A name or grant ID reduced to 64 bits: the claims of 10,000 objects take a fraction of the
/// memory their strings would, once per drift pass. Two strings sharing one (odds about 1e-11 per
/// pass at that scale) can only make a grant look owned: then it is neither reported nor, in
/// exclusive mode, revoked — the safe side.
fn fingerprint(text: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::hash::DefaultHasher::new();
    text.hash(&mut hasher);
    hasher.finish()
}

/// Sorts the key's grants out against the objects' claims; pure.
fn judge(grants: &[Grant], claims: &Claims) -> Vec<(Grant, Verdict)> {
    let cluster = claims.cluster.as_str();
    grants
        .iter()
        .map(|grant| {
            let name = grant.name.as_deref();
            let verdict = if claims.owned(grant) {
                Verdict::Managed
            } else {
                match name.and_then(identity::cluster_of) {
                    Some(other) if other != cluster => Verdict::Reported(GrantOwner::OtherCluster),
                    Some(_) => match named_object(name.unwrap_or_default(), cluster) {
                        Some((namespace, name)) => Verdict::AskApiServer { namespace, name },
                        None => Verdict::Reported(GrantOwner::Unmanaged),
                    },
                    None => Verdict::Reported(GrantOwner::Unmanaged),
                }
            };
            (grant.clone(), verdict)
        })
        .collect()
}

/// Audits one key's listed grants. Asks the API server (metadata only) about objects grants are
/// named for that the cache does not hold; never KMS.
pub async fn audit(
    client: &kube::Client,
    grants: &[Grant],
    claims: &Claims,
) -> Result<Audit, kube::Error> {
    let mut exists: BTreeMap<(String, String), bool> = BTreeMap::new();
    let mut found = Vec::new();
    for (grant, verdict) in judge(grants, claims) {
        let owner = match verdict {
            Verdict::Managed => continue,
            Verdict::Reported(owner) => owner,
            Verdict::AskApiServer { namespace, name } => {
                let key = (namespace, name);
                let present = match exists.get(&key) {
                    Some(present) => *present,
                    None => {
                        let api: Api<KmsGrant> = Api::namespaced(client.clone(), &key.0);
                        let present = api.get_metadata_opt(&key.1).await?.is_some();
                        exists.insert(key, present);
                        present
                    }
                };
                if present {
                    continue;
                }
                GrantOwner::Unmanaged
            }
        };
        found.push(reported(&grant, owner));
    }
    Ok(summarise(found))
}

fn reported(grant: &Grant, owner: GrantOwner) -> AuditedGrant {
    let mut operations = grant.operations.to_vec();
    operations.sort();
    AuditedGrant {
        grant_id: grant.grant_id.clone(),
        grantee_principal: grant.grantee_principal.to_string(),
        operations,
        created_at: grant.created_at_millis.and_then(millis_rfc3339),
        name: grant.name.clone(),
        owner,
        action: None,
    }
}

fn summarise(mut found: Vec<AuditedGrant>) -> Audit {
    found.sort_by(|a, b| (a.owner, &a.grant_id).cmp(&(b.owner, &b.grant_id)));
    let count = |owner| found.iter().filter(|g| g.owner == owner).count() as u32;
    let (unmanaged, other_cluster) = (
        count(GrantOwner::Unmanaged),
        count(GrantOwner::OtherCluster),
    );
    found.truncate(MAX_LISTED);
    Audit {
        unmanaged,
        other_cluster,
        reported: found,
        attempts: BTreeMap::new(),
        checked: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(id: &str, name: Option<&str>) -> Grant {
        Grant {
            key_id: "k".into(),
            grant_id: id.into(),
            grantee_principal: "p".into(),
            grantee_principal_type: Some("user".into()),
            operations: vec!["encrypt-datakey".into(), "describe-key".into()].into(),
            issuing_principal: None,
            created_at_millis: Some(1_700_000_000_000),
            name: name.map(str::to_owned),
            retiring_principal: None,
        }
    }

    fn object(namespace: &str, name: &str, uid: &str, import: Option<&str>) -> Arc<KmsGrant> {
        let mut spec = serde_json::json!({"keyId": "bb6a3d22-dc93-47ac-b5bd-88df7ad35f1e",
            "granteePrincipal": "p", "operations": ["describe-key"]});
        if let Some(import) = import {
            spec["importGrantId"] = import.into();
        }
        Arc::new(
            serde_json::from_value(serde_json::json!({
                "apiVersion": "kmsgrant.io/v1beta1", "kind": "KmsGrant",
                "metadata": {"name": name, "namespace": namespace, "uid": uid},
                "spec": spec
            }))
            .unwrap(),
        )
    }

    fn verdicts(grants: &[Grant], objects: &[Arc<KmsGrant>]) -> Vec<(String, Verdict)> {
        judge(grants, &Claims::of("c1", objects.to_vec()))
            .into_iter()
            .map(|(g, v)| (g.grant_id, v))
            .collect()
    }

    #[test]
    fn own_identities_legacy_names_and_imports_are_managed() {
        let objects = [
            object("team-a", "app.x", "uid-1", None),
            object("team-a", "imp", "uid-2", Some("hand")),
        ];
        let grants = [
            grant("own", Some("k8s/c1/team-a/app:x")),
            grant("legacy", Some("kmsgrant-uid-1")),
            grant("hand", Some("terraform-1")),
        ];
        for (id, verdict) in verdicts(&grants, &objects) {
            assert_eq!(verdict, Verdict::Managed, "{id}");
        }
    }

    #[test]
    fn hand_made_other_cluster_and_unknown_objects_are_told_apart() {
        let objects = [object("team-a", "app", "uid-1", Some("stolen"))];
        let grants = [
            grant("unnamed", None),
            grant("hand", Some("decrypt-for-everyone")),
            grant("other", Some("k8s/c2/team-a/app")),
            grant("gone", Some("k8s/c1/team-b/old:name")),
            grant("shortened", Some("k8s/c1/team-b/xxx_h0123")),
            grant("bad-namespace", Some("k8s/c1/Team/app")),
            grant("legacy-gone", Some("kmsgrant-uid-9")),
            // Another object's identity cannot be imported, so it is not this object's.
            grant("stolen", Some("k8s/c1/team-b/victim")),
        ];
        let unmanaged = Verdict::Reported(GrantOwner::Unmanaged);
        assert_eq!(
            verdicts(&grants, &objects),
            vec![
                ("unnamed".into(), unmanaged.clone()),
                ("hand".into(), unmanaged.clone()),
                ("other".into(), Verdict::Reported(GrantOwner::OtherCluster)),
                (
                    "gone".into(),
                    Verdict::AskApiServer {
                        namespace: "team-b".into(),
                        name: "old.name".into()
                    }
                ),
                ("shortened".into(), unmanaged.clone()),
                ("bad-namespace".into(), unmanaged.clone()),
                ("legacy-gone".into(), unmanaged),
                (
                    "stolen".into(),
                    Verdict::AskApiServer {
                        namespace: "team-b".into(),
                        name: "victim".into()
                    }
                ),
            ]
        );
    }

    fn with_status(object: Arc<KmsGrant>, status: serde_json::Value) -> Arc<KmsGrant> {
        let mut object = KmsGrant::clone(&object);
        object.status = Some(serde_json::from_value(status).unwrap());
        Arc::new(object)
    }

    #[test]
    fn only_grants_status_records_by_name_tell_whether_names_are_returned() {
        let claims = Claims::of(
            "c1",
            vec![
                with_status(
                    object("team-a", "x", "uid-1", None),
                    serde_json::json!({"grantId": "x-1", "grantName": "k8s/c1/team-a/x"}),
                ),
                // An imported grant made without a name: recorded, but not by name.
                with_status(
                    object("team-a", "imp", "uid-2", Some("hand")),
                    serde_json::json!({"grantId": "hand"}),
                ),
            ],
        );
        let hand_made = [grant("hand", None), grant("other", None)];
        assert_eq!(claims.names_listed(&hand_made), None);
        let named = [grant("x-1", Some("k8s/c1/team-a/x")), grant("hand", None)];
        assert_eq!(
            claims.names_listed(&named),
            Some(identity::NamesListed::Returned)
        );
        let stripped = [grant("x-1", None), grant("hand", None)];
        assert_eq!(
            claims.names_listed(&stripped),
            Some(identity::NamesListed::Missing {
                grant_id: "x-1".into()
            })
        );
    }

    #[test]
    fn objects_holding_a_grant_their_status_does_not_record_are_found() {
        let objects = [
            with_status(
                object("team-a", "x", "uid-1", None),
                serde_json::json!({"grantId": "x-1", "supersededGrant": {"keyId": "k0", "grantId": "x-0"}}),
            ),
            // Never recorded a grant (its create's answer was lost).
            object("team-a", "y", "uid-2", None),
            with_status(
                object("team-a", "z", "uid-3", None),
                serde_json::json!({"grantId": "z-1"}),
            ),
        ];
        let claims = Claims::of("c1", objects.to_vec());
        let grants = [
            grant("x-1", Some("k8s/c1/team-a/x")),
            grant("x-0", Some("k8s/c1/team-a/x")),
            // A duplicate of x, and a grant y holds without knowing.
            grant("x-2", Some("k8s/c1/team-a/x")),
            grant("y-1", Some("k8s/c1/team-a/y")),
            grant("z-1", Some("k8s/c1/team-a/z")),
            // Neither this cluster's objects nor names of them.
            grant("other", Some("k8s/c2/team-a/z")),
            grant("gone", Some("k8s/c1/team-a/gone")),
            grant("unnamed", None),
        ];
        let found: Vec<String> = claims
            .unrecorded(&grants)
            .into_iter()
            .map(|o| o.name)
            .collect();
        assert_eq!(found, ["x", "y"]);
        // A legacy name counts as the object's too.
        let legacy = [grant("legacy", Some("kmsgrant-uid-3"))];
        let found: Vec<String> = claims
            .unrecorded(&legacy)
            .into_iter()
            .map(|o| o.name)
            .collect();
        assert_eq!(found, ["z"]);
    }

    #[test]
    fn a_cluster_name_that_is_a_prefix_of_another_is_not_mistaken_for_it() {
        let grants = [grant("g", Some("k8s/c10/team-a/app"))];
        assert_eq!(
            verdicts(&grants, &[]),
            vec![("g".into(), Verdict::Reported(GrantOwner::OtherCluster))]
        );
    }

    #[test]
    fn the_report_lists_unmanaged_first_and_at_most_100() {
        let mut found: Vec<AuditedGrant> = (0..120)
            .map(|i| reported(&grant(&format!("{i:03}"), None), GrantOwner::OtherCluster))
            .collect();
        found.push(reported(&grant("zzz", None), GrantOwner::Unmanaged));
        let audit = summarise(found);
        assert_eq!((audit.unmanaged, audit.other_cluster), (1, 120));
        assert_eq!(audit.reported.len(), MAX_LISTED);
        assert_eq!(audit.reported[0].grant_id, "zzz");
        assert_eq!(
            audit.reported[0].operations,
            ["describe-key", "encrypt-datakey"]
        );
        assert_eq!(
            audit.reported[0].created_at.as_deref(),
            Some("2023-11-14T22:13:20Z")
        );
    }
}
