//! The agent's eBPF redirection mode (`--redirect-mode ebpf`): instead of the nftables table,
//! the `ebpf` crate's programs pinned per pod (keyed by pod UID, which ztunnel also gets over
//! ZDS and uses to register its listeners), plus the policy routing outbound capture needs,
//! programmed over rtnetlink (the rules of [`ebpf::ROUTING`]):
//! `pref 100 fwmark 0x539/0xfff lookup main`, `pref 101 to 169.254.7.127 lookup main`,
//! `pref 102 iif lo ipproto tcp lookup 133` and `local default dev lo src <pod IP> table 133`.
//!
//! IPv4 only: a pod with a routable IPv6 address is refused (its IPv6 traffic would bypass
//! ztunnel), so dual-stack nodes need nftables mode; DNS capture needs nftables mode too.

use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsFd;
use std::path::Path;

use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use netlink_packet_route::{AddressFamily, IpProtocol, RouteNetlinkMessage};

use super::routing::Netlink;
use super::rules::{RulesError, Verification, in_pod};

/// Routing table whose local default route makes the kernel look for a local socket.
const TABLE: u32 = 133;
/// The main routing table.
const MAIN: u32 = 254;
/// ztunnel's socket mark and the mask it is matched under.
const ZTUNNEL_MARK: (u32, u32) = (0x539, 0xfff);
/// Kubelet probes arrive from this address; replies to it keep the main table.
const PROBE_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 7, 127);

/// Installs routing, then the programs (so outbound fails closed rather than leaking while
/// the programs load); idempotent, and a re-install keeps ztunnel's registered listeners.
pub async fn apply(netns: &File, uid: &str, pin_root: &Path) -> Result<(), RulesError> {
    let pins = ebpf::PodRedirection::new(pin_root, uid)?;
    let (ifname, ips) = in_pod(netns, "programming eBPF-mode policy routing", || {
        let (ifname, ips) = pod_interface()?;
        ensure_routing(ips[0])?;
        Ok((ifname, ips))
    })
    .await?;
    let ns = netns.try_clone().map_err(|source| RulesError::Netns {
        what: "duplicating the netns fd",
        source,
    })?;
    tokio::task::spawn_blocking(move || pins.install(ns.as_fd(), &ifname, &ips))
        .await
        .map_err(|e| RulesError::Netns {
            what: "loading eBPF programs",
            source: io::Error::other(e),
        })??;
    Ok(())
}

/// Removes programs and routing; succeeds when they are already gone.
pub async fn remove(netns: &File, uid: &str, pin_root: &Path) -> Result<(), RulesError> {
    ebpf::PodRedirection::new(pin_root, uid)?.remove()?;
    in_pod(netns, "removing eBPF-mode policy routing", remove_routing).await
}

/// Checks the programs are pinned and the routing is in place.
pub async fn verify(netns: &File, uid: &str, pin_root: &Path) -> Result<Verification, RulesError> {
    let pins = ebpf::PodRedirection::new(pin_root, uid)?;
    if !pins.is_installed() {
        return Ok(Verification::Drifted {
            what: format!("eBPF programs are not pinned at {}", pins.dir().display()),
        });
    }
    let missing = in_pod(netns, "reading eBPF-mode policy routing", missing_routing).await?;
    Ok(match missing {
        None => Verification::Intact,
        Some(what) => Verification::Drifted { what },
    })
}

/// The pod's interface (the first non-loopback one with IPv4) and its IPv4 addresses; an
/// error if any interface has an IPv6 address beyond loopback and link-local (fail closed).
fn pod_interface() -> io::Result<(String, Vec<Ipv4Addr>)> {
    let mut found: Option<(String, Vec<Ipv4Addr>)> = None;
    for ifa in nix::ifaddrs::getifaddrs()? {
        if let Some(v6) = ifa.address.as_ref().and_then(|a| a.as_sockaddr_in6()) {
            let ip = v6.ip();
            if !ip.is_loopback() && !ip.is_unicast_link_local() {
                return Err(io::Error::other(format!(
                    "eBPF redirection covers IPv4 only and {} has IPv6 address {ip}; \
                     use --redirect-mode nftables for dual-stack pods",
                    ifa.interface_name
                )));
            }
            continue;
        }
        let Some(v4) = ifa.address.as_ref().and_then(|a| a.as_sockaddr_in()) else {
            continue;
        };
        let ip = v4.ip();
        if ip.is_loopback() {
            continue;
        }
        match &mut found {
            Some((name, ips)) if *name == ifa.interface_name => ips.push(ip),
            Some(_) => {}
            None => found = Some((ifa.interface_name.clone(), vec![ip])),
        }
    }
    found.ok_or_else(|| io::Error::other("the pod has no interface with an IPv4 address"))
}

fn rules() -> [RuleMessage; 3] {
    let base = |prio: u32, table: u32| {
        let mut r = RuleMessage::default();
        r.header.family = AddressFamily::Inet;
        r.header.action = RuleAction::ToTable;
        r.attributes = vec![RuleAttribute::Priority(prio), RuleAttribute::Table(table)];
        r
    };
    let mut marked = base(100, MAIN);
    marked.attributes.extend([
        RuleAttribute::FwMark(ZTUNNEL_MARK.0),
        RuleAttribute::FwMask(ZTUNNEL_MARK.1),
    ]);
    let mut probes = base(101, MAIN);
    probes.header.dst_len = 32;
    probes
        .attributes
        .push(RuleAttribute::Destination(IpAddr::V4(PROBE_IP)));
    let mut local_tcp = base(102, TABLE);
    local_tcp.attributes.extend([
        RuleAttribute::Iifname("lo".into()),
        RuleAttribute::IpProtocol(IpProtocol::Tcp),
    ]);
    [marked, probes, local_tcp]
}

fn route(lo: u32, src: Ipv4Addr) -> RouteMessage {
    let mut r = RouteMessage::default();
    r.header.address_family = AddressFamily::Inet;
    r.header.table = TABLE as u8;
    r.header.protocol = RouteProtocol::Boot;
    r.header.scope = RouteScope::Host;
    r.header.kind = RouteType::Local;
    r.attributes = vec![
        RouteAttribute::Oif(lo),
        RouteAttribute::Table(TABLE),
        // Without a source, connect() to a captured destination fails with ENETUNREACH.
        RouteAttribute::PrefSource(RouteAddress::Inet(src)),
    ];
    r
}

fn ensure_routing(pod_ip: Ipv4Addr) -> io::Result<()> {
    let nl = Netlink::open()?;
    let lo = nix::net::if_::if_nametoindex("lo")?;
    // The route first: the rule sending local TCP to table 133 must never find it empty.
    nl.request(
        RouteNetlinkMessage::NewRoute(route(lo, pod_ip)),
        NLM_F_CREATE | NLM_F_REPLACE,
        false,
    )?;
    for r in rules() {
        nl.request(
            RouteNetlinkMessage::NewRule(r),
            NLM_F_CREATE | NLM_F_EXCL,
            true,
        )?;
    }
    Ok(())
}

fn remove_routing() -> io::Result<()> {
    let nl = Netlink::open()?;
    for r in rules() {
        nl.request_absent_ok(RouteNetlinkMessage::DelRule(r))?;
    }
    let lo = nix::net::if_::if_nametoindex("lo")?;
    let mut r = route(lo, Ipv4Addr::UNSPECIFIED);
    // Deleting matches on table, type and prefix; the source may have been anything.
    r.attributes
        .retain(|a| !matches!(a, RouteAttribute::PrefSource(_)));
    nl.request_absent_ok(RouteNetlinkMessage::DelRoute(r))
}

/// What of the routing is missing, if anything.
fn missing_routing() -> io::Result<Option<String>> {
    let nl = Netlink::open()?;
    let mut query = RuleMessage::default();
    query.header.family = AddressFamily::Inet;
    let present: Vec<RuleMessage> = nl
        .dump(RouteNetlinkMessage::GetRule(query))?
        .into_iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewRule(r) => Some(r),
            _ => None,
        })
        .collect();
    for want in rules() {
        let found = present.iter().any(|r| {
            r.header.action == want.header.action
                && r.header.dst_len == want.header.dst_len
                && want.attributes.iter().all(|a| r.attributes.contains(a))
        });
        if !found {
            return Ok(Some(format!("ip rule {:?} is missing", want.attributes)));
        }
    }
    let mut query = RouteMessage::default();
    query.header.address_family = AddressFamily::Inet;
    let lo = nix::net::if_::if_nametoindex("lo")?;
    let routed = nl
        .dump(RouteNetlinkMessage::GetRoute(query))?
        .iter()
        .any(|m| {
            matches!(m, RouteNetlinkMessage::NewRoute(r)
                if r.header.kind == RouteType::Local
                    && r.header.destination_prefix_length == 0
                    && r.attributes.contains(&RouteAttribute::Table(TABLE))
                    && r.attributes.contains(&RouteAttribute::Oif(lo)))
        });
    Ok((!routed).then(|| format!("the local default route in table {TABLE} is missing")))
}
