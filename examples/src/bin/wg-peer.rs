//! wg-peer: the far end of the vpn function's WireGuard tunnel for the demo
//! and the tests — the same userspace tunnel (forwarder_plugin::wireguard)
//! in the namespace it runs in, until SIGTERM or SIGINT. `wg-peer genkey`
//! prints a private key, `wg-peer pubkey < private` its public key.

#![forbid(unsafe_code)]

use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use forwarder_plugin::wireguard::{self, PeerSpec, PrivateKey, TunnelSpec};

#[derive(Parser)]
#[command(
    name = "wg-peer",
    about = "A userspace WireGuard peer (one peer, allowed IPs routed to it)"
)]
struct Args {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    /// The tunnel interface to create.
    #[arg(long, default_value = "wg-peer0")]
    interface: String,
    /// File with our private key (base64).
    #[arg(long, value_name = "FILE")]
    private_key_file: Option<PathBuf>,
    #[arg(long, default_value_t = 51820)]
    listen_port: u16,
    /// Our addresses on the tunnel interface (repeat).
    #[arg(long = "address", value_name = "CIDR")]
    addresses: Vec<ipnet::IpNet>,
    /// The peer's public key (base64).
    #[arg(long, value_name = "KEY")]
    peer_public_key: Option<String>,
    /// Where the peer is; without it, learnt from its first packet.
    #[arg(long, value_name = "ADDR")]
    peer_endpoint: Option<SocketAddr>,
    /// What the peer may send from and what is routed to it (repeat).
    #[arg(long = "allowed-ip", value_name = "CIDR")]
    allowed_ips: Vec<ipnet::IpNet>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Print a new private key.
    Genkey,
    /// Print the public key of the private key on stdin.
    Pubkey,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wg-peer: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), String> {
    match args.cmd {
        Some(Cmd::Genkey) => {
            let k = wireguard::generate_private_key().map_err(|e| e.to_string())?;
            println!("{}", wireguard::encode_key(&k));
            return Ok(());
        }
        Some(Cmd::Pubkey) => {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .map_err(|e| e.to_string())?;
            let k = wireguard::parse_key("stdin", &text).map_err(|e| e.to_string())?;
            println!("{}", wireguard::encode_key(&wireguard::public_key(&k)));
            return Ok(());
        }
        None => {}
    }
    let key_file = args
        .private_key_file
        .ok_or("--private-key-file is needed")?;
    let text =
        std::fs::read_to_string(&key_file).map_err(|e| format!("{}: {e}", key_file.display()))?;
    let private_key =
        wireguard::parse_key(&key_file.display().to_string(), &text).map_err(|e| e.to_string())?;
    let public_key = wireguard::parse_key(
        "--peer-public-key",
        &args.peer_public_key.ok_or("--peer-public-key is needed")?,
    )
    .map_err(|e| e.to_string())?;
    let spec = TunnelSpec {
        interface: args.interface.clone(),
        private_key: PrivateKey(private_key),
        listen_port: args.listen_port,
        addresses: args.addresses,
        peer: PeerSpec {
            public_key,
            endpoint: args.peer_endpoint,
            allowed_ips: args.allowed_ips,
            persistent_keepalive: None,
        },
    };
    let _tunnel = wireguard::start(&spec).await.map_err(|e| e.to_string())?;
    eprintln!(
        "wg-peer: {} up, listening on UDP {}",
        args.interface, args.listen_port
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| e.to_string())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(())
}
