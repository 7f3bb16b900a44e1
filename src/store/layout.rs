//! How records sit in sled's one tree (one tree, so that a batch is atomic):
//!
//! - `e/{id}`: the event: a version byte, the [`EventMeta`] JSON's length
//!   (u32, big-endian), the JSON, then the body, raw
//! - `q/{target}\0{due}{id}`: empty; the queue of pending deliveries, by due time
//! - `d/{target}\0{id}`: [`DeliveryRecord`] JSON, written at its first attempt
//!   or requeue; a pending delivery never tried has only its queue entry
//! - `k/{source}\0{sha256 of dedup key}`: `{id}{expires}`
//! - `x/{target}\0{id}`: the reason; the dead letters of a target
//! - `p/{target}`: empty; the target is paused
//!
//! Ids are 16 bytes; times are u64 milliseconds, big-endian so keys sort by them.

use std::collections::HashMap;

use bytes::Bytes;
use sha2::{Digest, Sha256};

use super::{
    Attempt, DeliveryRecord, DeliveryState, DueBatch, DueDelivery, EventId, EventMeta, Ingested, NewEvent, NextStep,
    StoreError, MAX_ATTEMPTS_KEPT,
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

pub fn dedup_key(source: &str, dedup: &str) -> Vec<u8> {
    key(b"k/", &[source.as_bytes(), b"\0", &Sha256::digest(dedup.as_bytes())])
}

pub fn corrupt(key: &[u8], e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt { key: String::from_utf8_lossy(key).into_owned(), detail: e.to_string() }
}

pub fn encode_event(meta: &EventMeta, body: &[u8]) -> Result<Vec<u8>, StoreError> {
    let json = serde_json::to_vec(meta).map_err(|e| StoreError::Io(e.to_string()))?;
    let len = u32::try_from(json.len()).map_err(|_| StoreError::Io("event metadata too large".into()))?;
    let mut v = Vec::with_capacity(5 + json.len() + body.len());
    v.push(EVENT_V1);
    v.extend_from_slice(&len.to_be_bytes());
    v.extend_from_slice(&json);
    v.extend_from_slice(body);
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

/// Adds an event's records to `batch`, unless its dedup key is live in sled
/// or was claimed earlier in this batch.
pub fn plan_ingest(
    db: &sled::Db,
    batch: &mut sled::Batch,
    claimed: &mut HashMap<Vec<u8>, EventId>,
    ev: &NewEvent,
) -> Result<Ingested, StoreError> {
    let dedup = dedup_key(&ev.source, &ev.dedup_key);
    if let Some(id) = claimed.get(&dedup) {
        return Ok(Ingested::Duplicate { id: *id });
    }
    if let Some(found) = db.get(&dedup)? {
        if let (Some(id), Some(expires)) = (EventId::from_slice(found.get(..16).unwrap_or_default()), found.get(16..24))
        {
            let expires = u64::from_be_bytes(expires.try_into().unwrap_or_default());
            if expires > ev.received_ms {
                return Ok(Ingested::Duplicate { id });
            }
        }
    }
    let meta = EventMeta {
        source: ev.source.clone(),
        event: ev.event.clone(),
        received_ms: ev.received_ms,
        content_type: ev.content_type.clone(),
        targets: ev.targets.clone(),
        dedup: dedup.clone(),
    };
    batch.insert(event_key(ev.id), encode_event(&meta, &ev.body)?);
    for target in &ev.targets {
        batch.insert(queue_key(target, ev.received_ms, ev.id), &[]);
    }
    let expires = ev.received_ms.saturating_add(ev.dedup_window.as_millis() as u64);
    batch.insert(dedup.clone(), key(ev.id.as_bytes(), &[&expires.to_be_bytes()]));
    claimed.insert(dedup, ev.id);
    Ok(Ingested::Accepted { id: ev.id, targets: ev.targets.len() })
}

fn json<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(v).map_err(|e| StoreError::Io(e.to_string()))
}

/// A JSON record, or `None`.
pub fn get_json<T: serde::de::DeserializeOwned>(db: &sled::Db, key: &[u8]) -> Result<Option<T>, StoreError> {
    match db.get(key)? {
        None => Ok(None),
        Some(v) => serde_json::from_slice(&v).map(Some).map_err(|e| corrupt(key, e)),
    }
}

fn get_record(db: &sled::Db, key: &[u8]) -> Result<Option<DeliveryRecord>, StoreError> {
    get_json(db, key)
}

/// Reads the due part of a target's queue.
pub fn read_due(
    db: &sled::Db,
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
        let (k, _) = item?;
        let (due_ms, id) = parse_queue_key(&k, prefix.len())?;
        if skip.contains(&id) {
            continue;
        }
        let dkey = delivery_key(target, id);
        let (tries, made) = match get_record(db, &dkey) {
            Ok(record) => record.map_or((0, 0), |r| (r.tries, r.made)),
            Err(e) => {
                // One bad record must not stop the whole queue: count afresh.
                tracing::warn!(%target, %id, error = %e, "unreadable delivery record; its attempt count restarts");
                (0, 0)
            }
        };
        batch.due.push(DueDelivery { event_id: id, due_ms, tries, made });
    }
    if let Some(item) = db.range(due_end..).next() {
        let (k, _) = item?;
        if k.starts_with(&prefix) {
            batch.next_due_ms = Some(parse_queue_key(&k, prefix.len())?.0);
        }
    }
    Ok(batch)
}

fn parse_queue_key(k: &[u8], prefix_len: usize) -> Result<(u64, EventId), StoreError> {
    let rest = &k[prefix_len..];
    match (rest.get(..8), rest.get(8..).and_then(EventId::from_slice)) {
        (Some(due), Some(id)) if rest.len() == 24 => Ok((u64::from_be_bytes(due.try_into().unwrap_or_default()), id)),
        _ => Err(corrupt(k, "bad queue key")),
    }
}

/// The batch that records an attempt and moves the delivery on.
pub fn plan_complete(
    db: &sled::Db,
    target: &str,
    due: &DueDelivery,
    attempt: Attempt,
    next: &NextStep,
    now_ms: u64,
) -> Result<sled::Batch, StoreError> {
    let id = due.event_id;
    let dkey = delivery_key(target, id);
    let mut record = get_record(db, &dkey)?.unwrap_or_else(|| DeliveryRecord::pending(due.due_ms));
    record.attempts.push(attempt);
    record.made += 1;
    if *next != NextStep::Hold {
        record.tries += 1;
    }
    if record.attempts.len() > MAX_ATTEMPTS_KEPT {
        let excess = record.attempts.len() - MAX_ATTEMPTS_KEPT;
        record.attempts.drain(..excess);
    }
    let mut batch = sled::Batch::default();
    let queued = queue_key(target, due.due_ms, id);
    // Requeued by an operator meanwhile: keep their position, record the attempt only.
    if db.contains_key(&queued)? {
        batch.remove(queued);
        record.state = match next {
            NextStep::Delivered => DeliveryState::Delivered { at_ms: now_ms },
            NextStep::RetryAt(at) => {
                batch.insert(queue_key(target, *at, id), &[]);
                DeliveryState::Pending { due_ms: *at }
            }
            NextStep::Hold => {
                batch.insert(queue_key(target, now_ms, id), &[]);
                DeliveryState::Pending { due_ms: now_ms }
            }
            NextStep::Dead(reason) => {
                batch.insert(dead_key(target, id), reason.as_bytes());
                DeliveryState::Dead { at_ms: now_ms, reason: reason.clone() }
            }
        };
    }
    batch.insert(dkey, json(&record)?);
    Ok(batch)
}

/// The batch that purges up to `limit` events received before `cutoff_ms`
/// whose deliveries are all finished, scanning after `after`.
pub fn plan_purge(
    db: &sled::Db,
    cutoff_ms: u64,
    after: Option<EventId>,
    limit: usize,
) -> Result<(sled::Batch, usize, Option<EventId>), StoreError> {
    let start = match after {
        Some(id) => key(&event_key(id), &[b"\0"]),
        None => b"e/".to_vec(),
    };
    let mut batch = sled::Batch::default();
    let (mut purged, mut examined, mut last) = (0, 0, None);
    for item in db.range(start..b"e0".to_vec()) {
        if examined >= limit {
            return Ok((batch, purged, last));
        }
        let (k, v) = item?;
        let meta = decode_meta(&k, &v)?;
        if meta.received_ms >= cutoff_ms {
            // Ids sort by arrival: everything after this is younger.
            return Ok((batch, purged, None));
        }
        let id = EventId::from_slice(&k[2..]).ok_or_else(|| corrupt(&k, "bad event id"))?;
        examined += 1;
        last = Some(id);
        let mut finished = true;
        for t in &meta.targets {
            let done = matches!(
                get_record(db, &delivery_key(t, id))?.map(|r| r.state),
                Some(DeliveryState::Delivered { .. } | DeliveryState::Dead { .. })
            );
            finished &= done;
        }
        if !finished {
            continue;
        }
        for t in &meta.targets {
            batch.remove(delivery_key(t, id));
            batch.remove(dead_key(t, id));
        }
        // The dedup record goes too, unless a later event took it over.
        if let Some(found) = db.get(&meta.dedup)? {
            if found.get(..16) == Some(id.as_bytes().as_slice()) {
                batch.remove(meta.dedup.clone());
            }
        }
        batch.remove(k);
        purged += 1;
    }
    Ok((batch, purged, None))
}

/// The batch that queues a delivery again, due at `now_ms`; `None` when the
/// event is unknown or was not routed to `target`.
pub fn plan_requeue(db: &sled::Db, target: &str, id: EventId, now_ms: u64) -> Result<Option<sled::Batch>, StoreError> {
    let ekey = event_key(id);
    let Some(v) = db.get(&ekey)? else { return Ok(None) };
    let meta = decode_meta(&ekey, &v)?;
    if !meta.targets.iter().any(|t| t == target) {
        return Ok(None);
    }
    let dkey = delivery_key(target, id);
    let mut record = get_record(db, &dkey)?.unwrap_or_else(|| DeliveryRecord::pending(meta.received_ms));
    // An operator's requeue starts the count toward max_attempts afresh.
    record.tries = 0;
    let mut batch = sled::Batch::default();
    match record.state {
        DeliveryState::Pending { due_ms } => batch.remove(queue_key(target, due_ms, id)),
        DeliveryState::Dead { .. } => batch.remove(dead_key(target, id)),
        DeliveryState::Delivered { .. } => {}
    }
    batch.insert(queue_key(target, now_ms, id), &[]);
    record.state = DeliveryState::Pending { due_ms: now_ms };
    batch.insert(dkey, json(&record)?);
    Ok(Some(batch))
}

/// Dead letters of one target (or of all), at most `limit`.
pub fn read_dead_letters(
    db: &sled::Db,
    target: Option<&str>,
    limit: usize,
) -> Result<Vec<super::DeadLetter>, StoreError> {
    let prefix = match target {
        Some(t) => target_prefix(b"x/", t),
        None => b"x/".to_vec(),
    };
    let mut out = Vec::new();
    for item in db.scan_prefix(&prefix).take(limit) {
        let (k, reason) = item?;
        let rest = &k[2..];
        let sep = rest.iter().position(|&b| b == 0).ok_or_else(|| corrupt(&k, "bad dead-letter key"))?;
        let target = String::from_utf8_lossy(&rest[..sep]).into_owned();
        let id = EventId::from_slice(&rest[sep + 1..]).ok_or_else(|| corrupt(&k, "bad dead-letter key"))?;
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
