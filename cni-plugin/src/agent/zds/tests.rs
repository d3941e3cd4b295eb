//! ZDS server behaviour against fake ztunnels speaking the protocol over a real socket.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

use nix::sys::socket::{
    AddressFamily, MsgFlags, SockFlag, SockType, UnixAddr, connect, recv, send, socket,
};
use prost::Message;
use tokio_util::sync::CancellationToken;
use xds::istio::workload::zds::{
    Ack, WorkloadRequest, WorkloadResponse, ZdsHello, workload_request::Payload, workload_response,
};

use super::{Delivery, ZdsHub, ZdsPod, ZdsServer};

/// A blocking fake ztunnel; used from spawn_blocking.
struct FakeZtunnel(OwnedFd);

impl FakeZtunnel {
    fn connect(path: &std::path::Path) -> Self {
        let fd = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        connect(fd.as_raw_fd(), &UnixAddr::new(path).unwrap()).unwrap();
        let hello = ZdsHello { version: 1 }.encode_to_vec();
        send(fd.as_raw_fd(), &hello, MsgFlags::empty()).unwrap();
        Self(fd)
    }

    /// Receives one request and acks it; returns (kind, uid).
    fn next(&self) -> (String, String) {
        let mut buf = vec![0u8; 4096];
        let n = recv(self.0.as_raw_fd(), &mut buf, MsgFlags::empty()).unwrap();
        let req = WorkloadRequest::decode(&buf[..n]).unwrap();
        let ack = WorkloadResponse {
            payload: Some(workload_response::Payload::Ack(Ack {
                error: String::new(),
            })),
        }
        .encode_to_vec();
        send(self.0.as_raw_fd(), &ack, MsgFlags::empty()).unwrap();
        match req.payload.unwrap() {
            Payload::Add(a) => ("add".into(), a.uid),
            Payload::Del(d) => ("del".into(), d.uid),
            Payload::SnapshotSent(_) => ("snapshot".into(), String::new()),
            Payload::Keep(k) => ("keep".into(), k.uid),
        }
    }
}

fn pod(uid: &str) -> ZdsPod {
    ZdsPod {
        uid: uid.into(),
        name: uid.into(),
        namespace: "default".into(),
        service_account: "default".into(),
        netns: Arc::new(std::fs::File::open("/proc/self/ns/net").unwrap()),
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

async fn wait_connections(hub: &ZdsHub, n: usize) {
    for _ in 0..200 {
        if hub.connections() == n {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("expected {n} connections, have {}", hub.connections());
}

#[tokio::test]
async fn snapshot_on_connect_then_adds_to_newest_and_dels_to_all() {
    let dir = std::env::temp_dir().join(format!("zds-hub-test-{}", std::process::id()));
    let path = dir.join("ztunnel.sock");
    let hub = ZdsHub::default();
    let shutdown = CancellationToken::new();
    let server = ZdsServer::bind(&path).unwrap();
    let task = tokio::spawn(server.run(hub.clone(), shutdown.clone()));

    // No ztunnel yet: the pod is queued for the first snapshot.
    assert_eq!(hub.add(pod("p1")).await.unwrap(), Delivery::Queued);
    let p = path.clone();
    let old = blocking(move || {
        let z = FakeZtunnel::connect(&p);
        let first = z.next();
        let second = z.next();
        assert_eq!(first, ("add".into(), "p1".into()));
        assert_eq!(second.0, "snapshot");
        z
    })
    .await;
    wait_connections(&hub, 1).await;

    // A second ztunnel (rolling upgrade) gets the same snapshot; new pods go to it only.
    let p = path.clone();
    let new = blocking(move || {
        let z = FakeZtunnel::connect(&p);
        assert_eq!(z.next(), ("add".into(), "p1".into()));
        assert_eq!(z.next().0, "snapshot");
        z
    })
    .await;
    wait_connections(&hub, 2).await;
    let (new, added) = tokio::join!(blocking(move || (new.next(), new)), hub.add(pod("p2")));
    assert_eq!(added.unwrap(), Delivery::Acked);
    let (got, new) = new;
    assert_eq!(got, ("add".into(), "p2".into()));

    // Removal reaches both.
    let (a, b, del) = tokio::join!(
        blocking(move || (old.next(), old)),
        blocking(move || (new.next(), new)),
        hub.del("p1")
    );
    del.unwrap();
    assert_eq!(a.0, ("del".into(), "p1".into()));
    assert_eq!(b.0, ("del".into(), "p1".into()));

    // The new ztunnel goes away: adds fall back to the old one.
    drop(b.1);
    wait_connections(&hub, 1).await;
    let old = a.1;
    let (got, added) = tokio::join!(blocking(move || old.next()), hub.add(pod("p3")));
    assert_eq!(added.unwrap(), Delivery::Acked);
    assert_eq!(got, ("add".into(), "p3".into()));

    shutdown.cancel();
    task.await.unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn garbage_hello_is_dropped_without_affecting_the_hub() {
    let dir = std::env::temp_dir().join(format!("zds-hub-garbage-{}", std::process::id()));
    let path = dir.join("ztunnel.sock");
    let hub = ZdsHub::default();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(
        ZdsServer::bind(&path)
            .unwrap()
            .run(hub.clone(), shutdown.clone()),
    );
    let p = path.clone();
    blocking(move || {
        let fd = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        connect(fd.as_raw_fd(), &UnixAddr::new(&p).unwrap()).unwrap();
        send(fd.as_raw_fd(), &[0xff, 0xff, 0xff], MsgFlags::empty()).unwrap();
        // The server closes the connection.
        let mut buf = [0u8; 16];
        assert_eq!(
            recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()).unwrap(),
            0
        );
    })
    .await;
    assert_eq!(hub.connections(), 0);
    assert_eq!(hub.add(pod("p1")).await.unwrap(), Delivery::Queued);
    shutdown.cancel();
    task.await.unwrap();
    let _ = std::fs::remove_dir_all(dir);
}
