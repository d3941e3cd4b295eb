//! The `kube` config source: one kube-runtime watcher per kind (list + watch, resync on
//! relist, reconnect with backoff), turned into the same [`ConfigEvent`]s the files source
//! produces.

use std::collections::HashSet;
use std::fmt::Debug;
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::{ConfigEvent, EventSender, Kind, Object};
use crate::crd::{AuthorizationPolicy, PeerAuthentication, ServiceEntry, WorkloadEntry};

/// Called with a description of every watch error (wired to a metric and a log).
pub type ErrorHook = Arc<dyn Fn(Kind, &str) + Send + Sync>;

/// Watches the Kubernetes API for every kind the controller uses.
pub struct KubeSource {
    client: Client,
    tx: EventSender,
    on_error: ErrorHook,
    node: Option<String>,
}

impl KubeSource {
    /// A source using `client`, sending batches to `tx`.
    pub fn new(client: Client, tx: EventSender, on_error: ErrorHook) -> Self {
        Self {
            client,
            tx,
            on_error,
            node: None,
        }
    }

    /// Restricts the source to what a node agent needs: Namespaces, and Pods scheduled on
    /// `node` (field selector `spec.nodeName`), so a DaemonSet does not mirror the cluster.
    pub fn for_node(mut self, node: impl Into<String>) -> Self {
        self.node = Some(node.into());
        self
    }

    /// Runs until `shutdown`; sends `Synced` once every kind has been listed.
    pub async fn run(self, shutdown: CancellationToken) {
        let (synced_tx, mut synced_rx) = mpsc::channel::<Kind>(16);
        let mut tasks = JoinSet::new();
        let c = &self.client;
        let w = Watch {
            tx: self.tx.clone(),
            synced: synced_tx,
            on_error: self.on_error.clone(),
            shutdown: shutdown.clone(),
        };
        let all = watcher::Config::default();
        tasks.spawn(w.clone().run(
            Api::<Namespace>::all(c.clone()),
            all.clone(),
            Kind::Namespace,
            Object::Namespace,
        ));
        let pods = match &self.node {
            Some(node) => watcher::Config::default().fields(&format!("spec.nodeName={node}")),
            None => all.clone(),
        };
        tasks.spawn(
            w.clone()
                .run(Api::<Pod>::all(c.clone()), pods, Kind::Pod, Object::Pod),
        );
        if self.node.is_none() {
            self.spawn_cluster_kinds(&mut tasks, &w, &all);
        }
        drop(w);
        let kinds = tasks.len();
        let mut synced = HashSet::new();
        let tx = self.tx.clone();
        loop {
            tokio::select! {
                k = synced_rx.recv() => match k {
                    Some(k) => {
                        synced.insert(k);
                        if synced.len() == kinds {
                            tracing::info!("all kinds listed from the Kubernetes API");
                            let _ = tx.send(vec![ConfigEvent::Synced]).await;
                        }
                    }
                    None => break,
                },
                _ = shutdown.cancelled() => break,
            }
        }
        tasks.shutdown().await;
    }

    /// The kinds only the controller needs.
    fn spawn_cluster_kinds(&self, tasks: &mut JoinSet<()>, w: &Watch, all: &watcher::Config) {
        let c = &self.client;
        tasks.spawn(w.clone().run(
            Api::<Service>::all(c.clone()),
            all.clone(),
            Kind::Service,
            Object::Service,
        ));
        tasks.spawn(w.clone().run(
            Api::<EndpointSlice>::all(c.clone()),
            all.clone(),
            Kind::EndpointSlice,
            Object::EndpointSlice,
        ));
        tasks.spawn(w.clone().run(
            Api::<ServiceAccount>::all(c.clone()),
            all.clone(),
            Kind::ServiceAccount,
            Object::ServiceAccount,
        ));
        tasks.spawn(w.clone().run(
            Api::<ServiceEntry>::all(c.clone()),
            all.clone(),
            Kind::ServiceEntry,
            Object::ServiceEntry,
        ));
        tasks.spawn(w.clone().run(
            Api::<WorkloadEntry>::all(c.clone()),
            all.clone(),
            Kind::WorkloadEntry,
            Object::WorkloadEntry,
        ));
        tasks.spawn(w.clone().run(
            Api::<AuthorizationPolicy>::all(c.clone()),
            all.clone(),
            Kind::AuthorizationPolicy,
            Object::AuthorizationPolicy,
        ));
        tasks.spawn(w.clone().run(
            Api::<PeerAuthentication>::all(c.clone()),
            all.clone(),
            Kind::PeerAuthentication,
            Object::PeerAuthentication,
        ));
    }
}

/// What every per-kind watch task shares.
#[derive(Clone)]
struct Watch {
    tx: EventSender,
    synced: mpsc::Sender<Kind>,
    on_error: ErrorHook,
    shutdown: CancellationToken,
}

impl Watch {
    async fn run<K>(self, api: Api<K>, config: watcher::Config, kind: Kind, wrap: fn(K) -> Object)
    where
        K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    {
        let stream = watcher::watcher(api, config).default_backoff();
        let mut stream = std::pin::pin!(stream);
        // Keys currently known to downstream, so a relist can delete what vanished meanwhile.
        let mut known = HashSet::new();
        let mut relist: Option<(Vec<ConfigEvent>, HashSet<_>)> = None;
        let mut first_sync = true;
        loop {
            let mut just_synced = false;
            let event = tokio::select! {
                e = stream.next() => e,
                _ = self.shutdown.cancelled() => return,
            };
            let batch = match event {
                None => return,
                Some(Err(e)) => {
                    (self.on_error)(kind, &e.to_string());
                    continue;
                }
                Some(Ok(Event::Init)) => {
                    relist = Some((Vec::new(), HashSet::new()));
                    continue;
                }
                Some(Ok(Event::InitApply(o))) => {
                    let obj = wrap(o);
                    let (batch, seen) = relist.get_or_insert_with(Default::default);
                    seen.insert(obj.key());
                    batch.push(ConfigEvent::Apply(Arc::new(obj)));
                    continue;
                }
                Some(Ok(Event::InitDone)) => {
                    let (mut batch, seen) = relist.take().unwrap_or_default();
                    for gone in known.difference(&seen) {
                        batch.push(ConfigEvent::Delete(gone.clone()));
                    }
                    known = seen;
                    just_synced = std::mem::take(&mut first_sync);
                    batch
                }
                Some(Ok(Event::Apply(o))) => {
                    let obj = wrap(o);
                    known.insert(obj.key());
                    vec![ConfigEvent::Apply(Arc::new(obj))]
                }
                Some(Ok(Event::Delete(o))) => {
                    let key = wrap(o).key();
                    known.remove(&key);
                    vec![ConfigEvent::Delete(key)]
                }
            };
            if !batch.is_empty() && self.tx.send(batch).await.is_err() {
                return;
            }
            // Only after this kind's first full list went downstream.
            if just_synced {
                let _ = self.synced.send(kind).await;
            }
        }
    }
}
