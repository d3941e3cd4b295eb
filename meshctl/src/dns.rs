//! Cluster DNS, the simple way: every pod gets /etc/netns/<pod netns>/hosts, which
//! `ip netns exec` bind-mounts over /etc/hosts for the pod's processes, listing every Service
//! as `<svc>.<ns>.svc.cluster.local <svc>.<ns>` (+ `<svc>` in the pod's own namespace).

use std::io::Write;
use std::path::PathBuf;

use crate::services::selects;
use crate::state::{PodState, State};

/// Cluster domain.
pub const DOMAIN: &str = "cluster.local";

/// The hosts file of a pod namespace.
pub fn hosts_path(netns: &str) -> PathBuf {
    PathBuf::from("/etc/netns").join(netns).join("hosts")
}

/// The hosts file content for `pod`.
pub fn render_hosts(pod: &PodState, state: &State) -> String {
    let mut out = String::from(
        "# Written by meshctl sandbox: Service names of the sandbox cluster.\n\
         127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n",
    );
    if let Some(ip) = pod.ip {
        out.push_str(&format!("{ip}\t{}\n", pod.id.name));
    }
    for svc in state.services.values() {
        let (ns, name) = (&svc.id.namespace, &svc.id.name);
        let mut names = format!("{name}.{ns}.svc.{DOMAIN} {name}.{ns}.svc {name}.{ns}");
        if *ns == pod.id.namespace {
            names.push(' ');
            names.push_str(name);
        }
        match svc.cluster_ip {
            Some(ip) => out.push_str(&format!("{ip}\t{names}\n")),
            // Headless: the name resolves to its ready pods.
            None => {
                for p in state.pods.values().filter(|p| selects(svc, p)) {
                    if let Some(ip) = p.ip {
                        out.push_str(&format!("{ip}\t{names}\n"));
                    }
                }
            }
        }
    }
    out
}

/// Writes a pod's hosts file if it changed. The file is rewritten in place, never replaced:
/// running processes see it through a bind mount of this very inode.
pub fn write_hosts(netns: &str, text: &str) -> std::io::Result<()> {
    let path = hosts_path(netns);
    if std::fs::read_to_string(&path).is_ok_and(|old| old == text) {
        return Ok(());
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut f = std::fs::File::options()
        .create(true)
        .write(true)
        .truncate(true)
        .open(&path)?;
    f.write_all(text.as_bytes())
}

/// Rewrites every pod's hosts file.
pub fn refresh_all(state: &State) -> anyhow::Result<()> {
    for pod in state.pods.values() {
        write_hosts(&pod.netns, &render_hosts(pod, state))
            .map_err(|e| anyhow::anyhow!("writing {}: {e}", hosts_path(&pod.netns).display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{NsName, PodPhase, ServiceState};
    use std::collections::BTreeMap;
    use std::net::Ipv4Addr;

    fn pod(ns: &str, name: &str, ip: u8) -> PodState {
        PodState {
            id: NsName::new(ns, name),
            uid: name.into(),
            node: "node0".into(),
            netns: format!("msb-node0-{name}"),
            container_id: "c".into(),
            ip: Some(Ipv4Addr::new(10, 244, 0, ip)),
            phase: PodPhase::Running,
            owner: None,
            spec_hash: String::new(),
            meta_hash: String::new(),
            labels: BTreeMap::from([("app".into(), name.into())]),
            annotations: BTreeMap::new(),
            service_account: "default".into(),
            named_ports: BTreeMap::new(),
            tcp_ports: vec![],
            spec: Default::default(),
            containers: vec![],
        }
    }

    fn svc(ns: &str, name: &str, ip: Option<Ipv4Addr>) -> ServiceState {
        ServiceState {
            id: NsName::new(ns, name),
            cluster_ip: ip,
            selector: Some(BTreeMap::from([("app".into(), name.into())])),
            ports: vec![],
            hash: String::new(),
        }
    }

    #[test]
    fn hosts_list_services_with_short_names_only_in_own_namespace() {
        let mut state = State::new("/b".into(), "/c".into(), "info".into());
        let client = pod("demo", "client", 2);
        state.pods.insert(client.id.clone(), client.clone());
        for s in [
            svc("demo", "echo", Some(Ipv4Addr::new(10, 96, 0, 10))),
            svc("other", "db", Some(Ipv4Addr::new(10, 96, 0, 11))),
        ] {
            state.services.insert(s.id.clone(), s);
        }
        let text = render_hosts(&client, &state);
        assert!(text.contains("10.244.0.2\tclient\n"), "{text}");
        assert!(
            text.contains("10.96.0.10\techo.demo.svc.cluster.local echo.demo.svc echo.demo echo\n"),
            "{text}"
        );
        assert!(
            text.contains("10.96.0.11\tdb.other.svc.cluster.local db.other.svc db.other\n"),
            "{text}"
        );
        assert!(text.starts_with("# Written by meshctl"));
    }

    #[test]
    fn headless_service_resolves_to_its_pods() {
        let mut state = State::new("/b".into(), "/c".into(), "info".into());
        let web = pod("demo", "web", 7);
        state.pods.insert(web.id.clone(), web.clone());
        let s = svc("demo", "web", None);
        state.services.insert(s.id.clone(), s);
        let text = render_hosts(&web, &state);
        assert!(
            text.contains("10.244.0.7\tweb.demo.svc.cluster.local"),
            "{text}"
        );
    }
}
