//! Keeps the answer tables current: rebuilds them when health changes, when a failback hold
//! ends, and when the operator enables or disables an endpoint; publishes each rebuild whole;
//! and records every change of a profile's answer as an event with its reason.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use event::{Event, Source};
use model::{Routing, Topology};
use tokio::sync::{Notify, broadcast, watch};
use tokio::time::Instant;

use crate::failback::Failback;
use crate::server::Metrics;
use crate::table::{self, GeoDatabase, HealthView, Overrides, ProfileView, Tables};

/// A failback decision of the cluster's leader for one priority profile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// The endpoint that takes traffic; `None` when none was available to the leader.
    pub endpoint: Option<String>,
    /// The store revision of the decision, which grows with every new one.
    pub revision: u64,
}

/// No such profile or endpoint.
#[derive(Debug, thiserror::Error)]
pub enum NotFound {
    #[error("no profile {0:?}")]
    Profile(String),
    #[error("profile {0:?} has no endpoint {1:?}")]
    Endpoint(String, String),
}

struct State {
    overrides: Overrides,
    failbacks: HashMap<String, Failback>,
    next_wake: Option<Instant>,
    /// The cluster leader's failback decisions by profile while this node follows it; `None`:
    /// decide alone (single process, or cut off from the cluster).
    following: Option<HashMap<String, Decision>>,
    /// Decisions (by record revision) this node stopped following because their endpoint
    /// became unavailable here: it decides alone for that profile until the leader decides
    /// anew, so a stale decision (a leader cut off) cannot bring traffic back before the hold.
    /// Where taking the decision back is no failback (this node has nothing better available
    /// now), it is taken back: otherwise a node that saw everything down for a moment would
    /// pick the best endpoint at once while the leader holds.
    suspended: HashMap<String, u64>,
    /// This node's own decisions, by profile, as last computed.
    local: HashMap<String, Option<String>>,
    /// Why the next rebuild changes an answer when no endpoint changed state.
    reason: Option<String>,
}

/// The DNS traffic manager's control side.
pub struct Manager {
    topology: Arc<Topology>,
    health: Arc<dyn HealthView + Send + Sync>,
    tables: Arc<ArcSwap<Tables>>,
    pub metrics: Arc<Metrics>,
    state: Mutex<State>,
    events: broadcast::Sender<Event>,
    changed: Notify,
    /// Bumped when this node's own failback decisions change.
    decided: watch::Sender<u64>,
    serial: u32,
    geo: Option<GeoDatabase>,
    /// Serves queries (else only decides): only then are answer changes counted, logged and
    /// sent as events.
    serves: bool,
}

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager").finish_non_exhaustive()
    }
}

impl Manager {
    /// Builds the first tables: every endpoint is CheckingEndpoint until probed. Fails only
    /// when the `[geo] database` cannot be read.
    pub fn new(
        topology: Arc<Topology>,
        health: Arc<dyn HealthView + Send + Sync>,
    ) -> Result<Arc<Self>, String> {
        let geo = table::open_geo_database(&topology)?;
        Ok(Self::with_geo(topology, health, geo, true))
    }

    /// For a cluster node that serves no DNS but may lead: it decides failback for the DNS
    /// nodes and shows the answers, and answers no query, so it reads no `[geo] database`
    /// (geographic profiles then answer as without one).
    pub fn deciding(
        topology: Arc<Topology>,
        health: Arc<dyn HealthView + Send + Sync>,
    ) -> Arc<Self> {
        Self::with_geo(topology, health, None, false)
    }

    fn with_geo(
        topology: Arc<Topology>,
        health: Arc<dyn HealthView + Send + Sync>,
        geo: Option<GeoDatabase>,
        serves: bool,
    ) -> Arc<Self> {
        let serial = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(1, |d| d.as_secs() as u32);
        let failbacks = topology
            .profiles
            .iter()
            .filter(|p| p.routing == Routing::Priority)
            .map(|p| {
                (
                    p.name.to_string(),
                    Failback::new(p.endpoints.len(), p.failback_hold),
                )
            })
            .collect();
        let overrides = Overrides::default();
        let tables = Tables::build(&topology, &*health, &overrides, serial, geo.clone());
        let m = Arc::new(Manager {
            metrics: Arc::new(Metrics::new(topology.profiles.len())),
            topology,
            health,
            tables: Arc::new(ArcSwap::from_pointee(tables)),
            state: Mutex::new(State {
                overrides,
                failbacks,
                next_wake: None,
                following: None,
                suspended: HashMap::new(),
                local: HashMap::new(),
                reason: None,
            }),
            events: broadcast::Sender::new(1024),
            changed: Notify::new(),
            decided: watch::Sender::new(0),
            serial,
            geo,
            serves,
        });
        m.rebuild(Instant::now());
        m
    }

    /// The tables the server reads.
    pub fn tables(&self) -> Arc<ArcSwap<Tables>> {
        self.tables.clone()
    }

    /// Every change of a profile's answer, as it happens: source `dns`, subject the profile,
    /// kind `answer`, message `FROM -> TO: why` (the endpoints answered before and after, and
    /// the endpoint states that changed or the hold that ended).
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    pub fn views(&self) -> Vec<ProfileView> {
        self.tables.load().views().to_vec()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps the tables current until the task is dropped: on every health change (`health`
    /// is the probe engine's change counter), every failback deadline, every operator change.
    pub async fn run(self: Arc<Self>, mut health: watch::Receiver<u64>) {
        loop {
            let wake = self.state().next_wake;
            let deadline = async {
                match wake {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = health.changed() => if r.is_err() { return },
                () = deadline => {}
                () = self.changed.notified() => {}
            }
            self.rebuild(Instant::now());
        }
    }

    /// Follows the cluster leader's failback decisions (by priority profile), or with `None`
    /// decides alone again. Failover never waits for the leader: when the endpoint it chose is
    /// unavailable here, this node fails over at once and decides that profile alone (moving
    /// back only after its own hold) until the leader decides anew; failback otherwise
    /// happens when the leader says so, so every node moves back together, once.
    pub fn follow(&self, decisions: Option<HashMap<String, Decision>>) {
        {
            let mut st = self.state();
            if st.following == decisions {
                return;
            }
            st.following = decisions;
        }
        self.rebuild(Instant::now());
        self.changed.notify_one();
    }

    /// This node's own failback decisions, by priority profile (what a leader publishes).
    pub fn decisions(&self) -> HashMap<String, Option<String>> {
        self.state().local.clone()
    }

    /// Changes whenever [`Manager::decisions`] does.
    pub fn decisions_changed(&self) -> watch::Receiver<u64> {
        self.decided.subscribe()
    }

    /// Operator's switch for an endpoint; takes effect before this returns.
    pub fn set_enabled(
        &self,
        profile: &str,
        endpoint: &str,
        enabled: bool,
    ) -> Result<(), NotFound> {
        let p = self
            .topology
            .profile(profile)
            .ok_or_else(|| NotFound::Profile(profile.into()))?;
        if !p.endpoints.iter().any(|e| e.name.as_str() == endpoint) {
            return Err(NotFound::Endpoint(profile.into(), endpoint.into()));
        }
        {
            let mut st = self.state();
            let key = (profile.to_string(), endpoint.to_string());
            if enabled {
                st.overrides.disabled.remove(&key);
            } else {
                st.overrides.disabled.insert(key);
            }
        }
        self.rebuild(Instant::now());
        self.changed.notify_one();
        Ok(())
    }

    /// The site an `[[app]]` is active at, for its profile: only that site's endpoints are
    /// answered from now on (`None`: routing as configured). Takes effect before this returns;
    /// the answer's change is an event whose reason names the app's site.
    pub fn set_active_site(&self, profile: &str, site: Option<&str>) -> Result<(), NotFound> {
        if self.topology.profile(profile).is_none() {
            return Err(NotFound::Profile(profile.into()));
        }
        {
            let mut st = self.state();
            let before = st.overrides.active_site.get(profile).cloned();
            if before.as_deref() == site {
                return Ok(());
            }
            match site {
                Some(s) => {
                    st.overrides
                        .active_site
                        .insert(profile.to_string(), s.to_string());
                    st.reason = Some(format!("the app is active at {s}"));
                }
                None => {
                    st.overrides.active_site.remove(profile);
                }
            }
        }
        self.rebuild(Instant::now());
        self.changed.notify_one();
        Ok(())
    }

    /// Recomputes failback decisions and tables at `now`, publishes them, and records events.
    pub fn rebuild(&self, now: Instant) {
        let mut st = self.state();
        let statuses = table::endpoint_statuses(&self.topology, &*self.health, &st.overrides);
        let mut wake: Option<Instant> = None;
        let mut local_changed = false;
        // Profiles answered by the cluster leader's decision (the reason of a change there).
        let mut led = vec![false; self.topology.profiles.len()];
        let State {
            failbacks,
            following,
            suspended,
            local,
            overrides,
            ..
        } = &mut *st;
        for (pi, p) in self.topology.profiles.iter().enumerate() {
            let Some(fb) = failbacks.get_mut(p.name.as_str()) else {
                continue;
            };
            let order = table::priority_order(p);
            let rank_of = |name: &str| {
                order
                    .iter()
                    .position(|&i| p.endpoints[i].name.as_str() == name)
            };
            let avail: Vec<bool> = order
                .iter()
                .map(|&i| {
                    table::available(statuses[pi][i])
                        && !overrides.outside_active_site(&self.topology, p, &p.endpoints[i])
                })
                .collect();
            let followed = following.as_ref().and_then(|f| f.get(p.name.as_str()));
            let leader = match followed {
                Some(d) => {
                    let rank = d.endpoint.as_deref().and_then(rank_of);
                    // Taking the decision back after suspending it is refused only while it
                    // would be a failback (to a better endpoint than an available current one):
                    // that one waits for the leader's next decision or this node's own hold.
                    let failback = match (rank, fb.current()) {
                        (Some(r), Some(c)) => r < c && avail[c],
                        _ => false,
                    };
                    let held = suspended.get(p.name.as_str()) == Some(&d.revision) && failback;
                    // "None available" is no guidance to a node that has one available.
                    let usable = match rank {
                        Some(r) => avail[r],
                        None => !avail.contains(&true),
                    };
                    if !usable {
                        suspended.insert(p.name.to_string(), d.revision);
                        None
                    } else if held {
                        None
                    } else {
                        suspended.remove(p.name.as_str());
                        Some(rank)
                    }
                }
                None => None,
            };
            if let Some(rank) = leader {
                fb.adopt(rank);
                led[pi] = true;
            }
            let d = fb.decide(&avail, now);
            let name_of =
                |rank: Option<usize>| rank.map(|r| p.endpoints[order[r]].name.to_string());
            let mine = name_of(d.current);
            if local.get(p.name.as_str()) != Some(&mine) {
                local.insert(p.name.to_string(), mine);
                local_changed = true;
            }
            overrides
                .priority_current
                .insert(p.name.to_string(), leader.unwrap_or(d.current));
            wake = match (wake, d.wake_at) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        st.next_wake = wake;
        if local_changed {
            self.decided.send_modify(|v| *v += 1);
        }
        let tables = Tables::from_statuses(
            &self.topology,
            &statuses,
            &*self.health,
            &st.overrides,
            self.serial,
            self.geo.clone(),
        );
        let before = self.tables.load();
        let reason = st.reason.take();
        // A node that serves no DNS has no answer changes to tell.
        let told = if self.serves { before.views() } else { &[] };
        for (i, (old, new)) in told.iter().zip(tables.views()).enumerate() {
            let why = reason
                .as_deref()
                .or(if led.get(i).copied().unwrap_or(false) {
                    Some("the cluster leader's decision")
                } else {
                    None
                });
            if let Some(e) = change(old, new, why) {
                if let Some(n) = self.metrics.answer_changes.get(i) {
                    n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                // Events are shown wherever events are: info, not twice on a terminal.
                tracing::info!(profile = %e.subject, change = %e.message, all_down = new.all_down, "answer changed");
                let _ = self.events.send(e);
            }
        }
        self.tables.store(Arc::new(tables));
    }
}

fn answered(v: &ProfileView) -> Vec<String> {
    v.endpoints
        .iter()
        .filter(|e| e.answered)
        .map(|e| e.name.clone())
        .collect()
}

/// The event for a change of answered endpoints or of the all-down state, if any.
fn change(old: &ProfileView, new: &ProfileView, reason: Option<&str>) -> Option<Event> {
    let (from, to) = (answered(old), answered(new));
    if from == to && old.all_down == new.all_down {
        return None;
    }
    let mut reasons: Vec<String> = old
        .endpoints
        .iter()
        .zip(&new.endpoints)
        .filter(|(a, b)| a.status != b.status)
        .map(|(a, b)| format!("{} {} -> {}", b.name, a.status, b.status))
        .collect();
    if new.all_down && !old.all_down {
        reasons.push(format!("all endpoints down: {}", all_down_text(new)));
    } else if old.all_down && !new.all_down {
        reasons.push("an endpoint is available again".into());
    }
    if reasons.is_empty() {
        reasons.push(reason.unwrap_or("failback hold ended").into());
    }
    let list = |l: &[String]| {
        if l.is_empty() {
            "(none)".to_string()
        } else {
            l.join(",")
        }
    };
    Some(Event::new(
        Source::Dns,
        new.name.clone(),
        "answer",
        format!("{} -> {}: {}", list(&from), list(&to), reasons.join("; ")),
    ))
}

fn all_down_text(v: &ProfileView) -> &'static str {
    if v.endpoints.iter().any(|e| e.answered) {
        "serving all enabled endpoints"
    } else {
        "answering without records"
    }
}

/// The probe engine as the tables see it.
impl HealthView for health::Engine {
    fn status(&self, target: &str) -> Option<health::Status> {
        health::Engine::status(self, target)
    }

    fn latency(&self, target: &str) -> Option<std::time::Duration> {
        self.report(target)
            .and_then(|r| r.last_latency_ms)
            .map(|ms| std::time::Duration::from_secs_f64(ms / 1000.0))
    }
}
