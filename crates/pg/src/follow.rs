//! Cluster mode's rules for one node about a database's lease, sans IO. Each tick the driver
//! says how the lease stands in the store and what it sees of every member; it gets back the
//! steps to take, in order. The lease holder's own rules (renew, restart in place, fence) are
//! [`crate::lead::Lead`]'s; these are every node's: who leads, which of its own members must
//! never take a write, when its own standby is promoted, where its site's frontends point.
//! `tests/cluster_sim.rs` runs them with `Lead` on virtual time for several nodes at once.
//!
//! The rules:
//! - the lease's holder leads; a member of this node that answers as writable while the lease
//!   is another member's is fenced at once;
//! - a lease handed to this node's standby (a switchover run by the old primary's node, which
//!   waited until the standby had every record) is taken up by promoting it;
//! - once the lease is free and the member a failover may promote (`candidate`: the recorded
//!   synchronous standby in sync mode) is this node's, the node takes the lease with the next
//!   term and promotes it. A node never promotes another node's member;
//! - the frontends point at another node's primary while its lease lives and it was seen
//!   writable within [`fence_after`] of the lease (its own node would have fenced it by then),
//!   else at nothing.

use std::time::Duration;

use tokio::time::Instant;

use crate::failover::fence_after;

/// The lease as the store answered this tick.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseSeen {
    /// Held by member `holder`.
    Held { holder: usize },
    /// Nobody holds it (it lapsed, or was released).
    Free,
    /// The store did not answer: nothing can be decided.
    Unknown,
}

/// One member as this node sees it this tick.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemberSeen {
    /// This node runs it.
    pub here: bool,
    /// Its postmaster runs (known for this node's members only).
    pub running: bool,
    /// It answered SQL as a writable server.
    pub writable: bool,
    /// It answered SQL in recovery.
    pub standby: bool,
    /// Its data is a primary's, not marked a standby's (known for this node's members only).
    pub primary: bool,
}

/// One step, in the order given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Member `i` leads now (the lease changed hands since the last tick).
    Follow(usize),
    /// This node's member `i` takes writes while the lease is another's: kill it.
    Fence(usize),
    /// The lease was handed to this node's standby `i`: promote it.
    TakeUp(usize),
    /// The lease is free and this node's member `i` may be promoted: take the lease with the
    /// next term, then promote it.
    FailOver(usize),
    /// This site's frontends: at member `i`'s address, or at nothing.
    Point(Option<usize>),
}

/// A node's memory between ticks.
#[derive(Clone, Debug)]
pub struct Follower {
    ttl: Duration,
    /// Who leads, as last seen.
    pub leader: Option<usize>,
    /// When another node's primary was last seen writable under its lease.
    pub seen: Instant,
}

impl Follower {
    pub fn new(ttl: Duration, now: Instant) -> Follower {
        Follower {
            ttl,
            leader: None,
            seen: now,
        }
    }

    /// The steps for this tick. `candidate` is the member a failover may promote now, if any
    /// (only used when the lease is free).
    pub fn decide(
        &mut self,
        lease: LeaseSeen,
        members: &[MemberSeen],
        candidate: Option<usize>,
        now: Instant,
    ) -> Vec<Step> {
        let mut steps = Vec::new();
        match lease {
            LeaseSeen::Unknown => {}
            LeaseSeen::Held { holder } => {
                if self.leader != Some(holder) {
                    self.leader = Some(holder);
                    self.seen = now;
                    steps.push(Step::Follow(holder));
                }
                for (i, m) in members.iter().enumerate() {
                    if i != holder && m.here && m.running && m.writable {
                        steps.push(Step::Fence(i));
                    }
                }
                let h = members[holder];
                if h.here {
                    if h.running && h.standby {
                        steps.push(Step::TakeUp(holder));
                    }
                } else {
                    if h.writable {
                        self.seen = now;
                    }
                    let fresh = now < self.seen + fence_after(self.ttl);
                    steps.push(Step::Point(fresh.then_some(holder)));
                }
            }
            LeaseSeen::Free => {
                // This node's own lapsed lease is its lease holder's business (`Lead` takes
                // it again, or fences); anyone else's means a failover may be due.
                if self
                    .leader
                    .is_some_and(|l| members[l].here && members[l].primary)
                {
                    return steps;
                }
                // Nobody's lease: a member of this node taking writes is fenced.
                for (i, m) in members.iter().enumerate() {
                    if m.here && m.running && m.writable {
                        steps.push(Step::Fence(i));
                    }
                }
                steps.push(Step::Point(None));
                if let Some(c) = candidate.filter(|&c| members[c].here) {
                    steps.push(Step::FailOver(c));
                }
            }
        }
        steps
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(3);

    fn remote(writable: bool) -> MemberSeen {
        MemberSeen {
            here: false,
            running: false,
            writable,
            standby: !writable,
            primary: false,
        }
    }

    fn local(writable: bool) -> MemberSeen {
        MemberSeen {
            here: true,
            running: true,
            writable,
            standby: !writable,
            primary: writable,
        }
    }

    #[test]
    fn another_nodes_primary_is_followed_and_pointed_at_while_seen() {
        let t0 = Instant::now();
        let mut f = Follower::new(TTL, t0);
        let members = [remote(true), local(false)];
        let steps = f.decide(LeaseSeen::Held { holder: 0 }, &members, None, t0);
        assert_eq!(steps, [Step::Follow(0), Step::Point(Some(0))]);
        let unseen = [remote(false), local(false)];
        let later = t0 + fence_after(TTL);
        assert_eq!(
            f.decide(LeaseSeen::Held { holder: 0 }, &unseen, None, later),
            [Step::Point(None)]
        );
    }

    #[test]
    fn a_local_member_writable_without_the_lease_is_fenced() {
        let t0 = Instant::now();
        let mut f = Follower::new(TTL, t0);
        let members = [remote(true), local(true)];
        let steps = f.decide(LeaseSeen::Held { holder: 0 }, &members, None, t0);
        assert!(steps.contains(&Step::Fence(1)), "{steps:?}");
    }

    #[test]
    fn a_handed_lease_is_taken_up_and_a_free_one_taken_by_the_local_candidate_only() {
        let t0 = Instant::now();
        let mut f = Follower::new(TTL, t0);
        let members = [remote(false), local(false)];
        let steps = f.decide(LeaseSeen::Held { holder: 1 }, &members, None, t0);
        assert_eq!(steps, [Step::Follow(1), Step::TakeUp(1)]);

        let mut f = Follower::new(TTL, t0);
        f.leader = Some(0);
        assert_eq!(
            f.decide(LeaseSeen::Free, &members, Some(1), t0),
            [Step::Point(None), Step::FailOver(1)]
        );
        assert_eq!(
            f.decide(LeaseSeen::Free, &members, Some(0), t0),
            [Step::Point(None)],
            "another node's member is its node's to promote"
        );
        assert!(
            f.decide(LeaseSeen::Unknown, &members, Some(1), t0)
                .is_empty()
        );
    }

    #[test]
    fn this_nodes_own_lapsed_lease_is_left_to_its_lease_holder() {
        let t0 = Instant::now();
        let mut f = Follower::new(TTL, t0);
        f.leader = Some(1);
        let members = [remote(false), local(true)];
        assert!(f.decide(LeaseSeen::Free, &members, Some(1), t0).is_empty());
    }
}
