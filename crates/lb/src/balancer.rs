//! One load balancer's control side: its backends, their health, draining, and the snapshot the
//! relays read when a flow starts (rebuilt on changes, never per flow).
//!
//! Which backends take new flows: `Online` ones, not draining. While none is `Online` but some
//! have no probe result yet (`CheckingEndpoint`, at start), those are tried, so a fresh balancer
//! does not refuse everything until the first probe. With none at all, `all_down` decides:
//! `refuse` (default) or `send-all` (every backend that is not draining).
//!
//! Which backends keep their established flows ([`Snapshot::keeps`], read by the UDP relay; TCP
//! flows end on `Stats::kill` instead): those taking new flows, and any member whose probe does
//! not say it is down (`Online`, or no result yet); but a draining backend, and a member that
//! left the pool, only until `drain_timeout` after.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use arc_swap::ArcSwap;
use event::{Event, Source};
use health::Status;
use model::{LbAllDown, LoadBalancer, OnBackendDown, Pool};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, watch};
use tokio::time::Instant;

/// What the balancer needs of health.
pub trait BackendHealth: Send + Sync {
    /// Status of a probe target; `None` when not probed.
    fn status(&self, target: &str) -> Option<Status>;
    /// A failure seen by the data plane (a refused connect): out at once, back via the probe.
    fn eject(&self, target: &str, reason: &str);
}

impl BackendHealth for health::Engine {
    fn status(&self, target: &str) -> Option<Status> {
        health::Engine::status(self, target)
    }

    fn eject(&self, target: &str, reason: &str) {
        let _ = health::Engine::eject(self, target, reason);
    }
}

/// Counters of one backend, kept across snapshots. Relaxed atomics: counts only.
#[derive(Debug)]
pub struct Stats {
    pub active: AtomicU64,
    pub total: AtomicU64,
    /// Bytes from clients to the backend, and back.
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub ejections: AtomicU64,
    pub failed_connects: AtomicU64,
    /// Flow directions that switched to zero-copy relaying (bulk traffic).
    pub spliced: AtomicU64,
    /// Bumped to end every flow of the backend (drain deadline, reset on probe-down, site
    /// down): TCP flows are reset, UDP flows forgotten (their next datagram chooses again).
    pub kill: watch::Sender<u64>,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            active: AtomicU64::new(0),
            total: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            ejections: AtomicU64::new(0),
            failed_connects: AtomicU64::new(0),
            spliced: AtomicU64::new(0),
            kill: watch::Sender::new(0),
        }
    }
}

/// A pool member.
#[derive(Debug)]
pub struct Backend {
    pub addr: SocketAddr,
    pub weight: u32,
    /// Its probe target, when the pool has a probe.
    pub health_id: Option<String>,
    pub stats: Arc<Stats>,
}

/// What a new flow may use, and which established flows may stay where they are.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Grows with every rebuild, so a flow re-checks its backend only when something changed.
    pub generation: u64,
    pub backends: Vec<Arc<Backend>>,
    /// Indexes of backends that take new flows.
    pub eligible: Vec<usize>,
    /// Backends that keep their established flows, with a deadline for those draining or out
    /// of the pool.
    pub keeping: Vec<(SocketAddr, Option<Instant>)>,
}

/// Whether an established flow may stay on its backend ([`Snapshot::keeps`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Keep {
    /// For as long as this snapshot holds.
    Yes,
    /// Draining or out of the pool: until this deadline.
    Until(Instant),
    /// Probed down, drained, gone: the flow must choose again.
    No,
}

impl Snapshot {
    /// Whether a flow on the backend `addr` stays there. A scan of the pool: call it when the
    /// generation changed, not per packet.
    pub fn keeps(&self, addr: SocketAddr) -> Keep {
        match self.keeping.iter().find(|(a, _)| *a == addr) {
            Some((_, None)) => Keep::Yes,
            Some((_, Some(until))) => Keep::Until(*until),
            None => Keep::No,
        }
    }
}

/// One backend as the API shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BackendView {
    pub address: SocketAddr,
    pub weight: u32,
    pub status: Status,
    pub draining: bool,
    pub takes_new_flows: bool,
    pub active_connections: u64,
    pub total_connections: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub ejections: u64,
    pub failed_connects: u64,
    pub spliced_directions: u64,
}

/// One load balancer as the API shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct View {
    pub name: String,
    pub site: String,
    pub kind: String,
    pub protocol: String,
    pub distribution: String,
    pub frontends: Vec<String>,
    pub backends: Vec<BackendView>,
}

/// No such backend in the pool.
#[derive(Debug, thiserror::Error)]
#[error("load balancer {0:?} has no backend {1}")]
pub struct UnknownBackend(pub String, pub SocketAddr);

struct State {
    members: Vec<Arc<Backend>>,
    draining: HashMap<SocketAddr, Instant>,
    /// Members that left the pool, with the end of their flows' grace (`drain_timeout`).
    leaving: HashMap<SocketAddr, (Arc<Backend>, Instant)>,
    last_status: HashMap<SocketAddr, Status>,
    generation: u64,
}

/// A load balancer's control side, shared with its relays.
pub struct Balancer {
    pub config: LoadBalancer,
    health: Arc<dyn BackendHealth>,
    state: Mutex<State>,
    snapshot: ArcSwap<Snapshot>,
    events: broadcast::Sender<Event>,
}

impl std::fmt::Debug for Balancer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Balancer")
            .field("name", &self.config.name.as_str())
            .finish_non_exhaustive()
    }
}

impl Balancer {
    /// A balancer over its configured static addresses (scale set and database pools start
    /// empty and are filled with [`Balancer::set_members`]).
    pub fn new(config: LoadBalancer, health: Arc<dyn BackendHealth>) -> Arc<Self> {
        let probed = config.probe.is_some();
        let members = match &config.pool {
            Pool::Addresses(list) => list
                .iter()
                .map(|b| {
                    Arc::new(Backend {
                        addr: b.address,
                        weight: b.weight,
                        health_id: probed.then(|| health::backend_id(&config.name, b.address)),
                        stats: Arc::new(Stats::default()),
                    })
                })
                .collect(),
            _ => Vec::new(),
        };
        let b = Arc::new(Balancer {
            config,
            health,
            state: Mutex::new(State {
                members,
                draining: HashMap::new(),
                leaving: HashMap::new(),
                last_status: HashMap::new(),
                generation: 0,
            }),
            snapshot: ArcSwap::from_pointee(Snapshot::default()),
            events: broadcast::Sender::new(256),
        });
        b.rebuild();
        b
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn snapshot(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.snapshot.load()
    }

    /// Every backend change: source `lb`, subject `LB/ADDRESS`, kind `ejected`, `draining`,
    /// `drained`, `enabled`, `down` or `up`, message why.
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    fn event(&self, backend: SocketAddr, what: &'static str, reason: String) {
        tracing::info!(lb = %self.config.name, %backend, what, %reason, "backend");
        let subject = format!("{}/{backend}", self.config.name);
        let _ = self
            .events
            .send(Event::new(Source::Lb, subject, what, reason));
    }

    /// Replaces the pool's members (scale set instances, the database primary). Members that
    /// stay keep their counters and flows; members that leave stop taking new flows, as a
    /// drained backend does: their TCP flows continue until they end, their UDP flows (which
    /// never end while the client talks) move after `drain_timeout`.
    pub fn set_members(&self, members: Vec<(SocketAddr, u32, Option<String>)>) {
        {
            let mut guard = self.state();
            let st = &mut *guard;
            let mut old: HashMap<SocketAddr, Arc<Backend>> = st
                .leaving
                .iter()
                .map(|(a, (b, _))| (*a, b.clone()))
                .collect();
            old.extend(st.members.iter().map(|b| (b.addr, b.clone())));
            let members: Vec<Arc<Backend>> = members
                .into_iter()
                .map(|(addr, weight, health_id)| match old.get(&addr) {
                    Some(b) if b.weight == weight && b.health_id == health_id => b.clone(),
                    _ => Arc::new(Backend {
                        addr,
                        weight,
                        health_id,
                        stats: old
                            .get(&addr)
                            .map_or_else(|| Arc::new(Stats::default()), |b| b.stats.clone()),
                    }),
                })
                .collect();
            let now = Instant::now();
            let grace = self.config.drain_timeout;
            let staying: HashSet<SocketAddr> = members.iter().map(|b| b.addr).collect();
            for b in &st.members {
                if !staying.contains(&b.addr) {
                    // A drain already under way ends no later than it would have.
                    let until = st
                        .draining
                        .get(&b.addr)
                        .map_or(now + grace, |started| (*started + grace).min(now + grace));
                    st.leaving.insert(b.addr, (b.clone(), until));
                }
            }
            st.leaving.retain(|addr, _| !staying.contains(addr));
            st.members = members;
        }
        self.rebuild();
    }

    fn status(&self, b: &Backend) -> Status {
        match &b.health_id {
            Some(id) => self.health.status(id).unwrap_or(Status::CheckingEndpoint),
            None => Status::Online,
        }
    }

    /// Recomputes which backends take new flows and which keep theirs, and applies
    /// `on_backend_down`.
    pub fn rebuild(&self) {
        let mut reset = Vec::new();
        {
            let mut st = self.state();
            self.rebuild_locked(&mut st, &mut reset);
        }
        // After the new snapshot is out, so a flow that ends and chooses again avoids them.
        for stats in reset {
            stats.kill.send_modify(|g| *g += 1);
        }
    }

    fn rebuild_locked(&self, st: &mut State, reset: &mut Vec<Arc<Stats>>) {
        let statuses: Vec<Status> = st.members.iter().map(|b| self.status(b)).collect();
        for (b, s) in st.members.iter().zip(&statuses) {
            let before = st.last_status.get(&b.addr).copied();
            if before.is_some_and(|p| p != *s) {
                let (what, went_down) = match s {
                    Status::Online => ("up", false),
                    Status::Degraded => ("down", true),
                    _ => ("changed", false),
                };
                let mut reason = format!("probe: {} -> {s}", before.unwrap_or(*s));
                if went_down && self.config.on_backend_down == OnBackendDown::Reset {
                    reset.push(b.stats.clone());
                    reason.push_str("; its flows are reset (on_backend_down = reset)");
                }
                self.event(b.addr, what, reason);
            }
        }
        st.last_status = st
            .members
            .iter()
            .zip(&statuses)
            .map(|(b, s)| (b.addr, *s))
            .collect();
        let open: Vec<usize> = (0..st.members.len())
            .filter(|&i| !st.draining.contains_key(&st.members[i].addr))
            .collect();
        let with = |want: Status| -> Vec<usize> {
            open.iter()
                .copied()
                .filter(|&i| statuses[i] == want)
                .collect()
        };
        let mut eligible = with(Status::Online);
        if eligible.is_empty() {
            eligible = with(Status::CheckingEndpoint);
        }
        if eligible.is_empty() && self.config.all_down == LbAllDown::SendAll {
            eligible = open;
        }
        // Established flows stay where the probe does not say down; draining and departed
        // backends keep theirs only until their deadline.
        let now = Instant::now();
        let up = |s: Status| matches!(s, Status::Online | Status::CheckingEndpoint);
        let grace = self.config.drain_timeout;
        st.leaving.retain(|_, (_, until)| *until > now);
        let mut keeping: Vec<(SocketAddr, Option<Instant>)> = (0..st.members.len())
            .filter_map(|i| {
                let addr = st.members[i].addr;
                match st.draining.get(&addr) {
                    None if up(statuses[i]) || eligible.contains(&i) => Some((addr, None)),
                    Some(started) if up(statuses[i]) && *started + grace > now => {
                        Some((addr, Some(*started + grace)))
                    }
                    _ => None,
                }
            })
            .collect();
        keeping.extend(
            st.leaving
                .values()
                .filter(|(b, _)| up(self.status(b)))
                .map(|(b, until)| (b.addr, Some(*until))),
        );
        st.generation += 1;
        self.snapshot.store(Arc::new(Snapshot {
            generation: st.generation,
            backends: st.members.clone(),
            eligible,
            keeping,
        }));
    }

    /// A connect to `b` failed: count it and eject it (it returns through its probe).
    pub fn connect_failed(&self, b: &Backend, why: &str) {
        b.stats.failed_connects.fetch_add(1, Ordering::Relaxed);
        let Some(id) = &b.health_id else {
            return; // without a probe nothing would bring it back: retry only
        };
        if self.health.status(id) == Some(Status::Degraded) {
            return;
        }
        b.stats.ejections.fetch_add(1, Ordering::Relaxed);
        self.health.eject(id, why);
        self.event(b.addr, "ejected", format!("passive: {why}"));
        // Now, not when the engine's change notice arrives: the very next flow must avoid it.
        self.rebuild();
    }

    /// Stops new flows to a backend; its flows get `drain_timeout` to finish, then are reset.
    pub fn drain(self: &Arc<Self>, addr: SocketAddr) -> Result<(), UnknownBackend> {
        let stats = self.member(addr)?.stats.clone();
        let started = Instant::now();
        self.state().draining.insert(addr, started);
        self.rebuild();
        let timeout = self.config.drain_timeout;
        self.event(
            addr,
            "draining",
            format!(
                "operator; {} active flows get {}",
                stats.active.load(Ordering::Relaxed),
                model::units::format_duration(timeout)
            ),
        );
        let me = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(started + timeout).await;
            let still = me.state().draining.get(&addr) == Some(&started);
            if still {
                let left = stats.active.load(Ordering::Relaxed);
                stats.kill.send_modify(|g| *g += 1);
                me.event(
                    addr,
                    "drained",
                    format!("drain timeout; {left} flows reset"),
                );
            }
        });
        Ok(())
    }

    /// Takes a drained backend back.
    pub fn enable(&self, addr: SocketAddr) -> Result<(), UnknownBackend> {
        self.member(addr)?;
        self.state().draining.remove(&addr);
        self.rebuild();
        self.event(addr, "enabled", "operator".into());
        Ok(())
    }

    fn member(&self, addr: SocketAddr) -> Result<Arc<Backend>, UnknownBackend> {
        self.state()
            .members
            .iter()
            .find(|b| b.addr == addr)
            .cloned()
            .ok_or_else(|| UnknownBackend(self.config.name.to_string(), addr))
    }

    /// Resets every established flow (the site is going down).
    pub fn reset_flows(&self) {
        for b in &self.state().members {
            b.stats.kill.send_modify(|g| *g += 1);
        }
    }

    /// The counters of a member, which stay valid after it leaves the pool.
    pub fn stats(&self, addr: SocketAddr) -> Option<Arc<Stats>> {
        self.member(addr).ok().map(|b| b.stats.clone())
    }

    /// The frontends as `proto ip:port -> backend port`.
    pub fn frontends(&self) -> Vec<(SocketAddr, Option<u16>)> {
        let c = &self.config;
        let mut out = vec![(c.frontend, None)];
        for r in &c.rules {
            out.push((
                SocketAddr::new(c.frontend.ip(), r.frontend_port),
                Some(r.backend_port),
            ));
        }
        out
    }

    pub fn view(&self) -> View {
        let snap = self.snapshot();
        let st = self.state();
        let c = &self.config;
        View {
            name: c.name.to_string(),
            site: c.site.to_string(),
            kind: c.kind.to_string(),
            protocol: c.protocol.to_string(),
            distribution: c.distribution.to_string(),
            frontends: self
                .frontends()
                .iter()
                .map(|(a, port)| match port {
                    Some(p) => format!("{} {a} -> backend port {p}", c.protocol),
                    None => format!("{} {a}", c.protocol),
                })
                .collect(),
            backends: snap
                .backends
                .iter()
                .enumerate()
                .map(|(i, b)| BackendView {
                    address: b.addr,
                    weight: b.weight,
                    status: st
                        .last_status
                        .get(&b.addr)
                        .copied()
                        .unwrap_or(Status::CheckingEndpoint),
                    draining: st.draining.contains_key(&b.addr),
                    takes_new_flows: snap.eligible.contains(&i),
                    active_connections: b.stats.active.load(Ordering::Relaxed),
                    total_connections: b.stats.total.load(Ordering::Relaxed),
                    bytes_in: b.stats.bytes_in.load(Ordering::Relaxed),
                    bytes_out: b.stats.bytes_out.load(Ordering::Relaxed),
                    ejections: b.stats.ejections.load(Ordering::Relaxed),
                    failed_connects: b.stats.failed_connects.load(Ordering::Relaxed),
                    spliced_directions: b.stats.spliced.load(Ordering::Relaxed),
                })
                .collect(),
        }
    }

    /// Keeps the snapshot current with health (the engine's change counter).
    pub async fn follow_health(self: Arc<Self>, mut health: watch::Receiver<u64>) {
        while health.changed().await.is_ok() {
            self.rebuild();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Health set by the test.
    #[derive(Default)]
    struct Fake(Mutex<HashMap<String, Status>>);

    impl BackendHealth for Fake {
        fn status(&self, target: &str) -> Option<Status> {
            self.0.lock().unwrap().get(target).copied()
        }

        fn eject(&self, _: &str, _: &str) {}
    }

    const A: &str = "127.0.0.2:53";
    const B: &str = "127.0.0.3:53";

    fn setup() -> (Arc<Balancer>, Arc<Fake>) {
        let text = format!(
            "[[site]]\nname = \"edge\"\nrole = \"edge\"\n\
             [[monitor]]\nname = \"alive\"\nprotocol = \"tcp\"\nport = 9\n\
             [[load_balancer]]\nname = \"lb\"\nsite = \"edge\"\nfrontend = \"127.0.0.1:53\"\n\
             protocol = \"udp\"\npool = {{ addresses = [\"{A}\", \"{B}\"] }}\nprobe = \"alive\"\n\
             drain_timeout = \"10s\"\n"
        );
        let t = model::parse(model::Source::new("t.toml", text)).unwrap();
        let health = Arc::new(Fake::default());
        let b = Balancer::new(t.load_balancers[0].clone(), health.clone());
        (b, health)
    }

    fn set(b: &Balancer, h: &Fake, addr: &str, s: Status) {
        let id = health::backend_id("lb", addr.parse().unwrap());
        h.0.lock().unwrap().insert(id, s);
        b.rebuild();
    }

    fn keeps(b: &Balancer, addr: &str) -> Keep {
        b.snapshot().keeps(addr.parse().unwrap())
    }

    #[tokio::test(start_paused = true)]
    async fn flows_stay_unless_the_probe_says_down() {
        let (b, h) = setup();
        assert_eq!(keeps(&b, A), Keep::Yes, "no probe result yet");
        // B answers first: A takes no new flows for now, but nothing says it is down.
        set(&b, &h, B, Status::Online);
        assert_eq!(b.snapshot().eligible.len(), 1);
        assert_eq!(keeps(&b, A), Keep::Yes);
        set(&b, &h, A, Status::Degraded);
        assert_eq!(keeps(&b, A), Keep::No);
        assert_eq!(keeps(&b, B), Keep::Yes);
    }

    #[tokio::test(start_paused = true)]
    async fn draining_and_departed_backends_keep_flows_until_the_drain_timeout() {
        let (b, h) = setup();
        set(&b, &h, A, Status::Online);
        set(&b, &h, B, Status::Online);
        let before = b.snapshot().generation;
        let start = Instant::now();
        b.drain(A.parse().unwrap()).unwrap();
        assert!(b.snapshot().generation > before, "a new generation");
        let deadline = start + Duration::from_secs(10);
        assert_eq!(keeps(&b, A), Keep::Until(deadline));
        set(&b, &h, A, Status::Degraded);
        assert_eq!(keeps(&b, A), Keep::No, "a draining backend probed down");

        let (b, h) = setup();
        set(&b, &h, A, Status::Online);
        set(&b, &h, B, Status::Online);
        tokio::time::advance(Duration::from_secs(1)).await;
        let start = Instant::now();
        b.set_members(vec![(B.parse().unwrap(), 1, None)]);
        assert_eq!(keeps(&b, A), Keep::Until(start + Duration::from_secs(10)));
        tokio::time::advance(Duration::from_secs(10)).await;
        b.rebuild();
        assert_eq!(keeps(&b, A), Keep::No, "gone after the drain timeout");
    }
}
