//! `meshctl sandbox get pods|services|workloads`: what the sandbox runs and what the mesh sees.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::{load_running, require_root};
use crate::cli::{GetArgs, Output, Resource};
use crate::components::ztunnel_config_dump;
use crate::services::endpoints;
use crate::settle::is_enrolled;
use crate::state::{PodPhase, PodState, State, StateDir, TargetPort};

/// Trust domain of sandbox identities.
const TRUST_DOMAIN: &str = "cluster.local";

/// Runs `get`.
pub fn run(dir: &StateDir, args: GetArgs) -> anyhow::Result<()> {
    require_root()?;
    let state = load_running(dir)?;
    let in_ns = |ns: &str| args.namespace.as_deref().is_none_or(|n| n == ns);
    let rows: Vec<Value> = match args.resource {
        Resource::Pods => state
            .pods
            .values()
            .filter(|p| in_ns(&p.id.namespace))
            .map(pod_row)
            .collect(),
        Resource::Services => state
            .services
            .values()
            .filter(|s| in_ns(&s.id.namespace))
            .map(|s| service_row(&state, s))
            .collect(),
        Resource::Workloads => workloads(&state)?
            .into_iter()
            .filter(|w| in_ns(w["namespace"].as_str().unwrap_or("")))
            .collect(),
    };
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
        Output::Table => {
            let cols: &[(&str, &str)] = match args.resource {
                Resource::Pods => &[
                    ("NAMESPACE", "namespace"),
                    ("NAME", "name"),
                    ("NODE", "node"),
                    ("IP", "ip"),
                    ("STATUS", "status"),
                    ("AMBIENT", "ambient"),
                    ("IDENTITY", "identity"),
                ],
                Resource::Services => &[
                    ("NAMESPACE", "namespace"),
                    ("NAME", "name"),
                    ("CLUSTER-IP", "clusterIP"),
                    ("PORTS", "ports"),
                    ("ENDPOINTS", "endpoints"),
                ],
                Resource::Workloads => &[
                    ("NAMESPACE", "namespace"),
                    ("NAME", "name"),
                    ("ADDRESSES", "addresses"),
                    ("NODE", "node"),
                    ("PROTOCOL", "protocol"),
                    ("IDENTITY", "identity"),
                    ("STATUS", "status"),
                ],
            };
            print!("{}", table(cols, &rows));
        }
    }
    Ok(())
}

/// spiffe://cluster.local/ns/<ns>/sa/<sa>.
pub fn identity(trust_domain: &str, ns: &str, sa: &str) -> String {
    format!("spiffe://{trust_domain}/ns/{ns}/sa/{sa}")
}

fn pod_status(p: &PodState) -> String {
    match p.phase {
        PodPhase::Running
            if p.containers
                .iter()
                .any(|c| !c.process.is_some_and(|r| r.alive())) =>
        {
            "Exited".into()
        }
        phase => phase.to_string(),
    }
}

fn pod_row(p: &PodState) -> Value {
    json!({
        "namespace": p.id.namespace,
        "name": p.id.name,
        "node": p.node,
        "ip": p.ip.map(|i| i.to_string()),
        "status": pod_status(p),
        "ambient": is_enrolled(p),
        "identity": identity(TRUST_DOMAIN, &p.id.namespace, &p.service_account),
        "netns": p.netns,
        "uid": p.uid,
        // The host processes standing in for the containers: unchanged pid and start time
        // mean the container was not restarted.
        "containers": p.containers.iter().map(|c| json!({
            "name": c.name,
            "pid": c.process.map(|r| r.pid),
            "startTime": c.process.map(|r| r.start_time),
        })).collect::<Vec<_>>(),
        "owner": p.owner,
        "labels": p.labels,
    })
}

fn service_row(state: &State, s: &crate::state::ServiceState) -> Value {
    let ports: Vec<String> = s
        .ports
        .iter()
        .map(|p| {
            let target = match &p.target {
                TargetPort::Number(n) => n.to_string(),
                TargetPort::Name(n) => n.clone(),
            };
            format!("{}/{}->{target}", p.port, p.protocol.nft().to_uppercase())
        })
        .collect();
    let mut eps: Vec<String> = s
        .ports
        .iter()
        .flat_map(|p| endpoints(s, p, state.pods.values()))
        .map(|(ip, port)| format!("{ip}:{port}"))
        .collect();
    eps.sort();
    eps.dedup();
    let (ns, name) = (&s.id.namespace, &s.id.name);
    json!({
        "namespace": ns,
        "name": name,
        "clusterIP": s.cluster_ip.map_or_else(|| "None".to_string(), |i| i.to_string()),
        "hostname": format!("{name}.{ns}.svc.{TRUST_DOMAIN}"),
        "ports": ports.join(","),
        "endpoints": eps.join(","),
    })
}

/// Every workload known to any node's ztunnel, by uid.
fn workloads(state: &State) -> anyhow::Result<Vec<Value>> {
    let mut by_uid: BTreeMap<String, Value> = BTreeMap::new();
    for node in &state.nodes {
        let dump = ztunnel_config_dump(node)?;
        for w in dump["workloads"].as_array().into_iter().flatten() {
            let uid = w["uid"].as_str().unwrap_or_default().to_string();
            by_uid.entry(uid).or_insert_with(|| workload_row(w));
        }
    }
    let mut rows: Vec<Value> = by_uid.into_values().collect();
    rows.sort_by_key(|r| (r["namespace"].to_string(), r["name"].to_string()));
    Ok(rows)
}

fn workload_row(w: &Value) -> Value {
    let s = |k: &str| w[k].as_str().unwrap_or_default().to_string();
    let addresses: Vec<String> = w["addresses"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a.as_str().map(str::to_string))
        .collect();
    let td = Some(s("trust_domain")).filter(|t| !t.is_empty());
    json!({
        "namespace": s("namespace"),
        "name": s("name"),
        "uid": s("uid"),
        "addresses": addresses.join(","),
        "node": s("node"),
        "protocol": s("protocol"),
        "identity": identity(td.as_deref().unwrap_or(TRUST_DOMAIN), &s("namespace"), &s("service_account")),
        "status": s("status"),
    })
}

/// Renders rows as aligned columns.
pub fn table(cols: &[(&str, &str)], rows: &[Value]) -> String {
    let cell = |r: &Value, key: &str| match &r[key] {
        Value::Null => "-".to_string(),
        Value::String(s) if s.is_empty() => "-".to_string(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let mut widths: Vec<usize> = cols.iter().map(|(h, _)| h.len()).collect();
    for r in rows {
        for (i, (_, k)) in cols.iter().enumerate() {
            widths[i] = widths[i].max(cell(r, k).len());
        }
    }
    let line = |cells: Vec<String>| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                l.push_str(c);
            } else {
                l.push_str(&format!("{c:<w$}   ", w = widths[i]));
            }
        }
        l.trim_end().to_string() + "\n"
    };
    let mut out = line(cols.iter().map(|(h, _)| h.to_string()).collect());
    for r in rows {
        out.push_str(&line(cols.iter().map(|(_, k)| cell(r, k)).collect()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns_and_marks_missing_values() {
        let rows = vec![
            json!({"a": "x", "b": true}),
            json!({"a": "longer", "b": null}),
        ];
        let t = table(&[("A", "a"), ("B", "b")], &rows);
        assert_eq!(t, "A        B\nx        true\nlonger   -\n");
    }

    #[test]
    fn workload_rows_show_spiffe_identity() {
        let w = json!({"uid": "u", "name": "echo-0", "namespace": "demo", "addresses": ["10.244.1.2"],
            "node": "node1", "protocol": "HBONE", "trust_domain": "cluster.local",
            "service_account": "echo", "status": "Healthy"});
        let r = workload_row(&w);
        assert_eq!(r["identity"], "spiffe://cluster.local/ns/demo/sa/echo");
        assert_eq!(r["addresses"], "10.244.1.2");
    }
}
