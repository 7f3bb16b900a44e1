//! Background upkeep: purging finished events after `storage.retention`, and
//! keeping the queue-depth and dead-letter gauges in step with the store.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::store::{now_ms, Notice, Store};

/// How often finished events are purged.
const PURGE_EVERY: Duration = Duration::from_secs(60);
/// Events examined per writer job, so that ingest never waits long behind a purge.
const PURGE_STEP: usize = 256;
/// How long wakeups from other instances are gathered before the workers
/// are woken.
const GATHER: Duration = Duration::from_millis(5);
/// Time between two readings of a target's counts.
const COUNT_EVERY: Duration = Duration::from_secs(5);

/// Purges events older than `retention` whose deliveries are all finished,
/// and expired dedup records, every [`PURGE_EVERY`].
pub async fn purge(store: Arc<dyn Store>, retention: Duration, shutdown: CancellationToken) {
    while purge_round(store.as_ref(), retention, PURGE_STEP, &shutdown).await {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(PURGE_EVERY) => {}
        }
    }
}

/// One round of [`purge`], in steps of `step`; false on shutdown.
async fn purge_round(store: &dyn Store, retention: Duration, step: usize, shutdown: &CancellationToken) -> bool {
    let cutoff = now_ms().saturating_sub(retention.as_millis() as u64);
    let (mut purged, mut after) = (0, None);
    loop {
        if shutdown.is_cancelled() {
            return false;
        }
        match store.purge(cutoff, after, step).await {
            Ok((n, last)) => {
                purged += n;
                match last {
                    Some(id) => after = Some(id),
                    None => break,
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "retention purge failed; trying again later");
                break;
            }
        }
    }
    if purged > 0 {
        tracing::info!(purged, "purged delivered and dead events past retention");
    }
    // Expired dedup records, to the end: one comes with each webhook (or
    // round), so a step a round would fall behind them.
    loop {
        if shutdown.is_cancelled() {
            return false;
        }
        match store.purge_dedup(now_ms(), step).await {
            Ok(n) if n >= step => {}
            Ok(_) => return true,
            Err(e) => {
                tracing::error!(error = %e, "purge of expired dedup records failed; trying again later");
                return true;
            }
        }
    }
}

/// Sets `hookrelay_queue_depth`, `hookrelay_dead_letters` and `hookrelay_held_deliveries` of one target
/// from the store's counts, every few seconds.
pub async fn gauge_queue(target: String, store: Arc<dyn Store>, metrics: Metrics, shutdown: CancellationToken) {
    loop {
        match store.counts(&target).await {
            Ok(c) => metrics.queue(&target, c),
            Err(e) => tracing::warn!(%target, error = %e, "cannot count the queue"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(COUNT_EVERY) => {}
        }
    }
}

/// Names, once at start, each target with queued deliveries that the config
/// does not list (removed while its queue was not yet drained): nothing
/// delivers them until a config lists it again.
pub async fn name_unlisted(store: Arc<dyn Store>, listed: Vec<String>, shutdown: CancellationToken) {
    let queued = tokio::select! {
        _ = shutdown.cancelled() => return,
        queued = store.queued_targets() => queued,
    };
    match queued {
        Ok(queued) => {
            for (target, n) in queued.iter().filter(|(t, _)| !listed.contains(t)) {
                tracing::warn!(%target, queued = n, "a target the config does not list has queued deliveries: they stay stored, undelivered, until a config lists it again");
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot list the targets with queued deliveries"),
    }
}

/// Follows what the instances sharing the store tell each other: wakes the
/// workers of targets that got work (every worker when notices were
/// missed), and pauses or resumes a target's worker as another instance did.
pub async fn follow_notices(
    mut notices: tokio::sync::broadcast::Receiver<Notice>,
    store: Arc<dyn Store>,
    workers: Arc<super::Workers>,
    shutdown: CancellationToken,
) {
    use tokio::sync::broadcast::error::RecvError;
    // Targets heard of, woken together once GATHER has passed: every
    // instance's every round notifies, and a worker's read of the queue
    // serves all the rounds that came meanwhile.
    let mut heard: std::collections::BTreeSet<String> = Default::default();
    let mut wake_at: Option<tokio::time::Instant> = None;
    loop {
        let next = tokio::select! {
            _ = shutdown.cancelled() => return,
            next = notices.recv() => next,
            _ = async { if let Some(at) = wake_at { tokio::time::sleep_until(at).await } }, if wake_at.is_some() => {
                workers.wake(heard.iter().map(String::as_str));
                heard.clear();
                wake_at = None;
                continue;
            }
        };
        match next {
            Ok(Notice::Queued(target)) => {
                heard.insert(target);
                wake_at.get_or_insert_with(|| tokio::time::Instant::now() + GATHER);
            }
            Ok(Notice::AnyQueued) | Err(RecvError::Lagged(_)) => {
                // Notices were missed: pauses too may have changed.
                match store.paused_targets().await {
                    Ok(paused) => {
                        for target in workers.names() {
                            let control = super::Control::PausedElsewhere(paused.contains(&target));
                            workers.control(&target, control).await;
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot read the paused targets after missed notices"),
                }
                workers.wake_all();
            }
            Ok(Notice::Paused { target, paused }) => {
                workers.control(&target, super::Control::PausedElsewhere(paused)).await;
            }
            Ok(Notice::CircuitOpened { target, open_ms }) => {
                workers.control(&target, super::Control::CircuitOpened(Duration::from_millis(open_ms))).await;
            }
            Ok(Notice::AskedToWait { target, wait_ms }) => {
                workers.control(&target, super::Control::AskedToWait(Duration::from_millis(wait_ms))).await;
            }
            Err(RecvError::Closed) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{conformance, Ingested, SledStore};

    #[tokio::test]
    async fn a_round_purges_every_expired_dedup_record_whatever_its_step() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path(), 8 << 20).expect("open");
        for key in ["1", "2", "3", "4", "5"] {
            let mut ev = conformance::event("cms", key, &["a"]);
            ev.dedup_window = Duration::from_millis(20);
            assert!(matches!(store.ingest(ev).await.expect("ingest"), Ingested::Accepted { .. }));
        }
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert!(purge_round(&store, Duration::from_secs(3_600), 2, &CancellationToken::new()).await);
        assert_eq!(store.purge_dedup(now_ms(), 100).await.expect("purge"), 0, "none left for the next round");
    }
}
