//! ServiceEntries: one service resource per host, inline endpoints as workloads, and the
//! ports a selected workload backs (see [`super::services`] for the overall rules).

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use xds::istio::workload as pb;

use super::index::{Labels, NsName, WorkloadKind, WorkloadRef, selector_matches};
use super::services::{ServiceSource, port, port_list_insert};
use super::workloads::EntryEndpoint;
use super::{Dirty, Model};
use crate::crd::ServiceEntry;

/// One ServiceEntry port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct EntryPort {
    pub name: String,
    pub number: u16,
    pub target: Option<u16>,
}

/// What the model keeps of a ServiceEntry.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct ServiceEntryInfo {
    pub name: String,
    pub hosts: Vec<String>,
    pub addresses: Vec<(IpAddr, Option<u32>)>,
    pub ports: Vec<EntryPort>,
    /// workloadSelector labels; `None` or empty selects nothing.
    pub selector: Option<Labels>,
    /// Inline endpoints by workload source name (`<serviceentry>/<address>`).
    pub endpoints: BTreeMap<String, EntryEndpoint>,
    pub subject_alt_names: Vec<String>,
}

impl ServiceEntryInfo {
    /// Extracts what the model needs from a ServiceEntry.
    pub fn from_entry(se: &ServiceEntry, name: &str) -> Self {
        let spec = &se.spec;
        let addresses = spec
            .addresses
            .iter()
            .filter_map(|a| match a.split_once('/') {
                Some((ip, len)) => {
                    let ip: IpAddr = ip.parse().ok()?;
                    let len: u32 = len.parse().ok()?;
                    let max = if ip.is_ipv4() { 32 } else { 128 };
                    (len <= max).then_some((ip, Some(len)))
                }
                None => Some((a.parse().ok()?, None)),
            })
            .collect();
        let mut ports: Vec<EntryPort> = Vec::new();
        for p in &spec.ports {
            let Ok(number) = u16::try_from(p.number) else {
                continue;
            };
            if number == 0 || ports.iter().any(|q| q.number == number) {
                continue;
            }
            ports.push(EntryPort {
                name: p.name.clone(),
                number,
                target: p
                    .target_port
                    .and_then(|t| u16::try_from(t).ok())
                    .filter(|t| *t != 0),
            });
        }
        let mut endpoints = BTreeMap::new();
        for ep in spec.endpoints.iter().filter_map(EntryEndpoint::from_spec) {
            let addr = ep
                .ip
                .map(|ip| ip.to_string())
                .unwrap_or(ep.hostname.clone());
            endpoints.entry(format!("{name}/{addr}")).or_insert(ep);
        }
        let mut hosts: Vec<String> = Vec::new();
        for h in &spec.hosts {
            if !h.is_empty() && !hosts.contains(h) {
                hosts.push(h.clone());
            }
        }
        Self {
            name: name.to_string(),
            hosts,
            addresses,
            ports,
            selector: spec
                .workload_selector
                .as_ref()
                .map(|s| s.labels.clone())
                .filter(|l| !l.is_empty()),
            endpoints,
            subject_alt_names: spec.subject_alt_names.clone(),
        }
    }
}

pub(super) fn add_entry_ports(
    ns: &str,
    se: &ServiceEntryInfo,
    ep: Option<&EntryEndpoint>,
    out: &mut HashMap<String, pb::PortList>,
) {
    for host in &se.hosts {
        for p in &se.ports {
            // An endpoint's own named port wins over the entry's targetPort.
            let t = ep
                .and_then(|e| e.ports.get(&p.name))
                .copied()
                .or(p.target)
                .unwrap_or(p.number);
            port_list_insert(out, format!("{ns}/{host}"), port(p.number, t));
        }
    }
}

impl Model {
    pub(super) fn set_service_entry(
        &mut self,
        id: NsName,
        info: Option<ServiceEntryInfo>,
        dirty: &mut Dirty,
    ) {
        let old = self.service_entries.remove(&id);
        if old == info {
            if let Some(o) = old {
                self.service_entries.insert(id, o);
            }
            return;
        }
        let source = ServiceSource::Entry(id.clone());
        let ns = id.0.clone();
        if let Some(o) = &old {
            for h in &o.hosts {
                let name = format!("{ns}/{h}");
                self.remove_source(&name, &source);
                dirty.services.insert(name);
            }
            for ep in o.endpoints.keys() {
                let r = WorkloadRef::new(&ns, WorkloadKind::ServiceEntryEndpoint, ep);
                self.index.remove(&r);
                dirty.workloads.insert(r);
            }
            if let Some(sel) = &o.selector {
                dirty.workloads.extend(self.selected_by_entry(&ns, sel));
            }
            if let Some(set) = self.selecting_entries.get_mut(&ns) {
                set.remove(&id.1);
            }
        }
        if let Some(i) = &info {
            for h in &i.hosts {
                let name = format!("{ns}/{h}");
                self.add_source(name.clone(), source.clone());
                dirty.services.insert(name);
            }
            for (ep_name, ep) in &i.endpoints {
                let r = WorkloadRef::new(&ns, WorkloadKind::ServiceEntryEndpoint, ep_name);
                self.index.insert(r.clone(), ep.labels.clone());
                dirty.workloads.insert(r);
            }
            if let Some(sel) = &i.selector {
                dirty.workloads.extend(self.selected_by_entry(&ns, sel));
                self.selecting_entries
                    .entry(ns.clone())
                    .or_default()
                    .insert(id.1.clone());
            }
        }
        if let Some(i) = info {
            self.service_entries.insert(id, i);
        }
    }

    fn selected_by_entry(&self, ns: &str, selector: &Labels) -> Vec<WorkloadRef> {
        self.index
            .select(Some(ns), selector)
            .into_iter()
            .filter(|r| r.kind != WorkloadKind::ServiceEntryEndpoint)
            .collect()
    }

    pub(super) fn entry_service(&self, id: &NsName, host: &str) -> Option<pb::Service> {
        let info = self.service_entries.get(id)?;
        Some(pb::Service {
            name: id.1.clone(),
            namespace: id.0.clone(),
            hostname: host.to_string(),
            addresses: info
                .addresses
                .iter()
                .map(|(ip, len)| self.network_address(ip, *len))
                .collect(),
            ports: info
                .ports
                .iter()
                .map(|p| port(p.number, p.target.unwrap_or(0)))
                .collect(),
            subject_alt_names: info.subject_alt_names.clone(),
            ..Default::default()
        })
    }

    /// Adds the hosts of every ServiceEntry in `ns` whose workloadSelector matches `labels`.
    pub(super) fn entry_services(
        &self,
        ns: &str,
        labels: &Labels,
        ep: Option<&EntryEndpoint>,
        out: &mut HashMap<String, pb::PortList>,
    ) {
        for name in self.selecting_entries.get(ns).into_iter().flatten() {
            let Some(se) = self.service_entries.get(&(ns.to_string(), name.clone())) else {
                continue;
            };
            if se
                .selector
                .as_ref()
                .is_some_and(|s| selector_matches(s, labels))
            {
                add_entry_ports(ns, se, ep, out);
            }
        }
    }
}
