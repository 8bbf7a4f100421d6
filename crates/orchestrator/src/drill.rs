//! Site outage drills.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use event::{Event, Source};
use lb::{Balancer, Running};
use scaleset::ScaleSet;
use serde::Serialize;
use tokio::sync::{Notify, broadcast};

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

    fn slot(&self) -> std::sync::MutexGuard<'_, Option<Running>> {
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
}

/// The drill in progress.
#[derive(Clone, Debug, Serialize)]
pub struct Drill {
    pub kind: &'static str,
    pub site: String,
    #[serde(with = "event::time")]
    pub started: SystemTime,
    #[serde(with = "event::time")]
    pub ends: SystemTime,
}

#[derive(Debug, thiserror::Error)]
pub enum DrillError {
    #[error("no site {0:?} in the topology")]
    UnknownSite(String),
    #[error("a drill of site {0} is already running; stop it first (tandem drill stop)")]
    Busy(String),
    #[error("no drill is running")]
    NotRunning,
}

struct Current {
    drill: Drill,
    stop: Arc<Notify>,
}

/// Runs drills, one at a time.
pub struct Drills {
    sites: Vec<Site>,
    current: Mutex<Option<Current>>,
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
            current: Mutex::new(None),
            events: broadcast::Sender::new(64),
        })
    }

    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    fn current(&self) -> std::sync::MutexGuard<'_, Option<Current>> {
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The drill in progress, if any.
    pub fn view(&self) -> Option<Drill> {
        self.current().as_ref().map(|c| c.drill.clone())
    }

    fn event(&self, site: &str, what: &'static str, message: String) {
        tracing::warn!(site, what, %message, "drill");
        // Subject: the site; kind: `outage-start`, `outage-end`.
        let _ = self
            .events
            .send(Event::new(Source::Drill, site, what, message));
    }

    /// Takes `site` down now and brings it back after `length` (or on [`Drills::stop`]).
    pub fn outage(self: &Arc<Self>, site: &str, length: Duration) -> Result<Drill, DrillError> {
        let index = self
            .sites
            .iter()
            .position(|s| s.name == site)
            .ok_or_else(|| DrillError::UnknownSite(site.to_string()))?;
        let stop = Arc::new(Notify::new());
        let drill = {
            let mut current = self.current();
            if let Some(c) = current.as_ref() {
                return Err(DrillError::Busy(c.drill.site.clone()));
            }
            let started = SystemTime::now();
            let drill = Drill {
                kind: "outage",
                site: site.to_string(),
                started,
                ends: started + length,
            };
            *current = Some(Current {
                drill: drill.clone(),
                stop: stop.clone(),
            });
            drill
        };
        let s = &self.sites[index];
        for f in &s.frontends {
            f.stop();
        }
        for set in &s.scale_sets {
            set.down(&format!("outage drill of site {site}"));
        }
        self.event(
            site,
            "outage-start",
            format!(
                "outage drill: {} load balancers stopped answering, {} scale sets stopping; back in {}",
                s.frontends.len(),
                s.scale_sets.len(),
                model::units::format_duration(length)
            ),
        );
        let me = self.clone();
        tokio::spawn(async move {
            let ended_early = tokio::time::timeout(length, stop.notified()).await.is_ok();
            me.restore(index, ended_early);
        });
        Ok(drill)
    }

    /// Ends the drill in progress now.
    pub fn stop(&self) -> Result<Drill, DrillError> {
        let current = self.current();
        let c = current.as_ref().ok_or(DrillError::NotRunning)?;
        c.stop.notify_one();
        Ok(c.drill.clone())
    }

    fn restore(&self, index: usize, early: bool) {
        let s = &self.sites[index];
        let mut failed = Vec::new();
        for f in &s.frontends {
            if let Err(e) = f.start() {
                failed.push(format!("{}: {e}", f.balancer.config.name));
            }
        }
        for set in &s.scale_sets {
            set.up(&format!("outage drill of site {} ended", s.name));
        }
        let Some(c) = self.current().take() else {
            return;
        };
        let lasted = SystemTime::now()
            .duration_since(c.drill.started)
            .unwrap_or_default();
        let mut message = format!(
            "outage drill ended{} after {:.1}s: load balancers answering again, instances starting",
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
