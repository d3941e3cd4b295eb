//! `meshctl sandbox delete`: removes the objects named in manifests. Deleting a Deployment
//! deletes its pods; deleting a Namespace deletes everything in it, as in Kubernetes.

use std::time::Duration;

use super::Session;
use crate::cli::FilesArgs;
use crate::cluster;
use crate::manifests::{self, Document, Manifest};
use crate::pods;
use crate::state::{NsName, ObjectId, State, StateDir};
use crate::{dns, kubeproxy, settle};

/// Runs `delete`.
pub fn run(dir: &StateDir, args: FilesArgs) -> anyhow::Result<()> {
    let docs = manifests::load(&args.files)?;
    let mut s = Session::open(dir)?;
    delete(&s.dir, &mut s.state, docs, args.timeout)
}

/// Deletes what `docs` name.
pub fn delete(
    dir: &StateDir,
    state: &mut State,
    mut docs: Vec<Document>,
    timeout: Duration,
) -> anyhow::Result<()> {
    // Pods first, namespaces last: the reverse of apply.
    docs.sort_by_key(|d| match d.manifest {
        Manifest::Workload { .. } => 0,
        Manifest::Service(_) => 1,
        Manifest::Verbatim(_) => 2,
        Manifest::Namespace { .. } => 3,
    });
    for d in docs {
        let found = match &d.manifest {
            Manifest::Workload { deployment, pods } => {
                let mut ids: Vec<NsName> = pods.iter().map(|p| p.id.clone()).collect();
                let mut found = false;
                if let Some(d) = deployment {
                    let (ns, name) = (&d.namespace, &d.name);
                    found |= state.deployments.remove(&NsName::new(ns, name)).is_some();
                    ids = owned_pods(state, ns, name);
                } else {
                    ids.retain(|id| state.pods.get(id).is_some_and(|p| p.owner.is_none()));
                }
                for id in ids {
                    pods::delete_pod(dir, state, &id)?;
                    println!("pod {id} deleted");
                    found = true;
                }
                found
            }
            Manifest::Service(_) => delete_service(dir, state, &d.id),
            Manifest::Verbatim(_) => delete_object(dir, state, &d.id),
            Manifest::Namespace { .. } => {
                delete_namespace_contents(dir, state, &d.id.name)?;
                state.namespaces.remove(&d.id.name);
                delete_object(dir, state, &d.id)
            }
        };
        if found {
            if !matches!(d.manifest, Manifest::Workload { .. }) {
                println!("{} deleted", d.id);
            }
        } else {
            println!("{} not found", d.id);
        }
        dir.save(state)?;
    }
    dns::refresh_all(state)?;
    kubeproxy::refresh_all(dir, state)?;
    dir.save(state)?;
    for p in settle::wait(dir, state, timeout.min(Duration::from_secs(30))) {
        println!("  warning: {p}");
    }
    Ok(())
}

fn owned_pods(state: &State, ns: &str, name: &str) -> Vec<NsName> {
    state
        .pods
        .values()
        .filter(|p| p.id.namespace == ns && p.owner.as_deref() == Some(name))
        .map(|p| p.id.clone())
        .collect()
}

fn delete_service(dir: &StateDir, state: &mut State, id: &ObjectId) -> bool {
    let ns = id.namespace.clone().unwrap_or_default();
    let key = NsName::new(ns, &id.name);
    let known = state.services.remove(&key).is_some();
    cluster::remove_object(dir, id) || known
}

fn delete_object(dir: &StateDir, state: &mut State, id: &ObjectId) -> bool {
    let known = state.objects.remove(&id.file_name()).is_some();
    cluster::remove_object(dir, id) || known
}

/// Everything in a namespace goes with it.
fn delete_namespace_contents(dir: &StateDir, state: &mut State, ns: &str) -> anyhow::Result<()> {
    let pods: Vec<NsName> = state
        .pods
        .keys()
        .filter(|k| k.namespace == ns)
        .cloned()
        .collect();
    for id in pods {
        pods::delete_pod(dir, state, &id)?;
        println!("pod {id} deleted");
    }
    state.deployments.retain(|k, _| k.namespace != ns);
    let services: Vec<NsName> = state
        .services
        .keys()
        .filter(|k| k.namespace == ns)
        .cloned()
        .collect();
    for id in services {
        delete_service(dir, state, &cluster::service_id(&id.namespace, &id.name));
        println!("service {id} deleted");
    }
    let objects: Vec<ObjectId> = state
        .objects
        .values()
        .filter(|(o, _)| o.namespace.as_deref() == Some(ns))
        .map(|(o, _)| o.clone())
        .collect();
    for o in objects {
        delete_object(dir, state, &o);
        println!("{o} deleted");
    }
    Ok(())
}
