//! The dedup keys seen within their window, in memory: about 20 bytes a key.
//!
//! An entry is a 64-bit hash of the key and the first 8 bytes of the event's
//! id, which name the millisecond it arrived in. A hit is only a candidate:
//! the caller reads the events of that millisecond and compares their full
//! dedup digest, so a hash collision can never turn a new webhook into a
//! duplicate. Entries are spread over partitions by hash, each in arrival
//! order, so a lookup scans a few hundred entries at most even with a million
//! live keys, and expired entries leave from the front.

use std::collections::VecDeque;

/// Partitions, by the hash's top bits.
const PARTITION_BITS: u32 = 12;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Entry {
    pub hash: u64,
    /// The first 8 bytes of the event id.
    pub stamp: [u8; 8],
}

impl Entry {
    pub const BYTES: usize = 16;

    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.hash.to_be_bytes());
        out.extend_from_slice(&self.stamp);
    }

    /// Entries packed by [`Entry::encode`]; `None` if the length is off.
    pub fn decode_all(b: &[u8]) -> Option<Vec<Entry>> {
        if !b.len().is_multiple_of(Self::BYTES) {
            return None;
        }
        let entries = b.chunks_exact(Self::BYTES).map(|c| {
            let (hash, stamp) = c.split_at(8);
            Entry {
                hash: u64::from_be_bytes(hash.try_into().unwrap_or_default()),
                stamp: stamp.try_into().unwrap_or_default(),
            }
        });
        Some(entries.collect())
    }
}

pub struct DedupIndex {
    partitions: Vec<VecDeque<Entry>>,
    /// The longest window of any entry: an entry older than this is gone.
    window_ms: u64,
}

impl Default for DedupIndex {
    fn default() -> Self {
        DedupIndex { partitions: vec![VecDeque::new(); 1 << PARTITION_BITS], window_ms: 0 }
    }
}

/// When the entry's event arrived (the UUIDv7 timestamp of its id).
fn arrived_ms(stamp: &[u8; 8]) -> u64 {
    u64::from_be_bytes(*stamp) >> 16
}

impl DedupIndex {
    fn partition(hash: u64) -> usize {
        (hash >> (64 - PARTITION_BITS)) as usize
    }

    /// Adds an entry that expires at `expires_ms`. Entries come in arrival order.
    pub fn insert(&mut self, entry: Entry, expires_ms: u64) {
        self.window_ms = self.window_ms.max(expires_ms.saturating_sub(arrived_ms(&entry.stamp)));
        let p = &mut self.partitions[Self::partition(entry.hash)];
        if p.len() == p.capacity() {
            // Grow by a quarter, not double: the partitions fill at the same
            // pace, so doubling would double them all at once.
            p.reserve_exact(p.len() / 4 + 8);
        }
        p.push_back(entry);
    }

    /// The stamps recorded for `hash`, newest first.
    pub fn candidates(&self, hash: u64) -> impl Iterator<Item = [u8; 8]> + '_ {
        self.partitions[Self::partition(hash)].iter().rev().filter(move |e| e.hash == hash).map(|e| e.stamp)
    }

    /// Drops the entries older than the longest window at `now_ms`.
    pub fn evict(&mut self, now_ms: u64) {
        let oldest = now_ms.saturating_sub(self.window_ms);
        for p in &mut self.partitions {
            while p.front().is_some_and(|e| arrived_ms(&e.stamp) < oldest) {
                p.pop_front();
            }
            if p.capacity() > 16 && p.len() < p.capacity() / 4 {
                p.shrink_to(p.len() * 2);
            }
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.partitions.iter().map(|p| p.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An entry of an event that arrived at `ms`.
    fn entry(hash: u64, ms: u64) -> Entry {
        Entry { hash, stamp: (ms << 16 | 0x7000).to_be_bytes() }
    }

    #[test]
    fn finds_every_entry_of_a_hash_newest_first() {
        let mut index = DedupIndex::default();
        for i in 0..20_000u64 {
            index.insert(entry(i.wrapping_mul(0x9E37_79B9_7F4A_7C15), 1_000), 2_000);
        }
        let hash = 42u64.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        index.insert(entry(hash, 1_500), 2_500);
        assert_eq!(
            index.candidates(hash).collect::<Vec<_>>(),
            vec![entry(hash, 1_500).stamp, entry(hash, 1_000).stamp]
        );
        assert_eq!(index.candidates(7).count(), 0);
        assert_eq!(index.len(), 20_001);
    }

    #[test]
    fn evicts_entries_older_than_the_longest_window() {
        let mut index = DedupIndex::default();
        index.insert(entry(1, 1_000), 1_600); // a 600 ms window
        index.insert(entry(2, 1_000), 1_100);
        index.insert(entry(1, 1_500), 2_100);
        index.evict(1_600);
        assert_eq!(index.len(), 3, "nothing is older than 600 ms yet");
        index.evict(1_601);
        assert_eq!(index.candidates(1).collect::<Vec<_>>(), vec![entry(1, 1_500).stamp]);
        assert_eq!(index.len(), 1);
    }

    #[test]
    fn entries_round_trip_and_bad_lengths_are_refused() {
        let mut b = Vec::new();
        entry(u64::MAX - 3, 9).encode(&mut b);
        entry(5, 1).encode(&mut b);
        assert_eq!(Entry::decode_all(&b), Some(vec![entry(u64::MAX - 3, 9), entry(5, 1)]));
        assert_eq!(Entry::decode_all(&b[..17]), None);
    }
}
