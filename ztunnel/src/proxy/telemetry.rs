//! Turning workloads into metric labels and HBONE request headers.

use std::net::SocketAddr;

use http::{HeaderMap, HeaderValue};

use crate::metrics::{PeerLabels, ServiceLabels, UNKNOWN};
use crate::state::{Service, Workload};

fn or_unknown(s: &str) -> String {
    if s.is_empty() {
        UNKNOWN.to_string()
    } else {
        s.to_string()
    }
}

/// Metric labels for one side of a connection.
pub fn peer_labels(w: Option<&Workload>, principal: Option<String>) -> PeerLabels {
    let mut labels = PeerLabels::default();
    if let Some(p) = principal {
        labels.principal = p;
    }
    let Some(w) = w else { return labels };
    let workload = if w.workload_name.is_empty() {
        &w.name
    } else {
        &w.workload_name
    };
    let canonical = if w.canonical_name.is_empty() {
        workload
    } else {
        &w.canonical_name
    };
    PeerLabels {
        workload: or_unknown(workload),
        namespace: or_unknown(&w.namespace),
        principal: labels.principal,
        app: or_unknown(canonical),
        version: or_unknown(&w.canonical_revision),
        canonical_service: or_unknown(canonical),
        canonical_revision: or_unknown(&w.canonical_revision),
        cluster: or_unknown(&w.cluster_id),
    }
}

/// Metric labels of the destination service.
pub fn service_labels(s: Option<&Service>) -> ServiceLabels {
    match s {
        Some(s) => ServiceLabels {
            hostname: or_unknown(&s.hostname),
            namespace: or_unknown(&s.namespace),
            name: or_unknown(&s.name),
        },
        None => ServiceLabels::default(),
    }
}

/// The headers ztunnel puts on an HBONE CONNECT: baggage, forwarded and traceparent.
pub fn connect_headers(
    src: Option<&Workload>,
    cluster: &str,
    client: SocketAddr,
    service: Option<&Service>,
) -> HeaderMap {
    let mut headers = HeaderMap::new();
    if let Some(w) = src {
        let kind = match w.workload_type.to_ascii_lowercase().as_str() {
            "" => "deployment".to_string(),
            other => other.to_string(),
        };
        let name = if w.workload_name.is_empty() {
            &w.name
        } else {
            &w.workload_name
        };
        let baggage = format!(
            "k8s.cluster.name={},k8s.namespace.name={},k8s.{kind}.name={},service.name={},service.version={}",
            if w.cluster_id.is_empty() {
                cluster
            } else {
                &w.cluster_id
            },
            w.namespace,
            name,
            if w.canonical_name.is_empty() {
                name
            } else {
                &w.canonical_name
            },
            w.canonical_revision,
        );
        if let Ok(v) = HeaderValue::from_str(&baggage) {
            headers.insert("baggage", v);
        }
    }
    let mut forwarded = format!("for=\"{client}\"");
    if let Some(s) = service {
        forwarded.push_str(&format!(";host={}", s.hostname));
    }
    if let Ok(v) = HeaderValue::from_str(&forwarded) {
        headers.insert("forwarded", v);
    }
    let trace: u128 = rand::random();
    let span: u64 = rand::random();
    if let Ok(v) = HeaderValue::from_str(&format!("00-{trace:032x}-{span:016x}-00")) {
        headers.insert("traceparent", v);
    }
    headers
}
