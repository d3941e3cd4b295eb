//! Deterministic synthetic cluster: ambient namespaces, Deployment-owned pods behind Services
//! (optionally with their EndpointSlices) and a mix of AuthorizationPolicies.
//!
//! Layout: service `s` lives in namespace `s % namespaces`; pod `i` backs service
//! `i % services` (so it shares that namespace), runs on node `i % nodes` and has pod IP
//! `10.244.0.0 + i + 1`. Everything is derived from indexes so a pod can be regenerated with a
//! changed label without keeping the whole cluster in memory.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;

use controller::config::{ConfigEvent, Object};
use controller::crd::{
    AuthorizationAction, AuthorizationPolicy, AuthorizationPolicySpec, Operation, Rule, RuleFrom,
    RuleTo, Source, WorkloadSelector,
};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, Namespace, ObjectReference, Pod, PodCondition, PodIP, PodSpec,
    PodStatus, Service, ServicePort, ServiceSpec,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// Characters Kubernetes uses for generated name suffixes.
const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";

/// Sizes of the synthetic cluster.
#[derive(Clone, Copy, Debug)]
pub struct ClusterSpec {
    /// Pods.
    pub pods: usize,
    /// Services (one Deployment each).
    pub services: usize,
    /// AuthorizationPolicies.
    pub policies: usize,
    /// Namespaces, all ambient.
    pub namespaces: usize,
    /// Nodes the pods are spread over.
    pub nodes: usize,
    /// Also generate one EndpointSlice per Service (Kubernetes-source mode).
    pub slices: bool,
}

/// A deterministic pseudo-random suffix of `len` characters.
fn token(seed: u64, len: usize) -> String {
    // splitmix64: cheap and well spread, so names look like real generated ones.
    let mut x = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= x >> 31;
    (0..len)
        .map(|_| {
            let c = ALPHABET[(x % ALPHABET.len() as u64) as usize];
            x /= ALPHABET.len() as u64;
            c as char
        })
        .collect()
}

fn namespace_name(n: usize) -> String {
    format!("ns-{n:03}")
}

fn service_name(s: usize) -> String {
    format!("svc-{s:04}")
}

/// `pod-template-hash` of a service's Deployment.
fn template_hash(s: usize) -> String {
    token(s as u64 ^ 0x5eed, 10)
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn meta(ns: Option<&str>, name: &str, uid_seed: u64) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_string()),
        namespace: ns.map(str::to_string),
        uid: Some(format!(
            "{}-{}-{}",
            token(uid_seed, 8),
            token(uid_seed ^ 1, 4),
            token(uid_seed ^ 2, 12)
        )),
        resource_version: Some((100_000 + uid_seed).to_string()),
        ..ObjectMeta::default()
    }
}

impl ClusterSpec {
    /// Namespace of service `s`.
    fn service_ns(&self, s: usize) -> usize {
        s % self.namespaces.max(1)
    }

    /// Service backed by pod `i`.
    fn pod_service(&self, i: usize) -> usize {
        i % self.services.max(1)
    }

    /// Pods backing service `s`, in order.
    fn service_pods(&self, s: usize) -> impl Iterator<Item = usize> + '_ {
        (s..self.pods).step_by(self.services.max(1))
    }

    /// Services in namespace `n`, in order.
    fn ns_services(&self, n: usize) -> impl Iterator<Item = usize> + '_ {
        (n..self.services).step_by(self.namespaces.max(1))
    }

    fn pod_ip(i: usize) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 244, 0, 0)).wrapping_add(i as u32 + 1))
    }

    fn pod_name(&self, i: usize) -> String {
        let s = self.pod_service(i);
        format!(
            "{}-{}-{}",
            service_name(s),
            template_hash(s),
            token(i as u64, 5)
        )
    }

    /// Pod `i`; `revision` overrides its `version` label (the canonical revision).
    pub fn pod(&self, i: usize, revision: Option<&str>) -> Pod {
        let s = self.pod_service(i);
        let ns = namespace_name(self.service_ns(s));
        let svc = service_name(s);
        let hash = template_hash(s);
        let name = self.pod_name(i);
        let node = i % self.nodes.max(1);
        let version = revision.unwrap_or(if i % 10 == 9 { "v2" } else { "v1" });
        let mut m = meta(Some(&ns), &name, 1_000_000 + i as u64);
        m.generate_name = Some(format!("{svc}-{hash}-"));
        m.labels = Some(labels(&[
            ("app", &svc),
            ("version", version),
            ("pod-template-hash", &hash),
            ("app.kubernetes.io/part-of", &format!("shop-{ns}")),
        ]));
        m.annotations = Some(labels(&[
            ("kubectl.kubernetes.io/default-container", "app"),
            ("prometheus.io/scrape", "true"),
            ("prometheus.io/port", "9102"),
        ]));
        m.owner_references = Some(vec![OwnerReference {
            api_version: "apps/v1".into(),
            kind: "ReplicaSet".into(),
            name: format!("{svc}-{hash}"),
            uid: token(s as u64 ^ 0xabc, 36),
            controller: Some(true),
            block_owner_deletion: Some(true),
        }]);
        let port = |name: &str, p: i32| ContainerPort {
            name: Some(name.to_string()),
            container_port: p,
            protocol: Some("TCP".into()),
            ..ContainerPort::default()
        };
        let ip = Self::pod_ip(i).to_string();
        // A few pods are not ready, as in any large cluster.
        let ready = if i % 97 == 13 { "False" } else { "True" };
        let condition = |t: &str, status: &str| PodCondition {
            type_: t.to_string(),
            status: status.to_string(),
            ..PodCondition::default()
        };
        Pod {
            metadata: m,
            spec: Some(PodSpec {
                containers: vec![Container {
                    name: "app".into(),
                    image: Some(format!("registry.example.com/shop/{svc}:1.{}", s % 7)),
                    ports: Some(vec![
                        port("http", 8080),
                        port("https", 8443),
                        port("metrics", 9102),
                    ]),
                    ..Container::default()
                }],
                node_name: Some(format!("node-{node:03}")),
                service_account_name: Some(svc.clone()),
                service_account: Some(svc),
                ..PodSpec::default()
            }),
            status: Some(PodStatus {
                phase: Some("Running".into()),
                host_ip: Some(format!("172.18.{}.{}", node / 250, node % 250 + 2)),
                pod_ip: Some(ip.clone()),
                pod_ips: Some(vec![PodIP { ip }]),
                conditions: Some(vec![
                    condition("PodReadyToStartContainers", "True"),
                    condition("Initialized", "True"),
                    condition("Ready", ready),
                    condition("ContainersReady", ready),
                    condition("PodScheduled", "True"),
                ]),
                ..PodStatus::default()
            }),
        }
    }

    fn service(&self, s: usize) -> Service {
        let ns = namespace_name(self.service_ns(s));
        let name = service_name(s);
        let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)).wrapping_add(s as u32 + 1))
            .to_string();
        let port = |name: &str, p: i32, target: IntOrString, proto: Option<&str>| ServicePort {
            name: Some(name.to_string()),
            port: p,
            protocol: Some("TCP".into()),
            target_port: Some(target),
            app_protocol: proto.map(str::to_string),
            ..ServicePort::default()
        };
        let mut ports = vec![
            port("http", 80, IntOrString::Int(8080), Some("http")),
            // Named target port: resolved per pod from its container ports.
            port("https", 443, IntOrString::String("https".into()), None),
        ];
        if s.is_multiple_of(3) {
            ports.push(port("metrics", 9102, IntOrString::Int(9102), None));
        }
        let mut m = meta(Some(&ns), &name, 2_000_000 + s as u64);
        m.labels = Some(labels(&[("app", &name)]));
        Service {
            metadata: m,
            spec: Some(ServiceSpec {
                type_: Some("ClusterIP".into()),
                cluster_ip: Some(ip.clone()),
                cluster_ips: Some(vec![ip]),
                ip_families: Some(vec!["IPv4".into()]),
                ip_family_policy: Some("SingleStack".into()),
                selector: Some(labels(&[("app", &name)])),
                ports: Some(ports),
                session_affinity: Some("None".into()),
                ..ServiceSpec::default()
            }),
            status: None,
        }
    }

    fn slice(&self, s: usize) -> EndpointSlice {
        let ns = namespace_name(self.service_ns(s));
        let name = service_name(s);
        let mut m = meta(
            Some(&ns),
            &format!("{name}-{}", token(s as u64 ^ 0x51ce, 5)),
            3_000_000 + s as u64,
        );
        m.labels = Some(labels(&[
            ("kubernetes.io/service-name", &name),
            (
                "endpointslice.kubernetes.io/managed-by",
                "endpointslice-controller.k8s.io",
            ),
        ]));
        let endpoints = self
            .service_pods(s)
            .map(|i| {
                let ready = i % 97 != 13;
                Endpoint {
                    addresses: vec![Self::pod_ip(i).to_string()],
                    conditions: Some(EndpointConditions {
                        ready: Some(ready),
                        serving: Some(ready),
                        terminating: Some(false),
                    }),
                    node_name: Some(format!("node-{:03}", i % self.nodes.max(1))),
                    target_ref: Some(ObjectReference {
                        kind: Some("Pod".into()),
                        namespace: Some(ns.clone()),
                        name: Some(self.pod_name(i)),
                        ..ObjectReference::default()
                    }),
                    ..Endpoint::default()
                }
            })
            .collect();
        let port = |name: &str, p: i32| EndpointPort {
            name: Some(name.to_string()),
            port: Some(p),
            protocol: Some("TCP".into()),
            ..EndpointPort::default()
        };
        let mut ports = vec![port("http", 8080), port("https", 8443)];
        if s.is_multiple_of(3) {
            ports.push(port("metrics", 9102));
        }
        EndpointSlice {
            metadata: m,
            address_type: "IPv4".into(),
            endpoints,
            ports: Some(ports),
        }
    }

    /// Policy `p`: namespace-wide or selector-scoped, ALLOW or DENY, matching principals,
    /// namespaces, IP blocks and ports.
    fn policy(&self, p: usize) -> AuthorizationPolicy {
        let n = p % self.namespaces.max(1);
        let ns = namespace_name(n);
        let other = namespace_name((n + 1) % self.namespaces.max(1));
        let local: Vec<usize> = self.ns_services(n).collect();
        // Selector policies pick services of their own namespace in turn.
        let target = (!local.is_empty()).then(|| local[(p / self.namespaces.max(1)) % local.len()]);
        let selector = |t: usize| {
            Some(WorkloadSelector {
                match_labels: labels(&[("app", &service_name(t))]),
            })
        };
        let sa = |ns: &str, t: usize| format!("cluster.local/ns/{ns}/sa/{}", service_name(t));
        let from = |source: Source| RuleFrom {
            source: Some(source),
        };
        let to = |ports: &[&str]| RuleTo {
            operation: Some(Operation {
                ports: ports.iter().map(|p| p.to_string()).collect(),
                ..Operation::default()
            }),
        };
        let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let (name, spec) = match (p % 5, target) {
            (1, Some(t)) => (
                format!("allow-callers-{}", service_name(t)),
                AuthorizationPolicySpec {
                    selector: selector(t),
                    action: AuthorizationAction::Allow,
                    rules: vec![Rule {
                        from: vec![from(Source {
                            principals: vec![sa(&ns, t + 1), sa(&other, t + 2)],
                            ..Source::default()
                        })],
                        to: vec![to(&["8080"])],
                        ..Rule::default()
                    }],
                    ..AuthorizationPolicySpec::default()
                },
            ),
            (2, Some(t)) => (
                format!("deny-foreign-metrics-{}", service_name(t)),
                AuthorizationPolicySpec {
                    selector: selector(t),
                    action: AuthorizationAction::Deny,
                    rules: vec![Rule {
                        from: vec![from(Source {
                            not_namespaces: strings(&[&ns, "istio-system", "monitoring"]),
                            ..Source::default()
                        })],
                        to: vec![to(&["9102"])],
                        ..Rule::default()
                    }],
                    ..AuthorizationPolicySpec::default()
                },
            ),
            (3, _) => (
                format!("deny-untrusted-{p}"),
                AuthorizationPolicySpec {
                    action: AuthorizationAction::Deny,
                    rules: vec![
                        Rule {
                            from: vec![from(Source {
                                ip_blocks: strings(&["203.0.113.0/24", "198.51.100.7"]),
                                ..Source::default()
                            })],
                            ..Rule::default()
                        },
                        Rule {
                            from: vec![from(Source {
                                principals: strings(&["*/sa/untrusted"]),
                                ..Source::default()
                            })],
                            ..Rule::default()
                        },
                    ],
                    ..AuthorizationPolicySpec::default()
                },
            ),
            (4, Some(t)) => (
                format!("allow-frontends-{}", service_name(t)),
                AuthorizationPolicySpec {
                    selector: selector(t),
                    action: AuthorizationAction::Allow,
                    rules: vec![
                        Rule {
                            from: vec![from(Source {
                                principals: vec![format!("cluster.local/ns/{ns}/*")],
                                ..Source::default()
                            })],
                            ..Rule::default()
                        },
                        Rule {
                            from: vec![from(Source {
                                namespaces: strings(&["frontend", &other]),
                                ..Source::default()
                            })],
                            to: vec![to(&["8443", "8080"])],
                            ..Rule::default()
                        },
                    ],
                    ..AuthorizationPolicySpec::default()
                },
            ),
            _ => (
                format!("allow-same-namespace-{p}"),
                AuthorizationPolicySpec {
                    action: AuthorizationAction::Allow,
                    rules: vec![Rule {
                        from: vec![from(Source {
                            namespaces: strings(&[&ns, "istio-system"]),
                            ..Source::default()
                        })],
                        to: vec![to(&["8080", "8443", "9102"])],
                        ..Rule::default()
                    }],
                    ..AuthorizationPolicySpec::default()
                },
            ),
        };
        let mut policy = AuthorizationPolicy::new(&name, spec);
        policy.metadata = meta(Some(&ns), &name, 4_000_000 + p as u64);
        policy
    }

    fn namespace(&self, n: usize) -> Namespace {
        let name = namespace_name(n);
        let mut m = meta(None, &name, 5_000_000 + n as u64);
        m.labels = Some(labels(&[
            ("istio.io/dataplane-mode", "ambient"),
            ("kubernetes.io/metadata.name", &name),
        ]));
        Namespace {
            metadata: m,
            ..Namespace::default()
        }
    }

    /// Every object as one initial-state event list: namespaces, pods, services, slices,
    /// policies (the order a Kubernetes source lists them in does not matter to the model).
    pub fn events(&self) -> Vec<ConfigEvent> {
        let apply = |o: Object| ConfigEvent::Apply(Arc::new(o));
        let slices = if self.slices { self.services } else { 0 };
        let mut out = Vec::with_capacity(
            self.namespaces + self.pods + self.services + slices + self.policies + 1,
        );
        out.extend((0..self.namespaces).map(|n| apply(Object::Namespace(self.namespace(n)))));
        out.extend((0..self.pods).map(|i| apply(Object::Pod(self.pod(i, None)))));
        out.extend((0..self.services).map(|s| apply(Object::Service(self.service(s)))));
        if self.slices {
            out.extend((0..self.services).map(|s| apply(Object::EndpointSlice(self.slice(s)))));
        }
        out.extend((0..self.policies).map(|p| apply(Object::AuthorizationPolicy(self.policy(p)))));
        out.push(ConfigEvent::Synced);
        out
    }

    /// The pod changed by change number `k`: spread over the cluster, deterministic.
    pub fn changed_pod(&self, k: usize) -> usize {
        (k.wrapping_mul(7919).wrapping_add(13)) % self.pods.max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pods_share_the_namespace_and_labels_their_service_selects() {
        let c = ClusterSpec {
            pods: 30,
            services: 7,
            policies: 10,
            namespaces: 3,
            nodes: 4,
            slices: true,
        };
        for i in 0..c.pods {
            let pod = c.pod(i, None);
            let svc = c.service(c.pod_service(i));
            assert_eq!(pod.metadata.namespace, svc.metadata.namespace);
            let sel = svc.spec.unwrap().selector.unwrap();
            let l = pod.metadata.labels.unwrap();
            assert!(sel.iter().all(|(k, v)| l.get(k) == Some(v)));
        }
        let changed = c.pod(5, Some("chg-1"));
        assert_eq!(changed.metadata.labels.unwrap()["version"], "chg-1");
        assert_eq!(c.pod(5, None).metadata.name, changed.metadata.name);
    }
}
