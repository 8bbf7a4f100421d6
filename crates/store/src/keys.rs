//! The key layout: the one place that spells a key. Keys are relative to the store's root
//! (`/tandem/CLUSTER/` in etcd, nothing in the embedded store).
//!
//! | key | scope | what |
//! |---|---|---|
//! | `nodes/NODE` | session | the node's record: site, API address, version, start time, topology hash |
//! | `health/NODE/TARGET` | session | the node's verdict on a probe target (its vote) |
//! | `decisions/dns/PROFILE` | persistent | the leader's failback decision for a priority profile |
//! | `intent/endpoints/PROFILE/ENDPOINT` | persistent | an endpoint disabled by an operator |
//! | `intent/backends/LB/ADDRESS` | persistent | a backend drained by an operator |
//! | `intent/capacity/SET` | persistent | a scale set's capacity set by an operator |
//! | `intent/drill` | persistent | the drill in progress |
//! | `intent/reload` | persistent | the last reload asked for, with the topology's hash |
//! | `events/NODE/SEQ` | persistent | the node's recent events, SEQ zero-padded |
//! | `topology` | persistent | hash of the topology the cluster runs |
//! | `apps/APP/record` | persistent | where the app is active, its term and pin (the leader's) |
//! | `apps/APP/switchover` | persistent | a switchover of the app's database asked by the leader |
//! | `apps/APP/sites/SITE` | session | the site node's report: instances, capacity, member |
//! | `leases/NAME`, `terms/NAME` | (etcd store) | a lease's holder and term, and its last term |
//!
//! Lease names: [`LEADER`] (decisions taken once for the cluster), `databases/DB/leader`.

/// The lease of the node that takes the cluster's decisions taken once.
pub const LEADER: &str = "leader";

pub const NODES: &str = "nodes/";
pub const HEALTH: &str = "health/";
pub const DNS_DECISIONS: &str = "decisions/dns/";
pub const INTENT: &str = "intent/";
pub const EVENTS: &str = "events/";
pub const TOPOLOGY: &str = "topology";
pub const APPS: &str = "apps/";

/// Where an app is active (cluster mode), written by the leader.
pub fn app_record(app: &str) -> String {
    format!("{APPS}{app}/record")
}

/// A switchover of an app's database the leader asks of the primary's node.
pub fn app_switchover(app: &str) -> String {
    format!("{APPS}{app}/switchover")
}

/// A site node's report on its part of an app.
pub fn app_site(app: &str, site: &str) -> String {
    format!("{APPS}{app}/sites/{site}")
}

pub fn node(node: &str) -> String {
    format!("{NODES}{node}")
}

/// The node's vote on one probe target.
pub fn vote(node: &str, target: &str) -> String {
    format!("{HEALTH}{node}/{target}")
}

/// Every vote of one node.
pub fn votes_of(node: &str) -> String {
    format!("{HEALTH}{node}/")
}

/// `(node, target)` of a vote's key.
pub fn parse_vote(key: &str) -> Option<(&str, &str)> {
    key.strip_prefix(HEALTH)?.split_once('/')
}

pub fn dns_decision(profile: &str) -> String {
    format!("{DNS_DECISIONS}{profile}")
}

pub fn disabled_endpoint(profile: &str, endpoint: &str) -> String {
    format!("{INTENT}endpoints/{profile}/{endpoint}")
}

pub fn drained_backend(lb: &str, address: &str) -> String {
    format!("{INTENT}backends/{lb}/{address}")
}

pub fn capacity(set: &str) -> String {
    format!("{INTENT}capacity/{set}")
}

pub const DRILL: &str = "intent/drill";
pub const RELOAD: &str = "intent/reload";

/// One event of a node; `seq` orders a node's events.
pub fn event(node: &str, seq: u64) -> String {
    format!("{EVENTS}{node}/{seq:020}")
}

/// The lease record and the last-term record of a lease, in the etcd store.
pub fn lease(name: &str) -> String {
    format!("leases/{name}")
}

pub fn term(name: &str) -> String {
    format!("terms/{name}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn votes_split_into_node_and_target() {
        let k = vote("edge-1", "profile/www/edge");
        assert_eq!(k, "health/edge-1/profile/www/edge");
        assert_eq!(parse_vote(&k), Some(("edge-1", "profile/www/edge")));
        assert!(k.starts_with(&votes_of("edge-1")));
        assert_eq!(parse_vote("nodes/x"), None);
    }

    #[test]
    fn event_keys_sort_by_sequence() {
        assert!(event("a", 9) < event("a", 10));
    }
}
