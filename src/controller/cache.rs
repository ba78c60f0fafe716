//! What we know of each key: its description and a snapshot of its grants, shared by every
//! object on the key.
//!
//! One paged `list-grants` walk per key per freshness window, single-flighted (concurrent
//! reconciles wait for the walk in progress instead of starting their own), and updated in place
//! by our own creates and revokes instead of being thrown away.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::identity::NamesListed;
use kmsgrant_kms::{Grant, KeyInfo, KeyState, KmsClient, KmsError};

/// A key on one cloud account (endpoint + project), and the provider config that reaches it.
/// Two configs that reach the same account share the entry: equality, hashing and order look at
/// the account and the key only, never at a config's name.
#[derive(Clone, Debug)]
pub struct KeyRef {
    pub provider: String,
    pub account: String,
    pub key_id: String,
}

impl PartialEq for KeyRef {
    fn eq(&self, other: &Self) -> bool {
        (&self.account, &self.key_id) == (&other.account, &other.key_id)
    }
}

impl Eq for KeyRef {}

impl std::hash::Hash for KeyRef {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        (&self.account, &self.key_id).hash(state);
    }
}

impl PartialOrd for KeyRef {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for KeyRef {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (&self.account, &self.key_id).cmp(&(&other.account, &other.key_id))
    }
}

#[derive(Default)]
pub struct KeyCache {
    entries: Mutex<HashMap<KeyRef, Arc<KeyEntry>>>,
    /// Per key, the objects (namespace, name) that the last drift pass found holding a grant
    /// there by their name that their status does not record (see `audit::Claims::unrecorded`):
    /// their reconciles look at the key too, so that a grant on a key the object no longer
    /// names is removed. Usually empty.
    unrecorded: Mutex<HashMap<KeyRef, Vec<(String, String)>>>,
    /// Keys whose last evidence said the account lists grants without their names, with the
    /// grant that showed it (see [`NamesListed`]): nothing is adopted or revoked by name there.
    names_missing: Mutex<HashMap<KeyRef, String>>,
}

#[derive(Default)]
struct KeyEntry {
    grants: tokio::sync::Mutex<Option<Snapshot>>,
    /// The last description and when it was fetched; held across `describe-key`, so concurrent
    /// readers wait for the call in flight instead of making their own.
    info: tokio::sync::Mutex<Option<(KeyInfo, Instant)>>,
}

struct Snapshot {
    /// Shared with every reader: a reconcile takes a reference, not a copy of the key's grants.
    grants: Arc<Vec<Grant>>,
    /// When the walk that produced it started, and when it ended.
    started: Instant,
    fetched: Instant,
    stale: bool,
    /// The objects (by UID) already being deleted when the last walk made for a cleanup
    /// started, and when that was. Their cleanup asked for a fresh list before that walk, so the
    /// snapshot (kept current by our own writes since, never served stale) is one for them: the
    /// objects being deleted on a key share a list instead of walking it once each.
    deleting: Arc<HashSet<String>>,
    deleting_at: Option<Instant>,
    /// The objects (by UID) whose cleanup came since the last walk made for one, was not
    /// counted by it, and was told to wait for the next (see [`KeyCache::grants_for_cleanup`]),
    /// and since when the first of them waits.
    waiting: HashSet<String>,
    waiting_since: Option<Instant>,
    /// A reader's walk found the key other than we knew it (a grant revoked or made out of
    /// band): the drift pass, whose own list would then look unchanged, still wakes the key's
    /// objects.
    unseen_change: bool,
    /// Grants this process knew of that a later walk did not list: gone (revoked or retired out
    /// of band, or by another process). The snapshot is believed about their absence without
    /// another walk (see [`KeyCache::vanished`]).
    vanished: Arc<HashSet<String>>,
}

/// At most this many vanished grants are remembered per key; beyond, the set starts again (a
/// reader then lists afresh, as it would without it).
const VANISHED_KEPT: usize = 10_000;

/// How long the objects found deleting by a cleanup's walk are remembered (later walks, which
/// do not look, carry them over): the objects of one mass deletion, not of every deletion since
/// the process started. One still being deleted later just walks the key again.
const DELETING_KEPT: Duration = Duration::from_secs(600);

/// At most one walk of a key per this interval for cleanups: deletions that trickle in (one
/// `kubectl delete` after another) share a walk instead of each finding the last one started
/// just before it was deleted.
const CLEANUP_GATHER: Duration = Duration::from_secs(1);
/// A mass deletion's walk waits until every object being deleted on the key has come and
/// removed the grants known for it (their cleanups go at the pace KMS takes revokes): one walk
/// per key, not one per second of arrivals. An object that never comes (its cleanup blocked
/// elsewhere) holds the others at most this long.
const CLEANUP_WAIT_MAX: Duration = Duration::from_secs(30);

/// The grants a cleanup goes on with (see [`KeyCache::grants_for_cleanup`]).
#[derive(Debug)]
pub enum ForCleanup {
    /// From a walk that counts for the object: every grant it may have on the key is here.
    /// `wake`: the objects (UIDs) that were told to wait for this walk, to be woken now.
    Fresh {
        grants: Arc<Vec<Grant>>,
        wake: Vec<String>,
    },
    /// Deletions on the key are still coming in: the grants as known (listed before the object
    /// was deleted, kept current by our own writes since), to remove now; then a walk that
    /// counts for the object, which wakes it, or at the latest after `retry`.
    Known {
        grants: Arc<Vec<Grant>>,
        retry: Duration,
    },
}

impl Snapshot {
    /// A new walk's snapshot. Made for a cleanup it names the objects deleting now; otherwise it
    /// started after the previous walk, so whatever was deleting then still counts.
    fn after(
        previous: Option<&Snapshot>,
        grants: Arc<Vec<Grant>>,
        started: Instant,
        deleting: Option<HashSet<String>>,
    ) -> Self {
        let made_for_cleanup = deleting.is_some();
        let (deleting, deleting_at) = match (deleting, previous) {
            (Some(now), _) => (Arc::new(now), Some(started)),
            (None, Some(previous))
                if previous
                    .deleting_at
                    .is_some_and(|at| at.elapsed() < DELETING_KEPT) =>
            {
                (Arc::clone(&previous.deleting), previous.deleting_at)
            }
            (None, _) => (Arc::default(), None),
        };
        let unseen_change =
            previous.is_some_and(|p| p.unseen_change || differs(&p.grants, &grants));
        let vanished = previous.map_or_else(Arc::default, |p| vanished_after(p, &grants));
        // A walk made for cleanups counts for those waiting; a reader's does not.
        let (waiting, waiting_since) = match previous {
            Some(previous) if !made_for_cleanup => {
                (previous.waiting.clone(), previous.waiting_since)
            }
            _ => (HashSet::new(), None),
        };
        Snapshot {
            grants,
            started,
            fetched: Instant::now(),
            stale: false,
            deleting,
            deleting_at,
            waiting,
            waiting_since,
            unseen_change,
            vanished,
        }
    }
}

/// What `previous` knew of (or knew had vanished) that `listed` lacks.
fn vanished_after(previous: &Snapshot, listed: &[Grant]) -> Arc<HashSet<String>> {
    let listed: HashSet<&str> = listed.iter().map(|g| g.grant_id.as_str()).collect();
    let mut vanished: HashSet<String> = previous
        .vanished
        .iter()
        .map(String::as_str)
        .chain(previous.grants.iter().map(|g| g.grant_id.as_str()))
        .filter(|id| !listed.contains(id))
        .map(str::to_owned)
        .collect();
    if vanished.len() > VANISHED_KEPT {
        vanished.clear();
    }
    if vanished.is_empty() && previous.vanished.is_empty() {
        return Arc::clone(&previous.vanished);
    }
    Arc::new(vanished)
}

impl KeyCache {
    fn entry(&self, key: &KeyRef) -> Arc<KeyEntry> {
        self.entries
            .lock()
            .expect("cache lock")
            .entry(key.clone())
            .or_default()
            .clone()
    }

    /// The key's grants, listed at most once per `max_age` whoever asks (`Duration::ZERO`: a
    /// walk that starts after this call). The flag says whether they come from such a walk: by
    /// this call, or by another reader's that started after this one asked (concurrent readers
    /// needing a fresh list share one walk).
    pub async fn grants(
        &self,
        client: &KmsClient,
        key: &KeyRef,
        max_age: Duration,
        page_size: u32,
        metrics: &crate::metrics::Metrics,
    ) -> Result<(Arc<Vec<Grant>>, bool), KmsError> {
        let entry = self.entry(key);
        let asked = Instant::now();
        let mut snapshot = entry.grants.lock().await;
        if let Some(current) = snapshot.as_ref().filter(|s| !s.stale) {
            if started_after(current, asked) {
                metrics.cache_lookup(true);
                return Ok((Arc::clone(&current.grants), true));
            }
            if current.fetched.elapsed() < max_age {
                metrics.cache_lookup(true);
                return Ok((Arc::clone(&current.grants), false));
            }
        }
        metrics.cache_lookup(false);
        let grants = walk(&mut snapshot, client, key, page_size, None).await?;
        Ok((grants, true))
    }

    /// The key's grants for the cleanup of object `uid`, which is being deleted. Fresh: from a
    /// walk that started after this call, or one that started when the object was already being
    /// deleted (its cleanup had asked by then), kept current by our own writes since. `deleting`
    /// names the objects being deleted now (on this key); it is read before a walk starts, so
    /// that walk counts for every one of them.
    ///
    /// A walk made for cleanups waits for every object being deleted on the key to have come
    /// (at most [`CLEANUP_WAIT_MAX`]) and starts at most once per [`CLEANUP_GATHER`]: a cleanup
    /// that comes before is told the grants as known, to remove meanwhile, and is woken by the
    /// walk (the caller wakes the UIDs a fresh answer names).
    pub async fn grants_for_cleanup(
        &self,
        client: &KmsClient,
        key: &KeyRef,
        uid: &str,
        deleting: impl FnOnce() -> HashSet<String>,
        page_size: u32,
        metrics: &crate::metrics::Metrics,
    ) -> Result<ForCleanup, KmsError> {
        let entry = self.entry(key);
        let asked = Instant::now();
        let mut snapshot = entry.grants.lock().await;
        let mut deleting = Some(deleting);
        let mut read_deleting = || deleting.take().map(|read| read()).unwrap_or_default();
        let mut deleting_now = None;
        if let Some(current) = snapshot.as_mut().filter(|s| !s.stale) {
            if started_after(current, asked) || current.deleting.contains(uid) {
                metrics.cache_lookup(true);
                return Ok(ForCleanup::Fresh {
                    grants: Arc::clone(&current.grants),
                    wake: Vec::new(),
                });
            }
            current.waiting.insert(uid.to_owned());
            let since = *current.waiting_since.get_or_insert(asked);
            let now = Instant::now();
            let patience = (since + CLEANUP_WAIT_MAX).checked_duration_since(now);
            if let Some(patience) = patience.filter(|left| !left.is_zero()) {
                let found = read_deleting();
                let others_coming = found
                    .iter()
                    .any(|u| !current.waiting.contains(u) && !current.deleting.contains(u));
                let gathering = current
                    .deleting_at
                    .and_then(|at| (at + CLEANUP_GATHER).checked_duration_since(now))
                    .filter(|left| !left.is_zero());
                let retry = if others_coming {
                    Some(patience)
                } else {
                    gathering
                };
                if let Some(retry) = retry {
                    metrics.cache_lookup(true);
                    return Ok(ForCleanup::Known {
                        grants: Arc::clone(&current.grants),
                        retry,
                    });
                }
                deleting_now = Some(found);
            }
        }
        metrics.cache_lookup(false);
        let mut counted = deleting_now.unwrap_or_else(read_deleting);
        let waiting = snapshot
            .as_mut()
            .map(|s| (std::mem::take(&mut s.waiting), s.waiting_since.take()));
        if let Some((waited, _)) = &waiting {
            counted.extend(waited.iter().cloned());
        }
        counted.insert(uid.to_owned());
        match walk(&mut snapshot, client, key, page_size, Some(counted)).await {
            Ok(grants) => {
                let wake = waiting
                    .map(|(waited, _)| waited.into_iter().filter(|u| u != uid).collect())
                    .unwrap_or_default();
                Ok(ForCleanup::Fresh { grants, wake })
            }
            Err(err) => {
                // Still waiting, for the walk the next of them makes.
                if let (Some(current), Some((waited, since))) = (snapshot.as_mut(), waiting) {
                    current.waiting = waited;
                    current.waiting_since = since;
                }
                Err(err)
            }
        }
    }

    /// Lists the key now; true when anything differs from the previous snapshot, and the grants
    /// listed (the audit reads them: no second walk).
    pub async fn refresh(
        &self,
        client: &KmsClient,
        key: &KeyRef,
        page_size: u32,
    ) -> Result<(bool, Vec<Grant>), KmsError> {
        let entry = self.entry(key);
        let mut snapshot = entry.grants.lock().await;
        let started = Instant::now();
        let mut grants = client.list_all_grants(&key.key_id, page_size).await?;
        grants.sort_by(|a, b| a.grant_id.cmp(&b.grant_id));
        let changed = snapshot
            .as_ref()
            .is_none_or(|previous| previous.unseen_change || differs(&previous.grants, &grants));
        let mut next = Snapshot::after(snapshot.as_ref(), Arc::new(grants.clone()), started, None);
        // Told now: the caller wakes the key's objects.
        next.unseen_change = false;
        *snapshot = Some(next);
        Ok((changed, grants))
    }

    /// Whether every one of `grant_ids` was seen to vanish from the key: known to this process,
    /// then not listed by a later walk. A snapshot that lacks them can be believed.
    pub async fn vanished(&self, key: &KeyRef, grant_ids: &[&str]) -> bool {
        let Some(entry) = self.entries.lock().expect("cache lock").get(key).cloned() else {
            return false;
        };
        let snapshot = entry.grants.lock().await;
        snapshot
            .as_ref()
            .filter(|s| !s.stale)
            .is_some_and(|s| grant_ids.iter().all(|id| s.vanished.contains(*id)))
    }

    /// The grants as last listed (and updated by our own writes), without listing: `None` when
    /// the key was never listed.
    pub async fn snapshot(&self, key: &KeyRef) -> Option<Vec<Grant>> {
        let entry = self.entries.lock().expect("cache lock").get(key).cloned()?;
        let snapshot = entry.grants.lock().await;
        snapshot.as_ref().map(|s| s.grants.as_ref().clone())
    }

    /// Records a grant we created, so the next reader sees it without listing.
    pub async fn insert(&self, key: &KeyRef, grant: Grant) {
        let entry = self.entry(key);
        if let Some(snapshot) = entry.grants.lock().await.as_mut() {
            let grants = Arc::make_mut(&mut snapshot.grants);
            grants.retain(|g| g.grant_id != grant.grant_id);
            grants.push(grant);
        }
    }

    /// Records a grant we revoked or retired.
    pub async fn remove(&self, key: &KeyRef, grant_id: &str) {
        let entry = self.entry(key);
        if let Some(snapshot) = entry.grants.lock().await.as_mut() {
            Arc::make_mut(&mut snapshot.grants).retain(|g| g.grant_id != grant_id);
        }
    }

    /// After a write with an unknown outcome: the next reader, whoever it is, lists again before
    /// anything else is written on the key.
    pub async fn invalidate(&self, key: &KeyRef) {
        let entry = self.entry(key);
        if let Some(snapshot) = entry.grants.lock().await.as_mut() {
            snapshot.stale = true;
        }
    }

    /// Forgets every key of a provider (its endpoint or credentials changed).
    pub fn forget_provider(&self, provider: &str) {
        self.entries
            .lock()
            .expect("cache lock")
            .retain(|key, _| key.provider != provider);
        self.unrecorded
            .lock()
            .expect("cache lock")
            .retain(|key, _| key.provider != provider);
    }

    /// What a listing of `key` found: the objects holding a grant there that their status does
    /// not record (replacing what an earlier listing found).
    pub fn found_unrecorded(&self, key: &KeyRef, objects: Vec<(String, String)>) {
        let mut unrecorded = self.unrecorded.lock().expect("cache lock");
        if objects.is_empty() {
            unrecorded.remove(key);
        } else {
            unrecorded.insert(key.clone(), objects);
        }
    }

    /// Records what a listing of `key` said about grant names; true when that changes what is
    /// known of the key.
    pub fn names_listed(&self, key: &KeyRef, evidence: &NamesListed) -> bool {
        let mut missing = self.names_missing.lock().expect("cache lock");
        match evidence {
            NamesListed::Returned => missing.remove(key).is_some(),
            NamesListed::Missing { grant_id } => {
                missing.insert(key.clone(), grant_id.clone()).is_none()
            }
        }
    }

    /// The grant that last showed the account listing grants on `key` without their names.
    pub fn names_missing(&self, key: &KeyRef) -> Option<String> {
        self.names_missing
            .lock()
            .expect("cache lock")
            .get(key)
            .cloned()
    }

    /// The keys on which the last listing found a grant of object `namespace/name` that its
    /// status does not record.
    pub fn unrecorded_of(&self, namespace: &str, name: &str) -> Vec<KeyRef> {
        self.unrecorded
            .lock()
            .expect("cache lock")
            .iter()
            .filter(|(_, objects)| objects.iter().any(|(ns, n)| ns == namespace && n == name))
            .map(|(key, _)| key.clone())
            .collect()
    }

    /// Of `key_ids` on the account `like` names, those this process has never listed.
    pub async fn never_listed(
        &self,
        like: &KeyRef,
        key_ids: impl IntoIterator<Item = String>,
    ) -> Vec<KeyRef> {
        let mut found = Vec::new();
        for key_id in key_ids {
            let key = KeyRef {
                key_id,
                ..like.clone()
            };
            let entry = self.entries.lock().expect("cache lock").get(&key).cloned();
            let listed = match entry {
                Some(entry) => entry.grants.lock().await.is_some(),
                None => false,
            };
            if !listed {
                found.push(key);
            }
        }
        found
    }

    /// For a cleanup: the keys whose snapshot holds a grant named one of `names`, or may hold
    /// one that it does not show (a write of unknown outcome made it stale). Read from memory,
    /// no KMS call: a grant of the object on a key it no longer names (a create whose answer
    /// was lost, then a spec change) is found before the object goes.
    pub async fn keys_naming(&self, names: &[&str]) -> Vec<KeyRef> {
        let entries: Vec<(KeyRef, Arc<KeyEntry>)> = self
            .entries
            .lock()
            .expect("cache lock")
            .iter()
            .map(|(key, entry)| (key.clone(), Arc::clone(entry)))
            .collect();
        let mut found = Vec::new();
        for (key, entry) in entries {
            let snapshot = entry.grants.lock().await;
            let Some(snapshot) = snapshot.as_ref() else {
                continue;
            };
            if snapshot.stale
                || snapshot
                    .grants
                    .iter()
                    .any(|g| g.name.as_deref().is_some_and(|n| names.contains(&n)))
            {
                found.push(key);
            }
        }
        found
    }

    /// Describes the key when its description is due (as [`Self::key_info`] would); true when
    /// its state differs from the one described before.
    pub async fn key_state_changed(
        &self,
        client: &KmsClient,
        key: &KeyRef,
        max_age: Duration,
    ) -> Result<bool, KmsError> {
        let entry = self.entry(key);
        let mut cached = entry.info.lock().await;
        let before = match cached.as_ref() {
            Some((info, at)) if info.state == KeyState::Enabled && at.elapsed() < max_age => {
                return Ok(false);
            }
            Some((info, _)) => Some(info.state.clone()),
            None => None,
        };
        let info = client.describe_key(&key.key_id).await?;
        let changed = before.is_some_and(|state| state != info.state);
        *cached = Some((info, Instant::now()));
        Ok(changed)
    }

    /// The key's description, from `describe-key` at most once per `max_age`. Only an enabled key
    /// is remembered: a disabled one may be re-enabled at any moment.
    pub async fn key_info(
        &self,
        client: &KmsClient,
        key: &KeyRef,
        max_age: Duration,
    ) -> Result<KeyInfo, KmsError> {
        let entry = self.entry(key);
        let asked = Instant::now();
        let mut cached = entry.info.lock().await;
        if let Some((info, at)) = cached.as_ref()
            // Fetched while we waited (single-flight), or an enabled key still fresh.
            && (*at >= asked || (info.state == KeyState::Enabled && at.elapsed() < max_age))
        {
            return Ok(info.clone());
        }
        let info = client.describe_key(&key.key_id).await?;
        // A disabled key is only shared with those already waiting: it may be re-enabled at any
        // moment.
        *cached = Some((info.clone(), Instant::now()));
        Ok(info)
    }
}

/// What `describe-key` by alias answered (see [`KeyCache::alias_info`]).
#[derive(Clone, Debug)]
pub struct AliasInfo {
    /// The key the alias names, as described.
    pub info: KeyInfo,
    /// When described: what the alias named before, if it was known.
    pub before: Option<KeyInfo>,
    /// When described: the named key's remembered state differed from the one just described.
    pub key_state_changed: bool,
}

impl KeyCache {
    /// `describe-key` by alias: `alias.key_id` is `alias/<name>`, which describe-key takes in
    /// place of an ID. Like [`Self::key_info`], at most once per `max_age` (single-flighted, only
    /// an enabled key remembered). The answer describes the key the alias names as well, so it is
    /// recorded for that key too: one call serves the alias and its key within the window. An
    /// alias KMS does not know is forgotten.
    pub async fn alias_info(
        &self,
        client: &KmsClient,
        alias: &KeyRef,
        max_age: Duration,
    ) -> Result<AliasInfo, KmsError> {
        let entry = self.entry(alias);
        let asked = Instant::now();
        let mut cached = entry.info.lock().await;
        if let Some((info, at)) = cached.as_ref()
            && (*at >= asked || (info.state == KeyState::Enabled && at.elapsed() < max_age))
        {
            return Ok(AliasInfo {
                info: info.clone(),
                before: None,
                key_state_changed: false,
            });
        }
        let before = cached.as_ref().map(|(info, _)| info.clone());
        let info = match client.describe_key(&alias.key_id).await {
            Ok(info) => info,
            Err(err) => {
                if err.reason == kmsgrant_kms::ErrorReason::KeyNotFound {
                    *cached = None;
                }
                return Err(err);
            }
        };
        let at = Instant::now();
        *cached = Some((info.clone(), at));
        drop(cached);
        let key = KeyRef {
            key_id: info.key_id.clone(),
            ..alias.clone()
        };
        let key_entry = self.entry(&key);
        let mut key_cached = key_entry.info.lock().await;
        let key_state_changed = key_cached
            .as_ref()
            .is_some_and(|(known, _)| known.state != info.state);
        if key_cached
            .as_ref()
            .is_none_or(|(_, known_at)| *known_at < at)
        {
            *key_cached = Some((info.clone(), at));
        }
        Ok(AliasInfo {
            info,
            before,
            key_state_changed,
        })
    }
}

/// The UIDs of the cached objects being deleted now that may have a grant on `key_id` (their
/// key, the one status records, or a superseded grant's): what a cleanup's walk of the key
/// counts for.
pub(super) fn deleting_on(
    grants: &kube::runtime::reflector::Store<crate::api::KmsGrant>,
    key_id: &str,
) -> HashSet<String> {
    grants
        .state()
        .iter()
        .filter(|g| g.metadata.deletion_timestamp.is_some())
        .filter(|g| {
            g.spec.key_id.as_deref() == Some(key_id)
                || g.status.as_ref().is_some_and(|s| {
                    s.key_id.as_deref() == Some(key_id)
                        || s.superseded_grant
                            .as_ref()
                            .is_some_and(|r| r.key_id == key_id)
                })
        })
        .filter_map(|g| g.metadata.uid.clone())
        .collect()
}

/// One paged `list-grants` walk of the key, stored as its snapshot (held locked by the caller,
/// so concurrent readers wait for it). A failed walk marks what was held stale: it may be wrong
/// now (a key gone, an account changed).
async fn walk(
    snapshot: &mut Option<Snapshot>,
    client: &KmsClient,
    key: &KeyRef,
    page_size: u32,
    deleting: Option<HashSet<String>>,
) -> Result<Arc<Vec<Grant>>, KmsError> {
    let started = Instant::now();
    let grants = match client.list_all_grants(&key.key_id, page_size).await {
        Ok(grants) => Arc::new(grants),
        Err(err) => {
            if let Some(current) = snapshot.as_mut() {
                current.stale = true;
            }
            return Err(err);
        }
    };
    *snapshot = Some(Snapshot::after(
        snapshot.as_ref(),
        Arc::clone(&grants),
        started,
        deleting,
    ));
    Ok(grants)
}

/// Whether a listing differs from what was known of the key (see [`agrees`]).
fn differs(known: &[Grant], listed: &[Grant]) -> bool {
    if known.len() != listed.len() {
        return true;
    }
    let mut before: Vec<&Grant> = known.iter().collect();
    before.sort_by(|a, b| a.grant_id.cmp(&b.grant_id));
    let mut after: Vec<&Grant> = listed.iter().collect();
    after.sort_by(|a, b| a.grant_id.cmp(&b.grant_id));
    before
        .iter()
        .zip(&after)
        .any(|(known, listed)| !agrees(known, listed))
}

/// A walk that started after `asked` saw everything written before it.
fn started_after(snapshot: &Snapshot, asked: Instant) -> bool {
    snapshot.started >= asked
}

/// Whether what we knew of a grant still holds for the listed one. A grant we created is known
/// from the create answer (its ID) and our request: the cloud's own fields (issuing principal,
/// creation date) arrive with the first listing and are no change; neither is another order of
/// the operations or an unreported grantee type.
fn agrees(known: &Grant, listed: &Grant) -> bool {
    known.grant_id == listed.grant_id
        && known.key_id == listed.key_id
        && known.grantee_principal == listed.grantee_principal
        && known.grantee_type() == listed.grantee_type()
        && known.operation_set() == listed.operation_set()
        && known.name == listed.name
        && known.retiring_principal == listed.retiring_principal
        && learned(&known.issuing_principal, &listed.issuing_principal)
        && learned(&known.created_at_millis, &listed.created_at_millis)
}

/// Known and the same, or not known yet.
fn learned<T: PartialEq>(known: &Option<T>, listed: &Option<T>) -> bool {
    known.is_none() || known == listed
}

#[cfg(test)]
mod tests {
    use super::*;
    use kms_emulator::{Emulator, EmulatorConfig, FaultSettings, NewKey, RunningEmulator};

    /// An emulator holding one key (aliased `alias`), a client of it, and the key as the cache
    /// names it.
    async fn emulator_with_key(alias: &str) -> (RunningEmulator, KmsClient, KeyRef) {
        let emulator = Emulator::start(EmulatorConfig::for_tests()).await.unwrap();
        let key_id = emulator
            .admin()
            .create_key(NewKey {
                key_alias: alias.into(),
                ..NewKey::default()
            })
            .unwrap()
            .key_id;
        let client = super::super::test_support::emulator_client(&emulator);
        let key = KeyRef {
            provider: "p".into(),
            account: "emulator".into(),
            key_id,
        };
        (emulator, client, key)
    }

    /// A grant named `name` made on `key` by hand (not by an object); its ID.
    async fn grant_by_hand(client: &KmsClient, key: &KeyRef, name: &str) -> String {
        client
            .create_grant(&kmsgrant_kms::NewGrant {
                key_id: key.key_id.clone(),
                grantee_principal: "13gg44z4g2sglzk0egw0u726zoyzvrs8".into(),
                grantee_principal_type: crate::api::GranteePrincipalType::User,
                operations: vec![crate::api::Operation::DescribeKey],
                name: Some(name.into()),
                retiring_principal: None,
            })
            .await
            .unwrap()
    }

    #[test]
    fn a_created_grant_agrees_with_its_first_listing() {
        let created = Grant {
            key_id: "k".into(),
            grant_id: "g".into(),
            grantee_principal: "p".into(),
            grantee_principal_type: Some("user".into()),
            operations: vec!["describe-key".into(), "encrypt-datakey".into()].into(),
            issuing_principal: None,
            created_at_millis: None,
            name: Some("n".into()),
            retiring_principal: None,
        };
        let listed = Grant {
            grantee_principal_type: None,
            operations: vec!["encrypt-datakey".into(), "describe-key".into()].into(),
            issuing_principal: Some("i".into()),
            created_at_millis: Some(1_497_341_531_000),
            ..created.clone()
        };
        assert!(agrees(&created, &listed));
        assert!(agrees(&listed, &listed.clone()));
        let later = Grant {
            created_at_millis: Some(1_497_341_532_000),
            ..listed.clone()
        };
        assert!(!agrees(&listed, &later));
        let narrower = Grant {
            operations: vec!["describe-key".into()].into(),
            ..listed.clone()
        };
        assert!(!agrees(&listed, &narrower));
    }

    /// A grant revoked out of band and first seen by a reader's walk (which replaces the
    /// snapshot) is still a change for the drift pass, once: the key's objects are woken.
    #[tokio::test]
    async fn a_change_a_reader_saw_first_is_still_news_for_the_drift_pass() {
        let (_emulator, client, key) = emulator_with_key("drift").await;
        let (cache, metrics) = (KeyCache::default(), crate::metrics::Metrics::default());
        let grant_id = grant_by_hand(&client, &key, "by-hand").await;
        let (changed, _) = cache.refresh(&client, &key, 100).await.unwrap();
        assert!(changed, "the first listing is news");
        let (changed, _) = cache.refresh(&client, &key, 100).await.unwrap();
        assert!(!changed);
        // Out of band, then a reader lists first.
        client.revoke_grant(&key.key_id, &grant_id).await.unwrap();
        let (listed, _) = cache
            .grants(&client, &key, Duration::ZERO, 100, &metrics)
            .await
            .unwrap();
        assert!(listed.is_empty());
        let (changed, _) = cache.refresh(&client, &key, 100).await.unwrap();
        assert!(changed, "the drift pass must still wake the key's objects");
        let (changed, _) = cache.refresh(&client, &key, 100).await.unwrap();
        assert!(!changed, "told once");
        // Our own writes are no news.
        cache
            .grants(&client, &key, Duration::ZERO, 100, &metrics)
            .await
            .unwrap();
        let (changed, _) = cache.refresh(&client, &key, 100).await.unwrap();
        assert!(!changed);
    }

    /// A cleanup finds the keys where the object may still hold a grant without listing them:
    /// those whose snapshot names it, and those a lost answer made uncertain.
    #[tokio::test]
    async fn a_cleanup_finds_the_keys_whose_snapshot_names_the_object_or_may_hide_its_grant() {
        let (emulator, client, named) = emulator_with_key("named").await;
        let other = |alias: &str| KeyRef {
            key_id: emulator
                .admin()
                .create_key(NewKey {
                    key_alias: alias.into(),
                    ..NewKey::default()
                })
                .unwrap()
                .key_id,
            ..named.clone()
        };
        let (unrelated, uncertain) = (other("unrelated"), other("uncertain"));
        let cache = KeyCache::default();
        grant_by_hand(&client, &named, "k8s/c/ns/x").await;
        grant_by_hand(&client, &unrelated, "k8s/c/ns/y").await;
        for key in [&named, &unrelated, &uncertain] {
            cache.refresh(&client, key, 100).await.unwrap();
        }
        assert_eq!(
            cache.keys_naming(&["k8s/c/ns/x"]).await,
            vec![named.clone()]
        );
        // A create on `uncertain` whose answer was lost: its snapshot cannot tell.
        cache.invalidate(&uncertain).await;
        let mut found = cache.keys_naming(&["k8s/c/ns/x", "kmsgrant-uid"]).await;
        found.sort();
        let mut expected = vec![named.clone(), uncertain.clone()];
        expected.sort();
        assert_eq!(found, expected);
        assert!(
            cache
                .keys_naming(&["k8s/c/ns/z"])
                .await
                .contains(&uncertain)
        );
        // A key never listed here is named as such; listed ones are not.
        let never = KeyRef {
            key_id: "0d0466b0-e727-4d9c-b35d-f84bb474a37f".into(),
            ..named.clone()
        };
        let ids = [named.key_id.clone(), never.key_id.clone()];
        assert_eq!(cache.never_listed(&named, ids).await, vec![never]);
    }

    /// What the drift pass found unrecorded on a key stands until a later listing of that key
    /// says otherwise, and a provider that changed forgets it.
    #[test]
    fn unrecorded_grants_are_remembered_per_key_until_the_next_listing() {
        let cache = KeyCache::default();
        let key = |key_id: &str| KeyRef {
            provider: "p".into(),
            account: "a".into(),
            key_id: key_id.into(),
        };
        let x = ("ns".to_owned(), "x".to_owned());
        cache.found_unrecorded(&key("k1"), vec![x.clone()]);
        cache.found_unrecorded(&key("k2"), vec![x.clone(), ("ns".into(), "y".into())]);
        let mut keys = cache.unrecorded_of("ns", "x");
        keys.sort();
        assert_eq!(keys, vec![key("k1"), key("k2")]);
        assert_eq!(cache.unrecorded_of("other", "x"), vec![]);
        cache.found_unrecorded(&key("k1"), Vec::new());
        assert_eq!(cache.unrecorded_of("ns", "x"), vec![key("k2")]);
        cache.forget_provider("p");
        assert_eq!(cache.unrecorded_of("ns", "y"), vec![]);
    }

    /// The drift pass lists a key and finds a grant gone: the objects it wakes believe that
    /// list instead of walking the key once each.
    #[tokio::test]
    async fn a_grant_a_walk_saw_vanish_is_believed_gone_without_another_walk() {
        let (_emulator, client, key) = emulator_with_key("vanish").await;
        let cache = KeyCache::default();
        let ids = [
            grant_by_hand(&client, &key, "one").await,
            grant_by_hand(&client, &key, "two").await,
        ];
        // Never seen: nothing to believe.
        assert!(!cache.vanished(&key, &[ids[0].as_str()]).await);
        cache.refresh(&client, &key, 100).await.unwrap();
        client.revoke_grant(&key.key_id, &ids[0]).await.unwrap();
        assert!(
            !cache.vanished(&key, &[ids[0].as_str()]).await,
            "not walked since"
        );
        cache.refresh(&client, &key, 100).await.unwrap();
        assert!(cache.vanished(&key, &[ids[0].as_str()]).await);
        assert!(
            !cache.vanished(&key, &[ids[1].as_str()]).await,
            "still there"
        );
        assert!(!cache.vanished(&key, &["never-known"]).await);
        // Still believed after a later walk; not once the snapshot is in doubt.
        cache.refresh(&client, &key, 100).await.unwrap();
        assert!(cache.vanished(&key, &[ids[0].as_str()]).await);
        cache.invalidate(&key).await;
        assert!(!cache.vanished(&key, &[ids[0].as_str()]).await);
    }

    #[tokio::test]
    async fn the_objects_being_deleted_on_a_key_share_one_fresh_list() {
        let (emulator, client, key) = emulator_with_key("deleting").await;
        let admin = emulator.admin();
        let (cache, metrics) = (KeyCache::default(), crate::metrics::Metrics::default());
        let set = |uids: &[&str]| uids.iter().map(|u| (*u).to_owned()).collect::<HashSet<_>>();
        let lists = || admin.stats().count("list-grants", "200");
        admin.clear_stats();
        // "a" and "b" were both being deleted when "a"'s walk started: one walk for both.
        let cleanup = |uid: &'static str, deleting: HashSet<String>| {
            cache.grants_for_cleanup(&client, &key, uid, move || deleting, 100, &metrics)
        };
        let fresh = |found: ForCleanup| match found {
            ForCleanup::Fresh { mut wake, .. } => {
                wake.sort();
                wake
            }
            known => panic!("a walk that counts for the object: {known:?}"),
        };
        let known = |found: ForCleanup| match found {
            ForCleanup::Known { retry, .. } => retry,
            fresh => panic!("the grants as known: {fresh:?}"),
        };
        assert!(fresh(cleanup("a", set(&["a", "b"])).await.unwrap()).is_empty());
        assert!(fresh(cleanup("b", set(&["b"])).await.unwrap()).is_empty());
        assert_eq!(lists(), 1);
        // A mass deletion: "c", "d" and "e" are being deleted, "c" and "d" come first. They are
        // told what is known (to revoke meanwhile), and wait for the last; its walk counts for
        // all three and names the two to wake.
        let everyone = || set(&["c", "d", "e"]);
        let retry = known(cleanup("c", everyone()).await.unwrap());
        assert!(retry > CLEANUP_GATHER, "woken, not polling: {retry:?}");
        assert!(retry <= CLEANUP_WAIT_MAX, "{retry:?}");
        known(cleanup("d", everyone()).await.unwrap());
        // Asking again changes nothing while "e" has not come.
        known(cleanup("c", everyone()).await.unwrap());
        assert_eq!(lists(), 1);
        tokio::time::sleep(CLEANUP_GATHER).await;
        assert_eq!(fresh(cleanup("e", everyone()).await.unwrap()), ["c", "d"]);
        assert_eq!(lists(), 2);
        assert!(fresh(cleanup("c", set(&["c", "d"])).await.unwrap()).is_empty());
        assert!(fresh(cleanup("d", set(&["d"])).await.unwrap()).is_empty());
        assert_eq!(lists(), 2);
        // Deletions that trickle in: the last walk started under a second ago, so "f" (alone)
        // waits out the rest of that second, then walks.
        let retry = known(cleanup("f", set(&["f"])).await.unwrap());
        assert!(retry <= CLEANUP_GATHER, "{retry:?}");
        tokio::time::sleep(retry).await;
        assert!(fresh(cleanup("f", set(&["f"])).await.unwrap()).is_empty());
        assert_eq!(lists(), 3);
        // A write whose outcome is unknown: nobody is served the snapshot without a new walk.
        cache.invalidate(&key).await;
        cleanup("f", set(&["f"])).await.unwrap();
        assert_eq!(lists(), 4);
        // A reader's walk keeps who was deleting: they still share it.
        cache
            .grants(&client, &key, Duration::ZERO, 100, &metrics)
            .await
            .unwrap();
        cleanup("f", set(&["f"])).await.unwrap();
        assert_eq!(lists(), 5);
    }

    /// An object being deleted that never comes to the key (its cleanup blocked elsewhere)
    /// holds the walk the others wait for only so long.
    #[tokio::test]
    async fn a_cleanup_waits_for_the_others_on_its_key_only_so_long() {
        let (emulator, client, key) = emulator_with_key("stuck").await;
        let admin = emulator.admin();
        let (cache, metrics) = (KeyCache::default(), crate::metrics::Metrics::default());
        let set = |uids: &[&str]| uids.iter().map(|u| (*u).to_owned()).collect::<HashSet<_>>();
        let cleanup = |uid: &'static str, deleting: HashSet<String>| {
            cache.grants_for_cleanup(&client, &key, uid, move || deleting, 100, &metrics)
        };
        // The first walk (nothing known yet) goes at once.
        assert!(matches!(
            cleanup("a", set(&["a"])).await.unwrap(),
            ForCleanup::Fresh { .. }
        ));
        admin.clear_stats();
        // "b" and "stuck" are deleted later; "stuck" never comes.
        let retry = match cleanup("b", set(&["b", "stuck"])).await.unwrap() {
            ForCleanup::Known { retry, .. } => retry,
            fresh => panic!("waits for \"stuck\": {fresh:?}"),
        };
        assert!(retry > CLEANUP_WAIT_MAX / 2, "{retry:?}");
        assert_eq!(admin.stats().count("list-grants", "200"), 0);
        // Its patience spent (wound back rather than waited out).
        let entry = cache.entry(&key);
        let mut snapshot = entry.grants.lock().await;
        let waiting_since = &mut snapshot.as_mut().unwrap().waiting_since;
        *waiting_since = waiting_since.and_then(|since| since.checked_sub(retry));
        drop(snapshot);
        assert!(matches!(
            cleanup("b", set(&["b", "stuck"])).await.unwrap(),
            ForCleanup::Fresh { .. }
        ));
        assert_eq!(admin.stats().count("list-grants", "200"), 1);
    }

    #[tokio::test]
    async fn concurrent_readers_of_one_key_share_one_describe_key() {
        let (emulator, client, key) = emulator_with_key("shared").await;
        let admin = emulator.admin();
        // Slow answers, so every reader arrives while the first describe is in flight.
        admin
            .set_faults(FaultSettings {
                latency_ms: 50,
                ..FaultSettings::default()
            })
            .unwrap();
        let cache = KeyCache::default();
        admin.clear_stats();
        let readers = (0..16).map(|_| cache.key_info(&client, &key, Duration::from_secs(60)));
        for info in futures::future::join_all(readers).await {
            assert_eq!(info.unwrap().state, KeyState::Enabled);
        }
        assert_eq!(admin.stats().count("describe-key", "200"), 1);
        assert_eq!(admin.stats().total, 1);
    }
}
