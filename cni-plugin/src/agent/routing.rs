//! The pod's return-path policy routing, programmed over rtnetlink from inside the agent:
//! `fwmark 0x111/0xfff pref 32764 lookup 100` and `local default dev lo table 100`, for IPv4 and
//! (when the pod has it) IPv6. Doing this in-process instead of running `ip` several times per
//! pod keeps enrollment off the process-spawn path (PROTOCOLS.md §6).

use std::fs::File;
use std::io;
use std::os::fd::AsFd;

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkMessage,
    NetlinkPayload,
};
use netlink_packet_route::route::{
    RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
use nix::sched::{CloneFlags, setns};

/// Connmark ztunnel's spoofed connections carry (and the fwmark their replies get).
pub const MARK: u32 = 0x111;
/// Mask applied to the fwmark.
pub const MASK: u32 = 0xfff;
/// Routing table sending marked packets to `lo`.
pub const TABLE: u32 = 100;
/// Priority of the fwmark rule.
pub const PREF: u32 = 32764;

/// Installs the rule and route in the netns `netns` (IPv6 too when `v6`) and turns on
/// `net.ipv4.tcp_migrate_req` (covers IPv6 too) so ztunnel upgrades drop no queued connection;
/// idempotent. Blocking: enters the namespace on a throw-away thread.
pub fn ensure(netns: &File, v6: bool) -> io::Result<()> {
    let fd = netns.try_clone()?;
    std::thread::Builder::new()
        .name("netns-routing".into())
        .spawn(move || {
            setns(fd.as_fd(), CloneFlags::CLONE_NEWNET)?;
            // The socket belongs to the namespace it was created in.
            let nl = Netlink::open()?;
            let lo = nix::net::if_::if_nametoindex("lo")?;
            for &family in families(v6) {
                nl.request(
                    RouteNetlinkMessage::NewRule(rule(family)),
                    NLM_F_CREATE | NLM_F_EXCL,
                    true,
                )?;
                nl.request(
                    RouteNetlinkMessage::NewRoute(route(family, lo)),
                    NLM_F_CREATE | NLM_F_REPLACE,
                    false,
                )?;
            }
            // When ztunnel is upgraded, the old process closes its SO_REUSEPORT listeners in the
            // pod; without this, connections still in their accept queues are reset instead of
            // moving to the new ztunnel's listeners.
            std::fs::write("/proc/sys/net/ipv4/tcp_migrate_req", "1")?;
            Ok(())
        })?
        .join()
        .map_err(|_| io::Error::other("routing thread panicked"))?
}

fn families(v6: bool) -> &'static [AddressFamily] {
    if v6 {
        &[AddressFamily::Inet, AddressFamily::Inet6]
    } else {
        &[AddressFamily::Inet]
    }
}

fn rule(family: AddressFamily) -> RuleMessage {
    let mut r = RuleMessage::default();
    r.header.family = family;
    r.header.action = RuleAction::ToTable;
    r.attributes = vec![
        RuleAttribute::Priority(PREF),
        RuleAttribute::FwMark(MARK),
        RuleAttribute::FwMask(MASK),
        RuleAttribute::Table(TABLE),
    ];
    r
}

fn route(family: AddressFamily, lo: u32) -> RouteMessage {
    let mut r = RouteMessage::default();
    r.header.address_family = family;
    r.header.destination_prefix_length = 0;
    r.header.table = TABLE as u8;
    r.header.protocol = RouteProtocol::Boot;
    r.header.scope = RouteScope::Host;
    r.header.kind = RouteType::Local;
    r.attributes = vec![RouteAttribute::Oif(lo), RouteAttribute::Table(TABLE)];
    r
}

/// A NETLINK_ROUTE socket used for one request at a time.
struct Netlink(Socket);

impl Netlink {
    fn open() -> io::Result<Self> {
        let mut s = Socket::new(NETLINK_ROUTE)?;
        s.bind_auto()?;
        s.connect(&SocketAddr::new(0, 0))?;
        Ok(Self(s))
    }

    /// Sends one request and waits for the kernel's ack; `EEXIST` counts as success when
    /// `exists_ok` (an identical rule is already there).
    fn request(&self, msg: RouteNetlinkMessage, flags: u16, exists_ok: bool) -> io::Result<()> {
        let mut m = NetlinkMessage::from(msg);
        m.header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
        m.header.sequence_number = 1;
        m.finalize();
        let mut buf = vec![0u8; m.buffer_len()];
        m.serialize(&mut buf);
        self.0.send(&buf, 0)?;
        let mut reply = vec![0u8; 8192];
        let n = self.0.recv(&mut &mut reply[..], 0)?;
        let parsed = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&reply[..n])
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        match parsed.payload {
            NetlinkPayload::Error(e) => match e.code {
                None => Ok(()),
                Some(code) if exists_ok && -code.get() == libc::EEXIST => Ok(()),
                Some(code) => Err(io::Error::from_raw_os_error(-code.get())),
            },
            other => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unexpected netlink reply: {other:?}"),
            )),
        }
    }
}
