//! Cluster mode: a Tandem node in every site, coordinated through the store (etcd), none of
//! them indispensable.
//!
//! - [`consensus`]: whether an endpoint is Degraded for DNS, from the live nodes' votes.
//! - [`intent`]: operator intent as desired-state records, applied by the node that owns
//!   what they name (also used in the single-process default, on the embedded store).
//! - [`node`]: one node's membership (its record under its session), votes published on change,
//!   the leader lease for decisions taken once, events in the store, isolation.
//! - [`record`]: what nodes write, as JSON.

pub mod consensus;
pub mod intent;
pub mod node;
pub mod record;

pub use intent::{DrillRefused, IntentSet, Intents};
pub use node::{Config, Isolation, JoinError, Leadership, Node, NodeView, VoteView};
pub use record::topology_hash;
