//! RabbitMQ: the topology every process declares, the message it carries, and the
//! confirmed publisher the api uses. Messages are claim checks — `{job_id, attempt}`
//! only; the job itself stays in PostgreSQL.
//!
//! Topology (names take `ULTRA_QUEUE_PREFIX` in front):
//! ```text
//! exchange ultra.jobs (direct) --"analyze"--> quorum queue ultra.analyze
//!                                               | x-delivery-limit exceeded / rejected
//!                                               v
//! exchange ultra.dead (direct) --"analyze"--> quorum queue ultra.analyze.dead
//!
//! classic queues ultra.delay.{1,5,30,120}s (TTL) --dead-lettered--> exchange ultra.jobs
//! ```
//! Declarations are idempotent and use only arguments RabbitMQ 3.10 and 4.x both
//! accept, so every process may declare on start-up.

pub mod nodes;
mod publisher;

pub use nodes::connect;
pub use publisher::{Publisher, QueueStats};

use std::time::Duration;

use lapin::{
    options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable},
    Channel, Connection, ExchangeKind,
};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Routing key of analyze jobs on the jobs exchange.
pub const ANALYZE_ROUTING_KEY: &str = "analyze";

/// Deliveries of one message before the broker dead-letters it as poison. Explicit,
/// because RabbitMQ 3.x has no default limit and 4.x defaults to 20.
pub const DELIVERY_LIMIT: i32 = 10;

/// How long a connection attempt to one node may take before it counts as down.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Exchange and queue names for one prefix.
#[derive(Debug, Clone)]
pub struct Topology {
    pub jobs_exchange: String,
    pub analyze_queue: String,
    pub dead_exchange: String,
    pub dead_queue: String,
    /// Delay queues, shortest first: a message waits out the queue's TTL, then is
    /// dead-lettered back to the jobs exchange.
    pub delay_queues: Vec<(Duration, String)>,
}

/// The delay tiers. Fixed tiers (rather than a TTL per message) keep a long delay from
/// holding up short ones queued behind it: RabbitMQ expires messages only at a
/// queue's head.
pub const DELAY_TIERS: [Duration; 4] =
    [Duration::from_secs(1), Duration::from_secs(5), Duration::from_secs(30), Duration::from_secs(120)];

impl Topology {
    /// The delay queue for waiting `delay`: the shortest tier that covers it (or the
    /// longest one).
    pub fn delay_queue(&self, delay: Duration) -> &str {
        let (_, queue) = self
            .delay_queues
            .iter()
            .find(|(ttl, _)| *ttl >= delay)
            .or(self.delay_queues.last())
            .unwrap_or_else(|| unreachable!("there are delay tiers"));
        queue
    }

    pub fn new(prefix: &str) -> Self {
        Self {
            jobs_exchange: format!("{prefix}ultra.jobs"),
            analyze_queue: format!("{prefix}ultra.analyze"),
            dead_exchange: format!("{prefix}ultra.dead"),
            dead_queue: format!("{prefix}ultra.analyze.dead"),
            delay_queues: DELAY_TIERS.iter().map(|d| (*d, format!("{prefix}ultra.delay.{}s", d.as_secs()))).collect(),
        }
    }

    /// Every queue with its role: `work`, `dead_letter` or `delay`.
    pub fn queues(&self) -> impl Iterator<Item = (&'static str, &str)> {
        [("work", self.analyze_queue.as_str()), ("dead_letter", self.dead_queue.as_str())]
            .into_iter()
            .chain(self.delay_queues.iter().map(|(_, queue)| ("delay", queue.as_str())))
    }

    /// Declares what consuming and publishing jobs need — the exchanges, the two
    /// quorum queues, their bindings — and is safe to repeat (same names, same
    /// arguments). In a cluster all of it answers while a majority of nodes is up, so
    /// it works through any surviving node. The delay queues are declared apart
    /// ([`Self::declare_delay_queues`]): they live on one node.
    pub async fn declare(&self, channel: &Channel) -> Result<(), lapin::Error> {
        // Durable: the topology survives a broker restart (https://www.rabbitmq.com/docs/queues#durability).
        let durable_exchange = ExchangeDeclareOptions { durable: true, ..Default::default() };
        channel
            .exchange_declare(
                self.jobs_exchange.as_str().into(),
                ExchangeKind::Direct,
                durable_exchange,
                FieldTable::default(),
            )
            .await?;
        channel
            .exchange_declare(
                self.dead_exchange.as_str().into(),
                ExchangeKind::Direct,
                durable_exchange,
                FieldTable::default(),
            )
            .await?;

        let mut work_args = quorum_args();
        // Poison messages stop after this many deliveries (https://www.rabbitmq.com/docs/quorum-queues#poison-message-handling).
        work_args.insert("x-delivery-limit".into(), AMQPValue::LongInt(DELIVERY_LIMIT));
        // Rejected and over-limit messages go to the dead-letter queue, not the void.
        work_args.insert("x-dead-letter-exchange".into(), AMQPValue::LongString(self.dead_exchange.as_str().into()));
        channel.queue_declare(self.analyze_queue.as_str().into(), QueueDeclareOptions::durable(), work_args).await?;
        channel.queue_declare(self.dead_queue.as_str().into(), QueueDeclareOptions::durable(), quorum_args()).await?;

        for (queue, exchange) in [(&self.analyze_queue, &self.jobs_exchange), (&self.dead_queue, &self.dead_exchange)] {
            channel
                .queue_bind(
                    queue.as_str().into(),
                    exchange.as_str().into(),
                    ANALYZE_ROUTING_KEY.into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
        Ok(())
    }

    /// Declares the delay queues, on a channel of their own. They are classic queues,
    /// which live on the node that first declared them: while that node is down,
    /// declaring them fails (`NOT_FOUND`, home node down) and the broker closes the
    /// channel — which must not be the caller's. Only publishers use them.
    pub async fn declare_delay_queues(&self, connection: &Connection) -> Result<(), lapin::Error> {
        let channel = connection.create_channel().await?;
        for (ttl, queue) in &self.delay_queues {
            // Classic queues: per-queue TTL and dead-lettering work alike on 3.10 and 4.x.
            let mut args = FieldTable::default();
            args.insert("x-message-ttl".into(), AMQPValue::LongInt(ttl.as_millis() as i32));
            args.insert("x-dead-letter-exchange".into(), AMQPValue::LongString(self.jobs_exchange.as_str().into()));
            args.insert("x-dead-letter-routing-key".into(), AMQPValue::LongString(ANALYZE_ROUTING_KEY.into()));
            channel.queue_declare(queue.as_str().into(), QueueDeclareOptions::durable(), args).await?;
        }
        let _ = channel.close(200, "done".into()).await;
        Ok(())
    }
}

/// Quorum queues: replicated, and they count deliveries (https://www.rabbitmq.com/docs/quorum-queues).
fn quorum_args() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    args
}

/// Consumes `queue` with manual acks and a broker-chosen consumer tag.
pub async fn consume(channel: &lapin::Channel, queue: &str) -> Result<lapin::Consumer, lapin::Error> {
    channel
        .basic_consume(queue.into(), "".into(), lapin::options::BasicConsumeOptions::default(), FieldTable::default())
        .await
}

/// The message on `ultra.analyze`. Versioned so old and new processes can share a
/// queue during a rolling upgrade.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "v")]
pub enum JobMessage {
    #[serde(rename = "1")]
    V1 { job_id: Uuid, attempt: i32 },
}

impl JobMessage {
    pub fn new(job_id: Uuid, attempt: i32) -> Self {
        JobMessage::V1 { job_id, attempt }
    }

    pub fn job_id(&self) -> Uuid {
        match self {
            JobMessage::V1 { job_id, .. } => *job_id,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_wire_format_is_stable() {
        let id = Uuid::nil();
        let json = serde_json::to_value(JobMessage::new(id, 1)).expect("serialises");
        assert_eq!(json, serde_json::json!({"v": "1", "job_id": id, "attempt": 1}));
        let back: JobMessage = serde_json::from_value(json).expect("parses");
        assert_eq!(back.job_id(), id);
    }

    #[test]
    fn names_take_the_prefix() {
        let topology = Topology::new("t1.");
        assert_eq!(topology.analyze_queue, "t1.ultra.analyze");
        assert_eq!(topology.dead_queue, "t1.ultra.analyze.dead");
        assert_eq!(topology.delay_queue(Duration::from_millis(800)), "t1.ultra.delay.1s");
        assert_eq!(topology.delay_queue(Duration::from_secs(3)), "t1.ultra.delay.5s");
        assert_eq!(topology.delay_queue(Duration::from_secs(900)), "t1.ultra.delay.120s");
    }
}
