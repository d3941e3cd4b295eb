//! Making sure the pin root is a BPF filesystem.

use std::path::Path;

use nix::mount::{MsFlags, mount};
use nix::sys::statfs::{BPF_FS_MAGIC, statfs};

use crate::EbpfError;

/// Creates `root` and mounts a bpffs on it unless it already is (or lies on) one.
pub fn ensure(root: &Path) -> Result<(), EbpfError> {
    std::fs::create_dir_all(root)
        .map_err(|e| EbpfError::io(format!("creating {}", root.display()), e))?;
    let fs =
        statfs(root).map_err(|e| EbpfError::io(format!("statfs {}", root.display()), e.into()))?;
    if fs.filesystem_type() == BPF_FS_MAGIC {
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
