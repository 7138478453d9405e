//! The broker seen from outside the product: closing a run's connections as an
//! operator would, and deleting its topology afterwards.

use common::queue::{connect, Topology};
use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};

/// Deletes the queues and exchanges of `topology` (tests and benchmarks clean up
/// after themselves).
pub async fn delete_topology(topology: &Topology, amqp_url: &str) -> Result<(), lapin::Error> {
    let connection = connect(amqp_url, "ultra-cleanup").await?;
    let channel = connection.create_channel().await?;
    for (_, queue) in topology.queues() {
        channel.queue_delete(queue.into(), QueueDeleteOptions::default()).await?;
    }
    for exchange in [&topology.jobs_exchange, &topology.dead_exchange] {
        channel.exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default()).await?;
    }
    connection.close(200, "done".into()).await
}

/// Closes every broker connection of the processes using `prefix` (they are named
/// after the topology), with the broker's own `rabbitmqctl`, as an operator would;
/// returns how many it closed. It needs to run on the broker's host.
pub fn close_connections(prefix: &str) -> std::io::Result<usize> {
    use std::process::{Command, Stdio};
    let listing = Command::new("rabbitmqctl")
        .args(["-q", "list_connections", "pid", "client_properties"])
        .stdin(Stdio::null())
        .output()?;
    let listing = String::from_utf8_lossy(&listing.stdout);
    let mine = Topology::new(prefix).jobs_exchange;
    let pids: Vec<&str> =
        listing.lines().filter(|l| l.contains(&mine)).filter_map(|l| l.split_whitespace().next()).collect();
    let mut closed = 0;
    for pid in &pids {
        // A connection may be gone by now, or the broker stopping: that one is skipped.
        let status = Command::new("rabbitmqctl")
            .args(["-q", "close_connection", pid, "closed by a chaos test"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()?;
        closed += usize::from(status.success());
    }
    Ok(closed)
}
