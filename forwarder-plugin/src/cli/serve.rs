//! `forwarder-plugin serve`: configuration, logging, runtime, then
//! [`forwarder_plugin::serve::run`]. Bad configuration: one line, exit 64.

use std::process::ExitCode;

use forwarder_plugin::serve::{EXIT_CONFIG, ServeArgs, ServeConfig};
use nsm_api::telemetry::Telemetry;

pub fn run(args: ServeArgs) -> ExitCode {
    let (check_only, probe) = (args.check_config, args.probe);
    let cfg = match ServeConfig::try_from(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("forwarder-plugin serve: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if check_only {
        println!("forwarder-plugin serve: the configuration is valid");
        return ExitCode::SUCCESS;
    }
    if probe {
        return nsm_api::probe::exit_code(
            "forwarder-plugin serve",
            nsm_api::transport::Target::Unix(cfg.listen_on.clone()),
            &cfg.identity,
        );
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // Kernel work runs on blocking threads; a burst of Requests makes
        // many that soon idle: their stacks go back when they do.
        .thread_keep_alive(std::time::Duration::from_secs(2))
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("forwarder-plugin serve: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The OTLP exporter's connection lives in the runtime.
    let telemetry = match nsm_api::telemetry::start_in(&runtime, cfg.telemetry.as_ref(), &cfg.name)
    {
        Ok(t) => t,
        Err(e) => {
            eprintln!("forwarder-plugin serve: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let logging = nsm_api::logging::init(
        cfg.log_level,
        cfg.log_format,
        nsm_api::logging::all_targets,
        true,
        telemetry.as_ref().map(Telemetry::tracer),
    );
    let run = async {
        if let Err(e) = logging.switch_on_signals() {
            tracing::warn!(error = %e, "no log level switching on SIGUSR1/SIGUSR2");
        }
        let result = forwarder_plugin::serve::run(cfg).await;
        nsm_api::telemetry::shutdown(telemetry).await;
        result
    };
    match runtime.block_on(run) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("forwarder-plugin serve: {e}");
            ExitCode::FAILURE
        }
    }
}
