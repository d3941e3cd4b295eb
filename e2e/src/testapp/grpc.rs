//! Hand-rolled gRPC message framing: a 1-byte compression flag, a 4-byte big-endian length,
//! then the message. Enough for one unary method without protobuf codegen.

use bytes::{BufMut, Bytes, BytesMut};
use http::HeaderMap;

/// Content type that marks a request as gRPC.
pub const CONTENT_TYPE: &str = "application/grpc";
/// Default unary method the `call` command invokes for `grpc://` URLs.
pub const ECHO_PATH: &str = "/testapp.Echo/Echo";
/// Length of the prefix in front of every gRPC message.
pub const PREFIX_LEN: usize = 5;

/// gRPC status `OK`.
pub const STATUS_OK: u32 = 0;
/// gRPC status `INVALID_ARGUMENT`.
pub const STATUS_INVALID_ARGUMENT: u32 = 3;
/// gRPC status `RESOURCE_EXHAUSTED`.
pub const STATUS_RESOURCE_EXHAUSTED: u32 = 8;
/// gRPC status `UNIMPLEMENTED`.
pub const STATUS_UNIMPLEMENTED: u32 = 12;
/// gRPC status `INTERNAL`.
pub const STATUS_INTERNAL: u32 = 13;
/// Highest defined gRPC status code (`UNAUTHENTICATED`).
pub const STATUS_MAX: u32 = 16;

/// Why a gRPC body could not be framed or unframed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// The body ended inside a prefix or a message.
    #[error("truncated gRPC frame")]
    Truncated,
    /// The compressed flag was set; no compression is negotiated here.
    #[error("compressed gRPC messages are not supported")]
    Compressed,
    /// A unary call carries exactly one message.
    #[error("expected one gRPC message, found {0}")]
    MessageCount(usize),
    /// The message does not fit the 32-bit length prefix.
    #[error("gRPC message too large")]
    TooLarge,
}

/// True when the headers carry a gRPC content type (`application/grpc` or `application/grpc+…`).
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| {
            ct == CONTENT_TYPE
                || ct.starts_with("application/grpc+")
                || ct.starts_with("application/grpc;")
        })
}

/// Frames one uncompressed message.
pub fn encode(msg: &[u8]) -> Result<Bytes, FrameError> {
    let len = u32::try_from(msg.len()).map_err(|_| FrameError::TooLarge)?;
    let mut buf = BytesMut::with_capacity(PREFIX_LEN + msg.len());
    buf.put_u8(0);
    buf.put_u32(len);
    buf.put_slice(msg);
    Ok(buf.freeze())
}

/// Splits a body into its messages, rejecting compressed or truncated frames.
pub fn decode_all(mut body: Bytes) -> Result<Vec<Bytes>, FrameError> {
    let mut out = Vec::new();
    while !body.is_empty() {
        if body.len() < PREFIX_LEN {
            return Err(FrameError::Truncated);
        }
        if body[0] != 0 {
            return Err(FrameError::Compressed);
        }
        let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
        let rest = body.split_off(PREFIX_LEN);
        body = rest;
        if body.len() < len {
            return Err(FrameError::Truncated);
        }
        let tail = body.split_off(len);
        out.push(body);
        body = tail;
    }
    Ok(out)
}

/// Decodes the single message of a unary request.
pub fn decode_unary(body: Bytes) -> Result<Bytes, FrameError> {
    let mut msgs = decode_all(body)?;
    if msgs.len() != 1 {
        return Err(FrameError::MessageCount(msgs.len()));
    }
    msgs.pop().ok_or(FrameError::MessageCount(0))
}

/// Reads `grpc-status` from trailers, falling back to headers (a trailers-only response).
pub fn status_of(headers: &HeaderMap, trailers: Option<&HeaderMap>) -> Option<u32> {
    let parse = |h: &HeaderMap| {
        h.get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.trim().parse::<u32>().ok())
    };
    trailers.and_then(parse).or_else(|| parse(headers))
}
