//! Step 3: serve the state, start the client process, wait for every client to sync, then
//! change pods one at a time and collect when each client saw each change.

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use controller::app::push;
use controller::config::{ConfigEvent, Object};
use controller::model::Model;
use controller::xds::{XdsServer, serve};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpListener;
use tokio::process::Command;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::objects::ClusterSpec;
use super::stats::{Memory, Summary, cpu_time, memory, now_ns, summarize};

/// Longest wait for every client to see one change.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(5);

/// Settings of one serving run.
pub struct Phase {
    /// Clients in the child process.
    pub clients: usize,
    /// Pod changes to measure.
    pub changes: usize,
    /// Pause between changes.
    pub change_gap: Duration,
    /// Longest wait for the initial sync.
    pub sync_timeout: Duration,
    /// Client starts spread over this long (zero: all at once, as after a controller restart).
    pub connect_spread: Duration,
    /// Address resources in the full state.
    pub expect_addresses: usize,
    /// Authorization resources in the full state.
    pub expect_authorizations: usize,
}

/// What one serving run measured.
pub struct PhaseResult {
    /// From the client process starting its clients to the last one holding the full state.
    pub sync: Duration,
    /// Change -> handler latency over every (client, change).
    pub latency: Summary,
    /// (client, change) pairs never seen within the timeout.
    pub missing: usize,
    /// Mean time of `Model::apply` + `push` for one change.
    pub apply_push: Duration,
    /// This process once every client held the full state.
    pub synced_memory: Memory,
    /// CPU time of this process / the client process during the initial sync.
    pub sync_cpu: (Duration, Duration),
    /// This process at the end of the run, clients still connected.
    pub server_memory: Memory,
    /// The client process at the end of the run.
    pub client_memory: Memory,
}

/// One line of the client process's report.
enum Report {
    Start(u64),
    Synced(u64),
    Recv { change: usize, at: u64 },
    Dropped(u64),
}

fn parse(line: &str) -> Option<Report> {
    let mut f = line.split_whitespace();
    match f.next()? {
        "START" => Some(Report::Start(f.next()?.parse().ok()?)),
        "SYNCED" => {
            f.next()?;
            Some(Report::Synced(f.next()?.parse().ok()?))
        }
        "RECV" => {
            let change = f.next()?.parse().ok()?;
            f.next()?;
            Some(Report::Recv {
                change,
                at: f.next()?.parse().ok()?,
            })
        }
        "DROPPED" => Some(Report::Dropped(f.next()?.parse().ok()?)),
        _ => None,
    }
}

/// Waits for the next report, or `None` at the deadline or when the child is gone.
async fn next(rx: &mut mpsc::Receiver<Report>, deadline: tokio::time::Instant) -> Option<Report> {
    tokio::time::timeout_at(deadline, rx.recv())
        .await
        .ok()
        .flatten()
}

/// Runs one serving phase against `xds`, which already holds the model's state.
pub async fn run(
    phase: &Phase,
    spec: &ClusterSpec,
    model: &mut Model,
    xds: &XdsServer,
    next_change: &mut usize,
) -> anyhow::Result<PhaseResult> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let stop = CancellationToken::new();
    let server = tokio::spawn(serve(listener, xds.clone(), None, None, stop.clone()));

    let exe = std::env::current_exe().context("locating this binary for the client process")?;
    let mut child = Command::new(exe)
        .arg("worker")
        .args(["--connect", &addr.to_string()])
        .args(["--clients", &phase.clients.to_string()])
        .args(["--expect-addresses", &phase.expect_addresses.to_string()])
        .args([
            "--expect-authorizations",
            &phase.expect_authorizations.to_string(),
        ])
        .args(["--spread-ms", &phase.connect_spread.as_millis().to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .context("starting the client process")?;
    let child_pid = child.id().map(|p| p.to_string()).unwrap_or_default();
    let cpu_before = cpu_time("self");
    let stdin = child.stdin.take();
    let stdout = child.stdout.take().context("client process stdout")?;
    let (tx, mut rx) = mpsc::channel(65_536);
    // Ends at the child's EOF, or when we stop listening.
    let reader = tokio::spawn(async move {
        let mut lines = BufReader::new(stdout).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(r) = parse(&line)
                && tx.send(r).await.is_err()
            {
                return;
            }
        }
    });

    // Initial sync.
    let deadline = tokio::time::Instant::now() + phase.sync_timeout;
    let (mut start, mut last_sync, mut synced) = (None, 0u64, 0usize);
    while synced < phase.clients {
        match next(&mut rx, deadline).await {
            Some(Report::Start(at)) => start = Some(at),
            Some(Report::Synced(at)) => {
                synced += 1;
                last_sync = last_sync.max(at);
            }
            Some(_) => {}
            None => anyhow::bail!(
                "only {synced} of {} clients synced within {:?}",
                phase.clients,
                phase.sync_timeout
            ),
        }
    }
    let sync = Duration::from_nanos(last_sync.saturating_sub(start.unwrap_or(last_sync)));
    let sync_cpu = (
        cpu_time("self").saturating_sub(cpu_before),
        cpu_time(&child_pid),
    );
    let synced_memory = memory("self");

    // Changes, one at a time.
    let mut samples = Vec::with_capacity(phase.clients * phase.changes);
    let mut missing: usize = 0;
    let mut apply_push = Duration::ZERO;
    let mut sent_at: HashMap<usize, u64> = HashMap::new();
    for _ in 0..phase.changes {
        let k = *next_change;
        *next_change += 1;
        let pod = spec.pod(spec.changed_pod(k), Some(&format!("chg-{k}")));
        let event = ConfigEvent::Apply(Arc::new(Object::Pod(pod)));
        let at = now_ns();
        let t = Instant::now();
        let delta = model.apply(vec![event]);
        push(xds, delta);
        apply_push += t.elapsed();
        sent_at.insert(k, at);
        let deadline = tokio::time::Instant::now() + CHANGE_TIMEOUT;
        let mut got = 0;
        while got < phase.clients {
            match next(&mut rx, deadline).await {
                Some(Report::Recv { change, at }) => {
                    // Late arrivals of an earlier change still count, with their own stamp.
                    if let Some(sent) = sent_at.get(&change) {
                        samples.push(Duration::from_nanos(at.saturating_sub(*sent)));
                        if change == k {
                            got += 1;
                        } else {
                            missing = missing.saturating_sub(1);
                        }
                    }
                }
                Some(Report::Dropped(n)) => anyhow::bail!("client process lost {n} reports"),
                Some(_) => {}
                None => break,
            }
        }
        missing += phase.clients - got;
        tokio::time::sleep(phase.change_gap).await;
    }

    let server_memory = memory("self");
    let client_memory = memory(&child_pid);
    // Closing stdin ends the client process.
    drop(stdin);
    if tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
    drop(rx);
    let _ = reader.await;
    stop.cancel();
    let _ = server.await;
    Ok(PhaseResult {
        sync,
        latency: summarize(&mut samples),
        missing,
        apply_push: apply_push / phase.changes.max(1) as u32,
        synced_memory,
        sync_cpu,
        server_memory,
        client_memory,
    })
}
