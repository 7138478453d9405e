//! `ultra`: the one binary. It parses the command line and hands over to the api,
//! the worker, both, or an admin command.

mod admin;
mod serve;

use std::sync::Arc;

use clap::{Parser, Subcommand};
use common::{Config, Settings};

#[derive(Parser)]
#[command(name = "ultra", version, about = "Ultra: an LLM orchestrator on PostgreSQL, RabbitMQ and Redis")]
struct Cli {
    #[command(flatten)]
    config: Config,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the api and a worker pool in one process (a laptop or a small deployment).
    All,
    /// Run the REST api only.
    Api,
    /// Run a worker only; serves health on ULTRA_WORKER_LISTEN.
    Worker {
        /// Jobs run at once (and RabbitMQ prefetch); overrides ULTRA_WORKER_CONCURRENCY.
        #[arg(long)]
        concurrency: Option<u16>,
    },
    /// Create the database if needed and apply pending migrations, then exit.
    Migrate,
    /// Administrative commands.
    #[command(subcommand)]
    Admin(admin::AdminCommand),
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    // Errors are printed as a message with its causes, never as a backtrace.
    match run(Cli::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let Cli { mut config, command } = cli;
    if let Command::Worker { concurrency: Some(n) } = command {
        config.concurrency = n;
    }
    let telemetry = common::telemetry::init(config.log_format);
    let result = run_command(config, command).await;
    telemetry.shutdown();
    result
}

async fn run_command(config: Config, command: Command) -> anyhow::Result<()> {
    // Loaded and checked once (the configuration file read once); every mode shares them.
    let settings = Arc::new(Settings::load(config)?);
    match command {
        Command::All => serve::all(settings).await,
        Command::Api => serve::api(settings).await,
        Command::Worker { .. } => serve::worker(settings).await,
        Command::Migrate => admin::migrate(&settings).await,
        Command::Admin(command) => admin::run(&settings, command).await,
    }
}
