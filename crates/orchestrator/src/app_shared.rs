//! An app in cluster mode: its tiers run on several nodes, so the app is driven through the
//! coordination store.
//!
//! - **One driver.** The node holding the cluster's leader lease (the one that takes the
//!   decisions taken once, [`cluster::Node::leadership`]) steps [`app::App`]; every other node
//!   follows the app's record. A new leader starts from the record, so a move cut short by a
//!   leader's loss is taken up again from what the tiers show.
//! - **The record** `apps/APP/record` (where the app is active, its term, its pin) is written
//!   by the leader, fenced by its lease's term ([`store::Store::put_fenced`]); every DNS node
//!   answers the app's profile with the record's site.
//! - **Site reports** `apps/APP/sites/SITE` (session records, so they vanish with their node):
//!   each node of an app's site says what it sees of its own site — instances Online, the
//!   sets' capacity, whether its database member is the primary and has caught up.
//!   A site without a report is unreachable.
//! - **Actions**: a capacity is operator intent (`intent/capacity/SET`, written by the leader
//!   fenced by its term), applied by the site's node; a switchover is asked in `apps/APP/switchover` and carried out by the node whose
//!   member is the primary (once per request).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use store::{Expect, Mirror, Scope, Store, StoreExt as _, keys};

/// What an app uses of the cluster.
#[derive(Clone)]
pub struct Shared {
    pub node: Arc<cluster::Node>,
    pub store: Arc<dyn Store>,
    pub intents: Arc<cluster::Intents>,
    /// A copy of `apps/`: every app's record, switchover request and site reports.
    pub mirror: Arc<Mirror>,
    /// The consensus of the live vantage points on each probe target.
    pub health: Arc<dyn dns::table::HealthView + Send + Sync>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("node", &self.node.name())
            .finish_non_exhaustive()
    }
}

/// `apps/APP/record`: where the app is active, under which term, pinned or not.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub active: String,
    pub term: u64,
    pub pinned: bool,
}

/// `apps/APP/sites/SITE`: a site node's report on its part of the app.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// Instances Online in the app's scale sets there, and their desired capacity.
    pub online: u32,
    pub capacity: u32,
    /// The site's database member is the primary and answers.
    pub primary: bool,
    /// The database's term as this node sees it: of two reports claiming the primary (one
    /// not yet rewritten after a failover), the higher term's is current. 0 from a node
    /// older than this field.
    #[serde(default)]
    pub term: u64,
    /// The site's database member has every acknowledged write (see `caught_up`).
    pub caught_up: bool,
}

/// `apps/APP/switchover`: the leader asks the node of the primary at `from` for a switchover
/// to `to`; only that node, while its member is the primary, carries it out.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwitchoverAsk {
    pub from: String,
    pub to: String,
    /// The leader's term (only the current leader's request is carried out) and its move's id.
    pub term: u64,
    pub plan: u64,
    #[serde(with = "event::time")]
    pub at: SystemTime,
}

/// How old a switchover request may be and still be carried out (a move's step times out
/// after a minute; one older belongs to a move that ended).
pub const SWITCHOVER_FRESH: Duration = Duration::from_secs(60);

impl Shared {
    /// This node's views of the store are current (the cluster's and the apps'): a leader
    /// steps the app only then.
    pub fn current(&self) -> bool {
        self.node.fresh() && self.mirror.synced()
    }

    pub fn record(&self, app: &str) -> Option<Record> {
        self.mirror.get(&keys::app_record(app))?.json()
    }

    pub fn reports(&self, app: &str) -> BTreeMap<String, Report> {
        let prefix = keys::app_site(app, "");
        self.mirror.with(|records| {
            records
                .range(prefix.clone()..)
                .take_while(|(k, _)| k.starts_with(&prefix))
                .filter_map(|(k, r)| Some((k[prefix.len()..].to_string(), r.json()?)))
                .collect()
        })
    }

    /// The last switchover request, with its store revision (unique per request).
    pub fn switchover(&self, app: &str) -> Option<(SwitchoverAsk, u64)> {
        let r = self.mirror.get(&keys::app_switchover(app))?;
        Some((r.json()?, r.revision))
    }

    /// Writes the app's record under the leader's lease; refused once another leader came.
    pub async fn write_record(&self, app: &str, record: &Record) -> Result<(), String> {
        self.put_as_leader(&keys::app_record(app), record).await
    }

    /// Sets scale set `set`'s capacity for the app's move, under the leader's lease, so that a
    /// deposed leader's late write is refused; the set's node applies it as operator intent.
    pub async fn set_capacity(&self, set: &str, capacity: u32) -> Result<(), String> {
        let record = cluster::intent::Capacity {
            scale_set: set.into(),
            capacity,
            by: self.node.name().to_string(),
            at: SystemTime::now(),
        };
        self.put_as_leader(&keys::capacity(set), &record).await
    }

    /// Asks the primary's node for a switchover to `to`, under the leader's lease.
    pub async fn ask_switchover(&self, app: &str, ask: &SwitchoverAsk) -> Result<(), String> {
        self.put_as_leader(&keys::app_switchover(app), ask).await
    }

    /// Puts `value` as JSON under `key`, fenced by the leader lease this node holds.
    async fn put_as_leader<T: Serialize>(&self, key: &str, value: &T) -> Result<(), String> {
        let leadership = self.node.leadership();
        if !leadership.me {
            return Err("this node no longer leads the cluster".into());
        }
        let bytes = serde_json::to_vec(value).unwrap_or_default();
        self.store
            .put_fenced(key, bytes, keys::LEADER, self.node.name(), leadership.term)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// Writes this node's report on its site's part of `app` (a session record).
    pub async fn report(&self, app: &str, report: &Report) -> Result<(), String> {
        self.store
            .put_json(
                &keys::app_site(app, self.node.site()),
                report,
                Scope::Session,
                Expect::Any,
            )
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}
