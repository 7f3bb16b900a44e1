//! hookrelay: a webhook relay gateway. It authenticates webhooks from a CMS,
//! stores them durably, answers `202` at once and delivers them to internal
//! targets with retries.
//!
//! # Layout
//!
//! The modules follow a webhook's way through the relay:
//!
//! - [`config`]: `routes.yaml`, parsed, validated and resolved into settings.
//! - [`ingress`]: the listener (HTTP/1.1, HTTP/2, TLS), source authentication
//!   ([`ingress::auth`]) and payload formats ([`ingress::formats`]).
//! - [`jq`]: route filters and target transforms (jq programs, by jaq),
//!   run in a sandbox process under a time and memory limit.
//! - [`store`]: the [`store::Store`] trait and its sled implementation, with
//!   a single writer thread doing group commit.
//! - [`dispatch`]: a worker per target delivering from the store's queue with
//!   retries, rate limit, concurrency cap and circuit breaker; retention.
//! - [`admin`]: the admin listener (metrics, health, the `/admin/*` API).
//! - [`listen`]: the accept loop and connection serving both listeners share.
//! - [`metrics`]: the Prometheus metrics.
//! - [`logging`]: log lines written to stderr by a thread of their own, so
//!   that a log reader that falls behind never holds an ack.
//! - [`app`]: wiring for `hookrelay serve`.
#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod config;
pub mod dispatch;
pub mod ingress;
pub mod jq;
pub mod listen;
pub mod logging;
pub mod metrics;
pub mod preview;
pub mod receive;
pub mod respond;
pub mod send;
pub mod store;
