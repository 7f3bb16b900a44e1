//! Attempt outcomes, recorded in batches (see [`super::batch`]): the
//! deliveries of a batch are read and locked with one statement, moved on
//! by [`DeliveryRecord::attempted`] (the same rule as every backend's), and
//! written back with one statement.

use std::collections::{BTreeSet, HashMap};

use deadpool_postgres::Pool;
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use super::{db_error, ms, pool_error, record_of, status, to_i64, Open, CHANNEL};
use crate::store::{now_ms, Attempt, DeliveryRecord, DeliveryState, DueDelivery, EventId, NextStep, StoreError};

/// Outcomes a batch records at most.
pub const MAX_BATCH: usize = 256;

/// An attempt at a delivery handed out by `due`, and what follows it.
pub struct Outcome {
    pub target: String,
    pub due: DueDelivery,
    pub attempt: Attempt,
    pub next: NextStep,
}

/// A delivery as the batch found it, then as it leaves it.
struct Row {
    status: i8,
    due_ms: i64,
    queued: bool,
    /// Its key's queue (`order_by`), if any.
    order_key: Option<String>,
    record: DeliveryRecord,
    /// Another instance's lease: it took the delivery over after this
    /// instance's expired, and its attempt decides what comes next.
    leased_elsewhere: bool,
}

/// Records `outcomes` in one transaction (on a connection that commits
/// without waiting for the disk, unless the batch releases the next
/// delivery of a key); one `()` per outcome. An outcome whose
/// event was purged meanwhile has nothing to record.
pub async fn record(pool: &Pool, outcomes: &[Outcome], owner: Uuid) -> Result<Vec<()>, StoreError> {
    // BEGIN goes with the read, COMMIT with the writes: two round trips.
    let open = Open::new(pool.get().await.map_err(pool_error)?);
    let tx = open.client();
    let targets: Vec<&str> = outcomes.iter().map(|o| o.target.as_str()).collect();
    let ids: Vec<Uuid> = outcomes.iter().map(|o| o.due.event_id.0).collect();
    let read_st = tx.prepare_cached(READ).await.map_err(db_error)?;
    let write_st = tx.prepare_cached(WRITE).await.map_err(db_error)?;
    let notify_st = tx.prepare_cached("SELECT pg_notify($1, $2)").await.map_err(db_error)?;
    // Prepared before the flight below, like every statement in it: one
    // given as text would be prepared first, and run after the COMMIT.
    let locks_st = tx.prepare_cached(super::ingest::ORDER_LOCKS).await.map_err(db_error)?;
    let release_st = tx.prepare_cached(RELEASE_NEXT).await.map_err(db_error)?;
    let circuits_st = tx.prepare_cached(PROBE_ANSWERED).await.map_err(db_error)?;
    let params: [&(dyn ToSql + Sync); 2] = [&targets, &ids];
    let (_, found) =
        futures_util::try_join!(tx.batch_execute("BEGIN"), tx.query(&read_st, &params)).map_err(db_error)?;
    let mut rows: HashMap<(String, Uuid), Row> = HashMap::with_capacity(found.len());
    for r in &found {
        let (target, event_id): (String, Uuid) = (r.get("target"), r.get("event_id"));
        let due_ms = r.get("due_ms");
        // One unreadable record must not fail the batch's other outcomes:
        // its history is lost, its attempts are counted afresh.
        let record = record_of(r, "record").unwrap_or_else(|e| {
            tracing::warn!(%target, id = %EventId(event_id), error = %e, "unreadable delivery record; its attempt count restarts");
            DeliveryRecord::pending(ms(due_ms))
        });
        let leased_elsewhere = r.get::<_, Option<Uuid>>("lease_owner").is_some_and(|o| o != owner);
        let row = Row {
            status: r.get("status"),
            due_ms,
            queued: r.get("queued"),
            order_key: r.get("order_key"),
            record,
            leased_elsewhere,
        };
        rows.insert((target, event_id), row);
    }
    let now = now_ms();
    let mut released: BTreeSet<&str> = BTreeSet::new();
    // Targets that answered (not a retryable failure): a probe among them
    // closes its circuit for the cluster, whatever this instance's breaker.
    let answered: Vec<&str> = outcomes
        .iter()
        .filter(|o| o.attempt.status.is_some_and(|s| !(s == 408 || s == 429 || s >= 500)))
        .map(|o| o.target.as_str())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    // The (target, key) queues whose head ended: their next is released.
    let mut heads_ended: BTreeSet<(String, String)> = BTreeSet::new();
    for o in outcomes {
        let key = (o.target.clone(), o.due.event_id.0);
        let Some(row) = rows.get_mut(&key) else { continue };
        // Still where it was handed out? If an operator requeued it
        // meanwhile, their position is kept and the attempt recorded only.
        let current = row.status == b'p' as i8
            && ms(row.due_ms) == o.due.due_ms
            && row.queued == o.due.queued
            && !row.leased_elsewhere;
        row.record.attempted(o.attempt.clone(), &o.next, current, now);
        if current {
            row.status = status(&row.record.state);
            if let DeliveryState::Pending { due_ms } = row.record.state {
                (row.due_ms, row.queued) = (to_i64(due_ms), true);
            }
            if let Some(k) = row.order_key.as_ref().filter(|_| row.record.state.is_finished()) {
                // The next of its key is now the head: any instance may take it.
                released.insert(&o.target);
                heads_ended.insert((o.target.clone(), k.clone()));
            }
        }
    }
    // Every row read is one an outcome names: all are written back.
    let mut cols = Columns::default();
    for (key, row) in &rows {
        cols.push(key, row)?;
    }
    let write: [&(dyn ToSql + Sync); 8] = [
        &cols.target,
        &cols.event_id,
        &cols.status,
        &cols.due_ms,
        &cols.queued,
        &cols.at_ms,
        &cols.record,
        &cols.keep_lease,
    ];
    let notice = super::ingest::notice_of(&released.into_iter().collect::<Vec<_>>());
    let notify: [&(dyn ToSql + Sync); 2] = [&CHANNEL, &notice];
    // Their keys' locks (in one order, as ingest rounds take them) before
    // the next ones are released: an ingest round sees either the head
    // pending (and holds its new delivery) or the release.
    let (ended_targets, ended_keys): (Vec<String>, Vec<String>) = heads_ended.into_iter().unzip();
    let locks: Vec<i64> = {
        let mut l: Vec<i64> =
            ended_targets.iter().zip(&ended_keys).map(|(t, k)| super::ingest::order_lock(t, k)).collect();
        l.sort_unstable();
        l.dedup();
        l
    };
    let lock_params: [&(dyn ToSql + Sync); 1] = [&locks];
    let release_params: [&(dyn ToSql + Sync); 2] = [&ended_targets, &ended_keys];
    let circuit_params: [&(dyn ToSql + Sync); 3] = [&answered, &owner, &CHANNEL];
    // After a failed statement, PostgreSQL ends the transaction with a
    // rollback at COMMIT, and the statement's error fails the batch.
    futures_util::try_join!(
        // A batch that releases the next delivery of a key commits once on
        // disk: committed without waiting, it is visible at once, and the
        // next delivery could be sent before the head's end is durable (a
        // database crash would then send the head again, after it).
        async {
            match ended_keys.is_empty() {
                true => Ok(()),
                false => tx.batch_execute("SET LOCAL synchronous_commit = on").await,
            }
        },
        async {
            match locks.is_empty() {
                true => Ok(0),
                false => tx.execute(&locks_st, &lock_params).await,
            }
        },
        async {
            match cols.target.is_empty() {
                true => Ok(0),
                false => tx.execute(&write_st, &write).await,
            }
        },
        async {
            match ended_keys.is_empty() {
                true => Ok(0),
                false => tx.execute(&release_st, &release_params).await,
            }
        },
        async {
            match answered.is_empty() {
                true => Ok(0),
                false => tx.execute(&circuits_st, &circuit_params).await,
            }
        },
        async {
            match notice.is_empty() {
                true => Ok(0),
                false => tx.execute(&notify_st, &notify).await,
            }
        },
        tx.batch_execute("COMMIT"),
    )
    .map_err(db_error)?;
    open.committed();
    Ok(outcomes.iter().map(|_| ()).collect())
}

/// The circuits of the targets given ($1) whose probe this instance ($2)
/// had out: the target answered, they close, and every instance's workers
/// of those targets are woken (on $3, the channel of queued work).
const PROBE_ANSWERED: &str = "WITH closed AS (
         DELETE FROM hr_circuits WHERE target = ANY($1) AND probe_owner = $2 RETURNING target)
     SELECT count(pg_notify($3, target)) FROM closed";
/// The head of each (target, key) queue given, no longer held.
pub const RELEASE_NEXT: &str = "UPDATE hr_deliveries d SET held = false
     FROM unnest($1::text[], $2::text[]) AS u(t, k),
          LATERAL (SELECT o.event_id FROM hr_deliveries o
                    WHERE o.target = u.t AND o.order_key = u.k AND o.status = 'p'
                    ORDER BY o.seq LIMIT 1) AS h
     WHERE d.target = u.t AND d.event_id = h.event_id AND d.held";

/// The batch's deliveries, locked in one order on every instance (no deadlock).
const READ: &str = "SELECT d.target, d.event_id, d.status, d.due_ms, d.queued, d.order_key, d.record, d.lease_owner
     FROM hr_deliveries d JOIN unnest($1::text[], $2::uuid[]) AS u(t, e) ON d.target = u.t AND d.event_id = u.e
     ORDER BY d.target, d.event_id
     FOR UPDATE OF d";
/// Every row read, written back; another instance's lease is kept.
const WRITE: &str = r#"UPDATE hr_deliveries d SET status = u.s::"char", due_ms = u.d, queued = u.q, at_ms = u.a,
        record = u.r,
        lease_owner = CASE WHEN u.k THEN d.lease_owner END, lease_until = CASE WHEN u.k THEN d.lease_until END
     FROM unnest($1::text[], $2::uuid[], $3::text[], $4::int8[], $5::bool[], $6::int8[], $7::jsonb[], $8::bool[])
          AS u(t, e, s, d, q, a, r, k)
     WHERE d.target = u.t AND d.event_id = u.e"#;

#[derive(Default)]
struct Columns {
    target: Vec<String>,
    event_id: Vec<Uuid>,
    status: Vec<String>,
    due_ms: Vec<i64>,
    queued: Vec<bool>,
    at_ms: Vec<Option<i64>>,
    record: Vec<serde_json::Value>,
    keep_lease: Vec<bool>,
}

impl Columns {
    fn push(&mut self, (target, id): &(String, Uuid), row: &Row) -> Result<(), StoreError> {
        self.target.push(target.clone());
        self.event_id.push(*id);
        self.status.push(char::from(row.status as u8).to_string());
        self.due_ms.push(row.due_ms);
        self.queued.push(row.queued);
        self.at_ms.push(match &row.record.state {
            DeliveryState::Dead { at_ms, .. } => Some(to_i64(*at_ms)),
            _ => None,
        });
        self.record.push(serde_json::to_value(&row.record).map_err(|e| StoreError::Io(e.to_string()))?);
        self.keep_lease.push(row.leased_elsewhere);
        Ok(())
    }
}
