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
//! front. The writer sweeps the partitions a few at a time, a whole sweep a
//! second, and not at all while nothing can have expired: a sweep of all
//! 4,096 at once took 2.5–6 ms in a loaded relay (each partition's front a
//! cache miss), a pause of every webhook in that round.

use std::collections::VecDeque;

/// Partitions, by the hash's top bits.
const PARTITION_BITS: u32 = 12;
const PARTITIONS: usize = 1 << PARTITION_BITS;
/// How long a sweep of every partition takes, in steps of [`sweep_budget`].
const SWEEP_MS: u64 = 1_000;

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
    /// No live entry arrived before this: until it is past the window, a
    /// sweep would find nothing.
    oldest_ms: u64,
    /// The partition the sweep in progress goes on from, and the oldest
    /// entry it has left in the partitions before that one (or seen added
    /// to them since).
    sweep_at: usize,
    swept_oldest_ms: u64,
}

impl Window {
    fn new(window_ms: u64) -> Window {
        let partitions = vec![VecDeque::new(); PARTITIONS];
        Window { window_ms, partitions, oldest_ms: u64::MAX, sweep_at: 0, swept_oldest_ms: u64::MAX }
    }

    /// Sweeps up to `budget` partitions, dropping the entries that arrived
    /// before `cutoff_ms`.
    fn evict(&mut self, cutoff_ms: u64, budget: usize) {
        if self.oldest_ms >= cutoff_ms {
            return;
        }
        for _ in 0..budget {
            let Some(p) = self.partitions.get_mut(self.sweep_at) else { break };
            while p.front().is_some_and(|e| arrived_ms(&e.stamp) < cutoff_ms) {
                p.pop_front();
            }
            if p.capacity() > 16 && p.len() < p.capacity() / 4 {
                p.shrink_to(p.len() * 2);
            }
            if let Some(e) = p.front() {
                self.swept_oldest_ms = self.swept_oldest_ms.min(arrived_ms(&e.stamp));
            }
            self.sweep_at += 1;
            if self.sweep_at == PARTITIONS {
                // Every partition seen since the sweep began, and every
                // entry added meanwhile noted: a bound for all of them.
                self.sweep_at = 0;
                self.oldest_ms = std::mem::replace(&mut self.swept_oldest_ms, u64::MAX);
                if self.oldest_ms >= cutoff_ms {
                    break;
                }
            }
        }
    }
}

/// The partitions a sweep may take on after `elapsed_ms` since the last
/// one: a whole sweep per [`SWEEP_MS`], whether rounds come often or not.
pub fn sweep_budget(elapsed_ms: u64) -> usize {
    let budget = elapsed_ms.saturating_mul(PARTITIONS as u64) / SWEEP_MS;
    usize::try_from(budget).unwrap_or(PARTITIONS).min(PARTITIONS)
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
                self.windows.push(Window::new(window_ms));
                self.windows.len() - 1
            }
        };
        let w = &mut self.windows[at];
        let (arrived, at) = (arrived_ms(&entry.stamp), partition(entry.hash));
        w.oldest_ms = w.oldest_ms.min(arrived);
        if at < w.sweep_at {
            // Behind the sweep in progress, which will not see it.
            w.swept_oldest_ms = w.swept_oldest_ms.min(arrived);
        }
        let p = &mut w.partitions[at];
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

    /// Drops entries whose window has passed at `now_ms`, in up to `budget`
    /// partitions of each window ([`sweep_budget`]; all of them for
    /// [`PARTITIONS`]), each sweep going on from where the last one stopped.
    pub fn evict(&mut self, now_ms: u64, budget: usize) {
        for w in &mut self.windows {
            w.evict(now_ms.saturating_sub(w.window_ms), budget);
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
        index.evict(1_100, PARTITIONS);
        assert_eq!(index.len(), 3, "nothing has outlived its window yet");
        index.evict(1_101, PARTITIONS);
        assert_eq!((index.len(), index.candidates(2).count()), (2, 0), "the 100 ms window has passed");
        index.evict(1_601, PARTITIONS);
        assert_eq!(index.candidates(1).collect::<Vec<_>>(), vec![entry(1, 1_500).stamp]);
        assert_eq!(index.len(), 1);
    }

    /// The hash of partition `p`.
    fn in_partition(p: usize) -> u64 {
        (p as u64) << (64 - PARTITION_BITS)
    }

    #[test]
    fn a_sweep_goes_on_from_where_the_last_one_stopped() {
        let mut index = DedupIndex::default();
        for p in 0..PARTITIONS {
            index.insert(entry(in_partition(p), 1_000), 100);
        }
        for left in [3, 2, 1, 0] {
            index.evict(1_101, PARTITIONS / 4);
            assert_eq!(index.len(), left * PARTITIONS / 4);
        }
    }

    #[test]
    fn nothing_is_swept_while_nothing_can_have_expired() {
        let mut index = DedupIndex::default();
        index.insert(entry(in_partition(7), 1_000), 100);
        index.evict(1_100, 10);
        assert_eq!(index.windows[0].sweep_at, 0, "the oldest entry is within its window");
        index.evict(1_101, 10);
        assert_eq!((index.windows[0].sweep_at, index.len()), (10, 0));
        index.evict(1_102, PARTITIONS);
        assert_eq!(index.windows[0].oldest_ms, u64::MAX, "a whole sweep found nothing left");
        index.evict(5_000, 10);
        assert_eq!(index.windows[0].sweep_at, 0, "an empty window is not swept");
    }

    #[test]
    fn an_entry_added_behind_a_sweep_is_still_evicted() {
        let mut index = DedupIndex::default();
        index.insert(entry(in_partition(5), 1_000), 100);
        index.evict(1_101, 2);
        index.insert(entry(in_partition(0), 1_200), 100);
        index.evict(1_102, PARTITIONS);
        assert_eq!(index.candidates(in_partition(5)).count(), 0);
        assert_eq!(index.windows[0].oldest_ms, 1_200, "the entry added to a swept partition bounds the next sweep");
        index.evict(1_301, PARTITIONS);
        assert_eq!(index.len(), 0);
    }

    #[test]
    fn a_whole_sweep_takes_a_second_whatever_the_rounds() {
        assert_eq!(sweep_budget(0), 0);
        assert_eq!(sweep_budget(250), PARTITIONS / 4);
        assert_eq!(sweep_budget(1_000), PARTITIONS);
        assert_eq!(sweep_budget(u64::MAX), PARTITIONS);
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
