//! `order_by` queues and `debounce` groups in sled's tree (beside the keys of
//! [`super::layout`]):
//!
//! - `o/{target}\0{key hash}{chunk}`: the pending deliveries of one key in
//!   queue order, packed up to [`CHUNK`] a record (`chunk` a big-endian u64,
//!   rising), each entry its place `seq` then the event's id (16 bytes
//!   each). The first entry is the key's head, the only one that may be
//!   attempted. `seq` is the event's id, or a later one given at a requeue.
//!   Packing keeps sled's keys (and so its memory) near one per key, not one
//!   per delivery, and bounds the bytes any one change rewrites.
//! - `g/{target}\0{key hash}`: the key's open debounce group, [`Group`] JSON.
//! - `m/{target}\0{key hash}{id}`: empty; an event of that group.
//! - `G/{target}\0{key hash}`: the id of the key's last closed group's
//!   delivery, while it may be pending: the key's next group is not handed
//!   out while that delivery is pending (in flight or retrying), so that the
//!   groups of one key are delivered in order. Removed when it ends.
//!
//! A group's newest event waits in `q/` at the group's due time, its value
//! [`GROUP_MARK`]; a held delivery has no `q/` entry until it is released.
//! Key hashes are 16 bytes of SHA-256: two keys that collide would share
//! one queue (held longer, never out of order).

use std::collections::hash_map::Entry;
use std::collections::HashMap;

use sha2::{Digest, Sha256};

use super::layout::{delivery_key, get_json, json, key, queue_key, Tally};
use super::{DeliveryRecord, DeliveryState, EventId, Sequenced, StoreError};

/// The `q/` value of a group's newest event.
pub const GROUP_MARK: &[u8] = b"g";

fn key_hash(key: &str) -> [u8; 16] {
    let digest = Sha256::digest(key.as_bytes());
    let mut h = [0; 16];
    h.copy_from_slice(&digest[..16]);
    h
}

pub fn order_prefix(target: &str, k: &str) -> Vec<u8> {
    super::layout::key(b"o/", &[target.as_bytes(), b"\0", &key_hash(k)])
}

pub fn group_key(target: &str, k: &str) -> Vec<u8> {
    super::layout::key(b"g/", &[target.as_bytes(), b"\0", &key_hash(k)])
}

/// The key of a key's last closed group's delivery (see the module's docs).
pub fn closed_key(target: &str, k: &str) -> Vec<u8> {
    super::layout::key(b"G/", &[target.as_bytes(), b"\0", &key_hash(k)])
}

/// The pending delivery of an earlier group of `k` that the group whose
/// newest event is `id` must wait for, if any.
pub fn waits_for(db: &::sled::Db, target: &str, k: &str, id: EventId) -> Result<Option<EventId>, StoreError> {
    let ckey = closed_key(target, k);
    let Some(v) = db.get(&ckey)? else { return Ok(None) };
    // Unreadable, the pointer or the record it points to holds nothing: an
    // error here would fail every read of the target's queue.
    let Some(earlier) = EventId::from_slice(&v).filter(|e| *e != id) else { return Ok(None) };
    match get_json::<DeliveryRecord>(db, &delivery_key(target, earlier)) {
        Ok(record) => Ok(record.filter(|r| !r.state.is_finished()).map(|_| earlier)),
        Err(e) => {
            tracing::warn!(%target, id = %earlier, error = %e, "unreadable delivery record; the next group does not wait for it");
            Ok(None)
        }
    }
}

fn member_prefix(target: &str, k: &str) -> Vec<u8> {
    super::layout::key(b"m/", &[target.as_bytes(), b"\0", &key_hash(k)])
}

/// An open debounce group.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Group {
    pub oldest_ms: u64,
    pub newest_ms: u64,
    /// The newest event's id, as `evt_…`.
    pub newest: String,
    pub count: u32,
    pub window_ms: u64,
    pub max_wait_ms: u64,
}

impl Group {
    /// When it is attempted: quiet for `window`, or `max_wait` after its first event.
    pub fn due_ms(&self) -> u64 {
        self.newest_ms.saturating_add(self.window_ms).min(self.oldest_ms.saturating_add(self.max_wait_ms))
    }

    fn newest_id(&self, k: &[u8]) -> Result<EventId, StoreError> {
        self.newest.parse().map_err(|e| super::layout::corrupt(k, e))
    }
}

/// Entries a chunk of an order queue holds at most.
pub const CHUNK: usize = 64;
const ENTRY: usize = 32;

fn chunk_key(prefix: &[u8], chunk: u64) -> Vec<u8> {
    key(prefix, &[&chunk.to_be_bytes()])
}

fn chunk_number(prefix: &[u8], k: &[u8]) -> u64 {
    super::layout::be_u64(&k[prefix.len().min(k.len())..])
}

/// The (seq, id) entries of a chunk.
fn entries(k: &[u8], v: &[u8]) -> Result<Vec<(EventId, EventId)>, StoreError> {
    if !v.len().is_multiple_of(ENTRY) {
        return Err(super::layout::corrupt(k, "bad order chunk"));
    }
    v.chunks(ENTRY)
        .map(|e| match (EventId::from_slice(&e[..16]), EventId::from_slice(&e[16..])) {
            (Some(seq), Some(id)) => Ok((seq, id)),
            _ => Err(super::layout::corrupt(k, "bad order entry")),
        })
        .collect()
}

fn pack(entries: &[(EventId, EventId)]) -> Vec<u8> {
    let mut v = Vec::with_capacity(entries.len() * ENTRY);
    for (seq, id) in entries {
        v.extend_from_slice(seq.as_bytes());
        v.extend_from_slice(id.as_bytes());
    }
    v
}

/// A key's last chunk, as a round of ingests has it so far.
struct Tail {
    chunk: u64,
    entries: Vec<(EventId, EventId)>,
}

/// What a round of ingests changed, for the later events of the same round
/// (sled does not read a batch before it is applied).
#[derive(Default)]
pub struct Sequences {
    /// Order queues appended to this round: their last chunk (`None`: empty before).
    tails: HashMap<Vec<u8>, Tail>,
    /// Groups read or changed this round, as they now are (`None`: no group
    /// open).
    groups: HashMap<Vec<u8>, Option<Group>>,
}

impl Sequences {
    /// The order queues (their prefixes) this round appended to.
    pub fn queues(&self) -> impl Iterator<Item = &[u8]> {
        self.tails.keys().map(Vec::as_slice)
    }

    /// Reads what [`Sequences::join`] of `target` will change, if this
    /// round has not yet: a caller that loads every target of an event
    /// first fails, if a record is unreadable, before writing any of it.
    pub fn load(&mut self, db: &::sled::Db, target: &str, how: &Sequenced) -> Result<(), StoreError> {
        match how {
            Sequenced::Ordered { key: k } => {
                let prefix = order_prefix(target, k);
                if let Entry::Vacant(slot) = self.tails.entry(prefix) {
                    let prefix = slot.key();
                    let tail = match db.scan_prefix(prefix).next_back() {
                        Some(item) => {
                            let (ck, v) = item?;
                            Tail { chunk: chunk_number(prefix, &ck), entries: entries(&ck, &v)? }
                        }
                        None => Tail { chunk: 0, entries: Vec::new() },
                    };
                    slot.insert(tail);
                }
            }
            Sequenced::Grouped { key: k, .. } => {
                if let Entry::Vacant(slot) = self.groups.entry(group_key(target, k)) {
                    let open = get_json::<Group>(db, slot.key())?;
                    if let Some(g) = &open {
                        g.newest_id(slot.key())?;
                    }
                    slot.insert(open);
                }
            }
        }
        Ok(())
    }

    /// Adds a new event's delivery to `target` to its key's order queue, or
    /// to its key's debounce group (opening one, or moving the group's due
    /// time). It reads nothing once [`Sequences::load`] has.
    #[allow(clippy::too_many_arguments)]
    pub fn join(
        &mut self,
        db: &::sled::Db,
        batch: &mut ::sled::Batch,
        tally: &mut Tally,
        target: &str,
        how: &Sequenced,
        id: EventId,
        received_ms: u64,
    ) -> Result<(), StoreError> {
        self.load(db, target, how)?;
        match how {
            Sequenced::Ordered { key: k } => {
                let prefix = order_prefix(target, k);
                let Some(tail) = self.tails.get_mut(&prefix) else { return Ok(()) };
                let behind = !tail.entries.is_empty();
                if tail.entries.len() >= CHUNK {
                    *tail = Tail { chunk: tail.chunk + 1, entries: Vec::new() };
                }
                tail.entries.push((id, id));
                batch.insert(chunk_key(&prefix, tail.chunk), pack(&tail.entries));
                if behind {
                    tally.held(target, 1);
                }
            }
            Sequenced::Grouped { key: k, window_ms, max_wait_ms } => {
                let gkey = group_key(target, k);
                let (group, replaced) = match self.groups.get(&gkey).cloned().flatten() {
                    Some(mut g) => {
                        let replaced = queue_key(target, g.due_ms(), g.newest_id(&gkey)?);
                        g.newest_ms = g.newest_ms.max(received_ms);
                        g.newest = id.to_string();
                        g.count += 1;
                        (g.window_ms, g.max_wait_ms) = (*window_ms, *max_wait_ms);
                        (g, Some(replaced))
                    }
                    None => (
                        Group {
                            oldest_ms: received_ms,
                            newest_ms: received_ms,
                            newest: id.to_string(),
                            count: 1,
                            window_ms: *window_ms,
                            max_wait_ms: *max_wait_ms,
                        },
                        None,
                    ),
                };
                let encoded = json(&group)?;
                if let Some(replaced) = replaced {
                    batch.remove(replaced);
                }
                tally.held(target, 1);
                batch.insert(key(&member_prefix(target, k), &[id.as_bytes()]), Vec::new());
                batch.insert(gkey.clone(), encoded);
                batch.insert(queue_key(target, group.due_ms(), id), GROUP_MARK);
                self.groups.insert(gkey, Some(group));
            }
        }
        Ok(())
    }
}

/// The delivery at the head of a key's order queue.
pub fn head(db: &::sled::Db, target: &str, key: &str) -> Result<Option<EventId>, StoreError> {
    match db.scan_prefix(order_prefix(target, key)).next() {
        Some(item) => {
            let (k, v) = item?;
            Ok(entries(&k, &v)?.first().map(|(_, id)| *id))
        }
        None => Ok(None),
    }
}

/// Where a delivery stands in its key's queue.
pub fn seq_of(record: Option<&DeliveryRecord>, id: EventId) -> EventId {
    record.and_then(|r| r.order_seq.as_deref()).and_then(|s| s.parse().ok()).unwrap_or(id)
}

/// Takes a delivery out of its key's queue (it ended). If it was the head,
/// the next delivery of the key is released: due now. Reads the chunks up
/// to the delivery's and the one after (for a head, its first).
pub fn leave(
    db: &::sled::Db,
    batch: &mut ::sled::Batch,
    tally: &mut Tally,
    target: &str,
    order_key: &str,
    seq: EventId,
    now_ms: u64,
) -> Result<(), StoreError> {
    let prefix = order_prefix(target, order_key);
    let mut chunks = db.scan_prefix(&prefix);
    let mut first = true;
    let found = loop {
        let Some(item) = chunks.next() else { return Ok(()) };
        let (ck, v) = item?;
        let list = entries(&ck, &v)?;
        match list.iter().position(|(s, _)| *s == seq) {
            Some(at) => break (ck, list, at, first && at == 0),
            None => first = false,
        }
    };
    let (ck, mut list, at, was_head) = found;
    list.remove(at);
    // The next in the queue: in the same chunk, else first of the next one.
    let next = match list.get(at) {
        Some(e) => Some(e.1),
        None => match chunks.next() {
            Some(item) => {
                let (nk, nv) = item?;
                entries(&nk, &nv)?.first().map(|e| e.1)
            }
            None => None,
        },
    };
    // Everything read before anything is written: a caller's batch holds
    // other writes, and a half-planned one must not join them.
    let released = match (was_head, next) {
        (true, Some(next)) => Some((next, released_record(db, target, next, now_ms)?)),
        _ => None,
    };
    if list.is_empty() {
        batch.remove(ck);
    } else {
        batch.insert(ck, pack(&list));
    }
    if !was_head {
        tally.held(target, -1);
    }
    if let Some((next, record)) = released {
        // The held delivery is due now, once this end is on disk.
        batch.insert(delivery_key(target, next), record);
        batch.insert(queue_key(target, now_ms, next), Vec::new());
        tally.until_durable(queue_key(target, now_ms, next));
        tally.held(target, -1);
    }
    Ok(())
}

/// The record of a held delivery made due at `now_ms`.
fn released_record(db: &::sled::Db, target: &str, id: EventId, now_ms: u64) -> Result<Vec<u8>, StoreError> {
    // Unreadable, it is released afresh: else the outcome that releases it
    // would fail, and the one before it be sent again and again.
    let mut record = get_json::<DeliveryRecord>(db, &delivery_key(target, id))
        .unwrap_or_else(|e| {
            tracing::warn!(%target, %id, error = %e, "unreadable delivery record; its attempt count restarts");
            None
        })
        .unwrap_or_else(|| DeliveryRecord::pending(now_ms));
    record.state = DeliveryState::Pending { due_ms: now_ms };
    json(&record)
}

/// Puts a requeued delivery that had ended at the end of its key's queue,
/// in a chunk of its own. Returns its new place, and whether it is the head
/// (then it is due at once; else it is held).
pub fn rejoin(
    db: &::sled::Db,
    batch: &mut ::sled::Batch,
    tally: &mut Tally,
    target: &str,
    order_key: &str,
    id: EventId,
) -> Result<(EventId, bool), StoreError> {
    let prefix = order_prefix(target, order_key);
    let (mut last_chunk, mut last_seq) = (None, None);
    if let Some(item) = db.scan_prefix(&prefix).next_back() {
        let (ck, v) = item?;
        last_chunk = Some(chunk_number(&prefix, &ck));
        last_seq = entries(&ck, &v)?.last().map(|e| e.0);
    }
    let behind = last_chunk.is_some();
    // After every place taken, even if the clock went back.
    let mut seq = EventId::new();
    if let Some(last) = last_seq.filter(|l| *l >= seq) {
        seq = EventId(uuid::Uuid::from_u128(last.0.as_u128().wrapping_add(1)));
    }
    batch.insert(chunk_key(&prefix, last_chunk.map_or(0, |c| c + 1)), pack(&[(seq, id)]));
    if behind {
        tally.held(target, 1);
    }
    Ok((seq, !behind))
}

/// The batch that closes the debounce group whose newest event `id` was
/// handed out from the queue at `due_ms`: the group's other events end
/// coalesced into it, and it becomes a plain queued delivery standing for
/// them all. `None` when the group changed since (a newer event joined).
pub fn plan_close(
    db: &::sled::Db,
    tally: &mut Tally,
    target: &str,
    group_of: &str,
    id: EventId,
    due_ms: u64,
    now_ms: u64,
) -> Result<Option<(::sled::Batch, u32)>, StoreError> {
    let qkey = queue_key(target, due_ms, id);
    if db.get(&qkey)?.as_deref() != Some(GROUP_MARK) {
        return Ok(None);
    }
    let gkey = group_key(target, group_of);
    let Some(group) = get_json::<Group>(db, &gkey)? else { return Ok(None) };
    if group.newest_id(&gkey)? != id {
        return Ok(None);
    }
    let mut batch = ::sled::Batch::default();
    let prefix = member_prefix(target, group_of);
    let into = id.to_string();
    let mut stands_for = 1;
    for item in db.scan_prefix(&prefix).keys() {
        let k = item?;
        batch.remove(k.clone());
        tally.held(target, -1);
        let Some(member) = k.get(prefix.len()..).and_then(EventId::from_slice) else { continue };
        let dkey = delivery_key(target, member);
        // The newest is the group's delivery; a member requeued on its own
        // (a redeliver) is delivered on its own.
        if member == id || db.contains_key(&dkey)? {
            continue;
        }
        let record = DeliveryRecord {
            state: DeliveryState::Coalesced { at_ms: now_ms, into: into.clone() },
            ..DeliveryRecord::pending(now_ms)
        };
        batch.insert(dkey, json(&record)?);
        tally.add(target, -1, 0);
        stands_for += 1;
    }
    batch.remove(gkey);
    batch.insert(closed_key(target, group_of), id.as_bytes().to_vec());
    batch.insert(qkey, Vec::new());
    let record = DeliveryRecord { coalesced: stands_for, ..DeliveryRecord::pending(due_ms) };
    batch.insert(delivery_key(target, id), json(&record)?);
    Ok(Some((batch, stands_for)))
}
