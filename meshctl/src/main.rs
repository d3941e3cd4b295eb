//! `meshctl`: the mesh's command line. `meshctl sandbox` runs a local multi-node ambient mesh
//! in network namespaces with the real controller, node agents, CNI plugins and ztunnels.

mod cli;
mod cluster;
mod cni;
mod commands;
mod components;
mod dns;
mod ids;
mod kubeproxy;
mod manifests;
mod names;
mod netns;
mod network;
mod pods;
mod processes;
mod services;
mod settle;
mod state;
mod workloads;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let result = match cli.command {
        cli::TopCommand::Sandbox(args) => commands::run(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
