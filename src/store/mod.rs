//! Durable storage of events and their deliveries, behind the [`Store`] trait
//! so that a networked backend can stand beside the embedded sled one.

mod layout;
mod records;
mod sled_store;
mod writer;

use async_trait::async_trait;

pub use records::*;
pub use sled_store::SledStore;
pub use writer::CommitStats;

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("storage I/O failed: {0}")]
    Io(String),
    #[error("storage is closed (shutting down)")]
    Closed,
    #[error("corrupt record {key}: {detail}")]
    Corrupt { key: String, detail: String },
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        StoreError::Io(e.to_string())
    }
}

impl From<std::io::Error> for StoreError {
    fn from(e: std::io::Error) -> Self {
        StoreError::Io(e.to_string())
    }
}

/// What the rest of hookrelay needs from storage.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Stores a verified webhook and one pending delivery per target in one
    /// atomic step, unless an event with the same dedup key was stored within
    /// the source's window, and returns once that is durable on disk (a power
    /// cut does not undo it). Concurrent calls share one disk flush.
    async fn ingest(&self, event: NewEvent) -> Result<Ingested, StoreError>;

    /// One event with its payload, or `None`.
    async fn event(&self, id: EventId) -> Result<Option<StoredEvent>, StoreError>;

    /// The newest events first, of one source or of all, at most `limit`.
    async fn recent_events(
        &self,
        source: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(EventId, EventMeta)>, StoreError>;

    /// The delivery records of one event, one per target.
    async fn deliveries(&self, id: EventId) -> Result<Vec<Delivery>, StoreError>;

    /// Finishes the writes in progress, flushes, and refuses further writes.
    async fn close(&self) -> Result<(), StoreError>;
}
