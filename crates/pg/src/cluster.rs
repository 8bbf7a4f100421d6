//! One database's driver: bootstraps its members, watches them, holds the primary's lease,
//! fails over, rejoins former primaries, switches over on request, and keeps the internal
//! load balancers pointed at the primary.
//!
//! One task owns every member and takes every decision, in ticks; slow work (cloning,
//! rewinding) runs on its own tasks and reports back, so the lease is renewed on time.
//!
//! Safety, in the order it is enforced:
//! 1. A member starts writable only when it holds the lease in the store.
//! 2. A primary that has not renewed its lease for two thirds of it is fenced: out of the
//!    frontends, its postmaster killed. Only then can the lease expire.
//! 3. A standby is promoted only after taking the expired lease, with the next term.
//! 4. A former primary only comes back as a standby, after `pg_rewind` (or a fresh clone).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use event::{Event, Source};
use model::{Database, DbRole, Member, Replication, RewindFailure};
use serde::{Deserialize, Serialize};
use store::{Store, StoreError, StoreExt as _};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_postgres::Client;

use crate::backup::{self, BackupSet, Backups, DrillReport, Primary};
use crate::failover::{self, Standby};
use crate::follow::{Follower, LeaseSeen, MemberSeen, Step};
use crate::lead::{Action, Lead, Process, RESTART_STABLE, Seen};
use crate::local::{self, Local, format_lsn};
use crate::observe::{self, Observation};
use scaleset::Instance;

const TICK: Duration = Duration::from_millis(200);
/// For a connection, then for the questions: a tick takes at most twice this, well inside
/// the third of the smallest lease (1 s) left before fencing.
const SQL_TIMEOUT: Duration = Duration::from_millis(300);
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// Every this many ticks, each observation also opens a fresh connection: a postmaster that
/// hangs still lets established sessions answer, while every new client waits.
const FRESH_CHECK_TICKS: u64 = 5;
/// Late observations in a row a running member is allowed before it counts as down (a
/// starved machine answers one connection late now and then; a hung postmaster never does).
const LATE_TOLERATED: u32 = 1;
/// A member's log past this many bytes is moved to `SITE.log.1` (see
/// `scaleset::driver::rotate_log`), checked every [`MEMBER_LOG_CHECK_TICKS`] ticks.
const MEMBER_LOG_MAX: u64 = 10_000_000;
const MEMBER_LOG_CHECK_TICKS: u64 = 25;
/// A standby that has not streamed for this long is rewound.
const STUCK: Duration = Duration::from_secs(15);
/// On a stop, how long standbys are given to replay the stopped primary's last record.
const STOP_CATCH_UP: Duration = Duration::from_secs(10);

/// One member as the API shows it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct MemberView {
    pub site: String,
    pub listen: String,
    pub health: String,
    /// `primary`, `standby` or `none`.
    pub role: String,
    /// `starting`, `running`, `streaming`, `stopped`, `cold` (kept stopped: a cold
    /// standby), `fenced`, `rewinding`, `cloning`, `failed`.
    pub state: String,
    pub pid: Option<u32>,
    pub lsn: Option<String>,
    pub receive_lsn: Option<String>,
    pub lag_bytes: Option<u64>,
    pub lag_seconds: Option<f64>,
    pub timeline: Option<i32>,
    /// As the primary reports it: `sync`, `async`, …
    pub sync_state: Option<String>,
    pub error: Option<String>,
    pub data_dir: String,
    pub log: String,
}

/// The last failover or switchover.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Change {
    #[serde(with = "event::time")]
    pub at: SystemTime,
    /// `failover`, `switchover` or `restore`.
    pub kind: String,
    pub from: Option<String>,
    pub to: String,
    pub term: u64,
    /// From the lost primary's last lease renewal (a switchover: from the request) to the
    /// frontends pointing at the new one.
    pub seconds: f64,
}

/// One database as the API shows it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct View {
    pub name: String,
    pub replication: String,
    pub term: u64,
    pub primary: Option<String>,
    pub sync_standby: Option<String>,
    /// `bootstrapping`, `healthy`, `degraded` (running without a synchronous standby or a
    /// standby that is not cold), `switching-over`, `restoring` (a failover by restore),
    /// `restarting`, `primary-lost`, `no-primary`, `failed`.
    pub state: String,
    pub frontends: Vec<String>,
    pub members: Vec<MemberView>,
    pub last_change: Option<Change>,
    /// Why the database is `failed`.
    pub error: Option<String>,
    pub failovers: u64,
    pub switchovers: u64,
    /// `tandem restore`s.
    #[serde(default)]
    pub restores: u64,
    /// `[database.backup]`: backups, the WAL archive, the last restore drill.
    #[serde(default)]
    pub backup: Option<crate::backup::BackupView>,
}

/// Why a switchover was refused or failed.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SwitchoverError(pub String);

enum Command {
    Switchover(String, oneshot::Sender<Result<String, SwitchoverError>>),
    /// `tandem restore`'s second half: the member of the site made of the restored copy in
    /// the directory ([`Driver::swap_in`]), under the lease claimed for it, if it was.
    Restore(
        String,
        PathBuf,
        Option<u64>,
        oneshot::Sender<Result<Swapped, String>>,
    ),
    /// A failover by restore: the lapsed lease taken for the site, renewed while the copy is
    /// made, or given back ([`Driver::claim`]).
    Claim(String, ClaimOp, oneshot::Sender<Result<u64, Unclaimed>>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ClaimOp {
    /// Only whether the site's member could take a restored copy now.
    Check,
    Take,
    Renew,
    Release,
}

/// A failover by restore under way: the lease held for `site` under `term`; `former` is the
/// lost primary, the ticks' again should the restore fail.
struct Claim {
    site: String,
    term: u64,
    former: Option<usize>,
}

/// A failover by restore's hold on the lease: renewed every [`CLAIM_RENEW`] while the copy is
/// made, so a Tandem that dies midway leaves it to lapse within this.
const CLAIM_TTL: Duration = Duration::from_secs(15);
const CLAIM_RENEW: Duration = Duration::from_secs(3);

/// Why [`Driver::claim`] could not take the lease, and, while another holds it still, how
/// long it has left.
struct Unclaimed(String, Option<Duration>);

/// What [`Driver::swap_in`] did.
struct Swapped {
    set_aside: Option<PathBuf>,
    former_set_aside: Option<PathBuf>,
    term: u64,
    downtime: Duration,
    /// The restored primary, for the full backup that follows.
    primary: Primary,
}

/// The result of `tandem restore` ([`Cluster::restore`]).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RestoreReport {
    /// The member restored, now the primary.
    pub site: String,
    /// Its new term (the lease's).
    pub term: u64,
    /// Where its former data directory went (`SITE.before-restore-SECS`, never removed by
    /// Tandem), none when it had none.
    pub set_aside: Option<String>,
    /// Where the former primary's data went, when it was another member's (it holds the
    /// commits after the restored point; the member is cloned afresh).
    pub former_set_aside: Option<String>,
    /// From the members' stop to the restored primary taking writes, in seconds: the only
    /// time the database does not answer (the restore and its replay happen beside the
    /// running members).
    pub downtime_seconds: f64,
    /// The restored copy as it was made (the backup, the target, restore and replay times,
    /// the rows of `drill_table`, the newest restored commit); its `directory` is where it
    /// was made, now the member's.
    pub copy: DrillReport,
}

/// A running database.
#[derive(Debug)]
pub struct Cluster {
    pub name: String,
    /// Its members' sites, in the topology's order.
    pub sites: Vec<String>,
    view: Mutex<View>,
    /// Made before the members start: see [`Cluster::events`].
    events: event::Feed,
    commands: mpsc::Sender<Command>,
    /// Sites under an outage drill, and why ([`Cluster::set_outage`]).
    outages: watch::Sender<std::collections::BTreeMap<String, String>>,
    /// Sites whose members are kept cold ([`Cluster::set_cold`]).
    cold: watch::Sender<std::collections::BTreeSet<String>>,
    stop: watch::Sender<bool>,
    /// Set by [`Cluster::leave_running`]: the stop leaves the members running.
    leave: std::sync::atomic::AtomicBool,
    done: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// `[database.backup]`.
    backups: Option<Arc<Backups>>,
    backups_done: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// The superuser's password, for [`Cluster::connect_primary`].
    password: Redacted,
    /// Cluster mode: the sites whose members this node runs.
    here: Option<Vec<String>>,
}

/// A secret that `Debug` never shows.
struct Redacted(String);

impl std::fmt::Debug for Redacted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("(redacted)")
    }
}

/// How often the backup task looks at the primary's archiver and the schedule.
const BACKUP_TICK: Duration = Duration::from_secs(2);
/// Every this many backup ticks, the repository is listed again (metrics, schedule).
const BACKUP_REFRESH_TICKS: u64 = 15;

/// What a database follows and feeds.
#[derive(Clone, Debug)]
pub struct Wiring {
    pub store: Arc<dyn Store>,
    /// Load balancers whose pool is the primary (the database's frontends and any
    /// `[[load_balancer]]` with `pool = { database, role = "primary" }`).
    pub primary: Vec<Arc<lb::Balancer>>,
    /// Load balancers whose pool is the streaming standbys.
    pub replicas: Vec<Arc<lb::Balancer>>,
    /// The sites whose members this process runs: `None` in the single-process mode (every
    /// member); in cluster mode the node's site, the other members being run by their own
    /// nodes, observed over the network and followed through the lease in the store.
    pub here: Option<Vec<String>>,
    /// Sites whose members are kept cold at the start (an app's `standby = "cold"`; see
    /// [`Cluster::set_cold`]).
    pub cold: Vec<String>,
}

impl Wiring {
    /// The balancers of `balancers` that follow `db`.
    pub fn of(db: &Database, store: Arc<dyn Store>, balancers: &[Arc<lb::Balancer>]) -> Wiring {
        let follow = |role: DbRole| {
            balancers
                .iter()
                .filter(|b| {
                    matches!(&b.config.pool, model::Pool::Database { database, role: r }
                        if database == &db.name && *r == role)
                })
                .cloned()
                .collect()
        };
        Wiring {
            store,
            primary: follow(DbRole::Primary),
            replicas: follow(DbRole::Replica),
            here: None,
            cold: Vec::new(),
        }
    }

    /// Keeps the members in `sites` cold from the start ([`Cluster::set_cold`]).
    #[must_use]
    pub fn with_cold(mut self, sites: Vec<String>) -> Wiring {
        self.cold = sites;
        self
    }

    /// Runs only the members in `sites` (cluster mode: the node's site).
    #[must_use]
    pub fn on_node(mut self, sites: Vec<String>) -> Wiring {
        self.here = Some(sites);
        self
    }

    /// Whether this process runs the member in `site`.
    pub fn runs(&self, site: &str) -> bool {
        self.here
            .as_ref()
            .is_none_or(|sites| sites.iter().any(|s| s == site))
    }
}

/// The database's generated passwords, shared through the store in cluster mode so that
/// every node's members and tools use the same (`STORE/databases/DB/credentials`).
#[derive(Serialize, Deserialize)]
struct Credentials {
    password: String,
    replication_password: String,
}

/// Where a database's shared passwords are in the store.
fn credentials_key(db: &str) -> String {
    format!("databases/{db}/credentials")
}

/// Cluster mode, on any node (one that runs no member of `db` too: a witness): a superuser
/// connection to `db`'s member at `site`, with the password shared through the store
/// (`databases/DB/credentials`), within 2 s. For drills that check what the primary holds.
///
/// # Errors
/// The store unreadable, no shared password yet, no member at `site`, or no answer.
pub async fn connect_shared(
    store: &Arc<dyn Store>,
    db: &Database,
    site: &str,
) -> Result<Client, String> {
    let key = credentials_key(&db.name);
    let credentials: Credentials = store
        .read(&key)
        .await
        .map_err(|e| format!("cannot read the shared passwords: {e}"))?
        .and_then(|r| r.json())
        .ok_or_else(|| format!("database {} has no shared passwords yet", db.name))?;
    let member = db
        .members
        .iter()
        .find(|m| m.site.as_str() == site)
        .ok_or_else(|| format!("database {} has no member in {site}", db.name))?;
    let connect = observe::connect(member.listen, &credentials.password);
    match tokio::time::timeout(Duration::from_secs(2), connect).await {
        Ok(r) => r,
        Err(_) => Err(format!("{site}'s member did not answer within 2 s")),
    }
}

/// Cluster mode: the first node to start creates the passwords (or keeps those it has) and
/// writes them to the store, create-only; every node then writes the store's into its own
/// 0600 files before the members start, so nothing else ever carries them.
async fn share_credentials(
    store: &Arc<dyn Store>,
    name: &str,
    dir: &std::path::Path,
) -> Result<(), local::Error> {
    let key = credentials_key(name);
    let fail =
        |e: StoreError| local::Error(format!("cannot share the passwords through the store: {e}"));
    let read = async || -> Result<Option<Credentials>, local::Error> {
        let record = store.read(&key).await.map_err(fail)?;
        Ok(record.and_then(|r| r.json()))
    };
    let shared = match read().await? {
        Some(c) => c,
        None => {
            let mine = local::Local::credentials(dir)?;
            let c = Credentials {
                password: mine.0,
                replication_password: mine.1,
            };
            match store
                .put_json(&key, &c, store::Scope::Persistent, store::Expect::Absent)
                .await
            {
                Ok(_) => c,
                Err(StoreError::Conflict { .. }) => read().await?.ok_or_else(|| {
                    local::Error("the shared passwords vanished from the store".into())
                })?,
                Err(e) => return Err(fail(e)),
            }
        }
    };
    local::Local::keep_credentials(dir, &shared.password, &shared.replication_password)
}

impl Cluster {
    /// Checks what can be checked before touching anything (programs, user, directories,
    /// member addresses, data directories), then bootstraps or resumes the members in the
    /// background. Errors here leave every data directory as it was.
    pub async fn start(
        config: Database,
        wiring: Wiring,
        state_dir: PathBuf,
    ) -> Result<Arc<Cluster>, local::Error> {
        let name = config.name.to_string();
        let named = |e: local::Error| local::Error(format!("database {name}: {e}"));
        let bins = local::find_bins(config.bin_dir.as_deref()).map_err(named)?;
        let user = local::run_as()?;
        let dir = state_dir.join("databases").join(&name);
        if wiring.here.is_some() {
            share_credentials(&wiring.store, &name, &dir)
                .await
                .map_err(named)?;
        }
        let mut local = Local::open(bins, user, dir, config.failover_timeout).map_err(named)?;
        if let Some(b) = &config.backup {
            Backups::prepare(&name, b, &mut local).map_err(named)?;
        }
        let local = Arc::new(local);
        for m in config.members.iter().filter(|m| wiring.runs(&m.site)) {
            let site = m.site.as_str();
            local
                .check_data(site)
                .await
                .map_err(|e| local::Error(format!("database {name}, member {site}: {e}")))?;
            // A member still running from its data directory holds its own address: it is
            // adopted, not started.
            let running = local.adopt(site).is_some();
            for (what, addr) in [("listen", m.listen), ("health", m.health)] {
                if what == "listen" && running {
                    continue;
                }
                if let Err(e) = std::net::TcpListener::bind(addr) {
                    return Err(local::Error(format!(
                        "database {name}, member {site}: cannot use {what} address {addr}: {e}\n  help: another server (an existing PostgreSQL?) holds it; stop it or choose another address"
                    )));
                }
            }
        }
        let events = event::Feed::new(256);
        let backups = match &config.backup {
            Some(b) => Some(Arc::new(
                Backups::open(
                    &name,
                    b.clone(),
                    local.clone(),
                    events.sender(),
                    wiring.here.is_some(),
                )
                .map_err(named)?,
            )),
            None => None,
        };
        let (commands, rx) = mpsc::channel(4);
        let (stop, stop_rx) = watch::channel(false);
        let cluster = Arc::new(Cluster {
            name: name.clone(),
            sites: config.members.iter().map(|m| m.site.to_string()).collect(),
            view: Mutex::new(View {
                name,
                replication: config.replication.to_string(),
                state: "bootstrapping".into(),
                ..View::default()
            }),
            events,
            commands,
            outages: watch::Sender::default(),
            cold: watch::Sender::new(wiring.cold.iter().cloned().collect()),
            stop,
            leave: std::sync::atomic::AtomicBool::new(false),
            done: Mutex::new(None),
            backups,
            backups_done: Mutex::new(None),
            password: Redacted(local.password.clone()),
            here: wiring.here.clone(),
        });
        for m in config.members.iter().filter(|m| wiring.runs(&m.site)) {
            let listener = tokio::net::TcpListener::bind(m.health).await.map_err(|e| {
                local::Error(format!(
                    "member {}: health address {}: {e}",
                    m.site, m.health
                ))
            })?;
            tokio::spawn(crate::http::serve(
                listener,
                cluster.clone(),
                m.site.to_string(),
                stop_rx.clone(),
            ));
        }
        if let Some(b) = cluster.backups.clone() {
            let task = tokio::spawn(tend_backups(b, cluster.clone(), stop_rx.clone()));
            *cluster
                .backups_done
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = Some(task);
        }
        let (driver, work) = Driver::new(config, wiring, local, cluster.clone());
        let task = tokio::spawn(driver.run(rx, work, stop_rx));
        *cluster.done.lock().unwrap_or_else(|p| p.into_inner()) = Some(task);
        Ok(cluster)
    }

    pub fn view(&self) -> View {
        let mut view = self.view.lock().unwrap_or_else(|p| p.into_inner()).clone();
        view.backup = self.backups.as_ref().map(|b| b.view());
        view
    }

    /// The database's backups, when it has `[database.backup]`.
    pub fn backups(&self) -> Option<&Arc<Backups>> {
        self.backups.as_ref()
    }

    /// The writable primary, for what pgBackRest needs of it: in cluster mode only this
    /// node's (backups run on the primary's node, where its data directory is).
    pub fn primary(&self) -> Result<Primary, BackupError> {
        let view = self.view.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let site = view.primary.clone().ok_or_else(|| {
            BackupError::Unavailable(format!(
                "database {} has no writable primary now (state {})",
                self.name, view.state
            ))
        })?;
        if let Some(here) = &self.here
            && !here.contains(&site)
        {
            return Err(BackupError::Unavailable(format!(
                "the primary of database {}, {site}, runs on its own site's node: that node takes the backups (ask it)",
                self.name
            )));
        }
        let m = view
            .members
            .iter()
            .find(|m| m.site == site)
            .ok_or_else(|| BackupError::Unavailable(format!("no member {site}")))?;
        Ok(Primary {
            site,
            listen: m
                .listen
                .parse()
                .map_err(|_| BackupError::Unavailable(format!("bad address {}", m.listen)))?,
            data: PathBuf::from(&m.data_dir),
        })
    }

    /// A superuser connection to the writable primary (for drills that check what it holds).
    ///
    /// # Errors
    /// No primary now, or it does not answer within 2 s.
    pub async fn connect_primary(&self) -> Result<Client, BackupError> {
        let p = self.primary()?;
        let connect = observe::connect(p.listen, &self.password.0);
        match tokio::time::timeout(Duration::from_secs(2), connect).await {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => Err(BackupError::Unavailable(e)),
            Err(_) => Err(BackupError::Unavailable(format!(
                "primary {} did not answer within 2 s",
                p.site
            ))),
        }
    }

    fn backups_or_refuse(&self) -> Result<Arc<Backups>, BackupError> {
        self.backups.clone().ok_or_else(|| {
            BackupError::NotConfigured(format!(
                "database {} has no [database.backup] in the topology",
                self.name
            ))
        })
    }

    /// A backup of the primary now (`full`, `diff` or `incr`); waits for it. It runs on a
    /// task of its own: a caller that goes away does not cut it short.
    pub async fn backup_now(&self, kind: backup::Kind) -> Result<BackupSet, BackupError> {
        let b = self.backups_or_refuse()?;
        let p = self.primary()?;
        run_detached(async move {
            b.backup(&p, kind)
                .await
                .map_err(|e| BackupError::Failed(e.0))
        })
        .await
    }

    /// The backups in the repository, oldest first.
    pub async fn backup_list(&self) -> Result<Vec<BackupSet>, BackupError> {
        let b = self.backups_or_refuse()?;
        b.list().await.map_err(|e| BackupError::Failed(e.0))
    }

    /// `pgbackrest verify` of the repository: what it reported.
    pub async fn backup_verify(&self) -> Result<String, BackupError> {
        let b = self.backups_or_refuse()?;
        run_detached(async move { b.verify().await.map_err(|e| BackupError::Failed(e.0)) }).await
    }

    /// A restore drill (see [`Backups::drill`]) to the newest archived WAL or to `to`.
    pub async fn restore_drill(&self, to: Option<SystemTime>) -> Result<DrillReport, BackupError> {
        let b = self.backups_or_refuse()?;
        let p = self.primary()?;
        run_detached(async move { Ok(b.drill(&p, to).await) }).await
    }

    /// `tandem restore DB --site SITE [--to TIME]`: the whole database back to the newest
    /// archived WAL, or to `to` (point-in-time recovery), with SITE's member as its primary.
    /// The copy is made and recovered beside the running members (`DIR/SITE.restored`, see
    /// [`Backups::restore`]); only then are the members stopped, SITE's data set aside
    /// (`SITE.before-restore-SECS`, never deleted by Tandem) and the copy put in its place,
    /// started as primary under the next term; a full backup follows. The former primary's
    /// data, when it is another member's, is set aside the same way and that member cloned
    /// afresh; the other members rejoin the restored history as standbys (`pg_rewind`, else
    /// a fresh clone). Commits after the target are not in the restored database; they stay
    /// in the former primary's data set aside. Single-process mode only.
    ///
    /// # Errors
    /// No `[database.backup]`, no such member, no backup, the repository, the copy failing to
    /// recover (the database is untouched then), or the swap failing (the former primary is
    /// started again).
    pub async fn restore(
        &self,
        site: &str,
        to: Option<SystemTime>,
    ) -> Result<RestoreReport, BackupError> {
        self.restore_with(site, to, false).await
    }

    /// A cold standby's failover (an app's `standby = "cold"`): with no primary left, `site`'s
    /// member is restored from the newest backup and archived WAL and made the primary. The
    /// lapsed lease is taken for it first (renewed every [`CLAIM_RENEW`] while the copy is
    /// made), so the lost primary can never come back writable meanwhile, nor a standby be
    /// promoted; refused while a standby can be promoted (the database's own failover loses
    /// nothing). Everything else is as [`Cluster::restore`]. Acknowledged commits not yet
    /// archived are lost: the RPO is bounded by `archive_timeout` while archiving keeps up
    /// (a failing archive, or WAL dropped past `ARCHIVE_QUEUE_MAX`, leaves a longer gap).
    ///
    /// # Errors
    /// As [`Cluster::restore`]; and the lease still held (a primary alive: ask for a
    /// switchover instead).
    pub async fn fail_over_by_restore(&self, site: &str) -> Result<RestoreReport, BackupError> {
        self.restore_with(site, None, true).await
    }

    async fn restore_with(
        &self,
        site: &str,
        to: Option<SystemTime>,
        claim: bool,
    ) -> Result<RestoreReport, BackupError> {
        let b = self.backups_or_refuse()?;
        if self.here.is_some() {
            return Err(BackupError::Failed(
                "a restore into the members runs in the single-process mode only for now (a restore drill works on the primary's node)".into(),
            ));
        }
        if !self.sites.iter().any(|s| s == site) {
            return Err(BackupError::Failed(format!(
                "database {} has no member in site {site:?} (members: {})",
                self.name,
                self.sites.join(", ")
            )));
        }
        let p = self.primary().ok();
        let dir = b.config_dir().join(format!("{site}.restored"));
        let commands = self.commands.clone();
        let site = site.to_string();
        run_detached(async move {
            let gone = || BackupError::Failed("the database is shutting down".into());
            let ask = |c: Command| {
                let commands = commands.clone();
                async move { commands.send(c).await.map_err(|_| gone()) }
            };
            let claim_op = |op: ClaimOp| {
                let site = site.clone();
                async move {
                    let (tx, rx) = oneshot::channel();
                    ask(Command::Claim(site, op, tx)).await?;
                    rx.await.map_err(|_| gone())
                }
            };
            // Checked before the copy is made, again at the swap.
            if let Err(Unclaimed(why, _)) = claim_op(ClaimOp::Check).await? {
                return Err(BackupError::Failed(why));
            }
            let claimed = if claim {
                // A lost primary's lease lapses `failover_timeout` after its last renewal.
                let mut tries = 0;
                loop {
                    tries += 1;
                    match claim_op(ClaimOp::Take).await? {
                        Ok(term) => break Some(term),
                        Err(Unclaimed(_, Some(left))) if tries < 5 => {
                            tokio::time::sleep(left + Duration::from_millis(50)).await;
                        }
                        Err(Unclaimed(why, _)) => return Err(BackupError::Failed(why)),
                    }
                }
            } else {
                None
            };
            // Under a claim the lease is renewed while the copy is made; losing it stops the
            // copy.
            let renewals = async {
                loop {
                    tokio::time::sleep(CLAIM_RENEW).await;
                    if let Err(Unclaimed(why, _)) = claim_op(ClaimOp::Renew).await? {
                        return Err::<DrillReport, BackupError>(BackupError::Failed(why));
                    }
                }
            };
            let copy = if claimed.is_some() {
                tokio::select! {
                    c = b.restore(p.as_ref(), to, &dir) => c.map_err(|e| BackupError::Failed(e.to_string())),
                    e = renewals => {
                        b.discard(&dir);
                        e
                    }
                }
            } else {
                b.restore(p.as_ref(), to, &dir)
                    .await
                    .map_err(|e| BackupError::Failed(e.to_string()))
            };
            let copy = match copy {
                Ok(copy) => copy,
                Err(e) => {
                    if claimed.is_some() {
                        let _ = claim_op(ClaimOp::Release).await;
                    }
                    return Err(e);
                }
            };
            let (tx, rx) = oneshot::channel();
            ask(Command::Restore(site.clone(), dir.clone(), claimed, tx)).await?;
            let swapped = rx.await.map_err(|_| gone())?;
            // Not put in place (else renamed away already): made again from the repository
            // at will; the marker goes either way.
            b.discard(&dir);
            let s = swapped.map_err(BackupError::Failed)?;
            // Backups made before the restore lead elsewhere (another timeline, past the
            // restored point): a full backup of the restored history at once.
            let (b2, primary) = (b.clone(), s.primary.clone());
            tokio::spawn(async move {
                let _ = b2.backup(&primary, backup::Kind::Full).await;
            });
            Ok(RestoreReport {
                site: s.primary.site.clone(),
                term: s.term,
                set_aside: s.set_aside.map(|p| p.display().to_string()),
                former_set_aside: s.former_set_aside.map(|p| p.display().to_string()),
                downtime_seconds: s.downtime.as_secs_f64(),
                copy,
            })
        })
        .await
    }

    /// The database's events; the first caller gets them from the start (bootstrap,
    /// adoption), however soon the members began.
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// A planned handover to the member in `site`: waits for it to catch up, stops the primary
    /// cleanly, promotes the target once it has replayed everything, re-points the frontends,
    /// and brings the former primary back as a standby.
    pub async fn switchover(&self, site: &str) -> Result<String, SwitchoverError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Switchover(site.to_string(), tx))
            .await
            .map_err(|_| SwitchoverError("the database is shutting down".into()))?;
        rx.await
            .map_err(|_| SwitchoverError("the database is shutting down".into()))?
    }

    /// An outage drill of `site` (`Some(why)`) or its end (`None`): the site's member run by
    /// this process is stopped at once, as if its machine were gone (fenced; a primary fails
    /// over once its lease lapses, as in a real outage), and is neither observed, restarted,
    /// rejoined nor promoted until the drill ends; then it rejoins as a standby (or, still
    /// holding the lease because no failover was possible, restarts in place). Returns once
    /// the driver's next tick, at once. A site without a member here is left alone.
    pub fn set_outage(&self, site: &str, why: Option<String>) {
        self.outages.send_modify(|o| match why {
            Some(why) => {
                o.insert(site.to_string(), why);
            }
            None => {
                o.remove(site);
            }
        });
    }

    /// Keeps `site`'s member cold (`true`: an app's `standby = "cold"`) or lets it run as a
    /// standby again (`false`: warming it up before a planned move there). A cold member
    /// runs only as the primary: it is never cloned, started or rejoined as a standby (a
    /// running one is stopped), never a failover candidate, and the primary keeps no
    /// replication slot for it (an unused slot would hold WAL forever). It becomes the
    /// primary by a restore ([`Cluster::fail_over_by_restore`]) or, warmed up, by a
    /// switchover. Acted on at the driver's next tick.
    pub fn set_cold(&self, site: &str, cold: bool) {
        self.cold.send_if_modified(|c| {
            if cold {
                c.insert(site.to_string())
            } else {
                c.remove(site)
            }
        });
    }

    /// Makes the next [`Cluster::shutdown`] leave every member running, its lease in place,
    /// for the next Tandem to adopt (a planned restart or an upgrade).
    pub fn leave_running(&self) {
        self.leave.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Stops every member cleanly (fast shutdown) and waits for them.
    pub async fn shutdown(&self) {
        let _ = self.stop.send(true);
        let backups = self
            .backups_done
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(t) = backups {
            let _ = t.await;
        }
        let task = self.done.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = task {
            let _ = t.await;
        }
    }
}

/// Why a backup operation was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// The database has no `[database.backup]`.
    #[error("{0}")]
    NotConfigured(String),
    /// No writable primary to back up or to compare with.
    #[error("{0}")]
    Unavailable(String),
    /// pgBackRest (or the repository) said no.
    #[error("{0}")]
    Failed(String),
}

/// Runs `f` on a task of its own and waits for it: dropping the wait leaves it running.
async fn run_detached<T: Send + 'static>(
    f: impl std::future::Future<Output = Result<T, BackupError>> + Send + 'static,
) -> Result<T, BackupError> {
    tokio::spawn(f)
        .await
        .map_err(|e| BackupError::Failed(format!("the operation stopped: {e}")))?
}

/// The backup task: every [`BACKUP_TICK`], the primary's archiver and the schedule
/// ([`Backups::tend`]); a connection to the primary kept while it stays the primary.
async fn tend_backups(b: Arc<Backups>, cluster: Arc<Cluster>, mut stop: watch::Receiver<bool>) {
    let mut client: Option<(String, Client)> = None;
    let mut ticks: u64 = 0;
    let password = std::fs::read_to_string(PathBuf::from(&b.config_dir()).join("password"))
        .unwrap_or_default()
        .trim()
        .to_string();
    while !*stop.borrow() {
        ticks += 1;
        if let Ok(p) = cluster.primary() {
            if client
                .as_ref()
                .is_none_or(|(site, c)| *site != p.site || c.is_closed())
            {
                client =
                    tokio::time::timeout(SQL_TIMEOUT * 3, observe::connect(p.listen, &password))
                        .await
                        .ok()
                        .and_then(Result::ok)
                        .map(|c| (p.site.clone(), c));
            }
            let refresh = ticks.is_multiple_of(BACKUP_REFRESH_TICKS) || ticks == 1;
            tokio::select! {
                _ = b.tend(&p, client.as_ref().map(|(_, c)| c), refresh) => {}
                _ = stop.changed() => {
                    b.abandon();
                    break;
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(BACKUP_TICK) => {}
            _ = stop.changed() => {}
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Stopped,
    Starting,
    Running,
    Fenced,
    Rewinding,
    Cloning,
    Failed,
}

impl State {
    fn name(self) -> &'static str {
        match self {
            State::Stopped => "stopped",
            State::Starting => "starting",
            State::Running => "running",
            State::Fenced => "fenced",
            State::Rewinding => "rewinding",
            State::Cloning => "cloning",
            State::Failed => "failed",
        }
    }
}

struct Rt {
    config: Member,
    site: String,
    /// This process runs it (always, in the single-process mode); else it is only observed.
    here: bool,
    instance: Option<Box<dyn Instance>>,
    client: Option<Client>,
    obs: Option<Observation>,
    /// Observations in a row that got no answer in time while the last one stood.
    late: u32,
    /// Under an outage drill: why. Kept down (fenced) until it ends.
    outage: Option<String>,
    state: State,
    error: Option<String>,
    /// Since when a running standby has not been streaming.
    not_streaming_since: Option<Instant>,
    /// Rejoin attempts that failed in a row, and when the next may start.
    failures: u32,
    retry_at: Instant,
    /// Cluster mode: the watchdog guarding it while it is this node's primary.
    watchdog: Option<crate::watchdog::Guard>,
}

impl Rt {
    fn is_writable(&self) -> bool {
        self.obs.as_ref().is_some_and(|o| !o.in_recovery)
    }

    fn is_streaming(&self) -> bool {
        self.obs
            .as_ref()
            .is_some_and(|o| o.in_recovery && o.receiver.as_deref() == Some("streaming"))
    }
}

/// What outlives a restart of Tandem: the counters and the last change, in
/// `STATE_DIR/databases/DB/history.json`.
#[derive(Debug, Default, Serialize, Deserialize)]
struct History {
    failovers: u64,
    switchovers: u64,
    #[serde(default)]
    restores: u64,
    last_change: Option<Change>,
}

/// The work a background task reports back.
struct Done {
    member: usize,
    what: &'static str,
    result: Result<String, String>,
}

struct Driver {
    config: Database,
    wiring: Wiring,
    local: Arc<Local>,
    cluster: Arc<Cluster>,
    key: String,
    ttl: Duration,
    members: Vec<Rt>,
    leader: Option<usize>,
    term: u64,
    /// The lease holder's decisions (renewal, restart in place, fence, failover).
    lead: Lead,
    blocked: Option<String>,
    sync_standby: Option<usize>,
    sync_seen: Instant,
    /// Each standby's last reply as the primary reports it (`reply_time`), and when it was
    /// first seen: a standby whose reply has not changed for `ttl` is silent.
    replies: HashMap<String, (String, Instant)>,
    /// Ticks so far (every [`FRESH_CHECK_TICKS`]th checks new connections too).
    ticks: u64,
    /// A switchover is under way (the state says so).
    switching: bool,
    primary_lsn: u64,
    pointed: Option<Option<SocketAddr>>,
    replicas_pointed: Vec<SocketAddr>,
    last_change: Option<Change>,
    failovers: u64,
    switchovers: u64,
    restores: u64,
    bootstrapped: bool,
    /// A failover or switchover happened in this run (a primary was seen).
    changed_this_run: bool,
    /// Why the database cannot run (a failed bootstrap).
    failed: Option<String>,
    /// Where background work (clone, rewind) reports back to `run`.
    work: mpsc::Sender<Done>,
    /// The last renewal failed for want of the store (announced once).
    unrenewed: bool,
    /// A failover this node began (its lease taken) but could not finish at once: from whom,
    /// counted since when, said how; `take_up` finishes and records it.
    failing_over: Option<(Option<String>, Instant, String)>,
    /// The standby the primary first reported synchronous, and the primary's position then:
    /// it is trusted once it has flushed up to there.
    sync_from: Option<(String, u64)>,
    /// Cluster mode: this node's rules about the lease (`follow_store`).
    follower: Follower,
    /// Cluster mode: members run on their own nodes, the lease and these records in the
    /// store say who leads.
    shared: Option<Shared>,
    /// A failover by restore holds the lease while its copy is made.
    claimed: Option<Claim>,
    /// The cold sites whose slots the primary of that term was last made to match
    /// ([`Driver::keep_cold`]).
    cold_applied: Option<(u64, std::collections::BTreeSet<String>)>,
    /// The cold sites as last seen, to notice a member warmed up.
    cold_seen: std::collections::BTreeSet<String>,
}

/// What the nodes of a database in cluster mode share through the store besides the lease.
struct Shared {
    /// `databases/DB/sync`: the synchronous standby the primary trusts ([`SyncRecord`]).
    sync_key: String,
    /// `databases/DB/primary`: the last member that led, with its term ([`PrimaryRecord`]).
    primary_key: String,
    /// What this node last wrote, so each is written once per change.
    sync_written: Option<(u64, Option<String>)>,
    primary_written: u64,
}

/// `databases/DB/sync`: who may be promoted without loss in sync mode, written by the
/// primary's node under its lease (a standby is trusted in the record only after the primary
/// reports it synchronous, and untrusted in the record before the primary stops waiting for
/// it: Patroni's `/sync` key). Only a record of the current term counts.
#[derive(Serialize, Deserialize)]
struct SyncRecord {
    term: u64,
    member: Option<String>,
}

/// `databases/DB/primary`: which member led at `term`. A node that finds the lease free
/// resumes its member as primary only if it is this one at the latest term (no one was
/// promoted since).
#[derive(Serialize, Deserialize)]
struct PrimaryRecord {
    term: u64,
    member: String,
}

impl Driver {
    fn new(
        config: Database,
        wiring: Wiring,
        local: Arc<Local>,
        cluster: Arc<Cluster>,
    ) -> (Driver, mpsc::Receiver<Done>) {
        let now = Instant::now();
        let cold_seen = wiring.cold.iter().cloned().collect();
        let members = config
            .members
            .iter()
            .map(|m| Rt {
                config: m.clone(),
                site: m.site.to_string(),
                here: wiring.runs(&m.site),
                instance: None,
                client: None,
                obs: None,
                late: 0,
                outage: None,
                state: State::Stopped,
                error: None,
                not_streaming_since: None,
                failures: 0,
                retry_at: now,
                watchdog: None,
            })
            .collect();
        let (tx, rx) = mpsc::channel(16);
        let ttl = config.failover_timeout;
        let shared = wiring.here.is_some().then(|| Shared {
            sync_key: format!("databases/{}/sync", config.name),
            primary_key: format!("databases/{}/primary", config.name),
            sync_written: None,
            primary_written: 0,
        });
        let driver = Driver {
            unrenewed: false,
            failing_over: None,
            sync_from: None,
            follower: Follower::new(ttl, now),
            shared,
            key: format!("databases/{}/leader", config.name),
            ttl: config.failover_timeout,
            config,
            wiring,
            local,
            cluster,
            members,
            leader: None,
            term: 0,
            lead: Lead::new(ttl, now),
            blocked: None,
            sync_standby: None,
            sync_seen: now,
            replies: HashMap::new(),
            ticks: 0,
            switching: false,
            primary_lsn: 0,
            pointed: None,
            replicas_pointed: Vec::new(),
            last_change: None,
            failovers: 0,
            switchovers: 0,
            restores: 0,
            claimed: None,
            cold_applied: None,
            cold_seen,
            bootstrapped: false,
            changed_this_run: false,
            failed: None,
            work: tx,
        };
        (driver, rx)
    }

    fn event(&self, member: Option<usize>, what: &'static str, message: String) {
        let member = member.map(|i| self.members[i].site.clone());
        let m = member.as_deref().unwrap_or("-");
        // An event too (console, API): info, so a terminal does not show it twice.
        tracing::info!(database = %self.config.name, member = m, what, term = self.term, "{message}");
        // Subject: DB or DB/MEMBER; kind: `bootstrapped`, `member-exited`, `primary-lost`,
        // `fenced`, `promoted`, `failover`, `failover-blocked`, `rejoined`, `recloned`, `sync`,
        // `switchover`, `error`, …; the term is the fencing token in force after the change.
        let subject = match member {
            Some(m) => format!("{}/{m}", self.config.name),
            None => self.config.name.to_string(),
        };
        let e = Event::new(Source::Database, subject, what, message).with_term(self.term);
        self.cluster.events.send(e);
    }

    async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut work: mpsc::Receiver<Done>,
        mut stop: watch::Receiver<bool>,
    ) {
        tokio::select! {
            r = self.bootstrap() => if let Err(e) = r {
                // Nothing is retried over data that may be half made: the operator looks.
                self.event(None, "error", format!("bootstrap failed: {e}"));
                self.failed = Some(format!("bootstrap failed: {e}"));
                self.publish();
                let _ = stop.wait_for(|s| *s).await;
            },
            _ = stop.changed() => {}
        }
        self.bootstrapped = true;
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Cluster mode: a tick at once when the lease changes hands or lapses (etcd deletes an
        // expired lease's key), not at the next 200 ms: a handed or free lease is acted on
        // without waiting.
        let changed = Arc::new(tokio::sync::Notify::new());
        if self.shared.is_some() {
            tokio::spawn(watch_lease(
                self.wiring.store.clone(),
                store::keys::lease(&self.key),
                changed.clone(),
                stop.clone(),
            ));
        }
        let mut outages = self.cluster.outages.subscribe();
        while !*stop.borrow() {
            tokio::select! {
                _ = tick.tick() => self.tick().await,
                Ok(()) = outages.changed() => self.tick().await,
                () = changed.notified() => self.tick().await,
                Some(c) = commands.recv() => match c {
                    Command::Switchover(site, reply) => {
                        let r = self.switchover(&site).await;
                        let _ = reply.send(r);
                    }
                    Command::Restore(site, copy, claimed, reply) => {
                        let r = self.swap_in(&site, &copy, claimed).await;
                        let _ = reply.send(r);
                    }
                    Command::Claim(site, op, reply) => {
                        let r = self.claim(&site, op).await;
                        let _ = reply.send(r);
                    }

                },
                Some(done) = work.recv() => self.work_done(done),
                _ = stop.changed() => {}
            }
            self.publish();
        }
        if self.cluster.leave.load(std::sync::atomic::Ordering::SeqCst) {
            // Cluster mode: the next Tandem has the whole of the watchdog's deadline, counted
            // from a renewal made now, to take over the renewals.
            if let Some(l) = self.leader.filter(|&l| self.members[l].here) {
                let (site, asked) = (self.members[l].site.clone(), Instant::now());
                let renewal = self
                    .wiring
                    .store
                    .renew(&self.key, &site, self.term, self.ttl);
                if self.shared.is_some() && within(self.ttl, renewal).await.is_ok() {
                    self.guard(l, asked);
                }
            }
            let running: Vec<String> = self
                .members
                .iter()
                .filter_map(|m| Some(format!("{} (pid {})", m.site, m.instance.as_ref()?.pid()?)))
                .collect();
            self.event(
                None,
                "left-running",
                format!(
                    "members left running for the next Tandem to adopt: {}",
                    running.join(", ")
                ),
            );
        } else {
            self.stop_all().await;
        }
        self.publish();
    }

    /// Creates or resumes the members: the lease holder (or the one member not left as a
    /// standby) starts as primary; the others are started, cloned or rewound by the ticks.
    async fn bootstrap(&mut self) -> Result<(), String> {
        self.load_history();
        let mut waited = false;
        let (lease, term) = loop {
            match within(self.ttl, self.wiring.store.get(&self.key)).await {
                Ok(got) => break got,
                // Cluster mode: etcd away (no quorum here yet): nothing is decided until it
                // answers; the members that outlive Tandem keep running meanwhile.
                Err(e) if self.shared.is_some() => {
                    if !waited {
                        self.event(
                            None,
                            "waiting",
                            format!("waiting for the store before starting: {e}"),
                        );
                        waited = true;
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => return Err(e.to_string()),
            }
        };
        self.term = term;
        let with_data: Vec<usize> = (0..self.members.len())
            .filter(|&i| self.members[i].here && self.local.has_data(&self.members[i].site))
            .collect();
        self.adopt(&with_data);
        if self.shared.is_some() {
            return self.bootstrap_on_node(lease, term, &with_data).await;
        }
        self.bootstrap_here(lease, &with_data).await
    }

    /// Members outlive Tandem: carries on with those of `with_data` still running.
    fn adopt(&mut self, with_data: &[usize]) {
        let mut adopted = Vec::new();
        for &i in with_data {
            let m = &mut self.members[i];
            if let Some(inst) = self.local.adopt(&m.site) {
                adopted.push(format!(
                    "{} (pid {})",
                    m.site,
                    inst.pid().unwrap_or_default()
                ));
                m.instance = Some(inst);
                m.state = State::Starting;
            }
        }
        if !adopted.is_empty() {
            self.event(
                None,
                "adopted",
                format!("still running, carried on with: {}", adopted.join(", ")),
            );
        }
    }

    /// Cluster mode's start, on one node: the lease in the store says who leads. This node's
    /// member resumes as primary only when it holds the lease, or when the lease is free and
    /// it was the last to lead at the latest term; the first member's node initialises a
    /// database that never had a primary. The lease is taken before the member starts
    /// writable. Every other member is made a standby of the primary by the ticks, wherever
    /// it runs.
    async fn bootstrap_on_node(
        &mut self,
        lease: Option<store::Lease>,
        term: u64,
        with_data: &[usize],
    ) -> Result<(), String> {
        let last = loop {
            match self.last_primary().await {
                Ok(last) => break last,
                Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
            }
        };
        let (l, fresh) = match &lease {
            Some(lease) => match self.position(&lease.holder) {
                Some(h) if with_data.contains(&h) => (h, false),
                h => {
                    self.leader = h;
                    return Ok(());
                }
            },
            None if term == 0 && with_data.is_empty() && self.members[0].here => (0, true),
            // Initialised here before, never led (stopped between initdb and its start).
            None if term == 0 && self.members[0].here && with_data.contains(&0) => (0, false),
            None if term == 0 => {
                self.event(
                    None,
                    "waiting",
                    format!(
                        "waiting for {}'s node to initialise the database (no primary yet)",
                        self.members[0].site
                    ),
                );
                return Ok(());
            }
            // Named last (before any promotion), no other member was promoted since: its
            // data has every acknowledged commit. A standby's data too (a switchover's target
            // whose node stopped before promoting it): it starts writable.
            None => {
                match last {
                    Some(i) if with_data.contains(&i) => (i, false),
                    other => {
                        // Its standby may be promoted (by the ticks, once the sync rule
                        // allows): the lease is free.
                        self.leader = other;
                        return Ok(());
                    }
                }
            }
        };
        let site = self.members[l].site.clone();
        // A new database's files first: initdb starts no server, and takes a while.
        if fresh {
            self.local.initdb(&site).await.map_err(|e| e.to_string())?;
        }
        // Safety rule 1 across machines: the lease and the record first, then a writable
        // server. Refused (another node was quicker, the store away), the ticks carry on.
        let lease = match within(
            self.ttl,
            self.wiring.store.acquire(&self.key, &site, self.ttl),
        )
        .await
        {
            Ok(lease) => lease,
            Err(e) => {
                self.event(
                    Some(l),
                    "waiting",
                    format!("cannot take the lease for {site} ({e}); following the store"),
                );
                return Ok(());
            }
        };
        self.leader = Some(l);
        self.term = lease.term;
        if !self.claim_primary(l).await {
            self.leader = None;
            return Ok(());
        }
        // Renewed right before the start: the fence and the watchdog count from here.
        let asked = Instant::now();
        let renewal = self
            .wiring
            .store
            .renew(&self.key, &site, self.term, self.ttl);
        if within(self.ttl, renewal).await.is_err() {
            self.leader = None;
            return Ok(());
        }
        let was_running = self.members[l].instance.is_some();
        if !was_running {
            self.start_member(l, None)?;
        }
        self.guard(l, asked);
        let (client, renewed) = match self.ready_primary(l, &site).await {
            Ok(ready) => ready,
            Err(e) => {
                // Never left writable without its lease renewed: the ticks take it from here.
                self.fence(l).await;
                self.leader = None;
                self.event(
                    Some(l),
                    "error",
                    format!("{site} did not start as primary: {e}; stopped"),
                );
                return Ok(());
            }
        };
        self.members[l].client = Some(client);
        self.take_lead_at(l, self.term, renewed);
        let how = if fresh {
            "initialised"
        } else if was_running {
            "resumed, still running,"
        } else {
            "resumed"
        };
        self.event(
            Some(l),
            "bootstrapped",
            format!("{how} {site} as primary on this node (term {})", self.term),
        );
        Ok(())
    }

    /// Cluster mode: waits until this node's member `l`, just started as primary, answers,
    /// prepares it, then renews its lease; the connection and when the renewal was asked.
    async fn ready_primary(&mut self, l: usize, site: &str) -> Result<(Client, Instant), String> {
        let client = self.wait_ready(l).await?;
        self.prepare_primary(&client, site).await?;
        let renewed = Instant::now();
        within(
            self.ttl,
            self.wiring
                .store
                .renew(&self.key, site, self.term, self.ttl),
        )
        .await
        .map_err(|e| format!("lost the lease for {site} while it started: {e}"))?;
        Ok((client, renewed))
    }

    /// A primary just started: the replication role (created when missing), a replication
    /// slot for every other member.
    async fn prepare_primary(&mut self, client: &Client, site: &str) -> Result<(), String> {
        // Whenever missing (a start cut short after initdb too).
        let role = format!(
            "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = {user}) THEN CREATE ROLE {name} WITH REPLICATION LOGIN PASSWORD {password}; END IF; END $$",
            user = observe::literal(local::REPLICATION_USER),
            name = local::REPLICATION_USER,
            password = observe::literal(&self.local.replication_password)
        );
        // Not through `observe::execute`, whose errors quote the statement: the password.
        client
            .batch_execute(&role)
            .await
            .map_err(|e| format!("cannot create the replication role: {e}"))?;
        ensure_slots(client, &self.others(site), false).await
    }

    /// Every member's site but `site` and the cold ones: those the primary keeps a
    /// replication slot for.
    fn others(&self, site: &str) -> Vec<String> {
        let cold = self.cluster.cold.borrow();
        self.members
            .iter()
            .filter(|m| m.site != site && !cold.contains(&m.site))
            .map(|m| m.site.clone())
            .collect()
    }

    /// Before synchronous standby `i` is stopped on purpose (made cold): the primary stops
    /// waiting for it at once (no longer trusted for failover), so no commit stalls for
    /// `failover_timeout`; `keep_sync` names another standby if one streams.
    async fn release_sync(&mut self, i: usize) {
        let site = &self.members[i].site;
        let named = self
            .leader
            .and_then(|l| self.members[l].obs.as_ref())
            .is_some_and(|o| o.synchronous_standby_names.contains(site));
        let trusted =
            self.sync_standby == Some(i) || self.sync_from.as_ref().is_some_and(|(s, _)| s == site);
        if !(named || trusted) {
            return;
        }
        self.sync_standby = None;
        self.sync_from = None;
        if let Some(c) = self.leader.and_then(|l| self.members[l].client.as_ref()) {
            let _ = observe::execute(
                c,
                &[
                    "ALTER SYSTEM SET synchronous_standby_names = ''",
                    "SELECT pg_reload_conf()",
                ],
            )
            .await;
        }
    }

    /// Member `i` is kept cold and is not the primary ([`Cluster::set_cold`]).
    fn is_cold(&self, i: usize) -> bool {
        Some(i) != self.leader && self.cluster.cold.borrow().contains(&self.members[i].site)
    }

    /// Cold members: a running standby is stopped; the primary drops a cold member's slot and
    /// makes one for a member warmed up (before it is cloned), once per primary and change.
    async fn keep_cold(&mut self) {
        for i in 0..self.members.len() {
            let m = &self.members[i];
            if self.is_cold(i)
                && m.here
                && m.instance.is_some()
                && !matches!(m.state, State::Cloning | State::Rewinding)
            {
                let site = m.site.clone();
                self.release_sync(i).await;
                self.stop_member(i).await;
                self.event(
                    Some(i),
                    "cold",
                    format!("{site} stopped: a cold standby runs only as the primary"),
                );
            }
        }
        // Warmed up: a cold member's data is stale (its slot gone, the WAL since recycled),
        // so it is set aside and the member cloned afresh.
        let cold = self.cluster.cold.borrow().clone();
        for i in 0..self.members.len() {
            let site = self.members[i].site.clone();
            if self.cold_seen.contains(&site)
                && !cold.contains(&site)
                && Some(i) != self.leader
                && self.members[i].here
                && self.members[i].instance.is_none()
                && self.members[i].state == State::Stopped
                && self.local.has_data(&site)
            {
                match self.local.set_aside(&site) {
                    Ok(p) => self.event(
                        Some(i),
                        "warm-up",
                        format!(
                            "{site} warming up: its data, stale while cold, set aside in {}; cloned afresh",
                            p.display()
                        ),
                    ),
                    Err(e) => self.event(
                        Some(i),
                        "error",
                        format!("{site} warming up: cannot set its stale data aside: {e}"),
                    ),
                }
            }
        }
        self.cold_seen.clone_from(&cold);
        let Some(l) = self.leader.filter(|&l| self.members[l].here) else {
            return;
        };
        if self.cold_applied.as_ref() == Some(&(self.term, cold.clone())) {
            return;
        }
        let Some(client) = self.members[l].client.as_ref() else {
            return;
        };
        let site = self.members[l].site.clone();
        let mut sql = Vec::new();
        for m in self.members.iter().filter(|m| m.site != site) {
            let slot = observe::literal(&local::slot(&m.site));
            sql.push(if cold.contains(&m.site) {
                format!(
                    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = {slot} AND NOT active"
                )
            } else {
                format!(
                    "SELECT pg_create_physical_replication_slot({slot}, true) WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = {slot})"
                )
            });
        }
        let sql: Vec<&str> = sql.iter().map(String::as_str).collect();
        if observe::execute(client, &sql).await.is_err() {
            return;
        }
        // A slot still in use (a clone under way) is not dropped: tried again next tick.
        let slots: Vec<String> = cold.iter().map(|s| local::slot(s)).collect();
        let left = client
            .query_one(
                "SELECT count(*) FROM pg_replication_slots WHERE slot_name = ANY($1)",
                &[&slots],
            )
            .await
            .map(|r| r.get::<_, i64>(0));
        if left.is_ok_and(|n| n == 0) {
            self.cold_applied = Some((self.term, cold));
        }
    }

    /// Single-process start, continued: every member is this process's.
    async fn bootstrap_here(
        &mut self,
        lease: Option<store::Lease>,
        with_data: &[usize],
    ) -> Result<(), String> {
        let fresh = with_data.is_empty();
        let leader = if fresh {
            Some(0)
        } else if let Some(l) = lease
            .as_ref()
            .and_then(|l| self.members.iter().position(|m| m.site == l.holder))
            .filter(|i| with_data.contains(i))
        {
            Some(l)
        } else {
            with_data
                .iter()
                .copied()
                .find(|&i| !self.local.is_standby(&self.members[i].site))
        };
        let Some(l) = leader else {
            // Every member was left a standby: the ticks promote the most advanced.
            self.event(None, "no-primary", "no member holds the lease and none was left a primary; the most advanced standby will be promoted once the lease expires".into());
            return Ok(());
        };
        let site = self.members[l].site.clone();
        if fresh {
            self.local.initdb(&site).await.map_err(|e| e.to_string())?;
        }
        let was_running = self.members[l].instance.is_some();
        if !was_running {
            self.start_member(l, None)?;
        }
        let client = self.wait_ready(l).await?;
        self.prepare_primary(&client, &site).await?;
        self.members[l].client = Some(client);
        let lease = self
            .wiring
            .store
            .acquire(&self.key, &site, self.ttl)
            .await
            .map_err(|e| format!("cannot take the lease for {site}: {e}"))?;
        self.take_lead(l, lease.term);
        self.event(
            Some(l),
            "bootstrapped",
            if fresh {
                format!("initialised {site} as primary (term {})", self.term)
            } else if was_running {
                format!(
                    "resumed {site} as primary, still running (term {})",
                    self.term
                )
            } else {
                format!("resumed {site} as primary (term {})", self.term)
            },
        );
        Ok(())
    }

    fn take_lead(&mut self, l: usize, term: u64) {
        self.take_lead_at(l, term, Instant::now());
    }

    /// [`Driver::take_lead`] for a lease renewed (or taken), as asked, at `renewed`: the
    /// fence and the watchdog count from then, never from later.
    fn take_lead_at(&mut self, l: usize, term: u64, renewed: Instant) {
        self.leader = Some(l);
        self.term = term;
        self.lead = Lead::new(self.ttl, renewed);
        self.blocked = None;
        self.sync_standby = None;
        self.point_frontends(Some(self.members[l].config.listen));
        self.guard(l, self.lead.renewed);
    }

    /// Cluster mode: (re)arms the watchdog of this node's primary `l` for the lease renewed
    /// (asked) at `renewed`, starting one when none watches its postmaster.
    fn guard(&mut self, l: usize, renewed: Instant) {
        if self.shared.is_none() || !self.members[l].here {
            return;
        }
        let site = self.members[l].site.clone();
        let Some(pid) = self.members[l].instance.as_ref().and_then(|x| x.pid()) else {
            return;
        };
        let file = crate::watchdog::file(&self.local.dir, &site);
        let deadline = renewed + failover::fence_after(self.ttl);
        if let Err(e) = crate::watchdog::arm(&file, deadline) {
            tracing::warn!(database = %self.config.name, member = %site, "cannot arm the watchdog: {e}");
            return;
        }
        if self.members[l]
            .watchdog
            .as_ref()
            .is_some_and(|g| crate::watchdog::watches(g, pid))
        {
            return;
        }
        let Some(tandem) = std::env::current_exe().ok() else {
            return;
        };
        let log = self.local.dir.join(format!("{site}.watchdog.log"));
        let spawned = crate::watchdog::spawn(
            &tandem,
            pid,
            &self.local.bins.join("postgres"),
            &self.local.data(&site),
            &file,
            &log,
        );
        match spawned {
            Ok(g) => self.members[l].watchdog = Some(g),
            Err(e) => self.event(
                Some(l),
                "error",
                format!(
                    "cannot start the watchdog of {site}: {e}; a frozen node could not fence it"
                ),
            ),
        }
    }

    /// Stops guarding member `i` (it is being stopped or is no longer the primary).
    fn unguard(&mut self, i: usize) {
        if self.shared.is_some() {
            crate::watchdog::disarm(&crate::watchdog::file(
                &self.local.dir,
                &self.members[i].site,
            ));
            self.members[i].watchdog = None;
        }
    }

    fn start_member(&mut self, i: usize, upstream: Option<SocketAddr>) -> Result<(), String> {
        let m = &mut self.members[i];
        let inst = self
            .local
            .start(&m.site, m.config.listen, upstream)
            .map_err(|e| e.to_string())?;
        m.instance = Some(inst);
        m.state = State::Starting;
        m.error = None;
        Ok(())
    }

    /// Waits until a started member answers SQL.
    async fn wait_ready(&mut self, i: usize) -> Result<Client, String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut renewed = Instant::now();
        loop {
            // Cluster mode: a long crash recovery must not let the lease lapse meanwhile.
            if self.shared.is_some() && self.leader == Some(i) && renewed.elapsed() >= self.ttl / 3
            {
                let site = self.members[i].site.clone();
                let asked = Instant::now();
                within(
                    self.ttl,
                    self.wiring
                        .store
                        .renew(&self.key, &site, self.term, self.ttl),
                )
                .await
                .map_err(|e| format!("lost the lease for {site} while it started: {e}"))?;
                renewed = asked;
                self.guard(i, asked);
            }
            if self.reap(i).await {
                return Err(format!(
                    "postgres for {} exited while starting: {}",
                    self.members[i].site,
                    self.members[i].error.clone().unwrap_or_default()
                ));
            }
            if let Ok(c) =
                observe::connect(self.members[i].config.listen, &self.local.password).await
            {
                self.members[i].state = State::Running;
                return Ok(c);
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "{} did not accept connections within {READY_TIMEOUT:?}",
                    self.members[i].site
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Notices a postmaster that exited; true when it did.
    async fn reap(&mut self, i: usize) -> bool {
        let m = &mut self.members[i];
        let Some(inst) = m.instance.as_mut() else {
            return false;
        };
        let Ok(status) = tokio::time::timeout(Duration::ZERO, inst.wait()).await else {
            return false;
        };
        // Its children outlive a postmaster killed with SIGKILL for a moment, attached to the
        // data directory (a restart would find the shared memory in use): end them now.
        if let Some(mut inst) = m.instance.take() {
            inst.stop(Duration::ZERO).await;
        }
        m.client = None;
        m.obs = None;
        let fenced = m.state == State::Fenced;
        if !fenced {
            m.state = State::Stopped;
        }
        if !fenced && self.leader == Some(i) {
            self.lead.exited(Instant::now());
        }
        let m = &mut self.members[i];
        let tail = self.local.log_tail(&m.site);
        let last = tail.lines().last().unwrap_or_default();
        m.error = Some(format!("postgres exited ({status}); its log ends: {last}"));
        let msg = format!("postgres for {} exited ({status})", m.site);
        self.event(Some(i), "member-exited", msg);
        true
    }

    async fn observe(&mut self, i: usize) {
        self.observe_all(&[i]).await;
    }

    /// Asks the members at once, so a hung one cannot delay the primary's lease renewal.
    async fn observe_all(&mut self, which: &[usize]) {
        let mut asks = tokio::task::JoinSet::new();
        let fresh = self.ticks.is_multiple_of(FRESH_CHECK_TICKS);
        for &i in which {
            let m = &mut self.members[i];
            if m.here && m.instance.is_none() {
                continue;
            }
            if let Some(why) = &m.outage {
                // Its machine is "gone": nothing answers from it.
                m.obs = None;
                m.error = Some(why.clone());
                continue;
            }
            let (addr, password, client) = (
                m.config.listen,
                self.local.password.clone(),
                m.client.take(),
            );
            asks.spawn(async move {
                let (client, result) = ask(addr, &password, client, fresh).await;
                (i, client, result)
            });
        }
        while let Some(Ok((i, client, result))) = asks.join_next().await {
            let m = &mut self.members[i];
            m.client = client;
            match result {
                Ok(o) => {
                    m.obs = Some(o);
                    m.error = None;
                    m.late = 0;
                    if m.state == State::Starting {
                        m.state = State::Running;
                    }
                }
                // One late answer from a running member is a busy machine until the next
                // tick says otherwise: its last observation stands that long. A member
                // that refuses or fails, or is late twice in a row, is down.
                Err(miss)
                    if !miss.is_down(m.late, m.state == State::Running && m.obs.is_some()) =>
                {
                    m.late += 1;
                    tracing::debug!(site = %m.site, "{}; asking again next tick", miss.why);
                }
                Err(miss) => {
                    m.obs = None;
                    m.error = Some(miss.why);
                    m.late = 0;
                }
            }
        }
    }

    async fn tick(&mut self) {
        self.ticks += 1;
        let outages = self.cluster.outages.borrow().clone();
        for i in 0..self.members.len() {
            let why = outages.get(&self.members[i].site).cloned();
            self.outage(i, why).await;
        }
        if self.ticks.is_multiple_of(MEMBER_LOG_CHECK_TICKS) {
            for m in &self.members {
                let path = self.local.log(&m.site);
                if let Err(e) = scaleset::driver::rotate_log(&path, MEMBER_LOG_MAX) {
                    tracing::warn!(log = %path.display(), "cannot rotate a member's log: {e}");
                }
            }
        }
        for i in 0..self.members.len() {
            self.reap(i).await;
        }
        let all: Vec<usize> = (0..self.members.len()).collect();
        self.observe_all(&all).await;
        self.follow_store().await;
        self.lead().await;
        self.write_primary().await;
        self.keep_sync().await;
        self.keep_cold().await;
        self.tend_standbys().await;
        self.point_replicas();
    }

    /// Cluster mode: who leads is whoever holds the lease in the store. A lease handed to this
    /// node's member by a switchover on the old primary's node is taken up by promoting it; a
    /// member of this node that is writable without the lease is fenced; the frontends point
    /// at another node's primary while its lease lives, and at nothing once it lapsed.
    async fn follow_store(&mut self) {
        let Some(sh) = &self.shared else { return };
        let sync_key = sh.sync_key.clone();
        let got = within(self.ttl, self.wiring.store.get(&self.key)).await;
        let lease = match &got {
            Ok((Some(l), _)) => match self.position(&l.holder) {
                Some(holder) => LeaseSeen::Held { holder },
                None => LeaseSeen::Unknown,
            },
            Ok((None, _)) => LeaseSeen::Free,
            // The store away: this node's primary fails to renew and is fenced in time; the
            // others can take no lease meanwhile, so there is nothing to decide.
            Err(_) => LeaseSeen::Unknown,
        };
        // This node's own primary keeps the term of the lease it holds (`take_back` compares);
        // its lease lapsed and another term came since, it leads no more.
        if let Ok((_, term)) = &got {
            match self.leader.filter(|&l| self.members[l].here) {
                Some(l) if lease == LeaseSeen::Free && *term > self.term => {
                    let site = self.members[l].site.clone();
                    self.event(Some(l), "lease", format!(
                        "{site}'s lease (term {}) lapsed and term {term} came since: it leads no more",
                        self.term
                    ));
                    if self.members[l].instance.is_some() {
                        self.fence(l).await;
                    }
                    self.leader = None;
                    self.term = *term;
                }
                Some(_) => {}
                None => self.term = self.term.max(*term),
            }
        }
        // Whom a failover may promote comes from the primary's node's record.
        // Valid from the term of the last primary on record: a later term nobody claimed
        // promoted nobody. Unreadable, no standby is trusted.
        let leads_here = self
            .leader
            .is_some_and(|l| self.members[l].here && !self.local.is_standby(&self.members[l].site));
        if !leads_here && lease != LeaseSeen::Unknown {
            let claimed = self.last_claim().await;
            let record = within(self.ttl, self.wiring.store.read(&sync_key)).await;
            self.sync_standby = match (claimed, record) {
                (Ok(claimed), Ok(record)) => record
                    .and_then(|r| r.json::<SyncRecord>())
                    .filter(|r| r.term >= claimed && r.term <= self.term)
                    .and_then(|r| r.member)
                    .and_then(|m| self.position(&m)),
                _ => None,
            };
        }
        let members: Vec<MemberSeen> = self
            .members
            .iter()
            .map(|m| MemberSeen {
                here: m.here,
                running: m.instance.is_some(),
                writable: m.is_writable(),
                standby: m.obs.as_ref().is_some_and(|o| o.in_recovery),
                primary: m.here && self.local.has_data(&m.site) && !self.local.is_standby(&m.site),
            })
            .collect();
        let candidate = if lease == LeaseSeen::Free {
            self.why_no_candidate().ok()
        } else {
            None
        };
        let now = Instant::now();
        self.follower.leader = self.leader;
        for step in self.follower.decide(lease, &members, candidate, now) {
            match step {
                Step::Follow(h) => self.led_elsewhere(h).await,
                Step::Fence(i) => {
                    let site = self.members[i].site.clone();
                    let who = self
                        .leader
                        .map_or("no one", |l| self.members[l].site.as_str());
                    let message = format!(
                        "{site} answered as a writable primary while the lease is {who}'s (term {}); stopped",
                        self.term
                    );
                    self.fence_because(i, message).await;
                }
                Step::TakeUp(h) => self.take_up(h).await,
                Step::FailOver(c) => self.fail_over_to(c, now).await,
                Step::Point(p) => self.point_frontends(p.map(|i| self.members[i].config.listen)),
            }
        }
        if let Some(l) = self
            .leader
            .filter(|&l| !self.members[l].here && self.members[l].is_writable())
        {
            self.primary_lsn = self.members[l].obs.as_ref().map_or(0, |o| o.lsn);
        }
    }

    /// The lease is now member `h`'s, taken on another node or handed to this one.
    async fn led_elsewhere(&mut self, h: usize) {
        if let Some(old) = self.leader.filter(|&o| o != h && self.members[o].here)
            && self.members[old].instance.is_some()
        {
            let message = format!(
                "{} lost its lease to {} (term {}); stopped",
                self.members[old].site, self.members[h].site, self.term
            );
            self.fence_because(old, message).await;
        }
        self.leader = Some(h);
        self.lead = Lead::new(self.ttl, Instant::now());
        self.sync_standby = None;
        self.blocked = None;
        let site = self.members[h].site.clone();
        if !self.members[h].here {
            self.failing_over = None;
            self.event(
                Some(h),
                "leader",
                format!(
                    "{site} leads on its node (term {}); this node follows it",
                    self.term
                ),
            );
        } else if self.members[h].is_writable() {
            self.take_lead(h, self.term);
        }
    }

    /// The lease was handed to this node's standby `h` by a switchover on the old primary's
    /// node, which waited until it had every record: promote it.
    async fn take_up(&mut self, h: usize) {
        let site = self.members[h].site.clone();
        // The lease was taken elsewhere, at a time this node does not know: renewed first.
        let asked = Instant::now();
        let renewal = self
            .wiring
            .store
            .renew(&self.key, &site, self.term, self.ttl);
        if within(self.ttl, renewal).await.is_err() || !self.claim_primary(h).await {
            return;
        }
        match self.promote_guarded(h, asked).await {
            Ok(renewed) => {
                self.take_lead_at(h, self.term, renewed);
                if let Some((from, started, since)) = self.failing_over.take() {
                    let seconds = started.elapsed().as_secs_f64();
                    self.failovers += 1;
                    self.record("failover", from, &site, seconds);
                    self.event(Some(h), "failover", format!(
                        "promoted {site} (term {}) {seconds:.2} s after {since}, on a second attempt",
                        self.term
                    ));
                } else {
                    self.event(
                        Some(h),
                        "promoted",
                        format!(
                            "{site} promoted on this node: the lease was handed to it (term {})",
                            self.term
                        ),
                    );
                }
            }
            Err(e) => self.event(Some(h), "error", format!("promoting {site} failed: {e}")),
        }
    }

    /// Cluster mode: records which member leads at this term, once per term, under its lease.
    async fn write_primary(&mut self) {
        let Some(l) = self
            .leader
            .filter(|&l| self.members[l].here && self.members[l].is_writable())
        else {
            return;
        };
        if self
            .shared
            .as_ref()
            .is_some_and(|sh| sh.primary_written != self.term)
        {
            self.claim_primary(l).await;
        }
    }

    /// Cluster mode: writes that member `l` leads at this term, under its lease — before it
    /// is promoted or started writable, so a record naming a member means no other was
    /// promoted since it led (what a start with the lease free and a switchover given up rely
    /// on). False when the store refused or did not answer: then it must not be promoted.
    async fn claim_primary(&mut self, l: usize) -> bool {
        let Some(sh) = &self.shared else {
            return true;
        };
        let site = self.members[l].site.clone();
        let record = PrimaryRecord {
            term: self.term,
            member: site.clone(),
        };
        let bytes = serde_json::to_vec(&record).unwrap_or_default();
        let key = sh.primary_key.clone();
        let written = within(
            self.ttl,
            self.wiring
                .store
                .put_fenced(&key, bytes, &self.key, &site, self.term),
        )
        .await;
        match written {
            Ok(_) => {
                if let Some(sh) = self.shared.as_mut() {
                    sh.primary_written = self.term;
                }
                true
            }
            Err(e) => {
                self.event(Some(l), "error", format!(
                    "cannot record {site} as the primary of term {} ({e}); not promoting it now",
                    self.term
                ));
                false
            }
        }
    }

    /// Cluster mode: the last primary on record (`databases/DB/primary`), if any.
    async fn primary_record(&mut self) -> Result<Option<PrimaryRecord>, String> {
        let Some(key) = self.shared.as_ref().map(|sh| sh.primary_key.clone()) else {
            return Ok(None);
        };
        let store = self.wiring.store.clone();
        let record = within(self.ttl, store.read(&key))
            .await
            .map_err(|e| e.to_string())?;
        Ok(record.and_then(|r| r.json()))
    }

    /// The term of the last primary on record (0 when none).
    async fn last_claim(&mut self) -> Result<u64, String> {
        Ok(self.primary_record().await?.map_or(0, |r| r.term))
    }

    /// The member the last primary on record is (who led last).
    async fn last_primary(&mut self) -> Result<Option<usize>, String> {
        let record = self.primary_record().await?;
        Ok(record.and_then(|r| self.position(&r.member)))
    }

    /// Cluster mode: writes the trusted synchronous standby for the other nodes, under the
    /// primary's lease; false when that failed (the caller then changes nothing).
    async fn write_sync(&mut self) -> bool {
        let (Some(sh), Some(l)) = (&self.shared, self.leader) else {
            return true;
        };
        let member = self.sync_standby.map(|s| self.members[s].site.clone());
        let now = (self.term, member.clone());
        if sh.sync_written.as_ref() == Some(&now) {
            return true;
        }
        let site = self.members[l].site.clone();
        let bytes = serde_json::to_vec(&SyncRecord {
            term: self.term,
            member,
        })
        .unwrap_or_default();
        let key = sh.sync_key.clone();
        match within(
            self.ttl,
            self.wiring
                .store
                .put_fenced(&key, bytes, &self.key, &site, self.term),
        )
        .await
        {
            Ok(_) => {
                if let Some(sh) = self.shared.as_mut() {
                    sh.sync_written = Some(now);
                }
                true
            }
            Err(e) => {
                tracing::warn!(database = %self.config.name, "cannot write the synchronous standby to the store: {e}");
                false
            }
        }
    }

    /// The lease holder's tick, decided by [`Lead`]: renew while it answers as writable;
    /// restart a crashed postmaster in place; fence it before the lease can expire; promote a
    /// standby once it has.
    async fn lead(&mut self) {
        let now = Instant::now();
        // A failover by restore holds the lease: nothing to renew, restart or promote.
        if self.claimed.is_some() {
            return;
        }
        let Some(l) = self.leader.filter(|&l| self.members[l].here) else {
            // Cluster mode: another node's primary, or none, is the follower's (`follow_store`).
            if self.shared.is_none() {
                self.fail_over(now).await;
            }
            return;
        };
        // Cluster mode: a lease taken for this node's standby that is not promoted yet is the
        // follower's too (`take_up` promotes it, or the lease lapses and a failover is tried
        // again); nothing to renew, restart or fence.
        if self.shared.is_some() && self.local.is_standby(&self.members[l].site) {
            return;
        }
        let m = &self.members[l];
        let site = m.site.clone();
        let process = match (m.state, m.instance.is_some()) {
            (State::Fenced, _) => Process::Fenced,
            (_, false) => Process::Exited,
            (State::Starting, true) if self.lead.began.is_some() => Process::Restarting,
            _ => Process::Running,
        };
        // Cluster mode, sync: a failover another node can make, which needs the standby
        // recorded under this term.
        let failover = self.candidate().and_then(|c| {
            let recorded = match &self.shared {
                Some(sh) if self.config.replication.is_sync() => {
                    sh.sync_written.as_ref()
                        == Some(&(self.term, Some(self.members[c].site.clone())))
                }
                _ => true,
            };
            if recorded {
                Ok(c)
            } else {
                Err(format!(
                    "{} is not recorded as the synchronous standby in the store",
                    self.members[c].site
                ))
            }
        });
        let seen = Seen {
            writable: m.is_writable(),
            process,
            restartable: self.local.has_data(&site)
                && !self.local.is_standby(&site)
                && self.members[l].outage.is_none(),
            failover_possible: failover.is_ok(),
        };
        let (action, notes) = self.lead.decide(seen, now);
        if notes.lost {
            let why = self.members[l]
                .error
                .clone()
                .unwrap_or_else(|| "not writable".into());
            self.event(
                Some(l),
                "primary-lost",
                format!("primary {site} lost: {why}"),
            );
            self.point_frontends(None);
        }
        if let Some(exits) = notes.gave_up {
            self.event(
                Some(l),
                "crash-loop",
                format!(
                    "{site} exited {exits} times in a row within {RESTART_STABLE:?} of a restart; failing over instead"
                ),
            );
        }
        match action {
            Action::Renew => self.renew(l, now).await,
            Action::HoldLease => {
                self.hold_lease(l, now).await;
            }
            Action::Restart { attempt, backoff } => {
                self.restart(l, now, attempt, backoff, failover.err()).await;
            }
            Action::Fence => {
                self.fence(l).await;
                self.event(
                    Some(l),
                    "fenced",
                    format!(
                        "{site} fenced (term {}): no writes after {:?} without a lease renewal, before the lease can expire",
                        self.term,
                        failover::fence_after(self.ttl)
                    ),
                );
            }
            Action::FailOver => self.fail_over(now).await,
            Action::Wait => {}
        }
    }

    async fn renew(&mut self, l: usize, now: Instant) {
        let site = self.members[l].site.clone();
        let renewal = within(
            self.ttl,
            self.wiring
                .store
                .renew(&self.key, &site, self.term, self.ttl),
        )
        .await;
        match renewal {
            // The store away (etcd without quorum, cut off): the lease may still be ours, and
            // the renewals go on; past two thirds of it the primary is fenced, so it takes no
            // write by the time the lease can lapse (its watchdog would do it too).
            Err(StoreError::Unavailable(why)) => {
                if now >= self.lead.renewed + failover::fence_after(self.ttl) {
                    let message = format!(
                        "{site} fenced (term {}): its lease could not be renewed for {:?} ({why}), before it can lapse",
                        self.term,
                        failover::fence_after(self.ttl)
                    );
                    self.fence_because(l, message).await;
                } else if !self.unrenewed {
                    self.event(
                        Some(l),
                        "lease",
                        format!("cannot renew {site}'s lease: {why}; retrying"),
                    );
                }
                self.unrenewed = true;
            }
            Ok(_) => {
                self.unrenewed = false;
                self.primary_lsn = self.members[l].obs.as_ref().map_or(0, |o| o.lsn);
                self.guard(l, now);
                let back = self.lead.renewed(true, now).unwrap_or_default();
                if back.was_lost {
                    let message = match back.restarted_after {
                        Some(after) => format!(
                            "{site} restarted in place (term {}): writable again {:.2} s after its postmaster exited; no failover",
                            self.term,
                            after.as_secs_f64()
                        ),
                        None => format!("{site} answers again before any failover"),
                    };
                    self.event(Some(l), "primary-back", message);
                    self.point_frontends(Some(self.members[l].config.listen));
                }
            }
            Err(e) => {
                // Lapsed during a stall (Tandem stopped or starved past the lease), and no one
                // took it meanwhile: the store gives it back, with the next term. Taken by
                // another member: this one must stop at once.
                match self.take_back(&site).await {
                    Ok(term) => {
                        self.term = term;
                        self.lead.renewed(true, now);
                        self.event(
                            Some(l),
                            "lease",
                            format!(
                                "{site} took its lease again (term {}) after it lapsed ({e}); no one else had taken it",
                                self.term
                            ),
                        );
                    }
                    Err(_) => {
                        self.lead.renewed(false, now);
                        self.event(
                            Some(l),
                            "fenced",
                            format!("{site} lost its lease ({e}); stopping it"),
                        );
                        self.fence(l).await;
                        self.leader = None;
                    }
                }
            }
        }
    }

    /// Starts the lease holder's postmaster again in place as primary, its lease kept first.
    async fn restart(
        &mut self,
        l: usize,
        now: Instant,
        attempt: u32,
        backoff: Duration,
        no_failover: Option<String>,
    ) {
        if !self.hold_lease(l, now).await {
            return;
        }
        if self
            .shared
            .as_ref()
            .is_some_and(|sh| sh.primary_written != self.term)
            && !self.claim_primary(l).await
        {
            return;
        }
        let site = self.members[l].site.clone();
        let exited = self.lead.exited.unwrap_or(now);
        let started = self.start_member(l, None);
        self.lead.restarted(started.is_ok(), now);
        self.guard(l, self.lead.renewed);
        match started {
            Ok(()) => {
                let attempt = match attempt {
                    1 => String::new(),
                    n => format!(", attempt {n} after a {backoff:?} backoff"),
                };
                let why = no_failover
                    .map(|why| format!(" (no failover possible: {why})"))
                    .unwrap_or_default();
                self.event(
                    Some(l),
                    "restarting",
                    format!(
                        "{site}'s postmaster exited {:.2} s ago while it held the lease; restarting it in place as primary (term {}){attempt}{why}",
                        (now - exited).as_secs_f64(),
                        self.term
                    ),
                );
            }
            Err(e) => self.event(Some(l), "error", format!("cannot restart {site}: {e}")),
        }
    }

    /// Makes member `i`, when this process runs it, under an outage drill (`Some(why)`) or
    /// not (see [`Cluster::set_outage`]).
    async fn outage(&mut self, i: usize, why: Option<String>) {
        if !self.members[i].here {
            return;
        }
        let site = self.members[i].site.clone();
        match why {
            Some(why) if self.members[i].outage.is_none() => {
                let role = if self.leader == Some(i) {
                    "primary"
                } else {
                    "standby"
                };
                self.members[i].outage = Some(why.clone());
                self.fence_because(i, format!("{site} ({role}) stopped: {why}"))
                    .await;
                self.members[i].error = Some(why);
            }
            None if self.members[i].outage.is_some() => {
                let m = &mut self.members[i];
                m.outage = None;
                m.error = None;
                m.retry_at = Instant::now();
                self.event(
                    Some(i),
                    "outage-end",
                    format!("{site}'s outage drill ended; it rejoins"),
                );
            }
            _ => {}
        }
    }

    /// [`Driver::fence`], then the `fenced` event saying why.
    async fn fence_because(&mut self, i: usize, message: String) {
        self.fence(i).await;
        self.event(Some(i), "fenced", message);
    }

    /// Stops a member taking writes at once: out of every frontend, flows reset, the
    /// postmaster and every process it started killed (`local::Postmaster`).
    async fn fence(&mut self, i: usize) {
        if self.leader == Some(i) {
            self.point_frontends(None);
        }
        self.unguard(i);
        let m = &mut self.members[i];
        if let Some(mut inst) = m.instance.take() {
            inst.stop(Duration::ZERO).await;
        }
        m.client = None;
        m.obs = None;
        m.state = State::Fenced;
    }

    /// Keeps (or, expired, takes again with the next term) the primary's lease while it
    /// restarts in place; false when the store refuses.
    async fn hold_lease(&mut self, l: usize, now: Instant) -> bool {
        let site = self.members[l].site.clone();
        let store = self.wiring.store.clone();
        if now < self.lead.renewed + self.ttl
            && within(self.ttl, store.renew(&self.key, &site, self.term, self.ttl))
                .await
                .is_ok()
        {
            self.lead.held(true, now);
            self.guard(l, now);
            return true;
        }
        match self.take_back(&site).await {
            Ok(term) => {
                self.term = term;
                self.lead.held(true, now);
                self.guard(l, now);
                if self.members[l].state == State::Fenced {
                    self.members[l].state = State::Stopped;
                }
                true
            }
            Err(_) => false,
        }
    }

    /// Takes this node's primary's lapsed lease again, with the next term — in cluster mode
    /// only when no one held it in between (the store's term is this lease's next): a member
    /// promoted meanwhile, even one gone since, may have taken writes this one lacks.
    async fn take_back(&mut self, site: &str) -> Result<u64, StoreError> {
        if self.shared.is_some() {
            // Not even tried once another term came: each try would move the term on.
            let (_, term) = within(self.ttl, self.wiring.store.get(&self.key)).await?;
            if term > self.term {
                return Err(StoreError::Lost { holder: None, term });
            }
        }
        let lease = within(
            self.ttl,
            self.wiring.store.acquire(&self.key, site, self.ttl),
        )
        .await?;
        if self.shared.is_none() || lease.term <= self.term + 1 {
            return Ok(lease.term);
        }
        let _ = within(
            self.ttl,
            self.wiring.store.release(&self.key, site, lease.term),
        )
        .await;
        Err(StoreError::Lost {
            holder: None,
            term: lease.term,
        })
    }

    /// The standby a failover would promote now, or why there is none.
    fn candidate(&self) -> Result<usize, String> {
        let standbys: Vec<Standby> = self
            .members
            .iter()
            .enumerate()
            .filter(|(i, _)| Some(*i) != self.leader)
            .map(|(_, m)| Standby {
                site: m.site.clone(),
                reachable: m.obs.as_ref().is_some_and(|o| o.in_recovery),
                lsn: m.obs.as_ref().map_or(0, |o| o.receive_lsn.max(o.lsn)),
            })
            .collect();
        let sync = self.sync_standby.map(|i| self.members[i].site.clone());
        // Without a primary seen this run, the sync rule cannot be applied: the most
        // advanced standby is the best there is.
        let mode = if self.leader.is_none() && !self.bootstrapped_with_leader() {
            Replication::Async
        } else {
            self.config.replication
        };
        let max_lag = if mode == self.config.replication {
            self.config.max_lag_on_failover
        } else {
            u64::MAX
        };
        failover::choose(mode, max_lag, sync.as_deref(), self.primary_lsn, &standbys)
            .map(|site| self.index(&site))
    }

    /// Promotes the best standby once the lease is free.
    async fn fail_over(&mut self, now: Instant) {
        if let Ok(c) = self.why_no_candidate()
            && self.members[c].here
        {
            // Another node's member is promoted by its own node.
            self.fail_over_to(c, now).await;
        }
    }

    /// [`Driver::candidate`], announcing once why there is none.
    fn why_no_candidate(&mut self) -> Result<usize, String> {
        self.candidate().inspect_err(|why| {
            if self.blocked.as_deref() != Some(why.as_str()) {
                self.event(None, "failover-blocked", format!("no failover: {why}"));
                self.blocked = Some(why.clone());
            }
        })
    }

    /// Takes the lease for this node's member `c` and promotes it.
    async fn fail_over_to(&mut self, c: usize, now: Instant) {
        let site = self.members[c].site.clone();
        let asked = Instant::now();
        let lease = match within(
            self.ttl,
            self.wiring.store.acquire(&self.key, &site, self.ttl),
        )
        .await
        {
            Ok(l) => l,
            Err(StoreError::Held { .. }) => return,
            Err(e) => {
                self.event(
                    Some(c),
                    "failover-blocked",
                    format!("cannot take the lease: {e}"),
                );
                return;
            }
        };
        let from = self.leader.map(|l| self.members[l].site.clone());
        // Counted from the fault's latest possible time, the last renewal, not from its
        // detection (a tick and an SQL timeout later).
        let (started, since) = match (&from, self.lead.lost_since) {
            (Some(f), _) if self.leader.is_some_and(|l| !self.members[l].here) => {
                (self.follower.seen, format!("{f} was last seen writable"))
            }
            (Some(f), _) => (self.lead.renewed, format!("{f}'s last renewal")),
            (None, Some(_)) => (self.lead.renewed, "the primary's last renewal".to_string()),
            (None, None) => (now, "the lease was found free".to_string()),
        };
        self.term = lease.term;
        // Finished by `take_up` if this attempt falls short (the lease stays this member's).
        self.failing_over = Some((from.clone(), started, since.clone()));
        if !self.claim_primary(c).await {
            return;
        }
        let promoted = if self.shared.is_some() {
            self.promote_guarded(c, asked).await
        } else {
            self.promote(c).await.map(|()| Instant::now())
        };
        match promoted {
            Ok(renewed) => {
                self.failing_over = None;
                self.take_lead_at(c, lease.term, renewed);
                let seconds = started.elapsed().as_secs_f64();
                self.failovers += 1;
                self.record("failover", from.clone(), &site, seconds);
                self.event(
                    Some(c),
                    "failover",
                    format!(
                        "promoted {site} (term {}) {seconds:.2} s after {since}; frontends now point at {}",
                        self.term,
                        self.members[c].config.listen
                    ),
                );
            }
            Err(e) => {
                self.leader = None;
                self.event(Some(c), "error", format!("promoting {site} failed: {e}"));
            }
        }
    }

    /// Cluster mode: promotes this node's standby `c` under the lease taken or renewed, as
    /// asked, at `asked`: its watchdog armed first (so a promotion that completes late is
    /// still fenced in time), the wait bounded by what is left before the fence, the lease
    /// renewed right after. On any failure the member is fenced. The renewal's time.
    async fn promote_guarded(&mut self, c: usize, asked: Instant) -> Result<Instant, String> {
        self.guard(c, asked);
        let site = self.members[c].site.clone();
        let Some(client) = self.members[c].client.take() else {
            self.fence(c).await;
            return Err("no connection".into());
        };
        // The lease (and the watchdog) kept every third of it while PostgreSQL replays what it
        // received and promotes, however long that takes.
        let (store, ttl, term) = (self.wiring.store.clone(), self.ttl, self.term);
        let file = crate::watchdog::file(&self.local.dir, &site);
        let mut renewed = asked;
        let outcome = {
            let promote = client.query_one(PROMOTE, &[]);
            tokio::pin!(promote);
            loop {
                tokio::select! {
                    r = &mut promote => break match r {
                        Ok(row) if row.get::<_, bool>(0) => Ok(()),
                        Ok(_) => Err("pg_promote did not complete within 30 s".to_string()),
                        Err(e) => Err(e.to_string()),
                    },
                    () = tokio::time::sleep_until(renewed + ttl / 3) => {
                        let at = Instant::now();
                        match within(ttl, store.renew(&self.key, &site, term, ttl)).await {
                            Ok(_) => {
                                renewed = at;
                                let _ = crate::watchdog::arm(&file, at + failover::fence_after(ttl));
                            }
                            Err(e) => break Err(format!("the lease could not be kept during the promotion: {e}")),
                        }
                    }
                }
            }
        };
        self.members[c].client = Some(client);
        let promoted = match outcome {
            Ok(()) => match self.promoted(c).await {
                Ok(()) => {
                    let at = Instant::now();
                    within(ttl, store.renew(&self.key, &site, term, ttl))
                        .await
                        .map(|_| at)
                        .map_err(|e| {
                            format!("the lease could not be renewed after the promotion: {e}")
                        })
                }
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        };
        match promoted {
            Ok(renewed) => {
                self.guard(c, renewed);
                Ok(renewed)
            }
            Err(e) => {
                self.fence(c).await;
                Err(e)
            }
        }
    }

    fn bootstrapped_with_leader(&self) -> bool {
        self.changed_this_run || self.primary_lsn > 0
    }

    /// The counters and last change of earlier runs (nothing when there were none, or the
    /// file cannot be read: they are for operators, never for decisions).
    fn load_history(&mut self) {
        let path = self.local.dir.join("history.json");
        let Ok(text) = std::fs::read(&path) else {
            return;
        };
        match serde_json::from_slice::<History>(&text) {
            Ok(h) => {
                self.failovers = h.failovers;
                self.switchovers = h.switchovers;
                self.restores = h.restores;
                self.last_change = h.last_change;
            }
            Err(e) => tracing::warn!(file = %path.display(), "ignoring the database history: {e}"),
        }
    }

    /// Writes the counters and last change (a temporary file renamed over the old one).
    fn save_history(&self) {
        let history = History {
            failovers: self.failovers,
            switchovers: self.switchovers,
            restores: self.restores,
            last_change: self.last_change.clone(),
        };
        let path = self.local.dir.join("history.json");
        let tmp = path.with_extension("json.tmp");
        let written = serde_json::to_vec_pretty(&history)
            .map_err(std::io::Error::other)
            .and_then(|bytes| std::fs::write(&tmp, bytes))
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = written {
            tracing::warn!(file = %path.display(), "cannot keep the database history: {e}");
        }
    }

    fn position(&self, site: &str) -> Option<usize> {
        self.members.iter().position(|m| m.site == site)
    }

    fn index(&self, site: &str) -> usize {
        self.members
            .iter()
            .position(|m| m.site == site)
            .unwrap_or(0)
    }

    fn record(&mut self, kind: &'static str, from: Option<String>, to: &str, seconds: f64) {
        self.last_change = Some(Change {
            at: SystemTime::now(),
            kind: kind.to_string(),
            from,
            to: to.to_string(),
            term: self.term,
            seconds,
        });
        self.changed_this_run = true;
        self.save_history();
    }

    /// Promotes a standby and makes it a primary for the others: no synchronous standby until
    /// one streams from it, a fresh replication slot for every other member.
    async fn promote(&mut self, c: usize) -> Result<(), String> {
        let client = self.members[c].client.as_ref().ok_or("no connection")?;
        let promoted: bool = client
            .query_one(PROMOTE, &[])
            .await
            .map_err(|e| e.to_string())?
            .get(0);
        if !promoted {
            return Err("pg_promote did not complete within 30 s".into());
        }
        self.promoted(c).await
    }

    /// A standby just promoted made a primary for the others: no synchronous standby until
    /// one streams from it, a fresh replication slot for every other member.
    async fn promoted(&mut self, c: usize) -> Result<(), String> {
        let client = self.members[c].client.as_ref().ok_or("no connection")?;
        // Strict: from its first commit on, a new primary waits for a standby (any, until one
        // is named).
        let names = if self.config.replication == Replication::SyncStrict {
            "ALTER SYSTEM SET synchronous_standby_names = '*'"
        } else {
            "ALTER SYSTEM SET synchronous_standby_names = ''"
        };
        observe::execute(client, &[names, "SELECT pg_reload_conf()"]).await?;
        let site = self.members[c].site.clone();
        let others = self.others(&site);
        ensure_slots(client, &others, true).await?;
        if let Some(o) = self.members[c].obs.as_mut() {
            o.in_recovery = false;
        }
        Ok(())
    }

    /// Sync mode: names a streaming standby in `synchronous_standby_names`, trusts it for
    /// failover once the primary reports it synchronous, and drops it (trust first) when it
    /// has been gone for `failover_timeout`, so commits do not hang. Async mode: no names.
    async fn keep_sync(&mut self) {
        let Some(l) = self.leader.filter(|&l| self.members[l].here) else {
            return;
        };
        // Again under a new term (a lease taken back after it lapsed).
        self.write_sync().await;
        let Some(obs) = self.members[l].obs.clone().filter(|o| !o.in_recovery) else {
            return;
        };
        let current = obs
            .synchronous_standby_names
            .trim()
            .trim_matches('"')
            .to_string();
        let strict = self.config.replication == Replication::SyncStrict;
        let want = match self.config.replication {
            Replication::Async => None,
            Replication::Sync | Replication::SyncStrict => {
                let now = Instant::now();
                // Seen is answering: a standby whose replies stopped (it hangs, its network
                // is cut) is gone as soon as one that disconnected, though its WAL sender
                // still says `streaming` until `wal_sender_timeout`. A reply's time is the
                // standby's clock, only ever compared with itself.
                self.replies
                    .retain(|name, _| obs.replicas.iter().any(|r| r.name == *name));
                for r in &obs.replicas {
                    let seen = self.replies.get(&r.name);
                    if seen.is_none_or(|(t, _)| *t != r.reply_time) {
                        self.replies
                            .insert(r.name.clone(), (r.reply_time.clone(), now));
                    }
                }
                let answered = |name: &str| self.replies.get(name).map(|(_, at)| *at);
                let silent = |name: &str| answered(name).is_none_or(|at| now >= at + self.ttl);
                let streaming: Vec<&str> = obs
                    .replicas
                    .iter()
                    .filter(|r| r.state == "streaming" && !silent(&r.name))
                    .map(|r| r.name.as_str())
                    .filter(|n| self.members.iter().any(|m| m.site == *n))
                    .collect();
                let sync_ok = self.sync_standby.is_some_and(|s| {
                    let site = self.members[s].site.as_str();
                    obs.replicas
                        .iter()
                        .any(|r| r.name == site && r.sync_state == "sync" && !silent(site))
                });
                if sync_ok
                    && let Some(at) = self
                        .sync_standby
                        .and_then(|s| answered(&self.members[s].site))
                {
                    self.sync_seen = self.sync_seen.max(at);
                }
                if let Some(s) = self.sync_standby
                    && !sync_ok
                    && now >= self.sync_seen + self.ttl
                {
                    self.sync_standby = None;
                    let commits = if strict {
                        "commits wait for any standby to come back (sync-strict)"
                    } else {
                        "commits no longer wait for it"
                    };
                    self.event(Some(s), "sync", format!(
                        "synchronous standby {} gone for {:?}: {commits}, and it may not be promoted until it is synchronous again",
                        self.members[s].site, self.ttl
                    ));
                }
                let keep = self.sync_standby.map(|s| self.members[s].site.as_str());
                let keep = keep.or_else(|| (!current.is_empty()).then_some(current.as_str()));
                // Strict's `*` is no member's name: the first streaming standby is named.
                failover::sync_choice(keep, &streaming).map(str::to_string)
            }
        };
        // While the trusted standby is named, keep naming it (dropping it is decided above).
        let want = match self.sync_standby {
            Some(s) => Some(self.members[s].site.clone()),
            None => want,
        };
        let nobody = if strict { "*" } else { "" };
        let target = want.clone().unwrap_or_else(|| nobody.to_string());
        // An untrusted standby is untrusted in the store before the primary stops waiting for
        // it, or another node could promote a copy missing commits.
        if current != target && !self.write_sync().await {
            return;
        }
        if current != target {
            let value = match &want {
                Some(w) => observe::literal(&format!("\"{w}\"")),
                None => format!("'{nobody}'"),
            };
            let set = format!("ALTER SYSTEM SET synchronous_standby_names = {value}");
            let client = self.members[l].client.as_ref();
            if let Some(c) = client
                && let Err(e) = observe::execute(c, &[&set, "SELECT pg_reload_conf()"]).await
            {
                self.event(
                    Some(l),
                    "error",
                    format!("cannot set synchronous_standby_names: {e}"),
                );
            }
            return;
        }
        // Trusted (and recorded for the other nodes) once it has flushed what the primary had
        // written when it first reported it synchronous: commits acknowledged just before,
        // with no standby to wait for, may not have reached it yet (Patroni waits the same).
        let reported = want.as_ref().and_then(|w| {
            obs.replicas
                .iter()
                .find(|r| r.name == *w && r.sync_state == "sync")
        });
        let caught_up = match (reported, &self.sync_from) {
            (Some(r), Some((name, lsn))) if *name == r.name => r.flush_lsn >= *lsn,
            (Some(r), _) => {
                self.sync_from = Some((r.name.clone(), obs.lsn));
                false
            }
            (None, _) => {
                self.sync_from = None;
                false
            }
        };
        if self.sync_standby.is_none()
            && caught_up
            && let Some(w) = want
        {
            let s = self.index(&w);
            self.sync_standby = Some(s);
            self.sync_seen = Instant::now();
            self.write_sync().await;
            self.event(
                Some(s),
                "sync",
                format!("{w} is the synchronous standby: commits wait for it (RPO 0)"),
            );
        }
    }

    /// Brings every other member to streaming from the primary: starts standbys, rewinds a
    /// former primary, clones a member without data. Slow work runs on its own task.
    async fn tend_standbys(&mut self) {
        let Some(l) = self.leader else { return };
        let upstream = self.members[l].config.listen;
        let now = Instant::now();
        if !self.members[l].is_writable() {
            // Cluster mode: this node's standby (its machine back, say) starts in recovery
            // even while no primary answers, or it could never be the one promoted.
            if self.shared.is_some() {
                // Its own standby too, when the lease was taken for it and it is not promoted.
                for i in 0..self.members.len() {
                    let m = &self.members[i];
                    if m.here
                        && !self.is_cold(i)
                        && m.outage.is_none()
                        && matches!(m.state, State::Stopped | State::Fenced)
                        && now >= m.retry_at
                        && self.local.has_data(&m.site)
                        && self.local.is_standby(&m.site)
                        && let Err(e) = self.start_member(i, Some(upstream))
                    {
                        self.failed_attempt(i, e);
                    }
                }
            }
            return;
        }
        for i in 0..self.members.len() {
            if i == l
                || !self.members[i].here
                || self.members[i].outage.is_some()
                || self.is_cold(i)
            {
                continue;
            }
            if self.members[i].is_writable() {
                // A second writable server: never allowed to take a write.
                let message = format!(
                    "{} answered as a writable primary while {} holds the lease; stopped",
                    self.members[i].site, self.members[l].site
                );
                self.fence_because(i, message).await;
                continue;
            }
            if self.stuck(i, now) {
                let site = self.members[i].site.clone();
                self.event(Some(i), "error", format!(
                    "{site} has not streamed from the primary for {STUCK:?} (its history diverged?); rewinding it"
                ));
                // Stopped inside the work, not here: a hung standby can take the whole
                // shutdown grace, and the ticks must keep renewing the primary's lease.
                let m = &mut self.members[i];
                m.client = None;
                m.obs = None;
                let running = m.instance.take();
                self.spawn_work_after(i, State::Rewinding, upstream, running);
                continue;
            }
            let m = &self.members[i];
            if !matches!(m.state, State::Stopped | State::Fenced) || now < m.retry_at {
                continue;
            }
            let site = m.site.clone();
            if !self.local.has_data(&site) {
                self.spawn_work(i, State::Cloning, upstream);
            } else if !self.local.is_standby(&site) {
                self.spawn_work(i, State::Rewinding, upstream);
            } else if let Err(e) = self.start_member(i, Some(upstream)) {
                self.failed_attempt(i, e);
            }
        }
    }

    /// A running standby that has not streamed for [`STUCK`].
    fn stuck(&mut self, i: usize, now: Instant) -> bool {
        let m = &mut self.members[i];
        if m.state != State::Running || m.is_streaming() {
            m.not_streaming_since = None;
            return false;
        }
        let since = *m.not_streaming_since.get_or_insert(now);
        if now >= since + STUCK {
            m.not_streaming_since = None;
            return true;
        }
        false
    }

    fn spawn_work(&mut self, i: usize, state: State, upstream: SocketAddr) {
        self.spawn_work_after(i, state, upstream, None);
    }

    /// As [`Driver::spawn_work`], stopping the member's `running` postmaster first.
    fn spawn_work_after(
        &mut self,
        i: usize,
        state: State,
        upstream: SocketAddr,
        running: Option<Box<dyn Instance>>,
    ) {
        let site = self.members[i].site.clone();
        self.members[i].state = state;
        let local = self.local.clone();
        let tx = self.work.clone();
        let policy = self.config.rewind_failure;
        tokio::spawn(async move {
            if let Some(inst) = running {
                shut_down(inst).await;
            }
            // A just-promoted primary's control file still names the old timeline until its
            // first checkpoint, and pg_rewind would then see nothing to rewind.
            let checkpoint = match observe::connect(upstream, &local.password).await {
                Ok(c) => observe::execute(&c, &["CHECKPOINT"]).await,
                Err(e) => Err(e),
            };
            if let Err(e) = checkpoint {
                let result = Err(format!(
                    "cannot checkpoint the primary before rewinding: {e}"
                ));
                let _ = tx
                    .send(Done {
                        member: i,
                        what: "retry",
                        result,
                    })
                    .await;
                return;
            }
            let (what, result) = match state {
                State::Rewinding => match local.rewind(&site, upstream).await {
                    Ok(out) => ("rejoined", Ok(format!("rewound with pg_rewind ({out})"))),
                    Err(e) if policy == RewindFailure::Clone => {
                        let kept = local.set_aside(&site);
                        let cloned = local.basebackup(&site, upstream).await;
                        let result = match (kept, cloned) {
                            (Ok(old), Ok(())) => Ok(format!(
                                "pg_rewind failed ({e}); cloned afresh, former data kept in {}",
                                old.display()
                            )),
                            (Err(k), _) => Err(format!(
                                "pg_rewind failed ({e}); cannot set the data aside: {k}"
                            )),
                            (_, Err(c)) => {
                                Err(format!("pg_rewind failed ({e}); cloning failed too: {c}"))
                            }
                        };
                        ("recloned", result)
                    }
                    Err(e) => (
                        "rejoined",
                        Err(format!(
                            "pg_rewind failed ({e}); left stopped (rewind_failure = \"stop\")"
                        )),
                    ),
                },
                _ => (
                    "cloned",
                    local
                        .basebackup(&site, upstream)
                        .await
                        .map(|()| format!("cloned from {upstream}"))
                        .map_err(|e| e.to_string()),
                ),
            };
            let _ = tx
                .send(Done {
                    member: i,
                    what,
                    result,
                })
                .await;
        });
    }

    fn work_done(&mut self, done: Done) {
        let i = done.member;
        if let Some(why) = self.members[i].outage.clone() {
            // A clone or rewind that was under way when an outage drill began: not started.
            let m = &mut self.members[i];
            m.state = State::Fenced;
            m.error = Some(why);
            return;
        }
        match done.result {
            Ok(msg) => {
                self.members[i].state = State::Stopped;
                self.members[i].failures = 0;
                let upstream = self.leader.map(|l| self.members[l].config.listen);
                match upstream.map(|u| self.start_member(i, Some(u))) {
                    Some(Ok(())) => self.event(
                        Some(i),
                        done.what,
                        format!("{}: {msg}; starting as a standby", self.members[i].site),
                    ),
                    Some(Err(e)) => self.failed_attempt(i, e),
                    None => {}
                }
            }
            Err(e) => {
                if self.config.rewind_failure == RewindFailure::Stop && done.what == "rejoined" {
                    self.members[i].state = State::Failed;
                    self.members[i].error = Some(e.clone());
                    self.event(Some(i), "error", e);
                } else {
                    self.failed_attempt(i, e);
                }
            }
        }
    }

    /// Backs off 1 s doubling to 60 s between attempts to bring a member back.
    fn failed_attempt(&mut self, i: usize, e: String) {
        let m = &mut self.members[i];
        m.failures += 1;
        let wait = Duration::from_secs(1 << m.failures.min(6)).min(Duration::from_secs(60));
        m.retry_at = Instant::now() + wait;
        m.state = State::Stopped;
        m.error = Some(e.clone());
        self.event(
            Some(i),
            "error",
            format!("{}: {e}; retrying in {wait:?}", self.members[i].site),
        );
    }

    fn point_frontends(&mut self, primary: Option<SocketAddr>) {
        if self.pointed == Some(primary) {
            return;
        }
        self.pointed = Some(primary);
        for b in &self.wiring.primary {
            // Reset while the old primary is still a member: flows of members that left are
            // out of reach.
            b.reset_flows();
            b.set_members(primary.map(|a| (a, 1, None)).into_iter().collect());
        }
    }

    fn point_replicas(&mut self) {
        let streaming: Vec<SocketAddr> = self
            .members
            .iter()
            .filter(|m| m.is_streaming())
            .map(|m| m.config.listen)
            .collect();
        if streaming != self.replicas_pointed {
            for b in &self.wiring.replicas {
                b.set_members(streaming.iter().map(|a| (*a, 1, None)).collect());
            }
            self.replicas_pointed = streaming;
        }
    }

    /// A planned switchover; the database's state is `switching-over` meanwhile.
    async fn switchover(&mut self, to: &str) -> Result<String, SwitchoverError> {
        self.switching = true;
        self.publish();
        let result = self.switch_over_to(to).await;
        self.switching = false;
        result
    }

    async fn switch_over_to(&mut self, to: &str) -> Result<String, SwitchoverError> {
        let fail = |s: String| Err(SwitchoverError(s));
        let Some(t) = self.members.iter().position(|m| m.site == to) else {
            let names: Vec<&str> = self.members.iter().map(|m| m.site.as_str()).collect();
            return fail(format!(
                "no member in site {to:?} (members: {})",
                names.join(", ")
            ));
        };
        let Some(l) = self.leader.filter(|&l| self.members[l].is_writable()) else {
            return fail("there is no healthy primary to hand over from".into());
        };
        if !self.members[l].here {
            return fail(format!(
                "the primary, {}, runs on its own site's node: ask that node's API",
                self.members[l].site
            ));
        }
        if l == t {
            return fail(format!("{to} is already the primary"));
        }
        let requested = Instant::now();
        // 1. The target must stream and catch up while the primary still takes writes.
        let deadline = requested + Duration::from_secs(30);
        loop {
            // The ticks wait meanwhile: the lease (and the watchdog) are kept here.
            self.renew(l, Instant::now()).await;
            if self.leader != Some(l) || self.members[l].instance.is_none() {
                return fail("the primary lost its lease during the switchover".into());
            }
            self.observe_all(&[l, t]).await;
            let (Some(p), Some(s)) = (&self.members[l].obs, &self.members[t].obs) else {
                return fail("the primary or the target stopped answering".into());
            };
            if !self.members[t].is_streaming() {
                return fail(format!("{to} is not streaming from the primary"));
            }
            if p.lsn.saturating_sub(s.receive_lsn) < 16 * 1024 * 1024 {
                break;
            }
            if Instant::now() >= deadline {
                return fail(format!("{to} did not catch up within 30 s"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // 2. No new writes; the primary stops cleanly, sending its last WAL to the standbys.
        self.point_frontends(None);
        let old = self.members[l].site.clone();
        self.stop_member(l).await;
        let end = match self.local.checkpoint_lsn(&old).await {
            Ok(lsn) => lsn,
            Err(e) => {
                return self
                    .undo_switchover(l, format!("cannot read {old}'s last position: {e}"))
                    .await;
            }
        };
        // 3. The target must have everything the primary wrote. A target that exits or stops
        // answering for `failover_timeout` is given up at once: the old primary comes back.
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut answered = Instant::now();
        loop {
            if self.reap(t).await {
                return self
                    .undo_switchover(l, format!("{to} exited during the switchover"))
                    .await;
            }
            self.observe(t).await;
            if self.members[t].obs.is_some() {
                answered = Instant::now();
            } else if answered.elapsed() >= self.ttl {
                return self
                    .undo_switchover(l, format!("{to} stopped answering for {:?}", self.ttl))
                    .await;
            }
            let have = self.members[t]
                .obs
                .as_ref()
                .map_or(0, |o| o.receive_lsn.max(o.lsn));
            if have >= end {
                break;
            }
            if Instant::now() >= deadline {
                return self
                    .undo_switchover(
                        l,
                        format!(
                            "{to} did not receive everything up to {} within 30 s",
                            format_lsn(end)
                        ),
                    )
                    .await;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // 4. Hand the lease over and promote.
        let store = self.wiring.store.clone();
        if let Err(e) = within(self.ttl, store.release(&self.key, &old, self.term)).await {
            return self
                .undo_switchover(l, format!("cannot release the lease: {e}"))
                .await;
        }
        let lease = match within(self.ttl, store.acquire(&self.key, to, self.ttl)).await {
            Ok(lease) => lease,
            Err(e) => {
                return self
                    .undo_switchover(l, format!("cannot take the lease for {to}: {e}"))
                    .await;
            }
        };
        self.term = lease.term;
        if !self.members[t].here {
            return self.hand_over(l, t, requested).await;
        }
        if let Err(e) = self.promote(t).await {
            // It may have been promoted all the same: stopped for good, it takes no write,
            // and the old primary, which has every write, takes the lease back.
            self.fence(t).await;
            let _ = within(self.ttl, store.release(&self.key, to, self.term)).await;
            return self
                .undo_switchover(l, format!("promoting {to} failed: {e}"))
                .await;
        }
        self.take_lead(t, lease.term);
        self.members[l].state = State::Stopped; // rejoins as a standby through pg_rewind
        let seconds = requested.elapsed().as_secs_f64();
        self.switchovers += 1;
        self.record("switchover", Some(old.clone()), to, seconds);
        let msg = format!(
            "switched over from {old} to {to} (term {}) in {seconds:.2} s; {old} rejoins as a standby",
            self.term
        );
        self.event(Some(t), "switchover", msg.clone());
        Ok(msg)
    }

    /// Cluster mode, a switchover's end: the target's node, seeing the lease handed to its
    /// member, promotes it; this node waits (at most the lease's time to live and 10 s) to
    /// see it writable. Should it not be, the lease lapses and the old primary comes back.
    async fn hand_over(
        &mut self,
        l: usize,
        t: usize,
        requested: Instant,
    ) -> Result<String, SwitchoverError> {
        let (old, to) = (self.members[l].site.clone(), self.members[t].site.clone());
        let deadline = Instant::now() + self.ttl + Duration::from_secs(10);
        loop {
            self.observe(t).await;
            if self.members[t].is_writable() {
                break;
            }
            if Instant::now() >= deadline {
                return self
                    .undo_switchover(l, format!("{to}'s node did not promote it in time"))
                    .await;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.take_lead(t, self.term);
        self.members[l].state = State::Stopped; // rejoins as a standby through pg_rewind
        let seconds = requested.elapsed().as_secs_f64();
        self.switchovers += 1;
        self.record("switchover", Some(old.clone()), &to, seconds);
        let msg = format!(
            "switched over from {old} to {to} (term {}) in {seconds:.2} s: {to}'s node promoted it; {old} rejoins as a standby",
            self.term
        );
        self.event(Some(t), "switchover", msg.clone());
        Ok(msg)
    }

    /// A switchover that cannot finish: the former primary, which has every write, keeps
    /// the lease (or takes it back with the next term) and comes back as primary. Should that
    /// fail too, the ticks restart it in place or fail over as for a crash.
    async fn undo_switchover(&mut self, l: usize, why: String) -> Result<String, SwitchoverError> {
        let site = self.members[l].site.clone();
        if self.shared.is_some() {
            match self.last_primary().await {
                Ok(Some(p)) if p == l => {}
                named => {
                    // The target's node recorded it before promoting: it leads, or will when
                    // its node can; this member rejoins it as a standby.
                    let who = match named {
                        Ok(Some(p)) => self.members[p].site.clone(),
                        Ok(None) => "no member".to_string(),
                        Err(e) => format!("unknown ({e})"),
                    };
                    let message = format!(
                        "switchover not confirmed: {why}; the store names {who} the primary, so {site} stays stopped and rejoins as a standby"
                    );
                    self.event(Some(l), "switchover-abandoned", message.clone());
                    return Err(SwitchoverError(message));
                }
            }
        }
        self.leader = Some(l);
        let mut held = self.hold_lease(l, Instant::now()).await;
        // Cluster mode: a lease handed to another node's member is taken back once it lapses.
        let until = Instant::now() + self.ttl + Duration::from_secs(2);
        while !held && self.shared.is_some() && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(200)).await;
            held = self.hold_lease(l, Instant::now()).await;
        }
        let restarted = if !held {
            Err("cannot take the lease back".to_string())
        } else {
            match self.start_member(l, None) {
                Ok(()) => {
                    self.guard(l, self.lead.renewed);
                    self.wait_ready(l)
                        .await
                        .map(|c| self.members[l].client = Some(c))
                }
                Err(e) => Err(e),
            }
        };
        let message = match restarted {
            Ok(()) => {
                self.observe(l).await;
                self.lead.held(true, Instant::now());
                self.point_frontends(Some(self.members[l].config.listen));
                format!(
                    "switchover abandoned: {why}; {site} stays primary (term {})",
                    self.term
                )
            }
            Err(e) => format!("switchover abandoned: {why}; restarting {site} failed too: {e}"),
        };
        self.event(Some(l), "switchover-abandoned", message.clone());
        Err(SwitchoverError(message))
    }

    /// `tandem restore`'s second half: every member stopped (the primary first), `site`'s
    /// data set aside (`SITE.before-restore-SECS`, never rotated away) and the restored `copy`
    /// put in its place, started as primary under the next term (or the claimed one); the
    /// former primary's data is set aside too (it holds the commits the restore leaves out)
    /// and it is cloned afresh, the other members are rewound (else cloned). Should the swap
    /// fail, the copy and the data go back where they were, and the former primary is started
    /// again (a claim is given back: the ticks take the lost primary up again).
    async fn swap_in(
        &mut self,
        site: &str,
        copy: &std::path::Path,
        claimed: Option<u64>,
    ) -> Result<Swapped, String> {
        let result = self.swap_in_claimed(site, copy, claimed).await;
        if result.is_err() && claimed.is_some() {
            self.unclaim().await;
        }
        result
    }

    async fn swap_in_claimed(
        &mut self,
        site: &str,
        copy: &std::path::Path,
        claimed: Option<u64>,
    ) -> Result<Swapped, String> {
        let Some(i) = self.position(site) else {
            return Err(format!("no member in site {site:?}"));
        };
        self.restorable(i)?;
        if claimed.is_some() && self.claimed.as_ref().map(|c| c.term) != claimed {
            return Err(format!("the claim on the lease for {site} was lost"));
        }
        let stopped = Instant::now();
        self.point_frontends(None);
        let former = match &self.claimed {
            Some(c) => c.former,
            None => self.leader.take(),
        };
        let order: Vec<usize> = former
            .into_iter()
            .chain((0..self.members.len()).filter(|&j| Some(j) != former))
            .collect();
        for j in order {
            if self.members[j].instance.is_some()
                && !matches!(self.members[j].state, State::Cloning | State::Rewinding)
            {
                self.stop_member(j).await;
            }
        }
        let store = self.wiring.store.clone();
        if claimed.is_none()
            && let Some(l) = former
        {
            let holder = self.members[l].site.clone();
            let _ = within(self.ttl, store.release(&self.key, &holder, self.term)).await;
        }
        let stamp = SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let aside = format!("before-restore-{stamp}");
        let set_aside = if self.local.has_data(site) {
            match self.local.set_aside_as(site, &aside) {
                Ok(p) => Some(p),
                Err(e) => return Err(self.restore_abandoned(former, claimed, e.to_string()).await),
            }
        } else {
            None
        };
        let put_back = |local: &Local| {
            if let Some(p) = &set_aside {
                let _ = std::fs::rename(p, local.data(site));
            }
        };
        if let Err(e) = std::fs::rename(copy, self.local.data(site)) {
            put_back(&self.local);
            let why = format!("cannot move the restored copy into place: {e}");
            return Err(self.restore_abandoned(former, claimed, why).await);
        }
        let term = match self.start_restored(i, claimed).await {
            Ok(term) => term,
            Err(e) => {
                // The copy goes back to where it was made (removed by the caller), the data
                // to its place.
                self.stop_member(i).await;
                let _ = std::fs::rename(self.local.data(site), copy);
                put_back(&self.local);
                let why = format!("the restored copy did not start as the primary: {e}");
                return Err(self.restore_abandoned(former, claimed, why).await);
            }
        };
        self.claimed = None;
        let upstream = self.members[i].config.listen;
        let mut former_aside = None;
        for j in (0..self.members.len()).filter(|&j| j != i) {
            self.members[j].failures = 0;
            let other = self.members[j].site.clone();
            if !self.local.has_data(&other)
                || self.is_cold(j)
                || matches!(self.members[j].state, State::Cloning | State::Rewinding)
            {
                continue;
            }
            if Some(j) == former {
                // Its commits after the restored point are nowhere else: kept, and cloned
                // afresh rather than rewound over them.
                match self.local.set_aside_as(&other, &aside) {
                    Ok(p) => former_aside = Some(p),
                    Err(e) => self.event(
                        Some(j),
                        "error",
                        format!("cannot set {other}'s data aside: {e}; left stopped"),
                    ),
                }
                self.members[j].state = State::Stopped;
            } else if self.members[j].outage.is_none() {
                self.spawn_work(j, State::Rewinding, upstream);
            }
        }
        let downtime = stopped.elapsed();
        let from = former.map(|l| self.members[l].site.clone());
        self.restores += 1;
        self.record("restore", from.clone(), site, downtime.as_secs_f64());
        let kept: Vec<String> = [
            (site.to_string(), &set_aside),
            (from.unwrap_or_default(), &former_aside),
        ]
        .into_iter()
        .filter_map(|(s, p)| p.as_ref().map(|p| format!("{s}'s in {}", p.display())))
        .collect();
        self.event(
            Some(i),
            "restore",
            format!(
                "restored {site} from the backups and made it the primary (term {term}); the database was down {:.2} s; former data: {}",
                downtime.as_secs_f64(),
                if kept.is_empty() { "none".to_string() } else { kept.join(", ") }
            ),
        );
        Ok(Swapped {
            set_aside,
            former_set_aside: former_aside,
            term,
            downtime,
            primary: Primary {
                site: site.to_string(),
                listen: upstream,
                data: self.local.data(site),
            },
        })
    }

    /// `site`'s member can take a restored copy now: every member is this process's, it is
    /// not being cloned or rewound, nor under an outage drill.
    fn restorable(&self, i: usize) -> Result<(), String> {
        let site = &self.members[i].site;
        if self.members.iter().any(|m| !m.here) {
            return Err("a restore needs every member on this node (single-process mode)".into());
        }
        if matches!(self.members[i].state, State::Cloning | State::Rewinding) {
            return Err(format!(
                "{site}'s member is being {} now; try again once it is done",
                self.members[i].state.name()
            ));
        }
        if let Some(why) = &self.members[i].outage {
            return Err(format!("{site} is under an outage drill ({why})"));
        }
        Ok(())
    }

    /// The restored copy in `i`'s directory started as the primary: the lease taken (or the
    /// claim renewed), the member started, ready, made a primary for the others.
    async fn start_restored(&mut self, i: usize, claimed: Option<u64>) -> Result<u64, String> {
        let site = self.members[i].site.clone();
        let store = self.wiring.store.clone();
        let term = match claimed {
            Some(term) => within(self.ttl, store.renew(&self.key, &site, term, self.ttl))
                .await
                .map(|_| term),
            None => within(self.ttl, store.acquire(&self.key, &site, self.ttl))
                .await
                .map(|l| l.term),
        }
        .map_err(|e| format!("cannot take the lease for {site}: {e}"))?;
        self.term = term;
        self.start_member(i, None)?;
        let client = self.wait_ready(i).await?;
        self.members[i].client = Some(client);
        if let Err(e) = self.promoted(i).await {
            let _ = within(self.ttl, store.release(&self.key, &site, term)).await;
            return Err(e);
        }
        self.take_lead(i, term);
        self.lead.held(true, Instant::now());
        self.observe(i).await;
        Ok(term)
    }

    /// A failover by restore: `Take` the lapsed lease for `site` for [`CLAIM_TTL`] (refused
    /// while a primary answers, or while a standby can be promoted: the database's own
    /// failover loses nothing), `Renew` it while the copy is made, or `Release` it (the
    /// restore failed: the ticks take the lost primary up again). While a claim stands the
    /// driver neither fails over nor restarts anything of the lost primary. The term.
    async fn claim(&mut self, site: &str, op: ClaimOp) -> Result<u64, Unclaimed> {
        let store = self.wiring.store.clone();
        let refuse = |why: String| Err(Unclaimed(why, None));
        match op {
            ClaimOp::Release => {
                self.unclaim().await;
                return Ok(0);
            }
            ClaimOp::Renew => {
                let Some(c) = &self.claimed else {
                    return refuse(format!("the claim on the lease for {site} was lost"));
                };
                let term = c.term;
                return within(self.ttl, store.renew(&self.key, site, term, CLAIM_TTL))
                    .await
                    .map(|_| term)
                    .map_err(|e| Unclaimed(format!("the claim on the lease was lost: {e}"), None));
            }
            ClaimOp::Check => {
                let Some(i) = self.position(site) else {
                    return refuse(format!("no member in site {site:?}"));
                };
                return self
                    .restorable(i)
                    .map(|()| 0)
                    .map_err(|why| Unclaimed(why, None));
            }
            ClaimOp::Take => {}
        }
        let Some(i) = self.position(site) else {
            return refuse(format!("no member in site {site:?}"));
        };
        if let Err(why) = self.restorable(i) {
            return refuse(why);
        }
        if self.claimed.is_some() {
            return refuse("a restore is already under way".into());
        }
        if let Some(l) = self.leader.filter(|&l| self.members[l].is_writable()) {
            return refuse(format!(
                "{} is the primary and answers: a failover by restore is only for a lost primary",
                self.members[l].site
            ));
        }
        if let Ok(c) = self.candidate() {
            return refuse(format!(
                "{} can be promoted without loss: the database fails over by itself",
                self.members[c].site
            ));
        }
        let lease = within(self.ttl, store.acquire(&self.key, site, CLAIM_TTL))
            .await
            .map_err(|e| match e {
                StoreError::Held { holder, left, .. } => Unclaimed(
                    format!(
                        "the lease is still held by {holder}: a restore waits until it has lapsed"
                    ),
                    Some(left),
                ),
                e => Unclaimed(format!("cannot take the lease for {site}: {e}"), None),
            })?;
        // Nothing of the lost primary is restarted while the claim stands.
        let former = self.leader.take();
        self.term = lease.term;
        self.claimed = Some(Claim {
            site: site.to_string(),
            term: lease.term,
            former,
        });
        self.point_frontends(None);
        self.event(
            Some(i),
            "restore-claim",
            format!(
                "the lease taken for {site} (term {}): restoring it from the backups as the primary",
                lease.term
            ),
        );
        Ok(lease.term)
    }

    /// The claim given back: the lease released, the lost primary the ticks' again.
    async fn unclaim(&mut self) {
        if let Some(c) = self.claimed.take() {
            let store = self.wiring.store.clone();
            let _ = within(self.ttl, store.release(&self.key, &c.site, c.term)).await;
            if self.leader.is_none() {
                self.leader = c.former;
            }
        }
    }

    /// A restore that could not put its copy in place: the former primary, its data
    /// untouched, takes the lease back and starts again; the ticks bring the standbys back.
    /// Under a claim (the primary lost) nothing is restarted here: the claim is given back
    /// and the ticks take the lost primary up as they would have.
    async fn restore_abandoned(
        &mut self,
        former: Option<usize>,
        claimed: Option<u64>,
        why: String,
    ) -> String {
        let Some(l) = former.filter(|_| claimed.is_none()) else {
            let message = format!("restore abandoned: {why}");
            self.event(None, "error", message.clone());
            return message;
        };
        let site = self.members[l].site.clone();
        self.leader = Some(l);
        let restarted = if self.hold_lease(l, Instant::now()).await {
            match self.start_member(l, None) {
                Ok(()) => self.wait_ready(l).await.map(|c| {
                    self.members[l].client = Some(c);
                    self.point_frontends(Some(self.members[l].config.listen));
                }),
                Err(e) => Err(e),
            }
        } else {
            Err("cannot take the lease back".into())
        };
        let message = match restarted {
            Ok(()) => format!(
                "restore abandoned: {why}; {site} stays primary (term {})",
                self.term
            ),
            Err(e) => format!("restore abandoned: {why}; restarting {site} failed too: {e}"),
        };
        self.event(Some(l), "error", message.clone());
        message
    }

    /// Stops a member (see [`shut_down`]), waiting for it.
    async fn stop_member(&mut self, i: usize) {
        self.unguard(i);
        let m = &mut self.members[i];
        m.client = None;
        m.obs = None;
        if let Some(inst) = m.instance.take() {
            shut_down(inst).await;
        }
        m.state = State::Stopped;
    }

    /// The primary first: its fast shutdown ends its sessions (no commit is left waiting for
    /// a standby already gone) and sends its last record, the shutdown checkpoint, to the
    /// standbys streaming from it, which are given up to [`STOP_CATCH_UP`] to replay it before
    /// they stop too. Each stop is an event (`stopped`), in that order.
    async fn stop_all(&mut self) {
        self.point_frontends(None);
        let standbys: Vec<usize> = (0..self.members.len())
            .filter(|&i| Some(i) != self.leader && self.members[i].instance.is_some())
            .collect();
        // Other nodes' standbys too: they are handed the lease once they have every record.
        let streaming: Vec<usize> = (0..self.members.len())
            .filter(|&i| Some(i) != self.leader && self.members[i].is_streaming())
            .collect();
        let mut end = None;
        let mut released = None;
        if let Some(l) = self.leader.filter(|&l| self.members[l].instance.is_some()) {
            let site = self.members[l].site.clone();
            self.stop_member(l).await;
            end = self.local.checkpoint_lsn(&site).await.ok();
            self.event(
                Some(l),
                "stopped",
                format!(
                    "{site} stopped (primary; last record {})",
                    end.map_or_else(|| "unknown".into(), format_lsn)
                ),
            );
        }
        if let Some(end) = end {
            self.wait_replayed(&streaming, end).await;
            // Cluster mode: the lease is given up at once, so another node's standby, which
            // has replayed the last record, is promoted without waiting for it to lapse.
            if let (Some(_), Some(l)) = (&self.shared, self.leader) {
                let site = self.members[l].site.clone();
                let release = self.wiring.store.release(&self.key, &site, self.term);
                released = Some(within(self.ttl, release).await);
            }
        }
        if let Some(r) = released {
            let message = match r {
                Ok(()) => "lease released: another node's standby may be promoted now".to_string(),
                Err(e) => format!(
                    "cannot release the lease ({e}): it lapses in {:?}",
                    self.ttl
                ),
            };
            self.event(self.leader, "lease", message);
        }
        for i in standbys {
            let replayed = self.members[i].obs.as_ref().map(|o| o.lsn);
            self.stop_member(i).await;
            let site = self.members[i].site.clone();
            let msg = match replayed {
                Some(lsn) => format!(
                    "{site} stopped (standby; replayed up to {})",
                    format_lsn(lsn)
                ),
                None => format!("{site} stopped (standby)"),
            };
            self.event(Some(i), "stopped", msg);
        }
    }

    /// Waits (at most [`STOP_CATCH_UP`]) until each of `which` that answers has replayed the
    /// record at `end`.
    async fn wait_replayed(&mut self, which: &[usize], end: u64) {
        let deadline = Instant::now() + STOP_CATCH_UP;
        loop {
            self.observe_all(which).await;
            let behind = which.iter().any(|&i| {
                self.members[i]
                    .obs
                    .as_ref()
                    .is_some_and(|o| o.in_recovery && o.lsn <= end)
            });
            if !behind || Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn publish(&self) {
        let leader_obs = self.leader.and_then(|l| self.members[l].obs.clone());
        let members = self
            .members
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let o = m.obs.as_ref();
                let replica = leader_obs
                    .as_ref()
                    .and_then(|p| p.replicas.iter().find(|r| r.name == m.site));
                let role = match o {
                    Some(o) if !o.in_recovery => "primary",
                    Some(_) => "standby",
                    None if Some(i) == self.leader => "primary",
                    None => "none",
                };
                let state = match (m.state, o) {
                    (State::Running, Some(o)) if o.in_recovery && m.is_streaming() => "streaming",
                    (State::Stopped, _) if self.is_cold(i) && m.instance.is_none() => "cold",
                    (s, _) => s.name(),
                };
                MemberView {
                    site: m.site.clone(),
                    listen: m.config.listen.to_string(),
                    health: m.config.health.to_string(),
                    role: role.into(),
                    state: state.into(),
                    pid: m.instance.as_ref().and_then(|x| x.pid()),
                    lsn: o.map(|o| format_lsn(o.lsn)),
                    receive_lsn: o
                        .filter(|o| o.in_recovery)
                        .map(|o| format_lsn(o.receive_lsn)),
                    lag_bytes: match (o, &leader_obs) {
                        (Some(o), Some(p)) if o.in_recovery => Some(p.lsn.saturating_sub(o.lsn)),
                        _ => None,
                    },
                    lag_seconds: replica.map(|r| r.replay_lag_seconds),
                    timeline: o.map(|o| o.timeline),
                    sync_state: replica.map(|r| r.sync_state.clone()),
                    error: m.error.clone(),
                    data_dir: if m.here {
                        self.local.data(&m.site).display().to_string()
                    } else {
                        String::new()
                    },
                    log: if m.here {
                        self.local.log(&m.site).display().to_string()
                    } else {
                        String::new()
                    },
                }
            })
            .collect::<Vec<_>>();
        let primary = self.leader.filter(|&l| self.members[l].is_writable());
        let standbys_streaming = self.members.iter().filter(|m| m.is_streaming()).count();
        // Cold members are meant to be stopped: not a degradation.
        let expected = (0..self.members.len())
            .filter(|&i| !self.is_cold(i))
            .count();
        let state = if self.failed.is_some() {
            "failed"
        } else if !self.bootstrapped {
            "bootstrapping"
        } else if self.switching {
            "switching-over"
        } else if self.claimed.is_some() {
            "restoring"
        } else if primary.is_some() {
            let sync_missing =
                self.config.replication.is_sync() && self.sync_standby.is_none() && expected > 1;
            if sync_missing || standbys_streaming + 1 < expected {
                "degraded"
            } else {
                "healthy"
            }
        } else if self.lead.restarting() {
            "restarting"
        } else if self.lead.lost_since.is_some() {
            "primary-lost"
        } else {
            "no-primary"
        };
        let view = View {
            name: self.config.name.to_string(),
            replication: self.config.replication.to_string(),
            term: self.term,
            primary: primary.map(|l| self.members[l].site.clone()),
            sync_standby: self.sync_standby.map(|s| self.members[s].site.clone()),
            state: state.into(),
            frontends: self
                .config
                .frontends
                .iter()
                .map(|f| format!("{} {}", f.site, f.address))
                .collect(),
            members,
            last_change: self.last_change.clone(),
            error: self.failed.clone(),
            failovers: self.failovers,
            switchovers: self.switchovers,
            restores: self.restores,
            backup: None,
        };
        *self.cluster.view.lock().unwrap_or_else(|p| p.into_inner()) = view;
    }
}

/// Wakes `changed` whenever the lease record `key` changes, until `stop`; starts over (after
/// a second) when the watch ends, the ticks covering the gap.
async fn watch_lease(
    store: Arc<dyn Store>,
    key: String,
    changed: Arc<tokio::sync::Notify>,
    mut stop: watch::Receiver<bool>,
) {
    while !*stop.borrow() {
        let watched = async {
            let (_, revision) = store.list(&key).await?;
            let mut w = store.watch(&key, revision).await?;
            while let Some(Ok(_)) = w.recv().await {
                changed.notify_one();
            }
            Ok::<(), StoreError>(())
        };
        tokio::select! {
            _ = watched => {}
            _ = stop.changed() => return,
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.changed() => return,
        }
    }
}

/// A store call bounded to a quarter of the lease `ttl` (at least 250 ms): a store that does
/// not answer (etcd electing a leader, cut off) must not hold up the ticks that renew and
/// fence in time.
async fn within<T>(
    ttl: Duration,
    call: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    let bound = (ttl / 4).max(Duration::from_millis(250));
    tokio::time::timeout(bound, call).await.unwrap_or_else(|_| {
        Err(StoreError::Unavailable(format!(
            "no answer within {bound:?}"
        )))
    })
}

/// Promotes a standby, waiting for the end of it (at most 30 s).
const PROMOTE: &str = "SELECT pg_promote(true, 30)";

/// Fast shutdown (SIGINT: clients disconnected, a clean checkpoint), killed after 30 s.
async fn shut_down(mut inst: Box<dyn Instance>) {
    if let Some(pid) = inst.pid() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGINT,
        );
    }
    if tokio::time::timeout(Duration::from_secs(30), inst.wait())
        .await
        .is_err()
    {
        inst.stop(Duration::ZERO).await;
    }
}

/// One observation of a member, through `client` when it has one, else a new connection;
/// with `fresh`, a new connection must also be accepted (bounded like every question). The
/// connection comes back only while it works.
async fn ask(
    addr: SocketAddr,
    password: &str,
    client: Option<Client>,
    fresh: bool,
) -> (Option<Client>, Result<Observation, Miss>) {
    let client = client.filter(|c| !c.is_closed());
    // The session is dropped too when a fresh connection is not accepted: until one is,
    // every tick tries one.
    if fresh
        && client.is_some()
        && let Err(miss) = connect_bounded(addr, password).await
    {
        return (None, Err(miss));
    }
    let client = match client {
        Some(c) => c,
        None => match connect_bounded(addr, password).await {
            Ok(c) => c,
            Err(miss) => return (None, Err(miss)),
        },
    };
    match tokio::time::timeout(SQL_TIMEOUT, observe::observe(&client)).await {
        Ok(Ok(o)) => (Some(client), Ok(o)),
        Ok(Err(e)) => (None, Err(Miss::failed(e))),
        Err(_) => (
            None,
            Err(Miss::timed_out(format!(
                "no answer to SQL within {SQL_TIMEOUT:?}"
            ))),
        ),
    }
}

/// A new connection to a member, within [`SQL_TIMEOUT`].
async fn connect_bounded(addr: SocketAddr, password: &str) -> Result<Client, Miss> {
    match tokio::time::timeout(SQL_TIMEOUT, observe::connect(addr, password)).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(Miss::failed(e)),
        Err(_) => Err(Miss::timed_out(format!(
            "a new connection got no answer within {SQL_TIMEOUT:?} (the postmaster hangs?)"
        ))),
    }
}

/// Why an observation of a member came to nothing.
struct Miss {
    why: String,
    /// No answer in time (busy or hung), rather than a refusal or an error.
    timed_out: bool,
}

impl Miss {
    fn failed(why: String) -> Self {
        Miss {
            why,
            timed_out: false,
        }
    }

    fn timed_out(why: String) -> Self {
        Miss {
            why,
            timed_out: true,
        }
    }

    /// Whether the member counts as down, after `late` late answers in a row, when its last
    /// observation `stands` (it is running and was observed): a refusal or an error at once,
    /// a late answer only past [`LATE_TOLERATED`] in a row.
    fn is_down(&self, late: u32, stands: bool) -> bool {
        !self.timed_out || !stands || late >= LATE_TOLERATED
    }
}

/// A physical replication slot on the primary for every other member; `fresh` drops old ones
/// first (a promoted standby's copies are not positioned for its new history).
async fn ensure_slots(client: &Client, sites: &[String], fresh: bool) -> Result<(), String> {
    for site in sites {
        let slot = observe::literal(&local::slot(site));
        if fresh {
            let drop = format!(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = {slot} AND NOT active"
            );
            observe::execute(client, &[&drop]).await?;
        }
        let create = format!(
            "SELECT pg_create_physical_replication_slot({slot}, true) WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = {slot})"
        );
        observe::execute(client, &[&create]).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_late_answer_is_a_busy_machine_a_second_or_a_refusal_is_down() {
        let late = Miss::timed_out("late".into());
        assert!(!late.is_down(0, true));
        assert!(late.is_down(1, true), "twice in a row");
        assert!(late.is_down(0, false), "nothing stands to keep");
        assert!(Miss::failed("refused".into()).is_down(0, true));
    }
}
