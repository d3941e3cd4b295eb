//! Workloads: Pods, WorkloadEntries and ServiceEntry inline endpoints → `istio.workload.Workload`.
//!
//! - Enrollment (TunnelProtocol HBONE): pod label `istio.io/dataplane-mode=none` opts out,
//!   `=ambient` opts in, otherwise the namespace label decides. Pods not enrolled are still
//!   published (TunnelProtocol NONE) so ztunnel can reach them in plaintext and report metrics.
//! - hostNetwork pods share their node's IP and cannot be captured: they are published with
//!   `network_mode: HOST_NETWORK` and never HBONE (ztunnel must not index them by address,
//!   exactly as for Istio's controller).
//! - Pods without an IP and finished pods (phase Succeeded/Failed) are not published.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::Pod;
use xds::istio::workload as pb;

use super::index::{Labels, NsName, WorkloadKind, WorkloadRef};
use super::{Dirty, Model};
use crate::crd::{WorkloadEntry, WorkloadEntrySpec};

pub use meshconfig::enrollment::{DATAPLANE_MODE_LABEL, ambient_enrolled};
/// Pod/namespace label naming the workload's network.
pub const NETWORK_LABEL: &str = "topology.istio.io/network";

/// What the model keeps of a Pod.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct PodInfo {
    pub labels: Labels,
    pub ips: Vec<IpAddr>,
    pub service_account: String,
    pub node: String,
    pub host_network: bool,
    pub ready: bool,
    /// Not in a terminal phase.
    pub active: bool,
    /// Has a deletion timestamp.
    pub terminating: bool,
    /// Named container ports, for resolving named Service targetPorts.
    pub container_ports: BTreeMap<String, u16>,
    pub workload_type: pb::WorkloadType,
    pub workload_name: String,
}

impl PodInfo {
    /// Extracts what the model needs from a Pod.
    pub fn from_pod(pod: &Pod) -> Self {
        let meta = &pod.metadata;
        let labels = meta.labels.clone().unwrap_or_default();
        let name = meta.name.clone().unwrap_or_default();
        let spec = pod.spec.as_ref();
        let status = pod.status.as_ref();
        let ips = meshconfig::pod::pod_ips(pod);
        let service_account = meshconfig::pod::service_account(pod);
        let ready = status
            .and_then(|s| s.conditions.as_ref())
            .into_iter()
            .flatten()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or("");
        let mut container_ports = BTreeMap::new();
        for c in spec.map(|s| s.containers.as_slice()).unwrap_or_default() {
            for p in c.ports.iter().flatten() {
                if let (Some(n), Ok(port)) = (&p.name, u16::try_from(p.container_port)) {
                    container_ports.entry(n.clone()).or_insert(port);
                }
            }
        }
        let (workload_type, workload_name) = owner_workload(pod, &name, &labels);
        Self {
            labels,
            ips,
            service_account,
            node: spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
            ready,
            active: phase != "Succeeded" && phase != "Failed",
            terminating: meta.deletion_timestamp.is_some(),
            container_ports,
            workload_type,
            workload_name,
        }
    }

    /// True if the pod counts for CA impersonation on its node.
    fn on_node(&self) -> bool {
        self.active && !self.node.is_empty()
    }
}

/// The workload (type, name) a pod belongs to, from its controlling owner.
fn owner_workload(pod: &Pod, pod_name: &str, labels: &Labels) -> (pb::WorkloadType, String) {
    let owners = pod.metadata.owner_references.as_deref().unwrap_or_default();
    let Some(owner) = owners
        .iter()
        .find(|o| o.controller == Some(true))
        .or(owners.first())
    else {
        return (pb::WorkloadType::Pod, pod_name.to_string());
    };
    match owner.kind.as_str() {
        "ReplicaSet" => {
            // A Deployment's ReplicaSet is `<deployment>-<pod-template-hash>`.
            let trimmed = labels
                .get("pod-template-hash")
                .and_then(|h| owner.name.strip_suffix(h.as_str()))
                .and_then(|n| n.strip_suffix('-'))
                .filter(|n| !n.is_empty());
            match trimmed {
                Some(d) => (pb::WorkloadType::Deployment, d.to_string()),
                None => (pb::WorkloadType::Pod, owner.name.clone()),
            }
        }
        "Job" => match cronjob_name(&owner.name) {
            Some(c) => (pb::WorkloadType::Cronjob, c.to_string()),
            None => (pb::WorkloadType::Job, owner.name.clone()),
        },
        _ => (pb::WorkloadType::Pod, owner.name.clone()),
    }
}

/// A CronJob's Jobs are named `<cronjob>-<8 to 10 digit schedule timestamp>`.
fn cronjob_name(job: &str) -> Option<&str> {
    let (base, suffix) = job.rsplit_once('-')?;
    let digits = (8..=10).contains(&suffix.len()) && suffix.bytes().all(|b| b.is_ascii_digit());
    (digits && !base.is_empty()).then_some(base)
}

/// Canonical service name: Istio's label precedence, else the workload name.
pub fn canonical_name(labels: &Labels, workload_name: &str) -> String {
    [
        "service.istio.io/canonical-name",
        "app.kubernetes.io/name",
        "app",
    ]
    .iter()
    .find_map(|k| labels.get(*k))
    .cloned()
    .unwrap_or_else(|| workload_name.to_string())
}

/// Canonical revision: Istio's label precedence, else `latest`.
pub fn canonical_revision(labels: &Labels) -> String {
    [
        "service.istio.io/canonical-revision",
        "app.kubernetes.io/version",
        "version",
    ]
    .iter()
    .find_map(|k| labels.get(*k))
    .cloned()
    .unwrap_or_else(|| "latest".into())
}

/// Raw bytes of an IP, as the workload API carries them.
pub(crate) fn ip_bytes(ip: &IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

/// What the model keeps of a WorkloadEntry or of one ServiceEntry endpoint.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct EntryEndpoint {
    pub ip: Option<IpAddr>,
    /// The address when it is a DNS name.
    pub hostname: String,
    /// Port name → workload port.
    pub ports: BTreeMap<String, u16>,
    pub labels: Labels,
    pub network: String,
    pub locality: Option<pb::Locality>,
    pub weight: u32,
    pub service_account: String,
}

impl EntryEndpoint {
    /// Extracts an endpoint; `None` for addresses ztunnel cannot use (empty or `unix://`).
    pub fn from_spec(spec: &WorkloadEntrySpec) -> Option<Self> {
        let addr = spec.address.trim();
        if addr.is_empty() || addr.starts_with("unix://") {
            return None;
        }
        let ip = addr.parse::<IpAddr>().ok();
        let locality = (!spec.locality.is_empty()).then(|| {
            let mut parts = spec.locality.splitn(3, '/').map(str::to_string);
            pb::Locality {
                region: parts.next().unwrap_or_default(),
                zone: parts.next().unwrap_or_default(),
                subzone: parts.next().unwrap_or_default(),
            }
        });
        Some(Self {
            ip,
            hostname: if ip.is_some() {
                String::new()
            } else {
                addr.to_string()
            },
            ports: spec
                .ports
                .iter()
                .filter_map(|(k, v)| Some((k.clone(), u16::try_from(*v).ok()?)))
                .collect(),
            labels: spec.labels.clone(),
            network: spec.network.clone(),
            locality,
            weight: spec.weight,
            service_account: spec.service_account.clone(),
        })
    }
}

/// What the model keeps of a WorkloadEntry (`None` endpoint: not publishable).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct WorkloadEntryInfo {
    pub endpoint: Option<EntryEndpoint>,
    pub labels: Labels,
}

impl WorkloadEntryInfo {
    /// Extracts what the model needs from a WorkloadEntry.
    pub fn from_entry(we: &WorkloadEntry) -> Self {
        Self {
            endpoint: EntryEndpoint::from_spec(&we.spec),
            labels: we.spec.labels.clone(),
        }
    }
}

impl Model {
    pub(super) fn set_pod(&mut self, id: NsName, info: Option<PodInfo>, dirty: &mut Dirty) {
        if self.pods.get(&id) == info.as_ref() {
            return;
        }
        let r = WorkloadRef::new(&id.0, WorkloadKind::Pod, &id.1);
        if let Some(old) = self.pods.remove(&id)
            && old.on_node()
        {
            self.node_identities
                .remove(&old.node, &id.0, &old.service_account);
        }
        match info {
            Some(info) => {
                if info.on_node() {
                    self.node_identities
                        .add(&info.node, &id.0, &info.service_account);
                }
                self.index.insert(r.clone(), info.labels.clone());
                self.pods.insert(id, info);
            }
            None => self.index.remove(&r),
        }
        dirty.workloads.insert(r);
    }

    pub(super) fn set_workload_entry(
        &mut self,
        id: NsName,
        info: Option<WorkloadEntryInfo>,
        dirty: &mut Dirty,
    ) {
        if self.workload_entries.get(&id) == info.as_ref() {
            return;
        }
        let r = WorkloadRef::new(&id.0, WorkloadKind::WorkloadEntry, &id.1);
        match info {
            Some(info) => {
                self.index.insert(r.clone(), info.labels.clone());
                self.workload_entries.insert(id, info);
            }
            None => {
                self.index.remove(&r);
                self.workload_entries.remove(&id);
            }
        }
        dirty.workloads.insert(r);
    }

    /// The workload's network: its label, else its namespace's label, else the configured one.
    fn network_for(&self, ns: &str, labels: &Labels) -> String {
        labels
            .get(NETWORK_LABEL)
            .or_else(|| self.namespaces.get(ns).and_then(|l| l.get(NETWORK_LABEL)))
            .cloned()
            .unwrap_or_else(|| self.cfg.network.clone())
    }

    fn tunnel_for(&self, ns: &str, labels: &Labels) -> pb::TunnelProtocol {
        if ambient_enrolled(self.namespaces.get(ns), labels) {
            pb::TunnelProtocol::Hbone
        } else {
            pb::TunnelProtocol::None
        }
    }

    /// A pod's workload without services and policies.
    pub(super) fn pod_workload(&self, r: &WorkloadRef) -> Option<pb::Workload> {
        let pod = self.pods.get(&(r.ns.clone(), r.name.clone()))?;
        if !pod.active || pod.ips.is_empty() {
            return None;
        }
        let tunnel = if pod.host_network {
            pb::TunnelProtocol::None
        } else {
            self.tunnel_for(&r.ns, &pod.labels)
        };
        let status = if pod.ready && !pod.terminating {
            pb::WorkloadStatus::Healthy
        } else {
            pb::WorkloadStatus::Unhealthy
        };
        Some(pb::Workload {
            uid: r.uid(&self.cfg.cluster_id),
            name: r.name.clone(),
            namespace: r.ns.clone(),
            addresses: pod.ips.iter().map(ip_bytes).collect(),
            network: self.network_for(&r.ns, &pod.labels),
            tunnel_protocol: tunnel as i32,
            trust_domain: self.cfg.trust_domain.clone(),
            service_account: pod.service_account.clone(),
            node: pod.node.clone(),
            canonical_name: canonical_name(&pod.labels, &pod.workload_name),
            canonical_revision: canonical_revision(&pod.labels),
            workload_type: pod.workload_type as i32,
            workload_name: pod.workload_name.clone(),
            status: status as i32,
            cluster_id: self.cfg.cluster_id.clone(),
            network_mode: if pod.host_network {
                pb::NetworkMode::HostNetwork as i32
            } else {
                pb::NetworkMode::Standard as i32
            },
            ..Default::default()
        })
    }

    /// A WorkloadEntry's workload without services and policies.
    pub(super) fn entry_workload(&self, r: &WorkloadRef) -> Option<pb::Workload> {
        let info = self.workload_entries.get(&(r.ns.clone(), r.name.clone()))?;
        let ep = info.endpoint.as_ref()?;
        Some(self.endpoint_to_workload(r, &r.name, ep))
    }

    /// A ServiceEntry inline endpoint's workload without services and policies.
    pub(super) fn endpoint_workload(&self, r: &WorkloadRef) -> Option<pb::Workload> {
        let (se_name, _) = r.name.split_once('/')?;
        let se = self
            .service_entries
            .get(&(r.ns.clone(), se_name.to_string()))?;
        let ep = se.endpoints.get(&r.name)?;
        Some(self.endpoint_to_workload(r, se_name, ep))
    }

    fn endpoint_to_workload(
        &self,
        r: &WorkloadRef,
        name: &str,
        ep: &EntryEndpoint,
    ) -> pb::Workload {
        let network = if ep.network.is_empty() {
            self.network_for(&r.ns, &ep.labels)
        } else {
            ep.network.clone()
        };
        pb::Workload {
            uid: r.uid(&self.cfg.cluster_id),
            name: name.to_string(),
            namespace: r.ns.clone(),
            addresses: ep.ip.iter().map(ip_bytes).collect(),
            hostname: ep.hostname.clone(),
            network,
            tunnel_protocol: self.tunnel_for(&r.ns, &ep.labels) as i32,
            trust_domain: self.cfg.trust_domain.clone(),
            service_account: if ep.service_account.is_empty() {
                "default".into()
            } else {
                ep.service_account.clone()
            },
            canonical_name: canonical_name(&ep.labels, name),
            canonical_revision: canonical_revision(&ep.labels),
            workload_type: pb::WorkloadType::Pod as i32,
            workload_name: name.to_string(),
            status: pb::WorkloadStatus::Healthy as i32,
            cluster_id: self.cfg.cluster_id.clone(),
            locality: ep.locality.clone(),
            capacity: (ep.weight > 0).then_some(ep.weight),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cronjob_suffix_needs_8_to_10_digits() {
        assert_eq!(cronjob_name("backup-28461234"), Some("backup"));
        assert_eq!(cronjob_name("backup-1234"), None);
        assert_eq!(cronjob_name("backup-2846123a"), None);
        assert_eq!(cronjob_name("-28461234"), None);
    }

    #[test]
    fn pod_label_overrides_namespace_enrollment() {
        let ambient: Labels = [(DATAPLANE_MODE_LABEL.to_string(), "ambient".to_string())].into();
        let none: Labels = [(DATAPLANE_MODE_LABEL.to_string(), "none".to_string())].into();
        let empty = Labels::new();
        assert!(ambient_enrolled(Some(&ambient), &empty));
        assert!(!ambient_enrolled(Some(&ambient), &none));
        assert!(ambient_enrolled(None, &ambient));
        assert!(!ambient_enrolled(Some(&empty), &empty));
    }
}
