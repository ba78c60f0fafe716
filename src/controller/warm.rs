//! A new leader's first look at the keys, made for every key at once instead of key after key.
//!
//! After a failover or a rollout every object is reconciled again, in the order the API server
//! listed them: usually all the objects of one key, then of the next. The controller's workers
//! (`--concurrency`) then all wait on the same key's `describe-key` and `list-grants`, and the
//! next key's calls only start once those objects are through: the calls go one key at a time,
//! below the rate the cloud would take, and only after the whole list has arrived (at 10,000
//! objects on 100 keys, 6 s where the throttle allows 4). So as the grant cache's first list
//! arrives, page by page, the leader describes and lists the keys its objects already hold
//! grants on, several at once, paced by the client's token bucket; the reconciles that follow
//! share those answers (the key cache single-flights them) and make no call of their own.
//!
//! It only reads, and only what those reconciles read anyway: the key an object in sync (Ready
//! for its generation, its grant recorded on the key its spec names) holds its grant on, through
//! the config it names, once that config's check passed and only on the account that config
//! reaches. Everything else (aliases, new or changed objects, deletions) is left to the
//! reconciles, which decide what to read.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::mpsc;

use super::cache::KeyRef;
use super::{Context, conditions, provider};
use crate::api::{ConditionStatus, KmsGrant};

/// Keys looked at concurrently: enough to keep the token bucket busy (each call waits on the
/// cloud's latency), few enough that the reconciles' own calls are not queued behind hundreds.
const IN_FLIGHT: usize = 8;

/// How long, from the start, a key waits for its config's first passed check before it is
/// left to the reconciles.
const CHECK_WAIT: Duration = Duration::from_secs(10);

/// A key an object in sync holds its grant on: the config (registry key) it goes through, the
/// account and the key ID its status records.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SeenKey {
    config: String,
    account: String,
    key_id: String,
}

/// What the grant cache's first list shows, as it arrives: each key an object in sync holds its
/// grant on, once. Fed from the watch stream (no store access, no call); dropped at the end of
/// the first list, which ends the first look once its keys are done.
pub struct FirstList {
    sender: mpsc::UnboundedSender<SeenKey>,
    sent: HashSet<SeenKey>,
}

impl FirstList {
    pub fn new() -> (Self, mpsc::UnboundedReceiver<SeenKey>) {
        let (sender, receiver) = mpsc::unbounded_channel();
        let sent = HashSet::new();
        (Self { sender, sent }, receiver)
    }

    /// An object of the first list.
    pub fn saw(&mut self, object: &KmsGrant) {
        if let Some(key) = key_in_sync(object)
            && !self.sent.contains(&key)
        {
            let _ = self.sender.send(key.clone());
            self.sent.insert(key);
        }
    }
}

/// Describes and lists each key the first list shows an object in sync holding its grant on,
/// as the list arrives (see the module's doc). Ends when the first list has ended and its keys
/// are done.
pub async fn first_look(ctx: Arc<Context>, seen: mpsc::UnboundedReceiver<SeenKey>) {
    let started = tokio::time::Instant::now();
    let looked = std::sync::atomic::AtomicUsize::new(0);
    tokio_stream::wrappers::UnboundedReceiverStream::new(seen)
        .for_each_concurrent(IN_FLIGHT, |seen| {
            let (ctx, looked) = (&ctx, &looked);
            async move {
                if look(ctx, seen, started + CHECK_WAIT).await {
                    looked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        })
        .await;
    let keys = looked.into_inner();
    tracing::info!(keys, took = ?started.elapsed(), "looked at the keys of the objects in sync");
}

/// Describes and lists one key through its config's client, once that config's check has passed
/// (waiting until `deadline` at most). Whether it did.
async fn look(ctx: &Context, seen: SeenKey, deadline: tokio::time::Instant) -> bool {
    // Only a config whose credentials work: the same client the reconciles will use. Its check
    // comes moments after the start; a config that does not pass is left to the reconciles.
    let provider = loop {
        if let Some(provider) = ctx.providers.get(&seen.config) {
            break provider;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    if provider::account_of(&provider).await.ok().as_ref() != Some(&seen.account) {
        return false;
    }
    let key = KeyRef {
        provider: seen.config,
        account: seen.account,
        key_id: seen.key_id,
    };
    let client = &provider.client;
    // A failure is the reconciles' to report: they ask again and say why.
    if let Err(err) = ctx
        .keys
        .key_info(client, &key, ctx.settings.key_info_max_age())
        .await
    {
        tracing::debug!(key = %key.key_id, error = %err, "first look at a key: describe-key failed");
        return false;
    }
    let listed = ctx
        .keys
        .grants(
            client,
            &key,
            ctx.settings.snapshot_max_age(),
            ctx.settings.page_size,
            &ctx.metrics,
        )
        .await;
    if let Err(err) = listed {
        tracing::debug!(key = %key.key_id, error = %err, "first look at a key: list-grants failed");
        return false;
    }
    true
}

/// The key an object in sync holds its grant on: not being deleted, named by ID (not alias),
/// Ready for its current generation, with a grant recorded on that key and an account.
fn key_in_sync(object: &KmsGrant) -> Option<SeenKey> {
    if object.metadata.deletion_timestamp.is_some() || object.spec.key_alias().is_some() {
        return None;
    }
    let status = object.status.as_ref()?;
    let (key_id, account, _) = (
        status.key_id.as_ref()?,
        status.account.as_ref()?,
        status.grant_id.as_ref()?,
    );
    if object.spec.key_id.as_ref() != Some(key_id) {
        return None;
    }
    let ready_now = status.conditions.iter().any(|c| {
        c.type_ == conditions::READY
            && c.status == ConditionStatus::True
            && c.observed_generation.is_some()
            && c.observed_generation == object.metadata.generation
    });
    ready_now.then(|| SeenKey {
        config: provider::key_of(object),
        account: account.clone(),
        key_id: key_id.clone(),
    })
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
    fn only_keys_that_objects_in_sync_hold_grants_on_are_looked_at_first_and_each_once() {
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
        let (mut first_list, mut seen) = FirstList::new();
        for object in &objects {
            first_list.saw(object);
        }
        drop(first_list);
        let expected = SeenKey {
            config: "prod".into(),
            account: "kms.example|project".into(),
            key_id: KEY_1.into(),
        };
        assert_eq!(seen.try_recv(), Ok(expected));
        // Once, and the end of the first list ends the stream.
        assert_eq!(
            seen.try_recv(),
            Err(tokio::sync::mpsc::error::TryRecvError::Disconnected)
        );
    }
}
