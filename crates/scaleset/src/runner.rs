//! The async side of a scale set: carries out the controller's actions with a driver, feeds it
//! exits, health changes and metric samples, keeps the load balancers' pools and the probe
//! engine's targets in step with the instances, and publishes a view and events.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event::{Event, Source};
use health::{Destination, Engine, Status, Target};
use lb::Balancer;
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::time::Instant;

use crate::autoscale::Sample;
use crate::controller::{Action, Controller, Note, Phase, Policy};
use crate::driver::{Driver, Instance, Spec, cpu_time};
use crate::template::Template;

/// Where a set's instances plug in.
#[derive(Clone, Debug)]
pub struct Wiring {
    pub engine: Arc<Engine>,
    /// Load balancers whose pool is this set, each with the port name it sends flows to.
    pub balancers: Vec<(Arc<Balancer>, String)>,
    /// The monitor that probes instances and the port name it probes on.
    pub monitor: Option<(String, String)>,
}

impl Wiring {
    /// The wiring a topology asks for: the set's load balancers, and its `health` monitor (or
    /// else its load balancer's probe) on the port that load balancer uses (or else the first).
    pub fn of(
        set: &model::ScaleSet,
        topology: &model::Topology,
        engine: Arc<Engine>,
        balancers: &[Arc<Balancer>],
    ) -> Self {
        let mine: Vec<(Arc<Balancer>, String)> = balancers
            .iter()
            .filter_map(|b| match &b.config.pool {
                model::Pool::ScaleSet { scale_set, port } if *scale_set == set.name => {
                    Some((b.clone(), port.clone()))
                }
                _ => None,
            })
            .collect();
        let monitor = set
            .health
            .clone()
            .or_else(|| mine.iter().find_map(|(b, _)| b.config.probe.clone()))
            .filter(|m| topology.monitor(m).is_some());
        let port = mine
            .first()
            .map(|(_, p)| p.clone())
            .or_else(|| set.ports.keys().next().cloned());
        Wiring {
            engine,
            balancers: mine,
            monitor: monitor.zip(port).map(|(m, p)| (m.to_string(), p)),
        }
    }
}

/// Runner settings.
#[derive(Clone, Debug)]
pub struct Options {
    /// How often metrics are sampled and the controller ticks. Default 500 ms.
    pub tick: Duration,
    /// Instance logs go to `DIR/scale-sets/SET/INSTANCE.log`.
    pub state_dir: PathBuf,
}

impl Options {
    pub fn new(state_dir: PathBuf) -> Self {
        Options {
            tick: Duration::from_millis(500),
            state_dir,
        }
    }
}

/// One instance as the API shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InstanceView {
    pub id: String,
    pub pid: Option<u32>,
    pub address: String,
    pub ports: BTreeMap<String, u16>,
    /// `starting`, `running`, `retiring` or `stopped` (waiting for a restart).
    pub state: String,
    pub health: Status,
    pub age_seconds: f64,
    pub restarts: u32,
    pub template: u64,
    pub cpu_percent: Option<f64>,
    pub log: String,
}

/// One scale set as the API shows it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct View {
    pub name: String,
    pub site: String,
    pub desired: u32,
    pub min: u32,
    pub max: u32,
    pub template: u64,
    pub upgrading: bool,
    pub repair_suspended: bool,
    /// Down on purpose (a site outage drill).
    pub down: bool,
    pub load_balancers: Vec<String>,
    pub scale_outs: u64,
    pub scale_ins: u64,
    pub repairs: u64,
    pub instances: Vec<InstanceView>,
}

enum Command {
    ScaleTo(u32, oneshot::Sender<Result<(), String>>),
    Down(String),
    Up(String),
    Reload(Box<model::ScaleSet>),
    Shutdown(oneshot::Sender<()>),
}

enum Report {
    Exited {
        id: String,
        generation: u64,
        why: String,
    },
    Stopped {
        id: String,
        generation: u64,
        why: String,
    },
    /// A delayed restart is due.
    Due { id: String },
    /// A retiring instance's flows have ended, or its drain timeout has passed: stop it.
    Drained { id: String, generation: u64 },
}

/// A running scale set. Dropping it kills its instances; [`ScaleSet::shutdown`] stops them
/// gracefully.
#[derive(Debug)]
pub struct ScaleSet {
    pub name: String,
    pub site: String,
    commands: mpsc::UnboundedSender<Command>,
    view: Arc<Mutex<View>>,
    events: event::Feed,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl ScaleSet {
    /// Starts the set's initial instances and keeps the set running. Call from a runtime
    /// worker, not a blocking thread (see the process driver).
    pub fn start(
        set: model::ScaleSet,
        driver: Arc<dyn Driver>,
        wiring: Wiring,
        opts: Options,
    ) -> Arc<Self> {
        let (commands, received) = mpsc::unbounded_channel();
        let (reports_tx, reports) = mpsc::unbounded_channel();
        let events = event::Feed::new(1024);
        let view = Arc::new(Mutex::new(View {
            name: set.name.to_string(),
            site: set.site.to_string(),
            min: set.capacity.min,
            max: set.capacity.max,
            ..View::default()
        }));
        let site = set.site.to_string();
        let now = Instant::now();
        let policy = Policy::of(&set, wiring.monitor.is_some());
        let ctl = Controller::new(policy, set.autoscale.clone(), now);
        let runner = Runner {
            templates: HashMap::from([(0, Template::of(&set))]),
            set,
            ctl,
            driver,
            wiring,
            opts,
            procs: HashMap::new(),
            generation: 0,
            reports_tx,
            events: events.sender(),
            view: view.clone(),
            cpu: HashMap::new(),
            totals: HashMap::new(),
        };
        let name = runner.set.name.to_string();
        let task = tokio::spawn(runner.run(received, reports));
        Arc::new(ScaleSet {
            name,
            site,
            commands,
            view,
            events,
            task: Mutex::new(Some(task)),
        })
    }

    pub fn view(&self) -> View {
        self.view.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The set's events; the first caller gets them from the start, with its initial
    /// instances' (started at once, maybe before this call).
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Manual scaling; takes effect before this returns.
    pub async fn scale_to(&self, n: u32) -> Result<(), String> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::ScaleTo(n, tx))
            .map_err(|_| "the scale set has stopped".to_string())?;
        rx.await
            .map_err(|_| "the scale set has stopped".to_string())?
    }

    /// A reloaded definition: a changed template rolls through, a changed policy applies.
    pub fn reload(&self, set: model::ScaleSet) {
        let _ = self.commands.send(Command::Reload(Box::new(set)));
    }

    /// Takes the set down on purpose (a site outage): its instances stop and stay stopped.
    pub fn down(&self, why: &str) {
        let _ = self.commands.send(Command::Down(why.to_string()));
    }

    /// Brings the set back after [`ScaleSet::down`].
    pub fn up(&self, why: &str) {
        let _ = self.commands.send(Command::Up(why.to_string()));
    }

    /// Stops every instance (SIGTERM, grace, SIGKILL) and the set.
    pub async fn shutdown(&self) {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(Command::Shutdown(tx)).is_ok() {
            let _ = rx.await;
        }
        let task = self.task.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = task {
            let _ = t.await;
        }
    }
}

impl Drop for ScaleSet {
    fn drop(&mut self) {
        if let Some(t) = self.task.lock().unwrap_or_else(|p| p.into_inner()).take() {
            t.abort(); // the processes' handles kill them on drop
        }
    }
}

/// A started instance's process.
struct Proc {
    generation: u64,
    pid: Option<u32>,
    /// Asks its supervisor to stop it, with the grace from SIGTERM to SIGKILL; None once
    /// asked, or once it exited.
    stop: Option<oneshot::Sender<Duration>>,
    /// Start it again when it has stopped: (template, delay).
    restart: Option<(u64, Duration)>,
}

struct Runner {
    set: model::ScaleSet,
    ctl: Controller,
    templates: HashMap<u64, Template>,
    driver: Arc<dyn Driver>,
    wiring: Wiring,
    opts: Options,
    procs: HashMap<String, Proc>,
    generation: u64,
    reports_tx: mpsc::UnboundedSender<Report>,
    events: broadcast::Sender<Event>,
    view: Arc<Mutex<View>>,
    /// Last CPU time reading per instance.
    cpu: HashMap<String, (Instant, Duration, Option<f64>)>,
    /// Last total-connections reading per backend address.
    totals: HashMap<SocketAddr, (Instant, u64)>,
}

impl Runner {
    async fn run(
        mut self,
        mut commands: mpsc::UnboundedReceiver<Command>,
        mut reports: mpsc::UnboundedReceiver<Report>,
    ) {
        let mut health = self.wiring.engine.subscribe();
        let mut ticks = tokio::time::interval(self.opts.tick);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        self.event(
            "capacity",
            None,
            format!(
                "starting {} instances (min {}, max {})",
                self.ctl.desired(),
                self.set.capacity.min,
                self.set.capacity.max
            ),
        );
        self.step();
        loop {
            tokio::select! {
                _ = ticks.tick() => {
                    let sample = self.sample();
                    self.ctl.tick(Instant::now(), sample);
                    self.rotate_logs();
                }
                Some(r) = reports.recv() => self.report(r),
                Ok(()) = health.changed() => self.health(),
                command = commands.recv() => match command {
                    Some(Command::ScaleTo(n, reply)) => {
                        let r = self.ctl.scale_to(n, Instant::now());
                        self.step();
                        let _ = reply.send(r);
                    }
                    Some(Command::Reload(set)) => self.reload(*set),
                    Some(Command::Down(why)) => self.ctl.down(&why),
                    Some(Command::Up(why)) => self.ctl.up(&why, Instant::now()),
                    Some(Command::Shutdown(done)) => {
                        self.stop_all(&mut reports).await;
                        let _ = done.send(());
                        return;
                    }
                    None => {
                        self.stop_all(&mut reports).await;
                        return;
                    }
                },
            }
            self.step();
        }
    }

    /// Carries out what the controller decided, then republishes pools and the view.
    fn step(&mut self) {
        let (actions, notes) = self.ctl.take();
        for Note {
            kind,
            instance,
            message,
        } in notes
        {
            self.event(kind, instance.as_deref(), message);
        }
        for a in actions {
            match a {
                Action::Start { id, slot, version } => self.start(&id, slot, version),
                Action::Retire { id } => self.retire(&id),
                Action::Restart { id, version, after } => self.restart(&id, version, after),
            }
        }
        self.publish();
    }

    fn event(&self, kind: &'static str, instance: Option<&str>, message: String) {
        tracing::info!(scale_set = %self.set.name, kind, instance, %message, "scale set");
        // Subject: the set, or SET/INSTANCE; kind: `scale`, `repair`, `upgrade`, `capacity`
        // or `instance`.
        let subject = match instance {
            Some(i) => format!("{}/{i}", self.set.name),
            None => self.set.name.to_string(),
        };
        let _ = self
            .events
            .send(Event::new(Source::ScaleSet, subject, kind, message));
    }

    fn template(&self, version: u64) -> &Template {
        // Every version the controller hands out was registered before.
        self.templates
            .get(&version)
            .or_else(|| self.templates.get(&0))
            .unwrap_or_else(|| unreachable!("template 0 is always registered"))
    }

    fn target_id(&self, id: &str) -> String {
        health::instance_id(&self.set.name, id)
    }

    /// Keeps each running instance's log under the set's `log_max_size`.
    fn rotate_logs(&self) {
        for id in self.procs.keys() {
            let path = self.log_path(id);
            if let Err(e) = crate::driver::rotate_log(&path, self.set.log_max_size) {
                tracing::warn!(log = %path.display(), "cannot rotate an instance log: {e}");
            }
        }
    }

    fn log_path(&self, id: &str) -> PathBuf {
        self.opts
            .state_dir
            .join("scale-sets")
            .join(self.set.name.as_str())
            .join(format!("{id}.log"))
    }

    fn start(&mut self, id: &str, slot: u32, version: u64) {
        let t = self.template(version);
        let spec = Spec {
            id: id.to_string(),
            argv: t.argv(&self.set.site, id, slot),
            log: self.log_path(id),
            env: vec![
                ("TANDEM_INSTANCE".into(), id.to_string()),
                ("TANDEM_SITE".into(), self.set.site.to_string()),
                ("TANDEM_SCALE_SET".into(), self.set.name.to_string()),
            ],
            clear_env: false,
            detached: false,
            user: None,
        };
        let probe = self.wiring.monitor.clone().map(|(monitor, port)| Target {
            id: self.target_id(id),
            monitor,
            destination: Destination::Addr(t.address(slot, &port)),
            disabled: false,
        });
        let instance = match self.driver.start(&spec) {
            Ok(i) => i,
            Err(e) => {
                let why = format!("cannot start {:?}: {e}", spec.argv.join(" "));
                self.event("instance", Some(id), why.clone());
                self.ctl.exited(id, &why, Instant::now());
                return;
            }
        };
        self.generation += 1;
        let pid = instance.pid();
        self.event(
            "instance",
            Some(id),
            format!(
                "started pid {} on template {version}: {}",
                pid.map_or("-".into(), |p| p.to_string()),
                spec.argv.join(" ")
            ),
        );
        if let Some(target) = probe {
            let engine = &self.wiring.engine;
            engine.remove(&target.id); // a restart probes afresh
            if let Err(e) = engine.add(target) {
                tracing::warn!(instance = id, error = %e, "cannot probe instance");
            }
        }
        let (stop, stopped) = oneshot::channel();
        tokio::spawn(supervise(
            id.to_string(),
            instance,
            stopped,
            self.generation,
            self.set.stop_grace,
            self.reports_tx.clone(),
        ));
        self.procs.insert(
            id.to_string(),
            Proc {
                generation: self.generation,
                pid,
                stop: Some(stop),
                restart: None,
            },
        );
    }

    /// Out of the pools now; stopped once its flows end or the longest drain timeout passes
    /// (or at once if the set stops meanwhile: its stop stays with it until then).
    fn retire(&mut self, id: &str) {
        let Some(generation) = self
            .procs
            .get(id)
            .filter(|p| p.stop.is_some())
            .map(|p| p.generation)
        else {
            self.gone(id); // never started, or already exited
            return;
        };
        let Some(inst) = self.ctl.instance(id) else {
            return;
        };
        let t = self.template(inst.version);
        let mut flows = Vec::new();
        let mut deadline = Duration::ZERO;
        for (b, port) in &self.wiring.balancers {
            if let Some(s) = b.stats(t.address(inst.slot, port)) {
                flows.push(s);
            }
            deadline = deadline.max(b.config.drain_timeout);
        }
        let deadline = Instant::now() + deadline;
        let reports = self.reports_tx.clone();
        let id = id.to_string();
        tokio::spawn(async move {
            // Taken out of the pools by `publish` in this same step; wait for its flows.
            while Instant::now() < deadline
                && flows.iter().any(|s| s.active.load(Ordering::Relaxed) > 0)
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let _ = reports.send(Report::Drained { id, generation });
        });
    }

    fn restart(&mut self, id: &str, version: u64, after: Duration) {
        match self.procs.get_mut(id) {
            Some(p) if p.stop.is_some() => {
                p.restart = Some((version, after));
                if let Some(stop) = p.stop.take() {
                    let _ = stop.send(self.set.stop_grace);
                }
            }
            _ => self.restart_later(id, after),
        }
    }

    fn restart_later(&mut self, id: &str, after: Duration) {
        self.procs.remove(id);
        let tx = self.reports_tx.clone();
        let id = id.to_string();
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            let _ = tx.send(Report::Due { id });
        });
    }

    /// Its process is gone: stop probing it and tell the controller.
    fn gone(&mut self, id: &str) {
        self.procs.remove(id);
        self.cpu.remove(id);
        self.wiring.engine.remove(&self.target_id(id));
        self.ctl.gone(id, Instant::now());
    }

    fn report(&mut self, r: Report) {
        let now = Instant::now();
        match r {
            Report::Exited {
                id,
                generation,
                why,
            } => {
                let Some(p) = self.procs.get_mut(&id) else {
                    return;
                };
                if p.generation != generation {
                    return;
                }
                p.stop = None;
                self.event("instance", Some(&id), format!("exited: {why}"));
                let retiring = self
                    .ctl
                    .instance(&id)
                    .is_some_and(|i| i.phase == Phase::Retiring);
                if retiring {
                    self.gone(&id);
                } else {
                    self.ctl.exited(&id, &why, now);
                }
            }
            Report::Stopped {
                id,
                generation,
                why,
            } => {
                let Some(p) = self.procs.get(&id) else {
                    return;
                };
                if p.generation != generation {
                    return;
                }
                self.event("instance", Some(&id), format!("stopped: {why}"));
                match p.restart {
                    Some((_, after)) => self.restart_later(&id, after),
                    None => self.gone(&id),
                }
            }
            Report::Drained { id, generation } => {
                if let Some(p) = self.procs.get_mut(&id)
                    && p.generation == generation
                    && let Some(stop) = p.stop.take()
                {
                    let _ = stop.send(self.set.stop_grace);
                }
            }
            Report::Due { id } => {
                if let Some(i) = self.ctl.instance(&id)
                    && i.phase == Phase::Running
                    && !self.procs.contains_key(&id)
                {
                    let (slot, version) = (i.slot, i.version);
                    self.start(&id, slot, version);
                }
            }
        }
    }

    fn health(&mut self) {
        let now = Instant::now();
        let ids: Vec<String> = self.procs.keys().cloned().collect();
        for id in ids {
            if let Some(s) = self.wiring.engine.status(&self.target_id(&id)) {
                self.ctl.health(&id, s, now);
            }
        }
    }

    fn reload(&mut self, set: model::ScaleSet) {
        let now = Instant::now();
        let template = Template::of(&set);
        let policy = Policy::of(&set, self.wiring.monitor.is_some());
        self.ctl.set_policy(policy, set.autoscale.clone(), now);
        if &template != self.template(self.ctl.version()) {
            let version = self.templates.keys().max().copied().unwrap_or(0) + 1;
            self.templates.insert(version, template);
            self.ctl.set_template(version, now);
        }
        self.set = set;
    }

    /// The pools: every running instance of the set that has a process.
    fn publish(&mut self) {
        for (b, port) in &self.wiring.balancers {
            let members = self
                .ctl
                .instances()
                .iter()
                // A starting instance joins once its probe first passes: before that, flows
                // would be refused and would eject it before it ever served.
                .filter(|i| i.phase == Phase::Running && self.procs.contains_key(&i.id))
                .filter(|i| i.was_online || i.health == Status::Online)
                .map(|i| {
                    let addr = self.template(i.version).address(i.slot, port);
                    let probe = self.wiring.monitor.as_ref().map(|_| self.target_id(&i.id));
                    (addr, 1, probe)
                })
                .collect();
            b.set_members(members);
        }
        let view = self.render();
        *self.view.lock().unwrap_or_else(|p| p.into_inner()) = view;
    }

    fn render(&self) -> View {
        let now = Instant::now();
        View {
            name: self.set.name.to_string(),
            site: self.set.site.to_string(),
            desired: self.ctl.desired(),
            min: self.set.capacity.min,
            max: self.set.capacity.max,
            template: self.ctl.version(),
            upgrading: self.ctl.upgrading(),
            repair_suspended: self.ctl.repair_suspended(),
            down: self.ctl.is_down(),
            load_balancers: self
                .wiring
                .balancers
                .iter()
                .map(|(b, _)| b.config.name.to_string())
                .collect(),
            scale_outs: self.ctl.counts().scale_outs,
            scale_ins: self.ctl.counts().scale_ins,
            repairs: self.ctl.counts().repairs,
            instances: self
                .ctl
                .instances()
                .iter()
                .map(|i| {
                    let t = self.template(i.version);
                    let proc = self.procs.get(&i.id);
                    let state = match (i.phase, proc) {
                        (Phase::Retiring, _) => "retiring",
                        (Phase::Running, None) => "stopped",
                        (Phase::Running, Some(_)) if i.was_online => "running",
                        (Phase::Running, Some(_)) => "starting",
                    };
                    InstanceView {
                        id: i.id.clone(),
                        pid: proc.and_then(|p| p.pid),
                        address: t.bind.to_string(),
                        ports: t.ports(i.slot),
                        state: state.to_string(),
                        health: i.health,
                        age_seconds: now.saturating_duration_since(i.born).as_secs_f64(),
                        restarts: i.restarts,
                        template: i.version,
                        cpu_percent: self.cpu.get(&i.id).and_then(|c| c.2),
                        log: self.log_path(&i.id).display().to_string(),
                    }
                })
                .collect(),
        }
    }

    /// One sample of the set's metrics, averaged per running instance.
    fn sample(&mut self) -> Option<Sample> {
        let now = Instant::now();
        let live: Vec<(String, Option<u32>, u32, u64)> = self
            .ctl
            .instances()
            .iter()
            .filter(|i| i.phase == Phase::Running)
            .filter_map(|i| {
                let p = self.procs.get(&i.id).filter(|p| p.stop.is_some())?;
                Some((i.id.clone(), p.pid, i.slot, i.version))
            })
            .collect();
        if live.is_empty() {
            return None;
        }
        let mut cpu_sum = 0.0;
        let mut cpu_n = 0u32;
        let mut active = 0u64;
        let mut rate = 0.0;
        for (id, pid, slot, version) in &live {
            if let Some(used) = pid.and_then(cpu_time) {
                let percent = self.cpu.get(id).and_then(|(t, before, _)| {
                    let dt = now.saturating_duration_since(*t).as_secs_f64();
                    (dt > 0.0).then(|| used.saturating_sub(*before).as_secs_f64() / dt * 100.0)
                });
                if let Some(p) = percent {
                    cpu_sum += p;
                    cpu_n += 1;
                }
                self.cpu.insert(id.clone(), (now, used, percent));
            }
            for (b, port) in &self.wiring.balancers {
                let addr = self.template(*version).address(*slot, port);
                let Some(s) = b.stats(addr) else { continue };
                active += s.active.load(Ordering::Relaxed);
                let total = s.total.load(Ordering::Relaxed);
                if let Some((t0, before)) = self.totals.insert(addr, (now, total)) {
                    let dt = now.saturating_duration_since(t0).as_secs_f64();
                    if dt > 0.0 {
                        rate += total.saturating_sub(before) as f64 / dt;
                    }
                }
            }
        }
        let n = live.len() as f64;
        Some(Sample {
            cpu: if cpu_n > 0 {
                cpu_sum / f64::from(cpu_n)
            } else {
                0.0
            },
            connections: active as f64 / n,
            connection_rate: rate / n,
        })
    }

    /// Stops every instance at once, draining ones too, and waits for them (bounded by the
    /// grace period).
    async fn stop_all(&mut self, reports: &mut mpsc::UnboundedReceiver<Report>) {
        for (b, _) in &self.wiring.balancers {
            b.set_members(Vec::new());
        }
        let grace = self.set.stop_grace;
        // Every process, including those already stopping (a drain that ended, a restart).
        let mut waiting: HashMap<String, u64> = HashMap::new();
        for (id, p) in &mut self.procs {
            if let Some(stop) = p.stop.take() {
                let _ = stop.send(grace);
            }
            waiting.insert(id.clone(), p.generation);
        }
        let deadline = Instant::now() + grace + Duration::from_secs(2);
        while !waiting.is_empty() {
            let (id, generation, what) =
                match tokio::time::timeout_at(deadline, reports.recv()).await {
                    Ok(Some(Report::Stopped {
                        id,
                        generation,
                        why,
                    })) => (id, generation, format!("stopped: {why}")),
                    Ok(Some(Report::Exited {
                        id,
                        generation,
                        why,
                    })) => (id, generation, format!("exited: {why}")),
                    Ok(Some(Report::Due { .. } | Report::Drained { .. })) => continue,
                    Ok(None) | Err(_) => break,
                };
            if waiting.get(&id) == Some(&generation) {
                waiting.remove(&id);
                self.event("instance", Some(&id), what);
            }
        }
        let ids: Vec<String> = self.procs.keys().cloned().collect();
        for id in ids {
            self.wiring.engine.remove(&self.target_id(&id));
        }
        self.procs.clear();
        self.event("capacity", None, "stopped every instance".into());
    }
}

/// Owns one instance: reports its exit, or stops it when asked.
async fn supervise(
    id: String,
    mut instance: Box<dyn Instance>,
    stop: oneshot::Receiver<Duration>,
    generation: u64,
    grace: Duration,
    reports: mpsc::UnboundedSender<Report>,
) {
    tokio::select! {
        why = instance.wait() => {
            let _ = reports.send(Report::Exited { id, generation, why });
        }
        asked = stop => {
            // The grace of the stop request (a reload may have changed it since the start);
            // the one at start when the runner went away without asking.
            let grace = asked.unwrap_or(grace);
            let why = instance.stop(grace).await;
            let _ = reports.send(Report::Stopped { id, generation, why });
        }
    }
}
