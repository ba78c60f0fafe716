//! Keys named by alias (`spec.keyRef.alias`): resolution with `describe-key` through the shared
//! key cache, and the drift pass's check that an alias still names the key its objects use.
//!
//! Cost: an alias is described at most once per key-description window (four resync intervals),
//! whoever asks (reconciles and the drift pass share the single-flighted cache entry), and that
//! answer serves as the description of the key it names too. An alias in use therefore costs one
//! `describe-key` per window and the key behind it none of its own; a reconcile costs none.

use std::collections::{BTreeMap, HashSet};

use kube::runtime::reflector::ObjectRef;
use tokio::sync::mpsc;

use super::cache::{AliasInfo, KeyRef};
use super::conditions::reasons;
use super::provider::Provider;
use super::{Context, conditions};
use crate::api::KmsGrant;
use kmsgrant_kms::{ErrorReason, KmsError};

/// The cache entry of an alias on an account: a key reference whose "ID" is the `alias/<name>`
/// that describe-key takes.
pub fn alias_entry(provider: &str, account: &str, alias: &str) -> KeyRef {
    KeyRef {
        provider: provider.to_owned(),
        account: account.to_owned(),
        key_id: alias.to_owned(),
    }
}

/// The key `alias` names on the provider's account, described at most once per window.
pub async fn resolve(
    ctx: &Context,
    provider: &Provider,
    config_name: &str,
    account: &str,
    alias: &str,
) -> Result<AliasInfo, KmsError> {
    ctx.keys
        .alias_info(
            &provider.client,
            &alias_entry(config_name, account, alias),
            ctx.settings.key_info_max_age(),
        )
        .await
}

/// One alias in use and its objects, each with the key its status records.
type AliasUsers = BTreeMap<KeyRef, Vec<(ObjectRef<KmsGrant>, Option<String>, Option<String>)>>;

/// The aliases the drift pass looks after: of the objects the controller admitted (registered on
/// a key), those naming their key by alias, on the account they were admitted on.
fn aliases_in_use(ctx: &Context) -> AliasUsers {
    let mut aliases: AliasUsers = BTreeMap::new();
    let objects = ctx.grants.state();
    let by_alias: Vec<_> = objects
        .iter()
        .filter(|object| object.metadata.deletion_timestamp.is_none())
        .filter_map(|object| Some((object, object.spec.key_alias()?)))
        .collect();
    if by_alias.is_empty() {
        // No alias in use: nothing to look up, not even the interest map.
        return aliases;
    }
    for (object, alias) in by_alias {
        let object_ref = ObjectRef::from_obj(object.as_ref());
        let Some(key) = ctx.interest.key_of(&object_ref) else {
            continue;
        };
        let status = object.status.as_ref();
        let ready_reason = status
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == conditions::READY))
            .map(|c| c.reason.to_string());
        aliases
            .entry(alias_entry(
                &super::provider::key_of(object),
                &key.account,
                alias,
            ))
            .or_default()
            .push((
                object_ref,
                status.and_then(|s| s.key_id.clone()),
                ready_reason,
            ));
    }
    aliases
}

/// Describes every alias in use whose description is due (before the keys are listed, so the key
/// an alias names is not described again) and wakes the objects that must act: those whose alias
/// now names another key or a key in another state, those Ready on a key the alias no longer names,
/// those Ready whose alias KMS no longer knows (they report it; their grant stays), those waiting
/// for their alias to exist, and every object on a key whose state the answer changed.
pub async fn refresh_aliases(ctx: &Context, wake: &mpsc::UnboundedSender<ObjectRef<KmsGrant>>) {
    let aliases = aliases_in_use(ctx);
    if aliases.is_empty() {
        return;
    }
    // Half a resync early: the alias is then always described in the pass in which (or before)
    // the key it names falls due, and its answer describes that key, which is checked later in
    // the same pass. Passes come once per resync, so this is still one call per window.
    let due = ctx
        .settings
        .key_info_max_age()
        .saturating_sub(ctx.settings.resync / 2);
    let mut changed_keys = HashSet::new();
    for (alias, objects) in aliases {
        let Some(provider) = ctx.providers.get(&alias.provider) else {
            continue;
        };
        let answer = ctx.keys.alias_info(&provider.client, &alias, due).await;
        for (object, recorded_key, ready_reason) in objects {
            let ready = ready_reason.as_deref() == Some(reasons::GRANT_READY);
            let waiting = ready_reason.as_deref() == Some(reasons::ALIAS_NOT_FOUND);
            let act = match &answer {
                Ok(found) => {
                    let moved = found.before.as_ref().is_some_and(|before| {
                        before.key_id != found.info.key_id || before.state != found.info.state
                    });
                    moved
                        || waiting
                        || (ready && recorded_key.as_deref() != Some(found.info.key_id.as_str()))
                }
                Err(err) if err.reason == ErrorReason::KeyNotFound => ready,
                Err(_) => false,
            };
            if act {
                tracing::debug!(alias = %alias.key_id, object = %object, "alias changed");
                let _ = wake.send(object);
            }
        }
        match answer {
            Ok(found) if found.key_state_changed => {
                changed_keys.insert(KeyRef {
                    key_id: found.info.key_id,
                    ..alias
                });
            }
            Ok(_) => {}
            Err(err) => {
                tracing::debug!(alias = %alias.key_id, error = %err, "alias check failed");
            }
        }
    }
    if changed_keys.is_empty() {
        return;
    }
    for key in changed_keys {
        for object in ctx.interest.objects_on(&key) {
            let _ = wake.send(object);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::cache::KeyCache;
    use super::*;
    use kms_emulator::{Emulator, EmulatorConfig, FaultSettings, NewKey};
    use kmsgrant_kms::{KeyState, KmsClient};

    fn client(emulator: &kms_emulator::RunningEmulator) -> KmsClient {
        super::super::test_support::emulator_client(emulator)
    }

    /// One describe-key by alias serves every concurrent reader of the alias and the key it
    /// names; a later move is seen once the window has passed, with what it named before.
    #[tokio::test]
    async fn an_alias_and_its_key_share_one_describe_key_per_window() {
        let emulator = Emulator::start(EmulatorConfig::for_tests()).await.unwrap();
        let admin = emulator.admin();
        admin
            .set_faults(FaultSettings {
                latency_ms: 50,
                ..FaultSettings::default()
            })
            .unwrap();
        let new_key = |alias: &str| {
            admin
                .create_key(NewKey {
                    key_alias: alias.into(),
                    ..NewKey::default()
                })
                .unwrap()
                .key_id
        };
        let (a, b) = (new_key("app"), new_key("app-next"));
        let client = client(&emulator);
        let cache = KeyCache::default();
        let alias = alias_entry("p", "emulator", "alias/app");
        let window = Duration::from_secs(60);
        admin.clear_stats();
        let readers = (0..8).map(|_| cache.alias_info(&client, &alias, window));
        for found in futures::future::join_all(readers).await {
            assert_eq!(found.unwrap().info.key_id, a);
        }
        let key = KeyRef {
            key_id: a.clone(),
            ..alias.clone()
        };
        assert_eq!(
            cache.key_info(&client, &key, window).await.unwrap().state,
            KeyState::Enabled
        );
        assert_eq!(admin.stats().count("describe-key", "200"), 1);
        assert_eq!(admin.stats().total, 1);

        // The alias moves; within the window the cache still answers A, after it B.
        admin.set_faults(FaultSettings::default()).unwrap();
        let _ = rustls::crypto::ring::default_provider().install_default();
        let kms = |body: serde_json::Value| {
            let emulator = &emulator;
            async move {
                let token = emulator.admin().issue_token(
                    &emulator.config().user_id,
                    kms_emulator::TokenScope::Project(emulator.config().project_id.clone()),
                    3600,
                );
                reqwest::Client::new()
                    .post(format!("{}/kms/update-key-alias", emulator.kms_endpoint()))
                    .header("X-Auth-Token", token.0)
                    .json(&body)
                    .send()
                    .await
                    .unwrap()
                    .status()
            }
        };
        assert!(
            kms(serde_json::json!({"key_id": a, "key_alias": "app-old"}))
                .await
                .is_success()
        );
        assert!(
            kms(serde_json::json!({"key_id": b, "key_alias": "app"}))
                .await
                .is_success()
        );
        let cached = cache.alias_info(&client, &alias, window).await.unwrap();
        assert_eq!(cached.info.key_id, a);
        assert!(cached.before.is_none());
        let moved = cache
            .alias_info(&client, &alias, Duration::ZERO)
            .await
            .unwrap();
        assert_eq!(moved.info.key_id, b);
        assert_eq!(moved.before.map(|info| info.key_id), Some(a.clone()));
        // B is described by the same answer: no call of its own.
        let calls = admin.stats().total;
        let key_b = KeyRef {
            key_id: b.clone(),
            ..alias.clone()
        };
        assert_eq!(
            cache
                .key_info(&client, &key_b, window)
                .await
                .unwrap()
                .key_id,
            b
        );
        assert_eq!(admin.stats().total, calls);

        // An alias KMS no longer knows is forgotten, and the error is KeyNotFound.
        assert!(
            kms(serde_json::json!({"key_id": b, "key_alias": "app-gone"}))
                .await
                .is_success()
        );
        let gone = cache
            .alias_info(&client, &alias, Duration::ZERO)
            .await
            .unwrap_err();
        assert_eq!(gone.reason, ErrorReason::KeyNotFound);
        emulator.shutdown().await;
    }
}
