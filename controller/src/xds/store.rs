//! The resources the server publishes, per type: content-hash versions, aliases for on-demand
//! lookups (`<network>/<ip>` of an Address) and a bounded change log so each connection can
//! compute an incremental push from the generation it last saw.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use prost::Message;
use xds::istio::workload::{Address, address};

/// One published resource.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// Resource name (a workload uid, `<ns>/<hostname>`, `<ns>/<policy>`).
    pub name: String,
    /// Version string: a hash of the type URL and the encoded bytes.
    pub version: String,
    /// The resource body.
    pub resource: prost_types::Any,
    /// Other names a client may subscribe to this resource by.
    pub aliases: Vec<String>,
    /// Store generation at which this content was stored (0 until stored).
    pub generation: u64,
}

impl Entry {
    /// Builds an entry, computing its version and (for Addresses) its aliases.
    pub fn new(type_url: &str, name: String, resource: prost_types::Any) -> Self {
        let version = content_version(&resource);
        let aliases = if type_url == xds::ADDRESS_TYPE {
            address_aliases(&resource.value)
        } else {
            Vec::new()
        };
        Self {
            name,
            version,
            resource,
            aliases,
            generation: 0,
        }
    }
}

/// FNV-1a over the type URL and body: stable across restarts, so a reconnecting client whose
/// `initial_resource_versions` match the current content is sent nothing.
fn content_version(any: &prost_types::Any) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in any
        .type_url
        .bytes()
        .chain([0])
        .chain(any.value.iter().copied())
    {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

fn ip_from_bytes(b: &[u8]) -> Option<IpAddr> {
    match b.len() {
        4 => <[u8; 4]>::try_from(b).ok().map(IpAddr::from),
        16 => <[u8; 16]>::try_from(b).ok().map(IpAddr::from),
        _ => None,
    }
}

/// `<network>/<ip>` keys that on-demand lookups use for workloads and service VIPs.
fn address_aliases(value: &[u8]) -> Vec<String> {
    // An undecodable body simply has no aliases; the client will reject it on its own.
    let Ok(addr) = Address::decode(value) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    match addr.r#type {
        Some(address::Type::Workload(w)) => {
            for ip in w.addresses.iter().filter_map(|b| ip_from_bytes(b)) {
                out.push(format!("{}/{ip}", w.network));
            }
        }
        Some(address::Type::Service(s)) => {
            for a in &s.addresses {
                if let Some(ip) = ip_from_bytes(&a.address) {
                    out.push(format!("{}/{ip}", a.network));
                }
            }
        }
        None => {}
    }
    out
}

#[derive(Debug)]
struct Change {
    generation: u64,
    name: String,
    at: Instant,
    /// Whether the resource existed just before this change, so a proxy that was up to date
    /// before it can be told "removed" only for names it actually holds.
    existed_before: bool,
}

#[derive(Debug, Default)]
struct TypeResources {
    resources: BTreeMap<String, Arc<Entry>>,
    /// alias -> names carrying it (several only on conflicts, e.g. host-network pods).
    aliases: HashMap<String, BTreeSet<String>>,
    log: VecDeque<Change>,
    /// Changes with a generation at or below this are no longer in the log.
    log_floor: u64,
}

impl TypeResources {
    fn unlink_aliases(&mut self, name: &str, entry: &Entry) {
        for alias in &entry.aliases {
            if let Some(names) = self.aliases.get_mut(alias) {
                names.remove(name);
                if names.is_empty() {
                    self.aliases.remove(alias);
                }
            }
        }
    }
}

/// What changed for one type since a generation.
#[derive(Debug, PartialEq)]
pub(crate) enum Changes<'a> {
    /// The names touched (updated or removed), each with whether it existed at the generation
    /// asked about, and when the oldest of those changes happened.
    Names(BTreeMap<&'a str, bool>, Option<Instant>),
    /// The log no longer reaches back that far: compare against everything.
    Truncated,
}

/// Current resources per type URL: name -> (version, body).
#[derive(Debug)]
pub struct ResourceStore {
    types: HashMap<String, TypeResources>,
    generation: u64,
    log_capacity: usize,
}

impl ResourceStore {
    /// An empty store keeping at most `log_capacity` changes per type for incremental pushes.
    pub fn new(log_capacity: usize) -> Self {
        Self {
            types: HashMap::new(),
            generation: 0,
            log_capacity: log_capacity.max(1),
        }
    }

    /// The generation of the latest change (0 when nothing was ever stored).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Applies upserts and removals of one type; returns how many resources actually changed
    /// (an upsert with identical content is not a change).
    pub fn apply(
        &mut self,
        type_url: &str,
        upserts: Vec<Entry>,
        removals: Vec<String>,
        now: Instant,
    ) -> usize {
        let ty = self.types.entry(type_url.to_string()).or_default();
        let mut count = 0;
        let mut log = |log: &mut VecDeque<Change>, name: String, existed_before: bool| {
            self.generation += 1;
            count += 1;
            log.push_back(Change {
                generation: self.generation,
                name,
                at: now,
                existed_before,
            });
            self.generation
        };
        for mut entry in upserts {
            let name = entry.name.clone();
            let existed = match ty.resources.get(&name) {
                Some(old) if old.version == entry.version => continue,
                Some(old) => {
                    let old = old.clone();
                    ty.unlink_aliases(&name, &old);
                    true
                }
                None => false,
            };
            for alias in &entry.aliases {
                ty.aliases
                    .entry(alias.clone())
                    .or_default()
                    .insert(name.clone());
            }
            entry.generation = log(&mut ty.log, name.clone(), existed);
            ty.resources.insert(name, Arc::new(entry));
        }
        for name in removals {
            if let Some(old) = ty.resources.remove(&name) {
                ty.unlink_aliases(&name, &old);
                log(&mut ty.log, name, true);
            }
        }
        while ty.log.len() > self.log_capacity {
            if let Some(c) = ty.log.pop_front() {
                ty.log_floor = c.generation;
            }
        }
        count
    }

    /// The resource called `name`.
    pub fn get(&self, type_url: &str, name: &str) -> Option<&Arc<Entry>> {
        self.types.get(type_url)?.resources.get(name)
    }

    /// The resource called `key`, or carrying `key` as an alias; returns its real name.
    pub fn resolve(&self, type_url: &str, key: &str) -> Option<&Arc<Entry>> {
        let ty = self.types.get(type_url)?;
        if let Some(e) = ty.resources.get(key) {
            return Some(e);
        }
        let name = ty.aliases.get(key)?.iter().next()?;
        ty.resources.get(name)
    }

    /// Every resource of a type, by name.
    pub fn iter(&self, type_url: &str) -> impl Iterator<Item = &Arc<Entry>> {
        self.types
            .get(type_url)
            .into_iter()
            .flat_map(|t| t.resources.values())
    }

    /// Resources of a type in name order, starting after `after` (from the first when `None`).
    pub(crate) fn iter_after<'a>(
        &'a self,
        type_url: &str,
        after: Option<&'a str>,
    ) -> impl Iterator<Item = &'a Arc<Entry>> + 'a {
        use std::ops::Bound;
        let lower = after.map_or(Bound::Unbounded, Bound::Excluded);
        self.types
            .get(type_url)
            .into_iter()
            .flat_map(move |t| t.resources.range::<str, _>((lower, Bound::Unbounded)))
            .map(|(_, e)| e)
    }

    /// Name -> version of every resource of a type.
    pub fn versions(&self, type_url: &str) -> BTreeMap<String, String> {
        self.iter(type_url)
            .map(|e| (e.name.clone(), e.version.clone()))
            .collect()
    }

    /// Number of resources of a type.
    pub fn len(&self, type_url: &str) -> usize {
        self.types.get(type_url).map_or(0, |t| t.resources.len())
    }

    /// Whether a type has no resources.
    pub fn is_empty(&self, type_url: &str) -> bool {
        self.len(type_url) == 0
    }

    /// Names of `type_url` changed after generation `since`.
    pub(crate) fn changes_since(&self, type_url: &str, since: u64) -> Changes<'_> {
        let Some(ty) = self.types.get(type_url) else {
            return Changes::Names(BTreeMap::new(), None);
        };
        if since < ty.log_floor {
            return Changes::Truncated;
        }
        let start = ty.log.partition_point(|c| c.generation <= since);
        let mut names = BTreeMap::new();
        let mut oldest: Option<Instant> = None;
        for c in ty.log.range(start..) {
            // The first change after `since` tells whether the name existed at `since`.
            names.entry(c.name.as_str()).or_insert(c.existed_before);
            oldest = Some(oldest.map_or(c.at, |o| o.min(c.at)));
        }
        Changes::Names(names, oldest)
    }

    /// Generation of the latest change of one type.
    pub(crate) fn type_generation(&self, type_url: &str) -> u64 {
        self.types
            .get(type_url)
            .and_then(|t| t.log.back())
            .map_or(0, |c| c.generation)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use xds::istio::workload::{NetworkAddress, Service, Workload};

    fn any(value: &[u8]) -> prost_types::Any {
        prost_types::Any {
            type_url: "t".into(),
            value: value.to_vec(),
        }
    }

    fn entry(name: &str, v: &[u8]) -> Entry {
        Entry::new("t", name.into(), any(v))
    }

    #[test]
    fn identical_content_is_not_a_change_and_keeps_its_version() {
        let mut s = ResourceStore::new(10);
        let now = Instant::now();
        assert_eq!(s.apply("t", vec![entry("a", b"1")], vec![], now), 1);
        let v1 = s.get("t", "a").unwrap().version.clone();
        assert_eq!(s.apply("t", vec![entry("a", b"1")], vec![], now), 0);
        assert_eq!(s.generation(), 1);
        assert_eq!(s.apply("t", vec![entry("a", b"2")], vec![], now), 1);
        assert_ne!(s.get("t", "a").unwrap().version, v1);
        // Versions depend on content only, so a restarted server computes the same ones.
        assert_eq!(entry("a", b"1").version, v1);
    }

    #[test]
    fn change_log_reports_touched_names_and_truncation() {
        let mut s = ResourceStore::new(2);
        let now = Instant::now();
        s.apply("t", vec![entry("a", b"1")], vec![], now);
        let g = s.generation();
        s.apply("t", vec![entry("b", b"1")], vec!["a".into()], now);
        // `a` existed at `g` (a proxy holding it must hear of its removal); `b` did not.
        match s.changes_since("t", g) {
            Changes::Names(n, Some(_)) => {
                assert_eq!(n, BTreeMap::from([("a", true), ("b", false)]))
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            s.changes_since("t", s.generation()),
            Changes::Names(BTreeMap::new(), None)
        );
        // The first change fell out of the 2-entry log.
        assert_eq!(s.changes_since("t", 0), Changes::Truncated);
        assert_eq!(
            s.changes_since("other", 0),
            Changes::Names(BTreeMap::new(), None)
        );
    }

    #[test]
    fn a_name_created_and_removed_after_a_generation_did_not_exist_then() {
        let mut s = ResourceStore::new(10);
        let now = Instant::now();
        s.apply("t", vec![entry("keep", b"1")], vec![], now);
        let g = s.generation();
        s.apply("t", vec![entry("d", b"1")], vec![], now);
        s.apply("t", vec![entry("d", b"2")], vec![], now);
        s.apply("t", vec![], vec!["d".into()], now);
        s.apply("t", vec![], vec!["keep".into()], now);
        match s.changes_since("t", g) {
            Changes::Names(n, _) => {
                assert_eq!(n, BTreeMap::from([("d", false), ("keep", true)]))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn addresses_resolve_by_network_ip_alias() {
        let w = Address {
            r#type: Some(address::Type::Workload(Workload {
                uid: "c//v1/Pod/ns/p".into(),
                network: "net".into(),
                addresses: vec![vec![10, 0, 0, 9]],
                ..Default::default()
            })),
        };
        let svc = Address {
            r#type: Some(address::Type::Service(Service {
                addresses: vec![NetworkAddress {
                    network: "".into(),
                    address: "fd00::1"
                        .parse::<std::net::Ipv6Addr>()
                        .unwrap()
                        .octets()
                        .to_vec(),
                    length: None,
                }],
                ..Default::default()
            })),
        };
        let mk = |name: &str, a: &Address| {
            Entry::new(
                xds::ADDRESS_TYPE,
                name.into(),
                prost_types::Any {
                    type_url: xds::ADDRESS_TYPE.into(),
                    value: a.encode_to_vec(),
                },
            )
        };
        let mut s = ResourceStore::new(10);
        let t = xds::ADDRESS_TYPE;
        s.apply(
            t,
            vec![mk("c//v1/Pod/ns/p", &w), mk("ns/svc", &svc)],
            vec![],
            Instant::now(),
        );
        assert_eq!(s.resolve(t, "net/10.0.0.9").unwrap().name, "c//v1/Pod/ns/p");
        assert_eq!(s.resolve(t, "/fd00::1").unwrap().name, "ns/svc");
        assert_eq!(s.resolve(t, "ns/svc").unwrap().name, "ns/svc");
        s.apply(t, vec![], vec!["c//v1/Pod/ns/p".into()], Instant::now());
        assert!(
            s.resolve(t, "net/10.0.0.9").is_none(),
            "alias dropped with resource"
        );
    }
}
