//! End-to-end tests of Ultra against real PostgreSQL, RabbitMQ and Redis. The only
//! fake is the LLM: the deterministic mock provider.

mod accounts;
mod auth;
mod batches;
mod cancel;
mod client_ip;
mod connections;
mod console;
mod delivery;
mod events;
mod health;
mod idempotency;
mod jobs;
mod jwt;
mod leases;
mod limits;
mod openai;
mod openapi;
mod operations;
mod outages;
mod pipeline;
mod processes;
mod providers;
mod proxy;
mod retention;
mod services;
mod sse;
mod submit;
mod support;
mod webhooks;
