//! The monitoring port (15014): `GET /metrics` (Prometheus text) and `GET /ready` (200 once the
//! initial configuration is loaded, 503 with what is pending otherwise).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus::{Encoder, Registry, TextEncoder};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Tasks that must finish before the controller reports ready.
#[derive(Clone, Default)]
pub struct Readiness {
    pending: Arc<Mutex<BTreeMap<u64, String>>>,
    next: Arc<Mutex<u64>>,
}

/// Marks its task done when dropped.
pub struct ReadyGuard {
    id: u64,
    pending: Arc<Mutex<BTreeMap<u64, String>>>,
}

impl Drop for ReadyGuard {
    fn drop(&mut self) {
        if let Ok(mut p) = self.pending.lock() {
            p.remove(&self.id);
        }
    }
}

impl Readiness {
    /// Registers a pending task.
    pub fn register(&self, name: &str) -> Option<ReadyGuard> {
        let id = {
            let mut n = self.next.lock().ok()?;
            *n += 1;
            *n
        };
        self.pending.lock().ok()?.insert(id, name.to_string());
        Some(ReadyGuard {
            id,
            pending: self.pending.clone(),
        })
    }

    /// Names of pending tasks.
    pub fn pending(&self) -> Vec<String> {
        self.pending
            .lock()
            .map(|p| p.values().cloned().collect())
            .unwrap_or_default()
    }
}

fn respond(
    status: StatusCode,
    content_type: &str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(body.into()))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

fn route(
    req: &Request<hyper::body::Incoming>,
    registry: &Registry,
    ready: &Readiness,
) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/metrics" => {
            let mut buf = Vec::new();
            let encoder = TextEncoder::new();
            match encoder.encode(&registry.gather(), &mut buf) {
                Ok(()) => respond(StatusCode::OK, encoder.format_type(), buf),
                Err(e) => respond(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    e.to_string(),
                ),
            }
        }
        "/ready" => {
            let pending = ready.pending();
            if pending.is_empty() {
                respond(StatusCode::OK, "text/plain", "ready\n")
            } else {
                respond(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    format!("not ready: {}\n", pending.join(", ")),
                )
            }
        }
        _ => respond(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    }
}

/// Serves until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    registry: Registry,
    ready: Readiness,
    shutdown: CancellationToken,
) {
    let mut conns = JoinSet::new();
    loop {
        let (stream, _) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "monitoring accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let (registry, ready) = (registry.clone(), ready.clone());
        conns.spawn(async move {
            let svc = service_fn(move |req| {
                let resp = route(&req, &registry, &ready);
                async move { Ok::<_, Infallible>(resp) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
        // Reap finished connections so the set stays small.
        while conns.try_join_next().is_some() {}
    }
    conns.shutdown().await;
}
