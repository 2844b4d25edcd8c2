//! transparent-proxy: accepts NAT-redirected TCP connections, connects to
//! their original destination (`SO_ORIGINAL_DST`) and copies bytes both
//! ways, printing `proxy: <client> -> <original destination>` per connection.

#![forbid(unsafe_code)]

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::process::ExitCode;

use clap::Parser;
use examples::transparent_proxy::{self, DEFAULT_PORTS};
use nix::unistd::{Gid, Uid, setgid, setgroups, setuid};

#[derive(Parser)]
#[command(
    name = "transparent-proxy",
    about = "Transparent TCP proxy for NAT REDIRECT rules (reads SO_ORIGINAL_DST)"
)]
struct Args {
    /// Port to listen on, IPv4 and IPv6 (repeat for several; default 15001 and 15006).
    #[arg(long = "port", value_name = "PORT")]
    ports: Vec<u16>,
    /// Switch to this uid after binding, so the redirect rules that exclude it let our connections out.
    #[arg(long)]
    uid: Option<u32>,
    /// Switch to this gid after binding.
    #[arg(long)]
    gid: Option<u32>,
}

/// Binds `[::]:port` dual-stack (v4 clients appear v4-mapped).
fn bind(port: u16) -> std::io::Result<std::net::TcpListener> {
    let l = std::net::TcpListener::bind(SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port))
        .or_else(|_| std::net::TcpListener::bind(("0.0.0.0", port)))?;
    l.set_nonblocking(true)?;
    Ok(l)
}

fn drop_privileges(uid: Option<u32>, gid: Option<u32>) -> nix::Result<()> {
    if let Some(g) = gid {
        setgroups(&[])?;
        setgid(Gid::from_raw(g))?;
    }
    if let Some(u) = uid {
        setuid(Uid::from_raw(u))?;
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    let ports = if args.ports.is_empty() {
        DEFAULT_PORTS.to_vec()
    } else {
        args.ports
    };
    let mut std_listeners = Vec::new();
    for p in &ports {
        match bind(*p) {
            Ok(l) => std_listeners.push(l),
            Err(e) => {
                eprintln!("transparent-proxy: cannot listen on port {p}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    // Before the runtime starts any thread.
    if let Err(e) = drop_privileges(args.uid, args.gid) {
        eprintln!(
            "transparent-proxy: cannot switch to uid {:?} gid {:?}: {e}",
            args.uid, args.gid
        );
        return ExitCode::FAILURE;
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("transparent-proxy: {e}");
            return ExitCode::FAILURE;
        }
    };
    let res = rt.block_on(async move {
        let mut listeners = Vec::new();
        for l in std_listeners {
            listeners.push(tokio::net::TcpListener::from_std(l)?);
        }
        println!(
            "transparent-proxy: listening on ports {ports:?} as uid {} gid {}",
            Uid::current(),
            Gid::current()
        );
        transparent_proxy::run(listeners).await
    });
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("transparent-proxy: {e}");
            ExitCode::FAILURE
        }
    }
}
