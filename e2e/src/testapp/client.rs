//! One request against a target URL (`http://`, `grpc://`, `tcp://`), classified into an
//! [`Outcome`]. Shared by the `call` command and by `serve --upstream`.

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use super::grpc;

/// Largest response body the client reads; bigger bodies count as an error.
pub const MAX_RESPONSE_BODY: usize = 4 << 20;
/// Largest amount read back from a TCP echo exchange.
const MAX_TCP_READ: usize = 64 << 10;

/// A URL that could not be used as a target.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    /// Not parseable as a URI.
    #[error("invalid URL {0:?}: {1}")]
    Invalid(String, http::uri::InvalidUri),
    /// Scheme other than http, grpc or tcp.
    #[error("unsupported scheme in {0:?} (use http://, grpc:// or tcp://)")]
    Scheme(String),
    /// No host in the URL.
    #[error("missing host in {0:?}")]
    NoHost(String),
    /// grpc:// and tcp:// have no default port.
    #[error("missing port in {0:?}")]
    NoPort(String),
}

/// Protocol spoken to a target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// Plain HTTP (1.1, or h2c prior knowledge when asked).
    Http,
    /// gRPC unary call over h2c.
    Grpc,
    /// Raw TCP: send a line, read the echo (and banner).
    Tcp,
}

/// A parsed target URL.
#[derive(Debug, Clone)]
pub struct Target {
    /// The URL as given, for reports.
    pub url: String,
    /// Protocol.
    pub scheme: Scheme,
    /// `host:port` to resolve and connect to; also the Host/`:authority`.
    pub authority: String,
    /// Path and query sent (gRPC: the method path).
    pub path: String,
}

impl Target {
    /// Parses `http://host[:port]/path`, `grpc://host:port[/pkg.Svc/Method]` or `tcp://host:port`.
    pub fn parse(url: &str) -> Result<Self, TargetError> {
        let uri: Uri = url
            .parse()
            .map_err(|e| TargetError::Invalid(url.to_string(), e))?;
        let scheme = match uri.scheme_str() {
            Some("http") => Scheme::Http,
            Some("grpc") => Scheme::Grpc,
            Some("tcp") => Scheme::Tcp,
            _ => return Err(TargetError::Scheme(url.to_string())),
        };
        let auth = uri
            .authority()
            .ok_or_else(|| TargetError::NoHost(url.to_string()))?;
        if auth.host().is_empty() {
            return Err(TargetError::NoHost(url.to_string()));
        }
        let port = match (auth.port_u16(), scheme) {
            (Some(p), _) => p,
            (None, Scheme::Http) => 80,
            (None, _) => return Err(TargetError::NoPort(url.to_string())),
        };
        let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let path = if scheme == Scheme::Grpc && (path.is_empty() || path == "/") {
            grpc::ECHO_PATH.to_string()
        } else if path.is_empty() {
            "/".to_string()
        } else {
            path.to_string()
        };
        Ok(Self {
            url: url.to_string(),
            scheme,
            authority: format!("{}:{port}", auth.host()),
            path,
        })
    }
}

/// What to send, independent of the target.
#[derive(Debug, Clone)]
pub struct RequestSpec {
    /// HTTP method (gRPC always uses POST).
    pub method: Method,
    /// Extra request headers.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// HTTP body, gRPC message, or TCP line (a newline is appended).
    pub body: Bytes,
    /// Use h2c prior knowledge for http:// targets.
    pub http2: bool,
    /// Deadline for connect plus the whole exchange.
    pub timeout: Duration,
}

/// Kind of failure, used as the key in error counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorKind {
    /// Name resolution failed.
    Resolve,
    /// TCP connect failed (refused, unreachable).
    Connect,
    /// The deadline passed.
    Timeout,
    /// HTTP/2 or HTTP/1 protocol error, reset or closed connection.
    Protocol,
    /// The response body could not be read or was too large.
    Body,
    /// The gRPC response body was not valid framing.
    GrpcFraming,
    /// The TCP peer closed before echoing.
    Eof,
    /// The TCP peer echoed something else.
    EchoMismatch,
}

impl ErrorKind {
    /// Stable name for reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Resolve => "resolve",
            Self::Connect => "connect",
            Self::Timeout => "timeout",
            Self::Protocol => "protocol",
            Self::Body => "body",
            Self::GrpcFraming => "grpc-framing",
            Self::Eof => "eof",
            Self::EchoMismatch => "echo-mismatch",
        }
    }
}

/// Result of one request.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// `"200"` for HTTP, `"grpc-0"` for gRPC, `"ok"` for TCP; None when no answer came.
    pub code: Option<String>,
    /// 2xx, grpc-status 0, or a complete TCP echo.
    pub success: bool,
    /// Response body (gRPC: the decoded message; TCP: everything read).
    pub body: Bytes,
    /// Answering pod, from the JSON `pod` field or the TCP banner.
    pub pod: Option<String>,
    /// Answering version, from the JSON `version` field or the TCP banner.
    pub version: Option<String>,
    /// Peer address the server reported seeing.
    pub peer: Option<String>,
    /// Failure kind and message.
    pub error: Option<(ErrorKind, String)>,
    /// Time from start to the end of the exchange.
    pub latency: Duration,
}

impl Outcome {
    fn failed(kind: ErrorKind, msg: impl Into<String>) -> Self {
        Self {
            code: None,
            success: false,
            body: Bytes::new(),
            pod: None,
            version: None,
            peer: None,
            error: Some((kind, msg.into())),
            latency: Duration::ZERO,
        }
    }
}

/// Aborts the connection driver when the sender goes, so no task outlives its user.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

enum Sender {
    H1(http1::SendRequest<Full<Bytes>>),
    H2(http2::SendRequest<Full<Bytes>>),
}

/// An HTTP connection that a worker may reuse across requests.
pub struct HttpConn {
    sender: Sender,
    _driver: AbortOnDrop,
}

impl HttpConn {
    async fn ready(&mut self) -> bool {
        match &mut self.sender {
            Sender::H1(s) => s.ready().await.is_ok(),
            Sender::H2(s) => s.ready().await.is_ok(),
        }
    }
}

async fn connect_tcp(authority: &str) -> Result<TcpStream, (ErrorKind, String)> {
    let addrs: Vec<_> = tokio::net::lookup_host(authority)
        .await
        .map_err(|e| (ErrorKind::Resolve, format!("{authority}: {e}")))?
        .collect();
    let mut last = format!("{authority}: no addresses");
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(s) => {
                // Small request/response exchanges; Nagle only adds latency.
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Err(e) => last = format!("{addr}: {e}"),
        }
    }
    Err((ErrorKind::Connect, last))
}

async fn connect_http(authority: &str, h2: bool) -> Result<HttpConn, (ErrorKind, String)> {
    let io = TokioIo::new(connect_tcp(authority).await?);
    let proto = |e: hyper::Error| (ErrorKind::Protocol, e.to_string());
    if h2 {
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .max_header_list_size(64 << 10)
            .handshake(io)
            .await
            .map_err(proto)?;
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(HttpConn {
            sender: Sender::H2(sender),
            _driver: AbortOnDrop(driver),
        })
    } else {
        let (sender, conn) = http1::Builder::new()
            .max_buf_size(256 << 10)
            .handshake(io)
            .await
            .map_err(proto)?;
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(HttpConn {
            sender: Sender::H1(sender),
            _driver: AbortOnDrop(driver),
        })
    }
}

/// Sends one request to `target`. With `reuse` set, an existing connection in `conn` is used
/// when still usable and the connection is left there afterwards; otherwise each request
/// opens its own connection (so L4 load balancing is visible).
pub async fn request_once(
    target: &Target,
    spec: &RequestSpec,
    conn: &mut Option<HttpConn>,
    reuse: bool,
) -> Outcome {
    let start = Instant::now();
    let fut = async {
        match target.scheme {
            Scheme::Tcp => tcp_exchange(target, spec).await,
            Scheme::Http | Scheme::Grpc => http_exchange(target, spec, conn, reuse).await,
        }
    };
    let mut out = match tokio::time::timeout(spec.timeout, fut).await {
        Ok(o) => o,
        Err(_) => {
            // A timed-out connection may be stuck mid-response; never reuse it.
            *conn = None;
            Outcome::failed(
                ErrorKind::Timeout,
                format!(
                    "no answer within {}",
                    humantime::format_duration(spec.timeout)
                ),
            )
        }
    };
    out.latency = start.elapsed();
    out
}

fn build_request(
    target: &Target,
    spec: &RequestSpec,
    h2: bool,
) -> Result<Request<Full<Bytes>>, String> {
    let grpc_call = target.scheme == Scheme::Grpc;
    let uri = if h2 {
        format!("http://{}{}", target.authority, target.path)
    } else {
        target.path.clone()
    };
    let method = if grpc_call {
        Method::POST
    } else {
        spec.method.clone()
    };
    let mut builder = Request::builder().method(method).uri(uri);
    if !h2 {
        builder = builder.header(http::header::HOST, target.authority.as_str());
    }
    let body = if grpc_call {
        builder = builder
            .header(http::header::CONTENT_TYPE, grpc::CONTENT_TYPE)
            .header(http::header::TE, "trailers");
        grpc::encode(&spec.body).map_err(|e| e.to_string())?
    } else {
        spec.body.clone()
    };
    let mut req = builder.body(Full::new(body)).map_err(|e| e.to_string())?;
    for (k, v) in &spec.headers {
        req.headers_mut().append(k.clone(), v.clone());
    }
    Ok(req)
}

async fn http_exchange(
    target: &Target,
    spec: &RequestSpec,
    slot: &mut Option<HttpConn>,
    reuse: bool,
) -> Outcome {
    // gRPC needs HTTP/2; plain HTTP uses it only when asked.
    let h2 = spec.http2 || target.scheme == Scheme::Grpc;
    let reusable = match slot.take() {
        Some(mut c) if reuse => c.ready().await.then_some(c),
        _ => None,
    };
    let mut conn = match reusable {
        Some(c) => c,
        None => match connect_http(&target.authority, h2).await {
            Ok(c) => c,
            Err((k, m)) => return Outcome::failed(k, m),
        },
    };
    let req = match build_request(target, spec, h2) {
        Ok(r) => r,
        Err(e) => return Outcome::failed(ErrorKind::Protocol, e),
    };
    let sent = match &mut conn.sender {
        Sender::H1(s) => s.send_request(req).await,
        Sender::H2(s) => s.send_request(req).await,
    };
    let resp = match sent {
        Ok(r) => r,
        Err(e) => return Outcome::failed(ErrorKind::Protocol, e.to_string()),
    };
    let (parts, body) = resp.into_parts();
    let collected = match Limited::new(body, MAX_RESPONSE_BODY).collect().await {
        Ok(c) => c,
        Err(e) => return Outcome::failed(ErrorKind::Body, e.to_string()),
    };
    let trailers = collected.trailers().cloned();
    let raw = collected.to_bytes();
    if reuse {
        *slot = Some(conn);
    }
    let status = parts.status.as_u16();
    let mut out = if target.scheme == Scheme::Grpc && status == 200 {
        grpc_outcome(&parts.headers, trailers.as_ref(), raw)
    } else {
        Outcome {
            code: Some(status.to_string()),
            success: parts.status.is_success(),
            body: raw,
            pod: None,
            version: None,
            peer: None,
            error: None,
            latency: Duration::ZERO,
        }
    };
    fill_identity(&mut out);
    out
}

fn grpc_outcome(headers: &HeaderMap, trailers: Option<&HeaderMap>, raw: Bytes) -> Outcome {
    let status = grpc::status_of(headers, trailers);
    let body = match grpc::decode_all(raw) {
        Ok(mut msgs) => msgs.pop().unwrap_or_default(),
        Err(e) => return Outcome::failed(ErrorKind::GrpcFraming, e.to_string()),
    };
    // A failed call carries no message; show grpc-message instead so the cause is visible.
    let body = match (status, body.is_empty()) {
        (Some(code), true) if code != grpc::STATUS_OK => trailers
            .and_then(|t| t.get("grpc-message"))
            .or_else(|| headers.get("grpc-message"))
            .map(|m| Bytes::copy_from_slice(m.as_bytes()))
            .unwrap_or_default(),
        _ => body,
    };
    match status {
        Some(code) => Outcome {
            code: Some(format!("grpc-{code}")),
            success: code == grpc::STATUS_OK,
            body,
            pod: None,
            version: None,
            peer: None,
            error: None,
            latency: Duration::ZERO,
        },
        None => Outcome::failed(ErrorKind::GrpcFraming, "response without grpc-status"),
    }
}

/// Pulls `pod`/`version`/`peer` out of a JSON body, if it is one.
fn fill_identity(out: &mut Outcome) {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.body) else {
        return;
    };
    let field = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
    out.pod = field("pod");
    out.version = field("version");
    out.peer = field("peer");
}

async fn tcp_exchange(target: &Target, spec: &RequestSpec) -> Outcome {
    let mut stream = match connect_tcp(&target.authority).await {
        Ok(s) => s,
        Err((k, m)) => return Outcome::failed(k, m),
    };
    let mut line = BytesMut::from(&spec.body[..]);
    line.extend_from_slice(b"\n");
    let expect_echo = !spec.body.is_empty();
    if expect_echo && let Err(e) = stream.write_all(&line).await {
        return Outcome::failed(ErrorKind::Protocol, format!("write: {e}"));
    }
    let mut got = BytesMut::new();
    let mut buf = [0u8; 8192];
    // Done when the echo of our line has arrived, or (no line sent) when a banner line has.
    let done = |got: &BytesMut| {
        if expect_echo {
            got.ends_with(&line)
        } else {
            got.contains(&b'\n')
        }
    };
    while !done(&got) {
        if got.len() >= MAX_TCP_READ {
            return tcp_failed(ErrorKind::EchoMismatch, "echo too long", got);
        }
        match stream.read(&mut buf).await {
            Ok(0) => return tcp_failed(ErrorKind::Eof, "connection closed before echo", got),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => return tcp_failed(ErrorKind::Protocol, format!("read: {e}"), got),
        }
    }
    let _ = stream.shutdown().await;
    let got = got.freeze();
    // Whatever precedes our echo is the banner `<pod> <version> <peer>`.
    let banner_end = if expect_echo {
        got.len() - line.len()
    } else {
        got.len()
    };
    let banner = String::from_utf8_lossy(&got[..banner_end]);
    let mut words = banner.lines().next().unwrap_or("").split_whitespace();
    let (pod, version, peer) = (words.next(), words.next(), words.next());
    Outcome {
        code: Some("ok".to_string()),
        success: true,
        pod: pod.map(str::to_string),
        version: version.map(str::to_string),
        peer: peer.map(str::to_string),
        body: got,
        error: None,
        latency: Duration::ZERO,
    }
}

fn tcp_failed(kind: ErrorKind, msg: impl Into<String>, got: BytesMut) -> Outcome {
    let mut o = Outcome::failed(kind, msg);
    o.body = got.freeze();
    o
}

/// Parses `Name: value` (or `Name:value`) into a header pair.
pub fn parse_header(s: &str) -> Result<(HeaderName, HeaderValue), String> {
    let (k, v) = s
        .split_once(':')
        .ok_or_else(|| format!("header {s:?} is not K:V"))?;
    let name = HeaderName::from_bytes(k.trim().as_bytes())
        .map_err(|e| format!("header name {k:?}: {e}"))?;
    let value = HeaderValue::from_str(v.trim()).map_err(|e| format!("header value {v:?}: {e}"))?;
    Ok((name, value))
}
