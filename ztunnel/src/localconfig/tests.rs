use super::*;

const FULL: &str = r#"
workloads:
- uid: cluster1//v1/Pod/default/local
  name: local
  namespace: default
  serviceAccount: bookinfo
  trustDomain: td.local
  workloadIps: ["127.0.0.1", "::1"]
  protocol: HBONE
  node: node1
  network: net1
  hostname: ""
  waypoint: {destination: "net1/127.0.0.10", hboneMtlsPort: 15009}
  networkGateway: {destination: "istio-system/gw.istio-system.svc.cluster.local"}
  canonicalName: local
  canonicalRevision: v1
  workloadName: local
  workloadType: deployment
  status: Unhealthy
  clusterId: cluster1
  locality: {region: r, zone: z, subzone: s}
  authorizationPolicies: ["default/selected"]
  services:
    "default/example.com":
      80: 8080
- name: bare
  namespace: other
  workloadIps: ["10.0.0.2"]
  services: {}
services:
- name: example
  namespace: default
  hostname: example.com
  vips: ["/127.10.0.1", "net1/fd00::10"]
  ports: {80: 8080, 443: 0}
  subjectAltNames: ["spiffe://td.local/ns/default/sa/other"]
  waypoint: {destination: "default/waypoint.default.svc.cluster.local"}
  canonical: true
policies:
- name: deny-9999
  namespace: default
  scope: Namespace
  action: Deny
  dryRun: true
  rules:
  - - - destinationPorts: [9999]
        notDestinationPorts: [1]
        principals: [{Exact: "td.local/ns/a/sa/b"}, {Presence: {}}]
        notPrincipals: [{Prefix: "x"}]
        namespaces: [{Suffix: "-prod"}]
        notNamespaces: [{Exact: kube-system}]
        serviceAccounts: [{namespace: a, serviceAccount: b}]
        notServiceAccounts: [{namespace: c, serviceAccount: d}]
        sourceIps: ["10.0.0.0/8", "fd00::/16"]
        notSourceIps: ["10.1.1.1"]
        destinationIps: ["127.0.0.1/32"]
        notDestinationIps: ["127.0.0.2"]
- name: allow-all
  namespace: istio-system
  scope: Global
  action: Allow
  rules: [[]]
"#;

fn parse_err(text: &str) -> String {
    match LocalConfig::parse(text).and_then(LocalConfig::into_state) {
        Ok(_) => panic!("expected an error for {text}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn full_example_parses_into_state() {
    let (workloads, services, policies) = LocalConfig::parse(FULL).unwrap().into_state().unwrap();
    let w = &workloads[0];
    assert_eq!(w.uid.as_str(), "cluster1//v1/Pod/default/local");
    assert_eq!(
        w.identity().to_string(),
        "spiffe://td.local/ns/default/sa/bookinfo"
    );
    assert_eq!(w.addresses.len(), 2);
    assert_eq!(w.protocol, InboundProtocol::Hbone);
    assert_eq!(w.status, HealthStatus::Unhealthy);
    assert_eq!(w.locality.zone, "z");
    let wp = w.waypoint.as_ref().unwrap();
    assert_eq!(wp.hbone_mtls_port, 15009);
    assert!(matches!(&wp.destination, GatewayDestination::Address(a) if a.network == "net1"));
    let ng = w.network_gateway.as_ref().unwrap();
    assert!(matches!(ng.destination, GatewayDestination::Hostname(_)));
    assert_eq!(ng.hbone_mtls_port, 15008);
    let key = NamespacedHostname::new("default", "example.com");
    assert_eq!(w.services[&key], vec![PortMapping::new(80, 8080)]);
    assert_eq!(
        w.authorization_policies,
        vec![PolicyKey::new("default", "selected")]
    );

    let bare = &workloads[1];
    assert_eq!(bare.uid.as_str(), "Kubernetes//v1/Pod/other/bare");
    assert_eq!(bare.service_account, "default");
    assert_eq!(bare.protocol, InboundProtocol::Tcp);

    let s = &services[0];
    assert_eq!(
        s.vips[0],
        NetworkAddress::new("", "127.10.0.1".parse().unwrap())
    );
    assert_eq!(s.vips[1].network, "net1");
    assert_eq!(
        s.ports,
        vec![PortMapping::new(80, 8080), PortMapping::new(443, 0)]
    );
    assert!(s.canonical);
    assert!(s.waypoint.is_some());

    let p = &policies[0];
    assert_eq!(
        (p.scope, p.action, p.dry_run),
        (PolicyScope::Namespace, PolicyAction::Deny, true)
    );
    let m = &p.rules[0].clauses[0].matches[0];
    assert_eq!(m.principals[1], StringMatch::Presence);
    assert_eq!(
        m.not_namespaces,
        vec![StringMatch::Exact("kube-system".into())]
    );
    assert_eq!(m.source_ips[1].to_string(), "fd00::/16");
    assert_eq!(m.not_source_ips[0].to_string(), "10.1.1.1/32");
    assert_eq!(m.not_service_accounts[0].service_account, "d");
    assert_eq!(policies[1].rules, vec![Rule { clauses: vec![] }]);
}

#[test]
fn unknown_field_is_rejected_by_name() {
    let err = parse_err("workloads:\n- name: a\n  namespace: b\n  services: {}\n  colour: red\n");
    assert!(err.contains("unknown field `colour`"), "{err}");
    assert!(err.contains("line 5"), "{err}");
    let err = parse_err(
        "policies:\n- {name: a, namespace: b, scope: Global, action: Allow, rules: [[[{destPorts: [1]}]]]}\n",
    );
    assert!(err.contains("unknown field `destPorts`"), "{err}");
}

#[test]
fn missing_services_is_rejected() {
    let err = parse_err("workloads:\n- name: a\n  namespace: b\n");
    assert!(err.contains("missing field `services`"), "{err}");
}

#[test]
fn bad_ips_are_rejected() {
    let err = parse_err(
        "workloads:\n- {name: a, namespace: b, services: {}, workloadIps: [\"10.0.0.300\"]}\n",
    );
    assert!(err.contains("workloads[0]"), "{err}");
    let err = parse_err("services:\n- {namespace: a, hostname: h, vips: [\"net/nope\"]}\n");
    assert!(err.contains("net/nope"), "{err}");
    let err = parse_err(
        "policies:\n- {name: a, namespace: b, scope: Global, action: Allow, rules: [[[{sourceIps: [\"10.0.0.0/40\"]}]]]}\n",
    );
    assert!(err.contains("prefix length 40"), "{err}");
}

#[test]
fn semantic_errors_name_the_entry() {
    let err = parse_err("workloads:\n- {namespace: b, services: {}}\n");
    assert!(
        err.contains("workloads[0]") && err.contains("uid or a name"),
        "{err}"
    );
    let err = parse_err("workloads:\n- {name: a, services: {}}\n");
    assert!(err.contains("invalid workload identity"), "{err}");
    let err = parse_err(
        "workloads:\n- {name: a, namespace: b, services: {}}\n- {name: a, namespace: b, services: {}}\n",
    );
    assert!(
        err.contains("workloads[1]") && err.contains("duplicate"),
        "{err}"
    );
    let err = parse_err("services:\n- {namespace: a, hostname: h, ports: {0: 1}}\n");
    assert!(
        err.contains("services[0]") && err.contains("port 0"),
        "{err}"
    );
    let err = parse_err("workloads:\n- {name: a, namespace: b, services: {\"nohost\": {}}}\n");
    assert!(err.contains("nohost"), "{err}");
    let err = parse_err("workloads:\n- {name: a, namespace: b, services: {}, protocol: QUIC}\n");
    assert!(err.contains("QUIC"), "{err}");
}

#[test]
fn string_match_needs_exactly_one_kind() {
    let policy = |m: &str| {
        format!(
            "policies:\n- {{name: a, namespace: b, scope: Global, action: Deny, rules: [[[{{principals: [{m}]}}]]]}}\n"
        )
    };
    let err = parse_err(&policy("{Exact: a, Prefix: b}"));
    assert!(
        err.contains("exactly one") && err.contains("principals"),
        "{err}"
    );
    let err = parse_err(&policy("{Regex: a}"));
    assert!(err.contains("unknown field `Regex`"), "{err}");
    assert!(
        LocalConfig::parse(&policy("{Suffix: a}"))
            .unwrap()
            .into_state()
            .is_ok()
    );
}

#[test]
fn empty_file_is_an_empty_mesh() {
    let (w, s, p) = LocalConfig::parse("  \n").unwrap().into_state().unwrap();
    assert!(w.is_empty() && s.is_empty() && p.is_empty());
}

#[test]
fn load_reports_missing_file_path() {
    let err = LocalConfig::load("/nonexistent/ztunnel-local.yaml").unwrap_err();
    assert!(
        err.to_string().contains("/nonexistent/ztunnel-local.yaml"),
        "{err}"
    );
}
