//! Dispatch: a worker per target delivers what the store has queued, with
//! retries, backoff, a rate limit, a concurrency cap and a circuit breaker;
//! a retention task purges what is finished.

mod breaker;
pub mod client;
pub mod retry;
mod upkeep;
mod worker;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::{mpsc, watch, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use breaker::CircuitState;
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
/// reads and steers them, reload adds to them.
#[derive(Debug, Default)]
pub struct Workers(RwLock<HashMap<String, Handle>>);

impl Workers {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Handle>> {
        // A panic while holding the lock cannot leave the map half-changed.
        self.0.read().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn wake<'a>(&self, targets: impl IntoIterator<Item = &'a str>) {
        let workers = self.read();
        for t in targets {
            if let Some(h) = workers.get(t) {
                // Stores a permit if the worker is busy, so no wake is lost.
                h.wake.notify_one();
            }
        }
    }

    /// The targets that have a worker.
    pub fn names(&self) -> Vec<String> {
        self.read().keys().cloned().collect()
    }

    /// Wakes every worker.
    pub fn wake_all(&self) {
        for h in self.read().values() {
            h.wake.notify_one();
        }
    }

    /// The live state of a target's worker; `None` for an unknown target.
    pub fn status(&self, target: &str) -> Option<TargetStatus> {
        self.read().get(target).map(|h| *h.status.borrow())
    }

    /// Waits, at most `limit`, until a target's worker shows `paused` (a
    /// pause or resume is applied by the worker a moment after it is sent).
    pub async fn settled(&self, target: &str, paused: bool, limit: Duration) -> bool {
        let status = self.read().get(target).map(|h| h.status.clone());
        let Some(mut status) = status else { return false };
        let applied = tokio::time::timeout(limit, status.wait_for(|s| s.paused == paused)).await;
        matches!(applied, Ok(Ok(_)))
    }

    /// Sends an order to a target's worker; false for an unknown target.
    pub async fn control(&self, target: &str, control: Control) -> bool {
        let sender = self.read().get(target).map(|h| h.control.clone());
        match sender {
            Some(tx) => tx.send(control).await.is_ok(),
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
    store: Arc<dyn Store>,
    metrics: Metrics,
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
    ) -> Result<Dispatcher, DispatchError> {
        let (tasks, shutdown) = (TaskTracker::new(), CancellationToken::new());
        tasks.spawn(upkeep::purge(store.clone(), retention, shutdown.child_token()));
        let dispatcher = Dispatcher { workers: Arc::default(), store, metrics, tasks, shutdown };
        let paused = dispatcher.store.paused_targets().await?;
        for target in targets {
            dispatcher.spawn_worker(target, paused.contains(&target.name))?;
        }
        let listed = targets.iter().map(|t| t.name.clone()).collect();
        let unlisted = upkeep::name_unlisted(dispatcher.store.clone(), listed, dispatcher.shutdown.child_token());
        dispatcher.tasks.spawn(unlisted);
        if let Some(notices) = dispatcher.store.notices() {
            let follow = upkeep::follow_notices(
                notices,
                dispatcher.store.clone(),
                dispatcher.workers.clone(),
                dispatcher.shutdown.child_token(),
            );
            dispatcher.tasks.spawn(follow);
        }
        Ok(dispatcher)
    }

    fn spawn_worker(&self, target: &Arc<Target>, paused: bool) -> Result<(), DispatchError> {
        self.metrics.declare_target(&target.name);
        let wake = Arc::new(Notify::new());
        let (control_tx, control) = mpsc::channel(8);
        let (status_tx, status) = watch::channel(TargetStatus { in_flight: 0, circuit: CircuitState::Closed, paused });
        let worker = worker::Worker::new(
            target.clone(),
            self.store.clone(),
            self.metrics.clone(),
            paused,
            worker::Links { wake: wake.clone(), control, status: status_tx },
            self.shutdown.child_token(),
        )
        .map_err(|message| DispatchError::Target { target: target.name.clone(), message })?;
        self.tasks.spawn(worker.run());
        let gauge = upkeep::gauge_queue(
            target.name.clone(),
            self.store.clone(),
            self.metrics.clone(),
            self.shutdown.child_token(),
        );
        self.tasks.spawn(gauge);
        let mut workers = self.workers.0.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        workers.insert(target.name.clone(), Handle { wake, control: control_tx, status });
        Ok(())
    }

    /// Applies a reloaded target list: new targets get a worker, existing
    /// ones take their new settings without dropping what is in flight. A
    /// target no longer listed keeps its worker, with its last settings,
    /// so that its queue drains (delivered or dead-lettered).
    pub async fn apply(&self, targets: &[Arc<Target>]) -> Result<(), DispatchError> {
        let paused = self.store.paused_targets().await?;
        for target in targets {
            let known = self.workers.read().contains_key(&target.name);
            if known {
                self.workers.control(&target.name, Control::Reconfigure(target.clone())).await;
            } else {
                self.spawn_worker(target, paused.contains(&target.name))?;
                tracing::info!(target = %target.name, "target added");
            }
        }
        let names: Vec<String> = self.workers.read().keys().cloned().collect();
        for name in names.iter().filter(|n| !targets.iter().any(|t| &t.name == *n)) {
            tracing::warn!(target = %name, "target removed from the config: its queued deliveries drain with its last settings");
        }
        Ok(())
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
