//! The dedup keys seen within their window, in memory: about 20 bytes a key.
//!
//! An entry is a 64-bit hash of the key and the first 8 bytes of the event's
//! id (the millisecond it arrived in, and 16 more bits). A hit is only a
//! candidate: the caller reads the events whose ids start with those bytes
//! and compares their full
//! dedup digest, so a hash collision can never turn a new webhook into a
//! duplicate. Entries are kept per dedup window, spread over partitions by
//! hash, each in arrival order, so a lookup scans a few hundred entries at
//! most even with a million live keys, and expired entries leave from the
//! front.

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
            Entry { hash: super::layout::be_u64(hash), stamp: stamp.try_into().unwrap_or_default() }
        });
        Some(entries.collect())
    }
}

/// The entries of one dedup window, partitioned by hash, each partition in
/// arrival order (so expired entries leave from the front).
struct Window {
    window_ms: u64,
    partitions: Vec<VecDeque<Entry>>,
}

/// One [`Window`] per distinct `dedup_window`, so that a source with a long
/// window does not keep every other source's keys as long.
#[derive(Default)]
pub struct DedupIndex {
    windows: Vec<Window>,
}

/// When the entry's event arrived (the UUIDv7 timestamp of its id).
fn arrived_ms(stamp: &[u8; 8]) -> u64 {
    u64::from_be_bytes(*stamp) >> 16
}

fn partition(hash: u64) -> usize {
    (hash >> (64 - PARTITION_BITS)) as usize
}

impl DedupIndex {
    /// Adds the entry of an event whose dedup window is `window_ms`. Entries
    /// of one window come in arrival order.
    pub fn insert(&mut self, entry: Entry, window_ms: u64) {
        let at = match self.windows.iter().position(|w| w.window_ms == window_ms) {
            Some(at) => at,
            None => {
                self.windows.push(Window { window_ms, partitions: vec![VecDeque::new(); 1 << PARTITION_BITS] });
                self.windows.len() - 1
            }
        };
        let p = &mut self.windows[at].partitions[partition(entry.hash)];
        if p.len() == p.capacity() {
            // Grow by a quarter, not double: the partitions fill at the same
            // pace, so doubling would double them all at once.
            p.reserve_exact(p.len() / 4 + 8);
        }
        p.push_back(entry);
    }

    /// The stamps recorded for `hash`.
    pub fn candidates(&self, hash: u64) -> impl Iterator<Item = [u8; 8]> + '_ {
        self.windows
            .iter()
            .flat_map(move |w| w.partitions[partition(hash)].iter().rev())
            .filter(move |e| e.hash == hash)
            .map(|e| e.stamp)
    }

    /// Drops the entries whose window has passed at `now_ms`.
    pub fn evict(&mut self, now_ms: u64) {
        for w in &mut self.windows {
            let oldest = now_ms.saturating_sub(w.window_ms);
            for p in &mut w.partitions {
                while p.front().is_some_and(|e| arrived_ms(&e.stamp) < oldest) {
                    p.pop_front();
                }
                if p.capacity() > 16 && p.len() < p.capacity() / 4 {
                    p.shrink_to(p.len() * 2);
                }
            }
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.windows.iter().flat_map(|w| &w.partitions).map(|p| p.len()).sum()
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
            index.insert(entry(i.wrapping_mul(0x9E37_79B9_7F4A_7C15), 1_000), 1_000);
        }
        let hash = 42u64.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        index.insert(entry(hash, 1_500), 1_000);
        assert_eq!(
            index.candidates(hash).collect::<Vec<_>>(),
            vec![entry(hash, 1_500).stamp, entry(hash, 1_000).stamp]
        );
        assert_eq!(index.candidates(7).count(), 0);
        assert_eq!(index.len(), 20_001);
    }

    #[test]
    fn evicts_each_entry_once_its_own_window_has_passed() {
        let mut index = DedupIndex::default();
        index.insert(entry(1, 1_000), 600);
        index.insert(entry(2, 1_000), 100);
        index.insert(entry(1, 1_500), 600);
        index.evict(1_100);
        assert_eq!(index.len(), 3, "nothing has outlived its window yet");
        index.evict(1_101);
        assert_eq!((index.len(), index.candidates(2).count()), (2, 0), "the 100 ms window has passed");
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
