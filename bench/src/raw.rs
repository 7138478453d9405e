//! `ultra-bench raw`: what this machine's services do without Ultra's logic. The same
//! claim-check message and quorum queue as Ultra, published with a confirm per message
//! (as the api does per submit) by `concurrency` publishers; one consumer with
//! prefetch `concurrency` inserts one row per message into PostgreSQL and acks after
//! the commit. Jobs/s from the first publish to the last ack is the ceiling Ultra's
//! own throughput is compared with.

use std::{sync::Arc, time::Instant};

use anyhow::Context;
use clap::Args;
use common::queue::{self, JobMessage, Publisher, Topology};
use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicQosOptions};

use crate::{
    figure,
    harness::{Harness, Services},
    progress, report,
};

#[derive(Debug, Args)]
pub struct RawBench {
    /// Messages to push through.
    #[arg(long, default_value_t = 2_000)]
    jobs: usize,
    /// Publishers at once, and the consumer's prefetch.
    #[arg(long, default_value_t = 16)]
    concurrency: u16,
    /// Print the summary as one JSON object.
    #[arg(long)]
    json: bool,
}

pub async fn run(services: &Services, args: RawBench) -> anyhow::Result<()> {
    let jobs_per_s =
        Harness::run(services, None, 0, async |harness| measure(harness, args.jobs, args.concurrency).await).await?;
    let record = serde_json::json!({
        "bench": "raw", "jobs": args.jobs, "concurrency": args.concurrency, "jobs_per_s": jobs_per_s,
    });
    let rows = [
        ("jobs", args.jobs.to_string()),
        ("concurrency", args.concurrency.to_string()),
        ("raw jobs/s", figure(Some(jobs_per_s), 0, "")),
    ];
    report(args.json, "ultra-bench raw", &rows, &record);
    Ok(())
}

/// Runs `jobs` messages through at `concurrency`; returns jobs/s.
pub async fn measure(harness: &Harness, jobs: usize, concurrency: u16) -> anyhow::Result<f64> {
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS bench_raw_results (
            job_id uuid PRIMARY KEY, attempt int NOT NULL, created_at timestamptz NOT NULL DEFAULT now())",
    )
    .execute(&harness.pool)
    .await?;
    let topology = Topology::new(&format!("{}raw.", harness.queue_prefix()));
    let publisher = Arc::new(Publisher::new(harness.amqp_url.clone(), topology.clone()));
    publisher.check().await.context("RabbitMQ")?; // declares the topology

    let connection = queue::connect(&harness.amqp_url, "ultra-bench-raw").await?;
    let channel = connection.create_channel().await?;
    channel.basic_qos(concurrency, BasicQosOptions::default()).await?;
    let mut deliveries = queue::consume(&channel, &topology.analyze_queue).await?;
    let pool = harness.pool.clone();
    let bar = progress(jobs as u64, "raw");
    let consumer_bar = bar.clone();
    let consumer = tokio::spawn(async move {
        let mut handlers = tokio::task::JoinSet::new();
        let mut done = 0;
        while done < jobs {
            tokio::select! {
                Some(delivery) = deliveries.next() => {
                    let delivery = delivery?;
                    let pool = pool.clone();
                    handlers.spawn(async move {
                        let message: JobMessage = serde_json::from_slice(&delivery.data)?;
                        sqlx::query("INSERT INTO bench_raw_results (job_id, attempt) VALUES ($1, 1)")
                            .bind(message.job_id())
                            .execute(&pool)
                            .await?;
                        delivery.ack(BasicAckOptions::default()).await?;
                        anyhow::Ok(())
                    });
                }
                Some(handled) = handlers.join_next(), if !handlers.is_empty() => {
                    handled??;
                    done += 1;
                    consumer_bar.inc(1);
                }
                else => anyhow::bail!("the broker ended the consumer"),
            }
        }
        anyhow::Ok(())
    });

    let started = Instant::now();
    let mut publishers = tokio::task::JoinSet::new();
    for worker in 0..usize::from(concurrency.max(1)) {
        let publisher = publisher.clone();
        let share = (worker..jobs).step_by(usize::from(concurrency.max(1))).count();
        publishers.spawn(async move {
            for _ in 0..share {
                publisher.publish(&JobMessage::new(uuid::Uuid::now_v7(), 1), None).await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(published) = publishers.join_next().await {
        published??;
    }
    consumer.await??;
    let elapsed = started.elapsed();
    bar.finish_and_clear();
    publisher.close().await;
    let _ = connection.close(200, "done".into()).await;
    testkit::queue::delete_topology(&topology, &harness.amqp_url).await?;
    Ok(jobs as f64 / elapsed.as_secs_f64())
}
