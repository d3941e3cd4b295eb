//! The built `mesh-cni` binary driven as a container runtime drives it: environment variables,
//! config on stdin, result or error JSON on stdout. Pure userspace (no root): the node agent is
//! either absent or a small fake on a Unix socket.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

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
