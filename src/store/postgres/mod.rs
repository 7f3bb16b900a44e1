//! The shared store: PostgreSQL, so that several instances are one relay.
//!
//! Ingest is group commit: a round takes the webhooks queued while the
//! previous rounds ran and stores them in one transaction, committed with
//! `synchronous_commit` on before any of them is answered; a few rounds run
//! at once. Deliveries are handed out under a lease (`FOR UPDATE SKIP
//! LOCKED`), so one instance at a time attempts each; a lease that outlives
//! its instance expires and another takes the delivery. `NOTIFY` tells every
//! instance which targets have new work. The guarantees are the contract's
//! (`conformance.rs`), the same as sled's.

mod batch;
mod ingest;
mod outcomes;
mod schema;
mod share;
#[cfg(test)]
pub(crate) mod throwaway;

pub use schema::VERSION as SCHEMA_VERSION;

use std::collections::HashSet;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{GenericClient, Manager, ManagerConfig, Object, Pool, RecyclingMethod};
use rustls_pki_types::CertificateDer;
use tokio::sync::broadcast;
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::*;

/// The channel of `NOTIFY`: the targets (one per line) that got work.
pub(crate) const CHANNEL: &str = "hookrelay_queued";
/// The channel of pauses: `1` or `0`, a line feed, the target.
pub(crate) const PAUSES: &str = "hookrelay_paused";
/// The channel of opened circuits (how long in ms, a line feed, the target)
/// and of a 429's waits (`wait `, how long in ms, a space, the instance told,
/// a line feed, the target).
pub(crate) const CIRCUITS: &str = "hookrelay_circuit";

/// How to reach the database.
#[derive(Clone)]
pub struct PgOptions {
    /// A libpq URL or key=value string; `sslmode=verify-full`/`verify-ca`
    /// are taken as `require`: the certificate is always verified.
    pub url: String,
    /// Connections per instance.
    pub pool: usize,
    /// The CAs of `storage.ca_file`, trusted for the database's
    /// certificate instead of the system's.
    pub ca_certs: Vec<CertificateDer<'static>>,
    /// How long a delivery handed out stays this instance's: longer than
    /// any attempt (the targets' timeouts), so that only a dead instance's
    /// leases expire.
    pub lease: Duration,
}

impl std::fmt::Debug for PgOptions {
    /// Without the URL, which may hold a password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgOptions")
            .field("url", &"<redacted>")
            .field("pool", &self.pool)
            .field("ca_certs", &self.ca_certs.len())
            .field("lease", &self.lease)
            .finish()
    }
}

pub struct PgStore {
    pool: Pool,
    /// Connections for hand-outs and outcomes.
    ///
    /// Hand-outs (leases) and attempt outcomes commit with `synchronous_commit`
    /// off: a database crash may undo the last of them (PostgreSQL writes them
    /// to disk within three `wal_writer_delay`s, 600 ms by default), and then
    /// those deliveries are attempted again: at-least-once, never lost. Acks
    /// and operators' changes always commit durably.
    relaxed: Pool,
    /// Ingest: group commit of webhooks.
    rounds: batch::Batches<NewEvent, Ingested>,
    /// Attempt outcomes, recorded in batches.
    outcomes: batch::Batches<outcomes::Outcome, ()>,
    /// This instance, as the owner of its leases.
    owner: Uuid,
    lease_ms: u64,
    notices: broadcast::Sender<Notice>,
    shutdown: CancellationToken,
    /// The targets' limits, held over every instance.
    shares: std::sync::Mutex<std::collections::HashMap<String, Share>>,
}

/// A database error with what the server said.
pub(crate) fn db_error(e: tokio_postgres::Error) -> StoreError {
    match e.as_db_error() {
        Some(db) => StoreError::Io(format!("database: {}: {}", db.severity(), db.message())),
        None => {
            let mut msg = format!("database: {e}");
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                msg.push_str(&format!(": {s}"));
                source = s.source();
            }
            StoreError::Io(msg)
        }
    }
}

/// `sql` run as a statement prepared once per connection (parsed and
/// planned once, one round trip a run).
pub(crate) async fn query<C: GenericClient>(
    c: &C,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Vec<Row>, StoreError> {
    let st = c.prepare_cached(sql).await.map_err(db_error)?;
    c.query(&st, params).await.map_err(db_error)
}

pub(crate) async fn query_opt<C: GenericClient>(
    c: &C,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Option<Row>, StoreError> {
    let st = c.prepare_cached(sql).await.map_err(db_error)?;
    c.query_opt(&st, params).await.map_err(db_error)
}

pub(crate) async fn query_one<C: GenericClient>(
    c: &C,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Row, StoreError> {
    let st = c.prepare_cached(sql).await.map_err(db_error)?;
    c.query_one(&st, params).await.map_err(db_error)
}

pub(crate) async fn execute<C: GenericClient>(
    c: &C,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<u64, StoreError> {
    let st = c.prepare_cached(sql).await.map_err(db_error)?;
    c.execute(&st, params).await.map_err(db_error)
}

fn pool_error(e: deadpool_postgres::PoolError) -> StoreError {
    match e {
        deadpool_postgres::PoolError::Backend(e) => db_error(e),
        other => StoreError::Io(format!("database pool: {other}")),
    }
}

/// The rustls connector: verifies the server's certificate against the
/// `ca_file`'s CAs, else the system's.
fn tls(ca_certs: &[CertificateDer<'static>]) -> Result<tokio_postgres_rustls::MakeRustlsConnect, StoreError> {
    let roots =
        crate::dispatch::client::roots(ca_certs).map_err(|e| StoreError::Io(format!("storage.ca_file: {e}")))?;
    let config = rustls::ClientConfig::builder_with_provider(crate::ingress::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| StoreError::Io(format!("TLS setup failed: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// Adds `options` to the connection's startup options, after the URL's own.
fn with_options(config: &mut tokio_postgres::Config, options: &str) {
    let all = match config.get_options() {
        Some(theirs) if !theirs.trim().is_empty() => format!("{theirs} {options}"),
        _ => options.to_string(),
    };
    config.options(&all);
}

/// Parses `url`, `verify-full`/`verify-ca` read as `require`.
pub fn parse_url(url: &str) -> Result<tokio_postgres::Config, String> {
    let url = url.replace("sslmode=verify-full", "sslmode=require").replace("sslmode=verify-ca", "sslmode=require");
    let mut config = tokio_postgres::Config::from_str(&url).map_err(|e| format!("storage.url: {e}"))?;
    // The relay's sessions commit durably whatever the server's default
    // (ingest rounds also say so in their transaction, for a pooler that
    // drops startup options).
    with_options(&mut config, "-c synchronous_commit=on");
    if config.get_application_name().is_none() {
        config.application_name("hookrelay");
    }
    config.connect_timeout(Duration::from_secs(10));
    // A connection dropped without a reset (a failover, a NAT or balancer
    // forgetting an idle flow) is noticed within about a minute, not the
    // system's default two hours: above all the one that listens for other
    // instances' notices, which waits idle. Unless the URL says otherwise.
    if config.get_keepalives_idle() == DEFAULT_KEEPALIVES_IDLE {
        config.keepalives_idle(Duration::from_secs(30));
    }
    if config.get_keepalives_interval().is_none() {
        config.keepalives_interval(Duration::from_secs(10));
    }
    if config.get_keepalives_retries().is_none() {
        config.keepalives_retries(3);
    }
    // And one whose data goes unacknowledged (a server gone without a
    // reset) within 30 s, where the kernel would retransmit for ~15 minutes.
    if config.get_tcp_user_timeout().is_none() {
        config.tcp_user_timeout(Duration::from_secs(30));
    }
    Ok(config)
}

/// tokio-postgres's `keepalives_idle` when the URL does not set it.
const DEFAULT_KEEPALIVES_IDLE: Duration = Duration::from_secs(2 * 60 * 60);

impl PgStore {
    /// Connects, creates or migrates the schema, and starts the ingest
    /// rounds and the listener for other instances' work.
    pub async fn connect(options: &PgOptions) -> Result<PgStore, StoreError> {
        let config = parse_url(&options.url).map_err(StoreError::Io)?;
        let tls = tls(&options.ca_certs)?;
        // Half the connections commit durably (acks, operators' changes),
        // half not (hand-outs and outcomes: see `relaxed`).
        let durable = options.pool.max(2) - options.pool.max(2) / 2;
        let pool = pool_of(config.clone(), &tls, durable)?;
        let mut relaxed_config = config.clone();
        // Hand-outs read the queue with the values of each call (a plan
        // made for any value scans the whole queue: 7x slower measured).
        with_options(&mut relaxed_config, "-c synchronous_commit=off -c plan_cache_mode=force_custom_plan");
        let relaxed = pool_of(relaxed_config, &tls, options.pool.max(2) / 2)?;
        let owner = Uuid::now_v7();
        let mut client = pool.get().await.map_err(pool_error)?;
        schema::migrate(&mut client).await?;
        drop(client);
        let shutdown = CancellationToken::new();
        let (notices, _) = broadcast::channel(1024);
        tokio::spawn(ingest::listen(config, tls, owner, notices.clone(), shutdown.child_token()));
        let notifier = ingest::Notifier::start(relaxed.clone());
        Ok(PgStore {
            rounds: batch::Batches::start(
                "webhooks",
                pool.clone(),
                (durable / 2).clamp(1, 4),
                ingest::MAX_ROUND,
                move |pool, events| {
                    let notifier = notifier.clone();
                    async move { ingest::round(&pool, &events, &notifier).await }
                },
            ),
            outcomes: batch::Batches::start(
                "attempt outcomes",
                relaxed.clone(),
                2,
                outcomes::MAX_BATCH,
                move |pool, outcomes| async move { outcomes::record(&pool, &outcomes, owner).await },
            ),
            pool,
            relaxed,
            owner,
            lease_ms: options.lease.as_millis() as u64,
            notices,
            shutdown,
            shares: Default::default(),
        })
    }

    async fn client(&self) -> Result<Object, StoreError> {
        self.pool.get().await.map_err(pool_error)
    }

    /// A connection whose commits do not wait for the disk (see `relaxed`).
    async fn relaxed(&self) -> Result<Object, StoreError> {
        self.relaxed.get().await.map_err(pool_error)
    }
}

/// A pooled connection in a transaction begun by hand, so that BEGIN and
/// COMMIT travel with the statements of an ingest round or an outcome
/// batch. Dropped before [`Open::committed`] (an error, a cancelled round),
/// the connection leaves the pool instead of going back to it in the
/// middle of a transaction.
struct Open(Option<Object>);

impl Open {
    fn new(client: Object) -> Open {
        Open(Some(client))
    }

    fn client(&self) -> &Object {
        match &self.0 {
            Some(client) => client,
            None => unreachable!("an Open holds its connection until committed or dropped"),
        }
    }

    /// Committed: the connection goes back to the pool.
    fn committed(mut self) {
        drop(self.0.take());
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        if let Some(client) = self.0.take() {
            drop(Object::take(client));
        }
    }
}

fn pool_of(
    config: tokio_postgres::Config,
    tls: &tokio_postgres_rustls::MakeRustlsConnect,
    size: usize,
) -> Result<Pool, StoreError> {
    let manager = Manager::from_config(config, tls.clone(), ManagerConfig { recycling_method: RecyclingMethod::Fast });
    Pool::builder(manager).max_size(size).build().map_err(|e| StoreError::Io(format!("database pool: {e}")))
}

fn ms(v: i64) -> u64 {
    v.max(0) as u64
}

fn to_i64(v: u64) -> i64 {
    v.min(i64::MAX as u64) as i64
}

fn record_of(row: &Row, col: &str) -> Result<DeliveryRecord, StoreError> {
    let value: serde_json::Value = row.get(col);
    serde_json::from_value(value)
        .map_err(|e| StoreError::Corrupt { key: "hr_deliveries.record".into(), detail: e.to_string() })
}

fn json(record: &DeliveryRecord) -> Result<serde_json::Value, StoreError> {
    serde_json::to_value(record).map_err(|e| StoreError::Io(e.to_string()))
}

fn meta_of(row: &Row) -> Result<EventMeta, StoreError> {
    let corrupt = |e: serde_json::Error| StoreError::Corrupt { key: "hr_events".into(), detail: e.to_string() };
    Ok(EventMeta {
        source: row.get("source"),
        event: row.get("event"),
        received_ms: ms(row.get("received_ms")),
        content_type: row.get("content_type"),
        targets: serde_json::from_value(row.get("targets")).map_err(corrupt)?,
        dedup: row.get("dedup"),
        order: serde_json::from_value(row.get("order_keys")).map_err(corrupt)?,
        group: serde_json::from_value(row.get("group_keys")).map_err(corrupt)?,
    })
}

const META: &str = "id, source, event, received_ms, content_type, targets, dedup, order_keys, group_keys";

/// What a hand-out returns (`d` the delivery, `e` its event): the
/// attempt needs no read of its own.
macro_rules! handed_out {
    () => {
        "d.event_id, d.due_ms, d.queued, d.record, e.source, e.event, e.received_ms, e.content_type,
         e.targets, e.dedup, e.order_keys, e.group_keys, e.body"
    };
}

/// The status letter of a state.
fn status(state: &DeliveryState) -> i8 {
    (match state {
        DeliveryState::Pending { .. } => b'p',
        DeliveryState::Delivered { .. } => b'd',
        DeliveryState::Dead { .. } => b'x',
        DeliveryState::Skipped { .. } => b's',
        DeliveryState::Coalesced { .. } => b'c',
    }) as i8
}

/// Event `id` from a row with the columns of [`META`] and its body.
fn event_of(row: &Row, id: EventId) -> Result<StoredEvent, StoreError> {
    let body: Vec<u8> = row.get("body");
    Ok(StoredEvent { id, meta: meta_of(row)?, body: body.into() })
}

/// A hand-out's row: the delivery's columns, then its event's (`handed_out!`).
/// One unreadable row must not stop the target's queue (as on sled): an
/// unreadable record counts its attempts afresh, and an unreadable event
/// is left for the attempt to read, which fails that delivery alone.
fn due_of(row: &Row, group: bool) -> DueDelivery {
    let event_id = EventId(row.get("event_id"));
    let (tries, made, coalesced) = match record_of(row, "record") {
        Ok(r) => (r.tries, r.made, r.coalesced),
        Err(e) => {
            tracing::warn!(id = %event_id, error = %e, "unreadable delivery record; its attempt count restarts");
            (0, 0, 0)
        }
    };
    let event = match event_of(row, event_id) {
        Ok(event) => Some(std::sync::Arc::new(event)),
        Err(e) => {
            tracing::error!(id = %event_id, error = %e, "unreadable event record");
            None
        }
    };
    DueDelivery {
        event_id,
        due_ms: ms(row.get("due_ms")),
        tries,
        made,
        queued: row.get("queued"),
        group,
        coalesced,
        event,
    }
}

#[async_trait]
impl Store for PgStore {
    async fn ingest(&self, event: NewEvent) -> Result<Ingested, StoreError> {
        self.rounds.submit(event).await
    }

    async fn event(&self, id: EventId) -> Result<Option<StoredEvent>, StoreError> {
        let client = self.client().await?;
        let sql = format!("SELECT {META}, body FROM hr_events WHERE id = $1");
        let Some(row) = query_opt(&client, &sql, &[&id.0]).await? else { return Ok(None) };
        event_of(&row, id).map(Some)
    }

    async fn events_before(
        &self,
        before: Option<EventId>,
        source: Option<&str>,
        limit: usize,
    ) -> Result<EventsPage, StoreError> {
        let client = self.client().await?;
        let sql = format!(
            "SELECT {META} FROM hr_events WHERE ($1::uuid IS NULL OR id < $1) AND ($2::text IS NULL OR source = $2)
             ORDER BY id DESC LIMIT $3"
        );
        // One more than a page, to tell the end (by an index on (source, id)).
        let rows = query(&client, &sql, &[&before.map(|b| b.0), &source, &(limit as i64 + 1)]).await?;
        let more = rows.len() > limit;
        let events = rows
            .iter()
            .take(limit)
            .map(|r| Ok((EventId(r.get("id")), meta_of(r)?)))
            .collect::<Result<Vec<_>, StoreError>>()?;
        let next_before = events.last().map(|e| e.0).filter(|_| more);
        Ok(EventsPage { events, next_before })
    }

    async fn deliveries(&self, id: EventId) -> Result<Vec<Delivery>, StoreError> {
        let client = self.client().await?;
        // The head of its key's queue, when that is another; the group's time.
        let rows = query(
            &client,
            "SELECT d.target, d.record, d.status, d.due_ms,
                        (SELECT o.event_id FROM hr_deliveries o
                          WHERE o.target = d.target AND o.order_key = d.order_key AND o.status = 'p'
                          ORDER BY o.seq LIMIT 1) AS head,
                        (SELECT g.due_ms FROM hr_groups g
                          WHERE g.target = d.target AND g.key = d.grp) AS group_due
                 FROM hr_deliveries d JOIN hr_events e ON e.id = d.event_id
                 WHERE d.event_id = $1
                 ORDER BY array_position(ARRAY(SELECT jsonb_array_elements_text(e.targets)), d.target)",
            &[&id.0],
        )
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            let mut record = record_of(row, "record")?;
            let pending = row.get::<_, i8>("status") == b'p' as i8;
            if pending {
                let due: i64 = row.get::<_, Option<i64>>("group_due").unwrap_or(row.get("due_ms"));
                record.state = DeliveryState::Pending { due_ms: ms(due) };
            }
            let head: Option<Uuid> = if pending { row.get("head") } else { None };
            out.push(Delivery {
                event_id: id,
                target: row.get("target"),
                record,
                waiting_for: head.filter(|h| *h != id.0).map(EventId),
            });
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
        let called = std::time::Instant::now();
        let share = self.shares.lock().unwrap_or_else(|p| p.into_inner()).get(target).copied();
        let mut client = self.relaxed().await?;
        let tx = client.transaction().await.map_err(db_error)?;
        let skip: Vec<Uuid> = skip.iter().map(|e| e.0).collect();
        // A target's lease follows its current timeout (a reload may change it).
        let lease_ms = share.map_or(self.lease_ms, |s| lease_for(s.attempt).as_millis() as u64);
        let now = to_i64(now_ms);
        let mut next_due: Option<i64> = None;
        let mut soonest = |at: i64| next_due = Some(next_due.map_or(at, |n: i64| n.min(at)));
        let asked = limit;
        let mut limit = limit;
        let mut bucket = None;
        // The share's statements and the open groups in one flight,
        // prepared first so that they go out in this order: a target's lock
        // is held over as few round trips as can be.
        let rate = share.and_then(|s| s.rate);
        let lock_st = tx.prepare_cached("SELECT pg_advisory_xact_lock($1)").await.map_err(db_error)?;
        let release_st = tx.prepare_cached(RELEASE_UNSTARTED).await.map_err(db_error)?;
        let others_st = tx.prepare_cached(OTHERS_LEASES).await.map_err(db_error)?;
        let rate_st =
            tx.prepare_cached("SELECT tokens, at_ms FROM hr_rates WHERE target = $1").await.map_err(db_error)?;
        let circuit_st = tx.prepare_cached(CIRCUIT).await.map_err(db_error)?;
        let groups_st = tx.prepare_cached(RIPE_GROUPS).await.map_err(db_error)?;
        let next_group_st = tx.prepare_cached(NEXT_GROUP).await.map_err(db_error)?;
        let later_st = tx.prepare_cached(NEXT_RETRY).await.map_err(db_error)?;
        let lock_id = ingest::lock_id("share", target, "");
        let groups_limit = limit as i64;
        let groups_params: [&(dyn ToSql + Sync); 5] = [&target, &skip, &self.owner, &now, &groups_limit];
        let later_params: [&(dyn ToSql + Sync); 2] = [&target, &now];
        let (_, _, others, stored_bucket, circuit, groups, next_group, later) = futures_util::try_join!(
            // Every instance's hand-outs of this target, one at a time.
            async {
                match share {
                    Some(_) => tx.execute(&lock_st, &[&lock_id]).await,
                    None => Ok(0),
                }
            },
            // Handed out earlier but not started (a local rate limit): back.
            async {
                match share {
                    Some(_) => tx.execute(&release_st, &[&target, &self.owner, &skip]).await,
                    None => Ok(0),
                }
            },
            async {
                match share {
                    Some(_) => {
                        tx.query_one(&others_st, &[&target, &self.owner, &now]).await.map(|r| r.get::<_, i64>(0))
                    }
                    None => Ok(0),
                }
            },
            async {
                match rate {
                    Some(_) => tx.query_opt(&rate_st, &[&target]).await,
                    None => Ok(None),
                }
            },
            async {
                match share {
                    Some(_) => tx.query_opt(&circuit_st, &[&target]).await,
                    None => Ok(None),
                }
            },
            tx.query(&groups_st, &groups_params),
            tx.query_opt(&next_group_st, &later_params),
            // The next retry due after now (hand-outs do not move it).
            tx.query_opt(&later_st, &later_params),
        )
        .map_err(db_error)?;
        for row in [later, next_group].into_iter().flatten() {
            soonest(row.get(0));
        }
        // A lease runs from now, not from before the waits for a connection
        // and the target's lock: it would be short by them, and another
        // instance could take the delivery while it is being sent.
        let waited = called.elapsed().as_millis() as u64;
        let until = to_i64(now_ms.saturating_add(waited).saturating_add(lease_ms));
        // The cluster's circuit: while open, nothing; then the probe, one
        // instance at a time.
        let mut probing = false;
        if let Some(row) = circuit {
            let (open_until, owner, probe_until): (i64, Option<Uuid>, Option<i64>) =
                (row.get(0), row.get(1), row.get(2));
            let probe_elsewhere = probe_until.filter(|u| *u > now && owner.is_some_and(|o| o != self.owner));
            if open_until > now {
                limit = 0;
                soonest(open_until);
            } else if let Some(probe_until) = probe_elsewhere {
                // Its answer wakes this instance (a notice); its lease's end, at the latest.
                limit = 0;
                soonest(probe_until);
            } else {
                limit = limit.min(1);
                probing = true;
            }
        }
        if let Some(share) = share {
            let before = limit;
            limit = share::room(limit, share.concurrency, others.max(0) as usize + skip.len());
            if limit < before && others > 0 {
                // Room comes back when another instance's attempt ends.
                soonest(now + SHARE_POLL_MS);
            }
            if let Some((per_second, burst)) = rate {
                let stored = stored_bucket.map(|r| share::Bucket { tokens: r.get(0), at_ms: r.get(1) });
                let b = share::Bucket::refilled(stored, now, per_second, burst);
                if b.whole() < limit {
                    limit = b.whole();
                    if let Some(at) = b.take(limit).next_token_ms(per_second) {
                        soonest(at);
                    }
                }
                bucket = Some((b, per_second));
            }
        }
        // Open groups first (each is one delivery of its newest event), then
        // retries by due time, then first attempts by arrival; an ordered
        // delivery only at the head of its key's queue.
        let mut ripe: Vec<(Uuid, i64)> = groups.iter().map(|g| (g.get(0), g.get(1))).collect();
        ripe.truncate(limit);
        let mut out = Vec::new();
        if !ripe.is_empty() {
            let ids: Vec<Uuid> = ripe.iter().map(|(id, _)| *id).collect();
            let rows = query(
                &tx,
                concat!(
                    "UPDATE hr_deliveries d SET lease_owner = $3, lease_until = $4 FROM hr_events e
                     WHERE d.target = $1 AND d.event_id = ANY($2) AND d.grp IS NOT NULL AND e.id = d.event_id
                     RETURNING ",
                    handed_out!()
                ),
                &[&target, &ids, &self.owner, &until],
            )
            .await?;
            for row in &rows {
                let mut d = due_of(row, true);
                if let Some((_, due)) = ripe.iter().find(|(id, _)| *id == d.event_id.0) {
                    d.due_ms = ms(*due);
                }
                out.push(d);
            }
            out.sort_by_key(|d| d.due_ms);
        }
        // Retries due, then first attempts: each a range of the index, so
        // that retries due later (a target down for hours) are never read.
        // A first attempt is due whatever this instance's clock says of
        // its arrival (another instance's clock may be ahead).
        for (queued, sql) in [(true, DUE_RETRIES), (false, DUE_FIRST)] {
            let rest = limit.saturating_sub(out.len());
            if rest == 0 {
                break;
            }
            let rows = query(&tx, sql, &[&target, &now, &skip, &self.owner, &(rest as i64), &until]).await?;
            let mut found: Vec<DueDelivery> = rows.iter().map(|r| due_of(r, false)).collect();
            found.sort_by_key(|d| (d.due_ms, d.event_id));
            debug_assert!(found.iter().all(|d| d.queued == queued));
            out.extend(found);
        }
        if probing && !out.is_empty() {
            execute(
                &tx,
                "UPDATE hr_circuits SET probe_owner = $2, probe_until = $3 WHERE target = $1",
                &[&target, &self.owner, &until],
            )
            .await?;
        }
        if let Some((b, _)) = bucket {
            let b = b.take(out.len());
            execute(
                &tx,
                "INSERT INTO hr_rates VALUES ($1, $2, $3)
                 ON CONFLICT (target) DO UPDATE SET tokens = excluded.tokens, at_ms = excluded.at_ms",
                &[&target, &b.tokens, &b.at_ms],
            )
            .await?;
        }
        tx.commit().await.map_err(db_error)?;
        // Cut short by a shared limit: only if that limit, not the queue, ran out.
        let limited = limit < asked && out.len() >= limit;
        Ok(DueBatch { due: out, next_due_ms: next_due.map(ms), limited })
    }

    fn read_gather(&self) -> std::time::Duration {
        READ_GATHER
    }

    fn share(&self, target: &str, share: Share) {
        self.shares.lock().unwrap_or_else(|p| p.into_inner()).insert(target.to_string(), share);
    }

    async fn complete(
        &self,
        target: &str,
        due: &DueDelivery,
        attempt: Attempt,
        next: NextStep,
    ) -> Result<(), StoreError> {
        let outcome = outcomes::Outcome { target: target.to_string(), due: due.clone(), attempt, next };
        self.outcomes.submit(outcome).await
    }

    async fn close_group(&self, target: &str, due: &DueDelivery) -> Result<Option<DueDelivery>, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db_error)?;
        let group = query_opt(
            &tx,
            "DELETE FROM hr_groups WHERE target = $1 AND newest_id = $2 RETURNING key",
            &[&target, &due.event_id.0],
        )
        .await?;
        let Some(group) = group else { return Ok(None) };
        let key: String = group.get(0);
        let into = due.event_id.to_string();
        let now = now_ms();
        let members = query(
            &tx,
            "SELECT event_id, record FROM hr_deliveries
                 WHERE target = $1 AND grp = $2 AND event_id <> $3 FOR UPDATE",
            &[&target, &key, &due.event_id.0],
        )
        .await?;
        for m in &members {
            let mut record = record_of(m, "record")?;
            record.state = DeliveryState::Coalesced { at_ms: now, into: into.clone() };
            execute(
                &tx,
                "UPDATE hr_deliveries SET status = 'c', grp = NULL, at_ms = $3, record = $4,
                        lease_owner = NULL, lease_until = NULL
                 WHERE target = $1 AND event_id = $2",
                &[&target, &m.get::<_, Uuid>(0), &to_i64(now), &json(&record)?],
            )
            .await?;
        }
        let coalesced = members.len() as u32 + 1;
        let row = query_opt(
            &tx,
            "SELECT record FROM hr_deliveries WHERE target = $1 AND event_id = $2 FOR UPDATE",
            &[&target, &due.event_id.0],
        )
        .await?;
        let Some(row) = row else { return Ok(None) };
        let mut record = record_of(&row, "record")?;
        record.coalesced = coalesced;
        record.state = DeliveryState::Pending { due_ms: due.due_ms };
        execute(
            &tx,
            // In its key's queue while pending: the key's next group waits
            // for it (RIPE_GROUPS), so that one key's groups go in order.
            "UPDATE hr_deliveries SET grp = NULL, due_ms = $3, record = $4, order_key = $5, seq = nextval('hr_order_seq')
             WHERE target = $1 AND event_id = $2",
            &[&target, &due.event_id.0, &to_i64(due.due_ms), &json(&record)?, &key],
        )
        .await?;
        tx.commit().await.map_err(db_error)?;
        Ok(Some(DueDelivery { group: false, coalesced, ..due.clone() }))
    }

    async fn set_paused(&self, target: &str, paused: bool) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db_error)?;
        let sql = if paused {
            "INSERT INTO hr_paused VALUES ($1) ON CONFLICT DO NOTHING"
        } else {
            "DELETE FROM hr_paused WHERE target = $1"
        };
        execute(&tx, sql, &[&target]).await?;
        let notice = format!("{}\n{target}", u8::from(paused));
        execute(&tx, "SELECT pg_notify($1, $2)", &[&PAUSES, &notice]).await?;
        tx.commit().await.map_err(db_error)
    }

    async fn circuit_opened(&self, target: &str, open_for: Duration) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db_error)?;
        let until = to_i64(now_ms().saturating_add(open_for.as_millis() as u64));
        execute(
            &tx,
            "INSERT INTO hr_circuits (target, open_until) VALUES ($1, $2)
             ON CONFLICT (target) DO UPDATE SET open_until = excluded.open_until, probe_owner = NULL, probe_until = NULL",
            &[&target, &until],
        )
        .await?;
        let notice = format!("{}\n{target}", open_for.as_millis());
        execute(&tx, "SELECT pg_notify($1, $2)", &[&CIRCUITS, &notice]).await?;
        tx.commit().await.map_err(db_error)
    }

    async fn asked_to_wait(&self, target: &str, wait: Duration) -> Result<(), StoreError> {
        let client = self.client().await?;
        // On the circuits' channel, which instances of every version hear;
        // one that does not know the `wait ` prefix ignores the notice. The
        // owner: this instance waits already, and ignores its own.
        let notice = format!("wait {} {}\n{target}", wait.as_millis(), self.owner);
        execute(&client, "SELECT pg_notify($1, $2)", &[&CIRCUITS, &notice]).await?;
        Ok(())
    }

    async fn paused_targets(&self) -> Result<HashSet<String>, StoreError> {
        let client = self.client().await?;
        let rows = query(&client, "SELECT target FROM hr_paused", &[]).await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    async fn counts(&self, target: &str) -> Result<TargetCounts, StoreError> {
        let client = self.client().await?;
        // Held: in an open group, or behind the head of their key's queue.
        // Only pending and dead rows are read (delivered ones stay until
        // retention), each through its partial index.
        let row = query_one(
            &client,
            "SELECT (SELECT count(*) FROM hr_deliveries WHERE target = $1 AND status = 'p'),
                    (SELECT count(*) FROM hr_deliveries WHERE target = $1 AND status = 'x'),
                    (SELECT count(*) FROM hr_deliveries WHERE target = $1 AND status = 'p' AND grp IS NOT NULL),
                    (SELECT count(*) FROM hr_deliveries WHERE target = $1 AND status = 'p' AND held)",
            &[&target],
        )
        .await?;
        let n = |i: usize| row.get::<_, i64>(i).max(0) as u64;
        Ok(TargetCounts { queued: n(0), dead: n(1), held: n(2) + n(3) })
    }

    async fn queued_targets(&self) -> Result<std::collections::BTreeMap<String, u64>, StoreError> {
        let client = self.client().await?;
        let rows = query(&client, "SELECT target, count(*) FROM hr_deliveries WHERE status = 'p' GROUP BY target", &[])
            .await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get::<_, i64>(1).max(0) as u64)).collect())
    }

    async fn purge(
        &self,
        cutoff_ms: u64,
        after: Option<EventId>,
        limit: usize,
    ) -> Result<(usize, Option<EventId>), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db_error)?;
        // One instance purges at a time; the others find nothing to do.
        let mine: bool = query_one(&tx, "SELECT pg_try_advisory_xact_lock($1)", &[&PURGE_LOCK]).await?.get(0);
        if !mine {
            return Ok((0, None));
        }
        // The events examined are locked first (a replay holding one is
        // skipped, and a replay coming later waits for this purge), then
        // checked for pending deliveries by a statement of its own, which
        // sees every replay committed before it.
        // Ids are UUIDv7, their time the round's, just after the receipt:
        // bounded by the cutoff's time (and an hour's margin), the scan by
        // id stops there instead of reading every event the retention keeps.
        let below = id_floor(cutoff_ms.saturating_add(ID_MARGIN_MS));
        let examined: Vec<Uuid> = query(
            &tx,
            "SELECT id FROM hr_events WHERE ($1::uuid IS NULL OR id > $1) AND id < $4 AND received_ms < $2
             ORDER BY id LIMIT $3 FOR UPDATE SKIP LOCKED",
            &[&after.map(|a| a.0), &to_i64(cutoff_ms), &(limit as i64), &below],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
        let purged = execute(
            &tx,
            "DELETE FROM hr_events e WHERE e.id = ANY($1)
               AND NOT EXISTS (SELECT 1 FROM hr_deliveries d WHERE d.event_id = e.id AND d.status = 'p')",
            &[&examined],
        )
        .await?;
        tx.commit().await.map_err(db_error)?;
        let cursor = if examined.len() >= limit { examined.last().copied().map(EventId) } else { None };
        Ok((purged as usize, cursor))
    }

    async fn purge_dedup(&self, now_ms: u64, limit: usize) -> Result<usize, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db_error)?;
        // Under the purge's lock: instances purging at once would wait on
        // each other's rows.
        let mine: bool = query_one(&tx, "SELECT pg_try_advisory_xact_lock($1)", &[&PURGE_LOCK]).await?.get(0);
        if !mine {
            return Ok(0);
        }
        let removed = execute(
            &tx,
            // Expiry checked again on the rows deleted: one an ingest took
            // over meanwhile (a new webhook of that key) is live again.
            "DELETE FROM hr_dedup WHERE hash IN (SELECT hash FROM hr_dedup WHERE expires_ms < $1 LIMIT $2)
                AND expires_ms < $1",
            &[&to_i64(now_ms), &(limit as i64)],
        )
        .await?;
        tx.commit().await.map_err(db_error)?;
        Ok(removed as usize)
    }

    async fn requeue(&self, target: &str, id: EventId) -> Result<bool, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db_error)?;
        // The event is held until the replay commits: a purge skips it, or
        // has removed it already (then there is nothing to replay).
        if query_opt(&tx, "SELECT 1 FROM hr_events WHERE id = $1 FOR KEY SHARE", &[&id.0]).await?.is_none() {
            return Ok(false);
        }
        let row = query_opt(
            &tx,
            "SELECT status, order_key, grp, record FROM hr_deliveries WHERE target = $1 AND event_id = $2 FOR UPDATE",
            &[&target, &id.0],
        )
        .await?;
        let Some(row) = row else { return Ok(false) };
        if row.get::<_, Option<String>>("grp").is_some() {
            // Waiting in an open group: it is queued already.
            return Ok(true);
        }
        let order_key: Option<String> = row.get("order_key");
        if let Some(key) = &order_key {
            execute(&tx, "SELECT pg_advisory_xact_lock($1)", &[&ingest::order_lock(target, key)]).await?;
        }
        // An attempt in flight keeps its lease: the delivery is handed out
        // again once that attempt is recorded (not current any more).
        let mut record = record_of(&row, "record")?;
        let now = now_ms();
        record.state = DeliveryState::Pending { due_ms: now };
        record.tries = 0;
        // Pending, it keeps its place in its key's queue (nothing of its
        // key is released while an attempt at it may be in flight); ended,
        // it is queued behind every delivery of its key queued before.
        execute(
            &tx,
            "UPDATE hr_deliveries d SET status = 'p', due_ms = $3, queued = true, at_ms = NULL, record = $4,
                    seq = CASE WHEN order_key IS NULL OR status = 'p' THEN seq ELSE nextval('hr_order_seq') END,
                    held = CASE WHEN order_key IS NULL THEN false WHEN status = 'p' THEN held ELSE EXISTS (
                        SELECT 1 FROM hr_deliveries o
                         WHERE o.target = $1 AND o.order_key = d.order_key AND o.status = 'p' AND o.event_id <> $2)
                    END
             WHERE target = $1 AND event_id = $2",
            &[&target, &id.0, &to_i64(now), &json(&record)?],
        )
        .await?;
        execute(&tx, "SELECT pg_notify($1, $2)", &[&CHANNEL, &target]).await?;
        tx.commit().await.map_err(db_error)?;
        Ok(true)
    }

    async fn dead_letters(
        &self,
        target: Option<&str>,
        before: Option<EventId>,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        let client = self.client().await?;
        // The dead rows are few and partially indexed (`hr_deliveries_dead`).
        let rows = query(
            &client,
            "SELECT target, event_id, record FROM hr_deliveries
                 WHERE status = 'x' AND ($1::text IS NULL OR target = $1) AND event_id IN (
                     SELECT DISTINCT event_id FROM hr_deliveries
                      WHERE status = 'x' AND ($1::text IS NULL OR target = $1) AND ($2::uuid IS NULL OR event_id < $2)
                      ORDER BY event_id DESC LIMIT $3)
                 ORDER BY event_id DESC, target COLLATE \"C\"",
            &[&target, &before.map(|b| b.0), &(limit as i64)],
        )
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            let record = record_of(row, "record")?;
            let DeliveryState::Dead { at_ms, reason } = record.state else { continue };
            out.push(DeadLetter {
                event_id: EventId(row.get("event_id")),
                target: row.get("target"),
                reason,
                at_ms,
                last_attempt: record.attempts.last().cloned(),
            });
        }
        Ok(out)
    }

    fn notices(&self) -> Option<broadcast::Receiver<Notice>> {
        Some(self.notices.subscribe())
    }

    async fn close(&self) -> Result<(), StoreError> {
        self.rounds.close().await;
        self.outcomes.close().await;
        // What this instance leaves unattempted, another may take at once.
        if let Ok(client) = self.client().await {
            let released = execute(
                &client,
                "UPDATE hr_deliveries SET lease_owner = NULL, lease_until = NULL WHERE lease_owner = $1",
                &[&self.owner],
            )
            .await;
            if let Err(e) = released {
                tracing::warn!(error = %e, "leases not released at shutdown: they expire");
            }
        }
        self.shutdown.cancel();
        self.pool.close();
        Ok(())
    }
}

/// Due deliveries of one kind (retries, or first attempts), leased to the
/// caller; an ordered one only at the head of its key's queue. $1 target,
/// $2 now, $3 in flight, $4 this instance, $5 limit, $6 lease end.
macro_rules! due_sql {
    ($kind:literal) => {
        concat!(
            "WITH cand AS (
                SELECT d.event_id FROM hr_deliveries d
                WHERE d.target = $1 AND d.status = 'p' AND d.grp IS NULL AND ",
            $kind,
            " AND d.event_id <> ALL($3)
                  AND (d.lease_owner IS NULL OR d.lease_owner = $4 OR d.lease_until <= $2)
                  AND NOT d.held
                ORDER BY d.queued DESC, d.due_ms, d.event_id
                LIMIT $5
                FOR UPDATE OF d SKIP LOCKED)
             UPDATE hr_deliveries d SET lease_owner = $4, lease_until = $6
             FROM cand JOIN hr_events e ON e.id = cand.event_id
             WHERE d.target = $1 AND d.event_id = cand.event_id
             RETURNING ",
            handed_out!()
        )
    };
}
const DUE_RETRIES: &str = due_sql!("d.queued AND d.due_ms <= $2");
const RELEASE_UNSTARTED: &str = "UPDATE hr_deliveries SET lease_owner = NULL, lease_until = NULL
     WHERE target = $1 AND lease_owner = $2 AND event_id <> ALL($3)";
const OTHERS_LEASES: &str = "SELECT count(*) FROM hr_deliveries
     WHERE target = $1 AND lease_owner IS NOT NULL AND lease_owner <> $2 AND lease_until > $3";
const NEXT_RETRY: &str = "SELECT due_ms FROM hr_deliveries
     WHERE target = $1 AND status = 'p' AND grp IS NULL AND NOT held AND queued AND due_ms > $2
     ORDER BY queued DESC, due_ms LIMIT 1";
/// The target's open groups due by $4 whose newest delivery is not in
/// flight elsewhere, and whose key's earlier group is not pending (in
/// flight or retrying), soonest first, at most $5.
const RIPE_GROUPS: &str = "SELECT g.newest_id, g.due_ms
     FROM hr_groups g JOIN hr_deliveries d ON d.target = g.target AND d.event_id = g.newest_id
     WHERE g.target = $1 AND g.due_ms <= $4 AND d.event_id <> ALL($2)
       AND (d.lease_owner IS NULL OR d.lease_owner = $3 OR d.lease_until <= $4)
       AND NOT EXISTS (SELECT 1 FROM hr_deliveries p
                        WHERE p.target = g.target AND p.order_key = g.key AND p.status = 'p')
     ORDER BY g.due_ms LIMIT $5";
/// The target's circuit, if the cluster has it open or half-open.
const CIRCUIT: &str = "SELECT open_until, probe_owner, probe_until FROM hr_circuits WHERE target = $1";
/// When the target's next open group is due after $2.
const NEXT_GROUP: &str = "SELECT due_ms FROM hr_groups WHERE target = $1 AND due_ms > $2 ORDER BY due_ms LIMIT 1";
const DUE_FIRST: &str = due_sql!("NOT d.queued");

/// How long a delivery handed out stays its instance's: twice the longest
/// an attempt may take, and 10 s more, so that only an instance that died
/// loses its leases.
pub fn lease_for(attempt: Duration) -> Duration {
    attempt * 2 + Duration::from_secs(10)
}

/// How soon `due` looks again when another instance's attempts fill the
/// target's concurrency.
const SHARE_POLL_MS: i64 = 50;
/// See [`Store::read_gather`]: at 1,000 webhooks/s over three instances,
/// a hand-out serves about seven deliveries instead of two (BENCHMARKS.md).
const READ_GATHER: Duration = Duration::from_millis(20);

/// How much later than its receipt an event's id may be timed (its round
/// waits for the database at most a request's time): the purge's scan looks
/// this far past its cutoff.
const ID_MARGIN_MS: u64 = 3_600_000;

/// The smallest UUIDv7 of the millisecond `ms`: every id made before it sorts below.
fn id_floor(ms: u64) -> Uuid {
    Uuid::from_u128(u128::from(ms.min((1 << 48) - 1)) << 80)
}

/// Held by the instance that purges (an arbitrary constant: "purge").
const PURGE_LOCK: i64 = 0x0070_7572_6765;

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// A store on a fresh database of `cluster`, with `pool` connections.
    async fn fresh_store(cluster: &throwaway::Cluster, pool: usize) -> PgStore {
        let options = PgOptions { url: cluster.database(), pool, ca_certs: Vec::new(), lease: Duration::from_secs(60) };
        PgStore::connect(&options).await.expect("connect")
    }

    #[test]
    fn a_dropped_connection_is_noticed_within_a_minute_unless_the_url_says_otherwise() {
        let config = parse_url("postgres://u@db.internal/relay").expect("parses");
        assert!(config.get_keepalives());
        assert_eq!(config.get_keepalives_idle(), Duration::from_secs(30));
        assert_eq!(config.get_keepalives_interval(), Some(Duration::from_secs(10)));
        assert_eq!(config.get_keepalives_retries(), Some(3));
        assert_eq!(config.get_tcp_user_timeout(), Some(&Duration::from_secs(30)));
        let theirs =
            parse_url("postgres://u@db.internal/relay?keepalives_idle=600&tcp_user_timeout=5").expect("parses");
        assert_eq!(theirs.get_keepalives_idle(), Duration::from_secs(600));
        assert_eq!(theirs.get_tcp_user_timeout(), Some(&Duration::from_secs(5)));
    }

    #[test]
    fn verify_full_is_read_as_require() {
        let config = parse_url("postgres://u:p@db.internal:5432/relay?sslmode=verify-full").expect("parses");
        assert_eq!(config.get_ssl_mode(), tokio_postgres::config::SslMode::Require);
        assert!(parse_url("postgres://u@h/db?sslmode=bogus").is_err());
    }

    #[test]
    fn an_ids_floor_sorts_below_every_id_of_its_millisecond_and_above_earlier_ones() {
        let at = |ms: u64| {
            let ts = uuid::Timestamp::from_unix(uuid::NoContext, ms / 1000, ((ms % 1000) * 1_000_000) as u32);
            Uuid::new_v7(ts)
        };
        let ms = 1_796_054_260_396;
        assert!(id_floor(ms) <= at(ms) && at(ms) < id_floor(ms + 1));
        assert!(at(ms - 1) < id_floor(ms));
        assert_eq!(id_floor(u64::MAX), Uuid::from_u128(((1u128 << 48) - 1) << 80));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn meets_the_store_contract() {
        let Some(cluster) = throwaway::cluster("the PostgreSQL store contract") else { return };
        crate::store::conformance::run(Box::new(move || {
            Box::pin(async move {
                let options = PgOptions {
                    url: cluster.database(),
                    pool: 8,
                    ca_certs: Vec::new(),
                    lease: Duration::from_secs(60),
                };
                let store = PgStore::connect(&options).await.expect("connect");
                (Arc::new(store) as Arc<dyn Store>, ())
            })
        }))
        .await;
    }

    /// TLS to the database is always verified: against `ca_file` it
    /// connects (and the session is encrypted); without it, the system's
    /// roots refuse a private CA's certificate, with `require` as with
    /// `verify-full`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tls_to_the_database_is_verified() {
        let Some(cluster) = throwaway::cluster("TLS to PostgreSQL") else { return };
        let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).expect("certificate");
        cluster.enable_tls(&cert.cert.pem(), &cert.key_pair.serialize_pem());
        let plain = cluster.database();
        let url = |mode: &str| plain.replace("sslmode=disable", &format!("sslmode={mode}"));
        let options = |mode: &str, ca_certs: Vec<CertificateDer<'static>>| PgOptions {
            url: url(mode),
            pool: 2,
            ca_certs,
            lease: Duration::from_secs(60),
        };
        let trusted = vec![cert.cert.der().clone()];
        // ssl = on takes effect at the reload; a new connection may race it.
        let mut store = None;
        for _ in 0..50 {
            match PgStore::connect(&options("verify-full", trusted.clone())).await {
                Ok(s) => {
                    store = Some(s);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        let store = store.expect("connects over TLS verified against ca_file");
        let client = store.client().await.expect("client");
        let row = query_one(&client, "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[]).await;
        assert!(row.expect("pg_stat_ssl").get::<_, bool>(0), "the session is encrypted");
        drop(client);
        store.close().await.expect("close");
        for mode in ["verify-full", "verify-ca", "require"] {
            let refused = PgStore::connect(&options(mode, Vec::new())).await.err().expect("refused");
            assert!(refused.to_string().to_lowercase().contains("certificate"), "{mode}: {refused}");
        }
    }

    /// One unreadable row does not stop a target's queue (as on sled): a
    /// delivery whose event cannot be read is handed out without it (its
    /// attempt reads it, and fails alone), one whose record cannot be read
    /// counts its attempts afresh, and its outcome is recorded with the
    /// others of its batch.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unreadable_row_does_not_stop_the_queue() {
        let Some(cluster) = throwaway::cluster("unreadable PostgreSQL rows") else { return };
        let store = fresh_store(cluster, 2).await;
        let mut ids = Vec::new();
        for key in ["k1", "k2", "k3"] {
            match store.ingest(crate::store::conformance::event("buttercms", key, &["search"])).await {
                Ok(Ingested::Accepted { id, .. }) => ids.push(id),
                other => panic!("{other:?}"),
            }
        }
        let client = store.client().await.expect("client");
        execute(&client, "UPDATE hr_events SET targets = '\"search\"' WHERE id = $1", &[&ids[0].0])
            .await
            .expect("bad event");
        execute(&client, "UPDATE hr_deliveries SET record = '[1]' WHERE event_id = $1", &[&ids[1].0])
            .await
            .expect("bad record");
        let batch = store.due("search", now_ms() + 1, 10, &HashSet::new()).await.expect("the queue is read");
        let handed: Vec<(EventId, bool)> = batch.due.iter().map(|d| (d.event_id, d.event.is_some())).collect();
        assert_eq!(handed, vec![(ids[0], false), (ids[1], true), (ids[2], true)]);
        for due in &batch.due[1..] {
            let attempt = Attempt { at_ms: now_ms(), duration_ms: 1, status: Some(200), error: None };
            store.complete("search", due, attempt, NextStep::Delivered).await.expect("recorded");
        }
        let rows =
            query(&client, "SELECT event_id, status FROM hr_deliveries ORDER BY event_id", &[]).await.expect("rows");
        let states: Vec<i8> = rows.iter().map(|r| r.get("status")).collect();
        assert_eq!(states, vec![b'p' as i8, b'd' as i8, b'd' as i8]);
        let row = query_one(&client, "SELECT record FROM hr_deliveries WHERE event_id = $1", &[&ids[1].0]).await;
        let record = record_of(&row.expect("row"), "record").expect("the record is rewritten whole");
        assert_eq!((record.made, record.attempts.len()), (1, 1));
        drop(client);
        store.close().await.expect("close");
    }

    /// BEGIN and COMMIT travel with a round's first and last statements: a
    /// round whose last insert fails commits nothing (not its dedup entry
    /// either), and the next round, on the one connection rounds have here,
    /// is stored.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_round_whose_insert_fails_commits_nothing_and_the_next_is_stored() {
        let Some(cluster) = throwaway::cluster("a failed PostgreSQL round") else { return };
        let store = fresh_store(cluster, 2).await;
        let client = store.client().await.expect("client");
        let refuse = "ALTER TABLE hr_deliveries ADD CONSTRAINT hr_test_refuse CHECK (target <> 'refused') NOT VALID";
        execute(&client, refuse, &[]).await.expect("constraint");
        drop(client);
        let ev = crate::store::conformance::event;
        let failed = store.ingest(ev("buttercms", "k1", &["refused"])).await;
        assert!(failed.is_err(), "the deliveries insert fails: {failed:?}");
        match store.ingest(ev("buttercms", "k1", &["search"])).await.expect("the next round") {
            Ingested::Accepted { .. } => {}
            other => panic!("the failed round's dedup entry was not committed: {other:?}"),
        }
        let client = store.client().await.expect("client");
        let events = query_one(&client, "SELECT count(*) FROM hr_events", &[]).await.expect("count");
        assert_eq!(events.get::<_, i64>(0), 1, "only the second round's event is stored");
        drop(client);
        store.close().await.expect("close");
    }

    /// A hand-out that waited for the target's lock (another instance's
    /// hand-out) leases from when it got it: with the lease counted from
    /// before the wait, it was short by the wait, and another instance
    /// could take the delivery while it was being sent.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lease_runs_from_the_hand_out_not_from_before_its_waits() {
        let Some(cluster) = throwaway::cluster("PostgreSQL leases") else { return };
        let store = Arc::new(fresh_store(cluster, 2).await);
        let attempt = Duration::from_millis(100);
        store.share("t", crate::store::Share { concurrency: 8, rate: None, attempt });
        let lease_ms = lease_for(attempt).as_millis() as i64;
        let id = match store.ingest(crate::store::conformance::event("cms", "1", &["t"])).await.expect("ingest") {
            Ingested::Accepted { id, .. } => id,
            other => panic!("{other:?}"),
        };
        // Another session holds the target's lock for a second.
        let holder = store.client().await.expect("client");
        let lock = ingest::lock_id("share", "t", "");
        execute(&holder, "SELECT pg_advisory_lock($1)", &[&lock]).await.expect("lock");
        let asked_at = now_ms();
        let waiting = tokio::spawn({
            let store = store.clone();
            async move { store.due("t", asked_at, 8, &HashSet::new()).await }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        let released_at = now_ms() as i64;
        execute(&holder, "SELECT pg_advisory_unlock($1)", &[&lock]).await.expect("unlock");
        let handed = waiting.await.expect("task").expect("due");
        assert_eq!(handed.due.iter().map(|d| d.event_id).collect::<Vec<_>>(), [id]);
        let sql = "SELECT lease_until FROM hr_deliveries WHERE event_id = $1";
        let until: i64 = query_one(&holder, sql, &[&id.0]).await.expect("row").get(0);
        assert!(until >= released_at + lease_ms, "leased until {until}, {} ms short", released_at + lease_ms - until);
        drop(holder);
        store.close().await.expect("close");
    }

    /// An outcome that ends the head of an `order_by` key takes the key's
    /// lock before anything of it commits (an ingest round holding it sees
    /// the head pending, and holds its new delivery; the release then finds
    /// it). The lock and the release went out as text, prepared first: they
    /// ran after the COMMIT, outside the transaction.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_ending_heads_outcome_commits_under_its_keys_lock() {
        let Some(cluster) = throwaway::cluster("PostgreSQL order locks") else { return };
        let store = Arc::new(fresh_store(cluster, 4).await);
        let ordered = |d: &str| {
            crate::store::conformance::event("cms", d, &["t"])
                .with_sequencing(vec![("t".into(), crate::store::Sequenced::Ordered { key: "k".into() })])
        };
        let mut ids = Vec::new();
        for d in ["1", "2"] {
            match store.ingest(ordered(d)).await.expect("ingest") {
                Ingested::Accepted { id, .. } => ids.push(id),
                other => panic!("{other:?}"),
            }
        }
        let due = store.due("t", now_ms() + 1, 10, &HashSet::new()).await.expect("due").due;
        assert_eq!(due.iter().map(|d| d.event_id).collect::<Vec<_>>(), [ids[0]]);
        let holder = store.client().await.expect("client");
        let lock = ingest::order_lock("t", "k");
        execute(&holder, "SELECT pg_advisory_lock($1)", &[&lock]).await.expect("lock");
        let completing = tokio::spawn({
            let (store, due) = (store.clone(), due[0].clone());
            async move {
                let attempt = Attempt { at_ms: now_ms(), duration_ms: 1, status: Some(200), error: None };
                store.complete("t", &due, attempt, NextStep::Delivered).await
            }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        let status_of = "SELECT status FROM hr_deliveries WHERE event_id = $1";
        let status: i8 = query_one(&holder, status_of, &[&ids[0].0]).await.expect("row").get(0);
        assert_eq!(status, b'p' as i8, "the outcome committed before it had the key's lock");
        execute(&holder, "SELECT pg_advisory_unlock($1)", &[&lock]).await.expect("unlock");
        completing.await.expect("task").expect("recorded");
        let next = store.due("t", now_ms() + 1, 10, &HashSet::new()).await.expect("due").due;
        assert_eq!(next.iter().map(|d| d.event_id).collect::<Vec<_>>(), [ids[1]], "released");
        drop(holder);
        store.close().await.expect("close");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn meets_the_shared_store_contract() {
        let Some(cluster) = throwaway::cluster("the PostgreSQL shared store contract") else { return };
        crate::store::conformance::run_shared(Box::new(move |lease| {
            Box::pin(async move {
                let options = PgOptions { url: cluster.database(), pool: 4, ca_certs: Vec::new(), lease };
                let a = PgStore::connect(&options).await.expect("connect");
                let b = PgStore::connect(&options).await.expect("connect");
                (Arc::new(a) as Arc<dyn Store>, Arc::new(b) as Arc<dyn Store>, ())
            })
        }))
        .await;
    }
}
