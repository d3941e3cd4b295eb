//! The plugin ↔ agent protocol: one JSON request line and one JSON response line over the
//! agent's Unix stream socket. The plugin is short-lived and synchronous, so the client side is
//! plain `std` with deadlines.

use std::io::{BufRead, BufReader, Write};
use std::net::IpAddr;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Where the agent listens for plugin requests unless configured otherwise.
pub const DEFAULT_AGENT_SOCKET: &str = "/var/run/mesh-cni/plugin.sock";
/// Largest request or response line accepted (bytes).
pub const MAX_MESSAGE: usize = 64 * 1024;

/// The CNI command being relayed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum PluginCommand {
    /// A pod's sandbox was created and wired by the primary plugin.
    Add,
    /// A pod's sandbox is going away.
    Del,
    /// The runtime asks whether the pod's setup is still intact.
    Check,
}

/// What the plugin tells the agent about one pod sandbox.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PluginRequest {
    /// ADD, DEL or CHECK.
    pub command: PluginCommand,
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_NETNS`: path of the pod's network namespace (may be empty on DEL).
    pub netns: String,
    /// `CNI_IFNAME`.
    pub ifname: String,
    /// `K8S_POD_NAMESPACE` from `CNI_ARGS`.
    pub pod_namespace: String,
    /// `K8S_POD_NAME` from `CNI_ARGS`.
    pub pod_name: String,
    /// `K8S_POD_UID` from `CNI_ARGS`, when the runtime passes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
    /// Pod IPs from the primary plugin's result.
    #[serde(default)]
    pub ips: Vec<IpAddr>,
}

/// How the agent handled a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Outcome {
    /// ADD: redirection is installed and the pod was handed to ztunnel (or queued for it).
    Enrolled,
    /// ADD/CHECK: the pod is not ambient; nothing was changed.
    NotAmbient,
    /// DEL: everything for the pod is removed.
    Removed,
    /// CHECK: the pod's redirection is intact.
    Verified,
    /// The agent could not do what was asked; `message` says why. The plugin fails the command.
    Failed,
}

/// The agent's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PluginResponse {
    /// What happened.
    pub outcome: Outcome,
    /// Human-readable detail (the error for `Failed`).
    #[serde(default)]
    pub message: String,
}

/// Failure to get an answer from the agent.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// The agent socket is missing or refused the connection (agent down).
    #[error("node agent unreachable at {path}: {source}")]
    Unreachable {
        /// The socket path tried.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Connected, but the exchange failed or timed out.
    #[error("node agent exchange failed: {0}")]
    Io(#[from] std::io::Error),
    /// The answer was not a valid response.
    #[error("node agent sent an invalid response: {0}")]
    Invalid(String),
}

/// Sends `req` to the agent at `socket` and waits up to `timeout` for each of connect/write/read.
pub fn call(
    socket: &Path,
    req: &PluginRequest,
    timeout: Duration,
) -> Result<PluginResponse, ProtocolError> {
    let stream = UnixStream::connect(socket).map_err(|source| ProtocolError::Unreachable {
        path: socket.display().to_string(),
        source,
    })?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut line = serde_json::to_vec(req).map_err(|e| ProtocolError::Invalid(e.to_string()))?;
    line.push(b'\n');
    (&stream).write_all(&line)?;
    let mut reader = BufReader::new((&stream).take_limited());
    let mut answer = String::new();
    reader.read_line(&mut answer)?;
    decode_line(answer.as_bytes())
}

/// Decodes one request or response line, rejecting oversized or malformed input.
pub fn decode_line<T: for<'de> Deserialize<'de>>(line: &[u8]) -> Result<T, ProtocolError> {
    if line.len() > MAX_MESSAGE {
        return Err(ProtocolError::Invalid(format!(
            "message of {} bytes exceeds {MAX_MESSAGE}",
            line.len()
        )));
    }
    serde_json::from_slice(line.trim_ascii()).map_err(|e| ProtocolError::Invalid(e.to_string()))
}

/// Encodes a message as one line.
pub fn encode_line<T: Serialize>(msg: &T) -> Vec<u8> {
    // Serializing these plain structs cannot fail.
    let mut v = serde_json::to_vec(msg).unwrap_or_default();
    v.push(b'\n');
    v
}

/// Bounds how much of a response the plugin reads.
trait TakeLimited: Sized {
    fn take_limited(self) -> std::io::Take<Self>;
}

impl<R: std::io::Read> TakeLimited for R {
    fn take_limited(self) -> std::io::Take<Self> {
        std::io::Read::take(self, MAX_MESSAGE as u64 + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req() -> PluginRequest {
        PluginRequest {
            command: PluginCommand::Add,
            container_id: "c1".into(),
            netns: "/var/run/netns/p".into(),
            ifname: "eth0".into(),
            pod_namespace: "default".into(),
            pod_name: "web".into(),
            pod_uid: None,
            ips: vec!["10.1.0.5".parse().unwrap()],
        }
    }

    #[test]
    fn request_round_trips_as_one_line() {
        let line = encode_line(&req());
        assert_eq!(line.iter().filter(|b| **b == b'\n').count(), 1);
        let back: PluginRequest = decode_line(&line).unwrap();
        assert_eq!(back, req());
    }

    #[test]
    fn unknown_fields_and_oversized_lines_are_rejected() {
        let err = decode_line::<PluginRequest>(br#"{"command":"ADD","bogus":1}"#).unwrap_err();
        assert!(matches!(err, ProtocolError::Invalid(_)), "{err}");
        let big = vec![b' '; MAX_MESSAGE + 1];
        assert!(decode_line::<PluginResponse>(&big).is_err());
    }

    #[test]
    fn missing_agent_socket_is_unreachable() {
        let err = call(
            Path::new("/nonexistent/mesh-cni.sock"),
            &req(),
            Duration::from_secs(1),
        )
        .unwrap_err();
        assert!(matches!(err, ProtocolError::Unreachable { .. }), "{err}");
    }
}
