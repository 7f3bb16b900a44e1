//! What the store holds: events, their deliveries, and the attempts made.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::ingress::auth::Verified;
use crate::ingress::formats::Parsed;

/// An event's id: a UUIDv7, so ids sort by arrival time. Sent to targets as `webhook-id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EventId(pub uuid::Uuid);

impl EventId {
    pub fn new() -> Self {
        EventId(uuid::Uuid::now_v7())
    }
    pub fn as_bytes(&self) -> &[u8; 16] {
        self.0.as_bytes()
    }
    pub fn from_slice(b: &[u8]) -> Option<Self> {
        uuid::Uuid::from_slice(b).ok().map(EventId)
    }
}

impl Default for EventId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "evt_{}", self.0.simple())
    }
}

impl FromStr for EventId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let hex = s.strip_prefix("evt_").unwrap_or(s);
        uuid::Uuid::try_parse(hex).map(EventId).map_err(|_| format!("{s:?} is not an event id"))
    }
}

/// The digest that identifies a webhook within its source's dedup window.
pub fn dedup_digest(source: &str, dedup: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(source.as_bytes());
    h.update([0]);
    h.update(dedup.as_bytes());
    h.finalize().into()
}

/// A dedup digest in JSON: a hex string. Records written before it was
/// one hold an array of numbers (read 32 numbers at a time on every read of
/// the event, far slower), and are still read.
pub mod digest_hex {
    use serde::de::{self, SeqAccess, Visitor};
    use serde::{Deserializer, Serializer};
    use std::fmt;

    pub fn serialize<S: Serializer>(digest: &[u8], s: S) -> Result<S::Ok, S::Error> {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut out = [0u8; 64];
        for (pair, b) in out.chunks_exact_mut(2).zip(digest) {
            pair[0] = HEX[usize::from(b >> 4)];
            pair[1] = HEX[usize::from(b & 15)];
        }
        let text = std::str::from_utf8(&out[..2 * digest.len().min(32)]).map_err(serde::ser::Error::custom)?;
        s.serialize_str(text)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        d.deserialize_any(DigestVisitor)
    }

    struct DigestVisitor;

    impl<'de> Visitor<'de> for DigestVisitor {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a digest in hex, or an array of bytes")
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<Vec<u8>, E> {
            let nibble = |c: u8| match c {
                b'0'..=b'9' => Ok(c - b'0'),
                b'a'..=b'f' => Ok(c - b'a' + 10),
                _ => Err(E::custom(format!("{v:?} is not lowercase hex"))),
            };
            if !v.len().is_multiple_of(2) {
                return Err(E::custom(format!("{v:?} has an odd number of hex digits")));
            }
            v.as_bytes().chunks_exact(2).map(|p| Ok((nibble(p[0])? << 4) | nibble(p[1])?)).collect()
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            let mut out = Vec::with_capacity(32);
            while let Some(b) = seq.next_element::<u8>()? {
                out.push(b);
            }
            Ok(out)
        }
    }
}

/// Whole seconds since the Unix epoch at `at` (0 before it).
pub fn unix_secs(at: SystemTime) -> i64 {
    at.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO).as_secs() as i64
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO).as_millis() as u64
}

/// A webhook ready to be stored. It can only be made from a [`Verified`]
/// body, so nothing unauthenticated reaches the store.
#[derive(Debug)]
pub struct NewEvent {
    pub(crate) id: EventId,
    pub(crate) source: String,
    pub(crate) event: String,
    pub(crate) dedup_key: String,
    pub(crate) dedup_window: Duration,
    pub(crate) content_type: Option<String>,
    pub(crate) body: Bytes,
    pub(crate) targets: Vec<String>,
    pub(crate) received_ms: u64,
    /// The targets among `targets` whose deliveries are sequenced.
    pub(crate) sequenced: Vec<(String, Sequenced)>,
}

/// How one delivery of an event is sequenced, decided at ingest from its
/// target's `order_by` or `debounce`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sequenced {
    /// Not attempted while an earlier delivery of the same key to the target
    /// is pending.
    Ordered { key: String },
    /// One of the target's debounce group `key` (empty: the target's one group).
    Grouped { key: String, window_ms: u64, max_wait_ms: u64 },
}

impl NewEvent {
    pub fn new(
        source: &crate::config::Source,
        verified: Verified,
        parsed: Parsed,
        content_type: Option<String>,
        targets: Vec<String>,
    ) -> Self {
        NewEvent {
            id: EventId::new(),
            source: source.name.clone(),
            event: parsed.event,
            dedup_key: parsed.dedup_key,
            dedup_window: source.dedup_window,
            content_type,
            body: verified.into_body(),
            targets,
            received_ms: now_ms(),
            sequenced: Vec::new(),
        }
    }

    /// With how each of these targets' deliveries is sequenced.
    pub fn with_sequencing(mut self, sequenced: Vec<(String, Sequenced)>) -> Self {
        self.sequenced = sequenced;
        self
    }
}

/// What [`crate::store::Store::ingest`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ingested {
    /// Stored, with this many deliveries.
    Accepted { id: EventId, targets: usize },
    /// Seen within the dedup window: the first event's id.
    Duplicate { id: EventId },
}

/// An event as stored, without its body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventMeta {
    pub source: String,
    pub event: String,
    pub received_ms: u64,
    pub content_type: Option<String>,
    pub targets: Vec<String>,
    /// The SHA-256 of its source and dedup key: what a later webhook is
    /// compared with.
    #[serde(default, with = "digest_hex")]
    pub dedup: Vec<u8>,
    /// Per target with `order_by`: the delivery's key.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub order: BTreeMap<String, String>,
    /// Per target with `debounce`: the key of the group the event joined.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub group: BTreeMap<String, String>,
}

/// A page of [`super::Store::events_before`], newest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventsPage {
    pub events: Vec<(EventId, EventMeta)>,
    /// Where the next page starts (the last event examined); `None` at the end.
    pub next_before: Option<EventId>,
}

/// An event with its body, byte for byte as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    pub id: EventId,
    pub meta: EventMeta,
    pub body: Bytes,
}

/// One event's delivery to one target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub event_id: EventId,
    pub target: String,
    pub record: DeliveryRecord,
    /// Pending behind this earlier delivery of the same key (`order_by`).
    pub waiting_for: Option<EventId>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryRecord {
    pub state: DeliveryState,
    /// The latest attempts, at most [`MAX_ATTEMPTS_KEPT`].
    pub attempts: Vec<Attempt>,
    /// Attempts that count toward `max_attempts`: not 410 holds, and none
    /// from before an operator requeued it.
    #[serde(default)]
    pub tries: u32,
    /// Every attempt ever made; numbers `x-hookrelay-attempt`.
    #[serde(default)]
    pub made: u32,
    /// The events this delivery stands for when it closed a debounce group
    /// (itself included); sent as `x-hookrelay-coalesced`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub coalesced: u32,
    /// Its place in its key's queue (`order_by`) since a requeue; before
    /// one, the event's id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order_seq: Option<String>,
}

impl DeliveryRecord {
    /// Records an attempt and, when the delivery is still where it was
    /// handed out (`current`: not requeued by an operator meanwhile), moves
    /// it on to `next` at `now_ms`. A 410 hold is made but not counted
    /// toward `max_attempts`; only the newest [`MAX_ATTEMPTS_KEPT`] are kept.
    pub fn attempted(&mut self, attempt: Attempt, next: &NextStep, current: bool, now_ms: u64) {
        self.attempts.push(attempt);
        self.made += 1;
        if *next != NextStep::Hold {
            self.tries += 1;
        }
        if self.attempts.len() > MAX_ATTEMPTS_KEPT {
            let excess = self.attempts.len() - MAX_ATTEMPTS_KEPT;
            self.attempts.drain(..excess);
        }
        if current {
            self.state = match next {
                NextStep::Delivered => DeliveryState::Delivered { at_ms: now_ms },
                NextStep::Skipped => DeliveryState::Skipped { at_ms: now_ms },
                NextStep::RetryAt(at) => DeliveryState::Pending { due_ms: *at },
                NextStep::Hold => DeliveryState::Pending { due_ms: now_ms },
                NextStep::Dead(reason) => DeliveryState::Dead { at_ms: now_ms, reason: reason.clone() },
            };
        }
    }
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl DeliveryRecord {
    /// A delivery not tried yet.
    pub fn pending(due_ms: u64) -> Self {
        DeliveryRecord {
            state: DeliveryState::Pending { due_ms },
            attempts: Vec::new(),
            tries: 0,
            made: 0,
            coalesced: 0,
            order_seq: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum DeliveryState {
    /// Waiting to be attempted at or after `due_ms`.
    Pending {
        due_ms: u64,
    },
    Delivered {
        at_ms: u64,
    },
    Dead {
        at_ms: u64,
        reason: String,
    },
    /// The target's transform gave no output: nothing was sent, by design.
    Skipped {
        at_ms: u64,
    },
    /// Its debounce group was delivered as the group's newest event, `into`.
    Coalesced {
        at_ms: u64,
        into: String,
    },
}

impl DeliveryState {
    /// Delivered, dead, skipped or coalesced: nothing more happens to it.
    pub fn is_finished(&self) -> bool {
        !matches!(self, DeliveryState::Pending { .. })
    }
}

/// One try at delivering.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    pub at_ms: u64,
    pub duration_ms: u64,
    /// The target's HTTP status, when it answered.
    pub status: Option<u16>,
    /// What went wrong, when it did not answer.
    pub error: Option<String>,
}

/// A delivery that is due now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DueDelivery {
    pub event_id: EventId,
    /// Its queue position; handed back to [`crate::store::Store::complete`].
    pub due_ms: u64,
    /// Attempts so far that count toward `max_attempts`.
    pub tries: u32,
    /// Attempts made so far, all told.
    pub made: u32,
    /// Handed out from the queue of later attempts, not a first attempt.
    pub queued: bool,
    /// The newest event of a debounce group: [`crate::store::Store::close_group`]
    /// closes the group before its attempt.
    pub group: bool,
    /// The events it stands for, once its group is closed (0: no group).
    pub coalesced: u32,
    /// The event, when the store read it to hand the delivery out
    /// (PostgreSQL's hand-outs, sled's first attempts): the attempt reads
    /// it again only when `None`.
    pub event: Option<Arc<StoredEvent>>,
}

/// What [`crate::store::Store::due`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DueBatch {
    pub due: Vec<DueDelivery>,
    /// When the first delivery not yet due becomes due.
    pub next_due_ms: Option<u64>,
    /// Fewer were handed out than asked for because of the limits the
    /// instances share (concurrency, rate, circuit), not because nothing
    /// more was due: more may be waiting.
    pub limited: bool,
}

/// What happens to a delivery after an attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NextStep {
    Delivered,
    /// Try again at this time (ms since the epoch).
    RetryAt(u64),
    /// Give up: into the dead letters, with the reason.
    Dead(String),
    /// Keep it pending, due now, without counting against it (target paused).
    Hold,
    /// Finished without sending: the transform gave no output.
    Skipped,
}

/// A dead-lettered delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub event_id: EventId,
    pub target: String,
    pub reason: String,
    /// When it died.
    pub at_ms: u64,
    /// The last attempt, with its status or error.
    pub last_attempt: Option<Attempt>,
}

/// A target's limits over every instance sharing a store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Share {
    /// Attempts in flight at once.
    pub concurrency: u32,
    /// Attempts started per second, and the burst.
    pub rate: Option<(u32, u32)>,
    /// The longest an attempt may take (the target's `timeout`): what a
    /// delivery handed out is kept from other instances for, with margin.
    pub attempt: std::time::Duration,
}

/// How many deliveries of one target wait, and how many are dead.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TargetCounts {
    pub queued: u64,
    pub dead: u64,
    /// Of the queued: waiting for an earlier delivery of their key, or for
    /// their group's time.
    pub held: u64,
}

/// Stored attempts per delivery at most; older ones are dropped first.
pub const MAX_ATTEMPTS_KEPT: usize = 100;

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(dedup: Vec<u8>) -> EventMeta {
        EventMeta {
            source: "cms".into(),
            event: "page.published".into(),
            received_ms: 1,
            content_type: None,
            targets: vec!["a".into()],
            dedup,
            order: BTreeMap::new(),
            group: BTreeMap::new(),
        }
    }

    #[test]
    fn a_dedup_digest_is_written_in_hex_and_read_back() {
        let digest = dedup_digest("cms", "page-1").to_vec();
        let json = serde_json::to_string(&meta(digest.clone())).unwrap();
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        assert!(json.contains(&format!(r#""dedup":"{hex}""#)), "{json}");
        assert_eq!(serde_json::from_str::<EventMeta>(&json).unwrap().dedup, digest);
    }

    #[test]
    fn a_dedup_digest_stored_as_an_array_of_bytes_is_still_read() {
        let digest = dedup_digest("cms", "page-1").to_vec();
        let old = serde_json::json!({
            "source": "cms", "event": "page.published", "received_ms": 1, "content_type": null,
            "targets": ["a"], "dedup": digest,
        });
        assert_eq!(serde_json::from_value::<EventMeta>(old).unwrap().dedup, digest);
        let none =
            serde_json::json!({"source": "cms", "event": "e", "received_ms": 1, "content_type": null, "targets": []});
        assert!(serde_json::from_value::<EventMeta>(none).unwrap().dedup.is_empty());
    }

    #[test]
    fn a_dedup_digest_that_is_not_hex_is_refused_by_value() {
        for bad in [r#""0g""#, r#""abc""#, r#""AB""#, "7"] {
            let json = format!(
                r#"{{"source":"cms","event":"e","received_ms":1,"content_type":null,"targets":[],"dedup":{bad}}}"#
            );
            let err = serde_json::from_str::<EventMeta>(&json).unwrap_err().to_string();
            assert!(err.contains("hex") || err.contains("digest"), "{bad}: {err}");
        }
    }
}
