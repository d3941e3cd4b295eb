//! The pod's return-path policy routing, programmed over rtnetlink from inside the agent:
//! `fwmark 0x111/0xfff pref 32764 lookup 100` and `local default dev lo table 100`, for IPv4 and
//! (when the pod has it) IPv6. Doing this in-process instead of running `ip` several times per
//! pod keeps enrollment off the process-spawn path (PROTOCOLS.md §6).

use std::io;

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkMessage,
    NetlinkPayload,
};
use netlink_packet_route::route::{
    RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleFlags, RuleMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// Connmark ztunnel's spoofed connections carry (and the fwmark their replies get).
pub const MARK: u32 = 0x111;
/// Mask applied to the fwmark.
pub const MASK: u32 = 0xfff;
/// Routing table sending marked packets to `lo`.
pub const TABLE: u32 = 100;
/// Priority of the fwmark rule.
pub const PREF: u32 = 32764;

/// Installs the rule and route in the calling thread's netns (IPv6 too when `v6`) and turns on
/// `net.ipv4.tcp_migrate_req` (covers IPv6 too) so ztunnel upgrades drop no queued connection;
/// idempotent. Blocking; run it on a thread that entered the pod netns.
pub fn ensure(v6: bool) -> io::Result<()> {
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
}

/// What a pod netns holds of the redirection's kernel state, read without spawning processes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Inspection {
    /// Copies of our fwmark rule (IPv4, IPv6).
    pub rules: [usize; 2],
    /// Our `local default dev lo table 100` route exists (IPv4, IPv6).
    pub routes: [bool; 2],
    /// The netns's nftables ruleset generation: it changes on every nft commit, so an
    /// unchanged value means nobody touched any table since it was last read.
    pub nft_generation: u32,
}

/// Reads our rules and routes (IPv6 too when `v6`) and the nftables generation of the calling
/// thread's netns. Blocking; run it on a thread that entered the pod netns.
pub fn inspect(v6: bool) -> io::Result<Inspection> {
    let nl = Netlink::open()?;
    let lo = nix::net::if_::if_nametoindex("lo")?;
    let mut out = Inspection {
        nft_generation: super::nftgen::read()?,
        ..Inspection::default()
    };
    for (i, &family) in families(v6).iter().enumerate() {
        let mut rule = RuleMessage::default();
        rule.header.family = family;
        out.rules[i] = nl
            .dump(RouteNetlinkMessage::GetRule(rule))?
            .iter()
            .filter(|m| matches!(m, RouteNetlinkMessage::NewRule(r) if is_our_rule(r)))
            .count();
        let mut route = RouteMessage::default();
        route.header.address_family = family;
        out.routes[i] = nl
            .dump(RouteNetlinkMessage::GetRoute(route))?
            .iter()
            .any(|m| matches!(m, RouteNetlinkMessage::NewRoute(r) if is_our_route(r, lo)));
    }
    Ok(out)
}

/// `fwmark 0x111/0xfff pref 32764 lookup 100`, nothing more (no selector, not inverted).
fn is_our_rule(r: &RuleMessage) -> bool {
    let mut prio = None;
    let (mut mark, mut mask, mut table) = (None, None, u32::from(r.header.table));
    for a in &r.attributes {
        match a {
            RuleAttribute::Priority(p) => prio = Some(*p),
            RuleAttribute::FwMark(m) => mark = Some(*m),
            RuleAttribute::FwMask(m) => mask = Some(*m),
            RuleAttribute::Table(t) => table = *t,
            RuleAttribute::Protocol(_) => {}
            // The kernel reports these with their "unset" value on every rule.
            RuleAttribute::SuppressPrefixLen(u32::MAX)
            | RuleAttribute::SuppressIfGroup(u32::MAX) => {}
            // Any other selector (source, iif, ...) narrows the rule: not ours.
            _ => return false,
        }
    }
    r.header.action == RuleAction::ToTable
        && !r.header.flags.contains(RuleFlags::Invert)
        && r.header.src_len == 0
        && r.header.dst_len == 0
        && prio == Some(PREF)
        && mark == Some(MARK)
        && mask == Some(MASK)
        && table == TABLE
}

/// `local default dev lo table 100`.
fn is_our_route(r: &RouteMessage, lo: u32) -> bool {
    let mut table = u32::from(r.header.table);
    let mut oif = None;
    let mut dst = false;
    for a in &r.attributes {
        match a {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Destination(_) => dst = true,
            _ => {}
        }
    }
    table == TABLE
        && r.header.kind == RouteType::Local
        && r.header.destination_prefix_length == 0
        && !dst
        && oif == Some(lo)
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
pub(super) struct Netlink(Socket);

impl Netlink {
    pub(super) fn open() -> io::Result<Self> {
        let mut s = Socket::new(NETLINK_ROUTE)?;
        s.bind_auto()?;
        s.connect(&SocketAddr::new(0, 0))?;
        Ok(Self(s))
    }

    /// Sends a dump request and collects every message of the reply.
    pub(super) fn dump(&self, msg: RouteNetlinkMessage) -> io::Result<Vec<RouteNetlinkMessage>> {
        let mut m = NetlinkMessage::from(msg);
        m.header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        m.header.sequence_number = 2;
        m.finalize();
        let mut buf = vec![0u8; m.buffer_len()];
        m.serialize(&mut buf);
        self.0.send(&buf, 0)?;
        let invalid = |e: String| io::Error::new(io::ErrorKind::InvalidData, e);
        let mut out = Vec::new();
        let mut reply = vec![0u8; 64 * 1024];
        // A pod has a handful of rules and routes; this bounds a runaway reply all the same.
        for _ in 0..1024 {
            let n = self.0.recv(&mut &mut reply[..], 0)?;
            let mut off = 0;
            while off < n {
                let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&reply[off..n])
                    .map_err(|e| invalid(e.to_string()))?;
                let len = msg.header.length as usize;
                match msg.payload {
                    NetlinkPayload::Done(_) => return Ok(out),
                    NetlinkPayload::Error(e) => {
                        if let Some(code) = e.code {
                            return Err(io::Error::from_raw_os_error(-code.get()));
                        }
                    }
                    NetlinkPayload::InnerMessage(inner) => out.push(inner),
                    _ => {}
                }
                if len == 0 {
                    return Err(invalid("netlink message of length 0".into()));
                }
                off += (len + 3) & !3;
            }
        }
        Err(invalid("netlink dump did not end".into()))
    }

    /// Sends a delete and waits for the ack; deleting what is not there succeeds.
    pub(super) fn request_absent_ok(&self, msg: RouteNetlinkMessage) -> io::Result<()> {
        match self.request(msg, 0, false) {
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ESRCH)) => Ok(()),
            r => r,
        }
    }

    /// Sends one request and waits for the kernel's ack; `EEXIST` counts as success when
    /// `exists_ok` (an identical rule is already there).
    pub(super) fn request(
        &self,
        msg: RouteNetlinkMessage,
        flags: u16,
        exists_ok: bool,
    ) -> io::Result<()> {
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
