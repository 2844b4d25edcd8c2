//! `forwarder-plugin serve`: configuration, logging, runtime, then
//! [`forwarder_plugin::serve::run`]. Bad configuration: one line, exit 64.

use std::process::ExitCode;

use forwarder_plugin::serve::{EXIT_CONFIG, ServeArgs, ServeConfig};

pub fn run(args: ServeArgs) -> ExitCode {
    let cfg = match ServeConfig::try_from(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("forwarder-plugin serve: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_max_level(cfg.log_level)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("forwarder-plugin serve: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(forwarder_plugin::serve::run(cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("forwarder-plugin serve: {e}");
            ExitCode::FAILURE
        }
    }
}
