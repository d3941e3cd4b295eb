//! Running `nft`/`ip` inside a pod's network namespace (setns in the forked child, so the
//! agent's own threads never change namespace), with a deadline, and probing a namespace from
//! a short-lived thread.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncWriteExt;

use super::rules::RulesError;

/// A hung `nft`/`ip` must not stall enrollment forever.
pub(super) const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs `f` on a new OS thread that ends afterwards, so namespace changes it makes never leak
/// into tokio's threads.
pub(super) async fn on_fresh_thread<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("netns-probe".into())
        .spawn(move || {
            let _ = tx.send(f());
        })?;
    rx.await
        .map_err(|_| io::Error::other("netns thread ended without a result"))?
}

pub(super) fn command_line(program: &str, args: &[&str]) -> String {
    std::iter::once(program)
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ")
}

pub(super) fn failed(program: &str, args: &[&str], out: &std::process::Output) -> RulesError {
    RulesError::Failed {
        command: command_line(program, args),
        status: out.status,
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
    }
}

/// Runs `program` inside `ns`, returning stdout or an error naming the command.
pub(super) async fn run_ok(
    ns: BorrowedFd<'_>,
    program: &str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<String, RulesError> {
    let out = run(ns, program, args, stdin).await?;
    if !out.status.success() {
        return Err(failed(program, args, &out));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `program` inside `ns` and returns its output whatever the exit status.
pub(super) async fn run(
    ns: BorrowedFd<'_>,
    program: &str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<std::process::Output, RulesError> {
    let command = || command_line(program, args);
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let fd = ns.as_raw_fd();
    // SAFETY: the closure runs in the forked child before exec and only makes the setns syscall
    // and reads errno, both async-signal-safe. `fd` is borrowed, so it stays open in the parent
    // (and thus in the child) until spawn returns.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) == 0 {
                Ok(())
            } else {
                Err(io::Error::last_os_error())
            }
        });
    }
    let mut child = cmd.spawn().map_err(|source| RulesError::Spawn {
        command: command(),
        source,
    })?;
    let input = child.stdin.take();
    let finish = async move {
        if let (Some(mut pipe), Some(text)) = (input, stdin) {
            // A write error means the child exited early; its status and stderr tell why.
            let _ = pipe.write_all(text.as_bytes()).await;
        }
        child.wait_with_output().await
    };
    match tokio::time::timeout(COMMAND_TIMEOUT, finish).await {
        Ok(Ok(out)) => Ok(out),
        Ok(Err(source)) => Err(RulesError::Spawn {
            command: command(),
            source,
        }),
        Err(_) => Err(RulesError::Timeout { command: command() }),
    }
}
