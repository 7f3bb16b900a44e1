//! The embedded store: sled, one tree (see [`layout`]), every write
//! through the single writer, and a sync that survives power loss.

use std::collections::HashSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;

mod dedup;
mod layout;
mod sequence;
mod writer;

use self::layout::{decode_event, delivery_key, event_key, queue_key};
pub use self::writer::CommitStats;
use self::writer::Writer;
use super::*;

pub struct SledStore {
    db: ::sled::Db,
    writer: Writer,
}

impl SledStore {
    /// Opens (or creates) the store in `path` with a page cache of `cache_bytes`.
    pub fn open(path: &Path, cache_bytes: u64) -> Result<Self, StoreError> {
        let db = open_db(path, cache_bytes)?;
        let mut syncer = DiskSync::new(path, db.clone())?;
        Self::start(db, move || syncer.sync())
    }

    /// The store on `db`, made durable by `sync`.
    fn start(
        db: ::sled::Db,
        sync: impl FnMut() -> Result<(), StoreError> + Send + 'static,
    ) -> Result<Self, StoreError> {
        let writer = Writer::start(db.clone(), sync)?;
        Ok(SledStore { db, writer })
    }

    /// How many rounds the writer ran, and how long their batch and flush took.
    pub fn commit_stats(&self) -> &CommitStats {
        &self.writer.stats
    }

    fn get_meta(&self, id: EventId) -> Result<Option<EventMeta>, StoreError> {
        let key = event_key(id);
        self.db.get(&key)?.map(|v| layout::decode_meta(&key, &v)).transpose()
    }

    fn progress(&self) -> Result<std::sync::MutexGuard<'_, writer::Progress>, StoreError> {
        self.writer.progress.lock().map_err(|_| StoreError::Io("storage progress lock poisoned".into()))
    }

    fn get_event(&self, id: EventId) -> Result<Option<(EventMeta, bytes::Bytes)>, StoreError> {
        let key = event_key(id);
        self.db.get(&key)?.map(|v| decode_event(&key, &v)).transpose()
    }
}

#[async_trait]
impl Store for SledStore {
    async fn ingest(&self, event: NewEvent) -> Result<Ingested, StoreError> {
        self.writer.ingest(event).await
    }

    async fn event(&self, id: EventId) -> Result<Option<StoredEvent>, StoreError> {
        Ok(self.get_event(id)?.map(|(meta, body)| StoredEvent { id, meta, body }))
    }

    async fn events_before(
        &self,
        before: Option<EventId>,
        source: Option<&str>,
        limit: usize,
    ) -> Result<EventsPage, StoreError> {
        // Ids are UUIDv7, so key order is arrival order: walk it backwards,
        // `limit` events at most, whatever their source (no index by source).
        let mut page = EventsPage::default();
        let end = before.map_or_else(|| b"e0".to_vec(), event_key);
        for (examined, item) in self.db.range(b"e/".to_vec()..end).rev().enumerate() {
            if examined >= limit {
                return Ok(page);
            }
            let (k, v) = item?;
            let id = layout::id_of(&k)?;
            page.next_before = Some(id);
            let meta = layout::decode_meta(&k, &v)?;
            if source.is_none_or(|s| s == meta.source) {
                page.events.push((id, meta));
            }
        }
        page.next_before = None;
        Ok(page)
    }

    async fn deliveries(&self, id: EventId) -> Result<Vec<Delivery>, StoreError> {
        let Some(meta) = self.get_meta(id)? else {
            return Ok(Vec::new());
        };
        let mut out = Vec::with_capacity(meta.targets.len());
        for target in &meta.targets {
            let found = layout::get_json::<DeliveryRecord>(&self.db, &delivery_key(target, id))?;
            let untried = found.is_none();
            // No record yet: pending since receipt (or until its group's time), never tried.
            let mut record = found.unwrap_or_else(|| DeliveryRecord::pending(meta.received_ms));
            if let (true, Some(key)) = (untried, meta.group.get(target)) {
                let group = layout::get_json::<sequence::Group>(&self.db, &sequence::group_key(target, key))?;
                if let Some(group) = group {
                    record.state = DeliveryState::Pending { due_ms: group.due_ms() };
                }
            }
            let waiting_for = match (&record.state, meta.order.get(target)) {
                (DeliveryState::Pending { .. }, Some(key)) => {
                    sequence::head(&self.db, target, key)?.filter(|head| *head != id)
                }
                _ => None,
            };
            out.push(Delivery { event_id: id, target: target.clone(), record, waiting_for });
        }
        Ok(out)
    }

    async fn due(
        &self,
        target: &str,
        now_ms: u64,
        limit: usize,
        skip: &HashSet<EventId>,
    ) -> Result<DueBatch, StoreError> {
        let (from, durable) = {
            let mut progress = self.progress()?;
            let cursor = progress.cursors.get(target).map(|(id, _)| *id);
            let walk = progress.walks.entry(target.to_string()).or_insert_with(|| writer::Walk::at(cursor));
            (walk.start(cursor, skip), progress.durable)
        };
        let (mut batch, walked_to) = layout::read_due(&self.db, target, now_ms, limit, skip, from, durable)?;
        let mut progress = self.progress()?;
        if !progress.until_durable.is_empty() {
            // Let go by the round being made durable: not yet (the outcome
            // that let it go wakes the worker once it is).
            let hidden = &progress.until_durable;
            batch.due.retain(|d| match d.group {
                true => !self
                    .get_meta(d.event_id)
                    .ok()
                    .flatten()
                    .and_then(|m| m.group.get(target).map(|k| hidden.contains(&sequence::closed_key(target, k))))
                    .unwrap_or(false),
                false => !d.queued || !hidden.contains(&queue_key(target, d.due_ms, d.event_id)),
            });
        }
        let walk = progress.walks.entry(target.to_string()).or_insert_with(|| writer::Walk::at(from));
        let moved = walk.walked(walked_to, batch.due.iter().filter(|d| !d.queued).map(|d| d.event_id));
        let cursor = progress.cursors.get(target).map(|(id, _)| *id);
        if let Some(moved) = moved.filter(|m| Some(*m) > cursor) {
            // One worker per target reads its queue, so nothing moved it meanwhile.
            progress.cursors.insert(target.to_string(), (moved, false));
        }
        Ok(batch)
    }

    async fn complete(
        &self,
        target: &str,
        due: &DueDelivery,
        attempt: Attempt,
        next: NextStep,
    ) -> Result<(), StoreError> {
        let done = layout::Completion { target: target.to_string(), due: due.clone(), attempt, next };
        self.writer.complete(done).await?;
        if let Some(walk) = self.progress()?.walks.get_mut(target) {
            walk.recorded(due.event_id);
        }
        Ok(())
    }

    async fn close_group(&self, target: &str, due: &DueDelivery) -> Result<Option<DueDelivery>, StoreError> {
        let Some(meta) = self.get_meta(due.event_id)? else { return Ok(None) };
        let Some(group_of) = meta.group.get(target).cloned() else { return Ok(Some(due.clone())) };
        let (target, handed) = (target.to_string(), due.clone());
        self.writer
            .mutate(move |db, tally| {
                let id = handed.event_id;
                match sequence::plan_close(db, tally, &target, &group_of, id, handed.due_ms, now_ms())? {
                    Some((batch, stands_for)) => {
                        Ok((batch, Some(DueDelivery { group: false, coalesced: stands_for, ..handed })))
                    }
                    None => Ok((::sled::Batch::default(), None)),
                }
            })
            .await
    }

    async fn set_paused(&self, target: &str, paused: bool) -> Result<(), StoreError> {
        let key = layout::pause_key(target);
        self.writer
            .mutate(move |_, _| {
                let mut batch = ::sled::Batch::default();
                if paused {
                    batch.insert(key, &[]);
                } else {
                    batch.remove(key);
                }
                Ok((batch, ()))
            })
            .await
    }

    async fn paused_targets(&self) -> Result<HashSet<String>, StoreError> {
        self.db
            .scan_prefix(b"p/")
            .keys()
            .map(|k| k.map(|k| String::from_utf8_lossy(&k[2..]).into_owned()).map_err(StoreError::from))
            .collect()
    }

    async fn counts(&self, target: &str) -> Result<TargetCounts, StoreError> {
        let key = layout::counts_key(target);
        match self.db.get(&key)? {
            Some(v) => layout::decode_counts(&key, &v),
            None => Ok(TargetCounts::default()),
        }
    }

    async fn queued_targets(&self) -> Result<std::collections::BTreeMap<String, u64>, StoreError> {
        let mut queued = std::collections::BTreeMap::new();
        for item in self.db.scan_prefix(layout::counts_key("")) {
            let (k, v) = item?;
            let counts = layout::decode_counts(&k, &v)?;
            if counts.queued > 0 {
                queued.insert(String::from_utf8_lossy(&k[2..]).into_owned(), counts.queued);
            }
        }
        Ok(queued)
    }

    async fn purge(
        &self,
        cutoff_ms: u64,
        after: Option<EventId>,
        limit: usize,
    ) -> Result<(usize, Option<EventId>), StoreError> {
        self.writer
            .mutate(move |db, tally| {
                let (batch, purged, last) = layout::plan_purge(db, tally, cutoff_ms, after, limit)?;
                Ok((batch, (purged, last)))
            })
            .await
    }

    async fn purge_dedup(&self, now_ms: u64, limit: usize) -> Result<usize, StoreError> {
        self.writer.mutate(move |db, _| layout::plan_purge_dedup(db, now_ms, limit)).await
    }

    async fn requeue(&self, target: &str, id: EventId) -> Result<bool, StoreError> {
        let target = target.to_string();
        self.writer
            .mutate(move |db, tally| match layout::plan_requeue(db, tally, &target, id, now_ms())? {
                Some(batch) => Ok((batch, true)),
                None => Ok((::sled::Batch::default(), false)),
            })
            .await
    }

    async fn dead_letters(
        &self,
        target: Option<&str>,
        before: Option<EventId>,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        layout::read_dead_letters(&self.db, target, before, limit)
    }

    fn healthy(&self) -> bool {
        !self.writer.failed()
    }

    async fn close(&self) -> Result<(), StoreError> {
        self.writer.stop();
        if self.writer.failed() {
            // What was acknowledged is on disk already; sled cannot flush now.
            return Err(StoreError::Failed("closed after a storage failure".into()));
        }
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || db.flush()).await.map_err(|e| StoreError::Io(e.to_string()))??;
        Ok(())
    }
}

fn open_db(path: &Path, cache_bytes: u64) -> Result<::sled::Db, StoreError> {
    let db = ::sled::Config::new()
        .path(path)
        .cache_capacity(cache_bytes)
        .open()
        .map_err(|e| StoreError::Io(format!("cannot open storage at {}: {e}", path.display())))?;
    check_layout(&db, path)?;
    Ok(db)
}

/// Marks a new store with the layout's version, and refuses a store that
/// holds events in another layout (it would be misread).
fn check_layout(db: &::sled::Db, path: &Path) -> Result<(), StoreError> {
    match db.get(layout::VERSION_KEY)? {
        Some(v) if v == layout::VERSION => Ok(()),
        None if db.scan_prefix(b"e/").next().is_none() => {
            db.insert(layout::VERSION_KEY, layout::VERSION)?;
            Ok(())
        }
        found => Err(StoreError::Io(format!(
            "storage at {} is in layout {} but this hookrelay reads layout {}: deliver or move its events with \
             the hookrelay that wrote them, or start from an empty storage.path",
            path.display(),
            found.map_or("1".into(), |v| String::from_utf8_lossy(&v).into_owned()),
            String::from_utf8_lossy(layout::VERSION),
        ))),
    }
}

/// Makes sled's writes survive a power cut. sled 0.34's `flush` ends with
/// `sync_file_range`, which leaves data in the disk's volatile cache, and it
/// writes large values to files under `blobs/` without syncing them at all.
/// So after each flush: `fdatasync` the log file, and `fsync` every new blob
/// file and the `blobs` folder that names it.
struct DiskSync {
    db: ::sled::Db,
    log: File,
    blobs_dir: PathBuf,
    synced_blobs: HashSet<std::ffi::OsString>,
    /// The folder's mtime the last listing of `blobs/` saw, and when it began.
    last_scan: Option<(SystemTime, SystemTime)>,
}

/// Directory times come from a coarse clock; a listing is skipped only when
/// the folder's last change is this much older than the previous listing.
const MTIME_SLACK: Duration = Duration::from_millis(100);

/// Whether `blobs/` must be listed again: unless its mtime (`changed`) is
/// the one the last listing saw, and that listing began well after it (so
/// that nothing added in the same tick of a coarse clock was missed). The
/// mtime is compared with the one seen, not with the wall clock: a clock
/// stepped back would make a new file look older than the last listing.
fn must_list(changed: SystemTime, last: Option<(SystemTime, SystemTime)>) -> bool {
    last.is_none_or(|(seen, scan)| changed != seen || seen + MTIME_SLACK >= scan)
}

impl DiskSync {
    fn new(path: &Path, db: ::sled::Db) -> Result<Self, StoreError> {
        // fdatasync works on the inode, so a read-only handle of our own suffices.
        let log = File::open(path.join("db"))?;
        // sled writes `conf` when it creates a store and never syncs it: a
        // power cut could leave it empty (it was, under LazyFS). Sync it, and
        // then the folder, so that the names of sled's new files are durable too.
        let conf = path.join("conf");
        if conf.exists() {
            File::open(&conf)?.sync_all()?;
        }
        File::open(path)?.sync_all()?;
        Ok(DiskSync { db, log, blobs_dir: path.join("blobs"), synced_blobs: HashSet::new(), last_scan: None })
    }

    fn sync(&mut self) -> Result<(), StoreError> {
        // sled refuses every write after an I/O error of its own (a full
        // disk, say) until it is reopened: that is fatal here too.
        self.db.flush().map_err(|e| StoreError::Failed(format!("sled could not write: {e}")))?;
        // After a failed fsync the kernel may have dropped the dirty pages and
        // marked them clean: a later fsync would "succeed" without them.
        let fatal = |e: StoreError| StoreError::Failed(format!("fsync failed: {e}"));
        self.log.sync_data().map_err(|e| fatal(e.into()))?;
        self.sync_blobs().map_err(fatal)
    }

    fn sync_blobs(&mut self) -> Result<(), StoreError> {
        // Listing the folder every round is costly; its mtime tells whether
        // anything was added since the last listing began.
        let changed = std::fs::metadata(&self.blobs_dir)?.modified()?;
        if !must_list(changed, self.last_scan) {
            return Ok(());
        }
        self.last_scan = Some((changed, SystemTime::now()));
        let mut present = HashSet::new();
        let mut new_blob = false;
        for entry in std::fs::read_dir(&self.blobs_dir)? {
            let name = entry?.file_name();
            if !self.synced_blobs.contains(&name) {
                match File::open(self.blobs_dir.join(&name)) {
                    Ok(f) => f.sync_all()?,
                    // sled removed it between read_dir and open: nothing to keep.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e.into()),
                }
                new_blob = true;
            }
            present.insert(name);
        }
        if new_blob {
            File::open(&self.blobs_dir)?.sync_all()?;
        }
        self.synced_blobs = present;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn meets_the_store_contract() {
        crate::store::conformance::run(Box::new(|| {
            Box::pin(async {
                let dir = tempfile::tempdir().expect("tempdir");
                let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path(), 8 << 20).expect("open"));
                (store, dir)
            })
        }))
        .await;
    }

    fn event(body: Vec<u8>) -> NewEvent {
        event_to(body, &["search"])
    }

    fn event_to(body: Vec<u8>, targets: &[&str]) -> NewEvent {
        NewEvent {
            id: EventId::new(),
            source: "s".into(),
            event: "page.published".into(),
            dedup_key: String::from_utf8_lossy(&body).into_owned(),
            dedup_window: Duration::from_secs(600),
            content_type: Some("application/json".into()),
            body: bytes::Bytes::from(body),
            targets: targets.iter().map(|t| t.to_string()).collect(),
            received_ms: now_ms(),
            sequenced: Vec::new(),
        }
    }

    async fn accepted(store: &SledStore, ev: NewEvent) -> EventId {
        match store.ingest(ev).await.unwrap() {
            Ingested::Accepted { id, .. } => id,
            other => panic!("{other:?}"),
        }
    }

    async fn due_of(store: &SledStore, id: EventId) -> DueDelivery {
        let batch = store.due("search", now_ms() + 1, 100, &HashSet::new()).await.unwrap();
        batch.due.into_iter().find(|d| d.event_id == id).expect("due")
    }

    /// Takes the due delivery of `id` to `target` and finishes it with `next`.
    async fn finish(store: &SledStore, target: &str, id: EventId, next: NextStep) {
        let batch = store.due(target, now_ms() + 1, 100, &HashSet::new()).await.unwrap();
        let due = batch.due.into_iter().find(|d| d.event_id == id).expect("due");
        let attempt = Attempt { at_ms: now_ms(), duration_ms: 1, status: Some(200), error: None };
        store.complete(target, &due, attempt, next).await.unwrap();
    }

    fn sequenced(mut ev: NewEvent, how: &[(&str, Sequenced)]) -> NewEvent {
        ev.targets = how.iter().map(|(t, _)| t.to_string()).collect();
        ev.sequenced = how.iter().map(|(t, h)| (t.to_string(), h.clone())).collect();
        ev
    }

    /// Without an index by source, a page examines `limit` events at most:
    /// a source that matches nothing does not read the whole store.
    #[tokio::test]
    async fn a_page_of_one_source_examines_limit_events_at_most() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), 8 << 20).unwrap();
        let mut ids = Vec::new();
        for n in 0..5u8 {
            ids.push(accepted(&store, event(vec![n])).await);
        }
        let page = store.events_before(None, Some("typo"), 3).await.unwrap();
        assert_eq!(page, EventsPage { events: Vec::new(), next_before: Some(ids[2]) });
        let page = store.events_before(page.next_before, Some("typo"), 3).await.unwrap();
        assert_eq!(page, EventsPage::default(), "the end");
    }

    /// A round's webhooks share one batch: one refused because a record it
    /// reads is unreadable must leave nothing of its own in it.
    #[tokio::test]
    async fn a_webhook_refused_for_an_unreadable_record_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), 8 << 20).unwrap();
        store.db.insert(sequence::group_key("grouped", "k"), b"garbage".to_vec()).unwrap();
        let how = [
            ("ordered", Sequenced::Ordered { key: "k".into() }),
            ("grouped", Sequenced::Grouped { key: "k".into(), window_ms: 1_000, max_wait_ms: 5_000 }),
        ];
        assert!(store.ingest(sequenced(event(b"1".to_vec()), &how)).await.is_err());
        assert!(store.db.scan_prefix(b"e/").next().is_none(), "its event was written");
        assert!(sequence::head(&store.db, "ordered", "k").unwrap().is_none(), "it joined the order queue");
        assert_eq!(store.counts("ordered").await.unwrap(), TargetCounts::default());
    }

    /// An unreadable delivery record does not stop its delivery: its
    /// outcome is recorded (the attempts counted afresh), and one that
    /// releases a delivery whose record is unreadable releases it afresh.
    /// Before, the outcome failed, and the delivery was handed out and sent
    /// again every second, for ever.
    #[tokio::test]
    async fn an_unreadable_delivery_record_does_not_stop_its_delivery_or_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), 8 << 20).unwrap();
        let how = [("search", Sequenced::Ordered { key: "k".into() })];
        let first = accepted(&store, sequenced(event(b"1".to_vec()), &how)).await;
        let next = accepted(&store, sequenced(event(b"2".to_vec()), &how)).await;
        let due = due_of(&store, first).await;
        store.db.insert(delivery_key("search", next), b"garbage".to_vec()).unwrap();
        let attempt = Attempt { at_ms: now_ms(), duration_ms: 1, status: Some(503), error: None };
        store.complete("search", &due, attempt.clone(), NextStep::RetryAt(now_ms())).await.unwrap();
        store.db.insert(delivery_key("search", first), b"garbage".to_vec()).unwrap();
        let retry = due_of(&store, first).await;
        store.complete("search", &retry, attempt, NextStep::Delivered).await.expect("recorded");
        let record = layout::get_json::<DeliveryRecord>(&store.db, &delivery_key("search", first)).unwrap().unwrap();
        assert!(matches!(record.state, DeliveryState::Delivered { .. }), "{:?}", record.state);
        assert_eq!(record.attempts.len(), 1, "counted afresh");
        assert_eq!(sequence::head(&store.db, "search", "k").unwrap(), Some(next));
        assert_eq!(due_of(&store, next).await.event_id, next, "released afresh");
    }

    /// An outcome's writes join the round's others: one refused because the
    /// key queue it must read to release the next is unreadable writes
    /// nothing of its own.
    #[tokio::test]
    async fn an_outcome_refused_for_an_unreadable_queue_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), 8 << 20).unwrap();
        let how = [("search", Sequenced::Ordered { key: "k".into() })];
        let first = accepted(&store, sequenced(event(b"1".to_vec()), &how)).await;
        accepted(&store, sequenced(event(b"2".to_vec()), &how)).await;
        let due = due_of(&store, first).await;
        let chunk = store.db.scan_prefix(sequence::order_prefix("search", "k")).keys().next().unwrap().unwrap();
        store.db.insert(chunk.clone(), b"garbage".to_vec()).unwrap();
        let attempt = Attempt { at_ms: now_ms(), duration_ms: 1, status: Some(200), error: None };
        let done = layout::Completion { target: "search".into(), due, attempt, next: NextStep::Delivered };
        let (mut tally, mut batch) = (layout::Tally::default(), ::sled::Batch::default());
        assert!(layout::complete_into(&store.db, &mut tally, &mut batch, &done, now_ms(), &mut |_| true).is_err());
        // As the round would: applied with the others.
        store.db.apply_batch(batch).unwrap();
        assert!(store.db.get(delivery_key("search", first)).unwrap().is_none(), "its record was written");
        assert_eq!(store.db.get(chunk).unwrap().as_deref(), Some(&b"garbage"[..]), "its queue was rewritten");
    }

    /// A key's next group waits for the earlier group's delivery; if that
    /// delivery's record is unreadable, it does not wait (an error there
    /// failed every read of the target's queue).
    #[tokio::test]
    async fn a_group_waiting_for_an_unreadable_delivery_does_not_stop_the_queue() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), 8 << 20).unwrap();
        let how = [("search", Sequenced::Grouped { key: "k".into(), window_ms: 1, max_wait_ms: 1 })];
        let first = accepted(&store, sequenced(event(b"1".to_vec()), &how)).await;
        let later = now_ms() + 10_000;
        let handed = store.due("search", later, 10, &HashSet::new()).await.unwrap().due;
        assert_eq!(handed.iter().map(|d| d.event_id).collect::<Vec<_>>(), [first]);
        store.close_group("search", &handed[0]).await.unwrap().expect("closed");
        let second = accepted(&store, sequenced(event(b"2".to_vec()), &how)).await;
        let skip = HashSet::from([first]);
        assert!(store.due("search", later, 10, &skip).await.unwrap().due.is_empty(), "waits for the first");
        store.db.insert(delivery_key("search", first), b"garbage".to_vec()).unwrap();
        let due = store.due("search", later, 10, &skip).await.expect("the queue is read");
        assert_eq!(due.due.iter().map(|d| d.event_id).collect::<Vec<_>>(), [second]);
    }

    #[tokio::test]
    async fn a_rounds_outcomes_are_applied_as_one_batch() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SledStore::open(dir.path(), 8 << 20).unwrap());
        for n in 0..40u8 {
            accepted(&store, event(vec![n])).await;
        }
        let handed = store.due("search", now_ms(), 100, &HashSet::new()).await.unwrap().due;
        assert_eq!(handed.len(), 40);
        let stats = store.commit_stats();
        let (rounds, batches) = (stats.flushes.load(Ordering::Relaxed), stats.batches.load(Ordering::Relaxed));
        let outcomes: Vec<_> = handed
            .into_iter()
            .map(|due| {
                let store = store.clone();
                tokio::spawn(async move {
                    let attempt = Attempt { at_ms: now_ms(), duration_ms: 1, status: Some(200), error: None };
                    store.complete("search", &due, attempt, NextStep::Delivered).await
                })
            })
            .collect();
        for o in outcomes {
            o.await.unwrap().unwrap();
        }
        let rounds = stats.flushes.load(Ordering::Relaxed) - rounds;
        let batches = stats.batches.load(Ordering::Relaxed) - batches;
        assert_eq!(batches, rounds, "one sled batch per round, not one per outcome");
        assert!(rounds < 40, "40 outcomes at once took {rounds} rounds");
        assert_eq!(store.counts("search").await.unwrap().queued, 0);
        assert!(store.due("search", now_ms(), 100, &HashSet::new()).await.unwrap().due.is_empty());
    }

    /// A store whose rounds can be held between their apply and their sync.
    struct Gated {
        store: Arc<SledStore>,
        hold: Arc<std::sync::atomic::AtomicBool>,
        entered: Option<std::sync::mpsc::Receiver<()>>,
        go: std::sync::mpsc::Sender<()>,
    }

    impl Gated {
        fn open(path: &Path) -> Gated {
            let hold = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let (entered_tx, entered) = std::sync::mpsc::channel();
            let (go, go_rx) = std::sync::mpsc::channel::<()>();
            let held = hold.clone();
            let sync = move || {
                if held.load(Ordering::SeqCst) {
                    let _ = entered_tx.send(());
                    let _ = go_rx.recv_timeout(Duration::from_secs(10));
                }
                Ok(())
            };
            let store = Arc::new(SledStore::start(open_db(path, 8 << 20).unwrap(), sync).unwrap());
            Gated { store, hold, entered: Some(entered), go }
        }

        /// Records `due`'s success in a round that stays applied and not
        /// yet durable until [`Gated::release`]; returns once it is applied.
        async fn complete_held(&mut self, due: DueDelivery) -> tokio::task::JoinHandle<Result<(), StoreError>> {
            self.hold.store(true, Ordering::SeqCst);
            let store = self.store.clone();
            let completing = tokio::spawn(async move {
                let attempt = Attempt { at_ms: now_ms(), duration_ms: 1, status: Some(200), error: None };
                store.complete("search", &due, attempt, NextStep::Delivered).await
            });
            let entered = self.entered.take().expect("one held round");
            let entered = tokio::task::spawn_blocking(move || entered.recv_timeout(Duration::from_secs(10)));
            entered.await.unwrap().expect("the round's sync started");
            completing
        }

        fn release(&self) {
            self.hold.store(false, Ordering::SeqCst);
            self.go.send(()).unwrap();
        }
    }

    /// The end of a key's head releases the next delivery in the same
    /// batch; that one is not handed out before the batch is durable (a
    /// crash meanwhile would send the head again, after it).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_released_delivery_waits_until_the_end_that_released_it_is_durable() {
        let dir = tempfile::tempdir().unwrap();
        let mut gated = Gated::open(dir.path());
        let store = gated.store.clone();
        let ordered = |body: &str| sequenced(event(body.into()), &[("search", Sequenced::Ordered { key: "k".into() })]);
        let a = accepted(&store, ordered("1")).await;
        let b = accepted(&store, ordered("2")).await;
        let completing = gated.complete_held(due_of(&store, a).await).await;
        assert_eq!(store.db.scan_prefix(b"q/").count(), 1, "A's end is applied, B released");
        let during = store.due("search", now_ms() + 1, 10, &HashSet::from([a])).await.unwrap();
        assert!(during.due.is_empty(), "B handed out before A's end is durable: {:?}", ids(&during));
        gated.release();
        completing.await.unwrap().unwrap();
        assert_eq!(ids(&store.due("search", now_ms() + 1, 10, &HashSet::new()).await.unwrap()), vec![b]);
    }

    /// The same for a key's next debounce group, let go by the end of the
    /// earlier group's delivery.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_next_group_waits_until_the_end_that_let_it_go_is_durable() {
        let dir = tempfile::tempdir().unwrap();
        let mut gated = Gated::open(dir.path());
        let store = gated.store.clone();
        let grouped = |body: &str| {
            let how = Sequenced::Grouped { key: "k".into(), window_ms: 1, max_wait_ms: 1 };
            sequenced(event(body.into()), &[("search", how)])
        };
        let first = accepted(&store, grouped("1")).await;
        tokio::time::sleep(Duration::from_millis(5)).await;
        let handed = due_of(&store, first).await;
        let closed = store.close_group("search", &handed).await.unwrap().expect("closed");
        let second = accepted(&store, grouped("2")).await;
        tokio::time::sleep(Duration::from_millis(5)).await;
        let waiting = store.due("search", now_ms() + 1, 10, &HashSet::from([first])).await.unwrap();
        assert!(waiting.due.is_empty(), "the next group waits for the first's delivery");
        let completing = gated.complete_held(closed).await;
        let during = store.due("search", now_ms() + 1, 10, &HashSet::from([first])).await.unwrap();
        assert!(during.due.is_empty(), "the next group handed out before the first's end is durable");
        gated.release();
        completing.await.unwrap().unwrap();
        assert_eq!(ids(&store.due("search", now_ms() + 1, 10, &HashSet::new()).await.unwrap()), vec![second]);
    }

    #[tokio::test]
    async fn an_attempt_reporting_after_its_event_was_purged_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), 8 << 20).unwrap();
        let id = accepted(&store, event(b"x".to_vec())).await;
        let due = due_of(&store, id).await;
        store.db.remove(event_key(id)).unwrap();
        let attempt = Attempt { at_ms: now_ms(), duration_ms: 1, status: None, error: Some("event gone".into()) };
        store.complete("search", &due, attempt, NextStep::Dead("event gone".into())).await.unwrap();
        assert!(store.db.scan_prefix(b"d/").next().is_none() && store.db.scan_prefix(b"x/").next().is_none());
        assert_eq!(store.counts("search").await.unwrap(), TargetCounts { queued: 1, dead: 0, held: 0 });
    }

    #[tokio::test]
    async fn an_unreadable_event_does_not_stop_the_purge() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), 8 << 20).unwrap();
        let bad = accepted(&store, event_to(b"1".to_vec(), &[])).await;
        let fine = accepted(&store, event_to(b"2".to_vec(), &[])).await;
        store.db.insert(event_key(bad), b"garbage".to_vec()).unwrap();
        assert_eq!(store.purge(now_ms() + 60_000, None, 100).await.unwrap(), (1, None));
        assert!(store.db.contains_key(event_key(bad)).unwrap(), "kept for an operator");
        assert!(store.event(fine).await.unwrap().is_none());
    }

    /// Opens a closed store again. sled's background threads may hold the
    /// old instance's file lock for a moment after it is dropped.
    fn reopen(path: &Path) -> SledStore {
        open_when_unlocked(path).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Opens the store at `path` once the sled handle opened there before is
    /// gone: sled's own threads may hold its file lock a moment after the
    /// handle is dropped (5 s at most).
    fn open_when_unlocked(path: &Path) -> Result<SledStore, StoreError> {
        for _ in 0..100 {
            match SledStore::open(path, 8 << 20) {
                Err(e) if e.to_string().contains("could not acquire lock") => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                opened => return opened,
            }
        }
        panic!("the store is still locked after 5 s")
    }

    fn ids(batch: &DueBatch) -> Vec<EventId> {
        batch.due.iter().map(|d| d.event_id).collect()
    }

    #[tokio::test]
    async fn first_attempts_are_found_by_walking_the_events_routed_to_the_target() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), 8 << 20).unwrap();
        let one = accepted(&store, event_to(b"1".to_vec(), &["a"])).await;
        let two = accepted(&store, event_to(b"2".to_vec(), &["b"])).await;
        let three = accepted(&store, event_to(b"3".to_vec(), &["a", "b"])).await;
        let batch = store.due("a", now_ms(), 100, &HashSet::new()).await.unwrap();
        assert_eq!(ids(&batch), vec![one, three]);
        assert!(batch.due.iter().all(|d| !d.queued && d.tries == 0));
        assert_eq!(ids(&store.due("a", now_ms(), 100, &HashSet::from([one])).await.unwrap()), vec![three]);

        finish(&store, "a", one, NextStep::Delivered).await;
        assert_eq!(ids(&store.due("a", now_ms(), 100, &HashSet::new()).await.unwrap()), vec![three]);
        let cursor = store.progress().unwrap().cursors.get("a").map(|c| c.0);
        assert!(cursor >= Some(two) && cursor < Some(three), "moved over one and two, not three: {cursor:?}");
        assert_eq!(ids(&store.due("b", now_ms(), 1, &HashSet::new()).await.unwrap()), vec![two]);
        assert_eq!(store.counts("a").await.unwrap(), TargetCounts { queued: 1, dead: 0, held: 0 });
    }

    #[tokio::test]
    async fn an_unreadable_event_does_not_stop_the_walk() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), 8 << 20).unwrap();
        let bad = accepted(&store, event_to(b"1".to_vec(), &["a"])).await;
        let good = accepted(&store, event_to(b"2".to_vec(), &["a"])).await;
        store.db.insert(event_key(bad), b"garbage".to_vec()).unwrap();
        assert_eq!(ids(&store.due("a", now_ms(), 100, &HashSet::new()).await.unwrap()), vec![good]);
    }

    #[tokio::test]
    async fn workers_walk_no_further_than_the_newest_durable_event() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), 8 << 20).unwrap();
        let one = accepted(&store, event_to(b"1".to_vec(), &["a"])).await;
        accepted(&store, event_to(b"2".to_vec(), &["a"])).await;
        let none = HashSet::new();
        let (batch, walked) = layout::read_due(&store.db, "a", now_ms(), 100, &none, None, Some(one)).unwrap();
        assert_eq!((ids(&batch), walked), (vec![one], Some(one)));
        let (batch, _) = layout::read_due(&store.db, "a", now_ms(), 100, &none, None, None).unwrap();
        assert!(batch.due.is_empty(), "nothing is durable yet");
    }

    #[tokio::test]
    async fn cursors_counts_and_dedup_keys_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let (one, two, three) = {
            let store = SledStore::open(dir.path(), 8 << 20).unwrap();
            let one = accepted(&store, event(b"1".to_vec())).await;
            let two = accepted(&store, event(b"2".to_vec())).await;
            let three = accepted(&store, event(b"3".to_vec())).await;
            finish(&store, "search", one, NextStep::RetryAt(now_ms() + 60_000)).await;
            finish(&store, "search", two, NextStep::Dead("gone".into())).await;
            // A walk moves the cursor over both; the next round saves it.
            assert_eq!(ids(&store.due("search", now_ms(), 100, &HashSet::new()).await.unwrap()), vec![three]);
            store.set_paused("other", false).await.unwrap();
            store.close().await.unwrap();
            (one, two, three)
        };
        let store = reopen(dir.path());
        let cursor = store.progress().unwrap().cursors.get("search").map(|c| c.0);
        assert!(cursor >= Some(two) && cursor < Some(three), "{cursor:?}");
        assert_eq!(ids(&store.due("search", now_ms(), 100, &HashSet::new()).await.unwrap()), vec![three]);
        let later = store.due("search", now_ms() + 61_000, 100, &HashSet::new()).await.unwrap();
        assert_eq!(ids(&later), vec![one, three], "the retry, then the untried one");
        assert_eq!(store.counts("search").await.unwrap(), TargetCounts { queued: 2, dead: 1, held: 0 });
        assert_eq!(store.ingest(event(b"2".to_vec())).await.unwrap(), Ingested::Duplicate { id: two });
        assert!(store.requeue("search", two).await.unwrap());
        assert_eq!(store.counts("search").await.unwrap(), TargetCounts { queued: 3, dead: 0, held: 0 });
    }

    #[tokio::test]
    async fn a_dedup_key_is_new_again_once_its_window_has_passed() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), 8 << 20).unwrap();
        let mut first = event(b"x".to_vec());
        first.dedup_window = Duration::from_millis(50);
        let id = accepted(&store, first).await;
        let mut again = event(b"x".to_vec());
        again.dedup_window = Duration::from_millis(50);
        assert_eq!(store.ingest(again).await.unwrap(), Ingested::Duplicate { id });
        tokio::time::sleep(Duration::from_millis(60)).await;
        let mut later = event(b"x".to_vec());
        later.received_ms = now_ms();
        later.dedup_window = Duration::from_millis(50);
        assert!(matches!(store.ingest(later).await.unwrap(), Ingested::Accepted { .. }));
    }

    #[tokio::test]
    async fn a_store_in_an_older_layout_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = ::sled::open(dir.path()).unwrap();
            db.insert(event_key(EventId::new()), b"old".to_vec()).unwrap();
            db.flush().unwrap();
        }
        let err = open_when_unlocked(dir.path()).err().expect("refused").to_string();
        assert!(err.contains("layout 1") && err.contains(&dir.path().display().to_string()), "{err}");
    }

    #[test]
    fn the_blobs_folder_is_listed_again_whenever_its_mtime_moved() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let ms = Duration::from_millis;
        assert!(must_list(t, None), "the first time");
        assert!(!must_list(t, Some((t, t + ms(500)))), "unchanged, and listed well after its last change");
        assert!(must_list(t, Some((t, t + ms(50)))), "listed in the same tick: a file may have come after");
        assert!(must_list(t + ms(1), Some((t, t + ms(500)))), "changed since");
        assert!(must_list(t - ms(300), Some((t, t + ms(500)))), "changed, with the clock stepped back");
    }

    #[tokio::test]
    async fn a_large_body_goes_to_a_synced_blob_and_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let body: Vec<u8> = (0..300 * 1024).map(|i| (i % 251) as u8).collect();
        let id = {
            let store = SledStore::open(dir.path(), 8 << 20).unwrap();
            let Ingested::Accepted { id, .. } = store.ingest(event(body.clone())).await.unwrap() else {
                panic!("not accepted")
            };
            let blobs = std::fs::read_dir(dir.path().join("blobs")).unwrap().count();
            assert!(blobs > 0, "a 300 KiB value should be a sled blob");
            store.close().await.unwrap();
            id
        };
        let store = reopen(dir.path());
        let stored = store.event(id).await.unwrap().unwrap();
        assert_eq!(stored.body.as_ref(), body.as_slice());
        let deliveries = store.deliveries(id).await.unwrap();
        assert_eq!(deliveries.len(), 1);
        assert!(matches!(deliveries[0].record.state, DeliveryState::Pending { .. }));
    }
}
