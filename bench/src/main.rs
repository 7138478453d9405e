//! `ultra-bench`: benchmarks that prove the numbers in docs/BENCHMARKS.md. Each run is
//! isolated — its own database (dropped afterwards), queue prefix and Redis prefix —
//! and starts the `ultra` processes it measures as children of this one, so their
//! memory is measured alone. A `bench` tier without practical limits and a mock
//! catalog without concurrency caps keep the product's limits out of the measurement.
//!
//! A binary of its own, so the release binary (and its `--help`) carries none of it;
//! each subcommand takes only its own flags and the services it uses.

mod batch;
mod chaos;
mod harness;
mod idle;
mod inflight;
mod raw;
mod sse;
mod sse_client;
mod throughput;

use std::time::Duration;

use clap::{Parser, Subcommand};
use common::sse::{ReadError, SseMessage};
use futures::{stream::BoxStream, StreamExt};
use harness::{Processes, Services};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Parser)]
#[command(name = "ultra-bench", version, about = "Benchmarks of Ultra against the local services (docs/BENCHMARKS.md)")]
struct Cli {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// The machine's ceiling without Ultra's logic: confirmed publish → consume →
    /// insert a row → ack, in jobs/s.
    Raw {
        #[command(flatten)]
        args: raw::RawBench,
        #[command(flatten)]
        services: Services,
    },
    /// Jobs through a whole system (started here, or `--url`): accepted/s, completed/s,
    /// submit → terminal latency over SSE, RSS, and the ratio to `raw`.
    Throughput {
        #[command(flatten)]
        args: throughput::ThroughputBench,
        #[command(flatten)]
        services: Services,
        #[command(flatten)]
        processes: Processes,
    },
    /// How many provider calls one worker process keeps in flight, and its RSS.
    Inflight {
        #[command(flatten)]
        args: inflight::InflightBench,
        #[command(flatten)]
        services: Services,
        #[command(flatten)]
        processes: Processes,
    },
    /// The memory of an idle `ultra all`.
    Idle {
        #[command(flatten)]
        args: idle::IdleBench,
        #[command(flatten)]
        services: Services,
        #[command(flatten)]
        processes: Processes,
    },
    /// Workers SIGKILLed and restarted, broker connections closed, the broker and
    /// PostgreSQL restarted: lost and duplicated jobs (exits non-zero on any).
    Chaos {
        #[command(flatten)]
        args: chaos::ChaosBench,
        #[command(flatten)]
        services: Services,
        #[command(flatten)]
        processes: Processes,
    },
    /// Many SSE subscribers on one api process: RSS, delivery latency, events/s.
    Sse {
        #[command(flatten)]
        args: sse::SseBench,
        #[command(flatten)]
        services: Services,
        #[command(flatten)]
        processes: Processes,
    },
    /// An OpenAI Batch API batch of `--lines` chat completions: lines/s, RSS, and
    /// interactive p50 while it runs against idle (exits non-zero unless every line
    /// completed).
    Batch {
        #[command(flatten)]
        args: batch::BatchBench,
        #[command(flatten)]
        services: Services,
        #[command(flatten)]
        processes: Processes,
    },
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let telemetry = common::telemetry::init(None);
    let result = run(cli.bench).await;
    telemetry.shutdown();
    // Errors are printed as a message with its causes, never as a backtrace.
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(bench: Bench) -> anyhow::Result<()> {
    match bench {
        Bench::Raw { args, services } => raw::run(&services, args).await,
        Bench::Throughput { args, services, processes } => throughput::run(&services, &processes, args).await,
        Bench::Inflight { args, services, processes } => inflight::run(&services, &processes, args).await,
        Bench::Idle { args, services, processes } => idle::run(&services, &processes, args).await,
        Bench::Chaos { args, services, processes } => chaos::run(&services, &processes, args).await,
        Bench::Sse { args, services, processes } => sse::run(&services, &processes, args).await,
        Bench::Batch { args, services, processes } => batch::run(&services, &processes, args).await,
    }
}

/// The mock models a job of `count` models names.
pub fn models(count: usize) -> anyhow::Result<Vec<&'static str>> {
    const MODELS: [&str; 3] = ["mock/alpha", "mock/beta", "mock/gamma"];
    if !(1..=MODELS.len()).contains(&count) {
        anyhow::bail!("--models must be 1 to {}", MODELS.len());
    }
    Ok(MODELS[..count].to_vec())
}

/// The body every benchmark submits: one prompt to `models`.
pub fn analyze_body(models: &[impl serde::Serialize]) -> serde_json::Value {
    serde_json::json!({ "prompt": "Benchmark: why is the sky blue?", "models": models })
}

/// The `q` quantile (0–1) of sorted samples, nearest rank.
pub fn quantile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

/// A progress bar on stderr (hidden when stderr is not a terminal).
pub fn progress(len: u64, label: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    let style = ProgressStyle::with_template("{prefix:>12} [{bar:40}] {pos}/{len} {per_sec} {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    bar.set_style(style);
    bar.set_prefix(label.to_owned());
    bar
}

/// Prints a summary: a two-column table, or with `json` the record as one line.
pub fn report(json: bool, title: &str, rows: &[(&str, String)], record: &serde_json::Value) {
    if json {
        println!("{record}");
        return;
    }
    println!("{title}");
    let width = rows.iter().map(|(name, _)| name.len()).max().unwrap_or(0);
    for (name, value) in rows {
        println!("  {name:<width$}  {value}");
    }
}

/// A response's server-sent events, read with the parser the worker uses for
/// providers' streams (`common::sse`). Heartbeats arrive every 10 s, so a minute of
/// silence is an error.
pub fn sse_events(response: reqwest::Response) -> BoxStream<'static, anyhow::Result<SseMessage>> {
    const IDLE: Duration = Duration::from_secs(60);
    common::sse::read(response.bytes_stream().boxed(), IDLE)
        .map(|read| {
            read.map_err(|err| match err {
                ReadError::Idle => anyhow::anyhow!("no byte of the event stream arrived for a minute"),
                ReadError::Broken(err) => anyhow::Error::new(err).context("the event stream broke"),
            })
        })
        .boxed()
}

/// A figure for the table: fixed decimals, or `-` when there is none.
pub fn figure(value: Option<f64>, decimals: usize, unit: &str) -> String {
    value.map_or_else(|| "-".to_owned(), |v| format!("{v:.decimals$}{unit}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_take_the_nearest_rank() {
        let samples = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(quantile(&samples, 0.5), Some(2.0));
        assert_eq!(quantile(&samples, 0.99), Some(4.0));
        assert_eq!(quantile(&[], 0.5), None);
    }
}
