//! Site outage drills, applied from the drill in progress (an operator intent): the site's
//! load balancers close their listeners and reset their flows, its scale sets stop every
//! instance, its database members stop as if their machine were gone (a primary fails over
//! once its lease lapses); when the drill ends (its time is up, or it is stopped) they come
//! back, the members as standbys.
//!
//! Which drill runs is decided elsewhere (the intent record, one at a time); this only makes
//! the sites this process runs match it, so it is idempotent: applying the same drill twice
//! does nothing the second time.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use event::{Event, Source};
use lb::{Balancer, Running};
use scaleset::ScaleSet;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

/// A load balancer's data plane, which a drill can stop and start again.
#[derive(Debug)]
pub struct Frontend {
    pub balancer: Arc<Balancer>,
    running: Mutex<Option<Running>>,
    workers: usize,
}

impl Frontend {
    pub fn new(running: Running, workers: usize) -> Self {
        Frontend {
            balancer: running.balancer.clone(),
            running: Mutex::new(Some(running)),
            workers,
        }
    }

    fn slot(&self) -> MutexGuard<'_, Option<Running>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Closes the listeners and resets every flow: clients see connections refused.
    pub fn stop(&self) {
        if let Some(mut r) = self.slot().take() {
            r.stop();
        }
        self.balancer.reset_flows();
    }

    /// Listens again.
    pub fn start(&self) -> std::io::Result<()> {
        let mut slot = self.slot();
        if slot.is_none() {
            *slot = Some(Running::start(self.balancer.clone(), self.workers)?);
        }
        Ok(())
    }
}

/// What runs in one site.
#[derive(Debug)]
pub struct Site {
    pub name: String,
    pub frontends: Vec<Frontend>,
    pub scale_sets: Vec<Arc<ScaleSet>>,
    /// The databases with a member in the site.
    pub databases: Vec<Arc<pg::Cluster>>,
}

/// A drill: which site, since when, until when.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drill {
    /// `outage`.
    pub kind: String,
    pub site: String,
    #[serde(with = "event::time")]
    pub started: SystemTime,
    #[serde(with = "event::time")]
    pub ends: SystemTime,
}

/// The sites this process runs, taken down and brought back as drills require.
pub struct Drills {
    sites: Vec<Site>,
    /// The drill applied now, if it concerns one of our sites.
    down: Mutex<Option<Drill>>,
    events: broadcast::Sender<Event>,
}

impl std::fmt::Debug for Drills {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Drills")
            .field("sites", &self.sites.len())
            .finish()
    }
}

impl Drills {
    pub fn new(sites: Vec<Site>) -> Arc<Self> {
        Arc::new(Drills {
            sites,
            down: Mutex::new(None),
            events: broadcast::Sender::new(64),
        })
    }

    /// Every start and end: source `drill`, subject the site, kind `outage-start` or
    /// `outage-end`.
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    fn down(&self) -> MutexGuard<'_, Option<Drill>> {
        self.down.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether this process runs `site`.
    pub fn runs(&self, site: &str) -> bool {
        self.sites.iter().any(|s| s.name == site)
    }

    /// The drill this process has applied, if any.
    pub fn applied(&self) -> Option<Drill> {
        self.down().clone()
    }

    fn event(&self, site: &str, what: &'static str, message: String) {
        tracing::info!(site, what, %message, "drill");
        let _ = self
            .events
            .send(Event::new(Source::Drill, site, what, message));
    }

    /// Makes our sites match `drill` (the drill in progress, or none) at `now`: a site of ours
    /// under a drill that has not ended goes down; a site no longer under one comes back.
    pub fn apply(&self, drill: Option<&Drill>, now: SystemTime) {
        let wanted = drill
            .filter(|d| now < d.ends && self.runs(&d.site))
            .cloned();
        let mut down = self.down();
        if *down == wanted {
            return;
        }
        if let Some(old) = down.take() {
            let early = now < old.ends;
            self.restore(&old, early, now);
        }
        if let Some(d) = &wanted {
            self.take_down(d, now);
        }
        *down = wanted;
    }

    fn site(&self, name: &str) -> Option<&Site> {
        self.sites.iter().find(|s| s.name == name)
    }

    fn take_down(&self, d: &Drill, now: SystemTime) {
        let Some(s) = self.site(&d.site) else { return };
        for f in &s.frontends {
            f.stop();
        }
        for set in &s.scale_sets {
            set.down(&format!("outage drill of site {}", d.site));
        }
        for db in &s.databases {
            db.set_outage(&d.site, Some(format!("outage drill of site {}", d.site)));
        }
        let left = d.ends.duration_since(now).unwrap_or_default();
        self.event(
            &d.site,
            "outage-start",
            format!(
                "outage drill: {} load balancers stopped answering, {} scale sets stopping, {} database members stopped; back in {}",
                s.frontends.len(),
                s.scale_sets.len(),
                s.databases.len(),
                model::units::format_duration(std::time::Duration::from_secs(left.as_secs().max(1)))
            ),
        );
    }

    fn restore(&self, d: &Drill, early: bool, now: SystemTime) {
        let Some(s) = self.site(&d.site) else { return };
        let mut failed = Vec::new();
        for f in &s.frontends {
            if let Err(e) = f.start() {
                failed.push(format!("{}: {e}", f.balancer.config.name));
            }
        }
        for set in &s.scale_sets {
            set.up(&format!("outage drill of site {} ended", s.name));
        }
        for db in &s.databases {
            db.set_outage(&s.name, None);
        }
        let lasted = now.duration_since(d.started).unwrap_or_default();
        let mut message = format!(
            "outage drill ended{} after {:.1}s: load balancers answering again, instances starting, database members rejoining",
            if early { " early" } else { "" },
            lasted.as_secs_f64()
        );
        if !failed.is_empty() {
            message.push_str(&format!("; could not restart {}", failed.join(", ")));
        }
        self.event(&s.name, "outage-end", message);
    }

    /// Stops every load balancer (at shutdown).
    pub fn shutdown(&self) {
        for s in &self.sites {
            for f in &s.frontends {
                if let Some(mut r) = f.slot().take() {
                    r.stop();
                }
            }
        }
    }
}
