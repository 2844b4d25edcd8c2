//! nsc-init: NSM's client init container (and, with --watch, its sidecar).
//! See README.md for the contract: environment, output, exit codes.

#![forbid(unsafe_code)]

mod config;
mod exit;
mod request;
mod run;
mod validate;
mod wait;
mod watch;

use std::process::ExitCode;

use clap::Parser;
use nsm_api::telemetry::Telemetry;

fn main() -> ExitCode {
    let cli = match config::Cli::try_parse() {
        Ok(c) => c,
        // --help/--version print to stdout and succeed; usage errors are 2.
        Err(e) => {
            let _ = e.print();
            let code = if e.use_stderr() {
                exit::code::USAGE
            } else {
                exit::code::OK
            };
            return ExitCode::from(code);
        }
    };
    let cfg = match config::Config::from_cli(&cli, |k| std::env::var(k).ok()) {
        Ok(c) => c,
        Err(e) => return exit::Failure::from(e).report(),
    };
    if cli.check_config {
        println!("nsc-init: the configuration is valid");
        return ExitCode::from(exit::code::OK);
    }
    // On the main thread, before any runtime thread exists.
    let netns = match request::OwnNetns::open() {
        Ok(n) => n,
        Err(f) => return f.report(),
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return exit::Failure::Setup(format!("tokio runtime: {e}")).report(),
    };
    // The OTLP exporter's connection lives in the runtime.
    let telemetry = match nsm_api::telemetry::start_in(&rt, cfg.telemetry.as_ref(), &cfg.name) {
        Ok(t) => t,
        Err(e) => return exit::Failure::Setup(e.to_string()).report(),
    };
    // Our own events at NSM_LOG_LEVEL; the gRPC stack's only at TRACE.
    let logging = nsm_api::logging::init(
        cfg.log_level,
        cfg.log_format,
        own_events,
        false,
        telemetry.as_ref().map(Telemetry::tracer),
    );
    let run = async {
        if let Err(e) = logging.switch_on_signals() {
            tracing::warn!(error = %e, "no log level switching on SIGUSR1/SIGUSR2");
        }
        // One trace per run: the Requests it makes carry its context.
        let span = tracing::info_span!("nsc-init", otel.kind = "client");
        let result = tracing::Instrument::instrument(run::run(cfg, netns), span).await;
        nsm_api::telemetry::shutdown(telemetry).await;
        result
    };
    match rt.block_on(run) {
        Ok(()) => ExitCode::from(exit::code::OK),
        Err(f) => f.report(),
    }
}

/// nsc-init's events at `level`, the gRPC stack's only at TRACE.
fn own_events(level: tracing::Level) -> String {
    if level == tracing::Level::TRACE {
        "trace".to_owned()
    } else {
        format!("warn,nsc_init={level}")
    }
}
