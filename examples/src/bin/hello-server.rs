//! hello-server: answers every TCP connection with
//! `hello from server, you are <peer address>` (HTTP/1.0 when asked in HTTP),
//! and, with `--dns`, every DNS A query over UDP with one address.

#![forbid(unsafe_code)]

use std::net::{Ipv4Addr, SocketAddr};
use std::process::ExitCode;

use clap::Parser;
use examples::{dns, hello_server};

#[derive(Parser)]
#[command(
    name = "hello-server",
    about = "Tells every TCP client the address it came from"
)]
struct Args {
    /// Address to listen on (repeat for several).
    #[arg(long = "listen", value_name = "ADDR", default_value = "0.0.0.0:8080")]
    listen: Vec<SocketAddr>,
    /// Also answer DNS on this UDP address (repeat for several).
    #[arg(long = "dns", value_name = "ADDR")]
    dns: Vec<SocketAddr>,
    /// The address every DNS A query gets.
    #[arg(long, value_name = "IPV4", default_value = "198.19.54.1")]
    dns_answer: Ipv4Addr,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let mut tasks = tokio::task::JoinSet::new();
    // DNS first: whoever waits for the TCP listeners finds DNS ready too.
    for addr in args.dns {
        let s = match tokio::net::UdpSocket::bind(addr).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("hello-server: cannot answer DNS on {addr}: {e}");
                return ExitCode::FAILURE;
            }
        };
        println!(
            "hello-server: answering DNS on {addr} with {}",
            args.dns_answer
        );
        tasks.spawn(dns::serve(s, args.dns_answer));
    }
    for addr in args.listen {
        let l = match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("hello-server: cannot listen on {addr}: {e}");
                return ExitCode::FAILURE;
            }
        };
        println!("hello-server: listening on {addr}");
        tasks.spawn(hello_server::serve(l));
    }
    while let Some(res) = tasks.join_next().await {
        if let Ok(Err(e)) | Err(e) = res.map_err(std::io::Error::other) {
            eprintln!("hello-server: {e}");
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}
