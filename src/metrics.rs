//! The Prometheus metrics (README, "Metrics"), registered once; every metric name lives here.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};

use prometheus::{
    exponential_buckets, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Every metric hookrelay exports.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// `source`, `outcome` (accepted, duplicate, unauthorized, forbidden, invalid, too_large, unavailable).
    pub ingress_requests: IntCounterVec,
    /// Request arrival to acknowledgement, per `source`.
    pub ingress_ack_seconds: HistogramVec,
    /// `target`, `outcome` (delivered, retried, dead, skipped, coalesced).
    pub deliveries: IntCounterVec,
    pub delivery_attempt_seconds: HistogramVec,
    /// Receipt to successful delivery, per `target`.
    pub delivery_lag_seconds: HistogramVec,
    pub queue_depth: IntGaugeVec,
    pub dead_letters: IntGaugeVec,
    /// Queued deliveries waiting for an earlier one of their key, or for their group's time.
    pub held_deliveries: IntGaugeVec,
    /// 0 closed, 1 half-open, 2 open.
    pub circuit_state: IntGaugeVec,
    pub rate_limited: IntCounterVec,
    /// Route filters that failed (the route then matched), per `source`.
    pub filter_errors: IntCounterVec,
    /// Transforms that failed (the delivery then went to the dead letters), per `target`.
    pub transform_errors: IntCounterVec,
    /// The last hour, minute by minute, for the console.
    pub stats: Arc<Stats>,
}

/// The label values of `hookrelay_ingress_requests_total{outcome}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IngressOutcome {
    Accepted,
    Duplicate,
    Unauthorized,
    Forbidden,
    Invalid,
    TooLarge,
    Unavailable,
}

impl IngressOutcome {
    pub const ALL: [IngressOutcome; 7] = [
        IngressOutcome::Accepted,
        IngressOutcome::Duplicate,
        IngressOutcome::Unauthorized,
        IngressOutcome::Forbidden,
        IngressOutcome::Invalid,
        IngressOutcome::TooLarge,
        IngressOutcome::Unavailable,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            IngressOutcome::Accepted => "accepted",
            IngressOutcome::Duplicate => "duplicate",
            IngressOutcome::Unauthorized => "unauthorized",
            IngressOutcome::Forbidden => "forbidden",
            IngressOutcome::Invalid => "invalid",
            IngressOutcome::TooLarge => "too_large",
            IngressOutcome::Unavailable => "unavailable",
        }
    }
}

/// The label values of `hookrelay_deliveries_total{outcome}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryOutcome {
    Delivered,
    Retried,
    Dead,
    /// The target's transform gave no output: nothing was sent.
    Skipped,
    /// One of a debounce group's events, delivered as the group's newest.
    Coalesced,
}

impl DeliveryOutcome {
    pub const ALL: [DeliveryOutcome; 5] = [
        DeliveryOutcome::Delivered,
        DeliveryOutcome::Retried,
        DeliveryOutcome::Dead,
        DeliveryOutcome::Skipped,
        DeliveryOutcome::Coalesced,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryOutcome::Delivered => "delivered",
            DeliveryOutcome::Retried => "retried",
            DeliveryOutcome::Dead => "dead",
            DeliveryOutcome::Skipped => "skipped",
            DeliveryOutcome::Coalesced => "coalesced",
        }
    }
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| -> Result<IntCounterVec, prometheus::Error> {
            let c = IntCounterVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let gauge = |name: &str, help: &str| -> Result<IntGaugeVec, prometheus::Error> {
            let g = IntGaugeVec::new(Opts::new(name, help), &["target"])?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let histogram =
            |name: &str, help: &str, label: &str, buckets: Vec<f64>| -> Result<HistogramVec, prometheus::Error> {
                let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), &[label])?;
                registry.register(Box::new(h.clone()))?;
                Ok(h)
            };
        Ok(Metrics {
            ingress_requests: counter(
                "hookrelay_ingress_requests_total",
                "Webhook requests received, by source and outcome.",
                &["source", "outcome"],
            )?,
            // 100 µs to ~6.5 s.
            ingress_ack_seconds: histogram(
                "hookrelay_ingress_ack_seconds",
                "Time from request to acknowledgement.",
                "source",
                exponential_buckets(0.0001, 2.0, 17)?,
            )?,
            deliveries: counter(
                "hookrelay_deliveries_total",
                "Delivery attempts by target and outcome.",
                &["target", "outcome"],
            )?,
            delivery_attempt_seconds: histogram(
                "hookrelay_delivery_attempt_seconds",
                "Duration of one delivery attempt.",
                "target",
                exponential_buckets(0.001, 2.0, 16)?,
            )?,
            // 1 ms to ~3 days.
            delivery_lag_seconds: histogram(
                "hookrelay_delivery_lag_seconds",
                "Time from receipt to successful delivery.",
                "target",
                exponential_buckets(0.001, 4.0, 15)?,
            )?,
            queue_depth: gauge("hookrelay_queue_depth", "Deliveries waiting, per target.")?,
            dead_letters: gauge("hookrelay_dead_letters", "Dead-lettered deliveries, per target.")?,
            held_deliveries: gauge(
                "hookrelay_held_deliveries",
                "Queued deliveries waiting for an earlier one of their key, or for their group's time.",
            )?,
            circuit_state: gauge("hookrelay_circuit_state", "Circuit breaker: 0 closed, 1 half-open, 2 open.")?,
            rate_limited: counter(
                "hookrelay_rate_limited_total",
                "Deliveries held back by the target's rate limit.",
                &["target"],
            )?,
            filter_errors: counter(
                "hookrelay_filter_errors_total",
                "Route filters that failed on a webhook (the route matched), by source.",
                &["source"],
            )?,
            transform_errors: counter(
                "hookrelay_transform_errors_total",
                "Transforms that failed on a delivery (dead-lettered), by target.",
                &["target"],
            )?,
            registry,
            stats: Arc::default(),
        })
    }

    /// Exports a source's counters at zero, so that the first request of each
    /// outcome shows as an increase (`increase()` and `rate()` see nothing in
    /// a series' first sample).
    pub fn declare_source(&self, source: &str) {
        for outcome in IngressOutcome::ALL {
            self.ingress_requests.with_label_values(&[source, outcome.as_str()]);
        }
        self.filter_errors.with_label_values(&[source]);
    }

    /// Exports a target's counters at zero (see [`Metrics::declare_source`]).
    pub fn declare_target(&self, target: &str) {
        for outcome in DeliveryOutcome::ALL {
            self.deliveries.with_label_values(&[target, outcome.as_str()]);
        }
        self.rate_limited.with_label_values(&[target]);
        self.transform_errors.with_label_values(&[target]);
        self.held_deliveries.with_label_values(&[target]);
    }

    pub fn ingress(&self, source: &str, outcome: IngressOutcome, seconds: f64) {
        self.ingress_requests.with_label_values(&[source, outcome.as_str()]).inc();
        self.stats.record(|m| count(&mut m.webhooks, source, outcome.as_str(), 1));
        if matches!(outcome, IngressOutcome::Accepted | IngressOutcome::Duplicate) {
            self.ingress_ack_seconds.with_label_values(&[source]).observe(seconds);
        }
    }

    /// Counts `n` deliveries of `target` ending in `outcome`.
    pub fn delivery(&self, target: &str, outcome: DeliveryOutcome, n: u64) {
        self.deliveries.with_label_values(&[target, outcome.as_str()]).inc_by(n);
        self.stats.record(|m| count(&mut m.deliveries, target, outcome.as_str(), n));
    }

    /// Sets a target's queue gauges from the store's counts.
    pub fn queue(&self, target: &str, counts: crate::store::TargetCounts) {
        self.queue_depth.with_label_values(&[target]).set(counts.queued as i64);
        self.dead_letters.with_label_values(&[target]).set(counts.dead as i64);
        self.held_deliveries.with_label_values(&[target]).set(counts.held as i64);
        self.stats.record(|m| {
            m.queued.insert(target.to_string(), counts.queued);
        });
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_else(|e| format!("# encoding metrics failed: {e}\n"))
    }
}

/// Minutes kept by [`Stats`].
pub const STATS_MINUTES: usize = 60;

/// Per-minute counts of the last hour, kept in memory by this instance (a
/// fixed number of minutes, each with an entry per source or target and
/// outcome): what `GET /admin/stats` answers and the console charts.
#[derive(Debug, Default)]
pub struct Stats(Mutex<VecDeque<Minute>>);

/// One minute's counts.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Minute {
    /// Its first millisecond (since the epoch).
    pub start_ms: u64,
    /// Webhooks received, per source and outcome.
    pub webhooks: BTreeMap<String, BTreeMap<String, u64>>,
    /// Deliveries ended or retried, per target and outcome.
    pub deliveries: BTreeMap<String, BTreeMap<String, u64>>,
    /// The queue depth of each target, as last read in the minute.
    pub queued: BTreeMap<String, u64>,
}

fn count(map: &mut BTreeMap<String, BTreeMap<String, u64>>, name: &str, outcome: &str, n: u64) {
    *map.entry(name.to_string()).or_default().entry(outcome.to_string()).or_default() += n;
}

impl Stats {
    fn record(&self, change: impl FnOnce(&mut Minute)) {
        self.record_at(crate::store::now_ms(), change)
    }

    fn record_at(&self, now_ms: u64, change: impl FnOnce(&mut Minute)) {
        let start_ms = now_ms - now_ms % 60_000;
        let mut minutes = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if minutes.back().is_none_or(|m| m.start_ms < start_ms) {
            minutes.push_back(Minute { start_ms, ..Minute::default() });
            while minutes.len() > STATS_MINUTES {
                minutes.pop_front();
            }
        }
        if let Some(m) = minutes.back_mut() {
            change(m);
        }
    }

    /// The last `n` minutes up to the one of `now_ms`, oldest first, one
    /// entry a minute (empty where nothing happened).
    pub fn last(&self, n: usize, now_ms: u64) -> Vec<Minute> {
        let n = n.clamp(1, STATS_MINUTES) as u64;
        let newest = now_ms - now_ms % 60_000;
        let minutes = self.0.lock().unwrap_or_else(|p| p.into_inner());
        (0..n)
            .rev()
            .map(|back| {
                let start_ms = newest.saturating_sub(back * 60_000);
                minutes
                    .iter()
                    .find(|m| m.start_ms == start_ms)
                    .cloned()
                    .unwrap_or(Minute { start_ms, ..Minute::default() })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_labels_follow_the_contract() {
        let m = Metrics::new().unwrap();
        m.ingress("buttercms", IngressOutcome::Accepted, 0.002);
        m.ingress("buttercms", IngressOutcome::TooLarge, 0.0);
        let text = m.render();
        assert!(
            text.contains(r#"hookrelay_ingress_requests_total{outcome="accepted",source="buttercms"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"hookrelay_ingress_requests_total{outcome="too_large",source="buttercms"} 1"#));
        assert!(text.contains(r#"hookrelay_ingress_ack_seconds_count{source="buttercms"} 1"#));
        assert!(text.contains(r#"hookrelay_ingress_ack_seconds_bucket{source="buttercms",le="0.0001"} 0"#));
    }

    #[test]
    fn stats_keep_an_hour_minute_by_minute_in_a_fixed_size() {
        let stats = Stats::default();
        let t0 = 1_800_000_000_000; // a whole minute
        stats.record_at(t0 + 1_000, |m| count(&mut m.webhooks, "cms", "accepted", 1));
        stats.record_at(t0 + 59_000, |m| count(&mut m.webhooks, "cms", "accepted", 2));
        stats.record_at(t0 + 120_000, |m| count(&mut m.deliveries, "site", "delivered", 5));
        let last = stats.last(3, t0 + 130_000);
        assert_eq!(last.iter().map(|m| m.start_ms - t0).collect::<Vec<_>>(), [0, 60_000, 120_000]);
        assert_eq!(last[0].webhooks["cms"]["accepted"], 3);
        assert!(last[1].webhooks.is_empty(), "a quiet minute is there, empty");
        assert_eq!(last[2].deliveries["site"]["delivered"], 5);
        for k in 0..200 {
            stats.record_at(t0 + k * 60_000, |m| count(&mut m.webhooks, "cms", "accepted", 1));
        }
        assert_eq!(stats.0.lock().unwrap().len(), STATS_MINUTES, "never more than an hour");
        assert_eq!(stats.last(1_000, t0).len(), STATS_MINUTES);
    }

    #[test]
    fn declared_sources_and_targets_export_their_counters_at_zero() {
        let m = Metrics::new().unwrap();
        m.declare_source("cometcms");
        m.declare_target("search");
        let text = m.render();
        for outcome in IngressOutcome::ALL {
            let line =
                format!(r#"hookrelay_ingress_requests_total{{outcome="{}",source="cometcms"}} 0"#, outcome.as_str());
            assert!(text.contains(&line), "{line} missing:\n{text}");
        }
        for outcome in ["delivered", "retried", "dead", "skipped", "coalesced"] {
            let line = format!(r#"hookrelay_deliveries_total{{outcome="{outcome}",target="search"}} 0"#);
            assert!(text.contains(&line), "{line} missing:\n{text}");
        }
        assert!(text.contains(r#"hookrelay_rate_limited_total{target="search"} 0"#));
        assert!(text.contains(r#"hookrelay_filter_errors_total{source="cometcms"} 0"#));
        assert!(text.contains(r#"hookrelay_transform_errors_total{target="search"} 0"#));
    }
}
