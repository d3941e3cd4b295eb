//! Pool tests against a real TLS + HTTP/2 echo server on localhost.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;
use crate::identity::Identity;
use crate::server::ServerSettings;
use crate::server::testing::{
    TestServer, TestTls, connect_request as request, echo_server, test_tls,
};

fn key(dst: SocketAddr) -> PoolKey {
    PoolKey::new(
        Identity::new("cluster.local", "a", "client"),
        vec![
            Identity::new("cluster.local", "b", "server"),
            Identity::new("cluster.local", "a", "server"),
        ],
        "10.0.0.1".parse().unwrap(),
        dst,
    )
}

async fn setup(config: PoolConfig) -> (Pool, TestTls, TestServer) {
    let tls = test_tls();
    let server = echo_server(&tls, ServerSettings::default()).await;
    (Pool::new(config, Arc::new(TcpConnector)), tls, server)
}

/// Polls `cond` until it holds, failing the test after a few seconds.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..500 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

async fn echo_round_trip(stream: &mut H2Stream, payload: &[u8]) {
    stream.write_all(payload).await.unwrap();
    let mut back = vec![0u8; payload.len()];
    stream.read_exact(&mut back).await.unwrap();
    assert_eq!(back, payload);
}

#[tokio::test]
async fn connect_round_trip_through_echo_server() {
    let (pool, tls, server) = setup(PoolConfig::default()).await;
    let mut stream = pool
        .connect(key(server.addr), tls.client.clone(), request(80))
        .await
        .unwrap();
    echo_round_trip(&mut stream, b"ping over hbone").await;
    stream.shutdown().await.unwrap();
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
    assert_eq!(pool.connection_count(), 1);
    drop(stream);
    eventually("stream release", || pool.stats().active_streams == 0).await;
}

#[tokio::test]
async fn non_200_status_is_reported() {
    let (pool, tls, server) = setup(PoolConfig::default()).await;
    let err = pool
        .connect(key(server.addr), tls.client.clone(), request(1))
        .await
        .unwrap_err();
    assert!(
        matches!(err, HboneError::Status(StatusCode::FORBIDDEN)),
        "{err}"
    );
    assert_eq!(pool.stats().active_streams, 0);
}

#[tokio::test]
async fn pool_reuses_connection_for_sequential_streams() {
    let (pool, tls, server) = setup(PoolConfig::default()).await;
    for i in 0..5u8 {
        let mut stream = pool
            .connect(key(server.addr), tls.client.clone(), request(80))
            .await
            .unwrap();
        echo_round_trip(&mut stream, &[i; 100]).await;
    }
    assert_eq!(server.accepted.load(Ordering::SeqCst), 1);
    assert_eq!(pool.connection_count(), 1);
    assert_eq!(pool.stats().connections_opened, 1);
}

#[tokio::test]
async fn pool_opens_another_connection_at_stream_limit() {
    let config = PoolConfig {
        max_streams_per_conn: 2,
        ..PoolConfig::default()
    };
    let (pool, tls, server) = setup(config).await;
    let k = key(server.addr);
    // Concurrent first use shares one dial while the stream limit allows it.
    let (a, b) = tokio::join!(
        pool.connect(k.clone(), tls.client.clone(), request(80)),
        pool.connect(k.clone(), tls.client.clone(), request(80)),
    );
    let (mut a, mut b) = (a.unwrap(), b.unwrap());
    assert_eq!(server.accepted.load(Ordering::SeqCst), 1);

    let mut c = pool
        .connect(k.clone(), tls.client.clone(), request(80))
        .await
        .unwrap();
    assert_eq!(server.accepted.load(Ordering::SeqCst), 2);
    assert_eq!(pool.connection_count(), 2);
    assert_eq!(pool.stats().active_streams, 3);
    for s in [&mut a, &mut b, &mut c] {
        echo_round_trip(s, b"x").await;
    }

    // A freed slot is reused rather than dialing a third connection.
    drop(a);
    let mut d = pool
        .connect(k, tls.client.clone(), request(80))
        .await
        .unwrap();
    echo_round_trip(&mut d, b"y").await;
    assert_eq!(server.accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn goaway_forces_new_connection_and_inflight_stream_completes() {
    let (pool, tls, server) = setup(PoolConfig::default()).await;
    let k = key(server.addr);
    let mut old = pool
        .connect(k.clone(), tls.client.clone(), request(80))
        .await
        .unwrap();
    echo_round_trip(&mut old, b"before").await;

    server.drain_existing();
    eventually("GOAWAY to reach the pool", || {
        pool.stats().pooled_connections == 0
    })
    .await;
    let mut new = pool
        .connect(k.clone(), tls.client.clone(), request(80))
        .await
        .unwrap();
    echo_round_trip(&mut new, b"new").await;
    assert_eq!(server.accepted.load(Ordering::SeqCst), 2);

    echo_round_trip(&mut old, b"after goaway").await;
    old.shutdown().await.unwrap();
    let mut rest = Vec::new();
    old.read_to_end(&mut rest).await.unwrap();
    drop(old);
    eventually("drained connection to close", || {
        pool.connection_count() == 1
    })
    .await;

    let mut again = pool
        .connect(k, tls.client.clone(), request(80))
        .await
        .unwrap();
    echo_round_trip(&mut again, b"reuse new").await;
    assert_eq!(server.accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn idle_connection_is_closed_after_timeout() {
    let config = PoolConfig {
        idle_timeout: Duration::from_millis(200),
        ..PoolConfig::default()
    };
    let (pool, tls, server) = setup(config).await;
    let mut stream = pool
        .connect(key(server.addr), tls.client.clone(), request(80))
        .await
        .unwrap();
    echo_round_trip(&mut stream, b"data").await;
    // In use: never idle, however long it sits.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(pool.connection_count(), 1);
    drop(stream);
    eventually("idle connection to close", || pool.connection_count() == 0).await;
    assert_eq!(pool.stats().pooled_connections, 0);
}

#[tokio::test]
async fn oversized_header_is_rejected_without_hurting_other_connections() {
    let (pool, tls, server) = setup(PoolConfig::default()).await;
    let mut healthy = pool
        .connect(key(server.addr), tls.client.clone(), request(80))
        .await
        .unwrap();
    let mut big = request(80);
    big.headers.insert(
        "x-big",
        http::HeaderValue::from_str(&"y".repeat(64 * 1024)).unwrap(),
    );
    let other_key = PoolKey {
        src_ip: "10.0.0.2".parse().unwrap(),
        ..key(server.addr)
    };
    let err = pool
        .connect(other_key, tls.client.clone(), big)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            HboneError::Status(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE) | HboneError::H2(_)
        ),
        "{err}"
    );
    echo_round_trip(&mut healthy, b"unaffected").await;
}

#[tokio::test]
async fn keepalive_drops_unresponsive_connection() {
    let tls = test_tls();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.server.clone());
    // Completes TLS and answers one CONNECT, then stops reading: PINGs go unanswered.
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let io = acceptor.accept(tcp).await.unwrap();
        let mut conn = h2::server::handshake(io).await.unwrap();
        let (_req, mut respond) = conn.accept().await.unwrap().unwrap();
        let _send = respond.send_response(http::Response::new(()), false);
        // Flush the response, then go silent while still holding the connection.
        let _ = tokio::time::timeout(Duration::from_millis(50), conn.accept()).await;
        std::future::pending::<()>().await;
    });
    let config = PoolConfig {
        keepalive_interval: Duration::from_millis(100),
        keepalive_timeout: Duration::from_millis(200),
        ..PoolConfig::default()
    };
    let pool = Pool::new(config, Arc::new(TcpConnector));
    let mut stream = pool
        .connect(key(addr), tls.client.clone(), request(80))
        .await
        .unwrap();
    eventually("keepalive to drop the connection", || {
        pool.connection_count() == 0
    })
    .await;
    let mut buf = [0u8; 8];
    assert!(stream.read(&mut buf).await.is_err());
    server.abort();
}

#[tokio::test]
async fn dial_failure_is_reported_and_not_pooled() {
    let tls = test_tls();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let pool = Pool::new(PoolConfig::default(), Arc::new(TcpConnector));
    let err = pool
        .connect(key(addr), tls.client.clone(), request(80))
        .await
        .unwrap_err();
    assert!(matches!(err, HboneError::Dial(_)), "{err}");
    let stats = pool.stats();
    assert_eq!((stats.pooled_connections, stats.connect_failures), (0, 1));
    assert_eq!(stats.active_streams, 0);
}

#[test]
fn pool_and_stream_can_cross_tasks() {
    fn send_sync<T: Send + Sync + 'static>() {}
    fn send<T: Send + 'static>() {}
    send_sync::<Pool>();
    send_sync::<PoolKey>();
    send::<H2Stream>();
    send::<HboneError>();
    send_sync::<HboneError>();
}

#[test]
fn pool_key_ignores_identity_order() {
    let dst: SocketAddr = "10.0.0.9:15008".parse().unwrap();
    let a = key(dst);
    let mut ids = a.dst_identities.clone();
    ids.reverse();
    let b = PoolKey::new(a.src_identity.clone(), ids, a.src_ip, dst);
    assert_eq!(a, b);
}
