//! The local demo: two pods (network namespaces) in an ambient namespace, the real ztunnel
//! proxying both over HBONE with SPIFFE identities, then an AuthorizationPolicy decision.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use e2e::mesh::{Mesh, Options, deny_principal, eventually};
use e2e::ztunnel::metric_sum;

/// Runs the two-pod ztunnel demo and explains what happens.
#[derive(Parser)]
struct Args {
    /// The ztunnel binary (default: next to this one).
    #[arg(long)]
    ztunnel: Option<PathBuf>,
}

fn step(n: u32, text: &str) {
    println!("\n\x1b[1m[{n}] {text}\x1b[0m");
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if !e2e::require_root() {
        bail!("the demo creates network namespaces: run it as root");
    }
    let bin = match args.ztunnel {
        Some(p) => p,
        None => std::env::current_exe()?
            .parent()
            .context("binary directory")?
            .join("ztunnel"),
    };
    if !bin.exists() {
        bail!(
            "ztunnel binary not found at {} (build it: cargo build --release -p ztunnel)",
            bin.display()
        );
    }

    step(1, "Starting two pods and ztunnel");
    let mesh = Mesh::start(&bin, 240, Options::default());
    println!(
        "  pod default/a  ip {}  service account client  (netns {})",
        mesh.net.a.ip, mesh.net.a.ns
    );
    println!(
        "  pod default/b  ip {}  service account server  (netns {})",
        mesh.net.b.ip, mesh.net.b.ns
    );
    println!(
        "  ztunnel in netns {} proxies both pods (handed over by ZDS); state: {}",
        mesh.zt.ns,
        mesh.config.display()
    );
    println!(
        "  in-pod redirection: outbound -> 15001, inbound -> 15006 (plaintext) / 15008 (HBONE)"
    );

    step(
        2,
        "Pod a connects to pod b's echo server on port 8080 (plain TCP from the app's view)",
    );
    let mut client = mesh.connect().context("connecting a -> b")?;
    let peer = client.greeting().context("greeting from b")?;
    let echoed = client.echo(b"hello from a")?;
    println!("  b saw the connection coming from {peer} (the client pod's own IP)");
    println!("  echo: {:?}", String::from_utf8_lossy(&echoed));
    drop(client);

    step(
        3,
        "What ztunnel saw: mutual TLS with SPIFFE identities on both sides",
    );
    let mtls = [("connection_security_policy", "mutual_tls")];
    eventually(Duration::from_secs(5), || {
        metric_sum(
            &mesh.zt.metrics(),
            "istio_tcp_connections_closed_total",
            &mtls,
        ) >= 2.0
    });
    for line in mesh.zt.metrics().lines() {
        if line.starts_with("istio_tcp_connections_opened_total{") {
            let pick = |k: &str| {
                line.split(&format!("{k}=\""))
                    .nth(1)
                    .and_then(|r| r.split('"').next())
                    .unwrap_or("?")
                    .to_string()
            };
            println!(
                "  reporter={:<11} {} -> {}  security={}",
                pick("reporter"),
                pick("source_principal"),
                pick("destination_principal"),
                pick("connection_security_policy")
            );
        }
    }
    let dump = mesh.zt.config_dump();
    for cert in dump["certificates"].as_array().into_iter().flatten() {
        println!(
            "  certificate {} valid until {}",
            cert["identity"], cert["notAfter"]
        );
    }

    step(
        4,
        "Applying an AuthorizationPolicy: DENY principal cluster.local/ns/default/sa/client",
    );
    mesh.set_policies(&deny_principal("cluster.local/ns/default/sa/client"));
    let denied = eventually(Duration::from_secs(5), || {
        mesh.connect().and_then(|mut c| c.greeting()).is_err()
    });
    println!(
        "  a -> b is now {}",
        if denied {
            "refused by b's ztunnel (HBONE 401)"
        } else {
            "STILL ALLOWED (unexpected)"
        }
    );
    if let Some(line) = mesh
        .zt
        .log()
        .lines()
        .rev()
        .find(|l| l.contains("denied by policy"))
    {
        println!("  access log: {}", line.trim());
    }
    let failed = metric_sum(
        &mesh.zt.metrics(),
        "istio_tcp_connections_failed_total",
        &[("reporter", "destination")],
    );
    println!("  istio_tcp_connections_failed_total{{reporter=\"destination\"}} = {failed}");

    step(5, "Try next");
    println!("  - run the tests: bash scripts/test.sh");
    println!("  - measure the data path against direct TCP: bash scripts/bench.sh");
    println!(
        "  - run ztunnel yourself: ztunnel --help (Istio's env vars: XDS_ADDRESS, CA_ADDRESS, LOCAL_XDS_PATH, FAKE_CA, ...)"
    );
    println!("\nCleaning up (namespaces and processes are removed).");
    if !denied {
        bail!("the policy did not take effect");
    }
    Ok(())
}
