//! The circuit breaker: a small state machine that owns its state.
//! Closed → open after `failure_threshold` consecutive failures → after
//! `open_for`, half-open with one probe → closed on its success, open again
//! on its failure.

use std::time::{Duration, Instant};

use crate::config::BreakerSettings;
use crate::store::EventId;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitState {
    Closed,
    Open,
    HalfOpen,
}

impl CircuitState {
    /// The value of `hookrelay_circuit_state`.
    pub fn gauge(self) -> i64 {
        match self {
            CircuitState::Closed => 0,
            CircuitState::HalfOpen => 1,
            CircuitState::Open => 2,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            CircuitState::Closed => "closed",
            CircuitState::Open => "open",
            CircuitState::HalfOpen => "half_open",
        }
    }
}

#[derive(Debug)]
enum State {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// Half-open; `probe`: the delivery sent as the one probe, while in flight.
    HalfOpen {
        probe: Option<EventId>,
    },
}

/// What the breaker allows now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permit {
    /// Send as many as other limits allow.
    Open,
    /// Send exactly one, the probe.
    Probe,
    /// Send nothing until then (or until the probe in flight reports).
    Wait(Option<Instant>),
}

#[derive(Debug)]
pub struct Breaker {
    settings: BreakerSettings,
    state: State,
}

impl Breaker {
    pub fn new(settings: BreakerSettings) -> Self {
        Breaker { settings, state: State::Closed { failures: 0 } }
    }

    /// New thresholds from a reload; the current state stays.
    pub fn set_settings(&mut self, settings: BreakerSettings) {
        self.settings = settings;
    }

    pub fn state(&self, now: Instant) -> CircuitState {
        match self.state {
            State::Closed { .. } => CircuitState::Closed,
            State::Open { until } if now < until => CircuitState::Open,
            State::Open { .. } | State::HalfOpen { .. } => CircuitState::HalfOpen,
        }
    }

    pub fn permit(&mut self, now: Instant) -> Permit {
        match self.state {
            State::Closed { .. } => Permit::Open,
            State::Open { until } if now < until => Permit::Wait(Some(until)),
            State::Open { .. } => {
                self.state = State::HalfOpen { probe: None };
                Permit::Probe
            }
            State::HalfOpen { probe: None } => Permit::Probe,
            State::HalfOpen { probe: Some(_) } => Permit::Wait(None),
        }
    }

    /// Delivery `id` was sent while half-open: it is the probe.
    pub fn on_dispatch(&mut self, id: EventId) {
        if let State::HalfOpen { probe: None } = self.state {
            self.state = State::HalfOpen { probe: Some(id) };
        }
    }

    /// The attempt at `id` was abandoned without an answer: if it was the
    /// probe, another may go. (An attempt sent before the circuit opened,
    /// abandoned late, is not the probe: a second probe must not go while
    /// the first is out.)
    pub fn on_abandoned(&mut self, id: EventId) {
        if let State::HalfOpen { probe: Some(probe) } = self.state {
            if probe == id {
                self.state = State::HalfOpen { probe: None };
            }
        }
    }

    /// True when this success closed an open or half-open circuit.
    pub fn on_success(&mut self) -> bool {
        let was_closed = matches!(self.state, State::Closed { .. });
        self.state = State::Closed { failures: 0 };
        !was_closed
    }

    /// Another instance sharing the store opened the target's circuit for
    /// `open_for`: this one holds too, unless its own circuit is open
    /// already or its probe is out (whose answer decides). True when it
    /// opened.
    pub fn opened_elsewhere(&mut self, now: Instant, open_for: Duration) -> bool {
        match self.state {
            State::Closed { .. } | State::HalfOpen { probe: None } => {
                self.state = State::Open { until: now + open_for };
                true
            }
            State::Open { .. } | State::HalfOpen { probe: Some(_) } => false,
        }
    }

    /// Returns true when this failure opened the circuit.
    pub fn on_failure(&mut self, now: Instant) -> bool {
        let open_for: Duration = self.settings.open_for;
        match self.state {
            State::Closed { failures } if failures + 1 < self.settings.failure_threshold => {
                self.state = State::Closed { failures: failures + 1 };
                false
            }
            // An attempt sent before the circuit opened, failing late, changes nothing.
            State::Open { .. } => false,
            _ => {
                self.state = State::Open { until: now + open_for };
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn another_instances_open_circuit_holds_this_one_unless_its_probe_is_out() {
        let now = Instant::now();
        let mut b = breaker();
        assert!(b.opened_elsewhere(now, Duration::from_secs(5)));
        assert_eq!(b.permit(now), Permit::Wait(Some(now + Duration::from_secs(5))));
        assert!(!b.opened_elsewhere(now, Duration::from_secs(60)), "already open: its own time stands");
        let later = now + Duration::from_secs(6);
        assert_eq!(b.permit(later), Permit::Probe);
        b.on_dispatch(EventId::new());
        assert!(!b.opened_elsewhere(later, Duration::from_secs(5)), "the probe out decides");
    }

    fn breaker() -> Breaker {
        Breaker::new(BreakerSettings { failure_threshold: 3, open_for: Duration::from_secs(30) })
    }

    #[test]
    fn opens_after_consecutive_failures_only() {
        let now = Instant::now();
        let mut b = breaker();
        assert!(!b.on_failure(now));
        assert!(!b.on_failure(now));
        assert!(!b.on_success(), "it was closed");
        assert!(!b.on_failure(now));
        assert!(!b.on_failure(now));
        assert!(b.on_failure(now), "third consecutive failure opens it");
        assert_eq!(b.state(now), CircuitState::Open);
        assert_eq!(b.permit(now + Duration::from_secs(10)), Permit::Wait(Some(now + Duration::from_secs(30))));
    }

    #[test]
    fn half_open_allows_one_probe_and_closes_on_success() {
        let now = Instant::now();
        let mut b = breaker();
        for _ in 0..3 {
            b.on_failure(now);
        }
        let later = now + Duration::from_secs(31);
        assert_eq!(b.state(later), CircuitState::HalfOpen);
        assert_eq!(b.permit(later), Permit::Probe);
        let probe = EventId::new();
        b.on_dispatch(probe);
        assert_eq!(b.permit(later), Permit::Wait(None), "one probe at a time");
        b.on_abandoned(EventId::new());
        assert_eq!(b.permit(later), Permit::Wait(None), "an older attempt abandoned late is not the probe");
        b.on_abandoned(probe);
        assert_eq!(b.permit(later), Permit::Probe, "an abandoned probe frees the slot");
        b.on_dispatch(EventId::new());
        assert!(b.on_success(), "the probe's success closes it");
        assert!(!b.on_success(), "closed already");
        assert_eq!(b.state(later), CircuitState::Closed);
        assert_eq!(b.permit(later), Permit::Open);
    }

    #[test]
    fn a_failed_probe_opens_it_again() {
        let now = Instant::now();
        let mut b = breaker();
        for _ in 0..3 {
            b.on_failure(now);
        }
        let later = now + Duration::from_secs(31);
        assert_eq!(b.permit(later), Permit::Probe);
        b.on_dispatch(EventId::new());
        assert!(b.on_failure(later));
        assert_eq!(b.permit(later + Duration::from_secs(1)), Permit::Wait(Some(later + Duration::from_secs(30))));
    }
}
