//! A target's limits shared by every instance: the arithmetic `due` does
//! under the target's lock, apart from the database.

/// Attempts `due` may start now: what the caller asked, within the
/// concurrency left once every instance's attempts in flight are counted.
pub fn room(limit: usize, concurrency: u32, in_flight: usize) -> usize {
    limit.min((concurrency as usize).saturating_sub(in_flight))
}

/// A token bucket as stored: `tokens` at `at_ms`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bucket {
    pub tokens: f64,
    pub at_ms: i64,
}

impl Bucket {
    /// Refilled at `per_second` since it was stored, up to `burst` (a new
    /// bucket starts full). Its time never goes back: an instance whose
    /// clock is behind another's adds nothing until its clock has passed
    /// the stored time, and leaves that time as it was (written back
    /// earlier, it would have given the instance ahead the same time's
    /// tokens again at its next refill).
    pub fn refilled(stored: Option<Bucket>, now_ms: i64, per_second: u32, burst: u32) -> Bucket {
        let burst = f64::from(burst.max(1));
        match stored {
            None => Bucket { tokens: burst, at_ms: now_ms },
            Some(b) => {
                let elapsed = (now_ms - b.at_ms).max(0) as f64 / 1000.0;
                Bucket { tokens: (b.tokens + elapsed * f64::from(per_second)).min(burst), at_ms: now_ms.max(b.at_ms) }
            }
        }
    }

    /// Whole tokens there are.
    pub fn whole(&self) -> usize {
        self.tokens.max(0.0).floor() as usize
    }

    /// `n` taken.
    pub fn take(self, n: usize) -> Bucket {
        Bucket { tokens: self.tokens - n as f64, ..self }
    }

    /// When the next whole token is there, if none is now.
    pub fn next_token_ms(&self, per_second: u32) -> Option<i64> {
        (self.tokens < 1.0).then(|| {
            let missing = 1.0 - self.tokens;
            self.at_ms + (missing * 1000.0 / f64::from(per_second.max(1))).ceil() as i64
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_counts_every_instances_attempts() {
        assert_eq!(room(10, 4, 0), 4);
        assert_eq!(room(10, 4, 3), 1);
        assert_eq!(room(10, 1, 5), 0, "more in flight than allowed (a lowered limit): none");
        assert_eq!(room(2, 100, 0), 2, "never more than asked");
    }

    #[test]
    fn a_bucket_starts_full_refills_at_the_rate_and_caps_at_the_burst() {
        let b = Bucket::refilled(None, 1_000, 10, 3);
        assert_eq!(b.whole(), 3);
        let b = b.take(3);
        assert_eq!(b.whole(), 0);
        assert_eq!(b.next_token_ms(10), Some(1_100), "one token per 100 ms");
        let later = Bucket::refilled(Some(b), 1_250, 10, 3);
        assert_eq!(later.whole(), 2);
        let much_later = Bucket::refilled(Some(later), 60_000, 10, 3);
        assert_eq!(much_later.whole(), 3, "capped at the burst");
        assert_eq!(much_later.next_token_ms(10), None);
        let clock_back = Bucket::refilled(Some(b), 500, 10, 3);
        assert_eq!(clock_back.whole(), 0, "a clock going back adds nothing");
        assert_eq!(clock_back.at_ms, 1_000, "and leaves the stored time");
    }

    /// Two instances, one's clock 100 ms ahead, refilling in turn at 100/s
    /// with a burst of 10 for 10 s of real time: the tokens they see in all
    /// are about the rate's, not a burst every time the one behind wrote.
    #[test]
    fn instances_whose_clocks_differ_share_one_rate() {
        let (mut bucket, mut taken) = (Bucket::refilled(None, 0, 100, 10).take(10), 0);
        for real in (10..=10_000).step_by(10) {
            for skew in [100, 0] {
                let b = Bucket::refilled(Some(bucket), real + skew, 100, 10);
                taken += b.whole();
                bucket = b.take(b.whole());
            }
        }
        assert!((990..=1_011).contains(&taken), "{taken} tokens in 10 s at 100/s");
    }
}
