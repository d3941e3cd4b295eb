//! Services: cluster IPs allocated from 10.96.0.0/16 (kept across re-applies, as the API
//! server does), what the sandbox remembers of each Service, and its ready endpoints.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::ids::content_hash;
use crate::state::{
    NsName, PodPhase, PodState, Protocol, ServicePortState, ServiceState, TargetPort,
};

/// The service CIDR's network address (10.96.0.0/16).
pub const SERVICE_NET: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 0);
/// First address handed out (low addresses are kept for well-known Services, as in clusters).
const FIRST: u32 = 10;

/// True if `ip` is inside 10.96.0.0/16.
pub fn in_service_net(ip: Ipv4Addr) -> bool {
    u32::from(ip) >> 16 == u32::from(SERVICE_NET) >> 16
}

/// Decides a Service's cluster IP: `requested` (spec.clusterIP; `None` means headless), else
/// the one it already has, else the lowest free address.
pub fn allocate(
    requested: Option<&str>,
    existing: Option<Ipv4Addr>,
    used: &BTreeSet<Ipv4Addr>,
) -> Result<Option<Ipv4Addr>, String> {
    match requested.filter(|r| !r.is_empty()) {
        Some("None") => Ok(None),
        Some(r) => {
            let ip: Ipv4Addr = r
                .parse()
                .map_err(|_| format!("spec.clusterIP {r:?} is not an IPv4 address"))?;
            if !in_service_net(ip) {
                return Err(format!("spec.clusterIP {ip} is outside 10.96.0.0/16"));
            }
            if Some(ip) != existing && used.contains(&ip) {
                return Err(format!("spec.clusterIP {ip} is already allocated"));
            }
            Ok(Some(ip))
        }
        None => {
            if let Some(ip) = existing {
                return Ok(Some(ip));
            }
            let base = u32::from(SERVICE_NET);
            (FIRST..0xffff)
                .map(|i| Ipv4Addr::from(base + i))
                .find(|ip| !used.contains(ip))
                .map(Some)
                .ok_or_else(|| "the service range 10.96.0.0/16 is exhausted".to_string())
        }
    }
}

fn protocol(p: Option<&str>) -> Result<Protocol, String> {
    match p.unwrap_or("TCP") {
        "TCP" => Ok(Protocol::Tcp),
        "UDP" => Ok(Protocol::Udp),
        "SCTP" => Ok(Protocol::Sctp),
        other => Err(format!("unknown protocol {other:?}")),
    }
}

/// What the sandbox keeps of a Service.
pub fn service_state(svc: &Service, cluster_ip: Option<Ipv4Addr>) -> Result<ServiceState, String> {
    let id = NsName::new(
        svc.metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
        svc.metadata.name.clone().unwrap_or_default(),
    );
    let spec = svc.spec.clone().unwrap_or_default();
    let mut ports = Vec::new();
    for p in spec.ports.iter().flatten() {
        let port = u16::try_from(p.port).map_err(|_| format!("port {} out of range", p.port))?;
        let target = match &p.target_port {
            None => TargetPort::Number(port),
            Some(IntOrString::Int(n)) => TargetPort::Number(
                u16::try_from(*n).map_err(|_| format!("targetPort {n} out of range"))?,
            ),
            Some(IntOrString::String(s)) => match s.parse::<u16>() {
                Ok(n) => TargetPort::Number(n),
                Err(_) => TargetPort::Name(s.clone()),
            },
        };
        ports.push(ServicePortState {
            name: p.name.clone(),
            protocol: protocol(p.protocol.as_deref())?,
            port,
            target,
        });
    }
    Ok(ServiceState {
        id,
        cluster_ip,
        selector: spec.selector,
        ports,
        hash: content_hash(svc),
    })
}

/// The Service object as written to the cluster directory: spec.clusterIP(s) filled in.
pub fn with_cluster_ip(svc: &Service, ip: Option<Ipv4Addr>) -> Service {
    let mut out = svc.clone();
    let spec = out.spec.get_or_insert_with(Default::default);
    let v = ip.map_or_else(|| "None".to_string(), |ip| ip.to_string());
    spec.cluster_ip = Some(v.clone());
    spec.cluster_ips = Some(vec![v]);
    out
}

/// True if a pod serves traffic for a Service: same namespace, labels match the selector,
/// running with an IP.
pub fn selects(svc: &ServiceState, pod: &PodState) -> bool {
    let Some(sel) = &svc.selector else {
        return false;
    };
    pod.id.namespace == svc.id.namespace
        && pod.phase == PodPhase::Running
        && pod.ip.is_some()
        && sel.iter().all(|(k, v)| pod.labels.get(k) == Some(v))
}

/// Ready endpoints (pod IP, target port) of one Service port.
pub fn endpoints<'a>(
    svc: &ServiceState,
    port: &ServicePortState,
    pods: impl IntoIterator<Item = &'a PodState>,
) -> Vec<(Ipv4Addr, u16)> {
    pods.into_iter()
        .filter(|p| selects(svc, p))
        .filter_map(|p| {
            let target = match &port.target {
                TargetPort::Number(n) => *n,
                TargetPort::Name(name) => *p.named_ports.get(name)?,
            };
            Some((p.ip?, target))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn allocation_takes_lowest_free_and_keeps_existing() {
        let used: BTreeSet<Ipv4Addr> = ["10.96.0.10", "10.96.0.11"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(
            allocate(None, None, &used),
            Ok(Some(Ipv4Addr::new(10, 96, 0, 12)))
        );
        let mine = Ipv4Addr::new(10, 96, 0, 11);
        assert_eq!(allocate(None, Some(mine), &used), Ok(Some(mine)));
        assert_eq!(
            allocate(Some("10.96.0.11"), Some(mine), &used),
            Ok(Some(mine))
        );
        assert!(allocate(Some("10.96.0.10"), Some(mine), &used).is_err());
        assert!(allocate(Some("10.97.0.1"), None, &used).is_err());
        assert!(allocate(Some("bogus"), None, &used).is_err());
        assert_eq!(allocate(Some("None"), None, &used), Ok(None));
    }

    fn pod(name: &str, ip: u8, labels: &[(&str, &str)], phase: PodPhase) -> PodState {
        PodState {
            id: NsName::new("demo", name),
            uid: name.into(),
            node: "node0".into(),
            netns: "n".into(),
            container_id: "c".into(),
            ip: Some(Ipv4Addr::new(10, 244, 0, ip)),
            phase,
            owner: None,
            spec_hash: String::new(),
            meta_hash: String::new(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            annotations: BTreeMap::new(),
            service_account: "default".into(),
            named_ports: BTreeMap::from([("http".into(), 8080)]),
            tcp_ports: vec![],
            spec: Default::default(),
            containers: vec![],
        }
    }

    #[test]
    fn endpoints_are_ready_selected_pods_with_named_ports_resolved() {
        let svc: Service = serde_yaml::from_str(
            "metadata: {name: echo, namespace: demo}\n\
             spec: {selector: {app: echo}, ports: [{port: 80, targetPort: http}, {port: 81, protocol: UDP}]}",
        )
        .unwrap();
        let st = service_state(&svc, Some(Ipv4Addr::new(10, 96, 0, 10))).unwrap();
        assert_eq!(st.ports[0].target, TargetPort::Name("http".into()));
        assert_eq!(st.ports[1].target, TargetPort::Number(81));
        assert_eq!(st.ports[1].protocol, Protocol::Udp);
        let pods = [
            pod("a", 2, &[("app", "echo")], PodPhase::Running),
            pod("b", 3, &[("app", "other")], PodPhase::Running),
            pod("c", 4, &[("app", "echo")], PodPhase::Pending),
        ];
        assert_eq!(
            endpoints(&st, &st.ports[0], &pods),
            vec![(Ipv4Addr::new(10, 244, 0, 2), 8080)]
        );
        assert_eq!(
            endpoints(&st, &st.ports[1], &pods),
            vec![(Ipv4Addr::new(10, 244, 0, 2), 81)]
        );
    }

    #[test]
    fn written_service_carries_its_cluster_ip() {
        let svc: Service = serde_yaml::from_str("metadata: {name: s}\nspec: {}").unwrap();
        let out = with_cluster_ip(&svc, Some(Ipv4Addr::new(10, 96, 0, 12)));
        let spec = out.spec.unwrap();
        assert_eq!(spec.cluster_ip.as_deref(), Some("10.96.0.12"));
        assert_eq!(spec.cluster_ips, Some(vec!["10.96.0.12".to_string()]));
    }
}
