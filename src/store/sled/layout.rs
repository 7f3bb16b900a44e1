//! How records sit in sled's one tree (one tree, so that a batch is atomic):
//!
//! - `e/{id}`: the event: a version byte, the [`EventMeta`] JSON's length
//!   (u32, big-endian), the JSON, then the body, raw. Its deliveries not yet
//!   tried have no record of their own: a target's worker finds them by
//!   walking the events from its cursor.
//! - `c/{target}`: `{id}`; every event up to this one routed to the target
//!   has a delivery record (a hint for where to start; it never skips one)
//! - `q/{target}\0{due}{id}`: empty; the deliveries due again later (retries,
//!   holds, requeues), by due time
//! - `d/{target}\0{id}`: [`DeliveryRecord`] JSON, written at its first attempt
//!   or requeue
//! - `x/{target}\0{id}`: the reason; the dead letters of a target
//! - `n/{target}`: queued and dead deliveries of a target (two u64), kept in
//!   step by every batch that changes them
//! - `k/{expires}{id}`: `{window}` (u64) then the dedup entries of one round
//!   with that window (see [`super::dedup`]), `{id}` the first of them
//! - `p/{target}`: empty; the target is paused
//! - `v`: the layout's version
//!
//! Ids are 16 bytes; times are u64 milliseconds, big-endian so keys sort by them.
//! One event is one key on the ingest path (plus, per round, a dedup record
//! per window and a count key per target touched), because sled's cost grows
//! with the keys written.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use crate::store::dedup_digest;
use bytes::Bytes;

use super::dedup::{DedupIndex, Entry};
use super::sequence::{self, Sequences};
use super::{
    Attempt, DeliveryRecord, DeliveryState, DueBatch, DueDelivery, EventId, EventMeta, Ingested, NewEvent, NextStep,
    Sequenced, StoreError, StoredEvent, TargetCounts,
};

const EVENT_V1: u8 = 1;

pub fn key(prefix: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    let mut k = Vec::with_capacity(prefix.len() + parts.iter().map(|p| p.len()).sum::<usize>());
    k.extend_from_slice(prefix);
    for p in parts {
        k.extend_from_slice(p);
    }
    k
}

pub fn event_key(id: EventId) -> Vec<u8> {
    key(b"e/", &[id.as_bytes()])
}

pub fn queue_key(target: &str, due_ms: u64, id: EventId) -> Vec<u8> {
    key(b"q/", &[target.as_bytes(), b"\0", &due_ms.to_be_bytes(), id.as_bytes()])
}

pub fn delivery_key(target: &str, id: EventId) -> Vec<u8> {
    key(b"d/", &[target.as_bytes(), b"\0", id.as_bytes()])
}

pub fn dead_key(target: &str, id: EventId) -> Vec<u8> {
    key(b"x/", &[target.as_bytes(), b"\0", id.as_bytes()])
}

pub fn pause_key(target: &str) -> Vec<u8> {
    key(b"p/", &[target.as_bytes()])
}

/// The prefix of all keys of one kind for one target, e.g. `q/search\0`.
pub fn target_prefix(kind: &[u8], target: &str) -> Vec<u8> {
    key(kind, &[target.as_bytes(), b"\0"])
}

pub fn counts_key(target: &str) -> Vec<u8> {
    key(b"n/", &[target.as_bytes()])
}

pub fn cursor_key(target: &str) -> Vec<u8> {
    key(b"c/", &[target.as_bytes()])
}

pub const VERSION_KEY: &[u8] = b"v";
pub const VERSION: &[u8] = b"2";

/// The big-endian u64 in the first 8 bytes of `b` (callers check the length).
pub fn be_u64(b: &[u8]) -> u64 {
    b.get(..8).and_then(|b| b.try_into().ok()).map_or(0, u64::from_be_bytes)
}

/// Where a walk over the events after `after` starts (all of them for `None`).
fn events_after(after: Option<EventId>) -> Vec<u8> {
    match after {
        Some(id) => key(&event_key(id), &[b"\0"]),
        None => b"e/".to_vec(),
    }
}

pub fn id_of(k: &[u8]) -> Result<EventId, StoreError> {
    k.get(2..).and_then(EventId::from_slice).ok_or_else(|| corrupt(k, "bad event id"))
}

pub fn corrupt(key: &[u8], e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt { key: String::from_utf8_lossy(key).into_owned(), detail: e.to_string() }
}

/// [`EventMeta`] by reference: the same JSON, written without copying the
/// event's strings first (this runs once per ingested event).
#[derive(serde::Serialize)]
struct EventMetaRef<'a> {
    source: &'a str,
    event: &'a str,
    received_ms: u64,
    content_type: Option<&'a str>,
    targets: &'a [String],
    #[serde(serialize_with = "crate::store::records::digest_hex::serialize")]
    dedup: &'a [u8],
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    order: BTreeMap<&'a str, &'a str>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    group: BTreeMap<&'a str, &'a str>,
}

/// The event record of `ev`, whose dedup digest is `digest`.
pub fn encode_event(ev: &NewEvent, digest: &[u8]) -> Result<Vec<u8>, StoreError> {
    let (mut order, mut group) = (BTreeMap::new(), BTreeMap::new());
    for (target, how) in &ev.sequenced {
        match how {
            Sequenced::Ordered { key } => order.insert(target.as_str(), key.as_str()),
            Sequenced::Grouped { key, .. } => group.insert(target.as_str(), key.as_str()),
        };
    }
    let meta = EventMetaRef {
        source: &ev.source,
        event: &ev.event,
        received_ms: ev.received_ms,
        content_type: ev.content_type.as_deref(),
        targets: &ev.targets,
        dedup: digest,
        order,
        group,
    };
    let mut v = Vec::with_capacity(512 + ev.body.len());
    v.push(EVENT_V1);
    v.extend_from_slice(&[0; 4]);
    serde_json::to_writer(&mut v, &meta).map_err(|e| StoreError::Io(e.to_string()))?;
    let len = u32::try_from(v.len() - 5).map_err(|_| StoreError::Io("event metadata too large".into()))?;
    v[1..5].copy_from_slice(&len.to_be_bytes());
    v.extend_from_slice(&ev.body);
    Ok(v)
}

/// An event record's metadata, and where its body starts.
fn split_event(key: &[u8], v: &[u8]) -> Result<(EventMeta, usize), StoreError> {
    let bad = |why: &str| corrupt(key, why);
    if v.first() != Some(&EVENT_V1) || v.len() < 5 {
        return Err(bad("unknown event record version"));
    }
    let len = u32::from_be_bytes([v[1], v[2], v[3], v[4]]) as usize;
    let json = v.get(5..5 + len).ok_or_else(|| bad("truncated event record"))?;
    let meta = serde_json::from_slice(json).map_err(|e| corrupt(key, e))?;
    Ok((meta, 5 + len))
}

/// An event record's metadata, without copying its body.
pub fn decode_meta(key: &[u8], v: &[u8]) -> Result<EventMeta, StoreError> {
    split_event(key, v).map(|(meta, _)| meta)
}

pub fn decode_event(key: &[u8], v: &[u8]) -> Result<(EventMeta, Bytes), StoreError> {
    let (meta, body_at) = split_event(key, v)?;
    Ok((meta, Bytes::copy_from_slice(&v[body_at..])))
}

/// Changes to the targets' counts (queued, dead, held), written with the
/// batch that makes them; and the keys of that batch that no reader may act
/// on before it is durable.
#[derive(Debug, Default)]
pub struct Tally {
    counts: HashMap<String, [i64; 3]>,
    until_durable: Vec<Vec<u8>>,
}

impl Tally {
    pub fn add(&mut self, target: &str, queued: i64, dead: i64) {
        self.change(target, [queued, dead, 0]);
    }

    /// Deliveries that start (+1) or stop (-1) being held.
    pub fn held(&mut self, target: &str, held: i64) {
        self.change(target, [0, 0, held]);
    }

    fn change(&mut self, target: &str, by: [i64; 3]) {
        match self.counts.get_mut(target) {
            Some(d) => d.iter_mut().zip(by).for_each(|(d, b)| *d += b),
            None => {
                self.counts.insert(target.to_string(), by);
            }
        }
    }

    /// A key this batch writes that lets a delivery go which no reader may
    /// hand out before the batch is durable: a key's next delivery released
    /// (its due entry), or a key's next debounce group let go (its earlier
    /// group's `G/` pointer removed). Its attempt would otherwise reach the
    /// target before the end of the one before it is on disk, and after a
    /// crash that one would be sent again, last.
    pub fn until_durable(&mut self, key: Vec<u8>) {
        self.until_durable.push(key);
    }

    /// Applies the changes to `counts` and adds the changed counts to
    /// `batch`; returns the keys to hide until the batch is durable.
    #[must_use]
    pub fn write(self, counts: &mut HashMap<String, TargetCounts>, batch: &mut ::sled::Batch) -> Vec<Vec<u8>> {
        for (target, [queued, dead, held]) in self.counts {
            let c = counts.entry(target.clone()).or_default();
            c.queued = c.queued.saturating_add_signed(queued);
            c.dead = c.dead.saturating_add_signed(dead);
            c.held = c.held.saturating_add_signed(held);
            batch.insert(counts_key(&target), encode_counts(c));
        }
        self.until_durable
    }
}

pub fn encode_counts(c: &TargetCounts) -> Vec<u8> {
    key(&c.queued.to_be_bytes(), &[&c.dead.to_be_bytes(), &c.held.to_be_bytes()])
}

pub fn decode_counts(k: &[u8], v: &[u8]) -> Result<TargetCounts, StoreError> {
    match v.len() {
        24 => Ok(TargetCounts { queued: be_u64(v), dead: be_u64(&v[8..]), held: be_u64(&v[16..]) }),
        // Written before `held` was counted (nothing could be held then).
        16 => Ok(TargetCounts { queued: be_u64(v), dead: be_u64(&v[8..]), held: 0 }),
        _ => Err(corrupt(k, "bad counts record")),
    }
}

/// What a round of ingests needs besides sled: the dedup entries of the
/// rounds before, and those claimed in this one.
pub struct IngestRound<'a> {
    pub index: &'a DedupIndex,
    pub claimed: HashMap<[u8; 32], EventId>,
    pub claims: Vec<Claim>,
    /// The order queues and debounce groups this round changed.
    pub sequences: Sequences,
}

/// A dedup key claimed by an event of this round.
pub struct Claim {
    pub entry: Entry,
    pub id: EventId,
    pub window_ms: u64,
    pub expires_ms: u64,
}

/// Adds one `k/` record per dedup window among a round's claims.
pub fn add_dedup_records(claims: &[Claim], batch: &mut ::sled::Batch) {
    let mut by_window: std::collections::BTreeMap<u64, Vec<&Claim>> = Default::default();
    for c in claims {
        by_window.entry(c.window_ms).or_default().push(c);
    }
    for (window, group) in by_window {
        let expires = group.iter().map(|c| c.expires_ms).max().unwrap_or(0);
        let mut packed = Vec::with_capacity(8 + group.len() * Entry::BYTES);
        packed.extend_from_slice(&window.to_be_bytes());
        group.iter().for_each(|c| c.entry.encode(&mut packed));
        batch.insert(key(b"k/", &[&expires.to_be_bytes(), group[0].id.as_bytes()]), packed);
    }
}

/// A `k/` record: its window and entries.
pub fn decode_dedup_record(k: &[u8], v: &[u8]) -> Result<(u64, Vec<Entry>), StoreError> {
    let entries = v.get(8..).and_then(Entry::decode_all).ok_or_else(|| corrupt(k, "bad dedup record"))?;
    Ok((be_u64(v), entries))
}

fn stamp(id: EventId) -> [u8; 8] {
    let mut s = [0; 8];
    s.copy_from_slice(&id.as_bytes()[..8]);
    s
}

/// The live event whose dedup digest is `digest`, among the index's candidates.
fn live_duplicate(
    db: &::sled::Db,
    index: &DedupIndex,
    hash: u64,
    digest: &[u8; 32],
    not_before_ms: u64,
) -> Result<Option<EventId>, StoreError> {
    for stamp in index.candidates(hash) {
        let from = key(b"e/", &[&stamp]);
        let to = key(b"e/", &[&u64::from_be_bytes(stamp).saturating_add(1).to_be_bytes()]);
        for item in db.range(from..to) {
            let (k, v) = item?;
            // An unreadable record is nobody's duplicate (the walk logs it).
            let Ok(meta) = decode_meta(&k, &v) else { continue };
            if meta.dedup.as_slice() == digest.as_slice() && meta.received_ms >= not_before_ms {
                return Ok(Some(id_of(&k)?));
            }
        }
    }
    Ok(None)
}

/// Adds an event's record to `batch` under `id`, unless a webhook with the
/// same dedup key is live in sled or was claimed earlier in this round.
pub fn plan_ingest(
    db: &::sled::Db,
    batch: &mut ::sled::Batch,
    round: &mut IngestRound,
    tally: &mut Tally,
    ev: &NewEvent,
    id: EventId,
) -> Result<Ingested, StoreError> {
    let digest = dedup_digest(&ev.source, &ev.dedup_key);
    if let Some(id) = round.claimed.get(&digest) {
        return Ok(Ingested::Duplicate { id: *id });
    }
    let hash = be_u64(&digest);
    let window = ev.dedup_window.as_millis() as u64;
    let not_before = ev.received_ms.saturating_sub(window).saturating_add(1);
    if let Some(first) = live_duplicate(db, round.index, hash, &digest, not_before)? {
        return Ok(Ingested::Duplicate { id: first });
    }
    // Everything read first: the batch holds the round's other webhooks,
    // and a webhook refused must leave nothing of its own in it.
    for (target, how) in &ev.sequenced {
        round.sequences.load(db, target, how)?;
    }
    let encoded = encode_event(ev, &digest)?;
    batch.insert(event_key(id), encoded);
    for target in &ev.targets {
        tally.add(target, 1, 0);
    }
    for (target, how) in &ev.sequenced {
        round.sequences.join(db, batch, tally, target, how, id, ev.received_ms)?;
    }
    round.claimed.insert(digest, id);
    let entry = Entry { hash, stamp: stamp(id) };
    round.claims.push(Claim { entry, id, window_ms: window, expires_ms: ev.received_ms.saturating_add(window) });
    Ok(Ingested::Accepted { id, targets: ev.targets.len() })
}

pub fn json<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(v).map_err(|e| StoreError::Io(e.to_string()))
}

/// A JSON record, or `None`.
pub fn get_json<T: serde::de::DeserializeOwned>(db: &::sled::Db, key: &[u8]) -> Result<Option<T>, StoreError> {
    match db.get(key)? {
        None => Ok(None),
        Some(v) => serde_json::from_slice(&v).map(Some).map_err(|e| corrupt(key, e)),
    }
}

fn get_record(db: &::sled::Db, key: &[u8]) -> Result<Option<DeliveryRecord>, StoreError> {
    get_json(db, key)
}

/// Events examined at most per [`read_due`] walk past the cursor.
const WALK: usize = 4096;

/// Reads a target's due deliveries: first those queued for a later attempt,
/// then those never tried, walking the events after `from` up to `durable`
/// (the newest event known durable). Returns them with the last event the
/// walk examined: every event up to it was handed out, is in `skip`, or
/// needs no walk.
pub fn read_due(
    db: &::sled::Db,
    target: &str,
    now_ms: u64,
    limit: usize,
    skip: &std::collections::HashSet<EventId>,
    from: Option<EventId>,
    durable: Option<EventId>,
) -> Result<(DueBatch, Option<EventId>), StoreError> {
    let mut batch = read_queued(db, target, now_ms, limit, skip)?;
    let Some(durable) = durable else { return Ok((batch, from)) };
    let (mut walked_to, mut walked) = (from, 0);
    for item in db.range(events_after(from)..=event_key(durable)) {
        if batch.due.len() >= limit || walked >= WALK {
            // More may be due at once: look again without waiting.
            batch.next_due_ms = Some(now_ms);
            break;
        }
        walked += 1;
        let (k, v) = item?;
        let id = id_of(&k)?;
        walked_to = Some(id);
        // An attempt in flight (its outcome is recorded before it leaves
        // `skip`), or one tried already: the queue has it.
        if skip.contains(&id) || db.contains_key(delivery_key(target, id))? {
            continue;
        }
        // The event, if its delivery to `target` was never tried.
        let untried = match split_event(&k, &v) {
            // A debounce group's event is queued with its group; a
            // delivery behind an earlier one of its key is released
            // by that one's end. Neither needs the walk again.
            Ok((meta, _)) if meta.group.contains_key(target) => None,
            // The record is read again after the head: a delivery
            // released meanwhile has one by now, and is handed out from
            // the queue instead (not twice).
            Ok((meta, _))
                if meta.order.get(target).is_some_and(|key| {
                    sequence::head(db, target, key).ok().flatten().is_some_and(|head| head != id)
                        || db.contains_key(delivery_key(target, id)).unwrap_or(true)
                }) =>
            {
                None
            }
            Ok((meta, body_at)) if meta.targets.iter().any(|t| t == target) => Some((meta, body_at)),
            Ok(_) => None,
            Err(e) => {
                // One bad record must not stop the whole queue; it cannot be delivered.
                tracing::error!(%target, %id, error = %e, "unreadable event record; skipping its delivery");
                None
            }
        };
        let Some((meta, body_at)) = untried else { continue };
        // The walk has read the event: its attempt need not read it again.
        let body = Bytes::copy_from_slice(&v[body_at..]);
        batch.due.push(DueDelivery {
            event_id: id,
            due_ms: meta.received_ms,
            tries: 0,
            made: 0,
            queued: false,
            group: false,
            coalesced: 0,
            event: Some(Arc::new(StoredEvent { id, meta, body })),
        });
    }
    Ok((batch, walked_to))
}

/// Reads the due part of a target's queue of later attempts.
fn read_queued(
    db: &::sled::Db,
    target: &str,
    now_ms: u64,
    limit: usize,
    skip: &std::collections::HashSet<EventId>,
) -> Result<DueBatch, StoreError> {
    let prefix = target_prefix(b"q/", target);
    let due_end = key(&prefix, &[&now_ms.saturating_add(1).to_be_bytes()]);
    let mut batch = DueBatch::default();
    for item in db.range(prefix.clone()..due_end.clone()) {
        if batch.due.len() >= limit {
            break;
        }
        let (k, mark) = item?;
        let (due_ms, id) = parse_queue_key(&k, prefix.len())?;
        if skip.contains(&id) {
            continue;
        }
        let dkey = delivery_key(target, id);
        let (tries, made, coalesced) = match get_record(db, &dkey) {
            Ok(record) => record.map_or((0, 0, 0), |r| (r.tries, r.made, r.coalesced)),
            Err(e) => {
                // One bad record must not stop the whole queue: count afresh.
                tracing::warn!(%target, %id, error = %e, "unreadable delivery record; its attempt count restarts");
                (0, 0, 0)
            }
        };
        let group = mark.as_ref() == sequence::GROUP_MARK;
        if group && group_waits(db, target, id)? {
            continue;
        }
        batch.due.push(DueDelivery { event_id: id, due_ms, tries, made, queued: true, group, coalesced, event: None });
    }
    if let Some(item) = db.range(due_end..).next() {
        let (k, _) = item?;
        if k.starts_with(&prefix) {
            batch.next_due_ms = Some(parse_queue_key(&k, prefix.len())?.0);
        }
    }
    Ok(batch)
}

/// Whether the open group whose newest event is `id` waits for an earlier
/// group of its key, still pending.
fn group_waits(db: &::sled::Db, target: &str, id: EventId) -> Result<bool, StoreError> {
    let ekey = event_key(id);
    let Some(v) = db.get(&ekey)? else { return Ok(false) };
    match decode_meta(&ekey, &v)?.group.get(target) {
        Some(k) => Ok(sequence::waits_for(db, target, k, id)?.is_some()),
        None => Ok(false),
    }
}

fn parse_queue_key(k: &[u8], prefix_len: usize) -> Result<(u64, EventId), StoreError> {
    let rest = &k[prefix_len..];
    match (rest.get(..8), rest.get(8..).and_then(EventId::from_slice)) {
        (Some(due), Some(id)) if rest.len() == 24 => Ok((be_u64(due), id)),
        _ => Err(corrupt(k, "bad queue key")),
    }
}

/// An attempt's outcome, as the worker reports it.
#[derive(Debug)]
pub struct Completion {
    pub target: String,
    pub due: DueDelivery,
    pub attempt: Attempt,
    pub next: NextStep,
}

/// The batch that records an attempt and moves the delivery on.
pub fn plan_complete(
    db: &::sled::Db,
    tally: &mut Tally,
    done: &Completion,
    now_ms: u64,
) -> Result<::sled::Batch, StoreError> {
    let mut batch = ::sled::Batch::default();
    complete_into(db, tally, &mut batch, done, now_ms, &mut |_| true)?;
    Ok(batch)
}

/// Adds to `batch` the writes that record an attempt and move the delivery
/// on. Everything is read before anything is written, so on an error
/// `batch` and `tally` are as they were. A delivery with an `order_by` key
/// may release the next one of its key, reading its key's queue: it is
/// planned only if `free` says nothing is pending in `batch` for that queue
/// (it is given the queue's prefix, and notes it as pending); otherwise it
/// is left alone (`Ok(false)`, nothing written).
pub fn complete_into(
    db: &::sled::Db,
    tally: &mut Tally,
    batch: &mut ::sled::Batch,
    done: &Completion,
    now_ms: u64,
    free: &mut dyn FnMut(&[u8]) -> bool,
) -> Result<bool, StoreError> {
    let Completion { target, due, attempt, next } = done;
    let id = due.event_id;
    let dkey = delivery_key(target, id);
    // An unreadable record must not fail its outcome (the delivery would be
    // handed out and sent again and again): its history is lost, its
    // attempts are counted afresh, as on PostgreSQL.
    let (found, unreadable) = match get_record(db, &dkey) {
        Ok(found) => (found, false),
        Err(e) => {
            tracing::warn!(%target, %id, error = %e, "unreadable delivery record; its attempt count restarts");
            (Some(DeliveryRecord::pending(due.due_ms)), true)
        }
    };
    // Still where it was handed out? If an operator requeued it meanwhile,
    // keep their position and record the attempt only.
    let (current, queued) = if due.queued {
        let queued = queue_key(target, due.due_ms, id);
        let current = db.contains_key(&queued)?;
        (current, current.then_some(queued))
    } else {
        (found.is_none() || unreadable, None)
    };
    let ekey = event_key(id);
    let meta = match db.get(&ekey)? {
        Some(v) => Some(decode_meta(&ekey, &v)?),
        None => None,
    };
    if found.is_none() && (!current || meta.is_none()) {
        // Neither a record to add the attempt to nor a delivery to move on
        // (the event was purged meanwhile): writing one would leave a record
        // that nothing purges, and a first attempt that looks tried.
        return Ok(true);
    }
    let order_key = meta.as_ref().and_then(|m| m.order.get(target));
    if let Some(k) = order_key {
        if !free(&sequence::order_prefix(target, k)) {
            return Ok(false);
        }
    }
    // A closed group's delivery that ends lets its key's next group go.
    let closed = match meta.as_ref().and_then(|m| m.group.get(target)) {
        Some(k) if current && matches!(next, NextStep::Delivered | NextStep::Dead(_) | NextStep::Skipped) => {
            let ckey = sequence::closed_key(target, k);
            if !free(&ckey) {
                return Ok(false);
            }
            db.get(&ckey)?.filter(|v| v.as_ref() == id.as_bytes()).map(|_| ckey)
        }
        _ => None,
    };
    let seq = sequence::seq_of(found.as_ref(), id);
    let mut record = found.unwrap_or_else(|| DeliveryRecord::pending(due.due_ms));
    record.attempted(attempt.clone(), next, current, now_ms);
    let encoded = json(&record)?;
    if current {
        // An ended delivery releases the next one of its key. It reads
        // before it writes, so it goes first.
        if let (true, Some(order_key)) = (record.state.is_finished(), order_key) {
            sequence::leave(db, batch, tally, target, order_key, seq, now_ms)?;
        }
        if let Some(queued) = queued {
            batch.remove(queued);
        }
        if let Some(ckey) = closed {
            tally.until_durable(ckey.clone());
            batch.remove(ckey);
        }
        match next {
            NextStep::Delivered | NextStep::Skipped => tally.add(target, -1, 0),
            NextStep::RetryAt(at) => batch.insert(queue_key(target, *at, id), &[]),
            NextStep::Hold => batch.insert(queue_key(target, now_ms, id), &[]),
            NextStep::Dead(reason) => {
                tally.add(target, -1, 1);
                batch.insert(dead_key(target, id), reason.as_bytes());
            }
        }
    }
    batch.insert(dkey, encoded);
    Ok(true)
}

/// The batch that removes up to `limit` dedup records expired by `now_ms`
/// (keys sort by expiry), and how many.
pub fn plan_purge_dedup(db: &::sled::Db, now_ms: u64, limit: usize) -> Result<(::sled::Batch, usize), StoreError> {
    let mut batch = ::sled::Batch::default();
    let mut removed = 0;
    for k in db.range(b"k/".to_vec()..key(b"k/", &[&now_ms.to_be_bytes()])).keys().take(limit) {
        batch.remove(k?);
        removed += 1;
    }
    Ok((batch, removed))
}

/// The batch that purges up to `limit` events received before `cutoff_ms`
/// whose deliveries are all finished, scanning after `after`.
pub fn plan_purge(
    db: &::sled::Db,
    tally: &mut Tally,
    cutoff_ms: u64,
    after: Option<EventId>,
    limit: usize,
) -> Result<(::sled::Batch, usize, Option<EventId>), StoreError> {
    let mut batch = ::sled::Batch::default();
    let (mut purged, mut examined, mut last) = (0, 0, None);
    for item in db.range(events_after(after)..b"e0".to_vec()) {
        if examined >= limit {
            return Ok((batch, purged, last));
        }
        let (k, v) = item?;
        let id = id_of(&k)?;
        examined += 1;
        last = Some(id);
        let meta = match decode_meta(&k, &v) {
            Ok(meta) => meta,
            Err(e) => {
                // Kept (an operator may look at it); the purge goes on past it.
                tracing::error!(%id, error = %e, "unreadable event record; not purged");
                continue;
            }
        };
        if meta.received_ms >= cutoff_ms {
            // Ids sort by arrival: everything after this is younger.
            return Ok((batch, purged, None));
        }
        let mut states = Vec::with_capacity(meta.targets.len());
        for t in &meta.targets {
            states.push(get_record(db, &delivery_key(t, id))?.map(|r| r.state));
        }
        let finished = |s: &Option<DeliveryState>| s.as_ref().is_some_and(DeliveryState::is_finished);
        if !states.iter().all(finished) {
            continue;
        }
        for (t, state) in meta.targets.iter().zip(&states) {
            if matches!(state, Some(DeliveryState::Dead { .. })) {
                tally.add(t, 0, -1);
            }
            batch.remove(delivery_key(t, id));
            batch.remove(dead_key(t, id));
        }
        batch.remove(k);
        purged += 1;
    }
    Ok((batch, purged, None))
}

/// The batch that queues a delivery again, due at `now_ms`; `None` when the
/// event is unknown or was not routed to `target`.
pub fn plan_requeue(
    db: &::sled::Db,
    tally: &mut Tally,
    target: &str,
    id: EventId,
    now_ms: u64,
) -> Result<Option<::sled::Batch>, StoreError> {
    let ekey = event_key(id);
    let Some(v) = db.get(&ekey)? else { return Ok(None) };
    let meta = decode_meta(&ekey, &v)?;
    if !meta.targets.iter().any(|t| t == target) {
        return Ok(None);
    }
    let dkey = delivery_key(target, id);
    let found = get_record(db, &dkey)?;
    if found.is_none() && meta.group.contains_key(target) {
        // Waiting in its open debounce group (its record is written when the
        // group closes): it is queued already, and goes with the group.
        return Ok(Some(::sled::Batch::default()));
    }
    let mut record = found.unwrap_or_else(|| DeliveryRecord::pending(meta.received_ms));
    // An operator's requeue starts the count toward max_attempts afresh.
    record.tries = 0;
    let mut batch = ::sled::Batch::default();
    let order_key = meta.order.get(target);
    let due_now = match record.state {
        // Queued already: it keeps its place, in its key's queue too (so
        // that nothing of its key is released while an attempt at it may
        // be in flight). Due now: the head of a key at once, a held one
        // once it is released.
        DeliveryState::Pending { due_ms } => {
            batch.remove(queue_key(target, due_ms, id));
            match order_key {
                Some(k) => sequence::head(db, target, k)? == Some(id),
                None => true,
            }
        }
        ended => {
            match ended {
                DeliveryState::Dead { .. } => {
                    tally.add(target, 1, -1);
                    batch.remove(dead_key(target, id))
                }
                _ => tally.add(target, 1, 0),
            }
            // Queued again: behind every delivery of its key queued before.
            match order_key {
                Some(k) => {
                    let (seq, head) = sequence::rejoin(db, &mut batch, tally, target, k, id)?;
                    record.order_seq = Some(seq.to_string());
                    head
                }
                None => true,
            }
        }
    };
    record.state = DeliveryState::Pending { due_ms: now_ms };
    if due_now {
        batch.insert(queue_key(target, now_ms, id), &[]);
    }
    batch.insert(dkey, json(&record)?);
    Ok(Some(batch))
}

/// Dead letters of one target (or of all), as [`super::Store::dead_letters`] lists them.
pub fn read_dead_letters(
    db: &::sled::Db,
    target: Option<&str>,
    before: Option<EventId>,
    limit: usize,
) -> Result<Vec<super::DeadLetter>, StoreError> {
    let targets = match target {
        Some(t) => vec![t.to_string()],
        None => dead_letter_targets(db)?,
    };
    // Each target's dead letters newest first, merged by event id.
    let mut lanes: Vec<_> = targets
        .iter()
        .map(|t| {
            let upper = before.map_or_else(|| key(b"x/", &[t.as_bytes(), b"\x01"]), |b| dead_key(t, b));
            db.range(target_prefix(b"x/", t)..upper).rev()
        })
        .collect();
    let mut heads: Vec<Option<(EventId, sled::IVec)>> = Vec::with_capacity(lanes.len());
    for lane in &mut lanes {
        heads.push(next_dead(lane)?);
    }
    let (mut out, mut events, mut last) = (Vec::new(), 0, None);
    // The newest head; targets in name order for one event.
    let newest = |heads: &[Option<(EventId, sled::IVec)>]| {
        (0..heads.len()).filter(|i| heads[*i].is_some()).max_by(|a, b| {
            let (x, y) = (heads[*a].as_ref().map(|h| h.0), heads[*b].as_ref().map(|h| h.0));
            x.cmp(&y).then(targets[*b].cmp(&targets[*a]))
        })
    };
    while let Some(at) = newest(&heads) {
        let Some((id, reason)) = heads[at].take() else { break };
        if last != Some(id) {
            if events == limit {
                break;
            }
            (events, last) = (events + 1, Some(id));
        }
        heads[at] = next_dead(&mut lanes[at])?;
        let target = targets[at].clone();
        let record = get_record(db, &delivery_key(&target, id))?;
        let at_ms = match record.as_ref().map(|r| &r.state) {
            Some(DeliveryState::Dead { at_ms, .. }) => *at_ms,
            _ => 0,
        };
        let last_attempt = record.and_then(|r| r.attempts.last().cloned());
        out.push(super::DeadLetter {
            event_id: id,
            target,
            reason: String::from_utf8_lossy(&reason).into_owned(),
            at_ms,
            last_attempt,
        });
    }
    Ok(out)
}

/// The next dead letter of one target's reversed range: its event and reason.
fn next_dead(
    lane: &mut impl Iterator<Item = Result<(sled::IVec, sled::IVec), sled::Error>>,
) -> Result<Option<(EventId, sled::IVec)>, StoreError> {
    let Some(item) = lane.next() else { return Ok(None) };
    let (k, reason) = item?;
    let id = k.iter().position(|&b| b == 0).and_then(|sep| EventId::from_slice(&k[sep + 1..]));
    let id = id.ok_or_else(|| corrupt(&k, "bad dead-letter key"))?;
    Ok(Some((id, reason)))
}

/// The targets with dead letters: one seek per target.
fn dead_letter_targets(db: &::sled::Db) -> Result<Vec<String>, StoreError> {
    let mut targets = Vec::new();
    let mut from = b"x/".to_vec();
    while let Some(item) = db.range(from..b"x0".to_vec()).next() {
        let (k, _) = item?;
        let rest = &k[2..];
        let sep = rest.iter().position(|&b| b == 0).ok_or_else(|| corrupt(&k, "bad dead-letter key"))?;
        let target = &rest[..sep];
        from = key(b"x/", &[target, b"\x01"]);
        targets.push(String::from_utf8_lossy(target).into_owned());
    }
    Ok(targets)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_record_reads_back_as_written() {
        let ev = NewEvent {
            id: EventId::new(),
            source: "butter\"cms".into(),
            event: "page.published".into(),
            dedup_key: "k".into(),
            dedup_window: std::time::Duration::from_secs(600),
            content_type: Some("application/json".into()),
            body: Bytes::from_static(b"{\"a\":1}\xff"),
            targets: vec!["search".into(), "cache".into()],
            received_ms: 1_700_000_000_123,
            sequenced: Vec::new(),
        };
        let digest = dedup_digest(&ev.source, &ev.dedup_key);
        let record = encode_event(&ev, &digest).unwrap();
        let (meta, body) = decode_event(b"e/x", &record).unwrap();
        let expected = EventMeta {
            source: ev.source.clone(),
            event: ev.event.clone(),
            received_ms: ev.received_ms,
            content_type: ev.content_type.clone(),
            targets: ev.targets.clone(),
            dedup: digest.to_vec(),
            order: Default::default(),
            group: Default::default(),
        };
        assert_eq!((meta, body), (expected, ev.body));
        assert!(decode_event(b"e/x", &record[..7]).is_err(), "a truncated record is refused");
    }
}
