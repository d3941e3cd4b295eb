//! End to end through `meshctl sandbox` with the real binaries: the quickstart on two nodes,
//! mTLS identities, opt-out, L4 policy, PeerAuthentication, cross-node traffic, ztunnel restart
//! and rolling upgrade under load, policy closing live connections, a `down` that leaves
//! nothing behind, then the quickstart again with eBPF redirection. Needs root. The sandbox's namespace names are fixed (`msb-*`), so everything
//! runs in one test, in order.

mod lifecycle;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

struct Sandbox {
    bin: PathBuf,
    state: PathBuf,
    up: bool,
}

impl Sandbox {
    fn cmd(&self, args: &[&str]) -> Output {
        Command::new(&self.bin)
            .arg("sandbox")
            .arg("--state-dir")
            .arg(&self.state)
            .args(args)
            .output()
            .expect("run meshctl")
    }

    /// Runs a command that must succeed; returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.cmd(args);
        assert!(
            out.status.success(),
            "meshctl sandbox {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `up --nodes 2` with the quickstart's namespaces, bookinfo and clients, plus `extra` flags.
    fn up_quickstart(&self, extra: &[&str]) {
        let files = ["namespaces.yaml", "bookinfo.yaml", "clients.yaml"].map(quickstart);
        let mut args = vec!["up", "--nodes", "2"];
        args.extend_from_slice(extra);
        for f in &files {
            args.extend(["-f", f.as_str()]);
        }
        self.ok(&args);
    }

    /// `mesh-testapp call` from a pod; returns the JSON summary (also for failed calls).
    fn call(&self, pod: &str, url: &str) -> Value {
        self.call_n(pod, url, 2, 1)
    }

    /// `mesh-testapp call --count N --concurrency C` from a pod; the JSON summary.
    fn call_n(&self, pod: &str, url: &str, count: u32, concurrency: u32) -> Value {
        let (count, concurrency) = (count.to_string(), concurrency.to_string());
        let out = self.cmd(&[
            "exec",
            pod,
            "--",
            "mesh-testapp",
            "call",
            url,
            "--count",
            &count,
            "--concurrency",
            &concurrency,
            "--timeout",
            "2s",
            "--json",
            "--allow-failures",
        ]);
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "call from {pod} to {url}: {e}\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    fn succeeds(&self, pod: &str, url: &str) -> bool {
        let s = self.call(pod, url);
        s["failed"].as_u64() == Some(0) && s["succeeded"].as_u64() == Some(2)
    }

    fn refused(&self, pod: &str, url: &str) -> bool {
        let s = self.call(pod, url);
        s["succeeded"].as_u64() == Some(0)
    }

    fn pods(&self) -> Vec<Value> {
        serde_json::from_str(&self.ok(&["get", "pods", "-o", "json"])).expect("pods JSON")
    }

    fn pod(&self, ns: &str, name: &str) -> Value {
        self.pods()
            .into_iter()
            .find(|p| p["namespace"] == ns && p["name"] == name)
            .unwrap_or_else(|| panic!("pod {ns}/{name} listed"))
    }

    /// Sum of a ztunnel metric over every node.
    fn ztunnel_metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        ["node0", "node1"]
            .iter()
            .map(|n| self.node_metric(n, name, labels))
            .sum()
    }

    /// Sum of a metric of one node's ztunnel (`meshctl sandbox metrics` finds its port).
    fn node_metric(&self, node: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
        let text = self.ok(&["metrics", &format!("ztunnel-{node}")]);
        e2e::ztunnel::metric_sum(&text, name, labels)
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if self.up {
            let _ = self.cmd(&["down"]);
        }
    }
}

fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    false
}

fn quickstart(file: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/quickstart")
        .join(file)
        .to_string_lossy()
        .into_owned()
}

#[test]
fn quickstart_mesh_end_to_end_through_the_sandbox() {
    if !e2e::require_root() {
        return;
    }
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_meshctl"));
    let state = std::env::temp_dir().join("meshctl-sandbox-e2e");
    let mut sb = Sandbox {
        bin,
        state,
        up: false,
    };
    let _ = sb.cmd(&["down"]);
    sb.up = true;
    crashed_up_is_cleaned_up_by_down(&sb);
    sb.up_quickstart(&[]);

    // Enrollment and identities.
    let sleep = sb.pod("bookinfo", "sleep");
    assert_eq!(sleep["ambient"], true, "{sleep}");
    assert_eq!(
        sleep["identity"],
        "spiffe://cluster.local/ns/bookinfo/sa/sleep"
    );
    assert_eq!(
        sb.pod("bookinfo", "notsecure")["ambient"],
        false,
        "opted-out pod stays plaintext"
    );
    assert_eq!(sb.pod("legacy", "legacy-sleep")["ambient"], false);

    // The app works across nodes (productpage on node0 calls details and reviews v2/v3 on
    // node1), and the destination sees the client's pod IP over mTLS with both identities.
    let pp = "http://productpage.bookinfo.svc.cluster.local:9080/";
    assert!(
        eventually(Duration::from_secs(20), || sb
            .succeeds("bookinfo/sleep", pp)),
        "sleep -> productpage"
    );
    // One request, so the summary carries the body: productpage answered with what details
    // and reviews (on the other node) told it.
    let one = sb.call_n("bookinfo/sleep", pp, 1, 1);
    let body = &one["body"];
    assert!(
        body["pod"]
            .as_str()
            .unwrap_or("")
            .starts_with("productpage"),
        "{one}"
    );
    let upstream = body["upstream"].as_array().cloned().unwrap_or_default();
    assert_eq!(upstream.len(), 2, "details and reviews called: {one}");
    for (u, name) in upstream.iter().zip(["details", "reviews"]) {
        assert_eq!(u["ok"], true, "{name}: {u}");
        assert!(
            u["body"]["pod"].as_str().unwrap_or("").starts_with(name),
            "{name} answered: {u}"
        );
    }
    let sleep_ip = sleep["ip"].as_str().unwrap().to_string();
    let peers = one["peer_ips"].to_string();
    assert!(
        peers.contains(&sleep_ip),
        "server saw the client pod IP {sleep_ip}: {one}"
    );
    let mtls = sb.ztunnel_metric(
        "istio_tcp_connections_opened_total",
        &[
            ("reporter", "destination"),
            ("security_policy", "mutual_tls"),
            (
                "source_principal",
                "spiffe://cluster.local/ns/bookinfo/sa/sleep",
            ),
            (
                "destination_principal",
                "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-productpage",
            ),
        ],
    );
    assert!(
        mtls > 0.0,
        "mutual_tls with both principals in ztunnel metrics"
    );
    let cross = sb.ztunnel_metric(
        "istio_tcp_connections_opened_total",
        &[
            ("reporter", "destination"),
            ("security_policy", "mutual_tls"),
            (
                "source_principal",
                "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-productpage",
            ),
            (
                "destination_principal",
                "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-details",
            ),
        ],
    );
    assert!(
        cross > 0.0,
        "productpage (node0) -> details (node1) over mTLS"
    );

    // L4 policy: allow-nothing, then an ALLOW for one principal.
    let reviews = "http://reviews.bookinfo.svc.cluster.local:9080/";
    sb.ok(&["apply", "-f", &quickstart("try/deny-all.yaml")]);
    assert!(
        eventually(Duration::from_secs(15), || sb.refused("bookinfo/sleep", pp)),
        "allow-nothing refuses"
    );
    sb.ok(&["apply", "-f", &quickstart("try/allow-productpage.yaml")]);
    assert!(
        eventually(Duration::from_secs(15), || sb
            .succeeds("bookinfo/productpage-v1", reviews)),
        "the named service account is admitted"
    );
    assert!(
        sb.refused("bookinfo/sleep", reviews),
        "any other identity is refused"
    );
    sb.ok(&["delete", "-f", &quickstart("try/allow-productpage.yaml")]);
    sb.ok(&["delete", "-f", &quickstart("try/deny-all.yaml")]);
    assert!(eventually(Duration::from_secs(15), || sb
        .succeeds("bookinfo/sleep", pp)));

    // PeerAuthentication: STRICT refuses the legacy (plaintext) client, PERMISSIVE admits it.
    assert!(
        sb.succeeds("legacy/legacy-sleep", pp),
        "plaintext allowed by default"
    );
    sb.ok(&["apply", "-f", &quickstart("try/strict-mtls.yaml")]);
    assert!(
        eventually(Duration::from_secs(15), || sb
            .refused("legacy/legacy-sleep", pp)),
        "STRICT refuses plaintext"
    );
    assert!(
        sb.succeeds("bookinfo/sleep", pp),
        "mesh clients unaffected by STRICT"
    );
    let permissive = std::env::temp_dir().join("meshctl-e2e-permissive.yaml");
    std::fs::write(
        &permissive,
        std::fs::read_to_string(quickstart("try/strict-mtls.yaml"))
            .unwrap()
            .replace("mode: STRICT", "mode: PERMISSIVE"),
    )
    .unwrap();
    sb.ok(&["apply", "-f", &permissive.to_string_lossy()]);
    assert!(
        eventually(Duration::from_secs(15), || sb
            .succeeds("legacy/legacy-sleep", pp)),
        "PERMISSIVE admits plaintext"
    );

    // Labelling a namespace enrolls its running pods: no restart (same uid, same container
    // process), and their traffic is now mTLS with their own SPIFFE identity.
    let before = sb.pod("legacy", "legacy-sleep");
    assert!(
        before["containers"][0]["pid"].as_i64().is_some(),
        "{before}"
    );
    let legacy_mtls = || {
        sb.ztunnel_metric(
            "istio_tcp_connections_opened_total",
            &[
                ("reporter", "destination"),
                ("security_policy", "mutual_tls"),
                (
                    "source_principal",
                    "spiffe://cluster.local/ns/legacy/sa/default",
                ),
            ],
        )
    };
    assert_eq!(legacy_mtls(), 0.0, "legacy was plaintext so far");
    sb.ok(&["apply", "-f", &quickstart("try/legacy-ambient.yaml")]);
    assert!(eventually(Duration::from_secs(15), || sb
        .pod("legacy", "legacy-sleep")["ambient"]
        == true));
    let after = sb.pod("legacy", "legacy-sleep");
    assert_eq!(after["uid"], before["uid"], "same pod");
    assert_eq!(
        after["containers"], before["containers"],
        "container not restarted"
    );
    let c = &after["containers"][0];
    let (pid, start) = (c["pid"].as_i64(), c["startTime"].as_u64());
    assert!(
        pid.zip(start).is_some_and(alive),
        "the recorded container process is the live one: {c}"
    );
    assert!(
        eventually(Duration::from_secs(15), || sb
            .succeeds("legacy/legacy-sleep", pp)
            && legacy_mtls() > 0.0),
        "enrolled running pod talks mTLS as spiffe://cluster.local/ns/legacy/sa/default"
    );

    // DENY by namespace, now that legacy is in the mesh.
    sb.ok(&["apply", "-f", &quickstart("try/deny-legacy.yaml")]);
    assert!(
        eventually(Duration::from_secs(15), || sb
            .refused("legacy/legacy-sleep", pp)),
        "DENY by namespace"
    );
    assert!(sb.succeeds("bookinfo/sleep", pp));

    // ztunnel restart and rolling upgrade under load, policy closing a live connection.
    lifecycle::run(&sb);

    // down leaves nothing behind: no process it started (components and containers, as
    // recorded in its state), no netns, no host link, no file.
    let state: Value = serde_json::from_slice(
        &std::fs::read(sb.state.join("state.json")).expect("read state.json"),
    )
    .expect("state.json is JSON");
    let mut started = Vec::new();
    recorded_processes(&state, &mut started);
    assert!(
        started.len() >= 5,
        "controller, 2 agents, 2 ztunnels and the pods recorded: {started:?}"
    );
    assert!(started.iter().all(|p| alive(*p)), "all running before down");
    sb.ok(&["down"]);
    sb.up = false;
    let left: Vec<_> = started.iter().filter(|p| alive(**p)).collect();
    assert!(left.is_empty(), "processes left running: {left:?}");
    let links = String::from_utf8_lossy(
        &Command::new("ip")
            .args(["-o", "link", "show"])
            .output()
            .unwrap()
            .stdout,
    )
    .into_owned();
    assert!(!links.contains("msb"), "host links left: {links}");
    let netns = String::from_utf8_lossy(
        &Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap()
            .stdout,
    )
    .into_owned();
    assert!(!netns.contains("msb-"), "netns left: {netns}");
    assert!(!sb.state.exists(), "state dir removed");
    let etc: Vec<_> = std::fs::read_dir("/etc/netns")
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        etc.iter().all(|n| !n.to_string_lossy().starts_with("msb-")),
        "/etc/netns entries left: {etc:?}"
    );

    ebpf_mode_sandbox(&mut sb);
}

/// The same quickstart with the node agents in eBPF redirection mode: pods enrolled without an
/// nftables rule, sleep -> productpage over mTLS, still after a ztunnel upgrade, and `down`
/// removing every pin.
fn ebpf_mode_sandbox(sb: &mut Sandbox) {
    sb.up = true;
    sb.up_quickstart(&["--redirect-mode", "ebpf"]);
    let sleep = sb.pod("bookinfo", "sleep");
    assert_eq!(sleep["ambient"], true, "{sleep}");
    let netns = sleep["netns"].as_str().unwrap();
    let nft = Command::new("ip")
        .args(["netns", "exec", netns, "nft", "list", "ruleset"])
        .output()
        .unwrap();
    assert!(nft.stdout.is_empty(), "no nftables rules in eBPF mode");
    assert_eq!(sb.pod("bookinfo", "notsecure")["ambient"], false);
    let pp = "http://productpage.bookinfo.svc.cluster.local:9080/";
    assert!(
        eventually(Duration::from_secs(20), || sb
            .succeeds("bookinfo/sleep", pp)),
        "sleep -> productpage in eBPF mode"
    );
    let mtls = sb.ztunnel_metric(
        "istio_tcp_connections_opened_total",
        &[
            ("reporter", "destination"),
            ("security_policy", "mutual_tls"),
            (
                "source_principal",
                "spiffe://cluster.local/ns/bookinfo/sa/sleep",
            ),
        ],
    );
    assert!(mtls > 0.0, "sleep's connections went over mTLS");
    // A rolling ztunnel upgrade: the new ztunnel registers its listeners in the pods' maps and
    // takes over new connections.
    sb.ok(&["upgrade", "ztunnel"]);
    assert!(
        eventually(Duration::from_secs(20), || sb
            .succeeds("bookinfo/sleep", pp)),
        "sleep -> productpage after a ztunnel upgrade in eBPF mode"
    );
    sb.ok(&["down"]);
    sb.up = false;
    let pins: Vec<_> = std::fs::read_dir(ebpf::DEFAULT_PIN_ROOT)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        pins.iter()
            .all(|n| !n.to_string_lossy().starts_with("sandbox-")),
        "eBPF pins left: {pins:?}"
    );
}

/// Every `{pid, start_time}` process record anywhere in the sandbox state.
fn recorded_processes(v: &Value, out: &mut Vec<(i64, u64)>) {
    match v {
        Value::Object(m) => {
            if let (Some(pid), Some(start)) = (
                m.get("pid").and_then(Value::as_i64),
                m.get("start_time").and_then(Value::as_u64),
            ) {
                out.push((pid, start));
            }
            m.values().for_each(|v| recorded_processes(v, out));
        }
        Value::Array(a) => a.iter().for_each(|v| recorded_processes(v, out)),
        _ => {}
    }
}

/// True while the recorded process (same pid and start time) exists and is not a zombie.
fn alive((pid, start): (i64, u64)) -> bool {
    matches!(proc_stat(pid), Some((state, t)) if t == start && state != "Z" && state != "X")
}

/// State letter and start time (fields 3 and 22 of `/proc/<pid>/stat`).
fn proc_stat(pid: i64) -> Option<(String, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Counted after the parenthesised command, which may itself contain spaces.
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace();
    let state = fields.next()?.to_string();
    Some((state, fields.nth(18)?.parse().ok()?))
}

/// Processes inside the sandbox's network namespaces, as (pid, start time, command name).
fn sandbox_processes() -> Vec<(i64, u64, String)> {
    let list = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let names: Vec<String> = String::from_utf8_lossy(&list.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with("msb-"))
        .map(str::to_string)
        .collect();
    let mut out = Vec::new();
    for n in names {
        let pids = Command::new("ip")
            .args(["netns", "pids", &n])
            .output()
            .unwrap();
        for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
            let Ok(pid) = pid.parse::<i64>() else {
                continue;
            };
            if let Some((_, start)) = proc_stat(pid) {
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                out.push((pid, start, comm.trim().to_string()));
            }
        }
    }
    out
}

/// `up` killed half-way leaves orphaned components and namespaces; `down` removes them all.
fn crashed_up_is_cleaned_up_by_down(sb: &Sandbox) {
    let mut up = Command::new(&sb.bin)
        .arg("sandbox")
        .arg("--state-dir")
        .arg(&sb.state)
        .args(["up", "--nodes", "1"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start meshctl sandbox up");
    // Kill it as soon as its first component (the controller) runs, long before it is ready.
    let controller_runs = || {
        sandbox_processes()
            .iter()
            .any(|(_, _, comm)| comm == "mesh-controller")
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !controller_runs() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let still_running = matches!(up.try_wait(), Ok(None));
    let _ = up.kill();
    let _ = up.wait();
    assert!(
        still_running,
        "up was killed half-way, not after it finished"
    );
    let orphans = sandbox_processes();
    assert!(
        orphans.iter().any(|(_, _, comm)| comm == "mesh-controller"),
        "the orphaned controller is still running: {orphans:?}"
    );
    sb.ok(&["down"]);
    let left: Vec<_> = orphans
        .iter()
        .filter(|(pid, start, _)| alive((*pid, *start)))
        .collect();
    assert!(left.is_empty(), "orphans left after down: {left:?}");
    let netns = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let netns = String::from_utf8_lossy(&netns.stdout);
    assert!(!netns.contains("msb-"), "netns left after down: {netns}");
}
