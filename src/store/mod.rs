//! Durable storage of events and their deliveries, behind the [`Store`] trait
//! so that a networked backend can stand beside the embedded sled one.

#[cfg(test)]
pub(crate) mod conformance;
mod null;
mod postgres;
mod records;
mod sled;

use std::collections::HashSet;

use async_trait::async_trait;

pub use self::postgres::{lease_for, parse_url as parse_pg_url, PgOptions, PgStore, SCHEMA_VERSION};
pub use self::sled::{CommitStats, SledStore};
pub use null::NullStore;
pub use records::*;

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("storage I/O failed: {0}")]
    Io(String),
    #[error("storage is closed (shutting down)")]
    Closed,
    /// An fsync failed: what the kernel dropped is unknown, so every later
    /// write is refused until the process restarts and recovers from disk.
    #[error("storage failed, writes are refused until restart: {0}")]
    Failed(String),
    #[error("corrupt record {key}: {detail}")]
    Corrupt { key: String, detail: String },
}

impl From<::sled::Error> for StoreError {
    fn from(e: ::sled::Error) -> Self {
        StoreError::Io(e.to_string())
    }
}

impl From<std::io::Error> for StoreError {
    fn from(e: std::io::Error) -> Self {
        StoreError::Io(e.to_string())
    }
}

/// What an instance sharing a store hears from the others.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// Deliveries of this target were queued or released.
    Queued(String),
    /// Anything may have been queued (notices were missed).
    AnyQueued,
    /// This target was paused or resumed.
    Paused { target: String, paused: bool },
    /// An instance opened this target's circuit for `open_ms`.
    CircuitOpened { target: String, open_ms: u64 },
    /// The target told an instance (429, `Retry-After`) to send nothing
    /// for `wait_ms`.
    AskedToWait { target: String, wait_ms: u64 },
}

/// What the rest of hookrelay needs from storage.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Stores a verified webhook with the targets it is to be delivered to
    /// (each delivery pending from then on) in one atomic step, unless an
    /// event with the same dedup key was stored within the source's window,
    /// and returns once that is durable on disk (a power cut does not undo
    /// it). Concurrent calls share one disk flush.
    async fn ingest(&self, event: NewEvent) -> Result<Ingested, StoreError>;

    /// One event with its payload, or `None`.
    async fn event(&self, id: EventId) -> Result<Option<StoredEvent>, StoreError>;

    /// The newest events first, of one source or of all: the first page of
    /// [`Store::events_before`].
    async fn recent_events(&self, source: Option<&str>, limit: usize) -> Result<Vec<(EventId, EventMeta)>, StoreError> {
        Ok(self.events_before(None, source, limit).await?.events)
    }

    /// The events received before the event `before` (paging back from
    /// where a page ended), or from the newest for `None`, newest first, of
    /// one source or of all. At most `limit` events are examined, so a page
    /// of one source may hold fewer, even none, while more remain (a
    /// backend without an index by source reads no further):
    /// `next_before` tells where the next page starts.
    async fn events_before(
        &self,
        before: Option<EventId>,
        source: Option<&str>,
        limit: usize,
    ) -> Result<EventsPage, StoreError>;

    /// The delivery records of one event, one per target.
    async fn deliveries(&self, id: EventId) -> Result<Vec<Delivery>, StoreError>;

    /// Up to `limit` deliveries of `target` due at `now_ms`, leaving out
    /// those in `skip` (in flight): retries due first, then deliveries never
    /// tried, by arrival. Only events whose ingest is durable are handed out.
    async fn due(
        &self,
        target: &str,
        now_ms: u64,
        limit: usize,
        skip: &HashSet<EventId>,
    ) -> Result<DueBatch, StoreError>;

    /// A target's limits, which a store that several instances share holds
    /// over all of them in [`Store::due`]: no more attempts in flight than
    /// `concurrency` (an attempt counts until its outcome is recorded), no
    /// more started than the rate allows, counted across instances. A store
    /// that one process owns leaves them to its worker.
    fn share(&self, _target: &str, _share: Share) {}

    /// How long a worker whose queue ran dry lets wakes gather before it
    /// reads the queue again: zero where a read is cheap (a store in this
    /// process); a few milliseconds where each read is a transaction on a
    /// database that instances share, so that webhooks arriving one by one
    /// are handed out a few at a time, not each by a read of its own.
    fn read_gather(&self) -> std::time::Duration {
        std::time::Duration::ZERO
    }

    /// Records an attempt at a delivery handed out by [`Store::due`] and moves
    /// it on. If the delivery was requeued meanwhile (by an operator), the
    /// attempt is recorded and the new queue position kept.
    async fn complete(
        &self,
        target: &str,
        due: &DueDelivery,
        attempt: Attempt,
        next: NextStep,
    ) -> Result<(), StoreError>;

    /// Closes the debounce group whose newest event `due` is (handed out with
    /// `group` set), as its first attempt starts: the group's other events
    /// end `coalesced` into it, and events arriving later form the next
    /// group. Returns the delivery to attempt, standing for the group's
    /// events; `None` when the hand-out is stale (a newer event joined the
    /// group since: it is due later).
    async fn close_group(&self, target: &str, due: &DueDelivery) -> Result<Option<DueDelivery>, StoreError>;

    /// Tells the instances sharing the store that this one opened a
    /// target's circuit for `open_for`, so that they hold too (nothing to
    /// tell where no other instance shares it). Where instances share the
    /// store, the circuit is the cluster's: until `open_for` has passed,
    /// [`Store::due`] hands out none of the target's deliveries (once
    /// [`Store::share`] was called for it), then one at a time (the probe),
    /// to one instance at a time, until the target answers the probe (its
    /// outcome, recorded by [`Store::complete`], closes the circuit).
    async fn circuit_opened(&self, _target: &str, _open_for: std::time::Duration) -> Result<(), StoreError> {
        Ok(())
    }

    /// Tells the instances sharing the store that the target asked (429,
    /// `Retry-After`) that nothing be sent for `wait`: the target's limit
    /// is on all of them, so they wait too.
    async fn asked_to_wait(&self, _target: &str, _wait: std::time::Duration) -> Result<(), StoreError> {
        Ok(())
    }

    /// Holds or releases a target's queue; survives restarts.
    async fn set_paused(&self, target: &str, paused: bool) -> Result<(), StoreError>;

    /// The targets paused by [`Store::set_paused`].
    async fn paused_targets(&self) -> Result<HashSet<String>, StoreError>;

    /// Queued and dead deliveries of a target (kept up to date by every write).
    async fn counts(&self, target: &str) -> Result<TargetCounts, StoreError>;

    /// Every target with queued deliveries, and how many: at start, those a
    /// config no longer lists are named, since nothing delivers them.
    async fn queued_targets(&self) -> Result<std::collections::BTreeMap<String, u64>, StoreError>;

    /// Removes events received before `cutoff_ms` whose deliveries are all
    /// delivered or dead, examining at most `limit` events after `after`.
    /// Returns how many were removed and the last event examined (where the
    /// next call goes on), `None` when it reached the end.
    async fn purge(
        &self,
        cutoff_ms: u64,
        after: Option<EventId>,
        limit: usize,
    ) -> Result<(usize, Option<EventId>), StoreError>;

    /// Removes dedup records whose window had passed at `now_ms`, at most
    /// `limit` of them (one webhook's entry on PostgreSQL, one ingest
    /// round's on sled). Returns how many were removed: fewer than `limit`
    /// once none are left. An expired record answers no lookup; this frees
    /// its space, so the caller repeats it until the end.
    async fn purge_dedup(&self, now_ms: u64, limit: usize) -> Result<usize, StoreError>;

    /// Queues a delivery again, due now, whatever its state (delivered,
    /// dead or pending); one still in an open debounce group is queued
    /// already, and stays in it. False when the event is unknown or was not
    /// routed to `target`.
    async fn requeue(&self, target: &str, id: EventId) -> Result<bool, StoreError>;

    /// Dead-lettered deliveries, of one target or of all, newest event
    /// first: every dead letter of the `limit` newest events that have one,
    /// received before the event `before` (paging back from where a page
    /// ended). An event's dead letters are in one page, by target.
    async fn dead_letters(
        &self,
        target: Option<&str>,
        before: Option<EventId>,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, StoreError>;

    /// What the instances sharing the store tell each other (this one
    /// included), for a backend that several instances share; `None` for
    /// one that only this process writes.
    fn notices(&self) -> Option<tokio::sync::broadcast::Receiver<Notice>> {
        None
    }

    /// False once the store has failed for good (see [`StoreError::Failed`]).
    fn healthy(&self) -> bool {
        true
    }

    /// Finishes the writes in progress, flushes, and refuses further writes.
    async fn close(&self) -> Result<(), StoreError>;
}
