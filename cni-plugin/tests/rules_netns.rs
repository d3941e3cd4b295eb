//! In-pod redirection rules programmed into real network namespaces. Needs root and the `nft`
//! and `ip` binaries. Every test makes its own namespaces (`cnirules-<test>-<pid>`), removed on
//! drop even when the test fails; traffic tests use 10.99.<n>.0/24 and fd00:99:<n>::/64.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{
    IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, TcpListener, TcpStream,
};
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use mesh_cni::agent::rules::{self, RedirectConfig, TABLE, Verification};
use nix::sched::CloneFlags;
use nix::sys::socket::{
    self, AddressFamily, Backlog, SockFlag, SockType, SockaddrIn, SockaddrStorage, sockopt,
};

/// A named netns, deleted on drop.
struct Netns {
    name: String,
    file: File,
}

impl Netns {
    fn new(test: &str) -> Self {
        let name = format!("cnirules-{test}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        sh(&["ip", "netns", "add", &name]);
        let file = match File::open(format!("/run/netns/{name}")) {
            Ok(f) => f,
            Err(e) => {
                let _ = Command::new("ip").args(["netns", "del", &name]).output();
                panic!("opening netns {name}: {e}");
            }
        };
        let ns = Netns { name, file };
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// Runs a command inside, panicking on failure.
    fn exec(&self, args: &[&str]) -> String {
        let out = self.try_exec(args);
        assert!(
            out.status.success(),
            "{args:?} in {} failed: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn try_exec(&self, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .output()
            .unwrap()
    }

    /// Runs `f` on a thread inside this netns; sockets it makes live here.
    fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let fd = self.file.try_clone().unwrap();
        std::thread::spawn(move || {
            nix::sched::setns(&fd, CloneFlags::CLONE_NEWNET).unwrap();
            f()
        })
        .join()
        .unwrap()
    }

    fn fwmark_rules(&self, family: &str) -> usize {
        self.exec(&["ip", family, "rule", "show"])
            .lines()
            .filter(|l| l.contains("fwmark 0x111/0xfff") && l.contains("lookup 100"))
            .count()
    }

    fn table_100_routes(&self, family: &str) -> usize {
        self.exec(&["ip", family, "route", "show", "table", "all"])
            .lines()
            .filter(|l| l.contains("table 100"))
            .count()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn drift(v: Verification) -> String {
    match v {
        Verification::Drifted { what } => what,
        Verification::Intact => panic!("expected drift, got Intact"),
    }
}

/// The handle of the first rule in `chain` whose text contains `needle`.
fn handle_of(ns: &Netns, chain: &str, needle: &str) -> String {
    let listing = ns.exec(&["nft", "-a", "list", "chain", "inet", TABLE, chain]);
    let line = listing
        .lines()
        .find(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no `{needle}` in {listing}"));
    line.rsplit("# handle ").next().unwrap().trim().to_string()
}

/// Deletes the rule sending outbound TCP to 15001, as someone editing the pod's rules would.
fn delete_outbound_redirect(ns: &Netns) {
    let handle = handle_of(ns, "output_nat", "redirect to :15001");
    ns.exec(&[
        "nft",
        "delete",
        "rule",
        "inet",
        TABLE,
        "output_nat",
        "handle",
        &handle,
    ]);
}

/// Deletes the return-path routing rule of family `fam` (`-4` or `-6`) by hand.
fn delete_fwmark_rule(ns: &Netns, fam: &str) {
    ns.exec(&[
        "ip",
        fam,
        "rule",
        "del",
        "fwmark",
        "0x111/0xfff",
        "pref",
        "32764",
        "lookup",
        "100",
    ]);
}

#[tokio::test]
async fn apply_installs_table_and_routing_and_verify_reports_intact() {
    let ns = Netns::new("apply");
    let cfg = RedirectConfig::default();
    rules::apply(&ns.file, &cfg).await.unwrap();

    let listing = ns.exec(&["nft", "list", "table", "inet", TABLE]);
    assert!(listing.contains("tproxy ip to :15006"), "{listing}");
    assert!(listing.contains("tproxy ip6 to :15006"), "{listing}");
    assert!(listing.contains("redirect to :15001"), "{listing}");
    assert!(!listing.contains(":15053"), "{listing}");
    assert_eq!(ns.fwmark_rules("-4"), 1);
    assert_eq!(ns.fwmark_rules("-6"), 1);
    assert_eq!(ns.table_100_routes("-4"), 1);
    assert_eq!(ns.table_100_routes("-6"), 1);
    assert_eq!(
        rules::verify(&ns.file, &cfg).await.unwrap(),
        Verification::Intact
    );
}

#[tokio::test]
async fn applying_twice_keeps_exactly_one_ip_rule_and_one_table() {
    let ns = Netns::new("twice");
    let cfg = RedirectConfig::default();
    rules::apply(&ns.file, &cfg).await.unwrap();
    rules::apply(&ns.file, &cfg).await.unwrap();

    assert_eq!(ns.fwmark_rules("-4"), 1);
    assert_eq!(ns.fwmark_rules("-6"), 1);
    assert_eq!(ns.table_100_routes("-4"), 1);
    assert_eq!(ns.table_100_routes("-6"), 1);
    let tables = ns.exec(&["nft", "list", "tables"]);
    assert_eq!(tables.matches(TABLE).count(), 1, "{tables}");
    assert_eq!(
        rules::verify(&ns.file, &cfg).await.unwrap(),
        Verification::Intact
    );
}

#[tokio::test]
async fn hand_edited_nft_rules_are_drift_and_apply_repairs_them() {
    let ns = Netns::new("nftdrift");
    let cfg = RedirectConfig::default();
    rules::apply(&ns.file, &cfg).await.unwrap();

    delete_outbound_redirect(&ns);
    let what = drift(rules::verify(&ns.file, &cfg).await.unwrap());
    assert!(what.contains("redirect to :15001"), "{what}");

    rules::apply(&ns.file, &cfg).await.unwrap();
    assert_eq!(
        rules::verify(&ns.file, &cfg).await.unwrap(),
        Verification::Intact
    );

    // An extra rule is drift too, not just a missing one.
    ns.exec(&[
        "nft",
        "insert",
        "rule",
        "inet",
        TABLE,
        "prerouting",
        "tcp",
        "dport",
        "22",
        "accept",
    ]);
    let what = drift(rules::verify(&ns.file, &cfg).await.unwrap());
    assert!(what.contains("dport 22"), "{what}");
    rules::apply(&ns.file, &cfg).await.unwrap();
    assert_eq!(
        rules::verify(&ns.file, &cfg).await.unwrap(),
        Verification::Intact
    );
}

#[tokio::test]
async fn checks_since_an_intact_generation_still_catch_every_change() {
    let ns = Netns::new("since");
    let cfg = RedirectConfig::default();
    rules::apply(&ns.file, &cfg).await.unwrap();
    let (v, generation) = rules::verify_since(&ns.file, &cfg, None).await.unwrap();
    assert_eq!(v, Verification::Intact);
    let generation = generation.expect("an intact check returns the nftables generation");
    // Nothing changed: still intact, same generation.
    assert_eq!(
        rules::verify_since(&ns.file, &cfg, Some(generation))
            .await
            .unwrap(),
        (Verification::Intact, Some(generation))
    );
    // Any nft commit in the netns moves the generation, so the table is listed and compared.
    delete_outbound_redirect(&ns);
    let (v, next) = rules::verify_since(&ns.file, &cfg, Some(generation))
        .await
        .unwrap();
    assert!(drift(v).contains("redirect to :15001"));
    assert_eq!(next, None);
    rules::apply(&ns.file, &cfg).await.unwrap();
    let (v, repaired) = rules::verify_since(&ns.file, &cfg, None).await.unwrap();
    assert_eq!(v, Verification::Intact);
    assert_ne!(repaired, Some(generation));
    // Routing is not nft: a deleted ip rule is caught whatever the generation says.
    delete_fwmark_rule(&ns, "-4");
    let (v, _) = rules::verify_since(&ns.file, &cfg, repaired).await.unwrap();
    assert!(drift(v).contains("-4 rule"));
}

#[tokio::test]
async fn missing_ip_rules_or_routes_are_drift_and_apply_restores_them() {
    let ns = Netns::new("ipdrift");
    let cfg = RedirectConfig::default();
    rules::apply(&ns.file, &cfg).await.unwrap();

    delete_fwmark_rule(&ns, "-4");
    let what = drift(rules::verify(&ns.file, &cfg).await.unwrap());
    assert!(what.contains("-4 rule"), "{what}");
    rules::apply(&ns.file, &cfg).await.unwrap();
    assert_eq!(ns.fwmark_rules("-4"), 1);
    assert_eq!(
        rules::verify(&ns.file, &cfg).await.unwrap(),
        Verification::Intact
    );

    delete_fwmark_rule(&ns, "-6");
    let what = drift(rules::verify(&ns.file, &cfg).await.unwrap());
    assert!(what.contains("-6 rule"), "{what}");
    rules::apply(&ns.file, &cfg).await.unwrap();

    ns.exec(&[
        "ip", "-6", "route", "del", "local", "::/0", "dev", "lo", "table", "100",
    ]);
    let what = drift(rules::verify(&ns.file, &cfg).await.unwrap());
    assert!(what.contains("-6 route"), "{what}");
    rules::apply(&ns.file, &cfg).await.unwrap();
    assert_eq!(
        rules::verify(&ns.file, &cfg).await.unwrap(),
        Verification::Intact
    );
}

#[tokio::test]
async fn verify_against_another_config_is_drift() {
    let ns = Netns::new("cfgdrift");
    let cfg = RedirectConfig::default();
    rules::apply(&ns.file, &cfg).await.unwrap();
    let dns = RedirectConfig {
        dns_capture: true,
        ..cfg
    };
    let what = drift(rules::verify(&ns.file, &dns).await.unwrap());
    assert!(what.contains("15053"), "{what}");
    rules::apply(&ns.file, &dns).await.unwrap();
    assert_eq!(
        rules::verify(&ns.file, &dns).await.unwrap(),
        Verification::Intact
    );
}

#[tokio::test]
async fn remove_deletes_table_rules_and_routes_and_can_repeat() {
    let ns = Netns::new("remove");
    let cfg = RedirectConfig::default();
    rules::apply(&ns.file, &cfg).await.unwrap();
    rules::remove(&ns.file).await.unwrap();

    let listed = ns.try_exec(&["nft", "list", "table", "inet", TABLE]);
    assert!(!listed.status.success(), "table still present");
    for fam in ["-4", "-6"] {
        assert_eq!(ns.fwmark_rules(fam), 0, "{fam}");
        assert_eq!(ns.table_100_routes(fam), 0, "{fam}");
    }
    let what = drift(rules::verify(&ns.file, &cfg).await.unwrap());
    assert!(what.contains("missing"), "{what}");

    rules::remove(&ns.file).await.unwrap();
}

#[tokio::test]
async fn netns_with_ipv6_disabled_gets_ipv4_only_redirection() {
    let ns = Netns::new("nov6");
    ns.exec(&[
        "sysctl",
        "-q",
        "-w",
        "net.ipv6.conf.all.disable_ipv6=1",
        "net.ipv6.conf.default.disable_ipv6=1",
        "net.ipv6.conf.lo.disable_ipv6=1",
    ]);
    let cfg = RedirectConfig::default();
    rules::apply(&ns.file, &cfg).await.unwrap();

    let listing = ns.exec(&["nft", "list", "table", "inet", TABLE]);
    assert!(!listing.contains("ip6 "), "{listing}");
    assert!(listing.contains("tproxy ip to :15006"), "{listing}");
    assert_eq!(ns.fwmark_rules("-4"), 1);
    assert_eq!(ns.fwmark_rules("-6"), 0);
    assert_eq!(
        rules::verify(&ns.file, &cfg).await.unwrap(),
        Verification::Intact
    );
    rules::remove(&ns.file).await.unwrap();
    assert_eq!(ns.fwmark_rules("-4"), 0);
}

/// A pod netns (10.99.n.1 on eth0) joined by a veth to a peer netns (10.99.n.2).
fn pod_and_peer(test: &str, n: u8) -> (Netns, Netns) {
    let pod = Netns::new(&format!("{test}-pod"));
    let peer = Netns::new(&format!("{test}-peer"));
    pod.exec(&[
        "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", &peer.name,
    ]);
    for (ns, host) in [(&pod, 1), (&peer, 2)] {
        ns.exec(&[
            "ip",
            "addr",
            "add",
            &format!("10.99.{n}.{host}/24"),
            "dev",
            "eth0",
        ]);
        ns.exec(&["ip", "link", "set", "eth0", "up"]);
    }
    (pod, peer)
}

fn listen(ns: &Netns, addr: SocketAddrV4) -> TcpListener {
    let listener = ns.run(move || TcpListener::bind(addr).unwrap());
    listener.set_nonblocking(true).unwrap();
    listener
}

/// Accepts one connection within `wait`, or None.
fn accept_within(listener: &TcpListener, wait: Duration) -> Option<(TcpStream, SocketAddr)> {
    let deadline = Instant::now() + wait;
    loop {
        match listener.accept() {
            Ok((s, peer)) => {
                s.set_nonblocking(false).unwrap();
                return Some((s, peer));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return None;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

/// Connects from inside `ns`, optionally with SO_MARK, and sends `hello`.
fn connect_from(ns: &Netns, dst: SocketAddrV4, mark: Option<u32>) -> TcpStream {
    ns.run(move || {
        let fd: OwnedFd = socket::socket(
            AddressFamily::Inet,
            SockType::Stream,
            SockFlag::empty(),
            None,
        )
        .unwrap();
        if let Some(m) = mark {
            socket::setsockopt(&fd, sockopt::Mark, &m).unwrap();
        }
        socket::connect(fd.as_raw_fd(), &SockaddrIn::from(dst)).unwrap();
        let mut s = TcpStream::from(fd);
        s.write_all(b"hello").unwrap();
        s
    })
}

fn read_hello(s: &mut TcpStream) {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 5];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello");
}

#[tokio::test]
async fn outbound_tcp_lands_on_15001_with_original_destination() {
    let (pod, peer) = pod_and_peer("redirect", 1);
    rules::apply(&pod.file, &RedirectConfig::default())
        .await
        .unwrap();
    let capture = listen(&pod, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 15001));
    let server = listen(&peer, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 80));
    let dst = SocketAddrV4::new(Ipv4Addr::new(10, 99, 1, 2), 80);

    let _client = connect_from(&pod, dst, None);
    let (mut accepted, from) =
        accept_within(&capture, Duration::from_secs(5)).expect("not redirected to 15001");
    read_hello(&mut accepted);
    assert_eq!(from.ip(), Ipv4Addr::new(10, 99, 1, 1));
    let orig = socket::getsockopt(&accepted, sockopt::OriginalDst).unwrap();
    let orig = SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(orig.sin_addr.s_addr)),
        u16::from_be(orig.sin_port),
    );
    assert_eq!(orig, dst);
    assert!(
        accept_within(&server, Duration::from_millis(200)).is_none(),
        "redirected connection also reached the real destination"
    );
}

#[tokio::test]
async fn proxy_marked_sockets_are_not_redirected() {
    let (pod, peer) = pod_and_peer("marked", 2);
    rules::apply(&pod.file, &RedirectConfig::default())
        .await
        .unwrap();
    let capture = listen(&pod, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 15001));
    let server = listen(&peer, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 80));
    let dst = SocketAddrV4::new(Ipv4Addr::new(10, 99, 2, 2), 80);

    // Reply packets come back through the pod's TPROXY rule; the handshake and data completing
    // shows that rule hands them to the connecting socket.
    let _client = connect_from(&pod, dst, Some(0x539));
    let (mut accepted, from) =
        accept_within(&server, Duration::from_secs(5)).expect("marked connection lost");
    read_hello(&mut accepted);
    assert_eq!(from.ip(), Ipv4Addr::new(10, 99, 2, 1));
    assert!(
        accept_within(&capture, Duration::from_millis(200)).is_none(),
        "marked connection was redirected to 15001"
    );
}

/// Adds fd00:99:<n>::1 (pod) and ::2 (peer) to the veth of [`pod_and_peer`], usable at once.
fn add_ipv6(pod: &Netns, peer: &Netns, n: u8) {
    for (ns, host) in [(pod, 1), (peer, 2)] {
        ns.exec(&[
            "ip",
            "-6",
            "addr",
            "add",
            &format!("fd00:99:{n}::{host}/64"),
            "dev",
            "eth0",
            "nodad",
        ]);
    }
}

fn v6(n: u8, host: u16) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x99, n as u16, 0, 0, 0, 0, host)
}

/// A listener made as ztunnel makes its in-pod listeners (IP_TRANSPARENT), so TPROXY may hand
/// it connections addressed to other ports.
fn transparent_listener(ns: &Netns, addr: SocketAddr) -> TcpListener {
    let listener = ns.run(move || {
        let family = if addr.is_ipv4() {
            AddressFamily::Inet
        } else {
            AddressFamily::Inet6
        };
        let fd = socket::socket(family, SockType::Stream, SockFlag::empty(), None).unwrap();
        socket::setsockopt(&fd, sockopt::IpTransparent, &true).unwrap();
        socket::setsockopt(&fd, sockopt::ReuseAddr, &true).unwrap();
        if addr.is_ipv6() {
            // Beside the IPv4 listener on the same port, as ztunnel does.
            socket::setsockopt(&fd, sockopt::Ipv6V6Only, &true).unwrap();
        }
        socket::bind(fd.as_raw_fd(), &SockaddrStorage::from(addr)).unwrap();
        socket::listen(&fd, Backlog::new(16).unwrap()).unwrap();
        TcpListener::from(fd)
    });
    listener.set_nonblocking(true).unwrap();
    listener
}

/// Connects from inside `ns` to any address and sends `hello`.
fn connect_any(ns: &Netns, dst: SocketAddr) -> TcpStream {
    ns.run(move || {
        let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(5)).unwrap();
        s.write_all(b"hello").unwrap();
        s
    })
}

#[tokio::test]
async fn outbound_ipv6_tcp_lands_on_15001_with_original_destination() {
    let (pod, peer) = pod_and_peer("redirect6", 3);
    add_ipv6(&pod, &peer, 3);
    rules::apply(&pod.file, &RedirectConfig::default())
        .await
        .unwrap();
    let capture = ns_listen6(&pod, 15001);
    let server = ns_listen6(&peer, 80);
    let dst = SocketAddrV6::new(v6(3, 2), 80, 0, 0);

    let _client = connect_any(&pod, dst.into());
    let (mut accepted, from) =
        accept_within(&capture, Duration::from_secs(5)).expect("not redirected to 15001");
    read_hello(&mut accepted);
    assert_eq!(from.ip(), IpAddr::V6(v6(3, 1)));
    let orig = socket::getsockopt(&accepted, sockopt::Ip6tOriginalDst).unwrap();
    let orig = SocketAddrV6::new(
        Ipv6Addr::from(orig.sin6_addr.s6_addr),
        u16::from_be(orig.sin6_port),
        0,
        0,
    );
    assert_eq!(orig, dst);
    assert!(
        accept_within(&server, Duration::from_millis(200)).is_none(),
        "redirected connection also reached the real destination"
    );
}

fn ns_listen6(ns: &Netns, port: u16) -> TcpListener {
    let listener = ns.run(move || {
        TcpListener::bind(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, port, 0, 0)).unwrap()
    });
    listener.set_nonblocking(true).unwrap();
    listener
}

#[tokio::test]
async fn inbound_tcp_is_tproxied_to_15006_hbone_goes_to_15008_and_probes_bypass() {
    let (pod, peer) = pod_and_peer("tproxy", 4);
    add_ipv6(&pod, &peer, 4);
    rules::apply(&pod.file, &RedirectConfig::default())
        .await
        .unwrap();
    let any4 = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
    let plain4 = transparent_listener(&pod, SocketAddr::new(any4, 15006));
    let hbone4 = transparent_listener(&pod, SocketAddr::new(any4, 15008));
    let any6 = IpAddr::V6(Ipv6Addr::UNSPECIFIED);
    let plain6 = transparent_listener(&pod, SocketAddr::new(any6, 15006));
    let app = listen(&pod, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 8080));

    let cases = [
        (
            IpAddr::V4(Ipv4Addr::new(10, 99, 4, 1)),
            IpAddr::V4(Ipv4Addr::new(10, 99, 4, 2)),
        ),
        (IpAddr::V6(v6(4, 1)), IpAddr::V6(v6(4, 2))),
    ];
    for (pod_ip, peer_ip) in cases {
        // Plaintext to the app port goes to 15006; the accepted socket's local address is the
        // original destination (TPROXY keeps it), and the client address is the peer's.
        let dst = SocketAddr::new(pod_ip, 8080);
        let _client = connect_any(&peer, dst);
        let listener = if pod_ip.is_ipv4() { &plain4 } else { &plain6 };
        let (mut accepted, from) =
            accept_within(listener, Duration::from_secs(5)).expect("not captured on 15006");
        read_hello(&mut accepted);
        assert_eq!(from.ip(), peer_ip);
        assert_eq!(accepted.local_addr().unwrap(), dst);
        assert!(
            accept_within(&app, Duration::from_millis(200)).is_none(),
            "captured connection also reached the app"
        );
    }

    // Kubelet probes (SNATed on the node to 169.254.7.127) reach the app directly.
    peer.exec(&["ip", "addr", "add", "169.254.7.127/32", "dev", "eth0"]);
    pod.exec(&["ip", "route", "add", "169.254.7.127/32", "dev", "eth0"]);
    let _probe = peer.run(|| {
        let fd: OwnedFd = socket::socket(
            AddressFamily::Inet,
            SockType::Stream,
            SockFlag::empty(),
            None,
        )
        .unwrap();
        let src = SocketAddrV4::new(Ipv4Addr::new(169, 254, 7, 127), 0);
        socket::bind(fd.as_raw_fd(), &SockaddrIn::from(src)).unwrap();
        let dst = SocketAddrV4::new(Ipv4Addr::new(10, 99, 4, 1), 8080);
        socket::connect(fd.as_raw_fd(), &SockaddrIn::from(dst)).unwrap();
        let mut s = TcpStream::from(fd);
        s.write_all(b"hello").unwrap();
        s
    });
    let (mut accepted, from) =
        accept_within(&app, Duration::from_secs(5)).expect("probe reached the app");
    read_hello(&mut accepted);
    assert_eq!(from.ip(), Ipv4Addr::new(169, 254, 7, 127));
    assert!(accept_within(&plain4, Duration::from_millis(200)).is_none());

    // HBONE arrives on 15008 itself (not 15006).
    let _client = connect_any(&peer, SocketAddr::new(cases[0].0, 15008));
    let (mut accepted, _) = accept_within(&hbone4, Duration::from_secs(5)).expect("15008 reached");
    read_hello(&mut accepted);
    assert!(accept_within(&plain4, Duration::from_millis(200)).is_none());
}
