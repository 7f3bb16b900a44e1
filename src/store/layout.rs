//! How records sit in sled's one tree (one tree, so that a batch is atomic):
//!
//! - `e/{id}`: the event: a version byte, the [`EventMeta`] JSON's length
//!   (u32, big-endian), the JSON, then the body, raw
//! - `q/{target}\0{due}{id}`: empty; the queue of pending deliveries, by due time
//! - `d/{target}\0{id}`: [`DeliveryRecord`] JSON, written from the first attempt
//!   on; a pending delivery never tried has only its queue entry
//! - `k/{source}\0{sha256 of dedup key}`: `{id}{expires}`
//!
//! Ids are 16 bytes; times are u64 milliseconds, big-endian so keys sort by them.

use std::collections::HashMap;

use bytes::Bytes;
use sha2::{Digest, Sha256};

use super::{EventId, EventMeta, Ingested, NewEvent, StoreError};

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
    key(
        b"q/",
        &[
            target.as_bytes(),
            b"\0",
            &due_ms.to_be_bytes(),
            id.as_bytes(),
        ],
    )
}

pub fn delivery_key(target: &str, id: EventId) -> Vec<u8> {
    key(b"d/", &[target.as_bytes(), b"\0", id.as_bytes()])
}

pub fn dedup_key(source: &str, dedup: &str) -> Vec<u8> {
    key(
        b"k/",
        &[source.as_bytes(), b"\0", &Sha256::digest(dedup.as_bytes())],
    )
}

pub fn corrupt(key: &[u8], e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        detail: e.to_string(),
    }
}

pub fn encode_event(meta: &EventMeta, body: &[u8]) -> Result<Vec<u8>, StoreError> {
    let json = serde_json::to_vec(meta).map_err(|e| StoreError::Io(e.to_string()))?;
    let len =
        u32::try_from(json.len()).map_err(|_| StoreError::Io("event metadata too large".into()))?;
    let mut v = Vec::with_capacity(5 + json.len() + body.len());
    v.push(EVENT_V1);
    v.extend_from_slice(&len.to_be_bytes());
    v.extend_from_slice(&json);
    v.extend_from_slice(body);
    Ok(v)
}

pub fn decode_event(key: &[u8], v: &[u8]) -> Result<(EventMeta, Bytes), StoreError> {
    let bad = |why: &str| corrupt(key, why);
    if v.first() != Some(&EVENT_V1) || v.len() < 5 {
        return Err(bad("unknown event record version"));
    }
    let len = u32::from_be_bytes([v[1], v[2], v[3], v[4]]) as usize;
    let json = v
        .get(5..5 + len)
        .ok_or_else(|| bad("truncated event record"))?;
    let meta = serde_json::from_slice(json).map_err(|e| corrupt(key, e))?;
    Ok((meta, Bytes::copy_from_slice(&v[5 + len..])))
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
        if let (Some(id), Some(expires)) = (
            EventId::from_slice(found.get(..16).unwrap_or_default()),
            found.get(16..24),
        ) {
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
    };
    batch.insert(event_key(ev.id), encode_event(&meta, &ev.body)?);
    for target in &ev.targets {
        batch.insert(queue_key(target, ev.received_ms, ev.id), &[]);
    }
    let expires = ev
        .received_ms
        .saturating_add(ev.dedup_window.as_millis() as u64);
    batch.insert(
        dedup.clone(),
        key(ev.id.as_bytes(), &[&expires.to_be_bytes()]),
    );
    claimed.insert(dedup, ev.id);
    Ok(Ingested::Accepted {
        id: ev.id,
        targets: ev.targets.len(),
    })
}
