//! The [`Store`] contract as tests: every backend runs [`run`] with a
//! function that opens a fresh, empty store, one per scenario. A guarantee
//! lives here, in the contract, not in one backend's accident.
//!
//! Each scenario is `async fn name(store: &dyn Store)`; [`run`] names the
//! scenario that failed. Backend-specific behaviour (sled's walk cursor,
//! its layout version, blobs) is tested beside the backend.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::store::Sequenced;

/// Opens a fresh, empty store; what it returns with the store (a temporary
/// folder, a database schema) is kept until the scenario ends.
pub type Fresh<G> = Box<dyn Fn() -> Pin<Box<dyn Future<Output = (Arc<dyn Store>, G)>>>>;

type Scenario = for<'a> fn(&'a dyn Store) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

macro_rules! scenarios {
    ($($name:ident),* $(,)?) => {
        &[$((stringify!($name), |s| Box::pin($name(s)))),*]
    };
}

/// Every scenario of the contract.
const SCENARIOS: &[(&str, Scenario)] = scenarios![
    an_ingested_event_is_stored_whole_with_a_pending_delivery_per_target,
    a_duplicate_within_the_window_answers_the_first_id,
    concurrent_copies_of_one_webhook_store_one_event,
    a_dedup_key_is_new_again_after_its_window,
    expired_dedup_records_are_purged_in_steps_to_the_end,
    first_attempts_come_in_arrival_order_and_skip_what_is_in_flight,
    retries_come_first_once_due_and_tell_when_the_next_is_due,
    a_delivered_delivery_is_done_and_keeps_its_attempts,
    holds_do_not_count_toward_max_attempts_and_a_requeue_starts_afresh,
    dead_letters_are_listed_with_their_reason_and_last_attempt,
    a_requeue_queues_any_delivery_again_due_now,
    a_late_attempt_after_a_requeue_keeps_the_new_position,
    a_skipped_delivery_is_finished,
    pause_is_remembered,
    counts_follow_every_change,
    recent_events_are_newest_first_per_source,
    purge_removes_finished_old_events_only_and_goes_on_from_its_cursor,
    concurrent_completions_keep_the_counts_exact,
    plain_and_ordered_completions_at_once_each_do_their_part,
    an_ended_head_and_a_new_event_of_its_key_at_once_leave_the_new_one_due,
    a_first_attempt_left_without_an_outcome_is_handed_out_again,
    ordered_deliveries_wait_for_the_earlier_one_of_their_key,
    a_dead_delivery_releases_the_next_and_a_replay_queues_behind_the_rest,
    a_delivery_without_a_key_is_never_held,
    a_long_queue_of_one_key_keeps_its_order,
    a_redeliver_of_a_queued_delivery_keeps_its_place,
    a_debounce_group_is_one_delivery_of_its_newest_event,
    a_requeue_of_an_event_in_an_open_group_leaves_it_there,
    a_stale_hand_out_of_a_group_is_refused,
    groups_are_per_key_and_cut_by_max_wait,
    a_keys_next_group_waits_for_its_earlier_group,
];

/// Runs every scenario on a fresh store from `fresh`.
pub async fn run<G>(fresh: Fresh<G>) {
    for (name, scenario) in SCENARIOS {
        let (store, guard) = fresh().await;
        let outcome = tokio::spawn(async move {
            scenario(store.as_ref()).await;
            store.close().await.expect("close");
        });
        if let Err(e) = outcome.await {
            panic!("store contract, scenario `{name}` failed: {e}");
        }
        drop(guard);
    }
}

pub(crate) fn event(source: &str, dedup: &str, targets: &[&str]) -> NewEvent {
    NewEvent {
        id: EventId::new(),
        source: source.into(),
        event: "page.published".into(),
        dedup_key: dedup.into(),
        dedup_window: Duration::from_secs(600),
        content_type: Some("application/json".into()),
        body: bytes::Bytes::from(format!(r#"{{"dedup":"{dedup}","bytes":"é\u0000"}}"#)),
        targets: targets.iter().map(|t| t.to_string()).collect(),
        received_ms: now_ms(),
        sequenced: Vec::new(),
    }
}

async fn accepted(store: &dyn Store, ev: NewEvent) -> EventId {
    match store.ingest(ev).await.expect("ingest") {
        Ingested::Accepted { id, .. } => id,
        other => panic!("expected a new event, got {other:?}"),
    }
}

async fn due(store: &dyn Store, target: &str, at_ms: u64) -> DueBatch {
    let batch = store.due(target, at_ms, 100, &HashSet::new()).await.expect("due");
    assert!(!batch.limited, "no limit shared with other instances: short only when nothing more is due");
    for d in &batch.due {
        if let Some(event) = &d.event {
            // An event handed out with its delivery is the stored one, body and all.
            let stored = store.event(d.event_id).await.expect("event");
            assert_eq!(Some(event.as_ref()), stored.as_ref(), "the event handed out with {}", d.event_id);
        }
    }
    batch
}

fn ids(batch: &DueBatch) -> Vec<EventId> {
    batch.due.iter().map(|d| d.event_id).collect()
}

fn attempt(status: Option<u16>) -> Attempt {
    Attempt { at_ms: now_ms(), duration_ms: 3, status, error: status.is_none().then(|| "refused".to_string()) }
}

/// Hands out `id`'s delivery to `target` and records an attempt ending in `next`.
async fn finish(store: &dyn Store, target: &str, id: EventId, next: NextStep) {
    let batch = due(store, target, now_ms() + 1).await;
    let handed = batch.due.into_iter().find(|d| d.event_id == id).expect("the delivery is due");
    let status = matches!(next, NextStep::Delivered).then_some(200);
    store.complete(target, &handed, attempt(status.or(Some(503))), next).await.expect("complete");
}

async fn state(store: &dyn Store, id: EventId, target: &str) -> DeliveryRecord {
    let all = store.deliveries(id).await.expect("deliveries");
    all.into_iter().find(|d| d.target == target).map(|d| d.record).expect("a delivery to the target")
}

async fn an_ingested_event_is_stored_whole_with_a_pending_delivery_per_target(store: &dyn Store) {
    let ev = event("cms", "k1", &["a", "b"]);
    let body = ev.body.clone();
    let id = match store.ingest(ev).await.expect("ingest") {
        Ingested::Accepted { id, targets } => {
            assert_eq!(targets, 2);
            id
        }
        other => panic!("{other:?}"),
    };
    let stored = store.event(id).await.expect("event").expect("stored");
    assert_eq!(stored.body, body, "the body byte for byte");
    assert_eq!((stored.meta.source.as_str(), stored.meta.event.as_str()), ("cms", "page.published"));
    assert_eq!(stored.meta.targets, ["a", "b"]);
    assert_eq!(stored.meta.content_type.as_deref(), Some("application/json"));
    let deliveries = store.deliveries(id).await.expect("deliveries");
    assert_eq!(deliveries.iter().map(|d| d.target.as_str()).collect::<Vec<_>>(), ["a", "b"]);
    for d in deliveries {
        assert!(matches!(d.record.state, DeliveryState::Pending { .. }) && d.record.attempts.is_empty());
    }
    assert!(store.event(EventId::new()).await.expect("event").is_none());
    assert!(store.deliveries(EventId::new()).await.expect("deliveries").is_empty());
    let unrouted = accepted(store, event("cms", "k2", &[])).await;
    assert!(store.deliveries(unrouted).await.expect("deliveries").is_empty());
}

async fn a_duplicate_within_the_window_answers_the_first_id(store: &dyn Store) {
    let first = accepted(store, event("cms", "same", &["a"])).await;
    assert_eq!(store.ingest(event("cms", "same", &["a"])).await.expect("ingest"), Ingested::Duplicate { id: first });
    // The key is the source's: another source's webhook is new.
    accepted(store, event("other", "same", &["a"])).await;
    assert_eq!(store.counts("a").await.expect("counts").queued, 2);
}

/// Ten copies of each of five webhooks at once: exactly five events, and
/// every copy answered with its webhook's one id.
async fn concurrent_copies_of_one_webhook_store_one_event(store: &dyn Store) {
    let answers = futures_join((0..50).map(|n| store.ingest(event("cms", &format!("race-{}", n % 5), &["a"])))).await;
    let mut by_key: std::collections::HashMap<usize, HashSet<EventId>> = Default::default();
    let mut new = 0;
    for (n, answer) in answers.into_iter().enumerate() {
        let id = match answer.expect("ingest") {
            Ingested::Accepted { id, .. } => {
                new += 1;
                id
            }
            Ingested::Duplicate { id } => id,
        };
        by_key.entry(n % 5).or_default().insert(id);
    }
    assert_eq!(new, 5, "one event per webhook");
    assert!(by_key.values().all(|ids| ids.len() == 1), "{by_key:?}");
    assert_eq!(store.counts("a").await.expect("counts").queued, 5);
}

/// Polls every future to its end, concurrently, in the calling task.
async fn futures_join<F: Future>(futures: impl Iterator<Item = F>) -> Vec<F::Output> {
    let mut pending: Vec<Pin<Box<F>>> = futures.map(Box::pin).collect();
    let mut done: Vec<Option<F::Output>> = pending.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut all = true;
        for (f, slot) in pending.iter_mut().zip(done.iter_mut()) {
            if slot.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *slot = Some(v),
                    std::task::Poll::Pending => all = false,
                }
            }
        }
        if all {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    done.into_iter().map(|v| v.expect("every future finished")).collect()
}

async fn a_dedup_key_is_new_again_after_its_window(store: &dyn Store) {
    let mut ev = event("cms", "brief", &["a"]);
    ev.dedup_window = Duration::from_millis(50);
    let first = accepted(store, ev).await;
    tokio::time::sleep(Duration::from_millis(120)).await;
    let mut again = event("cms", "brief", &["a"]);
    again.dedup_window = Duration::from_millis(50);
    let second = accepted(store, again).await;
    assert_ne!(first, second);
}

/// Each webhook below is its own ingest call, so its own dedup record on
/// either backend.
async fn expired_dedup_records_are_purged_in_steps_to_the_end(store: &dyn Store) {
    // Long enough for four durable ingests on a slow disk.
    let window = Duration::from_secs(1);
    let brief = |key: &str| {
        let mut ev = event("cms", key, &["a"]);
        ev.dedup_window = window;
        ev
    };
    let started = std::time::Instant::now();
    let mut firsts = Vec::new();
    for key in ["1", "2", "3"] {
        firsts.push(accepted(store, brief(key)).await);
    }
    let long = accepted(store, event("cms", "4", &["a"])).await;
    if started.elapsed() < window {
        assert_eq!(store.purge_dedup(now_ms(), 10).await.expect("purge"), 0, "nothing has expired yet");
    }
    tokio::time::sleep((window + Duration::from_millis(100)).saturating_sub(started.elapsed())).await;
    let mut steps = Vec::new();
    while steps.len() < 10 {
        let n = store.purge_dedup(now_ms(), 1).await.expect("purge");
        steps.push(n);
        if n == 0 {
            break;
        }
    }
    assert_eq!(steps, [1, 1, 1, 0], "at most `limit` a call, to the end");
    assert_eq!(store.ingest(event("cms", "4", &["a"])).await.expect("ingest"), Ingested::Duplicate { id: long });
    assert_ne!(accepted(store, brief("1")).await, firsts[0], "its window has passed");
}

async fn first_attempts_come_in_arrival_order_and_skip_what_is_in_flight(store: &dyn Store) {
    let one = accepted(store, event("cms", "1", &["a"])).await;
    let other = accepted(store, event("cms", "2", &["b"])).await;
    let two = accepted(store, event("cms", "3", &["a", "b"])).await;
    let batch = due(store, "a", now_ms()).await;
    assert_eq!(ids(&batch), [one, two], "routed to a, by arrival");
    assert!(batch.due.iter().all(|d| d.tries == 0 && d.made == 0));
    assert_eq!(ids(&due(store, "b", now_ms()).await), [other, two]);
    let skipped = store.due("a", now_ms(), 100, &HashSet::from([one])).await.expect("due");
    assert_eq!(ids(&skipped), [two], "what is in flight is left out");
    let limited = store.due("a", now_ms(), 1, &HashSet::new()).await.expect("due");
    assert_eq!(ids(&limited), [one], "at most `limit`");
    assert!(due(store, "nowhere", now_ms()).await.due.is_empty());
}

async fn retries_come_first_once_due_and_tell_when_the_next_is_due(store: &dyn Store) {
    let early = accepted(store, event("cms", "1", &["a"])).await;
    let later = accepted(store, event("cms", "2", &["a"])).await;
    let retry_at = now_ms() + 60_000;
    finish(store, "a", early, NextStep::RetryAt(retry_at)).await;
    let now = due(store, "a", now_ms()).await;
    assert_eq!(ids(&now), [later], "a retry is not due before its time");
    assert_eq!(now.next_due_ms, Some(retry_at));
    let then = due(store, "a", retry_at).await;
    assert_eq!(ids(&then), [early, later], "once due, retries come first");
    let retry = &then.due[0];
    assert_eq!((retry.tries, retry.made), (1, 1));
    assert!(matches!(state(store, early, "a").await.state, DeliveryState::Pending { due_ms } if due_ms == retry_at));
}

async fn a_delivered_delivery_is_done_and_keeps_its_attempts(store: &dyn Store) {
    let id = accepted(store, event("cms", "1", &["a", "b"])).await;
    finish(store, "a", id, NextStep::RetryAt(now_ms())).await;
    finish(store, "a", id, NextStep::Delivered).await;
    let record = state(store, id, "a").await;
    assert!(matches!(record.state, DeliveryState::Delivered { .. }));
    assert_eq!(record.attempts.len(), 2);
    assert_eq!(record.attempts[0].status, Some(503));
    assert_eq!(record.attempts[1].status, Some(200));
    assert_eq!((record.tries, record.made), (2, 2));
    assert!(due(store, "a", now_ms() + 1).await.due.is_empty());
    assert!(matches!(state(store, id, "b").await.state, DeliveryState::Pending { .. }), "b is its own delivery");
}

async fn holds_do_not_count_toward_max_attempts_and_a_requeue_starts_afresh(store: &dyn Store) {
    let id = accepted(store, event("cms", "x", &["a"])).await;
    finish(store, "a", id, NextStep::Hold).await;
    finish(store, "a", id, NextStep::RetryAt(now_ms())).await;
    let d = due(store, "a", now_ms() + 1).await.due.remove(0);
    assert_eq!((d.tries, d.made), (1, 2), "the 410 hold is made but does not count");
    finish(store, "a", id, NextStep::Dead("gave up".into())).await;
    assert!(store.requeue("a", id).await.expect("requeue"));
    let d = due(store, "a", now_ms() + 1).await.due.remove(0);
    assert_eq!((d.tries, d.made), (0, 3), "a replay starts the count afresh, numbering goes on");
}

async fn dead_letters_are_listed_with_their_reason_and_last_attempt(store: &dyn Store) {
    let a = accepted(store, event("cms", "1", &["a"])).await;
    let b = accepted(store, event("cms", "2", &["b"])).await;
    finish(store, "a", a, NextStep::Dead("gave up after 12 attempts".into())).await;
    finish(store, "b", b, NextStep::Dead("permanent".into())).await;
    let of_a = store.dead_letters(Some("a"), None, 10).await.expect("dead letters");
    assert_eq!(of_a.len(), 1);
    assert_eq!((of_a[0].event_id, of_a[0].target.as_str()), (a, "a"));
    assert_eq!(of_a[0].reason, "gave up after 12 attempts");
    assert_eq!(of_a[0].last_attempt.as_ref().and_then(|t| t.status), Some(503));
    assert!(of_a[0].at_ms > 0);
    assert_eq!(store.dead_letters(None, None, 10).await.expect("dead letters").len(), 2);
    assert_eq!(store.dead_letters(None, None, 1).await.expect("dead letters").len(), 1, "at most `limit`");
    // Newest event first, an event's dead letters in one page by target,
    // paged back from the last event of a page.
    let c = accepted(store, event("cms", "3", &["b", "a"])).await;
    finish(store, "b", c, NextStep::Dead("no".into())).await;
    finish(store, "a", c, NextStep::Dead("no".into())).await;
    let page = |before, limit| async move {
        let list = store.dead_letters(None, before, limit).await.expect("dead letters");
        list.into_iter().map(|d| (d.event_id, d.target)).collect::<Vec<_>>()
    };
    let (a_, b_) = (String::from("a"), String::from("b"));
    assert_eq!(page(None, 10).await, [(c, a_.clone()), (c, b_.clone()), (b, b_.clone()), (a, a_.clone())]);
    assert_eq!(page(None, 1).await, [(c, a_.clone()), (c, b_.clone())], "one event: both of its dead letters");
    assert_eq!(page(Some(c), 1).await, [(b, b_.clone())]);
    assert_eq!(page(Some(b), 1).await, [(a, a_.clone())]);
    assert!(page(Some(a), 1).await.is_empty());
    let of_b = store.dead_letters(Some("b"), Some(c), 10).await.expect("dead letters");
    assert_eq!(of_b.iter().map(|d| d.event_id).collect::<Vec<_>>(), [b]);
    assert!(
        matches!(state(store, a, "a").await.state, DeliveryState::Dead { ref reason, .. } if reason == "gave up after 12 attempts")
    );
    assert!(due(store, "a", now_ms() + 1).await.due.is_empty(), "a dead letter is not due");
}

async fn a_requeue_queues_any_delivery_again_due_now(store: &dyn Store) {
    let dead = accepted(store, event("cms", "1", &["a"])).await;
    let delivered = accepted(store, event("cms", "2", &["a"])).await;
    let pending = accepted(store, event("cms", "3", &["a"])).await;
    finish(store, "a", dead, NextStep::Dead("no".into())).await;
    finish(store, "a", delivered, NextStep::Delivered).await;
    finish(store, "a", pending, NextStep::RetryAt(now_ms() + 3_600_000)).await;
    for id in [dead, delivered, pending] {
        assert!(store.requeue("a", id).await.expect("requeue"));
    }
    let now = due(store, "a", now_ms() + 1).await;
    let mut got = ids(&now);
    got.sort();
    assert_eq!(got, [dead, delivered, pending], "all three due now");
    assert!(now.due.iter().all(|d| d.tries == 0));
    assert!(store.dead_letters(Some("a"), None, 10).await.expect("dead letters").is_empty());
    assert_eq!(store.counts("a").await.expect("counts"), TargetCounts { queued: 3, dead: 0, held: 0 });
    assert!(!store.requeue("nowhere", dead).await.expect("requeue"), "not routed there");
    assert!(!store.requeue("a", EventId::new()).await.expect("requeue"), "no such event");
}

async fn a_late_attempt_after_a_requeue_keeps_the_new_position(store: &dyn Store) {
    let id = accepted(store, event("cms", "x", &["a"])).await;
    let first = due(store, "a", now_ms()).await.due.remove(0);
    // An operator requeues it while its first attempt is out.
    assert!(store.requeue("a", id).await.expect("requeue"));
    store.complete("a", &first, attempt(Some(200)), NextStep::Delivered).await.expect("complete");
    let record = state(store, id, "a").await;
    assert!(matches!(record.state, DeliveryState::Pending { .. }), "{:?}", record.state);
    assert_eq!(record.attempts.len(), 1, "the attempt is recorded");
    assert_eq!(store.counts("a").await.expect("counts").queued, 1);
    assert_eq!(ids(&due(store, "a", now_ms() + 1).await), [id], "due again");
}

async fn a_skipped_delivery_is_finished(store: &dyn Store) {
    let id = accepted(store, event("cms", "x", &["a"])).await;
    finish(store, "a", id, NextStep::Skipped).await;
    assert!(matches!(state(store, id, "a").await.state, DeliveryState::Skipped { .. }));
    assert!(due(store, "a", now_ms() + 1).await.due.is_empty());
    assert_eq!(store.counts("a").await.expect("counts"), TargetCounts { queued: 0, dead: 0, held: 0 });
    assert_eq!(store.purge(now_ms() + 60_000, None, 10).await.expect("purge").0, 1, "finished, so purged");
}

async fn pause_is_remembered(store: &dyn Store) {
    assert!(store.paused_targets().await.expect("paused").is_empty());
    store.set_paused("a", true).await.expect("pause");
    store.set_paused("b", true).await.expect("pause");
    store.set_paused("b", false).await.expect("resume");
    assert_eq!(store.paused_targets().await.expect("paused"), HashSet::from(["a".to_string()]));
}

async fn counts_follow_every_change(store: &dyn Store) {
    let ids: Vec<EventId> = futures_join((0..4).map(|n| accepted(store, event("cms", &n.to_string(), &["a"])))).await;
    assert_eq!(store.counts("a").await.expect("counts"), TargetCounts { queued: 4, dead: 0, held: 0 });
    finish(store, "a", ids[0], NextStep::Delivered).await;
    finish(store, "a", ids[1], NextStep::Dead("no".into())).await;
    finish(store, "a", ids[2], NextStep::RetryAt(now_ms() + 60_000)).await;
    assert_eq!(store.counts("a").await.expect("counts"), TargetCounts { queued: 2, dead: 1, held: 0 });
    store.requeue("a", ids[1]).await.expect("requeue");
    assert_eq!(store.counts("a").await.expect("counts"), TargetCounts { queued: 3, dead: 0, held: 0 });
    assert_eq!(store.counts("unknown").await.expect("counts"), TargetCounts::default());
    let b = accepted(store, event("cms", "b", &["b"])).await;
    let queued = store.queued_targets().await.expect("queued targets");
    assert_eq!(queued, [("a".to_string(), 3), ("b".to_string(), 1)].into());
    finish(store, "b", b, NextStep::Delivered).await;
    let queued = store.queued_targets().await.expect("queued targets");
    assert_eq!(queued, [("a".to_string(), 3)].into(), "a target with nothing queued is not listed");
}

async fn recent_events_are_newest_first_per_source(store: &dyn Store) {
    let a1 = accepted(store, event("a", "1", &[])).await;
    let b1 = accepted(store, event("b", "1", &[])).await;
    let a2 = accepted(store, event("a", "2", &[])).await;
    let all: Vec<EventId> = store.recent_events(None, 10).await.expect("recent").into_iter().map(|e| e.0).collect();
    assert_eq!(all, [a2, b1, a1]);
    let of_a: Vec<EventId> =
        store.recent_events(Some("a"), 10).await.expect("recent").into_iter().map(|e| e.0).collect();
    assert_eq!(of_a, [a2, a1]);
    assert_eq!(store.recent_events(None, 1).await.expect("recent").len(), 1);
    let older: Vec<EventId> =
        store.events_before(Some(b1), None, 10).await.expect("page").events.into_iter().map(|e| e.0).collect();
    assert_eq!(older, [a1], "the page before b1");
    let older_a: Vec<EventId> =
        store.events_before(Some(a2), Some("a"), 10).await.expect("page").events.into_iter().map(|e| e.0).collect();
    assert_eq!(older_a, [a1]);
    assert_eq!(store.events_before(Some(a1), None, 10).await.expect("page"), EventsPage::default(), "the end");
    let exactly = store.events_before(None, None, 3).await.expect("page");
    assert_eq!((exactly.events.len(), exactly.next_before), (3, None), "a page that ends with the events");
    // Pages of one source, `limit` at most each, go on to the end whatever
    // the backend examined per page.
    for n in 2..6 {
        accepted(store, event("b", &n.to_string(), &[])).await;
    }
    let (mut seen, mut before) = (Vec::new(), None);
    for _ in 0..20 {
        let page = store.events_before(before, Some("a"), 2).await.expect("page");
        assert!(page.events.len() <= 2);
        seen.extend(page.events.iter().map(|e| e.0));
        before = page.next_before;
        if before.is_none() {
            break;
        }
    }
    assert_eq!((seen, before), (vec![a2, a1], None));
}

async fn purge_removes_finished_old_events_only_and_goes_on_from_its_cursor(store: &dyn Store) {
    let finished = accepted(store, event("cms", "1", &["a", "b"])).await;
    let half = accepted(store, event("cms", "2", &["a", "b"])).await;
    let unrouted = accepted(store, event("cms", "3", &[])).await;
    finish(store, "a", finished, NextStep::Delivered).await;
    finish(store, "b", finished, NextStep::Dead("no".into())).await;
    finish(store, "a", half, NextStep::Delivered).await;
    assert_eq!(store.purge(0, None, 100).await.expect("purge"), (0, None), "nothing is old enough");
    let cutoff = now_ms() + 60_000;
    let (first, cursor) = store.purge(cutoff, None, 1).await.expect("purge");
    assert!(first <= 1 && cursor.is_some(), "at most `limit` examined, and where to go on");
    let (rest, end) = store.purge(cutoff, cursor, 100).await.expect("purge");
    assert_eq!((first + rest, end), (2, None));
    assert!(store.event(finished).await.expect("event").is_none());
    assert!(store.event(unrouted).await.expect("event").is_none());
    assert!(store.event(half).await.expect("event").is_some(), "a pending delivery keeps its event");
    assert_eq!(
        store.counts("b").await.expect("counts"),
        TargetCounts { queued: 1, dead: 0, held: 0 },
        "its dead letter went with it"
    );
    // Its event is gone, so the same webhook is new again.
    accepted(store, event("cms", "1", &["a"])).await;
}

/// Deliveries completed at once, each exactly once: the counts end exact.
async fn concurrent_completions_keep_the_counts_exact(store: &dyn Store) {
    let ids: Vec<EventId> = futures_join((0..20).map(|n| accepted(store, event("cms", &n.to_string(), &["a"])))).await;
    let handed = store.due("a", now_ms() + 1, 100, &HashSet::new()).await.expect("due").due;
    assert_eq!(handed.len(), ids.len());
    let outcomes = futures_join(handed.iter().enumerate().map(|(n, d)| {
        let next = if n % 4 == 0 { NextStep::Dead("no".into()) } else { NextStep::Delivered };
        store.complete("a", d, attempt(Some(200)), next)
    }))
    .await;
    assert!(outcomes.iter().all(Result::is_ok));
    assert_eq!(store.counts("a").await.expect("counts"), TargetCounts { queued: 0, dead: 5, held: 0 });
    assert!(due(store, "a", now_ms() + 1).await.due.is_empty());
}

/// Outcomes of plain and ordered deliveries recorded at the same moment (a
/// store may record them together): every one is recorded, each ordered one
/// releases the next of its key, and the counts stay exact.
async fn plain_and_ordered_completions_at_once_each_do_their_part(store: &dyn Store) {
    let plain: Vec<EventId> =
        futures_join((0..8).map(|n| accepted(store, event("cms", &format!("p{n}"), &["a"])))).await;
    let mut firsts = Vec::new();
    let mut seconds = Vec::new();
    for key in ["k1", "k2", "k3"] {
        firsts.push(accepted(store, ordered(&format!("{key}-1"), "o", key)).await);
        seconds.push(accepted(store, ordered(&format!("{key}-2"), "o", key)).await);
    }
    let to_a = due(store, "a", now_ms() + 1).await.due;
    let to_o = due(store, "o", now_ms() + 1).await.due;
    assert_eq!(
        ids(&DueBatch { due: to_o.clone(), next_due_ms: None, limited: false }),
        firsts,
        "the first of each key"
    );
    let outcomes = futures_join(
        to_a.iter()
            .map(|d| ("a", d, NextStep::Delivered))
            .chain(to_o.iter().map(|d| ("o", d, NextStep::Delivered)))
            .map(|(target, d, next)| store.complete(target, d, attempt(Some(200)), next)),
    )
    .await;
    assert!(outcomes.iter().all(Result::is_ok));
    for id in plain.iter().chain(&firsts) {
        let target = if plain.contains(id) { "a" } else { "o" };
        assert!(matches!(state(store, *id, target).await.state, DeliveryState::Delivered { .. }), "{id} to {target}");
    }
    assert!(due(store, "a", now_ms() + 1).await.due.is_empty());
    let mut released = ids(&due(store, "o", now_ms() + 1).await);
    released.sort();
    let mut want = seconds.clone();
    want.sort();
    assert_eq!(released, want, "each key's second, released by its first");
    assert_eq!(store.counts("a").await.expect("counts"), TargetCounts { queued: 0, dead: 0, held: 0 });
    assert_eq!(store.counts("o").await.expect("counts"), TargetCounts { queued: 3, dead: 0, held: 0 });
}

/// The head of each of 100 keys ends while a new event of its key arrives,
/// all at once (a backend that batches them may see both in one write):
/// whichever comes first, each new event ends up due, once, and nothing is
/// left held.
async fn an_ended_head_and_a_new_event_of_its_key_at_once_leave_the_new_one_due(store: &dyn Store) {
    const KEYS: usize = 100;
    for n in 0..KEYS {
        accepted(store, ordered(&format!("head-{n}"), "o", &format!("k{n}"))).await;
    }
    let heads = due(store, "o", now_ms() + 1).await.due;
    assert_eq!(heads.len(), KEYS);
    let ended = futures_join(heads.iter().map(|d| store.complete("o", d, attempt(Some(200)), NextStep::Delivered)));
    let arrived = futures_join((0..KEYS).map(|n| store.ingest(ordered(&format!("new-{n}"), "o", &format!("k{n}")))));
    let (ended, arrived) = futures_util::join!(ended, arrived);
    assert!(ended.iter().all(Result::is_ok));
    let mut new: Vec<EventId> = arrived
        .into_iter()
        .map(|a| match a.expect("ingest") {
            Ingested::Accepted { id, .. } => id,
            other => panic!("expected a new event, got {other:?}"),
        })
        .collect();
    new.sort();
    let mut now_due = ids(&due(store, "o", now_ms() + 1).await);
    now_due.sort();
    assert_eq!(now_due, new, "each key's new event, due");
    assert_eq!(store.counts("o").await.expect("counts"), TargetCounts { queued: KEYS as u64, dead: 0, held: 0 });
}

/// A worker leaves out of its reads the attempts it has in flight. One it
/// handed out and dropped without an outcome (it stalled, or was stopped)
/// is handed out again once it is no longer in flight; the others are not.
async fn a_first_attempt_left_without_an_outcome_is_handed_out_again(store: &dyn Store) {
    let all: Vec<EventId> = {
        let mut v = Vec::new();
        for n in 0..5 {
            v.push(accepted(store, event("cms", &n.to_string(), &["a"])).await);
        }
        v
    };
    let first = store.due("a", now_ms() + 1, 2, &HashSet::new()).await.expect("due");
    assert_eq!(ids(&first), all[..2]);
    let in_flight = HashSet::from([all[0], all[1]]);
    let second = store.due("a", now_ms() + 1, 2, &in_flight).await.expect("due");
    assert_eq!(ids(&second), all[2..4]);
    let handed = second.due.iter().find(|d| d.event_id == all[2]).expect("handed");
    store.complete("a", handed, attempt(Some(200)), NextStep::Delivered).await.expect("complete");
    // all[1] was dropped without an outcome; all[0] and all[3] are still out.
    let third = store.due("a", now_ms() + 1, 10, &HashSet::from([all[0], all[3]])).await.expect("due");
    assert_eq!(ids(&third), [all[1], all[4]]);
    assert_eq!(store.counts("a").await.expect("counts").queued, 4);
}

fn ordered(dedup: &str, target: &str, key: &str) -> NewEvent {
    let ev = event("cms", dedup, &[target]);
    ev.with_sequencing(vec![(target.into(), Sequenced::Ordered { key: key.into() })])
}

fn grouped(dedup: &str, target: &str, key: &str, received_ms: u64, window_ms: u64, max_wait_ms: u64) -> NewEvent {
    let mut ev = event("cms", dedup, &[target]);
    ev.received_ms = received_ms;
    ev.with_sequencing(vec![(target.into(), Sequenced::Grouped { key: key.into(), window_ms, max_wait_ms })])
}

async fn waiting_for(store: &dyn Store, id: EventId) -> Option<EventId> {
    store.deliveries(id).await.expect("deliveries").remove(0).waiting_for
}

/// A and B share a key, C has another: B waits while A is pending, in
/// flight or retrying; C flows; A's success releases B.
async fn ordered_deliveries_wait_for_the_earlier_one_of_their_key(store: &dyn Store) {
    let a = accepted(store, ordered("1", "t", "page-1")).await;
    let b = accepted(store, ordered("2", "t", "page-1")).await;
    let c = accepted(store, ordered("3", "t", "page-2")).await;
    assert_eq!(ids(&due(store, "t", now_ms()).await), [a, c], "B waits behind A");
    assert_eq!(store.counts("t").await.expect("counts"), TargetCounts { queued: 3, dead: 0, held: 1 });
    assert_eq!(waiting_for(store, b).await, Some(a));
    assert_eq!(waiting_for(store, a).await, None);
    finish(store, "t", c, NextStep::Delivered).await;
    let retry_at = now_ms() + 60_000;
    finish(store, "t", a, NextStep::RetryAt(retry_at)).await;
    assert!(due(store, "t", now_ms() + 1).await.due.is_empty(), "B still waits while A is retried");
    let retry = due(store, "t", retry_at).await.due;
    assert_eq!(retry.iter().map(|d| d.event_id).collect::<Vec<_>>(), [a], "once due, A alone");
    store.complete("t", &retry[0], attempt(Some(200)), NextStep::Delivered).await.expect("complete");
    let released = due(store, "t", now_ms() + 1).await;
    assert_eq!(ids(&released), [b], "A's success releases B");
    assert_eq!(waiting_for(store, b).await, None);
    assert_eq!(store.counts("t").await.expect("counts"), TargetCounts { queued: 1, dead: 0, held: 0 });
    finish(store, "t", b, NextStep::Delivered).await;
    assert!(due(store, "t", now_ms() + 1).await.due.is_empty());
}

/// A dead delivery releases the next of its key; replayed, it is queued
/// behind those queued before the replay.
async fn a_dead_delivery_releases_the_next_and_a_replay_queues_behind_the_rest(store: &dyn Store) {
    let a = accepted(store, ordered("1", "t", "k")).await;
    let b = accepted(store, ordered("2", "t", "k")).await;
    let c = accepted(store, ordered("3", "t", "k")).await;
    finish(store, "t", a, NextStep::Dead("gave up".into())).await;
    assert_eq!(ids(&due(store, "t", now_ms() + 1).await), [b], "A's death releases B; C waits");
    assert!(store.requeue("t", a).await.expect("requeue"));
    assert_eq!(ids(&due(store, "t", now_ms() + 1).await), [b], "the replayed A waits behind B and C");
    assert_eq!(waiting_for(store, a).await, Some(b));
    assert_eq!(store.counts("t").await.expect("counts"), TargetCounts { queued: 3, dead: 0, held: 2 });
    finish(store, "t", b, NextStep::Delivered).await;
    assert_eq!(ids(&due(store, "t", now_ms() + 1).await), [c]);
    finish(store, "t", c, NextStep::Skipped).await;
    assert_eq!(ids(&due(store, "t", now_ms() + 1).await), [a], "a skip ends C and releases A");
    finish(store, "t", a, NextStep::Delivered).await;
    assert_eq!(store.counts("t").await.expect("counts"), TargetCounts { queued: 0, dead: 0, held: 0 });
    // A requeue of a delivered one with nothing else of its key queued is due at once.
    assert!(store.requeue("t", b).await.expect("requeue"));
    assert_eq!(ids(&due(store, "t", now_ms() + 1).await), [b]);
}

async fn a_delivery_without_a_key_is_never_held(store: &dyn Store) {
    let a = accepted(store, ordered("1", "t", "k")).await;
    let free = accepted(store, event("cms", "2", &["t"])).await;
    let b = accepted(store, ordered("3", "t", "k")).await;
    assert_eq!(ids(&due(store, "t", now_ms()).await), [a, free]);
    assert_eq!(waiting_for(store, b).await, Some(a));
}

/// Three events of one group: one delivery, of the newest, at the group's
/// time; the others end coalesced into it; a later event opens the next group.
async fn a_debounce_group_is_one_delivery_of_its_newest_event(store: &dyn Store) {
    let t0 = now_ms();
    let first = accepted(store, grouped("1", "site", "", t0, 100, 1_000)).await;
    let second = accepted(store, grouped("2", "site", "", t0 + 10, 100, 1_000)).await;
    let newest = accepted(store, grouped("3", "site", "", t0 + 20, 100, 1_000)).await;
    let quiet = due(store, "site", t0 + 119).await;
    assert!(quiet.due.is_empty(), "nothing before newest + window");
    assert_eq!(quiet.next_due_ms, Some(t0 + 120));
    assert_eq!(store.counts("site").await.expect("counts"), TargetCounts { queued: 3, dead: 0, held: 3 });
    let d = &store.deliveries(first).await.expect("deliveries")[0];
    assert!(matches!(d.record.state, DeliveryState::Pending { due_ms } if due_ms == t0 + 120), "{:?}", d.record.state);

    let handed = due(store, "site", t0 + 120).await.due;
    assert_eq!(handed.iter().map(|d| (d.event_id, d.group)).collect::<Vec<_>>(), [(newest, true)]);
    let closed = store.close_group("site", &handed[0]).await.expect("close").expect("the group is current");
    assert_eq!((closed.event_id, closed.coalesced, closed.group), (newest, 3, false));
    for id in [first, second] {
        let state = state(store, id, "site").await.state;
        assert!(matches!(state, DeliveryState::Coalesced { ref into, .. } if *into == newest.to_string()), "{state:?}");
    }
    assert_eq!(store.counts("site").await.expect("counts"), TargetCounts { queued: 1, dead: 0, held: 0 });

    // Closed: a later event forms the next group, while the first is attempted and retried.
    let later = accepted(store, grouped("4", "site", "", now_ms(), 100, 1_000)).await;
    let retry_at = now_ms() + 50;
    store.complete("site", &closed, attempt(Some(503)), NextStep::RetryAt(retry_at)).await.expect("complete");
    let retried = due(store, "site", retry_at).await.due;
    assert_eq!(retried.iter().map(|d| (d.event_id, d.coalesced)).collect::<Vec<_>>(), [(newest, 3)]);
    store.complete("site", &retried[0], attempt(Some(200)), NextStep::Delivered).await.expect("complete");
    let next = due(store, "site", now_ms() + 1_000).await.due;
    assert_eq!(next.iter().map(|d| (d.event_id, d.group)).collect::<Vec<_>>(), [(later, true)]);
    assert_eq!(store.purge(now_ms() + 60_000, None, 100).await.expect("purge").0, 3, "the delivered group is purged");
}

/// A redeliver or replay of an event still in its open group (the newest
/// or another) changes nothing: it is queued already, and is delivered
/// once, with the group.
async fn a_requeue_of_an_event_in_an_open_group_leaves_it_there(store: &dyn Store) {
    let t0 = now_ms();
    let first = accepted(store, grouped("1", "site", "", t0, 100, 1_000)).await;
    let newest = accepted(store, grouped("2", "site", "", t0 + 10, 100, 1_000)).await;
    for id in [newest, first] {
        assert!(store.requeue("site", id).await.expect("requeue"), "queued already");
    }
    assert_eq!(store.counts("site").await.expect("counts"), TargetCounts { queued: 2, dead: 0, held: 2 });
    assert!(due(store, "site", t0 + 109).await.due.is_empty(), "not due before newest + window");
    let handed = due(store, "site", t0 + 110).await.due;
    assert_eq!(handed.iter().map(|d| (d.event_id, d.group)).collect::<Vec<_>>(), [(newest, true)]);
    let closed = store.close_group("site", &handed[0]).await.expect("close").expect("the group is current");
    assert_eq!(closed.coalesced, 2);
    store.complete("site", &closed, attempt(Some(200)), NextStep::Delivered).await.expect("complete");
    assert!(due(store, "site", now_ms() + 60_000).await.due.is_empty(), "delivered once");
    assert_eq!(store.counts("site").await.expect("counts"), TargetCounts { queued: 0, dead: 0, held: 0 });
}

async fn a_stale_hand_out_of_a_group_is_refused(store: &dyn Store) {
    let t0 = now_ms();
    accepted(store, grouped("1", "site", "", t0, 100, 1_000)).await;
    let handed = due(store, "site", t0 + 100).await.due.remove(0);
    // A newer event joins before the attempt starts: the group is due later.
    let newer = accepted(store, grouped("2", "site", "", t0 + 50, 100, 1_000)).await;
    assert_eq!(store.close_group("site", &handed).await.expect("close"), None);
    let d = due(store, "site", t0 + 150).await.due;
    assert_eq!(d.iter().map(|d| d.event_id).collect::<Vec<_>>(), [newer]);
    let closed = store.close_group("site", &d[0]).await.expect("close").expect("current");
    assert_eq!(closed.coalesced, 2);
}

async fn groups_are_per_key_and_cut_by_max_wait(store: &dyn Store) {
    let t0 = now_ms();
    let posts = accepted(store, grouped("1", "site", "posts", t0, 100, 150)).await;
    accepted(store, grouped("2", "site", "pages", t0 + 60, 100, 150)).await;
    let pages = accepted(store, grouped("3", "site", "pages", t0 + 120, 100, 150)).await;
    // posts: due t0 + 100; pages: newest + window = t0 + 220, oldest + max_wait = t0 + 210.
    let at = |ms| due(store, "site", t0 + ms);
    assert_eq!(ids(&at(100).await), [posts]);
    assert_eq!(at(100).await.next_due_ms, Some(t0 + 210));
    let both = at(210).await;
    let mut got = ids(&both);
    got.sort();
    assert_eq!(got, [posts, pages]);
}

/// The groups of one key are delivered in order: while a closed group's
/// delivery is pending (in flight, then retrying), the key's next group is
/// not handed out, even once its time has come; other keys' groups are. The
/// first group's end lets the next go.
async fn a_keys_next_group_waits_for_its_earlier_group(store: &dyn Store) {
    let t0 = now_ms();
    let first = accepted(store, grouped("1", "site", "k", t0, 100, 1_000)).await;
    let handed = due(store, "site", t0 + 100).await.due;
    assert_eq!(ids(&DueBatch { due: handed.clone(), next_due_ms: None, limited: false }), [first]);
    let closed = store.close_group("site", &handed[0]).await.expect("close").expect("the group is current");
    // While the first is in flight, the key's next group forms and ripens.
    let second = accepted(store, grouped("2", "site", "k", t0 + 50, 100, 1_000)).await;
    let other = accepted(store, grouped("3", "site", "other", t0 + 50, 100, 1_000)).await;
    let skip = HashSet::from([first]);
    let ripe = store.due("site", t0 + 150, 100, &skip).await.expect("due");
    assert_eq!(ids(&ripe), [other], "k's second group waits while the first is in flight");
    let retry_at = t0 + 60_000;
    store.complete("site", &closed, attempt(Some(503)), NextStep::RetryAt(retry_at)).await.expect("complete");
    assert_eq!(ids(&due(store, "site", t0 + 150).await), [other], "and while it is retried");
    let retry = due(store, "site", retry_at).await.due;
    let retried: Vec<EventId> = retry.iter().map(|d| d.event_id).filter(|id| *id != other).collect();
    assert_eq!(retried, [first], "once due, the first group's retry, not the second group");
    let first_again = retry.iter().find(|d| d.event_id == first).expect("the retry");
    store.complete("site", first_again, attempt(Some(200)), NextStep::Delivered).await.expect("complete");
    let next: Vec<EventId> = ids(&due(store, "site", retry_at).await).into_iter().filter(|id| *id != other).collect();
    assert_eq!(next, [second], "the first delivered, the second group goes");
}

/// More deliveries of one key than one record of a backend may pack: they
/// are released one by one, in order; a redelivered one keeps its place,
/// a replayed one (it had ended) goes to the end.
async fn a_long_queue_of_one_key_keeps_its_order(store: &dyn Store) {
    let ids = futures_join((0..150).map(|n| accepted(store, ordered(&format!("o{n:03}"), "t", "k")))).await;
    let mut ids = ids;
    ids.sort();
    assert_eq!(store.counts("t").await.expect("counts").held, 149);
    let mut delivered = Vec::new();
    for n in 0..150 {
        let due = due(store, "t", now_ms() + 1).await;
        assert_eq!(due.due.len(), 1, "one at a time, at step {n}");
        let d = &due.due[0];
        if n == 10 {
            // Redelivered while it waits its turn: it keeps its place.
            assert!(store.requeue("t", ids[100]).await.expect("requeue"));
        }
        store.complete("t", d, attempt(Some(200)), NextStep::Delivered).await.expect("complete");
        delivered.push(d.event_id);
        if n == 20 {
            // Replayed once delivered: behind every one queued.
            assert!(store.requeue("t", ids[20]).await.expect("requeue"));
        }
    }
    let mut expected: Vec<EventId> = ids.clone();
    expected.push(ids[20]);
    assert_eq!(delivered[..150], expected[..150]);
    let last = due(store, "t", now_ms() + 1).await.due;
    assert_eq!(last.iter().map(|d| d.event_id).collect::<Vec<_>>(), [ids[20]], "the replay, last");
    store.complete("t", &last[0], attempt(Some(200)), NextStep::Delivered).await.expect("complete");
    assert_eq!(store.counts("t").await.expect("counts"), TargetCounts { queued: 0, dead: 0, held: 0 });
}

/// A redeliver of a delivery still queued keeps its place in its key's
/// queue. Asked while its attempt is in flight, it releases nothing of its
/// key (two requests of one key would be at the target at once): that
/// attempt is recorded, the delivery is sent again, and only its end
/// releases the next. A held one redelivered waits where it was.
async fn a_redeliver_of_a_queued_delivery_keeps_its_place(store: &dyn Store) {
    let a = accepted(store, ordered("1", "t", "k")).await;
    let b = accepted(store, ordered("2", "t", "k")).await;
    let c = accepted(store, ordered("3", "t", "k")).await;
    let first = due(store, "t", now_ms() + 1).await.due;
    assert_eq!(ids(&DueBatch { due: first.clone(), ..DueBatch::default() }), [a]);
    assert!(store.requeue("t", b).await.expect("requeue"), "held: stays behind A, before C");
    assert!(store.requeue("t", a).await.expect("requeue"), "while its attempt is out");
    let during = store.due("t", now_ms() + 1, 10, &HashSet::from([a])).await.expect("due");
    assert!(during.due.is_empty(), "nothing of k while A's attempt is out: {:?}", ids(&during));
    assert_eq!(waiting_for(store, b).await, Some(a));
    assert_eq!(waiting_for(store, c).await, Some(a));
    assert_eq!(store.counts("t").await.expect("counts"), TargetCounts { queued: 3, dead: 0, held: 2 });
    store.complete("t", &first[0], attempt(Some(200)), NextStep::Delivered).await.expect("complete");
    let record = state(store, a, "t").await;
    assert!(matches!(record.state, DeliveryState::Pending { .. }), "{:?}", record.state);
    assert_eq!(record.attempts.len(), 1, "the attempt is recorded");
    assert_eq!(ids(&due(store, "t", now_ms() + 1).await), [a], "A again, as asked; B still waits");
    finish(store, "t", a, NextStep::Delivered).await;
    assert_eq!(ids(&due(store, "t", now_ms() + 1).await), [b], "A's end releases B");
    finish(store, "t", b, NextStep::Delivered).await;
    assert_eq!(ids(&due(store, "t", now_ms() + 1).await), [c]);
    finish(store, "t", c, NextStep::Delivered).await;
    assert_eq!(store.counts("t").await.expect("counts"), TargetCounts { queued: 0, dead: 0, held: 0 });
}

/// Opens two instances of one fresh, empty store, as two relay processes
/// sharing it would, with leases of the given length.
pub type FreshPair<G> = Box<dyn Fn(Duration) -> Pin<Box<dyn Future<Output = (Arc<dyn Store>, Arc<dyn Store>, G)>>>>;

type SharedScenario = for<'a> fn(&'a dyn Store, &'a dyn Store) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

macro_rules! shared_scenarios {
    ($($name:ident),* $(,)?) => {
        &[$((stringify!($name), |a, b| Box::pin($name(a, b)))),*]
    };
}

/// The contract of a store that several instances share, on top of
/// [`SCENARIOS`]: what one instance does, the others see and respect.
const SHARED: &[(&str, SharedScenario)] = shared_scenarios![
    a_delivery_is_handed_to_one_instance_at_a_time,
    an_expired_lease_is_taken_over_and_both_attempts_are_kept,
    a_late_outcome_leaves_the_new_lease_alone,
    concurrency_is_held_over_every_instance,
    the_rate_is_held_over_every_instance,
    instances_hear_of_each_others_work_pauses_and_circuits,
    an_open_circuit_holds_every_instance_and_one_probes,
];

/// The lease [`run_shared`] opens its pairs with.
const LEASE: Duration = Duration::from_secs(30);
/// A lease runs from when its hand-out got the target's lock: the time the
/// hand-out took is added to the `now` it was given (a few ms here).
const HAND_OUT_SLACK_MS: u64 = 1_000;

/// Runs every scenario of a shared store on a fresh pair from `fresh`.
pub async fn run_shared<G>(fresh: FreshPair<G>) {
    for (name, scenario) in SHARED {
        let (a, b, guard) = fresh(LEASE).await;
        let outcome = tokio::spawn(async move {
            scenario(a.as_ref(), b.as_ref()).await;
            a.close().await.expect("close");
            b.close().await.expect("close");
        });
        if let Err(e) = outcome.await {
            panic!("shared store contract, scenario `{name}` failed: {e}");
        }
        drop(guard);
    }
}

async fn a_delivery_is_handed_to_one_instance_at_a_time(a: &dyn Store, b: &dyn Store) {
    let ids = futures_join((0..10).map(|n| accepted(a, event("cms", &n.to_string(), &["t"])))).await;
    let now = now_ms() + 1;
    let to_a = a.due("t", now, 6, &HashSet::new()).await.expect("due").due;
    let to_b = b.due("t", now, 10, &HashSet::new()).await.expect("due").due;
    assert_eq!((to_a.len(), to_b.len()), (6, 4));
    let mut all: Vec<EventId> = to_a.iter().chain(&to_b).map(|d| d.event_id).collect();
    all.sort();
    let mut expected = ids.clone();
    expected.sort();
    assert_eq!(all, expected, "each delivery to one instance");
    let in_flight: HashSet<EventId> = to_a.iter().map(|d| d.event_id).collect();
    assert!(a.due("t", now, 10, &in_flight).await.expect("due").due.is_empty(), "b's are b's");
    // Either instance's records are the one store's.
    for d in &to_b {
        b.complete("t", d, attempt(Some(200)), NextStep::Delivered).await.expect("complete");
    }
    assert_eq!(a.counts("t").await.expect("counts").queued, 6);
    let seen_by_a = a.deliveries(to_b[0].event_id).await.expect("deliveries");
    assert!(matches!(seen_by_a[0].record.state, DeliveryState::Delivered { .. }));
}

/// An instance that stops answering (killed mid-attempt) leaves its lease
/// to expire; another attempts the delivery; a late completion by the first
/// is recorded beside the second's (at-least-once).
async fn an_expired_lease_is_taken_over_and_both_attempts_are_kept(a: &dyn Store, b: &dyn Store) {
    let id = accepted(a, event("cms", "x", &["t"])).await;
    let now = now_ms() + 1;
    let first = a.due("t", now, 10, &HashSet::new()).await.expect("due").due;
    assert_eq!(ids(&DueBatch { due: first.clone(), next_due_ms: None, limited: false }), [id]);
    assert!(b.due("t", now, 10, &HashSet::new()).await.expect("due").due.is_empty(), "leased to a");
    let after = now + LEASE.as_millis() as u64 + HAND_OUT_SLACK_MS;
    let taken = b.due("t", after, 10, &HashSet::new()).await.expect("due").due;
    assert_eq!(taken.iter().map(|d| d.event_id).collect::<Vec<_>>(), [id], "taken over once the lease expired");
    b.complete("t", &taken[0], attempt(Some(200)), NextStep::Delivered).await.expect("complete");
    a.complete("t", &first[0], attempt(Some(200)), NextStep::Delivered).await.expect("complete");
    let record = state(a, id, "t").await;
    assert!(matches!(record.state, DeliveryState::Delivered { .. }));
    assert_eq!(record.attempts.len(), 2, "both attempts are visible");
    assert_eq!(a.counts("t").await.expect("counts").queued, 0);
}

/// The other order: the first instance's outcome comes late, while the one
/// that took the delivery over is still attempting it. Its attempt is
/// recorded, but the delivery stays the second's: leased (no instance takes
/// it again meanwhile), and moved on by the second's outcome.
async fn a_late_outcome_leaves_the_new_lease_alone(a: &dyn Store, b: &dyn Store) {
    let id = accepted(a, event("cms", "x", &["t"])).await;
    let now = now_ms() + 1;
    let first = a.due("t", now, 10, &HashSet::new()).await.expect("due").due;
    let after = now + LEASE.as_millis() as u64 + HAND_OUT_SLACK_MS;
    let taken = b.due("t", after, 10, &HashSet::new()).await.expect("due").due;
    assert_eq!(taken.iter().map(|d| d.event_id).collect::<Vec<_>>(), [id], "taken over once the lease expired");
    a.complete("t", &first[0], attempt(Some(503)), NextStep::RetryAt(after)).await.expect("complete");
    assert!(a.due("t", after + 1, 10, &HashSet::new()).await.expect("due").due.is_empty(), "b's lease stands");
    b.complete("t", &taken[0], attempt(Some(200)), NextStep::Delivered).await.expect("complete");
    let record = state(a, id, "t").await;
    assert!(matches!(record.state, DeliveryState::Delivered { .. }), "{:?}", record.state);
    assert_eq!(record.attempts.len(), 2, "both attempts are visible");
    assert_eq!(a.counts("t").await.expect("counts").queued, 0);
}

async fn concurrency_is_held_over_every_instance(a: &dyn Store, b: &dyn Store) {
    let share = Share { concurrency: 2, rate: None, attempt: Duration::from_secs(5) };
    a.share("t", share);
    b.share("t", share);
    futures_join((0..5).map(|n| accepted(a, event("cms", &n.to_string(), &["t"])))).await;
    let now = now_ms() + 1;
    let to_a = a.due("t", now, 5, &HashSet::new()).await.expect("due");
    assert!(to_a.limited, "more are due: the short hand-out says so");
    let to_a = to_a.due;
    assert_eq!(to_a.len(), 2, "the target's concurrency");
    let none = b.due("t", now, 5, &HashSet::new()).await.expect("due");
    assert!(none.due.is_empty(), "a's two fill the target's concurrency");
    assert!(none.next_due_ms.is_some() && none.limited, "b is told to look again");
    a.complete("t", &to_a[0], attempt(Some(200)), NextStep::Delivered).await.expect("complete");
    assert_eq!(b.due("t", now, 5, &HashSet::new()).await.expect("due").due.len(), 1, "a's end makes room for one");
    // a's own attempt in flight counts too.
    let in_flight = HashSet::from([to_a[1].event_id]);
    let full = a.due("t", now, 5, &in_flight).await.expect("due");
    assert!(full.due.is_empty() && full.limited);
}

async fn the_rate_is_held_over_every_instance(a: &dyn Store, b: &dyn Store) {
    let share = Share { concurrency: 100, rate: Some((10, 2)), attempt: Duration::from_secs(5) };
    a.share("t", share);
    b.share("t", share);
    futures_join((0..6).map(|n| accepted(a, event("cms", &n.to_string(), &["t"])))).await;
    let now = now_ms() + 1;
    assert_eq!(a.due("t", now, 10, &HashSet::new()).await.expect("due").due.len(), 2, "the burst");
    let none = b.due("t", now, 10, &HashSet::new()).await.expect("due");
    assert!(none.due.is_empty() && none.limited, "a used the burst for both");
    assert_eq!(none.next_due_ms, Some(now + 100), "the next token, at 10 per second");
    assert_eq!(b.due("t", now + 150, 10, &HashSet::new()).await.expect("due").due.len(), 1, "one token in 150 ms");
}

/// A circuit one instance opened is the cluster's: no instance is handed a
/// delivery of the target while it is open, then one instance the probe
/// (one delivery), until the target answers it: that closes the circuit
/// for all, whatever the prober's own breaker knew (it may have started
/// after the circuit opened).
async fn an_open_circuit_holds_every_instance_and_one_probes(a: &dyn Store, b: &dyn Store) {
    let share = Share { concurrency: 100, rate: None, attempt: Duration::from_secs(5) };
    a.share("t", share);
    b.share("t", share);
    futures_join((0..4).map(|n| accepted(a, event("cms", &n.to_string(), &["t"])))).await;
    let opened = now_ms();
    a.circuit_opened("t", Duration::from_secs(60)).await.expect("open");
    let held = b.due("t", opened + 1, 10, &HashSet::new()).await.expect("due");
    assert!(held.due.is_empty() && held.limited, "open on every instance");
    let until = held.next_due_ms.expect("told when it may probe");
    assert!((opened + 60_000..opened + 61_000).contains(&until), "{until}");
    let probe = b.due("t", until, 10, &HashSet::new()).await.expect("due").due;
    assert_eq!(probe.len(), 1, "once open_for has passed, one delivery: the probe");
    assert!(a.due("t", until, 10, &HashSet::new()).await.expect("due").due.is_empty(), "b's probe is out");
    b.complete("t", &probe[0], attempt(Some(503)), NextStep::RetryAt(until)).await.expect("complete");
    assert!(a.due("t", until, 10, &HashSet::new()).await.expect("due").due.is_empty(), "a failed probe closes nothing");
    let again = b.due("t", until, 10, &HashSet::new()).await.expect("due").due;
    assert_eq!(again.len(), 1, "b probes again");
    b.complete("t", &again[0], attempt(Some(200)), NextStep::Delivered).await.expect("complete");
    assert_eq!(a.due("t", until, 10, &HashSet::new()).await.expect("due").due.len(), 3, "answered: closed for a too");
}

async fn instances_hear_of_each_others_work_pauses_and_circuits(a: &dyn Store, b: &dyn Store) {
    let mut heard = b.notices().expect("a shared store has notices");
    async fn next(heard: &mut tokio::sync::broadcast::Receiver<Notice>) -> Notice {
        match tokio::time::timeout(Duration::from_secs(5), heard.recv()).await {
            Ok(Ok(notice)) => notice,
            other => panic!("nothing heard: {other:?}"),
        }
    }
    assert_eq!(next(&mut heard).await, Notice::AnyQueued, "b says when it starts listening: anything may be queued");
    accepted(a, event("cms", "1", &["t"])).await;
    assert_eq!(next(&mut heard).await, Notice::Queued("t".into()));
    a.set_paused("t", true).await.expect("pause");
    assert_eq!(next(&mut heard).await, Notice::Paused { target: "t".into(), paused: true });
    a.circuit_opened("t", Duration::from_secs(30)).await.expect("tell");
    assert_eq!(next(&mut heard).await, Notice::CircuitOpened { target: "t".into(), open_ms: 30_000 });
    a.asked_to_wait("t", Duration::from_secs(2)).await.expect("tell");
    assert_eq!(next(&mut heard).await, Notice::AskedToWait { target: "t".into(), wait_ms: 2_000 });
}
