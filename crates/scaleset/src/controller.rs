//! The scale-set controller: a pure state machine, `(state, input, now) -> actions + notes`,
//! that keeps a set at its desired capacity. It owns the instance list, the autoscaler,
//! automatic repair and rolling upgrades; a driver (see `runner`) carries out its actions and
//! feeds back what happened. Every decision is testable on virtual time.

use std::time::Duration;

use health::Status;
use model::{Amount, Capacity, RepairAction, ScaleIn, Upgrade};
use serde::Serialize;
use tokio::time::Instant;

use crate::autoscale::{Autoscaler, Decision, Sample};

/// Replacements that fail in a row (never reach Online) before repair suspends itself.
pub const MAX_FAILED_REPAIRS: u32 = 5;
/// How long repair stays suspended.
pub const REPAIR_SUSPENSION: Duration = Duration::from_secs(300);

/// The policy a controller runs with; everything of a `[[scale_set]]` except the template.
#[derive(Clone, Debug)]
pub struct Policy {
    pub name: String,
    pub capacity: Capacity,
    pub repair: model::Repair,
    pub upgrade: Upgrade,
    pub scale_in: ScaleIn,
    /// Whether instances have a health probe; without one they count as Online once started.
    pub probed: bool,
    /// Instances the port ranges have room for.
    pub slots: u32,
}

impl Policy {
    pub fn of(set: &model::ScaleSet, probed: bool) -> Self {
        let slots = set
            .ports
            .values()
            .map(|r| r.len())
            .min()
            .unwrap_or(u32::MAX);
        Policy {
            name: set.name.to_string(),
            capacity: set.capacity,
            repair: set.repair,
            upgrade: set.upgrade,
            scale_in: set.scale_in,
            probed,
            slots,
        }
    }
}

/// Where an instance is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Started (or restarted); part of the pool.
    Running,
    /// Out of the pool, draining, then stopped.
    Retiring,
}

/// One instance as the controller knows it.
#[derive(Clone, Debug)]
pub struct Instance {
    pub id: String,
    /// Index into the set's port ranges.
    pub slot: u32,
    /// Template generation it runs.
    pub version: u64,
    pub phase: Phase,
    pub health: Status,
    pub born: Instant,
    /// Since when it has not been Online (None while Online).
    pub unhealthy_since: Option<Instant>,
    pub was_online: bool,
    pub restarts: u32,
}

/// What the driver must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Start a new instance on template `version`, with the ports of `slot`.
    Start { id: String, slot: u32, version: u64 },
    /// Take it out of the pool, let its flows drain, stop it; then report [`Controller::gone`].
    Retire { id: String },
    /// Stop it and start it again in place, on template `version`, after `after`.
    Restart {
        id: String,
        version: u64,
        after: Duration,
    },
}

/// A decision worth an event: `kind` is `scale`, `repair`, `upgrade` or `capacity`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Note {
    pub kind: &'static str,
    pub instance: Option<String>,
    pub message: String,
}

/// Decisions taken since start, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub scale_outs: u64,
    pub scale_ins: u64,
    /// Instances replaced or restarted.
    pub repairs: u64,
}

#[derive(Debug)]
struct Rolling {
    from: u64,
    to: u64,
    /// New instances of the batch in flight.
    batch: Vec<String>,
    upgraded: u32,
    failed: u32,
    next_at: Instant,
}

/// Keeps one scale set at its desired capacity.
#[derive(Debug)]
pub struct Controller {
    policy: Policy,
    desired: u32,
    instances: Vec<Instance>,
    next_id: u64,
    autoscaler: Autoscaler,
    /// The template generation new instances get.
    version: u64,
    rolling: Option<Rolling>,
    /// Replacements that failed in a row.
    failed_repairs: u32,
    suspended_until: Option<Instant>,
    /// No new instance before this (backoff after failed starts).
    next_start: Instant,
    skipping: bool,
    counts: Counts,
    /// Down on purpose (a site outage drill): no instances, no repair, no autoscale.
    down: bool,
    actions: Vec<Action>,
    notes: Vec<Note>,
}

impl Controller {
    pub fn new(policy: Policy, rules: Vec<model::AutoscaleRule>, now: Instant) -> Self {
        let desired = policy
            .capacity
            .initial
            .clamp(policy.capacity.min, policy.capacity.max);
        let mut c = Controller {
            policy,
            desired,
            instances: Vec::new(),
            next_id: 0,
            autoscaler: Autoscaler::new(rules),
            version: 0,
            rolling: None,
            failed_repairs: 0,
            suspended_until: None,
            next_start: now,
            skipping: false,
            counts: Counts::default(),
            down: false,
            actions: Vec::new(),
            notes: Vec::new(),
        };
        c.reconcile(now);
        c
    }

    pub fn desired(&self) -> u32 {
        self.desired
    }

    pub fn counts(&self) -> Counts {
        self.counts
    }

    /// Changes the desired capacity, counting the direction.
    fn set_desired(&mut self, to: u32) {
        if to > self.desired {
            self.counts.scale_outs += 1;
        } else if to < self.desired {
            self.counts.scale_ins += 1;
        }
        self.desired = to;
    }

    pub fn instances(&self) -> &[Instance] {
        &self.instances
    }

    pub fn instance(&self, id: &str) -> Option<&Instance> {
        self.instances.iter().find(|i| i.id == id)
    }

    /// The template generation new instances get.
    pub fn version(&self) -> u64 {
        self.version
    }

    pub fn upgrading(&self) -> bool {
        self.rolling.is_some()
    }

    pub fn repair_suspended(&self) -> bool {
        self.suspended_until.is_some()
    }

    /// Actions and notes produced since the last call.
    pub fn take(&mut self) -> (Vec<Action>, Vec<Note>) {
        (
            std::mem::take(&mut self.actions),
            std::mem::take(&mut self.notes),
        )
    }

    fn note(&mut self, kind: &'static str, instance: Option<&str>, message: String) {
        self.notes.push(Note {
            kind,
            instance: instance.map(str::to_string),
            message,
        });
    }

    pub fn is_down(&self) -> bool {
        self.down
    }

    /// Takes the set down on purpose (its site is out): every instance retires, nothing is
    /// repaired or started until [`Controller::up`]. The desired capacity is kept.
    pub fn down(&mut self, why: &str) {
        if self.down {
            return;
        }
        self.down = true;
        self.rolling = None;
        let ids: Vec<String> = self.live().map(|i| i.id.clone()).collect();
        for i in self.instances.iter_mut() {
            i.phase = Phase::Retiring;
        }
        for id in ids {
            self.actions.push(Action::Retire { id });
        }
        self.note(
            "capacity",
            None,
            format!("down: {why}; every instance stops"),
        );
    }

    /// Back from [`Controller::down`]: starts the desired capacity afresh.
    pub fn up(&mut self, why: &str, now: Instant) {
        if !self.down {
            return;
        }
        self.down = false;
        self.autoscaler.reset();
        self.failed_repairs = 0;
        self.suspended_until = None;
        self.next_start = now;
        self.note(
            "capacity",
            None,
            format!("up: {why}; starting {} instances", self.desired),
        );
        self.reconcile(now);
    }

    /// The periodic step: autoscale on `sample`, repair, upgrade, reconcile.
    pub fn tick(&mut self, now: Instant, sample: Option<Sample>) {
        if self.down {
            return;
        }
        if let Some(s) = sample {
            self.autoscaler.observe(now, s);
        }
        if self.suspended_until.is_some_and(|t| now >= t) {
            self.suspended_until = None;
            self.failed_repairs = 0;
            self.note("repair", None, "repair resumed".into());
        }
        self.autoscale(now);
        self.repair_unhealthy(now);
        self.roll(now);
        self.reconcile(now);
    }

    fn autoscale(&mut self, now: Instant) {
        if self.rolling.is_some() {
            return; // capacity holds still while a template rolls through
        }
        match self
            .autoscaler
            .decide(now, self.desired, self.policy.capacity)
        {
            Some(Decision::Scale { from, to, reason }) => {
                self.skipping = false;
                self.set_desired(to);
                let word = if to > from { "out" } else { "in" };
                self.note(
                    "scale",
                    None,
                    format!("autoscale {word} {from} -> {to}: {reason}"),
                );
            }
            Some(Decision::Skipped { reason }) => {
                if !self.skipping {
                    self.note("scale", None, reason);
                }
                self.skipping = true;
            }
            None => self.skipping = false,
        }
    }

    /// Manual scaling: `tandem scale SET --to N`.
    pub fn scale_to(&mut self, n: u32, now: Instant) -> Result<(), String> {
        let Capacity { min, max, .. } = self.policy.capacity;
        if n < min || n > max {
            return Err(format!(
                "{n} is outside the capacity of {} ({min}..={max})",
                self.policy.name
            ));
        }
        if n != self.desired {
            let from = self.desired;
            self.set_desired(n);
            self.note("scale", None, format!("manual {from} -> {n}"));
        }
        // An operator acting is also the way out of a suspended repair.
        if self.suspended_until.take().is_some() {
            self.failed_repairs = 0;
            self.note("repair", None, "repair resumed by operator".into());
        }
        self.reconcile(now);
        Ok(())
    }

    /// A reload changed the policy (capacity, rules, repair, upgrade): keep the instances.
    pub fn set_policy(&mut self, policy: Policy, rules: Vec<model::AutoscaleRule>, now: Instant) {
        if rules != self.autoscaler.rules() {
            self.autoscaler = Autoscaler::new(rules);
        }
        self.policy = policy;
        let clamped = self
            .desired
            .clamp(self.policy.capacity.min, self.policy.capacity.max);
        if clamped != self.desired {
            let from = self.desired;
            self.set_desired(clamped);
            self.note(
                "capacity",
                None,
                format!("capacity changed: {from} -> {clamped}"),
            );
        }
        self.reconcile(now);
    }

    /// The instance template changed: roll it through in batches.
    pub fn set_template(&mut self, version: u64, now: Instant) {
        if version == self.version {
            return;
        }
        if self.down {
            // Nothing runs: instances start on the new template when the set comes back.
            self.version = version;
            return;
        }
        let from = self.version;
        self.version = version;
        let old = self.live().filter(|i| i.version != version).count();
        self.note(
            "upgrade",
            None,
            format!(
                "template {from} -> {version}: {old} instances to upgrade in batches of {}",
                self.batch_size()
            ),
        );
        self.rolling = Some(Rolling {
            from,
            to: version,
            batch: Vec::new(),
            upgraded: 0,
            failed: 0,
            next_at: now,
        });
        self.roll(now);
    }

    /// The instance's health changed.
    pub fn health(&mut self, id: &str, status: Status, now: Instant) {
        let Some(i) = self.instances.iter_mut().find(|i| i.id == id) else {
            return;
        };
        if i.health == status {
            return;
        }
        i.health = status;
        if status == Status::Online {
            i.unhealthy_since = None;
            i.was_online = true;
            self.failed_repairs = 0;
        } else if i.unhealthy_since.is_none() {
            i.unhealthy_since = Some(now);
        }
    }

    /// The instance exited on its own (or could not start).
    pub fn exited(&mut self, id: &str, why: &str, now: Instant) {
        let Some(i) = self.instance(id) else {
            return;
        };
        if i.phase == Phase::Retiring || self.down {
            return; // expected; `gone` follows
        }
        self.repair(id, &format!("exited: {why}"), now);
        self.reconcile(now);
    }

    /// A retired instance is stopped and its ports are free.
    pub fn gone(&mut self, id: &str, now: Instant) {
        self.instances.retain(|i| i.id != id);
        self.reconcile(now);
    }

    fn batch_size(&self) -> u32 {
        amount(self.policy.upgrade.max_batch, self.desired).max(1)
    }

    fn live(&self) -> impl Iterator<Item = &Instance> {
        self.instances.iter().filter(|i| i.phase == Phase::Running)
    }

    /// Instances that stayed out of Online for the grace period are repaired.
    fn repair_unhealthy(&mut self, now: Instant) {
        if !self.policy.probed || self.down {
            return;
        }
        let grace = self.policy.repair.grace_period;
        let due: Vec<(String, Status, Duration)> = self
            .live()
            .filter_map(|i| {
                let since = i.unhealthy_since?;
                let bad = now.saturating_duration_since(since.max(i.born));
                (bad >= grace).then(|| (i.id.clone(), i.health, bad))
            })
            .collect();
        for (id, status, bad) in due {
            let why = format!(
                "{status} for {} (grace period {})",
                model::units::format_duration(bad),
                model::units::format_duration(grace)
            );
            self.repair(&id, &why, now);
        }
    }

    /// Replaces or restarts a broken instance, unless repair is suspended.
    fn repair(&mut self, id: &str, why: &str, now: Instant) {
        let Some(pos) = self.instances.iter().position(|i| i.id == id) else {
            return;
        };
        let never_online = !self.instances[pos].was_online;
        if never_online {
            self.failed_repairs += 1;
        }
        if self.failed_repairs >= MAX_FAILED_REPAIRS && self.suspended_until.is_none() {
            self.suspended_until = Some(now + REPAIR_SUSPENSION);
            self.note(
                "repair",
                Some(id),
                format!(
                    "repair suspended for {}: {} instances in a row failed before serving; last: {why}",
                    model::units::format_duration(REPAIR_SUSPENSION),
                    self.failed_repairs
                ),
            );
        }
        let backoff = backoff(self.failed_repairs);
        self.next_start = self.next_start.max(now + backoff);
        let suspended = self.suspended_until.is_some();
        if !suspended {
            self.counts.repairs += 1;
        }
        let restart = self.policy.repair.action == RepairAction::Restart && !suspended;
        if restart {
            let version = self.version;
            let i = &mut self.instances[pos];
            i.restarts += 1;
            i.born = now + backoff;
            i.unhealthy_since = Some(now + backoff);
            i.health = Status::CheckingEndpoint;
            i.was_online = false;
            i.version = version;
            self.actions.push(Action::Restart {
                id: id.to_string(),
                version,
                after: backoff,
            });
            self.note("repair", Some(id), format!("restarting: {why}"));
        } else {
            // Retire it; reconcile starts the replacement (after any backoff).
            self.instances[pos].phase = Phase::Retiring;
            self.actions.push(Action::Retire { id: id.to_string() });
            let what = if suspended {
                "removed (repair suspended)"
            } else {
                "replacing"
            };
            self.note("repair", Some(id), format!("{what}: {why}"));
        }
    }

    /// Starts or retires instances until the live count is the desired one.
    fn reconcile(&mut self, now: Instant) {
        if self.down {
            return;
        }
        let live = self.live().count() as u32;
        if live > self.desired {
            let mut candidates: Vec<(Instant, u64, String)> = self
                .live()
                .map(|i| (i.born, id_number(&i.id), i.id.clone()))
                .collect();
            candidates.sort();
            if self.policy.scale_in == ScaleIn::Newest {
                candidates.reverse();
            }
            for (_, _, id) in candidates.into_iter().take((live - self.desired) as usize) {
                if let Some(i) = self.instances.iter_mut().find(|i| i.id == id) {
                    i.phase = Phase::Retiring;
                }
                self.note(
                    "scale",
                    Some(&id),
                    format!("scale-in: retiring the {} instance", self.policy.scale_in),
                );
                self.actions.push(Action::Retire { id });
            }
        }
        if live < self.desired && self.suspended_until.is_none() && now >= self.next_start {
            for _ in live..self.desired {
                let version = self.version;
                if self.start(version, now).is_none() {
                    break;
                }
            }
        }
    }

    fn start(&mut self, version: u64, now: Instant) -> Option<String> {
        let Some(slot) =
            (0..self.policy.slots).find(|s| !self.instances.iter().any(|i| i.slot == *s))
        else {
            self.note(
                "capacity",
                None,
                format!(
                    "no free ports for another instance: the port ranges hold {}",
                    self.policy.slots
                ),
            );
            return None;
        };
        let id = format!("{}-{}", self.policy.name, self.next_id);
        self.next_id += 1;
        self.instances.push(Instance {
            id: id.clone(),
            slot,
            version,
            phase: Phase::Running,
            health: if self.policy.probed {
                Status::CheckingEndpoint
            } else {
                Status::Online
            },
            born: now,
            unhealthy_since: self.policy.probed.then_some(now),
            was_online: !self.policy.probed,
            restarts: 0,
        });
        self.actions.push(Action::Start {
            id: id.clone(),
            slot,
            version,
        });
        Some(id)
    }

    /// Advances a rolling upgrade: settle the batch in flight, then start the next.
    fn roll(&mut self, now: Instant) {
        let Some(mut r) = self.rolling.take() else {
            return;
        };
        let grace = self.policy.repair.grace_period;
        if !r.batch.is_empty() {
            let mut ok = 0u32;
            let mut failed = 0u32;
            for id in &r.batch {
                match self.instance(id) {
                    Some(i) if i.phase == Phase::Running && i.health == Status::Online => ok += 1,
                    Some(i)
                        if i.phase == Phase::Running
                            && now.saturating_duration_since(i.born) < grace => {}
                    _ => failed += 1,
                }
            }
            if ((ok + failed) as usize) < r.batch.len() {
                self.rolling = Some(r);
                return; // still settling
            }
            r.upgraded += ok + failed;
            r.failed += failed;
            r.batch.clear();
            let limit = amount(self.policy.upgrade.max_unhealthy, r.upgraded);
            if r.failed > limit {
                // Keep the instances not yet upgraded; new ones use the last good template.
                self.version = r.from;
                self.note(
                    "upgrade",
                    None,
                    format!(
                        "upgrade to template {} aborted: {} of {} upgraded instances failed (max_unhealthy allows {limit}); the rest keep template {}",
                        r.to, r.failed, r.upgraded, r.from
                    ),
                );
                return;
            }
            r.next_at = now + self.policy.upgrade.pause;
        }
        if now < r.next_at {
            self.rolling = Some(r);
            return;
        }
        let old: Vec<String> = self
            .live()
            .filter(|i| i.version != r.to)
            .map(|i| i.id.clone())
            .collect();
        if old.is_empty() {
            self.note(
                "upgrade",
                None,
                format!(
                    "upgrade to template {} complete: {} instances upgraded, {} failed",
                    r.to, r.upgraded, r.failed
                ),
            );
            return;
        }
        let n = (self.batch_size() as usize).min(old.len());
        for id in old.into_iter().take(n) {
            if let Some(i) = self.instances.iter_mut().find(|i| i.id == id) {
                i.phase = Phase::Retiring;
            }
            self.actions.push(Action::Retire { id: id.clone() });
            match self.start(r.to, now) {
                Some(new) => {
                    self.note(
                        "upgrade",
                        Some(&id),
                        format!("upgrading: {id} replaced by {new} on template {}", r.to),
                    );
                    r.batch.push(new);
                }
                None => break,
            }
        }
        self.rolling = Some(r);
    }
}

/// A count, or a share of `of` rounded down.
pub fn amount(a: Amount, of: u32) -> u32 {
    match a {
        Amount::Count(n) => n,
        Amount::Percent(p) => (u64::from(of) * u64::from(p) / 100) as u32,
    }
}

/// Delay before the next start after `failures` failed replacements in a row.
fn backoff(failures: u32) -> Duration {
    match failures {
        0 => Duration::ZERO,
        n => Duration::from_millis(500 << (n - 1).min(6)).min(Duration::from_secs(30)),
    }
}

fn id_number(id: &str) -> u64 {
    id.rsplit('-')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}
