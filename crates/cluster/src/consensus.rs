//! Health consensus: whether an endpoint is Degraded for DNS, from the votes of the live
//! vantage points (every node probes every monitored endpoint).
//!
//! Route 53 and Azure Traffic Manager probe from many places and fail an endpoint over only
//! when enough of them agree, so one prober with a bad path cannot move traffic. Here an
//! endpoint is **Degraded** when at least `health_quorum` of the live nodes say so
//! ([`model::Quorum::needed`]: a majority by default); else **Online** when any live node sees
//! it Online; else **CheckingEndpoint** (nobody has an opinion yet: innocent until proven
//! otherwise). A node's vote vanishes with its session, so a dead node neither fails nor saves
//! an endpoint. Disabled is the operator's and wins.

use health::Status;
use model::Quorum;

/// What the live vantage points say of one target.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// Live nodes, voting or not (at least the one asking).
    pub live: usize,
    pub online: usize,
    pub degraded: usize,
}

impl Tally {
    /// Counts `votes` (one per live node; `None` for a node with no opinion yet).
    pub fn of(votes: impl IntoIterator<Item = Option<Status>>) -> Self {
        let mut t = Tally::default();
        for v in votes {
            t.live += 1;
            match v {
                Some(Status::Online) => t.online += 1,
                Some(Status::Degraded) => t.degraded += 1,
                _ => {}
            }
        }
        t
    }

    /// The status DNS uses.
    pub fn status(&self, quorum: Quorum) -> Status {
        if self.degraded > 0 && self.degraded >= quorum.needed(self.live) {
            Status::Degraded
        } else if self.online > 0 {
            Status::Online
        } else {
            Status::CheckingEndpoint
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn votes(v: &[Option<Status>]) -> Tally {
        Tally::of(v.iter().copied())
    }

    const D: Option<Status> = Some(Status::Degraded);
    const O: Option<Status> = Some(Status::Online);

    #[test]
    fn one_vantage_point_cannot_fail_an_endpoint_over() {
        assert_eq!(votes(&[D, O, O]).status(Quorum::Majority), Status::Online);
        assert_eq!(votes(&[D, D, O]).status(Quorum::Majority), Status::Degraded);
        assert_eq!(
            votes(&[D, None, None]).status(Quorum::Majority),
            Status::CheckingEndpoint
        );
    }

    #[test]
    fn a_dead_nodes_vote_is_gone_with_it() {
        // Edge node killed: its LB is gone, the two survivors agree.
        assert_eq!(votes(&[D, D]).status(Quorum::Majority), Status::Degraded);
        // Two sites, one survivor: it decides alone.
        assert_eq!(votes(&[D]).status(Quorum::Majority), Status::Degraded);
    }

    #[test]
    fn a_fixed_quorum_is_capped_by_the_live_nodes() {
        assert_eq!(votes(&[D, O, O]).status(Quorum::Count(1)), Status::Degraded);
        assert_eq!(votes(&[D, D]).status(Quorum::Count(3)), Status::Degraded);
        assert_eq!(votes(&[D, O, O]).status(Quorum::Count(2)), Status::Online);
    }

    fn vote() -> impl Strategy<Value = Option<Status>> {
        prop_oneof![Just(None), Just(O), Just(D)]
    }

    proptest! {
        /// Over any votes: Degraded exactly when a quorum says so; never Degraded on a
        /// minority of a majority quorum; adding a Degraded vote never turns Degraded into
        /// something else (monotone), and removing a node's vote can only help its side lose.
        #[test]
        fn invariants(v in proptest::collection::vec(vote(), 1..9), q in 1u32..9) {
            for quorum in [Quorum::Majority, Quorum::Count(q)] {
                let t = Tally::of(v.iter().copied());
                let s = t.status(quorum);
                prop_assert_eq!(s == Status::Degraded, t.degraded >= quorum.needed(t.live) && t.degraded > 0);
                if quorum == Quorum::Majority && s == Status::Degraded {
                    prop_assert!(2 * t.degraded > t.live);
                }
                let mut more = v.clone();
                if let Some(slot) = more.iter_mut().find(|x| **x != D) {
                    *slot = D;
                    if s == Status::Degraded {
                        prop_assert_eq!(Tally::of(more.iter().copied()).status(quorum), Status::Degraded);
                    }
                }
            }
        }
    }
}
