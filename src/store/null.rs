//! A store that keeps nothing: the no-store baseline of the ingest benchmark,
//! and a storage that refuses every write, for tests of the 503 path.

use std::collections::HashSet;

use async_trait::async_trait;

use super::*;

/// Answers every ingest with `Accepted` (or with `refuse`), and holds nothing.
#[derive(Debug, Default)]
pub struct NullStore {
    /// When set, every ingest fails with this error.
    pub refuse: Option<StoreError>,
}

#[async_trait]
impl Store for NullStore {
    async fn ingest(&self, event: NewEvent) -> Result<Ingested, StoreError> {
        match &self.refuse {
            Some(e) => Err(e.clone()),
            None => Ok(Ingested::Accepted { id: event.id, targets: event.targets.len() }),
        }
    }
    async fn event(&self, _: EventId) -> Result<Option<StoredEvent>, StoreError> {
        Ok(None)
    }
    async fn events_before(&self, _: Option<EventId>, _: Option<&str>, _: usize) -> Result<EventsPage, StoreError> {
        Ok(EventsPage::default())
    }
    async fn deliveries(&self, _: EventId) -> Result<Vec<Delivery>, StoreError> {
        Ok(Vec::new())
    }
    async fn due(&self, _: &str, _: u64, _: usize, _: &HashSet<EventId>) -> Result<DueBatch, StoreError> {
        Ok(DueBatch::default())
    }
    async fn complete(&self, _: &str, _: &DueDelivery, _: Attempt, _: NextStep) -> Result<(), StoreError> {
        Ok(())
    }
    async fn close_group(&self, _: &str, _: &DueDelivery) -> Result<Option<DueDelivery>, StoreError> {
        Ok(None)
    }
    async fn set_paused(&self, _: &str, _: bool) -> Result<(), StoreError> {
        Ok(())
    }
    async fn paused_targets(&self) -> Result<HashSet<String>, StoreError> {
        Ok(HashSet::new())
    }
    async fn counts(&self, _: &str) -> Result<TargetCounts, StoreError> {
        Ok(TargetCounts::default())
    }
    async fn queued_targets(&self) -> Result<std::collections::BTreeMap<String, u64>, StoreError> {
        Ok(Default::default())
    }
    async fn purge(&self, _: u64, _: Option<EventId>, _: usize) -> Result<(usize, Option<EventId>), StoreError> {
        Ok((0, None))
    }
    async fn purge_dedup(&self, _: u64, _: usize) -> Result<usize, StoreError> {
        Ok(0)
    }
    async fn requeue(&self, _: &str, _: EventId) -> Result<bool, StoreError> {
        Ok(false)
    }
    async fn dead_letters(&self, _: Option<&str>, _: Option<EventId>, _: usize) -> Result<Vec<DeadLetter>, StoreError> {
        Ok(Vec::new())
    }
    async fn close(&self) -> Result<(), StoreError> {
        Ok(())
    }
}
