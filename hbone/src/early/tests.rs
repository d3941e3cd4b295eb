//! Early-data tunnels against the TLS + HTTP/2 echo server on localhost.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

use super::*;
use crate::identity::Identity;
use crate::pool::{PoolConfig, TcpConnector};
use crate::server::ServerSettings;
use crate::server::testing::{
    TestServer, TestTls, connect_request as request, echo_server, test_tls,
};

fn key(dst: SocketAddr) -> PoolKey {
    PoolKey::new(
        Identity::new("cluster.local", "a", "client"),
        vec![Identity::new("cluster.local", "b", "server")],
        "10.0.0.1".parse().unwrap(),
        dst,
    )
}

async fn setup() -> (Pool, TestTls, TestServer) {
    let tls = test_tls();
    let server = echo_server(&tls, ServerSettings::default()).await;
    (
        Pool::new(PoolConfig::default(), Arc::new(TcpConnector)),
        tls,
        server,
    )
}

fn deadline() -> Instant {
    Instant::now() + Duration::from_secs(5)
}

/// Runs a tunnel for an app that writes `payload`, half-closes and reads the echo.
async fn echo_through(
    pool: &Pool,
    tls: &TestTls,
    server: &TestServer,
    port: u16,
    payload: &[u8],
) -> (Result<(u64, u64), TunnelError>, Vec<u8>, bool) {
    let (mut app, mut proxy_side): (DuplexStream, DuplexStream) = tokio::io::duplex(64 * 1024);
    app.write_all(payload).await.unwrap();
    app.shutdown().await.unwrap();
    let opening = pool
        .open(key(server.addr), tls.client.clone(), request(port))
        .await
        .unwrap();
    let established = AtomicBool::new(false);
    let result = tunnel(&mut proxy_side, opening, deadline(), || {
        established.store(true, Ordering::SeqCst)
    })
    .await;
    drop(proxy_side);
    let mut echoed = Vec::new();
    app.read_to_end(&mut echoed).await.unwrap();
    (result, echoed, established.load(Ordering::SeqCst))
}

#[tokio::test]
async fn first_bytes_go_out_before_the_response_and_are_echoed() {
    let (pool, tls, server) = setup().await;
    let (result, echoed, established) = echo_through(&pool, &tls, &server, 80, b"hello").await;
    assert_eq!(result.unwrap(), (5, 5));
    assert_eq!(echoed, b"hello");
    assert!(established);
    // Nothing was refused, so nothing was replayed: one request, one connection.
    assert_eq!(server.requests.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn data_beyond_the_first_chunk_follows_after_the_response() {
    let (pool, tls, server) = setup().await;
    let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let (mut app, mut proxy_side) = tokio::io::duplex(16 * 1024);
    let opening = pool
        .open(key(server.addr), tls.client.clone(), request(80))
        .await
        .unwrap();
    let pump =
        tokio::spawn(async move { tunnel(&mut proxy_side, opening, deadline(), || {}).await });
    let (mut rd, mut wr) = tokio::io::split(&mut app);
    let expected = payload.clone();
    let writing = async move {
        wr.write_all(&payload).await.unwrap();
        wr.shutdown().await.unwrap();
    };
    let reading = async move {
        let mut got = Vec::new();
        rd.read_to_end(&mut got).await.unwrap();
        got
    };
    let ((), got) = tokio::join!(writing, reading);
    assert!(got == expected, "echo corrupted");
    assert_eq!(pump.await.unwrap().unwrap(), (300_000, 300_000));
}

#[tokio::test]
async fn error_status_is_a_connect_error_and_never_established() {
    let (pool, tls, server) = setup().await;
    // The echo server answers CONNECT to port 1 with 403.
    let (result, echoed, established) = echo_through(&pool, &tls, &server, 1, b"secret").await;
    match result {
        Err(TunnelError::Connect(HboneError::Status(s))) => assert_eq!(s, StatusCode::FORBIDDEN),
        other => panic!("expected a 403 connect error, got {other:?}"),
    }
    assert!(echoed.is_empty());
    assert!(!established);
}

#[tokio::test]
async fn refused_stream_is_replayed_on_a_new_connection() {
    let (pool, tls, server) = setup().await;
    server.refuse.store(1, Ordering::SeqCst);
    let (result, echoed, established) = echo_through(&pool, &tls, &server, 80, b"again").await;
    assert_eq!(result.unwrap(), (5, 5));
    assert_eq!(echoed, b"again");
    assert!(established);
    // The refused request and its replay, the replay on a connection of its own.
    assert_eq!(server.requests.load(Ordering::SeqCst), 2);
    assert_eq!(server.accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn refused_on_every_attempt_is_a_connect_error() {
    let (pool, tls, server) = setup().await;
    // The early stream, the replay and the replay's own retry (as in `Pool::connect`).
    server.refuse.store(3, Ordering::SeqCst);
    let (result, _echoed, established) = echo_through(&pool, &tls, &server, 80, b"x").await;
    assert!(matches!(result, Err(TunnelError::Connect(_))), "{result:?}");
    assert!(!established);
    assert_eq!(server.requests.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn response_not_in_time_is_a_connect_timeout() {
    // A deadline already in the past: the response cannot have arrived by then.
    let (pool, tls, server) = setup().await;
    let (_app, mut proxy_side) = tokio::io::duplex(1024);
    let opening = pool
        .open(key(server.addr), tls.client.clone(), request(80))
        .await
        .unwrap();
    if matches!(opening, Opening::Established(_)) {
        panic!("a fresh connection should be handed out ready, not established");
    }
    let result = tunnel(&mut proxy_side, opening, Instant::now(), || {}).await;
    assert!(
        matches!(
            result,
            Err(TunnelError::Connect(HboneError::ConnectTimeout))
        ),
        "{result:?}"
    );
}

#[tokio::test]
async fn a_replay_that_is_never_answered_ends_at_the_deadline() {
    let (pool, tls, server) = setup().await;
    // Refused once, then the replay (port 2) is taken and never answered.
    server.refuse.store(1, Ordering::SeqCst);
    let (_app, mut proxy_side) = tokio::io::duplex(1024);
    let opening = pool
        .open(key(server.addr), tls.client.clone(), request(2))
        .await
        .unwrap();
    let started = Instant::now();
    let deadline = started + Duration::from_millis(500);
    let result = tokio::time::timeout(
        Duration::from_secs(5),
        tunnel(&mut proxy_side, opening, deadline, || {}),
    )
    .await
    .expect("the tunnel must end by its deadline");
    assert!(
        matches!(
            result,
            Err(TunnelError::Connect(HboneError::ConnectTimeout))
        ),
        "{result:?}"
    );
    assert_eq!(
        server.requests.load(Ordering::SeqCst),
        2,
        "refused + replay"
    );
}

/// A client socket whose reads fail, as after a reset.
struct Reset;

impl tokio::io::AsyncRead for Reset {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        _: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Err(std::io::ErrorKind::ConnectionReset.into()))
    }
}

impl tokio::io::AsyncWrite for Reset {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        b: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::task::Poll::Ready(Ok(b.len()))
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

#[tokio::test]
async fn a_client_reset_before_the_response_abandons_the_tunnel() {
    let (pool, tls, server) = setup().await;
    // Port 2 never answers: only the client going away can end this before the deadline.
    let opening = pool
        .open(key(server.addr), tls.client.clone(), request(2))
        .await
        .unwrap();
    let established = AtomicBool::new(false);
    let result = tokio::time::timeout(
        Duration::from_secs(5),
        tunnel(&mut Reset, opening, deadline(), || {
            established.store(true, Ordering::SeqCst)
        }),
    )
    .await
    .expect("a reset client ends the wait at once");
    match result {
        Err(TunnelError::Io(e)) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset),
        other => panic!("expected the client's reset, got {other:?}"),
    }
    assert!(
        !established.load(Ordering::SeqCst),
        "never counted as opened"
    );
}
