//! The real controller driving the real ztunnel: Kubernetes YAML in a watched directory, xDS and
//! certificates over TLS (node token + impersonation), traffic between two pod netns, and a
//! policy file change closing a live connection.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use e2e::mesh::{Mesh, Options, eventually};

fn binaries() -> (PathBuf, PathBuf) {
    let ctrl = PathBuf::from(env!("CARGO_BIN_EXE_mesh-controller"));
    let zt = ctrl.with_file_name("ztunnel");
    assert!(
        zt.exists(),
        "{} missing: build the workspace (cargo build --workspace)",
        zt.display()
    );
    (ctrl, zt)
}

const DENY_CLIENT: &str = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-client
  namespace: default
spec:
  action: DENY
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/default/sa/client"]
"#;

#[test]
fn ztunnel_gets_config_and_certs_from_the_controller_and_policy_changes_apply_live() {
    if !e2e::require_root() {
        return;
    }
    let (ctrl, zt) = binaries();
    let mesh = Mesh::start(
        Path::new(&zt),
        17,
        Options {
            controller: Some(&ctrl),
            ..Default::default()
        },
    );
    let mut live = mesh.check_echo();
    let m = mesh.zt.metrics();
    let mtls = e2e::ztunnel::metric_sum(
        &m,
        "istio_tcp_connections_opened_total",
        &[
            ("reporter", "destination"),
            ("connection_security_policy", "mutual_tls"),
            (
                "source_principal",
                "spiffe://cluster.local/ns/default/sa/client",
            ),
        ],
    );
    assert!(mtls >= 1.0, "{m}");
    // Both pod certificates came from the controller's CA over gRPC (impersonated by node1).
    let dump = mesh.zt.config_dump();
    let certs = dump["certificates"].as_array().expect("certificates");
    assert_eq!(certs.len(), 2, "{dump}");
    // Config came over xDS: the workloads are those of the Kubernetes YAML.
    let workloads = dump["workloads"].to_string();
    assert!(
        workloads.contains("Kubernetes//v1/Pod/default/a"),
        "{workloads}"
    );

    let changed = Instant::now();
    mesh.write_k8s("policy.yaml", DENY_CLIENT);
    live.stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = [0u8; 16];
    let closed = matches!(live.stream.read(&mut buf), Ok(0) | Err(_));
    let took = changed.elapsed();
    let (controller, _) = mesh.controller.as_ref().unwrap();
    assert!(closed, "live connection not closed\n{}", controller.log());
    assert!(
        took < Duration::from_secs(1),
        "policy took {took:?} to close the connection"
    );
    assert!(eventually(Duration::from_secs(3), || {
        mesh.connect().and_then(|mut c| c.greeting()).is_err()
    }));
    // Removing the policy admits the client again.
    let (_, dirs) = mesh.controller.as_ref().unwrap();
    std::fs::remove_file(dirs.config.join("policy.yaml")).unwrap();
    assert!(eventually(Duration::from_secs(5), || {
        mesh.connect().and_then(|mut c| c.greeting()).is_ok()
    }));

    // A malformed document (an unknown field) is counted and rejected; the rest of the
    // config keeps working, and no deny-all takes its place.
    mesh.write_k8s("broken.yaml", BROKEN_POLICY);
    assert!(
        eventually(Duration::from_secs(5), || {
            e2e::ztunnel::metric_sum(
                &controller.metrics(),
                "mesh_controller_config_errors_total",
                &[("source", "files")],
            ) >= 1.0
        }),
        "config error counted\n{}",
        controller.log()
    );
    assert!(
        controller.log().contains("notAField"),
        "the error names the bad field\n{}",
        controller.log()
    );
    mesh.connect()
        .and_then(|mut c| c.greeting())
        .expect("traffic unaffected by the rejected document");

    // Every connected proxy is listed with its own xDS counters.
    let (status, body) = controller
        .get(15014, "/debug/connections")
        .expect("GET /debug/connections");
    assert_eq!(status, 200, "{body}");
    let conns: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(conns["totalClients"], 1, "{conns}");
    let client = &conns["clients"][0];
    assert!(
        client["proxyId"]
            .as_str()
            .unwrap_or("")
            .starts_with("ztunnel~"),
        "{conns}"
    );
    assert_eq!(client["callerNode"], "node1", "{conns}");
    assert!(client["acks"].as_u64().unwrap_or(0) >= 2, "{conns}");
    assert_eq!(client["nacks"], 0, "{conns}");
    assert!(
        client["resourcesSent"].as_u64().unwrap_or(0) >= 3,
        "{conns}"
    );

    // A policy with L7 attributes is enforced by ztunnel on its L4 part only, and says why.
    mesh.write_k8s("l7.yaml", L7_DENY);
    assert!(
        eventually(Duration::from_secs(5), || {
            let (_, body) = controller
                .get(15014, "/debug/policy-status")
                .unwrap_or_default();
            let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            v["policies"].as_array().is_some_and(|ps| {
                ps.iter().any(|p| {
                    p["name"] == "deny-posts"
                        && p["kind"] == "AuthorizationPolicy"
                        && p["status"].as_str().unwrap_or("").contains("methods")
                })
            })
        }),
        "L7 conversion reported\n{}",
        controller.log()
    );
    assert!(
        eventually(Duration::from_secs(5), || mesh
            .zt
            .config_dump()
            .to_string()
            .contains("deny-posts")),
        "ztunnel received the converted policy"
    );
    mesh.connect()
        .and_then(|mut c| c.greeting())
        .expect("a DENY for another principal leaves the client alone");
}

const L7_DENY: &str = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-posts
  namespace: default
spec:
  action: DENY
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/other/sa/intruder"]
    to:
    - operation:
        methods: ["POST"]
"#;

const BROKEN_POLICY: &str = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: broken
  namespace: default
spec:
  action: DENY
  notAField: true
"#;
