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

use tokio::sync::{mpsc, watch, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use breaker::{Breaker, CircuitState, Permit};
pub use worker::{Control, TargetStatus};

use crate::config::Target;
use crate::metrics::Metrics;
use crate::store::{Store, StoreError};

/// One running worker, as others reach it.
#[derive(Debug)]
struct Handle {
    /// Rung when new deliveries are queued for it.
    wake: Arc<Notify>,
    control: mpsc::Sender<Control>,
    status: watch::Receiver<TargetStatus>,
}

/// The running workers, by target name: ingress wakes them, the admin API
/// reads and steers them.
#[derive(Debug, Default)]
pub struct Workers(HashMap<String, Handle>);

impl Workers {
    pub fn wake<'a>(&self, targets: impl IntoIterator<Item = &'a str>) {
        for t in targets {
            if let Some(h) = self.0.get(t) {
                // Stores a permit if the worker is busy, so no wake is lost.
                h.wake.notify_one();
            }
        }
    }

    /// The live state of a target's worker; `None` for an unknown target.
    pub fn status(&self, target: &str) -> Option<TargetStatus> {
        self.0.get(target).map(|h| *h.status.borrow())
    }

    /// Sends an operator's order to a target's worker; false for an unknown target.
    pub async fn control(&self, target: &str, control: Control) -> bool {
        match self.0.get(target) {
            Some(h) => h.control.send(control).await.is_ok(),
            None => false,
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
    workers: Arc<Workers>,
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
        let mut workers = HashMap::new();
        for target in targets {
            let wake = Arc::new(Notify::new());
            let (control_tx, control) = mpsc::channel(8);
            let is_paused = paused.contains(&target.name);
            let (status_tx, status) =
                watch::channel(TargetStatus { in_flight: 0, circuit: CircuitState::Closed, paused: is_paused });
            let worker = worker::Worker::new(
                target.clone(),
                store.clone(),
                metrics.clone(),
                is_paused,
                worker::Links { wake: wake.clone(), control, status: status_tx },
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
            workers.insert(target.name.clone(), Handle { wake, control: control_tx, status });
        }
        tasks.spawn(upkeep::purge(store, retention, shutdown.child_token()));
        Ok(Dispatcher { workers: Arc::new(Workers(workers)), tasks, shutdown })
    }

    pub fn workers(&self) -> Arc<Workers> {
        self.workers.clone()
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
