//! Operations on a whole site across tiers. Today: the site outage drill, which makes a site
//! fail as it would for real — its load balancers stop answering (listeners closed, flows
//! reset) and its scale sets' instances stop — then restores it. App failover, failback and
//! backups build on the same per-site handles.

pub mod drill;

pub use drill::{Drill, Drills, Frontend, Site};
