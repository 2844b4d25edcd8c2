//! hello-server: answers every TCP connection with
//! `hello from server, you are <peer address>` (HTTP/1.0 when asked in HTTP).

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Parser;
use examples::hello_server;

#[derive(Parser)]
#[command(
    name = "hello-server",
    about = "Tells every TCP client the address it came from"
)]
struct Args {
    /// Address to listen on (repeat for several).
    #[arg(long = "listen", value_name = "ADDR", default_value = "0.0.0.0:8080")]
    listen: Vec<SocketAddr>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let mut tasks = tokio::task::JoinSet::new();
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
