//! The sandbox's "API server": the cluster directory the controller and node agents watch,
//! one YAML file per object, written atomically. Pods are written the way kubelet reports
//! them: first scheduled (spec.nodeName), then with status.podIP and conditions.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use crate::state::{ObjectId, PodState, StateDir, write_atomic};

/// What kubelet would report for a pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PodStatus {
    /// Scheduled, sandbox not ready yet.
    Pending,
    /// Sandbox up; `ready` once the containers listen.
    Running {
        /// The Ready condition.
        ready: bool,
    },
    /// Containers failed to start.
    Failed,
    /// Being deleted (deletionTimestamp set, not ready).
    Terminating,
}

/// The object id of a pod.
pub fn pod_id(pod: &PodState) -> ObjectId {
    ObjectId {
        group: String::new(),
        kind: "Pod".into(),
        namespace: Some(pod.id.namespace.clone()),
        name: pod.id.name.clone(),
    }
}

/// The object id of a Service.
pub fn service_id(namespace: &str, name: &str) -> ObjectId {
    ObjectId {
        group: String::new(),
        kind: "Service".into(),
        namespace: Some(namespace.into()),
        name: name.into(),
    }
}

/// Writes `object` as YAML; returns false (and writes nothing) if the file already holds it.
pub fn write_object<T: serde::Serialize>(
    dir: &StateDir,
    id: &ObjectId,
    object: &T,
) -> anyhow::Result<bool> {
    let text = serde_yaml::to_string(object)?;
    let path = dir.cluster_dir().join(id.file_name());
    if std::fs::read_to_string(&path).is_ok_and(|old| old == text) {
        return Ok(false);
    }
    write_atomic(&path, text.as_bytes())
        .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
    Ok(true)
}

/// Removes an object; true if it existed.
pub fn remove_object(dir: &StateDir, id: &ObjectId) -> bool {
    std::fs::remove_file(dir.cluster_dir().join(id.file_name())).is_ok()
}

/// True if the object's file exists.
pub fn object_exists(dir: &StateDir, id: &ObjectId) -> bool {
    Path::exists(&dir.cluster_dir().join(id.file_name()))
}

/// The Pod object for `pod` with `status`.
pub fn pod_object(pod: &PodState, host_ip: &str, status: PodStatus) -> Value {
    let mut spec = serde_json::to_value(&pod.spec).unwrap_or_else(|_| json!({}));
    spec["nodeName"] = json!(pod.node);
    let mut metadata = json!({
        "name": pod.id.name,
        "namespace": pod.id.namespace,
        "uid": pod.uid,
        "labels": pod.labels,
    });
    if !pod.annotations.is_empty() {
        metadata["annotations"] = json!(pod.annotations);
    }
    let ip_status = |phase: &str, ready: bool| {
        let mut s = json!({
            "phase": phase,
            "hostIP": host_ip,
            "conditions": [
                {"type": "PodScheduled", "status": "True"},
                {"type": "Ready", "status": if ready { "True" } else { "False" }},
            ],
        });
        if let Some(ip) = pod.ip {
            s["podIP"] = json!(ip.to_string());
            s["podIPs"] = json!([{"ip": ip.to_string()}]);
        }
        s
    };
    let status = match status {
        PodStatus::Pending => json!({"phase": "Pending", "hostIP": host_ip}),
        PodStatus::Running { ready } => ip_status("Running", ready),
        PodStatus::Failed => ip_status("Failed", false),
        PodStatus::Terminating => {
            metadata["deletionTimestamp"] = json!(rfc3339(SystemTime::now()));
            ip_status("Running", false)
        }
    };
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata,
        "spec": spec,
        "status": status,
    })
}

/// Formats a time as RFC 3339 UTC with second precision (`2024-05-01T12:00:00Z`).
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{NsName, PodPhase};
    use std::collections::BTreeMap;
    use std::net::Ipv4Addr;
    use std::time::Duration;

    fn pod() -> PodState {
        PodState {
            id: NsName::new("demo", "echo-0"),
            uid: "u1".into(),
            node: "node1".into(),
            netns: "msb-node1-1".into(),
            container_id: "c".into(),
            ip: Some(Ipv4Addr::new(10, 244, 1, 2)),
            phase: PodPhase::Running,
            owner: Some("echo".into()),
            spec_hash: String::new(),
            meta_hash: String::new(),
            labels: BTreeMap::from([("app".into(), "echo".into())]),
            annotations: BTreeMap::new(),
            service_account: "echo".into(),
            named_ports: BTreeMap::new(),
            tcp_ports: vec![],
            spec: serde_yaml::from_str("serviceAccountName: echo\ncontainers: [{name: app}]")
                .unwrap(),
            containers: vec![],
        }
    }

    #[test]
    fn running_pod_reports_ip_and_ready_like_kubelet() {
        let v = pod_object(&pod(), "172.30.0.11", PodStatus::Running { ready: true });
        assert_eq!(v["spec"]["nodeName"], "node1");
        assert_eq!(v["spec"]["serviceAccountName"], "echo");
        assert_eq!(v["status"]["podIP"], "10.244.1.2");
        assert_eq!(v["status"]["podIPs"][0]["ip"], "10.244.1.2");
        assert_eq!(v["status"]["conditions"][1]["status"], "True");
        assert_eq!(v["metadata"]["uid"], "u1");
        // The object decodes as a Pod.
        let _: k8s_openapi::api::core::v1::Pod = serde_json::from_value(v).unwrap();
    }

    #[test]
    fn pending_pod_has_no_ip_and_terminating_pod_has_deletion_timestamp() {
        let p = pod_object(&pod(), "h", PodStatus::Pending);
        assert!(p["status"].get("podIP").is_none());
        let t = pod_object(&pod(), "h", PodStatus::Terminating);
        assert!(t["metadata"]["deletionTimestamp"].is_string());
        assert_eq!(t["status"]["conditions"][1]["status"], "False");
    }

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_709_210_096);
        assert_eq!(rfc3339(t), "2024-02-29T12:34:56Z");
    }
}
