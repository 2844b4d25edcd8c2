//! mesh-proxy-nse: configuration, logging, then [`nse::server::run`].

use std::process::ExitCode;

use nse::config::{Config, EXIT_CONFIG};
use nsm_api::telemetry::Telemetry;

fn main() -> ExitCode {
    let config = match Config::from_env_and_args() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("mesh-proxy-nse: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if config.check_only {
        println!("mesh-proxy-nse: the configuration is valid");
        return ExitCode::SUCCESS;
    }
    if config.probe_only {
        return nsm_api::probe::exit_code(
            "mesh-proxy-nse",
            config.listen_on.target(),
            &config.identity,
        );
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // Kernel work runs on blocking threads, serialised per table: a
        // burst of Requests makes many that soon idle. Their stacks go
        // back when they do.
        .thread_keep_alive(std::time::Duration::from_secs(2))
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mesh-proxy-nse: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The OTLP exporter's connection lives in the runtime.
    let telemetry =
        match nsm_api::telemetry::start_in(&runtime, config.telemetry.as_ref(), &config.name) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("mesh-proxy-nse: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
        };
    let logging = nsm_api::logging::init(
        config.log_level,
        config.log_format,
        nsm_api::logging::all_targets,
        true,
        telemetry.as_ref().map(Telemetry::tracer),
    );
    let run = async {
        if let Err(e) = logging.switch_on_signals() {
            tracing::warn!(error = %e, "no log level switching on SIGUSR1/SIGUSR2");
        }
        let result = nse::server::run(config).await;
        nsm_api::telemetry::shutdown(telemetry).await;
        result
    };
    match runtime.block_on(run) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mesh-proxy-nse: {e}");
            ExitCode::FAILURE
        }
    }
}
