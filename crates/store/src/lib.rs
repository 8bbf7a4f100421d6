//! The coordination store: leases that make a decision single-owner, each carrying a fencing
//! token (its term); records with versions, compare-and-set and watches; and this process's
//! session, which records can be tied to so that they vanish when it dies.
//!
//! - **Leases.** A lease has one holder until it expires. Renewing keeps the term; anyone taking
//!   it over after it expired (or was released) gets the next term, so every holder's actions
//!   can be told apart and stale ones refused ([`Store::put_fenced`]). Terms never go back,
//!   across restarts too.
//! - **Records.** Bytes under a key, each write giving the record a new `revision` (which grows
//!   store-wide), so a writer can say what it expects to replace ([`Expect`]). A record is
//!   [`Scope::Persistent`] or [`Scope::Session`]: the latter is deleted when this process's
//!   session ends (its node died or was cut off for longer than the session's time to live) and
//!   written again by the store when a new session starts, so what a node says of itself is
//!   present exactly while it is alive.
//! - **Watches.** Every change under a prefix after a revision, in order. [`Mirror`] keeps a
//!   local copy of a prefix current from a list and a watch, and starts over when the watch
//!   breaks, so readers never deal with the protocol.
//!
//! [`Embedded`] keeps everything in this process (leases also in a file): the single-machine
//! default. [`Etcd`] (cargo feature `etcd`, on by default) keeps it in an etcd cluster, for
//! Tandem clusters. Expiry in [`Embedded`] runs on `tokio::time`, so tests drive it with
//! virtual time. Keys are paths relative to the store's root (`nodes/edge-1`); [`keys`] is the
//! one place that spells them.

mod embedded;
#[cfg(feature = "etcd")]
mod etcd;
pub mod keys;
mod mirror;

use std::fmt::Debug;
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, SystemTime};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

pub use embedded::Embedded;
#[cfg(feature = "etcd")]
pub use etcd::{Etcd, EtcdOptions, EtcdTls};
pub use mirror::Mirror;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A held lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub holder: String,
    /// The fencing token: grows by one at every change of holder.
    pub term: u64,
    /// When it runs out unless renewed, as this process can tell: for the holder, measured
    /// from when it asked, so never later than the store's own expiry.
    pub expires: Instant,
}

/// Why a store operation did not succeed.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum StoreError {
    #[error("the lease is held by {holder} (term {term}) for another {left:?}")]
    Held {
        holder: String,
        term: u64,
        left: Duration,
    },
    #[error("the lease was lost (now term {term}{})", holder.as_ref().map(|h| format!(", held by {h}")).unwrap_or_default())]
    Lost { holder: Option<String>, term: u64 },
    /// A write whose [`Expect`]ation did not hold: someone else wrote first.
    #[error("{key} changed meanwhile (now revision {})", revision.map_or("none (absent)".to_string(), |r| r.to_string()))]
    Conflict { key: String, revision: Option<u64> },
    /// The store could not be reached or refused to answer (no quorum, timeout). Retrying
    /// later can help.
    #[error("the store is unavailable: {0}")]
    Unavailable(String),
}

/// A record: its bytes and the revision of its last write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub value: Vec<u8>,
    pub revision: u64,
}

impl Record {
    /// The value as JSON of type `T`; `None` when it is not (a record written by another
    /// version, or damaged: callers skip it rather than fail).
    pub fn json<T: DeserializeOwned>(&self) -> Option<T> {
        serde_json::from_slice(&self.value).ok()
    }
}

/// What a write expects to find.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// Whatever is there (a plain put or delete).
    Any,
    /// No record under the key (create only).
    Absent,
    /// The record at exactly this revision (compare-and-set).
    Revision(u64),
}

/// How long a record lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Until deleted.
    Persistent,
    /// While this process's session lives (see [`Connection`]).
    Session,
}

/// One change under a watched prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    Put { key: String, record: Record },
    Delete { key: String, revision: u64 },
}

impl Change {
    pub fn key(&self) -> &str {
        match self {
            Change::Put { key, .. } | Change::Delete { key, .. } => key,
        }
    }

    pub fn revision(&self) -> u64 {
        match self {
            Change::Put { record, .. } => record.revision,
            Change::Delete { revision, .. } => *revision,
        }
    }
}

/// Most operations in one atomic batch (etcd's default `--max-txn-ops` is 128).
pub const BATCH_LIMIT: usize = 128;

/// Puts and deletes for [`Store::write_many`].
#[derive(Clone, Debug, Default)]
pub struct Batch {
    pub puts: Vec<(String, Vec<u8>, Scope)>,
    pub deletes: Vec<String>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.puts.is_empty() && self.deletes.is_empty()
    }

    pub fn len(&self) -> usize {
        self.puts.len() + self.deletes.len()
    }
}

/// Records under a prefix, in key order, and the store's revision when they were read.
pub type Listing = (Vec<(String, Record)>, u64);

/// The changes of a watch, batch by batch; an `Err` ends it (the watcher lists again).
pub type Watch = mpsc::Receiver<Result<Vec<Change>, StoreError>>;

/// Whether this process can use the store, and its session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Connection {
    /// The last request to the store succeeded.
    pub connected: bool,
    /// Since when `connected` has had its value.
    #[serde(with = "event::time")]
    pub since: SystemTime,
    /// Grows each time a new session starts (after one was lost): what was tied to the old one
    /// is gone and has been written again.
    pub session: u64,
    /// Why it is not connected, or the endpoint it talks to.
    pub detail: String,
}

/// Leases, records and watches. Every method is atomic.
pub trait Store: Send + Sync + Debug {
    /// Takes the lease when nobody holds it (or it expired): the term grows by one. The
    /// current holder acquiring again just renews.
    fn acquire<'a>(
        &'a self,
        key: &'a str,
        holder: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Lease, StoreError>>;

    /// Extends the lease of `holder` at `term`; fails with `Lost` once it expired or changed
    /// hands: the holder must then behave as if it never had it.
    fn renew<'a>(
        &'a self,
        key: &'a str,
        holder: &'a str,
        term: u64,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Lease, StoreError>>;

    /// Gives the lease up at once (a planned handover); the term is kept.
    fn release<'a>(
        &'a self,
        key: &'a str,
        holder: &'a str,
        term: u64,
    ) -> BoxFuture<'a, Result<(), StoreError>>;

    /// The current lease, if held, and the latest term.
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(Option<Lease>, u64), StoreError>>;

    /// Writes a record if `expect` holds; its new revision.
    fn put<'a>(
        &'a self,
        key: &'a str,
        value: Vec<u8>,
        scope: Scope,
        expect: Expect,
    ) -> BoxFuture<'a, Result<u64, StoreError>>;

    /// Writes a record only while `holder` holds the lease `lease` at `term`: the write of a
    /// decision taken under a lease, refused (`Lost`) once a newer term exists.
    fn put_fenced<'a>(
        &'a self,
        key: &'a str,
        value: Vec<u8>,
        lease: &'a str,
        holder: &'a str,
        term: u64,
    ) -> BoxFuture<'a, Result<u64, StoreError>>;

    /// Writes and deletes many records at once, whatever is there (votes, events): far fewer
    /// round trips and store writes than one by one. Atomic in batches of up to
    /// [`BATCH_LIMIT`] operations. The revision of the last batch.
    fn write_many<'a>(&'a self, batch: Batch) -> BoxFuture<'a, Result<u64, StoreError>>;

    /// Deletes a record if `expect` holds; false when there was none.
    fn delete<'a>(
        &'a self,
        key: &'a str,
        expect: Expect,
    ) -> BoxFuture<'a, Result<bool, StoreError>>;

    /// One record.
    fn read<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Record>, StoreError>>;

    /// Every record whose key starts with `prefix`, in key order, and the store's revision at
    /// that moment (watch from the next one to miss nothing).
    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Listing, StoreError>>;

    /// Every change under `prefix` after revision `after`, until the receiver is dropped or an
    /// error ends it.
    fn watch<'a>(&'a self, prefix: &'a str, after: u64)
    -> BoxFuture<'a, Result<Watch, StoreError>>;

    /// Whether the store can be used now; changes as it goes and comes back.
    fn connection(&self) -> watch::Receiver<Connection>;

    /// Writes this process made that succeeded (puts, deletes, lease grants and releases):
    /// the load it puts on the store. Keep-alives are not writes.
    fn writes(&self) -> u64;
}

/// JSON helpers over any [`Store`].
pub trait StoreExt: Store {
    /// Writes `value` as JSON.
    fn put_json<'a, T: Serialize + Sync>(
        &'a self,
        key: &'a str,
        value: &'a T,
        scope: Scope,
        expect: Expect,
    ) -> BoxFuture<'a, Result<u64, StoreError>> {
        let bytes = serde_json::to_vec(value).unwrap_or_default();
        self.put(key, bytes, scope, expect)
    }
}

impl<S: Store + ?Sized> StoreExt for S {}

/// `ttl` as the holder's deadline: from `asked`, when the request left.
#[cfg(feature = "etcd")]
pub(crate) fn deadline(asked: Instant, ttl: Duration) -> Instant {
    asked + ttl
}
