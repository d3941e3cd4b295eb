//! ZDS transport: one protobuf message per SOCK_SEQPACKET packet, the pod netns fd attached as
//! SCM_RIGHTS to AddWorkload.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use nix::sys::socket::{
    AddressFamily, ControlMessageOwned, MsgFlags, SockFlag, SockType, UnixAddr, connect, recvmsg,
    sendmsg, socket,
};
use prost::Message;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use xds::istio::workload::zds::{WorkloadRequest, WorkloadResponse, ZdsHello};

/// Largest ZDS packet we accept; real messages are a few hundred bytes.
const MAX_PACKET: usize = 64 * 1024;

/// ZDS protocol errors.
#[derive(Debug, thiserror::Error)]
pub enum ZdsError {
    /// Socket error.
    #[error("zds socket: {0}")]
    Io(#[from] io::Error),
    /// The node agent closed the connection.
    #[error("zds connection closed by the node agent")]
    Closed,
    /// A packet that is not a WorkloadRequest.
    #[error("malformed zds message: {0}")]
    Decode(#[from] prost::DecodeError),
    /// A packet with ancillary data we cannot use (too many fds, truncated).
    #[error("zds message has unexpected ancillary data: {0}")]
    Ancillary(String),
}

/// A connected ZDS client socket.
pub struct ZdsConnection {
    fd: AsyncFd<OwnedFd>,
}

impl ZdsConnection {
    /// Connects to the node agent's socket.
    pub async fn connect(path: &Path) -> Result<Self, ZdsError> {
        let fd = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )
        .map_err(io::Error::from)?;
        let addr = UnixAddr::new(path).map_err(io::Error::from)?;
        match connect(fd.as_raw_fd(), &addr) {
            Ok(()) => {}
            Err(nix::errno::Errno::EINPROGRESS) | Err(nix::errno::Errno::EAGAIN) => {}
            Err(e) => return Err(io::Error::from(e).into()),
        }
        // SAFETY: we own `fd` and hand it to AsyncFd, which keeps it until it is dropped.
        let fd = unsafe { AsyncFd::register(fd) }
            .map_err(|e| io::Error::other(format!("registering zds socket: {e}")))?;
        // Unix stream connects complete at once or fail; nothing to wait for.
        Ok(Self { fd })
    }

    /// Sends the hello that opens the protocol.
    pub async fn send_hello(&self) -> Result<(), ZdsError> {
        let hello = ZdsHello {
            version: xds::istio::workload::zds::Version::V1 as i32,
        };
        self.send(&hello.encode_to_vec()).await
    }

    /// Sends a response (ack) for the last request.
    pub async fn send_response(&self, resp: &WorkloadResponse) -> Result<(), ZdsError> {
        self.send(&resp.encode_to_vec()).await
    }

    async fn send(&self, buf: &[u8]) -> Result<(), ZdsError> {
        loop {
            let mut guard = self.fd.writable().await?;
            let iov = [IoSlice::new(buf)];
            match guard.try_io(|fd| {
                sendmsg::<()>(fd.as_raw_fd(), &iov, &[], MsgFlags::MSG_NOSIGNAL, None)
                    .map_err(io::Error::from)
            }) {
                Ok(result) => {
                    result?;
                    return Ok(());
                }
                Err(_would_block) => continue,
            }
        }
    }

    /// Receives the next request and the fd it carries, if any.
    pub async fn recv(&self) -> Result<(WorkloadRequest, Option<OwnedFd>), ZdsError> {
        let mut buf = vec![0u8; MAX_PACKET];
        loop {
            let mut guard = self.fd.ready(Interest::READABLE).await?;
            match guard.try_io(|fd| recv_packet(fd.as_raw_fd(), &mut buf)) {
                Ok(result) => {
                    let (len, fds) = result?;
                    if len == 0 && fds.is_empty() {
                        return Err(ZdsError::Closed);
                    }
                    let req = WorkloadRequest::decode(&buf[..len])?;
                    let mut fds = fds.into_iter();
                    let fd = fds.next();
                    if fds.next().is_some() {
                        return Err(ZdsError::Ancillary("more than one fd".into()));
                    }
                    return Ok((req, fd));
                }
                Err(_would_block) => continue,
            }
        }
    }
}

/// One recvmsg: payload length and the fds passed with it (owned, so they close on drop).
fn recv_packet(fd: RawFd, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut cmsg = nix::cmsg_space!([RawFd; 2]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(fd, &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC)
        .map_err(io::Error::from)?;
    let mut fds = Vec::new();
    for c in msg.cmsgs().map_err(io::Error::from)? {
        if let ControlMessageOwned::ScmRights(raw) = c {
            // SAFETY: the kernel just installed these fds in our table; nobody else owns them.
            fds.extend(raw.into_iter().map(|r| unsafe { OwnedFd::from_raw_fd(r) }));
        }
    }
    if msg.flags.contains(MsgFlags::MSG_TRUNC) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "zds packet larger than 64 KiB",
        ));
    }
    if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "zds ancillary data truncated",
        ));
    }
    Ok((msg.bytes, fds))
}
