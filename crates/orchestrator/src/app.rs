//! The driver of an `[[app]]`: observes every tier of it (site health from the probes, the
//! database's primary and members, the scale sets, drills), feeds [`app::App`], and carries
//! out its actions — a switchover, a scale set's capacity, the DNS profile's active site.
//!
//! One task per app, a tick every [`TICK`] and at once on a health change or a command.
//! Slow actions (a switchover, scaling) run on tasks of their own; the next observations
//! confirm them, so the tick never waits.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use app::{Action, App, Command, Observed, Refused, Standby};
use event::{Event, Source};
use health::Status;
use model::Topology;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, broadcast, watch};
use tokio::time::Instant;

use crate::Drills;

/// How often an app looks at its tiers when nothing wakes it.
pub const TICK: Duration = Duration::from_millis(250);

/// What an app drives, in this process.
#[derive(Clone)]
pub struct Tiers {
    pub topology: Arc<Topology>,
    pub engine: Arc<health::Engine>,
    /// The DNS traffic manager, when this process answers DNS.
    pub dns: Option<Arc<dns::manager::Manager>>,
    /// The app's database, when it has one.
    pub database: Option<Arc<pg::Cluster>>,
    /// The app's scale sets this process runs.
    pub scale_sets: Vec<Arc<scaleset::ScaleSet>>,
    pub drills: Arc<Drills>,
    /// Where the app's record is kept (`STATE_DIR/apps/`); `None`: not kept.
    pub state_dir: Option<std::path::PathBuf>,
    /// Cluster mode: the store, the leader, the consensus ([`crate::app_shared`]); the tiers
    /// above are then this node's only.
    pub shared: Option<crate::app_shared::Shared>,
}

/// One site of an app as the API shows it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SiteView {
    pub site: String,
    /// Its entry points (the profile's endpoints there) are healthy.
    pub healthy: bool,
    /// It can be acted on (not under an outage drill).
    pub reachable: bool,
    /// Its database member holds the primary role.
    pub primary: bool,
    /// Its database member has caught up with the primary (streaming, and synchronous in
    /// sync replication, or no lag in async).
    pub caught_up: bool,
    /// Instances Online in the app's scale set there, and the set's desired capacity.
    pub online: u32,
    pub capacity: u32,
}

/// A move under way or ended.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct MoveView {
    pub from: String,
    pub to: String,
    /// `site-lost`, `data-moved`, `failback` or `operator`.
    pub reason: String,
    /// Every step of the plan, in order (`confirm-loss`, `promote`, `scale`, `wait-online`,
    /// `move-dns`, `scale-down`).
    pub steps: Vec<String>,
    /// The steps done and how long each took, in seconds.
    pub done: Vec<StepTime>,
    /// Seconds from the start to the end (or to now, while under way).
    pub seconds: f64,
    /// `under-way`, `done`, `failed` or `abandoned`.
    pub outcome: String,
    /// Why it failed or was abandoned.
    pub error: Option<String>,
    #[serde(with = "event::opt_time", default)]
    pub ended: Option<SystemTime>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StepTime {
    pub step: String,
    pub seconds: f64,
}

/// One app as the API shows it (`GET /v1/apps`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct AppView {
    pub name: String,
    pub profile: String,
    pub database: Option<String>,
    /// `hot` or `warm`.
    pub standby: String,
    /// `automatic` or `manual`.
    pub failback: String,
    /// `data` (the app follows its database's own failovers) or `none`.
    pub follow: String,
    /// Where the app runs now, and the term of that (grows with every move).
    pub active: String,
    pub term: u64,
    /// The first of its sites, where it belongs.
    pub preferred: String,
    pub pinned: bool,
    pub sites: Vec<SiteView>,
    /// The move under way.
    pub moving: Option<MoveView>,
    /// Away from the preferred site: what failing back waits for.
    pub waiting_for: Option<String>,
    /// The last move that ended.
    pub last_move: Option<MoveView>,
    /// Moves that ended since start: done, failed, abandoned (the lost site came back before
    /// the loss was confirmed).
    pub moves: u64,
    pub failed_moves: u64,
    pub abandoned_moves: u64,
    /// A drill (`tandem drill app`) is running.
    pub drilling: bool,
    /// The last drill's report.
    pub last_drill: Option<crate::app_drill::AppDrillReport>,
}

impl AppView {
    /// Every move that ended since start, however.
    pub fn ended_moves(&self) -> u64 {
        self.moves + self.failed_moves + self.abandoned_moves
    }
}

/// The steps a move would take (`GET /v1/apps/{app}/plan?to=SITE`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PlanView {
    pub app: String,
    pub from: String,
    pub to: String,
    pub steps: Vec<String>,
}

impl std::fmt::Debug for Tiers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tiers")
            .field("database", &self.database)
            .field("scale_sets", &self.scale_sets.len())
            .finish_non_exhaustive()
    }
}

/// A running app.
pub struct AppRunner {
    pub name: String,
    config: model::App,
    tiers: Tiers,
    state: Mutex<State>,
    events: broadcast::Sender<Event>,
    wake: Notify,
    stop: watch::Sender<bool>,
    record_path: Option<std::path::PathBuf>,
    /// Cluster mode: the record and this node's site report to write, each written by one
    /// task of its own in order, the latest value last (`write_latest`).
    record_out: watch::Sender<Option<crate::app_shared::Record>>,
    report_out: watch::Sender<Option<crate::app_shared::Report>>,
}

/// Cluster mode: what a node does with an app now (see [`AppRunner::role`]).
enum Role {
    Drive,
    Follow,
    Pause,
}

struct State {
    app: App,
    seen: Observed,
    /// A switchover this driver started is still running (no second one is started).
    promoting: bool,
    /// What is recorded in the app's state file, as last written.
    recorded: Option<Record>,
    drilling: bool,
    last_drill: Option<crate::app_drill::AppDrillReport>,
    /// Cluster mode: the leader term under which this node drives the app.
    driving: Option<u64>,
    /// Cluster mode: the site DNS answers with, as last set.
    pointed: Option<String>,
    /// Cluster mode: the store revision of the last switchover request this node carried out.
    switched: Option<u64>,
    /// Cluster mode: each site's capacity as last reported, for a site whose node is gone (a
    /// warm standby is scaled to the capacity the lost site had).
    known_capacity: BTreeMap<String, u32>,
}

/// What outlives a restart of Tandem, in `STATE_DIR/apps/APP.json`: where the app is, under
/// which term, and whether an operator pinned it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Record {
    active: String,
    term: u64,
    pinned: bool,
}

impl Record {
    fn load(path: &std::path::Path, sites: &[String]) -> Option<Record> {
        let text = std::fs::read_to_string(path).ok()?;
        match serde_json::from_str::<Record>(&text) {
            Ok(r) if sites.contains(&r.active) => Some(r),
            Ok(r) => {
                tracing::warn!(path = %path.display(), active = %r.active, "the app's recorded site is no longer one of its sites; starting at its preferred site");
                None
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read the app's record; starting at its preferred site");
                None
            }
        }
    }

    /// Written whole to a temporary file, then renamed: never half a record.
    fn save(&self, path: &std::path::Path) -> std::io::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self).unwrap_or_default())?;
        std::fs::rename(&tmp, path)
    }
}

impl std::fmt::Debug for AppRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppRunner")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// How long the active site must stay unhealthy before a failover: the profile's monitor
/// has already needed `tolerated_failures + 1` failures; one more tick confirms it is not a
/// blip of the moment.
const CONFIRM: Duration = Duration::from_secs(1);
/// The longest wait for a promotion or for instances to come Online.
const STEP_TIMEOUT: Duration = Duration::from_secs(60);
/// The longest a cold standby's restore may take before the move is given up (the restore
/// itself runs to its end: a later move finds the member restored).
const RESTORE_TIMEOUT: Duration = Duration::from_secs(1800);

impl AppRunner {
    /// Starts driving `config` (a validated `[[app]]`): the app starts where its record says
    /// it was (`STATE_DIR/apps/APP.json`: site, term, pin), else at its preferred site under
    /// term 0 (and follows its data from there if the database's primary is elsewhere).
    pub fn start(config: model::App, tiers: Tiers) -> Arc<AppRunner> {
        let profile = tiers.topology.profile(&config.profile);
        let cfg = app::Config {
            sites: config.sites.iter().map(ToString::to_string).collect(),
            database: config.database.is_some(),
            standby: match config.standby {
                model::Standby::Hot => Standby::Hot,
                model::Standby::Warm => Standby::Warm,
                model::Standby::Cold => Standby::Cold,
            },
            automatic_failback: config.failback == model::Failback::Automatic,
            follow_data: config.follow == model::Follow::Data,
            failback_hold: profile.map_or(Duration::from_secs(30), |p| p.failback_hold),
            confirm: CONFIRM,
            step_timeout: STEP_TIMEOUT,
            restore_timeout: RESTORE_TIMEOUT,
        };
        let home = cfg.sites.first().cloned().unwrap_or_default();
        let path = tiers
            .state_dir
            .as_ref()
            .map(|d| d.join("apps").join(format!("{}.json", config.name)));
        let record = match &tiers.shared {
            Some(sh) => sh
                .record(&config.name)
                .filter(|r| cfg.sites.contains(&r.active))
                .map(|r| Record {
                    active: r.active,
                    term: r.term,
                    pinned: r.pinned,
                }),
            None => path.as_deref().and_then(|p| Record::load(p, &cfg.sites)),
        };
        // Cluster mode: the record lives in the store, not in a file.
        let path = path.filter(|_| tiers.shared.is_none());
        let app = match &record {
            Some(r) => App::new(cfg, r.active.clone(), r.term).pinned_as(r.pinned),
            None => App::new(cfg, home, 0),
        };
        let (stop, _) = watch::channel(false);
        let runner = Arc::new(AppRunner {
            name: config.name.to_string(),
            config,
            tiers,
            state: Mutex::new(State {
                app,
                seen: Observed::default(),
                promoting: false,
                recorded: record.clone(),
                drilling: false,
                last_drill: None,
                driving: None,
                pointed: None,
                switched: None,
                known_capacity: BTreeMap::new(),
            }),
            events: broadcast::Sender::new(256),
            wake: Notify::new(),
            stop,
            record_path: path,
            record_out: watch::Sender::new(None),
            report_out: watch::Sender::new(None),
        });
        if let Some(sh) = runner.tiers.shared.clone() {
            let (name, sh2) = (runner.name.clone(), sh.clone());
            tokio::spawn(write_latest(
                runner.record_out.subscribe(),
                runner.stop.subscribe(),
                move |r: crate::app_shared::Record| {
                    let (sh, name) = (sh.clone(), name.clone());
                    async move { sh.write_record(&name, &r).await }
                },
            ));
            let name = runner.name.clone();
            tokio::spawn(write_latest(
                runner.report_out.subscribe(),
                runner.stop.subscribe(),
                move |r: crate::app_shared::Report| {
                    let (sh, name) = (sh2.clone(), name.clone());
                    async move { sh.report(&name, &r).await }
                },
            ));
        }
        // Cluster mode: once the record is known (`follow`, or the leader's first tick).
        if runner.tiers.shared.is_none() {
            let active = runner.state().app.active().to_string();
            runner.point_dns(&active);
        }
        tokio::spawn(runner.clone().run());
        runner
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Source `app`, subject the app: `app-move-start`, `app-move-end`, `app-move-failed`,
    /// `app-move-abandoned`, `app-move-partial`, `app-command`, `app-action-failed`.
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    fn event(&self, kind: &'static str, message: String) {
        tracing::info!(app = %self.name, kind, %message, "app");
        let _ = self
            .events
            .send(Event::new(Source::App, self.name.clone(), kind, message));
    }

    pub fn view(&self) -> AppView {
        let st = self.state();
        let now = Instant::now();
        let seen = &st.seen;
        let app = &st.app;
        let tally = app.tally();
        let sites = app
            .config()
            .sites
            .iter()
            .map(|s| SiteView {
                site: s.clone(),
                healthy: seen.healthy.get(s).copied().unwrap_or(false),
                reachable: seen.reachable.get(s).copied().unwrap_or(false),
                primary: seen.primary.as_deref() == Some(s),
                caught_up: seen.caught_up.get(s).copied().unwrap_or(false),
                online: seen.online.get(s).copied().unwrap_or(0),
                capacity: seen.capacity.get(s).copied().unwrap_or(0),
            })
            .collect();
        let moving = app.plan().map(|p| MoveView {
            from: p.from.clone(),
            to: p.to.clone(),
            reason: p.reason.as_str().into(),
            steps: p.steps.iter().map(|s| s.as_str().into()).collect(),
            done: times(&p.done),
            seconds: now.saturating_duration_since(p.started).as_secs_f64(),
            outcome: "under-way".into(),
            error: None,
            ended: None,
        });
        let last_move = app.last_move().map(|f| MoveView {
            from: f.from.clone(),
            to: f.to.clone(),
            reason: f.reason.as_str().into(),
            steps: f.steps.iter().map(|(s, _)| s.as_str().into()).collect(),
            done: times(&f.steps),
            seconds: f.took.as_secs_f64(),
            outcome: f.outcome.as_str().into(),
            error: f.outcome.error().map(str::to_string),
            // The wall-clock time of the move's end, for the API.
            ended: SystemTime::now().checked_sub(now.saturating_duration_since(f.ended)),
        });
        AppView {
            name: self.name.clone(),
            profile: self.config.profile.to_string(),
            database: self.config.database.as_ref().map(ToString::to_string),
            standby: self.config.standby.to_string(),
            failback: self.config.failback.to_string(),
            follow: self.config.follow.to_string(),
            active: app.active().to_string(),
            term: app.term(),
            preferred: app.config().sites.first().cloned().unwrap_or_default(),
            pinned: app.pinned(),
            sites,
            moving,
            waiting_for: app.waiting_for(seen, now),
            last_move,
            moves: tally.moved,
            failed_moves: tally.failed,
            abandoned_moves: tally.abandoned,
            drilling: st.drilling,
            last_drill: st.last_drill.clone(),
        }
    }

    /// Starts `tandem drill app` (see [`crate::app_drill`]) on a task of its own; its report
    /// becomes [`AppView::last_drill`]. One at a time; operator commands are refused meanwhile.
    ///
    /// # Errors
    /// A drill already running, a move under way, the app pinned or away from its preferred
    /// site, or no other site healthy with its data caught up.
    pub fn start_drill(
        self: &Arc<Self>,
        entry: crate::app_drill::Entry,
    ) -> Result<String, Refused> {
        let to = {
            let mut st = self.state();
            if st.drilling {
                return Err(Refused::new(format!("a drill of {} is running", self.name)));
            }
            let to = drill_target(&st)?;
            st.drilling = true;
            to
        };
        /// Clears `drilling` however the drill ends (a panic included).
        struct Drilling(Arc<AppRunner>);
        impl Drop for Drilling {
            fn drop(&mut self) {
                self.0.state().drilling = false;
            }
        }
        let guard = Drilling(self.clone());
        let database = self.primary_connector();
        let target = to.clone();
        tokio::spawn(async move {
            let report = crate::app_drill::run(guard.0.clone(), entry, database, target).await;
            guard.0.state().last_drill = Some(report);
        });
        Ok(to)
    }

    /// How a drill reaches the database's primary to check the acknowledged writes: in one
    /// process through the database; in cluster mode (the leader may run no member of it: a
    /// witness) through the passwords shared in the store, to the member the site reports
    /// name primary. `None` for an app without a database.
    fn primary_connector(self: &Arc<Self>) -> Option<crate::app_drill::Connector> {
        let Some(sh) = self.tiers.shared.clone() else {
            let db = self.tiers.database.clone()?;
            return Some(Arc::new(move || {
                let db = db.clone();
                Box::pin(async move { db.connect_primary().await.map_err(|e| e.to_string()) })
            }));
        };
        let name = self.config.database.as_ref()?;
        let db = self
            .tiers
            .topology
            .databases
            .iter()
            .find(|d| d.name == *name)?
            .clone();
        let me = self.clone();
        Some(Arc::new(move || {
            let (sh, db, me) = (sh.clone(), db.clone(), me.clone());
            Box::pin(async move {
                let primary = me.state().seen.primary.clone();
                let site = primary.ok_or("no primary reported now")?;
                pg::cluster::connect_shared(&sh.store, &db, &site).await
            })
        }))
    }

    pub(crate) fn drill_event(&self, kind: &'static str, message: String) {
        self.event(kind, message);
    }

    /// The steps a move to `to` would take now, without starting it.
    ///
    /// # Errors
    /// As [`AppRunner::command`] would refuse a failover to `to`.
    pub fn plan(&self, to: &str) -> Result<PlanView, Refused> {
        let st = self.state();
        let steps = st.app.preview(to, &st.seen)?;
        Ok(PlanView {
            app: self.name.clone(),
            from: st.app.active().to_string(),
            to: to.to_string(),
            steps: steps.iter().map(|s| s.as_str().into()).collect(),
        })
    }

    /// Cluster mode, on a node that does not drive the app: the node that does (the leader).
    pub fn leader_elsewhere(&self) -> Option<String> {
        let sh = self.tiers.shared.as_ref()?;
        let lead = sh.node.leadership();
        if lead.me {
            return None;
        }
        lead.holder.filter(|h| h != sh.node.name())
    }

    /// An operator's command (failover, failback, pin, unpin), checked against what was
    /// last observed; the move it starts runs in the background (see [`AppRunner::view`]).
    ///
    /// # Errors
    /// Why the app refuses it (a move under way, an unknown or unhealthy site, a failback
    /// whose data has not caught up).
    pub fn command(&self, cmd: Command) -> Result<(), Refused> {
        if let Some(sh) = &self.tiers.shared
            && !matches!(self.role(sh), Role::Drive)
        {
            let why = match sh.node.leadership().holder {
                Some(h) if h == sh.node.name() => {
                    "this node leads the cluster, but its view of the store is not current yet; try again shortly".to_string()
                }
                Some(h) => format!(
                    "{h} leads the cluster and drives the apps: ask its API (this is {})",
                    sh.node.name()
                ),
                None => "no node leads the cluster now (no quorum in etcd?); try again shortly"
                    .into(),
            };
            return Err(Refused::new(why));
        }
        if self.state().drilling {
            return Err(Refused::new(format!(
                "a drill of {} is running (`tandem app status` follows it); commands are refused until it ends",
                self.name
            )));
        }
        self.command_unchecked(cmd)
    }

    /// [`AppRunner::command`] during a drill: the drill's own commands.
    pub(crate) fn command_unchecked(&self, cmd: Command) -> Result<(), Refused> {
        let text = cmd.to_string();
        let started = {
            let mut st = self.state();
            let seen = st.seen.clone();
            let before = st.app.plan().map(|p| p.id);
            st.app.command(cmd, &seen, Instant::now())?;
            st.app
                .plan()
                .filter(|p| Some(p.id) != before)
                .map(|p| (p.from.clone(), p.to.clone(), p.steps.clone()))
        };
        self.event("app-command", text);
        // A move the command started is announced as the app's own moves are.
        if let Some((from, to, steps)) = started {
            let steps: Vec<&str> = steps.iter().map(|s| s.as_str()).collect();
            self.event(
                "app-move-start",
                format!("{from} -> {to} (operator): {}", steps.join(", ")),
            );
        }
        self.wake.notify_one();
        Ok(())
    }

    /// Stops driving (the tiers are left as they are).
    pub fn shutdown(&self) {
        let _ = self.stop.send(true);
    }

    async fn run(self: Arc<Self>) {
        let mut health = self.tiers.engine.subscribe();
        let mut stop = self.stop.subscribe();
        // Cluster mode: at once when a record, a report or a request changes.
        let mut store = self.tiers.shared.as_ref().map(|sh| sh.mirror.subscribe());
        let store_changed = async |rx: &mut Option<watch::Receiver<u64>>| match rx {
            Some(rx) => rx.changed().await.is_ok(),
            None => std::future::pending().await,
        };
        loop {
            self.tick();
            tokio::select! {
                () = tokio::time::sleep(TICK) => {}
                () = self.wake.notified() => {}
                r = health.changed() => if r.is_err() { return },
                alive = store_changed(&mut store) => if !alive { return },
                _ = stop.changed() => return,
            }
        }
    }

    fn tick(self: &Arc<Self>) {
        let seen = self.observe();
        if let Some(sh) = &self.tiers.shared {
            self.report(sh);
            match self.role(sh) {
                Role::Drive => {}
                Role::Follow => {
                    self.follow(sh, seen);
                    return;
                }
                Role::Pause => return,
            }
        }
        let now = Instant::now();
        let actions = {
            let mut st = self.state();
            st.seen = seen.clone();
            st.app.step(&seen, now)
        };
        for a in actions {
            self.carry_out(a, &seen);
        }
        if self.tiers.shared.is_some() {
            self.point_at_active();
        }
        self.save_record();
    }

    /// Cluster mode: DNS answers the site the app is active at (as the leader's app, or as the
    /// record a follower read, says), once per change.
    fn point_at_active(&self) {
        let mut st = self.state();
        let active = st.app.active().to_string();
        if st.pointed.as_deref() != Some(active.as_str()) {
            st.pointed = Some(active.clone());
            drop(st);
            self.point_dns(&active);
        }
    }

    /// Cluster mode: what this node does with the app now. The leader drives it once its view
    /// of the store is current, starting (once per leader term) from the store's record unless
    /// its own app already matches it — a move under way is kept across a blip of the views.
    /// A leader whose views are not current pauses: neither steps nor re-points anything.
    fn role(&self, sh: &crate::app_shared::Shared) -> Role {
        let lead = sh.node.leadership();
        let mut st = self.state();
        if !lead.me {
            st.driving = None;
            // Nothing more to write as the leader (a write still failing is dropped).
            self.record_out.send_if_modified(|r| r.take().is_some());
            return Role::Follow;
        }
        if !sh.current() {
            return Role::Pause;
        }
        if st.driving != Some(lead.term) {
            st.driving = Some(lead.term);
            let record = self.valid_record(sh);
            let same = record.as_ref().is_some_and(|r| {
                r.active == st.app.active()
                    && r.term == st.app.term()
                    && r.pinned == st.app.pinned()
            });
            if !same {
                let cfg = st.app.config().clone();
                st.app = match record {
                    Some(r) => App::new(cfg, r.active, r.term).pinned_as(r.pinned),
                    None => {
                        let home = cfg.sites.first().cloned().unwrap_or_default();
                        App::new(cfg, home, 0)
                    }
                };
            }
        }
        Role::Drive
    }

    /// The store's record of the app, if it names one of the app's sites (a topology edit may
    /// have removed the one recorded).
    fn valid_record(&self, sh: &crate::app_shared::Shared) -> Option<crate::app_shared::Record> {
        sh.record(&self.name)
            .filter(|r| self.config.sites.iter().any(|s| s.as_str() == r.active))
    }

    /// Cluster mode, not the leader: the app as the leader's record says, DNS answering its
    /// site — only once there is a record (until then DNS answers by health alone).
    fn follow(&self, sh: &crate::app_shared::Shared, seen: Observed) {
        let mut st = self.state();
        st.seen = seen;
        let Some(r) = self.valid_record(sh).filter(|_| sh.mirror.synced()) else {
            return;
        };
        if r.active != st.app.active() || r.term != st.app.term() || r.pinned != st.app.pinned() {
            let app = App::new(st.app.config().clone(), r.active, r.term).pinned_as(r.pinned);
            st.app = app;
        }
        drop(st);
        self.point_at_active();
    }

    /// Cluster mode, a node of one of the app's sites: writes what it sees of its own site
    /// when that changed, and carries out a switchover the leader asked of its primary.
    fn report(self: &Arc<Self>, sh: &crate::app_shared::Shared) {
        let site = sh.node.site().to_string();
        if !self.config.sites.iter().any(|s| s.as_str() == site) {
            return;
        }
        let mut report = crate::app_shared::Report::default();
        for set in self.sets_at(&site) {
            let v = set.view();
            report.capacity += v.desired;
            report.online += v
                .instances
                .iter()
                .filter(|i| i.health == Status::Online)
                .count() as u32;
        }
        let db = self.tiers.database.as_ref().map(|db| db.view());
        if let Some(v) = &db {
            // `View::primary` is a writable primary only: a fenced or crashed one is none.
            report.primary = v.primary.as_deref() == Some(site.as_str());
            report.term = v.term;
            report.caught_up = v.members.iter().any(|m| m.site == site && caught_up(v, m));
        }
        let primary = report.primary;
        self.report_out.send_if_modified(|r| {
            let changed = r.as_ref() != Some(&report);
            *r = Some(report);
            changed
        });
        // The switchover, once, by the primary's node, asked by the current leader, while the
        // request is fresh.
        let Some((ask, revision)) = sh.switchover(&self.name) else {
            return;
        };
        let fresh = SystemTime::now()
            .duration_since(ask.at)
            .is_ok_and(|age| age < crate::app_shared::SWITCHOVER_FRESH);
        let mut st = self.state();
        if !fresh
            || !primary
            || ask.from != site
            || ask.to == site
            || ask.term != sh.node.leadership().term
            || st.switched == Some(revision)
        {
            return;
        }
        st.switched = Some(revision);
        drop(st);
        let Some(db) = self.tiers.database.clone() else {
            return;
        };
        let me = self.clone();
        self.event(
            "app-switchover",
            format!(
                "the leader asks for a switchover of database {} to {}",
                db.name, ask.to
            ),
        );
        tokio::spawn(async move {
            if let Err(e) = db.switchover(&ask.to).await {
                me.event(
                    "app-action-failed",
                    format!("switchover of database {} to {}: {e}", db.name, ask.to),
                );
            }
        });
    }

    /// Keeps the record current: after every move and every change of pin.
    fn save_record(self: &Arc<Self>) {
        let mut st = self.state();
        let now = Record {
            active: st.app.active().to_string(),
            term: st.app.term(),
            pinned: st.app.pinned(),
        };
        if self.tiers.shared.is_some() {
            // Cluster mode: in the store, under the leader's lease (`write_latest`).
            let record = crate::app_shared::Record {
                active: now.active,
                term: now.term,
                pinned: now.pinned,
            };
            self.record_out.send_if_modified(|r| {
                let changed = r.as_ref() != Some(&record);
                *r = Some(record);
                changed
            });
            return;
        }
        if st.recorded.as_ref() == Some(&now) {
            return;
        }
        let Some(path) = &self.record_path else {
            return;
        };
        match now.save(path) {
            Ok(()) => st.recorded = Some(now),
            Err(e) => {
                // Tried again next tick; said once.
                if st.recorded.is_some() {
                    tracing::warn!(app = %self.name, path = %path.display(), error = %e, "cannot record the app's site");
                }
                st.recorded = None;
            }
        }
    }

    /// A step's action failed: the move ends now, as failed.
    fn failed(self: &Arc<Self>, plan: u64, step: app::Step, why: String) {
        let (actions, seen) = {
            let mut st = self.state();
            let actions = st.app.action_failed(plan, step, why, Instant::now());
            (actions, st.seen.clone())
        };
        // Events, and a cold standby made cold again.
        for a in actions {
            self.carry_out(a, &seen);
        }
    }

    fn carry_out(self: &Arc<Self>, action: Action, seen: &Observed) {
        match action {
            Action::MoveStarted {
                from,
                to,
                reason,
                steps,
            } => {
                let steps: Vec<&str> = steps.iter().map(|s| s.as_str()).collect();
                self.event(
                    "app-move-start",
                    format!("{from} -> {to} ({}): {}", reason.as_str(), steps.join(", ")),
                );
            }
            Action::Event { kind, message } => self.event(kind, message),
            Action::Promote {
                site,
                planned,
                plan,
                ..
            } => self.promote(site, planned, plan, seen),
            Action::Restore { site, plan, .. } => self.restore(site, plan),
            Action::WarmUp { site } => self.set_cold(&site, false),
            Action::Cool { site } => self.set_cold(&site, true),
            Action::Scale { site, capacity } => self.scale(&site, Some(capacity)),
            Action::ScaleDown { site } => self.scale(&site, None),
            // Cluster mode: `point_at_active` after the tick's actions.
            Action::PointDns { site, .. } if self.tiers.shared.is_none() => self.point_dns(&site),
            Action::PointDns { .. } => {}
        }
    }

    /// The database's primary to `site`: a switchover while the current primary runs (no
    /// data lost, even when the app leaves a site whose entry points failed); with no
    /// primary, the database fails over by itself and the step waits for it.
    fn promote(self: &Arc<Self>, site: String, planned: bool, plan: u64, seen: &Observed) {
        let name = self.config.database.as_ref().map(ToString::to_string);
        let Some(name) = name else { return };
        if seen.primary.is_none() {
            self.event(
                "app-promote-wait",
                format!("no primary now: waiting for database {name} to fail over"),
            );
            return;
        }
        if let Some(sh) = self.tiers.shared.clone() {
            // Cluster mode: the primary's node carries it out (`report`); the step waits
            // for the primary to be reported at `site`.
            let ask = crate::app_shared::SwitchoverAsk {
                from: seen.primary.clone().unwrap_or_default(),
                to: site.clone(),
                term: sh.node.leadership().term,
                plan,
                at: SystemTime::now(),
            };
            let me = self.clone();
            tokio::spawn(async move {
                if let Err(e) = sh.ask_switchover(&me.name, &ask).await {
                    me.failed(
                        plan,
                        app::Step::Promote,
                        format!("asking for a switchover of database {name} to {site}: {e}"),
                    );
                }
            });
            return;
        }
        let Some(db) = self.tiers.database.clone() else {
            return;
        };
        {
            let mut st = self.state();
            if st.promoting {
                drop(st);
                self.event(
                    "app-promote-wait",
                    format!("a switchover of database {} is still running", db.name),
                );
                return;
            }
            st.promoting = true;
        }
        let me = self.clone();
        tokio::spawn(async move {
            let result = db.switchover(&site).await;
            me.state().promoting = false;
            if let Err(e) = result {
                let kind = if planned { "switchover" } else { "promotion" };
                me.failed(
                    plan,
                    app::Step::Promote,
                    format!("{kind} of database {} to {site}: {e}", db.name),
                );
            }
        });
    }

    /// `site` is a cold standby of this app (`standby = "cold"`, not the preferred site).
    fn is_cold(&self, site: &str) -> bool {
        self.config.standby == model::Standby::Cold
            && self.config.database.is_some()
            && self
                .config
                .sites
                .first()
                .is_some_and(|p| p.as_str() != site)
    }

    /// Cold standby: `site`'s database member kept cold (runs only as the primary) or allowed
    /// to run as a standby (warmed up before a planned move there).
    fn set_cold(&self, site: &str, cold: bool) {
        if let Some(db) = &self.tiers.database {
            db.set_cold(site, cold);
            let what = if cold {
                "cold again: its database member stops (it runs only as the primary)"
            } else {
                "warming up: its database member starts as a standby, cloned from the primary"
            };
            self.event("app-standby", format!("{site} {what}"));
        }
    }

    /// Cold standby, no primary left: `site`'s member restored from the backups as the
    /// primary ([`pg::Cluster::fail_over_by_restore`]); the step waits for the primary there.
    fn restore(self: &Arc<Self>, site: String, plan: u64) {
        let Some(db) = self.tiers.database.clone() else {
            return;
        };
        {
            let mut st = self.state();
            if st.promoting {
                drop(st);
                // The step would wait for nothing: the move fails, and is tried again.
                self.failed(
                    plan,
                    app::Step::Restore,
                    format!("a switchover of database {} is still running", db.name),
                );
                return;
            }
            st.promoting = true;
        }
        self.event(
            "app-restore",
            format!(
                "restoring database {} at {site} from its backups (the newest backup and archived WAL); commits not archived yet are lost (at most archive_timeout)",
                db.name
            ),
        );
        let me = self.clone();
        let asked = SystemTime::now();
        tokio::spawn(async move {
            let result = db.fail_over_by_restore(&site).await;
            me.state().promoting = false;
            match result {
                Ok(r) => {
                    // The lost primary's newest commit is unknown; it was no later than
                    // the restore's start, which bounds the RPO from above.
                    let newest = r.copy.newest_restored_commit.as_deref();
                    let rpo = newest
                        .and_then(event::parse_rfc3339)
                        .and_then(|t| asked.duration_since(t).ok())
                        .map_or_else(
                            || "unknown".to_string(),
                            |d| format!("at most {:.1} s", d.as_secs_f64()),
                        );
                    me.event(
                        "app-restore",
                        format!(
                            "database {} restored at {site} (term {}): backup {}, copy {:.2} s (restore {:.2} s + replay {:.2} s), down {:.2} s; newest restored commit {}, RPO {rpo}",
                            db.name,
                            r.term,
                            r.copy.backup.as_deref().unwrap_or("-"),
                            r.copy.rto_seconds,
                            r.copy.restore_seconds,
                            r.copy.start_seconds,
                            r.downtime_seconds,
                            newest.unwrap_or("-"),
                        ),
                    );
                }
                Err(e) => me.failed(
                    plan,
                    app::Step::Restore,
                    format!("restoring database {} at {site}: {e}", db.name),
                ),
            }
        });
    }

    /// The app's set at `site` to `capacity`, or back to its `min` (a warm standby's).
    fn scale(&self, site: &str, capacity: Option<u32>) {
        if let Some(sh) = self.tiers.shared.clone() {
            // Cluster mode: as operator intent, which the site's node applies; each set's own
            // bounds from the topology.
            let sets: Vec<(String, u32)> =
                declared_sets_at(&self.tiers.topology, &self.config.scale_sets, site)
                    .map(|s| {
                        let c = &s.capacity;
                        let n = capacity.map_or(c.min, |n| n.clamp(c.min, c.max));
                        (s.name.to_string(), n)
                    })
                    .collect();
            for (set, n) in sets {
                let (sh, me, name) = (sh.clone(), self.events.clone(), self.name.clone());
                tokio::spawn(async move {
                    if let Err(e) = sh.set_capacity(&set, n).await {
                        let message = format!("scaling {set} to {n}: {e}");
                        let _ =
                            me.send(Event::new(Source::App, name, "app-action-failed", message));
                    }
                });
            }
            return;
        }
        for set in self.sets_at(site) {
            let n = capacity.unwrap_or(set.view().min);
            let me = self.events.clone();
            let name = self.name.clone();
            tokio::spawn(async move {
                if let Err(e) = set.scale_to(n).await {
                    let message = format!("scaling {} to {n}: {e}", set.name);
                    let _ = me.send(Event::new(Source::App, name, "app-action-failed", message));
                }
            });
        }
    }

    fn point_dns(&self, site: &str) {
        if let Some(dns) = &self.tiers.dns
            && let Err(e) = dns.set_active_site(&self.config.profile, Some(site))
        {
            self.event("app-action-failed", format!("pointing DNS at {site}: {e}"));
        }
    }

    fn sets_at(&self, site: &str) -> Vec<Arc<scaleset::ScaleSet>> {
        self.tiers
            .scale_sets
            .iter()
            .filter(|s| {
                s.site == site && self.config.scale_sets.iter().any(|n| n.as_str() == s.name)
            })
            .cloned()
            .collect()
    }

    /// One look at every tier.
    fn observe(&self) -> Observed {
        if let Some(sh) = &self.tiers.shared {
            return self.observe_shared(sh);
        }
        let t = &self.tiers;
        let mut seen = Observed::default();
        let statuses = profile_statuses(t, &*t.engine, &self.config.profile);
        let outage = t
            .drills
            .applied()
            .filter(|d| d.kind == "outage")
            .map(|d| d.site);
        for site in &self.config.sites {
            let site = site.to_string();
            let reachable = outage.as_deref() != Some(site.as_str());
            let (mut online, mut capacity) = (0, 0);
            for set in self.sets_at(&site) {
                let v = set.view();
                capacity += v.desired;
                online += v
                    .instances
                    .iter()
                    .filter(|i| i.health == Status::Online)
                    .count() as u32;
            }
            // A cold standby site runs nothing for its endpoints to be probed through: up
            // while it can be reached.
            let healthy = statuses
                .iter()
                .any(|(s, st)| s.as_deref() == Some(site.as_str()) && dns::table::available(*st))
                || (self.is_cold(&site) && capacity == 0 && reachable);
            seen.healthy.insert(site.clone(), healthy);
            seen.reachable.insert(site.clone(), reachable);
            seen.online.insert(site.clone(), online);
            seen.capacity.insert(site, capacity);
        }
        if let Some(db) = &t.database {
            let v = db.view();
            seen.primary.clone_from(&v.primary);
            for m in &v.members {
                seen.caught_up.insert(m.site.clone(), caught_up(&v, m));
            }
        }
        seen
    }

    /// Cluster mode: health from the cluster's consensus, the drill from the intents, the
    /// rest from the sites' reports (a site without one is unreachable: its node is gone).
    fn observe_shared(&self, sh: &crate::app_shared::Shared) -> Observed {
        let mut seen = Observed::default();
        let statuses = profile_statuses(&self.tiers, &*sh.health, &self.config.profile);
        let now = SystemTime::now();
        let drilled = sh
            .intents
            .current()
            .drill
            .map(|(d, _)| d)
            .filter(|d| d.kind == "outage" && !d.over(now))
            .map(|d| d.site);
        let reports = sh.reports(&self.name);
        let intended = sh.intents.current().capacity;
        let mut claims = Vec::new();
        let mut st = self.state();
        let known = &mut st.known_capacity;
        for site in &self.config.sites {
            let site = site.to_string();
            let healthy = statuses
                .iter()
                .any(|(s, st)| s.as_deref() == Some(site.as_str()) && dns::table::available(*st));
            seen.healthy.insert(site.clone(), healthy);
            let report = reports.get(&site);
            seen.reachable.insert(
                site.clone(),
                report.is_some() && drilled.as_deref() != Some(site.as_str()),
            );
            let r = report.cloned().unwrap_or_default();
            seen.online.insert(site.clone(), r.online);
            let capacity = match report {
                Some(r) => {
                    known.insert(site.clone(), r.capacity);
                    r.capacity
                }
                // Gone before this leader saw it: what the store says it was set to.
                None => known.get(&site).copied().unwrap_or_else(|| {
                    intended_capacity(
                        &self.tiers.topology,
                        &self.config.scale_sets,
                        &site,
                        &intended,
                    )
                }),
            };
            seen.capacity.insert(site.clone(), capacity);
            seen.caught_up.insert(site.clone(), r.caught_up);
            if r.primary {
                claims.push((site, r.term));
            }
        }
        seen.primary = current_primary(claims);
        drop(st);
        seen
    }
}

/// Where a drill would fail the app over to: the first other site healthy with its data
/// caught up (a cold standby: healthy); refused unless the app is at rest, unpinned, at its preferred site.
fn drill_target(st: &State) -> Result<String, Refused> {
    let app = &st.app;
    let seen = &st.seen;
    let home = app.config().sites.first().cloned().unwrap_or_default();
    let refused = |why: String| Err(Refused::new(format!("drill not started: {why}")));
    if let Some(p) = app.plan() {
        return refused(format!("a move from {} to {} is under way", p.from, p.to));
    }
    if app.pinned() {
        return refused(format!(
            "the app is pinned to {}; unpin it first",
            app.active()
        ));
    }
    if app.active() != home {
        return refused(format!(
            "the app is at {}, not at its preferred site {home}",
            app.active()
        ));
    }
    let cfg = app.config();
    // A cold standby's member is warmed up by the move itself.
    cfg.sites
        .iter()
        .find(|s| {
            **s != home
                && seen.healthy.get(*s).copied().unwrap_or(false)
                && (!cfg.database
                    || cfg.is_cold(s)
                    || seen.caught_up.get(*s).copied().unwrap_or(false))
        })
        .cloned()
        .map_or_else(
            || refused("no other site is healthy with its data caught up".into()),
            Ok,
        )
}

/// Each endpoint of the profile: its site and its status (operator switches ignored: a
/// disabled endpoint is still a site's entry point).
fn profile_statuses(
    t: &Tiers,
    health: &dyn dns::table::HealthView,
    profile: &str,
) -> Vec<(Option<String>, Status)> {
    let Some(pi) = t
        .topology
        .profiles
        .iter()
        .position(|p| p.name.as_str() == profile)
    else {
        return Vec::new();
    };
    let statuses =
        dns::table::endpoint_statuses(&t.topology, health, &dns::table::Overrides::default());
    let p = &t.topology.profiles[pi];
    p.endpoints
        .iter()
        .zip(statuses.get(pi).cloned().unwrap_or_default())
        .map(|(e, s)| (t.topology.endpoint_site(e).map(str::to_string), s))
        .collect()
}

/// Whether a member has every acknowledged write: the primary itself; a standby streaming
/// and synchronous (sync replication) or streaming with nothing left to replay (async).
fn caught_up(v: &pg::View, m: &pg::MemberView) -> bool {
    if v.primary.as_deref() == Some(m.site.as_str()) {
        return true;
    }
    if m.state != "streaming" {
        return false;
    }
    if v.replication == "sync" {
        v.sync_standby.as_deref() == Some(m.site.as_str())
    } else {
        m.lag_bytes == Some(0)
    }
}

fn times(steps: &[(app::Step, Duration)]) -> Vec<StepTime> {
    steps
        .iter()
        .map(|(s, d)| StepTime {
            step: s.as_str().into(),
            seconds: d.as_secs_f64(),
        })
        .collect()
}

/// Writes the latest value `rx` holds with `write`, one write at a time, so an older value never
/// lands after a newer one; a failed write is tried again after a second while it is still the
/// latest. Ends when `stop` is set or the sender is gone.
async fn write_latest<T, F, Fut>(
    mut rx: watch::Receiver<Option<T>>,
    mut stop: watch::Receiver<bool>,
    write: F,
) where
    T: Clone + PartialEq,
    F: Fn(T) -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let mut written: Option<T> = None;
    let mut said = false;
    loop {
        let want = rx.borrow_and_update().clone();
        if let Some(v) = want.filter(|v| written.as_ref() != Some(v)) {
            match write(v.clone()).await {
                Ok(()) => {
                    written = Some(v);
                    said = false;
                    continue;
                }
                Err(e) => {
                    if !said {
                        tracing::warn!(error = %e, "cannot write an app's record or report; trying again");
                        said = true;
                    }
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        r = rx.changed() => if r.is_err() { return },
                        _ = stop.changed() => return,
                    }
                    continue;
                }
            }
        }
        tokio::select! {
            r = rx.changed() => if r.is_err() { return },
            _ = stop.changed() => return,
        }
    }
}

/// Cluster mode: of the sites whose reports claim the database's primary, with the term each
/// node saw, the one of the highest term (a report not yet rewritten after a failover claims
/// it under the older term); the last in the app's site order on a tie.
fn current_primary(claims: Vec<(String, u64)>) -> Option<String> {
    // `max_by_key` keeps the last of equal keys.
    claims
        .into_iter()
        .max_by_key(|(_, term)| *term)
        .map(|(site, _)| site)
}

/// The topology's declarations of an app's sets (`app_sets`) at `site`.
fn declared_sets_at<'t>(
    topology: &'t model::Topology,
    app_sets: &'t [model::Name],
    site: &'t str,
) -> impl Iterator<Item = &'t model::ScaleSet> {
    topology
        .scale_sets
        .iter()
        .filter(move |s| s.site.as_str() == site && app_sets.contains(&s.name))
}

/// Cluster mode: the capacity of an app's sets (`app_sets`) at `site` by the store's capacity
/// intents (`intended`, by set), each set's `initial` where none was set. What a site whose node
/// is gone last ran, for a leader that never saw its report (one started since).
fn intended_capacity(
    topology: &model::Topology,
    app_sets: &[model::Name],
    site: &str,
    intended: &BTreeMap<String, u32>,
) -> u32 {
    declared_sets_at(topology, app_sets, site)
        .map(|s| {
            intended
                .get(s.name.as_str())
                .copied()
                .unwrap_or(s.capacity.initial)
        })
        .sum()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_primary_is_the_claim_of_the_highest_term() {
        let claims = |c: &[(&str, u64)]| c.iter().map(|(s, t)| (s.to_string(), *t)).collect();
        assert_eq!(current_primary(claims(&[])), None);
        assert_eq!(
            current_primary(claims(&[("edge", 3), ("region", 4)])).as_deref(),
            Some("region")
        );
        assert_eq!(
            current_primary(claims(&[("edge", 5), ("region", 4)])).as_deref(),
            Some("edge"),
            "a stale claim later in site order"
        );
        assert_eq!(
            current_primary(claims(&[("edge", 0), ("region", 0)])).as_deref(),
            Some("region"),
            "without terms (older nodes): the last, as before"
        );
    }

    #[test]
    fn a_lost_sites_capacity_is_its_intent_or_its_initial() {
        let set = |name: &str, initial: u32, first: u32| {
            format!(
                r#"
[[scale_set]]
name = "{name}"
site = "edge"
command = ["true"]
bind = "127.0.0.1"
ports = {{ http = "{first}-{}" }}
capacity = {{ min = 1, max = 8, initial = {initial} }}
"#,
                first + 7
            )
        };
        let text = format!(
            r#"
[[site]]
name = "edge"
role = "edge"
[[site]]
name = "region"
role = "region"
{}{}{}"#,
            set("web", 2, 21000),
            set("api", 3, 21010),
            set("other", 4, 21020)
        );
        let t = model::parse(model::Source::new("t.toml", text)).unwrap();
        let app: Vec<model::Name> = t.scale_sets[..2].iter().map(|s| s.name.clone()).collect();
        let none = BTreeMap::new();
        assert_eq!(intended_capacity(&t, &app, "edge", &none), 5, "initials");
        let set = BTreeMap::from([("web".to_string(), 6), ("other".to_string(), 1)]);
        assert_eq!(
            intended_capacity(&t, &app, "edge", &set),
            9,
            "web's intent, api's initial"
        );
        assert_eq!(
            intended_capacity(&t, &app, "region", &set),
            0,
            "no set there"
        );
    }
}
