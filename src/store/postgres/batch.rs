//! Group commit, for any kind of write: a batch takes every job queued
//! while the previous batches ran and applies them in one transaction; none
//! is answered before its commit. A few batches run at once, each on its
//! own connection, so that one commit's wait does not stall the next batch.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool_postgres::Pool;
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::store::StoreError;

/// Jobs queued at most; past this, callers wait (backpressure).
const QUEUE: usize = 8192;
/// Times a batch is tried again when the database aborts it for a deadlock
/// or a serialization failure with another instance.
const RETRIES: usize = 3;
/// How long a job may wait, from its queueing, for its batch to commit (a
/// batch runs within the soonest limit of its jobs): past it the job fails,
/// left out of the batches not yet begun, or with its batch, whose
/// connection is then closed. A
/// database that stops answering without closing its connections (a frozen
/// server, a lock held for ever) would otherwise hold every webhook's answer
/// for as long; a CMS has given up after 5 s.
pub const BATCH_LIMIT: Duration = Duration::from_secs(10);

/// A job: its item, where its answer goes, its state, and when its caller
/// gives up on it unless a batch has taken it.
struct Job<I, O> {
    item: I,
    answer: oneshot::Sender<Result<O, StoreError>>,
    state: Arc<AtomicU8>,
    deadline: tokio::time::Instant,
}

/// A [`Job`]'s state: queued, taken by a batch, or given up by its caller.
const QUEUED: u8 = 0;
const TAKEN: u8 = 1;
const ABANDONED: u8 = 2;

pub struct Batches<I, O> {
    jobs: Mutex<Option<mpsc::Sender<Job<I, O>>>>,
    closed: AtomicBool,
    running: Arc<Semaphore>,
    parallel: u32,
}

impl<I: Send + Sync + 'static, O: Send + 'static> Batches<I, O> {
    /// Runs batches of at most `max` jobs, `parallel` at once, with `apply`,
    /// which answers one outcome per job, in order. `what` names a job in
    /// the log line of a failed batch.
    pub fn start<F, Fut>(what: &'static str, pool: Pool, parallel: usize, max: usize, apply: F) -> Self
    where
        F: Fn(Pool, Arc<Vec<I>>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Vec<O>, StoreError>> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel(QUEUE);
        let running = Arc::new(Semaphore::new(parallel));
        tokio::spawn(run(what, pool, rx, running.clone(), max, Arc::new(apply)));
        Batches { jobs: Mutex::new(Some(tx)), closed: AtomicBool::new(false), running, parallel: parallel as u32 }
    }

    /// Queues `job` and returns its outcome once its batch has committed.
    pub async fn submit(&self, job: I) -> Result<O, StoreError> {
        let sender = self.jobs.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let Some(sender) = sender.filter(|_| !self.closed.load(Ordering::SeqCst)) else {
            return Err(StoreError::Closed);
        };
        let (answer, mut answered) = oneshot::channel();
        let state = Arc::new(AtomicU8::new(QUEUED));
        // The wait for a batch counts toward the limit too: batches queued
        // behind one that waits out the limit would each wait as long. A
        // job given up on before a batch took it is left out; one a batch
        // has taken is answered by the batch (within its own limit), so that
        // a job is never answered as failed and then committed.
        let deadline = tokio::time::Instant::now() + BATCH_LIMIT;
        let queued = Job { item: job, answer, state: state.clone(), deadline };
        match tokio::time::timeout_at(deadline, sender.send(queued)).await {
            Ok(sent) => sent.map_err(|_| StoreError::Closed)?,
            Err(_) => return Err(timed_out()),
        }
        if let Ok(answer) = tokio::time::timeout_at(deadline, &mut answered).await {
            return answer.map_err(|_| StoreError::Closed)?;
        }
        if state.compare_exchange(QUEUED, ABANDONED, Ordering::SeqCst, Ordering::SeqCst).is_ok() {
            return Err(timed_out());
        }
        answered.await.map_err(|_| StoreError::Closed)?
    }

    /// Refuses new jobs and waits for the batches in progress.
    pub async fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.jobs.lock().unwrap_or_else(|p| p.into_inner()).take();
        let _ = self.running.acquire_many(self.parallel).await;
    }
}

async fn run<I, O, F, Fut>(
    what: &'static str,
    pool: Pool,
    mut rx: mpsc::Receiver<Job<I, O>>,
    running: Arc<Semaphore>,
    max: usize,
    apply: Arc<F>,
) where
    I: Send + Sync + 'static,
    O: Send + 'static,
    F: Fn(Pool, Arc<Vec<I>>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Vec<O>, StoreError>> + Send + 'static,
{
    while let Some(first) = rx.recv().await {
        let Ok(permit) = running.clone().acquire_owned().await else { return };
        // Jobs whose callers gave up (the limit passed) are left out.
        let take =
            |job: &Job<I, O>| job.state.compare_exchange(QUEUED, TAKEN, Ordering::SeqCst, Ordering::SeqCst).is_ok();
        let mut jobs: Vec<Job<I, O>> = Vec::new();
        if take(&first) {
            jobs.push(first);
        }
        while jobs.len() < max {
            match rx.try_recv() {
                Ok(job) if take(&job) => jobs.push(job),
                Ok(_) => {}
                Err(_) => break,
            }
        }
        if jobs.is_empty() {
            continue;
        }
        let (pool, apply) = (pool.clone(), apply.clone());
        tokio::spawn(async move {
            // Within the soonest of its jobs' limits: a job taken just before
            // its caller would have given up is not held a whole limit more.
            let deadline = jobs.iter().map(|j| j.deadline).min().unwrap_or_else(tokio::time::Instant::now);
            let (items, answers): (Vec<I>, Vec<_>) = jobs.into_iter().map(|j| (j.item, j.answer)).unzip();
            let items = Arc::new(items);
            let mut outcome = Err(StoreError::Closed);
            for _ in 0..RETRIES {
                // Dropped on time out, a batch closes its connection
                // (`Open`): nothing half-done goes back to the pool.
                let applied = tokio::time::timeout_at(deadline, apply(pool.clone(), items.clone())).await;
                outcome = applied.unwrap_or_else(|_| Err(timed_out()));
                match &outcome {
                    Err(StoreError::Io(msg)) if retryable(msg) => continue,
                    _ => break,
                }
            }
            match outcome {
                Ok(results) => {
                    for (answer, result) in answers.into_iter().zip(results) {
                        let _ = answer.send(Ok(result));
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, count = answers.len(), "a batch of {what} failed; none applied");
                    for answer in answers {
                        let _ = answer.send(Err(e.clone()));
                    }
                }
            }
            drop(permit);
        });
    }
}

fn timed_out() -> StoreError {
    StoreError::Io(format!("the database did not answer within {} s", BATCH_LIMIT.as_secs()))
}

fn retryable(msg: &str) -> bool {
    msg.contains("deadlock detected") || msg.contains("could not serialize")
}
