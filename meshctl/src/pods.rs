//! The sandbox's kubelet: a pod's life from scheduling to deletion. A pod is a network
//! namespace wired by the node's CNI chain; its containers are host commands run inside it;
//! its object in the cluster directory follows along (Pending, IP + Running, Ready,
//! Terminating, gone).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use k8s_openapi::api::core::v1::{Container, EnvVar};

use crate::cluster::{self, PodStatus};
use crate::cni::{CniPod, Runtime, first_ipv4};
use crate::dns;
use crate::ids::{fnv64, new_uid};
use crate::netns;
use crate::network::pod_netns;
use crate::processes::{self, ProcessRecord, Spawn};
use crate::state::{ContainerState, NsName, PodPhase, PodState, State, StateDir};
use crate::workloads::{self, DesiredPod, expand_vars};

/// Default (and largest) time containers get between SIGTERM and SIGKILL.
const DEFAULT_GRACE: Duration = Duration::from_secs(5);
const MAX_GRACE: Duration = Duration::from_secs(10);
/// Containers without declared ports count as ready once they stayed up this long.
const MIN_UP: Duration = Duration::from_millis(300);

fn node_ip(state: &State, node: &str) -> String {
    state
        .node(node)
        .map(|n| n.ip.to_string())
        .unwrap_or_default()
}

/// Writes the pod's object with `status`.
pub fn write_status(
    dir: &StateDir,
    state: &State,
    id: &NsName,
    status: PodStatus,
) -> anyhow::Result<()> {
    let pod = state
        .pods
        .get(id)
        .ok_or_else(|| anyhow!("pod {id} unknown"))?;
    let obj = cluster::pod_object(pod, &node_ip(state, &pod.node), status);
    cluster::write_object(dir, &cluster::pod_id(pod), &obj).map(|_| ())
}

/// Records a new pod on `node`, creates its namespace and publishes it as scheduled (Pending).
pub fn create_sandbox(
    dir: &StateDir,
    state: &mut State,
    want: &DesiredPod,
    node: &str,
) -> anyhow::Result<()> {
    let uid = new_uid()?;
    let netns = pod_netns(node, &uid);
    let pod = PodState {
        id: want.id.clone(),
        container_id: format!("msb-{:016x}", fnv64(uid.as_bytes())),
        uid,
        node: node.to_string(),
        netns: netns.clone(),
        ip: None,
        phase: PodPhase::Pending,
        owner: want.owner.clone(),
        spec_hash: want.spec_hash.clone(),
        meta_hash: want.meta_hash.clone(),
        labels: want.labels.clone(),
        annotations: want.annotations.clone(),
        service_account: workloads::service_account(&want.spec),
        named_ports: workloads::named_ports(&want.spec),
        tcp_ports: workloads::tcp_ports(&want.spec),
        spec: want.spec.clone(),
        containers: want
            .spec
            .containers
            .iter()
            .map(|c| ContainerState {
                name: c.name.clone(),
                process: None,
            })
            .collect(),
    };
    state.pods.insert(want.id.clone(), pod);
    // Saved before the namespace exists so `down` knows about it even after a crash.
    dir.save(state)?;
    netns::add(&netns)?;
    write_status(dir, state, &want.id, PodStatus::Pending)
}

fn runtime_for(dir: &StateDir, state: &State, pod: &PodState) -> anyhow::Result<Runtime> {
    let node = state
        .node(&pod.node)
        .ok_or_else(|| anyhow!("node {} of pod {} is unknown", pod.node, pod.id))?;
    Ok(Runtime::new(dir, state, node))
}

fn cni_pod(pod: &PodState) -> CniPod<'_> {
    CniPod {
        namespace: &pod.id.namespace,
        name: &pod.id.name,
        uid: &pod.uid,
        container_id: &pod.container_id,
        netns: &pod.netns,
    }
}

/// Runs CNI ADD for the pod and reports its IP (Running, not ready yet).
pub fn wire(dir: &StateDir, state: &mut State, id: &NsName) -> anyhow::Result<Ipv4Addr> {
    let pod = state
        .pods
        .get(id)
        .ok_or_else(|| anyhow!("pod {id} unknown"))?;
    let rt = runtime_for(dir, state, pod)?;
    let result = rt.add(&cni_pod(pod))?;
    let ip = first_ipv4(&result)
        .ok_or_else(|| anyhow!("CNI ADD for {id} returned no IPv4 address: {result}"))?;
    if let Some(p) = state.pods.get_mut(id) {
        p.ip = Some(ip);
    }
    dir.save(state)?;
    write_status(dir, state, id, PodStatus::Running { ready: false })?;
    Ok(ip)
}

/// The environment of a container: the sandbox's variables, then the container's `env`
/// (`value` with `$(VAR)` expansion, `valueFrom.fieldRef` for the usual downward-API fields).
pub fn container_env(
    state: &State,
    pod: &PodState,
    c: Option<&Container>,
) -> Vec<(String, String)> {
    let ip = pod.ip.map(|i| i.to_string()).unwrap_or_default();
    let path = format!(
        "{}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        state.bin_dir.display()
    );
    let mut env: Vec<(String, String)> = [
        ("PATH", path),
        ("HOME", "/root".to_string()),
        ("POD_NAME", pod.id.name.clone()),
        ("POD_NAMESPACE", pod.id.namespace.clone()),
        ("POD_IP", ip.clone()),
        ("NODE_NAME", pod.node.clone()),
        ("SERVICE_ACCOUNT", pod.service_account.clone()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    for e in c.and_then(|c| c.env.as_ref()).into_iter().flatten() {
        let v = env_value(state, pod, &ip, e, &env);
        env.retain(|(k, _)| k != &e.name);
        env.push((e.name.clone(), v));
    }
    env
}

fn env_value(
    state: &State,
    pod: &PodState,
    ip: &str,
    e: &EnvVar,
    earlier: &[(String, String)],
) -> String {
    if let Some(v) = &e.value {
        return expand_vars(v, earlier);
    }
    let Some(field) = e
        .value_from
        .as_ref()
        .and_then(|f| f.field_ref.as_ref())
        .map(|f| f.field_path.as_str())
    else {
        eprintln!(
            "  warning: pod {} env {}: only value and valueFrom.fieldRef are supported; set to \"\"",
            pod.id, e.name
        );
        return String::new();
    };
    match field {
        "metadata.name" => pod.id.name.clone(),
        "metadata.namespace" => pod.id.namespace.clone(),
        "metadata.uid" => pod.uid.clone(),
        "spec.nodeName" => pod.node.clone(),
        "spec.serviceAccountName" => pod.service_account.clone(),
        "status.podIP" | "status.podIPs" => ip.to_string(),
        "status.hostIP" | "status.hostIPs" => node_ip(state, &pod.node),
        f => label_ref(f, "metadata.labels", &pod.labels)
            .or_else(|| label_ref(f, "metadata.annotations", &pod.annotations))
            .unwrap_or_default(),
    }
}

/// `metadata.labels['key']`.
fn label_ref(field: &str, prefix: &str, map: &BTreeMap<String, String>) -> Option<String> {
    let key = field
        .strip_prefix(prefix)?
        .strip_prefix("['")?
        .strip_suffix("']")?;
    map.get(key).cloned()
}

/// Starts the pod's containers (its hosts file must exist first: it is bind-mounted at exec).
pub fn start_containers(
    dir: &StateDir,
    state: &mut State,
    id: &NsName,
) -> anyhow::Result<Vec<(String, Child)>> {
    let pod = state
        .pods
        .get(id)
        .cloned()
        .ok_or_else(|| anyhow!("pod {id} unknown"))?;
    dns::write_hosts(&pod.netns, &dns::render_hosts(&pod, state))?;
    let log = dir.pod_log(&pod.id.namespace, &pod.id.name);
    let mut children = Vec::new();
    for (i, c) in pod.spec.containers.iter().enumerate() {
        let env = container_env(state, &pod, Some(c));
        let mut argv: Vec<String> = c.command.iter().flatten().cloned().collect();
        argv.extend(c.args.iter().flatten().cloned());
        let argv: Vec<String> = argv.iter().map(|a| expand_vars(a, &env)).collect();
        let Some((program, args)) = argv.split_first() else {
            bail!("pod {id} container {}: empty command", c.name);
        };
        append_line(
            &log,
            &format!("=== meshctl: container {} runs {argv:?}", c.name),
        );
        let cwd = c
            .working_dir
            .clone()
            .map_or_else(|| PathBuf::from("/"), PathBuf::from);
        let child = processes::spawn(&Spawn {
            netns: &pod.netns,
            program: Path::new(program),
            args,
            env: &env,
            log: &log,
            cwd: &cwd,
        })
        .with_context(|| format!("pod {id} container {}", c.name))?;
        let record = ProcessRecord::of(child.id());
        if let Some(p) = state.pods.get_mut(id)
            && let Some(cs) = p.containers.get_mut(i)
        {
            cs.process = record;
        }
        children.push((c.name.clone(), child));
    }
    dir.save(state)?;
    Ok(children)
}

fn append_line(path: &Path, line: &str) {
    use std::io::Write;
    if let Some(d) = path.parent() {
        let _ = std::fs::create_dir_all(d);
    }
    if let Ok(mut f) = std::fs::File::options()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = writeln!(f, "{line}");
    }
}

/// A pod whose containers were started, waiting to be ready.
pub struct Starting {
    /// The pod.
    pub id: NsName,
    /// Its container processes.
    pub children: Vec<(String, Child)>,
    /// When they were started.
    pub since: Instant,
}

/// Waits until every pod's declared TCP ports listen (or its containers stayed up briefly if
/// it declares none); marks them Ready. Returns the pods that failed, with why.
pub fn wait_ready(
    dir: &StateDir,
    state: &mut State,
    mut starting: Vec<Starting>,
    timeout: Duration,
) -> Vec<(NsName, String)> {
    let deadline = Instant::now() + timeout;
    let mut failed = Vec::new();
    while !starting.is_empty() {
        let mut still = Vec::new();
        for mut s in starting {
            let Some(pod) = state.pods.get(&s.id).cloned() else {
                continue;
            };
            let exited = s.children.iter_mut().find_map(|(name, child)| {
                child
                    .try_wait()
                    .ok()
                    .flatten()
                    .map(|st| format!("container {name} exited ({st})"))
            });
            let outcome = if let Some(why) = exited {
                Some(Err(why))
            } else {
                let listening = netns::listening_tcp_ports(&pod.netns).unwrap_or_default();
                let ports_ok = pod.tcp_ports.iter().all(|p| listening.contains(p));
                let up_long_enough = !pod.tcp_ports.is_empty() || s.since.elapsed() >= MIN_UP;
                if ports_ok && up_long_enough {
                    Some(Ok(()))
                } else if Instant::now() >= deadline {
                    Some(Err(format!(
                        "not ready after {timeout:?}: ports {:?} not all listening",
                        pod.tcp_ports
                    )))
                } else {
                    None
                }
            };
            match outcome {
                None => still.push(s),
                Some(Ok(())) => {
                    if let Some(p) = state.pods.get_mut(&s.id) {
                        p.phase = PodPhase::Running;
                    }
                    if let Err(e) =
                        write_status(dir, state, &s.id, PodStatus::Running { ready: true })
                    {
                        failed.push((s.id.clone(), e.to_string()));
                    }
                }
                Some(Err(why)) => {
                    if let Some(p) = state.pods.get_mut(&s.id) {
                        p.phase = PodPhase::Failed;
                    }
                    let _ = write_status(dir, state, &s.id, PodStatus::Failed);
                    let log = dir.pod_log(&s.id.namespace, &s.id.name);
                    failed.push((
                        s.id.clone(),
                        format!(
                            "{why}; last log lines of {}:\n{}",
                            log.display(),
                            processes::log_tail(&log, 10)
                        ),
                    ));
                }
            }
        }
        starting = still;
        if !starting.is_empty() {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let _ = dir.save(state);
    failed
}

/// Deletes a pod as kubelet would: marked terminating, containers stopped, CNI DEL, namespace
/// and object removed. Problems along the way are warnings; the pod is gone afterwards.
pub fn delete_pod(dir: &StateDir, state: &mut State, id: &NsName) -> anyhow::Result<()> {
    let Some(pod) = state.pods.get(id).cloned() else {
        return Ok(());
    };
    let obj = cluster::pod_id(&pod);
    if cluster::object_exists(dir, &obj) && pod.ip.is_some() {
        let _ = write_status(dir, state, id, PodStatus::Terminating);
    }
    let grace = pod
        .spec
        .termination_grace_period_seconds
        .and_then(|s| u64::try_from(s).ok())
        .map_or(DEFAULT_GRACE, Duration::from_secs)
        .min(MAX_GRACE);
    let records: Vec<ProcessRecord> = pod.containers.iter().filter_map(|c| c.process).collect();
    processes::terminate(&records, grace);
    // Anything else still running in the pod (children of the containers, `exec` sessions).
    if let Some(ino) = processes::netns_inode(&netns::path(&pod.netns)) {
        let rest = processes::processes_in_netns(&[ino].into());
        processes::terminate(&rest, Duration::from_secs(2));
    }
    if netns::exists(&pod.netns) {
        match runtime_for(dir, state, &pod) {
            Ok(rt) => {
                if let Err(e) = rt.del(&cni_pod(&pod)) {
                    eprintln!("  warning: {e}");
                }
            }
            Err(e) => eprintln!("  warning: {e}"),
        }
    }
    netns::delete(&pod.netns);
    cluster::remove_object(dir, &obj);
    state.pods.remove(id);
    dir.save(state)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_env_has_pod_facts_and_field_refs() {
        let state = State::new("/opt/mesh".into(), "/c".into(), "info".into());
        let mut pod: PodState = serde_json::from_value(serde_json::json!({
            "id": "demo/echo-0", "uid": "u1", "node": "node1", "netns": "n",
            "container_id": "c", "ip": "10.244.1.2", "phase": "Running", "owner": null,
            "spec_hash": "", "meta_hash": "", "labels": {"app": "echo"}, "annotations": {},
            "service_account": "echo", "named_ports": {}, "tcp_ports": [], "containers": []
        }))
        .unwrap();
        pod.spec = serde_yaml::from_str(
            "containers:\n- name: app\n  env:\n  - {name: A, value: \"ip=$(POD_IP)\"}\n  \
             - {name: B, valueFrom: {fieldRef: {fieldPath: \"metadata.labels['app']\"}}}\n  \
             - {name: POD_NAME, value: override}\n",
        )
        .unwrap();
        let env = container_env(&state, &pod, pod.spec.containers.first());
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("A"), Some("ip=10.244.1.2"));
        assert_eq!(get("B"), Some("echo"));
        assert_eq!(get("POD_NAME"), Some("override"));
        assert_eq!(get("SERVICE_ACCOUNT"), Some("echo"));
        assert!(get("PATH").unwrap().starts_with("/opt/mesh:"));
    }
}
