//! The whole app's failover and failback decisions, sans IO: `(state, observation, now) ->
//! actions`. An app (`[[app]]`) is a DNS profile, an optional database and a scale set per
//! site that move between sites together; one site is **active** at a time, under a term that
//! grows with every move (the driver records both, so a restart resumes where the app was).
//!
//! A move is a [`Plan`] of ordered steps, each carried out by the driver and confirmed by what
//! it observes next, as Azure Site Recovery runs a recovery plan:
//!
//! 1. **confirm the loss** (failover only): the active site stays unhealthy for `confirm`;
//! 2. **promote** the database at the target (a failover, or a planned switchover when failing
//!    back), confirmed when the database reports its primary there. A cold standby has no
//!    running member: with no primary left it is **restored** from the backups as the primary
//!    (RPO bounded by `archive_timeout`); while a primary runs it is **warmed up** first (started
//!    as a standby, cloned from the primary, until it has caught up), then switched over to;
//! 3. **scale** the target's set to the capacity the app had (warm standby), then **wait** until
//!    that many instances are Online (hot: the target's own capacity), or `step_timeout`
//!    passes: a partial site beats none;
//! 4. **move DNS** to the target: the app is now active there, with the next term;
//! 5. **scale down** (warm, cold) what is left at the old site, when it is reachable; a cold
//!    site's database member is made **cold** again (stopped) once the app has left it.
//!
//! Failback to the preferred site (the first of `sites`) is automatic unless configured
//! manual, and gated on the data, which no DNS traffic manager does: the site must have been
//! healthy for `failback_hold` **and** its database member caught up ([`Observed::caught_up`]);
//! [`App::waiting_for`] says what it waits for. A pinned app never moves by itself. When the
//! database fails over on its own, the app follows its data. A planned move goes only to a
//! member that has caught up; a move that fails holds back the app's own moves for
//! [`RETRY_FIRST`], doubling up to [`RETRY_MAX`].

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::time::Instant;

/// How the standby site runs while it is not active.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Standby {
    /// Full capacity all along: nothing to scale before DNS moves.
    Hot,
    /// Its set's `min`; scaled to the active site's capacity during a failover, before DNS.
    Warm,
    /// No database member and no instances (its set's `min`, 0): the member is restored from
    /// the backups (or, while a primary runs, warmed up and switched over to) and the set
    /// scaled from 0 during a failover, before DNS. The preferred site is never cold.
    Cold,
}

/// The app's settings (from `[[app]]`).
#[derive(Clone, Debug)]
pub struct Config {
    /// Sites in order of preference; the first is where the app belongs.
    pub sites: Vec<String>,
    /// Whether the app has a database that moves with it.
    pub database: bool,
    pub standby: Standby,
    /// Automatic failback to the preferred site (else only on command).
    pub automatic_failback: bool,
    /// When the database fails over by itself, the app follows its data (else compute and
    /// DNS stay where they are, and an event says so).
    pub follow_data: bool,
    /// How long the preferred site must be healthy before failing back.
    pub failback_hold: Duration,
    /// How long the active site must stay unhealthy before a failover starts.
    pub confirm: Duration,
    /// The longest wait for one step's confirmation before the plan goes on (waiting for
    /// instances) or is abandoned (a promotion that does not happen).
    pub step_timeout: Duration,
    /// The longest wait for a cold standby's restore or warm-up (a large database takes
    /// minutes to restore or clone).
    pub restore_timeout: Duration,
}

impl Config {
    /// `site` is a cold standby: `standby = "cold"`, a database, not the preferred site.
    pub fn is_cold(&self, site: &str) -> bool {
        self.standby == Standby::Cold
            && self.database
            && self.sites.first().is_some_and(|p| p != site)
    }
}

/// What the driver sees at one moment.
#[derive(Clone, Debug, Default)]
pub struct Observed {
    /// Per site: whether its entry points are healthy (the cluster's consensus, or the probes
    /// in one process). A site missing is unhealthy.
    pub healthy: BTreeMap<String, bool>,
    /// Per site: whether its node (or, in one process, the site) can be reached to act on.
    pub reachable: BTreeMap<String, bool>,
    /// The database's primary site now, if any.
    pub primary: Option<String>,
    /// Per site: whether its database member has caught up with the primary (sync: streaming
    /// and synchronous; async: no lag after a pause in writes).
    pub caught_up: BTreeMap<String, bool>,
    /// Per site: instances Online in the app's scale set there.
    pub online: BTreeMap<String, u32>,
    /// Per site: the scale set's desired capacity.
    pub capacity: BTreeMap<String, u32>,
}

impl Observed {
    fn healthy(&self, site: &str) -> bool {
        self.healthy.get(site).copied().unwrap_or(false)
    }
    fn reachable(&self, site: &str) -> bool {
        self.reachable.get(site).copied().unwrap_or(false)
    }
    fn caught_up(&self, site: &str) -> bool {
        self.caught_up.get(site).copied().unwrap_or(false)
    }
    fn online(&self, site: &str) -> u32 {
        self.online.get(site).copied().unwrap_or(0)
    }
    fn capacity(&self, site: &str) -> u32 {
        self.capacity.get(site).copied().unwrap_or(0)
    }
}

/// An operator's command (`tandem app failover|failback|pin|unpin`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// Move to `to` now (a planned move: no loss to confirm).
    Failover { to: String },
    /// Move back to the preferred site now, if its data has caught up.
    Failback,
    /// Stay at `site` (moving there first if it is not active); no automatic moves.
    Pin { site: String },
    /// Automatic moves again.
    Unpin,
}

impl std::fmt::Display for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Failover { to } => write!(f, "failover to {to}"),
            Command::Failback => f.write_str("failback"),
            Command::Pin { site } => write!(f, "pin to {site}"),
            Command::Unpin => f.write_str("unpin"),
        }
    }
}

/// Why a command was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    pub why: String,
    /// It named a site that is not one of the app's (the API's 404; else a conflict, 409).
    pub unknown_site: bool,
}

impl Refused {
    pub fn new(why: impl Into<String>) -> Refused {
        Refused {
            why: why.into(),
            unknown_site: false,
        }
    }
}

/// What the driver must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Make `site`'s database member the primary: a failover (fence the old primary first) or,
    /// with `planned`, a switchover with no data loss.
    Promote {
        site: String,
        planned: bool,
        term: u64,
        /// The move it belongs to ([`Plan::id`]), for [`App::action_failed`].
        plan: u64,
    },
    /// Cold standby, no primary left: restore `site`'s member from the backups (the newest
    /// backup and archived WAL) and make it the primary.
    Restore { site: String, term: u64, plan: u64 },
    /// Cold standby, a primary running: start `site`'s member as a standby (cloned from the
    /// primary) so that it can catch up and be switched over to.
    WarmUp { site: String },
    /// Cold standby: the app has left `site`; stop its database member (it runs only as the
    /// primary).
    Cool { site: String },
    /// Set the capacity of the app's scale set at `site`.
    Scale { site: String, capacity: u32 },
    /// Answer the app's DNS profile with `site`, and record `site` active under `term`.
    PointDns { site: String, term: u64 },
    /// Return the old site's set to its standby capacity (`min` for warm), when reachable.
    ScaleDown { site: String },
    /// A move starts (the driver records it and tells the operator).
    MoveStarted {
        from: String,
        to: String,
        reason: Reason,
        steps: Vec<Step>,
    },
    /// Tell the operator (an event): `kind` as in `app-move-end`, and what happened.
    Event { kind: &'static str, message: String },
}

/// Why the app moves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// The active site was lost.
    SiteLost,
    /// The database's primary moved to another site by itself.
    DataMoved,
    /// Back to the preferred site, its data caught up.
    Failback,
    /// An operator's command.
    Operator,
}

impl Reason {
    /// As the API, events and metrics spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::SiteLost => "site-lost",
            Reason::DataMoved => "data-moved",
            Reason::Failback => "failback",
            Reason::Operator => "operator",
        }
    }
}

/// One step of a plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    ConfirmLoss,
    WarmUp,
    Restore,
    Promote,
    Scale,
    WaitOnline,
    MoveDns,
    ScaleDown,
}

impl Step {
    /// As the API and the CLI spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Step::ConfirmLoss => "confirm-loss",
            Step::WarmUp => "warm-up",
            Step::Restore => "restore",
            Step::Promote => "promote",
            Step::Scale => "scale",
            Step::WaitOnline => "wait-online",
            Step::MoveDns => "move-dns",
            Step::ScaleDown => "scale-down",
        }
    }
}

/// A move in progress: from, to, why, its steps and how long each took.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Numbers the moves of this `App`, so a late report about an earlier one is told apart.
    pub id: u64,
    pub from: String,
    pub to: String,
    pub reason: Reason,
    pub steps: Vec<Step>,
    /// Index of the step under way.
    pub at: usize,
    /// The capacity the app had at `from` when the plan started.
    pub capacity: u32,
    pub started: Instant,
    step_started: Instant,
    /// Whether the current step's action was sent.
    sent: bool,
    /// Each finished step and its duration.
    pub done: Vec<(Step, Duration)>,
}

impl Plan {
    /// The current step's action, sent once: the next observations confirm it.
    fn send_once(&mut self, out: &mut Vec<Action>, action: impl FnOnce(&Plan) -> Action) {
        if !self.sent {
            self.sent = true;
            out.push(action(self));
        }
    }

    /// The steps a move to `to` takes, as things are `seen` now (also for `tandem app plan`).
    /// A cold target whose member has not caught up is warmed up then promoted while a
    /// primary runs, else restored; should the primary be gone by the time the warm-up
    /// starts, the plan restores instead.
    pub fn steps_for(cfg: &Config, reason: Reason, to: &str, seen: &Observed) -> Vec<Step> {
        let mut steps = Vec::new();
        if reason == Reason::SiteLost {
            steps.push(Step::ConfirmLoss);
        }
        if cfg.database && seen.primary.as_deref() != Some(to) {
            match (cfg.is_cold(to), seen.caught_up(to), seen.primary.is_some()) {
                (true, false, true) => steps.extend([Step::WarmUp, Step::Promote]),
                (true, false, false) => steps.push(Step::Restore),
                _ => steps.push(Step::Promote),
            }
        }
        // A hot standby keeps its capacity: nothing to scale up or down.
        if cfg.standby != Standby::Hot {
            steps.push(Step::Scale);
        }
        steps.extend([Step::WaitOnline, Step::MoveDns]);
        if cfg.standby != Standby::Hot {
            steps.push(Step::ScaleDown);
        }
        steps
    }
}

/// How a move ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The app is active at the target.
    Moved,
    /// A step failed (why); the app stays where it was.
    Failed(String),
    /// The lost site came back before the loss was confirmed.
    Abandoned(String),
}

impl Outcome {
    /// `done`, `failed` or `abandoned`, as the API spells it.
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::Moved => "done",
            Outcome::Failed(_) => "failed",
            Outcome::Abandoned(_) => "abandoned",
        }
    }

    /// Why the move did not happen.
    pub fn error(&self) -> Option<&str> {
        match self {
            Outcome::Moved => None,
            Outcome::Failed(why) | Outcome::Abandoned(why) => Some(why),
        }
    }

    /// The event kind that tells it.
    fn kind(&self) -> &'static str {
        match self {
            Outcome::Moved => "app-move-end",
            Outcome::Failed(_) => "app-move-failed",
            Outcome::Abandoned(_) => "app-move-abandoned",
        }
    }
}

/// A move that ended, for status and the drill report.
#[derive(Clone, Debug)]
pub struct Finished {
    pub from: String,
    pub to: String,
    pub reason: Reason,
    /// Each finished step and how long it took.
    pub steps: Vec<(Step, Duration)>,
    /// From the move's start to its end.
    pub took: Duration,
    /// When it ended.
    pub ended: Instant,
    pub outcome: Outcome,
    /// The app's term after it.
    pub term: u64,
}

/// How the moves since start ended.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    pub moved: u64,
    pub failed: u64,
    pub abandoned: u64,
}

impl Tally {
    pub fn total(&self) -> u64 {
        self.moved + self.failed + self.abandoned
    }
}

/// The app's decisions.
#[derive(Clone, Debug)]
pub struct App {
    cfg: Config,
    active: String,
    term: u64,
    pinned: bool,
    plan: Option<Plan>,
    /// Since when each site has been healthy (for the failback hold).
    healthy_since: BTreeMap<String, Instant>,
    /// Since when the active site has been unhealthy.
    unhealthy_since: Option<Instant>,
    /// The database's primary site as last seen (for `follow = "none"`'s event).
    primary_seen: Option<String>,
    last: Option<Finished>,
    tally: Tally,
    next_plan: u64,
    /// Moves failed in a row, and when the app may try to move by itself again.
    failures: u32,
    retry_at: Option<Instant>,
}

/// After a failed move the app waits this long before moving by itself again, doubling with
/// every failure in a row up to [`RETRY_MAX`]: a move that cannot succeed (a switchover
/// refused) must not be retried every tick. Operator commands are not held back.
pub const RETRY_FIRST: Duration = Duration::from_secs(5);
pub const RETRY_MAX: Duration = Duration::from_secs(60);

impl App {
    /// An app active at `active` under `term` (as recorded; the preferred site and term 0 for
    /// a new one).
    pub fn new(cfg: Config, active: String, term: u64) -> App {
        App {
            cfg,
            active,
            term,
            pinned: false,
            plan: None,
            healthy_since: BTreeMap::new(),
            unhealthy_since: None,
            primary_seen: None,
            last: None,
            tally: Tally::default(),
            next_plan: 0,
            failures: 0,
            retry_at: None,
        }
    }

    /// Restores a pin (as recorded before a restart).
    #[must_use]
    pub fn pinned_as(mut self, pinned: bool) -> App {
        self.pinned = pinned;
        self
    }

    /// The last move that ended (moved, failed or abandoned).
    pub fn last_move(&self) -> Option<&Finished> {
        self.last.as_ref()
    }
    /// How the moves since start ended.
    pub fn tally(&self) -> Tally {
        self.tally
    }
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn active(&self) -> &str {
        &self.active
    }
    pub fn term(&self) -> u64 {
        self.term
    }
    pub fn pinned(&self) -> bool {
        self.pinned
    }
    pub fn plan(&self) -> Option<&Plan> {
        self.plan.as_ref()
    }
    fn preferred(&self) -> &str {
        self.cfg.sites.first().map_or("", String::as_str)
    }

    /// What an automatic failback waits for, when the app is away from its preferred site and
    /// no move is under way; `None` when it is home (or failback is manual and nothing else
    /// keeps it away).
    pub fn waiting_for(&self, seen: &Observed, now: Instant) -> Option<String> {
        let home = self.preferred().to_string();
        if self.active == home || self.plan.is_some() {
            return None;
        }
        if self.pinned {
            return Some(format!("pinned to {}", self.active));
        }
        if let Some(at) = self.retry_at.filter(|at| now < *at) {
            return Some(format!(
                "the next try in {:.1} s, after {} failed moves in a row",
                at.saturating_duration_since(now).as_secs_f64(),
                self.failures
            ));
        }
        if !self.cfg.automatic_failback {
            return Some("failback is manual: `tandem app failback`".into());
        }
        let held = self
            .healthy_since
            .get(&home)
            .map(|since| now.saturating_duration_since(*since));
        match held {
            None => Some(format!("{home} to be healthy")),
            Some(h) if h < self.cfg.failback_hold => Some(format!(
                "{home} healthy for {:.1} s of the {:.1} s hold",
                h.as_secs_f64(),
                self.cfg.failback_hold.as_secs_f64()
            )),
            _ if self.cfg.database && !seen.caught_up(&home) => {
                Some(format!("{home}'s database member to catch up"))
            }
            _ => None,
        }
    }

    /// An operator's command; the actions it starts come from the next [`App::step`].
    ///
    /// # Errors
    /// A move already under way, an unknown or unhealthy target, or a failback whose data has
    /// not caught up.
    pub fn command(&mut self, cmd: Command, seen: &Observed, now: Instant) -> Result<(), Refused> {
        match cmd {
            Command::Unpin => {
                self.pinned = false;
                Ok(())
            }
            Command::Pin { site } => {
                self.known(&site)?;
                if site != self.active {
                    self.start_manual(&site, Reason::Operator, seen, now)?;
                }
                self.pinned = true;
                Ok(())
            }
            Command::Failover { to } => {
                self.known(&to)?;
                if to == self.active {
                    return Err(Refused::new(format!("the app is already active at {to}")));
                }
                self.start_manual(&to, Reason::Operator, seen, now)
            }
            Command::Failback => {
                let home = self.preferred().to_string();
                if home == self.active {
                    return Err(Refused::new(format!("the app is already at {home}")));
                }
                self.start_manual(&home, Reason::Failback, seen, now)
            }
        }
    }

    /// The steps an operator's move to `to` would take now (`tandem app plan`), without
    /// starting it.
    ///
    /// # Errors
    /// As [`App::command`] would refuse `Failover { to }`.
    pub fn preview(&self, to: &str, seen: &Observed) -> Result<Vec<Step>, Refused> {
        self.known(to)?;
        self.idle()?;
        if to == self.active {
            return Err(Refused::new(format!("the app is already active at {to}")));
        }
        self.ready(to, seen)?;
        Ok(Plan::steps_for(&self.cfg, Reason::Operator, to, seen))
    }

    fn known(&self, site: &str) -> Result<(), Refused> {
        if self.cfg.sites.iter().any(|s| s == site) {
            Ok(())
        } else {
            Err(Refused {
                why: format!(
                    "{site} is not one of the app's sites ({})",
                    self.cfg.sites.join(", ")
                ),
                unknown_site: true,
            })
        }
    }

    fn start_manual(
        &mut self,
        to: &str,
        reason: Reason,
        seen: &Observed,
        now: Instant,
    ) -> Result<(), Refused> {
        self.idle()?;
        self.ready(to, seen)?;
        self.plan = Some(self.new_plan(to, reason, seen, now));
        Ok(())
    }

    /// No move under way.
    fn idle(&self) -> Result<(), Refused> {
        match &self.plan {
            Some(p) => Err(Refused::new(format!(
                "a move from {} to {} is under way",
                p.from, p.to
            ))),
            None => Ok(()),
        }
    }

    /// `to` can take a planned move: healthy, and (a planned move is a switchover) its
    /// member has every write — or, a cold standby, will have once warmed up (or restored).
    fn ready(&self, to: &str, seen: &Observed) -> Result<(), Refused> {
        if !seen.healthy(to) {
            return Err(Refused::new(format!("{to} is not healthy")));
        }
        if self.cfg.database && !seen.caught_up(to) && !self.cfg.is_cold(to) {
            return Err(Refused::new(format!(
                "{to}'s database member has not caught up; moving now would lose writes"
            )));
        }
        Ok(())
    }

    fn new_plan(&mut self, to: &str, reason: Reason, seen: &Observed, now: Instant) -> Plan {
        self.next_plan += 1;
        Plan {
            id: self.next_plan,
            from: self.active.clone(),
            to: to.to_string(),
            reason,
            steps: Plan::steps_for(&self.cfg, reason, to, seen),
            at: 0,
            // Warm, cold: the capacity the app has now; hot: the target's own.
            capacity: match self.cfg.standby {
                Standby::Warm | Standby::Cold => seen.capacity(&self.active).max(seen.capacity(to)),
                Standby::Hot => seen.capacity(to),
            },
            started: now,
            step_started: now,
            sent: false,
            done: Vec::new(),
        }
    }

    /// One look at the world: the actions to carry out now.
    pub fn step(&mut self, seen: &Observed, now: Instant) -> Vec<Action> {
        self.track(seen, now);
        let mut out = Vec::new();
        self.data_moved(seen, &mut out);
        if self.plan.is_none()
            && let Some((to, reason)) = self.should_move(seen, now)
        {
            let plan = self.new_plan(&to, reason, seen, now);
            out.push(Action::MoveStarted {
                from: plan.from.clone(),
                to: plan.to.clone(),
                reason,
                steps: plan.steps.clone(),
            });
            self.plan = Some(plan);
        }
        self.advance(seen, now, &mut out);
        out
    }

    /// With `follow = "none"`, says once per change that the data moved and the app stays.
    fn data_moved(&mut self, seen: &Observed, out: &mut Vec<Action>) {
        let Some(p) = &seen.primary else {
            return;
        };
        let changed = self.primary_seen.as_ref() != Some(p);
        if changed
            && self.cfg.database
            && !self.cfg.follow_data
            && self.primary_seen.is_some()
            && *p != self.active
            && self.plan.is_none()
        {
            out.push(Action::Event {
                kind: "app-data-moved",
                message: format!(
                    "the database's primary moved to {p}; the app stays at {} (follow = \"none\"): its instances reach the primary through their frontends",
                    self.active
                ),
            });
        }
        self.primary_seen = Some(p.clone());
    }

    fn track(&mut self, seen: &Observed, now: Instant) {
        for site in &self.cfg.sites {
            if seen.healthy(site) {
                self.healthy_since.entry(site.clone()).or_insert(now);
            } else {
                self.healthy_since.remove(site);
            }
        }
        if seen.healthy(&self.active) {
            self.unhealthy_since = None;
        } else if self.unhealthy_since.is_none() {
            self.unhealthy_since = Some(now);
        }
    }

    /// Whether (and where, and why) the app should move by itself.
    fn should_move(&self, seen: &Observed, now: Instant) -> Option<(String, Reason)> {
        if self.pinned || self.retry_at.is_some_and(|at| now < at) {
            return None;
        }
        // The data moved without us (the database failed over): follow it.
        if self.cfg.database
            && self.cfg.follow_data
            && let Some(p) = &seen.primary
            && *p != self.active
            && self.cfg.sites.contains(p)
            && seen.healthy(p)
        {
            return Some((p.clone(), Reason::DataMoved));
        }
        if !seen.healthy(&self.active) {
            // The next healthy site in order of preference.
            let to = self
                .cfg
                .sites
                .iter()
                .find(|s| **s != self.active && seen.healthy(s))?;
            return Some((to.clone(), Reason::SiteLost));
        }
        let home = self.preferred();
        if self.active != home
            && self.cfg.automatic_failback
            && self.waiting_for(seen, now).is_none()
            && seen.healthy(home)
        {
            return Some((home.to_string(), Reason::Failback));
        }
        None
    }

    fn advance(&mut self, seen: &Observed, now: Instant, out: &mut Vec<Action>) {
        // Steps that complete at once run through in one call.
        for _ in 0..8 {
            let Some(plan) = self.plan.as_mut() else {
                return;
            };
            let Some(step) = plan.steps.get(plan.at).copied() else {
                self.end(Outcome::Moved, now, out);
                return;
            };
            let waited = now.saturating_duration_since(plan.step_started);
            let timed_out = waited >= self.cfg.step_timeout;
            let done = match step {
                Step::ConfirmLoss => {
                    if seen.healthy(&plan.from) {
                        let why = format!(
                            "{} is healthy again before the loss was confirmed",
                            plan.from
                        );
                        self.end(Outcome::Abandoned(why), now, out);
                        return;
                    }
                    if !seen.healthy(&plan.to) {
                        let why = format!("{} is not healthy", plan.to);
                        self.end(Outcome::Failed(why), now, out);
                        return;
                    }
                    self.unhealthy_since
                        .is_some_and(|s| now.saturating_duration_since(s) >= self.cfg.confirm)
                }
                Step::WarmUp => {
                    if seen.caught_up(&plan.to) {
                        true
                    } else if seen.primary.is_none() {
                        // No primary to clone from any more: restore instead of warming up
                        // and switching over.
                        let end = (plan.at + 2).min(plan.steps.len());
                        plan.steps.splice(plan.at..end, [Step::Restore]);
                        plan.sent = false;
                        plan.step_started = now;
                        continue;
                    } else if waited >= self.cfg.restore_timeout {
                        // A clone takes as long as a restore: the same bound.
                        let why = format!(
                            "{} did not catch up with the primary in {waited:?}",
                            plan.to
                        );
                        self.end(Outcome::Failed(why), now, out);
                        return;
                    } else {
                        plan.send_once(out, |p| Action::WarmUp { site: p.to.clone() });
                        false
                    }
                }
                Step::Restore => {
                    if seen.primary.as_deref() == Some(plan.to.as_str()) {
                        true
                    } else if waited >= self.cfg.restore_timeout {
                        let why = format!(
                            "the database was not restored as primary at {} in {waited:?}",
                            plan.to
                        );
                        self.end(Outcome::Failed(why), now, out);
                        return;
                    } else {
                        let term = self.term + 1;
                        plan.send_once(out, |p| Action::Restore {
                            site: p.to.clone(),
                            term,
                            plan: p.id,
                        });
                        false
                    }
                }
                Step::Promote => {
                    if seen.primary.as_deref() == Some(plan.to.as_str()) {
                        true
                    } else if timed_out {
                        let to = plan.to.clone();
                        let why =
                            format!("the database did not become primary at {to} in {waited:?}");
                        self.end(Outcome::Failed(why), now, out);
                        return;
                    } else {
                        let term = self.term + 1;
                        plan.send_once(out, |p| Action::Promote {
                            site: p.to.clone(),
                            planned: p.reason != Reason::SiteLost,
                            term,
                            plan: p.id,
                        });
                        false
                    }
                }
                Step::Scale => {
                    out.push(Action::Scale {
                        site: plan.to.clone(),
                        capacity: plan.capacity,
                    });
                    true
                }
                Step::WaitOnline => {
                    // An app without instances (capacity 0) has nothing to wait for.
                    let need = plan.capacity;
                    if seen.online(&plan.to) >= need {
                        true
                    } else if timed_out {
                        out.push(Action::Event {
                            kind: "app-move-partial",
                            message: format!(
                                "{} of {need} instances Online at {} after {waited:?}; moving DNS anyway",
                                seen.online(&plan.to),
                                plan.to
                            ),
                        });
                        true
                    } else {
                        false
                    }
                }
                Step::MoveDns => {
                    // Never answer with a site whose database is not the primary.
                    if self.cfg.database && seen.primary.as_deref() != Some(plan.to.as_str()) {
                        let why = format!("the database primary left {}", plan.to);
                        self.end(Outcome::Failed(why), now, out);
                        return;
                    }
                    self.term += 1;
                    self.active = plan.to.clone();
                    self.unhealthy_since = None;
                    out.push(Action::PointDns {
                        site: plan.to.clone(),
                        term: self.term,
                    });
                    true
                }
                Step::ScaleDown => {
                    if seen.reachable(&plan.from) {
                        out.push(Action::ScaleDown {
                            site: plan.from.clone(),
                        });
                    }
                    if self.cfg.is_cold(&plan.from) {
                        out.push(Action::Cool {
                            site: plan.from.clone(),
                        });
                    }
                    true
                }
            };
            if !done {
                return;
            }
            let Some(plan) = self.plan.as_mut() else {
                return;
            };
            plan.done.push((step, waited));
            plan.at += 1;
            plan.step_started = now;
            plan.sent = false;
        }
    }

    /// The driver could not carry out `step` of move `plan` (a switchover refused, say): that
    /// move ends as failed at once rather than at `step_timeout`. Ignored when the move under
    /// way is another one, or past that step.
    pub fn action_failed(
        &mut self,
        plan: u64,
        step: Step,
        why: String,
        now: Instant,
    ) -> Vec<Action> {
        let mut out = Vec::new();
        let current = self
            .plan
            .as_ref()
            .is_some_and(|p| p.id == plan && p.steps.get(p.at) == Some(&step));
        if current {
            self.end(Outcome::Failed(why), now, &mut out);
        }
        out
    }

    /// Ends the move under way, with its event.
    fn end(&mut self, outcome: Outcome, now: Instant, out: &mut Vec<Action>) {
        let Some(p) = self.plan.take() else {
            return;
        };
        let took = now.saturating_duration_since(p.started);
        let steps: Vec<String> = p
            .done
            .iter()
            .map(|(s, d)| format!("{} {:.2} s", s.as_str(), d.as_secs_f64()))
            .collect();
        let message = match outcome.error() {
            None => format!(
                "{} -> {} in {:.2} s (term {}): {}",
                p.from,
                p.to,
                took.as_secs_f64(),
                self.term,
                steps.join(", ")
            ),
            Some(why) => format!(
                "{} -> {}: {why}; the app stays at {}",
                p.from, p.to, self.active
            ),
        };
        out.push(Action::Event {
            kind: outcome.kind(),
            message,
        });
        // A cold target warmed up (or being restored) for a move that did not happen goes
        // cold again; one that became the primary meanwhile stays running as the primary.
        if outcome != Outcome::Moved
            && self.cfg.is_cold(&p.to)
            && p.steps
                .iter()
                .take(p.at + 1)
                .any(|s| matches!(s, Step::WarmUp | Step::Restore))
        {
            out.push(Action::Cool { site: p.to.clone() });
        }
        match &outcome {
            Outcome::Moved => {
                self.tally.moved += 1;
                self.failures = 0;
                self.retry_at = None;
            }
            Outcome::Failed(_) => {
                self.tally.failed += 1;
                self.failures += 1;
                let wait = RETRY_FIRST
                    .saturating_mul(1 << (self.failures - 1).min(8))
                    .min(RETRY_MAX);
                self.retry_at = Some(now + wait);
            }
            Outcome::Abandoned(_) => self.tally.abandoned += 1,
        }
        self.last = Some(Finished {
            from: p.from,
            to: p.to,
            reason: p.reason,
            steps: p.done,
            took,
            ended: now,
            outcome,
            term: self.term,
        });
    }
}
