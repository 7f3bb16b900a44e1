//! Ingest rounds, and the wakeups of other instances.
//!
//! A round (a batch of [`super::batch`]) stores the webhooks queued while
//! the previous rounds ran in one transaction: dedup entries, events,
//! deliveries, group rows. Its `NOTIFY` is sent after the commit, by the
//! [`Notifier`]: PostgreSQL serializes the commits of every transaction that
//! notifies (a lock held until its commit is on disk), which would take
//! group commit away from concurrent rounds and instances.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use deadpool_postgres::Pool;
use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use tokio::sync::{broadcast, mpsc};
use tokio_postgres::types::ToSql;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{db_error, execute, pool_error, query, to_i64, Open, CHANNEL, CIRCUITS, PAUSES};
use crate::store::{dedup_digest, EventId, Ingested, NewEvent, Notice, Sequenced, StoreError};

/// Webhooks a round takes at most.
pub const MAX_ROUND: usize = 512;

/// The advisory lock of an order key's queue: taken while its deliveries
/// are given their places, so that places follow commit order on every
/// instance.
pub fn order_lock(target: &str, key: &str) -> i64 {
    lock_id("order", target, key)
}

/// An advisory lock's id: the first 8 bytes of a digest of what it guards.
pub fn lock_id(kind: &str, target: &str, key: &str) -> i64 {
    let mut h = Sha256::new();
    h.update(kind.as_bytes());
    h.update([0]);
    h.update(target.as_bytes());
    h.update([0]);
    h.update(key.as_bytes());
    let digest = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(first)
}

/// Order keys' locks ($1), taken in the order given (sorted by every caller:
/// no deadlock).
pub const ORDER_LOCKS: &str = "SELECT count(pg_advisory_xact_lock(k)) FROM unnest($1::int8[]) AS k";

/// Ids that rise in the order rounds take their order locks, within this
/// process (first attempts and `events_before` go by id).
fn rising_id() -> EventId {
    static LAST: Mutex<Option<Uuid>> = Mutex::new(None);
    let mut last = LAST.lock().unwrap_or_else(|p| p.into_inner());
    let mut id = Uuid::now_v7();
    if let Some(prev) = *last {
        if id <= prev {
            id = Uuid::from_u128(prev.as_u128() + 1);
        }
    }
    *last = Some(id);
    EventId(id)
}

/// Stores `events` in one transaction; their answers, in order.
pub async fn round(pool: &Pool, events: &[NewEvent], notifier: &Notifier) -> Result<Vec<Ingested>, StoreError> {
    let open = Open::new(pool.get().await.map_err(pool_error)?);
    let tx = open.client();
    // BEGIN goes with the round's first statement, COMMIT with its last:
    // two round trips fewer, each a wait on this process while the
    // transaction is open. Durable before any 202, also where a pooler
    // dropped the session's options.
    let durable = || async { tx.batch_execute("BEGIN; SET LOCAL synchronous_commit = on").await.map_err(db_error) };

    // Order keys first, in one order on every instance (no deadlock).
    let mut locks: Vec<i64> = events
        .iter()
        .flat_map(|e| e.sequenced.iter())
        .filter_map(|(t, s)| match s {
            Sequenced::Ordered { key } => Some(order_lock(t, key)),
            Sequenced::Grouped { .. } => None,
        })
        .collect();
    locks.sort_unstable();
    locks.dedup();
    if !locks.is_empty() {
        let params: [&(dyn ToSql + Sync); 1] = [&locks];
        let lock = execute(tx, ORDER_LOCKS, &params);
        futures_util::try_join!(durable(), lock)?;
    }

    // Dedup: the first of each key in the round is its lead; later copies
    // answer with the lead's outcome.
    let ids: Vec<EventId> = events.iter().map(|_| rising_id()).collect();
    let digests: Vec<[u8; 32]> = events.iter().map(|e| dedup_digest(&e.source, &e.dedup_key)).collect();
    let mut lead_of: HashMap<[u8; 32], usize> = HashMap::new();
    let leads: Vec<usize> = (0..events.len()).filter(|&n| *lead_of.entry(digests[n]).or_insert(n) == n).collect();
    let now = crate::store::now_ms();
    let mut by_hash: Vec<usize> = leads.clone();
    by_hash.sort_by_key(|&n| digests[n]);
    let hashes: Vec<&[u8]> = by_hash.iter().map(|&n| &digests[n][..]).collect();
    let lead_ids: Vec<Uuid> = by_hash.iter().map(|&n| ids[n].0).collect();
    let expires: Vec<i64> =
        by_hash.iter().map(|&n| to_i64(now.saturating_add(events[n].dedup_window.as_millis() as u64))).collect();
    let now_param = to_i64(now);
    let params: [&(dyn ToSql + Sync); 4] = [&hashes, &lead_ids, &expires, &now_param];
    let dedup = query(
        tx,
        "INSERT INTO hr_dedup (hash, event_id, expires_ms)
             SELECT * FROM unnest($1::bytea[], $2::uuid[], $3::int8[])
             ON CONFLICT (hash) DO UPDATE SET event_id = excluded.event_id, expires_ms = excluded.expires_ms
               WHERE hr_dedup.expires_ms <= $4
             RETURNING hash",
        &params,
    );
    let taken = if locks.is_empty() { futures_util::try_join!(durable(), dedup)?.1 } else { dedup.await? };
    let new: std::collections::HashSet<Vec<u8>> = taken.iter().map(|r| r.get::<_, Vec<u8>>(0)).collect();
    let seen: Vec<&[u8]> = hashes.iter().copied().filter(|h| !new.contains(*h)).collect();
    let mut first_of: HashMap<Vec<u8>, Uuid> = HashMap::new();
    if !seen.is_empty() {
        let rows = query(tx, "SELECT hash, event_id FROM hr_dedup WHERE hash = ANY($1)", &[&seen]).await?;
        first_of = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    }
    let stored: Vec<usize> = leads.iter().copied().filter(|&n| new.contains(&digests[n][..])).collect();

    // Debounce groups: each (target, key) once per round, in one order.
    let mut groups: BTreeMap<(&str, &str), Joined> = BTreeMap::new();
    for &n in &stored {
        let ev = &events[n];
        for (target, s) in &ev.sequenced {
            if let Sequenced::Grouped { key, window_ms, max_wait_ms } = s {
                let received = to_i64(ev.received_ms);
                let g = groups
                    .entry((target.as_str(), key.as_str()))
                    .or_insert(Joined { first_ms: received, ..Joined::default() });
                g.first_ms = g.first_ms.min(received);
                g.newest_ms = received;
                g.newest_id = ids[n].0;
                g.window_ms = to_i64(*window_ms);
                g.max_wait_ms = to_i64(*max_wait_ms);
            }
        }
    }
    let mut group_due: HashMap<(String, String), i64> = HashMap::new();
    if !groups.is_empty() {
        let keys: (Vec<&str>, Vec<&str>) = groups.keys().copied().unzip();
        let col = |f: fn(&Joined) -> i64| groups.values().map(f).collect::<Vec<i64>>();
        let newest: Vec<Uuid> = groups.values().map(|g| g.newest_id).collect();
        let rows = query(tx,
                "INSERT INTO hr_groups AS g (target, key, first_ms, newest_ms, newest_id, window_ms, max_wait_ms)
                 SELECT * FROM unnest($1::text[], $2::text[], $3::int8[], $4::int8[], $5::uuid[], $6::int8[], $7::int8[])
                 ON CONFLICT (target, key) DO UPDATE SET newest_ms = excluded.newest_ms, newest_id = excluded.newest_id,
                    window_ms = excluded.window_ms, max_wait_ms = excluded.max_wait_ms
                 RETURNING target, key, due_ms",
                &[
                    &keys.0,
                    &keys.1,
                    &col(|g| g.first_ms),
                    &col(|g| g.newest_ms),
                    &newest,
                    &col(|g| g.window_ms),
                    &col(|g| g.max_wait_ms),
                ],
            ).await?;
        group_due = rows.iter().map(|r| ((r.get(0), r.get(1)), r.get(2))).collect();
    }

    // The events, then their deliveries.
    let mut e_cols = EventColumns::default();
    let mut d_cols = DeliveryColumns::default();
    for &n in &stored {
        let ev = &events[n];
        e_cols.push(ids[n], ev, &digests[n])?;
        for target in &ev.targets {
            let s = ev.sequenced.iter().find(|(t, _)| t == target).map(|(_, s)| s);
            let (order_key, grp) = match s {
                Some(Sequenced::Ordered { key }) => (Some(key.clone()), None),
                Some(Sequenced::Grouped { key, .. }) => (None, Some(key.clone())),
                None => (None, None),
            };
            let due = grp
                .as_ref()
                .and_then(|k| group_due.get(&(target.clone(), k.clone())).copied())
                .unwrap_or(to_i64(ev.received_ms));
            d_cols.push(target, ids[n].0, due, order_key, grp)?;
        }
    }
    // The events and their deliveries in one round trip: the statements
    // are prepared first, so that they go out in this order.
    let insert_events = tx
        .prepare_cached(
            "INSERT INTO hr_events (id, source, event, received_ms, content_type, targets, dedup, order_keys, group_keys, body)
             SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::int8[], $5::text[], $6::jsonb[],
                                  $7::bytea[], $8::jsonb[], $9::jsonb[], $10::bytea[])",
        )
        .await
        .map_err(db_error)?;
    // Places in a key's queue are taken in the round's order, under the
    // key's lock; a delivery is held behind an earlier pending one of its
    // key, stored before (a completion that would release it takes the
    // same lock) or earlier in this round.
    let insert_deliveries = tx
        .prepare_cached(
            "INSERT INTO hr_deliveries (target, event_id, due_ms, order_key, grp, seq, held, record)
             SELECT t, e, d, o, g, CASE WHEN o IS NULL THEN NULL ELSE nextval('hr_order_seq') END,
                    o IS NOT NULL AND (b OR EXISTS (SELECT 1 FROM hr_deliveries p
                                                     WHERE p.target = t AND p.order_key = o AND p.status = 'p')),
                    r
             FROM unnest($1::text[], $2::uuid[], $3::int8[], $4::text[], $5::text[], $6::jsonb[], $7::bool[])
                  WITH ORDINALITY AS x(t, e, d, o, g, r, b, n)",
        )
        .await
        .map_err(db_error)?;
    let events_params: [&(dyn ToSql + Sync); 10] = [
        &e_cols.id,
        &e_cols.source,
        &e_cols.event,
        &e_cols.received,
        &e_cols.content_type,
        &e_cols.targets,
        &e_cols.dedup,
        &e_cols.order,
        &e_cols.group,
        &e_cols.body,
    ];
    let deliveries_params: [&(dyn ToSql + Sync); 7] =
        [&d_cols.target, &d_cols.event_id, &d_cols.due, &d_cols.order_key, &d_cols.grp, &d_cols.record, &d_cols.behind];
    let (with_events, with_deliveries) = (!stored.is_empty(), !d_cols.target.is_empty());
    futures_util::try_join!(
        async {
            if with_events {
                tx.execute(&insert_events, &events_params).await?;
            }
            Ok(())
        },
        async {
            if with_deliveries {
                tx.execute(&insert_deliveries, &deliveries_params).await?;
            }
            Ok(())
        },
        // After a failed insert, PostgreSQL ends the transaction with a
        // rollback here, and the insert's error fails the round.
        tx.batch_execute("COMMIT"),
    )
    .map_err(db_error)?;
    open.committed();
    notifier.queued(d_cols.target.iter());

    let mut answers = Vec::with_capacity(events.len());
    for (n, ev) in events.iter().enumerate() {
        let lead = lead_of.get(&digests[n]).copied().unwrap_or(n);
        let answer = if new.contains(&digests[n][..]) {
            if lead == n {
                Ingested::Accepted { id: ids[n], targets: ev.targets.len() }
            } else {
                Ingested::Duplicate { id: ids[lead] }
            }
        } else {
            match first_of.get(&digests[n][..]) {
                Some(first) => Ingested::Duplicate { id: EventId(*first) },
                None => return Err(StoreError::Io("a dedup entry vanished within its round".into())),
            }
        };
        answers.push(answer);
    }
    Ok(answers)
}

/// What a round's events of one debounce group bring to it.
#[derive(Default)]
struct Joined {
    first_ms: i64,
    newest_ms: i64,
    newest_id: Uuid,
    window_ms: i64,
    max_wait_ms: i64,
}

#[derive(Default)]
struct EventColumns<'a> {
    id: Vec<Uuid>,
    source: Vec<&'a str>,
    event: Vec<&'a str>,
    received: Vec<i64>,
    content_type: Vec<Option<&'a str>>,
    targets: Vec<serde_json::Value>,
    dedup: Vec<&'a [u8]>,
    order: Vec<serde_json::Value>,
    group: Vec<serde_json::Value>,
    body: Vec<&'a [u8]>,
}

impl<'a> EventColumns<'a> {
    fn push(&mut self, id: EventId, ev: &'a NewEvent, digest: &'a [u8; 32]) -> Result<(), StoreError> {
        let keys = |grouped: bool| -> serde_json::Value {
            ev.sequenced
                .iter()
                .filter_map(|(t, s)| match (s, grouped) {
                    (Sequenced::Ordered { key }, false) | (Sequenced::Grouped { key, .. }, true) => {
                        Some((t.clone(), serde_json::Value::String(key.clone())))
                    }
                    _ => None,
                })
                .collect::<serde_json::Map<_, _>>()
                .into()
        };
        self.id.push(id.0);
        self.source.push(&ev.source);
        self.event.push(&ev.event);
        self.received.push(to_i64(ev.received_ms));
        self.content_type.push(ev.content_type.as_deref());
        self.targets.push(serde_json::to_value(&ev.targets).map_err(|e| StoreError::Io(e.to_string()))?);
        self.dedup.push(&digest[..]);
        self.order.push(keys(false));
        self.group.push(keys(true));
        self.body.push(&ev.body);
        Ok(())
    }
}

#[derive(Default)]
struct DeliveryColumns {
    target: Vec<String>,
    event_id: Vec<Uuid>,
    due: Vec<i64>,
    order_key: Vec<Option<String>>,
    /// Behind an earlier delivery of its target and key in the same round.
    behind: Vec<bool>,
    grp: Vec<Option<String>>,
    record: Vec<serde_json::Value>,
    /// The (target, order key) pairs seen so far.
    keys: std::collections::HashSet<(String, String)>,
}

impl DeliveryColumns {
    fn push(
        &mut self,
        target: &str,
        id: Uuid,
        due: i64,
        order_key: Option<String>,
        grp: Option<String>,
    ) -> Result<(), StoreError> {
        let record = crate::store::DeliveryRecord::pending(due.max(0) as u64);
        self.target.push(target.to_string());
        self.event_id.push(id);
        self.due.push(due);
        self.behind.push(order_key.as_ref().is_some_and(|k| !self.keys.insert((target.to_string(), k.clone()))));
        self.order_key.push(order_key);
        self.grp.push(grp);
        self.record.push(serde_json::to_value(record).map_err(|e| StoreError::Io(e.to_string()))?);
        Ok(())
    }
}

/// Tells every instance which targets got work, after the commits that
/// queued it: one `NOTIFY` for all the rounds that committed while the last
/// one was sent, on a connection that does not wait for the disk. A notice
/// lost (a crash right after a commit, a failed send) delays other
/// instances' workers until their next wakeup for that target, or their
/// idle recheck; this instance's own workers are woken by ingress.
#[derive(Clone)]
pub struct Notifier(mpsc::UnboundedSender<Vec<String>>);

impl Notifier {
    /// Starts the task that sends the notices on `pool`; it ends with the
    /// last handle.
    pub fn start(pool: Pool) -> Notifier {
        let (tx, mut rx) = mpsc::unbounded_channel::<Vec<String>>();
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut targets: BTreeSet<String> = first.into_iter().collect();
                while let Ok(more) = rx.try_recv() {
                    targets.extend(more);
                }
                let named: Vec<&str> = targets.iter().map(String::as_str).collect();
                if let Err(e) = notify(&pool, &notice_of(&named)).await {
                    tracing::warn!(error = %e, targets = named.len(), "could not tell other instances of queued work; they find it at their next wakeup");
                }
            }
        });
        Notifier(tx)
    }

    /// Queues a notice for `targets` (a round's deliveries: each target
    /// once; none: nothing to say).
    pub fn queued<'a>(&self, targets: impl Iterator<Item = &'a String>) {
        let mut named: Vec<&String> = targets.collect();
        named.sort_unstable();
        named.dedup();
        if !named.is_empty() {
            let _ = self.0.send(named.into_iter().cloned().collect());
        }
    }
}

async fn notify(pool: &Pool, notice: &str) -> Result<(), StoreError> {
    let client = pool.get().await.map_err(pool_error)?;
    execute(&client, "SELECT pg_notify($1, $2)", &[&CHANNEL, &notice]).await.map(drop)
}

/// Listens for `NOTIFY` on its own connection and passes on what other
/// instances (and this one) did; reconnects when the connection drops, and
/// then says that anything may have been queued, since what was sent
/// meanwhile is unknown.
pub async fn listen(
    config: tokio_postgres::Config,
    tls: tokio_postgres_rustls::MakeRustlsConnect,
    owner: uuid::Uuid,
    notices: broadcast::Sender<Notice>,
    shutdown: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let connected = tokio::select! {
            _ = shutdown.cancelled() => return,
            c = config.connect(tls.clone()) => c,
        };
        match connected {
            Ok((client, mut connection)) => {
                let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
                let listen = format!("LISTEN {CHANNEL}; LISTEN {PAUSES}; LISTEN {CIRCUITS}");
                let listening = client.batch_execute(&listen);
                // The connection is driven by the stream: poll both.
                let mut listening = std::pin::pin!(listening);
                let mut listened = false;
                backoff = Duration::from_millis(100);
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        done = &mut listening, if !listened => {
                            listened = true;
                            if let Err(e) = done {
                                tracing::warn!(error = %db_error(e), "LISTEN failed");
                                break;
                            }
                            // Listening from here on; what came before is unknown.
                            let _ = notices.send(Notice::AnyQueued);
                        }
                        message = messages.next() => match message {
                            Some(Ok(tokio_postgres::AsyncMessage::Notification(n))) => {
                                for notice in notices_of(n.channel(), n.payload(), owner) {
                                    let _ = notices.send(notice);
                                }
                            }
                            Some(Ok(_)) => {}
                            Some(Err(e)) => {
                                tracing::warn!(error = %db_error(e), "the database connection for wakeups dropped; reconnecting");
                                break;
                            }
                            None => break,
                        }
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %db_error(e), "cannot connect to the database for wakeups; retrying");
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// A `NOTIFY hookrelay_queued` payload naming `targets`, or `*` (any may
/// have work) past what a notice may carry (8,000 bytes).
pub fn notice_of(targets: &[&str]) -> String {
    let named = targets.join("\n");
    if named.len() > 7_000 {
        ANY.to_string()
    } else {
        named
    }
}

/// The payload that stands for every target.
const ANY: &str = "*";

/// What one `NOTIFY` says to the instance `owner` (which ignores its own
/// waits: it holds already).
fn notices_of(channel: &str, payload: &str, owner: uuid::Uuid) -> Vec<Notice> {
    if channel == PAUSES || channel == CIRCUITS {
        let Some((value, target)) = payload.split_once('\n') else { return Vec::new() };
        let target = target.to_string();
        if channel == PAUSES {
            return vec![Notice::Paused { target, paused: value == "1" }];
        }
        if let Some(wait) = value.strip_prefix("wait ") {
            let (wait, from) = wait.split_once(' ').unwrap_or((wait, ""));
            if from == owner.to_string() {
                return Vec::new();
            }
            return wait.parse().map(|wait_ms| vec![Notice::AskedToWait { target, wait_ms }]).unwrap_or_default();
        }
        return value.parse().map(|open_ms| vec![Notice::CircuitOpened { target, open_ms }]).unwrap_or_default();
    }
    if payload == ANY {
        return vec![Notice::AnyQueued];
    }
    payload.split('\n').filter(|t| !t.is_empty()).map(|t| Notice::Queued(t.to_string())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_notify_names_targets_or_a_pause() {
        let me = uuid::Uuid::now_v7();
        assert_eq!(notices_of(CHANNEL, "a\nb", me), [Notice::Queued("a".into()), Notice::Queued("b".into())]);
        assert_eq!(notices_of(PAUSES, "1\nbuild", me), [Notice::Paused { target: "build".into(), paused: true }]);
        assert_eq!(notices_of(PAUSES, "0\nbuild", me), [Notice::Paused { target: "build".into(), paused: false }]);
        assert!(notices_of(PAUSES, "garbage", me).is_empty());
        assert_eq!(
            notices_of(CIRCUITS, "30000\nbuild", me),
            [Notice::CircuitOpened { target: "build".into(), open_ms: 30_000 }]
        );
        assert!(notices_of(CIRCUITS, "soon\nbuild", me).is_empty());
        assert_eq!(
            notices_of(CIRCUITS, "wait 2000\nbuild", me),
            [Notice::AskedToWait { target: "build".into(), wait_ms: 2_000 }]
        );
        assert!(notices_of(CIRCUITS, "wait soon\nbuild", me).is_empty());
        let mine = format!("wait 2000 {me}\nbuild");
        assert!(notices_of(CIRCUITS, &mine, me).is_empty(), "its own wait: held already");
        let other = format!("wait 2000 {}\nbuild", uuid::Uuid::now_v7());
        assert_eq!(notices_of(CIRCUITS, &other, me), [Notice::AskedToWait { target: "build".into(), wait_ms: 2_000 }]);
        let many: Vec<String> = (0..1_000).map(|n| format!("target-{n}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert_eq!(notices_of(CHANNEL, &notice_of(&many), me), [Notice::AnyQueued], "too many for a notice: any");
        assert_eq!(notice_of(&["a", "b"]), "a\nb");
    }

    #[test]
    fn lock_ids_differ_by_kind_target_and_key() {
        assert_ne!(lock_id("order", "t", "k"), lock_id("share", "t", "k"));
        assert_ne!(order_lock("t", "k"), order_lock("t", "k2"));
        assert_ne!(order_lock("ab", "c"), order_lock("a", "bc"));
    }
}
