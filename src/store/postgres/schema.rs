//! The relay's tables, created and migrated at start: each migration runs
//! once, in order, under an advisory lock, so that instances starting at
//! once wait for the first and then find the schema current.

use deadpool_postgres::Client;

use super::{db_error, execute, query_opt};
use crate::store::StoreError;

/// Held by the instance that migrates (an arbitrary constant: "hookrly").
const MIGRATION_LOCK: i64 = 0x0068_6f6f_6b72_6c79;

/// The migrations, oldest first; `hr_schema` records how many have run.
/// Never edit one that has shipped: add another.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE hr_events (
    id           uuid PRIMARY KEY,
    source       text NOT NULL,
    event        text NOT NULL,
    received_ms  bigint NOT NULL,
    content_type text,
    targets      jsonb NOT NULL,
    dedup        bytea NOT NULL,
    order_keys   jsonb NOT NULL DEFAULT '{}',
    group_keys   jsonb NOT NULL DEFAULT '{}',
    body         bytea NOT NULL
);
CREATE INDEX hr_events_source ON hr_events (source, id);
CREATE INDEX hr_events_received ON hr_events (received_ms, id);

-- The live dedup key of each webhook; an entry past expires_ms may be taken over.
CREATE TABLE hr_dedup (
    hash       bytea PRIMARY KEY,
    event_id   uuid NOT NULL REFERENCES hr_events (id) ON DELETE CASCADE DEFERRABLE INITIALLY DEFERRED,
    expires_ms bigint NOT NULL
);
-- Purging an event removes its entry; the expired are swept.
CREATE INDEX hr_dedup_event ON hr_dedup (event_id);
CREATE INDEX hr_dedup_expires ON hr_dedup (expires_ms);

-- One row per (target, event). status: p(ending), d(elivered), x (dead),
-- s(kipped), c(oalesced). A first attempt is due at its arrival (queued
-- false); retries, holds and replays are queued. order_key/seq: its place in
-- its key's queue (order_by); grp: the open debounce group it is in.
CREATE TABLE hr_deliveries (
    target      text NOT NULL,
    event_id    uuid NOT NULL REFERENCES hr_events (id) ON DELETE CASCADE,
    status      "char" NOT NULL DEFAULT 'p',
    due_ms      bigint NOT NULL,
    queued      boolean NOT NULL DEFAULT false,
    at_ms       bigint,
    order_key   text,
    seq         bigint,
    grp         text,
    lease_owner uuid,
    lease_until bigint,
    record      jsonb NOT NULL,
    -- Event first: also what an event's deliveries are found by.
    PRIMARY KEY (event_id, target)
);
CREATE INDEX hr_deliveries_due ON hr_deliveries (target, queued DESC, due_ms, event_id)
    WHERE status = 'p' AND grp IS NULL;
CREATE INDEX hr_deliveries_order ON hr_deliveries (target, order_key, seq)
    WHERE status = 'p' AND order_key IS NOT NULL;
CREATE INDEX hr_deliveries_grp ON hr_deliveries (target, grp) WHERE grp IS NOT NULL;
CREATE INDEX hr_deliveries_pending ON hr_deliveries (target) WHERE status = 'p';
CREATE INDEX hr_deliveries_dead ON hr_deliveries (target, event_id) WHERE status = 'x';
CREATE SEQUENCE hr_order_seq;

-- The open debounce group of each (target, key).
CREATE TABLE hr_groups (
    target      text NOT NULL,
    key         text NOT NULL,
    first_ms    bigint NOT NULL,
    newest_ms   bigint NOT NULL,
    newest_id   uuid NOT NULL,
    window_ms   bigint NOT NULL,
    max_wait_ms bigint NOT NULL,
    PRIMARY KEY (target, key)
);

CREATE TABLE hr_paused (target text PRIMARY KEY);

-- Leased deliveries: what every instance has in flight, per target.
CREATE INDEX hr_deliveries_leased ON hr_deliveries (target, lease_owner) WHERE lease_owner IS NOT NULL;

-- Each rate-limited target's token bucket, shared by every instance.
CREATE TABLE hr_rates (
    target text PRIMARY KEY,
    tokens double precision NOT NULL,
    at_ms  bigint NOT NULL
);
"#,
    r#"
-- held: an ordered delivery behind the head of its key's queue (an earlier
-- pending one of the same target and key). Only the head is in the due
-- index, so that a hand-out never reads the deliveries waiting behind it
-- (one key with a backlog of a million read them all at every hand-out).
ALTER TABLE hr_deliveries ADD COLUMN held boolean NOT NULL DEFAULT false;
UPDATE hr_deliveries d SET held = true
 WHERE d.status = 'p' AND d.order_key IS NOT NULL AND EXISTS (
     SELECT 1 FROM hr_deliveries o
      WHERE o.target = d.target AND o.order_key = d.order_key AND o.status = 'p' AND o.seq < d.seq);
DROP INDEX hr_deliveries_due;
CREATE INDEX hr_deliveries_due ON hr_deliveries (target, queued DESC, due_ms, event_id)
    WHERE status = 'p' AND grp IS NULL AND NOT held;
CREATE INDEX hr_deliveries_held ON hr_deliveries (target) WHERE status = 'p' AND held;
"#,
    r#"
-- A group's time (a window after its newest event, and no later than
-- max_wait after its first), so that a hand-out reads the groups that are
-- ripe (and the next one), not every open group of the target.
ALTER TABLE hr_groups ADD COLUMN due_ms bigint
    GENERATED ALWAYS AS (LEAST(newest_ms + window_ms, first_ms + max_wait_ms)) STORED;
CREATE INDEX hr_groups_due ON hr_groups (target, due_ms);
"#,
    r#"
-- Each open circuit of the cluster: until open_until nothing of its target is
-- handed out, then the probe, to one instance at a time (probe_owner's,
-- until probe_until), until a success deletes the row.
CREATE TABLE hr_circuits (
    target      text PRIMARY KEY,
    open_until  bigint NOT NULL,
    probe_owner uuid,
    probe_until bigint
);
"#,
];

/// The schema's version once every migration has run.
pub const VERSION: usize = MIGRATIONS.len();

/// Creates or migrates the schema; safe when several instances start at once.
pub async fn migrate(client: &mut Client) -> Result<(), StoreError> {
    let tx = client.transaction().await.map_err(db_error)?;
    execute(&tx, "SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS hr_schema (version integer NOT NULL)").await.map_err(db_error)?;
    let version: i32 = match query_opt(&tx, "SELECT version FROM hr_schema", &[]).await? {
        Some(row) => row.get(0),
        None => {
            execute(&tx, "INSERT INTO hr_schema VALUES (0)", &[]).await?;
            0
        }
    };
    let known = MIGRATIONS.len() as i32;
    if version > known {
        return Err(StoreError::Io(format!(
            "the database's schema is version {version}, newer than this hookrelay knows ({known}): run a newer hookrelay"
        )));
    }
    for (n, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        tx.batch_execute(sql).await.map_err(|e| StoreError::Io(format!("migration {}: {}", n + 1, db_error(e))))?;
        tracing::info!(version = n + 1, "database schema migrated");
    }
    execute(&tx, "UPDATE hr_schema SET version = $1", &[&known]).await?;
    tx.commit().await.map_err(db_error)
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::time::Duration;

    use super::MIGRATIONS;
    use crate::store::postgres::{throwaway, PgOptions, PgStore};
    use crate::store::{now_ms, Store};

    /// A database of schema 1 whose key `k` has three deliveries pending:
    /// once migrated, the two behind the head are held, and only the head
    /// and the head of another key are handed out.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn migration_2_holds_what_waits_behind_its_keys_head() {
        let Some(cluster) = throwaway::cluster("the schema's migrations") else { return };
        let url = cluster.database();
        let db = url.rsplit('/').next().and_then(|d| d.split('?').next()).expect("a database name").to_string();
        cluster.query(&db, MIGRATIONS[0]);
        let mut rows =
            String::from("CREATE TABLE hr_schema (version integer NOT NULL); INSERT INTO hr_schema VALUES (1);");
        // (event, order key, place, status): a finished one earlier in k's queue, k's three, k2's one.
        let deliveries = [(1, "k", 1, 'd'), (2, "k", 2, 'p'), (3, "k", 3, 'p'), (4, "k", 4, 'p'), (5, "k2", 5, 'p')];
        for (n, key, seq, status) in deliveries {
            rows.push_str(&format!(
                "INSERT INTO hr_events (id, source, event, received_ms, targets, dedup, body)
                     VALUES ('00000000-0000-7000-8000-00000000000{n}', 'cms', 'page.published', {n}, '[\"t\"]', '\\x00', '\\x00');
                 INSERT INTO hr_deliveries (target, event_id, status, due_ms, order_key, seq, record)
                     VALUES ('t', '00000000-0000-7000-8000-00000000000{n}', '{status}', {n}, '{key}', {seq},
                             '{{\"state\":{{\"pending\":{{\"due_ms\":{n}}}}},\"tries\":0,\"made\":0,\"attempts\":[]}}');"
            ));
        }
        cluster.query(&db, &rows);
        let options = PgOptions { url, pool: 2, ca_certs: Vec::new(), lease: Duration::from_secs(60) };
        let store = PgStore::connect(&options).await.expect("connects and migrates");
        let held = cluster.query(&db, "SELECT string_agg(held::text, ',' ORDER BY seq) FROM hr_deliveries");
        assert_eq!(held, "false,false,true,true,false");
        assert_eq!(cluster.query(&db, "SELECT version FROM hr_schema"), MIGRATIONS.len().to_string());
        let due = store.due("t", now_ms(), 10, &HashSet::new()).await.expect("due");
        let mut handed: Vec<String> = due.due.iter().map(|d| d.event_id.0.to_string()).collect();
        handed.sort();
        assert_eq!(handed, ["00000000-0000-7000-8000-000000000002", "00000000-0000-7000-8000-000000000005"]);
        store.close().await.expect("close");
    }
}
