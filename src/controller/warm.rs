//! A new leader's first look at the keys, made for every key at once instead of key after key.
//!
//! After a failover or a rollout every object is reconciled again, in the order the API server
//! listed them: usually all the objects of one key, then of the next. The controller's workers
//! (`--concurrency`) then all wait on the same key's `describe-key` and `list-grants`, and the
//! next key's calls only start once those objects are through: the calls go one key at a time,
//! below the rate the cloud would take (at 10,000 objects on 100 keys, 6 s where the throttle
//! allows 4). So once the caches hold the cluster, the leader describes and lists, at once and
//! paced by the client's token bucket, the keys its objects already hold grants on; the
//! reconciles that follow share those answers (the key cache single-flights them) and make no
//! call of their own.
//!
//! It only reads, and only what those reconciles read anyway: the key an object in sync (Ready
//! for its generation, its grant recorded on the key its spec names) holds its grant on, through
//! the config it names, once that config's check passed. Everything else (aliases, new or
//! changed objects, deletions) is left to the reconciles, which decide what to read.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;

use super::cache::KeyRef;
use super::{Context, conditions, provider};
use crate::api::{ConditionStatus, KmsGrant};

/// Keys looked at concurrently: enough to keep the token bucket busy (each call waits on the
/// cloud's latency), few enough that the reconciles' own calls are not queued behind hundreds.
const IN_FLIGHT: usize = 8;

/// How long to wait for a config's first check before its keys are left to the reconciles.
const CHECK_WAIT: Duration = Duration::from_secs(10);

/// Describes and lists every key the objects in sync hold grants on (see the module's doc).
pub async fn keys_in_sync(ctx: Arc<Context>) {
    let by_config = keys_of_objects_in_sync(&ctx.grants.state());
    if by_config.is_empty() {
        return;
    }
    let started = tokio::time::Instant::now();
    let mut keys = Vec::new();
    for (config_name, wanted) in by_config {
        ctx.providers.until_checked(&config_name, CHECK_WAIT).await;
        // Only a config whose credentials work: the same client the reconciles will use.
        let Some(provider) = ctx.providers.get(&config_name) else {
            continue;
        };
        let Ok(account) = provider::account_of(&provider).await else {
            continue;
        };
        for (recorded_account, key_id) in wanted {
            if recorded_account == account {
                let key = KeyRef {
                    provider: config_name.clone(),
                    account: account.clone(),
                    key_id,
                };
                keys.push((provider.client.clone(), key));
            }
        }
    }
    let count = keys.len();
    let (info_age, page_size) = (ctx.settings.key_info_max_age(), ctx.settings.page_size);
    let snapshot_age = ctx.settings.snapshot_max_age();
    futures::stream::iter(keys)
        .for_each_concurrent(IN_FLIGHT, |(client, key)| {
            let ctx = &ctx;
            async move {
                // A failure is the reconciles' to report: they ask again and say why.
                if let Err(err) = ctx.keys.key_info(&client, &key, info_age).await {
                    tracing::debug!(key = %key.key_id, error = %err, "first look at a key: describe-key failed");
                    return;
                }
                if let Err(err) = ctx
                    .keys
                    .grants(&client, &key, snapshot_age, page_size, &ctx.metrics)
                    .await
                {
                    tracing::debug!(key = %key.key_id, error = %err, "first look at a key: list-grants failed");
                }
            }
        })
        .await;
    tracing::info!(keys = count, took = ?started.elapsed(), "looked at the keys of the objects in sync");
}

/// Per config (registry key), the `(account, key ID)` pairs that objects in sync hold their
/// grants on: not being deleted, named by ID (not alias), Ready for their current generation,
/// with a grant recorded on that key and account.
fn keys_of_objects_in_sync(
    objects: &[Arc<KmsGrant>],
) -> BTreeMap<String, BTreeSet<(String, String)>> {
    let mut keys: BTreeMap<String, BTreeSet<(String, String)>> = BTreeMap::new();
    for object in objects {
        if object.metadata.deletion_timestamp.is_some() || object.spec.key_alias().is_some() {
            continue;
        }
        let Some(status) = object.status.as_ref() else {
            continue;
        };
        let (Some(key_id), Some(account), Some(_)) = (
            status.key_id.as_ref(),
            status.account.as_ref(),
            status.grant_id.as_ref(),
        ) else {
            continue;
        };
        if object.spec.key_id.as_ref() != Some(key_id) {
            continue;
        }
        let ready_now = status.conditions.iter().any(|c| {
            c.type_ == conditions::READY
                && c.status == ConditionStatus::True
                && c.observed_generation.is_some()
                && c.observed_generation == object.metadata.generation
        });
        if ready_now {
            keys.entry(provider::key_of(object))
                .or_default()
                .insert((account.clone(), key_id.clone()));
        }
    }
    keys
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{Condition, KmsGrantStatus};

    fn object(
        name: &str,
        spec_key: &str,
        generation: i64,
        status: Option<KmsGrantStatus>,
    ) -> Arc<KmsGrant> {
        let mut object: KmsGrant = serde_json::from_value(serde_json::json!({
            "apiVersion": "kmsgrant.io/v1beta1",
            "kind": "KmsGrant",
            "metadata": {"name": name, "namespace": "team-a", "generation": generation},
            "spec": {
                "providerConfigRef": {"name": "prod"},
                "keyId": spec_key,
                "granteePrincipal": "0123456789abcdef0123456789abcdef",
                "operations": ["describe-key"],
            },
        }))
        .expect("a valid KmsGrant");
        object.status = status;
        Arc::new(object)
    }

    fn in_sync(key: &str, ready_for: i64) -> KmsGrantStatus {
        KmsGrantStatus {
            grant_id: Some("a".repeat(64)),
            key_id: Some(key.into()),
            account: Some("kms.example|project".into()),
            conditions: vec![Condition {
                type_: conditions::READY.into(),
                status: ConditionStatus::True,
                reason: "GrantReady".into(),
                message: "".into(),
                observed_generation: Some(ready_for),
                last_transition_time: "2026-12-08T00:00:00Z".into(),
            }],
            ..Default::default()
        }
    }

    const KEY_1: &str = "0d0466b0-e727-4d9c-b35d-f84bb474a37f";
    const KEY_2: &str = "1d0466b0-e727-4d9c-b35d-f84bb474a37f";

    #[test]
    fn only_keys_that_objects_in_sync_hold_grants_on_are_looked_at_first() {
        let mut deleting = (*object("deleting", KEY_2, 1, Some(in_sync(KEY_2, 1)))).clone();
        deleting.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                "2026-12-08T00:00:00Z".parse().unwrap(),
            ));
        let objects = vec![
            object("a", KEY_1, 1, Some(in_sync(KEY_1, 1))),
            object("b", KEY_1, 3, Some(in_sync(KEY_1, 3))),
            // Not yet reconciled, changed since it was Ready, moved to another key, deleting.
            object("new", KEY_2, 1, None),
            object("changed", KEY_2, 2, Some(in_sync(KEY_2, 1))),
            object("moved", KEY_2, 1, Some(in_sync(KEY_1, 1))),
            Arc::new(deleting),
        ];
        let keys = keys_of_objects_in_sync(&objects);
        let expected: BTreeSet<(String, String)> =
            [("kms.example|project".to_owned(), KEY_1.to_owned())].into();
        assert_eq!(keys, BTreeMap::from([("prod".to_owned(), expected)]));
    }
}
