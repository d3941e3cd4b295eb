//! Services: Kubernetes Services and ServiceEntries → `istio.workload.Service`, and the
//! `services` map of each workload (which services it backs, on which ports).
//!
//! - A Kubernetes Service becomes `<ns>/<name>.<ns>.svc.<suffix>` with its cluster IPs and load
//!   balancer IPs as VIPs. A port's `target_port` is the numeric targetPort, or 0 when it is named
//!   (ztunnel then uses each workload's own mapping). UDP/SCTP ports are left out: ztunnel only
//!   carries TCP. ExternalName Services are not published.
//! - A ServiceEntry becomes one service per host, `<ns>/<host>`; `addresses` are its VIPs (a CIDR
//!   keeps its prefix length). Inline `endpoints` become workloads; a `workloadSelector` selects
//!   pods and WorkloadEntries of its namespace (an empty selector selects nothing).
//! - When a Kubernetes Service and a ServiceEntry produce the same resource name, the Service wins.
//! - Workload ports: Selector mode evaluates Service selectors over pods and resolves named
//!   targetPorts against container ports (a port that does not resolve is left out, as the
//!   endpoint controller does); EndpointSlices mode takes membership and resolved port numbers
//!   from the slices. WorkloadEntries are always matched by selector.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use xds::istio::workload as pb;

use super::entries::add_entry_ports;
use super::index::{Labels, NsName, WorkloadKind, WorkloadRef};
use super::workloads::{EntryEndpoint, PodInfo, ip_bytes};
use super::{Dirty, EndpointMode, Model, ModelConfig};

/// Label on an EndpointSlice naming its Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Where a Service's port goes on a backing workload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum TargetPort {
    /// A fixed port number.
    Number(u16),
    /// A named container port.
    Named(String),
}

/// One TCP port of a Kubernetes Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SvcPort {
    pub name: String,
    pub port: u16,
    pub target: TargetPort,
}

/// What the model keeps of a Kubernetes Service.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct ServiceInfo {
    pub hostname: String,
    /// Empty: selects nothing (ExternalName and selector-less Services).
    pub selector: Labels,
    pub ports: Vec<SvcPort>,
    pub ips: Vec<IpAddr>,
    pub ip_families: pb::IpFamilies,
    pub publish: bool,
}

impl ServiceInfo {
    /// Extracts what the model needs from a Service.
    pub fn from_service(svc: &Service, name: &str, ns: &str, cfg: &ModelConfig) -> Self {
        let spec = svc.spec.clone().unwrap_or_default();
        let external = spec.type_.as_deref() == Some("ExternalName");
        let mut ips: Vec<IpAddr> = spec
            .cluster_ips
            .iter()
            .flatten()
            .chain(spec.cluster_ip.iter())
            .chain(
                svc.status
                    .iter()
                    .filter_map(|s| s.load_balancer.as_ref())
                    .filter_map(|lb| lb.ingress.as_ref())
                    .flatten()
                    .filter_map(|i| i.ip.as_ref()),
            )
            .filter_map(|s| s.parse().ok())
            .collect();
        let mut seen = BTreeSet::new();
        ips.retain(|ip| seen.insert(*ip));
        let mut ports: Vec<SvcPort> = Vec::new();
        for p in spec.ports.iter().flatten() {
            let tcp = p.protocol.as_deref().is_none_or(|s| s == "TCP");
            let Ok(port) = u16::try_from(p.port) else {
                continue;
            };
            if !tcp || port == 0 || ports.iter().any(|q| q.port == port) {
                continue;
            }
            let target = match &p.target_port {
                Some(IntOrString::String(s)) => match s.parse::<u16>() {
                    Ok(n) if n != 0 => TargetPort::Number(n),
                    _ => TargetPort::Named(s.clone()),
                },
                Some(IntOrString::Int(n)) => match u16::try_from(*n) {
                    Ok(n) if n != 0 => TargetPort::Number(n),
                    _ => TargetPort::Number(port),
                },
                None => TargetPort::Number(port),
            };
            ports.push(SvcPort {
                name: p.name.clone().unwrap_or_default(),
                port,
                target,
            });
        }
        let families = spec.ip_families.unwrap_or_default();
        let v4 = families.iter().any(|f| f == "IPv4");
        let v6 = families.iter().any(|f| f == "IPv6");
        let ip_families = match (v4, v6) {
            (true, true) => pb::IpFamilies::Dual,
            (true, false) => pb::IpFamilies::Ipv4Only,
            (false, true) => pb::IpFamilies::Ipv6Only,
            (false, false) => pb::IpFamilies::Automatic,
        };
        Self {
            hostname: format!("{name}.{ns}.svc.{}", cfg.domain_suffix),
            selector: if external {
                Labels::new()
            } else {
                spec.selector.unwrap_or_default()
            },
            ports,
            ips,
            ip_families,
            publish: !external,
        }
    }

    /// Fields that decide which workloads back this Service and on which ports.
    fn membership(&self) -> (&Labels, &[SvcPort]) {
        (&self.selector, &self.ports)
    }
}

/// What the model keeps of an EndpointSlice.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct SliceInfo {
    pub service: String,
    /// Port name → resolved port.
    pub ports: BTreeMap<String, u16>,
    /// Names of the pods (same namespace) the endpoints refer to.
    pub pods: BTreeSet<String>,
}

impl SliceInfo {
    /// Extracts what the model needs from an EndpointSlice.
    pub fn from_slice(slice: &EndpointSlice, ns: &str) -> Self {
        let service = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
            .cloned()
            .unwrap_or_default();
        let ports = slice
            .ports
            .iter()
            .flatten()
            .filter(|p| p.protocol.as_deref().is_none_or(|s| s == "TCP"))
            .filter_map(|p| {
                let port = u16::try_from(p.port?).ok()?;
                Some((p.name.clone().unwrap_or_default(), port))
            })
            .collect();
        let pods = slice
            .endpoints
            .iter()
            .filter_map(|e| e.target_ref.as_ref())
            .filter(|t| t.kind.as_deref() == Some("Pod"))
            .filter(|t| t.namespace.as_deref().is_none_or(|n| n == ns))
            .filter_map(|t| t.name.clone())
            .collect();
        Self {
            service,
            ports,
            pods,
        }
    }
}

/// An object that defines a service resource. Kubernetes Services sort (and win) first.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum ServiceSource {
    /// A Kubernetes Service.
    Kube(NsName),
    /// A ServiceEntry.
    Entry(NsName),
}

pub(super) fn port_list_insert(
    map: &mut HashMap<String, pb::PortList>,
    key: String,
    port: pb::Port,
) {
    let list = map.entry(key).or_default();
    if !list
        .ports
        .iter()
        .any(|p| p.service_port == port.service_port)
    {
        list.ports.push(port);
    }
}

pub(super) fn port(service_port: u16, target_port: u16) -> pb::Port {
    pb::Port {
        service_port: service_port.into(),
        target_port: target_port.into(),
        app_protocol: 0,
    }
}

impl Model {
    pub(super) fn add_source(&mut self, name: String, source: ServiceSource) {
        self.service_sources.entry(name).or_default().insert(source);
    }

    pub(super) fn remove_source(&mut self, name: &str, source: &ServiceSource) {
        if let Some(set) = self.service_sources.get_mut(name) {
            set.remove(source);
            if set.is_empty() {
                self.service_sources.remove(name);
            }
        }
    }

    /// Pods and WorkloadEntries a Service selector picks (pods only in Selector mode).
    fn selected_by_service(&self, ns: &str, selector: &Labels) -> Vec<WorkloadRef> {
        if selector.is_empty() {
            return Vec::new();
        }
        let pods = self.cfg.mode == EndpointMode::Selector;
        self.index
            .select(Some(ns), selector)
            .into_iter()
            .filter(|r| match r.kind {
                WorkloadKind::Pod => pods,
                WorkloadKind::WorkloadEntry => true,
                WorkloadKind::ServiceEntryEndpoint => false,
            })
            .collect()
    }

    fn slice_pods<'a>(&'a self, slice: &'a NsName) -> impl Iterator<Item = WorkloadRef> + 'a {
        let ns = slice.0.clone();
        self.slice_pods
            .forward(slice)
            .map(move |p| WorkloadRef::new(&ns, WorkloadKind::Pod, &p.1))
    }

    pub(super) fn set_service(&mut self, id: NsName, info: Option<ServiceInfo>, dirty: &mut Dirty) {
        let old = self.services.get(&id).cloned();
        if old == info {
            return;
        }
        let source = ServiceSource::Kube(id.clone());
        let resource = |i: &ServiceInfo| format!("{}/{}", id.0, i.hostname);
        for i in old.iter().chain(info.iter()) {
            dirty.services.insert(resource(i));
        }
        if let Some(o) = &old {
            self.remove_source(&resource(o), &source);
        }
        let membership_changed =
            old.as_ref().map(ServiceInfo::membership) != info.as_ref().map(ServiceInfo::membership);
        if membership_changed {
            for i in old.iter().chain(info.iter()) {
                dirty
                    .workloads
                    .extend(self.selected_by_service(&id.0, &i.selector));
            }
            if self.cfg.mode == EndpointMode::EndpointSlices {
                let slices: Vec<NsName> = self.slice_service.backward(&id).cloned().collect();
                for s in &slices {
                    dirty.workloads.extend(self.slice_pods(s));
                }
            }
        }
        match info {
            Some(i) => {
                if i.publish {
                    self.add_source(resource(&i), source);
                }
                self.services_by_ns
                    .entry(id.0.clone())
                    .or_default()
                    .insert(id.1.clone());
                self.services.insert(id, i);
            }
            None => {
                if let Some(set) = self.services_by_ns.get_mut(&id.0) {
                    set.remove(&id.1);
                }
                self.services.remove(&id);
            }
        }
    }

    pub(super) fn set_slice(&mut self, id: NsName, info: Option<SliceInfo>, dirty: &mut Dirty) {
        // In Selector mode membership comes from selectors; slices are not needed.
        if self.cfg.mode != EndpointMode::EndpointSlices || self.slices.get(&id) == info.as_ref() {
            return;
        }
        dirty.workloads.extend(self.slice_pods(&id));
        match info {
            Some(i) => {
                let pods = i.pods.iter().map(|p| (id.0.clone(), p.clone())).collect();
                self.slice_pods.set(&id, pods);
                let svc = BTreeSet::from([(id.0.clone(), i.service.clone())]);
                self.slice_service.set(&id, svc);
                self.slices.insert(id.clone(), i);
                dirty.workloads.extend(self.slice_pods(&id));
            }
            None => {
                self.slice_pods.clear(&id);
                self.slice_service.clear(&id);
                self.slices.remove(&id);
            }
        }
    }

    /// Builds the service resource `name` from the object that defines it.
    pub(super) fn build_service(&self, name: &str) -> Option<pb::Address> {
        let service = match self.service_sources.get(name)?.first()? {
            ServiceSource::Kube(id) => self.kube_service(id)?,
            ServiceSource::Entry(id) => {
                let host = name.split_once('/')?.1;
                self.entry_service(id, host)?
            }
        };
        Some(pb::Address {
            r#type: Some(pb::address::Type::Service(service)),
        })
    }

    pub(super) fn network_address(&self, ip: &IpAddr, length: Option<u32>) -> pb::NetworkAddress {
        pb::NetworkAddress {
            network: self.cfg.network.clone(),
            address: ip_bytes(ip),
            length,
        }
    }

    fn kube_service(&self, id: &NsName) -> Option<pb::Service> {
        let info = self.services.get(id)?;
        Some(pb::Service {
            name: id.1.clone(),
            namespace: id.0.clone(),
            hostname: info.hostname.clone(),
            addresses: info
                .ips
                .iter()
                .map(|ip| self.network_address(ip, None))
                .collect(),
            ports: info
                .ports
                .iter()
                .map(|p| match &p.target {
                    TargetPort::Number(n) => port(p.port, *n),
                    TargetPort::Named(_) => port(p.port, 0),
                })
                .collect(),
            ip_families: info.ip_families as i32,
            canonical: true,
            ..Default::default()
        })
    }

    /// The `services` map of a workload: `<ns>/<hostname>` → port mappings.
    pub(super) fn workload_services(&self, r: &WorkloadRef) -> HashMap<String, pb::PortList> {
        let mut out = HashMap::new();
        let id = (r.ns.clone(), r.name.clone());
        match r.kind {
            WorkloadKind::Pod => {
                let Some(pod) = self.pods.get(&id) else {
                    return out;
                };
                match self.cfg.mode {
                    EndpointMode::Selector => {
                        for svc in self.selecting_services(&r.ns, &pod.labels) {
                            for p in &svc.ports {
                                if let Some(t) = pod_target(pod, p) {
                                    let key = format!("{}/{}", r.ns, svc.hostname);
                                    port_list_insert(&mut out, key, port(p.port, t));
                                }
                            }
                        }
                    }
                    EndpointMode::EndpointSlices => self.slice_services(&id, &mut out),
                }
                self.entry_services(&r.ns, &pod.labels, None, &mut out);
            }
            WorkloadKind::WorkloadEntry => {
                let Some(ep) = self
                    .workload_entries
                    .get(&id)
                    .and_then(|w| w.endpoint.as_ref())
                else {
                    return out;
                };
                for svc in self.selecting_services(&r.ns, &ep.labels) {
                    for p in &svc.ports {
                        if let Some(t) = entry_target(ep, p) {
                            let key = format!("{}/{}", r.ns, svc.hostname);
                            port_list_insert(&mut out, key, port(p.port, t));
                        }
                    }
                }
                self.entry_services(&r.ns, &ep.labels, Some(ep), &mut out);
            }
            WorkloadKind::ServiceEntryEndpoint => {
                let Some((se_name, _)) = r.name.split_once('/') else {
                    return out;
                };
                let Some(se) = self.service_entries.get(&(r.ns.clone(), se_name.into())) else {
                    return out;
                };
                if let Some(ep) = se.endpoints.get(&r.name) {
                    add_entry_ports(&r.ns, se, Some(ep), &mut out);
                }
            }
        }
        out
    }

    /// Published Kubernetes Services of `ns` whose selector matches `labels`.
    fn selecting_services<'a>(
        &'a self,
        ns: &'a str,
        labels: &'a Labels,
    ) -> impl Iterator<Item = &'a ServiceInfo> + 'a {
        self.services_by_ns
            .get(ns)
            .into_iter()
            .flatten()
            .filter_map(move |n| self.services.get(&(ns.to_string(), n.clone())))
            .filter(move |s| {
                s.publish
                    && !s.selector.is_empty()
                    && super::index::selector_matches(&s.selector, labels)
            })
    }

    fn slice_services(&self, pod: &NsName, out: &mut HashMap<String, pb::PortList>) {
        for slice_id in self.slice_pods.backward(pod) {
            let Some(slice) = self.slices.get(slice_id) else {
                continue;
            };
            let Some(svc) = self.services.get(&(pod.0.clone(), slice.service.clone())) else {
                continue;
            };
            if !svc.publish {
                continue;
            }
            for p in &svc.ports {
                if let Some(t) = slice.ports.get(&p.name) {
                    let key = format!("{}/{}", pod.0, svc.hostname);
                    port_list_insert(out, key, port(p.port, *t));
                }
            }
        }
    }
}

fn pod_target(pod: &PodInfo, p: &SvcPort) -> Option<u16> {
    match &p.target {
        TargetPort::Number(n) => Some(*n),
        TargetPort::Named(name) => pod.container_ports.get(name).copied(),
    }
}

fn entry_target(ep: &EntryEndpoint, p: &SvcPort) -> Option<u16> {
    if let Some(t) = ep.ports.get(&p.name) {
        return Some(*t);
    }
    match &p.target {
        TargetPort::Number(n) => Some(*n),
        TargetPort::Named(name) => ep.ports.get(name).copied(),
    }
}
