//! Making sure the pin root is a BPF filesystem.

use std::path::Path;

use nix::fcntl::{Flock, FlockArg};
use nix::mount::{MsFlags, mount};
use nix::sys::statfs::{BPF_FS_MAGIC, statfs};

use crate::EbpfError;

/// Creates `root` and mounts a bpffs on it unless it already is (or lies on) one.
///
/// Check and mount happen under an exclusive lock on a file beside `root`: two processes
/// racing here (agents, tests) would otherwise both mount, and the second mount would hide
/// what the first one's users had pinned.
pub fn ensure(root: &Path) -> Result<(), EbpfError> {
    let io = |what: String| move |e: std::io::Error| EbpfError::io(what, e);
    std::fs::create_dir_all(root).map_err(io(format!("creating {}", root.display())))?;
    if is_bpffs(root)? {
        return Ok(());
    }
    let lock_path = root.with_extension("lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io(format!("opening {}", lock_path.display())))?;
    let _lock = Flock::lock(file, FlockArg::LockExclusive)
        .map_err(|(_, e)| EbpfError::io(format!("locking {}", lock_path.display()), e.into()))?;
    if is_bpffs(root)? {
        return Ok(());
    }
    mount(
        Some("bpf"),
        root,
        Some("bpf"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(|e| EbpfError::io(format!("mounting bpffs on {}", root.display()), e.into()))
}

fn is_bpffs(path: &Path) -> Result<bool, EbpfError> {
    let fs =
        statfs(path).map_err(|e| EbpfError::io(format!("statfs {}", path.display()), e.into()))?;
    Ok(fs.filesystem_type() == BPF_FS_MAGIC)
}
