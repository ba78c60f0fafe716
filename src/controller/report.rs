//! What the controller writes back to Kubernetes about a KmsGrant: its finalizer (the patch is
//! shared with the provider configs), its status (one writer, server-side apply) and its events.
//! No decisions here.

use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType};
use kube::{Resource, ResourceExt};
use serde_json::json;

use std::time::Duration;

use kube::runtime::reflector::ObjectRef;

use super::conditions::{Outcome, conditions, now_rfc3339, reasons};
use super::plan;
use super::{Context, ReconcileError};
use crate::api::{KmsGrant, KmsGrantStatus};

/// The field manager of every status this operator writes (server-side apply).
pub const FIELD_MANAGER: &str = "kmsgrant-operator";

fn api(object: &KmsGrant, client: &kube::Client) -> Api<KmsGrant> {
    Api::namespaced(client.clone(), &object.namespace().unwrap_or_default())
}

/// The finalizer that makes deletion wait for the grant to be revoked or retired.
pub const FINALIZER: &str = "kmsgrant.io/grant";

pub(super) async fn set_finalizer(
    object: &KmsGrant,
    ctx: &Context,
    present: bool,
) -> Result<(), ReconcileError> {
    patch_finalizer(&api(object, &ctx.client), object, FINALIZER, present).await
}

/// Adds or removes `finalizer` on any of the operator's objects, keeping the others'.
pub(super) async fn patch_finalizer<K>(
    api: &Api<K>,
    object: &K,
    finalizer: &str,
    present: bool,
) -> Result<(), ReconcileError>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let mut finalizers: Vec<String> = object
        .finalizers()
        .iter()
        .filter(|f| *f != finalizer)
        .cloned()
        .collect();
    if present {
        finalizers.push(finalizer.to_owned());
    }
    // Sending the resourceVersion makes a concurrent change to the list fail (409) instead of
    // being overwritten.
    let patch = json!({"metadata": {"resourceVersion": object.resource_version(), "finalizers": finalizers}});
    api.patch(
        &object.name_any(),
        &PatchParams::default(),
        &Patch::Merge(patch),
    )
    .await
    .map_err(ReconcileError::Kube)?;
    Ok(())
}

/// The one status writer: the whole status by server-side apply under [`FIELD_MANAGER`], so a
/// field left out (a stale `createdAt`, a finished `supersededGrant`) is removed. Skipped when
/// nothing changed (see [`plan::status_changed`]) and `lastSyncTime` is recent.
pub(super) async fn write_status(
    object: &KmsGrant,
    ctx: &Context,
    mut status: KmsGrantStatus,
    outcome: &Outcome,
) -> Result<(), ReconcileError> {
    let previous = object.status.clone().unwrap_or_default();
    let generation = object.meta().generation;
    let now = now_rfc3339();
    status.observed_generation = generation;
    status.conditions = conditions(outcome, generation, &previous.conditions, &now);
    status.last_sync_time = previous.last_sync_time.clone();
    let sync_is_recent = previous
        .last_sync_time
        .as_deref()
        .and_then(|t| t.parse::<jiff::Timestamp>().ok())
        .is_some_and(|t| {
            jiff::Timestamp::now().duration_since(t).as_secs()
                < ctx.settings.sync_time_refresh().as_secs() as i64
        });
    if !plan::status_changed(&status, &previous) && sync_is_recent {
        return Ok(());
    }
    status.last_sync_time = Some(now);
    let patch = json!({
        "apiVersion": "kmsgrant.io/v1alpha1",
        "kind": "KmsGrant",
        "status": status,
    });
    let written = api(object, &ctx.client)
        .patch_status(
            &object.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(patch),
        )
        .await
        .map_err(ReconcileError::Kube)?;
    until_cached(ctx, object, &written).await;
    Ok(())
}

/// Waits, briefly, until the object cache holds the status just written. The next reconcile of
/// the object (often already queued by the watch event of our own finalizer patch) starts from
/// the cached object; from the version before this write it would write the same status again
/// and, before a grant was recorded, report the grant it just created as adopted.
async fn until_cached(ctx: &Context, object: &KmsGrant, written: &KmsGrant) {
    let object_ref = ObjectRef::from_obj(object);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    loop {
        match ctx.grants.get(&object_ref) {
            Some(cached) if cached.status != written.status => {}
            // Cached, or gone from the cache (deleted, or no longer selected).
            _ => return,
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::debug!("the object cache does not show the status written yet");
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A Warning event when the object enters a failing state (once per transition, not per retry).
pub(super) async fn status_transition_event(object: &KmsGrant, ctx: &Context, outcome: &Outcome) {
    let previous_reason = object
        .status
        .as_ref()
        .and_then(|s| {
            s.conditions
                .iter()
                .find(|c| c.type_ == super::conditions::READY)
        })
        .map(|c| c.reason.clone());
    if outcome.is_ready() || previous_reason.as_deref() == Some(outcome.reason()) {
        return;
    }
    if matches!(outcome, Outcome::Progressing { reason, .. } if *reason == reasons::CREATING || *reason == reasons::REPLACING)
    {
        return;
    }
    publish(
        object,
        ctx,
        EventType::Warning,
        outcome.reason(),
        outcome.message().to_owned(),
    )
    .await;
}

pub(super) async fn publish(
    object: &KmsGrant,
    ctx: &Context,
    type_: EventType,
    reason: &str,
    note: String,
) {
    let event = Event {
        type_,
        reason: reason.to_owned(),
        note: Some(super::conditions::truncate_message(&note)),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(err) = ctx.recorder.publish(&event, &object.object_ref(&())).await {
        tracing::warn!(error = %err, "cannot publish event");
    }
}

/// A deletion that has to wait: a Warning event and the condition saying why; status otherwise
/// unchanged.
pub(super) async fn cleanup_blocked(
    object: &KmsGrant,
    ctx: &Context,
    outcome: &Outcome,
) -> Result<(), ReconcileError> {
    publish(
        object,
        ctx,
        EventType::Warning,
        "CleanupFailed",
        outcome.message().to_owned(),
    )
    .await;
    write_status(
        object,
        ctx,
        object.status.clone().unwrap_or_default(),
        outcome,
    )
    .await
}
