//! The failover decisions, free of I/O: which standby may be promoted, when a primary that
//! cannot renew its lease must stop taking writes, which standby to make synchronous.

use std::time::Duration;

use model::Replication;

/// A standby that could be promoted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Standby {
    pub site: String,
    /// Answers SQL and is still a standby.
    pub reachable: bool,
    /// The furthest position it has received.
    pub lsn: u64,
}

/// The standby to promote, or why none may be.
///
/// Sync mode: only the standby the primary last confirmed as synchronous; it has every
/// acknowledged commit, any other may not. Async mode: the most advanced reachable standby no
/// further behind the primary's last known position than `max_lag` (ties: the earlier member).
pub fn choose(
    mode: Replication,
    max_lag: u64,
    sync_standby: Option<&str>,
    primary_lsn: u64,
    standbys: &[Standby],
) -> Result<String, String> {
    match mode {
        Replication::Sync | Replication::SyncStrict => {
            let Some(name) = sync_standby else {
                return Err("no standby was synchronous when the primary was lost: promoting one could lose acknowledged writes".into());
            };
            match standbys.iter().find(|s| s.site == name) {
                Some(s) if s.reachable => Ok(s.site.clone()),
                _ => Err(format!(
                    "the synchronous standby {name} is not reachable; no other has every acknowledged write"
                )),
            }
        }
        Replication::Async => {
            let mut best: Option<&Standby> = None;
            for s in standbys.iter().filter(|s| s.reachable) {
                if best.is_none_or(|b| s.lsn > b.lsn) {
                    best = Some(s);
                }
            }
            let Some(best) = best else {
                return Err("no standby is reachable".into());
            };
            let behind = primary_lsn.saturating_sub(best.lsn);
            if behind > max_lag {
                return Err(format!(
                    "the most advanced standby {} is {behind} bytes behind the primary's last known position (max_lag_on_failover {max_lag})",
                    best.site
                ));
            }
            Ok(best.site.clone())
        }
    }
}

/// When a primary that has not renewed its lease since `renewed` must stop taking writes: a
/// third of the lease before it expires, so it is fenced before anyone else may be promoted.
pub fn fence_after(ttl: Duration) -> Duration {
    ttl * 2 / 3
}

/// The standby to name in `synchronous_standby_names`: the current one while it streams,
/// else the first streaming one in member order.
pub fn sync_choice<'a>(current: Option<&'a str>, streaming: &[&'a str]) -> Option<&'a str> {
    match current {
        Some(c) if streaming.contains(&c) => Some(c),
        _ => streaming.first().copied(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    fn s(site: &str, reachable: bool, lsn: u64) -> Standby {
        Standby {
            site: site.into(),
            reachable,
            lsn,
        }
    }

    #[test]
    fn sync_mode_promotes_only_the_synchronous_standby() {
        let list = [s("a", true, 900), s("b", true, 100)];
        assert_eq!(
            choose(Replication::Sync, 0, Some("b"), 1000, &list).unwrap(),
            "b"
        );
        assert!(choose(Replication::Sync, 0, None, 1000, &list).is_err());
        let down = [s("a", true, 900), s("b", false, 100)];
        assert!(choose(Replication::Sync, 0, Some("b"), 1000, &down).is_err());
    }

    #[test]
    fn async_mode_promotes_the_most_advanced_within_the_lag_limit() {
        let list = [s("a", true, 500), s("b", true, 900), s("c", false, 1000)];
        assert_eq!(
            choose(Replication::Async, 200, None, 1000, &list).unwrap(),
            "b"
        );
        let err = choose(Replication::Async, 50, None, 1000, &list).unwrap_err();
        assert!(err.contains("100 bytes behind"), "{err}");
    }

    #[test]
    fn sync_choice_keeps_a_streaming_standby() {
        assert_eq!(sync_choice(Some("b"), &["a", "b"]), Some("b"));
        assert_eq!(sync_choice(Some("c"), &["a", "b"]), Some("a"));
        assert_eq!(sync_choice(None, &[]), None);
    }

    proptest! {
        #[test]
        fn a_choice_always_honours_the_mode(
            sync in proptest::option::of(0usize..4),
            lsns in proptest::collection::vec((any::<bool>(), 0u64..2000), 1..4),
            primary in 0u64..2000,
            max_lag in 0u64..1000,
        ) {
            let list: Vec<Standby> = lsns.iter().enumerate()
                .map(|(i, (r, l))| s(&format!("m{i}"), *r, *l)).collect();
            let sync_name = sync.map(|i| format!("m{i}"));
            if let Ok(c) = choose(Replication::Sync, max_lag, sync_name.as_deref(), primary, &list) {
                prop_assert_eq!(Some(&c), sync_name.as_ref());
                prop_assert!(list.iter().any(|x| x.site == c && x.reachable));
            }
            if let Ok(c) = choose(Replication::Async, max_lag, None, primary, &list) {
                let chosen = list.iter().find(|x| x.site == c).unwrap();
                prop_assert!(chosen.reachable);
                prop_assert!(primary.saturating_sub(chosen.lsn) <= max_lag);
                prop_assert!(list.iter().filter(|x| x.reachable).all(|x| x.lsn <= chosen.lsn));
            }
        }
    }
}
