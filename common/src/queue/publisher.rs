//! A publisher with confirms that connects lazily and reconnects on demand. While
//! the broker is down it fails fast (after one attempt per back-off period), so the
//! api keeps accepting jobs into the outbox without waiting on RabbitMQ.

use std::time::{Duration, Instant};

use lapin::{
    options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable},
    BasicProperties, Channel, Confirmation, Connection,
};
use tokio::sync::Mutex;

use super::{connect, JobMessage, Topology, ANALYZE_ROUTING_KEY, CONNECT_TIMEOUT};

/// How long after a failed connection attempt the publisher fails without retrying.
const RECONNECT_BACKOFF: Duration = Duration::from_secs(2);
/// Longest wait for the broker's confirm of one message.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("RabbitMQ is unavailable: {0}")]
    Unavailable(String),
    #[error("RabbitMQ refused the message (nack)")]
    Nacked,
    #[error("RabbitMQ could not route the message to {0}")]
    Unroutable(String),
    #[error("RabbitMQ did not confirm the message in time")]
    ConfirmTimeout,
    #[error(transparent)]
    Amqp(#[from] lapin::Error),
}

/// One queue's counts, as the broker reports them.
#[derive(Debug, Clone, serde::Serialize)]
pub struct QueueStats {
    pub name: String,
    /// `work`, `dead_letter` or `delay`.
    pub role: &'static str,
    /// Ready messages (not those delivered and awaiting an ack).
    pub messages: u32,
    pub consumers: u32,
}

/// What a publish (or a batch of them) has learnt of the delay queues.
#[derive(Default)]
struct DelayQueues(std::collections::HashMap<String, bool>);

struct Link {
    connection: Connection,
    channel: Channel,
}

enum State {
    Disconnected { retry_at: Instant },
    Connected(Box<Link>),
}

pub struct Publisher {
    url: String,
    topology: Topology,
    state: Mutex<State>,
}

impl Publisher {
    pub fn new(url: impl Into<String>, topology: Topology) -> Self {
        Self { url: url.into(), topology, state: Mutex::new(State::Disconnected { retry_at: Instant::now() }) }
    }

    /// Publishes one job message as persistent and waits for the broker's confirm.
    pub async fn publish(&self, message: &JobMessage, traceparent: Option<&str>) -> Result<(), PublishError> {
        self.publish_after(message, std::time::Duration::ZERO, traceparent).await
    }

    /// Publishes for delivery after about `delay`: through the delay queue that fits
    /// (the default exchange routes by queue name), or at once for no delay. The
    /// trace it continues travels in the `traceparent` header.
    pub async fn publish_after(
        &self,
        message: &JobMessage,
        delay: std::time::Duration,
        traceparent: Option<&str>,
    ) -> Result<(), PublishError> {
        let result = match self.send(message, delay, traceparent, &mut DelayQueues::default()).await {
            Ok(confirm) => self.confirmed(confirm).await,
            Err(err) => Err(err),
        };
        self.reset_after(&result).await;
        result
    }

    /// Publishes many messages at once and waits for their confirms together: one
    /// round trip of confirms for the lot, not one per message. The results are in
    /// the order of `messages`.
    pub async fn publish_many(
        &self,
        messages: &[(JobMessage, std::time::Duration, Option<String>)],
    ) -> Vec<Result<(), PublishError>> {
        let mut confirms = Vec::with_capacity(messages.len());
        // Each delay queue is checked once for the batch, not once per message.
        let mut delay_queues = DelayQueues::default();
        for (message, delay, traceparent) in messages {
            confirms.push(self.send(message, *delay, traceparent.as_deref(), &mut delay_queues).await);
        }
        let results = futures::future::join_all(confirms.into_iter().map(|sent| async move {
            match sent {
                Ok(confirm) => self.confirmed(confirm).await,
                Err(err) => Err(err),
            }
        }))
        .await;
        if let Some(failed) = results.iter().find(|r| r.is_err()) {
            self.reset_after(failed).await;
        }
        results
    }

    /// Sends one message; its confirm is awaited by `confirmed`.
    async fn send(
        &self,
        message: &JobMessage,
        delay: std::time::Duration,
        traceparent: Option<&str>,
        delay_queues: &mut DelayQueues,
    ) -> Result<lapin::PublisherConfirm, PublishError> {
        let payload = serde_json::to_vec(message).map_err(|e| PublishError::Unavailable(e.to_string()))?;
        let channel = self.channel().await?;
        let mut headers = FieldTable::default();
        if let Some(traceparent) = traceparent {
            headers.insert(crate::trace::HEADER.into(), AMQPValue::LongString(traceparent.into()));
        }
        let properties = BasicProperties::default()
            .with_delivery_mode(2) // persistent: survives a broker restart
            .with_content_type("application/json".into())
            .with_message_id(message.job_id().to_string().into())
            .with_headers(headers);
        // mandatory: an unroutable message comes back instead of vanishing.
        let options = BasicPublishOptions { mandatory: true, ..Default::default() };
        let now = (self.topology.jobs_exchange.as_str(), ANALYZE_ROUTING_KEY);
        let (exchange, routing_key) = if delay.is_zero() {
            now
        } else if self.delay_queue_available(self.topology.delay_queue(delay), delay_queues).await {
            ("", self.topology.delay_queue(delay))
        } else {
            // Late rather than lost: the broker would confirm a message routed to a
            // classic queue whose node is down, and drop it.
            tracing::warn!(job_id = %message.job_id(), "delay queue unavailable (its node is down?); publishing the retry without delay");
            now
        };
        Ok(channel.basic_publish(exchange.into(), routing_key.into(), options, &payload, properties).await?)
    }

    /// Waits for the broker's verdict on one message.
    async fn confirmed(&self, confirm: lapin::PublisherConfirm) -> Result<(), PublishError> {
        match tokio::time::timeout(CONFIRM_TIMEOUT, confirm).await {
            Err(_) => Err(PublishError::ConfirmTimeout),
            Ok(Err(err)) => Err(err.into()),
            Ok(Ok(Confirmation::Ack(None))) => Ok(()),
            Ok(Ok(Confirmation::Ack(Some(_)))) => Err(PublishError::Unroutable(self.topology.analyze_queue.clone())),
            Ok(Ok(Confirmation::Nack(_))) => Err(PublishError::Nacked),
            Ok(Ok(Confirmation::NotRequested)) => Err(PublishError::Unavailable("confirms not enabled".into())),
        }
    }

    /// A broken channel or a lost confirm: the next publish reconnects.
    async fn reset_after(&self, result: &Result<(), PublishError>) {
        if matches!(result, Err(PublishError::Amqp(_) | PublishError::ConfirmTimeout)) {
            self.reset().await;
        }
    }

    /// Whether the broker answers now: connects if needed (readiness probe).
    pub async fn check(&self) -> Result<(), PublishError> {
        self.channel().await.map(drop)
    }

    /// Messages ready and consumers of each of the topology's queues, read with passive
    /// declares on a channel of their own (a failed passive declare closes its channel).
    pub async fn queue_stats(&self) -> Result<Vec<QueueStats>, PublishError> {
        self.channel().await?;
        let stats = async {
            let channel = match &*self.state.lock().await {
                State::Connected(link) => link.connection.create_channel().await?,
                State::Disconnected { .. } => return Err(std::io::Error::other("disconnected").into()),
            };
            let passive = QueueDeclareOptions { passive: true, ..Default::default() };
            let mut stats = Vec::new();
            for (role, name) in self.topology.queues() {
                let queue = channel.queue_declare(name.into(), passive, FieldTable::default()).await?;
                stats.push(QueueStats {
                    name: name.to_owned(),
                    role,
                    messages: queue.message_count(),
                    consumers: queue.consumer_count(),
                });
            }
            let _ = channel.close(200, "done".into()).await;
            Ok::<_, lapin::Error>(stats)
        };
        match tokio::time::timeout(CONFIRM_TIMEOUT, stats).await {
            Ok(result) => result.map_err(PublishError::from),
            Err(_) => Err(PublishError::ConfirmTimeout),
        }
    }

    /// Whether `queue` (a delay queue) can take a message now, asked once per publish
    /// or batch. Only retries pay for it.
    async fn delay_queue_available(&self, queue: &str, known: &mut DelayQueues) -> bool {
        if let Some(available) = known.0.get(queue) {
            return *available;
        }
        let available = self.check_delay_queue(queue).await;
        known.0.insert(queue.to_owned(), available);
        available
    }

    /// A passive declare on a channel of its own (a failed one closes its channel).
    async fn check_delay_queue(&self, queue: &str) -> bool {
        let check = async {
            let channel = match &*self.state.lock().await {
                State::Connected(link) => link.connection.create_channel().await?,
                State::Disconnected { .. } => return Err(std::io::Error::other("disconnected").into()),
            };
            let passive = QueueDeclareOptions { passive: true, ..Default::default() };
            channel.queue_declare(queue.into(), passive, FieldTable::default()).await?;
            let _ = channel.close(200, "done".into()).await;
            Ok::<_, lapin::Error>(())
        };
        matches!(tokio::time::timeout(CONFIRM_TIMEOUT, check).await, Ok(Ok(())))
    }

    async fn channel(&self) -> Result<Channel, PublishError> {
        let mut state = self.state.lock().await;
        if let State::Connected(link) = &*state {
            if link.connection.status().connected() && link.channel.status().connected() {
                return Ok(link.channel.clone());
            }
        }
        if let State::Disconnected { retry_at } = &*state {
            if Instant::now() < *retry_at {
                return Err(PublishError::Unavailable("backing off after a failed connection".into()));
            }
        }
        match self.open().await {
            Ok(link) => {
                let channel = link.channel.clone();
                *state = State::Connected(Box::new(link));
                Ok(channel)
            }
            Err(err) => {
                *state = State::Disconnected { retry_at: Instant::now() + RECONNECT_BACKOFF };
                Err(PublishError::Unavailable(err.to_string()))
            }
        }
    }

    /// Connects (to the first node of the list that answers), declares and enables
    /// confirms, all of it bounded in time: brokers that accept TCP but stall must not
    /// hold every submit behind this lock for a connect timeout per node.
    async fn open(&self) -> Result<Link, lapin::Error> {
        let setup = async {
            // Named after the topology, so an operator (or a test) can find this one.
            let connection = connect(&self.url, &format!("ultra-publisher {}", self.topology.jobs_exchange)).await?;
            let channel = connection.create_channel().await?;
            self.topology.declare(&channel).await?;
            // Without them only retries suffer (see `publish_after`): not a reason to refuse jobs.
            if let Err(err) = self.topology.declare_delay_queues(&connection).await {
                tracing::warn!(error = %err, "cannot declare the delay queues (their node is down?)");
            }
            channel.confirm_select(ConfirmSelectOptions::default()).await?;
            Ok::<_, lapin::Error>(Link { connection, channel })
        };
        let setup = tokio::time::timeout(CONNECT_TIMEOUT * 3, setup).await;
        match setup {
            Ok(Ok(link)) => Ok(link),
            Ok(Err(err)) => Err(err),
            Err(_) => Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "RabbitMQ set-up timed out").into()),
        }
    }

    async fn reset(&self) {
        *self.state.lock().await = State::Disconnected { retry_at: Instant::now() };
    }

    /// Closes the connection cleanly (shutdown).
    pub async fn close(&self) {
        let mut state = self.state.lock().await;
        if let State::Connected(link) = &*state {
            let _ = link.connection.close(200, "shutdown".into()).await;
        }
        *state = State::Disconnected { retry_at: Instant::now() };
    }
}
