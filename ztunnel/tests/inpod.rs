//! ztunnel in shared (in-pod) mode, for real: two pod netns with redirection rules, ztunnel fed
//! pod netns fds over ZDS, the development CA, and a local config file as the state source.

mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use support::apps::{Client, EchoServer};
use support::net::TestNet;
use support::zds::{ZdsPeer, ZdsServer};
use support::ztunnel::{Ztunnel, metric_sum};

const APP_PORT: u16 = 8080;

/// A running test mesh: network, ztunnel, ZDS connection, echo server in pod b.
struct Mesh {
    net: TestNet,
    dir: PathBuf,
    config: PathBuf,
    zt: Ztunnel,
    _zds: ZdsServer,
    _peer: ZdsPeer,
    server: EchoServer,
}

fn config_yaml(net: &TestNet, policies: &str) -> String {
    format!(
        r#"workloads:
- uid: Kubernetes//v1/Pod/default/a
  name: a
  namespace: default
  serviceAccount: client
  workloadIps: ["{a}"]
  protocol: HBONE
  canonicalName: client-app
  canonicalRevision: v1
  services: {{}}
- uid: Kubernetes//v1/Pod/default/b
  name: b
  namespace: default
  serviceAccount: server
  workloadIps: ["{b}"]
  protocol: HBONE
  canonicalName: server-app
  canonicalRevision: v2
  services: {{}}
{policies}"#,
        a = net.a.ip,
        b = net.b.ip,
    )
}

impl Mesh {
    fn start(id: u8, policies: &str, env: &[(&str, &str)]) -> Self {
        let net = TestNet::new(id);
        net.install_redirection();
        let dir = std::env::temp_dir().join(format!("ztunnel-test-{}", net.prefix));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("config.yaml");
        std::fs::write(&config, config_yaml(&net, policies)).unwrap();
        let uds = dir.join("zds.sock");
        let zds = ZdsServer::bind(&uds);
        let mut zt = Ztunnel::start(&net.zt, &dir, &config, &uds, env);
        let peer = zds.accept();
        for (uid, pod, name, sa) in [("uid-a", &net.a, "a", "client"), ("uid-b", &net.b, "b", "server")] {
            assert_eq!(peer.add(uid, name, "default", sa, &pod.netns_fd()), "", "add {name}");
        }
        assert_eq!(peer.snapshot_sent(), "");
        zt.wait_ready();
        let server = EchoServer::start(&net.b.ns, APP_PORT);
        Mesh {
            net,
            dir,
            config,
            zt,
            _zds: zds,
            _peer: peer,
            server,
        }
    }

    fn server_addr(&self) -> SocketAddr {
        SocketAddr::from((self.net.b.ip, APP_PORT))
    }

    fn connect(&self) -> std::io::Result<Client> {
        Client::connect(&self.net.a.ns, self.server_addr())
    }

    fn set_policies(&self, policies: &str) {
        let tmp = self.dir.join("config.yaml.tmp");
        std::fs::write(&tmp, config_yaml(&self.net, policies)).unwrap();
        std::fs::rename(&tmp, &self.config).unwrap();
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Polls `f` until it returns true or `timeout` passes.
fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

#[test]
fn echo_between_pods_goes_over_hbone_with_client_ip_preserved() {
    if !support::require_root() {
        return;
    }
    let mesh = Mesh::start(1, "", &[]);
    let mut client = mesh.connect().expect("connect through ztunnel");
    let peer = client.greeting().expect("greeting");
    assert!(
        peer.starts_with(&format!("{}:", mesh.net.a.ip)),
        "server saw {peer}, expected the client pod's IP\n{}",
        mesh.zt.log()
    );
    assert_eq!(client.echo(b"hello mesh").unwrap(), b"hello mesh");
    drop(client);

    let expect_mtls = |reporter: &str| {
        eventually(Duration::from_secs(5), || {
            let m = mesh.zt.metrics();
            metric_sum(
                &m,
                "istio_tcp_connections_closed_total",
                &[
                    ("reporter", reporter),
                    ("connection_security_policy", "mutual_tls"),
                    ("source_principal", "spiffe://cluster.local/ns/default/sa/client"),
                    ("destination_principal", "spiffe://cluster.local/ns/default/sa/server"),
                ],
            ) >= 1.0
        })
    };
    assert!(expect_mtls("source"), "source metrics:\n{}", mesh.zt.metrics());
    assert!(expect_mtls("destination"), "destination metrics:\n{}", mesh.zt.metrics());
    let m = mesh.zt.metrics();
    assert!(
        metric_sum(&m, "istio_tcp_received_bytes_total", &[("reporter", "destination")]) >= 10.0,
        "bytes counted:\n{m}"
    );
    assert_eq!(mesh.server.peers.lock().unwrap().len(), 1);
}
