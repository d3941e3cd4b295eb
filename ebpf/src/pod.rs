//! One pod's redirection: load, attach, pin, register listeners, remove.

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};

use aya::maps::{HashMap as BpfHashMap, Map, MapData, PerCpuArray, SockMap};
use aya::programs::links::FdLink;
use aya::programs::tc::TcAttachOptions;
use aya::programs::{LinkOrder, SchedClassifier, SkLookup, TcAttachType};
use aya::{Ebpf, EbpfLoader};
use nix::sched::{CloneFlags, setns};

use crate::{EbpfError, bpffs};

/// The compiled `bpf/redirect.c` (aligned: the ELF parser reads it in place).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/redirect.o"));

const OUTBOUND: &str = "outbound";
const INBOUND: &str = "inbound";
const LISTENERS: &str = "listeners";
const POD_IPS: &str = "pod_ips";
const DROPPED: &str = "dropped";

/// A ztunnel listener the programs steer to (its slot in the `listeners` map).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Listener {
    /// 15001: connections the app makes.
    Outbound = 0,
    /// 15006: plaintext connections arriving for the app.
    Inbound = 1,
}

/// Connections dropped because no ztunnel listener was registered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Dropped {
    /// Outbound connection attempts (sk_lookup).
    pub outbound: u64,
    /// Inbound SYNs (tc).
    pub inbound: u64,
}

/// The pinned redirection state of one pod: `<root>/<key>/{outbound,inbound,listeners,...}`.
#[derive(Clone, Debug)]
pub struct PodRedirection {
    root: PathBuf,
    dir: PathBuf,
}

impl PodRedirection {
    /// The state of pod `key` (its UID) under pin root `root`; nothing is touched yet.
    pub fn new(root: impl Into<PathBuf>, key: &str) -> Result<Self, EbpfError> {
        let usable = !key.is_empty()
            && key.len() <= 128
            && key != "."
            && key != ".."
            && key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !usable {
            return Err(EbpfError::BadKey(key.to_string()));
        }
        let root = root.into();
        let dir = root.join(key);
        Ok(Self { root, dir })
    }

    /// The pod's pin directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// True when both programs and the listener map are pinned.
    pub fn is_installed(&self) -> bool {
        [OUTBOUND, INBOUND, LISTENERS]
            .iter()
            .all(|name| self.dir.join(name).exists())
    }

    /// Loads and attaches both programs in the pod netns `netns` (tc on `ifname`, the pod's
    /// interface) for a pod owning `pod_ips`, and pins them. Re-installing keeps the pinned
    /// maps, so listeners ztunnel registered stay registered, and attaches the new programs
    /// before the old ones are released, so capture has no gap. Needs kernel 6.6+ (TCX).
    pub fn install(
        &self,
        netns: BorrowedFd<'_>,
        ifname: &str,
        pod_ips: &[Ipv4Addr],
    ) -> Result<(), EbpfError> {
        bpffs::ensure(&self.root)?;
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| EbpfError::io(format!("creating {}", self.dir.display()), e))?;
        let mut bpf = EbpfLoader::new()
            .map_pin_path(LISTENERS, self.dir.join(LISTENERS))
            .map_pin_path(POD_IPS, self.dir.join(POD_IPS))
            .map_pin_path(DROPPED, self.dir.join(DROPPED))
            .load(OBJECT)?;
        set_pod_ips(&mut bpf, pod_ips)?;

        let outbound: &mut SkLookup = program(&mut bpf, OUTBOUND)?;
        outbound.load().map_err(prog_err(OUTBOUND))?;
        let id = outbound.attach(netns).map_err(prog_err(OUTBOUND))?;
        let link: FdLink = outbound.take_link(id).map_err(prog_err(OUTBOUND))?.into();
        self.replace_pin(link, OUTBOUND)?;

        let inbound: &mut SchedClassifier = program(&mut bpf, INBOUND)?;
        inbound.load().map_err(prog_err(INBOUND))?;
        // TCX resolves the interface name and index in the calling thread's netns.
        let id = in_netns(netns, || {
            inbound.attach_with_options(
                ifname,
                TcAttachType::Ingress,
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            )
        })?
        .map_err(prog_err(INBOUND))?;
        let link =
            FdLink::try_from(inbound.take_link(id).map_err(prog_err(INBOUND))?).map_err(|e| {
                EbpfError::Pin {
                    what: INBOUND.into(),
                    message: e.to_string(),
                }
            })?;
        self.replace_pin(link, INBOUND)
    }

    /// Unpins everything of the pod: the programs detach and the maps go once ztunnel closes
    /// them. Removing what is not installed succeeds.
    pub fn remove(&self) -> Result<(), EbpfError> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(EbpfError::io(format!("reading {}", self.dir.display()), e)),
        };
        for entry in entries {
            let path = entry
                .map_err(|e| EbpfError::io(format!("reading {}", self.dir.display()), e))?
                .path();
            std::fs::remove_file(&path)
                .map_err(|e| EbpfError::io(format!("unpinning {}", path.display()), e))?;
        }
        std::fs::remove_dir(&self.dir)
            .map_err(|e| EbpfError::io(format!("removing {}", self.dir.display()), e))
    }

    /// Registers ztunnel's listening socket for `which` (it must live in the pod netns),
    /// replacing any earlier one: new connections go to the newest registered listener.
    pub fn register(&self, which: Listener, socket: &impl AsRawFd) -> Result<(), EbpfError> {
        let mut map: SockMap<MapData> = self.open_map(LISTENERS)?;
        map.set(which as u32, socket, 0)
            .map_err(|source| EbpfError::Map {
                name: LISTENERS,
                source,
            })
    }

    /// Connections the programs dropped for want of a registered listener.
    pub fn dropped(&self) -> Result<Dropped, EbpfError> {
        let map: PerCpuArray<MapData, u64> = self.open_map(DROPPED)?;
        let sum = |slot: Listener| -> Result<u64, EbpfError> {
            let values = map
                .get(&(slot as u32), 0)
                .map_err(|source| EbpfError::Map {
                    name: DROPPED,
                    source,
                })?;
            Ok(values.iter().sum())
        };
        Ok(Dropped {
            outbound: sum(Listener::Outbound)?,
            inbound: sum(Listener::Inbound)?,
        })
    }

    fn open_map<M>(&self, name: &'static str) -> Result<M, EbpfError>
    where
        M: TryFrom<Map, Error = aya::maps::MapError>,
    {
        let path = self.dir.join(name);
        if !path.exists() {
            return Err(EbpfError::NotInstalled(self.dir.clone()));
        }
        let map_err = |source| EbpfError::Map { name, source };
        let data = MapData::from_pin(&path).map_err(map_err)?;
        M::try_from(Map::from_map_data(data).map_err(map_err)?).map_err(map_err)
    }

    /// Pins `link` as `name`, releasing the link pinned there before (it detaches once its
    /// pin goes; the new one is already attached).
    fn replace_pin(&self, link: FdLink, name: &str) -> Result<(), EbpfError> {
        let path = self.dir.join(name);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(EbpfError::io(format!("unpinning {}", path.display()), e)),
        }
        link.pin(&path).map(drop).map_err(|e| EbpfError::Pin {
            what: path.display().to_string(),
            message: e.to_string(),
        })
    }
}

fn program<'a, P>(bpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P, EbpfError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let prog = bpf.program_mut(name).ok_or(EbpfError::Program {
        name,
        source: aya::programs::ProgramError::UnexpectedProgramType,
    })?;
    prog.try_into().map_err(prog_err(name))
}

fn prog_err(name: &'static str) -> impl Fn(aya::programs::ProgramError) -> EbpfError {
    move |source| EbpfError::Program { name, source }
}

/// Makes `pod_ips` exactly the set in the pinned map (a re-install may change them).
fn set_pod_ips(bpf: &mut Ebpf, pod_ips: &[Ipv4Addr]) -> Result<(), EbpfError> {
    let map_err = |source| EbpfError::Map {
        name: POD_IPS,
        source,
    };
    let map = bpf
        .map_mut(POD_IPS)
        .ok_or(EbpfError::NotInstalled(PathBuf::from(POD_IPS)))?;
    let mut ips: BpfHashMap<&mut MapData, u32, u8> = BpfHashMap::try_from(map).map_err(map_err)?;
    // Keys are addresses in network byte order, as the programs read them from packets.
    let want: Vec<u32> = pod_ips
        .iter()
        .map(|ip| u32::from_ne_bytes(ip.octets()))
        .collect();
    let stale: Vec<u32> = ips
        .keys()
        .filter_map(Result::ok)
        .filter(|k| !want.contains(k))
        .collect();
    for k in stale {
        ips.remove(&k).map_err(map_err)?;
    }
    for k in want {
        ips.insert(k, 1, 0).map_err(map_err)?;
    }
    Ok(())
}

/// Runs `f` on a short-lived thread that entered `netns`.
fn in_netns<T: Send>(netns: BorrowedFd<'_>, f: impl FnOnce() -> T + Send) -> Result<T, EbpfError> {
    std::thread::scope(|s| {
        s.spawn(|| {
            setns(netns, CloneFlags::CLONE_NEWNET)
                .map_err(|e| EbpfError::io("entering the pod netns", e.into()))?;
            Ok(f())
        })
        .join()
        .unwrap_or_else(|_| {
            Err(EbpfError::io(
                "pod netns thread",
                std::io::Error::other("panicked"),
            ))
        })
    })
}
