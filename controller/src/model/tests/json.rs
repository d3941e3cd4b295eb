//! Readable, deterministic JSON for xDS resources (IPs as text, enums by name, maps sorted).

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde_json::{Map, Value, json};
use xds::istio::security as sec;
use xds::istio::workload as wl;

fn ip(b: &[u8]) -> String {
    if let Ok(v4) = <[u8; 4]>::try_from(b) {
        return IpAddr::from(v4).to_string();
    }
    if let Ok(v6) = <[u8; 16]>::try_from(b) {
        return IpAddr::from(v6).to_string();
    }
    format!("invalid:{b:?}")
}

fn enum_name<E: TryFrom<i32>>(v: i32, name: fn(&E) -> &'static str) -> String {
    E::try_from(v)
        .map(|e| name(&e).to_string())
        .unwrap_or_else(|_| format!("UNKNOWN({v})"))
}

/// Inserts `v` unless it is an empty string, array or object, or `false`.
fn put(m: &mut Map<String, Value>, k: &str, v: Value) {
    let empty = match &v {
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        Value::Bool(b) => !b,
        Value::Null => true,
        Value::Number(_) => false,
    };
    if !empty {
        m.insert(k.into(), v);
    }
}

fn ports(ps: &[wl::Port]) -> Value {
    ps.iter()
        .map(|p| json!(format!("{}->{}", p.service_port, p.target_port)))
        .collect()
}

fn network_address(a: &wl::NetworkAddress) -> String {
    let addr = match a.length {
        Some(l) => format!("{}/{l}", ip(&a.address)),
        None => ip(&a.address),
    };
    format!("{}/{addr}", a.network)
}

fn workload(w: &wl::Workload) -> Value {
    let mut m = Map::new();
    put(&mut m, "uid", json!(w.uid));
    put(&mut m, "name", json!(w.name));
    put(&mut m, "namespace", json!(w.namespace));
    put(
        &mut m,
        "addresses",
        w.addresses.iter().map(|a| ip(a)).collect(),
    );
    put(&mut m, "hostname", json!(w.hostname));
    put(&mut m, "network", json!(w.network));
    let tp = enum_name(w.tunnel_protocol, wl::TunnelProtocol::as_str_name);
    m.insert("tunnelProtocol".into(), json!(tp));
    put(&mut m, "trustDomain", json!(w.trust_domain));
    put(&mut m, "serviceAccount", json!(w.service_account));
    put(&mut m, "node", json!(w.node));
    put(&mut m, "canonicalName", json!(w.canonical_name));
    put(&mut m, "canonicalRevision", json!(w.canonical_revision));
    let wt = enum_name(w.workload_type, wl::WorkloadType::as_str_name);
    m.insert("workloadType".into(), json!(wt));
    put(&mut m, "workloadName", json!(w.workload_name));
    let services: BTreeMap<&String, Value> = w
        .services
        .iter()
        .map(|(k, v)| (k, ports(&v.ports)))
        .collect();
    put(&mut m, "services", json!(services));
    put(
        &mut m,
        "authorizationPolicies",
        json!(w.authorization_policies),
    );
    let st = enum_name(w.status, wl::WorkloadStatus::as_str_name);
    m.insert("status".into(), json!(st));
    put(&mut m, "clusterId", json!(w.cluster_id));
    if let Some(l) = &w.locality {
        m.insert(
            "locality".into(),
            json!(format!("{}/{}/{}", l.region, l.zone, l.subzone)),
        );
    }
    if w.network_mode != 0 {
        let nm = enum_name(w.network_mode, wl::NetworkMode::as_str_name);
        m.insert("networkMode".into(), json!(nm));
    }
    if let Some(c) = w.capacity {
        m.insert("capacity".into(), json!(c));
    }
    for (k, set) in [
        ("waypoint", w.waypoint.is_some()),
        ("networkGateway", w.network_gateway.is_some()),
        ("applicationTunnel", w.application_tunnel.is_some()),
        ("nativeTunnel", w.native_tunnel),
    ] {
        if set {
            m.insert(k.into(), json!("SET"));
        }
    }
    Value::Object(m)
}

fn service(s: &wl::Service) -> Value {
    let mut m = Map::new();
    put(&mut m, "name", json!(s.name));
    put(&mut m, "namespace", json!(s.namespace));
    put(&mut m, "hostname", json!(s.hostname));
    put(
        &mut m,
        "addresses",
        s.addresses
            .iter()
            .map(|a| json!(network_address(a)))
            .collect(),
    );
    put(&mut m, "ports", ports(&s.ports));
    put(&mut m, "subjectAltNames", json!(s.subject_alt_names));
    if s.ip_families != 0 {
        let f = enum_name(s.ip_families, wl::IpFamilies::as_str_name);
        m.insert("ipFamilies".into(), json!(f));
    }
    put(&mut m, "canonical", json!(s.canonical));
    if s.waypoint.is_some() || s.load_balancing.is_some() {
        m.insert("extra".into(), json!("SET"));
    }
    Value::Object(m)
}

/// JSON for an `istio.workload.Address`.
pub fn address(a: &wl::Address) -> Value {
    match &a.r#type {
        Some(wl::address::Type::Workload(w)) => json!({ "workload": workload(w) }),
        Some(wl::address::Type::Service(s)) => json!({ "service": service(s) }),
        None => json!(null),
    }
}

fn string_matches(v: &[sec::StringMatch]) -> Value {
    use sec::string_match::MatchType;
    v.iter()
        .map(|m| match &m.match_type {
            Some(MatchType::Exact(s)) => json!({ "exact": s }),
            Some(MatchType::Prefix(s)) => json!({ "prefix": s }),
            Some(MatchType::Suffix(s)) => json!({ "suffix": s }),
            Some(MatchType::Presence(())) => json!({ "presence": {} }),
            None => json!(null),
        })
        .collect()
}

fn cidrs(v: &[sec::Address]) -> Value {
    v.iter()
        .map(|a| json!(format!("{}/{}", ip(&a.address), a.length)))
        .collect()
}

fn service_accounts(v: &[sec::ServiceAccountMatch]) -> Value {
    v.iter()
        .map(|s| json!(format!("{}/{}", s.namespace, s.service_account)))
        .collect()
}

fn rule_match(x: &sec::Match) -> Value {
    let mut m = Map::new();
    put(&mut m, "namespaces", string_matches(&x.namespaces));
    put(&mut m, "notNamespaces", string_matches(&x.not_namespaces));
    put(&mut m, "principals", string_matches(&x.principals));
    put(&mut m, "notPrincipals", string_matches(&x.not_principals));
    put(&mut m, "sourceIps", cidrs(&x.source_ips));
    put(&mut m, "notSourceIps", cidrs(&x.not_source_ips));
    put(&mut m, "destinationIps", cidrs(&x.destination_ips));
    put(&mut m, "notDestinationIps", cidrs(&x.not_destination_ips));
    put(&mut m, "destinationPorts", json!(x.destination_ports));
    put(
        &mut m,
        "notDestinationPorts",
        json!(x.not_destination_ports),
    );
    put(
        &mut m,
        "serviceAccounts",
        service_accounts(&x.service_accounts),
    );
    put(
        &mut m,
        "notServiceAccounts",
        service_accounts(&x.not_service_accounts),
    );
    Value::Object(m)
}

/// JSON for an `istio.security.Authorization`; rules are lists of clauses of matches.
pub fn authorization(a: &sec::Authorization) -> Value {
    let rules: Vec<Value> = a
        .rules
        .iter()
        .map(|r| {
            r.clauses
                .iter()
                .map(|c| c.matches.iter().map(rule_match).collect::<Value>())
                .collect::<Value>()
        })
        .collect();
    json!({
        "name": a.name,
        "namespace": a.namespace,
        "scope": enum_name(a.scope, sec::Scope::as_str_name),
        "action": enum_name(a.action, sec::Action::as_str_name),
        "dryRun": a.dry_run,
        "rules": rules,
    })
}
