//! One database's PostgreSQL servers on this machine: programs, the OS user they run as, data
//! directories, and the operations Tandem performs on them (initdb, clone, rewind, start).
//! Every program runs as the database user: PostgreSQL refuses to run as root.

use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use scaleset::{Driver as _, Instance, ProcessDriver, Spec};

/// The programs Tandem runs.
const PROGRAMS: [&str; 5] = [
    "postgres",
    "initdb",
    "pg_basebackup",
    "pg_rewind",
    "pg_controldata",
];

/// How many former data directories of a member [`Local::set_aside`] keeps.
pub const KEPT_ASIDE: usize = 3;

/// The role Tandem and `pg_rewind` connect as, and the one standbys stream with.
pub const SUPERUSER: &str = "postgres";
pub const REPLICATION_USER: &str = "replicator";

/// Settings every member runs with (besides its address and the timeouts that follow
/// `failover_timeout`, given on the command line: see [`Local::start`]). Data directories
/// made by earlier versions also say `wal_sender_timeout = '5s'` here; the command line wins.
const SETTINGS: &str = "
# Written by Tandem at initdb: what streaming replication, failover and pg_rewind need.
wal_level = replica
wal_log_hints = on
max_wal_senders = 10
max_replication_slots = 10
hot_standby = on
hot_standby_feedback = on
wal_keep_size = '256MB'
wal_retrieve_retry_interval = '500ms'
unix_socket_directories = ''
";

/// Password authentication for every network connection; no local socket is used.
const HBA: &str = "# Written by Tandem.
host replication replicator 0.0.0.0/0 scram-sha-256
host replication replicator ::/0 scram-sha-256
host all all 0.0.0.0/0 scram-sha-256
host all all ::/0 scram-sha-256
";

/// A failed operation, with what the program said.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Error(pub String);

fn err(context: impl std::fmt::Display, e: impl std::fmt::Display) -> Error {
    Error(format!("{context}: {e}"))
}

/// Where PostgreSQL's programs are: `bin_dir`, else `pg_config --bindir`, else the newest
/// `/usr/lib/postgresql/*/bin`. Every program Tandem runs must be there.
pub fn find_bins(configured: Option<&Path>) -> Result<PathBuf, Error> {
    let dir = match configured {
        Some(d) => d.to_path_buf(),
        None => pg_config_bindir().or_else(newest_debian_bindir).ok_or_else(|| {
            Error(
                "PostgreSQL is not installed: no `pg_config` on PATH and no /usr/lib/postgresql/*/bin\n  \
                 help: install Debian's `postgresql` package, or set `bin_dir` in the [[database]]"
                    .into(),
            )
        })?,
    };
    let missing: Vec<&str> = PROGRAMS
        .iter()
        .copied()
        .filter(|p| !dir.join(p).is_file())
        .collect();
    if !missing.is_empty() {
        return Err(Error(format!(
            "PostgreSQL programs missing in {}: {}\n  help: install Debian's `postgresql` package, or point `bin_dir` at the directory holding them",
            dir.display(),
            missing.join(", ")
        )));
    }
    Ok(dir)
}

fn pg_config_bindir() -> Option<PathBuf> {
    let out = std::process::Command::new("pg_config")
        .arg("--bindir")
        .output()
        .ok()?;
    let dir = PathBuf::from(String::from_utf8(out.stdout).ok()?.trim());
    (out.status.success() && dir.join("postgres").is_file()).then_some(dir)
}

fn newest_debian_bindir() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| {
            let e = e.ok()?;
            let v = e.file_name().to_str()?.parse().ok()?;
            Some((v, e.path().join("bin")))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, d)| d)
}

/// The user PostgreSQL runs as: Tandem's own, or `postgres` when Tandem runs as root.
pub fn run_as() -> Result<Option<(u32, u32)>, Error> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(None);
    }
    match nix::unistd::User::from_name(SUPERUSER) {
        Ok(Some(u)) => Ok(Some((u.uid.as_raw(), u.gid.as_raw()))),
        _ => Err(Error(
            "PostgreSQL refuses to run as root and there is no `postgres` user\n  \
             help: install Debian's `postgresql` package (it creates the user), or run Tandem as an ordinary user"
                .into(),
        )),
    }
}

/// The servers of one database.
#[derive(Debug)]
pub struct Local {
    pub bins: PathBuf,
    pub user: Option<(u32, u32)>,
    /// `STATE_DIR/databases/NAME`: data directories, logs, passwords.
    pub dir: PathBuf,
    pub password: String,
    pub replication_password: String,
    /// The primary's lease: how long a silent peer may go unnoticed (see [`Local::start`]).
    pub failover_timeout: Duration,
    /// Continuous WAL archiving (`[database.backup]`): every member starts with it, so it
    /// carries on from whichever member is primary (a standby does not archive).
    pub archive: Option<Archive>,
    driver: ProcessDriver,
}

/// How members archive their WAL: `archive_command` is `command` followed by the member's
/// own `--pg1-path` and `archive-push %p`; `archive_timeout` forces a segment out at least
/// this often when anything was written.
#[derive(Clone, Debug)]
pub struct Archive {
    /// `pgbackrest --config=… --stanza=…`, its paths shell-quoted.
    pub command: String,
    pub timeout: Duration,
}

/// A path quoted for `sh` (`archive_command` runs through the shell).
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

impl Local {
    /// Prepares the database's directory (owned by the database user) and its passwords,
    /// generated once and kept in `password` and `replication.password` (mode 0600).
    pub fn open(
        bins: PathBuf,
        user: Option<(u32, u32)>,
        dir: PathBuf,
        failover_timeout: Duration,
    ) -> Result<Local, Error> {
        std::fs::create_dir_all(&dir).map_err(|e| err(dir.display(), e))?;
        // Programs run from inside it, so every path handed to them must be absolute.
        let dir = std::path::absolute(&dir).map_err(|e| err(dir.display(), e))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| err(dir.display(), e))?;
        if let Some((uid, gid)) = user {
            chown(&dir, uid, gid)?;
            reachable(&dir, uid, gid)?;
        }
        let password = secret(&dir.join("password"))?;
        let replication_password = secret(&dir.join("replication.password"))?;
        // Standbys read their replication password from here, not from their command line.
        write_private(
            &dir.join("pgpass"),
            &format!("*:*:*:{REPLICATION_USER}:{replication_password}\n"),
            user,
        )?;
        Ok(Local {
            bins,
            user,
            dir,
            password,
            replication_password,
            failover_timeout,
            archive: None,
            driver: ProcessDriver {
                tandem: std::env::current_exe().ok(),
            },
        })
    }

    /// The passwords kept in `dir` (generated there on first use): superuser, replication.
    pub fn credentials(dir: &Path) -> Result<(String, String), Error> {
        std::fs::create_dir_all(dir).map_err(|e| err(dir.display(), e))?;
        Ok((
            secret(&dir.join("password"))?,
            secret(&dir.join("replication.password"))?,
        ))
    }

    /// Keeps `password` and `replication` in `dir` (mode 0600), replacing what was there.
    pub fn keep_credentials(dir: &Path, password: &str, replication: &str) -> Result<(), Error> {
        std::fs::create_dir_all(dir).map_err(|e| err(dir.display(), e))?;
        write_private(&dir.join("password"), password, None)?;
        write_private(&dir.join("replication.password"), replication, None)
    }

    pub fn data(&self, site: &str) -> PathBuf {
        self.dir.join(site)
    }

    pub fn log(&self, site: &str) -> PathBuf {
        self.dir.join(format!("{site}.log"))
    }

    /// Whether the member has a data directory (`PG_VERSION` present).
    pub fn has_data(&self, site: &str) -> bool {
        self.data(site).join("PG_VERSION").is_file()
    }

    /// Whether it was left configured as a standby.
    pub fn is_standby(&self, site: &str) -> bool {
        self.data(site).join("standby.signal").is_file()
    }

    /// A data directory that exists but is not a usable PostgreSQL cluster: an error that names
    /// it; Tandem then leaves it alone.
    pub async fn check_data(&self, site: &str) -> Result<(), Error> {
        let data = self.data(site);
        if !data.exists() || is_empty(&data) {
            return Ok(());
        }
        if !self.has_data(site) {
            return Err(Error(format!(
                "{} is not a PostgreSQL data directory (no PG_VERSION); Tandem leaves it untouched\n  help: move it away to let Tandem create the member afresh",
                data.display()
            )));
        }
        self.run("pg_controldata", &[data.as_os_str().to_string_lossy().as_ref()], &[])
            .await
            .map(|_| ())
            .map_err(|e| {
                Error(format!(
                    "{} looks corrupt; Tandem leaves it untouched: {e}\n  help: restore it, or move it away to let Tandem clone the member afresh",
                    data.display()
                ))
            })
    }

    /// The last checkpoint's position of a stopped member, from `pg_controldata`.
    pub async fn checkpoint_lsn(&self, site: &str) -> Result<u64, Error> {
        let data = self.data(site).to_string_lossy().into_owned();
        let out = self.run("pg_controldata", &[&data], &[]).await?;
        out.lines()
            .find_map(|l| l.strip_prefix("Latest checkpoint location:"))
            .and_then(|v| parse_lsn(v.trim()))
            .ok_or_else(|| Error(format!("pg_controldata {data}: no checkpoint location")))
    }

    /// `initdb` with checksums (pg_rewind needs them or `wal_log_hints`), Tandem's settings
    /// and password authentication.
    pub async fn initdb(&self, site: &str) -> Result<(), Error> {
        let data = self.data(site);
        let pwfile = self.dir.join(".initdb-password");
        write_private(&pwfile, &self.password, self.user)?;
        let result = self
            .run(
                "initdb",
                &[
                    "-D",
                    &data.to_string_lossy(),
                    "-U",
                    SUPERUSER,
                    &format!("--pwfile={}", pwfile.display()),
                    "--auth-host=scram-sha-256",
                    "--auth-local=peer",
                    "--data-checksums",
                    "--encoding=UTF8",
                    "--locale=C.UTF-8",
                ],
                &[],
            )
            .await;
        let _ = std::fs::remove_file(&pwfile);
        result?;
        append(&data.join("postgresql.conf"), SETTINGS)?;
        std::fs::write(data.join("pg_hba.conf"), HBA).map_err(|e| err("pg_hba.conf", e))?;
        Ok(())
    }

    /// Copies the primary at `from` into the member's (empty) data directory as a standby
    /// streaming through its replication slot.
    pub async fn basebackup(&self, site: &str, from: SocketAddr) -> Result<(), Error> {
        let data = self.data(site);
        self.run(
            "pg_basebackup",
            &[
                "-h",
                &from.ip().to_string(),
                "-p",
                &from.port().to_string(),
                "-U",
                REPLICATION_USER,
                "-D",
                &data.to_string_lossy(),
                "-X",
                "stream",
                "-c",
                "fast",
                "-S",
                &slot(site),
                "--no-password",
            ],
            &[("PGPASSWORD", &self.replication_password)],
        )
        .await?;
        self.mark_standby(site)
    }

    /// Rewinds a former primary onto the history of the primary at `from`.
    pub async fn rewind(&self, site: &str, from: SocketAddr) -> Result<String, Error> {
        let data = self.data(site);
        let source = format!(
            "host={} port={} user={SUPERUSER} dbname=postgres connect_timeout=5",
            from.ip(),
            from.port()
        );
        let out = self
            .run(
                "pg_rewind",
                &[
                    "-D",
                    &data.to_string_lossy(),
                    &format!("--source-server={source}"),
                ],
                &[("PGPASSWORD", &self.password)],
            )
            .await?;
        self.mark_standby(site)?;
        Ok(out.lines().last().unwrap_or("").to_string())
    }

    /// Moves a member's data directory aside (never deleted here: it may hold writes no one
    /// else has) as `SITE.old`, the copies set aside before it becoming `SITE.old.1` and
    /// `SITE.old.2`; only a fourth copy is deleted, the oldest. Returns where the data went.
    pub fn set_aside(&self, site: &str) -> Result<PathBuf, Error> {
        let copy = |n: usize| match n {
            0 => self.dir.join(format!("{site}.old")),
            n => self.dir.join(format!("{site}.old.{n}")),
        };
        let oldest = copy(KEPT_ASIDE - 1);
        if oldest.exists() {
            std::fs::remove_dir_all(&oldest).map_err(|e| err(oldest.display(), e))?;
        }
        for n in (0..KEPT_ASIDE - 1).rev() {
            if copy(n).exists() {
                std::fs::rename(copy(n), copy(n + 1)).map_err(|e| err("set aside", e))?;
            }
        }
        std::fs::rename(self.data(site), copy(0)).map_err(|e| err("set aside", e))?;
        Ok(copy(0))
    }

    /// Moves a member's data directory aside as `SITE.NAME` (a restore's: never rotated or
    /// deleted by Tandem). Returns where the data went.
    pub fn set_aside_as(&self, site: &str, name: &str) -> Result<PathBuf, Error> {
        let to = self.dir.join(format!("{site}.{name}"));
        if to.exists() {
            return Err(Error(format!("{} exists already", to.display())));
        }
        std::fs::rename(self.data(site), &to).map_err(|e| err("set aside", e))?;
        Ok(to)
    }

    fn mark_standby(&self, site: &str) -> Result<(), Error> {
        let signal = self.data(site).join("standby.signal");
        write_private(&signal, "", self.user)
    }

    /// Starts the member's postmaster on `listen`, as a standby of `upstream` when given. It
    /// runs in its own process group and dies with Tandem; stopping it ends every process it
    /// started (see [`Postmaster`]).
    ///
    /// A peer that goes silent without closing its connection is given up after
    /// `failover_timeout`: by a primary's WAL senders (`wal_sender_timeout`; a synchronous
    /// standby's commits then stop waiting), by a standby's WAL receiver
    /// (`wal_receiver_timeout`). Standbys report at least every second
    /// (`wal_receiver_status_interval`), so a live one is never mistaken for a silent one.
    pub fn start(
        &self,
        site: &str,
        listen: SocketAddr,
        upstream: Option<SocketAddr>,
    ) -> Result<Box<dyn Instance>, Error> {
        if upstream.is_none() {
            let _ = std::fs::remove_file(self.data(site).join("standby.signal"));
        } else {
            self.mark_standby(site)?;
        }
        let timeout = self.failover_timeout.as_millis().max(1000);
        let status_interval = (self.failover_timeout / 4).as_secs().clamp(1, 10);
        let mut argv = vec![
            self.bins.join("postgres").to_string_lossy().into_owned(),
            "-D".into(),
            self.data(site).to_string_lossy().into_owned(),
            "-c".into(),
            format!("listen_addresses={}", listen.ip()),
            "-c".into(),
            format!("port={}", listen.port()),
            "-c".into(),
            format!("cluster_name={site}"),
            "-c".into(),
            format!("wal_sender_timeout={timeout}ms"),
            "-c".into(),
            format!("wal_receiver_timeout={timeout}ms"),
            "-c".into(),
            format!("wal_receiver_status_interval={status_interval}s"),
        ];
        if let Some(a) = &self.archive {
            let data = self.data(site).to_string_lossy().into_owned();
            for setting in [
                "archive_mode=on".to_string(),
                format!(
                    "archive_command={} --pg1-path={} archive-push %p",
                    a.command,
                    shell_quote(&data)
                ),
                format!("archive_timeout={}s", a.timeout.as_secs().max(1)),
                // A restore drill's RPO: the newest commit's time, restored and on the primary.
                "track_commit_timestamp=on".to_string(),
            ] {
                argv.push("-c".into());
                argv.push(setting);
            }
        }
        if let Some(up) = upstream {
            argv.push("-c".into());
            argv.push(format!(
                "primary_conninfo=host={} port={} user={REPLICATION_USER} passfile={} application_name={site} connect_timeout=2",
                up.ip(),
                up.port(),
                self.dir.join("pgpass").display()
            ));
            argv.push("-c".into());
            argv.push(format!("primary_slot_name={}", slot(site)));
            argv.push("-c".into());
            argv.push("recovery_target_timeline=latest".into());
        }
        let spec = Spec {
            id: site.to_string(),
            argv,
            log: self.log(site),
            env: self.environment(),
            clear_env: true,
            // A member outlives Tandem (a crash, a restart): the next one adopts it.
            detached: true,
            user: self.user,
        };
        let inner = self
            .driver
            .start(&spec)
            .map_err(|e| err(format!("cannot start postgres for {site}"), e))?;
        Ok(Box::new(Postmaster {
            inner,
            exe: self.bins.join("postgres"),
            data: self.data(site),
        }))
    }

    /// The whole environment PostgreSQL's programs run with. Nothing of Tandem's own: libpq
    /// reads `PGPASSWORD`, `PGHOST`, `PGUSER`, `PGOPTIONS`, `PGSSLMODE`… for every setting a
    /// connection string leaves out (a standby's WAL receiver would stream with Tandem's
    /// operator's password), and the servers and tools read more. A fixed `PATH`, the C.UTF-8
    /// locale, `HOME` at the database's directory (no `~/.pgpass` or `~/.psqlrc` of anyone's),
    /// and `TZ` when set (initdb's default time zone).
    pub fn environment(&self) -> Vec<(String, String)> {
        let mut env = vec![
            (
                "PATH".to_string(),
                "/usr/local/bin:/usr/bin:/bin".to_string(),
            ),
            ("LANG".to_string(), "C.UTF-8".to_string()),
            ("LC_ALL".to_string(), "C.UTF-8".to_string()),
            ("HOME".to_string(), self.dir.to_string_lossy().into_owned()),
        ];
        if let Ok(tz) = std::env::var("TZ") {
            env.push(("TZ".to_string(), tz));
        }
        env
    }

    /// The last lines of a member's log, for errors.
    pub fn log_tail(&self, site: &str) -> String {
        let text = std::fs::read_to_string(self.log(site)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(5)..].join("\n")
    }

    /// Runs one of PostgreSQL's programs as the database user, with [`Local::environment`] and
    /// `env`; the error carries its output.
    async fn run(
        &self,
        program: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<String, Error> {
        self.run_program(
            &self.bins.join(program),
            args,
            env,
            Duration::from_secs(600),
        )
        .await
        .map(|(out, err)| format!("{out}{err}"))
    }

    /// Runs `path` as the database user, with [`Local::environment`] and `env`, from the
    /// database's directory, killed after `limit`: its standard output and error; the error
    /// carries the end of what it wrote.
    pub async fn run_program(
        &self,
        path: &Path,
        args: &[&str],
        env: &[(&str, &str)],
        limit: Duration,
    ) -> Result<(String, String), Error> {
        let program = path.file_name().map_or_else(
            || path.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        let mut cmd = tokio::process::Command::new(path);
        cmd.args(args)
            .env_clear()
            .envs(self.environment())
            .envs(env.iter().copied())
            .current_dir(&self.dir)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        if let Some((uid, gid)) = self.user {
            cmd.uid(uid).gid(gid);
        }
        let out = tokio::time::timeout(limit, cmd.output())
            .await
            .map_err(|_| Error(format!("{program} took more than {limit:?}")))?
            .map_err(|e| err(format!("cannot run {program}"), e))?;
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        );
        if out.status.success() {
            Ok((stdout, stderr))
        } else {
            let text = format!("{stdout}{stderr}");
            let tail: Vec<&str> = text.lines().rev().take(4).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            Err(Error(format!(
                "{program} failed ({}): {}",
                out.status,
                tail.join(" | ")
            )))
        }
    }
}

/// A postmaster left running by an earlier Tandem, found from its `postmaster.pid`: not our
/// child, so its end is noticed by looking.
#[derive(Debug)]
struct Adopted {
    pid: i32,
}

impl Instance for Adopted {
    fn pid(&self) -> Option<u32> {
        crate::family::alive(self.pid).then_some(self.pid as u32)
    }

    fn wait(&mut self) -> scaleset::driver::BoxFuture<'_, String> {
        Box::pin(async move {
            while crate::family::alive(self.pid) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            "exited (adopted: its status is its parent's)".to_string()
        })
    }

    fn stop(&mut self, grace: Duration) -> scaleset::driver::BoxFuture<'_, String> {
        Box::pin(async move {
            let pid = nix::unistd::Pid::from_raw(self.pid);
            if !grace.is_zero() {
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
                if tokio::time::timeout(grace, self.wait()).await.is_ok() {
                    return "stopped".to_string();
                }
            }
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            self.wait().await
        })
    }
}

impl Local {
    /// The member's postmaster when one is running from its data directory (left by an
    /// earlier Tandem: members outlive it), to carry on with instead of starting one.
    /// Only a process running this database's `postgres` with the data directory as its
    /// working directory is taken, whatever `postmaster.pid` says.
    pub fn adopt(&self, site: &str) -> Option<Box<dyn Instance>> {
        let text = std::fs::read_to_string(self.data(site).join("postmaster.pid")).ok()?;
        let pid: i32 = text.lines().next()?.trim().parse().ok()?;
        let exe = self.bins.join("postgres");
        if !crate::family::in_data_dir(&exe, &self.data(site)).contains(&pid) {
            return None;
        }
        Some(Box::new(Postmaster {
            inner: Box::new(Adopted { pid }),
            exe,
            data: self.data(site),
        }))
    }
}

/// A running postmaster. Stopping it (and only that: a fast shutdown by signal is the
/// caller's, see `cluster::shut_down`) ends its whole family, not only its process group:
/// PostgreSQL's processes each lead a session of their own ([`crate::family`]). With no grace
/// that is fencing: every process is killed at once, none can write again, and none is left
/// attached to the shared memory that would make `pg_rewind` or a restart refuse the data.
#[derive(Debug)]
pub struct Postmaster {
    inner: Box<dyn Instance>,
    exe: PathBuf,
    data: PathBuf,
}

impl Postmaster {
    /// SIGKILL to the postmaster's family and to anything of this server's left in its data
    /// directory (processes a postmaster that died before left behind).
    fn kill_all(&self) -> Vec<i32> {
        let mut killed = self
            .inner
            .pid()
            .map(|p| crate::family::kill_family(p as i32))
            .unwrap_or_default();
        killed.extend(crate::family::kill_in_data_dir(&self.exe, &self.data));
        killed
    }
}

impl Instance for Postmaster {
    fn pid(&self) -> Option<u32> {
        self.inner.pid()
    }

    fn wait(&mut self) -> scaleset::driver::BoxFuture<'_, String> {
        self.inner.wait()
    }

    fn stop(&mut self, grace: Duration) -> scaleset::driver::BoxFuture<'_, String> {
        Box::pin(async move {
            if !grace.is_zero()
                && let Some(pid) = self.inner.pid()
            {
                // SIGINT: PostgreSQL's fast shutdown.
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGINT,
                );
                if let Ok(status) = tokio::time::timeout(grace, self.inner.wait()).await {
                    self.kill_all();
                    return status;
                }
            }
            let killed = self.kill_all();
            let status = self.inner.stop(Duration::ZERO).await;
            // A postmaster killed while its parent does not reap it (an adopted one whose
            // parent is a subreaper) stays a zombie whose pid still answers signals, and the
            // lock file naming it makes `pg_rewind` and the next start refuse the directory.
            if crate::family::in_data_dir(&self.exe, &self.data).is_empty() {
                let _ = std::fs::remove_file(self.data.join("postmaster.pid"));
            }
            format!(
                "{status} (killed with {} processes of its own)",
                killed.len().saturating_sub(1)
            )
        })
    }
}

/// A member's replication slot on the primary.
pub fn slot(site: &str) -> String {
    let clean: String = site
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("tandem_{clean}")
}

/// `X/Y` (hex halves) as a byte position.
pub fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

/// A byte position as PostgreSQL writes it.
pub fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xffff_ffff)
}

pub(crate) fn is_empty(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_none())
}

pub(crate) fn chown(path: &Path, uid: u32, gid: u32) -> Result<(), Error> {
    nix::unistd::chown(
        path,
        Some(nix::unistd::Uid::from_raw(uid)),
        Some(nix::unistd::Gid::from_raw(gid)),
    )
    .map_err(|e| {
        err(
            format!("cannot give {} to the database user", path.display()),
            e,
        )
    })
}

/// The database user must be able to reach its directory through every parent.
fn reachable(dir: &Path, uid: u32, gid: u32) -> Result<(), Error> {
    for a in dir.ancestors().skip(1) {
        let Ok(meta) = std::fs::metadata(a) else {
            continue;
        };
        let mode = meta.mode();
        let ok = if meta.uid() == uid {
            mode & 0o100 != 0
        } else if meta.gid() == gid {
            mode & 0o010 != 0
        } else {
            mode & 0o001 != 0
        };
        if !ok {
            return Err(Error(format!(
                "the database user (uid {uid}) cannot reach {}: {} is mode {:o}\n  help: let others traverse it (chmod o+x) or choose another state_dir",
                dir.display(),
                a.display(),
                mode & 0o7777
            )));
        }
    }
    Ok(())
}

/// A generated password kept in `path`, created on first use.
fn secret(path: &Path) -> Result<String, Error> {
    if let Ok(s) = std::fs::read_to_string(path) {
        return Ok(s.trim().to_string());
    }
    use rand::Rng as _;
    use rand::distr::Alphanumeric;
    let s: String = rand::rng()
        .sample_iter(&Alphanumeric)
        .take(32)
        .map(char::from)
        .collect();
    write_private(path, &s, None)?;
    Ok(s)
}

pub(crate) fn write_private(
    path: &Path,
    text: &str,
    owner: Option<(u32, u32)>,
) -> Result<(), Error> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| err(path.display(), e))?;
    io::Write::write_all(&mut f, text.as_bytes()).map_err(|e| err(path.display(), e))?;
    if let Some((uid, gid)) = owner {
        chown(path, uid, gid)?;
    }
    Ok(())
}

fn append(path: &Path, text: &str) -> Result<(), Error> {
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .map_err(|e| err(path.display(), e))?;
    io::Write::write_all(&mut f, text.as_bytes()).map_err(|e| err(path.display(), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsns_round_trip() {
        assert_eq!(parse_lsn("0/3000148"), Some(0x3000148));
        assert_eq!(parse_lsn("1/0"), Some(1 << 32));
        assert_eq!(format_lsn(0x1_0300_0148), "1/3000148");
        assert_eq!(parse_lsn("nope"), None);
        assert_eq!(slot("Edge-1"), "tandem_edge_1");
    }

    /// Each data directory set aside is kept as `SITE.old`, the earlier ones shift to
    /// `SITE.old.1` and `SITE.old.2`, and only the copy beyond [`KEPT_ASIDE`] is deleted.
    #[test]
    #[allow(clippy::unwrap_used)]
    fn set_aside_keeps_the_last_copies() {
        let dir = tempfile::tempdir().unwrap();
        let local = Local::open(
            PathBuf::from("/nonexistent"),
            None,
            dir.path().to_path_buf(),
            Duration::from_secs(2),
        )
        .unwrap();
        let read = |p: PathBuf| std::fs::read_to_string(p.join("mark")).unwrap();
        for n in 1..=4 {
            std::fs::create_dir(local.data("edge")).unwrap();
            std::fs::write(local.data("edge").join("mark"), n.to_string()).unwrap();
            let went = local.set_aside("edge").unwrap();
            assert_eq!(went, local.dir.join("edge.old"));
            assert!(!local.data("edge").exists());
        }
        assert_eq!(read(local.dir.join("edge.old")), "4");
        assert_eq!(read(local.dir.join("edge.old.1")), "3");
        assert_eq!(read(local.dir.join("edge.old.2")), "2");
        assert!(
            !local.dir.join("edge.old.3").exists(),
            "only {KEPT_ASIDE} kept"
        );
    }
}
