//! The plugin socket: one request line in, one response line out, per connection.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::enroll::Enroller;
use crate::protocol::{
    MAX_MESSAGE, Outcome, PluginRequest, PluginResponse, decode_line, encode_line,
};

/// How long a plugin may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Plugin requests handled at once; more wait in the accept backlog.
const MAX_CONCURRENT: usize = 64;

/// Binds the plugin socket (replacing a stale one), readable only by root.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let l = UnixListener::bind(path)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

/// Serves plugin requests until `shutdown`.
pub async fn serve(listener: UnixListener, enroller: Arc<Enroller>, shutdown: CancellationToken) {
    let mut tasks = JoinSet::new();
    loop {
        tokio::select! {
            r = listener.accept(), if tasks.len() < MAX_CONCURRENT => match r {
                Ok((stream, _)) => {
                    tasks.spawn(handle(stream, enroller.clone()));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a plugin connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            _ = shutdown.cancelled() => break,
        }
    }
    // Let in-flight requests finish: a half-done ADD would leave the runtime guessing.
    while tasks.join_next().await.is_some() {}
}

async fn handle(stream: UnixStream, enroller: Arc<Enroller>) {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read.take(MAX_MESSAGE as u64 + 1));
    let mut line = Vec::new();
    let response =
        match tokio::time::timeout(READ_TIMEOUT, reader.read_until(b'\n', &mut line)).await {
            Err(_) => failed("request not received in time".into()),
            Ok(Err(e)) => failed(format!("reading request: {e}")),
            Ok(Ok(_)) => match decode_line::<PluginRequest>(&line) {
                Ok(req) => enroller.handle(req).await,
                Err(e) => {
                    tracing::warn!(error = %e, "malformed plugin request");
                    failed(e.to_string())
                }
            },
        };
    let _ = write.write_all(&encode_line(&response)).await;
}

fn failed(message: String) -> PluginResponse {
    PluginResponse {
        outcome: Outcome::Failed,
        message,
    }
}
