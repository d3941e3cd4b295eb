//! `meshctl sandbox logs`: prints component and pod logs from the state directory, optionally
//! following them.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail};

use crate::cli::LogsArgs;
use crate::state::{NsName, State, StateDir};

/// Runs `logs`.
pub fn run(dir: &StateDir, args: LogsArgs) -> anyhow::Result<()> {
    let state = dir.load()?;
    let files = resolve(dir, &state, &args.component)?;
    let prefixed = files.len() > 1;
    let mut offsets = Vec::new();
    let mut out = std::io::stdout().lock();
    for (label, path) in &files {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow!("reading {}: {e}", path.display()))?;
        let lines: Vec<&str> = text.lines().collect();
        let from = args.tail.map_or(0, |n| lines.len().saturating_sub(n));
        for l in &lines[from..] {
            write_line(&mut out, prefixed.then_some(label.as_str()), l)?;
        }
        offsets.push(text.len() as u64);
    }
    if !args.follow {
        return Ok(());
    }
    let mut partial: Vec<String> = vec![String::new(); files.len()];
    loop {
        for (i, (label, path)) in files.iter().enumerate() {
            let Ok(mut f) = std::fs::File::open(path) else {
                continue;
            };
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            if len < offsets[i] {
                offsets[i] = 0; // truncated or replaced
            }
            if len == offsets[i] {
                continue;
            }
            f.seek(SeekFrom::Start(offsets[i]))?;
            let mut buf = Vec::new();
            f.read_to_end(&mut buf)?;
            offsets[i] += buf.len() as u64;
            partial[i].push_str(&String::from_utf8_lossy(&buf));
            while let Some(pos) = partial[i].find('\n') {
                let line: String = partial[i].drain(..=pos).collect();
                write_line(
                    &mut out,
                    prefixed.then_some(label.as_str()),
                    line.trim_end_matches('\n'),
                )?;
            }
        }
        out.flush()?;
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn write_line(out: &mut impl Write, label: Option<&str>, line: &str) -> std::io::Result<()> {
    match label {
        Some(l) => writeln!(out, "[{l}] {line}"),
        None => writeln!(out, "{line}"),
    }
}

/// (label, file) pairs for a component name.
fn resolve(
    dir: &StateDir,
    state: &State,
    component: &str,
) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let nodes: Vec<&str> = state.nodes.iter().map(|n| n.name.as_str()).collect();
    let per_node = |kind: &str| -> Vec<(String, PathBuf)> {
        nodes
            .iter()
            .map(|n| (n.to_string(), dir.log(&format!("{kind}-{n}"))))
            .collect()
    };
    let files = match component {
        "controller" => vec![("controller".to_string(), dir.log("controller"))],
        "agent" | "ztunnel" | "cni" => per_node(component),
        c if c.contains('/') => {
            let target: NsName = c.parse().map_err(|e: String| anyhow!(e))?;
            let pod = super::exec::find(state, &target)?;
            vec![(
                pod.id.to_string(),
                dir.pod_log(&pod.id.namespace, &pod.id.name),
            )]
        }
        c => {
            let known = ["agent-", "ztunnel-", "cni-"]
                .iter()
                .any(|p| c.strip_prefix(p).is_some_and(|n| nodes.contains(&n)));
            if !known {
                bail!(
                    "unknown component {c:?}: use controller, agent[-<node>], ztunnel[-<node>], \
                     cni[-<node>] or <namespace>/<pod> (nodes: {})",
                    nodes.join(", ")
                );
            }
            vec![(c.to_string(), dir.log(c))]
        }
    };
    // cni-<node>.log exists only once the plugin ran; other logs exist from the start.
    Ok(files
        .into_iter()
        .filter(|(_, p)| p.exists() || !p.to_string_lossy().contains("/cni-"))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::network::plan_node;

    #[test]
    fn components_resolve_to_log_files() {
        let dir = StateDir::new("/s");
        let mut state = State::new("/b".into(), "/c".into(), "info".into());
        state.nodes = vec![plan_node(0), plan_node(1)];
        let f = resolve(&dir, &state, "agent").unwrap();
        assert_eq!(f.len(), 2);
        assert_eq!(f[1].1, PathBuf::from("/s/logs/agent-node1.log"));
        let z = resolve(&dir, &state, "ztunnel-node0").unwrap();
        assert_eq!(z[0].1, PathBuf::from("/s/logs/ztunnel-node0.log"));
        assert!(resolve(&dir, &state, "ztunnel-node9").is_err());
        assert!(resolve(&dir, &state, "demo/nothing").is_err());
    }
}
