//! Backups of one database with pgBackRest (Debian's `pgbackrest`): its configuration, the
//! stanza, base backups (on request and on a schedule), the WAL archive's health, and restore
//! drills into a scratch directory.
//!
//! Tandem writes `STATE_DIR/databases/DB/pgbackrest.conf` (stanza = the database's name,
//! `repo1-path` = the repository, `pg1-path`/`pg1-port` = the current primary's) and starts
//! every member with `archive_mode = on` and an `archive_command` that pushes with that file
//! and the member's own data directory, so archiving carries on from whichever member is
//! primary after a failover (pgBackRest keeps every timeline's WAL and history files).
//! pgBackRest runs as the database user with the members' clean environment; it reaches the
//! primary over TCP (`PGHOST`; no password on any command line: `PGPASSFILE`).
//!
//! What is decided is pure ([`Schedule`], [`archive_lag`]); [`Backups`] carries it out.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use event::{Event, Source};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::local::{self, Error, Local, shell_quote};
use crate::observe;

/// The program Tandem runs for backups, looked for on `PATH` then in `/usr/bin`.
pub const PGBACKREST: &str = "pgbackrest";
/// WAL waiting in `pg_wal` beyond this is dropped by `archive-push` (reported as archived, a
/// warning in PostgreSQL's log) so a broken repository can never fill the primary's disk and
/// stop its commits (pgBackRest's `archive-push-queue-max`). Point-in-time restore has a gap
/// from then until the next full backup.
pub const ARCHIVE_QUEUE_MAX: &str = "1GiB";
/// After a failed scheduled backup or drill, how long before the next attempt.
pub const RETRY_AFTER: Duration = Duration::from_secs(300);
/// How long one backup, restore or verify may take before it is stopped.
const OPERATION_LIMIT: Duration = Duration::from_secs(6 * 3600);
/// How long a restored scratch member has to finish recovery and answer as writable.
const DRILL_READY: Duration = Duration::from_secs(1800);

/// A backup's type, as pgBackRest names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Every file.
    Full,
    /// The files changed since the last full backup.
    Diff,
    /// The files changed since the last backup of any type.
    Incr,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Full => "full",
            Kind::Diff => "diff",
            Kind::Incr => "incr",
        }
    }

    /// `full`, `diff` (or `differential`), `incr` (or `incremental`).
    pub fn parse(s: &str) -> Option<Kind> {
        match s {
            "full" => Some(Kind::Full),
            "diff" | "differential" => Some(Kind::Diff),
            "incr" | "incremental" => Some(Kind::Incr),
            _ => None,
        }
    }
}

/// When scheduled work is due, from the last results (sans IO).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Schedule {
    /// Between full backups; `None`: only on request.
    pub full: Option<Duration>,
    /// Between differential backups (counted from the newest full or differential one).
    pub differential: Option<Duration>,
    /// Between restore drills.
    pub drill: Option<Duration>,
    /// After a failure, before trying again.
    pub retry: Duration,
}

impl Schedule {
    pub fn of(config: &model::Backup) -> Schedule {
        Schedule {
            full: config.full,
            differential: config.differential,
            drill: config.drill,
            retry: RETRY_AFTER,
        }
    }

    /// The next backup and when it is due (in the past: now): a full backup when there is
    /// none, else whichever of the full and the differential schedule comes first (the full
    /// one on a tie). A failure at `failed` holds everything back for [`Schedule::retry`].
    /// `last_full` and `last_diff` are the stop times of the newest such backups.
    pub fn next_backup(
        &self,
        last_full: Option<SystemTime>,
        last_diff: Option<SystemTime>,
        failed: Option<SystemTime>,
    ) -> Option<(Kind, SystemTime)> {
        let full = self
            .full
            .map(|every| last_full.map_or(UNIX_EPOCH, |t| t + every));
        let diff = match (self.differential, last_full) {
            (Some(every), Some(f)) => Some(last_diff.map_or(f, |d| d.max(f)) + every),
            _ => None,
        };
        let next = match (full, diff) {
            (Some(f), Some(d)) if d < f => Some((Kind::Diff, d)),
            (Some(f), _) => Some((Kind::Full, f)),
            (None, Some(d)) => Some((Kind::Diff, d)),
            (None, None) => None,
        }?;
        Some(self.hold(next.0, next.1, failed))
    }

    /// When the next restore drill is due: `drill` after the last one, the first as soon as a
    /// backup exists.
    pub fn next_drill(
        &self,
        last: Option<SystemTime>,
        have_backup: bool,
        failed: Option<SystemTime>,
    ) -> Option<SystemTime> {
        let every = self.drill?;
        if !have_backup {
            return None;
        }
        let due = last.map_or(UNIX_EPOCH, |t| t + every);
        Some(self.hold((), due, failed).1)
    }

    fn hold<K>(&self, kind: K, due: SystemTime, failed: Option<SystemTime>) -> (K, SystemTime) {
        match failed {
            Some(f) if f + self.retry > due => (kind, f + self.retry),
            _ => (kind, due),
        }
    }
}

/// What `pg_stat_archiver` says on the primary.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Archiver {
    pub archived_count: i64,
    pub last_archived_wal: Option<String>,
    #[serde(with = "event::opt_time", default)]
    pub last_archived_at: Option<SystemTime>,
    pub failed_count: i64,
    pub last_failed_wal: Option<String>,
    #[serde(with = "event::opt_time", default)]
    pub last_failed_at: Option<SystemTime>,
    /// The segment being written now (`pg_walfile_name(pg_current_wal_lsn())`).
    pub current_wal: String,
    /// `archive_mode` as the primary runs it.
    pub archive_mode: String,
}

impl Archiver {
    /// The last attempt failed (the archive is falling behind).
    pub fn failing(&self) -> bool {
        self.failed_count > 0
            && self
                .last_failed_at
                .is_some_and(|f| self.last_archived_at.is_none_or(|a| f > a))
    }
}

/// How far the WAL archive is behind, in seconds (sans IO): 0 while every completed segment
/// is archived (the last archived one is the one before the segment being written, or a
/// history file and nothing has failed since); otherwise the time since the last segment was
/// archived, or since `first_behind` (when this archiver was first seen behind) when none
/// ever was.
pub fn archive_lag(a: &Archiver, now: SystemTime, first_behind: Option<SystemTime>) -> f64 {
    let since = |t: Option<SystemTime>| {
        t.or(first_behind).map_or(0.0, |t| {
            now.duration_since(t).unwrap_or_default().as_secs_f64()
        })
    };
    if a.failing() {
        return since(a.last_archived_at);
    }
    let current = segment_index(&a.current_wal);
    let last = a.last_archived_wal.as_deref().and_then(segment_index);
    match (current, last, a.last_archived_wal.as_deref()) {
        (Some(c), Some(l), _) if c > l + 1 => since(a.last_archived_at),
        (Some(c), None, None) if c > 1 => since(None),
        _ => 0.0,
    }
}

/// A WAL segment's position (ignoring its timeline): `000000010000000A000000FF` (optionally
/// `.partial` or `.XXXXXXXX.backup`) → `0xA * 256 + 0xFF` for 16 MB segments.
pub fn segment_index(name: &str) -> Option<u64> {
    let base = name.get(..24)?;
    if !base.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let log = u64::from_str_radix(&base[8..16], 16).ok()?;
    let seg = u64::from_str_radix(&base[16..24], 16).ok()?;
    Some(log * 256 + seg)
}

/// One backup in the repository, from `pgbackrest info --output=json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackupSet {
    pub label: String,
    /// `full`, `diff` or `incr`.
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(with = "event::time")]
    pub started: SystemTime,
    #[serde(with = "event::time")]
    pub stopped: SystemTime,
    /// The database's size at the backup, in bytes.
    pub size_bytes: u64,
    /// What this backup stores in the repository (compressed, only changed files), in bytes.
    pub repository_bytes: u64,
    /// The WAL segments needed to make it consistent.
    pub wal_start: Option<String>,
    pub wal_stop: Option<String>,
    pub lsn_start: Option<String>,
    pub lsn_stop: Option<String>,
    /// The backup it depends on (differential and incremental backups).
    pub prior: Option<String>,
}

/// The backups of a stanza (oldest first) and its archived WAL range (oldest, newest segment).
pub type Info = (Vec<BackupSet>, Option<(String, String)>);

/// Parses `pgbackrest info --output=json` for one stanza: its backups (oldest first) and the
/// archived WAL range (`min`, `max` of the newest database id).
pub fn parse_info(json: &str, stanza: &str) -> Result<Info, String> {
    #[derive(Deserialize)]
    struct Stanza {
        name: String,
        #[serde(default)]
        backup: Vec<RawBackup>,
        #[serde(default)]
        archive: Vec<RawArchive>,
    }
    #[derive(Deserialize)]
    struct RawArchive {
        min: Option<String>,
        max: Option<String>,
    }
    #[derive(Deserialize)]
    struct RawBackup {
        label: String,
        #[serde(rename = "type")]
        kind: String,
        timestamp: Stamps,
        info: Sizes,
        archive: Option<Range>,
        lsn: Option<Range>,
        prior: Option<String>,
        #[serde(default)]
        error: bool,
    }
    #[derive(Deserialize)]
    struct Stamps {
        start: u64,
        stop: u64,
    }
    #[derive(Deserialize)]
    struct Sizes {
        size: u64,
        repository: Repo,
    }
    #[derive(Deserialize)]
    struct Repo {
        delta: u64,
    }
    #[derive(Deserialize)]
    struct Range {
        start: Option<String>,
        stop: Option<String>,
    }
    let stanzas: Vec<Stanza> =
        serde_json::from_str(json).map_err(|e| format!("pgbackrest info: {e}"))?;
    let Some(s) = stanzas.into_iter().find(|s| s.name == stanza) else {
        return Ok((Vec::new(), None));
    };
    let at = |secs: u64| UNIX_EPOCH + Duration::from_secs(secs);
    let sets = s
        .backup
        .into_iter()
        .filter(|b| !b.error)
        .map(|b| BackupSet {
            label: b.label,
            kind: b.kind,
            started: at(b.timestamp.start),
            stopped: at(b.timestamp.stop),
            size_bytes: b.info.size,
            repository_bytes: b.info.repository.delta,
            wal_start: b.archive.as_ref().and_then(|a| a.start.clone()),
            wal_stop: b.archive.as_ref().and_then(|a| a.stop.clone()),
            lsn_start: b.lsn.as_ref().and_then(|l| l.start.clone()),
            lsn_stop: b.lsn.as_ref().and_then(|l| l.stop.clone()),
            prior: b.prior,
        })
        .collect();
    let wal = s
        .archive
        .into_iter()
        .last()
        .and_then(|a| Some((a.min?, a.max?)));
    Ok((sets, wal))
}

/// The result of a restore drill.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DrillReport {
    /// When it started (RFC 3339).
    pub started: String,
    /// Whether the restored copy answered (and the table, when named, could be counted).
    pub ok: bool,
    pub error: Option<String>,
    /// `latest`, or the time restored to.
    pub target: String,
    /// The newest backup when the drill started (pgBackRest picks the one the target needs).
    pub backup: Option<String>,
    /// Where it was restored (removed afterwards) and the port it answered on.
    pub directory: String,
    pub port: u16,
    /// `pgbackrest restore`, in seconds.
    pub restore_seconds: f64,
    /// From starting the restored copy to its answering as a writable server (WAL replayed).
    pub start_seconds: f64,
    /// Restore plus start: the time to a usable copy.
    pub rto_seconds: f64,
    /// `drill_table`, and its rows in the restored copy.
    pub table: Option<String>,
    pub rows: Option<i64>,
    /// The newest commit in the restored copy and on the primary when the drill started
    /// (`track_commit_timestamp`), RFC 3339.
    pub newest_restored_commit: Option<String>,
    pub newest_acknowledged_commit: Option<String>,
    /// How much acknowledged work the restored copy lacks, in seconds of commits (0 when it
    /// has the primary's newest commit); `None` when either time is unknown, or with a target
    /// time.
    pub rpo_seconds: Option<f64>,
}

/// Backups as `/v1/databases` shows them.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct BackupView {
    pub repository: String,
    pub config: String,
    /// The stanza exists (created by Tandem once a primary answered).
    pub ready: bool,
    /// Backups in the repository, oldest first, as of the last look.
    pub backups: Vec<BackupSet>,
    /// The archived WAL range (oldest, newest segment).
    pub wal_min: Option<String>,
    pub wal_max: Option<String>,
    /// The newest backup's stop time.
    #[serde(with = "event::opt_time", default)]
    pub last_success: Option<SystemTime>,
    /// Bytes under the repository directory.
    pub repository_bytes: Option<u64>,
    pub archiver: Option<Archiver>,
    /// See [`archive_lag`].
    pub archive_lag_seconds: Option<f64>,
    /// The next scheduled backup: its type and when.
    pub next_backup: Option<String>,
    #[serde(with = "event::opt_time", default)]
    pub next_backup_at: Option<SystemTime>,
    #[serde(with = "event::opt_time", default)]
    pub next_drill_at: Option<SystemTime>,
    /// What runs now (`full backup`, `restore drill`, …).
    pub running: Option<String>,
    /// The last failure (a backup, the stanza, the archive), cleared by a success.
    pub last_error: Option<String>,
    pub last_drill: Option<DrillReport>,
}

/// Where the primary is, for the operations that need it.
#[derive(Clone, Debug)]
pub struct Primary {
    pub site: String,
    pub listen: SocketAddr,
    pub data: PathBuf,
}

/// A database's backups: the pgBackRest configuration, one operation at a time, the status.
#[derive(Debug)]
pub struct Backups {
    pub stanza: String,
    pub config: model::Backup,
    local: Arc<Local>,
    exe: PathBuf,
    /// `STATE_DIR/databases/DB/pgbackrest.conf`.
    pub conf: PathBuf,
    /// Absolute.
    pub repository: PathBuf,
    /// One pgBackRest operation at a time (pgBackRest locks too; this queues instead).
    busy: tokio::sync::Mutex<()>,
    /// Cluster mode: the repository is one path every member's node mounts, and pgBackRest's
    /// locks live in it (`REPO/lock`), so two nodes never back up at once.
    shared: bool,
    view: Mutex<BackupView>,
    /// The primary the configuration names now.
    configured: Mutex<Option<(PathBuf, u16)>>,
    /// The last scheduled backup or drill that failed, and when.
    failed_backup: Mutex<Option<SystemTime>>,
    failed_drill: Mutex<Option<SystemTime>>,
    first_behind: Mutex<Option<SystemTime>>,
    /// The last error event of each kind (reported once until resolved).
    reported: Mutex<std::collections::HashMap<String, String>>,
    stanza_tried: Mutex<Option<tokio::time::Instant>>,
    events: broadcast::Sender<Event>,
}

/// How often `stanza-create` is tried again while it fails (a repository missing, unwritable).
pub const STANZA_RETRY: Duration = Duration::from_secs(10);

/// `PATH`'s `pgbackrest`, else `/usr/bin/pgbackrest`.
pub fn find_pgbackrest() -> Result<PathBuf, Error> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin")])
        .map(|d| d.join(PGBACKREST))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            Error(
                "pgBackRest is not installed ([database.backup] needs it)\n  help: install Debian's `pgbackrest` package"
                    .into(),
            )
        })
}

impl Backups {
    /// Tells `local` how members archive (before any starts): `archive_command` pushes with
    /// this database's configuration file.
    pub fn prepare(stanza: &str, config: &model::Backup, local: &mut Local) -> Result<(), Error> {
        let exe = find_pgbackrest()?;
        let conf = local.dir.join("pgbackrest.conf");
        local.archive = Some(local::Archive {
            command: format!(
                "{} --config={} --stanza={stanza}",
                shell_quote(&exe.to_string_lossy()),
                shell_quote(&conf.to_string_lossy())
            ),
            timeout: config.archive_timeout,
        });
        Ok(())
    }

    /// Checks pgBackRest is installed, writes its configuration (no primary yet) and the
    /// password file it connects with (`backup.pgpass`, mode 0600).
    pub fn open(
        stanza: &str,
        config: model::Backup,
        local: Arc<Local>,
        events: broadcast::Sender<Event>,
        shared: bool,
    ) -> Result<Backups, Error> {
        let exe = find_pgbackrest()?;
        let repository = std::path::absolute(&config.repository)
            .map_err(|e| Error(format!("repository {}: {e}", config.repository.display())))?;
        let logs = local.dir.join("pgbackrest");
        std::fs::create_dir_all(&logs).map_err(|e| Error(format!("{}: {e}", logs.display())))?;
        if let Some((uid, gid)) = local.user {
            local::chown(&logs, uid, gid)?;
        }
        local::write_private(
            &local.dir.join("backup.pgpass"),
            &format!("*:*:*:{}:{}\n", local::SUPERUSER, local.password),
            local.user,
        )?;
        let conf = local.dir.join("pgbackrest.conf");
        let b = Backups {
            stanza: stanza.to_string(),
            view: Mutex::new(BackupView {
                repository: repository.display().to_string(),
                config: conf.display().to_string(),
                ..BackupView::default()
            }),
            config,
            local,
            exe,
            conf,
            repository,
            busy: tokio::sync::Mutex::new(()),
            shared,
            configured: Mutex::new(None),
            failed_backup: Mutex::new(None),
            failed_drill: Mutex::new(None),
            first_behind: Mutex::new(None),
            reported: Mutex::new(std::collections::HashMap::new()),
            stanza_tried: Mutex::new(None),
            events,
        };
        b.write_conf(None)?;
        Ok(b)
    }

    /// After a drill was cut short (Tandem stopping): its restored copy's processes killed.
    /// The directory stays, so the next drill refuses until someone looks.
    pub fn abandon(&self) {
        let running = lock(&self.view).running.clone();
        let postgres = self.local.bins.join("postgres");
        match running.as_deref() {
            Some("restore drill") => {
                crate::family::kill_in_data_dir(&postgres, &self.local.dir.join("drill"));
            }
            Some("restore") => {
                let copies = std::fs::read_dir(&self.local.dir).into_iter().flatten();
                for e in copies.flatten() {
                    if e.file_name().to_string_lossy().ends_with(".restored") {
                        crate::family::kill_in_data_dir(&postgres, &e.path());
                    }
                }
            }
            _ => {}
        }
    }

    /// A restore's copy that was not put in place (or is left from a Tandem stopped midway,
    /// as its marker `DIR.tandem` says): its processes killed, the directory removed (it is
    /// made again from the repository at will).
    pub fn discard(&self, dir: &Path) {
        crate::family::kill_in_data_dir(&self.local.bins.join("postgres"), dir);
        if dir.exists()
            && let Err(e) = std::fs::remove_dir_all(dir)
        {
            tracing::warn!(dir = %dir.display(), "cannot remove a restore's copy: {e}");
        }
        let _ = std::fs::remove_file(marker(dir));
    }

    pub fn view(&self) -> BackupView {
        lock(&self.view).clone()
    }

    /// `STATE_DIR/databases/DB`.
    pub fn config_dir(&self) -> &Path {
        &self.local.dir
    }

    fn event(&self, kind: &str, message: String) {
        tracing::info!(database = %self.stanza, what = kind, "{message}");
        let _ = self.events.send(Event::new(
            Source::Database,
            self.stanza.clone(),
            kind,
            message,
        ));
    }

    /// The whole configuration file, naming `primary` (its data directory and port) when known.
    pub fn conf_text(&self, primary: Option<(&Path, u16)>) -> String {
        let dir = self.local.dir.join("pgbackrest");
        let locks = if self.shared {
            self.repository.join("lock")
        } else {
            dir.clone()
        };
        let mut text = format!(
            "# Written by Tandem for database {stanza}; rewritten when the primary changes.\n\
             [global]\n\
             repo1-path={repo}\n\
             repo1-retention-full={retention}\n\
             start-fast=y\n\
             archive-async=n\n\
             archive-push-queue-max={ARCHIVE_QUEUE_MAX}\n\
             compress-type=lz4\n\
             process-max=2\n\
             log-path={dir}\n\
             lock-path={locks}\n\
             log-level-console=off\n\
             log-level-stderr=warn\n\
             log-level-file=info\n\
             \n[{stanza}]\n\
             pg1-user={user}\n",
            stanza = self.stanza,
            repo = self.repository.display(),
            retention = self.config.retention_full,
            dir = dir.display(),
            locks = locks.display(),
            user = local::SUPERUSER,
        );
        if let Some((data, port)) = primary {
            text.push_str(&format!("pg1-path={}\npg1-port={port}\n", data.display()));
        }
        text
    }

    fn write_conf(&self, primary: Option<(&Path, u16)>) -> Result<(), Error> {
        let text = self.conf_text(primary);
        let tmp = self.conf.with_extension("conf.tmp");
        local::write_private(&tmp, &text, self.local.user)?;
        std::fs::rename(&tmp, &self.conf)
            .map_err(|e| Error(format!("{}: {e}", self.conf.display())))
    }

    /// Points the configuration at `p` when it names another primary.
    fn configure(&self, p: &Primary) -> Result<(), Error> {
        let want = (p.data.clone(), p.listen.port());
        let mut configured = lock(&self.configured);
        if configured.as_ref() != Some(&want) {
            self.write_conf(Some((&p.data, p.listen.port())))?;
            *configured = Some(want);
        }
        Ok(())
    }

    /// The repository must exist: Tandem never creates it (a missing mount would put the
    /// backups on another disk).
    fn check_repository(&self) -> Result<(), Error> {
        match std::fs::metadata(&self.repository) {
            Ok(m) if m.is_dir() => Ok(()),
            Ok(_) => Err(Error(format!(
                "backup repository {} is not a directory",
                self.repository.display()
            ))),
            Err(e) => Err(Error(format!(
                "backup repository {} cannot be used: {e}; Tandem does not create it (a missing mount would fill another disk)\n  help: create it, writable by the database user: mkdir -p {0} && chown postgres: {0}",
                self.repository.display()
            ))),
        }
    }

    /// Runs `pgbackrest COMMAND` with the configuration, `args` and, given a primary, the
    /// environment that reaches it. Standard output on success.
    async fn pgbackrest(
        &self,
        command: &str,
        args: &[&str],
        primary: Option<&Primary>,
    ) -> Result<String, Error> {
        let conf = format!("--config={}", self.conf.display());
        let stanza = format!("--stanza={}", self.stanza);
        let mut argv: Vec<&str> = vec![&conf, &stanza];
        argv.extend_from_slice(args);
        argv.push(command);
        let host = primary.map(|p| p.listen.ip().to_string());
        let passfile = self.local.dir.join("backup.pgpass");
        let passfile = passfile.to_string_lossy();
        let mut env: Vec<(&str, &str)> = vec![("PGPASSFILE", &passfile)];
        if let Some(h) = &host {
            env.push(("PGHOST", h));
        }
        self.local
            .run_program(&self.exe, &argv, &env, OPERATION_LIMIT)
            .await
            .map(|(out, _)| out)
    }

    /// `stanza-create` (idempotent): the repository's record of this database.
    pub async fn create_stanza(&self, p: &Primary) -> Result<(), Error> {
        self.check_repository()?;
        self.configure(p)?;
        let _busy = self.busy.lock().await;
        self.pgbackrest("stanza-create", &[], Some(p)).await?;
        lock(&self.view).ready = true;
        Ok(())
    }

    /// A backup of the primary now; the new backup's label.
    pub async fn backup(&self, p: &Primary, kind: Kind) -> Result<BackupSet, Error> {
        self.check_repository()?;
        self.configure(p)?;
        let _busy = self.busy.lock().await;
        if !lock(&self.view).ready {
            self.pgbackrest("stanza-create", &[], Some(p)).await?;
            lock(&self.view).ready = true;
        }
        lock(&self.view).running = Some(format!("{} backup", kind.as_str()));
        let kind_arg = format!("--type={}", kind.as_str());
        let result = self.pgbackrest("backup", &[&kind_arg], Some(p)).await;
        lock(&self.view).running = None;
        result?;
        let sets = self.refresh_info().await?;
        let newest = sets
            .last()
            .cloned()
            .ok_or_else(|| Error("pgbackrest backup succeeded but info lists no backup".into()))?;
        self.event(
            "backup",
            format!(
                "{} backup {} of {} done in {:.1} s ({} bytes, {} in the repository); WAL {}..{}",
                newest.kind,
                newest.label,
                p.site,
                newest
                    .stopped
                    .duration_since(newest.started)
                    .unwrap_or_default()
                    .as_secs_f64(),
                newest.size_bytes,
                newest.repository_bytes,
                newest.wal_start.as_deref().unwrap_or("?"),
                newest.wal_stop.as_deref().unwrap_or("?"),
            ),
        );
        lock(&self.view).last_error = None;
        Ok(newest)
    }

    /// The backups in the repository (and the view updated with them).
    pub async fn list(&self) -> Result<Vec<BackupSet>, Error> {
        let _busy = self.busy.lock().await;
        self.refresh_info().await
    }

    async fn refresh_info(&self) -> Result<Vec<BackupSet>, Error> {
        self.check_repository()?;
        let out = self.pgbackrest("info", &["--output=json"], None).await?;
        let (sets, wal) = parse_info(&out, &self.stanza).map_err(Error)?;
        let repo = self.repository.clone();
        let bytes = tokio::task::spawn_blocking(move || dir_bytes(&repo))
            .await
            .ok();
        let mut v = lock(&self.view);
        v.last_success = sets.last().map(|s| s.stopped);
        v.backups = sets.clone();
        (v.wal_min, v.wal_max) = wal.unzip();
        v.repository_bytes = bytes;
        Ok(sets)
    }

    /// `pgbackrest verify`: every backup and WAL file in the repository checked against its
    /// checksum. What it reported.
    pub async fn verify(&self) -> Result<String, Error> {
        self.check_repository()?;
        let _busy = self.busy.lock().await;
        lock(&self.view).running = Some("verify".into());
        let r = self
            .pgbackrest("verify", &["--log-level-console=info"], None)
            .await;
        lock(&self.view).running = None;
        let out = r?;
        let summary: Vec<&str> = out
            .lines()
            .filter(|l| !l.contains("verify command begin") && !l.contains("verify command end"))
            .map(|l| l.split_once(": ").map_or(l, |(_, m)| m).trim())
            .filter(|l| !l.is_empty())
            .collect();
        let summary = if summary.is_empty() {
            "verify: no problem found".to_string()
        } else {
            summary.join("\n")
        };
        self.event("backup-verify", summary.clone());
        Ok(summary)
    }

    /// Looks at the primary's archiver: the lag, an event when archiving starts failing or
    /// recovers, or when the primary runs without archiving (started before the backup
    /// settings: it must be restarted).
    pub async fn watch_archive(&self, client: &tokio_postgres::Client) -> Result<(), String> {
        let row = client
            .query_one(
                "SELECT archived_count, last_archived_wal, extract(epoch FROM last_archived_time)::float8, \
                 failed_count, last_failed_wal, extract(epoch FROM last_failed_time)::float8, \
                 pg_walfile_name(pg_current_wal_lsn()), current_setting('archive_mode') FROM pg_stat_archiver",
                &[],
            )
            .await
            .map_err(|e| e.to_string())?;
        let at = |v: Option<f64>| v.map(|s| UNIX_EPOCH + Duration::from_secs_f64(s.max(0.0)));
        let a = Archiver {
            archived_count: row.get(0),
            last_archived_wal: row.get(1),
            last_archived_at: at(row.get(2)),
            failed_count: row.get(3),
            last_failed_wal: row.get(4),
            last_failed_at: at(row.get(5)),
            current_wal: row.get(6),
            archive_mode: row.get(7),
        };
        let now = SystemTime::now();
        let lag = {
            let mut first = lock(&self.first_behind);
            let probe = archive_lag(&a, now, Some(now));
            if probe == 0.0 {
                *first = None;
            } else if first.is_none() {
                *first = Some(now);
            }
            archive_lag(&a, now, *first)
        };
        let (was_failing, mode_was) = {
            let v = lock(&self.view);
            (
                v.archiver.as_ref().is_some_and(Archiver::failing),
                v.archiver.as_ref().map(|a| a.archive_mode.clone()),
            )
        };
        if a.archive_mode != "on" && mode_was.as_deref() != Some(a.archive_mode.as_str()) {
            let msg = format!(
                "the primary runs with archive_mode = {} (started before [database.backup] was set): no WAL is archived until it restarts",
                a.archive_mode
            );
            lock(&self.view).last_error = Some(msg.clone());
            self.event("archive-off", msg);
        }
        if a.failing() && !was_failing {
            let msg = format!(
                "WAL archiving is failing (segment {}, {} failures so far); commits go on, WAL waits in pg_wal (up to {ARCHIVE_QUEUE_MAX}); see the primary's log",
                a.last_failed_wal.as_deref().unwrap_or("?"),
                a.failed_count
            );
            lock(&self.view).last_error = Some(msg.clone());
            self.event("archive-failing", msg);
        } else if !a.failing() && was_failing {
            self.event(
                "archive-ok",
                format!(
                    "WAL archiving works again (last archived {})",
                    a.last_archived_wal.as_deref().unwrap_or("?")
                ),
            );
        }
        let mut v = lock(&self.view);
        v.archive_lag_seconds = Some(lag);
        v.archiver = Some(a);
        Ok(())
    }

    /// The schedule's next backup, from the repository's backups.
    pub fn next_backup(&self) -> Option<(Kind, SystemTime)> {
        let v = lock(&self.view);
        let newest = |kind: &str| {
            v.backups
                .iter()
                .filter(|b| b.kind == kind)
                .map(|b| b.stopped)
                .max()
        };
        Schedule::of(&self.config).next_backup(
            newest("full"),
            newest("diff"),
            *lock(&self.failed_backup),
        )
    }

    pub fn next_drill(&self) -> Option<SystemTime> {
        let v = lock(&self.view);
        let last = v
            .last_drill
            .as_ref()
            .and_then(|d| event::parse_rfc3339(&d.started));
        Schedule::of(&self.config).next_drill(
            last,
            !v.backups.is_empty(),
            *lock(&self.failed_drill),
        )
    }

    /// One look by the background task: the stanza (tried every [`STANZA_RETRY`] until it
    /// exists), the archive, then whatever the schedule says is due.
    pub async fn tend(&self, p: &Primary, client: Option<&tokio_postgres::Client>, refresh: bool) {
        let ready = lock(&self.view).ready;
        let try_stanza =
            !ready && lock(&self.stanza_tried).is_none_or(|t| t.elapsed() >= STANZA_RETRY);
        if try_stanza {
            *lock(&self.stanza_tried) = Some(tokio::time::Instant::now());
            match self.create_stanza(p).await {
                Ok(()) => {
                    self.resolved("backup-error");
                    self.event(
                        "backup-ready",
                        format!(
                            "stanza {} ready in {}; WAL is archived from {}",
                            self.stanza,
                            self.repository.display(),
                            p.site
                        ),
                    );
                    let _ = self.list().await;
                }
                Err(e) => self.failure("backup-error", format!("cannot create the stanza: {e}")),
            }
        }
        if let Some(c) = client
            && let Err(e) = self.watch_archive(c).await
        {
            tracing::debug!(database = %self.stanza, "pg_stat_archiver: {e}");
        }
        if !lock(&self.view).ready {
            return;
        }
        if refresh && self.busy.try_lock().is_ok() {
            let _ = self.list().await;
        }
        let now = SystemTime::now();
        let next = self.next_backup();
        let next_drill = self.next_drill();
        {
            let mut v = lock(&self.view);
            v.next_backup = next.map(|(k, _)| k.as_str().to_string());
            v.next_backup_at = next.map(|(_, t)| t);
            v.next_drill_at = next_drill;
        }
        if let Some((kind, due)) = next
            && due <= now
        {
            match self.backup(p, kind).await {
                Ok(_) => {
                    *lock(&self.failed_backup) = None;
                    self.resolved("backup-failed");
                }
                Err(e) => {
                    *lock(&self.failed_backup) = Some(SystemTime::now());
                    self.failure(
                        "backup-failed",
                        format!("scheduled {} backup failed: {e}", kind.as_str()),
                    );
                }
            }
        } else if next_drill.is_some_and(|d| d <= now) {
            let r = self.drill(p, None).await;
            *lock(&self.failed_drill) = (!r.ok).then(SystemTime::now);
        }
    }

    /// An error event, once per distinct message of each kind until it is resolved.
    fn failure(&self, kind: &str, message: String) {
        lock(&self.view).last_error = Some(message.clone());
        let mut reported = lock(&self.reported);
        if reported.get(kind) == Some(&message) {
            return;
        }
        reported.insert(kind.to_string(), message.clone());
        drop(reported);
        self.event(kind, message);
    }

    fn resolved(&self, kind: &str) {
        if lock(&self.reported).remove(kind).is_some() {
            lock(&self.view).last_error = None;
        }
    }

    /// A restore drill: the newest backup and the archived WAL (up to `to`, else all of it)
    /// restored into `DIR/drill`, started on a free loopback port (never a member's
    /// directory or address), checked to answer, `drill_table` counted, RTO and RPO measured;
    /// then stopped and removed. A scratch directory that is not empty is refused untouched.
    pub async fn drill(&self, p: &Primary, to: Option<SystemTime>) -> DrillReport {
        let scratch = self.local.dir.join("drill");
        let started = SystemTime::now();
        let mut report = DrillReport {
            started: event::rfc3339(started),
            target: to.map_or_else(|| "latest".to_string(), event::rfc3339),
            directory: scratch.display().to_string(),
            table: self.config.drill_table.clone(),
            ..DrillReport::default()
        };
        let _busy = self.busy.lock().await;
        lock(&self.view).running = Some("restore drill".into());
        let result = self.drill_inner(p, to, &scratch, &mut report).await;
        lock(&self.view).running = None;
        match result {
            Ok(()) => {
                report.ok = true;
                self.event(
                    "restore-drill",
                    format!(
                        "restore drill passed: {} restored to {} in {:.1} s (RTO: restore {:.1} s + start {:.1} s){}{}",
                        report.backup.as_deref().unwrap_or("?"),
                        report.target,
                        report.rto_seconds,
                        report.restore_seconds,
                        report.start_seconds,
                        match (&report.table, report.rows) {
                            (Some(t), Some(n)) => format!("; {t} has {n} rows"),
                            _ => String::new(),
                        },
                        report
                            .rpo_seconds
                            .map(|r| format!("; RPO {r:.1} s"))
                            .unwrap_or_default(),
                    ),
                );
            }
            Err(e) => {
                report.ok = false;
                report.error = Some(e.to_string());
                self.event("restore-drill-failed", format!("restore drill failed: {e}"));
            }
        }
        let mut v = lock(&self.view);
        v.last_drill = Some(report.clone());
        report
    }

    /// `tandem restore`'s first half: the backup pgBackRest picks and the archived WAL (up to
    /// `to`, else all of it) restored into `dir` — which must not exist or be empty, and is
    /// never a member's directory — then started apart on a free loopback port, archiving as
    /// members do, recovered and promoted onto a new timeline, checked (`drill_table`
    /// counted), stopped cleanly, and its recovery settings removed (a standby cloned from it
    /// must never stop at the target again). The running members are not touched: until the
    /// copy is ready the database keeps serving. On failure `dir` is removed. The report's
    /// times are the copy's (restore, then recovery); `newest_acknowledged_commit` is the
    /// primary's newest when it started, if one answered.
    pub async fn restore(
        &self,
        p: Option<&Primary>,
        to: Option<SystemTime>,
        dir: &Path,
    ) -> Result<DrillReport, Error> {
        let mut report = DrillReport {
            started: event::rfc3339(SystemTime::now()),
            target: to.map_or_else(|| "latest".to_string(), event::rfc3339),
            directory: dir.display().to_string(),
            table: self.config.drill_table.clone(),
            ..DrillReport::default()
        };
        let _busy = self.busy.lock().await;
        lock(&self.view).running = Some("restore".into());
        let result = self.restore_inner(p, to, dir, &mut report).await;
        lock(&self.view).running = None;
        if let Err(e) = &result {
            self.event("restore-failed", format!("restore failed: {e}"));
        }
        result.map(|()| {
            report.ok = true;
            report
        })
    }

    async fn restore_inner(
        &self,
        p: Option<&Primary>,
        to: Option<SystemTime>,
        dir: &Path,
        report: &mut DrillReport,
    ) -> Result<(), Error> {
        self.check_repository()?;
        if let Some(p) = p {
            self.configure(p)?;
            if let Ok(c) = observe::connect(p.listen, &self.local.password).await {
                if to.is_none() {
                    // The newest commits reach the archive before the copy is made.
                    archive_now(&c).await;
                }
                report.newest_acknowledged_commit = last_commit(&c).await.map(event::rfc3339);
            }
        }
        if marker(dir).exists() {
            // Ours, from a Tandem stopped midway: made again.
            self.discard(dir);
        }
        if dir.exists() && !local::is_empty(dir) {
            return Err(Error(format!(
                "{} is not empty; a restore never writes over anything (Tandem leaves it untouched)\n  help: move it away (an earlier restore killed midway?)",
                dir.display()
            )));
        }
        let sets = self.refresh_info().await?;
        report.backup = sets.last().map(|b| b.label.clone());
        if report.backup.is_none() {
            return Err(Error(
                "no backup in the repository yet\n  help: `tandem backup DB now`".into(),
            ));
        }
        if let Some(t) = to {
            report.backup = Some(backup_before(&sets, t)?.label.clone());
        }
        std::fs::write(marker(dir), "a restore's copy, made by Tandem\n")
            .map_err(|e| Error(format!("{}: {e}", marker(dir).display())))?;
        std::fs::create_dir_all(dir).map_err(|e| Error(format!("{}: {e}", dir.display())))?;
        if let Some((uid, gid)) = self.local.user {
            local::chown(dir, uid, gid)?;
        }
        let port = free_port()?;
        report.port = port;
        let mut result = self
            .restore_and_check(dir, port, to, report, Purpose::Member)
            .await;
        if result.is_ok() {
            result = forget_recovery_target(dir, self.local.user);
        }
        if result.is_err() {
            self.discard(dir);
        }
        result
    }

    async fn drill_inner(
        &self,
        p: &Primary,
        to: Option<SystemTime>,
        scratch: &Path,
        report: &mut DrillReport,
    ) -> Result<(), Error> {
        self.check_repository()?;
        self.configure(p)?;
        if scratch.exists() && !local::is_empty(scratch) {
            return Err(Error(format!(
                "{} is not empty; a drill never restores over anything (Tandem leaves it untouched)\n  help: move it away (an earlier drill killed midway?)",
                scratch.display()
            )));
        }
        // The newest acknowledged commit, before anything is restored.
        let primary = observe::connect(p.listen, &self.local.password)
            .await
            .map_err(|e| Error(format!("cannot reach the primary {}: {e}", p.site)))?;
        report.newest_acknowledged_commit = last_commit(&primary).await.map(event::rfc3339);
        drop(primary);
        report.backup = self.refresh_info().await?.last().map(|b| b.label.clone());
        if report.backup.is_none() {
            return Err(Error(
                "no backup in the repository yet\n  help: `tandem backup DB now`".into(),
            ));
        }
        std::fs::create_dir_all(scratch)
            .map_err(|e| Error(format!("{}: {e}", scratch.display())))?;
        if let Some((uid, gid)) = self.local.user {
            local::chown(scratch, uid, gid)?;
        }
        let port = free_port()?;
        report.port = port;
        let result = self
            .restore_and_check(scratch, port, to, report, Purpose::Drill)
            .await;
        // Whatever happened: nothing of the drill is left running or on disk.
        let postgres = self.local.bins.join("postgres");
        crate::family::kill_in_data_dir(&postgres, scratch);
        if let Err(e) = std::fs::remove_dir_all(scratch)
            && scratch.exists()
        {
            tracing::warn!(dir = %scratch.display(), "cannot remove the drill's directory: {e}");
        }
        result
    }

    async fn restore_and_check(
        &self,
        scratch: &Path,
        port: u16,
        to: Option<SystemTime>,
        report: &mut DrillReport,
        purpose: Purpose,
    ) -> Result<(), Error> {
        let t0 = tokio::time::Instant::now();
        let path = format!("--pg1-path={}", scratch.display());
        let mut args = vec![path.as_str()];
        if purpose == Purpose::Drill {
            args.push("--archive-mode=off");
        }
        let target;
        if let Some(t) = to {
            target = format!("--target={}", pg_time(t));
            args.extend_from_slice(&["--type=time", &target, "--target-action=promote"]);
        }
        self.pgbackrest("restore", &args, None).await?;
        report.restore_seconds = t0.elapsed().as_secs_f64();
        let t1 = tokio::time::Instant::now();
        let log = self.local.dir.join(match purpose {
            Purpose::Drill => "drill.log",
            Purpose::Member => "restore.log",
        });
        let mut child = self.start_scratch(scratch, port, &log, purpose)?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = t1 + DRILL_READY;
        let client = loop {
            if let Ok(Some(status)) = child.try_wait() {
                let tail = std::fs::read_to_string(&log).unwrap_or_default();
                let last: Vec<&str> = tail.lines().rev().take(3).collect();
                return Err(Error(format!(
                    "the restored copy exited ({status}) before it answered: {}",
                    last.into_iter().rev().collect::<Vec<_>>().join(" | ")
                )));
            }
            if let Ok(c) = observe::connect(addr, &self.local.password).await {
                let writable = c
                    .query_one("SELECT NOT pg_is_in_recovery()", &[])
                    .await
                    .map(|r| r.get::<_, bool>(0))
                    .unwrap_or(false);
                if writable {
                    break c;
                }
            }
            if tokio::time::Instant::now() >= deadline {
                stop_child(&mut child).await;
                return Err(Error(format!(
                    "the restored copy did not finish recovery within {DRILL_READY:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        report.start_seconds = t1.elapsed().as_secs_f64();
        report.rto_seconds = t0.elapsed().as_secs_f64();
        let checked = async {
            client
                .query_one("SELECT 1", &[])
                .await
                .map_err(|e| Error(format!("the restored copy does not answer: {e}")))?;
            if let Some(t) = &self.config.drill_table {
                let quoted: Vec<String> = t.split('.').map(|p| format!("\"{p}\"")).collect();
                let q = format!("SELECT count(*) FROM {}", quoted.join("."));
                let n: i64 = client
                    .query_one(&q, &[])
                    .await
                    .map_err(|e| Error(format!("counting {t} in the restored copy: {e}")))?
                    .get(0);
                report.rows = Some(n);
            }
            let restored = last_commit(&client).await;
            report.newest_restored_commit = restored.map(event::rfc3339);
            let acked = report
                .newest_acknowledged_commit
                .as_deref()
                .and_then(event::parse_rfc3339);
            if to.is_none()
                && let (Some(r), Some(a)) = (restored, acked)
            {
                report.rpo_seconds = Some(a.duration_since(r).unwrap_or_default().as_secs_f64());
            }
            Ok::<(), Error>(())
        }
        .await;
        drop(client);
        stop_child(&mut child).await;
        checked
    }

    /// The restored copy's postmaster: loopback only, its own port, no synchronous standby
    /// to wait for, as the database user with the members' environment. A drill's copy does
    /// not archive; a member's does, as members do (the new timeline's history file and WAL
    /// reach the repository, so later restores can follow it).
    fn start_scratch(
        &self,
        scratch: &Path,
        port: u16,
        log: &Path,
        purpose: Purpose,
    ) -> Result<tokio::process::Child, Error> {
        let logfile =
            std::fs::File::create(log).map_err(|e| Error(format!("{}: {e}", log.display())))?;
        let errfile = logfile
            .try_clone()
            .map_err(|e| Error(format!("{}: {e}", log.display())))?;
        let mut cmd = tokio::process::Command::new(self.local.bins.join("postgres"));
        cmd.arg("-D").arg(scratch);
        let archive = match purpose {
            // The new timeline's history file and WAL are kept (`.ready`) until the copy is a
            // member, whose archiver then pushes them: a copy that is never put in place
            // leaves nothing in the repository for later restores to follow.
            // (An empty command pauses archiving without failures to retry, which would
            // hold the copy's shutdown for seconds.)
            Purpose::Member => vec![
                "archive_mode=on".to_string(),
                "archive_command=".to_string(),
            ],
            Purpose::Drill => vec!["archive_mode=off".to_string()],
        };
        let name = match purpose {
            Purpose::Drill => "drill",
            Purpose::Member => "restore",
        };
        for setting in [
            "listen_addresses=127.0.0.1".to_string(),
            format!("port={port}"),
            "unix_socket_directories=".to_string(),
            format!("cluster_name={name}-{}", self.stanza),
            "synchronous_standby_names=".to_string(),
            "track_commit_timestamp=on".to_string(),
            "hot_standby=on".to_string(),
        ]
        .into_iter()
        .chain(archive)
        {
            cmd.arg("-c").arg(setting);
        }
        cmd.env_clear()
            .envs(self.local.environment())
            .current_dir(&self.local.dir)
            .stdin(std::process::Stdio::null())
            .stdout(logfile)
            .stderr(errfile)
            .process_group(0)
            .kill_on_drop(true);
        if let Some((uid, gid)) = self.local.user {
            cmd.uid(uid).gid(gid);
        }
        cmd.spawn()
            .map_err(|e| Error(format!("cannot start the restored copy: {e}")))
    }
}

/// The newest backup a restore to `to` starts from, as pgBackRest picks it: one that
/// finished before `to`, compared in whole seconds (pgBackRest's precision).
fn backup_before(sets: &[BackupSet], to: SystemTime) -> Result<&BackupSet, Error> {
    let secs = |t: SystemTime| t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    sets.iter()
        .rev()
        .find(|b| secs(b.stopped) < secs(to))
        .ok_or_else(|| {
            Error(format!(
                "no backup finished before {} (the oldest finished at {}): a restore cannot go back before its first backup\n  help: a later time, at least a second after a backup's stop (`tandem backup DB list`)",
                event::rfc3339(to),
                sets.first().map_or_else(|| "-".into(), |b| event::rfc3339(b.stopped))
            ))
        })
}

/// The marker beside a restore's copy `DIR`: `DIR.tandem`.
fn marker(dir: &Path) -> PathBuf {
    let mut name = dir.as_os_str().to_os_string();
    name.push(".tandem");
    PathBuf::from(name)
}

/// Closes the primary's current WAL segment and waits (up to 60 s) until it is archived, so a
/// restore to the newest archived WAL has the newest commits.
async fn archive_now(c: &tokio_postgres::Client) {
    let Ok(row) = c
        .query_one("SELECT pg_walfile_name(pg_switch_wal())", &[])
        .await
    else {
        return;
    };
    let seg: String = row.get(0);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while tokio::time::Instant::now() < deadline {
        let last: Option<String> = c
            .query_one("SELECT last_archived_wal FROM pg_stat_archiver", &[])
            .await
            .ok()
            .and_then(|r| r.get(0));
        if last.is_some_and(|l| l.get(8..24) >= seg.get(8..24)) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What a restored copy is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Purpose {
    /// A drill: checked, then removed; it never archives.
    Drill,
    /// A member's new data (`tandem restore`): its archive kept for the member to push.
    Member,
}

/// Removes the recovery settings `pgbackrest restore` wrote in `DIR/postgresql.auto.conf`
/// (`restore_command`, `recovery_target*`): once the copy is promoted they have done their
/// work, and in a standby cloned from it later they would stop replay at the old target.
fn forget_recovery_target(dir: &Path, user: Option<(u32, u32)>) -> Result<(), Error> {
    let file = dir.join("postgresql.auto.conf");
    let text =
        std::fs::read_to_string(&file).map_err(|e| Error(format!("{}: {e}", file.display())))?;
    let kept: String = text
        .lines()
        .filter(|l| {
            let l = l.trim_start();
            !(l.starts_with("restore_command")
                || l.starts_with("recovery_target")
                || l.starts_with("# Recovery settings generated by pgBackRest"))
        })
        .map(|l| format!("{l}\n"))
        .collect();
    local::write_private(&file, &kept, user)
}

/// Fast shutdown, killed after 30 s.
async fn stop_child(child: &mut tokio::process::Child) {
    if let Some(pid) = child.id() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGINT,
        );
    }
    if tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
}

/// The newest commit's time (`track_commit_timestamp`), when known: the last commit this
/// server made or replayed, else (a restored copy that replayed no commit, a primary not
/// written since its start) the newest among the last 1,000 transaction ids.
const LAST_COMMIT_SQL: &str = "SELECT extract(epoch FROM greatest((pg_last_committed_xact()).timestamp, \
     (SELECT max(pg_xact_commit_timestamp(((s.x - g) % 4294967296)::text::xid)) \
      FROM (SELECT txid_snapshot_xmax(txid_current_snapshot()) AS x) s, generate_series(1, 1000) g \
      WHERE s.x - g >= 3)))::float8";

async fn last_commit(client: &tokio_postgres::Client) -> Option<SystemTime> {
    let row = client.query_one(LAST_COMMIT_SQL, &[]).await.ok()?;
    let secs: Option<f64> = row.get(0);
    secs.map(|s| UNIX_EPOCH + Duration::from_secs_f64(s.max(0.0)))
}

/// A time as PostgreSQL and pgBackRest read it: `2024-05-01 12:00:00.123+00`.
pub fn pg_time(t: SystemTime) -> String {
    event::rfc3339(t).replace('T', " ").replace('Z', "+00")
}

fn free_port() -> Result<u16, Error> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| Error(format!("no free port for the drill: {e}")))
}

/// Bytes of every file under `dir`.
fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(e.path()),
                Ok(t) if t.is_file() => total += e.metadata().map_or(0, |m| m.len()),
                _ => {}
            }
        }
    }
    total
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const H: Duration = Duration::from_secs(3600);
    const DAY: Duration = Duration::from_secs(86_400);

    fn t(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn schedule(full: Option<Duration>, diff: Option<Duration>) -> Schedule {
        Schedule {
            full,
            differential: diff,
            drill: Some(DAY),
            retry: Duration::from_secs(300),
        }
    }

    #[test]
    fn a_full_backup_first_then_differentials_between_fulls() {
        let s = schedule(Some(7 * DAY), Some(DAY));
        // None yet: a full one, due at once.
        assert_eq!(
            s.next_backup(None, None, None),
            Some((Kind::Full, UNIX_EPOCH))
        );
        let full = t(1_000_000);
        assert_eq!(
            s.next_backup(Some(full), None, None),
            Some((Kind::Diff, full + DAY))
        );
        let diff = full + DAY + H;
        assert_eq!(
            s.next_backup(Some(full), Some(diff), None),
            Some((Kind::Diff, diff + DAY))
        );
        // A differential older than the full one counts from the full one.
        assert_eq!(
            s.next_backup(Some(full), Some(full - H), None),
            Some((Kind::Diff, full + DAY))
        );
        // When both fall at once, the full one.
        let s = schedule(Some(DAY), Some(DAY));
        assert_eq!(
            s.next_backup(Some(full), None, None),
            Some((Kind::Full, full + DAY))
        );
        // Never: on request only.
        assert_eq!(
            schedule(None, None).next_backup(Some(full), None, None),
            None
        );
        assert_eq!(
            schedule(None, Some(DAY)).next_backup(None, None, None),
            None
        );
    }

    #[test]
    fn a_failure_holds_the_schedule_back() {
        let s = schedule(Some(DAY), None);
        let failed = t(5_000);
        assert_eq!(
            s.next_backup(None, None, Some(failed)),
            Some((Kind::Full, failed + s.retry))
        );
        // An old failure changes nothing.
        let full = t(1_000_000);
        assert_eq!(
            s.next_backup(Some(full), None, Some(failed)),
            Some((Kind::Full, full + DAY))
        );
        assert_eq!(
            s.next_drill(None, false, None),
            None,
            "nothing to restore yet"
        );
        assert_eq!(s.next_drill(None, true, None), Some(UNIX_EPOCH));
        assert_eq!(s.next_drill(Some(full), true, None), Some(full + DAY));
        assert_eq!(
            s.next_drill(None, true, Some(failed)),
            Some(failed + s.retry)
        );
    }

    fn archiver(
        current: &str,
        last: Option<&str>,
        archived: Option<u64>,
        failed: Option<u64>,
    ) -> Archiver {
        Archiver {
            archived_count: i64::from(last.is_some()),
            last_archived_wal: last.map(str::to_string),
            last_archived_at: archived.map(t),
            failed_count: i64::from(failed.is_some()),
            last_failed_wal: failed.map(|_| current.to_string()),
            last_failed_at: failed.map(t),
            current_wal: current.to_string(),
            archive_mode: "on".into(),
        }
    }

    #[test]
    fn archive_lag_is_zero_while_every_completed_segment_is_archived() {
        let now = t(1000);
        let a = archiver(
            "000000010000000000000005",
            Some("000000010000000000000004"),
            Some(900),
            None,
        );
        assert_eq!(archive_lag(&a, now, None), 0.0);
        // Behind by two segments: since the last archived one.
        let a = archiver(
            "000000010000000000000006",
            Some("000000010000000000000004"),
            Some(900),
            None,
        );
        assert_eq!(archive_lag(&a, now, None), 100.0);
        // Failing: since the last success, whatever the segments say.
        let a = archiver(
            "000000010000000000000005",
            Some("000000010000000000000004"),
            Some(900),
            Some(950),
        );
        assert!(a.failing());
        assert_eq!(archive_lag(&a, now, None), 100.0);
        // A success after the failure: not failing.
        let a = archiver(
            "000000010000000000000005",
            Some("000000010000000000000004"),
            Some(960),
            Some(950),
        );
        assert!(!a.failing());
        // Never archived anything and failing: since first seen behind.
        let a = archiver("000000010000000000000003", None, None, Some(950));
        assert_eq!(archive_lag(&a, now, Some(t(700))), 300.0);
        // After a failover the last archived file is a history file: nothing failed since.
        let a = archiver(
            "000000020000000000000005",
            Some("00000002.history"),
            Some(990),
            None,
        );
        assert_eq!(archive_lag(&a, now, None), 0.0);
        // A log boundary: 0/FF then 1/00.
        assert_eq!(segment_index("000000010000000100000000"), Some(256));
        assert_eq!(segment_index("0000000100000000000000FF"), Some(255));
        assert_eq!(
            segment_index("000000010000000000000002.00000028.backup"),
            Some(2)
        );
        assert_eq!(segment_index("00000002.history"), None);
    }

    #[test]
    fn info_lists_backups_and_the_wal_range() {
        let json = r#"[{"archive":[{"database":{"id":1,"repo-key":1},"id":"15-1","max":"000000010000000000000006","min":"000000010000000000000001"}],
          "backup":[{"archive":{"start":"000000010000000000000002","stop":"000000010000000000000002"},"backrest":{"format":5,"version":"2.45"},"database":{"id":1,"repo-key":1},"error":false,
             "info":{"delta":22992374,"repository":{"delta":4522232,"size":4522232},"size":22992374},"label":"20261130-142333F","lsn":{"start":"0/2000028","stop":"0/2000100"},"prior":null,"reference":null,"timestamp":{"start":1796048613,"stop":1796048618},"type":"full"},
            {"archive":{"start":"000000010000000000000004","stop":"000000010000000000000004"},"error":false,
             "info":{"delta":100,"repository":{"delta":50,"size":60},"size":22992374},"label":"20261130-142333F_20261130-150000I","lsn":null,"prior":"20261130-142333F","timestamp":{"start":1796050000,"stop":1796050003},"type":"incr"}],
          "cipher":"none","db":[],"name":"orders","repo":[],"status":{"code":0,"message":"ok"}}]"#;
        let (sets, wal) = parse_info(json, "orders").unwrap();
        assert_eq!(sets.len(), 2);
        assert_eq!(sets[0].label, "20261130-142333F");
        assert_eq!(sets[0].kind, "full");
        assert_eq!(sets[0].stopped, t(1_796_048_618));
        assert_eq!(sets[0].repository_bytes, 4_522_232);
        assert_eq!(
            sets[0].wal_start.as_deref(),
            Some("000000010000000000000002")
        );
        assert_eq!(sets[1].prior.as_deref(), Some("20261130-142333F"));
        assert_eq!(
            wal,
            Some((
                "000000010000000000000001".into(),
                "000000010000000000000006".into()
            ))
        );
        // Another stanza, or none yet: nothing.
        assert_eq!(parse_info(json, "carts").unwrap().0.len(), 0);
        assert_eq!(parse_info("[]", "orders").unwrap().0.len(), 0);
        assert!(parse_info("not json", "orders").is_err());
    }

    #[test]
    fn times_are_written_as_postgresql_reads_them() {
        assert_eq!(pg_time(t(1_700_000_000)), "2023-11-14 22:13:20.000+00");
        assert_eq!(Kind::parse("differential"), Some(Kind::Diff));
        assert_eq!(Kind::parse("weekly"), None);
        assert_eq!(shell_quote("/a b/it's"), "'/a b/it'\\''s'");
    }
}
