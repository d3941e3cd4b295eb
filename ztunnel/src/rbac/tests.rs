use std::net::IpAddr;
use std::sync::Arc;

use xds::istio::security as pb;

use super::*;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn conn() -> Connection {
    Connection {
        src_identity: Some(hbone::Identity::new(
            "cluster.local",
            "client-ns",
            "client-sa",
        )),
        src_ip: ip("10.0.0.1"),
        dst_ip: ip("10.0.1.1"),
        dst_port: 8080,
    }
}

fn anonymous() -> Connection {
    Connection {
        src_identity: None,
        ..conn()
    }
}

fn policy(name: &str, action: PolicyAction, m: Match) -> Arc<Authorization> {
    Arc::new(Authorization {
        name: name.into(),
        namespace: "ns".into(),
        scope: PolicyScope::Namespace,
        action,
        rules: vec![Rule {
            clauses: vec![Clause { matches: vec![m] }],
        }],
        dry_run: false,
    })
}

// Builds a Match with only the named categories populated.
macro_rules! m {
    ($($field:ident: $value:expr),* $(,)?) => {
        Match { $($field: $value,)* ..Default::default() }
    };
}

fn holds(m: Match, c: &Connection) -> bool {
    policy("p", PolicyAction::Allow, m).matches(c)
}

fn exact(s: &str) -> StringMatch {
    StringMatch::Exact(s.into())
}

fn sa(ns: &str, sa: &str) -> ServiceAccountMatch {
    ServiceAccountMatch {
        namespace: ns.into(),
        service_account: sa.into(),
    }
}

#[test]
fn namespaces_match_source_identity_namespace() {
    let c = conn();
    assert!(holds(m!(namespaces: vec![exact("client-ns")]), &c));
    assert!(!holds(m!(namespaces: vec![exact("other")]), &c));
    assert!(!holds(m!(not_namespaces: vec![exact("client-ns")]), &c));
    assert!(holds(m!(not_namespaces: vec![exact("other")]), &c));
}

#[test]
fn principals_compare_without_spiffe_scheme() {
    let c = conn();
    let p = "cluster.local/ns/client-ns/sa/client-sa";
    assert!(holds(m!(principals: vec![exact(p)]), &c));
    let with_scheme = format!("spiffe://{p}");
    assert!(!holds(m!(principals: vec![exact(&with_scheme)]), &c));
    assert!(!holds(m!(not_principals: vec![exact(p)]), &c));
    assert!(holds(m!(not_principals: vec![exact("x")]), &c));
}

#[test]
fn string_match_kinds() {
    assert!(StringMatch::Prefix("cluster.local/".into()).matches("cluster.local/ns/a/sa/b"));
    assert!(!StringMatch::Prefix("other/".into()).matches("cluster.local/ns/a/sa/b"));
    assert!(StringMatch::Suffix("/sa/b".into()).matches("cluster.local/ns/a/sa/b"));
    assert!(!StringMatch::Suffix("/sa/c".into()).matches("cluster.local/ns/a/sa/b"));
    assert!(StringMatch::Presence.matches("x"));
    assert!(!StringMatch::Presence.matches(""));
    assert!(!exact("a").matches("ab"));
}

#[test]
fn service_accounts_match_namespace_and_name() {
    let c = conn();
    let yes = || vec![sa("client-ns", "client-sa")];
    let wrong_ns = vec![sa("other", "client-sa")];
    assert!(holds(m!(service_accounts: yes()), &c));
    assert!(!holds(m!(service_accounts: wrong_ns.clone()), &c));
    assert!(!holds(m!(not_service_accounts: yes()), &c));
    assert!(holds(m!(not_service_accounts: wrong_ns), &c));
}

#[test]
fn source_and_destination_ip_ranges() {
    let c = conn();
    let net = |s: &str| vec![s.parse::<IpNet>().unwrap()];
    assert!(holds(m!(source_ips: net("10.0.0.0/24")), &c));
    assert!(!holds(m!(source_ips: net("10.0.1.0/24")), &c));
    assert!(!holds(m!(not_source_ips: net("10.0.0.1")), &c));
    assert!(holds(m!(not_source_ips: net("10.0.0.2")), &c));
    assert!(holds(m!(destination_ips: net("10.0.1.1/32")), &c));
    assert!(!holds(m!(destination_ips: net("10.0.0.0/24")), &c));
    assert!(!holds(m!(not_destination_ips: net("10.0.0.0/16")), &c));
    assert!(holds(m!(not_destination_ips: net("192.168.0.0/16")), &c));
}

#[test]
fn destination_ports() {
    let c = conn();
    assert!(holds(m!(destination_ports: vec![80, 8080]), &c));
    assert!(!holds(m!(destination_ports: vec![80]), &c));
    assert!(!holds(m!(not_destination_ports: vec![8080]), &c));
    assert!(holds(m!(not_destination_ports: vec![9090]), &c));
}

#[test]
fn ipv6_cidrs_match_by_prefix() {
    let net: IpNet = "fd00:1234::/32".parse().unwrap();
    assert!(net.contains(ip("fd00:1234:ffff::1")));
    assert!(!net.contains(ip("fd00:1235::1")));
    assert!(!net.contains(ip("10.0.0.1")));
    let odd: IpNet = "fd00::/9".parse().unwrap();
    assert!(odd.contains(ip("fd7f::1")));
    assert!(!odd.contains(ip("fd80::1")));
    let c = Connection {
        src_ip: ip("fd00:1234::5"),
        dst_ip: ip("fd00:9::1"),
        ..conn()
    };
    assert!(holds(m!(source_ips: vec![net]), &c));
    assert!(!holds(m!(not_source_ips: vec![net]), &c));
}

#[test]
fn ipv4_mapped_source_matches_ipv4_range() {
    let net: IpNet = "10.0.0.0/8".parse().unwrap();
    assert!(net.contains(ip("::ffff:10.1.2.3")));
    assert!(
        "0.0.0.0/0"
            .parse::<IpNet>()
            .unwrap()
            .contains(ip("1.2.3.4"))
    );
}

#[test]
fn ipnet_rejects_bad_ranges() {
    assert!(matches!(
        "10.0.0.0/33".parse::<IpNet>(),
        Err(IpNetError::PrefixLength { .. })
    ));
    assert!(matches!(
        "::/129".parse::<IpNet>(),
        Err(IpNetError::PrefixLength { .. })
    ));
    assert!(matches!(
        "10.0.0.0/x".parse::<IpNet>(),
        Err(IpNetError::Syntax(_))
    ));
    assert!(matches!(
        "nope".parse::<IpNet>(),
        Err(IpNetError::Syntax(_))
    ));
}

#[test]
fn anonymous_source_never_hits_identity_conditions() {
    let c = anonymous();
    assert!(!holds(m!(principals: vec![StringMatch::Presence]), &c));
    assert!(!holds(m!(namespaces: vec![StringMatch::Presence]), &c));
    assert!(!holds(
        m!(service_accounts: vec![sa("client-ns", "client-sa")]),
        &c
    ));
    // notPrincipals: ["*"] is how Istio says "unauthenticated only".
    assert!(holds(m!(not_principals: vec![StringMatch::Presence]), &c));
    assert!(holds(m!(not_namespaces: vec![StringMatch::Presence]), &c));
    assert!(holds(m!(not_service_accounts: vec![sa("a", "b")]), &c));
    assert!(!holds(
        m!(not_principals: vec![StringMatch::Presence]),
        &conn()
    ));
}

#[test]
fn match_requires_every_populated_category() {
    let c = conn();
    let both = m!(namespaces: vec![exact("client-ns")], destination_ports: vec![80]);
    assert!(!holds(both, &c));
    assert!(holds(Match::default(), &c), "an empty match holds");
}

#[test]
fn rule_needs_all_clauses_and_clause_needs_any_match() {
    let c = conn();
    let port = |p| m!(destination_ports: vec![p]);
    let any_of = Clause {
        matches: vec![port(1), port(8080)],
    };
    let none_of = Clause {
        matches: vec![port(1), port(2)],
    };
    assert!(any_of.matches(&c));
    assert!(!none_of.matches(&c));
    assert!(
        Rule {
            clauses: vec![any_of.clone(), Clause::default()]
        }
        .matches(&c)
    );
    assert!(
        !Rule {
            clauses: vec![any_of, none_of]
        }
        .matches(&c)
    );
    assert!(
        Rule::default().matches(&c),
        "a rule without clauses matches everything"
    );
}

#[test]
fn no_policies_allows() {
    assert_eq!(authorize(&[], &conn()), Decision::Allow);
}

#[test]
fn deny_wins_over_allow() {
    let allow = policy("allow", PolicyAction::Allow, Match::default());
    let deny = policy(
        "deny",
        PolicyAction::Deny,
        m!(destination_ports: vec![8080]),
    );
    let d = authorize(&[allow.clone(), deny], &conn());
    assert!(
        matches!(&d, Decision::Deny { policy: Some(k), .. } if k.to_string() == "ns/deny"),
        "{d:?}"
    );
    let other_port = Connection {
        dst_port: 9090,
        ..conn()
    };
    let deny = policy(
        "deny",
        PolicyAction::Deny,
        m!(destination_ports: vec![8080]),
    );
    assert_eq!(authorize(&[allow, deny], &other_port), Decision::Allow);
}

#[test]
fn allow_policies_require_a_match() {
    let allow = policy(
        "a",
        PolicyAction::Allow,
        m!(namespaces: vec![exact("other")]),
    );
    let d = authorize(std::slice::from_ref(&allow), &conn());
    assert!(matches!(d, Decision::Deny { policy: None, .. }));
    assert!(!d.is_allowed());
    let allow2 = policy(
        "b",
        PolicyAction::Allow,
        m!(namespaces: vec![exact("client-ns")]),
    );
    assert!(authorize(&[allow, allow2], &conn()).is_allowed());
}

#[test]
fn only_non_matching_deny_policies_allow() {
    let deny = policy(
        "d",
        PolicyAction::Deny,
        m!(namespaces: vec![exact("other")]),
    );
    assert_eq!(authorize(&[deny], &conn()), Decision::Allow);
}

#[test]
fn allow_policy_without_rules_allows_nothing() {
    let allow_nothing = Arc::new(Authorization {
        name: "allow-nothing".into(),
        namespace: "ns".into(),
        scope: PolicyScope::Namespace,
        action: PolicyAction::Allow,
        rules: vec![],
        dry_run: false,
    });
    assert!(!authorize(std::slice::from_ref(&allow_nothing), &conn()).is_allowed());
    let deny_nothing = Arc::new(Authorization {
        action: PolicyAction::Deny,
        ..(*allow_nothing).clone()
    });
    assert!(authorize(&[deny_nothing], &conn()).is_allowed());
}

#[test]
fn dry_run_policies_are_not_enforced() {
    let mut deny = (*policy("d", PolicyAction::Deny, Match::default())).clone();
    deny.dry_run = true;
    assert!(authorize(&[Arc::new(deny)], &conn()).is_allowed());
    let mut allow = (*policy("a", PolicyAction::Allow, m!(destination_ports: vec![1]))).clone();
    allow.dry_run = true;
    // A dry-run ALLOW does not switch on "some ALLOW must match".
    assert!(authorize(&[Arc::new(allow)], &conn()).is_allowed());
}

fn pb_policy() -> pb::Authorization {
    use pb::string_match::MatchType;
    pb::Authorization {
        name: "p".into(),
        namespace: "ns".into(),
        scope: pb::Scope::WorkloadSelector as i32,
        action: pb::Action::Deny as i32,
        rules: vec![pb::Rule {
            clauses: vec![pb::Clause {
                matches: vec![pb::Match {
                    principals: vec![pb::StringMatch {
                        match_type: Some(MatchType::Presence(())),
                    }],
                    not_namespaces: vec![pb::StringMatch {
                        match_type: Some(MatchType::Suffix("-x".into())),
                    }],
                    source_ips: vec![pb::Address {
                        address: vec![0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                        length: 8,
                    }],
                    destination_ports: vec![443],
                    service_accounts: vec![pb::ServiceAccountMatch {
                        namespace: "a".into(),
                        service_account: "b".into(),
                    }],
                    ..Default::default()
                }],
            }],
        }],
        dry_run: true,
    }
}

#[test]
fn converts_proto_policy() {
    let a = Authorization::try_from(pb_policy()).unwrap();
    assert_eq!(a.key(), PolicyKey::new("ns", "p"));
    assert_eq!(a.scope, PolicyScope::WorkloadSelector);
    assert_eq!(a.action, PolicyAction::Deny);
    assert!(a.dry_run);
    let m = &a.rules[0].clauses[0].matches[0];
    assert_eq!(m.principals, vec![StringMatch::Presence]);
    assert_eq!(m.not_namespaces, vec![StringMatch::Suffix("-x".into())]);
    assert_eq!(m.source_ips[0].to_string(), "fd00::/8");
    assert_eq!(m.destination_ports, vec![443]);
    assert_eq!(m.service_accounts, vec![sa("a", "b")]);
}

#[test]
fn rejects_invalid_proto_policy() {
    type Case = (fn(&mut pb::Authorization), &'static str);
    let cases: Vec<Case> = vec![
        (|a| a.name.clear(), "policy name must not be empty"),
        (|a| a.scope = 5, "scope: unknown enum value 5"),
        (|a| a.action = 3, "action: unknown enum value 3"),
        (
            |a| a.rules[0].clauses[0].matches[0].destination_ports = vec![65536],
            "port 65536",
        ),
        (
            |a| a.rules[0].clauses[0].matches[0].source_ips[0].length = 129,
            "prefix length 129",
        ),
        (
            |a| a.rules[0].clauses[0].matches[0].source_ips[0].address = vec![1; 5],
            "got 5",
        ),
        (
            |a| {
                a.rules[0].clauses[0].matches[0].principals =
                    vec![pb::StringMatch { match_type: None }]
            },
            "principals: string match has no match type",
        ),
        (
            |a| {
                a.rules[0].clauses[0].matches[0].service_accounts[0]
                    .namespace
                    .clear()
            },
            "service_accounts must not be empty",
        ),
    ];
    for (mutate, want) in cases {
        let mut p = pb_policy();
        mutate(&mut p);
        let err = Authorization::try_from(p).unwrap_err().to_string();
        assert!(err.contains(want), "{err:?} should contain {want:?}");
    }
}

#[test]
fn policy_key_parses_and_prints() {
    let k: PolicyKey = "istio-system/allow".parse().unwrap();
    assert_eq!(k, PolicyKey::new("istio-system", "allow"));
    assert_eq!(k.to_string(), "istio-system/allow");
    assert!("noslash".parse::<PolicyKey>().is_err());
    assert!("/x".parse::<PolicyKey>().is_err());
}
