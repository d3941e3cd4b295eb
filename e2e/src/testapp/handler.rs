//! The request handler behind every HTTP/gRPC port: describes the request as JSON, optionally
//! after calling upstreams, with test knobs for status and delay.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use serde_json::{Map, Value, json};

use super::Identity;
use super::client::{RequestSpec, Target, request_once};
use super::grpc;

/// Response body type used by the server.
pub type ReplyBody = BoxBody<Bytes, Infallible>;

/// Header that overrides the reply status (`x-testapp-status: 503`).
pub const STATUS_HEADER: &str = "x-testapp-status";
/// Header that sets the grpc-status of a gRPC reply.
pub const GRPC_STATUS_HEADER: &str = "x-testapp-grpc-status";
/// Header that delays the reply (`x-testapp-delay: 300ms`, capped at [`MAX_DELAY`]).
pub const DELAY_HEADER: &str = "x-testapp-delay";
/// Hop counter that stops upstream loops (A calls B calls A ...).
pub const HOPS_HEADER: &str = "x-testapp-hops";
/// Upstream calls stop at this depth.
pub const MAX_HOPS: u32 = 8;
/// Longest delay a request may ask for.
pub const MAX_DELAY: Duration = Duration::from_secs(60);

/// Headers copied from the incoming request to upstream calls (tracing context).
const PROPAGATED: &[&str] = &[
    "x-request-id",
    "traceparent",
    "tracestate",
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
];

/// Shared, read-only server configuration used by every request.
#[derive(Debug)]
pub struct HandlerState {
    /// Who this server claims to be.
    pub identity: Identity,
    /// Upstreams called on every request.
    pub upstreams: Vec<Target>,
    /// Deadline for each upstream call.
    pub upstream_timeout: Duration,
    /// Use h2c for http:// upstreams.
    pub upstream_http2: bool,
    /// Reply 502 when any upstream failed.
    pub fail_on_upstream_error: bool,
    /// Largest request body accepted.
    pub max_body: usize,
}

/// Where the request arrived and from whom.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    /// Remote address as the server saw it.
    pub peer: SocketAddr,
    /// Local address of the accepted socket.
    pub local: SocketAddr,
}

/// Serves one request; never fails (errors become JSON replies).
pub async fn handle(
    state: Arc<HandlerState>,
    conn: ConnInfo,
    req: Request<Incoming>,
) -> Result<Response<ReplyBody>, Infallible> {
    let is_grpc = grpc::is_grpc(req.headers());
    let (parts, body) = req.into_parts();
    let mut reply = describe(&state, conn, &parts);

    let status = match requested_status(&parts) {
        Ok(s) => s,
        Err(msg) => {
            return Ok(error_reply(
                is_grpc,
                reply,
                StatusCode::BAD_REQUEST,
                grpc::STATUS_INVALID_ARGUMENT,
                msg,
            ));
        }
    };
    let delay = match requested_delay(&parts.headers) {
        Ok(d) => d,
        Err(msg) => {
            return Ok(error_reply(
                is_grpc,
                reply,
                StatusCode::BAD_REQUEST,
                grpc::STATUS_INVALID_ARGUMENT,
                msg,
            ));
        }
    };

    let body = match Limited::new(body, state.max_body).collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) => {
            let msg = format!("request body: {e}");
            return Ok(error_reply(
                is_grpc,
                reply,
                StatusCode::PAYLOAD_TOO_LARGE,
                grpc::STATUS_RESOURCE_EXHAUSTED,
                msg,
            ));
        }
    };
    reply.insert("body_len".into(), json!(body.len()));
    if is_grpc {
        match grpc::decode_unary(body) {
            Ok(msg) => {
                reply.insert("message".into(), json!(String::from_utf8_lossy(&msg)));
            }
            Err(e) => {
                let code = match e {
                    grpc::FrameError::Compressed => grpc::STATUS_UNIMPLEMENTED,
                    _ => grpc::STATUS_INTERNAL,
                };
                return Ok(error_reply(
                    true,
                    reply,
                    StatusCode::BAD_REQUEST,
                    code,
                    e.to_string(),
                ));
            }
        }
    }

    if let Some(d) = delay {
        tokio::time::sleep(d).await;
    }

    let (upstream, upstream_failed) = call_upstreams(&state, &parts.headers).await;
    reply.insert("upstream".into(), Value::Array(upstream));
    let status = if upstream_failed && state.fail_on_upstream_error {
        StatusCode::BAD_GATEWAY
    } else {
        status
    };

    if is_grpc {
        let code = match requested_grpc_status(&parts.headers) {
            Ok(c) => c,
            Err(msg) => {
                return Ok(error_reply(
                    true,
                    reply,
                    StatusCode::BAD_REQUEST,
                    grpc::STATUS_INVALID_ARGUMENT,
                    msg,
                ));
            }
        };
        let code = if code == grpc::STATUS_OK && !status.is_success() {
            http_to_grpc(status)
        } else {
            code
        };
        Ok(grpc_reply(reply, code, None))
    } else {
        Ok(json_reply(status, &Value::Object(reply)))
    }
}

/// The JSON description of the request every reply starts from.
fn describe(
    state: &HandlerState,
    conn: ConnInfo,
    parts: &http::request::Parts,
) -> Map<String, Value> {
    let mut headers = Map::new();
    for name in parts.headers.keys() {
        let joined = parts
            .headers
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect::<Vec<_>>()
            .join(", ");
        headers.insert(name.as_str().to_string(), Value::String(joined));
    }
    let id = &state.identity;
    let mut m = Map::new();
    m.insert("pod".into(), json!(id.pod));
    m.insert("namespace".into(), json!(id.namespace));
    m.insert("version".into(), json!(id.version));
    m.insert("peer".into(), json!(conn.peer.to_string()));
    m.insert("local".into(), json!(conn.local.to_string()));
    m.insert("method".into(), json!(parts.method.as_str()));
    m.insert(
        "path".into(),
        json!(
            parts
                .uri
                .path_and_query()
                .map(|p| p.as_str())
                .unwrap_or("/")
        ),
    );
    m.insert("protocol".into(), json!(format!("{:?}", parts.version)));
    m.insert("headers".into(), Value::Object(headers));
    m.insert("upstream".into(), Value::Array(Vec::new()));
    m
}

fn parse_status(s: &str) -> Result<StatusCode, String> {
    s.trim()
        .parse::<u16>()
        .ok()
        .filter(|c| (200..=599).contains(c))
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or_else(|| format!("status {s:?} is not a number in 200..=599"))
}

/// Status requested by path `/status/NNN` or the [`STATUS_HEADER`]; the header wins.
fn requested_status(parts: &http::request::Parts) -> Result<StatusCode, String> {
    if let Some(v) = parts.headers.get(STATUS_HEADER) {
        return parse_status(
            v.to_str()
                .map_err(|_| "non-ASCII status header".to_string())?,
        );
    }
    match parts.uri.path().strip_prefix("/status/") {
        Some(code) => parse_status(code.trim_end_matches('/')),
        None => Ok(StatusCode::OK),
    }
}

fn requested_grpc_status(headers: &HeaderMap) -> Result<u32, String> {
    let Some(v) = headers.get(GRPC_STATUS_HEADER) else {
        return Ok(grpc::STATUS_OK);
    };
    v.to_str()
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .filter(|c| *c <= grpc::STATUS_MAX)
        .ok_or_else(|| format!("{GRPC_STATUS_HEADER} must be 0..={}", grpc::STATUS_MAX))
}

fn requested_delay(headers: &HeaderMap) -> Result<Option<Duration>, String> {
    let Some(v) = headers.get(DELAY_HEADER) else {
        return Ok(None);
    };
    let s = v
        .to_str()
        .map_err(|_| "non-ASCII delay header".to_string())?;
    let d = super::parse_duration(s).map_err(|e| format!("{DELAY_HEADER}: {e}"))?;
    Ok(Some(d.min(MAX_DELAY)))
}

/// Maps an HTTP status override onto a gRPC status for gRPC callers.
fn http_to_grpc(status: StatusCode) -> u32 {
    match status.as_u16() {
        400 => 3,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502..=504 => 14,
        _ => 2,
    }
}

/// Calls every upstream concurrently; returns their reports and whether any failed.
async fn call_upstreams(state: &HandlerState, incoming: &HeaderMap) -> (Vec<Value>, bool) {
    if state.upstreams.is_empty() {
        return (Vec::new(), false);
    }
    let hops = incoming
        .get(HOPS_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.parse::<u32>().ok())
        .unwrap_or(0);
    if hops >= MAX_HOPS {
        let reports = state
            .upstreams
            .iter()
            .map(|t| json!({"url": t.url, "ok": false, "error": format!("hop-limit: {hops} hops reached")}))
            .collect();
        return (reports, true);
    }
    let mut headers: Vec<(HeaderName, HeaderValue)> = PROPAGATED
        .iter()
        .filter_map(|name| {
            let v = incoming.get(*name)?;
            Some((HeaderName::from_static(name), v.clone()))
        })
        .collect();
    headers.push((
        HeaderName::from_static(HOPS_HEADER),
        HeaderValue::from(hops + 1),
    ));
    let spec = RequestSpec {
        method: Method::GET,
        headers,
        body: Bytes::new(),
        http2: state.upstream_http2,
        timeout: state.upstream_timeout,
    };
    let calls = state.upstreams.iter().map(|target| {
        let spec = &spec;
        async move {
            let out = request_once(target, spec, &mut None, false).await;
            let body = serde_json::from_slice::<Value>(&out.body)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&out.body).into_owned()));
            let mut r = json!({
                "url": target.url,
                "code": out.code,
                "ok": out.success,
                "latency_ms": out.latency.as_millis() as u64,
                "body": body,
            });
            if let Some((kind, msg)) = &out.error {
                r["error"] = json!(format!("{}: {msg}", kind.as_str()));
            }
            (r, out.success)
        }
    });
    let results = futures::future::join_all(calls).await;
    let failed = results.iter().any(|(_, ok)| !ok);
    (results.into_iter().map(|(r, _)| r).collect(), failed)
}

fn json_reply(status: StatusCode, body: &Value) -> Response<ReplyBody> {
    let mut bytes = serde_json::to_vec(body).unwrap_or_default();
    bytes.push(b'\n');
    let mut resp = Response::new(Full::new(Bytes::from(bytes)).boxed());
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// A gRPC reply: HTTP 200, the JSON as the single message when OK, status in trailers.
fn grpc_reply(
    reply: Map<String, Value>,
    code: u32,
    message: Option<String>,
) -> Response<ReplyBody> {
    let mut frames: Vec<Result<Frame<Bytes>, Infallible>> = Vec::new();
    if code == grpc::STATUS_OK {
        let json = serde_json::to_vec(&Value::Object(reply)).unwrap_or_default();
        match grpc::encode(&json) {
            Ok(b) => frames.push(Ok(Frame::data(b))),
            Err(e) => return grpc_reply(Map::new(), grpc::STATUS_INTERNAL, Some(e.to_string())),
        }
    }
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from(code));
    if let Some(msg) = message.and_then(|m| HeaderValue::from_str(&percent_encode(&m)).ok()) {
        trailers.insert("grpc-message", msg);
    }
    frames.push(Ok(Frame::trailers(trailers)));
    let body = StreamBody::new(futures::stream::iter(frames)).boxed();
    let mut resp = Response::new(body);
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static(grpc::CONTENT_TYPE),
    );
    resp
}

/// grpc-message is percent-encoded outside printable ASCII (and `%` itself).
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn error_reply(
    is_grpc: bool,
    mut reply: Map<String, Value>,
    status: StatusCode,
    grpc_code: u32,
    msg: String,
) -> Response<ReplyBody> {
    if is_grpc {
        grpc_reply(reply, grpc_code, Some(msg))
    } else {
        reply.insert("error".into(), json!(msg));
        json_reply(status, &Value::Object(reply))
    }
}
