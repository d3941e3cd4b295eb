//! The three small HTTP/1 servers: admin (:15000), Prometheus metrics (:15020), readiness (:15021).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{ALLOW, CONTENT_TYPE};
use http::{HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::readiness::Readiness;

/// Connections kept open per server at most; more are refused so a flood cannot exhaust memory.
const MAX_CONNECTIONS: usize = 128;
/// How long a slow client may take to send request headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long in-flight requests may take to finish once shutdown is requested.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

const TEXT: &str = "text/plain; charset=utf-8";
const JSON: &str = "application/json";

/// Response type of every handler here.
type HttpResponse = Response<Full<Bytes>>;

/// Hook applying a log filter; Ok carries the filter now in effect, Err a message for the caller.
pub type SetLogLevel = Arc<dyn Fn(&str) -> Result<String, String> + Send + Sync>;

/// Hooks the admin server calls; the binary wires them to live state.
#[derive(Clone)]
pub struct AdminHandlers {
    /// Produces the `/config_dump` document.
    pub config_dump: Arc<dyn Fn() -> serde_json::Value + Send + Sync>,
    /// Returns the current log filter for `GET /logging`.
    pub log_level: Arc<dyn Fn() -> String + Send + Sync>,
    /// Applies a new log filter for `POST /logging?level=`; Ok carries the new filter.
    pub set_log_level: SetLogLevel,
    /// Starts draining on `POST /quitquitquit`; must not block.
    pub quit: Arc<dyn Fn() + Send + Sync>,
}

impl std::fmt::Debug for AdminHandlers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminHandlers").finish_non_exhaustive()
    }
}

/// Serves the admin API on `listener` until `shutdown` is cancelled.
pub async fn serve_admin(
    listener: TcpListener,
    handlers: AdminHandlers,
    shutdown: CancellationToken,
) {
    serve(listener, shutdown, "admin", move |m, u| {
        admin_route(&handlers, m, u)
    })
    .await;
}

/// Serves `/metrics` and `/stats/prometheus` on `listener` until `shutdown` is cancelled.
pub async fn serve_metrics(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    serve(listener, shutdown, "metrics", move |m, u| {
        metrics_route(&metrics, m, u)
    })
    .await;
}

/// Serves `/healthz/ready` on `listener` until `shutdown` is cancelled.
pub async fn serve_readiness(
    listener: TcpListener,
    readiness: Readiness,
    shutdown: CancellationToken,
) {
    serve(listener, shutdown, "readiness", move |m, u| {
        readiness_route(&readiness, m, u)
    })
    .await;
}

fn respond(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> HttpResponse {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

fn not_found() -> HttpResponse {
    respond(StatusCode::NOT_FOUND, TEXT, "not found\n")
}

fn method_not_allowed(allow: &'static str) -> HttpResponse {
    let mut resp = respond(StatusCode::METHOD_NOT_ALLOWED, TEXT, "method not allowed\n");
    resp.headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    resp
}

fn admin_route(h: &AdminHandlers, method: &Method, uri: &Uri) -> HttpResponse {
    match uri.path() {
        "/config_dump" => {
            if method != Method::GET {
                return method_not_allowed("GET");
            }
            match serde_json::to_string_pretty(&(h.config_dump)()) {
                Ok(body) => respond(StatusCode::OK, JSON, body),
                Err(e) => respond(StatusCode::INTERNAL_SERVER_ERROR, TEXT, format!("{e}\n")),
            }
        }
        "/logging" => {
            let level = uri.query().and_then(|q| query_param(q, "level"));
            match (method, level) {
                (&Method::GET, None) => respond(
                    StatusCode::OK,
                    TEXT,
                    format!("current log level is {}\n", (h.log_level)()),
                ),
                // Changing state through GET would let any link-follower flip the level.
                (&Method::GET, Some(_)) => method_not_allowed("GET, POST"),
                (&Method::POST, Some(level)) => match (h.set_log_level)(&level) {
                    Ok(now) => {
                        tracing::info!(level = %now, "log level changed via admin");
                        respond(
                            StatusCode::OK,
                            TEXT,
                            format!("current log level is {now}\n"),
                        )
                    }
                    Err(e) => respond(StatusCode::BAD_REQUEST, TEXT, format!("{e}\n")),
                },
                (&Method::POST, None) => {
                    respond(StatusCode::BAD_REQUEST, TEXT, "missing ?level=<filter>\n")
                }
                _ => method_not_allowed("GET, POST"),
            }
        }
        "/quitquitquit" => {
            if method != Method::POST {
                return method_not_allowed("POST");
            }
            tracing::info!("drain requested via /quitquitquit");
            (h.quit)();
            respond(StatusCode::OK, TEXT, "OK\n")
        }
        _ => not_found(),
    }
}

fn metrics_route(metrics: &Metrics, method: &Method, uri: &Uri) -> HttpResponse {
    match uri.path() {
        "/metrics" | "/stats/prometheus" => {
            if method != Method::GET {
                return method_not_allowed("GET");
            }
            respond(
                StatusCode::OK,
                crate::metrics::CONTENT_TYPE,
                metrics.encode(),
            )
        }
        _ => not_found(),
    }
}

fn readiness_route(readiness: &Readiness, method: &Method, uri: &Uri) -> HttpResponse {
    match uri.path() {
        "/healthz/ready" => {
            if method != Method::GET {
                return method_not_allowed("GET");
            }
            if readiness.is_ready() {
                respond(StatusCode::OK, TEXT, "ready\n")
            } else {
                let pending = readiness.pending().join(", ");
                respond(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    TEXT,
                    format!("not ready: {pending}\n"),
                )
            }
        }
        _ => not_found(),
    }
}

/// Returns the percent-decoded value of the first `key=` pair in `query`.
fn query_param(query: &str, key: &str) -> Option<String> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| percent_decode(v))
}

/// Decodes `%XX` escapes and `+`; malformed escapes are kept literally.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Accept loop shared by the three servers; connection tasks are owned and end with the server.
async fn serve<F>(listener: TcpListener, shutdown: CancellationToken, name: &'static str, route: F)
where
    F: Fn(&Method, &Uri) -> HttpResponse + Send + Sync + 'static,
{
    let route = Arc::new(route);
    let mut conns = JoinSet::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Usually EMFILE; back off briefly instead of spinning.
                        tracing::warn!(server = name, error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                if conns.len() >= MAX_CONNECTIONS {
                    tracing::warn!(server = name, %peer, "too many connections; refusing");
                    continue;
                }
                let route = route.clone();
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let resp = route(req.method(), req.uri());
                    async move { Ok::<_, Infallible>(resp) }
                });
                let conn = builder.serve_connection(TokioIo::new(stream), svc);
                let shutdown = shutdown.clone();
                conns.spawn(async move {
                    let mut conn = std::pin::pin!(conn);
                    let res = tokio::select! {
                        res = conn.as_mut() => res,
                        _ = shutdown.cancelled() => {
                            conn.as_mut().graceful_shutdown();
                            match tokio::time::timeout(SHUTDOWN_GRACE, conn).await {
                                Ok(res) => res,
                                Err(_) => Ok(()),
                            }
                        }
                    };
                    if let Err(e) = res {
                        tracing::debug!(server = name, %peer, error = %e, "connection error");
                    }
                });
            }
        }
    }
    drop(listener);
    while conns.join_next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    use tokio::task::JoinHandle;

    async fn listener() -> (TcpListener, SocketAddr) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = l.local_addr().unwrap();
        (l, a)
    }

    /// Sends one HTTP/1.1 request and returns (status, headers text, body).
    async fn request(addr: SocketAddr, method: &str, path: &str) -> (u16, String, String) {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.unwrap();
        let text = String::from_utf8(buf).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let status = head.split(' ').nth(1).unwrap().parse().unwrap();
        (status, head.to_ascii_lowercase(), body.to_owned())
    }

    struct Hooks {
        quits: Arc<AtomicUsize>,
        levels: Arc<Mutex<Vec<String>>>,
    }

    fn handlers() -> (AdminHandlers, Hooks) {
        let quits = Arc::new(AtomicUsize::new(0));
        let levels = Arc::new(Mutex::new(vec!["info".to_owned()]));
        let q = quits.clone();
        let l1 = levels.clone();
        let l2 = levels.clone();
        let h = AdminHandlers {
            config_dump: Arc::new(|| serde_json::json!({"workloads": [{"name": "a"}]})),
            log_level: Arc::new(move || l1.lock().unwrap().last().cloned().unwrap_or_default()),
            set_log_level: Arc::new(move |lvl: &str| {
                if lvl.contains("bogus") {
                    return Err(format!("invalid filter {lvl}"));
                }
                l2.lock().unwrap().push(lvl.to_owned());
                Ok(lvl.to_owned())
            }),
            quit: Arc::new(move || {
                q.fetch_add(1, Ordering::SeqCst);
            }),
        };
        (h, Hooks { quits, levels })
    }

    async fn start_admin() -> (SocketAddr, Hooks, CancellationToken, JoinHandle<()>) {
        let (l, addr) = listener().await;
        let (h, hooks) = handlers();
        let token = CancellationToken::new();
        let task = tokio::spawn(serve_admin(l, h, token.clone()));
        (addr, hooks, token, task)
    }

    #[tokio::test]
    async fn quitquitquit_post_calls_hook_and_get_is_rejected() {
        let (addr, hooks, token, task) = start_admin().await;
        let (status, head, _) = request(addr, "GET", "/quitquitquit").await;
        assert_eq!(status, 405);
        assert!(head.contains("allow: post"));
        assert_eq!(hooks.quits.load(Ordering::SeqCst), 0);
        let (status, _, body) = request(addr, "POST", "/quitquitquit").await;
        assert_eq!((status, body.as_str()), (200, "OK\n"));
        assert_eq!(hooks.quits.load(Ordering::SeqCst), 1);
        token.cancel();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn logging_post_changes_level_through_hook() {
        let (addr, hooks, token, task) = start_admin().await;
        let (status, _, body) = request(addr, "GET", "/logging").await;
        assert_eq!(
            (status, body.as_str()),
            (200, "current log level is info\n")
        );
        let (status, _, body) =
            request(addr, "POST", "/logging?level=debug%2Cztunnel%3Dtrace").await;
        assert_eq!(status, 200);
        assert_eq!(body, "current log level is debug,ztunnel=trace\n");
        assert_eq!(
            hooks.levels.lock().unwrap().last().unwrap(),
            "debug,ztunnel=trace"
        );
        let (status, _, body) = request(addr, "POST", "/logging?level=bogus").await;
        assert_eq!((status, body.as_str()), (400, "invalid filter bogus\n"));
        assert_eq!(request(addr, "POST", "/logging").await.0, 400);
        assert_eq!(request(addr, "GET", "/logging?level=warn").await.0, 405);
        assert_eq!(hooks.levels.lock().unwrap().len(), 2);
        token.cancel();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn config_dump_returns_json_and_unknown_paths_404() {
        let (addr, _hooks, token, task) = start_admin().await;
        let (status, head, body) = request(addr, "GET", "/config_dump").await;
        assert_eq!(status, 200);
        assert!(head.contains("content-type: application/json"));
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["workloads"][0]["name"], "a");
        assert_eq!(request(addr, "GET", "/nope").await.0, 404);
        assert_eq!(request(addr, "GET", "/").await.0, 404);
        token.cancel();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn metrics_served_on_both_paths_with_text_format() {
        let (l, addr) = listener().await;
        let metrics = Arc::new(Metrics::new());
        metrics.hbone_rejected("rbac");
        let token = CancellationToken::new();
        let task = tokio::spawn(serve_metrics(l, metrics, token.clone()));
        for path in ["/metrics", "/stats/prometheus"] {
            let (status, head, body) = request(addr, "GET", path).await;
            assert_eq!(status, 200, "{path}");
            assert!(head.contains("content-type: text/plain; version=0.0.4"));
            assert!(body.contains("ztunnel_hbone_rejected_total{reason=\"rbac\"} 1"));
            assert!(body.contains("istio_build{component=\"ztunnel\""));
        }
        assert_eq!(request(addr, "GET", "/other").await.0, 404);
        token.cancel();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn readiness_reports_pending_tasks_until_ready() {
        let (l, addr) = listener().await;
        let readiness = Readiness::new();
        let a = readiness.register("workloads");
        let b = readiness.register("certificates");
        let token = CancellationToken::new();
        let task = tokio::spawn(serve_readiness(l, readiness.clone(), token.clone()));
        let (status, _, body) = request(addr, "GET", "/healthz/ready").await;
        assert_eq!(
            (status, body.as_str()),
            (500, "not ready: certificates, workloads\n")
        );
        drop(a);
        b.ready();
        let (status, _, body) = request(addr, "GET", "/healthz/ready").await;
        assert_eq!((status, body.as_str()), (200, "ready\n"));
        token.cancel();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn shutdown_stops_accepting_and_closes_idle_connections() {
        let (l, addr) = listener().await;
        let token = CancellationToken::new();
        let task = tokio::spawn(serve_readiness(l, Readiness::new(), token.clone()));
        // An idle keep-alive connection must not hold the server open.
        let mut idle = TcpStream::connect(addr).await.unwrap();
        idle.write_all(b"GET /healthz/ready HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 256];
        let n = idle.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        token.cancel();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("server did not stop")
            .unwrap();
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), idle.read_to_end(&mut rest)).await;
        assert!(
            matches!(read, Ok(Ok(_)) | Ok(Err(_))),
            "idle connection not closed"
        );
        assert!(TcpStream::connect(addr).await.is_err());
    }

    #[test]
    fn percent_decode_handles_escapes_and_malformed_input() {
        assert_eq!(percent_decode("a%3Db%2Cc"), "a=b,c");
        assert_eq!(percent_decode("x+y"), "x y");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
        assert_eq!(
            query_param("a=1&level=debug", "level").as_deref(),
            Some("debug")
        );
        assert_eq!(query_param("levels=1", "level"), None);
    }
}
