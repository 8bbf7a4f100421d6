//! Safe failback for priority routing: a sans-IO state machine.
//!
//! Failover is immediate: when the endpoint taking traffic becomes unavailable, the best
//! available one takes over at once. Failback is not: a better (lower priority number) endpoint
//! takes traffic back only after it has been available without interruption for `hold`. A
//! flapping primary restarts its hold each time it drops, so it causes at most one move back per
//! hold window. (The health state machine has already demanded `recovery_successes` before
//! calling it available.)

use tokio::time::{Duration, Instant};

/// The failback state of one priority profile. Endpoints are indexed in priority order, best
/// first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failback {
    hold: Duration,
    /// The endpoint taking traffic.
    current: Option<usize>,
    /// Since when each endpoint has been available without interruption.
    available_since: Vec<Option<Instant>>,
}

/// What the router should do now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    /// The endpoint that takes traffic; `None` when none is available.
    pub current: Option<usize>,
    /// When to decide again if nothing else changes (a hold ending).
    pub wake_at: Option<Instant>,
}

impl Failback {
    pub fn new(endpoints: usize, hold: Duration) -> Self {
        Failback {
            hold,
            current: None,
            available_since: vec![None; endpoints],
        }
    }

    pub fn current(&self) -> Option<usize> {
        self.current
    }

    /// Takes the endpoint another controller chose (the cluster leader's) as the current one,
    /// keeping how long each endpoint has been available: if this controller has to decide
    /// alone later (cut off from the leader), it goes on from the shared decision.
    pub fn adopt(&mut self, current: Option<usize>) {
        self.current = current;
    }

    /// Feeds the availability of every endpoint (in priority order) at `now`.
    pub fn decide(&mut self, available: &[bool], now: Instant) -> Decision {
        for (since, &up) in self.available_since.iter_mut().zip(available) {
            match (up, *since) {
                (true, None) => *since = Some(now),
                (false, Some(_)) => *since = None,
                _ => {}
            }
        }
        let best = available.iter().position(|&up| up);
        let current_up = self
            .current
            .is_some_and(|c| available.get(c).copied().unwrap_or(false));
        if !current_up {
            // First decision, or failover: no hold.
            self.current = best;
            return Decision {
                current: best,
                wake_at: self.next_wake(),
            };
        }
        let current = self.current.unwrap_or(0);
        // The best better endpoint whose hold is over.
        let ready = (0..current).find(|&i| {
            self.available_since[i].is_some_and(|since| now.duration_since(since) >= self.hold)
        });
        if let Some(better) = ready {
            self.current = Some(better);
        }
        Decision {
            current: self.current,
            wake_at: self.next_wake(),
        }
    }

    /// The earliest moment a better endpoint's hold ends.
    fn next_wake(&self) -> Option<Instant> {
        let current = self.current?;
        (0..current)
            .filter_map(|i| self.available_since[i].map(|s| s + self.hold))
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const HOLD: Duration = Duration::from_secs(30);

    #[test]
    fn fails_over_at_once_and_back_only_after_the_hold() {
        let t0 = Instant::now();
        let mut f = Failback::new(2, HOLD);
        assert_eq!(f.decide(&[true, true], t0).current, Some(0));
        let t1 = t0 + Duration::from_secs(5);
        assert_eq!(
            f.decide(&[false, true], t1).current,
            Some(1),
            "failover is immediate"
        );
        let t2 = t1 + Duration::from_secs(3);
        let d = f.decide(&[true, true], t2);
        assert_eq!(d.current, Some(1), "held");
        assert_eq!(d.wake_at, Some(t2 + HOLD));
        assert_eq!(
            f.decide(&[true, true], t2 + HOLD - Duration::from_millis(1))
                .current,
            Some(1)
        );
        assert_eq!(
            f.decide(&[true, true], t2 + HOLD).current,
            Some(0),
            "failback after hold"
        );
    }

    #[test]
    fn a_flap_restarts_the_hold() {
        let t0 = Instant::now();
        let mut f = Failback::new(2, HOLD);
        f.decide(&[false, true], t0);
        f.decide(&[true, true], t0 + Duration::from_secs(1));
        f.decide(&[false, true], t0 + Duration::from_secs(20));
        let back = t0 + Duration::from_secs(25);
        assert_eq!(f.decide(&[true, true], back).wake_at, Some(back + HOLD));
        assert_eq!(
            f.decide(&[true, true], t0 + Duration::from_secs(40))
                .current,
            Some(1)
        );
    }

    #[test]
    fn nothing_available_then_anything_is_taken_at_once() {
        let t0 = Instant::now();
        let mut f = Failback::new(3, HOLD);
        assert_eq!(f.decide(&[false, false, false], t0).current, None);
        assert_eq!(f.decide(&[false, false, true], t0).current, Some(2));
        assert_eq!(f.decide(&[false, true, true], t0).current, Some(2));
    }

    proptest! {
        /// Over any availability history (steps of 1 s, hold 10 s): the current endpoint is
        /// always available when any is; failover never waits; and failbacks to one endpoint
        /// (moves to it while the endpoint left is still up) are at least a hold apart.
        #[test]
        fn invariants(history in proptest::collection::vec(proptest::collection::vec(any::<bool>(), 3), 1..300)) {
            let hold = Duration::from_secs(10);
            let t0 = Instant::now();
            let mut f = Failback::new(3, hold);
            let mut last_failback: [Option<Instant>; 3] = [None; 3];
            let mut prev: Option<usize> = None;
            for (step, avail) in history.iter().enumerate() {
                let now = t0 + Duration::from_secs(step as u64);
                let d = f.decide(avail, now);
                match d.current {
                    Some(c) => prop_assert!(avail[c]),
                    None => prop_assert!(avail.iter().all(|a| !a)),
                }
                if let (Some(p), Some(c)) = (prev, d.current)
                    && c < p
                    && avail[p]
                {
                    if let Some(l) = last_failback[c] {
                        prop_assert!(now.duration_since(l) >= hold);
                    }
                    last_failback[c] = Some(now);
                }
                prev = d.current;
            }
        }
    }
}
