//! Retry as data: what an attempt's result means, and when to try again.

use std::time::Duration;

use crate::config::RetryPolicy;
use crate::store::NextStep;

/// What one attempt's result says about the delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// 2xx.
    Success,
    /// Connection error, timeout, 408, 429, 5xx; `after` from `Retry-After`
    /// on 429 and 503.
    Retry { after: Option<Duration> },
    /// 410 Gone: hold the target's queue until an operator resumes it.
    Pause,
    /// Any other status: the target will never take it.
    Permanent,
}

/// Classifies an HTTP status. `retry_after` is the parsed header, if any.
pub fn classify(status: u16, retry_after: Option<Duration>) -> Verdict {
    match status {
        200..=299 => Verdict::Success,
        429 | 503 => Verdict::Retry { after: retry_after },
        408 | 500..=599 => Verdict::Retry { after: None },
        410 => Verdict::Pause,
        _ => Verdict::Permanent,
    }
}

/// Parses `Retry-After`: delay-seconds or an HTTP date.
pub fn parse_retry_after(value: &str, now: std::time::SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Full-jitter exponential backoff: a uniform delay between 0 and
/// `min(max_backoff, initial_backoff * 2^(attempt-1))`. `unit` is a random
/// number in [0, 1).
pub fn backoff(policy: &RetryPolicy, attempt: u32, unit: f64) -> Duration {
    let exp = attempt.saturating_sub(1).min(32);
    let cap = policy.initial_backoff.saturating_mul(1u32 << exp.min(31)).min(policy.max_backoff);
    cap.mul_f64(unit.clamp(0.0, 1.0))
}

/// What to do after attempt number `attempt` (from 1) of a delivery whose
/// event was received at `received_ms`, at `now_ms`.
pub fn next_step(
    policy: &RetryPolicy,
    verdict: &Verdict,
    attempt: u32,
    received_ms: u64,
    now_ms: u64,
    unit: f64,
) -> NextStep {
    match verdict {
        Verdict::Success => NextStep::Delivered,
        Verdict::Pause => NextStep::Hold,
        Verdict::Permanent => NextStep::Dead("permanent failure: the target refused it".into()),
        Verdict::Retry { after } => {
            if attempt >= policy.max_attempts {
                return NextStep::Dead(format!("gave up after {attempt} attempts (max_attempts)"));
            }
            let age = Duration::from_millis(now_ms.saturating_sub(received_ms));
            if age >= policy.max_age {
                return NextStep::Dead(format!(
                    "undelivered after {} (max_age)",
                    humantime::format_duration(policy.max_age)
                ));
            }
            // A `Retry-After` is the least the target asks to wait: it
            // lengthens the backoff, never shortens it (a `0`, or a date
            // already past on a target whose clock is behind, would
            // otherwise spend the attempts at once).
            let own = backoff(policy, attempt, unit);
            let delay = after.map_or(own, |d| d.max(own)).min(policy.max_backoff);
            NextStep::RetryAt(now_ms.saturating_add(delay.as_millis() as u64))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
            max_age: Duration::from_secs(3600),
        }
    }

    #[test]
    fn statuses_classify_as_the_contract_says() {
        assert_eq!(classify(200, None), Verdict::Success);
        assert_eq!(classify(204, None), Verdict::Success);
        for s in [408, 500, 502, 504] {
            assert_eq!(classify(s, Some(Duration::from_secs(9))), Verdict::Retry { after: None }, "{s}");
        }
        assert_eq!(classify(429, Some(Duration::from_secs(9))), Verdict::Retry { after: Some(Duration::from_secs(9)) });
        assert_eq!(classify(503, None), Verdict::Retry { after: None });
        assert_eq!(classify(410, None), Verdict::Pause);
        for s in [400, 401, 403, 404, 413, 422, 301] {
            assert_eq!(classify(s, None), Verdict::Permanent, "{s}");
        }
    }

    #[test]
    fn retry_after_takes_seconds_or_a_date() {
        let now = httpdate::parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT").unwrap();
        assert_eq!(parse_retry_after("120", now), Some(Duration::from_secs(120)));
        assert_eq!(parse_retry_after("Sun, 06 Nov 1994 08:50:07 GMT", now), Some(Duration::from_secs(30)));
        assert_eq!(parse_retry_after("Sun, 06 Nov 1994 08:00:00 GMT", now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_with_full_jitter() {
        let p = policy();
        assert_eq!(backoff(&p, 1, 0.999_999).as_millis(), 999);
        assert_eq!(backoff(&p, 3, 0.5), Duration::from_secs(2));
        assert_eq!(backoff(&p, 20, 1.0), Duration::from_secs(60));
        assert_eq!(backoff(&p, 200, 1.0), Duration::from_secs(60));
        assert_eq!(backoff(&p, 4, 0.0), Duration::ZERO);
    }

    #[test]
    fn next_step_ends_in_dead_letters_at_max_attempts_and_max_age() {
        let p = policy();
        let retry = Verdict::Retry { after: None };
        assert_eq!(next_step(&p, &retry, 2, 0, 1_000, 0.5), NextStep::RetryAt(2_000));
        assert!(matches!(next_step(&p, &retry, 5, 0, 1_000, 0.5), NextStep::Dead(r) if r.contains("max_attempts")));
        assert!(matches!(next_step(&p, &retry, 2, 0, 3_600_000, 0.5), NextStep::Dead(r) if r.contains("max_age")));
        assert!(matches!(next_step(&p, &Verdict::Permanent, 1, 0, 1, 0.5), NextStep::Dead(_)));
        assert_eq!(next_step(&p, &Verdict::Success, 9, 0, 1, 0.5), NextStep::Delivered);
        assert_eq!(next_step(&p, &Verdict::Pause, 1, 0, 1, 0.5), NextStep::Hold);
    }

    #[test]
    fn retry_after_is_honoured_but_capped_at_max_backoff() {
        let p = policy();
        let after = |s| Verdict::Retry { after: Some(Duration::from_secs(s)) };
        assert_eq!(next_step(&p, &after(30), 1, 0, 1_000, 0.0), NextStep::RetryAt(31_000));
        assert_eq!(next_step(&p, &after(3_000), 1, 0, 1_000, 0.0), NextStep::RetryAt(61_000));
    }

    #[test]
    fn a_retry_after_shorter_than_the_backoff_does_not_shorten_it() {
        let p = policy();
        let after = |s| Verdict::Retry { after: Some(Duration::from_secs(s)) };
        // Attempt 4 with jitter 0.5: our own backoff is 4 s.
        assert_eq!(next_step(&p, &after(0), 4, 0, 1_000, 0.5), NextStep::RetryAt(5_000));
        assert_eq!(next_step(&p, &after(1), 4, 0, 1_000, 0.5), NextStep::RetryAt(5_000));
        assert_eq!(next_step(&p, &after(9), 4, 0, 1_000, 0.5), NextStep::RetryAt(10_000));
    }
}
