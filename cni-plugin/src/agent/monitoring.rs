//! The agent's monitoring port: `GET /metrics` and `GET /healthz/ready`.

use std::convert::Infallible;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::metrics::Metrics;

/// Says whether the agent is ready, or what it is waiting for.
pub type ReadyCheck = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

fn respond(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r
}

fn route(
    req: &Request<hyper::body::Incoming>,
    metrics: &Metrics,
    ready: &ReadyCheck,
) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/metrics" => respond(StatusCode::OK, metrics.render()),
        "/healthz/ready" | "/ready" => match ready() {
            Ok(()) => respond(StatusCode::OK, "ready\n".into()),
            Err(why) => respond(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            ),
        },
        "/healthz/live" => respond(StatusCode::OK, "live\n".into()),
        _ => respond(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

/// Serves until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    metrics: Metrics,
    ready: ReadyCheck,
    shutdown: CancellationToken,
) {
    let mut conns = JoinSet::new();
    loop {
        let stream = tokio::select! {
            a = listener.accept() => match a {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "monitoring accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let (metrics, ready) = (metrics.clone(), ready.clone());
        conns.spawn(async move {
            let svc = service_fn(move |req| {
                let resp = route(&req, &metrics, &ready);
                async move { Ok::<_, Infallible>(resp) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
        while conns.try_join_next().is_some() {}
    }
    conns.shutdown().await;
}
