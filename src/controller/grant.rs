//! KmsGrant reconcile as one straight line: [`observe`](super::observe) what the object needs,
//! [`decide`](super::plan::decide) what to do, [`execute`](super::execute) it on KMS, and
//! [`report`](super::report) it to Kubernetes. Each step hands the next what it needs and never
//! calls back.

use std::sync::Arc;

use kube::runtime::controller::Action;

use super::{Context, ReconcileError};
use super::{execute, observe, plan, report};
use crate::api::KmsGrant;

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

/// observe → decide → execute → report.
async fn pass(object: &KmsGrant, ctx: &Context) -> Result<(Action, &'static str), ReconcileError> {
    let observed = observe::read(object, ctx).await?;
    let decision = plan::decide(object, observed);
    let done = execute::run(ctx, decision).await?;
    report::write(object, ctx, done).await
}
