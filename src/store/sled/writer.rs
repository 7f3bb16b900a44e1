//! The single writer: one thread applies every write, a round at a time.
//! A round takes all the jobs queued while the previous round ran, checks
//! their dedup keys, applies them as one sled batch, makes that durable with
//! one flush, then answers each job. Group commit and write batching are one
//! mechanism: concurrent requests share both the batch and the flush.
//!
//! Attempt outcomes ([`Writer::complete`]) are the most frequent writes
//! after ingests. sled seals and writes out its log buffer at every
//! `apply_batch`, so a round applies all of its outcomes as one batch, not
//! one each: their writes are to the delivery's own records, which no other
//! outcome of the round reads. An outcome that releases the next delivery of
//! an `order_by` key reads that key's queue, and is applied on its own.
//!
//! The thread owns what every write must see: the dedup index, the
//! targets' counts, and the newest event id (ids are made to rise in commit
//! order, so a worker walking the events never finds an older one appear
//! behind its cursor). It publishes the newest durable event and saves the
//! workers' cursors in [`Progress`].

use std::any::Any;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use tokio::sync::{mpsc, oneshot};

use super::dedup::DedupIndex;
use super::layout::{self, Completion, IngestRound, Tally};
use super::{now_ms, EventId, Ingested, NewEvent, StoreError, TargetCounts};

/// Jobs a round takes at most; more wait for the next round.
const MAX_ROUND: usize = 1024;
/// Jobs queued at most; past this, requests wait to enqueue (backpressure).
const QUEUE: usize = 8192;

/// Counters of the writer's work, for benchmarks and diagnostics.
#[derive(Debug, Default)]
pub struct CommitStats {
    /// Rounds run, each one flush.
    pub flushes: AtomicU64,
    /// Time spent applying and flushing rounds, in microseconds.
    pub flush_micros: AtomicU64,
    /// The slowest round, in microseconds (a reader may reset it).
    pub slowest_micros: AtomicU64,
    /// sled batches applied (each one writes out sled's log buffer).
    pub batches: AtomicU64,
}

type Answer = Box<dyn Any + Send>;

/// Reads what it needs and returns the batch to apply, with an answer, and
/// notes in the tally how it changes the targets' counts.
type Plan = Box<dyn FnOnce(&::sled::Db, &mut Tally) -> Result<(::sled::Batch, Answer), StoreError> + Send>;

/// Shared by the writer and the workers' reads.
#[derive(Debug, Default)]
pub struct Progress {
    /// The newest event whose round is durable: workers walk no further.
    pub durable: Option<EventId>,
    /// Per target, the cursor of its walk (see [`layout::read_due`]) and
    /// whether the writer has saved it since it moved.
    pub cursors: HashMap<String, (EventId, bool)>,
    /// Per target, where its next walk resumes (not saved).
    pub walks: HashMap<String, Walk>,
    /// Due entries applied in the round being made durable that are not to
    /// be handed out before it is ([`layout::Tally::until_durable`]).
    pub until_durable: HashSet<Vec<u8>>,
}

/// Where a target's walk for first attempts stands: it resumes after `to`
/// rather than at the cursor, which stays behind the oldest attempt out
/// (with 64 in flight, every read of the queue would examine them again).
#[derive(Debug, Default)]
pub struct Walk {
    /// The last event examined.
    pub to: Option<EventId>,
    /// First attempts handed out and not yet recorded.
    pub out: std::collections::BTreeSet<EventId>,
}

impl Walk {
    pub fn at(to: Option<EventId>) -> Walk {
        Walk { to, out: Default::default() }
    }

    /// Where the next walk starts: after the last event examined, or at
    /// `cursor` again when a first attempt handed out is no longer in
    /// `in_flight` and has no outcome recorded (it was abandoned, or the
    /// caller did not keep it).
    pub fn start(&mut self, cursor: Option<EventId>, in_flight: &HashSet<EventId>) -> Option<EventId> {
        if self.out.iter().any(|id| !in_flight.contains(id)) {
            self.out.retain(|id| in_flight.contains(id));
            self.to = cursor;
        }
        self.to
    }

    /// Notes a walk that examined the events up to `to` and handed out
    /// `handed`; returns where the cursor may move: just before the first
    /// attempt still out, since every event before it needs no walk.
    pub fn walked(&mut self, to: Option<EventId>, handed: impl IntoIterator<Item = EventId>) -> Option<EventId> {
        self.to = to.max(self.to);
        self.out.extend(handed);
        match self.out.first() {
            Some(first) => Some(EventId(uuid::Uuid::from_u128(first.0.as_u128().saturating_sub(1)))).min(self.to),
            None => self.to,
        }
    }

    /// An outcome of `id` is recorded: it no longer holds the cursor back.
    pub fn recorded(&mut self, id: EventId) {
        self.out.remove(&id);
    }
}

/// What the writer thread owns.
struct State {
    dedup: DedupIndex,
    counts: HashMap<String, TargetCounts>,
    newest: Option<EventId>,
    /// When expired dedup entries were last dropped.
    evicted_ms: u64,
}

impl State {
    /// Reads the counts, the live dedup entries and the cursors from `db`.
    fn load(db: &::sled::Db) -> Result<(State, Progress), StoreError> {
        let mut counts = HashMap::new();
        for item in db.scan_prefix(b"n/") {
            let (k, v) = item?;
            counts.insert(String::from_utf8_lossy(&k[2..]).into_owned(), layout::decode_counts(&k, &v)?);
        }
        let mut dedup = DedupIndex::default();
        for item in db.range(layout::key(b"k/", &[&now_ms().to_be_bytes()])..b"k0".to_vec()) {
            let (k, v) = item?;
            let (window, entries) = layout::decode_dedup_record(&k, &v)?;
            for entry in entries {
                dedup.insert(entry, window);
            }
        }
        let mut progress = Progress::default();
        for item in db.scan_prefix(b"c/") {
            let (k, v) = item?;
            let id = EventId::from_slice(&v).ok_or_else(|| layout::corrupt(&k, "bad cursor"))?;
            progress.cursors.insert(String::from_utf8_lossy(&k[2..]).into_owned(), (id, true));
        }
        let newest = match db.scan_prefix(b"e/").keys().next_back() {
            Some(k) => Some(layout::id_of(&k?)?),
            None => None,
        };
        progress.durable = newest;
        // New ids must also pass every cursor, even if the clock went back
        // and the events a cursor passed were purged.
        let newest = progress.cursors.values().map(|(id, _)| *id).chain(newest).max();
        Ok((State { dedup, counts, newest, evicted_ms: 0 }, progress))
    }
}

enum Job {
    Ingest {
        event: NewEvent,
        reply: oneshot::Sender<Result<Ingested, StoreError>>,
    },
    /// A read-modify-write (a purge, a pause, a requeue). Each is planned
    /// and applied on its own, after the round's ingests and the outcomes
    /// before it, so that it reads what the jobs before it wrote.
    Mutate {
        plan: Plan,
        reply: oneshot::Sender<Result<Answer, StoreError>>,
    },
    /// An attempt's outcome, applied with the round's others.
    Complete {
        done: Completion,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
}

pub struct Writer {
    pub stats: Arc<CommitStats>,
    pub progress: Arc<Mutex<Progress>>,
    /// Set for good when a sync fails with [`StoreError::Failed`].
    failed: Arc<AtomicBool>,
    queue: Mutex<Option<mpsc::Sender<Job>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Writer {
    /// Starts the writer thread. `sync` makes everything written so far durable.
    pub fn start(
        db: ::sled::Db,
        mut sync: impl FnMut() -> Result<(), StoreError> + Send + 'static,
    ) -> Result<Self, StoreError> {
        let (mut state, progress) = State::load(&db)?;
        let progress = Arc::new(Mutex::new(progress));
        let thread_progress = progress.clone();
        let (tx, mut rx) = mpsc::channel::<Job>(QUEUE);
        let stats = Arc::new(CommitStats::default());
        let thread_stats = stats.clone();
        let failed = Arc::new(AtomicBool::new(false));
        let thread_failed = failed.clone();
        let thread = std::thread::Builder::new().name("hookrelay-writer".into()).spawn(move || {
            let _panic = FailOnPanic(thread_failed.clone());
            // Ends when every sender is gone and the queue is empty.
            while let Some(first) = rx.blocking_recv() {
                let mut jobs = vec![first];
                while jobs.len() < MAX_ROUND {
                    match rx.try_recv() {
                        Ok(job) => jobs.push(job),
                        Err(_) => break,
                    }
                }
                if thread_failed.load(Ordering::SeqCst) {
                    refuse(jobs);
                } else {
                    let shared = Shared { stats: &thread_stats, failed: &thread_failed, progress: &thread_progress };
                    round(&db, &mut state, jobs, &mut sync, shared);
                }
            }
        })?;
        Ok(Writer { stats, progress, failed, queue: Mutex::new(Some(tx)), thread: Mutex::new(Some(thread)) })
    }

    async fn submit(&self, job: Job) -> Result<(), StoreError> {
        let sender = self.queue.lock().map_err(|_| StoreError::Closed)?.clone().ok_or(StoreError::Closed)?;
        sender.send(job).await.map_err(|_| StoreError::Closed)
    }

    /// Stores `event` unless it is a duplicate; returns once durable.
    pub async fn ingest(&self, event: NewEvent) -> Result<Ingested, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.submit(Job::Ingest { event, reply }).await?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    /// Runs `plan` on the writer thread, applies its batch atomically, and
    /// returns its answer once durable.
    pub async fn mutate<T: Send + 'static>(
        &self,
        plan: impl FnOnce(&::sled::Db, &mut Tally) -> Result<(::sled::Batch, T), StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (reply, answer) = oneshot::channel();
        let plan: Plan = Box::new(move |db, tally| plan(db, tally).map(|(batch, t)| (batch, Box::new(t) as Answer)));
        self.submit(Job::Mutate { plan, reply }).await?;
        let boxed = answer.await.map_err(|_| StoreError::Closed)??;
        boxed.downcast::<T>().map(|t| *t).map_err(|_| StoreError::Io("writer answered with the wrong type".into()))
    }

    /// Records an attempt's outcome; returns once durable.
    pub async fn complete(&self, done: Completion) -> Result<(), StoreError> {
        let (reply, answer) = oneshot::channel();
        self.submit(Job::Complete { done, reply }).await?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    /// True once a sync failed for good.
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
    }

    /// Finishes the queued jobs and stops the thread. Later ingests fail with `Closed`.
    pub fn stop(&self) {
        if let Ok(mut queue) = self.queue.lock() {
            queue.take();
        }
        let thread = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(t) = thread {
            if t.join().is_err() {
                tracing::error!("the storage writer thread panicked");
            }
        }
    }
}

/// Marks the store failed if the writer thread ends in a panic: every write
/// after it would be refused, so the relay must stop and be restarted, as
/// after a failed sync (`healthy()` turns false).
struct FailOnPanic(Arc<AtomicBool>);

impl Drop for FailOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            tracing::error!("the storage writer thread panicked: the store refuses every write until a restart");
            self.0.store(true, Ordering::SeqCst);
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// sled refuses every later write after an I/O error of its own, until it
/// is reopened: a failed write is fatal.
fn sled_failed(e: ::sled::Error) -> StoreError {
    StoreError::Failed(format!("sled refused a write: {e}"))
}

/// Answers every job with the failure that stopped the writer.
fn refuse(jobs: Vec<Job>) {
    let failed = || StoreError::Failed("an earlier fsync failed".into());
    for job in jobs {
        match job {
            Job::Ingest { reply, .. } => drop(reply.send(Err(failed()))),
            Job::Mutate { reply, .. } => drop(reply.send(Err(failed()))),
            Job::Complete { reply, .. } => drop(reply.send(Err(failed()))),
        }
    }
}

/// What the writer thread shares with the store.
struct Shared<'a> {
    stats: &'a CommitStats,
    /// Set (before answering) when a round's sync failed for good.
    failed: &'a AtomicBool,
    progress: &'a Mutex<Progress>,
}

/// Runs one round: the ingests as one batch (with the round's dedup record,
/// the changed counts and the moved cursors), then each mutation as its own.
fn round(
    db: &::sled::Db,
    state: &mut State,
    jobs: Vec<Job>,
    sync: &mut impl FnMut() -> Result<(), StoreError>,
    shared: Shared,
) {
    let started = std::time::Instant::now();
    let now = now_ms();
    let budget = super::dedup::sweep_budget(now.saturating_sub(state.evicted_ms));
    if budget > 0 {
        state.dedup.evict(now, budget);
        state.evicted_ms = now;
    }
    let mut batch = ::sled::Batch::default();
    let mut tally = Tally::default();
    let mut ingest =
        IngestRound { index: &state.dedup, claimed: HashMap::new(), claims: Vec::new(), sequences: Default::default() };
    let mut ingests = Vec::new();
    let mut changes = Vec::new();
    for job in jobs {
        match job {
            Job::Ingest { event, reply } => {
                let id = next_id(&mut state.newest, event.id);
                let outcome = layout::plan_ingest(db, &mut batch, &mut ingest, &mut tally, &event, id);
                ingests.push((reply, outcome));
            }
            Job::Mutate { plan, reply } => changes.push(Change::Mutate(plan, reply)),
            Job::Complete { done, reply } => changes.push(Change::Complete(done, reply)),
        }
    }
    // The order queues with writes pending in the batch: an outcome that
    // reads one of them must wait until the batch is applied.
    let mut pending: HashSet<Vec<u8>> = ingest.sequences.queues().map(<[u8]>::to_vec).collect();
    let claims = ingest.claims;
    layout::add_dedup_records(&claims, &mut batch);
    let hidden = tally.write(&mut state.counts, &mut batch);
    let moved = save_cursors(shared.progress, &mut batch);
    // The ingests, the moved cursors and the outcomes go in one batch, unless
    // a job must read what the ones before it wrote (sled writes out its log
    // buffer at every batch).
    let mut merged = Merged { batch, hidden, dirty: !ingests.is_empty() || moved, ..Merged::default() };
    let mut written: Result<(), StoreError> = Ok(());
    let mut answers = Vec::with_capacity(changes.len());
    for change in changes {
        match change {
            Change::Complete(done, reply) => {
                if let Err(e) = &written {
                    answers.push(Answered::Complete(reply, Err(e.clone())));
                    continue;
                }
                let mut free = |queue: &[u8]| pending.insert(queue.to_vec());
                match layout::complete_into(db, &mut merged.tally, &mut merged.batch, &done, now, &mut free) {
                    Ok(true) => merged.replies.push(reply),
                    Ok(false) => {
                        // It reads its key's queue, which the batch writes:
                        // after the merged ones are applied.
                        merged.apply(db, &mut state.counts, &mut written, &mut answers, &shared);
                        pending.clear();
                        let answer = apply_alone(db, &mut state.counts, &written, &shared, |db, tally| {
                            layout::plan_complete(db, tally, &done, now).map(|b| (b, ()))
                        });
                        taint(&mut written, &answer);
                        answers.push(Answered::Complete(reply, answer));
                    }
                    Err(e) => answers.push(Answered::Complete(reply, Err(e))),
                }
            }
            Change::Mutate(plan, reply) => {
                merged.apply(db, &mut state.counts, &mut written, &mut answers, &shared);
                pending.clear();
                let answer = apply_alone(db, &mut state.counts, &written, &shared, plan);
                taint(&mut written, &answer);
                answers.push(Answered::Mutate(reply, answer));
            }
        }
    }
    merged.apply(db, &mut state.counts, &mut written, &mut answers, &shared);
    if written.is_ok() {
        // Applied, so findable by a later round even if the sync fails below
        // (the events then stay stored, although their senders got 503).
        for c in claims {
            state.dedup.insert(c.entry, c.window_ms);
        }
    }
    let written = written.and_then(|()| sync());
    shared.stats.flushes.fetch_add(1, Ordering::Relaxed);
    let took = started.elapsed().as_micros() as u64;
    shared.stats.flush_micros.fetch_add(took, Ordering::Relaxed);
    shared.stats.slowest_micros.fetch_max(took, Ordering::Relaxed);
    {
        let mut progress = shared.progress.lock().unwrap_or_else(|p| p.into_inner());
        // Durable, or refused: either way not to be hidden any more.
        progress.until_durable.clear();
        if written.is_ok() {
            progress.durable = state.newest;
        }
    }
    match &written {
        Ok(()) => {}
        Err(e) => {
            tracing::error!(error = %e, jobs = ingests.len() + answers.len(), "storage write failed; those writes are refused");
            if matches!(e, StoreError::Failed(_)) {
                shared.failed.store(true, Ordering::SeqCst);
                tracing::error!("storage failed for good: refusing every write until restart");
            }
        }
    }
    // Requesters may have gone (a client hung up): nothing to tell them.
    for (reply, outcome) in ingests {
        let _ = reply.send(written.clone().and(outcome));
    }
    for answer in answers {
        answer.send(&written);
    }
}

/// A job other than an ingest, once planned.
enum Change {
    Mutate(Plan, oneshot::Sender<Result<Answer, StoreError>>),
    Complete(Completion, oneshot::Sender<Result<(), StoreError>>),
}

/// A job's answer, sent once the round is durable (or failed).
enum Answered {
    Mutate(oneshot::Sender<Result<Answer, StoreError>>, Result<Answer, StoreError>),
    Complete(oneshot::Sender<Result<(), StoreError>>, Result<(), StoreError>),
}

impl Answered {
    fn send(self, written: &Result<(), StoreError>) {
        // Requesters may have gone: nothing to tell them.
        match self {
            Answered::Mutate(reply, answer) => drop(reply.send(written.clone().and(answer))),
            Answered::Complete(reply, answer) => drop(reply.send(written.clone().and(answer))),
        }
    }
}

/// The round's webhooks, moved cursors and outcomes gathered into one
/// batch, not yet applied.
#[derive(Default)]
struct Merged {
    batch: ::sled::Batch,
    /// The outcomes' changes to the counts (the webhooks' are in `batch`).
    tally: Tally,
    /// Keys of the webhooks' writes to hide until durable.
    hidden: Vec<Vec<u8>>,
    /// Whom to answer for the outcomes in `batch`.
    replies: Vec<oneshot::Sender<Result<(), StoreError>>>,
    /// It holds writes besides the outcomes' (webhooks, moved cursors).
    dirty: bool,
}

impl Merged {
    /// Applies what was gathered, if anything, and notes the answers.
    fn apply(
        &mut self,
        db: &::sled::Db,
        counts: &mut HashMap<String, TargetCounts>,
        written: &mut Result<(), StoreError>,
        answers: &mut Vec<Answered>,
        shared: &Shared,
    ) {
        if self.replies.is_empty() && !self.dirty {
            return;
        }
        let Merged { mut batch, tally, replies, hidden, .. } = std::mem::take(self);
        let result = written.clone().and_then(|()| {
            let mut hidden = hidden;
            hidden.extend(tally.write(counts, &mut batch));
            shared.stats.batches.fetch_add(1, Ordering::Relaxed);
            apply(db, batch, hidden, shared.progress)
        });
        taint(written, &result);
        answers.extend(replies.into_iter().map(|reply| Answered::Complete(reply, result.clone())));
    }
}

/// Plans and applies one job's batch on its own, unless the round failed.
fn apply_alone<T>(
    db: &::sled::Db,
    counts: &mut HashMap<String, TargetCounts>,
    written: &Result<(), StoreError>,
    shared: &Shared,
    plan: impl FnOnce(&::sled::Db, &mut Tally) -> Result<(::sled::Batch, T), StoreError>,
) -> Result<T, StoreError> {
    written.clone()?;
    let mut tally = Tally::default();
    let (mut batch, answer) = plan(db, &mut tally)?;
    let hidden = tally.write(counts, &mut batch);
    shared.stats.batches.fetch_add(1, Ordering::Relaxed);
    apply(db, batch, hidden, shared.progress).map(|()| answer)
}

/// Applies a batch, its `hidden` keys noted first: a reader that finds one
/// of them after the batch is applied finds it noted too.
fn apply(
    db: &::sled::Db,
    batch: ::sled::Batch,
    hidden: Vec<Vec<u8>>,
    progress: &Mutex<Progress>,
) -> Result<(), StoreError> {
    if !hidden.is_empty() {
        progress.lock().unwrap_or_else(|p| p.into_inner()).until_durable.extend(hidden);
    }
    db.apply_batch(batch).map_err(sled_failed)
}

/// A write failure taints the round; a planning error is the job's own.
fn taint<T>(written: &mut Result<(), StoreError>, answer: &Result<T, StoreError>) {
    if let Err(StoreError::Failed(e)) = answer {
        *written = Err(StoreError::Failed(e.clone()));
    }
}

/// `proposed`, or just past `newest` if it is not newer; becomes the newest.
fn next_id(newest: &mut Option<EventId>, proposed: EventId) -> EventId {
    let id = match *newest {
        Some(n) if proposed <= n => EventId(uuid::Uuid::from_u128(n.0.as_u128().wrapping_add(1))),
        _ => proposed,
    };
    *newest = Some(id);
    id
}

/// Adds the cursors moved since the last round to `batch`; false if none
/// moved. A cursor only moves over events whose delivery records are
/// applied already, so saving it in a later batch never gets ahead of them.
fn save_cursors(progress: &Mutex<Progress>, batch: &mut ::sled::Batch) -> bool {
    let Ok(mut progress) = progress.lock() else { return false };
    let mut moved = false;
    for (target, (id, saved)) in progress.cursors.iter_mut() {
        if !*saved {
            batch.insert(layout::cursor_key(target), id.as_bytes());
            *saved = true;
            moved = true;
        }
    }
    moved
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::time::Duration;

    fn event(dedup: &str) -> NewEvent {
        NewEvent {
            id: super::super::EventId::new(),
            source: "s".into(),
            event: "page.published".into(),
            dedup_key: dedup.into(),
            dedup_window: Duration::from_secs(600),
            content_type: None,
            body: bytes::Bytes::from_static(b"{}"),
            targets: vec!["a".into(), "b".into()],
            received_ms: super::super::now_ms(),
            sequenced: Vec::new(),
        }
    }

    fn temp_db() -> (tempfile::TempDir, ::sled::Db) {
        let dir = tempfile::tempdir().unwrap();
        let db = ::sled::Config::new().path(dir.path()).open().unwrap();
        (dir, db)
    }

    #[tokio::test]
    async fn concurrent_ingests_share_rounds_and_each_copy_is_deduplicated() {
        let (_dir, db) = temp_db();
        let writer = Arc::new(
            Writer::start(db.clone(), || {
                std::thread::sleep(Duration::from_millis(20));
                Ok(())
            })
            .unwrap(),
        );
        // 40 distinct events, each sent twice at once.
        let jobs: Vec<_> = (0..80)
            .map(|i| {
                let w = writer.clone();
                tokio::spawn(async move { w.ingest(event(&format!("k{}", i % 40))).await })
            })
            .collect();
        let (mut accepted, mut duplicates) = (0, 0);
        for j in jobs {
            match j.await.unwrap().unwrap() {
                Ingested::Accepted { targets, .. } => {
                    assert_eq!(targets, 2);
                    accepted += 1
                }
                Ingested::Duplicate { .. } => duplicates += 1,
            }
        }
        assert_eq!((accepted, duplicates), (40, 40));
        let rounds = writer.stats.flushes.load(Ordering::Relaxed);
        assert!(rounds < 80, "80 ingests took {rounds} rounds");
        assert_eq!(db.scan_prefix(b"e/").count(), 40);
        assert_eq!(db.scan_prefix(b"q/").count(), 0, "first attempts need no queue entry");
        let counts = |t: &str| layout::decode_counts(b"", &db.get(layout::counts_key(t)).unwrap().unwrap()).unwrap();
        assert_eq!((counts("a").queued, counts("b").queued), (40, 40));
    }

    #[tokio::test]
    async fn a_failed_sync_fails_its_round_and_a_later_round_recovers() {
        let (_dir, db) = temp_db();
        let fail = Arc::new(AtomicBool::new(true));
        let f = fail.clone();
        let writer = Writer::start(db, move || {
            if f.load(Ordering::SeqCst) {
                Err(StoreError::Io("No space left on device".into()))
            } else {
                Ok(())
            }
        })
        .unwrap();
        assert!(matches!(writer.ingest(event("x")).await, Err(StoreError::Io(m)) if m.contains("No space")));
        fail.store(false, Ordering::SeqCst);
        assert!(matches!(writer.ingest(event("y")).await, Ok(Ingested::Accepted { .. })));
    }

    #[tokio::test]
    async fn a_failed_fsync_refuses_every_later_write() {
        let (_dir, db) = temp_db();
        let writer = Writer::start(db, || Err(StoreError::Failed("fsync: EIO".into()))).unwrap();
        assert!(matches!(writer.ingest(event("x")).await, Err(StoreError::Failed(_))));
        assert!(writer.failed());
        assert!(matches!(writer.ingest(event("y")).await, Err(StoreError::Failed(_))));
        assert!(matches!(writer.mutate(|_, _| Ok((::sled::Batch::default(), ()))).await, Err(StoreError::Failed(_))));
    }

    #[tokio::test]
    async fn a_panic_on_the_writer_thread_marks_the_store_failed() {
        let (_dir, db) = temp_db();
        let writer = Writer::start(db, || Ok(())).unwrap();
        let planned = writer.mutate::<()>(|_, _| panic!("a bug in a plan")).await;
        assert!(matches!(planned, Err(StoreError::Closed)), "{planned:?}");
        // The reply is dropped as the thread unwinds, before the guard runs.
        for _ in 0..200 {
            if writer.failed() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(writer.failed(), "the relay's health turns false, so that it stops and is restarted");
        assert!(writer.ingest(event("x")).await.is_err());
    }

    #[tokio::test]
    async fn ids_rise_in_commit_order_whatever_the_request_proposed() {
        let (_dir, db) = temp_db();
        let writer = Writer::start(db.clone(), || Ok(())).unwrap();
        let Ingested::Accepted { id: newer, .. } = writer.ingest(event("x")).await.unwrap() else { panic!() };
        let mut older = event("y");
        older.id = EventId(uuid::Uuid::from_u128(1));
        let Ingested::Accepted { id, .. } = writer.ingest(older).await.unwrap() else { panic!() };
        assert!(id > newer, "{id} should follow {newer}");
        assert_eq!(writer.progress.lock().unwrap().durable, Some(id));
        assert!(db.contains_key(layout::event_key(id)).unwrap());
    }

    #[test]
    fn a_walk_resumes_after_what_it_examined_and_holds_the_cursor_behind_what_is_out() {
        let id = |n: u128| EventId(uuid::Uuid::from_u128(n));
        let mut walk = Walk::at(Some(id(10)));
        assert_eq!(walk.start(Some(id(10)), &HashSet::new()), Some(id(10)));
        // Examined 11..=20, handed out 12 and 15: the cursor stays before 12.
        assert_eq!(walk.walked(Some(id(20)), [id(12), id(15)]), Some(id(11)));
        let in_flight = HashSet::from([id(12), id(15)]);
        assert_eq!(walk.start(Some(id(11)), &in_flight), Some(id(20)), "resumes after 20");
        walk.recorded(id(12));
        assert_eq!(walk.walked(Some(id(30)), []), Some(id(14)), "now before 15");
        // 15 left the in-flight set without an outcome: walk again from the cursor.
        assert_eq!(walk.start(Some(id(14)), &HashSet::new()), Some(id(14)));
        assert!(walk.out.is_empty());
        assert_eq!(walk.walked(Some(id(31)), []), Some(id(31)), "nothing out: up to the last examined");
    }

    #[tokio::test]
    async fn after_stop_ingests_are_refused() {
        let (_dir, db) = temp_db();
        let writer = Writer::start(db, || Ok(())).unwrap();
        writer.ingest(event("x")).await.unwrap();
        writer.stop();
        assert!(matches!(writer.ingest(event("y")).await, Err(StoreError::Closed)));
    }
}
