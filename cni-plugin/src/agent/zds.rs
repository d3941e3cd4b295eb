//! ZDS server (PROTOCOLS.md §4): hands enrolled pods' netns to ztunnel.
//!
//! Every ztunnel that connects gets a snapshot (one Add per enrolled pod, then SnapshotSent);
//! afterwards new pods go to the newest connection (during a rolling upgrade the new ztunnel
//! takes over) and removals go to every connection. Each message waits for ztunnel's ack.

use std::collections::BTreeMap;
use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::socket::{
    AddressFamily, Backlog, ControlMessage, MsgFlags, SockFlag, SockType, UnixAddr, accept4, bind,
    listen, recv, sendmsg, socket,
};
use prost::Message;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use xds::istio::workload::zds::{
    AddWorkload, DelWorkload, SnapshotSent, WorkloadInfo, WorkloadRequest, WorkloadResponse,
    ZdsHello, workload_request::Payload, workload_response,
};

/// Largest packet accepted from ztunnel; acks are a few bytes.
const MAX_PACKET: usize = 64 * 1024;
/// How long ztunnel may take to ack one message before the connection is dropped.
const ACK_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a new connection may take to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// Messages queued per connection.
const QUEUE: usize = 256;

/// ZDS failures.
#[derive(Debug, thiserror::Error)]
pub enum ZdsError {
    /// Socket error.
    #[error("zds socket: {0}")]
    Io(#[from] io::Error),
    /// ztunnel refused the message.
    #[error("ztunnel rejected {what}: {error}")]
    Rejected {
        /// Which message.
        what: String,
        /// ztunnel's ack error.
        error: String,
    },
    /// ztunnel went away or did not ack in time.
    #[error("ztunnel connection lost before it acknowledged {0}")]
    Lost(String),
    /// ztunnel sent something that is not a valid message.
    #[error("malformed zds message from ztunnel: {0}")]
    Malformed(String),
}

/// A pod handed to ztunnel.
#[derive(Clone, Debug)]
pub struct ZdsPod {
    /// Pod UID (the workload uid ztunnel knows).
    pub uid: String,
    /// Name, namespace and service account.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// Service account.
    pub service_account: String,
    /// The pod's network namespace.
    pub netns: Arc<std::fs::File>,
}

/// Result of handing a pod over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// The newest ztunnel acknowledged it.
    Acked,
    /// No ztunnel is connected; it will be in the snapshot of the next one.
    Queued,
}

enum Command {
    Add(ZdsPod, oneshot::Sender<Result<(), ZdsError>>),
    Del(String, oneshot::Sender<Result<(), ZdsError>>),
}

struct Conn {
    id: u64,
    tx: mpsc::Sender<Command>,
}

#[derive(Default)]
struct Inner {
    pods: BTreeMap<String, ZdsPod>,
    conns: Vec<Conn>,
    next_id: u64,
}

/// The set of enrolled pods and the connected ztunnels; cheap to clone.
#[derive(Clone, Default)]
pub struct ZdsHub {
    inner: Arc<Mutex<Inner>>,
}

impl ZdsHub {
    /// Number of connected ztunnels.
    pub fn connections(&self) -> usize {
        self.lock().conns.len()
    }

    /// Adds (or replaces) a pod and hands it to the newest ztunnel, waiting for its ack.
    pub async fn add(&self, pod: ZdsPod) -> Result<Delivery, ZdsError> {
        let (tx, rx) = oneshot::channel();
        let conn = {
            let mut inner = self.lock();
            inner.pods.insert(pod.uid.clone(), pod.clone());
            inner.conns.last().map(|c| c.tx.clone())
        };
        let Some(conn) = conn else {
            return Ok(Delivery::Queued);
        };
        let what = format!("add of pod {}", pod.uid);
        if conn.send(Command::Add(pod, tx)).await.is_err() {
            // The connection ended after we picked it; its successor gets a snapshot.
            return Ok(Delivery::Queued);
        }
        rx.await.map_err(|_| ZdsError::Lost(what))??;
        Ok(Delivery::Acked)
    }

    /// Removes a pod from every ztunnel, waiting for their acks.
    pub async fn del(&self, uid: &str) -> Result<(), ZdsError> {
        let conns: Vec<_> = {
            let mut inner = self.lock();
            inner.pods.remove(uid);
            inner.conns.iter().map(|c| c.tx.clone()).collect()
        };
        let mut first_err = None;
        for conn in conns {
            let (tx, rx) = oneshot::channel();
            if conn.send(Command::Del(uid.to_string(), tx)).await.is_err() {
                continue;
            }
            if let Ok(Err(e)) = rx.await {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// True if the pod is in the set handed to ztunnel.
    pub fn contains(&self, uid: &str) -> bool {
        self.lock().pods.contains_key(uid)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a connection and returns its id, queue and the snapshot it must send first.
    /// Done under one lock so no add can fall between snapshot and queue.
    fn register(&self) -> (u64, mpsc::Receiver<Command>, Vec<ZdsPod>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let mut inner = self.lock();
        inner.next_id += 1;
        let id = inner.next_id;
        inner.conns.push(Conn { id, tx });
        (id, rx, inner.pods.values().cloned().collect())
    }

    fn deregister(&self, id: u64) {
        self.lock().conns.retain(|c| c.id != id);
    }
}

/// The listening socket.
pub struct ZdsServer {
    listener: AsyncFd<OwnedFd>,
}

impl ZdsServer {
    /// Listens on `path` (replacing a stale socket file), creating its directory.
    pub fn bind(path: &Path) -> Result<Self, ZdsError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e.into()),
            _ => {}
        }
        let fd = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )
        .map_err(io::Error::from)?;
        bind(
            fd.as_raw_fd(),
            &UnixAddr::new(path).map_err(io::Error::from)?,
        )
        .map_err(io::Error::from)?;
        listen(&fd, Backlog::new(16).map_err(io::Error::from)?).map_err(io::Error::from)?;
        // SAFETY: we own `fd` and hand it to AsyncFd, which keeps it until it is dropped.
        let listener = unsafe { AsyncFd::register(fd) }
            .map_err(|e| io::Error::other(format!("registering zds listener: {e}")))?;
        Ok(Self { listener })
    }

    /// Accepts ztunnels until `shutdown`, serving each from `hub`.
    pub async fn run(self, hub: ZdsHub, shutdown: CancellationToken) {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let accepted = tokio::select! {
                a = self.accept() => a,
                _ = shutdown.cancelled() => break,
                Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            };
            match accepted {
                Ok(fd) => {
                    conns.spawn(serve_conn(fd, hub.clone(), shutdown.clone()));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a ztunnel connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        conns.shutdown().await;
    }

    async fn accept(&self) -> io::Result<OwnedFd> {
        loop {
            let mut guard = self.listener.readable().await?;
            match guard.try_io(|l| {
                accept4(
                    l.as_raw_fd(),
                    SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
                )
                .map_err(io::Error::from)
            }) {
                // SAFETY: accept4 returned a new fd that nobody else owns.
                Ok(r) => return r.map(|raw| unsafe { OwnedFd::from_raw_fd(raw) }),
                Err(_would_block) => continue,
            }
        }
    }
}

/// One ztunnel connection: hello, snapshot, then queued commands until either side ends.
async fn serve_conn(fd: OwnedFd, hub: ZdsHub, shutdown: CancellationToken) {
    // SAFETY: we own `fd` and hand it to AsyncFd, which keeps it until it is dropped.
    let conn = match unsafe { AsyncFd::register(fd) } {
        Ok(c) => Packets(c),
        Err(e) => {
            tracing::warn!(error = %e, "registering a ztunnel connection");
            return;
        }
    };
    match tokio::time::timeout(HELLO_TIMEOUT, conn.recv()).await {
        Ok(Ok(buf)) => match ZdsHello::decode(buf.as_slice()) {
            Ok(h) if h.version == 1 => {}
            Ok(h) => {
                tracing::warn!(version = h.version, "ztunnel speaks an unknown ZDS version");
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "malformed ZDS hello");
                return;
            }
        },
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "ztunnel connection failed before hello");
            return;
        }
        Err(_) => {
            tracing::warn!("ztunnel sent no ZDS hello within {HELLO_TIMEOUT:?}");
            return;
        }
    }
    let (id, mut queue, snapshot) = hub.register();
    tracing::info!(
        conn = id,
        pods = snapshot.len(),
        "ztunnel connected; sending snapshot"
    );
    let result = async {
        for pod in &snapshot {
            conn.exchange(
                &add_request(pod),
                Some(pod.netns.as_raw_fd()),
                "snapshot add",
            )
            .await?;
        }
        let done = WorkloadRequest {
            payload: Some(Payload::SnapshotSent(SnapshotSent {})),
        };
        conn.exchange(&done, None, "snapshot end").await?;
        loop {
            let cmd = tokio::select! {
                c = queue.recv() => c,
                // Idle: notice ztunnel going away (readable with EOF) without a command.
                r = conn.closed() => return r,
                _ = shutdown.cancelled() => return Ok(()),
            };
            match cmd {
                None => return Ok(()),
                Some(Command::Add(pod, reply)) => {
                    let r = conn
                        .exchange(&add_request(&pod), Some(pod.netns.as_raw_fd()), "add")
                        .await;
                    let fatal = matches!(r, Err(ZdsError::Lost(_) | ZdsError::Io(_)));
                    let _ = reply.send(r);
                    if fatal {
                        return Err(ZdsError::Lost("add".into()));
                    }
                }
                Some(Command::Del(uid, reply)) => {
                    let req = WorkloadRequest {
                        payload: Some(Payload::Del(DelWorkload { uid })),
                    };
                    let r = conn.exchange(&req, None, "del").await;
                    let fatal = matches!(r, Err(ZdsError::Lost(_) | ZdsError::Io(_)));
                    let _ = reply.send(r);
                    if fatal {
                        return Err(ZdsError::Lost("del".into()));
                    }
                }
            }
        }
    }
    .await;
    hub.deregister(id);
    match result {
        Ok(()) => tracing::info!(conn = id, "ztunnel connection closed"),
        Err(e) => tracing::warn!(conn = id, error = %e, "ztunnel connection ended"),
    }
}

fn add_request(pod: &ZdsPod) -> WorkloadRequest {
    WorkloadRequest {
        payload: Some(Payload::Add(AddWorkload {
            uid: pod.uid.clone(),
            workload_info: Some(WorkloadInfo {
                name: pod.name.clone(),
                namespace: pod.namespace.clone(),
                service_account: pod.service_account.clone(),
            }),
        })),
    }
}

/// Packet I/O on a SOCK_SEQPACKET connection.
struct Packets(AsyncFd<OwnedFd>);

impl Packets {
    /// Sends one request (with an fd when given) and waits for its ack.
    async fn exchange(
        &self,
        req: &WorkloadRequest,
        fd: Option<RawFd>,
        what: &str,
    ) -> Result<(), ZdsError> {
        self.send(&req.encode_to_vec(), fd).await?;
        let buf = tokio::time::timeout(ACK_TIMEOUT, self.recv())
            .await
            .map_err(|_| ZdsError::Lost(what.to_string()))??;
        let resp = WorkloadResponse::decode(buf.as_slice())
            .map_err(|e| ZdsError::Malformed(e.to_string()))?;
        match resp.payload {
            Some(workload_response::Payload::Ack(a)) if a.error.is_empty() => Ok(()),
            Some(workload_response::Payload::Ack(a)) => Err(ZdsError::Rejected {
                what: what.to_string(),
                error: a.error,
            }),
            None => Err(ZdsError::Malformed("response without ack".into())),
        }
    }

    async fn send(&self, buf: &[u8], fd: Option<RawFd>) -> Result<(), ZdsError> {
        let fds = fd.map(|f| [f]);
        loop {
            let mut guard = self.0.writable().await?;
            let iov = [IoSlice::new(buf)];
            let cmsgs: Vec<ControlMessage> = fds
                .as_ref()
                .map(|f| vec![ControlMessage::ScmRights(f)])
                .unwrap_or_default();
            match guard.try_io(|s| {
                sendmsg::<()>(s.as_raw_fd(), &iov, &cmsgs, MsgFlags::MSG_NOSIGNAL, None)
                    .map_err(io::Error::from)
            }) {
                Ok(r) => {
                    r?;
                    return Ok(());
                }
                Err(_would_block) => continue,
            }
        }
    }

    async fn recv(&self) -> Result<Vec<u8>, ZdsError> {
        let mut buf = vec![0u8; MAX_PACKET];
        loop {
            let mut guard = self.0.ready(Interest::READABLE).await?;
            match guard.try_io(|s| {
                recv(s.as_raw_fd(), &mut buf, MsgFlags::empty()).map_err(io::Error::from)
            }) {
                Ok(r) => {
                    let n = r?;
                    if n == 0 {
                        return Err(ZdsError::Lost("next message (connection closed)".into()));
                    }
                    buf.truncate(n);
                    return Ok(buf);
                }
                Err(_would_block) => continue,
            }
        }
    }

    /// Resolves when the peer closes (or sends something unsolicited, which is a protocol error).
    async fn closed(&self) -> Result<(), ZdsError> {
        loop {
            let mut guard = self.0.ready(Interest::READABLE).await?;
            let mut probe = [0u8; 1];
            match recv(
                guard.get_inner().as_raw_fd(),
                &mut probe,
                MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
            ) {
                Ok(0) => return Ok(()),
                Ok(_) => return Err(ZdsError::Malformed("unsolicited message".into())),
                Err(nix::errno::Errno::EAGAIN) => guard.clear_ready(),
                Err(e) => return Err(io::Error::from(e).into()),
            }
        }
    }
}

#[cfg(test)]
mod tests;
