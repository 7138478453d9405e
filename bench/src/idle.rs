//! `ultra-bench idle`: the memory of an `ultra all` process that is up, connected to
//! PostgreSQL, RabbitMQ and Redis, and doing nothing.

use std::time::Duration;

use clap::Args;

use crate::{
    figure,
    harness::{free_address, wait_for, Harness, Processes, Services},
    report,
};

#[derive(Debug, Args)]
pub struct IdleBench {
    /// How long to let it settle after it is ready.
    #[arg(long, default_value_t = 5)]
    settle_s: u64,
    /// Print the summary as one JSON object.
    #[arg(long)]
    json: bool,
}

pub async fn run(services: &Services, processes: &Processes, args: IdleBench) -> anyhow::Result<()> {
    Harness::run(services, Some(processes), 0, async |harness| measure(harness, &args).await).await
}

async fn measure(harness: &Harness, args: &IdleBench) -> anyhow::Result<()> {
    let all = harness.spawn(&["all"], free_address().await?, &[]).await?;
    // Ready means every dependency answered: the pools and the consumer are up.
    wait_for(&format!("{}/health/ready", all.base)).await?;
    tokio::time::sleep(Duration::from_secs(args.settle_s)).await;
    let rss = all.rss();
    all.stop().await;
    let record = serde_json::json!({ "bench": "idle", "settle_s": args.settle_s, "rss_mb": rss });
    let rows =
        [("ultra all, idle", format!("{} (peak {})", figure(rss.now_mb, 1, " MB"), figure(rss.peak_mb, 1, " MB")))];
    report(args.json, "ultra-bench idle", &rows, &record);
    Ok(())
}
