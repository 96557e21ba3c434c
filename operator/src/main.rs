//! The example-operator binary: parses the configuration and hands over to the library.

use std::process::ExitCode;

use clap::Parser;
use operator::config::Cli;

fn main() -> ExitCode {
    let mut cli = Cli::parse();
    if let Some(operator::config::Command::Check(args)) = cli.command.take() {
        let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(runtime) => runtime,
            Err(error) => {
                eprintln!("error: starting the async runtime: {error}");
                return ExitCode::FAILURE;
            }
        };
        return match runtime.block_on(operator::check::run(args)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("check failed: {error:#}");
                ExitCode::FAILURE
            }
        };
    }
    let config = match cli.validate() {
        Ok(config) => config,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(2);
        }
    };
    // Telemetry starts outside the async runtime: the OTLP exporter's blocking HTTP client runs
    // on its own thread and must not be created or dropped on a runtime thread.
    let telemetry = match operator::telemetry::init(config.log_format, &config.log_level) {
        Ok(telemetry) => telemetry,
        Err(error) => {
            eprintln!("error: {error:#}");
            return ExitCode::from(2);
        }
    };
    let code = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime.block_on(operator::run(config)).unwrap_or_else(|error| {
            tracing::error!(error = format!("{error:#}"), "operator failed");
            ExitCode::FAILURE
        }),
        Err(error) => {
            eprintln!("error: starting the async runtime: {error}");
            ExitCode::FAILURE
        }
    };
    telemetry.shutdown();
    code
}
