//! Operations on a whole site or a whole app across tiers:
//! - `drill`: the site outage drill, which makes a site fail as it would for real — its load
//!   balancers stop answering (listeners closed, flows reset) and its scale sets' instances
//!   stop — then restores it;
//! - `app`: the driver of an `[[app]]`'s failover and failback ([`app::App`] decides; the
//!   driver observes the tiers and carries out the steps);
//! - `app_shared`: an app in cluster mode, driven by the leader through the store;
//! - `app_drill`: `tandem drill app`, a failover and failback with clients on the public entry.

pub mod app;
pub mod app_drill;
pub mod app_shared;
pub mod drill;

pub use app::{AppRunner, AppView, Tiers};
pub use drill::{Drill, Drills, Frontend, Site};
