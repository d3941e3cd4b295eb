//! Turning workloads into metric labels and HBONE request headers.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use hbone::Identity;
use http::{HeaderMap, HeaderValue};

use crate::metrics::{
    ConnectionLabels, ConnectionSeries, PeerLabels, Reporter, ServiceLabels, UNKNOWN,
};
use crate::state::{Service, Workload};

/// Upper bound on cached label sets per proxy (one proxy per pod). When it is reached, entries
/// for workloads and services the state has since replaced are dropped first; if that frees
/// nothing, the cache starts over.
const SERIES_CACHE: usize = 1024;

/// An `Arc` compared and hashed by address. Holding the `Arc` keeps the address from being
/// reused, so equal pointers always mean the same (immutable) state object.
#[derive(Debug)]
struct ByPtr<T>(Arc<T>);

impl<T> Clone for ByPtr<T> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<T> PartialEq for ByPtr<T> {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl<T> Eq for ByPtr<T> {}

impl<T> Hash for ByPtr<T> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        std::ptr::hash(Arc::as_ptr(&self.0), state)
    }
}

/// Everything the labels of a connection are computed from. Workloads and services are
/// replaced (never mutated) on config changes, so a changed workload is a new key.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SeriesKey {
    reporter: Reporter,
    src: Option<ByPtr<Workload>>,
    src_principal: Option<Identity>,
    dst: Option<ByPtr<Workload>>,
    service: Option<ByPtr<Service>>,
    mtls: bool,
}

impl SeriesKey {
    /// False once the state dropped a workload or service this key holds (only the cache
    /// still has it): such a key can never be looked up again.
    fn is_live(&self) -> bool {
        let held = |a: Option<usize>| a.is_none_or(|n| n > 1);
        held(self.src.as_ref().map(|w| Arc::strong_count(&w.0)))
            && held(self.dst.as_ref().map(|w| Arc::strong_count(&w.0)))
            && held(self.service.as_ref().map(|s| Arc::strong_count(&s.0)))
    }

    /// Key for a connection seen by `reporter`. `src_principal` is the proven peer identity
    /// (inbound); outbound the source principal is the proxy's own, fixed per cache.
    pub fn new(
        reporter: Reporter,
        src: Option<&Arc<Workload>>,
        src_principal: Option<&Identity>,
        dst: Option<&Arc<Workload>>,
        service: Option<&Arc<Service>>,
        mtls: bool,
    ) -> Self {
        Self {
            reporter,
            src: src.map(|w| ByPtr(w.clone())),
            src_principal: src_principal.cloned(),
            dst: dst.map(|w| ByPtr(w.clone())),
            service: service.map(|s| ByPtr(s.clone())),
            mtls,
        }
    }
}

/// Per-proxy cache of resolved metric series, so a connection between the same workloads
/// reuses its label values and counter handles instead of rebuilding them.
#[derive(Default)]
pub struct SeriesCache {
    map: Mutex<HashMap<SeriesKey, Arc<ConnectionSeries>>>,
}

impl SeriesCache {
    /// The series for `key`, building its labels with `labels` on a miss.
    pub fn get(
        &self,
        key: SeriesKey,
        labels: impl FnOnce() -> ConnectionLabels,
    ) -> Arc<ConnectionSeries> {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = map.get(&key) {
            return s.clone();
        }
        if map.len() >= SERIES_CACHE {
            map.retain(|k, _| k.is_live());
            if map.len() >= SERIES_CACHE {
                map.clear();
            }
        }
        let series = Arc::new(ConnectionSeries::new(labels()));
        map.insert(key, series.clone());
        series
    }

    /// Number of cached label sets.
    pub fn len(&self) -> usize {
        self.map.lock().map(|m| m.len()).unwrap_or(0)
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

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

#[cfg(test)]
mod series_tests {
    use super::*;

    fn wl(name: &str) -> Arc<Workload> {
        Arc::new(Workload {
            name: name.into(),
            namespace: "default".into(),
            ..Default::default()
        })
    }

    fn key(src: &Arc<Workload>, dst: &Arc<Workload>) -> SeriesKey {
        SeriesKey::new(Reporter::Source, Some(src), None, Some(dst), None, true)
    }

    #[test]
    fn same_workloads_share_a_series_and_replaced_ones_are_evicted_first() {
        let cache = SeriesCache::default();
        let (a, b) = (wl("a"), wl("b"));
        let first = cache.get(key(&a, &b), ConnectionLabels::default);
        let again = cache.get(key(&a, &b), || panic!("labels rebuilt for a cached pair"));
        assert!(Arc::ptr_eq(&first, &again));
        // Fill the cache with pairs whose destination the state has since replaced.
        for i in 1..SERIES_CACHE {
            let gone = wl(&format!("gone-{i}"));
            cache.get(key(&a, &gone), ConnectionLabels::default);
        }
        assert_eq!(cache.len(), SERIES_CACHE);
        // At the bound, only the dead entries go: the live pair keeps its series.
        let c = wl("c");
        cache.get(key(&a, &c), ConnectionLabels::default);
        assert_eq!(cache.len(), 2);
        let kept = cache.get(key(&a, &b), || panic!("live pair was evicted"));
        assert!(Arc::ptr_eq(&first, &kept));
    }
}
