//! Sockets the way in-pod redirection needs them: every socket carries SO_MARK 0x539 so the
//! pod's rules skip it, listeners share ports (SO_REUSEPORT, for rolling upgrades) and accept
//! TPROXYed traffic (IP_TRANSPARENT), and upstream sockets can spoof the client's address.

use std::io;
use std::net::{IpAddr, SocketAddr};

use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use crate::netns::Netns;

/// SO_MARK on every socket ztunnel makes, matched by the pod's redirection rules.
pub const ZTUNNEL_MARK: u32 = 0x539;

/// Listen backlog for proxy listeners.
const BACKLOG: i32 = 1024;

fn new_socket(addr: &SocketAddr) -> io::Result<Socket> {
    let domain = if addr.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    // socket2 sets SOCK_CLOEXEC on Linux at creation; no extra fcntl.
    Socket::new(domain, Type::STREAM.nonblocking(), Some(Protocol::TCP))
}

fn set_transparent(s: &Socket, ipv4: bool) -> io::Result<()> {
    if ipv4 {
        s.set_ip_transparent_v4(true)
    } else {
        s.set_ip_transparent_v6(true)
    }
}

/// Options for a proxy listener.
#[derive(Clone, Copy, Debug)]
pub struct ListenOptions {
    /// Accept TPROXYed connections (needs CAP_NET_ADMIN).
    pub transparent: bool,
    /// Mark the socket so redirection rules skip it.
    pub mark: bool,
    /// SO_INCOMING_CPU: within the reuseport group, prefer connections whose SYN this CPU
    /// processed.
    pub incoming_cpu: Option<usize>,
}

/// Binds a listener inside `netns` with SO_REUSEPORT (a new ztunnel can bind the same port
/// before the old one stops, and each data-path worker has its own), registered with the
/// runtime the caller is in.
pub fn listen(netns: &Netns, addr: SocketAddr, opts: ListenOptions) -> io::Result<TcpListener> {
    let std_listener = netns.run(|| {
        let s = new_socket(&addr)?;
        s.set_reuse_address(true)?;
        s.set_reuse_port(true)?;
        if opts.mark {
            s.set_mark(ZTUNNEL_MARK)?;
        }
        if opts.transparent {
            set_transparent(&s, addr.is_ipv4())?;
        }
        if addr.is_ipv6() {
            s.set_only_v6(true)?;
        }
        if let Some(cpu) = opts.incoming_cpu {
            s.set_cpu_affinity(cpu)?;
        }
        s.bind(&addr.into())?;
        s.listen(BACKLOG)?;
        Ok(std::net::TcpListener::from(s))
    })?;
    TcpListener::from_std(std_listener)
}

/// Creates an upstream socket inside `netns`, marked, optionally bound to a (foreign) source IP
/// so the destination sees the original client address.
pub fn upstream_socket(
    netns: &Netns,
    dst: SocketAddr,
    spoof: Option<IpAddr>,
) -> io::Result<TcpSocket> {
    // Options, bind and connect act on the socket's own netns, so only creation is netns-bound.
    let std_stream = {
        let s = netns.tcp_socket(dst.is_ipv4())?;
        s.set_mark(ZTUNNEL_MARK)?;
        s.set_tcp_nodelay(true)?;
        if let Some(src) = spoof.filter(|src| src.is_ipv4() == dst.is_ipv4()) {
            set_transparent(&s, dst.is_ipv4())?;
            if dst.is_ipv4() {
                s.set_freebind_v4(true)?;
            } else {
                s.set_freebind_v6(true)?;
            }
            // Pick the source port at connect time (shared by distinct 4-tuples) instead of
            // reserving one per bind: spoofed sources would otherwise exhaust ports quickly.
            nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::IpBindAddressNoPort, &true)
                .map_err(io::Error::from)?;
            s.bind(&SocketAddr::new(src, 0).into())?;
        }
        std::net::TcpStream::from(s)
    };
    Ok(TcpSocket::from_std_stream(std_stream))
}

/// Connects an upstream socket made by [`upstream_socket`].
pub async fn connect(
    netns: &Netns,
    dst: SocketAddr,
    spoof: Option<IpAddr>,
) -> io::Result<TcpStream> {
    let socket = upstream_socket(netns, dst, spoof)?;
    socket.connect(dst).await
}

/// The destination the client meant: SO_ORIGINAL_DST after REDIRECT, or the accepted socket's
/// local address after TPROXY (or when the client dialled the listener directly).
pub fn original_destination(stream: &TcpStream, listener_port: u16) -> io::Result<SocketAddr> {
    let local = stream.local_addr()?;
    if local.port() != listener_port {
        return Ok(local);
    }
    let sock = SockRef::from(stream);
    let orig = if local.is_ipv4() {
        sock.original_dst_v4()
    } else {
        sock.original_dst_v6()
    };
    match orig.ok().and_then(|a| a.as_socket()) {
        Some(addr) => Ok(canonical(addr)),
        None => Ok(local),
    }
}

/// Maps IPv4-mapped IPv6 addresses to plain IPv4 so lookups by IP work.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), addr.port()),
            None => addr,
        },
        IpAddr::V4(_) => addr,
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;
    use std::time::Duration;

    use super::*;

    /// The data-path workers rely on this: within a reuseport group, the kernel hands a new
    /// connection to the listener whose SO_INCOMING_CPU is the CPU that sent the SYN.
    #[tokio::test]
    async fn reuseport_listener_with_the_senders_cpu_gets_the_connection() {
        let allowed: Vec<usize> = crate::shards::allowed_cpus()
            .unwrap_or_default()
            .into_iter()
            .take(2)
            .collect();
        if allowed.len() < 2 {
            eprintln!("skipped: needs two CPUs");
            return;
        }
        let netns = Netns::current();
        let first = listen(
            &netns,
            SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            ListenOptions {
                transparent: false,
                mark: false,
                incoming_cpu: Some(allowed[0]),
            },
        )
        .unwrap();
        let addr = first.local_addr().unwrap();
        let second = listen(
            &netns,
            addr,
            ListenOptions {
                transparent: false,
                mark: false,
                incoming_cpu: Some(allowed[1]),
            },
        )
        .unwrap();
        for round in 0..8 {
            let which = round % 2;
            let cpu = allowed[which];
            // Connect from a thread pinned to `cpu`: loopback processes the SYN there.
            let client = std::thread::spawn(move || {
                let mut set = nix::sched::CpuSet::new();
                set.set(cpu).unwrap();
                nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).unwrap();
                std::net::TcpStream::connect(addr).unwrap()
            })
            .join()
            .unwrap();
            let (accepted, peer) = tokio::time::timeout(Duration::from_secs(2), async {
                tokio::select! {
                    a = first.accept() => (0, a.unwrap().1),
                    a = second.accept() => (1, a.unwrap().1),
                }
            })
            .await
            .unwrap();
            assert_eq!(peer, client.local_addr().unwrap());
            assert_eq!(
                accepted, which,
                "connection from CPU {cpu} went to the other listener"
            );
        }
    }
}
