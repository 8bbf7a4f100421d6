//! Scale sets: pools of identical instances that keep their capacity, scale with load,
//! repair themselves and take template changes as rolling upgrades.
//!
//! - [`autoscale`]: the autoscaler, a pure state machine over samples and virtual time.
//! - [`controller`]: the set controller, pure too: instances, repair, upgrades, reconcile.
//! - [`driver`]: how instances run (child processes today).
//! - [`runner`]: the async driver that carries out the controller's actions and wires
//!   instances into health probing and load balancer pools.

pub mod autoscale;
pub mod controller;
pub mod driver;
pub mod runner;
pub mod template;

pub use autoscale::{Autoscaler, Decision, Sample};
pub use controller::{Action, Controller, Note, Phase, Policy};
pub use driver::{Driver, Instance, ProcessDriver, Spec};
pub use runner::{InstanceView, ScaleSet, View};
pub use template::Template;
