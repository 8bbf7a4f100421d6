//! The lease holder's rules ([`pg::lead::Lead`]) simulated on virtual time: a primary and a
//! standby, the store's lease (holder, term, expiry), the primary's postmaster crashing,
//! hanging and coming back, restarts that take a while or fail at once, the standby
//! synchronous or not — and the driver's side of each decision carried out as `cluster.rs`
//! does. Over many seeds, after every 200 ms tick:
//!
//! - terms never go back;
//! - never two members that take writes: when the standby is promoted, the old primary's
//!   postmaster is down or fenced, and it is never started again as primary;
//! - a lease that has lapsed (so that a standby elsewhere may take it) never leaves the old
//!   primary's postmaster running: it is down or fenced by then;
//! - a promotion only after the old primary's lease expired, and only when a failover was
//!   possible (the standby synchronous); the promoted standby then leads with a fresh lease,
//!   the old primary rejoining as its standby, so each seed runs through many primaries;
//! - a restart in place only under the primary's own lease;
//! - a crash loop with a failover possible restarts at most `RESTART_LIMIT` times in a row;
//! - once faults stop, the database ends with exactly one writable member under its lease.

#![allow(clippy::unwrap_used)]

use pg::failover::fence_after;
use pg::lead::{Action, Lead, Process, RESTART_BACKOFF_MAX, RESTART_LIMIT, Seen};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::time::{Duration, Instant};

const TICK: Duration = Duration::from_millis(200);
/// Leases from 2 s to 30 s: with the longer ones a crash loop's backoff fits before the fence.
const TTLS: [u64; 4] = [2, 3, 10, 30];
const SEEDS: u64 = 500;
const TICKS: usize = 1500;
/// Ticks at the end without faults, and with restarts that work.
const QUIET: usize = 900;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Who {
    Primary,
    Standby,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Postmaster {
    Up,
    Hung,
    Down,
    /// Started in place: answers at `ready`, or exits then when `fails`.
    Starting {
        ready: Instant,
        fails: bool,
    },
    Fenced,
}

#[derive(Debug)]
struct Lease {
    holder: Option<Who>,
    term: u64,
    expires: Instant,
}

struct Sim {
    ttl: Duration,
    /// Since when the standby has not been synchronous (no failover possible).
    unsynced_since: Option<Instant>,
    rng: StdRng,
    start: Instant,
    now: Instant,
    lease: Lease,
    lead: Lead,
    pm: Postmaster,
    sync: bool,
    promoted: bool,
    failovers: usize,
    /// Restarts since the primary was last stable (writable for 30 s).
    restarts_in_a_row: u32,
    last_term: u64,
    quiet: bool,
    log: Vec<String>,
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let now = Instant::now();
        let ttl = Duration::from_secs(TTLS[seed as usize % TTLS.len()]);
        Sim {
            ttl,
            unsynced_since: None,
            rng: StdRng::seed_from_u64(seed),
            start: now,
            now,
            lease: Lease {
                holder: Some(Who::Primary),
                term: 1,
                expires: now + ttl,
            },
            lead: Lead::new(ttl, now),
            pm: Postmaster::Up,
            sync: true,
            promoted: false,
            failovers: 0,
            restarts_in_a_row: 0,
            last_term: 1,
            quiet: false,
            log: Vec::new(),
        }
    }

    fn lease_ours(&self) -> bool {
        self.lease.holder == Some(Who::Primary) && self.now < self.lease.expires
    }

    /// A fault, now and then (none once quiet).
    fn fault(&mut self) {
        if self.quiet || self.promoted {
            return;
        }
        let r = self.rng.random_range(0..1000);
        let before = self.pm;
        match (r, self.pm) {
            (0..6, Postmaster::Up | Postmaster::Hung | Postmaster::Starting { .. }) => {
                self.pm = Postmaster::Down;
                self.lead.exited(self.now);
            }
            (8..10, Postmaster::Up) => self.pm = Postmaster::Hung,
            (12..30, Postmaster::Hung) => self.pm = Postmaster::Up,
            (30..36, _) => {
                self.sync = !self.sync;
                self.unsynced_since = (!self.sync).then_some(self.now);
            }
            _ => {}
        }
        if self.pm != before {
            self.log
                .push(format!("{:?} fault: {before:?} -> {:?}", self.t(), self.pm));
        }
    }

    fn t(&self) -> Duration {
        self.now - self.start
    }

    /// What the driver reaps: a restart that comes up or exits.
    fn reap(&mut self) {
        if let Postmaster::Starting { ready, fails } = self.pm
            && self.now >= ready
        {
            if fails {
                self.pm = Postmaster::Down;
                self.lead.exited(self.now);
            } else {
                self.pm = Postmaster::Up;
            }
        }
    }

    fn hold(&mut self) -> bool {
        if self.now < self.lead.renewed + self.ttl && self.lease_ours() {
            self.lease.expires = self.now + self.ttl;
            self.lead.held(true, self.now);
            return true;
        }
        if self.lease.holder.is_none() || self.now >= self.lease.expires {
            // The only complete copy keeps its lease while no failover is possible.
            assert!(
                self.unsynced_since
                    .is_none_or(|since| since > self.lead.renewed),
                "the lease lapsed while no failover was possible\n{}",
                self.story()
            );
            self.lease = Lease {
                holder: Some(Who::Primary),
                term: self.lease.term + 1,
                expires: self.now + self.ttl,
            };
            self.lead.held(true, self.now);
            if self.pm == Postmaster::Fenced {
                self.pm = Postmaster::Down;
            }
            return true;
        }
        false
    }

    /// One tick of the driver: observe, decide, carry out.
    fn tick(&mut self, seed: u64) {
        self.reap();
        let process = match self.pm {
            Postmaster::Fenced => Process::Fenced,
            Postmaster::Down => Process::Exited,
            Postmaster::Starting { .. } if self.lead.began.is_some() => Process::Restarting,
            _ => Process::Running,
        };
        let seen = Seen {
            writable: self.pm == Postmaster::Up,
            process,
            restartable: true,
            failover_possible: self.sync,
        };
        let (action, notes) = self.lead.decide(seen, self.now);
        if notes.gave_up.is_some() {
            self.log.push(format!("{:?} crash loop given up", self.t()));
        }
        match action {
            Action::Renew => {
                let ok = self.lease_ours();
                if ok {
                    self.lease.expires = self.now + self.ttl;
                }
                if self.lead.renewed(ok, self.now).is_some_and(|b| b.was_lost) {
                    self.log.push(format!("{:?} back", self.t()));
                }
                if self.lead.began.is_none() {
                    self.restarts_in_a_row = 0;
                }
                assert!(
                    ok,
                    "seed {seed}: the primary's renewal refused\n{}",
                    self.story()
                );
            }
            Action::HoldLease => {
                self.hold();
            }
            Action::Restart { .. } => {
                if self.hold() {
                    assert!(
                        self.lease_ours(),
                        "seed {seed}: a restart without the lease\n{}",
                        self.story()
                    );
                    assert!(!self.promoted, "seed {seed}: restarted after a promotion");
                    let fails = !self.quiet && self.rng.random_bool(0.4);
                    let ready = self.now + Duration::from_millis(self.rng.random_range(50..3000));
                    self.pm = Postmaster::Starting { ready, fails };
                    self.lead.restarted(true, self.now);
                    if self.sync {
                        self.restarts_in_a_row += 1;
                    }
                    self.log
                        .push(format!("{:?} restart (fails: {fails})", self.t()));
                    assert!(
                        self.restarts_in_a_row <= RESTART_LIMIT,
                        "seed {seed}: a crash loop restarted {} times with a failover possible\n{}",
                        self.restarts_in_a_row,
                        self.story()
                    );
                }
            }
            Action::Fence => {
                assert!(
                    self.sync || !matches!(self.pm, Postmaster::Starting { .. }),
                    "seed {seed}: a restart fenced while no failover is possible\n{}",
                    self.story()
                );
                self.pm = Postmaster::Fenced;
                self.log.push(format!("{:?} fenced", self.t()));
            }
            Action::FailOver => {
                if self.sync {
                    assert!(
                        self.now >= self.lease.expires,
                        "seed {seed}: promoted before the lease expired\n{}",
                        self.story()
                    );
                    assert!(
                        matches!(self.pm, Postmaster::Fenced | Postmaster::Down),
                        "seed {seed}: promoted while the old primary runs ({:?})\n{}",
                        self.pm,
                        self.story()
                    );
                    self.lease = Lease {
                        holder: Some(Who::Standby),
                        term: self.lease.term + 1,
                        expires: self.now + self.ttl,
                    };
                    self.promoted = true;
                    self.check(seed);
                    self.log.push(format!("{:?} failover", self.t()));
                    // The standby leads now; the old primary rejoins as its standby, not yet
                    // synchronous. The model's "primary" is the new one.
                    self.failovers += 1;
                    self.promoted = false;
                    self.pm = Postmaster::Up;
                    self.lease.holder = Some(Who::Primary);
                    self.lead = Lead::new(self.ttl, self.now);
                    self.sync = false;
                    self.unsynced_since = Some(self.now);
                    self.restarts_in_a_row = 0;
                }
            }
            Action::Wait => {}
        }
    }

    fn story(&self) -> String {
        self.log.join("\n")
    }

    fn check(&mut self, seed: u64) {
        assert!(
            self.lease.term >= self.last_term,
            "seed {seed}: the term went back"
        );
        self.last_term = self.lease.term;
        let writable_primary = self.pm == Postmaster::Up && !self.promoted;
        if self.lease.holder == Some(Who::Primary) && self.now >= self.lease.expires {
            assert!(
                matches!(self.pm, Postmaster::Down | Postmaster::Fenced),
                "seed {seed}: the lease lapsed with the old primary's postmaster {:?}\n{}",
                self.pm,
                self.story()
            );
        }
        if self.promoted {
            assert!(
                !matches!(self.pm, Postmaster::Up | Postmaster::Starting { .. }),
                "seed {seed}: two primaries\n{}",
                self.story()
            );
        }
        // A primary that takes writes past its fence point has renewed since.
        if writable_primary && self.lead.lost_since.is_none() {
            assert!(
                self.now < self.lead.renewed + fence_after(self.ttl) + TICK,
                "seed {seed}: writable and unfenced past two thirds of the lease\n{}",
                self.story()
            );
        }
    }
}

#[test]
fn the_lease_holders_rules_hold_over_many_seeds() {
    let mut restarts = 0;
    let mut failovers = 0;
    for seed in 0..SEEDS {
        let mut sim = Sim::new(seed);
        for step in 0..TICKS {
            sim.quiet = step >= TICKS - QUIET;
            sim.now += TICK;
            sim.fault();
            if !sim.promoted {
                sim.tick(seed);
            }
            sim.check(seed);
        }
        restarts += sim.log.iter().filter(|l| l.contains("restart")).count();
        failovers += sim.failovers;
        // Faults stopped for QUIET ticks (longer than the longest backoff plus a start):
        // exactly one member takes writes, under its lease.
        assert!(QUIET as u32 * TICK > RESTART_BACKOFF_MAX + sim.ttl * 4);
        assert_eq!(
            sim.pm,
            Postmaster::Up,
            "seed {seed}: no primary once faults stopped\n{}",
            sim.story()
        );
        assert!(sim.lease_ours(), "seed {seed}: writable without its lease");
    }
    eprintln!("{SEEDS} seeds: {restarts} restarts in place, {failovers} failovers");
    // The simulation exercised both ways out.
    assert!(restarts > 100, "restarts: {restarts}");
    assert!(failovers > 10, "failovers: {failovers}");
}
