//! Node agent + chained CNI plugin, for real: pods wired by Debian's bridge/host-local plugins and
//! then `mesh-cni`, invoked as a container runtime invokes them, with the real controller, agent
//! and ztunnel in a node netns. Needs root.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use e2e::apps::{Client, EchoServer};
use e2e::cni::PodSandbox;
use e2e::mesh::eventually;
use e2e::netns::{listening_tcp, listens_on};
use e2e::node::{Binaries, MeshNode, has_mark_rule, has_redirection};
use e2e::ztunnel::metric_sum;

const APP_PORT: u16 = 8080;
/// ztunnel's in-pod listeners (outbound, inbound plaintext, HBONE).
const ZTUNNEL_PORTS: [u16; 3] = [15001, 15006, 15008];

fn binaries() -> Binaries {
    let agent = PathBuf::from(env!("CARGO_BIN_EXE_mesh-cni-agent"));
    Binaries::in_dir(agent.parent().unwrap())
}

fn app(ip: Ipv4Addr) -> SocketAddr {
    SocketAddr::from((ip, APP_PORT))
}

/// Connects from `ns` to `addr` and checks an echo round trip; returns the client.
fn echo(ns: &str, addr: SocketAddr) -> std::io::Result<Client> {
    let mut c = Client::connect(ns, addr)?;
    c.greeting()?;
    let back = c.echo(b"ping")?;
    if back != b"ping" {
        return Err(std::io::Error::other("echo mismatch"));
    }
    Ok(c)
}

fn mtls_connections(node: &MeshNode, src_ns: &str, src_sa: &str) -> f64 {
    let text = node
        .ztunnel
        .as_ref()
        .map(|z| z.metrics())
        .unwrap_or_default();
    metric_sum(
        &text,
        "istio_tcp_connections_opened_total",
        &[
            ("reporter", "destination"),
            ("security_policy", "mutual_tls"),
            (
                "source_principal",
                &format!("spiffe://cluster.local/ns/{src_ns}/sa/{src_sa}"),
            ),
        ],
    )
}

/// An echo from `client` (namespace shop, SA client) to `server` is captured, goes over HBONE
/// (counted as mutual_tls with the client's identity) and keeps the client's IP.
fn assert_talk_over_hbone(
    node: &MeshNode,
    client: &PodSandbox,
    client_ip: Ipv4Addr,
    server: &PodSandbox,
    server_ip: Ipv4Addr,
) {
    let srv = EchoServer::start(&server.netns, APP_PORT);
    assert!(
        eventually(Duration::from_secs(20), || node.ztunnel_knows(server_ip)
            && node.ztunnel_knows(client_ip)),
        "ztunnel learns both pods\n{}",
        node.logs()
    );
    let before = mtls_connections(node, "shop", "client");
    echo(&client.netns, app(server_ip)).unwrap_or_else(|e| panic!("echo: {e}\n{}", node.logs()));
    assert!(
        eventually(Duration::from_secs(5), || mtls_connections(
            node, "shop", "client"
        ) > before),
        "connection reported as mutual_tls with the client's identity\n{}",
        node.ztunnel.as_ref().unwrap().metrics()
    );
    let peers = srv.peers.lock().unwrap().clone();
    assert_eq!(
        peers.last().map(|p| p.ip()),
        Some(client_ip.into()),
        "source IP preserved"
    );
}

#[test]
fn ambient_pods_are_enrolled_at_add_talk_over_hbone_and_del_removes_everything() {
    if !e2e::require_root() {
        return;
    }
    let mut node = MeshNode::start(&binaries(), 40);
    node.namespace("shop", true);
    node.namespace("legacy", false);
    let (client, r) = node.create_pod("shop", "client", "client", &[]);
    let client_ip = r.unwrap_or_else(|e| panic!("ADD client: {e:?}\n{}", node.logs()));
    let (server, r) = node.create_pod("shop", "server", "server", &[]);
    let server_ip = r.unwrap_or_else(|e| panic!("ADD server: {e:?}\n{}", node.logs()));
    let (plain, r) = node.create_pod("legacy", "plain", "default", &[]);
    r.unwrap_or_else(|e| panic!("ADD plain: {e:?}\n{}", node.logs()));
    let (optout, r) = node.create_pod(
        "shop",
        "optout",
        "default",
        &[("istio.io/dataplane-mode", "none")],
    );
    r.unwrap_or_else(|e| panic!("ADD optout: {e:?}\n{}", node.logs()));

    assert!(
        has_redirection(&client) && has_mark_rule(&client),
        "client redirected"
    );
    assert!(has_redirection(&server), "server redirected");
    assert!(!has_redirection(&plain), "non-ambient namespace untouched");
    assert!(!has_redirection(&optout), "opted-out pod untouched");
    assert_eq!(node.agent_metric("mesh_cni_enrolled_pods", &[]), 2.0);

    // Traffic between the two enrolled pods is captured and goes over HBONE.
    assert_talk_over_hbone(&node, &client, client_ip, &server, server_ip);

    // CHECK passes for an intact pod; DEL removes rules and the pod from ztunnel.
    node.cni
        .check(&client)
        .unwrap_or_else(|e| panic!("CHECK: {e:?}"));
    node.cni
        .del(&client)
        .unwrap_or_else(|e| panic!("DEL: {e:?}"));
    assert!(!has_redirection(&client), "DEL removes the nft table");
    assert!(!has_mark_rule(&client), "DEL removes the routing rule");
    assert_eq!(node.agent_metric("mesh_cni_enrolled_pods", &[]), 1.0);
    // A second DEL (runtimes retry) is fine.
    node.cni
        .del(&client)
        .unwrap_or_else(|e| panic!("second DEL: {e:?}"));
}

#[test]
fn with_the_agent_down_ambient_pods_fail_add_and_others_start() {
    if !e2e::require_root() {
        return;
    }
    let mut node = MeshNode::start(&binaries(), 41);
    node.namespace("shop", true);
    node.namespace("legacy", false);
    node.stop_agent();
    let (amb, r) = node.create_pod("shop", "web", "default", &[]);
    let err = r.expect_err("ambient pod must not start without the agent");
    assert!(
        err.output.contains("unreachable"),
        "clear CNI error: {}",
        err.output
    );
    assert!(
        err.output.contains("\"code\""),
        "CNI error JSON: {}",
        err.output
    );
    let (_plain, r) = node.create_pod("legacy", "web", "default", &[]);
    r.unwrap_or_else(|e| panic!("non-ambient pod starts without the agent: {e:?}"));
    // DEL of the failed pod succeeds even with the agent down.
    node.cni.del(&amb).unwrap_or_else(|e| panic!("DEL: {e:?}"));
}

#[test]
fn namespace_label_enrolls_and_unenrolls_running_pods_without_touching_others() {
    if !e2e::require_root() {
        return;
    }
    let mut node = MeshNode::start(&binaries(), 42);
    node.namespace("shop", true);
    node.namespace("legacy", false);
    let (a, r) = node.create_pod("shop", "a", "a", &[]);
    r.unwrap();
    let (b, r) = node.create_pod("shop", "b", "b", &[]);
    let b_ip = r.unwrap();
    let (late, r) = node.create_pod("legacy", "late", "late", &[]);
    r.unwrap();
    assert!(!has_redirection(&late));
    let _srv = EchoServer::start(&b.netns, APP_PORT);
    assert!(eventually(Duration::from_secs(20), || node.ztunnel_knows(b_ip)));
    let mut long_lived =
        echo(&a.netns, app(b_ip)).unwrap_or_else(|e| panic!("{e}\n{}", node.logs()));

    node.namespace("legacy", true);
    assert!(
        eventually(Duration::from_secs(10), || has_redirection(&late)),
        "labelling the namespace enrolls its running pod\n{}",
        node.logs()
    );
    assert!(eventually(Duration::from_secs(5), || {
        node.agent_metric("mesh_cni_enrolled_pods", &[]) == 3.0
    }));
    // The newly enrolled pod now talks over HBONE with its identity.
    assert!(
        eventually(Duration::from_secs(20), || {
            echo(&late.netns, app(b_ip)).is_ok() && mtls_connections(&node, "legacy", "late") > 0.0
        }),
        "enrolled pod uses mTLS\n{}",
        node.logs()
    );

    node.namespace("legacy", false);
    assert!(
        eventually(Duration::from_secs(10), || !has_redirection(&late)
            && !has_mark_rule(&late)),
        "removing the label unenrolls the pod"
    );
    // The long-lived connection between the other pods never noticed.
    assert_eq!(long_lived.echo(b"still here").unwrap(), b"still here");
}

#[test]
fn deleted_rules_are_repaired_and_restarts_keep_pods_enrolled() {
    if !e2e::require_root() {
        return;
    }
    let mut node = MeshNode::start(&binaries(), 43);
    node.namespace("shop", true);
    let (a, r) = node.create_pod("shop", "a", "a", &[]);
    r.unwrap();
    let (b, r) = node.create_pod("shop", "b", "b", &[]);
    let b_ip = r.unwrap();
    let _srv = EchoServer::start(&b.netns, APP_PORT);
    assert!(eventually(Duration::from_secs(20), || node.ztunnel_knows(b_ip)));
    echo(&a.netns, app(b_ip)).unwrap_or_else(|e| panic!("{e}\n{}", node.logs()));

    // Someone deletes the pod's redirection rules by hand: the agent puts the same ruleset
    // back, and traffic is captured (mTLS) again, not sent around ztunnel in plaintext.
    let ruleset = || {
        let out = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &a.netns,
                "nft",
                "list",
                "table",
                "inet",
                "istio-ambient",
            ])
            .output()
            .expect("nft list");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let programmed = ruleset();
    assert!(programmed.contains("15001"), "{programmed}");
    e2e::netns::sh(&[
        "ip",
        "netns",
        "exec",
        &a.netns,
        "nft",
        "flush",
        "table",
        "inet",
        "istio-ambient",
    ]);
    assert!(
        eventually(Duration::from_secs(10), || node
            .agent_metric("mesh_cni_repairs_total", &[])
            >= 1.0),
        "drift detected and repaired\n{}",
        node.logs()
    );
    assert!(
        eventually(Duration::from_secs(10), || ruleset() == programmed),
        "ruleset restored as programmed\n{}",
        ruleset()
    );
    let before = mtls_connections(&node, "shop", "a");
    echo(&a.netns, app(b_ip)).expect("traffic after repair");
    assert!(
        eventually(Duration::from_secs(5), || mtls_connections(
            &node, "shop", "a"
        ) > before),
        "traffic after repair goes over mTLS"
    );

    // Agent restart: pods stay enrolled (rules kept, ztunnel keeps serving them).
    node.stop_agent();
    assert!(has_redirection(&a), "rules survive the agent stopping");
    echo(&a.netns, app(b_ip)).expect("traffic with the agent down");
    node.start_agent();
    assert!(
        eventually(Duration::from_secs(10), || {
            node.agent_metric("mesh_cni_enrolled_pods", &[]) == 2.0
        }),
        "restored\n{}",
        node.logs()
    );

    // ztunnel restart: it gets the snapshot again and serves both pods.
    node.stop_ztunnel();
    assert!(
        Client::connect(&a.netns, app(b_ip))
            .and_then(|mut c| c.greeting())
            .is_err(),
        "no plaintext bypass while ztunnel is down"
    );
    node.start_ztunnel();
    assert!(
        eventually(Duration::from_secs(20), || echo(&a.netns, app(b_ip))
            .is_ok()),
        "traffic resumes after ztunnel restarts\n{}",
        node.logs()
    );
}

#[test]
fn pods_the_agent_never_saw_are_found_by_ip_when_enrolled_and_released_when_unenrolled() {
    if !e2e::require_root() {
        return;
    }
    let mut node = MeshNode::start(&binaries(), 44);
    node.namespace("shop", true);
    node.namespace("legacy", false);
    let (b, r) = node.create_pod("shop", "b", "b", &[]);
    let b_ip = r.unwrap();
    let _srv = EchoServer::start(&b.netns, APP_PORT);
    // The pod starts while the agent is down, so no ADD ever told the agent its netns.
    node.stop_agent();
    let (old, r) = node.create_pod("legacy", "old", "old", &[]);
    r.unwrap_or_else(|e| panic!("non-ambient pod starts without the agent: {e:?}"));
    node.start_agent();
    assert!(eventually(Duration::from_secs(20), || node.ztunnel_knows(b_ip)));
    assert!(!has_redirection(&old));

    // Labelling its namespace: the agent finds the netns holding the pod's IP, programs it and
    // hands it to ztunnel, which opens its listeners there.
    node.namespace("legacy", true);
    assert!(
        eventually(Duration::from_secs(10), || has_redirection(&old)),
        "pod found by IP and enrolled\n{}",
        node.logs()
    );
    assert!(
        node.logs().contains("found a running pod's netns"),
        "enrolled through the netns search, not an ADD\n{}",
        node.logs()
    );
    assert!(
        eventually(Duration::from_secs(10), || ZTUNNEL_PORTS
            .iter()
            .all(|&p| listens_on(&old.netns, p))),
        "ztunnel listens in the found netns: {}",
        listening_tcp(&old.netns)
    );
    assert!(
        eventually(Duration::from_secs(20), || {
            echo(&old.netns, app(b_ip)).is_ok() && mtls_connections(&node, "legacy", "old") > 0.0
        }),
        "found pod talks mTLS\n{}",
        node.logs()
    );

    // Unenrolling removes the rules and tells ztunnel, which closes its listeners there.
    node.namespace("legacy", false);
    assert!(
        eventually(Duration::from_secs(10), || !has_redirection(&old)
            && !has_mark_rule(&old)),
        "rules removed"
    );
    assert!(
        eventually(Duration::from_secs(10), || ZTUNNEL_PORTS
            .iter()
            .all(|&p| !listens_on(&old.netns, p))),
        "ztunnel released the pod: {}",
        listening_tcp(&old.netns)
    );
}

#[test]
fn in_ebpf_mode_ambient_pods_talk_over_hbone_without_netfilter_and_del_unpins_them() {
    if !e2e::require_root() {
        return;
    }
    let mut node = MeshNode::start_ebpf(&binaries(), 45);
    node.namespace("shop", true);
    let (client, r) = node.create_pod("shop", "client", "client", &[]);
    let client_ip = r.unwrap_or_else(|e| panic!("ADD client: {e:?}\n{}", node.logs()));
    let (server, r) = node.create_pod("shop", "server", "server", &[]);
    let server_ip = r.unwrap_or_else(|e| panic!("ADD server: {e:?}\n{}", node.logs()));
    let root = node.bpf_pin_root.clone().unwrap();
    for pod in [&client, &server] {
        let pins = ebpf::PodRedirection::new(&root, &pod.uid).unwrap();
        assert!(pins.is_installed(), "{} pinned\n{}", pod.name, node.logs());
        assert!(!has_redirection(pod), "no nftables table in eBPF mode");
    }

    assert_talk_over_hbone(&node, &client, client_ip, &server, server_ip);
    node.cni
        .check(&client)
        .unwrap_or_else(|e| panic!("CHECK: {e:?}"));

    // Without ztunnel the programs drop the pod's connections, and the agent reports it.
    node.stop_ztunnel();
    assert!(
        echo(&client.netns, app(server_ip)).is_err(),
        "no bypass without ztunnel"
    );
    let outbound = [("direction", "outbound")];
    assert!(
        eventually(Duration::from_secs(5), || node
            .agent_metric("mesh_cni_ebpf_dropped_connections", &outbound)
            >= 1.0),
        "drops counted\n{}",
        node.logs()
    );

    node.cni
        .del(&client)
        .unwrap_or_else(|e| panic!("DEL: {e:?}"));
    assert!(
        !root.join(&client.uid).exists(),
        "DEL unpins the programs\n{}",
        node.logs()
    );
}
