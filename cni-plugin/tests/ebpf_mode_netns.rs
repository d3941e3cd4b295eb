//! The agent's eBPF redirection mode in real network namespaces: programs pinned per pod,
//! policy routing over rtnetlink, verification, repair and removal, and the result capturing
//! the app's connections. Needs root. Each test has its own [`TestNet`] (ids 46-48).

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use e2e::netns::TestNet;
use mesh_cni::agent::redirect::RedirectMode;
use mesh_cni::agent::rules::Verification;
use nix::sched::CloneFlags;

fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Pod a of a [`TestNet`] (its `eth0` wired to pod b) in eBPF mode, keyed by its netns name.
struct Pod {
    /// Held for its namespaces.
    _net: TestNet,
    name: String,
    file: File,
    ip: Ipv4Addr,
    peer_ip: Ipv4Addr,
    mode: RedirectMode,
}

impl Pod {
    fn new(id: u8) -> Self {
        let net = TestNet::new(id);
        let file = File::open(format!("/run/netns/{}", net.a.ns)).unwrap();
        let mode = RedirectMode::Ebpf {
            pin_root: PathBuf::from(ebpf::DEFAULT_PIN_ROOT),
        };
        Pod {
            name: net.a.ns.clone(),
            ip: net.a.ip,
            peer_ip: net.b.ip,
            _net: net,
            file,
            mode,
        }
    }

    fn pins(&self) -> ebpf::PodRedirection {
        ebpf::PodRedirection::new(ebpf::DEFAULT_PIN_ROOT, &self.name).unwrap()
    }

    async fn verify(&self) -> Verification {
        self.mode
            .verify_since(&self.file, &self.name, None)
            .await
            .unwrap()
            .0
    }

    fn ip_rules(&self) -> String {
        sh(&["ip", "-n", &self.name, "rule", "show"])
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        // The namespaces go with `net`; pins outlive them unless removed.
        let _ = self.pins().remove();
    }
}

#[tokio::test]
async fn ebpf_mode_installs_idempotently_and_removes_everything() {
    let pod = Pod::new(46);
    pod.mode.apply(&pod.file, &pod.name).await.unwrap();
    pod.mode.apply(&pod.file, &pod.name).await.unwrap();
    assert_eq!(pod.verify().await, Verification::Intact);
    let rules = pod.ip_rules();
    assert_eq!(rules.matches("lookup 133").count(), 1, "{rules}");
    assert_eq!(
        rules.matches("fwmark 0x539/0xfff lookup main").count(),
        1,
        "{rules}"
    );
    assert_eq!(
        rules.matches("to 169.254.7.127 lookup main").count(),
        1,
        "{rules}"
    );
    let route = sh(&["ip", "-n", &pod.name, "route", "show", "table", "133"]);
    assert!(
        route.contains(&format!("local default dev lo scope host src {}", pod.ip)),
        "{route}"
    );
    assert!(pod.pins().is_installed());
    let nft = sh(&["ip", "netns", "exec", &pod.name, "nft", "list", "ruleset"]);
    assert!(
        nft.trim().is_empty(),
        "no netfilter rules in eBPF mode: {nft}"
    );

    pod.mode.remove(&pod.file, &pod.name).await.unwrap();
    assert!(!pod.pins().dir().exists());
    let rules = pod.ip_rules();
    assert!(
        !rules.contains("lookup 133") && !rules.contains("0x539"),
        "{rules}"
    );
    assert!(
        sh(&["ip", "-n", &pod.name, "route", "show", "table", "133"])
            .trim()
            .is_empty()
    );
    assert!(matches!(pod.verify().await, Verification::Drifted { .. }));
    // Removing again is fine.
    pod.mode.remove(&pod.file, &pod.name).await.unwrap();
}

#[tokio::test]
async fn ebpf_mode_refuses_a_pod_with_ipv6_rather_than_leave_it_unredirected() {
    let pod = Pod::new(49);
    let v6 = sh(&[
        "ip",
        "netns",
        "exec",
        &pod.name,
        "sysctl",
        "-n",
        "net.ipv6.conf.eth0.disable_ipv6",
    ]);
    if v6.trim() != "0" {
        return; // No IPv6 stack on this kernel: nothing to refuse.
    }
    sh(&[
        "ip",
        "-n",
        &pod.name,
        "addr",
        "add",
        "fd00:98:49::2/64",
        "dev",
        "eth0",
        "nodad",
    ]);
    let err = pod.mode.apply(&pod.file, &pod.name).await.unwrap_err();
    assert!(err.to_string().contains("IPv4 only"), "{err}");
    assert!(!pod.pins().is_installed(), "nothing half-installed");
}

#[tokio::test]
async fn ebpf_mode_verification_notices_missing_routing_and_apply_repairs_it() {
    let pod = Pod::new(47);
    pod.mode.apply(&pod.file, &pod.name).await.unwrap();
    sh(&["ip", "-n", &pod.name, "rule", "del", "pref", "102"]);
    let Verification::Drifted { what } = pod.verify().await else {
        panic!("a deleted rule must be noticed");
    };
    assert!(what.contains("rule"), "{what}");
    pod.mode.apply(&pod.file, &pod.name).await.unwrap();
    assert_eq!(pod.verify().await, Verification::Intact);
    assert_eq!(pod.ip_rules().matches("lookup 133").count(), 1);
}

#[tokio::test]
async fn ebpf_mode_captures_the_apps_connections_for_a_registered_listener() {
    let pod = Pod::new(48);
    pod.mode.apply(&pod.file, &pod.name).await.unwrap();
    let fd = pod.file.try_clone().unwrap();
    let listener: TcpListener = std::thread::spawn(move || {
        nix::sched::setns(fd.as_fd(), CloneFlags::CLONE_NEWNET).unwrap();
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.set_ip_transparent_v4(true).unwrap();
        s.set_mark(0x539).unwrap();
        s.bind(&SocketAddr::from(([0, 0, 0, 0], 15001)).into())
            .unwrap();
        s.listen(8).unwrap();
        s.into()
    })
    .join()
    .unwrap();
    pod.pins()
        .register(ebpf::Listener::Outbound, &listener)
        .unwrap();
    let dst = SocketAddr::from((pod.peer_ip, 8080));
    let fd = pod.file.try_clone().unwrap();
    let client = std::thread::spawn(move || {
        nix::sched::setns(fd.as_fd(), CloneFlags::CLONE_NEWNET).unwrap();
        std::net::TcpStream::connect_timeout(&dst, Duration::from_secs(2))
    });
    let (accepted, _) = listener.accept().unwrap();
    assert_eq!(
        accepted.local_addr().unwrap(),
        dst,
        "original destination kept"
    );
    client.join().unwrap().expect("the app's connect succeeds");
}
