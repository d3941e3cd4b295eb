//! Network namespace primitives: create/delete named namespaces with `ip`, run a closure in a
//! namespace (on a scoped thread, so meshctl's own namespace never changes), and small probes
//! from inside one (HTTP GET, listening ports, nft tables).

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};

/// Where `ip netns` keeps named namespaces.
pub const NETNS_DIR: &str = "/var/run/netns";
/// Prefix of every namespace the sandbox creates.
pub const PREFIX: &str = "msb-";

/// The file of a named namespace.
pub fn path(name: &str) -> PathBuf {
    PathBuf::from(NETNS_DIR).join(name)
}

/// True if the named namespace exists.
pub fn exists(name: &str) -> bool {
    path(name).exists()
}

/// Runs a command, failing with its stderr.
pub fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let shown = format!("{cmd:?}").replace('"', "");
    let out = cmd
        .output()
        .with_context(|| format!("running {shown} (is it installed?)"))?;
    if !out.status.success() {
        bail!(
            "{shown} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `ip <args>`.
pub fn ip(args: &[&str]) -> anyhow::Result<()> {
    run(Command::new("ip").args(args)).map(|_| ())
}

/// Creates a namespace with its loopback up.
pub fn add(name: &str) -> anyhow::Result<()> {
    if exists(name) {
        bail!(
            "network namespace {name} already exists (a previous sandbox? run `meshctl sandbox down`)"
        );
    }
    ip(&["netns", "add", name])?;
    ip(&["-n", name, "link", "set", "lo", "up"])
}

/// Deletes a namespace (no error if it is gone), and its /etc/netns/<name> files.
pub fn delete(name: &str) {
    if exists(name) {
        let _ = ip(&["netns", "del", name]);
    }
    let etc = PathBuf::from("/etc/netns").join(name);
    if etc.exists() {
        let _ = std::fs::remove_dir_all(etc);
    }
}

/// Every existing namespace whose name starts with [`PREFIX`].
pub fn ours() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(NETNS_DIR)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(PREFIX))
        .collect();
    names.sort();
    names
}

/// Names of /etc/netns entries left by the sandbox.
pub fn our_etc_dirs() -> Vec<PathBuf> {
    std::fs::read_dir("/etc/netns")
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with(PREFIX))
        .map(|e| e.path())
        .collect()
}

/// Runs `f` on a thread that has entered namespace `name`.
pub fn in_netns<T: Send>(name: &str, f: impl FnOnce() -> T + Send) -> std::io::Result<T> {
    let file = std::fs::File::open(path(name))?;
    std::thread::scope(|s| {
        s.spawn(move || {
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(std::io::Error::from)?;
            Ok(f())
        })
        .join()
        .map_err(|_| std::io::Error::other("probe thread panicked"))?
    })
}

/// Writes a sysctl (`net/ipv4/ip_forward`) inside namespace `name`.
pub fn sysctl(name: &str, key: &str, value: &str) -> anyhow::Result<()> {
    let file = format!("/proc/sys/{key}");
    in_netns(name, || std::fs::write(&file, value))?
        .with_context(|| format!("setting {key}={value} in {name}"))
}

/// GET `path` from `addr` inside namespace `ns`: (status, body).
pub fn http_get(
    ns: &str,
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> std::io::Result<(u16, String)> {
    in_netns(ns, || {
        let mut s = TcpStream::connect_timeout(&addr, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        // HTTP/1.0 so the server closes the connection after a body without chunking.
        write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw)?;
        parse_http_response(&raw)
    })?
}

/// Splits a raw HTTP response into status and body (de-chunking if needed).
fn parse_http_response(raw: &[u8]) -> std::io::Result<(u16, String)> {
    let text = String::from_utf8_lossy(raw);
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "malformed HTTP response");
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(bad)?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(bad)?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    if !chunked {
        return Ok((status, body.to_string()));
    }
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).map_err(|_| bad())?;
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].strip_prefix("\r\n").unwrap_or(&after[n..]);
    }
    Ok((status, out))
}

/// TCP ports in LISTEN state inside namespace `ns`.
pub fn listening_tcp_ports(ns: &str) -> std::io::Result<BTreeSet<u16>> {
    in_netns(ns, || {
        let mut ports = BTreeSet::new();
        // thread-self: /proc/self/net would show the main thread's namespace.
        for f in ["/proc/thread-self/net/tcp", "/proc/thread-self/net/tcp6"] {
            if let Ok(text) = std::fs::read_to_string(f) {
                ports.extend(parse_listening(&text));
            }
        }
        ports
    })
}

/// Fields of the LISTEN (state 0A) lines in /proc/net/tcp format, with their local port.
fn listen_lines(text: &str) -> impl Iterator<Item = (u16, Vec<&str>)> + '_ {
    text.lines().skip(1).filter_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.get(3) != Some(&"0A") {
            return None;
        }
        let port = u16::from_str_radix(f.get(1)?.rsplit_once(':')?.1, 16).ok()?;
        Some((port, f))
    })
}

/// Local ports of LISTEN sockets in /proc/net/tcp format.
fn parse_listening(text: &str) -> impl Iterator<Item = u16> + '_ {
    listen_lines(text).map(|(port, _)| port)
}

/// (local port, socket inode) of LISTEN sockets in /proc/net/tcp format.
fn parse_listeners(text: &str) -> impl Iterator<Item = (u16, u64)> + '_ {
    listen_lines(text).filter_map(|(port, f)| Some((port, f.get(9)?.parse().ok()?)))
}

/// (port, socket inode) of every TCP listener inside namespace `ns`; with the inodes of a
/// process's sockets this tells which process listens where (SO_REUSEPORT lets several).
pub fn tcp_listeners(ns: &str) -> std::io::Result<Vec<(u16, u64)>> {
    in_netns(ns, || {
        let mut out = Vec::new();
        for f in ["/proc/thread-self/net/tcp", "/proc/thread-self/net/tcp6"] {
            if let Ok(text) = std::fs::read_to_string(f) {
                out.extend(parse_listeners(&text));
            }
        }
        out
    })
}

/// Number of connected unix sockets inside namespace `ns` bound to `socket_path` — on a
/// listening socket's path, the connections it accepted (e.g. ztunnels on the ZDS socket).
pub fn unix_connections(ns: &str, socket_path: &std::path::Path) -> std::io::Result<usize> {
    let want = socket_path.to_string_lossy().into_owned();
    in_netns(ns, move || {
        std::fs::read_to_string("/proc/thread-self/net/unix")
            .map(|text| count_connected_unix(&text, &want))
    })?
}

/// Counts lines of /proc/net/unix in state connected (St 03) whose path is `path`.
fn count_connected_unix(text: &str, path: &str) -> usize {
    text.lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.get(5) == Some(&"03") && f.get(7) == Some(&path)
        })
        .count()
}

/// True if namespace `ns` has nft table `<family> <table>`.
pub fn has_nft_table(ns: &str, family: &str, table: &str) -> bool {
    Command::new("ip")
        .args(["netns", "exec", ns, "nft", "list", "tables"])
        .output()
        .map(|o| {
            let want = format!("table {family} {table}");
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l.trim() == want)
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_chunked_responses() {
        let plain = b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok";
        assert_eq!(parse_http_response(plain).unwrap(), (200, "ok".into()));
        let chunked =
            b"HTTP/1.1 503 Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nnot\r\n6\r\n ready\r\n0\r\n\r\n";
        assert_eq!(
            parse_http_response(chunked).unwrap(),
            (503, "not ready".into())
        );
        assert!(parse_http_response(b"garbage").is_err());
    }

    #[test]
    fn finds_listening_ports_only() {
        let text = "  sl  local_address rem_address   st tx_queue rx_queue\n\
           0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000\n\
           1: 0100007F:3A98 0100007F:1F90 01 00000000:00000000 00:00000000 00000000\n";
        let ports: Vec<u16> = parse_listening(text).collect();
        assert_eq!(ports, vec![8080]);
    }

    #[test]
    fn listeners_carry_their_socket_inode() {
        let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
           0: 00000000:3A99 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0\n\
           1: 00000000:3A99 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4343 1 0\n\
           2: 0100007F:3A98 0100007F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 4444 1 0\n";
        let got: Vec<(u16, u64)> = parse_listeners(text).collect();
        assert_eq!(got, vec![(15001, 4242), (15001, 4343)]);
    }

    #[test]
    fn counts_accepted_connections_on_a_unix_socket_path() {
        let text = "Num       RefCount Protocol Flags    Type St Inode Path\n\
            0000000000000000: 00000002 00000000 00010000 0005 01 100 /run/z.sock\n\
            0000000000000000: 00000003 00000000 00000000 0005 03 101 /run/z.sock\n\
            0000000000000000: 00000003 00000000 00000000 0005 03 102\n\
            0000000000000000: 00000003 00000000 00000000 0005 03 103 /run/other.sock\n";
        assert_eq!(count_connected_unix(text, "/run/z.sock"), 1);
    }
}
