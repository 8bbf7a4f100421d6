//! The database tier: PostgreSQL members that Tandem bootstraps, replicates (synchronous or
//! asynchronous), watches, fails over under a lease with fencing tokens, rejoins with
//! `pg_rewind`, and switches over on request, keeping internal load balancers on the primary.

pub mod backup;
pub mod cluster;
pub mod failover;
pub mod family;
pub mod follow;
pub mod http;
pub mod lead;
pub mod local;
pub mod observe;
pub mod watchdog;

pub use cluster::{
    BackupError, Change, Cluster, MemberView, RestoreReport, SwitchoverError, View, Wiring,
};
/// A PostgreSQL connection (tokio-postgres), as `Cluster::connect_primary` gives.
pub use tokio_postgres::Client;
