//! The indexed set of workloads, services and policies (plain data, no locking).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use xds::istio::security as sec;
use xds::istio::workload as pb;

use super::convert::{AddressResource, ConversionError};
use super::ids::{NamespacedHostname, NetworkAddress, WorkloadUid};
use super::service::Service;
use super::workload::Workload;
use crate::rbac::{Authorization, PolicyKey, PolicyScope};

/// Everything ztunnel knows, with the indexes the data path needs.
#[derive(Debug, Default)]
pub struct ProxyState {
    workloads: HashMap<WorkloadUid, Arc<Workload>>,
    // Several workloads may share an address (host-network pods); the latest upsert wins lookups
    // and the earlier ones come back when it leaves.
    workloads_by_addr: HashMap<NetworkAddress, Vec<WorkloadUid>>,
    // (namespace, name) -> uids: how a proxy finds the pod it serves on every connection.
    workloads_by_name: HashMap<(String, String), Vec<WorkloadUid>>,
    services: HashMap<NamespacedHostname, Arc<Service>>,
    services_by_vip: HashMap<NetworkAddress, Vec<NamespacedHostname>>,
    // Ordered so round robin sees a stable endpoint order.
    endpoints: HashMap<NamespacedHostname, BTreeSet<WorkloadUid>>,
    policies: HashMap<PolicyKey, Arc<Authorization>>,
    policies_by_namespace: HashMap<String, BTreeSet<PolicyKey>>,
    global_policies: BTreeSet<PolicyKey>,
}

fn index_add<K: std::hash::Hash + Eq, V: PartialEq>(map: &mut HashMap<K, Vec<V>>, k: K, v: V) {
    let list = map.entry(k).or_default();
    list.retain(|x| x != &v);
    list.push(v);
}

fn index_remove<K: std::hash::Hash + Eq, V: PartialEq>(map: &mut HashMap<K, Vec<V>>, k: &K, v: &V) {
    if let Some(list) = map.get_mut(k) {
        list.retain(|x| x != v);
        if list.is_empty() {
            map.remove(k);
        }
    }
}

impl ProxyState {
    /// An empty state.
    pub fn new() -> Self {
        Self::default()
    }

    /// Inserts or replaces a workload (keyed by uid), re-indexing its addresses and services.
    pub fn upsert_workload(&mut self, workload: Workload) {
        self.remove_workload(&workload.uid);
        let uid = workload.uid.clone();
        // Several host-network pods share the node IP; none of them owns it.
        if !workload.host_network {
            for addr in workload.network_addresses() {
                index_add(&mut self.workloads_by_addr, addr, uid.clone());
            }
        }
        let name = (workload.namespace.clone(), workload.name.clone());
        index_add(&mut self.workloads_by_name, name, uid.clone());
        for svc in workload.services.keys() {
            self.endpoints
                .entry(svc.clone())
                .or_default()
                .insert(uid.clone());
        }
        self.workloads.insert(uid, Arc::new(workload));
    }

    /// The workload named `namespace/name` (the latest upserted if several share it).
    pub fn workload_by_name(&self, namespace: &str, name: &str) -> Option<Arc<Workload>> {
        let uids = self
            .workloads_by_name
            .get(&(namespace.to_string(), name.to_string()))?;
        self.workloads.get(uids.last()?).cloned()
    }

    /// Removes a workload; returns whether it existed.
    pub fn remove_workload(&mut self, uid: &WorkloadUid) -> bool {
        let Some(old) = self.workloads.remove(uid) else {
            return false;
        };
        for addr in old.network_addresses() {
            index_remove(&mut self.workloads_by_addr, &addr, uid);
        }
        let name = (old.namespace.clone(), old.name.clone());
        index_remove(&mut self.workloads_by_name, &name, uid);
        for svc in old.services.keys() {
            if let Some(set) = self.endpoints.get_mut(svc) {
                set.remove(uid);
                if set.is_empty() {
                    self.endpoints.remove(svc);
                }
            }
        }
        true
    }

    /// Inserts or replaces a service (keyed by `namespace/hostname`).
    pub fn upsert_service(&mut self, service: Service) {
        let key = service.key();
        self.remove_service(&key);
        for vip in &service.vips {
            index_add(&mut self.services_by_vip, vip.clone(), key.clone());
        }
        self.services.insert(key, Arc::new(service));
    }

    /// Removes a service; returns whether it existed. Its endpoints stay indexed because they
    /// belong to the workloads.
    pub fn remove_service(&mut self, key: &NamespacedHostname) -> bool {
        let Some(old) = self.services.remove(key) else {
            return false;
        };
        for vip in &old.vips {
            index_remove(&mut self.services_by_vip, vip, key);
        }
        true
    }

    /// Inserts or replaces a policy (keyed by `namespace/name`).
    pub fn upsert_policy(&mut self, policy: Authorization) {
        let key = policy.key();
        self.remove_policy(&key);
        match policy.scope {
            PolicyScope::Global => {
                self.global_policies.insert(key.clone());
            }
            PolicyScope::Namespace => {
                self.policies_by_namespace
                    .entry(policy.namespace.clone())
                    .or_default()
                    .insert(key.clone());
            }
            // Applied only through Workload::authorization_policies.
            PolicyScope::WorkloadSelector => {}
        }
        self.policies.insert(key, Arc::new(policy));
    }

    /// Removes a policy; returns whether it existed.
    pub fn remove_policy(&mut self, key: &PolicyKey) -> bool {
        let Some(old) = self.policies.remove(key) else {
            return false;
        };
        self.global_policies.remove(key);
        if let Some(set) = self.policies_by_namespace.get_mut(&old.namespace) {
            set.remove(key);
            if set.is_empty() {
                self.policies_by_namespace.remove(&old.namespace);
            }
        }
        true
    }

    /// The workload owning `addr`, if any.
    pub fn workload_by_ip(&self, addr: &NetworkAddress) -> Option<Arc<Workload>> {
        let uid = self.workloads_by_addr.get(addr)?.last()?;
        self.workloads.get(uid).cloned()
    }

    /// The workload with this uid, if any.
    pub fn workload_by_uid(&self, uid: &WorkloadUid) -> Option<Arc<Workload>> {
        self.workloads.get(uid).cloned()
    }

    /// The service owning the VIP `addr`, if any.
    pub fn service_by_vip(&self, addr: &NetworkAddress) -> Option<Arc<Service>> {
        let key = self.services_by_vip.get(addr)?.last()?;
        self.services.get(key).cloned()
    }

    /// The service with this key, if any.
    pub fn service_by_key(&self, key: &NamespacedHostname) -> Option<Arc<Service>> {
        self.services.get(key).cloned()
    }

    /// Workloads backing service `key`, in uid order (healthy or not).
    pub fn endpoints(&self, key: &NamespacedHostname) -> Vec<Arc<Workload>> {
        self.endpoints
            .get(key)
            .map(|uids| {
                uids.iter()
                    .filter_map(|u| self.workloads.get(u).cloned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The policy with this key, if any.
    pub fn policy(&self, key: &PolicyKey) -> Option<Arc<Authorization>> {
        self.policies.get(key).cloned()
    }

    /// Policies applying to connections to `workload`: global ones, those of its namespace and
    /// those it names, each once.
    pub fn policies_for(&self, workload: &Workload) -> Vec<Arc<Authorization>> {
        let mut keys: BTreeSet<&PolicyKey> = self.global_policies.iter().collect();
        if let Some(ns) = self.policies_by_namespace.get(&workload.namespace) {
            keys.extend(ns.iter());
        }
        keys.extend(workload.authorization_policies.iter());
        keys.into_iter()
            .filter_map(|k| self.policies.get(k).cloned())
            .collect()
    }

    /// All workloads, in no particular order.
    pub fn workloads(&self) -> impl Iterator<Item = &Arc<Workload>> {
        self.workloads.values()
    }

    /// All services, in no particular order.
    pub fn services(&self) -> impl Iterator<Item = &Arc<Service>> {
        self.services.values()
    }

    /// All policies, in no particular order.
    pub fn policies(&self) -> impl Iterator<Item = &Arc<Authorization>> {
        self.policies.values()
    }

    /// Applies one `istio.workload.Address` xDS resource. The content, not `name`, decides the
    /// key; `name` only labels errors.
    pub fn apply_address(
        &mut self,
        name: &str,
        address: pb::Address,
    ) -> Result<(), ConversionError> {
        match AddressResource::try_from(address).map_err(|e| e.in_resource(name))? {
            AddressResource::Workload(w) => self.upsert_workload(*w),
            AddressResource::Service(s) => self.upsert_service(*s),
        }
        Ok(())
    }

    /// Removes the Address resource called `name` (a workload uid or `ns/hostname`); returns
    /// whether anything was removed.
    pub fn remove_address(&mut self, name: &str) -> bool {
        if self.remove_workload(&WorkloadUid::new(name)) {
            return true;
        }
        match name.parse::<NamespacedHostname>() {
            Ok(key) => self.remove_service(&key),
            Err(_) => false,
        }
    }

    /// Applies one `istio.security.Authorization` xDS resource.
    pub fn apply_authorization(
        &mut self,
        name: &str,
        policy: sec::Authorization,
    ) -> Result<(), ConversionError> {
        let policy = Authorization::try_from(policy).map_err(|e| e.in_resource(name))?;
        self.upsert_policy(policy);
        Ok(())
    }

    /// Removes the Authorization resource called `name` (`ns/name`); returns whether it existed.
    pub fn remove_authorization(&mut self, name: &str) -> bool {
        match name.parse::<PolicyKey>() {
            Ok(key) => self.remove_policy(&key),
            Err(_) => false,
        }
    }

    /// Number of workloads, services and policies.
    pub fn counts(&self) -> (usize, usize, usize) {
        (
            self.workloads.len(),
            self.services.len(),
            self.policies.len(),
        )
    }
}
