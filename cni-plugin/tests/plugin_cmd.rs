//! The built `mesh-cni` binary driven as a container runtime drives it: environment variables,
//! config on stdin, result or error JSON on stdout. Pure userspace (no root): the node agent is
//! either absent or a small fake on a Unix socket, and the Kubernetes API (for the fallback when
//! the agent is down) is the in-process stand-in the controller tests use.

#[path = "../../controller/tests/support/apiserver.rs"]
mod apiserver;

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use apiserver::ApiServer;
use mesh_cni::protocol::{
    Outcome, PluginCommand, PluginRequest, PluginResponse, decode_line, encode_line,
};
use serde_json::{Value, json};

/// A scratch directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let p = std::env::temp_dir().join(format!("mcni-{tag}-{}-{nanos}", std::process::id()));
        fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

struct Output {
    stdout: String,
    code: i32,
}

impl Output {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {:?}", self.stdout))
    }
}

/// Runs the plugin with a clean environment, as a runtime would.
fn plugin(command: &str, cni_args: &str, conf: &Value) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_mesh-cni"))
        .env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", "5f2a9c")
        .env("CNI_NETNS", "/var/run/netns/cni-1234")
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/opt/cni/bin")
        .env("CNI_ARGS", cni_args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(&serde_json::to_vec(conf).unwrap()).unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    Output {
        stdout: String::from_utf8(out.stdout).unwrap(),
        code: out.status.code().unwrap(),
    }
}

fn pod_args(ns: &str, name: &str) -> String {
    format!(
        "IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME={name};K8S_POD_INFRA_CONTAINER_ID=5f2a9c;K8S_POD_UID=uid-{name}"
    )
}

fn prev_result() -> Value {
    json!({
        "cniVersion": "1.0.0",
        "interfaces": [
            {"name": "cni0", "mac": "02:00:00:00:00:01"},
            {"name": "eth0", "mac": "02:00:00:00:00:02", "sandbox": "/var/run/netns/cni-1234"}
        ],
        "ips": [
            {"address": "10.88.0.7/16", "gateway": "10.88.0.1", "interface": 1},
            {"address": "fd00:88::7/64", "interface": 1}
        ],
        "routes": [{"dst": "0.0.0.0/0", "gw": "10.88.0.1"}],
        "dns": {}
    })
}

/// A chained plugin's config as libcni hands it over.
fn conf(socket: &Path, config_dir: Option<&Path>) -> Value {
    let mut c = json!({
        "cniVersion": "1.0.0",
        "name": "mesh-net",
        "type": "mesh-cni",
        "agentSocket": socket,
        "agentTimeoutSeconds": 5,
        "prevResult": prev_result(),
        "runtimeConfig": {"portMappings": []},
    });
    if let Some(dir) = config_dir {
        c["configDir"] = json!(dir);
    }
    c
}

const CLUSTER: &str = "\
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels:
    istio.io/dataplane-mode: ambient
---
apiVersion: v1
kind: Pod
metadata:
  name: cart
  namespace: shop
spec:
  containers: [{name: app, image: cart}]
---
apiVersion: v1
kind: Namespace
metadata:
  name: legacy
---
apiVersion: v1
kind: Pod
metadata:
  name: batch
  namespace: legacy
spec:
  containers: [{name: app, image: batch}]
";

/// A fake node agent answering each connection with the next response and reporting each
/// request it received.
fn fake_agent(
    socket: &Path,
    responses: Vec<PluginResponse>,
) -> (mpsc::Receiver<PluginRequest>, thread::JoinHandle<()>) {
    let listener = UnixListener::bind(socket).unwrap();
    let (tx, rx) = mpsc::channel();
    let handle = thread::spawn(move || {
        for response in responses {
            let (stream, _) = listener.accept().unwrap();
            let mut line = String::new();
            BufReader::new(&stream).read_line(&mut line).unwrap();
            tx.send(decode_line::<PluginRequest>(line.as_bytes()).unwrap())
                .unwrap();
            (&stream).write_all(&encode_line(&response)).unwrap();
        }
    });
    (rx, handle)
}

#[test]
fn version_lists_supported_spec_versions() {
    let out = plugin("VERSION", "", &json!({"cniVersion": "1.0.0"}));
    assert_eq!(out.code, 0);
    assert_eq!(
        out.json(),
        json!({"cniVersion": "1.1.0", "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]})
    );
}

#[test]
fn add_for_non_kubernetes_container_passes_prev_result_through() {
    let dir = TempDir::new("plain");
    let out = plugin(
        "ADD",
        "IgnoreUnknown=1",
        &conf(&dir.0.join("none.sock"), None),
    );
    assert_eq!(out.code, 0, "{}", out.stdout);
    assert_eq!(out.json(), prev_result());
}

#[test]
fn agent_down_fails_ambient_pod_closed_and_lets_plain_pod_start() {
    let dir = TempDir::new("down");
    let cluster = dir.0.join("cluster");
    fs::create_dir_all(&cluster).unwrap();
    fs::write(cluster.join("objects.yaml"), CLUSTER).unwrap();
    let socket = dir.0.join("absent.sock");
    let conf = conf(&socket, Some(&cluster));

    let ambient = plugin("ADD", &pod_args("shop", "cart"), &conf);
    assert_eq!(ambient.code, 1, "{}", ambient.stdout);
    let err = ambient.json();
    assert_eq!(err["cniVersion"], "1.0.0");
    assert_eq!(err["code"], 101);
    assert_eq!(
        err["msg"],
        format!(
            "pod shop/cart is ambient but the node agent is unreachable at {}: refusing to start \
             it without mesh redirection",
            socket.display()
        )
    );

    let plain = plugin("ADD", &pod_args("legacy", "batch"), &conf);
    assert_eq!(plain.code, 0, "{}", plain.stdout);
    assert_eq!(plain.json(), prev_result());

    let unknown = plugin("ADD", &pod_args("legacy", "ghost"), &conf);
    assert_eq!(unknown.code, 1, "{}", unknown.stdout);
    assert_eq!(unknown.json()["code"], 101);

    let check = plugin("CHECK", &pod_args("shop", "cart"), &conf);
    assert_eq!(check.code, 1, "{}", check.stdout);
    let check = plugin("CHECK", &pod_args("legacy", "batch"), &conf);
    assert_eq!((check.code, check.stdout.as_str()), (0, ""));
}

#[test]
fn del_with_agent_down_succeeds() {
    let dir = TempDir::new("del");
    let out = plugin(
        "DEL",
        &pod_args("shop", "cart"),
        &conf(&dir.0.join("absent.sock"), None),
    );
    assert_eq!((out.code, out.stdout.as_str()), (0, ""));
}

#[test]
fn add_relays_the_sandbox_to_the_agent_and_passes_result_through() {
    let dir = TempDir::new("agent");
    let socket = dir.0.join("agent.sock");
    let ok = |outcome| PluginResponse {
        outcome,
        message: String::new(),
    };
    let (requests, agent) = fake_agent(
        &socket,
        vec![
            ok(Outcome::Enrolled),
            ok(Outcome::Verified),
            ok(Outcome::Removed),
        ],
    );
    let conf = conf(&socket, None);

    let add = plugin("ADD", &pod_args("shop", "cart"), &conf);
    assert_eq!(add.code, 0, "{}", add.stdout);
    assert_eq!(add.json(), prev_result());
    let req = requests.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(
        req,
        PluginRequest {
            command: PluginCommand::Add,
            container_id: "5f2a9c".into(),
            netns: "/var/run/netns/cni-1234".into(),
            ifname: "eth0".into(),
            pod_namespace: "shop".into(),
            pod_name: "cart".into(),
            pod_uid: Some("uid-cart".into()),
            ips: vec!["10.88.0.7".parse().unwrap(), "fd00:88::7".parse().unwrap()],
        }
    );

    let check = plugin("CHECK", &pod_args("shop", "cart"), &conf);
    assert_eq!((check.code, check.stdout.as_str()), (0, ""));
    assert_eq!(
        requests
            .recv_timeout(Duration::from_secs(5))
            .unwrap()
            .command,
        PluginCommand::Check
    );

    let del = plugin("DEL", &pod_args("shop", "cart"), &conf);
    assert_eq!((del.code, del.stdout.as_str()), (0, ""));
    assert_eq!(
        requests
            .recv_timeout(Duration::from_secs(5))
            .unwrap()
            .command,
        PluginCommand::Del
    );
    agent.join().unwrap();
}

#[test]
fn agent_failure_becomes_a_cni_error() {
    let dir = TempDir::new("failed");
    let socket = dir.0.join("agent.sock");
    let failed = PluginResponse {
        outcome: Outcome::Failed,
        message: "nft: cannot enter netns".into(),
    };
    let (requests, agent) = fake_agent(&socket, vec![failed.clone(), failed]);
    let conf = conf(&socket, None);

    let add = plugin("ADD", &pod_args("shop", "cart"), &conf);
    assert_eq!(add.code, 1, "{}", add.stdout);
    assert_eq!(
        add.json(),
        json!({
            "cniVersion": "1.0.0",
            "code": 100,
            "msg": "node agent failed to enroll pod shop/cart",
            "details": "nft: cannot enter netns",
        })
    );
    assert_eq!(requests.recv().unwrap().command, PluginCommand::Add);

    let del = plugin("DEL", &pod_args("shop", "cart"), &conf);
    assert_eq!(del.code, 1, "{}", del.stdout);
    assert_eq!(del.json()["code"], 100);
    agent.join().unwrap();
}

#[test]
fn status_reports_whether_the_agent_listens() {
    let dir = TempDir::new("status");
    let socket = dir.0.join("agent.sock");
    let mut c = conf(&socket, None);
    c["cniVersion"] = json!("1.1.0");
    let down = plugin("STATUS", "", &c);
    assert_eq!(down.code, 1);
    assert_eq!(down.json()["code"], 50);
    let _listener = UnixListener::bind(&socket).unwrap();
    let up = plugin("STATUS", "", &c);
    assert_eq!((up.code, up.stdout.as_str()), (0, ""));
}

/// Writes a kubeconfig for `server` (plain HTTP, bearer token) into `dir`.
fn kubeconfig(dir: &Path, server: &str) -> PathBuf {
    let path = dir.join("kubeconfig");
    fs::write(
        &path,
        format!(
            "apiVersion: v1
kind: Config
current-context: mesh
clusters:
- name: test
  cluster:
    server: {server}
contexts:
- name: mesh
  context: {{cluster: test, user: mesh-cni}}
users:
- name: mesh-cni
  user: {{token: plugin-token}}
"
        ),
    )
    .unwrap();
    path
}

/// The plugin's config in Kubernetes mode: no configDir, a kubeconfig instead.
fn kube_conf(socket: &Path, kubeconfig: &Path) -> Value {
    let mut c = conf(socket, None);
    c["kubeconfig"] = json!(kubeconfig);
    c
}

/// Runs the plugin off the runtime thread, so the in-process API server keeps serving.
async fn plugin_async(command: &'static str, cni_args: String, conf: Value) -> Output {
    tokio::task::spawn_blocking(move || plugin(command, &cni_args, &conf))
        .await
        .unwrap()
}

fn kube_namespace(name: &str, ambient: bool) -> Value {
    let labels = if ambient {
        json!({"istio.io/dataplane-mode": "ambient"})
    } else {
        json!({})
    };
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
}

fn kube_pod(ns: &str, name: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{name}"), "labels": labels},
        "spec": {"containers": [{"name": "app", "image": "app"}], "nodeName": "node-a"}})
}

#[tokio::test]
async fn agent_down_in_kubernetes_mode_decides_from_the_api_server() {
    let api = ApiServer::start().await;
    api.apply("namespaces", kube_namespace("shop", true));
    api.apply("namespaces", kube_namespace("legacy", false));
    api.apply("pods", kube_pod("shop", "cart", json!({})));
    api.apply(
        "pods",
        kube_pod(
            "shop",
            "opted-out",
            json!({"istio.io/dataplane-mode": "none"}),
        ),
    );
    api.apply("pods", kube_pod("legacy", "batch", json!({})));
    let dir = TempDir::new("kube");
    let socket = dir.0.join("absent.sock");
    let conf = kube_conf(&socket, &kubeconfig(&dir.0, &api.url));

    let plain = plugin_async("ADD", pod_args("legacy", "batch"), conf.clone()).await;
    assert_eq!(plain.code, 0, "{}", plain.stdout);
    assert_eq!(plain.json(), prev_result());
    assert_eq!(api.request_count("GET", "/api/v1/namespaces/legacy"), 1);
    assert_eq!(
        api.request_count("GET", "/api/v1/namespaces/legacy/pods/batch"),
        1
    );

    // The pod label overrides the namespace's, as everywhere else (one shared rule).
    let opted_out = plugin_async("ADD", pod_args("shop", "opted-out"), conf.clone()).await;
    assert_eq!(opted_out.code, 0, "{}", opted_out.stdout);
    assert_eq!(opted_out.json(), prev_result());

    let ambient = plugin_async("ADD", pod_args("shop", "cart"), conf.clone()).await;
    assert_eq!(ambient.code, 1, "{}", ambient.stdout);
    let err = ambient.json();
    assert_eq!(err["cniVersion"], "1.0.0");
    assert_eq!(err["code"], 101);
    assert_eq!(
        err["msg"],
        format!(
            "pod shop/cart is ambient but the node agent is unreachable at {}: refusing to start \
             it without mesh redirection",
            socket.display()
        )
    );

    let check = plugin_async("CHECK", pod_args("legacy", "batch"), conf.clone()).await;
    assert_eq!((check.code, check.stdout.as_str()), (0, ""));
    api.stop();
}

#[tokio::test]
async fn agent_down_and_pod_unknown_to_the_api_server_fails_closed() {
    let api = ApiServer::start().await;
    api.apply("namespaces", kube_namespace("legacy", false));
    let dir = TempDir::new("kube-ghost");
    let conf = kube_conf(&dir.0.join("absent.sock"), &kubeconfig(&dir.0, &api.url));

    let out = plugin_async("ADD", pod_args("legacy", "ghost"), conf).await;
    assert_eq!(out.code, 1, "{}", out.stdout);
    let err = out.json();
    assert_eq!(err["code"], 101);
    assert!(
        err["msg"]
            .as_str()
            .unwrap()
            .contains("cannot tell whether pod legacy/ghost is ambient"),
        "{err}"
    );
    let details = err["details"].as_str().unwrap();
    assert!(
        details.contains("pod legacy/ghost not found in the API server"),
        "{details}"
    );
    api.stop();
}

#[tokio::test]
async fn agent_down_and_api_server_failing_fails_closed() {
    let api = ApiServer::start().await;
    api.apply("namespaces", kube_namespace("legacy", false));
    api.apply("pods", kube_pod("legacy", "batch", json!({})));
    // RBAC refuses the pod read: the plugin cannot know, so it must not let the pod start.
    api.fail("GET", "/api/v1/namespaces/legacy/pods/batch", 403);
    let dir = TempDir::new("kube-403");
    let conf = kube_conf(&dir.0.join("absent.sock"), &kubeconfig(&dir.0, &api.url));

    let out = plugin_async("ADD", pod_args("legacy", "batch"), conf.clone()).await;
    assert_eq!(out.code, 1, "{}", out.stdout);
    let err = out.json();
    assert_eq!(err["code"], 101);
    assert!(
        err["details"]
            .as_str()
            .unwrap()
            .contains("cannot read pod legacy/batch from the API server"),
        "{err}"
    );

    api.clear_failures();
    let ok = plugin_async("ADD", pod_args("legacy", "batch"), conf).await;
    assert_eq!(ok.code, 0, "{}", ok.stdout);
    api.stop();
}

#[tokio::test]
async fn agent_and_api_server_both_down_fails_closed() {
    // Bind then drop: a local port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = TempDir::new("kube-down");
    let kc = kubeconfig(&dir.0, &format!("http://127.0.0.1:{port}"));
    let out = plugin_async(
        "ADD",
        pod_args("legacy", "batch"),
        kube_conf(&dir.0.join("absent.sock"), &kc),
    )
    .await;
    assert_eq!(out.code, 1, "{}", out.stdout);
    let err = out.json();
    assert_eq!(err["code"], 101);
    assert!(
        err["details"]
            .as_str()
            .unwrap()
            .contains("cannot read namespace legacy from the API server"),
        "{err}"
    );
}

#[tokio::test]
async fn hung_api_server_fails_closed_within_the_deadline() {
    // Accepts connections and never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    let dir = TempDir::new("kube-hung");
    let kc = kubeconfig(&dir.0, &format!("http://{addr}"));
    let started = std::time::Instant::now();
    let out = plugin_async(
        "ADD",
        pod_args("legacy", "batch"),
        kube_conf(&dir.0.join("absent.sock"), &kc),
    )
    .await;
    let took = started.elapsed();
    holder.abort();
    assert_eq!(out.code, 1, "{}", out.stdout);
    assert_eq!(out.json()["code"], 101);
    assert!(
        took >= Duration::from_secs(4) && took < Duration::from_secs(10),
        "took {took:?}"
    );
}

#[test]
fn unusable_kubeconfig_fails_closed_naming_the_file() {
    let dir = TempDir::new("kube-bad");
    let missing = dir.0.join("missing-kubeconfig");
    let out = plugin(
        "ADD",
        &pod_args("legacy", "batch"),
        &kube_conf(&dir.0.join("absent.sock"), &missing),
    );
    assert_eq!(out.code, 1, "{}", out.stdout);
    let err = out.json();
    assert_eq!(err["code"], 101);
    let details = err["details"].as_str().unwrap();
    assert!(
        details.contains("bad kubeconfig") && details.contains(&missing.display().to_string()),
        "{details}"
    );

    let garbage = dir.0.join("garbage-kubeconfig");
    fs::write(&garbage, "clusters: [this is not: a kubeconfig\n").unwrap();
    let out = plugin(
        "ADD",
        &pod_args("legacy", "batch"),
        &kube_conf(&dir.0.join("absent.sock"), &garbage),
    );
    assert_eq!(out.code, 1, "{}", out.stdout);
    assert!(
        out.json()["details"]
            .as_str()
            .unwrap()
            .contains("bad kubeconfig"),
        "{}",
        out.stdout
    );
}
