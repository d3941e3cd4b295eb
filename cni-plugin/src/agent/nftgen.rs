//! The nftables ruleset generation of the calling thread's netns (`NFT_MSG_GETGEN` over
//! NETLINK_NETFILTER). The kernel bumps it on every nft commit in the namespace, so the agent
//! can tell "nobody changed any table" without listing the ruleset through the `nft` binary.

use std::io;

use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};

/// `NFNL_SUBSYS_NFTABLES`.
const SUBSYS_NFTABLES: u16 = 10;
/// `NFT_MSG_GETGEN` (request) and `NFT_MSG_NEWGEN` (reply).
const MSG_GETGEN: u16 = 16;
const MSG_NEWGEN: u16 = 15;
/// `NFTA_GEN_ID`.
const ATTR_GEN_ID: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
/// nlmsghdr (16 bytes) + nfgenmsg (4 bytes).
const HEADERS: usize = 20;

/// Reads the generation in the calling thread's netns.
pub fn read() -> io::Result<u32> {
    let mut s = Socket::new(NETLINK_NETFILTER)?;
    s.bind_auto()?;
    s.connect(&SocketAddr::new(0, 0))?;
    s.send(&request(), 0)?;
    let mut reply = vec![0u8; 4096];
    let n = s.recv(&mut &mut reply[..], 0)?;
    parse(&reply[..n])
}

/// nlmsghdr{len 20, type NFTABLES<<8|GETGEN, flags REQUEST, seq 1} + nfgenmsg{AF_UNSPEC, v0, 0}.
fn request() -> Vec<u8> {
    let mut b = Vec::with_capacity(HEADERS);
    b.extend_from_slice(&(HEADERS as u32).to_ne_bytes());
    b.extend_from_slice(&((SUBSYS_NFTABLES << 8) | MSG_GETGEN).to_ne_bytes());
    b.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    b.extend_from_slice(&1u32.to_ne_bytes());
    b.extend_from_slice(&0u32.to_ne_bytes());
    b.extend_from_slice(&[0, 0, 0, 0]);
    b
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("NFT_MSG_GETGEN reply: {what}"),
    )
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

/// Finds `NFTA_GEN_ID` (big-endian u32) in a NEWGEN reply.
fn parse(b: &[u8]) -> io::Result<u32> {
    let len = b
        .get(0..4)
        .and_then(|l| l.try_into().ok())
        .map(u32::from_ne_bytes)
        .ok_or_else(|| invalid("truncated header"))? as usize;
    let kind = u16_at(b, 4).ok_or_else(|| invalid("truncated header"))?;
    if kind == NLMSG_ERROR {
        let code = b
            .get(16..20)
            .and_then(|c| c.try_into().ok())
            .map(i32::from_ne_bytes)
            .ok_or_else(|| invalid("truncated error"))?;
        return Err(io::Error::from_raw_os_error(-code));
    }
    if kind != (SUBSYS_NFTABLES << 8) | MSG_NEWGEN {
        return Err(invalid(&format!("unexpected message type {kind:#x}")));
    }
    let msg = b.get(..len).ok_or_else(|| invalid("truncated message"))?;
    let mut at = HEADERS;
    while at + 4 <= msg.len() {
        let (Some(alen), Some(atype)) = (u16_at(msg, at), u16_at(msg, at + 2)) else {
            break;
        };
        let alen = usize::from(alen);
        if alen < 4 {
            return Err(invalid("attribute shorter than its header"));
        }
        if atype & 0x3fff == ATTR_GEN_ID {
            let v = msg
                .get(at + 4..at + 8)
                .ok_or_else(|| invalid("truncated generation"))?;
            return Ok(u32::from_be_bytes([v[0], v[1], v[2], v[3]]));
        }
        at += (alen + 3) & !3;
    }
    Err(invalid("no NFTA_GEN_ID"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(attrs: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut body = vec![0u8; 4];
        for (t, v) in attrs {
            body.extend_from_slice(&((4 + v.len()) as u16).to_ne_bytes());
            body.extend_from_slice(&t.to_ne_bytes());
            body.extend_from_slice(v);
            while !body.len().is_multiple_of(4) {
                body.push(0);
            }
        }
        let mut b = Vec::new();
        b.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
        b.extend_from_slice(&((SUBSYS_NFTABLES << 8) | MSG_NEWGEN).to_ne_bytes());
        b.extend_from_slice(&[0; 10]);
        b.extend_from_slice(&body);
        b
    }

    #[test]
    fn generation_is_read_from_the_gen_id_attribute() {
        let b = reply(&[
            (2, 42u32.to_be_bytes().to_vec()),
            (1, 7u32.to_be_bytes().to_vec()),
        ]);
        assert_eq!(parse(&b).unwrap(), 7);
    }

    #[test]
    fn garbage_and_errors_are_refused() {
        assert!(parse(&[1, 2, 3]).is_err());
        assert!(parse(&reply(&[(2, vec![1, 2, 3, 4])])).is_err());
        let mut err = vec![0u8; 20];
        err[0..4].copy_from_slice(&20u32.to_ne_bytes());
        err[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        err[16..20].copy_from_slice(&(-libc::EPERM).to_ne_bytes());
        assert_eq!(parse(&err).unwrap_err().raw_os_error(), Some(libc::EPERM));
        // An attribute claiming to be shorter than its own header.
        let mut bad = reply(&[(1, 7u32.to_be_bytes().to_vec())]);
        bad[20..22].copy_from_slice(&2u16.to_ne_bytes());
        assert!(parse(&bad).is_err());
    }

    #[test]
    fn generation_changes_with_every_nft_commit() {
        if !nix::unistd::Uid::effective().is_root() {
            // CI runs as root: a skip there would hide a broken test.
            assert!(
                std::env::var_os("CI").is_none(),
                "needs root, and CI is set"
            );
            eprintln!("skipping: needs root for a netns");
            return;
        }
        let (a, b) = std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let a = read().unwrap();
            let again = read().unwrap();
            assert_eq!(a, again, "reading does not change it");
            let st = std::process::Command::new("nft")
                .args(["add", "table", "inet", "gen-test"])
                .status()
                .unwrap();
            assert!(st.success());
            (a, read().unwrap())
        })
        .join()
        .unwrap();
        assert_ne!(a, b);
    }
}
