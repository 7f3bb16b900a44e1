//! Dispatch: a worker per target delivers what the store has queued, with
//! retries, backoff, a rate limit, a concurrency cap and a circuit breaker;
//! a retention task purges what is finished.

mod breaker;
pub mod client;
pub mod retry;
mod upkeep;
mod worker;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use breaker::{Breaker, CircuitState, Permit};

use crate::config::Target;
use crate::metrics::Metrics;
use crate::store::{Store, StoreError};

/// How ingress tells workers that new deliveries are queued.
#[derive(Debug, Default)]
pub struct Wakers(HashMap<String, Arc<Notify>>);

impl Wakers {
    pub fn wake<'a>(&self, targets: impl IntoIterator<Item = &'a str>) {
        for t in targets {
            if let Some(n) = self.0.get(t) {
                // Stores a permit if the worker is busy, so no wake is lost.
                n.notify_one();
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    #[error("target {target}: {message}")]
    Target { target: String, message: String },
    #[error("{0}")]
    Store(#[from] StoreError),
}

/// The running workers.
pub struct Dispatcher {
    wakers: Arc<Wakers>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

impl Dispatcher {
    /// Starts a worker for each target, a queue-size gauge task for each, and
    /// the retention task.
    pub async fn start(
        targets: &[Arc<Target>],
        store: Arc<dyn Store>,
        metrics: Metrics,
        retention: Duration,
        shutdown: CancellationToken,
    ) -> Result<Dispatcher, DispatchError> {
        let paused = store.paused_targets().await?;
        let tasks = TaskTracker::new();
        let mut wakers = HashMap::new();
        for target in targets {
            let wake = Arc::new(Notify::new());
            let worker = worker::Worker::new(
                target.clone(),
                store.clone(),
                metrics.clone(),
                paused.contains(&target.name),
                wake.clone(),
                shutdown.child_token(),
            )
            .map_err(|message| DispatchError::Target { target: target.name.clone(), message })?;
            tasks.spawn(worker.run());
            tasks.spawn(upkeep::gauge_queue(
                target.name.clone(),
                store.clone(),
                metrics.clone(),
                shutdown.child_token(),
            ));
            wakers.insert(target.name.clone(), wake);
        }
        tasks.spawn(upkeep::purge(store, retention, shutdown.child_token()));
        Ok(Dispatcher { wakers: Arc::new(Wakers(wakers)), tasks, shutdown })
    }

    pub fn wakers(&self) -> Arc<Wakers> {
        self.wakers.clone()
    }

    /// Stops every worker; attempts in flight are abandoned and stay pending.
    pub async fn stop(&self, grace: Duration) {
        self.shutdown.cancel();
        self.tasks.close();
        if tokio::time::timeout(grace, self.tasks.wait()).await.is_err() {
            tracing::warn!("delivery workers still running after the grace period");
        }
    }
}
