//! One target's worker. It owns the target's breaker, rate limiter, pause flag
//! and in-flight set; reads due deliveries from the store in bounded batches;
//! and spawns one task per attempt, which records its outcome and reports back.
//!
//! `concurrency` counts requests at the target: an attempt gives its slot
//! back when the target has answered, while its outcome is still being
//! made durable. Outcomes waiting for the store are bounded too (as many
//! again), so that a `kill -9` repeats at most twice `concurrency` attempts.
//! (A store that several instances share counts leases instead, which last
//! until the outcome is committed: see [`crate::store::Store::share`].)

use std::collections::HashSet;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::breaker::{Breaker, CircuitState, Permit};
use super::client::{self, HttpClient};
use super::retry::{next_step, Verdict};
use crate::config::Target;
use crate::jq::{Lane, Output};
use crate::metrics::{DeliveryOutcome, Metrics};
use crate::store::{now_ms, Attempt, DueDelivery, EventId, NextStep, Share, Store, StoredEvent};

/// Due deliveries read from the store at once, at most.
const BATCH: usize = 64;
/// Pause after a store read fails before trying again.
const STORE_RETRY: Duration = Duration::from_secs(1);
/// An idle worker reads its queue again after this, even unwoken: a safety
/// net for work queued without a wake (it is not how new events are found).
const IDLE_RECHECK: Duration = Duration::from_secs(30);

/// What an operator asks of a worker.
#[derive(Debug, Clone)]
pub enum Control {
    /// An operator's pause or resume, already saved in the store by the
    /// admin API (which answers 503 when it cannot be): applied, not
    /// written again.
    Pause,
    Resume,
    /// New settings from a reloaded config.
    Reconfigure(Arc<Target>),
    /// Another instance sharing the store opened the circuit for this long.
    CircuitOpened(Duration),
    /// The target told another instance sharing the store (429,
    /// `Retry-After`) to send nothing for this long.
    AskedToWait(Duration),
    /// The target is paused (or not) in the store shared with other
    /// instances: applied, not written again.
    PausedElsewhere(bool),
}

/// A worker's live state, for the admin API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TargetStatus {
    /// Requests at the target now (within its `concurrency`).
    pub in_flight: usize,
    pub circuit: CircuitState,
    pub paused: bool,
}

/// How the rest of the relay reaches a worker.
pub struct Links {
    /// Rung when deliveries are queued for the target (a new event, a redelivery, a replay).
    pub wake: Arc<Notify>,
    pub control: mpsc::Receiver<Control>,
    pub status: tokio::sync::watch::Sender<TargetStatus>,
}

/// What an attempt task tells its worker.
struct Report {
    id: EventId,
    done: Done,
}

/// How an attempt ended, for the worker's breaker and pacing.
enum Done {
    /// Sent, and the outcome recorded.
    Sent(Verdict),
    /// Finished without contacting the target (skipped by its transform,
    /// the transform failed, the event is gone), and recorded.
    Unsent,
    /// Not sent, nothing recorded: the queue was held (a 410) before its
    /// request went out. The delivery stays where it was.
    Held,
    /// Nothing recorded (store or sandbox trouble, or shutdown): the
    /// delivery stays where it was, and the worker waits before reading again.
    Stalled,
}

pub struct Worker {
    target: Arc<Target>,
    store: Arc<dyn Store>,
    client: HttpClient,
    metrics: Metrics,
    /// Where the target's transform runs (its process starts on first use).
    lane: Arc<Lane>,
    /// Until when the target asked, with `Retry-After` on a 429, that
    /// nothing be sent: the whole queue waits, not only that delivery.
    asked_to_wait: Arc<Mutex<Option<Instant>>>,
    breaker: Breaker,
    limiter: Option<DefaultDirectRateLimiter>,
    /// Held by a 410 or an operator; persisted in the store.
    paused: bool,
    /// Set as soon as an attempt is answered 410 (before its report), and
    /// while paused: attempts not yet sent are not sent, none is started.
    hold: Arc<AtomicBool>,
    /// Deliveries being attempted, until their outcome is recorded; left
    /// out of store reads.
    in_flight: HashSet<EventId>,
    /// Of those, the ones whose request may be at the target.
    at_target: Arc<AtomicUsize>,
    reports_tx: mpsc::UnboundedSender<Report>,
    reports: mpsc::UnboundedReceiver<Report>,
    /// Rung when deliveries are queued for this target (a new event, a redelivery, a replay).
    wake: Arc<Notify>,
    control: mpsc::Receiver<Control>,
    status: tokio::sync::watch::Sender<TargetStatus>,
    /// Set after a store error, so that a failing store is not spun on.
    store_retry_at: Option<Instant>,
    /// How long wakes gather once the queue ran dry ([`Store::read_gather`]).
    gather: Duration,
    /// The last read of the queue found nothing more due.
    ran_dry: bool,
    /// When the queue is read again, wakes gathering until then.
    read_at: Option<Instant>,
    shutdown: CancellationToken,
    attempts: TaskTracker,
}

impl Worker {
    pub fn new(
        target: Arc<Target>,
        store: Arc<dyn Store>,
        metrics: Metrics,
        paused: bool,
        links: Links,
        shutdown: CancellationToken,
    ) -> Result<Self, String> {
        let Links { wake, control, status } = links;
        let client = client::client_for(&target)?;
        let limiter = limiter_for(&target);
        store.share(&target.name, share_of(&target));
        let (reports_tx, reports) = mpsc::unbounded_channel();
        let gather = store.read_gather();
        Ok(Worker {
            breaker: Breaker::new(target.circuit_breaker),
            lane: Arc::new(Lane::new(format!("target {} transform", target.name))),
            asked_to_wait: Arc::default(),
            target,
            store,
            client,
            metrics,
            limiter,
            paused,
            hold: Arc::new(AtomicBool::new(paused)),
            in_flight: HashSet::new(),
            at_target: Arc::default(),
            reports_tx,
            reports,
            wake,
            control,
            status,
            store_retry_at: None,
            gather,
            ran_dry: false,
            read_at: None,
            shutdown,
            attempts: TaskTracker::new(),
        })
    }

    /// Delivers until shutdown, then waits for the attempts in flight, which
    /// stop at once and leave their deliveries pending.
    pub async fn run(mut self) {
        if self.paused {
            tracing::warn!(target = %self.target.name, "target is paused; its queue is held until it is resumed");
        }
        loop {
            let next = match self.read_at.filter(|at| Instant::now() < *at) {
                Some(at) => Some(at),
                None => {
                    self.read_at = None;
                    self.dispatch().await
                }
            };
            self.publish();
            tokio::select! {
                _ = self.shutdown.cancelled() => break,
                Some(report) = self.reports.recv() => {
                    self.on_report(report).await;
                    // Every attempt that ended meanwhile, before looking
                    // for more: one read of the queue for all their slots.
                    while let Ok(report) = self.reports.try_recv() {
                        self.on_report(report).await;
                    }
                    self.read_at = read_after_wake(self.read_at, self.ran_dry, self.gather, Instant::now());
                }
                Some(control) = self.control.recv() => self.on_control(control).await,
                _ = self.wake.notified() => {
                    self.read_at = read_after_wake(self.read_at, self.ran_dry, self.gather, Instant::now());
                }
                _ = sleep_until(next), if next.is_some() => {}
            }
        }
        self.attempts.close();
        self.attempts.wait().await;
    }

    /// Starts what may start now; returns when to look again (`None`: when
    /// woken by a report or a new event).
    async fn dispatch(&mut self) -> Option<Instant> {
        if self.paused || self.hold.load(Ordering::SeqCst) {
            return None;
        }
        if let Some(at) = self.store_retry_at {
            if Instant::now() < at {
                return Some(at);
            }
            self.store_retry_at = None;
        }
        let asked = *self.asked_to_wait.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(at) = asked.filter(|at| Instant::now() < *at) {
            return Some(at);
        }
        loop {
            let at_target = self.at_target.load(Ordering::SeqCst);
            let free = free_slots(self.target.concurrency as usize, at_target, self.in_flight.len());
            if free == 0 {
                return None;
            }
            let limit = match self.breaker.permit(Instant::now()) {
                Permit::Open => free.min(BATCH),
                Permit::Probe => 1,
                Permit::Wait(until) => return until,
            };
            let batch = match self.store.due(&self.target.name, now_ms(), limit, &self.in_flight).await {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!(target = %self.target.name, error = %e, "cannot read the delivery queue");
                    let at = Instant::now() + STORE_RETRY;
                    self.store_retry_at = Some(at);
                    return Some(at);
                }
            };
            let found = batch.due.len();
            self.ran_dry = found < limit && !batch.limited;
            for due in batch.due {
                if let Some(limiter) = &self.limiter {
                    if let Err(not_until) = limiter.check() {
                        self.metrics.rate_limited.with_label_values(&[&self.target.name]).inc();
                        return Some(Instant::now() + not_until.wait_time_from(DefaultClock::default().now()));
                    }
                }
                self.breaker.on_dispatch(due.event_id);
                self.spawn_attempt(due);
                if limit == 1 && !matches!(self.breaker.permit(Instant::now()), Permit::Open) {
                    return None; // the probe is out: wait for its report
                }
            }
            if found < limit {
                let idle = Instant::now() + IDLE_RECHECK;
                return Some(match batch.next_due_ms {
                    Some(due) => (Instant::now() + Duration::from_millis(due.saturating_sub(now_ms()))).min(idle),
                    None => idle,
                });
            }
        }
    }

    fn spawn_attempt(&mut self, due: DueDelivery) {
        self.in_flight.insert(due.event_id);
        let slot = Slot::take(&self.at_target, &self.wake);
        let ctx = AttemptCtx {
            target: self.target.clone(),
            store: self.store.clone(),
            client: self.client.clone(),
            metrics: self.metrics.clone(),
            lane: self.lane.clone(),
            asked_to_wait: self.asked_to_wait.clone(),
            hold: self.hold.clone(),
        };
        let (reports, shutdown) = (self.reports_tx.clone(), self.shutdown.clone());
        self.attempts.spawn(async move {
            let id = due.event_id;
            let done = tokio::select! {
                done = ctx.attempt(due, slot) => done,
                _ = shutdown.cancelled() => Done::Stalled,
            };
            let _ = reports.send(Report { id, done });
        });
    }

    fn publish(&self) {
        let circuit = self.breaker.state(Instant::now());
        self.metrics.circuit_state.with_label_values(&[&self.target.name]).set(circuit.gauge());
        let now = TargetStatus { in_flight: self.at_target.load(Ordering::SeqCst), circuit, paused: self.paused };
        self.status.send_if_modified(|s| std::mem::replace(s, now) != now);
    }

    async fn on_control(&mut self, control: Control) {
        let paused = match control {
            Control::Pause => true,
            Control::Resume => false,
            Control::Reconfigure(target) => return self.reconfigure(target),
            Control::CircuitOpened(open_for) => {
                if self.breaker.opened_elsewhere(Instant::now(), open_for) {
                    tracing::warn!(target = %self.target.name, ?open_for, "circuit opened by another instance: deliveries wait");
                }
                return;
            }
            Control::AskedToWait(wait) => {
                if hold_queue(&self.asked_to_wait, &self.target, wait) {
                    tracing::warn!(target = %self.target.name, ?wait, "target asked another instance to wait (Retry-After): deliveries wait");
                }
                return;
            }
            Control::PausedElsewhere(paused) => {
                if paused != self.paused {
                    let action = if paused { "paused" } else { "resumed" };
                    tracing::warn!(target = %self.target.name, "target {action} on another instance");
                    self.set_paused(paused);
                }
                return;
            }
        };
        if paused != self.paused {
            let action = if paused { "paused" } else { "resumed" };
            tracing::warn!(target = %self.target.name, "target {action} by an operator");
            self.set_paused(paused);
        }
    }

    fn set_paused(&mut self, paused: bool) {
        self.paused = paused;
        self.hold.store(paused, Ordering::SeqCst);
    }

    /// Takes new settings; attempts in flight finish under the old ones.
    fn reconfigure(&mut self, target: Arc<Target>) {
        match client::client_for(&target) {
            Ok(client) => self.client = client,
            Err(e) => {
                tracing::error!(target = %target.name, error = %e, "new settings rejected; the old ones stay");
                return;
            }
        }
        // A new limiter starts with a full bucket: only for a new rate, so
        // that a reload does not let a burst through.
        if target.rate_limit != self.target.rate_limit {
            self.limiter = limiter_for(&target);
        }
        self.store.share(&target.name, share_of(&target));
        self.breaker.set_settings(target.circuit_breaker);
        self.target = target;
    }

    /// Holds the queue (the target answered 410), and remembers it across
    /// restarts; held in this process even if the store cannot save it.
    async fn pause_for_gone(&mut self) {
        self.set_paused(true);
        if let Err(e) = self.store.set_paused(&self.target.name, true).await {
            tracing::error!(target = %self.target.name, error = %e, "cannot persist the pause");
        }
    }

    async fn on_report(&mut self, report: Report) {
        self.in_flight.remove(&report.id);
        let name = self.target.name.clone();
        if self.hold.load(Ordering::SeqCst) && !self.paused {
            // An attempt was answered 410 (its own report may say only
            // that its outcome could not be recorded).
            tracing::warn!(target = %name, "target answered 410 Gone: paused; its queue is held until an operator resumes it");
            self.pause_for_gone().await;
        }
        match report.done {
            Done::Stalled => {
                self.breaker.on_abandoned(report.id);
                self.store_retry_at = Some(Instant::now() + STORE_RETRY);
            }
            Done::Unsent | Done::Held => self.breaker.on_abandoned(report.id),
            Done::Sent(Verdict::Retry { .. }) => {
                if self.breaker.on_failure(Instant::now()) {
                    let open_for = self.target.circuit_breaker.open_for;
                    tracing::warn!(target = %name, ?open_for, "circuit opened: deliveries wait");
                    if let Err(e) = self.store.circuit_opened(&name, open_for).await {
                        tracing::warn!(target = %name, error = %e, "other instances not told of the open circuit");
                    }
                }
            }
            Done::Sent(Verdict::Success | Verdict::Permanent | Verdict::Pause) => self.circuit_closed_by_success(),
        }
    }

    /// The target answered: this instance's circuit, open or half-open,
    /// closes (a shared store closes the cluster's as it records the
    /// probe's outcome).
    fn circuit_closed_by_success(&mut self) {
        if self.breaker.on_success() {
            tracing::info!(target = %self.target.name, "circuit closed: the target answered");
        }
    }
}

/// How many attempts may start: requests at the target stay within
/// `concurrency`, and attempts not yet recorded (at the target, or answered
/// and waiting for the store) within twice that.
fn free_slots(concurrency: usize, at_target: usize, in_flight: usize) -> usize {
    concurrency.saturating_sub(at_target).min((2 * concurrency).saturating_sub(in_flight))
}

/// An attempt's place among the target's `concurrency`: given back when
/// the target has answered (or the attempt ends without asking it), and the
/// worker woken to fill it.
struct Slot {
    at_target: Arc<AtomicUsize>,
    wake: Arc<Notify>,
}

impl Slot {
    fn take(at_target: &Arc<AtomicUsize>, wake: &Arc<Notify>) -> Slot {
        at_target.fetch_add(1, Ordering::SeqCst);
        Slot { at_target: at_target.clone(), wake: wake.clone() }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.at_target.fetch_sub(1, Ordering::SeqCst);
        self.wake.notify_one();
    }
}

/// The target's limits, for a store that several instances share to hold
/// over all of them.
fn share_of(target: &Target) -> Share {
    Share {
        concurrency: target.concurrency,
        rate: target.rate_limit.map(|r| (r.per_second, r.burst)),
        attempt: target.timeout,
    }
}

fn limiter_for(target: &Target) -> Option<DefaultDirectRateLimiter> {
    target.rate_limit.map(|r| {
        let per_second = NonZeroU32::new(r.per_second).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(r.burst).unwrap_or(NonZeroU32::MIN);
        RateLimiter::direct(Quota::per_second(per_second).allow_burst(burst))
    })
}

/// When a worker woken by a new delivery or an ended attempt reads its
/// queue: at once, unless its last read found the queue dry, where wakes
/// gather for `gather` from the first (one read for the webhooks that came
/// meanwhile, on a store where each read is a transaction).
fn read_after_wake(read_at: Option<Instant>, ran_dry: bool, gather: Duration, now: Instant) -> Option<Instant> {
    match read_at {
        Some(at) => Some(at),
        None if ran_dry && !gather.is_zero() => Some(now + gather),
        None => None,
    }
}

async fn sleep_until(at: Option<Instant>) {
    if let Some(at) = at {
        tokio::time::sleep_until(at.into()).await;
    }
}

/// What an attempt task needs.
struct AttemptCtx {
    target: Arc<Target>,
    store: Arc<dyn Store>,
    client: HttpClient,
    metrics: Metrics,
    /// Where the target's transform runs.
    lane: Arc<Lane>,
    /// Until when the target asked, with `Retry-After` on a 429, that
    /// nothing be sent: the whole queue waits, not only that delivery.
    asked_to_wait: Arc<Mutex<Option<Instant>>>,
    /// The worker's: the queue is held (410, or paused).
    hold: Arc<AtomicBool>,
}

/// Holds the target's queue for `wait` (capped like a delivery's own retry)
/// unless it is held longer already; true when it now waits longer.
fn hold_queue(asked: &Mutex<Option<Instant>>, target: &Target, wait: Duration) -> bool {
    let wait = wait.min(target.retry.max_backoff);
    let until = Instant::now() + wait;
    let mut asked = asked.lock().unwrap_or_else(|p| p.into_inner());
    let longer = !wait.is_zero() && asked.is_none_or(|at| at < until);
    if longer {
        *asked = Some(until);
    }
    longer
}

impl AttemptCtx {
    /// The target asked (429, `Retry-After`) that nothing be sent for `after`:
    /// the whole queue waits. Noted before the slot is given back, so that
    /// no attempt starts meanwhile; true when it holds the queue longer.
    fn ask_to_wait(&self, after: Duration) -> bool {
        let longer = hold_queue(&self.asked_to_wait, &self.target, after);
        if longer {
            tracing::warn!(target = %self.target.name, ?after, "target asked to wait (Retry-After): deliveries wait");
        }
        longer
    }

    /// One attempt, recorded in the store; `slot` is given back once the
    /// target has answered.
    async fn attempt(&self, due: DueDelivery, slot: Slot) -> Done {
        let name = &self.target.name;
        let due = match due.group {
            true => match self.close_group(due).await {
                Ok(closed) => closed,
                Err(done) => return done,
            },
            false => due,
        };
        let number = due.made + 1;
        let read = match due.event.clone() {
            Some(event) => Ok(Some(event)),
            None => self.store.event(due.event_id).await.map(|e| e.map(Arc::new)),
        };
        let event = match read {
            Ok(Some(event)) => event,
            Ok(None) => {
                let dead = NextStep::Dead("the event is no longer stored".into());
                return self.finish_unsent(&due, number, "event missing", dead).await;
            }
            Err(e) => {
                tracing::error!(target = %name, id = %due.event_id, error = %e, "cannot read the event");
                return Done::Stalled;
            }
        };
        let transformed = match self.transformed(&due, number, &event).await {
            Ok(body) => body,
            Err(done) => return done,
        };
        if self.hold.load(Ordering::SeqCst) {
            // Answered 410 since this attempt started: not sent.
            return Done::Held;
        }
        let started_ms = now_ms();
        let sent = client::Sent { transformed, attempt: number, coalesced: due.coalesced };
        let result = match client::build_request(&self.target, &event, sent, SystemTime::now()) {
            Ok(req) => client::send(&self.client, self.target.timeout, req).await,
            Err(e) => client::AttemptResult {
                status: None,
                error: Some(e),
                verdict: Verdict::Permanent,
                duration: Duration::ZERO,
            },
        };
        // 429 (too many requests) is about the client, not this request: the
        // whole queue waits. A 503's `Retry-After` delays its delivery only.
        let mut asked = None;
        if let (Some(429), Verdict::Retry { after: Some(after) }) = (result.status, &result.verdict) {
            if self.ask_to_wait(*after) {
                asked = Some(*after);
            }
        }
        if result.verdict == Verdict::Pause {
            // 410 Gone: the queue is held from now, before the slot frees
            // another attempt (the worker pauses it at this report).
            self.hold.store(true, Ordering::SeqCst);
        }
        drop(slot);
        if let Some(wait) = asked {
            // The target's limit is on every instance sharing the store.
            if let Err(e) = self.store.asked_to_wait(name, wait).await {
                tracing::warn!(target = %name, error = %e, "other instances not told to wait");
            }
        }
        let now = now_ms();
        let tries = due.tries + 1;
        let next = next_step(&self.target.retry, &result.verdict, tries, event.meta.received_ms, now, fastrand::f64());
        let ms = result.duration.as_secs_f64() * 1000.0;
        self.metrics.delivery_attempt_seconds.with_label_values(&[name]).observe(result.duration.as_secs_f64());
        let outcome = match &next {
            NextStep::Delivered => DeliveryOutcome::Delivered,
            NextStep::RetryAt(_) | NextStep::Hold => DeliveryOutcome::Retried,
            NextStep::Dead(_) => DeliveryOutcome::Dead,
            NextStep::Skipped => DeliveryOutcome::Skipped,
        };
        let error = result.error.as_deref().unwrap_or("");
        match &next {
            NextStep::Dead(reason) => {
                tracing::warn!(target = %name, id = %due.event_id, attempt = number, status = result.status, error, ms, reason = %reason, "delivery dead-lettered")
            }
            NextStep::RetryAt(at) => {
                tracing::info!(target = %name, id = %due.event_id, attempt = number, status = result.status, error, ms, retry_in_ms = at.saturating_sub(now), "delivery failed; will retry")
            }
            _ => {
                tracing::info!(target = %name, id = %due.event_id, attempt = number, status = result.status, ms, outcome = outcome.as_str(), "delivery attempted")
            }
        }
        if due.coalesced > 0 && next == NextStep::Delivered {
            tracing::info!(target = %name, id = %due.event_id, events = due.coalesced, "debounce group delivered");
        }
        let attempt = Attempt {
            at_ms: started_ms,
            duration_ms: result.duration.as_millis() as u64,
            status: result.status,
            error: result.error,
        };
        if !self.record(&due, number, attempt, next).await {
            return Done::Stalled;
        }
        // Counted once recorded: an outcome the store refused is attempted
        // again, and counted then.
        self.metrics.delivery(name, outcome, 1);
        if outcome == DeliveryOutcome::Delivered {
            let lag = now.saturating_sub(event.meta.received_ms) as f64 / 1000.0;
            self.metrics.delivery_lag_seconds.with_label_values(&[name]).observe(lag);
        }
        Done::Sent(result.verdict)
    }

    /// Closes the debounce group whose newest event `due` is, as its attempt
    /// starts: later events form the next group. `Err` when there is nothing
    /// to attempt now.
    async fn close_group(&self, due: DueDelivery) -> Result<DueDelivery, Done> {
        let name = &self.target.name;
        match self.store.close_group(name, &due).await {
            Ok(Some(closed)) => {
                let others = closed.coalesced.saturating_sub(1);
                self.metrics.delivery(name, DeliveryOutcome::Coalesced, others.into());
                Ok(closed)
            }
            // A newer event joined the group since: it is due later.
            Ok(None) => Err(Done::Unsent),
            Err(e) => {
                tracing::error!(target = %name, id = %due.event_id, error = %e, "cannot close the debounce group");
                Err(Done::Stalled)
            }
        }
    }

    /// The body the target's transform makes of `event` (`None`: the target
    /// has no transform). `Err` when the delivery ends here (skipped, or the
    /// transform failed) or must wait (the sandbox is unavailable).
    async fn transformed(&self, due: &DueDelivery, number: u32, event: &StoredEvent) -> Result<Option<Bytes>, Done> {
        let name = &self.target.name;
        let Some(program) = &self.target.transform else { return Ok(None) };
        match self.lane.transform(program, event).await {
            Ok(Output::Value(json)) => Ok(Some(Bytes::from(json))),
            Ok(Output::Empty) => {
                let why = "not sent: the transform gave no output";
                Err(self.finish_unsent(due, number, why, NextStep::Skipped).await)
            }
            Ok(Output::Failed(f)) => {
                let reason = format!("transform: {}", f.message);
                tracing::warn!(target = %name, id = %due.event_id, error = f.kind.as_str(), "transform failed; the delivery goes to the dead letters");
                let done = self.finish_unsent(due, number, &reason, NextStep::Dead(reason.clone())).await;
                if matches!(done, Done::Unsent) {
                    // Once recorded, as the outcomes: a refused one runs again.
                    self.metrics.transform_errors.with_label_values(&[name]).inc();
                }
                Err(done)
            }
            Err(e) => {
                tracing::error!(target = %name, id = %due.event_id, error = %e, "cannot run the transform; trying again later");
                Err(Done::Stalled)
            }
        }
    }

    /// Ends a delivery that is not sent (skipped, transform failed, event
    /// gone), recording why as its attempt.
    async fn finish_unsent(&self, due: &DueDelivery, number: u32, why: &str, next: NextStep) -> Done {
        let outcome = match next {
            NextStep::Skipped => DeliveryOutcome::Skipped,
            _ => DeliveryOutcome::Dead,
        };
        tracing::info!(target = %self.target.name, id = %due.event_id, attempt = number, outcome = outcome.as_str(), "delivery ended without sending");
        let attempt = Attempt { at_ms: now_ms(), duration_ms: 0, status: None, error: Some(why.to_string()) };
        if !self.record(due, number, attempt, next).await {
            return Done::Stalled;
        }
        self.metrics.delivery(&self.target.name, outcome, 1);
        Done::Unsent
    }

    /// Records the attempt; false when the store refused it (the delivery then
    /// stays queued where it was, and the worker waits before reading again).
    async fn record(&self, due: &DueDelivery, number: u32, attempt: Attempt, next: NextStep) -> bool {
        match self.store.complete(&self.target.name, due, attempt, next).await {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(target = %self.target.name, id = %due.event_id, attempt = number, error = %e, "cannot record the attempt");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::{free_slots, read_after_wake};

    #[test]
    fn wakes_gather_only_once_the_queue_ran_dry() {
        let now = Instant::now();
        let gather = Duration::from_millis(10);
        assert_eq!(read_after_wake(None, false, gather, now), None, "more due: read at once");
        assert_eq!(read_after_wake(None, true, gather, now), Some(now + gather), "dry: gather from the first wake");
        let later = now + Duration::from_millis(4);
        assert_eq!(read_after_wake(Some(now + gather), true, gather, later), Some(now + gather), "later wakes join it");
        assert_eq!(read_after_wake(None, true, Duration::ZERO, now), None, "a store whose reads are cheap");
    }

    #[test]
    fn requests_at_the_target_stay_within_concurrency() {
        assert_eq!(free_slots(8, 0, 0), 8);
        assert_eq!(free_slots(8, 3, 3), 5);
        assert_eq!(free_slots(8, 8, 8), 0, "all at the target");
        // Answered and waiting for the store: the target has room again.
        assert_eq!(free_slots(8, 2, 8), 6);
    }

    #[test]
    fn attempts_waiting_for_the_store_are_bounded_too() {
        assert_eq!(free_slots(8, 0, 16), 0, "twice concurrency not yet recorded");
        assert_eq!(free_slots(8, 1, 14), 2);
        assert_eq!(free_slots(1, 0, 1), 1, "concurrency 1: one answered may wait while the next is sent");
        assert_eq!(free_slots(1, 0, 2), 0);
        assert_eq!(free_slots(0, 0, 0), 0);
    }
}
