//! `meshctl sandbox` subcommands.

pub mod apply;
pub mod delete;
pub mod down;
pub mod exec;
pub mod get;
pub mod logs;
pub mod metrics;
pub mod restart;
pub mod up;
pub mod upgrade;

use std::fs::File;
use std::process::ExitCode;

use anyhow::bail;
use nix::fcntl::Flock;

use crate::cli::{SandboxArgs, SandboxCommand};
use crate::state::{State, StateDir};

/// Runs a sandbox subcommand.
pub fn run(args: SandboxArgs) -> anyhow::Result<ExitCode> {
    let dir = StateDir::new(&args.state_dir);
    match args.command {
        SandboxCommand::Up(a) => up::run(&dir, a).map(|_| ExitCode::SUCCESS),
        SandboxCommand::Apply(a) => apply::run(&dir, a).map(|_| ExitCode::SUCCESS),
        SandboxCommand::Delete(a) => delete::run(&dir, a).map(|_| ExitCode::SUCCESS),
        SandboxCommand::Exec(a) => exec::run(&dir, a),
        SandboxCommand::Get(a) => get::run(&dir, a).map(|_| ExitCode::SUCCESS),
        SandboxCommand::Logs(a) => logs::run(&dir, a).map(|_| ExitCode::SUCCESS),
        SandboxCommand::Metrics(a) => metrics::run(&dir, a).map(|_| ExitCode::SUCCESS),
        SandboxCommand::Restart(a) => restart::run(&dir, a).map(|_| ExitCode::SUCCESS),
        SandboxCommand::Upgrade(a) => upgrade::run(&dir, a).map(|_| ExitCode::SUCCESS),
        SandboxCommand::Down(a) => down::run(&dir, a).map(|_| ExitCode::SUCCESS),
    }
}

/// Fails unless running as root (namespaces, veths and nft need it).
pub fn require_root() -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "meshctl sandbox must run as root: it creates network namespaces, links and nft \
             rules (try `sudo meshctl sandbox ...`)"
        );
    }
    Ok(())
}

/// A running sandbox, locked for a mutating command.
pub struct Session {
    /// Paths.
    pub dir: StateDir,
    /// State.
    pub state: State,
    _lock: Flock<File>,
}

impl Session {
    /// Locks and loads a sandbox that finished `up`.
    pub fn open(dir: &StateDir) -> anyhow::Result<Self> {
        require_root()?;
        let lock = dir.lock()?;
        let state = load_running(dir)?;
        Ok(Self {
            dir: dir.clone(),
            state,
            _lock: lock,
        })
    }
}

/// Loads the state of a sandbox that finished `up` and whose controller still runs.
pub fn load_running(dir: &StateDir) -> anyhow::Result<State> {
    let state = dir.load()?;
    if !state.ready {
        bail!(
            "the sandbox in {} did not finish starting (crashed `up`?); run `meshctl sandbox down` and start again",
            dir.root().display()
        );
    }
    if !state.controller.is_some_and(|c| c.alive()) {
        bail!(
            "the sandbox controller in {} is not running (host rebooted or processes killed?); \
             run `meshctl sandbox down` and start again",
            dir.root().display()
        );
    }
    Ok(state)
}
