//! The model: the xDS resources (workloads, services, L4 authorizations) computed from config
//! objects, maintained incrementally.
//!
//! Every event updates the stored inputs and indexes and marks the outputs it may affect
//! ("dirty"); only those outputs are rebuilt, and only the ones whose content changed are
//! reported in the [`ModelDelta`]. Conversion rules follow Istio ambient; the details live in
//! [`workloads`], [`services`] (and `entries` for ServiceEntries), [`policies`] and
//! [`peerauth`]. Golden tests: `testdata/<case>.yaml` → `testdata/<case>.golden.json`
//! (`UPDATE_GOLDEN=1 cargo test -p controller --lib model` regenerates them).

mod entries;
mod index;
pub mod peerauth;
pub mod policies;
pub mod services;
pub mod workloads;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use xds::istio::security::Authorization;
use xds::istio::workload::Address;

use crate::config::{ConfigEvent, Kind, Object, ObjectKey};
use entries::ServiceEntryInfo;
use index::{LabelIndex, Labels, NodeIdentities, NsName, Relation, WorkloadKind, WorkloadRef};
use peerauth::PeerAuthInfo;
use policies::PolicyInfo;
use services::{ServiceInfo, ServiceSource, SliceInfo};
use workloads::{PodInfo, WorkloadEntryInfo};

/// How pods are matched to the Services they back.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EndpointMode {
    /// Evaluate Service selectors over Pods, like the Kubernetes endpoint controller (files mode).
    #[default]
    Selector,
    /// Read membership and resolved ports from EndpointSlices (Kubernetes mode).
    EndpointSlices,
}

/// Static settings of the model.
#[derive(Clone, Debug)]
pub struct ModelConfig {
    /// Cluster id, first part of workload uids.
    pub cluster_id: String,
    /// SPIFFE trust domain of workloads.
    pub trust_domain: String,
    /// DNS suffix of Service hostnames (`<svc>.<ns>.svc.<suffix>`).
    pub domain_suffix: String,
    /// Network of workloads and service VIPs (empty: the default network).
    pub network: String,
    /// Istio's root namespace: mesh-wide policies live here.
    pub root_namespace: String,
    /// How pods are matched to Services.
    pub mode: EndpointMode,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            cluster_id: "Kubernetes".into(),
            trust_domain: "cluster.local".into(),
            domain_suffix: "cluster.local".into(),
            network: String::new(),
            root_namespace: "istio-system".into(),
            mode: EndpointMode::Selector,
        }
    }
}

/// What one [`Model::apply`] changed; `None` means the resource was removed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ModelDelta {
    /// Workload and service resources, by xDS resource name.
    pub addresses: Vec<(String, Option<Address>)>,
    /// L4 authorization policies, by xDS resource name (`<ns>/<name>`).
    pub authorizations: Vec<(String, Option<Authorization>)>,
}

impl ModelDelta {
    /// True if nothing changed.
    pub fn is_empty(&self) -> bool {
        self.addresses.is_empty() && self.authorizations.is_empty()
    }
}

/// An authorization resource the model can rebuild.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum PolicyRef {
    /// From an AuthorizationPolicy.
    Authz(NsName),
    /// From a workload-level PeerAuthentication with port-level settings.
    Peer(NsName),
}

/// Outputs marked for rebuilding by the events of one batch.
#[derive(Default, Debug)]
struct Dirty {
    services: BTreeSet<String>,
    workloads: BTreeSet<WorkloadRef>,
    policies: BTreeSet<PolicyRef>,
}

/// The state computed from config objects.
#[derive(Debug)]
pub struct Model {
    cfg: ModelConfig,
    namespaces: HashMap<String, Labels>,
    pods: HashMap<NsName, PodInfo>,
    services: HashMap<NsName, ServiceInfo>,
    /// Service names per namespace.
    services_by_ns: HashMap<String, BTreeSet<String>>,
    slices: HashMap<NsName, SliceInfo>,
    /// EndpointSlice (ns, name) ↔ the pods (ns, name) it lists.
    slice_pods: Relation<NsName, NsName>,
    /// EndpointSlice (ns, name) ↔ its Service (ns, name).
    slice_service: Relation<NsName, NsName>,
    workload_entries: HashMap<NsName, WorkloadEntryInfo>,
    service_entries: HashMap<NsName, ServiceEntryInfo>,
    /// ServiceEntries with a workloadSelector, per namespace.
    selecting_entries: HashMap<String, BTreeSet<String>>,
    /// Service resource name → the objects that define it (first one wins).
    service_sources: HashMap<String, BTreeSet<ServiceSource>>,
    auth_policies: HashMap<NsName, PolicyInfo>,
    /// Published WORKLOAD_SELECTOR AuthorizationPolicies per namespace.
    selector_policies: HashMap<String, BTreeSet<String>>,
    peer_auths: HashMap<NsName, PeerAuthInfo>,
    /// PeerAuthentication names per namespace.
    peer_auths_by_ns: HashMap<String, BTreeSet<String>>,
    index: LabelIndex,
    node_identities: NodeIdentities,
    addresses: BTreeMap<String, Address>,
    authorizations: BTreeMap<String, Authorization>,
    statuses: HashMap<ObjectKey, String>,
    static_published: bool,
}

impl Model {
    /// An empty model.
    pub fn new(cfg: ModelConfig) -> Self {
        Self {
            cfg,
            namespaces: HashMap::new(),
            pods: HashMap::new(),
            services: HashMap::new(),
            services_by_ns: HashMap::new(),
            slices: HashMap::new(),
            slice_pods: Relation::default(),
            slice_service: Relation::default(),
            workload_entries: HashMap::new(),
            service_entries: HashMap::new(),
            selecting_entries: HashMap::new(),
            service_sources: HashMap::new(),
            auth_policies: HashMap::new(),
            selector_policies: HashMap::new(),
            peer_auths: HashMap::new(),
            peer_auths_by_ns: HashMap::new(),
            index: LabelIndex::default(),
            node_identities: NodeIdentities::default(),
            addresses: BTreeMap::new(),
            authorizations: BTreeMap::new(),
            statuses: HashMap::new(),
            static_published: false,
        }
    }

    /// The model's settings.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Applies a batch of events and returns the resources whose content changed.
    pub fn apply(&mut self, events: Vec<ConfigEvent>) -> ModelDelta {
        let mut dirty = Dirty::default();
        for event in events {
            match event {
                ConfigEvent::Apply(obj) => self.ingest(&obj, &mut dirty),
                ConfigEvent::Delete(key) => self.remove(&key, &mut dirty),
                ConfigEvent::Synced => {}
            }
        }
        self.flush(dirty)
    }

    /// Every current workload and service resource, by name.
    pub fn addresses(&self) -> impl Iterator<Item = (&str, &Address)> {
        self.addresses.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Every current authorization resource, by name.
    pub fn authorizations(&self) -> impl Iterator<Item = (&str, &Authorization)> {
        self.authorizations.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// One workload or service resource by name.
    pub fn address(&self, name: &str) -> Option<&Address> {
        self.addresses.get(name)
    }

    /// One authorization resource by name.
    pub fn authorization(&self, name: &str) -> Option<&Authorization> {
        self.authorizations.get(name)
    }

    /// True if a pod scheduled on `node` runs as `identity` (the CA allows impersonating it).
    pub fn identity_on_node(&self, node: &str, identity: &hbone::Identity) -> bool {
        identity.trust_domain == self.cfg.trust_domain
            && self
                .node_identities
                .contains(node, &identity.namespace, &identity.service_account)
    }

    /// Why an AuthorizationPolicy or PeerAuthentication was changed or skipped on conversion,
    /// or `None` if it converted exactly (or is unknown).
    pub fn policy_status(&self, key: &ObjectKey) -> Option<String> {
        self.statuses.get(key).cloned()
    }

    /// Every policy whose conversion changed or skipped something, with the reason, ordered by
    /// kind, namespace and name.
    pub fn policy_statuses(&self) -> Vec<(ObjectKey, String)> {
        let mut all: Vec<_> = self
            .statuses
            .iter()
            .map(|(k, s)| (k.clone(), s.clone()))
            .collect();
        all.sort_by(|a, b| {
            (a.0.kind.to_string(), &a.0.namespace, &a.0.name).cmp(&(
                b.0.kind.to_string(),
                &b.0.namespace,
                &b.0.name,
            ))
        });
        all
    }

    fn ingest(&mut self, obj: &Arc<Object>, dirty: &mut Dirty) {
        let key = obj.key();
        let id = (key.namespace.clone(), key.name.clone());
        match &**obj {
            Object::Namespace(ns) => {
                let labels = ns.metadata.labels.clone().unwrap_or_default();
                self.set_namespace(&key.name, Some(labels), dirty);
            }
            Object::Pod(pod) => self.set_pod(id, Some(PodInfo::from_pod(pod)), dirty),
            Object::Service(svc) => {
                let info = ServiceInfo::from_service(svc, &key.name, &key.namespace, &self.cfg);
                self.set_service(id, Some(info), dirty);
            }
            Object::EndpointSlice(slice) => {
                let info = SliceInfo::from_slice(slice, &key.namespace);
                self.set_slice(id, Some(info), dirty);
            }
            Object::ServiceAccount(_) => {}
            Object::ServiceEntry(se) => {
                let info = ServiceEntryInfo::from_entry(se, &key.name);
                self.set_service_entry(id, Some(info), dirty);
            }
            Object::WorkloadEntry(we) => {
                self.set_workload_entry(id, Some(WorkloadEntryInfo::from_entry(we)), dirty);
            }
            Object::AuthorizationPolicy(p) => {
                let info = PolicyInfo::from_policy(p, &key.name, &key.namespace, &self.cfg);
                self.set_statuses(&key, info.status.clone());
                self.set_auth_policy(id, Some(info), dirty);
            }
            Object::PeerAuthentication(p) => {
                let info = PeerAuthInfo::from_peer_authentication(p);
                self.set_statuses(&key, info.status.clone());
                self.set_peer_auth(id, Some(info), dirty);
            }
        }
    }

    fn remove(&mut self, key: &ObjectKey, dirty: &mut Dirty) {
        let id = (key.namespace.clone(), key.name.clone());
        match key.kind {
            Kind::Namespace => self.set_namespace(&key.name, None, dirty),
            Kind::Pod => self.set_pod(id, None, dirty),
            Kind::Service => self.set_service(id, None, dirty),
            Kind::EndpointSlice => self.set_slice(id, None, dirty),
            Kind::ServiceAccount => {}
            Kind::ServiceEntry => self.set_service_entry(id, None, dirty),
            Kind::WorkloadEntry => self.set_workload_entry(id, None, dirty),
            Kind::AuthorizationPolicy => {
                self.set_statuses(key, None);
                self.set_auth_policy(id, None, dirty);
            }
            Kind::PeerAuthentication => {
                self.set_statuses(key, None);
                self.set_peer_auth(id, None, dirty);
            }
        }
    }

    fn set_statuses(&mut self, key: &ObjectKey, status: Option<String>) {
        match status {
            Some(s) => {
                if self.statuses.get(key) != Some(&s) {
                    // Users learn here (and on /debug/policy-status) why ztunnel enforces less
                    // or more than the policy says.
                    tracing::warn!(kind = %key.kind, namespace = %key.namespace, name = %key.name, status = %s, "policy converted for ztunnel with changes");
                }
                self.statuses.insert(key.clone(), s);
            }
            None => {
                self.statuses.remove(key);
            }
        }
    }

    fn set_namespace(&mut self, name: &str, labels: Option<Labels>, dirty: &mut Dirty) {
        let old = match labels {
            Some(l) => self.namespaces.insert(name.to_string(), l),
            None => self.namespaces.remove(name),
        };
        // Labels drive enrollment and network of every workload in the namespace, nothing else.
        if old.as_ref() != self.namespaces.get(name) {
            dirty
                .workloads
                .extend(self.index.in_namespace(name).cloned());
        }
    }

    /// Rebuilds everything marked dirty and records what changed.
    fn flush(&mut self, dirty: Dirty) -> ModelDelta {
        let mut delta = ModelDelta::default();
        if !self.static_published {
            self.static_published = true;
            let (name, policy) = peerauth::static_strict_policy(&self.cfg);
            self.put_authorization(name, Some(policy), &mut delta);
        }
        for name in dirty.services {
            let new = self.build_service(&name);
            self.put_address(name, new, &mut delta);
        }
        for r in dirty.workloads {
            let new = self.build_workload(&r);
            self.put_address(r.uid(&self.cfg.cluster_id), new, &mut delta);
        }
        for p in dirty.policies {
            let (name, new) = match &p {
                PolicyRef::Authz(id) => (
                    format!("{}/{}", id.0, id.1),
                    self.auth_policies.get(id).and_then(|i| i.output.clone()),
                ),
                PolicyRef::Peer(id) => (
                    peerauth::converted_name(&id.0, &id.1),
                    self.build_peer_policy(id),
                ),
            };
            self.put_authorization(name, new, &mut delta);
        }
        delta
    }

    fn put_address(&mut self, name: String, new: Option<Address>, delta: &mut ModelDelta) {
        match new {
            Some(a) => {
                if self.addresses.get(&name) != Some(&a) {
                    self.addresses.insert(name.clone(), a.clone());
                    delta.addresses.push((name, Some(a)));
                }
            }
            None => {
                if self.addresses.remove(&name).is_some() {
                    delta.addresses.push((name, None));
                }
            }
        }
    }

    fn put_authorization(
        &mut self,
        name: String,
        new: Option<Authorization>,
        delta: &mut ModelDelta,
    ) {
        match new {
            Some(a) => {
                if self.authorizations.get(&name) != Some(&a) {
                    self.authorizations.insert(name.clone(), a.clone());
                    delta.authorizations.push((name, Some(a)));
                }
            }
            None => {
                if self.authorizations.remove(&name).is_some() {
                    delta.authorizations.push((name, None));
                }
            }
        }
    }

    /// Builds the workload resource of one source, with its services and policies.
    fn build_workload(&self, r: &WorkloadRef) -> Option<Address> {
        let mut w = match r.kind {
            WorkloadKind::Pod => self.pod_workload(r)?,
            WorkloadKind::WorkloadEntry => self.entry_workload(r)?,
            WorkloadKind::ServiceEntryEndpoint => self.endpoint_workload(r)?,
        };
        w.services = self.workload_services(r);
        w.authorization_policies = self.workload_policies(r);
        Some(Address {
            r#type: Some(xds::istio::workload::address::Type::Workload(w)),
        })
    }

    /// Names of the policies a workload must reference, sorted.
    fn workload_policies(&self, r: &WorkloadRef) -> Vec<String> {
        let Some(labels) = self.index.labels(r) else {
            return Vec::new();
        };
        let mut out = self.selected_auth_policies(&r.ns, labels);
        out.extend(self.peer_auth_policies(&r.ns, labels));
        out.sort();
        out.dedup();
        out
    }
}
