//! Network namespaces for one test: two "pods" joined by a veth pair, each with the in-pod
//! redirection rules the node agent will install (PROTOCOLS.md §6), and an empty netns where
//! ztunnel itself runs. Everything is removed on drop, even when the test fails.

use std::net::Ipv4Addr;
use std::os::fd::{AsFd, OwnedFd};
use std::process::Command;

/// In-pod redirection: outbound REDIRECT to 15001, inbound TPROXY to 15006, HBONE to 15008,
/// ztunnel's own sockets (mark 0x539) skipped, connmark 0x111 returns app replies to ztunnel.
pub const INPOD_RULES: &str = r#"
table inet ztunnel {
  chain prerouting {
    type filter hook prerouting priority mangle; policy accept;
    meta mark & 0xfff == 0x539 ct mark set 0x111
    iifname "lo" return
    ip daddr 127.0.0.0/8 return
    tcp dport 15008 return
    ip saddr 169.254.7.127 return
    meta l4proto tcp tproxy ip to :15006 meta mark set 0x111 accept
  }
  chain output {
    type route hook output priority mangle; policy accept;
    ct mark & 0xfff == 0x111 meta mark set 0x111
  }
  chain output_nat {
    type nat hook output priority -100; policy accept;
    meta mark & 0xfff == 0x539 return
    oifname "lo" return
    ip daddr 127.0.0.0/8 return
    meta l4proto tcp redirect to :15001
  }
}
"#;

/// Runs a command, panicking with its output if it fails.
pub fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("running {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `ss -Hltn` inside netns `ns`: one line per listening TCP socket (`... <addr>:<port> ...`).
pub fn listening_tcp(ns: &str) -> String {
    sh(&["ip", "netns", "exec", ns, "ss", "-Hltn"])
}

/// True if something in netns `ns` listens on TCP `port` (any address).
pub fn listens_on(ns: &str, port: u16) -> bool {
    listening_tcp(ns).contains(&format!(":{port} "))
}

/// Runs a command in a netns, feeding `stdin`.
pub fn sh_in(ns: &str, args: &[&str], stdin: Option<&str>) -> String {
    use std::io::Write;
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns]).args(args);
    cmd.stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().expect("spawn ip netns exec");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    } else {
        drop(child.stdin.take());
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{args:?} in {ns} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A pod: a netns with one veth end and an IP.
pub struct Pod {
    /// Netns name.
    pub ns: String,
    /// Pod IP.
    pub ip: Ipv4Addr,
}

impl Pod {
    /// Opens the pod's netns (for ZDS hand-off or setns).
    pub fn netns_fd(&self) -> OwnedFd {
        std::fs::File::open(format!("/run/netns/{}", self.ns))
            .expect("open netns")
            .into()
    }
}

/// Two pods and a ztunnel netns for one test.
pub struct TestNet {
    /// Short unique prefix of every name.
    pub prefix: String,
    /// Client pod.
    pub a: Pod,
    /// Server pod.
    pub b: Pod,
    /// Where ztunnel runs.
    pub zt: String,
}

impl TestNet {
    /// Creates the namespaces for test number `id` (unique per test, 1..=250), address range
    /// 10.77.<id>.0/24.
    pub fn new(id: u8) -> Self {
        let prefix = format!("zt{id}t");
        let net = TestNet {
            a: Pod {
                ns: format!("{prefix}-a"),
                ip: Ipv4Addr::new(10, 77, id, 2),
            },
            b: Pod {
                ns: format!("{prefix}-b"),
                ip: Ipv4Addr::new(10, 77, id, 3),
            },
            zt: format!("{prefix}-zt"),
            prefix,
        };
        net.cleanup();
        for ns in [&net.a.ns, &net.b.ns, &net.zt] {
            sh(&["ip", "netns", "add", ns]);
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        let (va, vb) = (format!("{}a", net.prefix), format!("{}b", net.prefix));
        sh(&[
            "ip", "link", "add", &va, "type", "veth", "peer", "name", &vb,
        ]);
        for (pod, veth) in [(&net.a, &va), (&net.b, &vb)] {
            sh(&["ip", "link", "set", veth, "netns", &pod.ns]);
            sh(&["ip", "-n", &pod.ns, "link", "set", veth, "name", "eth0"]);
            sh(&[
                "ip",
                "-n",
                &pod.ns,
                "addr",
                "add",
                &format!("{}/24", pod.ip),
                "dev",
                "eth0",
            ]);
            sh(&["ip", "-n", &pod.ns, "link", "set", "eth0", "up"]);
        }
        net
    }

    /// Installs the in-pod redirection rules in both pods.
    pub fn install_redirection(&self) {
        for pod in [&self.a, &self.b] {
            sh_in(&pod.ns, &["nft", "-f", "-"], Some(INPOD_RULES));
            sh(&[
                "ip",
                "-n",
                &pod.ns,
                "rule",
                "add",
                "fwmark",
                "0x111/0xfff",
                "lookup",
                "100",
            ]);
            sh(&[
                "ip",
                "-n",
                &pod.ns,
                "route",
                "add",
                "local",
                "0.0.0.0/0",
                "dev",
                "lo",
                "table",
                "100",
            ]);
        }
    }

    fn cleanup(&self) {
        for ns in [&self.a.ns, &self.b.ns, &self.zt] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

impl TestNet {
    /// eBPF-mode redirection in both pods, as the node agent's `ebpf` mode installs it: the
    /// programs pinned as pods `uids` (the UIDs ztunnel is told over ZDS) under
    /// [`ebpf::DEFAULT_PIN_ROOT`], plus the policy routing outbound capture needs. The pins
    /// are removed when the returned guard drops.
    pub fn install_ebpf_redirection(&self, uids: [&str; 2]) -> EbpfPins {
        let mut pins = EbpfPins(Vec::new());
        for (pod, uid) in [&self.a, &self.b].into_iter().zip(uids) {
            for line in ebpf::ROUTING {
                let line = line.replace("{pod_ip}", &pod.ip.to_string());
                let mut args = vec!["ip", "-n", &pod.ns];
                args.extend(line.split(' '));
                sh(&args);
            }
            let redirection = ebpf::PodRedirection::new(ebpf::DEFAULT_PIN_ROOT, uid)
                .unwrap_or_else(|e| panic!("pod key {uid}: {e}"));
            // Left over from an interrupted run: its netns is gone, the pins are not.
            let _ = redirection.remove();
            redirection
                .install(pod.netns_fd().as_fd(), "eth0", &[pod.ip])
                .unwrap_or_else(|e| panic!("installing eBPF redirection in {}: {e}", pod.ns));
            pins.0.push(redirection);
        }
        pins
    }
}

/// Pinned eBPF redirection of a [`TestNet`]'s pods; unpinned on drop.
pub struct EbpfPins(Vec<ebpf::PodRedirection>);

impl Drop for EbpfPins {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = p.remove();
        }
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// Runs `f` on a fresh thread inside the netns `ns` (sockets it creates stay in that netns).
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let fd = std::fs::File::open(&path).expect("open netns");
        nix::sched::setns(fd, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
    .join()
    .expect("netns thread panicked")
}
