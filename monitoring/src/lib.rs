//! The monitoring port every long-running mesh component serves (the controller and the node
//! agent on 15014): `GET /metrics` in Prometheus text format, `GET /healthz/ready` (also
//! `/ready`) answering 200 `ready` or 503 `not ready: <what is pending>`, and
//! `GET /healthz/live`, plus any read-only JSON debug endpoints the component adds (e.g. the
//! controller's `/debug/connections`).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

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

/// Says whether the component is ready, or what it is still waiting for.
pub type ReadyCheck = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// Renders the JSON body of one debug endpoint at request time.
pub type DebugHandler = Arc<dyn Fn() -> String + Send + Sync>;

/// Read-only JSON endpoints served beside `/metrics`, by exact path (e.g. `/debug/connections`).
pub type DebugRoutes = Arc<Vec<(&'static str, DebugHandler)>>;

fn respond(
    status: StatusCode,
    content_type: &str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

fn route(
    path: &str,
    registry: &Registry,
    ready: &ReadyCheck,
    debug: &DebugRoutes,
) -> Response<Full<Bytes>> {
    if let Some((_, handler)) = debug.iter().find(|(p, _)| *p == path) {
        return respond(StatusCode::OK, "application/json", handler());
    }
    match path {
        "/metrics" | "/stats/prometheus" => {
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
        "/healthz/ready" | "/ready" => match ready() {
            Ok(()) => respond(StatusCode::OK, "text/plain", "ready\n"),
            Err(why) => respond(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("not ready: {why}\n"),
            ),
        },
        "/healthz/live" => respond(StatusCode::OK, "text/plain", "live\n"),
        _ => respond(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    }
}

/// Serves `registry` and `ready` on `listener` until `shutdown`; open connections end with it.
pub async fn serve(
    listener: TcpListener,
    registry: Registry,
    ready: ReadyCheck,
    shutdown: CancellationToken,
) {
    serve_with_debug(listener, registry, ready, Arc::new(Vec::new()), shutdown).await
}

/// Like [`serve`], with extra JSON debug endpoints.
pub async fn serve_with_debug(
    listener: TcpListener,
    registry: Registry,
    ready: ReadyCheck,
    debug: DebugRoutes,
    shutdown: CancellationToken,
) {
    let mut conns = JoinSet::new();
    loop {
        let stream = tokio::select! {
            a = listener.accept() => match a {
                Ok((s, _)) => s,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "monitoring accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let (registry, ready, debug) = (registry.clone(), ready.clone(), debug.clone());
        conns.spawn(async move {
            let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                let resp = route(req.uri().path(), &registry, &ready, &debug);
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

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::sync::atomic::{AtomicBool, Ordering};

    async fn body(r: Response<Full<Bytes>>) -> (StatusCode, String) {
        let status = r.status();
        let bytes = r.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&bytes).into_owned())
    }

    #[tokio::test]
    async fn readiness_follows_the_check_and_says_what_is_pending() {
        let flag = Arc::new(AtomicBool::new(false));
        let ready: ReadyCheck = {
            let flag = flag.clone();
            Arc::new(move || {
                if flag.load(Ordering::SeqCst) {
                    Ok(())
                } else {
                    Err("config source not synced".into())
                }
            })
        };
        let r = Registry::new();
        let none: DebugRoutes = Arc::new(Vec::new());
        assert_eq!(
            body(route("/healthz/ready", &r, &ready, &none)).await,
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready: config source not synced\n".into()
            )
        );
        flag.store(true, Ordering::SeqCst);
        assert_eq!(
            body(route("/ready", &r, &ready, &none)).await,
            (StatusCode::OK, "ready\n".into())
        );
        assert_eq!(
            body(route("/nope", &r, &ready, &none)).await.0,
            StatusCode::NOT_FOUND
        );
    }

    #[tokio::test]
    async fn debug_routes_render_at_request_time_and_unknown_paths_stay_404() {
        let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let h = hits.clone();
        let handler: DebugHandler = Arc::new(move || {
            let n = h.fetch_add(1, Ordering::SeqCst) + 1;
            format!("{{\"calls\":{n}}}")
        });
        let debug: DebugRoutes = Arc::new(vec![("/debug/connections", handler)]);
        let (r, ready): (Registry, ReadyCheck) = (Registry::new(), Arc::new(|| Ok(())));
        let resp = route("/debug/connections", &r, &ready, &debug);
        assert_eq!(
            resp.headers()[hyper::header::CONTENT_TYPE],
            "application/json"
        );
        assert_eq!(body(resp).await, (StatusCode::OK, "{\"calls\":1}".into()));
        assert_eq!(
            body(route("/debug/connections", &r, &ready, &debug))
                .await
                .1,
            "{\"calls\":2}"
        );
        assert_eq!(
            body(route("/debug/other", &r, &ready, &debug)).await.0,
            StatusCode::NOT_FOUND
        );
    }

    #[tokio::test]
    async fn metrics_are_prometheus_text_over_a_real_socket() {
        let r = Registry::new();
        let c = prometheus::IntCounter::new("test_things_total", "Things").unwrap();
        r.register(Box::new(c.clone())).unwrap();
        c.inc_by(3);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let server = tokio::spawn(serve(listener, r, Arc::new(|| Ok(())), stop.clone()));
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        assert!(out.contains("test_things_total 3"), "{out}");
        stop.cancel();
        server.await.unwrap();
    }
}
