//! The last step of a reconcile: tell Kubernetes what a pass did — the finalizer (the patch is
//! shared with the provider configs), the status (one writer, server-side apply), the events —
//! and when to come back (per-object backoff). No decisions here.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event as EventsV1;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::{Client, Resource, ResourceExt};
use serde_json::json;

use super::conditions::{Outcome, conditions, now_rfc3339, reasons};
use super::execute::Executed;
use super::plan::{self, FINALIZER, Pass, Requeue};
use super::{Context, ReconcileError};
use crate::api::{KmsGrant, KmsGrantStatus};

/// The field manager of every status this operator writes (server-side apply).
pub const FIELD_MANAGER: &str = "kmsgrant-operator";

fn api(object: &KmsGrant, client: &kube::Client) -> Api<KmsGrant> {
    Api::namespaced(client.clone(), &object.namespace().unwrap_or_default())
}

/// Tells Kubernetes what the pass did to `object`; returns when to look again and the reason the
/// pass ended with (for metrics).
pub(super) async fn write(
    object: &KmsGrant,
    ctx: &Context,
    done: Executed,
) -> Result<(Action, &'static str), ReconcileError> {
    let Executed {
        pass,
        finalizer,
        status,
        mut events,
        requeue,
    } = done;
    let object_ref = ObjectRef::from_obj(object);
    let regarding = object.object_ref(&());
    let key = format!(
        "{}/{}",
        object.namespace().unwrap_or_default(),
        object.name_any()
    );
    if pass != Pass::Live {
        ctx.metrics.object_condition(&key, None);
    }
    if pass == Pass::Deleting {
        // What was done is told even when the rest has to wait, and before the object goes.
        for (type_, reason, note) in events.drain(..) {
            ctx.recorder.tell(&regarding, type_, reason, note).await;
        }
        if let Some((_, outcome)) = &status {
            let note = outcome.message().to_owned();
            ctx.recorder
                .tell(&regarding, EventType::Warning, "CleanupFailed", note)
                .await;
        }
    }
    if let Some(present) = finalizer {
        let patched = patch_finalizer(&api(object, &ctx.client), object, FINALIZER, present).await;
        ctx.metrics.grant_kube_write(
            "finalizer",
            match &patched {
                Err(ReconcileError::Kube(err)) => Some(err),
                _ => None,
            },
        );
        match patched {
            Ok(()) => until_finalizer_cached(ctx, object, present).await,
            // Gone already: this pass ran from a cache that had not yet seen an earlier one
            // release the object; what deletion waited for is done.
            Err(ReconcileError::Kube(kube::Error::Api(status)))
                if !present && status.is_not_found() => {}
            Err(err) => return Err(err),
        }
    }
    let mut reason = match (pass, finalizer) {
        (Pass::Idle, _) => "Idle",
        (Pass::Deleting, _) => reasons::DELETING,
        (Pass::Live, Some(true)) => "FinalizerAdded",
        (Pass::Live, _) => "ListingAfresh",
    };
    if let Some((status, outcome)) = status {
        // Status first (it records what was done on KMS), then what happened, for people.
        write_status(object, ctx, status, &outcome).await?;
        if pass == Pass::Live {
            for (type_, reason, note) in events {
                ctx.recorder.tell(&regarding, type_, reason, note).await;
            }
            if let Some(warning) = transition_warning(object, &outcome) {
                let note = outcome.message().to_owned();
                ctx.recorder
                    .tell(&regarding, EventType::Warning, warning, note)
                    .await;
            }
            ctx.metrics
                .object_condition(&key, Some(outcome.condition_type()));
            reason = outcome.reason();
        }
    }
    let action = match requeue {
        Requeue::AwaitChange => {
            ctx.backoff.reset(&object_ref);
            Action::await_change()
        }
        // No timer per Ready object in the controller's queue: the drift detector wakes it when
        // its lastSyncTime is due (see `wake_sync_due`).
        Requeue::Resync => {
            ctx.backoff.reset(&object_ref);
            Action::await_change()
        }
        Requeue::StalledRetry => {
            ctx.backoff.reset(&object_ref);
            Action::requeue(ctx.settings.stalled_retry)
        }
        Requeue::Now => Action::requeue(Duration::ZERO),
        Requeue::After(wait) => Action::requeue(wait),
        Requeue::Soon => Action::requeue(Duration::from_secs(1)),
        Requeue::Backoff => Action::requeue(ctx.backoff.next(&object_ref)),
    };
    Ok((action, reason))
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
        "apiVersion": "kmsgrant.io/v1beta1",
        "kind": "KmsGrant",
        "status": status,
    });
    let written = api(object, &ctx.client)
        .patch_status(
            &object.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(patch),
        )
        .await;
    ctx.metrics
        .grant_kube_write("status", written.as_ref().err());
    let written = written.map_err(ReconcileError::Kube)?;
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

/// Waits, briefly, until the object cache shows the finalizer patch just made: the finalizer
/// there (`present`) or not, or the object gone (a release deletes it). A reconcile of the object
/// queued meanwhile (the drift detector wakes every object on a key whose grants changed, so a
/// revoke wakes the objects being deleted beside it) starts from the cache once this one returns;
/// from the version before the patch it would patch again — after a release, an object already
/// gone (one wasted write per such object; 45 for 2,000 deletions before this wait).
async fn until_finalizer_cached(ctx: &Context, object: &KmsGrant, present: bool) {
    let object_ref = ObjectRef::from_obj(object);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    loop {
        match ctx.grants.get(&object_ref) {
            Some(cached)
                if cached.uid() == object.uid()
                    && cached.finalizers().iter().any(|f| f == FINALIZER) != present => {}
            // Cached, or gone from the cache (deleted, or no longer selected).
            _ => return,
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::debug!("the object cache does not show the finalizer patch yet");
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The Warning to publish when the object enters a failing state: once per transition, not per
/// retry.
fn transition_warning(object: &KmsGrant, outcome: &Outcome) -> Option<&'static str> {
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
        return None;
    }
    if matches!(outcome, Outcome::Progressing { reason, .. } if *reason == reasons::CREATING || *reason == reasons::REPLACING)
    {
        return None;
    }
    Some(outcome.reason())
}

/// Publishes events. Warnings go through kube's recorder, which folds a repeat (the same reason
/// on the same object within six minutes) into a series. Normal events each record one action
/// (a grant created, adopted, revoked) that does not repeat, so they are posted directly: the
/// recorder would keep every one of them for six minutes and scan them all on each publish,
/// which at 10,000 objects is memory and time that grow with N.
pub(super) struct Events {
    recorder: Recorder,
    client: Client,
    reporter: Reporter,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
}

impl Events {
    pub(super) fn new(
        client: Client,
        reporter: Reporter,
        metrics: std::sync::Arc<crate::metrics::Metrics>,
    ) -> Self {
        Self {
            recorder: Recorder::new(client.clone(), reporter.clone()),
            client,
            reporter,
            metrics,
        }
    }

    /// Publishes one event about `regarding`; a failure is logged, never fatal.
    pub(super) async fn tell(
        &self,
        regarding: &ObjectReference,
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
        let published = self.publish(&event, regarding).await;
        self.metrics
            .grant_kube_write("event", published.as_ref().err());
        if let Err(err) = published {
            tracing::warn!(error = %err, "cannot publish event");
        }
    }

    pub(super) async fn publish(
        &self,
        event: &Event,
        regarding: &ObjectReference,
    ) -> Result<(), kube::Error> {
        if event.type_ == EventType::Warning {
            return self.recorder.publish(event, regarding).await;
        }
        let now = k8s_openapi::jiff::Timestamp::now();
        let namespace = regarding.namespace.as_deref().unwrap_or("default");
        let controller = &self.reporter.controller;
        let posted = EventsV1 {
            metadata: ObjectMeta {
                namespace: Some(namespace.to_owned()),
                name: Some(format!(
                    "{}.{:x}",
                    regarding.name.as_deref().unwrap_or(controller),
                    now.as_nanosecond()
                )),
                ..ObjectMeta::default()
            },
            action: Some(event.action.clone()),
            reason: Some(event.reason.clone()),
            note: event.note.clone(),
            event_time: Some(MicroTime(now)),
            regarding: Some(regarding.clone()),
            related: event.secondary.clone(),
            reporting_controller: Some(controller.clone()),
            reporting_instance: Some(
                self.reporter
                    .instance
                    .clone()
                    .unwrap_or_else(|| controller.clone()),
            ),
            type_: Some("Normal".into()),
            ..EventsV1::default()
        };
        Api::<EventsV1>::namespaced(self.client.clone(), namespace)
            .create(&PostParams::default(), &posted)
            .await
            .map(|_| ())
    }
}

/// Per-object exponential backoff: `min` doubling to `max`, reset on success.
pub(super) struct Backoff {
    failures: Mutex<HashMap<ObjectRef<KmsGrant>, u32>>,
    min: Duration,
    max: Duration,
}

impl Backoff {
    pub(super) fn new(min: Duration, max: Duration) -> Self {
        Self {
            failures: Mutex::default(),
            min,
            max,
        }
    }

    pub(super) fn next(&self, object: &ObjectRef<KmsGrant>) -> Duration {
        let mut failures = self.failures.lock().expect("backoff lock");
        let count = failures.entry(object.clone()).or_default();
        let delay = self
            .min
            .saturating_mul(1u32 << (*count).min(20))
            .min(self.max);
        *count = count.saturating_add(1);
        // ±20 % so objects failing together spread out.
        delay.mul_f64(0.8 + 0.4 * fastrand::f64())
    }

    pub(super) fn reset(&self, object: &ObjectRef<KmsGrant>) {
        self.failures.lock().expect("backoff lock").remove(object);
    }
}
