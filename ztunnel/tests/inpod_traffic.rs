//! Pod-to-pod traffic through ztunnel in shared mode: HBONE with SPIFFE identities, the client's
//! IP preserved, inbound plaintext, and certificate rotation under a live connection; the
//! first two also with the node agent's eBPF redirection instead of nftables, which must fail
//! closed once ztunnel is gone.

mod mesh;

use std::time::Duration;

use e2e::apps::{Client, bypass_connect};
use mesh::{Mesh, Options, eventually};

const CLIENT: &str = "spiffe://cluster.local/ns/default/sa/client";
const SERVER: &str = "spiffe://cluster.local/ns/default/sa/server";

#[test]
fn echo_between_pods_goes_over_hbone_with_client_ip_preserved() {
    if !e2e::require_root() {
        return;
    }
    check_hbone_echo(&mesh::start(1, Options::default()));
}

#[test]
fn ebpf_redirection_carries_pod_traffic_over_hbone_with_the_client_ip() {
    if !e2e::require_root() {
        return;
    }
    let mesh = mesh::start(20, ebpf());
    let nft = e2e::netns::sh(&[
        "ip",
        "netns",
        "exec",
        &mesh.net.a.ns,
        "nft",
        "list",
        "ruleset",
    ]);
    assert!(
        nft.trim().is_empty(),
        "eBPF mode needs no nftables rules:\n{nft}"
    );
    check_hbone_echo(&mesh);
    assert!(
        mesh.zt
            .log()
            .contains("listeners registered for eBPF redirection"),
        "{}",
        mesh.zt.log()
    );
}

/// Redirection by the node agent's eBPF programs instead of nftables rules.
fn ebpf() -> Options<'static> {
    Options {
        ebpf: true,
        ..Options::default()
    }
}

/// An echo from pod a to pod b goes over HBONE: the server sees a's IP, both reporters count
/// an mTLS connection between the two identities, the access log names them.
fn check_hbone_echo(mesh: &Mesh) {
    let mut client = mesh.connect().expect("connect through ztunnel");
    let peer = client.greeting().expect("greeting");
    assert!(
        peer.starts_with(&format!("{}:", mesh.net.a.ip)),
        "server saw {peer}, expected the client pod's IP\n{}",
        mesh.zt.log()
    );
    assert_eq!(client.echo(b"hello mesh").unwrap(), b"hello mesh");
    drop(client);

    for reporter in ["source", "destination"] {
        let labels = [
            ("reporter", reporter),
            ("connection_security_policy", "mutual_tls"),
            ("source_principal", CLIENT),
            ("destination_principal", SERVER),
            ("source_workload", "a"),
            ("destination_workload", "b"),
        ];
        assert!(
            eventually(Duration::from_secs(5), || {
                mesh.metric("istio_tcp_connections_closed_total", &labels) >= 1.0
            }),
            "{reporter} metrics:\n{}",
            mesh.zt.metrics()
        );
    }
    let received = mesh.metric(
        "istio_tcp_received_bytes_total",
        &[("reporter", "destination")],
    );
    assert!(
        received >= 10.0,
        "client-to-server bytes counted: {received}"
    );
    assert_eq!(mesh.server.peers.lock().unwrap().len(), 1);
    // The access log names both identities.
    let log = mesh.zt.log();
    assert!(
        log.contains(CLIENT) && log.contains(SERVER),
        "access log:\n{log}"
    );
}

#[test]
fn plaintext_to_a_pod_is_captured_on_15006_and_reported_without_mtls() {
    if !e2e::require_root() {
        return;
    }
    check_plaintext_inbound(&mesh::start(2, Options::default()));
}

#[test]
fn ebpf_redirection_captures_plaintext_inbound_and_fails_closed_without_ztunnel() {
    if !e2e::require_root() {
        return;
    }
    let mut mesh = mesh::start(21, ebpf());
    check_plaintext_inbound(&mesh);
    mesh.zt.sigterm();
    mesh.zt.wait_exit(Duration::from_secs(10));
    // Its listeners left the maps as they closed: neither direction reaches the app now.
    assert!(mesh.connect().and_then(|mut c| c.greeting()).is_err());
    let around = bypass_connect(&mesh.net.a.ns, mesh.server_addr())
        .and_then(Client::from_stream)
        .and_then(|mut c| c.greeting());
    assert!(around.is_err(), "plaintext reached the app around ztunnel");
}

/// Plaintext from outside the mesh (a marked socket in pod a escapes a's capture) is
/// captured by pod b's 15006, keeps the client IP and is reported without mTLS.
fn check_plaintext_inbound(mesh: &Mesh) {
    // Bypass pod a's own capture: this is what a client outside the mesh looks like to pod b.
    let stream = bypass_connect(&mesh.net.a.ns, mesh.server_addr()).expect("connect");
    let mut client = Client::from_stream(stream).unwrap();
    let peer = client.greeting().expect("greeting");
    assert!(peer.starts_with(&format!("{}:", mesh.net.a.ip)), "{peer}");
    assert_eq!(client.echo(b"plain").unwrap(), b"plain");
    drop(client);
    let labels = [
        ("reporter", "destination"),
        ("connection_security_policy", "unknown"),
        ("destination_workload", "b"),
    ];
    assert!(
        eventually(Duration::from_secs(5), || {
            mesh.metric("istio_tcp_connections_closed_total", &labels) >= 1.0
        }),
        "{}",
        mesh.zt.metrics()
    );
}

#[test]
fn certificate_rotation_keeps_a_long_lived_connection() {
    if !e2e::require_root() {
        return;
    }
    let mesh = mesh::start(
        3,
        Options {
            env: vec![("SECRET_TTL", "4s")],
            test_ca: true,
            ..Default::default()
        },
    );
    let mut long_lived = mesh.check_echo();
    let issued_before = mesh.ca.as_ref().unwrap().issued();
    assert!(
        issued_before >= 2,
        "client and server certs came from the CA"
    );
    // Rotation happens at half-life (2 s); keep talking across several rotations.
    for i in 0..14u8 {
        assert_eq!(
            long_lived.echo(&[i; 100]).unwrap(),
            vec![i; 100],
            "echo {i}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let rotations = mesh.metric("ztunnel_certificate_rotations_total", &[]);
    assert!(
        rotations >= 2.0,
        "rotations: {rotations}\n{}",
        mesh.zt.log()
    );
    assert!(mesh.ca.as_ref().unwrap().issued() > issued_before);
    // Certificates in use now are fresh: the first ones have expired, yet new connections work.
    mesh.check_echo();
    let dump = mesh.zt.config_dump();
    let certs = dump["certificates"]
        .as_array()
        .expect("certificates in config_dump");
    assert_eq!(certs.len(), 2, "{dump}");
}

#[test]
fn dedicated_mode_serves_one_workload_from_its_own_netns() {
    if !e2e::require_root() {
        return;
    }
    let mesh = mesh::start(
        14,
        Options {
            dedicated_server: true,
            ..Default::default()
        },
    );
    let zt_b = mesh.zt_b.as_ref().unwrap();
    let logs = || {
        format!(
            "node ztunnel:\n{}\ndedicated ztunnel:\n{}",
            mesh.zt.log(),
            zt_b.log()
        )
    };
    let mut client = mesh.connect().expect("connect");
    let peer = client
        .greeting()
        .unwrap_or_else(|e| panic!("greeting: {e}\n{}", logs()));
    assert!(peer.starts_with(&format!("{}:", mesh.net.a.ip)), "{peer}");
    drop(client);
    let labels = [
        ("reporter", "destination"),
        ("connection_security_policy", "mutual_tls"),
        ("source_principal", CLIENT),
    ];
    assert!(
        eventually(Duration::from_secs(5), || {
            e2e::ztunnel::metric_sum(
                &zt_b.metrics(),
                "istio_tcp_connections_closed_total",
                &labels,
            ) >= 1.0
        }),
        "{}",
        zt_b.metrics()
    );
}

#[test]
fn service_vip_reaches_an_endpoint_over_hbone_with_port_mapping() {
    if !e2e::require_root() {
        return;
    }
    let services = r#"services:
- name: echo
  namespace: default
  hostname: echo.default.svc.cluster.local
  vips: ["/10.77.15.100"]
  ports: {80: 8080}
  subjectAltNames: ["spiffe://cluster.local/ns/default/sa/server"]"#;
    let mesh = mesh::start(
        15,
        Options {
            server_services: r#"{"default/echo.default.svc.cluster.local": {80: 8080}}"#,
            services,
            ..Default::default()
        },
    );
    let vip = std::net::SocketAddr::from(([10, 77, 15, 100], 80));
    for _ in 0..3 {
        let mut c = Client::connect(&mesh.net.a.ns, vip).expect("connect to VIP");
        let peer = c
            .greeting()
            .unwrap_or_else(|e| panic!("greeting via VIP: {e}\n{}", mesh.zt.log()));
        assert!(peer.starts_with(&format!("{}:", mesh.net.a.ip)), "{peer}");
    }
    let labels = [
        ("reporter", "source"),
        ("connection_security_policy", "mutual_tls"),
        ("destination_service", "echo.default.svc.cluster.local"),
        ("destination_workload", "b"),
    ];
    assert!(
        eventually(Duration::from_secs(5), || {
            mesh.metric("istio_tcp_connections_closed_total", &labels) >= 3.0
        }),
        "{}",
        mesh.zt.metrics()
    );
}

#[test]
fn destination_without_hbone_is_passed_through_in_plaintext() {
    if !e2e::require_root() {
        return;
    }
    let mesh = mesh::start(
        16,
        Options {
            server_protocol: "TCP",
            ..Default::default()
        },
    );
    let mut c = mesh.connect().expect("connect");
    let peer = c.greeting().expect("greeting");
    assert!(peer.starts_with(&format!("{}:", mesh.net.a.ip)), "{peer}");
    drop(c);
    let source = [
        ("reporter", "source"),
        ("connection_security_policy", "unknown"),
        ("destination_workload", "b"),
    ];
    assert!(
        eventually(Duration::from_secs(5), || {
            mesh.metric("istio_tcp_connections_closed_total", &source) >= 1.0
        }),
        "{}",
        mesh.zt.metrics()
    );
}
