//! A running test mesh: two pod netns with redirection, the real ztunnel in shared mode fed by
//! a ZDS stand-in, a local config file as the state source, and an echo server in pod b.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::apps::{Client, EchoServer};
use crate::ca::TestCa;
use crate::controller::{Controller, ControllerDirs};
use crate::netns::TestNet;
use crate::zds::{ZdsPeer, ZdsServer};
use crate::ztunnel::Ztunnel;

/// Port of the echo app in pod b.
pub const APP_PORT: u16 = 8080;
/// Port of the test CA inside ztunnel's netns.
const CA_PORT: u16 = 15012;

/// How a mesh is started.
#[derive(Default)]
pub struct Options<'a> {
    /// Policies section of the local config (YAML, starting with `policies:`).
    pub policies: &'a str,
    /// Extra environment for ztunnel.
    pub env: Vec<(&'a str, &'a str)>,
    /// Use the gRPC test CA instead of ztunnel's in-process FAKE_CA.
    pub test_ca: bool,
    /// YAML for pod b's `services` map (default `{}`).
    pub server_services: &'a str,
    /// pod b's `protocol` (default HBONE).
    pub server_protocol: &'a str,
    /// A top-level `services:` section, if any.
    pub services: &'a str,
    /// Serve pod b with its own ztunnel in dedicated mode (inside b's netns) instead of the
    /// shared node ztunnel; implies the test CA.
    pub dedicated_server: bool,
    /// Run this mesh-controller binary (files source) and let ztunnel get its config and
    /// certificates from it over TLS instead of a local file and an in-process CA.
    pub controller: Option<&'a Path>,
    /// Redirect the pods with the node agent's eBPF programs instead of nftables rules.
    pub ebpf: bool,
}

/// The mesh; everything is torn down on drop.
pub struct Mesh {
    pub net: TestNet,
    /// The config file's parts other than policies.
    layout: Layout,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub zt: Ztunnel,
    /// pod b's dedicated ztunnel, when asked for.
    pub zt_b: Option<Ztunnel>,
    pub ca: Option<TestCa>,
    /// The test CA's second listener (inside pod b), for the dedicated ztunnel.
    pub ca_b: Option<TestCa>,
    /// The control plane, when asked for.
    pub controller: Option<(Controller, ControllerDirs)>,
    pub zds: ZdsServer,
    pub peer: ZdsPeer,
    pub server: EchoServer,
    /// ZDS UIDs of pods a and b (in eBPF mode also the keys of their pins).
    pub uids: [String; 2],
    /// eBPF mode: the pods' pinned programs, removed after everything else.
    pub ebpf: Option<crate::netns::EbpfPins>,
}

/// What the local config says besides policies.
#[derive(Clone)]
struct Layout {
    server_services: String,
    server_protocol: String,
    services: String,
}

/// The local config for pods a (sa `client`) and b (sa `server`); HBONE unless told otherwise.
fn config_yaml(net: &TestNet, layout: &Layout, policies: &str) -> String {
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
  protocol: {protocol}
  canonicalName: server-app
  canonicalRevision: v2
  services: {server_services}
{services}
{policies}"#,
        a = net.a.ip,
        b = net.b.ip,
        protocol = layout.server_protocol,
        server_services = layout.server_services,
        services = layout.services,
    )
}

/// Kubernetes objects for the same two pods: an ambient namespace, service accounts, and pods
/// scheduled on `node1` with their IPs in status (as a kubelet would report them).
pub fn k8s_yaml(net: &TestNet) -> String {
    let pod = |name: &str, sa: &str, ip: &std::net::Ipv4Addr, app: &str| {
        format!(
            r#"---
apiVersion: v1
kind: ServiceAccount
metadata: {{name: {sa}, namespace: default}}
---
apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: default
  uid: uid-{name}
  labels: {{app: {app}}}
spec:
  serviceAccountName: {sa}
  nodeName: node1
  containers: [{{name: app, image: mesh-testapp}}]
status:
  phase: Running
  podIP: "{ip}"
  podIPs: [{{ip: "{ip}"}}]
  conditions: [{{type: Ready, status: "True"}}]
"#
        )
    };
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: default\n  labels: {{istio.io/dataplane-mode: ambient}}\n{}{}",
        pod("a", "client", &net.a.ip, "client-app"),
        pod("b", "server", &net.b.ip, "server-app"),
    )
}

impl Mesh {
    /// Starts a mesh with the ztunnel binary `bin` for test number `id` (unique per test: it
    /// picks netns names and addresses).
    pub fn start(bin: &Path, id: u8, opts: Options<'_>) -> Self {
        let net = TestNet::new(id);
        let uids = if opts.ebpf {
            // Pins outlive namespaces, so their keys must be unique per test.
            [
                format!("{}-uid-a", net.prefix),
                format!("{}-uid-b", net.prefix),
            ]
        } else {
            ["uid-a".to_string(), "uid-b".to_string()]
        };
        let ebpf = if opts.ebpf {
            Some(net.install_ebpf_redirection([&uids[0], &uids[1]]))
        } else {
            net.install_redirection();
            None
        };
        let dir = std::env::temp_dir().join(format!("ztunnel-test-{}", net.prefix));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("config.yaml");
        let or = |s: &str, default: &str| {
            if s.is_empty() {
                default.to_string()
            } else {
                s.to_string()
            }
        };
        let layout = Layout {
            server_services: or(opts.server_services, "{}"),
            server_protocol: or(opts.server_protocol, "HBONE"),
            services: opts.services.to_string(),
        };
        std::fs::write(&config, config_yaml(&net, &layout, opts.policies)).unwrap();
        let uds = dir.join("zds.sock");
        let zds = ZdsServer::bind(&uds);
        let mut env = opts.env.clone();
        let token = dir.join("token");
        let ca_address = format!("http://127.0.0.1:{CA_PORT}");
        let token_path = token.to_string_lossy().into_owned();
        let ca = if opts.test_ca || opts.dedicated_server {
            std::fs::write(&token, crate::ca::TOKEN).unwrap();
            env.extend([
                ("FAKE_CA", "false"),
                ("CA_ADDRESS", ca_address.as_str()),
                ("AUTH_TOKEN", token_path.as_str()),
            ]);
            Some(TestCa::start(&net.zt, CA_PORT))
        } else {
            None
        };
        let mut controller = None;
        let ctrl_env: Vec<(String, String)>;
        if let Some(ctrl_bin) = opts.controller {
            let dirs = ControllerDirs::create(&dir, &[("node1", "node1-token")]);
            std::fs::write(dirs.config.join("pods.yaml"), k8s_yaml(&net)).unwrap();
            let c = Controller::start(ctrl_bin, &net.zt, &dir, &dirs);
            std::fs::write(&token, "node1-token").unwrap();
            let root = dirs.root_cert().to_string_lossy().into_owned();
            ctrl_env = vec![
                ("XDS_ADDRESS".into(), "https://127.0.0.1:15012".into()),
                ("CA_ADDRESS".into(), "https://127.0.0.1:15012".into()),
                ("XDS_ROOT_CA".into(), root.clone()),
                ("CA_ROOT_CA".into(), root),
                ("AUTH_TOKEN".into(), token_path.clone()),
                ("NODE_NAME".into(), "node1".into()),
                ("LOCAL_XDS_PATH".into(), String::new()),
                ("FAKE_CA".into(), "false".into()),
            ];
            controller = Some((c, dirs));
        } else {
            ctrl_env = Vec::new();
        }
        env.extend(ctrl_env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let mut zt = Ztunnel::start(bin, &net.zt, &dir, &config, &uds, &env);
        let peer = zds
            .try_accept()
            .unwrap_or_else(|e| panic!("{e}\nztunnel log:\n{}", zt.log()));
        let mut pods = vec![(&uids[0], &net.a, "a", "client")];
        if !opts.dedicated_server {
            pods.push((&uids[1], &net.b, "b", "server"));
        }
        for (uid, pod, name, sa) in pods {
            let err = peer.add(uid, name, "default", sa, &pod.netns_fd());
            assert_eq!(err, "", "add {name}");
        }
        assert_eq!(peer.snapshot_sent(), "");
        zt.wait_ready();
        let (mut zt_b, mut ca_b) = (None, None);
        if let (true, Some(ca)) = (opts.dedicated_server, &ca) {
            ca_b = Some(ca.serve_also(&net.b.ns, CA_PORT));
            env.extend([
                ("PROXY_MODE", "dedicated"),
                ("PROXY_WORKLOAD_INFO", "default/b/server"),
            ]);
            let mut z = Ztunnel::start(bin, &net.b.ns, &dir, &config, &uds, &env);
            z.wait_ready();
            zt_b = Some(z);
        }
        let server = EchoServer::start(&net.b.ns, APP_PORT);
        Mesh {
            net,
            layout,
            dir,
            config,
            zt,
            zt_b,
            ca,
            ca_b,
            controller,
            zds,
            peer,
            server,
            uids,
            ebpf,
        }
    }

    /// The echo app's address.
    pub fn server_addr(&self) -> SocketAddr {
        SocketAddr::from((self.net.b.ip, APP_PORT))
    }

    /// pod b's HBONE address.
    pub fn hbone_addr(&self) -> SocketAddr {
        SocketAddr::from((self.net.b.ip, 15008))
    }

    /// Connects from pod a to the echo app (captured by ztunnel).
    pub fn connect(&self) -> std::io::Result<Client> {
        Client::connect(&self.net.a.ns, self.server_addr())
    }

    /// Connects and checks the echo works end to end.
    pub fn check_echo(&self) -> Client {
        let mut c = self.connect().expect("connect");
        c.greeting().expect("greeting");
        assert_eq!(c.echo(b"ping").expect("echo"), b"ping");
        c
    }

    /// Rewrites the config file atomically (ztunnel reloads it).
    pub fn write_config(&self, contents: &str) {
        let tmp = self.dir.join("config.yaml.tmp");
        std::fs::write(&tmp, contents).unwrap();
        std::fs::rename(&tmp, &self.config).unwrap();
    }

    /// Writes (or replaces) a Kubernetes YAML file the controller watches.
    pub fn write_k8s(&self, file: &str, yaml: &str) {
        let (_, dirs) = self
            .controller
            .as_ref()
            .expect("mesh started with a controller");
        let tmp = dirs.config.join(format!(".{file}.tmp"));
        std::fs::write(&tmp, yaml).unwrap();
        std::fs::rename(&tmp, dirs.config.join(file)).unwrap();
    }

    /// Replaces the policies in the config file.
    pub fn set_policies(&self, policies: &str) {
        self.write_config(&config_yaml(&self.net, &self.layout, policies));
    }

    /// Current value of a metric (sum over series matching `labels`).
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        crate::ztunnel::metric_sum(&self.zt.metrics(), name, labels)
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Polls `f` until it returns true or `timeout` passes.
pub fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

/// An allow policy for exactly one principal, scoped to the namespace.
pub fn allow_principal(principal: &str) -> String {
    format!(
        r#"policies:
- name: allow-one
  namespace: default
  scope: Namespace
  action: Allow
  rules: [[[{{principals: [{{Exact: "{principal}"}}]}}]]]
"#
    )
}

/// A deny policy for one principal, scoped to the namespace.
pub fn deny_principal(principal: &str) -> String {
    format!(
        r#"policies:
- name: deny-one
  namespace: default
  scope: Namespace
  action: Deny
  rules: [[[{{principals: [{{Exact: "{principal}"}}]}}]]]
"#
    )
}
