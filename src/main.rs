use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// kvgate: a KV-cache-aware load balancer for vLLM fleets.
#[derive(Debug, Parser)]
#[command(version = kvgate::VERSION, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway.
    Serve(kvgate::serve::ServeArgs),
    /// Show the rendered prompt, token ids and block hashes kvgate computes for a request body.
    Inspect(kvgate::inspect::InspectArgs),
    /// Run simulated vLLM pods.
    Sim(kvgate::sim::SimArgs),
    /// Compare routing policies on the evaluation workloads (virtual time or live).
    Bench(Box<kvgate::bench::BenchArgs>),
    /// Start simulated pods and the gateway, show a two-round chat and a live comparison.
    Demo(kvgate::bench::DemoArgs),
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Serve(args) => kvgate::serve::run(&args).map_err(|e| e.to_string()),
        Command::Inspect(args) => kvgate::inspect::run(&args).map_err(|e| e.to_string()),
        Command::Sim(args) => kvgate::sim::run(&args).map_err(|e| e.to_string()),
        Command::Bench(args) => kvgate::bench::run(&args).map_err(|e| e.to_string()),
        Command::Demo(args) => kvgate::bench::demo::run(&args).map_err(|e| e.to_string()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("kvgate: {message}");
            ExitCode::FAILURE
        }
    }
}
