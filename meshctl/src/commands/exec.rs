//! `meshctl sandbox exec`: runs a command inside a pod's network namespace with the pod's
//! environment and /etc/hosts, passing its output and exit code through.

use std::os::unix::process::ExitStatusExt;
use std::process::{Command, ExitCode};

use anyhow::{Context, anyhow, bail};

use super::{load_running, require_root};
use crate::cli::ExecArgs;
use crate::netns;
use crate::pods::container_env;
use crate::state::{NsName, State, StateDir};

/// Runs `exec`; the exit code is the command's (128 + signal if it was killed).
pub fn run(dir: &StateDir, args: ExecArgs) -> anyhow::Result<ExitCode> {
    require_root()?;
    let state = load_running(dir)?;
    let target: NsName = args.target.parse().map_err(|e: String| anyhow!(e))?;
    let pod = find(&state, &target)?;
    if !netns::exists(&pod.netns) {
        bail!(
            "the network namespace {} of pod {} is gone",
            pod.netns,
            pod.id
        );
    }
    let mut env = container_env(&state, pod, pod.spec.containers.first());
    if let Ok(term) = std::env::var("TERM") {
        env.push(("TERM".into(), term));
    }
    let status = Command::new("ip")
        .args(["netns", "exec", &pod.netns])
        .args(&args.command)
        .env_clear()
        .envs(env)
        .status()
        .with_context(|| format!("running {:?} in pod {}", args.command, pod.id))?;
    let code = status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1);
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
}

/// The pod for `target`, or an error listing the pods there are.
pub fn find<'a>(state: &'a State, target: &NsName) -> anyhow::Result<&'a crate::state::PodState> {
    state.find_pod(target).ok_or_else(|| {
        let names: Vec<String> = state.pods.keys().map(ToString::to_string).collect();
        anyhow!(
            "no pod or deployment {target} (pods: {})",
            if names.is_empty() {
                "none".to_string()
            } else {
                names.join(", ")
            }
        )
    })
}
