//! The health state machine of one target: pure, driven by probe results and time.
//!
//! ```text
//!                 first success                 tolerated_failures + 1 failures in a row
//! CheckingEndpoint ────────────▶ Online ◀──────────────────────────────▶ Degraded
//!        │                                recovery_successes in a row       ▲
//!        └──────────── tolerated_failures + 1 failures in a row ────────────┘
//! Disabled: set by the operator from any state; results are ignored; enabling starts over
//! at CheckingEndpoint.
//! ```
//!
//! A target starts Online on its first success (it has no history to distrust), but once
//! Degraded it must show `recovery_successes` in a row: the rise threshold that keeps a flapping
//! target from taking traffic back.

use std::fmt;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// Endpoint and target states, in the traffic-manager vocabulary.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Status {
    /// No result yet.
    CheckingEndpoint,
    Online,
    Degraded,
    /// Turned off by the operator: not probed, not answered.
    Disabled,
    /// The thing the target belongs to is stopped (set by its owner, never by probes).
    Stopped,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::CheckingEndpoint => "CheckingEndpoint",
            Status::Online => "Online",
            Status::Degraded => "Degraded",
            Status::Disabled => "Disabled",
            Status::Stopped => "Stopped",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How many results in a row move a target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Thresholds {
    /// Failures tolerated: Degraded after `tolerated_failures + 1` in a row.
    pub tolerated_failures: u32,
    /// Successes in a row before a Degraded target is Online again (at least 1).
    pub recovery_successes: u32,
}

/// A change of status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Change {
    pub from: Status,
    pub to: Status,
}

/// The state of one target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Health {
    pub status: Status,
    /// When `status` was entered.
    pub since: Instant,
    pub consecutive_successes: u32,
    pub consecutive_failures: u32,
}

impl Health {
    pub fn new(now: Instant) -> Self {
        Health {
            status: Status::CheckingEndpoint,
            since: now,
            consecutive_successes: 0,
            consecutive_failures: 0,
        }
    }

    /// Applies one probe result.
    pub fn observe(&mut self, success: bool, th: Thresholds, now: Instant) -> Option<Change> {
        if matches!(self.status, Status::Disabled | Status::Stopped) {
            return None;
        }
        if success {
            self.consecutive_successes = self.consecutive_successes.saturating_add(1);
            self.consecutive_failures = 0;
        } else {
            self.consecutive_failures = self.consecutive_failures.saturating_add(1);
            self.consecutive_successes = 0;
        }
        let fall = self.consecutive_failures > th.tolerated_failures;
        let next = match self.status {
            Status::CheckingEndpoint if success => Status::Online,
            Status::Degraded if self.consecutive_successes >= th.recovery_successes.max(1) => {
                Status::Online
            }
            Status::CheckingEndpoint | Status::Online if fall => Status::Degraded,
            other => other,
        };
        self.go(next, now)
    }

    /// A failure seen outside the probes (a load balancer's refused connect): Degraded at
    /// once, and back only through `recovery_successes` probes.
    pub fn eject(&mut self, now: Instant) -> Option<Change> {
        if matches!(self.status, Status::Disabled | Status::Stopped) {
            return None;
        }
        self.consecutive_successes = 0;
        self.go(Status::Degraded, now)
    }

    /// Operator's switch: disabling stops probing; enabling starts over.
    pub fn set_disabled(&mut self, disabled: bool, now: Instant) -> Option<Change> {
        match (disabled, self.status) {
            (true, Status::Disabled) | (false, Status::CheckingEndpoint) => None,
            (true, _) => self.go(Status::Disabled, now),
            (false, Status::Disabled) => self.go(Status::CheckingEndpoint, now),
            (false, _) => None,
        }
    }

    fn go(&mut self, to: Status, now: Instant) -> Option<Change> {
        if to == self.status {
            return None;
        }
        let from = self.status;
        self.status = to;
        self.since = now;
        if matches!(to, Status::Disabled | Status::CheckingEndpoint) {
            self.consecutive_successes = 0;
            self.consecutive_failures = 0;
        }
        Some(Change { from, to })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::Duration;

    const TH: Thresholds = Thresholds {
        tolerated_failures: 2,
        recovery_successes: 3,
    };

    fn run(h: &mut Health, results: &[bool], now: &mut Instant) -> Vec<Change> {
        results
            .iter()
            .filter_map(|ok| {
                *now += Duration::from_secs(1);
                h.observe(*ok, TH, *now)
            })
            .collect()
    }

    #[test]
    fn first_success_is_online_then_exactly_tolerated_plus_one_failures_degrade() {
        let mut now = Instant::now();
        let mut h = Health::new(now);
        assert_eq!(
            run(&mut h, &[true], &mut now),
            [Change {
                from: Status::CheckingEndpoint,
                to: Status::Online
            }]
        );
        assert!(run(&mut h, &[false, false], &mut now).is_empty());
        assert_eq!(h.status, Status::Online);
        let t = now;
        assert_eq!(run(&mut h, &[false], &mut now).len(), 1);
        assert_eq!(h.status, Status::Degraded);
        assert!(h.since > t);
    }

    #[test]
    fn recovery_needs_exactly_recovery_successes_in_a_row() {
        let mut now = Instant::now();
        let mut h = Health::new(now);
        run(&mut h, &[false, false, false], &mut now);
        assert_eq!(h.status, Status::Degraded);
        run(&mut h, &[true, true, false, true, true], &mut now);
        assert_eq!(
            h.status,
            Status::Degraded,
            "a failure resets the rise count"
        );
        run(&mut h, &[true], &mut now);
        assert_eq!(h.status, Status::Online);
    }

    #[test]
    fn disabled_ignores_results_and_enabling_starts_over() {
        let mut now = Instant::now();
        let mut h = Health::new(now);
        run(&mut h, &[true], &mut now);
        assert!(h.set_disabled(true, now).is_some());
        assert!(run(&mut h, &[false, false, false, false], &mut now).is_empty());
        assert_eq!(h.status, Status::Disabled);
        assert_eq!(
            h.set_disabled(false, now).map(|c| c.to),
            Some(Status::CheckingEndpoint)
        );
        assert_eq!(h.set_disabled(false, now), None);
    }

    #[test]
    fn ejection_degrades_at_once_and_recovery_needs_the_full_rise() {
        let mut now = Instant::now();
        let mut h = Health::new(now);
        run(&mut h, &[true, true], &mut now);
        assert_eq!(h.eject(now).map(|c| c.to), Some(Status::Degraded));
        run(&mut h, &[true, true], &mut now);
        assert_eq!(h.status, Status::Degraded);
        run(&mut h, &[true], &mut now);
        assert_eq!(h.status, Status::Online);
    }

    proptest! {
        /// Over any sequence of results the machine matches a direct reading of the rules.
        #[test]
        fn matches_the_rules(results in proptest::collection::vec(any::<bool>(), 0..200),
                             tolerated in 0u32..5, rise in 1u32..5) {
            let th = Thresholds { tolerated_failures: tolerated, recovery_successes: rise };
            let mut now = Instant::now();
            let mut h = Health::new(now);
            let (mut ok_run, mut fail_run) = (0u32, 0u32);
            let mut expected = Status::CheckingEndpoint;
            for ok in results {
                now += Duration::from_millis(100);
                let change = h.observe(ok, th, now);
                if ok { ok_run += 1; fail_run = 0 } else { fail_run += 1; ok_run = 0 }
                let before = expected;
                expected = match expected {
                    Status::CheckingEndpoint if ok => Status::Online,
                    Status::Degraded if ok_run >= rise => Status::Online,
                    Status::CheckingEndpoint | Status::Online if fail_run > tolerated => Status::Degraded,
                    s => s,
                };
                prop_assert_eq!(h.status, expected);
                prop_assert_eq!(change.is_some(), before != expected);
                if change.is_some() { prop_assert_eq!(h.since, now); }
            }
        }
    }
}
