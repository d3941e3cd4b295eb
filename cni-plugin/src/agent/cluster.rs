//! What the agent knows of the cluster: namespaces and this node's pods, fed by a config source
//! (files or kube), and the enrollment decision for each pod.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use meshconfig::config::{ConfigEvent, Kind, Object};
use meshconfig::enrollment::pod_captured;

/// A pod's namespace and name.
#[derive(
    Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct PodKey {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl std::fmt::Display for PodKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// What enrollment needs to know about a pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodFacts {
    /// Kubernetes UID (empty if the source has none).
    pub uid: String,
    /// Service account ("default" if unset).
    pub service_account: String,
    /// Pod IPs as reported in status.
    pub ips: Vec<IpAddr>,
    /// True if the agent must capture the pod's traffic.
    pub captured: bool,
}

/// Namespaces and the pods scheduled on this node.
#[derive(Default)]
pub struct ClusterView {
    node: String,
    namespaces: BTreeMap<String, Arc<Object>>,
    pods: BTreeMap<PodKey, Arc<Object>>,
    synced: bool,
}

impl ClusterView {
    /// An empty view for the node called `node`.
    pub fn new(node: impl Into<String>) -> Self {
        Self {
            node: node.into(),
            ..Default::default()
        }
    }

    /// Applies a batch of source events; returns true if anything that affects enrollment
    /// changed.
    pub fn apply(&mut self, batch: Vec<ConfigEvent>) -> bool {
        let mut changed = false;
        for ev in batch {
            match ev {
                ConfigEvent::Synced => {
                    changed |= !self.synced;
                    self.synced = true;
                }
                ConfigEvent::Apply(obj) => match &*obj {
                    Object::Namespace(ns) => {
                        let name = ns.metadata.name.clone().unwrap_or_default();
                        changed = true;
                        self.namespaces.insert(name, obj);
                    }
                    Object::Pod(pod) => {
                        let key = pod_key(pod);
                        if pod_node(pod) == Some(self.node.as_str()) {
                            self.pods.insert(key, obj);
                        } else {
                            // Rescheduled elsewhere or not ours: forget it.
                            self.pods.remove(&key);
                        }
                        changed = true;
                    }
                    _ => {}
                },
                ConfigEvent::Delete(key) => match key.kind {
                    Kind::Namespace => changed |= self.namespaces.remove(&key.name).is_some(),
                    Kind::Pod => {
                        let k = PodKey {
                            namespace: key.namespace,
                            name: key.name,
                        };
                        changed |= self.pods.remove(&k).is_some();
                    }
                    _ => {}
                },
            }
        }
        changed
    }

    /// True once the source delivered its initial state.
    pub fn synced(&self) -> bool {
        self.synced
    }

    /// The facts about one pod of this node, if the source knows it.
    pub fn pod(&self, key: &PodKey) -> Option<PodFacts> {
        let Object::Pod(pod) = &**self.pods.get(key)? else {
            return None;
        };
        let ns = self
            .namespaces
            .get(&key.namespace)
            .and_then(|o| match &**o {
                Object::Namespace(n) => Some(n),
                _ => None,
            });
        Some(facts(ns, pod))
    }

    /// Every pod of this node the source knows.
    pub fn pods(&self) -> impl Iterator<Item = (&PodKey, PodFacts)> {
        self.pods.keys().filter_map(|k| Some((k, self.pod(k)?)))
    }
}

fn facts(ns: Option<&Namespace>, pod: &Pod) -> PodFacts {
    PodFacts {
        uid: pod.metadata.uid.clone().unwrap_or_default(),
        service_account: meshconfig::pod::service_account(pod),
        ips: meshconfig::pod::pod_ips(pod),
        captured: pod_captured(ns, pod),
    }
}

fn pod_key(pod: &Pod) -> PodKey {
    PodKey {
        namespace: pod
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
        name: pod.metadata.name.clone().unwrap_or_default(),
    }
}

fn pod_node(pod: &Pod) -> Option<&str> {
    pod.spec.as_ref()?.node_name.as_deref()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(ns: &str, name: &str, node: &str, labels: &[(&str, &str)]) -> Arc<Object> {
        let mut p = Pod::default();
        p.metadata.namespace = Some(ns.into());
        p.metadata.name = Some(name.into());
        p.metadata.uid = Some(format!("uid-{name}"));
        p.metadata.labels = Some(
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        p.spec = Some(k8s_openapi::api::core::v1::PodSpec {
            node_name: Some(node.into()),
            ..Default::default()
        });
        p.status = Some(k8s_openapi::api::core::v1::PodStatus {
            pod_ip: Some("10.1.0.7".into()),
            ..Default::default()
        });
        Arc::new(Object::Pod(p))
    }

    fn ns(name: &str, ambient: bool) -> Arc<Object> {
        let mut n = Namespace::default();
        n.metadata.name = Some(name.into());
        if ambient {
            n.metadata.labels = Some(
                [("istio.io/dataplane-mode".to_string(), "ambient".to_string())]
                    .into_iter()
                    .collect(),
            );
        }
        Arc::new(Object::Namespace(n))
    }

    fn key(ns: &str, name: &str) -> PodKey {
        PodKey {
            namespace: ns.into(),
            name: name.into(),
        }
    }

    #[test]
    fn namespace_label_change_flips_the_decision_for_its_pods() {
        let mut v = ClusterView::new("node-1");
        v.apply(vec![
            ConfigEvent::Apply(ns("shop", false)),
            ConfigEvent::Apply(pod("shop", "web", "node-1", &[])),
        ]);
        let f = v.pod(&key("shop", "web")).unwrap();
        assert!(!f.captured);
        assert_eq!(f.uid, "uid-web");
        assert_eq!(f.ips, vec!["10.1.0.7".parse::<IpAddr>().unwrap()]);
        assert!(v.apply(vec![ConfigEvent::Apply(ns("shop", true))]));
        assert!(v.pod(&key("shop", "web")).unwrap().captured);
    }

    #[test]
    fn pods_of_other_nodes_are_ignored() {
        let mut v = ClusterView::new("node-1");
        v.apply(vec![
            ConfigEvent::Apply(ns("shop", true)),
            ConfigEvent::Apply(pod("shop", "web", "node-2", &[])),
        ]);
        assert!(v.pod(&key("shop", "web")).is_none());
        assert_eq!(v.pods().count(), 0);
    }
}
