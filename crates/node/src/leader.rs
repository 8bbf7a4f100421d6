//! DNS failback decided once for the cluster: the node holding the leader lease decides
//! (its failback controllers, on the cluster's consensus) and publishes each priority
//! profile's endpoint, fenced by its term; every other node follows it, so all DNS nodes move
//! back to a recovered endpoint together, after one hold. A node cut off from the store
//! decides alone from the last decision it saw.

use std::sync::Arc;

pub(crate) async fn run(node: Arc<cluster::Node>, dns: Arc<dns::manager::Manager>) {
    let mut leadership = node.leadership_changes();
    let mut changes = node.subscribe();
    let mut decided = dns.decisions_changed();
    loop {
        // A leader just back from a cut decides once its view is current again: deciding on
        // the stale one would move every node for a moment.
        if node.leadership().me && node.fresh() {
            dns.follow(None);
            for (profile, endpoint) in dns.decisions() {
                if let Err(e) = node.publish_decision(&profile, endpoint).await {
                    tracing::warn!(%profile, error = %e, "cannot publish the failback decision");
                }
            }
        } else {
            let decisions = node.decisions().map(|all| {
                all.into_iter()
                    .map(|(profile, (endpoint, revision))| {
                        (profile, dns::manager::Decision { endpoint, revision })
                    })
                    .collect()
            });
            dns.follow(decisions);
        }
        tokio::select! {
            r = leadership.changed() => if r.is_err() { return },
            r = changes.changed() => if r.is_err() { return },
            r = decided.changed() => if r.is_err() { return },
        }
    }
}
