//! Indexes that let the model find what a change affects without scanning everything.

use std::collections::{BTreeMap, BTreeSet, HashMap};

/// Labels (or a `matchLabels` selector).
pub(crate) type Labels = BTreeMap<String, String>;

/// Namespace and name of a namespaced object.
pub(crate) type NsName = (String, String);

/// What kind of object a workload comes from. `Pod` sorts first: namespace range scans rely on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum WorkloadKind {
    /// A core/v1 Pod.
    Pod,
    /// An Istio WorkloadEntry.
    WorkloadEntry,
    /// An inline endpoint of an Istio ServiceEntry; the name is `<serviceentry>/<address>`.
    ServiceEntryEndpoint,
}

/// Identifies one workload source. Ordered by namespace first so a namespace is a contiguous range.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct WorkloadRef {
    /// Namespace.
    pub ns: String,
    /// Source kind.
    pub kind: WorkloadKind,
    /// Source name (see [`WorkloadKind`]).
    pub name: String,
}

impl WorkloadRef {
    /// Builds a reference.
    pub fn new(ns: &str, kind: WorkloadKind, name: &str) -> Self {
        Self {
            ns: ns.to_string(),
            kind,
            name: name.to_string(),
        }
    }

    /// The xDS resource name (workload uid) of this workload.
    pub fn uid(&self, cluster: &str) -> String {
        match self.kind {
            WorkloadKind::Pod => format!("{cluster}//v1/Pod/{}/{}", self.ns, self.name),
            WorkloadKind::WorkloadEntry => format!(
                "{cluster}/networking.istio.io/WorkloadEntry/{}/{}",
                self.ns, self.name
            ),
            WorkloadKind::ServiceEntryEndpoint => format!(
                "{cluster}/networking.istio.io/ServiceEntry/{}/{}",
                self.ns, self.name
            ),
        }
    }
}

/// True if every selector label is present with the same value (an empty selector matches all).
pub(crate) fn selector_matches(selector: &Labels, labels: &Labels) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Every known workload source with its labels, indexed by label pair.
#[derive(Default, Debug)]
pub(crate) struct LabelIndex {
    all: BTreeSet<WorkloadRef>,
    labels: HashMap<WorkloadRef, Labels>,
    by_label: HashMap<(String, String), BTreeSet<WorkloadRef>>,
}

impl LabelIndex {
    /// Adds or replaces a workload source and its labels.
    pub fn insert(&mut self, r: WorkloadRef, labels: Labels) {
        if self.labels.get(&r) == Some(&labels) {
            return;
        }
        self.remove(&r);
        for (k, v) in &labels {
            self.by_label
                .entry((k.clone(), v.clone()))
                .or_default()
                .insert(r.clone());
        }
        self.all.insert(r.clone());
        self.labels.insert(r, labels);
    }

    /// Forgets a workload source.
    pub fn remove(&mut self, r: &WorkloadRef) {
        let Some(labels) = self.labels.remove(r) else {
            return;
        };
        for pair in labels {
            if let Some(set) = self.by_label.get_mut(&pair) {
                set.remove(r);
                if set.is_empty() {
                    self.by_label.remove(&pair);
                }
            }
        }
        self.all.remove(r);
    }

    /// The labels of a known workload source.
    pub fn labels(&self, r: &WorkloadRef) -> Option<&Labels> {
        self.labels.get(r)
    }

    /// Every workload source.
    pub fn all(&self) -> impl Iterator<Item = &WorkloadRef> {
        self.all.iter()
    }

    /// Every workload source in one namespace.
    pub fn in_namespace<'a>(&'a self, ns: &'a str) -> impl Iterator<Item = &'a WorkloadRef> + 'a {
        namespace_range(&self.all, ns)
    }

    /// Workload sources whose labels match `selector`, in `ns` or (None) in every namespace.
    pub fn select(&self, ns: Option<&str>, selector: &Labels) -> Vec<WorkloadRef> {
        // Start from the rarest selector label: only those candidates can match.
        let smallest = selector
            .iter()
            .map(|(k, v)| self.by_label.get(&(k.clone(), v.clone())))
            .min_by_key(|set| set.map_or(0, |s| s.len()));
        let candidates: Box<dyn Iterator<Item = &WorkloadRef>> = match (smallest, ns) {
            (Some(None), _) => return Vec::new(),
            (Some(Some(set)), Some(ns)) => Box::new(namespace_range(set, ns)),
            (Some(Some(set)), None) => Box::new(set.iter()),
            (None, Some(ns)) => Box::new(self.in_namespace(ns)),
            (None, None) => Box::new(self.all.iter()),
        };
        candidates
            .filter(|r| {
                self.labels
                    .get(*r)
                    .is_some_and(|l| selector_matches(selector, l))
            })
            .cloned()
            .collect()
    }
}

fn namespace_range<'a>(
    set: &'a BTreeSet<WorkloadRef>,
    ns: &'a str,
) -> impl Iterator<Item = &'a WorkloadRef> + 'a {
    let start = WorkloadRef::new(ns, WorkloadKind::Pod, "");
    set.range(start..).take_while(move |r| r.ns == ns)
}

/// Which (namespace, service account) pairs run on which node, counted per pod.
#[derive(Default, Debug)]
pub(crate) struct NodeIdentities {
    by_node: HashMap<String, HashMap<(String, String), usize>>,
}

impl NodeIdentities {
    /// Counts one pod with this identity on `node`.
    pub fn add(&mut self, node: &str, ns: &str, sa: &str) {
        *self
            .by_node
            .entry(node.to_string())
            .or_default()
            .entry((ns.to_string(), sa.to_string()))
            .or_default() += 1;
    }

    /// Uncounts one pod added earlier with [`NodeIdentities::add`].
    pub fn remove(&mut self, node: &str, ns: &str, sa: &str) {
        let Some(ids) = self.by_node.get_mut(node) else {
            return;
        };
        let key = (ns.to_string(), sa.to_string());
        if let Some(n) = ids.get_mut(&key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                ids.remove(&key);
            }
        }
        if ids.is_empty() {
            self.by_node.remove(node);
        }
    }

    /// True if some counted pod on `node` runs as `ns`/`sa`.
    pub fn contains(&self, node: &str, ns: &str, sa: &str) -> bool {
        self.by_node
            .get(node)
            .is_some_and(|ids| ids.contains_key(&(ns.to_string(), sa.to_string())))
    }
}

/// A many-to-many relation kept in both directions (e.g. pod ↔ EndpointSlice).
#[derive(Default, Debug)]
pub(crate) struct Relation<A: Ord + Clone + std::hash::Hash, B: Ord + Clone + std::hash::Hash> {
    forward: HashMap<A, BTreeSet<B>>,
    backward: HashMap<B, BTreeSet<A>>,
}

impl<A: Ord + Clone + std::hash::Hash, B: Ord + Clone + std::hash::Hash> Relation<A, B> {
    /// Replaces everything `a` relates to.
    pub fn set(&mut self, a: &A, bs: BTreeSet<B>) {
        self.clear(a);
        for b in &bs {
            self.backward
                .entry(b.clone())
                .or_default()
                .insert(a.clone());
        }
        if !bs.is_empty() {
            self.forward.insert(a.clone(), bs);
        }
    }

    /// Removes every pair with `a`.
    pub fn clear(&mut self, a: &A) {
        for b in self.forward.remove(a).unwrap_or_default() {
            if let Some(set) = self.backward.get_mut(&b) {
                set.remove(a);
                if set.is_empty() {
                    self.backward.remove(&b);
                }
            }
        }
    }

    /// What `a` relates to.
    pub fn forward(&self, a: &A) -> impl Iterator<Item = &B> {
        self.forward.get(a).into_iter().flatten()
    }

    /// What relates to `b`.
    pub fn backward(&self, b: &B) -> impl Iterator<Item = &A> {
        self.backward.get(b).into_iter().flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn select_filters_by_namespace_and_all_labels() {
        let mut idx = LabelIndex::default();
        let a = WorkloadRef::new("a", WorkloadKind::Pod, "p1");
        let b = WorkloadRef::new("b", WorkloadKind::Pod, "p2");
        let c = WorkloadRef::new("a", WorkloadKind::WorkloadEntry, "we");
        idx.insert(a.clone(), labels(&[("app", "x"), ("v", "1")]));
        idx.insert(b.clone(), labels(&[("app", "x")]));
        idx.insert(c.clone(), labels(&[("app", "x"), ("v", "2")]));
        assert_eq!(
            idx.select(Some("a"), &labels(&[("app", "x")])),
            vec![a.clone(), c]
        );
        assert_eq!(
            idx.select(None, &labels(&[("app", "x"), ("v", "1")])),
            vec![a.clone()]
        );
        assert!(idx.select(None, &labels(&[("app", "y")])).is_empty());
        idx.insert(a.clone(), labels(&[("app", "z")]));
        assert_eq!(idx.select(None, &labels(&[("app", "z")])), vec![a.clone()]);
        assert_eq!(idx.select(Some("a"), &labels(&[("v", "1")])), vec![]);
        idx.remove(&a);
        assert_eq!(idx.in_namespace("a").count(), 1);
        assert_eq!(idx.in_namespace("b").collect::<Vec<_>>(), vec![&b]);
    }

    #[test]
    fn node_identities_count_pods() {
        let mut ids = NodeIdentities::default();
        ids.add("n1", "ns", "sa");
        ids.add("n1", "ns", "sa");
        ids.remove("n1", "ns", "sa");
        assert!(ids.contains("n1", "ns", "sa"));
        ids.remove("n1", "ns", "sa");
        assert!(!ids.contains("n1", "ns", "sa"));
        assert!(!ids.contains("n2", "ns", "sa"));
    }
}
