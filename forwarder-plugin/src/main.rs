//! `forwarder-plugin`: the kernel dataplane's command line. Each subcommand
//! lives in its own module under `cli/`.

#![forbid(unsafe_code)]

mod cli;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "forwarder-plugin",
    version,
    about = "Kernel dataplane of the mesh-proxy NSE: network namespaces, links and redirect rules"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Redirect rules (istio-style capture into a mesh proxy) in a network namespace.
    Rules(cli::rules::RulesArgs),
    /// The NSM forwarder hop: plumb a veth between a client's and an endpoint's namespaces.
    Serve(Box<forwarder_plugin::serve::ServeArgs>),
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Rules(args) => cli::rules::run(args),
        Command::Serve(args) => cli::serve::run(*args),
    }
}
