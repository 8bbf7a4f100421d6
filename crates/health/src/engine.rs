//! The probe engine: on a thread of its own, one lightweight task per target, each on its own phase (a random offset
//! within the interval, so probes spread evenly), a semaphore bounding probes in flight, and a
//! per-target record that only its own task writes. State changes bump a version on a watch
//! channel, so data planes rebuild their snapshots only when something changed, and are sent as
//! events.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard};
use std::time::{Duration, SystemTime};

use event::{Event, Source};
use model::Monitor;
use model::diag::plural;
use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, broadcast, mpsc, oneshot, watch};
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::{Instant, MissedTickBehavior};

use crate::probe::{Destination, Failure, Outcome, Prober};
use crate::state::{Change, Health, Status, Thresholds};

/// Something to probe with a monitor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// Stable identity, such as `profile/www/edge` or `lb/edge-web/127.0.1.31:8080`.
    pub id: String,
    pub monitor: String,
    pub destination: Destination,
    /// Starts Disabled (an endpoint with `enabled = false`).
    pub disabled: bool,
}

/// Engine settings.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// Probes in flight at once, at most. Default 4096.
    pub max_in_flight: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            max_in_flight: 4096,
        }
    }
}

/// Why the engine could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("target {target} uses monitor {monitor}, which is not defined")]
    UnknownMonitor { target: String, monitor: String },
    #[error("monitor {monitor}: {reason}")]
    Monitor { monitor: String, reason: String },
    #[error("target {0} is defined twice")]
    DuplicateTarget(String),
    #[error("cannot start the probe thread: {0}")]
    Thread(std::io::Error),
}

/// No target by that id.
#[derive(Debug, thiserror::Error)]
#[error("no health target {0:?}")]
pub struct UnknownTarget(pub String);

/// What `/v1/health` shows of a target.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    pub target: String,
    pub monitor: String,
    pub destination: String,
    pub status: Status,
    #[serde(with = "event::time")]
    pub since: SystemTime,
    pub consecutive_successes: u32,
    pub consecutive_failures: u32,
    /// Latency of the last probe, in milliseconds.
    pub last_latency_ms: Option<f64>,
    /// The last failure's reason, whenever it happened.
    pub last_failure: Option<String>,
    #[serde(with = "event::opt_time")]
    pub last_failure_at: Option<SystemTime>,
    pub probes: u64,
    pub failures: u64,
}

struct Record {
    health: Health,
    since: SystemTime,
    last_latency: Option<Duration>,
    last_failure: Option<(SystemTime, Failure)>,
}

struct Slot {
    target: Target,
    thresholds: Thresholds,
    interval: Duration,
    record: Mutex<Record>,
    probes: AtomicU64,
    failures: AtomicU64,
}

impl Slot {
    fn record(&self) -> MutexGuard<'_, Record> {
        // A poisoned lock only means a panic elsewhere mid-update; the record is still usable.
        self.record.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Every target, in the order added, with an index by id.
#[derive(Default)]
struct Slots {
    list: Vec<Arc<Slot>>,
    index: HashMap<String, usize>,
}

/// Shared between the engine handle and its probe tasks.
struct Shared {
    slots: RwLock<Slots>,
    version: watch::Sender<u64>,
    events: broadcast::Sender<Event>,
}

impl Shared {
    fn slots(&self) -> RwLockReadGuard<'_, Slots> {
        self.slots.read().unwrap_or_else(|p| p.into_inner())
    }

    fn slot(&self, id: &str) -> Option<Arc<Slot>> {
        let slots = self.slots();
        slots.index.get(id).map(|i| slots.list[*i].clone())
    }
}

/// What the probe thread is asked to do after start.
enum Command {
    Probe(Arc<Slot>, Arc<Prober>, Duration),
    Forget(String),
}

/// How a monitor probes: its prober and the thresholds and interval of its targets.
struct Plan {
    prober: Arc<Prober>,
    thresholds: Thresholds,
    interval: Duration,
}

/// A running probe engine. Dropping it stops every probe.
pub struct Engine {
    shared: Arc<Shared>,
    plans: HashMap<String, Plan>,
    commands: mpsc::UnboundedSender<Command>,
    /// Stops the probe thread; `None` once stopped.
    stop: Mutex<Option<(oneshot::Sender<()>, std::thread::JoinHandle<()>)>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("targets", &self.shared.slots().list.len())
            .finish()
    }
}

impl Engine {
    /// Starts probing `targets` with the monitors they name, on a thread of its own.
    pub fn start(targets: Vec<Target>, monitors: &[Monitor], opts: Options) -> Result<Self, Error> {
        let mut plans = HashMap::new();
        for m in monitors {
            let p = Prober::new(m).map_err(|reason| Error::Monitor {
                monitor: m.name.to_string(),
                reason,
            })?;
            let plan = Plan {
                prober: Arc::new(p),
                thresholds: Thresholds {
                    tolerated_failures: m.tolerated_failures,
                    recovery_successes: m.recovery_successes,
                },
                interval: m.interval,
            };
            plans.insert(m.name.to_string(), plan);
        }
        let shared = Arc::new(Shared {
            slots: RwLock::new(Slots::default()),
            version: watch::Sender::new(0),
            events: broadcast::Sender::new(1024),
        });
        // Probing runs on its own thread with a single-threaded runtime: thousands of tiny
        // probes a second cost far less without cross-thread wake-ups, and they never compete
        // with the data planes' workers.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(Error::Thread)?;
        let (stop, stopped) = oneshot::channel::<()>();
        let (commands, received) = mpsc::unbounded_channel();
        let limit = opts.max_in_flight.max(1);
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("tandem-probes".into())
            .spawn(move || runtime.block_on(probe_thread(thread_shared, received, stopped, limit)))
            .map_err(Error::Thread)?;
        let engine = Engine {
            shared,
            plans,
            commands,
            stop: Mutex::new(Some((stop, thread))),
        };
        for target in targets {
            engine.add(target)?;
        }
        Ok(engine)
    }

    /// Starts probing one more target, on a random phase within its monitor's interval. It
    /// starts as CheckingEndpoint (or Disabled).
    pub fn add(&self, target: Target) -> Result<(), Error> {
        let plan = self
            .plans
            .get(&target.monitor)
            .ok_or_else(|| Error::UnknownMonitor {
                target: target.id.clone(),
                monitor: target.monitor.clone(),
            })?;
        let mut health = Health::new(Instant::now());
        health.set_disabled(target.disabled, Instant::now());
        let slot = Arc::new(Slot {
            thresholds: plan.thresholds,
            interval: plan.interval,
            record: Mutex::new(Record {
                health,
                since: SystemTime::now(),
                last_latency: None,
                last_failure: None,
            }),
            probes: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            target,
        });
        {
            let mut slots = self.shared.slots.write().unwrap_or_else(|p| p.into_inner());
            let id = slot.target.id.clone();
            if slots.index.contains_key(&id) {
                return Err(Error::DuplicateTarget(id));
            }
            let at = slots.list.len();
            slots.index.insert(id, at);
            slots.list.push(slot.clone());
        }
        let phase = Duration::from_micros(
            rand::rng().random_range(0..plan.interval.as_micros().max(1) as u64),
        );
        // The thread only stops with the engine; a send after that has nothing left to do.
        let _ = self
            .commands
            .send(Command::Probe(slot, plan.prober.clone(), phase));
        self.shared.version.send_modify(|v| *v += 1);
        Ok(())
    }

    /// Stops probing a target and forgets it. False when there was no such target.
    pub fn remove(&self, id: &str) -> bool {
        {
            let mut slots = self.shared.slots.write().unwrap_or_else(|p| p.into_inner());
            let Some(at) = slots.index.remove(id) else {
                return false;
            };
            slots.list.remove(at);
            for i in slots.index.values_mut() {
                if *i > at {
                    *i -= 1;
                }
            }
        }
        let _ = self.commands.send(Command::Forget(id.to_string()));
        self.shared.version.send_modify(|v| *v += 1);
        true
    }

    /// Changes whenever any target's status changes, or a target comes or goes; the value is a
    /// change counter.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.shared.version.subscribe()
    }

    /// Every status change, as it happens: source `health`, subject the target, kind the new
    /// status, message `FROM -> TO: why`.
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.shared.events.subscribe()
    }

    pub fn status(&self, id: &str) -> Option<Status> {
        let slots = self.shared.slots();
        let slot = &slots.list[*slots.index.get(id)?];
        Some(slot.record().health.status)
    }

    /// Every target, in the order added.
    pub fn reports(&self) -> Vec<Report> {
        self.shared.slots().list.iter().map(|s| report(s)).collect()
    }

    pub fn report(&self, id: &str) -> Option<Report> {
        self.shared.slot(id).map(|s| report(&s))
    }

    /// Operator's switch: a disabled target is not probed and counts as Disabled.
    pub fn set_disabled(&self, id: &str, disabled: bool) -> Result<Status, UnknownTarget> {
        let reason = if disabled {
            "disabled by operator"
        } else {
            "enabled by operator"
        };
        self.change(id, reason.to_string(), |h, now| {
            h.set_disabled(disabled, now)
        })
    }

    /// Marks a target Degraded at once for a failure seen outside the probes; it returns
    /// through its probe's `recovery_successes`.
    pub fn eject(&self, id: &str, reason: &str) -> Result<Status, UnknownTarget> {
        self.change(id, format!("ejected: {reason}"), Health::eject)
    }

    /// Applies a change to one target's state machine and publishes it, if it changed.
    fn change(
        &self,
        id: &str,
        reason: String,
        apply: impl FnOnce(&mut Health, Instant) -> Option<Change>,
    ) -> Result<Status, UnknownTarget> {
        let slot = self
            .shared
            .slot(id)
            .ok_or_else(|| UnknownTarget(id.to_string()))?;
        let mut rec = slot.record();
        let change = apply(&mut rec.health, Instant::now());
        let status = rec.health.status;
        if let Some(change) = change {
            publish(&self.shared, &slot, &mut rec, change, reason);
        }
        Ok(status)
    }

    /// Stops every probe and waits for the probe thread to end.
    pub fn shutdown(&self) {
        let running = self.stop.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some((stop, thread)) = running {
            let _ = stop.send(());
            let _ = thread.join();
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The probe thread: one task per target, started and stopped on command, until told to stop.
async fn probe_thread(
    shared: Arc<Shared>,
    mut commands: mpsc::UnboundedReceiver<Command>,
    mut stopped: oneshot::Receiver<()>,
    limit: usize,
) {
    let limit = Arc::new(Semaphore::new(limit));
    let mut tasks = JoinSet::new();
    let mut running: HashMap<String, AbortHandle> = HashMap::new();
    loop {
        tokio::select! {
            _ = &mut stopped => break,
            command = commands.recv() => match command {
                Some(Command::Probe(slot, prober, phase)) => {
                    let id = slot.target.id.clone();
                    let task = tasks.spawn(run(shared.clone(), slot, prober, limit.clone(), phase));
                    running.insert(id, task);
                }
                Some(Command::Forget(id)) => {
                    if let Some(task) = running.remove(&id) {
                        task.abort();
                    }
                }
                None => break,
            },
            // Reap finished (aborted) tasks so the set does not grow.
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
    tasks.abort_all();
}

fn report(slot: &Slot) -> Report {
    let rec = slot.record();
    Report {
        target: slot.target.id.clone(),
        monitor: slot.target.monitor.clone(),
        destination: slot.target.destination.to_string(),
        status: rec.health.status,
        since: rec.since,
        consecutive_successes: rec.health.consecutive_successes,
        consecutive_failures: rec.health.consecutive_failures,
        last_latency_ms: rec.last_latency.map(|d| d.as_secs_f64() * 1000.0),
        last_failure: rec.last_failure.as_ref().map(|(_, f)| f.to_string()),
        last_failure_at: rec.last_failure.as_ref().map(|(t, _)| *t),
        probes: slot.probes.load(Ordering::Relaxed),
        failures: slot.failures.load(Ordering::Relaxed),
    }
}

async fn run(
    shared: Arc<Shared>,
    slot: Arc<Slot>,
    prober: Arc<Prober>,
    limit: Arc<Semaphore>,
    phase: Duration,
) {
    let mut ticks = tokio::time::interval_at(Instant::now() + phase, slot.interval);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        if slot.record().health.status == Status::Disabled {
            continue;
        }
        let Ok(permit) = limit.acquire().await else {
            return; // semaphore closed: shutting down
        };
        let outcome = prober.probe(&slot.target.destination).await;
        drop(permit);
        apply(&shared, &slot, outcome);
    }
}

fn apply(shared: &Shared, slot: &Slot, outcome: Outcome) {
    slot.probes.fetch_add(1, Ordering::Relaxed);
    let mut rec = slot.record();
    rec.last_latency = Some(outcome.latency);
    if let Err(f) = &outcome.result {
        slot.failures.fetch_add(1, Ordering::Relaxed);
        rec.last_failure = Some((SystemTime::now(), f.clone()));
    }
    let change = rec
        .health
        .observe(outcome.result.is_ok(), slot.thresholds, Instant::now());
    if let Some(change) = change {
        let reason = match &outcome.result {
            Err(f) => format!(
                "{} in a row, last: {f}",
                plural(rec.health.consecutive_failures as usize, "failure")
            ),
            Ok(()) => format!(
                "{} in a row, last in {:.1}ms",
                plural(rec.health.consecutive_successes as usize, "success"),
                outcome.latency.as_secs_f64() * 1000.0
            ),
        };
        publish(shared, slot, &mut rec, change, reason);
    }
}

fn publish(shared: &Shared, slot: &Slot, rec: &mut Record, change: Change, reason: String) {
    rec.since = SystemTime::now();
    // An event too (console, API): info, so a terminal does not show it twice.
    tracing::info!(target = %slot.target.id, from = %change.from, to = %change.to, %reason, "health changed");
    shared.version.send_modify(|v| *v += 1);
    // Subject: the target; kind: the new status; message: the change and its figures.
    let e = Event::new(
        Source::Health,
        slot.target.id.clone(),
        change.to.to_string(),
        format!("{} -> {}: {reason}", change.from, change.to),
    )
    .at(rec.since);
    let _ = shared.events.send(e);
}
