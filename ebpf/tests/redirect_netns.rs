//! eBPF redirection for real, in network namespaces each test creates: a "pod" netns and a
//! peer joined by a veth pair, the programs installed in the pod, and listeners standing in
//! for ztunnel's. Needs root.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::process::Command;
use std::time::Duration;

use ebpf::{DEFAULT_PIN_ROOT, Listener, PodRedirection, ROUTING};
use nix::sched::{CloneFlags, setns};
use socket2::{Domain, Socket, Type};

const MARK: u32 = 0x539;
const TIMEOUT: Duration = Duration::from_secs(2);

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A pod netns (`<name>-pod`, 10.<net>.0.2) and its peer (`<name>-peer`, 10.<net>.0.1) with
/// the redirection installed in the pod; everything is removed on drop.
struct Pod {
    pod_ns: String,
    peer_ns: String,
    pod_ip: Ipv4Addr,
    peer_ip: Ipv4Addr,
    redirection: PodRedirection,
}

impl Pod {
    fn new(name: &str, net: u8) -> Self {
        let pod = Pod {
            pod_ns: format!("{name}-pod"),
            peer_ns: format!("{name}-peer"),
            pod_ip: Ipv4Addr::new(10, net, 0, 2),
            peer_ip: Ipv4Addr::new(10, net, 0, 1),
            redirection: PodRedirection::new(DEFAULT_PIN_ROOT, &format!("test-{name}")).unwrap(),
        };
        pod.cleanup();
        ip(&["netns", "add", &pod.pod_ns]);
        ip(&["netns", "add", &pod.peer_ns]);
        ip(&[
            "-n",
            &pod.pod_ns,
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &pod.peer_ns,
        ]);
        for (ns, addr) in [(&pod.pod_ns, pod.pod_ip), (&pod.peer_ns, pod.peer_ip)] {
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                "eth0",
            ]);
            ip(&["-n", ns, "link", "set", "eth0", "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        pod.routing("add");
        pod.install();
        pod
    }

    /// Adds or deletes the policy routing outbound capture needs.
    fn routing(&self, verb: &str) {
        for line in ROUTING {
            let line = line.replace("{pod_ip}", &self.pod_ip.to_string()).replacen(
                " add ",
                &format!(" {verb} "),
                1,
            );
            let mut args = vec!["-n", &self.pod_ns];
            args.extend(line.split(' '));
            ip(&args);
        }
    }

    fn netns(ns: &str) -> std::fs::File {
        std::fs::File::open(format!("/run/netns/{ns}")).unwrap()
    }

    fn install(&self) {
        let ns = Self::netns(&self.pod_ns);
        self.redirection
            .install(ns.as_fd(), "eth0", &[self.pod_ip])
            .unwrap();
    }

    fn cleanup(&self) {
        let _ = self.redirection.remove();
        for ns in [&self.pod_ns, &self.peer_ns] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }

    /// Runs `f` on a thread inside netns `ns`.
    fn run_in<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
        let file = Self::netns(ns);
        std::thread::scope(|s| {
            s.spawn(|| {
                setns(file.as_fd(), CloneFlags::CLONE_NEWNET).unwrap();
                f()
            })
            .join()
            .unwrap()
        })
    }

    /// A listener in netns `ns`; `proxy` makes it like ztunnel's (transparent, marked).
    fn listen(ns: &str, addr: SocketAddr, proxy: bool) -> TcpListener {
        Self::run_in(ns, || {
            let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
            s.set_reuse_address(true).unwrap();
            if proxy {
                s.set_ip_transparent_v4(true).unwrap();
                s.set_mark(MARK).unwrap();
            }
            s.bind(&addr.into()).unwrap();
            s.listen(16).unwrap();
            s.set_nonblocking(true).unwrap();
            s.into()
        })
    }

    /// Connects from netns `ns`, optionally from a marked (ztunnel-like) socket.
    fn connect(ns: &str, dst: SocketAddr, marked: bool) -> std::io::Result<TcpStream> {
        Self::run_in(ns, || {
            let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
            if marked {
                s.set_mark(MARK)?;
            }
            s.connect_timeout(&dst.into(), TIMEOUT)?;
            Ok(s.into())
        })
    }

    /// The ztunnel stand-in: 15001 and 15006 listeners in the pod, registered.
    fn proxy(&self) -> (TcpListener, TcpListener) {
        let out = Self::listen(&self.pod_ns, SocketAddr::from(([0, 0, 0, 0], 15001)), true);
        let inb = Self::listen(&self.pod_ns, SocketAddr::from(([0, 0, 0, 0], 15006)), true);
        self.redirection.register(Listener::Outbound, &out).unwrap();
        self.redirection.register(Listener::Inbound, &inb).unwrap();
        (out, inb)
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// Accepts one connection within the timeout.
fn accept(l: &TcpListener) -> Option<(TcpStream, SocketAddr)> {
    accept_within(l, TIMEOUT)
}

fn accept_within(l: &TcpListener, wait: Duration) -> Option<(TcpStream, SocketAddr)> {
    let deadline = std::time::Instant::now() + wait;
    while std::time::Instant::now() < deadline {
        match l.accept() {
            Ok((s, peer)) => return Some((s, peer)),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
    None
}

#[test]
fn outbound_connections_reach_15001_with_the_original_destination() {
    let pod = Pod::new("ebpf-out", 231);
    let (outbound, _inbound) = pod.proxy();
    let dst = SocketAddr::from((pod.peer_ip, 8080));
    let mut client = Pod::connect(&pod.pod_ns, dst, false).expect("captured connect succeeds");
    let (mut accepted, from) = accept(&outbound).expect("15001 accepts the app's connection");
    assert_eq!(
        accepted.local_addr().unwrap(),
        dst,
        "local address is the original destination"
    );
    assert_eq!(from.ip(), std::net::IpAddr::V4(pod.pod_ip));
    client.write_all(b"ping").unwrap();
    let mut buf = [0u8; 4];
    accepted.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");
}

#[test]
fn inbound_connections_reach_15006_but_hbone_goes_to_15008() {
    let pod = Pod::new("ebpf-in", 232);
    let (_outbound, inbound) = pod.proxy();
    let hbone = Pod::listen(&pod.pod_ns, SocketAddr::from(([0, 0, 0, 0], 15008)), true);

    let app_port = SocketAddr::from((pod.pod_ip, 9090));
    let _c = Pod::connect(&pod.peer_ns, app_port, false).expect("inbound connect succeeds");
    let (accepted, from) = accept(&inbound).expect("15006 accepts the inbound connection");
    assert_eq!(accepted.local_addr().unwrap(), app_port);
    assert_eq!(from.ip(), std::net::IpAddr::V4(pod.peer_ip));

    let _h = Pod::connect(&pod.peer_ns, SocketAddr::from((pod.pod_ip, 15008)), false).unwrap();
    assert!(accept(&hbone).is_some(), "HBONE reaches 15008 directly");
    assert!(accept(&inbound).is_none(), "HBONE is not captured by 15006");
}

#[test]
fn pod_local_and_marked_traffic_is_not_captured() {
    let pod = Pod::new("ebpf-local", 233);
    let (outbound, inbound) = pod.proxy();
    let app = Pod::listen(&pod.pod_ns, SocketAddr::from(([0, 0, 0, 0], 7070)), false);
    let _a = Pod::connect(&pod.pod_ns, SocketAddr::from((pod.pod_ip, 7070)), false).unwrap();
    assert!(
        accept(&app).is_some(),
        "the app reaches itself on the pod IP"
    );
    let _b = Pod::connect(&pod.pod_ns, SocketAddr::from(([127, 0, 0, 1], 7070)), false).unwrap();
    assert!(accept(&app).is_some(), "the app reaches itself on loopback");

    // ztunnel's own (marked) sockets leave the pod: the peer accepts them.
    let peer = Pod::listen(&pod.peer_ns, SocketAddr::from(([0, 0, 0, 0], 8081)), false);
    let _m = Pod::connect(&pod.pod_ns, SocketAddr::from((pod.peer_ip, 8081)), true).unwrap();
    assert!(accept(&peer).is_some(), "marked sockets bypass capture");
    assert!(accept(&outbound).is_none());
    assert!(accept(&inbound).is_none());
}

#[test]
fn without_registered_listeners_connections_are_dropped_and_counted() {
    let pod = Pod::new("ebpf-closed", 234);
    let app = Pod::listen(&pod.pod_ns, SocketAddr::from(([0, 0, 0, 0], 9091)), false);
    let peer = Pod::listen(&pod.peer_ns, SocketAddr::from(([0, 0, 0, 0], 8082)), false);
    {
        let _proxy = pod.proxy();
    } // ztunnel gone: its sockets left the map as they closed.
    assert!(Pod::connect(&pod.pod_ns, SocketAddr::from((pod.peer_ip, 8082)), false).is_err());
    assert!(accept(&peer).is_none(), "no outbound bypass around ztunnel");
    assert!(Pod::connect(&pod.peer_ns, SocketAddr::from((pod.pod_ip, 9091)), false).is_err());
    assert!(accept(&app).is_none(), "no inbound bypass around ztunnel");
    let dropped = pod.redirection.dropped().unwrap();
    assert!(dropped.outbound >= 1, "{dropped:?}");
    assert!(dropped.inbound >= 1, "{dropped:?}");
}

#[test]
fn reinstalling_keeps_registered_listeners_and_remove_detaches() {
    let pod = Pod::new("ebpf-re", 235);
    let (outbound, _inbound) = pod.proxy();
    pod.install();
    assert!(pod.redirection.is_installed());
    let dst = SocketAddr::from((pod.peer_ip, 8083));
    let _c = Pod::connect(&pod.pod_ns, dst, false).unwrap();
    assert!(
        accept(&outbound).is_some(),
        "still captured after re-install"
    );

    pod.redirection.remove().unwrap();
    pod.routing("del");
    assert!(!pod.redirection.is_installed());
    assert!(!pod.redirection.dir().exists());
    // Without the programs, inbound connections reach the app directly again (the kernel
    // releases an unpinned link asynchronously, so allow it a moment).
    let app = Pod::listen(&pod.pod_ns, SocketAddr::from(([0, 0, 0, 0], 9092)), false);
    let direct = (0..20).any(|_| {
        let _d = Pod::connect(&pod.peer_ns, SocketAddr::from((pod.pod_ip, 9092)), false).unwrap();
        let reached = accept_within(&app, Duration::from_millis(100)).is_some();
        if !reached {
            std::thread::sleep(Duration::from_millis(100));
        }
        reached
    });
    assert!(direct, "inbound still captured after remove");
}

#[test]
fn pod_keys_must_be_plain_names() {
    for bad in ["", ".", "..", "a/b", "x y"] {
        assert!(
            PodRedirection::new(DEFAULT_PIN_ROOT, bad).is_err(),
            "{bad:?}"
        );
    }
    assert!(PodRedirection::new(DEFAULT_PIN_ROOT, "0f3c-uid_1.x").is_ok());
}

#[test]
fn kubelet_probes_reach_the_app_directly() {
    let pod = Pod::new("ebpf-probe", 236);
    let (_outbound, inbound) = pod.proxy();
    let app = Pod::listen(&pod.pod_ns, SocketAddr::from(([0, 0, 0, 0], 8086)), false);
    // The node's probe source (kubelet traffic is SNATed to it) lives on the peer side.
    ip(&[
        "-n",
        &pod.peer_ns,
        "addr",
        "add",
        "169.254.7.127/32",
        "dev",
        "eth0",
    ]);
    ip(&[
        "-n",
        &pod.pod_ns,
        "route",
        "add",
        "169.254.7.127/32",
        "dev",
        "eth0",
    ]);
    let probe = Pod::run_in(&pod.peer_ns, || {
        let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        s.bind(&SocketAddr::from(([169, 254, 7, 127], 0)).into())
            .unwrap();
        s.connect_timeout(&SocketAddr::from((pod.pod_ip, 8086)).into(), TIMEOUT)
    });
    probe.expect("the probe connects");
    let (_, from) = accept(&app).expect("the app itself accepts the probe");
    assert_eq!(
        from.ip(),
        std::net::IpAddr::V4(Ipv4Addr::new(169, 254, 7, 127))
    );
    assert!(accept_within(&inbound, Duration::from_millis(200)).is_none());
}
