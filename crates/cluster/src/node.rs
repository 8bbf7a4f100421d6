//! One node's part in the cluster: its record under its session, its votes, the leader lease,
//! its events in the store, and what it sees of the others (mirrors of their records, votes,
//! decisions and events). Everything here keeps working from the last copy when the store is
//! away; the node then says it is isolated.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use event::{Event, Source};
use health::Status;
use model::Quorum;
use serde::{Deserialize, Serialize};
use store::{Expect, Mirror, Scope, Store, StoreError, StoreExt as _, keys};
use tokio::sync::{broadcast, watch};
use tokio::task::AbortHandle;
use tokio::time::Instant;

use crate::consensus::Tally;
use crate::record::{Decision, NodeRecord, TopologyRecord, Vote, host_name, pid_alive};

/// A node cut off from the store this long says it is isolated.
pub const ISOLATION_GRACE: Duration = Duration::from_secs(1);
/// Events of each node kept in the store.
pub const EVENTS_KEPT: u64 = 200;
/// How long the event writer gathers events into one batch.
const EVENT_BATCH_WAIT: Duration = Duration::from_millis(100);

/// What a node needs to take part.
#[derive(Clone, Debug)]
pub struct Config {
    pub node: model::Node,
    /// Every node of the topology (this one included), to show the ones never seen alive.
    pub nodes: Vec<model::Node>,
    pub cluster: model::Cluster,
    /// SHA-256 of the topology file ([`crate::record::topology_hash`]).
    pub topology_hash: String,
    /// The probe targets every node votes on (profile endpoints).
    pub shared_targets: Vec<String>,
}

/// Why a node could not join.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error(
        "node {name} is already running on {host} (pid {pid}, since {since}); each --node runs once. If that process is gone, its record expires within {ttl:?}"
    )]
    Duplicate {
        name: String,
        host: String,
        pid: u32,
        since: String,
        ttl: Duration,
    },
}

/// Who leads, as this node knows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Leadership {
    pub holder: Option<String>,
    pub term: u64,
    /// This node holds the lease.
    pub me: bool,
}

/// Whether this node can use the store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Isolation {
    pub isolated: bool,
    #[serde(with = "event::time")]
    pub since: SystemTime,
    pub reason: String,
}

/// One node as the API shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeView {
    pub name: String,
    pub site: String,
    /// Its record is present: its session lives.
    pub alive: bool,
    /// Since when it has been alive or gone, as this node saw it (its start time when alive
    /// from before this node started).
    #[serde(with = "event::opt_time")]
    pub since: Option<SystemTime>,
    pub api: String,
    pub dns: Vec<String>,
    pub version: Option<String>,
    #[serde(with = "event::opt_time")]
    pub started: Option<SystemTime>,
    /// It runs the same topology file as the cluster.
    pub topology_matches: Option<bool>,
    pub leader: bool,
    /// The node answering.
    pub this_node: bool,
}

/// A target's votes as the API shows them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VoteView {
    pub node: String,
    /// `None`: no opinion yet.
    pub status: Option<Status>,
    #[serde(with = "event::opt_time")]
    pub since: Option<SystemTime>,
    pub reason: Option<String>,
}

#[derive(Debug, Default)]
struct Seen {
    /// node → (alive, since).
    nodes: HashMap<String, (bool, SystemTime)>,
    /// What this node last wrote of its votes.
    published: HashMap<String, Status>,
    /// Events of others already handed out.
    events_seen: std::collections::HashSet<String>,
}

/// One node in the cluster.
#[derive(Debug)]
pub struct Node {
    store: Arc<dyn Store>,
    config: Config,
    record: NodeRecord,
    engine: Arc<health::Engine>,
    nodes: Arc<Mirror>,
    votes: Arc<Mirror>,
    decisions: Arc<Mirror>,
    events_mirror: Arc<Mirror>,
    topology: Arc<Mirror>,
    leader: watch::Sender<Leadership>,
    isolation: watch::Sender<Isolation>,
    /// Bumped when anything DNS answers depend on changes (votes, nodes, decisions, isolation).
    changed: watch::Sender<u64>,
    events: broadcast::Sender<Event>,
    remote_events: broadcast::Sender<Event>,
    seen: Mutex<Seen>,
    /// SHA-256 of the topology this node runs now (changes with a reload).
    running_hash: Mutex<String>,
    tasks: Mutex<Vec<AbortHandle>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Node {
    /// Joins: registers this node (refusing a second process with the same name), starts the
    /// mirrors, the vote publisher, the leader campaign and the isolation watch. When the store
    /// cannot be reached within `wait`, the node starts isolated and registers once it can.
    pub async fn join(
        store: Arc<dyn Store>,
        config: Config,
        engine: Arc<health::Engine>,
        wait: Duration,
    ) -> Result<Arc<Node>, JoinError> {
        let record = NodeRecord {
            name: config.node.name.to_string(),
            site: config.node.site.to_string(),
            api: config.node.api,
            dns: config.node.dns.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            started: SystemTime::now(),
            pid: std::process::id(),
            host: host_name(),
            topology: config.topology_hash.clone(),
        };
        let registered = tokio::time::timeout(wait, register(&*store, &record, &config)).await;
        let registered = match registered {
            Ok(Ok(())) => true,
            Ok(Err(Registration::Duplicate(e))) => return Err(e),
            Ok(Err(Registration::Store(e))) => {
                tracing::error!(error = %e, "cannot register in the cluster store; starting isolated, retrying");
                false
            }
            Err(_) => {
                tracing::error!(etcd = ?config.cluster.etcd, "the cluster store did not answer within {wait:?}; starting isolated, retrying");
                false
            }
        };
        let node = Arc::new(Node {
            nodes: Mirror::start(store.clone(), keys::NODES),
            votes: Mirror::start(store.clone(), keys::HEALTH),
            decisions: Mirror::start(store.clone(), keys::DNS_DECISIONS),
            events_mirror: Mirror::start(store.clone(), keys::EVENTS),
            topology: Mirror::start(store.clone(), keys::TOPOLOGY),
            leader: watch::Sender::new(Leadership::default()),
            isolation: watch::Sender::new(Isolation {
                isolated: !registered,
                since: SystemTime::now(),
                reason: if registered {
                    "joined".into()
                } else {
                    "the cluster store cannot be reached".into()
                },
            }),
            changed: watch::Sender::new(0),
            events: broadcast::Sender::new(256),
            remote_events: broadcast::Sender::new(1024),
            seen: Mutex::default(),
            running_hash: Mutex::new(config.topology_hash.clone()),
            tasks: Mutex::default(),
            store,
            config,
            record,
            engine,
        });
        let tasks = vec![
            tokio::spawn(node.clone().publish_votes()).abort_handle(),
            tokio::spawn(node.clone().campaign()).abort_handle(),
            tokio::spawn(node.clone().watch_connection(registered)).abort_handle(),
            tokio::spawn(node.clone().follow_mirrors()).abort_handle(),
        ];
        *lock(&node.tasks) = tasks;
        Ok(node)
    }

    pub fn name(&self) -> &str {
        &self.record.name
    }

    pub fn site(&self) -> &str {
        &self.record.site
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Events this part raises (nodes joining and leaving, isolation, leadership).
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Events of the other nodes (and of this node's previous runs), as they reach the store.
    pub fn remote_events(&self) -> broadcast::Receiver<Event> {
        self.remote_events.subscribe()
    }

    /// Changes whenever what DNS answers depends on changes.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    pub fn leadership(&self) -> Leadership {
        self.leader.borrow().clone()
    }

    pub fn leadership_changes(&self) -> watch::Receiver<Leadership> {
        self.leader.subscribe()
    }

    pub fn isolation(&self) -> Isolation {
        self.isolation.borrow().clone()
    }

    fn event(&self, source: Source, subject: &str, kind: &str, message: String) {
        // An event is shown everywhere events are (console, API): logged at info, so a
        // terminal does not print it twice.
        tracing::info!(%subject, kind, "{message}");
        let _ = self.events.send(Event::new(source, subject, kind, message));
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    /// The live nodes: those whose record is present, and this one (it knows it lives).
    pub fn live(&self) -> Vec<String> {
        let mut live: Vec<String> = self.nodes.with(|r| {
            r.keys()
                .filter_map(|k| k.strip_prefix(keys::NODES))
                .map(str::to_string)
                .collect()
        });
        if !live.iter().any(|n| n == self.name()) {
            live.push(self.name().to_string());
        }
        live
    }

    /// The status DNS uses for a shared target: the consensus of the live vantage points, with
    /// this node's own verdict fresh from its engine. Cut off from the store, the others'
    /// votes are frozen at what they were: the node then goes by its own probes once they have
    /// a verdict (it cannot hear anybody else), and by the last shared view until then.
    /// `None` when the target is not probed.
    pub fn status(&self, target: &str) -> Option<Status> {
        let own = self.engine.status(target)?;
        if own == Status::Disabled {
            return Some(Status::Disabled);
        }
        if self.isolation.borrow().isolated && opinion(own).is_some() {
            return Some(own);
        }
        let live = self.live();
        let tally = self.votes.with(|votes| {
            Tally::of(live.iter().map(|n| {
                if n == self.name() {
                    opinion(own)
                } else {
                    votes
                        .get(&keys::vote(n, target))
                        .and_then(|r| r.json::<Vote>())
                        .map(|v| v.status)
                }
            }))
        });
        Some(tally.status(self.config.cluster.health_quorum))
    }

    /// Every live node's vote on a target, this node's from its engine.
    pub fn votes(&self, target: &str) -> Vec<VoteView> {
        let mut live = self.live();
        live.sort();
        live.iter()
            .map(|n| {
                if n == self.name() {
                    let report = self.engine.report(target);
                    VoteView {
                        node: n.clone(),
                        status: report.as_ref().and_then(|r| opinion(r.status)),
                        since: report.as_ref().map(|r| r.since),
                        reason: report.and_then(|r| r.last_failure),
                    }
                } else {
                    let vote = self
                        .votes
                        .get(&keys::vote(n, target))
                        .and_then(|r| r.json::<Vote>());
                    VoteView {
                        node: n.clone(),
                        status: vote.as_ref().map(|v| v.status),
                        since: vote.as_ref().map(|v| v.since),
                        reason: vote.map(|v| v.reason),
                    }
                }
            })
            .collect()
    }

    /// Whether this node's view of the cluster is current: it reaches the store and its
    /// copies of nodes, votes and decisions follow it (after a cut they are listed again
    /// before they count). Only a fresh node decides for the cluster or follows its leader.
    pub fn fresh(&self) -> bool {
        !self.isolation.borrow().isolated
            && self.nodes.synced()
            && self.votes.synced()
            && self.decisions.synced()
    }

    pub fn quorum(&self) -> Quorum {
        self.config.cluster.health_quorum
    }

    /// The leader's failback decisions by profile — the endpoint, and the record's revision
    /// (new with every decision) — while this node follows a live cluster; `None` when it is
    /// isolated (it then decides for itself).
    pub fn decisions(&self) -> Option<HashMap<String, (Option<String>, u64)>> {
        if !self.fresh() {
            return None;
        }
        Some(self.decisions.with(|records| {
            records
                .iter()
                .filter_map(|(k, r)| {
                    let profile = k.strip_prefix(keys::DNS_DECISIONS)?;
                    let d = r.json::<Decision>()?;
                    Some((profile.to_string(), (d.endpoint, r.revision)))
                })
                .collect()
        }))
    }

    /// Writes the leader's decision for a priority profile, fenced by its term; refused once
    /// another node leads.
    pub async fn publish_decision(
        &self,
        profile: &str,
        endpoint: Option<String>,
    ) -> Result<(), StoreError> {
        let l = self.leadership();
        if !l.me {
            return Err(StoreError::Lost {
                holder: l.holder,
                term: l.term,
            });
        }
        let known = self
            .decisions
            .get(&keys::dns_decision(profile))
            .and_then(|r| r.json::<Decision>());
        if known
            .as_ref()
            .is_some_and(|d| d.endpoint == endpoint && d.term == l.term)
        {
            return Ok(());
        }
        let d = Decision {
            endpoint,
            leader: self.name().to_string(),
            term: l.term,
        };
        let bytes = serde_json::to_vec(&d).unwrap_or_default();
        self.store
            .put_fenced(
                &keys::dns_decision(profile),
                bytes,
                keys::LEADER,
                self.name(),
                l.term,
            )
            .await?;
        Ok(())
    }

    /// Every node of the topology, alive or gone.
    pub fn nodes(&self) -> Vec<NodeView> {
        let records: BTreeMap<String, NodeRecord> = self.nodes.with(|r| {
            r.iter()
                .filter_map(|(k, v)| Some((k.strip_prefix(keys::NODES)?.to_string(), v.json()?)))
                .collect()
        });
        let seen = lock(&self.seen);
        let cluster_hash = self.cluster_hash();
        let leader = self.leadership().holder;
        let mut out: Vec<NodeView> = Vec::new();
        let mut names: Vec<String> = self
            .config
            .nodes
            .iter()
            .map(|n| n.name.to_string())
            .collect();
        names.extend(records.keys().cloned());
        names.extend(seen.nodes.keys().cloned());
        names.sort();
        names.dedup();
        for name in names {
            let r = records.get(&name);
            let me = name == self.name();
            let alive = r.is_some() || me;
            let since = if me {
                Some(self.record.started)
            } else {
                seen.nodes
                    .get(&name)
                    .map(|(_, t)| *t)
                    .or(r.map(|r| r.started))
            };
            let declared = self.config.nodes.iter().find(|n| n.name.as_str() == name);
            out.push(NodeView {
                site: r
                    .map(|r| r.site.clone())
                    .or(declared.map(|n| n.site.to_string()))
                    .unwrap_or_default(),
                alive,
                since,
                api: r
                    .map(|r| r.api)
                    .or(declared.map(|n| n.api))
                    .map_or_else(String::new, |a| a.to_string()),
                dns: r.map_or_else(Vec::new, |r| {
                    r.dns.iter().map(ToString::to_string).collect()
                }),
                version: r.map(|r| r.version.clone()),
                started: r.map(|r| r.started),
                topology_matches: r.and_then(|r| cluster_hash.as_ref().map(|h| *h == r.topology)),
                leader: leader.as_deref() == Some(name.as_str()),
                this_node: me,
                name,
            });
        }
        out
    }

    /// The API addresses of the other live nodes.
    pub fn peers(&self) -> Vec<(String, std::net::SocketAddr)> {
        self.nodes.with(|r| {
            r.values()
                .filter_map(|v| v.json::<NodeRecord>())
                .filter(|n| n.name != self.record.name)
                .map(|n| (n.name, n.api))
                .collect()
        })
    }

    /// The hash of the topology the cluster runs, if known.
    pub fn cluster_hash(&self) -> Option<String> {
        self.topology
            .get(keys::TOPOLOGY)
            .and_then(|r| r.json::<TopologyRecord>())
            .map(|t| t.hash)
    }

    /// Whether this node runs another topology than the cluster; then it takes no decision.
    pub fn topology_mismatch(&self) -> bool {
        let running = lock(&self.running_hash).clone();
        self.cluster_hash().is_some_and(|h| h != running)
    }

    /// SHA-256 of the topology this node runs now.
    pub fn running_hash(&self) -> String {
        lock(&self.running_hash).clone()
    }

    /// Writes this node's topology hash as the cluster's (a reload through this node).
    pub async fn set_cluster_topology(&self, hash: &str) -> Result<(), StoreError> {
        let record = TopologyRecord {
            hash: hash.to_string(),
            by: self.name().to_string(),
            at: SystemTime::now(),
        };
        self.store
            .put_json(keys::TOPOLOGY, &record, Scope::Persistent, Expect::Any)
            .await
            .map(|_| ())
    }

    /// A node running a new topology file (after a reload): record its hash.
    pub async fn update_topology(&self, hash: &str) -> Result<(), StoreError> {
        *lock(&self.running_hash) = hash.to_string();
        self.bump();
        let mut record = self.record.clone();
        record.topology = hash.to_string();
        self.store
            .put_json(
                &keys::node(self.name()),
                &record,
                Scope::Session,
                Expect::Any,
            )
            .await
            .map(|_| ())
    }

    /// Writes this node's events to the store (the last [`EVENTS_KEPT`]), so every node shows
    /// them and they outlive a restart.
    pub fn record_events(self: &Arc<Self>, mut rx: broadcast::Receiver<Event>) {
        let me = self.clone();
        let task = tokio::spawn(async move {
            let mine = keys::EVENTS.to_string() + me.name() + "/";
            let mut seq = match me.store.list(&mine).await {
                Ok((items, _)) => items
                    .last()
                    .and_then(|(k, _)| k.rsplit('/').next()?.parse::<u64>().ok())
                    .map_or(0, |s| s + 1),
                Err(_) => 0,
            };
            loop {
                // Whatever arrived together (a burst of health changes) goes in one batch.
                let mut events = Vec::new();
                match rx.recv().await {
                    Ok(e) => events.push(e),
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(_) => return,
                }
                let until = tokio::time::Instant::now() + EVENT_BATCH_WAIT;
                while events.len() < store::BATCH_LIMIT / 2 {
                    match tokio::time::timeout_at(until, rx.recv()).await {
                        Ok(Ok(e)) => events.push(e),
                        Ok(Err(broadcast::error::RecvError::Lagged(_))) => {}
                        Ok(Err(_)) | Err(_) => break,
                    }
                }
                let mut batch = store::Batch::default();
                for mut e in events {
                    if e.node.is_none() {
                        e.node = Some(me.name().to_string());
                    }
                    let key = keys::event(me.name(), seq);
                    lock(&me.seen).events_seen.insert(key.clone());
                    batch.puts.push((
                        key,
                        serde_json::to_vec(&e).unwrap_or_default(),
                        Scope::Persistent,
                    ));
                    if seq >= EVENTS_KEPT {
                        batch
                            .deletes
                            .push(keys::event(me.name(), seq - EVENTS_KEPT));
                    }
                    seq += 1;
                }
                // Bounded: an isolated node keeps its events locally and drops them here.
                let _ =
                    tokio::time::timeout(Duration::from_secs(2), me.store.write_many(batch)).await;
            }
        });
        lock(&self.tasks).push(task.abort_handle());
    }

    /// Leaves at a planned stop: the record and votes go at once, not after the session's
    /// time to live, and the leadership is handed on.
    pub async fn leave(&self) {
        let l = self.leadership();
        if l.me {
            let _ = self.store.release(keys::LEADER, self.name(), l.term).await;
        }
        let _ = self
            .store
            .delete(&keys::node(self.name()), Expect::Any)
            .await;
        let votes: Vec<String> = self.votes.with(|r| {
            r.keys()
                .filter(|k| k.starts_with(&keys::votes_of(self.name())))
                .cloned()
                .collect()
        });
        for k in votes {
            let _ = self.store.delete(&k, Expect::Any).await;
        }
        for t in lock(&self.tasks).drain(..) {
            t.abort();
        }
    }

    /// Publishes this node's verdicts on the shared targets whenever one changes (never per
    /// probe), every change since the last write in one batch: Online and Degraded are
    /// opinions; no result yet, or Disabled, is none.
    async fn publish_votes(self: Arc<Self>) {
        let mut changes = self.engine.subscribe();
        let mut session = self.store.connection();
        let mut retry = tokio::time::interval(Duration::from_secs(1));
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let mut batch = store::Batch::default();
            let mut wanted: Vec<(String, Option<Status>)> = Vec::new();
            {
                let seen = lock(&self.seen);
                for target in &self.config.shared_targets {
                    let report = self.engine.report(target);
                    let want = report.as_ref().and_then(|r| opinion(r.status));
                    if want == seen.published.get(target).copied() {
                        continue;
                    }
                    let key = keys::vote(self.name(), target);
                    match (want, report) {
                        (Some(status), Some(r)) => {
                            let vote = Vote {
                                status,
                                since: r.since,
                                reason: vote_reason(status, r.last_failure),
                            };
                            let bytes = serde_json::to_vec(&vote).unwrap_or_default();
                            batch.puts.push((key, bytes, Scope::Session));
                        }
                        _ => batch.deletes.push(key),
                    }
                    wanted.push((target.clone(), want));
                }
            }
            let dirty = !batch.is_empty() && self.store.write_many(batch).await.is_err();
            if !dirty {
                let mut seen = lock(&self.seen);
                for (target, want) in wanted {
                    match want {
                        Some(s) => seen.published.insert(target, s),
                        None => seen.published.remove(&target),
                    };
                }
            }
            tokio::select! {
                r = changes.changed() => if r.is_err() { return },
                // A new session wrote the votes again, but one may have changed meanwhile.
                r = session.changed() => if r.is_err() { return },
                _ = retry.tick(), if dirty => {}
            }
        }
    }

    /// Campaigns for the leader lease every third of `lease_ttl`, and renews it while held.
    /// A node running another topology than the cluster does not campaign.
    async fn campaign(self: Arc<Self>) {
        let ttl = self.config.cluster.lease_ttl;
        let mut tick = tokio::time::interval(ttl / 3);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut renewed: Option<Instant> = None;
        loop {
            tick.tick().await;
            let l = self.leadership();
            let now = Instant::now();
            // Only a node that knows it runs the cluster's topology decides for it.
            let unsure = !self.topology.synced() || self.cluster_hash().is_none();
            let mismatch = self.topology_mismatch();
            if unsure || mismatch {
                if l.me {
                    let _ = self.store.release(keys::LEADER, self.name(), l.term).await;
                    self.leader.send_modify(|x| x.me = false);
                    self.event(
                        Source::Cluster,
                        self.name(),
                        "lost-leadership",
                        format!(
                            "{} steps down: {}",
                            self.name(),
                            if mismatch {
                                "it runs another topology than the cluster"
                            } else {
                                "its view of the cluster's topology is not current yet"
                            }
                        ),
                    );
                    self.bump();
                }
                continue;
            }
            if l.me {
                match self
                    .store
                    .renew(keys::LEADER, self.name(), l.term, ttl)
                    .await
                {
                    Ok(_) => renewed = Some(now),
                    Err(e) => {
                        // Not renewed for most of the lease: stop acting as leader before it
                        // can expire, whatever the store says later.
                        let stale = renewed.is_none_or(|r| now.duration_since(r) >= ttl * 2 / 3);
                        if matches!(e, StoreError::Lost { .. }) || stale {
                            self.leader.send_modify(|x| x.me = false);
                            self.event(
                                Source::Cluster,
                                self.name(),
                                "lost-leadership",
                                format!(
                                    "{} is no longer the leader (term {}): {e}",
                                    self.name(),
                                    l.term
                                ),
                            );
                            self.bump();
                        }
                    }
                }
                continue;
            }
            match self.store.acquire(keys::LEADER, self.name(), ttl).await {
                Ok(lease) => {
                    renewed = Some(now);
                    self.leader.send_replace(Leadership {
                        holder: Some(self.name().to_string()),
                        term: lease.term,
                        me: true,
                    });
                    self.event(
                        Source::Cluster,
                        self.name(),
                        "leader",
                        format!("{} leads the cluster (term {})", self.name(), lease.term),
                    );
                    self.bump();
                }
                Err(StoreError::Held { holder, term, .. }) => {
                    let known = Leadership {
                        holder: Some(holder),
                        term,
                        me: false,
                    };
                    if self.leadership() != known {
                        self.leader.send_replace(known);
                        self.bump();
                    }
                }
                Err(_) => {}
            }
        }
    }

    /// Follows the store connection: isolated after [`ISOLATION_GRACE`] without it, rejoined
    /// when it is back (registering then if the first registration never happened).
    async fn watch_connection(self: Arc<Self>, mut registered: bool) {
        let mut rx = self.store.connection();
        let mut duplicate_reported = false;
        loop {
            let c = rx.borrow_and_update().clone();
            let isolated = self.isolation.borrow().isolated;
            if c.connected {
                if !registered {
                    match register(&*self.store, &self.record, &self.config).await {
                        Ok(()) => registered = true,
                        Err(Registration::Duplicate(e)) => {
                            if !duplicate_reported {
                                self.event(Source::Node, self.name(), "duplicate", e.to_string());
                                duplicate_reported = true;
                            }
                        }
                        Err(Registration::Store(_)) => {
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            continue;
                        }
                    }
                }
                if isolated && registered {
                    self.isolation.send_replace(Isolation {
                        isolated: false,
                        since: SystemTime::now(),
                        reason: c.detail.clone(),
                    });
                    self.event(
                        Source::Node,
                        self.name(),
                        "rejoined",
                        format!("{} reaches the cluster store again", self.name()),
                    );
                    self.bump();
                }
            } else if !isolated {
                // Isolated only if it lasts.
                if tokio::time::timeout(ISOLATION_GRACE, rx.changed())
                    .await
                    .is_ok()
                {
                    continue;
                }
                let reason = self.store.connection().borrow().detail.clone();
                self.isolation.send_replace(Isolation {
                    isolated: true,
                    since: SystemTime::now(),
                    reason: reason.clone(),
                });
                self.event(
                    Source::Node,
                    self.name(),
                    "isolated",
                    format!(
                        "{} cannot reach the cluster store ({reason}); serving from its last view and its own probes",
                        self.name()
                    ),
                );
                self.bump();
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// Notices nodes joining and going, new decisions and votes, the topology, and other
    /// nodes' events.
    async fn follow_mirrors(self: Arc<Self>) {
        let mut nodes = self.nodes.subscribe();
        let mut votes = self.votes.subscribe();
        let mut decisions = self.decisions.subscribe();
        let mut events = self.events_mirror.subscribe();
        let mut topology = self.topology.subscribe();
        let mut warned_mismatch = false;
        // What the mirrors held before this task subscribed counts as a change too.
        self.nodes_changed();
        self.new_events();
        self.topology_changed(&mut warned_mismatch).await;
        loop {
            tokio::select! {
                r = nodes.changed() => { if r.is_err() { return } self.nodes_changed(); self.bump(); }
                r = votes.changed() => { if r.is_err() { return } self.bump(); }
                r = decisions.changed() => { if r.is_err() { return } self.bump(); }
                r = events.changed() => { if r.is_err() { return } self.new_events(); }
                r = topology.changed() => {
                    if r.is_err() { return }
                    self.topology_changed(&mut warned_mismatch).await;
                }
            }
        }
    }

    /// Records this node's topology as the cluster's if none is yet, and says once when it
    /// differs.
    async fn topology_changed(&self, warned: &mut bool) {
        if self.topology.synced() && self.cluster_hash().is_none() {
            let _ = self.set_cluster_topology_if_absent().await;
        }
        let mismatch = self.topology_mismatch();
        if mismatch && !*warned {
            self.event(
                Source::Node,
                self.name(),
                "topology-mismatch",
                format!(
                    "{} runs topology {} but the cluster runs {}; it takes no cluster decision until they match (copy the same file to every node, then `tandem reload`)",
                    self.name(),
                    short(&self.running_hash()),
                    short(&self.cluster_hash().unwrap_or_default())
                ),
            );
        }
        *warned = mismatch;
    }

    async fn set_cluster_topology_if_absent(&self) -> Result<(), StoreError> {
        let record = TopologyRecord {
            hash: self.running_hash(),
            by: self.name().to_string(),
            at: SystemTime::now(),
        };
        match self
            .store
            .put_json(keys::TOPOLOGY, &record, Scope::Persistent, Expect::Absent)
            .await
        {
            Ok(_) | Err(StoreError::Conflict { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn nodes_changed(&self) {
        if !self.nodes.synced() {
            return;
        }
        let present: HashMap<String, NodeRecord> = self.nodes.with(|r| {
            r.iter()
                .filter_map(|(k, v)| Some((k.strip_prefix(keys::NODES)?.to_string(), v.json()?)))
                .collect()
        });
        let now = SystemTime::now();
        let mut changes = Vec::new();
        {
            let mut seen = lock(&self.seen);
            for (name, r) in &present {
                match seen.nodes.get(name) {
                    Some((true, _)) => {}
                    Some((false, _)) | None => {
                        let first = !seen.nodes.contains_key(name);
                        seen.nodes
                            .insert(name.clone(), (true, if first { r.started } else { now }));
                        if name != self.name() {
                            changes.push((
                                name.clone(),
                                "joined",
                                format!(
                                    "node {name} ({}) is alive: {} at {}",
                                    r.site, r.host, r.api
                                ),
                            ));
                        }
                    }
                }
            }
            let gone: Vec<String> = seen
                .nodes
                .iter()
                .filter(|(n, (alive, _))| *alive && !present.contains_key(*n) && *n != self.name())
                .map(|(n, _)| n.clone())
                .collect();
            for name in gone {
                seen.nodes.insert(name.clone(), (false, now));
                changes.push((
                    name.clone(),
                    "gone",
                    format!("node {name} is gone: its session ended (stopped, killed, frozen or cut off for {:?})", self.config.cluster.lease_ttl),
                ));
            }
        }
        for (name, kind, message) in changes {
            self.event(Source::Node, &name, kind, message);
        }
    }

    fn new_events(&self) {
        let fresh: Vec<(String, Event)> = {
            let seen = lock(&self.seen);
            self.events_mirror.with(|r| {
                r.iter()
                    .filter(|(k, _)| !seen.events_seen.contains(*k))
                    .filter_map(|(k, v)| Some((k.clone(), v.json::<Event>()?)))
                    .collect()
            })
        };
        let mut seen = lock(&self.seen);
        for (k, e) in fresh {
            seen.events_seen.insert(k);
            let _ = self.remote_events.send(e);
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        for t in lock(&self.tasks).drain(..) {
            t.abort();
        }
    }
}

/// Why a vote: a Degraded one by its last failure; an Online one because its probes pass (its
/// last failure may be long past).
fn vote_reason(status: Status, last_failure: Option<String>) -> String {
    match (status, last_failure) {
        (Status::Degraded, Some(failure)) => failure,
        (Status::Degraded, None) => "probes fail".into(),
        _ => "probes pass".into(),
    }
}

/// A vote: Online or Degraded; anything else is no opinion.
fn opinion(s: Status) -> Option<Status> {
    matches!(s, Status::Online | Status::Degraded).then_some(s)
}

fn short(hash: &str) -> &str {
    hash.get(..12).unwrap_or(hash)
}

enum Registration {
    Duplicate(JoinError),
    Store(StoreError),
}

/// Writes the node's record under its session, unless another live process holds the name. A
/// record left by this node's previous run on this machine (its process gone) is replaced.
async fn register(
    store: &dyn Store,
    record: &NodeRecord,
    config: &Config,
) -> Result<(), Registration> {
    let key = keys::node(&record.name);
    for _ in 0..3 {
        match store
            .put_json(&key, record, Scope::Session, Expect::Absent)
            .await
        {
            Ok(_) => return Ok(()),
            Err(StoreError::Conflict { .. }) => {}
            Err(e) => return Err(Registration::Store(e)),
        }
        let existing = store.read(&key).await.map_err(Registration::Store)?;
        let Some(r) = existing else { continue };
        let other: Option<NodeRecord> = r.json();
        match other {
            // Our own write, whose answer was lost on the way.
            Some(o) if o == *record => return Ok(()),
            Some(o) if o.host == record.host && o.pid != record.pid && !pid_alive(o.pid) => {
                tracing::info!(
                    pid = o.pid,
                    "replacing the record of this node's previous run"
                );
                let _ = store.delete(&key, Expect::Revision(r.revision)).await;
            }
            Some(o) => {
                return Err(Registration::Duplicate(JoinError::Duplicate {
                    name: record.name.clone(),
                    host: o.host,
                    pid: o.pid,
                    since: event::rfc3339(o.started),
                    ttl: config.cluster.lease_ttl,
                }));
            }
            None => {
                let _ = store.delete(&key, Expect::Revision(r.revision)).await;
            }
        }
    }
    Err(Registration::Store(StoreError::Unavailable(format!(
        "{key} keeps changing; try again"
    ))))
}
