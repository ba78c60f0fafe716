//! Moving what the cluster stores from `kmsgrant.io/v1alpha1` to `v1beta1` (docs/versioning.md).
//!
//! Two jobs, both run by the leader (and by `kmsgrant-operator migrate --cluster` for clusters that
//! keep the operator's rights narrow):
//!
//! 1. [`preserve_legacy_grant_names`], before any controller writes: a KmsGrant stored with the
//!    removed `spec.name` gets its value in the annotation `kmsgrant.io/legacy-grant-name` and one
//!    Warning event, in the same write that lets the API server drop the field. That value is the
//!    only pointer to a grant an earlier version deliberately left on KMS.
//! 2. [`migrate_storage`]: once the CRDs store `v1beta1`, every stored object is rewritten at
//!    `v1beta1` (a no-op patch re-encodes it), `managedFields` entries of `v1alpha1` are rewritten
//!    to `v1beta1` (server-side apply would fail on them once `v1alpha1` is gone), then
//!    `status.storedVersions` is set to `[v1beta1]` and read back. Paged, resumable (progress is
//!    kept in an annotation on the CRD) and idempotent.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event as K8sEvent;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, DynamicObject, ListParams, ObjectList, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::{Client, ResourceExt};
use serde_json::json;

use crate::api::GROUP;
use crate::api::versions::{
    API_VERSION, DEPRECATED_API_VERSION, DEPRECATED_VERSION, LEGACY_GRANT_NAME_ANNOTATION, VERSION,
};

/// The field manager of every write here.
pub const FIELD_MANAGER: &str = "kmsgrant-operator";
/// Progress of a storage migration, on the CRD: `{"generation": G, "after": "ns/name"}` while it
/// runs, `{"generation": G, "done": true}` when it is complete.
pub const PROGRESS_ANNOTATION: &str = "kmsgrant.io/storage-migration";
/// Objects per list page.
const PAGE: u32 = 500;
/// Objects per page of the legacy-name scan: it runs at every start, beside the grant cache's
/// first list, and its page bodies are what it holds (see `controller::GRANT_LIST_PAGE`).
const SCAN_PAGE: u32 = 100;

/// The three kinds: CRD name, kind, plural, namespaced.
pub const KINDS: [(&str, &str, &str, bool); 3] = [
    ("kmsgrants.kmsgrant.io", "KmsGrant", "kmsgrants", true),
    (
        "kmsproviderconfigs.kmsgrant.io",
        "KmsProviderConfig",
        "kmsproviderconfigs",
        false,
    ),
    (
        "kmskeypolicies.kmsgrant.io",
        "KmsKeyPolicy",
        "kmskeypolicies",
        false,
    ),
];

/// Why a migration step failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error("the Kubernetes API refused {what}: {source}")]
    Kube {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("{crd}: status.storedVersions is still {stored:?} after it was set to [{VERSION}]")]
    NotVerified { crd: String, stored: Vec<String> },
}

fn write_params() -> PatchParams {
    PatchParams {
        field_manager: Some(FIELD_MANAGER.to_owned()),
        ..PatchParams::default()
    }
}

fn kube_error(what: impl Into<String>) -> impl FnOnce(kube::Error) -> MigrationError {
    let what = what.into();
    move |source| MigrationError::Kube { what, source }
}

fn resource(kind: &str, plural: &str, version: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(GROUP, version, kind), plural)
}

/// What one run did, per kind.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct KindReport {
    pub kind: String,
    /// `status.storedVersions` before the run.
    pub stored_before: Vec<String>,
    /// Objects rewritten at the storage version.
    pub rewritten: u64,
    /// Of those, objects whose `managedFields` named `v1alpha1`.
    pub managed_fields_rewritten: u64,
    /// Nothing to do: the CRD stores `v1alpha1` still, or everything was already done.
    pub skipped: Option<String>,
}

/// Whether a `managedFields` entry names the retired version.
fn names_deprecated_version(entry: &serde_json::Value) -> bool {
    entry.get("apiVersion").and_then(|v| v.as_str()) == Some(DEPRECATED_API_VERSION)
}

/// The object's `managedFields` with every `v1alpha1` entry moved to `v1beta1` and the removed
/// `spec.name` taken out of its field set. `None` when no entry names `v1alpha1`.
pub fn rewritten_managed_fields(managed: &[serde_json::Value]) -> Option<Vec<serde_json::Value>> {
    if !managed.iter().any(names_deprecated_version) {
        return None;
    }
    Some(
        managed
            .iter()
            .map(|entry| {
                let mut entry = entry.clone();
                if names_deprecated_version(&entry) {
                    entry["apiVersion"] = json!(API_VERSION);
                    if let Some(spec) = entry
                        .pointer_mut("/fieldsV1/f:spec")
                        .and_then(|s| s.as_object_mut())
                    {
                        spec.remove("f:name");
                    }
                }
                entry
            })
            .collect(),
    )
}

/// Posts one event about `regarding` (events about cluster-scoped objects live in `default`).
async fn post_event(
    client: &Client,
    regarding: ObjectReference,
    type_: &str,
    reason: &str,
    note: String,
) {
    let namespace = regarding
        .namespace
        .clone()
        .unwrap_or_else(|| "default".to_owned());
    let events: Api<K8sEvent> = Api::namespaced(client.clone(), &namespace);
    let now = jiff::Timestamp::now();
    let event = K8sEvent {
        metadata: ObjectMeta {
            name: Some(format!(
                "{}.{:x}",
                regarding.name.as_deref().unwrap_or("kmsgrant"),
                now.as_nanosecond()
            )),
            ..ObjectMeta::default()
        },
        event_time: Some(MicroTime(now)),
        type_: Some(type_.into()),
        reason: Some(reason.into()),
        action: Some("Migrate".into()),
        note: Some(note),
        regarding: Some(regarding),
        reporting_controller: Some(FIELD_MANAGER.to_owned()),
        reporting_instance: Some(
            std::env::var("HOSTNAME").unwrap_or_else(|_| FIELD_MANAGER.to_owned()),
        ),
        ..K8sEvent::default()
    };
    if let Err(err) = events.create(&Default::default(), &event).await {
        tracing::warn!(error = %err, reason, "cannot publish event");
    }
}

fn reference(metadata: &LegacyMeta, api_version: &str, kind: &str) -> ObjectReference {
    ObjectReference {
        api_version: Some(api_version.to_owned()),
        kind: Some(kind.to_owned()),
        name: metadata.name.clone(),
        namespace: metadata.namespace.clone(),
        uid: metadata.uid.clone(),
        resource_version: metadata.resource_version.clone(),
        ..ObjectReference::default()
    }
}

/// What [`preserve_legacy_grant_names`] reads of a KmsGrant listed at `v1alpha1`; the rest of
/// the object (status, managedFields) is skipped while decoding.
#[derive(Clone, Debug, serde::Deserialize)]
struct LegacyGrant {
    metadata: LegacyMeta,
    #[serde(default)]
    spec: LegacySpec,
}

#[derive(Clone, Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct LegacyMeta {
    name: Option<String>,
    namespace: Option<String>,
    uid: Option<String>,
    resource_version: Option<String>,
    annotations: Option<BTreeMap<String, String>>,
}

#[derive(Clone, Debug, Default, serde::Deserialize)]
struct LegacySpec {
    /// Whatever the stored object holds; only a string is a name.
    name: Option<serde_json::Value>,
}

/// The note of the Warning event for a preserved `spec.name`.
pub fn legacy_grant_name_note(value: &str) -> String {
    format!(
        "spec.name {value:?} was removed in kmsgrant.io/v1beta1; its value is kept in the annotation \
         {LEGACY_GRANT_NAME_ANNOTATION}. An earlier version of the operator left the grant of that \
         name on KMS: to manage it with this object, set spec.importGrantId to its ID (`kmsgrant-operator \
         import --key-id KEY` lists the key's grants with their names); if nobody needs it, revoke it on KMS"
    )
}

/// Copies each stored `spec.name` of a KmsGrant into the annotation [`LEGACY_GRANT_NAME_ANNOTATION`]
/// and reports it once as a Warning event `LegacyGrantName`. Reads at `v1alpha1` (the only version
/// that still shows the field); does nothing when `v1alpha1` is not served any more. Returns how
/// many objects were annotated.
pub async fn preserve_legacy_grant_names(
    client: &Client,
    namespace: Option<&str>,
    dry_run: bool,
) -> Result<Vec<(String, String)>, MigrationError> {
    use kube::Resource;
    let resource = resource("KmsGrant", "kmsgrants", DEPRECATED_VERSION);
    let lists = kube::core::Request::new(DynamicObject::url_path(&resource, namespace));
    let mut found = Vec::new();
    let mut params = ListParams::default().limit(SCAN_PAGE);
    loop {
        // Only the fields looked at are decoded: the operator runs this at every start, while its
        // caches fill, and a page of whole objects would be megabytes.
        let listed = match lists.list(&params) {
            Ok(request) => client.request::<ObjectList<LegacyGrant>>(request).await,
            Err(err) => Err(kube::Error::BuildRequest(err)),
        };
        let page = match listed {
            Ok(page) => page,
            // v1alpha1 not served (or the CRD not installed): nothing can hold the field.
            Err(kube::Error::Api(status)) if status.code == 404 => return Ok(found),
            Err(source) => {
                return Err(MigrationError::Kube {
                    what: "listing KmsGrants at v1alpha1".into(),
                    source,
                });
            }
        };
        for object in &page.items {
            let Some(value) = object
                .spec
                .name
                .as_ref()
                .and_then(|v| v.as_str())
                .filter(|v| !v.is_empty())
            else {
                continue;
            };
            if object
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(LEGACY_GRANT_NAME_ANNOTATION))
                .map(String::as_str)
                == Some(value)
            {
                continue;
            }
            let (object_namespace, object_name) = (
                object.metadata.namespace.clone().unwrap_or_default(),
                object.metadata.name.clone().unwrap_or_default(),
            );
            let key = format!("{object_namespace}/{object_name}");
            found.push((key.clone(), value.to_owned()));
            if dry_run {
                continue;
            }
            let namespaced: Api<DynamicObject> =
                Api::namespaced_with(client.clone(), &object_namespace, &resource);
            let patch = json!({"metadata": {
                "annotations": {LEGACY_GRANT_NAME_ANNOTATION: value},
                "resourceVersion": object.metadata.resource_version,
            }});
            match namespaced
                .patch(&object_name, &write_params(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    tracing::warn!(object = %key, legacy_grant_name = value, "kept the removed spec.name in an annotation");
                    post_event(
                        client,
                        reference(&object.metadata, DEPRECATED_API_VERSION, "KmsGrant"),
                        "Warning",
                        "LegacyGrantName",
                        legacy_grant_name_note(value),
                    )
                    .await;
                }
                // Changed meanwhile: the next run sees it again.
                Err(kube::Error::Api(status)) if status.code == 409 || status.code == 404 => {}
                Err(source) => {
                    return Err(MigrationError::Kube {
                        what: format!("annotating KmsGrant {key}"),
                        source,
                    });
                }
            }
        }
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(token) => params = params.continue_token(&token),
            None => return Ok(found),
        }
    }
}

/// The progress kept on a CRD.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Progress {
    generation: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    after: Option<String>,
    #[serde(default)]
    done: bool,
}

fn progress_of(crd: &CustomResourceDefinition) -> Option<Progress> {
    crd.annotations()
        .get(PROGRESS_ANNOTATION)
        .and_then(|text| serde_json::from_str(text).ok())
}

async fn save_progress(
    crds: &Api<CustomResourceDefinition>,
    name: &str,
    progress: &Progress,
) -> Result<(), MigrationError> {
    let text = serde_json::to_string(progress).expect("progress serialises");
    crds.patch(
        name,
        &write_params(),
        &Patch::Merge(json!({"metadata": {"annotations": {PROGRESS_ANNOTATION: text}}})),
    )
    .await
    .map(|_| ())
    .map_err(kube_error(format!("recording progress on CRD {name}")))
}

/// How the migration reports progress (the operator's metrics; nothing for the CLI).
pub trait ProgressSink: Send + Sync {
    fn object_rewritten(&self, kind: &str, managed_fields: bool);
    fn kind_migrated(&self, kind: &str, done: bool);
}

impl ProgressSink for () {
    fn object_rewritten(&self, _: &str, _: bool) {}
    fn kind_migrated(&self, _: &str, _: bool) {}
}

/// Rewrites every stored object of the three kinds at `v1beta1` and moves `storedVersions` to
/// `[v1beta1]`, for each CRD that stores `v1beta1`. With `dry_run`, counts what it would do.
/// With `force`, also a CRD already migrated at its generation (managedFields written at
/// `v1alpha1` since are rewritten).
pub async fn migrate_storage(
    client: &Client,
    dry_run: bool,
    force: bool,
    sink: &dyn ProgressSink,
) -> Result<Vec<KindReport>, MigrationError> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut reports = Vec::new();
    for (crd_name, kind, plural, namespaced) in KINDS {
        let crd = crds
            .get(crd_name)
            .await
            .map_err(kube_error(format!("reading CRD {crd_name}")))?;
        let stored: Vec<String> = crd
            .status
            .as_ref()
            .and_then(|s| s.stored_versions.clone())
            .unwrap_or_default();
        let storage = crd
            .spec
            .versions
            .iter()
            .find(|v| v.storage)
            .map(|v| v.name.clone())
            .unwrap_or_default();
        let generation = crd.metadata.generation.unwrap_or_default();
        let mut report = KindReport {
            kind: kind.to_owned(),
            stored_before: stored.clone(),
            ..KindReport::default()
        };
        if storage != VERSION {
            report.skipped = Some(format!("the CRD stores {storage}"));
            reports.push(report);
            continue;
        }
        let progress = progress_of(&crd).filter(|p| p.generation == generation);
        if !force && stored == [VERSION] && progress.as_ref().is_some_and(|p| p.done) {
            report.skipped = Some("already migrated at this CRD generation".into());
            sink.kind_migrated(kind, true);
            reports.push(report);
            continue;
        }
        sink.kind_migrated(kind, false);
        let resume_after = progress.filter(|p| !p.done).and_then(|p| p.after);
        if !dry_run {
            post_event(
                client,
                crd_reference(&crd),
                "Normal",
                "StorageMigrationStarted",
                format!(
                    "rewriting every {kind} at {API_VERSION} (stored versions: {stored:?}{})",
                    resume_after
                        .as_deref()
                        .map(|a| format!(", resuming after {a}"))
                        .unwrap_or_default()
                ),
            )
            .await;
        }
        let resource = resource(kind, plural, VERSION);
        let all: Api<DynamicObject> = Api::all_with(client.clone(), &resource);
        let mut params = ListParams::default().limit(PAGE);
        let mut since_saved = 0u32;
        loop {
            let page = all
                .list(&params)
                .await
                .map_err(kube_error(format!("listing {kind}s")))?;
            for object in &page.items {
                let key = format!(
                    "{}/{}",
                    object.namespace().unwrap_or_default(),
                    object.name_any()
                );
                if resume_after
                    .as_deref()
                    .is_some_and(|after| key.as_str() <= after)
                {
                    continue;
                }
                let api: Api<DynamicObject> = if namespaced {
                    Api::namespaced_with(
                        client.clone(),
                        &object.namespace().unwrap_or_default(),
                        &resource,
                    )
                } else {
                    Api::all_with(client.clone(), &resource)
                };
                let managed = rewrite_one(&api, object, dry_run).await?;
                if let Some(managed) = managed {
                    report.rewritten += 1;
                    if managed {
                        report.managed_fields_rewritten += 1;
                    }
                    sink.object_rewritten(kind, managed);
                }
                since_saved += 1;
                if since_saved >= 100 && !dry_run {
                    since_saved = 0;
                    let progress = Progress {
                        generation,
                        after: Some(key.clone()),
                        done: false,
                    };
                    save_progress(&crds, crd_name, &progress).await?;
                }
            }
            match page.metadata.continue_.clone().filter(|c| !c.is_empty()) {
                Some(token) => params = params.continue_token(&token),
                None => break,
            }
        }
        if dry_run {
            reports.push(report);
            continue;
        }
        if stored != [VERSION] {
            crds.patch_status(
                crd_name,
                &write_params(),
                &Patch::Merge(json!({"status": {"storedVersions": [VERSION]}})),
            )
            .await
            .map_err(kube_error(format!(
                "setting status.storedVersions of {crd_name}"
            )))?;
            let after = crds
                .get(crd_name)
                .await
                .map_err(kube_error(format!("reading CRD {crd_name}")))?;
            let now: Vec<String> = after
                .status
                .and_then(|s| s.stored_versions)
                .unwrap_or_default();
            if now != [VERSION] {
                return Err(MigrationError::NotVerified {
                    crd: crd_name.to_owned(),
                    stored: now,
                });
            }
        }
        save_progress(
            &crds,
            crd_name,
            &Progress {
                generation,
                after: None,
                done: true,
            },
        )
        .await?;
        sink.kind_migrated(kind, true);
        post_event(
            client,
            crd_reference(&crd),
            "Normal",
            "StorageMigrated",
            format!(
                "every {kind} is stored at {API_VERSION} ({} rewritten, {} with managedFields of \
                 {DEPRECATED_API_VERSION}); status.storedVersions is [{VERSION}]",
                report.rewritten, report.managed_fields_rewritten
            ),
        )
        .await;
        reports.push(report);
    }
    Ok(reports)
}

fn crd_reference(crd: &CustomResourceDefinition) -> ObjectReference {
    ObjectReference {
        api_version: Some("apiextensions.k8s.io/v1".into()),
        kind: Some("CustomResourceDefinition".into()),
        name: crd.metadata.name.clone(),
        uid: crd.metadata.uid.clone(),
        ..ObjectReference::default()
    }
}

/// Rewrites one object at the storage version: `managedFields` of `v1alpha1` moved to `v1beta1`
/// (on the object, guarded by its `resourceVersion`), else a no-op patch through `/status`, which
/// the admission guardrails do not see. `Some(true)` when its `managedFields` were rewritten,
/// `None` when it was gone.
async fn rewrite_one(
    api: &Api<DynamicObject>,
    object: &DynamicObject,
    dry_run: bool,
) -> Result<Option<bool>, MigrationError> {
    let name = object.name_any();
    let mut current = object.clone();
    for _attempt in 0..5 {
        let managed: Vec<serde_json::Value> = current
            .metadata
            .managed_fields
            .iter()
            .flatten()
            .map(|entry| serde_json::to_value(entry).expect("managedFields serialise"))
            .collect();
        let rewritten = rewritten_managed_fields(&managed);
        if dry_run {
            return Ok(Some(rewritten.is_some()));
        }
        let result = match &rewritten {
            // A merge patch replaces the whole list; the resourceVersion makes it conditional.
            Some(entries) => {
                let patch = json!({"metadata": {
                    "managedFields": entries,
                    "resourceVersion": current.resource_version(),
                }});
                api.patch(&name, &write_params(), &Patch::Merge(&patch))
                    .await
            }
            None => {
                api.patch_status(&name, &write_params(), &Patch::Merge(json!({})))
                    .await
            }
        };
        match result {
            Ok(_) => return Ok(Some(rewritten.is_some())),
            Err(kube::Error::Api(status)) if status.code == 404 => return Ok(None),
            // Changed meanwhile (the test op failed): look again.
            Err(kube::Error::Api(status)) if status.code == 409 || status.code == 422 => {
                match api.get_opt(&name).await {
                    Ok(Some(fresh)) => current = fresh,
                    Ok(None) => return Ok(None),
                    Err(source) => {
                        return Err(MigrationError::Kube {
                            what: format!("reading {name}"),
                            source,
                        });
                    }
                }
            }
            Err(source) => {
                return Err(MigrationError::Kube {
                    what: format!("rewriting {name}"),
                    source,
                });
            }
        }
    }
    // Kept changing: every write since stored it at the storage version anyway; its
    // managedFields are checked again at the next run.
    Ok(Some(false))
}

/// What still holds `v1alpha1`: the CRDs whose `storedVersions` name it, and the objects whose
/// `managedFields` do. Empty when serving `v1alpha1` can stop.
pub async fn remaining_uses(client: &Client) -> Result<Vec<String>, MigrationError> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut remaining = Vec::new();
    for (crd_name, kind, plural, _) in KINDS {
        let Some(crd) = crds
            .get_opt(crd_name)
            .await
            .map_err(kube_error(format!("reading CRD {crd_name}")))?
        else {
            continue;
        };
        let stored: Vec<String> = crd
            .status
            .as_ref()
            .and_then(|s| s.stored_versions.clone())
            .unwrap_or_default();
        if stored.iter().any(|v| v != VERSION) {
            remaining.push(format!(
                "CRD {crd_name}: status.storedVersions is {stored:?} (objects may still be stored at \
                 {DEPRECATED_VERSION}): run `kmsgrant-operator migrate --cluster`"
            ));
        }
        let all: Api<DynamicObject> =
            Api::all_with(client.clone(), &resource(kind, plural, VERSION));
        let mut params = ListParams::default().limit(PAGE);
        let mut managing: BTreeMap<String, u64> = BTreeMap::new();
        loop {
            let page = match all.list(&params).await {
                Ok(page) => page,
                Err(kube::Error::Api(status)) if status.code == 404 => break,
                Err(source) => {
                    return Err(MigrationError::Kube {
                        what: format!("listing {kind}s"),
                        source,
                    });
                }
            };
            for object in &page.items {
                for entry in object.metadata.managed_fields.iter().flatten() {
                    if entry.api_version.as_deref() == Some(DEPRECATED_API_VERSION) {
                        let key = format!(
                            "{kind} {}/{}",
                            object.namespace().unwrap_or_default(),
                            object.name_any()
                        );
                        *managing.entry(key).or_default() += 1;
                    }
                }
            }
            match page.metadata.continue_.clone().filter(|c| !c.is_empty()) {
                Some(token) => params = params.continue_token(&token),
                None => break,
            }
        }
        for (key, _) in managing {
            remaining.push(format!(
                "{key}: managedFields name {DEPRECATED_API_VERSION}: run `kmsgrant-operator migrate --cluster`"
            ));
        }
    }
    Ok(remaining)
}

/// The leader's part: keep legacy names, then migrate storage, again whenever a CRD's generation
/// changes (checked every `interval`). Never gives up: errors are logged, retried later, and
/// leave every object as it was.
pub async fn run_as_leader(
    client: Client,
    sink: std::sync::Arc<dyn ProgressSink>,
    interval: Duration,
) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut seen: BTreeMap<String, i64> = BTreeMap::new();
    loop {
        let mut generations = BTreeMap::new();
        for (crd_name, ..) in KINDS {
            if let Ok(crd) = crds.get(crd_name).await {
                generations.insert(
                    crd_name.to_owned(),
                    crd.metadata.generation.unwrap_or_default(),
                );
            }
        }
        if generations != seen {
            match migrate_storage(&client, false, false, sink.as_ref()).await {
                Ok(reports) => {
                    for report in reports {
                        tracing::info!(
                            kind = report.kind,
                            rewritten = report.rewritten,
                            managed_fields = report.managed_fields_rewritten,
                            skipped = report.skipped.as_deref().unwrap_or(""),
                            "storage migration"
                        );
                    }
                    seen = generations;
                }
                Err(err) => {
                    tracing::warn!(error = %err, "storage migration failed; retrying later")
                }
            }
        }
        tokio::time::sleep(interval).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn managed_fields_of_the_old_version_move_and_lose_the_removed_field() {
        let managed = vec![
            json!({"manager": "argocd", "operation": "Apply", "apiVersion": DEPRECATED_API_VERSION,
                   "fieldsType": "FieldsV1",
                   "fieldsV1": {"f:spec": {"f:name": {}, "f:keyId": {}}}}),
            json!({"manager": "kmsgrant-operator", "operation": "Update", "apiVersion": API_VERSION,
                   "subresource": "status", "fieldsType": "FieldsV1",
                   "fieldsV1": {"f:status": {"f:grantId": {}}}}),
        ];
        let rewritten = rewritten_managed_fields(&managed).unwrap();
        assert_eq!(rewritten[0]["apiVersion"], API_VERSION);
        assert_eq!(rewritten[0]["manager"], "argocd");
        assert_eq!(rewritten[0]["fieldsV1"], json!({"f:spec": {"f:keyId": {}}}));
        assert_eq!(rewritten[1], managed[1]);
    }

    #[test]
    fn managed_fields_already_at_the_new_version_need_no_write() {
        let managed = vec![json!({"manager": "kubectl", "apiVersion": API_VERSION})];
        assert_eq!(rewritten_managed_fields(&managed), None);
        assert_eq!(rewritten_managed_fields(&[]), None);
    }

    #[test]
    fn the_legacy_name_event_says_how_to_import_or_revoke_the_grant() {
        let note = legacy_grant_name_note("old-grant");
        assert!(note.contains("\"old-grant\""));
        assert!(note.contains(LEGACY_GRANT_NAME_ANNOTATION));
        assert!(note.contains("spec.importGrantId"));
        assert!(note.contains("revoke"));
    }
}
