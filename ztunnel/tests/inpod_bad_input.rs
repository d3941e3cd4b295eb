//! Bad input never takes anything down: garbage and wrong certificates on 15008, malformed
//! HBONE requests and a malformed config file are refused and counted, while an established
//! connection keeps working.

mod mesh;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use e2e::apps::bypass_connect;
use hbone::Identity;
use hbone::ca::FakeCa;
use hbone::certificate::WorkloadCertificate;
use mesh::{Mesh, Options, eventually};
use rustls::pki_types::ServerName;
use tokio::io::AsyncReadExt;

fn client_id() -> Identity {
    Identity::new("cluster.local", "default", "client")
}

fn server_id() -> Identity {
    Identity::new("cluster.local", "default", "server")
}

/// Refuses to present any client certificate.
#[derive(Debug)]
struct NoClientCert;

impl rustls::client::ResolvesClientCert for NoClientCert {
    fn resolve(
        &self,
        _: &[&[u8]],
        _: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        None
    }
    fn has_certs(&self) -> bool {
        false
    }
}

/// Does a TLS handshake to pod b's 15008 from pod a and returns whether the server accepted
/// us (i.e. the connection is still usable after the handshake).
async fn tls_attempt(mesh: &Mesh, config: Arc<rustls::ClientConfig>) -> bool {
    let std = bypass_connect(&mesh.net.a.ns, mesh.hbone_addr()).expect("tcp to 15008");
    std.set_nonblocking(true).unwrap();
    let tcp = tokio::net::TcpStream::from_std(std).unwrap();
    let name = ServerName::IpAddress(mesh.net.b.ip.into());
    let Ok(mut tls) = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
    else {
        return false;
    };
    // TLS 1.3: the server judges the client certificate after the client thinks it is done,
    // so read: a rejected client gets an alert or EOF, an accepted one the server's SETTINGS.
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf)).await,
        Ok(Ok(n)) if n > 0
    )
}

fn with_roots(cert: &WorkloadCertificate, roots: &WorkloadCertificate) -> WorkloadCertificate {
    let mut c = cert.clone();
    c.roots = roots.roots.clone();
    c
}

#[test]
fn bad_clients_on_15008_are_refused_and_counted_without_disturbing_others() {
    if !e2e::require_root() {
        return;
    }
    let mesh = mesh::start(
        7,
        Options {
            test_ca: true,
            ..Default::default()
        },
    );
    let mut live = mesh.check_echo();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let good = mesh.ca.as_ref().unwrap().issue(&client_id());
    let good_config = hbone::tls::client_config(&good, &[server_id()]).unwrap();
    assert!(
        rt.block_on(tls_attempt(&mesh, good_config.clone())),
        "control: a valid client is accepted"
    );
    let before = mesh.metric(
        "ztunnel_tls_handshake_failures_total",
        &[("listener", "hbone")],
    );

    // Garbage bytes.
    let mut garbage = bypass_connect(&mesh.net.a.ns, mesh.hbone_addr()).unwrap();
    garbage
        .write_all(&[0x16, 0x03, 0x01, 0xff, 0xff, 0, 1, 2, 3, 4])
        .unwrap();
    garbage.write_all(&[0xAB; 4096]).unwrap();
    let mut sink = Vec::new();
    let _ = garbage.read_to_end(&mut sink);

    // A certificate from another root (the client still trusts the real root).
    let other = FakeCa::new("cluster.local")
        .unwrap()
        .issue(&client_id(), Duration::from_secs(3600))
        .unwrap();
    let other_config =
        hbone::tls::client_config(&with_roots(&other, &good), &[server_id()]).unwrap();
    assert!(
        !rt.block_on(tls_attempt(&mesh, other_config)),
        "foreign root accepted"
    );

    // No client certificate.
    let mut no_cert = (*good_config).clone();
    no_cert.client_auth_cert_resolver = Arc::new(NoClientCert);
    assert!(
        !rt.block_on(tls_attempt(&mesh, Arc::new(no_cert))),
        "client without cert accepted"
    );

    // No ALPN h2.
    let mut no_alpn = (*good_config).clone();
    no_alpn.alpn_protocols.clear();
    assert!(
        !rt.block_on(tls_attempt(&mesh, Arc::new(no_alpn))),
        "client without ALPN h2 accepted"
    );

    assert!(
        eventually(Duration::from_secs(5), || {
            mesh.metric(
                "ztunnel_tls_handshake_failures_total",
                &[("listener", "hbone")],
            ) >= before + 4.0
        }),
        "{}",
        mesh.zt.metrics()
    );
    assert_eq!(live.echo(b"still here").unwrap(), b"still here");
}

/// Opens an HTTP/2 connection with a valid client certificate to pod b's 15008.
async fn h2_client(mesh: &Mesh) -> h2::client::SendRequest<Bytes> {
    let cert = mesh.ca.as_ref().unwrap().issue(&client_id());
    let config = hbone::tls::client_config(&cert, &[server_id()]).unwrap();
    let std = bypass_connect(&mesh.net.a.ns, mesh.hbone_addr()).unwrap();
    std.set_nonblocking(true).unwrap();
    let tcp = tokio::net::TcpStream::from_std(std).unwrap();
    let name = ServerName::IpAddress(mesh.net.b.ip.into());
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .unwrap();
    let (send, conn) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(conn);
    send
}

async fn status_of(
    send: &mut h2::client::SendRequest<Bytes>,
    req: http::Request<()>,
) -> Option<u16> {
    send.clone().ready().await.ok()?;
    let (resp, _stream) = send.send_request(req, false).ok()?;
    let resp = tokio::time::timeout(Duration::from_secs(5), resp)
        .await
        .ok()?
        .ok()?;
    Some(resp.status().as_u16())
}

fn connect_request(authority: SocketAddr) -> http::request::Builder {
    http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(authority.to_string())
}

#[test]
fn malformed_hbone_requests_get_error_statuses_and_are_counted() {
    if !e2e::require_root() {
        return;
    }
    let mesh = mesh::start(
        8,
        Options {
            test_ca: true,
            ..Default::default()
        },
    );
    let mut live = mesh.check_echo();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut send = h2_client(&mesh).await;
        let get = http::Request::builder()
            .method(http::Method::GET)
            .uri(format!("https://{}/", mesh.server_addr()))
            .body(())
            .unwrap();
        assert_eq!(status_of(&mut send, get).await, Some(400), "non-CONNECT");

        // A tunnel to ztunnel's own ports would loop.
        let own = SocketAddr::from((mesh.net.b.ip, 15001));
        let req = connect_request(own).body(()).unwrap();
        assert_eq!(status_of(&mut send, req).await, Some(400), "proxy port");

        let elsewhere = SocketAddr::from(([10, 77, 8, 99], 8080));
        let req = connect_request(elsewhere).body(()).unwrap();
        assert_eq!(
            status_of(&mut send, req).await,
            Some(400),
            "authority not this pod"
        );

        let huge = "x".repeat(20 * 1024);
        let req = connect_request(mesh.server_addr())
            .header("x-padding", huge)
            .body(())
            .unwrap();
        assert_eq!(
            status_of(&mut send, req).await,
            Some(431),
            "oversized headers"
        );

        // Control: the same connection still carries a valid CONNECT.
        let req = connect_request(mesh.server_addr()).body(()).unwrap();
        send.clone().ready().await.unwrap();
        let (resp, _tx) = send.send_request(req, false).unwrap();
        let resp = resp.await.unwrap();
        assert_eq!(resp.status(), 200);
        let mut body = resp.into_body();
        let greeting = body.data().await.unwrap().unwrap();
        let text = String::from_utf8_lossy(&greeting).into_owned();
        assert!(
            text.starts_with(&format!("peer={}:", mesh.net.a.ip)),
            "{text}"
        );
    });
    for reason in ["bad_request", "wrong_destination", "header_too_large"] {
        assert!(
            mesh.metric("ztunnel_hbone_rejected_total", &[("reason", reason)]) >= 1.0,
            "{reason} not counted:\n{}",
            mesh.zt.metrics()
        );
    }
    assert_eq!(live.echo(b"unaffected").unwrap(), b"unaffected");
}

#[test]
fn malformed_local_config_is_rejected_and_the_previous_state_keeps_working() {
    if !e2e::require_root() {
        return;
    }
    let mesh = mesh::start(9, Options::default());
    let mut live = mesh.check_echo();
    mesh.write_config("workloads:\n- name: a\n  bogusField: 1\n  services: {}\n");
    assert!(
        eventually(Duration::from_secs(5), || {
            mesh.metric("ztunnel_config_errors_total", &[("source", "local")]) >= 1.0
        }),
        "{}",
        mesh.zt.metrics()
    );
    assert!(
        mesh.zt.log().contains("bogusField"),
        "error names the field:\n{}",
        mesh.zt.log()
    );
    assert_eq!(live.echo(b"alive").unwrap(), b"alive");
    mesh.check_echo();
}

#[test]
fn connections_to_ztunnels_own_ports_are_refused_not_looped() {
    if !e2e::require_root() {
        return;
    }
    let mesh = mesh::start(18, Options::default());
    for dst in [
        SocketAddr::from(([127, 0, 0, 1], 15001)),
        SocketAddr::from((mesh.net.a.ip, 15001)),
        SocketAddr::from((mesh.net.a.ip, 15006)),
    ] {
        // The listener accepts, then closes at once instead of proxying to itself.
        if let Ok(mut c) = e2e::apps::Client::connect(&mesh.net.a.ns, dst) {
            let t = std::time::Instant::now();
            let mut buf = [0u8; 8];
            let n = c.stream.read(&mut buf).unwrap_or(0);
            assert_eq!(n, 0, "{dst} answered");
            assert!(t.elapsed() < Duration::from_secs(2), "{dst} hung");
        }
    }
    // ztunnel is still fine.
    mesh.check_echo();
}
