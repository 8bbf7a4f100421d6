//! Applies operator intent to what this node runs: endpoint switches (every node: it answers
//! and probes every endpoint), drains of its load balancers' backends, its scale sets'
//! capacities, the drill of its site, reloads of its topology file. Applying is idempotent —
//! it compares the intent with what it applied last — so it runs on every change of the
//! intent records, at start (a restarted node applies what is stored), and when a drill ends.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use event::{Event, Source};

use crate::reload::Reloader;

/// What this node applied last.
#[derive(Debug, Default)]
struct Applied {
    disabled: BTreeSet<(String, String)>,
    drained: BTreeSet<(String, SocketAddr)>,
    capacity: BTreeMap<String, u32>,
    reload_at: Option<SystemTime>,
}

pub(crate) async fn run(api: api::Api, reload: Reloader) {
    let mut changes = api.intents.subscribe();
    let mut applied = Applied::default();
    loop {
        let revision = api.intents.revision();
        let set = api.intents.current();
        endpoints(&api, &set.disabled, &mut applied.disabled);
        drains(&api, &set.drained, &mut applied.drained);
        capacities(&api, &set.capacity, &mut applied.capacity).await;
        let now = SystemTime::now();
        let drill = set.drill.as_ref().map(|(d, _)| orchestrator::Drill {
            kind: d.kind.clone(),
            site: d.site.clone(),
            started: d.started,
            ends: d.ends,
        });
        api.drills.apply(drill.as_ref(), now);
        // The node of the drilled site ends a drill whose time is up.
        let mut wake = None;
        if let Some((d, r)) = &set.drill
            && api.runs(&d.site)
        {
            if d.over(now) {
                if let Err(e) = api.intents.end_drill(*r).await {
                    tracing::warn!(error = %e, "cannot clear the finished drill; retrying");
                    wake = Some(Duration::from_secs(1));
                }
            } else {
                wake = d.ends.duration_since(now).ok();
            }
        }
        if let Some(r) = &set.reload
            && applied.reload_at != Some(r.at)
        {
            applied.reload_at = Some(r.at);
            reload.apply(&api, &r.hash, &r.by).await;
        }
        api.intents.mark_applied(revision);
        let timer = async {
            match wake {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = changes.changed() => if r.is_err() { return },
            () = timer => {}
        }
    }
}

/// Every node answers and probes every endpoint: each applies every switch.
fn endpoints(
    api: &api::Api,
    want: &BTreeSet<(String, String)>,
    had: &mut BTreeSet<(String, String)>,
) {
    let off = want.difference(had).map(|k| (k, false));
    let on = had.difference(want).map(|k| (k, true));
    for ((profile, endpoint), enabled) in off.chain(on) {
        if let Some(dns) = &api.dns
            && let Err(e) = dns.set_enabled(profile, endpoint, enabled)
        {
            tracing::warn!(error = %e, "endpoint intent names nothing this node runs");
        }
        // Stop or resume probing it too; an endpoint without a probe has no target.
        let _ = api
            .engine
            .set_disabled(&health::endpoint_id(profile, endpoint), !enabled);
    }
    had.clone_from(want);
}

/// Drains of this node's load balancers' backends.
fn drains(
    api: &api::Api,
    want: &BTreeSet<(String, SocketAddr)>,
    had: &mut BTreeSet<(String, SocketAddr)>,
) {
    let start = want.difference(had).map(|k| (k, true));
    let stop = had.difference(want).map(|k| (k, false));
    for ((lb, addr), drain) in start.chain(stop) {
        let Some(b) = api
            .load_balancers
            .iter()
            .find(|b| b.config.name.as_str() == lb)
        else {
            continue; // another node's
        };
        let result = if drain {
            b.drain(*addr)
        } else {
            b.enable(*addr)
        };
        if let Err(e) = result {
            api.events.record(Event::new(
                Source::Cluster,
                format!("{lb}/{addr}"),
                "intent-ignored",
                format!(
                    "cannot {} {addr}: {e}",
                    if drain { "drain" } else { "enable" }
                ),
            ));
        }
    }
    had.clone_from(want);
}

/// Capacities of this node's scale sets.
async fn capacities(api: &api::Api, want: &BTreeMap<String, u32>, had: &mut BTreeMap<String, u32>) {
    for (set, n) in want {
        if had.get(set) == Some(n) {
            continue;
        }
        let Some(s) = api.scale_sets.iter().find(|s| &s.name == set) else {
            continue;
        };
        if let Err(e) = s.scale_to(*n).await {
            api.events.record(Event::new(
                Source::Cluster,
                set.clone(),
                "intent-ignored",
                format!("cannot scale {set} to {n}: {e}"),
            ));
        }
    }
    had.clone_from(want);
}
