//! Attempt outcomes, recorded in batches (see [`super::batch`]): the
//! deliveries of a batch are read and locked with one statement, moved on
//! by [`DeliveryRecord::attempted`] (the same rule as every backend's), and
//! written back with one statement.

use std::collections::{BTreeSet, HashMap};

use deadpool_postgres::Pool;
use uuid::Uuid;

use super::{db_error, execute, ms, pool_error, query, record_of, status, to_i64, CHANNEL};
use crate::store::{now_ms, Attempt, DeliveryRecord, DeliveryState, DueDelivery, NextStep, StoreError};

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
    ordered: bool,
    record: DeliveryRecord,
}

/// Records `outcomes` in one transaction (on a connection that commits
/// without waiting for the disk); one `()` per outcome. An outcome whose
/// event was purged meanwhile has nothing to record.
pub async fn record(pool: &Pool, outcomes: &[Outcome]) -> Result<Vec<()>, StoreError> {
    let mut client = pool.get().await.map_err(pool_error)?;
    let tx = client.transaction().await.map_err(db_error)?;
    let targets: Vec<&str> = outcomes.iter().map(|o| o.target.as_str()).collect();
    let ids: Vec<Uuid> = outcomes.iter().map(|o| o.due.event_id.0).collect();
    // Locked in one order on every instance (no deadlock).
    let found = query(
        &tx,
        "SELECT d.target, d.event_id, d.status, d.due_ms, d.queued, d.order_key IS NOT NULL AS ordered, d.record
         FROM hr_deliveries d JOIN unnest($1::text[], $2::uuid[]) AS u(t, e) ON d.target = u.t AND d.event_id = u.e
         ORDER BY d.target, d.event_id
         FOR UPDATE OF d",
        &[&targets, &ids],
    )
    .await?;
    let mut rows: HashMap<(String, Uuid), Row> = HashMap::with_capacity(found.len());
    for r in &found {
        let row = Row {
            status: r.get("status"),
            due_ms: r.get("due_ms"),
            queued: r.get("queued"),
            ordered: r.get("ordered"),
            record: record_of(r, "record")?,
        };
        rows.insert((r.get("target"), r.get("event_id")), row);
    }
    let now = now_ms();
    let mut released: BTreeSet<&str> = BTreeSet::new();
    for o in outcomes {
        let key = (o.target.clone(), o.due.event_id.0);
        let Some(row) = rows.get_mut(&key) else { continue };
        // Still where it was handed out? If an operator requeued it
        // meanwhile, their position is kept and the attempt recorded only.
        let current = row.status == b'p' as i8 && ms(row.due_ms) == o.due.due_ms && row.queued == o.due.queued;
        row.record.attempted(o.attempt.clone(), &o.next, current, now);
        if current {
            row.status = status(&row.record.state);
            if let DeliveryState::Pending { due_ms } = row.record.state {
                (row.due_ms, row.queued) = (to_i64(due_ms), true);
            }
            if row.ordered && row.record.state.is_finished() {
                // The next of its key is now the head: any instance may take it.
                released.insert(&o.target);
            }
        }
    }
    // Every row read is one an outcome names: all are written back.
    let mut cols = Columns::default();
    for (key, row) in &rows {
        cols.push(key, row)?;
    }
    if !cols.target.is_empty() {
        execute(
            &tx,
            r#"UPDATE hr_deliveries d SET status = u.s::"char", due_ms = u.d, queued = u.q, at_ms = u.a, record = u.r,
                   lease_owner = NULL, lease_until = NULL
               FROM unnest($1::text[], $2::uuid[], $3::text[], $4::int8[], $5::bool[], $6::int8[], $7::jsonb[])
                    AS u(t, e, s, d, q, a, r)
               WHERE d.target = u.t AND d.event_id = u.e"#,
            &[&cols.target, &cols.event_id, &cols.status, &cols.due_ms, &cols.queued, &cols.at_ms, &cols.record],
        )
        .await?;
    }
    if !released.is_empty() {
        let notice = super::ingest::notice_of(&released.into_iter().collect::<Vec<_>>());
        execute(&tx, "SELECT pg_notify($1, $2)", &[&CHANNEL, &notice]).await?;
    }
    tx.commit().await.map_err(db_error)?;
    Ok(outcomes.iter().map(|_| ()).collect())
}

#[derive(Default)]
struct Columns {
    target: Vec<String>,
    event_id: Vec<Uuid>,
    status: Vec<String>,
    due_ms: Vec<i64>,
    queued: Vec<bool>,
    at_ms: Vec<Option<i64>>,
    record: Vec<serde_json::Value>,
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
        Ok(())
    }
}
