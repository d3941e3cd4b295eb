//! `meshctl sandbox apply`: writes objects into the cluster directory and runs, replaces or
//! removes pods so the sandbox matches the manifests, then waits for the mesh to catch up.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::bail;
use k8s_openapi::api::core::v1::Service;

use super::Session;
use crate::cli::FilesArgs;
use crate::cluster::{self, PodStatus};
use crate::ids::content_hash;
use crate::manifests::{self, DeploymentRef, Document, Manifest};
use crate::pods::{self, Starting};
use crate::services;
use crate::state::{DeploymentState, NsName, ObjectId, PodPhase, State, StateDir};
use crate::workloads::{self, DesiredPod};
use crate::{dns, kubeproxy, settle};

/// Longest wait for the mesh to reflect a change.
const SETTLE_MAX: Duration = Duration::from_secs(30);

/// Runs `apply`.
pub fn run(dir: &StateDir, args: FilesArgs) -> anyhow::Result<()> {
    let docs = manifests::load(&args.files)?;
    let mut s = Session::open(dir)?;
    apply(&s.dir, &mut s.state, docs, args.timeout)
}

fn verb(previous: Option<&String>, hash: &str) -> Option<&'static str> {
    match previous {
        None => Some("created"),
        Some(h) if h != hash => Some("configured"),
        Some(_) => None,
    }
}

/// Applies `docs`; fails (after applying everything else) if any pod could not start.
pub fn apply(
    dir: &StateDir,
    state: &mut State,
    docs: Vec<Document>,
    timeout: Duration,
) -> anyhow::Result<()> {
    // Namespaces first, pods last, as an API server would need them.
    let rank = |d: &Document| match d.manifest {
        Manifest::Namespace { .. } => 0,
        Manifest::Verbatim(_) => 1,
        Manifest::Service(_) => 2,
        Manifest::Workload { .. } => 3,
    };
    let mut docs = docs;
    docs.sort_by_key(rank);
    let mut workloads = Vec::new();
    for d in docs {
        match d.manifest {
            Manifest::Namespace { object, labels } => {
                state.namespaces.insert(d.id.name.clone(), labels);
                write_verbatim(dir, state, &d.id, &object)?;
            }
            Manifest::Verbatim(object) => write_verbatim(dir, state, &d.id, &object)?,
            Manifest::Service(svc) => apply_service(dir, state, &svc)?,
            Manifest::Workload { deployment, pods } => workloads.push((deployment, pods)),
        }
    }
    dir.save(state)?;
    let failures = apply_workloads(dir, state, workloads, timeout)?;
    dns::refresh_all(state)?;
    kubeproxy::refresh_all(dir, state)?;
    dir.save(state)?;
    let pending = settle::wait(dir, state, timeout.min(SETTLE_MAX));
    for p in &pending {
        println!("  warning: {p}");
    }
    if !failures.is_empty() {
        let lines: Vec<String> = failures
            .iter()
            .map(|(id, why)| format!("pod {id}: {why}"))
            .collect();
        bail!("some pods failed to start:\n{}", lines.join("\n"));
    }
    Ok(())
}

fn write_verbatim(
    dir: &StateDir,
    state: &mut State,
    id: &ObjectId,
    object: &serde_yaml::Value,
) -> anyhow::Result<()> {
    let hash = content_hash(object);
    let file = id.file_name();
    let previous = state.objects.get(&file).map(|(_, h)| h);
    let changed = verb(previous, &hash);
    cluster::write_object(dir, id, object)?;
    state.objects.insert(file, (id.clone(), hash));
    println!("{id} {}", changed.unwrap_or("unchanged"));
    Ok(())
}

fn apply_service(dir: &StateDir, state: &mut State, svc: &Service) -> anyhow::Result<()> {
    let id = NsName::new(
        svc.metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
        svc.metadata.name.clone().unwrap_or_default(),
    );
    let existing = state.services.get(&id).and_then(|s| s.cluster_ip);
    let mut used = state.used_cluster_ips();
    if let Some(ip) = existing {
        used.remove(&ip);
    }
    let requested = svc.spec.as_ref().and_then(|s| s.cluster_ip.as_deref());
    let ip = services::allocate(requested, existing, &used)
        .map_err(|e| anyhow::anyhow!("service {id}: {e}"))?;
    let st = services::service_state(svc, ip).map_err(|e| anyhow::anyhow!("service {id}: {e}"))?;
    let previous = state.services.get(&id).map(|s| &s.hash);
    let changed = verb(previous, &st.hash);
    let oid = cluster::service_id(&id.namespace, &id.name);
    let obj = manifests::with_type_meta(
        serde_yaml::to_value(services::with_cluster_ip(svc, ip))?,
        "v1",
        "Service",
    );
    cluster::write_object(dir, &oid, &obj)?;
    let shown = ip.map_or_else(|| "headless".to_string(), |ip| ip.to_string());
    println!("service {id} {} ({shown})", changed.unwrap_or("unchanged"));
    state.services.insert(id, st);
    Ok(())
}

/// What to do with one desired pod.
enum Plan {
    Unchanged,
    Relabel,
    Recreate,
    Create,
}

fn plan(state: &State, want: &DesiredPod) -> Plan {
    match state.pods.get(&want.id) {
        None => Plan::Create,
        Some(p)
            if p.spec_hash != want.spec_hash
                || p.owner != want.owner
                || p.phase == PodPhase::Failed =>
        {
            Plan::Recreate
        }
        Some(p) if p.meta_hash != want.meta_hash => Plan::Relabel,
        Some(_) => Plan::Unchanged,
    }
}

type Failures = Vec<(NsName, String)>;

fn apply_workloads(
    dir: &StateDir,
    state: &mut State,
    workloads: Vec<(Option<DeploymentRef>, Vec<DesiredPod>)>,
    timeout: Duration,
) -> anyhow::Result<Failures> {
    let mut to_delete: BTreeSet<NsName> = BTreeSet::new();
    let mut to_create: Vec<DesiredPod> = Vec::new();
    for (deployment, pods) in workloads {
        if let Some(DeploymentRef {
            namespace: ns,
            name,
            replicas,
        }) = &deployment
        {
            let wanted: BTreeSet<&NsName> = pods.iter().map(|p| &p.id).collect();
            // Scale down: replicas beyond the new count go.
            to_delete.extend(
                state
                    .pods
                    .values()
                    .filter(|p| p.id.namespace == *ns && p.owner.as_deref() == Some(name))
                    .filter(|p| !wanted.contains(&p.id))
                    .map(|p| p.id.clone()),
            );
            let prev = state.deployments.insert(
                NsName::new(ns, name),
                DeploymentState {
                    replicas: *replicas,
                },
            );
            if prev.is_none_or(|p| p.replicas != *replicas) {
                println!("deployment {ns}/{name} replicas={replicas}");
            }
        }
        for want in pods {
            match plan(state, &want) {
                Plan::Unchanged => println!("pod {} unchanged", want.id),
                Plan::Relabel => relabel(dir, state, &want)?,
                Plan::Recreate => {
                    to_delete.insert(want.id.clone());
                    to_create.push(want);
                }
                Plan::Create => to_create.push(want),
            }
        }
    }
    for id in &to_delete {
        pods::delete_pod(dir, state, id)?;
        println!("pod {id} deleted");
    }
    Ok(create_pods(dir, state, to_create, timeout))
}

/// Labels/annotations changed, spec did not: rewrite the object in place, keep the pod.
fn relabel(dir: &StateDir, state: &mut State, want: &DesiredPod) -> anyhow::Result<()> {
    let Some(p) = state.pods.get_mut(&want.id) else {
        return Ok(());
    };
    p.labels = want.labels.clone();
    p.annotations = want.annotations.clone();
    p.meta_hash = want.meta_hash.clone();
    let status = match p.phase {
        PodPhase::Running => PodStatus::Running { ready: true },
        PodPhase::Pending => PodStatus::Pending,
        PodPhase::Failed => PodStatus::Failed,
    };
    pods::write_status(dir, state, &want.id, status)?;
    println!("pod {} configured", want.id);
    Ok(())
}

/// Creates pods in phases (all scheduled, all wired, all started, then waited on together) so
/// the node agents see every pod object before the CNI ADDs that ask about them.
fn create_pods(
    dir: &StateDir,
    state: &mut State,
    wants: Vec<DesiredPod>,
    timeout: Duration,
) -> Failures {
    let mut failures = Vec::new();
    let mut load: BTreeMap<String, usize> = BTreeMap::new();
    for p in state.pods.values() {
        *load.entry(p.node.clone()).or_default() += 1;
    }
    let mut created = Vec::new();
    for want in &wants {
        let r = workloads::schedule(want, &state.nodes, &load)
            .map_err(anyhow::Error::from)
            .and_then(|node| {
                pods::create_sandbox(dir, state, want, &node)?;
                *load.entry(node).or_default() += 1;
                Ok(())
            });
        match r {
            Ok(()) => created.push(want.id.clone()),
            Err(e) => fail(dir, state, &mut failures, &want.id, e),
        }
    }
    let mut wired = Vec::new();
    for id in created {
        match pods::wire(dir, state, &id) {
            Ok(_) => wired.push(id),
            Err(e) => fail(dir, state, &mut failures, &id, e),
        }
    }
    let mut starting = Vec::new();
    for id in wired {
        match pods::start_containers(dir, state, &id) {
            Ok(children) => starting.push(Starting {
                id,
                children,
                since: std::time::Instant::now(),
            }),
            Err(e) => {
                if let Some(p) = state.pods.get_mut(&id) {
                    p.phase = PodPhase::Failed;
                }
                let _ = pods::write_status(dir, state, &id, PodStatus::Failed);
                failures.push((id, format!("{e:#}")));
            }
        }
    }
    let ids: Vec<NsName> = starting.iter().map(|s| s.id.clone()).collect();
    let failed = pods::wait_ready(dir, state, starting, timeout);
    for id in ids {
        if failed.iter().any(|(f, _)| *f == id) {
            continue;
        }
        if let Some(p) = state.pods.get(&id) {
            let ip = p.ip.map(|i| i.to_string()).unwrap_or_default();
            println!("pod {id} created on {} ({ip})", p.node);
        }
    }
    failures.extend(failed);
    failures
}

/// A pod whose sandbox could not be set up is removed again (kubelet would retry).
fn fail(dir: &StateDir, state: &mut State, failures: &mut Failures, id: &NsName, e: anyhow::Error) {
    if let Err(e2) = pods::delete_pod(dir, state, id) {
        eprintln!("  warning: cleaning up pod {id}: {e2:#}");
    }
    failures.push((id.clone(), format!("{e:#}")));
}
