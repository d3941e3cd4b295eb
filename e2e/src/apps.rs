//! Test workloads: an echo server that reports the peer address it saw, and clients.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::netns::in_netns;

/// Echo server on 0.0.0.0:`port` inside a netns. Each connection first receives
/// `peer=<addr>\n`, then everything it sends comes back.
pub struct EchoServer {
    /// Peers seen, in order.
    pub peers: Arc<Mutex<Vec<SocketAddr>>>,
}

impl EchoServer {
    /// Starts the server.
    pub fn start(ns: &str, port: u16) -> Self {
        let listener: TcpListener = in_netns(ns, move || {
            TcpListener::bind(("0.0.0.0", port)).expect("bind echo")
        });
        let peers = Arc::new(Mutex::new(Vec::new()));
        let seen = peers.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let seen = seen.clone();
                std::thread::spawn(move || {
                    let Ok(peer) = conn.peer_addr() else { return };
                    seen.lock().unwrap().push(peer);
                    if conn.write_all(format!("peer={peer}\n").as_bytes()).is_err() {
                        return;
                    }
                    let mut buf = [0u8; 65536];
                    loop {
                        match conn.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if conn.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                            }
                        }
                    }
                    let _ = conn.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        Self { peers }
    }
}

/// A client connection made from inside a netns.
pub struct Client {
    /// The socket.
    pub stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Client {
    /// Connects from `ns` to `addr` (the netns's redirection applies).
    pub fn connect(ns: &str, addr: SocketAddr) -> std::io::Result<Self> {
        let stream = in_netns(ns, move || {
            TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        })?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let reader = BufReader::new(stream.try_clone()?);
        Ok(Self { stream, reader })
    }

    /// Reads the server's `peer=` greeting.
    pub fn greeting(&mut self) -> std::io::Result<String> {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "closed before greeting",
            ));
        }
        Ok(line.trim().trim_start_matches("peer=").to_string())
    }

    /// Sends `data` and reads it back.
    pub fn echo(&mut self, data: &[u8]) -> std::io::Result<Vec<u8>> {
        self.stream.write_all(data)?;
        let mut back = vec![0u8; data.len()];
        self.reader.read_exact(&mut back)?;
        Ok(back)
    }
}

/// One-shot HTTP/1.0 GET from inside a netns; returns (status, body).
pub fn http_get(ns: &str, addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let path = path.to_string();
    in_netns(ns, move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
        let mut resp = String::new();
        s.read_to_string(&mut resp)?;
        let status = resp
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = resp
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Ok((status, body))
    })
}

/// SO_MARK ztunnel puts on its sockets; pod redirection rules let such sockets through.
pub const BYPASS_MARK: u32 = 0x539;

/// A TCP connection from inside `ns` that bypasses the pod's outbound capture (marked like
/// ztunnel's own sockets), for talking to 15008 directly or sending plaintext to a pod.
pub fn bypass_connect(ns: &str, addr: SocketAddr) -> std::io::Result<TcpStream> {
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrIn, connect, setsockopt, socket, sockopt,
    };
    let SocketAddr::V4(v4) = addr else {
        return Err(std::io::Error::other("IPv4 only"));
    };
    in_netns(ns, move || {
        let fd = socket(
            AddressFamily::Inet,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        setsockopt(&fd, sockopt::Mark, &BYPASS_MARK)?;
        // Bounds a blocking connect too (Linux applies SO_SNDTIMEO to it): a dropped SYN
        // must fail the test quickly, not after the kernel's two minutes of retries.
        let timeout = nix::sys::time::TimeVal::new(5, 0);
        setsockopt(&fd, sockopt::SendTimeout, &timeout)?;
        connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &SockaddrIn::from(v4))?;
        let stream = TcpStream::from(fd);
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        Ok(stream)
    })
}

impl Client {
    /// Wraps an already connected stream (e.g. from [`bypass_connect`]).
    pub fn from_stream(stream: TcpStream) -> std::io::Result<Self> {
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let reader = BufReader::new(stream.try_clone()?);
        Ok(Self { stream, reader })
    }
}
