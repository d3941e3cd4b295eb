//! Lifecycle scenarios on a running sandbox: restarting ztunnel under load (connections fail,
//! refused, while it is down and never reach the server in plaintext; they succeed again as soon
//! as it is back), restarting the node agent, a rolling upgrade of ztunnel under a steady stream
//! of new connections (none fails; a long transfer in flight on the old ztunnel completes while
//! it drains), and a policy change closing a now-denied live connection.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, ErrorKind, Read};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use e2e::apps::Client;
use serde_json::Value;

use crate::{Sandbox, eventually};

const CLIENT: &str = "lifecycle/client";
const URL: &str = "http://server.lifecycle.svc.cluster.local:8080/";
const CLIENT_ID: &str = "spiffe://cluster.local/ns/lifecycle/sa/client";
const SERVER_ID: &str = "spiffe://cluster.local/ns/lifecycle/sa/server";
const OPENED: &str = "istio_tcp_connections_opened_total";

fn testdata(file: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("testdata")
        .join(file)
        .to_string_lossy()
        .into_owned()
}

/// Runs every lifecycle scenario, in order.
pub fn run(sb: &Sandbox) {
    let t = Instant::now();
    sb.ok(&["apply", "-f", &testdata("lifecycle.yaml")]);
    let client = sb.pod("lifecycle", "client");
    let server = sb.pod("lifecycle", "server");
    assert_eq!(client["ambient"], true, "{client}");
    assert_eq!(server["ambient"], true, "{server}");
    assert!(
        eventually(Duration::from_secs(10), || sb.succeeds(CLIENT, URL)),
        "client -> server before the lifecycle scenarios"
    );
    let client_ns = client["netns"].as_str().unwrap().to_string();
    let server_ns = server["netns"].as_str().unwrap().to_string();
    let services: Vec<Value> =
        serde_json::from_str(&sb.ok(&["get", "services", "-n", "lifecycle", "-o", "json"]))
            .unwrap();
    let vip = services[0]["clusterIP"].as_str().unwrap();
    let echo: SocketAddr = format!("{vip}:9000").parse().unwrap();
    eprintln!("lifecycle setup: {:.1}s", t.elapsed().as_secs_f64());

    let t = Instant::now();
    restart_under_load(sb);
    eprintln!("ztunnel restarts: {:.1}s", t.elapsed().as_secs_f64());
    let t = Instant::now();
    let out = sb.ok(&["restart", "agent", "--node", "node1"]);
    assert!(out.contains("node1: agent restarted"), "{out}");
    assert!(
        sb.succeeds(CLIENT, URL),
        "traffic flows after an agent restart"
    );
    eprintln!("agent restart: {:.1}s", t.elapsed().as_secs_f64());
    let t = Instant::now();
    upgrade_under_load(sb, &[&client_ns, &server_ns], &client_ns, echo);
    eprintln!("ztunnel upgrades: {:.1}s", t.elapsed().as_secs_f64());
    let t = Instant::now();
    let sleep_ns = sb.pod("bookinfo", "sleep")["netns"]
        .as_str()
        .unwrap()
        .to_string();
    policy_closes_live_connection(sb, &client_ns, &sleep_ns, echo);
    eprintln!(
        "policy on live connections: {:.1}s",
        t.elapsed().as_secs_f64()
    );
}

/// Restarts ztunnel on the client's node, then on the server's, under load. The other node's
/// ztunnel keeps running, so its counters span the outage: no plaintext connection to the
/// server appears there, and every request that succeeded is one mTLS connection.
fn restart_under_load(sb: &Sandbox) {
    // A positive control: a plaintext client (opted out of the mesh) is counted as `unknown`.
    let plain_at_server = || {
        sb.node_metric(
            "node1",
            OPENED,
            &[
                ("reporter", "destination"),
                ("destination_workload", "server"),
                ("destination_workload_namespace", "lifecycle"),
                ("connection_security_policy", "unknown"),
            ],
        )
    };
    let before = plain_at_server();
    let s = sb.call_n("bookinfo/notsecure", URL, 1, 1);
    assert_eq!(
        s["succeeded"], 1,
        "plaintext client reaches the server: {s}"
    );
    assert!(
        eventually(Duration::from_secs(5), || plain_at_server() > before),
        "plaintext connections are visible in the destination's metrics"
    );

    for (node, observer, reporter) in [
        ("node0", "node1", "destination"),
        ("node1", "node0", "source"),
    ] {
        let count = |policy: &str| {
            let mut labels = vec![
                ("reporter", reporter),
                ("destination_workload", "server"),
                ("destination_workload_namespace", "lifecycle"),
                ("connection_security_policy", policy),
            ];
            if policy == "mutual_tls" {
                labels.extend([
                    ("source_principal", CLIENT_ID),
                    ("destination_principal", SERVER_ID),
                ]);
            }
            sb.node_metric(observer, OPENED, &labels)
        };
        let (plain0, mtls0) = (count("unknown"), count("mutual_tls"));
        let load = Load::start(sb, 2);
        let out = sb.ok(&["restart", "ztunnel", "--node", node]);
        assert!(out.contains(&format!("{node}: ztunnel restarted")), "{out}");
        // Back: new connections succeed at once.
        let after = sb.call_n(CLIENT, URL, 10, 2);
        assert_eq!(after["succeeded"], 10, "right after the restart: {after}");
        let load = load.stop();
        eprintln!("  restart {node}: {out}  load {load:?}");
        assert!(
            load.failed > 0,
            "the load overlapped the outage on {node}: {load:?}"
        );
        let kinds: Vec<&String> = load.errors.keys().collect();
        assert!(
            kinds
                .iter()
                .all(|k| ["connect", "protocol", "eof"].contains(&k.as_str())),
            "while ztunnel on {node} is down, connections are refused or closed at once: {load:?}"
        );
        assert_eq!(
            count("unknown"),
            plain0,
            "no plaintext connection to the server while ztunnel on {node} restarted"
        );
        let mtls = count("mutual_tls") - mtls0;
        assert!(
            mtls >= (load.succeeded + 10) as f64,
            "every successful request was an mTLS connection ({mtls} for {} requests)",
            load.succeeded + 10
        );
    }
}

/// Upgrades ztunnel on node0 then node1 while the client keeps opening connections; a long
/// transfer opened before each upgrade runs on through the old ztunnel's drain.
fn upgrade_under_load(sb: &Sandbox, pods: &[&str], client_ns: &str, echo: SocketAddr) {
    // Without this per-namespace sysctl the kernel resets connections still queued on the old
    // ztunnel's SO_REUSEPORT listeners when it closes them, instead of moving them to the new
    // ones. The node agent turns it on when it enrolls a pod.
    for ns in pods {
        let out = Command::new("ip")
            .args(["netns", "exec", ns, "sysctl", "-n"])
            .arg("net.ipv4.tcp_migrate_req")
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "1",
            "agent enabled tcp_migrate_req in {ns}"
        );
    }
    // Many connections at once, so some are always queued when the old listeners close.
    let load = Load::start(sb, 8);
    let mut transfers = Vec::new();
    for node in ["node0", "node1"] {
        let transfer = Transfer::start(client_ns, echo);
        let (out, sigterm) = upgrade(sb, node, &transfer);
        transfers.push((node, out, sigterm, transfer.join()));
    }
    let load = load.stop();
    eprintln!("  upgrades: load {load:?}");
    assert!(load.succeeded > 0, "{load:?}");
    assert_eq!(
        load.failed, 0,
        "no connection failed during the rolling upgrades: {load:?}"
    );
    for (node, out, sigterm, result) in transfers {
        let (bytes, ended) = result.unwrap_or_else(|e| panic!("long transfer via {node}: {e}"));
        assert!(bytes > 0);
        assert!(
            ended > sigterm + Duration::from_millis(400),
            "the transfer was still running while the old ztunnel on {node} drained"
        );
        let drained = out
            .lines()
            .find_map(|l| {
                l.split_once("drained and exited in ")?
                    .1
                    .split_once('s')?
                    .0
                    .parse::<f64>()
                    .ok()
            })
            .unwrap_or_else(|| panic!("no drain time in: {out}"));
        assert!(
            drained >= 0.4,
            "the old ztunnel on {node} waited for the transfer before exiting ({drained}s)"
        );
    }
    // The new ztunnels serve admin and metrics on moved ports; meshctl follows them.
    assert!(
        sb.ztunnel_metric(OPENED, &[("source_principal", CLIENT_ID)]) > 0.0,
        "metrics of the upgraded ztunnels"
    );
    let workloads = sb.ok(&["get", "workloads", "-n", "lifecycle"]);
    assert!(workloads.contains("server"), "{workloads}");
}

/// Runs `upgrade ztunnel --node <node>`, telling `transfer` to finish shortly after the old
/// ztunnel got SIGTERM; returns the output and when that happened.
fn upgrade(sb: &Sandbox, node: &str, transfer: &Transfer) -> (String, Instant) {
    let mut child = Command::new(&sb.bin)
        .arg("sandbox")
        .arg("--state-dir")
        .arg(&sb.state)
        .args(["upgrade", "ztunnel", "--node", node])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = String::new();
    let mut sigterm = None;
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        if line.contains("stopping old ztunnel") {
            sigterm = Some(Instant::now());
            transfer.finish_at(Instant::now() + Duration::from_millis(600));
        }
        out.push_str(&line);
        out.push('\n');
    }
    let status = child.wait().unwrap();
    assert!(status.success(), "upgrade on {node} failed:\n{out}");
    eprintln!("  upgrade {node}:\n{out}");
    let sigterm = sigterm.unwrap_or_else(|| panic!("no SIGTERM step in:\n{out}"));
    (out, sigterm)
}

/// Opens a connection from the client and from `sleep` (another identity) to the server's echo
/// port, denies the client by policy: the client's live connection is closed, sleep's is not.
fn policy_closes_live_connection(sb: &Sandbox, client_ns: &str, other_ns: &str, echo: SocketAddr) {
    let policy = testdata("lifecycle-deny-client.yaml");
    let mut denied = Client::connect(client_ns, echo).unwrap();
    let mut allowed = Client::connect(other_ns, echo).unwrap();
    for c in [&mut denied, &mut allowed] {
        c.greeting().unwrap();
        assert_eq!(c.echo(b"ping").unwrap(), b"ping");
    }
    sb.ok(&["apply", "-f", &policy]);
    let deadline = Instant::now() + Duration::from_secs(10);
    let closed = loop {
        match denied.echo(b"ping") {
            Ok(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            Ok(_) => break false,
            Err(e) if [ErrorKind::WouldBlock, ErrorKind::TimedOut].contains(&e.kind()) => {
                panic!("the denied connection hangs instead of closing: {e}")
            }
            Err(_) => break true,
        }
    };
    assert!(closed, "the now-denied live connection is closed");
    assert_eq!(
        allowed.echo(b"still").unwrap(),
        b"still",
        "a live connection the policy still allows stays open"
    );
    assert!(
        sb.refused(CLIENT, URL),
        "new connections from the client are refused"
    );
    sb.ok(&["delete", "-f", &policy]);
    assert!(eventually(Duration::from_secs(10), || sb.succeeds(CLIENT, URL)));
}

/// Outcome totals of a background load.
#[derive(Debug, Default)]
struct LoadTotals {
    succeeded: u64,
    failed: u64,
    errors: BTreeMap<String, u64>,
    samples: BTreeMap<String, String>,
}

/// `mesh-testapp call` batches from the client pod (one new connection per request), one after
/// the other, until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Vec<Value>>>,
}

impl Load {
    /// Starts the load (`concurrency` connections at a time) and returns once its first batch
    /// completed.
    fn start(sb: &Sandbox, concurrency: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (first_tx, first_rx) = mpsc::sync_channel(1);
        let runner = Sandbox {
            bin: sb.bin.clone(),
            state: sb.state.clone(),
            up: false,
        };
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut batches = Vec::new();
            while !flag.load(Ordering::SeqCst) {
                batches.push(runner.call_n(CLIENT, URL, 10 * concurrency, concurrency));
                let _ = first_tx.try_send(());
            }
            batches
        });
        first_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("first load batch within 10s");
        Self {
            stop,
            handle: Some(handle),
        }
    }

    /// Stops after the running batch and sums every batch.
    fn stop(mut self) -> LoadTotals {
        self.stop.store(true, Ordering::SeqCst);
        let batches = self.handle.take().unwrap().join().unwrap();
        let mut t = LoadTotals::default();
        for b in batches {
            t.succeeded += b["succeeded"].as_u64().unwrap();
            t.failed += b["failed"].as_u64().unwrap();
            for (k, n) in b["errors"].as_object().into_iter().flatten() {
                *t.errors.entry(k.clone()).or_default() += n.as_u64().unwrap();
            }
            for (k, v) in b["error_samples"].as_object().into_iter().flatten() {
                t.samples.insert(k.clone(), v.to_string());
            }
        }
        t
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// A long-lived TCP echo exchange from a pod: a chunk every 50ms, each checked, until told to
/// finish; then a half-close and the server's EOF.
struct Transfer {
    finish: Arc<Mutex<Option<Instant>>>,
    handle: JoinHandle<Result<(usize, Instant), String>>,
}

impl Transfer {
    /// Connects (through the pod's ztunnel as it is now) and starts exchanging.
    fn start(ns: &str, addr: SocketAddr) -> Self {
        let mut c = Client::connect(ns, addr).expect("transfer connect");
        c.greeting().expect("transfer banner");
        let finish: Arc<Mutex<Option<Instant>>> = Arc::default();
        let until = finish.clone();
        let handle = std::thread::spawn(move || {
            let chunk: Vec<u8> = (0..16 * 1024).map(|i| (i % 251) as u8).collect();
            let cap = Instant::now() + Duration::from_secs(30);
            let mut bytes = 0;
            loop {
                let done = until.lock().unwrap().is_some_and(|t| Instant::now() >= t);
                if done {
                    break;
                }
                if Instant::now() > cap {
                    return Err("never told to finish".to_string());
                }
                match c.echo(&chunk) {
                    Ok(back) if back == chunk => bytes += back.len(),
                    Ok(_) => return Err(format!("echo mismatch after {bytes} bytes")),
                    Err(e) => return Err(format!("transfer broken after {bytes} bytes: {e}")),
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            c.stream
                .shutdown(std::net::Shutdown::Write)
                .map_err(|e| e.to_string())?;
            let mut rest = Vec::new();
            match c.stream.read_to_end(&mut rest) {
                Ok(0) => Ok((bytes, Instant::now())),
                Ok(n) => Err(format!("{n} unexpected bytes at the end")),
                Err(e) => Err(format!("no clean end after {bytes} bytes: {e}")),
            }
        });
        Self { finish, handle }
    }

    /// Finishes at `at`.
    fn finish_at(&self, at: Instant) {
        *self.finish.lock().unwrap() = Some(at);
    }

    /// Waits for the end: bytes echoed and when it ended, or how it broke.
    fn join(self) -> Result<(usize, Instant), String> {
        self.handle.join().unwrap()
    }
}
