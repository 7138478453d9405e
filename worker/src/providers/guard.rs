//! The defences around every provider: a concurrency limit per provider and per model
//! (so one slow model cannot take every slot), the context-window check before
//! calling, a total deadline, and a circuit breaker per provider that opens after
//! consecutive failures and lets one probe through after a cool-down. The breaker's
//! open state is mirrored in Redis so `/v1/models` on any api replica can show it.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use common::{
    catalog::{Catalog, ProviderSpec},
    redis::RedisHandle,
};
use tokio::sync::Semaphore;

use super::{collect, openai::estimate_tokens, Completion, CompletionRequest, Provider, ProviderError};

/// Where breakers publish their open state: `{prefix}:circuit:{provider}`, expiring
/// when the cool-down does.
#[derive(Clone)]
pub struct CircuitBoard {
    pub redis: RedisHandle,
    pub prefix: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Circuit {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// One probe is in flight since then; everyone else still fails fast. A probe
    /// that never reports (its task was aborted) is replaced after a call's timeout.
    HalfOpen {
        since: Instant,
    },
}

pub struct Guarded {
    name: String,
    client: Arc<dyn Provider>,
    provider_slots: Arc<Semaphore>,
    model_slots: HashMap<String, Arc<Semaphore>>,
    timeout: Duration,
    breaker_failures: u32,
    cooldown: Duration,
    circuit: Mutex<Circuit>,
    board: Option<CircuitBoard>,
}

impl Guarded {
    pub fn new(
        name: &str,
        spec: &ProviderSpec,
        client: Arc<dyn Provider>,
        catalog: &Catalog,
        board: Option<CircuitBoard>,
    ) -> Self {
        let model_slots = catalog
            .models()
            .filter(|m| m.provider == name)
            .map(|m| (m.id.clone(), Arc::new(Semaphore::new(m.concurrency.max(1) as usize))))
            .collect();
        Self {
            name: name.to_owned(),
            client,
            provider_slots: Arc::new(Semaphore::new(spec.concurrency.max(1) as usize)),
            model_slots,
            timeout: Duration::from_secs(spec.timeout_secs.max(1)),
            breaker_failures: spec.breaker_failures.max(1),
            cooldown: Duration::from_secs(spec.breaker_cooldown_secs),
            circuit: Mutex::new(Circuit::Closed { failures: 0 }),
            board,
        }
    }

    /// Calls the provider within every limit; `on_delta` sees the text as it streams.
    pub async fn complete(
        &self,
        request: &CompletionRequest<'_>,
        on_delta: impl FnMut(&str) + Send,
    ) -> Result<Completion, ProviderError> {
        let model = request.model;
        let prompt_tokens = estimate_tokens(request.prompt.chars().count());
        let wanted = request.max_tokens.unwrap_or(model.max_output_tokens);
        if i64::from(prompt_tokens) + i64::from(wanted) > i64::from(model.context_window) {
            return Err(ProviderError::ContextTooLong(format!(
                "about {prompt_tokens} prompt tokens plus {wanted} output tokens exceed the {} token context window",
                model.context_window
            )));
        }
        // The model's slot first: calls queued for a saturated model must not sit on
        // provider slots that other models could use. The circuit is consulted last,
        // so calls that waited in line do not reach a provider that failed meanwhile.
        let _model_slot = match self.model_slots.get(&model.id) {
            Some(slots) => Some(slots.acquire().await.map_err(|_| ProviderError::CircuitOpen)?),
            None => None,
        };
        let _provider_slot = self.provider_slots.acquire().await.map_err(|_| ProviderError::CircuitOpen)?;
        self.admit()?;
        let call = async { collect(self.client.stream(request).await?, on_delta).await };
        let result = tokio::time::timeout(self.timeout, call).await.unwrap_or(Err(ProviderError::Timeout));
        self.record(&result).await;
        result
    }

    /// Whether the circuit lets this call through.
    fn admit(&self) -> Result<(), ProviderError> {
        let mut circuit = self.circuit.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        match *circuit {
            Circuit::Closed { .. } => Ok(()),
            Circuit::Open { until } if Instant::now() >= until => {
                *circuit = Circuit::HalfOpen { since: Instant::now() };
                tracing::info!(provider = %self.name, "circuit half-open: letting one call through");
                Ok(())
            }
            Circuit::HalfOpen { since } if since.elapsed() > self.timeout => {
                *circuit = Circuit::HalfOpen { since: Instant::now() };
                tracing::info!(provider = %self.name, "the last probe never reported; letting another through");
                Ok(())
            }
            Circuit::Open { .. } | Circuit::HalfOpen { .. } => Err(ProviderError::CircuitOpen),
        }
    }

    /// Counts the outcome. Only failures of the provider itself (overload, timeouts,
    /// broken connections) move the breaker; a refused request says nothing about it.
    async fn record(&self, result: &Result<Completion, ProviderError>) {
        let provider_failed = matches!(
            result,
            Err(ProviderError::Overloaded { .. }
                | ProviderError::Timeout
                | ProviderError::Connection(_)
                | ProviderError::Truncated(_)
                | ProviderError::RateLimited { .. })
        );
        let transition = {
            let mut circuit = self.circuit.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let next = match (*circuit, provider_failed) {
                (Circuit::HalfOpen { .. }, true) => Circuit::Open { until: Instant::now() + self.cooldown },
                (Circuit::Closed { failures }, true) if failures + 1 >= self.breaker_failures => {
                    Circuit::Open { until: Instant::now() + self.cooldown }
                }
                (Circuit::Closed { failures }, true) => Circuit::Closed { failures: failures + 1 },
                (Circuit::Open { until }, _) => Circuit::Open { until },
                (_, false) => Circuit::Closed { failures: 0 },
            };
            let opened = matches!(next, Circuit::Open { .. }) && !matches!(*circuit, Circuit::Open { .. });
            let closed =
                matches!(next, Circuit::Closed { failures: 0 }) && matches!(*circuit, Circuit::HalfOpen { .. });
            *circuit = next;
            (opened, closed)
        };
        match transition {
            (true, _) => {
                tracing::warn!(provider = %self.name, cooldown_s = self.cooldown.as_secs(), "circuit opened");
                self.publish(true).await;
            }
            (_, true) => {
                tracing::info!(provider = %self.name, "circuit closed");
                self.publish(false).await;
            }
            _ => {}
        }
    }

    /// Whether calls fail fast right now.
    pub fn is_open(&self) -> bool {
        let circuit = self.circuit.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        match *circuit {
            Circuit::Open { until } => Instant::now() < until,
            Circuit::HalfOpen { since } => since.elapsed() <= self.timeout,
            Circuit::Closed { .. } => false,
        }
    }

    async fn publish(&self, open: bool) {
        let Some(board) = &self.board else { return };
        let key = common::catalog::circuit_key(&board.prefix, &self.name);
        let result =
            if open { board.redis.set_flag(&key, self.cooldown).await } else { board.redis.clear_flag(&key).await };
        if let Err(err) = result {
            tracing::debug!(error = %err, "circuit state not shared (redis unavailable)");
        }
    }
}
