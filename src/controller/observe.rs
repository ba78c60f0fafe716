//! The first step of a reconcile: read what the decision needs — the provider configs, the
//! namespace's labels, the key and the grants on it, or, for a deleted object, its grants on every
//! account and key it used. What may be read is decided first ([`scope`](super::scope)), so
//! nothing outside an object's scope is ever listed or described for it; the grant lists and key
//! descriptions come from the shared, single-flighted [`cache`](super::cache).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};

use super::cache::{self, KeyRef};
use super::identity::{self, Identity};
use super::plan::{self, Deleting, FINALIZER, Live, Observation, Place, Stop, answered_by_kms};
use super::scope::{self, Facts, Scope};
use super::{Context, ReconcileError, keyref};
use crate::api::{KmsGrant, KmsGrantStatus};
use kmsgrant_kms::{ErrorClass, ErrorReason, Grant, KeyState, KmsError};

/// How long a pass waits for this process's first check of the object's provider config
/// before it reports the config as not Ready (the check is one KMS call).
const PROVIDER_CHECK_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Everything one pass of `object` needs to decide; `Err` only when Kubernetes cannot be read.
pub(super) async fn read(object: &KmsGrant, ctx: &Context) -> Result<Observation, ReconcileError> {
    let Some(uid) = object.uid() else {
        return Ok(Observation::Unstored);
    };
    // A new operator's first passes can come before its provider config cache holds the
    // configs (the runtime holds reconciles until the grant cache is ready, not the others):
    // "the config's UID" would be read from an empty store and the pass would go on without
    // the config. And nothing is written, not even a finalizer, before the chores that must see
    // the objects as stored are done (see `controller::run`). Polled, not awaited on the stores:
    // their readiness wakes one waiter only.
    while !ctx.caches_synced.load(std::sync::atomic::Ordering::Acquire) {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let namespace = object.namespace().unwrap_or_default();
    let identity = Identity::new(&ctx.cluster, &namespace, &object.name_any(), &uid);
    let object_ref = ObjectRef::from_obj(object);
    let deleting = object.meta().deletion_timestamp.is_some();
    let has_finalizer = object.finalizers().iter().any(|f| f == FINALIZER);
    if deleting {
        ctx.interest.forget(&object_ref);
        if !has_finalizer {
            return Ok(Observation::Released);
        }
    } else if !has_finalizer && object.wants_finalizer() {
        // Nothing is read for a pass that only adds it.
        return Ok(Observation::NeedsFinalizer);
    }
    let stopped = |stop: Stop| match deleting {
        true => Observation::Deleting(Err(stop)),
        false => Observation::Live(Err(stop)),
    };
    // The platform's limit on objects its tenants' configs serve per namespace, counted in the
    // object cache (no list): an object beyond it reads and calls nothing.
    if !deleting
        && let Err(outcome) = super::tenancy::namespace_share(
            || ctx.grants.state(),
            ctx.settings.tenant_policy.max_objects_per_namespace,
            object,
        )
    {
        return Ok(stopped(Stop::Halted(outcome)));
    }
    let spec = &object.spec;
    let status = object.status.clone().unwrap_or_default();
    let config_name = &super::provider::key_of(object);

    // Provider configs: the one named, the account it reaches, and those reaching the accounts
    // status records grants on.
    let recorded_accounts: Vec<&str> = [
        status.account.as_deref(),
        status
            .superseded_grant
            .as_ref()
            .and_then(|g| g.account.as_deref()),
    ]
    .into_iter()
    .flatten()
    .collect();
    // A new operator's first pass of an object may come before its first check of the config.
    ctx.providers
        .until_checked(config_name, PROVIDER_CHECK_WAIT)
        .await;
    let view = ctx
        .providers
        .view(
            &ctx.client,
            config_name,
            &namespace,
            deleting,
            &recorded_accounts,
        )
        .await
        .map_err(ReconcileError::Kube)?;
    let account = match view.account {
        Some(Ok(account)) => Some(account),
        Some(Err(err)) => return Ok(stopped(Stop::Kms(err))),
        None => None,
    };

    // The namespace's labels, read only when a selector needs them.
    let needs_labels = !deleting
        && view.current.as_ref().is_some_and(|p| {
            p.spec.namespace_selector.is_some()
                || (spec.import_grant_id.is_some() && p.spec.import_namespace_selector.is_some())
        });
    let labels = match needs_labels {
        true => ctx
            .namespaces
            .labels(&namespace)
            .await
            .map_err(ReconcileError::Kube)?,
        false => BTreeMap::new(),
    };

    // Keys where a grant named for the object was seen that status does not record: found by
    // the drift pass's listings; for a deletion also in any key's snapshot (or a key whose
    // snapshot a lost answer made uncertain), so that the object does not go before it.
    let mut unrecorded = ctx.keys.unrecorded_of(&namespace, &object.name_any());
    if deleting {
        // A new leader has not listed every key yet: a grant the previous one created just
        // before it went (and before the object moved to another key) may be on any key in use.
        // Asked first: it waits for the walks in flight (another object's reconcile listing a
        // key), and the snapshots they leave are then read for the object's names below. The
        // other way round, a walk ending between the two looks is in neither: its key counts as
        // listed, and its snapshot was not there yet when the names were looked for.
        if !ctx
            .listed_every_key
            .load(std::sync::atomic::Ordering::Acquire)
            && let Some(account) = &account
        {
            let like = KeyRef {
                provider: config_name.clone(),
                account: account.clone(),
                key_id: String::new(),
            };
            let in_use = keys_in_use(&ctx.grants.state(), config_name);
            unrecorded.extend(ctx.keys.never_listed(&like, in_use).await);
        }
        let names = [identity.name.as_str(), identity.legacy_name.as_str()];
        unrecorded.extend(ctx.keys.keys_naming(&names).await);
        unrecorded.sort();
        unrecorded.dedup();
    }
    let unrecorded: Vec<(String, String)> = unrecorded
        .into_iter()
        .map(|key| (key.account, key.key_id))
        .collect();

    // What may be read.
    let scope = scope::of(Facts {
        spec,
        status: &status,
        deleting,
        config_name,
        config_exists: view.exists,
        config: view
            .current
            .as_ref()
            .zip(account.as_deref())
            .map(|(p, a)| (&p.spec, a)),
        namespace: &namespace,
        namespace_labels: &labels,
        unrecorded: &unrecorded,
    });
    let scope = match scope {
        Ok(scope) => scope,
        Err(outcome) => return Ok(stopped(Stop::Halted(outcome))),
    };

    // The cloud, within that scope.
    let page_size = ctx.settings.page_size;
    let metrics = &ctx.metrics;
    match scope {
        Scope::Deleting { mut places } => {
            // A key named by alias: also where the alias points now (a create whose answer was
            // lost after the alias moved left a grant that status does not record).
            if let (Some(alias), Some(provider), Some(account)) =
                (spec.key_alias(), &view.current, &account)
                && let Ok(found) = keyref::resolve(ctx, provider, config_name, account, alias).await
                && spec.deletion_policy != crate::api::DeletionPolicy::Orphan
                && !places
                    .iter()
                    .any(|p| p.account == *account && p.key_id == found.info.key_id)
            {
                places.push(scope::CleanupPlace {
                    account: account.clone(),
                    key_id: found.info.key_id,
                    recorded_grant: None,
                });
            }
            let mut seen = Vec::with_capacity(places.len());
            for place in places {
                let via = match (&view.current, &account) {
                    (Some(provider), Some(a)) if *a == place.account => {
                        Some((view.name.clone(), provider.clone()))
                    }
                    _ => view.reaching.get(&place.account).cloned(),
                };
                let Some((name, provider)) = via else {
                    let waits = place.recorded_grant.is_some();
                    let account = place.account.clone();
                    seen.push((place, Place::Unreachable { account }));
                    if waits {
                        // Deletion waits here; the places after it are looked at when it can.
                        break;
                    }
                    continue;
                };
                let key = KeyRef {
                    provider: name,
                    account: place.account.clone(),
                    key_id: place.key_id.clone(),
                };
                // The objects being deleted on one key share one walk that started after they
                // all were (see `KeyCache::grants_for_cleanup`).
                let listed = ctx
                    .keys
                    .grants_for_cleanup(
                        &provider.client,
                        &key,
                        &uid,
                        || cache::deleting_on(&ctx.grants, &key.key_id),
                        page_size,
                        metrics,
                    )
                    .await;
                let found = match listed {
                    Ok(cache::ForCleanup::Fresh { grants, wake }) => {
                        ctx.wake_deleting(&wake);
                        Place::Listed {
                            client: provider.client.clone(),
                            key,
                            grants,
                        }
                    }
                    Ok(cache::ForCleanup::Known { grants, retry }) => Place::Known {
                        client: provider.client.clone(),
                        key,
                        grants,
                        retry,
                    },
                    Err(err) if gone(&err) => Place::KeyGone,
                    // Only a lost answer could have left a grant here; a lookup that cannot
                    // work (credentials, permissions) must not block deletion forever.
                    Err(err)
                        if place.recorded_grant.is_none()
                            && err.class() == ErrorClass::Terminal =>
                    {
                        Place::LookupFailed {
                            key_id: key.key_id,
                            error: err,
                        }
                    }
                    Err(err) => return Ok(stopped(Stop::Kms(err))),
                };
                seen.push((place, found));
            }
            let names_missing = seen.iter().find_map(|(_, place)| {
                let (key, grants, fresh) = match place {
                    Place::Listed { key, grants, .. } => (key, grants, true),
                    Place::Known { key, grants, .. } => (key, grants, false),
                    _ => return None,
                };
                names_missing(ctx, key, &status, grants.iter().collect(), fresh)
                    .map(|grant_id| (key.key_id.clone(), grant_id))
            });
            Ok(Observation::Deleting(Ok(Deleting {
                identity,
                places: seen,
                names_missing,
            })))
        }
        Scope::Live {
            account,
            import,
            elsewhere: mut elsewhere_keys,
            superseded,
        } => {
            let Some(provider) = view.current else {
                unreachable!("a live scope has its provider");
            };
            let client = &provider.client;
            // A key named by alias: its describe-key answers for the key too.
            let resolved = match spec.key_alias() {
                None => None,
                Some(alias) => {
                    match keyref::resolve(ctx, &provider, config_name, &account, alias).await {
                        Ok(found) => Some(found.info),
                        // The grant the object holds stays; nothing is read further.
                        Err(err) if gone(&err) => {
                            let kept = status.grant_id.as_ref().and(status.key_id.as_deref());
                            return Ok(stopped(Stop::Halted(plan::alias_not_found(alias, kept))));
                        }
                        Err(err) => return Ok(stopped(Stop::Kms(err))),
                    }
                }
            };
            let key = KeyRef {
                provider: config_name.clone(),
                account: account.clone(),
                key_id: match &resolved {
                    Some(info) => info.key_id.clone(),
                    None => spec.key_id.clone().unwrap_or_default(),
                },
            };
            if let (Some(alias), Some(_)) = (spec.key_alias(), &resolved) {
                // The guardrail the admission policy could not apply to an alias.
                if let Some(outcome) =
                    plan::resolved_key_allowed(alias, &key.key_id, config_name, &provider.spec)
                {
                    return Ok(stopped(Stop::Halted(outcome)));
                }
                elsewhere_keys.retain(|k| *k != key.key_id);
            }
            ctx.interest.register(&object_ref, &key);
            let read = async {
                let key_info = match resolved {
                    Some(info) => Ok(info),
                    None => {
                        ctx.keys
                            .key_info(client, &key, ctx.settings.key_info_max_age())
                            .await
                    }
                };
                let usable = matches!(&key_info, Ok(info) if info.state == KeyState::Enabled && !info.is_default_master_key());
                if !usable {
                    // The decision says why; nothing more is read from a key that cannot be used.
                    return Ok(Live {
                        identity,
                        client: client.clone(),
                        account,
                        key,
                        key_info,
                        import,
                        grants: Default::default(),
                        fresh: false,
                        elsewhere: Vec::new(),
                        superseded_elsewhere: None,
                        names_missing: None,
                    });
                }
                let snapshot_age = ctx.settings.snapshot_max_age();
                let (mut grants, mut fresh) = ctx
                    .keys
                    .grants(client, &key, snapshot_age, page_size, metrics)
                    .await?;
                let mut elsewhere = Vec::new();
                for key_id in elsewhere_keys {
                    let other = KeyRef {
                        key_id,
                        ..key.clone()
                    };
                    match ctx
                        .keys
                        .grants(client, &other, snapshot_age, page_size, metrics)
                        .await
                    {
                        Ok((listed, _)) => elsewhere.extend(listed.iter().cloned()),
                        Err(err) if gone(&err) => {}
                        Err(err) => return Err(err),
                    }
                }
                // A snapshot is not believed about what status or the spec names and it lacks
                // (a grant gone out of band, an import): it is listed afresh, sharing the walk
                // with any other reader that needs the same.
                // One a walk of this process saw vanish is believed gone (the drift pass found
                // it so): no second walk per repaired object.
                let missing: Vec<&str> = [status.grant_id.as_deref(), import.as_deref()]
                    .into_iter()
                    .flatten()
                    .filter(|id| !grants.iter().chain(&elsewhere).any(|g| g.grant_id == *id))
                    .collect();
                if !missing.is_empty() && !fresh && ctx.keys.vanished(&key, &missing).await {
                    fresh = true;
                }
                if !missing.is_empty() && !fresh {
                    (grants, fresh) = ctx
                        .keys
                        .grants(client, &key, Duration::ZERO, page_size, metrics)
                        .await?;
                }
                let superseded_elsewhere = match superseded {
                    None => None,
                    Some((old_account, old_key)) => Some(match view.reaching.get(&old_account) {
                        None => Place::Unreachable {
                            account: old_account,
                        },
                        Some((name, provider)) => {
                            let key = KeyRef {
                                provider: name.clone(),
                                account: old_account,
                                key_id: old_key.clone(),
                            };
                            let listed = ctx
                                .keys
                                .grants(&provider.client, &key, Duration::ZERO, page_size, metrics)
                                .await;
                            match listed {
                                Ok((grants, _)) => Place::Listed {
                                    client: provider.client.clone(),
                                    key,
                                    grants,
                                },
                                Err(err) if gone(&err) => Place::KeyGone,
                                // Told once the object's own grant is in place.
                                Err(error) => Place::LookupFailed {
                                    key_id: old_key,
                                    error,
                                },
                            }
                        }
                    }),
                };
                let names_missing = names_missing(
                    ctx,
                    &key,
                    &status,
                    grants.iter().chain(&elsewhere).collect(),
                    fresh,
                );
                Ok(Live {
                    identity,
                    client: client.clone(),
                    account,
                    key,
                    key_info,
                    import,
                    grants,
                    fresh,
                    elsewhere,
                    superseded_elsewhere,
                    names_missing,
                })
            };
            Ok(Observation::Live(
                read.await
                    .map(Box::new)
                    .map_err(|err: KmsError| Stop::Kms(err)),
            ))
        }
    }
}

/// Whether the account lists grants on `key` (or on the keys `listed` holds grants of) without
/// their names: this object's evidence (the grant its status records by name, listed without
/// one) recorded for the key's other objects and policies, or another's or the drift pass's.
/// The grant that showed it. Names seen in a snapshot (not `fresh`) say nothing: it may be
/// older than the listing that found them missing.
fn names_missing(
    ctx: &Context,
    key: &KeyRef,
    status: &KmsGrantStatus,
    listed: Vec<&Grant>,
    fresh: bool,
) -> Option<String> {
    let recorded = |id: &str| status.grant_name.is_some() && status.grant_id.as_deref() == Some(id);
    let mut keys: BTreeSet<&str> = listed.iter().map(|g| &*g.key_id).collect();
    keys.insert(&key.key_id);
    keys.into_iter().find_map(|key_id| {
        let on_key = KeyRef {
            key_id: key_id.to_owned(),
            ..key.clone()
        };
        let here = listed.iter().copied().filter(|g| *g.key_id == *key_id);
        match identity::names_listed(here, recorded) {
            Some(identity::NamesListed::Returned) if !fresh => {}
            Some(evidence) => {
                super::names_listed(ctx, &on_key, &evidence);
            }
            None => {}
        }
        ctx.keys.names_missing(&on_key)
    })
}

/// The keys the cached objects using provider config `config_name` name (spec and status).
fn keys_in_use(objects: &[std::sync::Arc<KmsGrant>], config_name: &str) -> BTreeSet<String> {
    objects
        .iter()
        .filter(|o| super::provider::key_of(o) == config_name)
        .flat_map(|o| {
            let status = o.status.as_ref();
            [
                o.spec.key_id.clone(),
                status.and_then(|s| s.key_id.clone()),
                status.and_then(|s| s.superseded_grant.as_ref().map(|g| g.key_id.clone())),
            ]
        })
        .flatten()
        .collect()
}

/// KMS itself says the key does not exist: its grants went with it.
fn gone(err: &KmsError) -> bool {
    err.reason == ErrorReason::KeyNotFound && answered_by_kms(err)
}
