//! Namespace labels for `namespaceSelector` checks, from one metadata watch of Namespaces instead
//! of a GET per reconcile. The watch starts on first use (only a provider config with a selector
//! needs it) and stops with the controller. A namespace the watch has not seen yet is read once
//! with a GET, so a brand-new namespace is never judged on missing labels. A namespace whose
//! labels change wakes its KmsGrants: Ready objects are not re-checked every resync.

use std::collections::{BTreeMap, HashMap};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::Api;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use tokio::sync::OnceCell;
use tokio::sync::mpsc::UnboundedSender;

use crate::api::KmsGrant;

/// How long a check waits for the watch's first listing before it GETs the namespace instead.
const READY_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

pub struct NamespaceLabels {
    client: Client,
    /// The grant cache and the controller's queue, to wake the objects of a relabelled namespace.
    wake: (Store<KmsGrant>, UnboundedSender<ObjectRef<KmsGrant>>),
    watch: OnceCell<(
        Store<PartialObjectMeta<Namespace>>,
        tokio::task::JoinHandle<()>,
    )>,
}

impl NamespaceLabels {
    pub fn new(
        client: Client,
        grants: Store<KmsGrant>,
        wake: UnboundedSender<ObjectRef<KmsGrant>>,
    ) -> Self {
        Self {
            client,
            wake: (grants, wake),
            watch: OnceCell::new(),
        }
    }

    /// The labels of `namespace` (empty when it does not exist).
    pub async fn labels(&self, namespace: &str) -> Result<BTreeMap<String, String>, kube::Error> {
        let (store, _) = self
            .watch
            .get_or_init(|| async {
                let (store, writer) = reflector::store();
                let api: Api<PartialObjectMeta<Namespace>> = Api::all(self.client.clone());
                let (grants, wake) = self.wake.clone();
                let task = async move {
                    let mut stream = std::pin::pin!(
                        watcher::watcher(api, watcher::Config::default())
                            .default_backoff()
                            .reflect(writer)
                            .applied_objects()
                    );
                    let mut seen: HashMap<String, BTreeMap<String, String>> = HashMap::new();
                    while let Some(event) = stream.next().await {
                        let namespace = match event {
                            Ok(namespace) => namespace,
                            Err(err) => {
                                tracing::warn!(error = %err, "watching namespaces failed; retrying");
                                continue;
                            }
                        };
                        let name = namespace.name_any();
                        let labels = namespace.labels().clone();
                        let relabelled = seen
                            .insert(name.clone(), labels.clone())
                            .is_some_and(|before| before != labels);
                        if relabelled {
                            tracing::debug!(namespace = %name, "namespace labels changed; waking its grants");
                            for grant in grants.state() {
                                if grant.metadata.namespace.as_deref() == Some(name.as_str()) {
                                    let _ = wake.send(ObjectRef::from_obj(grant.as_ref()));
                                }
                            }
                        }
                    }
                };
                (store, tokio::spawn(task))
            })
            .await;
        // Without list/watch rights the watch never fills: then every check is a GET, as before.
        let ready = tokio::time::timeout(READY_WAIT, store.wait_until_ready()).await;
        if matches!(ready, Ok(Ok(())))
            && let Some(cached) = store.get(&ObjectRef::new(namespace))
        {
            return Ok(cached.labels().clone());
        }
        tracing::debug!(namespace, ?ready, "namespace not in the watch; reading it");
        Ok(Api::<Namespace>::all(self.client.clone())
            .get_metadata_opt(namespace)
            .await?
            .map(|ns| ns.labels().clone())
            .unwrap_or_default())
    }
}

impl Drop for NamespaceLabels {
    fn drop(&mut self) {
        if let Some((_, task)) = self.watch.get() {
            task.abort();
        }
    }
}
