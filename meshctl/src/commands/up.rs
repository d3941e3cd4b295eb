//! `meshctl sandbox up`: underlay, controller, nodes (agent + ztunnel each), then manifests.
//! State is saved after every step so `down` can undo a partial start.

use std::os::unix::fs::PermissionsExt;
use std::time::Instant;

use anyhow::{Context, bail};

use super::{apply, require_root};
use crate::cli::UpArgs;
use crate::components::{self, Started};
use crate::ids::new_token;
use crate::network::{self, CONTROL_PLANE_NETNS, CONTROLLER_IP, UNDERLAY_NETNS};
use crate::state::{State, StateDir};
use crate::{cni, kubeproxy, manifests, netns};

/// Runs `up`.
pub fn run(dir: &StateDir, args: UpArgs) -> anyhow::Result<()> {
    require_root()?;
    let bin_dir = match &args.bin_dir {
        Some(d) => d.clone(),
        None => components::default_bin_dir()?,
    };
    let bin_dir = bin_dir.canonicalize().unwrap_or(bin_dir);
    components::check_binaries(&bin_dir, &args.cni_bin_dir)?;
    // Manifests are checked before anything is created.
    let docs = manifests::load(&args.files)?;
    let _lock = dir.lock()?;
    if dir.state_file().exists() {
        bail!(
            "a sandbox already exists in {} (state.json); run `meshctl sandbox down` first",
            dir.root().display()
        );
    }
    let leftovers = netns::ours();
    if !leftovers.is_empty() {
        bail!(
            "network namespaces of an earlier sandbox still exist ({}); run `meshctl sandbox down` first",
            leftovers.join(", ")
        );
    }
    let mut state = State::new(bin_dir, args.cni_bin_dir.clone(), args.log_level.clone());
    state.redirect_mode = args.redirect_mode;
    match start(dir, &mut state, &args) {
        Ok(()) => {}
        Err(e) => {
            return Err(e.context(format!(
                "sandbox up failed (logs in {}; clean up with `meshctl sandbox down`)",
                dir.logs_dir().display()
            )));
        }
    }
    if !docs.is_empty() {
        println!("Applying manifests");
        apply::apply(dir, &mut state, docs, args.timeout)?;
    }
    summary(dir, &state);
    Ok(())
}

fn start(dir: &StateDir, state: &mut State, args: &UpArgs) -> anyhow::Result<()> {
    let t0 = Instant::now();
    for d in [
        dir.cluster_dir(),
        dir.ca_dir(),
        dir.logs_dir().join("pods"),
        dir.root().join("tokens"),
    ] {
        std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    }
    dir.save(state)?;
    println!(
        "Starting sandbox with {} node(s); state in {}",
        args.nodes,
        dir.root().display()
    );

    state.remember_netns(UNDERLAY_NETNS);
    state.remember_netns(CONTROL_PLANE_NETNS);
    dir.save(state)?;
    network::create_underlay()?;
    network::create_control_plane()?;
    println!("  network: {UNDERLAY_NETNS} (bridge), {CONTROL_PLANE_NETNS} ({CONTROLLER_IP})");

    let nodes: Vec<_> = (0..args.nodes).map(network::plan_node).collect();
    write_tokens(dir, &nodes)?;
    let mut controller = components::start_controller(dir, state)?;
    state.controller = Some(controller.record);
    dir.save(state)?;
    let took = components::wait_ready(&mut controller, args.timeout)?;
    println!(
        "  controller: ready in {:.1}s (pid {}, xDS/CA https://{CONTROLLER_IP}:15012)",
        took.as_secs_f64(),
        controller.record.pid
    );

    for n in &nodes {
        state.remember_netns(&n.netns);
    }
    state.nodes = nodes.clone();
    dir.save(state)?;
    let mut started: Vec<(usize, Started, Started)> = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        network::create_node(n, &nodes)?;
        for d in [
            dir.run_dir(&n.name),
            dir.ipam_dir(&n.name),
            dir.agent_state(&n.name),
        ] {
            std::fs::create_dir_all(&d)?;
        }
        cni::write_conflist(dir, n)?;
        let agent = components::start_agent(dir, state, n)?;
        state.nodes[i].agent = Some(agent.record);
        dir.save(state)?;
        let zt = components::start_ztunnel(dir, state, n)?;
        state.nodes[i].ztunnel = Some(zt.record);
        dir.save(state)?;
        started.push((i, agent, zt));
    }
    for (i, mut agent, mut zt) in started {
        let ta = components::wait_ready(&mut agent, args.timeout)?;
        let tz = components::wait_ready(&mut zt, args.timeout)?;
        let n = &state.nodes[i];
        println!(
            "  {}: {} ({}, pods {}/24): agent ready in {:.1}s, ztunnel ready in {:.1}s",
            n.name,
            n.netns,
            n.ip,
            n.pod_subnet,
            ta.as_secs_f64(),
            tz.as_secs_f64()
        );
    }
    kubeproxy::refresh_all(dir, state)?;
    state.ready = true;
    dir.save(state)?;
    println!("Sandbox up in {:.1}s", t0.elapsed().as_secs_f64());
    Ok(())
}

/// Node tokens for the controller and each ztunnel's token file (mode 0600).
fn write_tokens(dir: &StateDir, nodes: &[crate::state::NodeState]) -> anyhow::Result<()> {
    let mut yaml = String::from("nodes:\n");
    for n in nodes {
        let token = new_token()?;
        yaml.push_str(&format!("  {}: {token}\n", n.name));
        let path = dir.token(&n.name);
        std::fs::write(&path, &token)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    }
    std::fs::write(dir.node_tokens(), yaml)?;
    std::fs::set_permissions(dir.node_tokens(), std::fs::Permissions::from_mode(0o600))?;
    Ok(())
}

fn summary(dir: &StateDir, state: &State) {
    let root = dir.root().display();
    println!();
    println!(
        "Sandbox ready: controller + {} node(s), {} pod(s).",
        state.nodes.len(),
        state.pods.len()
    );
    println!("  state:   {root}/state.json");
    println!("  objects: {root}/cluster (watched by the controller and node agents)");
    println!(
        "  logs:    {root}/logs (controller.log, agent-<node>.log, ztunnel-<node>.log, pods/)"
    );
    println!("Next: meshctl sandbox get pods | exec <ns>/<pod> -- CMD | logs <component> | down");
}
