//! The lease holder's decisions, sans IO: each tick the driver says what it saw of the primary
//! and gets back the one thing to do (renew, restart in place, fence, fail over, wait); it
//! reports what came of it. Time is passed in, so the rules run on virtual time in
//! `tests/lead_sim.rs`.
//!
//! The rules, in Patroni's order: a writable primary renews its lease; a primary whose
//! postmaster exited, data intact, is restarted in place under its lease before anyone is
//! promoted; a primary that has not renewed for two thirds of the lease is fenced, so that it
//! takes no write by the time the lease expires; only then may a standby be promoted. A crash
//! loop backs off, and gives way to a failover after [`RESTART_LIMIT`] quick exits when one is
//! possible; when none is, the only complete copy keeps its lease and is restarted for as long
//! as it takes.

use std::time::Duration;

use tokio::time::Instant;

use crate::failover::fence_after;

/// A primary restarted in place that stays up this long has ended its crash loop.
pub const RESTART_STABLE: Duration = Duration::from_secs(30);
/// Exits in a row, each within [`RESTART_STABLE`] of its restart, after which a failover is
/// preferred to another restart (when one is possible).
pub const RESTART_LIMIT: u32 = 3;
/// The wait before a restart after a quick exit: this, doubling, at most [`RESTART_BACKOFF_MAX`].
pub const RESTART_BACKOFF: Duration = Duration::from_millis(500);
pub const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// The lease holder's postmaster, as the driver knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Process {
    /// Running (answering or not: a hung one is running).
    Running,
    /// Started again in place, not answering yet.
    Restarting,
    /// It exited (and was reaped); not started again yet.
    Exited,
    /// Killed by a fence.
    Fenced,
}

/// What the driver saw of the lease holder this tick.
#[derive(Clone, Copy, Debug)]
pub struct Seen {
    /// It answered SQL as a writable server.
    pub writable: bool,
    pub process: Process,
    /// Its data directory is there and not marked a standby: it can start as a primary.
    pub restartable: bool,
    /// A standby could be promoted now.
    pub failover_possible: bool,
}

/// The one thing to do this tick.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Renew the lease; report with [`Lead::renewed`].
    Renew,
    /// Keep the lease through a restart (renew it, or take it again with the next term once
    /// expired); report with [`Lead::held`].
    HoldLease,
    /// Keep the lease as above, then start the postmaster again in place as primary; report
    /// with [`Lead::held`] and [`Lead::restarted`]. `attempt` counts from 1; `backoff` is the
    /// wait that came before it.
    Restart { attempt: u32, backoff: Duration },
    /// Kill it (the fence); report with [`Lead::fenced`].
    Fence,
    /// Promote a standby: the lease has expired.
    FailOver,
    /// Nothing now.
    Wait,
}

/// What [`Lead::decide`] says besides the action.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Notes {
    /// The primary was just lost (announce it once; empty the frontends).
    pub lost: bool,
    /// The crash loop was just given up for a failover (announce it once), after this many
    /// quick exits.
    pub gave_up: Option<u32>,
}

/// The lease holder's state between ticks.
#[derive(Clone, Debug)]
pub struct Lead {
    ttl: Duration,
    /// The last successful renewal (or take) of the lease.
    pub renewed: Instant,
    /// Since when the primary has not answered as writable.
    pub lost_since: Option<Instant>,
    /// When its postmaster exited, until it is writable again.
    pub exited: Option<Instant>,
    /// When the last restart began, until it has stayed up [`RESTART_STABLE`].
    pub began: Option<Instant>,
    /// Exits in a row within [`RESTART_STABLE`] of their restart.
    pub quick: u32,
    /// No restart before this.
    next: Option<Instant>,
    gave_up: bool,
}

/// What a renewal that worked closed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Back {
    /// The primary was lost and answers again.
    pub was_lost: bool,
    /// It had exited and was restarted in place, this long ago.
    pub restarted_after: Option<Duration>,
}

/// The wait before the restart that follows `quick` quick exits.
pub fn restart_backoff(quick: u32) -> Duration {
    match quick {
        0 => Duration::ZERO,
        n => (RESTART_BACKOFF * 2u32.saturating_pow(n - 1)).min(RESTART_BACKOFF_MAX),
    }
}

impl Lead {
    /// A lease just taken (or renewed) at `now`, for `ttl`.
    pub fn new(ttl: Duration, now: Instant) -> Lead {
        Lead {
            ttl,
            renewed: now,
            lost_since: None,
            exited: None,
            began: None,
            quick: 0,
            next: None,
            gave_up: false,
        }
    }

    /// Whether a restart in place is under way (for the state the API shows).
    pub fn restarting(&self) -> bool {
        self.exited.is_some() && self.began.is_some()
    }

    /// The decision for this tick.
    pub fn decide(&mut self, seen: Seen, now: Instant) -> (Action, Notes) {
        let mut notes = Notes::default();
        if seen.writable {
            return (Action::Renew, notes);
        }
        if self.lost_since.is_none() {
            self.lost_since = Some(now);
            notes.lost = true;
        }
        if let Some(action) = self.restart(seen, now, &mut notes) {
            return (action, notes);
        }
        if seen.process != Process::Fenced && now >= self.renewed + fence_after(self.ttl) {
            return (Action::Fence, notes);
        }
        if seen.process == Process::Fenced && now >= self.renewed + self.ttl {
            return (Action::FailOver, notes);
        }
        (Action::Wait, notes)
    }

    /// Restart in place, or keep the lease for one, when the rules allow.
    fn restart(&mut self, seen: Seen, now: Instant, notes: &mut Notes) -> Option<Action> {
        let keep = (!seen.failover_possible).then_some(Action::HoldLease);
        match seen.process {
            // Under way: all the time it needs while no one else can take over.
            Process::Restarting => return keep,
            Process::Exited | Process::Fenced if seen.restartable => {}
            _ => return None,
        }
        if seen.failover_possible {
            // Fenced (hung, or a restart that never answered): the failover is the way.
            if seen.process == Process::Fenced {
                return None;
            }
            if self.quick >= RESTART_LIMIT {
                if !self.gave_up {
                    self.gave_up = true;
                    notes.gave_up = Some(self.quick);
                }
                return None;
            }
        }
        if self.next.is_some_and(|t| now < t) {
            return keep;
        }
        Some(Action::Restart {
            attempt: self.quick + 1,
            backoff: restart_backoff(self.quick),
        })
    }

    /// The postmaster exited (not by a fence): quick when within [`RESTART_STABLE`] of a
    /// restart, which then waits out a backoff.
    pub fn exited(&mut self, now: Instant) {
        self.exited.get_or_insert(now);
        let quick = self.began.is_some_and(|b| now < b + RESTART_STABLE);
        self.quick = if quick { self.quick + 1 } else { 0 };
        self.next = Some(now + restart_backoff(self.quick));
    }

    /// The outcome of [`Action::Renew`]: `Some` when it worked. A failed renewal means the
    /// lease is someone else's: the driver fences and gives up the lead.
    pub fn renewed(&mut self, ok: bool, now: Instant) -> Option<Back> {
        if !ok {
            self.lost_since.get_or_insert(now);
            return None;
        }
        self.renewed = now;
        if self.began.is_some_and(|b| now >= b + RESTART_STABLE) {
            self.began = None;
            self.quick = 0;
            self.next = None;
            self.gave_up = false;
        }
        let was_lost = self.lost_since.take().is_some();
        let restarted_after = if was_lost {
            self.exited.take().map(|e| now - e)
        } else {
            None
        };
        Some(Back {
            was_lost,
            restarted_after,
        })
    }

    /// The outcome of keeping the lease ([`Action::HoldLease`], or before a restart).
    pub fn held(&mut self, ok: bool, now: Instant) {
        if ok {
            self.renewed = now;
        }
    }

    /// The outcome of starting the postmaster again ([`Action::Restart`] after its lease was
    /// held): a start that failed counts as a quick exit.
    pub fn restarted(&mut self, ok: bool, now: Instant) {
        self.exited.get_or_insert(now);
        self.began = Some(now);
        if !ok {
            self.exited(now);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const TTL: Duration = Duration::from_secs(3);

    fn seen(process: Process, failover_possible: bool) -> Seen {
        Seen {
            writable: false,
            process,
            restartable: true,
            failover_possible,
        }
    }

    #[test]
    fn a_crash_is_restarted_at_once_then_backs_off() {
        let t0 = Instant::now();
        let mut l = Lead::new(TTL, t0);
        l.exited(t0);
        let (a, n) = l.decide(seen(Process::Exited, true), t0);
        assert!(n.lost);
        assert_eq!(
            a,
            Action::Restart {
                attempt: 1,
                backoff: Duration::ZERO
            }
        );
        l.held(true, t0);
        l.restarted(true, t0);
        let t1 = t0 + Duration::from_millis(100);
        l.exited(t1);
        assert_eq!(l.decide(seen(Process::Exited, true), t1).0, Action::Wait);
        let t2 = t1 + RESTART_BACKOFF;
        assert_eq!(
            l.decide(seen(Process::Exited, true), t2).0,
            Action::Restart {
                attempt: 2,
                backoff: RESTART_BACKOFF
            }
        );
    }

    #[test]
    fn a_hung_primary_is_fenced_then_failed_over() {
        let t0 = Instant::now();
        let mut l = Lead::new(TTL, t0);
        let running = seen(Process::Running, true);
        assert_eq!(
            l.decide(running, t0 + Duration::from_secs(1)).0,
            Action::Wait
        );
        assert_eq!(l.decide(running, t0 + fence_after(TTL)).0, Action::Fence);
        let fenced = seen(Process::Fenced, true);
        assert_eq!(l.decide(fenced, t0 + fence_after(TTL)).0, Action::Wait);
        assert_eq!(l.decide(fenced, t0 + TTL).0, Action::FailOver);
    }

    #[test]
    fn without_a_failover_the_fenced_copy_is_restarted_under_its_lease() {
        let t0 = Instant::now();
        let mut l = Lead::new(TTL, t0);
        let fenced = seen(Process::Fenced, false);
        assert!(matches!(
            l.decide(fenced, t0 + TTL).0,
            Action::Restart { .. }
        ));
    }

    #[test]
    fn stable_again_the_crash_count_starts_over() {
        let t0 = Instant::now();
        let mut l = Lead::new(TTL, t0);
        l.exited(t0);
        assert!(l.decide(seen(Process::Exited, true), t0).1.lost);
        l.restarted(true, t0);
        l.exited(t0 + Duration::from_secs(1));
        assert_eq!(l.quick, 1);
        l.restarted(true, t0 + Duration::from_secs(2));
        let later = t0 + Duration::from_secs(2) + RESTART_STABLE;
        let back = l.renewed(true, later).unwrap();
        assert!(back.was_lost);
        assert_eq!(l.quick, 0);
        assert!(l.renewed(true, later).is_some_and(|b| !b.was_lost));
    }
}
