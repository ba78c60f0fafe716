//! KmsGrant reconcile as one straight line: [`observe`](super::observe) what the object needs,
//! [`decide`](super::plan::decide) what to do, [`execute`](super::execute) it on KMS, and
//! [`report`](super::report) it to Kubernetes. Each step hands the next what it needs and never
//! calls back.

use std::sync::Arc;

use kube::runtime::controller::Action;

use super::fairness::Admission;
use super::{Context, ReconcileError};
use super::{execute, observe, plan, report};
use crate::api::{KmsGrant, ProviderConfigKind};

#[tracing::instrument(name = "reconcile", skip_all, fields(
    kind = "KmsGrant",
    namespace = object.metadata.namespace.as_deref().unwrap_or_default(),
    name = object.metadata.name.as_deref().unwrap_or_default(),
    key = object.spec.key_label(),
))]
pub async fn reconcile(object: Arc<KmsGrant>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    let started = std::time::Instant::now();
    let result = pass(&object, &ctx).await;
    let (outcome, reason) = match &result {
        Ok((_, reason)) => ("ok", *reason),
        Err(err) => ("error", err.reason()),
    };
    ctx.metrics
        .reconciled("KmsGrant", outcome, reason, started.elapsed());
    result.map(|(action, _)| action)
}

/// How long a reconcile within its fair share waits in the worker for a free slot.
const MAX_SLOT_WAIT: std::time::Duration = std::time::Duration::from_secs(5);
/// How often it looks again meanwhile (a release also wakes it).
const SLOT_POLL: std::time::Duration = std::time::Duration::from_millis(100);

/// observe → decide → (a fair share of KMS work) → execute → report.
async fn pass(object: &KmsGrant, ctx: &Context) -> Result<(Action, &'static str), ReconcileError> {
    if object.metadata.deletion_timestamp.is_some()
        && object.spec.provider_config_ref.kind == ProviderConfigKind::KmsNamespacedProviderConfig
    {
        // Going, it no longer holds a place under its namespace's object limit.
        ctx.wake_over_limit(object.metadata.namespace.as_deref().unwrap_or_default());
    }
    let observed = observe::read(object, ctx).await?;
    let decision = plan::decide(object, observed);
    let ticket = match decision.kms_lane() {
        Some(lane) if ctx.settings.fair_scheduling => {
            let namespace = object.metadata.namespace.as_deref().unwrap_or_default();
            let uid = object.metadata.uid.as_deref().unwrap_or_default();
            let mut waited = std::time::Duration::ZERO;
            loop {
                match ctx.fair.ask(lane, namespace, uid) {
                    Admission::Admitted(ticket) => break Some(ticket),
                    Admission::Deferred(delay) => {
                        // Over its share: back to the queue, so the worker walks on to others.
                        ctx.metrics.fair_deferral();
                        return Ok((Action::requeue(delay), "Deferred"));
                    }
                    // Within its share: a slot frees within moments (others over their share
                    // do not get theirs back). Waiting here keeps its place; a bounded wait,
                    // then back to the queue.
                    Admission::Wait if waited < MAX_SLOT_WAIT => {
                        let started = std::time::Instant::now();
                        let _ = tokio::time::timeout(SLOT_POLL, ctx.fair.released()).await;
                        waited += started.elapsed();
                    }
                    Admission::Wait => {
                        ctx.metrics.fair_deferral();
                        return Ok((Action::requeue(SLOT_POLL), "Deferred"));
                    }
                }
            }
        }
        _ => None,
    };
    let done = execute::run(ctx, decision).await?;
    // The slot is for KMS work; the status write that follows needs none.
    drop(ticket);
    report::write(object, ctx, done).await
}
