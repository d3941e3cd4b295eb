//! A minimal node-agent side of ZDS for tests: listen, wait for ztunnel's hello, hand over pod
//! netns fds, check every ack.

use std::io::IoSlice;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::time::Duration;

use nix::sys::socket::{
    AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, UnixAddr, accept, bind, listen,
    recv, sendmsg, socket,
};
use prost::Message;
use xds::istio::workload::zds::{
    AddWorkload, DelWorkload, SnapshotSent, WorkloadInfo, WorkloadRequest, WorkloadResponse,
    ZdsHello, workload_request::Payload, workload_response,
};

/// The listening side.
pub struct ZdsServer {
    listener: OwnedFd,
}

/// One connected ztunnel.
pub struct ZdsPeer {
    fd: OwnedFd,
}

impl ZdsServer {
    /// Listens on `path`.
    pub fn bind(path: &Path) -> Self {
        let _ = std::fs::remove_file(path);
        let listener = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        bind(listener.as_raw_fd(), &UnixAddr::new(path).unwrap()).unwrap();
        listen(&listener, nix::sys::socket::Backlog::new(8).unwrap()).unwrap();
        Self { listener }
    }

    /// Accepts a ztunnel and reads its hello (waits up to 30 s).
    pub fn accept(&self) -> ZdsPeer {
        self.try_accept().unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like [`Self::accept`], but reports a timeout instead of panicking.
    pub fn try_accept(&self) -> Result<ZdsPeer, String> {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let mut pfd = [nix::poll::PollFd::new(
            std::os::fd::AsFd::as_fd(&self.listener),
            nix::poll::PollFlags::POLLIN,
        )];
        let mut ready = false;
        while !ready && std::time::Instant::now() < deadline {
            ready = nix::poll::poll(&mut pfd, nix::poll::PollTimeout::from(500u16)).unwrap() > 0;
        }
        if !ready {
            return Err("ztunnel did not connect to ZDS within 30s".into());
        }
        let raw = accept(self.listener.as_raw_fd()).expect("ztunnel connects to ZDS");
        // SAFETY: accept returned a new fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let peer = ZdsPeer { fd };
        let hello = ZdsHello::decode(peer.recv_packet().as_slice()).expect("hello");
        assert_eq!(hello.version, 1, "ZDS V1 hello");
        Ok(peer)
    }
}

impl ZdsPeer {
    fn recv_packet(&self) -> Vec<u8> {
        let mut buf = vec![0u8; 4096];
        let n = recv(self.fd.as_raw_fd(), &mut buf, MsgFlags::empty()).expect("recv");
        buf.truncate(n);
        buf
    }

    fn send(&self, req: &WorkloadRequest, fd: Option<RawFd>) -> String {
        let bytes = req.encode_to_vec();
        let iov = [IoSlice::new(&bytes)];
        let fds = fd.map(|f| [f]);
        let cmsgs: Vec<ControlMessage> = fds
            .as_ref()
            .map(|f| vec![ControlMessage::ScmRights(f)])
            .unwrap_or_default();
        sendmsg::<()>(self.fd.as_raw_fd(), &iov, &cmsgs, MsgFlags::empty(), None).unwrap();
        let resp = WorkloadResponse::decode(self.recv_packet().as_slice()).expect("ack");
        match resp.payload {
            Some(workload_response::Payload::Ack(a)) => a.error,
            None => panic!("empty response"),
        }
    }

    /// Adds a pod; returns the ack's error ("" on success).
    pub fn add(&self, uid: &str, name: &str, namespace: &str, sa: &str, netns: &OwnedFd) -> String {
        let req = WorkloadRequest {
            payload: Some(Payload::Add(AddWorkload {
                uid: uid.into(),
                workload_info: Some(WorkloadInfo {
                    name: name.into(),
                    namespace: namespace.into(),
                    service_account: sa.into(),
                }),
            })),
        };
        self.send(&req, Some(netns.as_raw_fd()))
    }

    /// Closes the connection, as a restarting node agent would.
    pub fn shutdown(&self) {
        let _ = nix::sys::socket::shutdown(self.fd.as_raw_fd(), nix::sys::socket::Shutdown::Both);
    }

    /// Removes a pod.
    pub fn del(&self, uid: &str) -> String {
        let req = WorkloadRequest {
            payload: Some(Payload::Del(DelWorkload { uid: uid.into() })),
        };
        self.send(&req, None)
    }

    /// Ends the snapshot.
    pub fn snapshot_sent(&self) -> String {
        let req = WorkloadRequest {
            payload: Some(Payload::SnapshotSent(SnapshotSent {})),
        };
        self.send(&req, None)
    }
}
